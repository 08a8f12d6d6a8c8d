//! The f32 CPU reference backend: weights kept as the file stores them and dequantized to f32 as a
//! matmul reads them ([`matmul`], [`weights`]), every activation in f32, a KV cache in f32, and llama.cpp's graph (llama / qwen2) computed op by op, each op a small named
//! function in [`ops`] or [`attention`] so that a fault injector can hook it.
//!
//! Taps leave in llama.cpp's graph order with golden/README.md's names: `embd`; per layer L
//! `norm-L.rms_norm.0`, `attn_norm-L`, `Qcur-L.mul_mat`, [`Qcur-L.add`], `Qcur-L.rope`,
//! `Vcur-L.mul_mat` + `Vcur-L.add` (or `Vcur-L` without bias), `Kcur-L.mul_mat`, [`Kcur-L.add`],
//! `Kcur-L.rope`, `kq-L`, `kq_soft_max-L`, `kqv-L`, `kqv_out-L`, [`attn_out-L`], `ffn_inp-L`,
//! `norm-L.rms_norm.1`, `ffn_norm-L`, `ffn_gate-L`, `ffn_up-L`, `ffn_swiglu-L`, `ffn_out-L`,
//! `l_out-L`; then `norm`, `result_norm`, `result_output`.

pub mod attention;
#[cfg(target_arch = "x86_64")]
mod blocks_avx2;
pub mod matmul;
pub mod ops;
pub mod weights;

use anyhow::{bail, ensure, Context, Result};

use crate::backend::Backend;
use crate::config::ModelConfig;
use crate::fault_plan::{OpParams, WeightPlan};
use crate::faults::{self, Fault};
use crate::gguf::GgufFile;
use crate::taps::{act, key, TapInfo, TapSink};
use attention::{AttnDims, KvCache};
use weights::{Weight, Weights};

/// Settings of the CPU backend.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EngineOptions {
    /// Worker threads for matmuls and attention; 0: as many as CPUs, the calling thread one of them.
    pub threads: usize,
    /// Most positions the KV cache may hold; 0 means the model's training context length.
    pub max_ctx: usize,
}

/// A model loaded for the CPU, with its KV cache.
pub struct CpuBackend {
    pub config: ModelConfig,
    pub weights: Weights,
    pub options: EngineOptions,
    cache: KvCache,
    pool: Pool,
    /// An injected bug class (crate::faults); `None` unless a caller asked for one explicitly. Its
    /// loader changes were applied at load; its op settings are resolved for each forward pass
    /// ([`OpParams`]), so an op fault may also be set after loading.
    pub fault: Option<Fault>,
    /// `[V]`: the logits of the last [`Backend::step`]
    last_logits: Vec<f32>,
}

impl CpuBackend {
    /// Reads the configuration from `file` and its weights (block formats kept as blocks, [`weights`]).
    pub fn load(file: &GgufFile, options: EngineOptions) -> Result<Self> {
        Self::load_with_fault(file, options, None)
    }

    /// [`Self::load`] with a fault of crate::faults injected (loader faults corrupt the weights here,
    /// op faults act in the forward pass).
    pub fn load_with_fault(file: &GgufFile, options: EngineOptions, fault: Option<Fault>) -> Result<Self> {
        let mut config = ModelConfig::from_gguf(file)?;
        let pool = match options.threads {
            0 => caller_pool().map_or(Pool::Global, Pool::Caller),
            n => Pool::Own(rayon::ThreadPoolBuilder::new().num_threads(n).build().context("building the thread pool")?),
        };
        let plan = WeightPlan::new(file, &config, fault);
        let weights = match pool.get() {
            Some(p) => p.install(|| Weights::load_planned(file, &plan))?,
            None => Weights::load_planned(file, &plan)?,
        };
        config.n_ff = plan.n_ff;
        let cache = KvCache::new(config.n_layer, config.kv_dim());
        Ok(Self { config, weights, options, cache, pool, fault, last_logits: Vec::new() })
    }

