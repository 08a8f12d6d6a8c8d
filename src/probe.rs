//! Proof of the class, not only a guess: for the class the localizer names, re-apply that bug to
//! llama.cpp's own inputs of the op (the golden's taps upstream of the first divergence) and see
//! whether the result reproduces the engine's tensor.
//!
//! "confirmed: adjacent-pair RoPE on llama.cpp's s0/Qcur-0.add reproduces your s0/Qcur-0.rope to 3e-7"
//! says far more than "RoPE pairing or base". A hypothesis confirms when the engine's tensor is much
//! closer to it than to llama.cpp's own (`CONFIRM_RATIO`); otherwise the class stays "suspected" and the
//! report lists what was tried.
//!
//! Hypotheses, by the tap that diverges first:
//! | tap | hypotheses (each applied to the golden's input of the op) |
//! |---|---|
//! | `{Q,K}cur-L.rope` (input: `{Q,K}cur_normed-L` where the graph has it) | the other RoPE pairing; base 1e4 or 1e6 instead of the model's; positions ±1; no RoPE |
//! | `{Q,K,V}cur-L.add` | bias dropped; bias added twice |
//! | `kq-L` (prefill) | KV head `h % n_kv` instead of `h / (n_head / n_kv)` |
//! | `kq-L` (decode) | the new K never written (its score 0); the cache read one slot off |
//! | `kq_soft_max-L` | scale 1/d or none instead of 1/√d; causal window +1 or −1; no mask |
//! | `norm-L.rms_norm.*`, `norm`, gemma3's `norm.rms_norm.L` (input `ffn_out-L`) | RMSNorm eps 1e-5, 1e-6 or 0 instead of the model's |
//! | `attn_norm`, `ffn_norm`, `result_norm` | the norm's weight ignored |
//! | `ffn_swiglu-L` | GELU (tanh or erf) instead of SiLU in the gate |
//! | `ffn_geglu-L` (gemma3) | SiLU, or GELU's erf form, instead of GELU (tanh form) in the gate |
//! | `ffn_inp-L`, `l_out-L` | the residual add dropped |

use crate::checks::invariants::Pairing;
use crate::checks::TapSource;
use crate::golden::{TapsFile, Tensor};
use crate::localize::{BugClass, Localization};
use crate::metrics::tensor_errors;
use serde::Serialize;

/// A hypothesis confirms when the engine is at least this many times closer to it than to llama.cpp.
pub const CONFIRM_RATIO: f64 = 20.0;

/// The outcome of re-applying suspected bugs to llama.cpp's inputs.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ClassProof {
    /// `confirmed` or `suspected`.
    pub verdict: String,
    /// The best hypothesis: what was applied, to which golden tensor.
    pub hypothesis: String,
    /// rel L2 of the engine's tensor from the best hypothesis.
    pub rel_l2: f64,
    /// rel L2 of the engine's tensor from llama.cpp's (the divergence itself).
    pub baseline: f64,
    /// Every hypothesis tried, with its rel L2.
    pub tried: Vec<(String, f64)>,
}

impl ClassProof {
    pub fn confirmed(&self) -> bool {
        self.verdict == "confirmed"
    }
    /// One line for terminals and reports.
    pub fn summary(&self, tap: &str) -> String {
        if self.confirmed() {
            format!("confirmed: {} reproduces the engine's {tap} to {:.1e} (llama.cpp's own is {:.1e} away)", self.hypothesis, self.rel_l2, self.baseline)
        } else {
            format!(
                "suspected: no hypothesis reproduces the engine's {tap}; closest {} at {:.1e} (llama.cpp's own is {:.1e} away)",
                self.hypothesis, self.rel_l2, self.baseline
            )
        }
    }
}

/// What an engine that drops the attention residual computes at `ffn_inp-{layer}` of `step`: llama.cpp's
/// `ffn_inp` minus its residual input (`embd` at layer 0, else `l_out-(layer-1)`; the last layer keeps only
/// the last rows after attention, which line up with the residual's last rows). Returns the residual's key
/// and the prediction; None when the golden lacks either tap. The proof here and `localize::refine` both
/// use it.
pub fn attn_residual_dropped(golden: &TapsFile, step: usize, layer: usize) -> Option<(String, Vec<f32>)> {
    let residual_key = if layer == 0 { format!("s{step}/embd") } else { format!("s{step}/l_out-{}", layer - 1) };
    let g = golden.f32(&format!("s{step}/ffn_inp-{layer}")).ok()?;
    let r = golden.f32(&residual_key).ok().filter(|r| r.data.len() >= g.data.len())?;
    let r = &r.data[r.data.len() - g.data.len()..];
    let without = g.data.iter().zip(r).map(|(a, b)| a - b).collect();
    Some((residual_key, without))
}

