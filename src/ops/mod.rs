//! The safe API: one module per op. Each checks shapes, dtypes, devices and
//! alignment before anything runs, so bad input gives a typed [`Error`]
//! naming the argument and never a half-written output; then it dispatches to
//! the kernel (CUDA or emulated) or to the CPU reference.

pub mod adamw;
pub mod add;
pub mod attention;
pub mod cosine_topk;
pub mod cross_entropy;
pub mod embedding;
pub mod layernorm;
pub mod linear;
pub mod lora;
pub mod rmsnorm;
pub mod rope;
pub mod sampling;
pub mod swiglu;

use crate::device::{DType, Device};
use crate::error::{Error, Result};
use crate::launch::LaunchConfig;
use crate::tensor::Tensor;

/// Checks that `t` holds a float type.
fn check_float(op: &'static str, arg: &'static str, t: &Tensor) -> Result<()> {
    if t.dtype().is_float() {
        Ok(())
    } else {
        Err(Error::DType {
            op,
            arg,
            expected: "f32, f16 or bf16".into(),
            got: t.dtype(),
        })
    }
}

/// Checks that `t` has dtype `dtype`.
fn check_dtype(op: &'static str, arg: &'static str, t: &Tensor, dtype: DType) -> Result<()> {
    if t.dtype() == dtype {
        Ok(())
    } else {
        Err(Error::DType {
            op,
            arg,
            expected: dtype.to_string(),
            got: t.dtype(),
        })
    }
}

/// Checks that `t` lives on `device`.
fn check_device(op: &'static str, arg: &'static str, t: &Tensor, device: &Device) -> Result<()> {
    if t.device().same(device) {
        Ok(())
    } else {
        Err(Error::Device {
            op,
            arg,
            expected: device.to_string(),
            got: t.device().to_string(),
        })
    }
}

/// Checks that `t` has exactly `shape`.
fn check_shape(op: &'static str, arg: &'static str, t: &Tensor, shape: &[usize]) -> Result<()> {
    if t.shape() == shape {
        Ok(())
    } else {
        Err(Error::Shape {
            op,
            arg,
            expected: format!("{shape:?}"),
            got: t.shape().to_vec(),
        })
    }
}

/// Checks that `t` has at least one element.
fn check_nonempty(op: &'static str, arg: &'static str, t: &Tensor) -> Result<()> {
    if t.elem_count() > 0 {
        Ok(())
    } else {
        Err(Error::Invalid {
            op,
            arg,
            what: format!("is empty (shape {:?})", t.shape()),
        })
    }
}

/// Checks that `t`'s address is aligned to its element size (tensors platypus
/// allocates always are; memory from another crate may not be).
fn check_aligned(op: &'static str, arg: &'static str, t: &Tensor) -> Result<()> {
    let size = t.dtype().size() as u64;
    if t.device_address() % size == 0 {
        Ok(())
    } else {
        Err(Error::Invalid {
            op,
            arg,
            what: format!(
                "address 0x{:x} is not aligned to its {size}-byte elements",
                t.device_address()
            ),
        })
    }
}

/// Converts a size to the i32 the kernels take.
fn to_i32(op: &'static str, arg: &'static str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::Invalid {
        op,
        arg,
        what: format!("{v} exceeds the kernels' 32-bit index range"),
    })
}

/// True if every tensor's address is 16-byte aligned and `row_bytes` keeps
/// every row so: the kernels may then use 128-bit accesses.
fn vectorizable(tensors: &[&Tensor], row_bytes: usize) -> bool {
    row_bytes % 16 == 0 && tensors.iter().all(|t| t.device_address() % 16 == 0)
}

/// A one-block-per-row launch over `rows` rows of `hidden` elements of
/// `dtype`: whether every tensor allows 128-bit accesses, and the launch
/// (threads for one access each across the row, up to `max_threads`).
fn row_launch(
    tensors: &[&Tensor],
    dtype: DType,
    rows: usize,
    hidden: usize,
    max_threads: u32,
) -> (bool, LaunchConfig) {
    let vectorized = vectorizable(tensors, hidden * dtype.size());
    let per_access = if vectorized { 16 / dtype.size() } else { 1 };
    let threads = threads_for_row(hidden, per_access, max_threads);
    (vectorized, LaunchConfig::linear(rows as u32, threads, 0))
}

/// Threads per block for a row of `elems` elements read `per_access` at a time:
/// one access per thread up to `max`, in whole warps.
fn threads_for_row(elems: usize, per_access: usize, max: u32) -> u32 {
    let accesses = elems.div_ceil(per_access);
    (accesses.div_ceil(32) * 32).clamp(32, max as usize) as u32
}

/// (out, in) of a weight that must be [out, in].
fn weight_dims(op: &'static str, arg: &'static str, w: &Tensor) -> Result<(usize, usize)> {
    match *w.shape() {
        [d_out, d_in] => Ok((d_out, d_in)),
        _ => Err(Error::Shape {
            op,
            arg,
            expected: "[out, in]".into(),
            got: w.shape().to_vec(),
        }),
    }
}

/// Checks that every named tensor starts 16-byte aligned (cp.async moves 16-byte chunks).
fn check_aligned16(op: &'static str, tensors: &[(&'static str, &Tensor)]) -> Result<()> {
    for &(arg, t) in tensors {
        if t.device_address() % 16 != 0 {
            return Err(Error::Invalid {
                op,
                arg,
                what: format!("address 0x{:x} is not 16-byte aligned", t.device_address()),
            });
        }
    }
    Ok(())
}

/// The tensor-core kernels take f16 or bf16.
fn check_kernel_dtype(op: &'static str, arg: &'static str, t: &Tensor) -> Result<()> {
    if matches!(t.dtype(), DType::F16 | DType::BF16) {
        Ok(())
    } else {
        Err(Error::DType {
            op,
            arg,
            expected: "f16 or bf16 (the kernels run on tensor cores; f32 runs on Device::Cpu)"
                .into(),
            got: t.dtype(),
        })
    }
}

/// A grid's y or z extent.
fn grid_dim(op: &'static str, arg: &'static str, n: usize) -> Result<u32> {
    if n <= 65535 {
        Ok(n.max(1) as u32)
    } else {
        Err(Error::Invalid {
            op,
            arg,
            what: format!("{n} blocks along a grid dimension that holds 65535"),
        })
    }
}
