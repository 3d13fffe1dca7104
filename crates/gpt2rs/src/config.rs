//! GPT-2 hyperparameters: read from a Hugging Face `config.json` or taken from a named preset.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The activation between the two MLP matrices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Activation {
    /// `gelu_new` / `gelu_pytorch_tanh` / `gelu_fast`: the tanh approximation GPT-2 was trained with.
    GeluTanh,
    /// `gelu`: the exact erf form.
    GeluErf,
    /// `relu`.
    Relu,
}

impl Activation {
    fn from_hf(name: &str) -> Option<Self> {
        match name {
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Some(Self::GeluTanh),
            "gelu" => Some(Self::GeluErf),
            "relu" => Some(Self::Relu),
            _ => None,
        }
    }
}

/// GPT-2 model shape and numerics, as transformers' `GPT2Config` has them.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Gpt2Config {
    pub vocab_size: usize,
    /// Context length: the number of learned positions.
    pub n_positions: usize,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    /// Width of the MLP's hidden layer (4 × n_embd unless the config says otherwise).
    pub n_inner: usize,
    pub activation: Activation,
    pub layer_norm_epsilon: f32,
    /// Divide attention scores by sqrt(head_dim) (true for every released GPT-2).
    pub scale_attn_weights: bool,
    /// Also divide attention scores of layer i by (i + 1) (a GPT2Config option, off by default).
    pub scale_attn_by_inverse_layer_idx: bool,
    pub tie_word_embeddings: bool,
    pub bos_token_id: u32,
    pub eos_token_id: u32,
}

/// The raw `config.json` fields gpt2rs reads; everything else is ignored.
#[derive(Deserialize)]
struct HfConfig {
    model_type: Option<String>,
    architectures: Option<Vec<String>>,
    vocab_size: Option<usize>,
    n_positions: Option<usize>,
    n_ctx: Option<usize>,
    n_embd: Option<usize>,
    n_layer: Option<usize>,
    n_head: Option<usize>,
    n_inner: Option<usize>,
    activation_function: Option<String>,
    layer_norm_epsilon: Option<f32>,
    scale_attn_weights: Option<bool>,
    scale_attn_by_inverse_layer_idx: Option<bool>,
    tie_word_embeddings: Option<bool>,
    bos_token_id: Option<u32>,
    eos_token_id: Option<u32>,
}

/// The named GPT-2 checkpoints: (name, hub repository, n_layer, n_head, n_embd).
pub const PRESETS: &[(&str, &str, usize, usize, usize)] = &[
    ("gpt2", "openai-community/gpt2", 12, 12, 768),
    ("gpt2-medium", "openai-community/gpt2-medium", 24, 16, 1024),
    ("gpt2-large", "openai-community/gpt2-large", 36, 20, 1280),
    ("gpt2-xl", "openai-community/gpt2-xl", 48, 25, 1600),
    ("distilgpt2", "distilbert/distilgpt2", 6, 12, 768),
];

impl Gpt2Config {
    /// The config of a released GPT-2 checkpoint by its short name (`gpt2`, …, `gpt2-xl`, `distilgpt2`).
    pub fn preset(name: &str) -> Option<Self> {
        let short = name.rsplit('/').next().unwrap_or(name);
        PRESETS
            .iter()
            .find(|p| p.0 == short)
            .map(|&(_, _, n_layer, n_head, n_embd)| Self {
                vocab_size: 50257,
                n_positions: 1024,
                n_embd,
                n_layer,
                n_head,
                n_inner: 4 * n_embd,
                activation: Activation::GeluTanh,
                layer_norm_epsilon: 1e-5,
                scale_attn_weights: true,
                scale_attn_by_inverse_layer_idx: false,
                tie_word_embeddings: true,
                bos_token_id: 50256,
                eos_token_id: 50256,
            })
    }

