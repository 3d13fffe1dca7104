//! What `gpt2rs bench` needs to know about the GPUs before it times GPT-2 on them: which are
//! there, how much memory each has free, and the two ceilings that bound GPT-2 on a GPU:
//! memory bandwidth (decode reads every weight once per step) and the GEMM rate (prefill).
//!
//! Both ceilings are measured the way the device notes and the anchor scripts measure them, so
//! the numbers compare: bandwidth as a large device-to-device copy counting bytes read plus
//! bytes written, GEMM as one large cuBLAS product of random values (never zeros, which run
//! faster), each timed with CUDA events after a warm-up, the median of several passes.

use crate::device::{device_err, missing_libraries, Device};
use crate::weights::Precision;
use cudarc::cublas::sys::{
    cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType_t,
};
use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaContext, CudaSlice, DevicePtr, DeviceRepr};
use gpt2rs::{Error, Result};
use std::ffi::c_void;
use std::sync::Arc;

/// A GPU the CUDA driver reports.
#[derive(Debug, Clone)]
pub struct GpuInfo {
    /// Its number for `--device cuda:N`.
    pub ordinal: usize,
    pub name: String,
    pub memory_total: u64,
    pub compute_capability: (i32, i32),
}

/// Every GPU the driver sees, or why none can be used (libraries missing, driver error).
pub fn list() -> Result<Vec<GpuInfo>> {
    let missing = missing_libraries();
    if !missing.is_empty() {
        return Err(Error::Device(format!(
            "could not load {}",
            missing.join(", ")
        )));
    }
    let count = CudaContext::device_count().map_err(device_err("counting GPUs"))?;
    (0..count.max(0) as usize)
        .map(|ordinal| {
            let ctx = CudaContext::new(ordinal).map_err(device_err("opening the GPU"))?;
            Ok(GpuInfo {
                ordinal,
                name: ctx.name().map_err(device_err("reading the GPU's name"))?,
                memory_total: ctx
                    .total_mem()
                    .map_err(device_err("reading the GPU's memory size"))?
                    as u64,
                compute_capability: ctx
                    .compute_capability()
                    .map_err(device_err("reading the compute capability"))?,
            })
        })
        .collect()
}

/// The ceilings measured on one GPU.
#[derive(Debug, Clone, Copy)]
pub struct Ceilings {
    /// Device-to-device copy bandwidth, GB/s (1e9 bytes), counting bytes read plus bytes
    /// written (a copy of N bytes moves 2N).
    pub copy_gbs: f64,
    /// Bytes of the buffer copied (each pass reads and writes this many).
    pub copy_bytes: u64,
    /// cuBLAS GEMM with f16 inputs, f32 accumulation and output (what the engine runs for
    /// f16 rows; bf16 runs on the same tensor cores at the same rate), TFLOP/s.
    pub f16_gemm_tflops: f64,
    /// cuBLAS GEMM in plain f32 (no TF32: the engine's f32 rows do not use it), TFLOP/s.
    pub f32_gemm_tflops: f64,
    /// The products were `n × n × n`.
    pub gemm_n: usize,
}

/// Passes timed for each ceiling (after two warm-up passes); the median is reported.
const PASSES: usize = 7;
/// Side of the square GEMMs: large enough to fill any current GPU's tensor cores.
const GEMM_N: usize = 8192;

/// Measures GPU `ordinal`'s ceilings (about a second on an H100-class GPU).
pub fn measure(ordinal: usize) -> Result<Ceilings> {
    // Not while another thread captures a graph on this GPU (see shared_gpu.rs).
    let turn = crate::shared_gpu::gpu_turn(ordinal);
    let _turn = turn.take();
    let dev = Device::open(ordinal)?;
    let (free, _) = dev.memory()?;
    // 2 GiB each way, far past any L2 cache; less on a GPU with little free memory.
    let copy_bytes = (2u64 << 30).min(free / 4) & !0xFFFF;
    let copy_gbs = copy_bandwidth(&dev, copy_bytes as usize)?;
    let f16_gemm_tflops = gemm_rate::<u16>(&dev, GEMM_N, Precision::F16)?;
    let f32_gemm_tflops = gemm_rate::<f32>(&dev, GEMM_N, Precision::F32)?;
    Ok(Ceilings {
        copy_gbs,
        copy_bytes,
        f16_gemm_tflops,
        f32_gemm_tflops,
        gemm_n: GEMM_N,
    })
}

/// Median time in ms of `PASSES` runs of `work`, each between two CUDA events, after two
/// warm-up runs.
fn median_ms(dev: &Device, mut work: impl FnMut() -> Result<()>) -> Result<f64> {
    for _ in 0..2 {
        work()?;
    }
    let event = || {
        dev.ctx
            .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(device_err("creating a CUDA event"))
    };
    let mut times = Vec::with_capacity(PASSES);
    for _ in 0..PASSES {
        let (start, end) = (event()?, event()?);
        start
            .record(&dev.stream)
            .map_err(device_err("recording a CUDA event"))?;
        work()?;
        end.record(&dev.stream)
            .map_err(device_err("recording a CUDA event"))?;
        let ms = start
            .elapsed_ms(&end)
            .map_err(device_err("timing with CUDA events"))?;
        times.push(ms as f64);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[PASSES / 2])
}

