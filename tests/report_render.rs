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
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run"])
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
    ] {
        assert!(dom.contains(needle), "rendered DOM lacks {needle:?}:\n{}", &dom[..dom.len().min(3000)]);
    }
    // No network and no scripts: one self-contained file.
    let src = std::fs::read_to_string(&html).unwrap();
    assert!(!src.contains("<script") && !src.contains("http://") || src.contains("http://www.w3.org/2000/svg"));
    assert!(!src.contains("https://"));
}
