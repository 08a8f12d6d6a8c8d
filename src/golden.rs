//! Golden files: the manifest (golden/manifest.json) and taps safetensors files read over memmap2.
//!
//! Every file is checked against the manifest's sha256 when it is opened through [`Manifest`]; a
//! mismatch names the file and says to run `ci/regenerate-golden`.

use crate::error::{Error, Result};
use crate::tapname::{GraphOrder, TapId};
use safetensors::tensor::{Dtype, Metadata};
use safetensors::SafeTensors;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The golden directory: `$LOCKSTEP_GOLDEN` (the CLI's `--golden DIR`), else `golden/` of the nearest
/// directory from the current one upward that holds `golden/manifest.json`, else the build's checkout.
pub fn default_dir() -> PathBuf {
    lockstep_engine::fetch::golden_dir()
}

/// One tensor as the manifest lists it (graph order within the file).
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct ManifestTensor {
    /// The full key (`s0/Qcur-0.rope`, `tokens`).
    #[serde(default)]
    pub key: Option<String>,
    /// The tap inside its step (`Qcur-0.rope`).
    #[serde(default)]
    pub tap: Option<String>,
    /// llama.cpp's callback name (`Qcur-0`).
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub op: Option<String>,
    #[serde(default)]
    pub stage: Option<serde_json::Value>,
    #[serde(default)]
    pub step: Option<usize>,
    #[serde(default)]
    pub layer: Option<i64>,
    #[serde(default)]
    pub shape: Vec<usize>,
    #[serde(default)]
    pub dtype: Option<String>,
    #[serde(default)]
    pub sha256: Option<String>,
    /// llama.cpp's own rounding noise at this tap: its distance from an f64 evaluation of the same graph
    /// on the same weights and tokens (`ci/golden/noise.py`). Tolerances scale with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub noise: Option<TapNoise>,
}

/// How far llama.cpp's f32 result for one tap lies from an f64 evaluation of the same graph.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TapNoise {
    /// rel L2 over the whole tensor.
    pub rel_l2: f64,
    /// The largest rel L2 of one token row (position) of the tensor.
    pub row_max: f64,
}

/// One file of the manifest.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct ManifestFile {
    pub path: String,
    pub sha256: String,
    #[serde(default)]
    pub kind: Option<String>,
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub tier: Option<String>,
    #[serde(default)]
    pub prompt_id: Option<String>,
    /// The text (`chat` false) or the list of {role, content} messages (`chat` true).
    #[serde(default)]
    pub prompt: Option<serde_json::Value>,
    #[serde(default)]
    pub chat: Option<bool>,
    #[serde(default)]
    pub tokens: Option<Vec<i64>>,
    #[serde(default)]
    pub steps: Option<usize>,
    /// The greedy continuation's token ids.
    #[serde(default)]
    pub continuation: Option<Vec<i64>>,
    /// The model file llama.cpp ran, relative to golden/ for the tiny models (`models/tiny-qwen2.q.gguf`),
    /// or `{id}.gguf (cache)` for the real ones.
    #[serde(default)]
    pub model_file: Option<String>,
    #[serde(default)]
    pub n_layer: Option<usize>,
    #[serde(default)]
    pub tensors: Vec<ManifestTensor>,
    #[serde(default)]
    pub full_layers: Option<Vec<usize>>,
    #[serde(default)]
    pub kept: Option<serde_json::Value>,
    /// Everything else the manifest records (llama.cpp commit, versions, threads, command, …).
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl ManifestFile {
    /// `model/tier/prompt_id`, the short name suites and `lockstep compare --golden` use.
    pub fn entry_name(&self) -> String {
        match (&self.model, &self.tier, &self.prompt_id) {
            (Some(m), Some(t), Some(p)) => format!("{m}/{t}/{p}"),
            _ => self.path.clone(),
        }
    }

    /// Each tap's measured noise, by full key (`s0/kq-0`), for the tensors that have one.
    pub fn noise(&self) -> std::collections::HashMap<String, TapNoise> {
        self.tensors.iter().filter_map(|t| Some((t.key.clone()?, t.noise?))).collect()
    }

    /// Graph order from the listed tensors.
    pub fn graph_order(&self) -> GraphOrder {
        GraphOrder::from_listed(self.tensors.iter().filter_map(|t| t.key.as_deref().or(t.tap.as_deref())))
    }
}

