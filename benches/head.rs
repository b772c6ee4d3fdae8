//! The LM head: the fused linear cross-entropy (logits chunk by chunk, never
//! all at once) in FLOP/s of its GEMM (2 · tokens · hidden · vocab), beside
//! the head GEMM alone on a GPU; the fused head with its gradient dh (the
//! training step's: logits, dlogits and the GEMM back through the head) in
//! FLOP/s of both GEMMs (4 · tokens · hidden · vocab); the row kernel alone
//! on given fp32 logits, and greedy argmax and top-p sampling over
//! 32,000-wide rows, in bytes/s of one read of the logits. On the CPU: 256
//! tokens of a 768-wide head (host code) and 64 rows; on a GPU: Llama-7B's
//! head (4096 tokens × 4096 × 32,000 bf16), and 1 and 128 rows to choose from.

mod common;

use criterion::Criterion;
use platypus::ops::{cross_entropy, lora, sampling};
use platypus::{DType, Tensor};

use common::{bytes, random_f32, Target, Work};

/// Llama's vocabulary.
const VOCAB: usize = 32000;

/// What one target benches.
struct Shapes {
    /// (tokens, hidden, dtype) of the fused head.
    head: &'static [(usize, usize, DType)],
    /// (rows, dtype) of the row ops over VOCAB-wide rows.
    rows: &'static [(usize, DType)],
}

const CPU: &[Shapes] = &[Shapes {
    head: &[(256, 768, DType::F32)],
    rows: &[(64, DType::F32)],
}];

const GPU: &[Shapes] = &[Shapes {
    head: &[(4096, 4096, DType::BF16)],
    rows: &[
        (1, DType::BF16),
        (128, DType::BF16),
        (128, DType::F32),
        (4096, DType::F32),
    ],
}];

fn bench_target(c: &mut Criterion, mut target: Target, shapes: &[Shapes]) {
    let name = format!("head/{}", target.name());
    let mut group = target.group(c, &name);
    let dev = target.device().clone();
    let gpu = matches!(target, Target::Cuda(_));
    for s in shapes {
        for &(tokens, hidden, dtype) in s.head {
            let h = Tensor::from_f32(
                &random_f32(tokens * hidden, 1),
                &[tokens, hidden],
                dtype,
                &dev,
            )
            .unwrap();
            let w_values: Vec<f32> = random_f32(VOCAB * hidden, 2)
                .iter()
                .map(|v| v * 0.05)
                .collect();
            let w = Tensor::from_f32(&w_values, &[VOCAB, hidden], dtype, &dev).unwrap();
            let labels: Vec<i32> = (0..tokens)
                .map(|t| {
                    if t % 7 == 6 {
                        -100
                    } else {
                        (t * 97 % VOCAB) as i32
                    }
                })
                .collect();
            let flops = Work::Flops((2 * tokens * hidden * VOCAB) as u64);
            let id = format!("{dtype}/t{tokens}_h{hidden}_v{VOCAB}");
            target.bench(&mut group, &format!("fused_ce/{id}"), flops, || {
                cross_entropy::linear_cross_entropy(&h, &w, &labels).unwrap()
            });
            // Both GEMMs: logits = h Wᵀ and dh = dlogits W.
            let grad_flops = Work::Flops((4 * tokens * hidden * VOCAB) as u64);
            let scale = 1.0 / tokens as f32;
            target.bench(
                &mut group,
                &format!("fused_ce_grad/{id}"),
                grad_flops,
                || cross_entropy::linear_cross_entropy_grad(&h, &w, &labels, scale).unwrap(),
            );
            if gpu {
                // The head GEMM alone (16-bit logits of every token): the ceiling.
                target.bench(&mut group, &format!("head_gemm/{id}"), flops, || {
                    lora::linear(&h, &w).unwrap()
                });
            }
        }
        for &(rows, dtype) in s.rows {
            let z = Tensor::from_f32(
                &random_f32(rows * VOCAB, 3)
                    .iter()
                    .map(|v| 4.0 * v)
                    .collect::<Vec<_>>(),
                &[rows, VOCAB],
                dtype,
                &dev,
            )
            .unwrap();
            let read = bytes(dtype, rows * VOCAB, 0);
            let id = format!("{dtype}/{rows}x{VOCAB}");
            let labels: Vec<i32> = (0..rows).map(|r| (r * 31 % VOCAB) as i32).collect();
            target.bench(&mut group, &format!("ce_rows/{id}"), read, || {
                cross_entropy::forward_logits(&z, &labels).unwrap()
            });
            target.bench(&mut group, &format!("argmax/{id}"), read, || {
                sampling::argmax(&z).unwrap()
            });
            let uniforms: Vec<f64> = (0..rows).map(|r| (r as f64 + 0.5) / rows as f64).collect();
            target.bench(&mut group, &format!("sample_top_p_0.9/{id}"), read, || {
                sampling::sample(&z, 0.8, 0.9, &uniforms).unwrap()
            });
            target.bench(&mut group, &format!("sample_top_p_1/{id}"), read, || {
                sampling::sample(&z, 0.8, 1.0, &uniforms).unwrap()
            });
        }
    }
    group.finish();
    target.report(&name);
}

common::cpu_then_gpu_main!(bench_target, CPU, GPU);
