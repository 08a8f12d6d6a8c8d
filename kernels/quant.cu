// Quantized weights: dequantization in registers, matrix-vector products, embedding rows.
// CPU twins: engine/src/dequant.rs (dequantize_row) and engine/src/cpu/ops.rs (matmul, embedding).
//
// A weight matrix is `[rows][cols]` (GGUF ne = [cols, rows]); each row is `row_bytes` of blocks.
// Work is split in "chunks" of 16 consecutive elements of a row: half a block for the 32-element
// formats, a sixteenth of a super-block for the k-quants, 16 plain values for F32/F16.

// host-check begin (engine/tests/kernels_host.rs compiles dq16 for the CPU too)
// Scale and min of Q4_K sub-block `is` (0..7) from the 12 packed bytes at `s` (ggml's
// get_scale_min_k4): 6 bits each, the high two of sub-blocks 4..7 in the top bits of bytes 0..7.
__device__ __forceinline__ void q4k_scale_min(const u8* s, int is, int& sc, int& mn) {
    if (is < 4) {
        sc = s[is] & 63;
        mn = s[is + 4] & 63;
    } else {
        sc = (s[is + 4] & 0xF) | ((s[is - 4] >> 6) << 4);
        mn = (s[is + 4] >> 4) | ((s[is] >> 6) << 4);
    }
}

// Half h (0, 1) of the Q5_0 block at `b` as four words of 5-bit values (0..31, a byte each): the
// elements j = 4i .. 4i + 3 of word i take the low nibbles (the high ones for h = 1) of qs and
// bit j + 16h of qh as their fifth bit.
__device__ __forceinline__ void q5_0_words(const u8* b, int h, u32 v[4]) {
    u32 qh = (u32)ld_u16(b + 2) | ((u32)ld_u16(b + 4) << 16);
    u32 qs[4];
    ld16(b + 6, qs);
#pragma unroll
    for (int i = 0; i < 4; i++) v[i] = ((qs[i] >> (4 * h)) & 0x0F0F0F0Fu) | spread4_bit4((qh >> (16 * h + 4 * i)) & 0xFu);
}

// Chunk cc (0..15) of the Q6_K super-block at `b` as four words of 6-bit values (0..63, a byte each:
// 4 low bits from ql, 2 high bits from qh; shl ≤ 4, shh ≤ 6 keep them within the byte); returns the
// index of the chunk's scale in scales[16].
__device__ __forceinline__ int q6k_words(const u8* b, int cc, u32 v[4]) {
    int n = cc >> 3, r = cc & 7, k = r >> 1, lh = r & 1;
    u32 ql[4], qh[4];
    ld16(b + 64 * n + (k & 1) * 32 + 16 * lh, ql);
    ld16(b + 128 + 32 * n + 16 * lh, qh);
    int shl = (k >> 1) * 4, shh = 2 * k;
#pragma unroll
    for (int i = 0; i < 4; i++) v[i] = ((ql[i] >> shl) & 0x0F0F0F0Fu) | (((qh[i] >> shh) & 0x03030303u) << 4);
    return 8 * n + lh + 2 * k;
}

// Dequantizes chunk `c` (elements 16c .. 16c+15) of the row at `row` into `out`. For F32/F16,
// elements at or past `ncols` come out 0; the block formats always have whole blocks.
template <int TY>
__device__ __forceinline__ void dq16(const u8* __restrict__ row, int c, int ncols, float* out) {
    if (TY == GT_F32) {
        const float* p = (const float*)row + 16 * c;
#pragma unroll
        for (int j = 0; j < 16; j++) out[j] = (16 * c + j < ncols) ? p[j] : 0.0f;
    } else if (TY == GT_F16) {
        const u16* p = (const u16*)row + 16 * c;
#pragma unroll
        for (int j = 0; j < 16; j++) out[j] = (16 * c + j < ncols) ? h2f(p[j]) : 0.0f;
    } else if (TY == GT_Q4_0) {  // 18 bytes: f16 d, qs[16]; x = (q - 8) d
        const u8* b = row + (c >> 1) * 18;
        int sh = (c & 1) * 4;
        float d = h2f(ld_u16(b));
        u32 qs[4];
        ld16(b + 2, qs);
#pragma unroll
        for (int i = 0; i < 4; i++) {
            u32 v = (qs[i] >> sh) & 0x0F0F0F0Fu;  // elements 4i .. 4i + 3, a byte each
#pragma unroll
            for (int k = 0; k < 4; k++) out[4 * i + k] = byte_int_f(v, k, 8) * d;
        }
    } else if (TY == GT_Q4_1) {  // 20 bytes: f16 d, f16 m, qs[16]; x = q d + m
        const u8* b = row + (c >> 1) * 20;
        int sh = (c & 1) * 4;
        float d = h2f(ld_u16(b)), m = h2f(ld_u16(b + 2));
        u32 qs[4];
        ld16(b + 4, qs);
#pragma unroll
        for (int i = 0; i < 4; i++) {
            u32 v = (qs[i] >> sh) & 0x0F0F0F0Fu;
#pragma unroll
            for (int k = 0; k < 4; k++) out[4 * i + k] = byte_int_f(v, k, 0) * d + m;
        }
    } else if (TY == GT_Q5_0) {  // 22 bytes: f16 d, qh[4], qs[16]; x = (q | bit<<4) - 16) d
        const u8* b = row + (c >> 1) * 22;
        float d = h2f(ld_u16(b));
        u32 v[4];
        q5_0_words(b, c & 1, v);
#pragma unroll
        for (int i = 0; i < 4; i++)
#pragma unroll
            for (int k = 0; k < 4; k++) out[4 * i + k] = byte_int_f(v[i], k, 16) * d;
    } else if (TY == GT_Q8_0) {  // 34 bytes: f16 d, qs[32] (i8); x = q d
        const u8* b = row + (c >> 1) * 34;
        float d = h2f(ld_u16(b));
        u32 qs[4];
        ld16(b + 2 + 16 * (c & 1), qs);
#pragma unroll
        for (int i = 0; i < 4; i++) {
            u32 v = qs[i] ^ 0x80808080u;  // i8 + 128, a byte each
#pragma unroll
            for (int k = 0; k < 4; k++) out[4 * i + k] = byte_int_f(v, k, 128) * d;
        }
    } else if (TY == GT_Q4_K) {  // 144 bytes: f16 d, f16 dmin, scales[12], qs[128]
        const u8* b = row + (c >> 4) * 144;
        int cc = c & 15, g = cc >> 2, sub = cc & 3;
        float d = h2f(ld_u16(b)), dmin = h2f(ld_u16(b + 2));
        int sc, mn;
        q4k_scale_min(b + 4, 2 * g + (sub >> 1), sc, mn);
        float d1 = d * (float)sc, m1 = dmin * (float)mn;
        u32 q[4];
        ld16(b + 16 + 32 * g + 16 * (sub & 1), q);
        int sh = 4 * (sub >> 1);
#pragma unroll
        for (int i = 0; i < 4; i++) {
            u32 v = (q[i] >> sh) & 0x0F0F0F0Fu;
#pragma unroll
            for (int k = 0; k < 4; k++) out[4 * i + k] = d1 * byte_int_f(v, k, 0) - m1;
        }
    } else if (TY == GT_Q6_K) {  // 210 bytes: ql[128], qh[64], scales[16] (i8), f16 d
        const u8* b = row + (c >> 4) * 210;
        u32 v[4];
        int is = q6k_words(b, c & 15, v);
        float ds = h2f(ld_u16(b + 208)) * (float)((const signed char*)(b + 192))[is];
#pragma unroll
        for (int i = 0; i < 4; i++)
#pragma unroll
            for (int e = 0; e < 4; e++) out[4 * i + e] = ds * byte_int_f(v[i], e, 32);
    }
}

