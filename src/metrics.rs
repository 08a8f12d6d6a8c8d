//! Comparison metrics between an engine tensor and its golden, all accumulated in f64.
//!
//! Shapes are compared after dropping leading 1s (`[1, 1, 5, 896]` equals `[5, 896]`).

use crate::error::{Error, Result};
use serde::Serialize;

/// Drops leading 1s: `[1, 1, 5, 896]` → `[5, 896]`; a scalar stays `[1]`.
pub fn squeeze_leading(shape: &[usize]) -> Vec<usize> {
    let first = shape.iter().position(|&d| d != 1).unwrap_or(shape.len().saturating_sub(1));
    shape[first..].to_vec()
}

/// Errors unless both shapes agree after dropping leading 1s.
pub fn check_shapes(key: &str, engine: &[usize], golden: &[usize]) -> Result<()> {
    if squeeze_leading(engine) != squeeze_leading(golden) {
        return Err(Error::Shape { key: key.to_string(), engine: engine.to_vec(), golden: golden.to_vec() });
    }
    Ok(())
}

/// Element-wise error statistics of `x` (engine) against `y` (golden).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct TensorErrors {
    /// ‖x − y‖₂ / ‖y‖₂ (‖x − y‖₂ when ‖y‖₂ = 0).
    pub rel_l2: f64,
    pub max_abs: f64,
    /// Index of the largest absolute difference (flat, row-major).
    pub argmax_abs: usize,
    /// x·y / (‖x‖‖y‖); 1 when both are zero.
    pub cosine: f64,
    /// mean((x − y)²) / mean(y²).
    pub nmse: f64,
    /// Elements that are NaN or ±Inf in x.
    pub non_finite: usize,
}

/// Computes [`TensorErrors`]; non-finite engine values make every metric infinite (never a pass).
pub fn tensor_errors(x: &[f32], y: &[f32]) -> TensorErrors {
    assert_eq!(x.len(), y.len(), "callers check shapes first");
    let (mut d2, mut y2, mut x2, mut xy, mut max_abs, mut arg, mut nf) = (0f64, 0f64, 0f64, 0f64, 0f64, 0usize, 0usize);
    for (i, (&a, &b)) in x.iter().zip(y).enumerate() {
        if !a.is_finite() {
            nf += 1;
            continue;
        }
        let (a, b) = (a as f64, b as f64);
        let d = a - b;
        d2 += d * d;
        y2 += b * b;
        x2 += a * a;
        xy += a * b;
        if d.abs() > max_abs {
            max_abs = d.abs();
            arg = i;
        }
    }
    if nf > 0 {
        let inf = f64::INFINITY;
        return TensorErrors { rel_l2: inf, max_abs: inf, argmax_abs: arg, cosine: f64::NAN, nmse: inf, non_finite: nf };
    }
    let rel_l2 = if y2 > 0.0 { (d2 / y2).sqrt() } else { d2.sqrt() };
    let cosine = if x2 == 0.0 && y2 == 0.0 {
        1.0
    } else if x2 == 0.0 || y2 == 0.0 {
        0.0
    } else {
        xy / (x2.sqrt() * y2.sqrt())
    };
    let nmse = if y2 > 0.0 { d2 / y2 } else { d2 };
    TensorErrors { rel_l2, max_abs, argmax_abs: arg, cosine, nmse, non_finite: 0 }
}

/// log-sum-exp in f64.
pub fn logsumexp(logits: &[f32]) -> f64 {
    let m = logits.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
    if !m.is_finite() {
        return m;
    }
    m + logits.iter().map(|&v| ((v as f64) - m).exp()).sum::<f64>().ln()
}

/// Softmax in f64.
pub fn softmax(logits: &[f32]) -> Vec<f64> {
    let lse = logsumexp(logits);
    logits.iter().map(|&v| ((v as f64) - lse).exp()).collect()
}

/// KL(P_golden ‖ Q_engine) over the full vocabulary, from logits, in nats.
pub fn kl_divergence(engine: &[f32], golden: &[f32]) -> f64 {
    let (lq, lp) = (logsumexp(engine), logsumexp(golden));
    golden
        .iter()
        .zip(engine)
        .map(|(&g, &e)| {
            let lpi = g as f64 - lp;
            let p = lpi.exp();
            if p == 0.0 {
                0.0
            } else {
                p * (lpi - (e as f64 - lq))
            }
        })
        .sum::<f64>()
        .max(0.0)
}

