//! Fault injection: each bug class ([`BugClass`], docs/bug-classes.md) as a named [`Fault`] that one run
//! of the engine can switch on, so that lockstep's own tests prove the suite detects the class and names
//! where it shows (suites/faults/, tests/faults.rs).
//!
//! Architecture invariants:
//! - A fault is on only when a caller passes it explicitly ([`crate::cpu::CpuBackend::load_with_fault`],
//!   [`crate::model::Model::fault`], [`crate::sampler::Sampler::with_fault`], `lockstep validate
//!   --inject NAME`). No environment variable, file or default turns one on.
//! - A fault is resolved once ([`crate::fault_plan`]): into the forward pass's settings
//!   ([`crate::fault_plan::OpParams`]) and the loader's tensor changes ([`crate::fault_plan::WeightPlan`]),
//!   which the CPU and the CUDA backend both consume. Off, the settings are the model's own and the
//!   clean path calls the very same op functions (one branch per op).
//! - Each fault changes the operation where its class lives: loader faults corrupt the weights as a
//!   buggy loader would (at load, once), op faults replace one op of the graph by its buggy twin
//!   (below) or change its argument, the tokenizer faults change the model's prompt path, the
//!   sampler fault the sampler.
//!
//! The buggy twins live here rather than inside cpu/ops.rs so that the reference ops stay readable;
//! each is the reference op with the one mistake of its class, and each is called from the same
//! place of the graph (cpu/mod.rs) as the op it replaces. The CUDA kernels' faulty paths are tested
//! against them (engine/tests/cuda_kernels.rs).

use anyhow::Result;

use crate::cpu::attention::{self, AttnDims, KvCache};
use crate::cpu::ops::{self, Matrix};
use crate::fault_plan::{AttnFault, OpParams};

/// A multiplicative factor for the sensitivity probes, compared bit for bit (so that [`Fault`] is `Eq`).
#[derive(Debug, Clone, Copy)]
pub struct Factor(pub f64);

impl PartialEq for Factor {
    fn eq(&self, o: &Self) -> bool {
        self.0.to_bits() == o.0.to_bits()
    }
}
impl Eq for Factor {}

/// A class of bug an engine author meets in practice: what lockstep's localizer names (report.json's
/// `likely_class_id` is [`BugClass::id`]) and what each catalog [`Fault`] plants. The list with each
/// class's description, where it shows and its faults: docs/bug-classes.md (checked against this enum by
/// a test of the runner, src/localize.rs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BugClass {
    Tokenizer,
    Embedding,
    Rope,
    QkvBias,
    ProjectionWeight,
    AttentionScores,
    GqaMapping,
    KvCache,
    CausalMask,
    SoftmaxScale,
    AttnOutputProjection,
    ResidualAttn,
    RmsNorm,
    NormWeight,
    FfnSize,
    FfnWeight,
    Activation,
    FfnDown,
    ResidualFfn,
    LmHead,
    Overflow,
    LayerData,
    WrongShape,
    Sampling,
    DecodeKernel,
    /// A weight format dequantized unlike gguf-py (the `dequant` check: direct evidence).
    Dequantization,
    /// Attention limited to the last N positions (a sliding window misapplied, a wrapping cache).
    AttentionWindow,
}

impl BugClass {
    /// Every class, in graph order (tokens first, sampling last), then those a check names directly.
    pub const ALL: [BugClass; 27] = [
        BugClass::Tokenizer,
        BugClass::Embedding,
        BugClass::RmsNorm,
        BugClass::NormWeight,
        BugClass::ProjectionWeight,
        BugClass::QkvBias,
        BugClass::Rope,
        BugClass::AttentionScores,
        BugClass::GqaMapping,
        BugClass::KvCache,
        BugClass::CausalMask,
        BugClass::SoftmaxScale,
        BugClass::AttentionWindow,
        BugClass::AttnOutputProjection,
        BugClass::ResidualAttn,
        BugClass::FfnSize,
        BugClass::FfnWeight,
        BugClass::Activation,
        BugClass::FfnDown,
        BugClass::ResidualFfn,
        BugClass::LmHead,
        BugClass::Sampling,
        BugClass::Overflow,
        BugClass::LayerData,
        BugClass::WrongShape,
        BugClass::Dequantization,
        BugClass::DecodeKernel,
    ];

