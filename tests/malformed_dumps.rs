//! Malformed and odd dumps, judged with `lockstep compare`'s `compare_dump` against a committed golden
//! (tiny-qwen2/exact/fox). The "engine" is the golden itself, rewritten: a dump that is accepted must
//! pass (its values are llama.cpp's), one that is refused must name the tap, the expected and found shape
//! or dtype, and give a hint. Every case runs inside `catch_unwind`: a panic fails the test.
//!
//! tiny-qwen2: 2 layers, width 256, 4 query heads and 2 KV heads of 64, FFN 512, vocabulary 1024; the
//! prompt has 9 tokens; the golden holds steps 0..=4 (s0 prefill, s1..s4 decode).

use lockstep::compare::compare_dump;
use lockstep::golden::{self, Manifest, TapsFile};
use lockstep::report::CaseReport;
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

const ENTRY: &str = "tiny-qwen2/exact/fox";

fn golden_path() -> PathBuf {
    golden::default_dir().join("taps/tiny-qwen2/exact/fox.safetensors")
}

/// One tensor of a dump under construction.
#[derive(Clone, Debug)]
struct Entry {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

/// A dump under construction, key → tensor.
#[derive(Clone, Debug)]
struct Dump(BTreeMap<String, Entry>);

fn f32_bytes(d: &[f32]) -> Vec<u8> {
    d.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn from_f32_bytes(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

impl Dump {
    /// The golden's taps (f32), `tokens` and `continuation`, as an engine would dump them.
    fn golden() -> Dump {
        static G: OnceLock<Dump> = OnceLock::new();
        G.get_or_init(|| {
            let t = TapsFile::open(&golden_path()).unwrap();
            let mut m = BTreeMap::new();
            for key in t.keys() {
                if key.starts_with('s') && key.contains('/') {
                    let x = t.f32(&key).unwrap();
                    m.insert(key, Entry { dtype: Dtype::F32, shape: x.shape, bytes: f32_bytes(&x.data) });
                } else if key == "tokens" || key == "continuation" {
                    let ids: Vec<i32> = t.ints(&key).unwrap().into_iter().map(|v| v as i32).collect();
                    m.insert(key, Entry { dtype: Dtype::I32, shape: vec![ids.len()], bytes: ids.iter().flat_map(|v| v.to_le_bytes()).collect() });
                }
            }
            Dump(m)
        })
        .clone()
    }
    fn floats(&self, key: &str) -> (Vec<usize>, Vec<f32>) {
        let e = &self.0[key];
        assert_eq!(e.dtype, Dtype::F32);
        (e.shape.clone(), from_f32_bytes(&e.bytes))
    }
    fn put(&mut self, key: &str, dtype: Dtype, shape: Vec<usize>, bytes: Vec<u8>) {
        self.0.insert(key.into(), Entry { dtype, shape, bytes });
    }
    fn put_f32(&mut self, key: &str, shape: Vec<usize>, data: &[f32]) {
        self.put(key, Dtype::F32, shape, f32_bytes(data));
    }
    fn tap_keys(&self) -> Vec<String> {
        self.0.keys().filter(|k| k.contains('/')).cloned().collect()
    }
    /// Re-encodes every f32 tap with `f` (dtype, bytes per value).
    fn encode_taps(&mut self, dtype: Dtype, f: impl Fn(f32) -> Vec<u8>) {
        for k in self.tap_keys() {
            let (shape, d) = self.floats(&k);
            self.put(&k, dtype, shape, d.iter().flat_map(|&v| f(v)).collect());
        }
    }
    fn write(&self, dir: &Path, name: &str) -> PathBuf {
        let p = dir.join(format!("{name}.safetensors"));
        let views: Vec<(String, TensorView)> = self.0.iter().map(|(k, e)| (k.clone(), TensorView::new(e.dtype, e.shape.clone(), &e.bytes).unwrap())).collect();
        safetensors::serialize_to_file(views, None, &p).unwrap();
        p
    }
}

/// `compare_dump` on `path` against `golden`; a panic fails the test with the case's name.
fn judge_against(path: &Path, golden: &str) -> Result<CaseReport, String> {
    let manifest = Manifest::load(&golden::default_dir()).unwrap();
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| compare_dump(&manifest, path, golden, None))) {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(p) => {
            let msg = p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default();
            panic!("compare_dump panicked on {}: {msg}", path.display())
        }
    }
}

fn judge(path: &Path) -> Result<CaseReport, String> {
    judge_against(path, ENTRY)
}

/// The dump is refused; the message holds every needle (the file, the tap, expected, found, hint).
fn refused(path: &Path, needles: &[&str]) -> String {
    let e = match judge(path) {
        Ok(c) => panic!("{} was accepted (passed: {}), expected an error with {needles:?}", path.display(), c.passed),
        Err(e) => e,
    };
    assert!(e.contains(&path.display().to_string()), "the error does not name the file: {e}");
    for n in needles {
        assert!(e.contains(n), "missing {n:?} in: {e}");
    }
    e
}

/// The dump is judged and passes: every check that ran passed.
fn passes(path: &Path) -> CaseReport {
    let c = judge(path).unwrap_or_else(|e| panic!("refused: {e}"));
    let failed: Vec<String> = c.failed_checks().map(|k| format!("{} {}={} (limit {}) {:?}", k.name, k.metric, k.value, k.limit, k.detail)).collect();
    assert!(c.passed, "{} failed: {failed:#?}\nfirst divergence {:?}", path.display(), c.first_divergence);
    c
}

fn notes(c: &CaseReport) -> String {
    c.coverage.as_ref().unwrap().notes.join("\n")
}

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

// ---- the golden as the engine: the baseline every accepted case is measured against -------------

#[test]
fn golden_rewritten_passes_with_full_coverage() {
    let d = tmp();
    let c = passes(&Dump::golden().write(d.path(), "golden"));
    let k = c.coverage.as_ref().unwrap();
    assert_eq!(k.compared, k.golden_taps);
    assert!(k.golden_taps > 200, "{}", k.golden_taps);
    assert!(k.not_dumped.is_empty() && k.unknown.is_empty() && k.not_checked.is_empty(), "{k:?}");
    assert_eq!(k.logit_steps, 5);
    assert!(c.checks.iter().any(|k| k.name == "tokens" && k.passed));
}

#[test]
fn absolute_and_relative_golden_paths_find_the_entry() {
    let d = tmp();
    let p = Dump::golden().write(d.path(), "golden");
    let abs = std::fs::canonicalize(golden_path()).unwrap();
    let c = judge_against(&p, abs.to_str().unwrap()).unwrap();
    assert!(c.passed && c.case == ENTRY, "{}", c.case);
    assert!(judge_against(&p, "taps/tiny-qwen2/exact/fox.safetensors").unwrap().passed);
}

// ---- refused: each a specific error ------------------------------------------------------------

#[test]
fn integer_dtype_for_a_float_tap() {
    let d = tmp();
    let mut dump = Dump::golden();
    let (shape, data) = dump.floats("s0/embd");
    dump.put("s0/embd", Dtype::I32, shape, data.iter().flat_map(|&v| (v as i32).to_le_bytes()).collect());
    refused(
        &dump.write(d.path(), "i32"),
        &[
            "s0/embd",
            "integer dtype for a float tap",
            "expected F32",
            "[1, 1, 9, 256]",
            "found I32 [1, 1, 9, 256]",
            "hint: activations and logits are floating point",
        ],
    );
}

#[test]
fn transposed_2d() {
    let d = tmp();
    let mut dump = Dump::golden();
    let (_, x) = dump.floats("s0/attn_norm-0");
    let (t, w) = (9, 256);
    let xt: Vec<f32> = (0..w * t).map(|i| x[(i % t) * w + i / t]).collect(); // [w, t]
    dump.put_f32("s0/attn_norm-0", vec![w, t], &xt);
    refused(
        &dump.write(d.path(), "transposed"),
        &["s0/attn_norm-0", "transposed", "expected [1, 1, 9, 256]", "found [256, 9]", "hint: one row per token", "transpose before saving"],
    );
}

#[test]
fn scores_tokens_first_are_refused_before_judging() {
    // Was a panic (arithmetic underflow in src/checks/invariants.rs) when judged.
    let d = tmp();
    let mut dump = Dump::golden();
    for k in dump.tap_keys().into_iter().filter(|k| k.contains("/kq-") || k.contains("/kq_soft_max-")) {
        let (s, x) = dump.floats(&k);
        let (h, t, kv) = (s[1], s[2], s[3]);
        let y: Vec<f32> = (0..t * h * kv)
            .map(|i| {
                let (tt, hh, c) = (i / (h * kv), (i / kv) % h, i % kv);
                x[(hh * t + tt) * kv + c]
            })
            .collect();
        dump.put_f32(&k, vec![1, t, h, kv], &y);
    }
    let e = refused(
        &dump.write(d.path(), "tokens_first"),
        &[
            "s0/kq-0",
            "axes in another order: tokens-first",
            "expected [1, 4, 9, 9] = [1, heads, tokens, kv_len]",
            "found [1, 9, 4, 9]",
            "hint: kq is head-first",
            "permute(0, 2, 1, 3)",
            "3 more tensors",
            "s0/kq_soft_max-0",
        ],
    );
    // Decode steps (one token row) have the same element order either way: not among the problems.
    assert!(!e.contains("s1/kq"), "{e}");
}

#[test]
fn empty_tensor() {
    let d = tmp();
    let mut dump = Dump::golden();
    dump.put_f32("s0/Qcur-0.rope", vec![1, 0, 4, 64], &[]);
    refused(
        &dump.write(d.path(), "empty"),
        &["s0/Qcur-0.rope", "empty tensor", "expected [1, 9, 4, 64] (2304 elements)", "found [1, 0, 4, 64] (0 elements)", "hint: the engine wrote no data"],
    );
}

#[test]
fn wrong_rank_5d() {
    let d = tmp();
    let mut dump = Dump::golden();
    let (_, x) = dump.floats("s0/kq_soft_max-0");
    dump.put_f32("s0/kq_soft_max-0", vec![1, 4, 9, 3, 3], &x);
    refused(
        &dump.write(d.path(), "rank5"),
        &["s0/kq_soft_max-0", "wrong rank (5-D)", "expected [1, 4, 9, 9]", "found [1, 4, 9, 3, 3]", "hint: shapes are ggml's ne reversed, always 4-D"],
    );
}

#[test]
fn scores_with_padded_kv_length() {
    let d = tmp();
    let mut dump = Dump::golden();
    let (_, x) = dump.floats("s1/kq-1");
    let mut padded = x.clone();
    padded.resize(4 * 16, f32::NEG_INFINITY);
    dump.put_f32("s1/kq-1", vec![1, 4, 1, 16], &padded);
    refused(
        &dump.write(d.path(), "padded"),
        &["s1/kq-1", "wrong element count (64 vs 40)", "expected [1, 4, 1, 10]", "found [1, 4, 1, 16]", "kv_len is 10 here"],
    );
}

#[test]
fn header_claiming_a_huge_shape() {
    let d = tmp();
    let p = Dump::golden().write(d.path(), "huge");
    let bytes = std::fs::read(&p).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    header["s0/embd"]["shape"] = serde_json::json!([1, 1, 4294967296u64, 4294967296u64]);
    let h = serde_json::to_vec(&header).unwrap();
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend(&h);
    out.extend(&bytes[8 + n..]);
    std::fs::write(&p, out).unwrap();
    refused(
        &p,
        &[
            "s0/embd",
            "the header claims a huge shape",
            "expected [1, 1, 9, 256]",
            "F32 [1, 1, 4294967296, 4294967296] = 18446744073709551616 elements",
            "hint: the header is corrupt",
        ],
    );
}

#[test]
fn truncated_file() {
    let d = tmp();
    let p = Dump::golden().write(d.path(), "truncated");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() - 1000]).unwrap();
    refused(&p, &["truncated file", "1000 missing", "hint: the writer did not finish"]);
    // Cut inside the header.
    std::fs::write(&p, &bytes[..100]).unwrap();
    refused(&p, &["truncated file: the header is", "only 92 bytes follow"]);
}

