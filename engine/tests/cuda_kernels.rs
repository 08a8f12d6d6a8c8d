//! Each CUDA kernel against its CPU twin on random and adversarial inputs: every weight format, odd
//! sizes (rows not a multiple of the 8 rows of a block, F32/F16 widths not a multiple of 16), batch
//! sizes on both sides of the matvec/GEMM switch, large magnitudes, and attention scores that
//! overflow without max subtraction. Ignored (with the reason) where CUDA is unavailable.

mod cuda_common;
mod twins;

use cuda_common::{bit_equal, check_close, check_close_nonfinite, check_gate_up_swiglu, rel_l2, trials};
use libtest_mimic::{Arguments, Failed, Trial};
use lockstep_engine::cpu::attention::{self as cpu_attn, AttnDims, KvCache};
use lockstep_engine::cpu::ops::{self as cpu, Matrix, RopeStyle};
use lockstep_engine::cuda::attn_decode::{DecodeAttnArgs, DecodeTaps, DECODE_SMEM_SCORES};
use lockstep_engine::cuda::device::ptr;
use lockstep_engine::cuda::ops::{AttnArgs, AttnFault, Proj, QMat, RopeArgs, SUPPORTED};
use lockstep_engine::cuda::Gpu;
use lockstep_engine::dequant;
use lockstep_engine::faults::{self, Fault};
use lockstep_engine::gguf::GgmlType;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

type R = Result<(), Failed>;

fn gpu() -> Result<Gpu, Failed> {
    Gpu::new().map_err(|e| format!("{e:#}").into())
}

fn f16_bits(v: f32) -> [u8; 2] {
    half::f16::from_f32(v).to_bits().to_le_bytes()
}

/// Random weights of `ty`, `[rows][cols]`, with every block scale a valid f16 of magnitude ≤ `scale`.
fn random_weights(rng: &mut ChaCha8Rng, ty: GgmlType, rows: usize, cols: usize, scale: f32) -> Vec<u8> {
    let n = rows * cols;
    match ty {
        GgmlType::F32 => (0..n).flat_map(|_| (rng.random_range(-1.0f32..1.0) * scale).to_le_bytes()).collect(),
        GgmlType::F16 => (0..n).flat_map(|_| f16_bits(rng.random_range(-1.0f32..1.0) * scale)).collect(),
        _ => {
            let (bs, tsz) = (ty.block_size(), ty.type_size());
            let nblocks = n / bs;
            let mut bytes: Vec<u8> = (0..nblocks * tsz).map(|_| rng.random()).collect();
            for b in 0..nblocks {
                let blk = &mut bytes[b * tsz..(b + 1) * tsz];
                let mut put = |off: usize, v: f32| blk[off..off + 2].copy_from_slice(&f16_bits(v));
                let mut r = || rng.random_range(-1.0f32..1.0) * scale;
                match ty {
                    GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => put(0, r()),
                    GgmlType::Q4_1 => {
                        let (d, m) = (r(), r());
                        put(0, d);
                        put(2, m);
                    }
                    GgmlType::Q4_K => {
                        let (d, m) = (r() / 64.0, r() / 64.0);
                        put(0, d);
                        put(2, m);
                    }
                    GgmlType::Q6_K => put(208, r() / 64.0),
                    _ => unreachable!(),
                }
            }
            bytes
        }
    }
}

fn cpu_matrix(ty: GgmlType, bytes: &[u8], rows: usize, cols: usize) -> Matrix {
    Matrix { rows, cols, data: dequant::dequantize(ty, bytes, rows * cols).expect("CPU dequant") }
}

fn randv(rng: &mut ChaCha8Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-1.0f32..1.0) * scale).collect()
}

fn cols_for(ty: GgmlType) -> Vec<usize> {
    match ty {
        GgmlType::F32 | GgmlType::F16 => vec![33, 100, 896],
        _ => {
            let bs = ty.block_size();
            // 8448 = 264 blocks of 32 = 33 of 256: the staged decode matvec splits such a row over
            // 8 warps (ops.rs staged_plan), the last warp of a K-quant row getting no block at all
            vec![bs * 3, bs * 7, 8448]
        }
    }
}

/// The decode matvec (T = 1) of a tall matrix, an output head's shape: the staged kernel gives each
/// warp several rows (ops.rs staged_plan), 8450 not being a multiple of the rows of a block; with
/// the fused RMSNorm as the head runs it.
fn tall_matvec_case(ty: GgmlType) -> R {
    let g = gpu()?;
    let mut rng = ChaCha8Rng::seed_from_u64(ty.to_u32() as u64 + 77);
    let (rows, cols) = (8450, cols_for(ty)[1]);
    let bytes = random_weights(&mut rng, ty, rows, cols, 1.0);
    let m = cpu_matrix(ty, &bytes, rows, cols);
    let w = QMat::upload(&g, ty, rows, cols, &bytes, "tall weight")?;
    let x = randv(&mut rng, cols, 3.0);
    let nw = randv(&mut rng, cols, 2.0);
    let eps = 1e-6;
    let want = cpu::matmul(&m, &cpu::mul_rows(&cpu::rmsnorm(&x, cols, eps), &nw));
    let p = |b: &cudarc::driver::CudaSlice<f32>| ptr(b, &g.stream);
    let (xd, nd, y) = (g.upload(&x, "x")?, g.upload(&nw, "norm")?, g.alloc::<f32>(rows, "y")?);
    g.matvec(&w, p(&xd), 1, p(&y), None, None, None, Some((p(&nd), eps)))?;
    check_close(&format!("tall matvec+norm {ty} {rows}x{cols}"), &g.download(&y, 0, rows)?, &want, 1e-5)?;
    Ok(())
}

