//! Opening a GPU: the CUDA libraries (looked up at run time), a context and stream, cuBLAS,
//! and the kernels of `kernels.cu` compiled by NVRTC for this GPU (cached on disk).

use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr};
use cudarc::nvrtc::{CompileOptions, Ptx};
use gpt2rs::{Error, Result};
use std::path::PathBuf;
use std::sync::Arc;

const KERNELS: &str = concat!(
    include_str!("kernels.cu"),
    include_str!("gemm_tc.cu"),
    include_str!("decode_step.cu")
);
/// Bytes of cuBLAS workspace (NVIDIA suggests 32 MiB on Hopper).
pub(crate) const CUBLAS_WORKSPACE: usize = 32 << 20;

/// An open GPU with our kernels loaded.
pub struct Device {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    pub blas: CudaBlas,
    workspace: CudaSlice<u8>,
    module: Arc<CudaModule>,
    pub name: String,
    pub ordinal: usize,
    /// Compute capability major version (9 = Hopper).
    pub major: i32,
    /// Streaming multiprocessors.
    pub sm_count: usize,
}

/// Turns any CUDA-side failure into the library's error, saying what was being done.
pub fn device_err<E: std::fmt::Debug>(what: &str) -> impl Fn(E) -> Error + '_ {
    move |e| Error::Device(format!("{what}: {e:?}"))
}

/// The CUDA libraries this backend loads, and whether each is present.
pub(crate) fn missing_libraries() -> Vec<&'static str> {
    let mut missing = vec![];
    // SAFETY: these only try to load the shared libraries.
    unsafe {
        if !cudarc::driver::sys::is_culib_present() {
            missing.push("the NVIDIA driver (libcuda.so)");
        }
        if !cudarc::nvrtc::sys::is_culib_present() {
            missing.push("NVRTC (libnvrtc.so)");
        }
        if !cudarc::cublas::sys::is_culib_present() {
            missing.push("cuBLAS (libcublas.so)");
        }
        if !cudarc::cublaslt::sys::is_culib_present() {
            missing.push("cuBLASLt (libcublasLt.so)");
        }
    }
    missing
}

impl Device {
    /// The cuBLAS workspace: its device address and bytes (cuBLASLt products share it; they
    /// run on the same stream).
    pub fn workspace(&self) -> (u64, usize) {
        (self.workspace.device_ptr(&self.stream).0, CUBLAS_WORKSPACE)
    }

    /// Opens GPU `ordinal`, or says plainly why it cannot.
    pub fn open(ordinal: usize) -> Result<Self> {
        let missing = missing_libraries();
        if !missing.is_empty() {
            return Err(Error::Device(format!(
                "no usable NVIDIA GPU: could not load {}. Install the NVIDIA driver and the CUDA \
                 libraries (cuBLAS, NVRTC), or use --device cpu",
                missing.join(", ")
            )));
        }
        let count = CudaContext::device_count().map_err(device_err("counting GPUs"))?;
        if ordinal >= count.max(0) as usize {
            return Err(Error::Device(format!(
                "there is no GPU cuda:{ordinal}: this machine has {count} (cuda:0 to cuda:{})",
                count - 1
            )));
        }
        let ctx = CudaContext::new(ordinal).map_err(device_err("opening the GPU"))?;
        // One stream, in order: cudarc's cross-stream event tracking is not needed.
        // SAFETY: nothing here uses more than one stream.
        unsafe { ctx.disable_event_tracking() };
        // A stream of our own: the legacy default stream cannot be captured into graphs.
        let stream = ctx.new_stream().map_err(device_err("creating a stream"))?;
        let blas = CudaBlas::new(stream.clone()).map_err(device_err("starting cuBLAS"))?;
        // cuBLAS gets its workspace up front: it must not allocate while a graph is captured.
        let workspace = stream
            .alloc_zeros::<u8>(CUBLAS_WORKSPACE)
            .map_err(device_err("allocating the cuBLAS workspace"))?;
        // SAFETY: the workspace outlives the handle (both live in this Device).
        let status = unsafe {
            cudarc::cublas::sys::cublasSetWorkspace_v2(
                *blas.handle(),
                workspace.device_ptr(&stream).0 as *mut std::ffi::c_void,
                CUBLAS_WORKSPACE,
            )
        };
        if status != cudarc::cublas::sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
            return Err(Error::Device(format!(
                "setting the cuBLAS workspace: {status:?}"
            )));
        }
        let name = ctx.name().map_err(device_err("reading the GPU's name"))?;
        let (major, minor) = ctx
            .compute_capability()
            .map_err(device_err("reading the compute capability"))?;
        let sm_count =
            ctx.attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            )
            .map_err(device_err("reading the GPU's multiprocessor count"))? as usize;
        let ptx = compile_kernels(major, minor)?;
        let module = ctx
            .load_module(ptx)
            .map_err(device_err("loading the kernels"))?;
        Ok(Self {
            ctx,
            stream,
            blas,
            workspace,
            module,
            name,
            ordinal,
            major,
            sm_count,
        })
    }

    /// Kernel `name` of `kernels.cu`.
    pub fn function(&self, name: &str) -> Result<CudaFunction> {
        self.module
            .load_function(name)
            .map_err(device_err(&format!("finding kernel {name}")))
    }

    /// Free and total bytes of GPU memory.
    pub fn memory(&self) -> Result<(u64, u64)> {
        let (free, total) = self
            .ctx
            .mem_get_info()
            .map_err(device_err("reading GPU memory"))?;
        Ok((free as u64, total as u64))
    }
}

