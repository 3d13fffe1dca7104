//! Command-line arguments.

use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

/// GPT-2 inference that matches Hugging Face transformers, on this machine's CPU or an NVIDIA GPU.
///
/// Models: gpt2, gpt2-medium, gpt2-large, gpt2-xl, distilgpt2, any hub name (owner/name),
/// a local checkpoint directory, or synthetic:PRESET for random weights of the exact shape
/// (no download; the default).
#[derive(Parser, Debug)]
#[command(name = "gpt2rs", version, propagate_version = true)]
pub struct Cli {
    /// Worker threads (default: all cores).
    #[arg(long, global = true)]
    pub threads: Option<usize>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Continue prompts with text.
    Generate(GenerateArgs),
    /// Perplexity of a text (transformers' sliding-window protocol).
    Score(ScoreArgs),
    /// Show a model's configuration, size and memory needs.
    Info(InfoArgs),
    /// Convert a model's weights to a smaller format and save them, ready to load in place.
    Quantize(QuantizeArgs),
    /// Measure prefill and decode speed across models, precisions and batch sizes, held
    /// against this machine's memory bandwidth and FLOP/s.
    Bench(BenchArgs),
    /// Serve the model over HTTP with OpenAI's completions API and continuous batching.
    Serve(ServeArgs),
    /// Load-test a running `gpt2rs serve` (loopback): concurrent streaming clients, throughput
    /// and latency percentiles, every answer checked.
    Loadtest(LoadtestArgs),
}

/// Which model to load.
#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// Model: gpt2 | gpt2-medium | gpt2-large | gpt2-xl | distilgpt2 | owner/name[@revision] |
    /// ./checkpoint-dir | synthetic:PRESET. Default: synthetic:gpt2 (random weights).
    #[arg(long, short = 'm')]
    pub model: Option<String>,
    /// Random weights of this preset's shape (or of a config.json) instead of a checkpoint.
    #[arg(long, value_name = "PRESET|CONFIG", conflicts_with = "model")]
    pub synthetic: Option<String>,
    /// Seed of the synthetic weights.
    #[arg(long, default_value_t = 0)]
    pub weights_seed: u64,
    /// How weight matrices are stored in memory: f32 | f16 | bf16 | int8 | int4 (int8/int4:
    /// groups of 32 inputs with an f16 scale each), converted at load. Default: f32, or the
    /// format a `gpt2rs quantize` checkpoint was saved in.
    #[arg(long, value_name = "PRECISION")]
    pub dtype: Option<String>,
    /// Keep the LM head (and the token embedding tied to it) in f32 when --dtype is smaller.
    #[arg(long)]
    pub f32_lm_head: bool,
}

#[derive(Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Prompt text; repeat the flag to generate for several prompts in one batch.
    #[arg(long, short = 'p')]
    pub prompt: Vec<String>,
    /// Read prompts from a file, one per line.
    #[arg(long, value_name = "FILE")]
    pub prompt_file: Option<PathBuf>,
    /// Where to run: cpu, or cuda / cuda:N for GPU N (builds with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Tokens to generate per sequence.
    #[arg(long, short = 'n', default_value_t = 50)]
    pub max_new_tokens: usize,
    /// Always take the most likely token (the default unless a sampling flag is given).
    #[arg(long, conflicts_with_all = ["temperature", "top_k", "top_p"])]
    pub greedy: bool,
    /// Sample at this temperature (turns sampling on).
    #[arg(long)]
    pub temperature: Option<f32>,
    /// Sample among the k most likely tokens (turns sampling on; 0 = all).
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Sample from the smallest set of tokens with this much probability (turns sampling on).
    #[arg(long)]
    pub top_p: Option<f32>,
    /// Penalize tokens already present (transformers' repetition_penalty; 1.0 = off).
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f32,
    /// Random seed for sampling (same seed, same text). Default: a fresh one, printed with --stats.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Samples per prompt (needs sampling).
    #[arg(long, default_value_t = 1)]
    pub num_return_sequences: usize,
    /// Stop when this string appears (not printed); repeatable.
    #[arg(long)]
    pub stop: Vec<String>,
    /// Keep generating past <|endoftext|>.
    #[arg(long)]
    pub ignore_eos: bool,
    /// Keep only the last tokens of a prompt longer than the context instead of failing.
    #[arg(long)]
    pub truncate: bool,
    /// Print timings: prompt tokens, time to first token, prefill and decode speed.
    #[arg(long)]
    pub stats: bool,
    /// Print one JSON object per sequence instead of plain text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct ScoreArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The text to score.
    #[arg(long, value_name = "FILE")]
    pub text_file: PathBuf,
    /// Where to run: cpu, or cuda / cuda:N for GPU N (builds with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Window length in tokens (default: the model's context).
    #[arg(long)]
    pub max_length: Option<usize>,
    /// How far each window moves (default: half the window).
    #[arg(long)]
    pub stride: Option<usize>,
    /// Also run the model in this precision (usually f32) and report how far --dtype's
    /// next-token distributions are from it: mean and max KL divergence, top-1 agreement,
    /// and both perplexities.
    #[arg(long, value_name = "PRECISION")]
    pub against: Option<String>,
    /// Print JSON with per-token log-probabilities.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct QuantizeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Directory to write (config.json, model.safetensors, the tokenizer).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Replace files already in --out.
    #[arg(long)]
    pub force: bool,
}

