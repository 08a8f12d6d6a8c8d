//! Every case × backend of suites/*.toml as a libtest-mimic trial named `{suite}::{case}::{backend}`,
//! filterable like any test and runnable under `cargo nextest` (`--partition` included). A backend
//! that cannot run here is reported ignored with the reason, never passed. Each case's summary is an
//! insta snapshot (tests/snapshots/), values rounded to their order of magnitude. After the trials, each
//! backend's report.html of the cases that ran (the default suite's page of `lockstep validate --backend
//! B`) must stay within `report::html::BUDGET_BYTES`; a page over it fails the run.

use libtest_mimic::{Arguments, Failed, Trial};
use lockstep::golden::{self, Manifest};
use lockstep::report::{self, CaseReport};
use lockstep::suite::{self, Case, Suite};
use lockstep::validate::{backend_available, Runner};
use lockstep::vocab::Backend;
use std::cell::RefCell;
use std::sync::{Arc, Mutex};

thread_local! {
    // Models and backends are loaded once per thread and reused by the trials that run on it.
    static RUNNER: RefCell<Runner> = RefCell::new(Runner::default());
}

/// Every case report of this run, for the report.html size budget.
static REPORTS: Mutex<Vec<CaseReport>> = Mutex::new(Vec::new());

fn main() {
    let mut args = Arguments::from_args();
    // One thread by default: a real model's f32 weights are loaded once and shared by its cases.
    args.test_threads.get_or_insert(1);
    let trials = match build() {
        Ok(t) => t,
        Err(e) => vec![Trial::test("suites::load", move || Err(Failed::from(e)))],
    };
    let conclusion = libtest_mimic::run(&args, trials);
    if let Err(e) = report_budget() {
        eprintln!("report.html budget: {e}");
        std::process::exit(101);
    }
    conclusion.exit();
}

/// report.html of each backend's cases that ran, rendered as `lockstep validate --backend B` writes it,
/// within the budget.
fn report_budget() -> Result<(), String> {
    let cases = std::mem::take(&mut *REPORTS.lock().unwrap_or_else(|e| e.into_inner()));
    let manifest = Manifest::load(&golden::default_dir()).map_err(|e| e.to_string())?;
    let budget = report::html::BUDGET_BYTES;
    let mut over = Vec::new();
    let mut backends: Vec<String> = cases.iter().map(|c| c.backend.clone()).collect();
    backends.sort();
    backends.dedup();
    for b in backends {
        let mine: Vec<CaseReport> = cases.iter().filter(|c| c.backend == b).cloned().collect();
        let n = mine.len();
        let provenance = report::Provenance::here(serde_json::Value::Object(manifest.provenance.clone()), lockstep::validate::gpu_name());
        let html = report::html::render(&report::Report::new(provenance, mine)).map_err(|e| e.to_string())?;
        println!("report.html of the {n} {b} cases that ran: {} bytes (budget {budget})", html.len());
        if html.len() > budget {
            over.push(format!("{b}: {} bytes for {n} cases", html.len()));
        }
    }
    if over.is_empty() {
        Ok(())
    } else {
        Err(format!("over the budget of {budget} bytes: {}", over.join("; ")))
    }
}

fn build() -> Result<Vec<Trial>, String> {
    let suites = suite::load_dir(&suite::default_dir()).map_err(|e| e.to_string())?;
    let manifest = Manifest::load(&golden::default_dir()).map(Arc::new).map_err(|e| e.to_string());
    let mut trials = Vec::new();
    for s in &suites {
        for c in &s.cases {
            for &b in &c.backends {
                let name = format!("{}::{}::{b}", s.name, c.name);
                // An on-demand golden needs the golden venv (or its entry already in the cache).
                let unavailable = backend_available(b).err().or_else(|| c.on_demand.as_ref().and_then(|r| lockstep::ondemand::availability(r).err()));
                let (s, c, m) = (s.clone(), c.clone(), manifest.clone());
                let t = Trial::test(name, move || run(&s, &c, b, m));
                trials.push(match unavailable {
                    Some(reason) => t.with_kind(format!("ignored: {reason}")).with_ignored_flag(true),
                    None => t,
                });
            }
        }
    }
    Ok(trials)
}

fn run(s: &Suite, c: &Case, b: Backend, manifest: Result<Arc<Manifest>, String>) -> Result<(), Failed> {
    let manifest = manifest.map_err(|e| Failed::from(format!("golden manifest: {e}")))?;
    let rep = RUNNER.with(|r| r.borrow_mut().run(&manifest, s, c, b));
    REPORTS.lock().unwrap_or_else(|e| e.into_inner()).push(rep.clone());
    if let Some(reason) = &rep.ignored_reason {
        // Ran out of what it needs at run time (no model): not a pass.
        return Err(Failed::from(format!("cannot run here: {reason}")));
    }
    if !rep.passed {
        return Err(Failed::from(explain(&rep)));
    }
    let mut settings = insta::Settings::clone_current();
    settings.set_snapshot_path(lockstep_engine::fetch::project_root().join("tests/snapshots"));
    settings.set_prepend_module_to_snapshot(false);
    settings.set_sort_maps(true);
    settings.set_omit_expression(true);
    let snap = rep.name.replace("::", "__");
    let summary = report::summary(&rep);
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| settings.bind(|| insta::assert_json_snapshot!(snap.as_str(), &summary))))
        .map_err(|_| Failed::from(format!("snapshot {snap} differs: review with `cargo insta review`")))
}

fn explain(rep: &CaseReport) -> String {
    let mut s = format!("{} failed ({:.1} s)\n", rep.name, rep.seconds);
    if let Some(e) = &rep.error {
        s += &format!("error: {e}\n");
    }
    if let Some(d) = &rep.first_divergence {
        s += &format!("first divergence: s{}/{}: {} = {:.3e} > {:.3e}\n", d.step, d.tap, d.metric, d.value, d.limit);
    }
    if let Some(l) = &rep.likely_class {
        s += &format!("likely class: {l} — {}\n", rep.evidence.clone().unwrap_or_default());
    }
    for k in rep.failed_checks() {
        s += &format!("  {}: {} = {:.3e} (limit {} {:.3e}) {}\n", k.name, k.metric, k.value, k.op, k.limit, k.detail.clone().unwrap_or_default());
    }
    s
}
