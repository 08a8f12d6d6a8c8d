//! [`CudaBackend`]: llama.cpp's llama / qwen2 graph on the GPU, op for op the CPU reference's
//! (engine/src/cpu/mod.rs), with the same taps in the same order.
//!
//! Per forward pass: the step's parameters (`n_past`, token ids) go up in one copy from pinned
//! memory; every kernel reads the position from device memory, so a single-token decode step with no
//! tap sink is captured once as a CUDA graph and replayed. The only host synchronisation of such a
//! step is the copy of the logits that [`Backend::forward`] returns. No allocation happens in a
//! decode step: buffers are sized at load (and grow only for a longer prefill batch, which also
//! drops the captured graph).

use anyhow::{ensure, Context, Result};
use cudarc::driver::{CudaGraph, CudaSlice, PinnedHostSlice};

use super::attn_decode::{DecodeAttnArgs, DecodeTaps, DECODE_SMEM_SCORES};
use super::device::{ptr, Gpu};
use super::ops::{AttnArgs, Proj, RopeArgs, MV_MAX_T};
use super::weights::{GpuLayer, GpuWeights, Vec32};
use crate::backend::Backend;
use crate::config::ModelConfig;
use crate::fault_plan::{OpParams, WeightPlan};
use crate::faults::Fault;
use crate::gguf::GgufFile;
use crate::taps::{act, key, TapInfo, TapSink};

/// The fast decode step's matvecs in words (kernel_path).
const INT8_DECODE: &str =
    "fused quantized matvec kernels with x quantized to int8 per 32 values (llama.cpp's q8_1) and dp4a products of the weights' integer values";

/// Settings of the CUDA backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CudaOptions {
    /// Most positions the KV cache holds; 0 means the model's training context length.
    pub max_ctx: usize,
    /// Token rows the activation buffers hold at load (they grow for longer batches).
    pub batch: usize,
    /// Capture single-token decode steps without taps as a CUDA graph.
    pub graphs: bool,
    /// The shipped tier's fast arithmetic, whose llama.cpp reference rounds activations to 8 bits:
    /// prefill GEMMs on TF32 tensor cores ([`Gpu::set_tf32`]), and with `int8_decode` decode
    /// matvecs with int8 activations too. Default: off (full f32); on with LOCKSTEP_CUDA_MATH=tf32
    /// or =fast. `Backend::set_fast_math` switches it (validate: on for shipped-tier cases).
    pub fast_math: bool,
    /// Whether the fast arithmetic includes int8-activation decode matvecs ([`Gpu::int8_decode`]:
    /// x quantized per 32 values as llama.cpp's q8_1, dp4a products, llama.cpp's own decode
    /// arithmetic on a quantized file). Default: on, so that wherever the fast arithmetic is on
    /// (validate: the shipped tier) the decode runs it, except with LOCKSTEP_CUDA_MATH=tf32 (TF32
    /// prefill only) or LOCKSTEP_CUDA_INT8_DECODE=0 ([`int8_decode_setting`]). Measured on the H200
    /// (2026-11-29): the shipped suites pass with it (every check; the CUDA snapshots' decade-rounded
    /// worst values moved), and a qwen2.5-coder-0.5b decode step is 15 % faster than in f32.
    pub int8_decode: bool,
}

impl Default for CudaOptions {
    fn default() -> Self {
        let math = std::env::var("LOCKSTEP_CUDA_MATH").ok();
        let fast_math = matches!(fast_math_setting(math.as_deref()), Ok(Some(true)));
        let int8_flag = int8_decode_setting(std::env::var("LOCKSTEP_CUDA_INT8_DECODE").ok().as_deref()).ok().flatten();
        let int8_decode = int8_flag.unwrap_or(math.as_deref() != Some("tf32"));
        Self { max_ctx: 0, batch: 512, graphs: true, fast_math, int8_decode }
    }
}

/// LOCKSTEP_CUDA_MATH and LOCKSTEP_CUDA_INT8_DECODE checked: an error naming the variable and the
/// accepted values for a value neither reader knows ([`CudaOptions::default`] ignores such a value).
pub fn check_env() -> Result<()> {
    fast_math_setting(std::env::var("LOCKSTEP_CUDA_MATH").ok().as_deref())?;
    int8_decode_setting(std::env::var("LOCKSTEP_CUDA_INT8_DECODE").ok().as_deref())?;
    Ok(())
}

/// LOCKSTEP_CUDA_INT8_DECODE's value read: `Some(false)` for `0` (the fast arithmetic's decode stays
/// f32), `Some(true)` for `1`, `None` (unset or empty) for the default ([`CudaOptions::int8_decode`]).
/// Anything else is an error naming the accepted values.
pub fn int8_decode_setting(value: Option<&str>) -> Result<Option<bool>> {
    match value {
        None | Some("") => Ok(None),
        Some("0") => Ok(Some(false)),
        Some("1") => Ok(Some(true)),
        Some(other) => {
            anyhow::bail!("LOCKSTEP_CUDA_INT8_DECODE={other}: expected 0 (the fast arithmetic's decode in f32) or 1 (int8 activations, the default)")
        }
    }
}

/// LOCKSTEP_CUDA_MATH's value read: `Some(true)` forces the fast arithmetic (`tf32`: TF32 prefill;
/// `fast`: TF32 prefill and int8-activation decode), `Some(false)` f32, `None` (unset, empty or
/// `auto`) leaves it to the caller (validate: the TF32 prefill on the shipped tier only; a backend
/// loaded directly: f32). Anything else is an error naming the accepted values.
pub fn fast_math_setting(value: Option<&str>) -> Result<Option<bool>> {
    match value {
        None | Some("" | "auto") => Ok(None),
        Some("f32") => Ok(Some(false)),
        Some("fast" | "tf32") => Ok(Some(true)),
        Some(other) => anyhow::bail!(
            "LOCKSTEP_CUDA_MATH={other}: expected auto (TF32 prefill on the shipped tier only), f32, tf32 (TF32 prefill) or fast (TF32 prefill and int8-activation decode)"
        ),
    }
}

impl CudaOptions {
    /// The CUDA settings matching the CPU backend's options (threads do not apply).
    pub fn from_engine(o: &crate::cpu::EngineOptions) -> Self {
        Self { max_ctx: o.max_ctx, ..Default::default() }
    }
}