#[test]
fn not_a_safetensors_file() {
    let d = tmp();
    let gguf = golden::default_dir().join("models/tiny-qwen2.f32.gguf");
    let p = d.path().join("model.safetensors");
    std::fs::copy(&gguf, &p).unwrap();
    refused(&p, &["not a safetensors file: it looks like a GGUF model file", "hint: write the dump with the safetensors library"]);
    std::fs::write(&p, "step,tap,value\n0,embd,0.5\n").unwrap();
    refused(&p, &["not a safetensors file: it looks like a text file"]);
    std::fs::write(&p, b"PK\x03\x04\x14\x00\x00\x00\x08\x00rest of a torch.save zip").unwrap();
    refused(&p, &["not a safetensors file: it looks like a zip archive (torch.save writes one)"]);
    std::fs::write(&p, b"\x01\x02").unwrap();
    refused(&p, &["not a safetensors file: 2 bytes"]);
}

#[test]
fn hugging_face_names_only() {
    let d = tmp();
    let mut dump = Dump(BTreeMap::new());
    let names = [
        "model.embed_tokens",
        "model.layers.0.input_layernorm",
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.k_proj",
        "model.layers.0.mlp.down_proj",
        "model.layers.1.self_attn.o_proj",
        "model.norm",
        "lm_head",
    ];
    for n in names {
        dump.put_f32(n, vec![1, 9, 256], &vec![0.5; 9 * 256]);
    }
    dump.put("tokens", Dtype::I32, vec![9], vec![0; 36]);
    refused(
        &dump.write(d.path(), "hf"),
        &["0 of 8 keys recognised; keys look like Hugging Face module names: map them with the Python kit (python/lockstep_kit hf_names)"],
    );
}

