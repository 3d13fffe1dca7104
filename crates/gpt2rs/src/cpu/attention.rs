//! Causal self-attention of new tokens over their sequence's cached keys and values.

use super::kv_cache::SeqCache;
use super::simd;
use rayon::prelude::*;
use std::cell::RefCell;

/// Where a row of the batch belongs: its sequence's cache and its position in it.
#[derive(Clone, Copy)]
pub struct RowPlace<'a> {
    pub cache: &'a SeqCache,
    pub pos: usize,
}

thread_local! {
    static SCORES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// For every row `t` and head `h`: softmax(q·Kᵀ · scale) · V over the cache up to the row's
/// own position. `qkv` is `[rows, 3 * width]`; `out` is `[rows, width]`.
pub fn attend(
    qkv: &[f32],
    places: &[RowPlace<'_>],
    layer: usize,
    n_head: usize,
    scale: f32,
    out: &mut [f32],
) {
    let width = out.len() / places.len().max(1);
    let d = width / n_head;
    out.par_chunks_mut(d)
        .with_min_len(4)
        .enumerate()
        .for_each(|(i, out)| {
            let (t, h) = (i / n_head, i % n_head);
            let place = places[t];
            let q = &qkv[t * 3 * width + h * d..][..d];
            let keys = place.cache.keys(layer);
            let values = place.cache.values(layer);
            let n = place.pos + 1;
            SCORES.with_borrow_mut(|scores| {
                scores.clear();
                scores
                    .extend((0..n).map(|s| simd::dot(q, &keys[s * width + h * d..][..d]) * scale));
                simd::softmax(scores);
                out.fill(0.0);
                for (s, &p) in scores.iter().enumerate() {
                    simd::axpy(out, p, &values[s * width + h * d..][..d]);
                }
            });
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_naive_attention_with_25_heads() {
        // gpt2-xl's head layout (25 heads of 64) on a short, odd-length sequence.
        let (n_head, d, len) = (25, 64, 7);
        let width = n_head * d;
        let val = |i: usize| ((i * 7919 % 1013) as f32 / 1013.0 - 0.5) * 2.0;
        let mut cache = SeqCache::new(1);
        let qkv: Vec<f32> = (0..len * 3 * width).map(val).collect();
        for t in 0..len {
            let row = &qkv[t * 3 * width..(t + 1) * 3 * width];
            cache.append(0, &row[width..2 * width], &row[2 * width..], width);
        }
        let places: Vec<RowPlace> = (0..len)
            .map(|pos| RowPlace { cache: &cache, pos })
            .collect();
        let scale = 1.0 / (d as f32).sqrt();
        let mut out = vec![0f32; len * width];
        attend(&qkv, &places, 0, n_head, scale, &mut out);
        for t in 0..len {
            for h in 0..n_head {
                let q = &qkv[t * 3 * width + h * d..][..d];
                let k = |s: usize| &qkv[s * 3 * width + width + h * d..][..d];
                let v = |s: usize| &qkv[s * 3 * width + 2 * width + h * d..][..d];
                let scores: Vec<f64> = (0..=t)
                    .map(|s| {
                        q.iter()
                            .zip(k(s))
                            .map(|(a, b)| *a as f64 * *b as f64)
                            .sum::<f64>()
                            * scale as f64
                    })
                    .collect();
                let m = scores.iter().copied().fold(f64::MIN, f64::max);
                let z: f64 = scores.iter().map(|s| (s - m).exp()).sum();
                for j in 0..d {
                    let want: f64 = (0..=t)
                        .map(|s| (scores[s] - m).exp() / z * v(s)[j] as f64)
                        .sum();
                    let got = out[t * width + h * d + j] as f64;
                    assert!(
                        (got - want).abs() < 1e-5,
                        "t={t} h={h} j={j}: {got} vs {want}"
                    );
                }
            }
        }
    }
}
