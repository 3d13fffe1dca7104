//! Which backends a bench run measures (`--device`), what each can run, and the ceilings each
//! row is held against. Pure logic: everything here works, and is tested, without a GPU.

use super::types::{Gpu, Hardware};
use crate::device::Device;
use anyhow::{bail, Result};
use gpt2rs::memory::Bytes;
use gpt2rs::quant::DType;

/// A backend to measure: the CPU, or GPU number N.
pub type Backend = Device;

/// The backends of `--device` (comma-separated entries; none = `all`), given the GPUs found,
/// why none is usable (when none is), and whether this binary has the CUDA backend; with the
/// notes the report should carry.
pub fn select(
    entries: &[String],
    gpus: &[Gpu],
    no_gpu_reason: &str,
    built_with_cuda: bool,
) -> Result<(Vec<Backend>, Vec<String>)> {
    let all = ["all".to_string()];
    let entries = if entries.is_empty() {
        &all[..]
    } else {
        entries
    };
    let (mut backends, mut notes) = (Vec::new(), Vec::new());
    let add = |b: Backend, backends: &mut Vec<Backend>| {
        if !backends.contains(&b) {
            backends.push(b);
        }
    };
    for e in entries {
        if e == "all" {
            add(Backend::Cpu, &mut backends);
            let usable: Vec<usize> = gpus.iter().filter_map(|g| g.usable_ordinal()).collect();
            for &n in &usable {
                add(Backend::Cuda(n), &mut backends);
            }
            if usable.is_empty() && !gpus.is_empty() {
                notes.push(not_measured_note(gpus, built_with_cuda));
            }
            continue;
        }
        let b = Device::parse(e)
            .map_err(|_| anyhow::anyhow!("unknown --device '{e}': use cpu, cuda, cuda:N or all"))?;
        if let Backend::Cuda(n) = b {
            if !built_with_cuda {
                bail!(
                    "--device {e}: this gpt2rs was built without the CUDA backend; rebuild with \
                     `cargo build --release --features cuda` (no CUDA toolkit is needed to build it)"
                );
            }
            match gpus.iter().find(|g| g.ordinal == Some(n)) {
                Some(g) if g.usable => {}
                Some(g) => bail!(
                    "--device {e}: {} cannot be used: {}",
                    g.name,
                    g.note.as_deref().unwrap_or("unknown reason")
                ),
                None if gpus.iter().any(|g| g.ordinal.is_some()) => bail!(
                    "--device {e}: there is no GPU cuda:{n}; this machine has {}",
                    gpus.iter()
                        .filter_map(|g| g.ordinal.map(|o| format!("cuda:{o} ({})", g.name)))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                None if no_gpu_reason.is_empty() => bail!("--device {e}: no usable NVIDIA GPU"),
                None => bail!("--device {e}: no usable NVIDIA GPU: {no_gpu_reason}"),
            }
        }
        add(b, &mut backends);
    }
    Ok((backends, notes))
}

/// Why GPUs that were found are not measured.
fn not_measured_note(gpus: &[Gpu], built_with_cuda: bool) -> String {
    let names: Vec<&str> = gpus.iter().map(|g| g.name.as_str()).collect();
    if !built_with_cuda {
        return format!(
            "GPU found ({}), but this gpt2rs was built without the CUDA backend, so only the CPU \
             is measured: rebuild with `cargo build --release --features cuda` to bench the GPU",
            names.join(", ")
        );
    }
    let why = gpus
        .iter()
        .find_map(|g| g.note.clone())
        .unwrap_or_else(|| "the CUDA driver reports none".into());
    format!(
        "GPU found ({}), but it cannot be used, so only the CPU is measured: {why}",
        names.join(", ")
    )
}

/// The report's name for a backend: `cpu`, `cuda:0`.
pub fn label(b: Backend) -> String {
    match b {
        Backend::Cpu => "cpu".into(),
        Backend::Cuda(n) => format!("cuda:{n}"),
    }
}

/// What a backend's rows are held against.
#[derive(Debug, Clone, PartialEq)]
pub struct Ceiling {
    /// Bytes per second decode can read.
    pub bandwidth: f64,
    /// FLOP/s prefill's matrix products can reach.
    pub flops: f64,
    /// Bytes per cached key or value element (the CPU keeps f32, the GPU the weights' type).
    pub kv_bytes: usize,
}

/// The ceilings for `dtype` rows on `b`, from the machine's measurements; `None` when the GPU
/// was not measured.
pub fn ceiling(b: Backend, dtype: DType, hw: &Hardware) -> Option<Ceiling> {
    match b {
        Backend::Cpu => Some(Ceiling {
            bandwidth: hw.mem_read_gbs * 1e9,
            flops: hw.f32_fma_peak_gflops * 1e9,
            kv_bytes: 4,
        }),
        Backend::Cuda(n) => {
            let c = hw.gpus.iter().find(|g| g.ordinal == Some(n))?.ceilings?;
            let (tflops, kv_bytes) = match dtype {
                DType::F32 => (c.f32_gemm_tflops, 4),
                _ => (c.f16_gemm_tflops, 2),
            };
            Some(Ceiling {
                bandwidth: c.copy_gbs * 1e9,
                flops: tflops * 1e12,
                kv_bytes,
            })
        }
    }
}

/// The skip reason when a GPU run needs more memory than is free, with the numbers.
pub fn gpu_fit(
    device: &str,
    weights: u64,
    kv_cache: u64,
    scratch: u64,
    sequences: usize,
    free: u64,
) -> Option<String> {
    let needed = weights + kv_cache + scratch;
    (needed > free).then(|| {
        format!(
            "needs {} of GPU memory (weights {}, KV cache {} for {sequences} sequence(s) at the \
             full context, scratch {}), {} free on {device}",
            Bytes(needed),
            Bytes(weights),
            Bytes(kv_cache),
            Bytes(scratch),
            Bytes(free)
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::types::GpuCeilings;

    fn gpu(ordinal: Option<usize>, usable: bool, note: Option<&str>) -> Gpu {
        Gpu {
            name: "NVIDIA H200".into(),
            memory_bytes: Some(150_000_000_000),
            ordinal,
            usable,
            note: note.map(String::from),
            ceilings: None,
        }
    }

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn default_is_cpu_and_every_usable_gpu() {
        let gpus = [gpu(Some(0), true, None), gpu(Some(1), true, None)];
        let (b, notes) = select(&[], &gpus, "", true).unwrap();
        assert_eq!(b, [Backend::Cpu, Backend::Cuda(0), Backend::Cuda(1)]);
        assert!(notes.is_empty());
        let (b, _) = select(&strings(&["all"]), &gpus, "", true).unwrap();
        assert_eq!(b.len(), 3);
        let (b, _) = select(&[], &[], "", true).unwrap();
        assert_eq!(b, [Backend::Cpu]);
    }

    #[test]
    fn gpu_without_the_feature_is_a_plain_note_or_error() {
        let why = "built without the CUDA backend";
        let gpus = [gpu(None, false, Some(why))];
        let (b, notes) = select(&[], &gpus, why, false).unwrap();
        assert_eq!(b, [Backend::Cpu]);
        assert_eq!(notes.len(), 1);
        assert!(notes[0].contains("--features cuda"), "{}", notes[0]);
        assert!(notes[0].contains("NVIDIA H200"), "{}", notes[0]);
        let err = select(&strings(&["cuda"]), &gpus, why, false).unwrap_err();
        assert!(err.to_string().contains("--features cuda"), "{err}");
    }

    #[test]
    fn explicit_devices_are_checked() {
        let gpus = [gpu(Some(0), true, None)];
        let (b, _) = select(&strings(&["cuda", "cpu", "cuda:0"]), &gpus, "", true).unwrap();
        assert_eq!(b, [Backend::Cuda(0), Backend::Cpu]);
        let err = select(&strings(&["cuda:2"]), &gpus, "", true).unwrap_err();
        assert!(err.to_string().contains("no GPU cuda:2"), "{err}");
        assert!(err.to_string().contains("cuda:0 (NVIDIA H200)"), "{err}");
        let err = select(&strings(&["gpu"]), &gpus, "", true).unwrap_err();
        assert!(
            err.to_string().contains("cpu, cuda, cuda:N or all"),
            "{err}"
        );
        let broken = [gpu(Some(0), false, Some("could not load cuBLAS"))];
        let err = select(&strings(&["cuda"]), &broken, "", true).unwrap_err();
        assert!(err.to_string().contains("could not load cuBLAS"), "{err}");
        let (b, notes) = select(&[], &broken, "", true).unwrap();
        assert_eq!(b, [Backend::Cpu]);
        assert!(notes[0].contains("could not load cuBLAS"), "{notes:?}");
        // No GPU listed at all: the reason the driver gave.
        let why = "could not load the NVIDIA driver (libcuda.so)";
        let err = select(&strings(&["cuda"]), &[], why, true).unwrap_err();
        assert!(
            err.to_string()
                .contains("no usable NVIDIA GPU: could not load"),
            "{err}"
        );
        let (b, notes) = select(&[], &[], why, true).unwrap();
        assert_eq!((b.len(), notes.len()), (1, 0), "no GPU, no note: {notes:?}");
    }

    #[test]
    fn ceilings_per_backend_and_precision() {
        let mut hw = crate::bench::report::tests::sample().hardware;
        let cpu = ceiling(Backend::Cpu, DType::Int8, &hw).unwrap();
        assert_eq!(cpu.bandwidth, 12.5e9);
        assert_eq!(cpu.kv_bytes, 4);
        // A GPU that was not measured has no ceilings.
        hw.gpus = vec![gpu(Some(0), true, None)];
        assert_eq!(ceiling(Backend::Cuda(0), DType::F16, &hw), None);
        hw.gpus[0].ceilings = Some(GpuCeilings {
            copy_gbs: 4000.0,
            copy_bytes: 2 << 30,
            f16_gemm_tflops: 700.0,
            f32_gemm_tflops: 50.0,
            gemm_n: 8192,
        });
        let f16 = ceiling(Backend::Cuda(0), DType::Bf16, &hw).unwrap();
        assert_eq!((f16.bandwidth, f16.flops, f16.kv_bytes), (4e12, 700e12, 2));
        let f32 = ceiling(Backend::Cuda(0), DType::F32, &hw).unwrap();
        assert_eq!((f32.flops, f32.kv_bytes), (50e12, 4));
    }

    #[test]
    fn gpu_fit_gives_the_numbers() {
        assert_eq!(gpu_fit("cuda:0", 10, 10, 10, 1, 100), None);
        let why = gpu_fit(
            "cuda:0",
            3_120_000_000,
            10_000_000_000,
            500_000_000,
            32,
            8_000_000_000,
        )
        .unwrap();
        for part in [
            "13.62 GB",
            "3.12 GB",
            "10.00 GB",
            "32 sequence(s)",
            "8.00 GB free on cuda:0",
        ] {
            assert!(why.contains(part), "{part:?} missing from {why}");
        }
    }
}
