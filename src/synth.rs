//! A synthetic golden in the real naming (golden/README.md), for tests that must not wait for
//! llama.cpp: 2 layers, a 3-token prompt, 2 decode steps, every tap family of qwen2, with valid
//! invariants (causal softmax rows, real RoPE rotations, unit-mean-square norms). Deterministic.

use crate::checks::invariants::{apply_rope, Pairing};
use crate::error::Result;
use crate::golden::write_safetensors;
use rand::{Rng, SeedableRng};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

pub const LAYERS: usize = 2;
pub const PROMPT: [i32; 3] = [11, 42, 7];
pub const DECODE_STEPS: usize = 2;
pub const HEADS: usize = 2;
pub const HEAD_DIM: usize = 4;
pub const WIDTH: usize = HEADS * HEAD_DIM;
pub const FFN: usize = 12;
pub const VOCAB: usize = 100;

type F32s = Vec<(String, Vec<usize>, Vec<f32>)>;

/// The taps of the synthetic golden, in graph order.
pub fn taps(seed: u64) -> F32s {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut rnd = |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect() };
    let mut out: F32s = Vec::new();
    let n_prompt = PROMPT.len();
    for step in 0..=DECODE_STEPS {
        let t = if step == 0 { n_prompt } else { 1 };
        let kv = if step == 0 { n_prompt } else { n_prompt + step };
        let pos0 = kv - t;
        let mut push = |key: String, shape: Vec<usize>, data: Vec<f32>| out.push((format!("s{step}/{key}"), shape, data));
        let act = |rows: usize, w: usize| vec![1, 1, rows, w];
        push("embd".into(), act(t, WIDTH), rnd(t * WIDTH));
        for l in 0..LAYERS {
            // The last layer keeps only the last token after attention.
            let r = if l == LAYERS - 1 { 1 } else { t };
            push(format!("norm-{l}.rms_norm.0"), act(t, WIDTH), unit_rows(rnd(t * WIDTH), WIDTH));
            push(format!("attn_norm-{l}"), act(t, WIDTH), rnd(t * WIDTH));
            for f in ["Qcur", "Kcur", "Vcur"] {
                push(format!("{f}-{l}.mul_mat"), act(t, WIDTH), rnd(t * WIDTH));
                let pre = rnd(t * WIDTH);
                push(format!("{f}-{l}.add"), act(t, WIDTH), pre.clone());
                if f != "Vcur" {
                    let mut post = pre;
                    apply_rope(&mut post, t, HEADS, HEAD_DIM, pos0, 1e6, Pairing::Neox);
                    push(format!("{f}-{l}.rope"), vec![1, t, HEADS, HEAD_DIM], post);
                }
            }
            let kq = rnd(HEADS * t * kv);
            push(format!("kq-{l}"), vec![1, HEADS, t, kv], kq.clone());
            push(format!("kq_soft_max-{l}"), vec![1, HEADS, t, kv], causal_softmax(&kq, HEADS, t, kv));
            push(format!("kqv-{l}"), vec![1, HEADS, t, HEAD_DIM], rnd(HEADS * t * HEAD_DIM));
            push(format!("kqv_out-{l}"), act(t, WIDTH), rnd(t * WIDTH));
            push(format!("ffn_inp-{l}"), act(r, WIDTH), rnd(r * WIDTH));
            push(format!("norm-{l}.rms_norm.1"), act(r, WIDTH), unit_rows(rnd(r * WIDTH), WIDTH));
            push(format!("ffn_norm-{l}"), act(r, WIDTH), rnd(r * WIDTH));
            push(format!("ffn_gate-{l}"), act(r, FFN), rnd(r * FFN));
            push(format!("ffn_up-{l}"), act(r, FFN), rnd(r * FFN));
            push(format!("ffn_swiglu-{l}"), act(r, FFN), rnd(r * FFN));
            push(format!("ffn_out-{l}"), act(r, WIDTH), rnd(r * WIDTH));
            push(format!("l_out-{l}"), act(r, WIDTH), rnd(r * WIDTH));
        }
        push("norm".into(), act(1, WIDTH), unit_rows(rnd(WIDTH), WIDTH));
        push("result_norm".into(), act(1, WIDTH), rnd(WIDTH));
        push("result_output".into(), act(1, VOCAB), rnd(VOCAB).iter().map(|v| v * 6.0).collect());
    }
    out
}

fn unit_rows(mut x: Vec<f32>, w: usize) -> Vec<f32> {
    for row in x.chunks_exact_mut(w) {
        let ms = row.iter().map(|v| v * v).sum::<f32>() / w as f32;
        row.iter_mut().for_each(|v| *v /= ms.sqrt());
    }
    x
}

