//! Check 4: reference-free invariants of an engine's taps.
//! - attention probabilities (`kq_soft_max`) sum to 1 per row; masked (future) entries are exactly 0;
//! - no NaN or Inf in any tap;
//! - RoPE keeps each pair's norm, and its rotation angle is linear in the position (angle(p) = p·angle(1)
//!   mod 2π), which is what makes q·k depend only on the position difference; RoPE's input is the tap
//!   llama.cpp's graph rotates (the golden's, when known): a dump without it leaves these two checks not
//!   run, with the reason ([`Outcome::not_run`]), never passed;
//! - RMSNorm output (`norm-L`, before its weight) has unit mean square per row, up to eps: a row whose
//!   input's mean square is comparable to or below eps is held to ms/(ms + eps) instead, with the model's
//!   eps when known (`rms_unit`).

use super::{CheckResult, Op, TapSource, Tolerances};
use crate::error::Result;
use crate::tapname::TapId;
use std::f64::consts::PI;

/// RoPE pairing: NeoX rotates (i, i + d/2) (qwen2); normal rotates (2i, 2i + 1) (llama).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pairing {
    Neox,
    Adjacent,
}

impl Pairing {
    /// In words, for reports: `NeoX (i, i + d/2)` or `adjacent (2i, 2i+1)`.
    pub fn name(self) -> &'static str {
        match self {
            Pairing::Neox => "NeoX (i, i + d/2)",
            Pairing::Adjacent => "adjacent (2i, 2i+1)",
        }
    }

    pub fn pairs(self, d: usize) -> Vec<(usize, usize)> {
        match self {
            Pairing::Neox => (0..d / 2).map(|i| (i, i + d / 2)).collect(),
            Pairing::Adjacent => (0..d / 2).map(|i| (2 * i, 2 * i + 1)).collect(),
        }
    }
    /// The pairing llama.cpp uses for an architecture, if known.
    pub fn for_arch(arch: &str) -> Option<Pairing> {
        match arch {
            "qwen2" | "qwen3" | "phi3" | "gemma" | "gemma2" | "gemma3" | "stablelm" | "gptneox" => Some(Pairing::Neox),
            "llama" | "mistral" => Some(Pairing::Adjacent),
            _ => None,
        }
    }
}

/// What the invariants know of the model beyond the engine's dump.
#[derive(Debug, Clone, Copy, Default)]
pub struct ModelFacts<'a> {
    /// The model's RoPE pairing (None: accept either and say which held).
    pub pairing: Option<Pairing>,
    /// The prompt's token count (the golden's), which places decode steps' positions.
    pub n_prompt: Option<usize>,
    /// The taps of llama.cpp's graph for this model (the golden's): RoPE's input is the tap that graph
    /// rotates (gemma3: `Qcur_normed-L`), not whichever pre-RoPE tap the dump happens to hold. None: taken
    /// from the dump's own taps.
    pub graph: Option<&'a [TapId]>,
}

/// A check that could not run on this dump, and why (reported as not checked, never as passed).
#[derive(Debug, Clone, PartialEq)]
pub struct NotRun {
    /// The check's result name, e.g. `invariants:rope_pair_norm`.
    pub name: String,
    pub reason: String,
}

/// The invariants' verdicts, and the invariants that could not run.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    pub results: Vec<CheckResult>,
    pub not_run: Vec<NotRun>,
}

/// Runs all invariants over the engine's taps.
pub fn check(src: &dyn TapSource, tol: &Tolerances, facts: &ModelFacts) -> Result<Outcome> {
    let mut ids: Vec<TapId> = src.keys().iter().filter_map(|k| TapId::parse_key(k)).collect();
    crate::tapname::GraphOrder::default().sort(&mut ids);
    let lim = |k: &str| tol.get(&format!("invariants.{k}"));
    // An engine that stored its taps in f16 or bf16 rounded every value by up to that format's unit
    // roundoff u: a softmax row's sum moves by at most u.
    let u_sm = ids.iter().filter(|t| t.family == "kq_soft_max").map(|t| storage_roundoff(src, &t.key())).fold(0.0, f64::max);

    let (mut nonfinite, mut nonfinite_at) = (0usize, None);
    let (mut row_err, mut row_at, mut masked, mut masked_at, mut n_sm) = (0f64, String::new(), 0f64, String::new(), 0);
    let n_prompt = match facts.n_prompt {
        Some(n) => Some(n),
        None => ids.iter().find(|t| t.step == 0 && t.family == "embd").and_then(|t| src.tensor(&t.key())).transpose()?.map(|t| rows(&t.shape)),
    };
    for id in &ids {
        let t = src.tensor(&id.key()).expect("listed key")?;
        let nf = t.data.iter().filter(|v| !v.is_finite()).count();
        if nf > 0 && nonfinite_at.is_none() {
            nonfinite_at = Some(id.key());
        }
        nonfinite += nf;
        if id.family == "kq_soft_max" && t.shape.len() == 4 {
            n_sm += 1;
            let (h, tk, kv) = (t.shape[1], t.shape[2], t.shape[3]);
            for hh in 0..h {
                for r in 0..tk {
                    let row = &t.data[(hh * tk + r) * kv..(hh * tk + r + 1) * kv];
                    let s: f64 = row.iter().map(|&v| v as f64).sum();
                    if worse((s - 1.0).abs(), row_err) {
                        row_err = (s - 1.0).abs();
                        row_at = format!("{} head {hh} row {r}", id.key());
                    }
                    // Row r's position: the kv length is trimmed to the used cache. A tensor whose rows
                    // outnumber its kv length (scores dumped tokens-first) must not underflow here.
                    let pos = (kv + r).saturating_sub(tk);
                    for &v in row.get(pos + 1..).unwrap_or(&[]) {
                        if worse(v.abs() as f64, masked) {
                            masked = v.abs() as f64;
                            masked_at = format!("{} head {hh} row {r}", id.key());
                        }
                    }
                }
            }
        }
    }
    let mut res = vec![CheckResult::new("invariants:non_finite", "NaN/Inf elements in all taps", nonfinite as f64, Op::Le, lim("non_finite").value)
        .with_detail(nonfinite_at.map_or("none".into(), |k| format!("first in {k}")))];
    if n_sm > 0 {
        let l = with_storage(lim("softmax_row_sum"), u_sm, 1.0);
        res.push(
            CheckResult::new("invariants:softmax_row_sum", "max |Σ row − 1| of kq_soft_max", row_err, Op::Le, l.value)
                .with_detail(row_at)
                .with_reason(Some(l.reason)),
        );
        res.push(
            CheckResult::new("invariants:masked", "max |p| at future positions", masked, Op::Le, lim("masked").value).with_detail(if masked_at.is_empty() {
                "none".into()
            } else {
                masked_at
            }),
        );
    }
    res.extend(rms_unit(src, &ids, lim("rms_unit"), RmsEps::from_tolerances(tol))?);
    let (rope, not_run) = rope_checks(src, &ids, tol, facts.pairing, n_prompt, facts.graph)?;
    res.extend(rope);
    Ok(Outcome { results: res, not_run })
}

