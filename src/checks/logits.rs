//! Check 3: logits (KL, top-1, top-5 overlap, rank of llama.cpp's argmax) and the greedy continuation
//! (exact tier: equal; shipped tier: equal until the first near-tie, where each side's token must be in
//! the other's top 5 — the vLLM rule).

use super::{CheckResult, Op, Tolerances};
use crate::error::Result;
use crate::golden::TapsFile;
use crate::metrics::{argmax, kl_divergence, kl_divergence_topk, logsumexp, rank_of, top_k, topk_overlap};

/// The golden's view of one continuation step's logits.
#[derive(Debug, Clone)]
pub enum GoldenStep {
    Full(Vec<f32>),
    /// The 64 largest logits (ids, values, largest first) and the log-sum-exp of all.
    TopK {
        ids: Vec<u32>,
        values: Vec<f32>,
        lse: f64,
    },
}

impl GoldenStep {
    pub fn top(&self, k: usize) -> Vec<u32> {
        match self {
            GoldenStep::Full(l) => top_k(l, k),
            GoldenStep::TopK { ids, values, .. } => {
                let mut order: Vec<usize> = (0..ids.len()).collect();
                order.sort_by(|&a, &b| values[b].total_cmp(&values[a]).then(ids[a].cmp(&ids[b])));
                order.into_iter().take(k).map(|i| ids[i]).collect()
            }
        }
    }
    /// KL(golden ‖ engine).
    pub fn kl(&self, engine: &[f32]) -> f64 {
        match self {
            GoldenStep::Full(l) => kl_divergence(engine, l),
            GoldenStep::TopK { ids, values, lse } => kl_divergence_topk(engine, ids, values, *lse),
        }
    }
    /// Entropy (nats) of the golden distribution coarse-grained to its top-k plus one "rest" bucket.
    pub fn coarse_entropy(&self) -> f64 {
        match self {
            GoldenStep::Full(l) => coarse_entropy(l, 64),
            GoldenStep::TopK { values, lse, .. } => coarse_entropy_from(values, *lse),
        }
    }
}

/// Entropy of softmax(logits) coarse-grained to the top `k` ids plus the rest (a lower bound of the
/// full entropy, and what the golden's top-64 can tell).
pub fn coarse_entropy(logits: &[f32], k: usize) -> f64 {
    let ids = top_k(logits, k);
    let vals: Vec<f32> = ids.iter().map(|&i| logits[i as usize]).collect();
    coarse_entropy_from(&vals, logsumexp(logits))
}

fn coarse_entropy_from(values: &[f32], lse: f64) -> f64 {
    let mut h = 0.0;
    let mut mass = 0.0;
    for &v in values {
        let p = (v as f64 - lse).exp();
        mass += p;
        if p > 0.0 {
            h -= p * p.ln();
        }
    }
    let rest = (1.0 - mass).max(0.0);
    if rest > 1e-15 {
        h -= rest * rest.ln();
    }
    h
}

/// Loads the golden's per-step logits. Layout of golden/README.md: `topk_ids` i32 `[steps, 64]`,
/// `topk_values` f32 `[steps, 64]`, `lse` f32 `[steps]`, with the full logits of a step where its
/// `s{k}/result_output` (or `logits/{k}`) is kept. Older per-step keys (`topk/{k}/ids`) are read too.
pub fn load_golden(golden: &TapsFile) -> Result<Vec<GoldenStep>> {
    let full = |k: usize| -> Result<Option<Vec<f32>>> {
        for key in [format!("s{k}/result_output"), format!("logits/{k}")] {
            if golden.contains(&key) {
                return Ok(Some(golden.f32(&key)?.data));
            }
        }
        Ok(None)
    };
    let mut out = Vec::new();
    if golden.contains("topk_ids") {
        let shape = golden.shape("topk_ids").unwrap_or_default();
        let (n, k) = (shape.first().copied().unwrap_or(0), shape.get(1).copied().unwrap_or(0));
        let ids = golden.ints("topk_ids")?;
        let values = golden.f32("topk_values")?.data;
        let lse = golden.f32("lse")?.data;
        for s in 0..n {
            if let Some(l) = full(s)? {
                out.push(GoldenStep::Full(l));
                continue;
            }
            out.push(GoldenStep::TopK {
                ids: ids[s * k..(s + 1) * k].iter().map(|&v| v as u32).collect(),
                values: values[s * k..(s + 1) * k].to_vec(),
                lse: lse.get(s).copied().unwrap_or(f32::NAN) as f64,
            });
        }
        return Ok(out);
    }
    for k in 0.. {
        if let Some(l) = full(k)? {
            out.push(GoldenStep::Full(l));
            continue;
        }
        let ids = format!("topk/{k}/ids");
        if !golden.contains(&ids) {
            break;
        }
        let ids: Vec<u32> = golden.ints(&ids)?.into_iter().map(|v| v as u32).collect();
        let values = golden.f32(&format!("topk/{k}/values"))?.data;
        let lse = golden.f32(&format!("lse/{k}"))?.data.first().copied().unwrap_or(f32::NAN) as f64;
        out.push(GoldenStep::TopK { ids, values, lse });
    }
    Ok(out)
}

