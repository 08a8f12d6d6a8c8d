//! Localization: the first divergence in graph order, the taps just upstream that still pass, the likely
//! bug class (patterns of ../shared/BUGS.md), and the error-growth profile of each tap family.

use crate::checks::taps::TapComparison;
use crate::checks::CheckResult;
use serde::Serialize;
use std::collections::BTreeMap;

/// Where the engine first stops agreeing.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Divergence {
    pub step: usize,
    pub layer: Option<usize>,
    pub tap: String,
    /// `rel_l2`, or `missing` / `shape` when there is no value.
    pub metric: String,
    /// null in JSON when not finite (missing tap, NaN).
    pub value: f64,
    pub limit: f64,
}

/// An upstream tap that still passes.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Upstream {
    pub key: String,
    pub rel_l2: f64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Localization {
    pub first_divergence: Option<Divergence>,
    pub upstream_passing: Vec<Upstream>,
    pub likely_class: Option<String>,
    /// Why that class: the pattern seen.
    pub evidence: Option<String>,
    /// family (with stage) → [(layer, max rel L2 over steps)], layers ascending.
    pub growth: BTreeMap<String, Vec<(usize, f64)>>,
}

/// Localizes over comparisons already in graph order. `tokens_ok`: check 1's verdict, if run.
pub fn localize(cmps: &[TapComparison], tokens_ok: Option<bool>) -> Localization {
    let mut loc = Localization { growth: growth(cmps), ..Default::default() };
    if tokens_ok == Some(false) {
        loc.likely_class = Some("tokenizer or chat template".into());
        loc.evidence = Some("the prompt token ids differ from llama.cpp's before any tensor is computed (special tokens split into text, or the chat template wrong or skipped)".into());
    }
    let Some(i) = cmps.iter().position(|c| !c.passed) else { return loc };
    let c = &cmps[i];
    let (metric, value) = match (&c.errors, &c.problem) {
        (Some(e), _) => ("rel_l2".to_string(), e.rel_l2),
        (None, Some(p)) if p.starts_with("missing") => ("missing".to_string(), f64::NAN),
        _ => ("shape".to_string(), f64::NAN),
    };
    loc.first_divergence = Some(Divergence { step: c.id.step, layer: c.id.layer, tap: c.id.tap.clone(), metric, value, limit: c.limit });
    loc.upstream_passing = cmps[..i]
        .iter()
        .rev()
        .filter(|u| u.id.step == c.id.step && u.passed)
        .take(3)
        .map(|u| Upstream { key: u.key.clone(), rel_l2: u.rel_l2() })
        .collect();
    if loc.likely_class.is_none() {
        if let Some((class, why)) = classify(cmps, i) {
            loc.likely_class = Some(class.into());
            loc.evidence = Some(why);
        }
    }
    loc
}

/// Max rel L2 per (family.stage, layer) over steps.
pub fn growth(cmps: &[TapComparison]) -> BTreeMap<String, Vec<(usize, f64)>> {
    let mut m: BTreeMap<String, BTreeMap<usize, f64>> = BTreeMap::new();
    for c in cmps {
        let (Some(l), Some(e)) = (c.id.layer, c.errors) else { continue };
        let slot = m.entry(c.id.family_stage()).or_default().entry(l).or_insert(0.0);
        if crate::checks::invariants::worse(e.rel_l2, *slot) {
            *slot = e.rel_l2;
        }
    }
    m.into_iter().map(|(k, v)| (k, v.into_iter().collect())).collect()
}

