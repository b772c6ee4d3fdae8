//! The kernel path ([`Device::Cuda`], [`Device::Emulated`]): launches of
//! kernels/cosine.cu. Every search is three steps: prepare both sets (inverse
//! norms, the 16-bit GEMM operand, a NaN/overflow check), search (top-k lists
//! per database split, or pairs above the threshold), merge the splits.

use super::{Exclude, Pair, TopK, MAX_K};
use crate::device::{DType, Device};
use crate::error::{Error, Result};
use crate::kernels::params::{CosineMergeParams, CosinePrepareParams, CosineSearchParams};
use crate::launch::LaunchConfig;
use crate::ops::to_i32;
use crate::tensor::Tensor;

/// Queries per search block (kernels/cosine.cu: kBM).
const BLOCK_QUERIES: usize = 128;
/// Database rows per similarity tile (kBN); splits are whole tiles.
const TILE_ROWS: usize = 64;
/// Threads of a search block (4 warps).
const SEARCH_THREADS: u32 = 128;
/// Dynamic shared memory of the search kernels: the 3-stage pipeline of
/// 128 query rows and 64 database rows, 32-deep K tiles of 2-byte elements.
const PIPELINE_SMEM: u32 = 3 * (128 + 64) * 32 * 2;
/// The top-k kernel adds 32 candidates (8 bytes) per query and a count and
/// floor (12 bytes) per query.
const TOPK_SMEM: u32 = PIPELINE_SMEM + 128 * 32 * 8 + 128 * 12;
/// Blocks a search aims for: two per SM of a 108-SM A100. Fixed rather than
/// read from the device, so a search splits the same way everywhere (the
/// results do not depend on it either way).
const TARGET_BLOCKS: usize = 216;
/// Fewest database tiles a split gets: each split costs its lists'
/// initialisation, final merges and a share of cosine_merge, worth it only
/// over several tiles.
const MIN_TILES_PER_SPLIT: usize = 4;
/// Most bytes of per-split top-k lists; fewer splits beyond it.
const SPLIT_LIST_BYTES: usize = 1 << 28;
/// Pair slots of a threshold search's first pass; a second pass gets exactly
/// as many as the first one counted.
const FIRST_PASS_PAIRS: usize = 1 << 16;
/// Rows of a set prepared per block (one warp each).
const PREPARE_ROWS_PER_BLOCK: usize = 8;

/// Every cosine kernel with its launch shape: (name, threads per block,
/// dynamic shared memory bytes), for occupancy reports.
pub fn kernel_launch_shapes() -> Vec<(String, u32, u32)> {
    let prepare = ["f32", "bf16", "f16"].map(|t| {
        (
            format!("cosine_prepare_{t}"),
            32 * PREPARE_ROWS_PER_BLOCK as u32,
            0,
        )
    });
    let search = ["bf16", "f16"].into_iter().flat_map(|t| {
        [
            (format!("cosine_topk_{t}"), SEARCH_THREADS, TOPK_SMEM),
            (
                format!("cosine_threshold_{t}"),
                SEARCH_THREADS,
                PIPELINE_SMEM,
            ),
        ]
    });
    prepare
        .into_iter()
        .chain(search)
        .chain([("cosine_merge".to_string(), 128, 0)])
        .collect()
}

/// One set ready for the similarity GEMM.
struct Prepared {
    /// [rows, ld] in the operand dtype: the rows, or for f32 their bf16 halves.
    operand: Tensor,
    /// [rows] fp32 inverse norms (0 for a zero row).
    inv_norm: Tensor,
}

/// The GEMM operand of a set of `dtype`: its dtype, and the K per input column.
fn operand_of(dtype: DType) -> (DType, usize) {
    match dtype {
        DType::F32 => (DType::BF16, 3),
        other => (other, 1),
    }
}

/// Row stride (and GEMM K) of the operand of `dim`-wide rows of `dtype`:
/// K rounded up to 8 elements (16 bytes, what cp.async moves).
fn operand_ld(dtype: DType, dim: usize) -> usize {
    (operand_of(dtype).1 * dim).div_ceil(8) * 8
}

