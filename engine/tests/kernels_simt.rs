//! The CUDA kernels run whole on the CPU: kernels/quant.cu (the staged decode matvecs, f32 and int8,
//! the T ≤ 8 matvecs, gate/up/SwiGLU, dequantization, embedding rows), ops.cu (RMSNorm, its f16
//! fault, add, SwiGLU, the GELU fault, RoPE + KV write) and attention.cu (prefill and decode
//! attention with their faults), compiled from the very sources with the system C++ compiler and a
//! small SIMT model: a block's threads are fibers (ucontext) taking turns on one OS thread,
//! `__syncthreads` a barrier of the block, warp shuffles a barrier of the warp's 32 threads around
//! a shared slot, a `__shared__` variable a static (blocks run one after another), the dynamic
//! shared memory one static buffer (160 KiB, so that any launch plan fits) filled with garbage
//! before each block, cp.async the kernels' own pre-sm_80 copy, CUDA's vector types with their
//! alignments (UndefinedBehaviorSanitizer stops a misaligned vector load, which faults on a GPU).
//! What the GPU does differently (timing, PDL) does not change what these kernels compute, so their
//! outputs must match the CPU
//! twins here as in cuda_kernels on a GPU, with the launches ops.rs and attn_decode.rs make (grid,
//! block, shared memory and arguments written out again below, each kernel's parameter list checked
//! against the arguments when it is called). So a wrong index, shared-memory layout, reduction or
//! formula in a kernel fails in the CPU test run, not only on a GPU machine.
//!
//! Without a C++ compiler (CXX, else c++, g++ or clang++ on PATH) the trials are ignored, saying so.

mod cuda_common;
mod host_cxx;
mod twins;

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

use cuda_common::{bit_equal, check_close, check_close_nonfinite, check_gate_up_swiglu};
use libtest_mimic::{Arguments, Failed, Trial};
use lockstep_engine::cpu::attention::AttnDims;
use lockstep_engine::cpu::ops::{self as cpu, Matrix, RopeStyle};
use lockstep_engine::cuda::attn_decode::DECODE_SMEM_SCORES;
use lockstep_engine::cuda::ops::AttnFault;
use lockstep_engine::dequant;
use lockstep_engine::faults::{self, Fault};
use lockstep_engine::gguf::GgmlType;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const COMMON: &str = include_str!("../../kernels/common.cuh");
const QUANT: &str = include_str!("../../kernels/quant.cu");

/// The SIMT model (see the module comment). `simt_launch(gx, gy, block, f)` runs `f` on every
/// thread of every block, the blocks one after another; a thread that returns early must not be waited
/// for at a barrier after that (the staged kernels return only past their last one; a barrier
/// that waits for a finished thread never opens, and the trial hangs rather than pass).
/// Hand-written: no crate runs CUDA C++ on the CPU, and the kernels need only this much.
const SIMT: &str = r#"
#include <algorithm>
#include <functional>
#include <string>
#include <ucontext.h>
using std::max;
using std::min;
#define __global__
#define __launch_bounds__(a, b)
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ static
struct simt_dim { unsigned x = 0, y = 0, z = 0; };
static simt_dim threadIdx, blockIdx, blockDim, gridDim;  // threadIdx: the running fiber's
// CUDA's alignments (a vector load from an address not a multiple of them faults on the GPU; here
// UndefinedBehaviorSanitizer's alignment check stops the program instead)
struct alignas(16) int4 { int x, y, z, w; };
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(8) uint2 { unsigned x, y; };
struct alignas(8) float2 { float x, y; };
static inline float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }
static inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return {a, b, c, d}; }
static inline uint2 make_uint2(unsigned a, unsigned b) { return {a, b}; }
static inline float2 make_float2(float a, float b) { return {a, b}; }
static inline float __fmaf_rn(float a, float b, float c) { return std::fmaf(a, b, c); }
static u8 simt_dyn_smem[160 * 1024] __attribute__((aligned(16)));
// Fibers: one per thread of the block, run in turn by simt_launch on one OS thread; a fiber gives
// the turn back only when it waits at a barrier (or ends).
struct simt_fiber { ucontext_t ctx; std::vector<char> stack; bool done; };
static ucontext_t simt_sched;
static std::vector<simt_fiber> simt_fibers;
static unsigned simt_cur;
static std::function<void()> simt_kernel;
static inline void simt_yield() { swapcontext(&simt_fibers[simt_cur].ctx, &simt_sched); }
// barrier 0: the block's threads; barrier 1 + w: warp w's 32 lanes
static unsigned simt_arrived[33], simt_gen[33];
static inline void simt_barrier(int id, unsigned n) {
    unsigned gen = simt_gen[id];
    if (++simt_arrived[id] == n) {
        simt_arrived[id] = 0;
        simt_gen[id]++;
    } else {
        while (simt_gen[id] == gen) simt_yield();
    }
}
static inline void __syncthreads() { simt_barrier(0, blockDim.x); }
static inline void __syncwarp(unsigned = 0xffffffffu) { simt_barrier(1 + (threadIdx.x >> 5), 32); }
static unsigned long long simt_slot[32][32];
template <class T> static inline T __shfl_xor_sync(unsigned, T v, int o) {
    unsigned w = threadIdx.x >> 5, l = threadIdx.x & 31;
    std::memcpy(&simt_slot[w][l], &v, sizeof(T));
    simt_barrier(1 + w, 32);
    T r;
    std::memcpy(&r, &simt_slot[w][l ^ o], sizeof(T));
    simt_barrier(1 + w, 32);
    return r;
}
static void simt_entry() {
    simt_kernel();
    simt_fibers[simt_cur].done = true;
}
template <class F> static void simt_launch(unsigned gx, unsigned gy, unsigned block, F kernel) {
    blockDim = {block, 1, 1};
    gridDim = {gx, gy, 1};
    simt_kernel = kernel;
    simt_fibers.resize(block);
    for (auto& f : simt_fibers) f.stack.resize(256 * 1024);
    for (unsigned by = 0; by < gy; by++)
        for (unsigned bx = 0; bx < gx; bx++) {
            std::memset(simt_dyn_smem, 0xCD, sizeof simt_dyn_smem);
            std::memset(simt_arrived, 0, sizeof simt_arrived);
            blockIdx = {bx, by, 0};
            for (unsigned t = 0; t < block; t++) {
                simt_fiber& f = simt_fibers[t];
                getcontext(&f.ctx);
                f.ctx.uc_stack.ss_sp = f.stack.data();
                f.ctx.uc_stack.ss_size = f.stack.size();
                f.ctx.uc_link = &simt_sched;
                makecontext(&f.ctx, simt_entry, 0);
                f.done = false;
            }
            for (bool live = true; live;) {
                live = false;
                for (unsigned t = 0; t < block; t++) {
                    if (simt_fibers[t].done) continue;
                    live = true;
                    simt_cur = t;
                    threadIdx = {t, 0, 0};
                    swapcontext(&simt_sched, &simt_fibers[t].ctx);
                }
            }
        }
}
"#;

