//! The keys and values a sequence has seen, per layer, as `[tokens, n_embd]` rows
//! (heads side by side, as the QKV projection writes them).

/// Cache space grows in blocks of this many tokens, not for the whole context up front.
const BLOCK_TOKENS: usize = 64;

/// One sequence's KV cache.
#[derive(Debug, Clone, Default)]
pub struct SeqCache {
    /// Tokens cached (in every layer, between forward passes).
    pub len: usize,
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
}

impl SeqCache {
    pub fn new(n_layer: usize) -> Self {
        Self {
            len: 0,
            keys: vec![Vec::new(); n_layer],
            values: vec![Vec::new(); n_layer],
        }
    }

    /// Appends `k` and `v` rows (same length) to layer `layer`, growing by whole blocks.
    pub fn append(&mut self, layer: usize, k: &[f32], v: &[f32], width: usize) {
        for (buf, rows) in [(&mut self.keys[layer], k), (&mut self.values[layer], v)] {
            let need = buf.len() + rows.len();
            if need > buf.capacity() {
                let tokens = (need / width).next_multiple_of(BLOCK_TOKENS);
                buf.reserve_exact(tokens * width - buf.len());
            }
            buf.extend_from_slice(rows);
        }
    }

    /// Layer `layer`'s keys, `[tokens, width]`.
    pub fn keys(&self, layer: usize) -> &[f32] {
        &self.keys[layer]
    }

    /// Layer `layer`'s values, `[tokens, width]`.
    pub fn values(&self, layer: usize) -> &[f32] {
        &self.values[layer]
    }

    /// Bytes held (capacity, not just length).
    pub fn bytes(&self) -> usize {
        self.keys
            .iter()
            .chain(&self.values)
            .map(|b| b.capacity() * 4)
            .sum()
    }
}
