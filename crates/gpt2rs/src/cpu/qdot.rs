//! Dot products of up to 8 input rows with one weight row stored in a compact format (f16,
//! bf16, int8 or int4; see `crate::quant` for the layouts). Decode reads each weight row once
//! and uses it for every row of the batch, so these are where decode spends its time.
//!
//! The integer formats take activations already quantized to int8 groups ([`Q8Acts`]): a group
//! of 32 products then sums in integer arithmetic, and one multiply by the two scales turns it
//! into f32.

use crate::quant::{Q8Acts, QMatrix, GROUP};
use half::{bf16, f16};

/// Most input rows one call handles.
pub const MAX_ROWS: usize = 8;

/// `out[t] = xs[t] · w` with `w` as f16 bits; every `xs[t]` has `w.len()` values.
pub fn dot_rows_f16(xs: &[&[f32]], w: &[u16], out: &mut [f32]) {
    check_rows(xs, w.len(), out);
    portable::dot_rows_half(xs, w, out, |b| f16::from_bits(b).to_f32());
}

/// `out[t] = xs[t] · w` with `w` as bf16 bits; every `xs[t]` has `w.len()` values.
pub fn dot_rows_bf16(xs: &[&[f32]], w: &[u16], out: &mut [f32]) {
    check_rows(xs, w.len(), out);
    portable::dot_rows_half(xs, w, out, |b| bf16::from_bits(b).to_f32());
}

/// `out[t] = acts row t · w` for an int8 weight row: `w` holds `groups * 32` values and
/// `scales` one f16 per group.
pub fn dot_rows_q8(acts: &Q8Acts, w: &[i8], scales: &[u16], out: &mut [f32]) {
    check_q(acts, w.len(), scales.len(), out);
    portable::dot_rows_q8(acts, w, scales, out);
}

/// `out[t] = acts row t · w` for an int4 weight row: `w` holds `groups * 16` bytes and
/// `scales` one f16 per group.
pub fn dot_rows_q4(acts: &Q8Acts, w: &[u8], scales: &[u16], out: &mut [f32]) {
    check_q(acts, w.len() * 2, scales.len(), out);
    portable::dot_rows_q4(acts, w, scales, out);
}

/// Row `r` of `w` as f32 (prefill dequantizes weight tiles with this before the GEMM).
pub fn dequantize_row(w: &QMatrix, r: usize, out: &mut [f32]) {
    w.dequantize_row(r, out);
}

fn check_rows(xs: &[&[f32]], n: usize, out: &[f32]) {
    assert!(xs.len() <= MAX_ROWS && out.len() >= xs.len());
    assert!(
        xs.iter().all(|x| x.len() == n),
        "rows must match the weights"
    );
}

fn check_q(acts: &Q8Acts, values: usize, groups: usize, out: &[f32]) {
    assert!(acts.rows <= MAX_ROWS && out.len() >= acts.rows);
    assert_eq!(acts.groups, groups, "activation and weight groups differ");
    assert_eq!(values, groups * GROUP, "weight row is not whole groups");
}

/// Plain-Rust versions: the reference semantics, and the path on CPUs without the fast ones.
pub(crate) mod portable {
    use super::*;

    /// Converts the weights a chunk at a time into f32, then takes each row's dot product
    /// with the chunk (the f32 dot is itself vectorized).
    pub fn dot_rows_half(xs: &[&[f32]], w: &[u16], out: &mut [f32], cvt: impl Fn(u16) -> f32) {
        const CHUNK: usize = 256;
        let mut buf = [0f32; CHUNK];
        out[..xs.len()].fill(0.0);
        for (c, wc) in w.chunks(CHUNK).enumerate() {
            for (b, &v) in buf.iter_mut().zip(wc) {
                *b = cvt(v);
            }
            for (o, x) in out.iter_mut().zip(xs) {
                *o += crate::cpu::simd::dot(&x[c * CHUNK..c * CHUNK + wc.len()], &buf);
            }
        }
    }

