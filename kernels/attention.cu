// Causal grouped-query attention, llama.cpp's non-flash path in one kernel per (head, query row).
// CPU twins: engine/src/cpu/attention.rs (attn_scores, attn_softmax, attn_values).
//
// q: `[T][H][Dh]`; kc, vc: `[ctx][Hkv][Dh]` (this layer); kq, p: `[H][T][kv_len]`;
// out: `[T][H·Dh]` (kqv_out). kv_len = pos[0] + T; row t sees positions 0 ..= pos[0] + t.
// kq holds the unscaled scores; with full_scores = 0 the masked entries of kq are left unwritten
// (nobody reads them: they exist only for the `kq` tap). Query head h reads KV head h / (H / Hkv).
// blockDim.x: a multiple of 32, ≥ Dh. Dynamic shared memory: Dh floats.
// fault: 0, or injected bug classes (engine/src/faults.rs), uniform per launch: 1 = no causal mask
// (every row sees all kv_len positions), 2 = softmax without max subtraction, 4 = kv head h % Hkv.
extern "C" __global__ void attention_f32(const float* __restrict__ q, const float* __restrict__ kc,
                                         const float* __restrict__ vc, float* __restrict__ kq,
                                         float* __restrict__ p, float* __restrict__ out,
                                         const int* __restrict__ pos, int T, int H, int Hkv, int Dh,
                                         float scale, int full_scores, int fault) {
    extern __shared__ float qs[];
    __shared__ float shf[32];
    __shared__ double shd[32];
    int h = blockIdx.x, t = blockIdx.y;
    int n_past = pos[0];
    int kv_len = n_past + T;
    int valid = (fault & 1) ? kv_len : n_past + t + 1;
    int hk = (fault & 4) ? h % Hkv : h / (H / Hkv);
    int kvd = Hkv * Dh;
        const float* qr = q + ((long long)t * H + h) * Dh;
    for (int d = threadIdx.x; d < Dh; d += blockDim.x) qs[d] = qr[d];
    __syncthreads();
    long long row = ((long long)h * T + t) * kv_len;
    float* kqr = kq + row;
    float* pr = p + row;
    int n_scores = full_scores ? kv_len : valid;
    // scores: one thread per key position, q from shared memory, k rows read as float4 when aligned
    bool vec4 = (Dh & 3) == 0;
    for (int j = threadIdx.x; j < n_scores; j += blockDim.x) {
        const float* kr = kc + (long long)j * kvd + hk * Dh;
        float s = 0.0f;
        if (vec4) {
            const float4* k4 = (const float4*)kr;
#pragma unroll 4
            for (int d4 = 0; d4 < (Dh >> 2); d4++) {
                float4 kv = k4[d4];
                s += kv.x * qs[4 * d4] + kv.y * qs[4 * d4 + 1] + kv.z * qs[4 * d4 + 2] + kv.w * qs[4 * d4 + 3];
            }
        } else {
            for (int d = 0; d < Dh; d++) s += kr[d] * qs[d];
        }
        kqr[j] = s;
    }
    __syncthreads();
    // softmax over the visible positions: max subtracted, sum in f64
    float m = -INFINITY;
    for (int j = threadIdx.x; j < valid; j += blockDim.x) m = fmaxf(m, kqr[j] * scale);
    m = block_max(m, shf);
    if (fault & 2) m = 0.0f;
    double sum = 0.0;
    for (int j = threadIdx.x; j < valid; j += blockDim.x) {
        float e = expf(kqr[j] * scale - m);
        pr[j] = e;
        sum += (double)e;
    }
    sum = block_sum_d(sum, shd);
    float inv = (float)(1.0 / sum);
    for (int j = threadIdx.x; j < kv_len; j += blockDim.x) pr[j] = j < valid ? pr[j] * inv : 0.0f;
    __syncthreads();
    // values: G groups of Dh threads, group g sums positions j ≡ g (mod G), then the groups are added
    int G = blockDim.x / Dh;
    int g = threadIdx.x / Dh, e = threadIdx.x % Dh;
    float acc = 0.0f;
    if (g < G) {
#pragma unroll 4
        for (int j = g; j < valid; j += G) acc += pr[j] * vc[(long long)j * kvd + hk * Dh + e];
    }
    // reuse the q staging area: Dh floats per group would not fit, so accumulate group by group
    __syncthreads();
    for (int gg = 0; gg < G; gg++) {
        if (g == gg) qs[e] = (gg == 0) ? acc : qs[e] + acc;
        __syncthreads();
    }
    for (int d = threadIdx.x; d < Dh; d += blockDim.x) out[(long long)t * H * Dh + h * Dh + d] = qs[d];
}
