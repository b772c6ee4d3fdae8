//! safetensors files, read memory-mapped and written through [`Outputs`].
//!
//! - [`SafetensorsFile`]: one file, mapped and validated (the header parses,
//!   every tensor's bytes lie inside the file and fill it exactly); a tensor
//!   is loaded in its stored dtype (f32, f16, bf16, i32, i64), never widened.
//! - [`Checkpoint`]: a model folder's weights, `model.safetensors` or the
//!   shards a `model.safetensors.index.json` names (as transformers saves
//!   them), with one lookup by tensor name.
//! - [`write`]: a file from named tensors, streamed (no whole-file copy in
//!   memory), into a [`Group`] so that it appears whole or not at all.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{self, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use crate::output::Group;
use crate::{DType, Device, Error, Result, Tensor};

/// The index file of a sharded checkpoint.
pub const INDEX_NAME: &str = "model.safetensors.index.json";
/// The weights file of an unsharded checkpoint.
pub const SINGLE_NAME: &str = "model.safetensors";

fn file_error(path: &Path, what: impl std::fmt::Display) -> Error {
    Error::File {
        path: path.to_path_buf(),
        what: what.to_string(),
    }
}

/// Name, dtype and shape of one stored tensor, and where its bytes are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// Stored element type.
    pub dtype: DType,
    /// Shape (row-major).
    pub shape: Vec<usize>,
    /// Byte range in the file.
    range: Range<usize>,
}

impl TensorInfo {
    /// Number of elements.
    pub fn elem_count(&self) -> usize {
        self.shape.iter().product()
    }
}

/// One memory-mapped, validated safetensors file.
pub struct SafetensorsFile {
    path: PathBuf,
    map: Mmap,
    tensors: BTreeMap<String, TensorInfo>,
    metadata: HashMap<String, String>,
}

impl std::fmt::Debug for SafetensorsFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "SafetensorsFile({}, {} tensors)",
            self.path.display(),
            self.tensors.len()
        )
    }
}

fn stored_dtype(dtype: safetensors::Dtype) -> Option<DType> {
    use safetensors::Dtype as S;
    Some(match dtype {
        S::F32 => DType::F32,
        S::F16 => DType::F16,
        S::BF16 => DType::BF16,
        S::I32 => DType::I32,
        S::I64 => DType::I64,
        _ => return None,
    })
}

fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "F32",
        DType::F16 => "F16",
        DType::BF16 => "BF16",
        DType::I32 => "I32",
        DType::U32 => "U32",
        DType::I64 => "I64",
    }
}

