//! A Llama model's `config.json` as transformers writes it, in both forms:
//! transformers 5 (`rope_parameters`, `dtype`) and older (`rope_theta`,
//! `rope_scaling`, `torch_dtype`). Anything this crate's Llama cannot run —
//! another `model_type`, rope scaling, biases, another activation — is an
//! [`Error::File`] naming the field, never a silently different model.

use std::path::Path;

use serde_json::{Map, Value};

use crate::{DType, Error, Result};

/// The architecture of a Llama 2 model (and of any checkpoint saved the same way).
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    /// Tokens in the vocabulary: rows of the embedding and the LM head.
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the SwiGLU MLP (gate and up projections).
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (grouped-query attention); divides the query heads.
    pub num_key_value_heads: usize,
    /// Elements per head (`hidden_size / num_attention_heads` unless given).
    pub head_dim: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f32,
    /// RoPE base.
    pub rope_theta: f32,
    /// Longest sequence the model was trained for.
    pub max_position_embeddings: usize,
    /// The LM head is the embedding matrix.
    pub tie_word_embeddings: bool,
    /// The dtype the checkpoint says it was saved in, if it says.
    pub dtype: Option<DType>,
    /// Beginning-of-sequence token, if given.
    pub bos_token_id: Option<u32>,
    /// End-of-sequence tokens (one or several), if given.
    pub eos_token_ids: Vec<u32>,
    /// Padding token, if given.
    pub pad_token_id: Option<u32>,
}

impl LlamaConfig {
    /// Reads `config.json` at `path`.
    pub fn from_file(path: &Path) -> Result<LlamaConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::File {
            path: path.to_path_buf(),
            what: format!("cannot read: {e}"),
        })?;
        LlamaConfig::from_json(&text, path)
    }

    /// Parses the text of a `config.json`; `path` names it in errors.
    pub fn from_json(text: &str, path: &Path) -> Result<LlamaConfig> {
        let fail = |what: String| Error::File {
            path: path.to_path_buf(),
            what,
        };
        let value: Value =
            serde_json::from_str(text).map_err(|e| fail(format!("not JSON: {e}")))?;
        let Value::Object(map) = value else {
            return Err(fail("is not a JSON object".into()));
        };
        let fields = Fields {
            map: &map,
            fail: &fail,
        };
        let model_type = fields.string("model_type")?;
        if model_type.as_deref() != Some("llama") {
            return Err(fail(format!(
                "model_type is {}; this model runs \"llama\" checkpoints only",
                model_type.map_or("missing".into(), |t| format!("{t:?}"))
            )));
        }
        for field in ["attention_bias", "mlp_bias"] {
            if fields.boolean(field)? == Some(true) {
                return Err(fail(format!("{field} is true; this model has no biases")));
            }
        }
        if let Some(act) = fields.string("hidden_act")? {
            if act != "silu" {
                return Err(fail(format!(
                    "hidden_act is {act:?}; this model runs \"silu\" (SwiGLU)"
                )));
            }
        }
        let heads = fields.positive("num_attention_heads")?;
        let hidden = fields.positive("hidden_size")?;
        let kv_heads = fields
            .optional_positive("num_key_value_heads")?
            .unwrap_or(heads);
        if heads % kv_heads != 0 {
            return Err(fail(format!(
                "num_key_value_heads {kv_heads} does not divide num_attention_heads {heads}"
            )));
        }
        let head_dim = match fields.optional_positive("head_dim")? {
            Some(d) => d,
            None if hidden % heads == 0 => hidden / heads,
            None => {
                return Err(fail(format!(
                    "hidden_size {hidden} is not a multiple of num_attention_heads {heads}, and there is no head_dim"
                )))
            }
        };
        Ok(LlamaConfig {
            vocab_size: fields.positive("vocab_size")?,
            hidden_size: hidden,
            intermediate_size: fields.positive("intermediate_size")?,
            num_hidden_layers: fields.positive("num_hidden_layers")?,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim,
            rms_norm_eps: fields.number("rms_norm_eps")?.unwrap_or(1e-6) as f32,
            rope_theta: rope_theta(&fields)?,
            max_position_embeddings: fields
                .optional_positive("max_position_embeddings")?
                .unwrap_or(2048),
            tie_word_embeddings: fields.boolean("tie_word_embeddings")?.unwrap_or(false),
            dtype: dtype(&fields)?,
            bos_token_id: fields.token("bos_token_id")?,
            pad_token_id: fields.token("pad_token_id")?,
            eos_token_ids: match map.get("eos_token_id") {
                Some(Value::Array(ids)) => ids
                    .iter()
                    .map(|v| {
                        token_id(v)
                            .ok_or_else(|| fail(format!("eos_token_id holds {v}, not a token id")))
                    })
                    .collect::<Result<_>>()?,
                _ => fields.token("eos_token_id")?.into_iter().collect(),
            },
        })
    }

    /// The config as transformers 5 writes `config.json` for a
    /// `LlamaForCausalLM` of this architecture saved in `dtype`.
    pub fn to_json(&self, dtype: DType) -> Value {
        let dtype = match dtype {
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
            _ => "float32",
        };
        serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "attention_bias": false,
            "attention_dropout": 0.0,
            "mlp_bias": false,
            "hidden_act": "silu",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": {"rope_theta": self.rope_theta, "rope_type": "default"},
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "initializer_range": 0.02,
            "pretraining_tp": 1,
            "use_cache": true,
            "dtype": dtype,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": match self.eos_token_ids.as_slice() {
                [one] => serde_json::json!(one),
                many => serde_json::json!(many),
            },
            "pad_token_id": self.pad_token_id,
        })
    }

    /// Width of the q projection's output (heads × head_dim).
    pub fn q_width(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }

    /// Width of the k and v projections' outputs (kv heads × head_dim).
    pub fn kv_width(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }
}

