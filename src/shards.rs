//! Merging the dumps of an engine split across GPUs (tensor parallelism) into the one dump that
//! `lockstep compare` judges: `lockstep merge-shards --spec SPEC.toml --out merged.safetensors RANK0 RANK1 …`.
//!
//! Each rank writes its own dump (same keys, golden naming: `s{step}/{tap}`, 4-D shapes) holding its
//! slice of each tensor. The shard spec says, per tap family, how the slices make the whole tensor:
//!
//! ```toml
//! # Rules: an axis of the 4-D golden shape [ne3, ne2, ne1, ne0] (0..=3) on which the ranks' slices are
//! # concatenated, in file order; "replicated" (every rank holds the whole tensor, they must agree);
//! # or "sum" (every rank holds a partial sum, e.g. a row-parallel projection before its all-reduce).
//! default = "replicated"   # optional: the rule for a tap no pattern matches (without it: an error)
//! tolerance = 0.0          # optional: largest |difference| allowed between copies of a replicated tensor
//!
//! [taps]
//! Qcur = 3                 # Qcur-L.mul_mat, Qcur-L.add: [1, 1, tokens, heads*head_dim], split on columns
//! "Qcur.rope" = 2          # [1, tokens, heads, head_dim]: split on heads
//! kq = 1                   # [1, heads, tokens, kv_len]
//! ffn_gate = 3             # [1, 1, tokens, n_ff]
//! l_out = "replicated"
//! ```
//!
//! A pattern is a tap's family (the name without `-{layer}`), optionally with its stage: for
//! `s0/norm-3.rms_norm.1` the rules `norm.rms_norm.1`, `norm.rms_norm` and `norm` are tried in that
//! order, the most specific first. Keys that are not taps (`tokens`, `continuation`, …) are always
//! replicated and must be identical on every rank. Shapes of fewer than 4 dimensions are left-padded
//! with 1s. Slices may differ in size on the split axis (an uneven split of 14 heads over 4 GPUs is fine).
//! Partial sums are added in f64 in rank order and rounded once to f32. The merged dump is f32 (inputs
//! may be f32, f16, bf16 or f64) and is written atomically by
//! [`lockstep_engine::taps_file::SafetensorsTapWriter`]. docs/shards.md has a full spec for qwen2 and
//! llama under Megatron-style tensor parallelism.
//!
//! Errors name what went wrong and where: a tap missing on some rank (which ranks have it and which
//! do not), ranks disagreeing on a replicated tap (by how much, where, the two values), slices that do
//! not concatenate (every rank's shape), a tap no rule covers, a malformed spec (file, line, column).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use lockstep_engine::taps_file::{SafetensorsTapWriter, TapFileError};
use safetensors::{Dtype, SafeTensors};

use crate::tapname::TapId;

/// How one tap family's ranks make the whole tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// Concatenate the ranks' slices on this axis of the 4-D shape (0..=3), in rank order.
    Split(usize),
    /// Every rank holds the whole tensor; the copies must agree (within the spec's tolerance).
    Replicated,
    /// Every rank holds a partial sum; the tensor is their sum.
    Sum,
}

impl std::fmt::Display for Rule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Rule::Split(a) => write!(f, "split on axis {a}"),
            Rule::Replicated => f.write_str("replicated"),
            Rule::Sum => f.write_str("sum"),
        }
    }
}