#[test]
fn no_key_recognised_names_the_nearest() {
    let d = tmp();
    let mut dump = Dump::golden();
    dump.0.retain(|k, _| !k.contains('/'));
    dump.put_f32("Qcur-0.rope", vec![1, 9, 4, 64], &vec![0.5; 9 * 256]);
    refused(&dump.write(d.path(), "nostep"), &["0 of 1 keys recognised (e.g. Qcur-0.rope → s0/Qcur-0.rope?)", "hint: tap keys are `s{step}/"]);
}

#[test]
fn a_step_without_logits() {
    let d = tmp();
    let mut dump = Dump::golden();
    dump.0.remove("s1/result_output");
    refused(
        &dump.write(d.path(), "nologits"),
        &["step 1 has", "taps but no s1/result_output", "hint: dump the output head's result of every step", "[1, 1, 1, 1024]"],
    );
}

#[test]
fn tokens_as_floats() {
    let d = tmp();
    let mut dump = Dump::golden();
    dump.put_f32("tokens", vec![9], &[1.0; 9]);
    refused(&dump.write(d.path(), "ftokens"), &["tokens", "non-integer dtype", "expected I32 (or I64) [n]", "found F32 [9]", "int32"]);
}

// ---- accepted and judged ----------------------------------------------------------------------

