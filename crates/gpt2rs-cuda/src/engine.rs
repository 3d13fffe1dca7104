//! [`GpuEngine`]: GPT-2's forward pass on one GPU, behind the same [`Engine`] interface as the
//! CPU backend (ragged batches, a KV cache per sequence).
//!
//! One pass, per layer: layer norm → QKV product (+ bias, q scaled, K/V stored into each row's
//! sequence cache) → attention over the cache → output product (+ bias, added into the residual
//! stream) → layer norm → MLP product (+ bias, GELU) → MLP product (+ bias, residual). Up to 8
//! rows, products are kernels.cu's matrix-vector kernels with those epilogues fused (weights in
//! f32/f16/bf16 or packed int8/int4); longer passes use cuBLAS (f32 accumulation; int8/int4
//! matrices dequantized to f16 first) with the residual and MLP epilogues fused by cuBLASLt
//! (lt.rs), the others as an elementwise kernel. Prompt chunks' attention runs on the tensor
//! cores (kernels.cu's attention_mma) where the activations are f16 / bf16.

use crate::decode_step::{DecodeStep, StepBuffers};
use crate::device::{device_err, Device, CUBLAS_WORKSPACE};
use crate::launch::{launch, launch_in_clusters, Arg};
use crate::lt::{Fused, Lt, Operands};
use crate::tensor_cores::{self, TcKernel, TcKernels};
use crate::weights::{DeviceMatrix, DeviceModel, MatrixFormat, Precision};
use cudarc::cublas::sys::{
    cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType_t,
};
use cudarc::driver::sys::{
    cuMemcpy2DAsync_v2, CUfunction_attribute, CUgraphInstantiate_flags, CUmemorytype,
    CUstreamCaptureMode, CUDA_MEMCPY2D,
};
use cudarc::driver::{CudaFunction, CudaGraph, CudaSlice, DevicePtr, LaunchConfig};
use gpt2rs::config::{Activation, Gpt2Config};
use gpt2rs::engine::{BatchEntry, Engine, Logits, LogitsFor, PickRule, SeqId};
use gpt2rs::memory::Bytes;
use gpt2rs::quant::{DType, WeightFormat};
use gpt2rs::weights::ModelWeights;
use gpt2rs::{Error, Result};
use rayon::prelude::*;
use std::collections::{HashMap, HashSet};
use std::ffi::c_void;

/// Threads per block of the row-wise kernels.
const ROW_THREADS: u32 = 256;
/// Threads per block of the matrix-vector kernels (8 warps; kernels.cu's gemv assumes it).
const GEMV_THREADS: u32 = 256;
/// Threads per block of the attention kernel (one block per head and group of query rows).
const ATTENTION_THREADS: u32 = 256;
/// Query rows of one sequence that share an attention block in passes with prompt chunks
/// (each key and value is read once for all of them); decode rows go one to a block.
const ATTENTION_GROUP: usize = 8;
/// Query rows per block of the tensor-core attention for prompt chunks (kernels.cu's
/// MMA_ROWS), which needs heads of this size (every GPT-2's).
const ATTENTION_MMA_ROWS: usize = 64;
/// kernels.cu's MMA_SHARED_BYTES: two sets × two stages × a K and a V tile of 64 × 72 halves.
const ATTENTION_MMA_SHARED: u32 = 2 * 2 * 2 * 64 * 72 * 2;
const ATTENTION_MMA_HEAD: usize = 64;
/// Threads per block of the split decode attention (kernels.cu's attention_split; heads up
/// to this wide), and the most blocks a row and head is split into.
const SPLIT_THREADS: u32 = 128;
/// Threads per block of kernels.cu's attention_decode (its DECODE_THREADS).
const DECODE_THREADS: u32 = 128;
const MAX_SPLITS: usize = 8;
/// Shared memory a kernel may use without opting in.
const DEFAULT_SHARED_BYTES: usize = 48 << 10;
/// Up to this many rows, matrix products run as our matrix-vector kernels (each weight read
/// once for all rows) or, in f16 / bf16, gemv_tc where it is faster; more go to cuBLAS.
const GEMV_MAX_ROWS: usize = 8;
/// Decode batches up to this many sequences run as CUDA graphs.
const MAX_GRAPH_ROWS: usize = 256;

/// What becomes of a matrix product's result (the `EPI_*` modes of kernels.cu): fused into
/// the matrix-vector kernels of decode, an elementwise pass after cuBLAS for longer passes.
#[derive(Clone, Copy)]
enum Epilogue {
    /// f32 into `out` (the LM head); in the matrix-vector kernels, rows from `first_pick` on
    /// are reduced to their pick keys in the pass's `ids` instead.
    Plain { out: u64, first_pick: usize },
    /// `act(v + bias)` in the model's precision into `out` (the MLP's first layer; act: 0
    /// gelu-tanh, 1 gelu-erf, 2 relu).
    /// `half_bias`: the bias in the model's precision, for cuBLASLt (0 for f32 models).
    Act {
        bias: u64,
        half_bias: u64,
        out: u64,
        act: i32,
    },
    /// `x += v + bias` in f32: a projection back into the residual stream.
    Residual { bias: u64, x: u64 },
    /// The QKV projection plus bias: q (× scale, f32) into `q`, keys and values into each
    /// row's cache at its position in layer `layer`. For cuBLASLt (prompts of one sequence):
    /// `q_bias`, q's bias × scale, and `half_bias`, the bias in the model's precision (or 0).
    Qkv {
        bias: u64,
        q_bias: u64,
        half_bias: u64,
        q: u64,
        layer: i32,
        scale: f32,
    },
}

impl Epilogue {
    /// The kernels' arguments for it (`EPI_PARAMS` of kernels.cu): mode, out, bias, act_out,
    /// act, the KV target's caches, pos, caps, c, layer, n_layer, scale, then first_pick,
    /// picks, pick_inv_t and pick_seeds. `fused`: in a matrix-vector kernel (the only ones that pick).
    fn args(self, p: &Pass, c: usize, n_layer: usize, fused: bool) -> [Arg; 16] {
        let none = i32::MAX;
        let (mode, out, bias, act_out, act, layer, scale, first_pick) = match self {
            Self::Plain { out, first_pick } if fused => {
                (0, out, 0, 0, 0, 0, 1.0, first_pick as i32)
            }
            Self::Plain { out, .. } => (0, out, 0, 0, 0, 0, 1.0, none),
            Self::Act { bias, out, act, .. } => (1, 0, bias, out, act, 0, 1.0, none),
            Self::Residual { bias, x } => (2, x, bias, 0, 0, 0, 1.0, none),
            Self::Qkv {
                bias,
                q,
                layer,
                scale,
                ..
            } => (3, q, bias, 0, 0, layer, scale, none),
        };
        [
            Arg::Int(mode),
            Arg::Ptr(out),
            Arg::Ptr(bias),
            Arg::Ptr(act_out),
            Arg::Int(act),
            Arg::Ptr(p.caches),
            Arg::Ptr(p.pos),
            Arg::Ptr(p.caps),
            Arg::Int(c as i32),
            Arg::Int(layer),
            Arg::Int(n_layer as i32),
            Arg::Float(scale),
            Arg::Int(first_pick),
            Arg::Ptr(p.ids),
            Arg::Ptr(p.pick_inv_t),
            Arg::Ptr(p.pick_seeds),
        ]
    }
}

/// Device addresses of one pass's inputs and scratch buffers, and its sizes.
struct Pass {
    rows: usize,
    /// Rows whose logits are computed: those that come back whole, then those picked with
    /// top-k / top-p (`filtered`), then the plain picks (`picks`).
    wanted: usize,
    /// The last `picks` of them are reduced to their argmax on the GPU (into `ids`).
    picks: usize,
    /// Picks with top-k / top-p, from their logits rows by `pick_filtered`; their keys follow
    /// the plain picks' in `ids`, and their parameters in the per-pick arrays.
    filtered: usize,
    /// Per pick: top-k (i32) and top-p (f32).
    pick_top_k: u64,
    pick_top_p: u64,
    ids: u64,
    /// Per picked row: 1 / temperature (0 for greedy, f32) and the noise seed (u64).
    pick_inv_t: u64,
    pick_seeds: u64,
    tokens: u64,
    pos: u64,
    caches: u64,
    /// Per row, the positions its sequence's cache has room for.
    caps: u64,
    /// Attention's groups of query rows: (first row, count) pairs, `n_groups` of them, each
    /// up to `group` consecutive rows of one sequence.
    groups: u64,
    n_groups: usize,
    group: usize,
    /// Decode attention's blocks per row and head (1: not split), with their partial results
    /// and per-(row, head) counts of finished blocks (zero between passes).
    splits: usize,
    /// Positions per block of attention_decode, or 0 where the pass uses other kernels.
    decode_chunk: usize,
    split_part: u64,
    split_counts: u64,
    wanted_rows: u64,
    x: u64,
    h: u64,
    q: u64,
    att: u64,
    /// The tensor-core products' partial sums of a tile split along k, and per-tile counts of
    /// finished blocks (zero between products); fixed sizes (see `TcKernels::split_needs`).
    tc_part: u64,
    tc_counts: u64,
    /// f32 products of cuBLAS before their epilogue (passes of more than GEMV_MAX_ROWS rows).
    product: u64,
    /// A quantized matrix dequantized for cuBLAS (such passes of an int8 / int4 model), or 0.
    dequantized: u64,
    m: u64,
    logits: u64,
    /// Where a pass of one sequence writes its keys and values: that sequence's cache
    /// (address, capacity) and its first row's position; `None` for passes of several.
    one_sequence: Option<(u64, usize, usize)>,
}