/// golden/manifest.json: provenance plus one record per file.
#[derive(Debug, Clone)]
pub struct Manifest {
    pub dir: PathBuf,
    pub path: PathBuf,
    pub files: Vec<ManifestFile>,
    /// The top-level fields other than the file list (llama.cpp commit, versions, command, …).
    pub provenance: serde_json::Map<String, serde_json::Value>,
}

static VERIFIED: Mutex<Option<HashSet<PathBuf>>> = Mutex::new(None);

impl Manifest {
    /// Loads `dir/manifest.json`. The file list may sit under `files` (or `entries`), or be the top level.
    pub fn load(dir: &Path) -> Result<Manifest> {
        let path = dir.join("manifest.json");
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        Self::parse(dir, &text)
    }

    /// Parses the text of `dir/manifest.json` (as [`Self::load`] does after reading it; errors name that path).
    pub fn parse(dir: &Path, text: &str) -> Result<Manifest> {
        let path = dir.join("manifest.json");
        let bad = |reason: String| Error::Manifest { path: path.clone(), reason };
        let value: serde_json::Value = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
        let (list, provenance) = match value {
            serde_json::Value::Array(a) => (a, serde_json::Map::new()),
            serde_json::Value::Object(mut o) => {
                let list = match o.remove("files").or_else(|| o.remove("entries")) {
                    Some(serde_json::Value::Array(a)) => a,
                    _ => return Err(bad("expected a `files` array".into())),
                };
                (list, o)
            }
            _ => return Err(bad("expected an object or an array".into())),
        };
        let files = list
            .into_iter()
            .enumerate()
            .map(|(i, v)| {
                let f: ManifestFile = serde_json::from_value(v).map_err(|e| bad(format!("files[{i}]: {e}")))?;
                if f.n_layer == Some(0) {
                    return Err(bad(format!("files[{i}] ({}): n_layer is 0; a model has at least one layer", f.path)));
                }
                Ok(f)
            })
            .collect::<Result<Vec<ManifestFile>>>()?;
        Ok(Manifest { dir: dir.to_path_buf(), path, files, provenance })
    }

    /// Finds a file by path relative to the golden dir (`taps/m/t/p.safetensors`), by `m/t/p`, by
    /// `taps/m/t/p`, or by the path of a golden file anywhere (absolute or relative to the current
    /// directory), matched by canonical path against the manifest's files.
    pub fn find(&self, entry: &str) -> Result<&ManifestFile> {
        let e = entry.trim_start_matches("./").trim_start_matches("golden/");
        let canonical = Path::new(entry).is_file().then(|| std::fs::canonicalize(entry).ok()).flatten();
        let hit = self
            .files
            .iter()
            .find(|f| f.path == e || f.entry_name() == e || f.path.strip_suffix(".safetensors").is_some_and(|p| p == e || p.strip_prefix("taps/") == Some(e)));
        let hit = hit.or_else(|| {
            let c = canonical.as_ref()?;
            self.files.iter().find(|f| std::fs::canonicalize(self.dir.join(&f.path)).is_ok_and(|p| &p == c))
        });
        hit.ok_or_else(|| Error::UnknownEntry {
            entry: entry.to_string(),
            manifest: self.path.clone(),
            known: self.files.iter().filter(|f| f.kind.as_deref() == Some("taps")).map(|f| f.entry_name()).collect::<Vec<_>>().join(", "),
        })
    }

    /// Taps files (kind "taps") in manifest order.
    pub fn taps_files(&self) -> impl Iterator<Item = &ManifestFile> {
        self.files.iter().filter(|f| f.kind.as_deref() == Some("taps"))
    }

    /// Opens a taps file, verifying its sha256 against the manifest (once per process and path).
    pub fn open_taps(&self, file: &ManifestFile) -> Result<TapsFile> {
        let path = self.dir.join(&file.path);
        let mut t = TapsFile::open(&path)?;
        let mut guard = VERIFIED.lock().unwrap_or_else(|p| p.into_inner());
        let set = guard.get_or_insert_with(HashSet::new);
        if !set.contains(&path) {
            let actual = hex::encode(Sha256::digest(t.bytes()));
            if !actual.eq_ignore_ascii_case(&file.sha256) {
                return Err(Error::Checksum { path, expected: file.sha256.clone(), actual });
            }
            set.insert(path);
        }
        t.order = file.graph_order();
        t.n_layer = file.n_layer;
        t.noise = crate::noise::effective(&file.noise(), t.n_layer);
        Ok(t)
    }
}

