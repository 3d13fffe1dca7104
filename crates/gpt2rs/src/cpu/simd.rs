//! Vector kernels written once as plain loops over fixed-width lanes, compiled twice on x86-64
//! (baseline, and AVX2+FMA chosen at run time) and once elsewhere (NEON is baseline on aarch64).
//! `FMA` selects fused multiply-add, which is one instruction where the target has it and a
//! slow library call where it does not.

#[cfg(target_arch = "x86_64")]
pub(crate) fn has_avx2_fma() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
}

/// The instruction set the kernels run with on this machine.
pub fn isa_name() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        // The panel kernels and the GEMM (gemm's x86-v4 microkernels) use AVX-512 where it
        // is present.
        if has_avx2_fma() && is_x86_feature_detected!("avx512f") {
            return "avx512f+avx2+fma";
        }
        if has_avx2_fma() {
            return "avx2+fma";
        }
        "sse2"
    }
    #[cfg(target_arch = "aarch64")]
    {
        "neon"
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        "scalar"
    }
}

/// Whether the portable path may use `mul_add` (one instruction on aarch64).
const NATIVE_FMA: bool = cfg!(target_arch = "aarch64");

/// Defines `pub fn $name` that runs `$imp::<true>` under AVX2+FMA when the CPU has it.
macro_rules! dispatch {
    ($(#[$m:meta])* pub fn $name:ident($($arg:ident: $ty:ty),*) $(-> $ret:ty)? => $imp:ident) => {
        $(#[$m])*
        pub fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn fast($($arg: $ty),*) $(-> $ret)? { $imp::<true>($($arg),*) }
                if has_avx2_fma() {
                    // SAFETY: the CPU supports AVX2 and FMA (checked at run time).
                    return unsafe { fast($($arg),*) };
                }
            }
            $imp::<NATIVE_FMA>($($arg),*)
        }
    };
}

const LANES: usize = 8;

#[inline(always)]
fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

#[inline(always)]
fn hsum(v: [f32; LANES]) -> f32 {
    ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]))
}

#[inline(always)]
fn dot_impl<const FMA: bool>(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc0 = [0f32; LANES];
    let mut acc1 = [0f32; LANES];
    let mut ca = a.chunks_exact(2 * LANES);
    let mut cb = b.chunks_exact(2 * LANES);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for l in 0..LANES {
            acc0[l] = madd::<FMA>(x[l], y[l], acc0[l]);
            acc1[l] = madd::<FMA>(x[LANES + l], y[LANES + l], acc1[l]);
        }
    }
    for l in 0..LANES {
        acc0[l] += acc1[l];
    }
    let mut s = hsum(acc0);
    for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
        s = madd::<FMA>(*x, *y, s);
    }
    s
}

/// Σ a[i]·b[i] over the shorter length.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        let n = a.len().min(b.len());
        // SAFETY: AVX2 and FMA are present; both slices hold at least n elements.
        return unsafe { x86::dot(&a[..n], &b[..n]) };
    }
    dot_impl::<NATIVE_FMA>(a, b)
}

/// `out[t] = x[t] · w` for up to 8 input rows against one weight row, reading `w` once
/// (a single sequential stream, as in batch-1 decode). Every `x[t]` has `w.len()` elements.
pub fn dot_rows(x: &[&[f32]], w: &[f32], out: &mut [f32]) {
    assert!(x.len() <= 8 && out.len() >= x.len());
    assert!(x.iter().all(|r| r.len() == w.len()));
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: AVX2 and FMA are present; lengths checked above.
        unsafe {
            match x.len() {
                1 => out[0] = x86::dot(x[0], w),
                2 => x86::dot_rows::<2>(x, w, out),
                3 => x86::dot_rows::<3>(x, w, out),
                4 => x86::dot_rows::<4>(x, w, out),
                5 => x86::dot_rows::<5>(x, w, out),
                6 => x86::dot_rows::<6>(x, w, out),
                7 => x86::dot_rows::<7>(x, w, out),
                8 => x86::dot_rows::<8>(x, w, out),
                _ => {}
            }
        }
        return;
    }
    for (o, r) in out.iter_mut().zip(x) {
        *o = dot_impl::<NATIVE_FMA>(r, w);
    }
}

