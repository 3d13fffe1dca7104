//! Loading a model by its `--model` spec: weights in engine layout plus the tokenizer.

use crate::checkpoint::{Checkpoint, StoredDtype};
use crate::config::Gpt2Config;
use crate::error::{Error, Result};
use crate::hub::{self, FetchOptions, ModelSpec};
use crate::memory::{self, Bytes};
use crate::quant::{saved, WeightFormat};
use crate::tokenizer::Tokenizer;
use crate::weights::ModelWeights;

/// A model ready for an engine.
pub struct LoadedModel {
    pub weights: ModelWeights,
    pub tokenizer: Tokenizer,
    /// Where the weights came from (a path, or "synthetic gpt2 (seed 0)").
    pub source: String,
    /// True when the weights are random (synthetic), not a trained checkpoint.
    pub synthetic: bool,
    /// The element type the checkpoint stored (None for synthetic weights).
    pub stored_dtype: Option<StoredDtype>,
}

/// Bytes the f32 engine needs for the weights of `config`.
pub fn f32_weight_bytes(config: &Gpt2Config) -> Bytes {
    Bytes(WeightFormat::F32.model_bytes(config))
}

/// Loads (and if needed downloads) the model `spec` names: f32, or as saved for a checkpoint
/// written by `gpt2rs quantize`. Synthetic weights use `seed`.
pub fn load(spec: &ModelSpec, seed: u64, fetch: &FetchOptions) -> Result<LoadedModel> {
    load_as(spec, seed, fetch, None)
}

/// [`load`] with the weight matrices stored in `format` (converted at load, one matrix at a
/// time; a `gpt2rs quantize` checkpoint must already be in that format). Fails before reading
/// any weights when they would not fit in the available memory.
pub fn load_as(
    spec: &ModelSpec,
    seed: u64,
    fetch: &FetchOptions,
    format: Option<WeightFormat>,
) -> Result<LoadedModel> {
    match spec {
        ModelSpec::Synthetic { name, config } => {
            let format = format.unwrap_or(WeightFormat::F32);
            memory::ensure_available(
                &format!("synthetic {name} ({})", format.label()),
                Bytes(format.model_bytes(config)),
            )?;
            Ok(LoadedModel {
                weights: ModelWeights::synthetic_as(config, seed, format),
                tokenizer: Tokenizer::gpt2(),
                source: format!("synthetic {name} (random weights, seed {seed})"),
                synthetic: true,
                stored_dtype: None,
            })
        }
        ModelSpec::Dir(dir) => load_dir(dir, format),
        ModelSpec::Hub { repo, revision } => {
            let dir = hub::fetch(repo, revision, fetch)?;
            let mut m = load_dir(&dir, format)?;
            m.source = format!("{repo}@{revision} ({})", dir.display());
            Ok(m)
        }
    }
}

fn load_dir(dir: &std::path::Path, format: Option<WeightFormat>) -> Result<LoadedModel> {
    let ckpt = Checkpoint::open(dir)?;
    let saved = saved::saved_format(&ckpt)?;
    let wanted = format.or(saved).unwrap_or(WeightFormat::F32);
    if let Some(saved) = saved {
        if saved != wanted {
            return Err(Error::invalid(format!(
                "{} holds {} weights saved by gpt2rs quantize; it cannot be converted to {}: \
                 leave out --dtype, or quantize the original checkpoint to {}",
                dir.display(),
                saved.label(),
                wanted.label(),
                wanted.label()
            )));
        }
    }
    memory::ensure_available(
        &format!("{} ({})", dir.display(), wanted.label()),
        Bytes(wanted.model_bytes(&ckpt.config)),
    )?;
    let weights = match saved {
        Some(f) => saved::load(&ckpt, f)?,
        None => ModelWeights::from_checkpoint_as(&ckpt, wanted)?,
    };
    Ok(LoadedModel {
        weights,
        tokenizer: Tokenizer::for_checkpoint(dir)?,
        source: dir.display().to_string(),
        synthetic: false,
        stored_dtype: ckpt.stored_dtype(),
    })
}
