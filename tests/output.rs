//! The output writer's rules (`platypus::output`), each case inside the
//! test's own temporary folder: nothing here writes under /dev. A full disk
//! is injected as a write that fails part-way with ENOSPC.

use std::io::{self, Write};
use std::os::unix::fs::{symlink, FileTypeExt};
use std::path::Path;

mod common;

use common::Scratch;
use platypus::output::Outputs;
use platypus::Error;

fn bytes(content: &'static [u8]) -> impl FnOnce(&mut dyn Write) -> io::Result<()> {
    move |w| w.write_all(content)
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap()
}

/// Asserts `r` is an `Error::Output` for `path` whose message says `text`.
fn expect_output_error(r: platypus::Result<()>, path: &Path, text: &str) {
    match r {
        Err(Error::Output { path: p, what }) => {
            assert_eq!(p, path);
            assert!(what.contains(text), "{what:?} does not say {text:?}");
        }
        other => panic!(
            "expected an output error for {}, got {other:?}",
            path.display()
        ),
    }
}

#[test]
fn a_new_or_regular_file_is_replaced_whole_and_no_temporary_remains() {
    let dir = Scratch::new("output-regular");
    let out = Outputs::default();
    let path = dir.path("a.bin");
    out.write_file(&path, bytes(b"first")).unwrap();
    out.write_file(&path, bytes(b"second")).unwrap();
    assert_eq!(read(&path), b"second");
    assert_eq!(dir.names(), ["a.bin"]);
}

#[test]
fn a_write_that_fails_part_way_leaves_the_old_file_and_no_temporary() {
    let dir = Scratch::new("output-enospc");
    let out = Outputs::default();
    let path = dir.path("a.bin");
    out.write_file(&path, bytes(b"old")).unwrap();
    // What a full disk does: some bytes, then ENOSPC.
    let full = |w: &mut dyn Write| -> io::Result<()> {
        w.write_all(&[7; 1 << 21])?;
        Err(io::Error::from_raw_os_error(28))
    };
    expect_output_error(
        out.write_file(&path, full),
        &path,
        "No space left on device",
    );
    assert_eq!(read(&path), b"old");
    let new = dir.path("new.bin");
    expect_output_error(out.write_file(&new, full), &new, "No space left");
    assert_eq!(dir.names(), ["a.bin"]);
}

