//! `y = W x` for f32 and block-format weights, every output summed in exactly the order of the
//! ggml kernel llama.cpp's goldens come from ([`super::ops::dot`]: `ggml_vec_dot_f32`, one token;
//! [`super::ops::dot_gemm`]: llamafile's tinyBLAS, two or more tokens), so the results are
//! bit-identical to dequantizing the whole matrix first and taking those dot products one by one.
//!
//! What is faster than that, without changing a single sum:
//! - One token (a decode step): each row is dequantized 32 values at a time, in registers (or a
//!   block into a small stack buffer for the formats without an AVX2 dequantizer), and fed straight
//!   into `ggml_vec_dot_f32`'s 32 accumulators (blocks hold 32 or 256 values, so a block is one or
//!   eight of its 32-value steps): the matrix is read as stored, never as f32.
//! - Several tokens (a prefill): a task's rows are dequantized once into an f32 buffer, then
//!   `MR × NR` outputs are computed together, each in its own 8-lane accumulator fed in k order (as
//!   tinyBLAS's own tiles do). Independent accumulators hide the fused multiply-add latency that a
//!   single chain waits on, and each loaded weight vector serves `NR` tokens.
//!
//! With AVX2 and FMA (detected at run time, as for [`super::ops::dot`]) the kernels are written with
//! `std::arch` intrinsics (module `avx2`; super::blocks_avx2 for the block formats, with F16C), so
//! that the accumulators stay in vector registers whatever the optimizer decides; otherwise
//! portable loops with a separate multiply and add (ggml without FMA) compute the same sums.
//!
//! Hand-written rather than a GEMM crate: those choose their own summation order (blocked k, other
//! reductions), and this engine's outputs must stay the reference's bit for bit.

use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
use super::ops::has_avx2_fma;
use super::ops::{dot_body, Matrix};
use super::weights::{QMatrix, Weight};
use crate::dequant;
use crate::gguf::GgmlType;

/// `y[t] = W x[t]` for each of the `T` rows of `x`. x: `[T][W.cols]`, returns `[T][W.rows]`.
pub fn matmul(w: &Weight, x: &[f32]) -> Vec<f32> {
    match w {
        Weight::F32(m) => matmul_impl(Src::F32(m), m.rows, m.cols, x),
        Weight::Blocks(q) => matmul_impl(Src::Blocks(q), q.rows, q.cols, x),
    }
}

/// [`matmul`] for an f32 matrix.
pub fn matmul_f32(w: &Matrix, x: &[f32]) -> Vec<f32> {
    matmul_impl(Src::F32(w), w.rows, w.cols, x)
}

/// [`matmul_f32`] on the calling thread only (for callers that are parallel themselves).
pub fn matmul_f32_serial(w: &Matrix, x: &[f32]) -> Vec<f32> {
    products(Src::F32(w), w.rows, w.cols, x, false)
}

/// `out[j] = dot(b[j·stride + offset ..][..a.len()], a)` for each j, in [`super::ops::dot`]'s order
/// (the attention scores: a query against each cached key of one head).
pub fn dots(a: &[f32], b: &[f32], stride: usize, offset: usize, out: &mut [f32]) {
    let n = a.len();
    let row = |j: usize| &b[j * stride + offset..j * stride + offset + n];
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx2_fma() && n.is_multiple_of(32) {
            // three dot products at a time: 3 × 32 accumulators, each fed in its own order
            let mut j = 0;
            while j + 3 <= out.len() {
                // SAFETY: AVX2 and FMA are present (checked just above); the rows hold n values, n % 32 == 0.
                out[j..j + 3].copy_from_slice(&unsafe { avx2::vdot::<3>([row(j), row(j + 1), row(j + 2)], a) });
                j += 3;
            }
            for (jj, o) in (j..).zip(&mut out[j..]) {
                // SAFETY: as above
                *o = unsafe { avx2::vdot::<1>([row(jj)], a) }[0];
            }
            return;
        }
    }
    for (j, o) in out.iter_mut().enumerate() {
        *o = super::ops::dot(row(j), a);
    }
}

/// Whether the AVX2 block dequantizers (super::blocks_avx2) can run: AVX2 + FMA (as for every
/// kernel here) and F16C for the f16 scales.
#[cfg(target_arch = "x86_64")]
fn has_fast_blocks() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| has_avx2_fma() && is_x86_feature_detected!("f16c"))
}

