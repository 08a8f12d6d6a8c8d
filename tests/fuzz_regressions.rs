//! Inputs the fuzz targets (fuzz/fuzz_targets, run by ci/fuzz) found to crash a reader, one test each:
//! the input is under tests/fuzz_regressions/, and each test fails without the fix it names. Every
//! crash is now an error naming the file and the problem.

use lockstep::golden::Manifest;
use lockstep_engine::gguf::GgufFile;
use std::path::{Path, PathBuf};

fn input(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz_regressions").join(name)
}

/// Target `manifest`: a record with `"n_layer": 0` was accepted, and opening its taps then derived the
/// final norm's input as layer `n_layer - 1` (src/noise.rs `direct_inputs`): subtract with overflow.
/// Fixed in the manifest reader (src/golden.rs `Manifest::parse`): a model has at least one layer.
#[test]
fn manifest_with_zero_layers_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(input("manifest-n_layer-0.json"), dir.path().join("manifest.json")).unwrap();
    let e = Manifest::load(dir.path()).expect_err("a manifest with n_layer 0 must be refused").to_string();
    assert!(e.contains("manifest.json") && e.contains("files[0]") && e.contains("n_layer is 0"), "{e}");
}

/// Target `manifest` (long run, after 8.9 million executions): a record without `n_layer` whose noise
/// records name layer 2^64 − 1 (`s0/l_oukt-18446744073709551615`); the per-tap noise then took the
/// model's depth as the deepest named layer plus one (src/noise.rs `effective`): add with overflow.
/// Fixed there (`depth_named`): the deepest layer plus one saturates (in a release build the add
/// wrapped to depth 0 instead).
#[test]
fn manifest_noise_naming_the_last_usize_layer_does_not_overflow() {
    let text = std::fs::read_to_string(input("manifest-layer-usize-max.json")).unwrap();
    let m = Manifest::parse(Path::new("golden-fuzz"), &text).expect("the record itself is well-formed");
    let f = &m.files[0];
    assert_eq!(f.n_layer, None);
    let noise = f.noise();
    assert!(noise.keys().any(|k| k.ends_with("-18446744073709551615")), "{noise:?}");
    assert_eq!(lockstep::noise::depth_named(noise.keys().map(String::as_str)), Some(usize::MAX));
    let eff = lockstep::noise::effective(&noise, f.n_layer);
    assert_eq!(eff.len(), noise.len());
}

/// Target `gguf`: a tensor of shape ne = [0, 2^62, 4] has 0 elements, so its element count passed, but
/// its row count ne[1]·ne[2] (`TensorInfo::n_rows`, used to slice rows for dequantization) overflowed.
/// Fixed in the GGUF reader (engine/src/gguf.rs `parse_header`): the row count must fit i64 too.
#[test]
fn gguf_row_count_overflow_behind_a_zero_dimension_is_refused() {
    let path = input("gguf-zero-ne0-row-count-overflow.gguf");
    let e = GgufFile::open(&path).expect_err("the row count 2^64 overflows").to_string();
    assert!(e.contains("gguf-zero-ne0-row-count-overflow.gguf") && e.contains("blk.0.attn_q.weight") && e.contains("overflows"), "{e}");
}
