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
use super::weights::{GpuWeights, Vec32};
use crate::backend::Backend;
use crate::config::{ModelConfig, RopeStyle};
use crate::faults::Fault;
use crate::gguf::GgufFile;
use crate::taps::{act, key, TapInfo, TapSink};

/// Settings of the CUDA backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CudaOptions {
    /// Most positions the KV cache holds; 0 means the model's training context length.
    pub max_ctx: usize,
    /// Token rows the activation buffers hold at load (they grow for longer batches).
    pub batch: usize,
    /// Capture single-token decode steps without taps as a CUDA graph.
    pub graphs: bool,
}

impl Default for CudaOptions {
    fn default() -> Self {
        Self { max_ctx: 0, batch: 512, graphs: true }
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
    /// `[T][D]`: residual stream, norm outputs, attention output, FFN input, down projection
    x: Buf,
    n0: Buf,
    a: Buf,
    o: Buf,
    h: Buf,
    n1: Buf,
    f: Buf,
    dn: Buf,
    /// `[T][H·Dh]`
    q: Buf,
    /// `[H·Dh]`: a decode step's rotated q, written by the fused decode attention when tapped
    qrot: Buf,
    qraw: Buf,
    attn: Buf,
    /// `[T][Hkv·Dh]`
    k: Buf,
    kraw: Buf,
    krot: Buf,
    v: Buf,
    vraw: Buf,
    /// `[T][F]`
    g: Buf,
    u: Buf,
    s: Buf,
    /// `[H][T][kv_len]`
    kq: Buf,
    p: Buf,
    /// `[D]`
    fin_n: Buf,
    fin_r: Buf,
    /// `[V]`
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
            x: b(t_cap * d, "x")?,
            n0: b(t_cap * d, "norm")?,
            a: b(t_cap * d, "attn_norm")?,
            o: b(t_cap * d, "attn_out")?,
            h: b(t_cap * d, "ffn_inp")?,
            n1: b(t_cap * d, "norm.1")?,
            f: b(t_cap * d, "ffn_norm")?,
            dn: b(t_cap * d, "ffn_out")?,
            q: b(t_cap * qd, "Qcur")?,
            qrot: b(qd, "Qcur.rope (decode)")?,
            qraw: b(t_cap * qd, "Qcur.mul_mat")?,
            attn: b(t_cap * qd, "kqv_out")?,
            k: b(t_cap * kv, "Kcur")?,
            kraw: b(t_cap * kv, "Kcur.mul_mat")?,
            krot: b(t_cap * kv, "Kcur.rope")?,
            v: b(t_cap * kv, "Vcur")?,
            vraw: b(t_cap * kv, "Vcur.mul_mat")?,
            g: b(t_cap * f, "ffn_gate")?,
            u: b(t_cap * f, "ffn_up")?,
            s: b(t_cap * f, "ffn_swiglu")?,
            kq: Buf::new(gpu, kq_cap, "attention scores kq")?,
            p: Buf::new(gpu, kq_cap, "attention probabilities")?,
            fin_n: b(d, "norm (output)")?,
            fin_r: b(d, "result_norm")?,
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
        // A fault the kernels do not implement must not run clean and pass for "not detected".
        if let Some(f @ Fault::AttentionWindow(_)) = fault {
            anyhow::bail!("fault {} is not implemented on the CUDA backend (CPU only)", f.name());
        }
        let mut config = ModelConfig::from_gguf(file)?;
        let gpu = Gpu::new()?;
        let _lock = super::device::shared_lock();
        ensure!(config.head_dim % 2 == 0 && config.head_dim <= 256, "head dim {} unsupported by the CUDA attention kernel", config.head_dim);
        let weights = GpuWeights::load_with_fault(&gpu, file, &config, fault)?;
        if fault == Some(Fault::FfnSizeWrong) {
            config.n_ff = super::weights::ffn_size_wrong(&config);
        }
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

        if self.fault == Some(Fault::KvCacheNotWritten) {
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
                let r = run(&self.gpu, &self.config, &self.weights, &self.acts, &self.kc, &self.vc, self.max_ctx, t, n_past, self.fault, &mut taps);
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
            run(&self.gpu, &self.config, &self.weights, &self.acts, &self.kc, &self.vc, self.max_ctx, t, n_past, self.fault, &mut taps)?;
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
        if self.fault == Some(Fault::Q4kMinSign) && t.ty == crate::gguf::GgmlType::Q4_K {
            // weights.rs uploads each Q4_K matrix dequantized on the host by this, as F32
            return crate::faults::dequant_q4k_min_sign(dequant::rows_bytes(file, t, rows)?, n).with_context(|| format!("{tensor} (q4k-min-sign)"));
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
    match name {
        "token_embd.weight" => return Some(&w.token_embd),
        "output.weight" => return w.output.as_ref(),
        _ => {}
    }
    let (l, t) = name.strip_prefix("blk.")?.split_once('.')?;
    let lw = w.layers.get(l.parse::<usize>().ok()?)?;
    Some(match t {
        "attn_q.weight" => &lw.wq,
        "attn_k.weight" => &lw.wk,
        "attn_v.weight" => &lw.wv,
        "attn_output.weight" => &lw.wo,
        "ffn_gate.weight" => &lw.w_gate,
        "ffn_up.weight" => &lw.w_up,
        "ffn_down.weight" => &lw.w_down,
        _ => return None,
    })
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

/// The whole graph for one batch of `t` tokens at `n_past` (token ids and n_past already on the
/// device); leaves the last token's logits in `acts.logits`.
#[allow(clippy::too_many_arguments)]
fn run(
    gpu: &Gpu,
    cfg: &ModelConfig,
    w: &GpuWeights,
    a: &Acts,
    kc: &Buf,
    vc: &Buf,
    max_ctx: usize,
    t: usize,
    n_past: usize,
    fault: Option<Fault>,
    taps: &mut Taps<'_>,
) -> Result<()> {
    let (d, qd, kvd, ff) = (cfg.n_embd, cfg.q_dim(), cfg.kv_dim(), cfg.n_ff);
    // injected faults (crate::faults), each where its CPU twin acts; all off without one
    let eps = match fault {
        Some(Fault::RmsNormEps) => 1e-5,
        Some(Fault::RmsEpsScaled(f)) => (cfg.rms_eps as f64 * f.0) as f32,
        _ => cfg.rms_eps,
    };
    let f16_sum = fault == Some(Fault::F16Accumulation);
    let rmsnorm = |x: u64, w: u64, y_norm: Option<u64>, y: u64, rows: usize| match f16_sum {
        true => gpu.rmsnorm_f16sat(x, w, y_norm, y, rows, d, eps),
        false => gpu.rmsnorm(x, w, y_norm, y, rows, d, eps),
    };
    let rope_base = match fault {
        Some(Fault::RopeBase) => 1e4,
        Some(Fault::RopeBaseScaled(f)) => (cfg.rope_base as f64 * f.0) as f32,
        _ => cfg.rope_base,
    };
    let neox = cfg.rope_style == RopeStyle::Neox && fault != Some(Fault::RopeAdjacent);
    let attn_fault = match fault {
        Some(Fault::CausalMaskMissing) => 1,
        Some(Fault::SoftmaxNoMax) => 2,
        Some(Fault::GqaMapping) => 4,
        _ => 0,
    };
    let residual = fault != Some(Fault::ResidualDropped);
    let gelu = fault == Some(Fault::GeluActivation);
    let kv_len = n_past + t;
    let batched = t > MV_MAX_T;
    let pos = a.params_ptr;
    let scratch = a.scratch.as_ref();
    let theta_scale = rope_base.powf(-2.0 / cfg.n_rot as f32);
    let scale = crate::faults::softmax_scale(fault, cfg.head_dim);
    // a raw (pre-bias / pre-residual) output: needed when tapped, or as the GEMM target
    let raw = |tapped: bool, b: &Buf| (tapped || batched).then_some(b.ptr);

    gpu.get_rows(&w.token_embd, pos + 4, t, a.x.ptr)?;
    taps.emit(gpu, "embd", None, None, act(t, d), &a.x, 0)?;

    let mut rows = t;
    for (l, lw) in w.layers.iter().enumerate() {
        let li = Some(l);
        let last = l + 1 == cfg.n_layer;
        let layer_kc = kc.at(l * max_ctx * kvd);
        let layer_vc = vc.at(l * max_ctx * kvd);

        // attention block; without taps on the norm, the projections normalise x themselves
        let want_n0 = taps.wants("norm", li, Some("rms_norm.0"));
        let fuse_norm = !batched && !f16_sum && !want_n0 && !taps.wants("attn_norm", li, None);
        let (a_in, a_norm) = if fuse_norm {
            (a.x.ptr, Some((lw.attn_norm.ptr, eps)))
        } else {
            rmsnorm(a.x.ptr, lw.attn_norm.ptr, want_n0.then_some(a.n0.ptr), a.a.ptr, t)?;
            (a.a.ptr, None)
        };
        taps.emit(gpu, "norm", li, Some("rms_norm.0"), act(t, d), &a.n0, 0)?;
        taps.emit(gpu, "attn_norm", li, None, act(t, d), &a.a, 0)?;

        // Q, then V and K (the CPU twin's order of taps: Q, Q rope, V, K, K rope). A decode step
        // with the norm fused runs the three in one launch; else, on the matvec path, V and K run
        // beside Q on the side streams (cuBLAS is bound to the main stream).
        let bias = |b: &Option<Vec32>| b.as_ref().map(|b| b.ptr);
        let want_raw = |name: &str, rotated: bool, b: &Option<Vec32>| raw_wanted(taps, name, l, rotated, b.is_some(), batched);
        let (q_raw, v_raw, k_raw) = (
            want_raw("Qcur", true, &lw.bq).then_some(&a.qraw),
            want_raw("Vcur", false, &lw.bv).then_some(&a.vraw),
            want_raw("Kcur", true, &lw.bk).then_some(&a.kraw),
        );
        let proj = |w, y: &Buf, b: &Option<Vec32>, raw: Option<&Buf>| Proj { w, y: y.ptr, bias: bias(b), raw: raw.map(|r| r.ptr) };
        let together = t == 1
            && a_norm.is_some()
            && gpu.matvec_multi(&[proj(&lw.wq, &a.q, &lw.bq, q_raw), proj(&lw.wv, &a.v, &lw.bv, v_raw), proj(&lw.wk, &a.k, &lw.bk, k_raw)], a_in, a_norm)?;
        let emit_q = |taps: &mut Taps<'_>| -> Result<()> {
            taps.emit(gpu, "Qcur", li, Some("mul_mat"), act(t, qd), q_raw.unwrap_or(&a.q), 0)?;
            if lw.bq.is_some() {
                taps.emit(gpu, "Qcur", li, Some("add"), act(t, qd), &a.q, 0)?;
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
            project(gpu, &lw.wq, bias(&lw.bq), a_in, a_norm, t, &a.q, q_raw, scratch)?;
            emit_q(taps)?;
            if branch {
                gpu.on(1);
            }
            let vp = project(gpu, &lw.wv, bias(&lw.bv), a_in, a_norm, t, &a.v, v_raw, scratch);
            if branch {
                gpu.on(2);
            }
            let kp = project(gpu, &lw.wk, bias(&lw.bk), a_in, a_norm, t, &a.k, k_raw, scratch);
            if branch {
                gpu.join()?;
            }
            vp?;
            kp?;
        }
        // a decode step: RoPE, the cache write and attention in one kernel, the one the CUDA graph
        // runs; wanted taps are written by that kernel itself. (Past the kernel's shared-memory
        // scores its scratch would overlap the score taps: such a tapped step takes the prefill path.)
        let want_attn_taps =
            taps.wants("Qcur", li, Some("rope")) || taps.wants("Kcur", li, Some("rope")) || taps.wants("kq", li, None) || taps.wants("kq_soft_max", li, None);
        let fused_attn = t == 1 && (!want_attn_taps || kv_len <= DECODE_SMEM_SCORES);
        let q_rope_buf = if fused_attn { &a.qrot } else { &a.q };
        if fused_attn {
            let tap = |name: &str, stage: Option<&str>, b: &Buf| if taps.wants(name, li, stage) { b.ptr } else { 0 };
            let dtaps = DecodeTaps {
                q_rot: tap("Qcur", Some("rope"), &a.qrot),
                k_rot: tap("Kcur", Some("rope"), &a.krot),
                kq: tap("kq", None, &a.kq),
                p: tap("kq_soft_max", None, &a.p),
            };
            gpu.attention_decode(
                &DecodeAttnArgs {
                    q: a.q.ptr,
                    k: a.k.ptr,
                    v: a.v.ptr,
                    kc: layer_kc,
                    vc: layer_vc,
                    pos,
                    out: a.attn.ptr,
                    p_scratch: Some(a.p.ptr),
                    ctx: max_ctx,
                    n_head: cfg.n_head,
                    n_head_kv: cfg.n_head_kv,
                    head_dim: cfg.head_dim,
                    n_rot: cfg.n_rot,
                    theta_scale,
                    neox,
                    scale,
                    taps: dtaps,
                },
                attn_fault,
            )?;
        } else {
            let want_krot = taps.wants("Kcur", li, Some("rope"));
            gpu.rope_store(&RopeArgs {
                q: a.q.ptr,
                k: a.k.ptr,
                k_out: want_krot.then_some(a.krot.ptr),
                v: a.v.ptr,
                kc: layer_kc,
                vc: layer_vc,
                pos,
                t,
                n_head: cfg.n_head,
                n_head_kv: cfg.n_head_kv,
                head_dim: cfg.head_dim,
                n_rot: cfg.n_rot,
                theta_scale,
                neox,
            })?;
        }
        taps.emit(gpu, "Qcur", li, Some("rope"), [1, t, cfg.n_head, cfg.head_dim], q_rope_buf, 0)?;
        match lw.bv {
            Some(_) => {
                taps.emit(gpu, "Vcur", li, Some("mul_mat"), act(t, kvd), v_raw.unwrap_or(&a.v), 0)?;
                taps.emit(gpu, "Vcur", li, Some("add"), act(t, kvd), &a.v, 0)?;
            }
            None => taps.emit(gpu, "Vcur", li, None, act(t, kvd), &a.v, 0)?,
        }
        taps.emit(gpu, "Kcur", li, Some("mul_mat"), act(t, kvd), k_raw.unwrap_or(&a.k), 0)?;
        if lw.bk.is_some() {
            taps.emit(gpu, "Kcur", li, Some("add"), act(t, kvd), &a.k, 0)?;
        }
        taps.emit(gpu, "Kcur", li, Some("rope"), [1, t, cfg.n_head_kv, cfg.head_dim], &a.krot, 0)?;

        if !fused_attn {
            let full_scores = taps.wants("kq", li, None);
            gpu.attention_faulty(
                &AttnArgs {
                    q: a.q.ptr,
                    kc: layer_kc,
                    vc: layer_vc,
                    kq: a.kq.ptr,
                    p: a.p.ptr,
                    out: a.attn.ptr,
                    pos,
                    t,
                    n_head: cfg.n_head,
                    n_head_kv: cfg.n_head_kv,
                    head_dim: cfg.head_dim,
                    scale,
                    full_scores,
                },
                attn_fault,
            )?;
        }
        let kq_shape = [1, cfg.n_head, t, kv_len];
        taps.emit(gpu, "kq", li, None, kq_shape, &a.kq, 0)?;
        taps.emit(gpu, "kq_soft_max", li, None, kq_shape, &a.p, 0)?;
        let (nh, hd) = (cfg.n_head, cfg.head_dim);
        taps.emit_with(gpu, "kqv", li, None, [1, nh, t, hd], &a.attn, 0, |v| crate::cpu::attention::heads_first(&v, t, nh, hd))?;
        taps.emit(gpu, "kqv_out", li, None, act(t, qd), &a.attn, 0)?;

        // output projection + residual; the last layer keeps only the last row (inp_out_ids)
        let trim = last && t > 1;
        let want_attn_out = cfg.arch.names_attn_out() && taps.wants("attn_out", li, None);
        if want_attn_out {
            gpu.linear(&lw.wo, a.attn.ptr, t, a.o.ptr, None, None, None, scratch)?;
            taps.emit(gpu, "attn_out", li, None, act(t, d), &a.o, 0)?;
            let r0 = if trim { t - 1 } else { 0 };
            rows = t - r0;
            gpu.add(a.o.at(r0 * d), None, 1, residual.then_some(a.x.at(r0 * d)), a.h.ptr, rows * d)?;
        } else if trim {
            rows = 1;
            gpu.linear(&lw.wo, a.attn.at((t - 1) * qd), 1, a.h.ptr, None, residual.then_some(a.x.at((t - 1) * d)), None, scratch)?;
        } else {
            rows = t;
            gpu.linear(&lw.wo, a.attn.ptr, t, a.h.ptr, None, residual.then_some(a.x.ptr), raw(false, &a.o), scratch)?;
        }
        taps.emit(gpu, "ffn_inp", li, None, act(rows, d), &a.h, 0)?;

        // feed-forward block
        let want_n1 = taps.wants("norm", li, Some("rms_norm.1"));
        let fused = rows <= MV_MAX_T && lw.w_gate.ty == lw.w_up.ty && !gelu;
        let fuse_norm = fused && !f16_sum && !want_n1 && !taps.wants("ffn_norm", li, None);
        if !fuse_norm {
            rmsnorm(a.h.ptr, lw.ffn_norm.ptr, want_n1.then_some(a.n1.ptr), a.f.ptr, rows)?;
        }
        taps.emit(gpu, "norm", li, Some("rms_norm.1"), act(rows, d), &a.n1, 0)?;
        taps.emit(gpu, "ffn_norm", li, None, act(rows, d), &a.f, 0)?;
        if fused {
            let wg = taps.wants("ffn_gate", li, None).then_some(a.g.ptr);
            let wu = taps.wants("ffn_up", li, None).then_some(a.u.ptr);
            let (f_in, f_norm) = if fuse_norm { (a.h.ptr, Some((lw.ffn_norm.ptr, eps))) } else { (a.f.ptr, None) };
            gpu.matvec_swiglu(&lw.w_gate, &lw.w_up, f_in, rows, a.s.ptr, wg, wu, f_norm)?;
        } else {
            gpu.linear(&lw.w_gate, a.f.ptr, rows, a.g.ptr, None, None, None, scratch)?;
            gpu.linear(&lw.w_up, a.f.ptr, rows, a.u.ptr, None, None, None, scratch)?;
            match gelu {
                true => gpu.gelu_mul(a.g.ptr, a.u.ptr, a.s.ptr, rows * ff)?,
                false => gpu.swiglu(a.g.ptr, a.u.ptr, a.s.ptr, rows * ff)?,
            }
        }
        taps.emit(gpu, "ffn_gate", li, None, act(rows, ff), &a.g, 0)?;
        taps.emit(gpu, "ffn_up", li, None, act(rows, ff), &a.u, 0)?;
        taps.emit(gpu, "ffn_swiglu", li, None, act(rows, ff), &a.s, 0)?;
        let want_dn = taps.wants("ffn_out", li, None);
        gpu.linear(&lw.w_down, a.s.ptr, rows, a.x.ptr, None, Some(a.h.ptr), (want_dn || rows > MV_MAX_T).then_some(a.dn.ptr), scratch)?;
        taps.emit(gpu, "ffn_out", li, None, act(rows, d), &a.dn, 0)?;
        taps.emit(gpu, "l_out", li, None, act(rows, d), &a.x, 0)?;
        if let Some(r) = taps.replace(l, act(rows, d))? {
            upload_into(gpu, &r, a.x.ptr)?;
        }
    }

    // output head on the last row
    let xl = a.x.at((rows - 1) * d);
    let want_norm = taps.wants("norm", None, None);
    if f16_sum || want_norm || taps.wants("result_norm", None, None) {
        rmsnorm(xl, w.output_norm.ptr, want_norm.then_some(a.fin_n.ptr), a.fin_r.ptr, 1)?;
        taps.emit(gpu, "norm", None, None, act(1, d), &a.fin_n, 0)?;
        taps.emit(gpu, "result_norm", None, None, act(1, d), &a.fin_r, 0)?;
        gpu.matvec(w.lm_head(), a.fin_r.ptr, 1, a.logits.ptr, None, None, None, None)?;
    } else {
        // the head normalises the last row itself
        gpu.matvec(w.lm_head(), xl, 1, a.logits.ptr, None, None, None, Some((w.output_norm.ptr, eps)))?;
    }
    taps.emit(gpu, "result_output", None, None, act(1, cfg.n_vocab), &a.logits, 0)?;
    Ok(())
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
