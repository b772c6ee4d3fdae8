//! RMSNorm over the last dimension, as Llama computes it:
//! `y = w * x * rsqrt(mean(x^2) + eps)`, fp32 accumulation, storage f32/f16/bf16.
//!
//! [`add_forward`] fuses the residual add before the norm.
//!
//! Kernels: `kernels/rmsnorm.cu`. Host code (f32 on the CPU):
//! [`crate::host::elementwise`]. CPU reference: [`crate::cpu::rmsnorm`].

use super::{
    check_aligned, check_device, check_dtype, check_float, check_nonempty, check_shape, row_launch,
    threads_for_row, to_i32, vectorizable,
};
use crate::cpu;
use crate::device::{DType, Device};
use crate::error::{Error, Result};
use crate::host;
use crate::kernels::params::{
    RmsNormAddForwardParams, RmsNormBackwardParams, RmsNormDwReduceParams, RmsNormForwardParams,
};
use crate::launch::LaunchConfig;
use crate::tensor::Tensor;

/// Threads per block of the kernels (their `__launch_bounds__`).
const THREADS: u32 = 256;
/// Blocks of the backward kernel, and so rows of fp32 dw partial sums. Fixed,
/// so dw is summed in the same order on every device: deterministic.
const BACKWARD_BLOCKS: usize = 512;

/// Gradients of [`backward`].
#[derive(Debug)]
pub struct Grads {
    /// dL/dx, shaped and typed like x.
    pub dx: Tensor,
    /// dL/dw summed over all rows, typed like w; `None` when not asked for.
    pub dw: Option<Tensor>,
}

/// Checks x [.., hidden] (called `x_arg` in errors) and w [hidden]; returns (rows, hidden).
fn check_inputs(
    op: &'static str,
    x_arg: &'static str,
    x: &Tensor,
    w: &Tensor,
    eps: f32,
) -> Result<(usize, usize)> {
    check_float(op, x_arg, x)?;
    check_nonempty(op, x_arg, x)?;
    check_aligned(op, x_arg, x)?;
    check_aligned(op, "w", w)?;
    let hidden = *x.shape().last().unwrap_or(&0);
    check_shape(op, "w", w, &[hidden])?;
    check_dtype(op, "w", w, x.dtype())?;
    check_device(op, "w", w, x.device())?;
    if !(eps.is_finite() && eps >= 0.0) {
        return Err(Error::Invalid {
            op,
            arg: "eps",
            what: format!("{eps} is not a finite value >= 0"),
        });
    }
    Ok((x.elem_count() / hidden, hidden))
}

/// `y = w * x * rsqrt(mean(x^2) + eps)`, a new tensor like x.
pub fn forward(x: &Tensor, w: &Tensor, eps: f32) -> Result<Tensor> {
    let mut y = Tensor::zeros(x.shape(), x.dtype(), x.device())?;
    forward_into(x, w, &mut y, eps)?;
    Ok(y)
}

/// Like [`forward`], writing into `y` (same shape, dtype and device as x).
pub fn forward_into(x: &Tensor, w: &Tensor, y: &mut Tensor, eps: f32) -> Result<()> {
    const OP: &str = "rmsnorm::forward";
    let (rows, hidden) = check_inputs(OP, "x", x, w, eps)?;
    check_shape(OP, "y", y, x.shape())?;
    check_dtype(OP, "y", y, x.dtype())?;
    check_device(OP, "y", y, x.device())?;
    check_aligned(OP, "y", y)?;
    if let (Device::Cpu, DType::F32) = (x.device(), x.dtype()) {
        let (xs, ws) = (host::view::f32s(OP, "x", x)?, host::view::f32s(OP, "w", w)?);
        host::elementwise::rmsnorm(xs, ws, hidden, eps, host::view::f32s_mut(OP, "y", y)?);
        return Ok(());
    }
    if let Device::Cpu = x.device() {
        let out = cpu::rmsnorm::forward(&x.to_f32_vec()?, &w.to_f32_vec()?, hidden, eps);
        *y = Tensor::from_f32(&out, x.shape(), x.dtype(), x.device())?;
        return Ok(());
    }
    let (vectorized, cfg) = row_launch(&[x, w, y], x.dtype(), rows, hidden, THREADS);
    let mut params = RmsNormForwardParams {
        x: x.device_address() as *const _,
        w: w.device_address() as *const _,
        y: y.device_address() as *mut _,
        rows: to_i32(OP, "x", rows)?,
        hidden: to_i32(OP, "x", hidden)?,
        eps,
        vectorized: vectorized as i32,
    };
    x.device().launch(
        &format!("rmsnorm_forward_{}", x.dtype().kernel_suffix()),
        cfg,
        &mut params,
    )
}

