//! How weight matrices live in memory: f32, f16, bf16, or weight-only int8 / int4 in groups of
//! [`GROUP`] along the input dimension with an f16 scale per group. Shared by every backend:
//! this module packs, unpacks and dequantizes (the reference the kernels are tested against).
//!
//! Layout of a `[rows, cols]` matrix (row-major, one row per output feature):
//! - f32 / f16 / bf16: `rows * cols` elements.
//! - int8: each row padded with zeros to `groups(cols) * 32` values; `q[i] = round(w[i] / d)`
//!   with `d = max|w| / 127` of its group; one f16 `d` per group.
//! - int4: each row padded the same way, 16 bytes per group: byte `j` holds element `j` in its
//!   low nibble and element `j + 16` in its high nibble, each stored as `q + 8` with
//!   `q = clamp(round(w / d), -8, 7)` and `d = -m / 8`, `m` the group's value of largest
//!   magnitude (so that value maps to -8 exactly and the full 16 levels are used).
//!
//! Padding rows to whole groups keeps every kernel free of tail cases; the activations they
//! meet are padded with zeros the same way.

mod buf;
pub mod saved;
pub use buf::{Buf, Pod};

use crate::error::{Error, Result};
use crate::weights::Matrix;
use half::{bf16, f16};

/// Weights per quantization group (along the input dimension).
pub const GROUP: usize = 32;

/// Number of groups that cover `cols` values (the last one zero-padded).
pub fn groups(cols: usize) -> usize {
    cols.div_ceil(GROUP)
}

/// How weight matrices are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    F32,
    F16,
    Bf16,
    Int8,
    Int4,
}

impl DType {
    pub const ALL: [DType; 5] = [Self::F32, Self::F16, Self::Bf16, Self::Int8, Self::Int4];

    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Bf16 => "bf16",
            Self::Int8 => "int8",
            Self::Int4 => "int4",
        }
    }

    /// Parses a name as printed by [`DType::name`].
    pub fn parse(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|d| d.name() == s.to_ascii_lowercase())
            .ok_or_else(|| {
                Error::invalid(format!(
                    "unknown weight precision '{s}': use one of f32, f16, bf16, int8, int4"
                ))
            })
    }

    /// Bytes a `[rows, cols]` matrix takes in this format (padding and scales included).
    pub fn matrix_bytes(self, rows: usize, cols: usize) -> u64 {
        let (r, g) = (rows as u64, groups(cols) as u64);
        match self {
            Self::F32 => r * cols as u64 * 4,
            Self::F16 | Self::Bf16 => r * cols as u64 * 2,
            Self::Int8 => r * g * (GROUP as u64 + 2),
            Self::Int4 => r * g * (GROUP as u64 / 2 + 2),
        }
    }

    /// Whether this is a weight-only integer format (activations are quantized to int8 blocks
    /// for its dot products).
    pub fn is_integer(self) -> bool {
        matches!(self, Self::Int8 | Self::Int4)
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// How a model's matrices are stored: the four matrices of every block in `dtype`, and the LM
/// head (with the token embedding it is tied to) in `dtype` too unless `quantize_lm_head` is off,
/// then f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WeightFormat {
    pub dtype: DType,
    pub quantize_lm_head: bool,
}

impl WeightFormat {
    pub const F32: Self = Self {
        dtype: DType::F32,
        quantize_lm_head: true,
    };

    /// Every matrix in `dtype`.
    pub fn new(dtype: DType) -> Self {
        Self {
            dtype,
            quantize_lm_head: true,
        }
    }

    /// The format of the LM head and token embedding.
    pub fn head_dtype(&self) -> DType {
        if self.quantize_lm_head {
            self.dtype
        } else {
            DType::F32
        }
    }

    /// Bytes the weights of a model of `config` take in this format.
    pub fn model_bytes(&self, config: &crate::config::Gpt2Config) -> u64 {
        let (c, v, inner) = (config.n_embd, config.vocab_size, config.n_inner);
        let d = self.dtype;
        let block = d.matrix_bytes(3 * c, c)
            + d.matrix_bytes(c, c)
            + d.matrix_bytes(inner, c)
            + d.matrix_bytes(c, inner)
            + 4 * (3 * c + c + inner + c + 4 * c) as u64;
        let heads = if config.tie_word_embeddings { 1 } else { 2 };
        config.n_layer as u64 * block
            + heads * self.head_dtype().matrix_bytes(v, c)
            + 4 * (config.n_positions * c + 2 * c) as u64
    }

