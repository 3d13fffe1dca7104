//! Loading a model by its `--model` spec: weights in engine layout plus the tokenizer.

use crate::checkpoint::{Checkpoint, StoredDtype};
use crate::config::Gpt2Config;
use crate::error::Result;
use crate::hub::{self, FetchOptions, ModelSpec};
use crate::memory::{self, Bytes};
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
    Bytes(config.param_count() * 4)
}

/// Loads (and if needed downloads) the model `spec` names. Synthetic weights use `seed`.
pub fn load(spec: &ModelSpec, seed: u64, fetch: &FetchOptions) -> Result<LoadedModel> {
    match spec {
        ModelSpec::Synthetic { name, config } => {
            memory::ensure_available(&format!("synthetic {name} (f32)"), f32_weight_bytes(config))?;
            Ok(LoadedModel {
                weights: ModelWeights::synthetic(config, seed),
                tokenizer: Tokenizer::gpt2(),
                source: format!("synthetic {name} (random weights, seed {seed})"),
                synthetic: true,
                stored_dtype: None,
            })
        }
        ModelSpec::Dir(dir) => load_dir(dir),
        ModelSpec::Hub { repo, revision } => {
            let dir = hub::fetch(repo, revision, fetch)?;
            let mut m = load_dir(&dir)?;
            m.source = format!("{repo}@{revision} ({})", dir.display());
            Ok(m)
        }
    }
}

fn load_dir(dir: &std::path::Path) -> Result<LoadedModel> {
    let ckpt = Checkpoint::open(dir)?;
    memory::ensure_available(
        &format!("{} (f32)", dir.display()),
        f32_weight_bytes(&ckpt.config),
    )?;
    let weights = ModelWeights::from_checkpoint(&ckpt)?;
    Ok(LoadedModel {
        weights,
        tokenizer: Tokenizer::for_checkpoint(dir)?,
        source: dir.display().to_string(),
        synthetic: false,
        stored_dtype: ckpt.stored_dtype(),
    })
}
