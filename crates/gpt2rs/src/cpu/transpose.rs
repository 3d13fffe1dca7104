//! f32 matrix transposes for the GEMM path. The gemm crate copies its operands into its
//! kernels' layout quickly only when they come column-major (`x` as `[k, rows]`, the weights as
//! `[k, cols]`); the engine's row-major activations and weights would be gathered one element at
//! a time, which took about 30% of a 128-token prefill (perf, fifteenth session's build).

/// `dst[c * dst_ld + r] = src[r * src_ld + c]` for `r < rows`, `c < cols`.
pub fn transpose(
    src: &[f32],
    src_ld: usize,
    rows: usize,
    cols: usize,
    dst: &mut [f32],
    dst_ld: usize,
) {
    if rows == 0 || cols == 0 {
        return;
    }
    assert!(src_ld >= cols && src.len() >= (rows - 1) * src_ld + cols);
    assert!(dst_ld >= rows && dst.len() >= (cols - 1) * dst_ld + rows);
    #[cfg(target_arch = "x86_64")]
    if super::simd::has_avx2_fma() {
        // SAFETY: AVX2 is present; both extents were checked above.
        unsafe { x86::transpose(src, src_ld, rows, cols, dst, dst_ld) };
        return;
    }
    scalar(src, src_ld, (0, rows), (0, cols), dst, dst_ld);
}

/// The plain version over a sub-block (`rows.0..rows.1` × `cols.0..cols.1`): the reference,
/// the edges of the SIMD version, and the path on other CPUs.
fn scalar(
    src: &[f32],
    src_ld: usize,
    rows: (usize, usize),
    cols: (usize, usize),
    dst: &mut [f32],
    dst_ld: usize,
) {
    // Blocks of 16 × 16 keep both sides' cache lines in L1 while they are used.
    const B: usize = 16;
    for r0 in (rows.0..rows.1).step_by(B) {
        for c0 in (cols.0..cols.1).step_by(B) {
            for r in r0..(r0 + B).min(rows.1) {
                for c in c0..(c0 + B).min(cols.1) {
                    dst[c * dst_ld + r] = src[r * src_ld + c];
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// 8 × 8 tiles transposed in registers; the edges by [`super::scalar`].
    ///
    /// # Safety
    /// AVX2 must be present, and the extents as [`super::transpose`] checks them.
    #[target_feature(enable = "avx2")]
    pub unsafe fn transpose(
        src: &[f32],
        src_ld: usize,
        rows: usize,
        cols: usize,
        dst: &mut [f32],
        dst_ld: usize,
    ) {
        let (r8, c8) = (rows / 8 * 8, cols / 8 * 8);
        let (s, d) = (src.as_ptr(), dst.as_mut_ptr());
        for r0 in (0..r8).step_by(8) {
            for c0 in (0..c8).step_by(8) {
                // SAFETY: rows r0..r0+8 and columns c0..c0+8 lie inside both matrices.
                unsafe {
                    let l = |i: usize| _mm256_loadu_ps(s.add((r0 + i) * src_ld + c0));
                    let (a0, a1, a2, a3) = (l(0), l(1), l(2), l(3));
                    let (a4, a5, a6, a7) = (l(4), l(5), l(6), l(7));
                    // Interleave pairs of rows, then pairs of pairs, then swap 128-bit halves.
                    let (t0, t1) = (_mm256_unpacklo_ps(a0, a1), _mm256_unpackhi_ps(a0, a1));
                    let (t2, t3) = (_mm256_unpacklo_ps(a2, a3), _mm256_unpackhi_ps(a2, a3));
                    let (t4, t5) = (_mm256_unpacklo_ps(a4, a5), _mm256_unpackhi_ps(a4, a5));
                    let (t6, t7) = (_mm256_unpacklo_ps(a6, a7), _mm256_unpackhi_ps(a6, a7));
                    let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
                    let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
                    let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
                    let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
                    let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
                    let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
                    let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
                    let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
                    let st =
                        |j: usize, v: __m256| _mm256_storeu_ps(d.add((c0 + j) * dst_ld + r0), v);
                    st(0, _mm256_permute2f128_ps::<0x20>(u0, u4));
                    st(1, _mm256_permute2f128_ps::<0x20>(u1, u5));
                    st(2, _mm256_permute2f128_ps::<0x20>(u2, u6));
                    st(3, _mm256_permute2f128_ps::<0x20>(u3, u7));
                    st(4, _mm256_permute2f128_ps::<0x31>(u0, u4));
                    st(5, _mm256_permute2f128_ps::<0x31>(u1, u5));
                    st(6, _mm256_permute2f128_ps::<0x31>(u2, u6));
                    st(7, _mm256_permute2f128_ps::<0x31>(u3, u7));
                }
            }
        }
        super::scalar(src, src_ld, (0, r8), (c8, cols), dst, dst_ld);
        super::scalar(src, src_ld, (r8, rows), (0, cols), dst, dst_ld);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transposes_every_element_on_awkward_shapes() {
        for &(rows, cols, src_pad, dst_pad) in &[
            (1, 1, 0, 0),
            (7, 13, 0, 0),
            (8, 8, 0, 0),
            (9, 17, 3, 5),
            (64, 1600, 0, 0),
            (33, 25, 7, 0),
            (128, 768, 0, 16),
        ] {
            let (src_ld, dst_ld) = (cols + src_pad, rows + dst_pad);
            let src: Vec<f32> = (0..rows * src_ld).map(|i| i as f32).collect();
            let mut dst = vec![f32::NAN; cols * dst_ld];
            transpose(&src, src_ld, rows, cols, &mut dst, dst_ld);
            for r in 0..rows {
                for c in 0..cols {
                    assert_eq!(
                        dst[c * dst_ld + r],
                        src[r * src_ld + c],
                        "{rows}x{cols} at ({r}, {c})"
                    );
                }
            }
            // The padding is left as it was.
            for c in 0..cols {
                assert!(dst[c * dst_ld + rows..(c + 1) * dst_ld]
                    .iter()
                    .all(|v| v.is_nan()));
            }
        }
    }
}
