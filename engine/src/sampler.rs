//! Token selection: greedy, and seeded top-k → top-p → temperature sampling in llama.cpp's order.
//!
//! llama.cpp's default chain (common/common.h `samplers`, common/sampling.cpp) is
//! penalties, dry, top_n_sigma, top_k, typical_p, top_p, min_p, xtc, temperature, dist.
//! With penalties, dry, top-n-sigma, typical-p, min-p and xtc disabled this is:
//!
//! 1. **top-k** (`llama_sampler_top_k_impl`): sort by logit, descending, keep the first k
//!    (k ≤ 0 keeps all). Ties at the cut are broken here by the lower token id.
//! 2. **top-p** (`llama_sampler_top_p_apply`, skipped when p ≥ 1): a softmax of the *raw* logits
//!    (temperature not yet applied) over the **top-k-truncated set**, in f32
//!    (`llama_sampler_softmax_impl`: max subtracted, `expf`, f32 sum); then walk the sorted
//!    candidates accumulating p in f32 and keep the first i+1 with cumsum ≥ p (min_keep = 0).
//! 3. **temperature** (`llama_sampler_temp_impl`): logits divided by T. T ≤ 0 keeps only the
//!    first maximum (greedy).
//! 4. **dist** (`llama_sampler_dist_apply`): softmax of the remaining logits (f64 sum), one draw
//!    u ∈ [0,1), the first candidate whose running sum reaches u·sum is chosen.
//!
//! Our random stream is ChaCha20 (rand_chacha) rather than llama.cpp's mt19937, so the tokens of a
//! seeded run differ from llama.cpp's; the *distribution* is the same, which is what
//! [`distribution`] exposes for the runner's chi-square test.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;

/// Sampling settings. `temperature <= 0` means greedy; `top_k == 0` keeps every token;
/// `top_p >= 1` disables top-p.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplerParams {
    pub temperature: f32,
    pub top_k: usize,
    pub top_p: f32,
    pub seed: u64,
}

impl Default for SamplerParams {
    /// llama.cpp's common defaults for these four knobs (temp 0.8, top-k 40, top-p 0.95), seed 0.
    fn default() -> Self {
        Self { temperature: 0.8, top_k: 40, top_p: 0.95, seed: 0 }
    }
}

