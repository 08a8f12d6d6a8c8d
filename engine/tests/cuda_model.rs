//! Whole models on the CUDA backend against the CPU reference: every tap of the prefill and of
//! decode steps (same names, shapes, ≤ 1e-5 relative L2 — both are f32 engines on the same
//! weights), greedy continuations token for token, the graph-replayed decode step against the
//! uncaptured one, KV-cache consistency, bad input, and no GPU memory leak across loads.
//!
//! Models: the tiny synthetic ones (golden/models, or LOCKSTEP_TINY_DIR), and the real ones when
//! present in the model cache (LOCKSTEP_CACHE or the user cache dir, `models/{id}.gguf`).

mod cuda_common;

use std::path::{Path, PathBuf};

use cuda_common::{check_close, rel_l2, trials};
use libtest_mimic::{Arguments, Failed, Trial};
use lockstep_engine::backend::Backend;
use lockstep_engine::cpu::{CpuBackend, EngineOptions};
use lockstep_engine::cuda::{CudaBackend, CudaOptions};
use lockstep_engine::gguf::GgufFile;
use lockstep_engine::taps::{Recorder, TapInfo, TapSink};

type R = Result<(), Failed>;

/// The leak check reads the device's free memory, which any trial beside it changes: it holds this
/// lock exclusively, every other trial shares it (and so runs beside the others: two backends in
/// two threads, one capturing its decode graph while the other launches, allocates and frees).
static DEVICE_MEMORY: std::sync::RwLock<()> = std::sync::RwLock::new(());

