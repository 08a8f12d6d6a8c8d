//! On-demand goldens (`lockstep golden`, and suite cases whose `golden` is a table): every tap of every
//! layer at every step, for any GGUF model and prompt, exported by the pinned llama.cpp into the cache.
//!
//! The export itself is ci/golden/ondemand.py (the regenerate script's code, run in its environment,
//! `$LOCKSTEP_CACHE/venv`, built by ci/golden/venv.sh on first use). This module is the wrapper: it
//! resolves the model, finds or builds that environment, runs the exporter with its progress on stderr,
//! and answers a request it has seen before from the cache without starting Python at all.
//!
//! Cache layout (`{cache}` = `$LOCKSTEP_CACHE` or ~/.cache/lockstep):
//! - `{cache}/goldens/{key}/manifest.json` + `taps.safetensors`: one entry, golden/manifest.json's schema.
//!   key = sha256(model sha256, token ids, tier, steps, taps selection, exporter version), computed by
//!   the exporter once it has tokenized the prompt; entries appear by rename only when complete.
//! - `{cache}/goldens/requests/{request key}`: the entry key a request (model sha256, prompt text or
//!   messages, tier, steps, taps, exporter version) led to, so that a repeated request needs no
//!   tokenizer and no Python.
//! - `{cache}/goldens/sha256/{hash of the path}`: "size mtime sha256" of model files already hashed.
//!
//! An entry is named `cache:{key}` (or by its directory, or its safetensors file): [`resolve_entry`]
//! turns any of these into its manifest for `lockstep compare --golden` and the suite runner.

use crate::golden::Manifest;
use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Steps with taps, the prefill included, when a request does not say (the committed goldens' count).
pub const DEFAULT_STEPS: usize = 5;
/// The exporter's files whose content is part of every key: a change in any of them makes new entries.
/// Paths relative to ci/golden/; the noise records come from noise.py's f64 evaluation, the outside
/// engine (which noise.py imports from there), so a change in either makes new entries too.
const EXPORTER_SOURCES: [&str; 9] = [
    "requirements.txt",
    "capture.py",
    "export.py",
    "ondemand.py",
    "prompts.py",
    "ggufutil.py",
    "dequant.py",
    "noise.py",
    "../../tests/outside_engine/numpy_engine.py",
];
/// Set to 1: suite cases and tests may build the golden venv when it is missing (they are reported
/// ignored with the reason otherwise; `lockstep golden` always builds it).
pub const BUILD_ENV: &str = "LOCKSTEP_ONDEMAND_BUILD";
/// Overrides the golden venv's directory (default `{cache}/venv`, the regenerate script's).
pub const VENV_ENV: &str = "LOCKSTEP_GOLDEN_VENV";
/// Overrides where the exporter (ci/golden/) is looked for.
pub const EXPORTER_ENV: &str = "LOCKSTEP_EXPORTER_DIR";

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// What the model is fed: a text tokenized as is, or messages rendered with the model's chat template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PromptSpec {
    Text(String),
    Chat(Vec<Message>),
}

/// Which taps an entry keeps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Taps {
    All,
    /// Tap families (a tap's name without layer and stage: `l_out`, `kq_soft_max`, `result_output`), sorted.
    Families(Vec<String>),
}

impl Taps {
    /// `all` or `FAM,FAM…`.
    pub fn parse(spec: &str) -> Result<Taps> {
        if spec.trim() == "all" {
            return Ok(Taps::All);
        }
        let mut fams: Vec<String> = spec.split(',').map(|f| f.trim().to_string()).filter(|f| !f.is_empty()).collect();
        fams.sort();
        fams.dedup();
        if fams.is_empty() {
            bail!("taps {spec:?}: expected `all` or a comma-separated list of tap families (l_out,kq_soft_max)");
        }
        if let Some(bad) = fams.iter().find(|f| !f.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')) {
            bail!("taps {spec:?}: {bad:?} is not a tap family (a tap's name without layer and stage: Qcur, kq_soft_max, l_out, result_output)");
        }
        Ok(Taps::Families(fams))
    }