/// Logit checks over the steps both sides have. `engine[k]` are the engine's logits at continuation
/// step k, computed on the golden's tokens (teacher forcing), so every step is comparable.
pub fn check(engine: &[Vec<f32>], golden: &[GoldenStep], continuation: &[u32], tol: &Tolerances) -> Vec<CheckResult> {
    let n = engine.len().min(golden.len());
    if n == 0 {
        return vec![CheckResult::new("logits", "steps compared", 0.0, Op::Ge, 1.0).with_detail("no logits on one side")];
    }
    let (mut kl_max, mut kl_at, mut top1, mut top5, mut rank_max, mut rank_at) = (0f64, 0, 0usize, 0f64, 0usize, 0);
    for k in 0..n {
        let e = &engine[k];
        let kl = golden[k].kl(e);
        if !(kl <= kl_max) {
            kl_max = kl;
            kl_at = k;
        }
        let g5 = golden[k].top(5);
        let e5 = top_k(e, 5);
        if g5.first() == e5.first() {
            top1 += 1;
        }
        top5 += topk_overlap(&g5, &e5);
        let r = g5.first().map_or(0, |&g| if (g as usize) < e.len() { rank_of(e, g) } else { usize::MAX });
        if r > rank_max {
            rank_max = r;
            rank_at = k;
        }
    }
    let lim = |m: &str| tol.get(&format!("logits.{m}"));
    let (kl_l, t1_l, t5_l, r_l) = (lim("kl"), lim("top1"), lim("top5"), lim("rank"));
    let mut res = vec![
        CheckResult::new("logits:kl", "max KL(golden‖engine) nats", kl_max, Op::Le, kl_l.value)
            .with_detail(format!("worst at step {kl_at}"))
            .with_reason(Some(kl_l.reason)),
        CheckResult::new("logits:top1", "top-1 agreement", top1 as f64 / n as f64, Op::Ge, t1_l.value).with_reason(Some(t1_l.reason)),
        CheckResult::new("logits:top5", "mean top-5 overlap", top5 / n as f64, Op::Ge, t5_l.value).with_reason(Some(t5_l.reason)),
        CheckResult::new("logits:rank", "max rank of golden argmax", rank_max as f64, Op::Le, r_l.value)
            .with_detail(format!("worst at step {rank_at}"))
            .with_reason(Some(r_l.reason)),
    ];
    res.push(continuation_check(engine, golden, continuation, tol.tier == crate::vocab::Tier::Shipped));
    res
}

/// Greedy continuation: the engine's argmax at each teacher-forced step against the golden token.
/// Since both are deterministic, the engine's free-running greedy output equals the golden's up to the
/// first step where these differ, so one teacher-forced pass decides it.
pub fn continuation_check(engine: &[Vec<f32>], golden: &[GoldenStep], continuation: &[u32], shipped: bool) -> CheckResult {
    let n = engine.len().min(continuation.len());
    for k in 0..n {
        let e = argmax(&engine[k]);
        if e == continuation[k] {
            continue;
        }
        if !shipped {
            return CheckResult::new("continuation", "greedy tokens equal to golden (prefix length)", k as f64, Op::Ge, n as f64)
                .with_detail(format!("step {k}: engine {e}, golden {}", continuation[k]));
        }
        let g5 = golden.get(k).map(|g| g.top(5)).unwrap_or_default();
        let e5 = top_k(&engine[k], 5);
        let ok = g5.contains(&e) && e5.contains(&continuation[k]);
        return CheckResult::new("continuation", "vLLM rule: equal until a near-tie in each other's top 5", if ok { 1.0 } else { 0.0 }, Op::Ge, 1.0)
            .with_detail(format!(
                "first difference at step {k}: engine {e}, golden {}; {}",
                continuation[k],
                if ok { "a near-tie" } else { "not a near-tie" }
            ));
    }
    CheckResult::new("continuation", "greedy tokens equal to golden (prefix length)", n as f64, Op::Ge, n as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_and_shipped_rules() {
        let g = vec![GoldenStep::Full(vec![0.0, 5.0, 4.9, 1.0, 0.0, 0.0]), GoldenStep::Full(vec![3.0, 0.0, 0.0, 0.0, 0.0, 0.0])];
        let cont = [1u32, 0];
        // Engine flips the near-tie at step 0.
        let e = vec![vec![0.0, 4.9, 5.0, 1.0, 0.0, 0.0], vec![3.0, 0.0, 0.0, 0.0, 0.0, 0.0]];
        assert!(!continuation_check(&e, &g, &cont, false).passed);
        assert!(continuation_check(&e, &g, &cont, true).passed);
        // A far-off token fails even in the shipped tier.
        let far = vec![vec![0.0, 0.0, 0.0, 1.0, 0.0, 9.0], vec![0.0; 6]];
        let g_top = vec![GoldenStep::TopK { ids: vec![1, 2, 3, 0, 4], values: vec![5.0, 4.9, 1.0, 0.0, 0.0], lse: 6.0 }, g[1].clone()];
        assert!(!continuation_check(&far, &g_top, &cont, true).passed);
        assert!(continuation_check(&e, &g_top, &cont, true).passed);
        let same: Vec<Vec<f32>> = g
            .iter()
            .map(|s| match s {
                GoldenStep::Full(l) => l.clone(),
                _ => unreachable!(),
            })
            .collect();
        let r = check(&same, &g, &cont, &Tolerances::new(crate::vocab::Tier::Exact));
        assert!(r.iter().all(|c| c.passed), "{r:?}");
    }

    #[test]
    fn coarse_entropy_is_exact_with_every_id() {
        let l = [1.0f32, 2.0, 3.0];
        assert!((coarse_entropy(&l, 3) - crate::metrics::entropy(&l)).abs() < 1e-12);
        assert!(coarse_entropy(&l, 1) <= crate::metrics::entropy(&l) + 1e-12);
    }
}
