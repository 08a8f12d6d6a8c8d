//! `lockstep validate --pin`: a failing case whose golden does not hold every tap of every layer (the
//! committed real-model goldens keep some layers only; an on-demand golden may keep some tap families)
//! is run again against an on-demand full-tap golden of the same model, prompt, tier and steps
//! (src/ondemand.rs: exported by llama.cpp once, cached), and its report gains the pinned first
//! divergence, class and class proof. The case's own verdict is kept as it was.
//!
//! Also the `lockstep golden` command that makes such a golden, for `lockstep compare`'s output when
//! the golden holds none of the first failing tap's inputs.

use crate::golden::{Manifest, ManifestFile};
use crate::localize::{BugClass, Divergence};
use crate::ondemand::{self, Message, PromptSpec, Request, Taps};
use crate::report::CaseReport;
use crate::suite::{Case, Suite};
use crate::tapname::TapId;
use crate::validate::Runner;
use crate::vocab::{Backend, Check};
use anyhow::{anyhow, Context, Result};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The checks of a pinned run: those of the case that `compare::judge` runs (taps always). The others
/// (kv_cache, isolated, diversity, sampler, anticheat) do not depend on the golden's taps and already ran.
const PIN_CHECKS: [Check; 4] = [Check::Tokens, Check::Taps, Check::Logits, Check::Invariants];

/// A failing case judged again against a full-tap golden (`pinned` in report.json).
#[derive(Debug, Clone, Serialize, Default)]
pub struct Pinned {
    /// Why the case's golden is not full-tap.
    pub why: String,
    /// `cache:KEY` of the full-tap golden, once it was had.
    pub golden: Option<String>,
    /// The `lockstep golden` command that makes (or finds in the cache) that golden.
    pub command: String,
    /// Why there is no pinned result: the golden venv is not built, the export or the run failed.
    pub unavailable: Option<String>,
    /// The case's checks (those of [`PIN_CHECKS`] it has) against the full-tap golden.
    pub passed: Option<bool>,
    pub first_divergence: Option<Divergence>,
    pub likely_class: Option<String>,
    pub likely_class_id: Option<BugClass>,
    pub evidence: Option<String>,
    pub class_proof: Option<crate::probe::ClassProof>,
    /// Names of the checks that failed against the full-tap golden.
    pub failed_checks: Vec<String>,
    /// Things to know when reading the result (the export tokenized the prompt differently, …).
    pub notes: Vec<String>,
    /// Export (or cache lookup) plus run.
    pub seconds: f64,
}

impl Pinned {
    /// One line for the terminal: `pinned (cache:1234abcd): s0 norm-4.rms_norm.0 rel_l2=… > … [class]`.
    pub fn line(&self) -> String {
        let name = self.golden.as_deref().map(|g| g.get(..14).unwrap_or(g)).unwrap_or("full-tap golden");
        if let Some(why) = &self.unavailable {
            return format!("not pinned: {why}");
        }
        match (&self.first_divergence, self.passed) {
            (Some(d), _) => {
                let v = if d.value.is_finite() { format!("{}={:.2e} > {:.0e}", d.metric, d.value, d.limit) } else { d.metric.clone() };
                let class = self.likely_class.as_ref().map_or(String::new(), |c| format!("  [{c}]"));
                let proof = self.class_proof.as_ref().map_or(String::new(), |p| format!(" ({})", p.verdict));
                format!("pinned ({name}…): s{} {} {v}{class}{proof}", d.step, d.tap)
            }
            (None, Some(true)) => format!("pinned ({name}…): every tap agrees with the full-tap golden"),
            (None, _) => format!("pinned ({name}…): no tap differs; failed: {}", self.failed_checks.join(", ")),
        }
    }
}