    /// The stable id written to reports (`rope`, `qkv_bias`, …): the serde spelling.
    pub fn id(self) -> &'static str {
        self.about().0
    }

    /// What goes wrong in an engine with this bug, one line.
    pub fn description(self) -> &'static str {
        self.about().1
    }

    /// Where it shows first: the tap (llama.cpp's name) or the check.
    pub fn shows(self) -> &'static str {
        self.about().2
    }

    /// The class with this id, if one.
    pub fn from_id(id: &str) -> Option<BugClass> {
        BugClass::ALL.into_iter().find(|c| c.id() == id)
    }

    fn about(self) -> (&'static str, &'static str, &'static str) {
        use BugClass::*;
        match self {
            Tokenizer => (
                "tokenizer",
                "the prompt's token ids differ from llama.cpp's: special tokens split into text pieces, the chat template wrong or skipped, a BOS added or dropped",
                "check `tokens`, before any tensor",
            ),
            Embedding => ("embedding", "the embedding lookup reads the wrong values (token_embd read column-wise, the wrong row)", "embd"),
            RmsNorm => ("rms_norm", "RMSNorm computed wrong: the epsilon not the file's, or the formula", "norm-L.rms_norm.0 (the unweighted norm), layer 0"),
            NormWeight => ("norm_weight", "a norm's weight ignored (taken as ones) or rescaled", "attn_norm-0, ffn_norm-0 or result_norm"),
            ProjectionWeight => (
                "projection_weight",
                "a Q/K/V projection weight transposed, read with the wrong leading dimension, or dequantized wrong",
                "Qcur-0.mul_mat (Kcur, Vcur), while attn_norm-0 agrees",
            ),
            QkvBias => ("qkv_bias", "the Q/K/V biases zeroed or not loaded (qwen2's are large)", "Qcur-0.add, Kcur-0.add (pre-RoPE)"),
            Rope => (
                "rope",
                "RoPE rotates the wrong pairs (adjacent on a NeoX model), with the wrong base, or at shifted positions",
                "Qcur-0.rope, Kcur-0.rope at positions ≥ 1 (position 0 is not rotated)",
            ),
            AttentionScores => ("attention_scores", "the attention scores differ while Q and K agree: the K layout, the head mapping or the cache", "kq-0"),
            GqaMapping => (
                "gqa_mapping",
                "query heads read the wrong KV head (q_head % n_kv instead of q_head / (n_head / n_kv))",
                "kq-0 or kqv-0: some heads agree, the others differ",
            ),
            KvCache => (
                "kv_cache",
                "the KV cache never written, or with the wrong layout or stride: decode steps read the wrong positions",
                "kq-0 at decode step 1 while the prefill agrees; check `kv_cache`",
            ),
            CausalMask => ("causal_mask", "no causal mask: prefill rows attend to later positions", "kq_soft_max-0, every row but the last"),
            SoftmaxScale => ("softmax_scale", "the softmax scale wrong (1/d instead of 1/√d, or none), or the softmax itself", "kq_soft_max-0 while kq-0 agrees"),
            AttentionWindow => (
                "attention_window",
                "attention limited to the last N positions: a sliding window misapplied, a KV cache that wraps at N",
                "kq_soft_max-0 from position N on (long-context goldens)",
            ),
            AttnOutputProjection => (
                "attn_output_projection",
                "the attention output projection dropped, transposed or dequantized wrong",
                "kqv_out-0 / attn_out-0, or ffn_inp-0 where the model has no attn_out tap",
            ),
            ResidualAttn => ("residual_attn", "the attention output not added back to the residual stream", "ffn_inp-0 while attn_out-0 agrees"),
            FfnSize => ("ffn_size", "the FFN width taken from the wrong dimension (n_embd instead of feed_forward_length)", "ffn_gate-0 / ffn_up-0 (their shape)"),
            FfnWeight => ("ffn_weight", "an FFN gate or up weight transposed or dequantized wrong", "ffn_gate / ffn_up while ffn_norm agrees"),
            Activation => (
                "activation",
                "the wrong activation in the gated FFN (GELU instead of SiLU, or SiLU instead of gemma3's GELU)",
                "ffn_swiglu-0 (gemma3: ffn_geglu-0) while ffn_gate-0 and ffn_up-0 agree",
            ),
            FfnDown => ("ffn_down", "the ffn_down projection dropped, transposed or dequantized wrong", "ffn_out while ffn_swiglu agrees"),
            ResidualFfn => ("residual_ffn", "the FFN output not added back to the residual stream", "l_out while ffn_out agrees"),
            LmHead => ("lm_head", "the output head's dimensions swapped, or a padded vocabulary not masked", "result_output, the only tensor that differs"),
            Sampling => ("sampling", "sampling in the wrong order or over the wrong set (top-k, top-p, temperature)", "check `sampler`"),
            Overflow => ("overflow", "NaN or Inf: an f16 accumulation overflows, a softmax without max subtraction", "the first tap holding NaN or Inf; check `invariants:non_finite`"),
            LayerData => (
                "layer_data",
                "a fault inside one layer with no formula to blame: an activation outlier overflowing a narrow (f16) accumulator, or that layer's weights",
                "the first failing tap of a layer > 0 while the layers before agree; check `isolated`",
            ),
            WrongShape => ("wrong_shape", "a tensor of the wrong shape", "the first tap of the wrong shape"),
            Dequantization => (
                "dequantization",
                "a weight format dequantized unlike gguf-py (e.g. the sign of a Q4_K block minimum)",
                "check `dequant:{TYPE}` (tensor and block), then the first product using that weight",
            ),
            DecodeKernel => (
                "decode_kernel",
                "the production decode path (fused or graph kernels) differs from the tapped path",
                "check `graph_decode` while every tap agrees",
            ),
        }
    }
}

