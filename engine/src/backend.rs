//! The trait every backend (CPU reference, CUDA) implements, so the runner treats them alike.

use crate::gguf::GgufFile;
use crate::taps::TapSink;
use std::ops::Range;

/// A loaded model on one backend, with its KV cache.
pub trait Backend {
    /// Short name used in trial names and reports: `cpu`, `cuda`.
    fn name(&self) -> &'static str;
    /// Number of positions already in the KV cache.
    fn n_past(&self) -> usize;
    /// Empties the KV cache (positions restart at 0).
    fn reset(&mut self);
    /// Runs `tokens` at positions `n_past()..n_past()+tokens.len()`, appends them to the KV cache and
    /// returns the logits of the last token (`n_vocab` values). Like llama.cpp, the last layer computes
    /// its FFN and the output head for the last token only.
    fn forward(&mut self, tokens: &[u32], taps: Option<&mut dyn TapSink>) -> anyhow::Result<Vec<f32>>;
    /// [`Self::forward`] without taps, the logits borrowed from the backend's own buffer until the
    /// next call: nothing is copied or allocated on the way out (decode loops, `lockstep bench`).
    fn step(&mut self, tokens: &[u32]) -> anyhow::Result<&[f32]>;
    /// Rows `rows` of the tensor `tensor` of `file` (the model this backend was loaded from), dequantized
    /// to f32 by the code this backend dequantizes that tensor's stored blocks with for its products:
    /// `[rows.len()][ne0]`, ne0 fastest (a tensor of ne `[ne0, ne1, …]` has ne1·… rows; a 1-D tensor
    /// is one row). The runner's `dequant` check (src/checks/dequant.rs) holds it to gguf-py's.
    /// A loader fault that moves or drops values (a transposed, zeroed or truncated matrix) does not act
    /// here, so that it is not mistaken for a dequantization bug; a fault of the dequantization itself
    /// (crate::faults::Fault::Q4kMinSign) does, as at load.
    fn dequantize_rows(&self, file: &GgufFile, tensor: &str, rows: Range<usize>) -> anyhow::Result<Vec<f32>>;
    /// Switches a faster, less exact arithmetic on or off (CUDA: TF32 tensor cores for the prefill
    /// GEMMs and int8 activations for the decode matvecs, allowed on the shipped tier only) and
    /// returns the previous setting. A check that compares the backend's prefill with its own decode
    /// step (kv_cache) turns it off, so that it tests the cache and not the two arithmetics. Backends
    /// with one arithmetic ignore it.
    fn set_fast_math(&mut self, on: bool) -> anyhow::Result<bool> {
        let _ = on;
        Ok(false)
    }
    /// Which arithmetic a forward pass of `t` tokens runs (what a speed figure measured), in words.
    fn kernel_path(&self, t: usize) -> String {
        let _ = t;
        format!("{}: f32 reference", self.name())
    }
}
