//! A Hugging Face checkpoint directory on disk: `config.json` plus memory-mapped safetensors
//! (one file, or shards listed in `model.safetensors.index.json`).

use crate::config::Gpt2Config;
use crate::error::{Error, Result};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Element types gpt2rs reads from checkpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoredDtype {
    F32,
    F16,
    BF16,
}

impl StoredDtype {
    fn from_safetensors(d: Dtype) -> Option<Self> {
        match d {
            Dtype::F32 => Some(Self::F32),
            Dtype::F16 => Some(Self::F16),
            Dtype::BF16 => Some(Self::BF16),
            _ => None,
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::BF16 => 2,
        }
    }
}

/// Where one tensor lives: which mapped file, its type, shape and byte range.
#[derive(Debug, Clone)]
struct TensorEntry {
    file: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    start: usize,
    end: usize,
}

/// A borrowed tensor: raw little-endian bytes plus type and shape.
pub struct TensorRef<'a> {
    pub name: &'a str,
    pub dtype: StoredDtype,
    pub shape: &'a [usize],
    pub bytes: &'a [u8],
}

impl TensorRef<'_> {
    /// Converts the elements to f32 into `out` (which must have the tensor's element count).
    pub fn to_f32_into(&self, out: &mut [f32]) {
        match self.dtype {
            StoredDtype::F32 => {
                for (o, c) in out.iter_mut().zip(self.bytes.chunks_exact(4)) {
                    *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
            }
            StoredDtype::F16 => {
                for (o, c) in out.iter_mut().zip(self.bytes.chunks_exact(2)) {
                    *o = half::f16::from_le_bytes([c[0], c[1]]).to_f32();
                }
            }
            StoredDtype::BF16 => {
                for (o, c) in out.iter_mut().zip(self.bytes.chunks_exact(2)) {
                    *o = half::bf16::from_le_bytes([c[0], c[1]]).to_f32();
                }
            }
        }
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// An opened checkpoint: its config and every tensor, memory-mapped.
pub struct Checkpoint {
    pub dir: PathBuf,
    pub config: Gpt2Config,
    files: Vec<(PathBuf, Arc<Mmap>)>,
    tensors: HashMap<String, TensorEntry>,
    /// The `__metadata__` strings of the (first) safetensors file.
    metadata: HashMap<String, String>,
}

/// A tensor of any element type, as a byte range of its mapped file (for formats that are used
/// in place, such as gpt2rs's saved quantized checkpoints).
pub struct RawTensor<'a> {
    pub dtype: Dtype,
    pub shape: &'a [usize],
    pub map: &'a Arc<Mmap>,
    pub offset: usize,
    pub len: usize,
}

impl Checkpoint {
    /// Opens a checkpoint directory: reads config.json, maps the weights and checks their headers.
    pub fn open(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::MissingFile {
                what: "checkpoint directory",
                path: dir.to_path_buf(),
                hint: "pass a directory with config.json and model.safetensors, or a hub name such as gpt2".into(),
            });
        }
        let config = Gpt2Config::from_file(&dir.join("config.json"))?;
        let weight_files = find_weight_files(dir)?;
        let mut files = Vec::new();
        let mut tensors = HashMap::new();
        let mut metadata = HashMap::new();
        for path in weight_files {
            let file = File::open(&path).map_err(|e| Error::io(&path, e))?;
            // SAFETY: the map is read-only; a checkpoint changed on disk while we run is the
            // user's to avoid, as for every memory-mapping model loader.
            let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(&path, e))?;
            let (header_len, meta) =
                SafeTensors::read_metadata(&map).map_err(|e| Error::BadCheckpoint {
                    path: path.clone(),
                    reason: format!(
                        "not a valid safetensors file ({e}); it may be truncated or corrupt: \
                         delete it and download it again"
                    ),
                })?;
            if files.is_empty() {
                metadata = meta.metadata().clone().unwrap_or_default();
            }
            let data_start = 8 + header_len;
            for (name, info) in meta.tensors() {
                let (s, e) = info.data_offsets;
                tensors.insert(
                    name,
                    TensorEntry {
                        file: files.len(),
                        dtype: info.dtype,
                        shape: info.shape.clone(),
                        start: data_start + s,
                        end: data_start + e,
                    },
                );
            }
            files.push((path, Arc::new(map)));
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            config,
            files,
            tensors,
            metadata,
        })
    }

    /// Looks a tensor up by any of the names given (the first that exists wins).
    pub fn find(&self, names: &[&str]) -> Option<&str> {
        names
            .iter()
            .find(|n| self.tensors.contains_key(**n))
            .and_then(|n| self.tensors.get_key_value(*n).map(|(k, _)| k.as_str()))
    }

    /// The tensor called `name`, checked to be a float type.
    pub fn tensor<'a>(&'a self, name: &'a str) -> Result<TensorRef<'a>> {
        let entry = self.tensors.get(name).ok_or_else(|| Error::BadCheckpoint {
            path: self.dir.clone(),
            reason: format!("tensor '{name}' is missing"),
        })?;
        let (path, map) = &self.files[entry.file];
        let dtype =
            StoredDtype::from_safetensors(entry.dtype).ok_or_else(|| Error::BadCheckpoint {
                path: path.clone(),
                reason: format!(
                    "tensor '{name}' is stored as {:?}; gpt2rs reads F32, F16 and BF16 checkpoints",
                    entry.dtype
                ),
            })?;
        Ok(TensorRef {
            name,
            dtype,
            shape: &entry.shape,
            bytes: &map[entry.start..entry.end],
        })
    }

    /// The tensor called `name` as raw bytes of any element type.
    pub fn raw(&self, name: &str) -> Result<RawTensor<'_>> {
        let entry = self.tensors.get(name).ok_or_else(|| Error::BadCheckpoint {
            path: self.dir.clone(),
            reason: format!("tensor '{name}' is missing"),
        })?;
        Ok(RawTensor {
            dtype: entry.dtype,
            shape: &entry.shape,
            map: &self.files[entry.file].1,
            offset: entry.start,
            len: entry.end - entry.start,
        })
    }

    /// A `__metadata__` value of the safetensors file.
    pub fn metadata(&self, key: &str) -> Option<&str> {
        self.metadata.get(key).map(String::as_str)
    }

    /// All tensor names, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.tensors.keys().map(String::as_str).collect();
        v.sort_unstable();
        v
    }

    /// The stored element type of the token embedding (what the checkpoint "is").
    pub fn stored_dtype(&self) -> Option<StoredDtype> {
        let name = self.find(&["transformer.wte.weight", "wte.weight"])?;
        self.tensor(name).ok().map(|t| t.dtype)
    }

    /// Paths of the mapped weight files.
    pub fn files(&self) -> impl Iterator<Item = &Path> {
        self.files.iter().map(|(p, _)| p.as_path())
    }
}

