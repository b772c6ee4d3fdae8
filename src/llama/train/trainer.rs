//! The training loop of `platypus train`: what Platypus' `finetune.py` does
//! with transformers' Trainer + PEFT, on [`Llama::forward_backward`] and
//! [`Optimizer`].
//!
//! A run visits its rows in a seeded order per epoch; each optimizer step
//! takes the next `per_device_batch_size × gradient_accumulation_steps`
//! rows as micro-batches (padded, or packed into one row each), scales
//! every micro-batch's loss by 1 / (counted tokens of the whole step), as
//! the HF Trainer's `num_items_in_batch` does, accumulates the gradients,
//! clips and steps AdamW at the schedule's learning rate. Every step is a
//! line of `log.jsonl`; every `save_steps` steps a checkpoint folder holds
//! the adapter (PEFT format), AdamW's moments and `trainer_state.json` (the
//! step, the config, the data's fingerprint), written under a temporary name
//! and renamed (a kill leaves the previous checkpoints and at most an
//! ignored temporary). Nothing else is state: the data order and every
//! dropout mask are functions of (seed, step), so a resumed run recomputes
//! them and, on [`Device::Cpu`], ends with the adapter an uninterrupted run
//! ends with, bit for bit.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::batches::{epoch_order, MicroBatch};
use super::memory::{self, MemoryEstimate};
use super::optim::{Optimizer, Schedule, Scheduler};
use super::LoraGrads;
use crate::formats::safetensors::{self as st, SafetensorsFile, TensorBytes};
use crate::llama::adapter::peft_key;
use crate::llama::data::Example;
use crate::llama::init::random_adapter;
use crate::llama::{Adapter, AdapterConfig, Llama, Module};
use crate::ops::adamw::AdamW;
use crate::output::Outputs;
use crate::{Device, Error, Result, Tensor};

/// The hyper-parameters of a run, named after transformers'
/// TrainingArguments and PEFT's LoraConfig.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Peak learning rate.
    pub learning_rate: f64,
    /// LoRA rank.
    pub lora_r: usize,
    /// LoRA alpha.
    pub lora_alpha: f32,
    /// Dropout on the adapters' input.
    pub lora_dropout: f32,
    /// Adapted projections.
    pub target_modules: Vec<Module>,
    /// Scale alpha / √r.
    pub use_rslora: bool,
    /// Steps of linear warmup.
    pub warmup_steps: u64,
    /// The schedule after warmup.
    pub lr_scheduler: Scheduler,
    /// AdamW's decoupled weight decay.
    pub weight_decay: f32,
    /// Global-norm clipping; 0 turns it off.
    pub max_grad_norm: f64,
    /// Rows per micro-batch.
    pub per_device_batch_size: usize,
    /// Micro-batches per optimizer step.
    pub gradient_accumulation_steps: usize,
    /// Passes over the data (unless `max_steps`).
    pub num_epochs: u64,
    /// Optimizer steps of the run, overriding `num_epochs`.
    pub max_steps: Option<u64>,
    /// Rows are cut to this many tokens.
    pub cutoff_len: usize,
    /// Seed of the data order, the adapter's init and dropout.
    pub seed: u64,
    /// Save a checkpoint every this many steps (0: none).
    pub save_steps: u64,
    /// Keep only the newest this many checkpoints.
    pub save_total_limit: Option<usize>,
    /// Pack each micro-batch's rows into one row.
    pub packing: bool,
    /// Keep the prompt's labels.
    pub train_on_inputs: bool,
    /// Recompute each layer's activations in backward.
    pub gradient_checkpointing: bool,
    /// AdamW beta1.
    pub adam_beta1: f32,
    /// AdamW beta2.
    pub adam_beta2: f32,
    /// AdamW epsilon.
    pub adam_epsilon: f32,
}

