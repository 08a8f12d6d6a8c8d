//! Launch wrappers, one per kernel of kernels/*.cu, over raw device pointers (see [`super::device`]).
//! Each checks what it can about its arguments and computes the launch shape.
//!
//! Dimension letters as in the CPU backend: `T` tokens, `D` width, `F` FFN width, `H`/`Hkv` heads,
//! `Dh` head dimension, `V` vocabulary.

use anyhow::{bail, ensure, Context, Result};
use cudarc::driver::CudaSlice;

use super::device::{ptr, Arg, Gpu};
use crate::gguf::GgmlType;

/// Most token rows the matrix-vector kernels take (quant.cu's MV_MAX_T); above it, prefill GEMMs go
/// through an f32 scratch copy of the weight and cuBLAS SGEMM.
pub const MV_MAX_T: usize = 8;
/// Threads per block of the row-parallel kernels (8 warps: 8 output rows per block).
const BLOCK: u32 = 256;
/// Most rows one warp of the staged decode matvec takes (quant.cu's MV_RPW).
pub(super) const MV_RPW: usize = 4;
/// Query rows one block of the prefill attention takes (attention.cu's ATT_ROWS).
pub(super) const ATTN_ROWS: usize = 8;

/// The formats the kernels dequantize.
pub const SUPPORTED: [GgmlType; 8] =
    [GgmlType::F32, GgmlType::F16, GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q5_0, GgmlType::Q8_0, GgmlType::Q4_K, GgmlType::Q6_K];

/// The kernel-name suffix of a weight format.
pub fn type_suffix(ty: GgmlType) -> Result<&'static str> {
    Ok(match ty {
        GgmlType::F32 => "f32",
        GgmlType::F16 => "f16",
        GgmlType::Q4_0 => "q4_0",
        GgmlType::Q4_1 => "q4_1",
        GgmlType::Q5_0 => "q5_0",
        GgmlType::Q8_0 => "q8_0",
        GgmlType::Q4_K => "q4_k",
        GgmlType::Q6_K => "q6_k",
        other => bail!("the CUDA backend has no kernel for {other} weights (supported: F32, F16, Q4_0, Q4_1, Q5_0, Q8_0, Q4_K, Q6_K)"),
    })
}

/// ggml's type id of a format (the kernels' GT_* constants, kernels/common.cuh).
fn type_id(ty: GgmlType) -> usize {
    ty.to_u32() as usize
}

/// A weight matrix on the GPU in its GGUF format: `[rows][cols]`, each row `row_bytes` of blocks.
pub struct QMat {
    pub buf: CudaSlice<u8>,
    pub ptr: u64,
    pub ty: GgmlType,
    pub rows: usize,
    pub cols: usize,
    pub row_bytes: usize,
}

impl QMat {
    /// Uploads `bytes` (the tensor's data as stored in the GGUF file) as a `[rows][cols]` matrix.
    pub fn upload(gpu: &Gpu, ty: GgmlType, rows: usize, cols: usize, bytes: &[u8], what: &str) -> Result<QMat> {
        type_suffix(ty)?;
        let bs = ty.block_size();
        ensure!(cols.is_multiple_of(bs), "{what}: {cols} columns is not a multiple of the {ty} block of {bs}");
        let row_bytes = cols / bs * ty.type_size();
        ensure!(bytes.len() == rows * row_bytes, "{what}: {} bytes of {ty} data for [{rows}][{cols}] (expected {})", bytes.len(), rows * row_bytes);
        // 16 bytes of padding: the kernels' 16-byte loads (ld16) may touch up to 3 bytes past the
        // last block.
        let mut buf = gpu.alloc::<u8>(bytes.len() + 16, what)?;
        if !bytes.is_empty() {
            gpu.stream.memcpy_htod(bytes, &mut buf.slice_mut(0..bytes.len())).with_context(|| format!("copying {what} to the GPU"))?;
        }
        let ptr = ptr(&buf, &gpu.stream);
        Ok(QMat { buf, ptr, ty, rows, cols, row_bytes })
    }
}

fn p(x: Option<u64>) -> Arg {
    Arg::P(x.unwrap_or(0))
}

