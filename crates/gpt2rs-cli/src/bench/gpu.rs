//! The GPU side of bench: which GPUs there are, their ceilings, and the GPU memory a row uses.
//! With the `cuda` feature this goes through gpt2rs-cuda's probe; without it GPUs are only
//! listed (from nvidia-smi), and each says this build cannot measure it.

use super::hardware;
use super::types::Gpu;
#[cfg(feature = "cuda")]
use super::types::GpuCeilings;
use anyhow::Result;
use gpt2rs::config::Gpt2Config;
use gpt2rs::quant::DType;

/// Whether this binary has the CUDA backend.
pub const BUILT_WITH_CUDA: bool = cfg!(feature = "cuda");

/// The GPUs of this machine: from the CUDA driver when this build has the backend and the
/// driver answers (numbered as `cuda:N`), else whatever nvidia-smi lists, each with why it
/// cannot be used; and that reason alone when no GPU is listed at all.
#[cfg(feature = "cuda")]
pub fn scan() -> (Vec<Gpu>, String) {
    let why = match gpt2rs_cuda::probe::list() {
        Ok(list) if !list.is_empty() => {
            let gpus = list
                .into_iter()
                .map(|g| Gpu {
                    name: g.name,
                    memory_bytes: Some(g.memory_total),
                    ordinal: Some(g.ordinal),
                    usable: true,
                    note: None,
                    ceilings: None,
                })
                .collect();
            return (gpus, String::new());
        }
        Ok(_) => "the CUDA driver reports no GPU".to_string(),
        Err(e) => e.to_string(),
    };
    with_note(hardware::listed_gpus(), why)
}

#[cfg(not(feature = "cuda"))]
pub fn scan() -> (Vec<Gpu>, String) {
    with_note(
        hardware::listed_gpus(),
        "this gpt2rs was built without the CUDA backend (rebuild with --features cuda)".into(),
    )
}

fn with_note(mut gpus: Vec<Gpu>, why: String) -> (Vec<Gpu>, String) {
    for g in &mut gpus {
        g.usable = false;
        g.note = Some(why.clone());
    }
    (gpus, why)
}

/// Measures the ceilings of GPU `ordinal` into its entry of `gpus`.
#[cfg(feature = "cuda")]
pub fn measure(gpus: &mut [Gpu], ordinal: usize) -> Result<()> {
    let c = gpt2rs_cuda::probe::measure(ordinal)?;
    if let Some(g) = gpus.iter_mut().find(|g| g.ordinal == Some(ordinal)) {
        g.ceilings = Some(GpuCeilings {
            copy_gbs: c.copy_gbs,
            copy_bytes: c.copy_bytes,
            f16_gemm_tflops: c.f16_gemm_tflops,
            f32_gemm_tflops: c.f32_gemm_tflops,
            gemm_n: c.gemm_n,
        });
    }
    Ok(())
}

#[cfg(not(feature = "cuda"))]
pub fn measure(_: &mut [Gpu], ordinal: usize) -> Result<()> {
    anyhow::bail!("cuda:{ordinal}: this gpt2rs was built without the CUDA backend")
}

/// GPU memory an engine needs: (weights, KV caches, scratch) bytes for `sequences`
/// sequences in passes of up to `rows` tokens; an error for a precision the GPU does not run.
#[cfg(feature = "cuda")]
pub fn memory_needed(
    c: &Gpt2Config,
    dtype: DType,
    sequences: usize,
    rows: usize,
) -> Result<(u64, u64, u64)> {
    let m = gpt2rs_cuda::CudaEngine::memory_needed(c, dtype, sequences, rows)?;
    Ok((m.weights, m.kv_cache, m.scratch))
}

#[cfg(not(feature = "cuda"))]
pub fn memory_needed(_: &Gpt2Config, _: DType, _: usize, _: usize) -> Result<(u64, u64, u64)> {
    anyhow::bail!("this gpt2rs was built without the CUDA backend")
}

/// Watches one GPU's free memory while a row runs: the most the row held is the free memory
/// before its engine opened less the least seen since.
pub struct MemoryWatch {
    #[cfg(feature = "cuda")]
    gauge: gpt2rs_cuda::probe::MemoryGauge,
    before: u64,
    least: u64,
}

impl MemoryWatch {
    /// Starts watching GPU `ordinal` (call before opening the engine).
    #[cfg(feature = "cuda")]
    pub fn start(ordinal: usize) -> Result<Self> {
        let gauge = gpt2rs_cuda::probe::MemoryGauge::open(ordinal)?;
        let before = gauge.free()?;
        Ok(Self {
            gauge,
            before,
            least: before,
        })
    }

    #[cfg(not(feature = "cuda"))]
    pub fn start(ordinal: usize) -> Result<Self> {
        anyhow::bail!("cuda:{ordinal}: this gpt2rs was built without the CUDA backend")
    }

    /// Free bytes when watching started.
    pub fn free_before(&self) -> u64 {
        self.before
    }

    /// Starts a new row: what the previous one freed no longer counts against it.
    pub fn new_row(&mut self) {
        self.least = self.before;
        self.sample();
    }

    /// Reads the free memory now.
    pub fn sample(&mut self) {
        #[cfg(feature = "cuda")]
        if let Ok(free) = self.gauge.free() {
            self.least = self.least.min(free);
        }
    }

    /// The most GPU memory held since watching started, bytes.
    pub fn peak_used(&self) -> u64 {
        self.before.saturating_sub(self.least)
    }
}
