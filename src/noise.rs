//! The noise a tap's limit scales with (golden/README.md, "Tolerances").
//!
//! The manifest records llama.cpp's own noise per tap: its distance from an f64 evaluation of the same
//! graph. At some taps that distance is smaller than at the tap's inputs, because rounding errors
//! cancel there by chance (qwen's s2/kq-1: 3.3e-7 while its input Qcur-1.rope has 5.0e-7 and attn_norm-1
//! 1.1e-6). A correct engine's error there carries its inputs' error, so the noise a tap is judged
//! against is the largest of its own and its direct inputs' (one hop of llama.cpp's graph, same step):
//! never less than llama.cpp's own, and never more than what already reached the op.

use crate::golden::TapNoise;
use crate::tapname::TapId;
use std::collections::HashMap;

/// The taps feeding `id` in llama.cpp's graph (same step), by tap name inside the step. Taps a golden
/// does not hold are skipped by the caller.
pub fn direct_inputs(id: &TapId, n_layer_hint: Option<usize>) -> Vec<String> {
    let Some(l) = id.layer else {
        // Outside the layer stack: the final norm reads the last layer's output.
        return match id.family.as_str() {
            "norm" => n_layer_hint.map(|n| vec![format!("l_out-{}", n - 1)]).unwrap_or_default(),
            "result_norm" => vec!["norm".into()],
            "result_output" => vec!["result_norm".into()],
            _ => Vec::new(),
        };
    };
    let layer_input = if l == 0 { "embd".to_string() } else { format!("l_out-{}", l - 1) };
    let t = |name: &str| format!("{name}-{l}");
    let st = |name: &str, stage: &str| format!("{name}-{l}.{stage}");
    match (id.family.as_str(), id.stage.as_deref()) {
        ("norm", Some("rms_norm.0")) => vec![layer_input],
        ("norm", Some("rms_norm.1")) => vec![t("ffn_inp")],
        ("attn_norm", _) => vec![st("norm", "rms_norm.0")],
        ("ffn_norm", _) => vec![st("norm", "rms_norm.1")],
        ("Qcur" | "Kcur" | "Vcur", Some("mul_mat") | None) => vec![t("attn_norm")],
        ("Qcur" | "Kcur" | "Vcur", Some("add")) => vec![st(&id.family, "mul_mat")],
        ("Qcur" | "Kcur", Some("rope")) => vec![st(&id.family, "add"), st(&id.family, "mul_mat"), t(&id.family)],
        ("kq", _) => vec![st("Qcur", "rope"), st("Kcur", "rope")],
        ("kq_soft_max", _) => vec![t("kq")],
        ("kqv", _) => vec![t("kq_soft_max"), st("Vcur", "add"), st("Vcur", "mul_mat"), t("Vcur")],
        ("kqv_out", _) => vec![t("kqv")],
        ("attn_out", _) => vec![t("kqv_out")],
        ("ffn_inp", _) => vec![t("attn_out"), t("kqv_out"), layer_input],
        ("ffn_gate" | "ffn_up", _) => vec![t("ffn_norm")],
        ("ffn_swiglu", _) => vec![t("ffn_gate"), t("ffn_up")],
        ("ffn_out", _) => vec![t("ffn_swiglu")],
        ("l_out", _) => vec![t("ffn_out"), t("ffn_inp")],
        _ => Vec::new(),
    }
}

/// The model depth a set of tap keys implies: the deepest layer they name plus one, saturating (a
/// hand-made manifest may name any layer number, `l_out-18446744073709551615`); None when no key
/// names a layer.
pub fn depth_named<'a>(keys: impl Iterator<Item = &'a str>) -> Option<usize> {
    keys.filter_map(|k| TapId::parse_key(k)?.layer).max().map(|l| l.saturating_add(1))
}

/// Each tap's effective noise: the largest raw noise of the tap and its direct inputs. `n_layer`: the
/// model's layer count (else the deepest layer the noise records name).
pub fn effective(raw: &HashMap<String, TapNoise>, n_layer: Option<usize>) -> HashMap<String, TapNoise> {
    let n_layer = n_layer.or_else(|| depth_named(raw.keys().map(String::as_str)));
    raw.iter()
        .map(|(key, own)| {
            let Some(id) = TapId::parse_key(key) else { return (key.clone(), *own) };
            let eff = direct_inputs(&id, n_layer)
                .iter()
                .filter_map(|t| raw.get(&format!("s{}/{t}", id.step)))
                .fold(*own, |a, b| TapNoise { rel_l2: a.rel_l2.max(b.rel_l2), row_max: a.row_max.max(b.row_max) });
            (key.clone(), eff)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(v: f64) -> TapNoise {
        TapNoise { rel_l2: v, row_max: 2.0 * v }
    }

    #[test]
    fn a_tap_inherits_its_inputs_noise_one_hop_only() {
        let raw: HashMap<String, TapNoise> =
            [("s2/attn_norm-1", 1e-6), ("s2/Qcur-1.rope", 5e-7), ("s2/Kcur-1.rope", 7e-8), ("s2/kq-1", 3e-7), ("s2/kq_soft_max-1", 1e-7), ("s0/kq-1", 1e-9)]
                .into_iter()
                .map(|(k, v)| (k.to_string(), n(v)))
                .collect();
        let eff = effective(&raw, None);
        assert_eq!(eff["s2/kq-1"], n(5e-7), "kq takes the larger of Q's and K's");
        assert_eq!(eff["s2/kq_soft_max-1"], n(3e-7), "one hop: the softmax takes kq's own, not attn_norm's");
        assert_eq!(eff["s0/kq-1"], n(1e-9), "another step's inputs do not count");
        assert_eq!(eff["s2/attn_norm-1"], n(1e-6));
    }

    #[test]
    fn inputs_follow_the_graph() {
        let id = TapId::parse_key("s0/ffn_inp-3").unwrap();
        assert_eq!(direct_inputs(&id, Some(24)), vec!["attn_out-3", "kqv_out-3", "l_out-2"]);
        let id = TapId::parse_key("s1/norm").unwrap();
        assert_eq!(direct_inputs(&id, Some(24)), vec!["l_out-23"]);
        let id = TapId::parse_key("s0/norm-0.rms_norm.0").unwrap();
        assert_eq!(direct_inputs(&id, None), vec!["embd"]);
    }
}