/// A dimension as the kernels' `int` argument.
pub(super) fn i(v: usize) -> Result<Arg> {
    Ok(Arg::I(i32::try_from(v).map_err(|_| anyhow::anyhow!("dimension {v} does not fit the kernels' int"))?))
}

fn grid_1d(n: usize) -> u32 {
    n.div_ceil(BLOCK as usize).clamp(1, 65535 * 8) as u32
}

impl Gpu {
    /// `y[t] = W x[t] (+ bias) (+ res[t])` for t < T ≤ [`MV_MAX_T`]; `raw[t] = W x[t]` when given.
    /// x: `[T][cols]`, y/res/raw: `[T][rows]`, bias: `[rows]`. With `norm = (w, eps)`, x is first
    /// RMS-normalised and multiplied by the norm weight `w` `[cols]` (the rmsnorm kernel fused in).
    #[allow(clippy::too_many_arguments)]
    pub fn matvec(&self, w: &QMat, x: u64, t: usize, y: u64, bias: Option<u64>, res: Option<u64>, raw: Option<u64>, norm: Option<(u64, f32)>) -> Result<()> {
        ensure!((1..=MV_MAX_T).contains(&t), "matvec: {t} rows (1..={MV_MAX_T})");
        let vec_x = !matches!(w.ty, GgmlType::F32 | GgmlType::F16);
        ensure!(!vec_x || x.is_multiple_of(16), "matvec: x at {x:#x} is not 16-byte aligned (float4 loads)");
        let nchunks = w.cols.div_ceil(16);
        if t == 1 {
            if let Some(plan) = self.staged_plan(w, 1) {
                let args = [
                    Arg::P(w.ptr),
                    Arg::L(w.row_bytes as i64),
                    i(w.rows)?,
                    i(w.cols)?,
                    Arg::P(x),
                    Arg::P(y),
                    p(bias),
                    p(res),
                    p(raw),
                    i(plan.wpr)?,
                    i(plan.rpw)?,
                    i(plan.span_cap)?,
                    p(norm.map(|n| n.0)),
                    Arg::F(norm.map_or(0.0, |n| n.1)),
                ];
                let name = format!("matvec1{}_{}", self.staged_kind(), type_suffix(w.ty)?);
                let rows_per_block = 8 / plan.wpr * plan.rpw;
                return self.launch_pdl(&name, (w.rows.div_ceil(rows_per_block) as u32, 1, 1), BLOCK, plan.smem, &args);
            }
        }
        // T = 1 (decode) has its own instantiation: one accumulator, fewer registers, more warps.
        let name = format!("matvec{}_{}", if t == 1 { "1" } else { "" }, type_suffix(w.ty)?);
        // warps per output row: split rows until the grid fills the GPU (2 blocks per SM)
        // while the row still has more chunks than the lanes of the warps sharing it
        let mut wpr = 1usize;
        while wpr < 8 && w.rows * wpr / 8 < 2 * self.info.multiprocessors && 32 * wpr < nchunks {
            wpr *= 2;
        }
        let rows_per_block = (BLOCK / 32) as usize / wpr;
        let args = [
            Arg::P(w.ptr),
            Arg::L(w.row_bytes as i64),
            i(w.rows)?,
            i(w.cols)?,
            Arg::P(x),
            i(t)?,
            Arg::P(y),
            p(bias),
            p(res),
            p(raw),
            i(wpr)?,
            p(norm.map(|n| n.0)),
            Arg::F(norm.map_or(0.0, |n| n.1)),
        ];
        self.launch(&name, (w.rows.div_ceil(rows_per_block) as u32, 1, 1), BLOCK, 0, &args)
    }

