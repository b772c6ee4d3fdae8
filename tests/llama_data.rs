//! Llama tokenizers and JSONL data: a tiny BPE tokenizer trained, saved and
//! loaded back against a config, instruction rows built the way Platypus'
//! `finetune.py` builds them, pre-tokenized rows, every refusal naming the
//! file and line, and the fixture's right-padded batch read back from JSONL.

mod common;

use std::path::{Path, PathBuf};

use common::Scratch;
use platypus::llama::data::{self, alpaca_prompt, Example, IGNORE_INDEX};
use platypus::llama::tokenizer::{train_bpe, Tokenizer};
use platypus::llama::LlamaConfig;
use platypus::Error;
use serde_json::{json, Value};

/// What the tiny tokenizer learns from.
const TEXTS: [&str; 6] = [
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "### Instruction:\nName three primary colors.\n\n### Response:\nRed, blue and yellow.",
    "The quick brown fox jumps over the lazy dog.",
    "Platypus is a family of fine-tuned and merged large language models.",
    "Low-rank adaptation trains small matrices beside the frozen weights.",
    "What is the capital of France? The capital of France is Paris.",
];

const VOCAB: usize = 320;

/// A Llama config with these fields (`bos`/`eos` left out when null).
fn config(vocab_size: usize, max_positions: usize, bos: Value, eos: Value) -> LlamaConfig {
    let mut text = json!({
        "model_type": "llama", "hidden_size": 64, "intermediate_size": 172,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": vocab_size, "max_position_embeddings": max_positions,
    });
    for (field, value) in [("bos_token_id", bos), ("eos_token_id", eos)] {
        if !value.is_null() {
            text[field] = value;
        }
    }
    LlamaConfig::from_json(&text.to_string(), Path::new("model/config.json")).unwrap()
}

fn llama_config() -> LlamaConfig {
    config(VOCAB, 4096, json!(1), json!(2))
}

/// The tiny tokenizer, saved to `dir` and loaded back against `llama_config`.
fn tokenizer(dir: &Scratch) -> Tokenizer {
    let path = dir.path("tokenizer.json");
    train_bpe(&TEXTS, VOCAB).unwrap().save(&path).unwrap();
    Tokenizer::from_file(&path, &llama_config()).unwrap()
}