/// Three decode matvecs of one normalised x in one launch (Q, K and V of a decode step), in
/// different formats and row counts, with and without bias and raw output; F32 is declined.
fn matvec_multi_case() -> R {
    let g = gpu()?;
    let mut rng = ChaCha8Rng::seed_from_u64(5150);
    let cols = 768;
    let specs = [(GgmlType::Q5_0, 37, true, true), (GgmlType::Q8_0, 8, true, false), (GgmlType::Q4_K, 13, false, false)];
    let x = randv(&mut rng, cols, 3.0);
    let nw = randv(&mut rng, cols, 2.0);
    let eps = 1e-6;
    let xn = cpu::mul_rows(&cpu::rmsnorm(&x, cols, eps), &nw);
    let p = |b: &cudarc::driver::CudaSlice<f32>| ptr(b, &g.stream);
    let (xd, nd) = (g.upload(&x, "x")?, g.upload(&nw, "norm")?);
    let mut mats = Vec::new();
    for &(ty, rows, with_bias, with_raw) in &specs {
        let bytes = random_weights(&mut rng, ty, rows, cols, 1.0);
        let want_raw = cpu::matmul(&cpu_matrix(ty, &bytes, rows, cols), &xn);
        let b = randv(&mut rng, rows, 1.0);
        let mut want = want_raw.clone();
        if with_bias {
            cpu::add_bias(&mut want, &b);
        }
        let w = QMat::upload(&g, ty, rows, cols, &bytes, "w")?;
        let (bd, y, raw) = (g.upload(&b, "b")?, g.alloc::<f32>(rows, "y")?, g.alloc::<f32>(rows, "raw")?);
        mats.push((ty, rows, with_bias, with_raw, w, bd, y, raw, want, want_raw));
    }
    let projs: Vec<Proj> =
        mats.iter().map(|(_, _, wb, wr, w, bd, y, raw, _, _)| Proj { w, y: p(y), bias: wb.then(|| p(bd)), raw: wr.then(|| p(raw)) }).collect();
    if !g.matvec_multi(&projs, p(&xd), Some((p(&nd), eps)))? {
        return Err("matvec_multi declined three block-format matrices".into());
    }
    for (ty, rows, _, with_raw, _, _, y, raw, want, want_raw) in &mats {
        check_close(&format!("multi {ty} {rows} rows"), &g.download(y, 0, *rows)?, want, 1e-5)?;
        if *with_raw {
            check_close(&format!("multi {ty} {rows} rows raw"), &g.download(raw, 0, *rows)?, want_raw, 1e-5)?;
        }
    }
    let f32w = QMat::upload(&g, GgmlType::F32, 4, cols, &vec![0u8; 4 * cols * 4], "f32")?;
    let y = g.alloc::<f32>(4, "y")?;
    if g.matvec_multi(&[Proj { w: &f32w, y: p(&y), bias: None, raw: None }], p(&xd), None)? {
        return Err("matvec_multi took an F32 matrix (not staged)".into());
    }
    Ok(())
}

/// matvec / linear (T = 1, 3, 8 through the matvec kernel; T = 37 through dequant + SGEMM) with bias
/// and residual, against dequant + CPU matmul.
fn linear_case(ty: GgmlType, scale: f32, xscale: f32) -> R {
    let g = gpu()?;
    let mut rng = ChaCha8Rng::seed_from_u64(ty.to_u32() as u64 * 1000 + scale as u64);
    for cols in cols_for(ty) {
        let rows = 37;
        let bytes = random_weights(&mut rng, ty, rows, cols, scale);
        let m = cpu_matrix(ty, &bytes, rows, cols);
        let w = QMat::upload(&g, ty, rows, cols, &bytes, "test weight")?;
        // the dequant kernel alone
        let dq = g.alloc::<f32>(rows * cols, "dq")?;
        g.dequant(&w, ptr(&dq, &g.stream))?;
        check_close(&format!("dequant {ty} {rows}x{cols}"), &g.download(&dq, 0, rows * cols)?, &m.data, 1e-6)?;
        let scratch = g.alloc::<f32>(rows * cols, "scratch")?;
        for t in [1usize, 3, 8, 37] {
            let x = randv(&mut rng, t * cols, xscale);
            let bias = randv(&mut rng, rows, xscale);
            let res = randv(&mut rng, t * rows, xscale);
            let want_raw = cpu::matmul(&m, &x);
            let mut want = want_raw.clone();
            cpu::add_bias(&mut want, &bias);
            let want = cpu::add(&want, &res);
            let (xd, bd, rd) = (g.upload(&x, "x")?, g.upload(&bias, "b")?, g.upload(&res, "res")?);
            let y = g.alloc::<f32>(t * rows, "y")?;
            let raw = g.alloc::<f32>(t * rows, "raw")?;
            let p = |b: &cudarc::driver::CudaSlice<f32>| ptr(b, &g.stream);
            g.linear(&w, p(&xd), t, p(&y), Some(p(&bd)), Some(p(&rd)), Some(p(&raw)), Some(&scratch))?;
            let what = format!("linear {ty} {rows}x{cols} T={t} scale {scale}");
            check_close(&format!("{what} raw"), &g.download(&raw, 0, t * rows)?, &want_raw, 1e-5)?;
            check_close(&what, &g.download(&y, 0, t * rows)?, &want, 1e-5)?;
        }
    }
    Ok(())
}

/// The prefill GEMM with TF32 math (the shipped tier's prefill path, CudaOptions::tf32): within
/// TF32's rounding of the CPU product (inputs to 10-bit mantissas: ≈ 5e-4 each), and not the f32
/// path's result bit for bit (so the tensor cores did run).
fn linear_tf32_case() -> R {
    let g = gpu()?;
    let mut rng = ChaCha8Rng::seed_from_u64(4242);
    let (ty, rows, cols, t) = (GgmlType::Q4_K, 96, 512, 37);
    let bytes = random_weights(&mut rng, ty, rows, cols, 1.0);
    let m = cpu_matrix(ty, &bytes, rows, cols);
    let w = QMat::upload(&g, ty, rows, cols, &bytes, "test weight")?;
    let scratch = g.alloc::<f32>(rows * cols, "scratch")?;
    let x = randv(&mut rng, t * cols, 1.0);
    let want = cpu::matmul(&m, &x);
    let xd = g.upload(&x, "x")?;
    let run = |tf32: bool| -> Result<Vec<f32>, Failed> {
        g.set_tf32(tf32)?;
        let y = g.alloc::<f32>(t * rows, "y")?;
        g.linear(&w, ptr(&xd, &g.stream), t, ptr(&y, &g.stream), None, None, None, Some(&scratch))?;
        Ok(g.download(&y, 0, t * rows)?)
    };
    let (tf32, f32) = (run(true)?, run(false)?);
    check_close("linear Q4_K T=37 f32 math", &f32, &want, 1e-5)?;
    check_close("linear Q4_K T=37 TF32 math", &tf32, &want, 2e-3)?;
    if tf32 == f32 {
        return Err("TF32 math gave the f32 path's result bit for bit: the tensor cores did not run".into());
    }
    Ok(())
}

