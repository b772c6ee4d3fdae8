//! A BERT encoder (the transformer of a sentence-transformers model such as
//! all-MiniLM-L6-v2): `config.json` and `model.safetensors` as Hugging
//! Face's `BertModel` saves them, and its forward pass over packed
//! sequences on the crate's ops, so on any [`Device`].
//!
//! Sequences are packed token after token, no padding at all: every
//! per-token step (embeddings, the Linear layers, LayerNorm, GELU) runs on
//! the batch's real tokens only, and attention ([`ops::attention`] with
//! [`Batch::Packed`], non-causal) is limited to each sequence's own span.
//! Each Linear layer is one [`ops::linear`] call with its bias (and the
//! feed-forward's GELU) fused in; each sublayer ends in
//! [`ops::layernorm::residual_forward`], the residual add and the norm in one
//! pass. Weights are f32 on [`Device::Cpu`] (the host GEMM, multi-threaded)
//! and f16 on the GPU and the emulator (tensor cores, fp32 accumulation).
//!
//! Per token and layer the forward does 2·(4·h² + 2·h·i) FLOPs in the GEMMs
//! (h hidden, i intermediate; 21 MFLOP per token over the 6 layers of
//! all-MiniLM-L6-v2) plus attention's 4·L·h for a sequence of L tokens.

use std::path::Path;

use serde::Deserialize;

use crate::formats::safetensors::SafetensorsFile;
use crate::ops;
use crate::ops::attention::{AttentionConfig, Batch};
use crate::ops::linear::Activation;
use crate::{DType, Device, Error, Result, Tensor};

/// The fields of a BERT `config.json` the forward pass needs.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct BertConfig {
    /// Width of a token's hidden state.
    pub hidden_size: usize,
    /// Encoder layers.
    pub num_hidden_layers: usize,
    /// Attention heads per layer (hidden_size / heads is the head size).
    pub num_attention_heads: usize,
    /// Width of the feed-forward layer.
    pub intermediate_size: usize,
    /// Tokens in the vocabulary.
    pub vocab_size: usize,
    /// Rows of the position embedding table (the longest sequence).
    pub max_position_embeddings: usize,
    /// Rows of the token-type table (segment A is type 0).
    #[serde(default = "default_type_vocab_size")]
    pub type_vocab_size: usize,
    /// LayerNorm's epsilon.
    #[serde(default = "default_layer_norm_eps")]
    pub layer_norm_eps: f32,
    /// The feed-forward activation: only "gelu" (the erf form) is supported.
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
    /// Only "absolute" position embeddings are supported.
    #[serde(default = "default_position_embedding_type")]
    pub position_embedding_type: String,
    /// "bert" (other BERT-family types differ in positions or norms).
    #[serde(default)]
    pub model_type: Option<String>,
}

fn default_type_vocab_size() -> usize {
    2
}
fn default_layer_norm_eps() -> f32 {
    1e-12
}
fn default_hidden_act() -> String {
    "gelu".into()
}
fn default_position_embedding_type() -> String {
    "absolute".into()
}

impl BertConfig {
    /// Reads and checks `config.json` at `path`: refused with the field
    /// named when it is not a BERT this forward pass computes exactly.
    pub fn from_file(path: &Path) -> Result<BertConfig> {
        let fail = |what: String| Error::File {
            path: path.to_path_buf(),
            what,
        };
        let text = std::fs::read_to_string(path).map_err(|e| fail(format!("cannot read: {e}")))?;
        let config: BertConfig = serde_json::from_str(&text).map_err(|e| {
            fail(format!(
                "not a BERT config.json (line {}, column {}): {e}",
                e.line(),
                e.column()
            ))
        })?;
        let unsupported = |field: &str, got: &str, expected: &str| {
            fail(format!("`{field}` is {got}, expected {expected}"))
        };
        if let Some(t) = config.model_type.as_deref().filter(|t| *t != "bert") {
            return Err(unsupported("model_type", &format!("{t:?}"), "\"bert\""));
        }
        if config.hidden_act != "gelu" {
            return Err(unsupported(
                "hidden_act",
                &format!("{:?}", config.hidden_act),
                "\"gelu\"",
            ));
        }
        if config.position_embedding_type != "absolute" {
            return Err(unsupported(
                "position_embedding_type",
                &format!("{:?}", config.position_embedding_type),
                "\"absolute\"",
            ));
        }
        let heads = config.num_attention_heads;
        if heads == 0 || config.hidden_size == 0 || config.hidden_size % heads != 0 {
            return Err(unsupported(
                "num_attention_heads",
                &heads.to_string(),
                &format!("a divisor of hidden_size {}", config.hidden_size),
            ));
        }
        for (field, value) in [
            ("num_hidden_layers", config.num_hidden_layers),
            ("intermediate_size", config.intermediate_size),
            ("vocab_size", config.vocab_size),
            ("max_position_embeddings", config.max_position_embeddings),
            ("type_vocab_size", config.type_vocab_size),
        ] {
            if value == 0 {
                return Err(unsupported(field, "0", "at least 1"));
            }
        }
        Ok(config)
    }