    /// The number of positions the KV cache may hold.
    pub fn max_ctx(&self) -> usize {
        if self.options.max_ctx == 0 {
            self.config.n_ctx_train
        } else {
            self.options.max_ctx
        }
    }

    fn forward_impl(&mut self, tokens: &[u32], sink: Option<&mut dyn TapSink>) -> Result<Vec<f32>> {
        ensure!(!tokens.is_empty(), "forward: no tokens");
        let n_past = self.cache.len;
        ensure!(n_past + tokens.len() <= self.max_ctx(), "forward: {} + {} positions exceed the context of {}", n_past, tokens.len(), self.max_ctx());
        let mut taps = Taps { sink };
        let ex = Exec { pool: self.pool.get(), op: OpParams::new(&self.config, self.fault) };
        let out = forward_layers(&self.config, &self.weights, &mut self.cache, tokens, &mut taps, ex);
        match out {
            Ok(logits) => {
                self.cache.len = n_past + tokens.len();
                Ok(logits)
            }
            Err(e) => {
                // leave the cache as it was before this call
                let keep = n_past * self.cache.row;
                for l in 0..self.config.n_layer {
                    self.cache.k[l].truncate(keep);
                    self.cache.v[l].truncate(keep);
                }
                Err(e)
            }
        }
    }
}

impl Backend for CpuBackend {
    fn name(&self) -> &'static str {
        "cpu"
    }
    fn n_past(&self) -> usize {
        self.cache.len
    }
    fn reset(&mut self) {
        self.cache.clear();
    }
    fn forward(&mut self, tokens: &[u32], taps: Option<&mut dyn TapSink>) -> Result<Vec<f32>> {
        self.forward_impl(tokens, taps)
    }
    fn step(&mut self, tokens: &[u32]) -> Result<&[f32]> {
        self.last_logits = self.forward_impl(tokens, None)?;
        Ok(&self.last_logits)
    }
    /// The matmul's dequantization (matmul::dequantize_into: the AVX2 dequantizers where they run,
    /// else crate::dequant's block functions) on the rows' bytes.
    fn dequantize_rows(&self, file: &GgufFile, tensor: &str, rows: std::ops::Range<usize>) -> Result<Vec<f32>> {
        let t = file.tensor(tensor).with_context(|| format!("{}: no tensor {tensor}", file.display_name()))?;
        // the loader replaced what the fault's dequantization changes (WeightPlan, Change::Q4kMinSign)
        if let Some(rows) = crate::fault_plan::faulty_dequant_rows(self.fault, file, t, rows.clone()) {
            return rows;
        }
        let bytes = crate::dequant::rows_bytes(file, t, rows.clone())?;
        let mut out = vec![0.0f32; rows.len() * t.row_len() as usize];
        matmul::dequantize_into(t.ty, bytes, &mut out).with_context(|| format!("{}: {tensor}", file.display_name()))?;
        Ok(out)
    }
}

/// Where a backend's parallel ops run.
enum Pool {
    /// Its own pool (`EngineOptions::threads` > 0).
    Own(rayon::ThreadPool),
    /// The loading thread's pool ([`caller_pool`]).
    Caller(&'static rayon::ThreadPool),
    /// rayon's global pool.
    Global,
}

impl Pool {
    fn get(&self) -> Option<&rayon::ThreadPool> {
        match self {
            Pool::Own(p) => Some(p),
            Pool::Caller(p) => Some(p),
            Pool::Global => None,
        }
    }
}

/// A pool of as many threads as CPUs in which the calling thread is itself a worker (built once per
/// thread, then shared by every backend that thread loads): the forward pass runs on that thread, and
/// each parallel op splits its work with the other workers directly, instead of handing it to
/// rayon's global pool and sleeping until it is done (a decode step has ~240 parallel ops; measured
/// on the default CPU suites: 10 % less CPU time, sys time 8.2 s -> 4.9 s). `None` (rayon's global
/// pool) when the thread is already a worker of another pool.
fn caller_pool() -> Option<&'static rayon::ThreadPool> {
    thread_local! {
        static POOL: Option<&'static rayon::ThreadPool> = rayon::ThreadPoolBuilder::new()
            .num_threads(std::thread::available_parallelism().map_or(1, |n| n.get()))
            .use_current_thread()
            .build()
            .ok()
            .map(|p| &*Box::leak(Box::new(p)));
    }
    POOL.with(|p| *p)
}