/// The fused gate/up/SwiGLU matvec against two CPU matmuls and swiglu.
fn swiglu_case(ty: GgmlType) -> R {
    let g = gpu()?;
    let mut rng = ChaCha8Rng::seed_from_u64(77 + ty.to_u32() as u64);
    let cols = cols_for(ty)[0];
    let rows = 45;
    let (bg, bu) = (random_weights(&mut rng, ty, rows, cols, 1.0), random_weights(&mut rng, ty, rows, cols, 1.0));
    let (mg, mu) = (cpu_matrix(ty, &bg, rows, cols), cpu_matrix(ty, &bu, rows, cols));
    let (wg, wu) = (QMat::upload(&g, ty, rows, cols, &bg, "gate")?, QMat::upload(&g, ty, rows, cols, &bu, "up")?);
    for t in [1usize, 5] {
        let x = randv(&mut rng, t * cols, 2.0);
        let (gw, uw) = (cpu::matmul(&mg, &x), cpu::matmul(&mu, &x));
        let sw = cpu::swiglu(&gw, &uw);
        let xd = g.upload(&x, "x")?;
        let (s, go, uo) = (g.alloc::<f32>(t * rows, "s")?, g.alloc::<f32>(t * rows, "g")?, g.alloc::<f32>(t * rows, "u")?);
        let p = |b: &cudarc::driver::CudaSlice<f32>| ptr(b, &g.stream);
        g.matvec_swiglu(&wg, &wu, p(&xd), t, p(&s), Some(p(&go)), Some(p(&uo)), None)?;
        check_close(&format!("gate {ty} T={t}"), &g.download(&go, 0, t * rows)?, &gw, 1e-5)?;
        check_close(&format!("up {ty} T={t}"), &g.download(&uo, 0, t * rows)?, &uw, 1e-5)?;
        check_close(&format!("swiglu {ty} T={t}"), &g.download(&s, 0, t * rows)?, &sw, 1e-5)?;
        // the unfused swiglu kernel on the same products
        let s2 = g.alloc::<f32>(t * rows, "s2")?;
        g.swiglu(p(&go), p(&uo), p(&s2), t * rows)?;
        check_close(
            &format!("swiglu_f32 {ty} T={t}"),
            &g.download(&s2, 0, t * rows)?,
            &cpu::swiglu(&g.download(&go, 0, t * rows)?, &g.download(&uo, 0, t * rows)?),
            1e-6,
        )?;
    }
    Ok(())
}

/// The matvec kernels with the RMSNorm fused in, against CPU rmsnorm · weight, then matmul / swiglu.
fn fused_norm_case(ty: GgmlType) -> R {
    let g = gpu()?;
    let mut rng = ChaCha8Rng::seed_from_u64(99 + ty.to_u32() as u64);
    let cols = cols_for(ty)[0]; // 33 for F32/F16: a width that is not a multiple of 16
    let rows = 29;
    let (b1, b2) = (random_weights(&mut rng, ty, rows, cols, 1.0), random_weights(&mut rng, ty, rows, cols, 1.0));
    let (m1, m2) = (cpu_matrix(ty, &b1, rows, cols), cpu_matrix(ty, &b2, rows, cols));
    let (w1, w2) = (QMat::upload(&g, ty, rows, cols, &b1, "w1")?, QMat::upload(&g, ty, rows, cols, &b2, "w2")?);
    let eps = 1e-6f32;
    for (t, xs) in [(1usize, 1.0f32), (4, 1e4), (8, 1e-3)] {
        let x = randv(&mut rng, t * cols, xs);
        let nw = randv(&mut rng, cols, 2.0);
        let xn = cpu::mul_rows(&cpu::rmsnorm(&x, cols, eps), &nw);
        let want = cpu::matmul(&m1, &xn);
        let want_s = cpu::swiglu(&cpu::matmul(&m1, &xn), &cpu::matmul(&m2, &xn));
        let (xd, nd) = (g.upload(&x, "x")?, g.upload(&nw, "nw")?);
        let (y, s) = (g.alloc::<f32>(t * rows, "y")?, g.alloc::<f32>(t * rows, "s")?);
        let p = |b: &cudarc::driver::CudaSlice<f32>| ptr(b, &g.stream);
        g.matvec(&w1, p(&xd), t, p(&y), None, None, None, Some((p(&nd), eps)))?;
        check_close(&format!("matvec+norm {ty} T={t} x scale {xs}"), &g.download(&y, 0, t * rows)?, &want, 1e-5)?;
        g.matvec_swiglu(&w1, &w2, p(&xd), t, p(&s), None, None, Some((p(&nd), eps)))?;
        check_close(&format!("swiglu+norm {ty} T={t} x scale {xs}"), &g.download(&s, 0, t * rows)?, &want_s, 1e-5)?;
    }
    Ok(())
}

