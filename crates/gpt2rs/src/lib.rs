//! gpt2rs: GPT-2 inference whose outputs match Hugging Face transformers.
//!
//! Data flows one way: a checkpoint ([`checkpoint`], [`hub`]) becomes [`weights`] in the
//! engine's layout; an [`engine::Engine`] (today [`cpu::CpuEngine`]) runs the forward pass over
//! ragged batches with a KV cache per sequence; [`generate`] and [`score`] sit on top.
//!
//! ```
//! use gpt2rs::{config::Gpt2Config, cpu::CpuEngine, generate, tokenizer::Tokenizer, weights::ModelWeights};
//!
//! // A small model of random weights (use gpt2rs::model::load for real checkpoints).
//! let mut config = Gpt2Config::preset("gpt2").unwrap();
//! config.n_layer = 2;
//! let mut engine = CpuEngine::new(ModelWeights::synthetic(&config, 0));
//! let tokenizer = Tokenizer::gpt2();
//!
//! let prompts = vec![tokenizer.encode("Hello, my name is").unwrap(), tokenizer.encode("The sky").unwrap()];
//! let cfg = generate::GenerationConfig { max_new_tokens: 5, ..Default::default() };
//! let (completions, stats) = generate::generate(&mut engine, &tokenizer, &prompts, &cfg, &mut |_| {}).unwrap();
//! assert_eq!(completions.len(), 2);
//! assert!(completions.iter().all(|c| c.tokens.len() <= 5));
//! assert_eq!(stats.prompt_tokens, 7);
//! ```
pub mod checkpoint;
pub mod config;
pub mod cpu;
pub mod engine;
pub mod error;
pub mod generate;
pub mod hub;
mod huge_pages;
pub mod memory;
pub mod model;
pub mod pick;
pub mod quant;
pub mod scheduler;
pub mod score;
pub mod tokenizer;
pub mod weights;

pub use error::{Error, Result};
