//! Check 7: is the generated text varied like llama.cpp's? distinct-1/2, longest run of one token,
//! repeated 4-gram fraction, mean per-step entropy. Limits come from the golden continuations of the
//! same model and tier (see [`Limits::from_golden`]).

use super::{CheckResult, Op};
use serde::Serialize;
use statrs::statistics::Statistics;
use std::collections::HashSet;

/// Diversity statistics of one token sequence.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Stats {
    pub distinct1: f64,
    pub distinct2: f64,
    pub longest_run: usize,
    pub repeated_4gram: f64,
    /// Mean per-step entropy in nats (NaN when no step entropies were given).
    pub mean_entropy: f64,
}

pub fn stats(tokens: &[u32], step_entropies: &[f64]) -> Stats {
    let distinct = |n: usize| {
        if tokens.len() < n {
            return 1.0;
        }
        let grams: Vec<&[u32]> = tokens.windows(n).collect();
        grams.iter().collect::<HashSet<_>>().len() as f64 / grams.len() as f64
    };
    let (mut longest, mut run) = (0, 0);
    for (i, t) in tokens.iter().enumerate() {
        run = if i > 0 && tokens[i - 1] == *t { run + 1 } else { 1 };
        longest = longest.max(run);
    }
    // Fraction of 4-grams that occurred earlier in the sequence.
    let mut seen = HashSet::new();
    let grams: Vec<&[u32]> = tokens.windows(4).collect();
    let repeated = grams.iter().filter(|g| !seen.insert(**g)).count();
    let repeated_4gram = if grams.is_empty() { 0.0 } else { repeated as f64 / grams.len() as f64 };
    let mean_entropy = if step_entropies.is_empty() { f64::NAN } else { step_entropies.iter().copied().mean() };
    Stats { distinct1: distinct(1), distinct2: distinct(2), longest_run: longest, repeated_4gram, mean_entropy }
}

/// Limits of the diversity gate.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Limits {
    pub min_distinct1: f64,
    pub min_distinct2: f64,
    pub max_longest_run: usize,
    pub max_repeated_4gram: f64,
    pub min_mean_entropy: f64,
}

impl Limits {
    /// [`Self::from_golden`], or None without any statistics to take the limits from.
    pub fn from_any(golden: &[Stats]) -> Option<Limits> {
        (!golden.is_empty()).then(|| Limits::from_golden(golden))
    }

    /// From the golden continuations' statistics: half the golden minimum of distinct-1/2 and of the
    /// mean entropy, twice the golden's longest run (at least 4), and the golden's worst repeated-4-gram
    /// fraction plus 0.25. Slack because a correct engine's sampled text differs from llama.cpp's.
    pub fn from_golden(golden: &[Stats]) -> Limits {
        let min = |f: &dyn Fn(&Stats) -> f64| golden.iter().map(f).filter(|v| !v.is_nan()).fold(f64::INFINITY, f64::min);
        let max = |f: &dyn Fn(&Stats) -> f64| golden.iter().map(f).filter(|v| !v.is_nan()).fold(0.0, f64::max);
        let ent = min(&|s| s.mean_entropy);
        Limits {
            min_distinct1: 0.5 * min(&|s| s.distinct1).min(1.0),
            min_distinct2: 0.5 * min(&|s| s.distinct2).min(1.0),
            max_longest_run: (2.0 * max(&|s| s.longest_run as f64)).max(4.0) as usize,
            max_repeated_4gram: (max(&|s| s.repeated_4gram) + 0.25).min(1.0),
            min_mean_entropy: if ent.is_finite() { 0.25 * ent } else { 0.0 },
        }
    }
}

/// The gate. `label` tells greedy from sampled in the check names.
pub fn check(label: &str, s: &Stats, l: &Limits) -> Vec<CheckResult> {
    let n = |m: &str| format!("diversity:{label}:{m}");
    let mut v = vec![
        CheckResult::new(n("distinct1"), "distinct-1", s.distinct1, Op::Ge, l.min_distinct1),
        CheckResult::new(n("distinct2"), "distinct-2", s.distinct2, Op::Ge, l.min_distinct2),
        CheckResult::new(n("longest_run"), "longest run of one token", s.longest_run as f64, Op::Le, l.max_longest_run as f64),
        CheckResult::new(n("repeated_4gram"), "repeated 4-gram fraction", s.repeated_4gram, Op::Le, l.max_repeated_4gram),
    ];
    if !s.mean_entropy.is_nan() {
        v.push(CheckResult::new(n("entropy"), "mean per-step entropy (nats, top-64 + rest)", s.mean_entropy, Op::Ge, l.min_mean_entropy));
    }
    let reason = "limits from the golden continuations of this model and tier".to_string();
    v.into_iter().map(|c| c.with_reason(Some(reason.clone()))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn golden_like() -> Vec<Stats> {
        // Two varied continuations, as llama.cpp's are.
        let a: Vec<u32> = (0..32).map(|i| (i * 7 % 23) as u32).collect();
        let b: Vec<u32> = (0..32).map(|i| 100 + (i * 5 % 29) as u32).collect();
        vec![stats(&a, &[1.2; 32]), stats(&b, &[0.9; 32])]
    }

    #[test]
    fn the_seed_engines_output_fails() {
        // "componentWillMount" (id 78138) 65 times in a row: the seed engine's output.
        let seed = vec![78138u32; 65];
        let limits = Limits::from_golden(&golden_like());
        let r = check("greedy", &stats(&seed, &[0.01; 65]), &limits);
        let failed: Vec<_> = r.iter().filter(|c| !c.passed).map(|c| c.name.as_str()).collect();
        assert!(failed.contains(&"diversity:greedy:longest_run"), "{r:?}");
        assert!(failed.contains(&"diversity:greedy:distinct1"));
        assert_eq!(stats(&seed, &[]).longest_run, 65);
    }

    #[test]
    fn the_golden_passes_its_own_gate() {
        let g = golden_like();
        let limits = Limits::from_golden(&g);
        for s in &g {
            assert!(check("greedy", s, &limits).iter().all(|c| c.passed));
        }
    }
}