/// The int8-activation decode kernels (the shipped tier's fast arithmetic, `Gpu::int8_decode`:
/// quant.cu `matvec1q_*`, `matvec_swiglu1q_*`, `matvec1q_multi`) against their CPU twin, dequantized
/// weights times `cpu::quantize_q8` of x, for every block format: a matvec with bias, residual and
/// raw output at each width of cols_for, a tall one with the RMSNorm fused (several rows a warp),
/// gate/up/SwiGLU, and Q/K/V in one launch. Each is also shown to differ from the f32 product (by
/// more than 1e-4), so the int8 kernels did run.
fn int8_decode_case(ty: GgmlType) -> R {
    let mut g = gpu()?;
    g.int8_decode = true;
    let mut rng = ChaCha8Rng::seed_from_u64(4242 + ty.to_u32() as u64);
    let p = |b: &cudarc::driver::CudaSlice<f32>| ptr(b, &g.stream);
    let quantized_visible = |what: &str, got: &[f32], exact: &[f32]| -> R {
        let d = rel_l2(got, exact);
        if d < 1e-4 {
            return Err(format!("{what}: int8 result within {d:.1e} of the f32 product: the int8 kernel did not run").into());
        }
        Ok(())
    };
    let eps = 1e-6f32;
    for (i, cols) in cols_for(ty).into_iter().enumerate() {
        let rows = if i == 1 { 8450 } else { 37 };
        let bytes = random_weights(&mut rng, ty, rows, cols, 1.0);
        let m = cpu_matrix(ty, &bytes, rows, cols);
        let w = QMat::upload(&g, ty, rows, cols, &bytes, "w")?;
        let x = randv(&mut rng, cols, 2.0);
        let (bias, res) = (randv(&mut rng, rows, 1.0), randv(&mut rng, rows, 1.0));
        let raw_want = cpu::matmul(&m, &cpu::quantize_q8(&x));
        let mut want = raw_want.clone();
        cpu::add_bias(&mut want, &bias);
        let want = cpu::add(&want, &res);
        let (xd, bd, rd) = (g.upload(&x, "x")?, g.upload(&bias, "bias")?, g.upload(&res, "res")?);
        let (y, raw) = (g.alloc::<f32>(rows, "y")?, g.alloc::<f32>(rows, "raw")?);
        g.matvec(&w, p(&xd), 1, p(&y), Some(p(&bd)), Some(p(&rd)), Some(p(&raw)), None)?;
        let what = format!("int8 matvec {ty} {rows}x{cols}");
        check_close(&what, &g.download(&y, 0, rows)?, &want, 1e-5)?;
        let got_raw = g.download(&raw, 0, rows)?;
        check_close(&format!("{what} raw"), &got_raw, &raw_want, 1e-5)?;
        quantized_visible(&what, &got_raw, &cpu::matmul(&m, &x))?;
        // with the RMSNorm fused
        let nw = randv(&mut rng, cols, 2.0);
        let nd = g.upload(&nw, "norm")?;
        g.matvec(&w, p(&xd), 1, p(&y), None, None, None, Some((p(&nd), eps)))?;
        check_close(&format!("{what} + norm"), &g.download(&y, 0, rows)?, &cpu::matmul(&m, &twins::q8_normed(&x, &nw, eps)), 1e-5)?;
    }
    // gate, up and SwiGLU, RMSNorm fused
    let (rows, cols) = (45, cols_for(ty)[1]);
    let (bg, bu) = (random_weights(&mut rng, ty, rows, cols, 1.0), random_weights(&mut rng, ty, rows, cols, 1.0));
    let (mg, mu) = (cpu_matrix(ty, &bg, rows, cols), cpu_matrix(ty, &bu, rows, cols));
    let (wg, wu) = (QMat::upload(&g, ty, rows, cols, &bg, "gate")?, QMat::upload(&g, ty, rows, cols, &bu, "up")?);
    let (x, nw) = (randv(&mut rng, cols, 2.0), randv(&mut rng, cols, 2.0));
    let xq = twins::q8_normed(&x, &nw, eps);
    let (gw, uw) = (cpu::matmul(&mg, &xq), cpu::matmul(&mu, &xq));
    let (xd, nd) = (g.upload(&x, "x")?, g.upload(&nw, "norm")?);
    let (s, go, uo) = (g.alloc::<f32>(rows, "s")?, g.alloc::<f32>(rows, "g")?, g.alloc::<f32>(rows, "u")?);
    g.matvec_swiglu(&wg, &wu, p(&xd), 1, p(&s), Some(p(&go)), Some(p(&uo)), Some((p(&nd), eps)))?;
    check_gate_up_swiglu(&format!("int8 {ty}"), [&g.download(&go, 0, rows)?, &g.download(&uo, 0, rows)?, &g.download(&s, 0, rows)?], &gw, &uw)?;
    // Q, K and V in one launch: this format, then Q8_0 and Q5_0 beside it
    let specs = [(ty, 21usize), (GgmlType::Q8_0, 8), (GgmlType::Q5_0, 13)];
    let mut mats = Vec::new();
    for &(t, rows) in &specs {
        let bytes = random_weights(&mut rng, t, rows, cols, 1.0);
        let want = cpu::matmul(&cpu_matrix(t, &bytes, rows, cols), &xq);
        mats.push((t, rows, QMat::upload(&g, t, rows, cols, &bytes, "w")?, g.alloc::<f32>(rows, "y")?, want));
    }
    let projs: Vec<Proj> = mats.iter().map(|(_, _, w, y, _)| Proj { w, y: p(y), bias: None, raw: None }).collect();
    if !g.matvec_multi(&projs, p(&xd), Some((p(&nd), eps)))? {
        return Err("int8 matvec_multi declined three block-format matrices".into());
    }
    for (t, rows, _, y, want) in &mats {
        check_close(&format!("int8 multi {t} {rows} rows (with {ty})"), &g.download(y, 0, *rows)?, want, 1e-5)?;
    }
    Ok(())
}

fn get_rows_case(ty: GgmlType) -> R {
    let g = gpu()?;
    let mut rng = ChaCha8Rng::seed_from_u64(5 + ty.to_u32() as u64);
    let cols = *cols_for(ty).last().unwrap();
    let rows = 50;
    let bytes = random_weights(&mut rng, ty, rows, cols, 3.0);
    let m = cpu_matrix(ty, &bytes, rows, cols);
    let w = QMat::upload(&g, ty, rows, cols, &bytes, "table")?;
    let toks = [49u32, 0, 7, 49, 13];
    let want = cpu::embedding(&m, &toks)?;
    let ti: Vec<i32> = toks.iter().map(|&t| t as i32).collect();
    let td = g.upload(&ti, "tokens")?;
    let x = g.alloc::<f32>(toks.len() * cols, "x")?;
    g.get_rows(&w, ptr(&td, &g.stream), toks.len(), ptr(&x, &g.stream))?;
    check_close(&format!("get_rows {ty}"), &g.download(&x, 0, toks.len() * cols)?, &want, 0.0)?;
    Ok(())
}

/// Gpu::dequant_rows (the `dequant_{ty}` kernel on a range of rows: `dq16`, the matvecs' own
/// dequantization, which the `dequant` check observes) against the CPU's crate::dequant, bit for bit:
/// ranges at the start, the middle and the end of a matrix, and the whole of it.
fn dequant_rows_case(ty: GgmlType) -> R {
    let g = gpu()?;
    let mut rng = ChaCha8Rng::seed_from_u64(900 + ty.to_u32() as u64);
    for cols in cols_for(ty) {
        let rows = 37;
        let bytes = random_weights(&mut rng, ty, rows, cols, 2.0);
        let m = cpu_matrix(ty, &bytes, rows, cols);
        let w = QMat::upload(&g, ty, rows, cols, &bytes, "weight")?;
        for r in [0..1, 5..12, 36..37, 0..37, 9..9] {
            let out = g.alloc::<f32>(r.len() * cols, "rows")?;
            g.dequant_rows(&w, r.clone(), ptr(&out, &g.stream))?;
            let got = g.download(&out, 0, r.len() * cols)?;
            bit_equal(&format!("dequant_rows {ty} {rows}x{cols} rows {r:?}"), &got, &m.data[r.start * cols..r.end * cols])?;
        }
        if g.dequant_rows(&w, 30..38, 0).is_ok() {
            return Err(format!("dequant_rows {ty}: rows 30..38 of 37 accepted").into());
        }
    }
    Ok(())
}

