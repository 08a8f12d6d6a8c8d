// Shared helpers, prepended by the Rust side to every kernels/*.cu before NVRTC compiles it
// (NVRTC has no file system include path here, so the sources are concatenated instead).
// The constants shared with Rust (GT_* type ids, MV_MAX_T, MV_RPW, ATTN_* fault bits) are defined in
// front of this by engine/src/cuda/device.rs `kernel_constants()`: their one home is the Rust side.
#define INFINITY __int_as_float(0x7f800000)

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;

// IEEE half bits → f32 (exact), without cuda_fp16.h.
__device__ __forceinline__ float h2f(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
// host-check begin: from here to "host-check end", plain C++ that engine/tests/kernels_host.rs also
// compiles for the CPU (with host versions of the CUDA intrinsics) to hold dq16 to the CPU twin.
// Little-endian u16 from a 2-byte-aligned address (every block field the kernels read this way is).
__device__ __forceinline__ u16 ld_u16(const u8* p) { return *(const u16*)p; }

// 16 bytes from any address as 4 little-endian words: aligned 4-byte loads and funnel shifts, so a
// lane issues 4 or 5 loads instead of 16 byte loads. Reads no byte past p + 15 rounded up to 4.
// The aligned address is p minus its low bits, not p's bits masked through an integer: a pointer
// rebuilt from an integer loses its address space, and the loads from a shared-memory staging area
// became generic loads (LD instead of LDS, and LD instead of LDG from global memory) in the SASS.
__device__ __forceinline__ void ld16(const u8* p, u32 out[4]) {
    const u32* b = (const u32*)(p - ((unsigned long long)p & 3));
    u32 sh = ((unsigned long long)p & 3) * 8;
    u32 w0 = b[0], w1 = b[1], w2 = b[2], w3 = b[3];
    u32 w4 = sh ? b[4] : 0u;
    out[0] = __funnelshift_r(w0, w1, sh);
    out[1] = __funnelshift_r(w1, w2, sh);
    out[2] = __funnelshift_r(w2, w3, sh);
    out[3] = __funnelshift_r(w3, w4, sh);
}
// The f32 value of n − off for byte k (0..3) of w, n = that byte, exactly what (float)((int)n − off)
// gives, without the integer → float conversion (I2F issues at 1/8 of the FMA rate on sm_90, and
// dequantization converts every weight): the float with bits 0x4B000000 | n is 2^23 + n, and one byte
// permute builds it (the four elements of a word each take one, instead of a shift and a mask each:
// measured on the sm_90 SASS, the q5_0 gate/up loop went from 223 to 132 instructions per 16 weights).
// k is a constant once the callers' loops are unrolled.
__device__ __forceinline__ float byte_int_f(u32 w, int k, int off) {
    return __int_as_float(__byte_perm(w, 0x4B000000u, 0x7540u | (u32)k)) - (8388608.0f + (float)off);
}
// Bits 0..3 of b moved to bit 4 of bytes 0..3 (the fifth bit of a Q5 word's four elements): the four
// shifted copies of b do not overlap, so the product has no carries.
__device__ __forceinline__ u32 spread4_bit4(u32 b) { return ((b * 0x00204081u) & 0x01010101u) << 4; }
// host-check end

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
__device__ __forceinline__ double warp_sum_d(double v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
// Block-wide sum in f64 (blockDim.x a multiple of 32, at most 1024). Every thread gets the result.
__device__ double block_sum_d(double v, double* sh /* [32] */) {
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_sum_d(v);
    __syncthreads();
    if (lane == 0) sh[w] = v;
    __syncthreads();
    v = lane < nw ? sh[lane] : 0.0;
    v = warp_sum_d(v);
    return v;
}

// 1 / sqrt(mean(x²) + eps) from the f64 sum of squares of n values: the mean rounded to f32 first,
// as ggml does; every RMSNorm of the kernels ends here.
__device__ __forceinline__ float rms_scale_of_sum(double sum_sq, int n, float eps) {
    return 1.0f / sqrtf((float)(sum_sq / (double)n) + eps);
}

// RMSNorm scale of one row, 1 / sqrt(mean(x²) + eps), with the sum of squares in f64 over the block
// (thread i takes elements i, i + blockDim.x, …): the same arithmetic in rmsnorm_f32 and in the fused
// matvecs, so both give the same bits. Every thread of the block must call it.
__device__ float row_rms_scale(const float* xr, int n, float eps, double* sh /* [32] */) {
    double s = 0.0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        float v = xr[i];
        s += (double)(v * v);
    }
    return rms_scale_of_sum(block_sum_d(s, sh), n, eps);
}

// Programmatic dependent launch (sm_90+; Gpu::launch_pdl in engine/src/cuda/device.rs). A PDL-aware
// kernel may start while the previous kernel of its stream still runs: it first fetches what no
// kernel of the step writes (its weights; the decode attention also the position and the cache rows of
// earlier steps), then calls pdl_wait before it reads anything a kernel of the step writes
// (activations, this step's cache row) and before it writes anything. (What comes before the step's
// first kernel is complete by then: a kernel starts only once the one before it has passed its own
// pdl_wait, so once the one before that has completed, and so on back to the step's first kernel,
// which is launched without PDL after the step's host copies.) pdl_wait returns when the previous
// kernel has completed and its writes are visible; then it lets the next kernel launch, so that one
// fetches its weights while this one computes. Letting it launch only after the wait keeps the
// look-ahead to one kernel: let go at the start, every kernel of a decode step could launch at once,
// each holding SM resources while it waits (on the H100 smollm2-135m's tg128 fell from 1,450 to
// 1,270 t/s that way). Launched without the attribute, or below sm_90, pdl_wait is a no-op and
// the stream orders kernels as usual.
__device__ __forceinline__ void pdl_wait() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Asks L2 for the 128-byte line holding p (data a kernel reads later); no-op below sm_80 and on the
// host.
__device__ __forceinline__ void prefetch_l2(const void* p) {
#if __CUDA_ARCH__ >= 800
    asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
#endif
}