/// Calls `$body` with the type `$f` bound to the super::blocks_avx2 format of `$ty`, else `$other`.
#[cfg(target_arch = "x86_64")]
macro_rules! with_fast_format {
    ($ty:expr, |$f:ident| $body:expr, $other:expr) => {{
        use super::blocks_avx2 as b;
        match $ty {
            GgmlType::Q4_0 => {
                type $f = b::Q4_0;
                $body
            }
            GgmlType::Q4_1 => {
                type $f = b::Q4_1;
                $body
            }
            GgmlType::Q5_0 => {
                type $f = b::Q5_0;
                $body
            }
            GgmlType::Q8_0 => {
                type $f = b::Q8_0;
                $body
            }
            GgmlType::Q4_K => {
                type $f = b::Q4_K;
                $body
            }
            GgmlType::Q6_K => {
                type $f = b::Q6_K;
                $body
            }
            _ => $other,
        }
    }};
}

/// `data` (whole blocks of `ty`, exactly `out.len()` values) to f32 as the matmul kernels
/// dequantize it: the AVX2 dequantizers where they run, else crate::dequant's block functions (the
/// same values bit for bit). The CPU backend's `Backend::dequantize_rows` uses it, so that the
/// suites' dequant check holds these kernels to gguf-py's values.
pub fn dequantize_into(ty: GgmlType, data: &[u8], out: &mut [f32]) -> Result<(), dequant::DequantError> {
    #[cfg(target_arch = "x86_64")]
    {
        if has_fast_blocks() && dequant::bytes_needed(ty, out.len()).is_ok_and(|n| n == data.len()) {
            // SAFETY: AVX2, FMA and F16C are present (has_fast_blocks); data holds exactly the blocks of out.
            with_fast_format!(
                ty,
                |F| {
                    unsafe { avx2::dequant_fmt::<F>(data, out) };
                    return Ok(());
                },
                ()
            )
        }
    }
    dequant::dequantize_into(ty, data, out)
}

#[derive(Clone, Copy)]
enum Src<'a> {
    F32(&'a Matrix),
    Blocks(&'a QMatrix),
}

/// Output rows per parallel task: 16 for a few tokens; for many, enough rows that their f32 copy
/// (`rows × cols`) fills about 256 KiB of L2, so that `x` is streamed fewer times, while leaving
/// at least 8 tasks to share out.
fn rows_per_task(rows: usize, cols: usize, t: usize) -> usize {
    if t < 16 {
        return 16;
    }
    let by_cache = ((256 * 1024 / 4) / cols.max(1)).clamp(16, 64);
    (by_cache.min(rows.div_ceil(8).div_ceil(MR) * MR) / MR * MR).max(MR)
}

fn matmul_impl(src: Src<'_>, n_out: usize, n_in: usize, x: &[f32]) -> Vec<f32> {
    products(src, n_out, n_in, x, true)
}

/// Every product `y[t][r]` (`[T][W.rows]`), in parallel tasks of rows or on the calling thread.
fn products(src: Src<'_>, n_out: usize, n_in: usize, x: &[f32], parallel: bool) -> Vec<f32> {
    assert!(n_in > 0 && x.len().is_multiple_of(n_in), "matmul: input length {} is not a multiple of {n_in}", x.len());
    let t = x.len() / n_in;
    // Which order ggml sums in (ops::gemm_order): tinyBLAS for n ≥ 2, k % 8 == 0, m % 4 == 0.
    let gemm = t >= 2 && n_in.is_multiple_of(8) && n_out.is_multiple_of(4);
    let mut y = vec![0.0f32; n_out * t];
    if n_out == 0 || t == 0 {
        return y;
    }
    if !parallel {
        task(src, 0, n_in, x, t, gemm, &mut y);
        return y;
    }
    let rpt = rows_per_task(n_out, n_in, t);
    if t == 1 {
        y.par_chunks_mut(rpt).enumerate().for_each(|(blk, out)| task(src, blk * rpt, n_in, x, t, gemm, out));
        return y;
    }
    // Several tokens: task b owns rows b·rpt .. of every token, i.e. one slice of each row of y;
    // it computes them into a local `[T][rows]` block and copies them out.
    let n_tasks = n_out.div_ceil(rpt);
    let mut stripes: Vec<Vec<&mut [f32]>> = (0..n_tasks).map(|_| Vec::with_capacity(t)).collect();
    for row in y.chunks_mut(n_out) {
        let mut rest = row;
        for s in stripes.iter_mut() {
            let len = rpt.min(rest.len());
            let (a, b) = std::mem::take(&mut rest).split_at_mut(len);
            s.push(a);
            rest = b;
        }
    }
    stripes.into_par_iter().enumerate().for_each(|(blk, cols)| {
        let n = cols[0].len();
        let mut local = vec![0.0f32; t * n];
        task(src, blk * rpt, n_in, x, t, gemm, &mut local);
        for (c, l) in cols.into_iter().zip(local.chunks_exact(n)) {
            c.copy_from_slice(l);
        }
    });
    y
}

/// One task: rows `r0 .. r0 + out.len() / t` of W times every token, into `out` (`[T][rows]`).
fn task(src: Src<'_>, r0: usize, k: usize, x: &[f32], t: usize, gemm: bool, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx2_fma() {
            return task_body::<true>(src, r0, k, x, t, gemm, out);
        }
    }
    task_body::<false>(src, r0, k, x, t, gemm, out)
}

