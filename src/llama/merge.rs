//! Merging LoRA adapters into a base model, as Platypus' `merge.py` did:
//! W' = W + Σₖ wₖ · sₖ · Bₖ Aₖ for every targeted weight, accumulated in fp32
//! and rounded once to the weight's stored dtype.
//!
//! - The base may be another model than the adapters were trained on, as long
//!   as the shapes agree (how the merged Platypus models were made).
//! - Several adapters combine exactly: every weight gets Σₖ wₖ ΔWₖ. PEFT's
//!   `add_weighted_adapter(combination_type="linear")` sums the factors
//!   instead, A' = Σₖ √(wₖ) Aₖ and B' = Σₖ √(wₖ) Bₖ, so B'A' carries the
//!   cross terms √(wₖwₗ) Bₖ Aₗ and equals the weighted sum of deltas only
//!   for a single adapter.
//! - Shard by shard: peak memory is one shard's merged tensors plus the
//!   adapters; the output is sharded like the input, with the base's index.
//! - The output folder is filled under a temporary name and renamed; an
//!   existing one is refused.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use super::adapter::{Adapter, Module};
use super::LlamaConfig;
use crate::formats::safetensors::{self as st, Checkpoint, SafetensorsFile, TensorBytes};
use crate::host::gemm::{matmul_nn, Weights};
use crate::output::Outputs;
use crate::{Error, Result, Tensor};

/// Rows of each merged weight checked against an f64 recomputation.
const CHECKED_ROWS: usize = 64;

/// What a merge did.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct MergeReport {
    /// Weights that received a delta.
    pub tensors_merged: usize,
    /// Tensors written (merged or copied).
    pub tensors_written: usize,
    /// Weight files written.
    pub shards: usize,
    /// Largest |merged − (base + Σ delta)| over the rows checked (f64 truth,
    /// after the rounding to the stored dtype).
    pub max_abs_diff: f64,
    /// Elements checked.
    pub elements_checked: usize,
}

/// Merges `adapters` (each with its weight) into the model in `base`,
/// writing the merged model folder `out`.
pub fn merge(base: &Path, adapters: &[(Adapter, f32)], out: &Path) -> Result<MergeReport> {
    let config = LlamaConfig::from_file(&base.join("config.json"))?;
    let checkpoint = Checkpoint::open(base)?;
    if out.exists() {
        return Err(Error::Output {
            path: out.to_path_buf(),
            what: "exists already; merge writes a new folder".into(),
        });
    }
    // (layer, module) → [(adapter index, weight)]
    let mut deltas: BTreeMap<(usize, Module), Vec<usize>> = BTreeMap::new();
    for (k, (adapter, _)) in adapters.iter().enumerate() {
        for &key in adapter.factors.keys() {
            deltas.entry(key).or_default().push(k);
        }
    }
    for &(layer, module) in deltas.keys() {
        let key = module.weight_key(layer);
        let info = checkpoint.info(&key)?;
        let want = module.shape(&config);
        if info.shape != want {
            return Err(Error::File {
                path: checkpoint.file_of(&key)?.path().to_path_buf(),
                what: format!(
                    "`{key}` has shape {:?}, the adapters expect {want:?}",
                    info.shape
                ),
            });
        }
    }
    let inputs: Vec<&Path> = vec![base];
    let outputs = Outputs::new(&inputs);
    let mut report = MergeReport {
        tensors_merged: 0,
        tensors_written: 0,
        shards: 0,
        max_abs_diff: 0.0,
        elements_checked: 0,
    };
    outputs.write_dir(out, |tmp| {
        copy_side_files(base, tmp)?;
        for shard in checkpoint.shards() {
            merge_shard(shard, adapters, &deltas, tmp, &mut report)?;
        }
        Ok(())
    })?;
    Ok(report)
}

/// Copies every regular file of `base` that is not a weight file (config,
/// generation config, tokenizer files, the shard index) into `dir`.
fn copy_side_files(base: &Path, dir: &Path) -> Result<()> {
    let entries = fs::read_dir(base).map_err(|e| Error::File {
        path: base.to_path_buf(),
        what: format!("cannot list: {e}"),
    })?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::File {
            path: base.to_path_buf(),
            what: format!("cannot list: {e}"),
        })?;
        let path = entry.path();
        let is_weights = path.extension().is_some_and(|e| e == "safetensors");
        if path.is_file() && !is_weights {
            let to = dir.join(entry.file_name());
            fs::copy(&path, &to).map_err(|e| Error::Output {
                path: to.clone(),
                what: format!("cannot copy {}: {e}", path.display()),
            })?;
        }
    }
    Ok(())
}

