//! The model's weights on the GPU: every matrix in the engine's `[out, in]` row-major layout
//! (cuBLAS reads it as the transposed column-major matrix), either in the activations' element
//! type ([`Precision`]) or, for int8 / int4, in gpt2rs::quant's packed groups with their f16
//! scales, exactly as the CPU holds them; biases, norms and position embeddings in f32.

use crate::device::{device_err, Device};
use cudarc::cublas::sys::cudaDataType_t;
use cudarc::driver::{CudaSlice, DevicePtr};
use gpt2rs::config::Gpt2Config;
use gpt2rs::quant::{DType, QData, QMatrix};
use gpt2rs::weights::{ModelWeights, Norm};
use gpt2rs::Result;

/// The element type of the activations that feed the matrix products, of the KV cache, and of
/// the matrices unless they are int8 / int4.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    F32,
    F16,
    Bf16,
}

impl Precision {
    /// The precision for weights stored as `dtype`: their own for the float formats, f16
    /// for int8 and int4 (weight-only formats; products accumulate in f32).
    pub fn for_dtype(dtype: DType) -> Result<Self> {
        Ok(match dtype {
            DType::F32 => Self::F32,
            DType::F16 | DType::Int8 | DType::Int4 => Self::F16,
            DType::Bf16 => Self::Bf16,
        })
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

/// How a matrix is stored on the GPU (the weight format `W` of kernels.cu's product kernels).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MatrixFormat {
    /// Elements of the engine's precision.
    Float(Precision),
    Int8,
    Int4,
}

impl MatrixFormat {
    /// The suffix of this format's product and embedding kernels in `kernels.cu`.
    pub fn suffix(self) -> &'static str {
        match self {
            Self::Float(p) => p.suffix(),
            Self::Int8 => "q8",
            Self::Int4 => "q4",
        }
    }

    pub fn is_quantized(self) -> bool {
        !matches!(self, Self::Float(_))
    }

    /// The format a matrix stored as `stored` takes on a GPU running in `p`: int8 / int4
    /// stay as they are, float formats become `p`.
    pub fn on_gpu(stored: DType, p: Precision) -> Self {
        match stored {
            DType::Int8 => Self::Int8,
            DType::Int4 => Self::Int4,
            _ => Self::Float(p),
        }
    }

    /// Bytes of a `[rows, cols]` matrix in this format.
    fn bytes(self, rows: usize, cols: usize) -> u64 {
        match self {
            Self::Float(p) => (rows * cols * p.size()) as u64,
            // The scales' padding: see padded_scales.
            Self::Int8 => DType::Int8.matrix_bytes(rows, cols) + 16,
            Self::Int4 => DType::Int4.matrix_bytes(rows, cols) + 16,
        }
    }
}

/// A `rows × cols` weight matrix on the GPU.
pub struct DeviceMatrix {
    pub rows: usize,
    pub cols: usize,
    pub format: MatrixFormat,
    data: DeviceData,
}

enum DeviceData {
    F32(CudaSlice<f32>),
    Half(CudaSlice<u16>),
    /// int8 values or int4 nibble bytes, and an f16 scale per group of 32.
    Quant {
        q: CudaSlice<u8>,
        scales: CudaSlice<u16>,
    },
}

/// A quantized matrix's scales with 16 bytes of zeros after them: the persistent decode
/// kernel copies whole 16-byte pieces around each slot's scales (decode_step.cu).
fn padded_scales(dev: &Device, scales: &[u16]) -> Result<CudaSlice<u16>> {
    let s = &dev.stream;
    let err = device_err("copying weights to the GPU");
    let mut buf = s.alloc_zeros::<u16>(scales.len() + 8).map_err(&err)?;
    s.memcpy_htod(scales, &mut buf.slice_mut(..scales.len()))
        .map_err(&err)?;
    Ok(buf)
}