/// A hypothesis: its description, the class it proves, and the tensor it predicts.
struct Hypothesis {
    what: String,
    class: BugClass,
    class_text: &'static str,
    predicted: Vec<f32>,
}

/// Tries the hypotheses for the first divergence; on a confirmation, sets the class to the proven one.
/// `pairing`: the model's RoPE pairing, when known; `n_prompt`: the prompt's length (positions).
pub fn prove(loc: &mut Localization, golden: &TapsFile, engine: &dyn TapSource, pairing: Option<Pairing>, n_prompt: Option<usize>) -> Option<ClassProof> {
    let d = loc.first_divergence.clone()?;
    let key = format!("s{}/{}", d.step, d.tap);
    let eng = engine.tensor(&key)?.ok()?;
    let gold = golden.f32(&key).ok()?;
    if eng.data.len() != gold.data.len() || eng.data.iter().any(|v| !v.is_finite()) {
        return None;
    }
    let id = crate::tapname::TapId::parse_key(&key)?;
    let g = |tap: String| golden.f32(&format!("s{}/{tap}", d.step)).ok();
    let l = id.layer;
    let mut hyps: Vec<Hypothesis> = Vec::new();
    match (id.family.as_str(), id.stage.as_deref(), l) {
        ("Qcur" | "Kcur", Some("rope"), Some(l)) => {
            // RoPE's input: the head norm where the graph has one (gemma3 `Qcur_normed-L`), else the bias
            // add (qwen2), else the projection (llama).
            let pre = g(format!("{}_normed-{l}", id.family)).or_else(|| ["add", "mul_mat"].iter().find_map(|s| g(format!("{}-{l}.{s}", id.family))));
            if let Some(pre) = pre.filter(|p| p.data.len() == gold.data.len()) {
                let pos0 = if d.step == 0 { 0 } else { n_prompt.unwrap_or(0) + d.step - 1 };
                hyps.extend(rope_hypotheses(&pre, &gold, pairing, pos0));
            }
        }
        ("Qcur" | "Kcur" | "Vcur", Some("add"), Some(l)) => {
            if let Some(mm) = g(format!("{}-{l}.mul_mat", id.family)).filter(|t| t.data.len() == gold.data.len()) {
                let twice: Vec<f32> = gold.data.iter().zip(&mm.data).map(|(a, m)| 2.0 * a - m).collect();
                hyps.push(Hypothesis {
                    what: format!("the bias dropped (llama.cpp's {}-{l}.mul_mat)", id.family),
                    class: BugClass::QkvBias,
                    class_text: "Q/K/V bias (zeroed or not loaded)",
                    predicted: mm.data,
                });
                hyps.push(Hypothesis {
                    what: "the bias added twice".into(),
                    class: BugClass::QkvBias,
                    class_text: "Q/K/V bias (zeroed or not loaded)",
                    predicted: twice,
                });
            }
        }
        ("kq", _, Some(l)) if d.step == 0 => {
            if let (Some(q), Some(k)) = (g(format!("Qcur-{l}.rope")), g(format!("Kcur-{l}.rope"))) {
                if let Some(p) = kq_with_head_map(&q, &k, &gold, |h, _g, n_kv| h % n_kv) {
                    hyps.push(Hypothesis {
                        what: format!("KV head h % n_kv on llama.cpp's Qcur-{l}.rope and Kcur-{l}.rope"),
                        class: BugClass::GqaMapping,
                        class_text: "GQA head mapping",
                        predicted: p,
                    });
                }
            }
        }
        ("kq", _, Some(_)) => hyps.extend(kv_cache_hypotheses(&gold)),
        ("kq_soft_max", _, Some(l)) => {
            if let Some(kq) = g(format!("kq-{l}")).filter(|t| t.data.len() == gold.data.len()) {
                let head_dim =
                    g(format!("Qcur-{l}.rope")).and_then(|t| t.shape.last().copied()).or_else(|| g(format!("kqv-{l}")).and_then(|t| t.shape.last().copied()));
                if let Some(hd) = head_dim {
                    hyps.extend(softmax_hypotheses(&kq, hd));
                }
            }
        }
        ("norm", Some(stage), Some(l)) => {
            let input = if stage.ends_with(".1") {
                g(format!("ffn_inp-{l}"))
            } else if l == 0 {
                g("embd".into())
            } else {
                g(format!("l_out-{}", l - 1))
            };
            if let Some(x) = input {
                hyps.extend(eps_hypotheses(&x, &gold));
            }
        }
        // gemma3's post-FFN norm carries no layer (`norm.rms_norm.L`): its input is `ffn_out-L`.
        ("norm", Some(stage), None)
            if stage.strip_prefix("rms_norm.").and_then(|k| k.parse::<usize>().ok()).is_some_and(|k| g(format!("ffn_out-{k}")).is_some()) =>
        {
            let k = stage.strip_prefix("rms_norm.").and_then(|k| k.parse::<usize>().ok()).unwrap_or_default();
            if let Some(x) = g(format!("ffn_out-{k}")) {
                hyps.extend(eps_hypotheses(&x, &gold));
            }
        }
        ("norm", None, None) => {
            let last = golden.taps().iter().filter(|t| t.step == d.step && t.family == "l_out").filter_map(|t| t.layer).max();
            if let Some(x) = last.and_then(|ll| g(format!("l_out-{ll}"))) {
                hyps.extend(eps_hypotheses(&x, &gold));
            }
        }
        ("attn_norm" | "ffn_norm", _, Some(l)) => {
            let stage = if id.family == "attn_norm" { "rms_norm.0" } else { "rms_norm.1" };
            if let Some(n) = g(format!("norm-{l}.{stage}")).filter(|t| t.data.len() == gold.data.len()) {
                hyps.push(Hypothesis {
                    what: format!("the norm weight ignored (llama.cpp's norm-{l}.{stage})"),
                    class: BugClass::NormWeight,
                    class_text: "norm weight ignored or rescaled",
                    predicted: n.data,
                });
            }
        }
        ("result_norm", _, None) => {
            if let Some(n) = g("norm".into()).filter(|t| t.data.len() == gold.data.len()) {
                hyps.push(Hypothesis {
                    what: "the output norm's weight ignored (llama.cpp's norm)".into(),
                    class: BugClass::NormWeight,
                    class_text: "norm weight ignored or rescaled",
                    predicted: n.data,
                });
            }
        }
        ("ffn_swiglu" | "ffn_geglu", _, Some(l)) => {
            if let (Some(gate), Some(up)) = (g(format!("ffn_gate-{l}")), g(format!("ffn_up-{l}"))) {
                if gate.data.len() == gold.data.len() && up.data.len() == gold.data.len() {
                    hyps.extend(gated_activation_hypotheses(&id.family, l, &gate.data, &up.data));
                }
            }
        }
        ("ffn_inp", _, Some(l)) => {
            if let Some((_, p)) = attn_residual_dropped(golden, d.step, l).filter(|(_, p)| p.len() == gold.data.len()) {
                hyps.push(Hypothesis {
                    what: "the attention residual dropped (llama.cpp's ffn_inp minus its residual input)".into(),
                    class: BugClass::ResidualAttn,
                    class_text: "residual dropped (attention output not added back)",
                    predicted: p,
                });
            }
        }
        ("l_out", _, Some(l)) => {
            if let Some(o) = g(format!("ffn_out-{l}")).filter(|t| t.data.len() == gold.data.len()) {
                hyps.push(Hypothesis {
                    what: format!("the FFN residual dropped (llama.cpp's ffn_out-{l})"),
                    class: BugClass::ResidualFfn,
                    class_text: "residual dropped (FFN output not added back)",
                    predicted: o.data,
                });
            }
        }
        _ => {}
    }
    if hyps.is_empty() {
        return None;
    }
    let baseline = tensor_errors(&eng.data, &gold.data).rel_l2;
    let tried: Vec<(String, f64)> = hyps.iter().map(|h| (h.what.clone(), tensor_errors(&eng.data, &h.predicted).rel_l2)).collect();
    let (best, &(ref what, dist)) = tried.iter().enumerate().min_by(|a, b| a.1 .1.total_cmp(&b.1 .1))?;
    let mut confirmed = dist * CONFIRM_RATIO <= baseline;
    let (mut what, mut dist) = (what.clone(), dist);
    // A decode step's scores that differ in the newest position only: no value to predict (the kernel
    // left it unwritten or computed it from another row), but the pattern itself is the proof.
    if !confirmed && id.family == "kq" && d.step >= 1 {
        if let Some(rest) = newest_column_only(&eng, &gold) {
            confirmed = true;
            what = "only the newest position's score differs (the causal window excludes it, or it is never computed)".into();
            dist = rest;
            hyps.push(Hypothesis { what: what.clone(), class: BugClass::CausalMask, class_text: "causal window (the newest position)", predicted: Vec::new() });
        }
    }
    let best = hyps.iter().position(|h| h.what == what).unwrap_or(best);
    if confirmed {
        let h = &hyps[best];
        let why = format!("{}; {what} reproduces it to {dist:.1e}", loc.evidence.clone().unwrap_or_default());
        loc.likely_class = Some(h.class_text.into());
        loc.likely_class_id = Some(h.class);
        loc.evidence = Some(why);
    }
    Some(ClassProof { verdict: if confirmed { "confirmed" } else { "suspected" }.into(), hypothesis: what, rel_l2: dist, baseline, tried })
}