impl std::fmt::Display for BugClass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.id())
    }
}

/// One bug class ([`BugClass`]) planted on purpose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    // Found in the engine that motivated lockstep (docs/bug-classes.md)
    WeightTransposed,
    LmHeadTransposed,
    EmbeddingTransposed,
    FfnSizeWrong,
    ProjectionDropped,
    KvCacheNotWritten,
    Q4kMinSign,
    SpecialTokensSplit,
    ChatTemplateSkipped,
    SamplerOrder,
    QkvBiasZeroed,
    RopeAdjacent,
    // Suspected there, or common elsewhere
    RopeBase,
    GqaMapping,
    CausalMaskMissing,
    SoftmaxScale,
    SoftmaxNoMax,
    RmsNormEps,
    NormWeightIgnored,
    GeluActivation,
    ResidualDropped,
    F16Accumulation,
    /// Attention limited to the last N positions (a sliding window where the model has none, or a KV
    /// length cut at N): the query at position p sees positions max(0, p − N + 1) ..= p. The catalog holds
    /// N = 80 and N = 512 ([`Fault::ALL`]); it shows only past N positions (the long-context goldens).
    AttentionWindow(u32),
    /// Sensitivity probe (not in [`Fault::ALL`]): RMSNorm epsilon multiplied by the factor.
    RmsEpsScaled(Factor),
    /// Sensitivity probe (not in [`Fault::ALL`]): RoPE base multiplied by the factor.
    RopeBaseScaled(Factor),
}

/// What the catalog says about one fault.
#[derive(Debug, Clone, Copy)]
pub struct FaultInfo {
    /// Stable kebab-case name (`--inject NAME`, suites/faults/NAME.toml).
    pub name: &'static str,
    /// One line: what the engine does wrong.
    pub description: &'static str,
    /// Where it shows (the class's [`BugClass::shows`], as our graph exports it).
    pub shows: &'static str,
    /// The class the localizer is to name for it.
    pub class: BugClass,
    /// The smallest golden model on which the class shows.
    pub model: &'static str,
}

const TINY: &str = "tiny-qwen2";
const QWEN: &str = "qwen2.5-coder-0.5b";
const SMOLLM2: &str = "smollm2-135m";

impl Fault {
    /// Every catalog fault (the sensitivity probes are not).
    pub const ALL: [Fault; 24] = [
        Fault::WeightTransposed,
        Fault::LmHeadTransposed,
        Fault::EmbeddingTransposed,
        Fault::FfnSizeWrong,
        Fault::ProjectionDropped,
        Fault::KvCacheNotWritten,
        Fault::Q4kMinSign,
        Fault::SpecialTokensSplit,
        Fault::ChatTemplateSkipped,
        Fault::SamplerOrder,
        Fault::QkvBiasZeroed,
        Fault::RopeAdjacent,
        Fault::RopeBase,
        Fault::GqaMapping,
        Fault::CausalMaskMissing,
        Fault::SoftmaxScale,
        Fault::SoftmaxNoMax,
        Fault::RmsNormEps,
        Fault::NormWeightIgnored,
        Fault::GeluActivation,
        Fault::ResidualDropped,
        Fault::F16Accumulation,
        Fault::AttentionWindow(80),
        Fault::AttentionWindow(512),
    ];

