//! The f32 KV cache and causal grouped-query attention, laid out as llama.cpp's non-flash path
//! computes it: `kq = K·Q` (unscaled), `kq_soft_max = softmax(kq·scale + causal mask)`,
//! `kqv = V·kq_soft_max`, then the heads concatenated (`kqv_out`).

use rayon::prelude::*;

use super::ops::{softmax_row_into, Matrix};

/// Keys and values of every layer for the positions seen so far.
#[derive(Debug, Clone)]
pub struct KvCache {
    /// per layer `[pos][Hkv·Dh]`
    pub k: Vec<Vec<f32>>,
    /// per layer `[pos][Hkv·Dh]`
    pub v: Vec<Vec<f32>>,
    /// Hkv·Dh
    pub row: usize,
    /// Positions held (the same for every layer once a forward pass has finished).
    pub len: usize,
}

impl KvCache {
    pub fn new(n_layer: usize, kv_dim: usize) -> Self {
        Self { k: vec![Vec::new(); n_layer], v: vec![Vec::new(); n_layer], row: kv_dim, len: 0 }
    }
    pub fn clear(&mut self) {
        for l in 0..self.k.len() {
            self.k[l].clear();
            self.v[l].clear();
        }
        self.len = 0;
    }
}

/// KV-cache write: appends the rows of `k` and `v` (`[T][Hkv·Dh]`, K already rotated) for `layer`.
pub fn kv_write(cache: &mut KvCache, layer: usize, k: &[f32], v: &[f32]) {
    cache.k[layer].extend_from_slice(k);
    cache.v[layer].extend_from_slice(v);
}

/// KV-cache read: the keys and values of `layer` for positions `0..kv_len`, each `[kv_len][Hkv·Dh]`.
pub fn kv_read(cache: &KvCache, layer: usize, kv_len: usize) -> (&[f32], &[f32]) {
    let n = kv_len * cache.row;
    (&cache.k[layer][..n], &cache.v[layer][..n])
}

/// Shapes of one attention call.
#[derive(Debug, Clone, Copy)]
pub struct AttnDims {
    /// T: query rows in this batch
    pub n_tokens: usize,
    /// positions in the cache before this batch
    pub n_past: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
}

impl AttnDims {
    pub fn kv_len(&self) -> usize {
        self.n_past + self.n_tokens
    }
}

/// `kq[h][t][j] = Σ_d K[j][h/g][d] · Q[t][h][d]` with g = H/Hkv (ggml_mul_mat broadcasting the
/// KV head over its group of query heads). q: `[T][H][Dh]`, k: `[kv_len][Hkv][Dh]`.
/// Returns `[H][T][kv_len]`, unscaled and unmasked (every cached position, like llama.cpp's kq).
/// Each score is one [`super::ops::dot`] (ggml_vec_dot_f32's order), computed by [`super::matmul::dots`].
pub fn attn_scores(q: &[f32], k: &[f32], d: &AttnDims) -> Vec<f32> {
    scores(q, k, d, false)
}

/// [`attn_scores`] for the causal positions only: row t holds `kq[h][t][j]` for `j ≤ n_past + t`,
/// bit for bit the same, and 0 at the masked positions, which the causal softmax never reads.
pub fn attn_scores_causal(q: &[f32], k: &[f32], d: &AttnDims) -> Vec<f32> {
    scores(q, k, d, true)
}

/// The scores of [`attn_scores`]; with `causal`, row t only up to position n_past + t (0 after).
fn scores(q: &[f32], k: &[f32], d: &AttnDims, causal: bool) -> Vec<f32> {
    let (t_n, kv, hd) = (d.n_tokens, d.kv_len(), d.head_dim);
    let group = d.n_head / d.n_head_kv;
    let mut kq = vec![0.0f32; d.n_head * t_n * kv];
    kq.par_chunks_mut(t_n * kv).enumerate().for_each(|(h, out)| {
        let hk = h / group;
        for (t, orow) in out.chunks_exact_mut(kv).enumerate() {
            let qv = &q[(t * d.n_head + h) * hd..(t * d.n_head + h + 1) * hd];
            let n = if causal { d.n_past + t + 1 } else { kv };
            super::matmul::dots(qv, k, d.n_head_kv * hd, hk * hd, &mut orow[..n]);
        }
    });
    kq
}

/// Causal softmax of `[H][T][kv_len]` scores: row t (position n_past + t) sees positions
/// `0..=n_past + t`; later positions get probability 0.
pub fn attn_softmax(kq: &[f32], scale: f32, d: &AttnDims) -> Vec<f32> {
    let kv = d.kv_len();
    let mut out = vec![0.0f32; kq.len()];
    out.par_chunks_mut(kv).zip(kq.par_chunks(kv)).enumerate().for_each(|(row, (o, s))| {
        let t = row % d.n_tokens;
        softmax_row_into(s, scale, d.n_past + t + 1, o);
    });
    out
}

