//! Judging an engine's taps against a golden with the checks that need no engine (2, 3, 4, 7, and 1
//! when the dump carries `tokens`): `lockstep compare --dump FILE --golden ENTRY`, and the tap half of
//! every suite case.

use crate::checks::{self, diversity, invariants::Pairing, logits, taps::TapComparison, TapSource, Tolerances};
use crate::dump_check::{self, NormalizedDump};
use crate::error::Result;
use crate::golden::{Manifest, ManifestFile, TapsFile};
use crate::localize;
use crate::report::{CaseReport, Heatmap};
use crate::vocab::Tier;

/// Everything the engine produced for one golden: its taps, logits per continuation step (teacher-forced
/// on the golden's tokens), its prompt ids and its greedy continuation.
pub struct EngineRun<'a> {
    pub taps: &'a dyn TapSource,
    /// `logits[k]`: the engine's logits at continuation step k.
    pub logits: Vec<Vec<f32>>,
    pub tokens: Option<Vec<u32>>,
    /// The engine's own greedy continuation (for the diversity gate), if it generated one.
    pub continuation: Option<Vec<u32>>,
}

/// Options of a comparison.
pub struct Options<'a> {
    pub tol: &'a Tolerances,
    pub pairing: Option<Pairing>,
    /// Diversity limits (from the golden continuations of the model and tier); None skips the gate.
    pub diversity: Option<diversity::Limits>,
    /// Compare taps of steps ≤ this only.
    pub max_step: Option<usize>,
    /// Every golden tap must be produced (our own backends); an outside engine's dump may be partial.
    pub require_all_taps: bool,
}

/// The manifest record without its (long) tensor list, for reports.
pub fn entry_for_report(f: &ManifestFile) -> serde_json::Value {
    let mut v = serde_json::to_value(f).unwrap_or_default();
    if let Some(o) = v.as_object_mut() {
        o.remove("tensors");
    }
    v
}

/// Runs checks 1 (if tokens), 2, 3, 4 and 7 (if limits) and localizes; fills `case`.
pub fn judge(golden: &TapsFile, run: &EngineRun, opt: &Options, case: &mut CaseReport) -> Result<Vec<TapComparison>> {
    let tokens_ok = match (&run.tokens, golden.token_ids("tokens")?) {
        (Some(e), Some(g)) => {
            let r = checks::tokens::check(e, &g);
            let ok = r.passed;
            case.checks.push(r);
            Some(ok)
        }
        _ => None,
    };
    let cmps = checks::taps::compare_all(golden, run.taps, opt.tol, opt.max_step)?;
    case.checks.extend(checks::taps::summarize(&cmps, opt.tol, opt.require_all_taps));

    let gl = logits::load_golden(golden)?;
    let cont: Vec<u32> = golden.token_ids("continuation")?.unwrap_or_default();
    if !run.logits.is_empty() && !gl.is_empty() {
        let tol = logits_storage_tolerance(run, opt.tol);
        case.checks.extend(logits::check(&run.logits, &gl, &cont, &tol));
    }
    // The prompt's length places decode steps' positions (invariants, class proofs).
    let n_prompt = golden.token_ids("tokens")?.map(|t| t.len());
    // llama.cpp's graph (the golden's taps) says which tap RoPE rotates; invariants that cannot run on
    // this dump are listed as not checked, with the reason.
    let graph = golden.taps();
    let inv = checks::invariants::check(run.taps, opt.tol, &checks::invariants::ModelFacts { pairing: opt.pairing, n_prompt, graph: Some(&graph) })?;
    case.checks.extend(inv.results);
    for nr in inv.not_run {
        let cov = case.coverage.get_or_insert_with(Default::default);
        let note = format!("not run: {}", nr.reason);
        if !cov.notes.contains(&note) {
            cov.notes.push(note);
        }
        cov.not_checked.push(nr.name);
    }
    if let (Some(limits), Some(gen)) = (&opt.diversity, &run.continuation) {
        let ent: Vec<f64> = run.logits.iter().take(gen.len()).map(|l| logits::coarse_entropy(l, 64)).collect();
        let s = diversity::stats(gen, &ent);
        case.checks.extend(diversity::check("greedy", &s, limits));
        case.diversity = Some(s);
    }
    let mut loc = localize::localize(&cmps, tokens_ok, golden.n_layer);
    localize::refine(&mut loc, golden, run.taps);
    case.class_proof = crate::probe::prove(&mut loc, golden, run.taps, opt.pairing, n_prompt);
    case.attention = choose_heatmap(golden, run.taps, &cmps, loc.first_divergence.as_ref());
    case.apply(loc);
    Ok(cmps)
}