    /// The exporter's `--taps` argument.
    pub fn arg(&self) -> String {
        match self {
            Taps::All => "all".into(),
            Taps::Families(f) => f.join(","),
        }
    }
}

/// A request for on-demand goldens: one entry per tier.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// A known model id, a tiny model id, a GGUF path, or an id only the exporter can fetch (gemma3-270m).
    pub model: String,
    pub prompt: PromptSpec,
    /// "exact", "shipped" or both.
    pub tiers: Vec<String>,
    pub steps: usize,
    pub taps: Taps,
}

impl Request {
    /// "tiny-qwen2 exact, \"Once upon a time\", 5 steps, taps all" (for messages).
    pub fn describe(&self) -> String {
        let p = match &self.prompt {
            PromptSpec::Text(t) => format!("{:?}", shorten(t, 40)),
            PromptSpec::Chat(m) => format!("chat of {} message{}", m.len(), if m.len() == 1 { "" } else { "s" }),
        };
        format!("{} {}, {p}, {} steps, taps {}", self.model, self.tiers.join("+"), self.steps, self.taps.arg())
    }
}

fn shorten(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        format!("{}…", s.chars().take(n).collect::<String>())
    }
}

/// Reads a chat file: a JSON list of {"role", "content"} messages, or {"messages": [...]}.
pub fn read_chat(path: &Path) -> Result<Vec<Message>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("--chat {}: cannot read", path.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("--chat {}: not JSON", path.display()))?;
    let list = match v {
        serde_json::Value::Object(mut o) => o.remove("messages").unwrap_or(serde_json::Value::Null),
        other => other,
    };
    let msgs: Vec<Message> = serde_json::from_value(list).map_err(|e| {
        anyhow!(
            "--chat {}: expected a list of {{\"role\": string, \"content\": string}} messages (or an object with one under \"messages\"): {e}",
            path.display()
        )
    })?;
    if msgs.is_empty() {
        bail!("--chat {}: no messages", path.display());
    }
    Ok(msgs)
}

/// One on-demand golden in the cache.
#[derive(Debug, Clone)]
pub struct Entry {
    pub key: String,
    pub dir: PathBuf,
    /// The taps file inside `dir`.
    pub file: PathBuf,
    pub tier: String,
    pub model: String,
    /// True when the entry was already in the cache (no llama.cpp run).
    pub hit: bool,
    /// Bytes of the entry (manifest and taps file).
    pub bytes: u64,
    /// Seconds this request spent on the entry (the export, or the lookup).
    pub seconds: f64,
    pub tokens: usize,
    pub tensors: usize,
}

impl Entry {
    /// The name `lockstep compare --golden` and [`resolve_entry`] accept.
    pub fn name(&self) -> String {
        format!("cache:{}", self.key)
    }

    fn from_dir(dir: &Path, hit: bool, seconds: f64) -> Result<Entry> {
        let m = Manifest::load(dir)?;
        let f = m.taps_files().next().ok_or_else(|| anyhow!("{}: the manifest lists no taps file", m.path.display()))?;
        let bytes = std::fs::read_dir(dir)
            .with_context(|| format!("{}: cannot list", dir.display()))?
            .filter_map(|e| e.ok()?.metadata().ok())
            .filter(|md| md.is_file())
            .map(|md| md.len())
            .sum();
        Ok(Entry {
            key: dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
            dir: dir.to_path_buf(),
            file: dir.join(&f.path),
            tier: f.tier.clone().unwrap_or_default(),
            model: f.model.clone().unwrap_or_default(),
            hit,
            bytes,
            seconds,
            tokens: f.tokens.as_ref().map_or(0, |t| t.len()),
            tensors: f.tensors.len(),
        })
    }
}

