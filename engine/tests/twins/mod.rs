//! CPU twins composed as a fused kernel computes them, shared by the test binaries that hold the
//! kernels to them (cuda_kernels.rs on a GPU, kernels_simt.rs on the CPU).
#![allow(dead_code)]

use lockstep_engine::cpu::attention::AttnDims;
use lockstep_engine::cpu::ops::{self as cpu, RopeStyle};
use lockstep_engine::faults::{self, Fault};

/// What attention_decode_f32 must give for one token at position `p`.
pub struct DecodeAttention {
    /// `[H][Dh]`, q after RoPE
    pub q_rot: Vec<f32>,
    /// `[Hkv][Dh]`, k after RoPE (the cache's new row p)
    pub k_rot: Vec<f32>,
    /// `[H][p + 1]`: scores, unscaled
    pub kq: Vec<f32>,
    /// `[H][p + 1]`: probabilities
    pub probs: Vec<f32>,
    /// `[H·Dh]`
    pub out: Vec<f32>,
}

/// RoPE on q `[H][Dh]` and k `[Hkv][Dh]` at position p (θ base `base`), then scores, softmax (scale
/// 1/√Dh) and values over cache rows 0..p (`kcache`, `vcache`: `[≥ p][Hkv·Dh]`) and the new row p
/// (rotated k, v), with `fault`'s variants of crate::faults.
#[allow(clippy::too_many_arguments)]
pub fn decode_attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    kcache: &[f32],
    vcache: &[f32],
    p: usize,
    heads: (usize, usize, usize),
    rope: (usize, RopeStyle, f32),
    fault: Option<Fault>,
) -> DecodeAttention {
    let ((h, hkv, dh), (n_rot, style, base)) = (heads, rope);
    let row = hkv * dh;
    let (mut q_rot, mut k_rot) = (q.to_vec(), k.to_vec());
    cpu::rope(&mut q_rot, &[p], h, dh, n_rot, base, style);
    cpu::rope(&mut k_rot, &[p], hkv, dh, n_rot, base, style);
    // the CPU's cache `[kv_len][Hkv·Dh]`: rows < p as the kernel finds them, row p the new k and v
    let kc = [&kcache[..p * row], &k_rot[..]].concat();
    let vc = [&vcache[..p * row], v].concat();
    let dims = AttnDims { n_tokens: 1, n_past: p, n_head: h, n_head_kv: hkv, head_dim: dh };
    let kq = faults::attn_scores(fault, &q_rot, &kc, &dims);
    let probs = faults::attn_softmax(fault, &kq, 1.0 / (dh as f32).sqrt(), &dims);
    let out = faults::attn_values(fault, &probs, &vc, &dims);
    DecodeAttention { q_rot, k_rot, kq, probs, out }
}

/// The x an int8 decode kernel multiplies by with the RMSNorm fused (quant.cu stage_x_q8, the norm's
/// scale deferred): x ⊙ w quantized per 32 (cpu::quantize_q8), times the scale 1/√(mean(x²) + eps)
/// that the kernel applies to its sums (here to each value: the same up to roundings).
pub fn q8_normed(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let scale = cpu::rms_scale(cpu::sum_sq(x), x.len(), eps);
    cpu::quantize_q8(&cpu::mul_rows(x, w)).into_iter().map(|v| v * scale).collect()
}
