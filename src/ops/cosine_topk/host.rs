//! The CPU fast path. Every score is the dot product of a unit query with a
//! database row as given, times that row's inverse norm; a micro-kernel
//! computes them MR rows × NR queries at a time (AVX2/FMA where the CPU has
//! it) and hands on only the scores that beat their query's current k-th
//! best (or reach the threshold). Tasks of (query range, database chunk) run
//! on rayon threads; the m × n score matrix never exists, and the database is
//! neither copied nor packed.

use std::borrow::Cow;
use std::ops::Range;

use rayon::prelude::*;

use super::{Exclude, Pair, TopK, NO_INDEX};
use crate::device::{DType, Device};
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// Database rows per micro-tile: the kernel's broadcast side.
const MR: usize = 6;
/// Queries per packed panel: the kernel's vector side (two 8-lane registers).
const NR: usize = 16;
/// Bytes of database rows a task scores against all its query panels before
/// it moves on, so that they stay in L2 while the panels pass through L1
/// (120 to 480 rows at d 384 measured alike; a whole 12k-row chunk ~25% slower).
const DB_BLOCK_BYTES: usize = 384 << 10;
/// f32 per cache line.
const LINE: usize = 16;
/// Fewest query panels per task (128 queries) before the database is split
/// instead.
const MIN_RANGE_PANELS: usize = 8;
/// Most query panels per task (1024 queries).
const MAX_RANGE_PANELS: usize = 64;
/// Tasks aimed at per thread, so that work stealing evens out uneven tasks.
const TASKS_PER_THREAD: usize = 4;
/// Fewest database rows per task.
const MIN_CHUNK_ROWS: usize = 2048;
/// Database rows are used as given while every nonzero norm lies within
/// [1 / SAFE_NORM, SAFE_NORM]: their f32 dot products with unit queries then
/// neither overflow nor lose bits to subnormals.
const SAFE_NORM: f64 = (1u128 << 100) as f64;

/// One checked set: its rows as f32 (borrowed from an f32 tensor, converted
/// otherwise) and each row's inverse norm (0 for a zero row).
struct Rows<'a> {
    rows: usize,
    dim: usize,
    data: Cow<'a, [f32]>,
    inv_norm: Vec<f64>,
}

impl<'a> Rows<'a> {
    /// Reads one checked [rows, dim] CPU tensor; NaN or infinity is an error
    /// naming the first bad row.
    fn read(op: &'static str, arg: &'static str, t: &'a Tensor) -> Result<Rows<'a>> {
        let [rows, dim] = *t.shape() else {
            unreachable!("checked by cosine_topk::check_set")
        };
        let data = match t.dtype() {
            DType::F32 => Cow::Borrowed(bytemuck::cast_slice(
                t.host_bytes().expect("the CPU path gets CPU tensors"),
            )),
            _ => Cow::Owned(t.to_f32_vec()?),
        };
        let mut inv_norm = vec![0.0; rows];
        // The first bad row in row order, found in parallel.
        let bad = inv_norm
            .par_iter_mut()
            .zip(data.par_chunks_exact(dim))
            .enumerate()
            .filter_map(|(r, (inv, row))| {
                let norm2 = sum_of_squares(row);
                if !norm2.is_finite() {
                    let c = row.iter().position(|v| !v.is_finite()).unwrap();
                    return Some((r, c, row[c]));
                }
                if norm2 > 0.0 {
                    *inv = 1.0 / norm2.sqrt();
                }
                None
            })
            .min_by_key(|&(r, _, _)| r);
        if let Some((r, c, v)) = bad {
            return Err(Error::Invalid {
                op,
                arg,
                what: format!("row {r} has {v} at column {c}"),
            });
        }
        Ok(Rows {
            rows,
            dim,
            data,
            inv_norm,
        })
    }

    /// Row `r`.
    fn row(&self, r: usize) -> &[f32] {
        &self.data[r * self.dim..(r + 1) * self.dim]
    }
}

/// Σ v² of a row in f64 (infinite or NaN if the row is); eight partial sums
/// so that it vectorises.
fn sum_of_squares(row: &[f32]) -> f64 {
    let mut acc = [0.0f64; 8];
    let mut chunks = row.chunks_exact(8);
    for chunk in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(chunk) {
            *a += v as f64 * v as f64;
        }
    }
    let tail: f64 = chunks
        .remainder()
        .iter()
        .map(|&v| v as f64 * v as f64)
        .sum();
    acc.iter().sum::<f64>() + tail
}

