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

mod host_cxx;

use libtest_mimic::{Arguments, Failed, Trial};
use lockstep_engine::dequant;
use lockstep_engine::gguf::GgmlType;
use rand::{Rng, SeedableRng};

const COMMON: &str = include_str!("../../kernels/common.cuh");
const QUANT: &str = include_str!("../../kernels/quant.cu");

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

/// The compiled host program (built once), in a directory kept for the process.
fn host_program() -> &'static Result<PathBuf, String> {
    static PROGRAM: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    PROGRAM.get_or_init(|| {
        let src = format!(
            "{}\n{}\n{}\n{}\n{MAIN}",
            lockstep_engine::cuda::device::kernel_constants(),
            host_cxx::INTRINSICS,
            host_cxx::region(COMMON, "common.cuh")?,
            host_cxx::region(QUANT, "quant.cu")?
        );
        host_cxx::build("dq16_host", &src, &["-std=c++17", "-O1", "-ffp-contract=off"])
    })
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
    let data = host_cxx::random_rows(ty, cols, rows, 7 + ty.to_u32() as u64);
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
    let data = host_cxx::random_rows(ty, cols, rows, 99 + ty.to_u32() as u64);
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
    let available = host_cxx::compiler();
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