// ---- int8 activations (the shipped tier's decode arithmetic, llama.cpp's MMVQ) ----
// x is quantized per 32 values as llama.cpp's q8_1 does it: d8 = amax / 127, q8 = round(x / d8)
// (q8 = 0 when amax = 0). A chunk c of 16 weights (dq16's chunk) then meets the four words u of
// q8[16c .. 16c + 15], the scale d8 of its 32 and s16 = Σ of those 16 q8, and gives
//   Σ_j dequantized w_j · (d8 · q8_j)
// as integer dot products (dp4a) of the weights' integer values with q8, scaled once: the offsets
// (Q4_0's 8, Q5_0's 16, Q6_K's 32) and Q4_1/Q4_K minimums come in through s16, exactly.
// CPU twin: engine/src/cpu/ops.rs quantize_q8 (d8 · q8 per value) then a plain dot product.

// Σ q·u over the 16 nibbles at bits sh..sh+3 of the 16 bytes at p (Q4_0, Q4_1, Q4_K), q8 words u.
__device__ __forceinline__ int dp4a_nibbles(const u8* p, int sh, const int u[4]) {
    u32 qs[4];
    ld16(p, qs);
    int s = 0;
#pragma unroll
    for (int i = 0; i < 4; i++) s = __dp4a((int)((qs[i] >> sh) & 0x0F0F0F0Fu), u[i], s);
    return s;
}

// Chunk c of a row (`row`, format TY) against the int8 x: the section's Σ, see above.
template <int TY>
__device__ __forceinline__ float q8dot16(const u8* __restrict__ row, int c, const int u[4], float d8, int s16) {
    int s = 0;
    if (TY == GT_Q4_0) {  // x = (q - 8) d
        const u8* b = row + (c >> 1) * 18;
        s = dp4a_nibbles(b + 2, (c & 1) * 4, u);
        return h2f(ld_u16(b)) * d8 * (float)(s - 8 * s16);
    } else if (TY == GT_Q4_1) {  // x = q d + m
        const u8* b = row + (c >> 1) * 20;
        s = dp4a_nibbles(b + 4, (c & 1) * 4, u);
        return d8 * (h2f(ld_u16(b)) * (float)s + h2f(ld_u16(b + 2)) * (float)s16);
    } else if (TY == GT_Q5_0) {  // x = (q | bit<<4) - 16) d
        const u8* b = row + (c >> 1) * 22;
        u32 v[4];
        q5_0_words(b, c & 1, v);
#pragma unroll
        for (int i = 0; i < 4; i++) s = __dp4a((int)v[i], u[i], s);
        return h2f(ld_u16(b)) * d8 * (float)(s - 16 * s16);
    } else if (TY == GT_Q8_0) {  // x = q d, q signed
        const u8* b = row + (c >> 1) * 34;
        u32 qs[4];
        ld16(b + 2 + 16 * (c & 1), qs);
#pragma unroll
        for (int i = 0; i < 4; i++) s = __dp4a((int)qs[i], u[i], s);
        return h2f(ld_u16(b)) * d8 * (float)s;
    } else if (TY == GT_Q4_K) {  // x = d·sc·q − dmin·mn
        const u8* b = row + (c >> 4) * 144;
        int cc = c & 15, g = cc >> 2, sub = cc & 3;
        int sc, mn;
        q4k_scale_min(b + 4, 2 * g + (sub >> 1), sc, mn);
        s = dp4a_nibbles(b + 16 + 32 * g + 16 * (sub & 1), 4 * (sub >> 1), u);
        float d1 = h2f(ld_u16(b)) * (float)sc, m1 = h2f(ld_u16(b + 2)) * (float)mn;
        return d8 * (d1 * (float)s - m1 * (float)s16);
    } else if (TY == GT_Q6_K) {  // x = d·sc·(q − 32)
        const u8* b = row + (c >> 4) * 210;
        u32 v[4];
        int is = q6k_words(b, c & 15, v);
#pragma unroll
        for (int i = 0; i < 4; i++) s = __dp4a((int)v[i], u[i], s);
        return h2f(ld_u16(b + 208)) * (float)((const signed char*)(b + 192))[is] * d8 * (float)(s - 32 * s16);
    }
    return 0.0f;  // F32/F16: no integer form (the callers take only block formats)
}
// host-check end

// MV_MAX_T (most token rows of a matvec) comes from Rust: cuda::ops::MV_MAX_T.

// The fused RMSNorm's per-row scales of the first NT rows of x (row_rms_scale), into nscale;
// the whole block takes part, then waits.
template <int NT>
__device__ void norm_scales(const float* __restrict__ x, int T, int ncols, float eps, float* nscale, double* shd) {
    for (int t = 0; t < T && t < NT; t++) {
        float sc = row_rms_scale(x + (long long)t * ncols, ncols, eps, shd);
        if (threadIdx.x == 0) nscale[t] = sc;
    }
    __syncthreads();
}

