//! The Llama model against what transformers + PEFT computed on the same
//! checkpoint (`../shared/fixtures/dev`, see its meta.json): logits, residual
//! stream, final norm and loss of the base model and with the adapter;
//! the merged weights; adapters and sharded checkpoints written and read
//! back; and the errors of bad checkpoints and adapters.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::dev::{dev_dir, Step};
use common::Scratch;
use platypus::formats::safetensors::{self as st, Checkpoint, SafetensorsFile, TensorBytes};
use platypus::llama::generate::{generate, GenerateConfig, Sampling};
use platypus::llama::merge::merge;
use platypus::llama::model::{Forward, KvCache};
use platypus::llama::{Adapter, Llama, LlamaConfig, TokenBatch};
use platypus::output::Outputs;
use platypus::{DType, Device, Error, Tensor};

/// max |got − want| over the real tokens' rows (of `width`), relative to
/// the largest |want| there.
fn rel_diff(got: &[f32], want: &[f32], rows: &[usize], width: usize) -> f64 {
    let (mut diff, mut scale) = (0.0f64, 0.0f64);
    for &r in rows {
        for (g, w) in got[r * width..][..width]
            .iter()
            .zip(&want[r * width..][..width])
        {
            diff = diff.max((*g as f64 - *w as f64).abs());
            scale = scale.max((*w as f64).abs());
        }
    }
    diff / scale
}

/// max |a − b| over two tensors' values.
fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn load_base(dir: &Path) -> Llama {
    Llama::load(dir, &Device::Cpu).unwrap()
}

fn adapter(config: &LlamaConfig) -> Adapter {
    Adapter::load(&dev_dir().join("adapter"), config).unwrap()
}

/// The fp32 tolerance on the CPU: logits, hidden states and loss relative.
const F32_TOL: f64 = 1e-5;

/// Checks the logits of `fwd` against the fixture's `fixture` on the real
/// tokens, relative to their largest magnitude; returns that difference.
fn check_logits(model: &Llama, step: &Step, fwd: &Forward, fixture: &str, tol: f64) -> f64 {
    let logits = model.logits(&fwd.hidden).unwrap().to_f32_vec().unwrap();
    let want = step.f32s(fixture);
    let d = rel_diff(&logits, &want, &step.real_rows(), model.config.vocab_size);
    eprintln!("{fixture} on {}: relative difference {d:e}", model.device);
    assert!(d < tol, "{fixture}: relative difference {d:e}");
    d
}

#[test]
fn base_model_logits_and_loss_match_transformers_on_cpu() {
    let step = Step::load();
    let model = load_base(&dev_dir().join("base_model"));
    let fwd = model.forward(&step.batch(), false).unwrap();
    check_logits(&model, &step, &fwd, "base_logits", F32_TOL);
    let loss = model.loss(&step.batch(), &step.labels).unwrap();
    let want = step.scalar("base_loss");
    assert_eq!(loss.tokens, 25, "the fixture counts 25 shifted labels");
    assert!(
        ((loss.mean() - want) / want).abs() < 1e-5,
        "loss {} vs transformers {want}",
        loss.mean()
    );
}

#[test]
fn adapter_logits_hidden_states_and_loss_match_peft_on_cpu() {
    let step = Step::load();
    let mut model = load_base(&dev_dir().join("base_model"));
    model.attach(&adapter(&model.config)).unwrap();
    let fwd = model.forward(&step.batch(), true).unwrap();
    let rows = step.real_rows();
    let h = model.config.hidden_size;
    let n = model.config.num_hidden_layers;
    assert_eq!(fwd.residuals.len(), n + 1);
    for (i, name) in [(0, "hidden_0"), (1, "hidden_1"), (n, "last_layer_prenorm")] {
        let got = fwd.residuals[i].to_f32_vec().unwrap();
        let d = rel_diff(&got, &step.f32s(name), &rows, h);
        assert!(d < 1e-5, "{name}: relative difference {d:e}");
    }
    let d = rel_diff(
        &fwd.hidden.to_f32_vec().unwrap(),
        &step.f32s("hidden_2"),
        &rows,
        h,
    );
    assert!(d < 1e-5, "final norm: relative difference {d:e}");
    check_logits(&model, &step, &fwd, "logits", F32_TOL);
    let loss = model.loss(&step.batch(), &step.labels).unwrap().mean();
    let want = step.scalar("loss");
    assert!(
        ((loss - want) / want).abs() < 1e-5,
        "loss {loss} vs PEFT {want}"
    );
}

