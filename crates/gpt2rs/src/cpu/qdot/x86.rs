//! AVX2 kernels for the compact weight formats (x86-64, chosen at run time).
//!
//! Every kernel is generic over `N`, the number of input rows (1..=8), so each row keeps its
//! accumulators in registers for the whole weight row, and over `U`, how many independent
//! accumulators each row gets: an FMA takes 4 cycles and two can start per cycle, so with few
//! rows a single chain per row, not memory, would set the pace.

use crate::quant::{Q8Acts, QData, QMatrix, GROUP};
use std::arch::x86_64::*;
use std::sync::OnceLock;

/// AVX2, FMA and F16C (the f16 conversions), all the kernels here need.
pub fn available() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        crate::cpu::simd::has_avx2_fma() && std::arch::is_x86_feature_detected!("f16c")
    })
}

/// Calls `$f::<N, U>($args)` for `N = $n` rows, with `U` accumulators per row: about 8 FMA
/// chains in flight where registers allow (16 vector registers; the rest hold weights and
/// constants).
macro_rules! by_rows {
    ($n:expr, $f:ident($($a:expr),*)) => {
        match $n {
            0 => {}
            1 => $f::<1, 4>($($a),*),
            2 => $f::<2, 4>($($a),*),
            3 => $f::<3, 3>($($a),*),
            4 => $f::<4, 2>($($a),*),
            5 => $f::<5, 1>($($a),*),
            6 => $f::<6, 1>($($a),*),
            7 => $f::<7, 1>($($a),*),
            8 => $f::<8, 1>($($a),*),
            _ => unreachable!("at most 8 rows"),
        }
    };
}

#[inline(always)]
unsafe fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    _mm_cvtss_f32(s)
}

/// Sums each row's `U` accumulators into `out`.
#[inline(always)]
unsafe fn finish<const N: usize, const U: usize>(acc: [[__m256; N]; U], out: &mut [f32]) {
    for (t, o) in out[..N].iter_mut().enumerate() {
        let mut v = acc[0][t];
        for a in &acc[1..] {
            v = _mm256_add_ps(v, a[t]);
        }
        *o = hsum(v);
    }
}

/// Eight 16-bit floats to f32.
trait Half {
    /// Converts the 8 values at `p` (unaligned).
    unsafe fn load8(p: *const u16) -> __m256;
}

struct F16;
impl Half for F16 {
    #[inline(always)]
    unsafe fn load8(p: *const u16) -> __m256 {
        _mm256_cvtph_ps(_mm_loadu_si128(p.cast()))
    }
}

struct Bf16;
impl Half for Bf16 {
    /// bf16 is the top half of an f32: widen and shift (exact).
    #[inline(always)]
    unsafe fn load8(p: *const u16) -> __m256 {
        let wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(p.cast()));
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(wide))
    }
}

