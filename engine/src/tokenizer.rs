//! The tokenizer, built from GGUF metadata, reproducing llama.cpp's `llama_tokenize` /
//! `llama_detokenize` for byte-level BPE vocabularies (`tokenizer.ggml.model = "gpt2"`).
//!
//! The pipeline is llama.cpp's (src/llama-vocab.cpp), step by step:
//! 1. token attributes from `tokenizer.ggml.token_type`, then llama.cpp's text-based fix-ups
//!    (EOT / EOM / FIM tokens found by their text are made CONTROL, the end-of-generation set);
//! 2. special-token partition (`tokenizer_st_partition`): every CONTROL / USER_DEFINED / UNKNOWN
//!    token, longest text first, cuts the raw text fragments it occurs in (CONTROL and UNKNOWN only
//!    when `parse_special` is on);
//! 3. each remaining text fragment: pre-tokenizer regexes of the `tokenizer.ggml.pre` type, GPT-2
//!    byte-to-unicode mapping, BPE merges by rank — this part is the `tokenizers` crate (Split
//!    pre-tokenizers with the same regexes, ByteLevel, BPE);
//! 4. BOS / EOS added when `add_special` and the model asks for them.
//!
//! Steps 1, 2 and 4 are hand-written: the `tokenizers` crate's added-token matching is
//! leftmost-longest, while llama.cpp cuts longest-token-first over all fragments, and the attribute
//! fix-ups exist only in llama.cpp. Decoding is hand-written for the same reason (llama.cpp's
//! per-attribute piece rules and its `clean_spaces` pass).

use std::collections::{HashMap, HashSet};

use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{SplitDelimiterBehavior, Tokenizer as HfTokenizer};

use crate::gguf::{GgufFile, MetaValue};

/// Errors building or running the tokenizer. Each names the metadata key or input at fault.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("GGUF metadata key `{key}` is missing")]
    MissingKey { key: String },
    #[error("GGUF metadata key `{key}`: expected {expected}, found {found}")]
    WrongType { key: String, expected: &'static str, found: &'static str },
    #[error("tokenizer.ggml.model = {0:?} is not supported (only \"gpt2\", byte-level BPE)")]
    UnsupportedModel(String),
    #[error("tokenizer.ggml.pre = {0:?} is not supported; supported: {SUPPORTED_PRE}")]
    UnsupportedPre(String),
    #[error("GGUF metadata key `{key}` has {len} entries, the vocabulary {n_vocab}")]
    LengthMismatch { key: String, len: usize, n_vocab: usize },
    #[error("tokenizer.ggml.merges entry {index} ({merge:?}) has no space separating its two parts")]
    BadMerge { index: usize, merge: String },
    #[error("building the BPE model from tokenizer.ggml.tokens / merges: {0}")]
    Build(String),
    #[error("BPE encoding of {text:?} failed: {msg}")]
    Encode { text: String, msg: String },
    #[error("add_special is on and the model asks for a {which} token, but it has none")]
    MissingSpecial { which: &'static str },
}

// llama_token_type (llama.h), as stored in tokenizer.ggml.token_type.
const TYPE_NORMAL: i64 = 1;
const TYPE_UNKNOWN: i64 = 2;
const TYPE_CONTROL: i64 = 3;
const TYPE_USER_DEFINED: i64 = 4;
const TYPE_UNUSED: i64 = 5;
const TYPE_BYTE: i64 = 6;

// llama_token_attr bits (llama.h).
const ATTR_UNKNOWN: u32 = 1 << 0;
const ATTR_UNUSED: u32 = 1 << 1;
const ATTR_NORMAL: u32 = 1 << 2;
const ATTR_CONTROL: u32 = 1 << 3;
const ATTR_USER_DEFINED: u32 = 1 << 4;
const ATTR_BYTE: u32 = 1 << 5;

const SUPPORTED_PRE: &str = "default, llama3 family, gpt2 family, smollm / starcoder family, qwen2 family";

// Pre-tokenizer regexes, as in llm_tokenizer_bpe's constructor (llama-vocab.cpp). llama.cpp runs
// hand-written equivalents of the gpt2 / llama3 / qwen2 patterns; fancy-regex runs the patterns.
const RE_GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
const RE_LLAMA3: &str =
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const RE_QWEN2: &str =
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// What llama.cpp derives from `tokenizer.ggml.pre` for a BPE vocabulary.
struct PreConfig {
    regexes: &'static [&'static str],
    clean_spaces: bool,
    ignore_merges: bool,
    add_bos: bool,
}