    /// A short label: `int4`, or `int4 (f32 LM head)`.
    pub fn label(&self) -> String {
        if self.head_dtype() == self.dtype {
            self.dtype.name().to_string()
        } else {
            format!("{} (f32 LM head)", self.dtype)
        }
    }
}

/// The elements of a matrix in one of the formats.
#[derive(Debug, Clone)]
pub enum QData {
    F32(Buf<f32>),
    /// IEEE half-precision bit patterns.
    F16(Buf<u16>),
    /// bfloat16 bit patterns.
    Bf16(Buf<u16>),
    /// `rows * groups * 32` values and `rows * groups` f16 scales.
    Int8 {
        q: Buf<i8>,
        scales: Buf<u16>,
    },
    /// `rows * groups * 16` bytes and `rows * groups` f16 scales.
    Int4 {
        q: Buf<u8>,
        scales: Buf<u16>,
    },
}

/// A `[rows, cols]` weight matrix in any format.
#[derive(Debug, Clone)]
pub struct QMatrix {
    pub rows: usize,
    pub cols: usize,
    pub data: QData,
}

impl QMatrix {
    /// Converts an f32 matrix to `dtype`, taking its memory when `dtype` is f32.
    pub fn from_matrix(m: Matrix, dtype: DType) -> Self {
        match dtype {
            DType::F32 => Self {
                rows: m.rows,
                cols: m.cols,
                data: QData::F32(Buf::owned(m.data)),
            },
            _ => Self::quantize(&m, dtype),
        }
    }

    /// Converts an f32 matrix to `dtype`.
    pub fn quantize(m: &Matrix, dtype: DType) -> Self {
        let data = match dtype {
            DType::F32 => QData::F32(Buf::owned(m.data.clone())),
            DType::F16 => QData::F16(Buf::owned(
                m.data.iter().map(|&v| f16::from_f32(v).to_bits()).collect(),
            )),
            DType::Bf16 => QData::Bf16(Buf::owned(
                m.data
                    .iter()
                    .map(|&v| bf16::from_f32(v).to_bits())
                    .collect(),
            )),
            DType::Int8 => {
                let g = groups(m.cols);
                let mut q = vec![0i8; m.rows * g * GROUP];
                let mut scales = vec![0u16; m.rows * g];
                for r in 0..m.rows {
                    let row = m.row(r);
                    for gi in 0..g {
                        let vals = &row[gi * GROUP..((gi + 1) * GROUP).min(m.cols)];
                        let out = &mut q[(r * g + gi) * GROUP..][..GROUP];
                        scales[r * g + gi] = quantize_group_i8(vals, out);
                    }
                }
                QData::Int8 {
                    q: Buf::owned(q),
                    scales: Buf::owned(scales),
                }
            }
            DType::Int4 => {
                let g = groups(m.cols);
                let mut q = vec![0x88u8; m.rows * g * GROUP / 2];
                let mut scales = vec![0u16; m.rows * g];
                for r in 0..m.rows {
                    let row = m.row(r);
                    for gi in 0..g {
                        let vals = &row[gi * GROUP..((gi + 1) * GROUP).min(m.cols)];
                        let out = &mut q[(r * g + gi) * GROUP / 2..][..GROUP / 2];
                        scales[r * g + gi] = quantize_group_i4(vals, out);
                    }
                }
                QData::Int4 {
                    q: Buf::owned(q),
                    scales: Buf::owned(scales),
                }
            }
        };
        Self {
            rows: m.rows,
            cols: m.cols,
            data,
        }
    }

    /// The storage format.
    pub fn dtype(&self) -> DType {
        match self.data {
            QData::F32(_) => DType::F32,
            QData::F16(_) => DType::F16,
            QData::Bf16(_) => DType::Bf16,
            QData::Int8 { .. } => DType::Int8,
            QData::Int4 { .. } => DType::Int4,
        }
    }

    /// Bytes of memory the elements take.
    pub fn bytes(&self) -> u64 {
        self.dtype().matrix_bytes(self.rows, self.cols)
    }

