//! RoPE forward and backward (in place, grouped-query q and k): achieved
//! memory bandwidth on the CPU reference path and, when there is a GPU, on
//! Llama-sized shapes on it.

mod common;

use criterion::Criterion;
use platypus::ops::rope::{self, RopeConfig};
use platypus::{DType, Tensor};

use common::{bytes, random_f32, Target};

/// One benched shape of q [batch, seq, q_heads, head_dim] and k [batch, seq, k_heads, head_dim].
struct Shape {
    /// Sequences.
    batch: usize,
    /// Tokens per sequence.
    seq: usize,
    /// Heads of q.
    q_heads: usize,
    /// Heads of k (fewer than q_heads: grouped-query attention).
    k_heads: usize,
    /// Elements per head.
    head_dim: usize,
    /// Storage type of q and k.
    dtype: DType,
}

/// `batch` sequences of `seq` tokens, 32 q heads over 8 kv heads (grouped
/// query, as Llama 2 70B's 64 over 8), head_dim 128.
const fn gqa(batch: usize, seq: usize, dtype: DType) -> Shape {
    Shape {
        batch,
        seq,
        q_heads: 32,
        k_heads: 8,
        head_dim: 128,
        dtype,
    }
}

/// Shapes benched on the CPU: one 512-token sequence.
const CPU_SHAPES: &[Shape] = &[gqa(1, 512, DType::F32), gqa(1, 512, DType::BF16)];

/// Shapes benched on a GPU: four 4096-token sequences.
const GPU_SHAPES: &[Shape] = &[gqa(4, 4096, DType::BF16)];

/// Benches forward and backward of each shape on `target`.
fn bench_target(c: &mut Criterion, mut target: Target, shapes: &[Shape]) {
    let name = format!("rope/{}", target.name());
    let mut group = target.group(c, &name);
    let cfg = RopeConfig::default();
    for s in shapes {
        let dev = target.device().clone();
        let tokens = s.batch * s.seq;
        let q_shape = [s.batch, s.seq, s.q_heads, s.head_dim];
        let k_shape = [s.batch, s.seq, s.k_heads, s.head_dim];
        let q_elems = tokens * s.q_heads * s.head_dim;
        let k_elems = tokens * s.k_heads * s.head_dim;
        let mut q = Tensor::from_f32(&random_f32(q_elems, 1), &q_shape, s.dtype, &dev).unwrap();
        let mut k = Tensor::from_f32(&random_f32(k_elems, 2), &k_shape, s.dtype, &dev).unwrap();
        let pos: Vec<i32> = (0..tokens).map(|t| (t % s.seq) as i32).collect();
        let positions = Tensor::from_slice(&pos, &[s.batch, s.seq], &dev).unwrap();
        let id = format!(
            "{}/b{}_s{}_h{}_kv{}_d{}",
            s.dtype, s.batch, s.seq, s.q_heads, s.k_heads, s.head_dim
        );
        // Read and write q and k, read the i32 positions.
        let moved = bytes(s.dtype, 2 * (q_elems + k_elems), 4 * tokens);
        // In place: every call rotates the previous call's output, which
        // keeps the values' magnitudes (rotations preserve norms).
        target.bench(&mut group, &format!("forward/{id}"), moved, || {
            rope::forward(&mut q, &mut k, &positions, &cfg).unwrap()
        });
        target.bench(&mut group, &format!("backward/{id}"), moved, || {
            rope::backward(&mut q, &mut k, &positions, &cfg).unwrap()
        });
    }
    group.finish();
    target.report(&name);
}

common::cpu_then_gpu_main!(bench_target, CPU_SHAPES, GPU_SHAPES);
