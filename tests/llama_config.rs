//! `config.json` of Llama checkpoints: the fixtures transformers 5 wrote,
//! the older form (Llama-2-7b-hf's), and every field this model cannot run
//! refused by name.

use std::path::Path;

use platypus::llama::LlamaConfig;
use platypus::{DType, Error};

/// Llama-2-7b-hf's config.json as transformers 4.3x saved it.
const LLAMA2_7B: &str = r#"{
  "architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2,
  "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
  "intermediate_size": 11008, "max_position_embeddings": 4096, "model_type": "llama",
  "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32,
  "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": null, "tie_word_embeddings": false,
  "torch_dtype": "float16", "transformers_version": "4.31.0.dev0", "use_cache": true, "vocab_size": 32000
}"#;

fn parse(text: &str) -> platypus::Result<LlamaConfig> {
    LlamaConfig::from_json(text, Path::new("model/config.json"))
}

/// `LLAMA2_7B` with `field` set to `value` (JSON), or removed when `value` is None.
fn with(field: &str, value: Option<&str>) -> String {
    let mut v: serde_json::Value = serde_json::from_str(LLAMA2_7B).unwrap();
    let map = v.as_object_mut().unwrap();
    match value {
        Some(json) => map.insert(field.into(), serde_json::from_str(json).unwrap()),
        None => map.remove(field),
    };
    v.to_string()
}

fn expect_refused(text: &str, says: &str) {
    match parse(text) {
        Err(e @ Error::File { .. }) => {
            let msg = e.to_string();
            assert!(
                msg.starts_with("model/config.json: ") && msg.contains(says),
                "{msg}"
            );
        }
        other => panic!("expected a config error saying {says:?}, got {other:?}"),
    }
}

#[test]
fn the_fixtures_transformers_5_form() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/dev");
    for folder in ["base_model", "merged"] {
        let path = fixtures.join(folder).join("config.json");
        let c = LlamaConfig::from_file(&path).unwrap();
        assert_eq!(
            (
                c.vocab_size,
                c.hidden_size,
                c.intermediate_size,
                c.num_hidden_layers
            ),
            (256, 64, 172, 2)
        );
        assert_eq!(
            (c.num_attention_heads, c.num_key_value_heads, c.head_dim),
            (4, 2, 16)
        );
        assert_eq!((c.q_width(), c.kv_width()), (64, 32));
        assert_eq!(
            (c.rope_theta, c.rms_norm_eps, c.dtype),
            (10000.0, 1e-5, Some(DType::F32))
        );
        assert_eq!(
            (
                c.bos_token_id,
                c.eos_token_ids.as_slice(),
                c.tie_word_embeddings
            ),
            (Some(1), &[2][..], false)
        );
    }
}

#[test]
fn the_older_form_with_its_defaults() {
    let c = parse(LLAMA2_7B).unwrap();
    assert_eq!(
        (c.head_dim, c.num_key_value_heads, c.max_position_embeddings),
        (128, 32, 4096)
    );
    assert_eq!((c.rope_theta, c.dtype), (10000.0, Some(DType::F16)));
    // rope_theta of the older form, eos as a list, no kv heads (= heads), bfloat16.
    let c = parse(&with("rope_theta", Some("500000.0"))).unwrap();
    assert_eq!(c.rope_theta, 500000.0);
    let c = parse(&with("eos_token_id", Some("[2, 7]"))).unwrap();
    assert_eq!(c.eos_token_ids, [2, 7]);
    let c = parse(&with("num_key_value_heads", None)).unwrap();
    assert_eq!(c.num_key_value_heads, 32);
    let c = parse(&with("torch_dtype", Some("\"bfloat16\""))).unwrap();
    assert_eq!(c.dtype, Some(DType::BF16));
    // rope_parameters wins, default type accepted; tied embeddings accepted.
    let c = parse(&with(
        "rope_parameters",
        Some(r#"{"rope_theta": 1e6, "rope_type": "default"}"#),
    ))
    .unwrap();
    assert_eq!(c.rope_theta, 1e6);
    assert!(
        parse(&with("tie_word_embeddings", Some("true")))
            .unwrap()
            .tie_word_embeddings
    );
}

#[test]
fn what_this_model_cannot_run_is_refused_by_name() {
    expect_refused(
        &with("model_type", Some("\"mistral\"")),
        "model_type is \"mistral\"",
    );
    expect_refused(&with("model_type", None), "model_type is missing");
    expect_refused(
        &with("rope_scaling", Some(r#"{"type": "linear", "factor": 2.0}"#)),
        "rope_scaling asks for rope type \"linear\"",
    );
    expect_refused(
        &with(
            "rope_parameters",
            Some(r#"{"rope_type": "llama3", "rope_theta": 5e5}"#),
        ),
        "rope_parameters asks for rope type \"llama3\"",
    );
    expect_refused(
        &with("attention_bias", Some("true")),
        "attention_bias is true",
    );
    expect_refused(&with("mlp_bias", Some("true")), "mlp_bias is true");
    expect_refused(
        &with("hidden_act", Some("\"gelu\"")),
        "hidden_act is \"gelu\"",
    );
    expect_refused(
        &with("num_key_value_heads", Some("5")),
        "does not divide num_attention_heads 32",
    );
    expect_refused(&with("hidden_size", None), "hidden_size is missing");
    expect_refused(
        &with("hidden_size", Some("-3")),
        "hidden_size is -3, expected a positive integer",
    );
    expect_refused(
        &with("vocab_size", Some("\"big\"")),
        "vocab_size is \"big\"",
    );
    expect_refused(
        &with("torch_dtype", Some("\"float64\"")),
        "torch_dtype is \"float64\"",
    );
    expect_refused(
        &with("num_attention_heads", Some("0")),
        "num_attention_heads is 0",
    );
    expect_refused("{not json", "not JSON");
    expect_refused("[1, 2]", "not a JSON object");
    let missing = LlamaConfig::from_file(Path::new("/nonexistent/config.json")).unwrap_err();
    assert!(missing.to_string().contains("cannot read"), "{missing}");
}