/// Launches cosine_prepare on `rows` rows of `x` (at address `x_addr`,
/// `dim` columns of `dtype`) into `out`, flagging bad rows (+ `row_base`)
/// in `bad_row`.
#[allow(clippy::too_many_arguments)]
fn launch_prepare(
    op: &'static str,
    arg: &'static str,
    device: &Device,
    (x_addr, dtype, rows, dim): (u64, DType, usize, usize),
    database: bool,
    out: &Prepared,
    bad_row: &Tensor,
    row_base: usize,
) -> Result<()> {
    let mut p = CosinePrepareParams {
        x: x_addr as *const _,
        out: out.operand.device_address() as *mut _,
        inv_norm: out.inv_norm.device_address() as *mut f32,
        bad_row: bad_row.device_address() as *mut i32,
        rows: to_i32(op, arg, rows)?,
        dim: to_i32(op, arg, dim)?,
        ld: to_i32(op, arg, operand_ld(dtype, dim))?,
        database: database as i32,
        row_base: to_i32(op, arg, row_base)?,
        vectorized: i32::from(x_addr % 16 == 0 && (dim * dtype.size()) % 16 == 0),
    };
    let blocks = rows.div_ceil(PREPARE_ROWS_PER_BLOCK);
    let cfg = LaunchConfig::linear(
        u32::try_from(blocks).map_err(|_| too_many(op, arg, rows))?,
        32 * PREPARE_ROWS_PER_BLOCK as u32,
        0,
    );
    device.launch(
        &format!("cosine_prepare_{}", dtype.kernel_suffix()),
        cfg,
        &mut p,
    )
}

fn too_many(op: &'static str, arg: &'static str, rows: usize) -> Error {
    Error::Invalid {
        op,
        arg,
        what: format!("{rows} rows are more than one launch covers"),
    }
}

/// Zeroed operand and norm buffers for `rows` rows of `dim` columns of `dtype`.
fn alloc_prepared(device: &Device, dtype: DType, rows: usize, dim: usize) -> Result<Prepared> {
    Ok(Prepared {
        operand: Tensor::zeros(&[rows, operand_ld(dtype, dim)], operand_of(dtype).0, device)?,
        inv_norm: Tensor::zeros(&[rows], DType::F32, device)?,
    })
}

/// A fresh bad-row flag: i32::MAX, lowered by cosine_prepare.
fn bad_row_flag(device: &Device) -> Result<Tensor> {
    Tensor::from_slice(&[i32::MAX], &[1], device)
}

/// Reads a bad-row flag back: an error naming the row if one was flagged.
fn check_bad_row(op: &'static str, arg: &'static str, flag: &Tensor) -> Result<()> {
    match flag.to_vec::<i32>()?[0] {
        i32::MAX => Ok(()),
        row => Err(Error::Invalid {
            op,
            arg,
            what: format!("row {row} has a NaN or infinite element, or a squared norm beyond fp32"),
        }),
    }
}

/// Prepares a whole set on its device and checks it.
fn prepare(op: &'static str, arg: &'static str, x: &Tensor, database: bool) -> Result<Prepared> {
    let (rows, dim) = (x.shape()[0], x.shape()[1]);
    let device = x.device();
    let out = alloc_prepared(device, x.dtype(), rows, dim)?;
    let flag = bad_row_flag(device)?;
    launch_prepare(
        op,
        arg,
        device,
        (x.device_address(), x.dtype(), rows, dim),
        database,
        &out,
        &flag,
        0,
    )?;
    check_bad_row(op, arg, &flag)?;
    Ok(out)
}

/// Prepares queries and database; the database is `None` when the
/// prepared queries serve as it too (a self-search of 16-bit rows: f32 rows
/// are split differently for the two sides).
fn prepare_pair(
    op: &'static str,
    queries: &Tensor,
    database: &Tensor,
    exclude: Exclude,
) -> Result<(Prepared, Option<Prepared>)> {
    let (q_arg, db_arg) = arg_names(exclude);
    let q = prepare(op, q_arg, queries, false)?;
    let same = queries.device_address() == database.device_address()
        && queries.shape() == database.shape();
    if same && queries.dtype() != DType::F32 {
        return Ok((q, None));
    }
    let db = prepare(op, db_arg, database, true)?;
    Ok((q, Some(db)))
}

/// A search's shape: m queries against n database rows split `splits` ways.
#[derive(Clone, Copy)]
struct Plan {
    m: usize,
    n: usize,
    splits: usize,
    rows_per_split: usize,
}

impl Plan {
    /// Enough database splits to give about TARGET_BLOCKS blocks, within
    /// `list_bytes` bytes of per-split lists per split (0: no limit).
    fn new(m: usize, n: usize, list_bytes: usize) -> Plan {
        let query_blocks = m.div_ceil(BLOCK_QUERIES);
        let tiles = n.div_ceil(TILE_ROWS).max(1);
        let mut splits = TARGET_BLOCKS
            .div_ceil(query_blocks)
            .clamp(1, tiles.div_ceil(MIN_TILES_PER_SPLIT));
        if let Some(fit) = SPLIT_LIST_BYTES.checked_div(list_bytes) {
            splits = splits.min(fit.max(1));
        }
        let rows_per_split = tiles.div_ceil(splits) * TILE_ROWS;
        Plan {
            m,
            n,
            splits: n.max(1).div_ceil(rows_per_split),
            rows_per_split,
        }
    }

