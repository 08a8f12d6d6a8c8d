//! The runner's one error type: every message names the file (and where it can, the line or tap) and
//! what was expected, so a user can act on it without reading code.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: cannot read: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: not a valid safetensors file: {reason}")]
    Safetensors { path: PathBuf, reason: String },
    #[error(
        "{path}: checksum mismatch (manifest says {expected}, file has {actual}); the golden is stale or corrupt: run `ci/regenerate-golden` to rebuild it"
    )]
    Checksum { path: PathBuf, expected: String, actual: String },
    #[error("{path}: malformed manifest: {reason}")]
    Manifest { path: PathBuf, reason: String },
    #[error("no golden entry {entry:?} in {manifest}; known entries: {known}")]
    UnknownEntry { entry: String, manifest: PathBuf, known: String },
    #[error("{path}: no tensor {key:?} in this file")]
    MissingTensor { path: PathBuf, key: String },
    #[error("{path}: tensor {key:?} has dtype {dtype}, expected {expected}")]
    Dtype { path: PathBuf, key: String, dtype: String, expected: String },
    #[error("tap {key:?}: shape mismatch: engine {engine:?} vs golden {golden:?} (compared after dropping leading 1s)")]
    Shape { key: String, engine: Vec<usize>, golden: Vec<usize> },
    #[error("{path}:{line}:{column}: {message}")]
    Suite { path: PathBuf, line: usize, column: usize, message: String },
    #[error("unknown tap {0:?}: tap keys look like `s{{step}}/{{name}}[-{{layer}}][.{{stage}}]`, e.g. s0/Qcur-0.rope")]
    BadTapKey(String),
    /// A tensor of an engine's dump that cannot be compared with its golden tap (src/dump_check.rs).
    #[error("{0}")]
    DumpTensor(Box<BadTensor>),
    /// An engine's dump that cannot be judged as a whole: not safetensors, truncated, no key recognised,
    /// a step without logits (src/dump_check.rs).
    #[error("{path}: {problem}; hint: {hint}")]
    DumpFile { path: PathBuf, problem: String, hint: String },
    #[error("{0}")]
    Other(String),
}

/// One tensor of a dump that cannot be compared (boxed in [`Error::DumpTensor`], which keeps `Error`
/// small): the file, the tap, the problem, the expected and the found shape or dtype, a layout hint, and
/// a short list of the other tensors with problems.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {key}: {problem}: expected {expected}, found {found}; hint: {hint}{others}")]
pub struct BadTensor {
    pub path: PathBuf,
    pub key: String,
    pub problem: String,
    pub expected: String,
    pub found: String,
    pub hint: String,
    pub others: String,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }
}