    /// Writes row `r` as f32 into `out` (`cols` values): the reference every kernel matches.
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let (cols, g) = (self.cols, groups(self.cols));
        assert!(r < self.rows && out.len() == cols);
        match &self.data {
            QData::F32(d) => out.copy_from_slice(&d[r * cols..(r + 1) * cols]),
            QData::F16(d) => {
                for (o, &b) in out.iter_mut().zip(&d[r * cols..(r + 1) * cols]) {
                    *o = f16::from_bits(b).to_f32();
                }
            }
            QData::Bf16(d) => {
                for (o, &b) in out.iter_mut().zip(&d[r * cols..(r + 1) * cols]) {
                    *o = bf16::from_bits(b).to_f32();
                }
            }
            QData::Int8 { q, scales } => {
                for (i, o) in out.iter_mut().enumerate() {
                    let d = f16::from_bits(scales[r * g + i / GROUP]).to_f32();
                    *o = d * q[r * g * GROUP + i] as f32;
                }
            }
            QData::Int4 { q, scales } => {
                for (i, o) in out.iter_mut().enumerate() {
                    let (gi, j) = (i / GROUP, i % GROUP);
                    let d = f16::from_bits(scales[r * g + gi]).to_f32();
                    *o = d * int4_at(&q[(r * g + gi) * GROUP / 2..][..GROUP / 2], j) as f32;
                }
            }
        }
    }

    /// The whole matrix as f32 (tests and reference paths).
    pub fn dequantize(&self) -> Matrix {
        let mut data = vec![0f32; self.rows * self.cols];
        for (r, row) in data.chunks_exact_mut(self.cols.max(1)).enumerate() {
            self.dequantize_row(r, row);
        }
        Matrix {
            rows: self.rows,
            cols: self.cols,
            data,
        }
    }
}

/// Quantizes up to 32 values into `out` (padding with zeros); returns the f16 scale's bits.
pub fn quantize_group_i8(vals: &[f32], out: &mut [i8]) -> u16 {
    let amax = vals.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = f16::from_f32(amax / 127.0);
    let inv = if d.to_f32() > 0.0 {
        1.0 / d.to_f32()
    } else {
        0.0
    };
    for (i, o) in out.iter_mut().enumerate() {
        *o = vals
            .get(i)
            .map_or(0, |v| (v * inv).round().clamp(-127.0, 127.0) as i8);
    }
    d.to_bits()
}

/// Quantizes up to 32 values into 16 bytes of nibbles (padding with zeros); returns the f16
/// scale's bits.
pub fn quantize_group_i4(vals: &[f32], out: &mut [u8]) -> u16 {
    let m = vals
        .iter()
        .fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
    let d = f16::from_f32(-m / 8.0);
    let inv = if d.to_f32() != 0.0 {
        1.0 / d.to_f32()
    } else {
        0.0
    };
    let q = |i: usize| -> u8 {
        let v = vals
            .get(i)
            .map_or(0.0, |v| (v * inv).round().clamp(-8.0, 7.0));
        (v as i8 + 8) as u8
    };
    for (j, o) in out.iter_mut().enumerate() {
        *o = q(j) | (q(j + 16) << 4);
    }
    d.to_bits()
}

/// The signed value of element `j` (0..32) of one int4 group's 16 bytes.
pub fn int4_at(group: &[u8], j: usize) -> i8 {
    let b = group[j % 16];
    let nib = if j < 16 { b & 0x0f } else { b >> 4 };
    nib as i8 - 8
}

/// Activations quantized for the integer formats' dot products: each row padded with zeros to
/// whole groups of 32, each group as int8 in -127..=127 with an f32 scale (`x ≈ scale · q`).
#[derive(Debug, Default, Clone)]
pub struct Q8Acts {
    pub rows: usize,
    pub groups: usize,
    pub q: Vec<i8>,
    pub scales: Vec<f32>,
    /// `Σ q` of each group (exact in f32): kernels that multiply int4's stored nibbles `q + 8`
    /// subtract `8 · Σ q` once per group instead of re-centering every weight.
    pub sums: Vec<f32>,
    /// The same values in the order an int4 kernel meets them when one 32-byte load covers two
    /// groups of weights (low nibbles: values 0..16 of both; high nibbles: values 16..32): per
    /// pair of groups, values 0..16 of the first, 0..16 of the second, 16..32 of the first,
    /// 16..32 of the second; an odd last group pairs with zeros. `groups.div_ceil(2) * 64` per
    /// row.
    pub q_pairs: Vec<i8>,
}