/// For scores `[1,H,T,kv]`: when every column but the last agrees with the golden (rel L2 ≤ 1e-4 over
/// them) and the last differs, that rel L2 of the rest.
fn newest_column_only(eng: &Tensor, gold: &Tensor) -> Option<f64> {
    let kv = *gold.shape.last()?;
    if kv < 2 || gold.shape.len() != 4 {
        return None;
    }
    let split = |x: &[f32]| -> (Vec<f32>, Vec<f32>) {
        let (mut rest, mut last) = (Vec::new(), Vec::new());
        for row in x.chunks_exact(kv) {
            rest.extend_from_slice(&row[..kv - 1]);
            last.push(row[kv - 1]);
        }
        (rest, last)
    };
    let ((er, el), (gr, gl)) = (split(&eng.data), split(&gold.data));
    let rest = tensor_errors(&er, &gr).rel_l2;
    let last = tensor_errors(&el, &gl).rel_l2;
    (rest <= 1e-4 && last > 1e-2).then_some(rest)
}

/// Per-pair rotation angles of llama.cpp's RoPE, read off its own input and output (`pre` `[1,1,T,H·D]`
/// or `[1,T,H,D]`, `post` `[1,T,H,D]`), averaged over heads: `angles[t][i]`.
fn observed_angles(pre: &[f32], post: &[f32], shape: &[usize], pairing: Pairing) -> Vec<Vec<f64>> {
    let (t_n, h_n, d) = (shape[1], shape[2], shape[3]);
    let pairs = pairing.pairs(d);
    (0..t_n)
        .map(|t| {
            pairs
                .iter()
                .map(|&(i, j)| {
                    let (mut cross, mut dot) = (0f64, 0f64);
                    for h in 0..h_n {
                        let o = (t * h_n + h) * d;
                        let (x0, y0, x1, y1) = (pre[o + i] as f64, pre[o + j] as f64, post[o + i] as f64, post[o + j] as f64);
                        cross += x0 * y1 - y0 * x1;
                        dot += x0 * x1 + y0 * y1;
                    }
                    cross.atan2(dot)
                })
                .collect()
        })
        .collect()
}