/// Σ x (for bandwidth probes: eight independent lanes, so it runs at memory speed).
pub fn sum(x: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: AVX2 and FMA are present.
        return unsafe { x86::sum(x) };
    }
    x.iter().sum()
}

/// Runs `iters` rounds of independent multiply-adds in registers and returns the FLOPs done
/// (for the FMA-peak probe).
pub fn fma_loop(iters: usize) -> u64 {
    // The widest FMA the machine has: the GEMM reaches past a 256-bit loop's rate where
    // AVX-512 is present, so a narrower probe would understate the ceiling.
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512F is present.
        return unsafe { x86::fma_loop_512(iters) };
    }
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: AVX2 and FMA are present.
        return unsafe { x86::fma_loop(iters) };
    }
    let mut acc = [[1f32; LANES]; 8];
    for _ in 0..iters {
        for a in acc.iter_mut() {
            for v in a.iter_mut() {
                *v = madd::<NATIVE_FMA>(*v, 0.999_999, 1e-7);
            }
        }
    }
    std::hint::black_box(acc);
    (iters * 8 * LANES * 2) as u64
}

/// Hand-written AVX2 versions of the hottest kernels: the compiler's automatic vectorization
/// of the portable loops shuffles lanes needlessly for these.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    /// How far ahead `dot` asks for its second operand (the weights in decode): 2 KB, as the
    /// compact formats' kernels. The hardware prefetcher alone left batch-1 f32 decode about
    /// 7% slower (ten alternations on the development VM, 9 of 10 slower).
    const PREFETCH_AHEAD: usize = 512;

    /// Σ a·b; `a` and `b` have the same length.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len();
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        while i + 32 <= n {
            let ahead = pb.wrapping_add(i + PREFETCH_AHEAD) as *const i8;
            _mm_prefetch(ahead, _MM_HINT_T0);
            _mm_prefetch(ahead.wrapping_add(64), _MM_HINT_T0);
            for (u, acc) in acc.iter_mut().enumerate() {
                let o = i + 8 * u;
                *acc =
                    _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(o)), _mm256_loadu_ps(pb.add(o)), *acc);
            }
            i += 32;
        }
        while i + 8 <= n {
            acc[0] = _mm256_fmadd_ps(
                _mm256_loadu_ps(pa.add(i)),
                _mm256_loadu_ps(pb.add(i)),
                acc[0],
            );
            i += 8;
        }
        let mut s = hsum(_mm256_add_ps(
            _mm256_add_ps(acc[0], acc[1]),
            _mm256_add_ps(acc[2], acc[3]),
        ));
        while i < n {
            s = (*pa.add(i)).mul_add(*pb.add(i), s);
            i += 1;
        }
        s
    }

    /// `out[t] = x[t] · w` for exactly `N` rows, one accumulator per row.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_rows<const N: usize>(x: &[&[f32]], w: &[f32], out: &mut [f32]) {
        let n = w.len();
        let pw = w.as_ptr();
        let px: [*const f32; N] = std::array::from_fn(|t| x[t].as_ptr());
        let mut acc = [_mm256_setzero_ps(); N];
        let mut i = 0;
        while i + 8 <= n {
            let wv = _mm256_loadu_ps(pw.add(i));
            for t in 0..N {
                acc[t] = _mm256_fmadd_ps(_mm256_loadu_ps(px[t].add(i)), wv, acc[t]);
            }
            i += 8;
        }
        for t in 0..N {
            let mut s = hsum(acc[t]);
            for j in i..n {
                s = (*px[t].add(j)).mul_add(*pw.add(j), s);
            }
            out[t] = s;
        }
    }

    /// Ten independent FMA chains (enough to cover the FMA latency on two ports).
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn fma_loop(iters: usize) -> u64 {
        let m = _mm256_set1_ps(0.999_999);
        let c = _mm256_set1_ps(1e-7);
        let mut acc = [_mm256_set1_ps(1.0); 10];
        for _ in 0..iters {
            for a in acc.iter_mut() {
                *a = _mm256_fmadd_ps(*a, m, c);
            }
        }
        std::hint::black_box(acc);
        (iters * 10 * 8 * 2) as u64
    }

    /// fma_loop with 512-bit registers: twelve chains (the FMA latency on two ports, with room).
    #[target_feature(enable = "avx512f")]
    pub unsafe fn fma_loop_512(iters: usize) -> u64 {
        let m = _mm512_set1_ps(0.999_999);
        let c = _mm512_set1_ps(1e-7);
        let mut acc = [_mm512_set1_ps(1.0); 12];
        for _ in 0..iters {
            for a in acc.iter_mut() {
                *a = _mm512_fmadd_ps(*a, m, c);
            }
        }
        std::hint::black_box(acc);
        (iters * 12 * 16 * 2) as u64
    }

    /// Σ x with eight accumulators.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn sum(x: &[f32]) -> f32 {
        let n = x.len();
        let p = x.as_ptr();
        let mut acc = [_mm256_setzero_ps(); 8];
        let mut i = 0;
        while i + 64 <= n {
            for (u, acc) in acc.iter_mut().enumerate() {
                *acc = _mm256_add_ps(*acc, _mm256_loadu_ps(p.add(i + 8 * u)));
            }
            i += 64;
        }
        let mut total = _mm256_setzero_ps();
        for a in acc {
            total = _mm256_add_ps(total, a);
        }
        hsum(total) + x[i..].iter().sum::<f32>()
    }
}