/// The logits' KL limit widened by the dump's storage rounding, when it stored them in f16 or bf16: a
/// relative rounding u of logits up to L moves each by ≤ u·L, and the KL by ≤ ½(u·L)².
fn logits_storage_tolerance(run: &EngineRun, tol: &Tolerances) -> Tolerances {
    let u = (0..run.logits.len()).map(|k| checks::invariants::storage_roundoff(run.taps, &format!("s{k}/result_output"))).fold(0.0, f64::max);
    let mut tol = tol.clone();
    if u > 0.0 {
        let big = run.logits.iter().flatten().fold(0f64, |m, &v| m.max((v as f64).abs()));
        let extra = 0.5 * (u * big).powi(2);
        let base = tol.get("logits.kl");
        tol.set(
            "logits.kl",
            base.value + extra,
            &format!("{} + {extra:.1e} for the dump's storage rounding of the logits (½(u·max|logit|)², u = {u:.1e})", base.reason),
        );
    }
    tol
}

/// A golden record's tier; a record without one (or with a name lockstep does not know) is judged as
/// the exact tier, the stricter limits.
fn record_tier(f: &ManifestFile) -> Tier {
    f.tier.as_deref().and_then(Tier::from_name).unwrap_or(Tier::Exact)
}

/// Diversity limits from every golden continuation of `model` and `tier` in the manifest.
pub fn diversity_limits(manifest: &Manifest, model: &str, tier: Tier) -> Result<Option<diversity::Limits>> {
    Ok(diversity::Limits::from_any(&diversity_stats(manifest, model, tier)?))
}

/// The diversity statistics of every golden continuation of `model` and `tier` in the manifest.
pub fn diversity_stats(manifest: &Manifest, model: &str, tier: Tier) -> Result<Vec<diversity::Stats>> {
    let mut stats = Vec::new();
    for f in manifest.taps_files().filter(|f| f.model.as_deref() == Some(model) && f.tier.as_deref() == Some(tier.name())) {
        let t = manifest.open_taps(f)?;
        let Some(cont) = t.token_ids("continuation")? else { continue };
        let gl = logits::load_golden(&t)?;
        let ent: Vec<f64> = gl.iter().take(cont.len()).map(|g| g.coarse_entropy()).collect();
        stats.push(diversity::stats(&cont, &ent));
    }
    Ok(stats)
}

/// The attention heatmap: the first divergence's kq_soft_max (worst head) if attention diverges,
/// else the kq_soft_max of the first divergence's layer (or layer 0) at step 0, head 0.
fn choose_heatmap(golden: &TapsFile, engine: &dyn TapSource, cmps: &[TapComparison], first: Option<&localize::Divergence>) -> Option<Heatmap> {
    let pick = cmps
        .iter()
        .filter(|c| c.id.family == "kq_soft_max" && c.errors.is_some())
        .find(|c| first.is_some_and(|d| d.step == c.id.step && d.layer == c.id.layer) || c.failed())
        .or_else(|| cmps.iter().find(|c| c.id.family == "kq_soft_max" && c.id.step == 0 && c.errors.is_some()))?;
    let head = pick.per_head.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).filter(|(_, &e)| e > pick.row_limit).map_or(0, |(h, _)| h);
    let g = golden.f32(&pick.key).ok()?;
    let e = engine.tensor(&pick.key)?.ok()?;
    let [_, h, rows, cols] = <[usize; 4]>::try_from(g.shape.as_slice()).ok()?;
    if head >= h || e.data.len() != g.data.len() {
        return None;
    }
    let slice = |d: &[f32]| d[head * rows * cols..(head + 1) * rows * cols].to_vec();
    Some(Heatmap { tap: pick.key.clone(), head, rows, cols, engine: slice(&e.data), golden: slice(&g.data) })
}

