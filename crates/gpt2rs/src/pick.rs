//! How a row's next token is chosen by [`PickRule`], the same way on every backend: the
//! reference an engine on a device matches (the CUDA kernels of `pick_filtered` and
//! `argmax_rows` follow these steps with the same rounded operations).
//!
//! A sample draws from softmax(logits / temperature) by the Gumbel-max trick, over the tokens
//! that top-k and top-p keep. The kept set is decided exactly: top-k by the k-th largest
//! scaled logit (ties kept, as transformers); top-p on probabilities in fixed point (units of
//! 2^-24 of the largest token's, from [`pick_exp`], whose every step is one rounded f32
//! operation), so the masses are integers whose sums do not depend on their order.

/// How a row's next token is chosen from its logits for
/// [`crate::engine::LogitsFor::Pick`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum PickRule {
    /// The most likely token (the first of equal ones, like greedy sampling).
    Greedy,
    /// A draw from softmax(logits / temperature) over the tokens top-k and top-p keep, by the
    /// Gumbel-max trick: the kept token whose `logit · (1 / temperature) +
    /// gumbel(pick_noise(noise_seed, token))` is largest. Every backend draws the same noise,
    /// so a seed gives the same tokens on any of them (up to float differences in the logits
    /// themselves).
    Sample {
        temperature: f32,
        noise_seed: u64,
        /// Keep the `top_k` largest scores and any equal to the last of them (0: off).
        top_k: u32,
        /// Keep the fewest most likely tokens whose probability reaches `top_p` (1: off).
        top_p: f32,
    },
}

impl PickRule {
    /// A plain temperature draw (no top-k, no top-p).
    pub fn sample(temperature: f32, noise_seed: u64) -> Self {
        Self::Sample {
            temperature,
            noise_seed,
            top_k: 0,
            top_p: 1.0,
        }
    }

    /// Whether top-k or top-p can remove tokens from a vocabulary of `vocab`.
    pub fn filters(self, vocab: usize) -> bool {
        match self {
            Self::Greedy => false,
            Self::Sample { top_k, top_p, .. } => {
                (top_k > 0 && (top_k as usize) < vocab) || top_p < 1.0
            }
        }
    }

    /// The token this rule picks from a row of logits (the reference every engine matches).
    pub fn apply(self, row: &[f32]) -> u32 {
        match self {
            Self::Greedy => crate::generate::sampling::argmax(row),
            Self::Sample {
                temperature,
                noise_seed,
                top_k,
                top_p,
            } => {
                let inv = 1.0 / temperature;
                let kept = Kept::find(row, inv, top_k, top_p);
                // The first kept token of the largest score. The noise (two logarithms, most
                // of the cost) is skipped where even the largest noise pick_noise can give
                // could not reach the best score so far, and the largest scaled logit goes
                // first so that bound bites early: the same token as scoring every one.
                let reach = gumbel(NOISE_MAX) + 1.0;
                let (mut best, mut best_score) = (u32::MAX, f32::NEG_INFINITY);
                let mut consider = |j: usize, v: f32| {
                    let scaled = v * inv;
                    if scaled + reach < best_score || !kept.keeps(scaled, j) {
                        return;
                    }
                    let score = scaled + gumbel(pick_noise(noise_seed, j as u32));
                    if score > best_score || (score == best_score && (j as u32) < best) {
                        best_score = score;
                        best = j as u32;
                    }
                };
                let top = crate::generate::sampling::argmax(row) as usize;
                if let Some(&v) = row.get(top) {
                    consider(top, v);
                }
                for (j, &v) in row.iter().enumerate() {
                    consider(j, v);
                }
                if best == u32::MAX {
                    0
                } else {
                    best
                }
            }
        }
    }
}