    /// Up to three decode (T = 1) matvecs of one x in one launch (quant.cu `matvec1s_multi`: a
    /// decode step's Q, K and V projections), x RMS-normalised first with `norm`. `Ok(false)`, with
    /// nothing launched, when one of them is not a block format or the staging would pass 48 KiB of
    /// shared memory: the caller then launches them one by one.
    pub fn matvec_multi(&self, projs: &[Proj<'_>], x: u64, norm: Option<(u64, f32)>) -> Result<bool> {
        ensure!((1..=3).contains(&projs.len()), "matvec_multi: {} matrices (1 to 3)", projs.len());
        let cols = projs[0].w.cols;
        ensure!(projs.iter().all(|p| p.w.cols == cols), "matvec_multi: matrices of different widths");
        if projs.iter().any(|p| matches!(p.w.ty, GgmlType::F32 | GgmlType::F16)) {
            return Ok(false);
        }
        ensure!(x.is_multiple_of(16), "matvec_multi: x at {x:#x} is not 16-byte aligned (float4 loads)");
        // one warp per row: its staging area holds a whole row
        let span_cap = projs.iter().map(|p| staging_area(p.w.row_bytes)).max().unwrap_or(0);
        let smem = staged_smem(x_area_bytes(cols, self.int8_decode), 8, span_cap);
        if smem > SMEM_NO_OPT_IN {
            return Ok(false);
        }
        let mut args = Vec::with_capacity(26);
        let mut blocks = 0;
        for k in 0..3 {
            match projs.get(k) {
                Some(pr) => {
                    let ty = i(type_id(pr.w.ty))?;
                    args.extend([Arg::P(pr.w.ptr), Arg::L(pr.w.row_bytes as i64), i(pr.w.rows)?, ty, Arg::P(pr.y), p(pr.bias), p(pr.raw)]);
                    blocks += pr.w.rows.div_ceil(8);
                }
                None => args.extend([Arg::P(0), Arg::L(0), Arg::I(0), Arg::I(0), Arg::P(0), Arg::P(0), Arg::P(0)]),
            }
        }
        args.extend([i(cols)?, Arg::P(x), i(span_cap)?, p(norm.map(|n| n.0)), Arg::F(norm.map_or(0.0, |n| n.1))]);
        self.launch_pdl(&format!("matvec1{}_multi", self.staged_kind()), (blocks as u32, 1, 1), BLOCK, smem as u32, &args)?;
        Ok(true)
    }

    /// The letter of the staged decode kernels in use: `s` (f32 x, the exact arithmetic) or `q` (int8
    /// x, [`Gpu::int8_decode`]).
    fn staged_kind(&self) -> &'static str {
        if self.int8_decode {
            "q"
        } else {
            "s"
        }
    }

    /// The launch plan of a staged decode kernel (quant.cu `matvec1s_*`, `matvec_swiglu1s_*`) for
    /// `w`, with `areas` staging areas per row (1 for a matvec, 2 for gate and up); `None` for
    /// F32/F16 or when the shared memory would pass the 48 KiB every device grants without opt-in
    /// (then the unstaged kernel serves). The grid should keep at least 2 blocks per SM: warps
    /// per row (`wpr`; swiglu: 1) grow while it has fewer and each warp keeps at least 32 chunks of
    /// 16 values; rows per warp (`rpw`; a matvec with wpr = 1) grow while it keeps as many.
    fn staged_plan(&self, w: &QMat, areas: usize) -> Option<StagedPlan> {
        if matches!(w.ty, GgmlType::F32 | GgmlType::F16) {
            return None;
        }
        let (blocks, block_bytes) = (w.cols / w.ty.block_size(), w.ty.type_size());
        let nchunks = w.cols / 16;
        let min_grid = 2 * self.info.multiprocessors;
        let (mut wpr, mut rpw) = (1usize, 1usize);
        while areas == 1 && wpr < 8 && w.rows * wpr / 8 < min_grid && nchunks / (2 * wpr) >= 32 && blocks >= 2 * wpr {
            wpr *= 2;
        }
        // each area holds a run of ⌈blocks / wpr⌉ blocks
        let span_cap = staging_area(blocks.div_ceil(wpr) * block_bytes);
        let smem = |rpw: usize| staged_smem(x_area_bytes(w.cols, self.int8_decode), 8 * areas * rpw, span_cap);
        while areas == 1 && wpr == 1 && rpw < MV_RPW && w.rows.div_ceil(16 * rpw) >= min_grid && smem(2 * rpw) <= SMEM_NO_OPT_IN {
            rpw *= 2;
        }
        (smem(rpw) <= SMEM_NO_OPT_IN).then_some(StagedPlan { wpr, rpw, span_cap, smem: smem(rpw) as u32 })
    }

