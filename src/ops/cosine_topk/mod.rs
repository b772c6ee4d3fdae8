//! Cosine-similarity search for deduplication and benchmark decontamination:
//! for each query embedding the k most similar database rows, or every pair
//! above a threshold, and the same within one set (self-similarity).
//!
//! - queries [m, d] and database [n, d] in f32, f16 or bf16; scores are fp32
//!   cosines, indices u32 rows of the database.
//! - Rows are sorted by descending score, ties broken by the lower database
//!   index. A zero vector has similarity 0 with everything (never NaN); NaN
//!   or infinite input is an error naming the row. k > n gives n results.
//! - Self-similarity ([`topk_self`], [`above_threshold_self`]) excludes
//!   j = i, or keeps only j < i ([`Exclude::NotEarlier`]: the greedy
//!   near-dedup compares row i with earlier rows only). Slots without a
//!   candidate hold index [`NO_INDEX`] and score -inf, at the end of a row.
//!
//! Two implementations, chosen by the inputs' device; neither ever holds the
//! m × n score matrix:
//! - [`Device::Cpu`] (`host.rs`): normalised f32 rows, a blocked multi-threaded
//!   f32 GEMM with a per-query selection buffer. What the curation CLI runs
//!   without a GPU.
//! - [`Device::Cuda`] / [`Device::Emulated`] (`kernel.rs`, kernels/cosine.cu):
//!   tensor-core similarity tiles reduced straight into per-query top-k lists;
//!   results stay on the device. f32 inputs are split into two bf16 halves so
//!   the scores keep about 16 significant bits. [`topk_streamed`] streams a
//!   host database through the device in chunks.
//!
//! CPU reference: [`crate::cpu::cosine_topk`].

mod host;
mod kernel;

use super::{check_float, check_nonempty};
pub use crate::cpu::cosine_topk::{Exclude, NO_INDEX};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::tensor::Tensor;
pub use kernel::kernel_launch_shapes;

/// Top-k results: scores [m, kk] fp32 and indices [m, kk] u32 on the
/// queries' device, kk = min(k, n).
#[derive(Debug)]
pub struct TopK {
    /// Cosine similarities, descending along each row.
    pub scores: Tensor,
    /// Database rows, [`NO_INDEX`] for empty slots.
    pub indices: Tensor,
}

/// One pair at or above the threshold.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pair {
    /// Query row.
    pub query: u32,
    /// Database row.
    pub item: u32,
    /// Cosine similarity.
    pub score: f32,
}

/// Largest min(k, n) the kernels take; the CPU path has no limit.
pub const MAX_K: usize = 1024;

/// The k most similar database rows of every query.
pub fn topk(queries: &Tensor, database: &Tensor, k: usize) -> Result<TopK> {
    const OP: &str = "cosine_topk::topk";
    check_pair(OP, queries, database)?;
    check_k(OP, k)?;
    match queries.device() {
        Device::Cpu => host::topk(OP, queries, Some(database), k, Exclude::Nothing),
        _ => kernel::topk(OP, queries, database, k, Exclude::Nothing),
    }
}

/// The k most similar other rows of every row of `x` (`exclude` is
/// [`Exclude::SameIndex`] or [`Exclude::NotEarlier`]).
pub fn topk_self(x: &Tensor, k: usize, exclude: Exclude) -> Result<TopK> {
    const OP: &str = "cosine_topk::topk_self";
    check_set(OP, "x", x)?;
    check_k(OP, k)?;
    match x.device() {
        Device::Cpu => host::topk(OP, x, None, k, exclude),
        _ => kernel::topk(OP, x, x, k, exclude),
    }
}