/// Why the golden record `f` of `manifest` does not hold every tap of every layer; None when it does.
pub fn partial_taps(manifest: &Manifest, f: &ManifestFile) -> Option<String> {
    // A family selection (`lockstep golden --taps`) is said in the on-demand manifest.
    if let Some(fams) = manifest.provenance.get("ondemand").and_then(|o| o.get("taps")).and_then(|t| t.as_array()) {
        let fams: Vec<&str> = fams.iter().filter_map(|v| v.as_str()).collect();
        return Some(format!("the golden keeps the tap families {} only", fams.join(", ")));
    }
    let ids: Vec<TapId> = f.tensors.iter().filter_map(|t| t.key.as_deref()).filter_map(TapId::parse_key).collect();
    let n_layer = f.n_layer.or_else(|| ids.iter().filter_map(|t| t.layer).max().map(|l| l + 1))?;
    if let Some(full) = &f.full_layers {
        let missing: Vec<usize> = (0..n_layer).filter(|l| !full.contains(l)).collect();
        if !missing.is_empty() {
            return Some(format!("the golden holds every tap of layer{} {} only (of {n_layer})", if full.len() == 1 { "" } else { "s" }, fmt_layers(full)));
        }
    }
    // Every layer should hold the same taps (at step 0): a layer with fewer had some dropped.
    let mut per_layer: BTreeMap<usize, BTreeSet<String>> = (0..n_layer).map(|l| (l, BTreeSet::new())).collect();
    for id in ids.iter().filter(|t| t.step == 0) {
        if let Some(l) = id.layer {
            per_layer.entry(l).or_default().insert(id.family_stage());
        }
    }
    let all: BTreeSet<&String> = per_layer.values().flatten().collect();
    let short: Vec<usize> = per_layer.iter().filter(|(_, s)| s.len() < all.len()).map(|(l, _)| *l).collect();
    (!short.is_empty()).then(|| {
        format!(
            "layer{} {} of the golden lack{} taps the others hold",
            if short.len() == 1 { "" } else { "s" },
            fmt_layers(&short),
            if short.len() == 1 { "s" } else { "" }
        )
    })
}

fn fmt_layers(v: &[usize]) -> String {
    let s: Vec<String> = v.iter().map(|l| l.to_string()).collect();
    if s.len() <= 8 {
        s.join(", ")
    } else {
        format!("{}, …, {}", s[..3].join(", "), s[s.len() - 1])
    }
}

/// The on-demand request for a full-tap golden of the record's model, prompt, tier and steps.
/// `fallback_model`: the model to name when the record's is neither a known id nor an existing file.
pub fn full_tap_request(manifest: &Manifest, f: &ManifestFile, fallback_model: &str) -> Result<Request> {
    let what = || format!("{} (golden {})", manifest.path.display(), f.entry_name());
    let p = f.prompt.as_ref().ok_or_else(|| anyhow!("{}: the record has no prompt", what()))?;
    let prompt = if f.chat == Some(true) {
        let msgs: Vec<Message> =
            serde_json::from_value(p.clone()).map_err(|e| anyhow!("{}: chat prompt is not a list of {{role, content}} messages: {e}", what()))?;
        PromptSpec::Chat(msgs)
    } else {
        PromptSpec::Text(p.as_str().ok_or_else(|| anyhow!("{}: the prompt is not text", what()))?.to_string())
    };
    let tier = f.tier.clone().ok_or_else(|| anyhow!("{}: the record has no tier", what()))?;
    let decode = f.extra.get("decode_steps").and_then(|v| v.as_u64()).map(|d| d as usize + 1);
    let steps = f.steps.or(decode).unwrap_or(ondemand::DEFAULT_STEPS);
    Ok(Request { model: model_spec(manifest, f, fallback_model), prompt, tiers: vec![tier], steps, taps: Taps::All })
}

/// What `lockstep golden --model` should be given for the record's model: its id when lockstep knows
/// it (a fetched or tiny model), else the file llama.cpp ran when it still exists, else `fallback`.
fn model_spec(manifest: &Manifest, f: &ManifestFile, fallback: &str) -> String {
    use lockstep_engine::fetch;
    if let Some(id) = f.model.as_deref().filter(|id| fetch::known_model(id).is_some() || fetch::tiny_model_path(id).is_some()) {
        return id.to_string();
    }
    if let Some(p) = f.model_file.as_deref().map(|rel| manifest.dir.join(rel)).filter(|p| p.is_file()) {
        return p.display().to_string();
    }
    f.model.clone().unwrap_or_else(|| fallback.to_string())
}