/// A dense f32 tensor read from a file.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// A taps safetensors file (a golden or an engine dump) over memmap2.
pub struct TapsFile {
    pub path: PathBuf,
    mmap: memmap2::Mmap,
    header_len: usize,
    meta: Metadata,
    /// The order taps are compared in; a manifest's order when opened through [`Manifest::open_taps`].
    pub order: GraphOrder,
    /// The noise each tap is judged against (its own and its direct inputs', `crate::noise`), by key,
    /// when opened through a calibrated manifest entry.
    pub noise: std::collections::HashMap<String, TapNoise>,
    /// The model's layer count, when the manifest says it (a golden may keep only some layers' taps).
    pub n_layer: Option<usize>,
}

impl TapsFile {
    pub fn open(path: &Path) -> Result<TapsFile> {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the mapping is read-only and lives as long as `TapsFile`; golden files and dumps are
        // not modified while lockstep runs (a concurrent writer could change the bytes we read, never
        // memory safety of anything but those bytes' values).
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let (header_len, meta) = SafeTensors::read_metadata(&mmap).map_err(|e| Error::Safetensors { path: path.to_path_buf(), reason: e.to_string() })?;
        Ok(TapsFile { path: path.to_path_buf(), mmap, header_len, meta, order: GraphOrder::default(), noise: Default::default(), n_layer: None })
    }

    pub fn bytes(&self) -> &[u8] {
        &self.mmap
    }

    /// Every key, sorted by name.
    pub fn keys(&self) -> Vec<String> {
        let mut k: Vec<String> = self.meta.tensors().into_keys().collect();
        k.sort();
        k
    }

    pub fn contains(&self, key: &str) -> bool {
        self.meta.info(key).is_some()
    }

    /// Every tap, in graph order.
    pub fn taps(&self) -> Vec<TapId> {
        let mut t: Vec<TapId> = self.meta.tensors().keys().filter_map(|k| TapId::parse_key(k)).collect();
        self.order.sort(&mut t);
        t
    }

    /// The steps that hold taps, ascending.
    pub fn steps(&self) -> Vec<usize> {
        let mut s: Vec<usize> = self.taps().iter().map(|t| t.step).collect();
        s.sort_unstable();
        s.dedup();
        s
    }

    pub fn shape(&self, key: &str) -> Option<Vec<usize>> {
        self.meta.info(key).map(|i| i.shape.clone())
    }

    /// The dtype `key` is stored in.
    pub fn dtype(&self, key: &str) -> Option<Dtype> {
        self.meta.info(key).map(|i| i.dtype)
    }

    fn raw(&self, key: &str) -> Result<(Dtype, &[usize], &[u8])> {
        let info = self.meta.info(key).ok_or_else(|| Error::MissingTensor { path: self.path.clone(), key: key.into() })?;
        let start = 8 + self.header_len;
        // read_metadata validated that offsets are contiguous and end at the file's end.
        let bytes = &self.mmap[start + info.data_offsets.0..start + info.data_offsets.1];
        Ok((info.dtype, &info.shape, bytes))
    }

    /// Reads a floating-point tensor (F32, F16, BF16 or F64) as f32.
    pub fn f32(&self, key: &str) -> Result<Tensor> {
        let (dtype, shape, b) = self.raw(key)?;
        let data: Vec<f32> = match dtype {
            Dtype::F32 => b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
            Dtype::F16 => b.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            Dtype::BF16 => b.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            Dtype::F64 => b.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap()) as f32).collect(),
            other => return Err(Error::Dtype { path: self.path.clone(), key: key.into(), dtype: format!("{other:?}"), expected: "F32/F16/BF16".into() }),
        };
        Ok(Tensor { shape: shape.to_vec(), data })
    }

    /// Reads an integer tensor (I32 or I64) such as `tokens` or `continuation`.
    pub fn ints(&self, key: &str) -> Result<Vec<i64>> {
        let (dtype, _, b) = self.raw(key)?;
        match dtype {
            Dtype::I32 => Ok(b.chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64).collect()),
            Dtype::I64 => Ok(b.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect()),
            other => Err(Error::Dtype { path: self.path.clone(), key: key.into(), dtype: format!("{other:?}"), expected: "I32/I64".into() }),
        }
    }

    /// `tokens` as u32 ids, if the file has them.
    pub fn token_ids(&self, key: &str) -> Result<Option<Vec<u32>>> {
        if !self.contains(key) {
            return Ok(None);
        }
        Ok(Some(self.ints(key)?.into_iter().map(|v| v as u32).collect()))
    }
}

