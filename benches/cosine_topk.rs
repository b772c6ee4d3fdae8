//! Cosine top-k on the CPU: the fast path (blocked GEMM + selection buffer,
//! rayon) against the plain baseline "one GEMM for the whole score matrix,
//! then sort every row", both multi-threaded, on 256 queries × 50k rows,
//! d 384 (MiniLM's width), k 10. Throughput is printed as elements/s =
//! scored (query, row) pairs per second. The side-by-side with FAISS is
//! `scripts/compare_faiss.py`.

mod common;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use platypus::ops::cosine_topk;
use platypus::{Device, Tensor};
use rayon::prelude::*;

use common::random_f32;

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

criterion_group! {
    name = group;
    config = common::config();
    targets = benches
}
criterion_main!(group);