/// Backend::dequantize_rows of the CUDA backend against the CPU backend's, every row of every tensor
/// of the tiny models (every type the CUDA backend reads but F16), bit for bit; with the q4k-min-sign
/// fault both give the fault's values for Q4_K (and differ from the clean ones).
fn backend_dequantize_rows_case() -> R {
    use lockstep_engine::backend::Backend;
    use lockstep_engine::cpu::CpuBackend;
    use lockstep_engine::cuda::CudaBackend;
    let dir = lockstep_engine::fetch::golden_dir().join("models");
    for (model, fault) in [("tiny-qwen2", None), ("tiny-llama", None), ("tiny-qwen2", Some(Fault::Q4kMinSign))] {
        let file = lockstep_engine::gguf::GgufFile::open(&dir.join(format!("{model}.q.gguf"))).map_err(|e| format!("{e:#}"))?;
        let cpu = CpuBackend::load_with_fault(&file, Default::default(), fault).map_err(|e| format!("{e:#}"))?;
        let cuda = CudaBackend::load_with_fault(&file, Default::default(), fault).map_err(|e| format!("{e:#}"))?;
        let mut q4k_differs = false;
        for t in &file.tensors {
            let n = t.n_rows() as usize;
            let what = format!("{model} {} ({}, fault {fault:?})", t.name, t.ty);
            let want = cpu.dequantize_rows(&file, &t.name, 0..n).map_err(|e| format!("{what}: cpu: {e:#}"))?;
            let got = cuda.dequantize_rows(&file, &t.name, 0..n).map_err(|e| format!("{what}: cuda: {e:#}"))?;
            bit_equal(&what, &got, &want)?;
            let part = cuda.dequantize_rows(&file, &t.name, n / 2..n).map_err(|e| format!("{what}: cuda: {e:#}"))?;
            bit_equal(&format!("{what} rows {}..{n}", n / 2), &part, &want[n / 2 * t.row_len() as usize..])?;
            if fault.is_some() && t.ty == GgmlType::Q4_K {
                q4k_differs |= want != dequant::dequantize_tensor(&file, t).map_err(|e| e.to_string())?;
            }
        }
        if fault.is_some() && !q4k_differs {
            return Err(format!("{model}: the q4k-min-sign fault changed no Q4_K value").into());
        }
    }
    Ok(())
}

fn rmsnorm_add_case() -> R {
    let g = gpu()?;
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    for (n, scale) in [(897usize, 1.0f32), (64, 1e15), (5, 1e-20), (4864, 300.0)] {
        let rows = 3;
        let x = randv(&mut rng, rows * n, scale);
        let w = randv(&mut rng, n, 2.0);
        let eps = 1e-6;
        let want_n = cpu::rmsnorm(&x, n, eps);
        let want = cpu::mul_rows(&want_n, &w);
        let (xd, wd) = (g.upload(&x, "x")?, g.upload(&w, "w")?);
        let (yn, y) = (g.alloc::<f32>(rows * n, "yn")?, g.alloc::<f32>(rows * n, "y")?);
        let p = |b: &cudarc::driver::CudaSlice<f32>| ptr(b, &g.stream);
        g.rmsnorm(p(&xd), p(&wd), Some(p(&yn)), p(&y), rows, n, eps)?;
        check_close(&format!("rmsnorm n={n} scale {scale}"), &g.download(&yn, 0, rows * n)?, &want_n, 1e-6)?;
        check_close(&format!("rmsnorm·w n={n} scale {scale}"), &g.download(&y, 0, rows * n)?, &want, 1e-6)?;
        // add: a + bias + res, in place into a
        let bias = randv(&mut rng, n, scale);
        let mut want_add = x.clone();
        cpu::add_bias(&mut want_add, &bias);
        let want_add = cpu::add(&want_add, &want);
        let bd = g.upload(&bias, "bias")?;
        g.add(p(&xd), Some(p(&bd)), n, Some(p(&y)), p(&xd), rows * n)?;
        check_close(&format!("add n={n}"), &g.download(&xd, 0, rows * n)?, &want_add, 1e-7)?;
    }
    Ok(())
}

/// rmsnorm_f16sat (the f16-accumulation fault) against its CPU twin faults::rmsnorm: rows whose Σx²
/// stays below 65504 (bit for bit the plain RMSNorm) and rows where it saturates, which must differ
/// from the plain RMSNorm (else the test would not see a kernel that forgot the saturation).
fn rmsnorm_f16sat_case() -> R {
    let g = gpu()?;
    let mut rng = ChaCha8Rng::seed_from_u64(12);
    let f16 = Some(Fault::F16Accumulation);
    // (width, scale): Σx² ≈ n·scale²/3 → 0.3 (below), 2.7e7 and 8e5 (saturated), 1.5e5 (just past)
    for (n, scale) in [(897usize, 0.03f32), (897, 300.0), (4864, 22.0), (64, 85.0)] {
        let rows = 3;
        let x = randv(&mut rng, rows * n, scale);
        let w = randv(&mut rng, n, 2.0);
        let eps = 1e-6;
        let want_n = faults::rmsnorm(f16, &x, n, eps);
        let want = cpu::mul_rows(&want_n, &w);
        let saturated = x.chunks(n).any(|r| r.iter().map(|&v| (v * v) as f64).sum::<f64>() > faults::F16_MAX as f64);
        if saturated == (want_n == cpu::rmsnorm(&x, n, eps)) {
            return Err(format!("n={n} scale {scale}: the CPU twin {} the plain RMSNorm", if saturated { "equals" } else { "differs from" }).into());
        }
        let (xd, wd) = (g.upload(&x, "x")?, g.upload(&w, "w")?);
        let (yn, y) = (g.alloc::<f32>(rows * n, "yn")?, g.alloc::<f32>(rows * n, "y")?);
        let p = |b: &cudarc::driver::CudaSlice<f32>| ptr(b, &g.stream);
        g.rmsnorm_f16sat(p(&xd), p(&wd), Some(p(&yn)), p(&y), rows, n, eps)?;
        let what = format!("rmsnorm_f16sat n={n} scale {scale} (saturated: {saturated})");
        check_close(&what, &g.download(&yn, 0, rows * n)?, &want_n, 1e-6)?;
        check_close(&format!("{what} ·w"), &g.download(&y, 0, rows * n)?, &want, 1e-6)?;
    }
    Ok(())
}