#[test]
fn squeezed_shapes_are_reshaped() {
    let d = tmp();
    let mut dump = Dump::golden();
    for k in dump.tap_keys() {
        let e = dump.0.get_mut(&k).unwrap();
        e.shape = e.shape.iter().copied().skip_while(|&x| x == 1).collect(); // [1, 1, 9, 256] → [9, 256]
        if e.shape.is_empty() {
            e.shape = vec![1];
        }
    }
    let c = passes(&dump.write(d.path(), "squeezed"));
    assert!(notes(&c).contains("reshaped by adding or dropping size-1 axes"), "{}", notes(&c));
    assert_eq!(c.coverage.as_ref().unwrap().not_dumped, Vec::<String>::new());
}

#[test]
fn last_layer_with_all_rows_takes_the_last() {
    let d = tmp();
    let mut dump = Dump::golden();
    let mut n = 0;
    for k in dump.tap_keys().into_iter().filter(|k| k.starts_with("s0/")) {
        let (s, x) = dump.floats(&k);
        if s[..3] == [1, 1, 1] {
            // What an engine that does not drop the other rows computes: 8 more rows before the last.
            let mut all: Vec<f32> = (0..8 * s[3]).map(|i| (i % 7) as f32 * 0.25 - 0.5).collect();
            all.extend(&x);
            dump.put_f32(&k, vec![1, 1, 9, s[3]], &all);
            n += 1;
        }
    }
    assert_eq!(n, 11, "ffn_inp-1 … l_out-1, norm-1.rms_norm.1, norm, result_norm, result_output");
    let c = passes(&dump.write(d.path(), "allrows"));
    assert!(notes(&c).contains("11 prefill taps held all 9 token rows where llama.cpp keeps only the last"), "{}", notes(&c));
}

