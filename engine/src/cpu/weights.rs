//! The model's weights. A projection in a block format (Q4_0 … Q6_K) stays as the file stores it,
//! in the GGUF file mapped read-only, and is dequantized row by row while a matmul reads it
//! ([`super::matmul`]); F32/F16/BF16 projections, norms and biases are converted to f32 once at load.
//! A decode step of qwen2.5-coder-0.5b so reads its 0.46 GB of blocks instead of 2.5 GB of f32.
//!
//! GGUF stores a projection as `ne = [in, out]` (ne0 contiguous), which read row-major is
//! `[out][in]`: exactly the [`Matrix`] layout, so no transposition happens here.

use std::sync::Arc;

use anyhow::{bail, ensure, Context, Result};
use rayon::prelude::*;

use super::ops::Matrix;
use crate::config::ModelConfig;
use crate::gguf::{GgmlType, GgufFile};

/// The bytes the block-format weights are read from: the model file mapped again (read-only), or,
/// for a file held in memory ([`GgufFile::from_bytes`]), a copy of its bytes.
enum Store {
    Mmap(memmap2::Mmap),
    Copy(Vec<u8>),
}

impl Store {
    fn bytes(&self) -> &[u8] {
        match self {
            Store::Mmap(m) => m,
            Store::Copy(v) => v,
        }
    }

    /// The file's bytes for the backend to keep: `file`'s path mapped again (checked to hold the
    /// same header and length as `file`), else a copy.
    fn of(file: &GgufFile) -> Result<Store> {
        let Some(path) = file.path() else { return Ok(Store::Copy(file.bytes().to_vec())) };
        let f = std::fs::File::open(path).with_context(|| format!("{}: reopening to map the weights", path.display()))?;
        // SAFETY: a read-only mapping, alive as long as the Store. As for GgufFile::open, nothing stops
        // another process from truncating or rewriting the file meanwhile; the check below catches a
        // file replaced since it was parsed, and the cache files are only ever replaced by rename.
        let m = unsafe { memmap2::Mmap::map(&f) }.with_context(|| format!("{}: mapping the weights", path.display()))?;
        let head = file.data_start as usize;
        if m.len() != file.bytes().len() || m.get(..head) != file.bytes().get(..head) {
            bail!("{}: the file changed since it was opened", path.display());
        }
        Ok(Store::Mmap(m))
    }
}

/// A `[rows][cols]` matrix in a GGML block format, each row `cols / block_size` whole blocks.
#[derive(Clone)]
pub struct QMatrix {
    pub ty: GgmlType,
    pub rows: usize,
    pub cols: usize,
    store: Arc<Store>,
    /// Byte offset of row 0 in `store`.
    offset: usize,
    /// Bytes of one row.
    row_bytes: usize,
}

impl std::fmt::Debug for QMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QMatrix").field("ty", &self.ty).field("rows", &self.rows).field("cols", &self.cols).finish()
    }
}

impl QMatrix {
    /// A matrix over `bytes` (`rows` rows of `cols` values in format `ty`, whole blocks), e.g. for tests.
    pub fn from_bytes(ty: GgmlType, rows: usize, cols: usize, bytes: Vec<u8>) -> Result<QMatrix> {
        ensure!(ty.block_size() > 1 && crate::dequant::is_supported(ty), "{ty} is not a block format this backend reads");
        let row_bytes = crate::dequant::bytes_needed(ty, cols)?;
        ensure!(bytes.len() == row_bytes * rows, "{ty}: {} bytes for {rows} rows of {cols} values ({row_bytes} each)", bytes.len());
        Ok(QMatrix { ty, rows, cols, store: Arc::new(Store::Copy(bytes)), offset: 0, row_bytes })
    }

    /// The stored bytes of rows `r0..r1`.
    pub fn rows_bytes(&self, r0: usize, r1: usize) -> &[u8] {
        &self.store.bytes()[self.offset + r0 * self.row_bytes..self.offset + r1 * self.row_bytes]
    }