// y[t][r] = W[r] · x[t] (+ bias[r]) (+ res[t][r]) for t < T ≤ MV_MAX_T. `wpr` warps (1, 2, 4 or 8)
// share an output row, splitting its chunks; blockDim.x = 256, so a block covers 8 / wpr rows.
// y_raw (optional) receives W[r] · x[t] before bias/residual (for the `.mul_mat` taps).
// y may alias res (each element is read and written by the same thread).
// With norm_w, x is first RMS-normalised and scaled by norm_w (the rmsnorm_f32 kernel fused in, with
// the same arithmetic: the block's f64 sum of squares, then (x · scale) · w per element).
template <int TY, int NT>
__device__ void matvec_impl(const u8* __restrict__ W, long long row_bytes, int nrows, int ncols,
                            const float* __restrict__ x, int T, float* y, const float* __restrict__ bias,
                            const float* res, float* __restrict__ y_raw, int wpr,
                            const float* __restrict__ norm_w, float eps) {
    __shared__ float red[8][NT];
    __shared__ float nscale[NT];
    __shared__ double shd[32];
    if (norm_w) norm_scales<NT>(x, T, ncols, eps, nscale, shd);
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int sub = warp % wpr;
    int r = blockIdx.x * (8 / wpr) + warp / wpr;
    bool live = r < nrows;
    const u8* row = W + (long long)(live ? r : 0) * row_bytes;
    int nchunks = (ncols + 15) >> 4;
    float acc[NT];
#pragma unroll
    for (int t = 0; t < NT; t++) acc[t] = 0.0f;
    if (live) {
        for (int c = sub * 32 + lane; c < nchunks; c += 32 * wpr) {
            float w[16];
            dq16<TY>(row, c, ncols, w);
#pragma unroll
            for (int t = 0; t < NT; t++) {
                if (t < T) {
                    const float* xp = x + (long long)t * ncols + 16 * c;
                    float s = 0.0f;
                    if (TY == GT_F32 || TY == GT_F16) {
                        float sc = norm_w ? nscale[t] : 1.0f;
#pragma unroll
                        for (int j = 0; j < 16; j++) {
                            int e = 16 * c + j;
                            if (e < ncols) s += w[j] * (norm_w ? xp[j] * sc * norm_w[e] : xp[j]);
                        }
                    } else if (norm_w) {
                        const float4* x4 = (const float4*)xp;
                        const float4* n4 = (const float4*)(norm_w + 16 * c);
                        float sc = nscale[t];
#pragma unroll
                        for (int j = 0; j < 4; j++) {
                            float4 v = x4[j], nw = n4[j];
                            s += w[4 * j] * (v.x * sc * nw.x) + w[4 * j + 1] * (v.y * sc * nw.y) +
                                 w[4 * j + 2] * (v.z * sc * nw.z) + w[4 * j + 3] * (v.w * sc * nw.w);
                        }
                    } else {
                        const float4* x4 = (const float4*)xp;  // 16 floats, 64-byte aligned rows
#pragma unroll
                        for (int j = 0; j < 4; j++) {
                            float4 v = x4[j];
                            s += w[4 * j] * v.x + w[4 * j + 1] * v.y + w[4 * j + 2] * v.z + w[4 * j + 3] * v.w;
                        }
                    }
                    acc[t] += s;
                }
            }
        }
    }
#pragma unroll
    for (int t = 0; t < NT; t++) {
        float v = warp_sum(acc[t]);
        if (wpr > 1 && lane == 0) red[warp][t] = v;
        acc[t] = v;
    }
    if (wpr > 1) __syncthreads();
    if (!live || sub != 0 || lane != 0) return;
#pragma unroll
    for (int t = 0; t < NT; t++) {
        if (t < T) {
            float v = acc[t];
            for (int k = 1; k < wpr; k++) v += red[warp + k][t];
            long long o = (long long)t * nrows + r;
            if (y_raw) y_raw[o] = v;
            if (bias) v += bias[r];
            if (res) v += res[o];
            y[o] = v;
        }
    }
}

// s[t][r] = silu(G[r]·x[t]) · (U[r]·x[t]); g/u (optional) receive the two products.
// With norm_w, x is RMS-normalised and scaled first, as in matvec_impl.
template <int TY, int NT>
__device__ void matvec_swiglu_impl(const u8* __restrict__ G, const u8* __restrict__ U, long long row_bytes,
                                   int nrows, int ncols, const float* __restrict__ x, int T,
                                   float* __restrict__ s_out, float* __restrict__ g_out, float* __restrict__ u_out,
                                   const float* __restrict__ norm_w, float eps) {
    __shared__ float nscale[NT];
    __shared__ double shd[32];
    if (norm_w) norm_scales<NT>(x, T, ncols, eps, nscale, shd);
    int r = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    int lane = threadIdx.x & 31;
    if (r >= nrows) return;
    const u8* grow = G + (long long)r * row_bytes;
    const u8* urow = U + (long long)r * row_bytes;
    int nchunks = (ncols + 15) >> 4;
    float ag[NT], au[NT];
#pragma unroll
    for (int t = 0; t < NT; t++) ag[t] = au[t] = 0.0f;
    for (int c = lane; c < nchunks; c += 32) {
        float wg[16], wu[16];
        dq16<TY>(grow, c, ncols, wg);
        dq16<TY>(urow, c, ncols, wu);
#pragma unroll
        for (int t = 0; t < NT; t++) {
            if (t < T) {
                const float* xp = x + (long long)t * ncols + 16 * c;
                float sg = 0.0f, su = 0.0f;
                if (TY == GT_F32 || TY == GT_F16) {
                    float sc = norm_w ? nscale[t] : 1.0f;
#pragma unroll
                    for (int j = 0; j < 16; j++) {
                        int e = 16 * c + j;
                        float xv = e < ncols ? (norm_w ? xp[j] * sc * norm_w[e] : xp[j]) : 0.0f;
                        sg += wg[j] * xv;
                        su += wu[j] * xv;
                    }
                } else if (norm_w) {
                    const float4* x4 = (const float4*)xp;
                    const float4* n4 = (const float4*)(norm_w + 16 * c);
                    float sc = nscale[t];
#pragma unroll
                    for (int j = 0; j < 4; j++) {
                        float4 v = x4[j], nw = n4[j];
                        float a0 = v.x * sc * nw.x, a1 = v.y * sc * nw.y, a2 = v.z * sc * nw.z, a3 = v.w * sc * nw.w;
                        sg += wg[4 * j] * a0 + wg[4 * j + 1] * a1 + wg[4 * j + 2] * a2 + wg[4 * j + 3] * a3;
                        su += wu[4 * j] * a0 + wu[4 * j + 1] * a1 + wu[4 * j + 2] * a2 + wu[4 * j + 3] * a3;
                    }
                } else {
                    const float4* x4 = (const float4*)xp;
#pragma unroll
                    for (int j = 0; j < 4; j++) {
                        float4 v = x4[j];
                        sg += wg[4 * j] * v.x + wg[4 * j + 1] * v.y + wg[4 * j + 2] * v.z + wg[4 * j + 3] * v.w;
                        su += wu[4 * j] * v.x + wu[4 * j + 1] * v.y + wu[4 * j + 2] * v.z + wu[4 * j + 3] * v.w;
                    }
                }
                ag[t] += sg;
                au[t] += su;
            }
        }
    }
#pragma unroll
    for (int t = 0; t < NT; t++) {
        if (t < T) {
            float g = warp_sum(ag[t]);
            float u = warp_sum(au[t]);
            if (lane == 0) {
                long long o = (long long)t * nrows + r;
                if (g_out) g_out[o] = g;
                if (u_out) u_out[o] = u;
                s_out[o] = g / (1.0f + expf(-g)) * u;
            }
        }
    }
}

