//! Reports: the data model, report.json, report.html, junit.xml and the terminal table.
//!
//! # report.json schema (version 1)
//! ```text
//! {
//!   "schema": 1,
//!   "passed": bool,                      // every case that ran passed (ignored cases do not count)
//!   "provenance": {
//!     "lockstep_version": str, "engine_version": str,
//!     "machine": {"hostname": str, "os": str, "arch": str, "cpus": int},
//!     "gpu": str | null,                 // GPU name, when a CUDA backend ran
//!     "golden": {...},                   // golden/manifest.json's top level (llama.cpp commit, versions)
//!     "started": str                     // RFC 3339 UTC
//!   },
//!   "cases": [{
//!     "name": str,                       // {suite}::{case}::{backend}
//!     "suite": str, "case": str,
//!     "model": str, "tier": "exact" | "shipped", "backend": "cpu" | "cuda" | "dump",
//!     "passed": bool,
//!     "ignored_reason": str | null,      // set when the case could not run here (no GPU, no model)
//!     "error": str | null,               // set when running it failed (bad input, engine error)
//!     "golden_entry": {...} | null,      // the manifest's record of the golden file (provenance)
//!     "first_divergence": null | {"step": int, "layer": int | null, "tap": str,
//!                                 "metric": str, "value": float | null, "limit": float},
//!     "upstream_passing": [{"key": str, "rel_l2": float}],
//!     "likely_class": str | null, "likely_class_id": str | null, "evidence": str | null,
//!     "class_proof": null | {"verdict": "confirmed" | "suspected", "hypothesis": str, "rel_l2": float,
//!                            "baseline": float, "tried": [[str, float]]},
//!     "checks": [{"name": str, "metric": str, "value": float | null, "limit": float | null,
//!                 "op": "<=" | ">=" | "==", "passed": bool, "reason": str?, "detail": str?}],
//!     "growth": {"<family.stage>": [[layer, max rel_l2], ...]},
//!     "isolated_layers": [{"layer": int, "rel_l2": float, "ratio": float, "worst_tap": str}],
//!     "attention": null | {"tap": str, "head": int, "rows": int, "cols": int,
//!                          "engine": [float], "golden": [float]},
//!     "diversity": null | {"distinct1": float, "distinct2": float, "longest_run": int,
//!                          "repeated_4gram": float, "mean_entropy": float | null},
//!     "coverage": null | {"golden_taps": int, "compared": int, "not_dumped": [str],  // dumps only
//!                         "unknown": [{"key": str, "nearest": str | null}], "ignored_steps": [int],
//!                         "logit_steps": int, "notes": [str], "not_checked": [str]},
//!     "pinned": null | {"why": str, "golden": str | null, "command": str, "unavailable": str | null,  // validate --pin
//!                       "passed": bool | null, "first_divergence": {...} | null, "likely_class": str | null,
//!                       "likely_class_id": str | null, "evidence": str | null, "class_proof": {...} | null,
//!                       "failed_checks": [str], "notes": [str], "seconds": float},
//!     "seconds": float
//!   }]
//! }
//! ```
//! Non-finite numbers (a missing tap's value, NaN) are written as null.

pub mod html;
pub mod junit;
pub mod table;

