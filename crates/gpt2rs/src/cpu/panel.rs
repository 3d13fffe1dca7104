//! `x · Wᵀ` for a few dozen f32 input rows (batched decode) with `x` transposed, so the
//! weights are read in place and broadcast one element at a time.
//!
//! [`tile`](super::tile)'s kernels take dot products along k: every register tile streams 3
//! weight rows and 8 input rows, and at gpt2's widths those 11 streams overflow L1, so each
//! FMA waits on L2 (57% of the FMA peak measured on Zen 4 at 32 rows). Here the input rows
//! are transposed once per call (`xt[kk · mp + t]`, a few hundred KB that stay in L2 and whose
//! current row stays in L1), and a kernel holds NR weight rows × up to 4 vectors of input rows
//! in accumulators: per k, NR broadcast weights, MV vector loads of `xt` and NR · MV FMAs, the
//! weight rows each one sequential stream. The accumulators hold output columns, stored with
//! a transpose at the end.
//!
//! x86-64 only (chosen at run time, like `tile`).

use super::tile::Isa;
use rayon::prelude::*;

/// Lanes of an f32 vector of `isa`.
pub fn lanes(isa: Isa) -> usize {
    match isa {
        Isa::Avx2 => 8,
        Isa::Avx512 => 16,
    }
}

/// `x` (`[m, k]`) transposed into `[k, mp]`, rows padded with zeros to `mp`, a multiple of
/// `isa`'s lanes; returns `mp`.
pub fn transpose(isa: Isa, x: &[f32], m: usize, k: usize, xt: &mut Vec<f32>) -> usize {
    let mp = m.next_multiple_of(lanes(isa));
    xt.clear();
    xt.resize(k * mp, 0.0);
    // Written in order, read from the m input rows as m sequential streams; split over the
    // threads (measured a little ahead of one thread, within this VM's noise).
    const CHUNK: usize = 64;
    xt.par_chunks_mut(CHUNK * mp)
        .enumerate()
        .for_each(|(c, part)| {
            for (i, dst) in part.chunks_exact_mut(mp).enumerate() {
                let kk = c * CHUNK + i;
                for (t, d) in dst[..m].iter_mut().enumerate() {
                    *d = x[t * k + kk];
                }
            }
        });
    mp
}

/// `out[t * ldo + j] = Σ_kk x[t, kk] · w[j * k + kk] + bias[j]` for `t < m`, `j < nb`, with
/// `x` given as [`transpose`] left it (`xt`, `mp` columns).
///
/// # Safety
/// `isa` must run on this CPU; `out` must be valid for writes at every `t * ldo + j` above
/// and not written by anyone else meanwhile.
#[allow(clippy::too_many_arguments)]
pub unsafe fn xt_wt(
    isa: Isa,
    xt: &[f32],
    mp: usize,
    m: usize,
    k: usize,
    w: &[f32],
    nb: usize,
    bias: Option<&[f32]>,
    out: *mut f32,
    ldo: usize,
) {
    assert!(m <= mp && mp.is_multiple_of(lanes(isa)) && xt.len() >= k * mp);
    assert!(w.len() >= nb * k && bias.is_none_or(|b| b.len() >= nb));
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the caller's contract; lengths checked above.
    unsafe {
        match isa {
            Isa::Avx2 => avx2::xt_wt(xt, mp, m, k, w, nb, bias, out, ldo),
            Isa::Avx512 => avx512::xt_wt(xt, mp, m, k, w, nb, bias, out, ldo),
        }
    };
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (out, ldo);
        unreachable!("no panel kernels for {isa:?} here");
    }
}