#[test]
fn extra_steps_are_ignored() {
    let d = tmp();
    let mut dump = Dump::golden();
    for k in dump.tap_keys().into_iter().filter(|k| k.starts_with("s4/")) {
        let e = dump.0[&k].clone();
        if !k.ends_with("/result_output") {
            dump.0.insert(k.replacen("s4/", "s5/", 1), e.clone()); // taps of step 5, beyond the golden's
        }
        dump.0.insert(k.replacen("s4/", "s40/", 1), e); // and of step 40, logits included
    }
    let c = passes(&dump.write(d.path(), "extra"));
    let k = c.coverage.as_ref().unwrap();
    assert_eq!(k.ignored_steps, vec![5, 40]);
    assert!(notes(&c).contains("steps 5, 40 ignored") && notes(&c).contains("the golden's taps stop at step 4"), "{}", notes(&c));
}

#[test]
fn nan_is_judged_not_refused() {
    let d = tmp();
    let mut dump = Dump::golden();
    let (s, mut x) = dump.floats("s0/ffn_out-1");
    x[3] = f32::NAN;
    dump.put_f32("s0/ffn_out-1", s, &x);
    let c = judge(&dump.write(d.path(), "nan")).expect("NaN is data, not a malformed dump");
    assert!(!c.passed);
    assert!(c.checks.iter().any(|k| k.name == "invariants:non_finite" && !k.passed && k.value == 1.0), "{:?}", c.checks);
    let first = c.first_divergence.as_ref().expect("a first divergence");
    assert_eq!((first.step, first.tap.as_str()), (0, "ffn_out-1"));
    let table = lockstep::report::table::render(&lockstep::report::Report::new(lockstep::report::Provenance::here(serde_json::Value::Null, None), vec![c]));
    assert!(!table.contains("NaN"), "{table}");
}

#[test]
fn wrong_token_count_fails_the_tokens_check() {
    let d = tmp();
    let mut dump = Dump::golden();
    dump.put("tokens", Dtype::I32, vec![8], vec![1; 32]);
    let c = judge(&dump.write(d.path(), "tokens8")).expect("a token mismatch is a verdict, not an error");
    assert!(!c.passed);
    let t = c.checks.iter().find(|k| k.name == "tokens").expect("a tokens check");
    assert!(!t.passed && t.detail.as_deref().unwrap_or("").contains("engine 8 ids"), "{t:?}");
}

#[test]
fn no_tokens_is_reported_not_checked() {
    let d = tmp();
    let mut dump = Dump::golden();
    dump.0.remove("tokens");
    let c = passes(&dump.write(d.path(), "notokens"));
    assert_eq!(c.coverage.as_ref().unwrap().not_checked, vec!["tokens".to_string()]);
    assert!(!c.checks.iter().any(|k| k.name == "tokens"), "a check that did not run is not reported as passed");
    let rep = lockstep::report::Report::new(lockstep::report::Provenance::here(serde_json::Value::Null, None), vec![c]);
    let table = lockstep::report::table::render(&rep);
    assert!(table.trim_end().ends_with("PASS (tokens not checked)"), "{table}");
    let html = lockstep::report::html::render(&rep).unwrap();
    assert!(html.contains("(tokens not checked)") && html.contains("not checked</span>"), "html lacks the not-checked tokens");
    let json = serde_json::to_value(&rep).unwrap();
    assert_eq!(json["cases"][0]["coverage"]["not_checked"], serde_json::json!(["tokens"]));
}

