//! On-demand goldens end to end (src/ondemand.rs, ci/golden/ondemand.py): `lockstep golden` on tiny-qwen2
//! with a prompt no committed golden has, in a fresh cache.
//!
//! - `export_then_cache_hit_then_judge`: the first run exports (llama.cpp), the second is answered from
//!   the cache with no golden venv reachable at all (so neither Python nor llama.cpp can have run); the
//!   entry holds every tap of every layer at every step with noise records; our CPU engine's dump passes
//!   against it, judged by `lockstep compare` (the library function and the CLI with `--golden cache:KEY`).
//! - `interrupted_export_leaves_no_entry`: an export killed (SIGKILL) once its entry is complete but not yet
//!   renamed leaves no entry and no request alias; the next export cleans its partial directory and
//!   writes the entry.
//!
//! Needs the golden venv (`$LOCKSTEP_CACHE/venv`, ci/golden/venv.sh): without it the trials are reported
//! ignored with the reason, unless LOCKSTEP_ONDEMAND_BUILD=1 lets them build it (~5 minutes).

use libtest_mimic::{Arguments, Failed, Trial};
use lockstep::ondemand;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const PROMPT: &str = "A lighthouse keeper counted the waves until";

fn main() {
    let args = Arguments::from_args();
    let venv = ondemand::venv_dir();
    let unavailable = match ondemand::exporter_dir() {
        Err(e) => Some(format!("{e:#}")),
        Ok(dir) if !ondemand::venv_ready(&dir) && std::env::var(ondemand::BUILD_ENV).map_or(true, |v| v != "1") => Some(format!(
            "the golden venv {} is not built (ci/golden/venv.sh, ~5 min once; or set {}=1 to let this test build it)",
            venv.display(),
            ondemand::BUILD_ENV
        )),
        Ok(_) => None,
    };
    let trials = vec![
        Trial::test("export_then_cache_hit_then_judge", {
            let v = venv.clone();
            move || export_then_cache_hit_then_judge(&v)
        }),
        Trial::test("interrupted_export_leaves_no_entry", move || interrupted_export_leaves_no_entry(&venv)),
    ];
    let trials = trials
        .into_iter()
        .map(|t| match &unavailable {
            Some(reason) => t.with_kind(format!("ignored: {reason}")).with_ignored_flag(true),
            None => t,
        })
        .collect();
    libtest_mimic::run(&args, trials).exit();
}

/// `lockstep golden …` with the cache at `cache` and the golden venv at `venv`.
fn lockstep(cache: &Path, venv: &Path, args: &[&str], extra_env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_lockstep"));
    cmd.args(args).env("LOCKSTEP_CACHE", cache).env(ondemand::VENV_ENV, venv).current_dir(env!("CARGO_MANIFEST_DIR"));
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    cmd.output().expect("run the lockstep binary")
}

fn text(o: &Output) -> (String, String) {
    (String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned())
}

/// The `cache:KEY` name a `lockstep golden` run printed.
fn entry_name(stdout: &str) -> Result<String, Failed> {
    stdout
        .split_whitespace()
        .find(|w| w.starts_with("cache:"))
        .map(str::to_string)
        .ok_or_else(|| Failed::from(format!("no cache:KEY in the output:\n{stdout}")))
}

fn ensure(cond: bool, msg: impl FnOnce() -> String) -> Result<(), Failed> {
    if cond {
        Ok(())
    } else {
        Err(Failed::from(msg()))
    }
}

fn golden_args() -> Vec<&'static str> {
    vec!["golden", "--model", "tiny-qwen2", "--prompt", PROMPT, "--tier", "exact"]
}

