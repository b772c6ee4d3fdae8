//! PEFT LoRA adapters: `adapter_config.json` + `adapter_model.safetensors`,
//! read and written in the form PEFT saves and loads.
//!
//! Keys look like `base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight`
//! (A [r, in]) and `...lora_B.weight` (B [out, r]). The factors are kept as
//! fp32 host vectors (the masters training updates); the model copies them
//! to its device. Anything of PEFT this crate does not implement (DoRA,
//! per-module ranks, biases, fan_in_fan_out, extra saved modules) is refused
//! by name, never ignored.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{json, Value};

use super::LlamaConfig;
use crate::formats::safetensors::{self as st, SafetensorsFile, TensorBytes};
use crate::output::Outputs;
use crate::{Error, Result};

/// The adapter config file's name.
pub const CONFIG_NAME: &str = "adapter_config.json";
/// The adapter weights file's name.
pub const WEIGHTS_NAME: &str = "adapter_model.safetensors";

/// A Llama projection LoRA can target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Module {
    /// self_attn.q_proj
    Q,
    /// self_attn.k_proj
    K,
    /// self_attn.v_proj
    V,
    /// self_attn.o_proj
    O,
    /// mlp.gate_proj
    Gate,
    /// mlp.up_proj
    Up,
    /// mlp.down_proj
    Down,
}

impl serde::Serialize for Module {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> serde::Deserialize<'de> for Module {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Module, D::Error> {
        let name = String::deserialize(d)?;
        Module::from_name(&name)
            .ok_or_else(|| serde::de::Error::custom(format!("`{name}` is not a Llama projection")))
    }
}

impl Module {
    /// All seven, in a layer's order.
    pub const ALL: [Module; 7] = [
        Module::Q,
        Module::K,
        Module::V,
        Module::O,
        Module::Gate,
        Module::Up,
        Module::Down,
    ];

    /// The module's name (`q_proj`).
    pub fn name(self) -> &'static str {
        match self {
            Module::Q => "q_proj",
            Module::K => "k_proj",
            Module::V => "v_proj",
            Module::O => "o_proj",
            Module::Gate => "gate_proj",
            Module::Up => "up_proj",
            Module::Down => "down_proj",
        }
    }

    /// Its path inside a decoder layer (`self_attn.q_proj`).
    pub fn path(self) -> &'static str {
        match self {
            Module::Q => "self_attn.q_proj",
            Module::K => "self_attn.k_proj",
            Module::V => "self_attn.v_proj",
            Module::O => "self_attn.o_proj",
            Module::Gate => "mlp.gate_proj",
            Module::Up => "mlp.up_proj",
            Module::Down => "mlp.down_proj",
        }
    }

    /// The module called `name`, if it is one.
    pub fn from_name(name: &str) -> Option<Module> {
        Module::ALL.into_iter().find(|m| m.name() == name)
    }

    /// [out, in] of its weight in a model of `config`.
    pub fn shape(self, config: &LlamaConfig) -> [usize; 2] {
        let (h, i) = (config.hidden_size, config.intermediate_size);
        match self {
            Module::Q => [config.q_width(), h],
            Module::K | Module::V => [config.kv_width(), h],
            Module::O => [h, config.q_width()],
            Module::Gate | Module::Up => [i, h],
            Module::Down => [h, i],
        }
    }

    /// The base checkpoint's key of layer `layer`'s weight.
    pub fn weight_key(self, layer: usize) -> String {
        format!("model.layers.{layer}.{}.weight", self.path())
    }

    /// (layer, module) of a base checkpoint key `model.layers.N.<path>.weight`.
    pub fn parse_weight_key(key: &str) -> Option<(usize, Module)> {
        let rest = key.strip_prefix("model.layers.")?;
        let (layer, rest) = rest.split_once('.')?;
        let path = rest.strip_suffix(".weight")?;
        let module = Module::ALL.into_iter().find(|m| m.path() == path)?;
        Some((layer.parse().ok()?, module))
    }
}

/// The LoRA hyper-parameters of `adapter_config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterConfig {
    /// Rank r.
    pub r: usize,
    /// lora_alpha.
    pub alpha: f32,
    /// Scale alpha / √r instead of alpha / r.
    pub use_rslora: bool,
    /// lora_dropout (training only).
    pub dropout: f32,
    /// The targeted modules (`all-linear` expands to all seven).
    pub targets: Vec<Module>,
    /// base_model_name_or_path, carried through when saving.
    pub base_model: Option<String>,
}

impl AdapterConfig {
    /// The scale s of the update s · B A.
    pub fn scale(&self) -> f32 {
        if self.use_rslora {
            self.alpha / (self.r as f32).sqrt()
        } else {
            self.alpha / self.r as f32
        }
    }

