//! The CUDA kernels, run on the host emulator, against the CPU references:
//! random shapes (one row, odd sizes, hidden sizes not a multiple of the
//! vector width), every float dtype, forward and backward.

mod common;

use common::attention::{AttnCase, AttnLayout};
use common::lora::LoraCase;
use common::{assert_close, round_to, tolerance, Rng, FLOAT_DTYPES};
use platypus::ops::attention;
use platypus::ops::lora::LoraConfig;
use platypus::ops::rmsnorm;
use platypus::ops::rope::{self, RopeConfig, RopeStyle};
use platypus::{DType, Device, Tensor};
use proptest::prelude::*;

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 48,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Hidden sizes: anything small, the vector-friendly Llama sizes, and odd ones.
fn hidden_size() -> impl Strategy<Value = usize> {
    prop_oneof![
        1usize..=40,
        Just(64),
        Just(130),
        Just(256),
        Just(1000),
        Just(4096),
        41usize..=700
    ]
}

fn dtype() -> impl Strategy<Value = DType> {
    prop::sample::select(FLOAT_DTYPES.to_vec())
}

/// x, w and dy for RMSNorm, rounded to `dtype`, on the CPU and the emulator.
fn rmsnorm_inputs(
    rows: usize,
    hidden: usize,
    dtype: DType,
    seed: u64,
) -> [(Vec<f32>, Vec<usize>); 3] {
    let mut rng = Rng::new(seed);
    let x = round_to(&rng.normal_vec(rows * hidden, 1.0), dtype);
    let w = round_to(
        &rng.normal_vec(hidden, 0.5)
            .iter()
            .map(|v| v + 1.0)
            .collect::<Vec<_>>(),
        dtype,
    );
    let dy = round_to(&rng.normal_vec(rows * hidden, 1.0), dtype);
    [
        (x, vec![rows, hidden]),
        (w, vec![hidden]),
        (dy, vec![rows, hidden]),
    ]
}

fn on(device: &Device, data: &(Vec<f32>, Vec<usize>), dtype: DType) -> Tensor {
    Tensor::from_f32(&data.0, &data.1, dtype, device).unwrap()
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn rmsnorm_forward_matches_cpu(rows in 1usize..=6, hidden in hidden_size(), dtype in dtype(), seed in any::<u64>()) {
        let inputs = rmsnorm_inputs(rows, hidden, dtype, seed);
        let run = |device: &Device| {
            let y = rmsnorm::forward(&on(device, &inputs[0], dtype), &on(device, &inputs[1], dtype), 1e-5).unwrap();
            y.to_f32_vec().unwrap()
        };
        let (atol, rtol) = tolerance(dtype);
        assert_close("y", &run(&Device::Emulated), &run(&Device::Cpu), atol, rtol);
    }

    #[test]
    fn rmsnorm_backward_matches_cpu(rows in 1usize..=6, hidden in hidden_size(), dtype in dtype(), want_dw in any::<bool>(), seed in any::<u64>()) {
        let inputs = rmsnorm_inputs(rows, hidden, dtype, seed);
        let run = |device: &Device| {
            let [x, w, dy] = [0, 1, 2].map(|i| on(device, &inputs[i], dtype));
            let g = rmsnorm::backward(&x, &w, &dy, 1e-5, want_dw).unwrap();
            (g.dx.to_f32_vec().unwrap(), g.dw.map(|dw| dw.to_f32_vec().unwrap()))
        };
        let (emu_dx, emu_dw) = run(&Device::Emulated);
        let (cpu_dx, cpu_dw) = run(&Device::Cpu);
        let (atol, rtol) = tolerance(dtype);
        assert_close("dx", &emu_dx, &cpu_dx, atol, rtol);
        prop_assert_eq!(emu_dw.is_some(), want_dw);
        if let (Some(e), Some(c)) = (emu_dw, cpu_dw) {
            // dw sums `rows` terms of size ~1.
            assert_close("dw", &e, &c, atol * rows as f32, rtol);
        }
    }

    #[test]
    fn rmsnorm_backward_dw_is_deterministic_over_many_rows(rows in 500usize..=1100, hidden in prop_oneof![Just(8usize), Just(37)], seed in any::<u64>()) {
        // More rows than the 512 partial sums: blocks walk several rows each.
        let inputs = rmsnorm_inputs(rows, hidden, DType::F32, seed);
        let dev = Device::Emulated;
        let run = || {
            let [x, w, dy] = [0, 1, 2].map(|i| on(&dev, &inputs[i], DType::F32));
            rmsnorm::backward(&x, &w, &dy, 1e-5, true).unwrap().dw.unwrap().to_vec::<f32>().unwrap()
        };
        let first = run();
        prop_assert_eq!(first.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), run().iter().map(|v| v.to_bits()).collect::<Vec<_>>());
        let [x, w, dy] = [0, 1, 2].map(|i| on(&Device::Cpu, &inputs[i], DType::F32));
        let cpu = rmsnorm::backward(&x, &w, &dy, 1e-5, true).unwrap().dw.unwrap().to_vec::<f32>().unwrap();
        assert_close("dw", &first, &cpu, 1e-4 * rows as f32, 1e-5);
    }

    #[test]
    fn rope_matches_cpu(
        batch in 1usize..=3,
        seq in 1usize..=7,
        q_heads in 1usize..=5,
        k_heads in 1usize..=3,
        head_dim in prop_oneof![Just(2usize), Just(6), Just(16), Just(64), Just(128), (1usize..=40).prop_map(|h| 2 * h)],
        dtype in dtype(),
        interleaved in any::<bool>(),
        inverse in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let mut rng = Rng::new(seed);
        let q = (round_to(&rng.normal_vec(batch * seq * q_heads * head_dim, 1.0), dtype), vec![batch, seq, q_heads, head_dim]);
        let k = (round_to(&rng.normal_vec(batch * seq * k_heads * head_dim, 1.0), dtype), vec![batch, seq, k_heads, head_dim]);
        // Offset sequences (packed batches restart at 0, others continue), up to Llama 2's 4096.
        let positions: Vec<i32> = (0..batch).flat_map(|_| {
            let start = (rng.next_u64() % 4000) as i32;
            (0..seq as i32).map(move |t| start + t)
        }).collect();
        let style = if interleaved { RopeStyle::Interleaved } else { RopeStyle::RotateHalf };
        let cfg = RopeConfig { theta: 10000.0, style };
        let run = |device: &Device| {
            let (mut qt, mut kt) = (on(device, &q, dtype), on(device, &k, dtype));
            let pos = Tensor::from_slice(&positions, &[batch, seq], device).unwrap();
            if inverse {
                rope::backward(&mut qt, &mut kt, &pos, &cfg).unwrap();
            } else {
                rope::forward(&mut qt, &mut kt, &pos, &cfg).unwrap();
            }
            (qt.to_f32_vec().unwrap(), kt.to_f32_vec().unwrap())
        };
        let (eq, ek) = run(&Device::Emulated);
        let (cq, ck) = run(&Device::Cpu);
        // Angles up to ~4000 rad: fp32 sincos and the product keep ~1e-6 relative.
        let (atol, rtol) = tolerance(dtype);
        assert_close("q", &eq, &cq, atol.max(2e-4), rtol);
        assert_close("k", &ek, &ck, atol.max(2e-4), rtol);
    }
}

