//! The kernels on a real GPU against the CPU references (and, for cosine
//! top-k, the same kernels on the emulator), at the emulated suites' shapes
//! and at Llama 2 7B/13B shapes. Skipped, with the reason printed, when no
//! CUDA device can be used; PLATYPUS_REQUIRE_GPU=1 turns the skip into a
//! failure.
//!
//! - `PLATYPUS_GPU_REPORT=FILE` appends each checked tensor's max error as a
//!   JSON line (the GPU bundle's summary reads them).
//! - `PLATYPUS_GPU_QUICK=1` runs only small shapes (the bundle's
//!   compute-sanitizer pass).
//! - `PLATYPUS_GPU_TEST_DEVICE=emulated` runs these tests on the emulator in
//!   place of a GPU (with quick shapes), to try the bundle's plumbing on a
//!   machine without one.
//!
//! The `*_checks_hold_on_the_emulator` tests run the model-shape checks at
//! small shapes on the emulator on every machine, so the checks themselves
//! are tested before a GPU runs them.

mod common;

use common::attention::{AttnCase, AttnLayout, AttnModelCase};
use common::lora::LoraCase;
use common::{assert_close, report, round_to, tolerance, Measured, Rng, FLOAT_DTYPES};
use platypus::ops::lora::LoraConfig;
use platypus::ops::rmsnorm;
use platypus::ops::rope::{self, RopeConfig, RopeStyle};
use platypus::{DType, Device, Tensor};

fn env_is(name: &str, value: &str) -> bool {
    std::env::var(name).is_ok_and(|v| v == value)
}

/// The device under test: CUDA device 0 (or the emulator when
/// `PLATYPUS_GPU_TEST_DEVICE=emulated`), or `None` after printing why not.
fn gpu() -> Option<Device> {
    if env_is("PLATYPUS_GPU_TEST_DEVICE", "emulated") {
        return Some(Device::Emulated);
    }
    match Device::cuda(0) {
        Ok(d) => Some(d),
        Err(e) if env_is("PLATYPUS_REQUIRE_GPU", "1") => {
            panic!("PLATYPUS_REQUIRE_GPU=1 but no CUDA device: {e}")
        }
        Err(e) => {
            eprintln!("SKIPPED: GPU test: {e}");
            None
        }
    }
}

/// Small shapes only: under compute-sanitizer, or on the emulator.
fn quick() -> bool {
    env_is("PLATYPUS_GPU_QUICK", "1") || env_is("PLATYPUS_GPU_TEST_DEVICE", "emulated")
}

/// The first `n` of `all` when quick, else all of them.
fn shapes<T: Clone>(all: &[T], n: usize) -> Vec<T> {
    all[..if quick() { n } else { all.len() }].to_vec()
}

/// Asserts `got` is within atol + rtol·|want| of `want` and reports its max
/// absolute error (against atol + rtol·max|want|).
fn check_close(kernel: &str, case: &str, what: &str, got: &[f32], want: &[f32], tol: (f32, f32)) {
    let (atol, rtol) = tol;
    let max_error = got
        .iter()
        .zip(want)
        .fold(0.0f32, |m, (g, w)| m.max((g - w).abs()));
    let scale = want.iter().fold(0.0f32, |m, w| m.max(w.abs()));
    assert_close(&format!("{case} {what}"), got, want, atol, rtol);
    let measured = Measured {
        name: what.to_string(),
        max_error,
        allowed: atol + rtol * scale,
    };
    report(kernel, case, &[measured]);
}

