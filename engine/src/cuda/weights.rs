//! The model's weights on the GPU, each matrix in its GGUF format (dequantized in registers by the
//! kernels); norm weights and biases as f32. Shapes are checked against the configuration exactly
//! as the CPU backend's loader does.

use anyhow::{bail, Context, Result};
use cudarc::driver::CudaSlice;

use super::device::{ptr, Gpu};
use super::ops::QMat;
use crate::config::ModelConfig;
use crate::cpu::ops::Matrix;
use crate::faults::{self, Fault};
use crate::gguf::{GgmlType, GgufFile};

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
        Self::load_with_fault(gpu, file, cfg, None)
    }

    /// [`Self::load`] with a loader fault of crate::faults applied as the CPU loader applies it
    /// (faults::corrupt_weights): an affected matrix is dequantized on the host, corrupted and
    /// uploaded as F32. With `FfnSizeWrong` the caller sets `cfg.n_ff` to [`ffn_size_wrong`] after.
    /// Other faults upload the file's bytes unchanged.
    pub fn load_with_fault(gpu: &Gpu, file: &GgufFile, cfg: &ModelConfig, fault: Option<Fault>) -> Result<GpuWeights> {
        let fname = file.display_name();
        let ff_wrong = ffn_size_wrong(cfg);
        let mat = |name: &str, cols: usize, rows: usize| -> Result<QMat> {
            let info = file.tensor(name).with_context(|| format!("{fname}: missing tensor {name}"))?;
            let ne: Vec<usize> = info.ne.iter().map(|&v| v as usize).collect();
            if ne != [cols, rows] {
                bail!("{fname}: tensor {name} has ne {ne:?}, the metadata implies {:?}", [cols, rows]);
            }
            let what = format!("{fname}: {name}");
            let dq = || -> Result<Matrix> {
                let data = crate::dequant::dequantize_tensor(file, info).with_context(|| format!("{fname}: dequantizing {name}"))?;
                Ok(Matrix { rows, cols, data })
            };
            let bad: Option<Matrix> = match fault {
                Some(Fault::WeightTransposed) if name.ends_with(".attn_q.weight") => Some(faults::wrong_leading_dim(&dq()?)),
                Some(Fault::ProjectionDropped) if name.ends_with(".ffn_down.weight") => Some(Matrix { rows, cols, data: vec![0.0; rows * cols] }),
                Some(Fault::FfnSizeWrong) if name.ends_with(".ffn_gate.weight") || name.ends_with(".ffn_up.weight") => {
                    // the first n_embd rows
                    let mut m = dq()?;
                    m.data.truncate(ff_wrong * cols);
                    Some(Matrix { rows: ff_wrong, cols, data: m.data })
                }
                Some(Fault::FfnSizeWrong) if name.ends_with(".ffn_down.weight") => {
                    // the first n_embd columns
                    let m = dq()?;
                    let data: Vec<f32> = (0..rows).flat_map(|r| m.data[r * cols..r * cols + ff_wrong].to_vec()).collect();
                    Some(Matrix { rows, cols: ff_wrong, data })
                }
                Some(Fault::Q4kMinSign) if info.ty == GgmlType::Q4_K => {
                    let data = faults::dequant_q4k_min_sign(file.tensor_data(info), rows * cols).with_context(|| format!("{what} (q4k-min-sign)"))?;
                    Some(Matrix { rows, cols, data })
                }
                _ => None,
            };
            match bad {
                Some(m) => upload_f32(gpu, &m, &what),
                None => QMat::upload(gpu, info.ty, rows, cols, file.tensor_data(info), &what),
            }
        };
        let vec = |name: &str, n: usize| -> Result<Vec32> {
            let info = file.tensor(name).with_context(|| format!("{fname}: missing tensor {name}"))?;
            let ne: Vec<usize> = info.ne.iter().map(|&v| v as usize).collect();
            if ne != [n] {
                bail!("{fname}: tensor {name} has ne {ne:?}, expected [{n}]");
            }
            let mut data = crate::dequant::dequantize_tensor(file, info).with_context(|| format!("{fname}: dequantizing {name}"))?;
            match fault {
                Some(Fault::QkvBiasZeroed) if name.ends_with("_q.bias") || name.ends_with("_k.bias") || name.ends_with("_v.bias") => data.fill(0.0),
                Some(Fault::NormWeightIgnored) if name.ends_with(".attn_norm.weight") => data.fill(1.0),
                _ => {}
            }
            let buf = gpu.upload(&data, &format!("{fname}: {name}"))?;
            let ptr = ptr(&buf, &gpu.stream);
            Ok(Vec32 { buf, ptr, len: n })
        };
        let (d, f, q, kv, v) = (cfg.n_embd, cfg.n_ff, cfg.q_dim(), cfg.kv_dim(), cfg.n_vocab);
        let mut token_embd = mat("token_embd.weight", d, v)?;
        let output_norm = vec("output_norm.weight", d)?;
        let mut output = if cfg.tied_embeddings { None } else { Some(mat("output.weight", d, v)?) };
        // the head faults: read [V][D] column-major (a tied head stays correct when only the
        // embedding lookup is wrong, as in faults::corrupt_weights)
        let head_name = if cfg.tied_embeddings { "token_embd.weight" } else { "output.weight" };
        let wrong = |name: &str| -> Result<QMat> {
            let info = file.tensor(name).with_context(|| format!("{fname}: missing tensor {name}"))?;
            let data = crate::dequant::dequantize_tensor(file, info).with_context(|| format!("{fname}: dequantizing {name}"))?;
            upload_f32(gpu, &faults::wrong_leading_dim(&Matrix { rows: v, cols: d, data }), &format!("{fname}: {name} (transposed)"))
        };
        match fault {
            Some(Fault::LmHeadTransposed) => output = Some(wrong(head_name)?),
            Some(Fault::EmbeddingTransposed) => {
                if output.is_none() {
                    output = Some(mat("token_embd.weight", d, v)?);
                }
                token_embd = wrong("token_embd.weight")?;
            }
            _ => {}
        }
        let mut layers = Vec::with_capacity(cfg.n_layer);
        for l in 0..cfg.n_layer {
            let b = |s: &str| format!("blk.{l}.{s}");
            let bias = |s: &str, n: usize| -> Result<Option<Vec32>> { cfg.qkv_bias.then(|| vec(&b(s), n)).transpose() };
            let ff = if fault == Some(Fault::FfnSizeWrong) { ff_wrong } else { f };
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
            debug_assert!(layers[l].w_gate.rows == ff && layers[l].w_down.cols == ff);
        }
        Ok(GpuWeights { token_embd, output_norm, output, layers })
    }
}

/// The FFN width of the ffn-size-wrong fault: n_embd (capped at the file's), as faults::corrupt_weights.
pub fn ffn_size_wrong(cfg: &ModelConfig) -> usize {
    cfg.n_embd.min(cfg.n_ff)
}

/// Uploads an f32 matrix `[rows][cols]` as an F32 [`QMat`] (a fault-corrupted weight).
fn upload_f32(gpu: &Gpu, m: &Matrix, what: &str) -> Result<QMat> {
    let bytes: Vec<u8> = m.data.iter().flat_map(|v| v.to_le_bytes()).collect();
    QMat::upload(gpu, GgmlType::F32, m.rows, m.cols, &bytes, what)
}
