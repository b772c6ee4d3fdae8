//! Both cosine search paths against the exact reference: the CPU fast path
//! and the kernels on the host emulator (every input dtype, database splits,
//! streamed chunks). Random sets with planted exact duplicates and zero rows,
//! k below and above n, every exclusion mode, and the threshold search.

mod common;

use common::{round_to, Rng};
use platypus::cpu::cosine_topk::{self as reference, Exclude};
use platypus::ops::cosine_topk::{self, Pair, TopK, NO_INDEX};
use platypus::{DType, Device, Tensor};
use proptest::prelude::*;

/// CPU path: scores computed in f32 after normalising in f64 are this far
/// from the f64 reference at most.
const SCORE_TOL: f32 = 1e-5;

/// Kernels: 16-bit inputs are multiplied exactly and summed in fp32 (the
/// reference sees the same rounded inputs); f32 inputs go through two bf16
/// halves, about 16 significant bits.
fn kernel_tol(dtype: DType) -> f32 {
    match dtype {
        DType::F32 => 1e-4,
        _ => 1e-5,
    }
}

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
    got: &TopK,
    tol: f32,
) -> Result<(), String> {
    let kk = k.min(n);
    let m = sims.len() / n;
    if got.scores.shape() != [m, kk] || got.indices.shape() != [m, kk] {
        return Err(format!(
            "shapes {:?} / {:?}, expected [{m}, {kk}]",
            got.scores.shape(),
            got.indices.shape()
        ));
    }
    let scores = got.scores.to_vec::<f32>().map_err(|e| e.to_string())?;
    let indices = got.indices.to_vec::<u32>().map_err(|e| e.to_string())?;
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
            if (s - want).abs() > tol {
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
                if !i_row[..filled].contains(&(j as u32)) && sims[i * n + j] as f32 > last + tol {
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
    qt: Tensor,
    dbt: Tensor,
}

impl Sets {
    /// A case in f32 on the CPU.
    fn new(seed: u64, m: usize, n: usize, dim: usize, exclude: Exclude) -> Sets {
        Sets::on(seed, m, n, dim, exclude, DType::F32, &Device::Cpu)
    }

    /// A case in `dtype` on `device`; `q` and `db` hold the values as rounded to `dtype`.
    fn on(
        seed: u64,
        m: usize,
        n: usize,
        dim: usize,
        exclude: Exclude,
        dtype: DType,
        device: &Device,
    ) -> Sets {
        let mut rng = Rng::new(seed);
        let db = round_to(&embeddings(&mut rng, n, dim), dtype);
        let (q, m) = if exclude == Exclude::Nothing {
            (round_to(&embeddings(&mut rng, m, dim), dtype), m)
        } else {
            (db.clone(), n)
        };
        let qt = Tensor::from_f32(&q, &[m, dim], dtype, device).unwrap();
        let dbt = Tensor::from_f32(&db, &[n, dim], dtype, device).unwrap();
        Sets { q, db, qt, dbt }
    }

    fn topk(&self, k: usize, exclude: Exclude) -> TopK {
        if exclude == Exclude::Nothing {
            cosine_topk::topk(&self.qt, &self.dbt, k).unwrap()
        } else {
            cosine_topk::topk_self(&self.dbt, k, exclude).unwrap()
        }
    }

    fn above(&self, threshold: f32, exclude: Exclude) -> Vec<Pair> {
        if exclude == Exclude::Nothing {
            cosine_topk::above_threshold(&self.qt, &self.dbt, threshold, usize::MAX).unwrap()
        } else {
            cosine_topk::above_threshold_self(&self.dbt, threshold, usize::MAX, exclude).unwrap()
        }
    }

    /// Checks a threshold search against the reference; pairs within `tol`
    /// of the threshold may fall either way.
    fn check_above(
        &self,
        threshold: f32,
        exclude: Exclude,
        got: &[Pair],
        tol: f32,
    ) -> Result<(), TestCaseError> {
        let (n, dim) = (self.dbt.shape()[0], self.dbt.shape()[1]);
        let want = reference::pairs_above(&self.q, &self.db, dim, threshold, exclude);
        let sims = reference::similarities(&self.q, &self.db, dim);
        let clear = |&(i, j): &(u32, u32)| {
            (sims[i as usize * n + j as usize] as f32 - threshold).abs() > tol
        };
        let got_pairs: Vec<(u32, u32)> = got
            .iter()
            .map(|p| (p.query, p.item))
            .filter(clear)
            .collect();
        let want_pairs: Vec<(u32, u32)> =
            want.iter().map(|&(i, j, _)| (i, j)).filter(clear).collect();
        prop_assert_eq!(got_pairs, want_pairs);
        prop_assert!(
            got.windows(2)
                .all(|w| (w[0].query, w[0].item) < (w[1].query, w[1].item)),
            "pairs not sorted"
        );
        for &Pair { query, item, score } in got {
            prop_assert!((score - sims[query as usize * n + item as usize] as f32).abs() <= tol);
        }
        Ok(())
    }
}

fn modes() -> impl Strategy<Value = Exclude> {
    prop::sample::select(vec![
        Exclude::Nothing,
        Exclude::SameIndex,
        Exclude::NotEarlier,
    ])
}

fn dtypes() -> impl Strategy<Value = DType> {
    prop::sample::select(vec![DType::F32, DType::F16, DType::BF16])
}

fn config() -> ProptestConfig {
    common::proptest_config(32)
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn topk_matches_reference(
        m in 1usize..=150,
        n in 1usize..=2100,
        dim in prop_oneof![Just(1usize), 2usize..=40, Just(384)],
        k in prop_oneof![Just(1usize), 2usize..=20, Just(1024), 2000usize..=2200],
        exclude in modes(),
        seed in any::<u64>(),
    ) {
        let sets = Sets::new(seed, m, n, dim, exclude);
        let got = sets.topk(k, exclude);
        let sims = reference::similarities(&sets.q, &sets.db, dim);
        if let Err(e) = check_topk(&sims, n, k, exclude, &got, SCORE_TOL) {
            return Err(TestCaseError::fail(e));
        }
    }

    #[test]
    fn threshold_matches_reference(
        m in 1usize..=100,
        n in 1usize..=1500,
        dim in prop_oneof![2usize..=12, Just(48)],
        threshold in -0.2f32..0.95,
        exclude in modes(),
        seed in any::<u64>(),
    ) {
        let sets = Sets::new(seed, m, n, dim, exclude);
        let got = sets.above(threshold, exclude);
        sets.check_above(threshold, exclude, &got, SCORE_TOL)?;
    }
}

// Emulated kernel cases are smaller (the emulator runs every GPU thread as
// a fiber): n up to 1100 gives up to 5 database splits of 4 or more 64-row
// tiles, so both the merge of splits and the selection across tiles of one
// split are exercised; 130+ queries make two query blocks.
proptest! {
    #![proptest_config(config())]

    #[test]
    fn kernel_topk_matches_reference(
        m in prop_oneof![1usize..=40, 120usize..=140],
        n in prop_oneof![1usize..=70, 200usize..=1100],
        dim in prop_oneof![1usize..=12, Just(64), 90usize..=100, Just(384)],
        k in prop_oneof![Just(1usize), 2usize..=40, 100usize..=300],
        exclude in modes(),
        dtype in dtypes(),
        seed in any::<u64>(),
    ) {
        let sets = Sets::on(seed, m, n, dim, exclude, dtype, &Device::Emulated);
        let got = sets.topk(k, exclude);
        prop_assert!(matches!(got.scores.device(), Device::Emulated));
        let sims = reference::similarities(&sets.q, &sets.db, dim);
        if let Err(e) = check_topk(&sims, n, k, exclude, &got, kernel_tol(dtype)) {
            return Err(TestCaseError::fail(e));
        }
    }

    #[test]
    fn kernel_threshold_matches_reference(
        m in prop_oneof![1usize..=40, 120usize..=140],
        n in 1usize..=400,
        dim in prop_oneof![2usize..=12, Just(48)],
        threshold in -0.2f32..0.95,
        exclude in modes(),
        dtype in dtypes(),
        seed in any::<u64>(),
    ) {
        let sets = Sets::on(seed, m, n, dim, exclude, dtype, &Device::Emulated);
        let got = sets.above(threshold, exclude);
        sets.check_above(threshold, exclude, &got, kernel_tol(dtype))?;
    }

    #[test]
    fn streamed_chunks_equal_one_shot(
        m in 1usize..=40,
        n in 1usize..=400,
        dim in 1usize..=40,
        k in prop_oneof![Just(1usize), 2usize..=80],
        chunk_rows in prop_oneof![1usize..=10, 60usize..=200],
        dtype in dtypes(),
        seed in any::<u64>(),
    ) {
        let sets = Sets::on(seed, m, n, dim, Exclude::Nothing, dtype, &Device::Emulated);
        let host_db = sets.dbt.to_device(&Device::Cpu).unwrap();
        let streamed = cosine_topk::topk_streamed(&sets.qt, &host_db, k, chunk_rows).unwrap();
        let whole = sets.topk(k, Exclude::Nothing);
        prop_assert_eq!(streamed.indices.to_vec::<u32>().unwrap(), whole.indices.to_vec::<u32>().unwrap());
        let (a, b) = (streamed.scores.to_vec::<f32>().unwrap(), whole.scores.to_vec::<f32>().unwrap());
        prop_assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()), "scores differ");
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
    assert!(e.contains("`database`") && e.contains("emulated"), "{e}");
}

#[test]
fn kernel_bad_input_names_the_argument_and_row() {
    let dev = Device::Emulated;
    let rows = |v: &[f32], dtype| Tensor::from_f32(v, &[v.len() / 2, 2], dtype, &dev).unwrap();
    let q = rows(&[1.0, 2.0, 3.0, 4.0], DType::F32);
    // Non-finite values and squared norms beyond fp32, found on the device.
    let bad = rows(&[1.0, 2.0, 3.0, 4.0, f32::INFINITY, 0.0], DType::F32);
    let e = cosine_topk::topk(&q, &bad, 1).unwrap_err().to_string();
    assert!(e.contains("`database`") && e.contains("row 2 "), "{e}");
    let huge = rows(&[1.0, 2.0, 3e19, 1.0], DType::BF16);
    let e = cosine_topk::topk_self(&huge, 1, Exclude::SameIndex)
        .unwrap_err()
        .to_string();
    assert!(e.contains("`x`") && e.contains("row 1 "), "{e}");
    let host_bad =
        Tensor::from_slice(&[1.0f32, f32::NAN, 0.0, 1.0], &[2, 2], &Device::Cpu).unwrap();
    let e = cosine_topk::topk_streamed(&q, &host_bad, 1, 1)
        .unwrap_err()
        .to_string();
    assert!(e.contains("`database`") && e.contains("row 0 "), "{e}");
    // One dtype for both sets; at most MAX_K results per query.
    let half = rows(&[1.0, 2.0], DType::F16);
    let e = cosine_topk::topk(&half, &q, 1).unwrap_err().to_string();
    assert!(e.contains("`database`") && e.contains("f16"), "{e}");
    let wide = Tensor::zeros(&[cosine_topk::MAX_K + 1, 2], DType::F32, &dev).unwrap();
    let e = cosine_topk::topk(&q, &wide, 2000).unwrap_err().to_string();
    assert!(e.contains("`k`") && e.contains("1025"), "{e}");
    // Streaming takes device queries and a host database, in chunks of at least one row.
    let e = cosine_topk::topk_streamed(&q, &q, 1, 4)
        .unwrap_err()
        .to_string();
    assert!(e.contains("`database`") && e.contains("cpu"), "{e}");
    let host = q.to_device(&Device::Cpu).unwrap();
    let e = cosine_topk::topk_streamed(&q, &host, 1, 0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("`chunk_rows`"), "{e}");
}

#[test]
fn kernel_threshold_overflow_takes_a_second_pass_or_errors() {
    // 400 identical rows: 400 * 399 = 159600 pairs above 0.5 in the j != i
    // search, more than the first pass has slots for (65536).
    let x = Tensor::from_f32(
        &[0.6f32, 0.8].repeat(400),
        &[400, 2],
        DType::F16,
        &Device::Emulated,
    )
    .unwrap();
    let all = cosine_topk::above_threshold_self(&x, 0.5, usize::MAX, Exclude::SameIndex).unwrap();
    assert_eq!(all.len(), 400 * 399);
    assert!(all
        .iter()
        .all(|p| p.query != p.item && (p.score - 1.0).abs() < 1e-3));
    assert!(all
        .windows(2)
        .all(|w| (w[0].query, w[0].item) < (w[1].query, w[1].item)));
    let e = cosine_topk::above_threshold_self(&x, 0.5, 400 * 399 - 1, Exclude::SameIndex)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("`max_pairs`") && e.contains("159600 pairs"),
        "{e}"
    );
}