#[derive(Args, Debug)]
pub struct InfoArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Context length for the KV-cache estimate (default: the model's).
    #[arg(long)]
    pub context: Option<usize>,
    /// Sequences for the KV-cache estimate.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
}

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Models, comma-separated (default: gpt2,gpt2-medium,gpt2-large,gpt2-xl). Presets use real
    /// weights when the hub cache has them, synthetic ones of the exact shape otherwise; local
    /// directories, cached hub repositories and synthetic:CONFIG.json also work. Never downloads.
    #[arg(long, value_delimiter = ',')]
    pub models: Vec<String>,
    /// Weight precisions, comma-separated: f32, f16, bf16, int8, int4 (default: all of them).
    #[arg(long, value_delimiter = ',')]
    pub dtypes: Vec<String>,
    /// Batch sizes, comma-separated (default 1; --full: 1,8,32).
    #[arg(long, value_delimiter = ',')]
    pub batch: Vec<usize>,
    /// Prompt lengths in tokens, comma-separated (default 32; --full: 32,128,512).
    #[arg(long, value_delimiter = ',')]
    pub prompt_len: Vec<usize>,
    /// Tokens generated per sequence (default 16; --full: 64).
    #[arg(long)]
    pub new_tokens: Option<usize>,
    /// Measured runs per configuration, after one warm-up run.
    #[arg(long, default_value_t = 3)]
    pub reps: usize,
    /// Backends, comma-separated: cpu, cuda (GPU 0), cuda:N, or all (default: the CPU and
    /// every GPU the CUDA backend can use; that needs a build with `--features cuda`).
    #[arg(long, value_delimiter = ',')]
    pub device: Vec<String>,
    /// Everything: all models (distilgpt2 too), batches 1,8,32, prompts 32,128,512, 64 new tokens.
    #[arg(long)]
    pub full: bool,
    /// Run the same configurations through another engine: `transformers`.
    #[arg(long, value_name = "ENGINE")]
    pub compare: Option<String>,
    /// Python interpreter with torch and transformers, for --compare.
    #[arg(long)]
    pub python: Option<String>,
    /// Print JSON instead of the table.
    #[arg(long, conflicts_with_all = ["csv", "markdown"])]
    pub json: bool,
    /// Print CSV instead of the table.
    #[arg(long, conflicts_with = "markdown")]
    pub csv: bool,
    /// Print a Markdown report instead of the table.
    #[arg(long)]
    pub markdown: bool,
    /// Also draw decode tok/s against model size with the roofline (.svg or .png).
    #[arg(long, value_name = "FILE")]
    pub plot: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Where to run: cpu, or cuda / cuda:N for GPU N (builds with `--features cuda`).
    #[arg(long, default_value = "cpu", conflicts_with = "devices")]
    pub device: String,
    /// Several engines in one server, one per device, comma-separated: GPU numbers (0,1,…)
    /// or device names (cuda:0,cuda:1). Requests go to the least loaded engine.
    #[arg(long, value_delimiter = ',')]
    pub devices: Vec<String>,
    /// Address to listen on (127.0.0.1: this machine only; 0.0.0.0: every interface).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on (0: any free one; the address is printed).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// The model's name in the API (default: the --model value, or gpt2 for synthetic weights).
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// Sequences decoded together per engine; more raise throughput and each token's latency
    /// (default: 10 on the CPU, 64 on a GPU).
    #[arg(long)]
    pub max_batch: Option<usize>,
    /// Tokens per engine step, the running sequences' next tokens included; the rest goes to
    /// newcomers' prompts. Bounds each step's cost, so it bounds inter-token latency
    /// (default: 14 on the CPU, 128 on a GPU).
    #[arg(long)]
    pub max_step_tokens: Option<usize>,
    /// Requests waiting for a place in the batch before new ones get 429 (with Retry-After).
    #[arg(long, default_value_t = 256)]
    pub max_queue: usize,
    /// Largest max_tokens a request may ask for (default: the model's context).
    #[arg(long)]
    pub max_tokens: Option<usize>,
    /// Seconds from a request's arrival to its last token before it ends with 504.
    #[arg(long, default_value_t = 300)]
    pub request_timeout: u64,
    /// Largest request body in bytes (413 beyond).
    #[arg(long, default_value_t = 1 << 20)]
    pub body_limit: usize,
    /// After SIGINT/SIGTERM, seconds in-flight requests may run before they are cancelled.
    #[arg(long, default_value_t = 30)]
    pub shutdown_grace: u64,
}

#[derive(Args, Debug)]
pub struct LoadtestArgs {
    /// The server's base URL.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// Concurrent streaming clients.
    #[arg(long, default_value_t = 64)]
    pub clients: usize,
    /// Requests in all (bounded: the test ends when they are answered).
    #[arg(long, default_value_t = 128)]
    pub requests: usize,
    /// Prompt length in tokens: N or MIN-MAX (uniform).
    #[arg(long, default_value = "8-128")]
    pub prompt_tokens: String,
    /// max_tokens per request: N or MIN-MAX (uniform).
    #[arg(long, default_value = "16-64")]
    pub max_tokens: String,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Seconds a request may take before it counts as lost.
    #[arg(long, default_value_t = 600)]
    pub timeout: u64,
    /// Also send the same requests one at a time and print the speed-up.
    #[arg(long)]
    pub compare_sequential: bool,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}
