// Causal grouped-query attention, llama.cpp's non-flash path: one block per (head, tile of ATT_ROWS
// query rows). CPU twins: engine/src/cpu/attention.rs (attn_scores, attn_softmax, attn_values).
//
// q: `[T][H][Dh]`; kc, vc: `[ctx][Hkv][Dh]` (this layer); kq, p: `[H][T][kv_len]`;
// out: `[T][H·Dh]` (kqv_out). kv_len = pos[0] + T; row t sees positions 0 ..= pos[0] + t.
// kq holds the unscaled scores; with full_scores = 0 the masked entries of kq are left unwritten
// (nobody reads them: they exist only for the `kq` tap). Query head h reads KV head h / (H / Hkv).
// The rows of a tile share every K and V row the block reads (the reason for tiles: one block per
// row read each K row once per row, 271 us a layer for qwen's pp512 on the H200); each row's
// arithmetic is the one-row kernel's, in the same order.
// blockDim.x: a multiple of 32, ≥ Dh. Dynamic shared memory: ATT_ROWS·Dh floats (ATT_ROWS: from
// Rust, cuda::ops::ATTN_ROWS).
// fault: 0, or injected bug classes (engine/src/faults.rs), uniform per launch, bits named in Rust
// (cuda::ops::AttnFault, passed to NVRTC): ATTN_NO_CAUSAL_MASK (every row sees all kv_len positions),
// ATTN_SOFTMAX_NO_MAX (softmax without max subtraction), ATTN_GQA_MODULO (kv head h % Hkv).
// window: 0, or the attention-window fault: row t sees only its last `window` visible positions
// (earlier ones get probability 0, as if they had left the cache); kq keeps every score.
extern "C" __global__ void attention_f32(const float* __restrict__ q, const float* __restrict__ kc,
                                         const float* __restrict__ vc, float* __restrict__ kq,
                                         float* __restrict__ p, float* __restrict__ out,
                                         const int* __restrict__ pos, int T, int H, int Hkv, int Dh,
                                         float scale, int full_scores, int fault, int window) {
    extern __shared__ float qs[];  // [ATT_ROWS][Dh]: the tile's q rows, later the value sums
    int h = blockIdx.x, t0 = blockIdx.y * ATT_ROWS;
    int rows = min(ATT_ROWS, T - t0);
    int n_past = pos[0];
    int kv_len = n_past + T;
    int hk = (fault & ATTN_GQA_MODULO) ? h % Hkv : h / (H / Hkv);
    int kvd = Hkv * Dh;
    // per row: visible positions lo .. valid − 1, scores written for 0 .. n_scores − 1
    int valid[ATT_ROWS], lo[ATT_ROWS], n_scores[ATT_ROWS];
    int max_scores = 0, max_valid = 0;
#pragma unroll
    for (int r = 0; r < ATT_ROWS; r++) {
        int t = t0 + r;
        valid[r] = r < rows ? ((fault & ATTN_NO_CAUSAL_MASK) ? kv_len : n_past + t + 1) : 0;
        lo[r] = window > 0 && valid[r] > window ? valid[r] - window : 0;
        n_scores[r] = r < rows ? (full_scores ? kv_len : valid[r]) : 0;
        max_scores = max(max_scores, n_scores[r]);
        max_valid = max(max_valid, valid[r]);
    }
    for (int i = threadIdx.x; i < rows * Dh; i += blockDim.x) {
        int r = i / Dh, d = i % Dh;
        qs[i] = q[((long long)(t0 + r) * H + h) * Dh + d];
    }
    __syncthreads();
    long long row0 = ((long long)h * T + t0) * kv_len;  // row r of the tile at row0 + r·kv_len
    // scores: one thread per key position, its K row read once for every row of the tile (float4
    // chunks when aligned); each row's sum in the one-row kernel's order
    bool vec4 = (Dh & 3) == 0;
    for (int j = threadIdx.x; j < max_scores; j += blockDim.x) {
        const float* kr = kc + (long long)j * kvd + hk * Dh;
        float s[ATT_ROWS];
#pragma unroll
        for (int r = 0; r < ATT_ROWS; r++) s[r] = 0.0f;
        if (vec4) {
            const float4* k4 = (const float4*)kr;
            for (int d4 = 0; d4 < (Dh >> 2); d4++) {
                float4 kv = k4[d4];
#pragma unroll
                for (int r = 0; r < ATT_ROWS; r++) {
                    const float* qr = qs + r * Dh + 4 * d4;
                    s[r] += kv.x * qr[0] + kv.y * qr[1] + kv.z * qr[2] + kv.w * qr[3];
                }
            }
        } else {
            for (int d = 0; d < Dh; d++) {
                float kd = kr[d];
#pragma unroll
                for (int r = 0; r < ATT_ROWS; r++) s[r] += kd * qs[r * Dh + d];
            }
        }
#pragma unroll
        for (int r = 0; r < ATT_ROWS; r++)
            if (j < n_scores[r]) kq[row0 + (long long)r * kv_len + j] = s[r];
    }
    __syncthreads();
    // softmax of each row over its visible positions, the rows in parallel, one warp a row (no block
    // barrier per row: eight rows one after the other, two block reductions each, were the tile's
    // longest phase): max subtracted, the sum in f64 (lanes' partial sums, then a shuffle tree)
    {
        int lane = threadIdx.x & 31, nw = blockDim.x >> 5;
        for (int r = threadIdx.x >> 5; r < rows; r += nw) {
            // valid[r] and lo[r] recomputed: a runtime index would move those arrays to local memory
            int vr = (fault & ATTN_NO_CAUSAL_MASK) ? kv_len : n_past + t0 + r + 1;
            int lr = window > 0 && vr > window ? vr - window : 0;
            const float* kqr = kq + row0 + (long long)r * kv_len;
            float* pr = p + row0 + (long long)r * kv_len;
            float m = -INFINITY;
            for (int j = lr + lane; j < vr; j += 32) m = fmaxf(m, kqr[j] * scale);
            m = warp_max(m);
            if (fault & ATTN_SOFTMAX_NO_MAX) m = 0.0f;
            double sum = 0.0;
            for (int j = lr + lane; j < vr; j += 32) {
                float e = expf(kqr[j] * scale - m);
                pr[j] = e;
                sum += (double)e;
            }
            sum = warp_sum_d(sum);
            __syncwarp();  // each lane rescales entries other lanes wrote
            float inv = (float)(1.0 / sum);
            for (int j = lane; j < kv_len; j += 32) pr[j] = j >= lr && j < vr ? pr[j] * inv : 0.0f;
        }
    }
    __syncthreads();
    // values: G groups of Dh threads, group g sums positions j ≡ g (mod G) of each row (its V element
    // read once for the tile), then the groups are added in order
    int G = blockDim.x / Dh;
    int g = threadIdx.x / Dh, e = threadIdx.x % Dh;
    float acc[ATT_ROWS];
#pragma unroll
    for (int r = 0; r < ATT_ROWS; r++) acc[r] = 0.0f;
    if (g < G) {
        const float* pt = p + row0;
        // unrolled so that several positions' V and p loads are in flight at once (each acc[r]
        // still sums its positions in order)
#pragma unroll 4
        for (int j = g; j < max_valid; j += G) {
            float v = vc[(long long)j * kvd + hk * Dh + e];
#pragma unroll
            for (int r = 0; r < ATT_ROWS; r++)
                if (j >= lo[r] && j < valid[r]) acc[r] += pt[(long long)r * kv_len + j] * v;
        }
    }
    // the q staging area holds the sums: group by group, in order
    __syncthreads();
    for (int gg = 0; gg < G; gg++) {
        if (g == gg)
            for (int r = 0; r < rows; r++) qs[r * Dh + e] = (gg == 0) ? acc[r] : qs[r * Dh + e] + acc[r];
        __syncthreads();
    }
    for (int i = threadIdx.x; i < rows * Dh; i += blockDim.x) {
        int r = i / Dh, d = i % Dh;
        out[(long long)(t0 + r) * H * Dh + h * Dh + d] = qs[i];
    }
}