use crate::checks::diversity::Stats;
use crate::checks::isolated::LayerError;
use crate::checks::CheckResult;
use crate::localize::{BugClass, Divergence, Localization, Upstream};
use crate::vocab::{Check, Tier};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// One head's attention probabilities, engine and golden, `[rows, cols]` row-major.
#[derive(Debug, Clone, Serialize)]
pub struct Heatmap {
    pub tap: String,
    pub head: usize,
    pub rows: usize,
    pub cols: usize,
    pub engine: Vec<f32>,
    pub golden: Vec<f32>,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct CaseReport {
    pub name: String,
    pub suite: String,
    pub case: String,
    pub model: String,
    pub tier: Tier,
    /// `cpu`, `cuda` ([`crate::vocab::Backend`]) or `dump` (`lockstep compare`).
    pub backend: String,
    pub passed: bool,
    pub ignored_reason: Option<String>,
    pub error: Option<String>,
    pub golden_entry: Option<serde_json::Value>,
    pub first_divergence: Option<Divergence>,
    pub upstream_passing: Vec<Upstream>,
    pub likely_class: Option<String>,
    /// The class, written as its stable id (`rope`, `qkv_bias`, …; docs/bug-classes.md).
    pub likely_class_id: Option<BugClass>,
    pub evidence: Option<String>,
    /// The suspected bug re-applied to llama.cpp's own inputs: does it reproduce the engine's tensor?
    pub class_proof: Option<crate::probe::ClassProof>,
    pub checks: Vec<CheckResult>,
    pub growth: BTreeMap<String, Vec<(usize, f64)>>,
    pub isolated_layers: Vec<LayerError>,
    pub attention: Option<Heatmap>,
    pub diversity: Option<Stats>,
    /// What an outside engine's dump held against its golden (`lockstep compare` only).
    pub coverage: Option<crate::dump_check::Coverage>,
    /// `lockstep validate --pin`: the failing case judged again against a full-tap golden (src/pin.rs);
    /// null when not asked, the case passed, or its golden already holds every tap.
    pub pinned: Option<crate::pin::Pinned>,
    /// The arithmetic the backend ran (`Backend::kernel_path`): the prefill's, and the decode's where
    /// it differs (CUDA's shipped tier: TF32 GEMMs, int8-activation matvecs); null for a dump judged
    /// by `lockstep compare`.
    pub arithmetic: Option<String>,
    pub seconds: f64,
}

impl CaseReport {
    pub fn ignored(name: &str, suite: &str, case: &str, model: &str, tier: Tier, backend: &str, reason: &str) -> Self {
        CaseReport {
            name: name.into(),
            suite: suite.into(),
            case: case.into(),
            model: model.into(),
            tier,
            backend: backend.into(),
            ignored_reason: Some(reason.into()),
            ..Default::default()
        }
    }
    /// Sets the verdict from the checks (and any error); ignored cases stay not-passed.
    pub fn finish(&mut self) {
        self.passed = self.ignored_reason.is_none() && self.error.is_none() && !self.checks.is_empty() && self.checks.iter().all(|c| c.passed);
    }
    pub fn apply(&mut self, loc: Localization) {
        self.first_divergence = loc.first_divergence;
        self.upstream_passing = loc.upstream_passing;
        self.likely_class = loc.likely_class;
        self.likely_class_id = loc.likely_class_id;
        self.evidence = loc.evidence;
        self.growth = loc.growth;
    }
    pub fn failed_checks(&self) -> impl Iterator<Item = &CheckResult> {
        self.checks.iter().filter(|c| !c.passed)
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub hostname: String,
    pub os: String,
    pub arch: String,
    pub cpus: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct Provenance {
    pub lockstep_version: String,
    pub engine_version: String,
    pub machine: Machine,
    pub gpu: Option<String>,
    pub golden: serde_json::Value,
    pub started: String,
}

impl Provenance {
    pub fn here(golden: serde_json::Value, gpu: Option<String>) -> Self {
        let hostname = std::fs::read_to_string("/etc/hostname").map(|s| s.trim().to_string()).unwrap_or_else(|_| "unknown".into());
        Provenance {
            lockstep_version: env!("CARGO_PKG_VERSION").into(),
            engine_version: env!("CARGO_PKG_VERSION").into(),
            machine: Machine {
                hostname,
                os: std::env::consts::OS.into(),
                arch: std::env::consts::ARCH.into(),
                cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            },
            gpu,
            golden,
            started: rfc3339_now(),
        }
    }
}

/// UTC time as RFC 3339, from the system clock.
pub fn rfc3339_now() -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()) as i64;
    lockstep_engine::chat::strftime(secs, "%Y-%m-%dT%H:%M:%SZ")
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub schema: u32,
    pub passed: bool,
    pub provenance: Provenance,
    pub cases: Vec<CaseReport>,
}

impl Report {
    pub fn new(provenance: Provenance, cases: Vec<CaseReport>) -> Self {
        let passed = cases.iter().filter(|c| c.ignored_reason.is_none()).all(|c| c.passed);
        Report { schema: 1, passed, provenance, cases }
    }