/// The kernels that read a matrix of one format.
struct MatrixKernels {
    /// `gemv[r - 1]`: the matrix-vector kernel for r rows.
    gemv: Vec<CudaFunction>,
    /// `resident_warps[r - 1]`: how many warps of it the whole GPU holds at once.
    resident_warps: Vec<usize>,
    embed: CudaFunction,
    /// Products of short passes on the tensor cores (f16 and bf16 weights on sm_80 and later).
    tc: Option<TcKernels>,
    /// Into f16 for cuBLAS (the integer formats).
    dequantize: Option<CudaFunction>,
}

impl MatrixKernels {
    fn load(dev: &Device, format: MatrixFormat) -> Result<Self> {
        let f = |name: &str| dev.function(&format!("{name}_{}", format.suffix()));
        let gemv: Vec<CudaFunction> = (1..=GEMV_MAX_ROWS)
            .map(|r| f(&format!("gemv{r}")))
            .collect::<Result<_>>()?;
        let resident_warps = gemv
            .iter()
            .map(|g| {
                let blocks = g
                    .occupancy_max_active_blocks_per_multiprocessor(GEMV_THREADS, 0, None)
                    .map_err(device_err("reading a kernel's occupancy"))?;
                Ok(blocks.max(1) as usize * (GEMV_THREADS as usize / 32) * dev.sm_count)
            })
            .collect::<Result<_>>()?;
        let tensor_cores = dev.major >= 8
            && matches!(
                format,
                MatrixFormat::Float(Precision::F16) | MatrixFormat::Float(Precision::Bf16)
            );
        let tc = tensor_cores
            .then(|| TcKernels::load(dev, format.suffix()))
            .transpose()?;
        Ok(Self {
            gemv,
            resident_warps,
            embed: f("embed")?,
            tc,
            dequantize: format.is_quantized().then(|| f("dequantize")).transpose()?,
        })
    }
}

struct Kernels {
    /// Per matrix format the model holds (the blocks', and the head's when it differs).
    matrices: Vec<(MatrixFormat, MatrixKernels)>,
    layernorm: CudaFunction,
    /// Query rows per block 1 (decode) and ATTENTION_GROUP (prompts).
    attention: [CudaFunction; 2],
    /// For prompts on the tensor cores (f16 / bf16 activations on sm_80 and later).
    attention_mma: Option<CudaFunction>,
    /// For decode rows, split along the cache.
    attention_split: CudaFunction,
    /// For decode passes: chunks of the cache read before the QKV product ends.
    attention_decode: CudaFunction,
    epilogue_rows: CudaFunction,
    argmax: CudaFunction,
    pick_filtered: CudaFunction,
}

impl Kernels {
    fn load(dev: &Device, p: Precision, formats: &[MatrixFormat]) -> Result<Self> {
        let f = |name: &str| dev.function(&format!("{name}_{}", p.suffix()));
        let mut matrices: Vec<(MatrixFormat, MatrixKernels)> = vec![];
        for &m in formats {
            if !matrices.iter().any(|(have, _)| *have == m) {
                matrices.push((m, MatrixKernels::load(dev, m)?));
            }
        }
        Ok(Self {
            matrices,
            layernorm: f("layernorm")?,
            attention: [f("attention1")?, f(&format!("attention{ATTENTION_GROUP}"))?],
            attention_split: f("attention_split")?,
            attention_decode: f("attention_decode")?,
            attention_mma: (p != Precision::F32 && dev.major >= 8)
                .then(|| {
                    let k = f("attention_mma")?;
                    // More than the 48 KB a kernel gets unless it asks.
                    k.set_attribute(
                        CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                        ATTENTION_MMA_SHARED as i32,
                    )
                    .map_err(device_err("giving attention_mma its shared memory"))?;
                    Ok(k)
                })
                .transpose()?,
            epilogue_rows: f("epilogue_rows")?,
            argmax: f("argmax")?,
            pick_filtered: f("pick_filtered")?,
        })
    }

    /// Tile counts and floats of partial sums that the split tensor-core products of any
    /// format need at most (see [`TcKernels::split_needs`]), or 1 and 1.
    fn tc_split_needs(&self) -> (usize, usize) {
        let each = self.matrices.iter().filter_map(|(_, m)| m.tc.as_ref());
        each.map(TcKernels::split_needs)
            .fold((1, 1), |(c, f), (c2, f2)| (c.max(c2), f.max(f2)))
    }

    /// The kernels that read `m`.
    fn of(&self, m: &DeviceMatrix) -> &MatrixKernels {
        &self
            .matrices
            .iter()
            .find(|(f, _)| *f == m.format)
            .expect("kernels are loaded for every format the model holds")
            .1
    }
}

/// One sequence: its length and its KV cache (keys then values, each
/// `[n_layer][cap][n_embd]`), grown in blocks of [`CACHE_BLOCK_TOKENS`] as it fills.
struct Seq {
    len: usize,
    /// Positions the cache has room for.
    cap: usize,
    cache: Option<CudaSlice<u8>>,
}

/// KV caches grow by this many positions at a time, not for the whole context up front.
const CACHE_BLOCK_TOKENS: usize = 64;
/// Finished sequences' caches kept for reuse (the oldest go back to the driver first; all
/// of them when a batch would not fit otherwise).
const SPARE_CACHES: usize = 128;
const SPARE_BYTES: usize = 2 << 30;

/// A captured decode step's shape: rows, rows with logits, plain picks, filtered picks.
type GraphKey = (usize, usize, usize, usize);

/// Device buffers reused by every pass, grown to the largest batch seen.
#[derive(Default)]
struct Scratch {
    bufs: HashMap<&'static str, CudaSlice<u8>>,
}

/// GPT-2 on an NVIDIA GPU; [`crate::CudaEngine`] is this, taking turns with the process's
/// other users of the same GPU.
pub(crate) struct GpuEngine {
    dev: Device,
    kernels: Kernels,
    w: DeviceModel,
    config: Gpt2Config,
    /// How the weights were given (the matrices keep int8 / int4 as they are).
    format: WeightFormat,
    /// The activations' and KV cache's element type.
    precision: Precision,
    seqs: HashMap<SeqId, Seq>,
    next_id: u64,
    scratch: Scratch,
    /// Captured decode steps by shape (see [`GraphKey`]); they point into `scratch`.
    graphs: HashMap<GraphKey, CudaGraph>,
    use_graphs: bool,
    /// Programmatic dependent launch (Hopper and later).
    use_pdl: bool,
    /// Pass lengths whose products run in gemv_tc and in gemm_tc (see tensor_cores.rs).
    tc_rows: std::ops::RangeInclusive<usize>,
    gemm_rows: std::ops::RangeInclusive<usize>,
    /// See [`Self::uses_attention_mma`].
    use_attention_mma: bool,
    /// See [`Self::attention_splits`].
    use_split: bool,
    /// See [`Self::decode_chunk`].
    use_decode_attention: bool,
    /// Longer passes' products with fused epilogues (f16 / bf16 operands only: cuBLASLt's
    /// plain-f32 products are not the exact ones the f32 engine is held to).
    lt: Option<Lt>,
    /// Caches of finished sequences, by capacity, kept for the next ones (a new allocation
    /// per request costs a cudaMalloc and a memset on its first pass).
    spare: Vec<(usize, CudaSlice<u8>)>,
    /// Page-locked host memory the logits come back through, grown as needed.
    pinned: Option<cudarc::driver::PinnedHostSlice<u8>>,
    /// One-row passes through every layer in one persistent kernel, where it applies.
    step: Option<DecodeStep>,
    /// Whether one-row passes use `step`: off unless GPT2RS_CUDA_STEP=1 or a test asks, as it
    /// is slower than the kernel-by-kernel path so far (docs/benchmarks.md, twelfth session).
    use_step: bool,
    /// How much of the next product's matrix a matrix-vector product asks L2 for as its blocks
    /// finish (GPT2RS_CUDA_L2_NEXT_KB, by default L2_NEXT_DEFAULT; 0 for none).
    l2_next: usize,
    /// Whether prompts of one sequence write their keys and values straight into the cache
    /// (GPT2RS_CUDA_QKV_CACHE=0 keeps the f32 product and epilogue kernel, for comparisons).
    use_qkv_into_cache: bool,
    /// QKV products that wrote straight into a cache through cuBLASLt (for tests).
    qkv_into_cache: std::cell::Cell<u64>,
}

impl GpuEngine {
    /// Opens GPU `ordinal` and copies `weights` onto it; fails with the numbers when they do
    /// not fit, and plainly when there is no GPU or the precision is not supported here.
    pub fn new(weights: &ModelWeights, ordinal: usize) -> Result<Self> {
        let precision = Precision::for_dtype(weights.format.dtype)?;
        let dev = Device::open(ordinal)?;
        let needed = DeviceModel::bytes(weights)?;
        let (free, _) = dev.memory()?;
        if needed > free {
            return Err(Error::OutOfMemory {
                what: format!("the weights on GPU cuda:{ordinal} ({})", dev.name),
                needed: Bytes(needed),
                available: Bytes(free),
            });
        }
        let w = DeviceModel::upload(&dev, weights, precision)?;
        let mut formats = vec![w.wte.format, w.lm_head().format];
        formats.extend(w.layers.first().map(|l| l.qkv.w.format));
        let kernels = Kernels::load(&dev, precision, &formats)?;
        let dev_major = dev.major;
        // GPT2RS_CUDA_PDL=0 serializes kernels the ordinary way (for comparisons).
        let use_pdl = dev.major >= 9 && std::env::var("GPT2RS_CUDA_PDL").map_or(true, |v| v != "0");
        let use_split = std::env::var("GPT2RS_CUDA_SPLIT").map_or(true, |v| v != "0");
        let use_decode_attention =
            std::env::var("GPT2RS_CUDA_DECODE_ATTENTION").map_or(true, |v| v != "0");
        // GPT2RS_CUDA_LT=0 keeps every product on plain cuBLAS (for comparisons).
        let lt = (precision != Precision::F32
            && std::env::var("GPT2RS_CUDA_LT").map_or(true, |v| v != "0"))
        .then(|| Lt::new(dev.workspace()))
        .transpose()?;
        let step = DecodeStep::new(&dev, &w, &weights.config, precision)?;
        let use_attention_mma = kernels.attention_mma.is_some()
            && weights.config.head_dim() == ATTENTION_MMA_HEAD
            && std::env::var("GPT2RS_CUDA_ATTENTION_MMA").map_or(true, |v| v != "0");
        Ok(Self {
            dev,
            kernels,
            w,
            config: weights.config.clone(),
            format: weights.format,
            precision,
            seqs: HashMap::new(),
            next_id: 0,
            scratch: Scratch::default(),
            graphs: HashMap::new(),
            // GPT2RS_CUDA_GRAPHS=0 launches every kernel of every step (for comparisons).
            use_graphs: std::env::var("GPT2RS_CUDA_GRAPHS").map_or(true, |v| v != "0"),
            use_pdl,
            tc_rows: tensor_cores::gemv_tc_rows(),
            gemm_rows: tensor_cores::gemm_tc_rows(),
            use_attention_mma,
            use_split,
            use_decode_attention,
            lt,
            spare: Vec::new(),
            pinned: None,
            step,
            use_step: std::env::var("GPT2RS_CUDA_STEP").is_ok_and(|v| v == "1"),
            use_qkv_into_cache: std::env::var("GPT2RS_CUDA_QKV_CACHE").map_or(true, |v| v != "0"),
            l2_next: l2_next_setting(dev_major),
            qkv_into_cache: std::cell::Cell::new(0),
        })
    }