fn write(dir: &Scratch, name: &str, text: &str) -> PathBuf {
    let path = dir.path(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// Asserts `r` is an `Error::File` for `path` whose message contains `says`.
fn expect_file_error<T: std::fmt::Debug>(r: platypus::Result<T>, path: &Path, says: &str) {
    match r {
        Err(Error::File { path: p, what }) => {
            assert_eq!(p, path);
            assert!(what.contains(says), "{what:?} does not say {says:?}");
        }
        other => panic!(
            "expected an error for {} saying {says:?}, got {other:?}",
            path.display()
        ),
    }
}

#[test]
fn a_trained_tokenizer_is_laid_out_like_llamas_and_round_trips() {
    let dir = Scratch::new("llama-data-roundtrip");
    let tok = tokenizer(&dir);
    assert!(
        (260..=VOCAB).contains(&tok.vocab_size()),
        "{}",
        tok.vocab_size()
    );
    assert_eq!((tok.bos_id(), tok.eos_ids()), (Some(1), &[2][..]));

    let saved: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path("tokenizer.json")).unwrap())
            .unwrap();
    let model = &saved["model"];
    assert_eq!(
        (&model["type"], &model["byte_fallback"]),
        (&json!("BPE"), &json!(true))
    );
    for (token, id) in [
        ("<unk>", 0),
        ("<s>", 1),
        ("</s>", 2),
        ("<0x00>", 3),
        ("<0xFF>", 258),
    ] {
        assert_eq!(model["vocab"][token], json!(id), "{token}");
    }
    assert_eq!(saved["pre_tokenizer"]["type"], json!("Metaspace"));
    let added: Vec<_> = saved["added_tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t["id"].clone(), t["content"].clone(), t["special"].clone()))
        .collect();
    assert_eq!(
        added,
        [
            (json!(0), json!("<unk>"), json!(true)),
            (json!(1), json!("<s>"), json!(true)),
            (json!(2), json!("</s>"), json!(true))
        ]
    );

    for text in [
        "Hello world",
        "The capital of France is Paris.",
        "ünïcödé ✓ 😀\n\ttabs  and  double spaces",
    ] {
        let ids = tok.encode(text, true).unwrap();
        assert_eq!(ids[0], 1, "BOS first: {ids:?}");
        assert_eq!(
            ids.iter().filter(|&&id| id == 1).count(),
            1,
            "one BOS: {ids:?}"
        );
        assert!(!ids.contains(&0), "byte fallback, no <unk>: {ids:?}");
        assert_ne!(ids.last(), Some(&2), "no EOS: {ids:?}");
        assert!(ids.iter().all(|&id| (id as usize) < tok.vocab_size()));
        assert_eq!(tok.encode(text, false).unwrap(), ids[1..]);
        assert_eq!(tok.decode(&ids).unwrap(), text);
        let with_eos: Vec<u32> = ids.iter().copied().chain([2]).collect();
        assert_eq!(
            tok.decode(&with_eos).unwrap(),
            text,
            "special tokens skipped"
        );
    }
    // An unseen character falls back to its UTF-8 bytes, <0xNN> at 3 + NN.
    let emoji = tok.encode("😀", false).unwrap();
    assert_eq!(
        emoji[emoji.len() - 4..],
        [0xF0 + 3, 0x9F + 3, 0x98 + 3, 0x80 + 3]
    );

    match tok.decode(&[5, 999]) {
        Err(Error::Invalid { what, .. }) => assert!(what.contains("ids[1] is 999"), "{what}"),
        other => panic!("expected an invalid-id error, got {other:?}"),
    }
    assert!(matches!(
        train_bpe(&TEXTS, 259),
        Err(Error::Invalid {
            arg: "vocab_size",
            ..
        })
    ));
}

#[test]
fn loading_checks_the_tokenizer_against_the_config() {
    let dir = Scratch::new("llama-data-load");
    let path = dir.path("tokenizer.json");
    let trained = train_bpe(&TEXTS, VOCAB).unwrap();
    trained.save(&path).unwrap();
    let n = trained.vocab_size();

    let small = config(n - 1, 4096, json!(1), json!(2));
    let says = format!(
        "tokenizer has {n} tokens, config.json's vocab_size is {}",
        n - 1
    );
    expect_file_error(Tokenizer::from_file(&path, &small), &path, &says);
    let msg = Tokenizer::from_file(&path, &small).unwrap_err().to_string();
    assert_eq!(msg, format!("{}: {says}", path.display()));
    // A larger embedding than the vocabulary is fine (padded vocabularies).
    Tokenizer::from_file(&path, &config(n + 64, 4096, json!(1), json!(2))).unwrap();

    let big = n + 100;
    let no_bos = config(big, 4096, json!(n + 10), json!(2));
    let says = format!("config.json's bos_token_id {} is not a token", n + 10);
    expect_file_error(Tokenizer::from_file(&path, &no_bos), &path, &says);
    let no_eos = config(big, 4096, json!(1), json!([2, n + 20]));
    let says = format!("config.json's eos_token_id {} is not a token", n + 20);
    expect_file_error(Tokenizer::from_file(&path, &no_eos), &path, &says);

    let broken = write(&dir, "broken.json", r#"{"version": "1.0", "model": "#);
    expect_file_error(
        Tokenizer::from_file(&broken, &llama_config()),
        &broken,
        "not a tokenizer.json",
    );
    let missing = dir.path("missing.json");
    expect_file_error(
        Tokenizer::from_file(&missing, &llama_config()),
        &missing,
        "cannot read",
    );

    // Without a bos_token_id the tokenizer loads, but cannot prepend one.
    let bosless = Tokenizer::from_file(&path, &config(VOCAB, 4096, Value::Null, json!(2))).unwrap();
    assert!(bosless.encode("Hello", false).is_ok());
    assert!(matches!(
        bosless.encode("Hello", true),
        Err(Error::Invalid { arg: "add_bos", .. })
    ));
}

#[test]
fn the_legacy_llama_2_form_encodes_the_same() {
    // Llama-2-7b-hf's tokenizer.json spells the same tokenizer with a
    // Prepend + Replace normalizer and no pre-tokenizer; saved truncation and
    // padding must not change what `encode` returns.
    let dir = Scratch::new("llama-data-legacy");
    let tok = tokenizer(&dir);
    let mut legacy: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path("tokenizer.json")).unwrap())
            .unwrap();
    legacy["normalizer"] = json!({"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": "\u{2581}"},
        {"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"},
    ]});
    legacy["pre_tokenizer"] = Value::Null;
    legacy["truncation"] =
        json!({"direction": "Right", "max_length": 4, "strategy": "LongestFirst", "stride": 0});
    legacy["padding"] = json!({"strategy": {"Fixed": 64}, "direction": "Right",
        "pad_to_multiple_of": null, "pad_id": 0, "pad_type_id": 0, "pad_token": "<unk>"});
    let path = write(&dir, "legacy.json", &legacy.to_string());
    let old = Tokenizer::from_file(&path, &llama_config()).unwrap();
    for text in [
        "The capital of France is Paris.",
        "ünïcödé 😀\n  two spaces",
    ] {
        let ids = tok.encode(text, true).unwrap();
        assert_eq!(old.encode(text, true).unwrap(), ids, "{text:?}");
        assert_eq!(old.decode(&ids).unwrap(), text);
    }
}

