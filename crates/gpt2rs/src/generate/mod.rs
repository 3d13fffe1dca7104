//! Text generation over any [`Engine`]: prompts of any lengths batched together with no padding,
//! several samples per prompt sharing one prefill, streaming, stop rules and timing.

pub mod sampling;
pub mod stream;

use crate::engine::{BatchEntry, Engine, LogitsFor, SeqId};
use crate::error::{Error, Result};
use crate::tokenizer::Tokenizer;
pub use sampling::SamplingParams;
use sampling::SeqRng;
use std::time::{Duration, Instant};
use stream::TextStream;

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

/// A sequence being generated.
struct Live {
    seq: SeqId,
    prompt_index: usize,
    sample_index: usize,
    history: Vec<u32>,
    prompt_len: usize,
    rng: SeqRng,
    stream: TextStream,
    finish: Option<FinishReason>,
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
    let start = Instant::now();
    let mut stats = GenerationStats {
        prompt_tokens: prompts.iter().map(Vec::len).sum(),
        ..Default::default()
    };

    // Prefill every prompt in one ragged batch.
    let seqs: Vec<SeqId> = prompts.iter().map(|_| engine.add_sequence()).collect();
    let batch: Vec<BatchEntry> = seqs
        .iter()
        .zip(&prompts)
        .map(|(&seq, p)| BatchEntry {
            seq,
            tokens: p,
            logits: LogitsFor::Last,
        })
        .collect();
    let logits = match engine.forward(&batch) {
        Ok(l) => l,
        Err(e) => {
            seqs.iter().for_each(|&s| engine.remove_sequence(s));
            return Err(e);
        }
    };
    stats.prefill_time = start.elapsed();

    // Fork each prompt's cache for its extra samples; every sample draws its first token.
    let mut live = Vec::new();
    let mut scratch = Vec::new();
    for (pi, (&seq, prompt)) in seqs.iter().zip(&prompts).enumerate() {
        for si in 0..cfg.num_return_sequences {
            let seq = if si == 0 {
                seq
            } else {
                engine.fork_sequence(seq)?
            };
            live.push(Live {
                seq,
                prompt_index: pi,
                sample_index: si,
                history: prompt.clone(),
                prompt_len: prompt.len(),
                rng: SeqRng::new(cfg.seed, pi, si),
                stream: TextStream::new(&cfg.stop_strings),
                finish: None,
            });
        }
    }
    if cfg.max_new_tokens == 0 {
        for l in &mut live {
            l.finish = Some(FinishReason::Length);
            engine.remove_sequence(l.seq);
        }
    }
    let mut step_logits: Vec<Vec<f32>> = (0..prompts.len())
        .map(|i| logits.last(i).expect("asked for the last logits").to_vec())
        .collect();
    let mut rows_of: Vec<usize> = live.iter().map(|l| l.prompt_index).collect();

    let mut first_token_done = false;
    let mut decode_start = Instant::now();
    loop {
        // Pick each live sequence's next token from its row of logits.
        for (l, &row) in live.iter_mut().zip(&rows_of) {
            if l.finish.is_some() {
                continue;
            }
            let tok = sampling::pick(
                &step_logits[row],
                &l.history,
                &cfg.sampling,
                &mut l.rng,
                &mut scratch,
            );
            l.history.push(tok);
            let generated = l.history.len() - l.prompt_len;
            if cfg.stop_at_eos && tok == model.eos_token_id {
                l.finish = Some(FinishReason::Eos);
            } else {
                let (text, stopped) = l.stream.push(tokenizer.token_bytes(tok));
                emit(on_text, l, &text);
                if stopped {
                    l.finish = Some(FinishReason::Stop);
                }
            }
            if l.finish.is_none()
                && (generated >= cfg.max_new_tokens || l.history.len() >= model.n_positions)
            {
                l.finish = Some(FinishReason::Length);
            }
            if l.finish.is_some() {
                let rest = l.stream.finish();
                emit(on_text, l, &rest);
                engine.remove_sequence(l.seq);
            }
        }
        if !first_token_done {
            stats.time_to_first_token = start.elapsed();
            first_token_done = true;
            decode_start = Instant::now();
        }
        // Feed the new tokens of the sequences still running.
        let running: Vec<usize> = (0..live.len())
            .filter(|&i| live[i].finish.is_none())
            .collect();
        if running.is_empty() {
            break;
        }
        let batch: Vec<BatchEntry> = running
            .iter()
            .map(|&i| BatchEntry {
                seq: live[i].seq,
                tokens: std::slice::from_ref(live[i].history.last().expect("has a token")),
                logits: LogitsFor::Last,
            })
            .collect();
        let logits = match engine.forward(&batch) {
            Ok(l) => l,
            Err(e) => {
                live.iter()
                    .filter(|l| l.finish.is_none())
                    .for_each(|l| engine.remove_sequence(l.seq));
                return Err(e);
            }
        };
        step_logits = (0..running.len())
            .map(|i| logits.last(i).expect("asked for the last logits").to_vec())
            .collect();
        rows_of = vec![usize::MAX; live.len()];
        for (row, &i) in running.iter().enumerate() {
            rows_of[i] = row;
        }
        stats.decode_steps += 1;
        stats.decode_tokens += running.len();
    }
    stats.decode_time = decode_start.elapsed();

    let completions = live
        .into_iter()
        .map(|l| Completion {
            prompt_index: l.prompt_index,
            sample_index: l.sample_index,
            tokens: l.history[l.prompt_len..].to_vec(),
            prompt_tokens: l.history[..l.prompt_len].to_vec(),
            text: l.stream.text().to_string(),
            finish_reason: l.finish.unwrap_or(FinishReason::Length),
        })
        .collect();
    Ok((completions, stats))
}

fn emit(on_text: &mut dyn FnMut(TextEvent<'_>), l: &Live, text: &str) {
    if !text.is_empty() {
        on_text(TextEvent {
            prompt_index: l.prompt_index,
            sample_index: l.sample_index,
            text,
        });
    }
}
