//! Localization: the first divergence in graph order, the taps just upstream that still pass, the likely
//! bug class ([`BugClass`], docs/bug-classes.md), and the error-growth profile of each tap family.

use crate::checks::taps::TapComparison;
use crate::checks::CheckResult;
use crate::vocab::Check;
use serde::Serialize;
use std::collections::BTreeMap;

/// The bug classes the localizer names: one type with the fault catalog and the fault suites (its id is
/// report.json's `likely_class_id`; the list: docs/bug-classes.md).
pub use lockstep_engine::faults::BugClass;

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
    /// The class (written as its stable id, `BugClass::id`).
    pub likely_class_id: Option<BugClass>,
    /// Why that class: the pattern seen.
    pub evidence: Option<String>,
    /// family (with stage) → [(layer, max rel L2 over steps)], layers ascending.
    pub growth: BTreeMap<String, Vec<(usize, f64)>>,
}

/// Localizes over comparisons already in graph order. `tokens_ok`: check 1's verdict, if run.
///
/// The first divergence is the first tap that was compared and failed; a tap the engine did not dump
/// is never one. When taps between the last agreeing tap and the first differing one were not dumped,
/// the divergence may have started among them: the evidence says which, and no class is named.
/// `n_layer`: the model's layer count (the golden may hold only some layers).
pub fn localize(cmps: &[TapComparison], tokens_ok: Option<bool>, n_layer: Option<usize>) -> Localization {
    let mut loc = Localization { growth: growth(cmps), ..Default::default() };
    if tokens_ok == Some(false) {
        loc.set_class(BugClass::Tokenizer, "tokenizer or chat template", "the prompt token ids differ from llama.cpp's before any tensor is computed (special tokens split into text, or the chat template wrong or skipped)".into());
    }
    let Some(i) = cmps.iter().position(|c| c.failed()) else { return loc };
    let c = &cmps[i];
    let (metric, value, limit) = match &c.errors {
        Some(e) if e.rel_l2 > c.limit || e.rel_l2.is_nan() => ("rel_l2".to_string(), e.rel_l2, c.limit),
        Some(_) => {
            let (row, v) = c.worst_row().unwrap_or((0, f64::NAN));
            (format!("row_rel_l2 (position {row})"), v, c.row_limit)
        }
        None => ("shape".to_string(), f64::NAN, c.limit),
    };
    loc.first_divergence = Some(Divergence { step: c.id.step, layer: c.id.layer, tap: c.id.tap.clone(), metric, value, limit });
    loc.upstream_passing =
        cmps[..i].iter().rev().filter(|u| u.id.step == c.id.step && u.passed).take(3).map(|u| Upstream { key: u.key.clone(), rel_l2: u.rel_l2() }).collect();
    // Taps of this step between the last compared-and-agreeing one and the first failure that the
    // engine did not dump: the fault may lie among them.
    let gap: Vec<&TapComparison> = cmps[..i].iter().rev().filter(|u| u.id.step == c.id.step).take_while(|u| !u.passed).filter(|u| u.not_dumped).collect();
    if loc.likely_class.is_none() {
        if !gap.is_empty() {
            let last_ok = cmps[..i].iter().rev().find(|u| u.id.step == c.id.step && u.passed).map_or("the step's start".to_string(), |u| u.key.clone());
            let names: Vec<&str> = gap.iter().rev().map(|u| u.key.as_str()).collect();
            loc.evidence = Some(format!(
                "between {last_ok} (agrees) and s{}/{} (differs) the engine did not dump {} tap(s): {}; the divergence may start there. Dump them to pin it; no class is named without them",
                c.id.step, c.id.tap, names.len(), fmt_list(&names)
            ));
        } else if let Some(why) = capture_gap(cmps, i, n_layer) {
            // The golden holds none of the op's inputs: name the layer at most, never a formula.
            match layer_input_agrees(cmps, i) {
                Some(input) => loc.set_class(
                    BugClass::LayerData,
                    LAYER_DATA_TEXT,
                    format!("{why}; the layer's input {input} agrees, so the divergence starts inside layer {}", c.id.layer.unwrap_or(0)),
                ),
                None => loc.evidence = Some(why),
            }
        } else if let Some((class, what, why)) = classify(cmps, i) {
            loc.set_class(class, what, why);
        }
    }
    loc
}

impl Localization {
    fn set_class(&mut self, class: BugClass, what: &str, why: String) {
        self.likely_class = Some(what.into());
        self.likely_class_id = Some(class);
        self.evidence = Some(why);
    }
}