/// The unit roundoff of the format the engine stored `key` in (0 for f32 and wider).
pub fn storage_roundoff(src: &dyn TapSource, key: &str) -> f64 {
    match src.stored_dtype(key) {
        Some(safetensors::Dtype::F16) => 2f64.powi(-11),
        Some(safetensors::Dtype::BF16) => 2f64.powi(-8),
        _ => 0.0,
    }
}

/// `limit + factor × u`, saying so in the reason, when the taps were stored with unit roundoff u.
fn with_storage(l: super::Limit, u: f64, factor: f64) -> super::Limit {
    if u == 0.0 {
        return l;
    }
    let extra = factor * u;
    super::Limit { value: l.value + extra, reason: format!("{} + {extra:.1e} for the dump's storage rounding (unit roundoff {u:.1e})", l.reason) }
}

/// The largest RMSNorm epsilon of the models lockstep knows (llama, smollm2: 1e-5; qwen2, gemma3: 1e-6): the
/// bound a row's shortfall from unit mean square is excused by when the model's own eps is not known.
pub const RMS_EPS_MAX: f64 = 1e-5;

/// The tolerance key that carries the model's RMSNorm eps (`{arch}.attention.layer_norm_rms_epsilon`):
/// `lockstep compare` sets it from the golden's model file; a suite may set it. Without it `rms_unit`
/// falls back to the bound [`RMS_EPS_MAX`].
pub const RMS_EPS_KEY: &str = "invariants.rms_eps";

/// The model's own RMSNorm eps, `{arch}.attention.layer_norm_rms_epsilon` of `file` (`name`: how to
/// call that file in the reason), and where it was read; None when the key is missing or not a
/// finite eps ≥ 0.
pub fn model_rms_eps(file: &lockstep_engine::gguf::GgufFile, arch: &str, name: &str) -> Option<(f64, String)> {
    let key = format!("{arch}.attention.layer_norm_rms_epsilon");
    let eps = file.meta_f64(&key).ok()?;
    (eps.is_finite() && eps >= 0.0).then(|| (eps, format!("{key} of {name}")))
}

/// Holds `rms_unit` to the model's eps (from [`model_rms_eps`]) unless `tol` already sets [`RMS_EPS_KEY`]
/// (a suite's or a caller's own value stays).
pub fn hold_to_model_eps(tol: &mut Tolerances, (eps, from): &(f64, String)) {
    if !tol.map.contains_key(RMS_EPS_KEY) {
        tol.set(RMS_EPS_KEY, *eps, &format!("the model's layer_norm_rms_epsilon ({from})"));
    }
}

/// The eps an RMSNorm row is held to: the model's own (a row of input mean square `ms_in` must have mean
/// square `ms_in/(ms_in + eps)`), or, when unknown, only a bound (anything in `[ms_in/(ms_in + bound), 1]`).
#[derive(Debug, Clone, PartialEq)]
enum RmsEps {
    Model { eps: f64, reason: String },
    AtMost(f64),
}

impl RmsEps {
    fn from_tolerances(tol: &Tolerances) -> RmsEps {
        match tol.map.get(RMS_EPS_KEY) {
            Some(l) if l.value.is_finite() && l.value >= 0.0 => RmsEps::Model { eps: l.value, reason: l.reason.clone() },
            _ => RmsEps::AtMost(RMS_EPS_MAX),
        }
    }

    /// A row's relative deviation from what RMSNorm gives an input of mean square `ms_in` > 0: with the
    /// model's eps, |ms / (ms_in/(ms_in + eps)) − 1|; with a bound, the relative distance from the interval
    /// `[ms_in/(ms_in + bound), 1]`. Relative, so that a wrong eps shows where it matters: on rows whose
    /// input is comparable to eps (an output mean square of 6.8e-4 for 6.8e-3 is a 90 % error).
    fn deviation(&self, ms: f64, ms_in: f64) -> f64 {
        match *self {
            RmsEps::Model { eps, .. } => (ms * (ms_in + eps) / ms_in - 1.0).abs(),
            RmsEps::AtMost(bound) => {
                let lo = ms_in / (ms_in + bound);
                if ms < lo {
                    1.0 - ms / lo
                } else {
                    (ms - 1.0).max(0.0)
                }
            }
        }
    }