/// From hidden 12,257 the backward's fp32 dw row (dynamic shared memory) and
/// its 128 bytes of static shared memory pass 48 KiB: the launch must opt in,
/// or the emulator refuses it as the driver would. 12,288 is a real model
/// width (GPT-3 175B).
#[test]
fn rmsnorm_backward_with_dw_runs_across_the_48_kib_boundary() {
    for (hidden, dtype) in [
        (12_256, DType::F32),
        (12_257, DType::F32),
        (12_288, DType::BF16),
    ] {
        let inputs = rmsnorm_inputs(2, hidden, dtype, hidden as u64);
        let run = |device: &Device| {
            let [x, w, dy] = [0, 1, 2].map(|i| on(device, &inputs[i], dtype));
            let g = rmsnorm::backward(&x, &w, &dy, 1e-5, true)
                .unwrap_or_else(|e| panic!("hidden {hidden}: {e}"));
            (
                g.dx.to_f32_vec().unwrap(),
                g.dw.unwrap().to_f32_vec().unwrap(),
            )
        };
        let ((emu_dx, emu_dw), (cpu_dx, cpu_dw)) = (run(&Device::Emulated), run(&Device::Cpu));
        let (atol, rtol) = tolerance(dtype);
        assert_close("dx", &emu_dx, &cpu_dx, atol, rtol);
        assert_close("dw", &emu_dw, &cpu_dw, 2.0 * atol, rtol);
    }
}

#[test]
fn rope_backward_undoes_forward_on_the_emulator() {
    let dev = Device::Emulated;
    let mut rng = Rng::new(7);
    let (b, t, h, kh, d) = (2, 5, 4, 2, 64);
    let q0 = rng.normal_vec(b * t * h * d, 1.0);
    let k0 = rng.normal_vec(b * t * kh * d, 1.0);
    let mut q = Tensor::from_f32(&q0, &[b, t, h, d], DType::F32, &dev).unwrap();
    let mut k = Tensor::from_f32(&k0, &[b, t, kh, d], DType::F32, &dev).unwrap();
    let pos = Tensor::from_slice(&[0, 1, 2, 3, 4, 100, 101, 102, 103, 104], &[b, t], &dev).unwrap();
    let cfg = RopeConfig::default();
    rope::forward(&mut q, &mut k, &pos, &cfg).unwrap();
    assert!(
        q.to_f32_vec()
            .unwrap()
            .iter()
            .zip(&q0)
            .any(|(a, b)| (a - b).abs() > 1e-3),
        "forward changed nothing"
    );
    rope::backward(&mut q, &mut k, &pos, &cfg).unwrap();
    assert_close("q", &q.to_f32_vec().unwrap(), &q0, 1e-5, 1e-5);
    assert_close("k", &k.to_f32_vec().unwrap(), &k0, 1e-5, 1e-5);
}

