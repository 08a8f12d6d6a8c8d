//! Check `dequant`: each backend's own dequantization against gguf-py's `gguf.quants.dequantize`, for
//! every weight type in the model.
//!
//! The golden (ci/golden/dequant.py, listed in the manifest with kind `dequant`):
//! - `dequant/{model}.safetensors`: for each ggml type of the model, a few whole blocks of real tensors
//!   (the first and the middle tensor of that type, at element 0 and at its middle block):
//!   `{tensor}@{first_element}` f32 `[n]` (gguf-py's values), `{tensor}@{first_element}.raw` u8 (the
//!   stored bytes), and the metadata `samples` (JSON: tensor, type, first_element, n_elements);
//! - `dequant/{model}.json`: every tensor's type and ne.
//!
//! Before comparing, the golden is tied to the model file: every tensor's type and ne must match the
//! `.json`, and every sample's stored bytes must be the model's bytes at that place (so a golden made from
//! another file is an error, never a verdict). Then the backend dequantizes the rows holding each sample
//! ([`Backend::dequantize_rows`]: the CPU's block functions, the CUDA kernels' `dq16`), and every element
//! is held to gguf-py's. One result per type, `dequant:{TYPE}`: the metric is, over the sampled blocks,
//! max |backend − gguf-py| ÷ max |gguf-py| of the block (NaN fails); the limit `dequant.block_rel` comes
//! from the suite (0: bit-equal values, as measured). A failure names the type, the tensor, the block and
//! its first differing element.

use super::{CheckResult, Op, Tolerances};
use crate::golden::{Manifest, ManifestFile};
use anyhow::{anyhow, bail, ensure, Context, Result};
use lockstep_engine::backend::Backend;
use lockstep_engine::gguf::{GgmlType, GgufFile};
use safetensors::SafeTensors;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// How the golden's files are regenerated (said in errors).
const REGENERATE: &str = "ci/regenerate-golden (ci/golden/dequant.py)";

/// One sample: `n` consecutive elements of a tensor, from element `first` (a block boundary).
#[derive(Debug, Clone)]
pub struct Sample {
    /// `{tensor}@{first}`
    pub key: String,
    pub tensor: String,
    pub ty: GgmlType,
    pub first: usize,
    /// gguf-py's values `[n]`
    pub want: Vec<f32>,
}

/// A model's dequantization golden, checked against the model file.
#[derive(Debug, Clone)]
pub struct DequantGolden {
    /// The samples file.
    pub path: PathBuf,
    pub samples: Vec<Sample>,
    /// Every type of the model's tensors (by name), with the tensors of that type.
    pub types: BTreeMap<String, Vec<String>>,
}

/// The manifest record of kind `dequant` for `model` whose path ends in `ext`.
fn record<'m>(manifest: &'m Manifest, model: &str, ext: &str) -> Option<&'m ManifestFile> {
    manifest.files.iter().find(|f| f.kind.as_deref() == Some("dequant") && f.model.as_deref() == Some(model) && f.path.ends_with(ext))
}

/// Reads a file of the manifest, verifying its sha256.
fn read_verified(manifest: &Manifest, f: &ManifestFile) -> Result<Vec<u8>> {
    let path = manifest.dir.join(&f.path);
    let bytes = std::fs::read(&path).with_context(|| format!("{}: cannot read the dequantization golden (run {REGENERATE})", path.display()))?;
    let actual = hex::encode(Sha256::digest(&bytes));
    ensure!(actual.eq_ignore_ascii_case(&f.sha256), "{}: sha256 {actual} differs from the manifest's {} (run {REGENERATE})", path.display(), f.sha256);
    Ok(bytes)
}