    fn describe(&self) -> String {
        match self {
            RmsEps::Model { eps, reason } => format!("eps {eps:.1e}: {reason}"),
            RmsEps::AtMost(b) => format!("eps ≤ {b:.0e} (the model's eps not known here: the largest of the models lockstep knows)"),
        }
    }
}

/// An RMSNorm output row's mean square: `ms/(ms + eps)` for an input of mean square `ms`, which is 1 only
/// while `ms ≫ eps`. gemma3-270m's layer 14 FFN output for the BOS token has `ms` 6.8e-9, so its
/// `norm.rms_norm.14` row 0 has mean square 6.8e-3, correctly. A row further than the limit from 1 is
/// therefore held to its input: the tap of the same step whose row is a positive multiple of it (found by
/// value: taps are named per architecture, and gemma3's post-FFN norm carries no layer). Its deviation is
/// then relative to `ms_in/(ms_in + eps)` with the model's eps ([`RmsEps`]; with only a bound on eps, to
/// the interval up to 1): a row whose input's mean square is comparable to or below eps is exempt from unit
/// mean square, one whose input is ≫ eps is not, and a wrong eps fails the rows where it shows. Rows within
/// the limit keep |mean square − 1| (so passing values do not change); the value is the largest
/// deviation, and the detail names the exempt rows with the eps each implies.
fn rms_unit(src: &dyn TapSource, ids: &[TapId], l: super::Limit, eps: RmsEps) -> Result<Option<CheckResult>> {
    let (mut err, mut at, mut n) = (0f64, String::new(), 0usize);
    // Rows held to ms/(ms + eps): count, and the one of the smallest input mean square.
    let (mut n_exempt, mut example): (usize, Option<(f64, String)>) = (0, None);
    let mut inputs = InputFinder::default();
    for id in ids.iter().filter(|t| t.family == "norm") {
        let t = src.tensor(&id.key()).expect("listed key")?;
        if t.shape.len() < 2 {
            continue;
        }
        n += 1;
        let w = (*t.shape.last().unwrap()).max(1);
        for (r, row) in t.data.chunks_exact(w).enumerate() {
            let ms = mean_square(row);
            let mut dev = (ms - 1.0).abs();
            if dev > l.value {
                if let Some((input, ms_in)) = inputs.find(src, ids, id, t.data.len(), w, r, row)? {
                    // Held to its input: the row is judged by what RMSNorm gives that input.
                    dev = eps.deviation(ms, ms_in);
                    if dev <= l.value {
                        n_exempt += 1;
                        if example.as_ref().is_none_or(|(m, _)| ms_in < *m) {
                            let implied = ms_in * (1.0 - ms) / ms;
                            example = Some((ms_in, format!("{} row {r}: input {input} mean square {ms_in:.1e}, output {ms:.1e}, eps {implied:.1e}", id.key())));
                        }
                    }
                }
            }
            if worse(dev, err) {
                err = dev;
                at = format!("{} row {r}", id.key());
            }
        }
    }
    if n == 0 {
        return Ok(None);
    }
    let mut detail = if at.is_empty() { "every row at 1".to_string() } else { format!("worst at {at}") };
    if let Some((_, e)) = example {
        detail.push_str(&format!("; {n_exempt} rows of input mean square comparable to eps held to ms/(ms + eps), {} (smallest input: {e})", eps.describe()));
    }
    // The metric's name is kept for reports and snapshots; an exempt row's deviation is from
    // ms/(ms + eps) (the detail names them).
    Ok(Some(
        CheckResult::new("invariants:rms_unit", "max |mean square − 1| of norm-L (before weight)", err, Op::Le, l.value)
            .with_detail(detail)
            .with_reason(Some(l.reason)),
    ))
}

fn mean_square(row: &[f32]) -> f64 {
    row.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>() / row.len().max(1) as f64
}

/// Finds an RMSNorm row's input by value: RMSNorm only scales a row, so its input is the row of another
/// tap of the same step (same element count, same row width) at cosine 1 with it. Weighted norm outputs
/// (`attn_norm`, `Qcur_normed`, …: any family naming a norm) are not inputs and are skipped; so are taps
/// more than one layer away (a layer-less norm, such as gemma3's `norm.rms_norm.L`, looks in every layer).
#[derive(Default)]
struct InputFinder {
    step: Option<usize>,
    /// This step's candidate taps, loaded on first use.
    loaded: std::collections::HashMap<String, crate::golden::Tensor>,
}

impl InputFinder {
    #[allow(clippy::too_many_arguments)]
    fn find(&mut self, src: &dyn TapSource, ids: &[TapId], norm: &TapId, len: usize, w: usize, r: usize, row: &[f32]) -> Result<Option<(String, f64)>> {
        if self.step != Some(norm.step) {
            self.step = Some(norm.step);
            self.loaded.clear();
        }
        let near = |c: &TapId| match (norm.layer, c.layer) {
            (Some(l), Some(cl)) => cl == l || cl + 1 == l,
            _ => true,
        };
        let norm_out = row.iter().map(|&v| (v as f64).powi(2)).sum::<f64>().sqrt();
        for c in ids.iter().filter(|c| c.step == norm.step && !c.family.contains("norm") && near(c)) {
            let key = c.key();
            if !self.loaded.contains_key(&key) {
                let Some(t) = src.tensor(&key) else { continue };
                self.loaded.insert(key.clone(), t?);
            }
            let t = &self.loaded[&key];
            if t.data.len() != len {
                continue;
            }
            let cand = &t.data[r * w..(r + 1) * w];
            let (dot, n2) = cand.iter().zip(row).fold((0f64, 0f64), |(d, n), (&a, &b)| (d + a as f64 * b as f64, n + (a as f64).powi(2)));
            if n2 > 0.0 && norm_out > 0.0 && dot / (n2.sqrt() * norm_out) > 1.0 - 1e-6 {
                return Ok(Some((c.tap.clone(), n2 / w as f64)));
            }
        }
        Ok(None)
    }
}