fn pre_config(pre: &str) -> Option<PreConfig> {
    let c = |regexes, clean_spaces, ignore_merges, add_bos| Some(PreConfig { regexes, clean_spaces, ignore_merges, add_bos });
    const DEFAULT: &[&str] = &[r"[\p{P}\$\+<=>\^~\|]+", RE_GPT2, r"\p{N}+", "[0-9][0-9][0-9]"];
    const SMOLLM: &[&str] = &[r"\p{N}", RE_GPT2];
    match pre {
        "" | "default" => c(DEFAULT, true, false, false),
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0" | "lfm2" | "jina-v5-nano" => c(&[RE_LLAMA3], true, true, true),
        "dbrx" | "smaug-bpe" => c(&[RE_LLAMA3], true, false, false),
        "gpt-2" | "phi-2" | "jina-es" | "jina-de" | "gigachat" | "jina-v2-es" | "jina-v2-de" | "a.x-4.0" | "mellum" | "modern-bert" | "exaone4" | "mpt"
        | "olmo" | "jais" => c(&[RE_GPT2], true, false, false),
        "starcoder" | "refact" | "codeshell" | "exaone" | "minerva-7b" => c(SMOLLM, true, false, false),
        "smollm" | "command-r" => c(SMOLLM, false, false, false),
        "qwen2" | "deepseek-r1-qwen" | "kormo" | "f2llmv2" => c(&[RE_QWEN2], false, false, false),
        "stablelm2" | "megrez" => c(&[RE_QWEN2], true, false, false),
        _ => None,
    }
}

/// Special token ids as given by the metadata (unchecked; out-of-range ids are ignored).
#[derive(Clone, Debug, Default)]
pub struct SpecialIds {
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub eot: Option<u32>,
    pub eom: Option<u32>,
    pub fim_pre: Option<u32>,
    pub fim_suf: Option<u32>,
    pub fim_mid: Option<u32>,
    pub fim_pad: Option<u32>,
    pub fim_rep: Option<u32>,
    pub fim_sep: Option<u32>,
}

/// Everything the tokenizer is built from: the `tokenizer.ggml.*` metadata of a GGUF file.
#[derive(Clone, Debug, Default)]
pub struct VocabSpec {
    /// `tokenizer.ggml.pre` ("" when absent: llama.cpp's default pre-tokenizer).
    pub pre: String,
    /// `tokenizer.ggml.tokens`, GPT-2 byte-level text.
    pub tokens: Vec<String>,
    /// `tokenizer.ggml.token_type` (llama_token_type values), if present.
    pub token_types: Option<Vec<i64>>,
    /// `tokenizer.ggml.merges`, split in two; rank = index.
    pub merges: Vec<(String, String)>,
    pub ids: SpecialIds,
    pub add_bos: Option<bool>,
    pub add_eos: Option<bool>,
}

impl VocabSpec {
    /// Reads the `tokenizer.*` metadata; only "gpt2" (byte-level BPE) vocabularies.
    pub fn from_gguf(f: &GgufFile) -> Result<VocabSpec, TokenizerError> {
        let model_key = "tokenizer.ggml.model";
        let model = req(f, model_key)?;
        let model = model.as_str().ok_or_else(|| key_err(model_key, "a string", model))?;
        if model != "gpt2" {
            return Err(TokenizerError::UnsupportedModel(model.to_string()));
        }
        let pre = match f.meta("tokenizer.ggml.pre") {
            None => String::new(),
            Some(v) => v.as_str().ok_or_else(|| key_err("tokenizer.ggml.pre", "a string", v))?.to_string(),
        };
        let tokens: Vec<String> = str_array(f, "tokenizer.ggml.tokens")?.into_iter().map(String::from).collect();
        let tt_key = "tokenizer.ggml.token_type";
        let token_types = match f.meta(tt_key) {
            None => None,
            Some(v) => {
                let arr = v.as_array().ok_or_else(|| key_err(tt_key, "an array of integers", v))?;
                Some(arr.iter().map(|t| t.as_i64().ok_or_else(|| key_err(tt_key, "an array of integers", t))).collect::<Result<Vec<i64>, _>>()?)
            }
        };
        let merges = str_array(f, "tokenizer.ggml.merges")?
            .into_iter()
            .enumerate()
            .map(|(index, m)| split_merge(m).ok_or_else(|| TokenizerError::BadMerge { index, merge: m.to_string() }))
            .collect::<Result<Vec<_>, _>>()?;
        let id = |key: &str| opt_u32(f, key);
        let ids = SpecialIds {
            bos: id("tokenizer.ggml.bos_token_id")?,
            eos: id("tokenizer.ggml.eos_token_id")?,
            eot: id("tokenizer.ggml.eot_token_id")?,
            eom: id("tokenizer.ggml.eom_token_id")?,
            // the deprecated prefix / suffix / middle keys win when both are present (llama.cpp reads them last)
            fim_pre: id("tokenizer.ggml.prefix_token_id")?.or(id("tokenizer.ggml.fim_pre_token_id")?),
            fim_suf: id("tokenizer.ggml.suffix_token_id")?.or(id("tokenizer.ggml.fim_suf_token_id")?),
            fim_mid: id("tokenizer.ggml.middle_token_id")?.or(id("tokenizer.ggml.fim_mid_token_id")?),
            fim_pad: id("tokenizer.ggml.fim_pad_token_id")?,
            fim_rep: id("tokenizer.ggml.fim_rep_token_id")?,
            fim_sep: id("tokenizer.ggml.fim_sep_token_id")?,
        };
        Ok(VocabSpec {
            pre,
            tokens,
            token_types,
            merges,
            ids,
            add_bos: opt_bool(f, "tokenizer.ggml.add_bos_token")?,
            add_eos: opt_bool(f, "tokenizer.ggml.add_eos_token")?,
        })
    }
}

