//! The Llama 2 decoder on the crate's ops: one code path for every device.
//!
//! token embedding → N × [RMSNorm → q/k/v (+LoRA) → RoPE (rotate_half) →
//! causal grouped-query attention → o (+LoRA) → residual add + RMSNorm →
//! gate/up (+LoRA) → SwiGLU → down (+LoRA) → residual add] → RMSNorm →
//! LM head (untied, or the embedding when tied).
//!
//! Weights stay in their stored dtype on [`Device::Cpu`] (the host GEMM reads
//! f16/bf16 directly; activations are f32); the norms, a few KiB, are widened
//! to the activation dtype. LoRA factors are fp32 masters on every device.

use std::collections::BTreeMap;
use std::path::Path;

use super::adapter::{Adapter, AdapterConfig, Factors, Module};
use super::LlamaConfig;
use crate::formats::safetensors::Checkpoint;
use crate::ops::attention::{self, AttentionConfig, Batch};
use crate::ops::cross_entropy::{self, CrossEntropy};
use crate::ops::lora::{self, LoraConfig, LoraWeights};
use crate::ops::rope::{self, RopeConfig};
use crate::ops::{embedding, rmsnorm, swiglu};
use crate::{DType, Device, Error, Result, Tensor};

/// A LoRA update attached to a projection: fp32 A [r, in], B [out, r].
#[derive(Debug)]
pub struct LoraFactors {
    /// lora_A.
    pub a: Tensor,
    /// lora_B.
    pub b: Tensor,
    /// Scale, dropout and its random stream.
    pub config: LoraConfig,
}

/// A projection: the frozen weight [out, in] and, maybe, a LoRA update.
#[derive(Debug)]
pub struct Linear {
    /// The base weight.
    pub weight: Tensor,
    /// The adapter's factors, when one is attached.
    pub lora: Option<LoraFactors>,
}

impl Linear {
    /// y = x Wᵀ (+ s · x Aᵀ Bᵀ).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match &self.lora {
            None => lora::linear(x, &self.weight),
            Some(f) => {
                let weights = LoraWeights {
                    w: &self.weight,
                    a: &f.a,
                    b: &f.b,
                };
                Ok(lora::forward(x, weights, &f.config)?.y)
            }
        }
    }
}

/// One decoder layer's weights.
#[derive(Debug)]
pub struct DecoderLayer {
    /// RMSNorm before attention.
    pub input_norm: Tensor,
    /// The seven projections, in [`Module::ALL`] order.
    pub projections: [Linear; 7],
    /// RMSNorm before the MLP.
    pub post_attention_norm: Tensor,
}

impl DecoderLayer {
    /// The projection `module`.
    pub fn projection(&self, module: Module) -> &Linear {
        &self.projections[module as usize]
    }
}

/// Token ids of a right-padded batch [batch, seq]: row b's first `lens[b]`
/// entries are its tokens, the rest padding (any id).
#[derive(Debug, Clone, Copy)]
pub struct TokenBatch<'a> {
    /// Ids, row-major [batch, seq].
    pub ids: &'a [u32],
    /// Rows.
    pub batch: usize,
    /// Columns (the longest row).
    pub seq: usize,
    /// Real tokens per row.
    pub lens: &'a [u32],
}

/// What a forward pass returns.
#[derive(Debug)]
pub struct Forward {
    /// The final RMSNorm's output [batch · seq, hidden] (zeros past each row's length
    /// are not guaranteed: read only real tokens).
    pub hidden: Tensor,
    /// The residual stream entering each layer and leaving the last one
    /// (N + 1 tensors), when asked for.
    pub residuals: Vec<Tensor>,
}

/// A Llama model on one device.
#[derive(Debug)]
pub struct Llama {
    /// Its architecture.
    pub config: LlamaConfig,
    /// Where it runs.
    pub device: Device,
    /// Element type of the activations (f32 on the CPU).
    pub dtype: DType,
    /// Token embedding [vocab, hidden], stored dtype.
    pub embed: Tensor,
    /// Decoder layers.
    pub layers: Vec<DecoderLayer>,
    /// Final RMSNorm.
    pub norm: Tensor,
    /// LM head [vocab, hidden]; `None` when tied to the embedding.
    pub lm_head: Option<Tensor>,
    /// On the kernel devices, when vocab is no multiple of 8 (the GEMM's
    /// output rows must be 16-byte aligned): the head with zero rows up to
    /// the next multiple, for [`Llama::logits`]. The fused loss reads the
    /// head itself.
    pub padded_head: Option<Tensor>,
}

