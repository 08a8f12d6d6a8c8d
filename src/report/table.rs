//! The compact terminal table printed by `lockstep validate` and `lockstep compare`.

use super::Report;
use std::fmt::Write;

pub fn render(r: &Report) -> String {
    let w = r.cases.iter().map(|c| c.name.len()).max().unwrap_or(4).clamp(4, 60);
    let mut s = String::new();
    let _ = writeln!(s, "{:<w$}  {:<7}  {:>6}  first divergence / reason", "case", "verdict", "checks");
    for c in &r.cases {
        let verdict = if c.ignored_reason.is_some() { "ignored" } else if c.passed { "pass" } else { "FAIL" };
        let n_fail = c.failed_checks().count();
        let checks = format!("{}/{}", c.checks.len() - n_fail, c.checks.len());
        let tail = if let Some(r) = &c.ignored_reason {
            r.clone()
        } else if let Some(e) = &c.error {
            e.clone()
        } else if let Some(d) = &c.first_divergence {
            format!(
                "s{} {} {}={:.2e} > {:.0e}{}",
                d.step, d.tap, d.metric, d.value, d.limit,
                c.likely_class.as_ref().map_or(String::new(), |l| format!("  [{l}]"))
            )
        } else if let Some(k) = c.failed_checks().next() {
            format!("{}: {}={:.3e} limit {:.3e}", k.name, k.metric, k.value, k.limit)
        } else {
            String::new()
        };
        let name: String = if c.name.len() > w { format!("…{}", &c.name[c.name.len() - w + 1..]) } else { c.name.clone() };
        let _ = writeln!(s, "{name:<w$}  {verdict:<7}  {checks:>6}  {tail}");
    }
    let ran = r.cases.iter().filter(|c| c.ignored_reason.is_none()).count();
    let passed = r.cases.iter().filter(|c| c.passed).count();
    let _ = writeln!(s, "{passed}/{ran} cases passed, {} ignored: {}", r.cases.len() - ran, if r.passed { "PASS" } else { "FAIL" });
    s
}
