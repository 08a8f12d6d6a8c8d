//! Shared by the kernel test binaries (included with `mod`): the skip-or-fail policy of the CUDA ones,
//! and the comparisons with the CPU twins, which kernels_simt.rs (the kernels on the CPU) uses too.
#![allow(dead_code)]

use libtest_mimic::Trial;

/// Why CUDA trials cannot run here, or None when they can. With LOCKSTEP_REQUIRE_CUDA=1 (set by
/// ci/gpu-tests) a missing GPU is a failure, not a skip.
pub fn skip_reason() -> Option<String> {
    lockstep_engine::cuda::available().err()
}

/// Wraps CUDA trials: ignored with the reason when CUDA is unavailable (unless required).
pub fn trials(list: Vec<Trial>) -> Vec<Trial> {
    let require = std::env::var("LOCKSTEP_REQUIRE_CUDA").is_ok_and(|v| v == "1");
    match skip_reason() {
        None => list,
        Some(reason) if require => vec![Trial::test("cuda_required", move || Err(format!("LOCKSTEP_REQUIRE_CUDA=1 but {reason}").into()))],
        Some(reason) => {
            eprintln!("CUDA trials ignored: {reason}");
            list.into_iter().map(|t| t.with_ignored_flag(true)).collect()
        }
    }
}

/// ‖a − b‖ / ‖b‖ (0 when both are zero).
pub fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let mut num = 0.0f64;
    let mut den = 0.0f64;
    for (x, y) in a.iter().zip(b) {
        num += (*x as f64 - *y as f64).powi(2);
        den += (*y as f64).powi(2);
    }
    if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    }
}

/// A fused gate/up/SwiGLU kernel's three outputs (`[gate, up, s]`) against the twins' gate and up
/// products and `cpu::swiglu` of them, each to 1e-5.
pub fn check_gate_up_swiglu(what: &str, got: [&[f32]; 3], gate: &[f32], up: &[f32]) -> Result<(), String> {
    check_close(&format!("{what} gate"), got[0], gate, 1e-5)?;
    check_close(&format!("{what} up"), got[1], up, 1e-5)?;
    check_close(&format!("{what} swiglu"), got[2], &lockstep_engine::cpu::ops::swiglu(gate, up), 1e-5)
}

/// Fails with the first mismatching pairs, the worst difference and the relative L2 error.
pub fn check_close(what: &str, got: &[f32], want: &[f32], tol: f64) -> Result<(), String> {
    if got.len() != want.len() {
        return Err(format!("{what}: {} values, expected {}", got.len(), want.len()));
    }
    if let Some(i) = got.iter().zip(want).position(|(g, w)| g.is_nan() != w.is_nan()) {
        return Err(format!("{what}: NaN mismatch at {i}: got {} want {}", got[i], want[i]));
    }
    let r = rel_l2(got, want);
    if r.is_nan() || r > tol {
        let mut worst = (0usize, 0f32);
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            let d = (g - w).abs();
            if d > worst.1 {
                worst = (i, d);
            }
        }
        let firsts: Vec<String> = got
            .iter()
            .zip(want)
            .enumerate()
            .filter(|(_, (g, w))| (*g - *w).abs() > 1e-6 * w.abs().max(1.0))
            .take(4)
            .map(|(i, (g, w))| format!("[{i}] {g} vs {w}"))
            .collect();
        return Err(format!("{what}: rel L2 {r:.3e} > {tol:.0e}; worst |d| {} at {}; first: {}", worst.1, worst.0, firsts.join(", ")));
    }
    Ok(())
}

/// [`check_close`] for outputs that may overflow (softmax without max subtraction): non-finite at the
/// same places as `want`, the finite rest close.
pub fn check_close_nonfinite(what: &str, got: &[f32], want: &[f32], tol: f64) -> Result<(), String> {
    let bad: Vec<bool> = want.iter().map(|v| !v.is_finite()).collect();
    if got.iter().map(|v| !v.is_finite()).ne(bad.iter().copied()) {
        return Err(format!("{what}: non-finite values at other places than the CPU twin's"));
    }
    let finite = |x: &[f32]| -> Vec<f32> { x.iter().zip(&bad).filter(|(_, b)| !**b).map(|(v, _)| *v).collect() };
    check_close(what, &finite(got), &finite(want), tol)
}

/// Bit for bit: values equal (±0 alike, NaN where NaN); on a difference, the first index, both values
/// and how many differ.
pub fn bit_equal(what: &str, got: &[f32], want: &[f32]) -> Result<(), String> {
    if got.len() != want.len() {
        return Err(format!("{what}: {} values, expected {}", got.len(), want.len()));
    }
    match got.iter().zip(want).position(|(g, w)| g != w && !(g.is_nan() && w.is_nan())) {
        None => Ok(()),
        Some(i) => {
            Err(format!("{what}: element {i} = {:e}, CPU {:e} ({} values differ)", got[i], want[i], got.iter().zip(want).filter(|(g, w)| g != w).count()))
        }
    }
}
