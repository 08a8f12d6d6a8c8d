//! The CPU backend's math, one small named function per graph operation, each matching the
//! arithmetic of ggml's CPU kernels where the order of operations changes the f32 result
//! (RMSNorm and softmax sum in f64; RoPE builds its angles by repeated multiplication).
//!
//! Dimension letters: `T` tokens in the batch, `D` model width (`n_embd`), `F` FFN width,
//! `H`/`Hkv` query/key-value heads, `Dh` head dimension, `V` vocabulary.
//!
//! Every function here is a hook point for the fault injector: keep them small and named.

pub use crate::config::RopeStyle;

/// A row-major f32 matrix `[rows][cols]`: GGUF's `ne = [cols, rows]` (ne0 contiguous) read as is.
/// For a projection, `cols` is in-features and `rows` out-features, so `y = W x` is one dot
/// product per row.
#[derive(Debug, Clone, PartialEq)]
pub struct Matrix {
    pub rows: usize,
    pub cols: usize,
    /// `[rows][cols]`
    pub data: Vec<f32>,
}

impl Matrix {
    pub fn row(&self, r: usize) -> &[f32] {
        &self.data[r * self.cols..(r + 1) * self.cols]
    }
}

/// Dot product in f32, summed in the order of ggml's `ggml_vec_dot_f32` on AVX2 (the CPU
/// llama.cpp's goldens come from): 32 accumulators (4 vectors × 8 lanes) fed by fused multiply-add
/// in steps of 32, reduced pairwise (v0+v2, v1+v3, then v0+v1, halves, horizontal adds), then the
/// leftover `n mod 32` products added one by one. Matching the order keeps large dot products
/// (qwen2's layer-0 scores reach 8000, where one f32 ulp is 5e-4) within rounding of llama.cpp's.
/// LLVM keeps the accumulators in vector registers; with AVX2+FMA (detected once at run time) the
/// same body is compiled with fused multiply-add, otherwise multiply then add, as ggml does.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx2_fma() {
            // SAFETY: the CPU supports AVX2 and FMA (checked just above), which is all
            // `dot_avx2` requires; it reads only within the two slices.
            return unsafe { dot_avx2(a, b) };
        }
    }
    dot_body::<false>(a, b)
}

#[cfg(target_arch = "x86_64")]
pub(super) fn has_avx2_fma() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    dot_body::<true>(a, b)
}

#[inline(always)]
pub(super) fn dot_body<const FMA: bool>(a: &[f32], b: &[f32]) -> f32 {
    const STEP: usize = 32; // GGML_F32_STEP: GGML_F32_ARR = 4 vectors of GGML_F32_EPR = 8 lanes
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0.0f32; STEP]; // acc[j*8 + l] = lane l of ggml's sum[j]
    let mut ca = a.chunks_exact(STEP);
    let mut cb = b.chunks_exact(STEP);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for i in 0..STEP {
            acc[i] = if FMA { x[i].mul_add(y[i], acc[i]) } else { acc[i] + x[i] * y[i] };
        }
    }
    // GGML_F32x8_REDUCE: sum[0] += sum[2], sum[1] += sum[3]; sum[0] += sum[1]
    let mut v = [0.0f32; 8];
    for l in 0..8 {
        v[l] = (acc[l] + acc[16 + l]) + (acc[8 + l] + acc[24 + l]);
    }
    // low half + high half, then two horizontal adds
    let t0 = [v[0] + v[4], v[1] + v[5], v[2] + v[6], v[3] + v[7]];
    let mut sum = (t0[0] + t0[1]) + (t0[2] + t0[3]);
    for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
        sum += x * y;
    }
    sum
}