impl DeviceMatrix {
    /// Uploads `m` in `p`, converting from its stored format where they differ.
    fn upload(dev: &Device, m: &QMatrix, p: Precision) -> Result<Self> {
        let s = &dev.stream;
        let err = device_err("copying weights to the GPU");
        let data = match (&m.data, p) {
            (QData::Int8 { q, scales }, _) => {
                // SAFETY: i8 and u8 have the same size and every byte pattern is valid for both.
                let bytes = unsafe { std::slice::from_raw_parts(q.as_ptr() as *const u8, q.len()) };
                DeviceData::Quant {
                    q: s.clone_htod(bytes).map_err(&err)?,
                    scales: padded_scales(dev, scales)?,
                }
            }
            (QData::Int4 { q, scales }, _) => DeviceData::Quant {
                q: s.clone_htod(&q[..]).map_err(&err)?,
                scales: padded_scales(dev, scales)?,
            },
            (QData::F32(d), Precision::F32) => DeviceData::F32(s.clone_htod(&d[..]).map_err(&err)?),
            (QData::F16(d), Precision::F16) | (QData::Bf16(d), Precision::Bf16) => {
                DeviceData::Half(s.clone_htod(&d[..]).map_err(&err)?)
            }
            // A head kept in another format (e.g. f32 while the blocks are f16): convert.
            _ => {
                let f = m.dequantize().data;
                match p {
                    Precision::F32 => DeviceData::F32(s.clone_htod(&f).map_err(&err)?),
                    Precision::F16 => {
                        let h: Vec<u16> = f
                            .iter()
                            .map(|&v| half::f16::from_f32(v).to_bits())
                            .collect();
                        DeviceData::Half(s.clone_htod(&h).map_err(&err)?)
                    }
                    Precision::Bf16 => {
                        let h: Vec<u16> = f
                            .iter()
                            .map(|&v| half::bf16::from_f32(v).to_bits())
                            .collect();
                        DeviceData::Half(s.clone_htod(&h).map_err(&err)?)
                    }
                }
            }
        };
        Ok(Self {
            rows: m.rows,
            cols: m.cols,
            format: MatrixFormat::on_gpu(m.dtype(), p),
            data,
        })
    }

    /// The raw device address of the elements (the packed values when quantized).
    pub fn ptr(&self, dev: &Device) -> u64 {
        match &self.data {
            DeviceData::F32(d) => d.device_ptr(&dev.stream).0,
            DeviceData::Half(d) => d.device_ptr(&dev.stream).0,
            DeviceData::Quant { q, .. } => q.device_ptr(&dev.stream).0,
        }
    }

    /// The device address of the group scales, 0 for a float matrix.
    pub fn scales_ptr(&self, dev: &Device) -> u64 {
        match &self.data {
            DeviceData::Quant { scales, .. } => scales.device_ptr(&dev.stream).0,
            _ => 0,
        }
    }

