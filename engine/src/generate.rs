//! Autoregressive generation on any [`Backend`]: prefill the prompt, then one token at a time.

use anyhow::Result;

use crate::backend::Backend;
use crate::sampler::{greedy, Sampler};

/// What [`generate`] produced.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    /// The generated ids (the end-of-generation token included when one stopped the run).
    pub tokens: Vec<u32>,
    /// The logits each token was chosen from, `[tokens.len()][n_vocab]`, when asked for.
    pub logits: Option<Vec<Vec<f32>>>,
    /// Whether an end-of-generation token stopped the run (else `max_tokens` did).
    pub stopped_at_eog: bool,
}

/// Resets `backend`, runs `prompt`, then generates up to `max_tokens` tokens: greedy when `sampler`
/// is `None`. Stops after the first token for which `is_eog` holds.
pub fn generate(
    backend: &mut dyn Backend,
    prompt: &[u32],
    max_tokens: usize,
    mut sampler: Option<&mut Sampler>,
    is_eog: &dyn Fn(u32) -> bool,
    keep_logits: bool,
) -> Result<Generation> {
    anyhow::ensure!(!prompt.is_empty(), "generate: empty prompt");
    backend.reset();
    let mut out = Generation { tokens: Vec::new(), logits: keep_logits.then(Vec::new), stopped_at_eog: false };
    if max_tokens == 0 {
        return Ok(out);
    }
    let mut logits = backend.forward(prompt, None)?;
    loop {
        let tok = match sampler.as_deref_mut() {
            Some(s) => s.sample(&logits),
            None => greedy(&logits),
        };
        out.tokens.push(tok);
        if let Some(l) = out.logits.as_mut() {
            l.push(std::mem::take(&mut logits));
        }
        if is_eog(tok) {
            out.stopped_at_eog = true;
            break;
        }
        if out.tokens.len() >= max_tokens {
            break;
        }
        logits = backend.forward(&[tok], None)?;
    }
    Ok(out)
}
