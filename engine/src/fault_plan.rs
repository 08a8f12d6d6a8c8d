//! One fault plan: an injected [`Fault`] resolved once into what both backends consume, so that the
//! CPU reference and the CUDA backend plant a bug the same way.
//!
//! - [`OpParams`]: the forward pass's settings that an op fault may change (RMSNorm epsilon and
//!   accumulator, RoPE base and pairing, softmax scale, the attention faults, the residual, the
//!   activation, the KV cache), resolved once per pass; with no fault they are the model's own.
//! - [`WeightPlan`]: every GGUF tensor the graph reads ([`TensorSpec`]: where it goes, its name, the
//!   shape the configuration implies), each with the loader fault's [`Change`] to it, if any. Both
//!   loaders (cpu/weights.rs, cuda/weights.rs) load exactly these tensors and pass each changed one
//!   through [`TensorSpec::corrupt`], the one place a loader fault is applied.
//!
//! The buggy ops themselves (the CPU twins of the faulty kernels) are in [`crate::faults`].

use anyhow::{bail, Context, Result};

use crate::config::{ModelConfig, RopeStyle};
use crate::cpu::ops::Matrix;
use crate::cpu::weights::Weight;
use crate::faults::{dequant_q4k_min_sign, wrong_leading_dim, Fault};
use crate::gguf::{GgmlType, GgufFile, TensorInfo};

/// The bug classes the attention injects, uniform per launch: read by the CPU twins
/// ([`crate::faults::scores`]…) and passed to the kernels as their `fault` bits (named ATTN_* for
/// NVRTC by cuda::device::kernel_constants) and `window` argument (cuda::ops).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AttnFault {
    /// Every row sees all kv_len positions ([`Fault::CausalMaskMissing`]).
    pub no_causal_mask: bool,
    /// Softmax without max subtraction ([`Fault::SoftmaxNoMax`]).
    pub softmax_no_max: bool,
    /// Query head h reads KV head `h % Hkv` ([`Fault::GqaMapping`]).
    pub gqa_modulo: bool,
    /// A row sees only its last N visible positions ([`Fault::AttentionWindow`]); 0 = no window.
    pub window: u32,
}

