// Row and element-wise operations. CPU twins: engine/src/cpu/ops.rs (rmsnorm, mul_rows, add,
// add_bias, swiglu, rope) and engine/src/cpu/attention.rs (kv_write).

// RMSNorm of each row of x `[rows][n]` (one block per row): y_norm = x / sqrt(mean(x²) + eps)
// (optional output, the `norm` tap), y = y_norm · w. Sum of squares in f64 like the CPU twin.
extern "C" __global__ void rmsnorm_f32(const float* __restrict__ x, const float* __restrict__ w,
                                       float* __restrict__ y_norm, float* __restrict__ y, int n, float eps) {
    __shared__ double sh[32];
    const float* xr = x + (long long)blockIdx.x * n;
    float scale = row_rms_scale(xr, n, eps, sh);
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        float v = xr[i] * scale;
        if (y_norm) y_norm[(long long)blockIdx.x * n + i] = v;
        y[(long long)blockIdx.x * n + i] = v * w[i];
    }
}

// Fault injection (engine/src/faults.rs, f16-accumulation): rmsnorm_f32 with its sum of squares
// saturating at 65504 as an f16 accumulator does (the squares are non-negative: min(Σx², 65504)).
extern "C" __global__ void rmsnorm_f16sat_f32(const float* __restrict__ x, const float* __restrict__ w,
                                              float* __restrict__ y_norm, float* __restrict__ y, int n, float eps) {
    __shared__ double sh[32];
    const float* xr = x + (long long)blockIdx.x * n;
    double s = 0.0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        float v = xr[i];
        s += (double)(v * v);
    }
    s = block_sum_d(s, sh);
    s = fmin(s, 65504.0);
    float scale = rms_scale_of_sum(s, n, eps);
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        float v = xr[i] * scale;
        if (y_norm) y_norm[(long long)blockIdx.x * n + i] = v;
        y[(long long)blockIdx.x * n + i] = v * w[i];
    }
}

// y[i] = a[i] + (bias ? bias[i % nb] : 0) + (res ? res[i] : 0). y may alias a or res.
extern "C" __global__ void add_f32(const float* a, const float* __restrict__ bias, int nb, const float* res,
                                   float* y, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        float v = a[i];
        if (bias) v += bias[i % nb];
        if (res) v += res[i];
        y[i] = v;
    }
}

// s = silu(g) · u, silu(x) = x / (1 + e^(−x)).
extern "C" __global__ void swiglu_f32(const float* __restrict__ g, const float* __restrict__ u,
                                      float* __restrict__ s, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        float gv = g[i];
        s[i] = gv / (1.0f + expf(-gv)) * u[i];
    }
}

// Fault injection (gelu-activation): s = gelu(g) · u, GELU's tanh approximation as ggml_gelu.
extern "C" __global__ void gelu_mul_f32(const float* __restrict__ g, const float* __restrict__ u,
                                        float* __restrict__ s, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        float gv = g[i];
        s[i] = 0.5f * gv * (1.0f + tanhf(0.7978846f * (gv + 0.044715f * gv * gv * gv))) * u[i];
    }
}

// RoPE on q `[T][H][Dh]` (in place) and k `[T][Hkv][Dh]` (into k_out when given, for the tap) at
// positions pos[0] + t, then the KV-cache write: rotated k and v rows to kc/vc `[ctx][Hkv·Dh]` at
// row pos[0] + t. One thread per pair of dims
// (rotated or passed through), then one per element of v. Angles like ggml: θ₀ = p,
// θ_{i+1} = θ_i · theta_scale in f32. neox: pairs (i, i + n_rot/2), else (2i, 2i+1).
// pos lives in device memory so that a captured CUDA graph replays at the current position.
extern "C" __global__ void rope_store_f32(float* q, const float* __restrict__ k, float* __restrict__ k_out,
                                          const float* __restrict__ v,
                                          float* __restrict__ kc, float* __restrict__ vc,
                                          const int* __restrict__ pos, int T, int H, int Hkv, int Dh,
                                          int n_rot, float theta_scale, int neox) {
    int p0 = pos[0];
    int half = Dh / 2, nr2 = n_rot / 2;
    long long n_pairs = (long long)T * (H + Hkv) * half;
    long long n_v = (long long)T * Hkv * Dh;
    int kvd = Hkv * Dh;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n_pairs + n_v;
         i += (long long)gridDim.x * blockDim.x) {
        if (i < n_pairs) {
            int pi = (int)(i % half);
            long long th = i / half;
            int hh = (int)(th % (H + Hkv));
            int t = (int)(th / (H + Hkv));
            bool is_q = hh < H;
            long long ko = ((long long)t * Hkv + (hh - H)) * Dh;
            const float* base = is_q ? q + ((long long)t * H + hh) * Dh : k + ko;
            int a, b;
            float x0, x1, o0, o1;
            if (pi < nr2) {
                if (neox) { a = pi; b = pi + nr2; } else { a = 2 * pi; b = 2 * pi + 1; }
                float theta = (float)(p0 + t);
                for (int j = 0; j < pi; j++) theta *= theta_scale;
                float c = cosf(theta), s = sinf(theta);
                x0 = base[a];
                x1 = base[b];
                o0 = x0 * c - x1 * s;
                o1 = x0 * s + x1 * c;
            } else {
                a = n_rot + 2 * (pi - nr2);
                b = a + 1;
                o0 = base[a];
                o1 = base[b];
            }
            if (is_q) {
                float* qo = q + ((long long)t * H + hh) * Dh;
                qo[a] = o0;
                qo[b] = o1;
            } else {
                if (k_out) {
                    k_out[ko + a] = o0;
                    k_out[ko + b] = o1;
                }
                float* dst = kc + (long long)(p0 + t) * kvd + (hh - H) * Dh;
                dst[a] = o0;
                dst[b] = o1;
            }
        } else {
            long long j = i - n_pairs;
            int t = (int)(j / kvd), e = (int)(j % kvd);
            vc[(long long)(p0 + t) * kvd + e] = v[j];
        }
    }
}
