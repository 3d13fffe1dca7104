//! A bounded load test for a running server: N concurrent streaming clients with mixed prompt
//! and output lengths, each request checked for a complete answer (text, finish reason,
//! usage, `[DONE]`) or a clean error. Loopback use only: it is a benchmark, not a flood.

use rand::{Rng, SeedableRng};
use std::io::{BufRead, BufReader};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// What to send.
#[derive(Debug, Clone)]
pub struct LoadPlan {
    /// Base URL, e.g. http://127.0.0.1:8080.
    pub url: String,
    pub clients: usize,
    pub requests: usize,
    /// Prompt lengths in tokens, drawn uniformly from this inclusive range.
    pub prompt_tokens: (usize, usize),
    /// max_tokens, drawn uniformly from this inclusive range.
    pub max_tokens: (usize, usize),
    pub seed: u64,
    /// Per request, from send to [DONE].
    pub timeout: Duration,
}

/// One request of the plan.
#[derive(Debug, Clone)]
struct Spec {
    prompt: Vec<u32>,
    max_tokens: usize,
    seed: u64,
}

/// What one request saw.
#[derive(Debug, Default)]
struct Seen {
    ttft: Option<f64>,
    gaps: Vec<f64>,
    completion_tokens: usize,
}

/// The outcome of a load test.
#[derive(Debug, Default)]
pub struct LoadReport {
    pub clients: usize,
    pub requests: usize,
    pub completed: usize,
    /// Requests that ended with an error status or error event (kept: the first few).
    pub errors: usize,
    pub error_samples: Vec<String>,
    /// Requests that ended without [DONE], a finish reason or usage: lost work.
    pub incomplete: usize,
    pub wall: Duration,
    pub completion_tokens: usize,
    pub ttft: Vec<f64>,
    pub itl: Vec<f64>,
}

impl LoadReport {
    pub fn tokens_per_sec(&self) -> f64 {
        self.completion_tokens as f64 / self.wall.as_secs_f64().max(1e-9)
    }

    /// One line per figure, for people.
    pub fn summary(&self) -> String {
        format!(
            "{} clients, {} requests: {} complete, {} errors, {} incomplete in {:.2} s\n  \
             throughput {:.1} tok/s ({} tokens)\n  time to first token p50 {:.1} ms, p99 {:.1} ms\n  \
             inter-token latency p50 {:.1} ms, p99 {:.1} ms",
            self.clients,
            self.requests,
            self.completed,
            self.errors,
            self.incomplete,
            self.wall.as_secs_f64(),
            self.tokens_per_sec(),
            self.completion_tokens,
            percentile(&self.ttft, 0.5) * 1e3,
            percentile(&self.ttft, 0.99) * 1e3,
            percentile(&self.itl, 0.5) * 1e3,
            percentile(&self.itl, 0.99) * 1e3,
        )
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "clients": self.clients,
            "requests": self.requests,
            "completed": self.completed,
            "errors": self.errors,
            "error_samples": self.error_samples,
            "incomplete": self.incomplete,
            "wall_s": self.wall.as_secs_f64(),
            "completion_tokens": self.completion_tokens,
            "tokens_per_sec": self.tokens_per_sec(),
            "ttft_p50_ms": percentile(&self.ttft, 0.5) * 1e3,
            "ttft_p99_ms": percentile(&self.ttft, 0.99) * 1e3,
            "itl_p50_ms": percentile(&self.itl, 0.5) * 1e3,
            "itl_p99_ms": percentile(&self.itl, 0.99) * 1e3,
        })
    }
}

/// The `q` quantile (nearest rank) of `v`; 0 when empty.
pub fn percentile(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let rank = ((q * s.len() as f64).ceil() as usize).clamp(1, s.len());
    s[rank - 1]
}

fn specs(plan: &LoadPlan) -> Vec<Spec> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(plan.seed);
    (0..plan.requests)
        .map(|i| {
            let len = rng.random_range(
                plan.prompt_tokens.0..=plan.prompt_tokens.1.max(plan.prompt_tokens.0),
            );
            Spec {
                // Common token ids, so any GPT-2 vocabulary accepts them.
                prompt: (0..len.max(1))
                    .map(|_| rng.random_range(200..20000))
                    .collect(),
                max_tokens: rng
                    .random_range(plan.max_tokens.0..=plan.max_tokens.1.max(plan.max_tokens.0)),
                seed: plan.seed ^ i as u64,
            }
        })
        .collect()
}

