//! The CUDA kernels, run on the host emulator, against the CPU references:
//! random shapes (one row, odd sizes, hidden sizes not a multiple of the
//! vector width), every float dtype, forward and backward. `PROPTEST_CASES`
//! sets the case count of the attention, LoRA, elementwise (embedding,
//! SwiGLU, add + RMSNorm), cross-entropy, sampling and optimizer
//! properties; `PLATYPUS_MEASURE=1` prints the errors the tolerances of the
//! head's gradient and AdamW were set from.

mod common;

use common::attention::{AttnCase, AttnLayout, CachedCase};
use common::lora::LoraCase;
use common::{assert_close, round_to, tolerance, Rng, FLOAT_DTYPES};
use platypus::cpu;
use platypus::ops::attention;
use platypus::ops::lora::LoraConfig;
use platypus::ops::rope::{self, RopeConfig, RopeStyle};
use platypus::ops::{embedding, swiglu};
use platypus::ops::{layernorm, linear, rmsnorm};
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

/// New queries per sequence of a cached-attention case: decoding (1), short
/// prefills, and counts around the forward's 64- and 128-row query tiles.
fn cached_new() -> impl Strategy<Value = usize> {
    prop_oneof![
        Just(1usize),
        Just(3),
        Just(17),
        Just(64 + 5),
        1usize..=8,
        60usize..=70,
        125usize..=131
    ]
}

proptest! {
    #![proptest_config(attention_config())]

    #[test]
    fn cached_attention_matches_cpu(
        batch in 1usize..=2,
        new in cached_new(),
        // Keys before the new ones: none, within the first 64-key tile, across several.
        earlier in prop_oneof![Just(0usize), 1usize..=70, 120usize..=200],
        // Cache rows past kv_len (garbage the kernel must not read).
        spare in prop_oneof![Just(0usize), 1usize..=70],
        kv_heads in 1usize..=2,
        group in prop::sample::select(vec![1usize, 2, 4]),
        head_dim in prop::sample::select(attention::HEAD_DIMS.to_vec()),
        dtype in prop::sample::select(vec![DType::F16, DType::BF16]),
        causal in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let kv_len = new + earlier;
        let case = CachedCase {
            batch, new, kv_len, capacity: kv_len + spare,
            q_heads: kv_heads * group, kv_heads, head_dim, dtype, causal,
        };
        if let Err(e) = case.check_against_cpu(&Device::Emulated, seed) {
            return Err(TestCaseError::fail(format!("{case:?}: {e}")));
        }
    }
}