impl SafetensorsFile {
    /// Maps and validates the file at `path`. A truncated or corrupt file, or a
    /// tensor of a dtype this crate has no type for, is an [`Error::File`].
    pub fn open(path: &Path) -> Result<SafetensorsFile> {
        let file = File::open(path).map_err(|e| file_error(path, format!("cannot open: {e}")))?;
        // SAFETY: the mapping is read-only; a file changed under it while mapped
        // is the same hazard as for any reader of checkpoints (documented in
        // README: don't rewrite a model folder while a command reads it).
        let map = unsafe { Mmap::map(&file) }
            .map_err(|e| file_error(path, format!("cannot map: {e}")))?;
        let (header_len, meta) = safetensors::SafeTensors::read_metadata(&map).map_err(|e| {
            file_error(
                path,
                format!("not a valid safetensors file ({} bytes): {e}", map.len()),
            )
        })?;
        let data_start = 8 + header_len;
        let mut tensors = BTreeMap::new();
        for (name, info) in meta.tensors() {
            let dtype = stored_dtype(info.dtype).ok_or_else(|| {
                file_error(
                    path,
                    format!(
                        "tensor `{name}` has dtype {:?}; this crate reads F32, F16, BF16, I32, I64",
                        info.dtype
                    ),
                )
            })?;
            let (start, end) = info.data_offsets;
            tensors.insert(
                name,
                TensorInfo {
                    dtype,
                    shape: info.shape.clone(),
                    range: data_start + start..data_start + end,
                },
            );
        }
        Ok(SafetensorsFile {
            path: path.to_path_buf(),
            map,
            tensors,
            metadata: meta.metadata().clone().unwrap_or_default(),
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every tensor, by name (sorted).
    pub fn tensors(&self) -> &BTreeMap<String, TensorInfo> {
        &self.tensors
    }

    /// The `__metadata__` strings of the header.
    pub fn metadata(&self) -> &HashMap<String, String> {
        &self.metadata
    }

    /// The tensor `name`'s info, or an [`Error::File`] naming the missing key.
    pub fn info(&self, name: &str) -> Result<&TensorInfo> {
        self.tensors
            .get(name)
            .ok_or_else(|| file_error(&self.path, format!("has no tensor `{name}`")))
    }

    /// The stored bytes of tensor `name` (little-endian, row-major).
    pub fn bytes(&self, name: &str) -> Result<&[u8]> {
        let info = self.info(name)?;
        Ok(&self.map[info.range.clone()])
    }

    /// Tensor `name` on `device`, in its stored dtype. The mapped pages it
    /// was copied from are then released, so that loading a model holds its
    /// weights once (not once copied and once mapped).
    pub fn load(&self, name: &str, device: &Device) -> Result<Tensor> {
        let info = self.info(name)?;
        let t = Tensor::from_bytes(
            &self.map[info.range.clone()],
            &info.shape,
            info.dtype,
            device,
        )?;
        const PAGE: usize = 4096;
        let (start, end) = (
            info.range.start.div_ceil(PAGE) * PAGE,
            info.range.end / PAGE * PAGE,
        );
        if end > start {
            // SAFETY: a read-only shared file mapping: dropped pages are read
            // back from the file on the next access, contents unchanged.
            // Best effort: a refusal only keeps the pages resident.
            unsafe {
                let _ = self.map.unchecked_advise_range(
                    memmap2::UncheckedAdvice::DontNeed,
                    start,
                    end - start,
                );
            }
        }
        Ok(t)
    }

    /// Tensor `name` as f32 values (exact for f16/bf16), for the few small
    /// tensors read on the host (LoRA factors, fixtures); refused for integers.
    pub fn load_f32(&self, name: &str) -> Result<Vec<f32>> {
        self.load(name, &Device::Cpu)?.to_f32_vec()
    }
}

/// A model folder's weights: one file or the shards of an index.
#[derive(Debug)]
pub struct Checkpoint {
    dir: PathBuf,
    shards: Vec<SafetensorsFile>,
    /// Tensor name → index into `shards`.
    owner: BTreeMap<String, usize>,
}

impl Checkpoint {
    /// Opens the weights in `dir`: `model.safetensors.index.json` if present
    /// (every shard it names must exist and hold the tensors it lists), else
    /// `model.safetensors`.
    pub fn open(dir: &Path) -> Result<Checkpoint> {
        let index = dir.join(INDEX_NAME);
        let shard_names = if index.exists() {
            read_index(&index)?
        } else {
            let single = dir.join(SINGLE_NAME);
            if !single.exists() {
                return Err(file_error(
                    dir,
                    format!("has neither {SINGLE_NAME} nor {INDEX_NAME}"),
                ));
            }
            BTreeMap::new()
        };
        let mut shards = Vec::new();
        let mut owner = BTreeMap::new();
        if shard_names.is_empty() {
            let file = SafetensorsFile::open(&dir.join(SINGLE_NAME))?;
            owner.extend(file.tensors.keys().map(|k| (k.clone(), 0)));
            shards.push(file);
        } else {
            let mut files: Vec<&String> = shard_names.values().collect();
            files.sort();
            files.dedup();
            for name in files {
                let path = dir.join(name);
                if !path.exists() {
                    return Err(file_error(
                        &index,
                        format!("names shard `{name}`, which is not in {}", dir.display()),
                    ));
                }
                shards.push(SafetensorsFile::open(&path)?);
            }
            for (tensor, file) in &shard_names {
                let i = shards
                    .iter()
                    .position(|s| s.path.file_name().is_some_and(|n| n == file.as_str()))
                    .expect("every named shard was opened");
                if !shards[i].tensors.contains_key(tensor) {
                    return Err(file_error(
                        &index,
                        format!("says `{tensor}` is in `{file}`, which does not hold it"),
                    ));
                }
                owner.insert(tensor.clone(), i);
            }
        }
        Ok(Checkpoint {
            dir: dir.to_path_buf(),
            shards,
            owner,
        })
    }

    /// The folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The files, in the order of their names.
    pub fn shards(&self) -> &[SafetensorsFile] {
        &self.shards
    }

    /// True when the weights came from an index of shards.
    pub fn is_sharded(&self) -> bool {
        self.dir.join(INDEX_NAME).exists()
    }

    /// Every tensor name.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.owner.keys().map(String::as_str)
    }

    /// The file holding tensor `name`, or an [`Error::File`] naming the key.
    pub fn file_of(&self, name: &str) -> Result<&SafetensorsFile> {
        let i = self.owner.get(name).ok_or_else(|| {
            file_error(&self.dir, format!("the checkpoint has no tensor `{name}`"))
        })?;
        Ok(&self.shards[*i])
    }

    /// Tensor `name`'s info.
    pub fn info(&self, name: &str) -> Result<&TensorInfo> {
        self.file_of(name)?.info(name)
    }

    /// Tensor `name` on `device` in its stored dtype.
    pub fn load(&self, name: &str, device: &Device) -> Result<Tensor> {
        self.file_of(name)?.load(name, device)
    }
}

/// The `weight_map` of an index: tensor name → shard file name.
fn read_index(path: &Path) -> Result<BTreeMap<String, String>> {
    let text =
        std::fs::read_to_string(path).map_err(|e| file_error(path, format!("cannot read: {e}")))?;
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| file_error(path, format!("is not JSON: {e}")))?;
    let map = value
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| file_error(path, "has no `weight_map` object"))?;
    let mut out = BTreeMap::new();
    for (tensor, file) in map {
        let file = file.as_str().ok_or_else(|| {
            file_error(
                path,
                format!("weight_map[`{tensor}`] is {file}, expected a file name"),
            )
        })?;
        if file.contains('/') || file.contains("..") {
            return Err(file_error(
                path,
                format!("weight_map[`{tensor}`] = `{file}` is not a file in the folder"),
            ));
        }
        out.insert(tensor.clone(), file.to_string());
    }
    if out.is_empty() {
        return Err(file_error(path, "its `weight_map` is empty"));
    }
    Ok(out)
}

