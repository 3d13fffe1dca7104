//! `gpt2rs bench`: how fast GPT-2 runs on this machine, held against the machine's own limits.

pub mod backend;
pub mod compare;
pub mod gpu;
pub mod hardware;
pub mod plot;
pub mod report;
pub mod sweep;
pub mod types;