/// gelu_mul (the gelu-activation fault) against its CPU twin faults::swiglu: GELU's tanh
/// approximation of the gate times up, on both sides of 0, far into both tails and near 0.
fn gelu_mul_case() -> R {
    let g = gpu()?;
    let mut rng = ChaCha8Rng::seed_from_u64(13);
    for (n, scale) in [(4864usize, 3.0f32), (1001, 30.0), (37, 1e-3)] {
        let (gate, up) = (randv(&mut rng, n, scale), randv(&mut rng, n, 2.0));
        let want = faults::swiglu(Some(Fault::GeluActivation), &gate, &up);
        if scale >= 1.0 && cpu::swiglu(&gate, &up) == want {
            return Err(format!("n={n}: the CPU twin equals SwiGLU").into());
        }
        let (gd, ud, sd) = (g.upload(&gate, "gate")?, g.upload(&up, "up")?, g.alloc::<f32>(n, "s")?);
        let p = |b: &cudarc::driver::CudaSlice<f32>| ptr(b, &g.stream);
        g.gelu_mul(p(&gd), p(&ud), p(&sd), n)?;
        check_close(&format!("gelu_mul n={n} scale {scale}"), &g.download(&sd, 0, n)?, &want, 1e-6)?;
    }
    Ok(())
}

fn rope_case(style: RopeStyle, n_rot: usize) -> R {
    let g = gpu()?;
    let mut rng = ChaCha8Rng::seed_from_u64(21 + n_rot as u64);
    let (t, h, hkv, dh, n_past, ctx) = (3usize, 4usize, 2usize, 16usize, 5usize, 12usize);
    let base = 1e6f32;
    let q = randv(&mut rng, t * h * dh, 10.0);
    let k = randv(&mut rng, t * hkv * dh, 10.0);
    let v = randv(&mut rng, t * hkv * dh, 10.0);
    let positions: Vec<usize> = (n_past..n_past + t).collect();
    let (mut wq, mut wk) = (q.clone(), k.clone());
    cpu::rope(&mut wq, &positions, h, dh, n_rot, base, style);
    cpu::rope(&mut wk, &positions, hkv, dh, n_rot, base, style);
    let p = |b: &cudarc::driver::CudaSlice<f32>| ptr(b, &g.stream);
    let (qd, kd, vd) = (g.upload(&q, "q")?, g.upload(&k, "k")?, g.upload(&v, "v")?);
    let kr = g.alloc::<f32>(k.len(), "krot")?;
    let (kc, vc) = (g.alloc::<f32>(ctx * hkv * dh, "kc")?, g.alloc::<f32>(ctx * hkv * dh, "vc")?);
    let pos = g.upload(&[n_past as i32], "pos")?;
    g.rope_store(&RopeArgs {
        q: p(&qd),
        k: p(&kd),
        k_out: Some(p(&kr)),
        v: p(&vd),
        kc: p(&kc),
        vc: p(&vc),
        pos: ptr(&pos, &g.stream),
        t,
        n_head: h,
        n_head_kv: hkv,
        head_dim: dh,
        n_rot,
        theta_scale: base.powf(-2.0 / n_rot as f32),
        neox: style == RopeStyle::Neox,
    })?;
    let what = format!("rope {style:?} n_rot {n_rot}");
    check_close(&format!("{what} q"), &g.download(&qd, 0, q.len())?, &wq, 1e-6)?;
    check_close(&format!("{what} k"), &g.download(&kr, 0, k.len())?, &wk, 1e-6)?;
    let row = hkv * dh;
    let kcache = g.download(&kc, 0, ctx * row)?;
    let vcache = g.download(&vc, 0, ctx * row)?;
    let mut want_kc = vec![0.0f32; ctx * row];
    let mut want_vc = vec![0.0f32; ctx * row];
    want_kc[n_past * row..(n_past + t) * row].copy_from_slice(&wk);
    want_vc[n_past * row..(n_past + t) * row].copy_from_slice(&v);
    check_close(&format!("{what} K cache"), &kcache, &want_kc, 1e-6)?;
    check_close(&format!("{what} V cache"), &vcache, &want_vc, 0.0)?;
    Ok(())
}

/// attention_f32 against its CPU twins (with `fault`, their crate::faults variants).
fn attention_case(dh: usize, qscale: f32, fault: Option<Fault>) -> R {
    attention_rows_case(dh, qscale, fault, 5, 3)
}

/// attention_f32 with `t` query rows after `n_past` cached positions (the kernel takes rows in tiles
/// of ATT_ROWS: several tiles and a partial last one when t > 8).
fn attention_rows_case(dh: usize, qscale: f32, fault: Option<Fault>, t: usize, n_past: usize) -> R {
    let g = gpu()?;
    let mut rng = ChaCha8Rng::seed_from_u64(31 + dh as u64 + 1000 * t as u64);
    let (h, hkv, ctx) = (6usize, 2usize, n_past + t + 8);
    let kv_len = n_past + t;
    let row = hkv * dh;
    let q = randv(&mut rng, t * h * dh, qscale);
    let kcache = randv(&mut rng, ctx * row, 1.0);
    let vcache = randv(&mut rng, ctx * row, 1.0);
    let dims = AttnDims { n_tokens: t, n_past, n_head: h, n_head_kv: hkv, head_dim: dh };
    let mut cache = KvCache::new(1, row);
    cpu_attn::kv_write(&mut cache, 0, &kcache[..kv_len * row], &vcache[..kv_len * row]);
    let (kc, vc) = cpu_attn::kv_read(&cache, 0, kv_len);
    let scale = 1.0 / (dh as f32).sqrt();
    let want_kq = faults::attn_scores(fault, &q, kc, &dims);
    let want_p = faults::attn_softmax(fault, &want_kq, scale, &dims);
    let want_out = faults::attn_values(fault, &want_p, vc, &dims);
    let p = |b: &cudarc::driver::CudaSlice<f32>| ptr(b, &g.stream);
    let (qd, kd, vd) = (g.upload(&q, "q")?, g.upload(&kcache, "kc")?, g.upload(&vcache, "vc")?);
    let n = h * t * kv_len;
    let (kq, pr, out) = (g.alloc::<f32>(n, "kq")?, g.alloc::<f32>(n, "p")?, g.alloc::<f32>(t * h * dh, "out")?);
    let pos = g.upload(&[n_past as i32], "pos")?;
    g.attention_faulty(
        &AttnArgs {
            q: p(&qd),
            kc: p(&kd),
            vc: p(&vd),
            kq: p(&kq),
            p: p(&pr),
            out: p(&out),
            pos: ptr(&pos, &g.stream),
            t,
            n_head: h,
            n_head_kv: hkv,
            head_dim: dh,
            scale,
            full_scores: true,
        },
        AttnFault::of(fault),
    )?;
    let what = format!("attention Dh={dh} q scale {qscale} fault {fault:?}");
    check_close(&format!("{what} kq"), &g.download(&kq, 0, n)?, &want_kq, 1e-6)?;
    let got_p = g.download(&pr, 0, n)?;
    if got_p.iter().any(|v| !v.is_finite()) {
        return Err(format!("{what}: non-finite probabilities").into());
    }
    check_close(&format!("{what} kq_soft_max"), &got_p, &want_p, 1e-5)?;
    check_close(&format!("{what} kqv_out"), &g.download(&out, 0, t * h * dh)?, &want_out, 1e-5)?;
    Ok(())
}