/// The residual add fused with the next norm: h += delta in place (rounded
/// to h's dtype), then returns rmsnorm(h) of that rounded h, a new tensor
/// like h: equal to [`forward`] of the updated h. One read of h and delta,
/// a write of h and y (4 row passes where an add then the norm take 5).
pub fn add_forward(h: &mut Tensor, delta: &Tensor, w: &Tensor, eps: f32) -> Result<Tensor> {
    let mut y = Tensor::zeros(h.shape(), h.dtype(), h.device())?;
    add_forward_into(h, delta, w, &mut y, eps)?;
    Ok(y)
}

/// Like [`add_forward`], writing y into `y` (same shape, dtype and device as h).
pub fn add_forward_into(
    h: &mut Tensor,
    delta: &Tensor,
    w: &Tensor,
    y: &mut Tensor,
    eps: f32,
) -> Result<()> {
    const OP: &str = "rmsnorm::add_forward";
    let (rows, hidden) = check_inputs(OP, "h", h, w, eps)?;
    for (arg, t) in [("delta", delta), ("y", &*y)] {
        check_shape(OP, arg, t, h.shape())?;
        check_dtype(OP, arg, t, h.dtype())?;
        check_device(OP, arg, t, h.device())?;
        check_aligned(OP, arg, t)?;
    }
    if let (Device::Cpu, DType::F32) = (h.device(), h.dtype()) {
        host::elementwise::add_rmsnorm(
            host::view::f32s_mut(OP, "h", h)?,
            host::view::f32s(OP, "delta", delta)?,
            host::view::f32s(OP, "w", w)?,
            hidden,
            eps,
            host::view::f32s_mut(OP, "y", y)?,
        );
        return Ok(());
    }
    if let Device::Cpu = h.device() {
        let (sum, out) = cpu::rmsnorm::add_forward(
            &h.to_f32_vec()?,
            &delta.to_f32_vec()?,
            &w.to_f32_vec()?,
            hidden,
            eps,
            h.dtype(),
        );
        *h = Tensor::from_f32(&sum, h.shape(), h.dtype(), h.device())?;
        *y = Tensor::from_f32(&out, h.shape(), h.dtype(), h.device())?;
        return Ok(());
    }
    let (vectorized, cfg) = row_launch(&[h, delta, w, y], h.dtype(), rows, hidden, THREADS);
    let mut params = RmsNormAddForwardParams {
        h: h.device_address() as *mut _,
        delta: delta.device_address() as *const _,
        w: w.device_address() as *const _,
        y: y.device_address() as *mut _,
        rows: to_i32(OP, "h", rows)?,
        hidden: to_i32(OP, "h", hidden)?,
        eps,
        vectorized: vectorized as i32,
    };
    h.device().launch(
        &format!("rmsnorm_add_forward_{}", h.dtype().kernel_suffix()),
        cfg,
        &mut params,
    )
}