/// Writes f32 and i32 tensors to a safetensors file (used for dumps, perturbed goldens and tests).
pub fn write_safetensors(path: &Path, f32s: &[(String, Vec<usize>, Vec<f32>)], i32s: &[(String, Vec<usize>, Vec<i32>)]) -> Result<()> {
    use safetensors::tensor::TensorView;
    let fb: Vec<(String, Vec<usize>, Vec<u8>)> =
        f32s.iter().map(|(k, s, d)| (k.clone(), s.clone(), d.iter().flat_map(|v| v.to_le_bytes()).collect())).collect();
    let ib: Vec<(String, Vec<usize>, Vec<u8>)> =
        i32s.iter().map(|(k, s, d)| (k.clone(), s.clone(), d.iter().flat_map(|v| v.to_le_bytes()).collect())).collect();
    let mut views = Vec::new();
    for (k, s, b) in &fb {
        views.push((k.clone(), TensorView::new(Dtype::F32, s.clone(), b).map_err(|e| Error::Other(format!("{k}: {e}")))?));
    }
    for (k, s, b) in &ib {
        views.push((k.clone(), TensorView::new(Dtype::I32, s.clone(), b).map_err(|e| Error::Other(format!("{k}: {e}")))?));
    }
    safetensors::serialize_to_file(views, None, path).map_err(|e| Error::Safetensors { path: path.to_path_buf(), reason: e.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_checksum() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("taps/m/exact")).unwrap();
        let p = dir.path().join("taps/m/exact/hi.safetensors");
        write_safetensors(
            &p,
            &[("s0/embd".into(), vec![1, 1, 2, 3], vec![1., 2., 3., 4., 5., 6.]), ("s0/l_out-0".into(), vec![1, 1, 2, 3], vec![0.; 6])],
            &[("tokens".into(), vec![2], vec![7, 9])],
        )
        .unwrap();
        let sha = hex::encode(Sha256::digest(std::fs::read(&p).unwrap()));
        let manifest = serde_json::json!({"llama_cpp_commit": "abc", "files": [
            {"path": "taps/m/exact/hi.safetensors", "sha256": sha, "kind": "taps", "model": "m", "tier": "exact", "prompt_id": "hi",
             "tensors": [{"key": "s0/embd", "tap": "embd", "stage": "prefill", "layer": null}, {"key": "s0/l_out-0"}, {"key": "tokens"}]}]});
        std::fs::write(dir.path().join("manifest.json"), manifest.to_string()).unwrap();
        let m = Manifest::load(dir.path()).unwrap();
        let f = m.find("m/exact/hi").unwrap();
        let t = m.open_taps(f).unwrap();
        assert_eq!(t.token_ids("tokens").unwrap(), Some(vec![7, 9]));
        assert_eq!(t.f32("s0/embd").unwrap().data[5], 6.0);
        assert_eq!(t.taps().len(), 2);
        assert!(matches!(t.f32("s0/nope"), Err(Error::MissingTensor { .. })));
        assert!(matches!(m.find("m/exact/nope"), Err(Error::UnknownEntry { .. })));
        // A golden file's path from anywhere (absolute, or with `..` in it) finds its entry.
        assert_eq!(m.find(p.to_str().unwrap()).unwrap().entry_name(), "m/exact/hi");
        let roundabout = dir.path().join("taps/m/../m/exact/hi.safetensors");
        assert_eq!(m.find(roundabout.to_str().unwrap()).unwrap().entry_name(), "m/exact/hi");

        // A stale golden: same manifest, changed bytes → checksum error naming the file.
        let mut wrong = m.clone();
        wrong.files[0].sha256 = "00".repeat(32);
        std::fs::copy(&p, dir.path().join("taps/m/exact/hi2.safetensors")).unwrap();
        wrong.files[0].path = "taps/m/exact/hi2.safetensors".into();
        let e = wrong.open_taps(&wrong.files[0]).err().unwrap().to_string();
        assert!(e.contains("hi2.safetensors") && e.contains("ci/regenerate-golden"), "{e}");
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bad.safetensors");
        std::fs::write(&p, b"\xff\xff\xff\xff\xff\xff\xff\x7fgarbage").unwrap();
        let e = TapsFile::open(&p).err().unwrap().to_string();
        assert!(e.contains("bad.safetensors"), "{e}");
    }
}
