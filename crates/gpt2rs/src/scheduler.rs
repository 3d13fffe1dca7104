//! Continuous batching over any [`Engine`]: requests join the running batch at the next step
//! and leave it the step they finish, so a long request never holds up short ones.
//!
//! Each [`Scheduler::step`] is one engine pass over a ragged batch: one token for every
//! sequence that is decoding, plus chunks of the prompts of newly admitted requests, within a
//! budget of tokens per step (so a long newcomer's prefill is spread over several steps
//! instead of stalling everyone's next token, and a step's cost, hence every running
//! sequence's inter-token latency, stays bounded). `generate` and the server both run on this.

use crate::config::Gpt2Config;
use crate::engine::{BatchEntry, Engine, LogitsFor, PickRule, SeqId};
use crate::error::{Error, Result};
use crate::generate::sampling::{self, SamplingParams, SeqRng};
use crate::generate::stream::TextStream;
use crate::generate::FinishReason;
use crate::tokenizer::Tokenizer;
use rayon::prelude::*;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// The caller's name for a request (unique among the requests it has submitted).
pub type RequestId = u64;

/// What one request asks for.
#[derive(Debug, Clone)]
pub struct Request {
    /// Prompt tokens: not empty, at most the context length.
    pub prompt: Vec<u32>,
    pub sampling: SamplingParams,
    /// Seed of the random streams; with `rng_stream`, sample `s` draws from
    /// `SeqRng::new(seed, rng_stream, s)`, whatever else is in the batch.
    pub seed: u64,
    pub rng_stream: usize,
    /// Samples drawn from the one prefill of the prompt.
    pub samples: usize,
    pub max_new_tokens: usize,
    pub stop_at_eos: bool,
    /// Generation ends when one of these appears (it is not part of the text).
    pub stop_strings: Vec<String>,
    /// `Some(k)`: report each generated token's log-probability and the `k` most likely.
    pub top_logprobs: Option<usize>,
    /// Report the log-probability of every prompt token after the first.
    pub prompt_logprobs: bool,
}

impl Request {
    /// A greedy request for `max_new_tokens` tokens, stopping at end-of-text.
    pub fn greedy(prompt: Vec<u32>, max_new_tokens: usize) -> Self {
        Self {
            prompt,
            sampling: SamplingParams::greedy(),
            seed: 0,
            rng_stream: 0,
            samples: 1,
            max_new_tokens,
            stop_at_eos: true,
            stop_strings: Vec::new(),
            top_logprobs: None,
            prompt_logprobs: false,
        }
    }
}

/// A token's log-probability under the model (log-softmax of the raw logits) and the most
/// likely alternatives, best first.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

/// What happened to a request during a step.
#[derive(Debug, Clone)]
pub enum Event {
    /// Log-probabilities of prompt tokens 1.. (each given the tokens before it), in order;
    /// may come in several pieces when the prompt is prefilled in chunks.
    PromptLogprobs(Vec<f32>),
    /// Sample `sample` generated `token`; `text` is the text that became final with it
    /// (often empty: a character cut across tokens, or a possible stop string, waits).
    Token {
        sample: usize,
        token: u32,
        text: String,
        logprob: Option<TokenLogprob>,
    },
    /// Sample `sample` ended; `text` is the rest of its text not yet handed out.
    Finished {
        sample: usize,
        reason: FinishReason,
        text: String,
    },
}

/// Limits that shape each step.
#[derive(Debug, Clone, Copy)]
pub struct SchedulerConfig {
    /// Sequences (samples) running at once; requests beyond wait their turn.
    pub max_running: usize,
    /// Tokens per step, decode rows included: what is left after the running sequences'
    /// next tokens goes to prompt chunks of newcomers (always at least one token, so
    /// admitted requests make progress).
    pub max_step_tokens: usize,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            max_running: 32,
            max_step_tokens: 160,
        }
    }
}

/// What one step did.
#[derive(Debug, Default)]
pub struct StepReport {
    pub prefill_tokens: usize,
    pub decode_tokens: usize,
    /// Time in the engine's forward pass.
    pub forward_time: Duration,
    pub events: Vec<(RequestId, Event)>,
    /// The forward pass failed: these requests were dropped (their sequences freed).
    pub failed: Option<(Error, Vec<RequestId>)>,
}

