//! SwiGLU, the Llama MLP's gate: m = silu(gate) ∘ up, and its gradients
//! dgate = dm ∘ up ∘ silu'(gate), dup = dm ∘ silu(gate), with
//! silu'(g) = σ(g) (1 + g (1 − σ(g))). fp32 math, storage f32/f16/bf16.
//!
//! Kernels: `kernels/swiglu.cu`. Host code (f32 on the CPU):
//! [`crate::host::elementwise::swiglu`] and
//! [`crate::host::elementwise::swiglu_backward`]. Reference:
//! [`crate::cpu::swiglu`].

use super::{check_aligned, check_device, check_dtype, check_float, check_nonempty, check_shape};
use crate::cpu;
use crate::host;
use crate::kernels::params::SwigluParams;
use crate::launch::LaunchConfig;
use crate::{DType, Device, Result, Tensor};

/// Threads per block of the kernels (their `__launch_bounds__`).
const THREADS: u32 = 256;
/// At most this many blocks; past it threads walk the tensors grid-stride.
const MAX_BLOCKS: usize = 1 << 20;

/// Gradients of [`forward`].
#[derive(Debug)]
pub struct Grads {
    /// dL/dgate, shaped and typed like gate.
    pub dgate: Tensor,
    /// dL/dup, shaped and typed like up.
    pub dup: Tensor,
}

/// Checks that `t` (called `arg`) has gate's shape, dtype and device, and is aligned.
fn check_like(op: &'static str, arg: &'static str, t: &Tensor, gate: &Tensor) -> Result<()> {
    check_shape(op, arg, t, gate.shape())?;
    check_dtype(op, arg, t, gate.dtype())?;
    check_device(op, arg, t, gate.device())?;
    check_aligned(op, arg, t)
}

/// Checks gate (float, not empty) and up (like gate).
fn check_inputs(op: &'static str, gate: &Tensor, up: &Tensor) -> Result<()> {
    check_float(op, "gate", gate)?;
    check_nonempty(op, "gate", gate)?;
    check_aligned(op, "gate", gate)?;
    check_like(op, "up", up, gate)
}

/// silu(gate) ∘ up, a new tensor like `gate`.
pub fn forward(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    let mut m = Tensor::zeros(gate.shape(), gate.dtype(), gate.device())?;
    forward_into(gate, up, &mut m)?;
    Ok(m)
}

/// Like [`forward`], writing into `m` (same shape, dtype and device as gate).
pub fn forward_into(gate: &Tensor, up: &Tensor, m: &mut Tensor) -> Result<()> {
    const OP: &str = "swiglu::forward";
    check_inputs(OP, gate, up)?;
    check_like(OP, "m", m, gate)?;
    match (gate.device(), gate.dtype()) {
        (Device::Cpu, DType::F32) => {
            host::elementwise::swiglu(
                host::view::f32s(OP, "gate", gate)?,
                host::view::f32s(OP, "up", up)?,
                host::view::f32s_mut(OP, "m", m)?,
            );
            Ok(())
        }
        (Device::Cpu, dtype) => {
            let out = cpu::swiglu::forward(&gate.to_f32_vec()?, &up.to_f32_vec()?);
            *m = Tensor::from_f32(&out, gate.shape(), dtype, &Device::Cpu)?;
            Ok(())
        }
        (device, dtype) => {
            let mut params = SwigluParams {
                gate: gate.device_address() as *const _,
                up: up.device_address() as *const _,
                m: m.device_address() as *mut _,
                dm: std::ptr::null(),
                dgate: std::ptr::null_mut(),
                dup: std::ptr::null_mut(),
                n: gate.elem_count() as i64,
                vectorized: super::vectorizable(&[gate, up, m], 0) as i32,
                pad0: 0,
            };
            launch(device, "forward", dtype, &mut params)
        }
    }
}

/// Gradients of [`forward`] given dm (like gate): dgate and dup, new
/// tensors like gate and up.
pub fn backward(gate: &Tensor, up: &Tensor, dm: &Tensor) -> Result<Grads> {
    let mut dgate = Tensor::zeros(gate.shape(), gate.dtype(), gate.device())?;
    let mut dup = Tensor::zeros(gate.shape(), gate.dtype(), gate.device())?;
    backward_into(gate, up, dm, &mut dgate, &mut dup)?;
    Ok(Grads { dgate, dup })
}

/// Like [`backward`], writing into `dgate` and `dup` (each like gate).
pub fn backward_into(
    gate: &Tensor,
    up: &Tensor,
    dm: &Tensor,
    dgate: &mut Tensor,
    dup: &mut Tensor,
) -> Result<()> {
    const OP: &str = "swiglu::backward";
    check_inputs(OP, gate, up)?;
    check_like(OP, "dm", dm, gate)?;
    check_like(OP, "dgate", dgate, gate)?;
    check_like(OP, "dup", dup, gate)?;
    match (gate.device(), gate.dtype()) {
        (Device::Cpu, DType::F32) => {
            host::elementwise::swiglu_backward(
                host::view::f32s(OP, "gate", gate)?,
                host::view::f32s(OP, "up", up)?,
                host::view::f32s(OP, "dm", dm)?,
                host::view::f32s_mut(OP, "dgate", dgate)?,
                host::view::f32s_mut(OP, "dup", dup)?,
            );
            Ok(())
        }
        (Device::Cpu, _) => {
            let (dg, du) =
                cpu::swiglu::backward(&gate.to_f32_vec()?, &up.to_f32_vec()?, &dm.to_f32_vec()?);
            *dgate = Tensor::from_f32(&dg, gate.shape(), gate.dtype(), &Device::Cpu)?;
            *dup = Tensor::from_f32(&du, gate.shape(), gate.dtype(), &Device::Cpu)?;
            Ok(())
        }
        (device, _) => {
            let mut params = SwigluParams {
                gate: gate.device_address() as *const _,
                up: up.device_address() as *const _,
                m: std::ptr::null_mut(),
                dm: dm.device_address() as *const _,
                dgate: dgate.device_address() as *mut _,
                dup: dup.device_address() as *mut _,
                n: gate.elem_count() as i64,
                vectorized: super::vectorizable(&[gate, up, dm, dgate, dup], 0) as i32,
                pad0: 0,
            };
            launch(device, "backward", gate.dtype(), &mut params)
        }
    }
}

/// Launches `swiglu_{pass}_{dtype}` over params.n elements: a thread per
/// 16-byte vector (or element, unvectorized), at most [`MAX_BLOCKS`] blocks.
fn launch(device: &Device, pass: &str, dtype: DType, params: &mut SwigluParams) -> Result<()> {
    let n = params.n as usize;
    let per_access = if params.vectorized != 0 {
        16 / dtype.size()
    } else {
        1
    };
    // Threads for the whole vectors, or for the tail when it is longer.
    let work = (n / per_access).max(n % per_access);
    let blocks = work.div_ceil(THREADS as usize).clamp(1, MAX_BLOCKS);
    let cfg = LaunchConfig::linear(blocks as u32, THREADS, 0);
    device.launch(
        &format!("swiglu_{pass}_{}", dtype.kernel_suffix()),
        cfg,
        params,
    )
}