/// Dot product in the order of llama.cpp's prompt-processing GEMM (llamafile `tinyBLAS<8, __m256>`,
/// used by ggml for f32 matmuls with at least 2 tokens, k % 8 == 0, m % 4 == 0): one 8-lane
/// accumulator fed by fused multiply-add over k in steps of 8, then `hsum` (high + low half,
/// `movehl`, `movehdup`). Requires `a.len() % 8 == 0`.
pub fn dot_gemm(a: &[f32], b: &[f32]) -> f32 {
    debug_assert!(a.len() == b.len() && a.len().is_multiple_of(8));
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx2_fma() {
            // SAFETY: AVX2 and FMA are present (checked just above); the body only reads the slices.
            return unsafe { dot_gemm_avx2(a, b) };
        }
    }
    dot_gemm_body::<false>(a, b)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_gemm_avx2(a: &[f32], b: &[f32]) -> f32 {
    dot_gemm_body::<true>(a, b)
}

#[inline(always)]
pub(super) fn dot_gemm_body<const FMA: bool>(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    for (x, y) in a.chunks_exact(8).zip(b.chunks_exact(8)) {
        for i in 0..8 {
            acc[i] = if FMA { x[i].mul_add(y[i], acc[i]) } else { acc[i] + x[i] * y[i] };
        }
    }
    let t = [acc[4] + acc[0], acc[5] + acc[1], acc[6] + acc[2], acc[7] + acc[3]];
    (t[0] + t[2]) + (t[1] + t[3])
}

/// Which summation order ggml would use for a `[m out][k in] × [n tokens]` f32 matmul on AVX2:
/// the tinyBLAS GEMM for n ≥ 2 when k % 8 == 0 and m % 4 == 0, else `ggml_vec_dot_f32`.
pub fn gemm_order(m: usize, k: usize, n: usize) -> fn(&[f32], &[f32]) -> f32 {
    if n >= 2 && k.is_multiple_of(8) && m.is_multiple_of(4) {
        dot_gemm
    } else {
        dot
    }
}

/// `y[t] = W x[t]` for each of the `T` rows of `x`.
/// x: `[T][W.cols]`, returns `[T][W.rows]`: each output one dot product in the order of
/// [`gemm_order`] (super::matmul computes them in tiles, bit for bit the same).
pub fn matmul(w: &Matrix, x: &[f32]) -> Vec<f32> {
    super::matmul::matmul_f32(w, x)
}

/// Σx² of a row in f64 (each square rounded to f32 first), ggml's order: the RMSNorm's sum.
pub fn sum_sq(xr: &[f32]) -> f64 {
    xr.iter().map(|&v| (v * v) as f64).sum()
}

/// The RMSNorm scale 1/√(mean + eps) of `n` values whose Σx² is `sum_sq`, the mean rounded to f32
/// first (ggml's arithmetic; the kernels' rms_scale_of_sum).
pub fn rms_scale(sum_sq: f64, n: usize, eps: f32) -> f32 {
    1.0f32 / ((sum_sq / n as f64) as f32 + eps).sqrt()
}

/// RMSNorm without the weight (ggml_rms_norm): `x / sqrt(mean(x²) + eps)` per row of `width`.
/// Like ggml, the sum of squares is accumulated in f64 and the scale computed in f32.
pub fn rmsnorm(x: &[f32], width: usize, eps: f32) -> Vec<f32> {
    let mut y = vec![0.0f32; x.len()];
    for (xr, yr) in x.chunks_exact(width).zip(y.chunks_exact_mut(width)) {
        let scale = rms_scale(sum_sq(xr), width, eps);
        for (o, &v) in yr.iter_mut().zip(xr) {
            *o = v * scale;
        }
    }
    y
}

/// Element-wise product with a per-channel weight broadcast over rows (the norm weight, ggml_mul).
pub fn mul_rows(x: &[f32], w: &[f32]) -> Vec<f32> {
    let d = w.len();
    x.chunks_exact(d).flat_map(|r| r.iter().zip(w).map(|(a, b)| a * b)).collect()
}

/// Adds a per-channel bias to every row (ggml_add with a broadcast `[D]` operand).
pub fn add_bias(x: &mut [f32], b: &[f32]) {
    for r in x.chunks_exact_mut(b.len()) {
        for (v, bb) in r.iter_mut().zip(b) {
            *v += bb;
        }
    }
}

