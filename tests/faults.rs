//! Fault injection: every bug class (docs/bug-classes.md), injected into our own engine
//! (engine/src/faults.rs), must make the default suite's case fail and be localized where
//! suites/faults/{fault}.toml says; the clean engine must pass the same cases (no false alarm).
//!
//! Trials (libtest-mimic), one per fault and backend: `fault::{name}::{backend}`; `clean::{suite}::{case}::{backend}`
//! runs the clean engine `CLEAN_REPEATS` times in a row; `sensitivity::*` bisects the smallest RMSNorm-epsilon
//! and RoPE-base changes the exact tier detects; `score` (last) is the mutation score over the fault
//! trials that ran: it fails unless every one was detected, localized and its class named as its file
//! expects. CUDA trials are ignored, with the reason, where no CUDA device is usable.
//!
//! Snapshots (tests/snapshots/): `score` compares each trial that ran with its record in
//! faults_score.json, and `sensitivity::*` its text with sensitivity_{suite}_{case}.txt; a difference
//! fails with the changed fields. They are written only with `LOCKSTEP_UPDATE_SNAPSHOTS=1` (or
//! `INSTA_UPDATE=always`, as for the insta snapshots of tests/suites.rs): review `git diff` and commit.
//!
//! Format of suites/faults/{fault}.toml:
//! ```toml
//! fault = "rope-adjacent"          # a name of `lockstep faults`
//! [[trial]]                        # one or more
//! suite = "tiny-qwen2"             # suites/{suite}.toml, its case `case`, run as is (no special setting)
//! case = "exact-haiku"
//! verdict = "fail"
//! check = "taps:Qcur.rope"         # a check of the report that must fail (its name, or a prefix)
//! step = 0                         # the first divergence (step, layer, tap), when a tap shows it
//! layer = 0
//! tap = "Qcur-0.rope"
//! class = "rope"                   # the likely class's id (docs/bug-classes.md): the fault's own class
//! reason = "..."                   # why, when this differs from where the class shows
//! ```

