//! Prints this machine's memory read bandwidth (all threads), the ceiling of decode speed.
fn main() {
    for _ in 0..3 {
        let bw = gpt2rs::cpu::roofline::read_bandwidth(1 << 30, 3);
        println!(
            "read bandwidth: {:.1} GB/s ({} threads)",
            bw / 1e9,
            rayon::current_num_threads()
        );
    }
}