/// Uniform noise in (0, 1) for `token` under `seed`: splitmix64 of the pair, 23 bits (the same
/// integer steps as `pick_noise` in the CUDA kernels). With 24 bits the largest value, 2^24 - 1
/// plus the half, rounded to 1.0 in f32, whose Gumbel noise is infinite: about one sampled
/// token in 330 was then a uniformly random one.
pub fn pick_noise(seed: u64, token: u32) -> f32 {
    let mut z = seed.wrapping_add(u64::from(token + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    noise_from_bits(z >> 41)
}

/// `bits` (below 2^23) + 1/2, over 2^23: strictly inside (0, 1), every step exact in f32.
fn noise_from_bits(bits: u64) -> f32 {
    (bits as f32 + 0.5) * (1.0 / 8_388_608.0)
}

/// The largest value [`pick_noise`] returns.
const NOISE_MAX: f32 = 1.0 - 1.0 / 16_777_216.0;

/// A standard Gumbel variate from uniform `u`.
pub fn gumbel(u: f32) -> f32 {
    -(-u.ln()).ln()
}

/// exp(x) for x ≤ 0 in steps that are each one rounded f32 operation (products, differences,
/// fused multiply-adds, floor), so a GPU computes the same bits: 2^(x·log2 e) = 2^n · 2^f with
/// 2^f from its Taylor polynomial of degree 7 (relative error below 3e-6 + |x|·1.2e-7). 0
/// below 2^-126.
pub fn pick_exp(x: f32) -> f32 {
    const C: [f32; 8] = [
        1.0,
        std::f32::consts::LN_2,
        0.240_226_5,
        0.055_504_11,
        0.009_618_129,
        0.001_333_355_8,
        1.540_353e-4,
        1.525_273_4e-5,
    ];
    let t = x * f32::from_bits(0x3FB8_AA3B); // log2(e)
    let n = t.floor();
    if n.is_nan() || n < -126.0 {
        return 0.0;
    }
    let f = t - n;
    let mut p = C[7];
    for &c in C[..7].iter().rev() {
        p = p.mul_add(f, c);
    }
    p * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// A probability in fixed point: `e` (a [`pick_exp`] value, at most 1) in units of 2^-24.
pub fn pick_mass(e: f32) -> u64 {
    (e * 16_777_216.0).round_ties_even() as u64
}

/// Below this, `pick_mass(pick_exp(x))` is 0 (2^24 · e^-18 < 0.5), so it need not be computed.
const NEGLIGIBLE: f32 = -18.0;

/// An order of the tokens, most likely first: the score's bits made orderable, then the
/// token's inverted (so among equal scores the smallest token comes first). NaN sorts last.
pub fn order_key(score: f32, token: usize) -> u64 {
    (u64::from(score_bits(score)) << 32) | u64::from(!(token as u32))
}

/// A score's bits as an unsigned integer in the order of the scores (NaN lowest).
fn score_bits(v: f32) -> u32 {
    let u = v.to_bits();
    if v.is_nan() {
        0
    } else if u & 0x8000_0000 != 0 {
        !u
    } else {
        u | 0x8000_0000
    }
}

/// The tokens a sample may draw: score bits at least `score_min` (top-k) and order key at least
/// `key_min` (top-p); zeros keep everything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kept {
    pub score_min: u32,
    pub key_min: u64,
}

impl Kept {
    /// Whether the token with scaled logit `score` is kept.
    pub fn keeps(self, score: f32, token: usize) -> bool {
        score_bits(score) >= self.score_min && order_key(score, token) >= self.key_min
    }

    /// The thresholds of `top_k` and `top_p` on `row` at 1 / temperature `inv`.
    pub fn find(row: &[f32], inv: f32, top_k: u32, top_p: f32) -> Self {
        let mut kept = Self {
            score_min: 0,
            key_min: 0,
        };
        let k = top_k as usize;
        if k > 0 && k < row.len() {
            let mut bits: Vec<u32> = row.iter().map(|&v| score_bits(v * inv)).collect();
            let (_, kth, _) = bits.select_nth_unstable_by(k - 1, |a, b| b.cmp(a));
            kept.score_min = *kth;
        }
        if top_p < 1.0 {
            kept.key_min = top_p_key(row, inv, kept.score_min, top_p);
        }
        kept
    }
}

/// The order key of the last token top-p keeps among those with score bits ≥ `score_min`:
/// walking the tokens most likely first, the first whose followers' mass is at most
/// `floor((1 - top_p) · total)` (so at least one token is kept).
fn top_p_key(row: &[f32], inv: f32, score_min: u32, top_p: f32) -> u64 {
    let m = row
        .iter()
        .map(|&v| v * inv)
        .filter(|s| !s.is_nan())
        .fold(f32::NEG_INFINITY, f32::max);
    let mut cands: Vec<(u64, u64)> = row
        .iter()
        .enumerate()
        .filter(|&(_, &v)| score_bits(v * inv) >= score_min)
        .map(|(j, &v)| {
            let (s, x) = (v * inv, v * inv - m);
            let mass = if x >= NEGLIGIBLE {
                pick_mass(pick_exp(x))
            } else {
                0
            };
            (order_key(s, j), mass)
        })
        .collect();
    let total: u64 = cands.iter().map(|c| c.1).sum();
    let cut = (f64::from(1.0 - top_p) * total as f64).floor() as u64;
    // Only as many candidates as the walk needs are sorted (most rows stop within the first).
    let mut sorted = 64.min(cands.len());
    loop {
        if sorted < cands.len() {
            cands.select_nth_unstable_by(sorted - 1, |a, b| b.0.cmp(&a.0));
        }
        cands[..sorted].sort_unstable_by_key(|c| std::cmp::Reverse(c.0));
        let mut taken = 0u64;
        for &(key, mass) in &cands[..sorted] {
            taken += mass;
            if total - taken <= cut {
                return key;
            }
        }
        if sorted == cands.len() {
            return cands.last().map_or(0, |c| c.0);
        }
        sorted = (sorted * 8).min(cands.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pick_exp_is_exp_to_a_few_ulps() {
        // Down to -85 (below about -87.3 the result would be subnormal: 0 by design).
        for i in 0..17_000 {
            let x = -(i as f32) * 0.005;
            let (got, want) = (pick_exp(x) as f64, (x as f64).exp());
            // Rounding x·log2(e) to f32 adds |x|·6e-8 of relative error on top of the polynomial's.
            let bound = (3e-6 + 1.2e-7 * x.abs() as f64) * want;
            assert!((got - want).abs() <= bound, "{x}: {got} vs {want}");
        }
        assert_eq!(pick_exp(0.0), 1.0);
        assert_eq!(pick_exp(-200.0), 0.0);
        assert_eq!(pick_exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(pick_exp(f32::NAN), 0.0);
        assert_eq!(pick_mass(pick_exp(NEGLIGIBLE)), 0);
    }

    /// The kept set by brute force: every token sorted by (score desc, token asc), top-k by
    /// value with ties, then the shortest prefix whose remaining mass is ≤ the cut.
    fn brute_force(row: &[f32], inv: f32, top_k: u32, top_p: f32) -> Vec<usize> {
        let s: Vec<f32> = row.iter().map(|&v| v * inv).collect();
        let mut order: Vec<usize> = (0..row.len()).collect();
        order.sort_by(|&a, &b| s[b].total_cmp(&s[a]).then(a.cmp(&b)));
        if top_k > 0 && (top_k as usize) < row.len() {
            let kth = s[order[top_k as usize - 1]];
            order.retain(|&j| s[j] >= kth);
        }
        if top_p < 1.0 {
            let m = s[order[0]];
            let mass: Vec<u64> = order
                .iter()
                .map(|&j| pick_mass(pick_exp(s[j] - m)))
                .collect();
            let total: u64 = mass.iter().sum();
            let cut = (f64::from(1.0 - top_p) * total as f64).floor() as u64;
            let mut taken = 0;
            let n = (0..order.len())
                .find(|&i| {
                    taken += mass[i];
                    total - taken <= cut
                })
                .unwrap();
            order.truncate(n + 1);
        }
        order.sort();
        order
    }

    #[test]
    fn noise_stays_inside_zero_and_one_so_its_gumbel_is_finite() {
        let (low, high) = (noise_from_bits(0), noise_from_bits((1 << 23) - 1));
        assert!(low > 0.0 && high < 1.0, "{low} {high}");
        assert_eq!(high, NOISE_MAX);
        assert!(gumbel(low).is_finite() && gumbel(high).is_finite());
        // 24 bits would not: the largest rounds to 1.0, an infinite Gumbel noise.
        assert_eq!((16_777_215u32 as f32 + 0.5) * (1.0 / 16_777_216.0), 1.0);
    }

    #[test]
    fn draws_skipping_hopeless_tokens_equal_scoring_every_one() {
        // Every kept token scored (what `apply` did before it skipped any).
        let every = |row: &[f32], rule: PickRule| -> u32 {
            let PickRule::Sample {
                temperature,
                noise_seed,
                top_k,
                top_p,
            } = rule
            else {
                unreachable!()
            };
            let inv = 1.0 / temperature;
            let kept = Kept::find(row, inv, top_k, top_p);
            let (mut best, mut best_score) = (0u32, f32::NEG_INFINITY);
            for (j, &v) in row.iter().enumerate() {
                if kept.keeps(v * inv, j) {
                    let score = v * inv + gumbel(pick_noise(noise_seed, j as u32));
                    if score > best_score {
                        best_score = score;
                        best = j as u32;
                    }
                }
            }
            best
        };
        // Narrow rows (nothing can be skipped), wide ones like a trained model's (most can),
        // coarse ones with ties, and rows with NaN and infinities.
        for (case, &(n, spread)) in [(7usize, 0.5f32), (300, 2.0), (5000, 40.0), (50_257, 30.0)]
            .iter()
            .enumerate()
        {
            for seed in 0..6u64 {
                let mut row: Vec<f32> = (0..n as u64)
                    .map(|i| {
                        let u = pick_noise(seed * 977 + case as u64, i as u32);
                        ((u - 0.5) * spread * 4.0).round() * 0.25
                    })
                    .collect();
                if seed == 4 {
                    row[n / 2] = f32::NAN;
                    row[n / 3] = f32::NEG_INFINITY;
                }
                if seed == 5 {
                    row.iter_mut().for_each(|v| *v = f32::NEG_INFINITY);
                }
                for (t, top_k, top_p) in
                    [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.3, 40, 0.9), (0.2, 0, 0.5)]
                {
                    let rule = PickRule::Sample {
                        temperature: t,
                        noise_seed: seed * 31 + 7,
                        top_k,
                        top_p,
                    };
                    assert_eq!(
                        rule.apply(&row),
                        every(&row, rule),
                        "n {n}, spread {spread}, seed {seed}, {rule:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn kept_sets_equal_a_full_sort() {
        // Random rows with many ties (values on a coarse grid), of lengths around the first
        // partial sort's 64 and far past it.
        for (case, &n) in [5usize, 63, 64, 65, 700, 5000].iter().enumerate() {
            for seed in 0..12u64 {
                let row: Vec<f32> = (0..n as u64)
                    .map(|i| {
                        let h = pick_noise(seed * 131 + case as u64, i as u32);
                        (h * 40.0).floor() * 0.25 - 5.0
                    })
                    .collect();
                for (top_k, top_p) in [(0, 0.9), (3, 1.0), (10, 0.5), (0, 0.05), (50, 0.999)] {
                    let inv = 1.0 / 0.7;
                    let kept = Kept::find(&row, inv, top_k, top_p);
                    let got: Vec<usize> = (0..n).filter(|&j| kept.keeps(row[j] * inv, j)).collect();
                    assert_eq!(
                        got,
                        brute_force(&row, inv, top_k, top_p),
                        "n {n}, seed {seed}, top_k {top_k}, top_p {top_p}"
                    );
                }
            }
        }
    }

    #[test]
    fn filtered_draws_sample_the_renormalized_nucleus() {
        // Probabilities 0.5, 0.25, 0.125, 0.0625, 0.0625: top-p 0.8 keeps the first three
        // (the last two weigh 0.125 ≤ 0.2), top-k 2 the first two.
        let row: Vec<f32> = [0.5f32, 0.25, 0.125, 0.0625, 0.0625]
            .iter()
            .map(|p| p.ln())
            .collect();
        for (top_k, top_p, want) in [
            (0, 0.8, vec![4.0 / 7.0, 2.0 / 7.0, 1.0 / 7.0, 0.0, 0.0]),
            (2, 1.0, vec![2.0 / 3.0, 1.0 / 3.0, 0.0, 0.0, 0.0]),
        ] {
            let mut counts = [0usize; 5];
            let n = 30_000;
            for seed in 0..n as u64 {
                let rule = PickRule::Sample {
                    temperature: 1.0,
                    noise_seed: seed.wrapping_mul(0x2545_F491_4F6C_DD1D),
                    top_k,
                    top_p,
                };
                counts[rule.apply(&row) as usize] += 1;
            }
            for i in 0..5 {
                let got = counts[i] as f64 / n as f64;
                assert!(
                    (got - want[i]).abs() < 0.015,
                    "top_k {top_k} top_p {top_p}, token {i}: {got} vs {}",
                    want[i]
                );
            }
        }
    }
}