/// `SIMD`: the AVX2 + FMA kernels (only ever true once [`has_avx2_fma`] said so), else the portable ones.
fn task_body<const SIMD: bool>(src: Src<'_>, r0: usize, k: usize, x: &[f32], t: usize, gemm: bool, out: &mut [f32]) {
    let n = out.len() / t;
    if t == 1 {
        match src {
            Src::F32(m) => {
                for (i, o) in out.iter_mut().enumerate() {
                    *o = vec_dot::<SIMD>(m.row(r0 + i), x);
                }
            }
            Src::Blocks(q) => vec_dot_rows::<SIMD>(q, r0, x, out),
        }
        return;
    }
    let mut buf = Vec::new();
    let w: &[f32] = match src {
        Src::F32(m) => &m.data[r0 * k..(r0 + n) * k],
        Src::Blocks(q) => {
            buf.resize(n * k, 0.0);
            dequant_rows::<SIMD>(q, r0, &mut buf);
            &buf
        }
    };
    if gemm {
        gemm_tiles::<SIMD>(w, k, x, t, out);
    } else {
        for (ti, orow) in out.chunks_exact_mut(n).enumerate() {
            for (i, o) in orow.iter_mut().enumerate() {
                *o = vec_dot::<SIMD>(&w[i * k..(i + 1) * k], &x[ti * k..(ti + 1) * k]);
            }
        }
    }
}

/// [`super::ops::dot`] (which picks FMA itself, as [`task`] does), or its portable body.
#[inline(always)]
fn vec_dot<const SIMD: bool>(a: &[f32], b: &[f32]) -> f32 {
    if SIMD {
        super::ops::dot(a, b)
    } else {
        dot_body::<false>(a, b)
    }
}

/// A block format's dequantization as a type: the kernels are generic over it, so that the block
/// function is inlined into each (a function pointer or closure parameter was not).
trait BlockFormat {
    fn dequant(b: &[u8], y: &mut [f32]);
}

macro_rules! block_formats {
    ($($name:ident => $f:path),* $(,)?) => {
        $(
            #[allow(non_camel_case_types)]
            struct $name;
            impl BlockFormat for $name {
                #[inline(always)]
                fn dequant(b: &[u8], y: &mut [f32]) {
                    $f(b, y)
                }
            }
        )*
    };
}

block_formats!(
    Fmt_Q4_0 => dequant::block_q4_0,
    Fmt_Q4_1 => dequant::block_q4_1,
    Fmt_Q5_0 => dequant::block_q5_0,
    Fmt_Q5_1 => dequant::block_q5_1,
    Fmt_Q8_0 => dequant::block_q8_0,
    Fmt_Q2_K => dequant::block_q2_k,
    Fmt_Q3_K => dequant::block_q3_k,
    Fmt_Q4_K => dequant::block_q4_k,
    Fmt_Q5_K => dequant::block_q5_k,
    Fmt_Q6_K => dequant::block_q6_k,
);

/// Calls `$body` with the type `$f` bound to the [`BlockFormat`] of `$ty` and `$bs` to its block
/// size; `$other` for the types that are not kept as blocks.
macro_rules! with_block_fn {
    ($ty:expr, |$f:ident, $bs:ident| $body:expr, $other:expr) => {{
        use GgmlType::*;
        match $ty {
            Q4_0 => {
                const $bs: usize = 32;
                type $f = Fmt_Q4_0;
                $body
            }
            Q4_1 => {
                const $bs: usize = 32;
                type $f = Fmt_Q4_1;
                $body
            }
            Q5_0 => {
                const $bs: usize = 32;
                type $f = Fmt_Q5_0;
                $body
            }
            Q5_1 => {
                const $bs: usize = 32;
                type $f = Fmt_Q5_1;
                $body
            }
            Q8_0 => {
                const $bs: usize = 32;
                type $f = Fmt_Q8_0;
                $body
            }
            Q2_K => {
                const $bs: usize = 256;
                type $f = Fmt_Q2_K;
                $body
            }
            Q3_K => {
                const $bs: usize = 256;
                type $f = Fmt_Q3_K;
                $body
            }
            Q4_K => {
                const $bs: usize = 256;
                type $f = Fmt_Q4_K;
                $body
            }
            Q5_K => {
                const $bs: usize = 256;
                type $f = Fmt_Q5_K;
                $body
            }
            Q6_K => {
                const $bs: usize = 256;
                type $f = Fmt_Q6_K;
                $body
            }
            _ => $other,
        }
    }};
}

