//! Check 5: KV-cache consistency. Prefill of N tokens versus prefill of N−1 then one decode step: the
//! last position's taps (and the logits) must agree within the limit (1e-5 rel L2 by default).

use super::{CheckResult, Op, Tolerances};
use crate::metrics::tensor_errors;
use lockstep_engine::backend::Backend;
use lockstep_engine::taps::{Recorder, Tapped};

/// The slice of a prefill tap that the decode step's tap corresponds to: where the shapes differ in
/// exactly one axis (prefill N, decode 1), the last index along it; equal shapes compare whole.
pub fn last_position(prefill: &Tapped, decode: &Tapped) -> Option<Vec<f32>> {
    if prefill.shape == decode.shape {
        return Some(prefill.data.clone());
    }
    let diff: Vec<usize> = (0..4).filter(|&a| prefill.shape[a] != decode.shape[a]).collect();
    let &[axis] = diff.as_slice() else { return None };
    if decode.shape[axis] != 1 {
        return None;
    }
    let n = prefill.shape[axis];
    let inner: usize = prefill.shape[axis + 1..].iter().product();
    let outer: usize = prefill.shape[..axis].iter().product();
    let mut out = Vec::with_capacity(outer * inner);
    for o in 0..outer {
        let start = (o * n + n - 1) * inner;
        out.extend_from_slice(&prefill.data[start..start + inner]);
    }
    Some(out)
}

/// `golden`: when it records llama.cpp's noise, each tap's last row is held to that tap's calibrated
/// row limit (two correct paths of one engine, the prefill's kernels and the decode step's, may differ by
/// as much as two correct engines: qwen's layer-0 softmax moves by ~1e-5 between them); else to
/// `kv_cache.rel_l2`. The verdict is the worst ratio of error to limit.
pub fn check(backend: &mut dyn Backend, prompt: &[u32], tol: &Tolerances, golden: Option<&crate::golden::TapsFile>) -> anyhow::Result<Vec<CheckResult>> {
    let l = tol.get("kv_cache.rel_l2");
    let limit_of = |key: &str| -> f64 {
        golden
            .and_then(|g| crate::tapname::TapId::parse_key(&format!("s0/{key}")).and_then(|id| super::taps::calibrated_limits(&id, g, tol)))
            .map_or(l.value, |(_, row, _)| row.max(l.value))
    };
    if prompt.len() < 2 {
        return Ok(vec![CheckResult::new("kv_cache", "prompt length", prompt.len() as f64, Op::Ge, 2.0).with_detail("needs a prompt of ≥ 2 tokens")]);
    }
    let n = prompt.len();
    // Both passes in the backend's exact arithmetic: the fast one (CUDA's TF32 prefill and int8
    // decode on the shipped tier) would differ between prefill and decode step by its rounding, not
    // by what the cache holds.
    let fast = backend.set_fast_math(false)?;
    let passes = (|| -> anyhow::Result<_> {
        backend.reset();
        let mut full = Recorder::new();
        let logits_a = backend.forward(prompt, Some(&mut full))?;
        backend.reset();
        backend.forward(&prompt[..n - 1], None)?;
        let mut inc = Recorder::new();
        let logits_b = backend.forward(&prompt[n - 1..], Some(&mut inc))?;
        backend.reset();
        Ok((full, logits_a, inc, logits_b))
    })();
    backend.set_fast_math(fast)?;
    let (full, logits_a, inc, logits_b) = passes?;

    let e0 = tensor_errors(&logits_b, &logits_a).rel_l2;
    let (mut worst, mut at, mut compared, mut unmatched) = (e0 / limit_of("result_output"), format!("logits ({e0:.1e})"), 0, Vec::new());
    for t in &inc.tensors {
        let Some(p) = full.get(&t.key) else { continue };
        match last_position(p, t) {
            Some(slice) if slice.len() == t.data.len() => {
                compared += 1;
                let e = tensor_errors(&t.data, &slice).rel_l2;
                let lim = limit_of(&t.key);
                if super::invariants::worse(e / lim, worst) {
                    worst = e / lim;
                    at = format!("{} ({e:.1e} of {lim:.1e})", t.key);
                }
            }
            _ => unmatched.push(format!("{} {:?} vs {:?}", t.key, p.shape, t.shape)),
        }
    }
    let reason = format!("each tap's calibrated row limit where the golden records llama.cpp's noise, at least {}", l.reason);
    let mut r = vec![CheckResult::new("kv_cache", "worst error / limit, last position: prefill N vs N−1 + decode", worst, Op::Le, 1.0)
        .with_detail(format!("worst at {at}; {compared} taps compared"))
        .with_reason(Some(reason))];
    if !unmatched.is_empty() {
        r.push(
            CheckResult::new("kv_cache:shapes", "taps whose decode shape does not match the prefill's last position", unmatched.len() as f64, Op::Le, 0.0)
                .with_detail(unmatched.into_iter().take(3).collect::<Vec<_>>().join("; ")),
        );
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_the_last_position() {
        let p = Tapped { key: "kq-0".into(), layer: Some(0), shape: [1, 2, 3, 3], data: (0..18).map(|v| v as f32).collect() };
        let d = Tapped { key: "kq-0".into(), layer: Some(0), shape: [1, 2, 1, 3], data: vec![0.0; 6] };
        assert_eq!(last_position(&p, &d).unwrap(), vec![6., 7., 8., 15., 16., 17.]);
    }
}
