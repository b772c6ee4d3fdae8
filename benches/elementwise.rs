//! The memory-bound row ops of the Llama forward (and SwiGLU's backward):
//! embedding gather, SwiGLU, residual add + RMSNorm, and the sentence
//! encoder's residual LayerNorm (at the same row width). Achieved memory
//! bandwidth on the CPU path and, when there is a GPU, on Llama 2 7B shapes
//! on it (16k tokens, hidden 4096, MLP width 11008).

mod common;

use criterion::Criterion;
use platypus::{ops, DType, Tensor};

use common::{bytes, random_f32, Target};

/// Llama 2's epsilon.
const EPS: f32 = 1e-5;
/// Vocabulary of the benched embedding table (Llama 2's).
const VOCAB: usize = 32000;

/// One benched shape: tokens, hidden size, MLP width, dtype.
#[derive(Clone, Copy)]
struct Shape {
    tokens: usize,
    hidden: usize,
    intermediate: usize,
    dtype: DType,
}

/// Benched on the CPU: small enough for a 2-core machine.
const CPU_SHAPES: &[Shape] = &[Shape {
    tokens: 512,
    hidden: 4096,
    intermediate: 11008,
    dtype: DType::F32,
}];

/// Benched on a GPU: a 16k-token batch of Llama 2 7B, in bf16.
const GPU_SHAPES: &[Shape] = &[Shape {
    tokens: 16384,
    hidden: 4096,
    intermediate: 11008,
    dtype: DType::BF16,
}];

fn bench_target(c: &mut Criterion, mut target: Target, shapes: &[Shape]) {
    let name = format!("elementwise/{}", target.name());
    let mut group = target.group(c, &name);
    for &Shape {
        tokens,
        hidden,
        intermediate,
        dtype,
    } in shapes
    {
        let dev = target.device().clone();
        let tensor = |seed, shape: &[usize]| {
            let n = shape.iter().product();
            Tensor::from_f32(&random_f32(n, seed), shape, dtype, &dev).unwrap()
        };

        // Embedding: read tokens rows of the table (and the ids), write them.
        let table = tensor(1, &[VOCAB, hidden]);
        let ids: Vec<u32> = (0..tokens as u64)
            .map(|i| (i * 7919 % VOCAB as u64) as u32)
            .collect();
        let mut rows = Tensor::zeros(&[tokens, hidden], dtype, &dev).unwrap();
        let id = format!("{dtype}/{tokens}x{hidden}");
        let gather = bytes(dtype, 2 * tokens * hidden, 4 * tokens);
        target.bench(&mut group, &format!("embedding/{id}"), gather, || {
            ops::embedding::forward_into(&table, &ids, &mut rows).unwrap()
        });
        drop(table);

        // Residual add + RMSNorm: read h and delta (and w), write h and y.
        let mut h = tensor(2, &[tokens, hidden]);
        let delta = tensor(3, &[tokens, hidden]);
        let w = tensor(4, &[hidden]);
        let add_norm = bytes(dtype, 4 * tokens * hidden + hidden, 0);
        target.bench(&mut group, &format!("add_rmsnorm/{id}"), add_norm, || {
            ops::rmsnorm::add_forward_into(&mut h, &delta, &w, &mut rows, EPS).unwrap()
        });
        // Residual LayerNorm in place: read h and delta (and w, b), write h.
        let b = tensor(5, &[hidden]);
        let residual_norm = bytes(dtype, 3 * tokens * hidden + 2 * hidden, 0);
        target.bench(
            &mut group,
            &format!("residual_layernorm/{id}"),
            residual_norm,
            || ops::layernorm::residual_forward(&mut h, &delta, &w, &b, 1e-12).unwrap(),
        );
        drop((h, delta, rows));

        // SwiGLU over [tokens, intermediate]: forward 3 n E, backward 5 n E.
        let shape = [tokens, intermediate];
        let n = tokens * intermediate;
        let (gate, up, dm) = (tensor(5, &shape), tensor(6, &shape), tensor(7, &shape));
        let mut m = Tensor::zeros(&shape, dtype, &dev).unwrap();
        let id = format!("{dtype}/{tokens}x{intermediate}");
        target.bench(
            &mut group,
            &format!("swiglu_forward/{id}"),
            bytes(dtype, 3 * n, 0),
            || ops::swiglu::forward_into(&gate, &up, &mut m).unwrap(),
        );
        let mut dgate = m;
        let mut dup = Tensor::zeros(&shape, dtype, &dev).unwrap();
        target.bench(
            &mut group,
            &format!("swiglu_backward/{id}"),
            bytes(dtype, 5 * n, 0),
            || ops::swiglu::backward_into(&gate, &up, &dm, &mut dgate, &mut dup).unwrap(),
        );
    }
    group.finish();
    target.report(&name);
}

common::cpu_then_gpu_main!(bench_target, CPU_SHAPES, GPU_SHAPES);
