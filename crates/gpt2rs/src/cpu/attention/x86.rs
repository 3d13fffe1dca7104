//! AVX2 kernels for one (row, head) of attention, for head sizes that are a multiple of 8.
//!
//! A head's dot product is short (64 values in every GPT-2), so a call per cached position
//! spends more on setup and the horizontal sum than on the products. Here four positions
//! run side by side (four FMA chains, one load of `q` per four keys, one 4-way horizontal
//! sum), and the weighted sum of values keeps the whole output head in registers across all
//! positions instead of reading and writing it once per position.

use std::arch::x86_64::*;

/// Head sizes these kernels take.
pub fn supports(d: usize) -> bool {
    d.is_multiple_of(8) && crate::cpu::simd::has_avx2_fma()
}

/// `scores[s] = scale · q · keys[s * stride ..][..d]` for `s < scores.len()`.
///
/// # Safety
/// AVX2+FMA present, `d = q.len()` a multiple of 8, and `keys` holding
/// `(scores.len() - 1) * stride + d` values.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn scores(q: &[f32], keys: &[f32], stride: usize, scale: f32, scores: &mut [f32]) {
    let (d, n) = (q.len(), scores.len());
    let (pq, pk) = (q.as_ptr(), keys.as_ptr());
    let mut s = 0;
    while s + 4 <= n {
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut c = 0;
        while c < d {
            let qv = _mm256_loadu_ps(pq.add(c));
            for (p, acc) in acc.iter_mut().enumerate() {
                *acc = _mm256_fmadd_ps(qv, _mm256_loadu_ps(pk.add((s + p) * stride + c)), *acc);
            }
            c += 8;
        }
        // Four horizontal sums at once: pairwise adds leave [s0 s1 s2 s3] in each half.
        let h = _mm256_hadd_ps(
            _mm256_hadd_ps(acc[0], acc[1]),
            _mm256_hadd_ps(acc[2], acc[3]),
        );
        let sums = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
        _mm_storeu_ps(
            scores.as_mut_ptr().add(s),
            _mm_mul_ps(sums, _mm_set1_ps(scale)),
        );
        s += 4;
    }
    while s < n {
        let mut acc = _mm256_setzero_ps();
        let mut c = 0;
        while c < d {
            acc = _mm256_fmadd_ps(
                _mm256_loadu_ps(pq.add(c)),
                _mm256_loadu_ps(pk.add(s * stride + c)),
                acc,
            );
            c += 8;
        }
        let h = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
        let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
        let h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
        scores[s] = _mm_cvtss_f32(h) * scale;
        s += 1;
    }
}

/// `out = Σ_s weights[s] · values[s * stride ..][..d]`, `d = out.len()`.
///
/// # Safety
/// AVX2+FMA present, `d` a multiple of 8, and `values` holding
/// `(weights.len() - 1) * stride + d` values.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn weighted_sum(weights: &[f32], values: &[f32], stride: usize, out: &mut [f32]) {
    let d = out.len();
    let mut c = 0;
    // Up to 64 output values (8 registers) at a time; GPT-2's heads are exactly 64.
    while c < d {
        match (d - c) / 8 {
            1 => weighted_sum_part::<1>(weights, values, stride, c, out),
            2 => weighted_sum_part::<2>(weights, values, stride, c, out),
            3 => weighted_sum_part::<3>(weights, values, stride, c, out),
            4 => weighted_sum_part::<4>(weights, values, stride, c, out),
            5 => weighted_sum_part::<5>(weights, values, stride, c, out),
            6 => weighted_sum_part::<6>(weights, values, stride, c, out),
            7 => weighted_sum_part::<7>(weights, values, stride, c, out),
            _ => weighted_sum_part::<8>(weights, values, stride, c, out),
        }
        c += 64;
    }
}

/// `out[c .. c + 8V]` of [`weighted_sum`].
#[inline(always)]
unsafe fn weighted_sum_part<const V: usize>(
    weights: &[f32],
    values: &[f32],
    stride: usize,
    c: usize,
    out: &mut [f32],
) {
    let pv = values.as_ptr().add(c);
    let mut acc = [_mm256_setzero_ps(); V];
    for (s, &p) in weights.iter().enumerate() {
        let pb = _mm256_set1_ps(p);
        for (i, acc) in acc.iter_mut().enumerate() {
            *acc = _mm256_fmadd_ps(pb, _mm256_loadu_ps(pv.add(s * stride + 8 * i)), *acc);
        }
    }
    for (i, acc) in acc.iter().enumerate() {
        _mm256_storeu_ps(out.as_mut_ptr().add(c + 8 * i), *acc);
    }
}
