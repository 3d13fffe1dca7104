//! What machine this is: CPU, memory, GPUs, and the CPU's ceilings measured on it.

use super::types::{Gpu, Hardware};
use gpt2rs::cpu::{roofline, simd};

/// Detects the machine and measures the CPU's ceilings (a few seconds); `gpus` were found
/// beforehand (their ceilings are measured apart, for the GPUs benched).
pub fn probe(gpus: Vec<Gpu>) -> Hardware {
    // 2 GiB (or a quarter of what is free): well past any cache, small enough to be quick.
    let free = gpt2rs::memory::available().map_or(u64::MAX, |b| b.0 / 4);
    let bandwidth = roofline::read_bandwidth((2u64 << 30).min(free) as usize, 5);
    Hardware {
        os: format!("{} {}", std::env::consts::OS, std::env::consts::ARCH),
        cpu_model: cpu_model(),
        logical_cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        threads: rayon::current_num_threads(),
        simd: simd::isa_name().to_string(),
        ram_total_bytes: ram_total(),
        ram_available_bytes: gpt2rs::memory::available().map(|b| b.0),
        gpus,
        mem_read_gbs: bandwidth / 1e9,
        f32_fma_peak_gflops: roofline::fma_peak(3) / 1e9,
        f32_gemm_gflops: roofline::gemm_rate(1024, 3) / 1e9,
    }
}

fn cpu_model() -> String {
    if let Ok(info) = std::fs::read_to_string("/proc/cpuinfo") {
        for key in ["model name", "Model", "Hardware", "CPU part"] {
            let found = info.lines().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                (k.trim() == key).then(|| v.trim().to_string())
            });
            if let Some(v) = found {
                return v;
            }
        }
    }
    command_output("sysctl", &["-n", "machdep.cpu.brand_string"])
        .unwrap_or_else(|| "unknown CPU".into())
}

fn ram_total() -> Option<u64> {
    if let Some(b) = gpt2rs::memory::proc_kb("/proc/meminfo", "MemTotal") {
        return Some(b.0);
    }
    command_output("sysctl", &["-n", "hw.memsize"])?
        .parse()
        .ok()
}

/// NVIDIA GPUs, from nvidia-smi when it is installed, else from the driver's /proc entries
/// (names and memory only: which the CUDA backend can use is for `gpu::scan` to say).
pub fn listed_gpus() -> Vec<Gpu> {
    if let Some(out) = command_output(
        "nvidia-smi",
        &[
            "--query-gpu=name,memory.total",
            "--format=csv,noheader,nounits",
        ],
    ) {
        return out
            .lines()
            .filter_map(|l| {
                let (name, mib) = l.split_once(',')?;
                Some(Gpu {
                    name: name.trim().to_string(),
                    memory_bytes: mib.trim().parse::<u64>().ok().map(|m| m << 20),
                    ordinal: None,
                    usable: false,
                    note: None,
                    ceilings: None,
                })
            })
            .collect();
    }
    let Ok(dirs) = std::fs::read_dir("/proc/driver/nvidia/gpus") else {
        return Vec::new();
    };
    dirs.filter_map(|d| {
        let info = std::fs::read_to_string(d.ok()?.path().join("information")).ok()?;
        let name = info
            .lines()
            .find_map(|l| l.strip_prefix("Model:"))?
            .trim()
            .to_string();
        Some(Gpu {
            name,
            memory_bytes: None,
            ordinal: None,
            usable: false,
            note: None,
            ceilings: None,
        })
    })
    .collect()
}

fn command_output(cmd: &str, args: &[&str]) -> Option<String> {
    let out = std::process::Command::new(cmd).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
        .filter(|s| !s.is_empty())
}
