//! The staged decode kernels of kernels/quant.cu run whole on the CPU: the f32 ones
//! (`matvec1s_*`, `matvec_swiglu1s_*`, `matvec1s_multi`) and the int8-activation ones (`matvec1q_*`,
//! `matvec_swiglu1q_*`, `matvec1q_multi`), compiled from the very sources with the system C++
//! compiler and a small SIMT model: a block's 256 threads are fibers (ucontext) taking turns on one
//! OS thread, `__syncthreads` a barrier of the block, warp shuffles a barrier of the warp's 32
//! threads around a shared slot, a
//! `__shared__` variable a static (blocks run one after another), the dynamic shared memory one
//! static buffer (160 KiB, so that any launch plan fits) filled with garbage before each block, cp.async a plain 16-byte copy (the kernels'
//! own pre-sm_80 branch). What the GPU does differently (timing, PDL) does not change what these
//! kernels compute, so their outputs must match the CPU twins here as in cuda_kernels on a GPU:
//! dequantized weights times x (f32) or times `cpu::ops::quantize_q8` of x (int8), with RMSNorm,
//! bias, residual and raw output, for every block format and the launch plans a GPU may pick
//! (several warps a row, several rows a warp). So a wrong index, shared-memory layout or reduction
//! in these kernels fails in the CPU test run, not only on a GPU machine.
//!
//! Without a C++ compiler (CXX, else c++, g++ or clang++ on PATH) the trials are ignored, saying so.

mod host_cxx;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use libtest_mimic::{Arguments, Failed, Trial};
use lockstep_engine::cpu::ops::{self as cpu, Matrix};
use lockstep_engine::dequant;
use lockstep_engine::gguf::GgmlType;
use rand::{Rng, SeedableRng};

const COMMON: &str = include_str!("../../kernels/common.cuh");
const QUANT: &str = include_str!("../../kernels/quant.cu");