impl AttnFault {
    /// The kernels' bit names and values, the one home of both.
    pub const BITS: [(&'static str, i32); 3] = [("ATTN_NO_CAUSAL_MASK", 1), ("ATTN_SOFTMAX_NO_MAX", 2), ("ATTN_GQA_MODULO", 4)];

    /// What `fault` asks of the attention kernels (all off for any other fault, or none).
    pub fn of(fault: Option<Fault>) -> Self {
        Self {
            no_causal_mask: fault == Some(Fault::CausalMaskMissing),
            softmax_no_max: fault == Some(Fault::SoftmaxNoMax),
            gqa_modulo: fault == Some(Fault::GqaMapping),
            window: match fault {
                Some(Fault::AttentionWindow(n)) => n,
                _ => 0,
            },
        }
    }

    /// The kernels' `fault` argument.
    pub fn bits(&self) -> i32 {
        let [mask, max, gqa] = Self::BITS.map(|b| b.1);
        (self.no_causal_mask as i32 * mask) | (self.softmax_no_max as i32 * max) | (self.gqa_modulo as i32 * gqa)
    }
}

/// The forward pass's settings that an injected fault may change, resolved once per pass by
/// [`OpParams::new`]; with no fault they are the model's own.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OpParams {
    /// RMSNorm epsilon (rmsnorm-eps, rmsnorm-eps-scaled)
    pub eps: f32,
    /// RMSNorm's Σx² saturating at f16's largest value (f16-accumulation)
    pub f16_sum: bool,
    /// RoPE base (rope-base, rope-base-scaled)
    pub rope_base: f32,
    /// base^(−2/n_rot), RoPE's angle step as the kernels take it
    pub theta_scale: f32,
    /// NeoX pairs (i, i + n_rot/2) for qwen2; adjacent pairs (2i, 2i + 1) else (rope-adjacent)
    pub neox: bool,
    /// softmax scale, 1/√Dh (softmax-scale: 1/Dh)
    pub scale: f32,
    /// the attention's fault switches and window (gqa-mapping, causal-mask-missing, softmax-no-max,
    /// attention-window-N)
    pub attn: AttnFault,
    /// the residual addition after attention (residual-dropped: off)
    pub residual: bool,
    /// GELU in place of SiLU in the gate (gelu-activation)
    pub gelu: bool,
    /// positions written by earlier calls read back as zeros (kv-cache-not-written)
    pub kv_stale: bool,
}

impl OpParams {
    /// The settings of a forward pass of the model `cfg` with `fault` injected.
    pub fn new(cfg: &ModelConfig, fault: Option<Fault>) -> Self {
        let (eps, f16_sum) = Self::rmsnorm(cfg.rms_eps, fault);
        let rope_base = match fault {
            Some(Fault::RopeBase) => 1e4,
            Some(Fault::RopeBaseScaled(f)) => (cfg.rope_base as f64 * f.0) as f32,
            _ => cfg.rope_base,
        };
        let scale = match fault {
            Some(Fault::SoftmaxScale) => 1.0 / cfg.head_dim as f32,
            _ => 1.0 / (cfg.head_dim as f32).sqrt(),
        };
        Self {
            eps,
            f16_sum,
            rope_base,
            theta_scale: rope_base.powf(-2.0 / cfg.n_rot as f32),
            neox: cfg.rope_style == RopeStyle::Neox && fault != Some(Fault::RopeAdjacent),
            scale,
            attn: AttnFault::of(fault),
            residual: fault != Some(Fault::ResidualDropped),
            gelu: Self::gelu(fault),
            kv_stale: fault == Some(Fault::KvCacheNotWritten),
        }
    }

    /// RMSNorm's epsilon and f16 accumulation under `fault`, for a model whose epsilon is `eps`.
    pub fn rmsnorm(eps: f32, fault: Option<Fault>) -> (f32, bool) {
        let eps = match fault {
            Some(Fault::RmsNormEps) => 1e-5,
            Some(Fault::RmsEpsScaled(f)) => (eps as f64 * f.0) as f32,
            _ => eps,
        };
        (eps, fault == Some(Fault::F16Accumulation))
    }

    /// Whether `fault` puts GELU in place of SiLU in the gated FFN.
    pub fn gelu(fault: Option<Fault>) -> bool {
        fault == Some(Fault::GeluActivation)
    }

    /// The RoPE pairing of [`Self::neox`].
    pub fn rope_style(&self) -> RopeStyle {
        if self.neox {
            RopeStyle::Neox
        } else {
            RopeStyle::Normal
        }
    }
}

/// Where a loaded tensor goes in a backend's weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Slot {
    TokenEmbd,
    OutputNorm,
    /// The output head (absent when tied to the embedding, unless a fault unties it).
    Output,
    Layer(usize, LayerTensor),
}

/// The tensors of one transformer block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LayerTensor {
    AttnNorm,
    Q,
    K,
    V,
    BiasQ,
    BiasK,
    BiasV,
    AttnOutput,
    FfnNorm,
    Gate,
    Up,
    Down,
}

impl Slot {
    /// The slot the GGUF tensor `name` is read into by its own name (`blk.3.attn_q.weight` →
    /// `Layer(3, Q)`); None for a tensor the graph does not read. (A tied model's untied output head
    /// reads `token_embd.weight` too: that name maps to [`Slot::TokenEmbd`].)
    pub fn of_gguf_name(name: &str) -> Option<Slot> {
        match name {
            "token_embd.weight" => return Some(Slot::TokenEmbd),
            "output_norm.weight" => return Some(Slot::OutputNorm),
            "output.weight" => return Some(Slot::Output),
            _ => {}
        }
        let (l, t) = name.strip_prefix("blk.")?.split_once('.')?;
        let layer = l.parse().ok()?;
        LayerTensor::ALL.into_iter().find(|lt| lt.gguf_name() == t).map(|lt| Slot::Layer(layer, lt))
    }
}

