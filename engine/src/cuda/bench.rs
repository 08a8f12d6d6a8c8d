//! llama-bench style throughput tests for any [`Backend`]: `pp{N}` (one forward pass over an N-token
//! prompt from an empty cache) and `tg{N}` (N single-token decode steps from an empty cache), each
//! repeated after one warm-up run; t/s as mean ± sample standard deviation over the repetitions.
//! Every forward pass returns its logits to the host, so wall-clock time covers all device work.

use std::time::Instant;

use anyhow::Result;
use serde::Serialize;

use crate::backend::Backend;

/// One test's result (llama-bench's JSON field names where they exist).
#[derive(Debug, Clone, Serialize)]
pub struct BenchResult {
    pub test: String,
    pub n_prompt: usize,
    pub n_gen: usize,
    /// tokens per second of each repetition
    pub samples_ts: Vec<f64>,
    pub avg_ts: f64,
    pub stddev_ts: f64,
    /// Which arithmetic ran ([`Backend::kernel_path`]).
    pub path: String,
}

/// What the table's leading columns say about the run.
#[derive(Debug, Clone, Serialize)]
pub struct BenchModel {
    pub model: String,
    pub size_bytes: u64,
    pub n_params: u64,
    pub backend: String,
}

impl BenchModel {
    /// The table's description of `file` (name, size, parameter count) on the backend labelled `backend`.
    pub fn of(file: &crate::gguf::GgufFile, cfg: &crate::config::ModelConfig, backend: String) -> Self {
        let model = file.meta("general.name").and_then(|v| v.as_str()).unwrap_or(cfg.arch.name()).to_string();
        let size_bytes = file.tensors.iter().map(|t| t.n_bytes).sum();
        let n_params = file.tensors.iter().map(|t| t.n_elements()).sum();
        Self { model, size_bytes, n_params, backend }
    }
}

/// llama-bench's pair of tests: `pp{p}` (skipped when p = 0), then `tg{n}` (skipped when n = 0).
pub fn run(b: &mut dyn Backend, p: usize, n: usize, reps: usize, n_vocab: usize) -> Result<Vec<BenchResult>> {
    let mut results = Vec::new();
    if p > 0 {
        results.push(prompt(b, p, reps, n_vocab)?);
    }
    if n > 0 {
        results.push(generate(b, n, reps, n_vocab)?);
    }
    Ok(results)
}

fn tokens(n: usize, n_vocab: usize) -> Vec<u32> {
    // deterministic, spread over the vocabulary, never id 0
    (0..n).map(|i| (1 + (i * 7919) % (n_vocab.max(2) - 1)) as u32).collect()
}

fn stats(test: String, n_prompt: usize, n_gen: usize, samples_ts: Vec<f64>) -> BenchResult {
    let n = samples_ts.len() as f64;
    let avg = samples_ts.iter().sum::<f64>() / n;
    let var = if samples_ts.len() > 1 { samples_ts.iter().map(|x| (x - avg).powi(2)).sum::<f64>() / (n - 1.0) } else { 0.0 };
    BenchResult { test, n_prompt, n_gen, samples_ts, avg_ts: avg, stddev_ts: var.sqrt(), path: String::new() }
}

/// `pp{n}`: prefill of n tokens, `reps` timed runs after one warm-up.
pub fn prompt(b: &mut dyn Backend, n: usize, reps: usize, n_vocab: usize) -> Result<BenchResult> {
    let toks = tokens(n, n_vocab);
    let mut samples = Vec::with_capacity(reps);
    for r in 0..=reps {
        b.reset();
        let t0 = Instant::now();
        b.forward(&toks, None)?;
        let dt = t0.elapsed().as_secs_f64();
        if r > 0 {
            samples.push(n as f64 / dt);
        }
    }
    b.reset();
    Ok(BenchResult { path: b.kernel_path(n), ..stats(format!("pp{n}"), n, 0, samples) })
}

/// `tg{n}`: n single-token decode steps from an empty cache, `reps` timed runs after one warm-up.
pub fn generate(b: &mut dyn Backend, n: usize, reps: usize, n_vocab: usize) -> Result<BenchResult> {
    let toks = tokens(n, n_vocab);
    let mut samples = Vec::with_capacity(reps);
    for r in 0..=reps {
        b.reset();
        let t0 = Instant::now();
        for &tok in &toks {
            b.step(&[tok])?;
        }
        let dt = t0.elapsed().as_secs_f64();
        if r > 0 {
            samples.push(n as f64 / dt);
        }
    }
    b.reset();
    Ok(BenchResult { path: b.kernel_path(1), ..stats(format!("tg{n}"), 0, n, samples) })
}

/// llama-bench's markdown table.
pub fn table(m: &BenchModel, results: &[BenchResult]) -> String {
    let size = format!("{:.2} MiB", m.size_bytes as f64 / (1024.0 * 1024.0));
    let params = if m.n_params >= 1_000_000_000 { format!("{:.2} B", m.n_params as f64 / 1e9) } else { format!("{:.2} M", m.n_params as f64 / 1e6) };
    let mut s = String::from("| model | size | params | backend | test | t/s |\n| --- | ---: | ---: | --- | ---: | ---: |\n");
    for r in results {
        s.push_str(&format!("| {} | {} | {} | {} | {} | {:.2} ± {:.2} |\n", m.model, size, params, m.backend, r.test, r.avg_ts, r.stddev_ts));
    }
    for r in results.iter().filter(|r| !r.path.is_empty()) {
        s.push_str(&format!("{}: {}\n", r.test, r.path));
    }
    s
}

/// The same as JSON: one object per test, llama-bench style fields.
pub fn json(m: &BenchModel, results: &[BenchResult]) -> serde_json::Value {
    serde_json::Value::Array(
        results
            .iter()
            .map(|r| {
                serde_json::json!({
                    "model_type": m.model, "model_size": m.size_bytes, "model_n_params": m.n_params,
                    "backend": m.backend, "test": r.test, "n_prompt": r.n_prompt, "n_gen": r.n_gen,
                    "avg_ts": r.avg_ts, "stddev_ts": r.stddev_ts, "samples_ts": r.samples_ts, "path": r.path,
                })
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_are_mean_and_sample_stddev() {
        let r = stats("tg2".into(), 0, 2, vec![1.0, 3.0]);
        assert_eq!(r.avg_ts, 2.0);
        assert!((r.stddev_ts - 2f64.sqrt()).abs() < 1e-12);
        let m = BenchModel { model: "qwen2 0.5B".into(), size_bytes: 1 << 20, n_params: 494_000_000, backend: "CUDA".into() };
        let t = table(&m, &[r]);
        assert!(t.contains("| qwen2 0.5B | 1.00 MiB | 494.00 M | CUDA | tg2 | 2.00 ± 1.41 |"), "{t}");
    }
}
