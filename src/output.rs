//! The one way this crate writes outputs (files, groups of files that belong
//! together, folders), so that no command leaves a half-written or mixed
//! result, replaces what it should write through, or overwrites its input.
//!
//! Where a target path leads decides how it is written:
//! - **a regular file, or nothing yet**: the bytes go to a temporary file
//!   beside it (`.NAME.tmp<pid>.<n>`, same directory, so the rename stays on
//!   one file system), which is flushed, fsynced and renamed over the target:
//!   a reader sees the old file or the new one, never a part;
//! - **a symbolic link** is followed to what it names (a link to a regular
//!   file has that file replaced; the link stays);
//! - **a character device or FIFO** (`/dev/stdout`, `/dev/null`, a pipe,
//!   `>(...)`) is written through in place, once everything else of its
//!   group is ready;
//! - **a directory, block device or socket** is refused;
//! - **one of the command's inputs** (the same device and inode, through any
//!   link) is refused, and so are two regular outputs of a group that are
//!   one file.
//!
//! A [`Group`] commits its files together: every regular file is written to
//! its temporary first, then the streams get their bytes, then each target
//! is renamed into place, the previous version kept aside until all renames
//! succeeded (and put back if one fails). Only a crash between two renames
//! can leave a group half-replaced (the previous versions then remain as
//! `.NAME.old<pid>`). A folder ([`Outputs::write_dir`]) is filled under a
//! temporary name and renamed into place in one step. Every failure, a full
//! disk (ENOSPC) included, is an [`Error::Output`] naming the path, and
//! leaves no temporary file behind.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::{Error, Result};

/// Makes the temporary names of one process distinct.
static NEXT_TEMP: AtomicU64 = AtomicU64::new(0);

fn output_error(path: &Path, what: impl std::fmt::Display) -> Error {
    Error::Output {
        path: path.to_path_buf(),
        what: what.to_string(),
    }
}

/// `dir/.NAME.KIND<pid>.<n>` beside `path`.
fn sibling(path: &Path, kind: &str) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let n = NEXT_TEMP.fetch_add(1, Ordering::Relaxed);
    path.with_file_name(format!(".{name}.{kind}{}.{n}", std::process::id()))
}

/// Where a path leads, once its links are followed.
enum Target {
    /// A regular file (`exists`) or a new one, at this resolved path.
    Regular { path: PathBuf, exists: bool },
    /// A character device or FIFO: written through.
    Stream { path: PathBuf },
}

/// The outputs of one command: knows its inputs, so that none is overwritten.
#[derive(Debug, Default)]
pub struct Outputs {
    /// (device, inode, path) of each input that exists.
    inputs: Vec<(u64, u64, PathBuf)>,
}

impl Outputs {
    /// Outputs that must not be any of `inputs` (paths that do not exist
    /// are ignored: they cannot be overwritten).
    pub fn new(inputs: &[&Path]) -> Outputs {
        let inputs = inputs
            .iter()
            .filter_map(|p| {
                fs::metadata(p)
                    .ok()
                    .map(|m| (m.dev(), m.ino(), p.to_path_buf()))
            })
            .collect();
        Outputs { inputs }
    }

    /// Writes one file: `write` produces its bytes (see the module doc for
    /// how each kind of target is written).
    pub fn write_file(
        &self,
        path: &Path,
        write: impl FnOnce(&mut dyn Write) -> io::Result<()>,
    ) -> Result<()> {
        let mut group = self.group();
        group.file(path, write)?;
        group.commit()
    }

    /// Checks, before any work, that `path` could be written: the same
    /// refusals as a write (an input, a folder, a socket), without writing.
    pub fn check(&self, path: &Path) -> Result<()> {
        self.resolve(path).map(|_| ())
    }

