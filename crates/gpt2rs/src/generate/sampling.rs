//! Choosing the next token from logits, in transformers' order: repetition penalty, then
//! temperature, top-k, top-p, and a draw from the softmax (or argmax when greedy).

use crate::cpu::simd;
use crate::error::{Error, Result};
use rand::{Rng, SeedableRng};

/// How to pick each next token.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// `None`: greedy (argmax). `Some(t)`: sample at temperature `t` (> 0).
    pub temperature: Option<f32>,
    /// Keep only the `k` most likely tokens (0 = off).
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches `p` (1.0 = off).
    pub top_p: f32,
    /// transformers' repetition penalty (1.0 = off): seen tokens' positive logits are divided
    /// by it, negative ones multiplied.
    pub repetition_penalty: f32,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self::greedy()
    }
}

impl SamplingParams {
    /// Always the most likely token.
    pub fn greedy() -> Self {
        Self {
            temperature: None,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
        }
    }

    /// Checks the ranges, with a message that names the bad value.
    pub fn validate(&self) -> Result<()> {
        if let Some(t) = self.temperature {
            if !(t > 0.0 && t.is_finite()) {
                return Err(Error::invalid(format!(
                    "temperature must be > 0 (got {t}); use greedy decoding for deterministic output"
                )));
            }
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::invalid(format!(
                "top_p must be in (0, 1] (got {})",
                self.top_p
            )));
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return Err(Error::invalid(format!(
                "repetition_penalty must be > 0 (got {})",
                self.repetition_penalty
            )));
        }
        Ok(())
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature.is_none()
    }
}

/// A sequence's own random stream, so its samples do not depend on what else is in the batch.
pub struct SeqRng(rand::rngs::StdRng);

