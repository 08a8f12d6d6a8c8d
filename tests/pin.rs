//! `lockstep validate --pin` and `lockstep compare`'s pin command, end to end through the CLI (src/pin.rs).
//!
//! - `qwen_multiturn_f16_accumulation`: the f16-accumulation fault (RMSNorm's Σx² saturating at 65504)
//!   injected into our CPU engine on qwen2.5-coder-0.5b's committed multiturn golden, which holds layer 0
//!   and the tensors after the last layer only: the case's own first divergence lies outside layer 0
//!   (the final `norm`), with a capture gap. `--pin` must name the first RMSNorm whose input row has
//!   Σx² > 65504, found here from the full-tap golden's own tensors (so from the fault's definition, not
//!   from the localizer), and keep the case's verdict and first divergence. Uses the real cache (the model,
//!   its F32 copy; the full-tap entry is exported once, ~45 s, then cached).
//! - `tiny_on_demand_l_out_only_gelu`: a suite case naming an on-demand golden with `taps = "l_out"` on
//!   tiny-qwen2, the gelu-activation fault injected: the case diverges at `l_out-0`; pinned, at
//!   `ffn_swiglu-0` (the activation's own output: its inputs ffn_gate/ffn_up are untouched by the fault)
//!   with class `activation`. Fresh cache.
//! - `without_the_golden_venv_each_case_says_so`: a committed-style golden reduced to layer 0, no golden
//!   venv and an empty cache: the run completes (exit 1 for the failing case, not an error), the case keeps
//!   its verdict, and its `pinned` says why it could not be pinned and gives the `lockstep golden` command.
//! - `compare_prints_the_pin_command`: a dump judged against that reduced golden whose first divergence
//!   (the final `norm`) has none of its inputs in the golden: compare prints the exact `lockstep golden`
//!   command for the entry.
//!
//! The first two need the golden venv (`$LOCKSTEP_CACHE/venv`, ci/golden/venv.sh) and are reported ignored
//! with the reason without it (LOCKSTEP_ONDEMAND_BUILD=1 lets them build it, ~5 minutes); the qwen one
//! also needs qwen2.5-coder-0.5b in the cache (`lockstep fetch qwen2.5-coder-0.5b`).

use libtest_mimic::{Arguments, Failed, Trial};
use lockstep::golden::{Manifest, TapsFile};
use lockstep::ondemand;
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const QWEN: &str = "qwen2.5-coder-0.5b";
/// The largest finite f16: the fault's saturation point (engine/src/faults.rs, F16_MAX).
const F16_MAX: f64 = 65504.0;

fn main() {
    let args = Arguments::from_args();
    let venv_missing = match ondemand::exporter_dir() {
        Err(e) => Some(format!("{e:#}")),
        Ok(dir) if !ondemand::venv_ready(&dir) && std::env::var(ondemand::BUILD_ENV).map_or(true, |v| v != "1") => Some(format!(
            "the golden venv {} is not built (ci/golden/venv.sh, ~5 min once; or set {}=1 to let this test build it)",
            ondemand::venv_dir().display(),
            ondemand::BUILD_ENV
        )),
        Ok(_) => None,
    };
    let qwen_missing = (!lockstep_engine::fetch::model_path(QWEN).is_file())
        .then(|| format!("{QWEN} is not in the cache ({}; `lockstep fetch {QWEN}`)", lockstep_engine::fetch::model_path(QWEN).display()))
        .or(venv_missing.clone());
    let ignore = |t: Trial, why: &Option<String>| match why {
        Some(reason) => t.with_kind(format!("ignored: {reason}")).with_ignored_flag(true),
        None => t,
    };
    let trials = vec![
        ignore(Trial::test("qwen_multiturn_f16_accumulation", qwen_multiturn_f16_accumulation), &qwen_missing),
        ignore(Trial::test("tiny_on_demand_l_out_only_gelu", tiny_on_demand_l_out_only_gelu), &venv_missing),
        Trial::test("without_the_golden_venv_each_case_says_so", without_the_golden_venv_each_case_says_so),
        Trial::test("compare_prints_the_pin_command", compare_prints_the_pin_command),
    ];
    libtest_mimic::run(&args, trials).exit();
}

fn ensure(cond: bool, msg: impl FnOnce() -> String) -> Result<(), Failed> {
    if cond {
        Ok(())
    } else {
        Err(Failed::from(msg()))
    }
}