    /// Elements per attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }
}

/// A Linear layer: weight [out, in] and bias [out].
#[derive(Debug)]
struct Linear {
    weight: Tensor,
    bias: Tensor,
}

impl Linear {
    /// act(x Wᵀ + b).
    fn forward(&self, x: &Tensor, act: Activation) -> Result<Tensor> {
        ops::linear::forward(x, &self.weight, Some(&self.bias), act)
    }
}

/// A LayerNorm's scale and shift.
#[derive(Debug)]
struct Norm {
    weight: Tensor,
    bias: Tensor,
}

/// One encoder layer's weights.
#[derive(Debug)]
struct Layer {
    query: Linear,
    key: Linear,
    value: Linear,
    attention_out: Linear,
    attention_norm: Norm,
    intermediate: Linear,
    output: Linear,
    output_norm: Norm,
}

/// A BERT encoder's weights on one device, ready for [`BertModel::forward`].
#[derive(Debug)]
pub struct BertModel {
    config: BertConfig,
    word_embeddings: Tensor,
    /// The position table plus row 0 of the token-type table (every token
    /// is segment A): one gather gives both.
    position_type_embeddings: Tensor,
    embedding_norm: Norm,
    layers: Vec<Layer>,
}

/// Loads the tensors of one model file by their shapes, with the prefix
/// its names carry (`bert.` when saved from a task model, none from
/// `BertModel`).
struct Loader<'a> {
    file: &'a SafetensorsFile,
    prefix: &'static str,
    device: &'a Device,
    dtype: DType,
}

impl Loader<'_> {
    /// The f32 values of tensor `name`, which must have `shape`.
    fn values(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let full = format!("{}{name}", self.prefix);
        let info = self.file.info(&full)?;
        if info.shape != shape {
            return Err(Error::File {
                path: self.file.path().to_path_buf(),
                what: format!(
                    "tensor `{full}` has shape {:?}, expected {shape:?} (from config.json)",
                    info.shape
                ),
            });
        }
        self.file.load_f32(&full)
    }

    /// Tensor `name` on the model's device in its dtype.
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        Tensor::from_f32(&self.values(name, shape)?, shape, self.dtype, self.device)
    }

    fn linear(&self, name: &str, out: usize, inp: usize) -> Result<Linear> {
        Ok(Linear {
            weight: self.tensor(&format!("{name}.weight"), &[out, inp])?,
            bias: self.tensor(&format!("{name}.bias"), &[out])?,
        })
    }

    fn norm(&self, name: &str, width: usize) -> Result<Norm> {
        Ok(Norm {
            weight: self.tensor(&format!("{name}.weight"), &[width])?,
            bias: self.tensor(&format!("{name}.bias"), &[width])?,
        })
    }
}

