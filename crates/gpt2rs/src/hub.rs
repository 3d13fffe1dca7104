//! Where a model comes from: a local directory, the Hugging Face hub (through the cache that
//! transformers shares), or synthetic weights of a named shape.

use crate::config::{Gpt2Config, PRESETS};
use crate::error::{Error, Result};
use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Cache, Repo, RepoType};
use std::path::{Path, PathBuf};

/// A parsed `--model` argument.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelSpec {
    /// A checkpoint directory.
    Dir(PathBuf),
    /// A hub repository (`openai-community/gpt2`), at a revision.
    Hub { repo: String, revision: String },
    /// Synthetic weights of a preset's shape or a config file's.
    Synthetic { name: String, config: Gpt2Config },
}

impl ModelSpec {
    /// Parses `gpt2`, `gpt2-xl`, `owner/name[@revision]`, `./dir`, or `synthetic:PRESET|CONFIG.json`.
    pub fn parse(spec: &str) -> Result<Self> {
        if let Some(what) = spec.strip_prefix("synthetic:") {
            return Self::synthetic(what);
        }
        let path = Path::new(spec);
        if path.is_dir() {
            return Ok(Self::Dir(path.to_path_buf()));
        }
        let looks_like_path =
            spec.starts_with('.') || spec.starts_with('/') || spec.starts_with('~');
        if looks_like_path || path.exists() {
            return Err(Error::MissingFile {
                what: "model directory",
                path: path.to_path_buf(),
                hint: "pass an existing checkpoint directory, or a hub name such as gpt2".into(),
            });
        }
        let (name, revision) = match spec.split_once('@') {
            Some((n, r)) => (n, r.to_string()),
            None => (spec, "main".to_string()),
        };
        if let Some(p) = PRESETS.iter().find(|p| p.0 == name) {
            return Ok(Self::Hub {
                repo: p.1.to_string(),
                revision,
            });
        }
        let valid_repo = name.split('/').count() == 2
            && name.split('/').all(|part| {
                !part.is_empty()
                    && part
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            });
        if valid_repo {
            return Ok(Self::Hub {
                repo: name.to_string(),
                revision,
            });
        }
        Err(Error::invalid(format!(
            "unknown model '{spec}': use one of {}, a hub name like owner/name, a local directory, \
             or synthetic:gpt2 for random weights",
            Gpt2Config::preset_names().join(", ")
        )))
    }

    /// Synthetic weights of a preset (`gpt2-xl`) or of the shape in a config.json.
    pub fn synthetic(what: &str) -> Result<Self> {
        if let Some(config) = Gpt2Config::preset(what) {
            return Ok(Self::Synthetic {
                name: what.to_string(),
                config,
            });
        }
        let path = Path::new(what);
        let file = if path.is_dir() {
            path.join("config.json")
        } else {
            path.to_path_buf()
        };
        if file.is_file() {
            return Ok(Self::Synthetic {
                name: file.display().to_string(),
                config: Gpt2Config::from_file(&file)?,
            });
        }
        Err(Error::invalid(format!(
            "synthetic weights need a preset ({}) or a config.json path, got '{what}'",
            Gpt2Config::preset_names().join(", ")
        )))
    }
}

/// The hub cache directory, by the conventions transformers uses:
/// `HF_HUB_CACHE`, else `HF_HOME/hub`, else `~/.cache/huggingface/hub`.
pub fn cache_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("HF_HUB_CACHE").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    if let Some(p) = std::env::var_os("HF_HOME").filter(|p| !p.is_empty()) {
        return PathBuf::from(p).join("hub");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default();
    home.join(".cache").join("huggingface").join("hub")
}

/// Whether the user asked for no network (`HF_HUB_OFFLINE=1`, as transformers reads it).
pub fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .map(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
        .unwrap_or(false)
}

/// The snapshot directory of a repository already complete in the cache (config and weights),
/// without any network access.
pub fn cached_snapshot(repo: &str, revision: &str) -> Option<PathBuf> {
    let cached = Cache::new(cache_dir()).repo(Repo::with_revision(
        repo.to_string(),
        RepoType::Model,
        revision.to_string(),
    ));
    let config = cached.get("config.json")?;
    let has_weights = cached.get("model.safetensors").is_some()
        || cached.get("model.safetensors.index.json").is_some();
    has_weights.then(|| config.parent().expect("a file has a parent").to_path_buf())
}

/// Options for fetching from the hub.
#[derive(Debug, Clone, Default)]
pub struct FetchOptions {
    /// Show download progress bars (on stderr).
    pub progress: bool,
    /// Fetch only config.json (for `info`), not the weights.
    pub config_only: bool,
}