    /// Rows `r0..r1` as f32 into `out` (`(r1 − r0)·cols` values), with crate::dequant's block functions.
    pub fn dequantize_rows_into(&self, r0: usize, r1: usize, out: &mut [f32]) {
        // Shapes and byte counts were checked at load, so this cannot fail.
        crate::dequant::dequantize_into(self.ty, self.rows_bytes(r0, r1), out).expect("QMatrix rows are whole blocks");
    }
}

/// A weight matrix `[rows][cols]` as the CPU backend holds it.
#[derive(Debug, Clone)]
pub enum Weight {
    /// f32 values: F32/F16/BF16 tensors, and matrices a loader fault rewrote (crate::faults).
    F32(Matrix),
    /// GGML blocks as stored in the file, dequantized as they are read.
    Blocks(QMatrix),
}

impl From<Matrix> for Weight {
    fn from(m: Matrix) -> Self {
        Weight::F32(m)
    }
}

impl Weight {
    pub fn rows(&self) -> usize {
        match self {
            Weight::F32(m) => m.rows,
            Weight::Blocks(q) => q.rows,
        }
    }

    pub fn cols(&self) -> usize {
        match self {
            Weight::F32(m) => m.cols,
            Weight::Blocks(q) => q.cols,
        }
    }

    /// Row `r` as f32 into `out` (`cols` values).
    pub fn row_into(&self, r: usize, out: &mut [f32]) {
        match self {
            Weight::F32(m) => out.copy_from_slice(m.row(r)),
            Weight::Blocks(q) => q.dequantize_rows_into(r, r + 1, out),
        }
    }

    /// The whole matrix in f32 (a copy).
    pub fn to_f32(&self) -> Matrix {
        match self {
            Weight::F32(m) => m.clone(),
            Weight::Blocks(q) => {
                let mut data = vec![0.0f32; q.rows * q.cols];
                data.par_chunks_mut(q.cols).enumerate().for_each(|(r, out)| q.dequantize_rows_into(r, r + 1, out));
                Matrix { rows: q.rows, cols: q.cols, data }
            }
        }
    }

    /// The matrix in f32 for a loader fault to rewrite: block formats are dequantized in place first.
    pub fn f32_mut(&mut self) -> &mut Matrix {
        if let Weight::Blocks(_) = self {
            *self = Weight::F32(self.to_f32());
        }
        match self {
            Weight::F32(m) => m,
            Weight::Blocks(_) => unreachable!("converted just above"),
        }
    }

    /// The first `n` rows (`n` ≤ rows).
    pub fn first_rows(&self, n: usize) -> Weight {
        assert!(n <= self.rows(), "first_rows: {n} of {} rows", self.rows());
        match self {
            Weight::F32(m) => Matrix { rows: n, cols: m.cols, data: m.data[..n * m.cols].to_vec() }.into(),
            Weight::Blocks(q) => Weight::Blocks(QMatrix { rows: n, ..q.clone() }),
        }
    }
}

/// One transformer block.
#[derive(Debug, Clone)]
pub struct LayerWeights {
    /// `[D]`
    pub attn_norm: Vec<f32>,
    /// `[H·Dh][D]`
    pub wq: Weight,
    /// `[Hkv·Dh][D]`
    pub wk: Weight,
    /// `[Hkv·Dh][D]`
    pub wv: Weight,
    /// `[H·Dh]`, `[Hkv·Dh]`, `[Hkv·Dh]` when the architecture has QKV biases (qwen2)
    pub bq: Option<Vec<f32>>,
    pub bk: Option<Vec<f32>>,
    pub bv: Option<Vec<f32>>,
    /// `[D][H·Dh]`
    pub wo: Weight,
    /// `[D]`
    pub ffn_norm: Vec<f32>,
    /// `[F][D]`
    pub w_gate: Weight,
    /// `[F][D]`
    pub w_up: Weight,
    /// `[D][F]`
    pub w_down: Weight,
}