/// The SIMT model (see the module comment). `simt_launch(grid, block, f)` runs `f` on every thread
/// of every block, the blocks one after another; a thread that returns early must not be waited
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
struct int4 { int x, y, z, w; };
struct uint4 { unsigned x, y, z, w; };
struct float4 { float x, y, z, w; };
static inline float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }
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
template <class F> static void simt_launch(unsigned grid, unsigned block, F kernel) {
    blockDim = {block, 1, 1};
    gridDim = {grid, 1, 1};
    simt_kernel = kernel;
    simt_fibers.resize(block);
    for (auto& f : simt_fibers) f.stack.resize(256 * 1024);
    for (unsigned b = 0; b < grid; b++) {
        std::memset(simt_dyn_smem, 0xCD, sizeof simt_dyn_smem);
        std::memset(simt_arrived, 0, sizeof simt_arrived);
        blockIdx = {b, 0, 0};
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

/// Runs one staged kernel on files in a directory (argv: DIR MODE Q8 COLS NORM WPR RPW, then a
/// format and a row count per matrix: one for `mv`, the same two for gate and up for `sw`, three
/// for `multi`). Reads DIR/w{k}.bin, x.bin, nw.bin, bias.bin, res.bin; writes DIR/y{k}.bin (and
/// raw{k}.bin for mv and multi, g.bin and u.bin for sw). Shared memory and grid as ops.rs plans
/// them for the given wpr and rpw.
const MAIN: &str = r#"
static std::vector<u8> slurp(const std::string& p) {
    FILE* f = fopen(p.c_str(), "rb");
    if (!f) { fprintf(stderr, "cannot read %s\n", p.c_str()); exit(3); }
    std::vector<u8> v;
    u8 buf[65536];
    size_t n;
    while ((n = fread(buf, 1, sizeof buf, f)) > 0) v.insert(v.end(), buf, buf + n);
    fclose(f);
    return v;
}
// a device-like copy: 256-byte aligned, 16 bytes of padding after (QMat::upload's)
static u8* aligned_copy(const std::vector<u8>& v) {
    size_t n = (v.size() + 16 + 255) / 256 * 256;
    u8* p = (u8*)std::aligned_alloc(256, n);
    std::memset(p, 0, n);
    std::memcpy(p, v.data(), v.size());
    return p;
}
static void spit(const std::string& p, const float* v, size_t n) {
    FILE* f = fopen(p.c_str(), "wb");
    if (!f || fwrite(v, 4, n, f) != n) { fprintf(stderr, "cannot write %s\n", p.c_str()); exit(5); }
    fclose(f);
}
static int span_bytes(int bytes) { return (bytes + 15 + 15) / 16 * 16; }  // ops.rs staging_area
#define FORMATS(X) X(q4_0, GT_Q4_0) X(q4_1, GT_Q4_1) X(q5_0, GT_Q5_0) X(q8_0, GT_Q8_0) X(q4_k, GT_Q4_K) X(q6_k, GT_Q6_K)
int main(int argc, char** argv) {
    if (argc < 10) return 2;
    std::string dir = argv[1], mode = argv[2];
    int q8 = atoi(argv[3]), cols = atoi(argv[4]), norm = atoi(argv[5]), wpr = atoi(argv[6]), rpw = atoi(argv[7]);
    int nm = (argc - 8) / 2, ty[3], rows[3];
    for (int k = 0; k < nm && k < 3; k++) { ty[k] = atoi(argv[8 + 2 * k]); rows[k] = atoi(argv[9 + 2 * k]); }
    float* x = (float*)aligned_copy(slurp(dir + "/x.bin"));
    float* nw = norm ? (float*)aligned_copy(slurp(dir + "/nw.bin")) : nullptr;
    float eps = 1e-6f;
    int xa = q8 ? ((cols + cols / 8 + cols / 4 + 15) & ~15) : ((4 * cols + 15) & ~15);
    std::vector<u8*> w;
    std::vector<long long> rb;
    int span_cap = 0;
    for (int k = 0; k < nm; k++) {
        w.push_back(aligned_copy(slurp(dir + "/w" + std::to_string(k) + ".bin")));
        int nb = cols / block_elems(ty[k]);
        rb.push_back((long long)nb * block_bytes(ty[k]));
        span_cap = std::max(span_cap, span_bytes(((nb + wpr - 1) / wpr) * block_bytes(ty[k])));
    }
    if (mode == "mv") {
        std::vector<float> bias = [&] { auto v = slurp(dir + "/bias.bin"); std::vector<float> f(v.size() / 4); std::memcpy(f.data(), v.data(), v.size()); return f; }();
        std::vector<float> res = [&] { auto v = slurp(dir + "/res.bin"); std::vector<float> f(v.size() / 4); std::memcpy(f.data(), v.data(), v.size()); return f; }();
        std::vector<float> y(rows[0]), raw(rows[0]);
        int smem = xa + 8 * rpw * span_cap;
        if (smem > (int)sizeof simt_dyn_smem) return 6;
        int rows_per_block = 8 / wpr * rpw, grid = (rows[0] + rows_per_block - 1) / rows_per_block;
#define MV(NAME, TY) case TY: simt_launch(grid, 256, [&] { if (q8) matvec1q_##NAME(w[0], rb[0], rows[0], cols, x, y.data(), bias.data(), res.data(), raw.data(), wpr, rpw, span_cap, nw, eps); \
                                                          else matvec1s_##NAME(w[0], rb[0], rows[0], cols, x, y.data(), bias.data(), res.data(), raw.data(), wpr, rpw, span_cap, nw, eps); }); break;
        switch (ty[0]) { FORMATS(MV) default: return 4; }
        spit(dir + "/y0.bin", y.data(), y.size());
        spit(dir + "/raw0.bin", raw.data(), raw.size());
    } else if (mode == "sw") {
        std::vector<float> s(rows[0]), g(rows[0]), u(rows[0]);
        int grid = (rows[0] + 7) / 8;
#define SW(NAME, TY) case TY: simt_launch(grid, 256, [&] { if (q8) matvec_swiglu1q_##NAME(w[0], w[1], rb[0], rows[0], cols, x, s.data(), g.data(), u.data(), span_cap, nw, eps); \
                                                          else matvec_swiglu1s_##NAME(w[0], w[1], rb[0], rows[0], cols, x, s.data(), g.data(), u.data(), span_cap, nw, eps); }); break;
        switch (ty[0]) { FORMATS(SW) default: return 4; }
        spit(dir + "/y0.bin", s.data(), s.size());
        spit(dir + "/g.bin", g.data(), g.size());
        spit(dir + "/u.bin", u.data(), u.size());
    } else if (mode == "multi") {
        std::vector<float> y[3], raw[3];
        int grid = 0;
        for (int k = 0; k < 3; k++) { y[k].resize(rows[k]); raw[k].resize(rows[k]); grid += (rows[k] + 7) / 8; }
        auto run = [&] {
            auto f = q8 ? matvec1q_multi : matvec1s_multi;
            f(w[0], rb[0], rows[0], ty[0], y[0].data(), nullptr, raw[0].data(), w[1], rb[1], rows[1], ty[1], y[1].data(), nullptr, raw[1].data(),
              w[2], rb[2], rows[2], ty[2], y[2].data(), nullptr, raw[2].data(), cols, x, span_cap, nw, eps);
        };
        simt_launch(grid, 256, run);
        for (int k = 0; k < 3; k++) {
            spit(dir + "/y" + std::to_string(k) + ".bin", y[k].data(), y[k].size());
            spit(dir + "/raw" + std::to_string(k) + ".bin", raw[k].data(), raw[k].size());
        }
    } else {
        return 2;
    }
    return 0;
}
"#;

/// common.cuh and quant.cu as the host compiles them: h2f's PTX and the INFINITY macro give way to
/// INTRINSICS' versions, the dynamic shared memory is SIMT's buffer.
fn host_sources() -> Result<String, String> {
    let h2f_at = COMMON.find("__device__ __forceinline__ float h2f(u16 h) {").ok_or("kernels/common.cuh: no h2f")?;
    let h2f_end = h2f_at + COMMON[h2f_at..].find("\n}\n").ok_or("kernels/common.cuh: h2f has no end")? + 3;
    let common = format!("{}{}", &COMMON[..h2f_at], &COMMON[h2f_end..]).replace("#define INFINITY __int_as_float(0x7f800000)", "");
    let dyn_smem = "extern __shared__ __align__(16) u8 smem[];";
    if !QUANT.contains(dyn_smem) {
        return Err(format!("kernels/quant.cu: no `{dyn_smem}` line"));
    }
    let quant = QUANT.replace(dyn_smem, "u8* smem = simt_dyn_smem;");
    Ok(format!("{}\n{}\n{SIMT}\n{common}\n{quant}\n{MAIN}", lockstep_engine::cuda::device::kernel_constants(), host_cxx::INTRINSICS))
}

fn program() -> &'static Result<PathBuf, String> {
    static PROGRAM: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    PROGRAM.get_or_init(|| host_cxx::build("kernels_simt", &host_sources()?, &["-std=c++17", "-O2"]))
}

fn write_f32(path: &Path, v: &[f32]) -> Result<(), Failed> {
    std::fs::write(path, v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>()).map_err(|e| format!("{}: {e}", path.display()).into())
}

fn read_f32(path: &Path) -> Result<Vec<f32>, Failed> {
    Ok(std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
}

/// ‖got − want‖ / ‖want‖ ≤ tol, else the worst element.
fn close(what: &str, got: &[f32], want: &[f32], tol: f64) -> Result<(), Failed> {
    if got.len() != want.len() {
        return Err(format!("{what}: {} values, expected {}", got.len(), want.len()).into());
    }
    let (mut num, mut den, mut worst) = (0.0f64, 0.0f64, (0usize, 0.0f64));
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let d = (g as f64 - w as f64).abs();
        num += d * d;
        den += (w as f64) * (w as f64);
        if !(d <= worst.1) {
            worst = (i, d);
        }
    }
    let rel = (num / den.max(f64::MIN_POSITIVE)).sqrt();
    if !(rel <= tol) {
        return Err(format!("{what}: rel L2 {rel:.3e} > {tol:.0e}; worst at {}: {} vs {}", worst.0, got[worst.0], want[worst.0]).into());
    }
    Ok(())
}

/// One kernel run: `mats` are (format, rows) of the matrices, x of `cols` values; returns the
/// dequantized matrices and the output files' contents by name.
struct Run {
    dir: tempfile::TempDir,
    mats: Vec<Matrix>,
}

impl Run {
    fn new(seed: u64, mats: &[(GgmlType, usize)], cols: usize, x: &[f32], nw: Option<&[f32]>, bias: &[f32], res: &[f32]) -> Result<Run, Failed> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let mut out = Vec::new();
        for (k, &(ty, rows)) in mats.iter().enumerate() {
            let bytes = host_cxx::random_rows(ty, cols, rows, seed + k as u64);
            std::fs::write(dir.path().join(format!("w{k}.bin")), &bytes).map_err(|e| e.to_string())?;
            out.push(Matrix { rows, cols, data: dequant::dequantize(ty, &bytes, rows * cols).map_err(|e| e.to_string())? });
        }
        write_f32(&dir.path().join("x.bin"), x)?;
        write_f32(&dir.path().join("nw.bin"), nw.unwrap_or(&[]))?;
        write_f32(&dir.path().join("bias.bin"), bias)?;
        write_f32(&dir.path().join("res.bin"), res)?;
        Ok(Run { dir, mats: out })
    }

    #[allow(clippy::too_many_arguments)]
    fn exec(&self, mode: &str, q8: bool, cols: usize, norm: bool, wpr: usize, rpw: usize, mats: &[(GgmlType, usize)]) -> Result<(), Failed> {
        let exe = program().as_ref().map_err(|e| e.clone())?;
        let mut args: Vec<String> = vec![self.dir.path().display().to_string(), mode.into()];
        args.extend([q8 as u8 as usize, cols, norm as usize, wpr, rpw].map(|v| v.to_string()));
        for &(ty, rows) in mats {
            args.extend([ty.to_u32().to_string(), rows.to_string()]);
        }
        let st = Command::new(exe).args(&args).status().map_err(|e| e.to_string())?;
        if !st.success() {
            return Err(format!("{} {}: {st}", exe.display(), args.join(" ")).into());
        }
        Ok(())
    }

    fn out(&self, name: &str) -> Result<Vec<f32>, Failed> {
        read_f32(&self.dir.path().join(name))
    }
}