// ---------------------------------------------------------------------------------------------
// Decode step (T = 1): rope_store_f32 (kernels/ops.cu) and attention_f32 for one query row fused
// into one launch of one block per query head h. CPU twins: cpu::ops::rope on q and k, then
// attn_scores, attn_softmax and attn_values (engine/src/cpu/attention.rs); with `fault`, their
// crate::faults variants.
//
// q: `[H][Dh]` and k, v: `[Hkv][Dh]` as projected (q and k not rotated yet); kc, vc: this layer's
// `[ctx][Hkv·Dh]`; out: `[H·Dh]`; p_scratch: `[H][ctx]`, used only when kv_len > smem_cap.
// p = pos[0] (read on the device, so a captured graph replays at the current position), kv_len = p + 1.
//
// Each block rotates its own q head and the k head hk it reads (same angles as rope_store_f32),
// and uses its rotated k and the input v for position p: it never reads cache row p, which one
// block per kv head writes (the first query head of the group; with ATTN_GQA_MODULO, head h < Hkv),
// so blocks do not race. Rows < p come from the cache.
//
// Latency-bound at decode sizes (a few hundred positions, 14 blocks), so: 4 barriers; scores and
// probabilities in shared memory; K/V rows read by groups of L lanes, each lane ≤ DEC_CHUNKS
// chunks of float4 (float2 when Dh % 4 != 0); the first pass's K and V rows loaded before the
// rotation, later ones DEC_BATCH passes at a time; warp shuffles to reduce. Softmax as
// attention_f32's: max subtracted, the sum in f64, p_j = e_j · (f32)(1 / sum).
// blockDim.x: a multiple of 32, ≥ Dh, ≤ 256. Dh even, ≤ 256 (≤ 128 chunks: L ≤ 32 lanes a row).
// Dynamic shared memory (floats): q [Dh], k [Dh], per-warp value sums [blockDim/32][Dh], scores
// [smem_cap]. fault bits and window as attention_f32's (ATTN_NO_CAUSAL_MASK changes nothing for a
// single row that sees every position); with a window, positions < lo = p + 1 − window keep their
// score (the kq tap) but get probability 0.
#define DEC_CHUNKS 4
#define DEC_BATCH 4
// Cache rows past the first pass asked of L2 before pdl_wait (attention_decode): a K and a V row a row
// position; more stay with the loads of the passes.
#define DEC_AHEAD 512

