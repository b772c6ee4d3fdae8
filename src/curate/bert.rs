//! A BERT encoder (the transformer of a sentence-transformers model such as
//! all-MiniLM-L6-v2) on the host: `config.json` and `model.safetensors` as
//! Hugging Face's `BertModel` saves them, and its forward pass over packed
//! sequences.
//!
//! Sequences are packed token after token, no padding at all: every
//! per-token step (embeddings, the Linear layers, LayerNorm, GELU) runs on
//! the batch's real tokens only, and attention ([`crate::host::attention`],
//! non-causal) is limited to each sequence's own span. The Linear layers are
//! [`crate::host::gemm::matmul_nt`] with the bias as the accumulator's start
//! (beta 1), so a bias costs no extra pass.
//!
//! Per token and layer the forward does 2·(4·h² + 2·h·i) FLOPs in the GEMMs
//! (h hidden, i intermediate; 21 MFLOP per token over the 6 layers of
//! all-MiniLM-L6-v2) plus attention's 4·L·h for a sequence of L tokens.

use std::path::Path;

use serde::Deserialize;

use crate::cpu::attention::SeqSpan;
use crate::formats::safetensors::SafetensorsFile;
use crate::host::attention::{attention_forward, KvDims};
use crate::host::elementwise::{gelu_erf, layernorm, residual_layernorm};
use crate::host::gemm::{matmul_nt, Weights};
use crate::{Error, Result};

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

/// A Linear layer: weight [out, in] and bias [out], in f32.
#[derive(Debug)]
struct Linear {
    weight: Vec<f32>,
    bias: Vec<f32>,
}

/// A LayerNorm's scale and shift.
#[derive(Debug)]
struct Norm {
    weight: Vec<f32>,
    bias: Vec<f32>,
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

/// A BERT encoder's weights in f32, ready for [`BertModel::forward`].
#[derive(Debug)]
pub struct BertModel {
    config: BertConfig,
    word_embeddings: Vec<f32>,
    position_embeddings: Vec<f32>,
    /// Row 0 of the token-type table: every token is segment A.
    type_embedding: Vec<f32>,
    embedding_norm: Norm,
    layers: Vec<Layer>,
}

/// Loads the tensors of one model file by their shapes, with the prefix
/// its names carry (`bert.` when saved from a task model, none from
/// `BertModel`).
struct Loader<'a> {
    file: &'a SafetensorsFile,
    prefix: &'static str,
}

impl Loader<'_> {
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
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
    /// (f32, f16 or bf16, widened to f32): every tensor must be there in the
    /// shape the config gives.
    pub fn load(config: BertConfig, path: &Path) -> Result<BertModel> {
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
        };
        let (h, i) = (config.hidden_size, config.intermediate_size);
        let types = load.tensor(
            "embeddings.token_type_embeddings.weight",
            &[config.type_vocab_size, h],
        )?;
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
            position_embeddings: load.tensor(
                "embeddings.position_embeddings.weight",
                &[config.max_position_embeddings, h],
            )?,
            type_embedding: types[..h].to_vec(),
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
    /// one after another (sequence b's tokens are rows spans[b]). Every id
    /// must be below vocab_size and every sequence no longer than
    /// max_position_embeddings (the encoder checks both).
    pub fn forward(&self, ids: &[&[u32]]) -> Vec<f32> {
        let c = &self.config;
        let h = c.hidden_size;
        let mut spans = Vec::with_capacity(ids.len());
        let mut tokens = 0;
        for seq in ids {
            spans.push(SeqSpan {
                start: tokens,
                len: seq.len(),
            });
            tokens += seq.len();
        }
        let mut hidden = vec![0.0f32; tokens * h];
        for (seq, span) in ids.iter().zip(&spans) {
            let rows = &mut hidden[span.start * h..(span.start + span.len) * h];
            for (pos, (row, &id)) in rows.chunks_exact_mut(h).zip(seq.iter()).enumerate() {
                let word = &self.word_embeddings[id as usize * h..][..h];
                let position = &self.position_embeddings[pos * h..][..h];
                for (((r, &w), &p), &t) in row
                    .iter_mut()
                    .zip(word)
                    .zip(position)
                    .zip(&self.type_embedding)
                {
                    *r = w + p + t;
                }
            }
        }
        let mut normed = vec![0.0f32; tokens * h];
        let norm = &self.embedding_norm;
        layernorm(
            &hidden,
            &norm.weight,
            &norm.bias,
            h,
            c.layer_norm_eps,
            &mut normed,
        );
        let mut hidden = normed;

        let dims = KvDims {
            q_tokens: tokens,
            kv_tokens: tokens,
            q_heads: c.num_attention_heads,
            kv_heads: c.num_attention_heads,
            head_dim: c.head_dim(),
        };
        let scale = 1.0 / (c.head_dim() as f32).sqrt();
        let mut buffers = Buffers::new(tokens, h, c.intermediate_size, c.num_attention_heads);
        for layer in &self.layers {
            let b = &mut buffers;
            linear(&hidden, &layer.query, tokens, h, &mut b.q);
            linear(&hidden, &layer.key, tokens, h, &mut b.k);
            linear(&hidden, &layer.value, tokens, h, &mut b.v);
            attention_forward(
                &b.q,
                &b.k,
                &b.v,
                &dims,
                &spans,
                &spans,
                scale,
                false,
                &mut b.context,
                &mut b.lse,
            );
            linear(&b.context, &layer.attention_out, tokens, h, &mut b.q);
            let n = &layer.attention_norm;
            residual_layernorm(&mut hidden, &b.q, &n.weight, &n.bias, h, c.layer_norm_eps);
            linear(&hidden, &layer.intermediate, tokens, h, &mut b.intermediate);
            gelu_erf(&mut b.intermediate);
            linear(
                &b.intermediate,
                &layer.output,
                tokens,
                c.intermediate_size,
                &mut b.q,
            );
            let n = &layer.output_norm;
            residual_layernorm(&mut hidden, &b.q, &n.weight, &n.bias, h, c.layer_norm_eps);
        }
        hidden
    }
}

/// The activations one layer writes, reused by every layer.
struct Buffers {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    context: Vec<f32>,
    lse: Vec<f32>,
    intermediate: Vec<f32>,
}

impl Buffers {
    fn new(tokens: usize, hidden: usize, intermediate: usize, heads: usize) -> Buffers {
        let activation = || vec![0.0f32; tokens * hidden];
        Buffers {
            q: activation(),
            k: activation(),
            v: activation(),
            context: activation(),
            lse: vec![0.0; heads * tokens],
            intermediate: vec![0.0; tokens * intermediate],
        }
    }
}

/// y [tokens, out] = x [tokens, inp] · Wᵀ + bias.
fn linear(x: &[f32], layer: &Linear, tokens: usize, inp: usize, y: &mut [f32]) {
    let out = layer.bias.len();
    for row in y.chunks_exact_mut(out) {
        row.copy_from_slice(&layer.bias);
    }
    matmul_nt(
        x,
        Weights::F32(&layer.weight),
        tokens,
        inp,
        out,
        1.0,
        1.0,
        y,
    );
}