use libtest_mimic::{Arguments, Failed, Trial};
use lockstep::golden::{self, Manifest};
use lockstep::report::CaseReport;
use lockstep::suite::{self, Case, Suite};
use lockstep::validate::{backend_available, run_case, Runner};
use lockstep::vocab::Backend;
use lockstep_engine::faults::{BugClass, Factor, Fault};
use serde::Deserialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// How many times the clean engine runs each case in a row.
const CLEAN_REPEATS: usize = 20;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Expect {
    suite: String,
    case: String,
    verdict: String,
    #[serde(default)]
    check: Option<String>,
    #[serde(default)]
    step: Option<usize>,
    #[serde(default)]
    layer: Option<usize>,
    #[serde(default)]
    tap: Option<String>,
    #[serde(default)]
    class: Option<BugClass>,
    #[serde(default)]
    reason: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct FaultFile {
    fault: String,
    trial: Vec<Expect>,
}

/// What one fault trial found.
#[derive(Debug, Clone, serde::Serialize)]
struct Outcome {
    fault: String,
    backend: String,
    suite_case: String,
    detected: bool,
    localized: bool,
    class_named: bool,
    /// `s{step}/{tap}`, the dump key of the first divergence; None when no tap diverges.
    first_divergence: Option<String>,
    likely_class: Option<String>,
    likely_class_id: Option<BugClass>,
    failed_checks: Vec<String>,
    problems: Vec<String>,
}

/// The checkout the tests run in (found from the current directory, so a copied test binary works).
fn root() -> PathBuf {
    lockstep_engine::fetch::project_root()
}

fn load_faults() -> Result<Vec<(PathBuf, FaultFile)>, String> {
    let dir = root().join("suites/faults");
    let mut out = Vec::new();
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    paths.sort();
    for p in paths {
        let text = std::fs::read_to_string(&p).map_err(|e| format!("{}: {e}", p.display()))?;
        let f: FaultFile = toml::from_str(&text).map_err(|e| format!("{}: {e}", p.display()))?;
        let Some(fault) = Fault::from_name(&f.fault) else {
            return Err(format!("{}: unknown fault {:?}", p.display(), f.fault));
        };
        // One class per fault: the file's expectation is the catalog's class.
        if let Some(c) = f.trial.iter().filter_map(|e| e.class).find(|&c| c != fault.class()) {
            return Err(format!("{}: class {c} differs from the catalog's class of {} ({}, engine/src/faults.rs)", p.display(), f.fault, fault.class()));
        }
        out.push((p, f));
    }
    // every catalog fault has its file
    for f in Fault::ALL {
        if !out.iter().any(|(_, ff)| ff.fault == f.name()) {
            return Err(format!("suites/faults/{}.toml is missing", f.name()));
        }
    }
    Ok(out)
}

/// The registry models a suite needs that are not in the cache (a GPU runner without them): such
/// trials are reported ignored with the reason, never failed or passed.
fn missing_models(suites: impl IntoIterator<Item = String>) -> Vec<String> {
    let mut missing: Vec<String> = suites
        .into_iter()
        .filter_map(|s| Suite::load(&suite::default_dir().join(format!("{s}.toml"))).ok())
        .map(|s| s.cases.first().map(|c| c.model.clone()).unwrap_or_default())
        .filter(|m| lockstep_engine::fetch::known_model(m).is_some() && !lockstep_engine::fetch::model_path(m).is_file())
        .collect();
    missing.sort();
    missing.dedup();
    missing
}

fn find_case(suite_name: &str, case: &str) -> Result<(Suite, Case), String> {
    let p = suite::default_dir().join(format!("{suite_name}.toml"));
    let s = Suite::load(&p).map_err(|e| e.to_string())?;
    let c = s.cases.iter().find(|c| c.name == case).cloned().ok_or_else(|| format!("{}: no case {case:?}", p.display()))?;
    Ok((s, c))
}

fn run_once(manifest: &Manifest, s: &Suite, c: &Case, backend: Backend, fault: Option<Fault>) -> CaseReport {
    let mut r = Runner::default();
    r.fault = fault;
    r.run(manifest, s, c, backend)
}

fn judge(fault: &str, backend: Backend, e: &Expect, rep: &CaseReport) -> Outcome {
    let failed: Vec<String> = rep.failed_checks().map(|c| c.name.clone()).collect();
    let mut problems = Vec::new();
    if let Some(err) = &rep.error {
        problems.push(format!("the run errored instead of being judged: {err}"));
    }
    if let Some(r) = &rep.ignored_reason {
        problems.push(format!("ignored: {r}"));
    }
    let detected = rep.error.is_none() && rep.ignored_reason.is_none() && !rep.passed && e.verdict == "fail";
    if !detected {
        problems.push("not detected: the case passed".into());
    }
    let mut localized = true;
    if let Some(chk) = &e.check {
        if !failed.iter().any(|n| n == chk || n.starts_with(&format!("{chk}:"))) {
            localized = false;
            problems.push(format!("check {chk} did not fail (failed: {})", list_or_none(&failed)));
        }
    }
    let fd = rep.first_divergence.as_ref();
    let got = fd.map(|d| format!("s{}/{}", d.step, d.tap));
    let got_text = got.clone().unwrap_or_else(|| "none".into());
    if e.tap.is_some() || e.step.is_some() {
        let ok =
            fd.is_some_and(|d| e.step.is_none_or(|s| s == d.step) && (e.layer.is_none() || e.layer == d.layer) && e.tap.as_ref().is_none_or(|t| *t == d.tap));
        if !ok {
            localized = false;
            problems.push(format!("first divergence {got_text}, expected {}", expected_place(e)));
        }
    } else if fd.is_some() {
        localized = false;
        problems.push(format!("expected no tap to diverge, got {got_text}"));
    }
    let class_named = e.class.is_none_or(|c| rep.likely_class_id == Some(c));
    if !class_named {
        let id = |c: Option<BugClass>| c.map_or("none", BugClass::id);
        problems.push(format!(
            "likely class {} ({}), expected {}",
            id(rep.likely_class_id),
            rep.likely_class.as_deref().unwrap_or("no class named"),
            id(e.class)
        ));
    }
    Outcome {
        fault: fault.into(),
        backend: backend.name().into(),
        suite_case: format!("{}::{}", e.suite, e.case),
        detected,
        localized: detected && localized,
        class_named: detected && class_named,
        first_divergence: got,
        likely_class: rep.likely_class.clone(),
        likely_class_id: rep.likely_class_id,
        failed_checks: failed,
        problems,
    }
}

/// Where a fault file expects the first divergence, in words: "step 0, layer 0, tap Qcur-0.rope".
fn expected_place(e: &Expect) -> String {
    let mut parts = Vec::new();
    if let Some(s) = e.step {
        parts.push(format!("step {s}"));
    }
    if let Some(l) = e.layer {
        parts.push(format!("layer {l}"));
    }
    if let Some(t) = &e.tap {
        parts.push(format!("tap {t}"));
    }
    if parts.is_empty() {
        "no tap".into()
    } else {
        parts.join(", ")
    }
}

fn list_or_none(v: &[String]) -> String {
    if v.is_empty() {
        "none".into()
    } else {
        v.join(", ")
    }
}

type Shared = Arc<Mutex<Vec<Outcome>>>;

fn fault_trial(manifest: &Manifest, ff: &FaultFile, backend: Backend, out: &Shared) -> Result<(), Failed> {
    let fault = Fault::from_name(&ff.fault).expect("checked at load");
    let mut msgs = Vec::new();
    for e in &ff.trial {
        let (s, c) = match find_case(&e.suite, &e.case) {
            Ok(sc) => sc,
            Err(err) => {
                // No outcome for this expectation: `score` reports it missing.
                msgs.push(format!("{}::{}: {err}", e.suite, e.case));
                continue;
            }
        };
        let rep = run_once(manifest, &s, &c, backend, Some(fault));
        let o = judge(&ff.fault, backend, e, &rep);
        println!(
            "  {} on {}::{}: detected {}, first divergence {}, class {}",
            ff.fault,
            e.suite,
            e.case,
            o.detected,
            o.first_divergence.as_deref().unwrap_or("none (no tap diverges)"),
            o.likely_class.as_deref().unwrap_or("none")
        );
        if let Some(r) = &e.reason {
            println!("    (where: {r})");
        }
        if !o.problems.is_empty() {
            msgs.push(format!("{}::{}: {}", e.suite, e.case, o.problems.join("; ")));
        }
        out.lock().expect("no panics while held").push(o);
    }
    if msgs.is_empty() {
        Ok(())
    } else {
        Err(msgs.join("\n").into())
    }
}

fn clean_trial(manifest: &Manifest, suite_name: &str, case: &str, backend: Backend, repeats: usize) -> Result<(), Failed> {
    let (s, c) = find_case(suite_name, case)?;
    // One runner: the model loads once, the case runs `repeats` times on the same backend.
    let mut r = Runner::default();
    for i in 0..repeats {
        let rep = r.run(manifest, &s, &c, backend);
        if !rep.passed {
            let failed: Vec<String> = rep.failed_checks().map(|c| format!("{} = {:.3e}", c.name, c.value)).collect();
            let fd = rep.first_divergence.as_ref().map_or("none".into(), |d| format!("s{}/{} {} {:.3e} > {:.3e}", d.step, d.tap, d.metric, d.value, d.limit));
            return Err(format!(
                "clean run {}/{repeats} failed: error {}, first divergence {fd}, failed checks {}",
                i + 1,
                rep.error.as_deref().unwrap_or("none"),
                list_or_none(&failed)
            )
            .into());
        }
    }
    Ok(())
}

/// The report of the exact-tier case with the probe `fault` on an already loaded clean backend.
fn probe(
    manifest: &Manifest,
    s: &Suite,
    c: &Case,
    backend: &mut lockstep_engine::cpu::CpuBackend,
    model: &lockstep_engine::model::Model,
    fault: Fault,
) -> Result<CaseReport, String> {
    backend.fault = Some(fault);
    let rep = run_case(s, c, Backend::Cpu, backend, None, model, manifest).map_err(|e| format!("{e:#}"));
    backend.fault = None;
    rep
}

/// What caught a probe: the first divergence and the failed checks.
fn caught_by(rep: &CaseReport) -> String {
    let fd = rep.first_divergence.as_ref().map_or("no tap".into(), |d| format!("s{}/{} rel_l2 {:.2e}", d.step, d.tap, d.value));
    let checks: Vec<String> = rep.failed_checks().map(|c| c.name.clone()).collect();
    format!("first divergence {fd}; failed checks {}", checks.join(", "))
}

/// Bisection over log(factor) in (1, hi]: the smallest factor > 1 the case detects, to 2 % of the
/// change (ln f) itself, down to changes of 1e-7.
fn smallest_factor(mut test: impl FnMut(f64) -> Result<bool, String>, hi: f64) -> Result<Option<f64>, String> {
    if !test(hi)? {
        return Ok(None);
    }
    let (mut lo, mut hi) = (0.0f64, hi.ln());
    while hi - lo > 0.02 * hi && hi > 1e-7 {
        let mid = 0.5 * (lo + hi);
        if test(mid.exp())? {
            hi = mid
        } else {
            lo = mid
        }
    }
    Ok(Some(hi.exp()))
}

/// The sensitivity the exact tier must keep on tiny-qwen2 exact-haiku: the largest factor on the
/// RMSNorm epsilon and on the RoPE base whose change must be localized where its class shows.
/// Measured: ×1.0102 and ×1.00001 (tests/snapshots/sensitivity_tiny-qwen2_exact-haiku.txt); each
/// limit allows a change ten times as large, so only a real loss of sensitivity fails.
const EPS_LOCALIZED_WITHIN: f64 = 1.1;
const ROPE_BASE_LOCALIZED_WITHIN: f64 = 1.0001;

/// The sensitivity text (snapshotted) and what falls short of the limits above.
fn sensitivity(manifest: &Manifest, suite_name: &str, case: &str) -> Result<(String, Vec<String>), Failed> {
    let (s, c) = find_case(suite_name, case)?;
    let entry = manifest.find(&c.golden).map_err(|e| e.to_string())?;
    let path = lockstep::validate::model_path(manifest, entry, &c).map_err(|e| format!("{e:#}"))?;
    let model = lockstep_engine::model::Model::open_path(path).map_err(|e| format!("{e:#}"))?;
    let mut b = lockstep_engine::cpu::CpuBackend::load(&model.file, Default::default()).map_err(|e| format!("{e:#}"))?;
    let clean = run_case(&s, &c, Backend::Cpu, &mut b, None, &model, manifest).map_err(|e| format!("{e:#}"))?;
    if !clean.passed {
        return Err(format!("{suite_name}::{case}: the clean engine fails, no sensitivity to measure").into());
    }
    let (eps, base) = (model.config.rms_eps, model.config.rope_base);
    let eps_probe = |f: f64| Fault::RmsEpsScaled(Factor(f));
    let base_probe = |f: f64| Fault::RopeBaseScaled(Factor(f));
    // Detected: the case fails. Localized: it fails first at the tap where the class shows.
    let at = |r: &CaseReport, taps: &[&str]| r.first_divergence.as_ref().is_some_and(|d| d.step == 0 && taps.contains(&d.tap.as_str()));
    let (eps_taps, rope_taps) = (["norm-0.rms_norm.0"], ["Qcur-0.rope", "Kcur-0.rope"]);
    let e = smallest_factor(|f| probe(manifest, &s, &c, &mut b, &model, eps_probe(f)).map(|r| !r.passed), 10.0)?;
    let r = smallest_factor(|f| probe(manifest, &s, &c, &mut b, &model, base_probe(f)).map(|r| !r.passed), 10.0)?;
    let el = smallest_factor(|f| probe(manifest, &s, &c, &mut b, &model, eps_probe(f)).map(|r| at(&r, &eps_taps)), 10.0)?;
    let rl = smallest_factor(|f| probe(manifest, &s, &c, &mut b, &model, base_probe(f)).map(|r| at(&r, &rope_taps)), 10.0)?;
    let worst = clean.checks.iter().filter(|k| k.name.starts_with("taps:")).max_by(|a, b| (a.value / a.limit).total_cmp(&(b.value / b.limit)));
    let margin = worst.map_or(String::new(), |k| {
        format!("clean run's closest tap check: {} = {:.2e} of {:.0e} ({})", k.name, k.value, k.limit, k.detail.clone().unwrap_or_default())
    });
    let mut show = |x: Option<f64>, v: f32, what: &str, mk: &dyn Fn(f64) -> Fault| -> Result<String, String> {
        Ok(match x {
            Some(f) => {
                let rep = probe(manifest, &s, &c, &mut b, &model, mk(f))?;
                format!("{what}: ×{f:.6} ({v:e} → {:.6e}, +{:.4} %; {})", v as f64 * f, (f - 1.0) * 100.0, caught_by(&rep))
            }
            None => format!("{what}: not detected even ×10"),
        })
    };
    let mut short = Vec::new();
    for (x, what, within) in [(el, "an RMSNorm-epsilon", EPS_LOCALIZED_WITHIN), (rl, "a RoPE-base", ROPE_BASE_LOCALIZED_WITHIN)] {
        match x {
            Some(f) if f <= within => {}
            Some(f) => short.push(format!(
                "{what} change is localized only from ×{f:.6}; the exact tier must localize ×{within} (measured sensitivity: see the constants)"
            )),
            None => short.push(format!("{what} change is not localized even ×10")),
        }
    }
    let (e, r) = (show(e, eps, "RMSNorm epsilon", &eps_probe)?, show(r, base, "RoPE base", &base_probe)?);
    let (el, rl) = (show(el, eps, "RMSNorm epsilon", &eps_probe)?, show(rl, base, "RoPE base", &base_probe)?);
    let text = format!(
        "{suite_name}::{case} (exact tier), smallest change that fails the case — {e}; {r}\n\
         smallest change localized where the class shows (norm-0.rms_norm.0 / Qcur-0.rope at the prefill) — {el}; {rl}\n\
         {margin}"
    );
    Ok((text, short))
}

fn main() {
    let mut args = Arguments::from_args();
    args.test_threads.get_or_insert(1);
    let manifest = match Manifest::load(&golden::default_dir()) {
        Ok(m) => Arc::new(m),
        Err(e) => {
            let e = e.to_string();
            libtest_mimic::run(&args, vec![Trial::test("faults::load", move || Err(Failed::from(e)))]).exit();
        }
    };
    let files = match load_faults() {
        Ok(f) => f,
        Err(e) => libtest_mimic::run(&args, vec![Trial::test("faults::load", move || Err(Failed::from(e)))]).exit(),
    };
    let outcomes: Shared = Arc::default();
    let mut trials = Vec::new();
    let mut clean_cases: Vec<(String, String)> = Vec::new();
    for (_, ff) in &files {
        for e in &ff.trial {
            if !clean_cases.contains(&(e.suite.clone(), e.case.clone())) {
                clean_cases.push((e.suite.clone(), e.case.clone()));
            }
        }
        for backend in Backend::ALL {
            let (m, ff2, out) = (manifest.clone(), ff.clone(), outcomes.clone());
            let t = Trial::test(format!("fault::{}::{backend}", ff.fault), move || fault_trial(&m, &ff2, backend, &out));
            let missing = missing_models(ff.trial.iter().map(|e| e.suite.clone()));
            trials.push(match backend_available(backend) {
                Err(reason) => t.with_kind(format!("ignored: {reason}")).with_ignored_flag(true),
                Ok(()) if !missing.is_empty() => {
                    t.with_kind(format!("ignored: {} not in the cache (lockstep fetch)", missing.join(", "))).with_ignored_flag(true)
                }
                Ok(()) => t,
            });
        }
    }
    for (s, c) in clean_cases {
        for backend in Backend::ALL {
            let m = manifest.clone();
            let (s2, c2) = (s.clone(), c.clone());
            // Real models are slow on this project's 2-core CPU runner: there they get 2 repeats in
            // `cargo test` (20 on CUDA); LOCKSTEP_CLEAN_REPEATS=20 runs the full 20 anywhere.
            let repeats = match std::env::var("LOCKSTEP_CLEAN_REPEATS").ok().and_then(|v| v.parse().ok()) {
                Some(n) => n,
                None if s.starts_with("tiny") || backend == Backend::Cuda => CLEAN_REPEATS,
                None => 2,
            };
            let t = Trial::test(format!("clean::{s}::{c}::{backend}"), move || clean_trial(&m, &s2, &c2, backend, repeats));
            let missing = missing_models([s.clone()]);
            trials.push(match backend_available(backend) {
                Err(reason) => t.with_kind(format!("ignored: {reason}")).with_ignored_flag(true),
                Ok(()) if !missing.is_empty() => {
                    t.with_kind(format!("ignored: {} not in the cache (lockstep fetch)", missing.join(", "))).with_ignored_flag(true)
                }
                Ok(()) => t,
            });
        }
    }
    {
        let (s, c) = ("tiny-qwen2", "exact-haiku");
        let m = manifest.clone();
        trials.push(Trial::test(format!("sensitivity::{s}::{c}"), move || {
            let (text, short) = sensitivity(&m, s, c)?;
            println!("  {text}");
            let snap = snapshot_text(&format!("sensitivity_{s}_{c}.txt"), &format!("{text}\n"));
            let problems: Vec<String> = short.into_iter().chain(snap.err()).collect();
            if problems.is_empty() {
                Ok(())
            } else {
                Err(problems.join("\n").into())
            }
        }));
    }
    // The score is over the fault trials these arguments select (a filtered run scores its subset).
    let selected: Vec<(String, String, String)> = trials
        .iter()
        .filter(|t| t.name().starts_with("fault::") && !args.is_filtered_out(t) && !args.is_ignored(t))
        .flat_map(|t| {
            let mut parts = t.name().splitn(3, "::").skip(1);
            let (fault, backend) = (parts.next().unwrap_or_default().to_string(), parts.next().unwrap_or_default().to_string());
            let ff = files.iter().map(|(_, ff)| ff).find(|ff| ff.fault == fault).expect("trials come from the files");
            ff.trial.iter().map(move |e| (fault.clone(), backend.clone(), format!("{}::{}", e.suite, e.case))).collect::<Vec<_>>()
        })
        .collect();
    let out = outcomes.clone();
    let n_faults = Fault::ALL.len();
    let n_trials: usize = files.iter().map(|(_, ff)| ff.trial.len()).sum();
    let score_trial = if selected.is_empty() {
        Trial::test("score", || Ok(())).with_kind("ignored: no fault trial selected to score").with_ignored_flag(true)
    } else {
        // Runs last (trials run in the order given on one thread).
        Trial::test("score", move || score(&out, &selected, n_faults, n_trials))
    };
    trials.push(score_trial);
    libtest_mimic::run(&args, trials).exit();
}

/// Whether snapshot files may be (re)written: `LOCKSTEP_UPDATE_SNAPSHOTS=1` or `INSTA_UPDATE=always`.
fn updating_snapshots() -> bool {
    std::env::var("LOCKSTEP_UPDATE_SNAPSHOTS").is_ok_and(|v| v == "1") || std::env::var("INSTA_UPDATE").is_ok_and(|v| v == "always")
}

fn snapshot_path(name: &str) -> PathBuf {
    root().join("tests/snapshots").join(name)
}

/// Writes through a temporary file and a rename (never a half-written snapshot).
fn write_atomic(path: &Path, text: &str) -> Result<(), String> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, path)).map_err(|e| format!("writing {}: {e}", path.display()))
}