#[test]
fn rmsnorm_matches_cpu_on_the_gpu() {
    let Some(gpu) = gpu() else { return };
    let mut rng = Rng::new(11);
    // Odd sizes, then Llama 2 7B, 13B and 70B rows of a 4096-token batch.
    let all = [
        (7, 130),
        (1, 1),
        (64, 4096),
        (3, 5120),
        (4096, 4096),
        (4096, 5120),
        (4096, 8192),
    ];
    for dtype in FLOAT_DTYPES {
        let (atol, rtol) = tolerance(dtype);
        for (rows, hidden) in shapes(&all, 1) {
            let x = round_to(&rng.normal_vec(rows * hidden, 1.0), dtype);
            let w = round_to(&rng.normal_vec(hidden, 1.0), dtype);
            let dy = round_to(&rng.normal_vec(rows * hidden, 1.0), dtype);
            let run = |dev: &Device| {
                let t = |v: &[f32], s: &[usize]| Tensor::from_f32(v, s, dtype, dev).unwrap();
                let (xt, wt, dyt) = (
                    t(&x, &[rows, hidden]),
                    t(&w, &[hidden]),
                    t(&dy, &[rows, hidden]),
                );
                let y = rmsnorm::forward(&xt, &wt, 1e-5)
                    .unwrap()
                    .to_f32_vec()
                    .unwrap();
                let g = rmsnorm::backward(&xt, &wt, &dyt, 1e-5, true).unwrap();
                (
                    y,
                    g.dx.to_f32_vec().unwrap(),
                    g.dw.unwrap().to_f32_vec().unwrap(),
                )
            };
            let (gy, gdx, gdw) = run(&gpu);
            let (cy, cdx, cdw) = run(&Device::Cpu);
            let case = format!("{dtype} rows {rows} hidden {hidden}");
            check_close("rmsnorm", &case, "y", &gy, &cy, (atol, rtol));
            check_close("rmsnorm", &case, "dx", &gdx, &cdx, (atol, rtol));
            check_close(
                "rmsnorm",
                &case,
                "dw",
                &gdw,
                &cdw,
                (atol * rows as f32, rtol),
            );
        }
    }
}

#[test]
fn rope_matches_cpu_on_the_gpu() {
    let Some(gpu) = gpu() else { return };
    let mut rng = Rng::new(12);
    // (batch, seq, q heads, k heads, head dim): small GQA, then 7B and 13B at seq 4096.
    let all = [
        (2, 33, 8, 2, 128),
        (1, 4096, 32, 32, 128),
        (1, 4096, 40, 40, 128),
    ];
    for dtype in FLOAT_DTYPES {
        let (atol, rtol) = tolerance(dtype);
        for style in [RopeStyle::RotateHalf, RopeStyle::Interleaved] {
            for (b, t, h, kh, d) in shapes(&all, 1) {
                let q = round_to(&rng.normal_vec(b * t * h * d, 1.0), dtype);
                let k = round_to(&rng.normal_vec(b * t * kh * d, 1.0), dtype);
                let positions: Vec<i32> = (0..(b * t) as i32).map(|i| i * 37 % 4096).collect();
                let run = |dev: &Device| {
                    let mut qt = Tensor::from_f32(&q, &[b, t, h, d], dtype, dev).unwrap();
                    let mut kt = Tensor::from_f32(&k, &[b, t, kh, d], dtype, dev).unwrap();
                    let pos = Tensor::from_slice(&positions, &[b, t], dev).unwrap();
                    let cfg = RopeConfig {
                        theta: 10000.0,
                        style,
                    };
                    rope::forward(&mut qt, &mut kt, &pos, &cfg).unwrap();
                    (qt.to_f32_vec().unwrap(), kt.to_f32_vec().unwrap())
                };
                let (gq, gk) = run(&gpu);
                let (cq, ck) = run(&Device::Cpu);
                let case = format!("{dtype} {style:?} [{b}, {t}, {h}/{kh}, {d}]");
                check_close("rope", &case, "q", &gq, &cq, (atol.max(2e-4), rtol));
                check_close("rope", &case, "k", &gk, &ck, (atol.max(2e-4), rtol));
            }
        }
    }
}

/// Runs `check` and reports its errors under `kernel`, or panics naming the case.
fn checked<C: std::fmt::Debug>(
    kernel: &str,
    case: &C,
    check: impl FnOnce(&C) -> Result<Vec<Measured>, String>,
) {
    match check(case) {
        Ok(measured) => report(kernel, &format!("{case:?}"), &measured),
        Err(e) => panic!("{kernel} {case:?}: {e}"),
    }
}

