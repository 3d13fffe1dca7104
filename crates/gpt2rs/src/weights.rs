//! Model weights in the engine's own layout: every matrix stored `[out, in]` row-major (so a
//! decode step streams each output's weights contiguously) in the chosen format (f32, f16,
//! bf16, int8, int4; see `crate::quant`), converted once at load from whatever the checkpoint
//! stores (Conv1D's `[in, out]`, f16, bf16, …).

use crate::checkpoint::Checkpoint;
use crate::config::Gpt2Config;
use crate::error::{Error, Result};
use crate::quant::{DType, QMatrix, WeightFormat};
use rayon::prelude::*;

/// A row-major f32 matrix.
#[derive(Debug, Clone, PartialEq)]
pub struct Matrix {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f32>,
}

impl Matrix {
    /// Row `r` as a slice.
    pub fn row(&self, r: usize) -> &[f32] {
        &self.data[r * self.cols..(r + 1) * self.cols]
    }
}

/// `y = x · Wᵀ + b` with `w` of shape `[out, in]`.
#[derive(Debug, Clone)]
pub struct Linear {
    pub w: QMatrix,
    pub b: Vec<f32>,
}

/// LayerNorm's scale and shift.
#[derive(Debug, Clone, PartialEq)]
pub struct Norm {
    pub gamma: Vec<f32>,
    pub beta: Vec<f32>,
}

/// One transformer block.
#[derive(Debug, Clone)]
pub struct LayerWeights {
    pub ln_1: Norm,
    /// Query, key and value projections stacked: `[3 * n_embd, n_embd]`.
    pub qkv: Linear,
    pub attn_out: Linear,
    pub ln_2: Norm,
    /// `[n_inner, n_embd]`.
    pub mlp_in: Linear,
    /// `[n_embd, n_inner]`.
    pub mlp_out: Linear,
}

/// All weights of a GPT-2 model. The four matrices of each block and the LM head are in the
/// chosen [`WeightFormat`]; embeddings of positions, biases and norms stay f32 (they are small).
#[derive(Debug, Clone)]
pub struct ModelWeights {
    pub config: Gpt2Config,
    pub format: WeightFormat,
    /// Token embedding `[vocab, n_embd]`; also the LM head when tied.
    pub wte: QMatrix,
    /// Position embedding `[n_positions, n_embd]`.
    pub wpe: Matrix,
    pub layers: Vec<LayerWeights>,
    pub ln_f: Norm,
    /// A separate LM head `[vocab, n_embd]`, or `None` when tied to `wte`.
    pub lm_head: Option<QMatrix>,
}

impl ModelWeights {
    /// The matrix that turns the final hidden state into logits.
    pub fn lm_head(&self) -> &QMatrix {
        self.lm_head.as_ref().unwrap_or(&self.wte)
    }

    /// Bytes the weights take in memory.
    pub fn bytes(&self) -> u64 {
        let vec_bytes = |v: &[f32]| v.len() as u64 * 4;
        let norm = |n: &Norm| vec_bytes(&n.gamma) + vec_bytes(&n.beta);
        let lin = |l: &Linear| l.w.bytes() + vec_bytes(&l.b);
        self.wte.bytes()
            + vec_bytes(&self.wpe.data)
            + self.lm_head.as_ref().map_or(0, QMatrix::bytes)
            + norm(&self.ln_f)
            + self
                .layers
                .iter()
                .map(|l| {
                    norm(&l.ln_1)
                        + norm(&l.ln_2)
                        + lin(&l.qkv)
                        + lin(&l.attn_out)
                        + lin(&l.mlp_in)
                        + lin(&l.mlp_out)
                })
                .sum::<u64>()
    }

    /// Converts a checkpoint's tensors into the engine layout in f32, checking every name and
    /// shape.
    pub fn from_checkpoint(ckpt: &Checkpoint) -> Result<Self> {
        Self::from_checkpoint_as(ckpt, WeightFormat::F32)
    }

