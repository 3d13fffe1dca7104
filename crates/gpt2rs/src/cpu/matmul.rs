//! `y = x · Wᵀ + b` for the engine's `[out, in]` weights, in any storage format.
//!
//! A few rows of `x` (decode) are memory-bound: stream each weight row once, split over the
//! threads by output rows, and take dot products with every input row while it is in cache
//! (for int8/int4 weights, against activations quantized to int8 groups once per call).
//! A few dozen rows (batched decode) are compute-bound but too few to repay gemm's packing of
//! the whole weight matrix on every call: register tiles (`tile`) read the weights in place.
//! Many rows (prefill) are compute-bound: hand them to the gemm crate's tiled kernels; weights
//! in a compact format are dequantized a block of rows at a time into a buffer that stays in
//! cache, and each block is multiplied there.

use super::transpose::transpose;
use super::{panel, qdot, simd, tile};
use crate::quant::{groups, Q8Acts, QData, QMatrix, GROUP};
use rayon::prelude::*;

/// Up to this many input rows use the streaming kernel; more go to the tile kernels or gemm.
pub const STREAMING_MAX_ROWS: usize = 8;
/// The same for f32 weights, where the tile kernels exist.
const STREAMING_MAX_ROWS_F32: usize = 4;

/// Up to this many input rows use the tile kernels (where the CPU has them); more go to gemm,
/// whose packing pays off once each packed weight panel serves this many rows.
pub const TILE_MAX_ROWS: usize = 64;