/// A sample being generated.
struct Sample {
    seq: SeqId,
    /// Prompt and generated tokens (repetition penalty looks at all of them).
    history: Vec<u32>,
    rng: SeqRng,
    stream: TextStream,
    done: bool,
}

/// An admitted request.
struct Active {
    id: RequestId,
    req: Request,
    /// The sequence the prompt is prefilled into (sample 0's, once it is done).
    seq: SeqId,
    /// Prompt tokens fed to the engine so far.
    prefilled: usize,
    /// Empty until the prompt is prefilled.
    samples: Vec<Sample>,
}

impl Active {
    fn prefilling(&self) -> bool {
        self.prefilled < self.req.prompt.len()
    }

    /// Sequences it holds or will hold once its prompt is in.
    fn sequences(&self) -> usize {
        if self.prefilling() {
            self.req.samples
        } else {
            self.samples.iter().filter(|s| !s.done).count()
        }
    }
}

/// What a batch entry of a step is for.
enum Slot {
    Prefill { active: usize, chunk: usize },
    Decode { active: usize, sample: usize },
}

/// Admits, batches and retires requests, one engine pass per step.
pub struct Scheduler {
    cfg: SchedulerConfig,
    n_positions: usize,
    vocab_size: usize,
    eos: u32,
    waiting: VecDeque<(RequestId, Request)>,
    active: Vec<Active>,
    scratch: Vec<f32>,
}

impl Scheduler {
    pub fn new(model: &Gpt2Config, cfg: SchedulerConfig) -> Self {
        Self {
            cfg: SchedulerConfig {
                max_running: cfg.max_running.max(1),
                max_step_tokens: cfg.max_step_tokens.max(1),
            },
            n_positions: model.n_positions,
            vocab_size: model.vocab_size,
            eos: model.eos_token_id,
            waiting: VecDeque::new(),
            active: Vec::new(),
            scratch: Vec::new(),
        }
    }

    /// Queues a request; it joins the batch at a coming step. Checks it first.
    pub fn submit(&mut self, id: RequestId, req: Request) -> Result<()> {
        req.sampling.validate()?;
        if req.prompt.is_empty() {
            return Err(Error::invalid("the prompt has no tokens"));
        }
        if req.prompt.len() > self.n_positions {
            return Err(Error::ContextOverflow(format!(
                "the prompt has {} tokens but the model's context is {} tokens",
                req.prompt.len(),
                self.n_positions
            )));
        }
        if let Some(&bad) = req.prompt.iter().find(|&&t| t as usize >= self.vocab_size) {
            return Err(Error::invalid(format!(
                "token id {bad} is outside the vocabulary (size {})",
                self.vocab_size
            )));
        }
        if req.samples == 0 {
            return Err(Error::invalid("a request needs at least one sample"));
        }
        self.waiting.push_back((id, req));
        Ok(())
    }

    /// Drops a request wherever it is, freeing its sequences. Returns whether it was there.
    pub fn cancel(&mut self, engine: &mut dyn Engine, id: RequestId) -> bool {
        if let Some(i) = self.waiting.iter().position(|(r, _)| *r == id) {
            self.waiting.remove(i);
            return true;
        }
        if let Some(i) = self.active.iter().position(|a| a.id == id) {
            let a = self.active.remove(i);
            release(engine, &a);
            return true;
        }
        false
    }

    /// Drops every request, freeing their sequences.
    pub fn cancel_all(&mut self, engine: &mut dyn Engine) {
        self.waiting.clear();
        for a in self.active.drain(..) {
            release(engine, &a);
        }
    }

    /// Requests not yet admitted.
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Sequences in the running batch (prefilling requests count their samples).
    pub fn running(&self) -> usize {
        self.active.iter().map(Active::sequences).sum()
    }