/// Writes one shard of the merged model into `dir`, then checks it.
fn merge_shard(
    shard: &SafetensorsFile,
    adapters: &[(Adapter, f32)],
    deltas: &BTreeMap<(usize, Module), Vec<usize>>,
    dir: &Path,
    report: &mut MergeReport,
) -> Result<()> {
    let mut merged: BTreeMap<&str, Vec<u8>> = BTreeMap::new();
    for (name, info) in shard.tensors() {
        let Some(key) = Module::parse_weight_key(name) else {
            continue;
        };
        let Some(users) = deltas.get(&key) else {
            continue;
        };
        let [out, inp] = [info.shape[0], info.shape[1]];
        let mut w = shard.load_f32(name)?;
        for &k in users {
            let (adapter, weight) = &adapters[k];
            let f = &adapter.factors[&key];
            let r = adapter.config.r;
            let s = weight * adapter.config.scale();
            matmul_nn(&f.b, Weights::F32(&f.a), out, r, inp, s, 1.0, &mut w);
        }
        let rounded = Tensor::from_f32(&w, &info.shape, info.dtype, &crate::Device::Cpu)?;
        merged.insert(name, rounded.to_bytes()?);
        report.tensors_merged += 1;
    }
    let tensors: Vec<TensorBytes<'_>> = shard
        .tensors()
        .iter()
        .map(|(name, info)| {
            let bytes = match merged.get(name.as_str()) {
                Some(b) => b.as_slice(),
                None => shard.bytes(name)?,
            };
            Ok(TensorBytes {
                name,
                dtype: info.dtype,
                shape: &info.shape,
                bytes,
            })
        })
        .collect::<Result<_>>()?;
    let file_name = shard.path().file_name().expect("a shard is a file");
    let target = dir.join(file_name);
    let inner = Outputs::default();
    let mut group = inner.group();
    let meta: BTreeMap<String, String> = shard
        .metadata()
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    st::write(&mut group, &target, &tensors, &meta)?;
    group.commit()?;
    report.tensors_written += tensors.len();
    report.shards += 1;
    drop(merged);
    check_shard(
        shard,
        &SafetensorsFile::open(&target)?,
        adapters,
        deltas,
        report,
    )
}

/// Compares rows of every merged weight with base + Σ delta in f64.
fn check_shard(
    base: &SafetensorsFile,
    written: &SafetensorsFile,
    adapters: &[(Adapter, f32)],
    deltas: &BTreeMap<(usize, Module), Vec<usize>>,
    report: &mut MergeReport,
) -> Result<()> {
    for (name, info) in base.tensors() {
        let users = Module::parse_weight_key(name).and_then(|key| Some((key, deltas.get(&key)?)));
        let Some((key, users)) = users else {
            if base.bytes(name)? != written.bytes(name)? {
                return Err(Error::Output {
                    path: written.path().to_path_buf(),
                    what: format!("`{name}` was not copied exactly"),
                });
            }
            continue;
        };
        let [out, inp] = [info.shape[0], info.shape[1]];
        let (w0, w1) = (base.load_f32(name)?, written.load_f32(name)?);
        let step = out.div_ceil(CHECKED_ROWS).max(1);
        for row in (0..out).step_by(step) {
            let mut want: Vec<f64> = w0[row * inp..][..inp].iter().map(|&v| v as f64).collect();
            for &k in users {
                let (adapter, weight) = &adapters[k];
                let f = &adapter.factors[&key];
                let (r, s) = (adapter.config.r, (*weight * adapter.config.scale()) as f64);
                for (i, wv) in want.iter_mut().enumerate() {
                    let d: f64 = (0..r)
                        .map(|j| f.b[row * r + j] as f64 * f.a[j * inp + i] as f64)
                        .sum();
                    *wv += s * d;
                }
            }
            for (got, want) in w1[row * inp..][..inp].iter().zip(&want) {
                report.max_abs_diff = report.max_abs_diff.max((*got as f64 - want).abs());
            }
            report.elements_checked += inp;
        }
    }
    Ok(())
}
