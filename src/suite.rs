//! Suites: TOML files under suites/, one case per golden prompt and tier. Adding a case is adding a
//! table to a file, never code.
//!
//! ```toml
//! suite = "tiny-qwen2"              # optional: defaults to the file stem
//! model = "tiny-qwen2"              # a known model id, a golden/models/… path, or any GGUF path
//! backends = ["cpu", "cuda"]        # default for the cases
//! checks = ["tokens", "taps", "logits", "invariants", "kv_cache", "isolated", "diversity", "sampler", "dequant"]
//!
//! [[tolerance]]                     # applies to every case (or only those of `tier`)
//! tier = "exact"
//! key = "taps.rel_l2"               # check.metric, or check.metric:family (taps.rel_l2:kq_soft_max)
//! limit = 1e-5
//! reason = "measured ≤5.5e-6 on qwen"   # required: why this number
//!
//! [[case]]
//! name = "exact-haiku"
//! tier = "exact"
//! golden = "tiny-qwen2/exact/haiku"   # a manifest entry: model/tier/prompt_id or its path
//! steps = 2                           # decode steps compared (default: all the golden holds)
//! # backends, checks, [[case.tolerance]] may override the file's defaults
//!
//! [[case]]                            # an on-demand golden instead of a committed file: exported by
//! name = "exact-ondemand"             # llama.cpp into the cache when missing (src/ondemand.rs)
//! tier = "exact"
//! golden = { prompt = "Once upon a time", steps = 5, taps = "all" }
//! # also: model (default: the case's), chat = [{ role = "user", content = "…" }] instead of prompt,
//! # tier (must be the case's); steps counts the prefill (default 5), taps is "all" or "FAM,FAM…"
//! ```

