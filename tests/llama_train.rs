//! LoRA training against what transformers + PEFT computed on the dev
//! fixture (`../shared/fixtures/dev/step.safetensors`, see its meta.json):
//! every LoRA gradient of one batch, the factors after one torch AdamW step
//! and the loss after it; gradient accumulation and packing against one
//! padded batch; transformers' schedules, torch's clipping, and the memory
//! estimate at the design target.

mod common;

use common::dev::{dev_dir, Step};
use platypus::llama::data::Example;
use platypus::llama::init::Preset;
use platypus::llama::train::batches::MicroBatch;
use platypus::llama::train::memory;
use platypus::llama::train::optim::{Optimizer, Schedule, Scheduler};
use platypus::llama::train::{Layout, LoraGrads, StepBatch, TrainConfig};
use platypus::llama::{Adapter, Llama, LlamaConfig, Module};
use platypus::ops::adamw::AdamW;
use platypus::Device;

/// The base model on `device` with the fixture's pre-step adapter attached.
fn model_with_adapter(device: &Device) -> (Llama, Adapter) {
    let mut model = Llama::load(&dev_dir().join("base_model"), device).unwrap();
    let adapter = Adapter::load(&dev_dir().join("adapter"), &model.config).unwrap();
    model.attach(&adapter).unwrap();
    (model, adapter)
}

/// max |got − want| / max |want|.
fn rel_diff(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    let diff = got
        .iter()
        .zip(want)
        .map(|(g, w)| (*g as f64 - *w as f64).abs())
        .fold(0.0, f64::max);
    let scale = want.iter().map(|w| (*w as f64).abs()).fold(0.0, f64::max);
    diff / scale
}

/// The gradients of `grads` as an adapter (the kernel devices' padding cut
/// off): a second copy of the model holds them in its factors' place.
fn grads_as_adapter(device: &Device, grads: &LoraGrads) -> Adapter {
    let (mut holder, adapter) = model_with_adapter(device);
    for (key, f) in holder.lora_factors_mut() {
        let (da, db) = &grads.factors[&key];
        f.a = da.to_device(device).unwrap();
        f.b = db.to_device(device).unwrap();
    }
    holder.adapter(&adapter.config).unwrap()
}

/// Largest relative difference between `got`'s factors and the fixture's
/// tensors under `prefix`, per factor; asserts each is below `tol`.
fn check_factors(step: &Step, got: &Adapter, prefix: &str, tol: f64) -> f64 {
    let mut worst = 0.0f64;
    for (&(layer, module), f) in &got.factors {
        for (factor, values) in [('A', &f.a), ('B', &f.b)] {
            let key = Step::factor_key(prefix, layer, module.path(), factor);
            let d = rel_diff(values, &step.f32s(&key));
            assert!(d < tol, "{key}: relative difference {d:e} ≥ {tol:e}");
            worst = worst.max(d);
        }
    }
    assert_eq!(
        got.factors.len(),
        2 * Module::ALL.len(),
        "every factor compared"
    );
    worst
}

/// The fraction of all factor elements whose update (post-step − pre-step)
/// differs from the fixture's by more than `by`.
fn updates_off_by(step: &Step, pre: &Adapter, post: &Adapter, by: f64) -> f64 {
    let (mut off, mut all) = (0usize, 0usize);
    for (&(layer, module), f) in &post.factors {
        let p = &pre.factors[&(layer, module)];
        for (factor, got, before) in [('A', &f.a, &p.a), ('B', &f.b, &p.b)] {
            let want = step.f32s(&Step::factor_key(
                "post_step/",
                layer,
                module.path(),
                factor,
            ));
            for ((g, w), b) in got.iter().zip(&want).zip(before) {
                let (dg, dw) = (*g as f64 - *b as f64, *w as f64 - *b as f64);
                off += ((dg - dw).abs() > by) as usize;
                all += 1;
            }
        }
    }
    off as f64 / all as f64
}

/// The fixture's optimizer: torch AdamW, lr 0.002, no schedule or clipping.
fn fixture_optimizer(model: &Llama) -> Optimizer {
    let schedule = Schedule {
        lr: 2e-3,
        warmup: 0,
        total: 1,
        kind: Scheduler::Constant,
    };
    let adamw = AdamW {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.01,
    };
    Optimizer::new(model, adamw, schedule, 0.0).unwrap()
}

