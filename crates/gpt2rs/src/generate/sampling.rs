//! Choosing the next token from logits, in transformers' order: repetition penalty, then
//! temperature, top-k, top-p, and a draw from the softmax (or argmax when greedy).

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
    for s in scores.iter_mut() {
        *s /= temperature;
    }
    // Candidates, most likely first.
    let mut order: Vec<u32> = (0..scores.len() as u32).collect();
    let by_score_desc = |a: &u32, b: &u32| scores[*b as usize].total_cmp(&scores[*a as usize]);
    if params.top_k > 0 && params.top_k < order.len() {
        let k = params.top_k;
        order.select_nth_unstable_by(k - 1, by_score_desc);
        let kth = scores[order[k - 1] as usize];
        // transformers keeps every token that ties with the k-th.
        order.retain(|&i| scores[i as usize] >= kth);
    }
    order.sort_by(|a, b| by_score_desc(a, b).then(a.cmp(b)));
    let max = scores[order[0] as usize];
    let mut probs: Vec<f64> = order
        .iter()
        .map(|&i| ((scores[i as usize] - max) as f64).exp())
        .collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if params.top_p < 1.0 {
        // transformers removes tokens whose ascending cumulative probability is <= 1 - top_p;
        // from the top, that keeps tokens until the mass of the ones below is < 1 - top_p.
        let cut = 1.0 - params.top_p as f64;
        let mut below: f64 = 1.0;
        let mut keep = 0;
        for &p in probs.iter() {
            if below <= cut && keep > 0 {
                break;
            }
            below -= p;
            keep += 1;
        }
        probs.truncate(keep);
        order.truncate(keep);
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
    }
    let mut u: f64 = rng.0.random::<f64>();
    for (&tok, &p) in order.iter().zip(&probs) {
        if u < p {
            return tok;
        }
        u -= p;
    }
    *order.last().expect("at least one candidate")
}

/// Index of the largest value (the first one on ties, as torch.argmax).
pub fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
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
