//! One error type for the library. Every message says what went wrong and what to do.

use std::path::PathBuf;

/// Result alias used across gpt2rs.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong while loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file the checkpoint needs is not there.
    #[error("{what} not found at {path}: {hint}")]
    MissingFile {
        what: &'static str,
        path: PathBuf,
        hint: String,
    },
    /// config.json is unreadable or describes something that is not GPT-2.
    #[error("bad config {path}: {reason}")]
    BadConfig { path: PathBuf, reason: String },
    /// A weights file is malformed, truncated or has the wrong tensors.
    #[error("bad checkpoint {path}: {reason}")]
    BadCheckpoint { path: PathBuf, reason: String },
    /// Resolving or downloading a model from the Hugging Face hub failed.
    #[error("could not get model '{model}': {reason}")]
    Hub { model: String, reason: String },
    /// The tokenizer file could not be loaded or used.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// More tokens than the model's context (n_positions) can hold.
    #[error("{0}")]
    ContextOverflow(String),
    /// Not enough memory for the model and its cache.
    #[error(
        "not enough memory for {what}: needs {needed}, this machine has {available} available; \
         use a smaller model, a shorter context or batch, or free memory"
    )]
    OutOfMemory {
        what: String,
        needed: crate::memory::Bytes,
        available: crate::memory::Bytes,
    },
    /// The caller asked for something invalid (bad sampling parameter, unknown sequence, …).
    #[error("{0}")]
    InvalidArgument(String),
    /// A compute device (GPU) is missing, cannot be used, or failed.
    #[error("{0}")]
    Device(String),
    /// An I/O error with the path it happened on.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::InvalidArgument(msg.into())
    }
}