/// The two Alpaca templates, written out as templates/alpaca.json has them.
const WITH_INPUT: &str = "Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.\n\n### Instruction:\nName the capital.\n\n### Input:\nFrance\n\n### Response:\n";
const NO_INPUT: &str = "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n### Instruction:\nName the capital.\n\n### Response:\n";

#[test]
fn instruction_rows_mask_the_prompt_and_end_with_eos() {
    let dir = Scratch::new("llama-data-instruction");
    let tok = tokenizer(&dir);
    assert_eq!(
        alpaca_prompt("Name the capital.", Some("France")),
        WITH_INPUT
    );
    for input in [None, Some("")] {
        assert_eq!(alpaca_prompt("Name the capital.", input), NO_INPUT);
    }
    let rows = [
        (
            r#"{"instruction": "Name the capital.", "input": "France", "output": "Paris.", "data_source": "x"}"#,
            WITH_INPUT,
        ),
        (
            r#"{"instruction": "Name the capital.", "output": "Paris."}"#,
            NO_INPUT,
        ),
        (
            r#"{"instruction": "Name the capital.", "input": "", "output": "Paris."}"#,
            NO_INPUT,
        ),
        (
            r#"{"instruction": "Name the capital.", "input": null, "output": "Paris."}"#,
            NO_INPUT,
        ),
    ];
    let text: String = rows.iter().map(|(row, _)| format!("{row}\n")).collect();
    let path = write(&dir, "rows.jsonl", &text);
    let examples = data::read_jsonl(&path, Some(&tok), &llama_config(), 4096).unwrap();
    assert_eq!(examples.len(), rows.len());
    for (example, (_, prompt)) in examples.iter().zip(rows) {
        let prompt_ids = tok.encode(prompt, true).unwrap();
        let mut ids = tok.encode(&format!("{prompt}Paris."), true).unwrap();
        ids.push(2);
        assert_eq!(example.input_ids, ids);
        assert_eq!(example.input_ids[..prompt_ids.len()], prompt_ids[..]);
        let n = prompt_ids.len();
        assert!(example.labels[..n].iter().all(|&l| l == IGNORE_INDEX));
        let answer: Vec<i64> = ids[n..].iter().map(|&id| i64::from(id)).collect();
        assert_eq!(example.labels[n..], answer[..]);
        assert_eq!(example.labels.last(), Some(&2), "EOS is learned");
        assert_eq!(tok.decode(&example.input_ids[n..]).unwrap(), "Paris.");
        assert_eq!(example.attention_mask, vec![1; ids.len()]);
    }
}