#[test]
#[cfg(feature = "cli")]
fn cli_searches_on_the_cpu_and_the_emulated_kernels_alike() {
    // `platypus cosine-topk` on .npy files: the database streamed through
    // the emulated kernels in 7-row chunks gives the CPU's lists.
    let dir = std::env::temp_dir().join(format!("platypus-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut rng = Rng::new(7);
    let (m, n, dim, k) = (9, 50, 24, 4);
    let (qp, dbp) = (dir.join("q.npy"), dir.join("db.npy"));
    platypus::npy::write_f32_matrix(&qp, &embeddings(&mut rng, m, dim), [m, dim]).unwrap();
    platypus::npy::write_f32_matrix(&dbp, &embeddings(&mut rng, n, dim), [n, dim]).unwrap();
    let run = |device: &str| {
        let out = dir.join(format!("{device}.npy"));
        let status = std::process::Command::new(env!("CARGO_BIN_EXE_platypus"))
            .args([
                "cosine-topk",
                "--k",
                &k.to_string(),
                "--chunk-rows",
                "7",
                "--device",
                device,
            ])
            .arg("--queries")
            .arg(&qp)
            .arg("--database")
            .arg(&dbp)
            .arg("--out")
            .arg(&out)
            .status()
            .unwrap();
        assert!(status.success(), "{device}: {status}");
        platypus::npy::read_u32_matrix(&out).unwrap()
    };
    let cpu = run("cpu");
    assert_eq!(cpu.1, [m, k]);
    assert_eq!(run("emulated"), cpu);
    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_platypus"))
        .args(["cosine-topk", "--device", "tpu", "--database"])
        .arg(&dbp)
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2)); // a usage error: clap names the values
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--device"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn kernel_selection_across_tiles_keeps_close_candidates() {
    // Two-dimensional embeddings: cosines crowd near 1, so later 64-row
    // tiles of a split keep holding candidates just above the current k-th
    // best; a tile skipped or a buffer flushed wrongly loses them.
    for (seed, k) in [(1, 1), (2, 3), (3, 40)] {
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let sets = Sets::on(seed, 3, 1000, 2, Exclude::Nothing, dtype, &Device::Emulated);
            let got = sets.topk(k, Exclude::Nothing);
            let sims = reference::similarities(&sets.q, &sets.db, 2);
            if let Err(e) = check_topk(&sims, 1000, k, Exclude::Nothing, &got, kernel_tol(dtype)) {
                panic!("k {k}, {dtype}: {e}");
            }
        }
    }
}
