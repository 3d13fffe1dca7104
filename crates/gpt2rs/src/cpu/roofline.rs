//! Measures the ceiling a decode step is held to: how fast all cores can read memory.

use super::simd;
use rayon::prelude::*;
use std::time::Instant;

/// Read bandwidth in bytes per second: every thread sums its share of a `bytes`-sized buffer
/// (far larger than the caches); the best of `reps` passes after one warm-up pass.
pub fn read_bandwidth(bytes: usize, reps: usize) -> f64 {
    let n = bytes / 4;
    let buf = vec![1.0f32; n];
    let chunk = n.div_ceil(rayon::current_num_threads()).max(1 << 16);
    let pass = || {
        let t = Instant::now();
        let s: f32 = buf.par_chunks(chunk).map(simd::sum).sum();
        std::hint::black_box(s);
        t.elapsed().as_secs_f64()
    };
    pass();
    let best = (0..reps.max(1))
        .map(|_| pass())
        .fold(f64::INFINITY, f64::min);
    (n * 4) as f64 / best
}
