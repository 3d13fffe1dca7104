//! Measures the ceilings GPT-2 is held to on this CPU: how fast all cores read memory (decode's
//! limit) and how fast they multiply-add (prefill's limit).

use super::{matmul, simd};
use crate::quant::{DType, QMatrix};
use crate::weights::Matrix;
use rayon::prelude::*;
use std::time::Instant;

/// Read bandwidth in bytes per second: all threads sum a `bytes`-sized buffer (far larger than
/// the caches) in small chunks they steal from each other, so one late thread does not stretch
/// the pass; the median of `reps` passes after one warm-up pass (the best pass is sometimes a
/// burst the machine cannot hold). The buffer is first written by all threads, so its pages are
/// spread the way the engine's are, and it lies on huge pages where the weights do (on 4 KB
/// pages the page walks would lower the ceiling the weights are held to).
pub fn read_bandwidth(bytes: usize, reps: usize) -> f64 {
    let n = bytes / 4;
    let mut buf: Vec<f32> = Vec::with_capacity(n);
    crate::huge_pages::advise(buf.spare_capacity_mut());
    let chunk = (n / (rayon::current_num_threads() * 16)).max(1 << 16);
    buf.spare_capacity_mut()[..n]
        .par_chunks_mut(chunk)
        .for_each(|c| {
            for v in c {
                v.write(1.0);
            }
        });
    // SAFETY: every one of the n elements was written just above.
    unsafe { buf.set_len(n) };
    let pass = || {
        let t = Instant::now();
        let s: f32 = buf.par_chunks(chunk).map(simd::sum).sum();
        std::hint::black_box(s);
        t.elapsed().as_secs_f64()
    };
    pass();
    let mut times: Vec<f64> = (0..reps.max(1)).map(|_| pass()).collect();
    times.sort_by(f64::total_cmp);
    (n * 4) as f64 / times[times.len() / 2]
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
    let w = QMatrix::from_matrix(
        Matrix {
            rows: n,
            cols: n,
            data: (0..n * n).map(|i| (i % 7) as f32 * 0.1).collect(),
        },
        DType::F32,
    );
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