    /// Ids of the requests not yet admitted.
    pub fn waiting_ids(&self) -> impl Iterator<Item = RequestId> + '_ {
        self.waiting.iter().map(|(id, _)| *id)
    }

    /// Ids of every request the scheduler holds, waiting or running.
    pub fn request_ids(&self) -> impl Iterator<Item = RequestId> + '_ {
        self.waiting
            .iter()
            .map(|(id, _)| *id)
            .chain(self.active.iter().map(|a| a.id))
    }

    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.active.is_empty()
    }

    /// Admits what fits, runs one engine pass, samples, and retires finished requests.
    pub fn step(&mut self, engine: &mut dyn Engine, tokenizer: &Tokenizer) -> StepReport {
        let mut report = StepReport::default();
        self.admit(engine);
        let slots = self.plan();
        if slots.is_empty() {
            return report;
        }
        let logits = {
            let batch: Vec<BatchEntry> = slots.iter().map(|s| self.entry(s)).collect();
            let start = Instant::now();
            let out = engine.forward(&batch);
            report.forward_time = start.elapsed();
            out
        };
        let logits = match logits {
            Ok(l) => l,
            Err(e) => {
                let mut dropped: Vec<usize> = slots
                    .iter()
                    .map(|s| match *s {
                        Slot::Prefill { active, .. } | Slot::Decode { active, .. } => active,
                    })
                    .collect();
                dropped.sort_unstable();
                dropped.dedup();
                let ids = dropped.iter().map(|&i| self.active[i].id).collect();
                for &i in dropped.iter().rev() {
                    let a = self.active.remove(i);
                    release(engine, &a);
                }
                report.failed = Some((e, ids));
                return report;
            }
        };
        let mut draws = self.draw_decodes(&slots, &logits).into_iter();
        for (entry, slot) in slots.iter().enumerate() {
            let mut rows = logits.entry(entry);
            match *slot {
                Slot::Prefill { active, chunk } => {
                    report.prefill_tokens += chunk;
                    let a = &mut self.active[active];
                    let start = a.prefilled;
                    a.prefilled += chunk;
                    let done = !a.prefilling();
                    if a.req.prompt_logprobs {
                        // Row j predicts prompt token start + j + 1 (the last row of the
                        // whole prompt predicts the first new token instead).
                        let lps: Vec<f32> = rows
                            .by_ref()
                            .take(if done { chunk - 1 } else { chunk })
                            .enumerate()
                            .map(|(j, row)| log_softmax_at(row, a.req.prompt[start + j + 1]))
                            .collect();
                        report.events.push((a.id, Event::PromptLogprobs(lps)));
                    }
                    if done {
                        let next = match prefill_rule(&a.req) {
                            Some(rule) => {
                                Next::Picked(logits.pick(entry, rule).expect("asked for a pick"))
                            }
                            None => Next::Row(rows.last().expect("asked for the last row")),
                        };
                        self.start_samples(engine, tokenizer, active, next, &mut report);
                    }
                }
                Slot::Decode { active, sample } => {
                    report.decode_tokens += 1;
                    let draw = draws.next().expect("one draw per decode slot");
                    self.accept(engine, tokenizer, active, sample, draw, &mut report);
                }
            }
        }
        self.active
            .retain(|a| a.prefilling() || a.samples.iter().any(|s| !s.done));
        report
    }

    /// Moves waiting requests into the batch while their sequences fit.
    fn admit(&mut self, engine: &mut dyn Engine) {
        let mut running = self.running();
        while let Some((_, req)) = self.waiting.front() {
            // An oversized request still runs when it would run alone.
            if running > 0 && running + req.samples > self.cfg.max_running {
                break;
            }
            let (id, req) = self.waiting.pop_front().expect("front exists");
            running += req.samples;
            let seq = engine.add_sequence();
            self.active.push(Active {
                id,
                req,
                seq,
                prefilled: 0,
                samples: Vec::new(),
            });
        }
    }

    /// This step's batch: a token for every decoding sample, then prompt chunks in admission
    /// order within what is left of the step's token budget.
    fn plan(&self) -> Vec<Slot> {
        let mut slots = Vec::new();
        for (ai, a) in self.active.iter().enumerate() {
            for (si, s) in a.samples.iter().enumerate() {
                if !s.done {
                    slots.push(Slot::Decode {
                        active: ai,
                        sample: si,
                    });
                }
            }
        }
        let mut budget = self.cfg.max_step_tokens.saturating_sub(slots.len()).max(1);
        for (ai, a) in self.active.iter().enumerate() {
            if budget == 0 {
                break;
            }
            if a.prefilling() {
                let chunk = (a.req.prompt.len() - a.prefilled).min(budget);
                budget -= chunk;
                slots.push(Slot::Prefill { active: ai, chunk });
            }
        }
        slots
    }

    fn entry(&self, slot: &Slot) -> BatchEntry<'_> {
        match *slot {
            Slot::Prefill { active, chunk } => {
                let a = &self.active[active];
                let completes = a.prefilled + chunk == a.req.prompt.len();
                BatchEntry {
                    seq: a.seq,
                    tokens: &a.req.prompt[a.prefilled..a.prefilled + chunk],
                    logits: if a.req.prompt_logprobs {
                        LogitsFor::All
                    } else if completes {
                        prefill_rule(&a.req).map_or(LogitsFor::Last, LogitsFor::Pick)
                    } else {
                        LogitsFor::Nothing
                    },
                }
            }
            Slot::Decode { active, sample } => {
                let a = &self.active[active];
                let s = &a.samples[sample];
                BatchEntry {
                    seq: s.seq,
                    tokens: std::slice::from_ref(s.history.last().expect("has a token")),
                    logits: pick_rule(&a.req, sample, s.history.len())
                        .map_or(LogitsFor::Last, LogitsFor::Pick),
                }
            }
        }
    }

    /// The prompt is in: fork its cache for every further sample, and let each draw its first
    /// token from the prompt's last logits.
    fn start_samples(
        &mut self,
        engine: &mut dyn Engine,
        tokenizer: &Tokenizer,
        active: usize,
        next: Next<&[f32]>,
        report: &mut StepReport,
    ) {
        let a = &mut self.active[active];
        for si in 0..a.req.samples {
            let seq = if si == 0 {
                Ok(a.seq)
            } else {
                engine.fork_sequence(a.seq)
            };
            // A fork fails only when the engine is out of cache memory: that sample ends at once.
            let forked = seq.is_ok();
            if !forked {
                report
                    .events
                    .push((a.id, finished(si, FinishReason::Length)));
            }
            a.samples.push(Sample {
                seq: seq.unwrap_or(SeqId(u64::MAX)),
                history: a.req.prompt.clone(),
                rng: SeqRng::new(a.req.seed, a.req.rng_stream, si),
                stream: TextStream::new(&a.req.stop_strings),
                done: !forked,
            });
        }
        for si in 0..self.active[active].samples.len() {
            if self.active[active].samples[si].done {
                continue;
            }
            if self.active[active].req.max_new_tokens == 0 {
                self.finish(engine, active, si, FinishReason::Length, report);
            } else {
                let a = &mut self.active[active];
                let draw = draw(&mut a.samples[si], &a.req, next, &mut self.scratch);
                self.accept(engine, tokenizer, active, si, draw, report);
            }
        }
    }

    /// Every decoding sample's next token (and log-probability), drawn in parallel: with
    /// sampling, each draw walks the whole vocabulary, and a large batch would otherwise spend
    /// a good part of its step here on one thread.
    fn draw_decodes(&mut self, slots: &[Slot], logits: &crate::engine::Logits) -> Vec<Draw> {
        // Decode slots come first, in the order active requests and their live samples are
        // walked here.
        let rules: Vec<(usize, Option<PickRule>)> = slots
            .iter()
            .enumerate()
            .filter_map(|(e, s)| match *s {
                Slot::Decode { active, sample } => {
                    let a = &self.active[active];
                    Some((
                        e,
                        pick_rule(&a.req, sample, a.samples[sample].history.len()),
                    ))
                }
                Slot::Prefill { .. } => None,
            })
            .collect();
        // Picks the engine left to the host (a CPU engine's) read a whole vocabulary each:
        // on all threads.
        let rows: Vec<Next<&[f32]>> = rules
            .par_iter()
            .map(|&(e, rule)| match rule {
                Some(rule) => Next::Picked(logits.pick(e, rule).expect("asked for a pick")),
                None => Next::Row(logits.last(e).expect("asked for the last row")),
            })
            .collect();
        let mut work: Vec<(&mut Sample, &Request)> = self
            .active
            .iter_mut()
            .flat_map(|a| {
                let req = &a.req;
                a.samples
                    .iter_mut()
                    .filter(|s| !s.done)
                    .map(move |s| (s, req))
            })
            .collect();
        debug_assert_eq!(work.len(), rows.len());
        work.par_iter_mut()
            .zip(rows.par_iter())
            .with_min_len(4)
            .map_init(Vec::new, |scratch, ((s, req), next)| {
                draw(s, req, *next, scratch)
            })
            .collect()
    }

    /// Appends a drawn token to sample `si` and applies the stop rules.
    fn accept(
        &mut self,
        engine: &mut dyn Engine,
        tokenizer: &Tokenizer,
        active: usize,
        si: usize,
        draw: Draw,
        report: &mut StepReport,
    ) {
        let (n_positions, eos) = (self.n_positions, self.eos);
        let a = &mut self.active[active];
        let s = &mut a.samples[si];
        let tok = draw.token;
        s.history.push(tok);
        let generated = s.history.len() - a.req.prompt.len();
        let mut reason = None;
        let mut text = String::new();
        if a.req.stop_at_eos && tok == eos {
            reason = Some(FinishReason::Eos);
        } else {
            let (t, stopped) = s.stream.push(tokenizer.token_bytes(tok));
            text = t;
            if stopped {
                reason = Some(FinishReason::Stop);
            }
        }
        if reason.is_none() && (generated >= a.req.max_new_tokens || s.history.len() >= n_positions)
        {
            reason = Some(FinishReason::Length);
        }
        let id = a.id;
        report.events.push((
            id,
            Event::Token {
                sample: si,
                token: tok,
                text,
                logprob: draw.logprob,
            },
        ));
        if let Some(r) = reason {
            self.finish(engine, active, si, r, report);
        }
    }

    fn finish(
        &mut self,
        engine: &mut dyn Engine,
        active: usize,
        si: usize,
        reason: FinishReason,
        report: &mut StepReport,
    ) {
        let a = &mut self.active[active];
        let s = &mut a.samples[si];
        s.done = true;
        engine.remove_sequence(s.seq);
        let text = s.stream.finish();
        report.events.push((
            a.id,
            Event::Finished {
                sample: si,
                reason,
                text,
            },
        ));
    }
}

