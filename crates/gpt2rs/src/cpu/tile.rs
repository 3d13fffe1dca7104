//! `x · Wᵀ` for a few dozen input rows (batched decode) with the weights read in place.
//!
//! The gemm crate packs both operands into fresh buffers on every call. For prefill that is
//! noise; for 9–64 rows it costs as much as the multiply itself: the whole weight matrix is
//! copied once per call (and the copy's pages are faulted in anew). Here each output element
//! is a dot product over the full width, computed in register tiles of [`MR`] input rows ×
//! [`NR`] weight rows: per 8 columns, 3 weight loads and 4 input loads feed 12 FMAs, so the
//! FMA units, not the loads, set the pace. A tile of weight rows stays in L1/L2 while every
//! input row passes over it; the input rows (at most 64 × 6400 floats) stay in L2.
//!
//! AVX2+FMA only (x86-64, chosen at run time); elsewhere `matmul` keeps using gemm.

/// Input rows per register tile.
pub const MR: usize = 4;
/// Weight rows per register tile.
pub const NR: usize = 3;

/// Whether this CPU runs the tile kernels.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    return super::simd::has_avx2_fma();
    #[allow(unreachable_code)]
    false
}

/// `out[t * ldo + j] = Σ_kk x[t * k + kk] · w[j * k + kk] + bias[j]` for `t < m`, `j < nb`
/// (`bias[j] = 0` without a bias); `x` is `[m, k]`, `w` is `[nb, k]`.
///
/// # Safety
/// [`available`] must be true; `out` must be valid for writes at every `t * ldo + j` above
/// and not written by anyone else meanwhile.
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
    assert!(x.len() >= m * k && w.len() >= nb * k);
    assert!(bias.is_none_or(|b| b.len() >= nb));
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the caller's contract; lengths checked above.
    unsafe {
        x86::x_wt(x, m, k, w, nb, bias, out, ldo)
    };
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("tile kernels are x86-64 only; check `available` first");
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{MR, NR};
    use std::arch::x86_64::*;

    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    /// Dot products of `R` input rows (at `x`, stride `k`) with `C` weight rows (at `w`,
    /// stride `k`), stored at `out[r * ldo + c] = dot + bias[c]`.
    #[inline(always)]
    unsafe fn tile<const R: usize, const C: usize>(
        x: *const f32,
        w: *const f32,
        k: usize,
        bias: [f32; NR],
        out: *mut f32,
        ldo: usize,
    ) {
        let mut acc = [[_mm256_setzero_ps(); C]; R];
        let mut kk = 0;
        while kk + 8 <= k {
            let wv: [__m256; C] = std::array::from_fn(|c| _mm256_loadu_ps(w.add(c * k + kk)));
            for (r, acc) in acc.iter_mut().enumerate() {
                let xv = _mm256_loadu_ps(x.add(r * k + kk));
                for c in 0..C {
                    acc[c] = _mm256_fmadd_ps(xv, wv[c], acc[c]);
                }
            }
            kk += 8;
        }
        for (r, acc) in acc.iter().enumerate() {
            for c in 0..C {
                let mut s = hsum(acc[c]);
                for i in kk..k {
                    s = (*x.add(r * k + i)).mul_add(*w.add(c * k + i), s);
                }
                *out.add(r * ldo + c) = s + bias[c];
            }
        }
    }

    /// Every tile of `C` weight rows starting at `j0` with all input rows.
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
        while t + MR <= m {
            tile::<MR, C>(x.as_ptr().add(t * k), w, k, bias, out.add(t * ldo), ldo);
            t += MR;
        }
        let (px, po) = (x.as_ptr().add(t * k), out.add(t * ldo));
        match m - t {
            0 => {}
            1 => tile::<1, C>(px, w, k, bias, po, ldo),
            2 => tile::<2, C>(px, w, k, bias, po, ldo),
            3 => tile::<3, C>(px, w, k, bias, po, ldo),
            _ => unreachable!("fewer than MR rows remain"),
        }
    }

    #[target_feature(enable = "avx2,fma")]
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiles_match_a_plain_loop_on_awkward_shapes() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX2+FMA tile kernels");
            return;
        }
        let val = |i: usize, s: u32| ((i as u32).wrapping_mul(2654435761) ^ s) % 2001;
        for &(m, nb, k) in &[(1, 1, 1), (5, 7, 13), (4, 3, 8), (9, 10, 1600), (33, 5, 71)] {
            let x: Vec<f32> = (0..m * k).map(|i| val(i, 1) as f32 / 1e3 - 1.0).collect();
            let w: Vec<f32> = (0..nb * k).map(|i| val(i, 2) as f32 / 1e3 - 1.0).collect();
            let b: Vec<f32> = (0..nb).map(|i| val(i, 3) as f32 / 1e3).collect();
            // A wider output row than nb, to check the stride.
            let ldo = nb + 2;
            for bias in [None, Some(b.as_slice())] {
                let mut out = vec![f32::NAN; m * ldo];
                // SAFETY: available() checked; out holds m rows of stride ldo ≥ nb.
                unsafe { x_wt(&x, m, k, &w, nb, bias, out.as_mut_ptr(), ldo) };
                for t in 0..m {
                    for j in 0..nb {
                        let want: f64 = (0..k)
                            .map(|i| x[t * k + i] as f64 * w[j * k + i] as f64)
                            .sum::<f64>()
                            + bias.map_or(0.0, |b| b[j] as f64);
                        let got = out[t * ldo + j] as f64;
                        assert!(
                            (got - want).abs() < 1e-4 * (1.0 + want.abs()),
                            "m={m} nb={nb} k={k} ({t},{j}): {got} vs {want}"
                        );
                    }
                    assert!(out[t * ldo + nb].is_nan(), "wrote past the block");
                }
            }
        }
    }
}