    pub fn info(self) -> FaultInfo {
        let i = |name, description, shows, model| FaultInfo { name, description, shows, class: self.class(), model };
        match self {
            Fault::WeightTransposed => i(
                "weight-transposed",
                "attn_q.weight read with the wrong leading dimension (W instead of Wᵀ), every layer",
                "the first tap after that matmul, layer 0 (Qcur-0.mul_mat)",
                TINY,
            ),
            Fault::LmHeadTransposed => i("lm-head-transposed", "output.weight read as [hidden, vocab] the wrong way", "result_output", TINY),
            Fault::EmbeddingTransposed => i("embedding-transposed", "token_embd read column-wise", "embd", TINY),
            Fault::FfnSizeWrong => i("ffn-size-wrong", "FFN width taken from n_embd instead of feed_forward_length", "ffn_gate / ffn_up, layer 0", TINY),
            Fault::ProjectionDropped => i("projection-dropped", "ffn_down weight missing: the projection outputs zeros", "ffn_out, layer 0", TINY),
            Fault::KvCacheNotWritten => i(
                "kv-cache-not-written",
                "positions of earlier calls read back as zeros (the batch's own K/V are used, so prefill passes)",
                "kq at decode step 1, layer 0",
                TINY,
            ),
            Fault::Q4kMinSign => i(
                "q4k-min-sign",
                "Q4_K dequantization adds the block minimum instead of subtracting it",
                "the first tap after the first Q4_K matmul (tiny-qwen2: attn_q of layer 0)",
                TINY,
            ),
            Fault::SpecialTokensSplit => i(
                "special-tokens-split",
                "the prompt is tokenized with parse_special off: <|im_start|> becomes text pieces",
                "token ids, before any tensor",
                TINY,
            ),
            Fault::ChatTemplateSkipped => {
                i("chat-template-skipped", "chat messages joined as plain text instead of rendered with the chat template", "token ids", TINY)
            }
            Fault::SamplerOrder => i("sampler-order", "temperature applied before top-p (top-p on tempered logits)", "the sampler distribution test", TINY),
            Fault::QkvBiasZeroed => i("qkv-bias-zeroed", "Q/K/V biases zeroed by the loader", "Qcur-0 / Kcur-0 pre-RoPE (Qcur-0.add)", TINY),
            Fault::RopeAdjacent => i("rope-adjacent", "RoPE rotates adjacent pairs (2i, 2i+1) on a NeoX model", "Qcur-0 after RoPE at positions ≥ 1", TINY),
            Fault::RopeBase => i("rope-base", "RoPE base 1e4 instead of the file's", "Qcur after RoPE, positions ≥ 1", TINY),
            Fault::GqaMapping => i(
                "gqa-mapping",
                "kv head = q_head % n_kv instead of q_head / (n_head / n_kv)",
                "kqv_out-0 (our graph: kq-0, the first tensor that uses the mapping)",
                TINY,
            ),
            Fault::CausalMaskMissing => i("causal-mask-missing", "prefill rows attend to later positions", "kq_soft_max-0, every row but the last", TINY),
            Fault::SoftmaxScale => i("softmax-scale", "attention scores scaled by 1/d instead of 1/√d", "kq_soft_max-0", TINY),
            Fault::SoftmaxNoMax => i(
                "softmax-no-max",
                "softmax without max subtraction (exp overflows to inf, inf/inf = NaN)",
                "kq_soft_max, NaN check (needs qwen's large scores)",
                QWEN,
            ),
            Fault::RmsNormEps => {
                i("rmsnorm-eps", "RMSNorm epsilon 1e-5 instead of the file's", "attn_norm-0 (exact tier; our first tap: norm-0.rms_norm.0)", TINY)
            }
            Fault::NormWeightIgnored => i("norm-weight-ignored", "attn_norm weight ignored (treated as ones)", "attn_norm-0", TINY),
            Fault::GeluActivation => i("gelu-activation", "GELU instead of SiLU in SwiGLU", "ffn_swiglu-0", TINY),
            Fault::ResidualDropped => i("residual-dropped", "attention output not added back to the residual stream", "ffn_inp-0", TINY),
            Fault::F16Accumulation => i(
                "f16-accumulation",
                "RMSNorm's sum of squares saturates at 65504 (f16 accumulator overflow)",
                "the layer where the outlier appears (qwen: l_out-3 holds a 760 outlier, Σx² = 6.3e5)",
                QWEN,
            ),
            Fault::AttentionWindow(80) => i(
                "attention-window-80",
                "attention sees only the last 80 positions (a sliding window or KV length of 80)",
                "kq_soft_max-0 at position 80 (the long-context goldens: the first position that loses one)",
                SMOLLM2,
            ),
            Fault::AttentionWindow(512) => i(
                "attention-window-512",
                "attention sees only the last 512 positions (a sliding window or KV length of 512)",
                "kq_soft_max-0 at position 512 (the long-context goldens)",
                SMOLLM2,
            ),
            Fault::AttentionWindow(_) => i("attention-window", "attention sees only the last N positions", "kq_soft_max-0 at position N", SMOLLM2),
            Fault::RmsEpsScaled(_) => i("rmsnorm-eps-scaled", "RMSNorm epsilon multiplied by a factor (sensitivity probe)", "norm-0.rms_norm.0", TINY),
            Fault::RopeBaseScaled(_) => i("rope-base-scaled", "RoPE base multiplied by a factor (sensitivity probe)", "Qcur-0.rope", TINY),
        }
    }