/// `text` against the committed snapshot `name`: equal, or an error with the differing lines (or,
/// when updating, the file rewritten).
fn snapshot_text(name: &str, text: &str) -> Result<(), String> {
    let path = snapshot_path(name);
    let old = std::fs::read_to_string(&path).unwrap_or_default();
    if old == text {
        return Ok(());
    }
    if updating_snapshots() {
        println!("  updated {}", path.display());
        return write_atomic(&path, text);
    }
    let (a, b): (Vec<&str>, Vec<&str>) = (old.lines().collect(), text.lines().collect());
    let mut diff = Vec::new();
    for i in 0..a.len().max(b.len()) {
        if a.get(i) != b.get(i) {
            diff.push(format!("  line {}:\n  - {}\n  + {}", i + 1, a.get(i).unwrap_or(&"(none)"), b.get(i).unwrap_or(&"(none)")));
        }
    }
    Err(format!("{} differs from this run (LOCKSTEP_UPDATE_SNAPSHOTS=1 rewrites it):\n{}", path.display(), diff.join("\n")))
}

/// A trial's record in faults_score.json: `{backend} {fault} {suite::case}`.
fn record_key(v: &Value) -> String {
    let f = |k: &str| v[k].as_str().unwrap_or("?").to_string();
    format!("{} {} {}", f("backend"), f("fault"), f("suite_case"))
}