#[test]
fn merge_matches_peft_merged_weights_and_keeps_the_loss() {
    let step = Step::load();
    let scratch = Scratch::new("llama-merge");
    let out = scratch.path("merged");
    let base = dev_dir().join("base_model");
    let config = LlamaConfig::from_file(&base.join("config.json")).unwrap();
    let report = merge(&base, &[(adapter(&config), 1.0)], &out).unwrap();
    assert_eq!(report.tensors_merged, 14, "7 modules × 2 layers");
    assert!(report.max_abs_diff < 1e-6, "{report:?}");
    let ours = SafetensorsFile::open(&out.join("model.safetensors")).unwrap();
    let peft = SafetensorsFile::open(&dev_dir().join("merged/model.safetensors")).unwrap();
    assert_eq!(
        ours.tensors().keys().collect::<Vec<_>>(),
        peft.tensors().keys().collect::<Vec<_>>()
    );
    for name in peft.tensors().keys() {
        let d = max_diff(&ours.load_f32(name).unwrap(), &peft.load_f32(name).unwrap());
        assert!(d <= 1e-6, "{name}: max difference {d:e}");
    }
    for side in ["config.json", "generation_config.json"] {
        assert_eq!(
            std::fs::read(out.join(side)).unwrap(),
            std::fs::read(base.join(side)).unwrap()
        );
    }
    let merged = load_base(&out);
    let loss = merged.loss(&step.batch(), &step.labels).unwrap().mean();
    let want = step.scalar("loss");
    assert!(
        ((loss - want) / want).abs() < 1e-5,
        "merged loss {loss} vs {want}"
    );
    // A second merge onto the same folder is refused and leaves it as it was.
    let e = merge(&base, &[(adapter(&config), 1.0)], &out).unwrap_err();
    assert!(matches!(e, Error::Output { .. }), "{e}");
    assert!(out.join("model.safetensors").exists());
}

#[test]
fn two_adapters_merge_to_the_weighted_sum_of_their_deltas() {
    let scratch = Scratch::new("llama-merge2");
    let base = dev_dir().join("base_model");
    let config = LlamaConfig::from_file(&base.join("config.json")).unwrap();
    let a = adapter(&config);
    let mut b = a.clone();
    for f in b.factors.values_mut() {
        f.b.iter_mut().for_each(|v| *v = -*v * 0.5);
    }
    // 0.6·Δa + 0.4·(−Δa/2) = 0.4·Δa: the same as merging a alone at 0.4.
    merge(&base, &[(a.clone(), 0.6), (b, 0.4)], &scratch.path("two")).unwrap();
    merge(&base, &[(a, 0.4)], &scratch.path("one")).unwrap();
    let two = SafetensorsFile::open(&scratch.path("two/model.safetensors")).unwrap();
    let one = SafetensorsFile::open(&scratch.path("one/model.safetensors")).unwrap();
    for name in one.tensors().keys() {
        let d = max_diff(&two.load_f32(name).unwrap(), &one.load_f32(name).unwrap());
        assert!(d < 1e-6, "{name}: {d:e}");
    }
}

#[test]
fn an_adapter_saved_by_the_crate_loads_back_identically() {
    let scratch = Scratch::new("llama-adapter");
    let config = LlamaConfig::from_file(&dev_dir().join("base_model/config.json")).unwrap();
    let a = adapter(&config);
    let dir = scratch.path("saved");
    a.save(&dir, &Outputs::default()).unwrap();
    assert_eq!(Adapter::load(&dir, &config).unwrap(), a);
    let e = a.save(&dir, &Outputs::default()).unwrap_err();
    assert!(e.to_string().contains("exists already"), "{e}");
}