    pub fn name(self) -> &'static str {
        self.info().name
    }

    /// The class of bug the fault plants, as the localizer is to name it.
    pub fn class(self) -> BugClass {
        use BugClass as C;
        match self {
            Fault::WeightTransposed => C::ProjectionWeight,
            Fault::LmHeadTransposed => C::LmHead,
            Fault::EmbeddingTransposed => C::Embedding,
            Fault::FfnSizeWrong => C::FfnSize,
            Fault::ProjectionDropped => C::FfnDown,
            Fault::KvCacheNotWritten => C::KvCache,
            Fault::Q4kMinSign => C::Dequantization,
            Fault::SpecialTokensSplit | Fault::ChatTemplateSkipped => C::Tokenizer,
            Fault::SamplerOrder => C::Sampling,
            Fault::QkvBiasZeroed => C::QkvBias,
            Fault::RopeAdjacent | Fault::RopeBase | Fault::RopeBaseScaled(_) => C::Rope,
            Fault::GqaMapping => C::GqaMapping,
            Fault::CausalMaskMissing => C::CausalMask,
            Fault::SoftmaxScale => C::SoftmaxScale,
            Fault::SoftmaxNoMax => C::Overflow,
            Fault::RmsNormEps | Fault::RmsEpsScaled(_) => C::RmsNorm,
            Fault::NormWeightIgnored => C::NormWeight,
            Fault::GeluActivation => C::Activation,
            Fault::ResidualDropped => C::ResidualAttn,
            // An f16 accumulator saturating on qwen's activation outlier: a layer-data fault (no NaN).
            Fault::F16Accumulation => C::LayerData,
            Fault::AttentionWindow(_) => C::AttentionWindow,
        }
    }

    /// The catalog fault with this name ([`Fault::ALL`] only; the probes have no name to inject).
    pub fn from_name(name: &str) -> Option<Fault> {
        Fault::ALL.into_iter().find(|f| f.name() == name)
    }

    /// Whether the fault is applied to the weights at load (needs [`crate::cpu::CpuBackend::load_with_fault`]
    /// or `crate::cuda::CudaBackend::load_with_fault`).
    pub fn at_load(self) -> bool {
        matches!(
            self,
            Fault::WeightTransposed
                | Fault::LmHeadTransposed
                | Fault::EmbeddingTransposed
                | Fault::FfnSizeWrong
                | Fault::ProjectionDropped
                | Fault::Q4kMinSign
                | Fault::QkvBiasZeroed
                | Fault::NormWeightIgnored
        )
    }
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fault::RmsEpsScaled(x) | Fault::RopeBaseScaled(x) => write!(f, "{}×{}", self.name(), x.0),
            _ => f.write_str(self.name()),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Loader faults: what a buggy loader computes. Which tensor each fault changes, and how, is planned
// in crate::fault_plan (WeightPlan, Change), which both backends' loaders apply.

/// `m` (`[rows][cols]`) read with the wrong leading dimension: element (r, c) taken from
/// `data[c·rows + r]`, i.e. the bytes read column-major. Same shape, wrong values.
pub(crate) fn wrong_leading_dim(m: &Matrix) -> Matrix {
    let mut data = vec![0.0f32; m.data.len()];
    for r in 0..m.rows {
        for c in 0..m.cols {
            data[r * m.cols + c] = m.data[c * m.rows + r];
        }
    }
    Matrix { rows: m.rows, cols: m.cols, data }
}

