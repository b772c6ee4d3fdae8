//! Cosine top-k.
//!
//! On the CPU: the fast path (blocked GEMM + selection buffer, rayon)
//! against the plain baseline "one GEMM for the whole score matrix, then
//! sort every row", both multi-threaded, on 256 queries × 50k rows, d 384
//! (MiniLM's width), k 10. Throughput is printed as elements/s = scored
//! (query, row) pairs per second. The side-by-side with FAISS is
//! `scripts/compare_faiss.py`.
//!
//! On a GPU (skipped without one): the shape, 10k queries × 1M rows,
//! d 384, k 10, bf16, with the database on the device and streamed from
//! host memory in 128k-row chunks. Prints queries/s and TFLOP/s against the
//! bf16 tensor-core peak: the similarity GEMM (2·m·n·d FLOPs) is the
//! roofline of this shape (compute-bound: the database is read once per
//! 128 queries, mostly from L2).

mod common;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use platypus::ops::cosine_topk;
use platypus::{DType, Device, Tensor};
use rayon::prelude::*;

use common::{random_f32, Target, Work};

const M: usize = 256;
const N: usize = 50_000;
const D: usize = 384;
const K: usize = 10;

/// Unit-length copies of the rows of `v` [rows, D].
fn normalised(v: &[f32]) -> Vec<f32> {
    let mut v = v.to_vec();
    for row in v.chunks_exact_mut(D) {
        let norm = row
            .iter()
            .map(|x| x * x)
            .sum::<f32>()
            .sqrt()
            .max(f32::MIN_POSITIVE);
        row.iter_mut().for_each(|x| *x /= norm);
    }
    v
}

/// The baseline: the whole [M, N] score matrix with one GEMM per thread's
/// query rows, then a full sort of every row.
fn gemm_then_sort(q: &[f32], db: &[f32]) -> Vec<u32> {
    let (q, db) = (normalised(q), normalised(db));
    let rows_per_task = M.div_ceil(rayon::current_num_threads());
    q.par_chunks(rows_per_task * D)
        .flat_map_iter(|qs| {
            let m = qs.len() / D;
            let mut scores = vec![0.0f32; m * N];
            // SAFETY: qs [m, D], db [N, D] read transposed, scores [m, N], all row-major and in bounds.
            unsafe {
                matrixmultiply::sgemm(
                    m,
                    D,
                    N,
                    1.0,
                    qs.as_ptr(),
                    D as isize,
                    1,
                    db.as_ptr(),
                    1,
                    D as isize,
                    0.0,
                    scores.as_mut_ptr(),
                    N as isize,
                    1,
                );
            }
            scores
                .chunks_exact(N)
                .flat_map(|row| {
                    let mut order: Vec<u32> = (0..N as u32).collect();
                    order.sort_unstable_by(|&a, &b| {
                        row[b as usize].total_cmp(&row[a as usize]).then(a.cmp(&b))
                    });
                    order.truncate(K);
                    order
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

fn benches(c: &mut Criterion) {
    let q = random_f32(M * D, 1);
    let db = random_f32(N * D, 2);
    let qt = Tensor::from_slice(&q, &[M, D], &Device::Cpu).unwrap();
    let dbt = Tensor::from_slice(&db, &[N, D], &Device::Cpu).unwrap();
    let mut group = c.benchmark_group("cosine_topk/cpu");
    group.throughput(Throughput::Elements((M * N) as u64));
    let id = format!("m{M}_n{N}_d{D}_k{K}");
    group.bench_function(format!("fast/{id}"), |b| {
        b.iter(|| cosine_topk::topk(&qt, &dbt, K).unwrap())
    });
    group.bench_function(format!("gemm_then_sort/{id}"), |b| {
        b.iter(|| gemm_then_sort(&q, &db))
    });
    group.finish();
}

/// The GPU shape: m queries against n database rows.
const GPU_M: usize = 10_000;
const GPU_N: usize = 1_000_000;
const GPU_CHUNK: usize = 131_072;

fn gpu_benches(c: &mut Criterion) {
    let Some(mut target) = Target::cuda() else {
        return;
    };
    let dev = target.device().clone();
    let q = Tensor::from_f32(&random_f32(GPU_M * D, 3), &[GPU_M, D], DType::BF16, &dev).unwrap();
    let host_db = Tensor::from_f32(
        &random_f32(GPU_N * D, 4),
        &[GPU_N, D],
        DType::BF16,
        &Device::Cpu,
    )
    .unwrap();
    let db = host_db.to_device(&dev).unwrap();
    let name = "cosine_topk/cuda";
    let mut group = target.group(c, name);
    group.sample_size(10);
    let id = format!("bf16/m{GPU_M}_n{GPU_N}_d{D}_k{K}");
    let flops = Work::Flops((2 * GPU_M * GPU_N * D) as u64);
    for (what, streamed) in [("resident", false), ("streamed", true)] {
        target.bench(&mut group, &format!("{what}/{id}"), flops, || {
            if streamed {
                cosine_topk::topk_streamed(&q, &host_db, K, GPU_CHUNK).unwrap()
            } else {
                cosine_topk::topk(&q, &db, K).unwrap()
            }
        });
        if let Some(secs) = target.last_seconds() {
            println!("{name}/{what}/{id}: {:.0} queries/s", GPU_M as f64 / secs);
        }
    }
    group.finish();
    target.report(name);
}

criterion_group! {
    name = group;
    config = common::config();
    targets = benches, gpu_benches
}
criterion_main!(group);
