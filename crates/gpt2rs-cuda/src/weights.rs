//! The model's weights on the GPU: every matrix in one element type ([`Precision`]), as the
//! engine's `[out, in]` row-major layout (cuBLAS reads it as the transposed column-major
//! matrix); biases, norms and position embeddings in f32.

use crate::device::{device_err, Device};
use cudarc::cublas::sys::cudaDataType_t;
use cudarc::driver::{CudaSlice, DevicePtr};
use gpt2rs::config::Gpt2Config;
use gpt2rs::quant::{DType, QData, QMatrix};
use gpt2rs::weights::{ModelWeights, Norm};
use gpt2rs::{Error, Result};

/// The element type of the matrices, the GEMM inputs and the KV cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    F32,
    F16,
    Bf16,
}

impl Precision {
    /// The precision for weights stored as `dtype`, or why there is none yet.
    pub fn for_dtype(dtype: DType) -> Result<Self> {
        match dtype {
            DType::F32 => Ok(Self::F32),
            DType::F16 => Ok(Self::F16),
            DType::Bf16 => Ok(Self::Bf16),
            DType::Int8 | DType::Int4 => Err(Error::Device(format!(
                "{} weights are not supported by the cuda backend yet (it runs f32, f16 and \
                 bf16); use --dtype f16, or --device cpu for {}",
                dtype.name(),
                dtype.name()
            ))),
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::Bf16 => 2,
        }
    }

    /// The suffix of this precision's kernels in `kernels.cu`.
    pub fn suffix(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Bf16 => "bf16",
        }
    }

    pub fn cuda_type(self) -> cudaDataType_t {
        match self {
            Self::F32 => cudaDataType_t::CUDA_R_32F,
            Self::F16 => cudaDataType_t::CUDA_R_16F,
            Self::Bf16 => cudaDataType_t::CUDA_R_16BF,
        }
    }
}

/// A matrix on the GPU: `rows × cols` elements of the model's precision.
pub struct DeviceMatrix {
    pub rows: usize,
    pub cols: usize,
    data: DeviceData,
}

enum DeviceData {
    F32(CudaSlice<f32>),
    Half(CudaSlice<u16>),
}

impl DeviceMatrix {
    /// Uploads `m` in `p`, converting from its stored format where they differ.
    fn upload(dev: &Device, m: &QMatrix, p: Precision) -> Result<Self> {
        let s = &dev.stream;
        let err = device_err("copying weights to the GPU");
        let data = match (&m.data, p) {
            (QData::F32(d), Precision::F32) => DeviceData::F32(s.clone_htod(&d[..]).map_err(err)?),
            (QData::F16(d), Precision::F16) | (QData::Bf16(d), Precision::Bf16) => {
                DeviceData::Half(s.clone_htod(&d[..]).map_err(err)?)
            }
            // A head kept in another format (e.g. f32 while the blocks are f16): convert.
            _ => {
                let f = m.dequantize().data;
                match p {
                    Precision::F32 => DeviceData::F32(s.clone_htod(&f).map_err(err)?),
                    Precision::F16 => {
                        let h: Vec<u16> = f
                            .iter()
                            .map(|&v| half::f16::from_f32(v).to_bits())
                            .collect();
                        DeviceData::Half(s.clone_htod(&h).map_err(err)?)
                    }
                    Precision::Bf16 => {
                        let h: Vec<u16> = f
                            .iter()
                            .map(|&v| half::bf16::from_f32(v).to_bits())
                            .collect();
                        DeviceData::Half(s.clone_htod(&h).map_err(err)?)
                    }
                }
            }
        };
        Ok(Self {
            rows: m.rows,
            cols: m.cols,
            data,
        })
    }

    /// The raw device address.
    pub fn ptr(&self, dev: &Device) -> u64 {
        match &self.data {
            DeviceData::F32(d) => d.device_ptr(&dev.stream).0,
            DeviceData::Half(d) => d.device_ptr(&dev.stream).0,
        }
    }
}