/// Q4_K blocks (256 values in 144 bytes: d, dmin, 12 bytes of 6-bit scales/mins, 128 bytes of
/// nibbles) dequantized as dequant.rs does, with the class's mistake: `+ dmin·m` instead of `− dmin·m`.
/// Hand-written on purpose: it is the bug.
pub fn dequant_q4k_min_sign(bytes: &[u8], n: usize) -> Result<Vec<f32>> {
    const QK: usize = 256;
    const BS: usize = 144;
    anyhow::ensure!(n.is_multiple_of(QK) && bytes.len() == n / QK * BS, "Q4_K: {} bytes for {n} values", bytes.len());
    let f16 = |b: &[u8], o: usize| half::f16::from_le_bytes([b[o], b[o + 1]]).to_f32();
    let mut y = vec![0.0f32; n];
    for (b, out) in bytes.chunks_exact(BS).zip(y.chunks_exact_mut(QK)) {
        let (d, dmin) = (f16(b, 0), f16(b, 2));
        let s = &b[4..16];
        let (mut sc, mut mn) = ([0u8; 8], [0u8; 8]);
        for j in 0..4 {
            sc[j] = s[j] & 0x3F;
            mn[j] = s[j + 4] & 0x3F;
            sc[j + 4] = (s[j + 8] & 0x0F) | ((s[j] >> 2) & 0x30);
            mn[j + 4] = (s[j + 8] >> 4) | ((s[j + 4] >> 2) & 0x30);
        }
        let qs = &b[16..144];
        for c in 0..4 {
            for h in 0..2 {
                let j = 2 * c + h;
                let (dl, ml) = (d * sc[j] as f32, dmin * mn[j] as f32);
                for l in 0..32 {
                    let q = (qs[32 * c + l] >> (4 * h)) & 0x0F;
                    out[32 * j + l] = dl * q as f32 + ml; // the fault: the minimum's sign
                }
            }
        }
    }
    Ok(y)
}

// ---------------------------------------------------------------------------------------------
// Op faults: each function is an op of the CPU graph (cpu/mod.rs) under the pass's settings
// (crate::fault_plan::OpParams), with its fault's mistake when the settings say so; with the
// model's own settings it calls the reference op. Faults that only change an op's argument (the
// epsilon's value, RoPE's base and pairing, the softmax scale) need no twin: the graph passes
// OpParams' value to the reference op.

/// RMSNorm (ops::rmsnorm) with epsilon `eps`, its Σx² accumulated in f16 when `f16_sum`.
pub fn norm(x: &[f32], width: usize, eps: f32, f16_sum: bool) -> Vec<f32> {
    if f16_sum {
        rmsnorm_f16_sum(x, width, eps)
    } else {
        ops::rmsnorm(x, width, eps)
    }
}

/// Largest finite f16.
pub const F16_MAX: f32 = 65504.0;

/// RMSNorm whose sum of squares saturates at 65504, as an f16 accumulator does. Only the overflow is
/// simulated, not f16's coarse rounding (that would show at the first norm of layer 0, a different
/// class): the squares are non-negative, so a saturating running sum ends at min(Σx², 65504), and
/// rows whose Σx² stays below it are bit-identical to ops::rmsnorm (same f64 sum as ggml).
fn rmsnorm_f16_sum(x: &[f32], width: usize, eps: f32) -> Vec<f32> {
    let mut y = vec![0.0f32; x.len()];
    for (xr, yr) in x.chunks_exact(width).zip(y.chunks_exact_mut(width)) {
        let scale = ops::rms_scale(ops::sum_sq(xr).min(F16_MAX as f64), width, eps);
        for (o, &v) in yr.iter_mut().zip(xr) {
            *o = v * scale;
        }
    }
    y
}

/// The KV-cache read of [`OpParams::kv_stale`] (kv-cache-not-written): the positions written by
/// earlier calls read as zeros. An owned copy of zeros for `0..n_past`, then the batch's own rows `k`,
/// `v` (`[T][Hkv·Dh]`), in place of attention::kv_read's.
pub fn kv_stale(cache: &KvCache, n_past: usize, k: &[f32], v: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let mut kc = vec![0.0f32; n_past * cache.row];
    let mut vc = kc.clone();
    kc.extend_from_slice(k);
    vc.extend_from_slice(v);
    (kc, vc)
}

/// Every attention score (attention::attn_scores), or with the modulo GQA mapping.
pub fn scores(f: AttnFault, q: &[f32], k: &[f32], d: &AttnDims) -> Vec<f32> {
    if !f.gqa_modulo {
        return attention::attn_scores(q, k, d);
    }
    let (t_n, kv, hd) = (d.n_tokens, d.kv_len(), d.head_dim);
    let mut kq = vec![0.0f32; d.n_head * t_n * kv];
    for h in 0..d.n_head {
        let hk = h % d.n_head_kv; // the fault
        for t in 0..t_n {
            let qv = &q[(t * d.n_head + h) * hd..(t * d.n_head + h + 1) * hd];
            for j in 0..kv {
                let kr = &k[(j * d.n_head_kv + hk) * hd..(j * d.n_head_kv + hk + 1) * hd];
                kq[(h * t_n + t) * kv + j] = ops::dot(kr, qv);
            }
        }
    }
    kq
}

