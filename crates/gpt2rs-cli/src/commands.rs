//! The subcommands: thin layers over the library.

use crate::args::{GenerateArgs, InfoArgs, ModelArgs, QuantizeArgs, ScoreArgs};
use anyhow::{bail, Context, Result};
use gpt2rs::checkpoint::Checkpoint;
use gpt2rs::config::Gpt2Config;
use gpt2rs::cpu::CpuEngine;
use gpt2rs::generate::{self, GenerationConfig, SamplingParams};
use gpt2rs::hub::{FetchOptions, ModelSpec};
use gpt2rs::memory::{self, Bytes};
use gpt2rs::model::{self, LoadedModel};
use gpt2rs::quant::{saved, DType, WeightFormat};
use std::io::{IsTerminal, Write};
use std::time::Instant;

fn model_spec(args: &ModelArgs) -> Result<ModelSpec> {
    Ok(match (&args.synthetic, &args.model) {
        (Some(s), _) => ModelSpec::synthetic(s)?,
        (None, Some(m)) => ModelSpec::parse(m)?,
        (None, None) => ModelSpec::synthetic("gpt2")?,
    })
}

/// The weight format asked for with --dtype / --f32-lm-head (None: the loader's default).
fn weight_format(args: &ModelArgs) -> Result<Option<WeightFormat>> {
    match (&args.dtype, args.f32_lm_head) {
        (None, false) => Ok(None),
        (None, true) => bail!("--f32-lm-head goes with --dtype f16|bf16|int8|int4"),
        (Some(d), keep) => Ok(Some(WeightFormat {
            dtype: DType::parse(d)?,
            quantize_lm_head: !keep,
        })),
    }
}

/// Loads the model and says on stderr what was loaded (loudly, when the weights are random).
pub fn load(args: &ModelArgs) -> Result<LoadedModel> {
    load_in(args, weight_format(args)?)
}

/// [`load`] in a given weight format.
fn load_in(args: &ModelArgs, format: Option<WeightFormat>) -> Result<LoadedModel> {
    let spec = model_spec(args)?;
    let start = Instant::now();
    let fetch = FetchOptions {
        progress: std::io::stderr().is_terminal(),
        config_only: false,
    };
    let m = model::load_as(&spec, args.weights_seed, &fetch, format)?;
    eprintln!(
        "model: {} [{} layers, {} wide, {} params; {} weights, {}] loaded in {:.2} s",
        m.source,
        m.weights.config.n_layer,
        m.weights.config.n_embd,
        millions(m.weights.config.param_count()),
        m.weights.format.label(),
        Bytes(m.weights.bytes()),
        start.elapsed().as_secs_f64()
    );
    if m.synthetic {
        eprintln!(
            "note: SYNTHETIC weights (random, exact GPT-2 shapes): speed is real, the text is \
             meaningless. Pass --model gpt2 (or a checkpoint directory) for a trained model."
        );
    }
    Ok(m)
}

fn millions(n: u64) -> String {
    format!("{:.1}M", n as f64 / 1e6)
}