/// A sample's next token, drawn from its row of logits.
struct Draw {
    token: u32,
    logprob: Option<TokenLogprob>,
}

fn draw(s: &mut Sample, req: &Request, next: Next<&[f32]>, scratch: &mut Vec<f32>) -> Draw {
    let row = match next {
        Next::Row(row) => row,
        Next::Picked(token) => {
            return Draw {
                token,
                logprob: None,
            }
        }
    };
    let token = sampling::pick(row, &s.history, &req.sampling, &mut s.rng, scratch);
    Draw {
        token,
        logprob: req.top_logprobs.map(|k| token_logprob(row, token, k)),
    }
}

/// What a pass brought back for a sample's next token: its row of logits, or the token the
/// engine picked.
#[derive(Clone, Copy)]
enum Next<R> {
    Row(R),
    Picked(u32),
}

/// The rule by which an engine may pick a request's next token itself ([`LogitsFor::Pick`]:
/// an engine on a device then brings back one id per row instead of a vocabulary of logits),
/// when its draws read nothing else of the logits: greedy, or sampling at a temperature with
/// top-k / top-p (no repetition penalty, no log-probabilities). A sampled rule's noise comes
/// from the request's seed, the sample and the position, so a seed gives the same tokens
/// whatever else runs in the batch and on whichever backend.
fn pick_rule(req: &Request, sample: usize, position: usize) -> Option<PickRule> {
    let p = &req.sampling;
    if req.top_logprobs.is_some() || p.repetition_penalty != 1.0 {
        return None;
    }
    Some(match p.temperature {
        None => PickRule::Greedy,
        Some(temperature) => PickRule::Sample {
            temperature,
            noise_seed: noise_seed(req, sample, position),
            top_k: p.top_k.min(u32::MAX as usize) as u32,
            top_p: p.top_p,
        },
    })
}