#[test]
fn a_link_to_a_regular_file_is_followed_and_stays_a_link() {
    let dir = Scratch::new("output-symlink");
    let out = Outputs::default();
    let (real, link) = (dir.path("real.bin"), dir.path("link.bin"));
    out.write_file(&real, bytes(b"old")).unwrap();
    symlink(&real, &link).unwrap();
    out.write_file(&link, bytes(b"new")).unwrap();
    assert!(std::fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(read(&real), b"new");
    // A dangling link: the file is created where it points.
    let (target, dangling) = (dir.path("made.bin"), dir.path("dangling.bin"));
    symlink(&target, &dangling).unwrap();
    out.write_file(&dangling, bytes(b"made")).unwrap();
    assert_eq!(read(&target), b"made");
    assert!(std::fs::symlink_metadata(&dangling)
        .unwrap()
        .file_type()
        .is_symlink());
}

#[test]
fn a_fifo_is_written_through_not_replaced() {
    let dir = Scratch::new("output-fifo");
    let fifo = dir.path("pipe");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    let reader = {
        let fifo = fifo.clone();
        std::thread::spawn(move || read(&fifo))
    };
    Outputs::default()
        .write_file(&fifo, bytes(b"through the pipe"))
        .unwrap();
    assert_eq!(reader.join().unwrap(), b"through the pipe");
    assert!(std::fs::metadata(&fifo).unwrap().file_type().is_fifo());
    assert_eq!(dir.names(), ["pipe"]);
}

#[test]
fn folders_and_sockets_are_refused() {
    let dir = Scratch::new("output-refused");
    let out = Outputs::default();
    let folder = dir.path("folder");
    std::fs::create_dir(&folder).unwrap();
    expect_output_error(out.write_file(&folder, bytes(b"x")), &folder, "is a folder");
    let socket = dir.path("socket");
    let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    expect_output_error(out.write_file(&socket, bytes(b"x")), &socket, "is a socket");
    // Through a link too.
    let link = dir.path("link");
    symlink(&folder, &link).unwrap();
    expect_output_error(out.write_file(&link, bytes(b"x")), &link, "is a folder");
}

#[test]
fn an_input_is_never_overwritten_by_any_path_to_it() {
    let dir = Scratch::new("output-input");
    let input = dir.path("db.npy");
    std::fs::write(&input, b"the input").unwrap();
    let (link, hard) = (dir.path("link.npy"), dir.path("hard.npy"));
    symlink(&input, &link).unwrap();
    std::fs::hard_link(&input, &hard).unwrap();
    let out = Outputs::new(&[&input]);
    for path in [&input, &link, &hard] {
        expect_output_error(out.write_file(path, bytes(b"x")), path, "is the input");
    }
    assert_eq!(read(&input), b"the input");
    // Another file is fine.
    out.write_file(&dir.path("other.npy"), bytes(b"ok"))
        .unwrap();
}

#[test]
fn a_group_appears_whole_or_not_at_all() {
    let dir = Scratch::new("output-group");
    let out = Outputs::default();
    let (idx, scores) = (dir.path("idx.npy"), dir.path("idx.scores.npy"));
    // The second file's path is a folder: the first does not appear.
    std::fs::create_dir(&scores).unwrap();
    let mut group = out.group();
    group.file(&idx, bytes(b"indices")).unwrap();
    expect_output_error(
        group.file(&scores, bytes(b"scores")),
        &scores,
        "is a folder",
    );
    drop(group);
    assert_eq!(dir.names(), ["idx.scores.npy"]);
    std::fs::remove_dir(&scores).unwrap();
    // A write failing part-way in the second file: the first keeps its old content.
    out.write_file(&idx, bytes(b"old indices")).unwrap();
    let mut group = out.group();
    group.file(&idx, bytes(b"new indices")).unwrap();
    let r = group.file(&scores, |w| {
        w.write_all(b"half")?;
        Err(io::Error::from_raw_os_error(28))
    });
    expect_output_error(r, &scores, "No space left");
    drop(group);
    assert_eq!(read(&idx), b"old indices");
    assert_eq!(dir.names(), ["idx.npy"]);
    // Both, committed together.
    let mut group = out.group();
    group.file(&idx, bytes(b"i")).unwrap();
    group.file(&scores, bytes(b"s")).unwrap();
    group.commit().unwrap();
    assert_eq!((read(&idx), read(&scores)), (b"i".to_vec(), b"s".to_vec()));
    // Two outputs that are one file.
    let mut group = out.group();
    group.file(&idx, bytes(b"a")).unwrap();
    expect_output_error(group.file(&idx, bytes(b"b")), &idx, "another output");
}

#[test]
fn a_rename_that_fails_at_commit_puts_the_earlier_ones_back() {
    let dir = Scratch::new("output-rollback");
    let out = Outputs::default();
    let first = dir.path("first.bin");
    out.write_file(&first, bytes(b"old first")).unwrap();
    std::fs::create_dir(dir.path("sub")).unwrap();
    let second = dir.path("sub/second.bin");
    let mut group = out.group();
    group.file(&first, bytes(b"new first")).unwrap();
    group.file(&second, bytes(b"new second")).unwrap();
    // The second file's folder goes away (its temporary with it) before the commit.
    std::fs::remove_dir_all(dir.path("sub")).unwrap();
    assert!(matches!(group.commit(), Err(Error::Output { .. })));
    assert_eq!(read(&first), b"old first");
    assert_eq!(dir.names(), ["first.bin"]);
}

#[test]
fn a_stream_gets_nothing_when_its_group_fails() {
    let dir = Scratch::new("output-stream-group");
    let fifo = dir.path("pipe");
    assert!(std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let out = Outputs::default();
    let mut group = out.group();
    group.file(&fifo, bytes(b"never")).unwrap();
    let bad = dir.path("bad.bin");
    let r = group.file(&bad, |_| Err(io::Error::from_raw_os_error(28)));
    expect_output_error(r, &bad, "No space left");
    drop(group); // nothing was opened on the FIFO: no reader needed, no hang
    assert_eq!(dir.names(), ["pipe"]);
}

#[test]
fn a_folder_is_replaced_whole() {
    let dir = Scratch::new("output-folder");
    let out = Outputs::default();
    let model = dir.path("merged");
    let fill = |files: &'static [(&'static str, &'static [u8])]| {
        move |tmp: &Path| -> platypus::Result<()> {
            for (name, content) in files {
                std::fs::write(tmp.join(name), content).unwrap();
            }
            Ok(())
        }
    };
    out.write_dir(
        &model,
        fill(&[("config.json", b"{}"), ("model.safetensors", b"w1")]),
    )
    .unwrap();
    out.write_dir(&model, fill(&[("model.safetensors", b"w2")]))
        .unwrap();
    assert_eq!(dir.names(), ["merged", "merged/model.safetensors"]);
    assert_eq!(read(&model.join("model.safetensors")), b"w2");
    // A fill that fails: the old folder stays, no temporary folder remains.
    let failing = |_: &Path| -> platypus::Result<()> {
        Err(Error::Output {
            path: "x".into(),
            what: "injected".into(),
        })
    };
    assert!(out.write_dir(&model, failing).is_err());
    assert_eq!(dir.names(), ["merged", "merged/model.safetensors"]);
    // A file in the way, and a folder that holds an input, are refused.
    let file = dir.path("file");
    std::fs::write(&file, b"x").unwrap();
    expect_output_error(out.write_dir(&file, fill(&[])), &file, "not a folder");
    let input = model.join("model.safetensors");
    let guarded = Outputs::new(&[&input]);
    expect_output_error(
        guarded.write_dir(&model, fill(&[])),
        &model,
        "holds the input",
    );
    assert_eq!(read(&input), b"w2");
}

#[test]
fn an_unwritable_folder_is_an_output_error() {
    use std::os::unix::fs::PermissionsExt;
    let dir = Scratch::new("output-readonly");
    let locked = dir.path("locked");
    std::fs::create_dir(&locked).unwrap();
    std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o555)).unwrap();
    let path = locked.join("a.bin");
    let r = Outputs::default().write_file(&path, bytes(b"x"));
    // Root writes anyway (as CI's containers run): then the write must simply succeed.
    let privileged = std::fs::write(locked.join("probe"), b"").is_ok();
    if privileged {
        r.unwrap();
        assert_eq!(read(&path), b"x");
    } else {
        expect_output_error(r, &path, "ermission denied");
    }
    std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o755)).unwrap();
}
