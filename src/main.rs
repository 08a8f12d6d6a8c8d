//! The `lockstep` command line: validate, compare, and thin wrappers over the engine (generate, dump,
//! inspect, fetch, bench).

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use lockstep::golden::{self, Manifest};
use lockstep::report::{table, Provenance, Report};
use lockstep::vocab::{Backend, Tier};
use lockstep_engine::faults::Fault;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "lockstep", version, about = "Tells an LLM inference engine's authors where it stops agreeing with llama.cpp")]
struct Cli {
    /// The golden directory (holding manifest.json). Default: `$LOCKSTEP_GOLDEN`, else `golden/` of the
    /// nearest directory upward from here that has `golden/manifest.json`, else the build's checkout.
    #[arg(long = "golden-dir", global = true, value_name = "DIR")]
    golden_dir: Option<PathBuf>,
    /// The suites directory. Default: `$LOCKSTEP_SUITES`, else `suites/` beside that golden directory.
    #[arg(long = "suites", global = true, value_name = "DIR")]
    suites_dir: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run suites against the goldens; exit status 1 when anything fails.
    Validate {
        /// Suite files (default: every suites/*.toml).
        #[arg(long = "suite")]
        suites: Vec<PathBuf>,
        /// Which backends (all: each case's own list, those not available here reported ignored).
        #[arg(long, value_enum, default_value_t = Backends::All)]
        backend: Backends,
        /// Where report.json, report.html and junit.xml go.
        #[arg(long, default_value = "reports/latest")]
        report: PathBuf,
        /// Inject a fault of the catalog into the engine (`lockstep faults`; the bug classes:
        /// docs/bug-classes.md).
        #[arg(long, value_enum)]
        inject: Option<Inject>,
        /// Only cases whose `{suite}::{case}::{backend}` name contains this.
        #[arg(long)]
        filter: Option<String>,
        /// Then run each failing case whose golden lacks some taps (the committed real-model goldens keep
        /// some layers only) again against an on-demand full-tap golden of the same model, prompt, tier
        /// and steps (`lockstep golden`, cached), and report the pinned first divergence beside the
        /// case's own verdict. Needs the golden venv (or the entries cached).
        #[arg(long)]
        pin: bool,
    },
    /// Judge an engine's dump (golden naming) against a golden entry: checks 2, 3, 4, 7.
    Compare {
        #[arg(long)]
        dump: PathBuf,
        /// model/tier/prompt (e.g. qwen2.5-coder-0.5b/exact/haiku) or the golden file's path (relative to
        /// golden/, or any path to a file the manifest lists); or an on-demand golden made by `lockstep
        /// golden`: `cache:KEY`, its entry directory, or the taps file in it.
        #[arg(long)]
        golden: String,
        #[arg(long, default_value = "reports/compare")]
        report: PathBuf,
    },
    /// Export an on-demand golden with llama.cpp: every tap of every layer at every step of any GGUF
    /// model and prompt, into the cache ($LOCKSTEP_CACHE/goldens/KEY); prints the entry for
    /// `lockstep compare --golden`. A repeated request is answered from the cache.
    Golden {
        /// A model id (`lockstep fetch` lists them; also gemma3-270m) or a GGUF path.
        #[arg(long)]
        model: String,
        /// The prompt text, tokenized as is (special tokens parsed, BOS added as the model says).
        #[arg(long, conflicts_with = "chat", required_unless_present = "chat")]
        prompt: Option<String>,
        /// A JSON list of {"role", "content"} messages, rendered with the model's own chat template.
        #[arg(long, value_name = "FILE.json")]
        chat: Option<PathBuf>,
        /// exact (F32 copy of the dequantized weights), shipped (the file as it is) or both.
        #[arg(long, value_enum, default_value_t = Tiers::Exact)]
        tier: Tiers,
        /// Steps with taps, the prefill included (5: the prefill and 4 decode steps).
        #[arg(long, default_value_t = lockstep::ondemand::DEFAULT_STEPS)]
        steps: usize,
        /// all, or a comma-separated list of tap families (l_out,kq_soft_max,result_output).
        #[arg(long, default_value = "all")]
        taps: String,
        /// Also copy the entry (manifest.json + taps.safetensors) into this directory (DIR/exact and
        /// DIR/shipped with --tier both); `lockstep compare --golden DIR` accepts it.
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
    },
    /// Generate text with the CPU engine.
    Generate {
        #[arg(long)]
        model: String,
        #[arg(long)]
        prompt: String,
        #[arg(long)]
        chat: bool,
        #[arg(long, default_value_t = 64)]
        max_tokens: usize,
        #[arg(long)]
        temperature: Option<f32>,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long)]
        json: bool,
    },
    /// Write every tap of the prefill and N greedy decode steps to a safetensors file.
    Dump {
        #[arg(long)]
        model: String,
        #[arg(long)]
        prompt: String,
        #[arg(long)]
        chat: bool,
        #[arg(long, default_value_t = 4)]
        steps: usize,
        #[arg(long)]
        out: PathBuf,
    },
    /// Print a GGUF file's metadata and tensor table.
    Inspect { file: PathBuf },
    /// Fetch a known model (or all) into the cache.
    Fetch { model: Option<String> },
    /// List the injectable faults with a one-line description and the bug class each plants
    /// (docs/bug-classes.md).
    Faults,
    /// llama-bench style throughput: prompt processing (pp) and generation (tg) tokens per second.
    Bench {
        /// A known model id (`lockstep fetch` lists them) or a GGUF path.
        #[arg(long, default_value = "qwen2.5-coder-0.5b")]
        model: String,
        #[arg(long, value_enum, default_value_t = Backend::Cuda)]
        backend: Backend,
        /// Prompt tokens of the pp test (0: skip it).
        #[arg(short = 'p', default_value_t = 512)]
        prompt: usize,
        /// Generated tokens of the tg test (0: skip it).
        #[arg(short = 'n', default_value_t = 128)]
        gen: usize,
        /// Repetitions of each test (mean ± stddev over them).
        #[arg(short = 'r', default_value_t = 5)]
        reps: usize,
        /// Also write the results as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Merge the per-rank dumps of an engine split across GPUs into one dump (docs/shards.md).
    MergeShards {
        /// The shard spec (TOML): for each tap family the axis its ranks' slices are concatenated on,
        /// "replicated" or "sum".
        #[arg(long)]
        spec: PathBuf,
        /// The merged dump (written through a temporary file, renamed into place).
        #[arg(long)]
        out: PathBuf,
        /// The ranks' dump files, rank 0 first.
        #[arg(required = true)]
        ranks: Vec<PathBuf>,
    },
}

