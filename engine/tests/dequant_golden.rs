//! The dequantizer against gguf-py's `gguf.quants.dequantize`, bit for bit.
//!
//! Goldens (written by ci/golden/dequant.py through `ci/regenerate-golden`) live in
//! `$LOCKSTEP_GOLDEN_DIR/dequant/`, default `<repo>/golden/dequant/`:
//! - `synthetic.safetensors`: random blocks of every supported type (`{TYPE}.raw`) and their values.
//! - `{model}.safetensors`: a few blocks of real tensors (`{tensor}@{first}.raw` and values).
//! - `{model}.json`: sha256 of every whole tensor dequantized to f32 (needs the model file: the real
//!   models are fetched with `fetch::ensure_model` when missing).
//!
//! Missing goldens fail the test, naming the command that regenerates them.

use lockstep_engine::dequant::{dequantize, dequantize_tensor};
use lockstep_engine::fetch;
use lockstep_engine::gguf::{GgmlType, GgufFile};
use safetensors::SafeTensors;
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

const REGENERATE: &str = "ci/regenerate-golden";

fn golden_dir() -> PathBuf {
    match std::env::var_os("LOCKSTEP_GOLDEN_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join("golden"),
    }
}

fn read_golden(name: &str) -> Vec<u8> {
    let p = golden_dir().join("dequant").join(name);
    std::fs::read(&p)
        .unwrap_or_else(|e| panic!("dequant golden {} is missing ({e}): run `{REGENERATE}` (or point LOCKSTEP_GOLDEN_DIR at a golden directory)", p.display()))
}