    /// Writes report.json, report.html and junit.xml into `dir`; returns their paths.
    pub fn write(&self, dir: &Path) -> crate::error::Result<Vec<PathBuf>> {
        std::fs::create_dir_all(dir).map_err(|e| crate::error::Error::io(dir, e))?;
        let json = serde_json::to_string_pretty(self).map_err(|e| crate::error::Error::Other(e.to_string()))?;
        let html = html::render(self)?;
        let junit = junit::render(self);
        let mut out = Vec::new();
        for (name, body) in [("report.json", json), ("report.html", html), ("junit.xml", junit)] {
            let p = dir.join(name);
            std::fs::write(&p, body).map_err(|e| crate::error::Error::io(&p, e))?;
            out.push(p);
        }
        Ok(out)
    }
}

/// The snapshot form of a case: what was checked and the verdicts, values rounded to their order of
/// magnitude so it is stable across runs and machines (insta).
pub fn summary(c: &CaseReport) -> serde_json::Value {
    let checks: Vec<serde_json::Value> = c
        .checks
        .iter()
        .map(|k| {
            if k.check == Some(Check::Anticheat) {
                // The anti-cheat prompt changes every minute (and so does the text generated from it, its
                // diversity figures and the length the backends agree over): only what was checked is stable.
                serde_json::json!({"name": k.name, "metric": k.metric, "value": "[runtime]"})
            } else {
                serde_json::json!({"name": k.name, "metric": k.metric, "passed": k.passed, "value": magnitude(k.value), "limit": magnitude(k.limit)})
            }
        })
        .collect();
    serde_json::json!({
        "name": c.name, "model": c.model, "tier": c.tier, "backend": c.backend, "passed": c.passed,
        "ignored_reason": c.ignored_reason,
        "first_divergence": c.first_divergence.as_ref().map(|d| serde_json::json!({"step": d.step, "layer": d.layer, "tap": d.tap, "metric": d.metric})),
        "likely_class": c.likely_class,
        "checks": checks,
    })
}

/// `1.2e-6` → `"1e-6"`; 0 → `"0"`; integers up to 1e6 stay exact; non-finite → its name.
pub fn magnitude(v: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    if !v.is_finite() {
        return format!("{v}");
    }
    if v.fract() == 0.0 && v.abs() < 1e6 {
        return format!("{v}");
    }
    let e = v.abs().log10().floor() as i32;
    format!("{}1e{e}", if v < 0.0 { "-" } else { "" })
}

#[cfg(test)]
mod tests {
    #[test]
    fn magnitudes() {
        assert_eq!(super::magnitude(5.5e-6), "1e-6");
        assert_eq!(super::magnitude(0.0), "0");
        assert_eq!(super::magnitude(32.0), "32");
        assert_eq!(super::magnitude(0.95), "1e-1");
        assert_eq!(super::magnitude(f64::INFINITY), "inf");
        assert!(super::rfc3339_now().ends_with('Z'));
    }

    #[test]
    fn anticheat_values_stay_out_of_snapshots() {
        use crate::checks::{CheckResult, Op};
        let mut c = super::CaseReport::default();
        c.checks.push(CheckResult::new("anticheat:agree:cpu-cuda", "tokens agreeing before the first difference", 17.0, Op::Ge, 17.0));
        let s = super::summary(&c);
        assert_eq!(
            s["checks"][0],
            serde_json::json!({"name": "anticheat:agree:cpu-cuda", "metric": "tokens agreeing before the first difference", "value": "[runtime]"})
        );
    }
}