/// The rule for the first new token, picked from the prompt's last row: with several samples
/// only greedy (the samples fork after it and would otherwise all share one draw).
fn prefill_rule(req: &Request) -> Option<PickRule> {
    pick_rule(req, 0, req.prompt.len()).filter(|r| req.samples == 1 || *r == PickRule::Greedy)
}

/// The noise seed of sample `sample`'s draw at `position`.
fn noise_seed(req: &Request, sample: usize, position: usize) -> u64 {
    let mut z = req.seed
        ^ (req.rng_stream as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ (sample as u64).wrapping_mul(0xC2B2_AE3D_27D4_EB4F)
        ^ (position as u64).wrapping_mul(0x1656_67B1_9E37_79F9);
    z = (z ^ (z >> 33)).wrapping_mul(0xFF51_AFD7_ED55_8CCD);
    z ^ (z >> 33)
}

fn finished(sample: usize, reason: FinishReason) -> Event {
    Event::Finished {
        sample,
        reason,
        text: String::new(),
    }
}

/// Frees every sequence a request holds.
fn release(engine: &mut dyn Engine, a: &Active) {
    engine.remove_sequence(a.seq);
    for s in &a.samples {
        engine.remove_sequence(s.seq);
    }
}

/// log softmax(row)[tok].
fn log_softmax_at(row: &[f32], tok: u32) -> f32 {
    row[tok as usize] - log_sum_exp(row)
}

fn log_sum_exp(row: &[f32]) -> f32 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = row.iter().map(|&v| ((v - max) as f64).exp()).sum();
    max + sum.ln() as f32
}

