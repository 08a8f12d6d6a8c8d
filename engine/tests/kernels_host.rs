//! The CUDA kernels' dequantization held to the CPU twin without a GPU: `dq16` (kernels/quant.cu)
//! and the helpers it uses (kernels/common.cuh), the text between their `host-check begin` and
//! `host-check end` lines, compiled for the CPU with the system's C++ compiler and host versions of
//! the four CUDA intrinsics they call, must give engine/src/dequant.rs's values bit for bit on random
//! rows of every format the kernels read. Every matvec, the prefill dequantization and the embedding
//! rows go through `dq16`, so a wrong shift, mask, offset or block layout there fails here, in the CPU
//! test run, and not only on a GPU machine (engine/tests/cuda_kernels.rs checks the compiled kernels
//! there). Compiled with `-ffp-contract=off`: the CPU twin rounds `d·q − m` twice, as the C++ does
//! then; NVCC may fuse it into one FMA on the GPU, which cuda_kernels allows for (1e-6).
//!
//! The same text holds `q8dot16`, the int8-activation decode kernels' product of a chunk of weights
//! with int8 x (the shipped tier's fast decode): its sums over random rows, given random int8 x, must
//! equal the dot products of dequant.rs's weights with the same x (1e-6 of the row's Σ|w·x|).
//!
//! Without a C++ compiler (CXX, else c++, g++ or clang++ on PATH) the trials are ignored, saying so.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use libtest_mimic::{Arguments, Failed, Trial};
use lockstep_engine::dequant;
use lockstep_engine::gguf::GgmlType;
use rand::{Rng, SeedableRng};

const COMMON: &str = include_str!("../../kernels/common.cuh");
const QUANT: &str = include_str!("../../kernels/quant.cu");

/// Host versions of what the marked kernel text uses from CUDA: the qualifiers, `__int_as_float`,
/// `__funnelshift_r` (clamped shift, as the hardware's), `__byte_perm` (bytes of {y:x} chosen by the
/// selector's low 3 bits per nibble), `__dp4a` (Σ of the four signed byte products, plus c) and
/// `h2f` (IEEE half → float: exact, subnormals included).
const PRELUDE: &str = r#"
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <cmath>
#include <vector>
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__
typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
static inline float __int_as_float(u32 x) { float f; std::memcpy(&f, &x, 4); return f; }
static inline u32 __funnelshift_r(u32 lo, u32 hi, u32 sh) {
    uint64_t v = ((uint64_t)hi << 32) | lo;
    return (u32)(v >> (sh < 32 ? sh : 32));
}
static inline u32 __byte_perm(u32 x, u32 y, u32 s) {
    uint64_t v = ((uint64_t)y << 32) | x;
    u32 r = 0;
    for (int i = 0; i < 4; i++) r |= (u32)((v >> (8 * ((s >> (4 * i)) & 7))) & 0xFF) << (8 * i);
    return r;
}
static inline int __dp4a(int a, int b, int c) {
    for (int i = 0; i < 4; i++) c += (int)(signed char)(a >> (8 * i)) * (int)(signed char)(b >> (8 * i));
    return c;
}
static inline float h2f(u16 h) {
    u32 e = (h >> 10) & 31, m = h & 1023;
    float f = e == 0 ? std::ldexp((float)m, -24) : e == 31 ? (m ? NAN : INFINITY) : std::ldexp((float)(m | 1024), (int)e - 25);
    return (h >> 15) ? -f : f;
}
"#;