/// A device f32 buffer and its address.
struct Buf {
    buf: CudaSlice<f32>,
    ptr: u64,
}

impl Buf {
    fn new(gpu: &Gpu, n: usize, what: &str) -> Result<Buf> {
        let buf = gpu.alloc::<f32>(n, what)?;
        let ptr = ptr(&buf, &gpu.stream);
        Ok(Buf { buf, ptr })
    }
    /// Address of element `i`.
    fn at(&self, i: usize) -> u64 {
        self.ptr + 4 * i as u64
    }
}

/// Activations for up to `t_cap` token rows.
struct Acts {
    t_cap: usize,
    kq_cap: usize,
    /// `[T][D]`: the residual stream (`inp_embd`, then each layer's `l_out-L`)
    l_out: Buf,
    /// `[T][D]`: `norm-L.rms_norm.0`, `attn_norm-L`, `attn_out-L`, `ffn_inp-L`, `norm-L.rms_norm.1`,
    /// `ffn_norm-L`, `ffn_out-L`
    norm0: Buf,
    attn_norm: Buf,
    attn_out: Buf,
    ffn_inp: Buf,
    norm1: Buf,
    ffn_norm: Buf,
    ffn_out: Buf,
    /// `[T][H·Dh]`: `Qcur-L` (after the bias; rotated in place by the prefill path), its product
    /// before the bias, and `kqv_out-L`
    q_cur: Buf,
    q_mul_mat: Buf,
    kqv_out: Buf,
    /// `[H·Dh]`: a decode step's `Qcur-L.rope`, written by the fused decode attention when tapped
    q_rope: Buf,
    /// `[T][Hkv·Dh]`: `Kcur-L`, `Kcur-L.mul_mat`, `Kcur-L.rope`, `Vcur-L`, `Vcur-L.mul_mat`
    k_cur: Buf,
    k_mul_mat: Buf,
    k_rope: Buf,
    v_cur: Buf,
    v_mul_mat: Buf,
    /// `[T][F]`: `ffn_gate-L`, `ffn_up-L`, `ffn_swiglu-L`
    ffn_gate: Buf,
    ffn_up: Buf,
    ffn_swiglu: Buf,
    /// `[H][T][kv_len]`: `kq-L`, `kq_soft_max-L`
    kq: Buf,
    kq_soft_max: Buf,
    /// `[D]`: `norm` and `result_norm` of the last row
    norm_out: Buf,
    result_norm: Buf,
    /// `[V]`: `result_output`
    logits: Buf,
    /// f32 copy of one layer matrix for prefill GEMMs (only when t_cap > MV_MAX_T)
    scratch: Option<CudaSlice<f32>>,
    /// `[1 + T]` i32: n_past, then the token ids
    params: CudaSlice<i32>,
    params_ptr: u64,
    /// `None` only while the backend is being dropped (freed under the capture lock)
    params_host: Option<PinnedHostSlice<i32>>,
    /// `[V]` page-locked copy of the logits (a fast device → host copy)
    logits_host: Option<PinnedHostSlice<f32>>,
}

impl Acts {
    fn new(gpu: &Gpu, cfg: &ModelConfig, w: &GpuWeights, t_cap: usize, kq_cap: usize) -> Result<Acts> {
        let (d, qd, kv, f) = (cfg.n_embd, cfg.q_dim(), cfg.kv_dim(), cfg.n_ff);
        let b = |n: usize, what: &str| Buf::new(gpu, n, &format!("activation buffer {what} ({t_cap} rows)"));
        let params = gpu.alloc::<i32>(1 + t_cap, "step parameters")?;
        let params_ptr = ptr(&params, &gpu.stream);
        // SAFETY: page-locked host memory of 1 + t_cap i32, flag 0 (cached, readable from the host).
        let params_host = unsafe { gpu.ctx.alloc_pinned_with_flags::<i32>(1 + t_cap, 0) }.context("allocating pinned host memory for the step parameters")?;
        // SAFETY: page-locked host memory of V f32, flag 0 (cached, readable from the host).
        let logits_host = unsafe { gpu.ctx.alloc_pinned_with_flags::<f32>(cfg.n_vocab, 0) }.context("allocating pinned host memory for the logits")?;
        let scratch = if t_cap > MV_MAX_T { Some(gpu.alloc::<f32>(w.max_layer_matrix(), "f32 dequantization scratch for prefill GEMMs")?) } else { None };
        Ok(Acts {
            t_cap,
            kq_cap,
            l_out: b(t_cap * d, "l_out")?,
            norm0: b(t_cap * d, "norm")?,
            attn_norm: b(t_cap * d, "attn_norm")?,
            attn_out: b(t_cap * d, "attn_out")?,
            ffn_inp: b(t_cap * d, "ffn_inp")?,
            norm1: b(t_cap * d, "norm.1")?,
            ffn_norm: b(t_cap * d, "ffn_norm")?,
            ffn_out: b(t_cap * d, "ffn_out")?,
            q_cur: b(t_cap * qd, "Qcur")?,
            q_rope: b(qd, "Qcur.rope (decode)")?,
            q_mul_mat: b(t_cap * qd, "Qcur.mul_mat")?,
            kqv_out: b(t_cap * qd, "kqv_out")?,
            k_cur: b(t_cap * kv, "Kcur")?,
            k_mul_mat: b(t_cap * kv, "Kcur.mul_mat")?,
            k_rope: b(t_cap * kv, "Kcur.rope")?,
            v_cur: b(t_cap * kv, "Vcur")?,
            v_mul_mat: b(t_cap * kv, "Vcur.mul_mat")?,
            ffn_gate: b(t_cap * f, "ffn_gate")?,
            ffn_up: b(t_cap * f, "ffn_up")?,
            ffn_swiglu: b(t_cap * f, "ffn_swiglu")?,
            kq: Buf::new(gpu, kq_cap, "attention scores kq")?,
            kq_soft_max: Buf::new(gpu, kq_cap, "attention probabilities")?,
            norm_out: b(d, "norm (output)")?,
            result_norm: b(d, "result_norm")?,
            logits: Buf::new(gpu, cfg.n_vocab, "logits")?,
            scratch,
            params,
            params_ptr,
            params_host: Some(params_host),
            logits_host: Some(logits_host),
        })
    }
}