/// Why ranks could not be merged. Every variant names the file(s) or the tap concerned.
#[derive(Debug, thiserror::Error)]
pub enum MergeError {
    #[error("{path}: bad shard spec: {reason}")]
    Spec { path: PathBuf, reason: String },
    #[error("merge-shards: no rank files given")]
    NoRanks,
    #[error("{path}: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("{key}: present on {present} but missing on {missing}{more}")]
    MissingTap { key: String, present: String, missing: String, more: String },
    #[error("{key}: no rule in {spec} for this tap (tried {tried}); add one under [taps], or `default = \"replicated\"`")]
    NoRule { key: String, spec: PathBuf, tried: String },
    #[error("{path}: tensor {key:?} has dtype {dtype}, expected {expected}")]
    Dtype { path: PathBuf, key: String, dtype: String, expected: String },
    #[error("{path}: tensor {key:?} has shape {shape:?}: tap shapes have at most 4 dimensions [ne3, ne2, ne1, ne0]")]
    TooManyDims { path: PathBuf, key: String, shape: Vec<usize> },
    #[error("{key} (replicated): rank {rank} ({path}) differs from rank 0 by max |Δ| = {max_abs:.3e} at index {index:?} (rank 0: {a:e}, rank {rank}: {b:e}); relative L2 {rel_l2:.3e}; tolerance {tolerance:.1e}")]
    Disagree { key: String, rank: usize, path: PathBuf, max_abs: f64, index: Vec<usize>, a: f32, b: f32, rel_l2: f64, tolerance: f64 },
    #[error("{key} ({rule}): the ranks' shapes cannot be combined: {reason}; shapes: {shapes}")]
    NotConcatenable { key: String, rule: Rule, reason: String, shapes: String },
    #[error("{key}: not a tap, so every rank must hold the same tensor, but rank {rank} ({path}) differs from rank 0: {what}")]
    NotIdentical { key: String, rank: usize, path: PathBuf, what: String },
    #[error(transparent)]
    Write(#[from] TapFileError),
}

/// A parsed shard spec.
#[derive(Debug, Clone)]
pub struct ShardSpec {
    /// Where the spec came from, for messages.
    pub origin: PathBuf,
    /// pattern (`Qcur`, `Qcur.rope`, `norm.rms_norm.1`) → rule.
    pub taps: BTreeMap<String, Rule>,
    pub default: Option<Rule>,
    /// Largest |difference| allowed between ranks' copies of a replicated tap (default 0: bitwise equal
    /// values, which an all-reduce gives on every rank).
    pub tolerance: f64,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSpec {
    #[serde(default)]
    taps: BTreeMap<String, RawRule>,
    default: Option<RawRule>,
    tolerance: Option<f64>,
}

#[derive(serde::Deserialize)]
#[serde(untagged)]
enum RawRule {
    Axis(i64),
    Word(String),
    Other(toml::Value),
}

impl RawRule {
    fn rule(&self) -> Result<Rule, String> {
        match self {
            RawRule::Axis(a @ 0..=3) => Ok(Rule::Split(*a as usize)),
            RawRule::Axis(a) => Err(format!("axis {a} is outside the 4-D shape [ne3, ne2, ne1, ne0] (0..=3)")),
            RawRule::Word(w) if w == "replicated" => Ok(Rule::Replicated),
            RawRule::Word(w) if w == "sum" => Ok(Rule::Sum),
            RawRule::Word(w) => Err(format!("{w:?} is not a rule: expected an axis 0..=3, \"replicated\" or \"sum\"")),
            RawRule::Other(v) => Err(format!("{v} is not a rule: expected an axis 0..=3 (an integer), \"replicated\" or \"sum\"")),
        }
    }
}

impl ShardSpec {
    /// Reads and parses a spec file.
    pub fn load(path: &Path) -> Result<Self, MergeError> {
        let text = std::fs::read_to_string(path).map_err(|e| MergeError::Spec { path: path.to_path_buf(), reason: format!("cannot read: {e}") })?;
        Self::parse(&text, path)
    }

    /// Parses spec text; `origin` names it in messages.
    pub fn parse(text: &str, origin: &Path) -> Result<Self, MergeError> {
        let bad = |reason: String| MergeError::Spec { path: origin.to_path_buf(), reason };
        let raw: RawSpec = toml::from_str(text).map_err(|e| bad(e.to_string()))?;
        let mut taps = BTreeMap::new();
        for (pattern, r) in &raw.taps {
            if pattern.is_empty() || pattern.contains('/') || TapId::parse_tap(0, pattern).is_ok_and(|t| t.layer.is_some()) {
                return Err(bad(format!(
                    "[taps] {pattern:?}: a pattern is a tap family with an optional stage (`Qcur`, `Qcur.rope`, `norm.rms_norm.1`), without step or layer"
                )));
            }
            taps.insert(pattern.clone(), r.rule().map_err(|e| bad(format!("[taps] {pattern:?}: {e}")))?);
        }
        let default = raw.default.as_ref().map(|r| r.rule().map_err(|e| bad(format!("default: {e}")))).transpose()?;
        let tolerance = raw.tolerance.unwrap_or(0.0);
        if !(tolerance.is_finite() && tolerance >= 0.0) {
            return Err(bad(format!("tolerance = {tolerance}: expected a finite number ≥ 0")));
        }
        Ok(ShardSpec { origin: origin.to_path_buf(), taps, default, tolerance })
    }

    /// The patterns tried for a tap, most specific first: `norm.rms_norm.1`, `norm.rms_norm`, `norm`.
    pub fn patterns(tap: &TapId) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(stage) = &tap.stage {
            let parts: Vec<&str> = stage.split('.').collect();
            for n in (1..=parts.len()).rev() {
                out.push(format!("{}.{}", tap.family, parts[..n].join(".")));
            }
        }
        out.push(tap.family.clone());
        out
    }