/// Rotates `x` (`[1,T,H,D]` layout) pair by pair with `angle(t, pair)`.
fn rotate(x: &[f32], shape: &[usize], pairing: Pairing, angle: impl Fn(usize, usize) -> f64) -> Vec<f32> {
    let (t_n, h_n, d) = (shape[1], shape[2], shape[3]);
    let mut out = x.to_vec();
    for t in 0..t_n {
        for h in 0..h_n {
            let o = (t * h_n + h) * d;
            for (pi, (i, j)) in pairing.pairs(d).into_iter().enumerate() {
                let (c, s) = (angle(t, pi).cos(), angle(t, pi).sin());
                let (a, b) = (x[o + i] as f64, x[o + j] as f64);
                out[o + i] = (a * c - b * s) as f32;
                out[o + j] = (a * s + b * c) as f32;
            }
        }
    }
    out
}

fn rope_hypotheses(pre: &Tensor, post: &Tensor, pairing: Option<Pairing>, pos0: usize) -> Vec<Hypothesis> {
    let shape = &post.shape;
    if shape.len() != 4 || !shape[3].is_multiple_of(2) {
        return Vec::new();
    }
    let d = shape[3];
    // The model's pairing: given, else the one under which llama.cpp's own output is a rotation.
    let truth = pairing.unwrap_or_else(|| {
        let err = |p: Pairing| {
            let a = observed_angles(&pre.data, &post.data, shape, p);
            tensor_errors(&rotate(&pre.data, shape, p, |t, i| a[t][i]), &post.data).rel_l2
        };
        if err(Pairing::Neox) <= err(Pairing::Adjacent) {
            Pairing::Neox
        } else {
            Pairing::Adjacent
        }
    });
    let other = if truth == Pairing::Neox { Pairing::Adjacent } else { Pairing::Neox };
    let angles = observed_angles(&pre.data, &post.data, shape, truth);
    // The model's base from the first pair's frequency: angle(p, 1) = p · base^(−2/d).
    let p_ref = (0..shape[1]).map(|t| pos0 + t).enumerate().find(|&(_, p)| p >= 1);
    let mut out = vec![
        Hypothesis {
            what: format!("{other:?}-pair RoPE (instead of {truth:?}) on llama.cpp's input"),
            class: BugClass::Rope,
            class_text: "RoPE pairing or base",
            predicted: rotate(&pre.data, shape, other, |t, i| angles[t][i]),
        },
        Hypothesis { what: "no RoPE (llama.cpp's input unrotated)".into(), class: BugClass::Rope, class_text: "RoPE", predicted: pre.data.clone() },
    ];
    if let Some((t_ref, p)) = p_ref {
        let freq1 = angles[t_ref][1].rem_euclid(2.0 * std::f64::consts::PI) / p as f64;
        let base = freq1.powf(-(d as f64) / 2.0);
        for wrong in [1e4, 1e6, 5e5, 1e5] {
            if (wrong / base - 1.0).abs() > 0.05 {
                let a = move |t: usize, i: usize| (pos0 + t) as f64 * wrong.powf(-2.0 * i as f64 / d as f64);
                out.push(Hypothesis {
                    what: format!("RoPE base {wrong:.0e} (the model's is {base:.2e})"),
                    class: BugClass::Rope,
                    class_text: "RoPE pairing or base",
                    predicted: rotate(&pre.data, shape, truth, a),
                });
            }
        }
        for shift in [1i64, -1] {
            let a = |t: usize, i: usize| ((pos0 + t) as i64 + shift) as f64 * base.powf(-2.0 * i as f64 / d as f64);
            out.push(Hypothesis {
                what: format!("positions off by {shift:+}"),
                class: BugClass::Rope,
                class_text: "RoPE",
                predicted: rotate(&pre.data, shape, truth, a),
            });
        }
    }
    out
}