/// The `lockstep golden` command line for `req` (one tier). Chat messages travel in a file: they are
/// written to `chat_file`, which the command names.
pub fn golden_command(req: &Request, chat_file: &Path) -> Result<String> {
    let prompt = match &req.prompt {
        PromptSpec::Text(t) => format!("--prompt {}", sh_quote(t)),
        PromptSpec::Chat(m) => {
            write_atomic(chat_file, serde_json::to_string_pretty(m)?.as_bytes())?;
            format!("--chat {}", sh_quote(&chat_file.display().to_string()))
        }
    };
    Ok(format!("lockstep golden --model {} {prompt} --tier {} --steps {} --taps all", sh_quote(&req.model), req.tiers.join(","), req.steps))
}

/// POSIX shell quoting: bare when only safe characters, else in single quotes with each `'` as `'\''`.
/// Hand-written: the rule is this one line, not worth a dependency.
fn sh_quote(s: &str) -> String {
    if !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_./:=+,@%".contains(c)) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir).with_context(|| format!("{}: cannot create a temporary file", dir.display()))?;
    tmp.write_all(bytes).with_context(|| format!("{}: cannot write", tmp.path().display()))?;
    tmp.persist(path).with_context(|| format!("{}: cannot rename into place", path.display()))?;
    Ok(())
}

/// A file name for a case's chat messages: `{case name}.chat.json` with unsafe characters replaced.
fn chat_file_name(case_name: &str) -> String {
    let s: String = case_name.chars().map(|c| if c.is_ascii_alphanumeric() || "-_.".contains(c) { c } else { '_' }).collect();
    format!("{s}.chat.json")
}

/// Whether `rep` (a case of `case`) wants pinning, and with what: Some((why its golden is partial,
/// the full-tap request)) for a failing case (it ran, no error) whose golden is not full-tap.
fn wants_pin(manifest: &Manifest, case: &Case, rep: &CaseReport) -> Result<Option<(String, Request)>> {
    if rep.passed || rep.ignored_reason.is_some() || rep.error.is_some() {
        return Ok(None);
    }
    if let Some(req) = &case.on_demand {
        if req.taps == Taps::All {
            return Ok(None);
        }
        let why = format!("the golden keeps the tap families {} only", req.taps.arg());
        return Ok(Some((why, Request { taps: Taps::All, tiers: vec![case.tier.name().to_string()], ..req.clone() })));
    }
    let f = manifest.find(&case.golden)?;
    let Some(why) = partial_taps(manifest, f) else { return Ok(None) };
    Ok(Some((why, full_tap_request(manifest, f, &case.model)?)))
}

/// Pins one case (see the module doc): None when it passed, did not run, or its golden is full-tap.
/// Progress (the export) goes to stderr; `chat_dir` receives the chat files the commands name.
pub fn pin_case(runner: &mut Runner, manifest: &Manifest, suite: &Suite, case: &Case, backend: Backend, rep: &CaseReport, chat_dir: &Path) -> Option<Pinned> {
    let t0 = std::time::Instant::now();
    let (why, req) = match wants_pin(manifest, case, rep) {
        Ok(Some(w)) => w,
        Ok(None) => return None,
        Err(e) => return Some(Pinned { unavailable: Some(format!("{e:#}")), ..Default::default() }),
    };
    let mut p = Pinned { why, ..Default::default() };
    p.command = golden_command(&req, &chat_dir.join(chat_file_name(&rep.name))).unwrap_or_else(|e| format!("(no command: {e:#})"));
    let done = |mut p: Pinned| {
        p.seconds = t0.elapsed().as_secs_f64();
        Some(p)
    };
    // As for suite cases naming an on-demand golden: without the golden venv (and the entry not cached)
    // say why, rather than building the venv (~5 minutes) unasked.
    if let Err(reason) = ondemand::availability(&req) {
        p.unavailable = Some(reason);
        return done(p);
    }
    let entry = match ondemand::ensure(&req).and_then(|es| es.into_iter().next().ok_or_else(|| anyhow!("the exporter returned no entry"))) {
        Ok(e) => e,
        Err(e) => {
            p.unavailable = Some(format!("the full-tap golden ({}) could not be exported: {e:#}", req.describe()));
            return done(p);
        }
    };
    p.golden = Some(entry.name());
    if let Some(n) = token_note(rep, &entry.dir) {
        p.notes.push(n);
    }
    // The case, naming that entry itself (not the request again: the exporter's sources may change
    // between two lookups, and the result must be judged against the golden it names).
    let pin_manifest = match Manifest::load(&entry.dir) {
        Ok(m) => m,
        Err(e) => {
            p.unavailable = Some(format!("{e:#}"));
            return done(p);
        }
    };
    let Some(file) = pin_manifest.taps_files().next().map(|f| f.path.clone()) else {
        p.unavailable = Some(format!("{}: lists no taps file", pin_manifest.path.display()));
        return done(p);
    };
    let checks: Vec<Check> = case.checks.iter().filter(|c| PIN_CHECKS.contains(c)).cloned().chain((!case.wants(Check::Taps)).then_some(Check::Taps)).collect();
    let pin_case = Case { on_demand: None, golden: file, checks, ..case.clone() };
    // The same runner: the same backend (already loaded) with the same injected fault, if any.
    let r = runner.run(&pin_manifest, suite, &pin_case, backend);
    if let Some(e) = r.error.as_ref().or(r.ignored_reason.as_ref()) {
        p.unavailable = Some(format!("the run against {} failed: {e}", entry.name()));
        return done(p);
    }
    p.passed = Some(r.passed);
    p.failed_checks = r.failed_checks().map(|k| k.name.clone()).collect();
    p.first_divergence = r.first_divergence;
    p.likely_class = r.likely_class;
    p.likely_class_id = r.likely_class_id;
    p.evidence = r.evidence;
    p.class_proof = r.class_proof;
    done(p)
}

