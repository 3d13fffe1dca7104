//! gpt2rs: GPT-2 inference that matches Hugging Face transformers.
pub mod checkpoint;
pub mod config;
pub mod cpu;
pub mod engine;
pub mod error;
pub mod memory;
pub mod tokenizer;
pub mod weights;

pub use error::{Error, Result};