    fn launch(&self, op: &'static str, shared_bytes: u32) -> Result<LaunchConfig> {
        Ok(LaunchConfig {
            grid: [
                u32::try_from(self.m.div_ceil(BLOCK_QUERIES))
                    .map_err(|_| too_many(op, "queries", self.m))?,
                self.splits as u32,
                1,
            ],
            block: [SEARCH_THREADS, 1, 1],
            shared_bytes,
        })
    }
}

/// Search parameters of queries `q` against database rows `db` (m x n, the
/// database's rows starting at global index `index_base`); no outputs set.
fn search_params(
    op: &'static str,
    q: &Prepared,
    db: &Prepared,
    plan: &Plan,
    exclude: Exclude,
    index_base: usize,
) -> Result<CosineSearchParams> {
    Ok(CosineSearchParams {
        q: q.operand.device_address() as *const _,
        db: db.operand.device_address() as *const _,
        q_inv: q.inv_norm.device_address() as *const f32,
        db_inv: db.inv_norm.device_address() as *const f32,
        m: to_i32(op, "queries", plan.m)?,
        n: to_i32(op, "database", plan.n)?,
        ld: to_i32(op, "queries", q.operand.shape()[1])?,
        rows_per_split: to_i32(op, "database", plan.rows_per_split)?,
        exclude: match exclude {
            Exclude::Nothing => 0,
            Exclude::SameIndex => 1,
            Exclude::NotEarlier => 2,
        },
        query_base: 0,
        index_base: u32::try_from(index_base).map_err(|_| too_many(op, "database", index_base))?,
        k: 0,
        list_scores: std::ptr::null_mut(),
        list_index: std::ptr::null_mut(),
        threshold: 0.0,
        pad0: 0,
        pair_count: std::ptr::null_mut(),
        capacity: 0,
        pair_query: std::ptr::null_mut(),
        pair_item: std::ptr::null_mut(),
        pair_score: std::ptr::null_mut(),
    })
}

/// Top-k lists of one search: `slots` lists of [m, kk] (scores, indices).
struct Lists {
    scores: Tensor,
    index: Tensor,
    m: usize,
    kk: usize,
}

impl Lists {
    fn new(device: &Device, slots: usize, m: usize, kk: usize) -> Result<Lists> {
        Ok(Lists {
            scores: Tensor::zeros(&[slots, m, kk], DType::F32, device)?,
            index: Tensor::zeros(&[slots, m, kk], DType::U32, device)?,
            m,
            kk,
        })
    }

    /// Addresses of list slot `slot` (scores, indices).
    fn slot(&self, slot: usize) -> (u64, u64) {
        let offset = (slot * self.m * self.kk * 4) as u64;
        (
            self.scores.device_address() + offset,
            self.index.device_address() + offset,
        )
    }

    /// Runs the top-k kernel with its split lists in slots `first..`.
    fn search(
        &self,
        op: &'static str,
        p: &mut CosineSearchParams,
        plan: &Plan,
        first: usize,
        suffix: &str,
    ) -> Result<()> {
        let (scores, index) = self.slot(first);
        p.k = to_i32(op, "k", self.kk)?;
        p.list_scores = scores as *mut f32;
        p.list_index = index as *mut u32;
        self.scores.device().launch(
            &format!("cosine_topk_{suffix}"),
            plan.launch(op, TOPK_SMEM)?,
            p,
        )
    }

    /// Merges slots `0..lists` into `out` slot `out_slot` (which may be slot 0 of self).
    fn merge_into(
        &self,
        op: &'static str,
        lists: usize,
        out: &Lists,
        out_slot: usize,
    ) -> Result<()> {
        let (out_scores, out_index) = out.slot(out_slot);
        let mut p = CosineMergeParams {
            in_scores: self.scores.device_address() as *const f32,
            in_index: self.index.device_address() as *const u32,
            out_scores: out_scores as *mut f32,
            out_index: out_index as *mut u32,
            lists: to_i32(op, "database", lists)?,
            m: to_i32(op, "queries", self.m)?,
            k: to_i32(op, "k", self.kk)?,
            pad0: 0,
        };
        let warps_per_block = 4;
        let blocks = u32::try_from(self.m.div_ceil(warps_per_block))
            .map_err(|_| too_many(op, "queries", self.m))?;
        self.scores.device().launch(
            "cosine_merge",
            LaunchConfig::linear(blocks, 32 * warps_per_block as u32, 0),
            &mut p,
        )
    }