// ---- Decode (T = 1) products of the block formats, weight rows staged in shared memory ----
// A decode step is latency-bound: the matvec1 kernels above make each lane wait for its weight bytes
// chunk after chunk. Here every warp first asks for all the weight bytes it will use at once
// (cp.async into shared memory, no registers held), stages x (RMS-normalised when fused) in shared
// memory while they are in flight, then dequantizes from shared memory. Same arithmetic per element
// as matvec_impl: dq16 then Σ w·x over the chunk's 16 values. PDL-aware (common.cuh): the weight
// copies start before pdl_wait, so under programmatic dependent launch they overlap the previous
// kernel.

// Bytes and elements of one block of a block format (0 for F32/F16, which are not staged).
__host__ __device__ constexpr int block_bytes(int ty) {
    return ty == GT_Q4_0 ? 18 : ty == GT_Q4_1 ? 20 : ty == GT_Q5_0 ? 22 : ty == GT_Q8_0 ? 34
         : ty == GT_Q4_K ? 144 : ty == GT_Q6_K ? 210 : 0;
}
__host__ __device__ constexpr int block_elems(int ty) { return (ty == GT_Q4_K || ty == GT_Q6_K) ? 256 : 32; }

// One 16-byte global → shared copy, asynchronous on sm_80+ (completed by cp_async_wait_all).
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
#if __CUDA_ARCH__ >= 800
    unsigned s = (unsigned)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem) : "memory");
#else
    *(uint4*)smem = *(const uint4*)gmem;
#endif
}
__device__ __forceinline__ void cp_async_wait_all() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_all;\n" ::: "memory");
#endif
}

// The warp copies bytes [src, src + n) into `area` (16-byte aligned, ≥ 16·⌈(n + 15)/16⌉ bytes) and
// returns where src's first byte lands. Whole aligned 16-byte pieces are copied, so up to 15 bytes
// before src (inside the same matrix, whose start is 256-byte aligned) and after src + n (inside the
// 16 bytes of padding of QMat::upload) come along. Start of the copy only: see cp_async_wait_all.
__device__ __forceinline__ const u8* stage_span(u8* area, const u8* src, int n, int lane) {
    unsigned long long a0 = (unsigned long long)src & ~15ull;
    int off = (int)((unsigned long long)src - a0);
    int pieces = (off + n + 15) >> 4;
    for (int i = lane; i < pieces; i += 32) cp_async16(area + 16 * i, (const void*)(a0 + 16ull * i));
    return area + off;
}

// xs = x, or x RMS-normalised and scaled by norm_w with rmsnorm_f32's arithmetic ((x · scale) · w,
// the scale from row_rms_scale): `n` values (a multiple of 4; x 16-byte aligned). Whole block.
__device__ __forceinline__ void stage_x(float* xs, const float* __restrict__ x, int n,
                                        const float* __restrict__ norm_w, float eps, double* shd) {
    if (norm_w) {
        float sc = row_rms_scale(x, n, eps, shd);
        for (int i = threadIdx.x; i < n; i += blockDim.x) xs[i] = x[i] * sc * norm_w[i];
    } else {
        for (int i = threadIdx.x; i < n / 4; i += blockDim.x) ((float4*)xs)[i] = ((const float4*)x)[i];
    }
}

