//! The CPU backend: the whole GPT-2 forward pass (f32 activations; weights in any format of
//! `crate::quant`), vectorized (AVX2+FMA chosen at run
//! time on x86-64, NEON on aarch64) and spread over all cores with rayon.

mod attention;
mod kv_cache;
pub mod matmul;
mod panel;
pub mod qdot;
pub mod roofline;
pub mod simd;
// Tile kernels exist for x86-64 only; elsewhere `best()` is None and the rest goes unused.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code, unused_variables))]
mod tile;
mod transpose;

use crate::config::{Activation, Gpt2Config};
use crate::engine::{BatchEntry, Engine, Logits, LogitsFor, SeqId};
use crate::error::{Error, Result};
use crate::weights::{Linear, ModelWeights, Norm};
use attention::RowPlace;
use kv_cache::SeqCache;
use rayon::prelude::*;
use std::collections::HashMap;

/// GPT-2 on the CPU.
pub struct CpuEngine {
    w: ModelWeights,
    seqs: HashMap<SeqId, SeqCache>,
    next_id: u64,
}

impl CpuEngine {
    /// An engine over `weights` (threads: rayon's global pool, all cores unless configured).
    pub fn new(weights: ModelWeights) -> Self {
        Self {
            w: weights,
            seqs: HashMap::new(),
            next_id: 0,
        }
    }

    /// Bytes held by all KV caches.
    pub fn kv_cache_bytes(&self) -> usize {
        self.seqs.values().map(SeqCache::bytes).sum()
    }

    /// Checks a batch before anything is changed, so a bad entry leaves every cache intact.
    fn validate(&self, batch: &[BatchEntry<'_>]) -> Result<()> {
        let cfg = &self.w.config;
        let mut seen = std::collections::HashSet::new();
        for e in batch {
            let cache = self
                .seqs
                .get(&e.seq)
                .ok_or_else(|| Error::invalid(format!("unknown sequence {:?}", e.seq)))?;
            if !seen.insert(e.seq) {
                return Err(Error::invalid(format!(
                    "sequence {:?} appears twice in one batch",
                    e.seq
                )));
            }
            if e.tokens.is_empty() && e.logits != LogitsFor::Nothing {
                return Err(Error::invalid(
                    "a batch entry with no tokens cannot ask for logits",
                ));
            }
            if let Some(&bad) = e.tokens.iter().find(|&&t| t as usize >= cfg.vocab_size) {
                return Err(Error::invalid(format!(
                    "token id {bad} is outside the vocabulary (size {})",
                    cfg.vocab_size
                )));
            }
            let total = cache.len + e.tokens.len();
            if total > cfg.n_positions {
                return Err(Error::ContextOverflow(format!(
                    "sequence would hold {total} tokens ({} cached + {} new), but the model's \
                     context is {} tokens",
                    cache.len,
                    e.tokens.len(),
                    cfg.n_positions
                )));
            }
        }
        Ok(())
    }
}

impl Engine for CpuEngine {
    fn config(&self) -> &Gpt2Config {
        &self.w.config
    }

    fn describe(&self) -> String {
        format!(
            "cpu {} ({}, {} threads)",
            self.w.format.label(),
            simd::isa_name(),
            rayon::current_num_threads()
        )
    }

    fn add_sequence(&mut self) -> SeqId {
        let id = SeqId(self.next_id);
        self.next_id += 1;
        self.seqs.insert(id, SeqCache::new(self.w.config.n_layer));
        id
    }

    fn fork_sequence(&mut self, parent: SeqId) -> Result<SeqId> {
        let cache = self
            .seqs
            .get(&parent)
            .ok_or_else(|| Error::invalid(format!("unknown sequence {parent:?}")))?
            .clone();
        let id = SeqId(self.next_id);
        self.next_id += 1;
        self.seqs.insert(id, cache);
        Ok(id)
    }

    fn remove_sequence(&mut self, seq: SeqId) {
        self.seqs.remove(&seq);
    }

    fn sequence_len(&self, seq: SeqId) -> Option<usize> {
        self.seqs.get(&seq).map(|c| c.len)
    }

