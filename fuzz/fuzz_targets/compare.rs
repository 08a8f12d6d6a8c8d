//! `lockstep compare --dump F --golden ENTRY` on an arbitrary dump file: the safetensors dump reader
//! (src/golden.rs `TapsFile`, src/dump_check.rs) and the judging behind it (src/compare.rs
//! `CompareGolden::compare`, what `compare_dump` runs). A malformed dump must be an error naming the
//! file; a readable one must give a report.
//!
//! The golden is a subset of the committed tiny-qwen2/exact/fox (`keep`): 38 of its 245 taps, from both
//! layers and two steps, and the top-64 logits of steps 0..=2, written once at start-up with its manifest
//! record (fox's, with the subset's tensor list and sha256). Judging scales with the golden's tap count:
//! against all of fox an input costs ~5 ms (~200 executions/s on this 2-core machine).
//! Each input is written to one file in a private temporary directory (in /dev/shm where there is one).
#![no_main]

use libfuzzer_sys::fuzz_target;
use lockstep::compare::CompareGolden;
use lockstep::golden::{write_safetensors, Manifest, TapsFile};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

const SOURCE: &str = "tiny-qwen2/exact/fox";
/// Taps kept: layer 0 and the taps outside the layer stack at step 0, layer 1's from its FFN input on
/// (where llama.cpp keeps only the last row at the prefill), and a few of step 1.
const LAYER1: &[&str] = &["ffn_inp-1", "norm-1.rms_norm.1", "ffn_norm-1", "ffn_out-1", "l_out-1"];
const STEP1: &[&str] = &["s1/result_output", "s1/kq-0", "s1/kq_soft_max-1", "s1/Qcur-0.rope", "s1/l_out-1", "s1/norm", "s1/embd"];
/// Rows (steps) of the top-64 logits kept.
const TOPK_STEPS: usize = 3;

struct Fixture {
    golden: CompareGolden<'static>,
    dump: PathBuf,
}

fn keep(key: &str) -> bool {
    if !key.starts_with('s') {
        return true; // tokens, continuation, topk_ids, topk_values, lse
    }
    match key.strip_prefix("s0/") {
        Some(tap) => !tap.contains("-1") || LAYER1.contains(&tap),
        None => STEP1.contains(&key),
    }
}

/// Writes the subset golden and its manifest into `dir`; returns the manifest.
fn subset_golden(dir: &Path) -> Manifest {
    // The committed goldens: the checkout this target was built in, or LOCKSTEP_FUZZ_GOLDEN (a
    // golden/ directory) when the binary runs elsewhere (a fuzzing machine without the build tree).
    let golden = std::env::var_os("LOCKSTEP_FUZZ_GOLDEN").map(PathBuf::from).unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../golden"));
    let committed = Manifest::load(&golden).unwrap_or_else(|e| panic!("{}: {e:#}", golden.display()));
    let record = committed.find(SOURCE).expect("the source golden entry");
    let fox = committed.open_taps(record).expect("the source golden");
    let (mut f32s, mut i32s) = (Vec::new(), Vec::new());
    for key in fox.keys().into_iter().filter(|k| keep(k)) {
        let shape = fox.shape(&key).expect("listed key");
        let rows = if key.starts_with("topk_") || key == "lse" { TOPK_STEPS } else { shape[0] };
        let mut shape = shape;
        shape[0] = rows;
        let n: usize = shape.iter().product();
        match fox.dtype(&key) {
            Some(safetensors::Dtype::I32) => i32s.push((key.clone(), shape, fox.ints(&key).unwrap()[..n].iter().map(|&v| v as i32).collect())),
            _ => f32s.push((key.clone(), shape, fox.f32(&key).unwrap().data[..n].to_vec())),
        }
    }
    let taps = dir.join("taps/fuzz/exact/fox.safetensors");
    std::fs::create_dir_all(taps.parent().unwrap()).unwrap();
    write_safetensors(&taps, &f32s, &i32s).expect("writing the subset golden");
    let bytes = std::fs::read(&taps).unwrap();
    let mut rec = serde_json::to_value(record).unwrap();
    let o = rec.as_object_mut().unwrap();
    o.insert("path".into(), "taps/fuzz/exact/fox.safetensors".into());
    o.insert("sha256".into(), sha256_hex(&bytes).into());
    o.insert("arch".into(), "qwen2".into());
    let listed: Vec<serde_json::Value> =
        record.tensors.iter().filter(|t| t.key.as_deref().is_some_and(keep)).map(|t| serde_json::to_value(t).unwrap()).collect();
    o.insert("tensors".into(), listed.into());
    std::fs::write(dir.join("manifest.json"), serde_json::json!({ "files": [rec] }).to_string()).unwrap();
    let m = Manifest::load(dir).expect("the subset manifest");
    let t: TapsFile = m.open_taps(&m.files[0]).expect("the subset golden");
    assert_eq!(t.taps().len(), f32s.iter().filter(|(k, ..)| k.starts_with('s')).count());
    m
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

fn fixture() -> &'static Fixture {
    // Statics, so that LeakSanitizer sees them as reachable.
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    static MANIFEST: OnceLock<Manifest> = OnceLock::new();
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let shm = Path::new("/dev/shm");
        let dir = DIR.get_or_init(|| if shm.is_dir() { tempfile::tempdir_in(shm) } else { tempfile::tempdir() }.expect("a temporary directory"));
        let manifest = MANIFEST.get_or_init(|| subset_golden(dir.path()));
        let golden = CompareGolden::open(manifest, "fuzz/exact/fox").expect("the subset golden entry");
        Fixture { golden, dump: dir.path().join("dump.safetensors") }
    })
}

fuzz_target!(
    // Set up before the first input, outside libFuzzer's per-input timeout (slow in a debug build).
    init: {
        fixture();
    },
    |data: &[u8]| {
        let f = fixture();
        std::fs::write(&f.dump, data).expect("writing the dump");
        match f.golden.compare(&f.dump, None) {
            Ok(case) => {
                let _ = serde_json::to_string(&case);
            }
            Err(e) => {
                let msg = e.to_string();
                assert!(msg.contains("dump.safetensors"), "an error about the dump must name it: {msg}");
            }
        }
    }
);
