//! Times the decode matrix-vector products of gpt2's shapes and prints GB/s of weights streamed.
use gpt2rs::cpu::matmul;
use gpt2rs::weights::Matrix;
use std::time::Instant;

fn main() {
    let shapes = [
        (2304, 768),
        (768, 768),
        (3072, 768),
        (768, 3072),
        (50257, 768),
    ];
    for rows in [1usize, 4, 8] {
        for &(n, k) in &shapes {
            let w = Matrix {
                rows: n,
                cols: k,
                data: vec![0.01; n * k],
            };
            let x = vec![0.5f32; rows * k];
            let b = vec![0.1f32; n];
            let mut out = vec![0f32; rows * n];
            // Many distinct matrices so the weights come from memory, not cache.
            let copies = (400_000_000 / (n * k * 4)).max(1);
            let ws: Vec<Matrix> = (0..copies).map(|_| w.clone()).collect();
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
                "rows {rows} {n}x{k}: {:.1} us, {:.1} GB/s",
                s * 1e6,
                (n * k * 4) as f64 / s / 1e9
            );
        }
    }
}