/// `{cache}/goldens`.
pub fn cache_root() -> PathBuf {
    lockstep_engine::fetch::cache_dir().join("goldens")
}

/// The golden venv: `$LOCKSTEP_GOLDEN_VENV`, else `{cache}/venv` (ci/regenerate-golden's).
pub fn venv_dir() -> PathBuf {
    match std::env::var_os(VENV_ENV) {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => lockstep_engine::fetch::cache_dir().join("venv"),
    }
}

/// ci/golden/ of the checkout: `$LOCKSTEP_EXPORTER_DIR`, else the nearest `ci/golden/ondemand.py` from
/// the current directory upward, else the checkout this binary was built from.
pub fn exporter_dir() -> Result<PathBuf> {
    if let Some(d) = std::env::var_os(EXPORTER_ENV).filter(|d| !d.is_empty()) {
        let d = PathBuf::from(d);
        return if d.join("ondemand.py").is_file() { Ok(d) } else { Err(anyhow!("${EXPORTER_ENV}={}: no ondemand.py there", d.display())) };
    }
    let rel = Path::new("ci").join("golden");
    let found = std::env::current_dir().ok().and_then(|cwd| cwd.ancestors().map(|a| a.join(&rel)).find(|d| d.join("ondemand.py").is_file()));
    let built = Path::new(env!("CARGO_MANIFEST_DIR")).join(&rel);
    found.or_else(|| built.join("ondemand.py").is_file().then_some(built)).ok_or_else(|| {
        anyhow!("the on-demand exporter (ci/golden/ondemand.py) is not here: run lockstep from a checkout of its repository, or set ${EXPORTER_ENV}")
    })
}

/// A hash of the exporter's sources and pinned requirements: part of every key.
pub fn exporter_version(dir: &Path) -> Result<String> {
    let mut h = Sha256::new();
    for name in EXPORTER_SOURCES {
        let p = dir.join(name);
        let bytes = std::fs::read(&p).with_context(|| format!("{}: cannot read (part of the on-demand exporter)", p.display()))?;
        h.update(name.as_bytes());
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(&bytes);
    }
    Ok(hex::encode(h.finalize())[..16].to_string())
}

/// Whether the golden venv is complete: its Python exists and its stamp equals requirements.txt.
pub fn venv_ready(exporter: &Path) -> bool {
    let venv = venv_dir();
    let stamp = std::fs::read(venv.join(".lockstep-requirements"));
    let req = std::fs::read(exporter.join("requirements.txt"));
    venv.join("bin").join("python").is_file() && matches!((stamp, req), (Ok(a), Ok(b)) if a == b)
}

/// The golden venv's Python, building the venv first (ci/golden/venv.sh, ~5 minutes, progress on
/// stderr) when it is missing and `build` allows it.
pub fn venv_python(exporter: &Path, build: bool) -> Result<PathBuf> {
    let venv = venv_dir();
    if venv_ready(exporter) {
        return Ok(venv.join("bin").join("python"));
    }
    if !build {
        bail!("the golden venv {} is not built (ci/golden/venv.sh or ci/regenerate-golden builds it, ~5 minutes once)", venv.display());
    }
    eprintln!(
        "lockstep golden: building the golden venv {} with ci/golden/venv.sh (llama-cpp-python from source: about 5 minutes on 2 cores, once)",
        venv.display()
    );
    let t0 = Instant::now();
    let child = Command::new("bash")
        .arg(exporter.join("venv.sh"))
        .env("LOCKSTEP_CACHE", lockstep_engine::fetch::cache_dir())
        .env(VENV_ENV, &venv)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("cannot run bash ci/golden/venv.sh")?;
    // pip says nothing while it compiles llama.cpp: a heartbeat shows the build is alive.
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let beat = std::thread::spawn(move || {
        while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = done_rx.recv_timeout(Duration::from_secs(30)) {
            eprintln!("lockstep golden: still building the golden venv ({} s)", t0.elapsed().as_secs());
        }
    });
    let out = child.wait_with_output().context("waiting for ci/golden/venv.sh");
    drop(done_tx);
    let _ = beat.join();
    let out = out?;
    if !out.status.success() {
        bail!("ci/golden/venv.sh failed ({}); its output is above", out.status);
    }
    let py = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    eprintln!("lockstep golden: golden venv ready ({:.0} s)", t0.elapsed().as_secs_f64());
    Ok(py)
}