fn randv(rng: &mut rand_chacha::ChaCha8Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-1.0f32..1.0) * scale).collect()
}

/// The x the kernels multiply by: x, RMS-normalised and scaled by nw when given, quantized to int8
/// per 32 values when q8.
fn kernel_x(x: &[f32], nw: Option<&[f32]>, q8: bool) -> Vec<f32> {
    let xn = match nw {
        Some(nw) => cpu::mul_rows(&cpu::rmsnorm(x, x.len(), 1e-6), nw),
        None => x.to_vec(),
    };
    if q8 {
        cpu::quantize_q8(&xn)
    } else {
        xn
    }
}

/// `matvec1{s,q}_{ty}` with bias, residual and raw output, with and without the fused RMSNorm, for
/// launch plans of 1, 2, 4 and 8 warps a row and 1, 2 and 4 rows a warp.
fn matvec_case(ty: GgmlType, q8: bool) -> Result<(), Failed> {
    let cols = ty.block_size() * 9;
    let rows = 45;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(31 + ty.to_u32() as u64 + q8 as u64);
    for (i, (wpr, rpw)) in [(1, 1), (1, 2), (1, 4), (2, 1), (4, 1), (8, 1)].into_iter().enumerate() {
        let norm = i % 2 == 0;
        let (x, nw) = (randv(&mut rng, cols, 2.0), randv(&mut rng, cols, 2.0));
        let (bias, res) = (randv(&mut rng, rows, 1.0), randv(&mut rng, rows, 1.0));
        let run = Run::new(7 + i as u64, &[(ty, rows)], cols, &x, Some(&nw), &bias, &res)?;
        run.exec("mv", q8, cols, norm, wpr, rpw, &[(ty, rows)])?;
        let raw_want = cpu::matmul(&run.mats[0], &kernel_x(&x, norm.then_some(&nw[..]), q8));
        let mut want = raw_want.clone();
        cpu::add_bias(&mut want, &bias);
        let want = cpu::add(&want, &res);
        let what = format!("{} {ty} wpr {wpr} rpw {rpw} norm {norm}", if q8 { "matvec1q" } else { "matvec1s" });
        close(&what, &run.out("y0.bin")?, &want, 1e-5)?;
        close(&format!("{what} raw"), &run.out("raw0.bin")?, &raw_want, 1e-5)?;
    }
    Ok(())
}