__device__ __forceinline__ float dec_dot(float4 a, float4 b) { return a.x * b.x + a.y * b.y + a.z * b.z + a.w * b.w; }
__device__ __forceinline__ float dec_dot(float2 a, float2 b) { return a.x * b.x + a.y * b.y; }
__device__ __forceinline__ void dec_axpy(float4& acc, float p, float4 v) {
    acc.x += p * v.x;
    acc.y += p * v.y;
    acc.z += p * v.z;
    acc.w += p * v.w;
}
__device__ __forceinline__ void dec_axpy(float2& acc, float p, float2 v) {
    acc.x += p * v.x;
    acc.y += p * v.y;
}
__device__ __forceinline__ float4 dec_shfl_xor(float4 v, int o) {
    return make_float4(__shfl_xor_sync(0xffffffffu, v.x, o), __shfl_xor_sync(0xffffffffu, v.y, o),
                       __shfl_xor_sync(0xffffffffu, v.z, o), __shfl_xor_sync(0xffffffffu, v.w, o));
}
__device__ __forceinline__ float2 dec_shfl_xor(float2 v, int o) {
    return make_float2(__shfl_xor_sync(0xffffffffu, v.x, o), __shfl_xor_sync(0xffffffffu, v.y, o));
}
__device__ __forceinline__ float4 dec_add(float4 a, float4 b) { return make_float4(a.x + b.x, a.y + b.y, a.z + b.z, a.w + b.w); }
__device__ __forceinline__ float2 dec_add(float2 a, float2 b) { return make_float2(a.x + b.x, a.y + b.y); }
__device__ __forceinline__ float4 dec_scale(float4 a, float c) { return make_float4(a.x * c, a.y * c, a.z * c, a.w * c); }
__device__ __forceinline__ float2 dec_scale(float2 a, float c) { return make_float2(a.x * c, a.y * c); }
// A key row's dot with q over this lane's chunks (0 when the row is not `live`).
template <typename VT>
__device__ __forceinline__ float dec_row_dot(const VT k[DEC_CHUNKS], const VT q[DEC_CHUNKS], bool live) {
    float s = 0.0f;
    if (live) {
#pragma unroll
        for (int i = 0; i < DEC_CHUNKS; i++) s += dec_dot(k[i], q[i]);
    }
    return s;
}

// Which rows and chunks a lane reads: groups of L lanes a key row, L the fewest (a power of two)
// that leave each lane ≤ DEC_CHUNKS chunks (lane lig takes chunks lig, lig + L, …); one pass
// covers rows_per_pass rows, row_off being this lane's group's (a warp's rows are contiguous).
struct DecLayout {
    int nch, L, lig, rows_per_pass, row_off;
};
__device__ __forceinline__ DecLayout dec_layout(int Dh, int floats_per_chunk) {
    DecLayout l;
    l.nch = Dh / floats_per_chunk;
    l.L = 1;
    while (l.L * DEC_CHUNKS < l.nch) l.L <<= 1;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    l.lig = lane & (l.L - 1);
    l.rows_per_pass = (blockDim.x >> 5) * (32 / l.L);
    l.row_off = warp * (32 / l.L) + lane / l.L;
    return l;
}

