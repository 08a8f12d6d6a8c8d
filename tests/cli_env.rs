//! The CUDA settings read from the environment (LOCKSTEP_CUDA_MATH, LOCKSTEP_CUDA_INT8_DECODE):
//! `lockstep bench --backend cuda` refuses a value it does not know, naming the variable and the
//! accepted values, before it looks for a GPU, so these run on any machine. (`lockstep validate`
//! checks them per case: src/validate.rs `fast_math_for`.)

use std::process::Command;

/// `lockstep bench` on the committed tiny model with `var=value`: (exit status success, stderr).
fn bench_with(var: &str, value: &str) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_lockstep"))
        .args(["bench", "--model", "golden/models/tiny-qwen2.q.gguf", "--backend", "cuda", "-p", "4", "-n", "4", "-r", "1"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_remove("LOCKSTEP_CUDA_MATH")
        .env_remove("LOCKSTEP_CUDA_INT8_DECODE")
        .env(var, value)
        .output()
        .expect("run the lockstep binary");
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn bench_refuses_an_unknown_cuda_math() {
    let (ok, err) = bench_with("LOCKSTEP_CUDA_MATH", "bf16");
    assert!(!ok, "bench ran with LOCKSTEP_CUDA_MATH=bf16");
    assert!(err.contains("LOCKSTEP_CUDA_MATH=bf16") && err.contains("tf32") && err.contains("fast"), "{err}");
}

#[test]
fn bench_refuses_an_unknown_int8_decode() {
    let (ok, err) = bench_with("LOCKSTEP_CUDA_INT8_DECODE", "yes");
    assert!(!ok, "bench ran with LOCKSTEP_CUDA_INT8_DECODE=yes");
    assert!(err.contains("LOCKSTEP_CUDA_INT8_DECODE=yes") && err.contains("0 (") && err.contains("1 ("), "{err}");
}
