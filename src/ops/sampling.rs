//! Choosing the next token from rows of logits [rows, vocab] (f32, f16 or
//! bf16): greedy [`argmax`] and temperature / top-p [`sample`], one GPU
//! block per row; only the ids come back to the host.
//!
//! The sampling is defined so that a GPU needs no sort and the CPU
//! reference computes the same thing:
//!
//! 1. w_i = exp((z_i − max z) / T), so the largest logit weighs 1;
//! 2. the nucleus is every token with w_i > 0 and w_i ≥ τ, where τ is the
//!    largest threshold whose kept mass Σ_{w_i ≥ τ} w_i reaches
//!    top_p · Σ w (with top_p = 1 nothing is cut). It is the smallest set of
//!    most likely tokens reaching top_p, plus every token tied with the
//!    least likely of them;
//! 3. the token is the first nucleus index, in index order, whose running
//!    nucleus mass exceeds u · (nucleus mass), u in [0, 1) given per row.
//!
//! The kernel finds τ by bisection over the bits of a float (30 block-wide
//! sums) and walks the row in index order; its sums are fp32, the
//! reference's f64, so the two pick the same token except when u · (mass)
//! or top_p · Σ w lies within rounding of a cumulative-sum boundary.
//!
//! Kernels: `kernels/sampling.cu`. CPU reference: [`crate::cpu::sampling`]
//! (what [`Device::Cpu`] runs).

use super::{check_aligned, check_float, check_nonempty, threads_for_row, to_i32, vectorizable};
use crate::cpu;
use crate::device::{DType, Device};
use crate::error::{Error, Result};
use crate::kernels::params::{ArgmaxParams, SampleParams};
use crate::launch::LaunchConfig;
use crate::tensor::Tensor;

/// Most threads per block of the kernels (their `__launch_bounds__`).
const THREADS: u32 = 512;

/// The id the sampling kernel writes for a row it cannot sample.
const INVALID: u32 = u32::MAX;

/// Checks logits [rows, vocab] (float, non-empty, aligned); returns (rows, vocab).
fn check_logits(op: &'static str, logits: &Tensor) -> Result<(usize, usize)> {
    check_float(op, "logits", logits)?;
    let &[rows, vocab] = logits.shape() else {
        return Err(Error::Shape {
            op,
            arg: "logits",
            expected: "[rows, vocab]".into(),
            got: logits.shape().to_vec(),
        });
    };
    check_nonempty(op, "logits", logits)?;
    check_aligned(op, "logits", logits)?;
    to_i32(op, "logits", rows)?;
    to_i32(op, "logits", vocab)?;
    Ok((rows, vocab))
}

/// Per-access elements and grid of a one-block-per-row kernel over `logits`.
fn row_launch(logits: &Tensor, rows: usize, vocab: usize) -> (bool, LaunchConfig) {
    let vectorized = vectorizable(&[logits], vocab * logits.dtype().size());
    let per_access = if vectorized {
        16 / logits.dtype().size()
    } else {
        1
    };
    let cfg = LaunchConfig::linear(rows as u32, threads_for_row(vocab, per_access, THREADS), 0);
    (vectorized, cfg)
}

/// The first index of the largest logit of each row (greedy decoding).
/// Ties go to the lowest index; NaN counts as larger than every number, so
/// a row's first NaN wins (torch.argmax's rule); −0 and +0 are equal.
pub fn argmax(logits: &Tensor) -> Result<Vec<u32>> {
    const OP: &str = "sampling::argmax";
    let (rows, vocab) = check_logits(OP, logits)?;
    let device = logits.device();
    if let Device::Cpu = device {
        let z = logits.to_f32_vec()?;
        return Ok(z.chunks_exact(vocab).map(cpu::sampling::argmax).collect());
    }
    let ids = Tensor::zeros(&[rows], DType::U32, device)?;
    let (vectorized, cfg) = row_launch(logits, rows, vocab);
    let mut params = ArgmaxParams {
        logits: logits.device_address() as *const _,
        ids: ids.device_address() as *mut u32,
        rows: rows as i32,
        vocab: vocab as i32,
        vectorized: vectorized as i32,
        pad0: 0,
    };
    device.launch(
        &format!("argmax_{}", logits.dtype().kernel_suffix()),
        cfg,
        &mut params,
    )?;
    ids.to_vec::<u32>()
}

/// One token per row drawn from softmax(logits / `temperature`) restricted
/// to the top-`top_p` nucleus, with `uniforms[r]` in [0, 1) the draw of
/// row r (see the module doc for the exact definition). `temperature` must
/// be finite and > 0 (greedy decoding is [`argmax`]), `top_p` in (0, 1].
/// A row with a NaN or +inf logit, or none above −inf, is an error.
pub fn sample(logits: &Tensor, temperature: f32, top_p: f32, uniforms: &[f64]) -> Result<Vec<u32>> {
    const OP: &str = "sampling::sample";
    let (rows, vocab) = check_logits(OP, logits)?;
    let invalid = |arg, what: String| Error::Invalid { op: OP, arg, what };
    if !(temperature.is_finite() && temperature > 0.0) {
        return Err(invalid(
            "temperature",
            format!(
                "{temperature} is not a finite value > 0 (greedy decoding is sampling::argmax)"
            ),
        ));
    }
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(invalid("top_p", format!("{top_p} is not in (0, 1]")));
    }
    if uniforms.len() != rows {
        return Err(invalid(
            "uniforms",
            format!("has {} values for {rows} rows", uniforms.len()),
        ));
    }
    if let Some((i, u)) = uniforms
        .iter()
        .enumerate()
        .find(|(_, u)| !(0.0..1.0).contains(*u))
    {
        return Err(invalid(
            "uniforms",
            format!("uniforms[{i}] = {u} is not in [0, 1)"),
        ));
    }
    let device = logits.device();
    let ids = if let Device::Cpu = device {
        let z = logits.to_f32_vec()?;
        z.chunks_exact(vocab)
            .zip(uniforms)
            .map(|(row, &u)| cpu::sampling::sample(row, temperature, top_p, u).unwrap_or(INVALID))
            .collect()
    } else {
        // The draws travel as their f64 bits (the kernel reads doubles).
        let bits: Vec<i64> = uniforms.iter().map(|u| u.to_bits() as i64).collect();
        let u = Tensor::from_slice(&bits, &[rows], device)?;
        let ids = Tensor::zeros(&[rows], DType::U32, device)?;
        let (vectorized, cfg) = row_launch(logits, rows, vocab);
        let mut params = SampleParams {
            logits: logits.device_address() as *const _,
            uniforms: u.device_address() as *const f64,
            ids: ids.device_address() as *mut u32,
            rows: rows as i32,
            vocab: vocab as i32,
            temperature,
            top_p,
            vectorized: vectorized as i32,
            pad0: 0,
        };
        device.launch(
            &format!("sample_{}", logits.dtype().kernel_suffix()),
            cfg,
            &mut params,
        )?;
        ids.to_vec::<u32>()?
    };
    if let Some(r) = ids.iter().position(|&id| id == INVALID) {
        return Err(invalid(
            "logits",
            format!("row {r} has a NaN or +inf logit, or none above -inf: nothing to sample"),
        ));
    }
    Ok(ids)
}