/// Matches the pattern around the first failing comparison `i` against the classes of BUGS.md.
fn classify(cmps: &[TapComparison], i: usize) -> Option<(&'static str, String)> {
    let c = &cmps[i];
    let (step, layer, fam, stage) = (c.id.step, c.id.layer, c.id.family.as_str(), c.id.stage.as_deref());
    let passes = |f: &str, s: Option<&str>| -> Option<bool> {
        cmps.iter().find(|o| o.id.step == step && o.id.layer == layer && o.id.family == f && o.id.stage.as_deref() == s).map(|o| o.passed)
    };
    let step0_all_pass = cmps.iter().filter(|o| o.id.step == 0).all(|o| o.passed);
    let nonfinite = c.errors.is_some_and(|e| e.non_finite > 0);
    let at = format!("s{step}/{}", c.id.tap);
    if c.problem.as_deref().is_some_and(|p| p.starts_with("missing")) {
        return Some(("tap not produced", format!("{at} is in the golden but not in the engine's taps")));
    }
    if c.errors.is_none() {
        if matches!(fam, "ffn_gate" | "ffn_up") {
            return Some(("FFN size from the wrong dimension", format!("{at} has the wrong width: {}", c.problem.clone().unwrap_or_default())));
        }
        return Some(("wrong tensor shape", format!("{at}: {}", c.problem.clone().unwrap_or_default())));
    }
    if nonfinite {
        return Some(("overflow: f16 accumulation or softmax without max subtraction", format!("{at} holds NaN or Inf")));
    }
    if step == 0 && layer.is_some_and(|l| l > 0) && matches!(fam, "norm" | "attn_norm" | "ffn_norm" | "kq" | "kq_soft_max" | "kqv" | "kqv_out" | "attn_out" | "ffn_inp" | "l_out") {
        // A wrong formula shows at layer 0; a first failure deeper down depends on that layer's data.
        let l = layer.unwrap_or(0);
        return Some((
            "f16 overflow in accumulation (activation outlier) or this layer's weights",
            format!("every tap of layers 0–{} passes and {at} is the first to fail, at positions {}: a data-dependent fault (an activation outlier overflowing a narrow accumulator), not a wrong formula", l - 1, fmt_positions(&c.bad_positions())),
        ));
    }
    if step >= 1 && step0_all_pass && matches!(fam, "kq" | "kq_soft_max" | "kqv" | "kqv_out" | "attn_out") {
        return Some(("KV cache (never written, wrong layout or stride)", format!("every prefill tap passes; {at} at decode step {step} is the first to fail")));
    }
    match (fam, stage) {
        ("embd" | "inp_embd", _) => Some(("embedding lookup (index transposed or wrong row)", format!("{at} is the first tensor and it differs"))),
        ("Qcur" | "Kcur", Some("rope")) => {
            let pre = passes(fam, Some("add")).or(passes(fam, Some("mul_mat")));
            let bad = c.bad_positions();
            let pos0_ok = step == 0 && !bad.contains(&0);
            if pre == Some(true) && pos0_ok {
                Some(("RoPE pairing or base", format!("{fam} passes before RoPE and fails after it, only at positions {}; position 0 (unrotated) agrees", fmt_positions(&bad))))
            } else if pre == Some(true) {
                Some(("RoPE", format!("{fam} passes before RoPE and fails after it")))
            } else {
                None
            }
        }
        ("Qcur" | "Kcur" | "Vcur", Some("add")) if passes(fam, Some("mul_mat")) == Some(true) => {
            Some(("Q/K/V bias (zeroed or not loaded)", format!("{fam}.mul_mat passes and {fam}.add (the bias) fails")))
        }
        ("Qcur" | "Kcur" | "Vcur", Some("mul_mat") | None) => Some(("projection weight transposed, wrong leading dimension or dequantization", format!("{at}: the input (attn_norm) passes, the projection differs"))),
        ("kq", _) => Some(("attention scores: K layout, GQA head mapping or KV cache", format!("{at} fails while Q and K pass"))),
        ("kq_soft_max", _) => {
            let bad = c.bad_positions();
            let rows = c.per_position.len();
            if step == 0 && rows > 1 && !bad.contains(&(rows - 1)) {
                Some(("causal mask missing", format!("{at}: kq passes, every row but the last differs")))
            } else {
                Some(("softmax scale, mask or softmax", format!("{at} fails while kq passes")))
            }
        }
        ("kqv", _) => Some(("GQA head mapping or V layout", format!("{at} fails while the attention probabilities pass"))),
        ("kqv_out", _) => Some(("attention output projection dropped or transposed", format!("{at} fails while kqv passes"))),
        ("attn_out" | "ffn_inp", _) => Some(("residual dropped (attention output not added back)", format!("{at} fails while kqv_out passes"))),
        ("norm", _) => Some(("RMSNorm (epsilon or formula)", format!("{at}: the normalized activations differ while its input passes"))),
        ("attn_norm" | "ffn_norm" | "result_norm", _) => Some(("norm weight ignored or rescaled", format!("{at} fails while the unweighted norm passes"))),
        ("ffn_gate" | "ffn_up", _) if layer == Some(0) => Some(("FFN size from the wrong dimension, or FFN weight transposed", format!("{at} fails at layer 0 while ffn_norm passes"))),
        ("ffn_gate" | "ffn_up", _) => Some(("dequantization of this layer's FFN weight", format!("{at} fails; the same tap passes in earlier layers"))),
        ("ffn_swiglu", _) => Some(("activation wrong (e.g. GELU instead of SiLU)", format!("{at} fails while ffn_gate and ffn_up pass"))),
        ("ffn_out", _) if layer == Some(0) => Some(("ffn_down projection dropped or transposed, or its dequantization", format!("{at} fails while ffn_swiglu passes"))),
        ("ffn_out", _) => Some(("dequantization of this layer's ffn_down (e.g. Q4_K scales/mins)", format!("{at} fails while ffn_swiglu passes; earlier layers' ffn_out pass"))),
        ("l_out", _) => Some(("residual dropped (FFN output not added back)", format!("{at} fails while ffn_out passes"))),
        ("result_output", _) => Some(("lm_head dims swapped or padded vocabulary", format!("{at} is the only tensor that differs"))),
        _ => None,
    }
}

fn fmt_positions(p: &[usize]) -> String {
    match p {
        [] => "none".into(),
        [a] => format!("{a}"),
        _ if p.windows(2).all(|w| w[1] == w[0] + 1) => format!("{}–{}", p[0], p[p.len() - 1]),
        _ => format!("{p:?}"),
    }
}

/// When no tap names a class: the class of the first failing check that is not about taps (the
/// sampler test, the KV-cache check), as BUGS.md's "where it shows" column names them.
pub fn class_from_checks(checks: &[CheckResult]) -> Option<(&'static str, String)> {
    let c = checks.iter().find(|c| !c.passed)?;
    let n = c.name.as_str();
    if n.starts_with("sampler:") {
        Some(("sampling order (top-k, top-p, temperature)", format!("{n} fails: the engine's sampler does not draw from llama.cpp's distribution")))
    } else if n.starts_with("kv_cache") {
        Some(("KV cache (never written, wrong layout or stride)", format!("{n} fails while every tap agrees")))
    } else {
        None
    }
}