/// A merge line "a b" split as llama.cpp splits it: at the first space after the first byte (bytes:
/// the first char may be several bytes long; ' ' is a char boundary either way).
fn split_merge(m: &str) -> Option<(String, String)> {
    let p = m.as_bytes().iter().skip(1).position(|&b| b == b' ')?;
    Some((m[..p + 1].to_string(), m[p + 2..].to_string()))
}

/// A byte-level BPE tokenizer that agrees with llama.cpp's.
pub struct Tokenizer {
    /// Token texts as stored (GPT-2 byte-level unicode for normal tokens), by id.
    texts: Vec<String>,
    /// llama_token_attr bits by id, after llama.cpp's fix-ups.
    attrs: Vec<u32>,
    /// CONTROL / USER_DEFINED / UNKNOWN ids, longest text first (ties: lower id first).
    specials: Vec<u32>,
    bos: Option<u32>,
    eos: Option<u32>,
    eog: HashSet<u32>,
    add_bos: bool,
    add_eos: bool,
    clean_spaces: bool,
    /// Pre-tokenizer + BPE for text fragments; no added tokens, no post-processor.
    bpe: HfTokenizer,
    /// GPT-2 byte-to-unicode mapping, inverted.
    unicode_to_byte: HashMap<char, u8>,
}

enum Fragment {
    /// Byte range of the input still to be BPE-tokenized.
    Text(usize, usize),
    Token(u32),
}

fn key_err(key: &str, expected: &'static str, v: &MetaValue) -> TokenizerError {
    TokenizerError::WrongType { key: key.to_string(), expected, found: v.type_name() }
}

fn req<'a>(f: &'a GgufFile, key: &str) -> Result<&'a MetaValue, TokenizerError> {
    f.meta(key).ok_or_else(|| TokenizerError::MissingKey { key: key.to_string() })
}

fn opt_u32(f: &GgufFile, key: &str) -> Result<Option<u32>, TokenizerError> {
    match f.meta(key) {
        None => Ok(None),
        Some(v) => v.as_u64().and_then(|x| u32::try_from(x).ok()).map(Some).ok_or_else(|| key_err(key, "an unsigned 32-bit integer", v)),
    }
}

fn opt_bool(f: &GgufFile, key: &str) -> Result<Option<bool>, TokenizerError> {
    match f.meta(key) {
        None => Ok(None),
        Some(v) => v.as_bool().map(Some).ok_or_else(|| key_err(key, "a bool", v)),
    }
}

fn str_array<'a>(f: &'a GgufFile, key: &str) -> Result<Vec<&'a str>, TokenizerError> {
    let v = req(f, key)?;
    v.as_str_array().ok_or_else(|| key_err(key, "an array of strings", v))
}

