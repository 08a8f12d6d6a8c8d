//! GGML block formats to f32, bit-identical to gguf-py's `gguf.quants.dequantize`.
//!
//! Each `block_*` function turns one block's bytes into its `block_size` values, following ggml's
//! `dequantize_row_*` (ggml/src/ggml-quants.c). Arithmetic is done in f32 in the same order as
//! gguf-py (`(d * sc) * q - (dmin * m)` for the k-quants, no fused multiply-add), so the results
//! match the golden files bit for bit.
//!
//! Block layouts (bytes, in order; `d`/`m`/`dmin` are f16 unless noted):
//! - Q4_0 (32 el, 18 B): d, qs[16]. Element j<16: `qs[j] & 15`, j≥16: `qs[j-16] >> 4`; `d·(q−8)`.
//! - Q4_1 (32, 20): d, m, qs[16]; `d·q + m`.
//! - Q5_0 (32, 22): d, qh u32, qs[16]; 5th bit of element j is bit j of qh; `d·(q−16)`.
//! - Q5_1 (32, 24): d, m, qh u32, qs[16]; `d·q + m`.
//! - Q8_0 (32, 34): d, qs i8[32]; `q·d`.
//! - Q2_K (256, 84): scales[16] (lo nibble scale, hi nibble min), qs[64], d, dmin.
//! - Q3_K (256, 110): hmask[32], qs[64], scales[12] (16 six-bit scales, −32), d.
//! - Q4_K (256, 144): d, dmin, scales[12] (8 six-bit scales + 8 six-bit mins), qs[128].
//! - Q5_K (256, 176): d, dmin, scales[12], qh[32], qs[128].
//! - Q6_K (256, 210): ql[128], qh[64], scales i8[16], d.
//!
//! Hand-written: no maintained Rust crate offers these formats with gguf-py's exact rounding order
//! (candle's are close but tied to its tensor types).

use crate::gguf::{GgmlType, GgufFile, TensorInfo};
use half::{bf16, f16};
use rayon::prelude::*;
use std::ops::Range;

#[derive(thiserror::Error, Debug)]
pub enum DequantError {
    #[error("dequantization of {ty} is not implemented")]
    Unsupported { ty: GgmlType },
    #[error("{ty}: {n_elements} elements is not a whole number of {block_size}-element blocks")]
    PartialBlock { ty: GgmlType, n_elements: usize, block_size: usize },
    #[error("{ty}: {n_elements} elements need {expected_bytes} bytes, got {got_bytes}")]
    SizeMismatch { ty: GgmlType, n_elements: usize, expected_bytes: usize, got_bytes: usize },
    #[error("tensor {tensor:?} in {file}: rows {start}..{end} out of range (it has {n_rows} rows)")]
    RowsOutOfRange { tensor: String, file: String, start: usize, end: usize, n_rows: usize },
    #[error("tensor {tensor:?} in {file}: {source}")]
    InTensor {
        tensor: String,
        file: String,
        #[source]
        source: Box<DequantError>,
    },
}

/// Whether [`dequantize`] handles `ty`.
pub fn is_supported(ty: GgmlType) -> bool {
    block_fn(ty).is_some()
}

/// One block's bytes (exactly `type_size`) to its `block_size` values.
type BlockFn = fn(&[u8], &mut [f32]);

fn block_fn(ty: GgmlType) -> Option<BlockFn> {
    use GgmlType::*;
    Some(match ty {
        F32 => block_f32,
        F16 => block_f16,
        BF16 => block_bf16,
        Q4_0 => block_q4_0,
        Q4_1 => block_q4_1,
        Q5_0 => block_q5_0,
        Q5_1 => block_q5_1,
        Q8_0 => block_q8_0,
        Q2_K => block_q2_k,
        Q3_K => block_q3_k,
        Q4_K => block_q4_k,
        Q5_K => block_q5_k,
        Q6_K => block_q6_k,
        _ => return None,
    })
}

#[inline]
fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[i], b[i + 1]])).to_f32()
}

fn block_f32(b: &[u8], y: &mut [f32]) {
    for (y, c) in y.iter_mut().zip(b.chunks_exact(4)) {
        *y = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
    }
}