    /// How many QKV products of prompts went straight into their caches (cuBLASLt's path;
    /// the others ran plain cuBLAS and an elementwise epilogue).
    pub fn qkv_products_into_cache(&self) -> u64 {
        self.qkv_into_cache.get()
    }

    /// Runs the products of passes of `rows` rows (within 1-64) in kernels.cu's gemv_tc where
    /// gemm_tc does not take them, instead of the default (6-8) or GPT2RS_CUDA_TC_ROWS; for
    /// tests and comparisons.
    pub fn set_tensor_core_rows(&mut self, rows: std::ops::RangeInclusive<usize>) {
        self.tc_rows = tensor_cores::clamp_rows(rows);
    }

    /// Runs the products of passes of `rows` rows (within 1-64) in gemm_tc.cu's gemm_tc,
    /// instead of the default (none) or GPT2RS_CUDA_GEMM_ROWS; for tests and comparisons.
    pub fn set_streamed_rows(&mut self, rows: std::ops::RangeInclusive<usize>) {
        self.gemm_rows = tensor_cores::clamp_rows(rows);
    }

    /// Whether one-row passes run every layer in one persistent kernel (decode_step.cu)
    /// where the model and GPU allow it, or kernel by kernel (the default).
    pub fn set_decode_step(&mut self, on: bool) {
        self.use_step = on;
    }

    /// Whether one-row passes run in the persistent kernel.
    pub fn decode_step_slots(&self) -> Option<usize> {
        self.step
            .as_ref()
            .filter(|_| self.use_step)
            .map(DecodeStep::slots)
    }

    /// The GPU's context (shared by every engine on this GPU in the process).
    pub(crate) fn context(&self) -> std::sync::Arc<cudarc::driver::CudaContext> {
        self.dev.ctx.clone()
    }

    /// Bytes of one sequence's KV cache when it holds the whole context (caches grow in
    /// blocks of 64 positions up to this).
    pub fn cache_bytes_per_sequence(&self) -> u64 {
        cache_bytes(&self.config, self.precision)
    }

    /// What [`crate::CudaEngine::memory_needed`] answers: mirrors what [`Self::new`],
    /// `prepare` and `forward` allocate, so bench can skip what does not fit instead of
    /// failing midway.
    pub fn memory_needed(
        config: &Gpt2Config,
        dtype: DType,
        sequences: usize,
        rows: usize,
    ) -> Result<MemoryNeeded> {
        let p = Precision::for_dtype(dtype)?;
        let (c, inner, es) = (config.n_embd, config.n_inner, p.size());
        let cap = rows.next_power_of_two().max(64);
        // x, h, q, att, product, m: the scratch buffers of `forward`; then decode attention's
        // partial results (at most one per 64 positions, see `decode_chunk`).
        let per_row = c * 4 + c * es + c * 4 + c * es + (3 * c).max(inner) * 4 + inner * es;
        let splits = config.n_positions.div_ceil(64).max(MAX_SPLITS);
        let per_row = per_row + config.n_head * splits * (config.head_dim() + 2) * 4;
        // Logits (and picked ids) of every sequence.
        let logits = sequences.next_power_of_two() * (logits_stride(config.vocab_size) + 2) * 4;
        let format = MatrixFormat::on_gpu(dtype, p);
        // Passes longer than the matrix-vector kernels take dequantize each matrix for cuBLAS.
        let dequantized = if format.is_quantized() && rows > GEMV_MAX_ROWS {
            DeviceModel::largest_matrix(config) * es
        } else {
            0
        };
        Ok(MemoryNeeded {
            weights: DeviceModel::bytes_for(config, !config.tie_word_embeddings, format, format),
            kv_cache: sequences as u64 * cache_bytes(config, p),
            scratch: (cap * per_row + cap * META_BYTES_PER_ROW + logits + dequantized) as u64
                + CUBLAS_WORKSPACE as u64,
        })
    }

    /// Launches `f` on the engine's stream (see [`launch`]).
    fn launch(&self, f: &CudaFunction, cfg: LaunchConfig, args: &[Arg]) -> Result<()> {
        launch(&self.dev, self.use_pdl, f, cfg, args)
    }