#[test]
fn attention_matches_cpu_on_the_gpu() {
    let Some(gpu) = gpu() else { return };
    let layouts = [
        AttnLayout::packed(&[1, 64, 0, 517]),
        AttnLayout::Dense { batch: 2, seq: 600 },
        AttnLayout::Padded {
            seq: 300,
            lens: vec![300, 0, 129],
        },
    ];
    let head_dims = platypus::ops::attention::HEAD_DIMS;
    for (i, layout) in shapes(&layouts, 1).into_iter().enumerate() {
        for head_dim in shapes(&head_dims, 1) {
            for (dtype, causal) in [(DType::BF16, true), (DType::F16, false)] {
                // 8 query heads over 2 kv heads, as Llama 2 70B groups them.
                let case = AttnCase {
                    layout: layout.clone(),
                    q_heads: 8,
                    kv_heads: 2,
                    head_dim,
                    dtype,
                    causal,
                };
                checked("attention", &case, |c| c.check_against_cpu(&gpu, i as u64));
            }
        }
    }
    if quick() {
        return;
    }
    // Llama 2 7B attention at seq 4096 (causal, as in training), and a 70B-like
    // 64-over-8 grouping at seq 2048 without the mask.
    let model = [
        AttnModelCase {
            batch: 1,
            seq: 4096,
            q_heads: 32,
            kv_heads: 32,
            head_dim: 128,
            dtype: DType::BF16,
            causal: true,
        },
        AttnModelCase {
            batch: 1,
            seq: 2048,
            q_heads: 64,
            kv_heads: 8,
            head_dim: 128,
            dtype: DType::BF16,
            causal: false,
        },
    ];
    for case in &model {
        checked("attention", case, |c| c.check_against_reference(&gpu, 5));
    }
}

/// Platypus' LoRA setting: alpha 16, dropout 0.05 (a seed and offset that are not 0).
const LORA_CFG: LoraConfig = LoraConfig {
    alpha: 16.0,
    rslora: false,
    dropout: 0.05,
    seed: 7,
    offset: 3,
};

#[test]
fn lora_matches_cpu_on_the_gpu() {
    let Some(gpu) = gpu() else { return };
    // Llama-like widths (not multiples of the 128-wide tiles), r 16 and r 64.
    let small = [
        (1, 4096, 8, 1),
        (257, 1024, 2816, 16),
        (1000, 520, 1032, 64),
    ];
    for (tokens, in_features, out_features, rank) in shapes(&small, 1) {
        for dtype in [DType::BF16, DType::F16] {
            let case = LoraCase {
                tokens,
                in_features,
                out_features,
                rank,
                dtype,
                cfg: LORA_CFG,
            };
            checked("lora", &case, |c| c.check_against_cpu(&gpu, tokens as u64));
        }
    }
    if quick() {
        return;
    }
    // Llama 2 7B q, up, down and 13B up, down projections, 4096 tokens, r 16.
    for (in_features, out_features) in [
        (4096, 4096),
        (4096, 11008),
        (11008, 4096),
        (5120, 13824),
        (13824, 5120),
    ] {
        let case = LoraCase {
            tokens: 4096,
            in_features,
            out_features,
            rank: 16,
            dtype: DType::BF16,
            cfg: LORA_CFG,
        };
        checked("lora", &case, |c| c.check_rows_against_cpu(&gpu, 9, 16));
    }
}