fn block_f16(b: &[u8], y: &mut [f32]) {
    for (y, c) in y.iter_mut().zip(b.chunks_exact(2)) {
        *y = f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
    }
}

fn block_bf16(b: &[u8], y: &mut [f32]) {
    for (y, c) in y.iter_mut().zip(b.chunks_exact(2)) {
        *y = bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
    }
}

// The block functions below are pub(crate) and #[inline(always)]: the CPU backend's matmul (cpu/matmul.rs)
// calls them per block as it reads a row (one monomorphized loop per type).
#[inline(always)]
pub(crate) fn block_q4_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let qs = &b[2..18];
    for j in 0..16 {
        y[j] = d * ((qs[j] & 0x0F) as i32 - 8) as f32;
        y[j + 16] = d * ((qs[j] >> 4) as i32 - 8) as f32;
    }
}

#[inline(always)]
pub(crate) fn block_q4_1(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    let qs = &b[4..20];
    for j in 0..16 {
        y[j] = d * (qs[j] & 0x0F) as f32 + m;
        y[j + 16] = d * (qs[j] >> 4) as f32 + m;
    }
}

#[inline(always)]
pub(crate) fn block_q5_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    let qs = &b[6..22];
    for j in 0..16 {
        let h0 = ((qh >> j) & 1) as u8;
        let h1 = ((qh >> (j + 16)) & 1) as u8;
        y[j] = d * (((qs[j] & 0x0F) | (h0 << 4)) as i32 - 16) as f32;
        y[j + 16] = d * (((qs[j] >> 4) | (h1 << 4)) as i32 - 16) as f32;
    }
}

#[inline(always)]
pub(crate) fn block_q5_1(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    let qs = &b[8..24];
    for j in 0..16 {
        let h0 = ((qh >> j) & 1) as u8;
        let h1 = ((qh >> (j + 16)) & 1) as u8;
        y[j] = d * ((qs[j] & 0x0F) | (h0 << 4)) as f32 + m;
        y[j + 16] = d * ((qs[j] >> 4) | (h1 << 4)) as f32 + m;
    }
}

#[inline(always)]
pub(crate) fn block_q8_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for (y, &q) in y.iter_mut().zip(&b[2..34]) {
        *y = (q as i8) as f32 * d;
    }
}

#[inline(always)]
pub(crate) fn block_q2_k(b: &[u8], y: &mut [f32]) {
    let scales = &b[0..16];
    let qs = &b[16..80];
    let d = f16_at(b, 80);
    let dmin = f16_at(b, 82);
    // Element e = 128·c + 32·s + l takes bits 2s..2s+2 of qs[32c + l]; its scale is scales[e / 16].
    for c in 0..2 {
        for s in 0..4 {
            for l in 0..32 {
                let e = 128 * c + 32 * s + l;
                let sc = scales[e / 16];
                let dl = d * (sc & 0x0F) as f32;
                let ml = dmin * (sc >> 4) as f32;
                let q = (qs[32 * c + l] >> (2 * s)) & 3;
                y[e] = dl * q as f32 - ml;
            }
        }
    }
}

#[inline(always)]
pub(crate) fn block_q3_k(b: &[u8], y: &mut [f32]) {
    let hmask = &b[0..32];
    let qs = &b[32..96];
    let sc = &b[96..108];
    let d = f16_at(b, 108);
    // 16 six-bit scales: low 4 bits from sc[i % 8] (nibble i / 8), high 2 bits from sc[8 + i % 4]
    // (bits 2·(i / 4)), minus 32.
    let mut dl = [0f32; 16];
    for (i, dl) in dl.iter_mut().enumerate() {
        let lo = (sc[i % 8] >> (4 * (i / 8))) & 0x0F;
        let hi = (sc[8 + i % 4] >> (2 * (i / 4))) & 0x03;
        *dl = d * ((lo | (hi << 4)) as i32 - 32) as f32;
    }
    // Element e = 128·c + 32·s + l: low 2 bits from qs[32c + l] >> 2s; the high bit is bit (e / 32) of
    // hmask[l], and a CLEAR bit subtracts 4.
    for c in 0..2 {
        for s in 0..4 {
            for l in 0..32 {
                let e = 128 * c + 32 * s + l;
                let lo = ((qs[32 * c + l] >> (2 * s)) & 3) as i32;
                let h = ((hmask[l] >> (e / 32)) & 1) as i32;
                let q = lo - ((h ^ 1) << 2);
                y[e] = dl[e / 16] * q as f32;
            }
        }
    }
}