/// Runs one kernel launch described in DIR/call.txt: the kernel's name, then `grid_x grid_y block`,
/// then one argument a line: `b ID` (buffer DIR/bID.bin, written back to DIR/bID.out after the
/// launch), `n` (null pointer), `i V` (int), `l V` (long long), `f BITS` (float, its bits). Each
/// buffer is 256-byte aligned with 16 bytes of zeros after it (QMat::upload's padding). The kernel
/// is looked up by name; its parameter list must take the arguments in number and kind.
const MAIN: &str = r#"
#include <map>
#include <string>
#include <utility>
struct simt_arg {
    char kind;
    void* p;
    long long v;
    template <class T> operator T*() const { if (kind != 'b' && kind != 'n') simt_fail("a pointer"); return (T*)p; }
    operator int() const { if (kind != 'i') simt_fail("an int"); return (int)v; }
    operator long long() const { if (kind != 'l') simt_fail("a long long"); return v; }
    operator float() const { if (kind != 'f') simt_fail("a float"); float f; u32 b = (u32)v; std::memcpy(&f, &b, 4); return f; }
    void simt_fail(const char* want) const { fprintf(stderr, "argument of kind '%c' where the kernel takes %s\n", kind, want); exit(7); }
};
template <class... P, size_t... I> static void simt_apply(void (*f)(P...), const std::vector<simt_arg>& a, std::index_sequence<I...>) { f(a[I]...); }
template <class... P> static std::function<void(const std::vector<simt_arg>&, unsigned, unsigned, unsigned)> simt_entry_of(void (*f)(P...)) {
    return [f](const std::vector<simt_arg>& a, unsigned gx, unsigned gy, unsigned block) {
        if (a.size() != sizeof...(P)) { fprintf(stderr, "%zu arguments for a kernel of %zu parameters\n", a.size(), sizeof...(P)); exit(7); }
        simt_launch(gx, gy, block, [&] { simt_apply(f, a, std::index_sequence_for<P...>{}); });
    };
}
#define K(NAME) {#NAME, simt_entry_of(NAME)},
#define KQ(NAME, TY) K(matvec_##NAME) K(matvec1_##NAME) K(matvec_swiglu_##NAME) K(matvec_swiglu1_##NAME) K(dequant_##NAME) K(get_rows_##NAME)
#define KS(NAME, TY) K(matvec1s_##NAME) K(matvec_swiglu1s_##NAME) K(matvec1q_##NAME) K(matvec_swiglu1q_##NAME)
int main(int argc, char** argv) {
    if (argc != 2) return 2;
    std::string dir = argv[1];
    std::map<std::string, std::function<void(const std::vector<simt_arg>&, unsigned, unsigned, unsigned)>> kernels = {
        KQ(f32, 0) KQ(f16, 1) KQ(q4_0, 0) KQ(q4_1, 0) KQ(q5_0, 0) KQ(q8_0, 0) KQ(q4_k, 0) KQ(q6_k, 0)
        KS(q4_0, 0) KS(q4_1, 0) KS(q5_0, 0) KS(q8_0, 0) KS(q4_k, 0) KS(q6_k, 0)
        K(matvec1s_multi) K(matvec1q_multi)
        K(rmsnorm_f32) K(rmsnorm_f16sat_f32) K(add_f32) K(swiglu_f32) K(gelu_mul_f32) K(rope_store_f32)
        K(attention_f32) K(attention_decode_f32)
    };
    FILE* f = fopen((dir + "/call.txt").c_str(), "r");
    if (!f) return 3;
    char name[128];
    unsigned gx, gy, block;
    if (fscanf(f, "%127s %u %u %u", name, &gx, &gy, &block) != 4) return 3;
    std::vector<simt_arg> args;
    std::map<int, std::pair<void*, size_t>> bufs;  // a buffer given twice is one allocation (aliasing)
    char kind;
    while (fscanf(f, " %c", &kind) == 1) {
        simt_arg a{kind, nullptr, 0};
        if (kind == 'b') {
            int id;
            if (fscanf(f, "%d", &id) != 1) return 3;
            if (bufs.count(id)) {
                a.p = bufs[id].first;
                args.push_back(a);
                continue;
            }
            FILE* b = fopen((dir + "/b" + std::to_string(id) + ".bin").c_str(), "rb");
            if (!b) return 3;
            fseek(b, 0, SEEK_END);
            size_t n = ftell(b);
            fseek(b, 0, SEEK_SET);
            size_t cap = (n + 16 + 255) / 256 * 256;
            a.p = std::aligned_alloc(256, cap);
            std::memset(a.p, 0, cap);
            if (n && fread(a.p, 1, n, b) != n) return 3;
            fclose(b);
            bufs[id] = {a.p, n};
        } else if (kind != 'n') {
            if (fscanf(f, "%lld", &a.v) != 1) return 3;
        }
        args.push_back(a);
    }
    fclose(f);
    auto k = kernels.find(name);
    if (k == kernels.end()) { fprintf(stderr, "no kernel %s\n", name); return 4; }
    k->second(args, gx, gy, block);
    for (auto& [id, buf] : bufs) {
        FILE* o = fopen((dir + "/b" + std::to_string(id) + ".out").c_str(), "wb");
        if (!o || (buf.second && fwrite(buf.first, 1, buf.second, o) != buf.second)) return 5;
        fclose(o);
    }
    return 0;
}
"#;

const OPS: &str = include_str!("../../kernels/ops.cu");
const ATTENTION: &str = include_str!("../../kernels/attention.cu");

