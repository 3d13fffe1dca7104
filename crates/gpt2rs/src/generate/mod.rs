//! Text generation over any [`Engine`]: prompts of any lengths batched together with no padding,
//! several samples per prompt sharing one prefill, streaming, stop rules and timing.

pub mod sampling;
pub mod stream;

use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::scheduler::{Event, Request, RequestId, Scheduler, SchedulerConfig};
use crate::tokenizer::Tokenizer;
pub use sampling::SamplingParams;
use std::time::{Duration, Instant};

/// What to generate and when to stop.
#[derive(Debug, Clone)]
pub struct GenerationConfig {
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    /// Seed of the random streams (each sample of each prompt gets its own).
    pub seed: u64,
    /// Samples per prompt (sharing the prompt's prefill). Needs sampling when > 1.
    pub num_return_sequences: usize,
    /// Stop at the end-of-text token.
    pub stop_at_eos: bool,
    /// Stop when any of these strings appears in the generated text (not included in it).
    pub stop_strings: Vec<String>,
    /// Drop the oldest prompt tokens when a prompt does not fit the context (else it is an error).
    pub truncate_prompt: bool,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        Self {
            max_new_tokens: 50,
            sampling: SamplingParams::greedy(),
            seed: 0,
            num_return_sequences: 1,
            stop_at_eos: true,
            stop_strings: Vec::new(),
            truncate_prompt: false,
        }
    }
}

/// Why a sequence ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// max_new_tokens reached, or the context is full.
    Length,
    /// The end-of-text token was generated.
    Eos,
    /// A stop string appeared.
    Stop,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Length => "length",
            Self::Eos => "eos",
            Self::Stop => "stop",
        }
    }
}

/// One generated sequence.
#[derive(Debug, Clone)]
pub struct Completion {
    pub prompt_index: usize,
    pub sample_index: usize,
    /// The prompt as the model saw it (after truncation, if any).
    pub prompt_tokens: Vec<u32>,
    /// Generated token ids (the end-of-text token included when it ended the sequence).
    pub tokens: Vec<u32>,
    /// Generated text (without end-of-text, and cut before a stop string).
    pub text: String,
    pub finish_reason: FinishReason,
}

/// Timing of one `generate` call.
#[derive(Debug, Clone, Default)]
pub struct GenerationStats {
    pub prompt_tokens: usize,
    pub prefill_time: Duration,
    /// From the call's start to the first new token of every sequence.
    pub time_to_first_token: Duration,
    /// Tokens produced by decode steps (the first token of each sequence comes from prefill).
    pub decode_tokens: usize,
    pub decode_time: Duration,
    pub decode_steps: usize,
}

impl GenerationStats {
    pub fn prefill_tokens_per_sec(&self) -> f64 {
        self.prompt_tokens as f64 / self.prefill_time.as_secs_f64().max(1e-12)
    }
    pub fn decode_tokens_per_sec(&self) -> f64 {
        self.decode_tokens as f64 / self.decode_time.as_secs_f64().max(1e-12)
    }
}

/// A piece of newly final text of one sequence, for streaming.
#[derive(Debug)]
pub struct TextEvent<'a> {
    pub prompt_index: usize,
    pub sample_index: usize,
    pub text: &'a str,
}

/// Prepares a prompt: an empty one starts from end-of-text (as GPT-2 was trained); one that
/// does not fit the context is cut from the left when allowed, else an error.
pub fn fit_prompt(
    prompt: &[u32],
    bos: u32,
    n_positions: usize,
    truncate: bool,
) -> Result<Vec<u32>> {
    if prompt.is_empty() {
        return Ok(vec![bos]);
    }
    if prompt.len() <= n_positions {
        return Ok(prompt.to_vec());
    }
    if truncate {
        return Ok(prompt[prompt.len() - n_positions..].to_vec());
    }
    Err(Error::ContextOverflow(format!(
        "the prompt has {} tokens but the model's context is {} tokens; shorten it, or pass \
         --truncate to keep only its last {} tokens",
        prompt.len(),
        n_positions,
        n_positions
    )))
}

