//! Running the same configurations through Hugging Face transformers, in the same run.

use super::types::Comparison;
use std::path::PathBuf;
use std::process::Command;

/// The Python side, shipped inside the binary so `--compare` works from any directory.
const SCRIPT: &str = include_str!("../../../../scripts/bench_transformers.py");

/// A python3 that has torch and transformers.
#[derive(Debug)]
pub struct Transformers {
    python: String,
    script: PathBuf,
    /// "transformers X (torch Y)".
    pub engine: String,
}

impl Transformers {
    /// Finds the interpreter (`python` or `python3` on PATH) and checks its packages.
    pub fn find(python: Option<&str>) -> Result<Self, String> {
        let python = python.unwrap_or("python3").to_string();
        let out = Command::new(&python)
            .args([
                "-c",
                "import torch, transformers; print(transformers.__version__, torch.__version__)",
            ])
            .output()
            .map_err(|e| {
                format!("cannot run {python} ({e}): install Python 3, or pass --python PATH")
            })?;
        if !out.status.success() {
            return Err(format!(
                "{python} has no torch and transformers: `{python} -m pip install torch transformers`, \
                 or pass --python with an interpreter that has them"
            ));
        }
        let versions = String::from_utf8_lossy(&out.stdout);
        let mut v = versions.split_whitespace();
        let engine = format!(
            "transformers {} (torch {})",
            v.next().unwrap_or("?"),
            v.next().unwrap_or("?")
        );
        let script = std::env::temp_dir().join(format!(
            "gpt2rs-bench-transformers-{}.py",
            std::process::id()
        ));
        std::fs::write(&script, SCRIPT)
            .map_err(|e| format!("cannot write {}: {e}", script.display()))?;
        Ok(Self {
            python,
            script,
            engine,
        })
    }

    /// Runs one configuration; errors become a comparison that says why it has no numbers.
    pub fn run(
        &self,
        model: &str,
        batch: usize,
        prompt_len: usize,
        new_tokens: usize,
        threads: usize,
        reps: usize,
    ) -> Comparison {
        let result = Command::new(&self.python)
            .arg(&self.script)
            .args(["--model", model])
            .args(["--batch", &batch.to_string()])
            .args(["--prompt-len", &prompt_len.to_string()])
            .args(["--new-tokens", &new_tokens.max(2).to_string()])
            .args(["--threads", &threads.to_string()])
            .args(["--reps", &reps.to_string()])
            .output();
        let parsed = match result {
            Ok(out) if out.status.success() => {
                serde_json::from_slice::<serde_json::Value>(&out.stdout)
                    .map_err(|e| format!("unreadable output from the transformers script: {e}"))
            }
            Ok(out) => Err(format!(
                "the transformers run failed: {}",
                String::from_utf8_lossy(&out.stderr)
                    .lines()
                    .last()
                    .unwrap_or("no message")
            )),
            Err(e) => Err(format!("cannot run {}: {e}", self.python)),
        };
        match parsed {
            Ok(v) => Comparison {
                engine: self.engine.clone(),
                prefill_tok_s: v["prefill_tok_s"].as_f64(),
                ttft_ms: v["ttft_ms"].as_f64(),
                decode_tok_s: v["decode_tok_s"].as_f64(),
                decode_speedup: None,
                prefill_speedup: None,
                error: None,
            },
            Err(e) => Comparison {
                engine: self.engine.clone(),
                prefill_tok_s: None,
                ttft_ms: None,
                decode_tok_s: None,
                decode_speedup: None,
                prefill_speedup: None,
                error: Some(e),
            },
        }
    }
}

impl Drop for Transformers {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.script);
    }
}