    /// The rule for a tap and the pattern that gave it (`None` for the default), or `None` if no rule applies.
    pub fn rule_for(&self, tap: &TapId) -> Option<(Rule, Option<&str>)> {
        for p in Self::patterns(tap) {
            if let Some((k, r)) = self.taps.get_key_value(&p) {
                return Some((*r, Some(k.as_str())));
            }
        }
        self.default.map(|r| (r, None))
    }
}

/// What a merge did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MergeSummary {
    pub ranks: usize,
    /// Taps concatenated from slices.
    pub split: usize,
    /// Taps every rank held whole.
    pub replicated: usize,
    /// Taps summed from partials.
    pub summed: usize,
    /// Non-tap tensors (`tokens`, `continuation`, …), identical on every rank.
    pub other: usize,
    /// Largest |difference| seen between ranks' copies of a replicated tap (≤ the tolerance).
    pub max_replicated_diff: f64,
    /// Spec patterns that matched no tap of the dumps (a typo, or a family these dumps lack).
    pub unused_patterns: Vec<String>,
}

/// One rank's file, mapped.
struct RankFile {
    path: PathBuf,
    map: memmap2::Mmap,
}

/// Merges the rank files (rank 0 first) under `spec` and writes the result to `out` atomically.
pub fn merge_files(spec: &ShardSpec, ranks: &[PathBuf], out: &Path) -> Result<MergeSummary, MergeError> {
    if ranks.is_empty() {
        return Err(MergeError::NoRanks);
    }
    let files = ranks
        .iter()
        .map(|p| {
            let read = |e: std::io::Error| MergeError::Read { path: p.clone(), reason: format!("cannot read: {e}") };
            let f = std::fs::File::open(p).map_err(read)?;
            // SAFETY: the file is mapped read-only and only read; a rank file changed by another process
            // while we merge is outside what we guard against (as for any reader of a mapped file).
            let map = unsafe { memmap2::Mmap::map(&f) }.map_err(read)?;
            Ok(RankFile { path: p.clone(), map })
        })
        .collect::<Result<Vec<_>, MergeError>>()?;
    let tensors = files
        .iter()
        .map(|f| SafeTensors::deserialize(&f.map).map_err(|e| MergeError::Read { path: f.path.clone(), reason: format!("not a valid safetensors file: {e}") }))
        .collect::<Result<Vec<_>, MergeError>>()?;
    let paths: Vec<&Path> = files.iter().map(|f| f.path.as_path()).collect();
    let keys = common_keys(&tensors, &paths)?;

    let mut writer = SafetensorsTapWriter::new(out)?;
    let mut summary = MergeSummary { ranks: files.len(), ..Default::default() };
    let mut used = BTreeSet::new();
    for key in &keys {
        match TapId::parse_key(key) {
            Some(tap) => {
                let (rule, pattern) = spec.rule_for(&tap).ok_or_else(|| MergeError::NoRule {
                    key: key.clone(),
                    spec: spec.origin.clone(),
                    tried: ShardSpec::patterns(&tap).iter().map(|p| format!("{p:?}")).collect::<Vec<_>>().join(", "),
                })?;
                if let Some(p) = pattern {
                    used.insert(p.to_string());
                }
                let slices = tensors.iter().zip(&paths).map(|(st, p)| read_tap(st, p, key)).collect::<Result<Vec<_>, _>>()?;
                let (shape, data) = match rule {
                    Rule::Split(axis) => {
                        summary.split += 1;
                        concat(key, axis, &slices, &paths)?
                    }
                    Rule::Sum => {
                        summary.summed += 1;
                        sum(key, &slices, &paths)?
                    }
                    Rule::Replicated => {
                        summary.replicated += 1;
                        let d = agree(key, &slices, &paths, spec.tolerance)?;
                        summary.max_replicated_diff = summary.max_replicated_diff.max(d);
                        let (s, v) = slices.into_iter().next().expect("at least one rank");
                        (s, v)
                    }
                };
                writer.record(tap.step, &tap.tap, shape, &data)?;
            }
            None => {
                summary.other += 1;
                write_other(&mut writer, key, &tensors, &paths)?;
            }
        }
    }
    writer.finish()?;
    summary.unused_patterns = spec.taps.keys().filter(|p| !used.contains(*p)).cloned().collect();
    Ok(summary)
}