#[inline(always)]
fn axpy_impl<const FMA: bool>(y: &mut [f32], a: f32, x: &[f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y = madd::<FMA>(a, *x, *y);
    }
}

dispatch! {
    /// y += a·x.
    pub fn axpy(y: &mut [f32], a: f32, x: &[f32]) => axpy_impl
}

#[inline(always)]
fn add_impl<const FMA: bool>(y: &mut [f32], x: &[f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += *x;
    }
}

dispatch! {
    /// y += x.
    pub fn add_assign(y: &mut [f32], x: &[f32]) => add_impl
}

/// e^x with a relative error below 2e-7 for x in [-87, 88] (0 to 1e-38 below, clamped above):
/// range reduction to r in [-ln2/2, ln2/2], a degree-6 polynomial, and the exponent set directly.
/// Branch-free, so loops over it vectorize.
#[inline(always)]
fn exp_approx<const FMA: bool>(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    let x = x.clamp(-87.0, 88.0);
    let n = (x * LOG2E + 0.5).floor();
    let r = madd::<FMA>(-n, LN2_LO, madd::<FMA>(-n, LN2_HI, x));
    let mut p = 1.0 / 720.0;
    p = madd::<FMA>(p, r, 1.0 / 120.0);
    p = madd::<FMA>(p, r, 1.0 / 24.0);
    p = madd::<FMA>(p, r, 1.0 / 6.0);
    p = madd::<FMA>(p, r, 0.5);
    p = madd::<FMA>(p, r, 1.0);
    p = madd::<FMA>(p, r, 1.0);
    let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
    p * scale
}

