//! The CPU cosine top-k path against the exact reference: random sets with
//! planted exact duplicates and zero rows, k below and above n, every
//! exclusion mode, and the threshold search.

mod common;

use common::Rng;
use platypus::cpu::cosine_topk::{self as reference, Exclude};
use platypus::ops::cosine_topk::{self, Pair, NO_INDEX};
use platypus::{Device, Tensor};
use proptest::prelude::*;

/// Scores computed in f32 after normalising in f64: this far from the f64 reference at most.
const SCORE_TOL: f32 = 1e-5;

/// `rows` random rows of `dim`, with some rows copied from earlier ones
/// (exact ties) and some zero rows.
fn embeddings(rng: &mut Rng, rows: usize, dim: usize) -> Vec<f32> {
    let mut v = rng.normal_vec(rows * dim, 1.0);
    for r in 1..rows {
        match rng.next_u64() % 8 {
            0 => {
                let src = (rng.next_u64() % r as u64) as usize;
                let copy = v[src * dim..(src + 1) * dim].to_vec();
                v[r * dim..(r + 1) * dim].copy_from_slice(&copy);
            }
            1 => v[r * dim..(r + 1) * dim].fill(0.0),
            _ => {}
        }
    }
    v
}

/// Checks one top-k result against the exact similarities: every returned
/// score is its pair's similarity, rows are sorted (exact ties by index),
/// no index repeats, nothing better was left out, and empty slots are where
/// the mode leaves no candidate.
fn check_topk(
    sims: &[f64],
    n: usize,
    k: usize,
    exclude: Exclude,
    scores: &[f32],
    indices: &[u32],
) -> Result<(), String> {
    let kk = k.min(n);
    for (i, (s_row, i_row)) in scores
        .chunks_exact(kk)
        .zip(indices.chunks_exact(kk))
        .enumerate()
    {
        let allowed: Vec<usize> = (0..n)
            .filter(|&j| match exclude {
                Exclude::Nothing => true,
                Exclude::SameIndex => j != i,
                Exclude::NotEarlier => j < i,
            })
            .collect();
        let filled = allowed.len().min(kk);
        for slot in 0..kk {
            let (s, j) = (s_row[slot], i_row[slot]);
            if slot >= filled {
                if j != NO_INDEX || s != f32::NEG_INFINITY {
                    return Err(format!(
                        "query {i} slot {slot}: ({s}, {j}) where no candidate is left"
                    ));
                }
                continue;
            }
            let j = j as usize;
            if !allowed.contains(&j) {
                return Err(format!(
                    "query {i} slot {slot}: row {j} is not a candidate in mode {exclude:?}"
                ));
            }
            let want = sims[i * n + j] as f32;
            if (s - want).abs() > SCORE_TOL {
                return Err(format!(
                    "query {i} slot {slot}: row {j} scored {s}, similarity is {want}"
                ));
            }
            if slot > 0 {
                let (ps, pj) = (s_row[slot - 1], i_row[slot - 1]);
                if ps < s || (ps == s && pj as usize > j) {
                    return Err(format!(
                        "query {i}: slot {slot} ({s}, {j}) ranks above slot {} ({ps}, {pj})",
                        slot - 1
                    ));
                }
                if i_row[..slot].contains(&(j as u32)) {
                    return Err(format!("query {i}: row {j} twice"));
                }
            }
        }
        // Nothing left out beats the last kept score by more than the tolerance.
        if filled > 0 {
            let last = s_row[filled - 1];
            for &j in &allowed {
                if !i_row[..filled].contains(&(j as u32))
                    && sims[i * n + j] as f32 > last + SCORE_TOL
                {
                    return Err(format!(
                        "query {i}: row {j} ({}) left out, last kept {last}",
                        sims[i * n + j]
                    ));
                }
            }
        }
    }
    Ok(())
}

/// Queries and database of one case, as data and as tensors; self modes
/// search the database against itself (then m = n).
struct Sets {
    q: Vec<f32>,
    db: Vec<f32>,
    m: usize,
    qt: Tensor,
    dbt: Tensor,
}

impl Sets {
    fn new(seed: u64, m: usize, n: usize, dim: usize, exclude: Exclude) -> Sets {
        let mut rng = Rng::new(seed);
        let db = embeddings(&mut rng, n, dim);
        let (q, m) = if exclude == Exclude::Nothing {
            (embeddings(&mut rng, m, dim), m)
        } else {
            (db.clone(), n)
        };
        let qt = Tensor::from_slice(&q, &[m, dim], &Device::Cpu).unwrap();
        let dbt = Tensor::from_slice(&db, &[n, dim], &Device::Cpu).unwrap();
        Sets { q, db, m, qt, dbt }
    }
}

fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(32);
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn topk_matches_reference(
        m in 1usize..=150,
        n in 1usize..=2100,
        dim in prop_oneof![Just(1usize), 2usize..=40, Just(384)],
        k in prop_oneof![Just(1usize), 2usize..=20, Just(1024), 2000usize..=2200],
        exclude in prop::sample::select(vec![Exclude::Nothing, Exclude::SameIndex, Exclude::NotEarlier]),
        seed in any::<u64>(),
    ) {
        let Sets { q, db, m, qt, dbt } = Sets::new(seed, m, n, dim, exclude);
        let got = if exclude == Exclude::Nothing {
            cosine_topk::topk(&qt, &dbt, k).unwrap()
        } else {
            cosine_topk::topk_self(&dbt, k, exclude).unwrap()
        };
        prop_assert_eq!(got.scores.shape(), &[m, k.min(n)]);
        let sims = reference::similarities(&q, &db, dim);
        let (scores, indices) = (got.scores.to_vec::<f32>().unwrap(), got.indices.to_vec::<u32>().unwrap());
        if let Err(e) = check_topk(&sims, n, k, exclude, &scores, &indices) {
            return Err(TestCaseError::fail(e));
        }
    }

    #[test]
    fn threshold_matches_reference(
        m in 1usize..=100,
        n in 1usize..=1500,
        dim in prop_oneof![2usize..=12, Just(48)],
        threshold in -0.2f32..0.95,
        exclude in prop::sample::select(vec![Exclude::Nothing, Exclude::SameIndex, Exclude::NotEarlier]),
        seed in any::<u64>(),
    ) {
        let Sets { q, db, qt, dbt, .. } = Sets::new(seed, m, n, dim, exclude);
        let got = if exclude == Exclude::Nothing {
            cosine_topk::above_threshold(&qt, &dbt, threshold, usize::MAX).unwrap()
        } else {
            cosine_topk::above_threshold_self(&dbt, threshold, usize::MAX, exclude).unwrap()
        };
        let want = reference::pairs_above(&q, &db, dim, threshold, exclude);
        let sims = reference::similarities(&q, &db, dim);
        // Pairs within the tolerance of the threshold may fall either way.
        let clear = |&(i, j): &(u32, u32)| (sims[i as usize * n + j as usize] as f32 - threshold).abs() > SCORE_TOL;
        let got_pairs: Vec<(u32, u32)> = got.iter().map(|p| (p.query, p.item)).filter(clear).collect();
        let want_pairs: Vec<(u32, u32)> = want.iter().map(|&(i, j, _)| (i, j)).filter(clear).collect();
        prop_assert_eq!(got_pairs, want_pairs);
        for Pair { query, item, score } in got {
            prop_assert!((score - sims[query as usize * n + item as usize] as f32).abs() <= SCORE_TOL);
        }
    }
}

#[test]
fn too_many_threshold_pairs_is_an_error_not_a_truncation() {
    let x = Tensor::from_slice(&[1.0f32, 0.0, 1.0, 0.0, 1.0, 0.0], &[3, 2], &Device::Cpu).unwrap();
    assert_eq!(
        cosine_topk::above_threshold(&x, &x, 0.5, 9).unwrap().len(),
        9
    );
    let e = cosine_topk::above_threshold(&x, &x, 0.5, 8)
        .unwrap_err()
        .to_string();
    assert!(e.contains("`max_pairs`") && e.contains("9 pairs"), "{e}");
}

#[test]
fn bad_input_names_the_argument() {
    let dev = Device::Cpu;
    let q = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0], &[2, 2], &dev).unwrap();
    let db3 = Tensor::from_slice(&[1.0f32; 6], &[2, 3], &dev).unwrap();
    let e = cosine_topk::topk(&q, &db3, 1).unwrap_err().to_string();
    assert!(e.contains("`database`") && e.contains("[n, 2]"), "{e}");
    let e = cosine_topk::topk(&q, &q, 0).unwrap_err().to_string();
    assert!(e.contains("`k`"), "{e}");
    let nan = Tensor::from_slice(&[1.0f32, 2.0, f32::NAN, 4.0], &[2, 2], &dev).unwrap();
    let e = cosine_topk::topk(&nan, &q, 1).unwrap_err().to_string();
    assert!(
        e.contains("`queries`") && e.contains("row 1 has NaN at column 0"),
        "{e}"
    );
    let e = cosine_topk::above_threshold(&q, &q, f32::NAN, 10)
        .unwrap_err()
        .to_string();
    assert!(e.contains("`threshold`"), "{e}");
    let on_emu = Tensor::from_slice(&[1.0f32, 2.0], &[1, 2], &Device::Emulated).unwrap();
    let e = cosine_topk::topk(&on_emu, &q, 1).unwrap_err().to_string();
    assert!(e.contains("not written yet"), "{e}");
}
