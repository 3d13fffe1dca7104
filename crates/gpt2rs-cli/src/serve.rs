//! `gpt2rs serve` and `gpt2rs loadtest`: thin layers over the gpt2rs-server crate.

use crate::args::{LoadtestArgs, ServeArgs};
use anyhow::{anyhow, bail, Context, Result};
use gpt2rs::scheduler::SchedulerConfig;
use gpt2rs_server::loadtest::{self, LoadPlan};
use gpt2rs_server::worker::EngineFactory;
use gpt2rs_server::ServerConfig;
use std::sync::Arc;
use std::time::Duration;

/// `--devices 0,1` means GPUs 0 and 1; names (cpu, cuda:N) pass through.
fn device_names(a: &ServeArgs) -> Vec<String> {
    if a.devices.is_empty() {
        return vec![a.device.clone()];
    }
    a.devices
        .iter()
        .map(|d| {
            let d = d.trim();
            if d.chars().all(|c| c.is_ascii_digit()) {
                format!("cuda:{d}")
            } else {
                d.to_string()
            }
        })
        .collect()
}

pub fn serve(a: ServeArgs) -> Result<()> {
    let devices = device_names(&a);
    for (i, d) in devices.iter().enumerate() {
        crate::device::Device::parse(d)?;
        if d.starts_with("cuda") && devices[..i].contains(d) {
            eprintln!(
                "note: {d} is named more than once; engines on one GPU take turns, so this \
                 serves no faster than one engine there"
            );
        }
    }
    let m = crate::commands::load(&a.model)?;
    let config = m.weights.config.clone();
    let model_name =
        a.served_model_name
            .clone()
            .unwrap_or_else(|| match (&a.model.model, m.synthetic) {
                (Some(name), false) => name.clone(),
                _ => "gpt2".into(),
            });
    let max_tokens = a.max_tokens.unwrap_or(config.n_positions);
    // A CPU step's cost grows with every row (compute-bound): small batches keep latency
    // near the batch-1 step; a GPU reads its weights once for many rows almost for free.
    let on_gpu = devices.iter().any(|d| d.starts_with("cuda"));
    let max_batch = a.max_batch.unwrap_or(if on_gpu { 64 } else { 10 });
    // On the H200, 128 tokens a step gave 15x one-at-a-time throughput under 64 clients and a
    // p99 inter-token latency of 5.4 ms; 512 gave 10.6x and 11.7 ms (docs/benchmarks.md).
    let max_step_tokens = a.max_step_tokens.unwrap_or(if on_gpu { 128 } else { 14 });
    if max_batch == 0 || max_step_tokens == 0 {
        bail!("--max-batch and --max-step-tokens must be at least 1");
    }
    // One engine per device, each built on its own thread; every one but the last gets a copy.
    let mut engines: Vec<(String, EngineFactory)> = Vec::new();
    let mut weights = Some(m.weights);
    for (i, d) in devices.iter().enumerate() {
        let w = if i + 1 == devices.len() {
            weights.take().expect("weights for the last engine")
        } else {
            weights.as_ref().expect("weights kept").clone()
        };
        let device = d.clone();
        engines.push((
            d.clone(),
            Box::new(move || crate::device::open_engine(w, &device).map_err(|e| format!("{e:#}"))),
        ));
    }
    let cfg = ServerConfig {
        host: a.host.clone(),
        port: a.port,
        model_name: model_name.clone(),
        scheduler: SchedulerConfig {
            max_running: max_batch,
            max_step_tokens,
        },
        max_queue: a.max_queue,
        max_tokens_per_request: max_tokens,
        request_timeout: Duration::from_secs(a.request_timeout),
        body_limit: a.body_limit,
        body_timeout: Duration::from_secs(10),
        shutdown_grace: Duration::from_secs(a.shutdown_grace),
        handle_signals: true,
    };
    let server = gpt2rs_server::spawn(cfg, config, Arc::new(m.tokenizer), engines)
        .map_err(|e| anyhow!(e))?;
    eprintln!(
        "serving '{model_name}' on {} with {} engine(s), batches of up to {max_batch} sequences \
         and {max_step_tokens} tokens per step; POST http://{}/v1/completions (Ctrl-C stops)",
        devices.join(", "),
        devices.len(),
        server.addr
    );
    server.wait();
    eprintln!("stopped");
    Ok(())
}

/// `N` or `MIN-MAX`.
fn range(s: &str, what: &str) -> Result<(usize, usize)> {
    let parse = |x: &str| {
        x.trim()
            .parse::<usize>()
            .with_context(|| format!("--{what} '{s}': use N or MIN-MAX"))
    };
    let (lo, hi) = match s.split_once('-') {
        Some((lo, hi)) => (parse(lo)?, parse(hi)?),
        None => (parse(s)?, parse(s)?),
    };
    if lo == 0 || lo > hi {
        bail!("--{what} '{s}': need 1 <= MIN <= MAX");
    }
    Ok((lo, hi))
}

pub fn loadtest(a: LoadtestArgs) -> Result<()> {
    let plan = LoadPlan {
        url: a.url.clone(),
        clients: a.clients,
        requests: a.requests,
        prompt_tokens: range(&a.prompt_tokens, "prompt-tokens")?,
        max_tokens: range(&a.max_tokens, "max-tokens")?,
        seed: a.seed,
        timeout: Duration::from_secs(a.timeout),
    };
    eprintln!(
        "loadtest: {} requests from {} clients to {}",
        plan.requests, plan.clients, plan.url
    );
    let concurrent = loadtest::run(&plan);
    let sequential = a.compare_sequential.then(|| {
        eprintln!("the same requests one at a time…");
        loadtest::run(&LoadPlan {
            clients: 1,
            ..plan.clone()
        })
    });
    let lost = concurrent.incomplete + sequential.as_ref().map_or(0, |s| s.incomplete);
    if a.json {
        let mut v = serde_json::json!({"concurrent": concurrent.to_json()});
        if let Some(s) = &sequential {
            v["sequential"] = s.to_json();
            v["speedup"] = (concurrent.tokens_per_sec() / s.tokens_per_sec().max(1e-9)).into();
        }
        println!("{v}");
    } else {
        println!("concurrent: {}", concurrent.summary());
        if let Some(s) = &sequential {
            println!("one at a time: {}", s.summary());
            let batch1 = loadtest::percentile(&s.itl, 0.5);
            println!(
                "continuous batching: {:.2}x the throughput of one at a time; p99 inter-token \
                 latency {:.1} ms = {:.2}x the batch-1 latency ({:.1} ms, the one-at-a-time median)",
                concurrent.tokens_per_sec() / s.tokens_per_sec().max(1e-9),
                loadtest::percentile(&concurrent.itl, 0.99) * 1e3,
                loadtest::percentile(&concurrent.itl, 0.99) / batch1.max(1e-9),
                batch1 * 1e3
            );
        }
        for e in &concurrent.error_samples {
            println!("  e.g. {e}");
        }
    }
    if lost > 0 {
        bail!(
            "{lost} request(s) got no complete answer (is `gpt2rs serve` running at {}?)",
            a.url
        );
    }
    Ok(())
}