/// Loads the dequantization golden of `model` (a model id) from `manifest`, or from the default golden
/// directory's manifest when `manifest` (an on-demand entry's) holds none, and ties it to `file`.
pub fn load(manifest: &Manifest, model: &str, file: &GgufFile) -> Result<DequantGolden> {
    let fallback;
    let manifest = if record(manifest, model, ".safetensors").is_some() {
        manifest
    } else {
        fallback = Manifest::load(&crate::golden::default_dir()).ok();
        match &fallback {
            Some(m) if record(m, model, ".safetensors").is_some() => m,
            _ => bail!(
                "no dequantization golden for model {model:?} in {} (a `dequant` record for {model}): {REGENERATE} writes golden/dequant/{{model}}.safetensors for the registry and tiny models; for another model, leave `dequant` out of the case's checks",
                manifest.path.display()
            ),
        }
    };
    let st_rec = record(manifest, model, ".safetensors").expect("checked above");
    let js_rec = record(manifest, model, ".json")
        .ok_or_else(|| anyhow!("{}: lists dequant/{model}.safetensors but not its dequant/{model}.json (run {REGENERATE})", manifest.path.display()))?;
    let path = manifest.dir.join(&st_rec.path);
    let js_path = manifest.dir.join(&js_rec.path);
    let fname = file.display_name();

    // Every tensor of the model with its type and ne, as the golden's .json lists them.
    let js: BTreeMap<String, serde_json::Value> =
        serde_json::from_slice(&read_verified(manifest, js_rec)?).with_context(|| format!("{}: not a JSON object of tensors", js_path.display()))?;
    let mut types: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for t in &file.tensors {
        let rec = js.get(&t.name).ok_or_else(|| {
            anyhow!("{}: has no tensor {} of {fname}: the golden was made from another model file (run {REGENERATE})", js_path.display(), t.name)
        })?;
        let ne: Vec<u64> = rec["ne"].as_array().map(|a| a.iter().filter_map(|v| v.as_u64()).collect()).unwrap_or_default();
        let ty = rec["type"].as_str().unwrap_or("?");
        if ty != t.ty.name() || ne != t.ne {
            bail!(
                "{}: {} is {ty} {ne:?} there, {} {:?} in {fname}: the golden was made from another model file (run {REGENERATE})",
                js_path.display(),
                t.name,
                t.ty.name(),
                t.ne
            );
        }
        types.entry(t.ty.name().to_string()).or_default().push(t.name.clone());
    }

    let bytes = read_verified(manifest, st_rec)?;
    let st = SafeTensors::deserialize(&bytes).with_context(|| format!("{}: not a safetensors file", path.display()))?;
    let (_, meta) = SafeTensors::read_metadata(&bytes).with_context(|| format!("{}: safetensors header", path.display()))?;
    let listed =
        meta.metadata().as_ref().and_then(|m| m.get("samples")).ok_or_else(|| anyhow!("{}: no `samples` metadata (run {REGENERATE})", path.display()))?;
    let listed: BTreeMap<String, serde_json::Value> =
        serde_json::from_str(listed).with_context(|| format!("{}: `samples` metadata is not a JSON object", path.display()))?;
    let mut samples = Vec::new();
    for (key, s) in &listed {
        let bad = |what: String| anyhow!("{}: sample {key}: {what} (run {REGENERATE})", path.display());
        let tensor = s["tensor"].as_str().ok_or_else(|| bad("no `tensor`".into()))?.to_string();
        let ty_name = s["type"].as_str().ok_or_else(|| bad("no `type`".into()))?;
        let ty = GgmlType::from_name(ty_name).ok_or_else(|| bad(format!("unknown type {ty_name}")))?;
        let first = s["first_element"].as_u64().ok_or_else(|| bad("no `first_element`".into()))? as usize;
        let vals = st.tensor(key).map_err(|e| bad(format!("values: {e}")))?;
        let raw = st.tensor(&format!("{key}.raw")).map_err(|e| bad(format!("raw bytes: {e}")))?;
        ensure!(vals.dtype() == safetensors::Dtype::F32, bad(format!("values are {:?}, not F32", vals.dtype())));
        let want: Vec<f32> = vals.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        // The sample must be this model's bytes at that place.
        let t = file.tensor(&tensor).ok_or_else(|| bad(format!("{fname} has no tensor {tensor}")))?;
        ensure!(t.ty == ty, bad(format!("type {ty}, the model's {tensor} is {}", t.ty)));
        let (bs, ts) = (ty.block_size(), ty.type_size());
        ensure!(
            first.is_multiple_of(bs) && want.len().is_multiple_of(bs) && !want.is_empty(),
            bad(format!("{} elements from {first} are not whole {bs}-element blocks", want.len()))
        );
        let at = first / bs * ts;
        let stored = file.tensor_data(t).get(at..at + want.len() / bs * ts);
        ensure!(
            stored == Some(raw.data()),
            bad(format!("its stored bytes differ from {fname}'s {tensor} at byte {at}: the golden was made from another model file"))
        );
        samples.push(Sample { key: key.clone(), tensor, ty, first, want });
    }
    Ok(DequantGolden { path, samples, types })
}