/// Where the model comes from.
#[derive(Debug, Clone)]
enum ModelSource {
    /// A file on disk, its name in the manifest, its sha256.
    File { path: PathBuf, id: String, sha: String },
    /// An id only the exporter's registry (ci/golden/models.py) knows: it fetches the file.
    Fetch { id: String },
}

fn resolve_model(spec: &str) -> Result<ModelSource> {
    use lockstep_engine::fetch;
    if let Some(k) = fetch::known_model(spec) {
        let path = fetch::resolve_model(spec, true)?;
        return Ok(ModelSource::File { path, id: spec.to_string(), sha: k.sha256.to_string() });
    }
    if let Some(path) = fetch::tiny_model_path(spec) {
        let sha = file_sha256(&path)?;
        return Ok(ModelSource::File { path, id: spec.to_string(), sha });
    }
    let p = PathBuf::from(spec);
    if p.is_file() {
        let id = p.file_name().map(|n| n.to_string_lossy().trim_end_matches(".gguf").to_string()).unwrap_or_else(|| spec.to_string());
        let sha = file_sha256(&p)?;
        return Ok(ModelSource::File { path: p, id, sha });
    }
    if p.extension().is_some_and(|e| e == "gguf") || spec.contains(std::path::MAIN_SEPARATOR) {
        bail!("model {spec}: no such file");
    }
    let cached = fetch::cache_dir().join("models").join(format!("{spec}.gguf"));
    if cached.is_file() {
        let sha = file_sha256(&cached)?;
        return Ok(ModelSource::File { path: cached, id: spec.to_string(), sha });
    }
    Ok(ModelSource::Fetch { id: spec.to_string() })
}

/// A file's sha256, remembered by (path, size, mtime) in `{cache}/goldens/sha256/`: a real model is
/// hundreds of MB, and a repeated request should not read it again.
fn file_sha256(path: &Path) -> Result<String> {
    let md = std::fs::metadata(path).with_context(|| format!("{}: cannot stat", path.display()))?;
    let mtime = md.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).map_or(0, |d| d.as_nanos());
    let canon = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let memo = cache_root().join("sha256").join(&hex::encode(Sha256::digest(canon.to_string_lossy().as_bytes()))[..24]);
    let stamp = format!("{} {mtime}", md.len());
    if let Ok(text) = std::fs::read_to_string(&memo) {
        if let Some(sha) = text.strip_prefix(&format!("{stamp} ")) {
            let sha = sha.trim();
            if sha.len() == 64 {
                return Ok(sha.to_string());
            }
        }
    }
    let mut f = std::fs::File::open(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).with_context(|| format!("{}: cannot read", path.display()))?;
    let sha = hex::encode(h.finalize());
    let _ = write_atomic(&memo, format!("{stamp} {sha}\n").as_bytes());
    Ok(sha)
}

/// Writes a file through a temporary file in the same directory, renamed into place.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().ok_or_else(|| anyhow!("{}: no parent directory", path.display()))?;
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir).with_context(|| format!("{}: cannot create a temporary file", dir.display()))?;
    tmp.write_all(bytes).with_context(|| format!("{}: cannot write", tmp.path().display()))?;
    tmp.persist(path).with_context(|| format!("{}: cannot rename into place", path.display()))?;
    Ok(())
}