/// A model loaded on the GPU, with its KV cache.
pub struct CudaBackend {
    /// Declared first: dropped before the buffers it refers to.
    graph: Option<CudaGraph>,
    pub config: ModelConfig,
    pub options: CudaOptions,
    max_ctx: usize,
    n_past: usize,
    acts: Acts,
    /// `[n_layer][ctx][Hkv·Dh]`
    kc: Buf,
    vc: Buf,
    weights: GpuWeights,
    /// An injected bug class (crate::faults); `None` unless a caller asked for one explicitly.
    fault: Option<Fault>,
    gpu: Gpu,
    /// Declared last, dropped last: the shared device lock, taken by `drop` so that every field
    /// above is freed under it (see [`Drop for CudaBackend`](#impl-Drop-for-CudaBackend)).
    drop_lock: Option<std::sync::RwLockReadGuard<'static, ()>>,
}

impl CudaBackend {
    /// Reads the configuration from `file`, uploads the weights in their GGUF formats, compiles the
    /// kernels (first use in the process) and allocates the KV cache and activation buffers.
    pub fn load(file: &GgufFile, options: CudaOptions) -> Result<Self> {
        Self::load_with_fault(file, options, None)
    }

    /// [`Self::load`] with a fault of crate::faults injected, as the CPU backend's
    /// `load_with_fault`: loader faults corrupt the uploaded weights, op faults switch the forward
    /// pass to a buggy kernel or argument. `None` loads the very same weights and graph as [`Self::load`].
    pub fn load_with_fault(file: &GgufFile, options: CudaOptions, fault: Option<Fault>) -> Result<Self> {
        let mut config = ModelConfig::from_gguf(file)?;
        let mut gpu = Gpu::new()?;
        gpu.set_tf32(options.fast_math)?;
        gpu.int8_decode = options.fast_math && options.int8_decode;
        let _lock = super::device::shared_lock();
        ensure!(config.head_dim % 2 == 0 && config.head_dim <= 256, "head dim {} unsupported by the CUDA attention kernel", config.head_dim);
        let plan = WeightPlan::new(file, &config, fault);
        let weights = GpuWeights::load_planned(&gpu, file, &plan)?;
        config.n_ff = plan.n_ff;
        let max_ctx = if options.max_ctx == 0 { config.n_ctx_train } else { options.max_ctx };
        let cache_n = config.n_layer * max_ctx * config.kv_dim();
        let kc = Buf::new(&gpu, cache_n, &format!("K cache ({max_ctx} positions)"))?;
        let vc = Buf::new(&gpu, cache_n, &format!("V cache ({max_ctx} positions)"))?;
        let t_cap = options.batch.clamp(1, max_ctx);
        let kq_cap = (config.n_head * max_ctx).max(config.n_head * t_cap * t_cap);
        let acts = Acts::new(&gpu, &config, &weights, t_cap, kq_cap)?;
        gpu.sync()?;
        Ok(Self { graph: None, config, options, max_ctx, n_past: 0, acts, kc, vc, weights, fault, gpu, drop_lock: None })
    }

    /// The number of positions the KV cache may hold.
    pub fn max_ctx(&self) -> usize {
        self.max_ctx
    }

    /// The device this backend runs on.
    pub fn device(&self) -> &super::DeviceInfo {
        &self.gpu.info
    }

    /// Free and total device memory in bytes.
    pub fn mem_info(&self) -> Result<(usize, usize)> {
        self.gpu.mem_info()
    }

    /// Grows the activation buffers for a batch of `t` rows at `n_past`.
    fn ensure_capacity(&mut self, t: usize, n_past: usize) -> Result<()> {
        let need_kq = self.config.n_head * t * (n_past + t);
        if t > self.acts.t_cap || need_kq > self.acts.kq_cap {
            self.graph = None;
            let t_cap = t.max(self.acts.t_cap);
            let kq_cap = need_kq.max(self.acts.kq_cap);
            self.gpu.sync()?;
            // free the old buffers first
            let old = std::mem::replace(&mut self.acts, Acts::new(&self.gpu, &self.config, &self.weights, 1, 1)?);
            drop(old);
            self.acts = Acts::new(&self.gpu, &self.config, &self.weights, t_cap, kq_cap)?;
        }
        Ok(())
    }

