//! Architecture hyper-parameters, read from GGUF metadata and tensor shapes only (no per-model
//! constants). Supported architectures: `llama` and `qwen2` (the two graphs the CPU backend builds).

use crate::gguf::{GgufError, GgufFile};

/// How RoPE pairs the dimensions of a head (llama.cpp's `llama_rope_type`, per architecture in
/// `llama_model_rope_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// LLAMA_ROPE_TYPE_NORM: adjacent pairs (2i, 2i+1). llama.
    Normal,
    /// LLAMA_ROPE_TYPE_NEOX: pairs (i, i + n_rot/2). qwen2.
    Neox,
}

/// The architecture's graph, as far as the CPU backend distinguishes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Qwen2,
}

impl Arch {
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "llama" => Some(Arch::Llama),
            "qwen2" => Some(Arch::Qwen2),
            _ => None,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
        }
    }
    /// llama.cpp's rope type for the architecture (src/llama-model.cpp `llama_model_rope_type`).
    pub fn rope_style(self) -> RopeStyle {
        match self {
            Arch::Llama => RopeStyle::Normal,
            Arch::Qwen2 => RopeStyle::Neox,
        }
    }
    /// Whether llama.cpp's graph names the attention output projection `attn_out` (src/models/llama.cpp
    /// does; src/models/qwen2.cpp leaves it an unnamed node).
    pub fn names_attn_out(self) -> bool {
        matches!(self, Arch::Llama)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: {source}")]
    Meta { file: String, source: GgufError },
    #[error("{file}: architecture `{arch}` is not supported (supported: llama, qwen2)")]
    UnsupportedArch { file: String, arch: String },
    #[error("{file}: {what}")]
    Invalid { file: String, what: String },
}

/// Hyper-parameters of a decoder-only transformer.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub arch: Arch,
    /// `{arch}.block_count`
    pub n_layer: usize,
    /// `{arch}.embedding_length` (D)
    pub n_embd: usize,
    /// `{arch}.feed_forward_length` (F)
    pub n_ff: usize,
    /// `{arch}.attention.head_count` (H)
    pub n_head: usize,
    /// `{arch}.attention.head_count_kv` (Hkv; defaults to H like llama.cpp)
    pub n_head_kv: usize,
    /// `{arch}.attention.key_length`, else D / H (Dh)
    pub head_dim: usize,
    /// `{arch}.rope.dimension_count`, else Dh
    pub n_rot: usize,
    /// `{arch}.rope.freq_base` (llama.cpp's default 10000 when absent)
    pub rope_base: f32,
    pub rope_style: RopeStyle,
    /// `{arch}.attention.layer_norm_rms_epsilon`
    pub rms_eps: f32,
    /// `{arch}.context_length` (training context; the KV cache may hold up to this many positions)
    pub n_ctx_train: usize,
    /// rows of `token_embd.weight` (V)
    pub n_vocab: usize,
    /// `blk.0.attn_q.bias` present
    pub qkv_bias: bool,
    /// `output.weight` absent: the output head reuses `token_embd.weight`
    pub tied_embeddings: bool,
}