/// Makes sure a hub repository's checkpoint files are in the cache (downloading what is missing)
/// and returns the snapshot directory that holds them.
pub fn fetch(repo: &str, revision: &str, opts: &FetchOptions) -> Result<PathBuf> {
    let cache = Cache::new(cache_dir());
    let repo_ref = Repo::with_revision(repo.to_string(), RepoType::Model, revision.to_string());
    let hub_err = |reason: String| Error::Hub {
        model: repo.to_string(),
        reason,
    };
    if offline() {
        let cached = cache.repo(repo_ref.clone());
        let config = cached.get("config.json").ok_or_else(|| {
            hub_err(format!(
                "it is not in the cache at {} and HF_HUB_OFFLINE is set: unset HF_HUB_OFFLINE to \
                 download it, or pass a local checkpoint directory",
                cache_dir().display()
            ))
        })?;
        let dir = config.parent().expect("a file has a parent").to_path_buf();
        if !opts.config_only
            && cached.get("model.safetensors").is_none()
            && cached.get("model.safetensors.index.json").is_none()
        {
            return Err(hub_err(format!(
                "its weights (model.safetensors) are not in the cache at {} and HF_HUB_OFFLINE is \
                 set: unset HF_HUB_OFFLINE to download them",
                dir.display()
            )));
        }
        return Ok(dir);
    }

    let endpoint = std::env::var("HF_ENDPOINT")
        .ok()
        .filter(|e| !e.is_empty())
        .unwrap_or_else(|| "https://huggingface.co".to_string());
    let mut builder = ApiBuilder::from_cache(cache)
        .with_endpoint(endpoint.clone())
        .with_progress(opts.progress)
        .with_retries(2);
    if let Ok(token) = std::env::var("HF_TOKEN") {
        builder = builder.with_token(Some(token));
    }
    let api = builder
        .build()
        .map_err(|e| hub_err(format!("cannot set up the hub client: {e}")))?;
    let remote = api.repo(repo_ref);
    let explain = |file: &str, e: hf_hub::api::sync::ApiError| -> Error {
        let reason = match status_of(&e) {
            Some(404) => {
                format!("{file} does not exist in {repo} at revision {revision} on {endpoint}")
            }
            Some(401 | 403) => format!(
                "{endpoint} refused access to {repo} (a private or gated repository needs HF_TOKEN)"
            ),
            Some(code) => format!("{endpoint} answered HTTP {code} for {file}"),
            None => format!(
                "could not download {file} from {endpoint} ({e}); check the network connection, \
                 or set HF_HUB_OFFLINE=1 to use only the local cache, or pass a local directory"
            ),
        };
        hub_err(reason)
    };
    let config = remote
        .get("config.json")
        .map_err(|e| explain("config.json", e))?;
    let dir = config.parent().expect("a file has a parent").to_path_buf();
    if opts.config_only {
        return Ok(dir);
    }
    match remote.get("model.safetensors") {
        Ok(_) => {}
        Err(e) if status_of(&e) == Some(404) => {
            let index =
                remote
                    .get("model.safetensors.index.json")
                    .map_err(|e| match status_of(&e) {
                        Some(404) => hub_err(format!(
                            "{repo} has no model.safetensors (nor a sharded index); gpt2rs reads \
                         safetensors checkpoints only"
                        )),
                        _ => explain("model.safetensors.index.json", e),
                    })?;
            for shard in shard_names(&index)? {
                remote.get(&shard).map_err(|e| explain(&shard, e))?;
            }
        }
        Err(e) => return Err(explain("model.safetensors", e)),
    }
    // The checkpoint's own tokenizer, when it has one; the built-in GPT-2 one otherwise.
    match remote.get("tokenizer.json") {
        Ok(_) => {}
        Err(e) if status_of(&e) == Some(404) => {}
        Err(e) => return Err(explain("tokenizer.json", e)),
    }
    Ok(dir)
}

fn status_of(e: &hf_hub::api::sync::ApiError) -> Option<u16> {
    use hf_hub::api::sync::ApiError;
    match e {
        ApiError::RequestError(inner) => match inner.as_ref() {
            ureq::Error::StatusCode(code) => Some(*code),
            _ => None,
        },
        ApiError::TooManyRetries(inner) => status_of(inner),
        _ => None,
    }
}

fn shard_names(index: &Path) -> Result<Vec<String>> {
    let bad = |reason: String| Error::BadCheckpoint {
        path: index.to_path_buf(),
        reason,
    };
    let text = std::fs::read_to_string(index).map_err(|e| Error::io(index, e))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| bad("no 'weight_map' object".into()))?;
    let mut names: Vec<String> = map
        .values()
        .filter_map(|v| v.as_str().map(String::from))
        .collect();
    names.sort();
    names.dedup();
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_model_specs() {
        assert_eq!(
            ModelSpec::parse("gpt2-xl").unwrap(),
            ModelSpec::Hub {
                repo: "openai-community/gpt2-xl".into(),
                revision: "main".into()
            }
        );
        assert_eq!(
            ModelSpec::parse("someone/gpt2-finetune@v2").unwrap(),
            ModelSpec::Hub {
                repo: "someone/gpt2-finetune".into(),
                revision: "v2".into()
            }
        );
        assert!(matches!(
            ModelSpec::parse("distilgpt2").unwrap(),
            ModelSpec::Hub { repo, .. } if repo == "distilbert/distilgpt2"
        ));
        assert!(
            matches!(ModelSpec::parse("synthetic:gpt2-medium").unwrap(), ModelSpec::Synthetic { config, .. } if config.n_layer == 24)
        );
        assert!(ModelSpec::parse("./no/such/dir")
            .unwrap_err()
            .to_string()
            .contains("not found"));
        let err = ModelSpec::parse("llama").unwrap_err().to_string();
        assert!(err.contains("gpt2-xl"), "{err}");
        assert!(ModelSpec::parse("synthetic:nope").is_err());
    }
}
