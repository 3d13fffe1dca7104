//! The CUDA backend of gpt2rs: [`CudaEngine`] runs GPT-2's forward pass on an NVIDIA GPU
//! behind the same [`gpt2rs::engine::Engine`] interface as the CPU backend, so generation,
//! scoring and bench run on it unchanged.
//!
//! The CUDA driver, cuBLAS and NVRTC are loaded at run time (cudarc's dynamic loading), so
//! this crate builds, and its callers run, on machines with no GPU or CUDA toolkit: opening
//! the engine there fails with a message that says so. Kernels are CUDA C (`kernels.cu`)
//! compiled by NVRTC for the GPU present and cached under `~/.cache/gpt2rs`.
//!
//! Status: f32, f16 and bf16 weights; the whole forward pass on the GPU, checked against the
//! CPU engine on the device machine. Not yet: int8/int4 weights on the GPU, CUDA graphs,
//! sampling on the device, a flash-decoding attention kernel (see docs/benchmarks.md).

mod device;
mod engine;
mod weights;

pub use engine::CudaEngine;
pub use weights::Precision;