impl Default for TrainConfig {
    /// Platypus2's run: LoRA r 16, alpha 16, dropout 0.05 on gate/up/down,
    /// lr 4e-4 with 100 warmup steps then cosine, global batch 16 of
    /// micro-batch 1, cutoff 4096, one epoch; torch's AdamW betas and eps,
    /// no weight decay, clipping at 1 (transformers' defaults).
    fn default() -> Self {
        TrainConfig {
            learning_rate: 4e-4,
            lora_r: 16,
            lora_alpha: 16.0,
            lora_dropout: 0.05,
            target_modules: vec![Module::Gate, Module::Up, Module::Down],
            use_rslora: false,
            warmup_steps: 100,
            lr_scheduler: Scheduler::Cosine,
            weight_decay: 0.0,
            max_grad_norm: 1.0,
            per_device_batch_size: 1,
            gradient_accumulation_steps: 16,
            num_epochs: 1,
            max_steps: None,
            cutoff_len: 4096,
            seed: 0,
            save_steps: 0,
            save_total_limit: None,
            packing: false,
            train_on_inputs: false,
            gradient_checkpointing: false,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_epsilon: 1e-8,
        }
    }
}

impl TrainConfig {
    /// Sets every adapter's dropout for micro-batch `index` of the run: its
    /// own Philox counters per (micro-batch, layer, module), keyed by the
    /// seed, so a resumed run draws the same masks.
    pub fn set_dropout(&self, model: &mut Llama, index: u64) {
        for ((layer, module), f) in model.lora_factors_mut() {
            f.config.dropout = self.lora_dropout;
            f.config.seed = self.seed;
            f.config.offset = (index << 42) | (((layer * 7 + module as usize) as u64) << 32);
        }
    }

    /// Rows per optimizer step.
    pub fn global_batch(&self) -> usize {
        self.per_device_batch_size * self.gradient_accumulation_steps
    }

    /// Optimizer steps of a run over `rows` rows.
    pub fn total_steps(&self, rows: usize) -> u64 {
        let per_epoch = rows.div_ceil(self.global_batch()) as u64;
        self.max_steps.unwrap_or(self.num_epochs * per_epoch)
    }

    /// The adapter this config trains.
    pub fn adapter_config(&self, base_model: Option<String>) -> AdapterConfig {
        AdapterConfig {
            r: self.lora_r,
            alpha: self.lora_alpha,
            use_rslora: self.use_rslora,
            dropout: self.lora_dropout,
            targets: self.target_modules.clone(),
            base_model,
        }
    }

    /// What is wrong with it, if anything.
    fn check(&self) -> Result<()> {
        let bad = |arg: &'static str, what: String| {
            Err(Error::Invalid {
                op: "train",
                arg,
                what,
            })
        };
        if !(self.learning_rate.is_finite() && self.learning_rate >= 0.0) {
            return bad(
                "learning_rate",
                format!("{} is not a finite value >= 0", self.learning_rate),
            );
        }
        if self.lora_r == 0 {
            return bad("lora_r", "is 0; the rank is at least 1".into());
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return bad(
                "lora_dropout",
                format!("{} is not in [0, 1)", self.lora_dropout),
            );
        }
        if self.target_modules.is_empty() {
            return bad(
                "target_modules",
                "is empty; name at least one projection".into(),
            );
        }
        if self.per_device_batch_size == 0 || self.gradient_accumulation_steps == 0 {
            return bad(
                "per_device_batch_size",
                format!(
                    "{} rows × {} accumulation steps: both must be at least 1",
                    self.per_device_batch_size, self.gradient_accumulation_steps
                ),
            );
        }
        if self.max_steps.is_none() && self.num_epochs == 0 {
            return bad(
                "num_epochs",
                "is 0 and no max_steps is given: nothing to train".into(),
            );
        }
        if self.max_steps == Some(0) {
            return bad("max_steps", "is 0: nothing to train".into());
        }
        if self.cutoff_len == 0 {
            return bad("cutoff_len", "is 0; rows need at least one token".into());
        }
        if !(self.max_grad_norm.is_finite() && self.max_grad_norm >= 0.0) {
            return bad(
                "max_grad_norm",
                format!("{} is not a finite value >= 0", self.max_grad_norm),
            );
        }
        if self.save_total_limit == Some(0) {
            return bad(
                "save_total_limit",
                "is 0; keep at least one checkpoint".into(),
            );
        }
        Ok(())
    }
}