/// A note when the full-tap golden's prompt tokens differ from the case's golden's.
fn token_note(rep: &CaseReport, entry_dir: &Path) -> Option<String> {
    let before: Vec<i64> = serde_json::from_value(rep.golden_entry.as_ref()?.get("tokens")?.clone()).ok()?;
    let m = Manifest::load(entry_dir).ok()?;
    let now = m.taps_files().next()?.tokens.clone()?;
    (before != now).then(|| {
        let at = before.iter().zip(&now).position(|(a, b)| a != b).unwrap_or(before.len().min(now.len()));
        format!(
            "the full-tap golden's prompt has {} tokens, the case's golden {} (first difference at position {at}): the pinned divergence is for its tokens",
            now.len(),
            before.len()
        )
    })
}

/// Pins every failing case of a run (the cases in the order of `trials`), writing each result into its
/// report's `pinned`. Returns how many were pinned (a result had) and how many could not be.
pub fn pin_all(runner: &mut Runner, manifest: &Manifest, trials: &[(&Suite, &Case, Backend)], reports: &mut [CaseReport], chat_dir: &Path) -> (usize, usize) {
    let (mut ok, mut not) = (0, 0);
    for ((suite, case, backend), rep) in trials.iter().zip(reports.iter_mut()) {
        if rep.passed || rep.ignored_reason.is_some() || rep.error.is_some() {
            continue;
        }
        eprintln!("lockstep validate --pin: {}", rep.name);
        let p = pin_case(runner, manifest, suite, case, *backend, rep, chat_dir);
        match &p {
            Some(p) if p.unavailable.is_none() => ok += 1,
            Some(_) => not += 1,
            None => {}
        }
        rep.pinned = p;
    }
    (ok, not)
}

/// For `lockstep compare`: when the golden holds none of the first divergence's direct inputs (llama.cpp's
/// graph, `noise::direct_inputs`) and is not full-tap, the `lockstep golden` command for a full-tap golden
/// of the same model, prompt, tier and steps (chat messages written to `chat_file`).
pub fn compare_pin_command(manifest: &Manifest, entry: &str, first: &Divergence, chat_file: &Path) -> Result<Option<String>> {
    let f = manifest.find(entry)?;
    if partial_taps(manifest, f).is_none() {
        return Ok(None);
    }
    let Ok(id) = TapId::parse_tap(first.step, &first.tap) else { return Ok(None) };
    let inputs = crate::noise::direct_inputs(&id, f.n_layer);
    let held: BTreeSet<&str> = f.tensors.iter().filter_map(|t| t.key.as_deref()).collect();
    if inputs.is_empty() || inputs.iter().any(|t| held.contains(format!("s{}/{t}", first.step).as_str())) {
        return Ok(None);
    }
    let fallback = f.model.clone().unwrap_or_default();
    let req = full_tap_request(manifest, f, &fallback)?;
    Ok(Some(golden_command(&req, chat_file)?))
}

