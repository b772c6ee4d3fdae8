//! Llama 2 on the crate's kernels: what Hugging Face saves (config,
//! safetensors weights, tokenizer), PEFT adapters, eval, generate and merge.

pub mod adapter;
pub mod config;
pub mod data;
pub mod eval;
pub mod generate;
pub mod init;
pub mod merge;
pub mod model;
pub mod tokenizer;
pub mod train;

pub use adapter::{Adapter, AdapterConfig, Module};
pub use config::LlamaConfig;
pub use model::{Llama, TokenBatch};