/// KL where the golden keeps only its top-k logits and its log-sum-exp: the divergence between the two
/// distributions coarse-grained to {each top-k id, "everything else"}. By the data-processing
/// inequality this is a lower bound of the full KL, and it is exact in the top-k mass.
pub fn kl_divergence_topk(engine: &[f32], golden_ids: &[u32], golden_values: &[f32], golden_lse: f64) -> f64 {
    let lq = logsumexp(engine);
    let (mut kl, mut p_top, mut q_top) = (0.0, 0.0, 0.0);
    for (&id, &v) in golden_ids.iter().zip(golden_values) {
        let lpi = v as f64 - golden_lse;
        let lqi = engine.get(id as usize).map_or(f64::NEG_INFINITY, |&e| e as f64 - lq);
        let p = lpi.exp();
        p_top += p;
        q_top += lqi.exp();
        if p > 0.0 {
            kl += p * (lpi - lqi);
        }
    }
    let (pr, qr) = ((1.0 - p_top).max(0.0), (1.0 - q_top).max(0.0));
    if pr > 1e-15 {
        kl += pr * (pr.ln() - qr.max(1e-300).ln());
    }
    kl.max(0.0)
}

/// Indices of the k largest values, largest first (ties: lower index first).
pub fn top_k(values: &[f32], k: usize) -> Vec<u32> {
    let mut idx: Vec<u32> = (0..values.len() as u32).collect();
    let k = k.min(idx.len());
    let cmp = |a: &u32, b: &u32| values[*b as usize].total_cmp(&values[*a as usize]).then(a.cmp(b));
    if k < idx.len() && k > 0 {
        idx.select_nth_unstable_by(k - 1, cmp);
    }
    idx.truncate(k);
    idx.sort_by(cmp);
    idx
}

/// Argmax (first of ties).
pub fn argmax(values: &[f32]) -> u32 {
    top_k(values, 1).first().copied().unwrap_or(0)
}

/// |top-k(a) ∩ top-k(b)| / k.
pub fn topk_overlap(a: &[u32], b: &[u32]) -> f64 {
    if a.is_empty() {
        return 1.0;
    }
    a.iter().filter(|x| b.contains(x)).count() as f64 / a.len() as f64
}

/// 0-based rank of `id` in `values` (how many values are strictly larger).
pub fn rank_of(values: &[f32], id: u32) -> usize {
    let v = values[id as usize];
    values.iter().filter(|&&x| x > v).count()
}

/// Shannon entropy (nats) of softmax(logits).
pub fn entropy(logits: &[f32]) -> f64 {
    softmax(logits).iter().filter(|&&p| p > 0.0).map(|&p| -p * p.ln()).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn squeeze() {
        assert_eq!(squeeze_leading(&[1, 1, 5, 896]), vec![5, 896]);
        assert_eq!(squeeze_leading(&[1, 1, 1, 1]), vec![1]);
        assert!(check_shapes("k", &[1, 2, 3], &[2, 3]).is_ok());
        let e = check_shapes("s0/kq-0", &[1, 2, 3], &[3, 2]).unwrap_err().to_string();
        assert!(e.contains("s0/kq-0") && e.contains("[1, 2, 3]"), "{e}");
    }

    #[test]
    fn errors() {
        let y = [3.0f32, 4.0];
        let e = tensor_errors(&[3.0, 4.5], &y);
        assert!((e.rel_l2 - 0.1).abs() < 1e-12);
        assert_eq!(e.max_abs, 0.5);
        assert_eq!(e.argmax_abs, 1);
        assert!((e.nmse - 0.01).abs() < 1e-12);
        assert_eq!(tensor_errors(&y, &y).cosine, 1.0);
        let e = tensor_errors(&[f32::NAN, 4.0], &y);
        assert_eq!(e.non_finite, 1);
        assert!(e.rel_l2.is_infinite());
    }

    #[test]
    fn kl_and_ranks() {
        let a = [1.0f32, 2.0, 3.0, 0.5];
        assert!(kl_divergence(&a, &a).abs() < 1e-12);
        let b = [3.0f32, 2.0, 1.0, 0.5];
        let kl = kl_divergence(&a, &b);
        assert!(kl > 0.5);
        // Top-k KL with every id listed equals the full KL.
        let ids = top_k(&b, 4);
        let vals: Vec<f32> = ids.iter().map(|&i| b[i as usize]).collect();
        assert!((kl_divergence_topk(&a, &ids, &vals, logsumexp(&b)) - kl).abs() < 1e-9);
        // With fewer ids it is a lower bound.
        let ids2 = top_k(&b, 2);
        let vals2: Vec<f32> = ids2.iter().map(|&i| b[i as usize]).collect();
        assert!(kl_divergence_topk(&a, &ids2, &vals2, logsumexp(&b)) <= kl + 1e-12);
        assert_eq!(top_k(&a, 2), vec![2, 1]);
        assert_eq!(rank_of(&a, 0), 2);
        assert_eq!(topk_overlap(&[1, 2], &[2, 3]), 0.5);
        assert!((entropy(&[0.0, 0.0]) - 2f64.ln()).abs() < 1e-12);
    }
}
