//! Check 2: every tap of every step against the golden (rel L2, max abs, cosine, NMSE).

use super::{CheckResult, Op, TapSource, Tolerances};
use crate::golden::{Tensor, TapsFile};
use crate::metrics::{check_shapes, tensor_errors, TensorErrors};
use crate::tapname::TapId;
use serde::Serialize;
use std::collections::BTreeMap;

/// One golden tap compared with the engine's.
#[derive(Debug, Clone, Serialize)]
pub struct TapComparison {
    pub id: TapId,
    pub key: String,
    /// The golden's shape.
    pub shape: Vec<usize>,
    /// `None` when the engine lacks the tap or its shape differs (see `problem`).
    pub errors: Option<TensorErrors>,
    pub limit: f64,
    pub passed: bool,
    /// "missing in the engine's taps", or the shape mismatch message.
    pub problem: Option<String>,
    /// rel L2 per token position along the token axis (index within this step).
    pub per_position: Vec<f64>,
    /// rel L2 per head for attention-shaped taps (`kq`, `kq_soft_max`, `kqv`, `*.rope`).
    pub per_head: Vec<f64>,
}

impl TapComparison {
    pub fn rel_l2(&self) -> f64 {
        self.errors.map_or(f64::INFINITY, |e| e.rel_l2)
    }
    /// Positions (within the step) whose rel L2 exceeds the limit.
    pub fn bad_positions(&self) -> Vec<usize> {
        self.per_position.iter().enumerate().filter(|(_, &e)| !(e <= self.limit)).map(|(i, _)| i).collect()
    }
}

/// The token axis of a 4-D tap: 1 for `[1, tokens, heads, head_dim]` (after RoPE), else 2.
pub fn token_axis(id: &TapId, shape: &[usize]) -> usize {
    let rope_like = id.stage.as_deref() == Some("rope")
        || (matches!(id.family.as_str(), "Qcur" | "Kcur" | "Vcur") && id.stage.is_none() && shape.len() == 4 && shape[1] != 1);
    if rope_like { 1 } else { 2 }
}

/// The head axis of attention-shaped taps, if any.
pub fn head_axis(id: &TapId, shape: &[usize]) -> Option<usize> {
    if shape.len() != 4 {
        return None;
    }
    match id.family.as_str() {
        "kq" | "kq_soft_max" | "kqv" => Some(1),
        _ if token_axis(id, shape) == 1 => Some(2),
        _ => None,
    }
}

/// rel L2 of each slice along `axis` of 4-D row-major tensors.
pub fn per_slice_rel_l2(x: &[f32], y: &[f32], shape: &[usize], axis: usize) -> Vec<f64> {
    if shape.len() != 4 || axis >= 4 || x.len() != y.len() {
        return Vec::new();
    }
    let n = shape[axis];
    let inner: usize = shape[axis + 1..].iter().product();
    let (mut d2, mut y2) = (vec![0f64; n], vec![0f64; n]);
    for (i, (&a, &b)) in x.iter().zip(y).enumerate() {
        let s = (i / inner) % n;
        let d = a as f64 - b as f64;
        d2[s] += if d.is_nan() { f64::INFINITY } else { d * d };
        y2[s] += (b as f64) * (b as f64);
    }
    d2.iter().zip(&y2).map(|(&d, &g)| if g > 0.0 { (d / g).sqrt() } else { d.sqrt() }).collect()
}

/// Compares one tensor pair.
pub fn compare_one(id: &TapId, engine: &Tensor, golden: &Tensor, limit: f64) -> TapComparison {
    let key = id.key();
    let base = TapComparison {
        id: id.clone(), key: key.clone(), shape: golden.shape.clone(), errors: None, limit, passed: false,
        problem: None, per_position: Vec::new(), per_head: Vec::new(),
    };
    if let Err(e) = check_shapes(&key, &engine.shape, &golden.shape) {
        return TapComparison { problem: Some(e.to_string()), ..base };
    }
    let errors = tensor_errors(&engine.data, &golden.data);
    let shape4 = if golden.shape.len() == 4 { golden.shape.clone() } else { Vec::new() };
    let per_position = per_slice_rel_l2(&engine.data, &golden.data, &shape4, token_axis(id, &shape4));
    let per_head = head_axis(id, &shape4).map_or(Vec::new(), |a| per_slice_rel_l2(&engine.data, &golden.data, &shape4, a));
    TapComparison { errors: Some(errors), passed: errors.rel_l2 <= limit, per_position, per_head, ..base }
}