/// The keys every rank holds; an error naming the first key some rank lacks.
fn common_keys(tensors: &[SafeTensors<'_>], paths: &[&Path]) -> Result<Vec<String>, MergeError> {
    let sets: Vec<BTreeSet<String>> = tensors.iter().map(|t| t.names().into_iter().map(String::from).collect()).collect();
    let all: BTreeSet<&String> = sets.iter().flatten().collect();
    let partial: Vec<&&String> = all.iter().filter(|k| !sets.iter().all(|s| s.contains(**k))).collect();
    if let Some(first) = partial.first() {
        let who = |has: bool| {
            let r: Vec<String> =
                sets.iter().enumerate().filter(|(_, s)| s.contains(**first) == has).map(|(i, _)| format!("rank {i} ({})", paths[i].display())).collect();
            r.join(", ")
        };
        let more = if partial.len() > 1 {
            let next: Vec<&str> = partial.iter().skip(1).take(5).map(|k| k.as_str()).collect();
            format!(" ({} more keys are missing on some rank: {}{})", partial.len() - 1, next.join(", "), if partial.len() > 6 { ", …" } else { "" })
        } else {
            String::new()
        };
        return Err(MergeError::MissingTap { key: (*first).to_string(), present: who(true), missing: who(false), more });
    }
    Ok(sets.into_iter().next().unwrap_or_default().into_iter().collect())
}

/// A float tensor as f32 values (f16/bf16 exactly, f64 rounded to nearest).
fn floats(st: &SafeTensors<'_>, path: &Path, key: &str) -> Result<(Vec<usize>, Vec<f32>), MergeError> {
    let t = st.tensor(key).map_err(|e| MergeError::Read { path: path.to_path_buf(), reason: format!("tensor {key:?}: {e}") })?;
    let b = t.data();
    let v: Vec<f32> = match t.dtype() {
        Dtype::F32 => b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        Dtype::F16 => b.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        Dtype::BF16 => b.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        Dtype::F64 => b.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")) as f32).collect(),
        d => {
            return Err(MergeError::Dtype { path: path.to_path_buf(), key: key.into(), dtype: format!("{d:?}"), expected: "F32, F16, BF16 or F64".into() });
        }
    };
    Ok((t.shape().to_vec(), v))
}

/// One rank's slice of a tap: 4-D shape (left-padded with 1s) and f32 values.
fn read_tap(st: &SafeTensors<'_>, path: &Path, key: &str) -> Result<([usize; 4], Vec<f32>), MergeError> {
    let (shape, v) = floats(st, path, key)?;
    if shape.len() > 4 {
        return Err(MergeError::TooManyDims { path: path.to_path_buf(), key: key.into(), shape });
    }
    let mut s4 = [1usize; 4];
    s4[4 - shape.len()..].copy_from_slice(&shape);
    Ok((s4, v))
}

fn shapes_list(slices: &[([usize; 4], Vec<f32>)], paths: &[&Path]) -> String {
    let mut s = String::new();
    for (i, ((shape, _), p)) in slices.iter().zip(paths).enumerate() {
        let _ = write!(s, "{}rank {i} ({}) {shape:?}", if i > 0 { ", " } else { "" }, p.display());
    }
    s
}

/// Concatenates the slices on `axis`: every other axis must agree.
fn concat(key: &str, axis: usize, slices: &[([usize; 4], Vec<f32>)], paths: &[&Path]) -> Result<([usize; 4], Vec<f32>), MergeError> {
    let first = slices[0].0;
    for (i, (s, _)) in slices.iter().enumerate() {
        if let Some(ax) = (0..4).find(|&a| a != axis && s[a] != first[a]) {
            return Err(MergeError::NotConcatenable {
                key: key.into(),
                rule: Rule::Split(axis),
                reason: format!("rank {i} differs from rank 0 on axis {ax} ({} vs {}), and only axis {axis} may differ", s[ax], first[ax]),
                shapes: shapes_list(slices, paths),
            });
        }
    }
    // [outer, len_r, inner] per rank, row-major: the merged tensor takes each rank's len_r·inner block in turn.
    let outer: usize = first[..axis].iter().product();
    let inner: usize = first[axis + 1..].iter().product();
    let mut shape = first;
    shape[axis] = slices.iter().map(|(s, _)| s[axis]).sum();
    let mut data = Vec::with_capacity(shape.iter().product());
    for o in 0..outer {
        for (s, v) in slices {
            let block = s[axis] * inner;
            data.extend_from_slice(&v[o * block..(o + 1) * block]);
        }
    }
    Ok((shape, data))
}

fn same_shapes(key: &str, rule: Rule, slices: &[([usize; 4], Vec<f32>)], paths: &[&Path]) -> Result<(), MergeError> {
    if let Some(i) = slices.iter().position(|(s, _)| *s != slices[0].0) {
        return Err(MergeError::NotConcatenable {
            key: key.into(),
            rule,
            reason: format!("rank {i} has shape {:?}, rank 0 {:?}: every rank must hold the whole tensor", slices[i].0, slices[0].0),
            shapes: shapes_list(slices, paths),
        });
    }
    Ok(())
}

/// Sums partials in f64, in rank order, rounding once.
fn sum(key: &str, slices: &[([usize; 4], Vec<f32>)], paths: &[&Path]) -> Result<([usize; 4], Vec<f32>), MergeError> {
    same_shapes(key, Rule::Sum, slices, paths)?;
    let n = slices[0].1.len();
    let data = (0..n).map(|i| slices.iter().map(|(_, v)| v[i] as f64).sum::<f64>() as f32).collect();
    Ok((slices[0].0, data))
}

/// Checks that every rank's copy equals rank 0's within `tolerance`; returns the largest difference.
fn agree(key: &str, slices: &[([usize; 4], Vec<f32>)], paths: &[&Path], tolerance: f64) -> Result<f64, MergeError> {
    same_shapes(key, Rule::Replicated, slices, paths)?;
    let (shape, a) = &slices[0];
    let mut worst = 0.0f64;
    for (rank, (_, b)) in slices.iter().enumerate().skip(1) {
        let mut max_abs = 0.0f64;
        let mut at = 0;
        let (mut num, mut den) = (0.0f64, 0.0f64);
        for (i, (&x, &y)) in a.iter().zip(b).enumerate() {
            // identical bits agree (NaN included); a NaN against anything else is an infinite gap
            let d = if x.to_bits() == y.to_bits() {
                0.0
            } else if x.is_nan() || y.is_nan() {
                f64::INFINITY
            } else {
                (x as f64 - y as f64).abs()
            };
            if d > max_abs {
                max_abs = d;
                at = i;
            }
            if d.is_finite() {
                num += d * d;
            }
            den += (x as f64) * (x as f64);
        }
        if max_abs > tolerance {
            let index = unravel(at, shape);
            let rel_l2 = if den > 0.0 { (num / den).sqrt() } else { f64::INFINITY };
            return Err(MergeError::Disagree { key: key.into(), rank, path: paths[rank].to_path_buf(), max_abs, index, a: a[at], b: b[at], rel_l2, tolerance });
        }
        worst = worst.max(max_abs);
    }
    Ok(worst)
}

fn unravel(mut i: usize, shape: &[usize; 4]) -> Vec<usize> {
    let mut idx = vec![0; 4];
    for a in (0..4).rev() {
        idx[a] = i % shape[a].max(1);
        i /= shape[a].max(1);
    }
    idx
}

/// A non-tap tensor (`tokens`, `continuation`, …): identical on every rank, written as i32 or f32.
fn write_other(writer: &mut SafetensorsTapWriter, key: &str, tensors: &[SafeTensors<'_>], paths: &[&Path]) -> Result<(), MergeError> {
    let views = tensors
        .iter()
        .zip(paths)
        .map(|(st, p)| st.tensor(key).map_err(|e| MergeError::Read { path: p.to_path_buf(), reason: format!("tensor {key:?}: {e}") }))
        .collect::<Result<Vec<_>, _>>()?;
    let v0 = &views[0];
    for (rank, v) in views.iter().enumerate().skip(1) {
        if v.dtype() != v0.dtype() || v.shape() != v0.shape() || v.data() != v0.data() {
            let what = if v.dtype() != v0.dtype() {
                format!("dtype {:?} vs {:?}", v.dtype(), v0.dtype())
            } else if v.shape() != v0.shape() {
                format!("shape {:?} vs {:?}", v.shape(), v0.shape())
            } else {
                let size = v.dtype().bitsize() / 8;
                let first = v.data().chunks(size.max(1)).zip(v0.data().chunks(size.max(1))).position(|(x, y)| x != y).unwrap_or(0);
                format!("first difference at element {first}")
            };
            return Err(MergeError::NotIdentical { key: key.into(), rank, path: paths[rank].to_path_buf(), what });
        }
    }
    match v0.dtype() {
        Dtype::I32 => {
            let ids: Vec<i32> = v0.data().chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
            writer.set_i32(key, v0.shape().to_vec(), &ids)?;
        }
        _ => {
            let (shape, v) = floats(&tensors[0], paths[0], key).map_err(|e| match e {
                MergeError::Dtype { path, key, dtype, .. } => {
                    MergeError::Dtype { path, key, dtype, expected: "I32, F32, F16, BF16 or F64 for a non-tap tensor".into() }
                }
                e => e,
            })?;
            writer.set_f32(key, shape, &v)?;
        }
    }
    Ok(())
}