/// The queries as unit rows (normalised in f64, zero rows stay zero) packed
/// in panels of NR: panel p is [dim][NR] with query p·NR + c's k-th value at
/// k·NR + c, zeros past the last query.
struct Panels {
    rows: usize,
    dim: usize,
    data: Vec<f32>,
}

impl Panels {
    /// Normalises and packs a checked set.
    fn pack(q: &Rows) -> Panels {
        let dim = q.dim;
        let mut data = vec![0.0f32; q.rows.div_ceil(NR) * dim * NR];
        data.par_chunks_exact_mut(dim * NR)
            .enumerate()
            .for_each(|(p, panel)| {
                for (c, i) in (p * NR..q.rows.min((p + 1) * NR)).enumerate() {
                    let inv = q.inv_norm[i];
                    for (k, &v) in q.row(i).iter().enumerate() {
                        panel[k * NR + c] = (v as f64 * inv) as f32;
                    }
                }
            });
        Panels {
            rows: q.rows,
            dim,
            data,
        }
    }

    /// Panel `p`, [dim][NR].
    fn panel(&self, p: usize) -> &[f32] {
        &self.data[p * self.dim * NR..(p + 1) * self.dim * NR]
    }
}

/// The database side: rows and, per row, the factor that turns a unit
/// query's dot product with the row into their cosine.
struct Database<'a> {
    rows: usize,
    dim: usize,
    data: Cow<'a, [f32]>,
    scale: Vec<f32>,
}

impl<'a> Database<'a> {
    /// The rows as given with their inverse norms as factors; if some norm
    /// is outside the safe range, a normalised copy with factors 1.
    fn new(set: Rows<'a>) -> Database<'a> {
        let Rows {
            rows,
            dim,
            mut data,
            inv_norm,
        } = set;
        let safe = |&inv: &f64| inv == 0.0 || (1.0 / SAFE_NORM..=SAFE_NORM).contains(&inv);
        let scale = if inv_norm.par_iter().all(safe) {
            inv_norm.iter().map(|&inv| inv as f32).collect()
        } else {
            data.to_mut()
                .par_chunks_exact_mut(dim)
                .zip(&inv_norm)
                .for_each(|(row, &inv)| row.iter_mut().for_each(|v| *v = (*v as f64 * inv) as f32));
            vec![1.0; rows]
        };
        Database {
            rows,
            dim,
            data,
            scale,
        }
    }
}

/// Normalised, packed queries and the database (`None`: self-similarity of
/// `queries`).
fn prepare<'a>(
    op: &'static str,
    queries: &'a Tensor,
    database: Option<&'a Tensor>,
) -> Result<(Panels, Database<'a>)> {
    let arg = if database.is_some() { "queries" } else { "x" };
    let q = Rows::read(op, arg, queries)?;
    let panels = Panels::pack(&q);
    let db = match database {
        Some(d) => Rows::read(op, "database", d)?,
        None => q,
    };
    Ok((panels, Database::new(db)))
}

/// The CPU top-k of checked inputs (`database` None: self-similarity).
pub(super) fn topk(
    op: &'static str,
    queries: &Tensor,
    database: Option<&Tensor>,
    k: usize,
    exclude: Exclude,
) -> Result<TopK> {
    let (q, db) = prepare(op, queries, database)?;
    run_topk(&q, &db, k, exclude)
}

/// The CPU threshold search of checked inputs (`database` None: self-similarity).
pub(super) fn above_threshold(
    op: &'static str,
    queries: &Tensor,
    database: Option<&Tensor>,
    threshold: f32,
    max_pairs: usize,
    exclude: Exclude,
) -> Result<Vec<Pair>> {
    let (q, db) = prepare(op, queries, database)?;
    run_threshold(op, &q, &db, threshold, max_pairs, exclude)
}

/// How micro-tiles are scored: AVX2/FMA where the CPU has both, portable
/// code elsewhere.
#[derive(Clone, Copy)]
enum Kernel {
    Portable,
    #[cfg(target_arch = "x86_64")]
    Avx2Fma,
}

