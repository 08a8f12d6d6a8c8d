//! The model's weights, dequantized once to f32 at load (in parallel over tensors).
//!
//! GGUF stores a projection as `ne = [in, out]` (ne0 contiguous), which read row-major is
//! `[out][in]`: exactly the [`Matrix`] layout, so no transposition happens here.

use anyhow::{bail, Context, Result};
use rayon::prelude::*;

use super::ops::Matrix;
use crate::config::ModelConfig;
use crate::gguf::GgufFile;

/// One transformer block.
#[derive(Debug, Clone)]
pub struct LayerWeights {
    /// `[D]`
    pub attn_norm: Vec<f32>,
    /// `[H·Dh][D]`
    pub wq: Matrix,
    /// `[Hkv·Dh][D]`
    pub wk: Matrix,
    /// `[Hkv·Dh][D]`
    pub wv: Matrix,
    /// `[H·Dh]`, `[Hkv·Dh]`, `[Hkv·Dh]` when the architecture has QKV biases (qwen2)
    pub bq: Option<Vec<f32>>,
    pub bk: Option<Vec<f32>>,
    pub bv: Option<Vec<f32>>,
    /// `[D][H·Dh]`
    pub wo: Matrix,
    /// `[D]`
    pub ffn_norm: Vec<f32>,
    /// `[F][D]`
    pub w_gate: Matrix,
    /// `[F][D]`
    pub w_up: Matrix,
    /// `[D][F]`
    pub w_down: Matrix,
}

/// All weights of the model.
#[derive(Debug, Clone)]
pub struct Weights {
    /// `[V][D]`
    pub token_embd: Matrix,
    /// `[D]`
    pub output_norm: Vec<f32>,
    /// `[V][D]`; `None` when tied to `token_embd`.
    pub output: Option<Matrix>,
    pub layers: Vec<LayerWeights>,
}

impl Weights {
    /// The output head: `output.weight`, or `token_embd.weight` when tied.
    pub fn lm_head(&self) -> &Matrix {
        self.output.as_ref().unwrap_or(&self.token_embd)
    }

    /// Dequantizes every tensor the graph uses, checking each shape against `cfg`.
    pub fn load(file: &GgufFile, cfg: &ModelConfig) -> Result<Weights> {
        let fname = file.display_name();
        // (name, expected ne) for every tensor, dequantized in parallel, then moved into place.
        let mut wanted: Vec<(String, Vec<usize>)> =
            vec![("token_embd.weight".into(), vec![cfg.n_embd, cfg.n_vocab]), ("output_norm.weight".into(), vec![cfg.n_embd])];
        if !cfg.tied_embeddings {
            wanted.push(("output.weight".into(), vec![cfg.n_embd, cfg.n_vocab]));
        }
        let (d, f, q, kv) = (cfg.n_embd, cfg.n_ff, cfg.q_dim(), cfg.kv_dim());
        for l in 0..cfg.n_layer {
            let b = |s: &str| format!("blk.{l}.{s}");
            wanted.push((b("attn_norm.weight"), vec![d]));
            wanted.push((b("attn_q.weight"), vec![d, q]));
            wanted.push((b("attn_k.weight"), vec![d, kv]));
            wanted.push((b("attn_v.weight"), vec![d, kv]));
            if cfg.qkv_bias {
                wanted.push((b("attn_q.bias"), vec![q]));
                wanted.push((b("attn_k.bias"), vec![kv]));
                wanted.push((b("attn_v.bias"), vec![kv]));
            }
            wanted.push((b("attn_output.weight"), vec![q, d]));
            wanted.push((b("ffn_norm.weight"), vec![d]));
            wanted.push((b("ffn_gate.weight"), vec![d, f]));
            wanted.push((b("ffn_up.weight"), vec![d, f]));
            wanted.push((b("ffn_down.weight"), vec![f, d]));
        }
        let loaded: Vec<(String, Vec<usize>, Vec<f32>)> = wanted
            .into_par_iter()
            .map(|(name, ne)| {
                let info = file.tensor(&name).with_context(|| format!("{fname}: missing tensor {name}"))?;
                let got: Vec<usize> = info.ne.iter().map(|&v| v as usize).collect();
                if got != ne {
                    bail!("{fname}: tensor {name} has ne {got:?}, the metadata implies {ne:?}");
                }
                let data = crate::dequant::dequantize_tensor(file, info).with_context(|| format!("{fname}: dequantizing {name}"))?;
                if data.len() != ne.iter().product::<usize>() {
                    bail!("{fname}: {name} dequantized to {} values, expected {:?}", data.len(), ne);
                }
                Ok((name, ne, data))
            })
            .collect::<Result<_>>()?;
        let mut map: Loaded = loaded.into_iter().map(|(n, ne, d)| (n, (ne, d))).collect();
        let token_embd = to_matrix(map_take(&mut map, "token_embd.weight"));
        let output = if cfg.tied_embeddings { None } else { Some(to_matrix(map_take(&mut map, "output.weight"))) };
        let mut layers = Vec::with_capacity(cfg.n_layer);
        for l in 0..cfg.n_layer {
            let b = |s: &str| format!("blk.{l}.{s}");
            let bias = |map: &mut Loaded, s: &str| cfg.qkv_bias.then(|| map_take(map, &b(s)).1);
            let bq = bias(&mut map, "attn_q.bias");
            let bk = bias(&mut map, "attn_k.bias");
            let bv = bias(&mut map, "attn_v.bias");
            layers.push(LayerWeights {
                attn_norm: map_take(&mut map, &b("attn_norm.weight")).1,
                wq: to_matrix(map_take(&mut map, &b("attn_q.weight"))),
                wk: to_matrix(map_take(&mut map, &b("attn_k.weight"))),
                wv: to_matrix(map_take(&mut map, &b("attn_v.weight"))),
                bq,
                bk,
                bv,
                wo: to_matrix(map_take(&mut map, &b("attn_output.weight"))),
                ffn_norm: map_take(&mut map, &b("ffn_norm.weight")).1,
                w_gate: to_matrix(map_take(&mut map, &b("ffn_gate.weight"))),
                w_up: to_matrix(map_take(&mut map, &b("ffn_up.weight"))),
                w_down: to_matrix(map_take(&mut map, &b("ffn_down.weight"))),
            });
        }
        let output_norm = map_take(&mut map, "output_norm.weight").1;
        Ok(Weights { token_embd, output_norm, output, layers })
    }
}

type Loaded = std::collections::HashMap<String, (Vec<usize>, Vec<f32>)>;

fn map_take(map: &mut Loaded, name: &str) -> (Vec<usize>, Vec<f32>) {
    // Every name taken here was in `wanted`, and `load` returned early had any failed.
    map.remove(name).unwrap_or_else(|| panic!("internal: tensor {name} was not loaded"))
}

/// `ne = [cols, rows]` → `[rows][cols]`
fn to_matrix((ne, data): (Vec<usize>, Vec<f32>)) -> Matrix {
    Matrix { rows: ne[1], cols: ne[0], data }
}