pub fn generate(a: GenerateArgs) -> Result<()> {
    let mut prompts = a.prompt.clone();
    if let Some(path) = &a.prompt_file {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read prompt file {}", path.display()))?;
        prompts.extend(
            text.lines()
                .filter(|l| !l.trim().is_empty())
                .map(String::from),
        );
    }
    if prompts.is_empty() {
        prompts.push(String::new());
        eprintln!("note: no --prompt given: generating from <|endoftext|> (unconditional text)");
    }
    let sampling =
        if a.greedy || (a.temperature.is_none() && a.top_k.is_none() && a.top_p.is_none()) {
            SamplingParams {
                repetition_penalty: a.repetition_penalty,
                ..SamplingParams::greedy()
            }
        } else {
            SamplingParams {
                temperature: Some(a.temperature.unwrap_or(1.0)),
                top_k: a.top_k.unwrap_or(0),
                top_p: a.top_p.unwrap_or(1.0),
                repetition_penalty: a.repetition_penalty,
            }
        };
    let seed = a.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
    });
    let cfg = GenerationConfig {
        max_new_tokens: a.max_new_tokens,
        sampling,
        seed,
        num_return_sequences: a.num_return_sequences,
        stop_at_eos: !a.ignore_eos,
        stop_strings: a.stop.clone(),
        truncate_prompt: a.truncate,
    };
    cfg.sampling.validate()?;

    let m = load(&a.model)?;
    let token_prompts: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| m.tokenizer.encode(p))
        .collect::<gpt2rs::Result<_>>()?;
    for (p, ids) in prompts.iter().zip(&token_prompts) {
        let room = m.weights.config.n_positions.saturating_sub(ids.len());
        if ids.len() <= m.weights.config.n_positions && a.max_new_tokens > room {
            eprintln!(
                "note: prompt {:?}… has {} tokens; the context ({}) leaves room for {} new tokens, not {}",
                p.chars().take(20).collect::<String>(),
                ids.len(),
                m.weights.config.n_positions,
                room,
                a.max_new_tokens
            );
        }
    }
    let mut engine = crate::device::open_engine(m.weights, &a.device)?;
    eprintln!("engine: {}", engine.describe());

    let streaming = !a.json && prompts.len() * a.num_return_sequences == 1;
    let stdout = std::io::stdout();
    if streaming {
        let mut out = stdout.lock();
        write!(out, "{}", prompts[0])?;
        out.flush()?;
    }
    let (completions, stats) = generate::generate(
        engine.as_mut(),
        &m.tokenizer,
        &token_prompts,
        &cfg,
        &mut |ev| {
            if streaming {
                let mut out = stdout.lock();
                let _ = write!(out, "{}", ev.text);
                let _ = out.flush();
            }
        },
    )?;
    let mut out = stdout.lock();
    if streaming {
        writeln!(out)?;
    } else {
        for c in &completions {
            if a.json {
                let obj = serde_json::json!({
                    "prompt_index": c.prompt_index,
                    "sample_index": c.sample_index,
                    "prompt": prompts[c.prompt_index],
                    "text": c.text,
                    "tokens": c.tokens,
                    "finish_reason": c.finish_reason.as_str(),
                });
                writeln!(out, "{obj}")?;
            } else {
                writeln!(
                    out,
                    "=== prompt {} sample {} ({}) ===\n{}{}",
                    c.prompt_index + 1,
                    c.sample_index + 1,
                    c.finish_reason.as_str(),
                    prompts[c.prompt_index],
                    c.text
                )?;
            }
        }
    }
    if a.stats {
        let seqs = completions.len();
        eprintln!(
            "stats: {} prompt tokens in {} sequence(s); time to first token {:.1} ms; prefill {:.1} tok/s; \
             decode {} tokens in {:.3} s = {:.1} tok/s ({:.2} ms/step){}",
            stats.prompt_tokens,
            seqs,
            stats.time_to_first_token.as_secs_f64() * 1e3,
            stats.prefill_tokens_per_sec(),
            stats.decode_tokens,
            stats.decode_time.as_secs_f64(),
            stats.decode_tokens_per_sec(),
            stats.decode_time.as_secs_f64() * 1e3 / stats.decode_steps.max(1) as f64,
            if cfg.sampling.is_greedy() { String::new() } else { format!("; seed {seed}") }
        );
    }
    Ok(())
}

