//! [`CudaEngine`]: GPT-2's forward pass on one GPU, behind the same [`Engine`] interface as the
//! CPU backend (ragged batches, a KV cache per sequence).
//!
//! One pass, per layer: layer norm (fused with the previous residual add) → QKV GEMM → bias,
//! K/V into each row's sequence cache → attention over the cache → output GEMM → residual +
//! layer norm → MLP GEMM → bias + GELU → MLP GEMM. GEMMs are cuBLAS (inputs in the weights'
//! precision, f32 accumulation and output); the rest are the kernels of `kernels.cu`.

use crate::device::{device_err, Device, CUBLAS_WORKSPACE};
use crate::weights::{DeviceMatrix, DeviceModel, Precision};
use cudarc::cublas::sys::{
    cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType_t,
};
use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::{CudaFunction, CudaGraph, CudaSlice, DevicePtr, LaunchConfig, PushKernelArg};
use gpt2rs::config::{Activation, Gpt2Config};
use gpt2rs::engine::{BatchEntry, Engine, Logits, LogitsFor, SeqId};
use gpt2rs::memory::Bytes;
use gpt2rs::quant::DType;
use gpt2rs::weights::ModelWeights;
use gpt2rs::{Error, Result};
use rayon::prelude::*;
use std::collections::{HashMap, HashSet};
use std::ffi::c_void;

/// Threads per block of the row-wise kernels.
const ROW_THREADS: u32 = 256;
/// Threads per block of the attention kernel (one block per row and head).
const ATTENTION_THREADS: u32 = 256;
/// Up to this many rows, matrix products run as our matrix-vector kernels (each weight read
/// once for all rows); more go to cuBLAS.
const GEMV_MAX_ROWS: usize = 8;
/// Decode batches up to this many sequences run as CUDA graphs.
const MAX_GRAPH_ROWS: usize = 256;

/// What follows a matrix product in the MLP: `out = act(product + bias)` in the model's
/// precision (act: 0 gelu-tanh, 1 gelu-erf, 2 relu).
#[derive(Clone, Copy)]
struct Epilogue {
    bias: u64,
    out: u64,
    act: i32,
}

/// Device addresses of one pass's inputs and scratch buffers, and its sizes.
struct Pass {
    rows: usize,
    wanted: usize,
    tokens: u64,
    pos: u64,
    caches: u64,
    /// Per row, the positions its sequence's cache has room for.
    caps: u64,
    wanted_rows: u64,
    x: u64,
    h: u64,
    qkv: u64,
    q: u64,
    att: u64,
    y: u64,
    m32: u64,
    m: u64,
    logits: u64,
}

/// A kernel argument.
#[derive(Clone, Copy)]
enum Arg {
    Ptr(u64),
    Int(i32),
    Long(u64),
    Float(f32),
}

struct Kernels {
    /// `gemv[r - 1]`: the matrix-vector kernel for r rows.
    gemv: Vec<CudaFunction>,
    embed: CudaFunction,
    add_layernorm: CudaFunction,
    qkv_store: CudaFunction,
    attention: CudaFunction,
    bias_act: CudaFunction,
}

