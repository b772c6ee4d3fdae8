//! `platypus train` as a user runs it: a run on a model the crate makes,
//! its outputs (adapter loadable by eval and merge, log, loss curve); exact
//! resume of runs killed with SIGKILL at several moments, one of them inside
//! a checkpoint write; and the errors of bad input.
#![cfg(feature = "cli")] // runs the `platypus` binary

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{platypus, Scratch};

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn failed(out: &Output, code: i32, want: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "{err}");
    assert!(err.contains(want), "expected {want:?} in: {err}");
}

/// Pre-tokenized rows for the tiny preset (vocab 256): `n` rows of 12 to 31
/// tokens, the first third of each a prompt (labels −100).
fn write_rows(path: &Path, n: usize) {
    let mut text = String::new();
    for i in 0..n {
        let len = 12 + (i * 7) % 20;
        let ids: Vec<u32> = (0..len)
            .map(|t| ((i * 31 + t * 17) % 250 + 3) as u32)
            .collect();
        let labels: Vec<i64> = ids
            .iter()
            .enumerate()
            .map(|(t, &id)| if t < len / 3 { -100 } else { id as i64 })
            .collect();
        text += &serde_json::json!({"input_ids": ids, "labels": labels}).to_string();
        text.push('\n');
    }
    std::fs::write(path, text).unwrap();
}

/// A tiny random model and its rows in `dir`.
fn tiny_setup(dir: &Scratch) -> (PathBuf, PathBuf) {
    let model = dir.path("tiny");
    ok(&platypus(&[
        &"init-model",
        &"--out",
        &model,
        &"--preset",
        &"tiny",
    ]));
    let data = dir.path("rows.jsonl");
    write_rows(&data, 24);
    (model, data)
}

/// The flags of the resume runs: 10 steps of 2 micro-batches of 2 rows,
/// dropout on, a checkpoint every step, the newest 3 kept.
fn train_args(model: &Path, data: &Path, out: &Path) -> Vec<String> {
    [
        "train",
        "--model",
        &model.display().to_string(),
        "--data",
        &data.display().to_string(),
        "--out",
        &out.display().to_string(),
        "--max-steps",
        "10",
        "--per-device-batch-size",
        "2",
        "--gradient-accumulation-steps",
        "2",
        "--warmup-steps",
        "2",
        "--learning-rate",
        "3e-3",
        "--lora-dropout",
        "0.1",
        "--target-modules",
        "all-linear",
        "--save-steps",
        "1",
        "--save-total-limit",
        "3",
        "--quiet",
        "--threads",
        "2",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn spawn(args: &[String], delay_ms: Option<u64>) -> Child {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_platypus"));
    cmd.args(args).stdout(Stdio::null()).stderr(Stdio::piped());
    if let Some(ms) = delay_ms {
        cmd.env("PLATYPUS_CHECKPOINT_DELAY_MS", ms.to_string());
    }
    cmd.spawn().unwrap()
}

/// Lines of the run's log.
fn logged_steps(out: &Path) -> usize {
    std::fs::read_to_string(out.join("log.jsonl")).map_or(0, |t| t.lines().count())
}

/// Whether a checkpoint is being written (only its temporary exists).
fn checkpoint_in_flight(out: &Path) -> bool {
    std::fs::read_dir(out).is_ok_and(|d| {
        d.flatten().any(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.starts_with(".checkpoint-") && name.contains(".tmp")
        })
    })
}

/// Runs until `kill_when` holds (then SIGKILL) or the process ends; true if
/// it was killed.
fn run_until(mut child: Child, kill_when: impl Fn() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                std::io::Read::read_to_string(&mut e, &mut err).unwrap();
            }
            assert!(status.success(), "exit {status}: {err}");
            return false;
        }
        if kill_when() {
            child.kill().unwrap(); // SIGKILL
            child.wait().unwrap();
            return true;
        }
        assert!(start.elapsed() < Duration::from_secs(600), "the run hangs");
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn adapter_bytes(out: &Path) -> Vec<u8> {
    std::fs::read(out.join("adapter/adapter_model.safetensors")).unwrap()
}

/// The loss of every step, from the log.
fn losses(out: &Path) -> Vec<String> {
    std::fs::read_to_string(out.join("log.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            format!("{} {}", v["step"], v["loss"])
        })
        .collect()
}

#[test]
fn a_run_killed_at_any_moment_and_resumed_ends_with_the_uninterrupted_adapter() {
    let dir = Scratch::new("train-resume");
    let (model, data) = tiny_setup(&dir);
    let whole = dir.path("whole");
    assert!(!run_until(
        spawn(&train_args(&model, &data, &whole), None),
        || false
    ));
    let want = adapter_bytes(&whole);
    assert_eq!(logged_steps(&whole), 10);

    let cut = dir.path("cut");
    let mut args = train_args(&model, &data, &cut);
    // Killed: before any checkpoint, after 3 logged steps, inside the write of
    // a checkpoint (held open 300 ms), at once after a resume, after 7 steps;
    // then resumed to the end.
    let first = spawn(&args, None);
    assert!(run_until(first, || cut.join("log.jsonl").exists()));
    args.push("--resume".into());
    assert!(run_until(spawn(&args, None), || logged_steps(&cut) >= 3));
    assert!(run_until(spawn(&args, Some(300)), || checkpoint_in_flight(
        &cut
    )));
    assert!(run_until(spawn(&args, None), || true));
    assert!(run_until(spawn(&args, None), || logged_steps(&cut) >= 7));
    assert!(!run_until(spawn(&args, None), || false));
    assert!(
        adapter_bytes(&cut) == want,
        "the resumed run's adapter differs"
    );
    assert_eq!(
        losses(&cut),
        losses(&whole),
        "the resumed run's losses differ"
    );
    // Only the newest 3 checkpoints, no temporaries.
    let names: Vec<String> = std::fs::read_dir(&cut)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.') || n.starts_with("checkpoint"))
        .collect();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(
        sorted,
        ["checkpoint-10", "checkpoint-8", "checkpoint-9"],
        "{names:?}"
    );
}