/// A normalized dump's engine run (src/dump_check.rs): its taps, `s{k}/result_output` as the logits of
/// step k (contiguous from step 0), `tokens`, `continuation`.
pub fn run_from_dump(dump: &NormalizedDump) -> Result<EngineRun<'_>> {
    Ok(EngineRun { taps: dump, logits: dump.logits(), tokens: dump.tokens.clone(), continuation: dump.continuation.clone() })
}

/// `lockstep compare`: a dump against a golden entry of the manifest.
pub fn compare_dump(manifest: &Manifest, dump_path: &std::path::Path, entry: &str, tol: Option<Tolerances>) -> Result<CaseReport> {
    CompareGolden::open(manifest, entry)?.compare(dump_path, tol)
}

/// A golden entry opened for `lockstep compare`: what does not depend on the dump, read once (the
/// fuzz target judges many dumps against one golden).
pub struct CompareGolden<'m> {
    file: &'m ManifestFile,
    golden: TapsFile,
    arch: String,
    /// The model's RMSNorm eps and where it was read, when its file is here.
    rms_eps: Option<(f64, String)>,
    diversity: Option<diversity::Limits>,
    report_entry: serde_json::Value,
}

impl<'m> CompareGolden<'m> {
    /// Finds `entry` in the manifest and opens its taps file (sha256-checked).
    pub fn open(manifest: &'m Manifest, entry: &str) -> Result<CompareGolden<'m>> {
        let file = manifest.find(entry)?;
        let golden = manifest.open_taps(file)?;
        let diversity = diversity_limits(manifest, &file.model.clone().unwrap_or_default(), record_tier(file))?;
        let arch = golden_arch(manifest, file);
        let rms_eps = golden_rms_eps(manifest, file, &arch);
        Ok(CompareGolden { file, golden, arch, rms_eps, diversity, report_entry: entry_for_report(file) })
    }

    /// Judges the dump at `dump_path` against this golden.
    pub fn compare(&self, dump_path: &std::path::Path, tol: Option<Tolerances>) -> Result<CaseReport> {
        let f = self.file;
        // Read and check the dump against the golden before judging: a malformed dump is an error naming
        // the tap and the layout, never a panic or a misleading verdict.
        let (dump, coverage) = dump_check::load(dump_path, &self.golden)?;
        let tier = record_tier(f);
        let model = f.model.clone().unwrap_or_default();
        let mut tol = tol.unwrap_or_else(|| Tolerances::new(tier));
        if let Some(eps) = &self.rms_eps {
            checks::invariants::hold_to_model_eps(&mut tol, eps);
        }
        let opt = Options { tol: &tol, pairing: Pairing::for_arch(&self.arch), diversity: self.diversity, max_step: None, require_all_taps: false };
        let mut case = CaseReport {
            name: format!("compare::{}::dump", f.entry_name()),
            suite: "compare".into(),
            case: f.entry_name(),
            model,
            tier,
            backend: "dump".into(),
            golden_entry: Some(self.report_entry.clone()),
            coverage: Some(coverage),
            ..Default::default()
        };
        let t0 = std::time::Instant::now();
        let run = run_from_dump(&dump)?;
        judge(&self.golden, &run, &opt, &mut case)?;
        case.seconds = t0.elapsed().as_secs_f64();
        case.finish();
        Ok(case)
    }
}

/// The architecture of the golden's model (GGUF `general.architecture`), which fixes llama.cpp's RoPE
/// pairing: the record's `arch` (on-demand entries carry it), else the model file's metadata when the file
/// is here (`model_file`: relative to the manifest, an absolute path, or `{id}.gguf (cache)`), else a
/// guess from the model's name ("" when none: the invariant then accepts either pairing and says which).
fn golden_arch(manifest: &Manifest, f: &ManifestFile) -> String {
    if let Some(a) = f.extra.get("arch").and_then(|v| v.as_str()).filter(|a| !a.is_empty()) {
        return a.to_string();
    }
    if let Some(p) = model_file(manifest, f) {
        if let Some(a) = lockstep_engine::gguf::GgufFile::open(&p).ok().and_then(|g| g.meta_str("general.architecture").ok().map(str::to_string)) {
            return a;
        }
    }
    let m = f.model.as_deref().unwrap_or_default();
    if m.contains("qwen") {
        "qwen2".into()
    } else if m.contains("llama") || m.contains("smollm") {
        "llama".into()
    } else {
        String::new()
    }
}

/// The model file llama.cpp ran, when it is here (`model_file`: relative to the manifest, an absolute
/// path, or `{id}.gguf (cache)`).
fn model_file(manifest: &Manifest, f: &ManifestFile) -> Option<std::path::PathBuf> {
    let file = f.model_file.as_deref().map(|mf| match mf.strip_suffix(" (cache)") {
        Some(name) => lockstep_engine::fetch::cache_dir().join("models").join(name),
        None => manifest.dir.join(mf),
    });
    file.filter(|p| p.is_file())
}

/// The model's RMSNorm eps (`{arch}.attention.layer_norm_rms_epsilon` of the model file llama.cpp ran) and
/// the file it was read from; None when the file is not here (the `rms_unit` invariant then holds rows to
/// a bound on eps).
fn golden_rms_eps(manifest: &Manifest, f: &ManifestFile, arch: &str) -> Option<(f64, String)> {
    let p = model_file(manifest, f).filter(|_| !arch.is_empty())?;
    let name = p.file_name().map_or_else(|| p.display().to_string(), |n| n.to_string_lossy().into_owned());
    checks::invariants::model_rms_eps(&lockstep_engine::gguf::GgufFile::open(&p).ok()?, arch, &name)
}

#[cfg(test)]
mod arch_tests {
    use super::*;

