//! The host code behind `Device::Cpu` at Llama-ish shapes: `matmul_nt` with
//! f32 and bf16 weights (a 512-token slice through a 768 → 2048 projection,
//! and the 4096 × 4096 decoding GEMV in bf16), and the causal attention
//! forward of a 512-token sequence with 12 heads of 64. Criterion prints the
//! FLOPs per second as elements/s (the GEMV, memory-bound, as bytes/s of
//! weights read).

mod common;

use criterion::{criterion_group, criterion_main, Criterion};
use half::bf16;
use platypus::cpu::attention::SeqSpan;
use platypus::host::attention::{attention_forward, KvDims};
use platypus::host::gemm::{matmul_nt, Weights};

use common::{random_f32, Target, Work};

/// One benched product y [m, n] = x [m, k] · wᵀ.
struct Gemm {
    m: usize,
    k: usize,
    n: usize,
    bf16: bool,
}

const GEMMS: &[Gemm] = &[
    Gemm {
        m: 512,
        k: 768,
        n: 2048,
        bf16: false,
    },
    Gemm {
        m: 512,
        k: 768,
        n: 2048,
        bf16: true,
    },
    Gemm {
        m: 1,
        k: 4096,
        n: 4096,
        bf16: true,
    },
];

fn gemm(c: &mut Criterion) {
    let mut target = Target::Cpu;
    let mut group = target.group(c, "host/matmul_nt");
    for g in GEMMS {
        let (m, k, n) = (g.m, g.k, g.n);
        let x = random_f32(m * k, 1);
        let w = random_f32(n * k, 2);
        let w16: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
        let weights = if g.bf16 {
            Weights::BF16(&w16)
        } else {
            Weights::F32(&w)
        };
        let dtype = if g.bf16 { "bf16" } else { "f32" };
        let work = if m == 1 {
            Work::Bytes((n * k * if g.bf16 { 2 } else { 4 }) as u64)
        } else {
            Work::Flops((2 * m * k * n) as u64)
        };
        let mut y = vec![0.0f32; m * n];
        target.bench(&mut group, &format!("{dtype}/m{m}_k{k}_n{n}"), work, || {
            matmul_nt(&x, weights, m, k, n, 1.0, 0.0, &mut y)
        });
    }
    group.finish();
}

fn attention(c: &mut Criterion) {
    let (seq, heads, d) = (512, 12, 64);
    let dims = KvDims {
        q_tokens: seq,
        kv_tokens: seq,
        q_heads: heads,
        kv_heads: heads,
        head_dim: d,
    };
    let q = random_f32(seq * heads * d, 1);
    let k = random_f32(seq * heads * d, 2);
    let v = random_f32(seq * heads * d, 3);
    let spans = [SeqSpan { start: 0, len: seq }];
    let (mut o, mut lse) = (vec![0.0f32; q.len()], vec![0.0f32; heads * seq]);
    // Q Kᵀ and P V over the seq · (seq + 1) / 2 visible pairs of each head.
    let flops = 4 * d * heads * seq * (seq + 1) / 2;
    let mut target = Target::Cpu;
    let mut group = target.group(c, "host/attention_forward");
    target.bench(
        &mut group,
        &format!("causal/seq{seq}_heads{heads}_d{d}"),
        Work::Flops(flops as u64),
        || {
            attention_forward(
                &q,
                &k,
                &v,
                &dims,
                &spans,
                &spans,
                1.0 / (d as f32).sqrt(),
                true,
                &mut o,
                &mut lse,
            )
        },
    );
    group.finish();
}

criterion_group! {
    name = group;
    config = common::config();
    targets = gemm, attention
}
criterion_main!(group);
