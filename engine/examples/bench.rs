//! llama-bench style throughput of one model on one backend:
//! `cargo run --release -p lockstep-engine --example bench -- MODEL.gguf [cuda|cpu] [-p 512] [-n 128] [-r 5] [--json FILE]`
//! Prints llama-bench's markdown table (model, size, params, backend, test, t/s mean ± stddev) and
//! writes the same results as JSON (to FILE, or after the table).

use anyhow::{bail, Context, Result};
use lockstep_engine::backend::Backend;
use lockstep_engine::cuda::bench::{self, BenchModel};
use lockstep_engine::gguf::GgufFile;

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let mut model = None;
    let (mut backend, mut p, mut n, mut r, mut json_out) = ("cuda".to_string(), 512usize, 128usize, 5usize, None);
    while let Some(a) = args.next() {
        let mut val = |name: &str| args.next().with_context(|| format!("{name} needs a value"));
        match a.as_str() {
            "-p" => p = val("-p")?.parse()?,
            "-n" => n = val("-n")?.parse()?,
            "-r" => r = val("-r")?.parse()?,
            "--json" => json_out = Some(val("--json")?),
            "cuda" | "cpu" => backend = a,
            _ if model.is_none() => model = Some(a),
            _ => bail!("unexpected argument {a}"),
        }
    }
    let path = model.context("usage: bench MODEL.gguf [cuda|cpu] [-p N] [-n N] [-r N] [--json FILE]")?;
    let file = GgufFile::open(std::path::Path::new(&path))?;
    let cfg = lockstep_engine::config::ModelConfig::from_gguf(&file)?;
    let ctx = (p.max(n) + 16).min(cfg.n_ctx_train);
    let mut b: Box<dyn Backend> = match backend.as_str() {
        "cuda" => {
            lockstep_engine::cuda::backend::check_env()?;
            Box::new(lockstep_engine::cuda::CudaBackend::load(
                &file,
                lockstep_engine::cuda::CudaOptions { max_ctx: ctx, batch: p.max(1), ..Default::default() },
            )?)
        }
        _ => Box::new(lockstep_engine::cpu::CpuBackend::load(&file, lockstep_engine::cpu::EngineOptions { threads: 0, max_ctx: ctx })?),
    };
    let dev = match backend.as_str() {
        "cuda" => format!("CUDA ({})", lockstep_engine::cuda::available().map(|d| d.name).unwrap_or_default()),
        _ => "CPU".to_string(),
    };
    let m = BenchModel::of(&file, &cfg, dev);
    let results = bench::run(b.as_mut(), p, n, r, cfg.n_vocab)?;
    print!("{}", bench::table(&m, &results));
    let j = serde_json::to_string_pretty(&bench::json(&m, &results))?;
    match json_out {
        Some(f) => std::fs::write(&f, j).with_context(|| format!("writing {f}"))?,
        None => println!("{j}"),
    }
    Ok(())
}