    fn into_topk(self) -> Result<TopK> {
        let shape = [self.m, self.kk];
        Ok(TopK {
            scores: self.scores.reshape(&shape)?,
            indices: self.index.reshape(&shape)?,
        })
    }
}

/// Checks what the kernels add to the shared checks: one dtype for both
/// sets, and at most MAX_K results per query.
fn check_kernel_inputs(
    op: &'static str,
    queries: &Tensor,
    database: &Tensor,
    k: usize,
) -> Result<usize> {
    if database.dtype() != queries.dtype() {
        return Err(Error::DType {
            op,
            arg: "database",
            expected: format!("{} (the queries' dtype)", queries.dtype()),
            got: database.dtype(),
        });
    }
    let kk = k.min(database.shape()[0]);
    if kk > MAX_K {
        return Err(Error::Invalid {
            op,
            arg: "k",
            what: format!("asks for {kk} results per query; the kernels return at most {MAX_K}"),
        });
    }
    Ok(kk)
}

/// Argument names of (queries, database): "x" for both in a self-search.
fn arg_names(exclude: Exclude) -> (&'static str, &'static str) {
    match exclude {
        Exclude::Nothing => ("queries", "database"),
        _ => ("x", "x"),
    }
}

/// [`super::topk`] / [`super::topk_self`] on a kernel device.
pub(super) fn topk(
    op: &'static str,
    queries: &Tensor,
    database: &Tensor,
    k: usize,
    exclude: Exclude,
) -> Result<TopK> {
    let kk = check_kernel_inputs(op, queries, database, k)?;
    let (q, db) = prepare_pair(op, queries, database, exclude)?;
    let db = db.as_ref().unwrap_or(&q);
    let (m, n) = (queries.shape()[0], database.shape()[0]);
    let plan = Plan::new(m, n, m * kk * 8);
    let device = queries.device();
    let mut p = search_params(op, &q, db, &plan, exclude, 0)?;
    let suffix = q.operand.dtype().kernel_suffix();
    let out = Lists::new(device, 1, m, kk)?;
    if plan.splits == 1 {
        out.search(op, &mut p, &plan, 0, suffix)?;
    } else {
        let parts = Lists::new(device, plan.splits, m, kk)?;
        parts.search(op, &mut p, &plan, 0, suffix)?;
        parts.merge_into(op, plan.splits, &out, 0)?;
    }
    out.into_topk()
}

/// [`super::topk_streamed`]: device queries, a host database in chunks.
pub(super) fn topk_streamed(
    op: &'static str,
    queries: &Tensor,
    database: &Tensor,
    k: usize,
    chunk_rows: usize,
) -> Result<TopK> {
    let kk = check_kernel_inputs(op, queries, database, k)?;
    let device = queries.device();
    let (m, dim) = (queries.shape()[0], queries.shape()[1]);
    let n = database.shape()[0];
    let chunk_rows = chunk_rows.min(n);
    let dtype = database.dtype();
    let row_bytes = dim * dtype.size();
    let host = database
        .host_bytes()
        .expect("checked: the database is on the CPU");

    let q = prepare(op, "queries", queries, false)?;
    let chunk_db = alloc_prepared(device, dtype, chunk_rows, dim)?;
    let flag = bad_row_flag(device)?;
    let plan = Plan::new(m, chunk_rows, m * kk * 8);
    let suffix = q.operand.dtype().kernel_suffix();
    // Slot 0: the result so far; slots 1..: this chunk's splits.
    let lists = Lists::new(device, 1 + plan.splits, m, kk)?;
    let mut uploader =
        ChunkUploader::new(device, &[chunk_rows, dim], dtype, chunk_rows * row_bytes)?;
    for (c, start) in (0..n).step_by(chunk_rows).enumerate() {
        let rows = chunk_rows.min(n - start);
        let slot = c % 2;
        let raw = uploader.upload(slot, &host[start * row_bytes..(start + rows) * row_bytes])?;
        launch_prepare(
            op,
            "database",
            device,
            (raw, dtype, rows, dim),
            true,
            &chunk_db,
            &flag,
            start,
        )?;
        let chunk_plan = Plan { n: rows, ..plan };
        let mut p = search_params(op, &q, &chunk_db, &chunk_plan, Exclude::Nothing, start)?;
        let first = if c == 0 { 0 } else { 1 };
        lists.search(op, &mut p, &chunk_plan, first, suffix)?;
        if first + chunk_plan.splits > 1 {
            lists.merge_into(op, first + chunk_plan.splits, &lists, 0)?;
        }
        uploader.release(slot)?;
    }
    check_bad_row(op, "database", &flag)?;
    let out = Lists::new(device, 1, m, kk)?;
    lists.merge_into(op, 1, &out, 0)?;
    out.into_topk()
}