/// Raw output pointer shared by tasks that write disjoint elements.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: every task writes a disjoint set of elements and the borrow outlives the tasks.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}
impl OutPtr {
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// `out[t, j] = Σ_k x[t, k] · w[j, k] + bias[j]` for `t < rows`; `out` is `[rows, w.rows]`.
pub fn linear(x: &[f32], rows: usize, w: &QMatrix, bias: Option<&[f32]>, out: &mut [f32]) {
    let (n, k) = (w.rows, w.cols);
    assert_eq!(x.len(), rows * k, "input is not [{rows}, {k}]");
    assert_eq!(out.len(), rows * n, "output is not [{rows}, {n}]");
    if let Some(b) = bias {
        assert_eq!(b.len(), n);
    }
    if rows == 0 {
        return;
    }
    // f32 weights need no conversion, so the tiles' register reuse beats streaming from
    // 5 rows on (measured: 8 rows of gpt2 take 31 ms per step tiled, 47 ms streamed); the
    // compact formats keep streaming up to 8 (their integer / half dot products win there).
    let streaming_max = if matches!(w.data, QData::F32(_)) {
        STREAMING_MAX_ROWS_F32
    } else {
        STREAMING_MAX_ROWS
    };
    let tile_isa = tile::best().filter(|_| rows > streaming_max && rows <= TILE_MAX_ROWS);
    if let Some(isa) = tile_isa {
        tiles(isa, x, rows, w, bias, out);
    } else if rows <= STREAMING_MAX_ROWS {
        streaming(x, rows, w, bias, out);
    } else {
        gemm_blocks(x, rows, w, bias, out);
    }
}

/// `out[t] = x[t] · w[j]` for every input row `t`, in `w`'s own format.
fn row_dots(w: &QMatrix, j: usize, xs: &[&[f32]], acts: &Q8Acts, out: &mut [f32]) {
    let (k, g) = (w.cols, groups(w.cols));
    match &w.data {
        QData::F32(d) => simd::dot_rows(xs, &d[j * k..(j + 1) * k], out),
        QData::F16(d) => qdot::dot_rows_f16(xs, &d[j * k..(j + 1) * k], out),
        QData::Bf16(d) => qdot::dot_rows_bf16(xs, &d[j * k..(j + 1) * k], out),
        QData::Int8 { q, scales } => qdot::dot_rows_q8(
            acts,
            &q[j * g * GROUP..(j + 1) * g * GROUP],
            &scales[j * g..(j + 1) * g],
            out,
        ),
        QData::Int4 { q, scales } => qdot::dot_rows_q4(
            acts,
            &q[j * g * GROUP / 2..(j + 1) * g * GROUP / 2],
            &scales[j * g..(j + 1) * g],
            out,
        ),
    }
}

fn streaming(x: &[f32], rows: usize, w: &QMatrix, bias: Option<&[f32]>, out: &mut [f32]) {
    let (n, k) = (w.rows, w.cols);
    let mut acts = Q8Acts::default();
    if w.dtype().is_integer() {
        acts.quantize(x, rows, k);
    }
    let threads = rayon::current_num_threads();
    // Enough blocks to balance the threads, each a multiple of 4 rows and big enough that
    // scheduling costs little next to streaming its weights.
    let block = (n.div_ceil(threads * 4))
        .next_multiple_of(4)
        .max(64)
        .min(n.next_multiple_of(4));
    let out_ptr = OutPtr(out.as_mut_ptr());
    (0..n.div_ceil(block)).into_par_iter().for_each(|b| {
        let (j0, j1) = (b * block, ((b + 1) * block).min(n));
        let out = out_ptr.get();
        // Walk the weight rows in order (one sequential stream) and take each one's dot
        // product with every input row, which all stay in L1.
        let xs: Vec<&[f32]> = x.chunks_exact(k).collect();
        let mut dots = [0f32; STREAMING_MAX_ROWS];
        for j in j0..j1 {
            row_dots(w, j, &xs, &acts, &mut dots);
            let b = bias.map_or(0.0, |b| b[j]);
            for (t, d) in dots[..rows].iter().enumerate() {
                // SAFETY: (t, j) is inside `out` and written by this task alone.
                unsafe { *out.add(t * n + j) = d + b };
            }
        }
    });
}

/// Weight rows are split over the threads in blocks, multiplied by the panel kernels against
/// `x` transposed once per call: f32 weights where they lie, the compact formats dequantized
/// PANEL_ROWS rows at a time into a buffer that stays in L2. (GPT2RS_CPU_PANEL=0: the tile
/// kernels instead, with [`tile::NR`] rows dequantized at a time; for comparisons.)
fn tiles(
    isa: tile::Isa,
    x: &[f32],
    rows: usize,
    w: &QMatrix,
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    let (n, k) = (w.rows, w.cols);
    let threads = rayon::current_num_threads();
    let f32_weights = matches!(w.data, QData::F32(_));
    let mut xt = Vec::new();
    let panels = use_panels();
    let mp = if panels {
        panel::transpose(isa, x, rows, k, &mut xt)
    } else {
        0
    };
    // Blocks of whole kernels: 24 is a multiple of every panel kernel's rows and of NR.
    let block = (n.div_ceil(threads * 4))
        .next_multiple_of(24)
        .max(48)
        .min(n.next_multiple_of(tile::NR));
    let out_ptr = OutPtr(out.as_mut_ptr());
    (0..n.div_ceil(block))
        .into_par_iter()
        .for_each_init(Vec::new, |buf: &mut Vec<f32>, b| {
            let (j0, j1) = (b * block, ((b + 1) * block).min(n));
            let out = out_ptr.get();
            let mut j = j0;
            while j < j1 {
                // f32 weights are used where they lie, the whole block at once.
                let nb = if f32_weights {
                    j1 - j
                } else if panels {
                    PANEL_ROWS.min(j1 - j)
                } else {
                    tile::NR.min(j1 - j)
                };
                let wb = match &w.data {
                    QData::F32(d) => &d[j * k..(j + nb) * k],
                    _ => {
                        buf.resize(nb * k, 0.0);
                        for (i, dst) in buf.chunks_exact_mut(k).enumerate() {
                            qdot::dequantize_row(w, j + i, dst);
                        }
                        &buf[..]
                    }
                };
                let b = bias.map(|b| &b[j..j + nb]);
                // SAFETY: `isa` came from tile::best(); columns j..j+nb of every output row
                // belong to this task alone.
                unsafe {
                    if panels {
                        panel::xt_wt(isa, &xt, mp, rows, k, wb, nb, b, out.add(j), n);
                    } else {
                        tile::x_wt(isa, x, rows, k, wb, nb, b, out.add(j), n);
                    }
                }
                j += nb;
            }
        });
}

/// Rows of a compact-format matrix dequantized at once for the panel kernels: a multiple of
/// every kernel's rows, 24 × 6400 floats (600 KB) at most, within L2.
const PANEL_ROWS: usize = 24;

/// Whether batches use the panel kernels (GPT2RS_CPU_PANEL=0: the tile kernels).
fn use_panels() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("GPT2RS_CPU_PANEL").map_or(true, |v| v != "0"))
}