/// The request key of one tier: what the request said, before tokenization.
fn request_key(sha: &str, req: &Request, tier: &str, version: &str) -> String {
    // A fixed field order (serde_json's map order depends on a crate feature).
    let prompt = match &req.prompt {
        PromptSpec::Text(t) => format!("text:{}", serde_json::to_string(t).unwrap_or_default()),
        PromptSpec::Chat(m) => format!("chat:{}", serde_json::to_string(m).unwrap_or_default()),
    };
    let ident = format!("model_sha256={sha}\nprompt={prompt}\ntier={tier}\nsteps={}\ntaps={}\nexporter={version}\n", req.steps, req.taps.arg());
    hex::encode(Sha256::digest(ident.as_bytes()))[..24].to_string()
}

fn alias_path(request_key: &str) -> PathBuf {
    cache_root().join("requests").join(request_key)
}

/// The entries of `req` when every tier's is already in the cache (found through its request key).
fn cached_entries(source: &ModelSource, req: &Request, version: &str) -> Result<Option<Vec<Entry>>> {
    let ModelSource::File { sha, .. } = source else { return Ok(None) };
    let mut out = Vec::new();
    for tier in &req.tiers {
        let t0 = Instant::now();
        let Ok(key) = std::fs::read_to_string(alias_path(&request_key(sha, req, tier, version))) else { return Ok(None) };
        let dir = cache_root().join(key.trim());
        if key.trim().is_empty() || !dir.join("manifest.json").is_file() {
            return Ok(None);
        }
        out.push(Entry::from_dir(&dir, true, t0.elapsed().as_secs_f64())?);
    }
    Ok(Some(out))
}

fn check_request(req: &Request) -> Result<()> {
    if req.steps == 0 {
        bail!("steps 0: at least 1 (the prefill)");
    }
    if req.tiers.is_empty() || req.tiers.iter().any(|t| crate::vocab::Tier::from_name(t).is_none()) {
        bail!("tier {:?}: expected exact, shipped or both", req.tiers.join("+"));
    }
    Ok(())
}

/// Whether `req` can be had here without building anything: Ok when its entries are cached or the golden
/// venv is ready (or `$LOCKSTEP_ONDEMAND_BUILD=1` allows building it), else the reason.
pub fn availability(req: &Request) -> Result<(), String> {
    let exporter = exporter_dir().map_err(|e| format!("{e:#}"))?;
    if venv_ready(&exporter) || std::env::var(BUILD_ENV).is_ok_and(|v| v == "1") {
        return Ok(());
    }
    let version = exporter_version(&exporter).map_err(|e| format!("{e:#}"))?;
    let in_cache = match lockstep_engine::fetch::known_model(&req.model) {
        // Never fetch a model just to answer this question.
        Some(_) if !lockstep_engine::fetch::model_path(&req.model).is_file() => false,
        _ => resolve_model(&req.model).ok().is_some_and(|s| cached_entries(&s, req, &version).ok().flatten().is_some()),
    };
    if in_cache {
        return Ok(());
    }
    Err(format!(
        "on-demand golden ({}) is not in the cache and the golden venv {} is not built; build it once with ci/golden/venv.sh (~5 min), or set {BUILD_ENV}=1 to let lockstep build it when needed",
        req.describe(),
        venv_dir().display()
    ))
}