impl Kernel {
    /// The best kernel this CPU runs.
    fn detect() -> Kernel {
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            return Kernel::Avx2Fma;
        }
        Kernel::Portable
    }

    /// Scores `scale.len()` (1..=MR) consecutive database rows `rows`
    /// against a query panel into `out` (row r, query c at r·NR + c) and
    /// returns the mask of those that beat their query's floor (bit r·NR + c:
    /// score > floors[c]). Each score is summed over k in order, so it does
    /// not depend on where its row or query sits in the tile.
    fn tile(
        self,
        panel: &[f32],
        rows: &[f32],
        scale: &[f32],
        floors: &[f32; NR],
        out: &mut [f32; MR * NR],
    ) -> u128 {
        assert!((1..=MR).contains(&scale.len()) && rows.len() * NR == scale.len() * panel.len());
        match self {
            Kernel::Portable => tile_portable(panel, rows, scale, floors, out),
            // SAFETY: Avx2Fma comes only from detect(), after both features
            // were found; the lengths were checked above.
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2Fma => unsafe { tile_avx2_fma(panel, rows, scale, floors, out) },
        }
    }
}

/// [`Kernel::tile`] in plain Rust.
fn tile_portable(
    panel: &[f32],
    rows: &[f32],
    scale: &[f32],
    floors: &[f32; NR],
    out: &mut [f32; MR * NR],
) -> u128 {
    let dim = panel.len() / NR;
    let mut mask = 0u128;
    for (r, (row, &scale)) in rows.chunks_exact(dim).zip(scale).enumerate() {
        let mut acc = [0.0f32; NR];
        for (&a, b) in row.iter().zip(panel.chunks_exact(NR)) {
            for (acc, &b) in acc.iter_mut().zip(b) {
                *acc += a * b;
            }
        }
        for (c, &acc) in acc.iter().enumerate() {
            // + 0.0 turns an underflowed -0.0 into +0.0: ties sort alike.
            let s = acc * scale + 0.0;
            out[r * NR + c] = s;
            if s > floors[c] {
                mask |= 1 << (r * NR + c);
            }
        }
    }
    mask
}

/// [`Kernel::tile`] with AVX2 and FMA: 2·MR accumulators of 8 queries, one
/// broadcast database value and two panel loads per k.
///
/// # Safety
/// The CPU must have AVX2 and FMA; `panel` is [dim][NR], `rows` holds
/// `scale.len()` (1..=MR) rows of dim.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn tile_avx2_fma(
    panel: &[f32],
    rows: &[f32],
    scale: &[f32],
    floors: &[f32; NR],
    out: &mut [f32; MR * NR],
) -> u128 {
    use std::arch::x86_64::*;
    let dim = panel.len() / NR;
    let valid = scale.len();
    // Rows past `valid` repeat the last one (in bounds; masked out below).
    let row: [*const f32; MR] = std::array::from_fn(|r| rows.as_ptr().add(r.min(valid - 1) * dim));
    let b = panel.as_ptr();
    let mut acc = [_mm256_setzero_ps(); 2 * MR];
    for k in 0..dim {
        let b0 = _mm256_loadu_ps(b.add(k * NR));
        let b1 = _mm256_loadu_ps(b.add(k * NR + 8));
        for r in 0..MR {
            let a = _mm256_broadcast_ss(&*row[r].add(k));
            acc[2 * r] = _mm256_fmadd_ps(a, b0, acc[2 * r]);
            acc[2 * r + 1] = _mm256_fmadd_ps(a, b1, acc[2 * r + 1]);
        }
    }
    let f0 = _mm256_loadu_ps(floors.as_ptr());
    let f1 = _mm256_loadu_ps(floors.as_ptr().add(8));
    let zero = _mm256_setzero_ps();
    let o = out.as_mut_ptr();
    let mut mask = 0u128;
    for r in 0..MR {
        let s = _mm256_set1_ps(scale[r.min(valid - 1)]);
        // + 0.0 turns an underflowed -0.0 into +0.0: ties sort alike.
        let s0 = _mm256_add_ps(_mm256_mul_ps(acc[2 * r], s), zero);
        let s1 = _mm256_add_ps(_mm256_mul_ps(acc[2 * r + 1], s), zero);
        _mm256_storeu_ps(o.add(r * NR), s0);
        _mm256_storeu_ps(o.add(r * NR + 8), s1);
        let m0 = _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_GT_OQ>(s0, f0)) as u128;
        let m1 = _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_GT_OQ>(s1, f1)) as u128;
        if r < valid {
            mask |= (m0 | m1 << 8) << (r * NR);
        }
    }
    mask
}