#[inline(always)]
fn softmax_impl<const FMA: bool>(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f32;
    for v in x.iter_mut() {
        *v = exp_approx::<FMA>(*v - max);
    }
    // Summed in lanes so the loop above and this one both vectorize.
    let mut acc = [0f32; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for c in &mut chunks {
        for l in 0..LANES {
            acc[l] += c[l];
        }
    }
    sum += hsum(acc) + chunks.remainder().iter().sum::<f32>();
    let inv = 1.0 / sum;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

dispatch! {
    /// Softmax in place.
    pub fn softmax(x: &mut [f32]) => softmax_impl
}

#[inline(always)]
fn gelu_tanh_impl<const FMA: bool>(x: &mut [f32]) {
    const K: f32 = 0.797_884_6; // sqrt(2/pi)
    for v in x.iter_mut() {
        let u = K * madd::<FMA>(0.044_715 * *v * *v, *v, *v);
        // tanh(u) = 1 - 2 / (e^{2u} + 1)
        let t = 1.0 - 2.0 / (exp_approx::<FMA>(2.0 * u) + 1.0);
        *v = 0.5 * *v * (1.0 + t);
    }
}

dispatch! {
    /// GELU, tanh approximation (transformers' `gelu_new`), in place.
    pub fn gelu_tanh(x: &mut [f32]) => gelu_tanh_impl
}

/// erf with absolute error below 1.5e-7 (Abramowitz & Stegun 7.1.26), branch-free.
#[inline(always)]
fn erf_approx<const FMA: bool>(x: f32) -> f32 {
    let s = x.signum();
    let a = x.abs();
    let t = 1.0 / madd::<FMA>(0.327_591_1, a, 1.0);
    let mut p = 1.061_405_4;
    p = madd::<FMA>(p, t, -1.453_152_1);
    p = madd::<FMA>(p, t, 1.421_413_8);
    p = madd::<FMA>(p, t, -0.284_496_74);
    p = madd::<FMA>(p, t, 0.254_829_6);
    s * (1.0 - p * t * exp_approx::<FMA>(-a * a))
}

#[inline(always)]
fn gelu_erf_impl<const FMA: bool>(x: &mut [f32]) {
    for v in x.iter_mut() {
        *v = 0.5 * *v * (1.0 + erf_approx::<FMA>(*v * std::f32::consts::FRAC_1_SQRT_2));
    }
}

dispatch! {
    /// GELU, exact erf form (transformers' `gelu`), in place.
    pub fn gelu_erf(x: &mut [f32]) => gelu_erf_impl
}

#[inline(always)]
fn layer_norm_impl<const FMA: bool>(
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    eps: f32,
    out: &mut [f32],
) {
    let n = x.len() as f32;
    let mut acc = [0f32; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for c in &mut chunks {
        for l in 0..LANES {
            acc[l] += c[l];
        }
    }
    let mean = (hsum(acc) + chunks.remainder().iter().sum::<f32>()) / n;
    let mut acc = [0f32; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for c in &mut chunks {
        for l in 0..LANES {
            let d = c[l] - mean;
            acc[l] = madd::<FMA>(d, d, acc[l]);
        }
    }
    let rem: f32 = chunks
        .remainder()
        .iter()
        .map(|v| (v - mean) * (v - mean))
        .sum();
    let var = (hsum(acc) + rem) / n;
    let inv = 1.0 / (var + eps).sqrt();
    for (((o, v), g), b) in out.iter_mut().zip(x).zip(gamma).zip(beta) {
        *o = madd::<FMA>((v - mean) * inv, *g, *b);
    }
}

dispatch! {
    /// LayerNorm of one row: (x - mean) / sqrt(var + eps) · gamma + beta (biased variance).
    pub fn layer_norm(x: &[f32], gamma: &[f32], beta: &[f32], eps: f32, out: &mut [f32]) => layer_norm_impl
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn dot_kernels_match_f64_reference_on_awkward_lengths() {
        for n in [1, 7, 15, 16, 17, 63, 769, 1600, 6400] {
            let a = rand_vec(n, 1);
            let rows: Vec<Vec<f32>> = (0..8).map(|r| rand_vec(n, 10 + r)).collect();
            let exact = |w: &[f32]| {
                a.iter()
                    .zip(w)
                    .map(|(x, y)| *x as f64 * *y as f64)
                    .sum::<f64>()
            };
            let tol = 1e-5 * (n as f64).sqrt();
            assert!(
                (dot(&a, &rows[0]) as f64 - exact(&rows[0])).abs() < tol,
                "dot n={n}"
            );
            for m in 1..=8 {
                let xs: Vec<&[f32]> = rows.iter().take(m).map(Vec::as_slice).collect();
                let mut out = [0f32; 8];
                dot_rows(&xs, &a, &mut out);
                for r in 0..m {
                    let err = (out[r] as f64 - exact(&rows[r])).abs();
                    assert!(err < tol, "dot_rows n={n} m={m} r={r}");
                }
            }
        }
    }

    /// erf by its Taylor series (exact enough in f64 for |x| < 4; ±1 beyond).
    fn erf_series(x: f64) -> f64 {
        if x.abs() >= 4.0 {
            return x.signum();
        }
        let (mut term, mut sum) = (x, x);
        for n in 1..200 {
            term *= -x * x / n as f64;
            sum += term / (2 * n + 1) as f64;
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    }

    #[test]
    fn exp_softmax_gelu_match_libm() {
        for i in -2000..2000 {
            let x = i as f32 * 0.043;
            let rel = (exp_approx::<false>(x) as f64 - (x as f64).exp()).abs() / (x as f64).exp();
            assert!(rel < 3e-7, "exp({x}) rel err {rel}");
        }
        let mut v = rand_vec(1601, 3)
            .iter()
            .map(|x| x * 20.0)
            .collect::<Vec<_>>();
        let max = v.iter().copied().fold(f32::MIN, f32::max) as f64;
        let denom: f64 = v.iter().map(|x| (*x as f64 - max).exp()).sum();
        let want: Vec<f64> = v.iter().map(|x| (*x as f64 - max).exp() / denom).collect();
        softmax(&mut v);
        for (a, b) in v.iter().zip(&want) {
            assert!((*a as f64 - b).abs() < 1e-7 + 1e-6 * b, "{a} vs {b}");
        }
        let xs: Vec<f32> = (-1200..1200).map(|i| i as f32 * 0.01).collect();
        let mut g = xs.clone();
        gelu_tanh(&mut g);
        let mut ge = xs.clone();
        gelu_erf(&mut ge);
        for ((x, t), e) in xs.iter().zip(&g).zip(&ge) {
            let x = *x as f64;
            let want_t = 0.5
                * x
                * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x)).tanh());
            assert!(
                (*t as f64 - want_t).abs() < 2e-6 * (1.0 + x.abs()),
                "gelu_tanh({x})"
            );
            let want_e = 0.5 * x * (1.0 + erf_series(x / std::f64::consts::SQRT_2));
            assert!(
                (*e as f64 - want_e).abs() < 1e-6 * (1.0 + x.abs()),
                "gelu_erf({x})"
            );
        }
    }

    #[test]
    fn layer_norm_matches_reference() {
        for n in [5, 64, 1600] {
            let x: Vec<f32> = rand_vec(n, 4).iter().map(|v| v * 3.0 + 1.0).collect();
            let g = rand_vec(n, 5);
            let b = rand_vec(n, 6);
            let mut out = vec![0f32; n];
            layer_norm(&x, &g, &b, 1e-5, &mut out);
            let mean = x.iter().map(|v| *v as f64).sum::<f64>() / n as f64;
            let var = x.iter().map(|v| (*v as f64 - mean).powi(2)).sum::<f64>() / n as f64;
            for i in 0..n {
                let want = (x[i] as f64 - mean) / (var + 1e-5).sqrt() * g[i] as f64 + b[i] as f64;
                assert!((out[i] as f64 - want).abs() < 1e-5, "n={n} i={i}");
            }
        }
    }
}
