//! The CPU reference backend against llama.cpp's exact-tier goldens (golden/taps/*/exact/*).
//!
//! One trial per exact-tier taps file listed in golden/manifest.json: the engine runs the model file
//! the golden names (the quantized file: its dequantized weights are what llama.cpp's F32 copy holds),
//! prefill + every tapped decode step, and every tap the golden holds must be within
//! [`MAX_REL_L2`] relative L2; then the greedy continuation must equal the golden's.
//! Decode steps are fed the golden's continuation (so one early difference cannot cascade).
//! A trial whose model file is not on this machine is reported ignored, with the reason.
//!
//! Extra pairs (e.g. references dumped by hand) can be given as
//! `LOCKSTEP_CPU_EXTRA=model.gguf=ref.safetensors[,…]`.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;

use anyhow::{bail, ensure, Context, Result};
use libtest_mimic::{Arguments, Failed, Trial};
use lockstep_engine::backend::Backend;
use lockstep_engine::cpu::{CpuBackend, EngineOptions};
use lockstep_engine::gguf::GgufFile;
use lockstep_engine::sampler::greedy;
use lockstep_engine::taps::Recorder;
use safetensors::{Dtype, SafeTensors};

/// An f32 engine on the same weights as llama.cpp's exact tier differs only by summation order:
/// ~1e-7..1e-6 per tensor. 1e-5 leaves room for a few layers of accumulation and nothing more.
const MAX_REL_L2: f64 = 1e-5;

fn repo() -> PathBuf {
    lockstep_engine::fetch::project_root()
}

fn cache_models() -> PathBuf {
    std::env::var_os("LOCKSTEP_CACHE")
        .map(PathBuf::from)
        .or_else(|| dirs::cache_dir().map(|d| d.join("lockstep")))
        .unwrap_or_else(|| PathBuf::from(".cache/lockstep"))
        .join("models")
}

struct Case {
    name: String,
    model: PathBuf,
    golden: PathBuf,
}

fn cases() -> Result<Vec<Case>> {
    let mut out = Vec::new();
    let manifest = repo().join("golden/manifest.json");
    if manifest.exists() {
        let m: serde_json::Value = serde_json::from_slice(&std::fs::read(&manifest)?).with_context(|| format!("parsing {}", manifest.display()))?;
        for f in m["files"].as_array().context("manifest: no files array")? {
            if f["kind"] != "taps" || f["tier"] != "exact" {
                continue;
            }
            let rel = f["path"].as_str().context("manifest: taps entry without path")?;
            let id = f["model"].as_str().context("manifest: taps entry without model")?;
            let mf = f["model_file"].as_str().unwrap_or("");
            let model = if mf.ends_with("(cache)") { cache_models().join(format!("{id}.gguf")) } else { repo().join("golden").join(mf) };
            out.push(Case { name: rel.to_string(), model, golden: repo().join("golden").join(rel) });
        }
    }
    if let Ok(extra) = std::env::var("LOCKSTEP_CPU_EXTRA") {
        for pair in extra.split(',').filter(|s| !s.is_empty()) {
            let (m, g) = pair.split_once('=').context("LOCKSTEP_CPU_EXTRA: expected model=golden")?;
            out.push(Case { name: format!("extra:{g}"), model: m.into(), golden: g.into() });
        }
    }
    Ok(out)
}

fn f32s(st: &SafeTensors, key: &str) -> Result<(Vec<usize>, Vec<f32>)> {
    let t = st.tensor(key).with_context(|| format!("golden has no {key}"))?;
    ensure!(t.dtype() == Dtype::F32, "{key}: dtype {:?}, expected F32", t.dtype());
    let v = t.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    Ok((t.shape().to_vec(), v))
}

fn i32s(st: &SafeTensors, key: &str) -> Result<Vec<u32>> {
    let t = st.tensor(key).with_context(|| format!("golden has no {key}"))?;
    ensure!(t.dtype() == Dtype::I32, "{key}: dtype {:?}, expected I32", t.dtype());
    Ok(t.data().chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as u32).collect())
}

fn rel_l2(ours: &[f32], want: &[f32]) -> f64 {
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (a, b) in ours.iter().zip(want) {
        num += (*a as f64 - *b as f64).powi(2);
        den += (*b as f64).powi(2);
    }
    if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    }
}

/// The rows of a 4-D tap at `rows` along its token axis (1 after RoPE, else 2), as the golden keeps them;
/// the tap unchanged when it is not 4-D or too short.
fn cut_rows(tap: &str, shape: &[usize], data: &[f32], rows: &[u32]) -> (Vec<usize>, Vec<f32>) {
    let ax = if tap.ends_with(".rope") { 1 } else { 2 };
    if shape.len() != 4 || rows.iter().any(|&r| r as usize >= shape[ax]) {
        return (shape.to_vec(), data.to_vec());
    }
    let (n, inner, outer) = (shape[ax], shape[ax + 1..].iter().product::<usize>(), shape[..ax].iter().product::<usize>());
    let mut out = Vec::with_capacity(outer * rows.len() * inner);
    for o in 0..outer {
        for &r in rows {
            let at = (o * n + r as usize) * inner;
            out.extend_from_slice(&data[at..at + inner]);
        }
    }
    let mut s = shape.to_vec();
    s[ax] = rows.len();
    (s, out)
}

