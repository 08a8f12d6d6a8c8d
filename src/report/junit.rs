//! junit.xml: one testsuite per suite, one testcase per case; failures carry the failed checks.
//! Hand-written: the format is four elements, and no JUnit crate is in the dependency set.

use super::Report;
use std::collections::BTreeMap;
use std::fmt::Write;

fn esc(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            '&' => "&amp;".into(),
            '<' => "&lt;".into(),
            '>' => "&gt;".into(),
            '"' => "&quot;".into(),
            '\'' => "&apos;".into(),
            c if (c as u32) < 0x20 && !matches!(c, '\n' | '\t' | '\r') => " ".into(),
            c => c.to_string(),
        })
        .collect()
}

pub fn render(r: &Report) -> String {
    let mut suites: BTreeMap<&str, Vec<&super::CaseReport>> = BTreeMap::new();
    for c in &r.cases {
        suites.entry(c.suite.as_str()).or_default().push(c);
    }
    let mut x = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    let fails = r.cases.iter().filter(|c| c.ignored_reason.is_none() && !c.passed).count();
    let skipped = r.cases.iter().filter(|c| c.ignored_reason.is_some()).count();
    let _ = writeln!(x, "<testsuites name=\"lockstep\" tests=\"{}\" failures=\"{fails}\" skipped=\"{skipped}\">", r.cases.len());
    for (suite, cases) in suites {
        let f = cases.iter().filter(|c| c.ignored_reason.is_none() && !c.passed).count();
        let s = cases.iter().filter(|c| c.ignored_reason.is_some()).count();
        let t: f64 = cases.iter().map(|c| c.seconds).sum();
        let _ = writeln!(x, "  <testsuite name=\"{}\" tests=\"{}\" failures=\"{f}\" skipped=\"{s}\" time=\"{t:.3}\">", esc(suite), cases.len());
        for c in cases {
            let _ = write!(x, "    <testcase classname=\"{}\" name=\"{}\" time=\"{:.3}\"", esc(suite), esc(&c.name), c.seconds);
            if let Some(reason) = &c.ignored_reason {
                let _ = writeln!(x, ">\n      <skipped message=\"{}\"/>\n    </testcase>", esc(reason));
            } else if !c.passed {
                let mut msg = String::new();
                if let Some(e) = &c.error {
                    msg.push_str(e);
                }
                if let Some(d) = &c.first_divergence {
                    let _ = write!(msg, "first divergence: s{}/{} {} {:.3e} > {:.3e}. ", d.step, d.tap, d.metric, d.value, d.limit);
                }
                if let Some(cl) = &c.likely_class {
                    let _ = write!(msg, "likely: {cl}. ");
                }
                let body: Vec<String> = c
                    .failed_checks()
                    .map(|k| format!("{}: {} = {:.3e} (limit {} {:.3e}) {}", k.name, k.metric, k.value, k.op, k.limit, k.detail.clone().unwrap_or_default()))
                    .collect();
                let _ = writeln!(x, ">\n      <failure message=\"{}\">{}</failure>\n    </testcase>", esc(msg.trim()), esc(&body.join("\n")));
            } else {
                x.push_str("/>\n");
            }
        }
        x.push_str("  </testsuite>\n");
    }
    x.push_str("</testsuites>\n");
    x
}

#[cfg(test)]
mod tests {
    use super::super::{CaseReport, Provenance, Report};
    use crate::checks::{CheckResult, Op};
    use crate::localize::Divergence;

    /// A failure's message speaks the report's words (tap key, `<=`), never Rust's Debug text.
    #[test]
    fn failure_message_has_no_debug_text() {
        let d = Divergence { step: 0, layer: Some(0), tap: "kq_soft_max-0".into(), metric: "rel_l2".into(), value: 0.5, limit: 1e-5 };
        let mut c = CaseReport {
            name: "s::c::cpu".into(),
            suite: "s".into(),
            first_divergence: Some(d),
            likely_class: Some("causal mask missing".into()),
            ..Default::default()
        };
        c.checks.push(CheckResult::new("taps:kq_soft_max", "max rel_l2", 0.5, Op::Le, 1e-5));
        c.finish();
        let x = super::render(&Report::new(Provenance::here(serde_json::Value::Null, None), vec![c]));
        assert!(x.contains("first divergence: s0/kq_soft_max-0 rel_l2 5.000e-1 &gt; 1.000e-5") && x.contains("(limit &lt;= 1.000e-5)"), "{x}");
        for debug in ["Some(", "None", "Le ", "layer "] {
            assert!(!x.contains(debug), "{debug:?} in:\n{x}");
        }
    }
}