/// Gradients of [`forward`] given dy (like x). `dw` is computed only when
/// `want_dw`; LoRA never trains the norm, so its backward passes false and
/// the kernel skips the dw work and its shared memory.
///
/// dw is reduced deterministically: fixed per-block partial sums in fp32,
/// then summed in block order (no float atomics).
pub fn backward(x: &Tensor, w: &Tensor, dy: &Tensor, eps: f32, want_dw: bool) -> Result<Grads> {
    const OP: &str = "rmsnorm::backward";
    let (rows, hidden) = check_inputs(OP, "x", x, w, eps)?;
    check_shape(OP, "dy", dy, x.shape())?;
    check_dtype(OP, "dy", dy, x.dtype())?;
    check_device(OP, "dy", dy, x.device())?;
    check_aligned(OP, "dy", dy)?;
    let device = x.device();
    if let (Device::Cpu, DType::F32) = (device, x.dtype()) {
        let mut dx = Tensor::zeros(x.shape(), DType::F32, device)?;
        let mut dw = if want_dw {
            Some(Tensor::zeros(w.shape(), DType::F32, device)?)
        } else {
            None
        };
        host::elementwise::rmsnorm_backward(
            host::view::f32s(OP, "x", x)?,
            host::view::f32s(OP, "w", w)?,
            host::view::f32s(OP, "dy", dy)?,
            hidden,
            eps,
            host::view::f32s_mut(OP, "dx", &mut dx)?,
            match dw.as_mut() {
                Some(dw) => Some(host::view::f32s_mut(OP, "dw", dw)?),
                None => None,
            },
        );
        return Ok(Grads { dx, dw });
    }
    if let Device::Cpu = device {
        let (dx, dw) = cpu::rmsnorm::backward(
            &x.to_f32_vec()?,
            &w.to_f32_vec()?,
            &dy.to_f32_vec()?,
            hidden,
            eps,
        );
        let dx = Tensor::from_f32(&dx, x.shape(), x.dtype(), device)?;
        let dw = if want_dw {
            Some(Tensor::from_f32(&dw, w.shape(), w.dtype(), device)?)
        } else {
            None
        };
        return Ok(Grads { dx, dw });
    }
    let suffix = x.dtype().kernel_suffix();
    let kernel = format!("rmsnorm_backward_{suffix}");
    // dw accumulates in shared memory, a row of fp32 per block, next to the
    // kernel's static shared memory: both must fit the device's arch.
    let shared = if want_dw { hidden * 4 } else { 0 };
    if let Some(limits) = device.arch_limits()? {
        let static_bytes =
            crate::kernels::resources(&kernel, limits.arch).map_or(0, |r| r.shared_bytes as usize);
        if static_bytes + shared > limits.shared_optin as usize {
            return Err(Error::Invalid {
                op: OP,
                arg: "x",
                what: format!(
                    "hidden size {hidden} needs {shared} bytes of shared memory for dw (plus {static_bytes} static), more than the {} a block may have on sm_{}",
                    limits.shared_optin, limits.arch
                ),
            });
        }
    }
    let dx = Tensor::zeros(x.shape(), x.dtype(), device)?;
    let blocks = rows.min(BACKWARD_BLOCKS);
    let partial = if want_dw {
        Some(Tensor::zeros(&[blocks, hidden], DType::F32, device)?)
    } else {
        None
    };
    let vectorized = vectorizable(&[x, w, dy, &dx], hidden * x.dtype().size());
    let per_access = if vectorized { 16 / x.dtype().size() } else { 1 };
    let mut params = RmsNormBackwardParams {
        x: x.device_address() as *const _,
        w: w.device_address() as *const _,
        dy: dy.device_address() as *const _,
        dx: dx.device_address() as *mut _,
        dw_partial: partial
            .as_ref()
            .map_or(std::ptr::null_mut(), |p| p.device_address() as *mut f32),
        rows: to_i32(OP, "x", rows)?,
        hidden: to_i32(OP, "x", hidden)?,
        eps,
        vectorized: vectorized as i32,
    };
    let cfg = LaunchConfig::linear(
        blocks as u32,
        threads_for_row(hidden, per_access, THREADS),
        shared as u32,
    );
    device.launch(&kernel, cfg, &mut params)?;

    let dw = match partial {
        None => None,
        Some(partial) => {
            let dw = Tensor::zeros(&[hidden], w.dtype(), device)?;
            let mut params = RmsNormDwReduceParams {
                partial: partial.device_address() as *const f32,
                dw: dw.device_address() as *mut _,
                parts: blocks as i32,
                hidden: hidden as i32,
            };
            let cfg = LaunchConfig::linear(hidden.div_ceil(THREADS as usize) as u32, THREADS, 0);
            device.launch(&format!("rmsnorm_dw_reduce_{suffix}"), cfg, &mut params)?;
            Some(dw)
        }
    };
    Ok(Grads { dx, dw })
}
