//! What machine this is: CPU, memory, GPUs, and the CPU's ceilings measured on it.

use super::backend::Backend;
use super::types::{Gpu, Hardware};
use gpt2rs::config::Gpt2Config;
use gpt2rs::cpu::{roofline, simd};
use gpt2rs::engine::{BatchEntry, Engine, LogitsFor, PickRule};
use gpt2rs::quant::{DType, WeightFormat};
use gpt2rs::weights::ModelWeights;

/// The machine's drift, measured again and again through the run: on each backend benched, a
/// reference decode (gpt2's shape in f16, batch 1) kept loaded for the whole sweep, so what
/// changes between its measurements is the machine (other load, clocks, memory), not the
/// workload.
pub struct DriftProbe {
    engines: Vec<(Backend, Box<dyn Engine>)>,
}

/// What the drift probe runs, for the report.
pub const DRIFT_REFERENCE: &str = "gpt2 f16 decode, batch 1, 16 steps";

impl DriftProbe {
    /// A reference engine on each of `backends` (one that cannot open is left out: its rows
    /// keep the spread of their own repetitions).
    pub fn open(backends: &[Backend]) -> Self {
        let config = Gpt2Config::preset("gpt2").expect("a preset");
        let format = WeightFormat::new(DType::F16);
        let engines = backends
            .iter()
            .filter_map(|&b| {
                let weights = ModelWeights::synthetic_as(&config, 1, format);
                let e = crate::device::open_engine(weights, &super::backend::label(b)).ok()?;
                Some((b, e))
            })
            .collect();
        Self { engines }
    }

    /// Decode tokens per second on `backend` now (a tenth of a second on a laptop-class CPU).
    pub fn tok_s(&mut self, backend: Backend) -> Option<f64> {
        let e = &mut self.engines.iter_mut().find(|(b, _)| *b == backend)?.1;
        let seq = e.add_sequence();
        let mut step = |t: &[u32]| {
            e.forward(&[BatchEntry {
                seq,
                tokens: t,
                logits: LogitsFor::Pick(PickRule::Greedy),
            }])
            .map(|_| ())
        };
        let prompt: Vec<u32> = (0..8).map(|i| 1000 + 17 * i).collect();
        let mut ok = step(&prompt).is_ok();
        let start = std::time::Instant::now();
        for t in 0..16u32 {
            ok &= step(&[3000 + t]).is_ok();
        }
        let secs = start.elapsed().as_secs_f64();
        e.remove_sequence(seq);
        ok.then(|| 16.0 / secs)
    }

    pub fn backends(&self) -> impl Iterator<Item = Backend> + '_ {
        self.engines.iter().map(|(b, _)| *b)
    }
}

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
        drift: Vec::new(),
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