/// Asserts two sorted top-k score/index lists agree: the same empty slots
/// (no candidate: `NO_INDEX`, −inf), each other slot's score within `tol`,
/// and an index differs only where its score is within `tol` of the other's
/// (a near-tie the two sides may order differently). Reports the largest
/// score difference.
fn check_lists(
    kernel: &str,
    case: &str,
    got: &(Vec<f32>, Vec<u32>),
    want: &(Vec<f32>, Vec<u32>),
    tol: f32,
) {
    use platypus::ops::cosine_topk::NO_INDEX;
    let empty =
        |l: &(Vec<f32>, Vec<u32>)| -> Vec<bool> { l.1.iter().map(|&i| i == NO_INDEX).collect() };
    assert_eq!(empty(got), empty(want), "{case}: empty slots differ");
    let filled = |l: &(Vec<f32>, Vec<u32>)| -> Vec<f32> {
        l.0.iter()
            .zip(&l.1)
            .filter(|(_, &i)| i != NO_INDEX)
            .map(|(&s, _)| s)
            .collect()
    };
    check_close(
        kernel,
        case,
        "scores",
        &filled(got),
        &filled(want),
        (tol, 0.0),
    );
    for (slot, (a, b)) in got.1.iter().zip(&want.1).enumerate() {
        assert!(
            a == b || (got.0[slot] - want.0[slot]).abs() <= tol,
            "{case} slot {slot}: row {a} vs {b}"
        );
    }
}

/// Scores and indices of a top-k result.
fn lists(top: &platypus::ops::cosine_topk::TopK) -> (Vec<f32>, Vec<u32>) {
    (top.scores.to_vec().unwrap(), top.indices.to_vec().unwrap())
}

#[test]
fn cosine_search_matches_the_emulator_on_the_gpu() {
    // The same kernels on the GPU and on the emulator: identical lists (the
    // GPU's mma may sum in another order, so scores within 1e-5 and any
    // index difference only between near-equal scores), streamed == resident
    // bit for bit, and the threshold pairs alike. The emulator needs ~1 s per
    // 100k mma, so the shapes stay small; the next test takes the GPU to
    // curation sizes against the CPU path.
    use platypus::ops::cosine_topk::{self, Exclude};
    let Some(gpu) = gpu() else { return };
    let mut rng = Rng::new(21);
    let (m, n, dim, k) = if quick() {
        (20, 700, 64, 10)
    } else {
        (64, 1200, 384, 10)
    };
    let q = rng.normal_vec(m * dim, 1.0);
    let db = rng.normal_vec(n * dim, 1.0);
    for dtype in FLOAT_DTYPES {
        let run = |dev: &Device| {
            let qt = Tensor::from_f32(&q, &[m, dim], dtype, dev).unwrap();
            let dbt = Tensor::from_f32(&db, &[n, dim], dtype, dev).unwrap();
            let top = cosine_topk::topk(&qt, &dbt, k).unwrap();
            let host_db = dbt.to_device(&Device::Cpu).unwrap();
            let streamed = cosine_topk::topk_streamed(&qt, &host_db, k, 777).unwrap();
            assert_eq!(
                lists(&streamed),
                lists(&top),
                "{dtype}: streamed and resident differ"
            );
            let pairs = cosine_topk::above_threshold_self(&dbt, 0.2, 1 << 20, Exclude::NotEarlier)
                .unwrap()
                .len();
            (lists(&top), pairs)
        };
        let (g, gp) = run(&gpu);
        let (e, ep) = run(&Device::Emulated);
        check_lists(
            "cosine_topk",
            &format!("{dtype} m {m} n {n} d {dim} k {k} vs emulator"),
            &g,
            &e,
            1e-5,
        );
        assert!(
            gp.abs_diff(ep) <= n / 100,
            "{dtype}: {gp} vs {ep} pairs above 0.2"
        );
    }
}

#[test]
fn cosine_search_matches_the_cpu_path_at_curation_sizes() {
    // 300 queries against 200k rows (many database tiles and splits, streamed
    // in 64k-row chunks) and a 20k-row greedy dedup.
    let Some(gpu) = gpu() else { return };
    if !quick() {
        cosine_against_cpu_path(&gpu, "cosine_topk", (300, 200_000, 20_000, 384));
    }
}

