//! Dumps every tap of a run to a safetensors file in the goldens' naming (golden/README.md):
//! `s{step}/{tap}` f32 tensors with 4-D shapes (step 0 the prefill, step k the k-th greedy decode
//! step), `tokens` (i32, the prompt), `continuation` (i32, the greedy token chosen at each step).
//! `lockstep compare --dump FILE --golden ENTRY` reads it. The file is written by
//! [`SafetensorsTapWriter`], the same sink any Rust engine can use.

use std::path::Path;

use anyhow::Result;

use crate::backend::Backend;
use crate::sampler::greedy;
use crate::taps_file::SafetensorsTapWriter;

/// Runs `prompt` then `steps` greedy decode steps on `backend` (reset first), and writes every tap
/// to `out` (through a temporary file in the same directory, renamed into place).
pub fn dump(backend: &mut dyn Backend, prompt: &[u32], steps: usize, out: &Path) -> Result<()> {
    anyhow::ensure!(!prompt.is_empty(), "dump: empty prompt");
    let mut writer = SafetensorsTapWriter::new(out)?;
    backend.reset();
    let mut continuation = Vec::new();
    let mut feed = prompt.to_vec();
    for step in 0..=steps {
        writer.set_step(step);
        let logits = backend.forward(&feed, Some(&mut writer))?;
        let tok = greedy(&logits);
        continuation.push(tok);
        feed = vec![tok];
    }
    writer.set_tokens(prompt)?;
    writer.set_continuation(&continuation)?;
    writer.finish()?;
    Ok(())
}
