//! The decode step's attention (T = 1): RoPE on q and k, the KV-cache write and causal GQA
//! attention in one launch (kernels/attention.cu, `attention_decode_f32`), in place of
//! [`Gpu::rope_store`] followed by [`Gpu::attention_faulty`]. Every decode step runs it, the CUDA
//! graph's and the tapped ones alike: when taps are wanted it writes the rotated q and k, the unscaled
//! scores and the probabilities to the tap buffers of [`DecodeTaps`], so the taps of a decode step
//! come from the kernel that runs in production.

use anyhow::{ensure, Result};

use super::device::{Arg, Gpu};
use super::ops::{i as int, AttnFault};

/// Threads per block: 8 warps, each reading 32 / L key rows at a time (L lanes a row). The kernel
/// needs at least Dh threads (one per element of a head) and at most 256 (its launch bounds).
const BLOCK: u32 = 256;
/// Most scores kept in shared memory (32 KiB, which leaves room under the 48 KiB a launch may take
/// without opting in); past that kv_len they go to the caller's `p_scratch`.
pub const DECODE_SMEM_SCORES: usize = 8192;

/// Arguments of [`Gpu::attention_decode`].
#[derive(Debug, Clone, Copy)]
pub struct DecodeAttnArgs {
    /// `[H][Dh]`, after the bias, not rotated (read only)
    pub q: u64,
    /// `[Hkv][Dh]`, after the bias, not rotated (read only)
    pub k: u64,
    /// `[Hkv][Dh]`
    pub v: u64,
    /// this layer's `[ctx][Hkv·Dh]`; row `*pos` is written (rotated k, v)
    pub kc: u64,
    pub vc: u64,
    /// device i32: positions already in the cache (the new token's position)
    pub pos: u64,
    /// `[H·Dh]` (kqv_out)
    pub out: u64,
    /// `[H][ctx]` f32 for the scores when kv_len > [`DECODE_SMEM_SCORES`]; may be None when
    /// ctx ≤ [`DECODE_SMEM_SCORES`]
    pub p_scratch: Option<u64>,
    /// positions the cache holds
    pub ctx: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    pub n_rot: usize,
    /// base^(−2/n_rot), computed on the host like the CPU twin
    pub theta_scale: f32,
    pub neox: bool,
    /// softmax scale (1/√Dh)
    pub scale: f32,
    /// Where to write the observable intermediates; all null in the graph path.
    pub taps: DecodeTaps,
}

/// Tap buffers of the fused decode attention (device pointers; 0 = not wanted).
#[derive(Debug, Clone, Copy, Default)]
pub struct DecodeTaps {
    /// `[H][Dh]`: q after RoPE (`Qcur-L.rope`)
    pub q_rot: u64,
    /// `[Hkv][Dh]`: k after RoPE (`Kcur-L.rope`)
    pub k_rot: u64,
    /// `[H][kv_len]`: q·k, unscaled and unmasked (`kq-L`)
    pub kq: u64,
    /// `[H][kv_len]`: the probabilities (`kq_soft_max-L`)
    pub p: u64,
}

impl Gpu {
    /// RoPE, KV-cache write and attention of one token at position `*pos` (kv_len = *pos + 1):
    /// out = softmax(q·Kᵀ·scale) V per query head. With the int8 decode ([`Gpu::int8_decode`], the
    /// shipped tier) the softmax runs online (attention.cu dec_attend_online: the same values up to
    /// roundings, fewer barriers); else as attention_f32's. `fault` as [`Gpu::attention_faulty`]'s (no
    /// causal mask changes nothing for one row); `AttnFault::default()` is the clean kernel.
    pub fn attention_decode(&self, a: &DecodeAttnArgs, fault: AttnFault) -> Result<()> {
        let (h, hkv, dh) = (a.n_head, a.n_head_kv, a.head_dim);
        ensure!(dh.is_multiple_of(2) && (2..=256).contains(&dh), "attention_decode: head dim {dh} (even, ≤ 256)");
        ensure!(a.n_rot <= dh && a.n_rot.is_multiple_of(2), "attention_decode: n_rot {} head_dim {dh}", a.n_rot);
        ensure!(hkv > 0 && h.is_multiple_of(hkv), "attention_decode: {h} heads over {hkv} kv heads");
        ensure!(a.ctx > 0, "attention_decode: an empty cache");
        // K/V rows (and the new v row) are read in chunks of 4 floats, or 2 when Dh % 4 != 0
        let align = if dh.is_multiple_of(4) { 16 } else { 8 };
        for (what, at) in [("kc", a.kc), ("vc", a.vc), ("v", a.v)] {
            ensure!(at.is_multiple_of(align), "attention_decode: {what} at {at:#x} is not {align}-byte aligned");
        }
        let smem_cap = a.ctx.min(DECODE_SMEM_SCORES);
        ensure!(
            a.ctx <= smem_cap || a.p_scratch.is_some(),
            "attention_decode: a cache of {} positions needs p_scratch (scores past {DECODE_SMEM_SCORES})",
            a.ctx
        );
        // floats: rotated q and k, one row of value sums per warp, the scores
        let warps = (BLOCK / 32) as usize;
        let smem = ((2 + warps) * dh + smem_cap) * 4;
        let args = [
            Arg::P(a.q),
            Arg::P(a.k),
            Arg::P(a.v),
            Arg::P(a.kc),
            Arg::P(a.vc),
            Arg::P(a.pos),
            int(h)?,
            int(hkv)?,
            int(dh)?,
            int(a.n_rot)?,
            Arg::F(a.theta_scale),
            Arg::I(a.neox as i32),
            Arg::F(a.scale),
            Arg::I(fault.bits()),
            fault.window_arg()?,
            Arg::P(a.out),
            Arg::P(a.p_scratch.unwrap_or(0)),
            int(a.ctx)?,
            int(smem_cap)?,
            Arg::P(a.taps.q_rot),
            Arg::P(a.taps.k_rot),
            Arg::P(a.taps.kq),
            Arg::P(a.taps.p),
            // the shipped tier's online softmax (attention.cu dec_attend_online) with the int8 decode
            Arg::I(self.int8_decode as i32),
        ];
        self.launch_pdl("attention_decode_f32", (h as u32, 1, 1), BLOCK, smem as u32, &args)
    }
}