/// `validate --backend`: one backend, or every case's own list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Backends {
    Cpu,
    Cuda,
    All,
}

/// `golden --tier`: one tier or both.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Tiers {
    Exact,
    Shipped,
    Both,
}

impl Tiers {
    fn tiers(self) -> Vec<Tier> {
        match self {
            Tiers::Exact => vec![Tier::Exact],
            Tiers::Shipped => vec![Tier::Shipped],
            Tiers::Both => Tier::ALL.to_vec(),
        }
    }
}

/// `validate --inject`: a fault of the catalog, by its name (clap lists them with their descriptions).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Inject(Fault);

impl clap::ValueEnum for Inject {
    fn value_variants<'a>() -> &'a [Self] {
        static ALL: std::sync::OnceLock<Vec<Inject>> = std::sync::OnceLock::new();
        ALL.get_or_init(|| Fault::ALL.into_iter().map(Inject).collect())
    }

    fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
        let i = self.0.info();
        Some(clap::builder::PossibleValue::new(i.name).help(i.description))
    }
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("lockstep: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> Result<bool> {
    // The directories are process-wide settings (the engine finds the tiny models through them too):
    // set once here, before any thread starts.
    for (dir, var) in [(&cli.golden_dir, "LOCKSTEP_GOLDEN"), (&cli.suites_dir, "LOCKSTEP_SUITES")] {
        if let Some(d) = dir {
            anyhow::ensure!(d.is_dir(), "{}: not a directory", d.display());
            std::env::set_var(var, std::path::absolute(d).unwrap_or_else(|_| d.clone()));
        }
    }
    match cli.cmd {
        Cmd::Validate { suites, backend, report, inject, filter, pin } => validate(suites, backend, &report, inject.map(|i| i.0), filter, pin),
        Cmd::Compare { dump, golden: entry, report } => {
            // An on-demand golden (cache:KEY, an entry's directory or file) has its own manifest.
            let (manifest, entry) = match lockstep::ondemand::resolve_entry(&entry)? {
                Some(found) => found,
                None => (Manifest::load(&golden::default_dir())?, entry),
            };
            let case = lockstep::compare::compare_dump(&manifest, &dump, &entry, None)?;
            let rep = Report::new(Provenance::here(serde_json::Value::Object(manifest.provenance.clone()), None), vec![case]);
            print!("{}", table::render(&rep));
            for c in &rep.cases {
                for k in c.failed_checks() {
                    let v = if k.value.is_finite() { format!("{:.3e}", k.value) } else { "non-finite".into() };
                    println!("  {}: {} = {v} (limit {:.3e}) {}", k.name, k.metric, k.limit, k.detail.clone().unwrap_or_default());
                }
                if let Some(l) = &c.likely_class {
                    println!("  likely class: {l}{}", c.evidence.as_ref().map_or(String::new(), |e| format!(" — {e}")));
                }
                if let (Some(p), Some(d)) = (&c.class_proof, &c.first_divergence) {
                    println!("  {}", p.summary(&format!("s{}/{}", d.step, d.tap)));
                }
                for line in c.coverage.iter().flat_map(|k| k.lines(8)) {
                    println!("  {line}");
                }
            }
            rep.write(&report)?;
            // The golden holds none of the first failing tap's inputs: the command for a full-tap golden
            // of this entry (its chat messages, if any, written beside the report), to judge the dump again.
            if let Some(d) = rep.cases.first().and_then(|c| c.first_divergence.as_ref()) {
                match lockstep::pin::compare_pin_command(&manifest, &entry, d, &report.join("pin-chat.json")) {
                    Ok(Some(cmd)) => {
                        println!(
                            "  pin it: the golden holds none of s{}/{}'s inputs; make a full-tap golden of this entry and judge the dump against it:",
                            d.step, d.tap
                        );
                        println!("    {cmd}");
                        println!("    lockstep compare --dump {} --golden cache:KEY   (KEY: the name the first command prints)", dump.display());
                    }
                    Ok(None) => {}
                    Err(e) => println!("  (no pin command for this golden: {e:#})"),
                }
            }
            println!("report: {}", report.join("report.html").display());
            Ok(rep.passed)
        }
        Cmd::Generate { model, prompt, chat, max_tokens, temperature, seed, json } => {
            engine_cli::generate(&model, &prompt, chat, max_tokens, temperature, seed, json)
        }
        Cmd::Dump { model, prompt, chat, steps, out } => engine_cli::dump(&model, &prompt, chat, steps, &out),
        Cmd::Inspect { file } => engine_cli::inspect(&file),
        Cmd::Fetch { model } => engine_cli::fetch(model.as_deref()),
        Cmd::Bench { model, backend, prompt, gen, reps, json } => engine_cli::bench(&model, backend, prompt, gen, reps, json.as_deref()),
        Cmd::MergeShards { spec, out, ranks } => merge_shards(&spec, &out, &ranks),
        Cmd::Golden { model, prompt, chat, tier, steps, taps, out } => golden_cmd(model, prompt, chat, tier, steps, &taps, out.as_deref()),
        Cmd::Faults => {
            for f in Fault::ALL {
                let i = f.info();
                println!("{:<24} {}  [class: {}; shows: {}; model: {}]", i.name, i.description, i.class, i.shows, i.model);
            }
            Ok(true)
        }
    }
}