/// Dequantizes a file of `rows` rows of `row_bytes` bytes (`cols` elements each, format `ty`) chunk
/// by chunk with dq16 into a file of f32; given a seventh argument, a file of int8 x (`cols` i8 q8,
/// `cols / 32` f32 d8, `cols / 16` i32 sums of 16 q8), writes each row's Σ over chunks of q8dot16
/// (summed in f64) instead.
const MAIN: &str = r#"
template <int TY> static void dots_of(const u8* in, long row_bytes, int cols, int rows, const u8* xq, double* out) {
    const float* d8 = (const float*)(xq + cols);
    const int* s16 = (const int*)(xq + cols + cols / 8);
    for (int r = 0; r < rows; r++) {
        double acc = 0.0;
        for (int c = 0; c < cols / 16; c++) {
            int u[4];
            std::memcpy(u, xq + 16 * c, 16);
            acc += q8dot16<TY>(in + (long)r * row_bytes, c, u, d8[c / 2], s16[c]);
        }
        out[r] = acc;
    }
}
static int dots_main(int ty, long row_bytes, int cols, int rows, const std::vector<u8>& in, const char* xpath, const char* opath) {
    std::vector<u8> xq(cols + cols / 8 + cols / 4);
    FILE* f = fopen(xpath, "rb");
    if (!f || fread(xq.data(), 1, xq.size(), f) != xq.size()) return 6;
    fclose(f);
    std::vector<double> out(rows);
    switch (ty) {
        case GT_Q4_0: dots_of<GT_Q4_0>(in.data(), row_bytes, cols, rows, xq.data(), out.data()); break;
        case GT_Q4_1: dots_of<GT_Q4_1>(in.data(), row_bytes, cols, rows, xq.data(), out.data()); break;
        case GT_Q5_0: dots_of<GT_Q5_0>(in.data(), row_bytes, cols, rows, xq.data(), out.data()); break;
        case GT_Q8_0: dots_of<GT_Q8_0>(in.data(), row_bytes, cols, rows, xq.data(), out.data()); break;
        case GT_Q4_K: dots_of<GT_Q4_K>(in.data(), row_bytes, cols, rows, xq.data(), out.data()); break;
        case GT_Q6_K: dots_of<GT_Q6_K>(in.data(), row_bytes, cols, rows, xq.data(), out.data()); break;
        default: return 4;
    }
    f = fopen(opath, "wb");
    if (!f || fwrite(out.data(), 8, out.size(), f) != out.size()) return 5;
    fclose(f);
    return 0;
}
template <int TY> static void rows_of(const u8* in, long row_bytes, int cols, int rows, float* out) {
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < (cols + 15) / 16; c++) {
            float w[16];
            dq16<TY>(in + (long)r * row_bytes, c, cols, w);
            for (int j = 0; j < 16 && 16 * c + j < cols; j++) out[(long)r * cols + 16 * c + j] = w[j];
        }
}
int main(int argc, char** argv) {
    if (argc != 7 && argc != 8) return 2;
    int ty = atoi(argv[1]), cols = atoi(argv[3]), rows = atoi(argv[4]);
    long row_bytes = atol(argv[2]);
    std::vector<u8> in(row_bytes * rows + 16, 0);  // ld16 may read 3 bytes past a row's last block
    FILE* f = fopen(argv[5], "rb");
    if (!f || fread(in.data(), 1, row_bytes * rows, f) != (size_t)(row_bytes * rows)) return 3;
    fclose(f);
    if (argc == 8) return dots_main(ty, row_bytes, cols, rows, in, argv[7], argv[6]);
    std::vector<float> out((size_t)rows * cols);
    switch (ty) {
        case GT_F32: rows_of<GT_F32>(in.data(), row_bytes, cols, rows, out.data()); break;
        case GT_F16: rows_of<GT_F16>(in.data(), row_bytes, cols, rows, out.data()); break;
        case GT_Q4_0: rows_of<GT_Q4_0>(in.data(), row_bytes, cols, rows, out.data()); break;
        case GT_Q4_1: rows_of<GT_Q4_1>(in.data(), row_bytes, cols, rows, out.data()); break;
        case GT_Q5_0: rows_of<GT_Q5_0>(in.data(), row_bytes, cols, rows, out.data()); break;
        case GT_Q8_0: rows_of<GT_Q8_0>(in.data(), row_bytes, cols, rows, out.data()); break;
        case GT_Q4_K: rows_of<GT_Q4_K>(in.data(), row_bytes, cols, rows, out.data()); break;
        case GT_Q6_K: rows_of<GT_Q6_K>(in.data(), row_bytes, cols, rows, out.data()); break;
        default: return 4;
    }
    f = fopen(argv[6], "wb");
    if (!f || fwrite(out.data(), 4, out.size(), f) != out.size()) return 5;
    fclose(f);
    return 0;
}
"#;

/// The text between the `host-check begin` and `host-check end` lines of `src`.
fn region<'a>(src: &'a str, file: &str) -> Result<&'a str, String> {
    let begin = src.find("// host-check begin").ok_or(format!("kernels/{file}: no `// host-check begin` line"))?;
    let end = src[begin..].find("// host-check end").ok_or(format!("kernels/{file}: no `// host-check end` after its begin"))?;
    Ok(&src[begin..begin + end])
}

/// A C++ compiler: CXX, else the first of c++, g++, clang++ that answers `--version` (asked once).
fn compiler() -> Option<&'static str> {
    static CXX: OnceLock<Option<String>> = OnceLock::new();
    CXX.get_or_init(|| {
        let candidates = std::env::var("CXX").ok().into_iter().chain(["c++", "g++", "clang++"].map(String::from));
        candidates.into_iter().find(|c| Command::new(c).arg("--version").output().is_ok_and(|o| o.status.success()))
    })
    .as_deref()
}