/// `matvec_swiglu1{s,q}_{ty}` with the fused RMSNorm: gate, up and silu(gate) · up.
fn swiglu_case(ty: GgmlType, q8: bool) -> Result<(), Failed> {
    let (cols, rows) = (ty.block_size() * 5, 21);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(47 + ty.to_u32() as u64 + q8 as u64);
    let (x, nw) = (randv(&mut rng, cols, 2.0), randv(&mut rng, cols, 2.0));
    let mats = [(ty, rows), (ty, rows)];
    let run = Run::new(11, &mats, cols, &x, Some(&nw), &[], &[])?;
    run.exec("sw", q8, cols, true, 1, 1, &mats)?;
    let xk = kernel_x(&x, Some(&nw), q8);
    let (g, u) = (cpu::matmul(&run.mats[0], &xk), cpu::matmul(&run.mats[1], &xk));
    let what = format!("{} {ty}", if q8 { "matvec_swiglu1q" } else { "matvec_swiglu1s" });
    close(&format!("{what} gate"), &run.out("g.bin")?, &g, 1e-5)?;
    close(&format!("{what} up"), &run.out("u.bin")?, &u, 1e-5)?;
    close(&format!("{what} swiglu"), &run.out("y0.bin")?, &cpu::swiglu(&g, &u), 1e-5)?;
    Ok(())
}