/// `dst[t, j] (+)= Σ_kk x[t, kk] · w[j, kk]` for `t < rows`, `j < n`: the gemm crate's call
/// with both operands column-major, the layout it copies into its kernels fast: `xt` is `x`
/// transposed (`[k, rows]`) and `wt` the weights transposed (`[k, n]`). Writes `dst` with row
/// stride `dst.1`; adds to what `dst` holds when `accumulate`.
///
/// # Safety
/// `dst.0` must be valid for writes of `rows` rows of `n` elements at row stride `dst.1`, not
/// written by anyone else meanwhile.
unsafe fn gemm_xt_wt(
    (rows, n, k): (usize, usize, usize),
    dst: (*mut f32, usize),
    accumulate: bool,
    xt: &[f32],
    wt: &[f32],
) {
    assert!(xt.len() >= rows * k && wt.len() >= n * k);
    // SAFETY: the caller's contract for dst; lhs element (t, kk) at xt[kk*rows + t], rhs
    // element (kk, j) at wt[kk*n + j], both inside the slices (checked above).
    unsafe {
        gemm::gemm(
            rows,
            n,
            k,
            dst.0,
            1,
            dst.1 as isize,
            accumulate,
            xt.as_ptr(),
            rows as isize,
            1,
            wt.as_ptr(),
            1,
            n as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// Weight rows per task: 64 rows of gpt2-xl's widest input (6400) are 1.6 MB of f32, the size
/// of a core's L2 on current CPUs; narrower matrices stay well inside it.
const GEMM_BLOCK: usize = 64;

/// Many rows: `x` transposed once, the weights in blocks of GEMM_BLOCK rows, one task each
/// (transposed into a buffer that stays in cache; the compact formats dequantized first), each
/// block one single-threaded gemm call. For f32 this measured faster than one gemm call over
/// the whole matrix with gemm's own threading (prefill_gemms example, gpt2 shapes, 128 rows).
fn gemm_blocks(x: &[f32], rows: usize, w: &QMatrix, bias: Option<&[f32]>, out: &mut [f32]) {
    let (n, k) = (w.rows, w.cols);
    let mut xt = vec![0f32; k * rows];
    // Split over the threads by columns of x (rows of xt).
    const XT_CHUNK: usize = 256;
    xt.par_chunks_mut(XT_CHUNK * rows)
        .enumerate()
        .for_each(|(c, part)| {
            let c0 = c * XT_CHUNK;
            transpose(&x[c0..], k, rows, part.len() / rows, part, rows);
        });
    let out_ptr = OutPtr(out.as_mut_ptr());
    (0..n.div_ceil(GEMM_BLOCK)).into_par_iter().for_each_init(
        || (Vec::new(), Vec::new()),
        |(rows_buf, wt): &mut (Vec<f32>, Vec<f32>), b| {
            let (j0, j1) = (b * GEMM_BLOCK, ((b + 1) * GEMM_BLOCK).min(n));
            let cols = j1 - j0;
            let wb: &[f32] = match &w.data {
                QData::F32(d) => &d[j0 * k..j1 * k],
                _ => {
                    rows_buf.resize(cols * k, 0.0);
                    for (j, dst) in (j0..j1).zip(rows_buf.chunks_exact_mut(k)) {
                        qdot::dequantize_row(w, j, dst);
                    }
                    rows_buf
                }
            };
            wt.resize(cols * k, 0.0);
            transpose(wb, k, cols, k, wt, cols);
            let dst = out_ptr.get();
            if let Some(b) = bias {
                for t in 0..rows {
                    // SAFETY: columns j0..j1 of every output row belong to this task alone.
                    let row = unsafe { std::slice::from_raw_parts_mut(dst.add(t * n + j0), cols) };
                    row.copy_from_slice(&b[j0..j1]);
                }
            }
            // SAFETY: out[:, j0..j1] (row stride n) is this task's alone.
            unsafe { gemm_xt_wt((rows, cols, k), (dst.add(j0), n), bias.is_some(), &xt, wt) };
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::DType;
    use crate::weights::Matrix;

    fn reference(x: &[f32], rows: usize, w: &Matrix, bias: Option<&[f32]>) -> Vec<f64> {
        let mut out = vec![0f64; rows * w.rows];
        for t in 0..rows {
            for j in 0..w.rows {
                let mut s = bias.map_or(0.0, |b| b[j] as f64);
                for kk in 0..w.cols {
                    s += x[t * w.cols + kk] as f64 * w.data[j * w.cols + kk] as f64;
                }
                out[t * w.rows + j] = s;
            }
        }
        out
    }

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| (((i as u32).wrapping_mul(2654435761) ^ seed) % 2001) as f32 / 1000.0 - 1.0)
            .collect()
    }

    /// What the kernels see of `x`: int8 groups on the streaming path of the integer formats.
    fn seen_input(x: &[f32], rows: usize, k: usize, dtype: DType) -> Vec<f32> {
        if !(dtype.is_integer() && rows <= STREAMING_MAX_ROWS) {
            return x.to_vec();
        }
        let mut a = Q8Acts::default();
        a.quantize(x, rows, k);
        (0..rows * k)
            .map(|i| {
                let (t, kk) = (i / k, i % k);
                a.row_q(t)[kk] as f32 * a.row_scales(t)[kk / GROUP]
            })
            .collect()
    }

    #[test]
    fn every_format_and_path_matches_the_reference_on_awkward_shapes() {
        // (rows, out, in): odd sizes, gpt2-xl's 1600 width, and both sides of the path switch.
        for &(rows, n, k) in &[
            (1, 1, 1),
            (1, 7, 13),
            (3, 67, 1600),
            (8, 130, 65),
            (9, 130, 65),
            (17, 75, 1600),
            (33, 4800, 31),
            (40, 130, 97),
            (64, 29, 1600),
            (65, 29, 1600),
        ] {
            let x = values(rows * k, 1);
            let w = Matrix {
                rows: n,
                cols: k,
                data: values(n * k, 2),
            };
            let b = values(n, 3);
            for dtype in DType::ALL {
                let q = QMatrix::quantize(&w, dtype);
                let wd = q.dequantize();
                let xd = seen_input(&x, rows, k, dtype);
                for bias in [None, Some(b.as_slice())] {
                    let mut out = vec![f32::NAN; rows * n];
                    linear(&x, rows, &q, bias, &mut out);
                    let want = reference(&xd, rows, &wd, bias);
                    for (i, (a, e)) in out.iter().zip(&want).enumerate() {
                        assert!(
                            (*a as f64 - e).abs() < 1e-4 * (1.0 + e.abs()),
                            "{dtype} rows={rows} n={n} k={k} bias={} at {i}: {a} vs {e}",
                            bias.is_some()
                        );
                    }
                }
            }
        }
    }
}