/// kq `[1,H,T,T]` of a prefill from Q `[1,T,H,D]` and K `[1,T,Hkv,D]` with a given head map.
fn kq_with_head_map(q: &Tensor, k: &Tensor, kq: &Tensor, map: impl Fn(usize, usize, usize) -> usize) -> Option<Vec<f32>> {
    let ([_, t_n, h_n, d], [_, tk, hkv, dk]) = (<[usize; 4]>::try_from(q.shape.as_slice()).ok()?, <[usize; 4]>::try_from(k.shape.as_slice()).ok()?);
    if d != dk || tk != t_n || hkv == 0 || h_n % hkv != 0 || kq.shape != [1, h_n, t_n, tk] {
        return None;
    }
    let g = h_n / hkv;
    let mut out = vec![0f32; h_n * t_n * tk];
    for h in 0..h_n {
        let kh = map(h, g, hkv);
        for t in 0..t_n {
            for j in 0..tk {
                let s: f64 = (0..d).map(|x| q.data[(t * h_n + h) * d + x] as f64 * k.data[(j * hkv + kh) * d + x] as f64).sum();
                out[(h * t_n + t) * tk + j] = s as f32;
            }
        }
    }
    Some(out)
}

fn kv_cache_hypotheses(kq: &Tensor) -> Vec<Hypothesis> {
    let Ok([_, h_n, t_n, kv]) = <[usize; 4]>::try_from(kq.shape.as_slice()) else { return Vec::new() };
    let mut unwritten = kq.data.clone();
    let mut shifted = kq.data.clone();
    for r in 0..h_n * t_n {
        let row = &kq.data[r * kv..(r + 1) * kv];
        unwritten[r * kv + kv - 1] = 0.0;
        for j in 0..kv {
            shifted[r * kv + j] = if j == 0 { 0.0 } else { row[j - 1] };
        }
    }
    let class_text = "KV cache (never written, wrong layout or stride)";
    vec![
        Hypothesis { what: "the new position's K never written to the cache (its score 0)".into(), class: BugClass::KvCache, class_text, predicted: unwritten },
        Hypothesis { what: "the cache read one slot off (scores shifted by one position)".into(), class: BugClass::KvCache, class_text, predicted: shifted },
    ]
}