fn rows(shape: &[usize]) -> usize {
    if shape.len() >= 2 {
        shape[shape.len() - 2]
    } else {
        1
    }
}

/// RoPE pair-norm and angle-linearity over every `{Q,K}cur-L.rope` with its pre-RoPE tap.
/// RoPE's input is the tap llama.cpp's graph rotates (`graph`, the golden's taps, else the dump's own); a
/// rope tap whose input the dump lacks is not checked: when no rope tap can be, both checks are returned
/// as not run with the reason, and when some can, the detail says how many were left out.
fn rope_checks(
    src: &dyn TapSource,
    ids: &[TapId],
    tol: &Tolerances,
    pairing: Option<Pairing>,
    n_prompt: Option<usize>,
    graph: Option<&[TapId]>,
) -> Result<(Vec<CheckResult>, Vec<NotRun>)> {
    let candidates: Vec<Pairing> = pairing.map_or(vec![Pairing::Neox, Pairing::Adjacent], |p| vec![p]);
    // For each candidate pairing: (worst pair-norm error, where), (worst angle deviation, where).
    let mut best: Option<(Pairing, f64, String, f64, String)> = None;
    let mut any = false;
    // The graph's choice where it shows RoPE's input; the dump's own for a family the graph does not show.
    let mut inputs = rope_inputs(ids);
    if let Some(g) = graph {
        inputs.extend(rope_inputs(g));
    }
    // Rope taps whose input the dump lacks (checked once, with the first candidate pairing).
    let mut lacking: Vec<String> = Vec::new();
    let (mut u_rope, mut max_pos) = (0f64, 0usize);
    for &pairing in &candidates {
        let (mut norm_err, mut norm_at, mut ang_err, mut ang_at) = (0f64, String::new(), 0f64, String::new());
        // Angles per (family, layer, head, pair) at position 1, filled as we meet them.
        let mut theta1: std::collections::HashMap<(String, Option<usize>, usize, usize), f64> = Default::default();
        let mut angles: Vec<((String, Option<usize>, usize, usize), usize, f64, String)> = Vec::new();
        for id in ids.iter().filter(|t| t.stage.as_deref() == Some("rope")) {
            // RoPE's input (`rope_inputs`): Q/K's bias add, its head norm or the projection itself.
            let Some((family, stage)) = inputs.get(&id.family) else { continue };
            let pre_key = format!("s{}/{family}-{}{}", id.step, id.layer.unwrap_or(0), stage.as_deref().map_or(String::new(), |s| format!(".{s}")));
            if src.tensor(&pre_key).is_none() {
                if pairing == candidates[0] {
                    lacking.push(pre_key);
                }
                continue;
            }
            // A decode step's position needs the prompt's length.
            if id.step > 0 && n_prompt.is_none() {
                continue;
            }
            u_rope = u_rope.max(storage_roundoff(src, &id.key())).max(storage_roundoff(src, &pre_key));
            let post = src.tensor(&id.key()).expect("listed")?;
            let pre = src.tensor(&pre_key).expect("checked")?;
            if post.shape.len() != 4 || pre.data.len() != post.data.len() {
                continue;
            }
            any = true;
            let (tk, h, d) = (post.shape[1], post.shape[2], post.shape[3]);
            let pos0 = if id.step == 0 { 0 } else { n_prompt.unwrap_or(0) + id.step - 1 };
            for t in 0..tk {
                for hh in 0..h {
                    let base = (t * h + hh) * d;
                    let (a, b) = (&pre.data[base..base + d], &post.data[base..base + d]);
                    let head_norm = a.iter().map(|&v| (v as f64).powi(2)).sum::<f64>().sqrt().max(1e-30);
                    for (pi, (i, j)) in pairing.pairs(d).into_iter().enumerate() {
                        let (x0, y0, x1, y1) = (a[i] as f64, a[j] as f64, b[i] as f64, b[j] as f64);
                        let (n0, n1) = ((x0 * x0 + y0 * y0).sqrt(), (x1 * x1 + y1 * y1).sqrt());
                        let e = (n1 - n0).abs() / head_norm;
                        if worse(e, norm_err) {
                            norm_err = e;
                            norm_at = format!("{} token {t} head {hh} pair {pi}", id.key());
                        }
                        // Angles are only well defined where the pair carries signal.
                        if n0 > 1e-3 * head_norm && n1 > 0.0 {
                            let ang = (x0 * y1 - y0 * x1).atan2(x0 * x1 + y0 * y1);
                            let k = (id.family.clone(), id.layer, hh, pi);
                            let p = pos0 + t;
                            max_pos = max_pos.max(p);
                            if p == 1 {
                                theta1.insert(k.clone(), ang);
                            }
                            angles.push((k, p, ang, format!("{} token {t} head {hh} pair {pi}", id.key())));
                        }
                    }
                }
            }
        }
        for (k, p, ang, at) in &angles {
            let Some(&t1) = theta1.get(k) else { continue };
            let want = *p as f64 * t1;
            let dev = wrap(ang - want).abs();
            if worse(dev, ang_err) {
                ang_err = dev;
                ang_at = format!("{at} (position {p})");
            }
        }
        let has_angles = !theta1.is_empty();
        let cand = (pairing, norm_err, norm_at, if has_angles { ang_err } else { f64::NAN }, ang_at);
        if best.as_ref().is_none_or(|b| cand.1 < b.1) {
            best = Some(cand);
        }
    }
    let lacking_note = |n_rope: usize| {
        let family: std::collections::BTreeSet<String> = lacking.iter().filter_map(|k| TapId::parse_key(k)).map(|t| t.family_stage()).collect();
        format!(
            "RoPE's input ({}, the tap llama.cpp's graph rotates) is not in the dump for {n_rope} rope tap{} (e.g. {})",
            family.into_iter().collect::<Vec<_>>().join(", "),
            if n_rope == 1 { "" } else { "s" },
            lacking[0]
        )
    };
    let Some((pairing_seen, norm_err, norm_at, ang_err, ang_at)) = best.filter(|_| any) else {
        if lacking.is_empty() {
            return Ok((Vec::new(), Vec::new()));
        }
        let reason = format!("{}: no rope tap could be checked; dump it to run the RoPE invariants", lacking_note(lacking.len()));
        let not_run =
            ["invariants:rope_pair_norm", "invariants:rope_relative"].iter().map(|n| NotRun { name: n.to_string(), reason: reason.clone() }).collect();
        return Ok((Vec::new(), not_run));
    };
    let left_out = if lacking.is_empty() { String::new() } else { format!("; not checked: {}", lacking_note(lacking.len())) };
    // Storage rounding: a pair's norm moves by at most u on each side (2u); an angle by about √2·u on
    // each side, and angle(1) is multiplied by the position: 3u(1 + p).
    let ln = with_storage(tol.get("invariants.rope_pair_norm"), u_rope, 2.0);
    let la = with_storage(tol.get("invariants.rope_relative"), u_rope, 3.0 * (1 + max_pos) as f64);
    let mut out = vec![CheckResult::new("invariants:rope_pair_norm", "max |‖pair after‖ − ‖pair before‖| / ‖head‖", norm_err, Op::Le, ln.value)
        .with_detail(format!("{} pairing; worst at {norm_at}{left_out}", pairing_seen.name()))
        .with_reason(Some(ln.reason))];
    let mut not_run = Vec::new();
    if !ang_err.is_nan() {
        out.push(
            CheckResult::new("invariants:rope_relative", "max |angle(p) − p·angle(1)| rad", ang_err, Op::Le, la.value)
                .with_detail(format!("angle linear in position ⇔ q·k depends on m−n only; worst at {ang_at}{left_out}"))
                .with_reason(Some(la.reason)),
        );
    } else {
        not_run.push(NotRun {
            name: "invariants:rope_relative".into(),
            reason: "no rope tap at position 1 with its input in the dump: the angle at position 1 is the reference".into(),
        });
    }
    Ok((out, not_run))
}

