//! Cosine-similarity top-k reference: every query against every database
//! row, f64 dot products and norms, a full sort per query.
//!
//! Row-major inputs: `queries` is [m, dim], `database` is [n, dim]. For the
//! self-similarity modes ([`Exclude::SameIndex`], [`Exclude::NotEarlier`])
//! pass the same set as both `queries` and `database`: query `i` and database
//! row `i` are then the same row.
//!
//! Conventions every implementation must reproduce:
//! - cosine(q, d) = dot(q, d) / (|q| |d|); a zero vector has similarity 0
//!   with everything (itself included), never NaN;
//! - results per query sorted by descending similarity, equal similarities
//!   by ascending database index;
//! - a row of top-k results is min(k, n) wide in every mode; slots for which
//!   no candidate is left (the mode excluded them) hold index [`NO_INDEX`]
//!   and score negative infinity, always after the real results.

use std::cmp::Ordering;

/// Index of a top-k slot that holds no result (padding).
pub const NO_INDEX: u32 = u32::MAX;

/// Which (query `i`, database row `j`) pairs are considered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Exclude {
    /// Every pair: queries and database are different sets.
    #[default]
    Nothing,
    /// Self-similarity of one set: every pair but j == i.
    SameIndex,
    /// Self-similarity of one set, only j < i: row i is compared with the
    /// rows before it (the greedy near-duplicate filter).
    NotEarlier,
}

impl Exclude {
    /// Whether database row `j` is a candidate for query `i`.
    pub fn allows(self, i: usize, j: usize) -> bool {
        match self {
            Exclude::Nothing => true,
            Exclude::SameIndex => j != i,
            Exclude::NotEarlier => j < i,
        }
    }
}

/// Cosine similarities [m, n] of every query with every database row, in f64.
///
/// Panics if `dim` is 0 or the slices are not whole rows of `dim` elements.
pub fn similarities(queries: &[f32], database: &[f32], dim: usize) -> Vec<f64> {
    check_rows(queries, database, dim);
    let db_norms: Vec<f64> = database.chunks_exact(dim).map(norm).collect();
    let mut sim = Vec::with_capacity(queries.len() / dim * db_norms.len());
    for q in queries.chunks_exact(dim) {
        let q_norm = norm(q);
        for (d, &d_norm) in database.chunks_exact(dim).zip(&db_norms) {
            sim.push(cosine(q, q_norm, d, d_norm));
        }
    }
    sim
}

/// The `k` most similar database rows of every query.
///
/// Returns (scores, indices), both [m, min(k, n)] row-major: scores as f32
/// (the f64 similarity rounded), indices as u32. Slots without a candidate
/// are padded with ([`f32::NEG_INFINITY`], [`NO_INDEX`]) at the end of the row.
pub fn topk(
    queries: &[f32],
    database: &[f32],
    dim: usize,
    k: usize,
    exclude: Exclude,
) -> (Vec<f32>, Vec<u32>) {
    let sim = similarities(queries, database, dim);
    let n = database.len() / dim;
    let width = k.min(n);
    if width == 0 {
        return (Vec::new(), Vec::new());
    }
    let mut scores = Vec::with_capacity(sim.len() / n * width);
    let mut indices = Vec::with_capacity(scores.capacity());
    for (i, row) in sim.chunks_exact(n).enumerate() {
        let mut candidates: Vec<(usize, f64)> = row
            .iter()
            .enumerate()
            .filter(|&(j, _)| exclude.allows(i, j))
            .map(|(j, &s)| (j, s))
            .collect();
        candidates.sort_by(|a, b| descending(a.1, b.1).then(a.0.cmp(&b.0)));
        candidates.truncate(width);
        let pad = width - candidates.len();
        for (j, s) in candidates {
            scores.push(s as f32);
            indices.push(j as u32);
        }
        scores.extend(std::iter::repeat_n(f32::NEG_INFINITY, pad));
        indices.extend(std::iter::repeat_n(NO_INDEX, pad));
    }
    (scores, indices)
}

