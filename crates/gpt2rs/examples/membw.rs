//! Prints this machine's ceilings: memory read bandwidth, f32 FMA peak and GEMM rate (all threads).
use gpt2rs::cpu::roofline;

fn main() {
    let threads = rayon::current_num_threads();
    for _ in 0..3 {
        let bw = roofline::read_bandwidth(2 << 30, 5);
        println!("read bandwidth: {:.1} GB/s ({threads} threads)", bw / 1e9);
    }
    println!("f32 FMA peak: {:.1} GFLOP/s", roofline::fma_peak(3) / 1e9);
    println!(
        "f32 GEMM 1024^3: {:.1} GFLOP/s",
        roofline::gemm_rate(1024, 3) / 1e9
    );
}