pub fn score(a: ScoreArgs) -> Result<()> {
    let text = std::fs::read_to_string(&a.text_file)
        .with_context(|| format!("cannot read {}", a.text_file.display()))?;
    let m = load(&a.model)?;
    let format = m.weights.format;
    let ids = m.tokenizer.encode(&text)?;
    let mut engine = crate::device::open_engine(m.weights, &a.device)?;
    let start = Instant::now();
    let report = gpt2rs::score::score(engine.as_mut(), &ids, a.max_length, a.stride)?;
    let secs = start.elapsed().as_secs_f64();
    // The same model in the reference precision, for the quality cost of --dtype.
    let against = match &a.against {
        Some(d) => {
            let reference = load_in(&a.model, Some(WeightFormat::new(DType::parse(d)?)))?;
            let label = reference.weights.format.label();
            let mut reference = CpuEngine::new(reference.weights);
            let ref_report = gpt2rs::score::score(&mut reference, &ids, a.max_length, a.stride)?;
            let div = gpt2rs::score::divergence(
                engine.as_mut(),
                &mut reference,
                &ids,
                a.max_length,
                a.stride,
            )?;
            Some((label, ref_report, div))
        }
        None => None,
    };
    if a.json {
        let mut obj = serde_json::to_value(&report)?;
        obj["model"] = m.source.clone().into();
        obj["synthetic"] = m.synthetic.into();
        obj["weights"] = format.label().into();
        obj["seconds"] = secs.into();
        if let Some((label, r, div)) = &against {
            obj["against"] = serde_json::json!({
                "weights": label,
                "mean_nll": r.mean_nll,
                "perplexity": r.perplexity,
                "divergence": div,
            });
        }
        println!("{}", serde_json::to_string_pretty(&obj)?);
    } else {
        println!(
            "text:        {} ({} tokens)",
            a.text_file.display(),
            report.text_tokens
        );
        println!(
            "protocol:    sliding window of {} tokens, stride {} ({} windows)",
            report.max_length, report.stride, report.windows
        );
        println!("scored:      {} tokens", report.scored_tokens);
        println!("mean NLL:    {:.6} nats/token", report.mean_nll);
        println!("perplexity:  {:.4}", report.perplexity);
        println!(
            "             ({:.4} as the perplexity guide's code weights windows)",
            report.guide_perplexity
        );
        println!("weights:     {}", format.label());
        println!("time:        {:.2} s", secs);
        if let Some((label, r, div)) = &against {
            println!("against {label}:");
            println!(
                "  perplexity:      {:.4} ({label}) vs {:.4} ({}): {:+.2}%",
                r.perplexity,
                report.perplexity,
                format.label(),
                (report.perplexity / r.perplexity - 1.0) * 100.0
            );
            println!(
                "  KL divergence:   mean {:.3e} nats, max {:.3e} over {} positions",
                div.mean_kl, div.max_kl, div.positions
            );
            println!("  top-1 agreement: {:.2}%", div.top1_agreement * 100.0);
        }
    }
    Ok(())
}

pub fn quantize(a: QuantizeArgs) -> Result<()> {
    let Some(format) = weight_format(&a.model)? else {
        bail!("say which format to save with --dtype f16|bf16|int8|int4");
    };
    let spec = model_spec(&a.model)?;
    if let ModelSpec::Dir(dir) = &spec {
        if dir.canonicalize().ok() == a.out.canonicalize().ok() {
            bail!("--out must not be the model's own directory");
        }
    }
    if a.out.join("model.safetensors").exists() && !a.force {
        bail!(
            "{} already holds a model: choose another --out, or pass --force to replace it",
            a.out.display()
        );
    }
    let m = load_in(&a.model, Some(format))?;
    let start = Instant::now();
    saved::save(&m.weights, &a.out)?;
    // The tokenizer travels with the weights: the checkpoint's own, or GPT-2's.
    let source_tokenizer = match &spec {
        ModelSpec::Dir(dir) => Some(dir.join("tokenizer.json")),
        ModelSpec::Hub { repo, revision } => {
            gpt2rs::hub::cached_snapshot(repo, revision).map(|d| d.join("tokenizer.json"))
        }
        ModelSpec::Synthetic { .. } => None,
    };
    let dest = a.out.join("tokenizer.json");
    match source_tokenizer.filter(|p| p.is_file()) {
        Some(src) => std::fs::copy(&src, &dest).map(|_| ()),
        None => std::fs::write(&dest, gpt2rs::tokenizer::GPT2_TOKENIZER_JSON),
    }
    .with_context(|| format!("cannot write {}", dest.display()))?;
    let file_bytes = std::fs::metadata(a.out.join("model.safetensors"))?.len();
    println!(
        "wrote {} ({} weights, {} on disk) in {:.1} s; load it with --model {}",
        a.out.display(),
        m.weights.format.label(),
        Bytes(file_bytes),
        start.elapsed().as_secs_f64(),
        a.out.display()
    );
    if m.synthetic {
        println!("note: these are SYNTHETIC (random) weights");
    }
    Ok(())
}