/// Scores the queries of `panels` against database rows `rows` and calls
/// `visit(query, row, score)` for every pair `exclude` allows whose score
/// beats `floors[query - first query of panels]`; `visit` returns that
/// query's new floor. Per query, rows come in increasing order. `floors`
/// holds NR per panel (+inf past the last query).
fn scan(
    q: &Panels,
    db: &Database,
    panels: Range<usize>,
    rows: Range<usize>,
    exclude: Exclude,
    floors: &mut [f32],
    mut visit: impl FnMut(usize, usize, f32) -> f32,
) {
    let kernel = Kernel::detect();
    let dim = db.dim;
    let block = (DB_BLOCK_BYTES / (4 * dim)).max(MR) / MR * MR;
    let mut out = [0.0f32; MR * NR];
    for b0 in rows.clone().step_by(block) {
        let b1 = rows.end.min(b0 + block);
        // The next block is fetched a few lines per tile meanwhile (1000 ×
        // 100k, d 384, 2 threads: 0.400 s → 0.376 s best of 16).
        let next = &db.data[b1 * dim..rows.end.min(b1 + block) * dim];
        let lines_per_tile = next
            .len()
            .div_ceil(LINE * panels.len() * block.div_ceil(MR));
        let mut fetched = 0;
        for (p, floors) in panels.clone().zip(floors.chunks_exact_mut(NR)) {
            let floors: &mut [f32; NR] = floors.try_into().unwrap();
            let first = p * NR;
            let last = q.rows.min(first + NR) - 1;
            let end = b1.min(row_bound(exclude, last, db.rows));
            let panel = q.panel(p);
            for j in (b0..end).step_by(MR) {
                prefetch(next, &mut fetched, lines_per_tile);
                let valid = MR.min(end - j);
                let tile = &db.data[j * dim..(j + valid) * dim];
                let mut mask = kernel.tile(panel, tile, &db.scale[j..j + valid], floors, &mut out);
                while mask != 0 {
                    let bit = mask.trailing_zeros() as usize;
                    mask &= mask - 1;
                    let (i, row, s) = (first + bit % NR, j + bit / NR, out[bit]);
                    // The floor may have risen since the kernel compared.
                    if s > floors[bit % NR] && exclude.allows(i, row) {
                        floors[bit % NR] = visit(i, row, s);
                    }
                }
            }
        }
    }
}

/// Asks the cache for the next `lines` cache lines of `data` from element
/// `*fetched` on, and advances `*fetched` past them (a hint, never past the end).
fn prefetch(data: &[f32], fetched: &mut usize, lines: usize) {
    let end = data.len().min(*fetched + lines * LINE);
    while *fetched < end {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the address is inside `data` (and a prefetch never faults).
        unsafe {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
            _mm_prefetch::<_MM_HINT_T0>(data.as_ptr().add(*fetched).cast());
        }
        *fetched += LINE;
    }
}

/// End of the database rows query `i` may be compared with.
fn row_bound(exclude: Exclude, i: usize, n: usize) -> usize {
    match exclude {
        Exclude::Nothing | Exclude::SameIndex => n,
        Exclude::NotEarlier => i.min(n),
    }
}

/// How a search is cut into tasks: ranges of query panels × chunks of
/// database rows, about TASKS_PER_THREAD per thread. Queries are split
/// first: every database chunk costs each query a selection of its own
/// (k 1000 on 1000 × 100k: 8 chunks 1.0 s, 8 query ranges 0.56 s).
struct Plan {
    panel_ranges: Vec<Range<usize>>,
    row_chunks: Vec<Range<usize>>,
}

impl Plan {
    /// The tasks of a search of `m` queries against `n` rows on the current
    /// rayon pool.
    fn new(m: usize, n: usize) -> Plan {
        let panels = m.div_ceil(NR);
        let want = TASKS_PER_THREAD * rayon::current_num_threads();
        let per_range = panels
            .div_ceil(want)
            .clamp(MIN_RANGE_PANELS, MAX_RANGE_PANELS);
        let ranges = panels.div_ceil(per_range);
        let chunks = want.div_ceil(ranges).min(n.div_ceil(MIN_CHUNK_ROWS)).max(1);
        let per_chunk = n.div_ceil(chunks);
        let split = |len: usize, step: usize| {
            (0..len)
                .step_by(step)
                .map(|s| s..len.min(s + step))
                .collect()
        };
        Plan {
            panel_ranges: split(panels, per_range),
            row_chunks: split(n, per_chunk),
        }
    }
}

