//! A whole LoRA training step (forward and backward through every layer,
//! the fused head's loss and gradient, AdamW over the factors) in model
//! FLOP/s: 4 · (matrix parameters) · tokens (the frozen base needs the
//! forward GEMM and the input-gradient GEMM, no weight gradients) plus the
//! LoRA factors' 6 · r · (in + out) · tokens and attention's 6 · seq² ·
//! width per layer (forward, dQ/dK/dV; causal halves it). On the CPU: the
//! `tiny` preset at the peer's 4 × 256 tokens; on a GPU: two layers of
//! Llama-2-7B's shape at 1 × 4096 tokens, LoRA r 16 on all seven projections
//! (the MFU target is ≥ 50% of the bf16 tensor-core peak).

mod common;

use criterion::Criterion;
use platypus::llama::init::{random_adapter, write_random_model, Preset};
use platypus::llama::train::batches::MicroBatch;
use platypus::llama::train::optim::{Optimizer, Schedule, Scheduler};
use platypus::llama::train::TrainConfig;
use platypus::llama::{data::Example, Llama, LlamaConfig, Module};
use platypus::DType;

use common::{Target, Work};

/// (config, rows, seq) per target.
struct Shapes {
    config: fn() -> LlamaConfig,
    rows: usize,
    seq: usize,
}

const CPU: &[Shapes] = &[Shapes {
    config: || Preset::Tiny.config(),
    rows: 4,
    seq: 256,
}];

const GPU: &[Shapes] = &[Shapes {
    config: || LlamaConfig {
        vocab_size: 32000,
        hidden_size: 4096,
        intermediate_size: 11008,
        num_hidden_layers: 2,
        num_attention_heads: 32,
        num_key_value_heads: 32,
        head_dim: 128,
        max_position_embeddings: 4096,
        tie_word_embeddings: false,
        ..Preset::Small.config()
    },
    rows: 1,
    seq: 4096,
}];

/// Model FLOPs of one step (see the module doc).
fn step_flops(c: &LlamaConfig, r: usize, tokens: usize, seq: usize) -> u64 {
    let matrices: usize = Module::ALL
        .iter()
        .map(|m| m.shape(c).iter().product::<usize>())
        .sum::<usize>()
        * c.num_hidden_layers
        + c.vocab_size * c.hidden_size;
    let lora: usize = Module::ALL
        .iter()
        .map(|m| m.shape(c).iter().sum::<usize>() * r)
        .sum::<usize>()
        * c.num_hidden_layers;
    let attention = 6 * tokens * seq * c.q_width() / 2 * c.num_hidden_layers;
    (4 * matrices * tokens + 6 * lora * tokens + attention) as u64
}

fn bench_target(c: &mut Criterion, mut target: Target, shapes: &[Shapes]) {
    let name = format!("train/{}", target.name());
    let mut group = target.group(c, &name);
    let dev = target.device().clone();
    for s in shapes {
        let config = (s.config)();
        let dir = std::env::temp_dir().join(format!("platypus-bench-train-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        write_random_model(&dir, &config, DType::F32, 0, None).unwrap();
        let mut model = Llama::load(&dir, &dev).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        let cfg = TrainConfig {
            target_modules: Module::ALL.to_vec(),
            ..TrainConfig::default()
        };
        model
            .attach(&random_adapter(&config, cfg.adapter_config(None), 1, true))
            .unwrap();
        let schedule = Schedule {
            lr: 4e-4,
            warmup: 0,
            total: u64::MAX,
            kind: Scheduler::Constant,
        };
        let mut opt = Optimizer::new(&model, Default::default(), schedule, 1.0).unwrap();
        let rows: Vec<Example> = (0..s.rows)
            .map(|b| {
                let ids: Vec<u32> = (0..s.seq)
                    .map(|t| ((b * 7919 + t * 104_729) % config.vocab_size) as u32)
                    .collect();
                Example {
                    labels: ids.iter().map(|&v| v as i64).collect(),
                    attention_mask: vec![1; s.seq],
                    input_ids: ids,
                }
            })
            .collect();
        let batch = MicroBatch::padded(&rows.iter().collect::<Vec<_>>(), 0);
        let scale = 1.0 / batch.counted() as f32;
        let tokens = s.rows * s.seq;
        let flops = Work::Flops(step_flops(&config, cfg.lora_r, tokens, s.seq));
        let id = format!(
            "step/h{}_l{}_{}x{}",
            config.hidden_size, config.num_hidden_layers, s.rows, s.seq
        );
        target.bench(&mut group, &id, flops, || {
            let (_, grads) = model.forward_backward(&batch.step(), scale, false).unwrap();
            opt.step(&mut model, &grads).unwrap()
        });
    }
    group.finish();
    target.report(&name);
}

common::cpu_then_gpu_main!(bench_target, CPU, GPU);