/// Writes the base model's tensors into `dir` as `shards` files (with an
/// index when more than one), in `dtype` (rounded to nearest) or as stored.
fn write_checkpoint(dir: &Path, shards: usize, dtype: Option<DType>) {
    let base = dev_dir().join("base_model");
    let file = SafetensorsFile::open(&base.join("model.safetensors")).unwrap();
    std::fs::create_dir_all(dir).unwrap();
    std::fs::copy(base.join("config.json"), dir.join("config.json")).unwrap();
    let names: Vec<&String> = file.tensors().keys().collect();
    let converted: BTreeMap<&str, Vec<u8>> = names
        .iter()
        .filter_map(|n| {
            let info = file.info(n).unwrap();
            let to = dtype.filter(|&d| d != info.dtype)?;
            let values = file.load_f32(n).unwrap();
            let t = Tensor::from_f32(&values, &info.shape, to, &Device::Cpu).unwrap();
            Some((n.as_str(), t.to_bytes().unwrap()))
        })
        .collect();
    let mut map = serde_json::Map::new();
    for (i, part) in names.chunks(names.len().div_ceil(shards)).enumerate() {
        let shard = if shards == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{shards:05}.safetensors", i + 1)
        };
        let tensors: Vec<TensorBytes<'_>> = part
            .iter()
            .map(|n| {
                let info = file.info(n).unwrap();
                TensorBytes {
                    name: n,
                    dtype: converted
                        .get(n.as_str())
                        .map_or(info.dtype, |_| dtype.unwrap()),
                    shape: &info.shape,
                    bytes: converted
                        .get(n.as_str())
                        .map_or_else(|| file.bytes(n).unwrap(), |b| b.as_slice()),
                }
            })
            .collect();
        let outputs = Outputs::default();
        let mut group = outputs.group();
        st::write(&mut group, &dir.join(&shard), &tensors, &BTreeMap::new()).unwrap();
        group.commit().unwrap();
        for n in part {
            map.insert(n.to_string(), shard.clone().into());
        }
    }
    if shards > 1 {
        let index = serde_json::json!({"metadata": {}, "weight_map": map});
        std::fs::write(dir.join(st::INDEX_NAME), index.to_string()).unwrap();
    }
}

#[test]
fn a_sharded_checkpoint_gives_the_same_logits_and_merges_shard_by_shard() {
    let step = Step::load();
    let scratch = Scratch::new("llama-shards");
    let dir = scratch.path("sharded");
    write_checkpoint(&dir, 2, None);
    let ckpt = Checkpoint::open(&dir).unwrap();
    assert!(ckpt.is_sharded());
    assert_eq!(ckpt.shards().len(), 2);
    let model = load_base(&dir);
    let fwd = model.forward(&step.batch(), false).unwrap();
    check_logits(&model, &step, &fwd, "base_logits", F32_TOL);
    let out = scratch.path("merged");
    let report = merge(&dir, &[(adapter(&model.config), 1.0)], &out).unwrap();
    assert_eq!(report.shards, 2);
    assert!(out.join(st::INDEX_NAME).exists());
    let merged = Checkpoint::open(&out).unwrap();
    assert_eq!(merged.shards().len(), 2);
    let peft = SafetensorsFile::open(&dev_dir().join("merged/model.safetensors")).unwrap();
    for name in peft.tensors().keys() {
        let got = merged.file_of(name).unwrap().load_f32(name).unwrap();
        let d = max_diff(&got, &peft.load_f32(name).unwrap());
        assert!(d <= 1e-6, "{name}: {d:e}");
    }
    // A shard named in the index but missing is an error naming it.
    std::fs::remove_file(dir.join("model-00002-of-00002.safetensors")).unwrap();
    let e = Checkpoint::open(&dir).unwrap_err().to_string();
    assert!(e.contains("model-00002-of-00002.safetensors"), "{e}");
}

fn file_error(e: Error) -> String {
    assert!(matches!(e, Error::File { .. }), "{e:?}");
    e.to_string()
}

