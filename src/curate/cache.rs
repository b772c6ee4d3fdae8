//! An on-disk embedding cache around any [`Embedder`]: a second run over the
//! same texts with the same model embeds nothing again.
//!
//! One file per embedder fingerprint in the cache folder,
//! `<sha256(fingerprint)[..16]>.emb`: the magic `PLATEMB1`, the dim and the
//! fingerprint's length (u32 little-endian), the fingerprint, then one
//! record per text: the SHA-256 of the text (32 bytes) and its embedding
//! (dim f32 little-endian). New records are added by rewriting the file
//! through [`crate::output`] (a reader sees the old file or the new one).

use std::collections::hash_map::{Entry, HashMap};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::Embedder;
use crate::output::Outputs;
use crate::progress::Progress;
use crate::{Error, Result};

const MAGIC: &[u8; 8] = b"PLATEMB1";

/// SHA-256 of a text.
type Key = [u8; 32];

fn key(text: &str) -> Key {
    Sha256::digest(text.as_bytes()).into()
}

/// An [`Embedder`] that looks texts up in a cache folder first and embeds
/// only the missing ones with the inner embedder (each distinct text once).
pub struct CachedEmbedder<'a> {
    inner: &'a dyn Embedder,
    file: PathBuf,
}

impl<'a> CachedEmbedder<'a> {
    /// `inner` with its cache file in the folder `dir` (created when needed).
    pub fn new(inner: &'a dyn Embedder, dir: &Path) -> CachedEmbedder<'a> {
        let digest = Sha256::digest(inner.fingerprint().as_bytes());
        let name: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
        CachedEmbedder {
            inner,
            file: dir.join(format!("{name}.emb")),
        }
    }

    /// The cache file of this embedder.
    pub fn file(&self) -> &Path {
        &self.file
    }

    /// The records of the cache file (none when it does not exist yet).
    fn load(&self) -> Result<Vec<(Key, Vec<f32>)>> {
        let bytes = match std::fs::read(&self.file) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(self.corrupt(format!("cannot read: {e}"))),
        };
        let fingerprint = self.inner.fingerprint();
        let dim = self.inner.dim();
        let head = self.header(&fingerprint);
        if !bytes.starts_with(&head) {
            return Err(self.corrupt(format!(
                "is not the cache of {fingerprint:?} (dim {dim}); remove it or use another cache folder"
            )));
        }
        let record = 32 + 4 * dim;
        let body = &bytes[head.len()..];
        if body.len() % record != 0 {
            return Err(self.corrupt(format!(
                "ends in a partial record ({} bytes of {record}-byte records); remove it",
                body.len()
            )));
        }
        Ok(body
            .chunks_exact(record)
            .map(|r| {
                let (k, v) = r.split_at(32);
                let values = v
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect();
                (k.try_into().expect("a 32-byte key"), values)
            })
            .collect())
    }

    fn header(&self, fingerprint: &str) -> Vec<u8> {
        let mut head = MAGIC.to_vec();
        head.extend((self.inner.dim() as u32).to_le_bytes());
        head.extend((fingerprint.len() as u32).to_le_bytes());
        head.extend(fingerprint.as_bytes());
        head
    }

    fn corrupt(&self, what: String) -> Error {
        Error::File {
            path: self.file.clone(),
            what: format!("embedding cache {what}"),
        }
    }
}

