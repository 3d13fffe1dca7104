//! NEON kernels for the integer formats (aarch64, where NEON is baseline): the group sums use
//! the `sdot` instruction when the CPU has the dot-product extension, widening multiplies
//! otherwise.

use crate::quant::{Q8Acts, GROUP};
use std::arch::aarch64::*;
use std::sync::OnceLock;

/// Whether the CPU has the dot-product extension (`sdot`).
pub fn has_dotprod() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| std::arch::is_aarch64_feature_detected!("dotprod"))
}

/// One group of 32 weights as signed bytes in element order (elements 0..16, 16..32).
trait Group {
    /// Bytes of weights per group.
    const BYTES: usize;
    /// The 32 weights of the group at `p`.
    unsafe fn load(p: *const u8) -> [int8x16_t; 2];
}

struct Int8;
impl Group for Int8 {
    const BYTES: usize = GROUP;
    #[inline(always)]
    unsafe fn load(p: *const u8) -> [int8x16_t; 2] {
        [vld1q_s8(p.cast()), vld1q_s8(p.add(16).cast())]
    }
}

struct Int4;
impl Group for Int4 {
    const BYTES: usize = GROUP / 2;
    /// Low nibbles are elements 0..16, high nibbles 16..32; minus 8 undoes the storage offset.
    #[inline(always)]
    unsafe fn load(p: *const u8) -> [int8x16_t; 2] {
        let b = vld1q_u8(p);
        let eight = vdupq_n_s8(8);
        let lo = vreinterpretq_s8_u8(vandq_u8(b, vdupq_n_u8(0x0f)));
        let hi = vreinterpretq_s8_u8(vshrq_n_u8::<4>(b));
        [vsubq_s8(lo, eight), vsubq_s8(hi, eight)]
    }
}

/// Σ x·w over a group of 32 signed bytes, as four i32 partial sums.
trait Dot {
    unsafe fn dot(x: [int8x16_t; 2], w: [int8x16_t; 2]) -> int32x4_t;
}

/// Widening multiplies: each i16 lane adds two products, at most 2 · 128 · 127 = 32512 in
/// magnitude (activations are in -127..=127, int8 weights in -128..=127, int4 in -8..=7), so
/// the non-saturating `mlal` cannot wrap; pairwise adds then widen to i32.
struct Widen;
impl Dot for Widen {
    #[inline(always)]
    unsafe fn dot(x: [int8x16_t; 2], w: [int8x16_t; 2]) -> int32x4_t {
        let p0 = vmlal_high_s8(vmull_s8(vget_low_s8(x[0]), vget_low_s8(w[0])), x[0], w[0]);
        let p1 = vmlal_high_s8(vmull_s8(vget_low_s8(x[1]), vget_low_s8(w[1])), x[1], w[1]);
        vpadalq_s16(vpaddlq_s16(p0), p1)
    }
}

/// `sdot`: each i32 lane adds four products in one instruction. Written as assembly because
/// the `vdotq_s32` intrinsic is not stable at this crate's minimum Rust version.
struct SDot;
impl Dot for SDot {
    #[inline(always)]
    unsafe fn dot(x: [int8x16_t; 2], w: [int8x16_t; 2]) -> int32x4_t {
        let mut acc = vdupq_n_s32(0);
        std::arch::asm!(
            "sdot {acc:v}.4s, {x0:v}.16b, {w0:v}.16b",
            "sdot {acc:v}.4s, {x1:v}.16b, {w1:v}.16b",
            acc = inout(vreg) acc,
            x0 = in(vreg) x[0],
            w0 = in(vreg) w[0],
            x1 = in(vreg) x[1],
            w1 = in(vreg) w[1],
            options(pure, nomem, nostack, preserves_flags),
        );
        acc
    }
}

/// Each row's activations and scales.
struct Rows<const N: usize> {
    q: [*const i8; N],
    scales: [*const f32; N],
}