/// Floors of the queries of `panels`: `floor` for each query, +inf past the last.
fn initial_floors(panels: &Range<usize>, m: usize, floor: f32) -> Vec<f32> {
    (panels.start * NR..panels.end * NR)
        .map(|i| if i < m { floor } else { f32::INFINITY })
        .collect()
}

/// The best `k` of a query: a buffer of candidates better than the current
/// k-th best, cut back to the best k whenever it reaches 2k.
struct Selection {
    k: usize,
    items: Vec<(f32, u32)>,
    /// Score of the current k-th best (candidates must beat it), once k are held.
    floor: f32,
}

impl Selection {
    /// An empty selection of the best `k`.
    fn new(k: usize) -> Selection {
        Selection {
            k,
            items: Vec::with_capacity(2 * k),
            floor: f32::NEG_INFINITY,
        }
    }

    /// Offers database row `j`; rows come in increasing order, so an equal
    /// score never displaces an earlier row.
    fn offer(&mut self, score: f32, j: u32) {
        if self.items.len() >= self.k && score <= self.floor {
            return;
        }
        self.items.push((score, j));
        if self.items.len() >= 2 * self.k {
            self.cut();
        }
    }

    /// Keeps the best k, sorted by descending score, then index.
    fn cut(&mut self) {
        let better = |a: &(f32, u32), b: &(f32, u32)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
        if self.items.len() > self.k {
            self.items.select_nth_unstable_by(self.k - 1, better);
            self.items.truncate(self.k);
        }
        self.items.sort_unstable_by(better);
        if self.items.len() == self.k {
            self.floor = self.items[self.k - 1].0;
        }
    }
}

/// The selections of the same queries over two sets of database rows,
/// combined into those over both.
fn merge(mut a: Vec<Selection>, b: Vec<Selection>) -> Vec<Selection> {
    for (a, b) in a.iter_mut().zip(b) {
        a.items.extend(b.items);
        a.cut();
    }
    a
}

/// The `k` best rows of every query (fewer where `exclude` leaves fewer).
fn run_topk(q: &Panels, db: &Database, k: usize, exclude: Exclude) -> Result<TopK> {
    let kk = k.min(db.rows);
    let plan = Plan::new(q.rows, db.rows);
    let per_range: Vec<Vec<Selection>> = plan
        .panel_ranges
        .par_iter()
        .map(|panels| {
            let first = panels.start * NR;
            let count = q.rows.min(panels.end * NR) - first;
            plan.row_chunks
                .par_iter()
                .map(|rows| {
                    let mut sel: Vec<Selection> = (0..count).map(|_| Selection::new(kk)).collect();
                    let mut floors = initial_floors(panels, q.rows, f32::NEG_INFINITY);
                    scan(
                        q,
                        db,
                        panels.clone(),
                        rows.clone(),
                        exclude,
                        &mut floors,
                        |i, j, s| {
                            let sel = &mut sel[i - first];
                            sel.offer(s, j as u32);
                            sel.floor
                        },
                    );
                    sel
                })
                .reduce_with(merge)
                .expect("a search has database rows")
        })
        .collect();
    let mut scores = vec![f32::NEG_INFINITY; q.rows * kk];
    let mut indices = vec![NO_INDEX; q.rows * kk];
    let sels = per_range.into_iter().flatten();
    for ((mut sel, s_out), i_out) in sels
        .zip(scores.chunks_exact_mut(kk))
        .zip(indices.chunks_exact_mut(kk))
    {
        sel.cut();
        for (slot, &(s, j)) in sel.items.iter().enumerate() {
            s_out[slot] = s;
            i_out[slot] = j;
        }
    }
    Ok(TopK {
        scores: Tensor::from_slice(&scores, &[q.rows, kk], &Device::Cpu)?,
        indices: Tensor::from_slice(&indices, &[q.rows, kk], &Device::Cpu)?,
    })
}

/// The largest f32 below finite `t`: for every f32 s, s > below(t) is s >= t.
fn below(t: f32) -> f32 {
    if t == 0.0 {
        -f32::from_bits(1)
    } else if t > 0.0 {
        f32::from_bits(t.to_bits() - 1)
    } else {
        f32::from_bits(t.to_bits() + 1)
    }
}