/// The kernel sources as the host compiles them, in one unit: h2f's PTX and the INFINITY macro give
/// way to INTRINSICS' versions, each `extern __shared__` array is SIMT's buffer.
fn host_sources() -> Result<String, String> {
    let h2f_at = COMMON.find("__device__ __forceinline__ float h2f(u16 h) {").ok_or("kernels/common.cuh: no h2f")?;
    let h2f_end = h2f_at + COMMON[h2f_at..].find("\n}\n").ok_or("kernels/common.cuh: h2f has no end")? + 3;
    let common = format!("{}{}", &COMMON[..h2f_at], &COMMON[h2f_end..]).replace("#define INFINITY __int_as_float(0x7f800000)", "");
    let mut kernels = String::new();
    for (file, src) in [("quant.cu", QUANT), ("ops.cu", OPS), ("attention.cu", ATTENTION)] {
        let src = src
            .replace("extern __shared__ __align__(16) u8 smem[];", "u8* smem = simt_dyn_smem;")
            .replace("extern __shared__ float qs[];", "float* qs = (float*)simt_dyn_smem;")
            .replace("extern __shared__ float smem[];", "float* smem = (float*)simt_dyn_smem;");
        if let Some(at) = src.find("extern __shared__") {
            let line = src[at..].lines().next().unwrap_or_default();
            return Err(format!("kernels/{file}: `{line}`: a dynamic shared-memory declaration kernels_simt.rs does not map"));
        }
        kernels += &format!("// ---- kernels/{file}\n{src}\n");
    }
    Ok(format!("{}\n{}\n{SIMT}\n{common}\n{kernels}\n{MAIN}", lockstep_engine::cuda::device::kernel_constants(), host_cxx::INTRINSICS))
}

fn program() -> &'static Result<PathBuf, String> {
    static PROGRAM: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    PROGRAM.get_or_init(|| host_cxx::build("kernels_simt", &host_sources()?, &["-std=c++17", "-O2", "-fsanitize=alignment", "-fno-sanitize-recover=alignment"]))
}

/// A kernel argument (device.rs `Arg`, with buffers by number).
#[derive(Clone, Copy)]
enum A {
    Buf(usize),
    Null,
    I(i32),
    L(i64),
    F(f32),
}

/// Buffers in a directory, and launches of the SIMT program on them.
struct Sim {
    dir: tempfile::TempDir,
    n: usize,
}

impl Sim {
    fn new() -> Result<Sim, Failed> {
        Ok(Sim { dir: tempfile::tempdir().map_err(|e| e.to_string())?, n: 0 })
    }

    fn path(&self, id: usize, ext: &str) -> PathBuf {
        self.dir.path().join(format!("b{id}.{ext}"))
    }

    fn bytes(&mut self, b: &[u8]) -> Result<usize, Failed> {
        self.n += 1;
        std::fs::write(self.path(self.n, "bin"), b).map_err(|e| e.to_string())?;
        Ok(self.n)
    }

    fn f32s(&mut self, v: &[f32]) -> Result<usize, Failed> {
        self.bytes(&v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>())
    }

    fn i32s(&mut self, v: &[i32]) -> Result<usize, Failed> {
        self.bytes(&v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>())
    }

    /// `n` f32 of garbage (NaN bits): what a kernel must write before anyone reads it.
    fn out(&mut self, n: usize) -> Result<usize, Failed> {
        self.f32s(&vec![f32::from_bits(0x7fc0_dead); n])
    }

    /// One launch of `name` on `grid` blocks of `block` threads; every buffer it is given comes back.
    fn launch(&self, name: &str, grid: (u32, u32), block: u32, args: &[A]) -> Result<(), Failed> {
        let exe = program().as_ref().map_err(|e| e.clone())?;
        let mut call = format!("{name}\n{} {} {block}\n", grid.0, grid.1);
        for a in args {
            call += &match a {
                A::Buf(id) => format!("b {id}\n"),
                A::Null => "n\n".into(),
                A::I(v) => format!("i {v}\n"),
                A::L(v) => format!("l {v}\n"),
                A::F(v) => format!("f {}\n", v.to_bits()),
            };
        }
        std::fs::write(self.dir.path().join("call.txt"), call).map_err(|e| e.to_string())?;
        let out = Command::new(exe).arg(self.dir.path()).output().map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(format!("{name} on the SIMT model: {}: {}", out.status, String::from_utf8_lossy(&out.stderr)).into());
        }
        for a in args {
            if let A::Buf(id) = a {
                if self.path(*id, "out").exists() {
                    std::fs::rename(self.path(*id, "out"), self.path(*id, "bin")).map_err(|e| e.to_string())?;
                }
            }
        }
        Ok(())
    }

    fn get(&self, id: usize) -> Result<Vec<f32>, Failed> {
        let b = std::fs::read(self.path(id, "bin")).map_err(|e| e.to_string())?;
        Ok(b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
    }
}

fn randv(rng: &mut ChaCha8Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-1.0f32..1.0) * scale).collect()
}

/// A random `[rows][cols]` matrix of `ty` as its bytes and its CPU dequantization.
fn matrix(ty: GgmlType, rows: usize, cols: usize, seed: u64) -> Result<(Vec<u8>, Matrix), Failed> {
    let bytes = host_cxx::random_rows(ty, cols, rows, seed);
    let data = dequant::dequantize(ty, &bytes, rows * cols).map_err(|e| e.to_string())?;
    Ok((bytes, Matrix { rows, cols, data }))
}

fn suffix(ty: GgmlType) -> String {
    ty.to_string().to_lowercase()
}

fn row_bytes(ty: GgmlType, cols: usize) -> i64 {
    (cols / ty.block_size() * ty.type_size()) as i64
}

/// The x the kernels multiply by: x, RMS-normalised and scaled by nw when given, quantized to int8
/// per 32 values when q8 (with nw, the int8 kernels' deferred norm scale: twins::q8_normed).
fn kernel_x(x: &[f32], nw: Option<&[f32]>, q8: bool) -> Vec<f32> {
    match (nw, q8) {
        (Some(nw), true) => twins::q8_normed(x, nw, 1e-6),
        (Some(nw), false) => cpu::mul_rows(&cpu::rmsnorm(x, nw.len(), 1e-6), nw),
        (None, true) => cpu::quantize_q8(x),
        (None, false) => x.to_vec(),
    }
}

/// The staged kernels' `span_cap` as ops.rs staged_plan gives it: a staging area for a run of
/// ⌈blocks per row / wpr⌉ blocks (ops.rs staging_area: whole 16-byte pieces, up to 15 bytes either
/// side of the run).
fn span_cap(ty: GgmlType, cols: usize, wpr: usize) -> i32 {
    (((cols / ty.block_size()).div_ceil(wpr) * ty.type_size() + 15).div_ceil(16) * 16) as i32
}