/// One step of the fixture on `device`: (gradient, post-step factor, loss
/// before and after) differences, each asserted below its tolerance.
fn fixture_step(device: &Device, tol: [f64; 5]) -> [f64; 5] {
    let step = Step::load();
    let (mut model, adapter) = model_with_adapter(device);
    let (positions, targets) = (step.positions(), step.targets());
    let batch = step.step_batch(&positions, &targets);
    let counted = batch.counted();
    assert_eq!(counted, 25, "the fixture counts 25 shifted labels");
    let (ce, grads) = model
        .forward_backward(&batch, 1.0 / counted as f32, false)
        .unwrap();
    let loss_diff = (ce.mean() - step.scalar("loss")).abs() / step.scalar("loss");
    assert!(
        loss_diff < tol[3],
        "loss: relative difference {loss_diff:e}"
    );
    let grad_diff = check_factors(&step, &grads_as_adapter(device, &grads), "grad/", tol[0]);
    let mut opt = fixture_optimizer(&model);
    let stats = opt.step(&mut model, &grads).unwrap();
    assert_eq!(stats.lr, 2e-3);
    let stepped = model.adapter(&adapter.config).unwrap();
    let post = check_factors(&step, &stepped, "post_step/", tol[1]);
    let off = updates_off_by(&step, &adapter, &stepped, 0.1 * 2e-3);
    eprintln!(
        "{device}: {:.3}% of the elements' updates differ by more than 0.1 lr",
        100.0 * off
    );
    assert!(
        off < tol[4],
        "{:.3}% of the updates differ by more than 0.1 lr",
        100.0 * off
    );
    let after = model.loss(&step.batch(), &step.labels).unwrap().mean();
    let want = step.scalar("loss_after_step");
    let after_diff = (after - want).abs() / want;
    assert!(
        after_diff < tol[2],
        "loss after the step: {after} vs {want}"
    );
    eprintln!(
        "{device}: gradients {grad_diff:e}, post-step factors {post:e}, loss after the step {after_diff:e}, loss {loss_diff:e} (relative)"
    );
    [grad_diff, post, after_diff, loss_diff, off]
}

#[test]
fn gradients_adamw_step_and_loss_match_peft_on_cpu() {
    fixture_step(&Device::Cpu, [1e-4, 1e-5, 1e-5, 1e-5, 1e-12]);
}

/// On the kernels weights and activations are bf16 (LoRA masters, their
/// gradients and AdamW's state fp32). Tolerances, with what was measured:
/// - loss 1e-3 relative (2.3e-5), loss after the step 2e-3 (1.4e-4);
/// - gradients 6e-2 of each tensor's largest |g| (1.0e-2 to 3.6e-2, the 28
///   tensors alike, no path standing out): the bf16 forward alone is 2.1e-2
///   off in the logits (llama_model's emulated logits test), and backward
///   rounds every activation gradient to bf16 again;
/// - post-step factors 1e-1 of their largest |p| (5.1e-2): AdamW's first
///   step moves each element by lr · m/√v = ±lr (up to eps), so an element
///   whose gradient is within bf16 noise of 0 may move the other way: 2 lr =
///   0.004 against max |p| = 1/√172 = 0.076 for down_proj's A is 5.3e-2.
///   What bounds the quality is how many do: under 2% of the updates may be
///   more than 0.1 lr off (0.70%).
#[test]
fn gradients_adamw_step_and_loss_match_peft_on_emulated_kernels() {
    fixture_step(&Device::Emulated, [6e-2, 1e-1, 2e-3, 1e-3, 2e-2]);
}

/// The fixture batch as two micro-batches of one row each (each only as
/// long as its row), both scaled by the whole batch's 25 counted tokens
/// (transformers' num_items_in_batch) and accumulated: the same gradients
/// as the one batch of both rows.
fn accumulation_matches_one_batch(device: &Device, tol: f64) -> f64 {
    let step = Step::load();
    let (model, _) = model_with_adapter(device);
    let (positions, targets) = (step.positions(), step.targets());
    let whole = step.step_batch(&positions, &targets);
    let scale = 1.0 / whole.counted() as f32;
    let (_, want) = model.forward_backward(&whole, scale, false).unwrap();
    let mut acc: Option<LoraGrads> = None;
    let mut loss = 0.0;
    for row in 0..step.batch {
        let len = step.lens[row] as usize;
        let cells = row * step.seq..row * step.seq + len;
        let batch = StepBatch {
            ids: &step.ids[cells.clone()],
            rows: 1,
            seq: len,
            positions: &positions[cells.clone()],
            targets: &targets[cells],
            layout: Layout::Padded {
                lens: &step.lens[row..row + 1],
            },
        };
        let (ce, grads) = model.forward_backward(&batch, scale, false).unwrap();
        loss += ce.loss_sum;
        match &mut acc {
            None => acc = Some(grads),
            Some(acc) => acc.accumulate(&grads).unwrap(),
        }
    }
    let acc = acc.unwrap();
    let mean = loss / whole.counted() as f64;
    assert!((mean - step.scalar("loss")).abs() < 1e-3 * step.scalar("loss"));
    let mut worst = 0.0f64;
    for (key, (da, db)) in &want.factors {
        let (ga, gb) = &acc.factors[key];
        for (got, w) in [(ga, da), (gb, db)] {
            let d = rel_diff(&got.to_f32_vec().unwrap(), &w.to_f32_vec().unwrap());
            assert!(d < tol, "{key:?}: accumulated vs whole batch {d:e}");
            worst = worst.max(d);
        }
    }
    eprintln!(
        "{device}: two accumulated micro-batches vs one batch: gradients {worst:e} (relative)"
    );
    worst
}