fn causal_softmax(kq: &[f32], h: usize, t: usize, kv: usize) -> Vec<f32> {
    let mut out = vec![0.0; kq.len()];
    for hh in 0..h {
        for r in 0..t {
            let pos = kv - t + r;
            let row = &kq[(hh * t + r) * kv..(hh * t + r) * kv + pos + 1];
            let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let z: f32 = row.iter().map(|v| (v - m).exp()).sum();
            for (j, v) in row.iter().enumerate() {
                out[(hh * t + r) * kv + j] = (v - m).exp() / z;
            }
        }
    }
    out
}

/// Writes `dir/taps/synthetic/exact/fox.safetensors` and `dir/manifest.json`; returns the taps path.
/// The continuation is each step's argmax, as in the real goldens; steps past the tapped ones use
/// varied synthetic logits.
pub fn write_golden(dir: &Path) -> Result<PathBuf> {
    let taps = taps(1);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(2);
    let steps = 32;
    let mut all_logits: Vec<Vec<f32>> = Vec::new();
    for k in 0..steps {
        match taps.iter().find(|(key, _, _)| *key == format!("s{k}/result_output")) {
            Some((_, _, d)) => all_logits.push(d.clone()),
            None => all_logits.push((0..VOCAB).map(|_| rng.random::<f32>() * 6.0).collect()),
        }
    }
    let continuation: Vec<i32> = all_logits.iter().map(|l| crate::metrics::argmax(l) as i32).collect();
    let (mut ids, mut vals, mut lse) = (Vec::new(), Vec::new(), Vec::new());
    for l in &all_logits {
        let top = crate::metrics::top_k(l, 64);
        ids.extend(top.iter().map(|&i| i as i32));
        vals.extend(top.iter().map(|&i| l[i as usize]));
        lse.push(crate::metrics::logsumexp(l) as f32);
    }
    let mut f32s = taps.clone();
    f32s.push(("topk_values".into(), vec![steps, 64], vals));
    f32s.push(("lse".into(), vec![steps], lse));
    let i32s = vec![
        ("tokens".to_string(), vec![PROMPT.len()], PROMPT.to_vec()),
        ("continuation".to_string(), vec![steps], continuation.clone()),
        ("topk_ids".to_string(), vec![steps, 64], ids),
    ];
    let rel = "taps/synthetic/exact/fox.safetensors";
    let path = dir.join(rel);
    std::fs::create_dir_all(path.parent().unwrap()).map_err(|e| crate::error::Error::io(&path, e))?;
    write_safetensors(&path, &f32s, &i32s)?;
    let sha = hex::encode(Sha256::digest(std::fs::read(&path).map_err(|e| crate::error::Error::io(&path, e))?));
    let tensors: Vec<serde_json::Value> = taps.iter().map(|(k, s, _)| serde_json::json!({"key": k, "shape": s, "dtype": "F32"})).collect();
    let manifest = serde_json::json!({
        "schema": 1, "generator": "lockstep::synth", "provenance": {"llama_cpp_python": "synthetic"},
        "files": [{"path": rel, "kind": "taps", "model": "synthetic", "tier": "exact", "prompt_id": "fox", "chat": false,
                   "prompt": "The quick brown fox", "tokens": PROMPT, "continuation": continuation, "steps": DECODE_STEPS + 1,
                   "sha256": sha, "tensors": tensors, "full_layers": [0, 1], "kept": "every tap"}]
    });
    let mp = dir.join("manifest.json");
    std::fs::write(&mp, serde_json::to_string_pretty(&manifest).unwrap()).map_err(|e| crate::error::Error::io(&mp, e))?;
    Ok(path)
}

/// Copies a taps file with `edit` applied to the tensors (key, shape, data); other keys kept as is.
pub fn rewrite(src: &Path, dst: &Path, mut edit: impl FnMut(&str, &[usize], &mut Vec<f32>)) -> Result<()> {
    let t = crate::golden::TapsFile::open(src)?;
    let (mut f32s, mut i32s) = (Vec::new(), Vec::new());
    for k in t.keys() {
        match t.f32(&k) {
            Ok(mut x) => {
                edit(&k, &x.shape, &mut x.data);
                f32s.push((k, x.shape, x.data));
            }
            Err(_) => {
                let v = t.ints(&k)?;
                i32s.push((k.clone(), t.shape(&k).unwrap_or_default(), v.into_iter().map(|x| x as i32).collect()));
            }
        }
    }
    write_safetensors(dst, &f32s, &i32s)
}