/// Masked softmax of `scale · kq` over rows `[1,H,T,kv]`; row r (position kv − T + r) sees positions
/// `≤ pos + window` (`None`: no mask).
fn masked_softmax(kq: &Tensor, scale: f64, window: Option<i64>) -> Vec<f32> {
    let [_, h_n, t_n, kv] = <[usize; 4]>::try_from(kq.shape.as_slice()).unwrap_or([0; 4]);
    let mut out = vec![0f32; kq.data.len()];
    for h in 0..h_n {
        for r in 0..t_n {
            let pos = (kv + r) as i64 - t_n as i64;
            let o = (h * t_n + r) * kv;
            let seen = |j: usize| window.is_none_or(|w| (j as i64) <= pos + w);
            let m = (0..kv).filter(|&j| seen(j)).map(|j| scale * kq.data[o + j] as f64).fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = (0..kv).filter(|&j| seen(j)).map(|j| (scale * kq.data[o + j] as f64 - m).exp()).sum();
            for j in 0..kv {
                out[o + j] = if seen(j) && z > 0.0 { ((scale * kq.data[o + j] as f64 - m).exp() / z) as f32 } else { 0.0 };
            }
        }
    }
    out
}

fn softmax_hypotheses(kq: &Tensor, head_dim: usize) -> Vec<Hypothesis> {
    if kq.shape.len() != 4 {
        return Vec::new();
    }
    let d = head_dim as f64;
    let right = 1.0 / d.sqrt();
    let scale_text = "softmax scale, mask or softmax";
    let mask_text = "causal mask missing";
    vec![
        Hypothesis {
            what: "scale 1/d instead of 1/√d on llama.cpp's kq".into(),
            class: BugClass::SoftmaxScale,
            class_text: scale_text,
            predicted: masked_softmax(kq, 1.0 / d, Some(0)),
        },
        Hypothesis {
            what: "no scale on llama.cpp's kq".into(),
            class: BugClass::SoftmaxScale,
            class_text: scale_text,
            predicted: masked_softmax(kq, 1.0, Some(0)),
        },
        Hypothesis {
            what: "no causal mask on llama.cpp's kq".into(),
            class: BugClass::CausalMask,
            class_text: mask_text,
            predicted: masked_softmax(kq, right, None),
        },
        Hypothesis {
            what: "causal window one position too wide (row i sees i+1)".into(),
            class: BugClass::CausalMask,
            class_text: mask_text,
            predicted: masked_softmax(kq, right, Some(1)),
        },
        Hypothesis {
            what: "causal window one position too narrow (row i misses i)".into(),
            class: BugClass::CausalMask,
            class_text: mask_text,
            predicted: masked_softmax(kq, right, Some(-1)),
        },
    ]
}

fn eps_hypotheses(x: &Tensor, norm: &Tensor) -> Vec<Hypothesis> {
    let w = *norm.shape.last().unwrap_or(&0);
    if w == 0 || x.data.len() < norm.data.len() || x.shape.last() != Some(&w) {
        return Vec::new();
    }
    // The last layer's FFN norm keeps only the last rows: align on the last rows of the input.
    let x = &x.data[x.data.len() - norm.data.len()..];
    [1e-5, 1e-6, 0.0]
        .into_iter()
        .map(|eps| {
            let mut p = vec![0f32; x.len()];
            for (row, out) in x.chunks_exact(w).zip(p.chunks_exact_mut(w)) {
                let ms = row.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / w as f64;
                let s = 1.0 / (ms + eps).sqrt();
                for (o, &v) in out.iter_mut().zip(row) {
                    *o = (v as f64 * s) as f32;
                }
            }
            Hypothesis {
                what: format!("RMSNorm eps {eps:.0e} on llama.cpp's input"),
                class: BugClass::RmsNorm,
                class_text: "RMSNorm (epsilon or formula)",
                predicted: p,
            }
        })
        .collect()
}

