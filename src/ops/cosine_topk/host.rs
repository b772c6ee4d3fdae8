//! The CPU fast path: normalised f32 rows, a blocked GEMM (`matrixmultiply`)
//! per (≤256-query, 1024-row) tile with a per-query selection buffer, spread
//! over rayon threads; the m × n score matrix never exists in full.

use rayon::prelude::*;

use super::{Exclude, Pair, TopK, NO_INDEX};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// Most query rows a thread scores at once (one GEMM's M): the larger, the
/// fewer times the database is packed for the GEMM (256 and 512 measured
/// best on 1000 × 100k, d 384, 2 threads; 64 was 1.5× slower).
const QUERY_BLOCK: usize = 256;
/// Database rows per GEMM (its N): the score tile is QUERY_BLOCK × DB_BLOCK fp32.
const DB_BLOCK: usize = 1024;

/// Query rows per parallel task: enough tasks for every thread, at most QUERY_BLOCK.
fn query_block(m: usize) -> usize {
    m.div_ceil(rayon::current_num_threads())
        .clamp(16, QUERY_BLOCK)
}

/// One side of a search: unit-length rows (zero rows stay zero), fp32.
struct Search {
    rows: usize,
    dim: usize,
    unit: Vec<f32>,
}

impl Search {
    /// Normalises one checked [rows, dim] set; NaN or infinity is an error
    /// naming the first bad row.
    fn normalise(op: &'static str, arg: &'static str, t: &Tensor) -> Result<Search> {
        let [rows, dim] = *t.shape() else {
            unreachable!("checked by cosine_topk::check_set")
        };
        let mut unit = t.to_f32_vec()?;
        // The first bad row in row order, found in parallel.
        let bad = unit
            .par_chunks_exact_mut(dim)
            .enumerate()
            .filter_map(|(r, row)| {
                if let Some(c) = row.iter().position(|v| !v.is_finite()) {
                    return Some((r, c, row[c]));
                }
                let norm = row.iter().map(|&v| v as f64 * v as f64).sum::<f64>().sqrt();
                if norm > 0.0 {
                    let inv = 1.0 / norm;
                    row.iter_mut().for_each(|v| *v = (*v as f64 * inv) as f32);
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
        Ok(Search { rows, dim, unit })
    }

    /// The normalised queries and database (`None`: self-similarity of `queries`).
    fn pair(
        op: &'static str,
        queries: &Tensor,
        database: Option<&Tensor>,
    ) -> Result<(Search, Option<Search>)> {
        let arg = if database.is_some() { "queries" } else { "x" };
        let q = Search::normalise(op, arg, queries)?;
        let db = database
            .map(|d| Search::normalise(op, "database", d))
            .transpose()?;
        Ok((q, db))
    }
}

/// The CPU top-k of checked inputs (`database` None: self-similarity).
pub(super) fn topk(
    op: &'static str,
    queries: &Tensor,
    database: Option<&Tensor>,
    k: usize,
    exclude: Exclude,
) -> Result<TopK> {
    let (q, db) = Search::pair(op, queries, database)?;
    run_topk(&q, db.as_ref().unwrap_or(&q), k, exclude)
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
    let (q, db) = Search::pair(op, queries, database)?;
    run_threshold(
        op,
        &q,
        db.as_ref().unwrap_or(&q),
        threshold,
        max_pairs,
        exclude,
    )
}

/// The database rows query `i` may be compared with, as a range bound and a
/// skipped index (self-similarity modes).
fn candidates(exclude: Exclude, i: usize, n: usize) -> (usize, Option<usize>) {
    match exclude {
        Exclude::Nothing => (n, None),
        Exclude::SameIndex => (n, Some(i)),
        Exclude::NotEarlier => (i.min(n), None),
    }
}

/// Scores of queries `q0 .. q0 + mq` against database rows `d0 .. d0 + nd`
/// into `tile` [mq, nd] with one f32 GEMM.
fn score_tile(
    q: &Search,
    db: &Search,
    q0: usize,
    mq: usize,
    d0: usize,
    nd: usize,
    tile: &mut [f32],
) {
    let d = q.dim;
    let a = &q.unit[q0 * d..(q0 + mq) * d];
    let b = &db.unit[d0 * d..(d0 + nd) * d];
    // SAFETY: a is [mq, d] row-major, b [nd, d] row-major read as its
    // transpose [d, nd] (row stride 1, column stride d), tile [mq, nd]
    // row-major; all three slices hold exactly those elements.
    unsafe {
        matrixmultiply::sgemm(
            mq,
            d,
            nd,
            1.0,
            a.as_ptr(),
            d as isize,
            1,
            b.as_ptr(),
            1,
            d as isize,
            0.0,
            tile.as_mut_ptr(),
            nd as isize,
            1,
        );
    }
}

/// Visits every (query, database row, score) of `q0 .. q0 + mq` that
/// `exclude` allows, database rows in increasing order per query.
fn scan_block(
    q: &Search,
    db: &Search,
    q0: usize,
    mq: usize,
    exclude: Exclude,
    mut visit: impl FnMut(usize, usize, f32),
) {
    let last = q0 + mq - 1;
    let (bound, _) = candidates(exclude, last, db.rows);
    let mut tile = vec![0.0f32; mq * DB_BLOCK];
    for d0 in (0..bound).step_by(DB_BLOCK) {
        let nd = DB_BLOCK.min(bound - d0);
        score_tile(q, db, q0, mq, d0, nd, &mut tile[..mq * nd]);
        for (qi, scores) in tile[..mq * nd].chunks_exact(nd).enumerate() {
            let i = q0 + qi;
            let (end, skip) = candidates(exclude, i, db.rows);
            for (j, &s) in scores.iter().enumerate().take(end.saturating_sub(d0)) {
                if Some(d0 + j) != skip {
                    visit(qi, d0 + j, s);
                }
            }
        }
    }
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

fn run_topk(q: &Search, db: &Search, k: usize, exclude: Exclude) -> Result<TopK> {
    let kk = k.min(db.rows);
    let mut scores = vec![f32::NEG_INFINITY; q.rows * kk];
    let mut indices = vec![NO_INDEX; q.rows * kk];
    let qb = query_block(q.rows);
    scores
        .par_chunks_mut(qb * kk)
        .zip(indices.par_chunks_mut(qb * kk))
        .enumerate()
        .for_each(|(block, (s_out, i_out))| {
            let q0 = block * qb;
            let mq = s_out.len() / kk;
            let mut sel: Vec<Selection> = (0..mq).map(|_| Selection::new(kk)).collect();
            scan_block(q, db, q0, mq, exclude, |qi, j, s| {
                sel[qi].offer(s, j as u32)
            });
            for (qi, sel) in sel.iter_mut().enumerate() {
                sel.cut();
                for (slot, &(s, j)) in sel.items.iter().enumerate() {
                    s_out[qi * kk + slot] = s;
                    i_out[qi * kk + slot] = j;
                }
            }
        });
    Ok(TopK {
        scores: Tensor::from_slice(&scores, &[q.rows, kk], &Device::Cpu)?,
        indices: Tensor::from_slice(&indices, &[q.rows, kk], &Device::Cpu)?,
    })
}

fn run_threshold(
    op: &'static str,
    q: &Search,
    db: &Search,
    threshold: f32,
    max_pairs: usize,
    exclude: Exclude,
) -> Result<Vec<Pair>> {
    let qb = query_block(q.rows);
    let blocks: Vec<Vec<Pair>> = (0..q.rows.div_ceil(qb))
        .into_par_iter()
        .map(|block| {
            let q0 = block * qb;
            let mq = qb.min(q.rows - q0);
            let mut per_query: Vec<Vec<Pair>> = vec![Vec::new(); mq];
            scan_block(q, db, q0, mq, exclude, |qi, j, s| {
                if s >= threshold {
                    per_query[qi].push(Pair {
                        query: (q0 + qi) as u32,
                        item: j as u32,
                        score: s,
                    });
                }
            });
            per_query.concat()
        })
        .collect();
    let total: usize = blocks.iter().map(Vec::len).sum();
    if total > max_pairs {
        return Err(Error::Invalid {
            op,
            arg: "max_pairs",
            what: format!("{total} pairs score >= {threshold}, more than the {max_pairs} allowed"),
        });
    }
    Ok(blocks.concat())
}