/// [`topk`] of device-resident `queries` against a `database` in host memory
/// ([`Device::Cpu`]) that may not fit on the device: copied over in chunks of
/// `chunk_rows` rows, each chunk's copy overlapping the previous chunk's
/// search, partial lists merged. The result is identical to [`topk`] on the
/// whole database. With CPU queries this is [`topk`].
pub fn topk_streamed(
    queries: &Tensor,
    database: &Tensor,
    k: usize,
    chunk_rows: usize,
) -> Result<TopK> {
    const OP: &str = "cosine_topk::topk_streamed";
    let (_, dim) = check_set(OP, "queries", queries)?;
    let (_, db_dim) = check_set(OP, "database", database)?;
    check_same_dim(OP, dim, db_dim, database)?;
    check_k(OP, k)?;
    if !matches!(database.device(), Device::Cpu) {
        return Err(Error::Device {
            op: OP,
            arg: "database",
            expected: "cpu (the host copy to stream from)".into(),
            got: database.device().to_string(),
        });
    }
    if chunk_rows == 0 {
        return Err(Error::Invalid {
            op: OP,
            arg: "chunk_rows",
            what: "is 0; a chunk needs at least one row".into(),
        });
    }
    match queries.device() {
        Device::Cpu => host::topk(OP, queries, Some(database), k, Exclude::Nothing),
        _ => kernel::topk_streamed(OP, queries, database, k, chunk_rows),
    }
}

/// Every (query, database row) pair with cosine >= `threshold`, sorted by
/// (query, item). More than `max_pairs` pairs is an error (never a silent
/// truncation).
pub fn above_threshold(
    queries: &Tensor,
    database: &Tensor,
    threshold: f32,
    max_pairs: usize,
) -> Result<Vec<Pair>> {
    const OP: &str = "cosine_topk::above_threshold";
    check_pair(OP, queries, database)?;
    check_threshold(OP, threshold)?;
    match queries.device() {
        Device::Cpu => host::above_threshold(
            OP,
            queries,
            Some(database),
            threshold,
            max_pairs,
            Exclude::Nothing,
        ),
        _ => kernel::above_threshold(
            OP,
            queries,
            database,
            threshold,
            max_pairs,
            Exclude::Nothing,
        ),
    }
}

/// [`above_threshold`] within one set, excluding j = i or keeping only j < i.
pub fn above_threshold_self(
    x: &Tensor,
    threshold: f32,
    max_pairs: usize,
    exclude: Exclude,
) -> Result<Vec<Pair>> {
    const OP: &str = "cosine_topk::above_threshold_self";
    check_set(OP, "x", x)?;
    check_threshold(OP, threshold)?;
    match x.device() {
        Device::Cpu => host::above_threshold(OP, x, None, threshold, max_pairs, exclude),
        _ => kernel::above_threshold(OP, x, x, threshold, max_pairs, exclude),
    }
}

/// Checks that `t` is a non-empty [rows, dim] float tensor; returns (rows, dim).
fn check_set(op: &'static str, arg: &'static str, t: &Tensor) -> Result<(usize, usize)> {
    check_float(op, arg, t)?;
    check_nonempty(op, arg, t)?;
    match *t.shape() {
        [rows, dim] => Ok((rows, dim)),
        _ => Err(Error::Shape {
            op,
            arg,
            expected: "[rows, dim]".into(),
            got: t.shape().to_vec(),
        }),
    }
}

/// Checks queries and database: both sets, one device, one dim.
fn check_pair(op: &'static str, queries: &Tensor, database: &Tensor) -> Result<()> {
    let (_, dim) = check_set(op, "queries", queries)?;
    let (_, db_dim) = check_set(op, "database", database)?;
    super::check_device(op, "database", database, queries.device())?;
    check_same_dim(op, dim, db_dim, database)
}

fn check_same_dim(op: &'static str, dim: usize, db_dim: usize, database: &Tensor) -> Result<()> {
    if dim == db_dim {
        Ok(())
    } else {
        Err(Error::Shape {
            op,
            arg: "database",
            expected: format!("[n, {dim}] (the queries' dim)"),
            got: database.shape().to_vec(),
        })
    }
}

fn check_k(op: &'static str, k: usize) -> Result<()> {
    if k > 0 {
        Ok(())
    } else {
        Err(Error::Invalid {
            op,
            arg: "k",
            what: "is 0; ask for at least one result".into(),
        })
    }
}

fn check_threshold(op: &'static str, threshold: f32) -> Result<()> {
    if threshold.is_finite() {
        Ok(())
    } else {
        Err(Error::Invalid {
            op,
            arg: "threshold",
            what: format!("{threshold} is not finite"),
        })
    }
}