/// The id of the largest logit, the first one on ties (as llama.cpp's greedy sampler).
/// An empty slice gives 0.
pub fn greedy(logits: &[f32]) -> u32 {
    let mut best = 0usize;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// The candidates that survive top-k and top-p, sorted by logit descending (ties: lower id
/// first), as `(token id, logit)`.
fn candidates(logits: &[f32], p: &SamplerParams, fault: Option<crate::faults::Fault>) -> Vec<(u32, f32)> {
    let mut c: Vec<(u32, f32)> = logits.iter().enumerate().map(|(i, &l)| (i as u32, l)).collect();
    let by_logit_desc = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    // top-k
    let k = if p.top_k == 0 { c.len() } else { p.top_k.min(c.len()) };
    if k < c.len() && k > 0 {
        c.select_nth_unstable_by(k - 1, by_logit_desc);
        c.truncate(k);
    }
    c.sort_by(by_logit_desc);
    // top-p over the truncated set, on raw logits, in f32 like llama_sampler_softmax_impl
    if p.top_p < 1.0 && !c.is_empty() {
        let max = c[0].1;
        // fault injection (crate::faults::Fault::SamplerOrder): temperature applied before top-p
        let t = if fault == Some(crate::faults::Fault::SamplerOrder) && p.temperature > 0.0 { p.temperature } else { 1.0 };
        let e: Vec<f32> = c.iter().map(|&(_, l)| ((l - max) / t).exp()).collect();
        let sum: f32 = e.iter().sum();
        let mut cum = 0.0f32;
        let mut last = c.len();
        for (i, &ei) in e.iter().enumerate() {
            cum += ei / sum;
            if cum >= p.top_p {
                last = i + 1;
                break;
            }
        }
        c.truncate(last);
    }
    c
}

/// The exact probability of every token id (length = `logits.len()`) that the chain implies:
/// zero outside the surviving set, `softmax(logit / T)` inside it, computed in f64.
/// With `temperature <= 0` it is one-hot on [`greedy`]'s choice.
pub fn distribution(logits: &[f32], p: &SamplerParams) -> Vec<f64> {
    distribution_with_fault(logits, p, None)
}

/// [`distribution`] of a sampler with an injected fault (crate::faults).
pub fn distribution_with_fault(logits: &[f32], p: &SamplerParams, fault: Option<crate::faults::Fault>) -> Vec<f64> {
    let mut out = vec![0.0f64; logits.len()];
    if logits.is_empty() {
        return out;
    }
    if p.temperature <= 0.0 {
        out[greedy(logits) as usize] = 1.0;
        return out;
    }
    let c = candidates(logits, p, fault);
    let t = p.temperature as f64;
    let max = c[0].1 as f64 / t;
    let e: Vec<f64> = c.iter().map(|&(_, l)| (l as f64 / t - max).exp()).collect();
    let sum: f64 = e.iter().sum();
    for (&(id, _), ei) in c.iter().zip(e) {
        out[id as usize] = ei / sum;
    }
    out
}

/// A seeded sampler (ChaCha20): the same seed and logits give the same tokens on every machine.
pub struct Sampler {
    pub params: SamplerParams,
    rng: ChaCha20Rng,
    fault: Option<crate::faults::Fault>,
}

impl Sampler {
    pub fn new(params: SamplerParams) -> Self {
        Self::with_fault(params, None)
    }

    /// A sampler with an injected fault (crate::faults); `None` is [`Self::new`].
    pub fn with_fault(params: SamplerParams, fault: Option<crate::faults::Fault>) -> Self {
        Self { params, rng: ChaCha20Rng::seed_from_u64(params.seed), fault }
    }

    /// Picks the next token. Draws exactly one random number per call when `temperature > 0`
    /// (none when greedy), so runs stay aligned step for step.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.params.temperature <= 0.0 || logits.is_empty() {
            return greedy(logits);
        }
        let c = candidates(logits, &self.params, self.fault);
        let t = self.params.temperature;
        // dist: softmax over the survivors (temperature applied), f64 running sum
        let max = c[0].1 / t;
        let e: Vec<f32> = c.iter().map(|&(_, l)| (l / t - max).exp()).collect();
        let sum: f64 = e.iter().map(|&v| v as f64).sum();
        let target = sum * self.rng.random::<f64>();
        let mut run = 0.0f64;
        for (&(id, _), &ei) in c.iter().zip(&e) {
            run += ei as f64;
            if run >= target {
                return id;
            }
        }
        c[c.len() - 1].0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_first_maximum() {
        assert_eq!(greedy(&[1.0, 3.0, 3.0, 2.0]), 1);
        assert_eq!(greedy(&[-1.0]), 0);
        assert_eq!(greedy(&[f32::NEG_INFINITY, -5.0]), 1);
    }

    #[test]
    fn distribution_is_softmax_with_temperature_when_nothing_truncates() {
        let logits = [0.0f32, 1.0, 2.0];
        let p = SamplerParams { temperature: 0.5, top_k: 0, top_p: 1.0, seed: 0 };
        let d = distribution(&logits, &p);
        let e: Vec<f64> = [0.0f64, 2.0, 4.0].iter().map(|x| x.exp()).collect();
        let s: f64 = e.iter().sum();
        for i in 0..3 {
            assert!((d[i] - e[i] / s).abs() < 1e-12, "{d:?}");
        }
    }

    #[test]
    fn top_k_then_top_p_on_raw_logits_then_temperature() {
        // raw softmax over the top-3 {4,3,2}: [0.665, 0.245, 0.090]; top-p 0.8 keeps two tokens.
        // If temperature were applied first (T=0.25: [0.98, 0.018, ...]) top-p would keep one.
        let logits = [2.0f32, 4.0, 3.0, 1.0, 0.0];
        let p = SamplerParams { temperature: 0.25, top_k: 3, top_p: 0.8, seed: 0 };
        let d = distribution(&logits, &p);
        assert_eq!(d[0], 0.0);
        assert_eq!(d[3], 0.0);
        assert!(d[1] > 0.0 && d[2] > 0.0);
        let r = (4.0f64).exp(); // ratio d1/d2 = exp((4-3)/0.25)
        assert!((d[1] / d[2] - r).abs() < 1e-9);
        assert!((d.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        // top-p's softmax is over the k survivors, not the whole vocabulary: with the full
        // vocabulary the top token would have 0.636 < 0.65 and two would survive; over the top-2
        // set it has 0.731 ≥ 0.65 and stays alone.
        let p2 = SamplerParams { temperature: 1.0, top_k: 2, top_p: 0.65, seed: 0 };
        let d2 = distribution(&logits, &p2);
        assert_eq!(d2[1], 1.0);
    }

    #[test]
    fn sampler_is_seeded_and_follows_the_distribution() {
        let logits = [0.0f32, 1.0, 2.0, -1.0];
        let p = SamplerParams { temperature: 1.0, top_k: 0, top_p: 1.0, seed: 42 };
        let mut a = Sampler::new(p);
        let mut b = Sampler::new(p);
        let sa: Vec<u32> = (0..50).map(|_| a.sample(&logits)).collect();
        let sb: Vec<u32> = (0..50).map(|_| b.sample(&logits)).collect();
        assert_eq!(sa, sb);
        let n = 20000;
        let mut counts = [0usize; 4];
        for _ in 0..n {
            counts[a.sample(&logits) as usize] += 1;
        }
        let d = distribution(&logits, &p);
        for i in 0..4 {
            let f = counts[i] as f64 / n as f64;
            assert!((f - d[i]).abs() < 0.02, "token {i}: {f} vs {}", d[i]);
        }
    }

    #[test]
    fn zero_temperature_is_greedy() {
        let mut s = Sampler::new(SamplerParams { temperature: 0.0, ..Default::default() });
        assert_eq!(s.sample(&[0.0, 5.0, 5.0]), 1);
        let d = distribution(&[0.0, 5.0, 5.0], &SamplerParams { temperature: 0.0, ..Default::default() });
        assert_eq!(d, vec![0.0, 1.0, 0.0]);
    }
}
