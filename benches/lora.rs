//! The fused LoRA layer against its baselines, on Llama 2 7B and 13B
//! projection shapes with 4096 tokens and r 16 on a GPU: (a) the base GEMM
//! alone, (b) the unfused PEFT sequence (three GEMMs and an add), (c) the
//! fused layer; forward, and backward against the base layer's dx = dy W.
//! FLOPs count the base GEMM (2·tokens·in·out) plus the adapter's
//! (2·tokens·r·(in + out) forward; backward also dA and dB), so TFLOP/s
//! compare directly. On the CPU the reference path runs a 16-token slice
//! of the 7B q projection. Also the sentence encoder's bias + GELU layer
//! (`ops::linear`) at all-MiniLM-L6-v2's 384 -> 1536, 8192 tokens on a GPU.

mod common;

use criterion::Criterion;
use platypus::ops::linear::{self, Activation};
use platypus::ops::lora::{self, LoraConfig, LoraWeights};
use platypus::{DType, Tensor};

use common::{random_f32, Target, Work};

/// One benched projection.
struct Shape {
    name: &'static str,
    tokens: usize,
    in_features: usize,
    out_features: usize,
    rank: usize,
    dtype: DType,
}

const fn proj(
    name: &'static str,
    tokens: usize,
    in_features: usize,
    out_features: usize,
    dtype: DType,
) -> Shape {
    Shape {
        name,
        tokens,
        in_features,
        out_features,
        rank: 16,
        dtype,
    }
}

/// Llama 2 7B (hidden 4096, MLP 11008) and 13B (5120, 13824), 4096 tokens.
const GPU_SHAPES: &[Shape] = &[
    proj("7b_q", 4096, 4096, 4096, DType::BF16),
    proj("7b_up", 4096, 4096, 11008, DType::BF16),
    proj("7b_down", 4096, 11008, 4096, DType::BF16),
    proj("13b_up", 4096, 5120, 13824, DType::BF16),
    proj("13b_down", 4096, 13824, 5120, DType::BF16),
];

const CPU_SHAPES: &[Shape] = &[proj("7b_q", 16, 4096, 4096, DType::F32)];

fn bench_target(c: &mut Criterion, mut target: Target, shapes: &[Shape]) {
    let name = format!("lora/{}", target.name());
    let mut group = target.group(c, &name);
    let cfg = LoraConfig::default(); // alpha 16, dropout 0.05
    for s in shapes {
        let dev = target.device().clone();
        let (t, i, o, r) = (s.tokens, s.in_features, s.out_features, s.rank);
        let x = Tensor::from_f32(&random_f32(t * i, 1), &[t, i], s.dtype, &dev).unwrap();
        let w = Tensor::from_f32(&random_f32(o * i, 2), &[o, i], s.dtype, &dev).unwrap();
        let dy = Tensor::from_f32(&random_f32(t * o, 3), &[t, o], s.dtype, &dev).unwrap();
        let a = Tensor::from_slice(&random_f32(r * i, 4), &[r, i], &dev).unwrap();
        let b = Tensor::from_slice(&random_f32(o * r, 5), &[o, r], &dev).unwrap();
        let weights = LoraWeights {
            w: &w,
            a: &a,
            b: &b,
        };
        let id = format!("{}/{}_t{t}_in{i}_out{o}_r{r}", s.dtype, s.name);
        let base = 2 * t * i * o;
        let adapter = 2 * t * r * (i + o);
        let forward = Work::Flops((base + adapter) as u64);
        // Backward: dx (base + adapter), and dA, dB (adapter again).
        let backward = Work::Flops((base + 2 * adapter) as u64);
        target.bench(
            &mut group,
            &format!("base_forward/{id}"),
            Work::Flops(base as u64),
            || lora::linear(&x, &w).unwrap(),
        );
        target.bench(
            &mut group,
            &format!("unfused_forward/{id}"),
            forward,
            || lora::forward_unfused(&x, weights, &cfg).unwrap(),
        );
        target.bench(&mut group, &format!("fused_forward/{id}"), forward, || {
            lora::forward(&x, weights, &cfg).unwrap()
        });
        let out = lora::forward(&x, weights, &cfg).unwrap();
        target.bench(
            &mut group,
            &format!("base_backward/{id}"),
            Work::Flops(base as u64),
            || lora::linear_backward(&dy, &w).unwrap(),
        );
        target.bench(
            &mut group,
            &format!("fused_backward/{id}"),
            backward,
            || lora::backward(&x, &dy, weights, &out.u, &cfg).unwrap(),
        );
    }
    // The sentence encoder's feed-forward up projection (all-MiniLM-L6-v2,
    // 384 -> 1536) with its bias and GELU in the epilogue.
    let dev = target.device().clone();
    let (dtype, t) = (shapes[0].dtype, shapes[0].tokens * 2);
    let (i, o) = (384, 1536);
    let x = Tensor::from_f32(&random_f32(t * i, 6), &[t, i], dtype, &dev).unwrap();
    let w = Tensor::from_f32(&random_f32(o * i, 7), &[o, i], dtype, &dev).unwrap();
    let bias = Tensor::from_f32(&random_f32(o, 8), &[o], dtype, &dev).unwrap();
    target.bench(
        &mut group,
        &format!("bias_gelu_forward/{dtype}/minilm_up_t{t}_in{i}_out{o}"),
        Work::Flops((2 * t * i * o) as u64),
        || linear::forward(&x, &w, Some(&bias), Activation::Gelu).unwrap(),
    );
    group.finish();
    target.report(&name);
}

common::cpu_then_gpu_main!(bench_target, CPU_SHAPES, GPU_SHAPES);
