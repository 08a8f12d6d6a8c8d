//! A safetensors [`TapSink`] for Rust engines: hand it to a forward pass, call [`SafetensorsTapWriter::finish`]
//! at the end, and judge the file with `lockstep compare --dump FILE --golden ENTRY`.
//!
//! The file follows the goldens' naming (golden/README.md): every tap is an f32 tensor under
//! `s{step}/{key}` with its 4-D shape `[ne3, ne2, ne1, ne0]` (step 0 the prefill, step k the k-th decode
//! step), and the prompt's token ids are an i32 `tokens` tensor. Other non-tap tensors (`continuation`,
//! …) can be added with [`SafetensorsTapWriter::set_i32`] and [`SafetensorsTapWriter::set_f32`].
//!
//! ```no_run
//! # fn engine_forward(_: &[u32], _: &mut dyn lockstep_engine::taps::TapSink) {}
//! use lockstep_engine::taps_file::SafetensorsTapWriter;
//! let prompt = [9707u32, 11, 1879];
//! let mut w = SafetensorsTapWriter::new("dump.safetensors")?;
//! w.set_tokens(&prompt)?;
//! w.set_step(0);
//! engine_forward(&prompt, &mut w);            // the engine calls w.wants(key) / w.tap(info, data)
//! w.finish()?;                                // temporary file in the same directory, renamed into place
//! # Ok::<(), lockstep_engine::taps_file::TapFileError>(())
//! ```
//!
//! [`TapSink::tap`] cannot return an error, so a tap the writer refuses (a data length that does not match
//! the shape, a key recorded twice in one step, a key with `/`) is kept as the first error and returned by
//! `finish`, which then writes nothing: a dump is complete and consistent or it does not exist.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use safetensors::tensor::TensorView;
use safetensors::Dtype;

use crate::taps::{TapInfo, TapSink};

/// Why a dump could not be recorded or written. Every variant names the file being written.
#[derive(Debug, thiserror::Error)]
pub enum TapFileError {
    #[error("{path}: cannot create a temporary file in {dir} (does the directory exist and is it writable?): {source}")]
    Create { path: PathBuf, dir: PathBuf, source: std::io::Error },
    #[error("{path}: is a directory, expected a file path such as dump.safetensors")]
    IsDir { path: PathBuf },
    #[error("{path}: bad key {key:?}: {reason}")]
    BadKey { path: PathBuf, key: String, reason: String },
    #[error("{path}: tensor {key:?}: shape {shape:?} holds {expected} values, the data has {found}")]
    Length { path: PathBuf, key: String, shape: Vec<usize>, expected: usize, found: usize },
    #[error("{path}: tensor {key:?} recorded twice (a tap's key must be unique within its step; see golden/README.md for the `.{{op}}` stage suffixes)")]
    Duplicate { path: PathBuf, key: String },
    #[error("{path}: token id {id} at position {index} does not fit the i32 `tokens` tensor")]
    TokenRange { path: PathBuf, index: usize, id: u32 },
    #[error("{path}: cannot write: {reason}")]
    Write { path: PathBuf, reason: String },
}

/// One tensor waiting to be written: dtype, shape, little-endian bytes.
struct Pending {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

/// Which taps a writer keeps: `(step, key inside the step) -> keep?`.
pub type TapFilter = Box<dyn Fn(usize, &str) -> bool + Send>;

/// Collects taps in memory and writes them to one safetensors file atomically at [`finish`](Self::finish).
pub struct SafetensorsTapWriter {
    path: PathBuf,
    /// Created at `new` so that a missing or read-only directory fails before the engine runs; deleted
    /// on drop unless `finish` renames it into place.
    tmp: tempfile::NamedTempFile,
    step: usize,
    filter: Option<TapFilter>,
    /// full key (`s0/Qcur-0.rope`, `tokens`) → tensor; sorted, so the file does not depend on arrival order.
    tensors: BTreeMap<String, Pending>,
    /// The first tap refused inside [`TapSink::tap`] (which cannot return it), and how many followed.
    deferred: Option<(TapFileError, usize)>,
}

impl SafetensorsTapWriter {
    /// A writer for `path` that keeps every tap. Creates its temporary file in `path`'s directory now.
    pub fn new(path: impl AsRef<Path>) -> Result<Self, TapFileError> {
        let path = path.as_ref().to_path_buf();
        if path.is_dir() {
            return Err(TapFileError::IsDir { path });
        }
        let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_path_buf();
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "dump".into());
        let tmp = tempfile::Builder::new().prefix(&format!(".{name}.")).suffix(".tmp").tempfile_in(&dir).map_err(|source| TapFileError::Create {
            path: path.clone(),
            dir,
            source,
        })?;
        Ok(Self { path, tmp, step: 0, filter: None, tensors: BTreeMap::new(), deferred: None })
    }