/// Sequence lengths around the 64-row tiles: 1, short odd ones, and lengths
/// just below, at and past one and two tiles.
fn attn_seq_len() -> impl Strategy<Value = usize> {
    prop_oneof![Just(1usize), 2usize..=20, 60usize..=70, 120usize..=140]
}

fn attn_layout() -> impl Strategy<Value = AttnLayout> {
    prop_oneof![
        (1usize..=2, attn_seq_len()).prop_map(|(batch, seq)| AttnLayout::Dense { batch, seq }),
        attn_seq_len().prop_flat_map(|seq| {
            prop::collection::vec(0..=seq as u32, 1..=3)
                .prop_map(move |lens| AttnLayout::Padded { seq, lens })
        }),
        prop::collection::vec(
            prop_oneof![Just(0u32), attn_seq_len().prop_map(|l| l as u32)],
            1..=3
        )
        .prop_filter("at least one token", |lens| lens.iter().any(|&l| l > 0))
        .prop_map(|lens| AttnLayout::packed(&lens)),
    ]
}

fn attention_config() -> ProptestConfig {
    common::proptest_config(64)
}

proptest! {
    #![proptest_config(attention_config())]

    #[test]
    fn attention_matches_cpu(
        layout in attn_layout(),
        kv_heads in 1usize..=2,
        group in 1usize..=3,
        head_dim in prop::sample::select(attention::HEAD_DIMS.to_vec()),
        dtype in prop::sample::select(vec![DType::F16, DType::BF16]),
        causal in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let case = AttnCase { layout, q_heads: kv_heads * group, kv_heads, head_dim, dtype, causal };
        if let Err(e) = case.check_against_cpu(&Device::Emulated, seed) {
            return Err(TestCaseError::fail(e));
        }
    }
}

#[test]
fn attention_long_sequences_match_cpu() {
    // Many key tiles per query tile, GQA 4:1 and a multi-query case.
    let cases = [
        (
            AttnLayout::Dense { batch: 1, seq: 600 },
            4,
            1,
            128,
            DType::BF16,
            true,
        ),
        (
            AttnLayout::packed(&[300, 1, 257]),
            4,
            2,
            64,
            DType::F16,
            false,
        ),
        (
            AttnLayout::Padded {
                seq: 520,
                lens: vec![517, 64],
            },
            2,
            1,
            32,
            DType::BF16,
            true,
        ),
    ];
    for (i, (layout, q_heads, kv_heads, head_dim, dtype, causal)) in cases.into_iter().enumerate() {
        let case = AttnCase {
            layout,
            q_heads,
            kv_heads,
            head_dim,
            dtype,
            causal,
        };
        if let Err(e) = case.check_against_cpu(&Device::Emulated, i as u64) {
            panic!("{case:?}: {e}");
        }
    }
}

proptest! {
    #![proptest_config(attention_config())]

    #[test]
    fn lora_matches_cpu(
        tokens in prop_oneof![Just(1usize), 2usize..=40, 120usize..=300],
        in_features in prop::sample::select(vec![8usize, 40, 136, 264]),
        out_features in prop::sample::select(vec![8usize, 48, 136, 264]),
        rank in prop_oneof![Just(1usize), Just(5), Just(16), Just(64), 1usize..=40],
        dtype in prop::sample::select(vec![DType::F16, DType::BF16]),
        dropout in prop::sample::select(vec![0.0f32, 0.05, 0.5]),
        rslora in any::<bool>(),
        alpha in 1.0f32..32.0,
        seed in any::<u64>(),
    ) {
        let cfg = LoraConfig { alpha, rslora, dropout, seed, offset: seed >> 7 };
        let case = LoraCase { tokens, in_features, out_features, rank, dtype, cfg };
        if let Err(e) = case.check_against_cpu(&Device::Emulated, seed) {
            return Err(TestCaseError::fail(e));
        }
    }
}