#[test]
fn a_run_writes_an_adapter_eval_and_merge_take() {
    let dir = Scratch::new("train-outputs");
    let (model, data) = tiny_setup(&dir);
    let out = dir.path("run");
    let report = ok(&platypus(&[
        &"train",
        &"--model",
        &model,
        &"--data",
        &data,
        &"--out",
        &out,
        &"--max-steps",
        &"6",
        &"--gradient-accumulation-steps",
        &"2",
        &"--warmup-steps",
        &"1",
        &"--learning-rate",
        &"5e-3",
        &"--packing",
        &"--quiet",
    ]));
    assert!(report.contains("trained 6 steps"), "{report}");
    for file in ["log.jsonl", "loss.png", "adapter/adapter_model.safetensors"] {
        assert!(out.join(file).exists(), "{file} missing: {report}");
    }
    let png = std::fs::read(out.join("loss.png")).unwrap();
    assert_eq!(&png[1..4], b"PNG");
    // Training lowered the loss on its own rows: eval with and without it.
    let eval = |adapter: Option<&Path>| -> f64 {
        let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> =
            vec![&"eval", &"--model", &model, &"--data", &data, &"--json"];
        let adapter = adapter.map(Path::to_path_buf);
        if let Some(a) = &adapter {
            args.extend([&"--adapter" as &dyn AsRef<std::ffi::OsStr>, a]);
        }
        let v: serde_json::Value = serde_json::from_str(&ok(&platypus(&args))).unwrap();
        v["loss"].as_f64().unwrap()
    };
    let (before, after) = (eval(None), eval(Some(&out.join("adapter"))));
    assert!(
        after < before,
        "loss {before} before training, {after} after"
    );
    let merged = dir.path("merged");
    ok(&platypus(&[
        &"merge",
        &"--base",
        &model,
        &"--adapter",
        &out.join("adapter"),
        &"--out",
        &merged,
    ]));
    let merged_loss = {
        let v: serde_json::Value = serde_json::from_str(&ok(&platypus(&[
            &"eval", &"--model", &merged, &"--data", &data, &"--json",
        ])))
        .unwrap();
        v["loss"].as_f64().unwrap()
    };
    assert!(
        (merged_loss - after).abs() < 1e-4 * after,
        "{merged_loss} vs {after}"
    );
}

#[test]
fn bad_input_is_refused_naming_what_is_wrong() {
    let dir = Scratch::new("train-errors");
    let (model, data) = tiny_setup(&dir);
    let run = |extra: &[&dyn AsRef<std::ffi::OsStr>], data: &Path, out: &str| {
        let out = dir.path(out);
        let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![
            &"train", &"--model", &model, &"--data", &data, &"--out", &out, &"--quiet",
        ];
        args.extend_from_slice(extra);
        platypus(&args)
    };
    let broken = dir.path("broken.jsonl");
    std::fs::write(
        &broken,
        "{\"input_ids\": [5, 6, 7]}\n{\"input_ids\": [5, \"x\"]}\n",
    )
    .unwrap();
    failed(
        &run(&[], &broken, "o1"),
        3,
        "broken.jsonl: line 2: \"input_ids\"[1] is \"x\"",
    );
    let skipped = run(&[&"--skip-bad-rows", &"--max-steps", &"1"], &broken, "o2");
    ok(&skipped);
    assert!(String::from_utf8_lossy(&skipped.stderr).contains("warning"));
    let empty = dir.path("empty.jsonl");
    std::fs::write(&empty, "\n").unwrap();
    failed(&run(&[], &empty, "o3"), 3, "has no rows");
    failed(
        &run(&[&"--target-modules", &"qq_proj"], &data, "o4"),
        3,
        "target_modules",
    );
    failed(&run(&[&"--lora-r", &"0"], &data, "o5"), 3, "lora_r");
    failed(
        &run(&[&"--lora-dropout", &"1.5"], &data, "o6"),
        3,
        "lora_dropout",
    );
    failed(&run(&[&"--max-steps", &"0"], &data, "o6"), 3, "max_steps");
    ok(&run(&[&"--max-steps", &"1"], &data, "o7"));
    failed(&run(&[&"--max-steps", &"1"], &data, "o7"), 4, "--resume");
    failed(
        &run(&[&"--max-steps", &"1", &"--resume"], &data, "o7"),
        4,
        "without checkpoints",
    );
    ok(&run(
        &[&"--max-steps", &"1", &"--save-steps", &"1"],
        &data,
        "o8",
    ));
    failed(
        &run(
            &[&"--max-steps", &"2", &"--save-steps", &"1", &"--resume"],
            &data,
            "o8",
        ),
        3,
        "another configuration",
    );
    failed(
        &run(&[&"--resume", &dir.path("o8/checkpoint-7")], &data, "o8"),
        3,
        "is not a checkpoint folder",
    );
    // A resumed run with other data is refused.
    let other = dir.path("other.jsonl");
    write_rows(&other, 5);
    failed(
        &run(
            &[&"--max-steps", &"1", &"--save-steps", &"1", &"--resume"],
            &other,
            "o8",
        ),
        3,
        "fingerprint",
    );
}