// x quantized to int8 per 32 values, for q8dot16 (the int8 section above), into the block's x area
// (x_area_bytes<true>):
//   xq [n] i8: q8 = round(x · 127/amax) (0 where amax = 0) | xd [n / 32] f32: d8 = amax / 127 |
//   xs [n / 16] i32: Σ of each 16 q8.
// With norm_w, the RMSNorm is fused in with its scale deferred: the values quantized are x · norm_w,
// and the scale sc = 1 / sqrt(mean(x²) + eps) multiplies the kernel's sums at the end
// (norm_scale_deferred), as Σ w · q8(x·sc·w_n) = sc · Σ w · q8(x·w_n) up to roundings: so the
// block's reduction of x² (in f64) runs beside the quantization and shares its barrier instead of
// two of its own before it. Each warp leaves its f64 share of Σx² in shd[warp] (thread i's share:
// its float4s, in order); norm_scale_deferred adds the warps' shares in order after the caller's
// __syncthreads. (A tapped decode step runs the same kernels: cuda/backend.rs Step::int8_norm keeps
// the int8 decode's norm fused when the norm is tapped, the tap coming from rmsnorm_f32 beside it.)
// n a multiple of 32. Each thread takes 8 consecutive values (two float4s), so 4 lanes share a 32's
// amax (2 shuffles) and 2 lanes a 16's Σ (1 shuffle); a block covers 2048 values per round (the
// decode's down projection stages 4864 in every block: 3 rounds). The rounds run in whole warps
// (full-warp shuffles): lanes past n / 8 quantize zeros and store nothing. Whole block; the caller's
// __syncthreads publishes the area (and shd).
__device__ __forceinline__ void stage_x_q8(u8* area, const float* __restrict__ x, int n,
                                           const float* __restrict__ norm_w, double* shd) {
    uint2* xq = (uint2*)area;
    float* xd = (float*)(area + n);
    int* xs = (int*)(area + n + n / 8);
    int lane = threadIdx.x & 31, n8 = n >> 3, rounds = (n8 + 31) & ~31;
    double ss = 0.0;
#pragma unroll 2
    for (int i = threadIdx.x; i < rounds; i += blockDim.x) {
        bool in = i < n8;
        float v[8];
#pragma unroll
        for (int k = 0; k < 2; k++) {
            float4 f = in ? ((const float4*)x)[2 * i + k] : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            v[4 * k] = f.x;
            v[4 * k + 1] = f.y;
            v[4 * k + 2] = f.z;
            v[4 * k + 3] = f.w;
        }
        if (norm_w && in) {
#pragma unroll
            for (int k = 0; k < 8; k++) ss += (double)(v[k] * v[k]);
#pragma unroll
            for (int k = 0; k < 2; k++) {
                float4 w = ((const float4*)norm_w)[2 * i + k];
                v[4 * k] *= w.x;
                v[4 * k + 1] *= w.y;
                v[4 * k + 2] *= w.z;
                v[4 * k + 3] *= w.w;
            }
        }
        float amax = 0.0f;
#pragma unroll
        for (int k = 0; k < 8; k++) amax = fmaxf(amax, fabsf(v[k]));
        amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 1));
        amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 2));
        // q8 = round(x · 127/amax): one division a thread rather than one a value (llama.cpp's
        // round(x / d) gives the same q8 but at a tie of the rounding). No branch: a tiny amax, whose
        // 127/amax could overflow, and its x are scaled by 2^100 first (exact, and the same q8 wherever
        // 127/amax is finite); amax = 0 gives id = 0, so q8 = 0. (A branch to a division for the tiny
        // case cost smollm2-135m's decode 5 % on the H200.)
        float d = amax / 127.0f, up = amax < 1e-30f ? 0x1p100f : 1.0f;
        float id = amax == 0.0f ? 0.0f : 127.0f / (amax * up);
        u32 word[2];
        int s = 0;
#pragma unroll
        for (int k = 0; k < 2; k++) {
            int q0 = (int)roundf((v[4 * k] * up) * id), q1 = (int)roundf((v[4 * k + 1] * up) * id);
            int q2 = (int)roundf((v[4 * k + 2] * up) * id), q3 = (int)roundf((v[4 * k + 3] * up) * id);
            s += q0 + q1 + q2 + q3;
            word[k] = (u32)(q0 & 0xFF) | (u32)(q1 & 0xFF) << 8 | (u32)(q2 & 0xFF) << 16 | (u32)(q3 & 0xFF) << 24;
        }
        s += __shfl_xor_sync(0xffffffffu, s, 1);  // Σ over the 16
        if (in) {
            xq[i] = make_uint2(word[0], word[1]);
            if ((lane & 1) == 0) xs[i >> 1] = s;
            if ((lane & 3) == 0) xd[i >> 2] = d;
        }
    }
    if (norm_w) {
        ss = warp_sum_d(ss);
        if (lane == 0) shd[threadIdx.x >> 5] = ss;
    }
}

// The deferred RMSNorm scale of stage_x_q8 (1 with no norm_w): the warps' shares of Σx² in shd,
// added in warp order, after the __syncthreads that follows stage_x_q8. Every thread may call it.
__device__ __forceinline__ float norm_scale_deferred(const float* __restrict__ norm_w, const double* shd, int n, float eps) {
    if (!norm_w) return 1.0f;
    double t = shd[0];
    for (int w = 1; w < (int)(blockDim.x >> 5); w++) t += shd[w];
    return rms_scale_of_sum(t, n, eps);
}

// Bytes of a staged kernel's x area for `ncols` values, 16-byte rounded: f32 values, or the int8
// form of stage_x_q8 (1 + 1/8 + 1/4 bytes a value). Rust's twin: ops.rs x_area_bytes.
template <bool Q8>
__device__ __forceinline__ int x_area_bytes(int ncols) {
    return ((Q8 ? ncols + ncols / 8 + ncols / 4 : 4 * ncols) + 15) & ~15;
}

// Stages x into the x area in the kernel's arithmetic (f32, or int8 when Q8, whose norm scale is
// deferred: norm_scale_deferred after the caller's __syncthreads).
template <bool Q8>
__device__ __forceinline__ void stage_x_any(u8* area, const float* __restrict__ x, int n,
                                            const float* __restrict__ norm_w, float eps, double* shd) {
    if (Q8) stage_x_q8(area, x, n, norm_w, shd);
    else stage_x((float*)area, x, n, norm_w, eps, shd);
}

// Σ_j w[j] · x[j] over one chunk of 16 values, summed as matvec_impl sums a chunk.
__device__ __forceinline__ float dot16(const float w[16], const float4* xv) {
    float s = 0.0f;
#pragma unroll
    for (int j = 0; j < 4; j++) {
        float4 v = xv[j];
        s += w[4 * j] * v.x + w[4 * j + 1] * v.y + w[4 * j + 2] * v.z + w[4 * j + 3] * v.w;
    }
    return s;
}

// Chunk c of the int8 x (stage_x_q8's area xa, for ncols values) against chunk cw of the staged
// weights `span`: q8dot16 with the chunk's four words of q8, its d8 and its Σ q8.
template <int TY>
__device__ __forceinline__ float q8_chunk(const u8* span, int cw, const u8* xa, int ncols, int c) {
    const int4 u4 = *(const int4*)(xa + 16 * c);
    const int u[4] = {u4.x, u4.y, u4.z, u4.w};
    return q8dot16<TY>(span, cw, u, ((const float*)(xa + ncols))[c >> 1], ((const int*)(xa + ncols + ncols / 8))[c]);
}

// Σ over local chunks c = lane, lane + 32, … < nc of dq16(span, c) · xs[16c ..]: one lane's share.
template <int TY>
__device__ __forceinline__ float dot_staged(const u8* span, int nc, const float* xs, int lane) {
    float acc = 0.0f;
    for (int c = lane; c < nc; c += 32) {
        float w[16];
        dq16<TY>(span, c, 0, w);
        acc += dot16(w, (const float4*)(xs + 16 * c));
    }
    return acc;
}