/// One module of kernels for a vector type of `$lanes` floats: `$nr[mv - 1]` weight rows per
/// kernel for `mv` vectors of input rows (what fills the `$feature`'s registers).
#[cfg(target_arch = "x86_64")]
macro_rules! panel_kernels {
    ($module:ident, $feature:literal, $vec:ty, $lanes:literal, nr: [$nr1:literal, $nr2:literal,
     $nr3:literal, $nr4:literal], zero: $zero:ident, load: $load:ident, set1: $set1:ident,
     fma: $fma:ident, store: $store:ident) => {
        mod $module {
            use std::arch::x86_64::*;

            /// NR weight rows (at `w`, stride `k`) with MV vectors of input rows (columns
            /// `c0..` of `xt`), stored at `out[t * ldo + i]` for input rows `t < m` of them.
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            unsafe fn kernel<const MV: usize, const NR: usize>(
                xt: *const f32,
                mp: usize,
                m: usize,
                k: usize,
                w: *const f32,
                bias: Option<*const f32>,
                out: *mut f32,
                ldo: usize,
            ) {
                let mut acc: [[$vec; MV]; NR] = [[$zero(); MV]; NR];
                for kk in 0..k {
                    let xv: [$vec; MV] =
                        std::array::from_fn(|v| $load(xt.add(kk * mp + v * $lanes)));
                    for (i, acc) in acc.iter_mut().enumerate() {
                        let wv = $set1(*w.add(i * k + kk));
                        for v in 0..MV {
                            acc[v] = $fma(wv, xv[v], acc[v]);
                        }
                    }
                }
                let mut lane = [0f32; $lanes];
                for (i, acc) in acc.iter().enumerate() {
                    let b = bias.map_or(0.0, |b| *b.add(i));
                    for (v, a) in acc.iter().enumerate() {
                        $store(lane.as_mut_ptr(), *a);
                        for (l, s) in lane.iter().enumerate() {
                            let t = v * $lanes + l;
                            if t < m {
                                *out.add(t * ldo + i) = s + b;
                            }
                        }
                    }
                }
            }

            /// Every weight row of the block with one group of up to 4 vectors of input rows.
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            unsafe fn group<const MV: usize, const NR: usize>(
                xt: *const f32,
                mp: usize,
                m: usize,
                k: usize,
                w: &[f32],
                nb: usize,
                bias: Option<&[f32]>,
                out: *mut f32,
                ldo: usize,
            ) {
                let mut j = 0;
                while j < nb {
                    let (pw, po) = (w.as_ptr().add(j * k), out.add(j));
                    let pb = bias.map(|b| b.as_ptr().add(j));
                    if j + NR <= nb {
                        kernel::<MV, NR>(xt, mp, m, k, pw, pb, po, ldo);
                        j += NR;
                    } else {
                        kernel::<MV, 1>(xt, mp, m, k, pw, pb, po, ldo);
                        j += 1;
                    }
                }
            }

            /// See `panel::xt_wt`.
            #[target_feature(enable = $feature)]
            #[allow(clippy::too_many_arguments)]
            pub unsafe fn xt_wt(
                xt: &[f32],
                mp: usize,
                m: usize,
                k: usize,
                w: &[f32],
                nb: usize,
                bias: Option<&[f32]>,
                out: *mut f32,
                ldo: usize,
            ) {
                // Input rows in groups of up to 4 vectors, each over the whole block.
                let mut t0 = 0;
                while t0 < m {
                    let rows = (m - t0).min(4 * $lanes);
                    let (px, po) = (xt.as_ptr().add(t0), out.add(t0 * ldo));
                    match rows.div_ceil($lanes) {
                        1 => group::<1, $nr1>(px, mp, rows, k, w, nb, bias, po, ldo),
                        2 => group::<2, $nr2>(px, mp, rows, k, w, nb, bias, po, ldo),
                        3 => group::<3, $nr3>(px, mp, rows, k, w, nb, bias, po, ldo),
                        _ => group::<4, $nr4>(px, mp, rows, k, w, nb, bias, po, ldo),
                    }
                    t0 += rows;
                }
            }
        }
    };
}

// 16 ymm registers: up to 12 accumulators, the input vectors and a broadcast.
#[cfg(target_arch = "x86_64")]
panel_kernels!(avx2, "avx2,fma", __m256, 8, nr: [12, 6, 4, 3],
    zero: _mm256_setzero_ps, load: _mm256_loadu_ps, set1: _mm256_set1_ps,
    fma: _mm256_fmadd_ps, store: _mm256_storeu_ps);

// 32 zmm registers: up to 24 accumulators.
#[cfg(target_arch = "x86_64")]
panel_kernels!(avx512, "avx512f", __m512, 16, nr: [12, 12, 8, 6],
    zero: _mm512_setzero_ps, load: _mm512_loadu_ps, set1: _mm512_set1_ps,
    fma: _mm512_fmadd_ps, store: _mm512_storeu_ps);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panels_match_a_plain_loop_on_awkward_shapes() {
        // Input rows on both sides of every vector count (and past 4 vectors), weight blocks
        // with remainders, gpt2-xl's width.
        let shapes = [
            (1, 1, 1),
            (5, 13, 7),
            (9, 25, 1600),
            (17, 14, 33),
            (32, 12, 64),
            (33, 7, 71),
            (49, 26, 40),
            (64, 6, 19),
            (70, 5, 24),
        ];
        super::super::tile::check_against_a_plain_loop(
            &shapes,
            &|isa, x, m, k, w, nb, bias, out, ldo| {
                let mut xt = vec![];
                let mp = transpose(isa, x, m, k, &mut xt);
                // SAFETY: the ISA runs here; out holds m rows of stride ldo ≥ nb.
                unsafe { xt_wt(isa, &xt, mp, m, k, w, nb, bias, out, ldo) }
            },
        );
    }
}