/// `lockstep golden`: the on-demand goldens of one request (src/ondemand.rs), one line per tier.
fn golden_cmd(
    model: String,
    prompt: Option<String>,
    chat: Option<PathBuf>,
    tier: Tiers,
    steps: usize,
    taps: &str,
    out: Option<&std::path::Path>,
) -> Result<bool> {
    use lockstep::ondemand::{self, PromptSpec, Request, Taps};
    let prompt = match (prompt, chat) {
        (Some(p), None) => PromptSpec::Text(p),
        (None, Some(f)) => PromptSpec::Chat(ondemand::read_chat(&f)?),
        _ => bail!("give --prompt TEXT or --chat FILE.json"),
    };
    let tiers: Vec<String> = tier.tiers().iter().map(|t| t.name().to_string()).collect();
    let req = Request { model, prompt, tiers, steps, taps: Taps::parse(taps).context("--taps")? };
    let entries = ondemand::ensure(&req)?;
    for e in &entries {
        let how = if e.hit { "cached, llama.cpp not run".to_string() } else { format!("exported in {:.1} s", e.seconds) };
        println!("{} {}: {} ({how}; {} prompt tokens, {} tensors, {:.1} MB)", e.model, e.tier, e.name(), e.tokens, e.tensors, e.bytes as f64 / 1e6);
        println!("  {}", e.dir.display());
        if let Some(dir) = out {
            let dst = if entries.len() > 1 { dir.join(&e.tier) } else { dir.to_path_buf() };
            ondemand::copy_entry(e, &dst)?;
            println!("  copied to {}", dst.display());
        }
    }
    if let Some(e) = entries.first() {
        println!("judge a dump: lockstep compare --dump YOUR_DUMP.safetensors --golden {}", e.name());
    }
    Ok(true)
}