    /// A forward pass of `t` tokens at `n_past` over this backend's weights, buffers and fault.
    fn pass(&self, t: usize, n_past: usize) -> Step<'_> {
        let (gpu, cfg, w, a, kc, vc, max_ctx) = (&self.gpu, &self.config, &self.weights, &self.acts, &self.kc, &self.vc, self.max_ctx);
        Step { gpu, cfg, w, a, kc, vc, max_ctx, t, n_past, op: OpParams::new(&self.config, self.fault) }
    }

    /// One forward pass; the last token's logits are left in the pinned host buffer.
    fn forward_impl(&mut self, tokens: &[u32], sink: Option<&mut dyn TapSink>) -> Result<()> {
        let t = tokens.len();
        ensure!(t > 0, "forward: no tokens");
        let n_past = self.n_past;
        ensure!(n_past + t <= self.max_ctx, "forward: {n_past} + {t} positions exceed the context of {}", self.max_ctx);
        for &tok in tokens {
            ensure!((tok as usize) < self.config.n_vocab, "token id {tok} is outside the vocabulary ({} rows)", self.config.n_vocab);
        }
        let use_graph = sink.is_none() && t == 1 && self.options.graphs;
        let capture = use_graph && self.graph.is_none();
        let (_shared, _exclusive) = if capture { (None, Some(super::device::exclusive_lock())) } else { (Some(super::device::shared_lock()), None) };
        self.ensure_capacity(t, n_past)?;
        {
            let pinned = self.acts.params_host.as_mut().context("CUDA backend used while being dropped")?;
            let host = pinned.as_mut_slice().context("pinned step parameters")?;
            host[0] = n_past as i32;
            for (i, &tok) in tokens.iter().enumerate() {
                host[1 + i] = tok as i32;
            }
        }
        if let Some(pinned) = &self.acts.params_host {
            self.gpu.stream.memcpy_htod(pinned, &mut self.acts.params).context("copying the step parameters to the GPU")?;
        }

        if OpParams::new(&self.config, self.fault).kv_stale {
            // the fault: positions of earlier calls read back as zeros (this batch's own rows are
            // written by rope_store below, before attention reads them)
            self.gpu.stream.memset_zeros(&mut self.kc.buf).context("kv-cache-not-written: zeroing the K cache")?;
            self.gpu.stream.memset_zeros(&mut self.vc.buf).context("kv-cache-not-written: zeroing the V cache")?;
        }
        if use_graph {
            if capture {
                use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
                self.gpu.stream.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL).context("beginning CUDA graph capture")?;
                self.gpu.capturing = true;
                let mut taps = Taps { sink: None };
                let r = self.pass(t, n_past).run(&mut taps);
                self.gpu.capturing = false;
                let g = self.gpu.stream.end_capture(CUgraphInstantiate_flags(0));
                r?;
                self.graph = g.context("ending CUDA graph capture")?;
            }
            match &self.graph {
                Some(g) => g.launch().context("launching the decode-step CUDA graph")?,
                None => anyhow::bail!("CUDA graph capture produced no graph"),
            }
        } else {
            let mut taps = Taps { sink };
            self.pass(t, n_past).run(&mut taps)?;
        }
        let pinned = self.acts.logits_host.as_mut().context("CUDA backend used while being dropped")?;
        self.gpu.stream.memcpy_dtoh(&self.acts.logits.buf, pinned).context("copying the logits from the GPU")?;
        // cudarc records no event on the pinned buffer with event tracking off: wait on the stream.
        self.gpu.sync()?;
        self.n_past = n_past + t;
        Ok(())
    }

    /// The logits of the last forward pass, in the pinned host buffer.
    fn pinned_logits(&self) -> Result<&[f32]> {
        let pinned = self.acts.logits_host.as_ref().context("CUDA backend used while being dropped")?;
        pinned.as_slice().context("reading the pinned logits")
    }
}

impl Drop for CudaBackend {
    fn drop(&mut self) {
        // Freeing device or pinned memory and destroying the streams and the cuBLAS handle may
        // synchronise the device, which must not happen while another thread captures a decode
        // graph (it takes the lock exclusively): the fields, dropped after this function returns,
        // go while `drop_lock`, the last of them, still holds the shared lock.
        self.drop_lock = Some(super::device::shared_lock());
        self.graph = None;
        self.acts.params_host = None;
        self.acts.logits_host = None;
        let _ = self.gpu.sync();
    }
}

impl Backend for CudaBackend {
    fn name(&self) -> &'static str {
        "cuda"
    }
    fn n_past(&self) -> usize {
        self.n_past
    }
    fn reset(&mut self) {
        self.n_past = 0;
    }
    fn forward(&mut self, tokens: &[u32], taps: Option<&mut dyn TapSink>) -> Result<Vec<f32>> {
        self.forward_impl(tokens, taps)?;
        Ok(self.pinned_logits()?.to_vec())
    }
    fn step(&mut self, tokens: &[u32]) -> Result<&[f32]> {
        self.forward_impl(tokens, None)?;
        self.pinned_logits()
    }
    fn set_fast_math(&mut self, on: bool) -> Result<bool> {
        self.gpu.set_tf32(on)?;
        let int8 = on && self.options.int8_decode;
        if self.gpu.int8_decode != int8 {
            // the captured decode step launches the other kernels (freed under the shared lock, as
            // every graph of a backend is: see Drop)
            let _lock = super::device::shared_lock();
            self.graph = None;
            self.gpu.int8_decode = int8;
        }
        Ok(std::mem::replace(&mut self.options.fast_math, on))
    }
    fn kernel_path(&self, t: usize) -> String {
        match (t > MV_MAX_T, t == 1 && self.options.graphs) {
            (true, _) if self.options.fast_math => {
                "TF32 tensor cores (shipped tier only): weights dequantized to f32 per matrix, cuBLAS SGEMM in TF32 math; attention_f32".into()
            }
            (true, _) => "f32 (exact tier): weights dequantized to f32 per matrix, cuBLAS SGEMM without TF32; attention_f32".into(),
            (false, true) if self.gpu.int8_decode => {
                format!("int8 activations (shipped tier only): {INT8_DECODE}, attention_decode_f32 with an online softmax, replayed as one CUDA graph per step")
            }
            (false, false) if self.gpu.int8_decode && t == 1 => {
                format!("int8 activations (shipped tier only): {INT8_DECODE}, attention_decode_f32 with an online softmax")
            }
            (false, true) => "f32 (exact tier): fused quantized matvec kernels and attention_decode_f32, replayed as one CUDA graph per step".into(),
            (false, false) => "f32 (exact tier): fused quantized matvec kernels".into(),
        }
    }
    /// The kernels' own dequantization, `dq16` (Gpu::dequant_rows), on the matrix as the GPU holds it:
    /// the bytes the matvecs read. Where the loader did not upload the file's bytes (an injected fault
    /// replaced the matrix) the file's bytes go through the same kernel; vectors (norm weights, biases)
    /// are dequantized on the host by crate::dequant and uploaded as f32 (weights.rs), so that is theirs.
    fn dequantize_rows(&self, file: &GgufFile, tensor: &str, rows: std::ops::Range<usize>) -> Result<Vec<f32>> {
        use super::ops::QMat;
        use crate::dequant;
        let t = file.tensor(tensor).with_context(|| format!("{}: no tensor {tensor}", file.display_name()))?;
        let (ne0, n_rows) = (t.row_len() as usize, t.n_rows() as usize);
        ensure!(rows.start <= rows.end && rows.end <= n_rows, "{tensor}: rows {rows:?} of {n_rows}");
        let n = rows.len() * ne0;
        // weights.rs uploaded what the fault's dequantization changes as F32 (WeightPlan, Change::Q4kMinSign)
        if let Some(rows) = crate::fault_plan::faulty_dequant_rows(self.fault, file, t, rows.clone()) {
            return rows;
        }
        if t.ne.len() == 1 {
            return Ok(dequant::dequantize_rows(file, t, rows)?);
        }
        let _lock = super::device::shared_lock();
        let out = self.gpu.alloc::<f32>(n, &format!("{tensor}: dequantized rows"))?;
        let out_ptr = ptr(&out, &self.gpu.stream);
        // With a fault injected, the loader may have replaced the matrix on purpose (transposed, zeroed):
        // not a dequantization, so the file's bytes are used then.
        let held = self.fault.is_none().then(|| resident(&self.weights, tensor)).flatten().filter(|m| m.ty == t.ty && m.cols == ne0 && m.rows == n_rows);
        match held {
            Some(m) => {
                self.gpu.dequant_rows(m, rows, out_ptr)?;
                self.gpu.download(&out, 0, n)
            }
            None => {
                let m = QMat::upload(&self.gpu, t.ty, rows.len(), ne0, dequant::rows_bytes(file, t, rows.clone())?, &format!("{tensor} rows {rows:?}"))?;
                self.gpu.dequant_rows(&m, 0..rows.len(), out_ptr)?;
                self.gpu.download(&out, 0, n)
            }
        }
    }
}