/// Where parallel ops run: the backend's pool ([`Pool`]), or rayon's global one. The whole forward
/// pass cannot simply run inside `ThreadPool::install`, because the tap sink need not be `Send`; so
/// each parallel op is installed on its own (a direct call when the calling thread is a worker of
/// the pool, [`caller_pool`]).
#[derive(Clone, Copy)]
struct Exec<'p> {
    pool: Option<&'p rayon::ThreadPool>,
    /// The pass's op settings (crate::fault_plan): the model's own, or an injected fault's.
    op: OpParams,
}

impl Exec<'_> {
    fn par<R: Send>(self, f: impl FnOnce() -> R + Send) -> R {
        match self.pool {
            Some(p) => p.install(f),
            None => f(),
        }
    }
}

/// Hands tensors to the sink, building keys and copies only when someone listens.
struct Taps<'a> {
    sink: Option<&'a mut dyn TapSink>,
}

impl Taps<'_> {
    /// Offers `data` (already in the tap's layout) under `name-layer.stage`.
    fn emit(&mut self, name: &str, layer: Option<usize>, stage: Option<&str>, shape: [usize; 4], data: &[f32]) {
        self.emit_with(name, layer, stage, shape, || std::borrow::Cow::Borrowed(data));
    }

    /// Like [`Self::emit`], for data that must be rearranged first: `make` runs only if wanted.
    fn emit_with<'d>(&mut self, name: &str, layer: Option<usize>, stage: Option<&str>, shape: [usize; 4], make: impl FnOnce() -> std::borrow::Cow<'d, [f32]>) {
        let Some(sink) = self.sink.as_deref_mut() else { return };
        let k = key(name, layer, stage);
        if sink.wants(&k) {
            let data = make();
            debug_assert_eq!(data.len(), shape.iter().product::<usize>(), "tap {k}");
            sink.tap(TapInfo { key: &k, layer, shape }, &data);
        }
    }

    /// Whether the sink wants `name-layer.stage`.
    fn wants(&self, name: &str, layer: Option<usize>, stage: Option<&str>) -> bool {
        self.sink.as_deref().is_some_and(|sink| sink.wants(&key(name, layer, stage)))
    }

    /// Layer-isolated mode: a replacement for `l_out-L`, if the sink gives one.
    fn replace(&mut self, layer: usize, shape: [usize; 4]) -> Result<Option<Vec<f32>>> {
        match self.sink.as_deref_mut() {
            Some(sink) => crate::taps::layer_output_replacement(sink, layer, shape),
            None => Ok(None),
        }
    }
}