/// GPT-2's bytes_to_unicode (unicode.cpp `unicode_byte_to_utf8_map`): printable bytes map to
/// themselves, the other 68 to U+0100.. in byte order.
fn byte_to_unicode() -> [char; 256] {
    let mut map = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..256u32 {
        let printable = (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
        map[b as usize] = if printable {
            char::from_u32(b).expect("byte is a valid char")
        } else {
            n += 1;
            char::from_u32(255 + n).expect("U+0100..U+0143 are valid chars")
        };
    }
    map
}

// Token texts llama.cpp recognises (llama-vocab.cpp, `load`): EOT / EOM / FIM candidates are made
// CONTROL when found; EOG_TEXTS are end-of-generation.
const EOT_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "<｜end▁of▁sentence｜>",
    "<end_of_utterance>",
];
const EOM_TEXTS: &[&str] = &["<|eom_id|>"];
const FIM_PRE_TEXTS: &[&str] = &["<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>", "<PRE>", "▁<PRE>", "<|code_prefix|>", "<|prefix|>"];
const FIM_SUF_TEXTS: &[&str] = &["<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<｜fim▁hole｜>", "<SUF>", "▁<SUF>", "<|code_suffix|>", "<|suffix|>"];
const FIM_MID_TEXTS: &[&str] = &["<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>", "<MID>", "▁<MID>", "<|code_middle|>", "<|middle|>"];
const FIM_PAD_TEXTS: &[&str] = &["<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"];
const FIM_REP_TEXTS: &[&str] = &["<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"];
const FIM_SEP_TEXTS: &[&str] = &["<|file_sep|>"];
const EOG_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<|return|>",
    "<|call|>",
    "<|flush|>",
    "<|calls|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "</s>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "[EOS]",
    "<|end_of_text|>",
    "<end_of_utterance>",
    "<eos>",
    "<turn|>",
    "<|tool_response>",
    "<｜end▁of▁sentence｜>",
    "[e~[",
];

impl Tokenizer {
    /// Builds the tokenizer from a GGUF file's `tokenizer.*` metadata.
    pub fn from_gguf(f: &GgufFile) -> Result<Tokenizer, TokenizerError> {
        Tokenizer::from_spec(VocabSpec::from_gguf(f)?)
    }