impl Embedder for CachedEmbedder<'_> {
    fn fingerprint(&self) -> String {
        self.inner.fingerprint()
    }

    fn dim(&self) -> usize {
        self.inner.dim()
    }

    fn embed(&self, texts: &[&str], progress: &Progress) -> Result<Vec<f32>> {
        let dim = self.dim();
        if dim == 0 {
            return Err(Error::Invalid {
                op: "curate::cache",
                arg: "embedder",
                what: "has dim 0".into(),
            });
        }
        let mut records = self.load()?;
        let mut known: HashMap<Key, usize> = records
            .iter()
            .enumerate()
            .map(|(n, (k, _))| (*k, n))
            .collect();
        let keys: Vec<Key> = texts.iter().map(|t| key(t)).collect();
        // Each distinct missing text once, at the record index it will get.
        let mut missing: Vec<(&str, Key)> = Vec::new();
        for (text, k) in texts.iter().zip(&keys) {
            if let Entry::Vacant(slot) = known.entry(*k) {
                slot.insert(records.len() + missing.len());
                missing.push((text, *k));
            }
        }
        progress.inc((texts.len() - missing.len()) as u64);
        if !missing.is_empty() {
            let batch: Vec<&str> = missing.iter().map(|(t, _)| *t).collect();
            let fresh = self.inner.embed(&batch, progress)?;
            if fresh.len() != batch.len() * dim {
                return Err(Error::Invalid {
                    op: "curate::cache",
                    arg: "embedder",
                    what: format!(
                        "returned {} values for {} texts of dim {dim}",
                        fresh.len(),
                        batch.len()
                    ),
                });
            }
            records.extend(
                missing
                    .iter()
                    .zip(fresh.chunks_exact(dim))
                    .map(|((_, k), row)| (*k, row.to_vec())),
            );
            self.save(&records)?;
        }
        Ok(keys
            .iter()
            .flat_map(|k| records[known[k]].1.iter().copied())
            .collect())
    }
}

impl CachedEmbedder<'_> {
    fn save(&self, records: &[(Key, Vec<f32>)]) -> Result<()> {
        if let Some(dir) = self.file.parent() {
            std::fs::create_dir_all(dir).map_err(|e| Error::Output {
                path: dir.to_path_buf(),
                what: e.to_string(),
            })?;
        }
        let head = self.header(&self.inner.fingerprint());
        Outputs::new(&[]).write_file(&self.file, |out| {
            out.write_all(&head)?;
            for (k, row) in records {
                out.write_all(k)?;
                for v in row {
                    out.write_all(&v.to_le_bytes())?;
                }
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;

    /// Embeds a text as (its length, 1), counting the texts it is given.
    struct Counting(Cell<usize>);

    impl Embedder for Counting {
        fn fingerprint(&self) -> String {
            "counting".into()
        }
        fn dim(&self) -> usize {
            2
        }
        fn embed(&self, texts: &[&str], _: &Progress) -> Result<Vec<f32>> {
            self.0.set(self.0.get() + texts.len());
            Ok(texts.iter().flat_map(|t| [t.len() as f32, 1.0]).collect())
        }
    }

    #[test]
    fn a_second_run_embeds_nothing() {
        let dir = std::env::temp_dir().join(format!("platypus-cache-{}", std::process::id()));
        std::fs::remove_dir_all(&dir).ok();
        let inner = Counting(Cell::new(0));
        let progress = Progress::bar(0, "texts", true);
        let cached = CachedEmbedder::new(&inner, &dir);
        let first = cached.embed(&["a", "bb", "a"], &progress).unwrap();
        assert_eq!(first, [1.0, 1.0, 2.0, 1.0, 1.0, 1.0]);
        assert_eq!(inner.0.get(), 2, "each distinct text once");
        let again = CachedEmbedder::new(&inner, &dir);
        assert_eq!(
            again.embed(&["bb", "a"], &progress).unwrap(),
            [2.0, 1.0, 1.0, 1.0]
        );
        assert_eq!(inner.0.get(), 2, "the second run embeds no text");
        assert_eq!(
            again.embed(&["ccc", "a"], &progress).unwrap()[..2],
            [3.0, 1.0]
        );
        assert_eq!(inner.0.get(), 3, "only the missing text is embedded");
        std::fs::write(again.file(), b"PLATEMB1junk").unwrap();
        let err = again.embed(&["a"], &progress).unwrap_err();
        assert!(
            err.to_string().contains("is not the cache of \"counting\""),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).ok();
    }
}
