//! The sweep: every (backend, model, precision, batch, prompt length) asked for, measured
//! after a warm-up, each figure the median of several runs, and each held against the
//! ceilings of the backend it ran on.

use super::backend::{self, Backend, Ceiling};
use super::compare::Transformers;
use super::gpu::{self, MemoryWatch};
use super::hardware;
use super::types::{Drift, Hardware, Row, Stat};
use gpt2rs::config::Gpt2Config;
use gpt2rs::engine::{BatchEntry, Engine, Logits, SeqId};
use gpt2rs::generate::{generate, GenerationConfig};
use gpt2rs::hub::{self, ModelSpec};
use gpt2rs::memory::Bytes;
use gpt2rs::model;
use gpt2rs::quant::{DType, WeightFormat};
use gpt2rs::tokenizer::Tokenizer;
use indicatif::{ProgressBar, ProgressStyle};
use rand::{Rng, SeedableRng};

/// What to measure.
#[derive(Debug)]
pub struct Plan {
    pub models: Vec<BenchModel>,
    pub dtypes: Vec<DType>,
    pub batches: Vec<usize>,
    pub prompt_lens: Vec<usize>,
    pub new_tokens: usize,
    pub reps: usize,
    /// The engine to compare with, found before the sweep starts.
    pub compare: Option<Transformers>,
}

/// A `--models` entry, resolved before anything is measured.
#[derive(Debug, Clone)]
pub struct BenchModel {
    pub name: String,
    pub config: Gpt2Config,
    pub spec: ModelSpec,
    pub synthetic: bool,
}

/// Runs the plan on every backend: one row per configuration, measured or skipped with the
/// reason; with each backend's drift over the run (a reference decode on it, measured before
/// each of its groups and at the end), which is added to the spreads of its rows.
pub fn run(plan: &Plan, hw: &Hardware, backends: &[Backend]) -> (Vec<Row>, Vec<Drift>) {
    let mut rows = Vec::new();
    let theirs = plan.compare.as_ref();
    let total = backends.len()
        * plan.models.len()
        * plan.dtypes.len()
        * plan.batches.len()
        * plan.prompt_lens.len();
    let bar = ProgressBar::new(total as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} [{elapsed_precise}] {msg}")
            .expect("valid template"),
    );
    bar.set_message("loading the drift probes");
    let mut probe = hardware::DriftProbe::open(backends);
    let mut seen: Vec<(Backend, Vec<f64>)> = probe.backends().map(|b| (b, vec![])).collect();
    let mut check = |b: Backend, probe: &mut hardware::DriftProbe| {
        if let (Some(v), Some((_, list))) = (probe.tok_s(b), seen.iter_mut().find(|s| s.0 == b)) {
            list.push(v);
        }
    };
    for &b in backends {
        for m in &plan.models {
            for &dtype in &plan.dtypes {
                let group = Group {
                    plan,
                    hw,
                    backend: b,
                    model: m,
                    dtype,
                };
                bar.set_message("re-measuring the reference decode (drift)");
                check(b, &mut probe);
                group.run(theirs, &bar, &mut rows);
            }
        }
    }
    for &b in backends {
        check(b, &mut probe);
    }
    bar.finish_and_clear();
    let drift: Vec<Drift> = seen
        .into_iter()
        .map(|(b, tok_s)| Drift {
            backend: backend::label(b),
            reference: hardware::DRIFT_REFERENCE.into(),
            tok_s,
        })
        .collect();
    for d in &drift {
        let mine = rows.iter_mut().filter(|r| r.backend == d.backend);
        add_drift(mine, d.fraction());
    }
    (rows, drift)
}

/// Adds `drift` to every measured spread of `rows`.
fn add_drift<'a>(rows: impl Iterator<Item = &'a mut Row>, drift: f64) {
    for r in rows {
        for s in [
            &mut r.prefill_tok_s,
            &mut r.ttft_ms,
            &mut r.decode_tok_s,
            &mut r.decode_ms_per_step,
        ]
        .into_iter()
        .flatten()
        {
            s.drift = drift;
        }
    }
}

/// Every batch × prompt-length row of one model in one precision on one backend (loaded once
/// for them all).
struct Group<'a> {
    plan: &'a Plan,
    hw: &'a Hardware,
    backend: Backend,
    model: &'a BenchModel,
    dtype: DType,
}

