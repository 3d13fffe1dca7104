//! Times the decode matrix-vector products of gpt2's shapes in one weight format and prints the
//! GB/s of weight bytes streamed (compare with the `membw` example's read bandwidth).
//! Usage: cargo run --release -p gpt2rs --example matvec_speed -- [f32|f16|bf16|int8|int4] [rows,…]
use gpt2rs::cpu::matmul;
use gpt2rs::quant::{DType, QMatrix};
use gpt2rs::weights::Matrix;
use std::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let dtype = DType::parse(args.get(1).map_or("f32", |s| s.as_str())).expect("a precision");
    let row_counts: Vec<usize> = args
        .get(2)
        .map_or("1,4,8", |s| s.as_str())
        .split(',')
        .map(|r| r.parse().expect("row counts"))
        .collect();
    let shapes = [
        (2304, 768),
        (768, 768),
        (3072, 768),
        (768, 3072),
        (50257, 768),
    ];
    for &rows in &row_counts {
        for &(n, k) in &shapes {
            let w = Matrix {
                rows: n,
                cols: k,
                data: (0..n * k)
                    .map(|i| ((i % 251) as f32 - 125.0) * 1e-3)
                    .collect(),
            };
            let w = QMatrix::from_matrix(w, dtype);
            let x: Vec<f32> = (0..rows * k)
                .map(|i| ((i % 13) as f32 - 6.0) * 0.1)
                .collect();
            let b = vec![0.1f32; n];
            let mut out = vec![0f32; rows * n];
            // Many distinct matrices so the weights come from memory, not cache.
            let copies = (400_000_000 / w.bytes() as usize).max(1);
            let ws: Vec<QMatrix> = (0..copies).map(|_| w.clone()).collect();
            for m in &ws {
                matmul::linear(&x, rows, m, Some(&b), &mut out);
            }
            let reps = 3;
            let t = Instant::now();
            for _ in 0..reps {
                for m in &ws {
                    matmul::linear(&x, rows, m, Some(&b), &mut out);
                }
            }
            let s = t.elapsed().as_secs_f64() / (reps * copies) as f64;
            println!(
                "{dtype} rows {rows} {n}x{k}: {:.1} us, {:.1} GB/s of weights",
                s * 1e6,
                w.bytes() as f64 / s / 1e9
            );
        }
    }
}