fn merge_shards(spec: &std::path::Path, out: &std::path::Path, ranks: &[PathBuf]) -> Result<bool> {
    let spec = lockstep::shards::ShardSpec::load(spec)?;
    let s = lockstep::shards::merge_files(&spec, ranks, out)?;
    println!(
        "{}: {} ranks merged: {} taps split, {} replicated (max difference between ranks {:.3e}), {} summed, {} other tensors",
        out.display(),
        s.ranks,
        s.split,
        s.replicated,
        s.max_replicated_diff,
        s.summed,
        s.other
    );
    if !s.unused_patterns.is_empty() {
        println!("note: spec patterns that matched no tap: {}", s.unused_patterns.join(", "));
    }
    Ok(true)
}

fn validate(suites: Vec<PathBuf>, backend: Backends, report: &std::path::Path, fault: Option<Fault>, filter: Option<String>, pin: bool) -> Result<bool> {
    let suites = if suites.is_empty() {
        lockstep::suite::load_dir(&lockstep::suite::default_dir())?
    } else {
        suites.iter().map(|p| lockstep::suite::Suite::load(p)).collect::<Result<Vec<_>, _>>()?
    };
    let backends: Option<Vec<Backend>> = match backend {
        Backends::All => None,
        Backends::Cpu => Some(vec![Backend::Cpu]),
        Backends::Cuda => Some(vec![Backend::Cuda]),
    };
    let manifest = Manifest::load(&golden::default_dir())?;
    let mut trials = lockstep::validate::trials(&suites, backends.as_deref());
    if let Some(f) = &filter {
        trials.retain(|(s, c, b)| format!("{}::{}::{b}", s.name, c.name).contains(f.as_str()));
    }
    let bar = indicatif::ProgressBar::new(trials.len() as u64);
    bar.set_style(indicatif::ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} {msg}").expect("static template").progress_chars("=> "));
    let mut runner = lockstep::validate::Runner::default();
    runner.fault = fault;
    let mut cases = Vec::new();
    for (s, c, b) in &trials {
        bar.set_message(format!("{}::{}::{b}", s.name, c.name));
        cases.push(runner.run(&manifest, s, c, *b));
        bar.inc(1);
    }
    bar.finish_and_clear();
    if pin {
        // After the normal run: each failing case with a partial golden, against a full-tap one (the
        // export's progress on stderr). The cases' own verdicts stay as they are.
        let (pinned, not) = lockstep::pin::pin_all(&mut runner, &manifest, &trials, &mut cases, &lockstep::pin::chat_dir(report));
        if pinned + not > 0 {
            eprintln!(
                "lockstep validate --pin: {pinned} case(s) pinned against a full-tap golden{}",
                if not > 0 { format!(", {not} could not be (the table says why)") } else { String::new() }
            );
        }
    }
    let rep = Report::new(Provenance::here(serde_json::Value::Object(manifest.provenance.clone()), lockstep::validate::gpu_name()), cases);
    print!("{}", table::render(&rep));
    rep.write(report)?;
    println!("report: {} (report.json, junit.xml beside it)", report.join("report.html").display());
    Ok(rep.passed)
}

/// Thin wrappers over the engine.
mod engine_cli {
    use super::*;
    use lockstep_engine::chat::ChatMessage;
    use lockstep_engine::model::{Model, Prompt};

    fn prompt(text: &str, chat: bool) -> Prompt {
        if chat {
            Prompt::Chat(vec![ChatMessage::new("user", text)])
        } else {
            Prompt::Text(text.to_string())
        }
    }

    pub fn generate(model: &str, text: &str, chat: bool, max_tokens: usize, temperature: Option<f32>, seed: u64, json: bool) -> Result<bool> {
        let m = Model::open(model)?;
        let ids = m.prompt_tokens(&prompt(text, chat))?;
        let mut backend = lockstep_engine::cpu::CpuBackend::load(&m.file, Default::default())?;
        let mut sampler =
            temperature.map(|t| lockstep_engine::sampler::Sampler::new(lockstep_engine::sampler::SamplerParams { temperature: t, seed, ..Default::default() }));
        let tk = &m.tokenizer;
        let g = lockstep_engine::generate::generate(&mut backend, &ids, max_tokens, sampler.as_mut(), &|t| tk.is_eog(t), false)?;
        let out = tk.decode(&g.tokens);
        if json {
            println!("{}", serde_json::json!({"prompt_tokens": ids, "tokens": g.tokens, "text": out}));
        } else {
            println!("{out}");
        }
        Ok(true)
    }

