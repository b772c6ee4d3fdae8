//! `platypus curate` end to end with all-MiniLM-L6-v2 (from
//! scripts/minilm-model.sh) on examples/curate: 16 rows with a planted exact
//! duplicate (the copy with the longer output is kept), a near-copy, a
//! rephrasing, two similar-but-different pairs (cosine 0.70 and 0.75), and a
//! benchmark with a rephrased and a reworded test question plus two that
//! match nothing above 0.7. Each step must remove exactly its planted rows.
#![cfg(feature = "cli")] // runs the `platypus` binary

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use common::{platypus, Scratch};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Runs `platypus curate` on the example with `extra` arguments; returns
/// the report and the stdout summary.
fn curate(out: &Path, benchmark: &Path, extra: &[&str]) -> (serde_json::Value, String) {
    let run = Command::new(env!("CARGO_BIN_EXE_platypus"))
        .arg("curate")
        .arg("--train")
        .arg(root().join("examples/curate/train.jsonl"))
        .arg("--benchmark")
        .arg(benchmark)
        .arg("--model")
        .arg(common::minilm_dir())
        .arg("--out")
        .arg(out)
        .arg("--quiet")
        .args(extra)
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let report = std::fs::read_to_string(out.join("report.json")).unwrap();
    (
        serde_json::from_str(&report).unwrap(),
        String::from_utf8_lossy(&run.stdout).into_owned(),
    )
}

/// The rows each step removed.
fn removed_by(report: &serde_json::Value, step: &str) -> BTreeSet<u64> {
    report["removed"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["step"] == step)
        .map(|r| r["row"].as_u64().unwrap())
        .collect()
}

fn kept_instructions(out: &Path) -> Vec<String> {
    std::fs::read_to_string(out.join("train.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let row: serde_json::Value = serde_json::from_str(l).unwrap();
            row["instruction"].as_str().unwrap().to_string()
        })
        .collect()
}

fn set(rows: &[u64]) -> BTreeSet<u64> {
    rows.iter().copied().collect()
}