impl LayerTensor {
    pub const ALL: [LayerTensor; 12] = {
        use LayerTensor::*;
        [AttnNorm, Q, K, V, BiasQ, BiasK, BiasV, AttnOutput, FfnNorm, Gate, Up, Down]
    };

    /// The GGUF name after `blk.L.`.
    pub fn gguf_name(self) -> &'static str {
        use LayerTensor::*;
        match self {
            AttnNorm => "attn_norm.weight",
            Q => "attn_q.weight",
            K => "attn_k.weight",
            V => "attn_v.weight",
            BiasQ => "attn_q.bias",
            BiasK => "attn_k.bias",
            BiasV => "attn_v.bias",
            AttnOutput => "attn_output.weight",
            FfnNorm => "ffn_norm.weight",
            Gate => "ffn_gate.weight",
            Up => "ffn_up.weight",
            Down => "ffn_down.weight",
        }
    }
}

/// What a loader fault does to one tensor, as a buggy loader would.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Change {
    /// Read with the wrong leading dimension ([`crate::faults::wrong_leading_dim`]).
    WrongLeadingDim,
    /// Every value replaced by this one (a zeroed bias or projection, a norm weight of ones).
    Fill(f32),
    /// Only the first n rows kept (a width taken from the wrong dimension).
    FirstRows(usize),
    /// Only the first n columns of each row kept.
    FirstCols(usize),
    /// The file's Q4_K blocks dequantized with the minimum's sign flipped
    /// ([`crate::faults::dequant_q4k_min_sign`]).
    Q4kMinSign,
}

/// One GGUF tensor the graph reads.
#[derive(Debug, Clone)]
pub struct TensorSpec {
    pub slot: Slot,
    /// The GGUF tensor it is read from.
    pub name: String,
    /// The shape the configuration implies, in GGUF order (`ne[0]` contiguous): `[cols, rows]` for a
    /// matrix, `[n]` for a vector.
    pub ne: Vec<usize>,
    /// The loader fault's change to it.
    pub change: Option<Change>,
}

impl TensorSpec {
    /// The tensor in `file`, checked to exist with the expected shape.
    pub fn find<'f>(&self, file: &'f GgufFile) -> Result<&'f TensorInfo> {
        let (fname, name) = (file.display_name(), &self.name);
        let info = file.tensor(name).with_context(|| format!("{fname}: missing tensor {name}"))?;
        let got: Vec<usize> = info.ne.iter().map(|&v| v as usize).collect();
        if got != self.ne {
            bail!("{fname}: tensor {name} has ne {got:?}, the metadata implies {:?}", self.ne);
        }
        Ok(info)
    }

    /// The loaded tensor `w` (a matrix, or a vector as one row) with this spec's change applied, as
    /// both backends apply it; unchanged without one. A change that rewrites values makes a
    /// block-format weight f32 first ([`Weight::f32_mut`]); keeping the first rows keeps its blocks.
    pub fn corrupt(&self, file: &GgufFile, mut w: Weight) -> Result<Weight> {
        let Some(change) = self.change else { return Ok(w) };
        Ok(match change {
            Change::WrongLeadingDim => wrong_leading_dim(w.f32_mut()).into(),
            Change::Fill(v) => {
                w.f32_mut().data.fill(v);
                w
            }
            Change::FirstRows(n) => w.first_rows(n),
            Change::FirstCols(n) => {
                let m = w.f32_mut();
                let data: Vec<f32> = (0..m.rows).flat_map(|r| m.row(r)[..n].to_vec()).collect();
                Matrix { rows: m.rows, cols: n, data }.into()
            }
            Change::Q4kMinSign => {
                let (rows, cols) = (w.rows(), w.cols());
                let info = self.find(file)?;
                let data = dequant_q4k_min_sign(file.tensor_data(info), rows * cols)
                    .with_context(|| format!("{}: {} (q4k-min-sign)", file.display_name(), self.name))?;
                Matrix { rows, cols, data }.into()
            }
        })
    }

    /// [`Self::corrupt`] for a vector's values.
    pub fn corrupt_values(&self, file: &GgufFile, v: Vec<f32>) -> Result<Vec<f32>> {
        if self.change.is_none() {
            return Ok(v);
        }
        let n = v.len();
        match self.corrupt(file, Matrix { rows: 1, cols: n, data: v }.into())? {
            Weight::F32(m) => Ok(m.data),
            Weight::Blocks(_) => unreachable!("a vector is loaded as f32"),
        }
    }
}