    /// Parses `adapter_config.json`'s text; `path` names it in errors.
    pub fn from_json(text: &str, path: &Path) -> Result<AdapterConfig> {
        let fail = |what: String| Error::File {
            path: path.to_path_buf(),
            what,
        };
        let v: Value = serde_json::from_str(text).map_err(|e| fail(format!("not JSON: {e}")))?;
        let map = v
            .as_object()
            .ok_or_else(|| fail("is not a JSON object".into()))?;
        let get = |k: &str| map.get(k).filter(|v| !v.is_null());
        match get("peft_type").and_then(Value::as_str) {
            Some("LORA") => {}
            other => {
                return Err(fail(format!(
                    "peft_type is {}; this crate loads \"LORA\" adapters",
                    other.map_or("missing".into(), |t| format!("{t:?}"))
                )))
            }
        }
        let unsupported_true = ["use_dora", "fan_in_fan_out", "lora_bias", "use_qalora"];
        for k in unsupported_true {
            if get(k).and_then(Value::as_bool) == Some(true) {
                return Err(fail(format!(
                    "{k} is true; this crate implements plain LoRA"
                )));
            }
        }
        if let Some(bias) = get("bias").and_then(Value::as_str) {
            if bias != "none" {
                return Err(fail(format!(
                    "bias is {bias:?}; this crate's LoRA has no biases"
                )));
            }
        }
        for k in ["rank_pattern", "alpha_pattern"] {
            if get(k)
                .and_then(Value::as_object)
                .is_some_and(|m| !m.is_empty())
            {
                return Err(fail(format!(
                    "{k} is not empty; per-module ranks and alphas are not supported"
                )));
            }
        }
        for k in [
            "modules_to_save",
            "layers_to_transform",
            "layer_replication",
            "exclude_modules",
        ] {
            if get(k).is_some_and(|v| !v.as_array().is_some_and(Vec::is_empty)) {
                return Err(fail(format!("{k} is set; this crate does not support it")));
            }
        }
        let r = get("r")
            .and_then(Value::as_u64)
            .filter(|&r| r > 0)
            .ok_or_else(|| fail(format!("r is {:?}, expected a positive integer", get("r"))))?
            as usize;
        let alpha = get("lora_alpha")
            .and_then(Value::as_f64)
            .ok_or_else(|| fail("lora_alpha is missing or not a number".into()))?
            as f32;
        let targets = match get("target_modules") {
            Some(Value::String(s)) if s == "all-linear" => Module::ALL.to_vec(),
            Some(Value::String(s)) => {
                return Err(fail(format!(
                    "target_modules is the pattern {s:?}; give a list of module names or \"all-linear\""
                )))
            }
            Some(Value::Array(list)) => {
                let mut out = Vec::new();
                for item in list {
                    let name = item.as_str().unwrap_or_default();
                    let m = Module::from_name(name).ok_or_else(|| {
                        fail(format!(
                            "target_modules names {item}; a Llama layer has q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj"
                        ))
                    })?;
                    if !out.contains(&m) {
                        out.push(m);
                    }
                }
                out.sort();
                out
            }
            other => {
                return Err(fail(format!(
                    "target_modules is {other:?}, expected a list of names or \"all-linear\""
                )))
            }
        };
        if targets.is_empty() {
            return Err(fail("target_modules is empty".into()));
        }
        Ok(AdapterConfig {
            r,
            alpha,
            use_rslora: get("use_rslora").and_then(Value::as_bool).unwrap_or(false),
            dropout: get("lora_dropout").and_then(Value::as_f64).unwrap_or(0.0) as f32,
            targets,
            base_model: get("base_model_name_or_path")
                .and_then(Value::as_str)
                .map(str::to_string),
        })
    }

    /// The JSON PEFT writes (and reads back) for this config.
    pub fn to_json(&self) -> Value {
        json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": self.base_model,
            "r": self.r,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "use_rslora": self.use_rslora,
            "target_modules": self.targets.iter().map(|m| m.name()).collect::<Vec<_>>(),
            "bias": "none",
            "fan_in_fan_out": false,
            "inference_mode": true,
            "init_lora_weights": true,
            "use_dora": false,
            "modules_to_save": null,
            "layers_to_transform": null,
            "rank_pattern": {},
            "alpha_pattern": {},
        })
    }
}

/// One layer's factors, fp32, row-major: A [r, in], B [out, r].
#[derive(Debug, Clone, PartialEq)]
pub struct Factors {
    /// lora_A.
    pub a: Vec<f32>,
    /// lora_B.
    pub b: Vec<f32>,
}

/// A LoRA adapter for a Llama model.
#[derive(Debug, Clone, PartialEq)]
pub struct Adapter {
    /// Hyper-parameters.
    pub config: AdapterConfig,
    /// Factors of every targeted (layer, module).
    pub factors: BTreeMap<(usize, Module), Factors>,
}

/// The (A, B) factors of one module as read so far.
type HalfRead = (Option<Vec<f32>>, Option<Vec<f32>>);

/// The PEFT adapter key of factor `factor` ('A' or 'B') of `module` in `layer`.
pub(crate) fn peft_key(layer: usize, module: Module, factor: char) -> String {
    format!(
        "base_model.model.model.layers.{layer}.{}.lora_{factor}.weight",
        module.path()
    )
}