#[test]
fn lora_merge_then_unmerge_restores_w_and_merged_forward_matches() {
    use platypus::ops::lora::{self, LoraWeights};
    let dev = Device::Emulated;
    let (t, i, o, r) = (37, 136, 72, 16);
    let mut rng = Rng::new(5);
    for dtype in [DType::BF16, DType::F16] {
        let w0 = round_to(&rng.normal_vec(o * i, 0.1), dtype);
        let a = Tensor::from_slice(&rng.normal_vec(r * i, 0.1), &[r, i], &dev).unwrap();
        let b = Tensor::from_slice(&rng.normal_vec(o * r, 0.1), &[o, r], &dev).unwrap();
        let x = Tensor::from_f32(
            &round_to(&rng.normal_vec(t * i, 1.0), dtype),
            &[t, i],
            dtype,
            &dev,
        )
        .unwrap();
        let cfg = LoraConfig {
            dropout: 0.0,
            ..LoraConfig::default()
        };
        let scale = cfg.scale(r);
        let mut w = Tensor::from_f32(&w0, &[o, i], dtype, &dev).unwrap();
        let lora_y = lora::forward(
            &x,
            LoraWeights {
                w: &w,
                a: &a,
                b: &b,
            },
            &cfg,
        )
        .unwrap()
        .y
        .to_f32_vec()
        .unwrap();
        lora::merge(&mut w, &a, &b, scale).unwrap();
        // The merged weight with a zero adapter: the plain x Wᵀ of the merged layer.
        let zero_b = Tensor::zeros(&[o, r], DType::F32, &dev).unwrap();
        let merged_y = lora::forward(
            &x,
            LoraWeights {
                w: &w,
                a: &a,
                b: &zero_b,
            },
            &cfg,
        )
        .unwrap()
        .y
        .to_f32_vec()
        .unwrap();
        let unit = common::rounding_unit(dtype);
        let err = common::relative_max_error(&merged_y, &lora_y);
        assert!(
            err <= 4.0 * unit,
            "{dtype}: merged forward off by {err} of its scale"
        );
        let merged = w.to_f32_vec().unwrap();
        lora::unmerge(&mut w, &a, &b, scale).unwrap();
        // Each step rounds once: back within one unit in the last place of the
        // larger of the original and the merged element.
        let mantissa = if dtype == DType::BF16 {
            1.0 / 128.0
        } else {
            1.0 / 1024.0
        };
        let restored = w.to_f32_vec().unwrap();
        for (k, ((&got, &want), &m)) in restored.iter().zip(&w0).zip(&merged).enumerate() {
            let ulp = want.abs().max(m.abs()).max(1e-4).log2().floor().exp2() * mantissa;
            assert!(
                (got - want).abs() <= ulp,
                "{dtype}: w[{k}] = {got} after merge+unmerge, was {want} (merged {m}, ulp {ulp})"
            );
        }
        assert!(
            merged.iter().zip(&w0).any(|(m, w)| m != w),
            "merge changed nothing"
        );
    }
}

#[test]
fn lora_base_layer_and_unfused_sequence_match_cpu() {
    use platypus::ops::lora::{self, LoraWeights};
    let dev = Device::Emulated;
    let (t, i, o, r) = (70, 264, 136, 16);
    let mut rng = Rng::new(9);
    for dtype in [DType::BF16, DType::F16] {
        let unit = common::rounding_unit(dtype);
        let x = round_to(&rng.normal_vec(t * i, 1.0), dtype);
        let w = round_to(&rng.normal_vec(o * i, 0.1), dtype);
        let dy = round_to(&rng.normal_vec(t * o, 1.0), dtype);
        let a = round_to(&rng.normal_vec(r * i, 0.1), dtype);
        let b = round_to(&rng.normal_vec(o * r, 0.1), dtype);
        let cfg = LoraConfig {
            dropout: 0.1,
            seed: 3,
            ..LoraConfig::default()
        };
        let run = |dev: &Device, dtype: DType| {
            let xt = Tensor::from_f32(&x, &[t, i], dtype, dev).unwrap();
            let wt = Tensor::from_f32(&w, &[o, i], dtype, dev).unwrap();
            let dyt = Tensor::from_f32(&dy, &[t, o], dtype, dev).unwrap();
            let at = Tensor::from_slice(&a, &[r, i], dev).unwrap();
            let bt = Tensor::from_slice(&b, &[o, r], dev).unwrap();
            let weights = LoraWeights {
                w: &wt,
                a: &at,
                b: &bt,
            };
            [
                lora::linear(&xt, &wt).unwrap(),
                lora::linear_backward(&dyt, &wt).unwrap(),
                lora::forward_unfused(&xt, weights, &cfg).unwrap().y,
            ]
            .map(|t| t.to_f32_vec().unwrap())
        };
        let got = run(&dev, dtype);
        let want = run(&Device::Cpu, DType::F32);
        let names = ["linear", "linear_backward", "forward_unfused"];
        if let Err(e) = common::check_results(&names, &got, &want, |_| 4.0 * unit) {
            panic!("{dtype}: {e}");
        }
    }
}