/// The matrix the GPU holds for the GGUF tensor `name`, if the graph uses one.
fn resident<'w>(w: &'w GpuWeights, name: &str) -> Option<&'w super::ops::QMat> {
    use crate::fault_plan::{LayerTensor as T, Slot};
    match Slot::of_gguf_name(name)? {
        Slot::TokenEmbd => Some(&w.token_embd),
        Slot::Output => w.output.as_ref(),
        Slot::OutputNorm => None,
        Slot::Layer(l, t) => {
            let lw = w.layers.get(l)?;
            match t {
                T::Q => Some(&lw.wq),
                T::K => Some(&lw.wk),
                T::V => Some(&lw.wv),
                T::AttnOutput => Some(&lw.wo),
                T::Gate => Some(&lw.w_gate),
                T::Up => Some(&lw.w_up),
                T::Down => Some(&lw.w_down),
                // vectors are uploaded as f32 Vec32, not matrices
                T::AttnNorm | T::FfnNorm | T::BiasQ | T::BiasK | T::BiasV => None,
            }
        }
    }
}

/// Hands tensors to the sink: only asked-for ones are copied back.
struct Taps<'a> {
    sink: Option<&'a mut dyn TapSink>,
}

impl Taps<'_> {
    fn wants(&self, name: &str, layer: Option<usize>, stage: Option<&str>) -> bool {
        self.sink.as_deref().is_some_and(|s| s.wants(&key(name, layer, stage)))
    }

    /// Offers `shape.product()` values of `b` from element `off`, copied back only if wanted.
    #[allow(clippy::too_many_arguments)]
    fn emit(&mut self, gpu: &Gpu, name: &str, layer: Option<usize>, stage: Option<&str>, shape: [usize; 4], b: &Buf, off: usize) -> Result<()> {
        self.emit_with(gpu, name, layer, stage, shape, b, off, |v| v)
    }

    /// Like [`Self::emit`], rearranging the copied values with `f` first.
    #[allow(clippy::too_many_arguments)]
    fn emit_with(
        &mut self,
        gpu: &Gpu,
        name: &str,
        layer: Option<usize>,
        stage: Option<&str>,
        shape: [usize; 4],
        b: &Buf,
        off: usize,
        f: impl FnOnce(Vec<f32>) -> Vec<f32>,
    ) -> Result<()> {
        let Some(sink) = self.sink.as_deref_mut() else { return Ok(()) };
        let k = key(name, layer, stage);
        if sink.wants(&k) {
            let data = f(gpu.download(&b.buf, off, shape.iter().product())?);
            sink.tap(TapInfo { key: &k, layer, shape }, &data);
        }
        Ok(())
    }

    fn replace(&mut self, layer: usize, shape: [usize; 4]) -> Result<Option<Vec<f32>>> {
        match self.sink.as_deref_mut() {
            Some(sink) => crate::taps::layer_output_replacement(sink, layer, shape),
            None => Ok(None),
        }
    }
}

/// One forward pass of `t` tokens at `n_past` (token ids and n_past already on the device, at
/// `acts.params`): the model's weights, its activation buffers and KV cache, and the pass's shape.
struct Step<'a> {
    gpu: &'a Gpu,
    cfg: &'a ModelConfig,
    w: &'a GpuWeights,
    a: &'a Acts,
    /// `[n_layer][max_ctx][Hkv·Dh]`
    kc: &'a Buf,
    vc: &'a Buf,
    max_ctx: usize,
    t: usize,
    n_past: usize,
    op: OpParams,
}

