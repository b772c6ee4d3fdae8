//! Llama 2 on the crate's kernels: what Hugging Face saves (config,
//! safetensors weights, tokenizer), PEFT adapters, eval, generate and merge.
//! This first step reads the model's `config.json`; the weights, the model
//! and its commands build on it.

pub mod config;

pub use config::LlamaConfig;
