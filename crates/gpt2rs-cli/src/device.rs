//! `--device`: which backend runs the model.

use anyhow::{bail, Result};
use gpt2rs::cpu::CpuEngine;
use gpt2rs::engine::Engine;
use gpt2rs::weights::ModelWeights;

/// A backend named on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    Cpu,
    /// GPU number N.
    Cuda(usize),
}

impl Device {
    /// `cpu`, `cuda` (GPU 0) or `cuda:N`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            _ => match s.strip_prefix("cuda:").map(str::parse) {
                Some(Ok(n)) => Ok(Self::Cuda(n)),
                _ => bail!("unknown device '{s}': use cpu, cuda or cuda:N (N = the GPU's number)"),
            },
        }
    }
}

/// The engine for `device` over `weights`.
pub fn open_engine(weights: ModelWeights, device: &str) -> Result<Box<dyn Engine>> {
    match Device::parse(device)? {
        Device::Cpu => Ok(Box::new(CpuEngine::new(weights))),
        Device::Cuda(n) => cuda_engine(weights, n),
    }
}

#[cfg(feature = "cuda")]
fn cuda_engine(weights: ModelWeights, ordinal: usize) -> Result<Box<dyn Engine>> {
    Ok(Box::new(gpt2rs_cuda::CudaEngine::new(&weights, ordinal)?))
}

#[cfg(not(feature = "cuda"))]
fn cuda_engine(_: ModelWeights, ordinal: usize) -> Result<Box<dyn Engine>> {
    bail!(
        "--device cuda:{ordinal}: this gpt2rs was built without the CUDA backend; rebuild with \
         `cargo build --release --features cuda` (no CUDA toolkit is needed to build it)"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names() {
        assert_eq!(Device::parse("cpu").unwrap(), Device::Cpu);
        assert_eq!(Device::parse("cuda").unwrap(), Device::Cuda(0));
        assert_eq!(Device::parse("cuda:3").unwrap(), Device::Cuda(3));
        for bad in ["gpu", "cuda:", "cuda:x", "CUDA"] {
            let msg = Device::parse(bad).unwrap_err().to_string();
            assert!(msg.contains("cpu, cuda or cuda:N"), "{bad}: {msg}");
        }
    }
}
