//! Tap keys (`s{step}/{tap}`, golden/README.md) parsed into (step, layer, family, stage), and the graph
//! order in which taps are compared.
//!
//! safetensors sorts its keys, so a file's order says nothing about the graph. The order comes from the
//! manifest's `tensors` list where there is one (written in graph order), else from [`canonical_rank`].

use crate::error::{Error, Result};
use std::cmp::Ordering;
use std::collections::HashMap;

/// One parsed tap key.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize)]
pub struct TapId {
    pub step: usize,
    /// `None` for taps outside the layer stack (`embd`, `norm`, `result_norm`, `result_output`).
    pub layer: Option<usize>,
    /// The name without `-L` and without the stage suffix: `Qcur`, `kq_soft_max`, `l_out`.
    pub family: String,
    /// The stage suffix: `rope`, `add`, `rms_norm.1`; `None` where the name is unique in its step.
    pub stage: Option<String>,
    /// The key inside the step, e.g. `Qcur-0.rope`.
    pub tap: String,
}

impl TapId {
    /// Parses `s{step}/{tap}`. Other keys of a taps file (`tokens`, `logits/0`, …) are not taps: `None`.
    pub fn parse_key(key: &str) -> Option<TapId> {
        let rest = key.strip_prefix('s')?;
        let (step, tap) = rest.split_once('/')?;
        let step: usize = step.parse().ok()?;
        Self::parse_tap(step, tap).ok()
    }

    /// Parses a tap name inside a step: `name[-layer][.stage]`.
    pub fn parse_tap(step: usize, tap: &str) -> Result<TapId> {
        let (head, stage) = match tap.split_once('.') {
            Some((h, s)) if !s.is_empty() => (h, Some(s.to_string())),
            Some(_) => return Err(Error::BadTapKey(tap.to_string())),
            None => (tap, None),
        };
        if head.is_empty() {
            return Err(Error::BadTapKey(tap.to_string()));
        }
        let (family, layer) = match head.rsplit_once('-') {
            Some((f, l)) if !f.is_empty() && !l.is_empty() && l.bytes().all(|b| b.is_ascii_digit()) => {
                (f.to_string(), Some(l.parse::<usize>().map_err(|_| Error::BadTapKey(tap.to_string()))?))
            }
            _ => (head.to_string(), None),
        };
        Ok(TapId { step, layer, family, stage, tap: tap.to_string() })
    }

    /// The full key `s{step}/{tap}`.
    pub fn key(&self) -> String {
        format!("s{}/{}", self.step, self.tap)
    }

    /// The family with its stage, the unit of tolerances and error-growth profiles: `Qcur.rope`, `kq`.
    pub fn family_stage(&self) -> String {
        match &self.stage {
            Some(s) => format!("{}.{}", self.family, s),
            None => self.family.clone(),
        }
    }
}

/// Taps before the layer stack rank before layer 0; taps after it (`norm`, `result_norm`,
/// `result_output`) after the last layer.
fn layer_group(t: &TapId) -> (i64, i64) {
    match t.layer {
        Some(l) => (1, l as i64),
        None if t.family == "embd" || t.family == "inp_embd" => (0, 0),
        None => (2, 0),
    }
}

/// Canonical within-layer graph order of llama.cpp's qwen2/llama graphs (llama.cpp `build_qwen2` /
/// `build_llama`): used for bare dumps without a manifest.
const CANONICAL: &[(&str, Option<&str>)] = &[
    ("embd", None),
    ("inp_embd", None),
    ("norm", Some("rms_norm.0")),
    ("attn_norm", None),
    ("Qcur", Some("mul_mat")),
    ("Qcur", Some("add")),
    ("Kcur", Some("mul_mat")),
    ("Kcur", Some("add")),
    ("Vcur", Some("mul_mat")),
    ("Vcur", Some("add")),
    ("Qcur", Some("rope")),
    ("Kcur", Some("rope")),
    ("Qcur", None),
    ("Kcur", None),
    ("Vcur", None),
    ("kq", None),
    ("kq_soft_max", None),
    ("kqv", None),
    ("kqv_out", None),
    ("attn_out", None),
    ("ffn_inp", None),
    ("norm", Some("rms_norm.1")),
    ("ffn_norm", None),
    ("ffn_gate", None),
    ("ffn_up", None),
    ("ffn_swiglu", None),
    ("ffn_out", None),
    ("l_out", None),
    ("norm", None),
    ("result_norm", None),
    ("result_output", None),
];