#[test]
fn accumulated_micro_batches_give_the_gradients_of_one_batch_on_cpu() {
    accumulation_matches_one_batch(&Device::Cpu, 1e-5);
}

/// bf16 activations: each row goes through the same kernels alone as with
/// the other row (1.4e-7 measured: the fp32 reductions over tokens add in
/// another order).
#[test]
fn accumulated_micro_batches_give_the_gradients_of_one_batch_on_emulated_kernels() {
    accumulation_matches_one_batch(&Device::Emulated, 1e-5);
}

/// The fixture's two rows as examples (real tokens only).
fn fixture_examples(step: &Step) -> Vec<Example> {
    (0..step.batch)
        .map(|b| {
            let len = step.lens[b] as usize;
            let row = b * step.seq..b * step.seq + len;
            Example {
                input_ids: step.ids[row.clone()].to_vec(),
                labels: step.labels[row].to_vec(),
                attention_mask: vec![1; len],
            }
        })
        .collect()
}

/// The same two examples packed into one row (varlen attention, positions
/// restarting) and padded: the same loss and gradients (bit for bit as
/// measured on both devices: every row is computed alike, and the padding's
/// gradients are exact zeros in the sums over tokens).
fn packing_matches_padding(device: &Device, tol: f64) {
    let step = Step::load();
    let (model, _) = model_with_adapter(device);
    let examples = fixture_examples(&step);
    let refs: Vec<&Example> = examples.iter().collect();
    let padded = MicroBatch::padded(&refs, 0);
    let packed = MicroBatch::packed(&refs);
    assert_eq!(packed.seq, 24 + 19);
    assert_eq!(packed.counted(), padded.counted());
    let scale = 1.0 / padded.counted() as f32;
    let (ce_pad, g_pad) = model
        .forward_backward(&padded.step(), scale, false)
        .unwrap();
    let (ce_pack, g_pack) = model
        .forward_backward(&packed.step(), scale, false)
        .unwrap();
    let loss_diff = (ce_pad.loss_sum - ce_pack.loss_sum).abs() / ce_pad.loss_sum;
    assert!(loss_diff < tol, "loss: packed vs padded {loss_diff:e}");
    let mut worst = 0.0f64;
    for (key, (da, db)) in &g_pad.factors {
        let (pa, pb) = &g_pack.factors[key];
        for (got, want) in [(pa, da), (pb, db)] {
            let d = rel_diff(&got.to_f32_vec().unwrap(), &want.to_f32_vec().unwrap());
            assert!(d < tol, "{key:?}: packed vs padded {d:e}");
            worst = worst.max(d);
        }
    }
    eprintln!("{device}: packed vs padded: loss {loss_diff:e}, gradients {worst:e} (relative)");
}

#[test]
fn packed_and_padded_batches_give_the_same_loss_and_gradients_on_cpu() {
    packing_matches_padding(&Device::Cpu, 1e-5);
}

#[test]
fn packed_and_padded_batches_give_the_same_loss_and_gradients_on_emulated_kernels() {
    packing_matches_padding(&Device::Emulated, 1e-5);
}

/// transformers' schedules at their landmarks (warmup 100, 1000 steps).
#[test]
fn schedules_follow_transformers() {
    let at = |kind, step| {
        Schedule {
            lr: 1.0,
            warmup: 100,
            total: 1000,
            kind,
        }
        .lr_at(step)
    };
    for kind in [Scheduler::Cosine, Scheduler::Linear, Scheduler::Constant] {
        assert_eq!(
            at(kind, 0),
            0.0,
            "{kind:?}: the first step under warmup is 0"
        );
        assert_eq!(at(kind, 50), 0.5);
        assert_eq!(at(kind, 100), 1.0);
    }
    assert!((at(Scheduler::Cosine, 550) - 0.5).abs() < 1e-12);
    assert!(
        (at(Scheduler::Cosine, 325) - 0.5 * (1.0 + (std::f64::consts::PI / 4.0).cos())).abs()
            < 1e-12
    );
    assert_eq!(at(Scheduler::Cosine, 1000), 0.0);
    assert!((at(Scheduler::Linear, 550) - 0.5).abs() < 1e-12);
    assert_eq!(at(Scheduler::Linear, 1000), 0.0);
    assert_eq!(at(Scheduler::Constant, 999), 1.0);
}