#[test]
fn instruction_rows_are_cut_like_cutoff_len() {
    let dir = Scratch::new("llama-data-cut");
    let tok = tokenizer(&dir);
    let path = write(
        &dir,
        "row.jsonl",
        r#"{"instruction": "Name the capital.", "output": "Paris is the capital."}"#,
    );
    let prompt = tok.encode(NO_INPUT, true).unwrap().len();
    let full = tok
        .encode(&format!("{NO_INPUT}Paris is the capital."), true)
        .unwrap();
    let read = |max_len| {
        let mut rows = data::read_jsonl(&path, Some(&tok), &llama_config(), max_len).unwrap();
        assert_eq!(rows.len(), 1);
        rows.remove(0)
    };
    let learned = |e: &Example| e.labels.iter().filter(|&&l| l != IGNORE_INDEX).count();
    // Room for the whole row and its EOS.
    let e = read(full.len() + 1);
    assert_eq!(
        (e.input_ids.len(), e.input_ids.last()),
        (full.len() + 1, Some(&2))
    );
    // The row fills max_len: no EOS.
    let e = read(full.len());
    assert_eq!(e.input_ids, full);
    assert_eq!(learned(&e), full.len() - prompt);
    // Cut inside the output: the prompt still masked, three output tokens learned.
    let e = read(prompt + 3);
    assert_eq!(e.input_ids, full[..prompt + 3]);
    assert_eq!(learned(&e), 3);
    assert!(e.labels[..prompt].iter().all(|&l| l == IGNORE_INDEX));
    // Cut inside the prompt: nothing left to learn.
    let e = read(prompt - 2);
    assert_eq!(e.input_ids, full[..prompt - 2]);
    assert_eq!(learned(&e), 0);
}

#[test]
fn pre_tokenized_rows_default_their_labels_and_mask() {
    let dir = Scratch::new("llama-data-pretokenized");
    let path = write(
        &dir,
        "rows.jsonl",
        "{\"input_ids\": [1, 5, 6]}\n\n   \n{\"input_ids\": [1, 7, 8, 0], \"labels\": [-100, 7, 8, -100], \"attention_mask\": [1, 1, 1, 0]}\n",
    );
    let examples = data::read_jsonl(&path, None, &llama_config(), 4096).unwrap();
    assert_eq!(
        examples,
        [
            Example {
                input_ids: vec![1, 5, 6],
                labels: vec![1, 5, 6],
                attention_mask: vec![1, 1, 1]
            },
            Example {
                input_ids: vec![1, 7, 8, 0],
                labels: vec![-100, 7, 8, -100],
                attention_mask: vec![1, 1, 1, 0]
            },
        ]
    );
    let cut = data::read_jsonl(&path, None, &llama_config(), 2).unwrap();
    assert_eq!(cut[1].input_ids, [1, 7]);
    assert_eq!(cut[1].labels, [-100, 7]);
    assert_eq!(cut[1].attention_mask, [1, 1]);
}