/// The gated FFN's activation swapped for another on llama.cpp's own gate and up (`act(gate) · up`):
/// `ffn_swiglu` (qwen2, llama: SiLU) tries GELU, tanh and erf forms; `ffn_geglu` (gemma3: GELU, tanh form)
/// tries SiLU and the erf form of GELU.
fn gated_activation_hypotheses(family: &str, layer: usize, gate: &[f32], up: &[f32]) -> Vec<Hypothesis> {
    let (model_act, others, class_text): (&str, Vec<(&str, fn(f64) -> f64)>, &'static str) = match family {
        "ffn_geglu" => ("GELU (tanh)", vec![("SiLU", silu), ("GELU (erf)", gelu_erf)], "activation wrong (e.g. SiLU instead of GELU)"),
        _ => ("SiLU", vec![("GELU (tanh)", gelu_tanh), ("GELU (erf)", gelu_erf)], "activation wrong (e.g. GELU instead of SiLU)"),
    };
    others
        .into_iter()
        .map(|(name, f)| Hypothesis {
            what: format!("{name} instead of {model_act} on llama.cpp's ffn_gate-{layer}"),
            class: BugClass::Activation,
            class_text,
            predicted: gate.iter().zip(up).map(|(&a, &b)| (f(a as f64) * b as f64) as f32).collect(),
        })
        .collect()
}

fn silu(x: f64) -> f64 {
    x / (1.0 + (-x).exp())
}

fn gelu_tanh(x: f64) -> f64 {
    0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x.powi(3))).tanh())
}

