//! AVX2 dequantization of the block formats the real and tiny models use (Q4_0, Q4_1, Q5_0, Q8_0,
//! Q4_K, Q6_K), 32 values at a time into four vectors, for the matmul kernels (super::matmul) to
//! feed straight into their accumulators.
//!
//! Every value is the one crate::dequant's block function computes, bit for bit: the same integer
//! (nibbles, high bits, offsets), converted to f32 exactly, then the same f32 operations in the
//! same order (`d · q`; `d · q + m`; `dl · q − ml` with `dl = d · scale` computed first), each a
//! single IEEE operation whether scalar or one lane of a vector, and no fused multiply-add. The f16
//! scales are converted with F16C, as the `half` crate does at run time on such CPUs (the conversion
//! is exact). Unit tests (super::matmul) compare every format with crate::dequant on random blocks.
//!
//! Hand-written: the point is exactly these operations in registers, which no crate provides for
//! gguf-py's rounding order; the scalar block functions are the reference they are tested against.

// Types named as ggml names the formats (Q4_K rather than Q4K).
#![allow(non_camel_case_types)]

use std::arch::x86_64::*;

/// A block format with an AVX2 dequantizer. Callers guarantee AVX2, FMA and F16C, and pass blocks
/// of exactly `TS` bytes.
pub(super) trait Format {
    /// values per block
    const BS: usize;
    /// bytes per block
    const TS: usize;
    /// What the block's 32-value chunks share (scales), decoded once per block.
    type Pre: Copy;
    /// # Safety
    /// AVX2 + F16C present; `b.len() == TS`.
    unsafe fn pre(b: &[u8]) -> Self::Pre;
    /// Values `32c .. 32c + 32` of the block, element order across the four vectors.
    /// # Safety
    /// AVX2 + F16C present; `b.len() == TS`, `c < BS / 32`.
    unsafe fn chunk(b: &[u8], p: &Self::Pre, c: usize) -> [__m256; 4];
}

/// The f16 at byte `i` of `b`, in all eight lanes.
#[inline(always)]
unsafe fn f16_splat(b: &[u8], i: usize) -> __m256 {
    _mm256_cvtph_ps(_mm_set1_epi16(i16::from_le_bytes([b[i], b[i + 1]])))
}

/// The f16 at byte `i` of `b`.
#[inline(always)]
unsafe fn f16_scalar(b: &[u8], i: usize) -> f32 {
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_set1_epi16(i16::from_le_bytes([b[i], b[i + 1]]))))
}

/// 32 signed bytes (element order) → four vectors of f32 (exact).
#[inline(always)]
unsafe fn i8x32_to_f32(v: __m256i) -> [__m256; 4] {
    let lo = _mm256_castsi256_si128(v);
    let hi = _mm256_extracti128_si256::<1>(v);
    [
        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo)),
        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128::<8>(lo))),
        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi)),
        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128::<8>(hi))),
    ]
}

/// The 16 bytes at `b[i..]` split into nibbles: low nibbles as elements 0..16, high as 16..32.
#[inline(always)]
unsafe fn nibbles16(b: &[u8], i: usize) -> __m256i {
    let q = _mm_loadu_si128(b[i..i + 16].as_ptr().cast());
    let m = _mm_set1_epi8(0x0F);
    _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16::<4>(q), m), _mm_and_si128(q, m))
}

/// Byte j = 0xFF where bit j of `x` is set, else 0 (ggml's `bytes_from_bits_32`).
#[inline(always)]
unsafe fn bytes_from_bits(x: u32) -> __m256i {
    let shuf = _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0);
    let t = _mm256_shuffle_epi8(_mm256_set1_epi32(x as i32), shuf);
    let t = _mm256_or_si256(t, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe));
    _mm256_cmpeq_epi8(t, _mm256_set1_epi64x(-1))
}

#[inline(always)]
unsafe fn mul4(d: __m256, q: [__m256; 4]) -> [__m256; 4] {
    [_mm256_mul_ps(d, q[0]), _mm256_mul_ps(d, q[1]), _mm256_mul_ps(d, q[2]), _mm256_mul_ps(d, q[3])]
}

pub(super) struct Q8_0;
impl Format for Q8_0 {
    const BS: usize = 32;
    const TS: usize = 34;
    type Pre = ();
    #[inline(always)]
    unsafe fn pre(_: &[u8]) {}
    /// `q · d`
    #[inline(always)]
    unsafe fn chunk(b: &[u8], _: &(), _: usize) -> [__m256; 4] {
        let q = _mm256_loadu_si256(b[2..34].as_ptr().cast());
        mul4(f16_splat(b, 0), i8x32_to_f32(q))
    }
}

pub(super) struct Q4_0;
impl Format for Q4_0 {
    const BS: usize = 32;
    const TS: usize = 18;
    type Pre = ();
    #[inline(always)]
    unsafe fn pre(_: &[u8]) {}
    /// `d · (q − 8)`
    #[inline(always)]
    unsafe fn chunk(b: &[u8], _: &(), _: usize) -> [__m256; 4] {
        let q = _mm256_sub_epi8(nibbles16(b, 2), _mm256_set1_epi8(8));
        mul4(f16_splat(b, 0), i8x32_to_f32(q))
    }
}