/// Adds group `g` into `acc`, one accumulator per row.
#[inline(always)]
unsafe fn group<G: Group, D: Dot, const N: usize>(
    acc: &mut [float32x4_t; N],
    x: &Rows<N>,
    w: *const u8,
    scales: &[u16],
    g: usize,
) {
    let wv = G::load(w.add(g * G::BYTES));
    let ws = half::f16::from_bits(scales[g]).to_f32();
    for (t, acc) in acc.iter_mut().enumerate() {
        let p = x.q[t].add(g * GROUP);
        let s = D::dot([vld1q_s8(p), vld1q_s8(p.add(16))], wv);
        let d = *x.scales[t].add(g) * ws;
        *acc = vfmaq_n_f32(*acc, vcvtq_f32_s32(s), d);
    }
}

/// `out[t] = acts row t · w`, groups in pairs so each row has two FMA chains in flight.
#[inline(always)]
unsafe fn q_rows<G: Group, D: Dot, const N: usize>(
    acts: &Q8Acts,
    w: *const u8,
    scales: &[u16],
    out: &mut [f32],
) {
    let ng = scales.len();
    let x = Rows::<N> {
        q: std::array::from_fn(|t| acts.row_q(t).as_ptr()),
        scales: std::array::from_fn(|t| acts.row_scales(t).as_ptr()),
    };
    let mut acc = [[vdupq_n_f32(0.0); N]; 2];
    let mut g = 0;
    while g + 2 <= ng {
        group::<G, D, N>(&mut acc[0], &x, w, scales, g);
        group::<G, D, N>(&mut acc[1], &x, w, scales, g + 1);
        g += 2;
    }
    if g < ng {
        group::<G, D, N>(&mut acc[0], &x, w, scales, g);
    }
    for (t, o) in out[..N].iter_mut().enumerate() {
        *o = vaddvq_f32(vaddq_f32(acc[0][t], acc[1][t]));
    }
}

unsafe fn rows_widen<G: Group, const N: usize>(
    acts: &Q8Acts,
    w: *const u8,
    scales: &[u16],
    out: &mut [f32],
) {
    q_rows::<G, Widen, N>(acts, w, scales, out)
}

#[target_feature(enable = "dotprod")]
unsafe fn rows_sdot<G: Group, const N: usize>(
    acts: &Q8Acts,
    w: *const u8,
    scales: &[u16],
    out: &mut [f32],
) {
    q_rows::<G, SDot, N>(acts, w, scales, out)
}

/// Runs the kernel for `acts.rows` rows, with `sdot` when `sdot` is set.
unsafe fn dispatch<G: Group>(
    acts: &Q8Acts,
    w: *const u8,
    scales: &[u16],
    out: &mut [f32],
    sdot: bool,
) {
    macro_rules! go {
        ($($n:literal)*) => {
            match acts.rows {
                0 => {}
                $($n => if sdot {
                    rows_sdot::<G, $n>(acts, w, scales, out)
                } else {
                    rows_widen::<G, $n>(acts, w, scales, out)
                },)*
                _ => unreachable!("at most 8 rows"),
            }
        };
    }
    go!(1 2 3 4 5 6 7 8)
}

/// `out[t] = acts row t · w`, int8 weights; `sdot` only where [`has_dotprod`].
///
/// # Safety
/// `acts.rows <= 8`, `acts` holds `acts.rows` rows of `acts.groups == scales.len()` groups,
/// `w.len() == 32 * scales.len()`, `out.len() >= acts.rows`, and `sdot` only if
/// [`has_dotprod`].
pub unsafe fn dot_rows_q8(acts: &Q8Acts, w: &[i8], scales: &[u16], out: &mut [f32], sdot: bool) {
    dispatch::<Int8>(acts, w.as_ptr().cast(), scales, out, sdot)
}

/// `out[t] = acts row t · w`, int4 weights.
///
/// # Safety
/// As [`dot_rows_q8`], with `w.len() == 16 * scales.len()`.
pub unsafe fn dot_rows_q4(acts: &Q8Acts, w: &[u8], scales: &[u16], out: &mut [f32], sdot: bool) {
    dispatch::<Int4>(acts, w.as_ptr(), scales, out, sdot)
}
