//! `platypus quickstart --smoke`, the README's first command at a reduced
//! size: every output of the recipe is written, the summary's counts are the
//! report's, the sample data makes every curation step and every category
//! remove something, and a second run into the same folder (with the
//! embedding cache) replaces it with the same adapter, bit for bit.
#![cfg(feature = "cli")] // runs the `platypus` binary

mod common;

use std::path::Path;
use std::process::Command;

use common::Scratch;

fn quickstart(out: &Path, cache: &Path) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let run = Command::new(env!("CARGO_BIN_EXE_platypus"))
        .current_dir(root)
        .arg("quickstart")
        .arg("--smoke")
        .arg("--quiet")
        .arg("--device")
        .arg("cpu")
        .arg("--out")
        .arg(out)
        .arg("--cache")
        .arg(cache)
        .arg("--encoder")
        .arg(common::minilm_dir())
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "exit {:?}: {}",
        run.status.code(),
        String::from_utf8_lossy(&run.stderr)
    );
    String::from_utf8_lossy(&run.stdout).into_owned()
}

#[test]
fn the_smoke_quickstart_writes_the_whole_recipe_and_reruns_alike() {
    let scratch = Scratch::new("quickstart");
    let out = scratch.0.join("qs");
    let cache = scratch.0.join("cache");
    let screen = quickstart(&out, &cache);
    for file in [
        "summary.md",
        "curated/train.jsonl",
        "curated/report.json",
        "curated/report.html",
        "data/train.jsonl",
        "data/held_back.jsonl",
        "model/tokenizer.json",
        "run/adapter/adapter_model.safetensors",
        "run/adapter/adapter_config.json",
        "run/log.jsonl",
        "run/loss.png",
        "merged/config.json",
    ] {
        assert!(
            out.join(file).exists(),
            "{file} missing; printed:\n{screen}"
        );
    }
    let summary = std::fs::read_to_string(out.join("summary.md")).unwrap();
    assert!(screen.starts_with(&summary), "the screen is summary.md");

    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("curated/report.json")).unwrap())
            .unwrap();
    let counts = &report["counts"];
    let line = format!(
        "{} rows in, {} removed, {} kept.",
        counts["rows_in"], counts["removed"], counts["rows_out"]
    );
    assert!(summary.contains(&line), "{line:?} not in\n{summary}");
    for (table, names) in [
        ("by_step", ["exact", "near", "contamination"]),
        ("by_category", ["duplicate", "rephrase", "similar"]),
    ] {
        for name in names {
            let n = counts[table][name].as_u64().unwrap();
            assert!(n > 0, "the sample data removes no row as {name}: {counts}");
            assert!(
                summary.contains(&format!("| {name} | {n} |")),
                "{name} {n}\n{summary}"
            );
        }
    }
    let kept = std::fs::read_to_string(out.join("curated/train.jsonl")).unwrap();
    let read = |f: &str| std::fs::read_to_string(out.join(f)).unwrap();
    let (train, held) = (read("data/train.jsonl"), read("data/held_back.jsonl"));
    assert_eq!(held.lines().count(), 4);
    let (mut train, mut held) = (train.lines().peekable(), held.lines().peekable());
    for row in kept.lines() {
        match (train.peek(), held.peek()) {
            (Some(&t), _) if t == row => {
                train.next();
            }
            (_, Some(&h)) if h == row => {
                held.next();
            }
            _ => panic!("{row} is in neither part of the split, in order"),
        }
    }
    assert!(
        train.next().is_none() && held.next().is_none(),
        "the split is the curated rows"
    );
    assert!(summary.contains("2 steps of LoRA"), "{summary}");
    for row in [
        "| base model |",
        "| with the adapter |",
        "| merged (`merged/`) |",
    ] {
        assert!(summary.contains(row), "{row} missing:\n{summary}");
    }

    let adapter = std::fs::read(out.join("run/adapter/adapter_model.safetensors")).unwrap();
    assert!(
        std::fs::read_dir(&cache).unwrap().next().is_some(),
        "embeddings cached"
    );
    quickstart(&out, &cache);
    let again = std::fs::read(out.join("run/adapter/adapter_model.safetensors")).unwrap();
    assert_eq!(adapter, again, "the same seed trains the same adapter");
    let siblings: Vec<String> = std::fs::read_dir(&scratch.0)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".qs"))
        .collect();
    assert!(siblings.is_empty(), "staging folders left: {siblings:?}");
}

#[test]
fn the_quickstart_refuses_a_folder_that_is_not_its_own() {
    let scratch = Scratch::new("quickstart-refuse");
    let out = scratch.0.join("mine");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("notes.txt"), "mine").unwrap();
    let run = Command::new(env!("CARGO_BIN_EXE_platypus"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["quickstart", "--smoke", "--quiet", "--out"])
        .arg(&out)
        .arg("--encoder")
        .arg(common::minilm_dir())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(4), "{err}");
    assert!(
        err.contains("is not a quickstart folder (no summary.md)"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(out.join("notes.txt")).unwrap(),
        "mine"
    );
}