// matvec_impl for T = 1 and a block format, staged. blockDim.x = 256: 8 warps. Either `wpr` warps
// (1, 2, 4 or 8) share a row, each taking a run of ⌈blocks per row / wpr⌉ whole blocks, or (wpr = 1)
// each warp takes `rpw` consecutive rows (1 to RPW_MAX; MV_RPW for matvec1s), reusing each x chunk
// it loads for all of them. Dynamic shared memory: the x area (x_area_bytes<Q8>(ncols): f32 x, or
// with Q8 its int8 form, stage_x_q8), then 8 · rpw staging areas of `span_cap` bytes. `block`: this
// block's index in the matrix. MV_RPW comes from Rust: cuda::ops::MV_RPW.
template <int TY, int RPW_MAX, bool Q8 = false>
__device__ void matvec1_staged_impl(const u8* __restrict__ W, long long row_bytes, int nrows, int ncols,
                                    const float* __restrict__ x, float* y, const float* __restrict__ bias,
                                    const float* res, float* __restrict__ y_raw, int wpr, int rpw, int span_cap,
                                    const float* __restrict__ norm_w, float eps, int block) {
    extern __shared__ __align__(16) u8 smem[];
    __shared__ float red[8];
    __shared__ double shd[32];
    constexpr int BB = block_bytes(TY), CPB = block_elems(TY) / 16;
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int part = warp % wpr;
    int r0 = (block * (8 / wpr) + warp / wpr) * rpw;  // this warp's first row
    int nb = ncols / block_elems(TY), bpp = (nb + wpr - 1) / wpr;
    int b0 = part * bpp, nblk = max(0, min(nb, b0 + bpp) - b0);
    u8* area = smem + x_area_bytes<Q8>(ncols) + warp * rpw * span_cap;
    const u8* span[RPW_MAX];
#pragma unroll
    for (int k = 0; k < RPW_MAX; k++) {
        span[k] = area + k * span_cap;
        if (k < rpw && r0 + k < nrows && nblk > 0)
            span[k] = stage_span(area + k * span_cap, W + (long long)(r0 + k) * row_bytes + (long long)b0 * BB, nblk * BB, lane);
    }
    // the bias and residual of the rows this lane writes (lane 0 of a row's first warp), read early
    // (the bias, a weight, before pdl_wait; the residual after it, beside the staging) so that no load
    // waits at the end
    bool writes = lane == 0 && part == 0;
    float bias_k[RPW_MAX], res_k[RPW_MAX];
#pragma unroll
    for (int k = 0; k < RPW_MAX; k++) bias_k[k] = bias && writes && k < rpw && r0 + k < nrows ? bias[r0 + k] : 0.0f;
    pdl_wait();
#pragma unroll
    for (int k = 0; k < RPW_MAX; k++) res_k[k] = res && writes && k < rpw && r0 + k < nrows ? res[r0 + k] : 0.0f;
    stage_x_any<Q8>(smem, x, ncols, norm_w, eps, shd);
    cp_async_wait_all();
    __syncthreads();
    float nsc = Q8 ? norm_scale_deferred(norm_w, shd, ncols, eps) : 1.0f;  // the int8 x's norm scale
    // Σ over this lane's chunks c (lane, lane + 32, …) of dq16(row k, c) · x chunk c, for each row
    float acc[RPW_MAX];
#pragma unroll
    for (int k = 0; k < RPW_MAX; k++) acc[k] = 0.0f;
    int nc = nblk * CPB, c0 = b0 * CPB;  // c0: the run's first chunk in the row
    const float* xp = (const float*)smem + b0 * block_elems(TY);  // f32 x of the run (not Q8)
    for (int c = lane; c < nc; c += 32) {
        if constexpr (Q8) {
#pragma unroll
            for (int k = 0; k < RPW_MAX; k++)
                if (k < rpw && r0 + k < nrows) acc[k] += q8_chunk<TY>(span[k], c, smem, ncols, c0 + c);
        } else {
            const float4* x4 = (const float4*)(xp + 16 * c);
            float4 xv[4] = {x4[0], x4[1], x4[2], x4[3]};
#pragma unroll
            for (int k = 0; k < RPW_MAX; k++) {
                if (k < rpw && r0 + k < nrows) {
                    float w[16];
                    dq16<TY>(span[k], c, 0, w);
                    acc[k] += dot16(w, xv);
                }
            }
        }
    }
#pragma unroll
    for (int k = 0; k < RPW_MAX; k++) acc[k] = warp_sum(acc[k]);
    if (wpr > 1) {  // rpw = 1: add the parts of the row
        if (lane == 0) red[warp] = acc[0];
        __syncthreads();
        if (part != 0) return;
        for (int i = 1; i < wpr; i++) acc[0] += red[warp + i];
    }
    if (lane != 0) return;
#pragma unroll
    for (int k = 0; k < RPW_MAX; k++) {
        int r = r0 + k;
        if (k < rpw && r < nrows) {
            float v = Q8 ? acc[k] * nsc : acc[k];
            if (y_raw) y_raw[r] = v;
            if (bias) v += bias_k[k];
            if (res) v += res_k[k];
            y[r] = v;
        }
    }
}

// matvec_swiglu_impl for T = 1 and a block format, staged: one warp per row of G and U.
// Dynamic shared memory: the x area (x_area_bytes<Q8>), then 8 × 2 areas of span_cap.
template <int TY, bool Q8 = false>
__device__ void matvec_swiglu1_staged_impl(const u8* __restrict__ G, const u8* __restrict__ U, long long row_bytes,
                                           int nrows, int ncols, const float* __restrict__ x,
                                           float* __restrict__ s_out, float* __restrict__ g_out,
                                           float* __restrict__ u_out, int span_cap,
                                           const float* __restrict__ norm_w, float eps) {
    extern __shared__ __align__(16) u8 smem[];
    __shared__ double shd[32];
    constexpr int BB = block_bytes(TY), CPB = block_elems(TY) / 16;
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int r = blockIdx.x * 8 + warp;
    bool live = r < nrows;
    int nb = ncols / block_elems(TY);
    u8* area = smem + x_area_bytes<Q8>(ncols) + 2 * warp * span_cap;
    const u8* gs = area;
    const u8* us = area + span_cap;
    if (live) {
        gs = stage_span(area, G + (long long)r * row_bytes, nb * BB, lane);
        us = stage_span(area + span_cap, U + (long long)r * row_bytes, nb * BB, lane);
    }
    pdl_wait();
    stage_x_any<Q8>(smem, x, ncols, norm_w, eps, shd);
    cp_async_wait_all();
    __syncthreads();
    if (!live) return;
    float g, u;
    if constexpr (Q8) {  // both rows in one loop: each chunk's int8 x read once
        float ag = 0.0f, au = 0.0f;
        for (int c = lane; c < nb * CPB; c += 32) {
            ag += q8_chunk<TY>(gs, c, smem, ncols, c);
            au += q8_chunk<TY>(us, c, smem, ncols, c);
        }
        float nsc = norm_scale_deferred(norm_w, shd, ncols, eps);
        g = warp_sum(ag) * nsc;
        u = warp_sum(au) * nsc;
    } else {  // one row after the other (both in one loop would spill at 48 registers)
        g = warp_sum(dot_staged<TY>(gs, nb * CPB, (const float*)smem, lane));
        u = warp_sum(dot_staged<TY>(us, nb * CPB, (const float*)smem, lane));
    }
    if (lane == 0) {
        if (g_out) g_out[r] = g;
        if (u_out) u_out[r] = u;
        s_out[r] = g / (1.0f + expf(-g)) * u;
    }
}