pub fn info(a: InfoArgs) -> Result<()> {
    let spec = model_spec(&a.model)?;
    let (config, source, stored) = match &spec {
        ModelSpec::Synthetic { name, config } => (
            config.clone(),
            format!("synthetic {name} (random weights)"),
            None,
        ),
        ModelSpec::Dir(dir) => {
            let ckpt = Checkpoint::open(dir)?;
            let stored = describe_files(&ckpt);
            (ckpt.config.clone(), dir.display().to_string(), Some(stored))
        }
        ModelSpec::Hub { repo, revision } => {
            let dir = gpt2rs::hub::fetch(
                repo,
                revision,
                &FetchOptions {
                    progress: false,
                    config_only: true,
                },
            )?;
            let config = Gpt2Config::from_file(&dir.join("config.json"))?;
            (
                config,
                format!("{repo}@{revision} ({})", dir.display()),
                None,
            )
        }
    };
    let context = a.context.unwrap_or(config.n_positions);
    if context == 0 || context > config.n_positions {
        bail!(
            "--context must be 1 to {} (the model's context)",
            config.n_positions
        );
    }
    let c = &config;
    println!("model:        {source}");
    if let Some(s) = stored {
        println!("stored:       {s}");
    }
    println!(
        "shape:        {} layers, {} heads of {}, width {}, MLP {}, context {}, vocabulary {}",
        c.n_layer,
        c.n_head,
        c.head_dim(),
        c.n_embd,
        c.n_inner,
        c.n_positions,
        c.vocab_size
    );
    println!(
        "parameters:   {} ({}; {:?} activation)",
        millions(c.param_count()),
        if c.tie_word_embeddings {
            "LM head tied to the token embedding"
        } else {
            "separate LM head"
        },
        c.activation
    );
    let kv_tokens = (context * a.batch) as u64;
    // The engine keeps the KV cache in f32 whatever the weights are.
    let kv = c.kv_bytes_per_token(4) * kv_tokens;
    println!(
        "memory for a context of {context} tokens x {} sequence(s) (KV cache in f32: {}):",
        a.batch,
        Bytes(kv)
    );
    println!("  {:<22} {:>12} {:>12}", "weights", "weights", "total");
    for dtype in DType::ALL {
        for quantize_lm_head in [true, false] {
            let f = WeightFormat {
                dtype,
                quantize_lm_head,
            };
            if dtype == DType::F32 && !quantize_lm_head {
                continue;
            }
            let w = f.model_bytes(c);
            println!(
                "  {:<22} {:>12} {:>12}",
                f.label(),
                Bytes(w).to_string(),
                Bytes(w + kv).to_string()
            );
        }
    }
    match memory::available() {
        Some(b) => println!("available:    {b} of memory on this machine now"),
        None => println!("available:    unknown on this system"),
    }
    Ok(())
}

fn describe_files(ckpt: &Checkpoint) -> String {
    let what = match saved::saved_format(ckpt) {
        Ok(Some(f)) => format!("gpt2rs {} weights", f.label()),
        Ok(None) => ckpt
            .stored_dtype()
            .map(|d| format!("{d:?}"))
            .unwrap_or_else(|| "?".into()),
        Err(e) => format!("unreadable gpt2rs metadata ({e})"),
    };
    let files: Vec<_> = ckpt.files().collect();
    let bytes: u64 = files
        .iter()
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| m.len())
        .sum();
    format!(
        "{what} in {} safetensors file(s), {}",
        files.len(),
        Bytes(bytes)
    )
}

