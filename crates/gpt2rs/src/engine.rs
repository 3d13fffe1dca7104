//! The one interface every backend implements: run the model over a ragged batch.
//!
//! Each entry of a batch names a sequence (whose KV cache the engine keeps) and brings the
//! sequence's new tokens; their positions continue where the sequence's cache ends. Prefill,
//! decode, scoring and continuous batching are all this same call, and callers never pad.

use crate::config::Gpt2Config;
use crate::error::Result;

/// A sequence whose KV cache lives in the engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeqId(pub u64);

/// Which logits a batch entry wants back.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LogitsFor {
    /// None (the tokens only extend the cache).
    Nothing,
    /// The last new token's (what generation needs).
    Last,
    /// Every new token's (what scoring needs).
    All,
    /// Only the next token after the last new one, chosen by the rule (generation that reads
    /// nothing else of the logits): an engine on a device picks it there and brings back one
    /// id instead of a vocabulary of floats; others may return the last row and let
    /// [`Logits::pick`] choose.
    Pick(PickRule),
}

pub use crate::pick::{gumbel, pick_noise, PickRule};

/// One entry of a ragged batch.
#[derive(Debug, Clone, Copy)]
pub struct BatchEntry<'a> {
    pub seq: SeqId,
    pub tokens: &'a [u32],
    pub logits: LogitsFor,
}

/// Logits returned by [`Engine::forward`]: rows of `vocab` floats, grouped by batch entry.
#[derive(Debug, Clone, Default)]
pub struct Logits {
    pub vocab: usize,
    data: Vec<f32>,
    /// For each batch entry, the range of rows that belong to it.
    rows: Vec<std::ops::Range<usize>>,
    /// For each batch entry, the token the engine picked for it (entries that asked for
    /// [`LogitsFor::Pick`] from an engine that picks itself).
    picks: Vec<Option<u32>>,
}

impl Logits {
    /// Builds logits from flat rows and, per entry, how many rows it has.
    pub fn new(vocab: usize, data: Vec<f32>, rows_per_entry: &[usize]) -> Self {
        let mut rows = Vec::with_capacity(rows_per_entry.len());
        let mut start = 0;
        for &n in rows_per_entry {
            rows.push(start..start + n);
            start += n;
        }
        debug_assert_eq!(start * vocab, data.len());
        let picks = vec![None; rows.len()];
        Self {
            vocab,
            data,
            rows,
            picks,
        }
    }

    /// Adds, per entry, the token an engine picked itself (`None` where it did not).
    pub fn with_picks(mut self, picks: Vec<Option<u32>>) -> Self {
        debug_assert_eq!(picks.len(), self.rows.len());
        self.picks = picks;
        self
    }

    /// The token `rule` picks after entry `entry`: the engine's own pick, or `rule` applied to
    /// the entry's last row; `None` if it has neither.
    pub fn pick(&self, entry: usize, rule: PickRule) -> Option<u32> {
        self.picks[entry].or_else(|| self.last(entry).map(|row| rule.apply(row)))
    }

    /// The rows of batch entry `entry` (empty if it asked for nothing).
    pub fn entry(&self, entry: usize) -> impl ExactSizeIterator<Item = &[f32]> {
        let r = self.rows[entry].clone();
        self.data[r.start * self.vocab..r.end * self.vocab].chunks_exact(self.vocab.max(1))
    }

    /// The last row of batch entry `entry`, if it has any.
    pub fn last(&self, entry: usize) -> Option<&[f32]> {
        self.entry(entry).last()
    }
}

/// A GPT-2 forward pass with a KV cache per sequence.
pub trait Engine {
    /// The model's hyperparameters.
    fn config(&self) -> &Gpt2Config;

    /// A short description: backend, precision, threads (for logs and bench reports).
    fn describe(&self) -> String;

    /// Starts an empty sequence.
    fn add_sequence(&mut self) -> SeqId;

    /// Starts a sequence whose cache is a copy of `parent`'s (for several samples of one prompt).
    fn fork_sequence(&mut self, parent: SeqId) -> Result<SeqId>;

    /// Frees a sequence and its cache. Unknown ids are ignored.
    fn remove_sequence(&mut self, seq: SeqId);

    /// Tokens in the sequence's cache, or `None` for an unknown id.
    fn sequence_len(&self, seq: SeqId) -> Option<usize>;

    /// Appends each entry's tokens to its sequence and returns the logits asked for.
    /// Fails (and changes nothing) if a sequence would exceed the context length.
    fn forward(&mut self, batch: &[BatchEntry<'_>]) -> Result<Logits>;

    /// Gets ready to run up to `max_batch` sequences in passes of up to `max_step_tokens`
    /// tokens, so that what an engine sets up per shape (GPU buffers, CUDA graphs) is not done
    /// in the middle of serving. Leaves no sequence behind. The default does nothing.
    fn warm_up(&mut self, max_batch: usize, max_step_tokens: usize) -> Result<()> {
        let _ = (max_batch, max_step_tokens);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pick_is_the_engines_own_or_the_first_largest_logit_of_the_last_row() {
        // Entry 0: two rows (the last one has a tie at 1 and 3); entry 1: none; entry 2: none,
        // but the engine picked 7.
        let data = vec![0.0, 9.0, 0.0, 0.0, 0.5, 2.0, 1.0, 2.0];
        let l = Logits::new(4, data, &[2, 0, 0]).with_picks(vec![None, None, Some(7)]);
        let g = PickRule::Greedy;
        assert_eq!(l.pick(0, g), Some(1));
        assert_eq!(l.pick(1, g), None);
        assert_eq!(l.pick(2, g), Some(7));
        assert!(l.last(2).is_none());
    }

    #[test]
    fn gumbel_picks_sample_the_softmax_at_the_temperature() {
        let row = [1.0f32, 0.0, 2.0, -1.0];
        for temperature in [0.5f32, 1.0, 2.0] {
            let z: f64 = row.iter().map(|&v| ((v / temperature) as f64).exp()).sum();
            let mut counts = [0usize; 4];
            let n = 40_000;
            for seed in 0..n as u64 {
                let rule = PickRule::sample(temperature, seed.wrapping_mul(0x2545_F491_4F6C_DD1D));
                counts[rule.apply(&row) as usize] += 1;
            }
            for (i, &c) in counts.iter().enumerate() {
                let want = ((row[i] / temperature) as f64).exp() / z;
                let got = c as f64 / n as f64;
                // 40,000 draws: a standard error below 0.0025.
                assert!(
                    (got - want).abs() < 0.012,
                    "t {temperature}, token {i}: {got} vs {want}"
                );
            }
        }
        // The noise is uniform in (0, 1), never 0 or 1.
        for t in 0..10_000 {
            let u = pick_noise(7, t);
            assert!(u > 0.0 && u < 1.0);
        }
    }
}