/// The chosen token's log-probability and the `k` most likely tokens'.
fn token_logprob(row: &[f32], tok: u32, k: usize) -> TokenLogprob {
    let lse = log_sum_exp(row);
    let mut order: Vec<u32> = (0..row.len() as u32).collect();
    let by_desc = |a: &u32, b: &u32| row[*b as usize].total_cmp(&row[*a as usize]).then(a.cmp(b));
    let k = k.min(order.len());
    if k > 0 && k < order.len() {
        order.select_nth_unstable_by(k - 1, by_desc);
    }
    order.truncate(k);
    order.sort_by(by_desc);
    TokenLogprob {
        logprob: row[tok as usize] - lse,
        top: order.iter().map(|&t| (t, row[t as usize] - lse)).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::CpuEngine;
    use crate::weights::ModelWeights;

    fn small_engine() -> CpuEngine {
        let mut c = Gpt2Config::preset("gpt2").unwrap();
        c.n_layer = 2;
        c.n_embd = 64;
        c.n_head = 4;
        c.n_inner = 256;
        c.n_positions = 64;
        CpuEngine::new(ModelWeights::synthetic(&c, 3))
    }

    /// Runs the scheduler until idle; returns each request's generated tokens per sample.
    fn run_all(engine: &mut CpuEngine, sched: &mut Scheduler, n: usize) -> Vec<Vec<Vec<u32>>> {
        let tok = Tokenizer::gpt2();
        let mut out = vec![Vec::<Vec<u32>>::new(); n];
        while !sched.is_idle() {
            let r = sched.step(engine, &tok);
            assert!(r.failed.is_none());
            for (id, ev) in r.events {
                if let Event::Token { sample, token, .. } = ev {
                    let o = &mut out[id as usize];
                    if o.len() <= sample {
                        o.resize(sample + 1, Vec::new());
                    }
                    o[sample].push(token);
                }
            }
        }
        out
    }

    #[test]
    fn staggered_chunked_requests_match_running_alone() {
        let prompts: Vec<Vec<u32>> = vec![
            (0..23).map(|i| (i * 37 + 5) % 50257).collect(),
            vec![464, 3290],
            (0..9).map(|i| (i * 101 + 7) % 50257).collect(),
        ];
        let mut engine = small_engine();
        let mut alone = Vec::new();
        for p in &prompts {
            let mut s = Scheduler::new(engine.config(), SchedulerConfig::default());
            s.submit(0, Request::greedy(p.clone(), 12)).unwrap();
            alone.push(run_all(&mut engine, &mut s, 1).remove(0));
        }
        // Tiny prefill budget and batch limit: prompts are split over steps, and requests
        // join while others decode.
        let cfg = SchedulerConfig {
            max_running: 2,
            max_step_tokens: 5,
        };
        let mut s = Scheduler::new(engine.config(), cfg);
        for (i, p) in prompts.iter().enumerate() {
            s.submit(i as u64, Request::greedy(p.clone(), 12)).unwrap();
        }
        let together = run_all(&mut engine, &mut s, prompts.len());
        assert_eq!(together, alone);
        assert_eq!(engine.kv_cache_bytes(), 0, "every sequence is freed");
    }

    #[test]
    fn prompt_logprobs_agree_across_chunkings() {
        let prompt: Vec<u32> = (0..17).map(|i| (i * 53 + 11) % 50257).collect();
        let mut engine = small_engine();
        let tok = Tokenizer::gpt2();
        let mut runs = Vec::new();
        for budget in [100, 4] {
            let cfg = SchedulerConfig {
                max_running: 4,
                max_step_tokens: budget,
            };
            let mut s = Scheduler::new(engine.config(), cfg);
            let mut req = Request::greedy(prompt.clone(), 1);
            req.prompt_logprobs = true;
            req.top_logprobs = Some(3);
            s.submit(7, req).unwrap();
            let mut lps = Vec::new();
            let mut top = None;
            while !s.is_idle() {
                for (_, ev) in s.step(&mut engine, &tok).events {
                    match ev {
                        Event::PromptLogprobs(v) => lps.extend(v),
                        Event::Token { logprob, .. } => top = logprob,
                        Event::Finished { .. } => {}
                    }
                }
            }
            assert_eq!(lps.len(), prompt.len() - 1);
            let top = top.unwrap();
            assert_eq!(top.top.len(), 3);
            assert!(top.top[0].1 >= top.top[1].1 && top.top[1].1 >= top.top[2].1);
            assert!(
                (top.logprob - top.top[0].1).abs() < 1e-6,
                "greedy took the best"
            );
            runs.push(lps);
        }
        for (a, b) in runs[0].iter().zip(&runs[1]) {
            assert!((a - b).abs() < 1e-3, "{a} vs {b}");
            assert!(*a <= 0.0);
        }
    }

    #[test]
    fn cancel_frees_sequences_and_bad_requests_are_refused() {
        let mut engine = small_engine();
        let tok = Tokenizer::gpt2();
        let mut s = Scheduler::new(engine.config(), SchedulerConfig::default());
        let mut req = Request::greedy(vec![1, 2, 3], 50);
        req.sampling.temperature = Some(0.7);
        req.samples = 3;
        s.submit(1, req).unwrap();
        s.submit(2, Request::greedy(vec![4, 5], 50)).unwrap();
        s.step(&mut engine, &tok);
        s.step(&mut engine, &tok);
        assert_eq!(s.running(), 4);
        assert!(engine.kv_cache_bytes() > 0);
        assert!(s.cancel(&mut engine, 1));
        assert!(s.cancel(&mut engine, 2));
        assert!(!s.cancel(&mut engine, 2));
        assert!(s.is_idle());
        assert_eq!(engine.kv_cache_bytes(), 0);

        assert!(s.submit(3, Request::greedy(vec![], 5)).is_err());
        assert!(s.submit(3, Request::greedy(vec![0; 65], 5)).is_err());
        assert!(s.submit(3, Request::greedy(vec![50257], 5)).is_err());
    }

    #[test]
    fn batch_limit_holds_requests_back() {
        let mut engine = small_engine();
        let tok = Tokenizer::gpt2();
        let cfg = SchedulerConfig {
            max_running: 2,
            max_step_tokens: 64,
        };
        let mut s = Scheduler::new(engine.config(), cfg);
        for i in 0..5 {
            s.submit(i, Request::greedy(vec![10 + i as u32], 4))
                .unwrap();
        }
        s.step(&mut engine, &tok);
        assert_eq!((s.running(), s.waiting()), (2, 3));
        let mut max_running = 0;
        while !s.is_idle() {
            s.step(&mut engine, &tok);
            max_running = max_running.max(s.running());
        }
        assert!(max_running <= 2);
    }
}
