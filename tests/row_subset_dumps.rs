//! Whole-tap dumps against a golden of row-subset taps (golden/README.md, "Row-subset taps"), judged with
//! `lockstep compare`'s `compare_dump`: the long-context golden smollm2-135m/exact/long keeps `embd` and
//! `l_out` of four layers at 17 prefill positions and `kq-0` / `kq_soft_max-0` at positions 79, 80, 511
//! and 512 (1,134 prompt tokens, 9 query heads). An engine that dumps those taps whole must be judged on
//! the kept rows, with the cut said in the coverage; a tap with a number of rows that is neither the
//! whole tap's nor the golden's must be refused naming the tap and both shapes.
//!
//! The "engine" is the golden itself: each row-subset tap is spread back to its whole shape with the
//! kept rows at their positions and NaN in every other row (so a cut that takes a wrong row fails the
//! case), and the logits of each step are rebuilt from the golden's top 64 and log-sum-exp (the rest of
//! the vocabulary shares the remaining probability), so that the dump is llama.cpp's own run.

use lockstep::compare::compare_dump;
use lockstep::golden::{self, Manifest, TapsFile, Tensor};
use lockstep::report::CaseReport;
use std::path::{Path, PathBuf};

const ENTRY: &str = "smollm2-135m/exact/long";
/// smollm2-135m's vocabulary (its GGUF's token list); the golden keeps only the top 64 logits.
const VOCAB: usize = 49_152;

fn golden() -> TapsFile {
    TapsFile::open(&golden::default_dir().join("taps/smollm2-135m/exact/long.safetensors")).unwrap()
}

/// One dump: f32 tensors and i32 ids.
#[derive(Default)]
struct Dump {
    f32s: Vec<(String, Vec<usize>, Vec<f32>)>,
    i32s: Vec<(String, Vec<usize>, Vec<i32>)>,
}

impl Dump {
    fn set(&mut self, key: &str, t: Tensor) {
        self.f32s.retain(|(k, _, _)| k != key);
        self.f32s.push((key.into(), t.shape, t.data));
    }
    fn get(&self, key: &str) -> Tensor {
        let (_, shape, data) = self.f32s.iter().find(|(k, _, _)| k == key).unwrap();
        Tensor { shape: shape.clone(), data: data.clone() }
    }
    fn write(&self, dir: &Path, name: &str) -> PathBuf {
        let p = dir.join(format!("{name}.safetensors"));
        golden::write_safetensors(&p, &self.f32s, &self.i32s).unwrap();
        p
    }
}

/// `t` [.., R, ..] (R kept rows along `axis`) spread to `rows` rows along `axis`, the kept rows at
/// `positions`, NaN elsewhere.
fn spread(t: &Tensor, axis: usize, positions: &[usize], rows: usize) -> Tensor {
    let outer: usize = t.shape[..axis].iter().product();
    let inner: usize = t.shape[axis + 1..].iter().product();
    let r = t.shape[axis];
    let mut data = vec![f32::NAN; outer * rows * inner];
    for o in 0..outer {
        for (i, &p) in positions.iter().enumerate() {
            let src = (o * r + i) * inner;
            let dst = (o * rows + p) * inner;
            data[dst..dst + inner].copy_from_slice(&t.data[src..src + inner]);
        }
    }
    let mut shape = t.shape.clone();
    shape[axis] = rows;
    Tensor { shape, data }
}

/// The token axis of the long golden's row-subset taps (`embd`, `l_out`, `kq`, `kq_soft_max`: no RoPE
/// output among them): 2 of [1, 1, T, W] and [1, heads, T, kv].
const TOKEN_AXIS: usize = 2;

/// Full logits of step k from the golden's top 64 (`topk_ids`, `topk_values`) and `lse`: the other ids
/// share the probability the top 64 leave, equally (below the 64th value: the order is kept).
fn logits(g: &TapsFile, k: usize) -> Vec<f32> {
    let ids = g.ints("topk_ids").unwrap();
    let vals = g.f32("topk_values").unwrap().data;
    let lse = g.f32("lse").unwrap().data[k] as f64;
    let (ids, vals) = (&ids[k * 64..(k + 1) * 64], &vals[k * 64..(k + 1) * 64]);
    let top: f64 = vals.iter().map(|&v| (v as f64 - lse).exp()).sum();
    let rest = lse + ((1.0 - top).max(1e-30) / (VOCAB - 64) as f64).ln();
    assert!(rest < vals[63] as f64, "step {k}: tail logit {rest} above the 64th {}", vals[63]);
    let mut out = vec![rest as f32; VOCAB];
    for (&id, &v) in ids.iter().zip(vals) {
        out[id as usize] = v;
    }
    out
}

/// The golden as an engine's dump: every row-subset tap whole (NaN outside the kept rows) except those
/// in `as_kept` (dumped as the kept rows, as the golden holds them), every other tap as the golden holds
/// it, full logits at every step, the prompt's tokens.
fn whole_dump(g: &TapsFile, as_kept: &[&str]) -> Dump {
    let prompt = g.ints("tokens").unwrap();
    let mut d = Dump::default();
    let steps = g.taps().iter().map(|t| t.step).max().unwrap() + 1;
    for id in g.taps() {
        let key = id.key();
        let t = g.f32(&key).unwrap();
        let t = match lockstep::rows::positions(g, &key).unwrap() {
            Some(p) if !as_kept.contains(&key.as_str()) => spread(&t, TOKEN_AXIS, &p, prompt.len()),
            _ => t,
        };
        d.set(&key, t);
    }
    for k in 0..steps {
        d.set(&format!("s{k}/result_output"), Tensor { shape: vec![1, 1, 1, VOCAB], data: logits(g, k) });
    }
    d.i32s.push(("tokens".into(), vec![prompt.len()], prompt.iter().map(|&v| v as i32).collect()));
    d
}