use crate::checks::Tolerances;
use crate::error::{Error, Result};
use crate::vocab::{Backend, Check, Tier};
use serde::Deserialize;
use std::path::{Path, PathBuf};
use toml::Spanned;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct TolToml {
    #[serde(default)]
    tier: Option<Tier>,
    /// Only for this backend (a backend-specific limit overrides the shared one).
    #[serde(default)]
    backend: Option<Backend>,
    key: String,
    limit: f64,
    reason: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct CaseToml {
    name: String,
    tier: Tier,
    /// A manifest entry's name (a string) or an on-demand golden (a table, [`OnDemandToml`]).
    golden: toml::Value,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    steps: Option<usize>,
    #[serde(default)]
    backends: Option<Vec<Backend>>,
    #[serde(default)]
    checks: Option<Vec<Check>>,
    #[serde(default)]
    tolerance: Vec<Spanned<TolToml>>,
}

/// `golden = { … }`: an on-demand golden (src/ondemand.rs).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct OnDemandToml {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    prompt: Option<String>,
    #[serde(default)]
    chat: Option<Vec<crate::ondemand::Message>>,
    #[serde(default)]
    tier: Option<Tier>,
    #[serde(default)]
    steps: Option<usize>,
    #[serde(default)]
    taps: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct SuiteToml {
    #[serde(default)]
    suite: Option<String>,
    model: String,
    #[serde(default)]
    backends: Option<Spanned<Vec<Backend>>>,
    #[serde(default)]
    checks: Option<Spanned<Vec<Check>>>,
    #[serde(default)]
    tolerance: Vec<Spanned<TolToml>>,
    #[serde(default)]
    case: Vec<Spanned<CaseToml>>,
}

/// One case, with the suite's defaults applied.
#[derive(Debug, Clone)]
pub struct Case {
    pub name: String,
    pub model: String,
    pub tier: Tier,
    /// The golden entry (`model/tier/prompt_id` or a path); for an on-demand case, a description of
    /// the request until the runner has the entry (`on_demand`).
    pub golden: String,
    /// The on-demand golden this case is judged against, created by the runner when missing.
    pub on_demand: Option<crate::ondemand::Request>,
    pub steps: Option<usize>,
    pub backends: Vec<Backend>,
    pub checks: Vec<Check>,
    /// The limits for each backend of `backends` (shared limits, then that backend's own).
    pub tolerances: std::collections::BTreeMap<Backend, Tolerances>,
    /// `file:line` of the case, for messages.
    pub location: String,
}

impl Case {
    /// The limits that hold for `backend`.
    pub fn tolerances_for(&self, backend: impl std::borrow::Borrow<Backend>) -> Option<&Tolerances> {
        self.tolerances.get(backend.borrow())
    }

    pub fn wants(&self, check: Check) -> bool {
        self.checks.contains(&check)
    }
}

#[derive(Debug, Clone)]
pub struct Suite {
    pub name: String,
    pub path: PathBuf,
    pub cases: Vec<Case>,
}

/// (line, column), 1-based, of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

impl Suite {
    pub fn load(path: &Path) -> Result<Suite> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::parse(path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<Suite> {
        let err = |offset: usize, message: String| {
            let (line, column) = line_col(text, offset);
            Error::Suite { path: path.to_path_buf(), line, column, message }
        };
        let raw: SuiteToml = toml::from_str(text).map_err(|e| err(e.span().map_or(0, |s| s.start), e.message().trim().to_string()))?;
        let name = raw.suite.clone().unwrap_or_else(|| path.file_stem().map_or("suite".into(), |s| s.to_string_lossy().into_owned()));
        // Names are checked by serde (`unknown variant`, at the value); graph_decode is a check's result,
        // not something to ask for.
        let check_list = |list: &[Check], at: usize| -> Result<()> {
            match list.iter().find(|c| !Check::SUITE.contains(c)) {
                Some(c) => Err(err(at, format!("check {c:?} is not asked for: it runs on CUDA whenever taps are checked", c = c.name()))),
                None => Ok(()),
            }
        };
        let tol_ok = |t: &Spanned<TolToml>| -> Result<()> {
            let v = t.get_ref();
            if v.reason.trim().is_empty() {
                return Err(err(t.span().start, format!("tolerance {:?}: `reason` must say why this limit (a measurement)", v.key)));
            }
            if !v.limit.is_finite() || v.limit < 0.0 {
                return Err(err(t.span().start, format!("tolerance {:?}: limit must be a finite number ≥ 0", v.key)));
            }
            Ok(())
        };
        for t in &raw.tolerance {
            tol_ok(t)?;
        }
        let default_backends = raw.backends.as_ref().map_or_else(|| Backend::ALL.to_vec(), |b| b.get_ref().clone());
        let default_checks = raw.checks.as_ref().map_or_else(Check::suite_default, |c| c.get_ref().clone());
        check_list(&default_checks, raw.checks.as_ref().map_or(0, |c| c.span().start))?;
        let mut cases = Vec::new();
        for sc in &raw.case {
            let at = sc.span().start;
            let c = sc.get_ref();
            if cases.iter().any(|o: &Case| o.name == c.name) {
                return Err(err(at, format!("case {:?} is defined twice", c.name)));
            }
            let checks = c.checks.clone().unwrap_or_else(|| default_checks.clone());
            check_list(&checks, at)?;
            let backends = c.backends.clone().unwrap_or_else(|| default_backends.clone());
            for t in &c.tolerance {
                tol_ok(t)?;
            }
            let mut tolerances = std::collections::BTreeMap::new();
            for &b in &backends {
                let mut tol = Tolerances::new(c.tier);
                // Shared limits first, then the backend's own, each in file order (case after file).
                for backend_specific in [false, true] {
                    for t in raw.tolerance.iter().chain(&c.tolerance).map(|t| t.get_ref()) {
                        if t.backend.is_some() == backend_specific && t.backend.is_none_or(|x| x == b) && t.tier.is_none_or(|x| x == c.tier) {
                            tol.set(&t.key, t.limit, &t.reason);
                        }
                    }
                }
                tolerances.insert(b, tol);
            }
            let (line, _) = line_col(text, at);
            let model = c.model.clone().unwrap_or_else(|| raw.model.clone());
            let (golden, on_demand) = match &c.golden {
                toml::Value::String(g) => (g.clone(), None),
                toml::Value::Table(_) => {
                    let req = on_demand_request(&c.golden, &model, c.tier).map_err(|m| err(at, format!("case {:?}: golden: {m}", c.name)))?;
                    (format!("on demand: {}", req.describe()), Some(req))
                }
                other => {
                    return Err(err(
                        at,
                        format!("case {:?}: golden must be an entry name (a string) or an on-demand golden (a table), not {}", c.name, other.type_str()),
                    ))
                }
            };
            cases.push(Case {
                name: c.name.clone(),
                model,
                tier: c.tier,
                golden,
                on_demand,
                steps: c.steps,
                backends,
                checks,
                tolerances,
                location: format!("{}:{line}", path.display()),
            });
        }
        if cases.is_empty() {
            return Err(err(0, "no [[case]] in this suite".into()));
        }
        Ok(Suite { name, path: path.to_path_buf(), cases })
    }
}

/// A case's `golden = { … }` table as a request for one tier, the case's.
fn on_demand_request(value: &toml::Value, case_model: &str, case_tier: Tier) -> std::result::Result<crate::ondemand::Request, String> {
    use crate::ondemand::{PromptSpec, Request, Taps, DEFAULT_STEPS};
    let t: OnDemandToml = value.clone().try_into().map_err(|e: toml::de::Error| e.message().trim().to_string())?;
    let prompt = match (t.prompt, t.chat) {
        (Some(p), None) => PromptSpec::Text(p),
        (None, Some(m)) if !m.is_empty() => PromptSpec::Chat(m),
        (None, Some(_)) => return Err("chat has no messages".into()),
        _ => return Err("give exactly one of `prompt` (a text) and `chat` (a list of { role, content })".into()),
    };
    if let Some(tier) = t.tier.filter(|&x| x != case_tier) {
        return Err(format!("tier \"{tier}\" differs from the case's tier \"{case_tier}\""));
    }
    let steps = t.steps.unwrap_or(DEFAULT_STEPS);
    if steps == 0 {
        return Err("steps must be at least 1 (the prefill)".into());
    }
    let taps = Taps::parse(t.taps.as_deref().unwrap_or("all")).map_err(|e| e.to_string())?;
    Ok(Request { model: t.model.unwrap_or_else(|| case_model.to_string()), prompt, tiers: vec![case_tier.name().to_string()], steps, taps })
}

/// The default suites directory: `$LOCKSTEP_SUITES` (the CLI's `--suites DIR`), else `suites/` of the
/// checkout found from the current directory upward (`lockstep_engine::fetch::project_root`).
pub fn default_dir() -> PathBuf {
    match std::env::var_os("LOCKSTEP_SUITES") {
        Some(d) => PathBuf::from(d),
        None => lockstep_engine::fetch::project_root().join("suites"),
    }
}

/// Every `*.toml` of a directory, sorted by name.
pub fn load_dir(dir: &Path) -> Result<Vec<Suite>> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    paths.sort();
    paths.iter().map(|p| Suite::load(p)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
model = "tiny-qwen2"
backends = ["cpu"]

[[tolerance]]
tier = "exact"
key = "taps.rel_l2"
limit = 1e-5
reason = "measured"

[[case]]
name = "exact-fox"
tier = "exact"
golden = "tiny-qwen2/exact/fox"
steps = 2

[[case.tolerance]]
key = "taps.rel_l2:kq_soft_max"
limit = 2e-5
reason = "softmax rounding, measured 1.1e-5"
"#;

    #[test]
    fn a_backend_limit_overrides_the_shared_one_for_that_backend_only() {
        let text = GOOD.replace("backends = [\"cpu\"]", "backends = [\"cpu\", \"cuda\"]")
            + "\n[[case.tolerance]]\nbackend = \"cuda\"\nkey = \"taps.rel_l2:kq_soft_max\"\nlimit = 5e-5\nreason = \"measured\"\n";
        // The cuda-only limit holds for cuda; cpu keeps the shared one.
        let s = Suite::parse(Path::new("suites/x.toml"), &text).unwrap();
        let c = &s.cases[0];
        assert_eq!(c.tolerances_for(Backend::Cuda).unwrap().get("taps.rel_l2:kq_soft_max").value, 5e-5);
        assert_eq!(c.tolerances_for(Backend::Cpu).unwrap().get("taps.rel_l2:kq_soft_max").value, 2e-5);
        let bad = text.replace("backend = \"cuda\"", "backend = \"tpu\"");
        let e = Suite::parse(Path::new("suites/x.toml"), &bad).unwrap_err().to_string();
        assert!(e.contains("unknown variant `tpu`, expected `cpu` or `cuda`"), "{e}");
    }

    #[test]
    fn parses_a_suite() {
        let s = Suite::parse(Path::new("suites/x.toml"), GOOD).unwrap();
        assert_eq!(s.name, "x");
        let c = &s.cases[0];
        assert_eq!((c.model.as_str(), c.backends.as_slice(), c.steps), ("tiny-qwen2", &[Backend::Cpu][..], Some(2)));
        let tol = c.tolerances_for(Backend::Cpu).unwrap();
        assert_eq!(tol.get("taps.rel_l2:kq_soft_max").value, 2e-5);
        assert_eq!(tol.get("taps.rel_l2:kq").reason, "measured");
        assert!(c.tolerances_for(Backend::Cuda).is_none(), "cuda is not among the case's backends");
        assert!(c.wants(Check::Taps) && !c.wants(Check::Anticheat));
        assert_eq!(c.location, "suites/x.toml:11");
    }

    #[test]
    fn an_on_demand_golden_is_a_table() {
        let text = GOOD.replace("golden = \"tiny-qwen2/exact/fox\"", "golden = { prompt = \"Once upon a time\", taps = \"l_out, kq_soft_max\" }");
        let s = Suite::parse(Path::new("suites/x.toml"), &text).unwrap();
        let r = s.cases[0].on_demand.as_ref().unwrap();
        assert_eq!((r.model.as_str(), r.tiers.as_slice(), r.steps), ("tiny-qwen2", &["exact".to_string()][..], crate::ondemand::DEFAULT_STEPS));
        assert_eq!(r.prompt, crate::ondemand::PromptSpec::Text("Once upon a time".into()));
        assert_eq!(r.taps.arg(), "kq_soft_max,l_out");
        let chat = GOOD.replace(
            "golden = \"tiny-qwen2/exact/fox\"",
            "golden = { model = \"tiny-llama\", chat = [{ role = \"user\", content = \"hi\" }], tier = \"exact\", steps = 2 }",
        );
        let r = Suite::parse(Path::new("suites/x.toml"), &chat).unwrap().cases[0].on_demand.clone().unwrap();
        assert_eq!((r.model.as_str(), r.steps), ("tiny-llama", 2));
        assert!(s.cases[0].golden.starts_with("on demand: tiny-qwen2 exact"), "{}", s.cases[0].golden);
        for (bad, needle) in [
            ("golden = { prompt = \"a\", chat = [] }", "exactly one of"),
            ("golden = { }", "exactly one of"),
            ("golden = { prompt = \"a\", tier = \"shipped\" }", "differs from the case's tier"),
            ("golden = { prompt = \"a\", steps = 0 }", "at least 1"),
            ("golden = { prompt = \"a\", colour = 3 }", "unknown field"),
            ("golden = { prompt = \"a\", taps = \"l_out-3\" }", "not a tap family"),
            ("golden = 3", "entry name (a string) or an on-demand golden"),
        ] {
            let e = Suite::parse(Path::new("suites/x.toml"), &GOOD.replace("golden = \"tiny-qwen2/exact/fox\"", bad)).unwrap_err();
            let Error::Suite { line, message, .. } = &e else { panic!("{e}") };
            assert_eq!(*line, 11, "{e}");
            assert!(message.contains(needle), "{bad}: {e}");
        }
    }

    #[test]
    fn malformed_suites_name_file_and_line() {
        let cases = [
            (GOOD.replace("steps = 2", "steps = \"two\""), 15, "invalid type"),
            (GOOD.replace("golden = \"tiny-qwen2/exact/fox\"", "golden = \"tiny-qwen2/exact/fox\"\ncolour = 3"), 15, "unknown field"),
            (GOOD.replace("reason = \"measured\"", "reason = \"\""), 5, "reason"),
            (GOOD.replace("tier = \"exact\"\ngolden", "tier = \"exactish\"\ngolden"), 13, "unknown variant `exactish`, expected `exact` or `shipped`"),
            (GOOD.replace("backends = [\"cpu\"]", "backends = [\"tpu\"]"), 3, "unknown variant `tpu`, expected `cpu` or `cuda`"),
            (GOOD.replace("backends = [\"cpu\"]", "backends = [\"cpu\"]\nchecks = [\"taps\", \"graph_decode\"]"), 4, "not asked for"),
            (GOOD.replace("backends = [\"cpu\"]", "backends = [\"cpu\"]\nchecks = [\"tapz\"]"), 4, "unknown variant `tapz`"),
            (GOOD.replace("[[case]]", "[[case]"), 11, ""),
        ];
        for (text, line, needle) in cases {
            let e = Suite::parse(Path::new("suites/x.toml"), &text).unwrap_err();
            let Error::Suite { path, line: l, message, .. } = &e else { panic!("{e}") };
            assert_eq!(path, Path::new("suites/x.toml"));
            assert_eq!(*l, line, "{e}");
            assert!(message.contains(needle), "{e}");
        }
    }
}