/// One trial of the fused decode attention: shapes, RoPE, the position p (kv_len = p + 1), cache
/// rows, the magnitude of q and the kernel's fault bits.
#[derive(Debug, Clone, Copy)]
struct DecodeCase {
    dh: usize,
    n_rot: usize,
    style: RopeStyle,
    h: usize,
    hkv: usize,
    p: usize,
    ctx: usize,
    qscale: f32,
    fault: Option<Fault>,
}

/// attention_decode_f32 against its CPU twins composed: rope on q and k at position p, then
/// scores, softmax and values over the cache rows < p and the new row p (with the fault's
/// variants); the cache must hold the rotated k and v at row p and be unchanged elsewhere.
/// `online`: with the int8 decode on (the shipped tier), which runs the online softmax
/// (attention.cu dec_attend_online); the same twins and limits.
fn attention_decode_case(c: DecodeCase, online: bool) -> R {
    let mut g = gpu()?;
    g.int8_decode = online;
    let mut rng = ChaCha8Rng::seed_from_u64(41 + (c.dh * 100_000 + c.p) as u64);
    let (h, hkv, dh, p, ctx) = (c.h, c.hkv, c.dh, c.p, c.ctx);
    let row = hkv * dh;
    let base = 1e6f32;
    let fault = c.fault;
    let q = randv(&mut rng, h * dh, c.qscale);
    let k = randv(&mut rng, row, 1.0);
    let v = randv(&mut rng, row, 1.0);
    let kcache = randv(&mut rng, ctx * row, 1.0);
    let vcache = randv(&mut rng, ctx * row, 1.0);
    let want = twins::decode_attention(&q, &k, &v, &kcache, &vcache, p, (h, hkv, dh), (c.n_rot, c.style, base), fault);
    let (wq, wk, kq, probs, want_out) = (&want.q_rot, &want.k_rot, &want.kq, &want.probs, &want.out);
    let scale = 1.0 / (dh as f32).sqrt();

    let pp = |b: &cudarc::driver::CudaSlice<f32>| ptr(b, &g.stream);
    let (qd, kd, vd) = (g.upload(&q, "q")?, g.upload(&k, "k")?, g.upload(&v, "v")?);
    let (kcd, vcd) = (g.upload(&kcache, "kc")?, g.upload(&vcache, "vc")?);
    let (out, scratch) = (g.alloc::<f32>(h * dh, "out")?, g.alloc::<f32>(h * ctx, "p_scratch")?);
    let pos = g.upload(&[p as i32], "pos")?;
    // the taps the kernel writes when asked (kv_len past the shared-memory scores: the backend takes
    // the prefill path for tapped steps, so the kernel is not asked)
    let kv_len = p + 1;
    let tapped = kv_len <= DECODE_SMEM_SCORES;
    let (tq, tk) = (g.alloc::<f32>(h * dh, "q_rot tap")?, g.alloc::<f32>(hkv * dh, "k_rot tap")?);
    let (tkq, tp) = (g.alloc::<f32>(h * kv_len, "kq tap")?, g.alloc::<f32>(h * kv_len, "p tap")?);
    let taps = if tapped { DecodeTaps { q_rot: pp(&tq), k_rot: pp(&tk), kq: pp(&tkq), p: pp(&tp) } } else { DecodeTaps::default() };
    g.attention_decode(
        &DecodeAttnArgs {
            q: pp(&qd),
            k: pp(&kd),
            v: pp(&vd),
            kc: pp(&kcd),
            vc: pp(&vcd),
            pos: ptr(&pos, &g.stream),
            out: pp(&out),
            p_scratch: (ctx > DECODE_SMEM_SCORES).then(|| pp(&scratch)),
            ctx,
            n_head: h,
            n_head_kv: hkv,
            head_dim: dh,
            n_rot: c.n_rot,
            theta_scale: base.powf(-2.0 / c.n_rot as f32),
            neox: c.style == RopeStyle::Neox,
            scale,
            taps,
        },
        AttnFault::of(fault),
    )?;
    let what = format!("attention_decode {c:?} online {online}");
    if tapped {
        check_close(&format!("{what} Qcur.rope tap"), &g.download(&tq, 0, h * dh)?, wq, 1e-6)?;
        check_close(&format!("{what} Kcur.rope tap"), &g.download(&tk, 0, hkv * dh)?, wk, 1e-6)?;
        check_close_nonfinite(&format!("{what} kq tap"), &g.download(&tkq, 0, h * kv_len)?, kq, 1e-5)?;
        check_close_nonfinite(&format!("{what} kq_soft_max tap"), &g.download(&tp, 0, h * kv_len)?, probs, 1e-5)?;
    }
    check_close_nonfinite(&format!("{what} kqv_out"), &g.download(&out, 0, h * dh)?, want_out, 1e-5)?;
    let got_kc = g.download(&kcd, 0, ctx * row)?;
    let new_k = &got_kc[p * row..(p + 1) * row];
    check_close(&format!("{what} K cache row p"), new_k, wk, 1e-6)?;
    // every other K row untouched (row p, checked just above, taken from the GPU)
    let want_kc = [&kcache[..p * row], new_k, &kcache[(p + 1) * row..]].concat();
    check_close(&format!("{what} K cache"), &got_kc, &want_kc, 0.0)?;
    let want_vc = [&vcache[..p * row], &v[..], &vcache[(p + 1) * row..]].concat();
    check_close(&format!("{what} V cache"), &g.download(&vcd, 0, ctx * row)?, &want_vc, 0.0)?;
    Ok(())
}

