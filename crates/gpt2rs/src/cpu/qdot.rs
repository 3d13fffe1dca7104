//! Dot products of up to 8 input rows with one weight row stored in a compact format (f16,
//! bf16, int8 or int4; see `crate::quant` for the layouts). Decode reads each weight row once
//! and uses it for every row of the batch, so these are where decode spends its time.
//!
//! The integer formats take activations already quantized to int8 groups ([`Q8Acts`]): a group
//! of 32 products then sums in integer arithmetic, and one multiply by the two scales turns it
//! into f32.
//!
//! Each public function checks its arguments, then runs the AVX2 kernels (`x86`, chosen at run
//! time) or NEON ones (`neon`, integer formats) where the CPU has them, and the portable code
//! otherwise.

use crate::quant::{Q8Acts, QMatrix, GROUP};
use half::{bf16, f16};

#[cfg(target_arch = "aarch64")]
mod neon;
#[cfg(target_arch = "x86_64")]
mod x86;

/// Most input rows one call handles.
pub const MAX_ROWS: usize = 8;

/// `out[t] = xs[t] · w` with `w` as f16 bits; every `xs[t]` has `w.len()` values.
pub fn dot_rows_f16(xs: &[&[f32]], w: &[u16], out: &mut [f32]) {
    check_rows(xs, w.len(), out);
    #[cfg(target_arch = "x86_64")]
    if x86::available() {
        // SAFETY: the CPU has AVX2, FMA and F16C (checked at run time); check_rows checked
        // the row count and lengths.
        return unsafe { x86::dot_rows_f16(xs, w, out) };
    }
    portable::dot_rows_half(xs, w, out, |b| f16::from_bits(b).to_f32());
}

/// `out[t] = xs[t] · w` with `w` as bf16 bits; every `xs[t]` has `w.len()` values.
pub fn dot_rows_bf16(xs: &[&[f32]], w: &[u16], out: &mut [f32]) {
    check_rows(xs, w.len(), out);
    #[cfg(target_arch = "x86_64")]
    if x86::available() {
        // SAFETY: as in dot_rows_f16.
        return unsafe { x86::dot_rows_bf16(xs, w, out) };
    }
    portable::dot_rows_half(xs, w, out, |b| bf16::from_bits(b).to_f32());
}

/// `out[t] = acts row t · w` for an int8 weight row: `w` holds `groups * 32` values and
/// `scales` one f16 per group.
pub fn dot_rows_q8(acts: &Q8Acts, w: &[i8], scales: &[u16], out: &mut [f32]) {
    check_q(acts, w.len(), scales.len(), out);
    #[cfg(target_arch = "x86_64")]
    if x86::available() {
        // SAFETY: the CPU has AVX2, FMA and F16C (checked at run time); check_q checked the
        // row count, group counts and lengths.
        return unsafe { x86::dot_rows_q8(acts, w, scales, out) };
    }
    #[cfg(target_arch = "aarch64")]
    // SAFETY: NEON is baseline on aarch64 and `sdot` is used only where detected; check_q
    // checked the row count, group counts and lengths.
    return unsafe { neon::dot_rows_q8(acts, w, scales, out, neon::has_dotprod()) };
    #[allow(unreachable_code)]
    portable::dot_rows_q8(acts, w, scales, out);
}

/// `out[t] = acts row t · w` for an int4 weight row: `w` holds `groups * 16` bytes and
/// `scales` one f16 per group.
pub fn dot_rows_q4(acts: &Q8Acts, w: &[u8], scales: &[u16], out: &mut [f32]) {
    check_q(acts, w.len() * 2, scales.len(), out);
    #[cfg(target_arch = "x86_64")]
    if x86::available() {
        // SAFETY: as in dot_rows_q8.
        return unsafe { x86::dot_rows_q4(acts, w, scales, out) };
    }
    #[cfg(target_arch = "aarch64")]
    // SAFETY: as in dot_rows_q8.
    return unsafe { neon::dot_rows_q4(acts, w, scales, out, neon::has_dotprod()) };
    #[allow(unreachable_code)]
    portable::dot_rows_q4(acts, w, scales, out);
}