/// Every `{model}.json` in the golden directory (the models the goldens cover).
fn golden_models() -> Vec<String> {
    let d = golden_dir().join("dequant");
    let rd = std::fs::read_dir(&d).unwrap_or_else(|e| panic!("dequant goldens missing at {} ({e}): run `{REGENERATE}`", d.display()));
    let mut ms: Vec<String> = rd.filter_map(|e| e.ok()).filter_map(|e| e.file_name().to_str()?.strip_suffix(".json").map(str::to_string)).collect();
    ms.sort();
    assert!(!ms.is_empty(), "no dequant goldens in {}: run `{REGENERATE}`", d.display());
    ms
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

/// Compares bit patterns; on mismatch, says where and how (first few pairs, count, max |diff|).
fn bit_exact(what: &str, got: &[f32], want: &[f32]) -> Result<(), String> {
    if got.len() != want.len() {
        return Err(format!("{what}: {} values, golden has {}", got.len(), want.len()));
    }
    let bad: Vec<usize> = (0..got.len()).filter(|&i| got[i].to_bits() != want[i].to_bits()).collect();
    if bad.is_empty() {
        return Ok(());
    }
    let max = bad.iter().map(|&i| (got[i] - want[i]).abs()).fold(0f32, f32::max);
    let first: Vec<String> = bad.iter().take(5).map(|&i| format!("[{i}] got {:e} want {:e}", got[i], want[i])).collect();
    Err(format!("{what}: {} of {} values differ (max |diff| {max:e}); first: {}", bad.len(), got.len(), first.join(", ")))
}

#[test]
fn synthetic_blocks_bit_exact() {
    let bytes = read_golden("synthetic.safetensors");
    let st = SafeTensors::deserialize(&bytes).expect("synthetic.safetensors parses");
    let mut seen = vec![];
    let mut failures = vec![];
    for name in st.names() {
        if name.ends_with(".raw") {
            continue;
        }
        let ty = GgmlType::from_name(name).unwrap_or_else(|| panic!("unknown type {name} in synthetic goldens"));
        let want = f32s(st.tensor(name).unwrap().data());
        let raw = st.tensor(&format!("{name}.raw")).unwrap();
        match dequantize(ty, raw.data(), want.len()) {
            Ok(got) => {
                if let Err(e) = bit_exact(name, &got, &want) {
                    failures.push(e)
                }
            }
            Err(e) => failures.push(format!("{name}: {e}")),
        }
        seen.push(ty);
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    use GgmlType::*;
    for ty in [F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K] {
        assert!(seen.contains(&ty), "synthetic goldens lack {ty}: run `{REGENERATE}`");
    }
}

struct Samples {
    meta: BTreeMap<String, String>,
    /// key → (tensor, type, first element)
    samples: Vec<(String, String, GgmlType, usize)>,
}

fn samples(model: &str, st: &SafeTensors, bytes: &[u8]) -> Samples {
    let (_, m) = SafeTensors::read_metadata(bytes).expect("safetensors header");
    let meta: BTreeMap<String, String> = m.metadata().clone().unwrap_or_default().into_iter().collect();
    let js: Value = serde_json::from_str(meta.get("samples").unwrap_or_else(|| panic!("{model}: no `samples` metadata"))).expect("samples metadata is JSON");
    let mut out = vec![];
    for (key, s) in js.as_object().expect("samples is an object") {
        let ty = GgmlType::from_name(s["type"].as_str().unwrap()).expect("known type");
        out.push((key.clone(), s["tensor"].as_str().unwrap().to_string(), ty, s["first_element"].as_u64().unwrap() as usize));
        assert!(st.tensor(key).is_ok(), "{model}: sample {key} listed but absent");
    }
    Samples { meta, samples: out }
}

#[test]
fn model_samples_bit_exact() {
    let mut failures = vec![];
    let mut n = 0;
    for model in golden_models() {
        let bytes = read_golden(&format!("{model}.safetensors"));
        let st = SafeTensors::deserialize(&bytes).expect("parses");
        let s = samples(&model, &st, &bytes);
        assert!(!s.samples.is_empty(), "{model}: no samples");
        for (key, _, ty, _) in &s.samples {
            let want = f32s(st.tensor(key).unwrap().data());
            let raw = st.tensor(&format!("{key}.raw")).unwrap();
            match dequantize(*ty, raw.data(), want.len()) {
                Ok(got) => {
                    if let Err(e) = bit_exact(&format!("{model} {key} ({ty})"), &got, &want) {
                        failures.push(e)
                    }
                }
                Err(e) => failures.push(format!("{model} {key}: {e}")),
            }
            n += 1;
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    eprintln!("{n} samples bit-exact");
}

/// Whole-tensor checksums of one model, plus: the samples' bytes are the model's bytes.
fn whole_tensors(model: &str) {
    let js: BTreeMap<String, Value> = serde_json::from_slice(&read_golden(&format!("{model}.json"))).expect("checksum JSON parses");
    let st_bytes = read_golden(&format!("{model}.safetensors"));
    let st = SafeTensors::deserialize(&st_bytes).unwrap();
    let s = samples(model, &st, &st_bytes);
    let model_file = s.meta.get("model_file").unwrap_or_else(|| panic!("{model}: no model_file metadata: run `{REGENERATE}`"));
    let path = match model_file.strip_prefix("cache:") {
        Some(id) => fetch::ensure_model(id, true).unwrap_or_else(|e| panic!("{model}: {e}")),
        None => golden_dir().join(model_file),
    };
    let g = GgufFile::open(&path).unwrap_or_else(|e| panic!("{e}"));

    for (key, tensor, ty, first) in &s.samples {
        let t = g.tensor(tensor).unwrap_or_else(|| panic!("{model}: sample {key}: no tensor {tensor} in {}", path.display()));
        assert_eq!(t.ty, *ty, "{model} {key}");
        let raw = st.tensor(&format!("{key}.raw")).unwrap();
        let start = first / ty.block_size() * ty.type_size();
        let data = g.tensor_data(t);
        assert!(data.get(start..start + raw.data().len()) == Some(raw.data()), "{model} {key}: golden bytes are not the file's");
    }

    let names: Vec<&str> = g.tensors.iter().map(|t| t.name.as_str()).collect();
    let mut golden_names: Vec<&str> = js.keys().map(String::as_str).collect();
    let mut file_names = names.clone();
    golden_names.sort();
    file_names.sort();
    assert_eq!(file_names, golden_names, "{model}: tensor names differ from the goldens");

    let mut failures = vec![];
    let (mut t_deq, mut n_el) = (0f64, 0u64);
    for t in &g.tensors {
        let want = &js[&t.name];
        if want["type"].as_str() != Some(t.ty.name()) {
            failures.push(format!("{}: type {} vs golden {}", t.name, t.ty, want["type"]));
            continue;
        }
        let ne: Vec<u64> = want["ne"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
        if ne != t.ne {
            failures.push(format!("{}: ne {:?} vs golden {:?}", t.name, t.ne, ne));
            continue;
        }
        let t0 = Instant::now();
        let v = match dequantize_tensor(&g, t) {
            Ok(v) => v,
            Err(e) => {
                failures.push(e.to_string());
                continue;
            }
        };
        t_deq += t0.elapsed().as_secs_f64();
        n_el += v.len() as u64;
        let mut h = Sha256::new();
        // f32 little-endian bytes, in chunks to avoid a second full-size buffer.
        let mut buf = Vec::with_capacity(1 << 16);
        for c in v.chunks(1 << 14) {
            buf.clear();
            buf.extend(c.iter().flat_map(|x| x.to_le_bytes()));
            h.update(&buf);
        }
        let got = hex::encode(h.finalize());
        if Some(got.as_str()) != want["sha256"].as_str() {
            failures.push(format!("{} ({}): sha256 {got} vs golden {}", t.name, t.ty, want["sha256"]));
        }
    }
    eprintln!("{model}: {} tensors, {n_el} elements dequantized in {t_deq:.2} s ({:.0} M elements/s)", g.tensors.len(), n_el as f64 / t_deq / 1e6);
    assert!(failures.is_empty(), "{model}: {} tensors differ:\n{}", failures.len(), failures.join("\n"));
}

#[test]
fn whole_tensors_qwen() {
    whole_tensors("qwen2.5-coder-0.5b");
}

#[test]
fn whole_tensors_smollm2() {
    whole_tensors("smollm2-135m");
}

/// The tiny models (committed in golden/models/, quantized like the real ones by ci/golden/tiny.py).
#[test]
fn whole_tensors_tiny_qwen2() {
    whole_tensors("tiny-qwen2");
}

#[test]
fn whole_tensors_tiny_llama() {
    whole_tensors("tiny-llama");
}

/// Models whose whole tensors a test above checks.
const CHECKED: [&str; 4] = ["qwen2.5-coder-0.5b", "smollm2-135m", "tiny-qwen2", "tiny-llama"];

/// A model with dequantization goldens but no test above would never be checked: fail instead.
#[test]
fn every_golden_model_is_checked() {
    let unchecked: Vec<String> = golden_models().into_iter().filter(|m| !CHECKED.contains(&m.as_str())).collect();
    assert!(
        unchecked.is_empty(),
        "dequant goldens for {} have no whole-tensor test: add a `whole_tensors_…` test for each to engine/tests/dequant_golden.rs",
        unchecked.join(", ")
    );
}