    /// `s[t] = silu(G x[t]) · (U x[t])`, with the two products in g_out/u_out when given.
    /// G and U share format and shape; x: `[T][cols]`, outputs `[T][rows]`.
    /// `norm` as in [`Gpu::matvec`].
    #[allow(clippy::too_many_arguments)]
    pub fn matvec_swiglu(&self, g: &QMat, u: &QMat, x: u64, t: usize, s: u64, g_out: Option<u64>, u_out: Option<u64>, norm: Option<(u64, f32)>) -> Result<()> {
        ensure!((1..=MV_MAX_T).contains(&t), "matvec_swiglu: {t} rows (1..={MV_MAX_T})");
        ensure!(g.ty == u.ty && g.rows == u.rows && g.cols == u.cols, "matvec_swiglu: gate and up differ in format or shape");
        if t == 1 {
            if let Some(plan) = self.staged_plan(g, 2) {
                ensure!(x.is_multiple_of(16), "matvec_swiglu: x at {x:#x} is not 16-byte aligned (float4 loads)");
                let args = [
                    Arg::P(g.ptr),
                    Arg::P(u.ptr),
                    Arg::L(g.row_bytes as i64),
                    i(g.rows)?,
                    i(g.cols)?,
                    Arg::P(x),
                    Arg::P(s),
                    p(g_out),
                    p(u_out),
                    i(plan.span_cap)?,
                    p(norm.map(|n| n.0)),
                    Arg::F(norm.map_or(0.0, |n| n.1)),
                ];
                let name = format!("matvec_swiglu1{}_{}", self.staged_kind(), type_suffix(g.ty)?);
                return self.launch_pdl(&name, (g.rows.div_ceil(8) as u32, 1, 1), BLOCK, plan.smem, &args);
            }
        }
        let name = format!("matvec_swiglu{}_{}", if t == 1 { "1" } else { "" }, type_suffix(g.ty)?);
        let warps = (BLOCK / 32) as usize;
        let args = [
            Arg::P(g.ptr),
            Arg::P(u.ptr),
            Arg::L(g.row_bytes as i64),
            i(g.rows)?,
            i(g.cols)?,
            Arg::P(x),
            i(t)?,
            Arg::P(s),
            p(g_out),
            p(u_out),
            p(norm.map(|n| n.0)),
            Arg::F(norm.map_or(0.0, |n| n.1)),
        ];
        self.launch(&name, (g.rows.div_ceil(warps) as u32, 1, 1), BLOCK, 0, &args)
    }

    /// The whole matrix dequantized to f32 `[rows][cols]` at `out`.
    pub fn dequant(&self, w: &QMat, out: u64) -> Result<()> {
        let name = format!("dequant_{}", type_suffix(w.ty)?);
        let chunks = w.rows * w.cols.div_ceil(16);
        let args = [Arg::P(w.ptr), Arg::L(w.row_bytes as i64), i(w.rows)?, i(w.cols)?, Arg::P(out)];
        self.launch(&name, (grid_1d(chunks), 1, 1), BLOCK, 0, &args)
    }

    /// Rows `rows` of `w` dequantized to f32 `[rows.len()][cols]` at `out`: the `dequant_{ty}` kernel on
    /// those rows' blocks, i.e. `dq16`, the in-register dequantization that every matvec (matvec,
    /// matvec1, matvec1s, matvec1s_multi, matvec_swiglu*) and get_rows run (kernels/quant.cu). What the
    /// runner's `dequant` check observes of the CUDA backend (CudaBackend::dequantize_rows).
    pub fn dequant_rows(&self, w: &QMat, rows: std::ops::Range<usize>, out: u64) -> Result<()> {
        ensure!(rows.start <= rows.end && rows.end <= w.rows, "dequant_rows: rows {rows:?} of a matrix of {} rows", w.rows);
        if rows.is_empty() {
            return Ok(());
        }
        let name = format!("dequant_{}", type_suffix(w.ty)?);
        let chunks = rows.len() * w.cols.div_ceil(16);
        let first = w.ptr + (rows.start * w.row_bytes) as u64;
        let args = [Arg::P(first), Arg::L(w.row_bytes as i64), i(rows.len())?, i(w.cols)?, Arg::P(out)];
        self.launch(&name, (grid_1d(chunks), 1, 1), BLOCK, 0, &args)
    }

