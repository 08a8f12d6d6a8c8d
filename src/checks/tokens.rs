//! Check 1: the engine's prompt token ids equal the golden ids.

use super::{CheckResult, Op};

pub fn check(engine: &[u32], golden: &[u32]) -> CheckResult {
    let first = engine.iter().zip(golden).position(|(a, b)| a != b).or((engine.len() != golden.len()).then(|| engine.len().min(golden.len())));
    match first {
        None => CheckResult::new("tokens", "prompt ids equal (count)", engine.len() as f64, Op::Eq, golden.len() as f64),
        Some(i) => CheckResult::new("tokens", "index of first differing prompt id", i as f64, Op::Ge, golden.len() as f64).with_detail(format!(
            "engine {} ids {:?}…, golden {} ids {:?}… from index {i}",
            engine.len(),
            &engine[i.min(engine.len())..(i + 8).min(engine.len())],
            golden.len(),
            &golden[i.min(golden.len())..(i + 8).min(golden.len())]
        )),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn tokens() {
        assert!(super::check(&[1, 2, 3], &[1, 2, 3]).passed);
        let r = super::check(&[1, 9, 3], &[1, 2, 3]);
        assert!(!r.passed && r.value == 1.0);
        assert!(!super::check(&[1, 2], &[1, 2, 3]).passed);
    }
}