    /// `x[rows, k]` · `wᵀ` (`x` in the model's precision, `w` `[n, k]` row-major) through
    /// `epi`: up to GEMV_MAX_ROWS rows in one matrix-vector kernel with the epilogue fused,
    /// or on the tensor cores in gemv_tc (fused too) for the pass lengths it takes (see
    /// `tc_rows`); otherwise through cuBLAS (cuBLASLt's fused epilogues, or f32 into the
    /// pass's product buffer and an elementwise epilogue). `next` is the matrix of the product
    /// that follows in the pass: the matrix-vector kernels start its first `l2_next` bytes into
    /// L2 as their blocks finish.
    fn gemm(
        &self,
        p: &Pass,
        x: u64,
        rows: usize,
        w: &DeviceMatrix,
        next: Option<&DeviceMatrix>,
        epi: Epilogue,
    ) -> Result<()> {
        let (n, k) = (w.rows as i32, w.cols as i32);
        let (c, n_layer) = (self.config.n_embd, self.config.n_layer);
        let kernels = self.kernels.of(w);
        let (data, scales) = (w.ptr(&self.dev), w.scales_ptr(&self.dev));
        let tc = self.tc_kernel(rows, w);
        let (next_ptr, next_bytes) = next.map_or((0, 0), |m| {
            let bytes = (m.rows * m.row_bytes()).min(self.l2_next) & !15;
            (m.ptr(&self.dev), bytes)
        });
        if rows <= GEMV_MAX_ROWS && tc.is_none() {
            let wpr = warps_per_row(w.rows, w.row_bytes(), kernels.resident_warps[rows - 1]);
            let cfg = LaunchConfig {
                grid_dim: ((w.rows * wpr).div_ceil(8) as u32, 1, 1),
                block_dim: (GEMV_THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            let mut args = vec![
                Arg::Ptr(x),
                Arg::Ptr(data),
                Arg::Ptr(scales),
                Arg::Int(n),
                Arg::Int(k),
                Arg::Int(wpr as i32),
                Arg::Ptr(next_ptr),
                Arg::Int(next_bytes as i32),
            ];
            args.extend(epi.args(p, c, n_layer, true));
            return self.launch(&kernels.gemv[rows - 1], cfg, &args);
        }
        if let Some(tc) = tc {
            let cfg = tc.launch_config(w);
            let (cluster_arg, clusters) = tc.cluster_launch(&cfg);
            let mut args = vec![
                Arg::Ptr(x),
                Arg::Ptr(data),
                Arg::Int(rows as i32),
                Arg::Int(n),
                Arg::Int(k),
                Arg::Ptr(p.tc_part),
                Arg::Ptr(p.tc_counts),
                Arg::Ptr(next_ptr),
                Arg::Int(next_bytes as i32),
            ];
            args.extend(epi.args(p, c, n_layer, true));
            args.extend(cluster_arg);
            return launch_in_clusters(&self.dev, self.use_pdl, &tc.f, cfg, &args, clusters);
        }
        // cuBLAS multiplies like with like: a quantized matrix is expanded first.
        let w_ptr = if let Some(dequantize) = &kernels.dequantize {
            // One thread per 16-byte piece.
            let pieces = (w.rows * w.row_bytes() / 16) as u64;
            self.launch(
                dequantize,
                LaunchConfig {
                    grid_dim: (pieces.div_ceil(ROW_THREADS as u64).min(65_535) as u32, 1, 1),
                    block_dim: (ROW_THREADS, 1, 1),
                    shared_mem_bytes: 0,
                },
                &[
                    Arg::Ptr(data),
                    Arg::Ptr(scales),
                    Arg::Int(n),
                    Arg::Int(k),
                    Arg::Ptr(p.dequantized),
                ],
            )?;
            p.dequantized
        } else {
            data
        };
        if self.fused_product(p, x, rows, w, w_ptr, epi)? {
            return Ok(());
        }
        let (out, ldc) = match epi {
            Epilogue::Plain { out, .. } => (out, logits_stride(w.rows) as i32),
            _ => (p.product, n),
        };
        let ty = self.precision.cuda_type();
        let (alpha, beta) = (1f32, 0f32);
        // Column-major view: out (n × rows) = wᵀ' (n × k) · x' (k × rows), where the row-major
        // buffers read as w' = k × n and x' = k × rows.
        // SAFETY: the pointers are live device buffers of at least these sizes.
        unsafe {
            cudarc::cublas::result::gemm_ex(
                *self.dev.blas.handle(),
                cublasOperation_t::CUBLAS_OP_T,
                cublasOperation_t::CUBLAS_OP_N,
                n,
                rows as i32,
                k,
                &alpha as *const f32 as *const c_void,
                w_ptr as *const c_void,
                ty,
                k,
                x as *const c_void,
                ty,
                k,
                &beta as *const f32 as *const c_void,
                out as *mut c_void,
                cudaDataType_t::CUDA_R_32F,
                ldc,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| {
            // cuBLAS's launch failures say little: the stream's state says whether an earlier
            // kernel faulted (on the error path only; it ends any capture in progress).
            let stream = self.dev.stream.synchronize().err();
            let stream = stream.map_or(String::new(), |s| {
                format!("; the stream then reports {s:?}")
            });
            Error::Device(format!(
                "a cuBLAS GEMM of {rows} rows × {k} by {n} × {k}: {e:?}{stream}"
            ))
        })?;
        if let Epilogue::Plain { first_pick, .. } = epi {
            return self.argmax(p, first_pick, rows);
        }
        let mut args = vec![Arg::Ptr(p.product), Arg::Int(rows as i32), Arg::Int(n)];
        args.extend(epi.args(p, c, n_layer, false));
        // kernels.cu's epilogue_rows: 4 columns a thread, a row (or several) a block's y.
        let across = (n as usize).div_ceil(4 * ROW_THREADS as usize) as u32;
        self.launch(
            &self.kernels.epilogue_rows,
            LaunchConfig {
                grid_dim: (across, rows.min(65_535) as u32, 1),
                block_dim: (ROW_THREADS, 1, 1),
                shared_mem_bytes: 0,
            },
            &args,
        )
    }

    /// The tensor-core kernel for a product of `rows` rows with `w`, if one takes it: f16 /
    /// bf16 weights on sm_80 and later, a pass length in `gemm_rows` or `tc_rows`, and k a
    /// multiple of the kernel's step.
    fn tc_kernel(&self, rows: usize, w: &DeviceMatrix) -> Option<&TcKernel> {
        let tc = self.kernels.of(w).tc.as_ref()?;
        tc.pick(rows, w.cols, &self.tc_rows, &self.gemm_rows)
    }

    /// Whether the LM head of a pass picks its plain-pick rows itself (its matrix-vector or
    /// tensor-core kernel reduces them to their keys), so the keys must start cleared.
    fn head_picks(&self, wanted: usize) -> bool {
        wanted <= GEMV_MAX_ROWS || self.tc_kernel(wanted, self.w.lm_head()).is_some()
    }

    /// `x · wᵀ` (`w` at `w_ptr` in the activations' type) with a residual or activation
    /// epilogue in one cuBLASLt product, or a QKV one in two (see `qkv_into_cache`); false
    /// (nothing enqueued) when cuBLASLt is off or has no algorithm for it, or for the head.
    fn fused_product(
        &self,
        p: &Pass,
        x: u64,
        rows: usize,
        w: &DeviceMatrix,
        w_ptr: u64,
        epi: Epilogue,
    ) -> Result<bool> {
        if matches!(epi, Epilogue::Qkv { .. }) {
            return self.qkv_into_cache(p, x, rows, w, w_ptr, epi);
        }
        let Some(lt) = &self.lt else {
            return Ok(false);
        };
        let half = self.precision == Precision::F16;
        let stream = self.dev.stream.cu_stream() as _;
        let (fused, bias, half_bias, out) = match epi {
            Epilogue::Residual { bias, x } => (Fused::Residual, bias, 0, x),
            Epilogue::Act {
                bias,
                half_bias,
                out,
                act,
            } => match act {
                0 => (Fused::Gelu, bias, half_bias, out),
                2 => (Fused::Relu, bias, half_bias, out),
                _ => return Ok(false),
            },
            _ => return Ok(false),
        };
        let ops = Operands {
            x,
            w: w_ptr,
            bias,
            half_bias,
            out,
            alpha: 1.0,
            batch_stride: 0,
        };
        lt.run(stream, fused, rows, w.rows, w.cols, half, &ops)
    }

    /// A prompt's QKV product of one sequence in two cuBLASLt calls, with no f32 product in
    /// between: the queries (× scale) into q, the keys and values (one batch of two) into
    /// the rows' places in the cache. `Ok(false)` when the pass has several sequences or
    /// cuBLASLt has no algorithm for a part (then nothing was enqueued but, at worst, the
    /// keys and values, which the unfused path writes again).
    fn qkv_into_cache(
        &self,
        p: &Pass,
        x: u64,
        rows: usize,
        w: &DeviceMatrix,
        w_ptr: u64,
        epi: Epilogue,
    ) -> Result<bool> {
        let (Some(lt), Some((cache, cap, first))) = (&self.lt, p.one_sequence) else {
            return Ok(false);
        };
        let Epilogue::Qkv {
            bias,
            q_bias,
            half_bias,
            q,
            layer,
            scale,
        } = epi
        else {
            return Ok(false);
        };
        if !self.use_qkv_into_cache {
            return Ok(false);
        }
        let cfg = &self.config;
        let (c, k) = (cfg.n_embd, w.cols);
        let es = self.precision.size();
        let half = self.precision == Precision::F16;
        let stream = self.dev.stream.cu_stream() as _;
        // kernels.cu's cache layout: a layer's keys at (layer · cap + position) · c, its
        // values n_layer · cap · c elements after them.
        let keys = cache + ((layer as usize * cap + first) * c * es) as u64;
        let kv = Operands {
            x,
            w: w_ptr + (c * k * es) as u64,
            bias: bias + (c * 4) as u64,
            half_bias: if half_bias == 0 {
                0
            } else {
                half_bias + (c * es) as u64
            },
            out: keys,
            alpha: 1.0,
            batch_stride: (cfg.n_layer * cap * c) as u64,
        };
        if !lt.run(stream, Fused::KeyValue, rows, c, k, half, &kv)? {
            return Ok(false);
        }
        let queries = Operands {
            x,
            w: w_ptr,
            bias: q_bias,
            half_bias: 0,
            out: q,
            alpha: scale,
            batch_stride: 0,
        };
        if !lt.run(stream, Fused::Query, rows, c, k, half, &queries)? {
            return Ok(false);
        }
        self.qkv_into_cache.set(self.qkv_into_cache.get() + 1);
        Ok(true)
    }

    /// cuBLASLt's plans for every pass length from GEMV_MAX_ROWS + 1 to `longest` rows, so a
    /// server's mixed steps (each a new length) do not wait for them.
    fn plan_fused_products(&self, longest: usize) -> Result<()> {
        let Some(lt) = &self.lt else {
            return Ok(());
        };
        let Some(l) = self.w.layers.first() else {
            return Ok(());
        };
        let act = match self.config.activation {
            Activation::GeluTanh => Some(Fused::Gelu),
            Activation::Relu => Some(Fused::Relu),
            Activation::GeluErf => None,
        };
        let half = self.precision == Precision::F16;
        for rows in GEMV_MAX_ROWS + 1..=longest {
            let (c, qkv_k) = (self.config.n_embd, l.qkv.w.cols);
            for (fused, n, k) in [
                (Some(Fused::Residual), l.attn_out.w.rows, l.attn_out.w.cols),
                (act, l.mlp_in.w.rows, l.mlp_in.w.cols),
                (Some(Fused::Residual), l.mlp_out.w.rows, l.mlp_out.w.cols),
                (Some(Fused::KeyValue), c, qkv_k),
                (Some(Fused::Query), c, qkv_k),
            ] {
                if let Some(f) = fused {
                    lt.prepare(f, rows, n, k, half)?;
                }
            }
        }
        Ok(())
    }

    /// The layer norm of `rows` rows of x (through the device row list `which`, when not 0)
    /// into h, in the model's precision. (Fused into each block of the matrix-vector kernels
    /// it measured slower on the H200: every block redoing the norm delays its weight reads.)
    fn layernorm(
        &self,
        p: &Pass,
        norm: &crate::weights::DeviceNorm,
        rows: usize,
        which: u64,
    ) -> Result<()> {
        let c = self.config.n_embd;
        self.launch(
            &self.kernels.layernorm,
            LaunchConfig {
                grid_dim: (rows as u32, 1, 1),
                block_dim: (ROW_THREADS, 1, 1),
                // What of the row its threads' registers do not hold stays in shared memory
                // between the passes (rows wider than 8 × 256).
                shared_mem_bytes: (c * 4) as u32,
            },
            &[
                Arg::Ptr(p.x),
                Arg::Ptr(which),
                Arg::Ptr(norm.gamma.ptr(&self.dev)),
                Arg::Ptr(norm.beta.ptr(&self.dev)),
                Arg::Ptr(p.h),
                Arg::Int(c as i32),
                Arg::Float(self.config.layer_norm_epsilon),
            ],
        )
    }

    /// Pick keys of logits rows `first_pick..rows` into the pass's `ids`, one block a row.
    fn argmax(&self, p: &Pass, first_pick: usize, rows: usize) -> Result<()> {
        if first_pick >= rows {
            return Ok(());
        }
        self.launch(
            &self.kernels.argmax,
            LaunchConfig {
                grid_dim: ((rows - first_pick) as u32, 1, 1),
                block_dim: (1024, 1, 1),
                shared_mem_bytes: 0,
            },
            &[
                Arg::Ptr(p.logits),
                Arg::Int(first_pick as i32),
                Arg::Int(self.config.vocab_size as i32),
                Arg::Ptr(p.ids),
                Arg::Ptr(p.pick_inv_t),
                Arg::Ptr(p.pick_seeds),
            ],
        )
    }

    /// Puts the whole pass for `p` on the stream (no host synchronization, so it can be
    /// captured into a graph).
    fn enqueue(&self, p: &Pass) -> Result<()> {
        let cfg = &self.config;
        let (c, rows) = (cfg.n_embd, p.rows);
        let (x, q, att, m) = (p.x, p.q, p.att, p.m);
        let ci = c as i32;
        let k = &self.kernels;
        let w = &self.w;
        let dev = &self.dev;
        // The LM head's matrix-vector kernel takes the maximum of the pick keys: clear them.
        let cleared = if self.head_picks(p.wanted) {
            p.picks
        } else {
            0
        };
        self.launch(
            &k.of(&w.wte).embed,
            LaunchConfig {
                grid_dim: (rows as u32, 1, 1),
                block_dim: (ROW_THREADS, 1, 1),
                shared_mem_bytes: 0,
            },
            &[
                Arg::Ptr(p.tokens),
                Arg::Ptr(p.pos),
                Arg::Ptr(w.wte.ptr(dev)),
                Arg::Ptr(w.wte.scales_ptr(dev)),
                Arg::Ptr(w.wpe.ptr(dev)),
                Arg::Ptr(x),
                Arg::Int(ci),
                Arg::Ptr(p.ids),
                Arg::Int(cleared as i32),
            ],
        )?;
        let act = activation_code(cfg.activation);
        let step = self.step.as_ref().filter(|_| rows == 1 && self.use_step);
        if let Some(step) = step {
            let buffers = StepBuffers {
                x,
                caches: p.caches,
                pos: p.pos,
                caps: p.caps,
            };
            step.launch(dev, self.use_pdl, &buffers)?;
        }
        let layers = if step.is_some() {
            &w.layers[..0]
        } else {
            &w.layers[..]
        };
        for (l, lw) in layers.iter().enumerate() {
            let qkv = Epilogue::Qkv {
                bias: lw.qkv.b.ptr(dev),
                q_bias: lw.q_bias_scaled.ptr(dev),
                half_bias: lw.qkv_half_bias.as_ref().map_or(0, |b| b.ptr(dev)),
                q,
                layer: l as i32,
                scale: cfg.attention_scale(l),
            };
            self.layernorm(p, &lw.ln_1, rows, 0)?;
            self.gemm(p, p.h, rows, &lw.qkv.w, Some(&lw.attn_out.w), qkv)?;
            self.attention(p, l)?;
            let back = |bias: &crate::weights::DeviceVec| Epilogue::Residual {
                bias: bias.ptr(dev),
                x,
            };
            let attn_out = back(&lw.attn_out.b);
            self.gemm(p, att, rows, &lw.attn_out.w, Some(&lw.mlp_in.w), attn_out)?;
            let mlp_act = Epilogue::Act {
                bias: lw.mlp_in.b.ptr(dev),
                half_bias: lw.mlp_in_half_bias.as_ref().map_or(0, |b| b.ptr(dev)),
                out: m,
                act,
            };
            self.layernorm(p, &lw.ln_2, rows, 0)?;
            self.gemm(p, p.h, rows, &lw.mlp_in.w, Some(&lw.mlp_out.w), mlp_act)?;
            let mlp_out = back(&lw.mlp_out.b);
            let after = match w.layers.get(l + 1) {
                Some(next) => &next.qkv.w,
                None => w.lm_head(),
            };
            let after = (p.wanted > 0 || l + 1 < layers.len()).then_some(after);
            self.gemm(p, m, rows, &lw.mlp_out.w, after, mlp_out)?;
        }

        // The final norm of the wanted rows only, the head, and the picks.
        if p.wanted > 0 {
            let head = Epilogue::Plain {
                out: p.logits,
                first_pick: p.wanted - p.picks,
            };
            self.layernorm(p, &w.ln_f, p.wanted, p.wanted_rows)?;
            self.gemm(p, p.h, p.wanted, w.lm_head(), None, head)?;
        }
        if p.filtered > 0 {
            let full = p.wanted - p.picks - p.filtered;
            let after = |base: u64, size: u64| base + p.picks as u64 * size;
            self.launch(
                &k.pick_filtered,
                LaunchConfig {
                    grid_dim: (p.filtered as u32, 1, 1),
                    block_dim: (1024, 1, 1),
                    shared_mem_bytes: 0,
                },
                &[
                    Arg::Ptr(p.logits),
                    Arg::Int(full as i32),
                    Arg::Int(cfg.vocab_size as i32),
                    Arg::Ptr(after(p.ids, 8)),
                    Arg::Ptr(after(p.pick_inv_t, 4)),
                    Arg::Ptr(after(p.pick_seeds, 8)),
                    Arg::Ptr(after(p.pick_top_k, 4)),
                    Arg::Ptr(after(p.pick_top_p, 4)),
                ],
            )?;
        }
        Ok(())
    }

    /// Captures [`Self::enqueue`] of `p` into a CUDA graph.
    fn capture(&self, p: &Pass) -> Result<CudaGraph> {
        let stream = &self.dev.stream;
        stream
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(device_err("starting a CUDA graph capture"))?;
        let queued = self.enqueue(p);
        // End the capture whatever happened, so the stream is usable again.
        let graph = stream
            .end_capture(CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH);
        queued?;
        graph
            .map_err(device_err("capturing the decode step's CUDA graph"))?
            .ok_or_else(|| Error::Device("capturing the decode step gave an empty graph".into()))
    }

    /// Attention of layer `l` for every row of `p` into its `att`: prompt chunks on the
    /// tensor cores (or in groups of ATTENTION_GROUP rows); decode passes in attention_decode
    /// (a block per chunk of the cache, head and row), or, where it does not fit the model,
    /// one block per row and head, split along the cache when those are too few for the GPU.
    fn attention(&self, p: &Pass, l: usize) -> Result<()> {
        let cfg = &self.config;
        let k = &self.kernels;
        let mut args = vec![
            Arg::Ptr(p.q),
            Arg::Ptr(p.caches),
            Arg::Ptr(p.pos),
            Arg::Ptr(p.caps),
            Arg::Ptr(p.groups),
            Arg::Ptr(p.att),
            Arg::Int(cfg.n_embd as i32),
        ];
        let grid = |splits: usize| (cfg.n_head as u32, p.n_groups as u32, splits as u32);
        if p.decode_chunk > 0 {
            // Block (chunk, head, row); p.splits chunks of p.decode_chunk positions cover the
            // whole context.
            let launch = LaunchConfig {
                grid_dim: (p.splits as u32, cfg.n_head as u32, p.rows as u32),
                block_dim: (DECODE_THREADS, 1, 1),
                shared_mem_bytes: self.decode_attention_shared(p.decode_chunk) as u32,
            };
            let args = [
                Arg::Ptr(p.q),
                Arg::Ptr(p.caches),
                Arg::Ptr(p.pos),
                Arg::Ptr(p.caps),
                Arg::Ptr(p.att),
                Arg::Int(cfg.n_embd as i32),
                Arg::Int(cfg.n_head as i32),
                Arg::Int(l as i32),
                Arg::Int(cfg.n_layer as i32),
                Arg::Int(p.decode_chunk as i32),
                Arg::Ptr(p.split_part),
                Arg::Ptr(p.split_counts),
            ];
            return self.launch(&k.attention_decode, launch, &args);
        }
        let (kernel, launch) = match &k.attention_mma {
            Some(mma) if p.group == ATTENTION_MMA_ROWS && self.uses_attention_mma() => {
                args.extend([Arg::Int(l as i32), Arg::Int(cfg.n_layer as i32)]);
                let cfg = LaunchConfig {
                    grid_dim: grid(1),
                    block_dim: (256, 1, 1),
                    shared_mem_bytes: ATTENTION_MMA_SHARED,
                };
                (mma, cfg)
            }
            _ if p.splits > 1 => {
                // kernels.cu's chunk: at least 64 positions a block.
                let chunk_cap = cfg.n_positions.div_ceil(p.splits).max(64);
                args.extend([
                    Arg::Int(cfg.n_head as i32),
                    Arg::Int(l as i32),
                    Arg::Int(cfg.n_layer as i32),
                    Arg::Int(chunk_cap as i32),
                    Arg::Ptr(p.split_part),
                    Arg::Ptr(p.split_counts),
                ]);
                let shared = (cfg.head_dim() + chunk_cap + 8 * SPLIT_THREADS as usize) * 4;
                let cfg = LaunchConfig {
                    grid_dim: grid(p.splits),
                    block_dim: (SPLIT_THREADS, 1, 1),
                    shared_mem_bytes: shared as u32,
                };
                (&k.attention_split, cfg)
            }
            _ => {
                args.extend([
                    Arg::Int(cfg.n_head as i32),
                    Arg::Int(l as i32),
                    Arg::Int(cfg.n_layer as i32),
                    Arg::Int(cfg.n_positions as i32),
                ]);
                let cfg = LaunchConfig {
                    grid_dim: grid(1),
                    block_dim: (ATTENTION_THREADS, 1, 1),
                    shared_mem_bytes: attention_shared_bytes(cfg, p.group) as u32,
                };
                (&k.attention[usize::from(p.group > 1)], cfg)
            }
        };
        self.launch(kernel, launch, &args)
    }

    /// Blocks per row and head of a decode pass of `rows` rows: enough to give every
    /// multiprocessor two (at most MAX_SPLITS), or 1 when rows × heads already do that, the
    /// heads are too wide for the split kernel, or GPT2RS_CUDA_SPLIT=0 (for comparisons).
    fn attention_splits(&self, rows: usize) -> usize {
        let blocks = rows * self.config.n_head;
        if !self.use_split || self.config.head_dim() > SPLIT_THREADS as usize {
            return 1;
        }
        (2 * self.dev.sm_count)
            .div_ceil(blocks)
            .clamp(1, MAX_SPLITS)
    }

    /// Cache positions per block of kernels.cu's attention_decode, or 0 when that kernel does
    /// not take this model: 128 (64 in f32, whose pieces are twice as large). It needs head
    /// slices of whole 16-byte pieces and its shared memory within the default
    /// (GPT2RS_CUDA_DECODE_ATTENTION=0 keeps attention_split and the one-block-per-head
    /// kernel, for comparisons). Chunks and a grid sized by the pass's longest cache measured
    /// slower: each size is a graph of its own, captured again as the caches grow.
    fn decode_chunk(&self) -> usize {
        let (c, d) = (self.config.n_embd, self.config.head_dim());
        let v = 16 / self.precision.size();
        let fits = c % v == 0 && d % v == 0 && d / v <= DECODE_THREADS as usize;
        let chunk = if self.precision == Precision::F32 {
            64
        } else {
            128
        };
        let usable = self.use_decode_attention
            && fits
            && self.decode_attention_shared(chunk) <= DEFAULT_SHARED_BYTES;
        if usable {
            chunk
        } else {
            0
        }
    }

    /// The shared memory of kernels.cu's attention_decode with chunks of `chunk` positions.
    fn decode_attention_shared(&self, chunk: usize) -> usize {
        let d = self.config.head_dim();
        let pieces = d / (16 / self.precision.size());
        let groups = DECODE_THREADS as usize / pieces.max(1);
        2 * chunk * (pieces + 1) * 16 + (d + chunk + groups * d) * 4
    }

    /// Whether prompt chunks' attention runs on the tensor cores (kernels.cu's attention_mma;
    /// GPT2RS_CUDA_ATTENTION_MMA=0 keeps them on the grouped kernel, for comparisons).
    fn uses_attention_mma(&self) -> bool {
        self.use_attention_mma
    }

    /// A scratch buffer of at least `bytes`, by name.
    fn scratch(&mut self, name: &'static str, bytes: usize) -> Result<u64> {
        self.scratch_buffer(name, bytes, false)
    }

    /// A scratch buffer of at least `bytes` that starts as zeros (what the kernels leave it
    /// as after each pass).
    fn zeroed_scratch(&mut self, name: &'static str, bytes: usize) -> Result<u64> {
        self.scratch_buffer(name, bytes, true)
    }

    fn scratch_buffer(&mut self, name: &'static str, bytes: usize, zeroed: bool) -> Result<u64> {
        let buf = self.scratch.bufs.get(name);
        if buf.is_none_or(|b| b.len() < bytes) {
            // Graphs captured earlier point at the old buffer.
            self.graphs.clear();
            let err = device_err("allocating GPU scratch memory");
            let fresh = if zeroed {
                self.dev
                    .stream
                    .alloc_zeros::<u8>(bytes.max(1))
                    .map_err(err)?
            } else {
                // SAFETY: such scratch is written before it is read in every pass.
                unsafe { self.dev.stream.alloc::<u8>(bytes.max(1)) }.map_err(err)?
            };
            self.scratch.bufs.insert(name, fresh);
        }
        Ok(self.scratch.bufs[name].device_ptr(&self.dev.stream).0)
    }

    /// Copies `bytes` into scratch buffer `name`.
    fn upload(&mut self, name: &'static str, bytes: &[u8]) -> Result<u64> {
        let ptr = self.scratch(name, bytes.len())?;
        if !bytes.is_empty() {
            let buf = self.scratch.bufs.get_mut(name).expect("just made");
            self.dev
                .stream
                .memcpy_htod(bytes, &mut buf.slice_mut(..bytes.len()))
                .map_err(device_err("copying a batch to the GPU"))?;
        }
        Ok(ptr)
    }

    /// Checks a batch before anything changes (like the CPU engine), then gives every
    /// sequence in it a cache, failing with the numbers if GPU memory runs out.
    fn prepare(&mut self, batch: &[BatchEntry<'_>]) -> Result<()> {
        let cfg = &self.config;
        let mut seen = HashSet::new();
        for e in batch {
            let seq = self
                .seqs
                .get(&e.seq)
                .ok_or_else(|| Error::invalid(format!("unknown sequence {:?}", e.seq)))?;
            if !seen.insert(e.seq) {
                return Err(Error::invalid(format!(
                    "sequence {:?} appears twice in one batch",
                    e.seq
                )));
            }
            if e.tokens.is_empty() && e.logits != LogitsFor::Nothing {
                return Err(Error::invalid(
                    "a batch entry with no tokens cannot ask for logits",
                ));
            }
            if let Some(&bad) = e.tokens.iter().find(|&&t| t as usize >= cfg.vocab_size) {
                return Err(Error::invalid(format!(
                    "token id {bad} is outside the vocabulary (size {})",
                    cfg.vocab_size
                )));
            }
            let total = seq.len + e.tokens.len();
            if total > cfg.n_positions {
                return Err(Error::ContextOverflow(format!(
                    "sequence would hold {total} tokens ({} cached + {} new), but the model's \
                     context is {} tokens",
                    seq.len,
                    e.tokens.len(),
                    cfg.n_positions
                )));
            }
        }
        // Caches that must grow for this batch, to whole blocks of positions.
        let growth: Vec<(SeqId, usize)> = batch
            .iter()
            .filter_map(|e| {
                let s = &self.seqs[&e.seq];
                let need = s.len + e.tokens.len();
                (need > s.cap).then(|| {
                    let cap = need
                        .next_multiple_of(CACHE_BLOCK_TOKENS)
                        .min(cfg.n_positions);
                    (e.seq, cap)
                })
            })
            .collect();
        let bytes = |cap: usize| cache_bytes_for(cfg, self.precision, cap);
        let needed: u64 = growth.iter().map(|&(_, cap)| bytes(cap)).sum();
        if needed > 0 {
            let (mut free, _) = self.dev.memory()?;
            if needed > free && !self.spare.is_empty() {
                // The spare caches go back to the driver before anything fails for lack of room.
                self.spare.clear();
                free = self.dev.memory()?.0;
            }
            if needed > free {
                return Err(Error::OutOfMemory {
                    what: format!(
                        "the KV caches of this batch on GPU cuda:{} ({} sequence(s) growing)",
                        self.dev.ordinal,
                        growth.len()
                    ),
                    needed: Bytes(needed),
                    available: Bytes(free),
                });
            }
        }
        for (seq, cap) in growth {
            self.grow_cache(seq, cap)?;
        }
        Ok(())
    }

    /// Moves a sequence's cache into one with room for `cap` positions, keeping what it holds.
    fn grow_cache(&mut self, seq: SeqId, cap: usize) -> Result<()> {
        let cfg = &self.config;
        let row = cfg.n_embd * self.precision.size();
        // A spare cache of this capacity, else a new one. Neither needs clearing: attention
        // reads only the positions a pass has written.
        let cache = match self.spare.iter().position(|(c, _)| *c == cap) {
            Some(i) => self.spare.swap_remove(i).1,
            None => self
                .dev
                .stream
                .alloc_zeros::<u8>(cache_bytes_for(cfg, self.precision, cap) as usize)
                .map_err(device_err("allocating a KV cache"))?,
        };
        let s = &self.seqs[&seq];
        if let (Some(old), true) = (&s.cache, s.len > 0) {
            // Keys then values, each n_layer runs of `len` positions, from the old stride to
            // the new one: one 2D copy (a copy per run costs ~4 µs of host time each, 3,072 of
            // them when 32 gpt2-xl sequences grow in one step).
            let stream = &self.dev.stream;
            self.dev
                .ctx
                .bind_to_thread()
                .map_err(device_err("growing a KV cache"))?;
            let copy = CUDA_MEMCPY2D {
                srcXInBytes: 0,
                srcY: 0,
                srcMemoryType: CUmemorytype::CU_MEMORYTYPE_DEVICE,
                srcHost: std::ptr::null(),
                srcDevice: old.device_ptr(stream).0,
                srcArray: std::ptr::null_mut(),
                srcPitch: s.cap * row,
                dstXInBytes: 0,
                dstY: 0,
                dstMemoryType: CUmemorytype::CU_MEMORYTYPE_DEVICE,
                dstHost: std::ptr::null_mut(),
                dstDevice: cache.device_ptr(stream).0,
                dstArray: std::ptr::null_mut(),
                dstPitch: cap * row,
                WidthInBytes: s.len * row,
                Height: 2 * cfg.n_layer,
            };
            // SAFETY: both buffers hold 2 · n_layer runs at their pitch, and len ≤ both caps.
            unsafe { cuMemcpy2DAsync_v2(&copy, stream.cu_stream()) }
                .result()
                .map_err(device_err("growing a KV cache"))?;
        }
        let s = self.seqs.get_mut(&seq).expect("checked");
        let old = s.cache.replace(cache);
        let old_cap = std::mem::replace(&mut s.cap, cap);
        if let Some(old) = old {
            self.keep_spare(old_cap, old);
        }
        Ok(())
    }

    /// Keeps a cache no sequence holds any more for a later one (up to SPARE_CACHES of them
    /// and SPARE_BYTES in all; the oldest go first).
    fn keep_spare(&mut self, cap: usize, cache: CudaSlice<u8>) {
        self.spare.push((cap, cache));
        let mut total: usize = self.spare.iter().map(|(_, c)| c.len()).sum();
        while self.spare.len() > SPARE_CACHES || total > SPARE_BYTES {
            total -= self.spare.remove(0).1.len();
        }
    }
}

/// Warps sharing each weight row in the matrix-vector kernels (1, 2, 4 or 8): as many as keep
/// the whole grid resident at once (`resident` warps: a second wave would pay the memory
/// latency again for little work), each still with at least one 16-byte piece per lane of its
/// share of the row.
fn warps_per_row(rows: usize, row_bytes: usize, resident: usize) -> usize {
    let pieces = row_bytes / (32 * 16);
    let mut wpr = 1;
    while wpr < 8 && rows * wpr * 2 <= resident && pieces >= 2 * wpr {
        wpr *= 2;
    }
    wpr
}

/// How much of the next matrix the matrix-vector kernels start into L2: measured on an H200
/// with gpt2-xl's products alone (scripts/device/gemv_chain.cu; docs/benchmarks.md,
/// thirteenth session), 1-3 MB did equally well and 6 MB less.
const L2_NEXT_DEFAULT: usize = 2 << 20;

/// GPT2RS_CUDA_L2_NEXT_KB (0 for none, for comparisons); none before sm_90, which has no
/// bulk prefetch.
fn l2_next_setting(major: i32) -> usize {
    l2_next_bytes(
        major,
        std::env::var("GPT2RS_CUDA_L2_NEXT_KB").ok().as_deref(),
    )
}

/// [`l2_next_setting`] for a setting of `kb` (at most 64 MB; unparsable means the default).
fn l2_next_bytes(major: i32, kb: Option<&str>) -> usize {
    if major < 9 {
        return 0;
    }
    kb.and_then(|v| v.trim().parse::<usize>().ok())
        .map_or(L2_NEXT_DEFAULT, |kb| kb.min(64 << 10) << 10)
}

/// Bytes of the per-pass inputs per row of scratch (see `forward`).
const META_BYTES_PER_ROW: usize = 52;

/// Shared memory of the attention kernel with `group` query rows per block.
fn attention_shared_bytes(c: &Gpt2Config, group: usize) -> usize {
    (group * c.n_positions + 8 * ATTENTION_THREADS as usize + 32 + group * c.head_dim()) * 4
}

/// GPU memory an engine needs, by what it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryNeeded {
    pub weights: u64,
    /// Every sequence's cache at its largest (the whole context).
    pub kv_cache: u64,
    /// Activations of the largest pass, the logits, the cuBLAS workspace.
    pub scratch: u64,
}

impl MemoryNeeded {
    pub fn total(&self) -> u64 {
        self.weights + self.kv_cache + self.scratch
    }
}

/// Bytes of one sequence's KV cache in `p` when full: keys and values of every layer and position.
fn cache_bytes(c: &Gpt2Config, p: Precision) -> u64 {
    cache_bytes_for(c, p, c.n_positions)
}

/// Bytes of a KV cache with room for `positions`.
fn cache_bytes_for(c: &Gpt2Config, p: Precision, positions: usize) -> u64 {
    (2 * c.n_layer * positions * c.n_embd * p.size()) as u64
}

impl Engine for GpuEngine {
    fn config(&self) -> &Gpt2Config {
        &self.config
    }

    fn describe(&self) -> String {
        let weights = self.format.label();
        let acts = self.precision.suffix();
        let what = if weights == acts {
            weights
        } else {
            format!("{weights} weights, {acts} activations")
        };
        format!("cuda:{} {what} ({})", self.dev.ordinal, self.dev.name)
    }

    fn add_sequence(&mut self) -> SeqId {
        let id = SeqId(self.next_id);
        self.next_id += 1;
        self.seqs.insert(
            id,
            Seq {
                len: 0,
                cap: 0,
                cache: None,
            },
        );
        id
    }

    fn fork_sequence(&mut self, parent: SeqId) -> Result<SeqId> {
        let p = self
            .seqs
            .get(&parent)
            .ok_or_else(|| Error::invalid(format!("unknown sequence {parent:?}")))?;
        let cache = match &p.cache {
            Some(src) => Some(
                self.dev
                    .stream
                    .clone_dtod(src)
                    .map_err(device_err("copying a KV cache"))?,
            ),
            None => None,
        };
        let (len, cap) = (p.len, p.cap);
        let id = SeqId(self.next_id);
        self.next_id += 1;
        self.seqs.insert(id, Seq { len, cap, cache });
        Ok(id)
    }

    fn remove_sequence(&mut self, seq: SeqId) {
        if let Some(Seq {
            cap,
            cache: Some(cache),
            ..
        }) = self.seqs.remove(&seq)
        {
            self.keep_spare(cap, cache);
        }
    }

    fn sequence_len(&self, seq: SeqId) -> Option<usize> {
        self.seqs.get(&seq).map(|s| s.len)
    }

    /// Grows the scratch buffers for the longest pass and the most rows of logits first
    /// (growing them later would drop every graph), then captures the decode graph of every
    /// batch size up to `max_batch`, each row picking its token on the GPU (what plain
    /// sampling and greedy requests run).
    fn warm_up(&mut self, max_batch: usize, max_step_tokens: usize) -> Result<()> {
        let n_pos = self.config.n_positions;
        let max_batch = max_batch.clamp(1, MAX_GRAPH_ROWS);
        let longest = max_step_tokens.max(max_batch);
        self.plan_fused_products(longest)?;
        let tokens = vec![0u32; longest];
        let seqs: Vec<SeqId> = (0..longest.div_ceil(n_pos))
            .map(|_| self.add_sequence())
            .collect();
        let result = (|| -> Result<()> {
            let chunks: Vec<BatchEntry> = tokens
                .chunks(n_pos)
                .zip(&seqs)
                .map(|(t, &seq)| BatchEntry {
                    seq,
                    tokens: t,
                    logits: LogitsFor::Nothing,
                })
                .collect();
            self.forward(&chunks)?;
            for &s in &seqs {
                self.remove_sequence(s);
            }
            let fresh: Vec<SeqId> = (0..max_batch).map(|_| self.add_sequence()).collect();
            let rows = |n: usize, logits: LogitsFor| -> Vec<BatchEntry> {
                fresh[..n]
                    .iter()
                    .map(|&seq| BatchEntry {
                        seq,
                        tokens: &tokens[..1],
                        logits,
                    })
                    .collect()
            };
            // Logits (and pick keys) for max_batch rows, then a graph per batch size.
            self.forward(&rows(max_batch, LogitsFor::Last))?;
            let pick = LogitsFor::Pick(PickRule::Greedy);
            for n in 1..=max_batch.min(n_pos - 1) {
                self.forward(&rows(n, pick))?;
            }
            for s in fresh {
                self.remove_sequence(s);
            }
            Ok(())
        })();
        for s in seqs {
            self.remove_sequence(s);
        }
        result
    }

    fn forward(&mut self, batch: &[BatchEntry<'_>]) -> Result<Logits> {
        self.prepare(batch)?;
        let cfg = self.config.clone();
        let (c, v, inner) = (cfg.n_embd, cfg.vocab_size, cfg.n_inner);
        let es = self.precision.size();

        // Per row: token, position, its sequence's cache; and the rows whose logits are wanted.
        let (mut tokens, mut pos, mut caches, mut caps) = (vec![], vec![], vec![], vec![]);
        let (mut wanted, mut per_entry) = (vec![], vec![]);
        // Rows picked on the GPU, after the rows whose logits come back: (entry, row).
        let mut picked = vec![];
        for (entry, e) in batch.iter().enumerate() {
            let s = &self.seqs[&e.seq];
            let cache = s
                .cache
                .as_ref()
                .map_or(0, |b| b.device_ptr(&self.dev.stream).0);
            let first = tokens.len() as i32;
            for (i, &t) in e.tokens.iter().enumerate() {
                tokens.push(t as i32);
                pos.push((s.len + i) as i32);
                caches.push(cache);
                caps.push(s.cap as i32);
            }
            let n = e.tokens.len() as i32;
            let range = match e.logits {
                LogitsFor::Nothing => first..first,
                LogitsFor::Last => first + n - 1..first + n,
                LogitsFor::All => first..first + n,
                LogitsFor::Pick(rule) => {
                    picked.push((entry, first + n - 1, rule));
                    first..first
                }
            };
            per_entry.push(range.len());
            wanted.extend(range);
        }
        let full = wanted.len();
        // Plain picks (greedy, temperature) happen in the LM head's kernel; those with top-k /
        // top-p need their logits rows first. Picks are numbered plain first, then filtered;
        // rows are the full ones, then the filtered, then the plain.
        let (plain, filtered): (Vec<_>, Vec<_>) =
            picked.iter().partition(|&&(_, _, rule)| !rule.filters(v));
        wanted.extend(filtered.iter().map(|&&(_, row, _)| row));
        wanted.extend(plain.iter().map(|&&(_, row, _)| row));
        let (n_plain, n_filtered) = (plain.len(), filtered.len());
        let picked: Vec<(usize, i32, PickRule)> =
            plain.into_iter().chain(filtered).copied().collect();
        // Per pick: 1 / temperature (0: greedy), the noise seed, top-k and top-p (see PickRule).
        let mut pick_inv_t = vec![];
        let mut pick_seeds = vec![];
        let mut pick_top_k = vec![];
        let mut pick_top_p = vec![];
        for &(_, _, rule) in &picked {
            let (inv_t, seed, top_k, top_p) = match rule {
                PickRule::Greedy => (0.0, 0, 0, 1.0),
                PickRule::Sample {
                    temperature,
                    noise_seed,
                    top_k,
                    top_p,
                } => (
                    1.0 / temperature,
                    noise_seed,
                    top_k.min(i32::MAX as u32) as i32,
                    top_p,
                ),
            };
            pick_inv_t.push(inv_t);
            pick_seeds.push(seed);
            pick_top_k.push(top_k);
            pick_top_p.push(top_p);
        }
        let rows = tokens.len();
        if rows == 0 {
            return Ok(Logits::new(v, vec![], &per_entry));
        }
        // Scratch is sized for a power of two of rows, so decode batches keep their buffers
        // (and the CUDA graphs that point into them) from step to step.
        let cap = rows.next_power_of_two().max(64);
        let wcap = wanted.len().next_power_of_two();
        // Attention's groups of query rows: consecutive rows of one entry. When the pass
        // carries a prompt chunk, up to ATTENTION_MMA_ROWS of them on the tensor cores, or
        // ATTENTION_GROUP (when they fit in shared memory); else one each.
        let chunked = batch.iter().any(|e| e.tokens.len() > 1);
        let group = if !chunked {
            1
        } else if self.uses_attention_mma() {
            ATTENTION_MMA_ROWS
        } else if attention_shared_bytes(&cfg, ATTENTION_GROUP) <= DEFAULT_SHARED_BYTES {
            ATTENTION_GROUP
        } else {
            1
        };
        // Decode passes: attention_decode's chunks of the whole context (a graph replays one
        // grid), or attention_split's blocks per row and head.
        let decode_chunk = if group == 1 { self.decode_chunk() } else { 0 };
        let splits = if group > 1 {
            1
        } else if decode_chunk > 0 {
            cfg.n_positions.div_ceil(decode_chunk)
        } else {
            self.attention_splits(rows)
        };
        let mut groups: Vec<i32> = vec![];
        let mut row = 0;
        for e in batch {
            for chunk in (0..e.tokens.len()).step_by(group) {
                let count = group.min(e.tokens.len() - chunk);
                groups.extend([(row + chunk) as i32, count as i32]);
            }
            row += e.tokens.len();
        }
        if group > 1 {
            // Longest groups first (the most keys: a prompt's last rows), so none of them
            // starts late, behind blocks that finish quickly.
            let mut pairs: Vec<[i32; 2]> = groups.chunks_exact(2).map(|g| [g[0], g[1]]).collect();
            pairs.sort_by_key(|g| std::cmp::Reverse(pos[(g[0] + g[1] - 1) as usize]));
            groups = pairs.concat();
        }
        // The per-row inputs in one copy: caches and pick seeds (u64), then tokens, positions,
        // wanted rows, cache capacities (i32), picks' 1 / temperature (f32), top-k (i32) and
        // top-p (f32), and attention's groups (two i32 each, at most one per row).
        let mut packed = vec![0u8; cap * META_BYTES_PER_ROW];
        let (longs, ints) = packed.split_at_mut(cap * 16);
        for (part, values) in longs.chunks_exact_mut(cap * 8).zip([&caches, &pick_seeds]) {
            for (dst, v) in part.chunks_exact_mut(8).zip(values) {
                dst.copy_from_slice(&v.to_ne_bytes());
            }
        }
        let inv_t_bits: Vec<i32> = pick_inv_t.iter().map(|v| v.to_bits() as i32).collect();
        let top_p_bits: Vec<i32> = pick_top_p.iter().map(|v| v.to_bits() as i32).collect();
        let (ints, group_bytes) = ints.split_at_mut(cap * 28);
        for (dst, v) in group_bytes.chunks_exact_mut(4).zip(&groups) {
            dst.copy_from_slice(&v.to_ne_bytes());
        }
        for (part, values) in ints.chunks_exact_mut(cap * 4).zip([
            &tokens,
            &pos,
            &wanted,
            &caps,
            &inv_t_bits,
            &pick_top_k,
            &top_p_bits,
        ]) {
            for (dst, v) in part.chunks_exact_mut(4).zip(values) {
                dst.copy_from_slice(&v.to_ne_bytes());
            }
        }
        let meta = self.upload("meta", &packed)?;
        let mut with_rows = batch.iter().filter(|e| !e.tokens.is_empty());
        let one_sequence = match (with_rows.next(), with_rows.next()) {
            (Some(e), None) => {
                let s = &self.seqs[&e.seq];
                let cache = s.cache.as_ref().map(|b| b.device_ptr(&self.dev.stream).0);
                cache.map(|cache| (cache, s.cap, s.len))
            }
            _ => None,
        };
        let p = Pass {
            rows,
            wanted: wanted.len(),
            picks: n_plain,
            filtered: n_filtered,
            pick_top_k: meta + (cap * 36) as u64,
            pick_top_p: meta + (cap * 40) as u64,
            ids: self.scratch("ids", wcap * 8)?,
            caches: meta,
            pick_seeds: meta + (cap * 8) as u64,
            tokens: meta + (cap * 16) as u64,
            pos: meta + (cap * 20) as u64,
            wanted_rows: meta + (cap * 24) as u64,
            caps: meta + (cap * 28) as u64,
            pick_inv_t: meta + (cap * 32) as u64,
            groups: meta + (cap * 44) as u64,
            n_groups: groups.len() / 2,
            group,
            splits,
            decode_chunk,
            split_part: self.scratch(
                "split_part",
                cap * cfg.n_head * splits * (cfg.head_dim() + 2) * 4,
            )?,
            split_counts: self.zeroed_scratch("split_counts", cap * cfg.n_head * 4)?,
            tc_part: self.scratch("tc_part", self.kernels.tc_split_needs().1 * 4)?,
            tc_counts: self.zeroed_scratch("tc_counts", self.kernels.tc_split_needs().0 * 4)?,
            x: self.scratch("x", cap * c * 4)?,
            h: self.scratch("h", cap * c * es)?,
            q: self.scratch("q", cap * c * 4)?,
            att: self.scratch("att", cap * c * es)?,
            product: self.scratch("product", cap * (3 * c).max(inner) * 4)?,
            dequantized: if self.w.has_quantized() && rows > GEMV_MAX_ROWS {
                self.scratch("dequantized", DeviceModel::largest_matrix(&cfg) * es)?
            } else {
                0
            },
            m: self.scratch("m", cap * inner * es)?,
            logits: self.scratch("logits", wcap * logits_stride(v) * 4)?,
            one_sequence,
        };
        // Decode steps (one token per sequence) replay a CUDA graph of the whole pass, captured
        // the first time this batch shape is seen: one launch instead of ~10 per layer.
        let decode = batch.iter().all(|e| e.tokens.len() == 1);
        if decode && self.use_graphs && rows <= MAX_GRAPH_ROWS {
            let key = (rows, wanted.len(), n_plain, n_filtered);
            if !self.graphs.contains_key(&key) {
                let graph = self.capture(&p)?;
                self.graphs.insert(key, graph);
            }
            self.graphs[&key]
                .launch()
                .map_err(device_err("replaying the decode step's CUDA graph"))?;
        } else {
            self.enqueue(&p)?;
        }

        let mut picks = vec![None; batch.len()];
        if !picked.is_empty() {
            let mut keys = vec![0u64; picked.len()];
            let buf = &self.scratch.bufs["ids"];
            self.dev
                .stream
                .memcpy_dtoh(&buf.slice(..keys.len() * 8), key_bytes(&mut keys))
                .map_err(device_err("copying picked tokens from the GPU"))?;
            for (&(entry, _, _), &key) in picked.iter().zip(&keys) {
                // The low half holds the token's bits inverted (see pick_key in kernels.cu).
                picks[entry] = Some(!(key as u32));
            }
        }
        let mut logits = Vec::new();
        if full > 0 {
            // Through page-locked memory: a batch of 64 brings back 13 MB of logits a step,
            // which pageable memory copies at a third of the speed.
            let stride = logits_stride(v);
            let bytes = full * stride * 4;
            if self
                .pinned
                .as_ref()
                .is_none_or(|p| p.len() < wcap * stride * 4)
            {
                // SAFETY: the buffer is only read after the copy below has filled it.
                let p = unsafe { self.dev.ctx.alloc_pinned::<u8>(wcap * stride * 4) }
                    .map_err(device_err("allocating page-locked memory for logits"))?;
                self.pinned = Some(p);
            }
            let pinned = self.pinned.as_mut().expect("allocated above");
            let buf = &self.scratch.bufs["logits"];
            let host = &mut pinned
                .as_mut_slice()
                .map_err(device_err("reading page-locked memory"))?[..bytes];
            self.dev
                .stream
                .memcpy_dtoh(&buf.slice(..bytes), host)
                .map_err(device_err("copying logits from the GPU"))?;
            // Into page-locked memory the copy is truly asynchronous: wait for it.
            self.dev
                .stream
                .synchronize()
                .map_err(device_err("copying logits from the GPU"))?;
            // SAFETY: page-locked memory is page-aligned, `host` holds `full * stride` f32
            // values, and every byte pattern is a valid f32.
            let src =
                unsafe { std::slice::from_raw_parts(host.as_ptr() as *const f32, full * stride) };
            // In parallel (64 rows of logits are 13 MB, over a millisecond for one thread),
            // leaving each row's padding behind.
            logits = vec![0f32; full * v];
            logits
                .par_chunks_mut(v)
                .zip(src.par_chunks(stride))
                .for_each(|(d, s)| d.copy_from_slice(&s[..v]));
        } else {
            self.dev
                .stream
                .synchronize()
                .map_err(device_err("running the forward pass"))?;
        }
        for e in batch {
            self.seqs.get_mut(&e.seq).expect("validated").len += e.tokens.len();
        }
        Ok(Logits::new(v, logits, &per_entry).with_picks(picks))
    }
}

/// kernels.cu's number for an activation (its `activate`).
pub(crate) fn activation_code(a: Activation) -> i32 {
    match a {
        Activation::GeluTanh => 0,
        Activation::GeluErf => 1,
        Activation::Relu => 2,
    }
}

/// Floats between the starts of two logits rows on the GPU: the vocabulary padded to 32 bytes,
/// so cuBLAS's LM head has aligned rows to write (kernels.cu's logits_stride is the same).
fn logits_stride(vocab: usize) -> usize {
    vocab.next_multiple_of(8)
}

/// The bytes of `keys`, for a copy from the GPU.
fn key_bytes(keys: &mut [u64]) -> &mut [u8] {
    // SAFETY: u64 has no padding and every byte pattern is a valid u64.
    unsafe { std::slice::from_raw_parts_mut(keys.as_mut_ptr() as *mut u8, keys.len() * 8) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_l2_hand_on_is_read_in_kilobytes_and_off_before_hopper() {
        assert_eq!(l2_next_bytes(9, None), L2_NEXT_DEFAULT);
        assert_eq!(l2_next_bytes(9, Some("0")), 0);
        assert_eq!(l2_next_bytes(9, Some(" 1024 ")), 1 << 20);
        assert_eq!(l2_next_bytes(9, Some("10000000")), 64 << 20);
        assert_eq!(l2_next_bytes(9, Some("lots")), L2_NEXT_DEFAULT);
        assert_eq!(l2_next_bytes(8, Some("1024")), 0);
    }
}
