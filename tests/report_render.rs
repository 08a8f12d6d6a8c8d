//! The HTML report renders in headless Chromium with its key content: a synthetic golden, a perturbed
//! dump, `compare_dump`, Report::write, then Chromium's --dump-dom of the page.

use lockstep::compare::compare_dump;
use lockstep::golden::Manifest;
use lockstep::report::{Provenance, Report};
use lockstep::synth;
use std::process::Command;

fn chromium() -> Option<&'static str> {
    ["/usr/bin/chromium", "/usr/bin/chromium-browser"].into_iter().find(|p| std::path::Path::new(p).exists())
}

#[test]
fn report_html_renders_in_headless_chromium() {
    let dir = tempfile::tempdir().unwrap();
    let golden = synth::write_golden(dir.path()).unwrap();
    let manifest = Manifest::load(dir.path()).unwrap();
    let dump = dir.path().join("dump.safetensors");
    // kq_soft_max of layer 0 broken for head 1 at the prefill.
    synth::rewrite(&golden, &dump, |k, s, d| {
        if k == "s0/kq_soft_max-0" {
            let n = s[2] * s[3];
            d[n..2 * n].iter_mut().for_each(|v| *v = 1.0 - *v);
        }
    })
    .unwrap();
    let case = compare_dump(&manifest, &dump, "synthetic/exact/fox", None).unwrap();
    let clean = compare_dump(&manifest, &golden, "synthetic/exact/fox", None).unwrap();
    let rep = Report::new(Provenance::here(serde_json::json!({"llama_cpp_python": "synthetic"}), None), vec![case, clean]);
    let out = dir.path().join("report");
    rep.write(&out).unwrap();
    let html = out.join("report.html");
    assert!(out.join("report.json").exists() && out.join("junit.xml").exists());

    let Some(bin) = chromium() else { panic!("install chromium (.ci/run does): no /usr/bin/chromium") };
    let profile = tempfile::tempdir().unwrap();
    let dom = Command::new(bin)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg("--dump-dom")
        .arg(format!("file://{}", html.display()))
        .output()
        .expect("running chromium");
    let dom = String::from_utf8_lossy(&dom.stdout);
    for needle in [
        "lockstep report",
        "id=\"verdict\" class=\"fail\">FAIL",
        "First divergence",
        "<code>kq_soft_max-0</code>",
        "softmax scale, mask or softmax",
        "Error versus layer",
        "aria-label=\"error versus layer\"",
        "aria-label=\"attention heatmap\"",
        "Attention: <code>s0/kq_soft_max-0</code>, head 1",
        "Provenance",
        "compare::synthetic/exact/fox::dump",
        // each limit links to its reason, listed once after the cases
        "href=\"#reason-1\"",
        "<li id=\"reason-1\">",
        // the failing case's difference panel carries every cell's values; the clean case's engine panel
        // is its golden panel, drawn once and used again
        "row 0 col 0: golden",
        "<use href=\"#h1p0\"",
        "Golden entries",
    ] {
        assert!(dom.contains(needle), "rendered DOM lacks {needle:?}:\n{}", &dom[..dom.len().min(3000)]);
    }
    // No network and no scripts: one self-contained file, as written and as Chromium parsed it.
    let src = std::fs::read_to_string(&html).unwrap();
    let problems: Vec<String> =
        not_self_contained(&src).into_iter().chain(not_self_contained(&dom).into_iter().map(|p| format!("rendered DOM: {p}"))).collect();
    assert!(problems.is_empty(), "report.html is not one self-contained, script-free file:\n{}", problems.join("\n"));
}

/// What keeps an HTML page from being one self-contained, script-free file: script elements, event
/// handlers and `javascript:` URLs; anything fetched (external URLs, `src`, `<link>`, CSS `url()` or
/// `@import`, links that leave the page). The SVG namespace (`xmlns="http://www.w3.org/2000/svg"`)
/// is a name, never fetched, and the only URL allowed.
fn not_self_contained(html: &str) -> Vec<String> {
    let lower = html.to_ascii_lowercase().replace("xmlns=\"http://www.w3.org/2000/svg\"", "");
    let mut problems = Vec::new();
    for needle in ["<script", "javascript:", "http://", "https://", "<link", "<iframe", "<object", "<embed", "<img", " src=", "url(", "@import"] {
        if let Some(at) = lower.find(needle) {
            problems.push(format!("{needle:?} at byte {at}: …{}…", &lower[at.saturating_sub(60)..(at + 60).min(lower.len())]));
        }
    }
    // Event handler attributes (onload=, onclick=, …): ` on` + letters + `=` inside a tag.
    let b = lower.as_bytes();
    for (at, _) in lower.match_indices(" on") {
        let name_end = at + 3 + b[at + 3..].iter().take_while(|c| c.is_ascii_lowercase()).count();
        let in_tag = lower[..at].rfind('<') > lower[..at].rfind('>');
        if name_end > at + 3 && b.get(name_end) == Some(&b'=') && in_tag {
            problems.push(format!("event handler {:?} at byte {at}", &lower[at + 1..name_end]));
        }
    }
    // Links stay inside the page.
    for (at, _) in lower.match_indices("href=\"") {
        if !lower[at + 6..].starts_with('#') {
            problems.push(format!("link leaving the page at byte {at}: {}", &lower[at..(at + 60).min(lower.len())]));
        }
    }
    problems
}

#[test]
fn self_contained_check_catches_scripts_and_fetches() {
    let ok = r##"<html><body><a href="#case-0">x</a> one <svg xmlns="http://www.w3.org/2000/svg"><text>on=1</text></svg></body></html>"##;
    assert_eq!(not_self_contained(ok), Vec::<String>::new());
    for bad in [
        "<html><script>alert(1)</script></html>",
        r#"<html><body onload="f()">x</body></html>"#,
        r#"<html><a href="https://example.com">x</a></html>"#,
        r#"<html><a href="report.json">x</a></html>"#,
        r#"<html><img src="plot.png"></html>"#,
        r#"<html><style>body { background: url(x.png) }</style></html>"#,
        r##"<html><link rel="stylesheet" href="#x"></html>"##,
        r#"<svg xmlns="http://www.w3.org/2000/svg"><a href="javascript:f()">x</a></svg>"#,
    ] {
        assert!(!not_self_contained(bad).is_empty(), "not caught: {bad}");
    }
}