/// Where one block first differs.
struct BlockDiff {
    /// block index within the tensor
    block: usize,
    /// element index within the tensor, its value and gguf-py's, and how many of the block's differ
    element: usize,
    got: f32,
    want: f32,
    n_diff: usize,
}

/// Per type: the worst block metric, samples and blocks compared, blocks over the limit, the first one.
#[derive(Default)]
struct TypeResult {
    worst: f64,
    tensors: Vec<String>,
    blocks: usize,
    bad_blocks: usize,
    first_bad: Option<(String, usize, BlockDiff)>,
}

/// max |want| over one block.
fn block_scale(want: &[f32]) -> f64 {
    want.iter().fold(0f64, |m, &w| m.max((w as f64).abs()))
}

/// |got − want| ÷ `scale` for one element: 0 when equal (±0 alike, NaN with NaN), ∞ when a zero block
/// differs, NaN when one of the two is NaN.
fn element_metric(got: f32, want: f32, scale: f64) -> f64 {
    if got == want || (got.is_nan() && want.is_nan()) {
        return 0.0;
    }
    let d = (got as f64 - want as f64).abs();
    if d.is_nan() {
        f64::NAN
    } else if scale > 0.0 {
        d / scale
    } else {
        f64::INFINITY
    }
}

/// max |got − want| ÷ max |want| over one block (NaN stays worst).
fn block_metric(got: &[f32], want: &[f32]) -> f64 {
    let scale = block_scale(want);
    got.iter().zip(want).map(|(&g, &w)| element_metric(g, w, scale)).fold(0.0, |m, e| if super::invariants::worse(e, m) { e } else { m })
}