fn err(e: impl std::fmt::Display) -> Failed {
    Failed::from(e.to_string())
}

/// Runs the lockstep binary from the checkout with `env` set (`None` removes a variable).
fn lockstep(args: &[&str], env: &[(&str, Option<&Path>)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_lockstep"));
    cmd.args(args).current_dir(env!("CARGO_MANIFEST_DIR"));
    for (k, v) in env {
        match v {
            Some(v) => cmd.env(k, v),
            None => cmd.env_remove(k),
        };
    }
    cmd.output().expect("run the lockstep binary")
}

fn text(o: &Output) -> (String, String) {
    (String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned())
}

/// `lockstep validate --pin` over `suite` (TOML text) on the CPU with `fault`: (exit code, stdout, stderr,
/// the one case of report.json).
fn validate_pin(dir: &Path, suite: &str, fault: &str, env: &[(&str, Option<&Path>)], extra: &[&str]) -> Result<(i32, String, String, Value), Failed> {
    let suite_file = dir.join("suite.toml");
    std::fs::write(&suite_file, suite).map_err(err)?;
    let report = dir.join("report");
    let mut args = extra.to_vec();
    args.extend(["validate", "--suite", suite_file.to_str().unwrap(), "--backend", "cpu", "--inject", fault, "--pin", "--report", report.to_str().unwrap()]);
    let o = lockstep(&args, env);
    let (out, errs) = text(&o);
    let code = o.status.code().unwrap_or(-1);
    ensure(code == 1, || format!("lockstep validate --pin should exit 1 (a failing case, not an error): {code}\n{out}\n{errs}"))?;
    let rep: Value = serde_json::from_str(&std::fs::read_to_string(report.join("report.json")).map_err(err)?).map_err(err)?;
    let cases = rep["cases"].as_array().cloned().unwrap_or_default();
    ensure(cases.len() == 1, || format!("expected one case: {}", rep["cases"]))?;
    let case = cases[0].clone();
    ensure(case["passed"] == false && rep["passed"] == false, || format!("the case's own verdict must stay FAIL: {}", case["passed"]))?;
    Ok((code, out, errs, case))
}

/// A suite file of one case on `model` with the exact tier's limits of suites/qwen2.5-coder-0.5b.toml.
fn suite_text(model: &str, golden: &str) -> String {
    format!(
        r#"suite = "pin"
model = "{model}"
backends = ["cpu"]
checks = ["tokens", "taps", "logits"]

[[tolerance]]
tier = "exact"
key = "taps.noise_k"
limit = 20
reason = "as suites/qwen2.5-coder-0.5b.toml"

[[tolerance]]
tier = "exact"
key = "taps.noise_floor"
limit = 1e-6
reason = "as suites/qwen2.5-coder-0.5b.toml"

[[tolerance]]
tier = "exact"
key = "logits.kl"
limit = 1e-05
reason = "as suites/qwen2.5-coder-0.5b.toml"

[[case]]
name = "case"
tier = "exact"
golden = {golden}
"#
    )
}

/// (step, layer, tap) of a report's divergence object.
fn where_(d: &Value) -> (i64, Option<i64>, String) {
    (d["step"].as_i64().unwrap_or(-1), d["layer"].as_i64(), d["tap"].as_str().unwrap_or_default().to_string())
}

/// The largest Σx² over the token rows of `key` (f64).
fn max_row_sumsq(g: &TapsFile, key: &str) -> Result<f64, Failed> {
    let t = g.f32(key).map_err(err)?;
    let width = *t.shape.last().ok_or_else(|| err(format!("{key}: no shape")))?;
    Ok(t.data.chunks_exact(width).map(|r| r.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>()).fold(0.0, f64::max))
}

/// The first RMSNorm of the prefill, in graph order, that the f16-accumulation fault changes: the first
/// whose input (`embd` / `l_out-(L−1)` for `norm-L.rms_norm.0`, `ffn_inp-L` for `.1`, `l_out-(n−1)` for
/// the final `norm`) has a row with Σx² > 65504. With the margin of the nearest input to the threshold.
fn first_saturating_norm(g: &TapsFile, n_layer: usize) -> Result<((Option<i64>, String), f64), Failed> {
    let mut margin = f64::INFINITY;
    for l in 0..n_layer {
        let input0 = if l == 0 { "s0/embd".to_string() } else { format!("s0/l_out-{}", l - 1) };
        for (input, tap) in [(input0, format!("norm-{l}.rms_norm.0")), (format!("s0/ffn_inp-{l}"), format!("norm-{l}.rms_norm.1"))] {
            let s = max_row_sumsq(g, &input)?;
            if s > F16_MAX {
                return Ok(((Some(l as i64), tap), (s / F16_MAX).min(margin)));
            }
            margin = margin.min(F16_MAX / s);
        }
    }
    Ok(((None, "norm".into()), margin))
}

fn qwen_multiturn_f16_accumulation() -> Result<(), Failed> {
    let dir = tempfile::tempdir().map_err(err)?;
    let t0 = std::time::Instant::now();
    let (_, out, errs, case) = validate_pin(dir.path(), &suite_text(QWEN, "\"qwen2.5-coder-0.5b/exact/multiturn\""), "f16-accumulation", &[], &[])?;
    let secs = t0.elapsed().as_secs_f64();
    // The premise: the committed golden (layer 0 taps only) cannot say where.
    let own = where_(&case["first_divergence"]);
    ensure(own.1.is_none_or(|l| l > 0), || format!("the case's own first divergence should lie outside layer 0: {own:?}"))?;
    let p = &case["pinned"];
    ensure(p["unavailable"].is_null(), || format!("not pinned: {}\n{errs}", p["unavailable"]))?;
    ensure(p["why"].as_str().is_some_and(|w| w.contains("layer 0 only")), || format!("why: {}", p["why"]))?;
    ensure(p["notes"].as_array().is_some_and(|n| n.is_empty()), || {
        format!("the full-tap golden should have the committed golden's prompt tokens: {}", p["notes"])
    })?;
    ensure(
        p["command"]
            .as_str()
            .is_some_and(|c| c.starts_with("lockstep golden --model qwen2.5-coder-0.5b --chat ") && c.ends_with("--tier exact --steps 5 --taps all")),
        || format!("command: {}", p["command"]),
    )?;

    // The right answer, from the full-tap golden's own tensors and the fault's definition.
    let name = p["golden"].as_str().ok_or_else(|| err(format!("no pinned golden: {p}")))?;
    let (m, entry) = ondemand::resolve_entry(name).map_err(err)?.ok_or_else(|| err(format!("{name}: not an on-demand entry")))?;
    let f = m.find(&entry).map_err(err)?;
    ensure(f.tensors.iter().filter(|t| t.step == Some(0)).count() > 500, || format!("{name}: not a full-tap golden ({} prefill tensors)", f.tensors.len()))?;
    let g = m.open_taps(f).map_err(err)?;
    let ((layer, tap), margin) = first_saturating_norm(&g, f.n_layer.unwrap_or(24))?;
    let pinned = where_(&p["first_divergence"]);
    ensure(pinned == (0, layer, tap.clone()), || format!("pinned at {pinned:?}; the fault first changes s0/{tap} (layer {layer:?})\n{out}"))?;
    ensure(p["likely_class_id"].is_string(), || format!("the pinned divergence names no class: {p}"))?;
    // The case's own divergence is unchanged by pinning, and the table and the page show the pinned tap.
    ensure(out.lines().any(|l| l.contains("↳ pinned (cache:") && l.contains(&format!("s0 {tap} "))), || format!("the table's pinned line:\n{out}"))?;
    let html = std::fs::read_to_string(dir.path().join("report/report.html")).map_err(err)?;
    ensure(html.contains("Pinned against a full-tap golden") && html.contains(&format!("<code>{tap}</code>")), || {
        "report.html lacks the pinned divergence".into()
    })?;
    eprintln!(
        "case's own: {own:?}; pinned: {pinned:?} class {} ({}), expected from the golden (Σx² margin ×{margin:.2}); pin {:.1} s, whole run {secs:.1} s",
        p["likely_class_id"],
        p["class_proof"]["verdict"],
        p["seconds"].as_f64().unwrap_or(f64::NAN)
    );
    Ok(())
}

fn tiny_on_demand_l_out_only_gelu() -> Result<(), Failed> {
    let dir = tempfile::tempdir().map_err(err)?;
    let cache = dir.path().join("cache");
    let golden = r#"{ prompt = "A kettle sang on the stove while", steps = 3, taps = "l_out" }"#;
    let t0 = std::time::Instant::now();
    // A fresh cache, the golden venv where it is built (its default lies in the cache).
    let venv = ondemand::venv_dir();
    let env: [(&str, Option<&Path>); 2] = [("LOCKSTEP_CACHE", Some(&cache)), (ondemand::VENV_ENV, Some(&venv))];
    let (_, out, errs, case) = validate_pin(dir.path(), &suite_text("tiny-qwen2", golden), "gelu-activation", &env, &[])?;
    let own = where_(&case["first_divergence"]);
    ensure(own == (0, Some(0), "l_out-0".into()), || format!("with l_out only, the case's own first divergence should be s0/l_out-0: {own:?}\n{out}\n{errs}"))?;
    let p = &case["pinned"];
    ensure(p["unavailable"].is_null(), || format!("not pinned: {}\n{errs}", p["unavailable"]))?;
    ensure(p["why"] == "the golden keeps the tap families l_out only", || format!("why: {}", p["why"]))?;
    let pinned = where_(&p["first_divergence"]);
    ensure(pinned == (0, Some(0), "ffn_swiglu-0".into()), || format!("pinned at {pinned:?}, not s0/ffn_swiglu-0\n{out}"))?;
    ensure(p["likely_class_id"] == "activation", || format!("pinned class: {} ({})", p["likely_class_id"], p["evidence"]))?;
    ensure(p["command"] == "lockstep golden --model tiny-qwen2 --prompt 'A kettle sang on the stove while' --tier exact --steps 3 --taps all", || {
        format!("command: {}", p["command"])
    })?;
    ensure(errs.contains("lockstep golden: exporting"), || format!("the export's progress should be on stderr:\n{errs}"))?;
    eprintln!(
        "case's own: {own:?}; pinned: {pinned:?} class {} ({}); whole run {:.1} s",
        p["likely_class_id"],
        p["class_proof"]["verdict"],
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

/// A golden directory holding tiny-qwen2/exact/fox reduced to layer 0 and the tensors outside the layer
/// stack (as the committed real-model multiturn goldens are), with golden/models linked in.
fn reduced_tiny_golden(dir: &Path) -> Result<PathBuf, Failed> {
    let src = Manifest::load(&lockstep::golden::default_dir()).map_err(err)?;
    let f = src.find("tiny-qwen2/exact/fox").map_err(err)?;
    let g = src.open_taps(f).map_err(err)?;
    let keep = |key: &str| lockstep::tapname::TapId::parse_key(key).is_none_or(|id| id.layer.is_none_or(|l| l == 0));
    let (mut f32s, mut i32s) = (Vec::new(), Vec::new());
    for key in g.keys().into_iter().filter(|k| keep(k)) {
        let shape = g.shape(&key).ok_or_else(|| err(format!("{key}: no shape")))?;
        if format!("{:?}", g.dtype(&key)).contains("I32") {
            i32s.push((key.clone(), shape, g.ints(&key).map_err(err)?.into_iter().map(|v| v as i32).collect()));
        } else {
            f32s.push((key.clone(), shape, g.f32(&key).map_err(err)?.data));
        }
    }
    let out = dir.join("golden");
    let rel = "taps/tiny-qwen2/exact/fox.safetensors";
    std::fs::create_dir_all(out.join("taps/tiny-qwen2/exact")).map_err(err)?;
    lockstep::golden::write_safetensors(&out.join(rel), &f32s, &i32s).map_err(err)?;
    std::os::unix::fs::symlink(src.dir.join("models"), out.join("models")).map_err(err)?;
    let bytes = std::fs::read(out.join(rel)).map_err(err)?;
    let mut rec = serde_json::to_value(f).map_err(err)?;
    rec["sha256"] = Value::from(hex::encode(Sha256::digest(&bytes)));
    rec["bytes"] = Value::from(bytes.len());
    rec["full_layers"] = serde_json::json!([0]);
    rec["kept"] = Value::from("every tap of layer 0 and of the non-layer tensors (a test's reduction)");
    let tensors: Vec<Value> = rec["tensors"].as_array().cloned().unwrap_or_default().into_iter().filter(|t| t["key"].as_str().is_none_or(&keep)).collect();
    rec["tensors"] = Value::from(tensors);
    let mut top = serde_json::Value::Object(src.provenance.clone());
    top["files"] = serde_json::json!([rec]);
    std::fs::write(out.join("manifest.json"), serde_json::to_string_pretty(&top).map_err(err)?).map_err(err)?;
    Ok(out)
}

fn without_the_golden_venv_each_case_says_so() -> Result<(), Failed> {
    let dir = tempfile::tempdir().map_err(err)?;
    let golden = reduced_tiny_golden(dir.path())?;
    let (cache, venv) = (dir.path().join("cache"), dir.path().join("no-venv-here"));
    let env: [(&str, Option<&Path>); 3] = [("LOCKSTEP_CACHE", Some(&cache)), (ondemand::VENV_ENV, Some(&venv)), (ondemand::BUILD_ENV, None)];
    let (_, out, errs, case) =
        validate_pin(dir.path(), &suite_text("tiny-qwen2", "\"tiny-qwen2/exact/fox\""), "gelu-activation", &env, &["--golden-dir", golden.to_str().unwrap()])?;
    ensure(where_(&case["first_divergence"]) == (0, Some(0), "ffn_swiglu-0".into()), || format!("the case's own divergence: {}", case["first_divergence"]))?;
    let p = &case["pinned"];
    ensure(p["why"] == "the golden holds every tap of layer 0 only (of 2)", || format!("why: {}", p["why"]))?;
    ensure(p["unavailable"].as_str().is_some_and(|u| u.contains("golden venv") && u.contains(venv.to_str().unwrap())), || {
        format!("unavailable: {}\n{errs}", p["unavailable"])
    })?;
    ensure(p["first_divergence"].is_null() && p["golden"].is_null(), || format!("nothing pinned without the venv: {p}"))?;
    ensure(p["command"] == "lockstep golden --model tiny-qwen2 --prompt 'The quick brown fox' --tier exact --steps 5 --taps all", || {
        format!("command: {}", p["command"])
    })?;
    ensure(out.lines().any(|l| l.contains("↳ not pinned: on-demand golden")), || format!("the table should say why:\n{out}"))?;
    Ok(())
}

fn compare_prints_the_pin_command() -> Result<(), Failed> {
    let dir = tempfile::tempdir().map_err(err)?;
    let golden = reduced_tiny_golden(dir.path())?;
    // The dump: llama.cpp's own full tensors, with layer 1's output and everything after it off by 1 %
    // (a fault inside layer 1, which the reduced golden does not hold).
    let src = Manifest::load(&lockstep::golden::default_dir()).map_err(err)?;
    let g = src.open_taps(src.find("tiny-qwen2/exact/fox").map_err(err)?).map_err(err)?;
    let mut f32s = Vec::new();
    for key in g.keys().into_iter().filter(|k| k.starts_with('s')) {
        let t = g.f32(&key).map_err(err)?;
        let after = ["l_out-1", "norm", "result_norm", "result_output"].iter().any(|s| key.ends_with(&format!("/{s}")));
        f32s.push((key, t.shape, t.data.into_iter().map(|v| if after { v * 1.01 } else { v }).collect()));
    }
    let dump = dir.path().join("dump.safetensors");
    lockstep::golden::write_safetensors(&dump, &f32s, &[]).map_err(err)?;
    let report = dir.path().join("report");
    let o = lockstep(
        &[
            "--golden-dir",
            golden.to_str().unwrap(),
            "compare",
            "--dump",
            dump.to_str().unwrap(),
            "--golden",
            "tiny-qwen2/exact/fox",
            "--report",
            report.to_str().unwrap(),
        ],
        &[],
    );
    let (out, errs) = text(&o);
    ensure(o.status.code() == Some(1), || format!("compare should fail the dump ({}):\n{out}\n{errs}", o.status))?;
    ensure(out.contains("s0 norm "), || format!("the first divergence should be the final norm:\n{out}"))?;
    ensure(
        out.contains("pin it: the golden holds none of s0/norm's inputs")
            && out.contains("    lockstep golden --model tiny-qwen2 --prompt 'The quick brown fox' --tier exact --steps 5 --taps all\n"),
        || format!("compare should print the pin command:\n{out}"),
    )?;
    // Against the full golden (every tap), no command: the divergence is pinned already.
    let full = lockstep(&["compare", "--dump", dump.to_str().unwrap(), "--golden", "tiny-qwen2/exact/fox", "--report", report.to_str().unwrap()], &[]);
    let (out, _) = text(&full);
    ensure(out.contains("s0 l_out-1 ") && !out.contains("lockstep golden"), || format!("against the full golden:\n{out}"))?;
    Ok(())
}
