//! Fault injection (issue #6): every bug class of ../shared/BUGS.md, injected into our own engine
//! (engine/src/faults.rs), must make the default suite's case fail and be localized where
//! suites/faults/{fault}.toml says; the clean engine must pass the same cases (no false alarm).
//!
//! Trials (libtest-mimic), one per fault and backend: `fault::{name}::{backend}`; `clean::{suite}::{case}::{backend}`
//! runs the clean engine `CLEAN_REPEATS` times in a row; `sensitivity::*` bisects the smallest RMSNorm-epsilon
//! and RoPE-base changes the exact tier detects; `score` prints the mutation score (detected/injected,
//! localized/detected) and writes it to tests/snapshots/faults_score.json. CUDA trials are ignored,
//! with the reason, where no CUDA device is usable.
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
//! class = "RoPE pairing or base"   # the likely class (src/localize.rs)
//! reason = "..."                   # why, when this differs from BUGS.md's "where it shows"
//! ```

use libtest_mimic::{Arguments, Failed, Trial};
use lockstep::golden::{self, Manifest};
use lockstep::report::CaseReport;
use lockstep::suite::{self, Case, Suite};
use lockstep::validate::{backend_available, run_case, Runner};
use lockstep_engine::faults::{Factor, Fault};
use serde::Deserialize;
use std::path::PathBuf;
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
    class: Option<String>,
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
    first_divergence: Option<String>,
    likely_class: Option<String>,
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
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))?.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.extension().is_some_and(|x| x == "toml")).collect();
    paths.sort();
    for p in paths {
        let text = std::fs::read_to_string(&p).map_err(|e| format!("{}: {e}", p.display()))?;
        let f: FaultFile = toml::from_str(&text).map_err(|e| format!("{}: {e}", p.display()))?;
        if Fault::from_name(&f.fault).is_none() {
            return Err(format!("{}: unknown fault {:?}", p.display(), f.fault));
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

fn find_case(suite_name: &str, case: &str) -> Result<(Suite, Case), String> {
    let p = suite::default_dir().join(format!("{suite_name}.toml"));
    let s = Suite::load(&p).map_err(|e| e.to_string())?;
    let c = s.cases.iter().find(|c| c.name == case).cloned().ok_or_else(|| format!("{}: no case {case:?}", p.display()))?;
    Ok((s, c))
}

fn run_once(manifest: &Manifest, s: &Suite, c: &Case, backend: &str, fault: Option<Fault>) -> CaseReport {
    let mut r = Runner::default();
    r.fault = fault;
    r.run(manifest, s, c, backend)
}

fn judge(fault: &str, backend: &str, e: &Expect, rep: &CaseReport) -> Outcome {
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
            problems.push(format!("check {chk:?} did not fail (failed: {failed:?})"));
        }
    }
    let fd = rep.first_divergence.as_ref();
    let got = fd.map(|d| format!("s{} L{:?} {}", d.step, d.layer, d.tap));
    if e.tap.is_some() || e.step.is_some() {
        let ok = fd.is_some_and(|d| e.step.is_none_or(|s| s == d.step) && (e.layer.is_none() || e.layer == d.layer) && e.tap.as_ref().is_none_or(|t| *t == d.tap));
        if !ok {
            localized = false;
            problems.push(format!("first divergence {got:?}, expected s{:?} L{:?} {:?}", e.step, e.layer, e.tap));
        }
    } else if fd.is_some() {
        localized = false;
        problems.push(format!("expected no tap to diverge, got {got:?}"));
    }
    let class_named = e.class.as_ref().is_none_or(|c| rep.likely_class.as_deref() == Some(c.as_str()));
    if !class_named {
        problems.push(format!("likely class {:?}, expected {:?}", rep.likely_class, e.class));
    }
    Outcome {
        fault: fault.into(),
        backend: backend.into(),
        suite_case: format!("{}::{}", e.suite, e.case),
        detected,
        localized: detected && localized,
        class_named: detected && class_named,
        first_divergence: got,
        likely_class: rep.likely_class.clone(),
        failed_checks: failed,
        problems,
    }
}

