//! Suite TOML parsing (src/suite.rs, `Suite::parse`) on arbitrary text: a malformed suite must be an error
//! naming the file and line, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lockstep::suite::Suite;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    // `Suite::load` reads the file as UTF-8 text (non-UTF-8 is an I/O error before parsing).
    let Ok(text) = std::str::from_utf8(data) else { return };
    match Suite::parse(Path::new("suites/fuzz.toml"), text) {
        Ok(suite) => {
            for case in &suite.cases {
                for backend in &case.backends {
                    assert!(case.tolerances_for(backend).is_some(), "case {:?}: no limits for its backend {backend:?}", case.name);
                }
            }
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
});