/// Every allowed pair scoring >= `threshold`, sorted by (query, row); an
/// error if there are more than `max_pairs`.
fn run_threshold(
    op: &'static str,
    q: &Panels,
    db: &Database,
    threshold: f32,
    max_pairs: usize,
    exclude: Exclude,
) -> Result<Vec<Pair>> {
    let plan = Plan::new(q.rows, db.rows);
    let floor = below(threshold);
    let tasks: Vec<(&Range<usize>, &Range<usize>)> = plan
        .panel_ranges
        .iter()
        .flat_map(|p| plan.row_chunks.iter().map(move |r| (p, r)))
        .collect();
    let found: Vec<Vec<Pair>> = tasks
        .into_par_iter()
        .map(|(panels, rows)| {
            let mut pairs = Vec::new();
            let mut floors = initial_floors(panels, q.rows, floor);
            scan(
                q,
                db,
                panels.clone(),
                rows.clone(),
                exclude,
                &mut floors,
                |i, j, s| {
                    pairs.push(Pair {
                        query: i as u32,
                        item: j as u32,
                        score: s,
                    });
                    floor
                },
            );
            pairs
        })
        .collect();
    let total: usize = found.iter().map(Vec::len).sum();
    if total > max_pairs {
        return Err(Error::Invalid {
            op,
            arg: "max_pairs",
            what: format!("{total} pairs score >= {threshold}, more than the {max_pairs} allowed"),
        });
    }
    let mut pairs = found.concat();
    pairs.par_sort_unstable_by_key(|p| (p.query, p.item));
    Ok(pairs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::cosine_topk as reference;

    /// `n` pseudo-random values in [-1, 1).
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect()
    }

    #[test]
    fn kernels_agree() {
        let kernel = Kernel::detect();
        for (dim, valid) in [(1, 1), (7, 3), (40, 6), (384, 5)] {
            let panel = values(dim * NR, dim as u64);
            let rows = values(dim * valid, 7 + valid as u64);
            let scale = values(valid, 3);
            let floors: [f32; NR] =
                std::array::from_fn(|c| [f32::NEG_INFINITY, f32::INFINITY, 0.0][c % 3]);
            let (mut want, mut got) = ([0.0; MR * NR], [0.0; MR * NR]);
            let want_mask = tile_portable(&panel, &rows, &scale, &floors, &mut want);
            let got_mask = kernel.tile(&panel, &rows, &scale, &floors, &mut got);
            for bit in 0..valid * NR {
                assert!((want[bit] - got[bit]).abs() <= 1e-5, "dim {dim} bit {bit}");
                let clear = floors[bit % NR] != 0.0 || want[bit].abs() > 1e-5;
                if clear {
                    assert_eq!(
                        want_mask >> bit & 1,
                        got_mask >> bit & 1,
                        "dim {dim} bit {bit}"
                    );
                }
            }
            assert_eq!(got_mask >> (valid * NR), 0, "rows past valid are masked");
        }
    }

    #[test]
    fn below_is_the_next_float_down() {
        for t in [0.0f32, -0.0, 0.5, -0.5, 1e-40, -1e-40, f32::MAX, -f32::MAX] {
            let b = below(t);
            assert!(b < t);
            assert_eq!(f32::from_bits(b.to_bits()), b);
            for s in [b, t, -0.0, 0.0] {
                assert_eq!(s > b, s >= t, "t {t} s {s}");
            }
        }
    }

    /// Rows with norms far outside the safe range (2^±110) take the
    /// normalised copy and still match the f64 reference.
    #[test]
    fn extreme_norms_match_reference() {
        let (m, n, dim, k) = (5, 40, 24, 7);
        let q = values(m * dim, 1);
        let mut db = values(n * dim, 2);
        for (r, row) in db.chunks_exact_mut(dim).enumerate() {
            let factor = [2f32.powi(110), 2f32.powi(-110), 1.0][r % 3];
            row.iter_mut().for_each(|v| *v *= factor);
        }
        let qt = Tensor::from_slice(&q, &[m, dim], &Device::Cpu).unwrap();
        let dbt = Tensor::from_slice(&db, &[n, dim], &Device::Cpu).unwrap();
        let got = topk("test", &qt, Some(&dbt), k, Exclude::Nothing).unwrap();
        let (want_scores, want_indices) = reference::topk(&q, &db, dim, k, Exclude::Nothing);
        assert_eq!(got.indices.to_vec::<u32>().unwrap(), want_indices);
        let got_scores = got.scores.to_vec::<f32>().unwrap();
        for (g, w) in got_scores.iter().zip(&want_scores) {
            assert!((g - w).abs() <= 1e-5, "{g} vs {w}");
        }
    }
}
