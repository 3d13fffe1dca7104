//! The batch-1 decode pass through every layer in one persistent kernel (decode_step.cu):
//! whether this model and GPU can run it, its layer table, scratch and launch.

use crate::device::{device_err, Device};
use crate::engine::activation_code;
use crate::launch::{launch, Arg};
use crate::weights::{DeviceModel, MatrixFormat, Precision};
use cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute};
use cudarc::driver::{CudaFunction, CudaSlice, DevicePtr, LaunchConfig};
use gpt2rs::config::Gpt2Config;
use gpt2rs::Result;

/// decode_step.cu's STEP_THREADS, STEP_SLOT_BYTES, STEP_MAX_SLOTS, STEP_HELD, STEP_M_HELD
/// and STEP_SUMS.
const THREADS: u32 = 256 + 32;
const SLOT_BYTES: usize = 16384;
const MAX_SLOTS: usize = 16;
const MAX_WIDTH: usize = 8 * 256;
const MAX_INNER: usize = 2 * 16 * 256;
const SUMS: usize = 2048;
/// A slot's room for a quantized matrix's scales beyond its rows' own (16-byte boundaries).
const SCALE_SLACK: usize = 32;
/// The kernel's static shared memory, rounded up.
const STATIC_SHARED: usize = 1024;
/// u64 words of decode_step.cu's StepLayer.
const LAYER_WORDS: usize = 17;

/// Buffers handed to one pass (the engine's scratch for a one-row pass).
pub(crate) struct StepBuffers {
    pub x: u64,
    pub caches: u64,
    pub pos: u64,
    pub caps: u64,
}

pub(crate) struct DecodeStep {
    function: CudaFunction,
    /// Per layer its StepLayer: matrix, scale and bias pointers, norms, attention scale.
    layers: CudaSlice<u64>,
    /// The stamped words blocks hand each other (decode_step.cu): x, q with the new key
    /// and value, attention's per-chunk results, m, and last the count of passes.
    words: CudaSlice<u64>,
    blocks: u32,
    shared: u32,
    slots: usize,
    config: Gpt2Config,
}

impl DecodeStep {
    /// The kernel for `w` on `dev`, or None where it does not apply: before sm_90 (it needs
    /// bulk copies and mbarriers), f32 models, matrices of different formats or rows that a
    /// slot cannot hold, or widths it does not take.
    pub fn new(
        dev: &Device,
        w: &DeviceModel,
        config: &Gpt2Config,
        p: Precision,
    ) -> Result<Option<Self>> {
        let Some(format) = Self::format(w, config, p).filter(|_| dev.major >= 9) else {
            return Ok(None);
        };
        let function = dev.function(&format!("decode_step_{}", format.suffix()))?;
        let optin = dev
            .ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
            .map_err(device_err("reading the GPU's shared memory per block"))?
            as usize;
        let d = config.head_dim();
        let act_bytes = config.n_embd.max(config.n_inner).next_multiple_of(8) * p.size();
        let items = Self::most_attention_items(config);
        // Blocks take rows in pairs (decode_step.cu's step_first_row).
        let share = |n: usize| 2 * (n / 2).div_ceil(dev.sm_count);
        let rows = share((3 * config.n_embd).max(config.n_inner)) + share(config.n_embd);
        let rest = act_bytes + (config.n_positions + SUMS + 3 * d + 2 * items + rows) * 4;
        let slots = (optin.saturating_sub(rest + STATIC_SHARED) / SLOT_BYTES).min(MAX_SLOTS);
        // Fewer than 4 slots would leave too little in flight to be worth it.
        if slots < 4 {
            return Ok(None);
        }
        let shared = (slots * SLOT_BYTES + rest) as u32;
        function
            .set_attribute(
                CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                shared as i32,
            )
            .map_err(device_err("giving decode_step its shared memory"))?;
        let resident = function
            .occupancy_max_active_blocks_per_multiprocessor(THREADS, shared as usize, None)
            .map_err(device_err("reading decode_step's occupancy"))?;
        // Blocks wait for each other's words, so every block must be resident at once: one
        // per multiprocessor. And every block must own some of x's rows (and so of m's), or
        // the buffers' reuse is not safe (see decode_step.cu).
        if resident < 1 || config.n_embd / 2 < dev.sm_count {
            return Ok(None);
        }
        let table = Self::layer_table(dev, w, config);
        let s = &dev.stream;
        let err = device_err("allocating decode_step's buffers");
        Ok(Some(Self {
            function,
            layers: s.clone_htod(&table).map_err(&err)?,
            words: s
                .alloc_zeros::<u64>(Self::word_offsets(config)[4] + 1)
                .map_err(&err)?,
            blocks: dev.sm_count as u32,
            shared,
            slots,
            config: config.clone(),
        }))
    }