    /// Builds the tokenizer from a vocabulary description (what `from_gguf` reads from metadata).
    pub fn from_spec(spec: VocabSpec) -> Result<Tokenizer, TokenizerError> {
        let cfg = pre_config(&spec.pre).ok_or_else(|| TokenizerError::UnsupportedPre(spec.pre.clone()))?;
        let texts: Vec<String> = spec.tokens.into_iter().enumerate().map(|(i, t)| if t.is_empty() { format!("[EMPTY_{i}]") } else { t }).collect();
        let n_vocab = texts.len();

        // Attributes from token types; no types means every token is NORMAL.
        let mut attrs = vec![ATTR_NORMAL; n_vocab];
        if let Some(types) = &spec.token_types {
            if types.len() < n_vocab {
                return Err(TokenizerError::LengthMismatch { key: "tokenizer.ggml.token_type".into(), len: types.len(), n_vocab });
            }
            for (a, &t) in attrs.iter_mut().zip(types) {
                *a = match t {
                    TYPE_UNKNOWN => ATTR_UNKNOWN,
                    TYPE_UNUSED => ATTR_UNUSED,
                    TYPE_NORMAL => ATTR_NORMAL,
                    TYPE_CONTROL => ATTR_CONTROL,
                    TYPE_USER_DEFINED => ATTR_USER_DEFINED,
                    TYPE_BYTE => ATTR_BYTE,
                    _ => 0, // UNDEFINED
                };
            }
        }

        // text -> id; like llama.cpp's token_to_id, a repeated text maps to its last id.
        let token_to_id: HashMap<&str, u32> = texts.iter().enumerate().map(|(i, t)| (t.as_str(), i as u32)).collect();
        let find = |cands: &[&str]| cands.iter().find_map(|c| token_to_id.get(c).copied());

        // Special ids: llama.cpp's BPE defaults (bos = eos = 11, dropped when out of range), then the
        // metadata (ids out of range are ignored, as llama.cpp does with a warning).
        let in_range = |id: &u32| (*id as usize) < n_vocab;
        let pick = |given: Option<u32>, default: Option<u32>| given.filter(in_range).or(default.filter(in_range));
        let ids = &spec.ids;
        let bos = pick(ids.bos, Some(11));
        let eos = pick(ids.eos, Some(11));
        let mut eot = pick(ids.eot, None);
        let mut eom = pick(ids.eom, None);
        let mut fim_pre = pick(ids.fim_pre, None);
        let mut fim_suf = pick(ids.fim_suf, None);
        let mut fim_mid = pick(ids.fim_mid, None);
        let mut fim_pad = pick(ids.fim_pad, None);
        let mut fim_rep = pick(ids.fim_rep, None);
        let mut fim_sep = pick(ids.fim_sep, None);

        let add_bos = spec.add_bos.unwrap_or(cfg.add_bos);
        let add_eos = spec.add_eos.unwrap_or(false);

        // Text-based detection of EOT / EOM / FIM; a found token is forced to CONTROL. llama.cpp
        // walks an unordered map, so with several candidates present its pick is unspecified; we
        // take the first in list order (the CONTROL marking and the EOG set below do not depend on
        // the pick for the listed EOG texts).
        let mark_control = |id: Option<u32>, attrs: &mut Vec<u32>| {
            if let Some(id) = id {
                attrs[id as usize] |= ATTR_CONTROL;
            }
        };
        for (slot, cands) in [
            (&mut eot, EOT_TEXTS),
            (&mut eom, EOM_TEXTS),
            (&mut fim_pre, FIM_PRE_TEXTS),
            (&mut fim_suf, FIM_SUF_TEXTS),
            (&mut fim_mid, FIM_MID_TEXTS),
            (&mut fim_pad, FIM_PAD_TEXTS),
            (&mut fim_rep, FIM_REP_TEXTS),
            (&mut fim_sep, FIM_SEP_TEXTS),
        ] {
            if slot.is_none() {
                *slot = find(cands);
                mark_control(*slot, &mut attrs);
            }
        }
        let _ = (fim_pre, fim_suf, fim_mid);

        // CONTROL tokens whose text contains "unused" are UNUSED too (still CONTROL).
        for (a, t) in attrs.iter_mut().zip(&texts) {
            if *a & ATTR_CONTROL != 0 && t.contains("unused") {
                *a |= ATTR_UNUSED;
            }
        }

        // End-of-generation set.
        let mut eog: HashSet<u32> = [fim_pad, fim_rep, fim_sep].into_iter().flatten().collect();
        for t in EOG_TEXTS {
            if let Some(&id) = token_to_id.get(t) {
                eog.insert(id);
                attrs[id as usize] |= ATTR_CONTROL;
            }
        }
        // gpt-oss: these are always rendered.
        for t in ["<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"] {
            if let Some(&id) = token_to_id.get(t) {
                attrs[id as usize] = ATTR_USER_DEFINED;
            }
        }
        eog.extend([eos, eot, eom].into_iter().flatten());
        // o200k_harmony / solar-open: "<|end|>" is not EOG when "<|return|>"+"<|call|>" or
        // "<|calls|>"+"<|flush|>" are.
        let eog_has = |eog: &HashSet<u32>, t: &str| token_to_id.get(t).is_some_and(|id| eog.contains(id));
        if let Some(&end) = token_to_id.get("<|end|>").filter(|id| eog.contains(id)) {
            let ret = eog_has(&eog, "<|return|>");
            let call = eog_has(&eog, "<|call|>") || eog_has(&eog, "<|calls|>");
            let flush = eog_has(&eog, "<|flush|>");
            if call && (ret || flush) {
                eog.remove(&end);
                attrs[end as usize] = ATTR_USER_DEFINED;
            }
        }
        // gemma4 / plamo: "</s>" is a normal token there.
        if let Some(&s) = token_to_id.get("</s>").filter(|id| eog.contains(id)) {
            if eog_has(&eog, "<|tool_response>") || eog_has(&eog, "<|plamo:eos|>") {
                eog.remove(&s);
                attrs[s as usize] = ATTR_NORMAL;
            }
        }

        let mut specials: Vec<u32> = (0..n_vocab as u32).filter(|&id| attrs[id as usize] & (ATTR_CONTROL | ATTR_USER_DEFINED | ATTR_UNKNOWN) != 0).collect();
        specials.sort_by(|&a, &b| texts[b as usize].len().cmp(&texts[a as usize].len()).then(a.cmp(&b)));

        let bpe = build_bpe(&texts, spec.merges, &cfg)?;
        let unicode_to_byte = byte_to_unicode().iter().enumerate().map(|(b, &c)| (c, b as u8)).collect();

        Ok(Tokenizer { texts, attrs, specials, bos, eos, eog, add_bos, add_eos, clean_spaces: cfg.clean_spaces, bpe, unicode_to_byte })
    }

    /// `llama_tokenize(vocab, text, add_special, parse_special)`.
    pub fn encode(&self, text: &str, add_special: bool, parse_special: bool) -> Result<Vec<u32>, TokenizerError> {
        let mut out = Vec::new();
        if add_special && self.add_bos {
            out.push(self.bos.ok_or(TokenizerError::MissingSpecial { which: "BOS" })?);
        }
        for frag in self.partition(text, parse_special) {
            match frag {
                Fragment::Token(id) => out.push(id),
                Fragment::Text(a, b) => {
                    let piece = &text[a..b];
                    let enc = self.bpe.encode(piece, false).map_err(|e| TokenizerError::Encode { text: piece.to_string(), msg: e.to_string() })?;
                    out.extend_from_slice(enc.get_ids());
                }
            }
        }
        if add_special && self.add_eos {
            out.push(self.eos.ok_or(TokenizerError::MissingSpecial { which: "EOS" })?);
        }
        Ok(out)
    }

