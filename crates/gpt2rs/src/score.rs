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
    let n_positions = engine.config().n_positions;
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
    let mut token_logprobs = Vec::with_capacity(ids.len() - 1);
    let mut windows = 0;
    // The guide's bookkeeping: Σ mean_loss × (labels − 1) and Σ (labels − 1).
    let (mut guide_nll, mut guide_tokens) = (0f64, 0usize);
    let mut prev_end = 0;
    let mut begin = 0;
    while begin < ids.len() {
        let end = (begin + max_length).min(ids.len());
        // Targets are the tokens this window adds; the first token of a window has no context.
        let first_target = prev_end.max(begin + 1);
        let seq = engine.add_sequence();
        let result = engine.forward(&[BatchEntry {
            seq,
            tokens: &ids[begin..end],
            logits: LogitsFor::All,
        }]);
        engine.remove_sequence(seq);
        let logits = result?;
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
        windows += 1;
        prev_end = end;
        if end == ids.len() {
            break;
        }
        begin += stride;
    }
    let nll: f64 = -token_logprobs.iter().map(|t| t.logprob).sum::<f64>();
    let mean_nll = nll / token_logprobs.len() as f64;
    Ok(ScoreReport {
        max_length,
        stride,
        text_tokens: ids.len(),
        scored_tokens: token_logprobs.len(),
        windows,
        mean_nll,
        perplexity: mean_nll.exp(),
        guide_perplexity: (guide_nll / guide_tokens.max(1) as f64).exp(),
        token_logprobs,
    })
}

/// log softmax(row)[i], in f64.
pub fn log_softmax_at(row: &[f32], i: usize) -> f64 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = row.iter().map(|&x| (x as f64 - max).exp()).sum();
    row[i] as f64 - max - sum.ln()
}
