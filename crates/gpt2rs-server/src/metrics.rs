//! Counters, gauges and latency histograms, written in Prometheus' text format for `/metrics`.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::Duration;

/// Bucket bounds in seconds, shared by the latency histograms (1 ms to 60 s).
const BUCKETS: [f64; 16] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0,
];

/// A cumulative histogram of durations.
#[derive(Default)]
pub struct Histogram {
    inner: Mutex<HistogramData>,
}

#[derive(Default, Clone)]
struct HistogramData {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        let mut h = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        for (c, &b) in h.counts.iter_mut().zip(&BUCKETS) {
            if s <= b {
                *c += 1;
            }
        }
        h.count += 1;
        h.sum += s;
    }

    fn write(&self, out: &mut String, name: &str, help: &str) {
        let h = self.inner.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (c, b) in h.counts.iter().zip(BUCKETS) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {c}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", h.count);
        let _ = writeln!(out, "{name}_sum {}\n{name}_count {}", h.sum, h.count);
    }
}

/// HTTP outcomes counted by status class and reason.
#[derive(Default)]
pub struct Outcomes {
    pub ok: AtomicU64,
    pub invalid: AtomicU64,
    pub rejected_busy: AtomicU64,
    pub unavailable: AtomicU64,
    pub timed_out: AtomicU64,
    pub failed: AtomicU64,
    pub cancelled: AtomicU64,
}

/// Everything `/metrics` reports.
#[derive(Default)]
pub struct Metrics {
    pub requests: Outcomes,
    pub prompt_tokens: AtomicU64,
    pub generation_tokens: AtomicU64,
    /// Requests waiting for a place in a running batch.
    pub queue_depth: AtomicU64,
    /// Sequences in the running batches (all engines).
    pub running_sequences: AtomicU64,
    pub engine_steps: AtomicU64,
    pub time_to_first_token: Histogram,
    pub inter_token_latency: Histogram,
    pub request_duration: Histogram,
    pub step_duration: Histogram,
}

impl Metrics {
    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let r = &self.requests;
        let _ = writeln!(
            out,
            "# HELP gpt2rs_requests_total Completion requests by outcome.\n\
             # TYPE gpt2rs_requests_total counter"
        );
        for (outcome, c) in [
            ("ok", &r.ok),
            ("invalid", &r.invalid),
            ("rejected_busy", &r.rejected_busy),
            ("unavailable", &r.unavailable),
            ("timeout", &r.timed_out),
            ("failed", &r.failed),
            ("cancelled", &r.cancelled),
        ] {
            let _ = writeln!(
                out,
                "gpt2rs_requests_total{{outcome=\"{outcome}\"}} {}",
                c.load(Relaxed)
            );
        }
        for (name, kind, help, v) in [
            (
                "gpt2rs_prompt_tokens_total",
                "counter",
                "Prompt tokens prefilled.",
                &self.prompt_tokens,
            ),
            (
                "gpt2rs_generation_tokens_total",
                "counter",
                "Tokens generated.",
                &self.generation_tokens,
            ),
            (
                "gpt2rs_engine_steps_total",
                "counter",
                "Engine passes run.",
                &self.engine_steps,
            ),
            (
                "gpt2rs_queue_depth",
                "gauge",
                "Requests waiting for a place in a running batch.",
                &self.queue_depth,
            ),
            (
                "gpt2rs_running_sequences",
                "gauge",
                "Sequences in the running batches.",
                &self.running_sequences,
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {}",
                v.load(Relaxed)
            );
        }
        self.time_to_first_token.write(
            &mut out,
            "gpt2rs_time_to_first_token_seconds",
            "From a request's arrival to its first generated token.",
        );
        self.inter_token_latency.write(
            &mut out,
            "gpt2rs_inter_token_latency_seconds",
            "Between consecutive tokens of a sequence.",
        );
        self.request_duration.write(
            &mut out,
            "gpt2rs_request_duration_seconds",
            "From a request's arrival to its last token.",
        );
        self.step_duration.write(
            &mut out,
            "gpt2rs_engine_step_seconds",
            "One engine pass over the running batch.",
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let m = Metrics::default();
        m.inter_token_latency.observe(Duration::from_millis(3));
        m.inter_token_latency.observe(Duration::from_millis(40));
        m.queue_depth.store(5, Relaxed);
        let text = m.render();
        assert!(text.contains("gpt2rs_inter_token_latency_seconds_bucket{le=\"0.001\"} 0"));
        assert!(text.contains("gpt2rs_inter_token_latency_seconds_bucket{le=\"0.005\"} 1"));
        assert!(text.contains("gpt2rs_inter_token_latency_seconds_bucket{le=\"0.05\"} 2"));
        assert!(text.contains("gpt2rs_inter_token_latency_seconds_bucket{le=\"+Inf\"} 2"));
        assert!(text.contains("gpt2rs_inter_token_latency_seconds_count 2"));
        assert!(text.contains("gpt2rs_queue_depth 5"));
        assert!(text.contains("# TYPE gpt2rs_requests_total counter"));
    }
}