/// One tensor to write: name, dtype, shape and its little-endian bytes.
#[derive(Debug, Clone, Copy)]
pub struct TensorBytes<'a> {
    /// Key in the file.
    pub name: &'a str,
    /// Element type.
    pub dtype: DType,
    /// Shape.
    pub shape: &'a [usize],
    /// `shape.product() * dtype.size()` bytes.
    pub bytes: &'a [u8],
}

impl<'a> TensorBytes<'a> {
    /// An f32 tensor's bytes.
    pub fn f32(name: &'a str, shape: &'a [usize], values: &'a [f32]) -> TensorBytes<'a> {
        TensorBytes {
            name,
            dtype: DType::F32,
            shape,
            bytes: bytemuck::cast_slice(values),
        }
    }
}

/// Adds the safetensors file `path` holding `tensors` (in the given order)
/// and `metadata` to `group`. The header is padded with spaces to 8 bytes,
/// as the safetensors library writes it.
pub fn write(
    group: &mut Group<'_>,
    path: &Path,
    tensors: &[TensorBytes<'_>],
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        header.insert(
            "__metadata__".into(),
            serde_json::to_value(metadata).expect("strings"),
        );
    }
    let mut offset = 0usize;
    for t in tensors {
        let want = t.shape.iter().product::<usize>() * t.dtype.size();
        if t.bytes.len() != want {
            return Err(Error::Invalid {
                op: "safetensors::write",
                arg: "tensors",
                what: format!(
                    "`{}` has {} bytes, shape {:?} of {} needs {want}",
                    t.name,
                    t.bytes.len(),
                    t.shape,
                    t.dtype
                ),
            });
        }
        header.insert(
            t.name.to_string(),
            serde_json::json!({
                "dtype": dtype_name(t.dtype),
                "shape": t.shape,
                "data_offsets": [offset, offset + want],
            }),
        );
        offset += want;
    }
    let mut text = serde_json::to_string(&header).expect("JSON of strings and numbers");
    while text.len() % 8 != 0 {
        text.push(' ');
    }
    group.file(path, |out: &mut dyn Write| -> io::Result<()> {
        out.write_all(&(text.len() as u64).to_le_bytes())?;
        out.write_all(text.as_bytes())?;
        for t in tensors {
            out.write_all(t.bytes)?;
        }
        Ok(())
    })
}