impl Group<'_> {
    fn shapes(&self) -> Vec<(usize, usize)> {
        let p = self.plan;
        p.batches
            .iter()
            .flat_map(|&b| p.prompt_lens.iter().map(move |&l| (b, l)))
            .collect()
    }

    fn row(&self, batch: usize, prompt: usize) -> Row {
        let format = WeightFormat::new(self.dtype);
        empty_row(
            self.backend,
            self.model,
            format,
            batch,
            prompt,
            self.plan.new_tokens,
        )
    }

    /// Why the row cannot run before anything is loaded: its context, or (on a GPU) memory.
    fn precheck(&self, batch: usize, prompt: usize, gpu_free: Option<u64>) -> Option<String> {
        let (c, new) = (&self.model.config, self.plan.new_tokens);
        // The last new token is never fed back: a prompt may fill the context when one new
        // token is asked for.
        let positions = prompt + new.saturating_sub(1);
        if positions > c.n_positions || prompt == 0 {
            return Some(format!(
                "prompt {prompt} + {new} new tokens need {positions} positions, more than the \
                 context of {}",
                c.n_positions
            ));
        }
        let free = gpu_free?;
        match gpu::memory_needed(c, self.dtype, batch, batch * prompt) {
            Ok((w, kv, scratch)) => {
                backend::gpu_fit(&backend::label(self.backend), w, kv, scratch, batch, free)
            }
            Err(e) => Some(format!("{e:#}")),
        }
    }

    fn run(&self, theirs: Option<&Transformers>, bar: &ProgressBar, rows: &mut Vec<Row>) {
        let (name, config, plan) = (&self.model.name, &self.model.config, self.plan);
        let format = WeightFormat::new(self.dtype);
        let device = backend::label(self.backend);
        let shapes = self.shapes();
        let skip_all = |reason: String, rows: &mut Vec<Row>| {
            for &(batch, prompt) in &shapes {
                let mut r = self.row(batch, prompt);
                r.skipped = Some(reason.clone());
                rows.push(r);
                bar.inc(1);
            }
        };
        // Host memory before building anything: the weights (on the way to the GPU, for GPU
        // rows) plus, on the CPU, the largest KV cache of the plan.
        let max_ctx = match self.backend {
            Backend::Cpu => shapes
                .iter()
                .map(|(b, p)| b * (p + plan.new_tokens))
                .max()
                .unwrap_or(0),
            Backend::Cuda(_) => 0,
        };
        let needed = format.model_bytes(config) + config.kv_bytes_per_token(4) * max_ctx as u64;
        if let Some(avail) = self.hw.ram_available_bytes.filter(|&a| needed > a) {
            return skip_all(
                format!(
                    "needs {} of memory, {} available",
                    Bytes(needed),
                    Bytes(avail)
                ),
                rows,
            );
        }
        // A GPU's memory is watched from before its engine opens.
        let mut watch = match self.backend {
            Backend::Cpu => None,
            Backend::Cuda(n) => match gpu::MemoryWatch::start(n) {
                Ok(w) => Some(w),
                Err(e) => return skip_all(format!("cannot read {device}'s memory: {e:#}"), rows),
            },
        };
        let gpu_free = watch.as_ref().map(|w| w.free_before());
        let reasons: Vec<Option<String>> = shapes
            .iter()
            .map(|&(b, p)| self.precheck(b, p, gpu_free))
            .collect();
        if reasons.iter().all(Option::is_some) {
            for (&(batch, prompt), why) in shapes.iter().zip(reasons) {
                let mut r = self.row(batch, prompt);
                r.skipped = why;
                rows.push(r);
                bar.inc(1);
            }
            return;
        }

        bar.set_message(format!("loading {name} {} for {device}", self.dtype));
        reset_peak_memory();
        let opts = hub::FetchOptions::default();
        let loaded = match model::load_as(&self.model.spec, 0, &opts, Some(format)) {
            Ok(l) => l,
            Err(e) => return skip_all(format!("cannot load: {e}"), rows),
        };
        let tokenizer = loaded.tokenizer;
        let mut engine = match crate::device::open_engine(loaded.weights, &device) {
            Ok(e) => e,
            Err(e) => return skip_all(format!("cannot open on {device}: {e:#}"), rows),
        };
        for (&(batch, prompt), why) in shapes.iter().zip(reasons) {
            let mut row = self.row(batch, prompt);
            if why.is_some() {
                row.skipped = why;
                rows.push(row);
                bar.inc(1);
                continue;
            }
            bar.set_message(format!(
                "{device} {name} {} batch {batch} prompt {prompt}",
                self.dtype
            ));
            if let Some(w) = &mut watch {
                w.new_row();
            }
            let shape = Shape {
                batch,
                prompt_len: prompt,
                new_tokens: plan.new_tokens,
                reps: plan.reps,
            };
            match measure(engine.as_mut(), &tokenizer, config, shape, watch.as_mut()) {
                Ok(measured) => fill(
                    &mut row,
                    measured,
                    config,
                    format,
                    backend::ceiling(self.backend, self.dtype, self.hw),
                ),
                Err(e) => row.skipped = Some(format!("failed: {e}")),
            }
            match &watch {
                Some(w) => row.gpu_memory_bytes = Some(w.peak_used()),
                None => row.peak_memory_bytes = peak_memory(),
            }
            // transformers runs f32 on the CPU: compare the CPU's f32 rows only.
            let cpu_f32 = self.backend == Backend::Cpu && self.dtype == DType::F32;
            if let (Some(t), None, true) = (theirs, &row.skipped, cpu_f32) {
                bar.set_message(format!(
                    "{name} batch {batch} prompt {prompt} through transformers"
                ));
                // The same weights: the preset's shape at random, or the same directory.
                let theirs_model = match &self.model.spec {
                    ModelSpec::Dir(dir) => dir.display().to_string(),
                    _ => name.clone(),
                };
                let mut c = t.run(
                    &theirs_model,
                    batch,
                    prompt,
                    plan.new_tokens,
                    self.hw.threads,
                    plan.reps,
                );
                let ours = |s: &Option<Stat>| s.map(|s| s.median);
                c.decode_speedup = ours(&row.decode_tok_s)
                    .zip(c.decode_tok_s)
                    .map(|(a, b)| a / b);
                c.prefill_speedup = ours(&row.prefill_tok_s)
                    .zip(c.prefill_tok_s)
                    .map(|(a, b)| a / b);
                row.compare = Some(c);
            }
            rows.push(row);
            bar.inc(1);
        }
    }
}