/// PTX of `kernels.cu` for compute capability `major.minor`, from the disk cache when this
/// exact source was compiled for it before.
fn compile_kernels(major: i32, minor: i32) -> Result<Ptx> {
    let arch = format!("compute_{major}{minor}");
    let defines = kernel_defines();
    let cache = cache_path(&arch, &defines);
    if let Some(path) = &cache {
        if let Ok(src) = std::fs::read_to_string(path) {
            return Ok(Ptx::from_src(src));
        }
    }
    let opts = CompileOptions {
        // NVRTC wants a &'static str; one small string per process.
        arch: Some(Box::leak(arch.into_boxed_str())),
        options: defines.iter().map(|d| format!("-D{d}")).collect(),
        ..Default::default()
    };
    let ptx = cudarc::nvrtc::compile_ptx_with_opts(KERNELS, opts)
        .map_err(|e| Error::Device(format!("compiling the CUDA kernels with NVRTC: {e:?}")))?;
    if let Some(path) = &cache {
        // A cache that cannot be written only costs the next start a compile. Written beside
        // it and renamed into place, so an engine starting at the same time (another
        // process, or another test thread) never reads half a file.
        static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = path.with_extension(format!("{}-{n}.tmp", std::process::id()));
        let _ = std::fs::create_dir_all(path.parent().expect("a file in a directory"))
            .and_then(|_| std::fs::write(&tmp, ptx.to_src()))
            .and_then(|_| std::fs::rename(&tmp, path));
        let _ = std::fs::remove_file(&tmp);
    }
    Ok(ptx)
}

/// Macros defined for the kernels' compile: gemm_tc's stage count (see [`gemm_stages`]), and
/// for measurements GPT2RS_CUDA_DEFINES=NAME[=VALUE],… (e.g. STEP_PROFILE, see decode_step.cu).
fn kernel_defines() -> Vec<String> {
    let mut defines: Vec<String> = std::env::var("GPT2RS_CUDA_DEFINES")
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .map(String::from)
        .collect();
    defines.push(format!("GEMM_STAGES={}", gemm_stages()));
    defines
}

/// Shared-memory stages of gemm_tc.cu's products (the engine sizes their shared memory by
/// it): GPT2RS_CUDA_GEMM_STAGES (2-8, for measurements), by default 4.
pub(crate) fn gemm_stages() -> usize {
    std::env::var("GPT2RS_CUDA_GEMM_STAGES")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .map_or(4, |s| s.clamp(2, 8))
}

/// `$XDG_CACHE_HOME/gpt2rs/kernels-<hash of the source, version, arch and defines>.ptx` (or
/// under `~/.cache`), or none when neither is set.
fn cache_path(arch: &str, defines: &[String]) -> Option<PathBuf> {
    use std::hash::{Hash, Hasher};
    let dir = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (KERNELS, env!("CARGO_PKG_VERSION"), arch, defines).hash(&mut h);
    Some(
        dir.join("gpt2rs")
            .join(format!("kernels-{arch}-{:016x}.ptx", h.finish())),
    )
}
