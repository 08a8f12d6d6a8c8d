//! The model's weights on the GPU, each matrix in its GGUF format (dequantized in registers by the
//! kernels); norm weights and biases as f32. The tensors, their shapes and a loader fault's changes
//! are the CPU backend's: one [`WeightPlan`] (crate::fault_plan).

use std::collections::HashMap;

use anyhow::{Context, Result};
use cudarc::driver::CudaSlice;

use super::device::{ptr, Gpu};
use super::ops::QMat;
use crate::config::ModelConfig;
use crate::cpu::ops::Matrix;
use crate::cpu::weights::{QMatrix, Weight};
use crate::fault_plan::{LayerTensor, Slot, WeightPlan};
use crate::gguf::{GgmlType, GgufFile, TensorInfo};

/// An f32 vector on the GPU.
pub struct Vec32 {
    pub buf: CudaSlice<f32>,
    pub ptr: u64,
    pub len: usize,
}

/// One transformer block.
pub struct GpuLayer {
    /// `[D]`
    pub attn_norm: Vec32,
    /// `[H·Dh][D]`, `[Hkv·Dh][D]`, `[Hkv·Dh][D]`
    pub wq: QMat,
    pub wk: QMat,
    pub wv: QMat,
    /// qwen2's biases `[H·Dh]`, `[Hkv·Dh]`, `[Hkv·Dh]`
    pub bq: Option<Vec32>,
    pub bk: Option<Vec32>,
    pub bv: Option<Vec32>,
    /// `[D][H·Dh]`
    pub wo: QMat,
    /// `[D]`
    pub ffn_norm: Vec32,
    /// `[F][D]`, `[F][D]`, `[D][F]`
    pub w_gate: QMat,
    pub w_up: QMat,
    pub w_down: QMat,
}

pub struct GpuWeights {
    /// `[V][D]`
    pub token_embd: QMat,
    /// `[D]`
    pub output_norm: Vec32,
    /// `[V][D]`; `None` when tied to token_embd
    pub output: Option<QMat>,
    pub layers: Vec<GpuLayer>,
}

impl GpuWeights {
    pub fn lm_head(&self) -> &QMat {
        self.output.as_ref().unwrap_or(&self.token_embd)
    }

    /// Largest `rows·cols` of the layer matrices: the f32 scratch a prefill GEMM needs.
    pub fn max_layer_matrix(&self) -> usize {
        self.layers.iter().flat_map(|l| [&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_up, &l.w_down]).map(|m| m.rows * m.cols).max().unwrap_or(0)
    }

    pub fn load(gpu: &Gpu, file: &GgufFile, cfg: &ModelConfig) -> Result<GpuWeights> {
        Self::load_planned(gpu, file, &WeightPlan::new(file, cfg, None))
    }

    /// Uploads the tensors of `plan` (crate::fault_plan), each checked against its planned shape. A
    /// tensor the plan changes (a loader fault) is changed on the host by [`crate::fault_plan::TensorSpec::corrupt`], as
    /// the CPU loader changes it, and uploaded as F32; the others upload the file's bytes unchanged.
    pub fn load_planned(gpu: &Gpu, file: &GgufFile, plan: &WeightPlan) -> Result<GpuWeights> {
        let fname = file.display_name();
        let mut mats = HashMap::new();
        let mut vecs = HashMap::new();
        for spec in &plan.tensors {
            let info = spec.find(file)?;
            let what = format!("{fname}: {}", spec.name);
            if let [cols, rows] = spec.ne[..] {
                let m = match spec.change {
                    None => QMat::upload(gpu, info.ty, rows, cols, file.tensor_data(info), &what)?,
                    Some(_) => upload_f32(gpu, &spec.corrupt(file, host_matrix(file, info, rows, cols)?)?.into_f32(), &what)?,
                };
                mats.insert(spec.slot, m);
            } else {
                let data = crate::dequant::dequantize_tensor(file, info).with_context(|| format!("{fname}: dequantizing {}", spec.name))?;
                let data = spec.corrupt_values(file, data)?;
                let buf = gpu.upload(&data, &what)?;
                let ptr = ptr(&buf, &gpu.stream);
                vecs.insert(spec.slot, Vec32 { buf, ptr, len: data.len() });
            }
        }
        let token_embd = take(&mut mats, Slot::TokenEmbd);
        let output = mats.remove(&Slot::Output);
        let output_norm = take(&mut vecs, Slot::OutputNorm);
        let mut layers = Vec::with_capacity(plan.n_layer);
        for l in 0..plan.n_layer {
            use LayerTensor::*;
            let b = |x| Slot::Layer(l, x);
            layers.push(GpuLayer {
                attn_norm: take(&mut vecs, b(AttnNorm)),
                wq: take(&mut mats, b(Q)),
                wk: take(&mut mats, b(K)),
                wv: take(&mut mats, b(V)),
                bq: vecs.remove(&b(BiasQ)),
                bk: vecs.remove(&b(BiasK)),
                bv: vecs.remove(&b(BiasV)),
                wo: take(&mut mats, b(AttnOutput)),
                ffn_norm: take(&mut vecs, b(FfnNorm)),
                w_gate: take(&mut mats, b(Gate)),
                w_up: take(&mut mats, b(Up)),
                w_down: take(&mut mats, b(Down)),
            });
        }
        Ok(GpuWeights { token_embd, output_norm, output, layers })
    }
}

/// The uploaded tensor of a planned slot.
fn take<T>(map: &mut HashMap<Slot, T>, slot: Slot) -> T {
    // every slot taken was planned, and load_planned returned early had any failed to load
    map.remove(&slot).unwrap_or_else(|| panic!("internal: tensor {slot:?} was not loaded"))
}

/// The matrix `info` (`[rows][cols]`) on the host for a loader fault to change: a block format as
/// its blocks (a copy of the file's bytes; [`crate::fault_plan::TensorSpec::corrupt`] dequantizes them where it
/// rewrites values), other formats as f32.
fn host_matrix(file: &GgufFile, info: &TensorInfo, rows: usize, cols: usize) -> Result<Weight> {
    let what = || format!("{}: {}", file.display_name(), info.name);
    if info.ty.block_size() > 1 {
        return Ok(Weight::Blocks(QMatrix::from_bytes(info.ty, rows, cols, file.tensor_data(info).to_vec()).with_context(what)?));
    }
    let data = crate::dequant::dequantize_tensor(file, info).with_context(what)?;
    Ok(Matrix { rows, cols, data }.into())
}

/// Uploads an f32 matrix `[rows][cols]` as an F32 [`QMat`] (a fault-corrupted weight).
fn upload_f32(gpu: &Gpu, m: &Matrix, what: &str) -> Result<QMat> {
    let bytes: Vec<u8> = m.data.iter().flat_map(|v| v.to_le_bytes()).collect();
    QMat::upload(gpu, GgmlType::F32, m.rows, m.cols, &bytes, what)
}
