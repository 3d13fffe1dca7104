//! Causal self-attention of new tokens over their sequence's cached keys and values.

use super::kv_cache::SeqCache;
use super::simd;
use rayon::prelude::*;
use std::cell::RefCell;

#[cfg(target_arch = "x86_64")]
mod x86;

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
    #[cfg(target_arch = "x86_64")]
    if x86::supports(d) {
        let groups = row_groups(places);
        if groups.len() < places.len() {
            return attend_grouped(qkv, places, &groups, layer, n_head, scale, out);
        }
        if places.len() >= rayon::current_num_threads() {
            return attend_by_rows(qkv, places, layer, n_head, scale, out);
        }
    }
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
                scores.resize(n, 0.0);
                head_attention(
                    q,
                    &keys[h * d..],
                    &values[h * d..],
                    width,
                    scale,
                    scores,
                    out,
                )
            });
        });
}

/// Runs of consecutive rows of one sequence at consecutive positions (a prompt chunk's
/// rows), up to `x86::GROUP` each, as (first row, rows).
#[cfg(target_arch = "x86_64")]
fn row_groups(places: &[RowPlace<'_>]) -> Vec<(usize, usize)> {
    let mut groups: Vec<(usize, usize)> = vec![];
    for (t, place) in places.iter().enumerate() {
        match groups.last_mut() {
            Some((first, rows))
                if *rows < x86::GROUP
                    && std::ptr::eq(places[t - 1].cache, place.cache)
                    && places[t - 1].pos + 1 == place.pos =>
            {
                debug_assert_eq!(*first + *rows, t);
                *rows += 1;
            }
            _ => groups.push((t, 1)),
        }
    }
    groups
}

/// The output rows' buffer, written by many threads at disjoint places.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: every task writes only its own group's rows of its own head (see attend_grouped).
#[cfg(target_arch = "x86_64")]
unsafe impl Send for OutPtr {}
#[cfg(target_arch = "x86_64")]
unsafe impl Sync for OutPtr {}

/// [`attend`] by groups of rows (see [`row_groups`]) and heads: each group reads its
/// sequence's keys and values once for all its rows.
#[cfg(target_arch = "x86_64")]
fn attend_grouped(
    qkv: &[f32],
    places: &[RowPlace<'_>],
    groups: &[(usize, usize)],
    layer: usize,
    n_head: usize,
    scale: f32,
    out: &mut [f32],
) {
    let width = out.len() / places.len();
    let d = width / n_head;
    let out_ptr = OutPtr(out.as_mut_ptr());
    (0..groups.len() * n_head).into_par_iter().for_each(|item| {
        let ((first, rows), h) = (groups[item / n_head], item % n_head);
        let last = places[first + rows - 1];
        let n = last.pos + 1;
        let keys = &last.cache.keys(layer)[h * d..];
        let values = &last.cache.values(layer)[h * d..];
        assert!(keys.len() >= (n - 1) * width + d && values.len() >= (n - 1) * width + d);
        let q = &qkv[first * 3 * width + h * d..];
        assert!(q.len() >= (rows - 1) * 3 * width + d);
        let dst = out_ptr;
        SCORES.with_borrow_mut(|scores| {
            scores.resize(rows * n, 0.0);
            // SAFETY: supports(d) checked AVX2+FMA and d % 8 == 0; q, keys and values were
            // checked to hold what the kernels read; this task alone writes rows
            // first..first + rows at columns h·d..(h + 1)·d of `out`.
            unsafe {
                x86::group_scores(
                    q.as_ptr(),
                    3 * width,
                    rows,
                    d,
                    keys,
                    width,
                    scale,
                    n,
                    scores,
                );
                for g in 0..rows {
                    let own = places[first + g].pos + 1;
                    let row = &mut scores[g * n..(g + 1) * n];
                    simd::softmax(&mut row[..own]);
                    row[own..].fill(0.0); // later positions belong to later rows
                }
                let o = dst.0.add(first * width + h * d);
                match rows {
                    1 => x86::group_weighted_sum::<1>(scores, n, values, width, d, o, width),
                    2 => x86::group_weighted_sum::<2>(scores, n, values, width, d, o, width),
                    3 => x86::group_weighted_sum::<3>(scores, n, values, width, d, o, width),
                    4 => x86::group_weighted_sum::<4>(scores, n, values, width, d, o, width),
                    5 => x86::group_weighted_sum::<5>(scores, n, values, width, d, o, width),
                    6 => x86::group_weighted_sum::<6>(scores, n, values, width, d, o, width),
                    7 => x86::group_weighted_sum::<7>(scores, n, values, width, d, o, width),
                    _ => x86::group_weighted_sum::<8>(scores, n, values, width, d, o, width),
                }
            }
        });
    });
}

/// Cached positions that every head of a row goes over before the next ones: 16 rows of
/// gpt2's 768-wide cache are 48 KB, an L1's worth.
#[cfg(target_arch = "x86_64")]
const POSITION_BLOCK: usize = 16;

/// [`attend`] with one task per row (decode rows, each of its own sequence): the row's keys
/// and values are read in blocks of POSITION_BLOCK positions, all heads over a block while
/// it is in cache, so each cached row is one sequential read rather than a strided 256-byte
/// slice per head (gpt2 f32, batch 32, contexts 16-112 on the development VM: steps 3%
/// shorter, four runs of four).
#[cfg(target_arch = "x86_64")]
fn attend_by_rows(
    qkv: &[f32],
    places: &[RowPlace<'_>],
    layer: usize,
    n_head: usize,
    scale: f32,
    out: &mut [f32],
) {
    let width = out.len() / places.len();
    let d = width / n_head;
    out.par_chunks_mut(width)
        .zip(places)
        .enumerate()
        .for_each(|(t, (out, place))| {
            let n = place.pos + 1;
            let (keys, values) = (place.cache.keys(layer), place.cache.values(layer));
            assert!(keys.len() >= n * width && values.len() >= n * width);
            let q = &qkv[t * 3 * width..][..width];
            SCORES.with_borrow_mut(|scores| {
                scores.resize(n_head * n, 0.0);
                // SAFETY: supports(d) checked AVX2+FMA and d % 8 == 0; from position s0 on,
                // head h's keys and values hold (n - s0 - 1) * width + d values (checked
                // above), which covers every block.
                unsafe {
                    for s0 in (0..n).step_by(POSITION_BLOCK) {
                        let len = POSITION_BLOCK.min(n - s0);
                        for (h, scores) in scores.chunks_exact_mut(n).enumerate() {
                            let keys = &keys[s0 * width + h * d..];
                            let dst = &mut scores[s0..s0 + len];
                            x86::scores(&q[h * d..][..d], keys, width, scale, dst);
                        }
                    }
                    for scores in scores.chunks_exact_mut(n) {
                        simd::softmax(scores);
                    }
                    for s0 in (0..n).step_by(POSITION_BLOCK) {
                        let len = POSITION_BLOCK.min(n - s0);
                        for (h, out) in out.chunks_exact_mut(d).enumerate() {
                            let weights = &scores[h * n + s0..][..len];
                            let values = &values[s0 * width + h * d..];
                            x86::weighted_sum(weights, values, width, out, s0 > 0);
                        }
                    }
                }
            });
        });
}

/// One head of one row: `out = softmax(scale · q·Kᵀ) · V` over `scores.len()` positions, keys
/// and values at row stride `stride` (the head's slice of each cached row).
fn head_attention(
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    stride: usize,
    scale: f32,
    scores: &mut [f32],
    out: &mut [f32],
) {
    let (d, n) = (q.len(), scores.len());
    assert!(out.len() == d && n > 0);
    assert!(keys.len() >= (n - 1) * stride + d && values.len() >= (n - 1) * stride + d);
    #[cfg(target_arch = "x86_64")]
    if x86::supports(d) {
        // SAFETY: supports() checked AVX2+FMA and d % 8 == 0; lengths checked above.
        unsafe {
            x86::scores(q, keys, stride, scale, scores);
            simd::softmax(scores);
            x86::weighted_sum(scores, values, stride, out, false);
        }
        return;
    }
    for (s, score) in scores.iter_mut().enumerate() {
        *score = simd::dot(q, &keys[s * stride..][..d]) * scale;
    }
    simd::softmax(scores);
    out.fill(0.0);
    for (s, &p) in scores.iter().enumerate() {
        simd::axpy(out, p, &values[s * stride..][..d]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_naive_attention_on_awkward_head_layouts() {
        // gpt2-xl's head layout (25 heads of 64) on a short, odd-length sequence; heads of 40
        // (a partial register group) and of 12 (no SIMD kernel: the portable path).
        // 70 rows of one prompt: groups of 8 and a partial one, positions past a tile.
        for (n_head, d, len) in [(25, 64, 7), (3, 40, 9), (2, 12, 5), (4, 64, 70)] {
            check_against_naive(n_head, d, len);
        }
    }

    #[test]
    fn decode_rows_of_many_sequences_match_naive_attention() {
        // One new row per sequence, caches of awkward lengths (inside a position block, on
        // its edge, past several), at gpt2-xl's layout, heads of 40 and the portable path.
        let lens = [1, 15, 16, 17, 40, 70, 3];
        for (n_head, d) in [(25, 64), (3, 40), (2, 12)] {
            let width = n_head * d;
            let val = |i: usize| ((i * 7919 % 1013) as f32 / 1013.0 - 0.5) * 2.0;
            let mut caches = vec![];
            let mut qkv = vec![];
            for (i, &len) in lens.iter().enumerate() {
                let rows: Vec<f32> = (0..len * 3 * width).map(|j| val(j + i * 977)).collect();
                let mut cache = SeqCache::new(1);
                for r in rows.chunks_exact(3 * width) {
                    cache.append(0, &r[width..2 * width], &r[2 * width..], width);
                }
                qkv.extend_from_slice(&rows[(len - 1) * 3 * width..]);
                caches.push(cache);
            }
            let places: Vec<RowPlace> = caches
                .iter()
                .zip(lens)
                .map(|(cache, len)| RowPlace {
                    cache,
                    pos: len - 1,
                })
                .collect();
            let scale = 1.0 / (d as f32).sqrt();
            let mut out = vec![0f32; lens.len() * width];
            attend(&qkv, &places, 0, n_head, scale, &mut out);
            for (t, place) in places.iter().enumerate() {
                for h in 0..n_head {
                    let q = &qkv[t * 3 * width + h * d..][..d];
                    let key = |s: usize| &place.cache.keys(0)[s * width + h * d..][..d];
                    let value = |s: usize| &place.cache.values(0)[s * width + h * d..][..d];
                    let want = naive_head(q, place.pos, &key, &value, scale as f64);
                    let got = &out[t * width + h * d..][..d];
                    for (j, (g, w)) in got.iter().zip(&want).enumerate() {
                        assert!(
                            (*g as f64 - w).abs() < 1e-5,
                            "t={t} h={h} j={j}: {g} vs {w}"
                        );
                    }
                }
            }
        }
    }

    /// softmax(q·Kᵀ · scale) · V over positions 0..=pos, in f64.
    fn naive_head<'a>(
        q: &[f32],
        pos: usize,
        key: &dyn Fn(usize) -> &'a [f32],
        value: &dyn Fn(usize) -> &'a [f32],
        scale: f64,
    ) -> Vec<f64> {
        let scores: Vec<f64> = (0..=pos)
            .map(|s| {
                q.iter()
                    .zip(key(s))
                    .map(|(a, b)| *a as f64 * *b as f64)
                    .sum::<f64>()
                    * scale
            })
            .collect();
        let m = scores.iter().copied().fold(f64::MIN, f64::max);
        let z: f64 = scores.iter().map(|s| (s - m).exp()).sum();
        (0..q.len())
            .map(|j| {
                (0..=pos)
                    .map(|s| (scores[s] - m).exp() / z * value(s)[j] as f64)
                    .sum()
            })
            .collect()
    }

    fn check_against_naive(n_head: usize, d: usize, len: usize) {
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
                let want = naive_head(q, t, &k, &v, scale as f64);
                for (j, &want) in want.iter().enumerate() {
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
