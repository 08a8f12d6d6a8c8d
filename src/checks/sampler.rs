//! Check 8: the engine's sampler against the exact distribution, computed here in f64 in llama.cpp's
//! order (top-k → top-p on the softmax of the surviving raw logits → temperature → softmax), from a fixed
//! logit vector: 10,000 seeded draws, chi-square goodness of fit (statrs). Deterministic via the seed.

use super::{CheckResult, Op, Tolerances};
use rand::{Rng, SeedableRng};
use statrs::distribution::{ChiSquared, ContinuousCDF};

/// Sampling parameters of the check.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Params {
    pub temperature: f64,
    pub top_k: usize,
    pub top_p: f64,
}

pub const PARAMS: Params = Params { temperature: 0.8, top_k: 40, top_p: 0.95 };
pub const DRAWS: usize = 10_000;
pub const SEED: u64 = 0x010c_57e9;

/// The fixed logit vector: 512 ids, deterministic (ChaCha8, seed 7), spread so that top-k and top-p
/// both cut.
pub fn fixed_logits() -> Vec<f32> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    (0..512).map(|i| if i % 97 == 3 { 6.0 + rng.random::<f32>() } else { 4.0 * rng.random::<f32>() - 1.0 }).collect()
}

/// The exact distribution over the vocabulary (zeros outside the kept set), in f64.
pub fn reference_distribution(logits: &[f32], p: &Params) -> Vec<f64> {
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    if p.top_k > 0 {
        idx.truncate(p.top_k.min(idx.len()));
    }
    // top-p on the softmax of the raw (untempered) surviving logits; keep through the crossing token.
    let m = logits[idx[0]] as f64;
    let w: Vec<f64> = idx.iter().map(|&i| (logits[i] as f64 - m).exp()).collect();
    let z: f64 = w.iter().sum();
    let mut cum = 0.0;
    let mut keep = idx.len();
    for (n, wi) in w.iter().enumerate() {
        cum += wi / z;
        if cum >= p.top_p {
            keep = n + 1;
            break;
        }
    }
    idx.truncate(keep.max(1));
    let t = p.temperature;
    let w: Vec<f64> = idx.iter().map(|&i| ((logits[i] as f64 - m) / t).exp()).collect();
    let z: f64 = w.iter().sum();
    let mut out = vec![0.0; logits.len()];
    for (&i, wi) in idx.iter().zip(&w) {
        out[i] = wi / z;
    }
    out
}

/// Chi-square goodness of fit of `counts` (per id) against `probs`; bins with expected < 5 merge into
/// one. A draw outside the support gives an infinite statistic. Returns (statistic, dof, p-value).
pub fn chi_square(counts: &[u64], probs: &[f64]) -> (f64, usize, f64) {
    let n: u64 = counts.iter().sum();
    let n = n as f64;
    let (mut stat, mut bins, mut small_o, mut small_e) = (0.0, 0usize, 0.0, 0.0);
    for (&c, &p) in counts.iter().zip(probs) {
        let e = p * n;
        if p == 0.0 {
            if c > 0 {
                return (f64::INFINITY, 0, 0.0);
            }
            continue;
        }
        if e < 5.0 {
            small_o += c as f64;
            small_e += e;
            continue;
        }
        stat += (c as f64 - e).powi(2) / e;
        bins += 1;
    }
    if small_e > 0.0 {
        stat += (small_o - small_e).powi(2) / small_e;
        bins += 1;
    }
    let dof = bins.saturating_sub(1).max(1);
    let pv = 1.0 - ChiSquared::new(dof as f64).expect("dof ≥ 1").cdf(stat);
    (stat, dof, pv)
}

/// Runs the check. `draw` samples one id from `logits` (the engine's seeded sampler, called DRAWS
/// times in a row); `engine_dist`, if the engine exposes its distribution, is compared too.
pub fn check(mut draw: impl FnMut(&[f32]) -> u32, engine_dist: Option<Vec<f64>>, tol: &Tolerances) -> Vec<CheckResult> {
    let logits = fixed_logits();
    let want = reference_distribution(&logits, &PARAMS);
    let mut counts = vec![0u64; logits.len()];
    let mut outside = 0;
    for _ in 0..DRAWS {
        match counts.get_mut(draw(&logits) as usize) {
            Some(c) => *c += 1,
            None => outside += 1,
        }
    }
    let (stat, dof, pv) = if outside > 0 { (f64::INFINITY, 0, 0.0) } else { chi_square(&counts, &want) };
    let l = tol.get("sampler.p_value");
    let mut out = vec![CheckResult::new("sampler:chi_square", "p-value", pv, Op::Ge, l.value)
        .with_detail(format!("χ² = {stat:.1}, dof {dof}, {DRAWS} draws at T {} top-k {} top-p {}", PARAMS.temperature, PARAMS.top_k, PARAMS.top_p))
        .with_reason(Some(l.reason))];
    if let Some(d) = engine_dist {
        let tv = if d.len() == want.len() { 0.5 * d.iter().zip(&want).map(|(a, b)| (a - b).abs()).sum::<f64>() } else { 1.0 };
        let l = tol.get("sampler.tv");
        out.push(CheckResult::new("sampler:distribution", "total variation vs f64 reference", tv, Op::Le, l.value).with_reason(Some(l.reason)));
    }
    out
}

/// Inverse-CDF sampling from a distribution (a correct reference sampler, used by tests).
pub fn draw_from(probs: &[f64], rng: &mut impl Rng) -> u32 {
    let u: f64 = rng.random();
    let mut cum = 0.0;
    for (i, &p) in probs.iter().enumerate() {
        cum += p;
        if u < cum {
            return i as u32;
        }
    }
    probs.iter().rposition(|&p| p > 0.0).unwrap_or(0) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_cuts_where_llama_cpp_does() {
        let d = reference_distribution(&fixed_logits(), &PARAMS);
        let kept = d.iter().filter(|&&p| p > 0.0).count();
        assert!(kept > 1 && kept <= 40, "{kept}");
        assert!((d.iter().sum::<f64>() - 1.0).abs() < 1e-12);
    }

    #[test]
    fn a_correct_sampler_passes_and_wrong_ones_fail() {
        let tol = Tolerances::new(crate::vocab::Tier::Exact);
        let want = reference_distribution(&fixed_logits(), &PARAMS);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(SEED);
        let r = check(|_| draw_from(&want, &mut rng), Some(want.clone()), &tol);
        assert!(r.iter().all(|c| c.passed), "{r:?}");
        // Temperature ignored.
        let wrong = reference_distribution(&fixed_logits(), &Params { temperature: 1.0, ..PARAMS });
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(SEED);
        let r = check(|_| draw_from(&wrong, &mut rng), Some(wrong.clone()), &tol);
        assert!(r.iter().all(|c| !c.passed), "{r:?}");
        // No top-k: draws outside the support.
        let wide = reference_distribution(&fixed_logits(), &Params { top_k: 0, top_p: 1.0, ..PARAMS });
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(SEED);
        assert!(!check(|_| draw_from(&wide, &mut rng), None, &tol)[0].passed);
    }
}