/// `matvec1{s,q}_{ty}` with bias, residual and raw output, with and without the fused RMSNorm, for
/// launch plans of 1, 2, 4 and 8 warps a row and 1, 2 and 4 rows a warp (ops.rs staged_plan).
fn staged_matvec_case(ty: GgmlType, q8: bool) -> Result<(), Failed> {
    let (cols, rows) = (ty.block_size() * 9, 45);
    let mut rng = ChaCha8Rng::seed_from_u64(31 + ty.to_u32() as u64 + q8 as u64);
    let (bytes, m) = matrix(ty, rows, cols, 7)?;
    for (i, (wpr, rpw)) in [(1usize, 1usize), (1, 2), (1, 4), (2, 1), (4, 1), (8, 1)].into_iter().enumerate() {
        let norm = i % 2 == 0;
        let (x, nw) = (randv(&mut rng, cols, 2.0), randv(&mut rng, cols, 2.0));
        // two int8 plans on an x so small (amax < 1e-30) that stage_x_q8 scales it by 2^100 first
        let x: Vec<f32> = if q8 && (i == 3 || i == 4) { x.iter().map(|v| v * 1e-32).collect() } else { x };
        let (bias, res) = (randv(&mut rng, rows, 1.0), randv(&mut rng, rows, 1.0));
        let mut sim = Sim::new()?;
        let (w, xb, nwb, bb, rb) = (sim.bytes(&bytes)?, sim.f32s(&x)?, sim.f32s(&nw)?, sim.f32s(&bias)?, sim.f32s(&res)?);
        let (y, raw) = (sim.out(rows)?, sim.out(rows)?);
        let name = format!("matvec1{}_{}", if q8 { "q" } else { "s" }, suffix(ty));
        let grid = rows.div_ceil(8 / wpr * rpw) as u32;
        let args = [A::Buf(w), A::L(row_bytes(ty, cols)), A::I(rows as i32), A::I(cols as i32), A::Buf(xb), A::Buf(y), A::Buf(bb), A::Buf(rb), A::Buf(raw)];
        let plan = [A::I(wpr as i32), A::I(rpw as i32), A::I(span_cap(ty, cols, wpr)), if norm { A::Buf(nwb) } else { A::Null }, A::F(1e-6)];
        sim.launch(&name, (grid, 1), 256, &[&args[..], &plan[..]].concat())?;
        let raw_want = cpu::matmul(&m, &kernel_x(&x, norm.then_some(&nw[..]), q8));
        let mut want = raw_want.clone();
        cpu::add_bias(&mut want, &bias);
        let want = cpu::add(&want, &res);
        let what = format!("{name} wpr {wpr} rpw {rpw} norm {norm}");
        check_close(&what, &sim.get(y)?, &want, 1e-5)?;
        check_close(&format!("{what} raw"), &sim.get(raw)?, &raw_want, 1e-5)?;
    }
    Ok(())
}

/// `matvec_swiglu1{s,q}_{ty}` with the fused RMSNorm: gate, up and silu(gate) · up.
fn staged_swiglu_case(ty: GgmlType, q8: bool) -> Result<(), Failed> {
    let (cols, rows) = (ty.block_size() * 5, 21);
    let mut rng = ChaCha8Rng::seed_from_u64(47 + ty.to_u32() as u64 + q8 as u64);
    let (x, nw) = (randv(&mut rng, cols, 2.0), randv(&mut rng, cols, 2.0));
    let ((bg, mg), (bu, mu)) = (matrix(ty, rows, cols, 11)?, matrix(ty, rows, cols, 12)?);
    let mut sim = Sim::new()?;
    let (gw, uw, xb, nwb) = (sim.bytes(&bg)?, sim.bytes(&bu)?, sim.f32s(&x)?, sim.f32s(&nw)?);
    let (s, g, u) = (sim.out(rows)?, sim.out(rows)?, sim.out(rows)?);
    let name = format!("matvec_swiglu1{}_{}", if q8 { "q" } else { "s" }, suffix(ty));
    let args = [
        A::Buf(gw),
        A::Buf(uw),
        A::L(row_bytes(ty, cols)),
        A::I(rows as i32),
        A::I(cols as i32),
        A::Buf(xb),
        A::Buf(s),
        A::Buf(g),
        A::Buf(u),
        A::I(span_cap(ty, cols, 1)),
        A::Buf(nwb),
        A::F(1e-6),
    ];
    sim.launch(&name, (rows.div_ceil(8) as u32, 1), 256, &args)?;
    let xk = kernel_x(&x, Some(&nw), q8);
    let (gv, uv) = (cpu::matmul(&mg, &xk), cpu::matmul(&mu, &xk));
    check_gate_up_swiglu(&name, [&sim.get(g)?, &sim.get(u)?, &sim.get(s)?], &gv, &uv)?;
    Ok(())
}

/// `matvec1{s,q}_multi`: three matrices of different formats and row counts, one x, RMSNorm fused.
fn staged_multi_case(q8: bool) -> Result<(), Failed> {
    let cols = 768;
    let specs = [(GgmlType::Q5_0, 37usize), (GgmlType::Q8_0, 8), (GgmlType::Q4_K, 13)];
    let mut rng = ChaCha8Rng::seed_from_u64(5150 + q8 as u64);
    let (x, nw) = (randv(&mut rng, cols, 3.0), randv(&mut rng, cols, 2.0));
    let mut sim = Sim::new()?;
    let (xb, nwb) = (sim.f32s(&x)?, sim.f32s(&nw)?);
    let (mut args, mut outs, mut cap, mut blocks) = (Vec::new(), Vec::new(), 0, 0);
    for (k, &(ty, rows)) in specs.iter().enumerate() {
        let (bytes, m) = matrix(ty, rows, cols, 13 + k as u64)?;
        let (w, y, raw) = (sim.bytes(&bytes)?, sim.out(rows)?, sim.out(rows)?);
        args.extend([A::Buf(w), A::L(row_bytes(ty, cols)), A::I(rows as i32), A::I(ty.to_u32() as i32), A::Buf(y), A::Null, A::Buf(raw)]);
        outs.push((ty, rows, m, y, raw));
        cap = cap.max(span_cap(ty, cols, 1));
        blocks += rows.div_ceil(8);
    }
    args.extend([A::I(cols as i32), A::Buf(xb), A::I(cap), A::Buf(nwb), A::F(1e-6)]);
    let name = if q8 { "matvec1q_multi" } else { "matvec1s_multi" };
    sim.launch(name, (blocks as u32, 1), 256, &args)?;
    let xk = kernel_x(&x, Some(&nw), q8);
    for (ty, rows, m, y, raw) in outs {
        let want = cpu::matmul(&m, &xk);
        check_close(&format!("{name} {ty} {rows} rows"), &sim.get(y)?, &want, 1e-5)?;
        check_close(&format!("{name} {ty} {rows} rows raw"), &sim.get(raw)?, &want, 1e-5)?;
    }
    Ok(())
}

