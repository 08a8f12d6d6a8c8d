//! The compact terminal table printed by `lockstep validate` and `lockstep compare`.

use super::Report;
use std::fmt::Write;

pub fn render(r: &Report) -> String {
    let w = r.cases.iter().map(|c| c.name.len()).max().unwrap_or(4).clamp(4, 60);
    let mut s = String::new();
    let _ = writeln!(s, "{:<w$}  {:<7}  {:>6}  first divergence / reason", "case", "verdict", "checks");
    for c in &r.cases {
        let verdict = if c.ignored_reason.is_some() {
            "ignored"
        } else if c.passed {
            "pass"
        } else {
            "FAIL"
        };
        let n_fail = c.failed_checks().count();
        let checks = format!("{}/{}", c.checks.len() - n_fail, c.checks.len());
        let tail = if let Some(r) = &c.ignored_reason {
            r.clone()
        } else if let Some(e) = &c.error {
            e.clone()
        } else if let Some(d) = &c.first_divergence {
            format!(
                "s{} {} {}{}",
                d.step,
                d.tap,
                divergence_value(&d.metric, d.value, d.limit),
                c.likely_class.as_ref().map_or(String::new(), |l| format!("  [{l}]"))
            )
        } else if let Some(k) = c.failed_checks().next() {
            format!("{}: {}={} limit {:.3e}", k.name, k.metric, num(k.value), k.limit)
        } else {
            String::new()
        };
        let tail = match not_checked(c) {
            Some(n) if tail.is_empty() => n,
            Some(n) => format!("{tail}; {n}"),
            None => tail,
        };
        let name: String = if c.name.len() > w { format!("…{}", &c.name[c.name.len() - w + 1..]) } else { c.name.clone() };
        let _ = writeln!(s, "{name:<w$}  {verdict:<7}  {checks:>6}  {tail}");
        // `validate --pin`: the same case against a full-tap golden, under its row (its verdict unchanged).
        if let Some(p) = &c.pinned {
            let _ = writeln!(s, "{:<w$}  {:<7}  {:>6}  ↳ {}", "", "", "", p.line());
        }
    }
    let ran = r.cases.iter().filter(|c| c.ignored_reason.is_none()).count();
    let passed = r.cases.iter().filter(|c| c.passed).count();
    let mut unchecked: Vec<&str> = r.cases.iter().filter_map(|c| c.coverage.as_ref()).flat_map(|k| k.not_checked.iter().map(String::as_str)).collect();
    unchecked.sort_unstable();
    unchecked.dedup();
    let unchecked = if unchecked.is_empty() { String::new() } else { format!(" ({} not checked)", unchecked.join(", ")) };
    let _ = writeln!(s, "{passed}/{ran} cases passed, {} ignored: {}{unchecked}", r.cases.len() - ran, if r.passed { "PASS" } else { "FAIL" });
    s
}

/// `rel_l2=2.31e-3 > 1e-5`; a divergence without a value says why (`not dumped`, `wrong shape`), never NaN.
fn divergence_value(metric: &str, value: f64, limit: f64) -> String {
    match metric {
        _ if value.is_finite() => format!("{metric}={value:.2e} > {limit:.0e}"),
        "missing" => "not dumped".into(),
        "shape" => "wrong shape".into(),
        _ => format!("{metric}={}", num(value)),
    }
}

/// A check value: scientific, or `non-finite` (never `NaN`).
fn num(v: f64) -> String {
    if v.is_finite() {
        format!("{v:.3e}")
    } else if v.is_nan() {
        "non-finite".into()
    } else {
        format!("{v}")
    }
}

/// `tokens not checked` for a dump whose coverage lists checks that could not run.
fn not_checked(c: &super::CaseReport) -> Option<String> {
    let k = c.coverage.as_ref()?;
    (!k.not_checked.is_empty()).then(|| format!("{} not checked", k.not_checked.join(", ")))
}

#[cfg(test)]
mod tests {
    use super::super::{CaseReport, Provenance, Report};
    use crate::dump_check::Coverage;
    use crate::localize::Divergence;

    #[test]
    fn pinned_divergence_under_its_case() {
        let d = Divergence { step: 0, layer: Some(4), tap: "norm-4.rms_norm.0".into(), metric: "rel_l2".into(), value: 0.31, limit: 1.3e-5 };
        let pinned = crate::pin::Pinned {
            golden: Some("cache:25211e9a2dbc8b3dcf157586".into()),
            first_divergence: Some(d),
            likely_class: Some("RMSNorm".into()),
            passed: Some(false),
            ..Default::default()
        };
        let a = CaseReport { name: "q::multiturn::cpu".into(), pinned: Some(pinned), ..Default::default() };
        let b = CaseReport {
            name: "q::code::cpu".into(),
            pinned: Some(crate::pin::Pinned { unavailable: Some("the golden venv is not built".into()), ..Default::default() }),
            ..Default::default()
        };
        let t = super::render(&Report::new(Provenance::here(serde_json::Value::Null, None), vec![a, b]));
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[1].starts_with("q::multiturn::cpu") && lines[1].contains("FAIL"), "{t}");
        assert!(lines[2].contains("↳ pinned (cache:25211e9a…): s0 norm-4.rms_norm.0 rel_l2=3.10e-1 > 1e-5  [RMSNorm]"), "{t}");
        assert!(lines[4].contains("↳ not pinned: the golden venv is not built"), "{t}");
    }

    #[test]
    fn no_nan_in_the_table_and_unchecked_checks_said() {
        let d = |metric: &str| Divergence { step: 0, layer: Some(0), tap: "kq-0".into(), metric: metric.into(), value: f64::NAN, limit: 1e-5 };
        let mut a = CaseReport { name: "a".into(), first_divergence: Some(d("missing")), ..Default::default() };
        a.finish();
        let b = CaseReport { name: "b".into(), first_divergence: Some(d("shape")), ..Default::default() };
        let mut c =
            CaseReport { name: "c".into(), coverage: Some(Coverage { not_checked: vec!["tokens".into()], ..Default::default() }), ..Default::default() };
        c.checks.push(crate::checks::CheckResult::new("taps:embd", "max rel_l2", 0.0, crate::checks::Op::Le, 1e-5));
        c.finish();
        let r = Report::new(Provenance::here(serde_json::Value::Null, None), vec![a, b, c]);
        let t = super::render(&r);
        assert!(!t.contains("NaN"), "{t}");
        assert!(t.contains("s0 kq-0 not dumped") && t.contains("s0 kq-0 wrong shape"), "{t}");
        assert!(t.lines().any(|l| l.starts_with("c ") && l.contains("pass") && l.contains("tokens not checked")), "{t}");
        assert!(t.trim_end().ends_with("FAIL (tokens not checked)"), "{t}");
    }
}