    /// A group of files that appear together or not at all.
    pub fn group(&self) -> Group<'_> {
        Group {
            outputs: self,
            members: Vec::new(),
        }
    }

    /// Writes a folder: `fill` writes its contents into the (temporary)
    /// folder it is given, which is then fsynced and renamed to `path`,
    /// replacing a folder there. Refused when `path` is a file, or is or
    /// holds one of the inputs.
    pub fn write_dir(&self, path: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
        let target = match fs::canonicalize(path) {
            Ok(resolved) => resolved,
            Err(e) if e.kind() == io::ErrorKind::NotFound => path.to_path_buf(),
            Err(e) => return Err(output_error(path, e)),
        };
        let exists = match fs::symlink_metadata(&target) {
            Ok(m) if m.is_dir() => true,
            Ok(_) => return Err(output_error(path, "exists and is not a folder")),
            Err(_) => false,
        };
        if exists {
            for (_, _, input) in &self.inputs {
                if fs::canonicalize(input).is_ok_and(|i| i.starts_with(&target)) {
                    return Err(output_error(
                        path,
                        format!(
                            "holds the input {}; refusing to replace it",
                            input.display()
                        ),
                    ));
                }
            }
        }
        let tmp = sibling(&target, "tmp");
        let result = (|| {
            fs::create_dir(&tmp).map_err(|e| output_error(path, e))?;
            fill(&tmp)?;
            sync_tree(&tmp).map_err(|e| output_error(path, e))?;
            let backup = sibling(&target, "old");
            if exists {
                fs::rename(&target, &backup).map_err(|e| output_error(path, e))?;
            }
            if let Err(e) = fs::rename(&tmp, &target) {
                if exists {
                    fs::rename(&backup, &target).ok();
                }
                return Err(output_error(path, e));
            }
            if exists {
                fs::remove_dir_all(&backup).ok();
            }
            sync_parent(&target);
            Ok(())
        })();
        if result.is_err() {
            fs::remove_dir_all(&tmp).ok();
        }
        result
    }

    /// Where `path` leads, or why it cannot be written.
    fn resolve(&self, path: &Path) -> Result<Target> {
        let meta = match fs::metadata(path) {
            Ok(meta) => meta,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                // A dangling link is written where it points; a new path is created.
                let resolved = match fs::read_link(path) {
                    Ok(to) => path.parent().unwrap_or(Path::new("")).join(to),
                    Err(_) => path.to_path_buf(),
                };
                return Ok(Target::Regular {
                    path: resolved,
                    exists: false,
                });
            }
            Err(e) => return Err(output_error(path, e)),
        };
        if let Some((_, _, input)) = self
            .inputs
            .iter()
            .find(|(dev, ino, _)| (*dev, *ino) == (meta.dev(), meta.ino()))
        {
            return Err(output_error(
                path,
                format!("is the input {}; refusing to overwrite it", input.display()),
            ));
        }
        let kind = meta.file_type();
        let resolved = fs::canonicalize(path).map_err(|e| output_error(path, e))?;
        if kind.is_file() {
            Ok(Target::Regular {
                path: resolved,
                exists: true,
            })
        } else if kind.is_char_device() || kind.is_fifo() {
            Ok(Target::Stream { path: resolved })
        } else {
            let what = if kind.is_dir() {
                "a folder"
            } else if kind.is_block_device() {
                "a block device"
            } else {
                "a socket"
            };
            Err(output_error(
                path,
                format!("is {what}; expected a file, a new path, a character device or a FIFO"),
            ))
        }
    }
}

/// Files that appear together or not at all ([`Outputs::group`]).
pub struct Group<'a> {
    outputs: &'a Outputs,
    members: Vec<Member>,
}

/// One file of a group, ready to commit.
struct Member {
    /// The path as given, for messages.
    given: PathBuf,
    target: Target,
    /// Regular files: the written temporary; streams: the bytes to write.
    content: Content,
}

enum Content {
    Temp(PathBuf),
    Bytes(Vec<u8>),
}