/// [`super::above_threshold`] / [`super::above_threshold_self`] on a kernel
/// device: a first pass with [`FIRST_PASS_PAIRS`] slots, a second with room
/// for every pair if the first one overflowed.
pub(super) fn above_threshold(
    op: &'static str,
    queries: &Tensor,
    database: &Tensor,
    threshold: f32,
    max_pairs: usize,
    exclude: Exclude,
) -> Result<Vec<Pair>> {
    check_kernel_inputs(op, queries, database, 1)?;
    let (q, db) = prepare_pair(op, queries, database, exclude)?;
    let db = db.as_ref().unwrap_or(&q);
    let device = queries.device();
    let plan = Plan::new(queries.shape()[0], database.shape()[0], 0);
    let suffix = q.operand.dtype().kernel_suffix();
    let mut capacity = max_pairs.min(FIRST_PASS_PAIRS);
    loop {
        let count = Tensor::zeros(&[1], DType::I64, device)?;
        let slots = capacity.max(1);
        let query = Tensor::zeros(&[slots], DType::U32, device)?;
        let item = Tensor::zeros(&[slots], DType::U32, device)?;
        let score = Tensor::zeros(&[slots], DType::F32, device)?;
        let mut p = search_params(op, &q, db, &plan, exclude, 0)?;
        p.threshold = threshold;
        p.pair_count = count.device_address() as *mut u64;
        p.capacity = capacity as u64;
        p.pair_query = query.device_address() as *mut u32;
        p.pair_item = item.device_address() as *mut u32;
        p.pair_score = score.device_address() as *mut f32;
        device.launch(
            &format!("cosine_threshold_{suffix}"),
            plan.launch(op, PIPELINE_SMEM)?,
            &mut p,
        )?;
        let found = count.to_vec::<i64>()?[0] as usize;
        if found > max_pairs {
            return Err(Error::Invalid {
                op,
                arg: "max_pairs",
                what: format!(
                    "{found} pairs score >= {threshold}, more than the {max_pairs} allowed"
                ),
            });
        }
        if found > capacity {
            capacity = found; // second pass: room for every pair
            continue;
        }
        let (query, item, score) = (
            query.to_vec::<u32>()?,
            item.to_vec::<u32>()?,
            score.to_vec::<f32>()?,
        );
        let mut pairs: Vec<Pair> = (0..found)
            .map(|i| Pair {
                query: query[i],
                item: item[i],
                score: score[i],
            })
            .collect();
        pairs.sort_unstable_by_key(|p| (p.query, p.item));
        return Ok(pairs);
    }
}

/// Copies chunks of a host database to the device into two buffers in turn.
/// On CUDA the copies run on a second stream from pinned staging memory, so
/// chunk c + 1 crosses the bus while chunk c is searched; on the emulator
/// they are plain copies.
enum ChunkUploader {
    Host([Tensor; 2]),
    Cuda(crate::cuda::ChunkUploader),
}

impl ChunkUploader {
    fn new(device: &Device, shape: &[usize], dtype: DType, bytes: usize) -> Result<ChunkUploader> {
        Ok(match device {
            Device::Cuda(backend) => {
                ChunkUploader::Cuda(crate::cuda::ChunkUploader::new(backend, bytes)?)
            }
            _ => ChunkUploader::Host([
                Tensor::zeros(shape, dtype, device)?,
                Tensor::zeros(shape, dtype, device)?,
            ]),
        })
    }

    /// Queues the copy of `bytes` into buffer `slot`; returns its device
    /// address. Work queued on the device's stream afterwards sees the data.
    fn upload(&mut self, slot: usize, bytes: &[u8]) -> Result<u64> {
        match self {
            ChunkUploader::Host(buffers) => {
                let dst = buffers[slot]
                    .host_bytes_mut()
                    .expect("emulator tensors live in host memory");
                dst[..bytes.len()].copy_from_slice(bytes);
                Ok(buffers[slot].device_address())
            }
            ChunkUploader::Cuda(u) => u.upload(slot, bytes),
        }
    }

    /// Marks the work using buffer `slot` as queued: its next upload waits for it.
    fn release(&mut self, slot: usize) -> Result<()> {
        match self {
            ChunkUploader::Host(_) => Ok(()),
            ChunkUploader::Cuda(u) => u.release(slot),
        }
    }
}