/// The entries of `req` (one per tier), exported by llama.cpp when not in the cache. Progress (the
/// venv's build, the model's fetch, the exporter's steps) goes to stderr.
pub fn ensure(req: &Request) -> Result<Vec<Entry>> {
    check_request(req)?;
    let exporter = exporter_dir()?;
    let version = exporter_version(&exporter)?;
    let source = resolve_model(&req.model)?;
    if let Some(hit) = cached_entries(&source, req, &version)? {
        return Ok(hit);
    }
    let python = venv_python(&exporter, true)?;
    let mut cmd = Command::new(&python);
    cmd.arg(exporter.join("ondemand.py"));
    match &source {
        ModelSource::File { path, id, sha } => {
            cmd.arg("--model").arg(path).args(["--model-id", id, "--model-sha", sha]);
        }
        ModelSource::Fetch { id } => {
            cmd.args(["--fetch", id]);
        }
    }
    // The messages travel as a file, as `--chat FILE.json` gives them.
    let chat_file = match &req.prompt {
        PromptSpec::Text(t) => {
            cmd.args(["--prompt", t]);
            None
        }
        PromptSpec::Chat(m) => {
            let mut f = tempfile::Builder::new().prefix("lockstep-chat-").suffix(".json").tempfile().context("temporary chat file")?;
            f.write_all(serde_json::to_string(m)?.as_bytes()).context("writing the temporary chat file")?;
            cmd.arg("--chat").arg(f.path());
            Some(f)
        }
    };
    let tier = if req.tiers.len() == 2 { "both".to_string() } else { req.tiers[0].clone() };
    cmd.args(["--tier", &tier, "--steps", &req.steps.to_string(), "--taps", &req.taps.arg(), "--exporter-version", &version]);
    cmd.arg("--cache").arg(cache_root());
    cmd.env("LOCKSTEP_CACHE", lockstep_engine::fetch::cache_dir()).env("PYTHONHASHSEED", "0").env("OMP_NUM_THREADS", "2");
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::inherit());
    eprintln!("lockstep golden: exporting {} with llama.cpp ({})", req.describe(), python.display());
    let mut child = cmd.spawn().with_context(|| format!("cannot run {}", python.display()))?;
    let stdout = child.stdout.take().expect("piped");
    let mut results = Vec::new();
    for line in std::io::BufReader::new(stdout).lines() {
        let line = line.context("reading the exporter's output")?;
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
            results.push(v);
        }
    }
    let status = child.wait().context("waiting for the exporter")?;
    drop(chat_file);
    if !status.success() {
        bail!("the on-demand exporter (ci/golden/ondemand.py) failed ({status}); its messages are above");
    }
    let mut entries = Vec::new();
    for r in &results {
        let key = r["key"].as_str().ok_or_else(|| anyhow!("the exporter's output has no key: {r}"))?;
        entries.push(Entry::from_dir(&cache_root().join(key), r["hit"].as_bool().unwrap_or(false), r["seconds"].as_f64().unwrap_or(0.0))?);
    }
    if entries.len() != req.tiers.len() {
        bail!("the on-demand exporter reported {} entries for {} tiers", entries.len(), req.tiers.len());
    }
    // Remember which entry each tier's request led to (for a fetched model, now that its file exists).
    let sha = match &source {
        ModelSource::File { sha, .. } => Some(sha.clone()),
        ModelSource::Fetch { id } => {
            let p = lockstep_engine::fetch::cache_dir().join("models").join(format!("{id}.gguf"));
            p.is_file().then(|| file_sha256(&p)).transpose()?
        }
    };
    if let Some(sha) = sha {
        for e in &entries {
            write_atomic(&alias_path(&request_key(&sha, req, &e.tier, &version)), e.key.as_bytes())?;
        }
    }
    Ok(entries)
}