impl BertModel {
    /// Loads the weights for `config` from `model.safetensors` at `path`
    /// (f32, f16 or bf16) onto `device`: f32 on the CPU, f16 elsewhere.
    /// Every tensor must be there in the shape the config gives.
    pub fn load(config: BertConfig, path: &Path, device: &Device) -> Result<BertModel> {
        let file = SafetensorsFile::open(path)?;
        let probe = "embeddings.word_embeddings.weight";
        let prefix = if file.tensors().contains_key(probe) {
            ""
        } else if file.tensors().contains_key(&format!("bert.{probe}")) {
            "bert."
        } else {
            return Err(Error::File {
                path: path.to_path_buf(),
                what: format!("has no tensor `{probe}` (nor `bert.{probe}`): not a BERT model"),
            });
        };
        let load = Loader {
            file: &file,
            prefix,
            device,
            dtype: match device {
                Device::Cpu => DType::F32,
                _ => DType::F16,
            },
        };
        let (h, i) = (config.hidden_size, config.intermediate_size);
        let types = load.values(
            "embeddings.token_type_embeddings.weight",
            &[config.type_vocab_size, h],
        )?;
        let positions = config.max_position_embeddings;
        let mut position_type =
            load.values("embeddings.position_embeddings.weight", &[positions, h])?;
        for row in position_type.chunks_exact_mut(h) {
            row.iter_mut().zip(&types[..h]).for_each(|(p, &t)| *p += t);
        }
        let layers = (0..config.num_hidden_layers)
            .map(|l| {
                let p = format!("encoder.layer.{l}");
                Ok(Layer {
                    query: load.linear(&format!("{p}.attention.self.query"), h, h)?,
                    key: load.linear(&format!("{p}.attention.self.key"), h, h)?,
                    value: load.linear(&format!("{p}.attention.self.value"), h, h)?,
                    attention_out: load.linear(&format!("{p}.attention.output.dense"), h, h)?,
                    attention_norm: load.norm(&format!("{p}.attention.output.LayerNorm"), h)?,
                    intermediate: load.linear(&format!("{p}.intermediate.dense"), i, h)?,
                    output: load.linear(&format!("{p}.output.dense"), h, i)?,
                    output_norm: load.norm(&format!("{p}.output.LayerNorm"), h)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(BertModel {
            word_embeddings: load
                .tensor("embeddings.word_embeddings.weight", &[config.vocab_size, h])?,
            position_type_embeddings: Tensor::from_f32(
                &position_type,
                &[positions, h],
                load.dtype,
                device,
            )?,
            embedding_norm: load.norm("embeddings.LayerNorm", h)?,
            layers,
            config,
        })
    }

    /// The model's configuration.
    pub fn config(&self) -> &BertConfig {
        &self.config
    }

    /// The last hidden state [Σ lens, hidden] of the sequences `ids`, packed
    /// one after another (sequence b's tokens follow sequence b − 1's), in
    /// f32 on the host. Every id must be below vocab_size and every sequence
    /// no longer than max_position_embeddings (the encoder checks both).
    pub fn forward(&self, ids: &[&[u32]]) -> Result<Vec<f32>> {
        let c = &self.config;
        let (h, heads) = (c.hidden_size, c.num_attention_heads);
        let mut cu_seqlens = vec![0u32];
        let mut flat = Vec::new();
        let mut positions = Vec::new();
        for seq in ids {
            flat.extend_from_slice(seq);
            positions.extend(0..seq.len() as u32);
            cu_seqlens.push(flat.len() as u32);
        }
        let tokens = flat.len();
        if tokens == 0 {
            return Ok(Vec::new());
        }
        let dtype = self.word_embeddings.dtype();
        let eps = c.layer_norm_eps;
        let mut hidden = ops::embedding::forward(&self.word_embeddings, &flat, dtype)?;
        let position_type =
            ops::embedding::forward(&self.position_type_embeddings, &positions, dtype)?;
        let norm = &self.embedding_norm;
        ops::layernorm::residual_forward(
            &mut hidden,
            &position_type,
            &norm.weight,
            &norm.bias,
            eps,
        )?;

        let by_head = [tokens, heads, c.head_dim()];
        let attention = AttentionConfig {
            causal: false,
            scale: None,
        };
        for layer in &self.layers {
            let project = |l: &Linear| l.forward(&hidden, Activation::Identity)?.reshape(&by_head);
            let (q, k, v) = (
                project(&layer.query)?,
                project(&layer.key)?,
                project(&layer.value)?,
            );
            let context =
                ops::attention::forward(&q, &k, &v, Batch::Packed(&cu_seqlens), &attention)?
                    .o
                    .reshape(&[tokens, h])?;
            let out = layer
                .attention_out
                .forward(&context, Activation::Identity)?;
            let n = &layer.attention_norm;
            ops::layernorm::residual_forward(&mut hidden, &out, &n.weight, &n.bias, eps)?;
            let inner = layer.intermediate.forward(&hidden, Activation::Gelu)?;
            let out = layer.output.forward(&inner, Activation::Identity)?;
            let n = &layer.output_norm;
            ops::layernorm::residual_forward(&mut hidden, &out, &n.weight, &n.bias, eps)?;
        }
        hidden.to_f32_vec()
    }
}