/// The T ≤ 8 matvecs (`matvec_{ty}` for T = 3 and 8, `matvec1_{ty}` for T = 1; warps a row as
/// ops.rs picks them on a GPU of 132 SMs) with bias and residual, and `matvec_swiglu_{ty}` (T = 5)
/// with the fused RMSNorm, all formats; F32/F16 widths not a multiple of 16.
fn matvec_case(ty: GgmlType) -> Result<(), Failed> {
    let cols = if matches!(ty, GgmlType::F32 | GgmlType::F16) { 100 } else { ty.block_size() * 3 };
    let rows = 37;
    let mut rng = ChaCha8Rng::seed_from_u64(61 + ty.to_u32() as u64);
    let (bytes, m) = matrix(ty, rows, cols, 17)?;
    let (bytes2, m2) = matrix(ty, rows, cols, 18)?;
    for t in [1usize, 3, 8] {
        let (x, bias, res) = (randv(&mut rng, t * cols, 2.0), randv(&mut rng, rows, 1.0), randv(&mut rng, t * rows, 1.0));
        let mut sim = Sim::new()?;
        let (w, xb, bb, rb) = (sim.bytes(&bytes)?, sim.f32s(&x)?, sim.f32s(&bias)?, sim.f32s(&res)?);
        let (y, raw) = (sim.out(t * rows)?, sim.out(t * rows)?);
        let mut wpr = 1usize;
        while wpr < 8 && rows * wpr / 8 < 2 * 132 && 32 * wpr < cols.div_ceil(16) {
            wpr *= 2;
        }
        let name = format!("matvec{}_{}", if t == 1 { "1" } else { "" }, suffix(ty));
        let args = [
            &[A::Buf(w), A::L(row_bytes(ty, cols))][..],
            &ints([rows, cols]),
            &[A::Buf(xb), A::I(t as i32)],
            &[y, bb, rb, raw].map(A::Buf),
            &[A::I(wpr as i32), A::Null, A::F(0.0)],
        ]
        .concat();
        sim.launch(&name, (rows.div_ceil(8 / wpr) as u32, 1), 256, &args)?;
        let raw_want = cpu::matmul(&m, &x);
        let mut want = raw_want.clone();
        cpu::add_bias(&mut want, &bias);
        let want = cpu::add(&want, &res);
        check_close(&format!("{name} T={t}"), &sim.get(y)?, &want, 1e-5)?;
        check_close(&format!("{name} T={t} raw"), &sim.get(raw)?, &raw_want, 1e-5)?;
    }
    let t = 5;
    let (x, nw) = (randv(&mut rng, t * cols, 2.0), randv(&mut rng, cols, 2.0));
    let mut sim = Sim::new()?;
    let (gw, uw, xb, nwb) = (sim.bytes(&bytes)?, sim.bytes(&bytes2)?, sim.f32s(&x)?, sim.f32s(&nw)?);
    let (s, g, u) = (sim.out(t * rows)?, sim.out(t * rows)?, sim.out(t * rows)?);
    let name = format!("matvec_swiglu_{}", suffix(ty));
    let args = [
        &[A::Buf(gw), A::Buf(uw), A::L(row_bytes(ty, cols))][..],
        &ints([rows, cols]),
        &[A::Buf(xb), A::I(t as i32)],
        &[s, g, u, nwb].map(A::Buf),
        &[A::F(1e-6)],
    ]
    .concat();
    sim.launch(&name, (rows.div_ceil(8) as u32, 1), 256, &args)?;
    let xn = cpu::mul_rows(&cpu::rmsnorm(&x, cols, 1e-6), &nw);
    let (gv, uv) = (cpu::matmul(&m, &xn), cpu::matmul(&m2, &xn));
    check_gate_up_swiglu(&format!("{name} T={t}"), [&sim.get(g)?, &sim.get(u)?, &sim.get(s)?], &gv, &uv)?;
    Ok(())
}

/// `dequant_{ty}` (the prefill's f32 scratch) and `get_rows_{ty}` (embedding rows) against
/// dequant.rs, bit for bit.
fn dequant_rows_case(ty: GgmlType) -> Result<(), Failed> {
    let cols = if matches!(ty, GgmlType::F32 | GgmlType::F16) { 100 } else { ty.block_size() * 3 };
    let rows = 19;
    let (bytes, m) = matrix(ty, rows, cols, 19)?;
    let mut sim = Sim::new()?;
    let (w, out) = (sim.bytes(&bytes)?, sim.out(rows * cols)?);
    let chunks = rows * cols.div_ceil(16);
    let name = format!("dequant_{}", suffix(ty));
    sim.launch(
        &name,
        (chunks.div_ceil(256).min(65535 * 8) as u32, 1),
        256,
        &[A::Buf(w), A::L(row_bytes(ty, cols)), A::I(rows as i32), A::I(cols as i32), A::Buf(out)],
    )?;
    bit_equal(&name, &sim.get(out)?, &m.data)?;
    let toks = [18i32, 0, 7, 18, 3];
    let (tb, x) = (sim.i32s(&toks)?, sim.out(toks.len() * cols)?);
    let name = format!("get_rows_{}", suffix(ty));
    sim.launch(
        &name,
        (cols.div_ceil(16).div_ceil(256) as u32, toks.len() as u32),
        256,
        &[A::Buf(w), A::L(row_bytes(ty, cols)), A::I(cols as i32), A::Buf(tb), A::Buf(x)],
    )?;
    let want: Vec<f32> = toks.iter().flat_map(|&t| m.data[t as usize * cols..(t as usize + 1) * cols].to_vec()).collect();
    bit_equal(&name, &sim.get(x)?, &want)?;
    Ok(())
}