fn main() {
    let args = Arguments::from_args();
    let mut list = Vec::new();
    // every format the kernels claim to support
    for ty in SUPPORTED {
        list.push(Trial::test(format!("linear_{ty}"), move || linear_case(ty, 1.0, 1.0)));
        list.push(Trial::test(format!("linear_{ty}_large"), move || linear_case(ty, 3.0e4, 1.0e3)));
        list.push(Trial::test(format!("get_rows_{ty}"), move || get_rows_case(ty)));
        list.push(Trial::test(format!("matvec_swiglu_{ty}"), move || swiglu_case(ty)));
        list.push(Trial::test(format!("matvec_fused_norm_{ty}"), move || fused_norm_case(ty)));
        list.push(Trial::test(format!("matvec_tall_{ty}"), move || tall_matvec_case(ty)));
        list.push(Trial::test(format!("dequant_rows_{ty}"), move || dequant_rows_case(ty)));
        if !matches!(ty, GgmlType::F32 | GgmlType::F16) {
            list.push(Trial::test(format!("int8_decode_{ty}"), move || int8_decode_case(ty)));
        }
    }
    list.push(Trial::test("backend_dequantize_rows", backend_dequantize_rows_case));
    list.push(Trial::test("linear_q4_k_tf32", linear_tf32_case));
    list.push(Trial::test("rmsnorm_and_add", rmsnorm_add_case));
    list.push(Trial::test("rmsnorm_f16sat", rmsnorm_f16sat_case));
    list.push(Trial::test("gelu_mul", gelu_mul_case));
    list.push(Trial::test("matvec_multi_qkv", matvec_multi_case));
    for (style, n_rot) in [(RopeStyle::Neox, 16), (RopeStyle::Normal, 16), (RopeStyle::Neox, 8), (RopeStyle::Normal, 8)] {
        list.push(Trial::test(format!("rope_store_{style:?}_nrot{n_rot}"), move || rope_case(style, n_rot)));
    }
    for (dh, qs) in [(64usize, 1.0f32), (40, 1.0), (64, 300.0), (128, 1.0)] {
        list.push(Trial::test(format!("attention_dh{dh}_qscale{qs}"), move || attention_case(dh, qs, None)));
    }
    // injected faults of the prefill kernel against their CPU twins; a window of 3 hides the first
    // positions from rows ≥ 3 of a batch of 5 after 3 cached positions
    for f in [Fault::CausalMaskMissing, Fault::SoftmaxNoMax, Fault::GqaMapping, Fault::AttentionWindow(3), Fault::AttentionWindow(6)] {
        list.push(Trial::test(format!("attention_dh64_fault_{f:?}"), move || attention_case(64, 1.0, Some(f))));
    }
    // several tiles of query rows, the last one partial, with and without a window and the mask fault
    for (t, n_past, f) in [(21usize, 4usize, None), (37, 0, None), (19, 7, Some(Fault::AttentionWindow(6))), (12, 2, Some(Fault::CausalMaskMissing))] {
        list.push(Trial::test(format!("attention_dh64_rows{t}_past{n_past}_fault_{f:?}"), move || attention_rows_case(64, 1.0, f, t, n_past)));
    }
    list.push(Trial::test("attention_dh40_rows13", move || attention_rows_case(40, 1.0, None, 13, 5)));
    let window = |n| Some(Fault::AttentionWindow(n));
    let qwen = |p: usize, ctx: usize, qscale: f32, fault: Option<Fault>| DecodeCase {
        dh: 64,
        n_rot: 64,
        style: RopeStyle::Neox,
        h: 14,
        hkv: 2,
        p,
        ctx,
        qscale,
        fault,
    };
    let other = |dh: usize, n_rot: usize, style: RopeStyle, h: usize, hkv: usize, p: usize| DecodeCase {
        dh,
        n_rot,
        style,
        h,
        hkv,
        p,
        ctx: p + 9,
        qscale: 1.0,
        fault: None,
    };
    let cap = DECODE_SMEM_SCORES;
    for c in [
        // qwen2.5 0.5B's shape at the first position, a few and a typical number
        qwen(0, 600, 1.0, None),
        qwen(5, 600, 1.0, None),
        qwen(300, 600, 1.0, None),
        qwen(300, 600, 300.0, None),
        // the last kv_len whose scores fit in shared memory, and the global scratch past it
        qwen(cap - 1, cap + 900, 1.0, None),
        qwen(cap, cap + 900, 1.0, None),
        qwen(9000, 9100, 1.0, None),
        // injected faults: softmax without max subtraction (finite, then overflowing), modulo GQA
        qwen(300, 600, 1.0, Some(Fault::SoftmaxNoMax)),
        qwen(300, 600, 300.0, Some(Fault::SoftmaxNoMax)),
        qwen(300, 600, 1.0, Some(Fault::GqaMapping)),
        // the attention-window fault: inside the window (nothing changes), past it, and past the
        // shared-memory scores
        qwen(50, 600, 1.0, window(80)),
        qwen(300, 600, 1.0, window(80)),
        qwen(9000, 9100, 1.0, window(512)),
        // other head sizes (float2 chunks for Dh % 4 = 2), partial rotation, no grouping
        other(40, 40, RopeStyle::Normal, 6, 2, 37),
        other(42, 42, RopeStyle::Normal, 6, 2, 37),
        other(18, 10, RopeStyle::Neox, 4, 2, 7),
        other(128, 64, RopeStyle::Neox, 8, 2, 77),
        other(256, 128, RopeStyle::Normal, 4, 1, 50),
        other(16, 16, RopeStyle::Normal, 4, 4, 9),
    ] {
        let fault = c.fault.map_or("None".to_string(), |f| format!("{f:?}"));
        for online in [false, true] {
            let softmax = if online { "_online" } else { "" };
            let name =
                format!("attention_decode{softmax}_dh{}_{:?}_nrot{}_h{}x{}_p{}_qscale{}_fault_{fault}", c.dh, c.style, c.n_rot, c.h, c.hkv, c.p, c.qscale);
            list.push(Trial::test(name, move || attention_decode_case(c, online)));
        }
    }
    libtest_mimic::run(&args, trials(list)).exit();
}
