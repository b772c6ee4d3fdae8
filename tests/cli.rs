//! The `platypus` command line as a user meets it: where outputs go, what
//! is refused, and the exit statuses (2 usage, 3 bad input, 4 output, 5
//! device). Every file lives in the test's own temporary folder.
#![cfg(feature = "cli")] // runs the `platypus` binary

use std::os::unix::fs::{symlink, FileTypeExt};
use std::process::{Command, Output};

mod common;

use common::Scratch;

/// A fresh folder with a small database (`db.npy`, 50 × 8) and queries (`q.npy`, 6 × 8).
fn scratch(name: &str) -> Scratch {
    let dir = Scratch::new(&format!("cli-{name}"));
    let rows = |n: usize, seed: usize| -> Vec<f32> {
        (0..n * 8)
            .map(|i| (((i + seed) * 7919 % 211) as f32 - 105.0) / 50.0)
            .collect()
    };
    platypus::npy::write_f32_matrix(&dir.path("db.npy"), &rows(50, 1), [50, 8]).unwrap();
    platypus::npy::write_f32_matrix(&dir.path("q.npy"), &rows(6, 2), [6, 8]).unwrap();
    dir
}

/// Runs `platypus cosine-topk --database DIR/db.npy ARGS...` (paths in ARGS as given).
fn topk(dir: &Scratch, args: &[&dyn AsRef<std::ffi::OsStr>]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_platypus"));
    cmd.arg("cosine-topk")
        .arg("--database")
        .arg(dir.path("db.npy"));
    for a in args {
        cmd.arg(a);
    }
    cmd.output().unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn assert_status(out: &Output, code: i32, says: &str) {
    assert_eq!(out.status.code(), Some(code), "stderr: {}", stderr(out));
    assert!(
        stderr(out).contains(says),
        "stderr {:?} does not say {says:?}",
        stderr(out)
    );
}

#[test]
fn outputs_are_written_together_and_never_over_an_input() {
    let dir = scratch("inputs");
    let db_before = std::fs::read(dir.path("db.npy")).unwrap();
    // --out is the database: refused before the search (no "searched" report), the database untouched.
    let out = topk(&dir, &[&"--out", &dir.path("db.npy")]);
    assert_status(&out, 4, "is the input");
    assert!(out.stdout.is_empty());
    // Through a link to the queries.
    symlink(dir.path("q.npy"), dir.path("link.npy")).unwrap();
    let out = topk(
        &dir,
        &[
            &"--queries",
            &dir.path("q.npy"),
            &"--out",
            &dir.path("link.npy"),
        ],
    );
    assert_status(&out, 4, "is the input");
    assert_eq!(std::fs::read(dir.path("db.npy")).unwrap(), db_before);
    // The scores' path is a folder: no index file appears either.
    std::fs::create_dir(dir.path("idx.scores.npy")).unwrap();
    let out = topk(&dir, &[&"--out", &dir.path("idx.npy")]);
    assert_status(&out, 4, "is a folder");
    assert_eq!(
        dir.names(),
        ["db.npy", "idx.scores.npy", "link.npy", "q.npy"]
    );
    std::fs::remove_dir(dir.path("idx.scores.npy")).unwrap();
    // Both files, and nothing else.
    let out = topk(&dir, &[&"--k", &"3", &"--out", &dir.path("idx.npy")]);
    assert_status(&out, 0, "");
    let (indices, shape) = platypus::npy::read_u32_matrix(&dir.path("idx.npy")).unwrap();
    let (_, scores_shape) = platypus::npy::read_f32_matrix(&dir.path("idx.scores.npy")).unwrap();
    assert_eq!((shape, scores_shape), ([50, 3], [50, 3]));
    assert!(indices.iter().all(|&i| i < 50));
    assert_eq!(
        dir.names(),
        ["db.npy", "idx.npy", "idx.scores.npy", "link.npy", "q.npy"]
    );
}

#[test]
fn out_without_npy_needs_scores_and_links_and_fifos_are_written_through() {
    let dir = scratch("targets");
    let out = topk(&dir, &[&"--out", &dir.path("result")]);
    assert_status(&out, 3, "give --scores");
    assert_eq!(dir.names(), ["db.npy", "q.npy"]);
    let out = topk(
        &dir,
        &[
            &"--out",
            &dir.path("result"),
            &"--scores",
            &dir.path("s.npy"),
        ],
    );
    assert_status(&out, 0, "");
    assert_eq!(dir.names(), ["db.npy", "q.npy", "result", "s.npy"]);
    // --out through a link to a regular file: the file is replaced, the link stays.
    symlink(dir.path("result"), dir.path("via.npy")).unwrap();
    let out = topk(
        &dir,
        &[
            &"--k",
            &"2",
            &"--out",
            &dir.path("via.npy"),
            &"--scores",
            &dir.path("s.npy"),
        ],
    );
    assert_status(&out, 0, "");
    assert!(std::fs::symlink_metadata(dir.path("via.npy"))
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(
        platypus::npy::read_u32_matrix(&dir.path("result"))
            .unwrap()
            .1,
        [50, 2]
    );
    // A FIFO (like `--out >(consumer)`): written through, a reader gets the .npy.
    let fifo = dir.path("pipe");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let reader = {
        let fifo = fifo.clone();
        std::thread::spawn(move || std::fs::read(fifo).unwrap())
    };
    let out = topk(
        &dir,
        &[
            &"--k",
            &"4",
            &"--out",
            &fifo,
            &"--scores",
            &dir.path("s.npy"),
        ],
    );
    assert_status(&out, 0, "");
    let bytes = reader.join().unwrap();
    assert!(bytes.starts_with(b"\x93NUMPY"));
    assert!(std::fs::metadata(&fifo).unwrap().file_type().is_fifo());
}

#[test]
fn arguments_that_cannot_apply_are_refused() {
    let dir = scratch("args");
    let q = dir.path("q.npy");
    // Usage errors are clap's, exit 2.
    assert_status(
        &topk(&dir, &[&"--queries", &q, &"--earlier-only"]),
        2,
        "cannot be used with",
    );
    assert_status(&topk(&dir, &[&"--scores", &dir.path("s.npy")]), 2, "--out");
    assert_status(&topk(&dir, &[&"--device", &"tpu"]), 2, "possible values");
    // Out-of-range values are bad input, exit 3, naming the limit.
    assert_status(&topk(&dir, &[&"--threads", &"0"]), 3, "`threads`");
    let cores = std::thread::available_parallelism().unwrap().get();
    let out = topk(&dir, &[&"--threads", &"100000"]);
    assert_status(&out, 3, &format!("expected 1 to {}", 4 * cores));
    // A file that is not .npy.
    std::fs::write(dir.path("bad.npy"), b"not numpy").unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_platypus"));
    let out = cmd
        .args(["cosine-topk", "--database"])
        .arg(dir.path("bad.npy"))
        .output()
        .unwrap();
    assert_status(&out, 3, "bad.npy");
    assert_eq!(dir.names(), ["bad.npy", "db.npy", "q.npy"]);
}

#[test]
fn the_report_says_the_k_that_was_used() {
    let dir = scratch("k");
    let out = topk(&dir, &[&"--k", &"5000", &"--out", &dir.path("idx.npy")]);
    assert_status(&out, 0, "");
    let (_, [_, kk]) = platypus::npy::read_u32_matrix(&dir.path("idx.npy")).unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        kk < 5000 && report.contains(&format!("k {kk}: fewer candidates than the 5000 asked")),
        "{report}"
    );
    let out = topk(&dir, &[&"--queries", &dir.path("q.npy"), &"--k", &"3"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("(dim 8, k 3)"));
}

#[test]
fn no_usable_gpu_is_a_device_error() {
    if platypus::Device::cuda(0).is_ok() {
        eprintln!("SKIPPED: this machine has a CUDA device");
        return;
    }
    let dir = scratch("device");
    assert_status(&topk(&dir, &[&"--device", &"cuda"]), 5, "CUDA");
}
