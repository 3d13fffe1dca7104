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

/// `out = Σ_s weights[s] · values[s * stride ..][..d]`, `d = out.len()` (with `accumulate`,
/// `out +=` that sum).
///
/// # Safety
/// AVX2+FMA present, `d` a multiple of 8, and `values` holding
/// `(weights.len() - 1) * stride + d` values.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn weighted_sum(
    weights: &[f32],
    values: &[f32],
    stride: usize,
    out: &mut [f32],
    accumulate: bool,
) {
    let d = out.len();
    let mut c = 0;
    // Up to 64 output values (8 registers) at a time; GPT-2's heads are exactly 64.
    while c < d {
        let a = accumulate;
        match (d - c) / 8 {
            1 => weighted_sum_part::<1>(weights, values, stride, c, out, a),
            2 => weighted_sum_part::<2>(weights, values, stride, c, out, a),
            3 => weighted_sum_part::<3>(weights, values, stride, c, out, a),
            4 => weighted_sum_part::<4>(weights, values, stride, c, out, a),
            5 => weighted_sum_part::<5>(weights, values, stride, c, out, a),
            6 => weighted_sum_part::<6>(weights, values, stride, c, out, a),
            7 => weighted_sum_part::<7>(weights, values, stride, c, out, a),
            _ => weighted_sum_part::<8>(weights, values, stride, c, out, a),
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
    accumulate: bool,
) {
    let pv = values.as_ptr().add(c);
    let mut acc = [_mm256_setzero_ps(); V];
    if accumulate {
        for (i, acc) in acc.iter_mut().enumerate() {
            *acc = _mm256_loadu_ps(out.as_ptr().add(c + 8 * i));
        }
    }
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

/// Query rows that share one pass over a sequence's keys and values in the grouped kernels.
pub const GROUP: usize = 8;

/// The four sums of `acc`'s lanes, in order.
#[inline(always)]
unsafe fn hsum4(acc: [__m256; 4]) -> __m128 {
    let h = _mm256_hadd_ps(
        _mm256_hadd_ps(acc[0], acc[1]),
        _mm256_hadd_ps(acc[2], acc[3]),
    );
    _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1))
}

/// `scores[g * n + s] = scale · q_g · keys[s * stride ..][..d]` for `g < rows` (query `g` at
/// `q + g * q_stride`) and `s < n`. Keys go four at a time through every pair of query rows, so
/// each is read from memory once for the whole group and from L1 for the other pairs (a
/// prompt's rows re-read the same cache otherwise, once per row).
///
/// # Safety
/// AVX2+FMA present, `d` a multiple of 8; `q` valid for `rows` rows of `d` at `q_stride`,
/// `keys` for `(n - 1) * stride + d` values, `scores` for `rows * n`.
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn group_scores(
    q: *const f32,
    q_stride: usize,
    rows: usize,
    d: usize,
    keys: &[f32],
    stride: usize,
    scale: f32,
    n: usize,
    scores: &mut [f32],
) {
    assert!(scores.len() >= rows * n && keys.len() >= (n.max(1) - 1) * stride + d);
    let (pk, ps) = (keys.as_ptr(), scores.as_mut_ptr());
    let sc = _mm_set1_ps(scale);
    let mut s = 0;
    while s + 4 <= n {
        let mut g = 0;
        while g < rows {
            let two = g + 1 < rows;
            let (q0, q1) = (
                q.add(g * q_stride),
                q.add((g + usize::from(two)) * q_stride),
            );
            let mut a0 = [_mm256_setzero_ps(); 4];
            let mut a1 = [_mm256_setzero_ps(); 4];
            let mut c = 0;
            while c < d {
                let (x0, x1) = (_mm256_loadu_ps(q0.add(c)), _mm256_loadu_ps(q1.add(c)));
                for p in 0..4 {
                    let k = _mm256_loadu_ps(pk.add((s + p) * stride + c));
                    a0[p] = _mm256_fmadd_ps(x0, k, a0[p]);
                    a1[p] = _mm256_fmadd_ps(x1, k, a1[p]);
                }
                c += 8;
            }
            _mm_storeu_ps(ps.add(g * n + s), _mm_mul_ps(hsum4(a0), sc));
            if two {
                _mm_storeu_ps(ps.add((g + 1) * n + s), _mm_mul_ps(hsum4(a1), sc));
            }
            g += 2;
        }
        s += 4;
    }
    for g in 0..rows {
        let row = std::slice::from_raw_parts(q.add(g * q_stride), d);
        let tail = &mut scores[g * n + s..g * n + n];
        if !tail.is_empty() {
            self::scores(row, &keys[s * stride..], stride, scale, tail);
        }
    }
}

/// `out_g = Σ_{s < n} p[g * n + s] · values[s * stride ..][..d]` for `g < R` (output row `g`
/// at `out + g * out_stride`): value rows in blocks of 64 positions, each block's 8-wide column
/// slices summed into all R rows at once while the block stays in L1.
///
/// # Safety
/// AVX2+FMA present, `d` a multiple of 8; `p` holds `R * n` weights, `values`
/// `(n - 1) * stride + d` values, and `out` is valid for writes of R rows of `d` at
/// `out_stride` that nobody else touches meanwhile.
#[target_feature(enable = "avx2,fma")]
#[inline(never)] // one call per group and head; kept apart so profiles show it
pub unsafe fn group_weighted_sum<const R: usize>(
    p: &[f32],
    n: usize,
    values: &[f32],
    stride: usize,
    d: usize,
    out: *mut f32,
    out_stride: usize,
) {
    const BLOCK: usize = 64;
    assert!(p.len() >= R * n && n > 0 && values.len() >= (n - 1) * stride + d);
    let (pv, pp) = (values.as_ptr(), p.as_ptr());
    for g in 0..R {
        std::ptr::write_bytes(out.add(g * out_stride), 0, d);
    }
    let mut sb = 0;
    while sb < n {
        let se = (sb + BLOCK).min(n);
        let mut c = 0;
        while c < d {
            let mut acc: [__m256; R] =
                std::array::from_fn(|g| _mm256_loadu_ps(out.add(g * out_stride + c)));
            for s in sb..se {
                let v = _mm256_loadu_ps(pv.add(s * stride + c));
                for (g, acc) in acc.iter_mut().enumerate() {
                    *acc = _mm256_fmadd_ps(_mm256_set1_ps(*pp.add(g * n + s)), v, *acc);
                }
            }
            for (g, acc) in acc.iter().enumerate() {
                _mm256_storeu_ps(out.add(g * out_stride + c), *acc);
            }
            c += 8;
        }
        sb = se;
    }
}