/// Top-k of m queries against n rows (resident and streamed in 64k-row
/// chunks) and a self-search with earlier rows only over the first `dedup`
/// rows, on `dev` against the CPU fast path (itself held to the exact
/// reference by tests/cosine_topk.rs), its errors reported under `kernel`.
fn cosine_against_cpu_path(
    dev: &Device,
    kernel: &str,
    (m, n, dedup, dim): (usize, usize, usize, usize),
) {
    use platypus::ops::cosine_topk::{self, Exclude};
    let k = 10;
    let mut rng = Rng::new(22);
    let q = rng.normal_vec(m * dim, 1.0);
    let db = rng.normal_vec(n * dim, 1.0);
    for dtype in FLOAT_DTYPES {
        // The kernels' f32 inputs go through two bf16 halves, 16-bit ones are
        // multiplied exactly; plus the CPU path's own 1e-5.
        let tol = if dtype == DType::F32 { 1.1e-4 } else { 2e-5 };
        let host =
            |v: &[f32], rows| Tensor::from_f32(v, &[rows, dim], dtype, &Device::Cpu).unwrap();
        let (cpu_q, cpu_db, cpu_dedup) =
            (host(&q, m), host(&db, n), host(&db[..dedup * dim], dedup));
        let on_dev = |t: &Tensor| t.to_device(dev).unwrap();
        let (q_dev, db_dev, dedup_dev) = (on_dev(&cpu_q), on_dev(&cpu_db), on_dev(&cpu_dedup));
        let want = lists(&cosine_topk::topk(&cpu_q, &cpu_db, k).unwrap());
        let case = format!("{dtype} m {m} n {n} d {dim} k {k} vs cpu");
        check_lists(
            kernel,
            &case,
            &lists(&cosine_topk::topk(&q_dev, &db_dev, k).unwrap()),
            &want,
            tol,
        );
        let streamed = cosine_topk::topk_streamed(&q_dev, &cpu_db, k, 65_536).unwrap();
        check_lists(
            kernel,
            &format!("{case}, streamed"),
            &lists(&streamed),
            &want,
            tol,
        );
        let want = lists(&cosine_topk::topk_self(&cpu_dedup, k, Exclude::NotEarlier).unwrap());
        let got = lists(&cosine_topk::topk_self(&dedup_dev, k, Exclude::NotEarlier).unwrap());
        check_lists(
            kernel,
            &format!("{dtype} self n {dedup} earlier only vs cpu"),
            &got,
            &want,
            tol,
        );
    }
}

/// Embedding gather, SwiGLU forward/backward and residual add + RMSNorm at
/// odd sizes and Llama 2 7B shapes (hidden 4096, MLP 11008, vocab 32000),
/// against the fast CPU path on the same rounded inputs.
#[test]
fn elementwise_matches_cpu_on_the_gpu() {
    use platypus::ops::{embedding, swiglu};
    let Some(gpu) = gpu() else { return };
    let mut rng = Rng::new(17);
    // (rows, hidden, mlp width, vocab)
    let all = [(3, 130, 36, 11), (512, 4096, 11008, 32000)];
    for dtype in FLOAT_DTYPES {
        let tol = tolerance(dtype);
        for (rows, hidden, mlp, vocab) in shapes(&all, 1) {
            let case = format!("{dtype} rows {rows} hidden {hidden} mlp {mlp}");
            let vec =
                |n: usize, scale: f32, rng: &mut Rng| round_to(&rng.normal_vec(n, scale), dtype);
            let (h, delta, w) = (
                vec(rows * hidden, 1.0, &mut rng),
                vec(rows * hidden, 1.0, &mut rng),
                vec(hidden, 1.0, &mut rng),
            );
            let (gate, up, dm) = (
                vec(rows * mlp, 2.0, &mut rng),
                vec(rows * mlp, 1.0, &mut rng),
                vec(rows * mlp, 1.0, &mut rng),
            );
            let table = vec(vocab * hidden, 1.0, &mut rng);
            let ids: Vec<u32> = (0..rows)
                .map(|_| (rng.next_u64() % vocab as u64) as u32)
                .collect();
            let run = |dev: &Device| {
                let t = |v: &[f32], s: &[usize]| Tensor::from_f32(v, s, dtype, dev).unwrap();
                let mut ht = t(&h, &[rows, hidden]);
                let y = rmsnorm::add_forward(
                    &mut ht,
                    &t(&delta, &[rows, hidden]),
                    &t(&w, &[hidden]),
                    1e-5,
                )
                .unwrap();
                let (g, u, d) = (
                    t(&gate, &[rows, mlp]),
                    t(&up, &[rows, mlp]),
                    t(&dm, &[rows, mlp]),
                );
                let m = swiglu::forward(&g, &u).unwrap();
                let grads = swiglu::backward(&g, &u, &d).unwrap();
                let gathered =
                    embedding::forward(&t(&table, &[vocab, hidden]), &ids, dtype).unwrap();
                [ht, y, m, grads.dgate, grads.dup, gathered].map(|x| x.to_f32_vec().unwrap())
            };
            let got = run(&gpu);
            let want = run(&Device::Cpu);
            for (i, what) in ["h", "y", "m", "dgate", "dup", "embedding"]
                .iter()
                .enumerate()
            {
                // The sum and the gather are exact in the storage type.
                let exact = matches!(*what, "h" | "embedding");
                let tol = if exact { (0.0, 0.0) } else { tol };
                check_close("elementwise", &case, what, &got[i], &want[i], tol);
            }
        }
    }
}