    /// `x[t] = table[tokens[t]]` for t < T; tokens: `[T]` i32 on the device (checked by the caller).
    pub fn get_rows(&self, table: &QMat, tokens: u64, t: usize, x: u64) -> Result<()> {
        let name = format!("get_rows_{}", type_suffix(table.ty)?);
        let chunks = table.cols.div_ceil(16);
        let args = [Arg::P(table.ptr), Arg::L(table.row_bytes as i64), i(table.cols)?, Arg::P(tokens), Arg::P(x)];
        self.launch(&name, (chunks.div_ceil(BLOCK as usize) as u32, t as u32, 1), BLOCK, 0, &args)
    }

    /// `y[t] = W x[t]` with W f32 `[rows][cols]` (cuBLAS SGEMM, default math: no TF32).
    pub fn sgemm(&self, w: u64, rows: usize, cols: usize, x: u64, t: usize, y: u64) -> Result<()> {
        use cudarc::cublas::sys::cublasOperation_t::{CUBLAS_OP_N, CUBLAS_OP_T};
        let (alpha, beta) = (1.0f32, 0.0f32);
        // Row-major y[T][rows] is column-major yᵀ (rows × T) = Wᵀᵀ·x: W read column-major is
        // (cols × rows), transposed; x read column-major is (cols × T).
        // SAFETY: w holds rows·cols, x T·cols and y T·rows f32 values (the callers' buffers); the
        // handle's stream is this Gpu's stream.
        unsafe {
            cudarc::cublas::result::sgemm(
                *self.blas.handle(),
                CUBLAS_OP_T,
                CUBLAS_OP_N,
                rows as i32,
                t as i32,
                cols as i32,
                &alpha,
                w as *const f32,
                cols as i32,
                x as *const f32,
                cols as i32,
                &beta,
                y as *mut f32,
                rows as i32,
            )
        }
        .map_err(|e| anyhow::anyhow!("cuBLAS SGEMM ({rows}×{cols} weight, {t} rows) failed: {e}"))?;
        if self.sync_each && !self.capturing {
            self.sync()?;
        }
        Ok(())
    }

    /// A projection for any T: matvec for T ≤ [`MV_MAX_T`], else dequantize W into `scratch`
    /// (≥ rows·cols f32) and SGEMM into `raw` (then `y = raw + bias + res`) or straight into y.
    #[allow(clippy::too_many_arguments)]
    pub fn linear(
        &self,
        w: &QMat,
        x: u64,
        t: usize,
        y: u64,
        bias: Option<u64>,
        res: Option<u64>,
        raw: Option<u64>,
        scratch: Option<&CudaSlice<f32>>,
    ) -> Result<()> {
        if t <= MV_MAX_T {
            return self.matvec(w, x, t, y, bias, res, raw, None);
        }
        let scratch = scratch.ok_or_else(|| anyhow::anyhow!("linear: no dequantization scratch for a {t}-row batch"))?;
        ensure!(scratch.len() >= w.rows * w.cols, "linear: scratch of {} for a {}×{} weight", scratch.len(), w.rows, w.cols);
        let sp = ptr(scratch, &self.stream);
        let wp = if w.ty == GgmlType::F32 {
            w.ptr
        } else {
            self.dequant(w, sp)?;
            sp
        };
        if bias.is_none() && res.is_none() {
            return self.sgemm(wp, w.rows, w.cols, x, t, y);
        }
        let raw = raw.ok_or_else(|| anyhow::anyhow!("linear: a batched projection with bias or residual needs a raw buffer"))?;
        self.sgemm(wp, w.rows, w.cols, x, t, raw)?;
        self.add(raw, bias, w.rows, res, y, t * w.rows)
    }

    /// RMSNorm of `rows` rows of width n: y_norm (optional) = x / rms, y = y_norm · w.
    #[allow(clippy::too_many_arguments)]
    pub fn rmsnorm(&self, x: u64, w: u64, y_norm: Option<u64>, y: u64, rows: usize, n: usize, eps: f32) -> Result<()> {
        let args = [Arg::P(x), Arg::P(w), p(y_norm), Arg::P(y), i(n)?, Arg::F(eps)];
        self.launch("rmsnorm_f32", (rows as u32, 1, 1), BLOCK, 0, &args)
    }