/// `out[t][h][e] = Σ_j P[h][t][j] · V[j][h/g][e]`: the weighted values, written straight into the
/// `kqv_out` layout `[T][H·Dh]`. p: `[H][T][kv_len]`, v: `[kv_len][Hkv][Dh]`.
/// Like llama.cpp's non-flash path (V cached transposed, `ggml_mul_mat(v, kq)`), each output is one
/// dot product over positions; both operands are zero-padded to a multiple of 32 positions, as the
/// padded cache view is, so the dot products sum in ggml's order ([`super::ops::gemm_order`]): per query head,
/// a matmul of `V[h/g]ᵀ` (`[Dh][kv_pad]`) with its padded probabilities (`[T][kv_pad]`).
pub fn attn_values(p: &[f32], v: &[f32], d: &AttnDims) -> Vec<f32> {
    let (t_n, kv, hd, nh, nkv) = (d.n_tokens, d.kv_len(), d.head_dim, d.n_head, d.n_head_kv);
    let group = nh / nkv;
    let kv_pad = kv.div_ceil(32) * 32;
    // vt[hk]: [Dh][kv_pad]
    let vt: Vec<Matrix> = (0..nkv)
        .map(|hk| {
            let mut data = vec![0.0f32; hd * kv_pad];
            for j in 0..kv {
                for e in 0..hd {
                    data[e * kv_pad + j] = v[(j * nkv + hk) * hd + e];
                }
            }
            Matrix { rows: hd, cols: kv_pad, data }
        })
        .collect();
    // ggml_mul_mat(v [kv][Dh], kq [kv][T]): m = Dh, k = the padded cache view, n = T
    let heads: Vec<Vec<f32>> = (0..nh)
        .into_par_iter()
        .map(|h| {
            // ph: [T][kv_pad]
            let mut ph = vec![0.0f32; t_n * kv_pad];
            for (t, row) in ph.chunks_exact_mut(kv_pad).enumerate() {
                row[..kv].copy_from_slice(&p[(h * t_n + t) * kv..(h * t_n + t + 1) * kv]);
            }
            super::matmul::matmul_f32_serial(&vt[h / group], &ph) // [T][Dh]
        })
        .collect();
    let mut out = vec![0.0f32; t_n * nh * hd];
    for (h, y) in heads.iter().enumerate() {
        for t in 0..t_n {
            out[(t * nh + h) * hd..(t * nh + h + 1) * hd].copy_from_slice(&y[t * hd..(t + 1) * hd]);
        }
    }
    out
}

/// `[T][H][Dh]` → `[H][T][Dh]` (the `kqv` tap's layout, before llama.cpp's permute + cont).
pub fn heads_first(x: &[f32], t_n: usize, nh: usize, hd: usize) -> Vec<f32> {
    let mut y = vec![0.0f32; x.len()];
    for t in 0..t_n {
        for h in 0..nh {
            y[(h * t_n + t) * hd..(h * t_n + t + 1) * hd].copy_from_slice(&x[(t * nh + h) * hd..(t * nh + h + 1) * hd]);
        }
    }
    y
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gqa_maps_query_heads_to_kv_head_by_division() {
        // H=4, Hkv=2, Dh=1, one token, one position: head h must see kv head h/2.
        let d = AttnDims { n_tokens: 1, n_past: 0, n_head: 4, n_head_kv: 2, head_dim: 1 };
        let q = vec![1.0, 1.0, 1.0, 1.0];
        let k = vec![10.0, 20.0];
        assert_eq!(attn_scores(&q, &k, &d), vec![10.0, 10.0, 20.0, 20.0]);
        let p = vec![1.0; 4];
        let v = vec![3.0, 7.0];
        assert_eq!(attn_values(&p, &v, &d), vec![3.0, 3.0, 7.0, 7.0]);
    }

    #[test]
    fn causal_scores_equal_the_full_ones_where_unmasked() {
        // H=4, Hkv=2, Dh=64, a batch of 5 after 3 cached positions
        let d = AttnDims { n_tokens: 5, n_past: 3, n_head: 4, n_head_kv: 2, head_dim: 64 };
        let val = |i: usize| ((i * 37 % 101) as f32 - 50.0) / 13.0;
        let q: Vec<f32> = (0..5 * 4 * 64).map(val).collect();
        let k: Vec<f32> = (0..8 * 2 * 64).map(|i| val(i + 7)).collect();
        let (full, causal) = (attn_scores(&q, &k, &d), attn_scores_causal(&q, &k, &d));
        for (r, (fr, cr)) in full.chunks(8).zip(causal.chunks(8)).enumerate() {
            let n = d.n_past + r % 5 + 1;
            assert_eq!(fr[..n].iter().map(|v| v.to_bits()).collect::<Vec<_>>(), cr[..n].iter().map(|v| v.to_bits()).collect::<Vec<_>>(), "row {r}");
            assert_eq!(attn_softmax(&full, 0.125, &d)[r * 8..(r + 1) * 8], attn_softmax(&causal, 0.125, &d)[r * 8..(r + 1) * 8]);
        }
    }

    #[test]
    fn softmax_is_causal() {
        // H=1, T=2, n_past=1 → kv_len=3; row 0 sees 2 positions, row 1 sees 3.
        let d = AttnDims { n_tokens: 2, n_past: 1, n_head: 1, n_head_kv: 1, head_dim: 1 };
        let p = attn_softmax(&[0.0; 6], 1.0, &d);
        assert_eq!(p[..3], [0.5, 0.5, 0.0]);
        assert!(p[3..].iter().all(|&x| (x - 1.0 / 3.0).abs() < 1e-7));
    }

    #[test]
    fn cache_reads_what_was_written() {
        let mut c = KvCache::new(2, 2);
        kv_write(&mut c, 1, &[1.0, 2.0, 3.0, 4.0], &[5.0, 6.0, 7.0, 8.0]);
        let (k, v) = kv_read(&c, 1, 2);
        assert_eq!(k, [1.0, 2.0, 3.0, 4.0]);
        assert_eq!(v, [5.0, 6.0, 7.0, 8.0]);
        assert_eq!(heads_first(&[1., 2., 3., 4., 5., 6.], 3, 2, 1), vec![1., 3., 5., 2., 4., 6.]);
    }
}