/// The sentence encoder's ops: Linear with bias (and fused GELU), LayerNorm
/// and its residual form, at odd sizes and at all-MiniLM-L6-v2 (384 → 1152
/// QKV, 384 → 1536 GELU, 1536 → 384) and BERT-base (768 → 3072) shapes,
/// against the CPU path on the same rounded inputs.
#[test]
fn encoder_ops_match_cpu_on_the_gpu() {
    use platypus::ops::layernorm;
    use platypus::ops::linear::{self, Activation};
    let Some(gpu) = gpu() else { return };
    let mut rng = Rng::new(23);
    // (tokens, in, out, activation)
    let all = [
        (3, 40, 24, Activation::Gelu),
        (2048, 384, 1152, Activation::Identity),
        (2048, 384, 1536, Activation::Gelu),
        (2048, 1536, 384, Activation::Identity),
        (4096, 768, 3072, Activation::Gelu),
    ];
    for dtype in [DType::BF16, DType::F16] {
        let tol = tolerance(dtype);
        for (tokens, d_in, d_out, act) in shapes(&all, 1) {
            let case = format!("{dtype} tokens {tokens} in {d_in} out {d_out} {act:?}");
            let vec =
                |n: usize, scale: f32, rng: &mut Rng| round_to(&rng.normal_vec(n, scale), dtype);
            let x = vec(tokens * d_in, 1.0, &mut rng);
            let w = vec(d_out * d_in, 1.0 / (d_in as f32).sqrt(), &mut rng);
            let b = vec(d_out, 1.0, &mut rng);
            let delta = vec(tokens * d_in, 1.0, &mut rng);
            let (gamma, beta) = (vec(d_in, 1.0, &mut rng), vec(d_in, 1.0, &mut rng));
            let run = |dev: &Device| {
                let t = |v: &[f32], s: &[usize]| Tensor::from_f32(v, s, dtype, dev).unwrap();
                let (xt, gt, bt) = (
                    t(&x, &[tokens, d_in]),
                    t(&gamma, &[d_in]),
                    t(&beta, &[d_in]),
                );
                let y = linear::forward(&xt, &t(&w, &[d_out, d_in]), Some(&t(&b, &[d_out])), act)
                    .unwrap();
                let normed = layernorm::forward(&xt, &gt, &bt, 1e-12).unwrap();
                let mut h = xt;
                layernorm::residual_forward(&mut h, &t(&delta, &[tokens, d_in]), &gt, &bt, 1e-12)
                    .unwrap();
                [y, normed, h].map(|v| v.to_f32_vec().unwrap())
            };
            let got = run(&gpu);
            let want = run(&Device::Cpu);
            for (i, what) in ["linear", "layernorm", "residual layernorm"]
                .iter()
                .enumerate()
            {
                check_close("encoder", &case, what, &got[i], &want[i], tol);
            }
        }
    }
}