    /// llama.cpp's `tokenizer_st_partition`: for each special token, longest first, cut every
    /// occurrence out of the text fragments not yet cut. (No LSTRIP / RSTRIP: GGUF token types
    /// never set them.)
    fn partition(&self, text: &str, parse_special: bool) -> Vec<Fragment> {
        if text.is_empty() {
            return Vec::new();
        }
        let mut frags = vec![Fragment::Text(0, text.len())];
        for &id in &self.specials {
            if !parse_special && self.attrs[id as usize] & (ATTR_CONTROL | ATTR_UNKNOWN) != 0 {
                continue;
            }
            let needle = self.texts[id as usize].as_str();
            if !frags.iter().any(|f| matches!(f, Fragment::Text(a, b) if text[*a..*b].contains(needle))) {
                continue;
            }
            let mut next = Vec::with_capacity(frags.len() + 2);
            for f in frags {
                let Fragment::Text(mut a, b) = f else {
                    next.push(f);
                    continue;
                };
                while let Some(pos) = text[a..b].find(needle) {
                    if pos > 0 {
                        next.push(Fragment::Text(a, a + pos));
                    }
                    next.push(Fragment::Token(id));
                    a += pos + needle.len();
                }
                if a < b {
                    next.push(Fragment::Text(a, b));
                }
            }
            frags = next;
        }
        frags
    }

    /// The bytes `llama_token_to_piece(vocab, id, .., lstrip=0, special=true)` writes.
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        let Some(text) = self.texts.get(id as usize) else {
            return Vec::new();
        };
        let attr = self.attrs[id as usize];
        if attr & (ATTR_UNKNOWN | ATTR_CONTROL | ATTR_USER_DEFINED) != 0 {
            return text.as_bytes().to_vec();
        }
        if attr & ATTR_NORMAL != 0 {
            // llama_decode_text: each char back to its byte; an unmapped char gives llama.cpp's
            // "[UNK_BYTE_0x..<text>]" marker.
            let mut out = Vec::with_capacity(text.len());
            for c in text.chars() {
                match self.unicode_to_byte.get(&c) {
                    Some(&b) => out.push(b),
                    None => {
                        let mut buf = [0u8; 4];
                        let hex: String = c.encode_utf8(&mut buf).bytes().map(|b| format!("{b:02x}")).collect();
                        out.extend_from_slice(format!("[UNK_BYTE_0x{hex}{text}]").as_bytes());
                    }
                }
            }
            return out;
        }
        if attr & ATTR_BYTE != 0 {
            // "<0xXX>"
            if let Some(b) = text.get(3..5).and_then(|h| u8::from_str_radix(h, 16).ok()) {
                return vec![b];
            }
        }
        Vec::new() // UNUSED / UNDEFINED tokens render as nothing
    }

    /// One token's piece as text (invalid UTF-8, e.g. half a character, becomes U+FFFD).
    pub fn token_piece(&self, id: u32) -> String {
        String::from_utf8_lossy(&self.token_bytes(id)).into_owned()
    }

    /// `llama_detokenize(vocab, ids, remove_special=false, unparse_special=true)`, as UTF-8 with
    /// invalid bytes replaced by U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut bytes: Vec<u8> = ids.iter().flat_map(|&id| self.token_bytes(id)).collect();
        if self.clean_spaces {
            bytes = clean_spaces(&bytes);
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }

    pub fn n_vocab(&self) -> usize {
        self.texts.len()
    }
    pub fn bos(&self) -> Option<u32> {
        self.bos
    }
    pub fn eos(&self) -> Option<u32> {
        self.eos
    }
    /// Whether generation stops at `id` (llama_vocab_is_eog).
    pub fn is_eog(&self, id: u32) -> bool {
        self.eog.contains(&id)
    }
    /// The end-of-generation ids, ascending.
    pub fn eog_ids(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self.eog.iter().copied().collect();
        v.sort_unstable();
        v
    }
    /// The stored text of a token (GPT-2 byte-level form for normal tokens).
    pub fn token_text(&self, id: u32) -> Option<&str> {
        self.texts.get(id as usize).map(|s| s.as_str())
    }
    /// CONTROL / USER_DEFINED / UNKNOWN ids (those the special-token partition matches), ascending.
    pub fn special_ids(&self) -> Vec<u32> {
        let mut v = self.specials.clone();
        v.sort_unstable();
        v
    }
}