/// Sizes as the kernels' `int` arguments.
fn ints<const N: usize>(v: [usize; N]) -> [A; N] {
    v.map(|x| A::I(i32::try_from(x).expect("an int argument")))
}

/// ops.rs grid_1d: one thread an element, 256 a block.
fn grid_1d(n: usize) -> (u32, u32) {
    (n.div_ceil(256).clamp(1, 65535 * 8) as u32, 1)
}

/// `rmsnorm_f32` (one block a row; the normalised rows and the weighted ones) and `add_f32` (a +
/// bias broadcast + residual, into a: y aliases a), at widths and magnitudes from 5 to 4864 and
/// 1e-20 to 1e15; then `rmsnorm_f16sat_f32` (the f16-accumulation fault) on rows whose Σx² stays
/// below 65504 and rows where it saturates.
fn rmsnorm_add_case() -> Result<(), Failed> {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let rows = 3;
    for (n, scale) in [(897usize, 1.0f32), (64, 1e15), (5, 1e-20), (4864, 300.0)] {
        let (x, w, bias) = (randv(&mut rng, rows * n, scale), randv(&mut rng, n, 2.0), randv(&mut rng, n, scale));
        let want_n = cpu::rmsnorm(&x, n, 1e-6);
        let want = cpu::mul_rows(&want_n, &w);
        let mut sim = Sim::new()?;
        let (xb, wb, bb) = (sim.f32s(&x)?, sim.f32s(&w)?, sim.f32s(&bias)?);
        let (yn, y) = (sim.out(rows * n)?, sim.out(rows * n)?);
        sim.launch("rmsnorm_f32", (rows as u32, 1), 256, &[A::Buf(xb), A::Buf(wb), A::Buf(yn), A::Buf(y), A::I(n as i32), A::F(1e-6)])?;
        check_close(&format!("rmsnorm_f32 n={n} scale {scale}"), &sim.get(yn)?, &want_n, 1e-6)?;
        check_close(&format!("rmsnorm_f32 · w n={n} scale {scale}"), &sim.get(y)?, &want, 1e-6)?;
        let mut want_add = x.clone();
        cpu::add_bias(&mut want_add, &bias);
        let want_add = cpu::add(&want_add, &want);
        let args = [A::Buf(xb), A::Buf(bb), A::I(n as i32), A::Buf(y), A::Buf(xb), A::L((rows * n) as i64)];
        sim.launch("add_f32", grid_1d(rows * n), 256, &args)?;
        check_close(&format!("add_f32 n={n}"), &sim.get(xb)?, &want_add, 1e-7)?;
    }
    let f16 = Some(Fault::F16Accumulation);
    for (n, scale) in [(897usize, 0.03f32), (897, 300.0), (4864, 22.0), (64, 85.0)] {
        let (x, w) = (randv(&mut rng, rows * n, scale), randv(&mut rng, n, 2.0));
        let want_n = faults::rmsnorm(f16, &x, n, 1e-6);
        let mut sim = Sim::new()?;
        let (xb, wb, yn, y) = (sim.f32s(&x)?, sim.f32s(&w)?, sim.out(rows * n)?, sim.out(rows * n)?);
        sim.launch("rmsnorm_f16sat_f32", (rows as u32, 1), 256, &[A::Buf(xb), A::Buf(wb), A::Buf(yn), A::Buf(y), A::I(n as i32), A::F(1e-6)])?;
        check_close(&format!("rmsnorm_f16sat_f32 n={n} scale {scale}"), &sim.get(yn)?, &want_n, 1e-6)?;
        check_close(&format!("rmsnorm_f16sat_f32 · w n={n} scale {scale}"), &sim.get(y)?, &cpu::mul_rows(&want_n, &w), 1e-6)?;
    }
    Ok(())
}

/// `swiglu_f32` and `gelu_mul_f32` (the gelu-activation fault) against cpu::swiglu and
/// faults::swiglu, across both tails and near 0.
fn activation_case() -> Result<(), Failed> {
    let mut rng = ChaCha8Rng::seed_from_u64(13);
    for (n, scale) in [(4864usize, 3.0f32), (1001, 30.0), (37, 1e-3)] {
        let (g, u) = (randv(&mut rng, n, scale), randv(&mut rng, n, 2.0));
        for (kernel, fault) in [("swiglu_f32", None), ("gelu_mul_f32", Some(Fault::GeluActivation))] {
            let mut sim = Sim::new()?;
            let (gb, ub, sb) = (sim.f32s(&g)?, sim.f32s(&u)?, sim.out(n)?);
            sim.launch(kernel, grid_1d(n), 256, &[A::Buf(gb), A::Buf(ub), A::Buf(sb), A::L(n as i64)])?;
            check_close(&format!("{kernel} n={n} scale {scale}"), &sim.get(sb)?, &faults::swiglu(fault, &g, &u), 1e-6)?;
        }
    }
    Ok(())
}

/// `rope_store_f32`: RoPE of q (in place) and k (into k_out) at positions n_past.., and the KV
/// write of the rotated k and v at those rows (ops.rs rope_store's launch).
fn rope_case(style: RopeStyle, n_rot: usize) -> Result<(), Failed> {
    let mut rng = ChaCha8Rng::seed_from_u64(21 + n_rot as u64);
    let (t, h, hkv, dh, n_past, ctx) = (3usize, 4usize, 2usize, 16usize, 5usize, 12usize);
    let base = 1e6f32;
    let (q, k, v) = (randv(&mut rng, t * h * dh, 10.0), randv(&mut rng, t * hkv * dh, 10.0), randv(&mut rng, t * hkv * dh, 10.0));
    let positions: Vec<usize> = (n_past..n_past + t).collect();
    let (mut wq, mut wk) = (q.clone(), k.clone());
    cpu::rope(&mut wq, &positions, h, dh, n_rot, base, style);
    cpu::rope(&mut wk, &positions, hkv, dh, n_rot, base, style);
    let row = hkv * dh;
    let mut sim = Sim::new()?;
    let (qb, kb, vb) = (sim.f32s(&q)?, sim.f32s(&k)?, sim.f32s(&v)?);
    let (kr, kc, vc, pos) = (sim.out(k.len())?, sim.f32s(&vec![0.0; ctx * row])?, sim.f32s(&vec![0.0; ctx * row])?, sim.i32s(&[n_past as i32])?);
    let n = t * (h + hkv) * dh / 2 + t * hkv * dh;
    let bufs = [qb, kb, kr, vb, kc, vc, pos].map(A::Buf);
    let rot = [A::F(base.powf(-2.0 / n_rot as f32)), A::I((style == RopeStyle::Neox) as i32)];
    sim.launch("rope_store_f32", grid_1d(n), 256, &[&bufs[..], &ints([t, h, hkv, dh, n_rot]), &rot].concat())?;
    let what = format!("rope_store_f32 {style:?} n_rot {n_rot}");
    check_close(&format!("{what} q"), &sim.get(qb)?, &wq, 1e-6)?;
    check_close(&format!("{what} k"), &sim.get(kr)?, &wk, 1e-6)?;
    let mut want_kc = vec![0.0f32; ctx * row];
    let mut want_vc = vec![0.0f32; ctx * row];
    want_kc[n_past * row..(n_past + t) * row].copy_from_slice(&wk);
    want_vc[n_past * row..(n_past + t) * row].copy_from_slice(&v);
    check_close(&format!("{what} K cache"), &sim.get(kc)?, &want_kc, 1e-6)?;
    bit_equal(&format!("{what} V cache"), &sim.get(vc)?, &want_vc)?;
    Ok(())
}