type Shared = Arc<Mutex<Vec<Outcome>>>;

fn fault_trial(manifest: &Manifest, ff: &FaultFile, backend: &str, out: &Shared) -> Result<(), Failed> {
    let fault = Fault::from_name(&ff.fault).expect("checked at load");
    let mut msgs = Vec::new();
    for e in &ff.trial {
        let (s, c) = find_case(&e.suite, &e.case)?;
        let rep = run_once(manifest, &s, &c, backend, Some(fault));
        let o = judge(&ff.fault, backend, e, &rep);
        println!(
            "  {} on {}::{}: detected {}, first divergence {}, class {:?}",
            ff.fault, e.suite, e.case, o.detected, o.first_divergence.clone().unwrap_or_else(|| "none (no tap diverges)".into()), o.likely_class
        );
        if let Some(r) = &e.reason {
            println!("    (where: {r})");
        }
        if !o.problems.is_empty() {
            msgs.push(format!("{}::{}: {}", e.suite, e.case, o.problems.join("; ")));
        }
        out.lock().expect("no panics while held").push(o);
    }
    if msgs.is_empty() { Ok(()) } else { Err(msgs.join("\n").into()) }
}

fn clean_trial(manifest: &Manifest, suite_name: &str, case: &str, backend: &str, repeats: usize) -> Result<(), Failed> {
    let (s, c) = find_case(suite_name, case)?;
    // One runner: the model loads once, the case runs `repeats` times on the same backend.
    let mut r = Runner::default();
    for i in 0..repeats {
        let rep = r.run(manifest, &s, &c, backend);
        if !rep.passed {
            let failed: Vec<String> = rep.failed_checks().map(|c| format!("{} = {:.3e}", c.name, c.value)).collect();
            return Err(format!("clean run {}/{repeats} failed: error {:?}, first divergence {:?}, failed checks {failed:?}", i + 1, rep.error, rep.first_divergence).into());
        }
    }
    Ok(())
}

/// The report of the exact-tier case with the probe `fault` on an already loaded clean backend.
fn probe(manifest: &Manifest, s: &Suite, c: &Case, backend: &mut lockstep_engine::cpu::CpuBackend, model: &lockstep_engine::model::Model, fault: Fault) -> Result<CaseReport, String> {
    backend.fault = Some(fault);
    let rep = run_case(s, c, backend, None, model, manifest).map_err(|e| format!("{e:#}"));
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
        if test(mid.exp())? { hi = mid } else { lo = mid }
    }
    Ok(Some(hi.exp()))
}

