//! Perplexity with the sliding-window protocol of transformers' perplexity guide
//! ("Perplexity of fixed-length models"): windows of `max_length` tokens advancing by `stride`;
//! each window scores only the tokens not scored by the one before, with the earlier tokens of
//! the window as context.

use crate::engine::{BatchEntry, Engine, LogitsFor};
use crate::error::{Error, Result};
use serde::Serialize;

/// One scored token.
#[derive(Debug, Clone, Serialize)]
pub struct TokenLogprob {
    /// Index of the token in the text.
    pub position: usize,
    pub token: u32,
    /// Natural log of the probability the model gave this token.
    pub logprob: f64,
}

/// The result of scoring a text.
#[derive(Debug, Clone, Serialize)]
pub struct ScoreReport {
    pub max_length: usize,
    pub stride: usize,
    /// Tokens in the text.
    pub text_tokens: usize,
    /// Tokens scored (every token but the first).
    pub scored_tokens: usize,
    pub windows: usize,
    /// Mean negative log-likelihood, nats per token.
    pub mean_nll: f64,
    pub perplexity: f64,
    /// The number the guide's code prints: it weights each window's mean loss by its count of
    /// target labels minus one, which undercounts every window after the first by one token.
    /// Slightly different from `perplexity` (which weights every scored token once); given so
    /// results can be checked against the guide.
    pub guide_perplexity: f64,
    pub token_logprobs: Vec<TokenLogprob>,
}

/// Scores `ids` with windows of `max_length` (default: the context) moving by `stride`
/// (default: half the window).
pub fn score(
    engine: &mut dyn Engine,
    ids: &[u32],
    max_length: Option<usize>,
    stride: Option<usize>,
) -> Result<ScoreReport> {
    let (max_length, stride) = check_windows(engine.config().n_positions, ids, max_length, stride)?;
    let mut token_logprobs = Vec::with_capacity(ids.len() - 1);
    // The guide's bookkeeping: Σ mean_loss × (labels − 1) and Σ (labels − 1).
    let (mut guide_nll, mut guide_tokens) = (0f64, 0usize);
    let plan = windows(ids.len(), max_length, stride);
    for &Window {
        begin,
        end,
        first_target,
        prev_end,
    } in &plan
    {
        let logits = window_logits(engine, &ids[begin..end])?;
        let rows: Vec<&[f32]> = logits.entry(0).collect();
        let window_start = token_logprobs.len();
        for pos in first_target..end {
            let row = rows[pos - 1 - begin];
            token_logprobs.push(TokenLogprob {
                position: pos,
                token: ids[pos],
                logprob: log_softmax_at(row, ids[pos] as usize),
            });
        }
        let scored = &token_logprobs[window_start..];
        if !scored.is_empty() {
            let mean = -scored.iter().map(|t| t.logprob).sum::<f64>() / scored.len() as f64;
            let labels_minus_one = end - prev_end - 1;
            guide_nll += mean * labels_minus_one as f64;
            guide_tokens += labels_minus_one;
        }
    }
    let nll: f64 = -token_logprobs.iter().map(|t| t.logprob).sum::<f64>();
    let mean_nll = nll / token_logprobs.len() as f64;
    Ok(ScoreReport {
        max_length,
        stride,
        text_tokens: ids.len(),
        scored_tokens: token_logprobs.len(),
        windows: plan.len(),
        mean_nll,
        perplexity: mean_nll.exp(),
        guide_perplexity: (guide_nll / guide_tokens.max(1) as f64).exp(),
        token_logprobs,
    })
}

/// One window: tokens `begin..end`, scoring `first_target..end` (the ones the window before,
/// which ended at `prev_end`, did not score).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Window {
    begin: usize,
    end: usize,
    first_target: usize,
    prev_end: usize,
}

/// The guide's windows over `len` tokens.
fn windows(len: usize, max_length: usize, stride: usize) -> Vec<Window> {
    let mut out = Vec::new();
    let (mut begin, mut prev_end) = (0, 0);
    while begin < len {
        let end = (begin + max_length).min(len);
        out.push(Window {
            begin,
            end,
            // The first token of a window has no context, so it is never a target.
            first_target: prev_end.max(begin + 1),
            prev_end,
        });
        if end == len {
            break;
        }
        prev_end = end;
        begin += stride;
    }
    out
}