/// The 8 six-bit scales and 8 six-bit mins of Q4_K / Q5_K (ggml's `get_scale_min_k4`).
/// (pub(crate): the CPU backend's AVX2 Q4_K dequantizer, cpu/blocks_avx2.rs, decodes them with it.)
#[inline]
pub(crate) fn scale_min_k4(s: &[u8]) -> ([u8; 8], [u8; 8]) {
    let mut sc = [0u8; 8];
    let mut mn = [0u8; 8];
    for j in 0..4 {
        sc[j] = s[j] & 0x3F;
        mn[j] = s[j + 4] & 0x3F;
        sc[j + 4] = (s[j + 8] & 0x0F) | ((s[j] >> 2) & 0x30);
        mn[j + 4] = (s[j + 8] >> 4) | ((s[j + 4] >> 2) & 0x30);
    }
    (sc, mn)
}

#[inline(always)]
pub(crate) fn block_q4_k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let dmin = f16_at(b, 2);
    let (sc, mn) = scale_min_k4(&b[4..16]);
    let qs = &b[16..144];
    // Sub-block j = 2c + s (32 elements): nibble s of qs[32c + l].
    for c in 0..4 {
        for s in 0..2 {
            let j = 2 * c + s;
            let dl = d * sc[j] as f32;
            let ml = dmin * mn[j] as f32;
            for l in 0..32 {
                let q = (qs[32 * c + l] >> (4 * s)) & 0x0F;
                y[32 * j + l] = dl * q as f32 - ml;
            }
        }
    }
}

#[inline(always)]
pub(crate) fn block_q5_k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let dmin = f16_at(b, 2);
    let (sc, mn) = scale_min_k4(&b[4..16]);
    let qh = &b[16..48];
    let qs = &b[48..176];
    for c in 0..4 {
        for s in 0..2 {
            let j = 2 * c + s;
            let dl = d * sc[j] as f32;
            let ml = dmin * mn[j] as f32;
            for l in 0..32 {
                let lo = (qs[32 * c + l] >> (4 * s)) & 0x0F;
                let hi = (qh[l] >> j) & 1;
                y[32 * j + l] = dl * (lo | (hi << 4)) as f32 - ml;
            }
        }
    }
}

#[inline(always)]
pub(crate) fn block_q6_k(b: &[u8], y: &mut [f32]) {
    let ql = &b[0..128];
    let qh = &b[128..192];
    let scales = &b[192..208];
    let d = f16_at(b, 208);
    // Element e = 128·c + 32·s + l (s in 0..4): low nibble s / 2 of ql[64c + 32(s % 2) + l], high 2 bits
    // from qh[32c + l] >> 2s; minus 32; scale scales[e / 16] (i8).
    for c in 0..2 {
        for s in 0..4 {
            for l in 0..32 {
                let e = 128 * c + 32 * s + l;
                let lo = (ql[64 * c + 32 * (s % 2) + l] >> (4 * (s / 2))) & 0x0F;
                let hi = (qh[32 * c + l] >> (2 * s)) & 3;
                let q = (lo | (hi << 4)) as i32 - 32;
                let dl = d * (scales[e / 16] as i8) as f32;
                y[e] = dl * q as f32;
            }
        }
    }
}

/// Bytes needed for `n_elements` of `ty`, or the error saying why there is no such size.
pub fn bytes_needed(ty: GgmlType, n_elements: usize) -> Result<usize, DequantError> {
    let bs = ty.block_size();
    if !n_elements.is_multiple_of(bs) {
        return Err(DequantError::PartialBlock { ty, n_elements, block_size: bs });
    }
    Ok(n_elements / bs * ty.type_size())
}

fn check(ty: GgmlType, data: &[u8], n_elements: usize) -> Result<BlockFn, DequantError> {
    let f = block_fn(ty).ok_or(DequantError::Unsupported { ty })?;
    let expected_bytes = bytes_needed(ty, n_elements)?;
    if data.len() != expected_bytes {
        return Err(DequantError::SizeMismatch { ty, n_elements, expected_bytes, got_bytes: data.len() });
    }
    Ok(f)
}