/// (layer, module, 'A' or 'B') of a PEFT adapter key.
fn parse_peft_key(key: &str) -> Option<(usize, Module, char)> {
    let rest = key.strip_prefix("base_model.model.")?;
    let (base, factor) = if let Some(b) = rest.strip_suffix(".lora_A.weight") {
        (b, 'A')
    } else {
        (rest.strip_suffix(".lora_B.weight")?, 'B')
    };
    let (layer, module) = Module::parse_weight_key(&format!("{base}.weight"))?;
    Some((layer, module, factor))
}

impl Adapter {
    /// Reads the adapter folder `dir` for a base model of `model`: every
    /// key must be a factor of a targeted module of an existing layer, of the
    /// shape the model and r give, and every targeted module of every layer
    /// must have both factors. Errors name the key.
    pub fn load(dir: &Path, model: &LlamaConfig) -> Result<Adapter> {
        let config_path = dir.join(CONFIG_NAME);
        let text = std::fs::read_to_string(&config_path).map_err(|e| Error::File {
            path: config_path.clone(),
            what: format!("cannot read: {e}"),
        })?;
        let config = AdapterConfig::from_json(&text, &config_path)?;
        let weights_path = dir.join(WEIGHTS_NAME);
        let file = SafetensorsFile::open(&weights_path)?;
        let fail = |what: String| Error::File {
            path: weights_path.clone(),
            what,
        };
        let mut a_b: BTreeMap<(usize, Module), HalfRead> = BTreeMap::new();
        for (key, info) in file.tensors() {
            let (layer, module, factor) = parse_peft_key(key).ok_or_else(|| {
                fail(format!(
                    "key `{key}` is not a LoRA factor of a Llama projection (base_model.model.model.layers.N.<module>.lora_A/B.weight)"
                ))
            })?;
            if layer >= model.num_hidden_layers {
                return Err(fail(format!(
                    "key `{key}`: the base model has {} layers",
                    model.num_hidden_layers
                )));
            }
            if !config.targets.contains(&module) {
                return Err(fail(format!(
                    "key `{key}`: {} is not in the adapter config's target_modules",
                    module.name()
                )));
            }
            let [out, inp] = module.shape(model);
            let want = if factor == 'A' {
                [config.r, inp]
            } else {
                [out, config.r]
            };
            if info.shape != want {
                return Err(fail(format!(
                    "key `{key}` has shape {:?}, expected {want:?} (r {}, {} [{out}, {inp}])",
                    info.shape,
                    config.r,
                    module.name()
                )));
            }
            if !info.dtype.is_float() {
                return Err(fail(format!("key `{key}` has dtype {}", info.dtype)));
            }
            let values = file.load_f32(key)?;
            let slot = a_b.entry((layer, module)).or_default();
            if factor == 'A' {
                slot.0 = Some(values);
            } else {
                slot.1 = Some(values);
            }
        }
        let mut factors = BTreeMap::new();
        for layer in 0..model.num_hidden_layers {
            for &module in &config.targets {
                let (a, b) = a_b.remove(&(layer, module)).unwrap_or_default();
                let missing = |f| fail(format!("has no key `{}`", peft_key(layer, module, f)));
                factors.insert(
                    (layer, module),
                    Factors {
                        a: a.ok_or_else(|| missing('A'))?,
                        b: b.ok_or_else(|| missing('B'))?,
                    },
                );
            }
        }
        Ok(Adapter { config, factors })
    }

    /// Writes the adapter as the folder `dir` (config + weights, fp32), the
    /// form PEFT's `PeftModel.from_pretrained` loads; refused when `dir`
    /// exists. Written under a temporary name and renamed.
    pub fn save(&self, dir: &Path, outputs: &Outputs) -> Result<()> {
        if dir.exists() {
            return Err(Error::Output {
                path: dir.to_path_buf(),
                what: "exists already; choose a new folder".into(),
            });
        }
        let config = serde_json::to_string_pretty(&self.config.to_json()).expect("JSON");
        let keys: Vec<(String, [usize; 2], &[f32])> = self
            .factors
            .iter()
            .flat_map(|(&(layer, module), f)| {
                let r = self.config.r;
                let a_shape = [r, f.a.len() / r];
                let b_shape = [f.b.len() / r, r];
                [
                    (peft_key(layer, module, 'A'), a_shape, f.a.as_slice()),
                    (peft_key(layer, module, 'B'), b_shape, f.b.as_slice()),
                ]
            })
            .collect();
        outputs.write_dir(dir, |tmp: &Path| {
            let tensors: Vec<TensorBytes<'_>> = keys
                .iter()
                .map(|(name, shape, values)| TensorBytes::f32(name, shape, values))
                .collect();
            let inner = Outputs::default();
            let mut group = inner.group();
            let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
            st::write(&mut group, &tmp.join(WEIGHTS_NAME), &tensors, &meta)?;
            group.file(&tmp.join(CONFIG_NAME), |w| w.write_all(config.as_bytes()))?;
            group.commit()
        })
    }
}