/// The activation dtype on `device` for weights stored as `stored`: f32 on
/// the CPU, the stored half type (bf16 for an f32 checkpoint) on the kernels.
fn activation_dtype(device: &Device, stored: DType) -> DType {
    match (device, stored) {
        (Device::Cpu, _) => DType::F32,
        (_, DType::F16) => DType::F16,
        _ => DType::BF16,
    }
}

/// The MLP width the projections are held at on `device`: intermediate_size
/// on the CPU, rounded up to a multiple of 8 on the kernel devices (their
/// GEMM moves 16-byte rows). The extra gate/up rows and down columns are
/// zeros, so they add silu(0) · 0 = 0 to the output: padding changes nothing.
fn mlp_width(config: &LlamaConfig, device: &Device) -> usize {
    match device {
        Device::Cpu => config.intermediate_size,
        _ => config.intermediate_size.next_multiple_of(8),
    }
}

/// [out, in] of `module`'s weight as held: [`Module::shape`] with the MLP
/// width `width` (see [`mlp_width`]).
fn held_shape(module: Module, config: &LlamaConfig, width: usize) -> [usize; 2] {
    let [out, inp] = module.shape(config);
    match module {
        Module::Gate | Module::Up => [width, inp],
        Module::Down => [out, width],
        _ => [out, inp],
    }
}

/// A row-major [rows, cols] matrix zero-padded (or cut) to [held[0], held[1]].
fn pad_matrix(data: &[f32], [rows, cols]: [usize; 2], held: [usize; 2]) -> Vec<f32> {
    let mut out = vec![0.0; held[0] * held[1]];
    let n = cols.min(held[1]);
    for (dst, src) in out
        .chunks_exact_mut(held[1])
        .zip(data.chunks_exact(cols))
        .take(rows)
    {
        dst[..n].copy_from_slice(&src[..n]);
    }
    out
}

/// A tensor converted to `dtype` on its device (a copy only when it differs).
fn to_dtype(t: Tensor, dtype: DType) -> Result<Tensor> {
    if t.dtype() == dtype {
        return Ok(t);
    }
    Tensor::from_f32(&t.to_f32_vec()?, t.shape(), dtype, t.device())
}

impl Llama {
    /// Loads `dir` (config.json + model.safetensors or a sharded index) onto `device`.
    pub fn load(dir: &Path, device: &Device) -> Result<Llama> {
        let config = LlamaConfig::from_file(&dir.join("config.json"))?;
        let checkpoint = Checkpoint::open(dir)?;
        Llama::from_checkpoint(config, &checkpoint, device)
    }

