//! The fast host code behind [`crate::Device::Cpu`]: multi-threaded f32 with
//! weights read in their stored dtype. The exact references in [`crate::cpu`]
//! are what tests compare it with.

pub mod attention;
pub mod cross_entropy;
pub mod elementwise;
pub mod gemm;
pub mod lora;
pub mod rope;
pub mod view;