/// Residual add `a + b`, same shape.
pub fn add(a: &[f32], b: &[f32]) -> Vec<f32> {
    assert_eq!(a.len(), b.len(), "residual add: {} vs {} elements", a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| x + y).collect()
}

/// Rotary position embedding in place. x: `[T][heads][Dh]`, `positions[t]` the absolute position of
/// row t; only the first `n_rot` dimensions of each head rotate (the rest pass through), as in
/// ggml_rope_ext with `n_dims = n_rot`. Angles as ggml builds them: θ₀ = p,
/// θ_{i+1} = θ_i · base^(-2/n_rot) in f32, cos/sin in f32, rotation with one fused multiply-add.
pub fn rope(x: &mut [f32], positions: &[usize], heads: usize, head_dim: usize, n_rot: usize, base: f32, style: RopeStyle) {
    assert!(n_rot <= head_dim && n_rot.is_multiple_of(2), "rope: n_rot {n_rot} vs head_dim {head_dim}");
    let theta_scale = base.powf(-2.0 / n_rot as f32);
    let mut cache = vec![0.0f32; n_rot]; // [n_rot/2] of (cos, sin)
    for (t, &p) in positions.iter().enumerate() {
        let mut theta = p as f32;
        for i0 in (0..n_rot).step_by(2) {
            cache[i0] = theta.cos();
            cache[i0 + 1] = theta.sin();
            theta *= theta_scale;
        }
        for h in 0..heads {
            let v = &mut x[(t * heads + h) * head_dim..(t * heads + h + 1) * head_dim];
            for i0 in (0..n_rot).step_by(2) {
                let (c, s) = (cache[i0], cache[i0 + 1]);
                let (a, b) = match style {
                    RopeStyle::Normal => (i0, i0 + 1),
                    RopeStyle::Neox => (i0 / 2, i0 / 2 + n_rot / 2),
                };
                let (x0, x1) = (v[a], v[b]);
                // ggml's `x0*cos - x1*sin` as GCC contracts it (gnu++17 → -ffp-contract=fast):
                // the first product fused. Matches llama.cpp's CPU rope bit for bit.
                v[a] = x0.mul_add(c, -(x1 * s));
                v[b] = x0.mul_add(s, x1 * c);
            }
        }
    }
}

/// Softmax of one row as ggml_soft_max_ext computes it: `w = x·scale + mask`, max subtracted,
/// exponentials summed in f64, then multiplied by the f32 inverse of the sum.
/// `n_valid`: entries at index ≥ n_valid are masked (−∞) and come out 0 (the causal mask).
pub fn softmax_row(x: &[f32], scale: f32, n_valid: usize) -> Vec<f32> {
    let mut y = vec![0.0f32; x.len()];
    softmax_row_into(x, scale, n_valid, &mut y);
    y
}

/// [`softmax_row`] into `y` (`x.len()` values); masked entries of `x` are not read.
pub fn softmax_row_into(x: &[f32], scale: f32, n_valid: usize, y: &mut [f32]) {
    let n_valid = n_valid.min(x.len());
    let (valid, masked) = y.split_at_mut(n_valid);
    // the masked entries are −∞: they never raise the maximum (f32::max ignores NaN either way)
    let mut max = f32::NEG_INFINITY;
    for (w, &v) in valid.iter_mut().zip(x) {
        *w = v * scale;
        max = max.max(*w);
    }
    let mut sum = 0.0f64;
    for w in valid.iter_mut() {
        let e = if *w == f32::NEG_INFINITY { 0.0 } else { (*w - max).exp() };
        sum += e as f64;
        *w = e;
    }
    let inv = (1.0 / sum) as f32;
    for v in valid.iter_mut() {
        *v *= inv;
    }
    // a masked entry's exponential is 0, times the inverse as every other (NaN when the sum is 0 or NaN)
    masked.fill(0.0 * inv);
}

