//! `x · Wᵀ` for a few dozen input rows (batched decode) with the weights read in place.
//!
//! The gemm crate packs both operands into fresh buffers on every call. For prefill that is
//! noise; for 9–64 rows it costs as much as the multiply itself: the whole weight matrix is
//! copied once per call (and the copy's pages are faulted in anew). Here each output element
//! is a dot product over the full width, computed in register tiles of several input rows ×
//! [`NR`] weight rows, so each vector load feeds several FMAs: AVX2 tiles are 4 × 3 (12
//! accumulators of 16 registers; 7 loads per 12 FMAs), AVX-512 tiles 8 × 3 (24 of 32; 11
//! loads per 24 FMAs, 10–15% faster on Zen 4). A tile of weight rows stays in L1/L2 while
//! every input row passes over it; the input rows (at most 64 × 6400 floats) stay in L2.
//!
//! x86-64 only (chosen at run time); elsewhere `matmul` keeps using gemm.

/// Weight rows per register tile.
pub const NR: usize = 3;

/// The instruction sets the tile kernels come in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    Avx2,
    Avx512,
}

/// The best tile kernels this CPU runs, if any.
pub fn best() -> Option<Isa> {
    #[cfg(target_arch = "x86_64")]
    {
        static BEST: std::sync::OnceLock<Option<Isa>> = std::sync::OnceLock::new();
        *BEST.get_or_init(|| {
            if std::arch::is_x86_feature_detected!("avx512f") {
                Some(Isa::Avx512)
            } else if super::simd::has_avx2_fma() {
                Some(Isa::Avx2)
            } else {
                None
            }
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    None
}

/// Whether `isa` runs on this CPU.
#[cfg(test)]
pub(super) fn supported(isa: Isa) -> bool {
    matches!(
        (best(), isa),
        (Some(Isa::Avx512), _) | (Some(Isa::Avx2), Isa::Avx2)
    )
}

/// `out[t * ldo + j] = Σ_kk x[t * k + kk] · w[j * k + kk] + bias[j]` for `t < m`, `j < nb`
/// (`bias[j] = 0` without a bias); `x` is `[m, k]`, `w` is `[nb, k]`.
///
/// # Safety
/// [`supported`]`(isa)` must be true; `out` must be valid for writes at every `t * ldo + j`
/// above and not written by anyone else meanwhile.
#[allow(clippy::too_many_arguments)]
pub unsafe fn x_wt(
    isa: Isa,
    x: &[f32],
    m: usize,
    k: usize,
    w: &[f32],
    nb: usize,
    bias: Option<&[f32]>,
    out: *mut f32,
    ldo: usize,
) {
    assert!(x.len() >= m * k && w.len() >= nb * k);
    assert!(bias.is_none_or(|b| b.len() >= nb));
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the caller's contract; lengths checked above.
    unsafe {
        match isa {
            Isa::Avx2 => avx2::x_wt(x, m, k, w, nb, bias, out, ldo),
            Isa::Avx512 => avx512::x_wt(x, m, k, w, nb, bias, out, ldo),
        }
    };
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("no tile kernels for {isa:?} here; check `supported` first");
}

/// One module of tile kernels for a vector type: `$mr` input rows per tile, `$lanes` floats
/// per vector, the named intrinsics, compiled for `$feature`.
#[cfg(target_arch = "x86_64")]
macro_rules! tile_kernels {
    ($module:ident, $feature:literal, $vec:ty, $lanes:literal, $mr:literal,
     zero: $zero:ident, load: $load:ident, fma: $fma:ident, hsum: $hsum:path) => {
        mod $module {
            use super::NR;
            use std::arch::x86_64::*;

            /// Dot products of `R` input rows (at `x`, stride `k`) with `C` weight rows (at
            /// `w`, stride `k`), stored at `out[r * ldo + c] = dot + bias[c]`.
            #[inline(always)]
            unsafe fn tile<const R: usize, const C: usize>(
                x: *const f32,
                w: *const f32,
                k: usize,
                bias: [f32; NR],
                out: *mut f32,
                ldo: usize,
            ) {
                let mut acc: [[$vec; C]; R] = [[$zero(); C]; R];
                let mut kk = 0;
                while kk + $lanes <= k {
                    let wv: [$vec; C] = std::array::from_fn(|c| $load(w.add(c * k + kk)));
                    for (r, acc) in acc.iter_mut().enumerate() {
                        let xv = $load(x.add(r * k + kk));
                        for c in 0..C {
                            acc[c] = $fma(xv, wv[c], acc[c]);
                        }
                    }
                    kk += $lanes;
                }
                for (r, acc) in acc.iter().enumerate() {
                    for c in 0..C {
                        let mut s = $hsum(acc[c]);
                        for i in kk..k {
                            s = (*x.add(r * k + i)).mul_add(*w.add(c * k + i), s);
                        }
                        *out.add(r * ldo + c) = s + bias[c];
                    }
                }
            }

            /// Every tile of `C` weight rows (at `w`) with all `m` input rows.
            #[inline(always)]
            unsafe fn column<const C: usize>(
                x: &[f32],
                m: usize,
                k: usize,
                w: *const f32,
                bias: [f32; NR],
                out: *mut f32,
                ldo: usize,
            ) {
                let mut t = 0;
                while t + $mr <= m {
                    tile::<$mr, C>(x.as_ptr().add(t * k), w, k, bias, out.add(t * ldo), ldo);
                    t += $mr;
                }
                let (px, po) = (x.as_ptr().add(t * k), out.add(t * ldo));
                match m - t {
                    0 => {}
                    1 => tile::<1, C>(px, w, k, bias, po, ldo),
                    2 => tile::<2, C>(px, w, k, bias, po, ldo),
                    3 => tile::<3, C>(px, w, k, bias, po, ldo),
                    4 => tile::<4, C>(px, w, k, bias, po, ldo),
                    5 => tile::<5, C>(px, w, k, bias, po, ldo),
                    6 => tile::<6, C>(px, w, k, bias, po, ldo),
                    _ => tile::<7, C>(px, w, k, bias, po, ldo),
                }
            }

            /// See `tile::x_wt`.
            #[target_feature(enable = $feature)]
            #[allow(clippy::too_many_arguments)]
            pub unsafe fn x_wt(
                x: &[f32],
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
                    let c = NR.min(nb - j);
                    let b: [f32; NR] = std::array::from_fn(|i| match bias {
                        Some(b) if i < c => b[j + i],
                        _ => 0.0,
                    });
                    let (pw, po) = (w.as_ptr().add(j * k), out.add(j));
                    match c {
                        3 => column::<3>(x, m, k, pw, b, po, ldo),
                        2 => column::<2>(x, m, k, pw, b, po, ldo),
                        _ => column::<1>(x, m, k, pw, b, po, ldo),
                    }
                    j += NR;
                }
            }
        }
    };
}

#[cfg(target_arch = "x86_64")]
tile_kernels!(avx2, "avx2,fma", __m256, 8, 4,
    zero: _mm256_setzero_ps, load: _mm256_loadu_ps, fma: _mm256_fmadd_ps, hsum: super::hsum256);

#[cfg(target_arch = "x86_64")]
tile_kernels!(avx512, "avx512f", __m512, 16, 8,
    zero: _mm512_setzero_ps, load: _mm512_loadu_ps, fma: _mm512_fmadd_ps,
    hsum: _mm512_reduce_add_ps);

/// The sum of a 256-bit vector's lanes.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn hsum256(v: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    _mm_cvtss_f32(s)
}

/// A product kernel under test: `(isa, x, m, k, w, nb, bias, out, ldo)` must leave
/// `out[t * ldo + j] = Σ x[t, kk] · w[j, kk] + bias[j]` for `t < m`, `j < nb`, nothing else.
#[cfg(test)]
pub(super) type KernelUnderTest<'a> =
    &'a dyn Fn(Isa, &[f32], usize, usize, &[f32], usize, Option<&[f32]>, *mut f32, usize);

/// Runs `kernel` on every ISA this CPU has, for each `(m, nb, k)` in `shapes`, with and
/// without a bias, against a plain f64 loop (and checks it writes nothing past the block).
#[cfg(test)]
pub(super) fn check_against_a_plain_loop(
    shapes: &[(usize, usize, usize)],
    kernel: KernelUnderTest,
) {
    let isas: Vec<Isa> = [Isa::Avx2, Isa::Avx512]
        .into_iter()
        .filter(|&isa| supported(isa))
        .collect();
    if isas.is_empty() {
        eprintln!("skipped: this CPU has no tile or panel kernels");
    }
    let val = |i: usize, s: u32| ((i as u32).wrapping_mul(2654435761) ^ s) % 2001;
    for isa in isas {
        for &(m, nb, k) in shapes {
            let x: Vec<f32> = (0..m * k).map(|i| val(i, 1) as f32 / 1e3 - 1.0).collect();
            let w: Vec<f32> = (0..nb * k).map(|i| val(i, 2) as f32 / 1e3 - 1.0).collect();
            let b: Vec<f32> = (0..nb).map(|i| val(i, 3) as f32 / 1e3).collect();
            // A wider output row than nb, to check the stride.
            let ldo = nb + 2;
            for bias in [None, Some(b.as_slice())] {
                let mut out = vec![f32::NAN; m * ldo];
                kernel(isa, &x, m, k, &w, nb, bias, out.as_mut_ptr(), ldo);
                for t in 0..m {
                    for j in 0..nb {
                        let want: f64 = (0..k)
                            .map(|i| x[t * k + i] as f64 * w[j * k + i] as f64)
                            .sum::<f64>()
                            + bias.map_or(0.0, |b| b[j] as f64);
                        let got = out[t * ldo + j] as f64;
                        assert!(
                            (got - want).abs() < 1e-4 * (1.0 + want.abs()),
                            "{isa:?} m={m} nb={nb} k={k} ({t},{j}): {got} vs {want}"
                        );
                    }
                    assert!(out[t * ldo + nb].is_nan(), "wrote past the block");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiles_match_a_plain_loop_on_awkward_shapes() {
        let shapes = [
            (1, 1, 1),
            (5, 7, 13),
            (4, 3, 8),
            (9, 10, 1600),
            (33, 5, 71),
            (15, 4, 40),
        ];
        check_against_a_plain_loop(&shapes, &|isa, x, m, k, w, nb, bias, out, ldo| {
            // SAFETY: the ISA runs here; out holds m rows of stride ldo ≥ nb.
            unsafe { x_wt(isa, x, m, k, w, nb, bias, out, ldo) }
        });
    }
}
