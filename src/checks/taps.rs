//! Check 2: every tap of every step against the golden (rel L2, max abs, cosine, NMSE).

use super::{CheckResult, Op, TapSource, Tolerances};
use crate::golden::{TapsFile, Tensor};
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
    /// `None` when the engine did not dump the tap or its shape differs (see `problem`).
    pub errors: Option<TensorErrors>,
    /// The whole-tensor rel L2 limit.
    pub limit: f64,
    /// The limit each token row's rel L2 must stay under.
    pub row_limit: f64,
    /// How the limits were set (calibrated on llama.cpp's noise, or the tier's fixed limit).
    pub basis: String,
    pub passed: bool,
    /// The engine did not provide this tap: neither a pass nor a failure, and never the first divergence.
    pub not_dumped: bool,
    /// The shape mismatch message, or "not dumped".
    pub problem: Option<String>,
    /// rel L2 per token row along the token axis (index within this step, or within the kept rows of a
    /// row-subset tap: see `positions`).
    pub per_position: Vec<f64>,
    /// The positions of `per_position`'s entries when the golden keeps a subset of the tap's rows
    /// (src/rows.rs); empty: entry i is position i.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub positions: Vec<usize>,
    /// rel L2 per head for attention-shaped taps (`kq`, `kq_soft_max`, `kqv`, `*.rope`).
    pub per_head: Vec<f64>,
}

impl TapComparison {
    pub fn rel_l2(&self) -> f64 {
        self.errors.map_or(f64::INFINITY, |e| e.rel_l2)
    }
    /// The position (within the step) of row `i` of `per_position`.
    pub fn position(&self, i: usize) -> usize {
        self.positions.get(i).copied().unwrap_or(i)
    }
    /// Positions (within the step) whose rel L2 exceeds the row limit.
    pub fn bad_positions(&self) -> Vec<usize> {
        self.per_position.iter().enumerate().filter(|(_, &e)| !(e <= self.row_limit)).map(|(i, _)| self.position(i)).collect()
    }
    /// The position and rel L2 of the worst row (None for a tap without rows).
    pub fn worst_row(&self) -> Option<(usize, f64)> {
        self.per_position.iter().copied().enumerate().max_by(|a, b| a.1.total_cmp(&b.1)).map(|(i, e)| (self.position(i), e))
    }
    /// Compared and found outside its limits (a missing tap is not a failure).
    pub fn failed(&self) -> bool {
        !self.passed && !self.not_dumped
    }
}

/// The limits of one tap: `(whole-tensor limit, per-row limit, basis)`.
///
/// With a calibrated golden (the manifest records llama.cpp's own noise per tap), the limit is
/// `max(floor, k × noise)`: llama.cpp's f32 result is itself `noise` away from an f64 evaluation of the
/// same graph, and a correct engine that sums in another order is about as far on the other side; `k`
/// and `floor` come from the suite (or the tier's defaults), each with its measured reason. Without a
/// calibration, the tier's fixed limit for the tap family. Either way, an engine that stored the tap in
/// f16 or bf16 gets that format's unit roundoff added (rel L2 of a rounding ≤ its unit roundoff).
pub fn tap_limits(id: &TapId, golden: &TapsFile, engine: &dyn TapSource, tol: &Tolerances) -> (f64, f64, String) {
    let storage = super::invariants::storage_roundoff(engine, &id.key());
    let what = match engine.stored_dtype(&id.key()) {
        Some(d) if storage > 0.0 => format!(" + {} storage {storage:.1e}", format!("{d:?}").to_lowercase()),
        _ => String::new(),
    };
    let (whole, row, basis) = calibrated_limits(id, golden, tol).unwrap_or_else(|| {
        let l = tol.get(&format!("taps.rel_l2:{}", id.family_stage())).value;
        (l, l, format!("fixed {} limit (golden not calibrated)", tol.tier))
    });
    (whole + storage, row + storage, format!("{basis}{what}"))
}

/// `max(floor, k × noise)` for the whole tensor and for one row, when the golden records llama.cpp's
/// noise for this tap.
pub fn calibrated_limits(id: &TapId, golden: &TapsFile, tol: &Tolerances) -> Option<(f64, f64, String)> {
    let n = golden.noise.get(&id.key())?;
    let fam = id.family_stage();
    let k = tol.get(&format!("taps.noise_k:{fam}")).value;
    let floor = tol.get(&format!("taps.noise_floor:{fam}")).value;
    Some((floor.max(k * n.rel_l2), floor.max(k * n.row_max), format!("max({floor:.0e}, {k} × llama.cpp noise {:.1e})", n.rel_l2)))
}

