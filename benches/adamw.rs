//! The optimizer over a LoRA-sized set of tensors: one AdamW step (reads p,
//! g, m, v and writes p, m, v: 28 bytes per element), the global gradient
//! norm (reads g: 4 bytes) and gradient accumulation (reads acc and g,
//! writes acc: 12 bytes), in bytes/s. On the CPU (`Device::Cpu`, rayon): the
//! LoRA factors of the ~110M Llama (hidden 768, MLP 2048, 12 layers) at r 16
//! on all seven projections, 168 tensors, 2.8 M parameters; on a GPU
//! (multi-tensor kernels, one block per ≤ 65,536-element chunk): Llama 2 7B's
//! at r 16 on all seven projections, 448 tensors, 40 M parameters.

mod common;

use criterion::Criterion;
use platypus::ops::adamw::{self, AdamW, State};
use platypus::{DType, Tensor};

use common::{random_f32, Target, Work};

/// The LoRA factors of one model: A [r, in] and B [out, r] of q, k, v, o,
/// gate, up and down in every layer.
struct Factors {
    /// Name in the bench id.
    name: &'static str,
    /// Hidden size.
    hidden: usize,
    /// MLP width.
    mlp: usize,
    /// Decoder layers.
    layers: usize,
    /// LoRA rank.
    r: usize,
}

impl Factors {
    /// Element counts of every factor, layer by layer.
    fn sizes(&self) -> Vec<usize> {
        let (h, m, r) = (self.hidden, self.mlp, self.r);
        // (in, out) of q, k, v, o, gate, up, down.
        let projections = [(h, h), (h, h), (h, h), (h, h), (h, m), (h, m), (m, h)];
        (0..self.layers)
            .flat_map(|_| projections.iter().flat_map(|&(i, o)| [r * i, o * r]))
            .collect()
    }
}

const CPU: &[Factors] = &[Factors {
    name: "llama110m_r16",
    hidden: 768,
    mlp: 2048,
    layers: 12,
    r: 16,
}];

const GPU: &[Factors] = &[Factors {
    name: "llama2_7b_r16",
    hidden: 4096,
    mlp: 11008,
    layers: 32,
    r: 16,
}];

fn bench_target(c: &mut Criterion, mut target: Target, sets: &[Factors]) {
    let name = format!("adamw/{}", target.name());
    let mut group = target.group(c, &name);
    let dev = target.device().clone();
    for set in sets {
        let sizes = set.sizes();
        let n: usize = sizes.iter().sum();
        let tensors = |seed: u64, scale: f32| -> Vec<Tensor> {
            sizes
                .iter()
                .enumerate()
                .map(|(i, &len)| {
                    let values: Vec<f32> = random_f32(len, seed + 2 * i as u64)
                        .iter()
                        .map(|v| scale * v)
                        .collect();
                    Tensor::from_f32(&values, &[len], DType::F32, &dev).unwrap()
                })
                .collect()
        };
        let mut params = tensors(1, 0.02);
        let grads = tensors(2, 1e-3);
        let grads: Vec<&Tensor> = grads.iter().collect();
        let mut state = State::new(&params.iter().collect::<Vec<_>>()).unwrap();
        let cfg = AdamW::default();
        let id = format!("{}/{}x_{n}", set.name, sizes.len());
        let elems = n as u64;
        target.bench(
            &mut group,
            &format!("step/{id}"),
            Work::Bytes(28 * elems),
            || {
                let mut p: Vec<&mut Tensor> = params.iter_mut().collect();
                adamw::step(&mut p, &grads, &mut state, &cfg, 1e-4, 1.0).unwrap()
            },
        );
        target.bench(
            &mut group,
            &format!("global_norm/{id}"),
            Work::Bytes(4 * elems),
            || adamw::global_norm(&grads).unwrap(),
        );
        drop((params, state));
        let mut acc = tensors(3, 1e-3);
        target.bench(
            &mut group,
            &format!("accumulate/{id}"),
            Work::Bytes(12 * elems),
            || {
                let mut a: Vec<&mut Tensor> = acc.iter_mut().collect();
                adamw::accumulate(&mut a, &grads).unwrap()
            },
        );
    }
    group.finish();
    target.report(&name);
}

common::cpu_then_gpu_main!(bench_target, CPU, GPU);
