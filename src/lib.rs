//! Hand-written CUDA kernels with safe Rust APIs for LoRA fine-tuning of
//! Llama 2 the Platypus way (arXiv 2308.07317).
//!
//! Every op runs on three devices: [`Device::Cuda`] (the kernels in
//! `kernels/`, built by nvcc for sm_80..sm_90), [`Device::Emulated`] (the same
//! .cu source compiled for the host and run on a CUDA emulator) and
//! [`Device::Cpu`]: multi-threaded f32 host code ([`host`], and the cosine
//! top-k's own fast path) where it is written, the Rust reference
//! implementations ([`cpu`]) elsewhere (the backward passes, 16-bit
//! activations). The references are the oracle the tests compare with.
//!
//! ```
//! use platypus::{ops, DType, Device, Tensor};
//! let dev = Device::Cpu;
//! let x = Tensor::from_f32(&[1.0, 2.0, 3.0, 4.0], &[2, 2], DType::F32, &dev)?;
//! let w = Tensor::from_f32(&[1.0, 0.5], &[2], DType::F32, &dev)?;
//! let y = ops::rmsnorm::forward(&x, &w, 1e-5)?;
//! assert_eq!(y.shape(), &[2, 2]);
//! # Ok::<(), platypus::Error>(())
//! ```
#![warn(missing_docs)]

#[cfg(feature = "candle")]
pub mod candle;
pub mod cpu;
pub mod cuda;
pub mod curate;
mod device;
pub mod emu;
mod error;
pub mod formats;
pub mod host;
pub mod kernels;
pub mod launch;
pub mod llama;
/// Reading and writing 2-D float32 / uint32 `.npy` matrices (embeddings and
/// top-k indices exchanged with NumPy and FAISS).
pub mod npy;
pub mod ops;
pub mod output;
pub mod progress;
pub mod recipe;
mod tensor;

pub use device::{DType, Device, Element};
pub use error::{Error, Result};
pub use tensor::Tensor;

/// The README's examples, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