fn beside_others(f: impl FnOnce() -> R + Send + 'static) -> impl FnOnce() -> R + Send + 'static {
    move || {
        let _g = DEVICE_MEMORY.read().unwrap_or_else(|e| e.into_inner());
        f()
    }
}

/// Prefill of 9 tokens, then 6 decode steps (the first captures the graph, the others replay it):
/// the logits of every step, from a backend loaded for this run and dropped after it.
fn decode_run(file: &GgufFile) -> Result<Vec<Vec<f32>>, Failed> {
    let mut g = cuda(file, 64)?;
    let p = prompt(15, g.config.n_vocab);
    let mut out = vec![g.forward(&p[..9], None)?];
    for &tok in &p[9..] {
        out.push(g.forward(&[tok], None)?);
    }
    Ok(out)
}

/// Two threads each load, run and drop a backend 5 times at once: their logits equal those of a
/// run alone, bit for bit. (On 2026-11-26 such runs lost 4 of 5 times to
/// CUDA_ERROR_STREAM_CAPTURE_INVALIDATED: a dropping backend freed its buffers after releasing
/// the device lock, while the other thread captured.)
fn two_threads(path: PathBuf) -> R {
    let file = open(&path)?;
    let alone = decode_run(&file)?;
    let runs: Vec<std::thread::JoinHandle<Result<(), String>>> = (0..2)
        .map(|_| {
            let (file, alone) = (open(&path).map_err(|e| format!("{e:?}")), alone.clone());
            std::thread::spawn(move || {
                let file = file?;
                for i in 0..5 {
                    let got = decode_run(&file).map_err(|e| format!("run {i}: {e:?}"))?;
                    if got != alone {
                        return Err(format!("run {i}: logits differ from a run alone"));
                    }
                }
                Ok(())
            })
        })
        .collect();
    for r in runs {
        r.join().map_err(|_| "a thread panicked")??;
    }
    Ok(())
}

fn tiny_dirs() -> Vec<PathBuf> {
    let mut v = Vec::new();
    if let Ok(d) = std::env::var("LOCKSTEP_TINY_DIR") {
        v.push(PathBuf::from(d));
    }
    for d in ["golden/models", "../golden/models", ".carry/models", "../.carry/models", "/tmp/tinytest"] {
        v.push(PathBuf::from(d));
    }
    v
}

fn find_tiny(name: &str) -> Option<PathBuf> {
    tiny_dirs().into_iter().map(|d| d.join(name)).find(|p| p.exists())
}

fn find_real(id: &str) -> Option<PathBuf> {
    let root = std::env::var_os("LOCKSTEP_CACHE").map(PathBuf::from).or_else(|| dirs::cache_dir().map(|c| c.join("lockstep")))?;
    let p = root.join("models").join(format!("{id}.gguf"));
    p.exists().then_some(p)
}

fn open(p: &Path) -> Result<GgufFile, Failed> {
    GgufFile::open(p).map_err(|e| format!("{}: {e}", p.display()).into())
}

fn cuda(file: &GgufFile, max_ctx: usize) -> Result<CudaBackend, Failed> {
    CudaBackend::load(file, CudaOptions { max_ctx, ..Default::default() }).map_err(|e| format!("{e:#}").into())
}

fn cpu(file: &GgufFile, max_ctx: usize) -> Result<CpuBackend, Failed> {
    CpuBackend::load(file, EngineOptions { threads: 0, max_ctx }).map_err(|e| format!("{e:#}").into())
}

fn prompt(n: usize, n_vocab: usize) -> Vec<u32> {
    (0..n).map(|i| ((i * 131 + 17) % n_vocab) as u32).collect()
}

fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// Every tap (names, order, shapes, values) of a prefill and 3 decode steps; then the greedy
/// continuation of `n_gen` tokens must match token for token.
/// The limit for one tap: `tol`, or `attn_tol` for the attention taps (kq_soft_max, kqv, kqv_out) where a
/// model's scores are large enough that two correct f32 summation orders differ by more.
fn limit_for(key: &str, tol: f64, attn_tol: f64) -> f64 {
    let family = key.split(['-', '.']).next().unwrap_or(key);
    if matches!(family, "kq_soft_max" | "kqv" | "kqv_out") {
        attn_tol
    } else {
        tol
    }
}

fn taps_and_greedy(path: PathBuf, n_prompt: usize, n_gen: usize, tol: f64, attn_tol: f64) -> R {
    let file = open(&path)?;
    let max_ctx = n_prompt + n_gen + 8;
    let mut c = cpu(&file, max_ctx)?;
    let mut g = cuda(&file, max_ctx)?;
    let n_vocab = c.config.n_vocab;
    let mut toks = prompt(n_prompt, n_vocab);
    let mut n_taps = 0;
    for step in 0..4 {
        let (mut rc, mut rg) = (Recorder::new(), Recorder::new());
        let lc = c.forward(&toks, Some(&mut rc))?;
        let lg = g.forward(&toks, Some(&mut rg))?;
        let kc: Vec<&str> = rc.tensors.iter().map(|t| t.key.as_str()).collect();
        let kg: Vec<&str> = rg.tensors.iter().map(|t| t.key.as_str()).collect();
        if kc != kg {
            return Err(format!("step {step}: tap keys differ\n cpu:  {kc:?}\n cuda: {kg:?}").into());
        }
        for (a, b) in rg.tensors.iter().zip(&rc.tensors) {
            if a.shape != b.shape {
                return Err(format!("step {step} {}: shape {:?} vs cpu {:?}", a.key, a.shape, b.shape).into());
            }
            check_close(&format!("step {step} {}", a.key), &a.data, &b.data, limit_for(&a.key, tol, attn_tol))?;
        }
        n_taps += rg.tensors.len();
        check_close(&format!("step {step} logits"), &lg, &lc, tol)?;
        toks = vec![argmax(&lc)];
    }
    // greedy, no taps (the CUDA decode steps replay a graph)
    c.reset();
    g.reset();
    let p = prompt(n_prompt, n_vocab);
    let (mut tc, mut tg) = (argmax(&c.forward(&p, None)?), argmax(&g.forward(&p, None)?));
    let (mut seq_c, mut seq_g) = (vec![tc], vec![tg]);
    for _ in 1..n_gen {
        tc = argmax(&c.forward(&[tc], None)?);
        tg = argmax(&g.forward(&[tg], None)?);
        seq_c.push(tc);
        seq_g.push(tg);
    }
    if seq_c != seq_g {
        return Err(format!("greedy continuations differ:\n cpu:  {seq_c:?}\n cuda: {seq_g:?}").into());
    }
    eprintln!("{}: {n_taps} taps over 4 steps within {tol:e}; greedy {n_gen} tokens equal: {seq_g:?}", path.display());
    Ok(())
}

/// A sink that wants nothing: forces the uncaptured path.
struct Nothing;
impl TapSink for Nothing {
    fn wants(&self, _: &str) -> bool {
        false
    }
    fn tap(&mut self, _: TapInfo<'_>, _: &[f32]) {}
}

/// Graph replay equals the launched kernels bit for bit; prefill-at-once equals prefill + decode.
fn graph_and_kv(path: PathBuf) -> R {
    let file = open(&path)?;
    let mut a = cuda(&file, 64)?;
    let mut b = cuda(&file, 64)?;
    let n_vocab = a.config.n_vocab;
    let p = prompt(12, n_vocab);
    a.forward(&p[..9], None)?;
    b.forward(&p[..9], Some(&mut Nothing))?;
    for (i, &tok) in p[9..].iter().enumerate() {
        let la = a.forward(&[tok], None)?; // graph
        let lb = b.forward(&[tok], Some(&mut Nothing))?; // plain launches
        if la != lb {
            return Err(format!("decode step {i}: graph logits differ from launched ones (rel L2 {:e})", rel_l2(&la, &lb)).into());
        }
    }
    let last_a = a.forward(&[5], None)?;
    // the same 13 tokens in one prefill
    let mut c = cuda(&file, 64)?;
    let mut all = p.clone();
    all.push(5);
    let last_c = c.forward(&all, None)?;
    check_close("prefill 13 vs prefill 9 + 4 decode steps", &last_a, &last_c, 1e-5)?;
    if a.n_past() != 13 || c.n_past() != 13 {
        return Err(format!("n_past {} / {}", a.n_past(), c.n_past()).into());
    }
    // reset restarts at position 0
    a.reset();
    let again = a.forward(&all, None)?;
    check_close("after reset", &again, &last_c, 1e-6)?;
    Ok(())
}

/// The shipped tier's fast arithmetic with int8 decode (`CudaOptions::int8_decode`, then
/// `set_fast_math`: TF32 prefill, int8-activation decode) on a
/// prefill of 9 and 3 graph-replayed decode steps: every step's logits differ from the f32 run's
/// (the fast kernels ran) but stay within 0.1 relative L2 (a sanity bound: the shipped suites hold
/// the fast arithmetic to llama.cpp's); switched off, the same backend gives the f32 run's logits bit
/// for bit, and on again its own fast ones (the captured decode graph follows the switch).
fn fast_math_toggle(path: PathBuf) -> R {
    let file = open(&path)?;
    let run = |g: &mut CudaBackend| -> Result<Vec<Vec<f32>>, Failed> {
        g.reset();
        let p = prompt(12, g.config.n_vocab);
        let mut out = vec![g.forward(&p[..9], None)?];
        for &tok in &p[9..] {
            out.push(g.forward(&[tok], None)?);
        }
        Ok(out)
    };
    let mut a = cuda(&file, 64)?;
    let exact = run(&mut a)?;
    let mut b = CudaBackend::load(&file, CudaOptions { max_ctx: 64, int8_decode: true, ..Default::default() }).map_err(|e| format!("{e:#}"))?;
    if b.set_fast_math(true)? {
        return Err("set_fast_math(true) said the fast arithmetic was already on".into());
    }
    let fast = run(&mut b)?;
    for (i, (f, e)) in fast.iter().zip(&exact).enumerate() {
        let d = rel_l2(f, e);
        if d == 0.0 || d > 0.1 {
            return Err(format!("step {i}: fast logits at {d:e} rel L2 of the f32 ones (expected in (0, 0.1])").into());
        }
    }
    if !b.set_fast_math(false)? {
        return Err("set_fast_math(false) said the fast arithmetic was off".into());
    }
    if run(&mut b)? != exact {
        return Err("fast arithmetic switched off: logits differ from the f32 run's".into());
    }
    b.set_fast_math(true)?;
    if run(&mut b)? != fast {
        return Err("fast arithmetic switched on again: logits differ from its first run's".into());
    }
    Ok(())
}

fn bad_input(path: PathBuf) -> R {
    let file = open(&path)?;
    let mut g = cuda(&file, 8)?;
    let v = g.config.n_vocab as u32;
    let e = g.forward(&[1, v], None).err().ok_or("token id = n_vocab was accepted")?;
    if !format!("{e:#}").contains("outside the vocabulary") {
        return Err(format!("unexpected error: {e:#}").into());
    }
    let e = g.forward(&[1; 9], None).err().ok_or("9 tokens in a context of 8 were accepted")?;
    if !format!("{e:#}").contains("exceed the context") {
        return Err(format!("unexpected error: {e:#}").into());
    }
    if g.forward(&[], None).is_ok() {
        return Err("an empty batch was accepted".into());
    }
    // still usable after the errors
    g.forward(&[1, 2, 3], None)?;
    if g.n_past() != 3 {
        return Err(format!("n_past {} after errors and 3 tokens", g.n_past()).into());
    }
    Ok(())
}

/// Loading, running and dropping a backend three times leaves device memory as it was.
fn no_leak(path: PathBuf) -> R {
    let _alone = DEVICE_MEMORY.write().unwrap_or_else(|e| e.into_inner());
    let file = open(&path)?;
    // warm-up: context, kernels, cuBLAS's own one-time allocations
    drop(cuda(&file, 256)?);
    let gpu = lockstep_engine::cuda::Gpu::new()?;
    gpu.device_sync()?;
    let (free0, _) = gpu.mem_info()?;
    for _ in 0..3 {
        let mut g = cuda(&file, 256)?;
        g.forward(&prompt(20, g.config.n_vocab), None)?;
        g.forward(&[1], None)?;
        drop(g);
    }
    gpu.device_sync()?;
    let (free1, _) = gpu.mem_info()?;
    let lost = free0 as i64 - free1 as i64;
    eprintln!("free before {} MiB, after {} MiB", free0 >> 20, free1 >> 20);
    if lost > 4 << 20 {
        return Err(format!("{} KiB of device memory lost over 3 load/run/drop cycles", lost >> 10).into());
    }
    Ok(())
}

fn main() {
    let args = Arguments::from_args();
    let mut list = Vec::new();
    for name in ["tiny-qwen2.f32.gguf", "tiny-qwen2.q.gguf", "tiny-llama.f32.gguf", "tiny-llama.q.gguf"] {
        let stem = name.trim_end_matches(".gguf").replace(['.', '-'], "_");
        match find_tiny(name) {
            Some(p) => {
                let (p1, p2, p3) = (p.clone(), p.clone(), p.clone());
                list.push(Trial::test(format!("{stem}_taps_and_greedy"), beside_others(move || taps_and_greedy(p1, 23, 24, 1e-5, 1e-5))));
                list.push(Trial::test(format!("{stem}_graph_and_kv"), beside_others(move || graph_and_kv(p2))));
                list.push(Trial::test(format!("{stem}_bad_input"), beside_others(move || bad_input(p3))));
                if name.ends_with(".q.gguf") {
                    let p4 = p.clone();
                    list.push(Trial::test(format!("{stem}_fast_math_toggle"), beside_others(move || fast_math_toggle(p4))));
                }
            }
            None => list.push(Trial::test(format!("{stem}_taps_and_greedy"), || Ok(())).with_ignored_flag(true)),
        }
    }
    if let Some(p) = find_tiny("tiny-qwen2.q.gguf") {
        let p2 = p.clone();
        list.push(Trial::test("no_gpu_memory_leak", move || no_leak(p)));
        list.push(Trial::test("two_backends_in_two_threads", beside_others(move || two_threads(p2))));
    }
    for id in ["qwen2.5-coder-0.5b", "smollm2-135m"] {
        let stem = id.replace(['.', '-'], "_");
        match find_real(id) {
            Some(p) => {
                let (p2, p3) = (p.clone(), p.clone());
                list.push(Trial::test(format!("{stem}_fast_math_toggle"), beside_others(move || fast_math_toggle(p3))));
                // qwen's layer-0 attention scores reach ~8e3 (K biases of tens), where one f32 ulp is 5e-4:
                // CUDA's summation order against the CPU's (ggml's) gave kq_soft_max-0 1.37e-5 rel L2 on
                // the H100 (2026-11-26); the attention taps get 5e-5, every other tap keeps 1e-5.
                let attn_tol = if id.starts_with("qwen") { 5e-5 } else { 1e-5 };
                list.push(Trial::test(format!("{stem}_taps_and_greedy"), beside_others(move || taps_and_greedy(p, 19, 16, 1e-5, attn_tol))));
                list.push(Trial::test(format!("{stem}_graph_and_kv"), beside_others(move || graph_and_kv(p2))));
            }
            None => list.push(Trial::test(format!("{stem}_taps_and_greedy (model not in cache)"), || Ok(())).with_ignored_flag(true)),
        }
    }
    libtest_mimic::run(&args, trials(list)).exit();
}
