//! The kernels on a real GPU against the CPU references. Skipped, with the
//! reason printed, when no CUDA device can be used; PLATYPUS_REQUIRE_GPU=1
//! turns the skip into a failure.

mod common;

use common::{assert_close, round_to, tolerance, Rng, FLOAT_DTYPES};
use platypus::ops::rmsnorm;
use platypus::ops::rope::{self, RopeConfig, RopeStyle};
use platypus::{DType, Device, Tensor};

fn gpu() -> Option<Device> {
    match Device::cuda(0) {
        Ok(d) => Some(d),
        Err(e) if std::env::var("PLATYPUS_REQUIRE_GPU").is_ok_and(|v| v == "1") => {
            panic!("PLATYPUS_REQUIRE_GPU=1 but no CUDA device: {e}")
        }
        Err(e) => {
            eprintln!("SKIPPED: GPU test: {e}");
            None
        }
    }
}

#[test]
fn kernels_match_cpu_on_the_gpu() {
    let Some(gpu) = gpu() else { return };
    let mut rng = Rng::new(11);
    for dtype in FLOAT_DTYPES {
        let (atol, rtol) = tolerance(dtype);
        for (rows, hidden) in [(1, 1), (7, 130), (64, 4096), (3, 5120)] {
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
            assert_close("y", &gy, &cy, atol, rtol);
            assert_close("dx", &gdx, &cdx, atol, rtol);
            assert_close("dw", &gdw, &cdw, atol * rows as f32, rtol);
        }
        for style in [RopeStyle::RotateHalf, RopeStyle::Interleaved] {
            let (b, t, h, kh, d) = (2, 33, 8, 2, 128);
            let q = round_to(&rng.normal_vec(b * t * h * d, 1.0), dtype);
            let k = round_to(&rng.normal_vec(b * t * kh * d, 1.0), dtype);
            let positions: Vec<i32> = (0..(b * t) as i32).map(|i| i * 37 % 4096).collect();
            let run = |dev: &Device| {
                let mut qt = Tensor::from_f32(&q, &[b, t, h, d], dtype, dev).unwrap();
                let mut kt = Tensor::from_f32(&k, &[b, t, kh, d], dtype, dev).unwrap();
                let pos = Tensor::from_slice(&positions, &[b, t], dev).unwrap();
                rope::forward(
                    &mut qt,
                    &mut kt,
                    &pos,
                    &RopeConfig {
                        theta: 10000.0,
                        style,
                    },
                )
                .unwrap();
                (qt.to_f32_vec().unwrap(), kt.to_f32_vec().unwrap())
            };
            let (gq, gk) = run(&gpu);
            let (cq, ck) = run(&Device::Cpu);
            assert_close("q", &gq, &cq, atol.max(2e-4), rtol);
            assert_close("k", &gk, &ck, atol.max(2e-4), rtol);
        }
    }
}

#[test]
fn attention_matches_cpu_on_the_gpu() {
    use common::attention::{AttnCase, AttnLayout};
    let Some(gpu) = gpu() else { return };
    let layouts = [
        AttnLayout::Dense {
            batch: 2,
            seq: 1000,
        },
        AttnLayout::Padded {
            seq: 300,
            lens: vec![300, 0, 129],
        },
        AttnLayout::packed(&[1, 64, 0, 517]),
    ];
    for (i, layout) in layouts.into_iter().enumerate() {
        for head_dim in platypus::ops::attention::HEAD_DIMS {
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
                if let Err(e) = case.check_against_cpu(&gpu, i as u64) {
                    panic!("{case:?}: {e}");
                }
            }
        }
    }
}

#[test]
fn lora_matches_cpu_on_the_gpu() {
    use common::lora::LoraCase;
    use platypus::ops::lora::LoraConfig;
    let Some(gpu) = gpu() else { return };
    // Llama-like widths (not multiples of the 128-wide tiles), Platypus' r 16 and dropout 0.05, and r 64.
    for (tokens, in_features, out_features, rank) in [
        (257, 1024, 2816, 16),
        (1000, 520, 1032, 64),
        (1, 4096, 8, 1),
    ] {
        for dtype in [DType::BF16, DType::F16] {
            let cfg = LoraConfig {
                alpha: 16.0,
                rslora: false,
                dropout: 0.05,
                seed: 7,
                offset: 3,
            };
            let case = LoraCase {
                tokens,
                in_features,
                out_features,
                rank,
                dtype,
                cfg,
            };
            if let Err(e) = case.check_against_cpu(&gpu, tokens as u64) {
                panic!("{case:?}: {e}");
            }
        }
    }
}

#[test]
fn cosine_search_matches_the_emulator_on_the_gpu() {
    // The same kernels on the GPU and on the emulator: identical lists (the
    // GPU's mma may sum in another order, so scores within 1e-5 and any
    // index difference only between near-equal scores), streamed == resident
    // bit for bit, and the threshold pairs alike.
    use platypus::ops::cosine_topk::{self, Exclude};
    let Some(gpu) = gpu() else { return };
    let mut rng = Rng::new(21);
    let (m, n, dim, k) = (300, 5000, 384, 10);
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
                streamed.indices.to_vec::<u32>().unwrap(),
                top.indices.to_vec::<u32>().unwrap()
            );
            let pairs = cosine_topk::above_threshold_self(&dbt, 0.2, 1 << 20, Exclude::NotEarlier)
                .unwrap()
                .len();
            (
                top.scores.to_vec::<f32>().unwrap(),
                top.indices.to_vec::<u32>().unwrap(),
                pairs,
            )
        };
        let (gs, gi, gp) = run(&gpu);
        let (es, ei, ep) = run(&Device::Emulated);
        assert_close("scores", &gs, &es, 1e-5, 0.0);
        for (slot, (a, b)) in gi.iter().zip(&ei).enumerate() {
            assert!(
                a == b || (gs[slot] - es[slot]).abs() <= 1e-5,
                "{dtype} slot {slot}: {a} vs {b}"
            );
        }
        assert!(
            gp.abs_diff(ep) <= n / 100,
            "{dtype}: {gp} vs {ep} pairs above 0.2"
        );
    }
}
