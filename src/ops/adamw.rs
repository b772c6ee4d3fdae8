//! AdamW over all trainable tensors at once (torch.optim.AdamW's update,
//! decoupled weight decay, bias correction), with the global gradient norm
//! that `--max-grad-norm` clips by.
//!
//! On the kernel devices `kernels/adamw.cu` runs one block per chunk of at
//! most [`CHUNK`] elements of any tensor (a multi-tensor launch: two
//! launches per step whatever the number of tensors); the norm's per-chunk
//! partial sums are added on the host in f64, in chunk order. On
//! [`Device::Cpu`] the same fp32 arithmetic runs on rayon threads.
//!
//! Reference: [`crate::cpu::adamw`].

use rayon::prelude::*;

use super::{check_device, check_dtype, check_shape};
use crate::kernels::params::AdamWParams;
use crate::launch::LaunchConfig;
use crate::{DType, Device, Error, Result, Tensor};

/// Elements per chunk (one block each) on the kernel devices.
pub const CHUNK: usize = 1 << 16;

/// Threads per block (the kernels' `__launch_bounds__`).
const THREADS: u32 = 256;

/// AdamW's fixed hyper-parameters (the learning rate comes per step).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamW {
    /// First-moment decay (torch: 0.9).
    pub beta1: f32,
    /// Second-moment decay (torch: 0.999).
    pub beta2: f32,
    /// Denominator term (torch: 1e-8).
    pub eps: f32,
    /// Decoupled weight decay (torch: 0.01; HF Trainer: 0).
    pub weight_decay: f32,
}