/// Every tensor the graph reads, with the loader fault's changes, and the FFN width the graph then has.
#[derive(Debug, Clone)]
pub struct WeightPlan {
    /// In load order: token_embd, output_norm, output (if any), then each layer's.
    pub tensors: Vec<TensorSpec>,
    /// Transformer blocks: `blk.0` … `blk.{n_layer − 1}`.
    pub n_layer: usize,
    /// F, the FFN width of the loaded weights (ffn-size-wrong: n_embd).
    pub n_ff: usize,
}

impl WeightPlan {
    /// The tensors of the model `cfg` in `file` (read for the tensor types only), with `fault`'s
    /// changes; op faults and `None` change none.
    pub fn new(file: &GgufFile, cfg: &ModelConfig, fault: Option<Fault>) -> WeightPlan {
        let (d, f, q, kv, v) = (cfg.n_embd, cfg.n_ff, cfg.q_dim(), cfg.kv_dim(), cfg.n_vocab);
        let spec = |slot, name: &str, ne: Vec<usize>| TensorSpec { slot, name: name.into(), ne, change: None };
        let mut tensors = vec![spec(Slot::TokenEmbd, "token_embd.weight", vec![d, v]), spec(Slot::OutputNorm, "output_norm.weight", vec![d])];
        if !cfg.tied_embeddings {
            tensors.push(spec(Slot::Output, "output.weight", vec![d, v]));
        }
        for l in 0..cfg.n_layer {
            use LayerTensor::*;
            let mut layer = vec![(AttnNorm, vec![d]), (Q, vec![d, q]), (K, vec![d, kv]), (V, vec![d, kv])];
            if cfg.qkv_bias {
                layer.extend([(BiasQ, vec![q]), (BiasK, vec![kv]), (BiasV, vec![kv])]);
            }
            layer.extend([(AttnOutput, vec![q, d]), (FfnNorm, vec![d]), (Gate, vec![d, f]), (Up, vec![d, f]), (Down, vec![f, d])]);
            tensors.extend(layer.into_iter().map(|(t, ne)| spec(Slot::Layer(l, t), &format!("blk.{l}.{}", t.gguf_name()), ne)));
        }
        let mut plan = WeightPlan { tensors, n_layer: cfg.n_layer, n_ff: f };
        if let Some(fault) = fault {
            plan.plant(file, cfg, fault);
        }
        plan
    }