fn sensitivity(manifest: &Manifest, suite_name: &str, case: &str) -> Result<String, Failed> {
    let (s, c) = find_case(suite_name, case)?;
    let entry = manifest.find(&c.golden).map_err(|e| e.to_string())?;
    let path = lockstep::validate::model_path(manifest, entry, &c).map_err(|e| format!("{e:#}"))?;
    let model = lockstep_engine::model::Model::open_path(path).map_err(|e| format!("{e:#}"))?;
    let mut b = lockstep_engine::cpu::CpuBackend::load(&model.file, Default::default()).map_err(|e| format!("{e:#}"))?;
    let clean = run_case(&s, &c, &mut b, None, &model, manifest).map_err(|e| format!("{e:#}"))?;
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
    let margin = worst.map_or(String::new(), |k| format!("clean run's closest tap check: {} = {:.2e} of {:.0e} ({})", k.name, k.value, k.limit, k.detail.clone().unwrap_or_default()));
    let mut show = |x: Option<f64>, v: f32, what: &str, mk: &dyn Fn(f64) -> Fault| -> Result<String, String> {
        Ok(match x {
            Some(f) => {
                let rep = probe(manifest, &s, &c, &mut b, &model, mk(f))?;
                format!("{what}: ×{f:.6} ({v:e} → {:.6e}, +{:.4} %; {})", v as f64 * f, (f - 1.0) * 100.0, caught_by(&rep))
            }
            None => format!("{what}: not detected even ×10"),
        })
    };
    let (e, r) = (show(e, eps, "RMSNorm epsilon", &eps_probe)?, show(r, base, "RoPE base", &base_probe)?);
    let (el, rl) = (show(el, eps, "RMSNorm epsilon", &eps_probe)?, show(rl, base, "RoPE base", &base_probe)?);
    Ok(format!(
        "{suite_name}::{case} (exact tier), smallest change that fails the case — {e}; {r}\n\
         smallest change localized where the class shows (norm-0.rms_norm.0 / Qcur-0.rope at the prefill) — {el}; {rl}\n\
         {margin}"
    ))
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
        for backend in ["cpu", "cuda"] {
            let (m, ff2, out) = (manifest.clone(), ff.clone(), outcomes.clone());
            let t = Trial::test(format!("fault::{}::{backend}", ff.fault), move || fault_trial(&m, &ff2, backend, &out));
            trials.push(match backend_available(backend) {
                Err(reason) => t.with_kind(format!("ignored: {reason}")).with_ignored_flag(true),
                Ok(()) => t,
            });
        }
    }
    for (s, c) in clean_cases {
        for backend in ["cpu", "cuda"] {
            let m = manifest.clone();
            let (s2, c2) = (s.clone(), c.clone());
            // Real models are slow on this project's 2-core CPU runner: there they get 2 repeats in
            // `cargo test` (20 on CUDA); LOCKSTEP_CLEAN_REPEATS=20 runs the full 20 anywhere.
            let repeats = match std::env::var("LOCKSTEP_CLEAN_REPEATS").ok().and_then(|v| v.parse().ok()) {
                Some(n) => n,
                None if s.starts_with("tiny") || backend == "cuda" => CLEAN_REPEATS,
                None => 2,
            };
            let t = Trial::test(format!("clean::{s}::{c}::{backend}"), move || clean_trial(&m, &s2, &c2, backend, repeats));
            trials.push(match backend_available(backend) {
                Err(reason) => t.with_kind(format!("ignored: {reason}")).with_ignored_flag(true),
                Ok(()) => t,
            });
        }
    }
    for (s, c) in [("tiny-qwen2", "exact-haiku")] {
        let m = manifest.clone();
        trials.push(Trial::test(format!("sensitivity::{s}::{c}"), move || {
            let line = sensitivity(&m, s, c)?;
            println!("  {line}");
            write_note(&format!("sensitivity_{s}_{c}.txt"), &line);
            Ok(())
        }));
    }
    let out = outcomes.clone();
    // Runs last (trials run in the order given on one thread): the score over the fault trials that ran.
    trials.push(Trial::test("score", move || score(&out)));
    libtest_mimic::run(&args, trials).exit();
}

fn write_note(name: &str, text: &str) {
    let dir = root().join("tests/snapshots");
    let _ = std::fs::create_dir_all(&dir);
    let _ = std::fs::write(dir.join(name), format!("{text}\n"));
}

fn score(out: &Shared) -> Result<(), Failed> {
    let o = out.lock().expect("no panics while held");
    if o.is_empty() {
        return Ok(()); // filtered out: nothing to score
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
        lines.push(format!("{backend}: mutation score {det}/{} detected, {loc}/{det} localized, {cls}/{det} class named", v.len()));
    }
    for l in &lines {
        println!("  {l}");
    }
    let json = serde_json::json!({"summary": lines, "trials": *o});
    write_note("faults_score.json", &serde_json::to_string_pretty(&json).unwrap_or_default());
    Ok(())
}