/// The LM head fused with cross-entropy (fp32 logits in chunks), the head
/// GEMM alone and argmax over its logits, at a 7B head (hidden 4096, vocab 32000) and odd sizes,
/// against the CPU path on the same rounded h and W.
#[test]
fn head_matches_cpu_on_the_gpu() {
    use platypus::ops::cross_entropy::CrossEntropy;
    use platypus::ops::{cross_entropy, lora, sampling};
    let Some(gpu) = gpu() else { return };
    let mut rng = Rng::new(19);
    // (tokens, hidden, vocab)
    let all = [(5, 40, 264), (64, 4096, 32000)];
    for dtype in [DType::BF16, DType::F16] {
        for (tokens, hidden, vocab) in shapes(&all, 1) {
            let case = format!("{dtype} tokens {tokens} hidden {hidden} vocab {vocab}");
            let h = round_to(&rng.normal_vec(tokens * hidden, 1.0), dtype);
            let w = round_to(&rng.normal_vec(vocab * hidden, 0.02), dtype);
            let labels: Vec<i32> = (0..tokens)
                .map(|i| {
                    if i % 7 == 3 {
                        -100
                    } else {
                        (rng.next_u64() % vocab as u64) as i32
                    }
                })
                .collect();
            // The CPU path computes in f32, on the same (rounded) values.
            let run = |dev: &Device, dtype: DType| {
                let ht = Tensor::from_f32(&h, &[tokens, hidden], dtype, dev).unwrap();
                let wt = Tensor::from_f32(&w, &[vocab, hidden], dtype, dev).unwrap();
                let ce = cross_entropy::linear_cross_entropy(&ht, &wt, &labels).unwrap();
                // The head GEMM alone, logits in the storage type.
                let logits = lora::linear(&ht, &wt).unwrap();
                let ids = sampling::argmax(&logits).unwrap();
                (ce, logits.to_f32_vec().unwrap(), ids)
            };
            let (got, got_logits, got_ids) = run(&gpu, dtype);
            let (want, want_logits, _) = run(&Device::Cpu, DType::F32);
            assert_eq!(got.tokens, want.tokens, "{case}");
            // The fused head's fp32 logits: fp32 accumulation over `hidden`
            // products on both sides. The GEMM's own logits are rounded to
            // the storage type.
            let tol = (1e-5 * (hidden as f32).sqrt(), 1e-5);
            check_close(
                "head",
                &case,
                "logits",
                &got_logits,
                &want_logits,
                tolerance(dtype),
            );
            check_close("head", &case, "lse", &got.lse, &want.lse, tol);
            let mean = |c: &CrossEntropy| (c.loss_sum / c.tokens as f64) as f32;
            check_close("head", &case, "loss", &[mean(&got)], &[mean(&want)], tol);
            // argmax of the GPU's own logits, exactly.
            let want_ids: Vec<u32> = got_logits
                .chunks_exact(vocab)
                .map(platypus::cpu::sampling::argmax)
                .collect();
            assert_eq!(got_ids, want_ids, "{case}: argmax");
        }
    }
}

#[test]
fn tensor_copies_stay_exact_on_the_gpu() {
    let Some(gpu) = gpu() else { return };
    let values: Vec<f32> = (0..4099).map(|i| i as f32 * 0.5 - 7.0).collect();
    let src = Tensor::from_slice(&values, &[values.len()], &gpu).unwrap();
    let copy = src.to_device(&gpu).unwrap(); // device to device
    let mut again = Tensor::zeros(&[values.len()], DType::F32, &gpu).unwrap();
    again.copy_from(&copy).unwrap();
    assert_eq!(again.to_vec::<f32>().unwrap(), values);
}