    pub fn dot_rows_q8(acts: &Q8Acts, w: &[i8], scales: &[u16], out: &mut [f32]) {
        for (t, o) in out[..acts.rows].iter_mut().enumerate() {
            let (xq, xs) = (acts.row_q(t), acts.row_scales(t));
            let mut s = 0f32;
            for (g, (&ws, &xsc)) in scales.iter().zip(xs).enumerate() {
                let isum: i32 = (0..GROUP)
                    .map(|i| xq[g * GROUP + i] as i32 * w[g * GROUP + i] as i32)
                    .sum();
                s += isum as f32 * (xsc * f16::from_bits(ws).to_f32());
            }
            *o = s;
        }
    }

    pub fn dot_rows_q4(acts: &Q8Acts, w: &[u8], scales: &[u16], out: &mut [f32]) {
        let half = GROUP / 2;
        for (t, o) in out[..acts.rows].iter_mut().enumerate() {
            let (xq, xs) = (acts.row_q(t), acts.row_scales(t));
            let mut s = 0f32;
            for (g, (&ws, &xsc)) in scales.iter().zip(xs).enumerate() {
                let bytes = &w[g * half..(g + 1) * half];
                let x = &xq[g * GROUP..(g + 1) * GROUP];
                let mut isum = 0i32;
                for (j, &b) in bytes.iter().enumerate() {
                    isum += ((b & 0x0f) as i32 - 8) * x[j] as i32;
                    isum += ((b >> 4) as i32 - 8) * x[j + half] as i32;
                }
                s += isum as f32 * (xsc * f16::from_bits(ws).to_f32());
            }
            *o = s;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::{DType, QData, QMatrix};
    use crate::weights::Matrix;

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                let h = (i as u32 ^ seed).wrapping_mul(2654435761).rotate_left(11);
                (h % 20001) as f32 / 10000.0 - 1.0
            })
            .collect()
    }

    /// Each kernel against f64 sums over the dequantized weights (and, for the integer
    /// formats, the dequantized activations), on widths that are not multiples of a group.
    #[test]
    fn kernels_match_the_dequantized_reference() {
        for &(rows, cols) in &[(1, 32), (1, 1600), (3, 33), (8, 6400), (5, 77), (2, 1)] {
            let x = values(rows * cols, 1);
            let w = Matrix {
                rows: 1,
                cols,
                data: values(cols, 2),
            };
            let xs: Vec<&[f32]> = x.chunks_exact(cols).collect();
            let mut acts = Q8Acts::default();
            acts.quantize(&x, rows, cols);
            for dtype in [DType::F16, DType::Bf16, DType::Int8, DType::Int4] {
                let q = QMatrix::quantize(&w, dtype);
                let wd = q.dequantize().data;
                let mut out = [f32::NAN; MAX_ROWS];
                match &q.data {
                    QData::F16(b) => dot_rows_f16(&xs, b, &mut out),
                    QData::Bf16(b) => dot_rows_bf16(&xs, b, &mut out),
                    QData::Int8 { q, scales } => dot_rows_q8(&acts, q, scales, &mut out),
                    QData::Int4 { q, scales } => dot_rows_q4(&acts, q, scales, &mut out),
                    QData::F32(_) => unreachable!(),
                }
                for t in 0..rows {
                    let want: f64 = (0..cols)
                        .map(|i| {
                            let xv = if dtype.is_integer() {
                                acts.row_q(t)[i] as f64 * acts.row_scales(t)[i / GROUP] as f64
                            } else {
                                x[t * cols + i] as f64
                            };
                            xv * wd[i] as f64
                        })
                        .sum();
                    let got = out[t] as f64;
                    assert!(
                        (got - want).abs() < 1e-4 * (1.0 + want.abs()) * (cols as f64).sqrt(),
                        "{dtype} rows={rows} cols={cols} row {t}: {got} vs {want}"
                    );
                }
            }
        }
    }
}