/// Every (query, database row, score) with similarity >= `threshold`
/// (compared in f64), sorted by query, then database row.
pub fn pairs_above(
    queries: &[f32],
    database: &[f32],
    dim: usize,
    threshold: f32,
    exclude: Exclude,
) -> Vec<(u32, u32, f32)> {
    let sim = similarities(queries, database, dim);
    let n = database.len() / dim;
    let mut pairs = Vec::new();
    if n == 0 {
        return pairs;
    }
    for (i, row) in sim.chunks_exact(n).enumerate() {
        for (j, &s) in row.iter().enumerate() {
            if exclude.allows(i, j) && s >= threshold as f64 {
                pairs.push((i as u32, j as u32, s as f32));
            }
        }
    }
    pairs
}

fn check_rows(queries: &[f32], database: &[f32], dim: usize) {
    assert!(dim > 0, "dim must be positive");
    assert_eq!(
        queries.len() % dim,
        0,
        "queries are not whole rows of {dim}"
    );
    assert_eq!(
        database.len() % dim,
        0,
        "database is not whole rows of {dim}"
    );
}

fn norm(row: &[f32]) -> f64 {
    row.iter()
        .fold(0.0f64, |acc, &v| acc + v as f64 * v as f64)
        .sqrt()
}

fn cosine(q: &[f32], q_norm: f64, d: &[f32], d_norm: f64) -> f64 {
    if q_norm == 0.0 || d_norm == 0.0 {
        return 0.0;
    }
    let dot = q
        .iter()
        .zip(d)
        .fold(0.0f64, |acc, (&a, &b)| acc + a as f64 * b as f64);
    dot / (q_norm * d_norm)
}

