//! RMSNorm forward and backward: achieved memory bandwidth on the CPU
//! reference path and, when there is a GPU, on Llama-sized shapes on it,
//! beside the GPU's device-to-device copy bandwidth (the ceiling of a
//! memory-bound kernel, measured the same way).

mod common;

use criterion::{criterion_group, criterion_main, Criterion};
use platypus::{ops, DType, Tensor};

use common::{bytes, random_f32, Target};

/// Llama 2's epsilon.
const EPS: f32 = 1e-5;

/// (rows, hidden, dtype) benched on the CPU: small enough for a 2-core machine.
const CPU_SHAPES: &[(usize, usize, DType)] = &[(512, 4096, DType::F32), (512, 4096, DType::BF16)];

/// (rows, hidden, dtype) benched on a GPU: a 16k-token batch of Llama 2 7B and 70B.
const GPU_SHAPES: &[(usize, usize, DType)] =
    &[(16384, 4096, DType::BF16), (16384, 8192, DType::BF16)];

/// Benches forward and backward (without dw, as LoRA runs it) of each shape on `target`.
fn bench_target(c: &mut Criterion, mut target: Target, shapes: &[(usize, usize, DType)]) {
    let name = format!("rmsnorm/{}", target.name());
    let mut group = target.group(c, &name);
    for &(rows, hidden, dtype) in shapes {
        let dev = target.device().clone();
        let tensor = |seed, shape: &[usize]| {
            let n = shape.iter().product();
            Tensor::from_f32(&random_f32(n, seed), shape, dtype, &dev).unwrap()
        };
        let x = tensor(1, &[rows, hidden]);
        let w = tensor(2, &[hidden]);
        let dy = tensor(3, &[rows, hidden]);
        let mut y = Tensor::zeros(&[rows, hidden], dtype, &dev).unwrap();
        let id = format!("{dtype}/{rows}x{hidden}");
        // Read x and w, write y.
        let forward = bytes(dtype, 2 * rows * hidden + hidden, 0);
        target.bench(&mut group, &format!("forward/{id}"), forward, || {
            ops::rmsnorm::forward_into(&x, &w, &mut y, EPS).unwrap()
        });
        // Read x, dy and w, write dx.
        let backward = bytes(dtype, 3 * rows * hidden + hidden, 0);
        target.bench(&mut group, &format!("backward/{id}"), backward, || {
            ops::rmsnorm::backward(&x, &w, &dy, EPS, false).unwrap()
        });
    }
    group.finish();
    target.report(&name);
}

/// The CPU benches, then the GPU ones if there is a GPU.
fn benches(c: &mut Criterion) {
    common::cpu_then_gpu(c, bench_target, CPU_SHAPES, GPU_SHAPES);
}

/// Device-to-device copy of a 16k × 8192 bf16 tensor (256 MiB read, 256 MiB
/// written) on the GPU, if there is one.
fn copy_bandwidth(c: &mut Criterion) {
    let Some(mut target) = Target::cuda() else {
        return;
    };
    let (rows, hidden, dtype) = (16384, 8192, DType::BF16);
    let dev = target.device().clone();
    let src =
        Tensor::from_f32(&random_f32(rows * hidden, 4), &[rows, hidden], dtype, &dev).unwrap();
    let mut dst = Tensor::zeros(&[rows, hidden], dtype, &dev).unwrap();
    let mut group = target.group(c, "copy/cuda");
    let moved = bytes(dtype, 2 * rows * hidden, 0);
    target.bench(
        &mut group,
        &format!("{dtype}/{rows}x{hidden}"),
        moved,
        || dst.copy_from(&src).unwrap(),
    );
    group.finish();
    target.report("copy/cuda");
}

criterion_group! {
    name = group;
    config = common::config();
    targets = benches, copy_bandwidth
}
criterion_main!(group);