    /// Keeps only the taps for which `filter(step, key)` is true (e.g. the keys a golden holds).
    pub fn with_filter(mut self, filter: impl Fn(usize, &str) -> bool + Send + 'static) -> Self {
        self.filter = Some(Box::new(filter));
        self
    }

    /// The file this writer will write.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The step the next taps belong to: 0 for the prefill, k for the k-th decode step.
    pub fn set_step(&mut self, step: usize) {
        self.step = step;
    }

    pub fn step(&self) -> usize {
        self.step
    }

    /// How many tensors are held so far (taps and others).
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// Records one tap of `step` under `s{step}/{key}`: `data` row-major f32 in `shape` (`[ne3, ne2, ne1, ne0]`).
    pub fn record(&mut self, step: usize, key: &str, shape: [usize; 4], data: &[f32]) -> Result<(), TapFileError> {
        if key.is_empty() || key.contains('/') {
            let reason = "a tap key is the name inside a step, e.g. `Qcur-0.rope`: non-empty, without `/` (the writer adds `s{step}/`)";
            return Err(TapFileError::BadKey { path: self.path.clone(), key: key.to_string(), reason: reason.into() });
        }
        self.insert(format!("s{step}/{key}"), Dtype::F32, shape.to_vec(), data.len(), data.iter().flat_map(|v| v.to_le_bytes()).collect())
    }

    /// The prompt's token ids, stored as the i32 tensor `tokens` `[n]`.
    pub fn set_tokens(&mut self, ids: &[u32]) -> Result<(), TapFileError> {
        let ids = self.ids_to_i32(ids)?;
        self.set_i32("tokens", vec![ids.len()], &ids)
    }

    /// The greedy continuation (the token chosen at each step), stored as the i32 tensor `continuation` `[n]`.
    pub fn set_continuation(&mut self, ids: &[u32]) -> Result<(), TapFileError> {
        let ids = self.ids_to_i32(ids)?;
        self.set_i32("continuation", vec![ids.len()], &ids)
    }

    /// A non-tap i32 tensor (`tokens`, `continuation`, `topk_ids`, …). Its name must not look like a tap key.
    pub fn set_i32(&mut self, name: &str, shape: Vec<usize>, data: &[i32]) -> Result<(), TapFileError> {
        self.check_other_name(name)?;
        self.insert(name.to_string(), Dtype::I32, shape, data.len(), data.iter().flat_map(|v| v.to_le_bytes()).collect())
    }

    /// A non-tap f32 tensor (`topk_values`, `lse`, …). Its name must not look like a tap key.
    pub fn set_f32(&mut self, name: &str, shape: Vec<usize>, data: &[f32]) -> Result<(), TapFileError> {
        self.check_other_name(name)?;
        self.insert(name.to_string(), Dtype::F32, shape, data.len(), data.iter().flat_map(|v| v.to_le_bytes()).collect())
    }