/// Which checkpoint a run resumes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resume {
    /// The newest in the output folder (none yet: from the start).
    Latest,
    /// This checkpoint folder.
    From(PathBuf),
}

/// A run to do.
#[derive(Debug)]
pub struct Run<'a> {
    /// The base model folder.
    pub model_dir: &'a Path,
    /// Tokenized rows.
    pub data: &'a [Example],
    /// Pad id of padded micro-batches.
    pub pad_id: u32,
    /// The output folder: checkpoints, log.jsonl, loss.png, adapter/.
    pub out: &'a Path,
    /// Hyper-parameters.
    pub config: TrainConfig,
    /// Start from this adapter instead of PEFT's init.
    pub adapter_init: Option<&'a Path>,
    /// The adapter's `base_model_name_or_path` (default: `model_dir`).
    pub base_model_name: Option<String>,
    /// Continue an interrupted run.
    pub resume: Option<Resume>,
    /// Where to train.
    pub device: Device,
}

/// One optimizer step as `log.jsonl` records it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepLog {
    /// Steps done (1-based).
    pub step: u64,
    /// Epochs done, fractional.
    pub epoch: f64,
    /// Mean loss over the step's counted tokens.
    pub loss: f64,
    /// Learning rate used.
    pub learning_rate: f64,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
    /// Real tokens of the step.
    pub tokens: usize,
    /// Tokens the loss counted.
    pub counted: usize,
    /// Real tokens per second of the step (forward, backward, optimizer).
    pub tokens_per_s: f64,
}

/// What a finished run did.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// Optimizer steps of the run.
    pub steps: u64,
    /// The step it resumed after (0: a fresh start).
    pub resumed_at: u64,
    /// Loss of the last step.
    pub final_loss: f64,
    /// Real tokens trained on in this process.
    pub tokens: usize,
    /// Seconds this process trained.
    pub seconds: f64,
    /// The memory estimate it checked.
    pub memory: MemoryEstimate,
    /// The final adapter.
    pub adapter: PathBuf,
    /// The step log.
    pub log: PathBuf,
    /// The loss curve.
    pub loss_png: PathBuf,
}

/// What `trainer_state.json` holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct TrainerState {
    step: u64,
    total_steps: u64,
    rows: usize,
    data_fingerprint: String,
    config: TrainConfig,
}

/// The checkpoint file names.
const STATE_NAME: &str = "trainer_state.json";
const OPTIMIZER_NAME: &str = "optimizer.safetensors";
const LOG_NAME: &str = "log.jsonl";