    /// Names of all presets, for help texts and error messages.
    pub fn preset_names() -> Vec<&'static str> {
        PRESETS.iter().map(|p| p.0).collect()
    }

    /// The Hugging Face `config.json` of this configuration.
    pub fn to_hf_json(&self) -> serde_json::Value {
        let act = match self.activation {
            Activation::GeluTanh => "gelu_new",
            Activation::GeluErf => "gelu",
            Activation::Relu => "relu",
        };
        serde_json::json!({
            "model_type": "gpt2",
            "architectures": ["GPT2LMHeadModel"],
            "vocab_size": self.vocab_size,
            "n_positions": self.n_positions,
            "n_embd": self.n_embd,
            "n_layer": self.n_layer,
            "n_head": self.n_head,
            "n_inner": self.n_inner,
            "activation_function": act,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "scale_attn_weights": self.scale_attn_weights,
            "scale_attn_by_inverse_layer_idx": self.scale_attn_by_inverse_layer_idx,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
        })
    }

    /// Reads and checks a Hugging Face `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::MissingFile {
                    what: "config.json",
                    path: path.to_path_buf(),
                    hint: "a GPT-2 checkpoint directory needs config.json next to its weights"
                        .into(),
                }
            } else {
                Error::io(path, e)
            }
        })?;
        Self::from_json(&text).map_err(|reason| Error::BadConfig {
            path: path.to_path_buf(),
            reason,
        })
    }

    /// Parses and checks the text of a `config.json`.
    pub fn from_json(text: &str) -> std::result::Result<Self, String> {
        let raw: HfConfig =
            serde_json::from_str(text).map_err(|e| format!("not valid JSON: {e}"))?;
        let is_gpt2_arch = raw
            .architectures
            .as_ref()
            .is_some_and(|a| a.iter().any(|s| s.starts_with("GPT2")));
        match raw.model_type.as_deref() {
            Some("gpt2") => {}
            Some(other) => {
                return Err(format!(
                    "model_type is '{other}', but gpt2rs runs only GPT-2 (model_type 'gpt2')"
                ))
            }
            None if is_gpt2_arch => {}
            None => return Err("no model_type: this does not look like a GPT-2 config".into()),
        }
        let need = |v: Option<usize>, name: &str| {
            v.filter(|&x| x > 0)
                .ok_or_else(|| format!("missing or zero '{name}'"))
        };
        let n_embd = need(raw.n_embd, "n_embd")?;
        let n_head = need(raw.n_head, "n_head")?;
        let n_positions = need(raw.n_positions.or(raw.n_ctx), "n_positions")?;
        if n_embd % n_head != 0 {
            return Err(format!(
                "n_embd ({n_embd}) is not a multiple of n_head ({n_head})"
            ));
        }
        let act_name = raw.activation_function.as_deref().unwrap_or("gelu_new");
        let activation = Activation::from_hf(act_name).ok_or_else(|| {
            format!("activation_function '{act_name}' is not supported (gelu_new, gelu, relu are)")
        })?;
        let vocab_size = need(raw.vocab_size, "vocab_size")?;
        let cfg = Self {
            vocab_size,
            n_positions,
            n_embd,
            n_layer: need(raw.n_layer, "n_layer")?,
            n_head,
            n_inner: raw.n_inner.filter(|&x| x > 0).unwrap_or(4 * n_embd),
            activation,
            layer_norm_epsilon: raw.layer_norm_epsilon.unwrap_or(1e-5),
            scale_attn_weights: raw.scale_attn_weights.unwrap_or(true),
            scale_attn_by_inverse_layer_idx: raw.scale_attn_by_inverse_layer_idx.unwrap_or(false),
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(true),
            bos_token_id: raw.bos_token_id.unwrap_or(50256),
            eos_token_id: raw.eos_token_id.unwrap_or(50256),
        };
        Ok(cfg)
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.n_embd / self.n_head
    }

    /// What layer `layer` (0-based) multiplies its attention scores q·k by.
    pub fn attention_scale(&self, layer: usize) -> f32 {
        let mut scale = if self.scale_attn_weights {
            1.0 / (self.head_dim() as f32).sqrt()
        } else {
            1.0
        };
        if self.scale_attn_by_inverse_layer_idx {
            scale /= (layer + 1) as f32;
        }
        scale
    }

    /// Number of parameters (the tied LM head counted once, like transformers' `num_parameters()`).
    pub fn param_count(&self) -> u64 {
        let (c, i, v, p) = (
            self.n_embd as u64,
            self.n_inner as u64,
            self.vocab_size as u64,
            self.n_positions as u64,
        );
        let per_layer = 2 * 2 * c // two layer norms
            + c * 3 * c + 3 * c // qkv
            + c * c + c // attention out
            + c * i + i // mlp in
            + i * c + c; // mlp out
        let head = if self.tie_word_embeddings { 0 } else { v * c };
        v * c + p * c + self.n_layer as u64 * per_layer + 2 * c + head
    }

    /// Parameters read per decode step: every matrix once, one row of the embedding tables
    /// (ignored), and the LM head (which is the token embedding when tied).
    pub fn params_read_per_token(&self) -> u64 {
        let positions = (self.n_positions * self.n_embd) as u64;
        let untied_embedding = if self.tie_word_embeddings {
            0
        } else {
            (self.vocab_size * self.n_embd) as u64
        };
        self.param_count() - positions - untied_embedding
    }

    /// Bytes of KV cache per token of context, per sequence, at `bytes_per_value`.
    pub fn kv_bytes_per_token(&self, bytes_per_value: usize) -> u64 {
        (2 * self.n_layer * self.n_embd * bytes_per_value) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preset_param_counts_match_transformers() {
        // transformers' model.num_parameters() for each released checkpoint.
        let expect = [
            ("gpt2", 124_439_808u64),
            ("gpt2-medium", 354_823_168),
            ("gpt2-large", 774_030_080),
            ("gpt2-xl", 1_557_611_200),
            ("distilgpt2", 81_912_576),
        ];
        for (name, n) in expect {
            assert_eq!(Gpt2Config::preset(name).unwrap().param_count(), n, "{name}");
        }
        assert!(Gpt2Config::preset("openai-community/gpt2-xl").is_some());
        assert!(Gpt2Config::preset("llama").is_none());
    }

    #[test]
    fn rejects_non_gpt2_configs() {
        let err = Gpt2Config::from_json(r#"{"model_type":"llama","n_embd":8}"#).unwrap_err();
        assert!(err.contains("llama"), "{err}");
        let err = Gpt2Config::from_json(
            r#"{"model_type":"gpt2","n_embd":10,"n_head":3,"n_layer":1,"n_positions":8,"vocab_size":5}"#,
        )
        .unwrap_err();
        assert!(err.contains("multiple"), "{err}");
        let err = Gpt2Config::from_json("{not json").unwrap_err();
        assert!(err.contains("JSON"), "{err}");
    }

    #[test]
    fn reads_optional_fields() {
        let cfg = Gpt2Config::from_json(
            r#"{"model_type":"gpt2","n_embd":80,"n_head":5,"n_layer":3,"n_ctx":96,"vocab_size":777,
                "n_inner":200,"activation_function":"gelu_new","tie_word_embeddings":false}"#,
        )
        .unwrap();
        assert_eq!(
            (cfg.n_positions, cfg.n_inner, cfg.head_dim()),
            (96, 200, 16)
        );
        assert!(!cfg.tie_word_embeddings);
    }
}
