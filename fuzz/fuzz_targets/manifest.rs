//! The golden manifest (src/golden.rs, `Manifest::parse`, the text of golden/manifest.json) on arbitrary
//! text, then what reads the parsed records: entry lookup, graph order, per-tap noise, report records.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lockstep::golden::Manifest;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(m) = Manifest::parse(Path::new("golden-fuzz"), text) else { return };
    for f in &m.files {
        let name = f.entry_name();
        let _ = m.find(&name);
        let _ = f.graph_order();
        let noise = f.noise();
        let _ = lockstep::noise::effective(&noise, f.n_layer);
        let _ = lockstep::compare::entry_for_report(f);
    }
    let _ = m.taps_files().count();
    let _ = m.find("tiny-qwen2/exact/fox");
});