    /// [`Self::rmsnorm`] with the f16-accumulation fault: Σx² saturates at 65504 (crate::faults).
    #[allow(clippy::too_many_arguments)]
    pub fn rmsnorm_f16sat(&self, x: u64, w: u64, y_norm: Option<u64>, y: u64, rows: usize, n: usize, eps: f32) -> Result<()> {
        let args = [Arg::P(x), Arg::P(w), p(y_norm), Arg::P(y), i(n)?, Arg::F(eps)];
        self.launch("rmsnorm_f16sat_f32", (rows as u32, 1, 1), BLOCK, 0, &args)
    }

    /// `s = gelu(g) · u`, n elements (the gelu-activation fault, crate::faults).
    pub fn gelu_mul(&self, g: u64, u: u64, s: u64, n: usize) -> Result<()> {
        let args = [Arg::P(g), Arg::P(u), Arg::P(s), Arg::L(n as i64)];
        self.launch("gelu_mul_f32", (grid_1d(n), 1, 1), BLOCK, 0, &args)
    }

    /// `y = a (+ bias broadcast over rows of nb) (+ res)`, n elements; y may alias a or res.
    pub fn add(&self, a: u64, bias: Option<u64>, nb: usize, res: Option<u64>, y: u64, n: usize) -> Result<()> {
        let args = [Arg::P(a), p(bias), i(nb.max(1))?, p(res), Arg::P(y), Arg::L(n as i64)];
        self.launch("add_f32", (grid_1d(n), 1, 1), BLOCK, 0, &args)
    }

    /// `s = silu(g) · u`, n elements.
    pub fn swiglu(&self, g: u64, u: u64, s: u64, n: usize) -> Result<()> {
        let args = [Arg::P(g), Arg::P(u), Arg::P(s), Arg::L(n as i64)];
        self.launch("swiglu_f32", (grid_1d(n), 1, 1), BLOCK, 0, &args)
    }

    /// RoPE on q (in place) and k (into k_out when given) at positions `*pos + t`, and the KV-cache
    /// write of k (rotated) and v into kc/vc `[ctx][Hkv·Dh]` of this layer.
    pub fn rope_store(&self, a: &RopeArgs) -> Result<()> {
        ensure!(a.head_dim.is_multiple_of(2) && a.n_rot <= a.head_dim && a.n_rot.is_multiple_of(2), "rope: n_rot {} head_dim {}", a.n_rot, a.head_dim);
        let n = a.t * (a.n_head + a.n_head_kv) * a.head_dim / 2 + a.t * a.n_head_kv * a.head_dim;
        let args = [
            Arg::P(a.q),
            Arg::P(a.k),
            p(a.k_out),
            Arg::P(a.v),
            Arg::P(a.kc),
            Arg::P(a.vc),
            Arg::P(a.pos),
            i(a.t)?,
            i(a.n_head)?,
            i(a.n_head_kv)?,
            i(a.head_dim)?,
            i(a.n_rot)?,
            Arg::F(a.theta_scale),
            Arg::I(a.neox as i32),
        ];
        self.launch("rope_store_f32", (grid_1d(n), 1, 1), BLOCK, 0, &args)
    }

    /// Causal GQA attention of T query rows against the cache (kv_len = *pos + T); writes kq and
    /// p `[H][T][kv_len]` and out `[T][H·Dh]`.
    pub fn attention(&self, a: &AttnArgs) -> Result<()> {
        self.attention_faulty(a, AttnFault::default())
    }

    /// [`Self::attention`] with injected bug classes (crate::faults); `AttnFault::default()` is
    /// the clean kernel.
    pub fn attention_faulty(&self, a: &AttnArgs, fault: AttnFault) -> Result<()> {
        ensure!(a.head_dim <= BLOCK as usize, "attention: head dim {} > {BLOCK}", a.head_dim);
        ensure!(a.n_head.is_multiple_of(a.n_head_kv), "attention: {} heads over {} kv heads", a.n_head, a.n_head_kv);
        let args = [
            Arg::P(a.q),
            Arg::P(a.kc),
            Arg::P(a.vc),
            Arg::P(a.kq),
            Arg::P(a.p),
            Arg::P(a.out),
            Arg::P(a.pos),
            i(a.t)?,
            i(a.n_head)?,
            i(a.n_head_kv)?,
            i(a.head_dim)?,
            Arg::F(a.scale),
            Arg::I(a.full_scores as i32),
            Arg::I(fault.bits()),
            fault.window_arg()?,
        ];
        // one block per head and tile of ATTN_ROWS query rows (kernels/attention.cu)
        let tiles = a.t.div_ceil(ATTN_ROWS) as u32;
        self.launch("attention_f32", (a.n_head as u32, tiles, 1), BLOCK, (ATTN_ROWS * a.head_dim * 4) as u32, &args)
    }
}