impl Q8Acts {
    /// Quantizes `rows` rows of `cols` values from `x`, reusing this buffer's memory.
    pub fn quantize(&mut self, x: &[f32], rows: usize, cols: usize) {
        let g = groups(cols);
        self.rows = rows;
        self.groups = g;
        self.q.clear();
        self.q.resize(rows * g * GROUP, 0);
        self.scales.clear();
        self.scales.resize(rows * g, 0.0);
        for r in 0..rows {
            let row = &x[r * cols..(r + 1) * cols];
            for gi in 0..g {
                let vals = &row[gi * GROUP..((gi + 1) * GROUP).min(cols)];
                let amax = vals.iter().fold(0f32, |m, v| m.max(v.abs()));
                let d = amax / 127.0;
                let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
                let out = &mut self.q[(r * g + gi) * GROUP..][..GROUP];
                for (o, v) in out.iter_mut().zip(vals) {
                    *o = (v * inv).round() as i8;
                }
                self.scales[r * g + gi] = d;
            }
        }
        self.derive();
    }

    /// Fills `sums` and `q_pairs` from `rows`, `groups` and `q` (`quantize` does; activations
    /// filled in by hand need it before use).
    pub fn derive(&mut self) {
        let (rows, g) = (self.rows, self.groups);
        self.sums.clear();
        self.sums.extend(
            self.q[..rows * g * GROUP]
                .chunks_exact(GROUP)
                .map(|c| c.iter().map(|&v| v as i32).sum::<i32>() as f32),
        );
        let pairs = g.div_ceil(2);
        self.q_pairs.clear();
        self.q_pairs.resize(rows * pairs * 2 * GROUP, 0);
        for r in 0..rows {
            let q = &self.q[r * g * GROUP..(r + 1) * g * GROUP];
            let dst = &mut self.q_pairs[r * pairs * 2 * GROUP..(r + 1) * pairs * 2 * GROUP];
            for (gi, grp) in q.chunks_exact(GROUP).enumerate() {
                let at = (gi / 2) * 2 * GROUP + (gi % 2) * GROUP / 2;
                dst[at..at + GROUP / 2].copy_from_slice(&grp[..GROUP / 2]);
                dst[at + GROUP..at + GROUP + GROUP / 2].copy_from_slice(&grp[GROUP / 2..]);
            }
        }
    }

    /// Row `r`'s quantized values (`groups * 32`).
    pub fn row_q(&self, r: usize) -> &[i8] {
        &self.q[r * self.groups * GROUP..(r + 1) * self.groups * GROUP]
    }

    /// Row `r`'s scales (`groups`).
    pub fn row_scales(&self, r: usize) -> &[f32] {
        &self.scales[r * self.groups..(r + 1) * self.groups]
    }

