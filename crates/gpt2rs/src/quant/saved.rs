//! gpt2rs's own checkpoint of converted weights (`gpt2rs quantize`): one safetensors file in the
//! engine's layout, so loading maps it and uses every matrix in place, with no conversion.
//!
//! The file's `__metadata__` says what it is: `format = gpt2rs`, `gpt2rs.weights` (the matrices'
//! format), `gpt2rs.lm_head` (the LM head's), `gpt2rs.group_size` (32). Tensors use GPT-2's names
//! without the `transformer.` prefix; a matrix is stored `[out, in]` (not Conv1D's `[in, out]`):
//! as `NAME` for f32/f16/bf16, and as `NAME.q` plus `NAME.scales` (f16, one per group) for int8
//! (i8, `[out, groups * 32]`) and int4 (u8, `[out, groups * 16]`). Biases, norms and the position
//! embedding are f32.

use super::{groups, Buf, DType, QData, QMatrix, WeightFormat, GROUP};
use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::weights::{LayerWeights, Linear, Matrix, ModelWeights, Norm};
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use std::collections::HashMap;
use std::path::Path;

const FORMAT_KEY: &str = "format";
const FORMAT: &str = "gpt2rs";
const WEIGHTS_KEY: &str = "gpt2rs.weights";
const HEAD_KEY: &str = "gpt2rs.lm_head";
const GROUP_KEY: &str = "gpt2rs.group_size";

/// The weight format of a gpt2rs checkpoint, or `None` for any other checkpoint.
pub fn saved_format(ckpt: &Checkpoint) -> Result<Option<WeightFormat>> {
    if ckpt.metadata(FORMAT_KEY) != Some(FORMAT) {
        return Ok(None);
    }
    let bad = |reason: String| Error::BadCheckpoint {
        path: ckpt.dir.clone(),
        reason,
    };
    let read = |key: &str| -> Result<DType> {
        let v = ckpt
            .metadata(key)
            .ok_or_else(|| bad(format!("gpt2rs checkpoint without '{key}' in its metadata")))?;
        DType::parse(v).map_err(|e| bad(format!("'{key}': {e}")))
    };
    let (dtype, head) = (read(WEIGHTS_KEY)?, read(HEAD_KEY)?);
    if head != dtype && head != DType::F32 {
        return Err(bad(format!(
            "LM head stored as {head} with {dtype} weights: only the same or f32 is valid"
        )));
    }
    if ckpt.metadata(GROUP_KEY) != Some(&GROUP.to_string()) {
        return Err(bad(format!(
            "group size {:?}: this gpt2rs reads groups of {GROUP}",
            ckpt.metadata(GROUP_KEY)
        )));
    }
    Ok(Some(WeightFormat {
        dtype,
        quantize_lm_head: head == dtype,
    }))
}