impl Default for AdamW {
    /// torch.optim.AdamW's defaults.
    fn default() -> Self {
        AdamW {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

/// The moments of every parameter (fp32, like it) and the steps taken.
#[derive(Debug)]
pub struct State {
    /// First moments.
    pub m: Vec<Tensor>,
    /// Second moments.
    pub v: Vec<Tensor>,
    /// Steps taken so far (bias correction uses step + 1 next).
    pub step: u64,
}

impl State {
    /// Zero moments for `params`, no step taken.
    pub fn new(params: &[&Tensor]) -> Result<State> {
        let zeros = || -> Result<Vec<Tensor>> {
            params
                .iter()
                .map(|p| Tensor::zeros(p.shape(), DType::F32, p.device()))
                .collect()
        };
        Ok(State {
            m: zeros()?,
            v: zeros()?,
            step: 0,
        })
    }
}

/// sqrt(Σ g²) over every element of every tensor of `grads` (fp32).
pub fn global_norm(grads: &[&Tensor]) -> Result<f64> {
    const OP: &str = "adamw::global_norm";
    let Some(first) = grads.first() else {
        return Ok(0.0);
    };
    let device = first.device().clone();
    for g in grads {
        check_dtype(OP, "grads", g, DType::F32)?;
        check_device(OP, "grads", g, &device)?;
    }
    if let Device::Cpu = device {
        let sum: f64 = grads
            .iter()
            .map(|g| -> Result<f64> {
                let values = crate::host::view::f32s(OP, "grads", g)?;
                Ok(values
                    .par_chunks(CHUNK)
                    .map(|c| c.iter().map(|&x| x as f64 * x as f64).sum::<f64>())
                    .collect::<Vec<_>>()
                    .into_iter()
                    .sum())
            })
            .sum::<Result<f64>>()?;
        return Ok(sum.sqrt());
    }
    let table = chunk_table(grads.iter().map(|&g| [g, g, g, g]))?;
    let blocks = table.shape()[0];
    let partial = Tensor::zeros(&[blocks], DType::F32, &device)?;
    let mut p = kernel_params(&table, &partial, &AdamW::default(), 0.0, 1, 1.0);
    launch(&device, "adamw_sumsq", blocks, &mut p)?;
    let sum: f64 = partial.to_vec::<f32>()?.iter().map(|&s| s as f64).sum();
    Ok(sum.sqrt())
}

/// acc[i] += grads[i] for every pair (fp32, same shapes): gradient
/// accumulation over micro-batches, one launch for all tensors.
pub fn accumulate(acc: &mut [&mut Tensor], grads: &[&Tensor]) -> Result<()> {
    const OP: &str = "adamw::accumulate";
    if acc.len() != grads.len() {
        return Err(Error::Invalid {
            op: OP,
            arg: "grads",
            what: format!("{} tensors for {} accumulators", grads.len(), acc.len()),
        });
    }
    let Some(first) = acc.first() else {
        return Ok(());
    };
    let device = first.device().clone();
    for (a, g) in acc.iter().zip(grads) {
        check_dtype(OP, "acc", a, DType::F32)?;
        check_device(OP, "acc", a, &device)?;
        check_shape(OP, "grads", g, a.shape())?;
        check_dtype(OP, "grads", g, DType::F32)?;
        check_device(OP, "grads", g, &device)?;
    }
    if let Device::Cpu = device {
        for (a, g) in acc.iter_mut().zip(grads) {
            let g = crate::host::view::f32s(OP, "grads", g)?;
            crate::host::elementwise::add(crate::host::view::f32s_mut(OP, "acc", a)?, g);
        }
        return Ok(());
    }
    let table = chunk_table(acc.iter().zip(grads).map(|(a, g)| [&**a, g, g, g]))?;
    let blocks = table.shape()[0];
    let none = Tensor::zeros(&[1], DType::F32, &device)?;
    let mut p = kernel_params(&table, &none, &AdamW::default(), 0.0, 1, 1.0);
    launch(&device, "adamw_accumulate", blocks, &mut p)
}

/// One AdamW step with learning rate `lr` on every `params[i]` (fp32) from
/// `grads[i] · clip` (`clip` the global-norm factor, 1 when off), updating
/// `state`. `lr`, `clip`, `cfg.eps` and `cfg.weight_decay` must be finite
/// and ≥ 0, the betas in [0, 1); a rejected call changes nothing.
pub fn step(
    params: &mut [&mut Tensor],
    grads: &[&Tensor],
    state: &mut State,
    cfg: &AdamW,
    lr: f32,
    clip: f32,
) -> Result<()> {
    const OP: &str = "adamw::step";
    if grads.len() != params.len() || state.m.len() != params.len() || state.v.len() != params.len()
    {
        return Err(Error::Invalid {
            op: OP,
            arg: "grads",
            what: format!(
                "{} params, {} grads and {}/{} moments: expected one of each per param",
                params.len(),
                grads.len(),
                state.m.len(),
                state.v.len()
            ),
        });
    }
    for (arg, value) in [
        ("lr", lr),
        ("clip", clip),
        ("cfg.eps", cfg.eps),
        ("cfg.weight_decay", cfg.weight_decay),
    ] {
        if !value.is_finite() || value < 0.0 {
            return Err(Error::Invalid {
                op: OP,
                arg,
                what: format!("{value} is not a finite value >= 0"),
            });
        }
    }
    for (arg, beta) in [("cfg.beta1", cfg.beta1), ("cfg.beta2", cfg.beta2)] {
        if !(0.0..1.0).contains(&beta) {
            return Err(Error::Invalid {
                op: OP,
                arg,
                what: format!("{beta} is not in [0, 1)"),
            });
        }
    }
    let Some(first) = params.first() else {
        state.step += 1;
        return Ok(());
    };
    let device = first.device().clone();
    for (i, p) in params.iter().enumerate() {
        check_dtype(OP, "params", p, DType::F32)?;
        check_device(OP, "params", p, &device)?;
        for (arg, t) in [
            ("grads", grads[i]),
            ("state.m", &state.m[i]),
            ("state.v", &state.v[i]),
        ] {
            check_shape(OP, arg, t, p.shape())?;
            check_dtype(OP, arg, t, DType::F32)?;
            check_device(OP, arg, t, &device)?;
        }
    }
    let t = state.step + 1;
    if let Device::Cpu = device {
        let c = Coefficients::new(cfg, lr, t, clip);
        for (i, p) in params.iter_mut().enumerate() {
            let (m, v) = (&mut state.m[i], &mut state.v[i]);
            let pv = crate::host::view::f32s_mut(OP, "params", p)?;
            let g = crate::host::view::f32s(OP, "grads", grads[i])?;
            let mv = crate::host::view::f32s_mut(OP, "state.m", m)?;
            let vv = crate::host::view::f32s_mut(OP, "state.v", v)?;
            pv.par_chunks_mut(CHUNK)
                .zip(g.par_chunks(CHUNK))
                .zip(mv.par_chunks_mut(CHUNK).zip(vv.par_chunks_mut(CHUNK)))
                .for_each(|((p, g), (m, v))| {
                    for e in 0..p.len() {
                        c.update(&mut p[e], g[e], &mut m[e], &mut v[e]);
                    }
                });
        }
        state.step = t;
        return Ok(());
    }
    let table = chunk_table(
        params
            .iter()
            .zip(grads)
            .zip(state.m.iter().zip(&state.v))
            .map(|((p, g), (m, v))| [&**p, g, m, v]),
    )?;
    let blocks = table.shape()[0];
    let none = Tensor::zeros(&[1], DType::F32, &device)?;
    let mut p = kernel_params(&table, &none, cfg, lr, t, clip);
    launch(&device, "adamw_step", blocks, &mut p)?;
    state.step = t;
    Ok(())
}

/// The per-step constants of the update, in fp32 as the kernel takes them.
struct Coefficients {
    beta1: f32,
    beta2: f32,
    eps: f32,
    decay: f32,
    step_size: f32,
    bias_correction2_sqrt: f32,
    clip: f32,
}

impl Coefficients {
    fn new(cfg: &AdamW, lr: f32, t: u64, clip: f32) -> Coefficients {
        let bc1 = 1.0 - (cfg.beta1 as f64).powi(t as i32);
        let bc2 = 1.0 - (cfg.beta2 as f64).powi(t as i32);
        Coefficients {
            beta1: cfg.beta1,
            beta2: cfg.beta2,
            eps: cfg.eps,
            decay: 1.0 - lr * cfg.weight_decay,
            step_size: (lr as f64 / bc1) as f32,
            bias_correction2_sqrt: bc2.sqrt() as f32,
            clip,
        }
    }

    /// The kernel's update of one element.
    fn update(&self, w: &mut f32, g: f32, m: &mut f32, v: &mut f32) {
        let g = self.clip * g;
        *w *= self.decay;
        *m += (1.0 - self.beta1) * (g - *m);
        *v = self.beta2 * *v + (1.0 - self.beta2) * g * g;
        let denom = v.sqrt() / self.bias_correction2_sqrt + self.eps;
        *w -= self.step_size * (*m / denom);
    }
}

fn kernel_params(
    table: &Tensor,
    partial: &Tensor,
    cfg: &AdamW,
    lr: f32,
    t: u64,
    clip: f32,
) -> AdamWParams {
    let c = Coefficients::new(cfg, lr, t, clip);
    AdamWParams {
        chunks: table.device_address() as *const _,
        partial: partial.device_address() as *mut f32,
        beta1: c.beta1,
        beta2: c.beta2,
        eps: c.eps,
        decay: c.decay,
        step_size: c.step_size,
        bias_correction2_sqrt: c.bias_correction2_sqrt,
        clip: c.clip,
        pad0: 0,
    }
}

/// The AdamWChunk table on the device: for every tensor group [param, grad,
/// m, v] (same element count), one row of (four addresses, n) per CHUNK.
fn chunk_table<'a>(groups: impl Iterator<Item = [&'a Tensor; 4]>) -> Result<Tensor> {
    let mut rows: Vec<i64> = Vec::new();
    let mut device = None;
    for group in groups {
        device.get_or_insert_with(|| group[0].device().clone());
        let n = group[0].elem_count();
        for start in (0..n).step_by(CHUNK) {
            for t in group {
                rows.push((t.device_address() + 4 * start as u64) as i64);
            }
            rows.push(CHUNK.min(n - start) as i64);
        }
    }
    let device = device.expect("at least one tensor");
    let chunks = rows.len() / 5;
    if chunks == 0 {
        rows.extend([0; 5]);
    }
    Tensor::from_slice(&rows, &[chunks.max(1), 5], &device)
}

fn launch(device: &Device, kernel: &str, blocks: usize, p: &mut AdamWParams) -> Result<()> {
    let blocks = u32::try_from(blocks).map_err(|_| Error::Invalid {
        op: "adamw",
        arg: "params",
        what: format!("{blocks} chunks are too many for one launch"),
    })?;
    device.launch(kernel, LaunchConfig::linear(blocks, THREADS, 0), p)
}
