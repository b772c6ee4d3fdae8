//! SwiGLU, the Llama MLP's gate: m = silu(gate) ∘ up.
//!
//! Host code: [`crate::host::elementwise::swiglu`]. Reference: [`crate::cpu::swiglu`].

use super::{check_device, check_dtype, check_float, check_shape, no_kernel_yet};
use crate::host;
use crate::{Device, Result, Tensor};

/// silu(gate) ∘ up, a new tensor like `gate`.
pub fn forward(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    const OP: &str = "swiglu::forward";
    check_float(OP, "gate", gate)?;
    check_shape(OP, "up", up, gate.shape())?;
    check_dtype(OP, "up", up, gate.dtype())?;
    check_device(OP, "up", up, gate.device())?;
    match gate.device() {
        Device::Cpu => {
            let mut out = Tensor::zeros(gate.shape(), gate.dtype(), gate.device())?;
            host::elementwise::swiglu(
                host::view::f32s(OP, "gate", gate)?,
                host::view::f32s(OP, "up", up)?,
                host::view::f32s_mut(OP, "out", &mut out)?,
            );
            Ok(out)
        }
        _ => Err(no_kernel_yet(OP, gate.device())),
    }
}
