//! CPU backend benchmarks on the two real models (skipped, with a message, when a model is not in
//! the cache): load, one decode step at a short context, a 64-token prefill, and a prefill of 16
//! tokens + 16 greedy decode steps. `cargo bench -p lockstep-engine --bench cpu`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use lockstep_engine::backend::Backend;
use lockstep_engine::cpu::{CpuBackend, EngineOptions};
use lockstep_engine::gguf::GgufFile;
use lockstep_engine::sampler::greedy;

const MODELS: [&str; 2] = ["smollm2-135m", "qwen2.5-coder-0.5b"];

fn model_path(id: &str) -> Option<PathBuf> {
    let p = lockstep_engine::fetch::model_path(id);
    if p.exists() {
        Some(p)
    } else {
        eprintln!("bench: {} not in the cache, skipped", p.display());
        None
    }
}

/// `n` token ids spread over the vocabulary's low range (the same for every run).
fn prompt(n: u32) -> Vec<u32> {
    (0..n).map(|i| 100 + 37 * i).collect()
}

fn load(c: &mut Criterion) {
    let mut g = c.benchmark_group("load");
    g.sample_size(10).measurement_time(Duration::from_secs(20));
    for id in MODELS {
        let Some(path) = model_path(id) else { continue };
        g.bench_function(id, |b| {
            b.iter(|| {
                let f = GgufFile::open(&path).unwrap();
                CpuBackend::load(&f, EngineOptions::default()).unwrap()
            })
        });
    }
    g.finish();
}

/// One decode step (T = 1) after a 16-token prefill, at positions 16..48: the cache is reset and
/// refilled outside the timed region every 32 steps.
fn decode_step(c: &mut Criterion) {
    let mut g = c.benchmark_group("decode_step");
    g.sample_size(20).measurement_time(Duration::from_secs(20));
    for id in MODELS {
        let Some(path) = model_path(id) else { continue };
        let f = GgufFile::open(&path).unwrap();
        let mut be = CpuBackend::load(&f, EngineOptions::default()).unwrap();
        let p = prompt(16);
        g.bench_function(id, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                let mut logits = Vec::new();
                for i in 0..iters {
                    if i % 32 == 0 {
                        be.reset();
                        logits = be.forward(&p, None).unwrap();
                    }
                    let tok = greedy(&logits);
                    let t0 = Instant::now();
                    logits = be.forward(&[tok], None).unwrap();
                    total += t0.elapsed();
                }
                total
            })
        });
    }
    g.finish();
}

/// A 64-token prefill from an empty cache (the batched matmul path).
fn prefill64(c: &mut Criterion) {
    let mut g = c.benchmark_group("prefill64");
    g.sample_size(10).measurement_time(Duration::from_secs(30));
    for id in MODELS {
        let Some(path) = model_path(id) else { continue };
        let f = GgufFile::open(&path).unwrap();
        let mut be = CpuBackend::load(&f, EngineOptions::default()).unwrap();
        let p = prompt(64);
        g.bench_function(id, |b| {
            b.iter(|| {
                be.reset();
                be.forward(&p, None).unwrap()
            })
        });
    }
    g.finish();
}

fn prefill16_decode16(c: &mut Criterion) {
    let mut g = c.benchmark_group("prefill16_decode16");
    g.sample_size(10).measurement_time(Duration::from_secs(30));
    for id in MODELS {
        let Some(path) = model_path(id) else { continue };
        let f = GgufFile::open(&path).unwrap();
        let mut be = CpuBackend::load(&f, EngineOptions::default()).unwrap();
        let prompt = prompt(16);
        g.bench_function(id, |b| {
            b.iter(|| {
                be.reset();
                let mut logits = be.forward(&prompt, None).unwrap();
                for _ in 0..16 {
                    logits = be.forward(&[greedy(&logits)], None).unwrap();
                }
                logits
            })
        });
    }
    g.finish();
}

criterion_group!(benches, load, decode_step, prefill64, prefill16_decode16);
criterion_main!(benches);