/// RoPE's input for each rotated family (`Qcur`, `Kcur`): the last tap before `{F}-L.rope` in graph order
/// among F's own taps and its head norm `{F}_normed`, as the dump holds them: qwen2 `Qcur-L.add` (the
/// bias; the matmul alone is not RoPE's input), llama `Qcur-L.mul_mat`, gemma3 (and qwen3, olmo2)
/// `Qcur_normed-L`, the RMSNorm of each head with its weight. Taken over every layer and step of the taps
/// given (llama.cpp's graph, i.e. the golden's, where the caller knows it; else the dump's), so that a layer
/// or a dump missing that tap is skipped rather than paired with an earlier one: a rotation of the
/// un-normed projection is not what RoPE was given. Value: (family, stage) of the input.
fn rope_inputs(ids: &[TapId]) -> std::collections::HashMap<String, (String, Option<String>)> {
    let order = crate::tapname::GraphOrder::default();
    let mut out: std::collections::HashMap<String, (String, Option<String>)> = Default::default();
    for rotated in ids.iter().filter(|t| t.stage.as_deref() == Some("rope")).map(|t| t.family.clone()).collect::<std::collections::BTreeSet<_>>() {
        let normed = format!("{rotated}_normed");
        let chain = ids.iter().filter(|t| (t.family == rotated && t.stage.as_deref() != Some("rope")) || t.family == normed);
        // Compared as taps of one layer: the within-layer rank alone decides.
        let last = chain.max_by(|a, b| {
            let at = |t: &TapId| TapId { step: 0, layer: Some(0), ..t.clone() };
            order.cmp(&at(a), &at(b))
        });
        if let Some(t) = last {
            out.insert(rotated, (t.family.clone(), t.stage.clone()));
        }
    }
    out
}

/// Whether `v` is a worse (larger, or NaN) value than the worst so far; NaN stays worst.
pub fn worse(v: f64, cur: f64) -> bool {
    !cur.is_nan() && (v.is_nan() || v > cur)
}

fn wrap(a: f64) -> f64 {
    let mut a = a % (2.0 * PI);
    if a > PI {
        a -= 2.0 * PI;
    } else if a < -PI {
        a += 2.0 * PI;
    }
    a
}