#[test]
fn each_step_removes_exactly_its_planted_rows() {
    let scratch = Scratch::new("curate-default");
    let out = scratch.0.as_path();
    let bench = root().join("examples/curate/benchmark.jsonl");
    let (report, summary) = curate(out, &bench, &[]);
    assert_eq!(
        removed_by(&report, "exact"),
        set(&[2]),
        "the shorter copy of row 6"
    );
    assert_eq!(
        removed_by(&report, "near"),
        set(&[7, 8]),
        "near-copy 0.954, rephrasing 0.874"
    );
    assert_eq!(removed_by(&report, "contamination"), set(&[0, 12]));
    assert!(
        summary.contains("16 rows in, 5 removed, 11 rows out"),
        "{summary}"
    );
    // The kept rows in file order, the sky row with the longer output.
    let train: Vec<serde_json::Value> =
        std::fs::read_to_string(root().join("examples/curate/train.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
    let want: Vec<String> = [1, 3, 4, 5, 6, 9, 10, 11, 13, 14, 15]
        .iter()
        .map(|&i| train[i]["instruction"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(kept_instructions(out), want);
    let kept = std::fs::read_to_string(out.join("train.jsonl")).unwrap();
    assert!(kept.contains("Rayleigh scattering, proportional to 1/lambda^4"));
}

#[test]
fn paper_compat_uses_0_7_and_the_nearest_row_per_test_item() {
    let scratch = Scratch::new("curate-paper");
    let out = scratch.0.as_path();
    let bench = root().join("examples/curate/benchmark.jsonl");
    let (report, _) = curate(out, &bench, &["--paper-compat"]);
    assert_eq!(removed_by(&report, "exact"), set(&[2]));
    // 0.702 (earthquakes) and 0.748 (immunizations) are above 0.7.
    assert_eq!(removed_by(&report, "near"), set(&[7, 8, 10, 15]));
    // 0.664 (ice vs frozen water) stays below 0.7.
    assert_eq!(removed_by(&report, "contamination"), set(&[0, 12]));
}

#[test]
fn decontamination_removes_every_row_above_the_threshold_not_only_the_nearest() {
    let scratch = Scratch::new("curate-every");
    let out = scratch.0.as_path();
    let bench = out.join("sky.jsonl");
    std::fs::write(&bench, "{\"question\": \"Why is the sky blue?\"}\n").unwrap();
    let only = ["--steps", "contamination"];
    let (report, _) = curate(&out.join("every"), &bench, &only);
    assert_eq!(removed_by(&report, "contamination"), set(&[2, 6, 7]));
    let (report, _) = curate(
        &out.join("paper"),
        &bench,
        &["--steps", "contamination", "--paper-compat"],
    );
    assert_eq!(
        removed_by(&report, "contamination"),
        set(&[2]),
        "the nearest row, ties to the lower index"
    );
}

#[test]
fn train_refuses_contaminated_data_and_drops_it_on_request() {
    let scratch = Scratch::new("train-guard");
    let dir = scratch.0.as_path();
    let model = dir.join("mini");
    let init = platypus(&[
        &"init-model",
        &"--out",
        &model,
        &"--tokenizer-corpus",
        &root().join("examples/stem.jsonl"),
    ]);
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
    let data = root().join("examples/curate/train.jsonl");
    let bench = root().join("examples/curate/benchmark.jsonl");
    let encoder = common::minilm_dir();
    let train = |out: &Path, extra: &[&dyn AsRef<std::ffi::OsStr>]| {
        let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![
            &"train",
            &"--model",
            &model,
            &"--data",
            &data,
            &"--out",
            &out,
            &"--max-steps",
            &"1",
            &"--gradient-accumulation-steps",
            &"1",
            &"--cutoff-len",
            &"64",
            &"--quiet",
            &"--decontaminate-against",
            &bench,
            &"--encoder",
            &encoder,
        ];
        args.extend_from_slice(extra);
        platypus(&args)
    };
    // What the guard must find: curate's contamination step alone.
    let (want, _) = curate(&dir.join("curated"), &bench, &["--steps", "contamination"]);
    let want = removed_by(&want, "contamination");
    assert!(!want.is_empty(), "the example has reworded test questions");

    let refused = dir.join("refused");
    let run = train(&refused, &[]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(6), "{stderr}");
    let reason = format!(
        "{} of 16 rows reach cosine 0.8 to a benchmark item; see {}",
        want.len(),
        refused.join("decontamination/report.html").display()
    );
    assert!(stderr.contains(&reason), "expected {reason:?} in {stderr}");
    assert!(!refused.join("adapter").exists(), "nothing is trained");
    let report: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(refused.join("decontamination/report.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(removed_by(&report, "contamination"), want);

    // Dropped: trained on the other rows, in the same folder the refusal left.
    let run = train(&refused, &[&"--drop-contaminated"]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let stdout = String::from_utf8_lossy(&run.stdout);
    let rows = format!("({} rows)", 16 - want.len());
    assert!(stdout.contains(&rows), "expected {rows:?} in {stdout}");
    assert!(refused.join("adapter/adapter_model.safetensors").exists());
    let kept = std::fs::read_to_string(refused.join("decontamination/train.jsonl")).unwrap();
    let all = std::fs::read_to_string(&data).unwrap();
    let expected: Vec<&str> = all
        .lines()
        .enumerate()
        .filter(|(i, _)| !want.contains(&(*i as u64)))
        .map(|(_, l)| l)
        .collect();
    assert_eq!(kept.lines().collect::<Vec<_>>(), expected);

    let run = platypus(&[
        &"train",
        &"--model",
        &model,
        &"--data",
        &data,
        &"--out",
        &dir.join("x"),
        &"--drop-contaminated",
    ]);
    assert_eq!(
        run.status.code(),
        Some(2),
        "--drop-contaminated alone is a usage error"
    );
}