/// Row `r` of `w` as f32 (prefill dequantizes weight tiles with this before the GEMM).
pub fn dequantize_row(w: &QMatrix, r: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if x86::available() {
        assert!(r < w.rows && out.len() == w.cols);
        // SAFETY: the CPU has AVX2, FMA and F16C (checked at run time); the row exists and
        // `out` is as long as it (checked above).
        return unsafe { x86::dequantize_row(w, r, out) };
    }
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
    let (rows, pair_values) = (acts.rows, groups.div_ceil(2) * 2 * GROUP);
    assert!(
        acts.q.len() >= rows * groups * GROUP
            && acts.scales.len() >= rows * groups
            && acts.sums.len() >= rows * groups
            && acts.q_pairs.len() >= rows * pair_values,
        "activations are not `rows` rows of `groups` groups (see Q8Acts::derive)"
    );
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
    use crate::quant::{Buf, DType, QData, QMatrix};
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

    /// Widths around the group size and the vector widths, gpt2's and gpt2-xl's.
    const WIDTHS: [usize; 10] = [1, 13, 31, 32, 33, 77, 768, 1024, 1600, 6400];

    /// Runs every path this machine has for `w` (row 0) on `xs` (f16/bf16) or `acts`
    /// (int8/int4): the public function, the portable code and each fast kernel directly.
    fn every_path(w: &QMatrix, xs: &[&[f32]], acts: &Q8Acts) -> Vec<(&'static str, Vec<f32>)> {
        let rows = xs.len().max(acts.rows);
        let mut res = Vec::new();
        let mut run = |name: &'static str, f: &dyn Fn(&mut [f32])| {
            let mut o = vec![f32::NAN; rows];
            f(&mut o);
            res.push((name, o));
        };
        let (k, g) = (w.cols, crate::quant::groups(w.cols));
        match &w.data {
            QData::F16(d) => {
                let d = &d[..k];
                run("public", &|o| dot_rows_f16(xs, d, o));
                run("portable", &|o| {
                    portable::dot_rows_half(xs, d, o, |b| f16::from_bits(b).to_f32())
                });
                #[cfg(target_arch = "x86_64")]
                if x86::available() {
                    // SAFETY: the CPU has the features; the public function's checks hold.
                    run("avx2", &|o| unsafe { x86::dot_rows_f16(xs, d, o) });
                }
            }
            QData::Bf16(d) => {
                let d = &d[..k];
                run("public", &|o| dot_rows_bf16(xs, d, o));
                run("portable", &|o| {
                    portable::dot_rows_half(xs, d, o, |b| bf16::from_bits(b).to_f32())
                });
                #[cfg(target_arch = "x86_64")]
                if x86::available() {
                    // SAFETY: as above.
                    run("avx2", &|o| unsafe { x86::dot_rows_bf16(xs, d, o) });
                }
            }
            QData::Int8 { q, scales } => {
                let (q, scales) = (&q[..g * GROUP], &scales[..g]);
                run("public", &|o| dot_rows_q8(acts, q, scales, o));
                run("portable", &|o| portable::dot_rows_q8(acts, q, scales, o));
                #[cfg(target_arch = "x86_64")]
                if x86::available() {
                    // SAFETY: as above.
                    run("avx2", &|o| unsafe { x86::dot_rows_q8(acts, q, scales, o) });
                }
                #[cfg(target_arch = "aarch64")]
                {
                    // SAFETY: NEON is baseline; the public function's checks hold.
                    run("neon", &|o| unsafe {
                        neon::dot_rows_q8(acts, q, scales, o, false)
                    });
                    if neon::has_dotprod() {
                        // SAFETY: as above, and the CPU has `sdot`.
                        run("neon sdot", &|o| unsafe {
                            neon::dot_rows_q8(acts, q, scales, o, true)
                        });
                    }
                }
            }
            QData::Int4 { q, scales } => {
                let (q, scales) = (&q[..g * GROUP / 2], &scales[..g]);
                run("public", &|o| dot_rows_q4(acts, q, scales, o));
                run("portable", &|o| portable::dot_rows_q4(acts, q, scales, o));
                #[cfg(target_arch = "x86_64")]
                if x86::available() {
                    // SAFETY: as above.
                    run("avx2", &|o| unsafe { x86::dot_rows_q4(acts, q, scales, o) });
                }
                #[cfg(target_arch = "aarch64")]
                {
                    // SAFETY: NEON is baseline; the public function's checks hold.
                    run("neon", &|o| unsafe {
                        neon::dot_rows_q4(acts, q, scales, o, false)
                    });
                    if neon::has_dotprod() {
                        // SAFETY: as above, and the CPU has `sdot`.
                        run("neon sdot", &|o| unsafe {
                            neon::dot_rows_q4(acts, q, scales, o, true)
                        });
                    }
                }
            }
            QData::F32(_) => unreachable!(),
        }
        #[cfg(target_arch = "x86_64")]
        let fast = x86::available() as usize;
        #[cfg(target_arch = "aarch64")]
        let fast = if w.dtype().is_integer() {
            1 + neon::has_dotprod() as usize
        } else {
            0
        };
        #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
        let fast = 0;
        assert_eq!(res.len(), 2 + fast, "every fast path ran");
        res
    }

    /// Names the fast paths this machine runs in the tests (shown with `--nocapture`).
    #[test]
    fn report_fast_paths() {
        #[cfg(target_arch = "x86_64")]
        eprintln!("x86 avx2+fma+f16c: {}", x86::available());
        #[cfg(target_arch = "aarch64")]
        eprintln!("aarch64 neon, sdot: {}", neon::has_dotprod());
    }

    /// Every path, every row count and awkward width, every format: within f32 rounding of
    /// the f64 sum over what the kernel sees (dequantized weights; for the integer formats,
    /// dequantized activations), the tolerance scaled by the sum of the terms' magnitudes.
    #[test]
    fn every_path_matches_the_reference_for_every_row_count_and_width() {
        for &cols in &WIDTHS {
            let x = values(MAX_ROWS * cols, 3);
            let w = Matrix {
                rows: 1,
                cols,
                data: values(cols, 4),
            };
            for dtype in [DType::F16, DType::Bf16, DType::Int8, DType::Int4] {
                let q = QMatrix::quantize(&w, dtype);
                let wd = q.dequantize().data;
                for rows in 1..=MAX_ROWS {
                    let x = &x[..rows * cols];
                    let xs: Vec<&[f32]> = x.chunks_exact(cols).collect();
                    let mut acts = Q8Acts::default();
                    let xs = if dtype.is_integer() {
                        acts.quantize(x, rows, cols);
                        Vec::new()
                    } else {
                        xs
                    };
                    for (path, out) in every_path(&q, &xs, &acts) {
                        for (t, &got) in out.iter().enumerate() {
                            let term = |i: usize| {
                                let xv = if dtype.is_integer() {
                                    acts.row_q(t)[i] as f64 * acts.row_scales(t)[i / GROUP] as f64
                                } else {
                                    x[t * cols + i] as f64
                                };
                                xv * wd[i] as f64
                            };
                            let want: f64 = (0..cols).map(term).sum();
                            let mag: f64 = (0..cols).map(|i| term(i).abs()).sum();
                            assert!(
                                (got as f64 - want).abs() <= 1e-5 * mag + 1e-30,
                                "{dtype} {path} rows={rows} cols={cols} row {t}: {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// An int8 or int4 weight row of the given values (scale 1.0), padded like `quantize`.
    fn int_row(dtype: DType, vals: &[i8]) -> QMatrix {
        let g = crate::quant::groups(vals.len());
        let scales = vec![f16::ONE.to_bits(); g];
        let mut q = vals.to_vec();
        q.resize(g * GROUP, 0);
        let data = match dtype {
            DType::Int8 => QData::Int8 {
                q: Buf::Owned(q),
                scales: Buf::Owned(scales),
            },
            DType::Int4 => {
                let nib = |v: i8| {
                    assert!((-8..=7).contains(&v));
                    (v + 8) as u8
                };
                let bytes: Vec<u8> = q
                    .chunks_exact(GROUP)
                    .flat_map(|c| (0..GROUP / 2).map(|j| nib(c[j]) | nib(c[j + 16]) << 4))
                    .collect();
                QData::Int4 {
                    q: Buf::Owned(bytes),
                    scales: Buf::Owned(scales),
                }
            }
            _ => unreachable!(),
        };
        QMatrix {
            rows: 1,
            cols: vals.len(),
            data,
        }
    }

    /// Activations of the given values (scale 1.0 per group), padded with zeros.
    fn int_acts(rows: &[Vec<i8>]) -> Q8Acts {
        let cols = rows[0].len();
        let g = crate::quant::groups(cols);
        let mut q = Vec::new();
        for r in rows {
            q.extend_from_slice(r);
            q.resize(q.len() + g * GROUP - cols, 0);
        }
        let mut acts = Q8Acts {
            rows: rows.len(),
            groups: g,
            q,
            scales: vec![1.0; rows.len() * g],
            ..Q8Acts::default()
        };
        acts.derive();
        acts
    }

    /// A value in `lo..=hi` from a hash of `i` and `seed`.
    fn int_value(i: usize, seed: u32, lo: i32, hi: i32) -> i8 {
        let h = (i as u32 ^ seed).wrapping_mul(2654435761).rotate_left(7);
        (lo + (h % (hi - lo + 1) as u32) as i32) as i8
    }

    /// With integer values and unit scales every product and partial sum is an integer below
    /// 2^24, so each path must return the exact sum whatever order it adds in: catches any
    /// element dropped, repeated or misplaced at a tail or a nibble.
    #[test]
    fn every_path_is_exact_on_integer_values() {
        for &cols in &WIDTHS {
            for rows in 1..=MAX_ROWS {
                // |x| <= 16, |w| <= 127: at most 6400 · 16 · 127 < 2^24.
                let x8: Vec<Vec<i8>> = (0..rows)
                    .map(|t| (0..cols).map(|i| int_value(i, t as u32, -16, 16)).collect())
                    .collect();
                let w8: Vec<i8> = (0..cols).map(|i| int_value(i, 99, -127, 127)).collect();
                // |x| <= 127, w in -8..=7: at most 6400 · 127 · 8 < 2^24.
                let x4: Vec<Vec<i8>> = (0..rows)
                    .map(|t| {
                        (0..cols)
                            .map(|i| int_value(i, t as u32, -127, 127))
                            .collect()
                    })
                    .collect();
                let w4: Vec<i8> = (0..cols).map(|i| int_value(i, 98, -8, 7)).collect();
                // Small integers are exact in f16 and bf16 too.
                let xh: Vec<Vec<f32>> = (0..rows)
                    .map(|t| x8[t].iter().map(|&v| v as f32).collect())
                    .collect();
                let wh: Vec<f32> = w4.iter().map(|&v| v as f32).collect();
                let xs: Vec<&[f32]> = xh.iter().map(Vec::as_slice).collect();
                let wm = Matrix {
                    rows: 1,
                    cols,
                    data: wh,
                };
                let cases = [
                    (DType::Int8, int_row(DType::Int8, &w8), &x8, &w8),
                    (DType::Int4, int_row(DType::Int4, &w4), &x4, &w4),
                    (DType::F16, QMatrix::quantize(&wm, DType::F16), &x8, &w4),
                    (DType::Bf16, QMatrix::quantize(&wm, DType::Bf16), &x8, &w4),
                ];
                for (dtype, w, x, wv) in cases {
                    let acts = if dtype.is_integer() {
                        int_acts(x)
                    } else {
                        Q8Acts::default()
                    };
                    let xs: &[&[f32]] = if dtype.is_integer() { &[] } else { &xs };
                    for (path, out) in every_path(&w, xs, &acts) {
                        for (t, &got) in out.iter().enumerate() {
                            let want: i64 = x[t]
                                .iter()
                                .zip(wv)
                                .map(|(&a, &b)| a as i64 * b as i64)
                                .sum();
                            assert_eq!(
                                got, want as f32,
                                "{dtype} {path} rows={rows} cols={cols} row {t}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// The integer kernels at the extremes of their ranges (activations ±127, int8 weights
    /// -128 (which a file may hold though the quantizer never makes it) and 127, int4 weights
    /// -8 and 7) in every sign pattern: an i16 pair sum that saturated or a sign flip that
    /// overflowed would be off by far more than f32 rounding.
    #[test]
    fn integer_paths_do_not_saturate_at_the_extremes() {
        let pattern = |kind: usize, i: usize, lo: i8, hi: i8| match kind {
            0 => hi,
            1 => lo,
            2 => [lo, hi][i % 2],
            _ => [hi, lo][(i / 3) % 2],
        };
        for &cols in &[32, 33, 77, 768, 1600, 6400] {
            for (dtype, lo, hi) in [(DType::Int8, -128, 127), (DType::Int4, -8, 7)] {
                for wk in 0..4 {
                    let wv: Vec<i8> = (0..cols).map(|i| pattern(wk, i, lo, hi)).collect();
                    let w = int_row(dtype, &wv);
                    // Every activation pattern at once, one per row.
                    let x: Vec<Vec<i8>> = (0..MAX_ROWS)
                        .map(|t| {
                            (0..cols)
                                .map(|i| pattern(t % 4, i + t, -127, 127))
                                .collect()
                        })
                        .collect();
                    for rows in [1, 4, MAX_ROWS] {
                        let acts = int_acts(&x[..rows]);
                        for (path, out) in every_path(&w, &[], &acts) {
                            for (t, &got) in out.iter().enumerate() {
                                let want: i64 = x[t]
                                    .iter()
                                    .zip(&wv)
                                    .map(|(&a, &b)| a as i64 * b as i64)
                                    .sum();
                                assert!(
                                    (got as f64 - want as f64).abs() <= 1e-6 * want.abs() as f64,
                                    "{dtype} {path} w{wk} rows={rows} cols={cols} row {t}: \
                                     {got} vs {want}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    /// The fast dequantization is bit-identical to `QMatrix::dequantize_row` (all its
    /// conversions are exact); NaN stays NaN (bf16's reference sets the quiet bit).
    #[test]
    fn dequantize_row_is_bit_exact() {
        let same = |a: &[f32], b: &[f32], what: &str| {
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                assert!(
                    x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan()),
                    "{what} at {i}: {x} vs {y}"
                );
            }
        };
        for &cols in &WIDTHS {
            let m = Matrix {
                rows: 3,
                cols,
                data: values(3 * cols, 5),
            };
            for dtype in DType::ALL {
                let q = QMatrix::quantize(&m, dtype);
                for r in 0..3 {
                    let (mut want, mut got) = (vec![0f32; cols], vec![f32::NAN; cols]);
                    q.dequantize_row(r, &mut want);
                    dequantize_row(&q, r, &mut got);
                    same(&got, &want, &format!("{dtype} cols={cols} row {r}"));
                }
            }
        }
        // Every 16-bit pattern (subnormals, infinities, NaNs), at a width with a tail.
        let all: Vec<u16> = (0..=u16::MAX).chain(0..5).collect();
        for data in [
            QData::F16(Buf::Owned(all.clone())),
            QData::Bf16(Buf::Owned(all)),
        ] {
            let q = QMatrix {
                rows: 1,
                cols: 65541,
                data,
            };
            let (mut want, mut got) = (vec![0f32; q.cols], vec![0f32; q.cols]);
            q.dequantize_row(0, &mut want);
            dequantize_row(&q, 0, &mut got);
            same(&got, &want, &format!("{} all patterns", q.dtype()));
        }
    }
}