/// Applies RoPE to a `[tokens, heads, d]` buffer (test helper and reference for the probes).
pub fn apply_rope(x: &mut [f32], tokens: usize, heads: usize, d: usize, pos0: usize, base: f64, pairing: Pairing) {
    for t in 0..tokens {
        for h in 0..heads {
            for (i, (a, b)) in pairing.pairs(d).into_iter().enumerate() {
                let theta = (pos0 + t) as f64 * base.powf(-2.0 * i as f64 / d as f64);
                let (c, s) = (theta.cos(), theta.sin());
                let o = (t * heads + h) * d;
                let (x0, x1) = (x[o + a] as f64, x[o + b] as f64);
                x[o + a] = (x0 * c - x1 * s) as f32;
                x[o + b] = (x0 * s + x1 * c) as f32;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checks::MemTaps;
    use crate::golden::Tensor;

    /// Every verdict of `check` with only a pairing known (the runner's own engines' view).
    fn run(m: &MemTaps, tol: &Tolerances, pairing: Option<Pairing>) -> Vec<CheckResult> {
        let out = check(m, tol, &ModelFacts { pairing, ..Default::default() }).unwrap();
        assert!(out.not_run.is_empty(), "{:?}", out.not_run);
        out.results
    }

    fn rope_taps(pairing_used: Pairing, base: f64) -> MemTaps {
        let (tk, h, d) = (4, 2, 8);
        let pre: Vec<f32> = (0..tk * h * d).map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.3 + 0.1).collect();
        let mut post = pre.clone();
        apply_rope(&mut post, tk, h, d, 0, base, pairing_used);
        let mut m = MemTaps::default();
        m.0.insert("s0/Qcur-0.add".into(), Tensor { shape: vec![1, 1, tk, h * d], data: pre });
        m.0.insert("s0/Qcur-0.rope".into(), Tensor { shape: vec![1, tk, h, d], data: post });
        m
    }

    #[test]
    fn rope_invariants_hold_for_rope_and_catch_a_wrong_pairing() {
        let tol = Tolerances::new(crate::vocab::Tier::Exact);
        let ok = run(&rope_taps(Pairing::Neox, 1e6), &tol, Some(Pairing::Neox));
        assert!(ok.iter().all(|c| c.passed), "{ok:?}");
        assert!(ok.iter().any(|c| c.name == "invariants:rope_relative"));
        let bad = run(&rope_taps(Pairing::Adjacent, 1e6), &tol, Some(Pairing::Neox));
        assert!(bad.iter().any(|c| c.name == "invariants:rope_pair_norm" && !c.passed), "{bad:?}");
        // Unknown pairing: the one that holds is reported.
        let either = run(&rope_taps(Pairing::Adjacent, 1e4), &tol, None);
        assert!(either.iter().all(|c| c.passed), "{either:?}");
    }

    #[test]
    fn rope_with_a_position_dependent_base_breaks_linearity() {
        let (tk, h, d) = (4, 1, 4);
        let pre: Vec<f32> = (0..tk * h * d).map(|i| 1.0 + i as f32 * 0.1).collect();
        let mut post = pre.clone();
        for t in 0..tk {
            // Each position rotated with a different base: not a function of position alone times θ.
            apply_rope(&mut post[t * d..(t + 1) * d], 1, 1, d, t * t, 1e4, Pairing::Neox);
        }
        let mut m = MemTaps::default();
        m.0.insert("s0/Kcur-0.mul_mat".into(), Tensor { shape: vec![1, 1, tk, d], data: pre });
        m.0.insert("s0/Kcur-0.rope".into(), Tensor { shape: vec![1, tk, h, d], data: post });
        let r = run(&m, &Tolerances::new(crate::vocab::Tier::Exact), Some(Pairing::Neox));
        assert!(r.iter().any(|c| c.name == "invariants:rope_relative" && !c.passed), "{r:?}");
    }

    /// A gemma3-like Q of `tk` tokens × `h` heads × `d`: its projection, each head RMS-normed with a
    /// weight (`Qcur_normed`), and that rotated (NeoX pairs, base 1e4).
    fn head_normed_rope(tk: usize, h: usize, d: usize) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let proj: Vec<f32> = (0..tk * h * d).map(|i| ((i * 29 % 13) as f32 - 6.0) * 0.7).collect();
        let normed: Vec<f32> = proj
            .chunks_exact(d)
            .flat_map(|head| {
                let s = (head.iter().map(|v| v * v).sum::<f32>() / d as f32 + 1e-6).sqrt();
                head.iter().enumerate().map(move |(i, v)| v / s * (1.0 + 0.1 * i as f32)).collect::<Vec<_>>()
            })
            .collect();
        let mut post = normed.clone();
        apply_rope(&mut post, tk, h, d, 0, 1e4, Pairing::Neox);
        (proj, normed, post)
    }

    /// gemma3: RoPE rotates `Qcur_normed-L` (each head RMS-normed with its weight), not `Qcur-L.mul_mat`.
    #[test]
    fn rope_input_is_the_head_norm_where_the_dump_has_one() {
        let (tk, h, d) = (3, 2, 8);
        let (proj, normed, post) = head_normed_rope(tk, h, d);
        let mut m = MemTaps::default();
        m.0.insert("s0/Qcur-0.mul_mat".into(), Tensor { shape: vec![1, 1, tk, h * d], data: proj });
        m.0.insert("s0/Qcur_normed-0".into(), Tensor { shape: vec![1, tk, h, d], data: normed });
        m.0.insert("s0/Qcur-0.rope".into(), Tensor { shape: vec![1, tk, h, d], data: post });
        let r = run(&m, &Tolerances::new(crate::vocab::Tier::Exact), Pairing::for_arch("gemma3"));
        let names: Vec<_> = r.iter().map(|c| (c.name.as_str(), c.passed)).collect();
        assert_eq!(names, [("invariants:non_finite", true), ("invariants:rope_pair_norm", true), ("invariants:rope_relative", true)], "{r:?}");
        // Paired with the projection (as before), the same correct taps fail.
        m.0.remove("s0/Qcur_normed-0");
        let r = run(&m, &Tolerances::new(crate::vocab::Tier::Exact), Pairing::for_arch("gemma3"));
        assert!(r.iter().any(|c| c.name == "invariants:rope_pair_norm" && !c.passed), "{r:?}");
        assert_eq!(rope_inputs(&[TapId::parse_key("s0/Qcur_normed-3").unwrap(), TapId::parse_key("s0/Qcur-3.rope").unwrap()])["Qcur"].0, "Qcur_normed");
    }

    /// An RMSNorm row whose input's mean square is below eps has mean square ms/(ms + eps), not 1.
    #[test]
    fn rms_rows_of_an_input_below_eps_are_held_to_ms_over_ms_plus_eps() {
        let w = 8;
        let eps = 1e-6f64;
        // Row 0: the BOS token's tiny FFN output (ms 6.8e-9, as gemma3's layer 14); row 1: an ordinary one.
        let input: Vec<f32> = (0..2 * w).map(|i| if i < w { 8.2e-5 * if i % 2 == 0 { 1.0 } else { -1.0 } } else { 0.5 + i as f32 * 0.1 }).collect();
        let norm = |x: &[f32]| -> Vec<f32> {
            x.chunks_exact(w)
                .flat_map(|row| {
                    let s = (mean_square(row) + eps).sqrt();
                    row.iter().map(move |&v| (v as f64 / s) as f32).collect::<Vec<_>>()
                })
                .collect()
        };
        let out = norm(&input);
        assert!(mean_square(&out[..w]) < 0.01);
        let mut m = MemTaps::default();
        m.0.insert("s0/ffn_out-14".into(), Tensor { shape: vec![1, 1, 2, w], data: input.clone() });
        m.0.insert("s0/norm.rms_norm.14".into(), Tensor { shape: vec![1, 1, 2, w], data: out.clone() });
        let tol = Tolerances::new(crate::vocab::Tier::Exact);
        let rms = |m: &MemTaps| run(m, &tol, None).into_iter().find(|c| c.name == "invariants:rms_unit").unwrap();
        let ok = rms(&m);
        assert!(ok.passed && ok.value < 1e-6, "{ok:?}");
        let detail = ok.detail.unwrap();
        assert!(
            detail.contains("1 rows of input mean square comparable to eps") && detail.contains("input ffn_out-14") && detail.contains("eps 1.0e-6"),
            "{detail}"
        );
        // Without its input the row is not excused.
        let mut alone = m.clone();
        alone.0.remove("s0/ffn_out-14");
        assert!(!rms(&alone).passed);
        // A row at half its input's scale is no eps effect: its input's mean square (0.25) is ≫ eps.
        let mut half = out.clone();
        half[w..].iter_mut().for_each(|v| *v *= 0.5_f32.sqrt());
        let mut bad = m.clone();
        bad.0.insert("s0/ffn_out-14".into(), Tensor { shape: vec![1, 1, 2, w], data: input.iter().map(|v| v * 0.5).collect() });
        bad.0.insert("s0/norm.rms_norm.14".into(), Tensor { shape: vec![1, 1, 2, w], data: half });
        let r = rms(&bad);
        assert!(!r.passed && r.value > 0.49 && r.detail.as_deref().unwrap().starts_with("worst at s0/norm.rms_norm.14 row 1"), "{r:?}");
        // A weighted norm output parallel to the row is never taken for its input.
        let mut weighted = alone.clone();
        weighted.0.insert("s0/ffn_post_norm-14".into(), Tensor { shape: vec![1, 1, 2, w], data: input });
        assert!(!rms(&weighted).passed);
    }

    /// With the model's eps (the tolerance `invariants.rms_eps`, set by `lockstep compare` from the model
    /// file), a row of input below eps is held to ms/(ms + eps) exactly, relative: an engine whose eps is
    /// 10× the model's passes under the old bound (eps ≤ 1e-5) and fails with the model's 1e-6.
    #[test]
    fn rms_rows_are_held_to_the_models_own_eps() {
        let w = 8;
        // Row 0: gemma3's BOS row of layer 14's FFN output (mean square 6.8e-9); row 1: an ordinary one.
        let input: Vec<f32> = (0..2 * w).map(|i| if i < w { 8.2e-5 * if i % 2 == 0 { 1.0 } else { -1.0 } } else { 0.5 + i as f32 * 0.1 }).collect();
        let taps = |eps: f64| {
            let out: Vec<f32> = input
                .chunks_exact(w)
                .flat_map(|row| {
                    let s = (mean_square(row) + eps).sqrt();
                    row.iter().map(move |&v| (v as f64 / s) as f32).collect::<Vec<_>>()
                })
                .collect();
            let mut m = MemTaps::default();
            m.0.insert("s0/ffn_out-14".into(), Tensor { shape: vec![1, 1, 2, w], data: input.clone() });
            m.0.insert("s0/norm.rms_norm.14".into(), Tensor { shape: vec![1, 1, 2, w], data: out });
            m
        };
        let bound = Tolerances::new(crate::vocab::Tier::Exact);
        let mut model = bound.clone();
        model.set(RMS_EPS_KEY, 1e-6, "the model's layer_norm_rms_epsilon (gemma3.attention.layer_norm_rms_epsilon of test.gguf)");
        let rms = |m: &MemTaps, tol: &Tolerances| run(m, tol, None).into_iter().find(|c| c.name == "invariants:rms_unit").unwrap();
        // llama.cpp's eps: passes both ways; the detail names the model's eps and where it was read.
        let right = rms(&taps(1e-6), &model);
        assert!(right.passed && right.value < 1e-6, "{right:?}");
        assert!(right.detail.as_deref().unwrap().contains("eps 1.0e-6: the model's layer_norm_rms_epsilon (gemma3."), "{right:?}");
        assert!(rms(&taps(1e-6), &bound).passed);
        // eps 1e-5 (10× the model's): excused by the bound, caught with the model's eps (output 6.8e-4
        // where 6.8e-3 is due: 90 % off).
        let under_bound = rms(&taps(1e-5), &bound);
        assert!(under_bound.passed && under_bound.detail.as_deref().unwrap().contains("eps ≤ 1e-5"), "{under_bound:?}");
        let wrong = rms(&taps(1e-5), &model);
        assert!(
            !wrong.passed && (wrong.value - 0.9).abs() < 0.01 && wrong.detail.as_deref().unwrap().starts_with("worst at s0/norm.rms_norm.14 row 0"),
            "{wrong:?}"
        );
        // eps 1e-3 is caught under the bound too (as before: its output lies below ms/(ms + 1e-5)).
        let far = rms(&taps(1e-3), &bound);
        assert!(!far.passed && far.value > 0.9, "{far:?}");
    }

    /// gemma3 rotates `Qcur_normed-L`. A dump without it leaves the RoPE invariants not run (with the
    /// reason), never paired with the projection (a false failure) and never passed; a dump holding it for
    /// some layers runs them there and says what it left out.
    #[test]
    fn rope_invariants_without_their_input_are_not_run() {
        let (tk, h, d) = (3, 2, 8);
        let (proj, normed, post) = head_normed_rope(tk, h, d);
        let mut m = MemTaps::default();
        for l in 0..2 {
            m.0.insert(format!("s0/Qcur-{l}.mul_mat"), Tensor { shape: vec![1, 1, tk, h * d], data: proj.clone() });
            m.0.insert(format!("s0/Qcur-{l}.rope"), Tensor { shape: vec![1, tk, h, d], data: post.clone() });
        }
        // llama.cpp's graph (the golden's taps): mul_mat, the head norm, then RoPE, in both layers.
        let graph: Vec<TapId> = (0..2)
            .flat_map(|l| [format!("s0/Qcur-{l}.mul_mat"), format!("s0/Qcur_normed-{l}"), format!("s0/Qcur-{l}.rope")])
            .filter_map(|k| TapId::parse_key(&k))
            .collect();
        let tol = Tolerances::new(crate::vocab::Tier::Exact);
        let facts = ModelFacts { pairing: Pairing::for_arch("gemma3"), n_prompt: Some(tk), graph: Some(&graph) };
        let out = check(&m, &tol, &facts).unwrap();
        assert!(out.results.iter().all(|c| c.passed && !c.name.starts_with("invariants:rope")), "{:?}", out.results);
        let names: Vec<_> = out.not_run.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names, ["invariants:rope_pair_norm", "invariants:rope_relative"]);
        assert!(
            out.not_run[0]
                .reason
                .contains("RoPE's input (Qcur_normed, the tap llama.cpp's graph rotates) is not in the dump for 2 rope taps (e.g. s0/Qcur_normed-0)"),
            "{:?}",
            out.not_run
        );
        // Without the graph, the dump's own last pre-RoPE tap (the projection) is taken: a false failure.
        let blind = check(&m, &tol, &ModelFacts { graph: None, ..facts }).unwrap();
        assert!(blind.results.iter().any(|c| c.name == "invariants:rope_pair_norm" && !c.passed), "{:?}", blind.results);
        // Layer 1 dumps its head norm: the invariants run there, pass, and name what they left out.
        m.0.insert("s0/Qcur_normed-1".into(), Tensor { shape: vec![1, tk, h, d], data: normed });
        let out = check(&m, &tol, &facts).unwrap();
        assert!(out.not_run.is_empty(), "{:?}", out.not_run);
        let pn = out.results.iter().find(|c| c.name == "invariants:rope_pair_norm").unwrap();
        assert!(pn.passed && pn.value < 1e-6, "{pn:?}");
        assert!(
            pn.detail.as_deref().unwrap().contains(
                "not checked: RoPE's input (Qcur_normed, the tap llama.cpp's graph rotates) is not in the dump for 1 rope tap (e.g. s0/Qcur_normed-0)"
            ),
            "{pn:?}"
        );
        assert!(out.results.iter().any(|c| c.name == "invariants:rope_relative" && c.passed));
    }

    #[test]
    fn softmax_mask_nan_and_rms() {
        // 1 head, 2 tokens, kv 2: causal rows [1, 0], [0.4, 0.6].
        let mut m = MemTaps::default();
        m.0.insert("s0/kq_soft_max-0".into(), Tensor { shape: vec![1, 1, 2, 2], data: vec![1.0, 0.0, 0.4, 0.6] });
        m.0.insert("s0/norm-0.rms_norm.0".into(), Tensor { shape: vec![1, 1, 1, 2], data: vec![1.0, -1.0] });
        let tol = Tolerances::new(crate::vocab::Tier::Exact);
        assert!(run(&m, &tol, None).iter().all(|c| c.passed));
        // A missing causal mask: row 0 attends to position 1.
        m.0.insert("s0/kq_soft_max-0".into(), Tensor { shape: vec![1, 1, 2, 2], data: vec![0.5, 0.5, 0.4, 0.6] });
        m.0.insert("s0/norm-0.rms_norm.0".into(), Tensor { shape: vec![1, 1, 1, 2], data: vec![2.0, f32::NAN] });
        let r = run(&m, &tol, None);
        let failed: Vec<_> = r.iter().filter(|c| !c.passed).map(|c| c.name.as_str()).collect();
        assert_eq!(failed, ["invariants:non_finite", "invariants:masked", "invariants:rms_unit"]);
    }
}