/// `attention_f32` (prefill: one block a head and tile of 8 query rows) against the CPU twins with
/// `fault`'s variants: `t` query rows after `n_past` cached positions, 6 heads over 2 KV heads.
fn attention_case(dh: usize, qscale: f32, fault: Option<Fault>, t: usize, n_past: usize) -> Result<(), Failed> {
    let mut rng = ChaCha8Rng::seed_from_u64(31 + dh as u64 + 1000 * t as u64);
    let (h, hkv, ctx) = (6usize, 2usize, n_past + t + 8);
    let (kv_len, row) = (n_past + t, hkv * dh);
    let q = randv(&mut rng, t * h * dh, qscale);
    let (kcache, vcache) = (randv(&mut rng, ctx * row, 1.0), randv(&mut rng, ctx * row, 1.0));
    let dims = AttnDims { n_tokens: t, n_past, n_head: h, n_head_kv: hkv, head_dim: dh };
    let scale = 1.0 / (dh as f32).sqrt();
    let want_kq = faults::attn_scores(fault, &q, &kcache[..kv_len * row], &dims);
    let want_p = faults::attn_softmax(fault, &want_kq, scale, &dims);
    let want_out = faults::attn_values(fault, &want_p, &vcache[..kv_len * row], &dims);
    let mut sim = Sim::new()?;
    let (qb, kb, vb, pos) = (sim.f32s(&q)?, sim.f32s(&kcache)?, sim.f32s(&vcache)?, sim.i32s(&[n_past as i32])?);
    let n = h * t * kv_len;
    let (kq, p, out) = (sim.out(n)?, sim.out(n)?, sim.out(t * h * dh)?);
    let af = AttnFault::of(fault);
    let args = [
        A::Buf(qb),
        A::Buf(kb),
        A::Buf(vb),
        A::Buf(kq),
        A::Buf(p),
        A::Buf(out),
        A::Buf(pos),
        A::I(t as i32),
        A::I(h as i32),
        A::I(hkv as i32),
        A::I(dh as i32),
        A::F(scale),
        A::I(1),
        A::I(af.bits()),
        A::I(af.window as i32),
    ];
    sim.launch("attention_f32", (h as u32, t.div_ceil(8) as u32), 256, &args)?;
    let what = format!("attention_f32 Dh={dh} T={t} past {n_past} q scale {qscale} fault {fault:?}");
    check_close(&format!("{what} kq"), &sim.get(kq)?, &want_kq, 1e-6)?;
    check_close_nonfinite(&format!("{what} kq_soft_max"), &sim.get(p)?, &want_p, 1e-5)?;
    check_close_nonfinite(&format!("{what} kqv_out"), &sim.get(out)?, &want_out, 1e-5)?;
    Ok(())
}

/// `attention_decode_f32` (RoPE, KV write and attention of one token at position p) against the
/// CPU twins composed, with its taps, as attn_decode.rs launches it: `(dh, n_rot, style, h, hkv,
/// p, qscale, fault)`.
#[allow(clippy::type_complexity)]
fn attention_decode_case(c: (usize, usize, RopeStyle, usize, usize, usize, f32, Option<Fault>), online: bool) -> Result<(), Failed> {
    let (dh, n_rot, style, h, hkv, p, qscale, fault) = c;
    let ctx = p + 9;
    let mut rng = ChaCha8Rng::seed_from_u64(41 + (dh * 100_000 + p) as u64);
    let row = hkv * dh;
    let base = 1e6f32;
    let (q, k, v) = (randv(&mut rng, h * dh, qscale), randv(&mut rng, row, 1.0), randv(&mut rng, row, 1.0));
    let (kcache, vcache) = (randv(&mut rng, ctx * row, 1.0), randv(&mut rng, ctx * row, 1.0));
    let want = twins::decode_attention(&q, &k, &v, &kcache, &vcache, p, (h, hkv, dh), (n_rot, style, base), fault);
    let scale = 1.0 / (dh as f32).sqrt();
    let mut sim = Sim::new()?;
    let (qb, kb, vb) = (sim.f32s(&q)?, sim.f32s(&k)?, sim.f32s(&v)?);
    let (kcb, vcb, pos, out) = (sim.f32s(&kcache)?, sim.f32s(&vcache)?, sim.i32s(&[p as i32])?, sim.out(h * dh)?);
    let kv_len = p + 1;
    let (tq, tk, tkq, tp) = (sim.out(h * dh)?, sim.out(hkv * dh)?, sim.out(h * kv_len)?, sim.out(h * kv_len)?);
    let af = AttnFault::of(fault);
    // attn_decode.rs attention_decode's arguments
    let rot = [A::F(base.powf(-2.0 / n_rot as f32)), A::I((style == RopeStyle::Neox) as i32), A::F(scale), A::I(af.bits()), A::I(af.window as i32)];
    let args = [
        &[qb, kb, vb, kcb, vcb, pos].map(A::Buf)[..],
        &ints([h, hkv, dh, n_rot]),
        &rot,
        &[A::Buf(out), A::Null],
        &ints([ctx, ctx.min(DECODE_SMEM_SCORES)]),
        &[tq, tk, tkq, tp].map(A::Buf),
        &[A::I(online as i32)],
    ]
    .concat();
    sim.launch("attention_decode_f32", (h as u32, 1), 256, &args)?;
    let what = format!("attention_decode_f32 {c:?} online {online}");
    check_close(&format!("{what} Qcur.rope tap"), &sim.get(tq)?, &want.q_rot, 1e-6)?;
    check_close(&format!("{what} Kcur.rope tap"), &sim.get(tk)?, &want.k_rot, 1e-6)?;
    check_close_nonfinite(&format!("{what} kq tap"), &sim.get(tkq)?, &want.kq, 1e-5)?;
    check_close_nonfinite(&format!("{what} kq_soft_max tap"), &sim.get(tp)?, &want.probs, 1e-5)?;
    check_close_nonfinite(&format!("{what} kqv_out"), &sim.get(out)?, &want.out, 1e-5)?;
    let got_kc = sim.get(kcb)?;
    let new_k = &got_kc[p * row..(p + 1) * row];
    check_close(&format!("{what} K cache row p"), new_k, &want.k_rot, 1e-6)?;
    bit_equal(&format!("{what} K cache"), &got_kc, &[&kcache[..p * row], new_k, &kcache[(p + 1) * row..]].concat())?;
    bit_equal(&format!("{what} V cache"), &sim.get(vcb)?, &[&vcache[..p * row], &v[..], &vcache[(p + 1) * row..]].concat())?;
    Ok(())
}