/// Rows `r0 ..` of `q` (as many as `w` holds) dequantized into `w`, one block at a time.
fn dequant_rows<const SIMD: bool>(q: &QMatrix, r0: usize, w: &mut [f32]) {
    let n = w.len() / q.cols;
    let bytes = q.rows_bytes(r0, r0 + n);
    let ts = q.ty.type_size();
    #[cfg(target_arch = "x86_64")]
    {
        if SIMD && has_fast_blocks() {
            // SAFETY: AVX2, FMA and F16C are present (has_fast_blocks); whole blocks (QMatrix rows).
            with_fast_format!(q.ty, |F| return unsafe { avx2::dequant_fmt::<F>(bytes, w) }, ())
        }
    }
    with_block_fn!(
        q.ty,
        |F, BS| {
            #[cfg(target_arch = "x86_64")]
            {
                if SIMD {
                    // SAFETY: SIMD is true only after has_avx2_fma() (task); whole blocks, as below.
                    return unsafe { avx2::dequant_blocks::<BS, F>(bytes, ts, w) };
                }
            }
            for (b, y) in bytes.chunks_exact(ts).zip(w.chunks_exact_mut(BS)) {
                F::dequant(b, y);
            }
        },
        q.dequantize_rows_into(r0, r0 + n, w)
    )
}

/// One token: `out[i] = dot(row r0 + i, x)` in `ggml_vec_dot_f32`'s order, each block dequantized
/// into a stack buffer and fed to the 32 accumulators as it comes.
fn vec_dot_rows<const SIMD: bool>(q: &QMatrix, r0: usize, x: &[f32], out: &mut [f32]) {
    let bytes = q.rows_bytes(r0, r0 + out.len());
    let ts = q.ty.type_size();
    let row_bytes = bytes.len() / out.len();
    #[cfg(target_arch = "x86_64")]
    {
        if SIMD && has_fast_blocks() {
            // SAFETY: AVX2, FMA and F16C are present (has_fast_blocks); whole blocks (QMatrix rows),
            // x holds a row's values.
            with_fast_format!(q.ty, |F| return unsafe { avx2::vec_dot_fmt::<F>(bytes, row_bytes, x, out) }, ())
        }
    }
    with_block_fn!(
        q.ty,
        |F, BS| {
            // Blocks of 32 or 256 values: a row is a whole number of 32-value steps, so
            // ggml_vec_dot_f32 has no leftover products to add one by one.
            #[cfg(target_arch = "x86_64")]
            {
                if SIMD {
                    // SAFETY: SIMD is true only after has_avx2_fma() (task); x holds the row's `cols`
                    // values, a whole number of blocks.
                    return unsafe { avx2::vec_dot_blocks::<BS, F>(bytes, row_bytes, ts, x, out) };
                }
            }
            let mut wb = [0.0f32; BS];
            for (o, rb) in out.iter_mut().zip(bytes.chunks_exact(row_bytes)) {
                let mut acc = [0.0f32; 32];
                for (b, xb) in rb.chunks_exact(ts).zip(x.chunks_exact(BS)) {
                    F::dequant(b, &mut wb);
                    for (w32, x32) in wb.chunks_exact(32).zip(xb.chunks_exact(32)) {
                        for l in 0..32 {
                            acc[l] += w32[l] * x32[l];
                        }
                    }
                }
                *o = reduce32(&acc);
            }
        },
        {
            let mut w = vec![0.0f32; q.cols];
            for (i, o) in out.iter_mut().enumerate() {
                q.dequantize_rows_into(r0 + i, r0 + i + 1, &mut w);
                *o = vec_dot::<SIMD>(&w, x);
            }
        }
    )
}

/// `ggml_vec_dot_f32`'s reduction of its 32 accumulators (as [`super::ops::dot`]):
/// `acc[8j + l]` is lane l of its vector j; (v0 + v2) + (v1 + v3), then high + low half, then pairs.
#[inline(always)]
fn reduce32(acc: &[f32; 32]) -> f32 {
    let mut v = [0.0f32; 8];
    for l in 0..8 {
        v[l] = (acc[l] + acc[16 + l]) + (acc[8 + l] + acc[24 + l]);
    }
    let t0 = [v[0] + v[4], v[1] + v[5], v[2] + v[6], v[3] + v[7]];
    (t0[0] + t0[1]) + (t0[2] + t0[3])
}