/// `out[t] = xs[t] · w` for 16-bit float weights.
#[inline(always)]
unsafe fn half_rows<H: Half, const N: usize, const U: usize>(
    xs: &[&[f32]],
    w: &[u16],
    out: &mut [f32],
) {
    let n = w.len();
    let pw = w.as_ptr();
    let px: [*const f32; N] = std::array::from_fn(|t| xs[t].as_ptr());
    let mut acc = [[_mm256_setzero_ps(); N]; U];
    let mut i = 0;
    while i + 8 * U <= n {
        // 16·U bytes a step: one prefetch covers a line for U = 4 (one row), repeats for less.
        prefetch(pw.wrapping_add(i + PREFETCH / 2).cast());
        for (u, acc) in acc.iter_mut().enumerate() {
            let o = i + 8 * u;
            let wv = H::load8(pw.add(o));
            for t in 0..N {
                acc[t] = _mm256_fmadd_ps(_mm256_loadu_ps(px[t].add(o)), wv, acc[t]);
            }
        }
        i += 8 * U;
    }
    while i + 8 <= n {
        let wv = H::load8(pw.add(i));
        for t in 0..N {
            acc[0][t] = _mm256_fmadd_ps(_mm256_loadu_ps(px[t].add(i)), wv, acc[0][t]);
        }
        i += 8;
    }
    if i < n {
        // The last 1..=7 values, zero-padded to one more vector step (0 · 0 adds nothing).
        let rem = n - i;
        let mut wb = [0u16; 8];
        wb[..rem].copy_from_slice(&w[i..]);
        let wv = H::load8(wb.as_ptr());
        for t in 0..N {
            let mut xb = [0f32; 8];
            xb[..rem].copy_from_slice(&xs[t][i..]);
            acc[0][t] = _mm256_fmadd_ps(_mm256_loadu_ps(xb.as_ptr()), wv, acc[0][t]);
        }
    }
    finish(acc, out);
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn f16_rows<const N: usize, const U: usize>(xs: &[&[f32]], w: &[u16], out: &mut [f32]) {
    half_rows::<F16, N, U>(xs, w, out)
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn bf16_rows<const N: usize, const U: usize>(xs: &[&[f32]], w: &[u16], out: &mut [f32]) {
    half_rows::<Bf16, N, U>(xs, w, out)
}

/// `out[t] = xs[t] · w`, f16 weights.
///
/// # Safety
/// [`available`] must be true; `xs.len() <= 8`, every row has `w.len()` values and `out`
/// at least `xs.len()`.
pub unsafe fn dot_rows_f16(xs: &[&[f32]], w: &[u16], out: &mut [f32]) {
    by_rows!(xs.len(), f16_rows(xs, w, out))
}

/// `out[t] = xs[t] · w`, bf16 weights.
///
/// # Safety
/// As [`dot_rows_f16`].
pub unsafe fn dot_rows_bf16(xs: &[&[f32]], w: &[u16], out: &mut [f32]) {
    by_rows!(xs.len(), bf16_rows(xs, w, out))
}

/// One group of 32 weights, as stored.
trait Load {
    /// Bytes of weights per group.
    const BYTES: usize;
    /// The 32 weights of the group at `p`, in element order.
    unsafe fn load(p: *const u8) -> __m256i;
}

/// How one group of 32 weights enters `maddubs` (unsigned bytes × signed bytes → i16 pair
/// sums): `maddubs` saturates each pair sum to i16, and no pair here comes near it.
trait Group: Load {
    /// Prepares loaded weights once for all rows of the batch.
    unsafe fn prepare(w: __m256i) -> (__m256i, __m256i);
    /// The 16 i16 pair sums of `prepared` with one row's activations `x`.
    unsafe fn pairs(prepared: (__m256i, __m256i), x: __m256i) -> __m256i;
    /// int4: the weights are stored `q + 8`, so `8 · Σx` comes off every group, and whole
    /// blocks go two groups at a time ([`int4_pair`]).
    const INT4: bool;
}

/// int8: `|w|` once per group and `w`'s sign moved onto the activations (-127..=127:
/// `Q8Acts` never makes -128, so the flip cannot overflow); a pair sum is at most
/// 2 · 127 · 127 = 32258 < 32767. A weight of -128 (never made by the quantizer, possible in a
/// file) still works: its `abs` is 0x80, which `maddubs` reads as unsigned 128, and
/// 2 · 128 · 127 = 32512 fits too.
struct Int8;
impl Load for Int8 {
    const BYTES: usize = GROUP;
    #[inline(always)]
    unsafe fn load(p: *const u8) -> __m256i {
        _mm256_loadu_si256(p.cast())
    }
}
impl Group for Int8 {
    const INT4: bool = false;
    #[inline(always)]
    unsafe fn prepare(w: __m256i) -> (__m256i, __m256i) {
        (_mm256_abs_epi8(w), w)
    }
    #[inline(always)]
    unsafe fn pairs((abs, w): (__m256i, __m256i), x: __m256i) -> __m256i {
        _mm256_maddubs_epi16(abs, _mm256_sign_epi8(x, w))
    }
}

/// int4: the stored nibbles `q + 8` (0..=15) are already unsigned, so they multiply the
/// activations as they are (a pair sum is at most 2 · 15 · 127 = 3810) and the kernel
/// subtracts `8 · Σx` per group, from the sums `Q8Acts` carries, once per 8 groups for all 8
/// of them. That is cheaper than re-centering (`- 8`, `abs`, and a sign flip per row and
/// group), which measured 1.3x slower with the weights in L1 (1.06 against 0.76 ns per group
/// for one row of 3072, 5.9 against 4.9 for eight, before the pair layout below).
struct Int4;
impl Load for Int4 {
    const BYTES: usize = GROUP / 2;
    /// The 16 bytes go to both 128-bit lanes; shifting the upper lane's 32-bit words right by 4
    /// brings every byte's high nibble into its low bits, so after the mask the lower lane holds
    /// elements 0..16 (low nibbles) and the upper lane elements 16..32 (high nibbles): element
    /// order, as stored values `q + 8`, in 3 instructions.
    #[inline(always)]
    unsafe fn load(p: *const u8) -> __m256i {
        let b = _mm256_broadcastsi128_si256(_mm_loadu_si128(p.cast()));
        _mm256_and_si256(
            _mm256_srlv_epi32(b, _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4)),
            _mm256_set1_epi8(0x0f),
        )
    }
}
impl Group for Int4 {
    const INT4: bool = true;
    #[inline(always)]
    unsafe fn prepare(w: __m256i) -> (__m256i, __m256i) {
        (w, w)
    }
    #[inline(always)]
    unsafe fn pairs((w, _): (__m256i, __m256i), x: __m256i) -> __m256i {
        _mm256_maddubs_epi16(w, x)
    }
}

/// How far ahead in the weight stream the integer kernels prefetch, in bytes: about one memory
/// latency at one core's share of the bandwidth (100 ns at 17 GB/s is 1.7 KB). With as much
/// arithmetic per byte as these kernels do, the hardware prefetcher alone leaves the stream
/// short of bandwidth; this measured up to 10-15% faster at one row (int4 most). The f16/bf16
/// kernel, with less work per byte, measured slower with it and goes without.
const PREFETCH: usize = 2048;

#[inline(always)]
unsafe fn prefetch(p: *const u8) {
    _mm_prefetch::<_MM_HINT_T0>(p.cast());
}

/// `out[t] = acts row t · w` for weights in groups of 32 bytes with f16 scales.
///
/// Per group and row, `maddubs` forms 16 i16 pair sums, `madd` with ones widens them to 8
/// i32 lanes, and one FMA with the two scales' product adds the group into the row's f32
/// lanes; the lanes are summed at the end. Scales are converted and multiplied 8 groups at a
/// time, and each group's product taken from its lane with one permute.
#[inline(always)]
unsafe fn q_rows<G: Group, const N: usize, const U: usize>(
    acts: &Q8Acts,
    w: *const u8,
    scales: &[u16],
    out: &mut [f32],
) {
    let ng = scales.len();
    // Bounds checked here once: each row's values (both orders), scales and sums.
    let xq: [*const i8; N] = std::array::from_fn(|t| acts.row_q(t).as_ptr());
    let xp: [*const i8; N] = std::array::from_fn(|t| acts.row_q_pairs(t).as_ptr());
    let xs: [*const f32; N] = std::array::from_fn(|t| acts.row_scales(t).as_ptr());
    let xsum: [*const f32; N] = std::array::from_fn(|t| acts.row_sums(t).as_ptr());
    let ones = _mm256_set1_epi16(1);
    let mut acc = [[_mm256_setzero_ps(); N]; U];
    let mut g = 0;
    while g + 8 <= ng {
        // `wrapping_add`: the address may lie past the weights; a prefetch never faults.
        let ahead = w.wrapping_add(g * G::BYTES + PREFETCH);
        for line in 0..8 * G::BYTES / 64 {
            prefetch(ahead.wrapping_add(64 * line));
        }
        prefetch(scales.as_ptr().wrapping_add(g + PREFETCH / G::BYTES).cast());
        let ws = _mm256_cvtph_ps(_mm_loadu_si128(scales.as_ptr().add(g).cast()));
        let mut d = [_mm256_setzero_ps(); N];
        for t in 0..N {
            d[t] = _mm256_mul_ps(_mm256_loadu_ps(xs[t].add(g)), ws);
            if G::INT4 {
                // Σ_j d_j · 8 · Σx_j for these 8 groups. It lands in lanes that hold
                // element sums, which is fine: only the total of all lanes matters.
                let s8 = _mm256_mul_ps(_mm256_loadu_ps(xsum[t].add(g)), _mm256_set1_ps(8.0));
                acc[0][t] = _mm256_fnmadd_ps(d[t], s8, acc[0][t]);
            }
        }
        if G::INT4 {
            for k in 0..4 {
                // Groups g + 2k and g + 2k + 1 take scale lanes 2k and 2k + 1, 4 lanes each.
                let (a, b) = (2 * k as i32, 2 * k as i32 + 1);
                let idx = _mm256_setr_epi32(a, a, a, a, b, b, b, b);
                let dp: [__m256; N] = std::array::from_fn(|t| _mm256_permutevar8x32_ps(d[t], idx));
                let at = g + 2 * k;
                int4_pair::<N>(&mut acc[k % U], w.add(at * G::BYTES), &xp, at * GROUP, &dp);
            }
        } else {
            for j in 0..8 {
                let lane = _mm256_set1_epi32(j as i32);
                let wv = G::prepare(G::load(w.add((g + j) * G::BYTES)));
                let acc = &mut acc[j % U];
                for t in 0..N {
                    let xv = _mm256_loadu_si256(xq[t].add((g + j) * GROUP).cast());
                    let p32 = _mm256_madd_epi16(G::pairs(wv, xv), ones);
                    let dj = _mm256_permutevar8x32_ps(d[t], lane);
                    acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p32), dj, acc[t]);
                }
            }
        }
        g += 8;
    }
    // The last groups (fewer than 8), one at a time.
    let mut corr = [0f32; N];
    while g < ng {
        let ws = f16_to_f32(scales[g]);
        let wv = G::prepare(G::load(w.add(g * G::BYTES)));
        for t in 0..N {
            let xv = _mm256_loadu_si256(xq[t].add(g * GROUP).cast());
            let p32 = _mm256_madd_epi16(G::pairs(wv, xv), ones);
            let d = *xs[t].add(g) * ws;
            acc[0][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p32), _mm256_set1_ps(d), acc[0][t]);
            if G::INT4 {
                corr[t] -= d * 8.0 * *xsum[t].add(g);
            }
        }
        g += 1;
    }
    finish(acc, out);
    for (o, c) in out.iter_mut().zip(corr) {
        *o += c;
    }
}