/// Where `lockstep validate --pin` writes the chat files its commands name: `{report}/pin`.
pub fn chat_dir(report: &Path) -> PathBuf {
    report.join("pin")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_quoting() {
        assert_eq!(sh_quote("qwen2.5-coder-0.5b"), "qwen2.5-coder-0.5b");
        assert_eq!(sh_quote("The quick fox"), "'The quick fox'");
        assert_eq!(sh_quote("it's"), r"'it'\''s'");
        assert_eq!(sh_quote(""), "''");
    }

    /// A manifest with one taps record of `layers` layers holding `families` in `full` layers and only
    /// `l_out` in the others.
    fn manifest(n_layer: usize, full: &[usize], families: &[&str], provenance: serde_json::Value) -> Manifest {
        let mut tensors = Vec::new();
        for l in 0..n_layer {
            for fam in families.iter().filter(|f| full.contains(&l) || **f == "l_out") {
                tensors.push(serde_json::json!({"key": format!("s0/{fam}-{l}")}));
            }
        }
        let rec = serde_json::json!({"path": "t.safetensors", "sha256": "00", "kind": "taps", "model": "m", "tier": "exact", "prompt_id": "p",
            "prompt": "Hi there", "chat": false, "decode_steps": 4, "n_layer": n_layer, "full_layers": full, "tensors": tensors});
        let mut top = provenance.as_object().cloned().unwrap_or_default();
        top.insert("files".into(), serde_json::json!([rec]));
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("manifest.json"), serde_json::Value::Object(top).to_string()).unwrap();
        Manifest::load(dir.path()).unwrap()
    }

    #[test]
    fn partial_goldens_are_recognized() {
        let fams = ["attn_norm", "Qcur", "l_out"];
        let m = manifest(3, &[0, 1, 2], &fams, serde_json::json!({}));
        assert_eq!(partial_taps(&m, &m.files[0]), None);
        let m = manifest(3, &[0], &fams, serde_json::json!({}));
        assert_eq!(partial_taps(&m, &m.files[0]).unwrap(), "the golden holds every tap of layer 0 only (of 3)");
        // No full_layers field: the layers' tap sets say it.
        let mut m = manifest(3, &[0, 2], &fams, serde_json::json!({}));
        m.files[0].full_layers = None;
        assert_eq!(partial_taps(&m, &m.files[0]).unwrap(), "layer 1 of the golden lacks taps the others hold");
        let m = manifest(3, &[0, 1, 2], &["l_out"], serde_json::json!({"ondemand": {"taps": ["l_out"]}}));
        assert_eq!(partial_taps(&m, &m.files[0]).unwrap(), "the golden keeps the tap families l_out only");
    }

    #[test]
    fn request_and_command_from_a_record() {
        let m = manifest(2, &[0], &["l_out"], serde_json::json!({}));
        let req = full_tap_request(&m, &m.files[0], "fallback").unwrap();
        assert_eq!((req.steps, req.tiers.clone(), req.taps.clone()), (5, vec!["exact".to_string()], Taps::All));
        // "m" is no known model and no file: the record's own name.
        assert_eq!(req.model, "m");
        let dir = tempfile::tempdir().unwrap();
        let cmd = golden_command(&req, &dir.path().join("c.json")).unwrap();
        assert_eq!(cmd, "lockstep golden --model m --prompt 'Hi there' --tier exact --steps 5 --taps all");
        let chat = Request { prompt: PromptSpec::Chat(vec![Message { role: "user".into(), content: "Hi".into() }]), ..req };
        let f = dir.path().join("x y.json");
        let cmd = golden_command(&chat, &f).unwrap();
        assert!(cmd.contains(&format!("--chat '{}'", f.display())), "{cmd}");
        assert_eq!(ondemand::read_chat(&f).unwrap(), vec![Message { role: "user".into(), content: "Hi".into() }]);
    }
}