/// The fields in which two records differ, as `field: committed → now`.
fn record_diff(old: &Value, new: &Value) -> Vec<String> {
    let keys: std::collections::BTreeSet<&String> = old.as_object().into_iter().chain(new.as_object()).flat_map(|o| o.keys()).collect();
    keys.into_iter()
        .filter(|k| old.get(*k) != new.get(*k))
        .map(|k| format!("{k}: {} → {}", old.get(k).unwrap_or(&Value::Null), new.get(k).unwrap_or(&Value::Null)))
        .collect()
}

/// The mutation score over the fault trials that ran, its threshold, and its snapshot.
///
/// The snapshot is compared record by record (not with insta) so that a filtered run, or a machine
/// where one backend cannot run, compares the trials it ran and keeps the others' records.
/// `n_trials`: the expectations of all suites/faults/ files (the trials of one complete backend).
fn score(out: &Shared, selected: &[(String, String, String)], n_faults: usize, n_trials: usize) -> Result<(), Failed> {
    let o = out.lock().expect("no panics while held");
    let mut problems = Vec::new();
    // Threshold: every selected trial was judged, detected, localized and its class named.
    for (fault, backend, sc) in selected {
        match o.iter().find(|x| &x.fault == fault && &x.backend == backend && &x.suite_case == sc) {
            None => problems.push(format!("{backend} {fault} {sc}: no outcome (the trial did not judge it)")),
            Some(x) if !(x.detected && x.localized && x.class_named) => problems.push(format!("{backend} {fault} {sc}: {}", x.problems.join("; "))),
            Some(_) => {}
        }
    }
    let mut lines = Vec::new();
    for backend in ["cpu", "cuda"] {
        let v: Vec<&Outcome> = o.iter().filter(|x| x.backend == backend).collect();
        if v.is_empty() {
            continue;
        }
        let det = v.iter().filter(|x| x.detected).count();
        let loc = v.iter().filter(|x| x.localized).count();
        let cls = v.iter().filter(|x| x.class_named).count();
        let faults: std::collections::BTreeSet<&str> = v.iter().map(|x| x.fault.as_str()).collect();
        lines.push(format!(
            "{backend}: mutation score {det}/{} detected, {loc}/{det} localized, {cls}/{det} class named ({} of {n_faults} faults)",
            v.len(),
            faults.len()
        ));
    }
    for l in &lines {
        println!("  {l}");
    }

    // Snapshot: each record that ran against its committed record.
    let path = snapshot_path("faults_score.json");
    let committed: Value = match std::fs::read_to_string(&path) {
        Ok(t) => serde_json::from_str(&t).map_err(|e| format!("{}: {e}", path.display()))?,
        Err(_) => serde_json::json!({"trials": []}),
    };
    let mut records: BTreeMap<String, Value> = committed["trials"].as_array().into_iter().flatten().map(|v| (record_key(v), v.clone())).collect();
    let mut changed = Vec::new();
    for x in o.iter() {
        let new = serde_json::to_value(x).map_err(|e| e.to_string())?;
        let key = record_key(&new);
        match records.get(&key) {
            Some(old) if *old == new => {}
            Some(old) => changed.push(format!("{key}: {}", record_diff(old, &new).join("; "))),
            None => changed.push(format!("{key}: not in the snapshot")),
        }
        records.insert(key, new);
    }
    // A backend that ran every trial of suites/faults/ also has no records beyond them.
    for backend in ["cpu", "cuda"] {
        let ran = selected.iter().filter(|(_, b, _)| b == backend).count();
        if ran < n_trials {
            continue;
        }
        let stale: Vec<String> = records
            .keys()
            .filter(|k| k.starts_with(&format!("{backend} ")) && !o.iter().any(|x| format!("{} {} {}", x.backend, x.fault, x.suite_case) == **k))
            .cloned()
            .collect();
        for k in stale {
            changed.push(format!("{k}: in the snapshot, no longer a trial"));
            records.remove(&k);
        }
    }
    if !changed.is_empty() {
        if updating_snapshots() && !problems.is_empty() {
            problems.push(format!("{} not updated: the snapshot records a passing score only", path.display()));
        } else if updating_snapshots() {
            let all: Vec<&Value> = records.values().collect();
            let summary = summarize(&all);
            let json = serde_json::json!({"summary": summary, "trials": all});
            write_atomic(&path, &format!("{}\n", serde_json::to_string_pretty(&json).map_err(|e| e.to_string())?))?;
            println!("  updated {} ({} records changed)", path.display(), changed.len());
        } else {
            problems.push(format!(
                "{} differs from this run in {} records (LOCKSTEP_UPDATE_SNAPSHOTS=1 rewrites it):\n  {}",
                path.display(),
                changed.len(),
                changed.join("\n  ")
            ));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("\n").into())
    }
}

/// The score lines of the snapshot's summary, per backend, from its records.
fn summarize(records: &[&Value]) -> Vec<String> {
    let mut lines = Vec::new();
    for backend in ["cpu", "cuda"] {
        let v: Vec<&&Value> = records.iter().filter(|r| r["backend"] == backend).collect();
        if v.is_empty() {
            continue;
        }
        let n = |k: &str| v.iter().filter(|r| r[k] == true).count();
        let det = n("detected");
        lines.push(format!("{backend}: mutation score {det}/{} detected, {}/{det} localized, {}/{det} class named", v.len(), n("localized"), n("class_named")));
    }
    lines
}