/// Generates from every prompt at once. `on_text` receives text as it becomes final.
///
/// Every prompt is prefilled in the first engine pass (one ragged batch), then all sequences
/// decode together until each has finished: the [`Scheduler`] with no limits.
pub fn generate(
    engine: &mut dyn Engine,
    tokenizer: &Tokenizer,
    prompts: &[Vec<u32>],
    cfg: &GenerationConfig,
    on_text: &mut dyn FnMut(TextEvent<'_>),
) -> Result<(Vec<Completion>, GenerationStats)> {
    cfg.sampling.validate()?;
    if cfg.num_return_sequences == 0 {
        return Err(Error::invalid("num_return_sequences must be at least 1"));
    }
    if cfg.num_return_sequences > 1 && cfg.sampling.is_greedy() {
        return Err(Error::invalid(
            "several return sequences need sampling (greedy decoding would repeat the same text): \
             set a temperature",
        ));
    }
    let model = engine.config().clone();
    let prompts: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| {
            fit_prompt(
                p,
                model.bos_token_id,
                model.n_positions,
                cfg.truncate_prompt,
            )
        })
        .collect::<Result<_>>()?;
    let unlimited = SchedulerConfig {
        max_running: usize::MAX,
        max_step_tokens: usize::MAX,
    };
    let mut sched = Scheduler::new(&model, unlimited);
    for (i, p) in prompts.iter().enumerate() {
        let req = Request {
            prompt: p.clone(),
            sampling: cfg.sampling.clone(),
            seed: cfg.seed,
            rng_stream: i,
            samples: cfg.num_return_sequences,
            max_new_tokens: cfg.max_new_tokens,
            stop_at_eos: cfg.stop_at_eos,
            stop_strings: cfg.stop_strings.clone(),
            top_logprobs: None,
            prompt_logprobs: false,
        };
        sched.submit(i as RequestId, req)?;
    }
    let mut stats = GenerationStats {
        prompt_tokens: prompts.iter().map(Vec::len).sum(),
        ..Default::default()
    };
    let mut completions: Vec<Completion> = prompts
        .iter()
        .enumerate()
        .flat_map(|(pi, p)| {
            (0..cfg.num_return_sequences).map(move |si| Completion {
                prompt_index: pi,
                sample_index: si,
                prompt_tokens: p.clone(),
                tokens: Vec::new(),
                text: String::new(),
                finish_reason: FinishReason::Length,
            })
        })
        .collect();

    let start = Instant::now();
    let mut decode_start = start;
    let mut first = true;
    while !sched.is_idle() {
        let report = sched.step(engine, tokenizer);
        if let Some((e, _)) = report.failed {
            sched.cancel_all(engine);
            return Err(e);
        }
        if first {
            stats.prefill_time = report.forward_time;
            stats.time_to_first_token = start.elapsed();
            decode_start = Instant::now();
            first = false;
        } else {
            stats.decode_steps += 1;
            stats.decode_tokens += report.decode_tokens;
        }
        for (id, event) in report.events {
            let pi = id as usize;
            let (si, text) = match event {
                Event::Token {
                    sample,
                    token,
                    text,
                    ..
                } => {
                    completions[pi * cfg.num_return_sequences + sample]
                        .tokens
                        .push(token);
                    (sample, text)
                }
                Event::Finished {
                    sample,
                    reason,
                    text,
                } => {
                    completions[pi * cfg.num_return_sequences + sample].finish_reason = reason;
                    (sample, text)
                }
                Event::PromptLogprobs(_) => continue,
            };
            if !text.is_empty() {
                completions[pi * cfg.num_return_sequences + si]
                    .text
                    .push_str(&text);
                on_text(TextEvent {
                    prompt_index: pi,
                    sample_index: si,
                    text: &text,
                });
            }
        }
    }
    stats.decode_time = decode_start.elapsed();
    Ok((completions, stats))
}