/// Writes `w` as a gpt2rs checkpoint in `dir`: config.json and model.safetensors.
pub fn save(w: &ModelWeights, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut t = Tensors::default();
    t.matrix("wte.weight", &w.wte);
    t.f32("wpe.weight", &[w.wpe.rows, w.wpe.cols], &w.wpe.data);
    for (i, l) in w.layers.iter().enumerate() {
        let p = format!("h.{i}");
        t.norm(&format!("{p}.ln_1"), &l.ln_1);
        t.norm(&format!("{p}.ln_2"), &l.ln_2);
        for (name, lin) in [
            ("attn.c_attn", &l.qkv),
            ("attn.c_proj", &l.attn_out),
            ("mlp.c_fc", &l.mlp_in),
            ("mlp.c_proj", &l.mlp_out),
        ] {
            t.matrix(&format!("{p}.{name}.weight"), &lin.w);
            t.f32(&format!("{p}.{name}.bias"), &[lin.b.len()], &lin.b);
        }
    }
    t.norm("ln_f", &w.ln_f);
    if let Some(head) = &w.lm_head {
        t.matrix("lm_head.weight", head);
    }
    let views: Vec<(String, TensorView<'_>)> = t
        .0
        .iter()
        .map(|(name, dtype, shape, bytes)| {
            let view = TensorView::new(*dtype, shape.clone(), bytes).expect("shape matches data");
            (name.clone(), view)
        })
        .collect();
    let meta = HashMap::from([
        (FORMAT_KEY.to_string(), FORMAT.to_string()),
        (WEIGHTS_KEY.to_string(), w.format.dtype.name().to_string()),
        (
            HEAD_KEY.to_string(),
            w.format.head_dtype().name().to_string(),
        ),
        (GROUP_KEY.to_string(), GROUP.to_string()),
    ]);
    let path = dir.join("model.safetensors");
    safetensors::serialize_to_file(views, Some(meta), &path).map_err(|e| Error::BadCheckpoint {
        path: path.clone(),
        reason: format!("cannot write: {e}"),
    })?;
    let config = serde_json::to_string_pretty(&w.config.to_hf_json()).expect("serializable");
    let cfg_path = dir.join("config.json");
    std::fs::write(&cfg_path, config).map_err(|e| Error::io(&cfg_path, e))
}

/// Tensors to write: name, element type, shape, little-endian bytes.
#[derive(Default)]
struct Tensors(Vec<(String, Dtype, Vec<usize>, Vec<u8>)>);

impl Tensors {
    fn f32(&mut self, name: &str, shape: &[usize], v: &[f32]) {
        let bytes = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.0
            .push((name.into(), Dtype::F32, shape.to_vec(), bytes));
    }
    fn u16(&mut self, name: &str, dtype: Dtype, shape: &[usize], v: &[u16]) {
        let bytes = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.0.push((name.into(), dtype, shape.to_vec(), bytes));
    }
    fn norm(&mut self, prefix: &str, n: &Norm) {
        self.f32(&format!("{prefix}.weight"), &[n.gamma.len()], &n.gamma);
        self.f32(&format!("{prefix}.bias"), &[n.beta.len()], &n.beta);
    }
    fn matrix(&mut self, name: &str, m: &QMatrix) {
        let (r, c, g) = (m.rows, m.cols, groups(m.cols));
        match &m.data {
            QData::F32(d) => self.f32(name, &[r, c], d),
            QData::F16(d) => self.u16(name, Dtype::F16, &[r, c], d),
            QData::Bf16(d) => self.u16(name, Dtype::BF16, &[r, c], d),
            QData::Int8 { q, scales } => {
                let bytes = q.iter().map(|&v| v as u8).collect();
                self.0
                    .push((format!("{name}.q"), Dtype::I8, vec![r, g * GROUP], bytes));
                self.u16(&format!("{name}.scales"), Dtype::F16, &[r, g], scales);
            }
            QData::Int4 { q, scales } => {
                self.0.push((
                    format!("{name}.q"),
                    Dtype::U8,
                    vec![r, g * GROUP / 2],
                    q.to_vec(),
                ));
                self.u16(&format!("{name}.scales"), Dtype::F16, &[r, g], scales);
            }
        }
    }
}

/// Loads a gpt2rs checkpoint of `format` (from [`saved_format`]), using its matrices in place.
pub fn load(ckpt: &Checkpoint, format: WeightFormat) -> Result<ModelWeights> {
    let cfg = ckpt.config.clone();
    let (c, v, p, inner) = (cfg.n_embd, cfg.vocab_size, cfg.n_positions, cfg.n_inner);
    let r = Reader { ckpt };
    let layers = (0..cfg.n_layer)
        .map(|i| {
            let h = |s: &str| format!("h.{i}.{s}");
            let lin = |name: &str, out: usize, inp: usize| -> Result<Linear> {
                Ok(Linear {
                    w: r.matrix(&h(&format!("{name}.weight")), out, inp, format.dtype)?,
                    b: r.f32(&h(&format!("{name}.bias")), &[out])?,
                })
            };
            Ok(LayerWeights {
                ln_1: r.norm(&h("ln_1"), c)?,
                qkv: lin("attn.c_attn", 3 * c, c)?,
                attn_out: lin("attn.c_proj", c, c)?,
                ln_2: r.norm(&h("ln_2"), c)?,
                mlp_in: lin("mlp.c_fc", inner, c)?,
                mlp_out: lin("mlp.c_proj", c, inner)?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let head = format.head_dtype();
    let lm_head = if cfg.tie_word_embeddings {
        None
    } else {
        Some(r.matrix("lm_head.weight", v, c, head)?)
    };
    Ok(ModelWeights {
        format,
        wte: r.matrix("wte.weight", v, c, head)?,
        wpe: Matrix {
            rows: p,
            cols: c,
            data: r.f32("wpe.weight", &[p, c])?,
        },
        layers,
        ln_f: r.norm("ln_f", c)?,
        lm_head,
        config: cfg,
    })
}

struct Reader<'a> {
    ckpt: &'a Checkpoint,
}

impl Reader<'_> {
    fn bad(&self, reason: String) -> Error {
        Error::BadCheckpoint {
            path: self.ckpt.dir.clone(),
            reason,
        }
    }

    /// The tensor `name`, checked to be `dtype` of `shape`, as a buffer over the mapped file.
    fn buf<T: super::Pod>(&self, name: &str, dtype: Dtype, shape: &[usize]) -> Result<Buf<T>> {
        let t = self.ckpt.raw(name)?;
        if t.dtype != dtype || t.shape != shape {
            return Err(self.bad(format!(
                "tensor '{name}' is {:?} {:?}, expected {dtype:?} {shape:?}: the file does not \
                 match its metadata or config.json; quantize the model again",
                t.dtype, t.shape
            )));
        }
        Ok(Buf::from_map(t.map, t.offset, t.len))
    }

    fn f32(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        Ok(self.buf::<f32>(name, Dtype::F32, shape)?.to_vec())
    }

    fn norm(&self, prefix: &str, n: usize) -> Result<Norm> {
        Ok(Norm {
            gamma: self.f32(&format!("{prefix}.weight"), &[n])?,
            beta: self.f32(&format!("{prefix}.bias"), &[n])?,
        })
    }

    fn matrix(&self, name: &str, rows: usize, cols: usize, dtype: DType) -> Result<QMatrix> {
        let g = groups(cols);
        let scales = || self.buf::<u16>(&format!("{name}.scales"), Dtype::F16, &[rows, g]);
        let data = match dtype {
            DType::F32 => QData::F32(self.buf(name, Dtype::F32, &[rows, cols])?),
            DType::F16 => QData::F16(self.buf(name, Dtype::F16, &[rows, cols])?),
            DType::Bf16 => QData::Bf16(self.buf(name, Dtype::BF16, &[rows, cols])?),
            DType::Int8 => QData::Int8 {
                q: self.buf(&format!("{name}.q"), Dtype::I8, &[rows, g * GROUP])?,
                scales: scales()?,
            },
            DType::Int4 => QData::Int4 {
                q: self.buf(&format!("{name}.q"), Dtype::U8, &[rows, g * GROUP / 2])?,
                scales: scales()?,
            },
        };
        Ok(QMatrix { rows, cols, data })
    }
}