/// Runs the check: one result per type of the model's tensors.
pub fn check(backend: &dyn Backend, file: &GgufFile, golden: &DequantGolden, tol: &Tolerances) -> Result<Vec<CheckResult>> {
    let lim = tol.get("dequant.block_rel");
    let mut per_type: BTreeMap<String, TypeResult> = BTreeMap::new();
    for s in &golden.samples {
        let t = file.tensor(&s.tensor).expect("load checked every sample's tensor");
        let ne0 = t.row_len() as usize;
        let n = s.want.len();
        let rows = s.first / ne0..(s.first + n).div_ceil(ne0);
        let got_rows = backend
            .dequantize_rows(file, &s.tensor, rows.clone())
            .with_context(|| format!("{} backend: dequantizing rows {rows:?} of {} ({})", backend.name(), s.tensor, s.ty))?;
        ensure!(got_rows.len() == rows.len() * ne0, "{} backend: {} values for rows {rows:?} of {} (ne0 {ne0})", backend.name(), got_rows.len(), s.tensor);
        let off = s.first - rows.start * ne0;
        let got = &got_rows[off..off + n];
        let r = per_type.entry(s.ty.name().to_string()).or_default();
        if !r.tensors.contains(&s.tensor) {
            r.tensors.push(s.tensor.clone());
        }
        let bs = s.ty.block_size();
        for (b, (gb, wb)) in got.chunks(bs).zip(s.want.chunks(bs)).enumerate() {
            let m = block_metric(gb, wb);
            r.blocks += 1;
            if super::invariants::worse(m, r.worst) {
                r.worst = m;
            }
            if !(m <= lim.value) {
                r.bad_blocks += 1;
                if r.first_bad.is_none() {
                    let scale = block_scale(wb);
                    let over = |(&g, &w): (&f32, &f32)| !(element_metric(g, w, scale) <= lim.value);
                    let j = gb.iter().zip(wb).position(over).unwrap_or(0);
                    let n_diff = gb.iter().zip(wb).filter(|&p| over(p)).count();
                    let block = s.first / bs + b;
                    r.first_bad = Some((s.tensor.clone(), ne0, BlockDiff { block, element: block * bs + j, got: gb[j], want: wb[j], n_diff }));
                }
            }
        }
    }
    let mut out = Vec::new();
    for (ty, tensors) in &golden.types {
        let metric = "max |backend − gguf-py| / max |gguf-py| of a block";
        let Some(r) = per_type.get(ty) else {
            // A type of the model with no sample cannot be judged: never reported as passed.
            out.push(
                CheckResult::new(format!("dequant:{ty}"), metric, f64::NAN, Op::Le, lim.value)
                    .with_detail(format!(
                        "{}: no sample of {ty} (the model's {} tensors of that type, e.g. {}); run {REGENERATE}",
                        golden.path.display(),
                        tensors.len(),
                        tensors[0]
                    ))
                    .with_reason(Some(lim.reason.clone())),
            );
            continue;
        };
        let detail = match &r.first_bad {
            None => {
                let what = if GgmlType::from_name(ty).is_some_and(|t| t.block_size() == 1) { "values" } else { "blocks" };
                format!("{} {what} of {} equal gguf-py's", r.blocks, r.tensors.join(", "))
            }
            Some((tensor, ne0, d)) => {
                let bs = GgmlType::from_name(ty).map_or(1, |t| t.block_size());
                format!(
                    "dequantization of {ty} differs: tensor {tensor}, block {} (elements {}..{}): element {} (row {}, column {}) = {:e}, gguf-py {:e}; {} of the block's {bs} values differ; {} of {} sampled {ty} blocks differ",
                    d.block,
                    d.block * bs,
                    (d.block + 1) * bs,
                    d.element,
                    d.element / ne0,
                    d.element % ne0,
                    d.got,
                    d.want,
                    d.n_diff,
                    r.bad_blocks,
                    r.blocks
                )
            }
        };
        out.push(CheckResult::new(format!("dequant:{ty}"), metric, r.worst, Op::Le, lim.value).with_detail(detail).with_reason(Some(lim.reason.clone())));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use lockstep_engine::cpu::CpuBackend;
    use lockstep_engine::faults::Fault;

    #[test]
    fn block_metric_is_relative_to_the_block_and_nan_fails() {
        assert_eq!(block_metric(&[1.0, -0.0], &[1.0, 0.0]), 0.0);
        assert_eq!(block_metric(&[1.0, 2.5], &[1.0, 2.0]), 0.25);
        assert_eq!(block_metric(&[1e-3], &[0.0]), f64::INFINITY);
        assert!(block_metric(&[f32::NAN, 1.0], &[1.0, 1.0]).is_nan());
        assert!(block_metric(&[1.0, f32::NAN], &[1.0, 1.0]).is_nan(), "NaN stays worst after a finite error");
        assert!(!CheckResult::new("d", "m", block_metric(&[f32::NAN], &[1.0]), Op::Le, 0.0).passed);
    }

    fn manifest() -> Manifest {
        Manifest::load(&crate::golden::default_dir()).expect("golden/manifest.json")
    }

    fn tiny(name: &str) -> GgufFile {
        GgufFile::open(&crate::golden::default_dir().join(format!("models/{name}.q.gguf"))).expect("tiny model")
    }

    fn exact() -> Tolerances {
        let mut t = Tolerances::new(crate::vocab::Tier::Exact);
        t.set("dequant.block_rel", 0.0, "bit-exact");
        t
    }

    /// The clean CPU backend equals gguf-py on every sampled block of both tiny models, every type.
    #[test]
    fn clean_cpu_equals_gguf_py() {
        for (model, types) in [("tiny-qwen2", vec!["F32", "Q4_K", "Q5_0", "Q6_K", "Q8_0"]), ("tiny-llama", vec!["F32", "Q4_0", "Q4_1"])] {
            let file = tiny(model);
            let g = load(&manifest(), model, &file).unwrap();
            let b = CpuBackend::load(&file, Default::default()).unwrap();
            let r = check(&b, &file, &g, &exact()).unwrap();
            let names: Vec<&str> = r.iter().map(|c| c.name.strip_prefix("dequant:").unwrap()).collect();
            assert_eq!(names, types, "{model}: one result per type of the model");
            for c in &r {
                assert!(c.passed && c.value == 0.0, "{model} {}: {:?}", c.name, c.detail);
            }
        }
    }

    /// A Q4_K dequantization slip (the q4k-min-sign fault: + dmin·m instead of − dmin·m) is named with
    /// its type, tensor, block and first element; the other types still pass; and the case's class is
    /// `dequantization`, outranking the taps' guess at the first Q4_K product.
    #[test]
    fn a_q4k_slip_is_named_and_classed() {
        let file = tiny("tiny-qwen2");
        let g = load(&manifest(), "tiny-qwen2", &file).unwrap();
        let b = CpuBackend::load_with_fault(&file, Default::default(), Some(Fault::Q4kMinSign)).unwrap();
        let r = check(&b, &file, &g, &exact()).unwrap();
        let failed: Vec<&CheckResult> = r.iter().filter(|c| !c.passed).collect();
        assert_eq!(failed.len(), 1, "{r:#?}");
        let c = failed[0];
        assert_eq!(c.name, "dequant:Q4_K");
        assert!(c.value > 1e-2, "{}", c.value);
        let d = c.detail.as_deref().unwrap();
        assert!(d.starts_with("dequantization of Q4_K differs: tensor blk.0.attn_k.weight, block 0 (elements 0..256): element "), "{d}");
        assert!(d.contains(", gguf-py ") && d.contains(" sampled Q4_K blocks differ"), "{d}");

        let suite = crate::suite::Suite::load(&crate::suite::default_dir().join("tiny-qwen2.toml")).unwrap();
        let case = suite.cases.iter().find(|c| c.name == "exact-haiku").unwrap();
        let mut runner = crate::validate::Runner::default();
        runner.fault = Some(Fault::Q4kMinSign);
        let rep = runner.run(&manifest(), &suite, case, crate::vocab::Backend::Cpu);
        assert!(rep.error.is_none() && !rep.passed, "{:?}", rep.error);
        assert_eq!(rep.likely_class_id, Some(crate::localize::BugClass::Dequantization), "{:?}", rep.evidence);
        assert_eq!(rep.likely_class.as_deref(), Some("dequantization of Q4_K"));
        let ev = rep.evidence.as_deref().unwrap();
        assert!(ev.starts_with("dequant:Q4_K fails: dequantization of Q4_K differs: tensor blk.0.attn_k.weight, block 0"), "{ev}");
        // the taps still say where it first shows
        assert_eq!(rep.first_divergence.as_ref().map(|d| d.tap.as_str()), Some("Qcur-0.mul_mat"));
    }

    /// A golden made from another model file is an error naming it, never a verdict.
    #[test]
    fn a_golden_of_another_model_is_an_error() {
        let e = load(&manifest(), "tiny-qwen2", &tiny("tiny-llama")).unwrap_err().to_string();
        assert!(e.contains("dequant/tiny-qwen2.json") && e.contains("another model file"), "{e}");
        let e = load(&manifest(), "no-such-model", &tiny("tiny-llama")).unwrap_err().to_string();
        assert!(e.contains("no dequantization golden for model \"no-such-model\""), "{e}");
    }
}