/// All weights of the model.
#[derive(Debug, Clone)]
pub struct Weights {
    /// `[V][D]`
    pub token_embd: Weight,
    /// `[D]`
    pub output_norm: Vec<f32>,
    /// `[V][D]`; `None` when tied to `token_embd`.
    pub output: Option<Weight>,
    pub layers: Vec<LayerWeights>,
}

/// A tensor as loaded: f32 values, or a reference to its blocks.
enum Loaded {
    F32(Vec<f32>),
    Blocks(GgmlType, usize, usize),
}

impl Weights {
    /// The output head: `output.weight`, or `token_embd.weight` when tied.
    pub fn lm_head(&self) -> &Weight {
        self.output.as_ref().unwrap_or(&self.token_embd)
    }

    /// Loads every tensor the graph uses, checking each shape against `cfg`: 2-D tensors in a block
    /// format stay blocks (in the file, mapped), the others are converted to f32 (in parallel).
    pub fn load(file: &GgufFile, cfg: &ModelConfig) -> Result<Weights> {
        let fname = file.display_name();
        // (name, expected ne) for every tensor, loaded in parallel, then moved into place.
        let mut wanted: Vec<(String, Vec<usize>)> =
            vec![("token_embd.weight".into(), vec![cfg.n_embd, cfg.n_vocab]), ("output_norm.weight".into(), vec![cfg.n_embd])];
        if !cfg.tied_embeddings {
            wanted.push(("output.weight".into(), vec![cfg.n_embd, cfg.n_vocab]));
        }
        let (d, f, q, kv) = (cfg.n_embd, cfg.n_ff, cfg.q_dim(), cfg.kv_dim());
        for l in 0..cfg.n_layer {
            let b = |s: &str| format!("blk.{l}.{s}");
            wanted.push((b("attn_norm.weight"), vec![d]));
            wanted.push((b("attn_q.weight"), vec![d, q]));
            wanted.push((b("attn_k.weight"), vec![d, kv]));
            wanted.push((b("attn_v.weight"), vec![d, kv]));
            if cfg.qkv_bias {
                wanted.push((b("attn_q.bias"), vec![q]));
                wanted.push((b("attn_k.bias"), vec![kv]));
                wanted.push((b("attn_v.bias"), vec![kv]));
            }
            wanted.push((b("attn_output.weight"), vec![q, d]));
            wanted.push((b("ffn_norm.weight"), vec![d]));
            wanted.push((b("ffn_gate.weight"), vec![d, f]));
            wanted.push((b("ffn_up.weight"), vec![d, f]));
            wanted.push((b("ffn_down.weight"), vec![f, d]));
        }
        let loaded: Vec<(String, Vec<usize>, Loaded)> = wanted
            .into_par_iter()
            .map(|(name, ne)| {
                let info = file.tensor(&name).with_context(|| format!("{fname}: missing tensor {name}"))?;
                let got: Vec<usize> = info.ne.iter().map(|&v| v as usize).collect();
                if got != ne {
                    bail!("{fname}: tensor {name} has ne {got:?}, the metadata implies {ne:?}");
                }
                let n: usize = ne.iter().product();
                if ne.len() == 2 && info.ty.block_size() > 1 {
                    // Kept as blocks: check now what dequantizing would check (a supported type,
                    // whole blocks per row, the byte count), so that reading a row cannot fail later.
                    ensure!(crate::dequant::is_supported(info.ty), "{fname}: {name}: dequantization of {} is not implemented", info.ty);
                    let row_bytes = crate::dequant::bytes_needed(info.ty, ne[0]).with_context(|| format!("{fname}: {name}"))?;
                    let data = file.tensor_data(info);
                    ensure!(data.len() == row_bytes * ne[1], "{fname}: {name} holds {} bytes, {} expected", data.len(), row_bytes * ne[1]);
                    return Ok((name, ne, Loaded::Blocks(info.ty, info.offset as usize, row_bytes)));
                }
                let data = crate::dequant::dequantize_tensor(file, info).with_context(|| format!("{fname}: dequantizing {name}"))?;
                if data.len() != n {
                    bail!("{fname}: {name} dequantized to {} values, expected {:?}", data.len(), ne);
                }
                Ok((name, ne, Loaded::F32(data)))
            })
            .collect::<Result<_>>()?;
        let store = if loaded.iter().any(|(_, _, l)| matches!(l, Loaded::Blocks(..))) { Some(Arc::new(Store::of(file)?)) } else { None };
        let mut t = Taker { map: loaded.into_iter().map(|(n, ne, d)| (n, (ne, d))).collect(), store, fname: &fname };
        let token_embd = t.matrix("token_embd.weight")?;
        let output = if cfg.tied_embeddings { None } else { Some(t.matrix("output.weight")?) };
        let mut layers = Vec::with_capacity(cfg.n_layer);
        for l in 0..cfg.n_layer {
            let b = |s: &str| format!("blk.{l}.{s}");
            let mut bias = |s: &str| cfg.qkv_bias.then(|| t.vector(&b(s)));
            let (bq, bk, bv) = (bias("attn_q.bias"), bias("attn_k.bias"), bias("attn_v.bias"));
            layers.push(LayerWeights {
                attn_norm: t.vector(&b("attn_norm.weight")),
                wq: t.matrix(&b("attn_q.weight"))?,
                wk: t.matrix(&b("attn_k.weight"))?,
                wv: t.matrix(&b("attn_v.weight"))?,
                bq,
                bk,
                bv,
                wo: t.matrix(&b("attn_output.weight"))?,
                ffn_norm: t.vector(&b("ffn_norm.weight")),
                w_gate: t.matrix(&b("ffn_gate.weight"))?,
                w_up: t.matrix(&b("ffn_up.weight"))?,
                w_down: t.matrix(&b("ffn_down.weight"))?,
            });
        }
        let output_norm = t.vector("output_norm.weight");
        Ok(Weights { token_embd, output_norm, output, layers })
    }
}