    /// Bytes of one stored row (scales aside).
    pub fn row_bytes(&self) -> usize {
        match self.format {
            MatrixFormat::Float(p) => self.cols * p.size(),
            MatrixFormat::Int8 => gpt2rs::quant::groups(self.cols) * 32,
            MatrixFormat::Int4 => gpt2rs::quant::groups(self.cols) * 16,
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

/// A vector in f16 / bf16 bits on the GPU: a bias for cuBLASLt's epilogues with an f16 /
/// bf16 output, which take no f32 bias on some GPUs.
pub struct DeviceHalfVec(CudaSlice<u16>);

impl DeviceHalfVec {
    fn upload(dev: &Device, v: &[f32], p: Precision) -> Result<Option<Self>> {
        let bits: Vec<u16> = match p {
            Precision::F16 => v
                .iter()
                .map(|&x| half::f16::from_f32(x).to_bits())
                .collect(),
            Precision::Bf16 => v
                .iter()
                .map(|&x| half::bf16::from_f32(x).to_bits())
                .collect(),
            Precision::F32 => return Ok(None),
        };
        let slice = dev
            .stream
            .clone_htod(&bits)
            .map_err(device_err("copying weights to the GPU"))?;
        Ok(Some(Self(slice)))
    }

    pub fn ptr(&self, dev: &Device) -> u64 {
        self.0.device_ptr(&dev.stream).0
    }
}

pub struct DeviceLayer {
    pub ln_1: DeviceNorm,
    pub qkv: DeviceLinear,
    pub attn_out: DeviceLinear,
    pub ln_2: DeviceNorm,
    pub mlp_in: DeviceLinear,
    /// mlp_in's bias in the activations' type (f16 / bf16 models).
    pub mlp_in_half_bias: Option<DeviceHalfVec>,
    /// qkv's bias in the activations' type (f16 / bf16 models): prompts' keys and values.
    pub qkv_half_bias: Option<DeviceHalfVec>,
    /// The queries' part of qkv's bias times the layer's attention scale (prompts' queries).
    pub q_bias_scaled: DeviceVec,
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
    /// Bytes `w` takes on the GPU.
    pub fn bytes(w: &ModelWeights) -> Result<u64> {
        let p = Precision::for_dtype(w.format.dtype)?;
        Ok(Self::bytes_for(
            &w.config,
            w.lm_head.is_some(),
            MatrixFormat::on_gpu(w.format.dtype, p),
            MatrixFormat::on_gpu(w.format.head_dtype(), p),
        ))
    }

    /// Bytes a model of shape `c` takes on the GPU with its blocks' matrices in `blocks` and
    /// the token embedding (and LM head, tied or separate) in `head`.
    pub fn bytes_for(
        c: &Gpt2Config,
        separate_head: bool,
        blocks: MatrixFormat,
        head: MatrixFormat,
    ) -> u64 {
        let (e, inner) = (c.n_embd, c.n_inner);
        let layer = blocks.bytes(3 * e, e)
            + blocks.bytes(e, e)
            + blocks.bytes(inner, e)
            + blocks.bytes(e, inner);
        let heads = if separate_head { 2 } else { 1 };
        let vectors = (c.n_positions * e + 2 * e + c.n_layer * (10 * e + inner)) as u64;
        let half_biases = match blocks {
            MatrixFormat::Float(Precision::F32) => 0,
            _ => (c.n_layer * (inner + 3 * e) * 2) as u64,
        };
        heads * head.bytes(c.vocab_size, e) + c.n_layer as u64 * layer + vectors * 4 + half_biases
    }

    /// Elements of the largest matrix (what a quantized one is dequantized into for cuBLAS).
    pub fn largest_matrix(c: &Gpt2Config) -> usize {
        (c.vocab_size * c.n_embd)
            .max(3 * c.n_embd * c.n_embd)
            .max(c.n_inner * c.n_embd)
    }

    /// Whether any matrix is int8 / int4.
    pub fn has_quantized(&self) -> bool {
        self.wte.format.is_quantized()
            || self.lm_head().format.is_quantized()
            || self.layers.iter().any(|l| l.qkv.w.format.is_quantized())
    }

    pub fn upload(dev: &Device, w: &ModelWeights, p: Precision) -> Result<Self> {
        let lin = |l: &gpt2rs::weights::Linear| -> Result<DeviceLinear> {
            Ok(DeviceLinear {
                w: DeviceMatrix::upload(dev, &l.w, p)?,
                b: DeviceVec::upload(dev, &l.b)?,
            })
        };
        let c = &w.config;
        let layers = w
            .layers
            .iter()
            .enumerate()
            .map(|(i, l)| {
                let scale = c.attention_scale(i);
                let q_bias: Vec<f32> = l.qkv.b[..c.n_embd].iter().map(|b| b * scale).collect();
                Ok(DeviceLayer {
                    ln_1: DeviceNorm::upload(dev, &l.ln_1)?,
                    qkv: lin(&l.qkv)?,
                    attn_out: lin(&l.attn_out)?,
                    ln_2: DeviceNorm::upload(dev, &l.ln_2)?,
                    mlp_in: lin(&l.mlp_in)?,
                    mlp_in_half_bias: DeviceHalfVec::upload(dev, &l.mlp_in.b, p)?,
                    qkv_half_bias: DeviceHalfVec::upload(dev, &l.qkv.b, p)?,
                    q_bias_scaled: DeviceVec::upload(dev, &q_bias)?,
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