/// Runs the plan after one warm-up request: `clients` threads take requests in turn until
/// all are sent.
pub fn run(plan: &LoadPlan) -> LoadReport {
    let specs = specs(plan);
    let next = AtomicUsize::new(0);
    let results = Mutex::new(Vec::new());
    let agent = ureq::Agent::new_with_config(
        ureq::config::Config::builder()
            .http_status_as_error(false)
            .timeout_global(Some(plan.timeout))
            .build(),
    );
    let url = format!("{}/v1/completions", plan.url.trim_end_matches('/'));
    // One request first, not counted: a fresh server's first pass compiles or captures what
    // later ones reuse (CUDA graphs), which `generate`'s figures do not include either.
    if let Some(first) = specs.first() {
        let _ = one(&agent, &url, first);
    }
    let start = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..plan.clients.max(1) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Relaxed);
                let Some(spec) = specs.get(i) else { break };
                let r = one(&agent, &url, spec);
                results.lock().unwrap_or_else(|e| e.into_inner()).push(r);
            });
        }
    });
    let mut report = LoadReport {
        clients: plan.clients.max(1),
        requests: specs.len(),
        wall: start.elapsed(),
        ..LoadReport::default()
    };
    for r in results.into_inner().unwrap_or_else(|e| e.into_inner()) {
        match r {
            Ok(Ok(seen)) => {
                report.completed += 1;
                report.completion_tokens += seen.completion_tokens;
                report.ttft.extend(seen.ttft);
                report.itl.extend(seen.gaps);
            }
            Ok(Err(e)) => {
                report.errors += 1;
                if report.error_samples.len() < 5 {
                    report.error_samples.push(e);
                }
            }
            Err(e) => {
                report.incomplete += 1;
                if report.error_samples.len() < 5 {
                    report.error_samples.push(e);
                }
            }
        }
    }
    report
}

/// Sends one streaming request. Outer error: the answer broke off (lost work); inner error:
/// the server answered with a clean error.
fn one(agent: &ureq::Agent, url: &str, spec: &Spec) -> Result<Result<Seen, String>, String> {
    let body = serde_json::json!({
        "prompt": spec.prompt,
        "max_tokens": spec.max_tokens,
        "temperature": 1.0,
        "seed": spec.seed,
        "stream": true,
        "stream_options": {"include_usage": true},
    })
    .to_string();
    let sent = Instant::now();
    let resp = agent
        .post(url)
        .header("content-type", "application/json")
        .send(&body)
        .map_err(|e| format!("request failed: {e}"))?;
    let status = resp.status().as_u16();
    if status != 200 {
        let mut resp = resp;
        let text = resp.body_mut().read_to_string().unwrap_or_default();
        return Ok(Err(format!("HTTP {status}: {text}")));
    }
    let mut seen = Seen::default();
    let mut last: Option<Instant> = None;
    let mut finished = false;
    let mut done = false;
    let mut usage = false;
    for line in BufReader::new(resp.into_body().into_reader()).lines() {
        let line = line.map_err(|e| format!("stream broke off: {e}"))?;
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            done = true;
            break;
        }
        let v: serde_json::Value =
            serde_json::from_str(data).map_err(|e| format!("bad chunk {data:?}: {e}"))?;
        if let Some(err) = v.get("error") {
            return Ok(Err(format!("error event: {err}")));
        }
        if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
            usage = true;
            seen.completion_tokens = u["completion_tokens"].as_u64().unwrap_or(0) as usize;
        }
        for c in v["choices"].as_array().into_iter().flatten() {
            let now = Instant::now();
            if c["text"].as_str().is_some_and(|t| !t.is_empty()) {
                match last {
                    None => seen.ttft = Some((now - sent).as_secs_f64()),
                    Some(prev) => seen.gaps.push((now - prev).as_secs_f64()),
                }
                last = Some(now);
            }
            if !c["finish_reason"].is_null() {
                finished = true;
            }
        }
    }
    if !(done && finished && usage) {
        return Err(format!(
            "incomplete stream (done {done}, finish reason {finished}, usage {usage})"
        ));
    }
    Ok(Ok(seen))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), 50.0);
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert_eq!(percentile(&[3.0], 0.99), 3.0);
        assert_eq!(percentile(&[], 0.5), 0.0);
    }

    #[test]
    fn plans_are_reproducible_and_in_range() {
        let plan = LoadPlan {
            url: String::new(),
            clients: 4,
            requests: 50,
            prompt_tokens: (4, 40),
            max_tokens: (8, 64),
            seed: 9,
            timeout: Duration::from_secs(1),
        };
        let a = specs(&plan);
        let b = specs(&plan);
        assert_eq!(a.len(), 50);
        for (x, y) in a.iter().zip(&b) {
            assert_eq!(x.prompt, y.prompt);
            assert!((4..=40).contains(&x.prompt.len()));
            assert!((8..=64).contains(&x.max_tokens));
        }
    }
}