/// GELU with the exact error function (Abramowitz–Stegun 7.1.26 erf, |error| < 1.5e-7: enough to tell
/// GELU from SiLU by orders of magnitude; std has no erf).
fn gelu_erf(x: f64) -> f64 {
    let z = x / std::f64::consts::SQRT_2;
    let t = 1.0 / (1.0 + 0.3275911 * z.abs());
    let y = 1.0 - (((((1.061405429 * t - 1.453152027) * t) + 1.421413741) * t - 0.284496736) * t + 0.254829592) * t * (-z * z).exp();
    0.5 * x * (1.0 + y.copysign(z))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::localize::Divergence;

    fn t(shape: &[usize], data: Vec<f32>) -> Tensor {
        Tensor { shape: shape.to_vec(), data }
    }

    #[test]
    fn the_other_pairing_reproduces_an_adjacent_rope_bug() {
        // [1, T=4, H=2, D=8], NeoX at base 1e4: the engine rotates adjacent pairs with the same angles.
        let shape = [1, 4, 2, 8];
        let pre: Vec<f32> = (0..64).map(|i| ((i * 37 % 17) as f32 - 8.0) / 5.0).collect();
        let ang = |t: usize, i: usize| t as f64 * 1e4f64.powf(-2.0 * i as f64 / 8.0);
        let golden = rotate(&pre, &shape, Pairing::Neox, ang);
        let engine = rotate(&pre, &shape, Pairing::Adjacent, ang);
        let hyps = rope_hypotheses(&t(&shape, pre.clone()), &t(&shape, golden.clone()), Some(Pairing::Neox), 0);
        let best = hyps.iter().map(|h| (tensor_errors(&engine, &h.predicted).rel_l2, &h.what)).min_by(|a, b| a.0.total_cmp(&b.0)).unwrap();
        assert!(best.0 < 1e-5 && best.1.contains("Adjacent"), "{best:?}");
        // The right RoPE is not among the hypotheses that explain the engine.
        assert!(tensor_errors(&engine, &golden).rel_l2 > 0.1);
    }

    #[test]
    fn softmax_hypotheses_reproduce_scale_and_window_bugs() {
        let kq = t(&[1, 1, 3, 3], vec![1.0, 9.0, 9.0, 2.0, 0.5, 9.0, 0.3, 1.2, -0.7]);
        let right = masked_softmax(&kq, 0.5, Some(0));
        assert_eq!(right[1], 0.0, "future masked");
        let hyps = softmax_hypotheses(&kq, 4);
        let wide = masked_softmax(&kq, 0.5, Some(1));
        let best = hyps.iter().min_by(|a, b| tensor_errors(&wide, &a.predicted).rel_l2.total_cmp(&tensor_errors(&wide, &b.predicted).rel_l2)).unwrap();
        assert_eq!(best.class, BugClass::CausalMask);
        assert!(best.what.contains("too wide"));
    }

    /// A golden of one gated FFN (`ffn_gate-0`, `ffn_up-0` and `{family}-0` = act(gate) · up) and the
    /// class proof for an engine whose `{family}-0` is `engine_act(gate) · up`.
    fn prove_gate(family: &str, golden_act: fn(f64) -> f64, engine: impl Fn(f64, f64) -> f64) -> (Localization, Option<ClassProof>) {
        let n = 2 * 48;
        let gate: Vec<f32> = (0..n).map(|i| ((i * 37 % 29) as f32 - 14.0) / 5.0).collect();
        let up: Vec<f32> = (0..n).map(|i| ((i * 11 % 13) as f32 - 6.0) / 4.0 + 0.05).collect();
        let act = |f: &dyn Fn(f64, f64) -> f64| -> Vec<f32> { gate.iter().zip(&up).map(|(&g, &u)| f(g as f64, u as f64) as f32).collect() };
        let shape = vec![1, 1, 2, 48];
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("golden.safetensors");
        let tap = format!("s0/{family}-0");
        let f32s = vec![
            ("s0/ffn_gate-0".to_string(), shape.clone(), gate.clone()),
            ("s0/ffn_up-0".to_string(), shape.clone(), up.clone()),
            (tap.clone(), shape.clone(), act(&|g, u| golden_act(g) * u)),
        ];
        crate::golden::write_safetensors(&path, &f32s, &[]).unwrap();
        let golden = TapsFile::open(&path).unwrap();
        let mut eng = crate::checks::MemTaps::default();
        eng.0.insert(tap, Tensor { shape, data: act(&engine) });
        let mut loc = Localization {
            first_divergence: Some(Divergence { step: 0, layer: Some(0), tap: format!("{family}-0"), metric: "rel_l2".into(), value: 1.0, limit: 1e-5 }),
            likely_class_id: Some(BugClass::Activation),
            ..Default::default()
        };
        let proof = prove(&mut loc, &golden, &eng, None, None);
        (loc, proof)
    }

    #[test]
    fn silu_for_gelu_in_gemma3s_geglu_is_proven_an_activation_bug() {
        // gemma3: GELU (tanh form) gate; the engine uses SiLU.
        let (loc, p) = prove_gate("ffn_geglu", gelu_tanh, |g, u| silu(g) * u);
        let p = p.expect("hypotheses for ffn_geglu");
        assert!(p.confirmed() && p.hypothesis == "SiLU instead of GELU (tanh) on llama.cpp's ffn_gate-0", "{p:?}");
        assert!(p.rel_l2 < 1e-6 && p.baseline > 0.05, "{p:?}");
        assert_eq!(loc.likely_class_id, Some(BugClass::Activation));
        assert!(loc.evidence.unwrap().contains("SiLU instead of GELU (tanh)"));
        // The erf form of GELU is proven as such.
        let (_, p) = prove_gate("ffn_geglu", gelu_tanh, |g, u| gelu_erf(g) * u);
        let p = p.unwrap();
        assert!(p.confirmed() && p.hypothesis.starts_with("GELU (erf) instead of GELU (tanh)"), "{p:?}");
        // A right activation with a wrong up (scaled by 1.5) is no activation bug: suspected only.
        let (loc, p) = prove_gate("ffn_geglu", gelu_tanh, |g, u| gelu_tanh(g) * u * 1.5);
        let p = p.unwrap();
        assert!(!p.confirmed() && p.rel_l2 > 0.1, "{p:?}");
        assert!(loc.evidence.is_none(), "{loc:?}");
    }

    #[test]
    fn gelu_for_silu_in_swiglu_is_proven_an_activation_bug() {
        let (_, p) = prove_gate("ffn_swiglu", silu, |g, u| gelu_tanh(g) * u);
        let p = p.unwrap();
        assert!(p.confirmed() && p.hypothesis == "GELU (tanh) instead of SiLU on llama.cpp's ffn_gate-0", "{p:?}");
        // The hypotheses are the other activations only: the model's own is never among them.
        assert!(p.tried.iter().all(|(w, _)| !w.starts_with("SiLU")), "{:?}", p.tried);
    }

    #[test]
    fn gelu_is_not_silu() {
        assert!((gelu_erf(1.0) - 0.841344746).abs() < 1e-6);
        assert!((gelu_tanh(1.0) - 0.841191990).abs() < 1e-6);
    }
}