    /// Writes the file: serialized into the temporary file, synced, renamed over `path`. Returns the
    /// first error a tap met instead, writing nothing.
    pub fn finish(self) -> Result<(), TapFileError> {
        if let Some((first, more)) = self.deferred {
            if more == 0 {
                return Err(first);
            }
            let path = self.path.clone();
            return Err(TapFileError::Write { path, reason: format!("{first} (and {more} more refused taps)") });
        }
        let path = self.path;
        let write_err = |reason: String| TapFileError::Write { path: path.clone(), reason };
        let mut views = Vec::with_capacity(self.tensors.len());
        for (k, t) in &self.tensors {
            let view = TensorView::new(t.dtype, t.shape.clone(), &t.bytes).map_err(|e| write_err(format!("tensor {k}: {e}")))?;
            views.push((k.as_str(), view));
        }
        safetensors::serialize_to_file(views, None, self.tmp.path())
            .map_err(|e| write_err(format!("writing the temporary file {}: {e}", self.tmp.path().display())))?;
        self.tmp.as_file().sync_all().map_err(|e| write_err(format!("syncing {}: {e}", self.tmp.path().display())))?;
        self.tmp.persist(&path).map_err(|e| write_err(format!("renaming the temporary file into place: {}", e.error)))?;
        Ok(())
    }

    fn ids_to_i32(&self, ids: &[u32]) -> Result<Vec<i32>, TapFileError> {
        ids.iter().enumerate().map(|(index, &id)| i32::try_from(id).map_err(|_| TapFileError::TokenRange { path: self.path.clone(), index, id })).collect()
    }

    fn check_other_name(&self, name: &str) -> Result<(), TapFileError> {
        let looks_like_tap =
            name.strip_prefix('s').and_then(|r| r.split_once('/')).is_some_and(|(s, _)| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()));
        if name.is_empty() || looks_like_tap {
            let reason = "a non-tap tensor's name must be non-empty and must not look like a tap key `s{step}/…` (record taps with `record`)";
            return Err(TapFileError::BadKey { path: self.path.clone(), key: name.to_string(), reason: reason.into() });
        }
        Ok(())
    }

    fn insert(&mut self, key: String, dtype: Dtype, shape: Vec<usize>, found: usize, bytes: Vec<u8>) -> Result<(), TapFileError> {
        let expected = shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
        if expected != Some(found) {
            return Err(TapFileError::Length { path: self.path.clone(), key, shape, expected: expected.unwrap_or(usize::MAX), found });
        }
        if self.tensors.contains_key(&key) {
            return Err(TapFileError::Duplicate { path: self.path.clone(), key });
        }
        self.tensors.insert(key, Pending { dtype, shape, bytes });
        Ok(())
    }
}

impl TapSink for SafetensorsTapWriter {
    fn wants(&self, key: &str) -> bool {
        self.filter.as_ref().is_none_or(|f| f(self.step, key))
    }