/// Compares every golden tap (graph order) with the engine's; a tap the engine lacks fails as missing.
/// `steps` limits the comparison to those steps (None: all the golden holds).
pub fn compare_all(golden: &TapsFile, engine: &dyn TapSource, tol: &Tolerances, steps: Option<usize>) -> crate::error::Result<Vec<TapComparison>> {
    let mut out = Vec::new();
    for id in golden.taps() {
        if steps.is_some_and(|s| id.step > s) {
            continue;
        }
        let limit = tol.get(&format!("taps.rel_l2:{}", id.family_stage())).value;
        let g = golden.f32(&id.key())?;
        let cmp = match engine.tensor(&id.key()) {
            None => TapComparison {
                key: id.key(), shape: g.shape.clone(), errors: None, limit, passed: false,
                problem: Some("missing in the engine's taps".into()), per_position: Vec::new(), per_head: Vec::new(), id: id.clone(),
            },
            Some(e) => compare_one(&id, &e?, &g, limit),
        };
        out.push(cmp);
    }
    Ok(out)
}

/// Summarizes comparisons into one verdict per tap family (worst over layers and steps), plus one for
/// missing or misshapen taps.
pub fn summarize(cmps: &[TapComparison], tol: &Tolerances) -> Vec<CheckResult> {
    let mut fam: BTreeMap<String, (f64, String, f64)> = BTreeMap::new();
    let (mut missing, mut shape_bad, mut first_problem) = (0usize, 0usize, None);
    for c in cmps {
        if let Some(p) = &c.problem {
            if c.errors.is_none() && p.starts_with("missing") { missing += 1 } else { shape_bad += 1 }
            first_problem.get_or_insert_with(|| format!("{}: {p}", c.key));
            continue;
        }
        let e = fam.entry(c.id.family_stage()).or_insert((f64::NEG_INFINITY, String::new(), c.limit));
        let v = c.rel_l2();
        if !(v <= e.0) {
            *e = (v, c.key.clone(), c.limit);
        }
    }
    let mut res: Vec<CheckResult> = fam
        .into_iter()
        .map(|(f, (v, key, limit))| {
            let reason = tol.get(&format!("taps.rel_l2:{f}")).reason;
            CheckResult::new(format!("taps:{f}"), "max rel_l2", v, Op::Le, limit).with_detail(format!("worst at {key}")).with_reason(Some(reason))
        })
        .collect();
    if missing + shape_bad > 0 {
        res.push(
            CheckResult::new("taps:missing_or_misshapen", "count", (missing + shape_bad) as f64, Op::Le, 0.0)
                .with_detail(format!("{missing} missing, {shape_bad} wrong shape; first: {}", first_problem.unwrap_or_default())),
        );
    }
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_position_and_heads() {
        let id = TapId::parse_key("s0/Qcur-0.rope").unwrap();
        let shape = vec![1, 3, 2, 2]; // [1, tokens, heads, head_dim]
        let g = Tensor { shape: shape.clone(), data: (0..12).map(|v| v as f32 + 1.0).collect() };
        let mut e = g.clone();
        e.data[4 + 2] += 1.0; // token 1, head 1
        let c = compare_one(&id, &e, &g, 1e-5);
        assert!(!c.passed);
        assert_eq!(c.bad_positions(), vec![1]);
        assert!(c.per_head[0] == 0.0 && c.per_head[1] > 0.0);
        let bad = Tensor { shape: vec![1, 3, 4, 1], data: g.data.clone() };
        let c = compare_one(&id, &bad, &g, 1e-5);
        assert!(c.problem.unwrap().contains("shape mismatch"));
    }
}