/// Activations as the shipped tier's int8 decode sees them (the CPU twin of kernels/quant.cu
/// stage_x_q8; llama.cpp's quantize_q8_1 but for ties): per 32 values, `d = amax / 127`,
/// `q = round(x · (127 / amax))` (0 when amax is 0; a tiny amax and its x scaled by 2^100 first, so
/// that 127 / amax stays finite), and each value comes back as `d · q`. A dot product of dequantized weights with these
/// is what the `matvec1q_*` kernels compute, up to the order of their f32 sums. `x.len()` must be
/// a multiple of 32 (the block formats' rows are).
pub fn quantize_q8(x: &[f32]) -> Vec<f32> {
    assert!(x.len().is_multiple_of(32), "quantize_q8: {} values is not a multiple of 32", x.len());
    x.chunks_exact(32)
        .flat_map(|b| {
            let amax = b.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            // a tiny amax and its x scaled by 2^100 first (exact), as stage_x_q8 does
            let up = if amax < 1e-30 { 2f32.powi(100) } else { 1.0 };
            let (d, id) = (amax / 127.0, if amax == 0.0 { 0.0 } else { 127.0 / (amax * up) });
            b.iter().map(move |&v| if amax == 0.0 { 0.0 } else { ((v * up) * id).round() * d })
        })
        .collect()
}

/// SwiGLU (ggml_swiglu): `silu(gate) · up`, silu(x) = x / (1 + e^(−x)).
pub fn swiglu(gate: &[f32], up: &[f32]) -> Vec<f32> {
    assert_eq!(gate.len(), up.len(), "swiglu: gate {} vs up {}", gate.len(), up.len());
    gate.iter().zip(up).map(|(&g, &u)| g / (1.0 + (-g).exp()) * u).collect()
}