    fn record(extra: serde_json::Value) -> Manifest {
        let mut rec = serde_json::json!({"path": "t.safetensors", "sha256": "00", "kind": "taps", "model": "mystery-model", "tier": "exact", "prompt_id": "p"});
        rec.as_object_mut().unwrap().extend(extra.as_object().cloned().unwrap_or_default());
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("manifest.json"), serde_json::json!({ "files": [rec] }).to_string()).unwrap();
        Manifest::load(dir.path()).unwrap()
    }

    #[test]
    fn arch_from_the_record_then_the_model_file_then_the_name() {
        let m = record(serde_json::json!({"arch": "gemma3", "model": "qwen-lookalike"}));
        assert_eq!(golden_arch(&m, &m.files[0]), "gemma3");
        // The name says nothing; the GGUF metadata of the file llama.cpp ran does.
        let tiny_llama = lockstep_engine::fetch::golden_dir().join("models/tiny-llama.q.gguf");
        let m = record(serde_json::json!({"model_file": tiny_llama.to_str().unwrap()}));
        assert_eq!(golden_arch(&m, &m.files[0]), "llama");
        let m = record(serde_json::json!({"model": "my-qwen-finetune", "model_file": "/nonexistent/x.gguf"}));
        assert_eq!(golden_arch(&m, &m.files[0]), "qwen2");
        let m = record(serde_json::json!({}));
        assert_eq!(golden_arch(&m, &m.files[0]), "");
    }
}