/// GB/s of a `bytes`-byte device-to-device copy, counting read plus written bytes.
fn copy_bandwidth(dev: &Device, bytes: usize) -> Result<f64> {
    let src = random::<u16>(dev, bytes / 2)?;
    // SAFETY: the copy below writes every byte before anything reads it.
    let mut dst = unsafe { dev.stream.alloc::<u16>(bytes / 2) }
        .map_err(device_err("allocating the copy buffer"))?;
    let ms = median_ms(dev, || {
        dev.stream
            .memcpy_dtod(&src, &mut dst)
            .map_err(device_err("a device-to-device copy"))
    })?;
    Ok(2.0 * bytes as f64 / (ms / 1e3) / 1e9)
}

/// TFLOP/s of an `n × n × n` cuBLAS GEMM with inputs in `p` (f32 accumulation and output),
/// called as the engine calls it.
fn gemm_rate<T: DeviceRepr + Element>(dev: &Device, n: usize, p: Precision) -> Result<f64> {
    let a = random::<T>(dev, n * n)?;
    let b = random::<T>(dev, n * n)?;
    // SAFETY: the GEMM (beta = 0) writes every element before anything reads it.
    let c = unsafe { dev.stream.alloc::<f32>(n * n) }
        .map_err(device_err("allocating the GEMM output"))?;
    let (pa, pb, pc) = (
        a.device_ptr(&dev.stream).0,
        b.device_ptr(&dev.stream).0,
        c.device_ptr(&dev.stream).0,
    );
    let ni = n as i32;
    let (alpha, beta) = (1f32, 0f32);
    let ms = median_ms(dev, || {
        // SAFETY: a, b and c are live device buffers of n × n elements of their types.
        unsafe {
            cudarc::cublas::result::gemm_ex(
                *dev.blas.handle(),
                cublasOperation_t::CUBLAS_OP_T,
                cublasOperation_t::CUBLAS_OP_N,
                ni,
                ni,
                ni,
                &alpha as *const f32 as *const c_void,
                pa as *const c_void,
                p.cuda_type(),
                ni,
                pb as *const c_void,
                p.cuda_type(),
                ni,
                &beta as *const f32 as *const c_void,
                pc as *mut c_void,
                cudaDataType_t::CUDA_R_32F,
                ni,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(device_err("a cuBLAS GEMM"))
    })?;
    drop((a, b, c));
    Ok(2.0 * (n as f64).powi(3) / (ms / 1e3) / 1e12)
}

/// An element type the probe fills with random values.
trait Element: Copy + Default {
    /// A value in [-1, 1) from 24 random bits.
    fn from_unit(u: f32) -> Self;
}

impl Element for f32 {
    fn from_unit(u: f32) -> Self {
        u
    }
}

impl Element for u16 {
    /// f16 bits.
    fn from_unit(u: f32) -> Self {
        half::f16::from_f32(u).to_bits()
    }
}

/// `len` random elements on the GPU. One 4 MiB block made on the host is copied over the
/// whole buffer: random enough for timing, and quick to make for gigabytes.
fn random<T: DeviceRepr + Element>(dev: &Device, len: usize) -> Result<CudaSlice<T>> {
    let block_len = ((4 << 20) / std::mem::size_of::<T>()).min(len.max(1));
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let block: Vec<T> = (0..block_len)
        .map(|_| {
            // xorshift64*: no dependency for a few million numbers.
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            let bits = (state.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40) as f32;
            T::from_unit(bits / (1u64 << 23) as f32 - 1.0)
        })
        .collect();
    // SAFETY: every element is written by the copies below.
    let mut buf =
        unsafe { dev.stream.alloc::<T>(len) }.map_err(device_err("allocating a probe buffer"))?;
    let mut at = 0;
    while at < len {
        let n = block_len.min(len - at);
        dev.stream
            .memcpy_htod(&block[..n], &mut buf.slice_mut(at..at + n))
            .map_err(device_err("filling a probe buffer"))?;
        at += n;
    }
    Ok(buf)
}

/// Free memory of one GPU, read through its primary context, which this keeps open so that
/// engines opened and dropped meanwhile share it (their memory is then what changes).
pub struct MemoryGauge {
    ctx: Arc<CudaContext>,
}

impl MemoryGauge {
    pub fn open(ordinal: usize) -> Result<Self> {
        Ok(Self {
            ctx: CudaContext::new(ordinal).map_err(device_err("opening the GPU"))?,
        })
    }

    /// Free bytes now (cuMemGetInfo). Synchronizes first, so that memory freed
    /// asynchronously by a dropped engine has gone back before it is counted.
    pub fn free(&self) -> Result<u64> {
        self.ctx
            .synchronize()
            .map_err(device_err("waiting for the GPU"))?;
        let (free, _) = self
            .ctx
            .mem_get_info()
            .map_err(device_err("reading GPU memory"))?;
        Ok(free as u64)
    }
}