/// Higher similarity first; equal values (0.0 and -0.0 too) compare equal so
/// the index decides. NaN (only from non-finite input) gets a fixed place.
fn descending(a: f64, b: f64) -> Ordering {
    if a == b {
        Ordering::Equal
    } else {
        b.total_cmp(&a)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAD: (f32, u32) = (f32::NEG_INFINITY, NO_INDEX);

    fn row(scores: &[f32], indices: &[u32], w: usize, i: usize) -> Vec<(f32, u32)> {
        (i * w..(i + 1) * w)
            .map(|s| (scores[s], indices[s]))
            .collect()
    }

    #[test]
    fn zero_vectors_have_similarity_zero_never_nan() {
        let q = [0.0, 0.0, 1.0, 0.0];
        let d = [0.0, 0.0, 3.0, 0.0, -2.0, 0.0];
        let sim = similarities(&q, &d, 2);
        assert_eq!(sim, vec![0.0, 0.0, 0.0, 0.0, 1.0, -1.0]);
        let (scores, indices) = topk(&q, &d, 2, 3, Exclude::Nothing);
        assert!(scores.iter().all(|s| !s.is_nan()));
        // Query 0 (zero): all three tie at 0, so index order.
        assert_eq!(
            row(&scores, &indices, 3, 0),
            vec![(0.0, 0), (0.0, 1), (0.0, 2)]
        );
        assert_eq!(
            row(&scores, &indices, 3, 1),
            vec![(1.0, 1), (0.0, 0), (-1.0, 2)]
        );
        // A zero vector against itself is 0 too, and >= 0 holds.
        let pairs = pairs_above(&q[..2], &q[..2], 2, 0.0, Exclude::Nothing);
        assert_eq!(pairs, vec![(0, 0, 0.0)]);
    }

    #[test]
    fn scale_does_not_matter() {
        let q = [1.0, 2.0, 3.0];
        let d = [2.0, 4.0, 6.0, -0.5, -1.0, -1.5];
        let sim = similarities(&q, &d, 3);
        assert!((sim[0] - 1.0).abs() < 1e-15 && (sim[1] + 1.0).abs() < 1e-15);
    }

    #[test]
    fn ties_are_ordered_by_index() {
        // Rows 1, 3 and 4 are the same direction (different lengths), row 2 is 0.
        let q = [1.0, 1.0];
        let d = [1.0, 0.0, 2.0, 2.0, 0.0, 0.0, 1.0, 1.0, 5.0, 5.0, -1.0, -1.0];
        let (scores, indices) = topk(&q, &d, 2, 6, Exclude::Nothing);
        assert_eq!(indices, vec![1, 3, 4, 0, 2, 5]);
        assert_eq!(scores[..3], [1.0; 3]);
        assert!(scores.windows(2).all(|w| w[0] >= w[1]));
        // The same order with a smaller k: the first k of the full sort.
        let (_, top2) = topk(&q, &d, 2, 2, Exclude::Nothing);
        assert_eq!(top2, vec![1, 3]);
    }

    #[test]
    fn negative_zero_ties_with_zero() {
        assert_eq!(descending(-0.0, 0.0), Ordering::Equal);
        assert_eq!(descending(0.5, 0.25), Ordering::Less);
        assert_eq!(descending(-1.0, 0.0), Ordering::Greater);
    }

    /// Four rows: 0 and 2 are identical, 1 is close to 0 (cosine 0.9939), 3 is
    /// opposite.
    fn set() -> Vec<f32> {
        vec![1.0, 0.0, 0.9, 0.1, 1.0, 0.0, -1.0, 0.0]
    }

    #[test]
    fn exclusion_modes() {
        let x = set();
        let (_, all) = topk(&x, &x, 2, 4, Exclude::Nothing);
        assert_eq!(all[..4], [0, 2, 1, 3]);
        let (s, same) = topk(&x, &x, 2, 4, Exclude::SameIndex);
        assert_eq!(row(&s, &same, 4, 0)[3], PAD);
        assert_eq!(
            same,
            vec![2, 1, 3, NO_INDEX, 0, 2, 3, NO_INDEX, 0, 1, 3, NO_INDEX, 1, 0, 2, NO_INDEX]
        );
        let (s, earlier) = topk(&x, &x, 2, 2, Exclude::NotEarlier);
        assert_eq!(row(&s, &earlier, 2, 0), vec![PAD, PAD]);
        assert_eq!(row(&s, &earlier, 2, 1)[1], PAD);
        assert_eq!(earlier, vec![NO_INDEX, NO_INDEX, 0, NO_INDEX, 0, 1, 1, 0]);
        assert_eq!(s[4], 1.0);

        let above = |e| pairs_above(&x, &x, 2, 0.995, e);
        assert_eq!(
            above(Exclude::Nothing)
                .iter()
                .map(|p| (p.0, p.1))
                .collect::<Vec<_>>(),
            vec![(0, 0), (0, 2), (1, 1), (2, 0), (2, 2), (3, 3)]
        );
        let ij = |e| above(e).iter().map(|p| (p.0, p.1)).collect::<Vec<_>>();
        assert_eq!(ij(Exclude::SameIndex), vec![(0, 2), (2, 0)]);
        assert_eq!(ij(Exclude::NotEarlier), vec![(2, 0)]);
        assert_eq!(above(Exclude::NotEarlier)[0].2, 1.0);
        assert!(!Exclude::NotEarlier.allows(3, 3) && Exclude::NotEarlier.allows(3, 2));
        assert_eq!(Exclude::default(), Exclude::Nothing);
    }

    #[test]
    fn k_above_n_pads_to_n() {
        let x = set();
        // Width is min(k, n) = 4 in every mode.
        let (s, i) = topk(&x[..2], &x, 2, 10, Exclude::Nothing);
        assert_eq!((s.len(), i), (4, vec![0, 2, 1, 3]));
        let (s, i) = topk(&x, &x, 2, 10, Exclude::SameIndex);
        assert_eq!((s.len(), i.len()), (16, 16));
        assert!(i
            .chunks(4)
            .all(|r| r[3] == NO_INDEX && r[..3].iter().all(|&j| j < 4)));
        assert!(s.chunks(4).all(|r| r[3] == f32::NEG_INFINITY));
        // An empty database: rows of width 0.
        let (s, i) = topk(&x, &[], 2, 3, Exclude::Nothing);
        assert!(s.is_empty() && i.is_empty());
        assert!(pairs_above(&x, &[], 2, -1.0, Exclude::Nothing).is_empty());
        // k = 0: rows of width 0.
        let (s, i) = topk(&x, &x, 2, 0, Exclude::Nothing);
        assert!(s.is_empty() && i.is_empty());
    }

    #[test]
    fn threshold_is_inclusive() {
        let q = [1.0, 0.0];
        let d = [1.0, 0.0, 0.0, 1.0, -1.0, 0.0];
        assert_eq!(
            pairs_above(&q, &d, 2, 0.0, Exclude::Nothing),
            vec![(0, 0, 1.0), (0, 1, 0.0)]
        );
        assert_eq!(
            pairs_above(&q, &d, 2, 1.0, Exclude::Nothing),
            vec![(0, 0, 1.0)]
        );
        assert!(pairs_above(&q, &d, 2, f32::NAN, Exclude::Nothing).is_empty());
    }
}