fn check(case: &Case) -> Result<()> {
    let bytes = std::fs::read(&case.golden).with_context(|| format!("reading {}", case.golden.display()))?;
    let st = SafeTensors::deserialize(&bytes).with_context(|| format!("parsing {}", case.golden.display()))?;
    // keys per step, in file order
    let mut steps: BTreeMap<usize, Vec<String>> = BTreeMap::new();
    for name in st.names() {
        if let Some((s, tap)) = name.strip_prefix('s').and_then(|r| r.split_once('/')) {
            if let Ok(s) = s.parse::<usize>() {
                steps.entry(s).or_default().push(tap.to_string());
            }
        }
    }
    let tokens = i32s(&st, "tokens")?;
    let continuation = i32s(&st, "continuation")?;
    ensure!(!continuation.is_empty(), "golden continuation is empty");

    let file = GgufFile::open(&case.model)?;
    let mut be = CpuBackend::load(&file, EngineOptions::default())?;
    let mut failures = Vec::new();
    let mut ours_cont = Vec::new();
    let mut feed = tokens.clone();
    let n_steps = steps.keys().max().map_or(0, |m| m + 1).max(continuation.len());
    for step in 0..n_steps {
        let want: HashSet<String> = steps.get(&step).map(|v| v.iter().cloned().collect()).unwrap_or_default();
        let mut rec = Recorder::new();
        let filter = want.clone();
        rec.filter = Some(Box::new(move |k: &str| filter.contains(k)));
        let logits = be.forward(&feed, Some(&mut rec))?;
        ours_cont.push(greedy(&logits));
        if !want.is_empty() {
            let mut worst = (0.0f64, String::new());
            for tap in &steps[&step] {
                let (shape, gold) = f32s(&st, &format!("s{step}/{tap}"))?;
                let Some(got) = rec.get(tap) else {
                    failures.push(format!("s{step}/{tap}: the engine did not produce it"));
                    continue;
                };
                let (got_shape, got_data) = match i32s(&st, &format!("rows/s{step}/{tap}")) {
                    // a row-subset tap (golden/README.md, "Row-subset taps"): the engine's rows at those positions
                    Ok(rows) => cut_rows(tap, &got.shape[..], &got.data, &rows),
                    Err(_) => (got.shape.to_vec(), got.data.clone()),
                };
                if got_shape != shape {
                    failures.push(format!("s{step}/{tap}: shape {:?}, golden {:?}", got.shape, shape));
                    continue;
                }
                let e = rel_l2(&got_data, &gold);
                if !(e <= MAX_REL_L2) {
                    failures.push(format!("s{step}/{tap}: rel L2 {e:.3e} > {MAX_REL_L2:e}"));
                }
                if !(e <= worst.0) {
                    worst = (e, tap.clone());
                }
            }
            eprintln!("{}: step {step}: {} taps, worst {} at {:.3e}", case.name, want.len(), worst.1, worst.0);
        }
        // teacher-forced: feed the golden's token (ours is compared below)
        feed = vec![*continuation.get(step).unwrap_or(ours_cont.last().unwrap())];
    }
    ours_cont.truncate(continuation.len());
    if ours_cont != continuation {
        let at = ours_cont.iter().zip(&continuation).position(|(a, b)| a != b).unwrap_or(0);
        failures.push(format!("greedy continuation differs at {at}: ours {ours_cont:?}, golden {continuation:?}"));
    }
    if !failures.is_empty() {
        bail!("{} problems:\n  {}", failures.len(), failures.join("\n  "));
    }
    Ok(())
}

fn main() {
    let args = Arguments::from_args();
    let trials = match cases() {
        Ok(cs) if cs.is_empty() => {
            vec![Trial::test("cpu_golden::no_exact_goldens", || Err(Failed::from("golden/manifest.json lists no exact-tier taps: run ci/regenerate-golden")))]
        }
        Ok(cs) => cs
            .into_iter()
            .map(|c| {
                let missing = !c.model.exists();
                let name = format!("cpu_golden::{}", c.name);
                let why = format!("model file {} is not on this machine", c.model.display());
                Trial::test(name, move || {
                    if missing {
                        return Err(Failed::from(why));
                    }
                    check(&c).map_err(|e| Failed::from(format!("{e:#}")))
                })
                .with_ignored_flag(missing)
            })
            .collect(),
        Err(e) => vec![Trial::test("cpu_golden::manifest", move || Err(Failed::from(format!("{e:#}"))))],
    };
    libtest_mimic::run(&args, trials).exit();
}