/// `matvec1{s,q}_multi`: three matrices of different formats and row counts, one x, RMSNorm fused.
fn multi_case(q8: bool) -> Result<(), Failed> {
    let cols = 768;
    let mats = [(GgmlType::Q5_0, 37), (GgmlType::Q8_0, 8), (GgmlType::Q4_K, 13)];
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5150 + q8 as u64);
    let (x, nw) = (randv(&mut rng, cols, 3.0), randv(&mut rng, cols, 2.0));
    let run = Run::new(13, &mats, cols, &x, Some(&nw), &[], &[])?;
    run.exec("multi", q8, cols, true, 1, 1, &mats)?;
    let xk = kernel_x(&x, Some(&nw), q8);
    for (k, (ty, rows)) in mats.iter().enumerate() {
        let want = cpu::matmul(&run.mats[k], &xk);
        let what = format!("{} {ty} {rows} rows", if q8 { "matvec1q_multi" } else { "matvec1s_multi" });
        close(&what, &run.out(&format!("y{k}.bin"))?, &want, 1e-5)?;
        close(&format!("{what} raw"), &run.out(&format!("raw{k}.bin"))?, &want, 1e-5)?;
    }
    Ok(())
}

fn main() {
    let args = Arguments::from_args();
    let formats = [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q5_0, GgmlType::Q8_0, GgmlType::Q4_K, GgmlType::Q6_K];
    let mut trials = Vec::new();
    for q8 in [false, true] {
        let kind = if q8 { "int8" } else { "f32" };
        for ty in formats {
            let t = ty.to_string().to_lowercase();
            trials.push((format!("staged_matvec_{kind}_{t}"), Box::new(move || matvec_case(ty, q8)) as Box<dyn FnOnce() -> Result<(), Failed> + Send>));
            trials.push((format!("staged_swiglu_{kind}_{t}"), Box::new(move || swiglu_case(ty, q8))));
        }
        trials.push((format!("staged_multi_{kind}"), Box::new(move || multi_case(q8))));
    }
    let available = host_cxx::compiler().is_some();
    let trials = trials
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
