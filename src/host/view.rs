//! Host tensors seen as slices: what the fast host code reads and writes.

use super::gemm::Weights;
use crate::{DType, Error, Result, Tensor};

fn not_host(op: &'static str, arg: &'static str, t: &Tensor) -> Error {
    Error::Device {
        op,
        arg,
        expected: "host memory (cpu)".into(),
        got: t.device().to_string(),
    }
}

/// A float host tensor as [`Weights`] in its stored dtype.
pub fn weights<'a>(op: &'static str, arg: &'static str, t: &'a Tensor) -> Result<Weights<'a>> {
    let bytes = t.host_bytes().ok_or_else(|| not_host(op, arg, t))?;
    Ok(match t.dtype() {
        DType::F32 => Weights::F32(bytemuck::cast_slice(bytes)),
        DType::F16 => Weights::F16(bytemuck::cast_slice(bytes)),
        DType::BF16 => Weights::BF16(bytemuck::cast_slice(bytes)),
        other => {
            return Err(Error::DType {
                op,
                arg,
                expected: "f32, f16 or bf16".into(),
                got: other,
            })
        }
    })
}

/// An f32 host tensor's elements.
pub fn f32s<'a>(op: &'static str, arg: &'static str, t: &'a Tensor) -> Result<&'a [f32]> {
    check_f32(op, arg, t)?;
    let bytes = t.host_bytes().ok_or_else(|| not_host(op, arg, t))?;
    Ok(bytemuck::cast_slice(bytes))
}

/// An f32 host tensor's elements, writable.
pub fn f32s_mut<'a>(
    op: &'static str,
    arg: &'static str,
    t: &'a mut Tensor,
) -> Result<&'a mut [f32]> {
    check_f32(op, arg, t)?;
    if t.host_bytes().is_none() {
        return Err(not_host(op, arg, t));
    }
    Ok(bytemuck::cast_slice_mut(
        t.host_bytes_mut().expect("host tensor"),
    ))
}

fn check_f32(op: &'static str, arg: &'static str, t: &Tensor) -> Result<()> {
    if t.dtype() == DType::F32 {
        Ok(())
    } else {
        Err(Error::DType {
            op,
            arg,
            expected: "f32 (the host path computes in f32)".into(),
            got: t.dtype(),
        })
    }
}
