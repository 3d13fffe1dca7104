//! The sweep: every (model, precision, batch, prompt length) asked for, measured after a warm-up,
//! each figure the median of several runs, and each held against the machine's ceilings.

use super::compare::Transformers;
use super::types::{Hardware, Row, Stat};
use gpt2rs::config::Gpt2Config;
use gpt2rs::cpu::CpuEngine;
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

/// Runs the plan: one row per configuration, measured or skipped with the reason.
pub fn run(plan: &Plan, hw: &Hardware) -> Vec<Row> {
    let mut rows = Vec::new();
    let theirs = plan.compare.as_ref();
    let total = plan.models.len() * plan.dtypes.len() * plan.batches.len() * plan.prompt_lens.len();
    let bar = ProgressBar::new(total as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} [{elapsed_precise}] {msg}")
            .expect("valid template"),
    );
    for m in &plan.models {
        for &dtype in &plan.dtypes {
            run_model(plan, hw, m, dtype, theirs, &bar, &mut rows);
        }
    }
    bar.finish_and_clear();
    rows
}

/// Every batch × prompt-length row of one model in one precision (loaded once for them all).
fn run_model(
    plan: &Plan,
    hw: &Hardware,
    m: &BenchModel,
    dtype: DType,
    theirs: Option<&Transformers>,
    bar: &ProgressBar,
    rows: &mut Vec<Row>,
) {
    let (name, config) = (&m.name, &m.config);
    let format = WeightFormat::new(dtype);
    let shapes: Vec<(usize, usize)> = plan
        .batches
        .iter()
        .flat_map(|&b| plan.prompt_lens.iter().map(move |&p| (b, p)))
        .collect();
    let row = |batch, prompt| empty_row(m, format, batch, prompt, plan.new_tokens);
    let skip_all = |reason: String, rows: &mut Vec<Row>| {
        for &(batch, prompt) in &shapes {
            let mut r = row(batch, prompt);
            r.skipped = Some(reason.clone());
            rows.push(r);
            bar.inc(1);
        }
    };
    // Fit check before building anything: weights plus the largest KV cache of the plan.
    let max_ctx = shapes
        .iter()
        .map(|(b, p)| b * (p + plan.new_tokens))
        .max()
        .unwrap_or(0);
    let needed = format.model_bytes(config) + config.kv_bytes_per_token(4) * max_ctx as u64;
    if let Some(avail) = hw.ram_available_bytes.filter(|&a| needed > a) {
        return skip_all(
            format!(
                "needs {} of memory, {} available",
                Bytes(needed),
                Bytes(avail)
            ),
            rows,
        );
    }
    bar.set_message(format!("loading {name} {dtype}"));
    reset_peak_memory();
    let loaded = match model::load_as(&m.spec, 0, &hub::FetchOptions::default(), Some(format)) {
        Ok(l) => l,
        Err(e) => return skip_all(format!("cannot load: {e}"), rows),
    };
    let tokenizer = loaded.tokenizer;
    let mut engine = CpuEngine::new(loaded.weights);
    for (batch, prompt) in shapes {
        let mut row = row(batch, prompt);
        if prompt + plan.new_tokens > config.n_positions || prompt == 0 {
            row.skipped = Some(format!(
                "prompt {prompt} + {} new tokens do not fit the context of {}",
                plan.new_tokens, config.n_positions
            ));
            rows.push(row);
            bar.inc(1);
            continue;
        }
        bar.set_message(format!("{name} {dtype} batch {batch} prompt {prompt}"));
        match measure(
            &mut engine,
            &tokenizer,
            config,
            batch,
            prompt,
            plan.new_tokens,
            plan.reps,
        ) {
            Ok(measured) => fill(&mut row, measured, config, format, hw),
            Err(e) => row.skipped = Some(format!("failed: {e}")),
        }
        row.peak_memory_bytes = peak_memory();
        // transformers runs f32 on the CPU: compare the f32 rows only.
        if let (Some(t), None, DType::F32) = (theirs, &row.skipped, dtype) {
            bar.set_message(format!(
                "{name} batch {batch} prompt {prompt} through transformers"
            ));
            // The same weights: the preset's shape at random, or the same directory.
            let theirs_model = match &m.spec {
                ModelSpec::Dir(dir) => dir.display().to_string(),
                _ => name.clone(),
            };
            let mut c = t.run(
                &theirs_model,
                batch,
                prompt,
                plan.new_tokens,
                hw.threads,
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

fn empty_row(m: &BenchModel, format: WeightFormat, batch: usize, prompt: usize, new: usize) -> Row {
    Row {
        backend: "cpu".into(),
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
        decode_roofline: None,
        prefill_roofline: None,
        decode_ceiling_tok_s: None,
        compare: None,
    }
}

struct Measured {
    prefill_tok_s: Vec<f64>,
    ttft_ms: Vec<f64>,
    decode_tok_s: Vec<f64>,
    ms_per_step: Vec<f64>,
}

fn measure(
    engine: &mut CpuEngine,
    tokenizer: &Tokenizer,
    c: &Gpt2Config,
    batch: usize,
    prompt_len: usize,
    new_tokens: usize,
    reps: usize,
) -> gpt2rs::Result<Measured> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    let prompts: Vec<Vec<u32>> = (0..batch)
        .map(|_| {
            (0..prompt_len)
                .map(|_| rng.random_range(0..c.vocab_size as u32))
                .collect()
        })
        .collect();
    let cfg = |n| GenerationConfig {
        max_new_tokens: n,
        stop_at_eos: false,
        ..GenerationConfig::default()
    };
    generate(engine, tokenizer, &prompts, &cfg(2), &mut |_| {})?; // warm-up
    let mut m = Measured {
        prefill_tok_s: vec![],
        ttft_ms: vec![],
        decode_tok_s: vec![],
        ms_per_step: vec![],
    };
    for _ in 0..reps.max(1) {
        let (_, s) = generate(engine, tokenizer, &prompts, &cfg(new_tokens), &mut |_| {})?;
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

fn fill(row: &mut Row, m: Measured, c: &Gpt2Config, format: WeightFormat, hw: &Hardware) {
    let stat = |v: &[f64]| (!v.is_empty()).then(|| Stat::of(v));
    row.prefill_tok_s = stat(&m.prefill_tok_s);
    row.ttft_ms = stat(&m.ttft_ms);
    row.decode_tok_s = stat(&m.decode_tok_s);
    row.decode_ms_per_step = stat(&m.ms_per_step);
    // Decode floor: every weight read once per step, plus each sequence's KV cache
    // (at the mean context length of the run), at the measured read bandwidth.
    let mean_ctx = row.prompt_len as f64 + row.new_tokens as f64 / 2.0;
    let position_table = 4.0 * (c.n_positions * c.n_embd) as f64; // only one row is read
    let bytes = format.model_bytes(c) as f64 - position_table
        + row.batch as f64 * mean_ctx * c.kv_bytes_per_token(4) as f64;
    let ceiling = row.batch as f64 / (bytes / (hw.mem_read_gbs * 1e9));
    row.decode_ceiling_tok_s = Some(ceiling);
    row.decode_roofline = row.decode_tok_s.map(|s| s.median / ceiling);
    // Prefill floor: 2 FLOPs per non-embedding weight per prompt token at the FMA peak.
    let matmul_params = (c.params_read_per_token() - (c.vocab_size * c.n_embd) as u64) as f64;
    let prefill_ceiling = hw.f32_fma_peak_gflops * 1e9 / (2.0 * matmul_params);
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