    pub fn dump(model: &str, text: &str, chat: bool, steps: usize, out: &std::path::Path) -> Result<bool> {
        let m = Model::open(model)?;
        let ids = m.prompt_tokens(&prompt(text, chat))?;
        let mut backend = lockstep_engine::cpu::CpuBackend::load(&m.file, Default::default())?;
        lockstep_engine::dump::dump(&mut backend, &ids, steps, out).with_context(|| format!("writing {}", out.display()))?;
        println!("{}: prefill of {} tokens + {steps} decode steps", out.display(), ids.len());
        Ok(true)
    }

    pub fn inspect(file: &std::path::Path) -> Result<bool> {
        let f = lockstep_engine::gguf::GgufFile::open(file)?;
        println!("{}: GGUF v{}, alignment {}, {} metadata keys, {} tensors", file.display(), f.version, f.alignment, f.metadata.len(), f.tensors.len());
        for (k, _) in &f.metadata {
            let v = match f.meta_array(k) {
                Ok(a) => format!("[array of {}]", a.len()),
                Err(_) => f
                    .meta_str(k)
                    .map(|s| format!("{:?}", s.chars().take(80).collect::<String>()))
                    .or_else(|_| f.meta_f64(k).map(|v| v.to_string()))
                    .unwrap_or_else(|_| "…".into()),
            };
            println!("  {k} = {v}");
        }
        println!("{:<40} {:>8} {:<24} {:>12}", "tensor", "type", "ne", "bytes");
        for t in &f.tensors {
            println!("{:<40} {:>8} {:<24} {:>12}", t.name, t.ty.to_string(), format!("{:?}", t.ne), t.n_bytes);
        }
        Ok(true)
    }

    /// `lockstep bench`: the same measurement as engine/examples/bench.rs (lockstep_engine::cuda::bench).
    pub fn bench(model: &str, backend: Backend, p: usize, n: usize, r: usize, json: Option<&std::path::Path>) -> Result<bool> {
        use lockstep_engine::backend::Backend as Engine;
        use lockstep_engine::cuda::bench::{self, BenchModel};
        if r == 0 {
            bail!("-r 0: at least one repetition is needed");
        }
        let m = Model::open(model)?;
        let (file, cfg) = (&m.file, &m.config);
        let ctx = (p.max(n) + 16).min(cfg.n_ctx_train);
        let (mut b, dev): (Box<dyn Engine>, String) = match backend {
            Backend::Cuda => {
                lockstep_engine::cuda::backend::check_env()?;
                let info = lockstep_engine::cuda::available().map_err(|e| anyhow::anyhow!("--backend cuda: no usable CUDA device ({e}); try --backend cpu"))?;
                let opts = lockstep_engine::cuda::CudaOptions { max_ctx: ctx, batch: p.max(1), ..Default::default() };
                (Box::new(lockstep_engine::cuda::CudaBackend::load(file, opts)?), format!("CUDA ({})", info.name))
            }
            Backend::Cpu => {
                let opts = lockstep_engine::cpu::EngineOptions { threads: 0, max_ctx: ctx };
                (Box::new(lockstep_engine::cpu::CpuBackend::load(file, opts)?), "CPU".to_string())
            }
        };
        let bm = BenchModel::of(file, cfg, dev);
        let results = bench::run(b.as_mut(), p, n, r, cfg.n_vocab)?;
        print!("{}", bench::table(&bm, &results));
        if let Some(f) = json {
            let j = serde_json::to_string_pretty(&bench::json(&bm, &results))?;
            std::fs::write(f, j).with_context(|| format!("writing {}", f.display()))?;
            println!("json: {}", f.display());
        }
        Ok(true)
    }

    pub fn fetch(model: Option<&str>) -> Result<bool> {
        let ids: Vec<String> = match model {
            Some(m) => vec![m.to_string()],
            None => lockstep_engine::fetch::known_models().iter().map(|k| k.id.to_string()).collect(),
        };
        for id in ids {
            let p = lockstep_engine::fetch::resolve_model(&id, true)?;
            println!("{id}: {}", p.display());
        }
        Ok(true)
    }
}