/// The manifest and entry name that `arg` means when it names an on-demand golden: `cache:KEY` (or a
/// unique prefix of KEY), an entry's directory, or the taps file inside one (any directory holding a
/// manifest.json that lists the file). `None` when `arg` is none of these (a committed golden's name).
pub fn resolve_entry(arg: &str) -> Result<Option<(Manifest, String)>> {
    let dir = if let Some(key) = arg.strip_prefix("cache:") {
        Some(find_key(key)?)
    } else {
        let p = Path::new(arg);
        if p.is_dir() && p.join("manifest.json").is_file() {
            Some(p.to_path_buf())
        } else if p.is_file() && p.parent().is_some_and(|d| d.join("manifest.json").is_file()) {
            let dir = p.parent().map(|d| if d.as_os_str().is_empty() { Path::new(".") } else { d }).unwrap_or(Path::new("."));
            let m = Manifest::load(dir)?;
            let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            return Ok(m.files.iter().any(|f| f.path == name).then_some((m.clone(), name)));
        } else {
            None
        }
    };
    let Some(dir) = dir else { return Ok(None) };
    let m = Manifest::load(&dir)?;
    let taps: Vec<String> = m.taps_files().map(|f| f.path.clone()).collect();
    match taps.as_slice() {
        [one] => {
            let one = one.clone();
            Ok(Some((m, one)))
        }
        [] => bail!("{}: lists no taps file", m.path.display()),
        many => bail!("{}: lists {} taps files; name one of them (its path, or model/tier/prompt)", m.path.display(), many.len()),
    }
}

/// The entry directory of a key, or of a unique key prefix (8 characters at least).
fn find_key(key: &str) -> Result<PathBuf> {
    let root = cache_root();
    let exact = root.join(key);
    if !key.is_empty() && !key.contains(['/', '\\', '.']) && exact.join("manifest.json").is_file() {
        return Ok(exact);
    }
    let hint = "`lockstep golden` prints the names of the entries it writes";
    if key.len() < 8 {
        bail!("cache:{key}: no such on-demand golden in {} ({hint})", root.display());
    }
    let hits: Vec<PathBuf> = std::fs::read_dir(&root)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_string_lossy().starts_with(key))
                .map(|e| e.path())
                .filter(|p| p.join("manifest.json").is_file())
                .collect()
        })
        .unwrap_or_default();
    match hits.as_slice() {
        [one] => Ok(one.clone()),
        [] => bail!("cache:{key}: no such on-demand golden in {} ({hint})", root.display()),
        _ => bail!("cache:{key}: {} entries start with this; give more of the key", hits.len()),
    }
}