/// The safetensors files of a checkpoint: model.safetensors, or the shards of its index.
fn find_weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
        let bad = |reason: String| Error::BadCheckpoint {
            path: index.clone(),
            reason,
        };
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| bad("no 'weight_map' object".into()))?;
        let mut shards: Vec<String> = map
            .values()
            .map(|v| v.as_str().map(str::to_string))
            .collect::<Option<_>>()
            .ok_or_else(|| bad("'weight_map' values must be file names".into()))?;
        shards.sort();
        shards.dedup();
        let mut paths = Vec::new();
        for shard in shards {
            let p = dir.join(&shard);
            if shard.contains('/') || shard.contains("..") || !p.is_file() {
                return Err(Error::MissingFile {
                    what: "weight shard",
                    path: p,
                    hint: format!(
                        "listed in {}; the download may be incomplete",
                        index.display()
                    ),
                });
            }
            paths.push(p);
        }
        return Ok(paths);
    }
    let hint = if dir.join("pytorch_model.bin").exists() {
        "this checkpoint has only pytorch_model.bin; gpt2rs reads safetensors: convert it with \
         transformers (model.save_pretrained(dir, safe_serialization=True))"
            .to_string()
    } else {
        "a GPT-2 checkpoint needs model.safetensors (or model.safetensors.index.json and its shards)"
            .to_string()
    };
    Err(Error::MissingFile {
        what: "model weights",
        path: single,
        hint,
    })
}

