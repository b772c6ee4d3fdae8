//! README cannot rot: its command-line reference is `platypus reference`'s
//! output, and every command in its `sh` blocks is run, here or by the test
//! command.
#![cfg(feature = "cli")] // runs the `platypus` binary

use std::path::Path;
use std::process::Command;

const START: &str = "<!-- cli-reference: `platypus reference` writes what follows -->\n";
const END: &str = "<!-- /cli-reference -->\n";

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &str) -> String {
    std::fs::read_to_string(root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// README's reference section equals `platypus reference`, and every
/// subcommand and flag there has a description. `PLATYPUS_UPDATE_README=1`
/// writes the current reference into README instead of failing.
#[test]
fn cli_reference_is_current_and_complete() {
    let out = Command::new(env!("CARGO_BIN_EXE_platypus"))
        .arg("reference")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reference = String::from_utf8(out.stdout).unwrap();
    for line in reference.lines() {
        assert!(!line.ends_with("|  |"), "a flag without help: {line}");
    }
    for sub in reference.split("### ").skip(1) {
        let about = sub.lines().nth(2).unwrap_or_default();
        assert!(!about.trim().is_empty(), "a subcommand without help: {sub}");
    }
    let readme = read("README.md");
    let start = readme
        .find(START)
        .expect("README has no cli-reference start marker")
        + START.len();
    let end = readme[start..]
        .find(END)
        .expect("README has no cli-reference end marker")
        + start;
    if readme[start..end] == reference {
        return;
    }
    if std::env::var("PLATYPUS_UPDATE_README").is_ok_and(|v| v == "1") {
        let updated = format!("{}{reference}{}", &readme[..start], &readme[end..]);
        let tmp = root().join(".README.md.tmp");
        std::fs::write(&tmp, updated).unwrap();
        std::fs::rename(&tmp, root().join("README.md")).unwrap();
        return;
    }
    panic!(
        "README's command-line reference is not `platypus reference`'s output: \
         rerun with PLATYPUS_UPDATE_README=1 to write it"
    );
}

/// One command of a README `sh` block: continuation lines joined, the
/// comment dropped.
fn commands(readme: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut in_sh = false;
    let mut pending = String::new();
    for line in readme.lines() {
        if line.starts_with("```") {
            in_sh = !in_sh && line == "```sh";
            continue;
        }
        if !in_sh {
            continue;
        }
        let code = strip_comment(line);
        let code = code.trim();
        if let Some(head) = code.strip_suffix('\\') {
            pending.push_str(head);
            continue;
        }
        pending.push_str(code);
        if !pending.trim().is_empty() {
            out.push(pending.split_whitespace().collect::<Vec<_>>().join(" "));
        }
        pending.clear();
    }
    out
}

/// `line` before a `#` that starts a shell comment (outside quotes, after a
/// blank or at the start).
fn strip_comment(line: &str) -> &str {
    let mut quote = None;
    let mut prev = ' ';
    for (i, c) in line.char_indices() {
        match (quote, c) {
            (None, '"' | '\'') => quote = Some(c),
            (Some(q), _) if c == q => quote = None,
            (None, '#') if prev.is_whitespace() => return &line[..i],
            _ => {}
        }
        prev = c;
    }
    line
}

/// Shell words: blanks split, quotes group.
fn words(command: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut word = String::new();
    let mut quote = None;
    let mut started = false;
    for c in command.chars() {
        match (quote, c) {
            (None, '"' | '\'') => (quote, started) = (Some(c), true),
            (Some(q), _) if c == q => quote = None,
            (None, c) if c.is_whitespace() => {
                if started {
                    out.push(std::mem::take(&mut word));
                }
                started = false;
            }
            _ => (word.push(c), started = true).0,
        }
    }
    if started {
        out.push(word);
    }
    out
}

/// The scripts the test command runs (itself included), and the files that
/// call them.
fn run_by_ci(script: &str) -> bool {
    let ci = read(".ci/run");
    if script == "scripts/test.sh" {
        return ci.contains(script);
    }
    let mut callers = vec![read("scripts/test.sh")];
    let bundle_tests = root().join("scripts/gpu-bundle");
    for entry in std::fs::read_dir(bundle_tests).unwrap() {
        let path = entry.unwrap().path();
        if path
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("test_")
        {
            callers.push(std::fs::read_to_string(path).unwrap());
        }
    }
    let name = script.rsplit('/').next().unwrap();
    callers
        .iter()
        .any(|c| c.contains(script) || c.contains(&format!("\"{name}\"")))
}

/// Every `sh` command in README runs: `platypus` commands here, in order, in a
/// scratch folder that sees the repository's `examples/`, `data/` and
/// `.tools/` (the quickstart at its `--smoke` size); scripts are the test
/// command or run by it; benches run in test mode under `cargo test
/// --all-targets`.
#[test]
fn readme_commands_run() {
    let readme = read("README.md");
    let commands = commands(&readme);
    assert!(commands.len() >= 10, "found only {commands:?}");
    let scratch = std::env::temp_dir().join(format!("platypus-readme-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch).unwrap();
    for shared in ["examples", "data", ".tools"] {
        std::os::unix::fs::symlink(root().join(shared), scratch.join(shared)).unwrap();
    }
    let mut ran = 0;
    for command in &commands {
        let mut words = words(command);
        while words
            .first()
            .is_some_and(|w| w.contains('=') && !w.starts_with('-'))
        {
            words.remove(0);
        }
        let args: Vec<String> = match words.first().map(String::as_str) {
            Some(s) if s.starts_with("scripts/") || s.starts_with("gpu-bundle/") => {
                let script = if s.starts_with("gpu-bundle/") {
                    format!("scripts/{s}")
                } else {
                    s.to_string()
                };
                assert!(
                    root().join(&script).exists(),
                    "README names {s}, which does not exist"
                );
                assert!(
                    run_by_ci(s),
                    "README's `{command}`: {s} is not run by the test command"
                );
                continue;
            }
            Some("cargo") if words.len() == 4 && words[1..3] == ["bench", "--bench"] => {
                let bench = &words[words.len() - 1];
                let path = root().join(format!("benches/{bench}.rs"));
                assert!(path.exists(), "README's `{command}`: no {}", path.display());
                let tests = read("scripts/test.sh");
                assert!(
                    tests.lines().any(|l| l.contains("cargo test") && l.contains("--all-targets")),
                    "README's `{command}`: the test command no longer runs the benches in test mode"
                );
                continue;
            }
            Some("platypus") => words[1..].to_vec(),
            Some("cargo") if words[..4] == ["cargo", "run", "--release", "--"] => {
                words[4..].to_vec()
            }
            _ => panic!("README's `{command}`: not a command this test knows how to run"),
        };
        for w in &args {
            assert!(
                !w.starts_with('[') && !w.contains('|') && !w.contains("..."),
                "README's `{command}` is a synopsis, not a command: synopses belong to the reference"
            );
        }
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_platypus"));
        cmd.args(&args).current_dir(&scratch);
        if args[0] == "quickstart" {
            cmd.arg("--smoke");
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "README's `{command}` failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        ran += 1;
    }
    assert!(ran >= 10, "ran only {ran} of {commands:?}");
    let _ = std::fs::remove_dir_all(&scratch);
}

#[test]
fn command_parsing() {
    let readme =
        "```sh\na --x 'b c' \\\n  --y 2   # note\n# only a comment\n```\n```text\nnot me\n```\n";
    assert_eq!(commands(readme), vec!["a --x 'b c' --y 2"]);
    assert_eq!(words("a --x 'b c' \"d#e\""), vec!["a", "--x", "b c", "d#e"]);
    assert_eq!(strip_comment("x \"a # b\" # c"), "x \"a # b\" ");
}