    fn forward(&mut self, batch: &[BatchEntry<'_>]) -> Result<Logits> {
        // Run the whole pass on a pool thread: every parallel section below then starts with
        // a cheap local push that idle workers steal, instead of a cross-thread injection and
        // a sleep/wake of the calling thread per section (about 10 sections a layer).
        rayon::scope(|_| self.forward_on_pool(batch))
    }
}

impl CpuEngine {
    fn forward_on_pool(&mut self, batch: &[BatchEntry<'_>]) -> Result<Logits> {
        self.validate(batch)?;
        let cfg = self.w.config.clone();
        let (c, v) = (cfg.n_embd, cfg.vocab_size);
        let rows: usize = batch.iter().map(|e| e.tokens.len()).sum();

        // Each row's sequence and absolute position.
        let mut row_seq = Vec::with_capacity(rows);
        let mut row_pos = Vec::with_capacity(rows);
        for e in batch {
            let start = self.seqs[&e.seq].len;
            for i in 0..e.tokens.len() {
                row_seq.push(e.seq);
                row_pos.push(start + i);
            }
        }

        // Token + position embeddings.
        let mut x = vec![0f32; rows * c];
        let tokens = batch.iter().flat_map(|e| e.tokens.iter());
        for ((xr, &tok), &pos) in x.chunks_exact_mut(c).zip(tokens).zip(&row_pos) {
            self.w.wte.dequantize_row(tok as usize, xr);
            simd::add_assign(xr, self.w.wpe.row(pos));
        }

        let mut h = vec![0f32; rows * c];
        let mut qkv = vec![0f32; rows * 3 * c];
        let mut attn = vec![0f32; rows * c];
        let mut proj = vec![0f32; rows * c];
        let mut mlp = vec![0f32; rows * cfg.n_inner];
        for (l, lw) in self.w.layers.iter().enumerate() {
            layer_norm_rows(&x, &lw.ln_1, cfg.layer_norm_epsilon, &mut h);
            linear(&h, rows, &lw.qkv, &mut qkv);

            // Append this layer's keys and values, then attend over each sequence's cache.
            for (t, seq) in row_seq.iter().enumerate() {
                let r = &qkv[t * 3 * c..(t + 1) * 3 * c];
                let cache = self.seqs.get_mut(seq).expect("validated");
                cache.append(l, &r[c..2 * c], &r[2 * c..], c);
            }
            let places: Vec<RowPlace> = row_seq
                .iter()
                .zip(&row_pos)
                .map(|(s, &pos)| RowPlace {
                    cache: &self.seqs[s],
                    pos,
                })
                .collect();
            let scale = cfg.attention_scale(l);
            attention::attend(&qkv, &places, l, cfg.n_head, scale, &mut attn);

            linear(&attn, rows, &lw.attn_out, &mut proj);
            add_rows(&mut x, &proj);
            layer_norm_rows(&x, &lw.ln_2, cfg.layer_norm_epsilon, &mut h);
            linear(&h, rows, &lw.mlp_in, &mut mlp);
            activate(cfg.activation, &mut mlp);
            linear(&mlp, rows, &lw.mlp_out, &mut proj);
            add_rows(&mut x, &proj);
        }
        for e in batch {
            self.seqs.get_mut(&e.seq).expect("validated").len += e.tokens.len();
        }

        // Final norm and LM head, only for the rows asked for.
        let mut wanted = Vec::new();
        let mut per_entry = Vec::with_capacity(batch.len());
        let mut start = 0;
        for e in batch {
            let n = e.tokens.len();
            let range = match e.logits {
                LogitsFor::Nothing => start..start,
                LogitsFor::Last | LogitsFor::Pick(_) => start + n - 1..start + n,
                LogitsFor::All => start..start + n,
            };
            per_entry.push(range.len());
            wanted.extend(range);
            start += n;
        }
        let mut selected = vec![0f32; wanted.len() * c];
        for (dst, &r) in selected.chunks_exact_mut(c).zip(&wanted) {
            simd::layer_norm(
                &x[r * c..(r + 1) * c],
                &self.w.ln_f.gamma,
                &self.w.ln_f.beta,
                cfg.layer_norm_epsilon,
                dst,
            );
        }
        let mut logits = vec![0f32; wanted.len() * v];
        matmul::linear(&selected, wanted.len(), self.w.lm_head(), None, &mut logits);
        Ok(Logits::new(v, logits, &per_entry))
    }
}

/// Rows at which row-wise work is worth splitting over threads.
const PAR_ROWS: usize = 16;

fn linear(x: &[f32], rows: usize, lin: &Linear, out: &mut [f32]) {
    matmul::linear(x, rows, &lin.w, Some(&lin.b), out);
}

fn layer_norm_rows(x: &[f32], norm: &Norm, eps: f32, out: &mut [f32]) {
    let c = norm.gamma.len();
    out.par_chunks_mut(c)
        .zip(x.par_chunks(c))
        .with_min_len(PAR_ROWS)
        .for_each(|(o, r)| simd::layer_norm(r, &norm.gamma, &norm.beta, eps, o));
}

fn add_rows(x: &mut [f32], y: &[f32]) {
    const CHUNK: usize = 1 << 14;
    x.par_chunks_mut(CHUNK)
        .zip(y.par_chunks(CHUNK))
        .for_each(|(a, b)| simd::add_assign(a, b));
}

fn activate(act: Activation, x: &mut [f32]) {
    const CHUNK: usize = 1 << 14;
    x.par_chunks_mut(CHUNK).for_each(|chunk| match act {
        Activation::GeluTanh => simd::gelu_tanh(chunk),
        Activation::GeluErf => simd::gelu_erf(chunk),
        Activation::Relu => chunk.iter_mut().for_each(|v| *v = v.max(0.0)),
    });
}