/// Trains as `run` says; `on_step` sees every step's log line as it is
/// written (the progress bar).
pub fn train(run: Run<'_>, on_step: &mut dyn FnMut(&StepLog, u64)) -> Result<Summary> {
    let cfg = &run.config;
    cfg.check()?;
    if run.data.is_empty() {
        return Err(Error::Invalid {
            op: "train",
            arg: "data",
            what: "has no rows".into(),
        });
    }
    let total = cfg.total_steps(run.data.len());
    let fingerprint = fingerprint(run.data);
    let resume_from = prepare_out(&run)?;
    let mut model = Llama::load(run.model_dir, &run.device)?;
    let base_name = run
        .base_model_name
        .clone()
        .unwrap_or_else(|| run.model_dir.display().to_string());
    let adapter_config = cfg.adapter_config(Some(base_name));
    let longest = run
        .data
        .iter()
        .map(|e| e.input_ids.len())
        .max()
        .unwrap_or(0);
    let (rows, seq) = if cfg.packing {
        (1, longest * cfg.per_device_batch_size)
    } else {
        (cfg.per_device_batch_size, longest)
    };
    let estimate = memory::estimate(
        &model.config,
        &adapter_config,
        rows,
        seq,
        model.dtype.size(),
        cfg.gradient_checkpointing,
    );
    if let Some((free, _)) = run.device.memory_info()? {
        if estimate.total > free as u64 {
            return Err(Error::Invalid {
                op: "train",
                arg: "per_device_batch_size",
                what: format!(
                    "the run needs about {estimate}, and the device has {:.2} GiB free: lower the micro-batch or --cutoff-len, or pass --gradient-checkpointing",
                    free as f64 / (1u64 << 30) as f64
                ),
            });
        }
    }
    let schedule = Schedule {
        lr: cfg.learning_rate,
        warmup: cfg.warmup_steps,
        total,
        kind: cfg.lr_scheduler,
    };
    let adamw = AdamW {
        beta1: cfg.adam_beta1,
        beta2: cfg.adam_beta2,
        eps: cfg.adam_epsilon,
        weight_decay: cfg.weight_decay,
    };
    let mut start = 0;
    let mut optimizer;
    match &resume_from {
        Some(dir) => {
            let state = read_state(dir)?;
            check_resumable(dir, &state, cfg, run.data.len(), &fingerprint)?;
            let adapter = Adapter::load(&dir.join("adapter"), &model.config)?;
            model.attach(&adapter)?;
            optimizer = Optimizer::new(&model, adamw, schedule, cfg.max_grad_norm)?;
            load_moments(dir, &model, &mut optimizer)?;
            optimizer.state.step = state.step;
            start = state.step;
            truncate_log(run.out, start)?;
        }
        None => {
            let adapter = match run.adapter_init {
                Some(dir) => {
                    let mut a = Adapter::load(dir, &model.config)?;
                    a.config = adapter_config.clone();
                    a
                }
                None => random_adapter(&model.config, adapter_config.clone(), cfg.seed, false),
            };
            model.attach(&adapter)?;
            optimizer = Optimizer::new(&model, adamw, schedule, cfg.max_grad_norm)?;
            fs::create_dir_all(run.out).map_err(|e| out_error(run.out, e))?;
            truncate_log(run.out, 0)?;
        }
    }
    let log_path = run.out.join(LOG_NAME);
    let mut log = fs::OpenOptions::new()
        .append(true)
        .open(&log_path)
        .map_err(|e| out_error(&log_path, e))?;
    let began = Instant::now();
    let mut trained = 0usize;
    let mut last_loss = f64::NAN;
    for step in start..total {
        let t0 = Instant::now();
        let micro = micro_batches(&run, step);
        let counted: usize = micro.iter().map(MicroBatch::counted).sum();
        let scale = 1.0 / counted.max(1) as f32;
        let mut grads: Option<LoraGrads> = None;
        let mut loss_sum = 0.0;
        let mut tokens = 0;
        for (m, batch) in micro.iter().enumerate() {
            cfg.set_dropout(
                &mut model,
                step * cfg.gradient_accumulation_steps as u64 + m as u64,
            );
            let (ce, g) =
                model.forward_backward(&batch.step(), scale, cfg.gradient_checkpointing)?;
            loss_sum += ce.loss_sum;
            tokens += batch.tokens();
            match &mut grads {
                None => grads = Some(g),
                Some(acc) => acc.accumulate(&g)?,
            }
        }
        let stats = optimizer.step(&mut model, &grads.expect("at least one micro-batch"))?;
        model.device.synchronize()?;
        let seconds = t0.elapsed().as_secs_f64();
        trained += tokens;
        last_loss = loss_sum / counted.max(1) as f64;
        let line = StepLog {
            step: step + 1,
            epoch: (step + 1) as f64 * cfg.global_batch() as f64 / run.data.len() as f64,
            loss: last_loss,
            learning_rate: stats.lr,
            grad_norm: stats.grad_norm,
            tokens,
            counted,
            tokens_per_s: tokens as f64 / seconds,
        };
        let text = serde_json::to_string(&line).expect("JSON") + "\n";
        log.write_all(text.as_bytes())
            .and_then(|_| log.flush())
            .map_err(|e| out_error(&log_path, e))?;
        on_step(&line, total);
        let save_now = cfg.save_steps > 0 && (step + 1) % cfg.save_steps == 0;
        if save_now || (step + 1 == total && cfg.save_steps > 0) {
            let state = TrainerState {
                step: step + 1,
                total_steps: total,
                rows: run.data.len(),
                data_fingerprint: fingerprint.clone(),
                config: cfg.clone(),
            };
            save_checkpoint(run.out, &model, &adapter_config, &optimizer, &state)?;
        }
    }
    let adapter_dir = run.out.join("adapter");
    if !adapter_dir.exists() {
        model
            .adapter(&adapter_config)?
            .save(&adapter_dir, &Outputs::default())?;
    }
    let png = run.out.join("loss.png");
    write_loss_png(&log_path, &png)?;
    Ok(Summary {
        steps: total,
        resumed_at: start,
        final_loss: last_loss,
        tokens: trained,
        seconds: began.elapsed().as_secs_f64(),
        memory: estimate,
        adapter: adapter_dir,
        log: log_path,
        loss_png: png,
    })
}