#[test]
fn every_bad_line_is_named() {
    let dir = Scratch::new("llama-data-errors");
    let tok = tokenizer(&dir);
    let cfg = config(VOCAB, 8, json!(1), json!(2));
    let good = r#"{"input_ids": [1, 2]}"#;
    let cases: &[(&str, &str)] = &[
        ("{not json", "line 3: not JSON"),
        ("[1, 2]", "line 3: is [1,2], expected a JSON object"),
        (
            r#"{"input_ids": [1, 2, 3], "labels": [1, 2]}"#,
            r#"line 3: "labels" has 2 entries, "input_ids" 3"#,
        ),
        (
            r#"{"input_ids": [1, 2], "attention_mask": [1, 1, 0]}"#,
            r#"line 3: "attention_mask" has 3 entries, "input_ids" 2"#,
        ),
        (
            r#"{"input_ids": [1, 320]}"#,
            r#"line 3: "input_ids"[1] is 320, expected a token id below config.json's vocab_size 320"#,
        ),
        (
            r#"{"input_ids": [-1]}"#,
            r#"line 3: "input_ids"[0] is -1, expected a token id"#,
        ),
        (
            r#"{"input_ids": [1, 2.5]}"#,
            r#"line 3: "input_ids"[1] is 2.5, expected an integer"#,
        ),
        (
            r#"{"input_ids": "1 2"}"#,
            r#"line 3: "input_ids" is "1 2", expected an array of integers"#,
        ),
        (r#"{"input_ids": []}"#, r#"line 3: "input_ids" is empty"#),
        (
            r#"{"input_ids": [1, 2], "labels": [-5, 2]}"#,
            r#"line 3: "labels"[0] is -5, expected -100 or a token id"#,
        ),
        (
            r#"{"input_ids": [1, 2], "labels": [1, 999]}"#,
            r#"line 3: "labels"[1] is 999"#,
        ),
        (
            r#"{"input_ids": [1, 2], "attention_mask": [1, 2]}"#,
            r#"line 3: "attention_mask"[1] is 2, expected 0 or 1"#,
        ),
        (
            r#"{"input_ids": [0, 2], "attention_mask": [0, 1]}"#,
            r#"line 3: "attention_mask" starts with 0"#,
        ),
        (
            r#"{"input_ids": [1, 0, 2], "attention_mask": [1, 0, 1]}"#,
            r#"line 3: "attention_mask" has a 1 after a 0 at index 2"#,
        ),
        (
            r#"{"text": "hello"}"#,
            r#"line 3: has keys ["text"]; expected "input_ids""#,
        ),
        (
            r#"{"input_ids": [1], "instruction": "x", "output": "y"}"#,
            r#"line 3: has both "input_ids" and "instruction""#,
        ),
        (
            r#"{"instruction": 5, "output": "y"}"#,
            r#"line 3: "instruction" is 5, expected a string"#,
        ),
        (
            r#"{"instruction": "x", "input": ["a"], "output": "y"}"#,
            r#"line 3: "input" is ["a"], expected a string"#,
        ),
        (r#"{"instruction": "x"}"#, r#"line 3: "output" is missing"#),
        (
            r#"{"input_ids": [1, 2, 3, 4, 5, 6, 7, 8, 9]}"#,
            "line 3: has 9 tokens, more than config.json's max_position_embeddings 8",
        ),
    ];
    for (i, (bad, says)) in cases.iter().enumerate() {
        let path = write(
            &dir,
            &format!("bad{i}.jsonl"),
            &format!("{good}\n\n{bad}\n{good}\n"),
        );
        let r = data::read_jsonl(&path, Some(&tok), &cfg, usize::MAX);
        expect_file_error(r, &path, says);
    }
    // An instruction row is checked after it is tokenized.
    let n = tok
        .encode(&format!("{NO_INPUT}Paris."), true)
        .unwrap()
        .len()
        + 1;
    let row = r#"{"instruction": "Name the capital.", "output": "Paris."}"#;
    let path = write(
        &dir,
        "long-instruction.jsonl",
        &format!("{good}\n\n{row}\n"),
    );
    let says = format!("line 3: has {n} tokens, more than config.json's max_position_embeddings 8");
    expect_file_error(
        data::read_jsonl(&path, Some(&tok), &cfg, usize::MAX),
        &path,
        &says,
    );
    // A row cut to max_len fits max_position_embeddings.
    let long = write(
        &dir,
        "long.jsonl",
        r#"{"input_ids": [1, 2, 3, 4, 5, 6, 7, 8, 9]}"#,
    );
    assert_eq!(
        data::read_jsonl(&long, None, &cfg, 8).unwrap()[0]
            .input_ids
            .len(),
        8
    );

    let row = write(&dir, "row.jsonl", r#"{"instruction": "x", "output": "y"}"#);
    expect_file_error(
        data::read_jsonl(&row, None, &cfg, 8),
        &row,
        "line 1: is an instruction row, which needs a tokenizer",
    );
    let bosless = Tokenizer::from_file(
        &dir.path("tokenizer.json"),
        &config(VOCAB, 4096, Value::Null, json!(2)),
    )
    .unwrap();
    expect_file_error(
        data::read_jsonl(&row, Some(&bosless), &cfg, 8),
        &row,
        "line 1: instruction rows start with BOS, and config.json has no bos_token_id",
    );
    for (name, text) in [("empty.jsonl", ""), ("blank.jsonl", "\n   \n\n")] {
        let path = write(&dir, name, text);
        expect_file_error(data::read_jsonl(&path, None, &cfg, 8), &path, "has no rows");
    }
    let missing = dir.path("missing.jsonl");
    expect_file_error(
        data::read_jsonl(&missing, None, &cfg, 8),
        &missing,
        "cannot read",
    );
    assert!(matches!(
        data::read_jsonl(&long, None, &cfg, 0),
        Err(Error::Invalid { arg: "max_len", .. })
    ));
}

#[test]
fn batches_are_right_padded() {
    let rows = [
        Example {
            input_ids: vec![1, 5, 6],
            labels: vec![-100, 5, 6],
            attention_mask: vec![1, 1, 1],
        },
        Example {
            input_ids: vec![1],
            labels: vec![1],
            attention_mask: vec![1],
        },
    ];
    let b = data::batch(&rows, 0);
    assert_eq!((b.batch, b.seq), (2, 3));
    assert_eq!(b.input_ids, [1, 5, 6, 1, 0, 0]);
    assert_eq!(b.labels, [-100, 5, 6, 1, -100, -100]);
    assert_eq!(b.attention_mask, [1, 1, 1, 1, 0, 0]);
    assert_eq!(b.lens, [3, 1]);
    let empty = data::batch::<Example>(&[], 0);
    assert_eq!((empty.batch, empty.seq, empty.input_ids.len()), (0, 0, 0));
}

/// An I64 `[2, 24]` tensor of the fixture's step, as rows.
fn fixture_rows(tensors: &safetensors::SafeTensors, name: &str) -> Vec<Vec<i64>> {
    let view = tensors.tensor(name).unwrap();
    assert_eq!(
        (view.dtype(), view.shape()),
        (safetensors::Dtype::I64, &[2, 24][..])
    );
    let values: Vec<i64> = view
        .data()
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
        .collect();
    values.chunks(24).map(<[i64]>::to_vec).collect()
}

#[test]
fn the_fixture_batch_comes_back_from_jsonl() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/dev");
    let bytes = std::fs::read(fixtures.join("step.safetensors")).unwrap();
    let tensors = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let ids = fixture_rows(&tensors, "input_ids");
    let labels = fixture_rows(&tensors, "labels");
    let mask = fixture_rows(&tensors, "attention_mask");
    let cfg = LlamaConfig::from_file(&fixtures.join("base_model/config.json")).unwrap();
    let flat = |rows: &[Vec<i64>]| rows.concat();

    let dir = Scratch::new("llama-data-fixture");
    // Rows as they are (padding included), and cut to their real tokens.
    let padded: String = (0..2)
        .map(|b| {
            json!({"input_ids": ids[b], "labels": labels[b], "attention_mask": mask[b]}).to_string()
                + "\n"
        })
        .collect();
    let unpadded: String = (0..2)
        .map(|b| {
            let n = mask[b].iter().filter(|&&m| m == 1).count();
            json!({"input_ids": ids[b][..n], "labels": labels[b][..n]}).to_string() + "\n"
        })
        .collect();
    for (name, text) in [("padded.jsonl", padded), ("unpadded.jsonl", unpadded)] {
        let path = write(&dir, name, &text);
        let examples = data::read_jsonl(&path, None, &cfg, cfg.max_position_embeddings).unwrap();
        let b = data::batch(&examples, 0);
        assert_eq!((b.batch, b.seq), (2, 24), "{name}");
        let got_ids: Vec<i64> = b.input_ids.iter().map(|&id| i64::from(id)).collect();
        assert_eq!(got_ids, flat(&ids), "{name}");
        assert_eq!(b.labels, flat(&labels), "{name}");
        let got_mask: Vec<i64> = b.attention_mask.iter().map(|&m| i64::from(m)).collect();
        assert_eq!(got_mask, flat(&mask), "{name}");
        assert_eq!(b.lens, [24, 19], "{name}");
    }
}