#[test]
fn cached_attention_decode_and_prefill_shapes_match_cpu() {
    // (batch, new, kv_len, capacity, q heads, kv heads, head dim, dtype, causal):
    // Llama-like decode steps (one query, the cache from one row to many
    // key tiles), a 64 + 5 prefill after a prompt, a prefill into an empty
    // cache, and the test fixtures' head dim 16.
    let cases = [
        (2, 1, 1, 9, 4, 4, 128, DType::BF16, true),
        (1, 1, 64, 64, 8, 2, 128, DType::F16, true),
        (1, 1, 65, 96, 8, 2, 64, DType::BF16, true),
        (2, 1, 300, 333, 4, 1, 128, DType::BF16, true),
        (1, 64 + 5, 200, 256, 4, 2, 128, DType::F16, true),
        (2, 69, 69, 100, 2, 1, 32, DType::BF16, true),
        (1, 130, 400, 401, 4, 4, 16, DType::BF16, true),
        (2, 5, 77, 80, 4, 2, 16, DType::F16, false),
    ];
    for (i, (batch, new, kv_len, capacity, q_heads, kv_heads, head_dim, dtype, causal)) in
        cases.into_iter().enumerate()
    {
        let case = CachedCase {
            batch,
            new,
            kv_len,
            capacity,
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

#[test]
fn cached_attention_on_the_cpu_matches_the_reference() {
    // f32: the host code; f16/bf16: the reference itself, through the op.
    for (i, dtype) in FLOAT_DTYPES.into_iter().enumerate() {
        let case = CachedCase {
            batch: 2,
            new: 3,
            kv_len: 70,
            capacity: 75,
            q_heads: 4,
            kv_heads: 2,
            head_dim: 24,
            dtype,
            causal: i != 1,
        };
        if let Err(e) = case.check_against_cpu(&Device::Cpu, i as u64) {
            panic!("{case:?}: {e}");
        }
    }
}

/// With the whole cache holding exactly the queries' own keys, cached
/// attention is self-attention: the same kernel with the same tiles, so o
/// and lse are bit-identical to [`attention::forward`] on a dense batch.
#[test]
fn cached_attention_of_a_full_cache_is_bit_identical_to_self_attention() {
    let dev = Device::Emulated;
    let mut rng = Rng::new(11);
    for (b, t, h, kvh, d, dtype) in [
        (2, 70, 4, 2, 64, DType::BF16),
        (1, 131, 2, 2, 128, DType::F16),
        (2, 33, 4, 1, 16, DType::BF16),
    ] {
        let mut gen = |heads: usize| {
            Tensor::from_f32(
                &rng.normal_vec(b * t * heads * d, 1.0),
                &[b, t, heads, d],
                dtype,
                &dev,
            )
            .unwrap()
        };
        let (q, k, v) = (gen(h), gen(kvh), gen(kvh));
        for causal in [false, true] {
            let cfg = attention::AttentionConfig {
                causal,
                scale: None,
            };
            let dense = attention::forward(&q, &k, &v, attention::Batch::Dense, &cfg).unwrap();
            let cached = attention::forward_cached(&q, &k, &v, t, &cfg).unwrap();
            for (name, x, y) in [("o", &dense.o, &cached.o), ("lse", &dense.lse, &cached.lse)] {
                assert_eq!(
                    x.to_bytes().unwrap(),
                    y.to_bytes().unwrap(),
                    "{name} at batch {b}, seq {t}, head dim {d}, causal {causal}"
                );
            }
        }
    }
}

proptest! {
    #![proptest_config(config())]

    /// The cache write kernel (16-, 4- or 2-byte units as the rows allow)
    /// against the host copy, byte for byte.
    #[test]
    fn write_cache_matches_cpu(
        batch in 1usize..=3,
        new in 1usize..=6,
        start in 0usize..=9,
        spare in 0usize..=4,
        kv_heads in 1usize..=3,
        head_dim in prop_oneof![1usize..=20, Just(64), Just(128)],
        dtype in dtype(),
        seed in any::<u64>(),
    ) {
        let capacity = start + new + spare;
        let mut rng = Rng::new(seed);
        let cache = rng.normal_vec(batch * capacity * kv_heads * head_dim, 1.0);
        let fresh = rng.normal_vec(batch * new * kv_heads * head_dim, 1.0);
        let run = |dev: &Device| {
            let mut c = Tensor::from_f32(&cache, &[batch, capacity, kv_heads, head_dim], dtype, dev).unwrap();
            let n = Tensor::from_f32(&fresh, &[batch, new, kv_heads, head_dim], dtype, dev).unwrap();
            attention::write_cache(&mut c, &n, start).unwrap();
            c.to_bytes().unwrap()
        };
        prop_assert_eq!(run(&Device::Emulated), run(&Device::Cpu));
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

proptest! {
    #![proptest_config(common::proptest_config(24))]

    /// y = act(x Wᵀ + b) on the emulated kernel (f16, bf16) and on the CPU
    /// (the host GEMM for f32, the reference for the rest) against the f64
    /// reference: within one rounding of the output on the kernel (fp32
    /// accumulation, bias and GELU on the accumulators, one rounding), over
    /// token counts and widths that cross the 128 x 128 tiles, any out, with
    /// and without a bias.
    #[test]
    fn linear_matches_cpu(
        tokens in prop_oneof![1usize..=20, 120usize..=140],
        in8 in 1usize..=40,
        out in prop_oneof![1usize..=40, 120usize..=260],
        has_bias in any::<bool>(),
        gelu in any::<bool>(),
        dtype in dtype(),
        seed in any::<u64>(),
    ) {
        let d_in = in8 * 8;
        let mut rng = Rng::new(seed);
        let x = round_to(&rng.normal_vec(tokens * d_in, 1.0), dtype);
        let w = round_to(&rng.normal_vec(out * d_in, 1.0 / (d_in as f32).sqrt()), dtype);
        let b = round_to(&rng.normal_vec(out, 1.0), dtype);
        let act = if gelu { linear::Activation::Gelu } else { linear::Activation::Identity };
        let bias = has_bias.then_some(b.as_slice());
        let want = cpu::linear::forward(&x, &w, bias, d_in, act);
        let devices = if dtype == DType::F32 { vec![Device::Cpu] } else { vec![Device::Emulated, Device::Cpu] };
        for device in devices {
            let t = |v: &[f32], shape: &[usize]| Tensor::from_f32(v, shape, dtype, &device).unwrap();
            let bt = t(&b, &[out]);
            let y = linear::forward(&t(&x, &[tokens, d_in]), &t(&w, &[out, d_in]), has_bias.then_some(&bt), act).unwrap();
            prop_assert_eq!(y.shape(), &[tokens, out][..]);
            prop_assert_eq!(y.dtype(), dtype);
            let allowed = if dtype == DType::F32 { 1e-5 } else { common::rounding_unit(dtype) };
            let err = common::relative_max_error(&y.to_f32_vec().unwrap(), &want);
            prop_assert!(err <= allowed, "{} on {}: max error {} of the scale, allowed {}", dtype, device, err, allowed);
        }
    }
}

fn elementwise_config() -> ProptestConfig {
    common::proptest_config(48)
}

/// Bit patterns, so NaN-free results compare exactly.
fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

proptest! {
    #![proptest_config(elementwise_config())]

    /// A gather moves values exactly: same dtypes copy the bits, other pairs
    /// widen exactly or round once, as the reference rounded to `out_dtype` does.
    #[test]
    fn embedding_matches_cpu(
        tokens in 1usize..=6,
        vocab in 1usize..=9,
        hidden in hidden_size(),
        table_dtype in dtype(),
        out_dtype in dtype(),
        seed in any::<u64>(),
    ) {
        let mut rng = Rng::new(seed);
        let table = round_to(&rng.normal_vec(vocab * hidden, 1.0), table_dtype);
        let ids: Vec<u32> = (0..tokens).map(|_| (rng.next_u64() % vocab as u64) as u32).collect();
        let want = round_to(&cpu::embedding::forward(&table, hidden, &ids), out_dtype);
        for device in [Device::Emulated, Device::Cpu] {
            let t = Tensor::from_f32(&table, &[vocab, hidden], table_dtype, &device).unwrap();
            let out = embedding::forward(&t, &ids, out_dtype).unwrap();
            prop_assert_eq!(out.shape(), &[tokens, hidden][..]);
            prop_assert_eq!(out.dtype(), out_dtype);
            prop_assert_eq!(bits(&out.to_f32_vec().unwrap()), bits(&want), "{}", device);
        }
    }

    #[test]
    fn swiglu_forward_matches_cpu(rows in 1usize..=6, hidden in hidden_size(), dtype in dtype(), seed in any::<u64>()) {
        let mut rng = Rng::new(seed);
        let n = rows * hidden;
        let gate = round_to(&rng.normal_vec(n, 2.0), dtype);
        let up = round_to(&rng.normal_vec(n, 1.0), dtype);
        let want = cpu::swiglu::forward(&gate, &up);
        let (atol, rtol) = tolerance(dtype);
        for device in [Device::Emulated, Device::Cpu] {
            let t = |v: &[f32]| Tensor::from_f32(v, &[rows, hidden], dtype, &device).unwrap();
            let m = swiglu::forward(&t(&gate), &t(&up)).unwrap();
            prop_assert_eq!(m.dtype(), dtype);
            assert_close(&format!("m on {device}"), &m.to_f32_vec().unwrap(), &want, atol, rtol);
        }
    }

    #[test]
    fn swiglu_backward_matches_cpu(rows in 1usize..=6, hidden in hidden_size(), dtype in dtype(), seed in any::<u64>()) {
        let mut rng = Rng::new(seed);
        let n = rows * hidden;
        let gate = round_to(&rng.normal_vec(n, 2.0), dtype);
        let up = round_to(&rng.normal_vec(n, 1.0), dtype);
        let dm = round_to(&rng.normal_vec(n, 1.0), dtype);
        let (want_dgate, want_dup) = cpu::swiglu::backward(&gate, &up, &dm);
        let (atol, rtol) = tolerance(dtype);
        for device in [Device::Emulated, Device::Cpu] {
            let t = |v: &[f32]| Tensor::from_f32(v, &[rows, hidden], dtype, &device).unwrap();
            let g = swiglu::backward(&t(&gate), &t(&up), &t(&dm)).unwrap();
            assert_close(&format!("dgate on {device}"), &g.dgate.to_f32_vec().unwrap(), &want_dgate, atol, rtol);
            assert_close(&format!("dup on {device}"), &g.dup.to_f32_vec().unwrap(), &want_dup, atol, rtol);
        }
    }

    /// LayerNorm and its residual form in place, on rows with a large mean
    /// (3 ± 1: where E[x²] − mean² would cancel), against the f64 reference;
    /// on the emulator the residual form equals forward of the rounded sum
    /// bit for bit.
    #[test]
    fn layernorm_forward_matches_cpu(rows in 1usize..=6, hidden in hidden_size(), dtype in dtype(), seed in any::<u64>()) {
        let mut rng = Rng::new(seed);
        let n = rows * hidden;
        let x = round_to(&rng.normal_vec(n, 1.0).iter().map(|v| v + 3.0).collect::<Vec<_>>(), dtype);
        let delta = round_to(&rng.normal_vec(n, 1.0), dtype);
        let w = round_to(&rng.normal_vec(hidden, 0.5).iter().map(|v| v + 1.0).collect::<Vec<_>>(), dtype);
        let b = round_to(&rng.normal_vec(hidden, 0.5), dtype);
        let want_y = cpu::layernorm::forward(&x, None, &w, &b, hidden, 1e-12, dtype);
        let want_h = cpu::layernorm::forward(&x, Some(&delta), &w, &b, hidden, 1e-12, dtype);
        let (atol, rtol) = tolerance(dtype);
        for device in [Device::Emulated, Device::Cpu] {
            let t = |v: &[f32], shape: &[usize]| Tensor::from_f32(v, shape, dtype, &device).unwrap();
            let (xt, dt, wt, bt) = (t(&x, &[rows, hidden]), t(&delta, &[rows, hidden]), t(&w, &[hidden]), t(&b, &[hidden]));
            let y = layernorm::forward(&xt, &wt, &bt, 1e-12).unwrap();
            prop_assert_eq!(y.dtype(), dtype);
            assert_close(&format!("y on {device}"), &y.to_f32_vec().unwrap(), &want_y, atol, rtol);
            let mut h = t(&x, &[rows, hidden]);
            layernorm::residual_forward(&mut h, &dt, &wt, &bt, 1e-12).unwrap();
            assert_close(&format!("h on {device}"), &h.to_f32_vec().unwrap(), &want_h, atol, rtol);
            if let Device::Emulated = device {
                let sum: Vec<f32> = x.iter().zip(&delta).map(|(a, d)| dtype.round(a + d)).collect();
                let norm = layernorm::forward(&t(&sum, &[rows, hidden]), &wt, &bt, 1e-12).unwrap();
                prop_assert_eq!(bits(&h.to_f32_vec().unwrap()), bits(&norm.to_f32_vec().unwrap()));
            }
        }
    }

    /// h is updated exactly as the reference rounds it; y matches the
    /// reference and, on the emulator, equals rmsnorm::forward of the new h
    /// bit for bit (the same reduction order).
    #[test]
    fn rmsnorm_add_forward_matches_cpu(rows in 1usize..=6, hidden in hidden_size(), dtype in dtype(), seed in any::<u64>()) {
        let inputs = rmsnorm_inputs(rows, hidden, dtype, seed);
        let (h0, w, delta) = (&inputs[0].0, &inputs[1].0, &inputs[2].0);
        let (want_h, want_y) = cpu::rmsnorm::add_forward(h0, delta, w, hidden, 1e-5, dtype);
        let (atol, rtol) = tolerance(dtype);
        for device in [Device::Emulated, Device::Cpu] {
            let [mut h, w, delta] = [0, 1, 2].map(|i| on(&device, &inputs[i], dtype));
            let y = rmsnorm::add_forward(&mut h, &delta, &w, 1e-5).unwrap();
            prop_assert_eq!(h.dtype(), dtype);
            prop_assert_eq!(bits(&h.to_f32_vec().unwrap()), bits(&want_h), "h on {}", device);
            assert_close(&format!("y on {device}"), &y.to_f32_vec().unwrap(), &want_y, atol, rtol);
            if let Device::Emulated = device {
                let norm = rmsnorm::forward(&h, &w, 1e-5).unwrap();
                prop_assert_eq!(bits(&y.to_f32_vec().unwrap()), bits(&norm.to_f32_vec().unwrap()));
            }
        }
    }
}

/// The Llama-7B row width on several rows, every dtype: the vector paths at
/// full width (two 16-byte accesses per thread for 16-bit types).
#[test]
fn elementwise_ops_at_llama_width_match_cpu() {
    let (rows, hidden) = (3, 4096);
    for dtype in FLOAT_DTYPES {
        let inputs = rmsnorm_inputs(rows, hidden, dtype, 11);
        let (atol, rtol) = tolerance(dtype);
        let dev = Device::Emulated;
        let [mut h, w, delta] = [0, 1, 2].map(|i| on(&dev, &inputs[i], dtype));
        let y = rmsnorm::add_forward(&mut h, &delta, &w, 1e-5).unwrap();
        let (want_h, want_y) = cpu::rmsnorm::add_forward(
            &inputs[0].0,
            &inputs[2].0,
            &inputs[1].0,
            hidden,
            1e-5,
            dtype,
        );
        assert_eq!(bits(&h.to_f32_vec().unwrap()), bits(&want_h), "{dtype}");
        assert_close("y", &y.to_f32_vec().unwrap(), &want_y, atol, rtol);

        let m = swiglu::forward(&delta, &h).unwrap();
        let want = cpu::swiglu::forward(&inputs[2].0, &want_h);
        assert_close("m", &m.to_f32_vec().unwrap(), &want, atol, rtol);

        let table = on(&dev, &inputs[0], dtype);
        let ids = [2u32, 0, 0, 1];
        let out = embedding::forward(&table, &ids, DType::F32).unwrap();
        assert_eq!(
            bits(&out.to_f32_vec().unwrap()),
            bits(&cpu::embedding::forward(&inputs[0].0, hidden, &ids)),
            "{dtype}"
        );
    }
}

/// No ids: an empty [0, hidden] output on every device, no launch.
#[test]
fn embedding_of_no_ids_is_empty() {
    for dev in [Device::Cpu, Device::Emulated] {
        let table = Tensor::zeros(&[4, 24], DType::BF16, &dev).unwrap();
        let out = embedding::forward(&table, &[], DType::BF16).unwrap();
        assert_eq!(out.shape(), &[0, 24]);
    }
}

// ---- the LM head fused with cross-entropy, and the row kernel alone ----------------------------

/// Labels for `rows` tokens of a `vocab`-token head: mostly real ids, about
/// a fifth ignored (−100), or all ignored.
fn ce_labels(rng: &mut Rng, rows: usize, vocab: usize, all_ignored: bool) -> Vec<i32> {
    (0..rows)
        .map(|_| {
            if all_ignored || rng.next_u64() % 5 == 0 {
                -100
            } else {
                (rng.next_u64() % vocab as u64) as i32
            }
        })
        .collect()
}

/// Checks a cross-entropy result against the reference's (sum, count, lse)
/// row by row. `logit_err[r]` bounds how far the kernel's fp32 logits of
/// row r may be from the exact ones (0 for given logits); on top of it the
/// row's fp32 softmax is allowed (vocab + 64) rounding units of its sum of
/// exponentials and 4 units in the last place of lse and of the label's
/// logit (so the loss). Both sides see the same rounded inputs, so nothing
/// here is bf16 or f16 rounding: only fp32 accumulation.
fn check_ce(
    got: &platypus::ops::cross_entropy::CrossEntropy,
    want: &(f64, usize, Vec<f32>),
    labels: &[i32],
    logit_err: &[f64],
    vocab: usize,
) -> Result<(), TestCaseError> {
    let (sum, count, lse) = want;
    prop_assert_eq!(got.tokens, *count);
    prop_assert_eq!(got.lse.len(), lse.len());
    let unit = f64::from(f32::EPSILON) / 2.0;
    let mut sum_tol = 0.0;
    for (r, ((&g, &w), &label)) in got.lse.iter().zip(lse).zip(labels).enumerate() {
        let tol =
            logit_err[r] + (vocab as f64 + 64.0) * unit + 8.0 * unit * f64::from(w.abs().max(1.0));
        prop_assert!(
            (f64::from(g) - f64::from(w)).abs() <= tol,
            "lse[{}] = {}, want {} (tolerance {:e})",
            r,
            g,
            w,
            tol
        );
        if label >= 0 {
            sum_tol += 2.0 * tol;
        }
    }
    prop_assert!(
        (got.loss_sum - sum).abs() <= sum_tol + 1e-12,
        "loss_sum {} vs {} (tolerance {:e})",
        got.loss_sum,
        sum,
        sum_tol
    );
    Ok(())
}

/// max over the vocabulary of Σ_k |h_k w_vk| per row: the scale of a
/// logit's fp32 accumulation error.
fn abs_product_bound(h: &[f32], w: &[f32], hidden: usize) -> Vec<f64> {
    h.chunks_exact(hidden)
        .map(|row| {
            w.chunks_exact(hidden)
                .map(|wr| {
                    row.iter()
                        .zip(wr)
                        .map(|(&a, &b)| f64::from((a * b).abs()))
                        .sum::<f64>()
                })
                .fold(0.0, f64::max)
        })
        .collect()
}

fn ce_config() -> ProptestConfig {
    common::proptest_config(32)
}

proptest! {
    #![proptest_config(ce_config())]

    /// The fused head (GEMM into fp32 logits chunks, then the row kernel)
    /// against the f64 reference on the same rounded h and W: vocabularies
    /// that are no multiple of anything, ignored labels, all-ignored
    /// batches, 1 to 5 chunks.
    #[test]
    fn linear_cross_entropy_matches_cpu(
        tokens in prop_oneof![Just(1usize), 2usize..=40, 100usize..=200],
        hidden in prop::sample::select(vec![8usize, 16, 40, 64, 136]),
        vocab in prop_oneof![1usize..=20, 21usize..=400, Just(128), Just(259)],
        chunks in 1usize..=5,
        dtype in prop::sample::select(vec![DType::F16, DType::BF16]),
        all_ignored in prop::bool::weighted(0.1),
        seed in any::<u64>(),
    ) {
        use platypus::ops::cross_entropy;
        let mut rng = Rng::new(seed);
        let h = round_to(&rng.normal_vec(tokens * hidden, 1.0), dtype);
        let w = round_to(&rng.normal_vec(vocab * hidden, 0.5), dtype);
        let labels = ce_labels(&mut rng, tokens, vocab, all_ignored);
        let dev = Device::Emulated;
        let ht = Tensor::from_f32(&h, &[tokens, hidden], dtype, &dev).unwrap();
        let wt = Tensor::from_f32(&w, &[vocab, hidden], dtype, &dev).unwrap();
        // Chunks of ceil(tokens / chunks) rows of the 4-aligned fp32 logits.
        let chunk_tokens = tokens.div_ceil(chunks);
        let budget = chunk_tokens * 4 * vocab.div_ceil(4) * 4;
        let got = cross_entropy::linear_cross_entropy_chunked(&ht, &wt, &labels, budget).unwrap();
        let want = platypus::cpu::cross_entropy::linear_cross_entropy(&h, &w, &labels, hidden);
        // fp32 accumulation of `hidden` exact products (a 16-bit product fits fp32).
        let unit = f64::from(f32::EPSILON) / 2.0;
        let logit_err: Vec<f64> = abs_product_bound(&h, &w, hidden)
            .iter()
            .map(|s| 2.0 * hidden as f64 * unit * s)
            .collect();
        check_ce(&got, &want, &labels, &logit_err, vocab)?;
    }

    /// The row kernel alone on given logits, every float dtype, vocabularies
    /// on and off the 16-byte vector width.
    #[test]
    fn cross_entropy_forward_logits_matches_cpu(
        rows in 1usize..=6,
        vocab in prop_oneof![1usize..=40, Just(64), Just(1000), Just(4096), Just(32000), 41usize..=700],
        dtype in dtype(),
        scale in prop::sample::select(vec![0.1f32, 1.0, 8.0]),
        all_ignored in prop::bool::weighted(0.1),
        seed in any::<u64>(),
    ) {
        use platypus::ops::cross_entropy;
        let mut rng = Rng::new(seed);
        let z = round_to(&rng.normal_vec(rows * vocab, scale), dtype);
        let labels = ce_labels(&mut rng, rows, vocab, all_ignored);
        let zt = Tensor::from_f32(&z, &[rows, vocab], dtype, &Device::Emulated).unwrap();
        let got = cross_entropy::forward_logits(&zt, &labels).unwrap();
        let want = platypus::cpu::cross_entropy::from_logits(&z, &labels, vocab);
        check_ce(&got, &want, &labels, &vec![0.0; rows], vocab)?;
    }
}

/// The chunking changes nothing: every row is computed the same way in any
/// chunk, so 1, 3 and 37 chunks and the default budget agree bit for bit;
/// and the result is the reference's.
#[test]
fn linear_cross_entropy_is_independent_of_the_chunking() {
    use platypus::ops::cross_entropy;
    let (tokens, hidden, vocab, dtype) = (150, 64, 301, DType::BF16);
    let mut rng = Rng::new(11);
    let h = round_to(&rng.normal_vec(tokens * hidden, 1.0), dtype);
    let w = round_to(&rng.normal_vec(vocab * hidden, 0.5), dtype);
    let labels = ce_labels(&mut rng, tokens, vocab, false);
    let dev = Device::Emulated;
    let ht = Tensor::from_f32(&h, &[tokens, hidden], dtype, &dev).unwrap();
    let wt = Tensor::from_f32(&w, &[vocab, hidden], dtype, &dev).unwrap();
    let row_bytes = 4 * vocab.div_ceil(4) * 4;
    let whole = cross_entropy::linear_cross_entropy(&ht, &wt, &labels).unwrap();
    for chunk_tokens in [tokens, 50, 4, 1] {
        let got = cross_entropy::linear_cross_entropy_chunked(
            &ht,
            &wt,
            &labels,
            chunk_tokens * row_bytes,
        )
        .unwrap();
        assert_eq!(
            got.loss_sum.to_bits(),
            whole.loss_sum.to_bits(),
            "{chunk_tokens} per chunk"
        );
        assert_eq!(
            got.lse.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            whole.lse.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            "{chunk_tokens} per chunk"
        );
    }
    let want = platypus::cpu::cross_entropy::linear_cross_entropy(&h, &w, &labels, hidden);
    assert!(
        (whole.loss_sum - want.0).abs() < 1e-5 * want.0.abs(),
        "{} vs {}",
        whole.loss_sum,
        want.0
    );
    // Every row ignored: nothing counted, lse still there.
    let none = vec![-100; tokens];
    let got = cross_entropy::linear_cross_entropy(&ht, &wt, &none).unwrap();
    assert_eq!((got.tokens, got.loss_sum), (0, 0.0));
    assert_eq!(got.lse, whole.lse);
}

/// One unit of fp32 rounding, 2⁻²⁴.
const F32_UNIT: f64 = f32::EPSILON as f64 / 2.0;

/// Prints one case's measured error when `PLATYPUS_MEASURE` is set (how
/// the figures in the tolerance comments were taken).
fn measured(line: &str) {
    if std::env::var_os("PLATYPUS_MEASURE").is_some() {
        eprintln!("measured {line}");
    }
}

// ---- the fused head's gradient ------------------------------------------------------------------

/// The scales dh's error is measured against, for every element (t, k),
/// from the exact (f64) softmax p of the reference's logits and dlogits
/// g_tv = scale · (p_tv − [v = label_t]) (0 for ignored tokens):
/// - `rounding`: Σ_v |g_tv| · |w_vk|. Rounding each dlogit by a relative δ
///   (to the GEMM's 16-bit input) moves dh_tk by at most δ times this.
/// - `logits`: Σ_v |scale| · p_tv · |w_vk| · e_t, with e_t a bound on the
///   error of the computed z_tv − lse_t: twice `logit_err[t]` (the fp32
///   logits), the lse's fp32 sum of exponentials ((vocab + 64) units of
///   2⁻²⁴, as `check_ce` allows) and 8 units of |lse| and of exp. An error
///   e in z − lse moves p by p · e: when p_label is near 1 that is far more
///   than its |g| ≈ 1 − p_label, so `rounding` alone cannot bound it.
struct GradScales {
    rounding: Vec<f64>,
    logits: Vec<f64>,
}

/// [`GradScales`] of dh for the reference's inputs and `logit_err` ([`ce_logit_err`]).
fn ce_grad_scales(
    h: &[f32],
    w: &[f32],
    labels: &[i32],
    hidden: usize,
    scale: f32,
    logit_err: &[f64],
) -> GradScales {
    let unit = f64::from(f32::EPSILON) / 2.0;
    let vocab = w.len() / hidden;
    let mut rounding = vec![0.0f64; h.len()];
    let mut logits = vec![0.0f64; h.len()];
    for (t, (row, &label)) in h.chunks_exact(hidden).zip(labels).enumerate() {
        if label < 0 {
            continue;
        }
        let z: Vec<f64> = w
            .chunks_exact(hidden)
            .map(|wr| {
                row.iter()
                    .zip(wr)
                    .map(|(&a, &b)| f64::from(a) * f64::from(b))
                    .sum()
            })
            .collect();
        let max = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let sum: f64 = z.iter().map(|v| (v - max).exp()).sum();
        let lse = max + sum.ln();
        let e = 2.0 * logit_err[t] + (vocab as f64 + 64.0) * unit + 8.0 * unit * lse.abs().max(1.0);
        let at = t * hidden..(t + 1) * hidden;
        for (v, (zv, wr)) in z.iter().zip(w.chunks_exact(hidden)).enumerate() {
            let p = (zv - max).exp() / sum;
            let onehot = if v == label as usize { 1.0 } else { 0.0 };
            let g = (f64::from(scale) * (p - onehot)).abs();
            let pe = f64::from(scale.abs()) * p * e;
            for ((r, l), &wv) in rounding[at.clone()]
                .iter_mut()
                .zip(&mut logits[at.clone()])
                .zip(wr)
            {
                let wv = f64::from(wv.abs());
                *r += g * wv;
                *l += pe * wv;
            }
        }
    }
    GradScales { rounding, logits }
}

/// Checks dh against the reference's element by element: |got − want| ≤
/// rel · (rounding_tk + |want_tk|) + logits_tk + abs · (Σ_v |w_vk| + 1)
/// (`abs`: f16's subnormal spacing, for dlogits and dh below 2⁻¹⁴). Ignored
/// tokens' rows must be exactly 0. Returns the largest error as a fraction
/// of its tolerance (the measured figure).
#[allow(clippy::too_many_arguments)]
fn check_dh(
    got: &[f32],
    want: &[f32],
    scales: &GradScales,
    w: &[f32],
    labels: &[i32],
    hidden: usize,
    rel: f64,
    abs: f64,
) -> Result<f64, TestCaseError> {
    prop_assert_eq!(got.len(), want.len());
    let w_sums: Vec<f64> = (0..hidden)
        .map(|k| {
            w.chunks_exact(hidden)
                .map(|wr| f64::from(wr[k].abs()))
                .sum()
        })
        .collect();
    let mut worst = 0.0f64;
    for (i, (&g, &x)) in got.iter().zip(want).enumerate() {
        let (t, k) = (i / hidden, i % hidden);
        if labels[t] < 0 {
            prop_assert!(g == 0.0, "dh[{}, {}] = {} for an ignored token", t, k, g);
            continue;
        }
        let err = (f64::from(g) - f64::from(x)).abs();
        let tol = rel * (scales.rounding[i] + f64::from(x.abs()))
            + scales.logits[i]
            + abs * (w_sums[k] + 1.0);
        prop_assert!(
            err <= tol,
            "dh[{}, {}] = {}, want {} (error {:e}, tolerance {:e})",
            t,
            k,
            g,
            x,
            err,
            tol
        );
        if tol > 0.0 {
            worst = worst.max(err / tol);
        }
    }
    Ok(worst)
}

/// The bound on row t's fp32 logits error the head's checks use: `hidden`
/// exact 16-bit products (or f32 ones, each rounded once) summed in fp32.
fn ce_logit_err(h: &[f32], w: &[f32], hidden: usize) -> Vec<f64> {
    let unit = f64::from(f32::EPSILON) / 2.0;
    abs_product_bound(h, w, hidden)
        .iter()
        .map(|s| 2.0 * hidden as f64 * unit * s)
        .collect()
}

/// The chunk budget that cuts `tokens` into `chunks` chunks of the
/// gradient's fp32 logits (rows 8-aligned: ld = vocab rounded up to 8).
fn grad_budget(tokens: usize, vocab: usize, chunks: usize) -> usize {
    tokens.div_ceil(chunks) * 4 * vocab.next_multiple_of(8)
}

proptest! {
    #![proptest_config(ce_config())]

    /// The fused head with its gradient (GEMM into fp32 logits chunks, the
    /// row kernel, the dlogits kernel, the nn GEMM back through the head)
    /// against the f64 reference on the same rounded h and W: vocabularies
    /// on and off the 8-wide dlogits rows (261: the padded head), ignored
    /// and all-ignored labels, 1 to 5 chunks, scales of the summed loss.
    /// The loss is the forward op's bit for bit, and the reference's as in
    /// `linear_cross_entropy_matches_cpu`.
    ///
    /// dh is allowed its error bound ([`check_dh`]): rounding dlogits and dh
    /// to h's dtype (u = 2⁻⁸ bf16, 2⁻¹¹ f16, of Σ_v |dlogit_v| |w_vk| and of
    /// |dh|), the GEMM's fp32 sum over the vocabulary ((ld + 2) · 2⁻²⁴ of
    /// the same), the fp32 logits and lse moving the softmax
    /// ([`GradScales::logits`]), and f16's subnormal spacing. Measured
    /// (`PROPTEST_CASES=600 PLATYPUS_MEASURE=1`, two runs, 1200 cases): the
    /// largest error used 0.85 of its bound (bf16; f16 0.80), so the bound
    /// is nearly reached and nothing looser is needed.
    #[test]
    fn linear_cross_entropy_grad_matches_cpu(
        tokens in prop_oneof![Just(1usize), 2usize..=40, 100usize..=200],
        hidden in prop::sample::select(vec![8usize, 16, 40, 64, 136]),
        vocab in prop_oneof![1usize..=20, 21usize..=400, Just(128), Just(261)],
        chunks in 1usize..=5,
        dtype in prop::sample::select(vec![DType::F16, DType::BF16]),
        scale in prop::sample::select(vec![1.0f32, 1.0 / 64.0, -3.0]),
        all_ignored in prop::bool::weighted(0.1),
        seed in any::<u64>(),
    ) {
        use platypus::ops::cross_entropy;
        let mut rng = Rng::new(seed);
        let h = round_to(&rng.normal_vec(tokens * hidden, 1.0), dtype);
        let w = round_to(&rng.normal_vec(vocab * hidden, 0.5), dtype);
        let labels = ce_labels(&mut rng, tokens, vocab, all_ignored);
        let dev = Device::Emulated;
        let ht = Tensor::from_f32(&h, &[tokens, hidden], dtype, &dev).unwrap();
        let wt = Tensor::from_f32(&w, &[vocab, hidden], dtype, &dev).unwrap();
        let budget = grad_budget(tokens, vocab, chunks);
        let (ce, dh) =
            cross_entropy::linear_cross_entropy_grad_chunked(&ht, &wt, &labels, scale, budget).unwrap();
        prop_assert_eq!(dh.shape(), &[tokens, hidden][..]);
        prop_assert_eq!(dh.dtype(), dtype);
        let fwd = cross_entropy::linear_cross_entropy_chunked(&ht, &wt, &labels, budget).unwrap();
        prop_assert_eq!(ce.loss_sum.to_bits(), fwd.loss_sum.to_bits());
        prop_assert_eq!(bits(&ce.lse), bits(&fwd.lse));
        let want = platypus::cpu::cross_entropy::linear_cross_entropy(&h, &w, &labels, hidden);
        let logit_err = ce_logit_err(&h, &w, hidden);
        check_ce(&ce, &want, &labels, &logit_err, vocab)?;
        let want_dh = cpu::cross_entropy::linear_cross_entropy_grad(&h, &w, &labels, hidden, scale);
        let scales = ce_grad_scales(&h, &w, &labels, hidden, scale, &logit_err);
        // dlogits and dh rounded to dtype, the GEMM's fp32 sum over the 8-aligned vocabulary.
        let rel = f64::from(common::rounding_unit(dtype)) + (vocab.next_multiple_of(8) + 2) as f64 * F32_UNIT;
        let abs = if dtype == DType::F16 { (-25f64).exp2() } else { 0.0 };
        let worst = check_dh(&dh.to_f32_vec().unwrap(), &want_dh, &scales, &w, &labels, hidden, rel, abs)?;
        measured(&format!("ce grad {dtype}: dh {worst:.3} of its tolerance"));
    }

    /// Device::Cpu's f32 host path (blocks of fp32 logits, dlogits in place,
    /// matmul_nn back through the head; W in f32 or bf16) against the same
    /// reference, any hidden size. Its only error is fp32 arithmetic, and it
    /// is allowed [`check_dh`]'s bound with u = 2⁻²⁴: logits summed over
    /// hidden, dlogits and dh rounded once, dh summed over the vocabulary
    /// ((vocab + 2) · 2⁻²⁴ ≤ 2.4e-5 of Σ_v |dlogit_v| |w_vk| + |dh| at
    /// vocab 400). Measured (`PROPTEST_CASES=1000 PLATYPUS_MEASURE=1`): the
    /// largest error used 0.10 of it (W in bf16; 0.06 in f32).
    #[test]
    fn linear_cross_entropy_grad_on_the_cpu_matches_the_reference(
        tokens in prop_oneof![Just(1usize), 2usize..=40, 100usize..=200],
        hidden in prop_oneof![1usize..=40, Just(64), Just(136)],
        vocab in prop_oneof![1usize..=20, 21usize..=400, Just(261)],
        w_dtype in prop::sample::select(vec![DType::F32, DType::BF16]),
        scale in prop::sample::select(vec![1.0f32, 1.0 / 64.0, -3.0]),
        all_ignored in prop::bool::weighted(0.1),
        seed in any::<u64>(),
    ) {
        use platypus::ops::cross_entropy;
        let mut rng = Rng::new(seed);
        let h = rng.normal_vec(tokens * hidden, 1.0);
        let w = round_to(&rng.normal_vec(vocab * hidden, 0.5), w_dtype);
        let labels = ce_labels(&mut rng, tokens, vocab, all_ignored);
        let dev = Device::Cpu;
        let ht = Tensor::from_f32(&h, &[tokens, hidden], DType::F32, &dev).unwrap();
        let wt = Tensor::from_f32(&w, &[vocab, hidden], w_dtype, &dev).unwrap();
        let (ce, dh) = cross_entropy::linear_cross_entropy_grad(&ht, &wt, &labels, scale).unwrap();
        prop_assert_eq!(dh.dtype(), DType::F32);
        let want = platypus::cpu::cross_entropy::linear_cross_entropy(&h, &w, &labels, hidden);
        let logit_err = ce_logit_err(&h, &w, hidden);
        check_ce(&ce, &want, &labels, &logit_err, vocab)?;
        let want_dh = cpu::cross_entropy::linear_cross_entropy_grad(&h, &w, &labels, hidden, scale);
        let scales = ce_grad_scales(&h, &w, &labels, hidden, scale, &logit_err);
        // dlogits and dh in f32, matmul_nn's fp32 sum over the vocabulary.
        let rel = (vocab + 2) as f64 * F32_UNIT;
        let worst = check_dh(&dh.to_vec::<f32>().unwrap(), &want_dh, &scales, &w, &labels, hidden, rel, 0.0)?;
        measured(&format!("ce grad cpu {w_dtype}: dh {worst:.3} of its tolerance"));
    }
}

/// The gradient does not depend on the chunking either: at vocab 261 (a
/// padded head), 150 tokens in chunks of 75, 22 and 5 rows give the loss,
/// lse and dh of the default budget (one 128-row tile and 22 rows) bit for
/// bit; all-ignored labels give a zero dh. On the CPU, tokens over two of
/// the host's 32 MiB logits blocks (vocab 32,000: 262 rows a block) match
/// the reference.
#[test]
fn linear_cross_entropy_grad_is_independent_of_the_chunking() {
    use platypus::ops::cross_entropy;
    let (tokens, hidden, vocab, scale) = (150, 64, 261, 1.0 / 150.0);
    for dtype in [DType::BF16, DType::F16] {
        let mut rng = Rng::new(12);
        let h = round_to(&rng.normal_vec(tokens * hidden, 1.0), dtype);
        let w = round_to(&rng.normal_vec(vocab * hidden, 0.5), dtype);
        let labels = ce_labels(&mut rng, tokens, vocab, false);
        let dev = Device::Emulated;
        let ht = Tensor::from_f32(&h, &[tokens, hidden], dtype, &dev).unwrap();
        let wt = Tensor::from_f32(&w, &[vocab, hidden], dtype, &dev).unwrap();
        let (whole, whole_dh) =
            cross_entropy::linear_cross_entropy_grad(&ht, &wt, &labels, scale).unwrap();
        let whole_dh = whole_dh.to_bytes().unwrap();
        for chunks in [2, 7, 37] {
            let budget = grad_budget(tokens, vocab, chunks);
            let (ce, dh) =
                cross_entropy::linear_cross_entropy_grad_chunked(&ht, &wt, &labels, scale, budget)
                    .unwrap();
            assert_eq!(ce, whole, "{dtype}, {chunks} chunks");
            assert!(
                dh.to_bytes().unwrap() == whole_dh,
                "{dtype}, {chunks} chunks: dh differs"
            );
        }
        let want = cpu::cross_entropy::linear_cross_entropy_grad(&h, &w, &labels, hidden, scale);
        let got = Tensor::from_bytes(&whole_dh, &[tokens, hidden], dtype, &Device::Cpu)
            .unwrap()
            .to_f32_vec()
            .unwrap();
        // Measured: 0.89 units of bf16's rounding, 0.85 of f16's (of dh's
        // largest element: dlogits and dh each rounded once); allowed 2.
        let err = common::relative_max_error(&got, &want);
        measured(&format!("chunking {dtype}: dh {err:e} of its scale"));
        assert!(
            err <= 2.0 * common::rounding_unit(dtype),
            "{dtype}: dh off by {err} of its scale"
        );
        let none = vec![-100; tokens];
        let (ce, dh) = cross_entropy::linear_cross_entropy_grad(&ht, &wt, &none, scale).unwrap();
        assert_eq!((ce.tokens, ce.loss_sum, &ce.lse), (0, 0.0, &whole.lse));
        assert!(dh.to_f32_vec().unwrap().iter().all(|&v| v == 0.0));
    }
    // The host path over two blocks of logits.
    let (tokens, hidden, vocab) = (300, 8, 32000);
    let mut rng = Rng::new(13);
    let h = rng.normal_vec(tokens * hidden, 1.0);
    let w = rng.normal_vec(vocab * hidden, 0.5);
    let labels = ce_labels(&mut rng, tokens, vocab, false);
    let ht = Tensor::from_f32(&h, &[tokens, hidden], DType::F32, &Device::Cpu).unwrap();
    let wt = Tensor::from_f32(&w, &[vocab, hidden], DType::F32, &Device::Cpu).unwrap();
    let (ce, dh) = cross_entropy::linear_cross_entropy_grad(&ht, &wt, &labels, 0.5).unwrap();
    let want = cpu::cross_entropy::linear_cross_entropy_grad(&h, &w, &labels, hidden, 0.5);
    // Measured: dh within 9.5e-7 of its largest element, the loss within
    // 4.2e-10 relative; allowed 4e-6 and 1e-8.
    let err = common::relative_max_error(&dh.to_vec::<f32>().unwrap(), &want);
    measured(&format!("two host blocks: dh {err:e} of its scale"));
    assert!(err <= 4e-6, "dh off by {err} of its scale");
    let (sum, count, _) = cpu::cross_entropy::linear_cross_entropy(&h, &w, &labels, hidden);
    assert_eq!(ce.tokens, count);
    let loss_err = (ce.loss_sum - sum).abs() / sum.abs();
    measured(&format!("two host blocks: loss {loss_err:e} relative"));
    assert!(loss_err <= 1e-8, "{} vs {sum}", ce.loss_sum);
}

// ---- greedy argmax and top-p sampling ----------------------------------------------------------

/// Vocabulary sizes for the sampling kernels: tiny, odd, on the vector
/// width, and several tiles of the block.
fn vocab_size() -> impl Strategy<Value = usize> {
    prop_oneof![
        1usize..=40,
        Just(64),
        Just(1000),
        Just(4096),
        41usize..=700,
        Just(5003)
    ]
}

proptest! {
    #![proptest_config(common::proptest_config(48))]

    /// argmax is exact: the same id as the reference on every row, with
    /// ties (16-bit rounding makes many; repeated maxima are added), ±0,
    /// −inf and, in some rows, NaN.
    #[test]
    fn argmax_matches_cpu(rows in 1usize..=5, vocab in vocab_size(), dtype in dtype(), seed in any::<u64>()) {
        let mut rng = Rng::new(seed);
        let mut z = round_to(&rng.normal_vec(rows * vocab, 2.0), dtype);
        for row in z.chunks_exact_mut(vocab) {
            let n = row.len();
            let pick = |rng: &mut Rng| (rng.next_u64() % n as u64) as usize;
            match rng.next_u64() % 6 {
                0 => {
                    // The maximum repeated at later and earlier places.
                    let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    for _ in 0..3 {
                        let i = pick(&mut rng);
                        row[i] = m;
                    }
                }
                1 => {
                    let i = pick(&mut rng);
                    row[i] = f32::NAN;
                    let i = pick(&mut rng);
                    row[i] = f32::NAN;
                }
                2 => row.fill(f32::NEG_INFINITY),
                3 => {
                    // Only zeros of both signs.
                    for (i, v) in row.iter_mut().enumerate() {
                        *v = if (i * 7 + n) % 3 == 0 { -0.0 } else { 0.0 };
                    }
                }
                4 => {
                    let i = pick(&mut rng);
                    row[i] = f32::INFINITY;
                }
                _ => {}
            }
        }
        let got = platypus::ops::sampling::argmax(&Tensor::from_f32(&z, &[rows, vocab], dtype, &Device::Emulated).unwrap()).unwrap();
        let want: Vec<u32> = z.chunks_exact(vocab).map(platypus::cpu::sampling::argmax).collect();
        prop_assert_eq!(got, want);
    }
}

/// How close the reference's decisions for (row, top_p, u) come to a
/// boundary that fp32 sums could put on the other side: top_p · Σ w near
/// the mass at or above some weight, the first weight left out within
/// rounding of the threshold, or u · (kept mass) near a running sum.
/// True when the kernel and the reference may then disagree.
fn near_a_boundary(n: &platypus::cpu::sampling::Nucleus, top_p: f32, u: f64) -> bool {
    const EPS: f64 = 1e-5;
    if top_p < 1.0 {
        let target = f64::from(top_p) * n.total;
        let mut sorted: Vec<f64> = n.weights.iter().copied().filter(|&w| w > 0.0).collect();
        sorted.sort_by(|a, b| b.total_cmp(a));
        let mut mass = 0.0;
        for (i, &w) in sorted.iter().enumerate() {
            mass += w;
            let group_ends = sorted.get(i + 1) != Some(&w);
            if group_ends && (mass - target).abs() <= EPS * n.total {
                return true;
            }
        }
        let left_out = sorted.iter().copied().find(|&w| w < n.threshold);
        if left_out.is_some_and(|w| w >= n.threshold * (1.0 - EPS)) {
            return true;
        }
    }
    let target = u * n.kept_mass;
    let mut cum = 0.0;
    for (i, &w) in n.weights.iter().enumerate() {
        if n.keeps(i) {
            cum += w;
            if (cum - target).abs() <= EPS * n.kept_mass {
                return true;
            }
        }
    }
    false
}

/// The kernel draws the reference's token on every row but those whose u
/// or nucleus boundary sits within rounding of a cumulative-sum boundary;
/// those are skipped and counted, and must be rare. Rows of every dtype,
/// flat and peaked distributions, temperatures 0.3..2, top_p from 0.05 to 1.
#[test]
fn sample_matches_cpu_except_at_rounding_boundaries() {
    let mut rng = Rng::new(2024);
    let (mut compared, mut skipped) = (0usize, 0usize);
    let vocabs = [1usize, 2, 7, 33, 100, 257, 1000, 2048, 3001];
    let top_ps = [1.0f32, 0.95, 0.9, 0.7, 0.5, 0.2, 0.05];
    for case in 0..126 {
        let dtype = FLOAT_DTYPES[case % 3];
        let vocab = vocabs[case % vocabs.len()];
        let top_p = top_ps[case % top_ps.len()];
        let rows = 1 + case % 3;
        let scale = [0.5f32, 2.0, 6.0][case % 5 % 3];
        let temperature = 0.3 + 1.7 * (rng.uniform() + 1.0) / 2.0;
        let mut z = round_to(&rng.normal_vec(rows * vocab, scale), dtype);
        if case % 4 == 0 {
            // Masked tokens (−inf) are never drawn.
            for i in (0..z.len()).step_by(3) {
                if i % vocab != 0 {
                    z[i] = f32::NEG_INFINITY;
                }
            }
        }
        let uniforms: Vec<f64> = (0..rows)
            .map(|_| (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64)
            .collect();
        let t = Tensor::from_f32(&z, &[rows, vocab], dtype, &Device::Emulated).unwrap();
        let got = platypus::ops::sampling::sample(&t, temperature, top_p, &uniforms)
            .unwrap_or_else(|e| panic!("case {case}: {e}"));
        for (r, (row, &u)) in z.chunks_exact(vocab).zip(&uniforms).enumerate() {
            let n = platypus::cpu::sampling::Nucleus::new(row, temperature, top_p).unwrap();
            assert!(
                n.keeps(got[r] as usize),
                "case {case} row {r}: {} is outside the nucleus",
                got[r]
            );
            if near_a_boundary(&n, top_p, u) {
                skipped += 1;
                continue;
            }
            compared += 1;
            assert_eq!(
                got[r],
                n.pick(u),
                "case {case} row {r}: vocab {vocab} {dtype} T {temperature} top_p {top_p} u {u}"
            );
        }
    }
    eprintln!(
        "sampling: {compared} rows identical to the reference, {skipped} skipped at a boundary"
    );
    assert!(
        skipped * 20 <= compared + skipped,
        "{skipped} of {} rows within rounding of a boundary",
        compared + skipped
    );
}

/// Deterministic: the same draws give the same ids, run after run; and the
/// CPU op gives the reference's.
#[test]
fn sample_is_deterministic_and_cpu_runs_the_reference() {
    let (rows, vocab) = (3, 777);
    let mut rng = Rng::new(3);
    let z = rng.normal_vec(rows * vocab, 3.0);
    let uniforms = [0.1, 0.5, 0.999];
    for dev in [Device::Emulated, Device::Cpu] {
        let t = Tensor::from_f32(&z, &[rows, vocab], DType::F32, &dev).unwrap();
        let a = platypus::ops::sampling::sample(&t, 0.8, 0.9, &uniforms).unwrap();
        assert_eq!(
            a,
            platypus::ops::sampling::sample(&t, 0.8, 0.9, &uniforms).unwrap()
        );
        if let Device::Cpu = dev {
            let want: Vec<u32> = z
                .chunks_exact(vocab)
                .zip(uniforms)
                .map(|(row, u)| platypus::cpu::sampling::sample(row, 0.8, 0.9, u).unwrap())
                .collect();
            assert_eq!(a, want);
        }
    }
}

// ---- AdamW, the gradient norm, accumulation and add_assign ---------------------------------------

/// Sizes of a set of trainable tensors: empty, a few elements (off the
/// 4-wide vectors), about a thousand, and past one 65,536-element chunk
/// (several blocks of one tensor).
fn adamw_sizes() -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(
        prop_oneof![
            1 => Just(0usize),
            3 => 1usize..=9,
            3 => 1000usize..=1100,
            1 => 65_530usize..=65_542,
            1 => 131_000usize..=140_000,
        ],
        1..=5,
    )
}

/// Largest |got − want| / (|want| + floor) over `got`, asserting it is at
/// most `rtol` (element i's floor: `floor[i]`); the measured figure.
fn check_rel(
    what: &str,
    got: &[f32],
    want: &[f32],
    floor: impl Fn(usize) -> f64,
    rtol: f64,
) -> Result<f64, TestCaseError> {
    prop_assert_eq!(got.len(), want.len(), "{}", what);
    let mut worst = 0.0f64;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let diff = (f64::from(g) - f64::from(w)).abs();
        let err = if diff == 0.0 {
            0.0
        } else {
            diff / (f64::from(w.abs()) + floor(i))
        };
        prop_assert!(
            err <= rtol,
            "{}[{}] = {}, want {} ({:e} relative, allowed {:e})",
            what,
            i,
            g,
            w,
            err,
            rtol
        );
        worst = worst.max(err);
    }
    Ok(worst)
}

proptest! {
    #![proptest_config(common::proptest_config(24))]

    /// Several AdamW steps over a random set of tensors (one launch for
    /// all, a chunk table of ≤ 65,536-element blocks) on the emulator and on
    /// Device::Cpu (rayon), each against torch's update in f64
    /// (cpu::adamw::step) carried along with its own f32 state; with and
    /// without clipping by the global norm (which is checked against the
    /// reference too), weight decay 0 to 0.1. Before the steps, gradients
    /// accumulated over two micro-batches equal the f32 sums exactly.
    ///
    /// Both sides round p, m and v to f32 every step and carry their own
    /// state, so the fp32 update's few units of 2⁻²⁴ per step add up: p's
    /// error is measured against |p| + t · lr (t updates of about lr each),
    /// m's against |m| + Σ_steps |clip · g| (m cancels, its rounding does
    /// not), v's against |v| (a sum of squares). Measured
    /// (`PROPTEST_CASES=500 PLATYPUS_MEASURE=1`, up to 4 steps, both
    /// devices): p 4.7e-7, m 2.1e-8, v 4.6e-7; allowed 1e-6 (8 units of
    /// 2⁻²⁴; with lr alone as p's floor 4 steps reached 1.04e-6). The norm
    /// (the emulator's fp32 partial sums per chunk, the CPU's f64) within
    /// 4.9e-8 relative; allowed 1e-6.
    #[test]
    fn adamw_step_matches_the_reference(
        sizes in adamw_sizes(),
        steps in 1u64..=4,
        lr in prop::sample::select(vec![1e-3f32, 2e-4, 0.05]),
        weight_decay in prop::sample::select(vec![0.0f32, 0.01, 0.1]),
        max_norm in prop::sample::select(vec![0.0f64, 0.5, 1e3]),
        seed in any::<u64>(),
    ) {
        use platypus::ops::adamw::{self, AdamW, State};
        let cfg = AdamW { weight_decay, ..AdamW::default() };
        let mut rng = Rng::new(seed);
        let init: Vec<Vec<f32>> = sizes.iter().map(|&n| rng.normal_vec(n, 0.1)).collect();
        // Gradients of every step, each summed from two micro-batches.
        let micro: Vec<Vec<[Vec<f32>; 2]>> = (0..steps)
            .map(|_| sizes.iter().map(|&n| [rng.normal_vec(n, 0.01), rng.normal_vec(n, 0.01)]).collect())
            .collect();
        let mut worst = [0.0f64; 4];
        for dev in [Device::Emulated, Device::Cpu] {
            let tensor = |v: &[f32]| Tensor::from_slice(v, &[v.len()], &dev).unwrap();
            let mut params: Vec<Tensor> = init.iter().map(|v| tensor(v)).collect();
            let mut state = State::new(&params.iter().collect::<Vec<_>>()).unwrap();
            let mut want_p = init.clone();
            let mut want_m: Vec<Vec<f32>> = sizes.iter().map(|&n| vec![0.0; n]).collect();
            let mut want_v = want_m.clone();
            // Σ over the steps so far of |clip · g|, element by element: the
            // scale of m's rounding errors, which the moments carry on.
            let mut g_sum: Vec<Vec<f64>> = sizes.iter().map(|&n| vec![0.0; n]).collect();
            for (t, micro) in (1..=steps).zip(&micro) {
                let mut grads: Vec<Tensor> = micro.iter().map(|[a, _]| tensor(a)).collect();
                let seconds: Vec<Tensor> = micro.iter().map(|[_, b]| tensor(b)).collect();
                adamw::accumulate(
                    &mut grads.iter_mut().collect::<Vec<_>>(),
                    &seconds.iter().collect::<Vec<_>>(),
                ).unwrap();
                let g: Vec<Vec<f32>> = micro
                    .iter()
                    .map(|[a, b]| a.iter().zip(b).map(|(x, y)| x + y).collect())
                    .collect();
                for (i, (got, want)) in grads.iter().zip(&g).enumerate() {
                    prop_assert_eq!(bits(&got.to_vec::<f32>().unwrap()), bits(want), "accumulated grads[{}] on {}", i, dev);
                }
                let grad_refs: Vec<&Tensor> = grads.iter().collect();
                let norm = adamw::global_norm(&grad_refs).unwrap();
                let want_norm = cpu::adamw::global_norm(&g.iter().map(|v| &v[..]).collect::<Vec<_>>());
                let norm_err = (norm - want_norm).abs() / want_norm.max(f64::MIN_POSITIVE);
                prop_assert!(norm_err <= 1e-6, "norm {} vs {} on {}", norm, want_norm, dev);
                worst[3] = worst[3].max(norm_err);
                let clip = cpu::adamw::clip_factor(norm, max_norm) as f32;
                adamw::step(
                    &mut params.iter_mut().collect::<Vec<_>>(),
                    &grad_refs,
                    &mut state,
                    &cfg,
                    lr,
                    clip,
                ).unwrap();
                prop_assert_eq!(state.step, t);
                let hyper = cpu::adamw::Hyper {
                    lr: f64::from(lr),
                    beta1: f64::from(cfg.beta1),
                    beta2: f64::from(cfg.beta2),
                    eps: f64::from(cfg.eps),
                    weight_decay: f64::from(cfg.weight_decay),
                    step: t,
                    clip: f64::from(clip),
                };
                for i in 0..sizes.len() {
                    cpu::adamw::step(&mut want_p[i], &g[i], &mut want_m[i], &mut want_v[i], &hyper);
                    for (s, &x) in g_sum[i].iter_mut().zip(&g[i]) {
                        *s += f64::from(clip) * f64::from(x.abs());
                    }
                    let at = |what: &str| format!("{what}[{i}] at step {t} on {dev}");
                    let gs = &g_sum[i];
                    worst[0] = worst[0].max(check_rel(&at("p"), &params[i].to_vec::<f32>().unwrap(), &want_p[i], |_| t as f64 * f64::from(lr), 1e-6)?);
                    worst[1] = worst[1].max(check_rel(&at("m"), &state.m[i].to_vec::<f32>().unwrap(), &want_m[i], |e| gs[e], 1e-6)?);
                    worst[2] = worst[2].max(check_rel(&at("v"), &state.v[i].to_vec::<f32>().unwrap(), &want_v[i], |_| f64::MIN_POSITIVE, 1e-6)?);
                }
            }
        }
        measured(&format!(
            "adamw: p {:e} m {:e} v {:e} norm {:e}",
            worst[0], worst[1], worst[2], worst[3]
        ));
    }

    /// add_assign is one rounding of the fp32 sum: bit for bit
    /// round_to(y + t) in f16 and bf16 on the emulator (lora_add_scaled at
    /// scale 1) and on the CPU, y + t exactly in f32 on the CPU (host code).
    #[test]
    fn add_assign_matches_cpu(
        rows in 0usize..=5,
        cols in prop_oneof![1usize..=40, Just(256), 257usize..=700],
        seed in any::<u64>(),
    ) {
        use platypus::ops::add;
        let n = rows * cols;
        let mut rng = Rng::new(seed);
        for (dev, dtype) in [
            (Device::Emulated, DType::BF16),
            (Device::Emulated, DType::F16),
            (Device::Cpu, DType::F32),
            (Device::Cpu, DType::BF16),
        ] {
            let y0 = round_to(&rng.normal_vec(n, 2.0), dtype);
            let t0 = round_to(&rng.normal_vec(n, 0.5), dtype);
            let mut y = Tensor::from_f32(&y0, &[rows, cols], dtype, &dev).unwrap();
            let t = Tensor::from_f32(&t0, &[rows, cols], dtype, &dev).unwrap();
            add::add_assign(&mut y, &t).unwrap();
            prop_assert_eq!(y.dtype(), dtype);
            prop_assert_eq!(y.shape(), &[rows, cols][..]);
            let sum: Vec<f32> = y0.iter().zip(&t0).map(|(a, b)| a + b).collect();
            prop_assert_eq!(bits(&y.to_f32_vec().unwrap()), bits(&round_to(&sum, dtype)), "{} {}", dev, dtype);
        }
    }
}

/// One tensor over three chunks (2 · 65,536 + 5 elements) beside empty and
/// odd-sized ones, three clipped steps on both devices against the
/// reference; the norm is deterministic run to run; a set of only empty
/// tensors (one dummy chunk) and no tensors at all still count the step.
#[test]
fn adamw_over_several_chunks_and_empty_sets() {
    use platypus::ops::adamw::{self, AdamW, State, CHUNK};
    let sizes = [0, 3, 2 * CHUNK + 5, 1031];
    let cfg = AdamW::default();
    let mut rng = Rng::new(21);
    let init: Vec<Vec<f32>> = sizes.iter().map(|&n| rng.normal_vec(n, 0.1)).collect();
    let grads: Vec<Vec<Vec<f32>>> = (0..3)
        .map(|_| sizes.iter().map(|&n| rng.normal_vec(n, 0.05)).collect())
        .collect();
    for dev in [Device::Emulated, Device::Cpu] {
        let tensor = |v: &[f32]| Tensor::from_slice(v, &[v.len()], &dev).unwrap();
        let mut params: Vec<Tensor> = init.iter().map(|v| tensor(v)).collect();
        let mut state = State::new(&params.iter().collect::<Vec<_>>()).unwrap();
        let (mut p, mut m, mut v) = (
            init.clone(),
            sizes.iter().map(|&n| vec![0.0; n]).collect::<Vec<_>>(),
            sizes.iter().map(|&n| vec![0.0; n]).collect::<Vec<_>>(),
        );
        let mut g_sum: Vec<Vec<f64>> = sizes.iter().map(|&n| vec![0.0; n]).collect();
        let mut worst = [0.0f64; 3];
        for (t, g) in (1u64..).zip(&grads) {
            let gt: Vec<Tensor> = g.iter().map(|v| tensor(v)).collect();
            let refs: Vec<&Tensor> = gt.iter().collect();
            let norm = adamw::global_norm(&refs).unwrap();
            assert_eq!(norm.to_bits(), adamw::global_norm(&refs).unwrap().to_bits());
            let want = cpu::adamw::global_norm(&g.iter().map(|v| &v[..]).collect::<Vec<_>>());
            measured(&format!(
                "adamw over chunks on {dev}: norm {:e}",
                (norm - want).abs() / want
            ));
            assert!(
                (norm - want).abs() <= 1e-6 * want,
                "{dev}: norm {norm} vs {want}"
            );
            let clip = cpu::adamw::clip_factor(norm, 1.0) as f32;
            assert!(clip < 1.0, "the norm {norm} is clipped");
            adamw::step(
                &mut params.iter_mut().collect::<Vec<_>>(),
                &refs,
                &mut state,
                &cfg,
                1e-3,
                clip,
            )
            .unwrap();
            let hyper = cpu::adamw::Hyper {
                lr: f64::from(1e-3f32),
                beta1: f64::from(cfg.beta1),
                beta2: f64::from(cfg.beta2),
                eps: f64::from(cfg.eps),
                weight_decay: f64::from(cfg.weight_decay),
                step: t,
                clip: f64::from(clip),
            };
            // The floors and tolerance of `adamw_step_matches_the_reference`.
            for i in 0..sizes.len() {
                cpu::adamw::step(&mut p[i], &g[i], &mut m[i], &mut v[i], &hyper);
                for (s, &x) in g_sum[i].iter_mut().zip(&g[i]) {
                    *s += f64::from(clip) * f64::from(x.abs());
                }
                let at = |what: &str| format!("{what}[{i}] at step {t} on {dev}");
                let gs = &g_sum[i];
                let got = |t: &Tensor| t.to_vec::<f32>().unwrap();
                let errs = [
                    check_rel(&at("p"), &got(&params[i]), &p[i], |_| t as f64 * 1e-3, 1e-6),
                    check_rel(&at("m"), &got(&state.m[i]), &m[i], |e| gs[e], 1e-6),
                    check_rel(
                        &at("v"),
                        &got(&state.v[i]),
                        &v[i],
                        |_| f64::MIN_POSITIVE,
                        1e-6,
                    ),
                ];
                for (w, e) in worst.iter_mut().zip(errs) {
                    *w = w.max(e.unwrap());
                }
            }
        }
        measured(&format!(
            "adamw over chunks on {dev}: p {:e} m {:e} v {:e}",
            worst[0], worst[1], worst[2]
        ));
        assert_eq!(state.step, 3);
        // Only empty tensors: the kernels get one dummy chunk of 0 elements.
        let mut empty = [tensor(&[]), tensor(&[])];
        let g = [tensor(&[]), tensor(&[])];
        let refs: Vec<&Tensor> = g.iter().collect();
        assert_eq!(adamw::global_norm(&refs).unwrap(), 0.0);
        let mut s = State::new(&empty.iter().collect::<Vec<_>>()).unwrap();
        adamw::step(
            &mut empty.iter_mut().collect::<Vec<_>>(),
            &refs,
            &mut s,
            &cfg,
            1e-3,
            1.0,
        )
        .unwrap();
        adamw::accumulate(&mut empty.iter_mut().collect::<Vec<_>>(), &refs).unwrap();
        assert_eq!(s.step, 1);
        let mut none = State::new(&[]).unwrap();
        adamw::step(&mut [], &[], &mut none, &cfg, 1e-3, 1.0).unwrap();
        assert_eq!((none.step, adamw::global_norm(&[]).unwrap()), (1, 0.0));
    }
}