// This lane's chunks of a row (zero past the row's end).
template <typename VT>
__device__ __forceinline__ void dec_load(VT r[DEC_CHUNKS], const float* row, const DecLayout& l) {
#pragma unroll
    for (int i = 0; i < DEC_CHUNKS; i++) {
        int c = l.lig + l.L * i;
        r[i] = c < l.nch ? ((const VT*)row)[c] : VT{};
    }
}

// The first pass's row j: its k from the registers loaded before pdl_wait (j < p), else row p's
// from shared memory (j > p: a row past the position, whose score is not used).
template <typename VT>
__device__ __forceinline__ float dec_first_dot(const DecLayout& l, const VT kpre[DEC_CHUNKS], const float* ks,
                                               const VT q[DEC_CHUNKS], int j, int p) {
    VT kr[DEC_CHUNKS];
    if (j >= p) dec_load(kr, ks, l);
    float s = 0.0f;
#pragma unroll
    for (int i = 0; i < DEC_CHUNKS; i++) s += dec_dot(j < p ? kpre[i] : kr[i], q[i]);
    return s;
}

// Row j's score from this lane's share s: summed over the group, scaled, stored once, max kept
// over the visible rows lo ..= p. Every lane of the warp calls it (the shuffles); j > p (past
// kv_len) changes nothing. kq_row (may be null): the tap of the unscaled score q·k_j (`kq`).
__device__ __forceinline__ void dec_score(float s, int j, int lo, int p, float scale, float* sc, const DecLayout& l,
                                          float& m, float* __restrict__ kq_row) {
    for (int o = l.L >> 1; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    float w = s * scale;
    if (j <= p) {
        if (l.lig == 0) {
            sc[j] = w;
            if (kq_row) kq_row[j] = s;
        }
        if (j >= lo) m = fmaxf(m, w);
    }
}

// Scores, softmax and values once q and k are rotated in shared memory; kpre / vpre hold this
// lane's first-pass K and V rows. sc: the scores' home, shared memory or the block's p_scratch
// row (the kernel inlines this twice, so that each call keeps its pointer's address space).
template <typename VT>
__device__ __forceinline__ void dec_attend(const DecLayout& l, const VT kpre[DEC_CHUNKS], const VT vpre[DEC_CHUNKS],
                                           float* smem, float* sc, float* shf, double* shd,
                                           const float* __restrict__ kbase, const float* __restrict__ vbase,
                                           const float* __restrict__ vp, float* __restrict__ out, int p, int kvd,
                                           int Dh, float scale, int fault, int window, float* __restrict__ kq_row,
                                           float* __restrict__ p_row) {
    int kv_len = p + 1, rpp = l.rows_per_pass;
    int lo = window > 0 && kv_len > window ? kv_len - window : 0;  // first visible position
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    const float* ks = smem + Dh;
    float* red = smem + 2 * Dh;
    VT qr[DEC_CHUNKS];
    dec_load(qr, smem, l);

    // scores w_j = (q·k_j)·scale and their maximum; row p's k from shared memory
    float m = -INFINITY;
    {
        int j = l.row_off;
        float s = dec_first_dot(l, kpre, ks, qr, j, p);
        dec_score(s, j, lo, p, scale, sc, l, m, kq_row);
    }
    // the loop bound is warp-uniform (the shuffles need every lane)
    for (int j0 = rpp; j0 < kv_len; j0 += DEC_BATCH * rpp) {
        VT kr[DEC_BATCH][DEC_CHUNKS];
#pragma unroll
        for (int b = 0; b < DEC_BATCH; b++) {
            int j = j0 + b * rpp + l.row_off;
            if (j < p) dec_load(kr[b], kbase + (long long)j * kvd, l);
            else if (j == p) dec_load(kr[b], ks, l);
        }
#pragma unroll
        for (int b = 0; b < DEC_BATCH; b++) {
            int j = j0 + b * rpp + l.row_off;
            float s = dec_row_dot(kr[b], qr, j <= p);
            dec_score(s, j, lo, p, scale, sc, l, m, kq_row);
        }
    }
    m = warp_max(m);
    if (lane == 0) shf[warp] = m;
    __syncthreads();
    m = shf[0];
    for (int i = 1; i < nw; i++) m = fmaxf(m, shf[i]);
    if (fault & ATTN_SOFTMAX_NO_MAX) m = 0.0f;

    // exponentials, summed in f64 (each warp's sum, then the warps' in a fixed order); rows before
    // the window (fault) get 0
    double sum = 0.0;
    for (int j = threadIdx.x; j < kv_len; j += blockDim.x) {
        float e = j >= lo ? expf(sc[j] - m) : 0.0f;
        sc[j] = e;
        sum += (double)e;
    }
    sum = warp_sum_d(sum);
    if (lane == 0) shd[warp] = sum;
    __syncthreads();
    sum = shd[0];
    for (int i = 1; i < nw; i++) sum += shd[i];
    float inv = (float)(1.0 / sum);
    // the probabilities' tap (llama.cpp's `kq_soft_max`): the very values the V sum below uses
    if (p_row)
        for (int j = threadIdx.x; j < kv_len; j += blockDim.x) p_row[j] = sc[j] * inv;

    // values: each group accumulates p_j·v_j over its rows (row p: the input v), then the groups
    // of a warp are added by shuffles, the warps through shared memory in a fixed order
    VT acc[DEC_CHUNKS];
#pragma unroll
    for (int i = 0; i < DEC_CHUNKS; i++) acc[i] = VT{};
    if (l.row_off <= p) {
        float pj = sc[l.row_off] * inv;
#pragma unroll
        for (int i = 0; i < DEC_CHUNKS; i++) dec_axpy(acc[i], pj, vpre[i]);
    }
    for (int j0 = rpp; j0 < kv_len; j0 += DEC_BATCH * rpp) {
        VT vr[DEC_BATCH][DEC_CHUNKS];
#pragma unroll
        for (int b = 0; b < DEC_BATCH; b++) {
            int j = j0 + b * rpp + l.row_off;
            if (j <= p) dec_load(vr[b], j < p ? vbase + (long long)j * kvd : vp, l);
        }
#pragma unroll
        for (int b = 0; b < DEC_BATCH; b++) {
            int j = j0 + b * rpp + l.row_off;
            if (j <= p) {
                float pj = sc[j] * inv;
#pragma unroll
                for (int i = 0; i < DEC_CHUNKS; i++) dec_axpy(acc[i], pj, vr[b][i]);
            }
        }
    }
#pragma unroll
    for (int i = 0; i < DEC_CHUNKS; i++)
        for (int o = l.L; o < 32; o <<= 1) acc[i] = dec_add(acc[i], dec_shfl_xor(acc[i], o));
    if (lane < l.L) {
#pragma unroll
        for (int i = 0; i < DEC_CHUNKS; i++) {
            int c = l.lig + l.L * i;
            if (c < l.nch) ((VT*)(red + warp * Dh))[c] = acc[i];
        }
    }
    __syncthreads();
    for (int d = threadIdx.x; d < Dh; d += blockDim.x) {
        float o = red[d];
        for (int i = 1; i < nw; i++) o += red[i * Dh + d];
        out[d] = o;
    }
}

// dec_attend for the shipped tier (attn_decode.rs: the int8 decode's): the same scores, then the
// softmax online. Each group of L lanes keeps, over its rows, the running max m, the sum l of
// e = exp(w − m) and Σ e·v, rescaled by exp(m_old − m_new) as m grows; the groups of a warp merge by
// shuffles, the warps once through shared memory: one barrier after the rotation's where dec_attend
// has three, and no pass of exponentials over stored scores. out = Σ e·v / l, f32 throughout: the
// values of dec_attend up to roundings (exp(w − m_g)·exp(m_g − M) for exp(w − M), f32 sums for its
// f64 one); the exact tier keeps dec_attend. Taps: kq as dec_attend's; kq_soft_max = exp(w_j − M) / l
// from the scores kept in sc, after the merge (sc is written only for that tap: a tapped step's
// scores fit shared memory). SOFTMAX_NO_MAX: m stays 0. Rows before the window: score only.
// shf: [32] floats (the warps' m, then l at 16 + warp).
#define DEC_BATCH_ONLINE 2
template <typename VT>
__device__ __forceinline__ void dec_online_visit(const DecLayout& l, float s, int j, int lo, int p, float scale,
                                                 bool no_max, const VT v[DEC_CHUNKS], float& m, float& lsum,
                                                 VT acc[DEC_CHUNKS], float* sc, float* __restrict__ kq_row,
                                                 float* __restrict__ p_row) {
    for (int o = l.L >> 1; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    float w = s * scale;
    if (j > p) return;
    if (l.lig == 0) {
        if (kq_row) kq_row[j] = s;
        if (p_row) sc[j] = w;
    }
    if (j < lo) return;
    float mn = no_max ? 0.0f : fmaxf(m, w);
    float c = no_max ? 1.0f : expf(m - mn);  // m = −∞ at the first row: c = 0
    float e = expf(w - mn);
    lsum = lsum * c + e;
#pragma unroll
    for (int i = 0; i < DEC_CHUNKS; i++) {
        acc[i] = dec_scale(acc[i], c);
        dec_axpy(acc[i], e, v[i]);
    }
    m = mn;
}
// The factors that bring a partial (m_a, ·) and (m_b, ·) to their common max mn (0 and 0 when both
// are empty: m = −∞).
__device__ __forceinline__ void dec_online_factors(float ma, float mb, bool no_max, float& mn, float& ca, float& cb) {
    mn = no_max ? 0.0f : fmaxf(ma, mb);
    if (mn == -INFINITY) {
        ca = cb = 0.0f;
    } else {
        ca = no_max ? 1.0f : expf(ma - mn);
        cb = no_max ? 1.0f : expf(mb - mn);
    }
}
template <typename VT>
__device__ __forceinline__ void dec_attend_online(const DecLayout& l, const VT kpre[DEC_CHUNKS], const VT vpre[DEC_CHUNKS],
                                                  float* smem, float* sc, float* shf, const float* __restrict__ kbase,
                                                  const float* __restrict__ vbase, const float* __restrict__ vp,
                                                  float* __restrict__ out, int p, int kvd, int Dh, float scale, int fault,
                                                  int window, float* __restrict__ kq_row, float* __restrict__ p_row) {
    int kv_len = p + 1, rpp = l.rows_per_pass;
    int lo = window > 0 && kv_len > window ? kv_len - window : 0;  // first visible position
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    bool no_max = fault & ATTN_SOFTMAX_NO_MAX;
    const float* ks = smem + Dh;
    float* red = smem + 2 * Dh;
    VT qr[DEC_CHUNKS], acc[DEC_CHUNKS];
    dec_load(qr, smem, l);
#pragma unroll
    for (int i = 0; i < DEC_CHUNKS; i++) acc[i] = VT{};
    float m = no_max ? 0.0f : -INFINITY, lsum = 0.0f;
    {  // the first pass: K and V from registers (row p: k from shared memory, v loaded after the wait)
        int j = l.row_off;
        float s = dec_first_dot(l, kpre, ks, qr, j, p);
        dec_online_visit(l, s, j, lo, p, scale, no_max, vpre, m, lsum, acc, sc, kq_row, p_row);
    }
    // the loop bound is warp-uniform (the shuffles need every lane)
    for (int j0 = rpp; j0 < kv_len; j0 += DEC_BATCH_ONLINE * rpp) {
        VT kr[DEC_BATCH_ONLINE][DEC_CHUNKS], vr[DEC_BATCH_ONLINE][DEC_CHUNKS];
#pragma unroll
        for (int b = 0; b < DEC_BATCH_ONLINE; b++) {
            int j = j0 + b * rpp + l.row_off;
            if (j < p) {
                dec_load(kr[b], kbase + (long long)j * kvd, l);
                dec_load(vr[b], vbase + (long long)j * kvd, l);
            } else if (j == p) {
                dec_load(kr[b], ks, l);
                dec_load(vr[b], vp, l);
            }
        }
#pragma unroll
        for (int b = 0; b < DEC_BATCH_ONLINE; b++) {
            int j = j0 + b * rpp + l.row_off;
            float s = dec_row_dot(kr[b], qr, j <= p);
            dec_online_visit(l, s, j, lo, p, scale, no_max, vr[b], m, lsum, acc, sc, kq_row, p_row);
        }
    }
    // the groups of the warp (lanes lig, lig + L, … hold the same chunks): merged by shuffles
    for (int o = l.L; o < 32; o <<= 1) {
        float mo = __shfl_xor_sync(0xffffffffu, m, o), lo_sum = __shfl_xor_sync(0xffffffffu, lsum, o);
        float mn, ca, cb;
        dec_online_factors(m, mo, no_max, mn, ca, cb);
        lsum = lsum * ca + lo_sum * cb;
#pragma unroll
        for (int i = 0; i < DEC_CHUNKS; i++) {
            VT ao = dec_shfl_xor(acc[i], o);
            acc[i] = dec_add(dec_scale(acc[i], ca), dec_scale(ao, cb));
        }
        m = mn;
    }
    if (lane < l.L) {
#pragma unroll
        for (int i = 0; i < DEC_CHUNKS; i++) {
            int c = l.lig + l.L * i;
            if (c < l.nch) ((VT*)(red + warp * Dh))[c] = acc[i];
        }
    }
    if (lane == 0) {
        shf[warp] = m;
        shf[16 + warp] = lsum;
    }
    __syncthreads();
    // the warps, merged in a fixed order by every thread (the same M and l everywhere)
    float M = shf[0], L = shf[16];
    for (int w = 1; w < nw; w++) {
        float mn, ca, cb;
        dec_online_factors(M, shf[w], no_max, mn, ca, cb);
        L = L * ca + shf[16 + w] * cb;
        M = mn;
    }
    for (int d = threadIdx.x; d < Dh; d += blockDim.x) {
        float o = 0.0f;
        for (int w = 0; w < nw; w++) {
            float mw = shf[w];
            float f = no_max ? 1.0f : (mw == -INFINITY ? 0.0f : expf(mw - M));
            o += red[w * Dh + d] * f;
        }
        out[d] = o / L;
    }
    // the probabilities' tap (llama.cpp's `kq_soft_max`), from the scores kept in sc
    if (p_row)
        for (int j = threadIdx.x; j < kv_len; j += blockDim.x) p_row[j] = j >= lo ? expf(sc[j] - M) / L : 0.0f;
}

// The whole kernel for one chunk type VT (float4, or float2 when Dh % 4 != 0).
template <typename VT>
__device__ __forceinline__ void attention_decode(const float* __restrict__ q, const float* __restrict__ k,
                                                 const float* __restrict__ v, float* __restrict__ kc,
                                                 float* __restrict__ vc, const int* __restrict__ pos, int H,
                                                 int Hkv, int Dh, int n_rot, float theta_scale, int neox,
                                                 float scale, int fault, int window, float* __restrict__ out,
                                                 float* __restrict__ p_scratch, int ctx, int smem_cap, float* smem,
                                                 float* shf, double* shd, float* __restrict__ q_tap,
                                                 float* __restrict__ k_tap, float* __restrict__ kq_tap,
                                                 float* __restrict__ p_tap, int online) {
    int h = blockIdx.x, tid = threadIdx.x;
    int group = H / Hkv;
    int hk = (fault & ATTN_GQA_MODULO) ? h % Hkv : h / group;
    // exactly one block per kv head writes its cache row p
    bool writer = (fault & ATTN_GQA_MODULO) ? h < Hkv : h % group == 0;
    int kvd = Hkv * Dh;
    const float* qh = q + (long long)h * Dh;
    const float* kh = k + (long long)hk * Dh;
    const float* vp = v + (long long)hk * Dh;

    // Before pdl_wait (common.cuh), what no kernel of this step writes: the position (copied from the
    // host before the step's first kernel, which every kernel here follows), the cache rows of earlier
    // steps (row p, this step's, is written below), and the rotation angles. Then q, k and v.
    int p = pos[0];
    // the first pass's K and V rows into registers, the next passes' (up to DEC_AHEAD rows) asked of L2
    const float* kbase = kc + (long long)hk * Dh;
    const float* vbase = vc + (long long)hk * Dh;
    DecLayout l = dec_layout(Dh, sizeof(VT) / sizeof(float));
    VT kpre[DEC_CHUNKS], vpre[DEC_CHUNKS];
    int j = l.row_off;
    if (j < p) {
        dec_load(kpre, kbase + (long long)j * kvd, l);
        dec_load(vpre, vbase + (long long)j * kvd, l);
    }
    {
        int lines = (Dh * 4 + 127) / 128, rows = min(p, l.rows_per_pass + DEC_AHEAD) - l.rows_per_pass;
        for (int i = tid; i < 2 * rows * lines; i += blockDim.x) {
            int r = l.rows_per_pass + i / (2 * lines), line = i % lines;
            prefetch_l2((i / lines) % 2 ? vbase + (long long)r * kvd + 32 * line : kbase + (long long)r * kvd + 32 * line);
        }
    }
    // RoPE as rope_store_f32, thread tid taking pair tid: pair i < n_rot/2 rotates by
    // θ = p·theta_scale^i (f32, repeated multiplication), NeoX pairs (i, i + n_rot/2) else
    // (2i, 2i + 1); later pairs (n_rot + 2(i − n_rot/2), +1) pass through.
    int half = Dh / 2, nr2 = n_rot / 2;
    bool has_pair = tid < half, rotates = tid < nr2;
    int a = rotates ? (neox ? tid : 2 * tid) : n_rot + 2 * (tid - nr2);
    int b = rotates && neox ? tid + nr2 : a + 1;
    float c = 1.0f, s = 0.0f;
    if (rotates) {
        float theta = (float)p;
        for (int i = 0; i < tid; i++) theta *= theta_scale;
        c = cosf(theta);
        s = sinf(theta);
    }
    pdl_wait();
    float q0 = 0.0f, q1 = 0.0f, k0 = 0.0f, k1 = 0.0f, vd = 0.0f;
    if (has_pair) {
        q0 = qh[a];
        q1 = qh[b];
        k0 = kh[a];
        k1 = kh[b];
    }
    bool copies_v = writer && tid < Dh;
    if (copies_v) vd = vp[tid];
    if (j == p) dec_load(vpre, vp, l);

    // rotation with the first product fused, as in the CPU twin (ggml's contraction)
    float* qs = smem;
    float* ks = smem + Dh;
    long long row_p = (long long)p * kvd + hk * Dh;
    if (has_pair) {
        if (rotates) {
            float r0 = __fmaf_rn(q0, c, -(q1 * s)), r1 = __fmaf_rn(q0, s, q1 * c);
            q0 = r0;
            q1 = r1;
            r0 = __fmaf_rn(k0, c, -(k1 * s));
            r1 = __fmaf_rn(k0, s, k1 * c);
            k0 = r0;
            k1 = r1;
        }
        qs[a] = q0;
        qs[b] = q1;
        ks[a] = k0;
        ks[b] = k1;
        // the rotated q and k taps (`Qcur-L.rope` [H][Dh], `Kcur-L.rope` [Hkv][Dh]), when asked for
        if (q_tap) {
            q_tap[h * Dh + a] = q0;
            q_tap[h * Dh + b] = q1;
        }
        if (k_tap && writer) {
            k_tap[hk * Dh + a] = k0;
            k_tap[hk * Dh + b] = k1;
        }
        if (writer) {
            kc[row_p + a] = k0;
            kc[row_p + b] = k1;
        }
    }
    if (copies_v) vc[row_p + tid] = vd;
    __syncthreads();

    float* o = out + (long long)h * Dh;
    // the score taps are [H][kv_len], kv_len = p + 1
    float* kq_row = kq_tap ? kq_tap + (long long)h * (p + 1) : nullptr;
    float* p_row = p_tap ? p_tap + (long long)h * (p + 1) : nullptr;
    if (online) {  // the shipped tier's softmax (sc only for the probabilities' tap: shared memory then)
        float* sc = smem + (2 + (blockDim.x >> 5)) * Dh;
        dec_attend_online<VT>(l, kpre, vpre, smem, sc, shf, kbase, vbase, vp, o, p, kvd, Dh, scale, fault, window, kq_row, p_row);
    } else if (p + 1 <= smem_cap) {
        float* sc = smem + (2 + (blockDim.x >> 5)) * Dh;
        dec_attend<VT>(l, kpre, vpre, smem, sc, shf, shd, kbase, vbase, vp, o, p, kvd, Dh, scale, fault, window, kq_row, p_row);
    } else {
        float* sc = p_scratch + (long long)h * ctx;
        dec_attend<VT>(l, kpre, vpre, smem, sc, shf, shd, kbase, vbase, vp, o, p, kvd, Dh, scale, fault, window, kq_row, p_row);
    }
}

extern "C" __global__ void __launch_bounds__(256, 1) attention_decode_f32(
    const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
    float* __restrict__ kc, float* __restrict__ vc, const int* __restrict__ pos, int H, int Hkv, int Dh,
    int n_rot, float theta_scale, int neox, float scale, int fault, int window, float* __restrict__ out,
    float* __restrict__ p_scratch, int ctx, int smem_cap, float* __restrict__ q_tap, float* __restrict__ k_tap,
    float* __restrict__ kq_tap, float* __restrict__ p_tap, int online) {
    extern __shared__ float smem[];
    __shared__ float shf[32];
    __shared__ double shd[32];
    // PDL-aware (common.cuh): attention_decode calls pdl_wait once it has what no kernel of the step
    // writes
    if ((Dh & 3) == 0)
        attention_decode<float4>(q, k, v, kc, vc, pos, H, Hkv, Dh, n_rot, theta_scale, neox, scale, fault, window, out,
                                 p_scratch, ctx, smem_cap, smem, shf, shd, q_tap, k_tap, kq_tap, p_tap, online);
    else
        attention_decode<float2>(q, k, v, kc, vc, pos, H, Hkv, Dh, n_rot, theta_scale, neox, scale, fault, window, out,
                                 p_scratch, ctx, smem_cap, smem, shf, shd, q_tap, k_tap, kq_tap, p_tap, online);
}
