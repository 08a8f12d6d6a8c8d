//! Shared by the test binaries that compile kernel text for the CPU (included with `mod`): the host
//! versions of the CUDA intrinsics the kernels call, the C++ compiler, and a build of one program.
#![allow(dead_code)]

use std::path::PathBuf;

use lockstep_engine::dequant;
use lockstep_engine::gguf::GgmlType;
use rand::{Rng, SeedableRng};
use std::process::Command;
use std::sync::OnceLock;

/// Host versions of what the kernels use from CUDA beside the SIMT model: the qualifiers,
/// `__int_as_float`, `__funnelshift_r` (clamped shift, as the hardware's), `__byte_perm` (bytes of
/// {y:x} chosen by the selector's low 3 bits per nibble), `__dp4a` (Σ of the four signed byte
/// products, plus c) and `h2f` (IEEE half → float: exact, subnormals included).
pub const INTRINSICS: &str = r#"
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

/// A C++ compiler: CXX, else the first of c++, g++, clang++ that answers `--version` (asked once).
pub fn compiler() -> Option<&'static str> {
    static CXX: OnceLock<Option<String>> = OnceLock::new();
    CXX.get_or_init(|| {
        let candidates = std::env::var("CXX").ok().into_iter().chain(["c++", "g++", "clang++"].map(String::from));
        candidates.into_iter().find(|c| Command::new(c).arg("--version").output().is_ok_and(|o| o.status.success()))
    })
    .as_deref()
}

/// Compiles `src` as `name`.cpp with `flags` into an executable in a directory kept for the process.
pub fn build(name: &str, src: &str, flags: &[&str]) -> Result<PathBuf, String> {
    let cxx = compiler().ok_or("no C++ compiler (CXX, c++, g++, clang++)")?;
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?.keep();
    let (cpp, exe) = (dir.join(format!("{name}.cpp")), dir.join(name));
    std::fs::write(&cpp, src).map_err(|e| e.to_string())?;
    let out = Command::new(cxx).args(flags).arg("-o").arg(&exe).arg(&cpp).output().map_err(|e| format!("{cxx}: {e}"))?;
    if !out.status.success() {
        return Err(format!("{cxx} failed on the kernels' text ({}):\n{}", cpp.display(), String::from_utf8_lossy(&out.stderr)));
    }
    Ok(exe)
}

/// The text between the `host-check begin` and `host-check end` lines of `src`.
pub fn region<'a>(src: &'a str, file: &str) -> Result<&'a str, String> {
    let begin = src.find("// host-check begin").ok_or(format!("kernels/{file}: no `// host-check begin` line"))?;
    let end = src[begin..].find("// host-check end").ok_or(format!("kernels/{file}: no `// host-check end` after its begin"))?;
    Ok(&src[begin..begin + end])
}

/// `rows` random rows of `cols` elements of format `ty`: random bytes, with every f16 scale (and F16
/// value) a finite half, so that the twins' values are numbers to compare.
pub fn random_rows(ty: GgmlType, cols: usize, rows: usize, seed: u64) -> Vec<u8> {
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
