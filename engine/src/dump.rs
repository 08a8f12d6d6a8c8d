//! Dumps every tap of a run to a safetensors file in the goldens' naming (golden/README.md):
//! `s{step}/{tap}` f32 tensors with 4-D shapes (step 0 the prefill, step k the k-th greedy decode
//! step), `tokens` (i32, the prompt), `continuation` (i32, the greedy token chosen at each step).
//! `lockstep compare --dump FILE --golden ENTRY` reads it.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};
use safetensors::tensor::TensorView;
use safetensors::Dtype;

use crate::backend::Backend;
use crate::sampler::greedy;
use crate::taps::Recorder;

/// Runs `prompt` then `steps` greedy decode steps on `backend` (reset first), and writes every tap
/// to `out` (through a temporary file in the same directory, renamed into place).
pub fn dump(backend: &mut dyn Backend, prompt: &[u32], steps: usize, out: &Path) -> Result<()> {
    anyhow::ensure!(!prompt.is_empty(), "dump: empty prompt");
    backend.reset();
    // key → (shape, little-endian bytes)
    let mut tensors: BTreeMap<String, (Vec<usize>, Vec<u8>)> = BTreeMap::new();
    let mut continuation = Vec::new();
    let mut feed = prompt.to_vec();
    for step in 0..=steps {
        let mut rec = Recorder::new();
        let logits = backend.forward(&feed, Some(&mut rec))?;
        for t in rec.tensors {
            let bytes = t.data.iter().flat_map(|v| v.to_le_bytes()).collect();
            tensors.insert(format!("s{step}/{}", t.key), (t.shape.to_vec(), bytes));
        }
        let tok = greedy(&logits);
        continuation.push(tok);
        feed = vec![tok];
    }
    let ids = |v: &[u32]| -> Vec<u8> { v.iter().flat_map(|&x| (x as i32).to_le_bytes()).collect() };
    tensors.insert("tokens".into(), (vec![prompt.len()], ids(prompt)));
    tensors.insert("continuation".into(), (vec![continuation.len()], ids(&continuation)));

    let mut views = Vec::with_capacity(tensors.len());
    for (k, (shape, bytes)) in &tensors {
        let dt = if k == "tokens" || k == "continuation" { Dtype::I32 } else { Dtype::F32 };
        views.push((k.clone(), TensorView::new(dt, shape.clone(), bytes).with_context(|| format!("tensor {k}"))?));
    }
    let dir = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let tmp = tempfile::NamedTempFile::new_in(dir).with_context(|| format!("creating a temporary file in {}", dir.display()))?;
    safetensors::serialize_to_file(views, None, tmp.path()).with_context(|| format!("writing {}", tmp.path().display()))?;
    tmp.persist(out).with_context(|| format!("renaming into {}", out.display()))?;
    Ok(())
}