    /// Row `r`'s group sums (`groups`).
    pub fn row_sums(&self, r: usize) -> &[f32] {
        &self.sums[r * self.groups..(r + 1) * self.groups]
    }
    /// Row `r`'s values in pair order (see [`Q8Acts::q_pairs`]).
    pub fn row_q_pairs(&self, r: usize) -> &[i8] {
        let n = self.groups.div_ceil(2) * 2 * GROUP;
        &self.q_pairs[r * n..(r + 1) * n]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matrix(rows: usize, cols: usize, seed: u32) -> Matrix {
        let data = (0..rows * cols)
            .map(|i| {
                let h = (i as u32 ^ seed).wrapping_mul(2654435761).rotate_left(13);
                (h % 20001) as f32 / 10000.0 - 1.0
            })
            .collect();
        Matrix { rows, cols, data }
    }

    #[test]
    fn formats_round_trip_within_their_precision() {
        // Widths that are not multiples of the group, and gpt2-xl's 1600.
        for &(rows, cols) in &[(1, 1), (3, 31), (5, 33), (2, 1600), (4, 77)] {
            let m = matrix(rows, cols, 7);
            for (dtype, tol) in [
                (DType::F32, 0.0),
                (DType::F16, 1e-3),
                (DType::Bf16, 8e-3),
                (DType::Int8, 1.0 / 254.0 + 1e-3),
                // -m/8 scaling: a value of the sign opposite to the extreme clamps at 7/8 of it.
                (DType::Int4, 1.0 / 8.0 + 2e-3),
            ] {
                let q = QMatrix::quantize(&m, dtype);
                assert_eq!(q.dtype(), dtype);
                let back = q.dequantize();
                for (i, (a, b)) in m.data.iter().zip(&back.data).enumerate() {
                    // Relative to the group's largest magnitude (at most 1 here).
                    assert!(
                        (a - b).abs() <= tol,
                        "{dtype} {rows}x{cols} at {i}: {a} vs {b}"
                    );
                }
            }
        }
    }

    #[test]
    fn int4_uses_all_sixteen_levels_and_keeps_the_extreme_exact() {
        let vals: Vec<f32> = (0..32).map(|i| i as f32 / 31.0 * 2.0 - 1.0).collect();
        let mut out = [0u8; 16];
        let d = f16::from_bits(quantize_group_i4(&vals, &mut out)).to_f32();
        let q: Vec<i8> = (0..32).map(|j| int4_at(&out, j)).collect();
        assert_eq!(q[0] as f32 * d, -1.0, "the largest magnitude is exact");
        assert_eq!(*q.iter().min().unwrap(), -8);
        assert_eq!(*q.iter().max().unwrap(), 7);
    }

    #[test]
    fn sizes_count_padding_and_scales() {
        assert_eq!(DType::Int8.matrix_bytes(2, 33), 2 * 2 * 34);
        assert_eq!(DType::Int4.matrix_bytes(1, 1600), 50 * 18);
        assert_eq!(DType::F16.matrix_bytes(3, 5), 30);
        let q = QMatrix::quantize(&matrix(3, 33, 1), DType::Int4);
        match &q.data {
            QData::Int4 { q: b, scales } => {
                assert_eq!(b.len() + 2 * scales.len(), q.bytes() as usize);
            }
            _ => unreachable!(),
        }
    }

    #[test]
    fn activations_quantize_per_group_with_zero_padding() {
        let x: Vec<f32> = (0..2 * 40).map(|i| (i as f32 - 40.0) / 7.0).collect();
        let mut a = Q8Acts::default();
        a.quantize(&x, 2, 40);
        assert_eq!((a.rows, a.groups), (2, 2));
        for r in 0..2 {
            let (q, s) = (a.row_q(r), a.row_scales(r));
            assert!(q[40..].iter().all(|&v| v == 0), "padding is zero");
            for i in 0..40 {
                let back = q[i] as f32 * s[i / GROUP];
                assert!((back - x[r * 40 + i]).abs() <= s[i / GROUP] / 2.0 + 1e-6);
            }
            for (gi, &sum) in a.row_sums(r).iter().enumerate() {
                let want: i32 = q[gi * GROUP..(gi + 1) * GROUP]
                    .iter()
                    .map(|&v| v as i32)
                    .sum();
                assert_eq!(sum, want as f32);
            }
        }
    }

    #[test]
    fn activations_in_pair_order_follow_the_int4_nibbles() {
        // Three groups: one whole pair, then a group paired with zeros.
        let x: Vec<f32> = (0..2 * 70).map(|i| (i as f32 * 0.37).sin()).collect();
        let mut a = Q8Acts::default();
        a.quantize(&x, 2, 70);
        for r in 0..2 {
            let (q, p) = (a.row_q(r), a.row_q_pairs(r));
            assert_eq!(p.len(), 2 * 2 * GROUP);
            for gi in 0..3 {
                for j in 0..GROUP {
                    let at = (gi / 2) * 2 * GROUP + (j / 16) * GROUP + (gi % 2) * 16 + j % 16;
                    assert_eq!(p[at], q[gi * GROUP + j], "row {r} group {gi} value {j}");
                }
            }
            for j in 0..GROUP {
                assert_eq!(p[2 * GROUP + (j / 16) * GROUP + 16 + j % 16], 0, "padding");
            }
        }
    }

    #[test]
    fn names_parse_back() {
        for d in DType::ALL {
            assert_eq!(DType::parse(d.name()).unwrap(), d);
        }
        assert!(DType::parse("fp8")
            .unwrap_err()
            .to_string()
            .contains("int4"));
    }
}