/// tinyBLAS's horizontal sum of one 8-lane accumulator: high + low half, then movehl, movehdup.
#[inline(always)]
fn hsum8(c: &[f32; 8]) -> f32 {
    let h = [c[4] + c[0], c[5] + c[1], c[6] + c[2], c[7] + c[3]];
    (h[0] + h[2]) + (h[1] + h[3])
}

/// Rows of a tile.
const MR: usize = 4;
/// Tokens of a tile.
const NR: usize = 3;

/// `out[j][i] = dot_gemm(w row i, x row j)` for every row of `w` (`[n][k]`) and token of `x`
/// (`[T][k]`), `k % 8 == 0`, `out` `[T][n]`: tiles of `MR × NR` outputs over token blocks that stay
/// in cache.
fn gemm_tiles<const SIMD: bool>(w: &[f32], k: usize, x: &[f32], t: usize, out: &mut [f32]) {
    let n = w.len() / k;
    // tokens per block: about 128 KiB of x
    let tb = ((32 * 1024) / k).clamp(1, 96).div_ceil(NR) * NR;
    let wr = |i: usize| &w[i * k..(i + 1) * k];
    let xr = |j: usize| &x[j * k..(j + 1) * k];
    let mut t0 = 0;
    while t0 < t {
        let t1 = (t0 + tb).min(t);
        let mut i = 0;
        while i < n {
            if i + MR <= n {
                let a = [wr(i), wr(i + 1), wr(i + 2), wr(i + 3)];
                let mut j = t0;
                while j + NR <= t1 {
                    let c = tile::<SIMD, MR, NR>(a, [xr(j), xr(j + 1), xr(j + 2)]);
                    for (ii, row) in c.iter().enumerate() {
                        for (jj, v) in row.iter().enumerate() {
                            out[(j + jj) * n + i + ii] = *v;
                        }
                    }
                    j += NR;
                }
                for j in j..t1 {
                    let c = tile::<SIMD, MR, 1>(a, [xr(j)]);
                    for (ii, row) in c.iter().enumerate() {
                        out[j * n + i + ii] = row[0];
                    }
                }
                i += MR;
            } else {
                for j in t0..t1 {
                    out[j * n + i] = tile::<SIMD, 1, 1>([wr(i)], [xr(j)])[0][0];
                }
                i += 1;
            }
        }
        t0 = t1;
    }
}

/// `M × N` dot products in tinyBLAS's order ([`super::ops::dot_gemm`]): per output one 8-lane
/// accumulator fed by (fused) multiply-add over k in steps of 8, then its horizontal sum.
/// Every slice holds the same number of values, a multiple of 8.
#[inline(always)]
fn tile<const SIMD: bool, const M: usize, const N: usize>(a: [&[f32]; M], b: [&[f32]; N]) -> [[f32; N]; M] {
    #[cfg(target_arch = "x86_64")]
    {
        if SIMD {
            // SAFETY: SIMD is true only after has_avx2_fma() (task); tile's contract on the lengths.
            return unsafe { avx2::tile::<M, N>(a, b) };
        }
    }
    let k = a[0].len();
    let mut acc = [[[0.0f32; 8]; N]; M];
    for kk in (0..k).step_by(8) {
        for i in 0..M {
            for j in 0..N {
                for l in 0..8 {
                    acc[i][j][l] += a[i][kk + l] * b[j][kk + l];
                }
            }
        }
    }
    let mut out = [[0.0f32; N]; M];
    for i in 0..M {
        for j in 0..N {
            out[i][j] = hsum8(&acc[i][j]);
        }
    }
    out
}

/// The kernels with AVX2 and FMA: `_mm256_fmadd_ps` is ggml's `GGML_F32_VEC_FMA` / tinyBLAS's
/// `madd` lane for lane, and the reductions are done in the same order as [`reduce32`] / [`hsum8`].
#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)] // lanes and accumulators indexed alike read best as indices
mod avx2 {
    use super::super::blocks_avx2::Format;
    use std::arch::x86_64::*;

