//! What a benchmark run produces: the header, the machine and its ceilings, and one row per
//! configuration. Everything here serializes to JSON as is.

use serde::Serialize;

/// Median of repeated measurements, with their spread.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Stat {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    /// Number of measurements.
    pub n: usize,
    /// The machine's own drift over the run (a fraction, see [`Drift`]), added to the printed
    /// spread: repetitions taken back to back cannot show what changes over minutes.
    pub drift: f64,
}

impl Stat {
    /// Summarizes `values` (at least one).
    pub fn of(values: &[f64]) -> Self {
        let mut v = values.to_vec();
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Self {
            median,
            min: v[0],
            max: v[n - 1],
            n,
            drift: 0.0,
        }
    }

    /// Half the range, as a fraction of the median.
    pub fn half_range(&self) -> f64 {
        if self.median == 0.0 {
            0.0
        } else {
            (self.max - self.min) / 2.0 / self.median
        }
    }

    /// The "±" printed next to the median, as a fraction: half the range of the repetitions
    /// (the noise from one run to the next) plus the machine's drift over the whole run (how
    /// far the machine itself moved). Either alone was too narrow for two runs of one command
    /// on a shared 16-core host (docs/benchmarks.md, "Reproducibility").
    pub fn spread(&self) -> f64 {
        self.half_range() + self.drift
    }
}

/// How much one backend of the machine moved while the run went on: a reference workload on
/// it, kept loaded, measured again before each of its model × precision groups and at the end.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Drift {
    /// The backend (`cpu`, `cuda:0`).
    pub backend: String,
    /// What the reference is.
    pub reference: String,
    /// Its speed at every measurement, tok/s, in the order taken.
    pub tok_s: Vec<f64>,
}

impl Drift {
    /// Half the range of the measurements as a fraction of their median (0 with fewer than two).
    pub fn fraction(&self) -> f64 {
        let v: Vec<f64> = self
            .tok_s
            .iter()
            .copied()
            .filter(|x| x.is_finite())
            .collect();
        if v.len() < 2 {
            return 0.0;
        }
        Stat::of(&v).half_range()
    }
}

/// Who ran, what, when.
#[derive(Debug, Clone, Serialize)]
pub struct Header {
    pub gpt2rs_version: String,
    pub git_commit: String,
    /// The full command line.
    pub command: String,
    /// ISO 8601, UTC.
    pub date_utc: String,
}

/// A GPU seen on the machine.
#[derive(Debug, Clone, Serialize)]
pub struct Gpu {
    pub name: String,
    pub memory_bytes: Option<u64>,
    /// Its `cuda:N` number, when the CUDA driver reported it (nvidia-smi alone gives none).
    pub ordinal: Option<usize>,
    /// Whether the CUDA backend can run on it.
    pub usable: bool,
    /// Why it cannot be used or was not measured.
    pub note: Option<String>,
    /// Its ceilings, when this run measured it.
    pub ceilings: Option<GpuCeilings>,
}

impl Gpu {
    /// `Some(N)` for a GPU the CUDA backend can run on as cuda:N.
    pub fn usable_ordinal(&self) -> Option<usize> {
        self.ordinal.filter(|_| self.usable)
    }
}

/// A GPU's ceilings, measured by gpt2rs-cuda's probe.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct GpuCeilings {
    /// Device-to-device copy, GB/s, counting bytes read plus bytes written.
    pub copy_gbs: f64,
    /// Size of the buffer copied, bytes.
    pub copy_bytes: u64,
    /// cuBLAS GEMM, f16 inputs, f32 accumulation and output, TFLOP/s.
    pub f16_gemm_tflops: f64,
    /// cuBLAS GEMM in plain f32 (no TF32), TFLOP/s.
    pub f32_gemm_tflops: f64,
    /// The products were n × n × n.
    pub gemm_n: usize,
}

/// The machine and the ceilings measured on it.
#[derive(Debug, Clone, Serialize)]
pub struct Hardware {
    pub os: String,
    pub cpu_model: String,
    pub logical_cores: usize,
    /// Threads the CPU engine used.
    pub threads: usize,
    /// The SIMD level the kernels run with (avx2+fma, neon, …).
    pub simd: String,
    pub ram_total_bytes: Option<u64>,
    pub ram_available_bytes: Option<u64>,
    pub gpus: Vec<Gpu>,
    /// Memory read bandwidth with all threads, GB/s (1 GB = 1e9 bytes).
    pub mem_read_gbs: f64,
    /// f32 fused multiply-add throughput with all threads, GFLOP/s (register-only loop).
    pub f32_fma_peak_gflops: f64,
    /// f32 matrix-multiply throughput the engine's GEMM reaches (1024³), GFLOP/s.
    pub f32_gemm_gflops: f64,
    /// Each backend's drift over the run (filled in when the sweep ends).
    pub drift: Vec<Drift>,
}

/// The same configuration run through another engine.
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    /// e.g. "transformers 5.23.0 (torch 2.15.0)".
    pub engine: String,
    pub prefill_tok_s: Option<f64>,
    pub ttft_ms: Option<f64>,
    pub decode_tok_s: Option<f64>,
    /// gpt2rs decode tok/s ÷ theirs.
    pub decode_speedup: Option<f64>,
    /// gpt2rs prefill tok/s ÷ theirs.
    pub prefill_speedup: Option<f64>,
    /// Why there are no numbers (their run failed, …).
    pub error: Option<String>,
}

/// One configuration: model × precision × batch × prompt length on one backend.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub backend: String,
    pub model: String,
    /// True when the weights are random values of the exact shape.
    pub synthetic: bool,
    pub params: u64,
    /// Weight format (`int4`, …).
    pub dtype: String,
    /// Bytes the weights take in that format.
    pub weight_bytes: u64,
    pub batch: usize,
    pub prompt_len: usize,
    pub new_tokens: usize,
    /// Set when the row was not run, with the reason (e.g. does not fit in memory).
    pub skipped: Option<String>,
    /// Prompt tokens per second over the whole batch's prefill.
    pub prefill_tok_s: Option<Stat>,
    /// Time to the first new token of every sequence, ms.
    pub ttft_ms: Option<Stat>,
    /// Generated tokens per second over the batch (decode steps only).
    pub decode_tok_s: Option<Stat>,
    /// Milliseconds per decode step (one token for each sequence).
    pub decode_ms_per_step: Option<Stat>,
    /// Peak resident memory of the process during the row, bytes.
    pub peak_memory_bytes: Option<u64>,
    /// GPU rows: the GPU memory the engine held at its peak (free memory from cuMemGetInfo
    /// before it was opened, less the least free while it ran), bytes.
    pub gpu_memory_bytes: Option<u64>,
    /// Decode speed ÷ the bandwidth ceiling (weight bytes in this format + KV bytes per step
    /// ÷ the backend's bandwidth: CPU read bandwidth, GPU copy bandwidth).
    pub decode_roofline: Option<f64>,
    /// Prefill speed ÷ the compute floor (2 · params · tokens ÷ the backend's rate: CPU FMA
    /// peak, GPU cuBLAS GEMM rate of the row's precision).
    pub prefill_roofline: Option<f64>,
    /// The bandwidth-bound ceiling of decode for this row, tok/s.
    pub decode_ceiling_tok_s: Option<f64>,
    pub compare: Option<Comparison>,
}

/// A whole benchmark run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub header: Header,
    pub hardware: Hardware,
    pub rows: Vec<Row>,
    /// Plain-language notes (what was skipped and why, what is not built yet).
    pub notes: Vec<String>,
}