/// What to run for a `--models` entry: a preset uses real weights when the hub cache already has
/// them and synthetic ones of the exact shape otherwise; a directory or a cached hub repository
/// runs as is. The bench never downloads.
pub fn resolve(name: &str) -> Result<BenchModel, String> {
    let spec = ModelSpec::parse(name).map_err(|e| e.to_string())?;
    let dir = match &spec {
        ModelSpec::Dir(dir) => Some(dir.clone()),
        ModelSpec::Hub { repo, revision } => hub::cached_snapshot(repo, revision),
        ModelSpec::Synthetic { config, .. } => {
            return Ok(BenchModel {
                name: name.trim_start_matches("synthetic:").to_string(),
                config: config.clone(),
                spec: spec.clone(),
                synthetic: true,
            })
        }
    };
    if let Some(dir) = dir {
        let config = Gpt2Config::from_file(&dir.join("config.json")).map_err(|e| e.to_string())?;
        return Ok(BenchModel {
            name: name.to_string(),
            config,
            spec: ModelSpec::Dir(dir),
            synthetic: false,
        });
    }
    if Gpt2Config::preset(name).is_some() {
        return resolve(&format!("synthetic:{name}"));
    }
    Err(format!(
        "not in the hub cache ({}); the bench does not download: run `gpt2rs generate --model {name}` once first",
        hub::cache_dir().display()
    ))
}

fn empty_row(
    b: Backend,
    m: &BenchModel,
    format: WeightFormat,
    batch: usize,
    prompt: usize,
    new: usize,
) -> Row {
    Row {
        backend: backend::label(b),
        model: m.name.clone(),
        synthetic: m.synthetic,
        params: m.config.param_count(),
        dtype: format.label(),
        weight_bytes: format.model_bytes(&m.config),
        batch,
        prompt_len: prompt,
        new_tokens: new,
        skipped: None,
        prefill_tok_s: None,
        ttft_ms: None,
        decode_tok_s: None,
        decode_ms_per_step: None,
        peak_memory_bytes: None,
        gpu_memory_bytes: None,
        decode_roofline: None,
        prefill_roofline: None,
        decode_ceiling_tok_s: None,
        compare: None,
    }
}

/// One row's sizes.
#[derive(Clone, Copy)]
struct Shape {
    batch: usize,
    prompt_len: usize,
    new_tokens: usize,
    reps: usize,
}

struct Measured {
    prefill_tok_s: Vec<f64>,
    ttft_ms: Vec<f64>,
    decode_tok_s: Vec<f64>,
    ms_per_step: Vec<f64>,
}

