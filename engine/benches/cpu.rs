//! CPU backend benchmarks on the two real models (skipped, with a message, when a model is not in
//! the cache): load with full dequantization to f32, and a prefill of 16 tokens + 16 greedy decode
//! steps. `cargo bench -p lockstep-engine --bench cpu`.

use std::path::PathBuf;
use std::time::Duration;

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

fn prefill16_decode16(c: &mut Criterion) {
    let mut g = c.benchmark_group("prefill16_decode16");
    g.sample_size(10).measurement_time(Duration::from_secs(30));
    for id in MODELS {
        let Some(path) = model_path(id) else { continue };
        let f = GgufFile::open(&path).unwrap();
        let mut be = CpuBackend::load(&f, EngineOptions::default()).unwrap();
        let prompt: Vec<u32> = (0..16).map(|i| 100 + 37 * i).collect();
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

criterion_group!(benches, load, prefill16_decode16);
criterion_main!(benches);