impl Step<'_> {
    /// A prefill batch wider than the matvec kernels: projections run as dequantize + SGEMM.
    fn batched(&self) -> bool {
        self.t > MV_MAX_T
    }

    /// The whole graph, as llama.cpp's llm_build_qwen2 / llm_build_llama: embed the tokens, then per
    /// layer an attention block and a feed-forward block, each adding to the residual stream; then
    /// the output head on the last row. Leaves the last row's logits in `acts.logits`.
    fn run(&self, taps: &mut Taps<'_>) -> Result<()> {
        let (gpu, a, d) = (self.gpu, self.a, self.cfg.n_embd);
        // token embeddings: l_out[t] = token_embd[token t]
        gpu.get_rows(&self.w.token_embd, a.params_ptr + 4, self.t, a.l_out.ptr)?;
        taps.emit(gpu, "embd", None, None, act(self.t, d), &a.l_out, 0)?;
        let mut rows = self.t;
        for (l, lw) in self.w.layers.iter().enumerate() {
            // ffn_inp = l_out + Wo · attention(RMSNorm(l_out)); the last layer keeps the last row only
            rows = self.attention_block(l, lw, taps)?;
            // l_out = ffn_inp + W_down · (act(W_gate · n) ⊙ W_up · n), n = RMSNorm(ffn_inp)
            self.ffn_block(l, lw, rows, taps)?;
            if let Some(r) = taps.replace(l, act(rows, d))? {
                upload_into(gpu, &r, a.l_out.ptr)?;
            }
        }
        // logits = W_out · RMSNorm(last row)
        self.head(rows, taps)
    }

    /// `y = RMSNorm(x) · w` over `rows` rows (and the bare normalisation into `y_norm` when given).
    fn rmsnorm(&self, x: u64, w: u64, y_norm: Option<u64>, y: u64, rows: usize) -> Result<()> {
        let (d, eps) = (self.cfg.n_embd, self.op.eps);
        match self.op.f16_sum {
            true => self.gpu.rmsnorm_f16sat(x, w, y_norm, y, rows, d, eps),
            false => self.gpu.rmsnorm(x, w, y_norm, y, rows, d, eps),
        }
    }

    /// Whether the matvecs of `rows` rows normalise their x themselves even when the norm is tapped:
    /// with the int8 decode (rows = 1), whose kernels defer the norm's scale (quant.cu stage_x_q8)
    /// and so do not give the values of rmsnorm_f32 followed by a plain int8 matvec: the tapped step
    /// then runs the kernels the CUDA graph runs, and rmsnorm_f32 beside them for the taps.
    fn int8_norm(&self, rows: usize) -> bool {
        rows == 1 && self.gpu.int8_decode
    }

    /// Layer `l`'s attention block: RMSNorm, the Q/K/V projections (+ bias), RoPE and the KV-cache
    /// write, causal GQA attention, the output projection and the residual into `acts.ffn_inp`.
    /// Returns the rows it leaves there (1 on the last layer of a prefill: llama.cpp's inp_out_ids).
    fn attention_block(&self, l: usize, lw: &GpuLayer, taps: &mut Taps<'_>) -> Result<usize> {
        let (gpu, cfg, a, t) = (self.gpu, self.cfg, self.a, self.t);
        let (d, qd, kvd) = (cfg.n_embd, cfg.q_dim(), cfg.kv_dim());
        let (li, batched, scratch) = (Some(l), self.batched(), a.scratch.as_ref());
        let kv_len = self.n_past + t;
        let layer_kc = self.kc.at(l * self.max_ctx * kvd);
        let layer_vc = self.vc.at(l * self.max_ctx * kvd);

        // RMSNorm; without taps on it (or with the int8 decode: see int8_norm), the projections
        // normalise l_out themselves
        let want_n0 = taps.wants("norm", li, Some("rms_norm.0"));
        let tapped = want_n0 || taps.wants("attn_norm", li, None);
        let fuse_norm = !batched && !self.op.f16_sum && (!tapped || self.int8_norm(t));
        if tapped || !fuse_norm {
            self.rmsnorm(a.l_out.ptr, lw.attn_norm.ptr, want_n0.then_some(a.norm0.ptr), a.attn_norm.ptr, t)?;
        }
        let (a_in, a_norm) = match fuse_norm {
            true => (a.l_out.ptr, Some((lw.attn_norm.ptr, self.op.eps))),
            false => (a.attn_norm.ptr, None),
        };
        taps.emit(gpu, "norm", li, Some("rms_norm.0"), act(t, d), &a.norm0, 0)?;
        taps.emit(gpu, "attn_norm", li, None, act(t, d), &a.attn_norm, 0)?;

        // Q, then V and K (the CPU twin's order of taps: Q, Q rope, V, K, K rope). A decode step
        // with the norm fused runs the three in one launch; else, on the matvec path, V and K run
        // beside Q on the side streams (cuBLAS is bound to the main stream).
        let bias = |b: &Option<Vec32>| b.as_ref().map(|b| b.ptr);
        let want_raw = |name: &str, rotated: bool, b: &Option<Vec32>| raw_wanted(taps, name, l, rotated, b.is_some(), batched);
        let (q_raw, v_raw, k_raw) = (
            want_raw("Qcur", true, &lw.bq).then_some(&a.q_mul_mat),
            want_raw("Vcur", false, &lw.bv).then_some(&a.v_mul_mat),
            want_raw("Kcur", true, &lw.bk).then_some(&a.k_mul_mat),
        );
        let proj = |w, y: &Buf, b: &Option<Vec32>, raw: Option<&Buf>| Proj { w, y: y.ptr, bias: bias(b), raw: raw.map(|r| r.ptr) };
        let together = t == 1
            && a_norm.is_some()
            && gpu.matvec_multi(
                &[proj(&lw.wq, &a.q_cur, &lw.bq, q_raw), proj(&lw.wv, &a.v_cur, &lw.bv, v_raw), proj(&lw.wk, &a.k_cur, &lw.bk, k_raw)],
                a_in,
                a_norm,
            )?;
        let emit_q = |taps: &mut Taps<'_>| -> Result<()> {
            taps.emit(gpu, "Qcur", li, Some("mul_mat"), act(t, qd), q_raw.unwrap_or(&a.q_cur), 0)?;
            if lw.bq.is_some() {
                taps.emit(gpu, "Qcur", li, Some("add"), act(t, qd), &a.q_cur, 0)?;
            }
            Ok(())
        };
        if together {
            emit_q(taps)?;
        } else {
            let branch = !batched;
            if branch {
                gpu.fork()?;
            }
            project(gpu, &lw.wq, bias(&lw.bq), a_in, a_norm, t, &a.q_cur, q_raw, scratch)?;
            emit_q(taps)?;
            if branch {
                gpu.on(1);
            }
            let vp = project(gpu, &lw.wv, bias(&lw.bv), a_in, a_norm, t, &a.v_cur, v_raw, scratch);
            if branch {
                gpu.on(2);
            }
            let kp = project(gpu, &lw.wk, bias(&lw.bk), a_in, a_norm, t, &a.k_cur, k_raw, scratch);
            if branch {
                gpu.join()?;
            }
            vp?;
            kp?;
        }

        // A decode step: RoPE, the cache write and attention in one kernel, the one the CUDA graph
        // runs; wanted taps are written by that kernel itself. (Past the kernel's shared-memory
        // scores its scratch would overlap the score taps: such a tapped step takes the prefill path.)
        let want_attn_taps =
            taps.wants("Qcur", li, Some("rope")) || taps.wants("Kcur", li, Some("rope")) || taps.wants("kq", li, None) || taps.wants("kq_soft_max", li, None);
        let fused_attn = t == 1 && (!want_attn_taps || kv_len <= DECODE_SMEM_SCORES);
        let (n_head, n_head_kv, head_dim, n_rot) = (cfg.n_head, cfg.n_head_kv, cfg.head_dim, cfg.n_rot);
        let (theta_scale, neox, pos) = (self.op.theta_scale, self.op.neox, a.params_ptr);
        if fused_attn {
            let tap = |name: &str, stage: Option<&str>, b: &Buf| if taps.wants(name, li, stage) { b.ptr } else { 0 };
            let dtaps = DecodeTaps {
                q_rot: tap("Qcur", Some("rope"), &a.q_rope),
                k_rot: tap("Kcur", Some("rope"), &a.k_rope),
                kq: tap("kq", None, &a.kq),
                p: tap("kq_soft_max", None, &a.kq_soft_max),
            };
            let (q, k, v, out) = (a.q_cur.ptr, a.k_cur.ptr, a.v_cur.ptr, a.kqv_out.ptr);
            let (ctx, scale) = (self.max_ctx, self.op.scale);
            let args = DecodeAttnArgs {
                q,
                k,
                v,
                kc: layer_kc,
                vc: layer_vc,
                pos,
                out,
                p_scratch: Some(a.kq_soft_max.ptr),
                ctx,
                n_head,
                n_head_kv,
                head_dim,
                n_rot,
                theta_scale,
                neox,
                scale,
                taps: dtaps,
            };
            gpu.attention_decode(&args, self.op.attn)?;
        } else {
            let k_out = taps.wants("Kcur", li, Some("rope")).then_some(a.k_rope.ptr);
            let (q, k, v) = (a.q_cur.ptr, a.k_cur.ptr, a.v_cur.ptr);
            gpu.rope_store(&RopeArgs { q, k, k_out, v, kc: layer_kc, vc: layer_vc, pos, t, n_head, n_head_kv, head_dim, n_rot, theta_scale, neox })?;
        }
        let q_rope = if fused_attn { &a.q_rope } else { &a.q_cur };
        taps.emit(gpu, "Qcur", li, Some("rope"), [1, t, cfg.n_head, cfg.head_dim], q_rope, 0)?;
        match lw.bv {
            Some(_) => {
                taps.emit(gpu, "Vcur", li, Some("mul_mat"), act(t, kvd), v_raw.unwrap_or(&a.v_cur), 0)?;
                taps.emit(gpu, "Vcur", li, Some("add"), act(t, kvd), &a.v_cur, 0)?;
            }
            None => taps.emit(gpu, "Vcur", li, None, act(t, kvd), &a.v_cur, 0)?,
        }
        taps.emit(gpu, "Kcur", li, Some("mul_mat"), act(t, kvd), k_raw.unwrap_or(&a.k_cur), 0)?;
        if lw.bk.is_some() {
            taps.emit(gpu, "Kcur", li, Some("add"), act(t, kvd), &a.k_cur, 0)?;
        }
        taps.emit(gpu, "Kcur", li, Some("rope"), [1, t, cfg.n_head_kv, cfg.head_dim], &a.k_rope, 0)?;

        // prefill (or a tapped decode step past the shared-memory scores): attention of the batch
        // against the cache, kq = q·Kᵀ, kq_soft_max = softmax(kq·scale) (causal), kqv_out = p·V
        if !fused_attn {
            let args = AttnArgs {
                q: a.q_cur.ptr,
                kc: layer_kc,
                vc: layer_vc,
                kq: a.kq.ptr,
                p: a.kq_soft_max.ptr,
                out: a.kqv_out.ptr,
                pos,
                t,
                n_head,
                n_head_kv,
                head_dim,
                scale: self.op.scale,
                full_scores: taps.wants("kq", li, None),
            };
            gpu.attention_faulty(&args, self.op.attn)?;
        }
        let kq_shape = [1, cfg.n_head, t, kv_len];
        taps.emit(gpu, "kq", li, None, kq_shape, &a.kq, 0)?;
        taps.emit(gpu, "kq_soft_max", li, None, kq_shape, &a.kq_soft_max, 0)?;
        taps.emit_with(gpu, "kqv", li, None, [1, n_head, t, head_dim], &a.kqv_out, 0, |v| crate::cpu::attention::heads_first(&v, t, n_head, head_dim))?;
        taps.emit(gpu, "kqv_out", li, None, act(t, qd), &a.kqv_out, 0)?;

        // output projection + residual; the last layer keeps only the last row (inp_out_ids)
        let trim = l + 1 == cfg.n_layer && t > 1;
        let residual = |at: usize| self.op.residual.then_some(a.l_out.at(at * d));
        let want_attn_out = cfg.arch.names_attn_out() && taps.wants("attn_out", li, None);
        let rows = if want_attn_out {
            gpu.linear(&lw.wo, a.kqv_out.ptr, t, a.attn_out.ptr, None, None, None, scratch)?;
            taps.emit(gpu, "attn_out", li, None, act(t, d), &a.attn_out, 0)?;
            let r0 = if trim { t - 1 } else { 0 };
            gpu.add(a.attn_out.at(r0 * d), None, 1, residual(r0), a.ffn_inp.ptr, (t - r0) * d)?;
            t - r0
        } else if trim {
            gpu.linear(&lw.wo, a.kqv_out.at((t - 1) * qd), 1, a.ffn_inp.ptr, None, residual(t - 1), None, scratch)?;
            1
        } else {
            let raw = batched.then_some(a.attn_out.ptr);
            gpu.linear(&lw.wo, a.kqv_out.ptr, t, a.ffn_inp.ptr, None, residual(0), raw, scratch)?;
            t
        };
        taps.emit(gpu, "ffn_inp", li, None, act(rows, d), &a.ffn_inp, 0)?;
        Ok(rows)
    }

    /// Layer `l`'s feed-forward block on `rows` rows of `acts.ffn_inp`: RMSNorm, gate and up
    /// projections, SwiGLU (GELU with the fault), the down projection and the residual into
    /// `acts.l_out`.
    fn ffn_block(&self, l: usize, lw: &GpuLayer, rows: usize, taps: &mut Taps<'_>) -> Result<()> {
        let (gpu, a, li) = (self.gpu, self.a, Some(l));
        let (d, ff, scratch) = (self.cfg.n_embd, self.cfg.n_ff, a.scratch.as_ref());
        let want_n1 = taps.wants("norm", li, Some("rms_norm.1"));
        let fused = rows <= MV_MAX_T && lw.w_gate.ty == lw.w_up.ty && !self.op.gelu;
        let tapped = want_n1 || taps.wants("ffn_norm", li, None);
        let fuse_norm = fused && !self.op.f16_sum && (!tapped || self.int8_norm(rows));
        if tapped || !fuse_norm {
            self.rmsnorm(a.ffn_inp.ptr, lw.ffn_norm.ptr, want_n1.then_some(a.norm1.ptr), a.ffn_norm.ptr, rows)?;
        }
        taps.emit(gpu, "norm", li, Some("rms_norm.1"), act(rows, d), &a.norm1, 0)?;
        taps.emit(gpu, "ffn_norm", li, None, act(rows, d), &a.ffn_norm, 0)?;
        if fused {
            // gate, up and SwiGLU in one launch (normalising ffn_inp itself when fused)
            let wg = taps.wants("ffn_gate", li, None).then_some(a.ffn_gate.ptr);
            let wu = taps.wants("ffn_up", li, None).then_some(a.ffn_up.ptr);
            let (f_in, f_norm) = if fuse_norm { (a.ffn_inp.ptr, Some((lw.ffn_norm.ptr, self.op.eps))) } else { (a.ffn_norm.ptr, None) };
            gpu.matvec_swiglu(&lw.w_gate, &lw.w_up, f_in, rows, a.ffn_swiglu.ptr, wg, wu, f_norm)?;
        } else {
            gpu.linear(&lw.w_gate, a.ffn_norm.ptr, rows, a.ffn_gate.ptr, None, None, None, scratch)?;
            gpu.linear(&lw.w_up, a.ffn_norm.ptr, rows, a.ffn_up.ptr, None, None, None, scratch)?;
            match self.op.gelu {
                true => gpu.gelu_mul(a.ffn_gate.ptr, a.ffn_up.ptr, a.ffn_swiglu.ptr, rows * ff)?,
                false => gpu.swiglu(a.ffn_gate.ptr, a.ffn_up.ptr, a.ffn_swiglu.ptr, rows * ff)?,
            }
        }
        taps.emit(gpu, "ffn_gate", li, None, act(rows, ff), &a.ffn_gate, 0)?;
        taps.emit(gpu, "ffn_up", li, None, act(rows, ff), &a.ffn_up, 0)?;
        taps.emit(gpu, "ffn_swiglu", li, None, act(rows, ff), &a.ffn_swiglu, 0)?;
        let want_out = taps.wants("ffn_out", li, None) || rows > MV_MAX_T;
        gpu.linear(&lw.w_down, a.ffn_swiglu.ptr, rows, a.l_out.ptr, None, Some(a.ffn_inp.ptr), want_out.then_some(a.ffn_out.ptr), scratch)?;
        taps.emit(gpu, "ffn_out", li, None, act(rows, d), &a.ffn_out, 0)?;
        taps.emit(gpu, "l_out", li, None, act(rows, d), &a.l_out, 0)?;
        Ok(())
    }

    /// The output head on the last of `rows` rows: final RMSNorm, then the logits.
    fn head(&self, rows: usize, taps: &mut Taps<'_>) -> Result<()> {
        let (gpu, w, a, d) = (self.gpu, self.w, self.a, self.cfg.n_embd);
        let last = a.l_out.at((rows - 1) * d);
        let want_norm = taps.wants("norm", None, None);
        let tapped = want_norm || taps.wants("result_norm", None, None);
        // without taps on the norm (or with the int8 decode: see int8_norm), the head normalises the
        // last row itself
        let fuse_norm = !self.op.f16_sum && (!tapped || self.int8_norm(1));
        if tapped || !fuse_norm {
            self.rmsnorm(last, w.output_norm.ptr, want_norm.then_some(a.norm_out.ptr), a.result_norm.ptr, 1)?;
        }
        taps.emit(gpu, "norm", None, None, act(1, d), &a.norm_out, 0)?;
        taps.emit(gpu, "result_norm", None, None, act(1, d), &a.result_norm, 0)?;
        match fuse_norm {
            true => gpu.matvec(w.lm_head(), last, 1, a.logits.ptr, None, None, None, Some((w.output_norm.ptr, self.op.eps)))?,
            false => gpu.matvec(w.lm_head(), a.result_norm.ptr, 1, a.logits.ptr, None, None, None, None)?,
        }
        taps.emit(gpu, "result_output", None, None, act(1, self.cfg.n_vocab), &a.logits, 0)?;
        Ok(())
    }
}