/// Copies an entry's files into `out` (created; files written through temporary names): a directory
/// `lockstep compare --golden` accepts, to carry elsewhere.
pub fn copy_entry(entry: &Entry, out: &Path) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("{}: cannot create", out.display()))?;
    for name in ["manifest.json".to_string(), entry.file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()] {
        let src = entry.dir.join(&name);
        let dst = out.join(&name);
        let mut tmp = tempfile::NamedTempFile::new_in(out).with_context(|| format!("{}: cannot create a temporary file", out.display()))?;
        let mut f = std::fs::File::open(&src).with_context(|| format!("{}: cannot read", src.display()))?;
        std::io::copy(&mut f, &mut tmp).with_context(|| format!("copying {} to {}", src.display(), out.display()))?;
        // The temporary file is private (0600); the copy gets the entry's permissions.
        let perms = f.metadata().with_context(|| format!("{}: cannot stat", src.display()))?.permissions();
        tmp.as_file().set_permissions(perms).with_context(|| format!("{}: cannot set permissions", tmp.path().display()))?;
        tmp.persist(&dst).with_context(|| format!("{}: cannot rename into place", dst.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn taps_selection_parses_and_rejects() {
        assert_eq!(Taps::parse("all").unwrap(), Taps::All);
        assert_eq!(Taps::parse(" l_out, kq_soft_max,l_out ").unwrap(), Taps::Families(vec!["kq_soft_max".into(), "l_out".into()]));
        assert_eq!(Taps::parse("l_out,kq_soft_max").unwrap().arg(), "kq_soft_max,l_out");
        assert!(Taps::parse(" , ").unwrap_err().to_string().contains("expected `all`"));
        assert!(Taps::parse("l_out-3").unwrap_err().to_string().contains("not a tap family"));
    }

    #[test]
    fn request_keys_separate_what_differs() {
        let req = Request { model: "m".into(), prompt: PromptSpec::Text("hi".into()), tiers: vec!["exact".into()], steps: 5, taps: Taps::All };
        let k = request_key("ab", &req, "exact", "v1");
        assert_eq!(k, request_key("ab", &req.clone(), "exact", "v1"));
        let chat = Request { prompt: PromptSpec::Chat(vec![Message { role: "user".into(), content: "hi".into() }]), ..req.clone() };
        for other in [
            request_key("ac", &req, "exact", "v1"),
            request_key("ab", &req, "shipped", "v1"),
            request_key("ab", &req, "exact", "v2"),
            request_key("ab", &Request { steps: 4, ..req.clone() }, "exact", "v1"),
            request_key("ab", &Request { taps: Taps::Families(vec!["l_out".into()]), ..req.clone() }, "exact", "v1"),
            request_key("ab", &chat, "exact", "v1"),
        ] {
            assert_ne!(k, other);
        }
    }

    /// The version covers the f64 evaluation behind the noise records: a cached entry's noise is never
    /// stale after noise.py or the outside engine change.
    #[test]
    fn exporter_version_covers_the_noise_evaluation() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("ci").join("golden");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::create_dir_all(root.path().join("tests").join("outside_engine")).unwrap();
        for name in EXPORTER_SOURCES {
            std::fs::write(dir.join(name), name).unwrap();
        }
        let v = exporter_version(&dir).unwrap();
        assert_eq!(v, exporter_version(&dir).unwrap());
        for changed in ["noise.py", "../../tests/outside_engine/numpy_engine.py", "capture.py"] {
            std::fs::write(dir.join(changed), "changed").unwrap();
            assert_ne!(exporter_version(&dir).unwrap(), v, "{changed}");
            std::fs::write(dir.join(changed), changed).unwrap();
            assert_eq!(exporter_version(&dir).unwrap(), v);
        }
        std::fs::remove_file(dir.join("noise.py")).unwrap();
        assert!(format!("{:#}", exporter_version(&dir).unwrap_err()).contains("noise.py"));
    }

    #[test]
    fn chat_files_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.json");
        std::fs::write(&p, r#"{"messages": [{"role": "user", "content": "hi"}]}"#).unwrap();
        assert_eq!(read_chat(&p).unwrap(), vec![Message { role: "user".into(), content: "hi".into() }]);
        std::fs::write(&p, r#"[{"role": "user"}]"#).unwrap();
        let e = read_chat(&p).unwrap_err().to_string();
        assert!(e.contains("c.json") && e.contains("content"), "{e}");
        std::fs::write(&p, "[]").unwrap();
        assert!(read_chat(&p).unwrap_err().to_string().contains("no messages"));
    }

    #[test]
    fn an_entry_is_found_by_its_directory_or_file() {
        let dir = tempfile::tempdir().unwrap();
        let e = dir.path().join("0123456789abcdef01234567");
        std::fs::create_dir_all(&e).unwrap();
        crate::golden::write_safetensors(
            &e.join("taps.safetensors"),
            &[("s0/embd".into(), vec![1, 1, 1, 2], vec![1., 2.])],
            &[("tokens".into(), vec![1], vec![7])],
        )
        .unwrap();
        let m = serde_json::json!({"files": [{"path": "taps.safetensors", "sha256": "00", "kind": "taps", "model": "m", "tier": "exact", "prompt_id": "p"}]});
        std::fs::write(e.join("manifest.json"), m.to_string()).unwrap();
        let (man, name) = resolve_entry(e.to_str().unwrap()).unwrap().unwrap();
        assert_eq!((name.as_str(), man.dir.as_path()), ("taps.safetensors", e.as_path()));
        let (_, name) = resolve_entry(e.join("taps.safetensors").to_str().unwrap()).unwrap().unwrap();
        assert_eq!(name, "taps.safetensors");
        assert!(resolve_entry("tiny-qwen2/exact/fox").unwrap().is_none());
        assert!(resolve_entry("cache:zz").unwrap_err().to_string().contains("no such on-demand golden"));
    }
}