/// Causal softmax (attention::attn_softmax), or without the mask, or without max subtraction, or
/// limited to the last N positions.
pub fn softmax(f: AttnFault, kq: &[f32], scale: f32, d: &AttnDims) -> Vec<f32> {
    if !(f.no_causal_mask || f.softmax_no_max || f.window > 0) {
        return attention::attn_softmax(kq, scale, d);
    }
    let kv = d.kv_len();
    let row = |r: usize, s: &[f32]| -> Vec<f32> {
        let causal = d.n_past + r % d.n_tokens + 1;
        if f.no_causal_mask {
            ops::softmax_row(s, scale, kv)
        } else if f.window > 0 {
            softmax_row_window(s, scale, causal, f.window as usize)
        } else {
            softmax_row_no_max(s, scale, causal)
        }
    };
    kq.chunks(kv).enumerate().flat_map(|(r, s)| row(r, s)).collect()
}

/// ops::softmax_row over positions `causal − window .. causal` only (all of `0..causal` when it is
/// shorter than the window): earlier positions get probability 0, as if they had left the cache. Rows
/// within the window are bit-identical to ops::softmax_row's.
fn softmax_row_window(x: &[f32], scale: f32, causal: usize, window: usize) -> Vec<f32> {
    let lo = causal.saturating_sub(window);
    let mut y = vec![0.0f32; lo];
    y.extend(ops::softmax_row(&x[lo..], scale, causal - lo));
    y
}

/// ops::softmax_row without subtracting the maximum: `exp(x·scale)` overflows to inf past ~88.7.
fn softmax_row_no_max(x: &[f32], scale: f32, n_valid: usize) -> Vec<f32> {
    let mut sum = 0.0f32;
    let mut y: Vec<f32> = x
        .iter()
        .enumerate()
        .map(|(j, &v)| {
            let e = if j < n_valid { (v * scale).exp() } else { 0.0 };
            sum += e;
            e
        })
        .collect();
    for v in &mut y {
        *v /= sum;
    }
    y
}

/// Weighted values (attention::attn_values), or with the modulo GQA mapping.
pub fn values(f: AttnFault, p: &[f32], v: &[f32], d: &AttnDims) -> Vec<f32> {
    if !f.gqa_modulo {
        return attention::attn_values(p, v, d);
    }
    let (t_n, kv, hd, nh, nkv) = (d.n_tokens, d.kv_len(), d.head_dim, d.n_head, d.n_head_kv);
    let mut out = vec![0.0f32; t_n * nh * hd];
    for t in 0..t_n {
        for h in 0..nh {
            let hk = h % nkv; // the fault
            for e in 0..hd {
                out[(t * nh + h) * hd + e] = (0..kv).map(|j| p[(h * t_n + t) * kv + j] * v[(j * nkv + hk) * hd + e]).sum();
            }
        }
    }
    out
}

/// The gated FFN's activation: SwiGLU (ops::swiglu), or GELU(gate)·up when `gelu`.
pub fn activation(gelu: bool, gate: &[f32], up: &[f32]) -> Vec<f32> {
    if !gelu {
        return ops::swiglu(gate, up);
    }
    // tanh approximation of GELU, as ggml_gelu
    const C: f32 = 0.797_884_6; // √(2/π)
    gate.iter().zip(up).map(|(&g, &u)| 0.5 * g * (1.0 + (C * (g + 0.044715 * g * g * g)).tanh()) * u).collect()
}

// The ops above with a fault named directly, resolved by OpParams as the graph resolves it: the CPU
// twins of the faulty kernels in engine/tests/cuda_kernels.rs.

/// [`norm`] under `fault` for a model whose epsilon is `eps`.
pub fn rmsnorm(fault: Option<Fault>, x: &[f32], width: usize, eps: f32) -> Vec<f32> {
    let (eps, f16_sum) = OpParams::rmsnorm(eps, fault);
    norm(x, width, eps, f16_sum)
}

/// [`scores`] under `fault`.
pub fn attn_scores(fault: Option<Fault>, q: &[f32], k: &[f32], d: &AttnDims) -> Vec<f32> {
    scores(AttnFault::of(fault), q, k, d)
}

/// [`softmax`] under `fault`.
pub fn attn_softmax(fault: Option<Fault>, kq: &[f32], scale: f32, d: &AttnDims) -> Vec<f32> {
    softmax(AttnFault::of(fault), kq, scale, d)
}

/// [`values`] under `fault`.
pub fn attn_values(fault: Option<Fault>, p: &[f32], v: &[f32], d: &AttnDims) -> Vec<f32> {
    values(AttnFault::of(fault), p, v, d)
}