fn export_then_cache_hit_then_judge(venv: &Path) -> Result<(), Failed> {
    let cache = tempfile::tempdir().map_err(|e| e.to_string())?;
    let t0 = std::time::Instant::now();
    let first = lockstep(cache.path(), venv, &golden_args(), &[]);
    let (out1, err1) = text(&first);
    ensure(first.status.success(), || format!("first `lockstep golden` failed ({}):\n{out1}\n{err1}", first.status))?;
    ensure(out1.contains("exported in"), || format!("the first run should export:\n{out1}"))?;
    ensure(err1.contains("prefill (taps) done"), || format!("the first run should show the exporter's progress on stderr:\n{err1}"))?;
    let first_s = t0.elapsed().as_secs_f64();
    let name = entry_name(&out1)?;

    // Second run: no golden venv anywhere, so a pass means neither Python nor llama.cpp ran.
    let t1 = std::time::Instant::now();
    let second = lockstep(cache.path(), &cache.path().join("no-venv-here"), &golden_args(), &[]);
    let (out2, err2) = text(&second);
    ensure(second.status.success(), || format!("second `lockstep golden` failed ({}):\n{out2}\n{err2}", second.status))?;
    ensure(out2.contains("cached, llama.cpp not run"), || format!("the second run should be a cache hit:\n{out2}"))?;
    ensure(entry_name(&out2)? == name, || format!("the cache hit names another entry: {out2}"))?;
    eprintln!("export {first_s:.1} s, cache hit {:.2} s", t1.elapsed().as_secs_f64());

    // The entry: golden/manifest.json's schema, every tap of both layers at steps 0..4, noise on each.
    let dir = cache.path().join("goldens").join(name.trim_start_matches("cache:"));
    let manifest = lockstep::golden::Manifest::load(&dir).map_err(|e| e.to_string())?;
    let f = manifest.taps_files().next().ok_or("the entry lists no taps file")?;
    ensure(f.model.as_deref() == Some("tiny-qwen2") && f.tier.as_deref() == Some("exact") && f.steps == Some(5), || format!("manifest record: {f:?}"))?;
    let taps: Vec<_> = f.tensors.iter().filter(|t| t.step.is_some()).collect();
    for step in 0..5 {
        for layer in 0..2 {
            for fam in ["attn_norm", "kq_soft_max", "kqv_out", "ffn_swiglu", "l_out"] {
                let key = format!("s{step}/{fam}-{layer}");
                ensure(taps.iter().any(|t| t.key.as_deref() == Some(key.as_str())), || format!("the entry has no {key}"))?;
            }
        }
    }
    ensure(taps.iter().all(|t| t.noise.is_some()), || "every tap of a qwen2 entry carries its noise record".into())?;

    // Our CPU engine, judged against it as `lockstep compare` does.
    let dump = cache.path().join("cpu-dump.safetensors");
    let model = lockstep_engine::model::Model::open("tiny-qwen2").map_err(|e| format!("{e:#}"))?;
    let ids = model.prompt_tokens(&lockstep_engine::model::Prompt::Text(PROMPT.into())).map_err(|e| format!("{e:#}"))?;
    let mut cpu = lockstep_engine::cpu::CpuBackend::load(&model.file, Default::default()).map_err(|e| format!("{e:#}"))?;
    lockstep_engine::dump::dump(&mut cpu, &ids, 4, &dump).map_err(|e| format!("{e:#}"))?;
    let (m, entry) = ondemand::resolve_entry(dir.to_str().unwrap()).map_err(|e| format!("{e:#}"))?.ok_or("the entry directory is not recognised")?;
    let rep = lockstep::compare::compare_dump(&m, &dump, &entry, None).map_err(|e| e.to_string())?;
    let cov = rep.coverage.as_ref().ok_or("no coverage")?;
    ensure(rep.passed, || {
        format!("our CPU engine fails the on-demand golden: {:?} {:?}", rep.first_divergence, rep.failed_checks().map(|c| &c.name).collect::<Vec<_>>())
    })?;
    ensure(cov.compared == cov.golden_taps && cov.logit_steps == 5, || {
        format!("coverage: {} of {} taps, logits of {} steps", cov.compared, cov.golden_taps, cov.logit_steps)
    })?;

    // And through the CLI, by its cache name.
    let cli = lockstep(
        cache.path(),
        venv,
        &["compare", "--dump", dump.to_str().unwrap(), "--golden", &name, "--report", cache.path().join("report").to_str().unwrap()],
        &[],
    );
    let (out3, err3) = text(&cli);
    ensure(cli.status.success() && out3.contains("PASS"), || format!("lockstep compare --golden {name} ({}):\n{out3}\n{err3}", cli.status))?;
    Ok(())
}

fn interrupted_export_leaves_no_entry(venv: &Path) -> Result<(), Failed> {
    let cache = tempfile::tempdir().map_err(|e| e.to_string())?;
    let goldens = cache.path().join("goldens");
    let killed = lockstep(cache.path(), venv, &golden_args(), &[("LOCKSTEP_ONDEMAND_FAULT", "kill-before-rename")]);
    let (out, err) = text(&killed);
    ensure(!killed.status.success(), || format!("the killed export should fail:\n{out}\n{err}"))?;
    ensure(err.contains("exporter (ci/golden/ondemand.py) failed"), || format!("the error should name the exporter:\n{err}"))?;
    let listing = |d: &Path| -> Vec<String> {
        std::fs::read_dir(d).map(|r| r.filter_map(|e| Some(e.ok()?.file_name().to_string_lossy().into_owned())).collect()).unwrap_or_default()
    };
    let names = listing(&goldens);
    ensure(names.iter().any(|n| n.starts_with(".partial-")), || format!("the kill should strike after the partial entry was written: {names:?}"))?;
    let entries: Vec<&String> = names.iter().filter(|n| n.len() == 24 && n.chars().all(|c| c.is_ascii_hexdigit())).collect();
    ensure(entries.is_empty(), || format!("an interrupted export left entries {entries:?}"))?;
    ensure(listing(&goldens.join("requests")).is_empty(), || "an interrupted export left a request alias".into())?;

    let again = lockstep(cache.path(), venv, &golden_args(), &[]);
    let (out, err) = text(&again);
    ensure(again.status.success() && out.contains("exported in"), || format!("the export after the kill ({}):\n{out}\n{err}", again.status))?;
    let names = listing(&goldens);
    ensure(!names.iter().any(|n| n.starts_with(".partial-")), || format!("the stale partial directory is still there: {names:?}"))?;
    let key = entry_name(&out)?;
    let dir: PathBuf = goldens.join(key.trim_start_matches("cache:"));
    ensure(dir.join("manifest.json").is_file() && dir.join("taps.safetensors").is_file(), || format!("{} is incomplete", dir.display()))?;
    Ok(())
}