impl Kernels {
    fn load(dev: &Device, p: Precision) -> Result<Self> {
        let f = |name: &str| dev.function(&format!("{name}_{}", p.suffix()));
        Ok(Self {
            gemv: (1..=GEMV_MAX_ROWS)
                .map(|r| f(&format!("gemv{r}")))
                .collect::<Result<_>>()?,
            embed: f("embed")?,
            add_layernorm: f("add_layernorm")?,
            qkv_store: f("qkv_store")?,
            attention: f("attention")?,
            bias_act: f("bias_act")?,
        })
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

/// Device buffers reused by every pass, grown to the largest batch seen.
#[derive(Default)]
struct Scratch {
    bufs: HashMap<&'static str, CudaSlice<u8>>,
}

/// GPT-2 on an NVIDIA GPU.
pub struct CudaEngine {
    dev: Device,
    kernels: Kernels,
    w: DeviceModel,
    config: Gpt2Config,
    precision: Precision,
    seqs: HashMap<SeqId, Seq>,
    next_id: u64,
    scratch: Scratch,
    /// Captured decode steps by (rows, rows with logits); they point into `scratch`.
    graphs: HashMap<(usize, usize), CudaGraph>,
    use_graphs: bool,
    /// Page-locked host memory the logits come back through, grown as needed.
    pinned: Option<cudarc::driver::PinnedHostSlice<u8>>,
}

impl CudaEngine {
    /// Opens GPU `ordinal` and copies `weights` onto it; fails with the numbers when they do
    /// not fit, and plainly when there is no GPU or the precision is not supported here.
    pub fn new(weights: &ModelWeights, ordinal: usize) -> Result<Self> {
        let precision = Precision::for_dtype(weights.format.dtype)?;
        let dev = Device::open(ordinal)?;
        let needed = DeviceModel::bytes(weights, precision);
        let (free, _) = dev.memory()?;
        if needed > free {
            return Err(Error::OutOfMemory {
                what: format!("the weights on GPU cuda:{ordinal} ({})", dev.name),
                needed: Bytes(needed),
                available: Bytes(free),
            });
        }
        let kernels = Kernels::load(&dev, precision)?;
        let w = DeviceModel::upload(&dev, weights, precision)?;
        Ok(Self {
            dev,
            kernels,
            w,
            config: weights.config.clone(),
            precision,
            seqs: HashMap::new(),
            next_id: 0,
            scratch: Scratch::default(),
            graphs: HashMap::new(),
            // GPT2RS_CUDA_GRAPHS=0 launches every kernel of every step (for comparisons).
            use_graphs: std::env::var("GPT2RS_CUDA_GRAPHS").map_or(true, |v| v != "0"),
            pinned: None,
        })
    }

    /// Bytes of one sequence's KV cache when it holds the whole context (caches grow in
    /// blocks of 64 positions up to this).
    pub fn cache_bytes_per_sequence(&self) -> u64 {
        cache_bytes(&self.config, self.precision)
    }

    /// The GPU memory an engine for `config` in `dtype` takes to run `sequences` sequences
    /// in passes of up to `rows` rows (tokens), before it is opened; an error when the
    /// backend does not run `dtype`. Mirrors what [`Self::new`], `prepare` and `forward`
    /// allocate, so bench can skip what does not fit instead of failing midway.
    pub fn memory_needed(
        config: &Gpt2Config,
        dtype: DType,
        sequences: usize,
        rows: usize,
    ) -> Result<MemoryNeeded> {
        let p = Precision::for_dtype(dtype)?;
        let (c, inner, es) = (config.n_embd, config.n_inner, p.size());
        let cap = rows.next_power_of_two().max(64);
        // x, h, qkv, q, att, y, m32, m: the scratch buffers of `forward`.
        let per_row = c * 4 + c * es + 3 * c * 4 + c * 4 + c * es + c * 4 + inner * 4 + inner * es;
        let logits = sequences.next_power_of_two() * config.vocab_size * 4;
        Ok(MemoryNeeded {
            weights: DeviceModel::bytes_for(config, !config.tie_word_embeddings, p),
            kv_cache: sequences as u64 * cache_bytes(config, p),
            scratch: (cap * per_row + cap * 20 + logits) as u64 + CUBLAS_WORKSPACE as u64,
        })
    }

    fn launch(&self, f: &CudaFunction, cfg: LaunchConfig, args: &[Arg]) -> Result<()> {
        let mut b = self.dev.stream.launch_builder(f);
        for a in args {
            match a {
                Arg::Ptr(v) | Arg::Long(v) => b.arg(v),
                Arg::Int(v) => b.arg(v),
                Arg::Float(v) => b.arg(v),
            };
        }
        // SAFETY: every launch below passes the argument list its kernel declares, with
        // buffers sized for the rows and widths it is given.
        unsafe { b.launch(cfg) }
            .map(|_| ())
            .map_err(device_err("launching a kernel"))
    }

    /// `out[rows, n]` (f32) = `x[rows, k]` · `wᵀ`, with `w` `[n, k]` row-major; with an
    /// epilogue, its `act(out + bias)` in the model's precision goes to the epilogue's buffer.
    fn gemm(
        &self,
        x: u64,
        rows: usize,
        w: &DeviceMatrix,
        out: u64,
        epilogue: Option<Epilogue>,
    ) -> Result<()> {
        let (n, k) = (w.rows as i32, w.cols as i32);
        if rows <= GEMV_MAX_ROWS {
            // One warp per weight row, 8 warps per block.
            let cfg = LaunchConfig {
                grid_dim: ((w.rows as u32).div_ceil(8), 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            let args = [
                Arg::Ptr(x),
                Arg::Ptr(w.ptr(&self.dev)),
                Arg::Ptr(out),
                Arg::Int(n),
                Arg::Int(k),
                Arg::Ptr(epilogue.map_or(0, |e| e.bias)),
                Arg::Ptr(epilogue.map_or(0, |e| e.out)),
                Arg::Int(epilogue.map_or(0, |e| e.act)),
            ];
            return self.launch(&self.kernels.gemv[rows - 1], cfg, &args);
        }
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
                w.ptr(&self.dev) as *const c_void,
                ty,
                k,
                x as *const c_void,
                ty,
                k,
                &beta as *const f32 as *const c_void,
                out as *mut c_void,
                cudaDataType_t::CUDA_R_32F,
                n,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(device_err("a cuBLAS GEMM"))?;
        let Some(e) = epilogue else { return Ok(()) };
        let total = rows as u64 * n as u64;
        self.launch(
            &self.kernels.bias_act,
            LaunchConfig {
                grid_dim: (total.div_ceil(ROW_THREADS as u64).min(65_535) as u32, 1, 1),
                block_dim: (ROW_THREADS, 1, 1),
                shared_mem_bytes: 0,
            },
            &[
                Arg::Ptr(out),
                Arg::Ptr(e.bias),
                Arg::Ptr(e.out),
                Arg::Int(n),
                Arg::Long(total),
                Arg::Int(e.act),
            ],
        )
    }

    /// Puts the whole pass for `p` on the stream (no host synchronization, so it can be
    /// captured into a graph).
    fn enqueue(&self, p: &Pass) -> Result<()> {
        let cfg = &self.config;
        let (c, l_n, rows) = (cfg.n_embd, cfg.n_layer, p.rows);
        let (x, h, qkv, q, att, y, m32, m) = (p.x, p.h, p.qkv, p.q, p.att, p.y, p.m32, p.m);
        let row_cfg = |n: usize| LaunchConfig {
            grid_dim: (n as u32, 1, 1),
            block_dim: (ROW_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // Layer norms keep their row in shared memory.
        let norm_cfg = |n: usize| LaunchConfig {
            shared_mem_bytes: (c * 4) as u32,
            ..row_cfg(n)
        };
        let (ci, eps) = (c as i32, cfg.layer_norm_epsilon);
        let k = &self.kernels;
        let w = &self.w;
        let dev = &self.dev;
        self.launch(
            &k.embed,
            row_cfg(rows),
            &[
                Arg::Ptr(p.tokens),
                Arg::Ptr(p.pos),
                Arg::Ptr(w.wte.ptr(dev)),
                Arg::Ptr(w.wpe.ptr(dev)),
                Arg::Ptr(x),
                Arg::Int(ci),
            ],
        )?;
        let act = match cfg.activation {
            Activation::GeluTanh => 0,
            Activation::GeluErf => 1,
            Activation::Relu => 2,
        };
        let attention_cfg = LaunchConfig {
            grid_dim: (cfg.n_head as u32, rows as u32, 1),
            block_dim: (ATTENTION_THREADS, 1, 1),
            shared_mem_bytes: ((cfg.n_positions
                + 8 * ATTENTION_THREADS as usize
                + 32
                + cfg.head_dim())
                * 4) as u32,
        };
        // The residual branch still to be added to x before the next norm, and its bias.
        let mut pending: Option<u64> = None;
        for (l, lw) in w.layers.iter().enumerate() {
            let (y_arg, yb_arg) = match pending {
                Some(b) => (Arg::Ptr(y), Arg::Ptr(b)),
                None => (Arg::Ptr(0), Arg::Ptr(0)),
            };
            let norm = |n: &crate::weights::DeviceNorm, out: u64, y: Arg, yb: Arg| {
                [
                    Arg::Ptr(x),
                    y,
                    yb,
                    Arg::Ptr(0),
                    Arg::Ptr(n.gamma.ptr(dev)),
                    Arg::Ptr(n.beta.ptr(dev)),
                    Arg::Ptr(out),
                    Arg::Int(ci),
                    Arg::Float(eps),
                ]
            };
            self.launch(
                &k.add_layernorm,
                norm_cfg(rows),
                &norm(&lw.ln_1, h, y_arg, yb_arg),
            )?;
            self.gemm(h, rows, &lw.qkv.w, qkv, None)?;
            let mut scale = if cfg.scale_attn_weights {
                1.0 / (cfg.head_dim() as f32).sqrt()
            } else {
                1.0
            };
            if cfg.scale_attn_by_inverse_layer_idx {
                scale /= (l + 1) as f32;
            }
            self.launch(
                &k.qkv_store,
                LaunchConfig {
                    grid_dim: (rows as u32, (c as u32).div_ceil(ROW_THREADS), 1),
                    ..row_cfg(rows)
                },
                &[
                    Arg::Ptr(qkv),
                    Arg::Ptr(lw.qkv.b.ptr(dev)),
                    Arg::Ptr(q),
                    Arg::Ptr(p.caches),
                    Arg::Ptr(p.pos),
                    Arg::Ptr(p.caps),
                    Arg::Int(ci),
                    Arg::Int(l as i32),
                    Arg::Int(l_n as i32),
                    Arg::Float(scale),
                ],
            )?;
            self.launch(
                &k.attention,
                attention_cfg,
                &[
                    Arg::Ptr(q),
                    Arg::Ptr(p.caches),
                    Arg::Ptr(p.pos),
                    Arg::Ptr(p.caps),
                    Arg::Ptr(att),
                    Arg::Int(ci),
                    Arg::Int(cfg.n_head as i32),
                    Arg::Int(l as i32),
                    Arg::Int(l_n as i32),
                    Arg::Int(cfg.n_positions as i32),
                ],
            )?;
            self.gemm(att, rows, &lw.attn_out.w, y, None)?;
            let yb = Arg::Ptr(lw.attn_out.b.ptr(dev));
            self.launch(
                &k.add_layernorm,
                norm_cfg(rows),
                &norm(&lw.ln_2, h, Arg::Ptr(y), yb),
            )?;
            let mlp_act = Epilogue {
                bias: lw.mlp_in.b.ptr(dev),
                out: m,
                act,
            };
            self.gemm(h, rows, &lw.mlp_in.w, m32, Some(mlp_act))?;
            self.gemm(m, rows, &lw.mlp_out.w, y, None)?;
            pending = Some(lw.mlp_out.b.ptr(dev));
        }

        // The last residual add and the final norm, for the wanted rows only; then the head.
        if p.wanted > 0 {
            let (y_arg, yb_arg) = match pending {
                Some(b) => (Arg::Ptr(y), Arg::Ptr(b)),
                None => (Arg::Ptr(0), Arg::Ptr(0)),
            };
            self.launch(
                &k.add_layernorm,
                norm_cfg(p.wanted),
                &[
                    Arg::Ptr(x),
                    y_arg,
                    yb_arg,
                    Arg::Ptr(p.wanted_rows),
                    Arg::Ptr(w.ln_f.gamma.ptr(dev)),
                    Arg::Ptr(w.ln_f.beta.ptr(dev)),
                    Arg::Ptr(h),
                    Arg::Int(ci),
                    Arg::Float(eps),
                ],
            )?;
            self.gemm(h, p.wanted, w.lm_head(), p.logits, None)?;
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

    /// A scratch buffer of at least `bytes`, by name.
    fn scratch(&mut self, name: &'static str, bytes: usize) -> Result<u64> {
        let buf = self.scratch.bufs.get(name);
        if buf.is_none_or(|b| b.len() < bytes) {
            // Graphs captured earlier point at the old buffer.
            self.graphs.clear();
            // SAFETY: scratch is written before it is read in every pass.
            let fresh = unsafe { self.dev.stream.alloc::<u8>(bytes.max(1)) }
                .map_err(device_err("allocating GPU scratch memory"))?;
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
            let (free, _) = self.dev.memory()?;
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
        let mut cache = self
            .dev
            .stream
            .alloc_zeros::<u8>(cache_bytes_for(cfg, self.precision, cap) as usize)
            .map_err(device_err("allocating a KV cache"))?;
        let s = &self.seqs[&seq];
        if let Some(old) = &s.cache {
            // Keys then values, each n_layer runs of `len` positions at the old stride.
            for run in 0..2 * cfg.n_layer {
                let (from, to) = (run * s.cap * row, run * cap * row);
                let n = s.len * row;
                self.dev
                    .stream
                    .memcpy_dtod(&old.slice(from..from + n), &mut cache.slice_mut(to..to + n))
                    .map_err(device_err("growing a KV cache"))?;
            }
        }
        let s = self.seqs.get_mut(&seq).expect("checked");
        s.cache = Some(cache);
        s.cap = cap;
        Ok(())
    }
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

impl Engine for CudaEngine {
    fn config(&self) -> &Gpt2Config {
        &self.config
    }

    fn describe(&self) -> String {
        format!(
            "cuda:{} {} ({})",
            self.dev.ordinal,
            self.precision.suffix(),
            self.dev.name
        )
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
        self.seqs.remove(&seq);
    }

    fn sequence_len(&self, seq: SeqId) -> Option<usize> {
        self.seqs.get(&seq).map(|s| s.len)
    }

    fn forward(&mut self, batch: &[BatchEntry<'_>]) -> Result<Logits> {
        self.prepare(batch)?;
        let cfg = self.config.clone();
        let (c, v, inner) = (cfg.n_embd, cfg.vocab_size, cfg.n_inner);
        let es = self.precision.size();

        // Per row: token, position, its sequence's cache; and the rows whose logits are wanted.
        let (mut tokens, mut pos, mut caches, mut caps) = (vec![], vec![], vec![], vec![]);
        let (mut wanted, mut per_entry) = (vec![], vec![]);
        for e in batch {
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
            };
            per_entry.push(range.len());
            wanted.extend(range);
        }
        let rows = tokens.len();
        if rows == 0 {
            return Ok(Logits::new(v, vec![], &per_entry));
        }
        // Scratch is sized for a power of two of rows, so decode batches keep their buffers
        // (and the CUDA graphs that point into them) from step to step.
        let cap = rows.next_power_of_two().max(64);
        let wcap = wanted.len().next_power_of_two();
        // The per-row inputs in one copy: caches (u64), then tokens, positions, wanted rows and
        // cache capacities (i32).
        let mut packed = vec![0u8; cap * 24];
        let (ptrs, ints) = packed.split_at_mut(cap * 8);
        for (dst, p) in ptrs.chunks_exact_mut(8).zip(&caches) {
            dst.copy_from_slice(&p.to_ne_bytes());
        }
        for (part, values) in ints
            .chunks_exact_mut(cap * 4)
            .zip([&tokens, &pos, &wanted, &caps])
        {
            for (dst, v) in part.chunks_exact_mut(4).zip(values) {
                dst.copy_from_slice(&v.to_ne_bytes());
            }
        }
        let meta = self.upload("meta", &packed)?;
        let p = Pass {
            rows,
            wanted: wanted.len(),
            tokens: meta + (cap * 8) as u64,
            pos: meta + (cap * 12) as u64,
            caches: meta,
            wanted_rows: meta + (cap * 16) as u64,
            caps: meta + (cap * 20) as u64,
            x: self.scratch("x", cap * c * 4)?,
            h: self.scratch("h", cap * c * es)?,
            qkv: self.scratch("qkv", cap * 3 * c * 4)?,
            q: self.scratch("q", cap * c * 4)?,
            att: self.scratch("att", cap * c * es)?,
            y: self.scratch("y", cap * c * 4)?,
            m32: self.scratch("m32", cap * inner * 4)?,
            m: self.scratch("m", cap * inner * es)?,
            logits: self.scratch("logits", wcap * v * 4)?,
        };
        // Decode steps (one token per sequence) replay a CUDA graph of the whole pass, captured
        // the first time this batch shape is seen: one launch instead of ~10 per layer.
        let decode = batch.iter().all(|e| e.tokens.len() == 1);
        if decode && self.use_graphs && rows <= MAX_GRAPH_ROWS {
            let key = (rows, wanted.len());
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

        let mut logits = Vec::new();
        if !wanted.is_empty() {
            // Through page-locked memory: a batch of 64 brings back 13 MB of logits a step,
            // which pageable memory copies at a third of the speed.
            let bytes = wanted.len() * v * 4;
            if self.pinned.as_ref().is_none_or(|p| p.len() < wcap * v * 4) {
                // SAFETY: the buffer is only read after the copy below has filled it.
                let p = unsafe { self.dev.ctx.alloc_pinned::<u8>(wcap * v * 4) }
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
            let n = wanted.len() * v;
            // SAFETY: page-locked memory is page-aligned, `host` holds `n` f32 values, and
            // every byte pattern is a valid f32.
            let src = unsafe { std::slice::from_raw_parts(host.as_ptr() as *const f32, n) };
            // In parallel: 64 rows of logits are 13 MB, over a millisecond for one thread.
            logits = vec![0f32; n];
            logits
                .par_chunks_mut(1 << 16)
                .zip(src.par_chunks(1 << 16))
                .for_each(|(d, s)| d.copy_from_slice(s));
        } else {
            self.dev
                .stream
                .synchronize()
                .map_err(device_err("running the forward pass"))?;
        }
        for e in batch {
            self.seqs.get_mut(&e.seq).expect("validated").len += e.tokens.len();
        }
        Ok(Logits::new(v, logits, &per_entry))
    }
}