/// The whole graph for one batch: embeddings, every layer, the output head.
/// Returns the last token's logits `[V]`.
fn forward_layers(cfg: &ModelConfig, w: &Weights, cache: &mut KvCache, tokens: &[u32], taps: &mut Taps<'_>, ex: Exec<'_>) -> Result<Vec<f32>> {
    let t_n = tokens.len();
    let d = cfg.n_embd;
    let n_past = cache.len;

    // x: [T][D]
    let mut x = embedding(&w.token_embd, tokens)?;
    taps.emit("embd", None, None, act(t_n, d), &x);

    // rows carried after attention: all T, except in the last layer (llama.cpp's inp_out_ids)
    let mut rows = t_n;
    for (l, lw) in w.layers.iter().enumerate() {
        let last = l + 1 == cfg.n_layer;
        let li = Some(l);
        // attention block
        let n0 = faults::norm(&x, d, ex.op.eps, ex.op.f16_sum);
        taps.emit("norm", li, Some("rms_norm.0"), act(t_n, d), &n0);
        let a = ops::mul_rows(&n0, &lw.attn_norm);
        taps.emit("attn_norm", li, None, act(t_n, d), &a);

        let q = project(taps, ex, "Qcur", l, &lw.wq, lw.bq.as_deref(), &a, t_n, true)?;
        let q = rotate(taps, ex, cfg, "Qcur", l, q, n_past, cfg.n_head);
        let v = project(taps, ex, "Vcur", l, &lw.wv, lw.bv.as_deref(), &a, t_n, false)?;
        let k = project(taps, ex, "Kcur", l, &lw.wk, lw.bk.as_deref(), &a, t_n, true)?;
        let k = rotate(taps, ex, cfg, "Kcur", l, k, n_past, cfg.n_head_kv);
        attention::kv_write(cache, l, &k, &v);

        let dims = AttnDims { n_tokens: t_n, n_past, n_head: cfg.n_head, n_head_kv: cfg.n_head_kv, head_dim: cfg.head_dim };
        let kv_len = dims.kv_len();
        let (kc, vc) = attention::kv_read(cache, l, kv_len);
        let stale = ex.op.kv_stale.then(|| faults::kv_stale(cache, n_past, &k, &v));
        let (kc, vc) = stale.as_ref().map_or((kc, vc), |(a, b)| (&a[..], &b[..]));
        // The scores of masked positions (later in the batch) are read only by the kq tap and by the
        // causal-mask-missing fault; without either, only the causal ones are computed (the same values).
        let attn = ex.op.attn;
        let masked_read = taps.wants("kq", li, None) || attn.no_causal_mask;
        let kq = if masked_read || attn.gqa_modulo {
            ex.par(|| faults::scores(attn, &q, kc, &dims))
        } else {
            ex.par(|| attention::attn_scores_causal(&q, kc, &dims))
        };
        taps.emit("kq", li, None, [1, cfg.n_head, t_n, kv_len], &kq);
        let p = ex.par(|| faults::softmax(attn, &kq, ex.op.scale, &dims));
        taps.emit("kq_soft_max", li, None, [1, cfg.n_head, t_n, kv_len], &p);
        let kqv_out = ex.par(|| faults::values(attn, &p, vc, &dims));
        taps.emit_with("kqv", li, None, [1, cfg.n_head, t_n, cfg.head_dim], || attention::heads_first(&kqv_out, t_n, cfg.n_head, cfg.head_dim).into());
        taps.emit("kqv_out", li, None, act(t_n, cfg.q_dim()), &kqv_out);
        let mut o = ex.par(|| matmul::matmul(&lw.wo, &kqv_out));
        if cfg.arch.names_attn_out() {
            taps.emit("attn_out", li, None, act(t_n, d), &o);
        }
        if last && t_n > 1 {
            // only the last token continues (llama.cpp's inp_out_ids get_rows on cur and inpSA)
            o.drain(..(t_n - 1) * d);
            x.drain(..(t_n - 1) * d);
            rows = 1;
        }
        // residual-dropped: the attention output alone
        let h = if ex.op.residual { ops::add(&o, &x) } else { o };
        taps.emit("ffn_inp", li, None, act(rows, d), &h);

        // feed-forward block
        let n1 = faults::norm(&h, d, ex.op.eps, ex.op.f16_sum);
        taps.emit("norm", li, Some("rms_norm.1"), act(rows, d), &n1);
        let f = ops::mul_rows(&n1, &lw.ffn_norm);
        taps.emit("ffn_norm", li, None, act(rows, d), &f);
        let g = ex.par(|| matmul::matmul(&lw.w_gate, &f));
        taps.emit("ffn_gate", li, None, act(rows, cfg.n_ff), &g);
        let u = ex.par(|| matmul::matmul(&lw.w_up, &f));
        taps.emit("ffn_up", li, None, act(rows, cfg.n_ff), &u);
        let s = faults::activation(ex.op.gelu, &g, &u);
        taps.emit("ffn_swiglu", li, None, act(rows, cfg.n_ff), &s);
        let down = ex.par(|| matmul::matmul(&lw.w_down, &s));
        taps.emit("ffn_out", li, None, act(rows, d), &down);
        x = ops::add(&down, &h);
        taps.emit("l_out", li, None, act(rows, d), &x);
        if let Some(r) = taps.replace(l, act(rows, d))? {
            x = r;
        }
    }

    // output head on the last row
    let x_last = &x[(rows - 1) * d..];
    let n = faults::norm(x_last, d, ex.op.eps, ex.op.f16_sum);
    taps.emit("norm", None, None, act(1, d), &n);
    let r = ops::mul_rows(&n, &w.output_norm);
    taps.emit("result_norm", None, None, act(1, d), &r);
    let logits = ex.par(|| matmul::matmul(w.lm_head(), &r));
    taps.emit("result_output", None, None, act(1, cfg.n_vocab), &logits);
    Ok(logits)
}