    /// The one format every layer's matrices share, if the kernel takes the model.
    fn format(w: &DeviceModel, config: &Gpt2Config, p: Precision) -> Option<MatrixFormat> {
        let first = w.layers.first()?.qkv.w.format;
        let vector = if first.is_quantized() { 32 } else { 8 };
        let fits = w
            .layers
            .iter()
            .flat_map(|l| [&l.qkv.w, &l.attn_out.w, &l.mlp_in.w, &l.mlp_out.w])
            .all(|m| {
                let scales = if first.is_quantized() {
                    2 * m.cols.div_ceil(32) + SCALE_SLACK
                } else {
                    0
                };
                m.format == first
                    && m.row_bytes() + scales <= SLOT_BYTES
                    && m.cols.is_multiple_of(vector)
            });
        // Heads of whole 16-byte pieces of the cache (8 f16 / bf16 values), even row counts.
        let shapes = config.n_embd <= MAX_WIDTH
            && config.n_inner <= MAX_INNER
            && config.n_embd.is_multiple_of(2)
            && config.n_inner.is_multiple_of(2)
            && config.n_embd.is_multiple_of(config.n_head)
            && config.head_dim().is_multiple_of(8);
        (p != Precision::F32 && fits && shapes).then_some(first)
    }

    /// decode_step.cu's StepLayer of every layer, as u64 words.
    fn layer_table(dev: &Device, w: &DeviceModel, config: &Gpt2Config) -> Vec<u64> {
        let mut table = Vec::with_capacity(w.layers.len() * LAYER_WORDS);
        for (l, lw) in w.layers.iter().enumerate() {
            let mats = [&lw.qkv, &lw.attn_out, &lw.mlp_in, &lw.mlp_out];
            table.extend(mats.iter().map(|m| m.w.ptr(dev)));
            table.extend(mats.iter().map(|m| m.w.scales_ptr(dev)));
            table.extend(mats.iter().map(|m| m.b.ptr(dev)));
            table.extend([
                lw.ln_1.gamma.ptr(dev),
                lw.ln_1.beta.ptr(dev),
                lw.ln_2.gamma.ptr(dev),
                lw.ln_2.beta.ptr(dev),
            ]);
            // The float in the low half, a zero int after it.
            table.push(u64::from(config.attention_scale(l).to_bits()));
        }
        table
    }

    /// The most attention items a pass can have: a head in chunks of at least 64 positions
    /// (decode_step.cu's bound for its `stats`; its chunks are at least STEP_MIN_CHUNK).
    fn most_attention_items(config: &Gpt2Config) -> usize {
        config.n_head * config.n_positions.div_ceil(64)
    }

    /// Where the words of x, qkv, part and m and the pass count start in `words`.
    fn word_offsets(config: &Gpt2Config) -> [usize; 5] {
        let c = config.n_embd;
        let items = Self::most_attention_items(config);
        let qkv = c;
        let part = qkv + 3 * c;
        let m = part + items * (config.head_dim() + 2);
        [0, qkv, part, m, m + config.n_inner / 2]
    }

    /// Shared-memory slots of weights in flight per block.
    pub fn slots(&self) -> usize {
        self.slots
    }

    /// Enqueues every layer of a one-row pass (x embedded before, the final norm after).
    pub fn launch(&self, dev: &Device, pdl: bool, b: &StepBuffers) -> Result<()> {
        let cfg = &self.config;
        let act = activation_code(cfg.activation);
        let launch_cfg = LaunchConfig {
            grid_dim: (self.blocks, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: self.shared,
        };
        let s = &dev.stream;
        let words = self.words.device_ptr(s).0;
        let [xs, qkv, part, m, epoch] = Self::word_offsets(cfg).map(|o| words + 8 * o as u64);
        let args = [
            Arg::Ptr(self.layers.device_ptr(s).0),
            Arg::Int(cfg.n_layer as i32),
            Arg::Ptr(b.x),
            Arg::Ptr(xs),
            Arg::Ptr(qkv),
            Arg::Ptr(part),
            Arg::Ptr(m),
            Arg::Ptr(b.caches),
            Arg::Ptr(b.pos),
            Arg::Ptr(b.caps),
            Arg::Int(cfg.n_embd as i32),
            Arg::Int(cfg.n_inner as i32),
            Arg::Int(cfg.n_head as i32),
            Arg::Int(cfg.n_positions as i32),
            Arg::Int(act),
            Arg::Float(cfg.layer_norm_epsilon),
            Arg::Int(self.slots as i32),
            Arg::Ptr(epoch),
        ];
        launch(dev, pdl, &self.function, launch_cfg, &args)
    }
}