impl SeqRng {
    /// The stream for sample `sample` of prompt `prompt` under the user's `seed`.
    pub fn new(seed: u64, prompt: usize, sample: usize) -> Self {
        let mix = seed
            ^ (prompt as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
            ^ (sample as u64).wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
        Self(rand::rngs::StdRng::seed_from_u64(mix))
    }
}

/// Picks the next token. `history` is every token the sequence holds (prompt included),
/// `scratch` is reused between calls.
pub fn pick(
    logits: &[f32],
    history: &[u32],
    params: &SamplingParams,
    rng: &mut SeqRng,
    scratch: &mut Vec<f32>,
) -> u32 {
    scratch.clear();
    scratch.extend_from_slice(logits);
    let scores = scratch;
    if params.repetition_penalty != 1.0 {
        let mut seen = std::collections::HashSet::with_capacity(history.len());
        for &t in history {
            if seen.insert(t) {
                if let Some(s) = scores.get_mut(t as usize) {
                    *s = if *s < 0.0 {
                        *s * params.repetition_penalty
                    } else {
                        *s / params.repetition_penalty
                    };
                }
            }
        }
    }
    let Some(temperature) = params.temperature else {
        return argmax(scores);
    };
    let n = scores.len();
    for s in scores.iter_mut() {
        *s /= temperature;
    }
    // Probabilities beside the scores, by the vectorized softmax (a libm exp per token of
    // the vocabulary would cost about half a millisecond per draw).
    scores.extend_from_within(..n);
    let (scores, probs) = scores.split_at_mut(n);
    simd::softmax(probs);
    let (scores, probs) = (&*scores, &*probs);
    let u: f64 = rng.0.random::<f64>();
    if params.top_k == 0 && params.top_p >= 1.0 {
        return draw(probs, 0..n as u32, u);
    }
    // Candidates, most likely first (ties by index). Only as many as top-k / top-p can keep
    // are ever sorted: a full sort of 50k logits per token would cost milliseconds.
    let by_score_desc = |a: &u32, b: &u32| {
        scores[*b as usize]
            .total_cmp(&scores[*a as usize])
            .then(a.cmp(b))
    };
    let mut order: Vec<u32> = (0..n as u32).collect();
    if params.top_k > 0 && params.top_k < order.len() {
        let k = params.top_k;
        order.select_nth_unstable_by(k - 1, by_score_desc);
        let kth = scores[order[k - 1] as usize];
        // transformers keeps every token that ties with the k-th.
        order.retain(|&i| scores[i as usize] >= kth);
    }
    let total: f64 = order.iter().map(|&i| probs[i as usize] as f64).sum();
    // transformers removes tokens whose ascending cumulative probability is <= 1 - top_p;
    // from the top, that keeps tokens until the mass of the ones below is < 1 - top_p.
    let cut = if params.top_p < 1.0 {
        1.0 - params.top_p as f64
    } else {
        -1.0
    };
    let mut sorted = 64.min(order.len());
    let keep = loop {
        if sorted < order.len() {
            order.select_nth_unstable_by(sorted - 1, by_score_desc);
        }
        order[..sorted].sort_by(by_score_desc);
        let mut below = 1.0f64;
        let mut keep = None;
        for (n, &i) in order[..sorted].iter().enumerate() {
            if below <= cut && n > 0 {
                keep = Some(n);
                break;
            }
            below -= probs[i as usize] as f64 / total;
        }
        match keep {
            Some(n) => break n,
            None if sorted == order.len() => break sorted,
            None => sorted = (sorted * 8).min(order.len()),
        }
    };
    draw(probs, order[..keep].iter().copied(), u)
}

/// The token at `u` (uniform in [0, 1)) of the distribution `probs` restricted to
/// `candidates` (renormalized), walking them in the order given.
fn draw(probs: &[f32], candidates: impl Iterator<Item = u32> + Clone, u: f64) -> u32 {
    let total: f64 = candidates.clone().map(|i| probs[i as usize] as f64).sum();
    let mut u = u * total;
    let mut last = None;
    for tok in candidates {
        let w = probs[tok as usize] as f64;
        if w > 0.0 {
            last = Some(tok);
        }
        if u < w {
            return tok;
        }
        u -= w;
    }
    // Rounding left a sliver: the last candidate with any weight.
    last.unwrap_or(0)
}

/// Index of the largest value (the first one on ties, as torch.argmax).
pub fn argmax(v: &[f32]) -> u32 {
    // What a scan keeping the first strictly larger value gives (NaN never wins, and a NaN at
    // 0 keeps 0), in two passes the compiler vectorizes: the largest value by lanes, then the
    // first position holding it. (The scan was ~1 ns a token: 1.2 ms a step for 32 rows.)
    const LANES: usize = 16;
    if v.first().is_none_or(|x| x.is_nan()) {
        return 0;
    }
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let chunks = v.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for (m, &x) in lanes.iter_mut().zip(c) {
            *m = if x > *m { x } else { *m };
        }
    }
    let top = lanes
        .iter()
        .chain(tail)
        .fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m });
    let first = v
        .chunks(LANES)
        .position(|c| c.contains(&top))
        .map_or(0, |c| {
            let at = v[c * LANES..].iter().position(|&x| x == top);
            c * LANES + at.expect("the chunk holds it")
        });
    first as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_counts(logits: &[f32], params: &SamplingParams, n: usize) -> Vec<usize> {
        let mut rng = SeqRng::new(1, 0, 0);
        let mut counts = vec![0; logits.len()];
        let mut scratch = Vec::new();
        for _ in 0..n {
            counts[pick(logits, &[], params, &mut rng, &mut scratch) as usize] += 1;
        }
        counts
    }

    #[test]
    fn argmax_equals_a_scan_for_the_first_strictly_larger() {
        let scan = |v: &[f32]| {
            let mut best = 0;
            for (i, &x) in v.iter().enumerate() {
                if x > v[best] {
                    best = i;
                }
            }
            best as u32
        };
        let mut draws = 0u32;
        let mut next = || {
            draws += 1;
            crate::pick::pick_noise(3, draws)
        };
        for n in [1usize, 2, 15, 16, 17, 33, 50_257] {
            for case in 0..12 {
                // Coarse values (many ties), with NaN and infinities sprinkled in some cases.
                let mut v: Vec<f32> = (0..n).map(|_| (next() * 8.0).floor()).collect();
                if case % 3 == 1 {
                    for _ in 0..n.div_ceil(5) {
                        let i = (next() * n as f32) as usize % n;
                        v[i] = [f32::NAN, f32::NEG_INFINITY, f32::INFINITY][case % 4 % 3];
                    }
                }
                if case == 11 {
                    v.iter_mut().for_each(|x| *x = f32::NEG_INFINITY);
                }
                if case == 8 {
                    v[0] = f32::NAN;
                }
                assert_eq!(argmax(&v), scan(&v), "n {n}, case {case}");
            }
        }
        assert_eq!(argmax(&[]), 0);
    }

    #[test]
    fn greedy_takes_first_maximum() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, -1.0]), 1);
        let mut rng = SeqRng::new(0, 0, 0);
        let t = pick(
            &[0.0, 5.0, 1.0],
            &[],
            &SamplingParams::greedy(),
            &mut rng,
            &mut Vec::new(),
        );
        assert_eq!(t, 1);
    }

    #[test]
    fn repetition_penalty_follows_transformers_sign_rule() {
        let p = SamplingParams {
            repetition_penalty: 4.0,
            ..SamplingParams::greedy()
        };
        let mut rng = SeqRng::new(0, 0, 0);
        // Token 0 (seen, 2.0 -> 0.5) loses to token 1 (1.0); a seen negative gets more negative.
        assert_eq!(
            pick(&[2.0, 1.0, -0.5], &[0, 2], &p, &mut rng, &mut Vec::new()),
            1
        );
    }

    #[test]
    fn top_k_and_top_p_restrict_the_support() {
        let logits = [3.0, 2.0, 1.0, 0.0, -1.0];
        let top_k = SamplingParams {
            temperature: Some(1.0),
            top_k: 2,
            ..SamplingParams::greedy()
        };
        let c = sample_counts(&logits, &top_k, 4000);
        assert!(
            c[0] > 0 && c[1] > 0 && c[2..].iter().all(|&x| x == 0),
            "{c:?}"
        );
        // softmax = [.636, .234, .086, .032, .012]: top_p 0.8 keeps the first two tokens,
        // top_p 0.5 only the first.
        let top_p = |p| SamplingParams {
            temperature: Some(1.0),
            top_p: p,
            ..SamplingParams::greedy()
        };
        let c = sample_counts(&logits, &top_p(0.8), 4000);
        assert!(
            c[0] > 0 && c[1] > 0 && c[2..].iter().all(|&x| x == 0),
            "{c:?}"
        );
        let c = sample_counts(&logits, &top_p(0.5), 500);
        assert_eq!(c[0], 500, "{c:?}");
    }

    #[test]
    fn sampling_follows_the_distribution_and_the_seed() {
        let logits = [1.0f32, 0.0, 2.0];
        let params = SamplingParams {
            temperature: Some(1.0),
            ..SamplingParams::greedy()
        };
        let n = 20000;
        let c = sample_counts(&logits, &params, n);
        let z: f64 = logits.iter().map(|&l| (l as f64).exp()).sum();
        for (i, &l) in logits.iter().enumerate() {
            let want = (l as f64).exp() / z;
            let got = c[i] as f64 / n as f64;
            assert!((got - want).abs() < 0.015, "token {i}: {got} vs {want}");
        }
        assert_eq!(c, sample_counts(&logits, &params, n));
        // A low temperature sharpens the distribution.
        let cold = SamplingParams {
            temperature: Some(0.1),
            ..params.clone()
        };
        assert!(sample_counts(&logits, &cold, 1000)[2] > 990);
    }

    #[test]
    fn top_p_over_a_large_vocabulary_keeps_the_right_set() {
        // A flat-ish distribution over 5,000 tokens: top_p 0.9 needs far more than the first
        // 64 sorted candidates, so the sorted prefix has to grow.
        let logits: Vec<f32> = (0..5000)
            .map(|i| ((i * 7919) % 5000) as f32 * 1e-4)
            .collect();
        let p = SamplingParams {
            temperature: Some(1.0),
            top_p: 0.9,
            ..SamplingParams::greedy()
        };
        let c = sample_counts(&logits, &p, 20000);
        // Reference: the kept set by a full sort.
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
        let z: f64 = logits.iter().map(|&l| (l as f64).exp()).sum();
        let (mut below, mut keep) = (1.0f64, 0);
        for &i in &order {
            if below <= 0.1 && keep > 0 {
                break;
            }
            below -= (logits[i] as f64).exp() / z;
            keep += 1;
        }
        let kept: std::collections::HashSet<usize> = order[..keep].iter().copied().collect();
        assert!(keep > 64);
        for (i, &n) in c.iter().enumerate() {
            if !kept.contains(&i) {
                assert_eq!(n, 0, "token {i} is outside the top-p set");
            }
        }
        assert!(c.iter().filter(|&&n| n > 0).count() > keep / 2);
    }

    #[test]
    fn rejects_bad_parameters() {
        for bad in [
            SamplingParams {
                temperature: Some(0.0),
                ..SamplingParams::greedy()
            },
            SamplingParams {
                top_p: 1.5,
                ..SamplingParams::greedy()
            },
            SamplingParams {
                repetition_penalty: 0.0,
                ..SamplingParams::greedy()
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }
}