/// Embedding lookup (ggml_get_rows): rows of `table` (`[V][D]`) for each token. Errors on an id
/// outside the vocabulary.
pub fn embedding(table: &Matrix, tokens: &[u32]) -> anyhow::Result<Vec<f32>> {
    let mut out = Vec::with_capacity(tokens.len() * table.cols);
    for &tok in tokens {
        anyhow::ensure!((tok as usize) < table.rows, "token id {tok} is outside the vocabulary ({} rows)", table.rows);
        out.extend_from_slice(table.row(tok as usize));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// quantize_q8 keeps every value within half a step (amax / 254) of itself, hits ±amax exactly
    /// (q = ±127), rounds halves away from zero as roundf does, and leaves an all-zero 32 at zero.
    #[test]
    fn quantize_q8_rounds_per_32_values() {
        let mut x: Vec<f32> = (0..64).map(|i| (i as f32 - 20.0) * 0.37).collect();
        x[32..].fill(0.0);
        x[40] = -0.0;
        let q = super::quantize_q8(&x);
        let amax = x[..32].iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        for (i, (&a, &b)) in x[..32].iter().zip(&q[..32]).enumerate() {
            assert!((a - b).abs() <= d / 2.0 * 1.0001, "{i}: {a} -> {b} (step {d})");
            let k = b / d;
            assert!((k - k.round()).abs() < 1e-3 && k.abs() <= 127.5, "{i}: {b} is not a multiple of {d} up to 127");
        }
        assert_eq!(q[0], -127.0 * d, "-amax maps to q = -127");
        assert!(q[32..].iter().all(|&v| v == 0.0));
        // 2.5 steps: half away from zero (3 steps), on both signs
        let mut h = vec![0.0f32; 32];
        h[0] = 127.0;
        h[1] = 2.5;
        h[2] = -2.5;
        let qh = super::quantize_q8(&h);
        assert_eq!((qh[1], qh[2]), (3.0, -3.0));
        // an amax so small that 127 / amax overflows: scaled first, still within half a step
        let tiny: Vec<f32> = (0..32).map(|i| (i as f32 - 9.0) * 1e-40).collect();
        assert!((127.0f32 / 22e-40).is_infinite());
        let qt = super::quantize_q8(&tiny);
        let dt = 22e-40f32 / 127.0;
        for (i, (&a, &b)) in tiny.iter().zip(&qt).enumerate() {
            assert!(b.is_finite() && (a - b).abs() <= dt, "{i}: {a} -> {b} (step {dt})");
        }
    }

    fn naive_dot(a: &[f32], b: &[f32]) -> f64 {
        a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum()
    }

    #[test]
    fn dot_matches_f64_for_odd_lengths() {
        for n in [0usize, 1, 7, 16, 17, 33, 896, 4864 + 3] {
            let a: Vec<f32> = (0..n).map(|i| ((i * 37 % 101) as f32 - 50.0) / 13.0).collect();
            let b: Vec<f32> = (0..n).map(|i| ((i * 53 % 97) as f32 - 48.0) / 7.0).collect();
            let d = dot(&a, &b) as f64;
            let r = naive_dot(&a, &b);
            assert!((d - r).abs() <= 1e-5 * (1.0 + r.abs()), "n={n}: {d} vs {r}");
            let g = dot_body::<false>(&a, &b) as f64;
            assert!((g - r).abs() <= 1e-5 * (1.0 + r.abs()), "portable n={n}: {g} vs {r}");
        }
    }

    #[test]
    fn gemm_dot_matches_f64() {
        let a: Vec<f32> = (0..64).map(|i| ((i * 37 % 101) as f32 - 50.0) / 13.0).collect();
        let b: Vec<f32> = (0..64).map(|i| ((i * 53 % 97) as f32 - 48.0) / 7.0).collect();
        let r = naive_dot(&a, &b);
        assert!((dot_gemm(&a, &b) as f64 - r).abs() <= 1e-5 * (1.0 + r.abs()));
        assert!((dot_gemm_body::<false>(&a, &b) as f64 - r).abs() <= 1e-5 * (1.0 + r.abs()));
    }

    #[test]
    fn matmul_is_w_times_x_for_each_row() {
        // W: [3 out][2 in]
        let w = Matrix { rows: 3, cols: 2, data: vec![1., 2., 3., 4., 5., 6.] };
        let x = vec![1., 0., 0., 1., 1., 1.]; // [T=3][2]
        let y = matmul(&w, &x);
        assert_eq!(y, vec![1., 3., 5., 2., 4., 6., 3., 7., 11.]);
        // many rows: crosses the task block boundary
        let w = Matrix { rows: 37, cols: 5, data: (0..185).map(|i| i as f32).collect() };
        let y = matmul(&w, &[1., 1., 1., 1., 1.]);
        for (r, v) in y.iter().enumerate() {
            assert_eq!(*v, (5 * r * 5 + 10) as f32);
        }
    }

    #[test]
    fn rmsnorm_unit_rms() {
        let x = vec![3.0f32, 4.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0];
        let y = rmsnorm(&x, 4, 0.0);
        // row 0: mean square 25/4 → rms 2.5
        assert!((y[0] - 1.2).abs() < 1e-6 && (y[1] - 1.6).abs() < 1e-6);
        assert!(y[4..].iter().all(|v| (v - 1.0).abs() < 1e-6));
        // epsilon is inside the root
        let y = rmsnorm(&[0.0, 0.0], 2, 1e-6);
        assert_eq!(y, vec![0.0, 0.0]);
    }

    #[test]
    fn rope_position_zero_is_identity_and_styles_differ() {
        let x0: Vec<f32> = (0..8).map(|i| i as f32 + 1.0).collect(); // T=1, heads=1, Dh=8
        for style in [RopeStyle::Normal, RopeStyle::Neox] {
            let mut x = x0.clone();
            rope(&mut x, &[0], 1, 8, 8, 10000.0, style);
            assert_eq!(x, x0);
        }
        let mut a = x0.clone();
        let mut b = x0.clone();
        rope(&mut a, &[3], 1, 8, 8, 10000.0, RopeStyle::Normal);
        rope(&mut b, &[3], 1, 8, 8, 10000.0, RopeStyle::Neox);
        assert_ne!(a, b);
        // Normal: first pair (0,1) rotated by 3 rad
        let (c, s) = (3f32.cos(), 3f32.sin());
        assert!((a[0] - (1.0 * c - 2.0 * s)).abs() < 1e-6);
        assert!((a[1] - (1.0 * s + 2.0 * c)).abs() < 1e-6);
        // Neox: first pair (0,4) rotated by 3 rad
        assert!((b[0] - (1.0 * c - 5.0 * s)).abs() < 1e-6);
        assert!((b[4] - (1.0 * s + 5.0 * c)).abs() < 1e-6);
        // rotation keeps the norm of every pair
        let n = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>();
        assert!((n(&a) - n(&x0)).abs() < 1e-3 && (n(&b) - n(&x0)).abs() < 1e-3);
    }

    #[test]
    fn softmax_masks_scales_and_survives_large_inputs() {
        let y = softmax_row(&[1000.0, 1000.0, 5.0], 1.0, 2);
        assert_eq!(y, vec![0.5, 0.5, 0.0]);
        let y = softmax_row(&[0.0, 2.0f32.ln() * 2.0], 0.5, 2);
        assert!((y[0] - 1.0 / 3.0).abs() < 1e-6 && (y[1] - 2.0 / 3.0).abs() < 1e-6);
    }

    #[test]
    fn softmax_into_is_the_allocating_softmax_bit_for_bit() {
        // the softmax as first written (a Vec per step), kept here as the reference
        fn reference(x: &[f32], scale: f32, n_valid: usize) -> Vec<f32> {
            let w: Vec<f32> = x.iter().enumerate().map(|(j, &v)| if j < n_valid { v * scale } else { f32::NEG_INFINITY }).collect();
            let max = w.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0.0f64;
            let mut y: Vec<f32> = w
                .iter()
                .map(|&v| {
                    let e = if v == f32::NEG_INFINITY { 0.0 } else { (v - max).exp() };
                    sum += e as f64;
                    e
                })
                .collect();
            let inv = (1.0 / sum) as f32;
            for v in &mut y {
                *v *= inv;
            }
            y
        }
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        let rows: [&[f32]; 5] = [
            &[1.0, -3.5, 80.0, 2.0, 7.0],
            &[f32::NEG_INFINITY; 5],
            &[f32::NAN, 1.0, 2.0, f32::NAN, 0.0],
            &[f32::NAN; 5],
            &[1e30, -1e30, f32::INFINITY, 0.0, 1.0],
        ];
        for x in rows {
            for n_valid in 1..=5 {
                for scale in [1.0f32, 0.125, 1e-3] {
                    let mut y = vec![0.0f32; 5];
                    softmax_row_into(x, scale, n_valid, &mut y);
                    assert_eq!(bits(&y), bits(&reference(x, scale, n_valid)), "{x:?} n_valid {n_valid} scale {scale}");
                }
            }
        }
    }

    #[test]
    fn swiglu_is_silu_gate_times_up() {
        let y = swiglu(&[0.0, 1.0, -1.0], &[5.0, 2.0, 2.0]);
        assert_eq!(y[0], 0.0);
        assert!((y[1] - 2.0 / (1.0 + (-1f32).exp())).abs() < 1e-6);
        assert!((y[2] - -2.0 / (1.0 + 1f32.exp())).abs() < 1e-6);
    }

    #[test]
    fn embedding_reads_rows_and_rejects_out_of_range() {
        let t = Matrix { rows: 3, cols: 2, data: vec![0., 1., 10., 11., 20., 21.] };
        assert_eq!(embedding(&t, &[2, 0]).unwrap(), vec![20., 21., 0., 1.]);
        assert!(embedding(&t, &[3]).is_err());
    }
}