/// Dequantizes `data` (whole blocks, exactly `n_elements` worth) on the calling thread into `out`.
pub fn dequantize_into(ty: GgmlType, data: &[u8], out: &mut [f32]) -> Result<(), DequantError> {
    let f = check(ty, data, out.len())?;
    run_blocks(ty, f, data, out);
    Ok(())
}

fn run_blocks(ty: GgmlType, f: BlockFn, data: &[u8], out: &mut [f32]) {
    let (bs, ts) = (ty.block_size(), ty.type_size());
    if bs == 1 {
        // The plain types convert a whole slice at once.
        f(data, out);
    } else {
        for (b, y) in data.chunks_exact(ts).zip(out.chunks_exact_mut(bs)) {
            f(b, y);
        }
    }
}

/// Dequantizes `data` on the calling thread.
pub fn dequantize(ty: GgmlType, data: &[u8], n_elements: usize) -> Result<Vec<f32>, DequantError> {
    let f = check(ty, data, n_elements)?;
    let mut out = vec![0f32; n_elements];
    run_blocks(ty, f, data, &mut out);
    Ok(out)
}

/// Like [`dequantize_into`], spread over rayon's pool in chunks of whole blocks.
pub fn dequantize_par_into(ty: GgmlType, data: &[u8], out: &mut [f32]) -> Result<(), DequantError> {
    let f = check(ty, data, out.len())?;
    let (bs, ts) = (ty.block_size(), ty.type_size());
    // About 64 K elements per task: large enough to amortize scheduling, small enough to balance.
    let blocks_per_task = (65536 / bs).max(1);
    out.par_chunks_mut(blocks_per_task * bs).zip(data.par_chunks(blocks_per_task * ts)).for_each(|(y, b)| run_blocks(ty, f, b, y));
    Ok(())
}

/// One block: `block` is exactly `ty.type_size()` bytes, `out` exactly `ty.block_size()` values.
/// (The CPU twin of a GPU kernel's per-block work.)
pub fn dequantize_block(ty: GgmlType, block: &[u8], out: &mut [f32]) -> Result<(), DequantError> {
    let f = check(ty, block, ty.block_size())?;
    if out.len() != ty.block_size() {
        return Err(DequantError::PartialBlock { ty, n_elements: out.len(), block_size: ty.block_size() });
    }
    f(block, out);
    Ok(())
}

/// One row (`ne[0]` elements): `row` holds its bytes, `out` its `ne[0]` values.
pub fn dequantize_row(ty: GgmlType, row: &[u8], out: &mut [f32]) -> Result<(), DequantError> {
    dequantize_into(ty, row, out)
}

fn in_tensor(file: &GgufFile, t: &TensorInfo, e: DequantError) -> DequantError {
    DequantError::InTensor { tensor: t.name.clone(), file: file.display_name(), source: Box::new(e) }
}

/// The whole tensor as f32, `ne[0]` fastest (shape `[.., ne1, ne0]` row-major), in parallel.
pub fn dequantize_tensor(file: &GgufFile, t: &TensorInfo) -> Result<Vec<f32>, DequantError> {
    let n = t.n_elements() as usize;
    let mut out = vec![0f32; n];
    dequantize_par_into(t.ty, file.tensor_data(t), &mut out).map_err(|e| in_tensor(file, t, e))?;
    Ok(out)
}

/// Rows `rows` (each `ne[0]` values) of a tensor viewed as `[n_rows, ne0]`: e.g. the embedding rows of
/// a few token ids without dequantizing the whole table.
pub fn dequantize_rows(file: &GgufFile, t: &TensorInfo, rows: Range<usize>) -> Result<Vec<f32>, DequantError> {
    let bytes = rows_bytes(file, t, rows.clone())?;
    let mut out = vec![0f32; rows.len() * t.row_len() as usize];
    dequantize_into(t.ty, bytes, &mut out).map_err(|e| in_tensor(file, t, e))?;
    Ok(out)
}

