//! The CUDA backend of gpt2rs: [`CudaEngine`] runs GPT-2's forward pass on an NVIDIA GPU
//! behind the same [`gpt2rs::engine::Engine`] interface as the CPU backend, so generation,
//! scoring and bench run on it unchanged.
//!
//! The CUDA driver, cuBLAS, cuBLASLt and NVRTC are loaded at run time (cudarc's dynamic loading), so
//! this crate builds, and its callers run, on machines with no GPU or CUDA toolkit: opening
//! the engine there fails with a message that says so. Kernels are CUDA C (`kernels.cu`)
//! compiled by NVRTC for the GPU present and cached under `~/.cache/gpt2rs`.
//!
//! Status: f32, f16 and bf16 weights, and int8 / int4 kept in gpt2rs::quant's packed groups
//! (f16 activations); the whole forward pass on the GPU, checked against the CPU engine on
//! the device machine; decode steps replay CUDA graphs; next-token picks on the device (greedy,
//! temperature, top-k, top-p); decode attention that reads the cache before the QKV product
//! ends, split along long caches (flash-decoding);
//! prompt chunks' attention on the tensor cores (f16 / bf16); longer passes' residual and MLP
//! products with cuBLASLt's fused epilogues, and a single prompt's queries, keys and values
//! written by cuBLASLt straight into q and the cache; f16 / bf16 products of 6 to 8 rows on the tensor
//! cores (its kernels take up to 64, but above 8 cuBLAS is faster at gpt2-xl's width), and
//! matrix-vector kernels that start the next product's matrix into L2 as they finish. A
//! persistent kernel for batch-1 decode (decode_step.cu: every layer in one launch, weights
//! streamed by bulk copies) is correct but slower than the kernel-by-kernel path so far, so it
//! runs only when asked (GPT2RS_CUDA_STEP=1), and so is a tensor-core product of up to 64
//! rows that streams its weights through shared memory (gemm_tc.cu, GPT2RS_CUDA_GEMM_ROWS).
//! Not yet: batch-1 decode at the speed targets, a product of 9 to 64 rows that beats
//! cuBLAS (batch-32 target); see docs/benchmarks.md. [`probe`] measures a GPU's ceilings for
//! `gpt2rs bench`.

mod decode_step;
mod device;
mod engine;
mod launch;
mod lt;
pub mod probe;
mod shared_gpu;
mod tensor_cores;
mod weights;

pub use engine::MemoryNeeded;
pub use shared_gpu::CudaEngine;
pub use weights::Precision;