/// The RoPE base, from `rope_parameters` (transformers 5) or `rope_theta`;
/// any rope type or scaling but the default is refused.
fn rope_theta(fields: &Fields) -> Result<f32> {
    let check_type = |section: &str, params: &Map<String, Value>| -> Result<()> {
        let kind = params.get("rope_type").or_else(|| params.get("type"));
        match kind.and_then(Value::as_str) {
            None | Some("default") => Ok(()),
            Some(other) => Err((fields.fail)(format!(
                "{section} asks for rope type {other:?}; this model implements the default RoPE only"
            ))),
        }
    };
    match fields.map.get("rope_scaling") {
        None | Some(Value::Null) => {}
        Some(Value::Object(params)) => check_type("rope_scaling", params)?,
        Some(other) => {
            return Err((fields.fail)(format!(
                "rope_scaling is {other}, expected an object or null"
            )))
        }
    }
    if let Some(params) = fields.map.get("rope_parameters") {
        let Value::Object(params) = params else {
            return Err((fields.fail)(format!(
                "rope_parameters is {params}, expected an object"
            )));
        };
        check_type("rope_parameters", params)?;
        if let Some(theta) = params.get("rope_theta") {
            return theta.as_f64().map(|t| t as f32).ok_or_else(|| {
                (fields.fail)(format!(
                    "rope_parameters.rope_theta is {theta}, expected a number"
                ))
            });
        }
    }
    Ok(fields.number("rope_theta")?.unwrap_or(10000.0) as f32)
}

/// `dtype` (transformers 5) or `torch_dtype` (older).
fn dtype(fields: &Fields) -> Result<Option<DType>> {
    for field in ["dtype", "torch_dtype"] {
        if let Some(name) = fields.string(field)? {
            return match name.as_str() {
                "float32" => Ok(Some(DType::F32)),
                "float16" => Ok(Some(DType::F16)),
                "bfloat16" => Ok(Some(DType::BF16)),
                other => Err((fields.fail)(format!(
                    "{field} is {other:?}; expected float32, float16 or bfloat16"
                ))),
            };
        }
    }
    Ok(None)
}

fn token_id(v: &Value) -> Option<u32> {
    v.as_u64().and_then(|id| u32::try_from(id).ok())
}

/// Typed access to the fields of one config, each error naming the field.
struct Fields<'a> {
    map: &'a Map<String, Value>,
    fail: &'a dyn Fn(String) -> Error,
}

impl Fields<'_> {
    fn get(&self, field: &str) -> Option<&Value> {
        self.map.get(field).filter(|v| !v.is_null())
    }

    fn wrong(&self, field: &str, v: &Value, expected: &str) -> Error {
        (self.fail)(format!("{field} is {v}, expected {expected}"))
    }

    fn string(&self, field: &str) -> Result<Option<String>> {
        self.get(field)
            .map(|v| {
                v.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| self.wrong(field, v, "a string"))
            })
            .transpose()
    }

    fn boolean(&self, field: &str) -> Result<Option<bool>> {
        self.get(field)
            .map(|v| {
                v.as_bool()
                    .ok_or_else(|| self.wrong(field, v, "true or false"))
            })
            .transpose()
    }

    fn number(&self, field: &str) -> Result<Option<f64>> {
        self.get(field)
            .map(|v| v.as_f64().ok_or_else(|| self.wrong(field, v, "a number")))
            .transpose()
    }

    fn token(&self, field: &str) -> Result<Option<u32>> {
        self.get(field)
            .map(|v| token_id(v).ok_or_else(|| self.wrong(field, v, "a token id")))
            .transpose()
    }

    fn optional_positive(&self, field: &str) -> Result<Option<usize>> {
        self.get(field)
            .map(|v| {
                v.as_u64()
                    .filter(|&n| n > 0)
                    .and_then(|n| usize::try_from(n).ok())
                    .ok_or_else(|| self.wrong(field, v, "a positive integer"))
            })
            .transpose()
    }

    fn positive(&self, field: &str) -> Result<usize> {
        self.optional_positive(field)?
            .ok_or_else(|| (self.fail)(format!("{field} is missing")))
    }
}