/// Adds two int4 groups (their 32 weight bytes at `w`; activations in pair order at
/// `x[t] + off`, see [`Q8Acts::q_pairs`]) into `acc`; `dp[t]` holds row `t`'s two combined
/// scales, one per 128-bit lane.
///
/// One 32-byte load covers both groups: the low nibbles are values 0..16 of each (lower lane
/// the first group, upper lane the second) and the high nibbles values 16..32, which is the
/// order `q_pairs` stores the activations in. The two `maddubs` results add in i16 (at most
/// 2 · 3810, no overflow), so one `madd`, convert and FMA serve two groups: 9 vector
/// instructions per pair for one row against 12 one group at a time, 1.3x faster with the
/// weights in L1.
#[inline(always)]
unsafe fn int4_pair<const N: usize>(
    acc: &mut [__m256; N],
    w: *const u8,
    x: &[*const i8; N],
    off: usize,
    dp: &[__m256; N],
) {
    let b = _mm256_loadu_si256(w.cast());
    let mask = _mm256_set1_epi8(0x0f);
    let lo = _mm256_and_si256(b, mask);
    let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(b), mask);
    for t in 0..N {
        let plo = _mm256_maddubs_epi16(lo, _mm256_loadu_si256(x[t].add(off).cast()));
        let phi = _mm256_maddubs_epi16(hi, _mm256_loadu_si256(x[t].add(off + 32).cast()));
        let p32 = _mm256_madd_epi16(_mm256_add_epi16(plo, phi), _mm256_set1_epi16(1));
        acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p32), dp[t], acc[t]);
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q8_rows<const N: usize, const U: usize>(
    acts: &Q8Acts,
    w: &[i8],
    scales: &[u16],
    out: &mut [f32],
) {
    q_rows::<Int8, N, U>(acts, w.as_ptr().cast(), scales, out)
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_rows<const N: usize, const U: usize>(
    acts: &Q8Acts,
    w: &[u8],
    scales: &[u16],
    out: &mut [f32],
) {
    q_rows::<Int4, N, U>(acts, w.as_ptr(), scales, out)
}

/// `out[t] = acts row t · w`, int8 weights.
///
/// # Safety
/// [`available`] must be true; `acts.rows <= 8`, `acts` holds `acts.rows` rows of
/// `acts.groups == scales.len()` groups (values, scales and sums), `w.len() == 32 *
/// scales.len()` and `out.len() >= acts.rows`.
pub unsafe fn dot_rows_q8(acts: &Q8Acts, w: &[i8], scales: &[u16], out: &mut [f32]) {
    by_rows!(acts.rows, q8_rows(acts, w, scales, out))
}

/// `out[t] = acts row t · w`, int4 weights.
///
/// # Safety
/// As [`dot_rows_q8`], with `w.len() == 16 * scales.len()`.
pub unsafe fn dot_rows_q4(acts: &Q8Acts, w: &[u8], scales: &[u16], out: &mut [f32]) {
    by_rows!(acts.rows, q4_rows(acts, w, scales, out))
}

/// int4 weights re-centered to -8..=7, for dequantization.
struct Int4Signed;
impl Load for Int4Signed {
    const BYTES: usize = GROUP / 2;
    #[inline(always)]
    unsafe fn load(p: *const u8) -> __m256i {
        _mm256_sub_epi8(Int4::load(p), _mm256_set1_epi8(8))
    }
}

/// One f16 to f32 (exact).
#[inline(always)]
unsafe fn f16_to_f32(bits: u16) -> f32 {
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
}

/// Writes `d · q` for the 32 signed bytes of `q` to `dst` (32 values).
#[inline(always)]
unsafe fn scale_bytes(q: __m256i, d: __m256, dst: *mut f32) {
    let lo = _mm256_castsi256_si128(q);
    let hi = _mm256_extracti128_si256::<1>(q);
    for (k, half) in [lo, hi].into_iter().enumerate() {
        let a = _mm256_cvtepi8_epi32(half);
        let b = _mm256_cvtepi8_epi32(_mm_srli_si128::<8>(half));
        _mm256_storeu_ps(dst.add(16 * k), _mm256_mul_ps(_mm256_cvtepi32_ps(a), d));
        _mm256_storeu_ps(dst.add(16 * k + 8), _mm256_mul_ps(_mm256_cvtepi32_ps(b), d));
    }
}

/// Dequantizes `out.len()` values of a row of groups (the last group may be partial).
#[inline(always)]
unsafe fn dequantize_groups<G: Load>(w: *const u8, scales: &[u16], out: &mut [f32]) {
    let cols = out.len();
    let full = cols / GROUP;
    for (g, &s) in scales[..full].iter().enumerate() {
        let d = _mm256_set1_ps(f16_to_f32(s));
        scale_bytes(
            G::load(w.add(g * G::BYTES)),
            d,
            out.as_mut_ptr().add(g * GROUP),
        );
    }
    let rem = cols - full * GROUP;
    if rem > 0 {
        let mut b = [0f32; GROUP];
        let d = _mm256_set1_ps(f16_to_f32(scales[full]));
        scale_bytes(G::load(w.add(full * G::BYTES)), d, b.as_mut_ptr());
        out[full * GROUP..].copy_from_slice(&b[..rem]);
    }
}

#[inline(always)]
unsafe fn dequantize_half<H: Half>(w: &[u16], out: &mut [f32], tail: impl Fn(u16) -> f32) {
    let n = out.len();
    let mut i = 0;
    while i + 8 <= n {
        _mm256_storeu_ps(out.as_mut_ptr().add(i), H::load8(w.as_ptr().add(i)));
        i += 8;
    }
    for (o, &b) in out[i..].iter_mut().zip(&w[i..n]) {
        *o = tail(b);
    }
}

/// Row `r` of `w` as f32, bit-identical to [`QMatrix::dequantize_row`]: every conversion here
/// is exact, and the integer formats round the same single product `d · q`. (One exception
/// that no weight file has: a signaling NaN in bf16 stays signaling, where the reference sets
/// its quiet bit.)
///
/// # Safety
/// [`available`] must be true; `r < w.rows` and `out.len() == w.cols`.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dequantize_row(w: &QMatrix, r: usize, out: &mut [f32]) {
    let (cols, g) = (w.cols, crate::quant::groups(w.cols));
    match &w.data {
        QData::F32(d) => out.copy_from_slice(&d[r * cols..(r + 1) * cols]),
        QData::F16(d) => {
            dequantize_half::<F16>(&d[r * cols..(r + 1) * cols], out, |b| f16_to_f32(b))
        }
        QData::Bf16(d) => dequantize_half::<Bf16>(&d[r * cols..(r + 1) * cols], out, |b| {
            half::bf16::from_bits(b).to_f32()
        }),
        QData::Int8 { q, scales } => dequantize_groups::<Int8>(
            q[r * g * GROUP..(r + 1) * g * GROUP].as_ptr().cast(),
            &scales[r * g..(r + 1) * g],
            out,
        ),
        QData::Int4 { q, scales } => dequantize_groups::<Int4Signed>(
            q[r * g * GROUP / 2..(r + 1) * g * GROUP / 2].as_ptr(),
            &scales[r * g..(r + 1) * g],
            out,
        ),
    }
}