#define STAMP_STAGED(NAME, TY)                                                                            \
    extern "C" __global__ void __launch_bounds__(256, 4) matvec1s_##NAME(const u8* W, long long rb, int nr, int nc, \
                                              const float* x, float* y, const float* b, const float* res, \
                                              float* y_raw, int wpr, int rpw, int span_cap, const float* nw, \
                                              float eps) {                                                 \
        matvec1_staged_impl<TY, MV_RPW>(W, rb, nr, nc, x, y, b, res, y_raw, wpr, rpw, span_cap, nw, eps, blockIdx.x); \
    }                                                                                                     \
    extern "C" __global__ void __launch_bounds__(256, 5) matvec_swiglu1s_##NAME(const u8* G, const u8* U, long long rb, \
                                              int nr, int nc, const float* x, float* s, float* g, float* u, \
                                              int span_cap, const float* nw, float eps) {                 \
        matvec_swiglu1_staged_impl<TY>(G, U, rb, nr, nc, x, s, g, u, span_cap, nw, eps);                  \
    }                                                                                                     \
    /* the same two with int8 activations (the shipped tier's decode arithmetic) */                      \
    extern "C" __global__ void __launch_bounds__(256, 4) matvec1q_##NAME(const u8* W, long long rb, int nr, int nc, \
                                              const float* x, float* y, const float* b, const float* res, \
                                              float* y_raw, int wpr, int rpw, int span_cap, const float* nw, \
                                              float eps) {                                                 \
        matvec1_staged_impl<TY, MV_RPW, true>(W, rb, nr, nc, x, y, b, res, y_raw, wpr, rpw, span_cap, nw, eps, blockIdx.x); \
    }                                                                                                     \
    extern "C" __global__ void __launch_bounds__(256, 5) matvec_swiglu1q_##NAME(const u8* G, const u8* U, long long rb, \
                                              int nr, int nc, const float* x, float* s, float* g, float* u, \
                                              int span_cap, const float* nw, float eps) {                 \
        matvec_swiglu1_staged_impl<TY, true>(G, U, rb, nr, nc, x, s, g, u, span_cap, nw, eps);            \
    }

STAMP_STAGED(q4_0, GT_Q4_0)
STAMP_STAGED(q4_1, GT_Q4_1)
STAMP_STAGED(q5_0, GT_Q5_0)
STAMP_STAGED(q8_0, GT_Q8_0)
STAMP_STAGED(q4_k, GT_Q4_K)
STAMP_STAGED(q6_k, GT_Q6_K)

// Up to three staged matvecs sharing x, in one launch (a decode step's Q, K and V projections, whose
// formats may differ): blocks [0, ⌈rows0 / 8⌉) take matrix 0, the next ⌈rows1 / 8⌉ matrix 1, the
// rest matrix 2; one warp per row (wpr = rpw = 1), no residual. Each matrix: weights W_k (format
// ty_k, a block format), rb_k bytes per row, rows_k rows; y_k = W_k x (+ bias_k), raw_k = W_k x
// when given. Dynamic shared memory as matvec1s with span_cap ≥ each matrix's row span. Q8: x in
// int8 (matvec1q_multi).
template <int TY, bool Q8>
__device__ __forceinline__ void matvec1_staged_seg(const u8* W, long long rb, int nr, int nc, const float* x,
                                                   float* y, const float* b, float* raw, int span_cap,
                                                   const float* nw, float eps, int block) {
    matvec1_staged_impl<TY, 1, Q8>(W, rb, nr, nc, x, y, b, nullptr, raw, 1, 1, span_cap, nw, eps, block);
}
template <bool Q8>
__device__ __forceinline__ void matvec1_multi_impl(
    const u8* W0, long long rb0, int rows0, int ty0, float* y0, const float* b0, float* raw0,
    const u8* W1, long long rb1, int rows1, int ty1, float* y1, const float* b1, float* raw1,
    const u8* W2, long long rb2, int rows2, int ty2, float* y2, const float* b2, float* raw2,
    int ncols, const float* x, int span_cap, const float* nw, float eps) {
    int blk = blockIdx.x, n0 = (rows0 + 7) / 8, n1 = (rows1 + 7) / 8;
    const u8* W = W0; long long rb = rb0; int nr = rows0, ty = ty0; float* y = y0; const float* b = b0; float* raw = raw0;
    if (blk >= n0 + n1) {
        blk -= n0 + n1; W = W2; rb = rb2; nr = rows2; ty = ty2; y = y2; b = b2; raw = raw2;
    } else if (blk >= n0) {
        blk -= n0; W = W1; rb = rb1; nr = rows1; ty = ty1; y = y1; b = b1; raw = raw1;
    }
    switch (ty) {  // uniform over the block
        case GT_Q4_0: matvec1_staged_seg<GT_Q4_0, Q8>(W, rb, nr, ncols, x, y, b, raw, span_cap, nw, eps, blk); break;
        case GT_Q4_1: matvec1_staged_seg<GT_Q4_1, Q8>(W, rb, nr, ncols, x, y, b, raw, span_cap, nw, eps, blk); break;
        case GT_Q5_0: matvec1_staged_seg<GT_Q5_0, Q8>(W, rb, nr, ncols, x, y, b, raw, span_cap, nw, eps, blk); break;
        case GT_Q8_0: matvec1_staged_seg<GT_Q8_0, Q8>(W, rb, nr, ncols, x, y, b, raw, span_cap, nw, eps, blk); break;
        case GT_Q4_K: matvec1_staged_seg<GT_Q4_K, Q8>(W, rb, nr, ncols, x, y, b, raw, span_cap, nw, eps, blk); break;
        case GT_Q6_K: matvec1_staged_seg<GT_Q6_K, Q8>(W, rb, nr, ncols, x, y, b, raw, span_cap, nw, eps, blk); break;
    }
}
#define STAMP_MULTI(NAME, Q8)                                                                             \
    extern "C" __global__ void __launch_bounds__(256, 4) NAME(                                           \
        const u8* W0, long long rb0, int rows0, int ty0, float* y0, const float* b0, float* raw0,       \
        const u8* W1, long long rb1, int rows1, int ty1, float* y1, const float* b1, float* raw1,       \
        const u8* W2, long long rb2, int rows2, int ty2, float* y2, const float* b2, float* raw2,       \
        int ncols, const float* x, int span_cap, const float* nw, float eps) {                          \
        matvec1_multi_impl<Q8>(W0, rb0, rows0, ty0, y0, b0, raw0, W1, rb1, rows1, ty1, y1, b1, raw1,     \
                               W2, rb2, rows2, ty2, y2, b2, raw2, ncols, x, span_cap, nw, eps);          \
    }
