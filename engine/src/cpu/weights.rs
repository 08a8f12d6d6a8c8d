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
use crate::fault_plan::{LayerTensor, Slot, TensorSpec, WeightPlan};
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
    /// f32 values: F32/F16/BF16 tensors, and matrices a loader fault rewrote (crate::fault_plan).
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

    /// The matrix in f32, dequantized if it is blocks.
    pub fn into_f32(self) -> Matrix {
        match self {
            Weight::F32(m) => m,
            Weight::Blocks(_) => self.to_f32(),
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
        Self::load_planned(file, &WeightPlan::new(file, cfg, None))
    }

    /// Loads the tensors of `plan` (crate::fault_plan), each checked against its planned shape, and
    /// applies the plan's loader-fault changes ([`TensorSpec::corrupt`]).
    pub fn load_planned(file: &GgufFile, plan: &WeightPlan) -> Result<Weights> {
        let fname = file.display_name();
        let loaded: Vec<(&TensorSpec, Loaded)> = plan
            .tensors
            .par_iter()
            .map(|spec| {
                let (name, ne) = (&spec.name, &spec.ne);
                let info = spec.find(file)?;
                if ne.len() == 2 && info.ty.block_size() > 1 {
                    // Kept as blocks: check now what dequantizing would check (a supported type,
                    // whole blocks per row, the byte count), so that reading a row cannot fail later.
                    ensure!(crate::dequant::is_supported(info.ty), "{fname}: {name}: dequantization of {} is not implemented", info.ty);
                    let row_bytes = crate::dequant::bytes_needed(info.ty, ne[0]).with_context(|| format!("{fname}: {name}"))?;
                    let data = file.tensor_data(info);
                    ensure!(data.len() == row_bytes * ne[1], "{fname}: {name} holds {} bytes, {} expected", data.len(), row_bytes * ne[1]);
                    return Ok((spec, Loaded::Blocks(info.ty, info.offset as usize, row_bytes)));
                }
                let data = crate::dequant::dequantize_tensor(file, info).with_context(|| format!("{fname}: dequantizing {name}"))?;
                let n: usize = ne.iter().product();
                if data.len() != n {
                    bail!("{fname}: {name} dequantized to {} values, expected {:?}", data.len(), ne);
                }
                Ok((spec, Loaded::F32(data)))
            })
            .collect::<Result<_>>()?;
        let store = if loaded.iter().any(|(_, l)| matches!(l, Loaded::Blocks(..))) { Some(Arc::new(Store::of(file)?)) } else { None };
        let mut t = Taker { map: loaded.into_iter().map(|(s, d)| (s.slot, (s, d))).collect(), store, file };
        let token_embd = t.matrix(Slot::TokenEmbd)?;
        let output = if t.has(Slot::Output) { Some(t.matrix(Slot::Output)?) } else { None };
        let mut layers = Vec::with_capacity(plan.n_layer);
        for l in 0..plan.n_layer {
            use LayerTensor::*;
            let b = |x| Slot::Layer(l, x);
            let mut bias = |x| if t.has(b(x)) { t.vector(b(x)).map(Some) } else { Ok(None) };
            let (bq, bk, bv) = (bias(BiasQ)?, bias(BiasK)?, bias(BiasV)?);
            layers.push(LayerWeights {
                attn_norm: t.vector(b(AttnNorm))?,
                wq: t.matrix(b(Q))?,
                wk: t.matrix(b(K))?,
                wv: t.matrix(b(V))?,
                bq,
                bk,
                bv,
                wo: t.matrix(b(AttnOutput))?,
                ffn_norm: t.vector(b(FfnNorm))?,
                w_gate: t.matrix(b(Gate))?,
                w_up: t.matrix(b(Up))?,
                w_down: t.matrix(b(Down))?,
            });
        }
        let output_norm = t.vector(Slot::OutputNorm)?;
        Ok(Weights { token_embd, output_norm, output, layers })
    }
}

/// Moves the loaded tensors into place, each with its planned change.
struct Taker<'a> {
    map: std::collections::HashMap<Slot, (&'a TensorSpec, Loaded)>,
    store: Option<Arc<Store>>,
    file: &'a GgufFile,
}

impl<'a> Taker<'a> {
    fn has(&self, slot: Slot) -> bool {
        self.map.contains_key(&slot)
    }

    fn take(&mut self, slot: Slot) -> (&'a TensorSpec, Loaded) {
        // Every slot taken here was planned, and `load_planned` returned early had any failed.
        self.map.remove(&slot).unwrap_or_else(|| panic!("internal: tensor {slot:?} was not loaded"))
    }

    /// A 2-D tensor `ne = [cols, rows]` as a `[rows][cols]` weight.
    fn matrix(&mut self, slot: Slot) -> Result<Weight> {
        let (spec, l) = self.take(slot);
        let (name, ne) = (&spec.name, &spec.ne);
        let w = match l {
            Loaded::F32(data) => Matrix { rows: ne[1], cols: ne[0], data }.into(),
            Loaded::Blocks(ty, offset, row_bytes) => {
                let store = self.store.clone().expect("a store exists when a tensor is kept as blocks");
                let end = offset + row_bytes * ne[1];
                ensure!(end <= store.bytes().len(), "{}: {name} ends at byte {end}, past the end of the file", self.file.display_name());
                Weight::Blocks(QMatrix { ty, rows: ne[1], cols: ne[0], store, offset, row_bytes })
            }
        };
        spec.corrupt(self.file, w)
    }

    /// A 1-D tensor (norm weight, bias), always loaded as f32.
    fn vector(&mut self, slot: Slot) -> Result<Vec<f32>> {
        let (spec, l) = self.take(slot);
        match l {
            Loaded::F32(data) => spec.corrupt_values(self.file, data),
            Loaded::Blocks(..) => unreachable!("only 2-D tensors are kept as blocks"),
        }
    }
}
