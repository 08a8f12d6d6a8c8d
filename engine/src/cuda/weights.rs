//! The model's weights on the GPU, each matrix in its GGUF format (dequantized in registers by the
//! kernels); norm weights and biases as f32. Shapes are checked against the configuration exactly
//! as the CPU backend's loader does.

use anyhow::{bail, Context, Result};
use cudarc::driver::CudaSlice;

use super::device::{ptr, Gpu};
use super::ops::QMat;
use crate::config::ModelConfig;
use crate::gguf::GgufFile;

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
        self.layers
            .iter()
            .flat_map(|l| [&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_up, &l.w_down])
            .map(|m| m.rows * m.cols)
            .max()
            .unwrap_or(0)
    }

    pub fn load(gpu: &Gpu, file: &GgufFile, cfg: &ModelConfig) -> Result<GpuWeights> {
        let fname = file.display_name();
        let mat = |name: &str, cols: usize, rows: usize| -> Result<QMat> {
            let info = file.tensor(name).with_context(|| format!("{fname}: missing tensor {name}"))?;
            let ne: Vec<usize> = info.ne.iter().map(|&v| v as usize).collect();
            if ne != [cols, rows] {
                bail!("{fname}: tensor {name} has ne {ne:?}, the metadata implies {:?}", [cols, rows]);
            }
            QMat::upload(gpu, info.ty, rows, cols, file.tensor_data(info), &format!("{fname}: {name}"))
        };
        let vec = |name: &str, n: usize| -> Result<Vec32> {
            let info = file.tensor(name).with_context(|| format!("{fname}: missing tensor {name}"))?;
            let ne: Vec<usize> = info.ne.iter().map(|&v| v as usize).collect();
            if ne != [n] {
                bail!("{fname}: tensor {name} has ne {ne:?}, expected [{n}]");
            }
            let data = crate::dequant::dequantize_tensor(file, info).with_context(|| format!("{fname}: dequantizing {name}"))?;
            let buf = gpu.upload(&data, &format!("{fname}: {name}"))?;
            let ptr = ptr(&buf, &gpu.stream);
            Ok(Vec32 { buf, ptr, len: n })
        };
        let (d, f, q, kv, v) = (cfg.n_embd, cfg.n_ff, cfg.q_dim(), cfg.kv_dim(), cfg.n_vocab);
        let token_embd = mat("token_embd.weight", d, v)?;
        let output_norm = vec("output_norm.weight", d)?;
        let output = if cfg.tied_embeddings { None } else { Some(mat("output.weight", d, v)?) };
        let mut layers = Vec::with_capacity(cfg.n_layer);
        for l in 0..cfg.n_layer {
            let b = |s: &str| format!("blk.{l}.{s}");
            let bias = |s: &str, n: usize| -> Result<Option<Vec32>> { cfg.qkv_bias.then(|| vec(&b(s), n)).transpose() };
            layers.push(GpuLayer {
                attn_norm: vec(&b("attn_norm.weight"), d)?,
                wq: mat(&b("attn_q.weight"), d, q)?,
                wk: mat(&b("attn_k.weight"), d, kv)?,
                wv: mat(&b("attn_v.weight"), d, kv)?,
                bq: bias("attn_q.bias", q)?,
                bk: bias("attn_k.bias", kv)?,
                bv: bias("attn_v.bias", kv)?,
                wo: mat(&b("attn_output.weight"), q, d)?,
                ffn_norm: vec(&b("ffn_norm.weight"), d)?,
                w_gate: mat(&b("ffn_gate.weight"), d, f)?,
                w_up: mat(&b("ffn_up.weight"), d, f)?,
                w_down: mat(&b("ffn_down.weight"), f, d)?,
            });
        }
        Ok(GpuWeights { token_embd, output_norm, output, layers })
    }
}
