//! Check 6: layer-isolated mode. Each layer is fed the golden input of that layer (the golden `l_out` of
//! the layer before, through [`TapSink::replace`]) and its taps are compared with the golden, so a layer
//! that introduces error is told apart from one that inherits it.

use super::{CheckResult, Op, Tolerances};
use crate::golden::TapsFile;
use crate::metrics::tensor_errors;
use crate::tapname::TapId;
use lockstep_engine::backend::Backend;
use lockstep_engine::taps::{TapInfo, TapSink};
use serde::Serialize;
use std::collections::BTreeMap;

/// A sink that compares every tap with the golden as it arrives and hands back the golden `l_out-L`.
struct Isolating<'a> {
    golden: &'a TapsFile,
    tol: &'a Tolerances,
    step: usize,
    /// layer → (worst ratio of rel L2 to the tap's limit, that rel L2, tap key)
    per_layer: BTreeMap<usize, (f64, f64, String)>,
    error: Option<String>,
}

impl TapSink for Isolating<'_> {
    fn wants(&self, key: &str) -> bool {
        self.golden.contains(&format!("s{}/{key}", self.step))
    }
    fn tap(&mut self, info: TapInfo<'_>, data: &[f32]) {
        let key = format!("s{}/{}", self.step, info.key);
        let (Some(layer), Ok(g)) = (info.layer, self.golden.f32(&key)) else { return };
        if crate::metrics::check_shapes(&key, &info.shape, &g.shape).is_err() {
            self.error.get_or_insert(format!("{key}: shape {:?} vs golden {:?}", info.shape, g.shape));
            return;
        }
        let e = tensor_errors(data, &g.data).rel_l2;
        // A layer fed the golden input inherits no upstream error, so the chained run's calibrated limit
        // (llama.cpp's noise there includes the upstream layers') is an upper bound for it.
        let limit = TapId::parse_key(&key)
            .and_then(|id| super::taps::calibrated_limits(&id, self.golden, self.tol))
            .map_or_else(|| self.tol.get("isolated.rel_l2").value, |(whole, _, _)| whole);
        let ratio = e / limit;
        let slot = self.per_layer.entry(layer).or_insert((0.0, 0.0, key.clone()));
        if super::invariants::worse(ratio, slot.0) {
            *slot = (ratio, e, key);
        }
    }
    fn replace(&mut self, info: TapInfo<'_>) -> Option<Vec<f32>> {
        if !info.key.starts_with("l_out-") {
            return None;
        }
        let g = self.golden.f32(&format!("s{}/{}", self.step, info.key)).ok()?;
        (g.data.len() == info.shape.iter().product::<usize>()).then_some(g.data)
    }
}

/// One layer's error when fed the golden input.
#[derive(Debug, Clone, Serialize)]
pub struct LayerError {
    pub layer: usize,
    pub rel_l2: f64,
    /// rel L2 over that tap's limit (> 1: the layer introduces error).
    pub ratio: f64,
    pub worst_tap: String,
}

/// Runs the prefill and `steps` decode steps (fed the golden continuation) in isolated mode.
pub fn check(
    backend: &mut dyn Backend,
    golden: &TapsFile,
    prompt: &[u32],
    continuation: &[u32],
    steps: usize,
    tol: &Tolerances,
) -> anyhow::Result<(Vec<CheckResult>, Vec<LayerError>)> {
    backend.reset();
    let mut per_layer: BTreeMap<usize, (f64, f64, String)> = BTreeMap::new();
    let mut problems = Vec::new();
    let held = golden.steps();
    for step in 0..=steps.min(continuation.len()) {
        let input: Vec<u32> = if step == 0 { prompt.to_vec() } else { vec![continuation[step - 1]] };
        let mut sink = Isolating { golden, tol, step, per_layer: BTreeMap::new(), error: None };
        let sink_opt: Option<&mut dyn TapSink> = if held.contains(&step) { Some(&mut sink) } else { None };
        backend.forward(&input, sink_opt)?;
        problems.extend(sink.error);
        for (l, (r, e, k)) in sink.per_layer {
            let slot = per_layer.entry(l).or_insert((0.0, 0.0, k.clone()));
            if super::invariants::worse(r, slot.0) {
                *slot = (r, e, k);
            }
        }
    }
    backend.reset();
    let lim = tol.get("isolated.rel_l2");
    let layers: Vec<LayerError> = per_layer.into_iter().map(|(layer, (ratio, rel_l2, worst_tap))| LayerError { layer, rel_l2, ratio, worst_tap }).collect();
    let first_bad = layers.iter().find(|l| !(l.ratio <= 1.0));
    let worst = layers.iter().map(|l| l.ratio).fold(0.0, |a: f64, b| if super::invariants::worse(b, a) { b } else { a });
    let detail = match first_bad {
        Some(l) => format!("first layer over its limit fed golden input: {} ({} at {}, {:.1}× its limit)", l.layer, fmt(l.rel_l2), l.worst_tap, l.ratio),
        None => format!("{} layers, all within their limits", layers.len()),
    };
    let reason = format!("each tap's calibrated limit (taps.noise_k × llama.cpp's noise), else {}", lim.reason);
    let mut r = vec![CheckResult::new("isolated", "worst error / limit of a layer's taps fed the golden input", worst, Op::Le, 1.0)
        .with_detail(detail)
        .with_reason(Some(reason))];
    if !problems.is_empty() {
        r.push(CheckResult::new("isolated:shapes", "taps of the wrong shape", problems.len() as f64, Op::Le, 0.0).with_detail(problems.join("; ")));
    }
    Ok((r, layers))
}

fn fmt(v: f64) -> String {
    format!("{v:.2e}")
}

/// The layer a tap belongs to, for callers grouping results.
pub fn layer_of(key: &str) -> Option<usize> {
    TapId::parse_key(key).and_then(|t| t.layer)
}