/// The compiled host program (built once), in a directory kept for the process.
fn host_program() -> &'static Result<PathBuf, String> {
    static PROGRAM: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    PROGRAM.get_or_init(|| {
        let cxx = compiler().ok_or("no C++ compiler (CXX, c++, g++, clang++)")?;
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?.keep();
        let src = format!(
            "{}\n{PRELUDE}\n{}\n{}\n{MAIN}",
            lockstep_engine::cuda::device::kernel_constants(),
            region(COMMON, "common.cuh")?,
            region(QUANT, "quant.cu")?
        );
        let (cpp, exe) = (dir.join("dq16_host.cpp"), dir.join("dq16_host"));
        std::fs::write(&cpp, src).map_err(|e| e.to_string())?;
        let out = Command::new(cxx).args(["-std=c++17", "-O1", "-ffp-contract=off", "-o"]).arg(&exe).arg(&cpp).output().map_err(|e| format!("{cxx}: {e}"))?;
        if !out.status.success() {
            return Err(format!("{cxx} failed on the kernels' host-check text ({}):\n{}", cpp.display(), String::from_utf8_lossy(&out.stderr)));
        }
        Ok(exe)
    })
}

/// `rows` random rows of `cols` elements of format `ty`: random bytes, with every f16 scale (and F16
/// value) a finite half, so that the twins' values are numbers to compare.
fn random_rows(ty: GgmlType, cols: usize, rows: usize, seed: u64) -> Vec<u8> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut half = || half::f16::from_f32(rng.random_range(-2.0f32..2.0) * 10f32.powi(rng.random_range(-4..2))).to_bits().to_le_bytes();
    let n = dequant::bytes_needed(ty, cols * rows).expect("whole blocks");
    let mut rng2 = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ 0x9e37);
    let mut data: Vec<u8> = (0..n).map(|_| rng2.random()).collect();
    let (bs, block_bytes) = (ty.block_size(), ty.type_size());
    // byte offsets of the f16 fields in a block
    let halves: &[usize] = match ty {
        GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => &[0],
        GgmlType::Q4_1 | GgmlType::Q4_K => &[0, 2],
        GgmlType::Q6_K => &[208],
        _ => &[],
    };
    match ty {
        GgmlType::F32 => {
            for v in data.chunks_exact_mut(4) {
                v.copy_from_slice(&(rng2.random_range(-1.0f32..1.0) * 1e3).to_le_bytes());
            }
        }
        GgmlType::F16 => {
            for v in data.chunks_exact_mut(2) {
                v.copy_from_slice(&half());
            }
        }
        _ => {
            for b in 0..cols * rows / bs {
                for &off in halves {
                    let at = b * block_bytes + off;
                    data[at..at + 2].copy_from_slice(&half());
                }
            }
        }
    }
    data
}

/// Runs the host program on `rows` rows of `ty` (`row_bytes` bytes, `cols` elements each) with
/// `files`: the rows' file, the output file, and for q8dot16 the int8 x's file.
fn run_host(exe: &Path, ty: GgmlType, row_bytes: usize, cols: usize, rows: usize, files: &[&Path]) -> Result<(), Failed> {
    let st = Command::new(exe)
        .args([ty.to_u32().to_string(), row_bytes.to_string(), cols.to_string(), rows.to_string()])
        .args(files)
        .status()
        .map_err(|e| e.to_string())?;
    if !st.success() {
        return Err(format!("{}: {st}", exe.display()).into());
    }
    Ok(())
}

fn check(ty: GgmlType, cols: usize, rows: usize) -> Result<(), Failed> {
    let exe = host_program().as_ref().map_err(|e| e.clone())?;
    let data = random_rows(ty, cols, rows, 7 + ty.to_u32() as u64);
    let want = dequant::dequantize(ty, &data, cols * rows).map_err(|e| e.to_string())?;
    let dir = exe.parent().unwrap_or(Path::new("."));
    let (inp, outp) = (dir.join(format!("in-{ty}")), dir.join(format!("out-{ty}")));
    std::fs::write(&inp, &data).map_err(|e| e.to_string())?;
    run_host(exe, ty, data.len() / rows, cols, rows, &[&inp, &outp])?;
    let got: Vec<f32> = std::fs::read(&outp).map_err(|e| e.to_string())?.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    if got.len() != want.len() {
        return Err(format!("{ty}: {} values from dq16, {} from the CPU twin", got.len(), want.len()).into());
    }
    let bad: Vec<usize> = (0..want.len()).filter(|&i| got[i].to_bits() != want[i].to_bits()).collect();
    if let Some(&i) = bad.first() {
        let (r, c) = (i / cols, i % cols);
        return Err(
            format!("{ty}: {} of {} values differ; first at row {r} column {c}: dq16 {:e}, CPU twin {:e}", bad.len(), want.len(), got[i], want[i]).into()
        );
    }
    Ok(())
}

