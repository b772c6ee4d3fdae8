//! `platypus init-model`, `init-adapter`, `eval`, `generate` and `merge` as
//! a user runs them: the README walkthrough on a model the crate makes, the
//! fixture's loss through `eval`, and the exit statuses of bad input.
#![cfg(feature = "cli")] // runs the `platypus` binary

mod common;

use std::path::Path;
use std::process::Output;

use common::{platypus, Scratch};
use platypus::formats::safetensors::SafetensorsFile;

fn ok_json(out: Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "exit {:?}: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn failed(out: &Output, code: i32, want: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "{err}");
    assert!(err.contains(want), "expected {want:?} in: {err}");
}

fn corpus() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/stem.jsonl"))
}

#[test]
fn the_walkthrough_eval_generate_merge_runs_and_the_merged_model_keeps_the_loss() {
    let dir = Scratch::new("llama-cli-walk");
    let (model, lora, merged) = (dir.path("mini"), dir.path("lora"), dir.path("merged"));
    let out = platypus(&[
        &"init-model",
        &"--preset",
        &"mini",
        &"--tokenizer-corpus",
        &corpus(),
        &"--out",
        &model,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = platypus(&[
        &"init-adapter",
        &"--model",
        &model,
        &"--out",
        &lora,
        &"--r",
        &"8",
        &"--targets",
        &"all-linear",
        &"--random-b",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let base = ok_json(platypus(&[
        &"eval",
        &"--model",
        &model,
        &"--data",
        &corpus(),
        &"--json",
    ]));
    let tuned = ok_json(platypus(&[
        &"eval",
        &"--model",
        &model,
        &"--adapter",
        &lora,
        &"--data",
        &corpus(),
        &"--json",
    ]));
    assert_eq!(base["rows"], 40);
    assert_ne!(
        base["loss"], tuned["loss"],
        "a random-B adapter changes the model"
    );
    let ppl = tuned["perplexity"].as_f64().unwrap();
    assert!((ppl - tuned["loss"].as_f64().unwrap().exp()).abs() < 1e-9 * ppl);

    let gen = ok_json(platypus(&[
        &"generate",
        &"--model",
        &model,
        &"--adapter",
        &lora,
        &"--prompt",
        &"What is a prime number?",
        &"--alpaca",
        &"--max-new-tokens",
        &"5",
        &"--json",
    ]));
    assert_eq!(gen["ids"].as_array().unwrap().len(), 5);
    assert!(gen["text"].is_string() && gen["tokens_per_s"].as_f64().unwrap() > 0.0);

    let report = ok_json(platypus(&[
        &"merge",
        &"--base",
        &model,
        &"--adapter",
        &lora,
        &"--out",
        &merged,
        &"--json",
    ]));
    assert_eq!(report["tensors_merged"], 28);
    assert!(report["max_abs_diff"].as_f64().unwrap() < 1e-6);
    for side in ["config.json", "tokenizer.json", "generation_config.json"] {
        assert!(merged.join(side).exists(), "{side} carried over");
    }
    let after = ok_json(platypus(&[
        &"eval",
        &"--model",
        &merged,
        &"--data",
        &corpus(),
        &"--json",
    ]));
    let (a, b) = (
        after["loss"].as_f64().unwrap(),
        tuned["loss"].as_f64().unwrap(),
    );
    assert!((a - b).abs() < 1e-5 * b, "merged {a} vs adapter {b}");
    // Greedy decoding of the merged model gives the adapter's tokens.
    let gen_merged = ok_json(platypus(&[
        &"generate",
        &"--model",
        &merged,
        &"--prompt",
        &"What is a prime number?",
        &"--alpaca",
        &"--max-new-tokens",
        &"5",
        &"--json",
    ]));
    assert_eq!(gen_merged["ids"], gen["ids"]);

    // Merging again onto the same folder: exit 4, the folder untouched.
    let before = std::fs::read(merged.join("model.safetensors")).unwrap();
    failed(
        &platypus(&[
            &"merge",
            &"--base",
            &model,
            &"--adapter",
            &lora,
            &"--out",
            &merged,
        ]),
        4,
        "exists already",
    );
    assert_eq!(
        std::fs::read(merged.join("model.safetensors")).unwrap(),
        before
    );
}

#[test]
fn eval_and_generate_of_the_fixture_give_transformers_loss_and_ids_on_cpu_and_emulated() {
    let dir = Scratch::new("llama-cli-fixture");
    let dev = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/dev");
    let step = SafetensorsFile::open(&dev.join("step.safetensors")).unwrap();
    let ints =
        |name: &str| -> Vec<i64> { bytemuck::cast_slice(step.bytes(name).unwrap()).to_vec() };
    let seq = step.info("input_ids").unwrap().shape[1];
    let (ids, labels, mask) = (ints("input_ids"), ints("labels"), ints("attention_mask"));
    let mut rows = String::new();
    for r in 0..ids.len() / seq {
        let row = |v: &[i64]| v[r * seq..(r + 1) * seq].to_vec();
        rows += &serde_json::json!({"input_ids": row(&ids), "labels": row(&labels), "attention_mask": row(&mask)}).to_string();
        rows += "\n";
    }
    let data = dir.path("batch.jsonl");
    std::fs::write(&data, rows).unwrap();
    let want = step.load_f32("loss").unwrap()[0] as f64;
    // fp32 on the CPU; bf16 on the kernels (README, "Parity on the kernels").
    for (device, tol) in [("cpu", 1e-5), ("emulated", 1e-2)] {
        let got = ok_json(platypus(&[
            &"eval",
            &"--model",
            &dev.join("base_model"),
            &"--adapter",
            &dev.join("adapter"),
            &"--data",
            &data,
            &"--device",
            &device,
            &"--json",
        ]));
        let loss = got["loss"].as_f64().unwrap();
        assert!(
            ((loss - want) / want).abs() < tol,
            "{device}: {loss} vs {want}"
        );
        assert_eq!(got["label_tokens"], 25);
    }
    // Greedy decoding on the kernels gives transformers' ids too.
    let gen = |name: &str| -> String {
        ints(name)
            .iter()
            .map(i64::to_string)
            .collect::<Vec<_>>()
            .join(",")
    };
    let want = ints("generated_new_ids");
    let got = ok_json(platypus(&[
        &"generate",
        &"--model",
        &dev.join("merged"),
        &"--prompt-ids",
        &gen("gen_prompt_ids"),
        &"--max-new-tokens",
        &want.len().to_string(),
        &"--ignore-eos",
        &"--device",
        &"emulated",
        &"--json",
    ]));
    let ids: Vec<i64> = serde_json::from_value(got["ids"].clone()).unwrap();
    assert_eq!(ids, want);
}

#[test]
fn bad_input_exits_3_naming_the_file_and_line() {
    let dir = Scratch::new("llama-cli-bad");
    let dev = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/dev/base_model");
    let empty = dir.path("empty.jsonl");
    std::fs::write(&empty, "\n").unwrap();
    failed(
        &platypus(&[&"eval", &"--model", &dev, &"--data", &empty]),
        3,
        "empty.jsonl",
    );
    let broken = dir.path("broken.jsonl");
    std::fs::write(
        &broken,
        "{\"input_ids\": [1, 2, 3]}\n{\"input_ids\": [1, 2,\n",
    )
    .unwrap();
    failed(
        &platypus(&[&"eval", &"--model", &dev, &"--data", &broken]),
        3,
        "line 2",
    );
    // The dev model has no tokenizer: instruction rows and text prompts are refused.
    failed(
        &platypus(&[&"eval", &"--model", &dev, &"--data", &corpus()]),
        3,
        "tokenizer",
    );
    failed(
        &platypus(&[
            &"generate",
            &"--model",
            &dev,
            &"--prompt",
            &"hi",
            &"--max-new-tokens",
            &"2",
        ]),
        3,
        "--prompt-ids",
    );
    let long: Vec<String> = (0..64).map(|i| (i % 200 + 3).to_string()).collect();
    failed(
        &platypus(&[
            &"generate",
            &"--model",
            &dev,
            &"--prompt-ids",
            &long.join(","),
            &"--max-new-tokens",
            &"1",
        ]),
        3,
        "max_position_embeddings 64",
    );
    failed(
        &platypus(&[&"eval", &"--model", &dir.path("nowhere"), &"--data", &empty]),
        3,
        "config.json",
    );
    failed(
        &platypus(&[
            &"merge",
            &"--base",
            &dev,
            &"--adapter",
            &dev,
            &"--out",
            &dir.path("m"),
        ]),
        3,
        "adapter_config.json",
    );
    failed(
        &platypus(&[
            &"merge",
            &"--base",
            &dev,
            &"--adapter",
            &dev.join("../adapter"),
            &"--weights",
            &"1,2",
            &"--out",
            &dir.path("m"),
        ]),
        3,
        "one finite weight per --adapter",
    );
    assert!(!dir.path("m").exists());
}