/// Writes `weights` as a Hugging Face GPT-2 checkpoint (config.json + model.safetensors, names
/// with the `transformer.` prefix, Conv1D weights `[in, out]`), stored as `dtype`.
/// Used to make test checkpoints and to save synthetic models for other tools.
pub fn write_hf_checkpoint(
    weights: &crate::weights::ModelWeights,
    dir: &Path,
    dtype: StoredDtype,
) -> Result<()> {
    use crate::weights::Matrix;
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let cfg = &weights.config;
    let encode = |values: &[f32]| -> Vec<u8> {
        match dtype {
            StoredDtype::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            StoredDtype::F16 => values
                .iter()
                .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
                .collect(),
            StoredDtype::BF16 => values
                .iter()
                .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
                .collect(),
        }
    };
    let transposed = |m: &Matrix| -> Vec<f32> {
        let mut out = vec![0f32; m.data.len()];
        for r in 0..m.rows {
            for c in 0..m.cols {
                out[c * m.rows + r] = m.data[r * m.cols + c];
            }
        }
        out
    };
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    let mut put = |name: String, shape: Vec<usize>, values: &[f32]| {
        tensors.push((name, shape, encode(values)));
    };
    put(
        "transformer.wte.weight".into(),
        vec![weights.wte.rows, weights.wte.cols],
        &weights.wte.dequantize().data,
    );
    put(
        "transformer.wpe.weight".into(),
        vec![weights.wpe.rows, weights.wpe.cols],
        &weights.wpe.data,
    );
    for (i, l) in weights.layers.iter().enumerate() {
        let p = format!("transformer.h.{i}");
        for (name, norm) in [("ln_1", &l.ln_1), ("ln_2", &l.ln_2)] {
            put(
                format!("{p}.{name}.weight"),
                vec![norm.gamma.len()],
                &norm.gamma,
            );
            put(
                format!("{p}.{name}.bias"),
                vec![norm.beta.len()],
                &norm.beta,
            );
        }
        for (name, lin) in [
            ("attn.c_attn", &l.qkv),
            ("attn.c_proj", &l.attn_out),
            ("mlp.c_fc", &l.mlp_in),
            ("mlp.c_proj", &l.mlp_out),
        ] {
            put(
                format!("{p}.{name}.weight"),
                vec![lin.w.cols, lin.w.rows],
                &transposed(&lin.w.dequantize()),
            );
            put(format!("{p}.{name}.bias"), vec![lin.b.len()], &lin.b);
        }
    }
    put(
        "transformer.ln_f.weight".into(),
        vec![cfg.n_embd],
        &weights.ln_f.gamma,
    );
    put(
        "transformer.ln_f.bias".into(),
        vec![cfg.n_embd],
        &weights.ln_f.beta,
    );
    if let Some(head) = &weights.lm_head {
        put(
            "lm_head.weight".into(),
            vec![head.rows, head.cols],
            &head.dequantize().data,
        );
    }
    let st_dtype = match dtype {
        StoredDtype::F32 => Dtype::F32,
        StoredDtype::F16 => Dtype::F16,
        StoredDtype::BF16 => Dtype::BF16,
    };
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, s, b)| {
            let view = safetensors::tensor::TensorView::new(st_dtype, s.clone(), b)
                .expect("shape matches data");
            (n.clone(), view)
        })
        .collect();
    let path = dir.join("model.safetensors");
    let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(views, Some(meta), &path).map_err(|e| Error::BadCheckpoint {
        path: path.clone(),
        reason: format!("cannot write: {e}"),
    })?;
    let config = cfg.to_hf_json();
    let cpath = dir.join("config.json");
    std::fs::write(&cpath, serde_json::to_string_pretty(&config).expect("json"))
        .map_err(|e| Error::io(&cpath, e))
}