/// The token axis of a 4-D tap (a row is one token): 2 for activations `[1, 1, tokens, width]` and the
/// heads-first attention taps `[1, heads, tokens, …]` (`kq`, `kq_soft_max`, `kqv`); 1 for per-head taps
/// `[1, tokens, heads, head_dim]`: RoPE's output, and before it Q/K/V split into heads, gemma3's
/// `Qcur_normed`/`Kcur_normed` and the RMSNorm of each head (`norm-L.rms_norm.1`/`.2`, same layout).
/// Per-head taps are told by name (`.rope`, `*_normed`) or by shape: tokens on axis 1 (> 1 at a prefill),
/// or more than one row on axis 2 at a decode step, which holds one token (a one-token prompt's
/// `norm-L.rms_norm.1` `[1, 1, heads, head_dim]` is the one shape this cannot tell from `heads` tokens).
/// ci/golden/noise.py's `token_axis` is the same rule: the noise records' `row_max` is over these rows.
pub fn token_axis(id: &TapId, shape: &[usize]) -> usize {
    if shape.len() != 4 || matches!(id.family.as_str(), "kq" | "kq_soft_max" | "kqv") {
        return 2;
    }
    let per_head_name = id.stage.as_deref() == Some("rope") || matches!(id.family.as_str(), "Qcur_normed" | "Kcur_normed");
    let per_head_shape = shape[1] != 1 || (id.step > 0 && shape[2] != 1);
    if per_head_name || per_head_shape {
        1
    } else {
        2
    }
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

/// Compares one tensor pair against a whole-tensor limit and a per-row limit.
pub fn compare_one(id: &TapId, engine: &Tensor, golden: &Tensor, limit: f64, row_limit: f64) -> TapComparison {
    let key = id.key();
    let base = TapComparison {
        id: id.clone(),
        key: key.clone(),
        shape: golden.shape.clone(),
        errors: None,
        limit,
        row_limit,
        basis: String::new(),
        passed: false,
        not_dumped: false,
        problem: None,
        per_position: Vec::new(),
        positions: Vec::new(),
        per_head: Vec::new(),
    };
    if let Err(e) = check_shapes(&key, &engine.shape, &golden.shape) {
        return TapComparison { problem: Some(e.to_string()), ..base };
    }
    let errors = tensor_errors(&engine.data, &golden.data);
    let shape4 = if golden.shape.len() == 4 { golden.shape.clone() } else { Vec::new() };
    let per_position = per_slice_rel_l2(&engine.data, &golden.data, &shape4, token_axis(id, &shape4));
    let per_head = head_axis(id, &shape4).map_or(Vec::new(), |a| per_slice_rel_l2(&engine.data, &golden.data, &shape4, a));
    let rows_ok = per_position.iter().all(|&e| e <= row_limit);
    TapComparison { errors: Some(errors), passed: errors.rel_l2 <= limit && rows_ok, per_position, per_head, ..base }
}

/// Compares every golden tap (graph order) with the engine's. A tap the engine did not provide is
/// marked `not_dumped`. `steps` limits the comparison to those steps (None: all the golden holds).
/// A row-subset tap (src/rows.rs) is compared on the rows the golden keeps, its `positions` set.
pub fn compare_all(golden: &TapsFile, engine: &dyn TapSource, tol: &Tolerances, steps: Option<usize>) -> crate::error::Result<Vec<TapComparison>> {
    let cut = crate::rows::RowCut::new(golden, engine)?;
    let engine: &dyn TapSource = &cut;
    let mut out = Vec::new();
    for id in golden.taps() {
        if steps.is_some_and(|s| id.step > s) {
            continue;
        }
        let (limit, row_limit, basis) = tap_limits(&id, golden, engine, tol);
        let g = golden.f32(&id.key())?;
        let cmp = match engine.tensor(&id.key()) {
            None => TapComparison {
                key: id.key(),
                shape: g.shape.clone(),
                errors: None,
                limit,
                row_limit,
                basis,
                passed: false,
                not_dumped: true,
                problem: Some("not dumped".into()),
                per_position: Vec::new(),
                positions: Vec::new(),
                per_head: Vec::new(),
                id: id.clone(),
            },
            Some(e) => TapComparison {
                basis,
                positions: cut.positions(&id.key()).map(<[usize]>::to_vec).unwrap_or_default(),
                ..compare_one(&id, &e?, &g, limit, row_limit)
            },
        };
        out.push(cmp);
    }
    Ok(out)
}

/// Summarizes comparisons into one verdict per tap family (worst over layers and steps, as the
/// ratio of the error to its limit, whole tensor or worst row), plus one for misshapen taps and, when
/// `require_all`, one for taps the engine did not provide (our own backends must produce every tap).
pub fn summarize(cmps: &[TapComparison], tol: &Tolerances, require_all: bool) -> Vec<CheckResult> {
    // family → (worst ratio, its key, detail)
    let mut fam: BTreeMap<String, (f64, String, String)> = BTreeMap::new();
    let (mut missing, mut shape_bad, mut first_missing, mut first_shape) = (0usize, 0usize, None, None);
    for c in cmps {
        if c.not_dumped {
            missing += 1;
            first_missing.get_or_insert_with(|| c.key.clone());
            continue;
        }
        if c.errors.is_none() {
            shape_bad += 1;
            first_shape.get_or_insert_with(|| format!("{}: {}", c.key, c.problem.clone().unwrap_or_default()));
            continue;
        }
        let whole = c.rel_l2() / c.limit;
        let (row_at, row) = c.worst_row().unwrap_or((0, 0.0));
        let row_ratio = row / c.row_limit;
        let ratio = if row_ratio.is_nan() || whole.is_nan() { f64::NAN } else { whole.max(row_ratio) };
        let e = fam.entry(c.id.family_stage()).or_insert((f64::NEG_INFINITY, String::new(), String::new()));
        if !(ratio <= e.0) {
            let detail = format!(
                "worst at {}: rel_l2 {:.2e} (limit {:.2e}), worst row {row_at} {:.2e} (row limit {:.2e}); limit = {}",
                c.key,
                c.rel_l2(),
                c.limit,
                row,
                c.row_limit,
                c.basis
            );
            *e = (ratio, c.key.clone(), detail);
        }
    }
    let mut res: Vec<CheckResult> = fam
        .into_iter()
        .map(|(f, (v, _key, detail))| {
            let k = tol.get(&format!("taps.noise_k:{f}"));
            let reason = format!("{} / {}", k.reason, tol.get(&format!("taps.rel_l2:{f}")).reason);
            CheckResult::new(format!("taps:{f}"), "error / limit", v, Op::Le, 1.0).with_detail(detail).with_reason(Some(reason))
        })
        .collect();
    if shape_bad > 0 {
        res.push(
            CheckResult::new("taps:misshapen", "count", shape_bad as f64, Op::Le, 0.0)
                .with_detail(format!("{shape_bad} taps with the wrong shape; first: {}", first_shape.unwrap_or_default())),
        );
    }
    if require_all && missing > 0 {
        res.push(
            CheckResult::new("taps:not_produced", "count", missing as f64, Op::Le, 0.0)
                .with_detail(format!("{missing} golden taps the backend did not produce; first: {}", first_missing.unwrap_or_default())),
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
        let c = compare_one(&id, &e, &g, 1e-5, 1e-5);
        assert!(!c.passed);
        assert_eq!(c.bad_positions(), vec![1]);
        assert!(c.per_head[0] == 0.0 && c.per_head[1] > 0.0);
        let bad = Tensor { shape: vec![1, 3, 4, 1], data: g.data.clone() };
        let c = compare_one(&id, &bad, &g, 1e-5, 1e-5);
        assert!(c.problem.unwrap().contains("shape mismatch"));
    }

    /// gemma3-270m's shapes (6-token prompt, 4 query heads and 1 KV head of 256, width 640): every row is
    /// one token. The same table is in tests/outside_engine (noise.py's `token_axis`).
    #[test]
    fn token_axis_is_per_token_for_gemma3_per_head_taps() {
        let cases: [(&str, [usize; 4], usize); 16] = [
            ("s0/Qcur_normed-0", [1, 6, 4, 256], 1),
            ("s0/Kcur_normed-0", [1, 6, 1, 256], 1),
            ("s0/norm-0.rms_norm.1", [1, 6, 4, 256], 1),
            ("s0/norm-0.rms_norm.2", [1, 6, 1, 256], 1),
            ("s0/Qcur-0.rope", [1, 6, 4, 256], 1),
            ("s0/norm-0.rms_norm.0", [1, 1, 6, 640], 2),
            ("s0/Qcur-0.mul_mat", [1, 1, 6, 1024], 2),
            ("s0/kq_soft_max-0", [1, 4, 6, 6], 2),
            ("s0/kqv-0", [1, 4, 6, 256], 2),
            ("s0/norm.rms_norm.14", [1, 1, 6, 640], 2),
            // Decode steps hold one token: a per-head tap's 4 heads on axis 2 are not 4 rows.
            ("s1/Qcur_normed-0", [1, 1, 4, 256], 1),
            ("s1/norm-0.rms_norm.1", [1, 1, 4, 256], 1),
            ("s1/Qcur-0.rope", [1, 1, 4, 256], 1),
            ("s1/kq-0", [1, 4, 1, 7], 2),
            ("s1/l_out-0", [1, 1, 1, 640], 2),
            // A one-token prompt: the name still says it.
            ("s0/Qcur_normed-0", [1, 1, 4, 256], 1),
        ];
        for (key, shape, want) in cases {
            assert_eq!(token_axis(&TapId::parse_key(key).unwrap(), &shape), want, "{key} {shape:?}");
        }
        // Per-token rows of a per-head tap: an error in one head of token 2 is token 2's.
        let id = TapId::parse_key("s0/norm-0.rms_norm.1").unwrap();
        let g = Tensor { shape: vec![1, 3, 2, 2], data: (0..12).map(|v| v as f32 + 1.0).collect() };
        let mut e = g.clone();
        e.data[2 * 4 + 3] += 1.0;
        let c = compare_one(&id, &e, &g, 1.0, 1e-5);
        assert_eq!((c.per_position.len(), c.bad_positions()), (3, vec![2]));
    }
}