    /// `M × N` products as [`super::tile`]. Caller: AVX2 + FMA present.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn tile<const M: usize, const N: usize>(a: [&[f32]; M], b: [&[f32]; N]) -> [[f32; N]; M] {
        let k = a[0].len();
        assert!(k.is_multiple_of(8) && a.iter().all(|s| s.len() == k) && b.iter().all(|s| s.len() == k), "tile: operand lengths");
        let mut acc = [[_mm256_setzero_ps(); N]; M];
        let mut kk = 0;
        while kk < k {
            let mut bv = [_mm256_setzero_ps(); N];
            for j in 0..N {
                // SAFETY: kk + 8 ≤ k = b[j].len() (asserted above)
                bv[j] = unsafe { _mm256_loadu_ps(b[j].as_ptr().add(kk)) };
            }
            for i in 0..M {
                // SAFETY: kk + 8 ≤ k = a[i].len()
                let av = unsafe { _mm256_loadu_ps(a[i].as_ptr().add(kk)) };
                for j in 0..N {
                    acc[i][j] = _mm256_fmadd_ps(av, bv[j], acc[i][j]);
                }
            }
            kk += 8;
        }
        let mut out = [[0.0f32; N]; M];
        for i in 0..M {
            for j in 0..N {
                out[i][j] = super::hsum8(&lanes(acc[i][j]));
            }
        }
        out
    }

    #[inline(always)]
    fn lanes(v: __m256) -> [f32; 8] {
        // SAFETY: __m256 and [f32; 8] have the same size, and every bit pattern is a valid f32.
        unsafe { std::mem::transmute::<__m256, [f32; 8]>(v) }
    }

    /// `N` dot products of `rows[i]` with `x` in ggml_vec_dot_f32's order; every slice holds the same
    /// number of values, a multiple of 32. Caller: AVX2 + FMA present.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn vdot<const N: usize>(rows: [&[f32]; N], x: &[f32]) -> [f32; N] {
        let n = x.len();
        assert!(n.is_multiple_of(32) && rows.iter().all(|r| r.len() == n), "vdot: operand lengths");
        let mut acc = [[_mm256_setzero_ps(); 4]; N];
        let mut kk = 0;
        while kk < n {
            let mut xv = [_mm256_setzero_ps(); 4];
            for (q, v) in xv.iter_mut().enumerate() {
                // SAFETY: kk + 32 ≤ n = x.len()
                *v = unsafe { _mm256_loadu_ps(x.as_ptr().add(kk + 8 * q)) };
            }
            for i in 0..N {
                for q in 0..4 {
                    // SAFETY: kk + 32 ≤ n = rows[i].len()
                    let w = unsafe { _mm256_loadu_ps(rows[i].as_ptr().add(kk + 8 * q)) };
                    acc[i][q] = _mm256_fmadd_ps(w, xv[q], acc[i][q]);
                }
            }
            kk += 32;
        }
        let mut out = [0.0f32; N];
        for i in 0..N {
            out[i] = reduce(&acc[i]);
        }
        out
    }

    /// [`super::reduce32`] of four vectors.
    #[inline(always)]
    fn reduce(acc: &[__m256; 4]) -> f32 {
        let mut all = [0.0f32; 32];
        for q in 0..4 {
            all[8 * q..8 * q + 8].copy_from_slice(&lanes(acc[q]));
        }
        super::reduce32(&all)
    }

    /// One token against rows of blocks (`bytes`: `out.len()` rows of `row_bytes`; blocks of `ts`
    /// bytes and `BS` values, `BS % 32 == 0`): each block dequantized by `F` into a stack buffer, then
    /// fed to the 32 accumulators. Caller: AVX2 + FMA present, `x` holds a row's values.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn vec_dot_blocks<const BS: usize, F: super::BlockFormat>(bytes: &[u8], row_bytes: usize, ts: usize, x: &[f32], out: &mut [f32]) {
        assert!(BS.is_multiple_of(32) && x.len() / BS * ts == row_bytes && x.len().is_multiple_of(BS), "vec_dot_blocks: shapes");
        let mut wb = [0.0f32; BS];
        for (o, rb) in out.iter_mut().zip(bytes.chunks_exact(row_bytes)) {
            let mut acc = [_mm256_setzero_ps(); 4];
            for (b, xb) in rb.chunks_exact(ts).zip(x.chunks_exact(BS)) {
                F::dequant(b, &mut wb);
                for c in 0..BS / 32 {
                    for q in 0..4 {
                        let at = 32 * c + 8 * q;
                        // SAFETY: at + 8 ≤ BS = wb.len() = xb.len()
                        let (w, xv) = unsafe { (_mm256_loadu_ps(wb.as_ptr().add(at)), _mm256_loadu_ps(xb.as_ptr().add(at))) };
                        acc[q] = _mm256_fmadd_ps(w, xv, acc[q]);
                    }
                }
            }
            *o = reduce(&acc);
        }
    }

    /// One token against rows of blocks as [`vec_dot_blocks`], with the format's AVX2 dequantizer:
    /// no stack buffer, the four vectors of each 32 values go straight into the accumulators.
    /// Caller: AVX2, FMA and F16C present.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn vec_dot_fmt<F: Format>(bytes: &[u8], row_bytes: usize, x: &[f32], out: &mut [f32]) {
        assert!(row_bytes.is_multiple_of(F::TS) && x.len() == row_bytes / F::TS * F::BS, "vec_dot_fmt: shapes");
        for (o, rb) in out.iter_mut().zip(bytes.chunks_exact(row_bytes)) {
            let mut acc = [_mm256_setzero_ps(); 4];
            for (b, xb) in rb.chunks_exact(F::TS).zip(x.chunks_exact(F::BS)) {
                // SAFETY (F's calls): the features are enabled here; b holds TS bytes, c < BS / 32.
                let p = unsafe { F::pre(b) };
                for c in 0..F::BS / 32 {
                    let w = unsafe { F::chunk(b, &p, c) };
                    for q in 0..4 {
                        // SAFETY: 32c + 8q + 8 ≤ BS = xb.len()
                        let xv = unsafe { _mm256_loadu_ps(xb.as_ptr().add(32 * c + 8 * q)) };
                        acc[q] = _mm256_fmadd_ps(w[q], xv, acc[q]);
                    }
                }
            }
            *o = reduce(&acc);
        }
    }

    /// `bytes` (whole blocks) dequantized into `w` with the format's AVX2 dequantizer.
    /// Caller: AVX2, FMA and F16C present.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dequant_fmt<F: Format>(bytes: &[u8], w: &mut [f32]) {
        assert_eq!(bytes.len() / F::TS * F::BS, w.len(), "dequant_fmt: shapes");
        for (b, y) in bytes.chunks_exact(F::TS).zip(w.chunks_exact_mut(F::BS)) {
            // SAFETY (F's calls): the features are enabled here; b holds TS bytes, c < BS / 32.
            let p = unsafe { F::pre(b) };
            for c in 0..F::BS / 32 {
                let v = unsafe { F::chunk(b, &p, c) };
                for q in 0..4 {
                    // SAFETY: 32c + 8q + 8 ≤ BS = y.len()
                    unsafe { _mm256_storeu_ps(y.as_mut_ptr().add(32 * c + 8 * q), v[q]) };
                }
            }
        }
    }

    /// `bytes` (whole blocks of `ts` bytes) dequantized by `F` into `w`, `BS` values a block, with
    /// AVX2 code generation for the block function. Caller: AVX2 + FMA present.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dequant_blocks<const BS: usize, F: super::BlockFormat>(bytes: &[u8], ts: usize, w: &mut [f32]) {
        for (b, y) in bytes.chunks_exact(ts).zip(w.chunks_exact_mut(BS)) {
            F::dequant(b, y);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::ops::dot;
    use super::*;

    /// Deterministic pseudo-random values in [-1, 1).
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// The reference: one dot product per output, in the order ops::gemm_order picks.
    fn reference(w: &Matrix, x: &[f32]) -> Vec<f32> {
        let t = x.len() / w.cols;
        let dotf = super::super::ops::gemm_order(w.rows, w.cols, t);
        let mut y = vec![0.0f32; t * w.rows];
        for ti in 0..t {
            for r in 0..w.rows {
                y[ti * w.rows + r] = dotf(w.row(r), &x[ti * w.cols..(ti + 1) * w.cols]);
            }
        }
        y
    }

    #[test]
    fn f32_tiles_equal_one_dot_per_output_bit_for_bit() {
        // tile edges in rows and tokens, several token blocks, the vec-dot order (t = 1, m % 4 ≠ 0)
        for (rows, cols, t) in [(37, 64, 1), (40, 64, 7), (36, 1024, 50), (12, 5000 - 8, 3), (6, 16, 5), (3, 13, 4), (8, 8, 200)] {
            let w = Matrix { rows, cols, data: values(rows * cols, 1) };
            let x = values(cols * t, 2);
            assert_eq!(matmul_f32(&w, &x), reference(&w, &x), "{rows}x{cols}, T={t}");
            assert_eq!(matmul_impl_portable(&w, &x), reference_portable(&w, &x), "portable {rows}x{cols}, T={t}");
        }
    }

    /// Random blocks of `ty` whose f16 scales are finite (small powers of two times 1.x).
    fn blocks(ty: GgmlType, n_blocks: usize, seed: u64) -> Vec<u8> {
        let mut bytes: Vec<u8> = values(n_blocks * ty.type_size(), seed).iter().map(|v| ((v + 1.0) * 127.9) as u8).collect();
        // offsets of the f16 fields (d, and m / dmin) in each block
        let f16s: &[usize] = match ty {
            GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => &[0],
            GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q4_K | GgmlType::Q5_K => &[0, 2],
            GgmlType::Q2_K => &[80, 82],
            GgmlType::Q3_K => &[108],
            GgmlType::Q6_K => &[208],
            _ => unreachable!(),
        };
        for (i, b) in bytes.chunks_exact_mut(ty.type_size()).enumerate() {
            for (j, &o) in f16s.iter().enumerate() {
                let v = half::f16::from_f32((1.0 + (i * 7 + j * 3) as f32 % 11.0 / 16.0) / (1 << (3 + (i + j) % 6)) as f32);
                b[o..o + 2].copy_from_slice(&v.to_bits().to_le_bytes());
            }
        }
        bytes
    }

    #[test]
    fn block_formats_equal_dequantize_then_dot_bit_for_bit() {
        use GgmlType::*;
        for ty in [Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K] {
            let cols = 2 * ty.block_size().max(256) + if ty.block_size() == 32 { 32 } else { 0 };
            for (rows, t) in [(20, 1), (36, 2), (40, 7), (21, 5)] {
                let bytes = blocks(ty, rows * cols / ty.block_size(), rows as u64);
                let f = Matrix { rows, cols, data: dequant::dequantize(ty, &bytes, rows * cols).unwrap() };
                assert!(f.data.iter().all(|v| v.is_finite()));
                let q = Weight::Blocks(QMatrix::from_bytes(ty, rows, cols, bytes).unwrap());
                let x = values(cols * t, 3);
                assert_eq!(matmul(&q, &x), reference(&f, &x), "{ty} {rows}x{cols}, T={t}");
                let mut y = vec![0.0f32; rows * t]; // [T][rows]
                let Weight::Blocks(qm) = &q else { unreachable!() };
                let gemm = t >= 2 && rows.is_multiple_of(4);
                task_body::<false>(Src::Blocks(qm), 0, cols, &x, t, gemm, &mut y);
                assert_eq!(y, reference_portable(&f, &x), "portable {ty} {rows}x{cols}, T={t}");
            }
        }
    }

    #[test]
    fn dequantize_into_equals_crate_dequant_bit_for_bit() {
        use GgmlType::*;
        for ty in [Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K] {
            let n = 8 * ty.block_size();
            let bytes = blocks(ty, 8, 7);
            let mut got = vec![0.0f32; n];
            dequantize_into(ty, &bytes, &mut got).unwrap();
            let want = dequant::dequantize(ty, &bytes, n).unwrap();
            assert_eq!(got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), "{ty}");
        }
        // a wrong byte count is an error, not a panic
        assert!(dequantize_into(Q8_0, &[0; 33], &mut [0.0; 32]).is_err());
    }

    #[test]
    fn dots_equal_ops_dot_bit_for_bit() {
        // a query against 7 keys of one head (stride 3 heads of 64, head 1), and an odd length
        for hd in [64usize, 40] {
            let (stride, n) = (3 * hd, 7);
            let k = values(n * stride, 5);
            let q = values(hd, 6);
            let mut out = vec![0.0f32; n];
            dots(&q, &k, stride, hd, &mut out);
            for (j, o) in out.iter().enumerate() {
                assert_eq!(o.to_bits(), dot(&k[j * stride + hd..j * stride + 2 * hd], &q).to_bits(), "hd {hd}, key {j}");
            }
        }
    }

    /// The non-FMA bodies, whatever the CPU.
    fn matmul_impl_portable(w: &Matrix, x: &[f32]) -> Vec<f32> {
        let t = x.len() / w.cols;
        let gemm = t >= 2 && w.cols.is_multiple_of(8) && w.rows.is_multiple_of(4);
        let mut y = vec![0.0f32; w.rows * t]; // [T][rows]
        task_body::<false>(Src::F32(w), 0, w.cols, x, t, gemm, &mut y);
        y
    }

    fn reference_portable(w: &Matrix, x: &[f32]) -> Vec<f32> {
        let t = x.len() / w.cols;
        let gemm = t >= 2 && w.cols.is_multiple_of(8) && w.rows.is_multiple_of(4);
        let mut y = vec![0.0f32; t * w.rows];
        for ti in 0..t {
            for r in 0..w.rows {
                let (a, b) = (w.row(r), &x[ti * w.cols..(ti + 1) * w.cols]);
                y[ti * w.rows + r] = if gemm { super::super::ops::dot_gemm_body::<false>(a, b) } else { dot_body::<false>(a, b) };
            }
        }
        y
    }
}