pub fn bench(a: crate::args::BenchArgs) -> Result<()> {
    use crate::bench::{backend, gpu, hardware, plot, report, sweep, types};
    let (mut gpus, no_gpu) = gpu::scan();
    let (mut backends, mut notes) =
        backend::select(&a.device, &gpus, &no_gpu, gpu::BUILT_WITH_CUDA)?;
    if let Some(engine) = &a.compare {
        if engine != "transformers" {
            bail!("--compare knows only 'transformers', got '{engine}'");
        }
    }
    let dtypes = if a.dtypes.is_empty() {
        DType::ALL.to_vec()
    } else {
        a.dtypes
            .iter()
            .map(|d| DType::parse(d))
            .collect::<gpt2rs::Result<Vec<_>>>()?
    };
    if a.reps == 0 || a.batch.contains(&0) {
        bail!("--reps and --batch must be at least 1");
    }
    if let Some(path) = &a.plot {
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        if !matches!(ext, "svg" | "png") {
            bail!("--plot writes .svg or .png files, not '{}'", path.display());
        }
    }
    let or = |v: &Vec<usize>, quick: &[usize], full: &[usize]| {
        if !v.is_empty() {
            v.clone()
        } else if a.full {
            full.to_vec()
        } else {
            quick.to_vec()
        }
    };
    let models = if !a.models.is_empty() {
        a.models.clone()
    } else {
        let mut m: Vec<String> = ["gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"]
            .map(String::from)
            .to_vec();
        if a.full {
            m.insert(0, "distilgpt2".into());
        }
        m
    };
    let models = models
        .iter()
        .map(|m| sweep::resolve(m).map_err(|e| anyhow::anyhow!("--models {m}: {e}")))
        .collect::<Result<Vec<_>>>()?;
    let compare = match &a.compare {
        Some(_) => Some(
            crate::bench::compare::Transformers::find(a.python.as_deref())
                .map_err(anyhow::Error::msg)?,
        ),
        None => None,
    };
    let plan = sweep::Plan {
        models,
        dtypes,
        batches: or(&a.batch, &[1], &[1, 8, 32]),
        prompt_lens: or(&a.prompt_len, &[32], &[32, 128, 512]),
        new_tokens: a.new_tokens.unwrap_or(if a.full { 64 } else { 16 }),
        reps: a.reps,
        compare,
    };
    // The GPUs' ceilings first: a GPU that cannot be measured is left out with the reason.
    for b in backends.clone() {
        if let backend::Backend::Cuda(n) = b {
            eprintln!("measuring cuda:{n}'s memory bandwidth and GEMM rate…");
            if let Err(e) = gpu::measure(&mut gpus, n) {
                notes.push(format!("cuda:{n} not measured: {e:#}"));
                backends.retain(|&x| x != b);
            }
        }
    }
    eprintln!("measuring this machine's memory bandwidth and FLOP/s…");
    let mut hw = hardware::probe(gpus);
    let (rows, drift) = sweep::run(&plan, &hw, &backends);
    hw.drift = drift;
    if rows.iter().any(|r| r.synthetic) {
        notes.insert(
            0,
            "synthetic = random weights of the exact shape (speed is the same as trained weights)"
                .into(),
        );
    }
    if backends.contains(&backend::Backend::Cpu) {
        notes.push(format!(
            "cpu rows: decode roofline: weight bytes (in the row's format) + KV cache (f32) read per step / {:.1} GB/s measured read bandwidth; \
             prefill roofline: 2 FLOPs per non-embedding weight per token / {:.1} GFLOP/s measured FMA peak; peak mem: the process's peak resident memory",
            hw.mem_read_gbs, hw.f32_fma_peak_gflops
        ));
    }
    let on_gpu = backends.iter().any(|b| *b != backend::Backend::Cpu);
    if on_gpu && plan.compare.is_some() {
        notes.push(
            "--compare runs transformers on the CPU in f32, so only the cpu f32 rows are compared"
                .into(),
        );
    }
    if on_gpu {
        notes.push(
            "cuda rows: decode roofline: weight bytes (in the row's format) + KV cache (in the same precision) read per step / \
             the GPU's device-to-device copy bandwidth (bytes read + bytes written, see gpu above); prefill roofline: \
             2 FLOPs per non-embedding weight per token / the GPU's cuBLAS GEMM rate: the f16 rate for f16 and bf16 rows \
             (same tensor cores), the plain-f32 rate (no TF32) for f32 rows; peak mem (GPU): GPU memory the engine held at \
             its peak (weights, KV caches (grown in blocks of 64 positions), scratch, cuBLAS workspace), from cuMemGetInfo; \
             prefill and TTFT include allocating and zeroing the KV caches"
                .into(),
        );
    }
    let report = types::Report {
        header: types::Header {
            gpt2rs_version: env!("CARGO_PKG_VERSION").to_string(),
            git_commit: env!("GPT2RS_GIT_COMMIT").to_string(),
            command: std::env::args().collect::<Vec<_>>().join(" "),
            date_utc: utc_now(),
        },
        hardware: hw,
        rows,
        notes,
    };
    let text = if a.json {
        report::json(&report)
    } else if a.csv {
        report::csv(&report)
    } else if a.markdown {
        report::markdown(&report)
    } else {
        report::table(&report)
    };
    print!("{text}");
    if let Some(path) = &a.plot {
        plot::plot(&report, path)?;
        eprintln!("plot written to {}", path.display());
    }
    Ok(())
}

/// The current time as ISO 8601 UTC, from the system clock (no time-zone data needed).
fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}
