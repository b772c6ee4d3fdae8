//! The optimizer side of a training step: the learning-rate schedules of
//! transformers (`get_scheduler`), global-norm clipping as torch's
//! `clip_grad_norm_`, and AdamW ([`crate::ops::adamw`]) over every LoRA factor
//! of the model.

use std::f64::consts::PI;

use super::LoraGrads;
use crate::llama::Llama;
use crate::ops::adamw::{self, AdamW, State};
use crate::{Error, Result, Tensor};

/// How the learning rate moves over the run (transformers' `SchedulerType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum Scheduler {
    /// Linear warmup, then half a cosine down to 0 at the last step
    /// (`get_cosine_schedule_with_warmup`).
    Cosine,
    /// Linear warmup, then linear decay to 0 at the last step.
    Linear,
    /// Linear warmup, then constant.
    Constant,
}

/// The schedule of one run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    /// Peak learning rate.
    pub lr: f64,
    /// Steps of linear warmup from 0.
    pub warmup: u64,
    /// Optimizer steps of the whole run.
    pub total: u64,
    /// The shape after warmup.
    pub kind: Scheduler,
}

impl Schedule {
    /// The learning rate of optimizer step `step` (0-based), as transformers'
    /// LambdaLR gives it: its first step uses lr · λ(0), 0 under warmup.
    pub fn lr_at(&self, step: u64) -> f64 {
        if step < self.warmup {
            return self.lr * step as f64 / self.warmup.max(1) as f64;
        }
        let after = (step - self.warmup) as f64;
        let span = self.total.saturating_sub(self.warmup).max(1) as f64;
        let factor = match self.kind {
            Scheduler::Cosine => (0.5 * (1.0 + (PI * after / span).cos())).max(0.0),
            Scheduler::Linear => ((span - after) / span).max(0.0),
            Scheduler::Constant => 1.0,
        };
        self.lr * factor
    }
}

/// What one optimizer step did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepStats {
    /// Learning rate used.
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
}

/// AdamW with its state over every LoRA factor of a model, a schedule and
/// clipping.
#[derive(Debug)]
pub struct Optimizer {
    /// Betas, eps, weight decay.
    pub adamw: AdamW,
    /// Moments and steps taken.
    pub state: State,
    /// The learning-rate schedule.
    pub schedule: Schedule,
    /// Clip the global gradient norm to this; 0 turns clipping off.
    pub max_grad_norm: f64,
}

impl Optimizer {
    /// Zero moments for every factor attached to `model`.
    pub fn new(
        model: &Llama,
        adamw: AdamW,
        schedule: Schedule,
        max_grad_norm: f64,
    ) -> Result<Optimizer> {
        let params: Vec<&Tensor> = model
            .lora_factors()
            .into_iter()
            .flat_map(|(_, f)| [&f.a, &f.b])
            .collect();
        Ok(Optimizer {
            adamw,
            state: State::new(&params)?,
            schedule,
            max_grad_norm,
        })
    }

    /// One step on `model`'s factors from `grads` (summed over the global
    /// batch, already scaled to the mean): clip, then AdamW at the
    /// schedule's learning rate.
    pub fn step(&mut self, model: &mut Llama, grads: &LoraGrads) -> Result<StepStats> {
        let mut factors = model.lora_factors_mut();
        let keys: Vec<_> = factors.iter().map(|(k, _)| *k).collect();
        let grad_keys: Vec<_> = grads.factors.keys().copied().collect();
        if keys != grad_keys {
            return Err(Error::Invalid {
                op: "Optimizer::step",
                arg: "grads",
                what: format!(
                    "has gradients for {} (layer, module) pairs, the model {} adapted ones, or they differ",
                    grad_keys.len(),
                    keys.len()
                ),
            });
        }
        let g: Vec<&Tensor> = grads.factors.values().flat_map(|(a, b)| [a, b]).collect();
        let grad_norm = adamw::global_norm(&g)?;
        let clip = crate::cpu::adamw::clip_factor(grad_norm, self.max_grad_norm);
        let lr = self.schedule.lr_at(self.state.step);
        let mut params: Vec<&mut Tensor> = factors
            .iter_mut()
            .flat_map(|(_, f)| [&mut f.a, &mut f.b])
            .collect();
        adamw::step(
            &mut params,
            &g,
            &mut self.state,
            &self.adamw,
            lr as f32,
            clip as f32,
        )?;
        Ok(StepStats { lr, grad_norm })
    }
}