STAMP_MULTI(matvec1s_multi, false)
STAMP_MULTI(matvec1q_multi, true)

// out[r][16c + j] for every chunk of every row (the f32 scratch that cuBLAS reads at prefill).
// Whole chunks of a row whose length is a multiple of 4 go out as four 16-byte stores (out is
// 16-byte aligned: a device allocation), which take a quarter of the store instructions of
// per-float stores; the values are the same.
template <int TY>
__device__ void dequant_impl(const u8* __restrict__ W, long long row_bytes, int nrows, int ncols,
                             float* __restrict__ out) {
    int nchunks = (ncols + 15) >> 4;
    long long total = (long long)nrows * nchunks;
    bool vec4 = (ncols & 3) == 0;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        int r = (int)(i / nchunks), c = (int)(i % nchunks);
        float w[16];
        dq16<TY>(W + r * row_bytes, c, ncols, w);
        float* o = out + (long long)r * ncols + 16 * c;
        if (vec4 && 16 * c + 16 <= ncols) {
            float4* o4 = (float4*)o;
#pragma unroll
            for (int j = 0; j < 4; j++) o4[j] = make_float4(w[4 * j], w[4 * j + 1], w[4 * j + 2], w[4 * j + 3]);
        } else {
#pragma unroll
            for (int j = 0; j < 16; j++)
                if (16 * c + j < ncols) o[j] = w[j];
        }
    }
}

// x[t] = table[tokens[t]] (ggml_get_rows); grid.y = T. Token ids are checked on the host.
template <int TY>
__device__ void get_rows_impl(const u8* __restrict__ table, long long row_bytes, int ncols,
                              const int* __restrict__ tokens, float* __restrict__ x) {
    int t = blockIdx.y;
    int nchunks = (ncols + 15) >> 4;
    const u8* row = table + (long long)tokens[t] * row_bytes;
    for (int c = blockIdx.x * blockDim.x + threadIdx.x; c < nchunks; c += gridDim.x * blockDim.x) {
        float w[16];
        dq16<TY>(row, c, ncols, w);
        float* o = x + (long long)t * ncols + 16 * c;
#pragma unroll
        for (int j = 0; j < 16; j++)
            if (16 * c + j < ncols) o[j] = w[j];
    }
}

#define STAMP(NAME, TY)                                                                                   \
    extern "C" __global__ void matvec_##NAME(const u8* W, long long rb, int nr, int nc, const float* x,   \
                                             int T, float* y, const float* b, const float* res,         \
                                             float* y_raw, int wpr, const float* nw, float eps) {          \
        matvec_impl<TY, MV_MAX_T>(W, rb, nr, nc, x, T, y, b, res, y_raw, wpr, nw, eps);                            \
    }                                                                                                     \
    extern "C" __global__ void __launch_bounds__(256, 4) matvec1_##NAME(const u8* W, long long rb, int nr, int nc, const float* x,  \
                                              int T, float* y, const float* b, const float* res,        \
                                              float* y_raw, int wpr, const float* nw, float eps) {         \
        matvec_impl<TY, 1>(W, rb, nr, nc, x, T, y, b, res, y_raw, wpr, nw, eps);                                   \
    }                                                                                                     \
    extern "C" __global__ void matvec_swiglu_##NAME(const u8* G, const u8* U, long long rb, int nr,      \
                                                    int nc, const float* x, int T, float* s, float* g,   \
                                                    float* u, const float* nw, float eps) {               \
        matvec_swiglu_impl<TY, MV_MAX_T>(G, U, rb, nr, nc, x, T, s, g, u, nw, eps);                                \
    }                                                                                                     \
    extern "C" __global__ void __launch_bounds__(256, 4) matvec_swiglu1_##NAME(const u8* G, const u8* U, long long rb, int nr,     \
                                                     int nc, const float* x, int T, float* s, float* g,  \
                                                     float* u, const float* nw, float eps) {              \
        matvec_swiglu_impl<TY, 1>(G, U, rb, nr, nc, x, T, s, g, u, nw, eps);                                       \
    }                                                                                                     \
    extern "C" __global__ void dequant_##NAME(const u8* W, long long rb, int nr, int nc, float* out) {   \
        dequant_impl<TY>(W, rb, nr, nc, out);                                                             \
    }                                                                                                     \
    extern "C" __global__ void get_rows_##NAME(const u8* W, long long rb, int nc, const int* tok,        \
                                               float* x) {                                                \
        get_rows_impl<TY>(W, rb, nc, tok, x);                                                             \
    }

STAMP(f32, GT_F32)
STAMP(f16, GT_F16)
STAMP(q4_0, GT_Q4_0)
STAMP(q4_1, GT_Q4_1)
STAMP(q5_0, GT_Q5_0)
STAMP(q8_0, GT_Q8_0)
STAMP(q4_k, GT_Q4_K)
STAMP(q6_k, GT_Q6_K)