#[test]
fn truncated_and_corrupt_weights_are_file_errors() {
    let scratch = Scratch::new("llama-corrupt");
    let bytes = std::fs::read(dev_dir().join("base_model/model.safetensors")).unwrap();
    let cases: [(&str, Vec<u8>); 3] = [
        ("truncated", bytes[..bytes.len() - 100].to_vec()),
        ("header", {
            let mut b = bytes.clone();
            b[8] = b'#';
            b
        }),
        ("tiny", vec![1, 2, 3]),
    ];
    for (name, content) in cases {
        let dir = scratch.path(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(
            dev_dir().join("base_model/config.json"),
            dir.join("config.json"),
        )
        .unwrap();
        std::fs::write(dir.join("model.safetensors"), content).unwrap();
        let e = file_error(Llama::load(&dir, &Device::Cpu).unwrap_err());
        assert!(e.contains("not a valid safetensors file"), "{name}: {e}");
    }
    let e = file_error(Llama::load(&scratch.path("none"), &Device::Cpu).unwrap_err());
    assert!(e.contains("config.json"), "{e}");
}

/// Copies the fixture adapter into `dir` with its weights rewritten by `edit`.
/// Adapter tensors as (key, shape, values).
type Factors = Vec<(String, Vec<usize>, Vec<f32>)>;

fn edited_adapter(dir: &Path, edit: impl FnOnce(&mut Factors)) {
    let src = SafetensorsFile::open(&dev_dir().join("adapter/adapter_model.safetensors")).unwrap();
    let mut tensors: Factors = src
        .tensors()
        .iter()
        .map(|(n, i)| (n.clone(), i.shape.clone(), src.load_f32(n).unwrap()))
        .collect();
    edit(&mut tensors);
    std::fs::create_dir_all(dir).unwrap();
    std::fs::copy(
        dev_dir().join("adapter/adapter_config.json"),
        dir.join("adapter_config.json"),
    )
    .unwrap();
    let list: Vec<TensorBytes<'_>> = tensors
        .iter()
        .map(|(n, s, v)| TensorBytes {
            name: n,
            dtype: platypus::DType::F32,
            shape: s,
            bytes: bytemuck::cast_slice(v),
        })
        .collect();
    let outputs = Outputs::default();
    let mut group = outputs.group();
    st::write(
        &mut group,
        &dir.join("adapter_model.safetensors"),
        &list,
        &BTreeMap::new(),
    )
    .unwrap();
    group.commit().unwrap();
}

#[test]
fn adapter_and_base_mismatches_name_the_key() {
    let scratch = Scratch::new("llama-bad-adapter");
    let config = LlamaConfig::from_file(&dev_dir().join("base_model/config.json")).unwrap();
    const Q_A: &str = "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight";
    type Edit = Box<dyn FnOnce(&mut Factors)>;
    let cases: Vec<(&str, Edit, &str)> = vec![
        (
            "shape",
            Box::new(|t| {
                let e = t.iter_mut().find(|e| e.0 == Q_A).unwrap();
                e.1 = vec![4, 128];
                e.2.truncate(512);
            }),
            "has shape [4, 128], expected [8, 64]",
        ),
        (
            "missing",
            Box::new(|t| t.retain(|e| e.0 != Q_A)),
            "has no key `base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight`",
        ),
        (
            "layer",
            Box::new(|t| {
                let mut extra = t.iter().find(|e| e.0 == Q_A).unwrap().clone();
                extra.0 = extra.0.replace("layers.1.", "layers.7.");
                t.push(extra);
            }),
            "the base model has 2 layers",
        ),
        (
            "unknown",
            Box::new(|t| {
                let mut extra = t[0].clone();
                extra.0 = "base_model.model.lm_head.lora_A.weight".into();
                t.push(extra);
            }),
            "key `base_model.model.lm_head.lora_A.weight` is not a LoRA factor",
        ),
    ];
    for (name, edit, want) in cases {
        let dir = scratch.path(name);
        edited_adapter(&dir, edit);
        let e = file_error(Adapter::load(&dir, &config).unwrap_err());
        assert!(e.contains(want), "{name}: {e}");
    }
}

#[test]
fn adapter_configs_this_crate_cannot_run_are_refused_by_field() {
    let path = Path::new("adapter_config.json");
    let base = std::fs::read_to_string(dev_dir().join("adapter/adapter_config.json")).unwrap();
    let edit = |field: &str, value: serde_json::Value| {
        let mut v: serde_json::Value = serde_json::from_str(&base).unwrap();
        v[field] = value;
        v.to_string()
    };
    for (field, value, want) in [
        ("use_dora", serde_json::json!(true), "use_dora is true"),
        ("bias", serde_json::json!("all"), "bias is \"all\""),
        (
            "peft_type",
            serde_json::json!("IA3"),
            "peft_type is \"IA3\"",
        ),
        (
            "target_modules",
            serde_json::json!(["lm_head"]),
            "target_modules names \"lm_head\"",
        ),
        (
            "rank_pattern",
            serde_json::json!({"q_proj": 4}),
            "rank_pattern is not empty",
        ),
        ("r", serde_json::json!(0), "r is"),
    ] {
        let e = platypus::llama::AdapterConfig::from_json(&edit(field, value), path).unwrap_err();
        assert!(file_error(e).contains(want), "{field}");
    }
    let all = platypus::llama::AdapterConfig::from_json(
        &edit("target_modules", serde_json::json!("all-linear")),
        path,
    )
    .unwrap();
    assert_eq!(all.targets.len(), 7);
}

/// Greedy decoding of the fixture's prompt with the merged model on `device`:
/// transformers' ids, and each step's logits within `tol` of its.
fn check_greedy(device: &Device, tol: f64) -> (Llama, Vec<u32>, Vec<u32>, GenerateConfig) {
    let step = Step::load();
    let model = Llama::load(&dev_dir().join("merged"), device).unwrap();
    let ints = |name: &str| -> Vec<u32> {
        bytemuck::cast_slice::<u8, i64>(step.file.bytes(name).unwrap())
            .iter()
            .map(|&v| v as u32)
            .collect()
    };
    let prompt = ints("gen_prompt_ids");
    let want = ints("generated_new_ids");
    let cfg = GenerateConfig {
        max_new_tokens: want.len(),
        sampling: None,
        stop: Vec::new(),
        keep_logits: true,
    };
    let got = generate(&model, &prompt, &cfg).unwrap();
    assert_eq!(got.ids, want);
    let step_logits = step.f32s("gen_step_logits");
    let vocab = model.config.vocab_size;
    for (i, row) in got.logits.iter().enumerate() {
        let d = rel_diff(row, &step_logits[i * vocab..][..vocab], &[0], vocab);
        assert!(d < tol, "step {i} on {device}: relative difference {d:e}");
    }
    (model, prompt, want, cfg)
}

#[test]
fn greedy_generation_with_the_kv_cache_matches_transformers() {
    let (model, prompt, want, cfg) = check_greedy(&Device::Cpu, F32_TOL);
    // Stopping at a token: the first generated one ends it.
    let stop = GenerateConfig {
        stop: vec![want[0]],
        keep_logits: false,
        ..cfg.clone()
    };
    let got = generate(&model, &prompt, &stop).unwrap();
    assert_eq!((got.ids, got.stopped), (vec![want[0]], true));
}

#[test]
fn cached_decoding_equals_the_full_forward_pass() {
    let step = Step::load();
    let model = load_base(&dev_dir().join("base_model"));
    let row = &step.ids[..step.seq];
    let full = model
        .forward(
            &TokenBatch {
                ids: row,
                batch: 1,
                seq: step.seq,
                lens: &[step.seq as u32],
            },
            false,
        )
        .unwrap()
        .hidden
        .to_f32_vec()
        .unwrap();
    // 5 tokens, then 1, then the rest: each piece sees what came before.
    let mut cache = KvCache::new(&model, 1, step.seq).unwrap();
    let mut got = Vec::new();
    for piece in [&row[..5], &row[5..6], &row[6..]] {
        got.extend(
            model
                .forward_cached(piece, &mut cache)
                .unwrap()
                .to_f32_vec()
                .unwrap(),
        );
    }
    assert_eq!(cache.len(), step.seq);
    let h = model.config.hidden_size;
    let d = rel_diff(&got, &full, &(0..step.seq).collect::<Vec<_>>(), h);
    assert!(d < 1e-5, "relative difference {d:e}");
    // A full cache refuses more tokens.
    let e = model.forward_cached(&row[..1], &mut cache).unwrap_err();
    assert!(e.to_string().contains("cached tokens"), "{e}");
}

#[test]
fn sampling_is_seeded_and_prompts_past_the_context_are_refused() {
    let model = load_base(&dev_dir().join("base_model"));
    let cfg = |seed| GenerateConfig {
        max_new_tokens: 6,
        sampling: Some(Sampling {
            temperature: 1.5,
            top_p: 0.9,
            seed,
        }),
        stop: Vec::new(),
        keep_logits: false,
    };
    let prompt = [1u32, 17, 42];
    let a = generate(&model, &prompt, &cfg(7)).unwrap().ids;
    assert_eq!(a, generate(&model, &prompt, &cfg(7)).unwrap().ids);
    let others: Vec<Vec<u32>> = (8..12)
        .map(|s| generate(&model, &prompt, &cfg(s)).unwrap().ids)
        .collect();
    assert!(
        others.iter().any(|o| *o != a),
        "different seeds all gave {a:?}"
    );
    // Temperature 0 decodes greedily (the CLI's --temperature 0).
    let mut zero = cfg(3);
    zero.sampling = Some(Sampling {
        temperature: 0.0,
        top_p: 0.9,
        seed: 3,
    });
    let greedy = GenerateConfig {
        sampling: None,
        ..cfg(0)
    };
    assert_eq!(
        generate(&model, &prompt, &zero).unwrap().ids,
        generate(&model, &prompt, &greedy).unwrap().ids
    );
    let long = vec![5u32; model.config.max_position_embeddings];
    let e = generate(&model, &long, &cfg(0)).unwrap_err().to_string();
    assert!(e.contains("max_position_embeddings 64"), "{e}");
    let mut bad = cfg(0);
    bad.sampling = Some(Sampling {
        temperature: 1.0,
        top_p: 0.0,
        seed: 0,
    });
    let e = generate(&model, &prompt, &bad).unwrap_err().to_string();
    assert!(e.contains("top_p"), "{e}");
}

/// Tolerances of the kernel devices, which hold weights and activations in
/// bf16 (README, "Parity"): every stored activation is rounded to 8
/// significant bits (relative error ≤ 2⁻⁹), fp32 accumulation inside the
/// kernels. Logits relative to their largest magnitude; loss relative.
const BF16_LOGITS_TOL: f64 = 3e-2;
/// See [`BF16_LOGITS_TOL`].
const BF16_LOSS_TOL: f64 = 1e-2;

#[test]
fn adapter_logits_and_loss_match_peft_on_the_emulator_within_bf16_tolerance() {
    let step = Step::load();
    let mut model = Llama::load(&dev_dir().join("base_model"), &Device::Emulated).unwrap();
    model.attach(&adapter(&model.config)).unwrap();
    let fwd = model.forward(&step.batch(), false).unwrap();
    let emulated = check_logits(&model, &step, &fwd, "logits", BF16_LOGITS_TOL);
    // The share of that error the bf16 weights alone cause: the same model
    // rounded to bf16, run on the CPU (f32 activations, fp32 LoRA factors).
    // The kernel devices round every activation too (the residual stream
    // included, as transformers in bf16 does), so they land above it (README,
    // "Parity").
    let scratch = Scratch::new("llama-bf16");
    let dir = scratch.path("bf16");
    write_checkpoint(&dir, 1, Some(DType::BF16));
    let mut rounded = load_base(&dir);
    rounded.attach(&adapter(&rounded.config)).unwrap();
    let fwd = rounded.forward(&step.batch(), false).unwrap();
    let weights_alone = check_logits(&rounded, &step, &fwd, "logits", BF16_LOGITS_TOL);
    eprintln!("emulated {emulated:e}, of which bf16 weights alone on the CPU {weights_alone:e}");
    let loss = model.loss(&step.batch(), &step.labels).unwrap();
    let want = step.scalar("loss");
    let d = ((loss.mean() - want) / want).abs();
    eprintln!(
        "loss on the emulator: {} vs PEFT {want} (relative {d:e})",
        loss.mean()
    );
    assert_eq!(loss.tokens, 25);
    assert!(d < BF16_LOSS_TOL, "loss {} vs PEFT {want}", loss.mean());
}

#[test]
fn cached_decoding_on_the_emulator_follows_the_full_forward_pass() {
    let step = Step::load();
    let model = Llama::load(&dev_dir().join("merged"), &Device::Emulated).unwrap();
    let row = &step.ids[..step.seq];
    let one_row = TokenBatch {
        ids: row,
        batch: 1,
        seq: step.seq,
        lens: &[step.seq as u32],
    };
    let full = model.forward(&one_row, false).unwrap().hidden;
    let full = model.logits(&full).unwrap().to_f32_vec().unwrap();
    let mut cache = KvCache::new(&model, 1, step.seq).unwrap();
    let mut got = Vec::new();
    for piece in [&row[..5], &row[5..6], &row[6..]] {
        let hidden = model.forward_cached(piece, &mut cache).unwrap();
        got.extend(model.logits(&hidden).unwrap().to_f32_vec().unwrap());
    }
    let vocab = model.config.vocab_size;
    let d = rel_diff(&got, &full, &(0..step.seq).collect::<Vec<_>>(), vocab);
    eprintln!("cached vs full logits on the emulator: relative difference {d:e}");
    assert!(d < BF16_LOGITS_TOL, "relative difference {d:e}");
}

#[test]
fn greedy_generation_on_the_emulator_gives_transformers_ids() {
    check_greedy(&Device::Emulated, BF16_LOGITS_TOL);
}

/// A vocabulary that is no multiple of 8 (the kernels' GEMM wants 16-byte
/// rows), with an untied and a tied head: the emulator's logits, loss and
/// greedy decoding follow the CPU's within the bf16 tolerances.
#[test]
fn a_vocabulary_of_no_multiple_of_8_runs_on_the_emulator() {
    use platypus::llama::init::{write_random_model, Preset};
    let scratch = Scratch::new("llama-odd-vocab");
    for tied in [false, true] {
        let dir = scratch.path(&format!("tied-{tied}"));
        let mut config = Preset::Tiny.config();
        config.vocab_size = 261;
        config.tie_word_embeddings = tied;
        write_random_model(&dir, &config, DType::F32, 7, None).unwrap();
        let cpu = Llama::load(&dir, &Device::Cpu).unwrap();
        let emu = Llama::load(&dir, &Device::Emulated).unwrap();
        let ids = [1u32, 200, 260, 17, 5, 99, 3];
        let batch = TokenBatch {
            ids: &ids,
            batch: 1,
            seq: ids.len(),
            lens: &[ids.len() as u32],
        };
        let logits = |m: &Llama| {
            let t = m.logits(&m.forward(&batch, false).unwrap().hidden).unwrap();
            assert_eq!(t.shape(), &[ids.len(), 261]);
            t.to_f32_vec().unwrap()
        };
        let rows: Vec<usize> = (0..ids.len()).collect();
        let d = rel_diff(&logits(&emu), &logits(&cpu), &rows, 261);
        assert!(d < BF16_LOGITS_TOL, "tied {tied}: logits differ by {d:e}");
        let labels: Vec<i64> = ids.iter().map(|&i| i64::from(i)).collect();
        let loss = |m: &Llama| m.loss(&batch, &labels).unwrap().mean();
        let (e, c) = (loss(&emu), loss(&cpu));
        assert!(
            ((e - c) / c).abs() < BF16_LOSS_TOL,
            "tied {tied}: loss {e} vs {c}"
        );
        let cfg = GenerateConfig {
            max_new_tokens: 5,
            sampling: None,
            stop: Vec::new(),
            keep_logits: true,
        };
        let got = generate(&emu, &ids, &cfg).unwrap();
        assert_eq!(got.ids.len(), 5);
        for (step, row) in got.logits.iter().enumerate() {
            // Greedy: each id is the largest of its step's logits.
            assert_eq!(row.len(), 261);
            let best = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(
                row[got.ids[step] as usize], best,
                "tied {tied}, step {step}"
            );
        }
    }
}