/// Moves the loaded tensors into place.
struct Taker<'a> {
    map: std::collections::HashMap<String, (Vec<usize>, Loaded)>,
    store: Option<Arc<Store>>,
    fname: &'a str,
}

impl Taker<'_> {
    fn take(&mut self, name: &str) -> (Vec<usize>, Loaded) {
        // Every name taken here was in `wanted`, and `load` returned early had any failed.
        self.map.remove(name).unwrap_or_else(|| panic!("internal: tensor {name} was not loaded"))
    }

    /// A 2-D tensor `ne = [cols, rows]` as a `[rows][cols]` weight.
    fn matrix(&mut self, name: &str) -> Result<Weight> {
        let (ne, l) = self.take(name);
        Ok(match l {
            Loaded::F32(data) => Matrix { rows: ne[1], cols: ne[0], data }.into(),
            Loaded::Blocks(ty, offset, row_bytes) => {
                let store = self.store.clone().expect("a store exists when a tensor is kept as blocks");
                let end = offset + row_bytes * ne[1];
                ensure!(end <= store.bytes().len(), "{}: {name} ends at byte {end}, past the end of the file", self.fname);
                Weight::Blocks(QMatrix { ty, rows: ne[1], cols: ne[0], store, offset, row_bytes })
            }
        })
    }

    /// A 1-D tensor (norm weight, bias), always loaded as f32.
    fn vector(&mut self, name: &str) -> Vec<f32> {
        match self.take(name).1 {
            Loaded::F32(data) => data,
            Loaded::Blocks(..) => unreachable!("only 2-D tensors are kept as blocks"),
        }
    }
}