fn build_bpe(texts: &[String], merges: Vec<(String, String)>, cfg: &PreConfig) -> Result<HfTokenizer, TokenizerError> {
    let vocab: Vocab = texts.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
    let bpe = BPE::builder().vocab_and_merges(vocab, merges).ignore_merges(cfg.ignore_merges).build().map_err(|e| TokenizerError::Build(e.to_string()))?;

    let mut pre: Vec<PreTokenizerWrapper> = Vec::new();
    for re in cfg.regexes {
        let split = Split::new(SplitPattern::Regex(re.to_string()), SplitDelimiterBehavior::Isolated, false)
            .map_err(|e| TokenizerError::Build(format!("pre-tokenizer regex {re:?}: {e}")))?;
        pre.push(split.into());
    }
    pre.push(ByteLevel::new(false, false, false).into());
    let mut tok = HfTokenizer::new(bpe);
    tok.with_pre_tokenizer(Some(Sequence::new(pre)));
    Ok(tok)
}

/// llama.cpp's `clean_spaces` pass of `detokenize` (clean_up_tokenization_spaces), byte for byte.
fn clean_spaces(text: &[u8]) -> Vec<u8> {
    // first pass: " ?", " !", " .", " ," lose the space
    let mut a: Vec<u8> = Vec::with_capacity(text.len());
    for (i, &x) in text.iter().enumerate() {
        if i > 0 && text[i - 1] == b' ' && matches!(x, b'?' | b'!' | b'.' | b',') {
            a.pop();
        }
        a.push(x);
    }
    // second pass: " ' " becomes "'"; like llama.cpp, the dropped space is zeroed in place so a
    // following check does not see it as a space
    let mut b: Vec<u8> = Vec::with_capacity(a.len());
    let mut i = 0;
    while i < a.len() {
        let x = a[i];
        if i > 0 && x == b'\'' && i + 1 < a.len() && a[i - 1] == b' ' && a[i + 1] == b' ' {
            b.pop();
            b.push(x);
            a[i + 1] = 0;
            i += 2;
            continue;
        }
        b.push(x);
        i += 1;
    }
    // third pass: " 's", " 'm", " 're", " 've" lose the space
    let mut c: Vec<u8> = Vec::with_capacity(b.len());
    for (i, &x) in b.iter().enumerate() {
        if i > 0 && b[i - 1] == b' ' && x == b'\'' && i + 1 < b.len() {
            let x1 = b[i + 1];
            let x2 = b.get(i + 2).copied();
            if matches!(x1, b's' | b'm') || (matches!((x1, x2), (b'r', Some(b'e')) | (b'v', Some(b'e')))) {
                c.pop();
            }
        }
        c.push(x);
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A vocabulary of the 256 byte symbols, a few merges and some special tokens.
    /// Ids: 0..256 bytes, then "he", "hel", "hell", "hello", then the specials.
    fn spec(extra: &[(&str, i64)]) -> VocabSpec {
        let b2u = byte_to_unicode();
        let mut tokens: Vec<String> = b2u.iter().map(|c| c.to_string()).collect();
        let mut types = vec![TYPE_NORMAL; 256];
        for w in ["he", "hel", "hell", "hello"] {
            tokens.push(w.to_string());
            types.push(TYPE_NORMAL);
        }
        let merges = [("h", "e"), ("he", "l"), ("hel", "l"), ("hell", "o")].iter().map(|(a, b)| (a.to_string(), b.to_string())).collect();
        for (t, ty) in extra {
            tokens.push(t.to_string());
            types.push(*ty);
        }
        VocabSpec { pre: "qwen2".into(), tokens, token_types: Some(types), merges, ..Default::default() }
    }

    fn id_of(t: &Tokenizer, text: &str) -> u32 {
        (0..t.n_vocab() as u32).find(|&i| t.token_text(i) == Some(text)).unwrap()
    }

    #[test]
    fn bpe_merges_and_byte_fallback_symbols() {
        let t = Tokenizer::from_spec(spec(&[])).unwrap();
        let hello = id_of(&t, "hello");
        assert_eq!(t.encode("hello", false, true).unwrap(), vec![hello]);
        // " hello" is one pre-token "Ġhello" (qwen2 regex); there is no merge for 'Ġ' + 'h'.
        assert_eq!(t.encode(" hello", false, true).unwrap(), vec![id_of(&t, "Ġ"), hello]);
        // "hello1": \p{N} is cut off; "hellx": the BPE stops at "hell".
        assert_eq!(t.encode("hellx1", false, true).unwrap(), vec![id_of(&t, "hell"), id_of(&t, "x"), id_of(&t, "1")]);
        assert_eq!(t.decode(&t.encode("héllo wörld\n", false, true).unwrap()), "héllo wörld\n");
    }

    #[test]
    fn specials_cut_longest_first_and_control_only_with_parse_special() {
        let t = Tokenizer::from_spec(spec(&[("<|x|>", TYPE_CONTROL), ("<|x|>y", TYPE_CONTROL), ("[U]", TYPE_USER_DEFINED)])).unwrap();
        let (x, xy, u) = (id_of(&t, "<|x|>"), id_of(&t, "<|x|>y"), id_of(&t, "[U]"));
        assert_eq!(t.encode("<|x|>y<|x|>", false, true).unwrap(), vec![xy, x]);
        let ids = t.encode("a<|x|>[U]b", false, false).unwrap();
        assert!(!ids.contains(&x), "CONTROL tokens are text without parse_special: {ids:?}");
        assert!(ids.contains(&u), "USER_DEFINED tokens are cut even without parse_special: {ids:?}");
        assert_eq!(t.decode(&ids), "a<|x|>[U]b");
    }

    #[test]
    fn llama_cpp_fixups_by_text() {
        // "<|im_end|>" typed NORMAL still becomes CONTROL and end-of-generation; "<|fim_pad|>" too
        // (FIM pad is EOG); an UNUSED token renders as nothing.
        let t = Tokenizer::from_spec(spec(&[("<|im_end|>", TYPE_NORMAL), ("<|fim_pad|>", TYPE_CONTROL), ("[PAD9]", TYPE_UNUSED), ("<|other|>", TYPE_CONTROL)]))
            .unwrap();
        let (end, pad, unused, other) = (id_of(&t, "<|im_end|>"), id_of(&t, "<|fim_pad|>"), id_of(&t, "[PAD9]"), id_of(&t, "<|other|>"));
        assert!(t.is_eog(end) && t.is_eog(pad) && !t.is_eog(other));
        assert_eq!(t.encode("<|im_end|>", false, true).unwrap(), vec![end]);
        assert_eq!(t.token_piece(unused), "");
        assert_eq!(t.token_piece(end), "<|im_end|>");
        // bos / eos default to 11 for BPE vocabularies, as in llama.cpp
        assert_eq!((t.bos(), t.eos()), (Some(11), Some(11)));
    }

    #[test]
    fn add_special_follows_the_model_flags() {
        let mut s = spec(&[("<s>", TYPE_CONTROL)]);
        let bos = s.tokens.len() as u32 - 1;
        s.ids.bos = Some(bos);
        s.add_bos = Some(true);
        let t = Tokenizer::from_spec(s).unwrap();
        assert_eq!(t.encode("", true, true).unwrap(), vec![bos]);
        assert_eq!(t.encode("", false, true).unwrap(), Vec::<u32>::new());
    }

    #[test]
    fn bad_inputs_are_typed_errors() {
        let mut s = spec(&[]);
        s.pre = "no-such-pre".into();
        assert!(matches!(Tokenizer::from_spec(s), Err(TokenizerError::UnsupportedPre(p)) if p == "no-such-pre"));
        let mut s = spec(&[]);
        s.token_types = Some(vec![1; 3]);
        assert!(matches!(Tokenizer::from_spec(s), Err(TokenizerError::LengthMismatch { .. })));
        assert_eq!(split_merge("Ġ Ġ"), Some(("Ġ".into(), "Ġ".into())));
        assert_eq!(split_merge("  x"), Some((" ".into(), "x".into())));
        assert_eq!(split_merge("ab"), None);
    }

    #[test]
    fn byte_to_unicode_is_gpt2s() {
        let m = byte_to_unicode();
        assert_eq!(m[b'a' as usize], 'a');
        assert_eq!(m[b' ' as usize], 'Ġ');
        assert_eq!(m[b'\n' as usize], 'Ċ');
        assert_eq!(m[0], 'Ā');
        let distinct: HashSet<char> = m.iter().copied().collect();
        assert_eq!(distinct.len(), 256);
    }

    #[test]
    fn clean_spaces_like_llama_cpp() {
        let c = |s: &str| String::from_utf8(clean_spaces(s.as_bytes())).unwrap();
        assert_eq!(c("Hello , world ! ok ?"), "Hello, world! ok?");
        assert_eq!(c("rock ' n"), "rock'n");
        assert_eq!(c("it 's I 'm we 're they 've I 'll don 't"), "it's I'm we're they've I 'll don 't");
    }
}
