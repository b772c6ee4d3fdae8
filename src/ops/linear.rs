//! A Linear layer with its bias and activation: `y = act(x Wᵀ + b)`, x
//! [..., in], W [out, in] (nn.Linear's layout), b [out] or none, act the
//! identity or GELU (erf form): the encoder's projections and feed-forward.
//!
//! - f16 or bf16 on the GPU and the emulator (fp32 accumulation on tensor
//!   cores, bias and GELU applied to the accumulators, one rounding), in a
//!   multiple of 8 and x, W 16-byte aligned there; any float type on
//!   [`Device::Cpu`], where f32 x runs the host GEMM
//!   ([`crate::host::gemm::matmul_nt`], W and b in any float type).
//!
//! Kernels: `kernels/linear.cu`. CPU reference: [`crate::cpu::linear`].

use super::{
    check_aligned, check_aligned16, check_device, check_dtype, check_float, check_kernel_dtype,
    check_nonempty, check_shape, grid_dim, to_i32, weight_dims,
};
use crate::cpu;
pub use crate::cpu::linear::Activation;
use crate::device::{DType, Device};
use crate::error::{Error, Result};
use crate::host;
use crate::kernels::params::LinearParams;
use crate::launch::LaunchConfig;
use crate::tensor::Tensor;

/// Rows and columns of y per block, threads per block and the dynamic shared
/// memory of its 3-stage pipeline (kernels/linear.cu, gemm.cuh: stages ·
/// (x tile + W tile) · 32-deep K · 2 bytes).
const TILE: usize = 128;
const THREADS: u32 = 256;
const SHARED_BYTES: u32 = (3 * 2 * TILE * 32 * 2) as u32;

/// `act(x Wᵀ + b)`, a new tensor [..., out] in x's dtype.
pub fn forward(x: &Tensor, w: &Tensor, b: Option<&Tensor>, act: Activation) -> Result<Tensor> {
    const OP: &str = "linear::forward";
    check_float(OP, "x", x)?;
    check_nonempty(OP, "x", x)?;
    let device = x.device();
    let d_in = *x.shape().last().expect("non-empty tensors have a shape");
    let (d_out, w_in) = weight_dims(OP, "w", w)?;
    if w_in != d_in {
        return Err(Error::Shape {
            op: OP,
            arg: "w",
            expected: format!("[out, {d_in}] (x has {d_in} features)"),
            got: w.shape().to_vec(),
        });
    }
    let host_path = matches!(device, Device::Cpu) && x.dtype() == DType::F32;
    for (arg, t) in std::iter::once(("w", w)).chain(b.map(|b| ("b", b))) {
        if host_path {
            check_float(OP, arg, t)?;
        } else {
            check_dtype(OP, arg, t, x.dtype())?;
        }
        check_device(OP, arg, t, device)?;
    }
    if let Some(b) = b {
        check_shape(OP, "b", b, &[d_out])?;
        check_aligned(OP, "b", b)?;
    }
    let tokens = x.elem_count() / d_in;
    let mut y_shape = x.shape().to_vec();
    *y_shape.last_mut().expect("checked rank") = d_out;
    if host_path {
        return host_forward(OP, x, w, b, act, tokens, d_in, &y_shape);
    }
    if let Device::Cpu = device {
        let b = b.map(Tensor::to_f32_vec).transpose()?;
        let y = cpu::linear::forward(&x.to_f32_vec()?, &w.to_f32_vec()?, b.as_deref(), d_in, act);
        return Tensor::from_f32(&y, &y_shape, x.dtype(), device);
    }
    check_kernel_dtype(OP, "x", x)?;
    if d_in % 8 != 0 {
        return Err(Error::Invalid {
            op: OP,
            arg: "x",
            what: format!("{d_in} features: the kernels need a multiple of 8 (16-byte rows)"),
        });
    }
    check_aligned16(OP, &[("x", x), ("w", w)])?;
    let y = Tensor::zeros(&y_shape, x.dtype(), device)?;
    let mut p = LinearParams {
        x: x.device_address() as *const _,
        w: w.device_address() as *const _,
        bias: b.map_or(std::ptr::null(), |b| b.device_address() as *const _),
        y: y.device_address() as *mut _,
        tokens: to_i32(OP, "x", tokens)?,
        in_features: to_i32(OP, "x", d_in)?,
        out_features: to_i32(OP, "w", d_out)?,
        pad0: 0,
    };
    to_i32(OP, "x", x.elem_count())?;
    to_i32(OP, "w", w.elem_count())?;
    to_i32(OP, "y", y.elem_count())?;
    let cfg = LaunchConfig {
        grid: [
            d_out.div_ceil(TILE) as u32,
            grid_dim(OP, "x", tokens.div_ceil(TILE))?,
            1,
        ],
        block: [THREADS, 1, 1],
        shared_bytes: SHARED_BYTES,
    };
    device.launch(&kernel_name(act, x.dtype()), cfg, &mut p)?;
    Ok(y)
}

/// `linear[_gelu]_forward_{dtype}`.
fn kernel_name(act: Activation, dtype: DType) -> String {
    let act = match act {
        Activation::Identity => "",
        Activation::Gelu => "_gelu",
    };
    format!("linear{act}_forward_{}", dtype.kernel_suffix())
}

/// f32 on the CPU: the bias as the GEMM accumulator's start (beta 1), then
/// GELU in place.
#[allow(clippy::too_many_arguments)]
fn host_forward(
    op: &'static str,
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    act: Activation,
    tokens: usize,
    d_in: usize,
    y_shape: &[usize],
) -> Result<Tensor> {
    let d_out = w.shape()[0];
    let mut y = Tensor::zeros(y_shape, DType::F32, x.device())?;
    let out = host::view::f32s_mut(op, "y", &mut y)?;
    if let Some(b) = b {
        let bias = b.to_f32_vec()?;
        out.chunks_exact_mut(d_out)
            .for_each(|row| row.copy_from_slice(&bias));
    }
    host::gemm::matmul_nt(
        host::view::f32s(op, "x", x)?,
        host::view::weights(op, "w", w)?,
        tokens,
        d_in,
        d_out,
        1.0,
        if b.is_some() { 1.0 } else { 0.0 },
        out,
    );
    if act == Activation::Gelu {
        host::elementwise::gelu_erf(out);
    }
    Ok(y)
}

/// Every linear kernel with its launch shape: (name, threads per block,
/// dynamic shared memory bytes), for occupancy reports.
pub fn kernel_launch_shapes() -> Vec<(String, u32, u32)> {
    [DType::BF16, DType::F16]
        .into_iter()
        .flat_map(|dtype| {
            [Activation::Identity, Activation::Gelu]
                .map(|act| (kernel_name(act, dtype), THREADS, SHARED_BYTES))
        })
        .collect()
}
