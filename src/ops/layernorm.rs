//! LayerNorm over the last dimension, as BERT computes it:
//! `y = w * (x - mean) * rsqrt(var + eps) + b` (biased variance), fp32
//! accumulation, storage f32/f16/bf16: the norm of the sentence encoder.
//!
//! [`residual_forward`] is BERT's post-norm sublayer output,
//! `h = LayerNorm(h + delta)` in place, in one pass over the rows.
//!
//! Kernel: `kernels/layernorm.cu`. Host code (f32 on the CPU):
//! [`crate::host::elementwise`]. CPU reference: [`crate::cpu::layernorm`].

use super::{
    check_aligned, check_device, check_dtype, check_float, check_nonempty, check_shape, row_launch,
    to_i32,
};
use crate::cpu;
use crate::device::{DType, Device};
use crate::error::{Error, Result};
use crate::host;
use crate::kernels::params::LayerNormForwardParams;
use crate::tensor::Tensor;

/// Threads per block of the kernel (its `__launch_bounds__`).
const THREADS: u32 = 256;

/// Checks x [.., hidden] (called `x_arg` in errors), w and b [hidden] and
/// eps; returns (rows, hidden).
fn check_inputs(
    op: &'static str,
    x_arg: &'static str,
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    eps: f32,
) -> Result<(usize, usize)> {
    check_float(op, x_arg, x)?;
    check_nonempty(op, x_arg, x)?;
    check_aligned(op, x_arg, x)?;
    let hidden = *x.shape().last().unwrap_or(&0);
    for (arg, t) in [("w", w), ("b", b)] {
        check_shape(op, arg, t, &[hidden])?;
        check_dtype(op, arg, t, x.dtype())?;
        check_device(op, arg, t, x.device())?;
        check_aligned(op, arg, t)?;
    }
    if !(eps.is_finite() && eps >= 0.0) {
        return Err(Error::Invalid {
            op,
            arg: "eps",
            what: format!("{eps} is not a finite value >= 0"),
        });
    }
    Ok((x.elem_count() / hidden, hidden))
}

/// `y = w * (x - mean) * rsqrt(var + eps) + b` per row, a new tensor like x.
pub fn forward(x: &Tensor, w: &Tensor, b: &Tensor, eps: f32) -> Result<Tensor> {
    const OP: &str = "layernorm::forward";
    let (rows, hidden) = check_inputs(OP, "x", x, w, b, eps)?;
    let mut y = Tensor::zeros(x.shape(), x.dtype(), x.device())?;
    if let (Device::Cpu, DType::F32) = (x.device(), x.dtype()) {
        host::elementwise::layernorm(
            host::view::f32s(OP, "x", x)?,
            host::view::f32s(OP, "w", w)?,
            host::view::f32s(OP, "b", b)?,
            hidden,
            eps,
            host::view::f32s_mut(OP, "y", &mut y)?,
        );
        return Ok(y);
    }
    if let Device::Cpu = x.device() {
        let out = reference(x, None, w, b, hidden, eps)?;
        return Tensor::from_f32(&out, x.shape(), x.dtype(), x.device());
    }
    launch(OP, x, None, w, b, &y, rows, hidden, eps)?;
    Ok(y)
}

/// `h = LayerNorm(h + delta)` in place, the sum rounded to h's dtype before
/// the norm (as a tensor of that dtype holds it): BERT's residual sublayer.
/// One read of h and delta and one write of h, where an add then
/// [`forward`] would move five row passes.
pub fn residual_forward(
    h: &mut Tensor,
    delta: &Tensor,
    w: &Tensor,
    b: &Tensor,
    eps: f32,
) -> Result<()> {
    const OP: &str = "layernorm::residual_forward";
    let (rows, hidden) = check_inputs(OP, "h", h, w, b, eps)?;
    check_shape(OP, "delta", delta, h.shape())?;
    check_dtype(OP, "delta", delta, h.dtype())?;
    check_device(OP, "delta", delta, h.device())?;
    check_aligned(OP, "delta", delta)?;
    if let (Device::Cpu, DType::F32) = (h.device(), h.dtype()) {
        host::elementwise::residual_layernorm(
            host::view::f32s_mut(OP, "h", h)?,
            host::view::f32s(OP, "delta", delta)?,
            host::view::f32s(OP, "w", w)?,
            host::view::f32s(OP, "b", b)?,
            hidden,
            eps,
        );
        return Ok(());
    }
    if let Device::Cpu = h.device() {
        let out = reference(h, Some(delta), w, b, hidden, eps)?;
        *h = Tensor::from_f32(&out, h.shape(), h.dtype(), h.device())?;
        return Ok(());
    }
    launch(OP, h, Some(delta), w, b, h, rows, hidden, eps)
}

/// The CPU reference on f16/bf16 tensors of `Device::Cpu`.
fn reference(
    x: &Tensor,
    delta: Option<&Tensor>,
    w: &Tensor,
    b: &Tensor,
    hidden: usize,
    eps: f32,
) -> Result<Vec<f32>> {
    let delta = delta.map(Tensor::to_f32_vec).transpose()?;
    Ok(cpu::layernorm::forward(
        &x.to_f32_vec()?,
        delta.as_deref(),
        &w.to_f32_vec()?,
        &b.to_f32_vec()?,
        hidden,
        eps,
        x.dtype(),
    ))
}

/// Launches `layernorm_forward_<dtype>`: one block per row; y may be x.
#[allow(clippy::too_many_arguments)]
fn launch(
    op: &'static str,
    x: &Tensor,
    delta: Option<&Tensor>,
    w: &Tensor,
    b: &Tensor,
    y: &Tensor,
    rows: usize,
    hidden: usize,
    eps: f32,
) -> Result<()> {
    let mut all = vec![x, w, b, y];
    all.extend(delta);
    let (vectorized, cfg) = row_launch(&all, x.dtype(), rows, hidden, THREADS);
    let mut params = LayerNormForwardParams {
        x: x.device_address() as *const _,
        delta: delta.map_or(std::ptr::null(), |d| d.device_address() as *const _),
        w: w.device_address() as *const _,
        b: b.device_address() as *const _,
        y: y.device_address() as *mut _,
        rows: to_i32(op, "x", rows)?,
        hidden: to_i32(op, "x", hidden)?,
        eps,
        vectorized: vectorized as i32,
    };
    x.device().launch(
        &format!("layernorm_forward_{}", x.dtype().kernel_suffix()),
        cfg,
        &mut params,
    )
}