/// `name-L.mul_mat` then, with a bias, `name-L.add`. A name with a single exported node carries no
/// stage suffix (llama's `Vcur-L`); `rotated` names also get a `.rope` node later.
#[allow(clippy::too_many_arguments)]
fn project(
    taps: &mut Taps<'_>,
    ex: Exec<'_>,
    name: &str,
    l: usize,
    w: &Weight,
    bias: Option<&[f32]>,
    a: &[f32],
    t_n: usize,
    rotated: bool,
) -> Result<Vec<f32>> {
    let mut y = ex.par(|| matmul::matmul(w, a));
    let shape = act(t_n, w.rows());
    let several = rotated || bias.is_some();
    taps.emit(name, Some(l), several.then_some("mul_mat"), shape, &y);
    if let Some(b) = bias {
        if b.len() != w.rows() {
            bail!("{name}-{l}: bias has {} values for {} outputs", b.len(), w.rows());
        }
        ops::add_bias(&mut y, b);
        taps.emit(name, Some(l), Some("add"), shape, &y);
    }
    Ok(y)
}

/// RoPE on `[T][heads][Dh]` at positions `n_past..`, tapped as `name-L.rope` `[1, T, heads, Dh]`.
#[allow(clippy::too_many_arguments)]
fn rotate(taps: &mut Taps<'_>, ex: Exec<'_>, cfg: &ModelConfig, name: &str, l: usize, mut x: Vec<f32>, n_past: usize, heads: usize) -> Vec<f32> {
    let t_n = x.len() / (heads * cfg.head_dim);
    let positions: Vec<usize> = (n_past..n_past + t_n).collect();
    ops::rope(&mut x, &positions, heads, cfg.head_dim, cfg.n_rot, ex.op.rope_base, ex.op.rope_style());
    taps.emit(name, Some(l), Some("rope"), [1, t_n, heads, cfg.head_dim], &x);
    x
}

/// Embedding lookup (ggml_get_rows, as [`ops::embedding`]): the rows of `table` (`[V][D]`) for each
/// token, dequantized. Errors on an id outside the vocabulary.
fn embedding(table: &Weight, tokens: &[u32]) -> Result<Vec<f32>> {
    match table {
        Weight::F32(m) => ops::embedding(m, tokens),
        Weight::Blocks(_) => {
            let d = table.cols();
            let mut out = vec![0.0f32; tokens.len() * d];
            for (&tok, row) in tokens.iter().zip(out.chunks_exact_mut(d)) {
                ensure!((tok as usize) < table.rows(), "token id {tok} is outside the vocabulary ({} rows)", table.rows());
                table.row_into(tok as usize, row);
            }
            Ok(out)
        }
    }
}