fn dtype_dump(dtype: Dtype) -> CaseReport {
    let d = tmp();
    let mut dump = Dump::golden();
    match dtype {
        Dtype::F16 => dump.encode_taps(dtype, |v| half::f16::from_f32(v).to_le_bytes().to_vec()),
        Dtype::BF16 => dump.encode_taps(dtype, |v| half::bf16::from_f32(v).to_le_bytes().to_vec()),
        Dtype::F64 => dump.encode_taps(dtype, |v| (v as f64).to_le_bytes().to_vec()),
        _ => unreachable!(),
    }
    passes(&dump.write(d.path(), &format!("{dtype:?}")))
}

#[test]
fn f16_dump_is_accepted_and_passes() {
    let c = dtype_dump(Dtype::F16);
    assert!(notes(&c).contains("stored F16") && notes(&c).contains("4.9e-4"), "{}", notes(&c));
}

#[test]
fn bf16_dump_is_accepted_and_passes() {
    let c = dtype_dump(Dtype::BF16);
    assert!(notes(&c).contains("stored BF16") && notes(&c).contains("3.9e-3"), "{}", notes(&c));
}

#[test]
fn f64_dump_is_accepted_and_passes() {
    let c = dtype_dump(Dtype::F64);
    assert!(notes(&c).contains("stored F64"), "{}", notes(&c));
}

#[test]
fn unknown_keys_get_the_nearest_name() {
    let d = tmp();
    let mut dump = Dump::golden();
    let e = dump.0["s0/Qcur-0.mul_mat"].clone();
    dump.0.insert("s0/Qcur-0".into(), e.clone());
    dump.0.insert("s0/kqv_out_0".into(), e.clone());
    dump.0.insert("s0/attn_out-0".into(), e);
    let c = passes(&dump.write(d.path(), "unknown"));
    let u: Vec<String> = c.coverage.as_ref().unwrap().unknown.iter().map(|u| u.to_string()).collect();
    assert!(u.contains(&"s0/Qcur-0 → s0/Qcur-0.mul_mat?".to_string()), "{u:?}");
    assert!(u.contains(&"s0/kqv_out_0 → s0/kqv_out-0?".to_string()), "{u:?}");
    assert_eq!(u.len(), 3, "{u:?}");
}

#[test]
fn partial_dump_passes_on_what_it_has() {
    let d = tmp();
    let mut dump = Dump::golden();
    // Layer 0's taps, the logits and the ids: an engine with fused kernels that exposes little.
    dump.0.retain(|k, _| !k.contains('/') || k.ends_with("-0") || k.contains("-0.") || k.ends_with("/result_output"));
    let kept = dump.tap_keys().len();
    let c = passes(&dump.write(d.path(), "partial"));
    let k = c.coverage.as_ref().unwrap();
    assert_eq!(k.compared, kept);
    assert_eq!(k.compared + k.not_dumped.len(), k.golden_taps);
    assert!(k.not_dumped.contains(&"s0/embd".to_string()) && k.not_dumped.contains(&"s3/l_out-1".to_string()));
    assert!(k.summary().starts_with(&format!("compared {kept} of {} golden taps", k.golden_taps)), "{}", k.summary());
    assert!(c.first_divergence.is_none(), "{:?}", c.first_divergence);
}

#[test]
fn fewer_steps_than_the_golden() {
    let d = tmp();
    let mut dump = Dump::golden();
    dump.0.retain(|k, _| !(k.starts_with("s3/") || k.starts_with("s4/")));
    let c = passes(&dump.write(d.path(), "fewer"));
    let k = c.coverage.as_ref().unwrap();
    assert_eq!(k.logit_steps, 3);
    assert!(k.not_dumped.iter().all(|t| t.starts_with("s3/") || t.starts_with("s4/")) && !k.not_dumped.is_empty());
}