fn out_error(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Output {
        path: path.to_path_buf(),
        what: e.to_string(),
    }
}

/// The micro-batches of optimizer step `step` (0-based).
fn micro_batches(run: &Run<'_>, step: u64) -> Vec<MicroBatch> {
    let cfg = &run.config;
    let n = run.data.len();
    let global = cfg.global_batch();
    let per_epoch = n.div_ceil(global) as u64;
    let (epoch, within) = (step / per_epoch, (step % per_epoch) as usize);
    let order = epoch_order(n, cfg.seed, epoch);
    let rows = &order[within * global..((within + 1) * global).min(n)];
    rows.chunks(cfg.per_device_batch_size)
        .map(|chunk| {
            let examples: Vec<&Example> = chunk.iter().map(|&i| &run.data[i]).collect();
            if cfg.packing {
                MicroBatch::packed(&examples)
            } else {
                MicroBatch::padded(&examples, run.pad_id)
            }
        })
        .collect()
}

/// A hash of every row (FNV-1a over ids, labels and masks).
fn fingerprint(data: &[Example]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |v: u64| {
        for b in v.to_le_bytes() {
            h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
        }
    };
    for e in data {
        eat(e.input_ids.len() as u64);
        e.input_ids.iter().for_each(|&v| eat(v as u64));
        e.labels.iter().for_each(|&v| eat(v as u64));
        e.attention_mask.iter().for_each(|&v| eat(v as u64));
    }
    format!("{h:016x}")
}

