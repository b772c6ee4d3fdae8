//! Flash attention forward and forward+backward throughput, in the
//! FlashAttention-2 paper's settings on a GPU: batch · seq = 16k tokens,
//! hidden 2048 (heads = 2048 / head_dim), seq 512 … 16384, head dim 64 and
//! 128, causal and not, bf16. FLOPs = 4 · batch · heads · seq² · head_dim for
//! the forward pass (halved when causal), 2.5× that for backward. On the CPU
//! the reference path runs one small shape, for a figure of what it costs.

mod common;

use criterion::{criterion_group, criterion_main, Criterion};
use platypus::ops::attention::{self, AttentionConfig, Batch};
use platypus::{DType, Tensor};

use common::{random_f32, Target, Work};

/// One benched problem.
struct Shape {
    batch: usize,
    seq: usize,
    heads: usize,
    head_dim: usize,
    causal: bool,
    dtype: DType,
}

impl Shape {
    fn forward_flops(&self) -> u64 {
        let full = 4 * self.batch * self.heads * self.seq * self.seq * self.head_dim;
        (if self.causal { full / 2 } else { full }) as u64
    }
}

/// The FlashAttention-2 benchmark grid: 16k tokens, hidden 2048.
fn gpu_shapes() -> Vec<Shape> {
    let mut shapes = Vec::new();
    // Head dim 128 first: Llama's, and the one to keep if a time limit cuts the run.
    for head_dim in [128, 64] {
        for causal in [false, true] {
            for seq in [512, 1024, 2048, 4096, 8192, 16384] {
                shapes.push(Shape {
                    batch: 16384 / seq,
                    seq,
                    heads: 2048 / head_dim,
                    head_dim,
                    causal,
                    dtype: DType::BF16,
                });
            }
        }
    }
    shapes
}

/// The CPU reference path (f64 accumulation, full score matrix): one short batch.
fn cpu_shapes() -> Vec<Shape> {
    vec![Shape {
        batch: 1,
        seq: 256,
        heads: 4,
        head_dim: 64,
        causal: true,
        dtype: DType::F32,
    }]
}

fn bench_target(c: &mut Criterion, mut target: Target, shapes: &[Shape]) {
    let name = format!("attention/{}", target.name());
    let mut group = target.group(c, &name);
    // The values of q, k, v and dO, made once for the largest shape (on the
    // GPU grid every shape has the same 16k × 2048 elements).
    let most = shapes
        .iter()
        .map(|s| s.batch * s.seq * s.heads * s.head_dim)
        .max();
    let values: Vec<Vec<f32>> = (1..=4)
        .map(|seed| random_f32(most.unwrap_or(0), seed))
        .collect();
    for s in shapes {
        let dev = target.device().clone();
        let shape = [s.batch, s.seq, s.heads, s.head_dim];
        let n = shape.iter().product();
        let tensor = |i: usize| Tensor::from_f32(&values[i][..n], &shape, s.dtype, &dev).unwrap();
        let (q, k, v, dout) = (tensor(0), tensor(1), tensor(2), tensor(3));
        let cfg = AttentionConfig {
            causal: s.causal,
            scale: None,
        };
        let id = format!(
            "{}/b{}_s{}_h{}_d{}{}",
            s.dtype,
            s.batch,
            s.seq,
            s.heads,
            s.head_dim,
            if s.causal { "_causal" } else { "" }
        );
        let fwd_flops = s.forward_flops();
        target.bench(
            &mut group,
            &format!("forward/{id}"),
            Work::Flops(fwd_flops),
            || attention::forward(&q, &k, &v, Batch::Dense, &cfg).unwrap(),
        );
        let total = Work::Flops(fwd_flops * 7 / 2);
        target.bench(&mut group, &format!("forward_backward/{id}"), total, || {
            let out = attention::forward(&q, &k, &v, Batch::Dense, &cfg).unwrap();
            attention::backward(&q, &k, &v, &out, &dout, Batch::Dense, &cfg).unwrap()
        });
    }
    group.finish();
    target.report(&name);
}

fn benches(c: &mut Criterion) {
    common::cpu_then_gpu(c, bench_target, &cpu_shapes(), &gpu_shapes());
}

criterion_group! {
    name = group;
    config = common::config();
    targets = benches
}
criterion_main!(group);