#[test]
fn borrowed_cuda_slices_are_read_and_written_in_place() {
    // cudarc's own buffers: a real device only.
    if env_is("PLATYPUS_GPU_TEST_DEVICE", "emulated") || gpu().is_none() {
        return;
    }
    let ctx = cudarc::driver::CudaContext::new(0).unwrap();
    let stream = ctx.default_stream();
    let dev = Device::from_cuda_stream(stream.clone()).unwrap();
    let (rows, hidden) = (8, 256);
    let x: Vec<f32> = (0..rows * hidden).map(|i| (i % 13) as f32 - 6.0).collect();
    let w = vec![0.5f32; hidden];
    let x_buf = stream.clone_htod(&x).unwrap();
    let mut y_buf = stream.alloc_zeros::<f32>(x.len()).unwrap();
    let wt = Tensor::from_slice(&w, &[hidden], &dev).unwrap();
    Tensor::with_cuda_slice(&x_buf, &[rows, hidden], &dev, |xt| {
        Tensor::with_cuda_slice_mut(&mut y_buf, &[rows, hidden], &dev, |yt| {
            rmsnorm::forward_into(xt, &wt, yt, 1e-5)
        })
    })
    .unwrap();
    let got = stream.clone_dtoh(&y_buf).unwrap();
    let cpu = |v: &[f32], shape: &[usize]| Tensor::from_slice(v, shape, &Device::Cpu).unwrap();
    let want = rmsnorm::forward(&cpu(&x, &[rows, hidden]), &cpu(&w, &[hidden]), 1e-5)
        .unwrap()
        .to_vec::<f32>()
        .unwrap();
    check_close(
        "rmsnorm",
        "borrowed cudarc slices",
        "y",
        &got,
        &want,
        (1e-5, 1e-5),
    );
}

#[test]
fn model_shape_checks_hold_on_the_emulator() {
    // The row-sampled LoRA check, the row-by-row attention reference and the
    // cosine comparison with the CPU path, at small shapes on the emulator,
    // where the kernels match the full CPU reference: a wrong block offset,
    // dropout counter, gradient sum or list comparison in a check fails
    // here, not on the GPU.
    let dev = Device::Emulated;
    for rank in [16, 5] {
        let case = LoraCase {
            tokens: 96,
            in_features: 40,
            out_features: 48,
            rank,
            dtype: DType::BF16,
            cfg: LORA_CFG,
        };
        case.check_rows_against_cpu(&dev, 3, 16).unwrap();
    }
    // Reported apart from the kernels' GPU results.
    cosine_against_cpu_path(&dev, "emulator self-check", (20, 900, 300, 64));
    for (causal, q_heads, kv_heads) in [(true, 4, 2), (false, 2, 2)] {
        let case = AttnModelCase {
            batch: 2,
            seq: 70,
            q_heads,
            kv_heads,
            head_dim: 64,
            dtype: DType::BF16,
            causal,
        };
        case.check_against_reference(&dev, 4).unwrap();
    }
}

#[test]
fn model_shape_checks_fail_on_wrong_results() {
    // The checks compare something: wrong results fail them. Results of a
    // different seed's inputs stand in for a wrong kernel (the reference is
    // computed from the case's own inputs).
    let dev = Device::Emulated;
    let lora = LoraCase {
        tokens: 48,
        in_features: 16,
        out_features: 24,
        rank: 4,
        dtype: DType::BF16,
        cfg: LORA_CFG,
    };
    let no_dropout = LoraCase {
        cfg: LoraConfig {
            dropout: 0.0,
            ..LORA_CFG
        },
        ..lora.clone()
    };
    // Dropout changes y, dx, dA, dB: a check that ignored the mask would pass this.
    assert!(lora.check_rows_against_cpu(&dev, 3, 16).is_ok());
    let wrong = lora.check_rows_with(&dev, 3, 16, &no_dropout);
    assert!(
        wrong.is_err(),
        "a LoRA layer without dropout passed the dropout check"
    );
    let attn = AttnModelCase {
        batch: 1,
        seq: 40,
        q_heads: 2,
        kv_heads: 1,
        head_dim: 32,
        dtype: DType::BF16,
        causal: true,
    };
    let unmasked = AttnModelCase {
        causal: false,
        ..attn.clone()
    };
    assert!(attn.check_against_reference(&dev, 4).is_ok());
    assert!(
        attn.check_with(&dev, 4, &unmasked).is_err(),
        "unmasked attention passed the causal check"
    );
}