    /// Builds the model from an opened checkpoint, checking every tensor's
    /// shape against `config` (errors name the key).
    pub fn from_checkpoint(
        config: LlamaConfig,
        checkpoint: &Checkpoint,
        device: &Device,
    ) -> Result<Llama> {
        let stored = checkpoint.info("model.embed_tokens.weight")?.dtype;
        let dtype = activation_dtype(device, stored);
        let (h, v) = (config.hidden_size, config.vocab_size);
        let load = |key: &str, shape: &[usize]| -> Result<Tensor> {
            let info = checkpoint.info(key)?;
            if info.shape != shape {
                return Err(Error::File {
                    path: checkpoint.file_of(key)?.path().to_path_buf(),
                    what: format!(
                        "tensor `{key}` has shape {:?}; config.json makes it {shape:?}",
                        info.shape
                    ),
                });
            }
            if !info.dtype.is_float() {
                return Err(Error::File {
                    path: checkpoint.file_of(key)?.path().to_path_buf(),
                    what: format!("tensor `{key}` has dtype {}", info.dtype),
                });
            }
            checkpoint.load(key, device)
        };
        // Matrices keep their stored dtype on the CPU; kernels read one dtype.
        let matrix = |key: &str, shape: &[usize]| -> Result<Tensor> {
            let t = load(key, shape)?;
            match device {
                Device::Cpu => Ok(t),
                _ => to_dtype(t, dtype),
            }
        };
        let vector = |key: &str| to_dtype(load(key, &[h])?, dtype);
        let width = mlp_width(&config, device);
        let projection = |m: Module, layer: usize| -> Result<Linear> {
            let (shape, held) = (m.shape(&config), held_shape(m, &config, width));
            let mut weight = matrix(&m.weight_key(layer), &shape)?;
            if held != shape {
                let padded = pad_matrix(&weight.to_f32_vec()?, shape, held);
                weight = Tensor::from_f32(&padded, &held, dtype, device)?;
            }
            Ok(Linear { weight, lora: None })
        };
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let projections = Module::ALL.map(|m| projection(m, i));
            let projections = projections.into_iter().collect::<Result<Vec<_>>>()?;
            layers.push(DecoderLayer {
                input_norm: vector(&format!("model.layers.{i}.input_layernorm.weight"))?,
                projections: projections.try_into().expect("seven projections"),
                post_attention_norm: vector(&format!(
                    "model.layers.{i}.post_attention_layernorm.weight"
                ))?,
            });
        }
        let has_head = checkpoint.names().any(|n| n == "lm_head.weight");
        let lm_head = match (has_head, config.tie_word_embeddings) {
            (true, _) => Some(matrix("lm_head.weight", &[v, h])?),
            (false, true) => None,
            (false, false) => {
                return Err(Error::File {
                    path: checkpoint.dir().to_path_buf(),
                    what: "has no `lm_head.weight`, and config.json does not tie the embeddings"
                        .into(),
                })
            }
        };
        let embed = matrix("model.embed_tokens.weight", &[v, h])?;
        let padded_head = match device {
            Device::Cpu => None,
            _ if v % 8 == 0 => None,
            _ => {
                let held = [v.next_multiple_of(8), h];
                let head = lm_head.as_ref().unwrap_or(&embed).to_f32_vec()?;
                let padded = pad_matrix(&head, [v, h], held);
                Some(Tensor::from_f32(&padded, &held, dtype, device)?)
            }
        };
        Ok(Llama {
            embed,
            norm: vector("model.norm.weight")?,
            layers,
            lm_head,
            padded_head,
            dtype,
            device: device.clone(),
            config,
        })
    }

    /// Attaches `adapter` (replacing any attached one): its factors are
    /// copied to the device as fp32.
    pub fn attach(&mut self, adapter: &Adapter) -> Result<()> {
        let cfg = LoraConfig {
            alpha: adapter.config.alpha,
            rslora: adapter.config.use_rslora,
            dropout: 0.0,
            seed: 0,
            offset: 0,
        };
        let r = adapter.config.r;
        for layer in &mut self.layers {
            for p in &mut layer.projections {
                p.lora = None;
            }
        }
        let width = mlp_width(&self.config, &self.device);
        for (&(layer, module), f) in &adapter.factors {
            let [out, inp] = module.shape(&self.config);
            let [held_out, held_in] = held_shape(module, &self.config, width);
            let target = self.layers.get_mut(layer).ok_or_else(|| Error::Invalid {
                op: "Llama::attach",
                arg: "adapter",
                what: format!(
                    "has layer {layer}; the model has {}",
                    self.config.num_hidden_layers
                ),
            })?;
            target.projections[module as usize].lora = Some(LoraFactors {
                a: Tensor::from_slice(
                    &pad_matrix(&f.a, [r, inp], [r, held_in]),
                    &[r, held_in],
                    &self.device,
                )?,
                b: Tensor::from_slice(
                    &pad_matrix(&f.b, [out, r], [held_out, r]),
                    &[held_out, r],
                    &self.device,
                )?,
                config: cfg,
            });
        }
        Ok(())
    }

    /// The attached LoRA factors, in (layer, module) order.
    pub fn lora_factors(&self) -> Vec<((usize, Module), &LoraFactors)> {
        let mut out = Vec::new();
        for (i, layer) in self.layers.iter().enumerate() {
            for (m, p) in Module::ALL.iter().zip(&layer.projections) {
                if let Some(f) = &p.lora {
                    out.push(((i, *m), f));
                }
            }
        }
        out
    }

    /// [`Llama::lora_factors`], mutable (what the optimizer updates).
    pub fn lora_factors_mut(&mut self) -> Vec<((usize, Module), &mut LoraFactors)> {
        let mut out = Vec::new();
        for (i, layer) in self.layers.iter_mut().enumerate() {
            for (m, p) in Module::ALL.iter().zip(&mut layer.projections) {
                if let Some(f) = &mut p.lora {
                    out.push(((i, *m), f));
                }
            }
        }
        out
    }

    /// The attached factors as an adapter under `config` (fp32, the kernel
    /// devices' MLP padding cut off): what training saves.
    pub fn adapter(&self, config: &AdapterConfig) -> Result<Adapter> {
        let mut factors = BTreeMap::new();
        for ((layer, module), f) in self.lora_factors() {
            factors.insert(
                (layer, module),
                Factors {
                    a: self.unpad_factor(module, 'A', &f.a.to_f32_vec()?),
                    b: self.unpad_factor(module, 'B', &f.b.to_f32_vec()?),
                },
            );
        }
        Ok(Adapter {
            config: config.clone(),
            factors,
        })
    }

    /// Values of a tensor held like `module`'s factor `factor` ('A' [r,
    /// in] or 'B' [out, r], maybe MLP-padded) cut to the unpadded shape.
    pub fn unpad_factor(&self, module: Module, factor: char, values: &[f32]) -> Vec<f32> {
        let [out, inp] = module.shape(&self.config);
        let width = mlp_width(&self.config, &self.device);
        let [held_out, held_in] = held_shape(module, &self.config, width);
        if factor == 'A' {
            let r = values.len() / held_in;
            pad_matrix(values, [r, held_in], [r, inp])
        } else {
            let r = values.len() / held_out;
            pad_matrix(values, [held_out, r], [out, r])
        }
    }

    /// The inverse of [`Llama::unpad_factor`]: unpadded values laid out as
    /// the `held` shape (zeros in the padding).
    pub fn pad_factor(
        &self,
        module: Module,
        factor: char,
        values: &[f32],
        held: &[usize],
    ) -> Vec<f32> {
        let [out, inp] = module.shape(&self.config);
        let shape = if factor == 'A' {
            [held[0], inp]
        } else {
            [out, held[1]]
        };
        pad_matrix(values, shape, [held[0], held[1]])
    }

    /// Number of parameters (the tied head counted once; the kernel devices'
    /// MLP padding not counted).
    pub fn parameters(&self) -> usize {
        let layers: usize = self
            .layers
            .iter()
            .map(|l| {
                l.input_norm.elem_count()
                    + l.post_attention_norm.elem_count()
                    + Module::ALL
                        .iter()
                        .map(|m| m.shape(&self.config).iter().product::<usize>())
                        .sum::<usize>()
            })
            .sum();
        self.embed.elem_count()
            + layers
            + self.norm.elem_count()
            + self.lm_head.as_ref().map_or(0, Tensor::elem_count)
    }

    /// The LM head's weight [vocab, hidden].
    pub fn head(&self) -> &Tensor {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }

    /// Runs the decoder over `batch`; `keep_residuals` also returns the
    /// residual stream between layers (what the parity tests compare).
    pub fn forward(&self, batch: &TokenBatch<'_>, keep_residuals: bool) -> Result<Forward> {
        check_batch(&self.config, batch)?;
        self.run(
            batch.ids,
            batch.batch,
            batch.seq,
            Context::Padded(batch.lens),
            keep_residuals,
        )
    }

    /// Runs the decoder over `new` tokens per row ([batch, new] ids) after the
    /// `cache.len()` tokens the cache holds, appending their keys and values
    /// to it; returns the final hidden states [batch · new, hidden].
    pub fn forward_cached(&self, ids: &[u32], cache: &mut KvCache) -> Result<Tensor> {
        let b = cache.batch;
        let t = ids.len() / b.max(1);
        if t == 0 || ids.len() != b * t || cache.len + t > cache.capacity {
            return Err(Error::Invalid {
                op: "Llama::forward_cached",
                arg: "ids",
                what: format!(
                    "{} ids for {b} rows after {} cached tokens: expected a positive multiple of {b}, at most {} more per row",
                    ids.len(),
                    cache.len,
                    cache.capacity - cache.len
                ),
            });
        }
        let hidden = self.run(ids, b, t, Context::Cached(cache), false)?.hidden;
        cache.len += t;
        Ok(hidden)
    }

    /// The decoder over ids [b, t]: padded rows, or new tokens after a cache.
    fn run(
        &self,
        ids: &[u32],
        b: usize,
        t: usize,
        mut context: Context<'_, '_>,
        keep_residuals: bool,
    ) -> Result<Forward> {
        let c = &self.config;
        let tokens = b * t;
        let start = match &context {
            Context::Padded(_) => 0,
            Context::Cached(cache) => cache.len,
        };
        let positions: Vec<i32> = (0..b)
            .flat_map(|_| (start..start + t).map(|p| p as i32))
            .collect();
        let positions = Tensor::from_slice(&positions, &[b, t], &self.device)?;
        let rope_cfg = RopeConfig {
            theta: c.rope_theta,
            ..RopeConfig::default()
        };
        let attn_cfg = AttentionConfig {
            causal: true,
            scale: None,
        };
        let mut residuals = Vec::new();
        let mut h = embedding::forward(&self.embed, ids, self.dtype)?;
        if keep_residuals {
            residuals.push(h.to_device(&self.device)?);
        }
        let mut x = rmsnorm::forward(&h, &self.layers[0].input_norm, c.rms_norm_eps)?;
        for (i, layer) in self.layers.iter().enumerate() {
            let proj = |m: Module, x: &Tensor| layer.projection(m).forward(x);
            let mut q = proj(Module::Q, &x)?.reshape(&[b, t, c.num_attention_heads, c.head_dim])?;
            let mut k = proj(Module::K, &x)?.reshape(&[b, t, c.num_key_value_heads, c.head_dim])?;
            let v = proj(Module::V, &x)?.reshape(&[b, t, c.num_key_value_heads, c.head_dim])?;
            rope::forward(&mut q, &mut k, &positions, &rope_cfg)?;
            let o = match &mut context {
                Context::Padded(lens) => {
                    attention::forward(&q, &k, &v, Batch::Padded(lens), &attn_cfg)?.o
                }
                Context::Cached(cache) => {
                    let (kc, vc) = &mut cache.layers[i];
                    attention::write_cache(kc, &k, start)?;
                    attention::write_cache(vc, &v, start)?;
                    attention::forward_cached(&q, kc, vc, start + t, &attn_cfg)?.o
                }
            };
            let o = o.reshape(&[tokens, c.q_width()])?;
            let delta = proj(Module::O, &o)?;
            x = rmsnorm::add_forward(&mut h, &delta, &layer.post_attention_norm, c.rms_norm_eps)?;
            let gate = proj(Module::Gate, &x)?;
            let up = proj(Module::Up, &x)?;
            let delta = proj(Module::Down, &swiglu::forward(&gate, &up)?)?;
            let next_norm = self
                .layers
                .get(i + 1)
                .map_or(&self.norm, |next| &next.input_norm);
            x = rmsnorm::add_forward(&mut h, &delta, next_norm, c.rms_norm_eps)?;
            if keep_residuals {
                residuals.push(h.to_device(&self.device)?);
            }
        }
        Ok(Forward {
            hidden: x,
            residuals,
        })
    }

    /// Logits [rows, vocab] of final hidden states [rows, hidden].
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let Some(padded) = &self.padded_head else {
            return lora::linear(hidden, self.head());
        };
        // The GEMM writes [rows, vocab rounded up to 8]; the real columns
        // go through the host (exact: the values keep their dtype), one copy
        // of the logits each way, one row per decoding step.
        let wide = lora::linear(hidden, padded)?;
        let (vocab, held) = (self.config.vocab_size, padded.shape()[0]);
        let values = wide.to_f32_vec()?;
        let rows = values.len() / held;
        let narrow: Vec<f32> = values
            .chunks_exact(held)
            .flat_map(|row| &row[..vocab])
            .copied()
            .collect();
        Tensor::from_f32(&narrow, &[rows, vocab], self.dtype, &self.device)
    }

    /// The causal-LM loss as transformers computes it: token t's logits
    /// predict label t + 1 of its row (labels [batch, seq], negative =
    /// ignored), summed over the counted tokens.
    pub fn loss(&self, batch: &TokenBatch<'_>, labels: &[i64]) -> Result<CrossEntropy> {
        if labels.len() != batch.ids.len() {
            return Err(Error::Invalid {
                op: "Llama::loss",
                arg: "labels",
                what: format!("has {} entries for {} ids", labels.len(), batch.ids.len()),
            });
        }
        let shifted = shift_labels(labels, batch.seq);
        let fwd = self.forward(batch, false)?;
        cross_entropy::linear_cross_entropy(&fwd.hidden, self.head(), &shifted)
    }
}

