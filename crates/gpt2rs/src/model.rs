//! Loading a model by its `--model` spec: weights in engine layout plus the tokenizer.

use crate::checkpoint::{Checkpoint, StoredDtype};
use crate::config::Gpt2Config;
use crate::error::Result;
use crate::hub::{self, FetchOptions, ModelSpec};
use crate::memory::{self, Bytes};
use crate::quant::WeightFormat;
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

/// Loads (and if needed downloads) the model `spec` names, in f32. Synthetic weights use `seed`.
pub fn load(spec: &ModelSpec, seed: u64, fetch: &FetchOptions) -> Result<LoadedModel> {
    load_as(spec, seed, fetch, WeightFormat::F32)
}

/// [`load`] with the weight matrices stored in `format` (converted at load, one matrix at a
/// time). Fails before reading any weights when they would not fit in the available memory.
pub fn load_as(
    spec: &ModelSpec,
    seed: u64,
    fetch: &FetchOptions,
    format: WeightFormat,
) -> Result<LoadedModel> {
    match spec {
        ModelSpec::Synthetic { name, config } => {
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

fn load_dir(dir: &std::path::Path, format: WeightFormat) -> Result<LoadedModel> {
    let ckpt = Checkpoint::open(dir)?;
    memory::ensure_available(
        &format!("{} ({})", dir.display(), format.label()),
        Bytes(format.model_bytes(&ckpt.config)),
    )?;
    let weights = ModelWeights::from_checkpoint_as(&ckpt, format)?;
    Ok(LoadedModel {
        weights,
        tokenizer: Tokenizer::for_checkpoint(dir)?,
        source: dir.display().to_string(),
        synthetic: false,
        stored_dtype: ckpt.stored_dtype(),
    })
}