/// The stored bytes of rows `rows` of a tensor viewed as `[n_rows, ne0]` (whole blocks: a row is
/// `ne0 / block_size` blocks): what a backend's dequantizer reads for them.
pub fn rows_bytes<'f>(file: &'f GgufFile, t: &TensorInfo, rows: Range<usize>) -> Result<&'f [u8], DequantError> {
    let n_rows = t.n_rows() as usize;
    if rows.start > rows.end || rows.end > n_rows {
        return Err(DequantError::RowsOutOfRange { tensor: t.name.clone(), file: file.display_name(), start: rows.start, end: rows.end, n_rows });
    }
    let row_bytes = bytes_needed(t.ty, t.row_len() as usize).map_err(|e| in_tensor(file, t, e))?;
    let data = file.tensor_data(t);
    Ok(data.get(rows.start * row_bytes..rows.end * row_bytes).unwrap_or(&[]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::QK_K;

    #[test]
    fn q4_0_by_hand() {
        // d = 0.5 (f16 0x3800); qs[j] = j | (15 - j) << 4.
        let mut b = vec![0x00, 0x38];
        b.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        let y = dequantize(GgmlType::Q4_0, &b, 32).unwrap();
        for j in 0..16 {
            assert_eq!(y[j], 0.5 * (j as f32 - 8.0));
            assert_eq!(y[j + 16], 0.5 * ((15 - j) as f32 - 8.0));
        }
    }

    #[test]
    fn q8_0_by_hand() {
        let mut b = vec![0x00, 0x40]; // d = 2.0
        b.extend((0..32).map(|j: i32| (j - 16) as i8 as u8));
        let y = dequantize(GgmlType::Q8_0, &b, 32).unwrap();
        assert!(y.iter().enumerate().all(|(j, &v)| v == 2.0 * (j as f32 - 16.0)));
    }

    #[test]
    fn q4_k_scales_and_min_sign() {
        // d = 1, dmin = 1; sub-block 0: scale 2, min 3; sub-block 5: scale 0b110001 (49) from the high
        // bits, min 0b100010 (34).
        let mut b = vec![0u8; 144];
        b[0..2].copy_from_slice(&f16::from_f32(1.0).to_bits().to_le_bytes());
        b[2..4].copy_from_slice(&f16::from_f32(1.0).to_bits().to_le_bytes());
        let s = &mut b[4..16];
        s[0] = 2;
        s[4] = 3;
        s[1] |= 0b11 << 6; // high 2 bits of scale 5
        s[9] = 0b0001 | (0b0010 << 4); // low 4 bits of scale 5 and min 5
        s[5] |= 0b10 << 6; // high 2 bits of min 5
        b[16] = 0x07; // element 0: q = 7
        b[16 + 64 + 1] = 0x50; // sub-block 5 = c 2, s 1: element 160 + 1, q = 5
        let y = dequantize(GgmlType::Q4_K, &b, QK_K).unwrap();
        assert_eq!(y[0], 2.0 * 7.0 - 3.0);
        assert_eq!(y[1], -3.0);
        assert_eq!(y[161], 49.0 * 5.0 - 34.0);
    }

    #[test]
    fn errors_not_panics() {
        assert!(matches!(dequantize(GgmlType::Q4_K, &[0; 10], 256), Err(DequantError::SizeMismatch { .. })));
        assert!(matches!(dequantize(GgmlType::Q4_0, &[0; 18], 31), Err(DequantError::PartialBlock { .. })));
        assert!(matches!(dequantize(GgmlType::IQ2_XXS, &[0; 66], 256), Err(DequantError::Unsupported { .. })));
        let mut out = [0f32; 32];
        assert!(dequantize_block(GgmlType::Q8_0, &[0; 33], &mut out).is_err());
    }

    #[test]
    fn parallel_equals_serial() {
        let ty = GgmlType::Q6_K;
        let n_blocks = 1000;
        let data: Vec<u8> = (0..n_blocks * ty.type_size()).map(|i| (i * 7919 % 251) as u8).collect();
        // Keep every d finite: overwrite the f16 d of each block with 0.01.
        let mut data = data;
        for blk in data.chunks_exact_mut(ty.type_size()) {
            blk[208..210].copy_from_slice(&f16::from_f32(0.01).to_bits().to_le_bytes());
        }
        let a = dequantize(ty, &data, n_blocks * QK_K).unwrap();
        let mut b = vec![0f32; n_blocks * QK_K];
        dequantize_par_into(ty, &data, &mut b).unwrap();
        assert_eq!(a, b);
    }
}