impl Group<'_> {
    /// Adds a file: `write` produces its bytes now (a regular file's go to
    /// its temporary; a stream's are kept for the commit).
    pub fn file(
        &mut self,
        path: &Path,
        write: impl FnOnce(&mut dyn Write) -> io::Result<()>,
    ) -> Result<()> {
        let target = self.outputs.resolve(path)?;
        let content =
            match &target {
                Target::Regular { path: resolved, .. } => {
                    if self.members.iter().any(
                        |m| matches!(&m.target, Target::Regular { path: p, .. } if p == resolved),
                    ) {
                        return Err(output_error(path, "is another output of this command too"));
                    }
                    let tmp = sibling(resolved, "tmp");
                    let written = (|| -> io::Result<()> {
                        let file = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
                        let mut out = BufWriter::with_capacity(1 << 20, file);
                        write(&mut out)?;
                        out.into_inner().map_err(|e| e.into_error())?.sync_all()
                    })();
                    if let Err(e) = written {
                        fs::remove_file(&tmp).ok();
                        return Err(output_error(path, e));
                    }
                    Content::Temp(tmp)
                }
                Target::Stream { .. } => {
                    let mut bytes = Vec::new();
                    write(&mut bytes).map_err(|e| output_error(path, e))?;
                    Content::Bytes(bytes)
                }
            };
        self.members.push(Member {
            given: path.to_path_buf(),
            target,
            content,
        });
        Ok(())
    }

    /// Puts every file of the group in place: the streams' bytes first, then
    /// the renames, undoing the renames done if one fails.
    pub fn commit(mut self) -> Result<()> {
        for m in &self.members {
            if let (Target::Stream { path }, Content::Bytes(bytes)) = (&m.target, &m.content) {
                write_through(path, bytes).map_err(|e| output_error(&m.given, e))?;
            }
        }
        // (target, its previous version moved aside) of each rename done.
        let mut done: Vec<(PathBuf, Option<PathBuf>)> = Vec::new();
        let mut failure = None;
        for m in &self.members {
            let (Target::Regular { path, exists }, Content::Temp(tmp)) = (&m.target, &m.content)
            else {
                continue;
            };
            let backup = exists.then(|| sibling(path, "old"));
            let renamed = (|| {
                if let Some(b) = &backup {
                    fs::rename(path, b)?;
                }
                fs::rename(tmp, path).inspect_err(|_| {
                    if let Some(b) = &backup {
                        fs::rename(b, path).ok();
                    }
                })
            })();
            match renamed {
                Ok(()) => done.push((path.clone(), backup)),
                Err(e) => {
                    failure = Some(output_error(&m.given, e));
                    break;
                }
            }
        }
        if let Some(e) = failure {
            for (path, backup) in done.into_iter().rev() {
                match backup {
                    Some(b) => fs::rename(b, &path).ok(),
                    None => fs::remove_file(&path).ok(),
                };
            }
            return Err(e); // Drop removes the temporaries not renamed.
        }
        for (path, backup) in done {
            if let Some(b) = backup {
                fs::remove_file(b).ok();
            }
            sync_parent(&path);
        }
        self.members.clear();
        Ok(())
    }
}

impl Drop for Group<'_> {
    /// A group dropped before its commit (or after a failed one) leaves no
    /// temporary behind.
    fn drop(&mut self) {
        for m in &self.members {
            if let Content::Temp(tmp) = &m.content {
                fs::remove_file(tmp).ok();
            }
        }
    }
}

/// Writes `bytes` to an existing character device or FIFO, in place.
fn write_through(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut file = OpenOptions::new().write(true).open(path)?;
    file.write_all(bytes)?;
    file.flush()
}

/// fsyncs every file and folder under `dir`, and `dir`.
fn sync_tree(dir: &Path) -> io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            sync_tree(&entry.path())?;
        } else {
            File::open(entry.path())?.sync_all()?;
        }
    }
    File::open(dir)?.sync_all()
}

/// fsyncs the folder holding `path`, so the rename survives a crash (best
/// effort: some file systems refuse to sync a folder).
fn sync_parent(path: &Path) {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        if let Ok(dir) = File::open(parent) {
            dir.sync_all().ok();
        }
    }
}