fn fmt_list(v: &[&str]) -> String {
    if v.len() <= 6 {
        v.join(", ")
    } else {
        format!("{}, … ({} more), {}", v[..4].join(", "), v.len() - 5, v[v.len() - 1])
    }
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

/// The class of a fault that starts inside one layer without a formula to blame: its data (an activation
/// outlier overflowing a narrow accumulator) or its weights (dequantization, a wrong tensor).
const LAYER_DATA_TEXT: &str = "f16 overflow in accumulation (activation outlier) or this layer's weights";

/// Uses the layer-isolated check (each layer fed llama.cpp's own input): when it finds a first layer
/// whose taps exceed their limits and the chained comparison first diverges later (a deeper layer, or
/// outside the stack) or names no class, that layer is where the fault is, and its class is the layer's
/// own (weights, dequantization, or an overflow in it).
pub fn use_isolated(rep: &mut crate::report::CaseReport) {
    let Some(bad) = rep.isolated_layers.iter().find(|l| !(l.ratio <= 1.0)) else { return };
    // "Later": a deeper layer, or the tensors after the stack (not the embedding before it).
    let later = rep.first_divergence.as_ref().is_some_and(|d| match d.layer {
        Some(l) => l > bad.layer,
        None => !matches!(d.tap.as_str(), "embd" | "inp_embd"),
    });
    if !(later || (rep.first_divergence.is_some() && rep.likely_class.is_none())) {
        return;
    }
    let chained = rep.first_divergence.as_ref().map_or(String::new(), |d| format!("the chained run first diverges at s{}/{}; ", d.step, d.tap));
    rep.likely_class = Some(LAYER_DATA_TEXT.into());
    rep.likely_class_id = Some(BugClass::LayerData);
    rep.evidence = Some(format!(
        "{chained}fed llama.cpp's own input, layer {} is the first whose taps exceed their limits ({} at {:.1e}, {:.0}× its limit) while the layers before it agree",
        bad.layer, bad.worst_tap, bad.rel_l2, bad.ratio
    ));
}

/// When none of the first failing tap's direct inputs (llama.cpp's graph, `noise::direct_inputs`) was
/// compared, the evidence that says so and how to pin it: the golden did not capture them (real-model
/// goldens keep some layers only) or the engine did not dump them.
fn capture_gap(cmps: &[TapComparison], i: usize, n_layer: Option<usize>) -> Option<String> {
    let c = &cmps[i];
    let n_layer = n_layer.or_else(|| cmps.iter().filter_map(|o| o.id.layer).max().map(|l| l + 1));
    let inputs = crate::noise::direct_inputs(&c.id, n_layer);
    let compared = |tap: &String| cmps.iter().any(|o| o.id.step == c.id.step && &o.id.tap == tap && !o.not_dumped);
    if inputs.is_empty() || inputs.iter().any(compared) {
        return None;
    }
    let last_ok = cmps[..i].iter().rev().find(|u| u.id.step == c.id.step && u.passed).map_or("the step's start".to_string(), |u| u.key.clone());
    let (from, to) = (cmps[..i].iter().rev().find(|u| u.id.step == c.id.step && u.passed).and_then(|u| u.id.layer), c.id.layer);
    let layers = match (from, to) {
        (Some(a), Some(b)) if b > a + 1 => format!("layers {}..{} were not captured", a + 1, b),
        (_, Some(b)) => format!("layer {b}'s taps before it were not captured"),
        _ => "the taps in between were not captured".into(),
    };
    Some(format!(
        "between {last_ok} (agrees) and s{}/{} (differs) the golden holds none of its inputs ({}); {layers}. Pin it with a full-tap golden: `lockstep golden --model M --prompt P --taps all`, then `lockstep compare --golden cache:KEY` (or `lockstep validate --pin`)",
        c.id.step,
        c.id.tap,
        inputs.join(", ")
    ))
}

/// The layer input of the first failing tap's layer (`embd` or `l_out-(L−1)`), when it was compared and
/// agrees.
fn layer_input_agrees(cmps: &[TapComparison], i: usize) -> Option<String> {
    let c = &cmps[i];
    let l = c.id.layer?;
    let tap = if l == 0 { "embd".to_string() } else { format!("l_out-{}", l - 1) };
    cmps.iter().find(|o| o.id.step == c.id.step && o.id.tap == tap && o.passed).map(|o| o.key.clone())
}

/// Heads of an attention-shaped comparison that agree and that differ (by the row limit).
fn head_split(c: &TapComparison) -> (usize, usize) {
    let bad = c.per_head.iter().filter(|&&e| !(e <= c.row_limit)).count();
    (c.per_head.len() - bad, bad)
}

/// Matches the pattern around the first failing comparison `i` against the known bug classes.
fn classify(cmps: &[TapComparison], i: usize) -> Option<(BugClass, &'static str, String)> {
    use BugClass::*;
    let c = &cmps[i];
    let (step, layer, fam, stage) = (c.id.step, c.id.layer, c.id.family.as_str(), c.id.stage.as_deref());
    // Some(passed) for a compared tap of this step and layer; None when absent or not dumped.
    let passes = |f: &str, s: Option<&str>| -> Option<bool> {
        cmps.iter().find(|o| o.id.step == step && o.id.layer == layer && o.id.family == f && o.id.stage.as_deref() == s && !o.not_dumped).map(|o| o.passed)
    };
    let step0_all_pass = cmps.iter().filter(|o| o.id.step == 0).all(|o| !o.failed());
    let nonfinite = c.errors.is_some_and(|e| e.non_finite > 0);
    let at = format!("s{step}/{}", c.id.tap);
    if c.errors.is_none() {
        if matches!(fam, "ffn_gate" | "ffn_up") {
            return Some((FfnSize, "FFN size from the wrong dimension", format!("{at} has the wrong width: {}", c.problem.clone().unwrap_or_default())));
        }
        return Some((WrongShape, "wrong tensor shape", format!("{at}: {}", c.problem.clone().unwrap_or_default())));
    }
    if nonfinite {
        return Some((Overflow, "overflow: f16 accumulation or softmax without max subtraction", format!("{at} holds NaN or Inf")));
    }
    if step == 0
        && layer.is_some_and(|l| l > 0)
        && matches!(fam, "norm" | "attn_norm" | "ffn_norm" | "kq" | "kq_soft_max" | "kqv" | "kqv_out" | "attn_out" | "ffn_inp" | "l_out")
    {
        // A wrong formula shows at layer 0; a first failure deeper down depends on that layer's data.
        let l = layer.unwrap_or(0);
        return Some((
            LayerData,
            LAYER_DATA_TEXT,
            format!("every compared tap of layers 0–{} passes and {at} is the first to fail, at positions {}: a data-dependent fault (an activation outlier overflowing a narrow accumulator, or this layer's weights), not a wrong formula", l - 1, fmt_positions(&c.bad_positions())),
        ));
    }
    // A decode step whose scores (or, with the probabilities agreeing, values) differ while the prefill
    // agrees: the cache. A decode step's softmax differing while its scores agree is the softmax's own.
    let v_only = fam == "kqv" && passes("kq_soft_max", None) == Some(true);
    let (heads_ok, heads_bad) = head_split(c);
    if step >= 1 && fam == "kq" && heads_ok > 0 && heads_bad > 0 && passes("Qcur", Some("rope")) != Some(false) {
        return Some((
            GqaMapping,
            "GQA head mapping",
            format!("{at}: {heads_ok} heads agree and {heads_bad} differ at decode step {step}: query heads read the wrong K head"),
        ));
    }
    if step >= 1 && step0_all_pass && (fam == "kq" || v_only) {
        return Some((
            KvCache,
            "KV cache (never written, wrong layout or stride)",
            format!("every prefill tap passes; {at} at decode step {step} is the first to fail"),
        ));
    }
    match (fam, stage) {
        ("embd" | "inp_embd", _) => Some((Embedding, "embedding lookup (index transposed or wrong row)", format!("{at} is the first tensor and it differs"))),
        ("Qcur" | "Kcur", Some("rope")) if matches!(head_split(c), (ok, bad) if ok > 0 && bad > 0) => {
            // RoPE rotates every head alike: some heads exact and others off is head indexing.
            let (ok, bad) = head_split(c);
            Some((
                GqaMapping,
                "GQA head mapping (KV head indexing)",
                format!("{at}: {ok} heads agree and {bad} differ, while a RoPE bug would move every head alike"),
            ))
        }
        ("Qcur" | "Kcur", Some("rope")) => {
            let pre = passes(fam, Some("add")).or(passes(fam, Some("mul_mat"))).or(passes(fam, None));
            let bad = c.bad_positions();
            let pos0_ok = step == 0 && !bad.contains(&0);
            if pre == Some(true) && pos0_ok {
                Some((
                    Rope,
                    "RoPE pairing or base",
                    format!("{fam} passes before RoPE and fails after it, only at positions {}; position 0 (unrotated) agrees", fmt_positions(&bad)),
                ))
            } else if pre == Some(true) {
                Some((
                    Rope,
                    "RoPE",
                    format!("{fam} passes before RoPE and fails after it, at positions {} (position 0 too: positions shifted?)", fmt_positions(&bad)),
                ))
            } else {
                None
            }
        }
        ("Qcur" | "Kcur" | "Vcur", Some("add")) if passes(fam, Some("mul_mat")) == Some(true) => {
            Some((QkvBias, "Q/K/V bias (zeroed or not loaded)", format!("{fam}.mul_mat passes and {fam}.add (the bias) fails")))
        }
        ("Qcur" | "Kcur" | "Vcur", Some("mul_mat") | None) => Some((
            ProjectionWeight,
            "projection weight transposed, wrong leading dimension or dequantization",
            format!("{at}: the input (attn_norm) passes, the projection differs"),
        )),
        ("kq", _) => {
            let (ok, bad) = head_split(c);
            if ok > 0 && bad > 0 {
                Some((GqaMapping, "GQA head mapping", format!("{at}: {ok} heads agree and {bad} differ while Q and K pass: query heads read the wrong K head")))
            } else {
                Some((AttentionScores, "attention scores: K layout, GQA head mapping or KV cache", format!("{at} fails while Q and K pass")))
            }
        }
        ("kq_soft_max", _) if step == 0 && passes("kq", None) != Some(false) && window_edge(c).is_some() => {
            let (ok, first) = window_edge(c).expect("checked");
            Some((
                AttentionWindow,
                "attention window or KV length (earlier positions dropped)",
                format!(
                    "{at}: kq passes; the rows agree up to position {ok} and differ at every kept position from {first} on ({}): each query sees only its last N positions, {ok} < N ≤ {first} (a sliding window or KV-length limit)",
                    fmt_positions(&c.bad_positions())
                ),
            ))
        }
        ("kq_soft_max", _) => {
            let bad = c.bad_positions();
            let rows = c.per_position.len();
            if step == 0 && rows > 1 && !bad.contains(&c.position(rows - 1)) {
                Some((CausalMask, "causal mask missing", format!("{at}: kq passes, rows {} differ and the last row agrees", fmt_positions(&bad))))
            } else {
                Some((SoftmaxScale, "softmax scale, mask or softmax", format!("{at} fails while kq passes")))
            }
        }
        ("kqv", _) => {
            let (ok, bad) = head_split(c);
            if ok > 0 && bad > 0 {
                Some((
                    GqaMapping,
                    "GQA head mapping",
                    format!("{at}: {ok} heads agree and {bad} differ while the attention probabilities pass: query heads read the wrong V head"),
                ))
            } else {
                Some((GqaMapping, "GQA head mapping or V layout", format!("{at} fails while the attention probabilities pass")))
            }
        }
        ("kqv_out", _) => Some((AttnOutputProjection, "attention output projection dropped or transposed", format!("{at} fails while kqv passes"))),
        // llama's attn_out is the output projection's own result, before the residual add.
        ("attn_out", _) => Some((AttnOutputProjection, "attention output projection dropped or transposed", format!("{at} fails while kqv_out passes"))),
        ("ffn_inp", _) if passes("attn_out", None) == Some(true) => {
            Some((ResidualAttn, "residual dropped (attention output not added back)", format!("{at} fails while attn_out passes")))
        }
        // qwen2 has no tap for the output projection: `refine` tells a dropped residual from a wrong
        // projection with the tensors themselves.
        ("ffn_inp", _) => Some((AttnOutputProjection, "attention output projection or residual add", format!("{at} fails while kqv_out passes"))),
        ("norm", _) => Some((RmsNorm, "RMSNorm (epsilon or formula)", format!("{at}: the normalized activations differ while its input passes"))),
        ("attn_norm" | "ffn_norm" | "result_norm", _) => {
            Some((NormWeight, "norm weight ignored or rescaled", format!("{at} fails while the unweighted norm passes")))
        }
        ("ffn_gate" | "ffn_up", _) if layer == Some(0) => {
            Some((FfnWeight, "FFN size from the wrong dimension, or FFN weight transposed", format!("{at} fails at layer 0 while ffn_norm passes")))
        }
        ("ffn_gate" | "ffn_up", _) => {
            Some((FfnWeight, "dequantization of this layer's FFN weight", format!("{at} fails; the same tap passes in earlier layers")))
        }
        // gemma3's gate is GELU (`ffn_geglu`): the same op with the other activation.
        ("ffn_swiglu" | "ffn_geglu", _) => {
            Some((Activation, "activation wrong (e.g. GELU instead of SiLU, or SiLU instead of GELU)", format!("{at} fails while ffn_gate and ffn_up pass")))
        }
        ("ffn_out", _) if layer == Some(0) => {
            Some((FfnDown, "ffn_down projection dropped or transposed, or its dequantization", format!("{at} fails while ffn_swiglu passes")))
        }
        ("ffn_out", _) => Some((
            FfnDown,
            "dequantization of this layer's ffn_down (e.g. Q4_K scales/mins)",
            format!("{at} fails while ffn_swiglu passes; earlier layers' ffn_out pass"),
        )),
        ("l_out", _) => Some((ResidualFfn, "residual dropped (FFN output not added back)", format!("{at} fails while ffn_out passes"))),
        ("result_output", _) => Some((LmHead, "lm_head dims swapped or padded vocabulary", format!("{at} is the only tensor that differs"))),
        _ => None,
    }
}

/// Tells the classes apart that the pass/fail pattern alone cannot, by testing the suspected bug on the
/// golden's own tensors: at `ffn_inp-L` with no output-projection tap, a dropped residual leaves the
/// engine's `ffn_inp` equal to llama.cpp's minus the residual input (`embd` or `l_out-(L-1)`).
pub fn refine(loc: &mut Localization, golden: &crate::golden::TapsFile, engine: &dyn crate::checks::TapSource) {
    let Some(d) = &loc.first_divergence else { return };
    if loc.likely_class_id != Some(BugClass::AttnOutputProjection) || !d.tap.starts_with("ffn_inp-") {
        return;
    }
    let Some(layer) = d.layer else { return };
    let key = format!("s{}/{}", d.step, d.tap);
    let Some((residual_key, without)) = crate::probe::attn_residual_dropped(golden, d.step, layer) else { return };
    let Some(Ok(e)) = engine.tensor(&key) else { return };
    if e.data.len() != without.len() {
        return;
    }
    let dist = crate::metrics::tensor_errors(&e.data, &without).rel_l2;
    let why = loc.evidence.clone().unwrap_or_default();
    if dist < 1e-2 {
        loc.set_class(
            BugClass::ResidualAttn,
            "residual dropped (attention output not added back)",
            format!("{why}; the engine's {key} equals llama.cpp's minus the residual input {residual_key} (rel L2 {dist:.1e}): the residual add is missing"),
        );
    } else {
        loc.set_class(
            BugClass::AttnOutputProjection,
            "attention output projection dropped or transposed",
            format!("{why}; it is not llama.cpp's {key} minus the residual input (rel L2 {dist:.1e}), so the output projection (weight, layout or dequantization) differs"),
        );
    }
}

/// A sharp positional edge in a tap's rows: they agree up to position `a` ≥ 1 (so not a pattern where
/// only the unrotated position 0 agrees) and every row from the next compared position `b` on differs.
/// Returns (a, b).
fn window_edge(c: &TapComparison) -> Option<(usize, usize)> {
    let n = c.per_position.len();
    let ok = |i: usize| c.per_position[i] <= c.row_limit;
    let first_bad = (0..n).find(|&i| !ok(i))?;
    if first_bad == 0 || c.position(first_bad - 1) == 0 || (first_bad..n).any(ok) {
        return None;
    }
    Some((c.position(first_bad - 1), c.position(first_bad)))
}

fn fmt_positions(p: &[usize]) -> String {
    match p {
        [] => "none".into(),
        [a] => format!("{a}"),
        _ if p.windows(2).all(|w| w[1] == w[0] + 1) => format!("{}–{}", p[0], p[p.len() - 1]),
        _ => p.iter().map(|v| v.to_string()).collect::<Vec<_>>().join(", "),
    }
}

/// When no tap names a class: the class of the first failing check that is not about taps (the
/// sampler test, the KV-cache check), as the class's `shows` names them (docs/bug-classes.md).
/// A failing `dequant:{TYPE}` check is direct evidence (the backend's dequantization held to gguf-py's on
/// the model's own blocks), so it comes first and the runner lets it outrank the taps' guess.
pub fn class_from_checks(checks: &[CheckResult]) -> Option<(BugClass, &'static str, String)> {
    if let Some(c) = checks.iter().find(|c| !c.passed && c.check == Some(Check::Dequant)) {
        // "dequantization of {TYPE}" for the formats lockstep's engine reads (the class text is static)
        let what = match c.name.split_once(':').map_or("", |(_, ty)| ty) {
            "F32" => "dequantization of F32",
            "F16" => "dequantization of F16",
            "BF16" => "dequantization of BF16",
            "Q4_0" => "dequantization of Q4_0",
            "Q4_1" => "dequantization of Q4_1",
            "Q5_0" => "dequantization of Q5_0",
            "Q5_1" => "dequantization of Q5_1",
            "Q8_0" => "dequantization of Q8_0",
            "Q2_K" => "dequantization of Q2_K",
            "Q3_K" => "dequantization of Q3_K",
            "Q4_K" => "dequantization of Q4_K",
            "Q5_K" => "dequantization of Q5_K",
            "Q6_K" => "dequantization of Q6_K",
            _ => "dequantization of a weight format",
        };
        return Some((BugClass::Dequantization, what, format!("{} fails: {}", c.name, c.detail.clone().unwrap_or_default())));
    }
    // The graph-path check next: when it fails, the logits after the tapped steps (which the graph
    // computes) fail with it, and they say nothing about where.
    let c = checks.iter().find(|c| !c.passed && c.check == Some(Check::GraphDecode)).or_else(|| checks.iter().find(|c| !c.passed))?;
    let n = c.name.as_str();
    match c.check? {
        Check::Sampler => Some((
            BugClass::Sampling,
            "sampling order (top-k, top-p, temperature)",
            format!("{n} fails: the engine's sampler does not draw from llama.cpp's distribution"),
        )),
        Check::GraphDecode => Some((
            BugClass::DecodeKernel,
            "decode-only kernel (the graph path differs from the tapped path)",
            format!("{n} fails while every tap agrees: {}", c.detail.clone().unwrap_or_default()),
        )),
        Check::KvCache => Some((BugClass::KvCache, "KV cache (never written, wrong layout or stride)", format!("{n} fails while every tap agrees"))),
        _ => None,
    }
}

/// docs/bug-classes.md: every [`BugClass`] with its id, description, where it shows and the catalog
/// faults that plant it (a test holds the committed file to this text).
pub fn bug_classes_markdown() -> String {
    use lockstep_engine::faults::Fault;
    let cell = |s: &str| s.replace('|', "\\|");
    let mut s = String::from(
        "# Bug classes\n\n\
         The classes of bug lockstep's localizer names. A report gives the class of a failing case as\n\
         `likely_class_id` (report.json) beside a sentence for people (`likely_class`, which may be more\n\
         specific: \"dequantization of Q4_K\"). The localizer reads the pattern around the first divergence\n\
         (src/localize.rs); each fault of the catalog (`lockstep faults`, engine/src/faults.rs) plants one\n\
         class in lockstep's own engine, and tests/faults.rs checks that the class it names is the fault's\n\
         (suites/faults/).\n\n\
         Generated from `BugClass` (engine/src/faults.rs): after changing it, run\n\
         `LOCKSTEP_UPDATE_DOCS=1 cargo test --release --lib bug_classes_doc`; the test fails while this file differs.\n\n\
         | id | what goes wrong | where it shows first | catalog faults |\n\
         |---|---|---|---|\n",
    );
    for c in BugClass::ALL {
        let faults: Vec<String> = Fault::ALL.iter().filter(|f| f.class() == c).map(|f| format!("`{}`", f.name())).collect();
        let faults = if faults.is_empty() { "—".to_string() } else { faults.join(", ") };
        s += &format!("| `{}` | {} | {} | {faults} |\n", c.id(), cell(c.description()), cell(c.shows()));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bug_classes_doc() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/bug-classes.md");
        let want = bug_classes_markdown();
        if std::env::var_os("LOCKSTEP_UPDATE_DOCS").is_some() {
            std::fs::write(&path, &want).unwrap();
        }
        let have = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(have == want, "{} differs from BugClass (engine/src/faults.rs): LOCKSTEP_UPDATE_DOCS=1 cargo test --lib bug_classes_doc", path.display());
    }

    #[test]
    fn class_ids_are_the_serde_spellings_and_unique() {
        let mut seen = std::collections::HashSet::new();
        for c in BugClass::ALL {
            assert_eq!(serde_json::to_value(c).unwrap(), c.id());
            assert_eq!(BugClass::from_id(c.id()), Some(c));
            assert!(seen.insert(c.id()), "{} twice", c.id());
        }
    }
}
