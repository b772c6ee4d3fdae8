//! Rotary position embeddings, in place, on q [batch, seq, q_heads, head_dim]
//! and k [batch, seq, k_heads, head_dim] (grouped-query: k_heads may be fewer),
//! with per-token position ids [batch, seq] (i32), so packed or offset
//! sequences work. Angles in fp32 as Hugging Face computes them.
//!
//! Kernels: `kernels/rope.cu`. CPU reference: [`crate::cpu::rope`].

use super::{
    check_aligned, check_device, check_dtype, check_float, check_nonempty, check_shape, to_i32,
    vectorizable,
};
use crate::cpu;
pub use crate::cpu::rope::RopeStyle;
use crate::device::{DType, Device};
use crate::error::{Error, Result};
use crate::host;
use crate::kernels::params::RopeParams;
use crate::launch::LaunchConfig;
use crate::tensor::Tensor;

/// Threads per block of the kernel (its `__launch_bounds__`).
const THREADS: u32 = 256;

/// How positions become angles.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RopeConfig {
    /// Frequency base: `inv_freq[i] = theta^(-2i/head_dim)`. Llama 2: 10000.
    pub theta: f32,
    /// Which elements form the rotated pairs.
    pub style: RopeStyle,
}

impl Default for RopeConfig {
    /// Llama 2 as Hugging Face checkpoints store it: theta 10000, rotate_half.
    fn default() -> Self {
        RopeConfig {
            theta: 10000.0,
            style: RopeStyle::RotateHalf,
        }
    }
}

/// Rotates q and k in place by their tokens' positions.
pub fn forward(q: &mut Tensor, k: &mut Tensor, positions: &Tensor, cfg: &RopeConfig) -> Result<()> {
    apply("rope::forward", q, k, positions, cfg, false)
}

/// The backward pass, in place: turns dL/d(rotated q, k) into dL/d(q, k)
/// (rotation by minus the angle).
pub fn backward(
    dq: &mut Tensor,
    dk: &mut Tensor,
    positions: &Tensor,
    cfg: &RopeConfig,
) -> Result<()> {
    apply("rope::backward", dq, dk, positions, cfg, true)
}

fn apply(
    op: &'static str,
    q: &mut Tensor,
    k: &mut Tensor,
    positions: &Tensor,
    cfg: &RopeConfig,
    inverse: bool,
) -> Result<()> {
    check_float(op, "q", q)?;
    check_nonempty(op, "q", q)?;
    let [batch, seq, q_heads, head_dim] = *q.shape() else {
        return Err(Error::Shape {
            op,
            arg: "q",
            expected: "[batch, seq, q_heads, head_dim]".into(),
            got: q.shape().to_vec(),
        });
    };
    if head_dim % 2 != 0 {
        return Err(Error::Invalid {
            op,
            arg: "q",
            what: format!("head_dim {head_dim} is odd; rotary pairs need an even head_dim"),
        });
    }
    let k_heads = match *k.shape() {
        [b, s, h, d] if b == batch && s == seq && d == head_dim => h,
        _ => {
            return Err(Error::Shape {
                op,
                arg: "k",
                expected: format!("[{batch}, {seq}, k_heads, {head_dim}]"),
                got: k.shape().to_vec(),
            })
        }
    };
    check_dtype(op, "k", k, q.dtype())?;
    check_device(op, "k", k, q.device())?;
    check_shape(op, "positions", positions, &[batch, seq])?;
    check_dtype(op, "positions", positions, DType::I32)?;
    check_device(op, "positions", positions, q.device())?;
    for (arg, t) in [("q", &*q), ("k", &*k), ("positions", positions)] {
        check_aligned(op, arg, t)?;
    }
    if !(cfg.theta.is_finite() && cfg.theta > 0.0) {
        return Err(Error::Invalid {
            op,
            arg: "cfg.theta",
            what: format!("{} is not a finite value > 0", cfg.theta),
        });
    }
    let tokens = batch * seq;
    let device = q.device().clone();
    if let (Device::Cpu, DType::F32) = (&device, q.dtype()) {
        let pos = positions.to_vec::<i32>()?;
        host::rope::apply(
            host::view::f32s_mut(op, "q", q)?,
            host::view::f32s_mut(op, "k", k)?,
            &pos,
            (q_heads, k_heads),
            head_dim,
            cfg.theta,
            cfg.style,
            inverse,
        );
        return Ok(());
    }
    if let Device::Cpu = device {
        let pos = positions.to_vec::<i32>()?;
        for (t, heads) in [(q, q_heads), (k, k_heads)] {
            let mut v = t.to_f32_vec()?;
            cpu::rope::apply(&mut v, &pos, heads, head_dim, cfg.theta, cfg.style, inverse);
            *t = Tensor::from_f32(&v, t.shape(), t.dtype(), &device)?;
        }
        return Ok(());
    }
    let interleaved = cfg.style == RopeStyle::Interleaved;
    let vec = 16 / q.dtype().size();
    // Elements one thread moves per access run: a whole run of pairs when
    // interleaved, each half's run for rotate_half.
    let run_elems = if interleaved { head_dim } else { head_dim / 2 };
    let vectorized = run_elems % vec == 0 && vectorizable(&[q, k], head_dim * q.dtype().size());
    let pairs_per_thread = match (vectorized, interleaved) {
        (false, _) => 1,
        (true, true) => vec / 2,
        (true, false) => vec,
    };
    let threads_total = tokens * (head_dim / 2 / pairs_per_thread);
    let mut params = RopeParams {
        q: q.device_address() as *mut _,
        k: k.device_address() as *mut _,
        positions: positions.device_address() as *const i32,
        tokens: to_i32(op, "q", tokens)?,
        q_heads: to_i32(op, "q", q_heads)?,
        k_heads: to_i32(op, "k", k_heads)?,
        head_dim: to_i32(op, "q", head_dim)?,
        theta: cfg.theta,
        interleaved: interleaved as i32,
        inverse: inverse as i32,
        vectorized: vectorized as i32,
    };
    let blocks =
        u32::try_from(threads_total.div_ceil(THREADS as usize)).map_err(|_| Error::Invalid {
            op,
            arg: "q",
            what: format!("{tokens} tokens need more blocks than a grid holds"),
        })?;
    let cfg = LaunchConfig::linear(blocks, THREADS, 0);
    device.launch(
        &format!("rope_{}", q.dtype().kernel_suffix()),
        cfg,
        &mut params,
    )
}