impl ModelConfig {
    pub fn from_gguf(file: &GgufFile) -> Result<ModelConfig, ConfigError> {
        let fname = file.display_name();
        let meta_err = |source| ConfigError::Meta { file: fname.clone(), source };
        let invalid = |what: String| ConfigError::Invalid { file: fname.clone(), what };
        let arch_name = file.architecture().map_err(meta_err)?;
        let arch = Arch::from_name(arch_name).ok_or_else(|| ConfigError::UnsupportedArch { file: fname.clone(), arch: arch_name.to_string() })?;
        let k = |s: &str| format!("{arch_name}.{s}");
        let req = |s: &str| file.meta_usize(&k(s)).map_err(meta_err);
        let opt_usize = |s: &str| -> Result<Option<usize>, ConfigError> {
            match file.meta(&k(s)) {
                None => Ok(None),
                Some(_) => file.meta_usize(&k(s)).map(Some).map_err(meta_err),
            }
        };
        let opt_f32 = |s: &str| -> Result<Option<f32>, ConfigError> {
            match file.meta(&k(s)) {
                None => Ok(None),
                Some(_) => file.meta_f64(&k(s)).map(|v| Some(v as f32)).map_err(meta_err),
            }
        };

        let n_layer = req("block_count")?;
        let n_embd = req("embedding_length")?;
        let n_ff = req("feed_forward_length")?;
        let n_head = req("attention.head_count")?;
        let n_head_kv = opt_usize("attention.head_count_kv")?.unwrap_or(n_head);
        let n_ctx_train = req("context_length")?;
        let rms_eps = file.meta_f64(&k("attention.layer_norm_rms_epsilon")).map_err(meta_err)? as f32;
        let rope_base = opt_f32("rope.freq_base")?.unwrap_or(10000.0);
        if n_layer == 0 || n_embd == 0 || n_ff == 0 || n_head == 0 || n_head_kv == 0 {
            return Err(invalid(format!(
                "zero dimension: block_count {n_layer}, embedding_length {n_embd}, feed_forward_length {n_ff}, \
                 head_count {n_head}, head_count_kv {n_head_kv}"
            )));
        }
        if n_head % n_head_kv != 0 {
            return Err(invalid(format!("head_count {n_head} is not a multiple of head_count_kv {n_head_kv}")));
        }
        let head_dim = match opt_usize("attention.key_length")? {
            Some(d) => d,
            None if n_embd % n_head == 0 => n_embd / n_head,
            None => return Err(invalid(format!("embedding_length {n_embd} is not a multiple of head_count {n_head}"))),
        };
        if let Some(vl) = opt_usize("attention.value_length")? {
            if vl != head_dim {
                return Err(invalid(format!("value_length {vl} differs from key_length {head_dim} (unsupported)")));
            }
        }
        let n_rot = opt_usize("rope.dimension_count")?.unwrap_or(head_dim);
        if n_rot > head_dim || n_rot % 2 != 0 {
            return Err(invalid(format!("rope.dimension_count {n_rot} must be even and ≤ head dim {head_dim}")));
        }
        if let Some(v) = file.meta(&k("rope.scaling.type")) {
            if v.as_str() != Some("none") {
                return Err(invalid(format!("rope scaling {v:?} is not supported")));
            }
        }
        if !(rms_eps.is_finite() && rms_eps >= 0.0 && rope_base.is_finite() && rope_base > 0.0) {
            return Err(invalid(format!("bad rms epsilon {rms_eps} or rope base {rope_base}")));
        }

        let embd = file.tensor("token_embd.weight").ok_or_else(|| invalid("no tensor token_embd.weight".into()))?;
        if embd.ne.len() != 2 || embd.ne[0] as usize != n_embd {
            return Err(invalid(format!("token_embd.weight has ne {:?}, expected [{n_embd}, n_vocab]", embd.ne)));
        }
        let n_vocab = embd.ne[1] as usize;

        Ok(ModelConfig {
            arch,
            n_layer,
            n_embd,
            n_ff,
            n_head,
            n_head_kv,
            head_dim,
            n_rot,
            rope_base,
            rope_style: arch.rope_style(),
            rms_eps,
            n_ctx_train,
            n_vocab,
            qkv_bias: file.tensor("blk.0.attn_q.bias").is_some(),
            tied_embeddings: file.tensor("output.weight").is_none(),
        })
    }

    /// Query heads per key-value head.
    pub fn gqa_group(&self) -> usize {
        self.n_head / self.n_head_kv
    }
    /// Width of the K and V projections (Hkv · Dh).
    pub fn kv_dim(&self) -> usize {
        self.n_head_kv * self.head_dim
    }
    /// Width of the Q projection (H · Dh).
    pub fn q_dim(&self) -> usize {
        self.n_head * self.head_dim
    }
}
