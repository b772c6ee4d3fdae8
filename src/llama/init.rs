//! New models and adapters made by the crate: what tests, benchmarks and the
//! README walkthrough run on, since no checkpoint can be downloaded here.
//!
//! Initialised as transformers and PEFT do it: every projection and the
//! embedding N(0, 0.02²), the norms 1; LoRA A Kaiming-uniform
//! U(−1/√in, 1/√in) and B zero (PEFT's default), or B U(−1/√r, 1/√r) for a
//! non-trivial adapter (PEFT's `init_lora_weights=False`).

use std::collections::BTreeMap;
use std::path::Path;

use super::adapter::{Adapter, AdapterConfig, Factors, Module};
use super::tokenizer::Tokenizer;
use super::LlamaConfig;
use crate::formats::safetensors::{self as st, TensorBytes, SINGLE_NAME};
use crate::output::Outputs;
use crate::{DType, Device, Result, Tensor};

/// Model shapes with a name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
pub enum Preset {
    /// The dev fixture's shape (vocab 256, hidden 64, 2 layers, 4 heads, 2 kv
    /// heads) with 2048 positions, as the peers' `tiny`.
    Tiny,
    /// A walkthrough model with room for a tokenizer: vocab 2048, hidden 256,
    /// 4 layers, 8 heads, 4 kv heads (head dim 32), 512 positions.
    Mini,
    /// ~110M parameters: vocab 32000, hidden 768, 12 layers, 12 heads, tied
    /// embeddings (the peers' `small`).
    Small,
}

impl Preset {
    /// The architecture.
    pub fn config(self) -> LlamaConfig {
        let (vocab, hidden, inter, layers, heads, kv, tied, max_pos) = match self {
            Preset::Tiny => (256, 64, 172, 2, 4, 2, false, 2048),
            Preset::Mini => (2048, 256, 688, 4, 8, 4, false, 512),
            Preset::Small => (32000, 768, 2048, 12, 12, 12, true, 2048),
        };
        LlamaConfig {
            vocab_size: vocab,
            hidden_size: hidden,
            intermediate_size: inter,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            num_key_value_heads: kv,
            head_dim: hidden / heads,
            rms_norm_eps: 1e-5,
            rope_theta: 10000.0,
            max_position_embeddings: max_pos,
            tie_word_embeddings: tied,
            dtype: None,
            bos_token_id: Some(1),
            eos_token_ids: vec![2],
            pad_token_id: Some(0),
        }
    }
}

/// Normal and uniform numbers from splitmix64, reproducible from a seed.
struct Random(u64);

impl Random {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1].
    fn unit(&mut self) -> f64 {
        ((self.next_u64() >> 11) + 1) as f64 / (1u64 << 53) as f64
    }

    fn uniform(&mut self, bound: f32, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| ((2.0 * self.unit() - 1.0) * bound as f64) as f32)
            .collect()
    }

    /// N(0, std²) by Box–Muller.
    fn normal(&mut self, std: f32, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| {
                let (u, v) = (self.unit(), self.unit());
                ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos() * std as f64) as f32
            })
            .collect()
    }
}

/// Every tensor of a freshly initialised model: (key, shape, values).
fn random_weights(config: &LlamaConfig, seed: u64) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let mut rng = Random(seed);
    let (h, v) = (config.hidden_size, config.vocab_size);
    let mut out = vec![(
        "model.embed_tokens.weight".to_string(),
        vec![v, h],
        rng.normal(0.02, v * h),
    )];
    for i in 0..config.num_hidden_layers {
        for m in Module::ALL {
            let [o, n] = m.shape(config);
            out.push((m.weight_key(i), vec![o, n], rng.normal(0.02, o * n)));
        }
        for norm in ["input_layernorm", "post_attention_layernorm"] {
            out.push((
                format!("model.layers.{i}.{norm}.weight"),
                vec![h],
                vec![1.0; h],
            ));
        }
    }
    out.push(("model.norm.weight".into(), vec![h], vec![1.0; h]));
    if !config.tie_word_embeddings {
        out.push(("lm_head.weight".into(), vec![v, h], rng.normal(0.02, v * h)));
    }
    out
}

/// Writes a new model folder `dir` (config.json, generation_config.json,
/// model.safetensors in `dtype`, and `tokenizer.json` when given); refused
/// when `dir` exists.
pub fn write_random_model(
    dir: &Path,
    config: &LlamaConfig,
    dtype: DType,
    seed: u64,
    tokenizer: Option<&Tokenizer>,
) -> Result<()> {
    if dir.exists() {
        return Err(crate::Error::Output {
            path: dir.to_path_buf(),
            what: "exists already; choose a new folder".into(),
        });
    }
    let stored: Vec<(String, Vec<usize>, Vec<u8>)> = random_weights(config, seed)
        .into_iter()
        .map(|(name, shape, values)| {
            let bytes = Tensor::from_f32(&values, &shape, dtype, &Device::Cpu)?.to_bytes()?;
            Ok((name, shape, bytes))
        })
        .collect::<Result<_>>()?;
    let config_json = serde_json::to_string_pretty(&config.to_json(dtype)).expect("JSON");
    let generation = serde_json::to_string_pretty(&serde_json::json!({
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_ids,
        "pad_token_id": config.pad_token_id,
    }))
    .expect("JSON");
    Outputs::default().write_dir(dir, |tmp| {
        let tensors: Vec<TensorBytes<'_>> = stored
            .iter()
            .map(|(name, shape, bytes)| TensorBytes {
                name,
                dtype,
                shape,
                bytes,
            })
            .collect();
        let outputs = Outputs::default();
        let mut group = outputs.group();
        let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
        st::write(&mut group, &tmp.join(SINGLE_NAME), &tensors, &meta)?;
        group.file(&tmp.join("config.json"), |w| {
            w.write_all(config_json.as_bytes())
        })?;
        group.file(&tmp.join("generation_config.json"), |w| {
            w.write_all(generation.as_bytes())
        })?;
        group.commit()?;
        match tokenizer {
            Some(t) => t.save(&tmp.join("tokenizer.json")),
            None => Ok(()),
        }
    })
}

/// A new adapter of rank `r` on `targets` of every layer: A Kaiming-uniform,
/// B zero (PEFT's start: the model is unchanged) or, with `random_b`,
/// uniform too (a non-trivial adapter, for merges and tests).
pub fn random_adapter(
    model: &LlamaConfig,
    config: AdapterConfig,
    seed: u64,
    random_b: bool,
) -> Adapter {
    let mut rng = Random(seed);
    let r = config.r;
    let mut factors = BTreeMap::new();
    for layer in 0..model.num_hidden_layers {
        for &m in &config.targets {
            let [out, inp] = m.shape(model);
            let a = rng.uniform(1.0 / (inp as f32).sqrt(), r * inp);
            let b = if random_b {
                rng.uniform(1.0 / (r as f32).sqrt(), out * r)
            } else {
                vec![0.0; out * r]
            };
            factors.insert((layer, m), Factors { a, b });
        }
    }
    Adapter { config, factors }
}