/// An f32 vector on the GPU.
pub struct DeviceVec(CudaSlice<f32>);

impl DeviceVec {
    fn upload(dev: &Device, v: &[f32]) -> Result<Self> {
        Ok(Self(
            dev.stream
                .clone_htod(v)
                .map_err(device_err("copying weights to the GPU"))?,
        ))
    }

    pub fn ptr(&self, dev: &Device) -> u64 {
        self.0.device_ptr(&dev.stream).0
    }
}

pub struct DeviceNorm {
    pub gamma: DeviceVec,
    pub beta: DeviceVec,
}

impl DeviceNorm {
    fn upload(dev: &Device, n: &Norm) -> Result<Self> {
        Ok(Self {
            gamma: DeviceVec::upload(dev, &n.gamma)?,
            beta: DeviceVec::upload(dev, &n.beta)?,
        })
    }
}

pub struct DeviceLinear {
    pub w: DeviceMatrix,
    pub b: DeviceVec,
}

pub struct DeviceLayer {
    pub ln_1: DeviceNorm,
    pub qkv: DeviceLinear,
    pub attn_out: DeviceLinear,
    pub ln_2: DeviceNorm,
    pub mlp_in: DeviceLinear,
    pub mlp_out: DeviceLinear,
}

/// Every weight of the model on the GPU.
pub struct DeviceModel {
    pub wte: DeviceMatrix,
    pub wpe: DeviceVec,
    pub layers: Vec<DeviceLayer>,
    pub ln_f: DeviceNorm,
    /// A separate LM head, or `None` when tied to `wte`.
    pub lm_head: Option<DeviceMatrix>,
}

impl DeviceModel {
    /// Bytes the model takes on the GPU in precision `p`.
    pub fn bytes(w: &ModelWeights, p: Precision) -> u64 {
        Self::bytes_for(&w.config, w.lm_head.is_some(), p)
    }

    /// Bytes a model of shape `c` takes on the GPU in precision `p`, with or without a
    /// separate LM head.
    pub fn bytes_for(c: &Gpt2Config, separate_head: bool, p: Precision) -> u64 {
        let matrices = (c.vocab_size * c.n_embd) as u64 * if separate_head { 2 } else { 1 }
            + c.n_layer as u64 * (4 * c.n_embd * c.n_embd + 2 * c.n_embd * c.n_inner) as u64;
        let vectors = (c.n_positions * c.n_embd
            + 2 * c.n_embd
            + c.n_layer * (9 * c.n_embd + c.n_inner)) as u64;
        matrices * p.size() as u64 + vectors * 4
    }

    pub fn upload(dev: &Device, w: &ModelWeights, p: Precision) -> Result<Self> {
        let lin = |l: &gpt2rs::weights::Linear| -> Result<DeviceLinear> {
            Ok(DeviceLinear {
                w: DeviceMatrix::upload(dev, &l.w, p)?,
                b: DeviceVec::upload(dev, &l.b)?,
            })
        };
        let layers = w
            .layers
            .iter()
            .map(|l| {
                Ok(DeviceLayer {
                    ln_1: DeviceNorm::upload(dev, &l.ln_1)?,
                    qkv: lin(&l.qkv)?,
                    attn_out: lin(&l.attn_out)?,
                    ln_2: DeviceNorm::upload(dev, &l.ln_2)?,
                    mlp_in: lin(&l.mlp_in)?,
                    mlp_out: lin(&l.mlp_out)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            wte: DeviceMatrix::upload(dev, &w.wte, p)?,
            wpe: DeviceVec::upload(dev, &w.wpe.data)?,
            layers,
            ln_f: DeviceNorm::upload(dev, &w.ln_f)?,
            lm_head: w
                .lm_head
                .as_ref()
                .map(|m| DeviceMatrix::upload(dev, m, p))
                .transpose()?,
        })
    }

    pub fn lm_head(&self) -> &DeviceMatrix {
        self.lm_head.as_ref().unwrap_or(&self.wte)
    }
}