/// One projection of [`Gpu::matvec_multi`]: `y = W x (+ bias)`, and `raw = W x` when given.
pub struct Proj<'a> {
    pub w: &'a QMat,
    /// `[rows]`
    pub y: u64,
    pub bias: Option<u64>,
    pub raw: Option<u64>,
}

/// Dynamic shared memory every device grants a launch without opting in.
const SMEM_NO_OPT_IN: usize = 48 * 1024;

/// Bytes of a staging area for a run of `bytes` weight bytes: whole 16-byte pieces, which may
/// bring up to 15 bytes either side of the run (quant.cu stage_span).
fn staging_area(bytes: usize) -> usize {
    (bytes + 15).div_ceil(16) * 16
}

/// Bytes of a staged decode kernel's x area (quant.cu x_area_bytes): `cols` f32 values, or their
/// int8 form (1 byte a value, an f32 scale per 32, an i32 sum per 16), rounded up to 16 bytes.
fn x_area_bytes(cols: usize, int8: bool) -> usize {
    (if int8 { cols + cols / 8 + cols / 4 } else { cols * 4 }).div_ceil(16) * 16
}

/// Dynamic shared memory of a staged decode kernel: the x area of `x_bytes` ([`x_area_bytes`]),
/// then `areas` staging areas of `span_cap` bytes.
fn staged_smem(x_bytes: usize, areas: usize, span_cap: usize) -> usize {
    x_bytes + areas * span_cap
}

/// How a staged decode kernel is launched ([`Gpu::staged_plan`]).
struct StagedPlan {
    /// warps sharing an output row
    wpr: usize,
    /// rows of each warp (when wpr = 1)
    rpw: usize,
    /// bytes of one warp's staging area
    span_cap: usize,
    /// dynamic shared memory per block: x, then 8 warps' areas
    smem: u32,
}

/// Arguments of [`Gpu::rope_store`].
#[derive(Debug, Clone, Copy)]
pub struct RopeArgs {
    /// `[T][H][Dh]`, rotated in place
    pub q: u64,
    /// `[T][Hkv][Dh]`, read only
    pub k: u64,
    /// `[T][Hkv][Dh]`: the rotated k, when wanted
    pub k_out: Option<u64>,
    /// `[T][Hkv][Dh]`
    pub v: u64,
    /// this layer's `[ctx][Hkv·Dh]`
    pub kc: u64,
    pub vc: u64,
    /// device i32: positions already in the cache
    pub pos: u64,
    pub t: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    pub n_rot: usize,
    /// base^(−2/n_rot), computed on the host like the CPU twin
    pub theta_scale: f32,
    pub neox: bool,
}

/// The attention fault's kernel arguments (its type and bits: crate::fault_plan, where both
/// backends read it).
pub use crate::fault_plan::AttnFault;

impl AttnFault {
    /// The kernels' `window` argument (0: none).
    pub fn window_arg(&self) -> Result<Arg> {
        i(self.window as usize)
    }
}

/// Arguments of [`Gpu::attention`].
#[derive(Debug, Clone, Copy)]
pub struct AttnArgs {
    /// `[T][H][Dh]`
    pub q: u64,
    /// this layer's `[ctx][Hkv][Dh]`
    pub kc: u64,
    pub vc: u64,
    /// `[H][T][kv_len]`
    pub kq: u64,
    pub p: u64,
    /// `[T][H·Dh]`
    pub out: u64,
    pub pos: u64,
    pub t: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    pub scale: f32,
    /// Also compute the masked (future) scores, for the `kq` tap.
    pub full_scores: bool,
}
