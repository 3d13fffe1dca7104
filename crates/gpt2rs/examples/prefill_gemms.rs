//! The matrix products of a gpt2 prefill, alone: the four block matrices (QKV, attention
//! output, MLP in, MLP out) at `tokens` rows through the engine's `matmul::linear`, in each
//! weight format, as GFLOP/s and as a share of the machine's f32 FMA peak measured in the same
//! run (issue 4's prefill target is stated "in the GEMMs"). Peak and products alternate, so
//! the machine's drift shows in every ratio rather than in one.
//! Usage: cargo run --release -p gpt2rs --example prefill_gemms -- [tokens,…] [dtype,…] [rounds]
use gpt2rs::cpu::{matmul, roofline};
use gpt2rs::quant::{DType, QMatrix};
use gpt2rs::weights::Matrix;
use std::time::Instant;

/// gpt2's block matrices as (out, in).
const SHAPES: [(usize, usize); 4] = [(2304, 768), (768, 768), (3072, 768), (768, 3072)];

fn list<T>(arg: Option<&String>, default: &str, parse: impl Fn(&str) -> T) -> Vec<T> {
    arg.map_or(default, |s| s.as_str())
        .split(',')
        .map(parse)
        .collect()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let tokens = list(args.get(1), "128,512", |s| {
        s.parse::<usize>().expect("token counts")
    });
    let dtypes = list(args.get(2), "f32,f16,bf16,int8,int4", |s| {
        DType::parse(s).expect("a precision")
    });
    let rounds: usize = args.get(3).map_or(3, |s| s.parse().expect("rounds"));
    let weights: Vec<(DType, Vec<QMatrix>)> = dtypes
        .iter()
        .map(|&d| {
            let ms = SHAPES
                .iter()
                .map(|&(n, k)| {
                    let data = (0..n * k)
                        .map(|i| ((i % 251) as f32 - 125.0) * 1e-3)
                        .collect();
                    QMatrix::from_matrix(
                        Matrix {
                            rows: n,
                            cols: k,
                            data,
                        },
                        d,
                    )
                })
                .collect();
            (d, ms)
        })
        .collect();
    println!(
        "tokens dtype  GFLOP/s  peak GFLOP/s  share of peak: median  best   ({rounds} rounds)"
    );
    for &t in &tokens {
        let x: Vec<f32> = (0..t * 3072)
            .map(|i| ((i % 13) as f32 - 6.0) * 0.1)
            .collect();
        let mut out = vec![0f32; t * 3072];
        for (d, ms) in &weights {
            let flops: f64 = SHAPES.iter().map(|&(n, k)| 2.0 * (t * n * k) as f64).sum();
            let (mut best, mut best_share, mut peak_then) = (0f64, 0f64, 0f64);
            let mut shares = vec![];
            for _ in 0..rounds {
                let peak = roofline::fma_peak(1);
                // Two passes a round (the first also warms caches), the better one counted.
                let mut round_best = 0f64;
                for _ in 0..2 {
                    let start = Instant::now();
                    for m in ms {
                        let b = vec![0.1f32; m.rows];
                        matmul::linear(&x[..t * m.cols], t, m, Some(&b), &mut out[..t * m.rows]);
                    }
                    let rate = flops / start.elapsed().as_secs_f64();
                    round_best = round_best.max(rate / peak);
                    if rate / peak > best_share {
                        (best, best_share, peak_then) = (rate, rate / peak, peak);
                    }
                }
                shares.push(round_best);
            }
            shares.sort_by(f64::total_cmp);
            println!(
                "{t:6} {:5} {:8.1} {:13.1} {:20.0}% {:5.0}%",
                d.name(),
                best / 1e9,
                peak_then / 1e9,
                shares[shares.len() / 2] * 100.0,
                best_share * 100.0
            );
        }
    }
}