/// Whether the projection `name` of layer `l` writes its product before the bias separately: for
/// its `.mul_mat` tap, or as the GEMM target of a batched projection with a bias.
fn raw_wanted(taps: &Taps<'_>, name: &str, l: usize, rotated: bool, has_bias: bool, batched: bool) -> bool {
    let stage = (rotated || has_bias).then_some("mul_mat");
    has_bias && (batched || taps.wants(name, Some(l), stage))
}

/// `name-L.mul_mat` (+ bias): y = W x (+ b), the product alone into `raw` when given (see
/// [`raw_wanted`]); with `norm`, x is RMS-normalised by the matvec itself.
#[allow(clippy::too_many_arguments)]
fn project(
    gpu: &Gpu,
    w: &super::ops::QMat,
    bias: Option<u64>,
    x: u64,
    norm: Option<(u64, f32)>,
    t: usize,
    y: &Buf,
    raw: Option<&Buf>,
    scratch: Option<&CudaSlice<f32>>,
) -> Result<()> {
    let raw_ptr = raw.map(|r| r.ptr);
    match norm {
        Some(_) => gpu.matvec(w, x, t, y.ptr, bias, None, raw_ptr, norm),
        None => gpu.linear(w, x, t, y.ptr, bias, None, raw_ptr, scratch),
    }
}

/// Host → device copy of `data` to address `dst` (a layer-isolated replacement of l_out).
fn upload_into(gpu: &Gpu, data: &[f32], dst: u64) -> Result<()> {
    // SAFETY: dst is the start of the x buffer, which holds at least t_cap·D ≥ data.len() values;
    // the copy is ordered on the backend's stream and `data` outlives it (synchronised below).
    unsafe { cudarc::driver::result::memcpy_htod_async(dst, data, gpu.stream.cu_stream()) }.context("uploading a replacement l_out")?;
    gpu.sync()
}
