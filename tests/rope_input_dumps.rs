//! RoPE's input in a dump judged by `lockstep compare`: llama.cpp's gemma3 graph rotates `Qcur_normed-L`
//! (each head RMS-normed with its weight), not `Qcur-L.mul_mat`. A dump without the head norm gets the
//! RoPE invariants reported as not run, with the reason, in the coverage (never passed, never a false
//! failure from pairing the rotation with the projection); a dump with it runs and passes them.

use lockstep::checks::invariants::{apply_rope, Pairing};
use lockstep::golden::{write_safetensors, Manifest};
use sha2::{Digest, Sha256};
use std::path::Path;

const TOKENS: usize = 3;
const HEADS: usize = 2;
const HEAD_DIM: usize = 8;

type F32s = Vec<(String, Vec<usize>, Vec<f32>)>;

/// A one-layer gemma3-like prefill: Q's projection `[1, 1, T, H·D]`, its head norm and the rotation of
/// that norm `[1, T, H, D]` (NeoX pairs, base 1e4), and the logits (a dump needs each step's).
fn taps() -> F32s {
    let proj: Vec<f32> = (0..TOKENS * HEADS * HEAD_DIM).map(|i| ((i * 29 % 13) as f32 - 6.0) * 0.7).collect();
    let normed: Vec<f32> = proj
        .chunks_exact(HEAD_DIM)
        .flat_map(|head| {
            let s = (head.iter().map(|v| v * v).sum::<f32>() / HEAD_DIM as f32 + 1e-6).sqrt();
            head.iter().enumerate().map(move |(i, v)| v / s * (1.0 + 0.1 * i as f32)).collect::<Vec<_>>()
        })
        .collect();
    let mut rotated = normed.clone();
    apply_rope(&mut rotated, TOKENS, HEADS, HEAD_DIM, 0, 1e4, Pairing::Neox);
    let per_head = vec![1, TOKENS, HEADS, HEAD_DIM];
    vec![
        ("s0/Qcur-0.mul_mat".into(), vec![1, 1, TOKENS, HEADS * HEAD_DIM], proj),
        ("s0/Qcur_normed-0".into(), per_head.clone(), normed),
        ("s0/Qcur-0.rope".into(), per_head, rotated),
        ("s0/result_output".into(), vec![1, 1, 1, 16], (0..16).map(|i| (i * 7 % 5) as f32 - 0.3 * i as f32).collect()),
    ]
}

/// `dir/manifest.json` with one gemma3 taps record (`arch` as on-demand entries carry it).
fn write_golden(dir: &Path) {
    let rel = "taps.safetensors";
    let path = dir.join(rel);
    let tokens = vec![2, 818, 5279];
    write_safetensors(&path, &taps(), &[("tokens".into(), vec![TOKENS], tokens.clone())]).unwrap();
    let sha = hex::encode(Sha256::digest(std::fs::read(&path).unwrap()));
    let tensors: Vec<serde_json::Value> = taps().iter().map(|(k, s, _)| serde_json::json!({"key": k, "shape": s, "dtype": "F32"})).collect();
    let manifest = serde_json::json!({
        "schema": 1, "generator": "tests/rope_input_dumps.rs",
        "files": [{"path": rel, "kind": "taps", "model": "gemma3-mini", "arch": "gemma3", "tier": "exact", "prompt_id": "p",
                   "tokens": tokens, "steps": 1, "sha256": sha, "tensors": tensors, "n_layer": 1}]
    });
    std::fs::write(dir.join("manifest.json"), manifest.to_string()).unwrap();
}

/// Judges a dump of the golden's taps minus `drop` and returns the case.
fn judge(dir: &Path, drop: &[&str]) -> lockstep::report::CaseReport {
    let dump = dir.join("dump.safetensors");
    let kept: F32s = taps().into_iter().filter(|(k, _, _)| !drop.contains(&k.as_str())).collect();
    write_safetensors(&dump, &kept, &[]).unwrap();
    let manifest = Manifest::load(dir).unwrap();
    lockstep::compare::compare_dump(&manifest, &dump, "gemma3-mini/exact/p", None).unwrap()
}

#[test]
fn a_dump_without_the_head_norm_leaves_the_rope_invariants_not_run() {
    let dir = tempfile::tempdir().unwrap();
    write_golden(dir.path());

    let case = judge(dir.path(), &["s0/Qcur_normed-0"]);
    let rope: Vec<_> = case.checks.iter().filter(|c| c.name.starts_with("invariants:rope")).collect();
    assert!(rope.is_empty(), "no RoPE verdict without RoPE's input: {rope:?}");
    assert!(case.passed, "what was compared agrees: {:?}", case.checks);
    let cov = case.coverage.as_ref().unwrap();
    assert_eq!(cov.not_checked, ["tokens", "diversity", "invariants:rope_pair_norm", "invariants:rope_relative"].map(String::from), "{cov:?}");
    let note = cov.notes.iter().find(|n| n.starts_with("not run: ")).unwrap_or_else(|| panic!("{:?}", cov.notes));
    assert!(note.contains("RoPE's input (Qcur_normed, the tap llama.cpp's graph rotates) is not in the dump for 1 rope tap (e.g. s0/Qcur_normed-0)"), "{note}");
    assert!(cov.summary().contains("invariants:rope_pair_norm, invariants:rope_relative not checked"), "{}", cov.summary());

    // With the head norm dumped, both run and pass; nothing is left unchecked but tokens and diversity.
    let case = judge(dir.path(), &[]);
    let rope: Vec<_> = case.checks.iter().filter(|c| c.name.starts_with("invariants:rope")).map(|c| (c.name.as_str(), c.passed)).collect();
    assert_eq!(rope, [("invariants:rope_pair_norm", true), ("invariants:rope_relative", true)], "{:?}", case.checks);
    assert_eq!(case.coverage.as_ref().unwrap().not_checked, ["tokens", "diversity"].map(String::from));
    assert!(case.passed);

    // A rotation of the wrong pairs of the head norm is still caught.
    let dump = dir.path().join("bad.safetensors");
    let mut bad = taps();
    let normed = bad[1].2.clone();
    let mut wrong = normed;
    apply_rope(&mut wrong, TOKENS, HEADS, HEAD_DIM, 0, 1e4, Pairing::Adjacent);
    bad[2].2 = wrong;
    write_safetensors(&dump, &bad, &[]).unwrap();
    let case = lockstep::compare::compare_dump(&Manifest::load(dir.path()).unwrap(), &dump, "gemma3-mini/exact/p", None).unwrap();
    assert!(case.checks.iter().any(|c| c.name == "invariants:rope_pair_norm" && !c.passed), "{:?}", case.checks);
}