/// [`activation`] under `fault`.
pub fn swiglu(fault: Option<Fault>, gate: &[f32], up: &[f32]) -> Vec<f32> {
    activation(OpParams::gelu(fault), gate, up)
}

/// The prompt text with the chat template skipped: the messages' contents, one per line.
pub fn chat_without_template(msgs: &[crate::chat::ChatMessage]) -> String {
    msgs.iter().map(|m| m.content.as_str()).collect::<Vec<_>>().join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_kebab_and_round_trip() {
        let mut seen = std::collections::HashSet::new();
        for f in Fault::ALL {
            let n = f.name();
            assert!(n.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'), "{n}");
            assert!(seen.insert(n), "duplicate {n}");
            assert_eq!(Fault::from_name(n), Some(f));
            assert!(!f.info().description.is_empty() && !f.info().shows.is_empty());
        }
        assert_eq!(Fault::from_name("rmsnorm-eps-scaled"), None);
        assert_eq!(Fault::from_name("nope"), None);
    }

    #[test]
    fn wrong_leading_dim_reads_column_major() {
        let m = Matrix { rows: 2, cols: 3, data: vec![0., 1., 2., 3., 4., 5.] };
        assert_eq!(wrong_leading_dim(&m).data, vec![0., 2., 4., 1., 3., 5.]);
    }

    #[test]
    fn off_is_the_reference_op() {
        let x: Vec<f32> = (0..16).map(|i| i as f32 * 0.3 - 2.0).collect();
        assert_eq!(rmsnorm(None, &x, 8, 1e-6), ops::rmsnorm(&x, 8, 1e-6));
        assert_eq!(swiglu(None, &x, &x), ops::swiglu(&x, &x));
        assert_ne!(swiglu(Some(Fault::GeluActivation), &x, &x), ops::swiglu(&x, &x));
        let d = AttnDims { n_tokens: 2, n_past: 0, n_head: 4, n_head_kv: 2, head_dim: 2 };
        assert_eq!(attn_softmax(None, &x, 0.5, &d), attention::attn_softmax(&x, 0.5, &d));
        // without max subtraction, large scores give NaN
        let big = vec![1000.0f32; 16];
        assert!(attn_softmax(Some(Fault::SoftmaxNoMax), &big, 1.0, &d).iter().any(|v| v.is_nan()));
        // the f16 accumulator saturates
        let y = rmsnorm(Some(Fault::F16Accumulation), &[300.0, 0.0], 2, 0.0);
        assert!((y[0] - 300.0 / (F16_MAX / 2.0).sqrt()).abs() < 1e-3, "{y:?}");
        // below the f16 range it is the reference op, bit for bit
        assert_eq!(rmsnorm(Some(Fault::F16Accumulation), &x, 8, 1e-6), ops::rmsnorm(&x, 8, 1e-6));
    }

    #[test]
    fn attention_window_drops_positions_before_the_window() {
        // one head, a prefill of 5 tokens: row t sees positions max(0, t − 1) ..= t with a window of 2
        let d = AttnDims { n_tokens: 5, n_past: 0, n_head: 1, n_head_kv: 1, head_dim: 1 };
        let kq: Vec<f32> = (0..25).map(|i| (i % 7) as f32 * 0.5).collect();
        let clean = attention::attn_softmax(&kq, 1.0, &d);
        let w = attn_softmax(Some(Fault::AttentionWindow(2)), &kq, 1.0, &d);
        assert_eq!(w[..10], clean[..10], "rows 0 and 1 fit in the window: unchanged, bit for bit");
        for t in 2..5 {
            let row = &w[t * 5..(t + 1) * 5];
            assert!(row[..t - 1].iter().all(|&p| p == 0.0), "row {t}: {row:?}");
            assert!(row[t - 1] > 0.0 && row[t] > 0.0 && row[t + 1..].iter().all(|&p| p == 0.0), "row {t}: {row:?}");
            assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        }
        // a decode step at position 4 (n_past 4, kv_len 5): the same as the prefill's last row
        let d1 = AttnDims { n_tokens: 1, n_past: 4, n_head: 1, n_head_kv: 1, head_dim: 1 };
        assert_eq!(attn_softmax(Some(Fault::AttentionWindow(2)), &kq[20..], 1.0, &d1), w[20..]);
        // a window as long as the context changes nothing
        assert_eq!(attn_softmax(Some(Fault::AttentionWindow(5)), &kq, 1.0, &d), clean);
        assert_eq!(Fault::from_name("attention-window-80"), Some(Fault::AttentionWindow(80)));
        assert_eq!(Fault::from_name("attention-window-512"), Some(Fault::AttentionWindow(512)));
    }
}