    fn tap(&mut self, info: TapInfo<'_>, data: &[f32]) {
        if let Err(e) = self.record(self.step, info.key, info.shape, data) {
            match &mut self.deferred {
                None => self.deferred = Some((e, 0)),
                Some((_, more)) => *more += 1,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::SafeTensors;

    fn f32s(bytes: &[u8]) -> Vec<f32> {
        bytes.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
    }

    fn info<'a>(key: &'a str, shape: [usize; 4]) -> TapInfo<'a> {
        TapInfo { key, layer: None, shape }
    }

    #[test]
    fn writes_taps_per_step_and_tokens_read_back_by_safetensors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dump.safetensors");
        let mut w = SafetensorsTapWriter::new(&path).unwrap();
        w.set_tokens(&[9707, 11, 0]).unwrap();
        w.set_step(0);
        let embd: Vec<f32> = (0..6).map(|i| i as f32 * 0.5 - 1.0).collect();
        w.tap(info("embd", [1, 1, 3, 2]), &embd);
        w.tap(info("kq-0", [1, 2, 3, 3]), &[1.0; 18]);
        w.set_step(1);
        w.tap(info("embd", [1, 1, 1, 2]), &[f32::MIN_POSITIVE, -0.0]);
        assert!(!path.exists(), "nothing is written before finish");
        w.finish().unwrap();

        let bytes = std::fs::read(&path).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let mut names: Vec<&str> = st.names();
        names.sort();
        assert_eq!(names, ["s0/embd", "s0/kq-0", "s1/embd", "tokens"]);
        let e0 = st.tensor("s0/embd").unwrap();
        assert_eq!((e0.dtype(), e0.shape()), (Dtype::F32, &[1usize, 1, 3, 2][..]));
        assert_eq!(f32s(e0.data()), embd);
        assert_eq!(st.tensor("s0/kq-0").unwrap().shape(), &[1, 2, 3, 3]);
        let e1 = f32s(st.tensor("s1/embd").unwrap().data());
        assert_eq!(e1[0], f32::MIN_POSITIVE);
        assert!(e1[1] == 0.0 && e1[1].is_sign_negative(), "bits are kept: -0.0 stays -0.0");
        let t = st.tensor("tokens").unwrap();
        assert_eq!((t.dtype(), t.shape()), (Dtype::I32, &[3usize][..]));
        let ids: Vec<i32> = t.data().chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().unwrap())).collect();
        assert_eq!(ids, [9707, 11, 0]);
        let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(leftovers.len(), 1, "the temporary file was renamed, not copied: {leftovers:?}");
    }

    #[test]
    fn the_filter_sees_step_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = SafetensorsTapWriter::new(dir.path().join("d.safetensors")).unwrap().with_filter(|step, key| step == 1 && key.starts_with("l_out"));
        assert!(!w.wants("l_out-0"));
        w.set_step(1);
        assert!(w.wants("l_out-0"));
        assert!(!w.wants("kq-0"));
    }

    #[test]
    fn a_bad_tap_fails_finish_naming_file_and_tap_and_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.safetensors");
        let mut w = SafetensorsTapWriter::new(&path).unwrap();
        w.tap(info("Qcur-0", [1, 1, 2, 4]), &[0.0; 7]);
        w.tap(info("Qcur-0", [1, 1, 1, 1]), &[0.0]);
        w.tap(info("Qcur-0", [1, 1, 1, 1]), &[0.0]);
        let e = w.finish().unwrap_err().to_string();
        assert!(e.contains("bad.safetensors") && e.contains("s0/Qcur-0") && e.contains("holds 8 values, the data has 7"), "{e}");
        assert!(e.contains("1 more refused"), "{e}");
        assert!(!path.exists());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "the temporary file is removed");
    }

    #[test]
    fn duplicates_and_bad_names_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = SafetensorsTapWriter::new(dir.path().join("d.safetensors")).unwrap();
        w.record(0, "embd", [1, 1, 1, 1], &[1.0]).unwrap();
        assert!(matches!(w.record(0, "embd", [1, 1, 1, 1], &[1.0]), Err(TapFileError::Duplicate { .. })));
        w.record(1, "embd", [1, 1, 1, 1], &[1.0]).unwrap();
        assert!(matches!(w.record(0, "s0/embd", [1, 1, 1, 1], &[1.0]), Err(TapFileError::BadKey { .. })));
        assert!(matches!(w.record(0, "", [1, 1, 1, 1], &[1.0]), Err(TapFileError::BadKey { .. })));
        assert!(matches!(w.set_i32("s3/x", vec![1], &[1]), Err(TapFileError::BadKey { .. })));
        assert!(matches!(w.set_tokens(&[u32::MAX]), Err(TapFileError::TokenRange { index: 0, .. })));
        assert!(matches!(w.record(0, "big", [usize::MAX, 2, 1, 1], &[]), Err(TapFileError::Length { .. })));
        w.set_f32("lse", vec![2], &[0.5, 1.5]).unwrap();
        assert_eq!(w.len(), 3);
    }

    #[test]
    fn a_missing_directory_fails_at_new_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("no/such/dir/d.safetensors");
        let e = SafetensorsTapWriter::new(&path).err().expect("must fail").to_string();
        assert!(e.contains("no/such/dir/d.safetensors"), "{e}");
        let e = SafetensorsTapWriter::new(dir.path()).err().expect("a directory is not a file").to_string();
        assert!(e.contains("is a directory"), "{e}");
    }

    #[test]
    fn finish_replaces_an_existing_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.safetensors");
        std::fs::write(&path, b"old").unwrap();
        let mut w = SafetensorsTapWriter::new(&path).unwrap();
        w.record(2, "result_output", [1, 1, 1, 3], &[1.0, 2.0, 3.0]).unwrap();
        w.finish().unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(f32s(st.tensor("s2/result_output").unwrap().data()), [1.0, 2.0, 3.0]);
    }
}
