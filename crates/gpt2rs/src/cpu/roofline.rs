//! Measures the ceilings GPT-2 is held to on this CPU: how fast all cores read memory (decode's
//! limit) and how fast they multiply-add (prefill's limit).

use super::{matmul, simd};
use crate::weights::Matrix;
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

/// Peak f32 multiply-add rate of all threads, in FLOP/s: independent FMA chains in registers,
/// no memory traffic (the most the kernels could ever do).
pub fn fma_peak(reps: usize) -> f64 {
    const ITERS: usize = 20_000_000;
    let threads = rayon::current_num_threads();
    let pass = || {
        let t = Instant::now();
        let flops: u64 = (0..threads)
            .into_par_iter()
            .map(|_| simd::fma_loop(ITERS))
            .sum();
        flops as f64 / t.elapsed().as_secs_f64()
    };
    pass();
    (0..reps.max(1)).map(|_| pass()).fold(0.0, f64::max)
}

/// f32 matrix-multiply rate of the engine's own GEMM path on `n`×`n`×`n`, in FLOP/s.
pub fn gemm_rate(n: usize, reps: usize) -> f64 {
    let w = Matrix {
        rows: n,
        cols: n,
        data: (0..n * n).map(|i| (i % 7) as f32 * 0.1).collect(),
    };
    let x: Vec<f32> = (0..n * n).map(|i| (i % 5) as f32 * 0.1).collect();
    let mut out = vec![0f32; n * n];
    let pass = |out: &mut [f32]| {
        let t = Instant::now();
        matmul::linear(&x, n, &w, None, out);
        2.0 * (n * n * n) as f64 / t.elapsed().as_secs_f64()
    };
    pass(&mut out);
    (0..reps.max(1)).map(|_| pass(&mut out)).fold(0.0, f64::max)
}