    /// Converts a checkpoint's tensors into the engine layout in `format`, one matrix at a time
    /// (so memory never holds the whole model in f32 when a smaller format is asked for).
    pub fn from_checkpoint_as(ckpt: &Checkpoint, format: WeightFormat) -> Result<Self> {
        let cfg = ckpt.config.clone();
        let (c, v, p, inner) = (cfg.n_embd, cfg.vocab_size, cfg.n_positions, cfg.n_inner);
        let loader = Loader { ckpt, format };
        let wte = QMatrix::from_matrix(loader.matrix("wte.weight", v, c)?, format.head_dtype());
        let wpe = loader.matrix("wpe.weight", p, c)?;
        let layers = (0..cfg.n_layer)
            .into_par_iter()
            .map(|i| {
                let h = |s: &str| format!("h.{i}.{s}");
                Ok(LayerWeights {
                    ln_1: loader.norm(&h("ln_1"), c)?,
                    qkv: loader.conv1d(&h("attn.c_attn"), c, 3 * c)?,
                    attn_out: loader.conv1d(&h("attn.c_proj"), c, c)?,
                    ln_2: loader.norm(&h("ln_2"), c)?,
                    mlp_in: loader.conv1d(&h("mlp.c_fc"), c, inner)?,
                    mlp_out: loader.conv1d(&h("mlp.c_proj"), inner, c)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let ln_f = loader.norm("ln_f", c)?;
        let lm_head = if cfg.tie_word_embeddings {
            None
        } else {
            let name = ckpt
                .find(&["lm_head.weight"])
                .ok_or_else(|| Error::BadCheckpoint {
                    path: ckpt.dir.clone(),
                    reason:
                        "config.json says tie_word_embeddings=false but there is no lm_head.weight"
                            .into(),
                })?;
            Some(QMatrix::from_matrix(
                loader.exact(name, &[v, c])?,
                format.head_dtype(),
            ))
        };
        Ok(Self {
            config: cfg,
            format,
            wte,
            wpe,
            layers,
            ln_f,
            lm_head,
        })
    }

    /// f32 weights of the exact shapes of `config`, drawn from `seed`: for speed measurements
    /// and tests where no checkpoint is at hand. The same seed always gives the same weights.
    pub fn synthetic(config: &Gpt2Config, seed: u64) -> Self {
        Self::synthetic_as(config, seed, WeightFormat::F32)
    }

    /// [`ModelWeights::synthetic`] stored in `format` (each matrix converted as it is drawn).
    pub fn synthetic_as(config: &Gpt2Config, seed: u64, format: WeightFormat) -> Self {
        let (c, v, p, inner) = (
            config.n_embd,
            config.vocab_size,
            config.n_positions,
            config.n_inner,
        );
        let mut s = Synth {
            seed,
            stream: 0,
            dtype: format.dtype,
        };
        let head = format.head_dtype();
        let wte = QMatrix::from_matrix(s.matrix(v, c, 0.02), head);
        let wpe = s.matrix(p, c, 0.01);
        let layers = (0..config.n_layer)
            .map(|_| LayerWeights {
                ln_1: s.norm(c),
                qkv: s.linear(3 * c, c),
                attn_out: s.linear(c, c),
                ln_2: s.norm(c),
                mlp_in: s.linear(inner, c),
                mlp_out: s.linear(c, inner),
            })
            .collect();
        let ln_f = s.norm(c);
        let lm_head =
            (!config.tie_word_embeddings).then(|| QMatrix::from_matrix(s.matrix(v, c, 0.02), head));
        Self {
            config: config.clone(),
            format,
            wte,
            wpe,
            layers,
            ln_f,
            lm_head,
        }
    }
}

/// Hands out independent deterministic random streams for synthetic weights.
struct Synth {
    seed: u64,
    stream: u64,
    dtype: DType,
}

impl Synth {
    fn values(&mut self, n: usize, mean: f32, std: f32) -> Vec<f32> {
        self.stream += 1;
        let s = self.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15)
            ^ self.stream.wrapping_mul(0xD1B5_4A32_D192_ED03);
        synthetic_values(n, s, mean, std)
    }
    fn matrix(&mut self, rows: usize, cols: usize, std: f32) -> Matrix {
        Matrix {
            rows,
            cols,
            data: self.values(rows * cols, 0.0, std),
        }
    }
    fn linear(&mut self, out: usize, inp: usize) -> Linear {
        Linear {
            w: QMatrix::from_matrix(self.matrix(out, inp, 0.02), self.dtype),
            b: self.values(out, 0.0, 0.01),
        }
    }
    fn norm(&mut self, n: usize) -> Norm {
        Norm {
            gamma: self.values(n, 1.0, 0.05),
            beta: self.values(n, 0.0, 0.02),
        }
    }
}

/// Deterministic pseudo-random values with the given mean and standard deviation
/// (uniform distribution), filled in parallel: each 64k-element chunk has its own stream,
/// so the result does not depend on the number of threads.
fn synthetic_values(n: usize, seed: u64, mean: f32, std: f32) -> Vec<f32> {
    const CHUNK: usize = 1 << 16;
    let half_width = std * 3f32.sqrt();
    let mut out = vec![0f32; n];
    out.par_chunks_mut(CHUNK)
        .enumerate()
        .for_each(|(ci, chunk)| {
            let mut state = seed ^ (ci as u64).wrapping_mul(0xA076_1D64_78BD_642F);
            for x in chunk {
                // splitmix64
                state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
                let mut z = state;
                z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                z ^= z >> 31;
                let unit = (z >> 40) as f32 / (1u64 << 24) as f32; // [0, 1)
                *x = mean + half_width * (2.0 * unit - 1.0);
            }
        });
    out
}

/// Reads tensors by their GPT-2 names, with or without the `transformer.` prefix.
struct Loader<'a> {
    ckpt: &'a Checkpoint,
    format: WeightFormat,
}

impl Loader<'_> {
    fn resolve(&self, name: &str) -> Result<&str> {
        let prefixed = format!("transformer.{name}");
        self.ckpt
            .find(&[prefixed.as_str(), name])
            .ok_or_else(|| Error::BadCheckpoint {
                path: self.ckpt.dir.clone(),
                reason: format!(
                    "tensor '{prefixed}' (or '{name}') is missing: is this a GPT-2 checkpoint?"
                ),
            })
    }

    /// A tensor of exactly `shape`, as f32.
    fn exact(&self, name: &str, shape: &[usize]) -> Result<Matrix> {
        let t = self.ckpt.tensor(name)?;
        if t.shape != shape {
            return Err(Error::BadCheckpoint {
                path: self.ckpt.dir.clone(),
                reason: format!(
                    "tensor '{name}' has shape {:?}, expected {shape:?} from config.json",
                    t.shape
                ),
            });
        }
        let mut data = vec![0f32; t.numel()];
        t.to_f32_into(&mut data);
        let cols = *shape.last().unwrap_or(&1);
        Ok(Matrix {
            rows: data.len() / cols.max(1),
            cols,
            data,
        })
    }

    fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<Matrix> {
        self.exact(self.resolve(name)?, &[rows, cols])
    }

    fn vector(&self, name: &str, n: usize) -> Result<Vec<f32>> {
        Ok(self.exact(self.resolve(name)?, &[n])?.data)
    }

    fn norm(&self, prefix: &str, n: usize) -> Result<Norm> {
        Ok(Norm {
            gamma: self.vector(&format!("{prefix}.weight"), n)?,
            beta: self.vector(&format!("{prefix}.bias"), n)?,
        })
    }

    /// A transformers Conv1D (`weight` stored `[in, out]`), transposed to `[out, in]`.
    fn conv1d(&self, prefix: &str, n_in: usize, n_out: usize) -> Result<Linear> {
        let stored = self.matrix(&format!("{prefix}.weight"), n_in, n_out)?;
        Ok(Linear {
            w: QMatrix::from_matrix(transpose(&stored), self.format.dtype),
            b: self.vector(&format!("{prefix}.bias"), n_out)?,
        })
    }
}

/// `[r, c]` to `[c, r]`, in cache-sized tiles.
fn transpose(m: &Matrix) -> Matrix {
    const TILE: usize = 32;
    let (r, c) = (m.rows, m.cols);
    let mut out = vec![0f32; r * c];
    for i0 in (0..r).step_by(TILE) {
        for j0 in (0..c).step_by(TILE) {
            for i in i0..(i0 + TILE).min(r) {
                for j in j0..(j0 + TILE).min(c) {
                    out[j * r + i] = m.data[i * c + j];
                }
            }
        }
    }
    Matrix {
        rows: c,
        cols: r,
        data: out,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transpose_awkward_shape() {
        let m = Matrix {
            rows: 37,
            cols: 65,
            data: (0..37 * 65).map(|x| x as f32).collect(),
        };
        let t = transpose(&m);
        for i in 0..37 {
            for j in 0..65 {
                assert_eq!(t.data[j * 37 + i], m.data[i * 65 + j]);
            }
        }
    }

    #[test]
    fn every_format_holds_the_bytes_it_promises() {
        let mut cfg = Gpt2Config::preset("gpt2").unwrap();
        cfg.n_layer = 2;
        cfg.vocab_size = 301;
        cfg.n_embd = 96;
        cfg.n_inner = 4 * 96;
        for untied in [false, true] {
            cfg.tie_word_embeddings = !untied;
            for dtype in DType::ALL {
                for quantize_lm_head in [true, false] {
                    let format = WeightFormat {
                        dtype,
                        quantize_lm_head,
                    };
                    let w = ModelWeights::synthetic_as(&cfg, 1, format);
                    assert_eq!(w.bytes(), format.model_bytes(&cfg), "{}", format.label());
                    assert_eq!(w.layers[1].mlp_in.w.dtype(), dtype);
                    assert_eq!(w.lm_head().dtype(), format.head_dtype());
                }
            }
        }
        assert_eq!(
            WeightFormat::F32.model_bytes(&Gpt2Config::preset("gpt2").unwrap()),
            124_439_808 * 4
        );
    }

    #[test]
    fn synthetic_is_deterministic_and_shaped() {
        let mut cfg = Gpt2Config::preset("gpt2").unwrap();
        cfg.n_layer = 1;
        cfg.vocab_size = 300;
        let a = ModelWeights::synthetic(&cfg, 7);
        let b = ModelWeights::synthetic(&cfg, 7);
        let c = ModelWeights::synthetic(&cfg, 8);
        let wte = |w: &ModelWeights| w.wte.dequantize().data;
        assert_eq!(wte(&a), wte(&b));
        assert_eq!(
            a.layers[0].mlp_in.w.dequantize(),
            b.layers[0].mlp_in.w.dequantize()
        );
        assert_ne!(wte(&a), wte(&c));
        assert_eq!(a.layers[0].qkv.w.rows, 3 * 768);
        assert_eq!(a.layers[0].mlp_out.w.cols, 3072);
        let data = wte(&a);
        let mean = data.iter().sum::<f32>() / data.len() as f32;
        let var = data.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / data.len() as f32;
        assert!(
            mean.abs() < 1e-3 && (var.sqrt() - 0.02).abs() < 1e-3,
            "{mean} {var}"
        );
    }
}
