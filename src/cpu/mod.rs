//! Reference implementations in plain Rust: what every kernel and the fast
//! host code ([`crate::host`]) are checked against, and what ops run on
//! [`crate::Device::Cpu`] where no host code is written yet. f32 in and out,
//! f64 accumulation, written for clarity rather than speed.

pub mod adamw;
pub mod attention;
pub mod cosine_topk;
pub mod cross_entropy;
pub mod embedding;
pub mod layernorm;
pub mod linear;
pub mod lora;
pub mod philox;
pub mod rmsnorm;
pub mod rope;
pub mod sampling;
pub mod swiglu;