/// The logits at every position of `tokens`, run as a fresh sequence.
fn window_logits(engine: &mut dyn Engine, tokens: &[u32]) -> Result<crate::engine::Logits> {
    let seq = engine.add_sequence();
    let result = engine.forward(&[BatchEntry {
        seq,
        tokens,
        logits: LogitsFor::All,
    }]);
    engine.remove_sequence(seq);
    result
}

/// The window and stride to use (defaults filled in), or why they cannot be used.
fn check_windows(
    n_positions: usize,
    ids: &[u32],
    max_length: Option<usize>,
    stride: Option<usize>,
) -> Result<(usize, usize)> {
    let max_length = max_length.unwrap_or(n_positions);
    if max_length == 0 || max_length > n_positions {
        return Err(Error::invalid(format!(
            "the window must be 1 to {n_positions} tokens (the model's context), got {max_length}"
        )));
    }
    let stride = stride.unwrap_or((max_length / 2).max(1));
    if stride == 0 || stride > max_length {
        return Err(Error::invalid(format!(
            "stride must be 1 to the window length {max_length}, got {stride}"
        )));
    }
    if ids.len() < 2 {
        return Err(Error::invalid(
            "the text must have at least 2 tokens to score (the first token has no prediction)",
        ));
    }
    Ok((max_length, stride))
}

/// How far one engine's next-token distributions are from a reference engine's on the same
/// text and windows (e.g. a quantized model against f32).
#[derive(Debug, Clone, Serialize)]
pub struct Divergence {
    /// Positions compared (every scored token).
    pub positions: usize,
    /// Mean KL(reference ‖ engine) of the next-token distributions, nats.
    pub mean_kl: f64,
    /// Largest KL at any position, nats.
    pub max_kl: f64,
    /// Fraction of positions where both put the same token first.
    pub top1_agreement: f64,
}

/// Compares `engine` with `reference` position by position, over the windows [`score`] uses.
pub fn divergence(
    engine: &mut dyn Engine,
    reference: &mut dyn Engine,
    ids: &[u32],
    max_length: Option<usize>,
    stride: Option<usize>,
) -> Result<Divergence> {
    let (max_length, stride) = check_windows(engine.config().n_positions, ids, max_length, stride)?;
    let (mut kl_sum, mut max_kl, mut agree, mut n) = (0f64, 0f64, 0usize, 0usize);
    for w in windows(ids.len(), max_length, stride) {
        let tokens = &ids[w.begin..w.end];
        let (ours, theirs) = (
            window_logits(engine, tokens)?,
            window_logits(reference, tokens)?,
        );
        let (ours, theirs): (Vec<&[f32]>, Vec<&[f32]>) =
            (ours.entry(0).collect(), theirs.entry(0).collect());
        for pos in w.first_target..w.end {
            let (q, p) = (ours[pos - 1 - w.begin], theirs[pos - 1 - w.begin]);
            let kl = kl_divergence(p, q);
            kl_sum += kl;
            max_kl = max_kl.max(kl);
            agree += usize::from(argmax(p) == argmax(q));
            n += 1;
        }
    }
    Ok(Divergence {
        positions: n,
        mean_kl: kl_sum / n as f64,
        max_kl,
        top1_agreement: agree as f64 / n as f64,
    })
}

/// KL(softmax(p) ‖ softmax(q)) in nats, in f64.
pub fn kl_divergence(p: &[f32], q: &[f32]) -> f64 {
    let log_norm = |row: &[f32]| {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        max + row
            .iter()
            .map(|&x| (x as f64 - max).exp())
            .sum::<f64>()
            .ln()
    };
    let (lp, lq) = (log_norm(p), log_norm(q));
    p.iter()
        .zip(q)
        .map(|(&a, &b)| {
            let log_p = a as f64 - lp;
            log_p.exp() * (log_p - (b as f64 - lq))
        })
        .sum::<f64>()
        .max(0.0)
}

fn argmax(row: &[f32]) -> usize {
    row.iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |best, (i, &x)| {
            if x > best.1 {
                (i, x)
            } else {
                best
            }
        })
        .0
}

/// log softmax(row)[i], in f64.
pub fn log_softmax_at(row: &[f32], i: usize) -> f64 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = row.iter().map(|&x| (x as f64 - max).exp()).sum();
    row[i] as f64 - max - sum.ln()
}