/// Rank of a tap inside its layer group under the canonical order; unknown names rank last.
pub fn canonical_rank(t: &TapId) -> usize {
    let stage = t.stage.as_deref();
    CANONICAL
        .iter()
        .position(|(f, s)| *f == t.family && *s == stage)
        .or_else(|| CANONICAL.iter().position(|(f, s)| *f == t.family && s.is_none()))
        .or_else(|| {
            // `Qcur.something_else`: after the family's known stages.
            CANONICAL.iter().rposition(|(f, _)| *f == t.family)
        })
        .unwrap_or(CANONICAL.len())
}

/// Graph order: step, then layer group, then within-layer rank (from the manifest if it knows the
/// tap, else canonical), then the name for a total order.
#[derive(Debug, Clone, Default)]
pub struct GraphOrder {
    /// `tap name without layer` (family + stage, e.g. `Qcur.rope`) → rank, from a manifest's tensor list.
    manifest_rank: HashMap<String, usize>,
}

impl GraphOrder {
    /// Builds the order from tap names listed in graph order (a manifest's `tensors`).
    pub fn from_listed<'a>(names: impl IntoIterator<Item = &'a str>) -> Self {
        let mut manifest_rank = HashMap::new();
        for name in names {
            let tap = name.split_once('/').map(|(_, t)| t).unwrap_or(name);
            if let Ok(id) = TapId::parse_tap(0, tap) {
                let n = manifest_rank.len();
                manifest_rank.entry(id.family_stage()).or_insert(n);
            }
        }
        GraphOrder { manifest_rank }
    }

    fn rank(&self, t: &TapId) -> (usize, usize) {
        match self.manifest_rank.get(&t.family_stage()) {
            Some(&r) => (0, r),
            None => (1, canonical_rank(t)),
        }
    }

    pub fn cmp(&self, a: &TapId, b: &TapId) -> Ordering {
        a.step.cmp(&b.step).then(layer_group(a).cmp(&layer_group(b))).then(self.rank(a).cmp(&self.rank(b))).then(a.tap.cmp(&b.tap))
    }

    pub fn sort(&self, taps: &mut [TapId]) {
        taps.sort_by(|a, b| self.cmp(a, b));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_keys() {
        let t = TapId::parse_key("s3/norm-12.rms_norm.1").unwrap();
        assert_eq!((t.step, t.layer, t.family.as_str(), t.stage.as_deref()), (3, Some(12), "norm", Some("rms_norm.1")));
        let t = TapId::parse_key("s0/kq_soft_max-0").unwrap();
        assert_eq!((t.layer, t.family.as_str(), t.stage), (Some(0), "kq_soft_max", None));
        let t = TapId::parse_key("s0/result_output").unwrap();
        assert_eq!((t.layer, t.family.as_str()), (None, "result_output"));
        assert!(TapId::parse_key("tokens").is_none());
        assert!(TapId::parse_key("logits/0").is_none());
        assert!(TapId::parse_tap(0, "Qcur-0.").is_err());
    }

    #[test]
    fn canonical_order_follows_the_graph() {
        let keys = [
            "s0/result_output",
            "s0/l_out-1",
            "s0/Qcur-0.rope",
            "s0/Qcur-0.add",
            "s0/Kcur-0.add",
            "s0/Qcur-0.mul_mat",
            "s0/embd",
            "s0/norm-0.rms_norm.1",
            "s0/norm-0.rms_norm.0",
            "s1/embd",
            "s0/kq-0",
        ];
        let mut taps: Vec<_> = keys.iter().map(|k| TapId::parse_key(k).unwrap()).collect();
        GraphOrder::default().sort(&mut taps);
        let got: Vec<_> = taps.iter().map(|t| t.key()).collect();
        assert_eq!(
            got,
            [
                "s0/embd",
                "s0/norm-0.rms_norm.0",
                "s0/Qcur-0.mul_mat",
                "s0/Qcur-0.add",
                "s0/Kcur-0.add",
                "s0/Qcur-0.rope",
                "s0/kq-0",
                "s0/norm-0.rms_norm.1",
                "s0/l_out-1",
                "s0/result_output",
                "s1/embd"
            ]
        );
    }

    #[test]
    fn manifest_order_wins() {
        let order = GraphOrder::from_listed(["s0/embd", "s0/ffn_up-0", "s0/ffn_gate-0"]);
        let mut taps: Vec<_> = ["s0/ffn_gate-0", "s0/ffn_up-0"].iter().map(|k| TapId::parse_key(k).unwrap()).collect();
        order.sort(&mut taps);
        assert_eq!(taps[0].tap, "ffn_up-0");
    }
}