fn main() {
    let args = Arguments::from_args();
    let blocks = [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q5_0, GgmlType::Q8_0, GgmlType::Q4_K, GgmlType::Q6_K];
    type Case = Box<dyn FnOnce() -> Result<(), Failed> + Send>;
    let mut cases: Vec<(String, Case)> = Vec::new();
    for q8 in [false, true] {
        let kind = if q8 { "int8" } else { "f32" };
        for ty in blocks {
            cases.push((format!("staged_matvec_{kind}_{}", suffix(ty)), Box::new(move || staged_matvec_case(ty, q8))));
            cases.push((format!("staged_swiglu_{kind}_{}", suffix(ty)), Box::new(move || staged_swiglu_case(ty, q8))));
        }
        cases.push((format!("staged_multi_{kind}"), Box::new(move || staged_multi_case(q8))));
    }
    for ty in [GgmlType::F32, GgmlType::F16].into_iter().chain(blocks) {
        cases.push((format!("matvec_{}", suffix(ty)), Box::new(move || matvec_case(ty))));
        cases.push((format!("dequant_rows_{}", suffix(ty)), Box::new(move || dequant_rows_case(ty))));
    }
    cases.push(("rmsnorm_and_add".into(), Box::new(rmsnorm_add_case)));
    cases.push(("swiglu_and_gelu".into(), Box::new(activation_case)));
    for (style, n_rot) in [(RopeStyle::Neox, 16), (RopeStyle::Normal, 16), (RopeStyle::Neox, 8), (RopeStyle::Normal, 8)] {
        cases.push((format!("rope_store_{style:?}_nrot{n_rot}"), Box::new(move || rope_case(style, n_rot))));
    }
    // prefill attention: head sizes, large scores, several tiles, and each attention fault
    for (dh, qs, fault, t, past) in [
        (64usize, 1.0f32, None, 5usize, 3usize),
        (40, 1.0, None, 5, 3),
        (64, 300.0, None, 5, 3),
        (64, 1.0, None, 21, 4),
        (64, 1.0, Some(Fault::CausalMaskMissing), 5, 3),
        (64, 1.0, Some(Fault::SoftmaxNoMax), 5, 3),
        (64, 1.0, Some(Fault::GqaMapping), 5, 3),
        (64, 1.0, Some(Fault::AttentionWindow(3)), 5, 3),
        (64, 1.0, Some(Fault::AttentionWindow(6)), 19, 7),
    ] {
        cases.push((format!("attention_dh{dh}_t{t}_past{past}_qscale{qs}_fault_{fault:?}"), Box::new(move || attention_case(dh, qs, fault, t, past))));
    }
    // decode attention: qwen's shape, the float2 path (Dh % 4 = 2), partial rotation, no grouping,
    // softmax overflow without max subtraction, the GQA and window faults
    for c in [
        (64usize, 64usize, RopeStyle::Neox, 14usize, 2usize, 0usize, 1.0f32, None),
        (64, 64, RopeStyle::Neox, 14, 2, 37, 1.0, None),
        (64, 64, RopeStyle::Neox, 14, 2, 37, 300.0, Some(Fault::SoftmaxNoMax)),
        (64, 64, RopeStyle::Neox, 14, 2, 37, 1.0, Some(Fault::GqaMapping)),
        (64, 64, RopeStyle::Neox, 14, 2, 37, 1.0, Some(Fault::AttentionWindow(8))),
        (40, 40, RopeStyle::Normal, 6, 2, 21, 1.0, None),
        (42, 42, RopeStyle::Normal, 6, 2, 21, 1.0, None),
        (18, 10, RopeStyle::Neox, 4, 2, 7, 1.0, None),
        (16, 16, RopeStyle::Normal, 4, 4, 9, 1.0, None),
        // several passes of rows (64 a pass at Dh 64), the window cutting into them
        (64, 64, RopeStyle::Neox, 4, 2, 200, 1.0, None),
        (64, 64, RopeStyle::Neox, 4, 2, 200, 1.0, Some(Fault::AttentionWindow(70))),
    ]
    .into_iter()
    .flat_map(|c| [(c, false), (c, true)])
    {
        let ((dh, n_rot, style, h, hkv, p, qs, fault), online) = c;
        let softmax = if online { "_online" } else { "" };
        cases.push((
            format!("attention_decode{softmax}_dh{dh}_{style:?}_nrot{n_rot}_h{h}x{hkv}_p{p}_qscale{qs}_fault_{fault:?}"),
            Box::new(move || attention_decode_case(c.0, c.1)),
        ));
    }
    let available = host_cxx::compiler().is_some();
    let trials = cases
        .into_iter()
        .map(|(name, f)| {
            if available {
                Trial::test(name, f)
            } else {
                Trial::test(format!("{name} (no C++ compiler: CXX, c++, g++, clang++)"), || Ok(())).with_ignored_flag(true)
            }
        })
        .collect();
    libtest_mimic::run(&args, trials).exit();
}