    /// Sets the changes of a loader fault (the others change nothing here).
    fn plant(&mut self, file: &GgufFile, cfg: &ModelConfig, fault: Fault) {
        use LayerTensor::*;
        let layer = |s: &TensorSpec| match s.slot {
            Slot::Layer(_, t) => Some(t),
            _ => None,
        };
        // A tied head read from the embedding table: a slot of its own, so that a change to one of the
        // two leaves the other as the file has it.
        let untied = |ch: Option<Change>| TensorSpec { slot: Slot::Output, name: "token_embd.weight".into(), ne: vec![cfg.n_embd, cfg.n_vocab], change: ch };
        match fault {
            Fault::WeightTransposed => self.set(|s| (layer(s) == Some(Q)).then_some(Change::WrongLeadingDim)),
            Fault::LmHeadTransposed if cfg.tied_embeddings => self.tensors.push(untied(Some(Change::WrongLeadingDim))),
            Fault::LmHeadTransposed => self.set(|s| (s.slot == Slot::Output).then_some(Change::WrongLeadingDim)),
            Fault::EmbeddingTransposed => {
                if cfg.tied_embeddings {
                    // the output head keeps reading the table correctly
                    self.tensors.push(untied(None));
                }
                self.set(|s| (s.slot == Slot::TokenEmbd).then_some(Change::WrongLeadingDim));
            }
            Fault::FfnSizeWrong => {
                // F = n_embd: the first n_embd rows of gate and up, the first n_embd columns of down
                let f = cfg.n_embd.min(cfg.n_ff);
                self.set(|s| match layer(s) {
                    Some(Gate | Up) => Some(Change::FirstRows(f)),
                    Some(Down) => Some(Change::FirstCols(f)),
                    _ => None,
                });
                self.n_ff = f;
            }
            Fault::ProjectionDropped => self.set(|s| (layer(s) == Some(Down)).then_some(Change::Fill(0.0))),
            Fault::QkvBiasZeroed => self.set(|s| matches!(layer(s), Some(BiasQ | BiasK | BiasV)).then_some(Change::Fill(0.0))),
            Fault::NormWeightIgnored => self.set(|s| (layer(s) == Some(AttnNorm)).then_some(Change::Fill(1.0))),
            Fault::Q4kMinSign => {
                let q4k = |s: &TensorSpec| s.ne.len() == 2 && file.tensor(&s.name).is_some_and(|t| t.ty == GgmlType::Q4_K);
                self.set(|s| q4k(s).then_some(Change::Q4kMinSign));
            }
            _ => {}
        }
    }

    fn set(&mut self, change: impl Fn(&TensorSpec) -> Option<Change>) {
        for s in &mut self.tensors {
            if let Some(c) = change(s) {
                s.change = Some(c);
            }
        }
    }
}

/// Rows `rows` of the tensor `t` as a backend loaded with `fault` holds them, where the fault is in
/// the format's dequantization itself (q4k-min-sign: every Q4_K matrix, [`Change::Q4kMinSign`]);
/// `None` where the backend's own dequantization applies.
pub fn faulty_dequant_rows(fault: Option<Fault>, file: &GgufFile, t: &TensorInfo, rows: std::ops::Range<usize>) -> Option<Result<Vec<f32>>> {
    if fault != Some(Fault::Q4kMinSign) || t.ty != GgmlType::Q4_K {
        return None;
    }
    let n = rows.len() * t.row_len() as usize;
    Some(
        crate::dequant::rows_bytes(file, t, rows)
            .map_err(anyhow::Error::from)
            .and_then(|b| dequant_q4k_min_sign(b, n))
            .with_context(|| format!("{}: {} (q4k-min-sign)", file.display_name(), t.name)),
    )
}

#[cfg(test)]
mod tests {
    use super::{LayerTensor, Slot};

    #[test]
    fn slots_are_found_by_their_gguf_names() {
        for l in [0, 7, 23] {
            for t in LayerTensor::ALL {
                assert_eq!(Slot::of_gguf_name(&format!("blk.{l}.{}", t.gguf_name())), Some(Slot::Layer(l, t)));
            }
        }
        assert_eq!(Slot::of_gguf_name("token_embd.weight"), Some(Slot::TokenEmbd));
        assert_eq!(Slot::of_gguf_name("output_norm.weight"), Some(Slot::OutputNorm));
        assert_eq!(Slot::of_gguf_name("output.weight"), Some(Slot::Output));
        for other in ["blk.x.attn_q.weight", "blk.3.attn_qkv.weight", "rope_freqs.weight", "blk.3"] {
            assert_eq!(Slot::of_gguf_name(other), None, "{other}");
        }
    }
}