/// The checkpoint folders of `out` (complete ones: temporaries start with
/// '.'), oldest first.
fn checkpoints(out: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut found = Vec::new();
    let entries = match fs::read_dir(out) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(found),
        Err(e) => return Err(out_error(out, e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| out_error(out, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(step) = name
            .strip_prefix("checkpoint-")
            .and_then(|s| s.parse().ok())
        {
            if entry.path().join(STATE_NAME).exists() {
                found.push((step, entry.path()));
            }
        }
    }
    found.sort();
    Ok(found)
}

/// The folder of a run's output that the training guard fills before
/// training (`platypus train --decontaminate-against`: the report and the
/// filtered data of [`crate::curate::guard_training`]): not a sign of an
/// earlier run.
pub const GUARD_DIR: &str = "decontamination";

/// Checks that `out` can take a new run: missing, empty, or holding only
/// [`GUARD_DIR`].
pub fn check_new_out(out: &Path) -> Result<()> {
    let used = fs::read_dir(out)
        .map(|d| d.flatten().any(|e| e.file_name() != GUARD_DIR))
        .unwrap_or(false);
    if used {
        return Err(Error::Output {
            path: out.to_path_buf(),
            what: "exists and is not empty; pass --resume to continue the run there, or choose a new folder".into(),
        });
    }
    Ok(())
}

/// Checks the output folder for the run; returns the checkpoint to resume from.
fn prepare_out(run: &Run<'_>) -> Result<Option<PathBuf>> {
    let out = run.out;
    match &run.resume {
        None => {
            check_new_out(out)?;
            Ok(None)
        }
        Some(Resume::From(dir)) => {
            if !dir.join(STATE_NAME).exists() {
                return Err(Error::File {
                    path: dir.clone(),
                    what: format!("is not a checkpoint folder (no {STATE_NAME})"),
                });
            }
            Ok(Some(dir.clone()))
        }
        Some(Resume::Latest) => {
            // Leftovers of a killed write or deletion (temporaries of
            // checkpoints, the adapter, the log or the curve) are not state.
            if let Ok(entries) = fs::read_dir(out) {
                for entry in entries.flatten() {
                    let name = entry.file_name().to_string_lossy().into_owned();
                    if name.starts_with('.')
                        && (name.contains(".tmp")
                            || name.contains(".old")
                            || name.ends_with(".deleting"))
                    {
                        let path = entry.path();
                        let _ = fs::remove_dir_all(&path).or_else(|_| fs::remove_file(&path));
                    }
                }
            }
            let latest = checkpoints(out)?.pop().map(|(_, dir)| dir);
            if latest.is_none() && out.join("adapter").exists() {
                return Err(Error::Output {
                    path: out.to_path_buf(),
                    what: "holds a finished run without checkpoints (it ran with --save-steps 0): nothing to resume; choose a new folder".into(),
                });
            }
            // No checkpoint yet (killed before the first): from the start.
            Ok(latest)
        }
    }
}

fn read_state(dir: &Path) -> Result<TrainerState> {
    let path = dir.join(STATE_NAME);
    let text = fs::read_to_string(&path).map_err(|e| Error::File {
        path: path.clone(),
        what: format!("cannot read: {e}"),
    })?;
    serde_json::from_str(&text).map_err(|e| Error::File {
        path,
        what: format!("is not a trainer state: {e}"),
    })
}

/// Refuses to resume a checkpoint of another recipe or other data.
fn check_resumable(
    dir: &Path,
    state: &TrainerState,
    cfg: &TrainConfig,
    rows: usize,
    fingerprint: &str,
) -> Result<()> {
    let fail = |what: String| {
        Err(Error::File {
            path: dir.join(STATE_NAME),
            what,
        })
    };
    let recipe = |c: &TrainConfig| TrainConfig {
        save_steps: 0,
        save_total_limit: None,
        ..c.clone()
    };
    if recipe(&state.config) != recipe(cfg) {
        return fail(format!(
            "was written with another configuration: {} (this run: {}); resume with the same flags",
            serde_json::to_string(&state.config).expect("JSON"),
            serde_json::to_string(cfg).expect("JSON")
        ));
    }
    if state.rows != rows || state.data_fingerprint != fingerprint {
        return fail(format!(
            "was written for {} rows of fingerprint {}; the data now has {rows} rows of fingerprint {fingerprint}",
            state.rows, state.data_fingerprint
        ));
    }
    Ok(())
}

/// The moment tensors' names in `optimizer.safetensors`.
fn moment_key(kind: &str, layer: usize, module: Module, factor: char) -> String {
    format!("{kind}/{}", peft_key(layer, module, factor))
}

fn save_checkpoint(
    out: &Path,
    model: &Llama,
    adapter_config: &AdapterConfig,
    optimizer: &Optimizer,
    state: &TrainerState,
) -> Result<()> {
    let dir = out.join(format!("checkpoint-{}", state.step));
    let adapter = model.adapter(adapter_config)?;
    let mut moments: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
    let factors = model.lora_factors();
    for (i, ((layer, module), _)) in factors.iter().enumerate() {
        for (j, factor) in ['A', 'B'].into_iter().enumerate() {
            for (kind, tensors) in [("m", &optimizer.state.m), ("v", &optimizer.state.v)] {
                let values = model.unpad_factor(*module, factor, &tensors[2 * i + j].to_f32_vec()?);
                let [out_f, in_f] = module.shape(&model.config);
                let shape = if factor == 'A' {
                    vec![adapter_config.r, in_f]
                } else {
                    vec![out_f, adapter_config.r]
                };
                moments.push((moment_key(kind, *layer, *module, factor), shape, values));
            }
        }
    }
    let state_json = serde_json::to_string_pretty(state).expect("JSON");
    let delay = std::env::var("PLATYPUS_CHECKPOINT_DELAY_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok());
    Outputs::default().write_dir(&dir, |tmp: &Path| {
        adapter.save(&tmp.join("adapter"), &Outputs::default())?;
        let tensors: Vec<TensorBytes<'_>> = moments
            .iter()
            .map(|(name, shape, values)| TensorBytes::f32(name, shape, values))
            .collect();
        let inner = Outputs::default();
        let mut group = inner.group();
        st::write(
            &mut group,
            &tmp.join(OPTIMIZER_NAME),
            &tensors,
            &BTreeMap::new(),
        )?;
        group.file(&tmp.join(STATE_NAME), |w| {
            w.write_all(state_json.as_bytes())
        })?;
        group.commit()?;
        // Fault injection for the kill-and-resume test: a window in which
        // the checkpoint exists only under its temporary name.
        if let Some(ms) = delay {
            std::thread::sleep(std::time::Duration::from_millis(ms));
        }
        Ok(())
    })?;
    if let Some(limit) = state.config.save_total_limit {
        let all = checkpoints(out)?;
        for (_, old) in all.iter().take(all.len().saturating_sub(limit)) {
            // Renamed first, so a kill mid-deletion leaves no partial checkpoint.
            let name = old
                .file_name()
                .expect("a folder")
                .to_string_lossy()
                .into_owned();
            let doomed = out.join(format!(".{name}.deleting"));
            fs::rename(old, &doomed).map_err(|e| out_error(old, e))?;
            fs::remove_dir_all(&doomed).map_err(|e| out_error(&doomed, e))?;
        }
    }
    Ok(())
}

fn load_moments(dir: &Path, model: &Llama, optimizer: &mut Optimizer) -> Result<()> {
    let file = SafetensorsFile::open(&dir.join(OPTIMIZER_NAME))?;
    let factors = model.lora_factors();
    for (i, ((layer, module), f)) in factors.iter().enumerate() {
        for (j, (factor, held)) in [('A', &f.a), ('B', &f.b)].into_iter().enumerate() {
            for kind in ["m", "v"] {
                let values = file.load_f32(&moment_key(kind, *layer, *module, factor))?;
                let padded = model.pad_factor(*module, factor, &values, held.shape());
                let t = Tensor::from_slice(&padded, held.shape(), &model.device)?;
                let slot = if kind == "m" {
                    &mut optimizer.state.m
                } else {
                    &mut optimizer.state.v
                };
                slot[2 * i + j] = t;
            }
        }
    }
    Ok(())
}

/// Keeps the first `steps` lines of the log (a resumed run rewrites what
/// came after its checkpoint); creates it empty for a fresh run.
fn truncate_log(out: &Path, steps: u64) -> Result<()> {
    let path = out.join(LOG_NAME);
    let kept: String = match fs::read_to_string(&path) {
        Ok(text) => text
            .lines()
            .filter(|l| serde_json::from_str::<StepLog>(l).is_ok_and(|s| s.step <= steps))
            .map(|l| format!("{l}\n"))
            .collect(),
        Err(_) => String::new(),
    };
    Outputs::default().write_file(&path, |w| w.write_all(kept.as_bytes()))
}

fn write_loss_png(log: &Path, png: &Path) -> Result<()> {
    let text = fs::read_to_string(log).map_err(|e| out_error(log, e))?;
    let points: Vec<(u64, f64, f64)> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<StepLog>(l).ok())
        .map(|s| (s.step, s.loss, s.learning_rate))
        .collect();
    let tmp = png.with_file_name(format!(".loss.tmp{}.png", std::process::id()));
    super::plot::loss_png(&points, &tmp)?;
    fs::rename(&tmp, png).map_err(|e| out_error(png, e))
}
