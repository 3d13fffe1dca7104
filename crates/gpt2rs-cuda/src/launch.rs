//! Kernel launches with arguments given as plain values, optionally with programmatic
//! dependent launch (Hopper and later).

use crate::device::{device_err, Device};
use cudarc::driver::sys::{
    CUlaunchAttribute, CUlaunchAttributeID, CUlaunchAttributeValue,
    CUlaunchAttributeValue_union__bindgen_ty_1, CUlaunchConfig,
};
use cudarc::driver::{CudaFunction, LaunchConfig};
use gpt2rs::Result;
use std::ffi::c_void;

/// A kernel argument.
#[derive(Clone, Copy)]
pub enum Arg {
    Ptr(u64),
    Int(i32),
    Float(f32),
}

/// Launches `f` on `dev`'s stream; with `pdl`, by programmatic dependent launch, so it starts
/// while the previous kernel finishes (every kernel of kernels.cu waits for its predecessor
/// before reading what that wrote).
pub fn launch(
    dev: &Device,
    pdl: bool,
    f: &CudaFunction,
    cfg: LaunchConfig,
    args: &[Arg],
) -> Result<()> {
    launch_in_clusters(dev, pdl, f, cfg, args, None)
}

/// [`launch`], with the grid's blocks in thread-block clusters of `cluster` (x, y, z) blocks
/// when given (sm_90 and later): a cluster's blocks run at once and read each other's shared
/// memory.
pub fn launch_in_clusters(
    dev: &Device,
    pdl: bool,
    f: &CudaFunction,
    cfg: LaunchConfig,
    args: &[Arg],
    cluster: Option<(u32, u32, u32)>,
) -> Result<()> {
    // Each parameter's value in an 8-byte slot (4-byte ones in its low half: the driver
    // copies as many bytes as the kernel declares).
    let mut values: Vec<u64> = args
        .iter()
        .map(|a| match *a {
            Arg::Ptr(v) => v,
            Arg::Int(v) => u64::from(v as u32),
            Arg::Float(v) => u64::from(v.to_bits()),
        })
        .collect();
    let mut params: Vec<*mut c_void> = values
        .iter_mut()
        .map(|v| v as *mut u64 as *mut c_void)
        .collect();
    let mut attributes = Vec::with_capacity(2);
    if pdl {
        attributes.push(CUlaunchAttribute {
            id: CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION,
            pad: [0; 4],
            value: CUlaunchAttributeValue {
                programmaticStreamSerializationAllowed: 1,
            },
        });
    }
    if let Some((x, y, z)) = cluster {
        attributes.push(CUlaunchAttribute {
            id: CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION,
            pad: [0; 4],
            value: CUlaunchAttributeValue {
                clusterDim: CUlaunchAttributeValue_union__bindgen_ty_1 { x, y, z },
            },
        });
    }
    let config = CUlaunchConfig {
        gridDimX: cfg.grid_dim.0,
        gridDimY: cfg.grid_dim.1,
        gridDimZ: cfg.grid_dim.2,
        blockDimX: cfg.block_dim.0,
        blockDimY: cfg.block_dim.1,
        blockDimZ: cfg.block_dim.2,
        sharedMemBytes: cfg.shared_mem_bytes,
        hStream: dev.stream.cu_stream(),
        attrs: attributes.as_mut_ptr(),
        numAttrs: attributes.len() as u32,
    };
    dev.ctx
        .bind_to_thread()
        .map_err(device_err("binding the CUDA context"))?;
    // SAFETY: every launch passes the argument list its kernel declares (each slot holds a
    // value of the declared size), with buffers sized for the rows and widths it is given;
    // `values`, `params` and `attributes` outlive the call.
    unsafe {
        cudarc::driver::sys::cuLaunchKernelEx(
            &config,
            f.cu_function(),
            params.as_mut_ptr(),
            std::ptr::null_mut(),
        )
    }
    .result()
    .map_err(device_err("launching a kernel"))
}