/// What attention sees: the rows of a padded batch, or a KV cache.
enum Context<'a, 'c> {
    Padded(&'a [u32]),
    Cached(&'c mut KvCache),
}

/// Keys and values of every layer for `batch` rows of up to `capacity`
/// tokens, preallocated on the model's device; `len` tokens are filled.
#[derive(Debug)]
pub struct KvCache {
    layers: Vec<(Tensor, Tensor)>,
    batch: usize,
    capacity: usize,
    len: usize,
}

impl KvCache {
    /// An empty cache for `model`: [batch, capacity, kv_heads, head_dim] keys
    /// and values per layer. `capacity` must not pass max_position_embeddings.
    pub fn new(model: &Llama, batch: usize, capacity: usize) -> Result<KvCache> {
        let c = &model.config;
        if batch == 0 || capacity == 0 || capacity > c.max_position_embeddings {
            return Err(Error::Invalid {
                op: "KvCache::new",
                arg: "capacity",
                what: format!(
                    "{batch} rows of {capacity} tokens: expected at least one row of 1 to max_position_embeddings {} tokens",
                    c.max_position_embeddings
                ),
            });
        }
        let shape = [batch, capacity, c.num_key_value_heads, c.head_dim];
        let layers = (0..c.num_hidden_layers)
            .map(|_| {
                Ok((
                    Tensor::zeros(&shape, model.dtype, &model.device)?,
                    Tensor::zeros(&shape, model.dtype, &model.device)?,
                ))
            })
            .collect::<Result<_>>()?;
        Ok(KvCache {
            layers,
            batch,
            capacity,
            len: 0,
        })
    }

    /// Tokens per row held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True before the first forward pass.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Tokens per row it can hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }
}

/// Labels shifted left by one within each row of `seq` (the last column
/// gets −100), as i32 for the loss.
pub fn shift_labels(labels: &[i64], seq: usize) -> Vec<i32> {
    labels
        .chunks(seq)
        .flat_map(|row| {
            row.iter()
                .skip(1)
                .map(|&l| if l < 0 { -100 } else { l as i32 })
                .chain([-100])
        })
        .collect()
}

fn check_batch(c: &LlamaConfig, batch: &TokenBatch<'_>) -> Result<()> {
    let fail = |arg, what: String| {
        Err(Error::Invalid {
            op: "Llama::forward",
            arg,
            what,
        })
    };
    if batch.batch == 0 || batch.seq == 0 {
        return fail(
            "batch",
            format!("is empty ({} × {})", batch.batch, batch.seq),
        );
    }
    if batch.ids.len() != batch.batch * batch.seq {
        return fail(
            "batch.ids",
            format!(
                "has {} ids, not {} × {}",
                batch.ids.len(),
                batch.batch,
                batch.seq
            ),
        );
    }
    if batch.lens.len() != batch.batch || batch.lens.iter().any(|&l| l as usize > batch.seq) {
        return fail(
            "batch.lens",
            format!("{:?} is not one length ≤ {} per row", batch.lens, batch.seq),
        );
    }
    if batch.seq > c.max_position_embeddings {
        return fail(
            "batch.seq",
            format!(
                "{} tokens are more than max_position_embeddings {}",
                batch.seq, c.max_position_embeddings
            ),
        );
    }
    Ok(())
}