/// With --max-grad-norm below the gradients' norm, the step is AdamW on the
/// gradients times torch's clip factor (cpu::adamw, in f64).
#[test]
fn clipping_scales_the_gradients_as_torch_does() {
    let step = Step::load();
    let (mut model, adapter) = model_with_adapter(&Device::Cpu);
    let (positions, targets) = (step.positions(), step.targets());
    let batch = step.step_batch(&positions, &targets);
    let (_, grads) = model.forward_backward(&batch, 1.0 / 25.0, false).unwrap();
    let g: Vec<Vec<f32>> = grads
        .factors
        .values()
        .flat_map(|(a, b)| [a.to_f32_vec().unwrap(), b.to_f32_vec().unwrap()])
        .collect();
    let norm = platypus::cpu::adamw::global_norm(&g.iter().map(Vec::as_slice).collect::<Vec<_>>());
    let max_norm = norm / 4.0;
    let mut opt = fixture_optimizer(&model);
    opt.max_grad_norm = max_norm;
    let stats = opt.step(&mut model, &grads).unwrap();
    assert!(
        (stats.grad_norm - norm).abs() < 1e-6 * norm,
        "{} vs {norm}",
        stats.grad_norm
    );
    let h = platypus::cpu::adamw::Hyper {
        lr: 2e-3,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.01,
        step: 1,
        clip: platypus::cpu::adamw::clip_factor(norm, max_norm),
    };
    assert!((h.clip - 0.25).abs() < 1e-5);
    let got = model.adapter(&adapter.config).unwrap();
    let mut worst = 0.0f64;
    for (i, (key, f)) in adapter.factors.iter().enumerate() {
        for (j, before) in [&f.a, &f.b].into_iter().enumerate() {
            let mut want = before.clone();
            let n = want.len();
            let (mut m, mut v) = (vec![0.0; n], vec![0.0; n]);
            platypus::cpu::adamw::step(&mut want, &g[2 * i + j], &mut m, &mut v, &h);
            let got = if j == 0 {
                &got.factors[key].a
            } else {
                &got.factors[key].b
            };
            worst = worst.max(rel_diff(got, &want));
        }
    }
    assert!(worst < 1e-6, "clipped step vs the reference: {worst:e}");
}

/// The design target on paper: Llama-2-13B, bf16, seq 4096, micro-batch 1,
/// LoRA r 16 on gate/up/down, without 8-bit loading, in one 80 GB A100.
#[test]
fn llama_2_13b_at_4096_tokens_fits_an_80_gb_a100_by_the_estimate() {
    let c = LlamaConfig {
        vocab_size: 32000,
        hidden_size: 5120,
        intermediate_size: 13824,
        num_hidden_layers: 40,
        num_attention_heads: 40,
        num_key_value_heads: 40,
        head_dim: 128,
        max_position_embeddings: 4096,
        tie_word_embeddings: false,
        ..Preset::Small.config()
    };
    let adapter = TrainConfig::default().adapter_config(None);
    let full = memory::estimate(&c, &adapter, 1, 4096, 2, false);
    let recomputed = memory::estimate(&c, &adapter, 1, 4096, 2, true);
    eprintln!("Llama-2-13B bf16, 1 × 4096: {full}; recomputing: {recomputed}");
    let weights = 2 * 13_015_864_320u64; // the checkpoint's parameters × 2 bytes
    assert!((full.weights as i64 - weights as i64).unsigned_abs() < weights / 100);
    assert!(full.total < 80_000_000_000, "{full}");
    assert!(recomputed.total < full.total);
}

/// Recomputing each layer's activations in backward gives the gradients of
/// keeping them (bit for bit: the same ops on the same inputs).
#[test]
fn recomputed_activations_give_the_same_gradients() {
    let step = Step::load();
    for device in [Device::Cpu, Device::Emulated] {
        let (model, _) = model_with_adapter(&device);
        let (positions, targets) = (step.positions(), step.targets());
        let batch = step.step_batch(&positions, &targets);
        let (kept_ce, kept) = model.forward_backward(&batch, 0.04, false).unwrap();
        let (re_ce, re) = model.forward_backward(&batch, 0.04, true).unwrap();
        assert_eq!(kept_ce.loss_sum, re_ce.loss_sum, "{device}");
        for (key, (da, db)) in &kept.factors {
            let (ra, rb) = &re.factors[key];
            assert_eq!(
                da.to_f32_vec().unwrap(),
                ra.to_f32_vec().unwrap(),
                "{device} {key:?} A"
            );
            assert_eq!(
                db.to_f32_vec().unwrap(),
                rb.to_f32_vec().unwrap(),
                "{device} {key:?} B"
            );
        }
    }
}