/// q8dot16 over `rows` random rows of `ty` against dequant.rs's rows dotted (in f64) with the same
/// int8 x: random q8 in [-127, 127] (a zero block among them), random d8, and the sums of 16 from q8.
fn check_q8(ty: GgmlType, cols: usize, rows: usize) -> Result<(), Failed> {
    let exe = host_program().as_ref().map_err(|e| e.clone())?;
    let data = random_rows(ty, cols, rows, 99 + ty.to_u32() as u64);
    let w = dequant::dequantize(ty, &data, cols * rows).map_err(|e| e.to_string())?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5 + ty.to_u32() as u64);
    let q: Vec<i8> = (0..cols).map(|j| if j < 32 { 0 } else { rng.random_range(-127i8..=127) }).collect();
    let d8: Vec<f32> = (0..cols / 32).map(|_| rng.random_range(1e-3f32..1.0)).collect();
    let s16: Vec<i32> = q.chunks_exact(16).map(|c| c.iter().map(|&v| v as i32).sum()).collect();
    let mut xfile: Vec<u8> = q.iter().map(|&v| v as u8).collect();
    xfile.extend(d8.iter().flat_map(|v| v.to_le_bytes()));
    xfile.extend(s16.iter().flat_map(|v| v.to_le_bytes()));
    let dir = exe.parent().unwrap_or(Path::new("."));
    let (inp, xp, outp) = (dir.join(format!("q8in-{ty}")), dir.join(format!("q8x-{ty}")), dir.join(format!("q8out-{ty}")));
    std::fs::write(&inp, &data).map_err(|e| e.to_string())?;
    std::fs::write(&xp, &xfile).map_err(|e| e.to_string())?;
    run_host(exe, ty, data.len() / rows, cols, rows, &[&inp, &outp, &xp])?;
    let got: Vec<f64> = std::fs::read(&outp).map_err(|e| e.to_string())?.chunks_exact(8).map(|b| f64::from_le_bytes(b.try_into().unwrap())).collect();
    if got.len() != rows {
        return Err(format!("{ty}: {} row sums from q8dot16, expected {rows}", got.len()).into());
    }
    for (r, &g) in got.iter().enumerate() {
        let terms = (0..cols).map(|j| w[r * cols + j] as f64 * (d8[j / 32] as f64 * q[j] as f64));
        let (want, scale) = terms.fold((0.0, 0.0), |(s, a), t| (s + t, a + t.abs()));
        if (g - want).abs() > 1e-6 * scale.max(f64::MIN_POSITIVE) {
            return Err(format!("{ty}: row {r}: q8dot16 sums to {g:e}, dequantized weights · x to {want:e} (Σ|w·x| {scale:e})").into());
        }
    }
    Ok(())
}

fn main() {
    let args = Arguments::from_args();
    // F32/F16 rows of 100 end in a partial chunk (dq16 pads it with zeros, which must not show)
    let cases = [
        (GgmlType::F32, 100),
        (GgmlType::F16, 100),
        (GgmlType::Q4_0, 512),
        (GgmlType::Q4_1, 512),
        (GgmlType::Q5_0, 512),
        (GgmlType::Q8_0, 512),
        (GgmlType::Q4_K, 512),
        (GgmlType::Q6_K, 512),
    ];
    let available = compiler();
    let trials = cases
        .into_iter()
        .map(|(ty, cols)| {
            let name = format!("dq16_{}_matches_the_cpu_twin", ty.to_string().to_lowercase());
            match &available {
                Some(_) => Trial::test(name, move || check(ty, cols, 64)),
                None => Trial::test(format!("{name} (no C++ compiler: CXX, c++, g++, clang++)"), || Ok(())).with_ignored_flag(true),
            }
        })
        .chain(cases.into_iter().filter(|(ty, _)| !matches!(ty, GgmlType::F32 | GgmlType::F16)).map(|(ty, cols)| {
            let name = format!("q8dot16_{}_matches_the_cpu_twin", ty.to_string().to_lowercase());
            match &available {
                Some(_) => Trial::test(name, move || check_q8(ty, cols, 64)),
                None => Trial::test(format!("{name} (no C++ compiler: CXX, c++, g++, clang++)"), || Ok(())).with_ignored_flag(true),
            }
        }))
        .collect();
    libtest_mimic::run(&args, trials).exit();
}