fn judge(path: &Path) -> Result<CaseReport, String> {
    let manifest = Manifest::load(&golden::default_dir()).unwrap();
    compare_dump(&manifest, path, ENTRY, None).map_err(|e| e.to_string())
}

#[test]
fn whole_taps_are_cut_to_the_golden_rows_and_judged_clean() {
    let g = golden();
    let dir = tempfile::tempdir().unwrap();
    // s0/embd as the kept rows (an engine may mix both), the other row-subset taps whole.
    let dump = whole_dump(&g, &["s0/embd"]);
    assert_eq!(dump.get("s0/kq_soft_max-0").shape, vec![1, 9, 1134, 1134]);
    let c = judge(&dump.write(dir.path(), "whole")).unwrap_or_else(|e| panic!("refused: {e}"));
    let failed: Vec<String> = c.failed_checks().map(|k| format!("{} {}={} (limit {}) {:?}", k.name, k.metric, k.value, k.limit, k.detail)).collect();
    assert!(c.passed, "failed: {failed:#?}\nfirst divergence {:?}", c.first_divergence);
    let cov = c.coverage.as_ref().unwrap();
    assert_eq!((cov.compared, cov.golden_taps), (cov.golden_taps, 42), "{cov:?}");
    let notes = cov.notes.join("\n");
    // l_out-0, -1, -15, -28 whole (embd was dumped as its kept rows); kq-0, kq_soft_max-0 whole.
    assert!(notes.contains("4 row-subset taps dumped whole (e.g. s0/l_out-0 [1, 1, 1134, 576])"), "{notes}");
    assert!(notes.contains("rows kept: 0, 1, 63, 64, 79, … (11 more), 1133 (17 of 1134"), "{notes}");
    assert!(notes.contains("2 row-subset taps dumped whole (e.g. s0/kq-0 [1, 9, 1134, 1134])"), "{notes}");
    assert!(notes.contains("rows kept: 79, 80, 511, 512 (4 of 1134"), "{notes}");
}

#[test]
fn size_one_axes_may_be_dropped_from_a_whole_tap() {
    let g = golden();
    let dir = tempfile::tempdir().unwrap();
    let mut dump = whole_dump(&g, &[]);
    let t = dump.get("s0/l_out-1");
    dump.set("s0/l_out-1", Tensor { shape: vec![1134, 576], data: t.data });
    let c = judge(&dump.write(dir.path(), "squeezed")).unwrap_or_else(|e| panic!("refused: {e}"));
    assert!(c.passed, "first divergence {:?}", c.first_divergence);
    let notes = c.coverage.as_ref().unwrap().notes.join("\n");
    assert!(notes.contains("5 row-subset taps dumped whole"), "{notes}");
}

#[test]
fn an_error_in_a_kept_row_of_a_whole_tap_is_found_at_its_position() {
    let g = golden();
    let dir = tempfile::tempdir().unwrap();
    let mut dump = whole_dump(&g, &[]);
    // Position 80 of head 0 in kq_soft_max-0 moved off by 5 % (the row still sums to 1.05: a real slip).
    let mut t = dump.get("s0/kq_soft_max-0");
    let (rows, kv) = (1134, 1134);
    for v in &mut t.data[80 * kv..81 * kv] {
        *v *= 1.05;
    }
    assert_eq!(t.data.len(), 9 * rows * kv);
    dump.set("s0/kq_soft_max-0", t);
    let c = judge(&dump.write(dir.path(), "slip")).unwrap_or_else(|e| panic!("refused: {e}"));
    assert!(!c.passed);
    let fd = c.first_divergence.as_ref().expect("a first divergence");
    assert_eq!((fd.step, fd.layer, fd.tap.as_str()), (0, Some(0), "kq_soft_max-0"), "{fd:?}");
}

#[test]
fn a_row_count_that_is_neither_whole_nor_the_kept_rows_is_refused() {
    let g = golden();
    let dir = tempfile::tempdir().unwrap();
    let mut dump = whole_dump(&g, &[]);
    // 1,000 rows: a prompt cut short (neither the 17 kept rows nor the whole 1,134).
    let t = dump.get("s0/l_out-0");
    dump.set("s0/l_out-0", Tensor { shape: vec![1, 1, 1000, 576], data: t.data[..1000 * 576].to_vec() });
    let p = dump.write(dir.path(), "short");
    let e = judge(&p).map(|c| c.passed).expect_err("a wrong row count was accepted");
    for needle in [
        p.display().to_string().as_str(),
        "s0/l_out-0",
        "wrong number of rows (1000)",
        "neither the golden's 17 rows at positions 0, 1, 63, 64, 79, … (11 more), 1133 nor the whole tap's 1134",
        "[1, 1, 17, 576]",
        "[1, 1, 1134, 576] (the whole tap)",
        "found [1, 1, 1000, 576]",
        "Row-subset taps",
    ] {
        assert!(e.contains(needle), "missing {needle:?} in: {e}");
    }
    // Another width: a layout problem, still naming both accepted shapes.
    let mut dump = whole_dump(&g, &[]);
    dump.set("s0/kq-0", Tensor { shape: vec![1, 9, 1134, 1000], data: vec![0.0; 9 * 1134 * 1000] });
    let e = judge(&dump.write(dir.path(), "width")).map(|c| c.passed).expect_err("a wrong kv_len was accepted");
    for needle in ["s0/kq-0", "[1, 9, 4, 1134]", "[1, 9, 1134, 1134] (the whole tap)", "found [1, 9, 1134, 1000]", "kv_len"] {
        assert!(e.contains(needle), "missing {needle:?} in: {e}");
    }
}