fn measure(
    engine: &mut dyn Engine,
    tokenizer: &Tokenizer,
    c: &Gpt2Config,
    shape: Shape,
    watch: Option<&mut MemoryWatch>,
) -> gpt2rs::Result<Measured> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    let prompts: Vec<Vec<u32>> = (0..shape.batch)
        .map(|_| {
            (0..shape.prompt_len)
                .map(|_| rng.random_range(0..c.vocab_size as u32))
                .collect()
        })
        .collect();
    let cfg = |n| GenerationConfig {
        max_new_tokens: n,
        stop_at_eos: false,
        ..GenerationConfig::default()
    };
    // The warm-up runs every shape the timed runs will (prefill, a decode step), so GPU
    // memory is read after each of its passes: the row's KV caches are freed when it ends.
    match watch {
        Some(watch) => {
            let mut watched = Watched {
                inner: &mut *engine,
                watch,
            };
            generate(&mut watched, tokenizer, &prompts, &cfg(2), &mut |_| {})?;
        }
        None => {
            generate(&mut *engine, tokenizer, &prompts, &cfg(2), &mut |_| {})?;
        }
    }
    let mut m = Measured {
        prefill_tok_s: vec![],
        ttft_ms: vec![],
        decode_tok_s: vec![],
        ms_per_step: vec![],
    };
    for _ in 0..shape.reps.max(1) {
        let (_, s) = generate(
            engine,
            tokenizer,
            &prompts,
            &cfg(shape.new_tokens),
            &mut |_| {},
        )?;
        m.prefill_tok_s.push(s.prefill_tokens_per_sec());
        m.ttft_ms.push(s.time_to_first_token.as_secs_f64() * 1e3);
        if s.decode_steps > 0 {
            m.decode_tok_s.push(s.decode_tokens_per_sec());
            m.ms_per_step
                .push(s.decode_time.as_secs_f64() * 1e3 / s.decode_steps as f64);
        }
    }
    Ok(m)
}

/// An engine whose GPU memory is read after every pass.
struct Watched<'a> {
    inner: &'a mut dyn Engine,
    watch: &'a mut MemoryWatch,
}

impl Engine for Watched<'_> {
    fn config(&self) -> &Gpt2Config {
        self.inner.config()
    }

    fn describe(&self) -> String {
        self.inner.describe()
    }

    fn add_sequence(&mut self) -> SeqId {
        self.inner.add_sequence()
    }

    fn fork_sequence(&mut self, parent: SeqId) -> gpt2rs::Result<SeqId> {
        self.inner.fork_sequence(parent)
    }

    fn remove_sequence(&mut self, seq: SeqId) {
        self.inner.remove_sequence(seq)
    }

    fn sequence_len(&self, seq: SeqId) -> Option<usize> {
        self.inner.sequence_len(seq)
    }

    fn forward(&mut self, batch: &[BatchEntry<'_>]) -> gpt2rs::Result<Logits> {
        let out = self.inner.forward(batch);
        self.watch.sample();
        out
    }
}

fn fill(
    row: &mut Row,
    m: Measured,
    c: &Gpt2Config,
    format: WeightFormat,
    ceiling: Option<Ceiling>,
) {
    let stat = |v: &[f64]| (!v.is_empty()).then(|| Stat::of(v));
    row.prefill_tok_s = stat(&m.prefill_tok_s);
    row.ttft_ms = stat(&m.ttft_ms);
    row.decode_tok_s = stat(&m.decode_tok_s);
    row.decode_ms_per_step = stat(&m.ms_per_step);
    let Some(ceil) = ceiling else { return };
    // Decode floor: every weight read once per step, plus each sequence's KV cache (at the
    // mean context length of the run, in the backend's cache precision), at the bandwidth.
    let mean_ctx = row.prompt_len as f64 + row.new_tokens as f64 / 2.0;
    let position_table = 4.0 * (c.n_positions * c.n_embd) as f64; // only one row is read
    let bytes = format.model_bytes(c) as f64 - position_table
        + row.batch as f64 * mean_ctx * c.kv_bytes_per_token(ceil.kv_bytes) as f64;
    let decode_ceiling = row.batch as f64 / (bytes / ceil.bandwidth);
    row.decode_ceiling_tok_s = Some(decode_ceiling);
    row.decode_roofline = row.decode_tok_s.map(|s| s.median / decode_ceiling);
    // Prefill floor: 2 FLOPs per non-embedding weight per prompt token at the compute rate.
    let matmul_params = (c.params_read_per_token() - (c.vocab_size * c.n_embd) as u64) as f64;
    let prefill_ceiling = ceil.flops / (2.0 * matmul_params);
    row.prefill_roofline = row.prefill_tok_s.map(|s| s.median / prefill_ceiling);
}

/// Starts a new peak-memory window (Linux: clear_refs 5 resets VmHWM). Memory the previous
/// row freed is first handed back to the system, or glibc would keep it resident and count it
/// against this row.
fn reset_peak_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free heap pages; it has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// The process's peak resident memory since the last reset (Linux).
fn peak_memory() -> Option<u64> {
    gpt2rs::memory::proc_kb("/proc/self/status", "VmHWM").map(|b| b.0)
}