pub(super) struct Q4_1;
impl Format for Q4_1 {
    const BS: usize = 32;
    const TS: usize = 20;
    type Pre = ();
    #[inline(always)]
    unsafe fn pre(_: &[u8]) {}
    /// `d · q + m`
    #[inline(always)]
    unsafe fn chunk(b: &[u8], _: &(), _: usize) -> [__m256; 4] {
        let (d, m) = (f16_splat(b, 0), f16_splat(b, 2));
        let q = mul4(d, i8x32_to_f32(nibbles16(b, 4)));
        [_mm256_add_ps(q[0], m), _mm256_add_ps(q[1], m), _mm256_add_ps(q[2], m), _mm256_add_ps(q[3], m)]
    }
}

pub(super) struct Q5_0;
impl Format for Q5_0 {
    const BS: usize = 32;
    const TS: usize = 22;
    type Pre = ();
    #[inline(always)]
    unsafe fn pre(_: &[u8]) {}
    /// `d · ((nibble | high bit << 4) − 16)`, the high bit of element j being bit j of qh
    #[inline(always)]
    unsafe fn chunk(b: &[u8], _: &(), _: usize) -> [__m256; 4] {
        let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
        let high = _mm256_and_si256(bytes_from_bits(qh), _mm256_set1_epi8(0x10));
        let q = _mm256_sub_epi8(_mm256_or_si256(nibbles16(b, 6), high), _mm256_set1_epi8(16));
        mul4(f16_splat(b, 0), i8x32_to_f32(q))
    }
}

pub(super) struct Q4_K;
impl Format for Q4_K {
    const BS: usize = 256;
    const TS: usize = 144;
    /// per 32-value sub-block: `dl = d · scale`, `ml = dmin · min`
    type Pre = ([f32; 8], [f32; 8]);
    #[inline(always)]
    unsafe fn pre(b: &[u8]) -> Self::Pre {
        let (d, dmin) = (f16_scalar(b, 0), f16_scalar(b, 2));
        let (sc, mn) = crate::dequant::scale_min_k4(&b[4..16]);
        let mut dl = [0.0f32; 8];
        let mut ml = [0.0f32; 8];
        for j in 0..8 {
            dl[j] = d * sc[j] as f32;
            ml[j] = dmin * mn[j] as f32;
        }
        (dl, ml)
    }
    /// sub-block j = c: nibble j % 2 of qs[32·(j / 2) + l]; `dl · q − ml`
    #[inline(always)]
    unsafe fn chunk(b: &[u8], p: &Self::Pre, c: usize) -> [__m256; 4] {
        let at = 16 + 32 * (c / 2);
        let qs = _mm256_loadu_si256(b[at..at + 32].as_ptr().cast());
        let q = _mm256_and_si256(_mm256_srl_epi16(qs, _mm_cvtsi32_si128(4 * (c % 2) as i32)), _mm256_set1_epi8(0x0F));
        let q = mul4(_mm256_set1_ps(p.0[c]), i8x32_to_f32(q));
        let m = _mm256_set1_ps(p.1[c]);
        [_mm256_sub_ps(q[0], m), _mm256_sub_ps(q[1], m), _mm256_sub_ps(q[2], m), _mm256_sub_ps(q[3], m)]
    }
}

pub(super) struct Q6_K;
impl Format for Q6_K {
    const BS: usize = 256;
    const TS: usize = 210;
    /// per 16 values: `dl = d · scale`
    type Pre = [f32; 16];
    #[inline(always)]
    unsafe fn pre(b: &[u8]) -> Self::Pre {
        let d = f16_scalar(b, 208);
        let mut dl = [0.0f32; 16];
        for (i, v) in dl.iter_mut().enumerate() {
            *v = d * (b[192 + i] as i8) as f32;
        }
        dl
    }
    /// chunk 4c + s (e = 128c + 32s + l): nibble s / 2 of ql[64c + 32(s % 2) + l], bits 2s..2s+2 of
    /// qh[32c + l] as bits 4..6, minus 32; `dl · q`, dl changing every 16 values
    #[inline(always)]
    unsafe fn chunk(b: &[u8], p: &Self::Pre, c8: usize) -> [__m256; 4] {
        let (c, s) = (c8 / 4, c8 % 4);
        let at = 64 * c + 32 * (s % 2);
        let ql = _mm256_loadu_si256(b[at..at + 32].as_ptr().cast());
        let lo = _mm256_and_si256(_mm256_srl_epi16(ql, _mm_cvtsi32_si128(4 * (s / 2) as i32)), _mm256_set1_epi8(0x0F));
        let ah = 128 + 32 * c;
        let qh = _mm256_loadu_si256(b[ah..ah + 32].as_ptr().cast());
        let hi = _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * s as i32)), _mm256_set1_epi8(0x03));
        let q = _mm256_sub_epi8(_mm256_or_si256(lo, _mm256_slli_epi16::<4>(hi)), _mm256_set1_epi8(32));
        let q = i8x32_to_f32(q);
        let (da, db) = (_mm256_set1_ps(p[8 * c + 2 * s]), _mm256_set1_ps(p[8 * c + 2 * s + 1]));
        [_mm256_mul_ps(da, q[0]), _mm256_mul_ps(da, q[1]), _mm256_mul_ps(db, q[2]), _mm256_mul_ps(db, q[3])]
    }
}
