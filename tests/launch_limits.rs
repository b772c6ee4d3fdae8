//! Every kernel's launch shapes against every arch nvcc built for. Each op is
//! planned ([`emu::plan`]: its launches checked against the arch's limits and
//! the kernel's ptxas report for that arch, recorded, not run) at small
//! shapes and at the shapes of Llama 2 7B/13B fine-tuning and of the
//! curation searches; on every arch the plans must launch every GPU kernel.
//! The rmsnorm backward's shared memory is checked at the widths where its
//! limits sit.

mod common;

use std::collections::BTreeSet;

use common::built_with_nvcc;
use platypus::emu::{self, PlannedLaunch};
use platypus::kernels;
use platypus::ops::attention::{self, AttentionConfig, Batch};
use platypus::ops::cosine_topk::{self, Exclude};
use platypus::ops::linear::{self, Activation};
use platypus::ops::lora::{self, LoraConfig, LoraWeights};
use platypus::ops::rope::{self, RopeConfig, RopeStyle};
use platypus::ops::{embedding, swiglu};
use platypus::ops::{layernorm, rmsnorm};
use platypus::{DType, Device, Error, Result, Tensor};

/// A zeroed emulated tensor (host pages stay untouched: planning reads nothing).
fn zeros(shape: &[usize], dtype: DType) -> Tensor {
    Tensor::zeros(shape, dtype, &Device::Emulated).unwrap()
}

fn rmsnorm_plans(hidden: usize, rows: usize, dtype: DType) -> Result<()> {
    let x = zeros(&[rows, hidden], dtype);
    let w = zeros(&[hidden], dtype);
    rmsnorm::forward(&x, &w, 1e-5)?;
    for want_dw in [false, true] {
        rmsnorm::backward(&x, &w, &x, 1e-5, want_dw)?;
    }
    let mut h = zeros(&[rows, hidden], dtype);
    rmsnorm::add_forward(&mut h, &x, &w, 1e-5)?;
    Ok(())
}

/// The embedding gather from a `dtype` table into every float dtype, and
/// SwiGLU forward and backward, at small odd shapes and Llama 2 7B/13B ones
/// at 4096 tokens (hidden 4096 and 5120, MLP widths 11008 and 13824), and
/// LayerNorm with and without the residual at the sentence encoders' widths
/// (MiniLM 384, BERT-base 768, BERT-large 1024).
fn elementwise_plans(dtype: DType) -> Result<()> {
    for (tokens, hidden) in [(5, 8), (3, 37), (4096, 4096), (4096, 5120), (7, 8192)] {
        // A small vocabulary: planning never reads the ids.
        let table = zeros(&[4, hidden], dtype);
        let ids = vec![3u32; tokens];
        for out in [DType::F32, DType::F16, DType::BF16] {
            embedding::forward(&table, &ids, out)?;
        }
    }
    for (rows, width) in [(1, 1), (3, 37), (5, 8), (4096, 11008), (4096, 13824)] {
        let gate = zeros(&[rows, width], dtype);
        swiglu::forward(&gate, &gate)?;
        swiglu::backward(&gate, &gate, &gate)?;
    }
    for (rows, hidden) in [(1, 1), (3, 37), (5, 8), (4096, 384), (4096, 768), (7, 1024)] {
        let mut h = zeros(&[rows, hidden], dtype);
        let w = zeros(&[hidden], dtype);
        layernorm::forward(&h, &w, &w, 1e-12)?;
        let delta = zeros(&[rows, hidden], dtype);
        layernorm::residual_forward(&mut h, &delta, &w, &w, 1e-12)?;
    }
    Ok(())
}

fn rope_plans(dtype: DType) -> Result<()> {
    // (batch, seq, q heads, k heads, head dim)
    for (batch, seq, q_heads, k_heads, head_dim) in [
        (1, 3, 2, 1, 6),
        (1, 4096, 32, 32, 128),
        (2, 4096, 40, 8, 128),
        (3, 17, 4, 2, 64),
    ] {
        let mut q = zeros(&[batch, seq, q_heads, head_dim], dtype);
        let mut k = zeros(&[batch, seq, k_heads, head_dim], dtype);
        let positions = zeros(&[batch, seq], DType::I32);
        for style in [RopeStyle::RotateHalf, RopeStyle::Interleaved] {
            let cfg = RopeConfig {
                theta: 10000.0,
                style,
            };
            rope::forward(&mut q, &mut k, &positions, &cfg)?;
            rope::backward(&mut q, &mut k, &positions, &cfg)?;
        }
    }
    Ok(())
}

fn attention_plans(dtype: DType) -> Result<()> {
    // (batch, seq, q heads, kv heads): Llama 2 7B and 13B at 4096 tokens, GQA, short.
    for (batch, seq, heads, kv_heads) in [
        (1, 4096, 32, 32),
        (1, 4096, 40, 40),
        (2, 1000, 8, 2),
        (3, 17, 4, 4),
    ] {
        for d in attention::HEAD_DIMS {
            let q = zeros(&[batch, seq, heads, d], dtype);
            let kv = zeros(&[batch, seq, kv_heads, d], dtype);
            let lens: Vec<u32> = (0..batch as u32)
                .map(|b| (seq as u32).saturating_sub(7 * b))
                .collect();
            for batching in [Batch::Dense, Batch::Padded(&lens)] {
                for causal in [false, true] {
                    let cfg = AttentionConfig {
                        causal,
                        scale: None,
                    };
                    let fwd = attention::forward(&q, &kv, &kv, batching, &cfg)?;
                    attention::backward(&q, &kv, &kv, &fwd, &q, batching, &cfg)?;
                }
            }
        }
    }
    let (tokens, d) = (4096 + 517, 128);
    let cu = [0u32, 4096, 4096 + 517];
    let q = zeros(&[tokens, 32, d], dtype);
    let fwd = attention::forward(
        &q,
        &q,
        &q,
        Batch::Packed(&cu),
        &AttentionConfig {
            causal: true,
            scale: None,
        },
    )?;
    attention::backward(
        &q,
        &q,
        &q,
        &fwd,
        &q,
        Batch::Packed(&cu),
        &AttentionConfig {
            causal: true,
            scale: None,
        },
    )?;
    // Decoding and chunked prefill against a KV cache: Llama 2 7B at a
    // 4096-token cache, one new token and 517, and GQA.
    for (new, heads, kv_heads, d) in [
        (1, 32, 32, 128),
        (517, 32, 32, 128),
        (1, 8, 2, 64),
        (3, 4, 4, 16),
    ] {
        let capacity = 4096;
        let mut k_cache = zeros(&[1, capacity, kv_heads, d], dtype);
        let v_cache = zeros(&[1, capacity, kv_heads, d], dtype);
        attention::write_cache(
            &mut k_cache,
            &zeros(&[1, new, kv_heads, d], dtype),
            capacity - new,
        )?;
        let q = zeros(&[1, new, heads, d], dtype);
        attention::forward_cached(
            &q,
            &k_cache,
            &v_cache,
            capacity,
            &AttentionConfig {
                causal: true,
                scale: None,
            },
        )?;
    }
    // The cache copy's narrower units: rows of 12 bytes (4-byte units) and 6 (2-byte).
    for width in [6, 3] {
        let mut cache = zeros(&[2, 9, 1, width], dtype);
        attention::write_cache(&mut cache, &zeros(&[2, 5, 1, width], dtype), 4)?;
    }
    Ok(())
}

fn lora_plans(dtype: DType) -> Result<()> {
    // (tokens, in, out, r): Llama 2 7B/13B projections and MLP at 4096 tokens, and small odd shapes.
    for (tokens, d_in, d_out, r) in [
        (4096, 4096, 4096, 16),
        (4096, 4096, 11008, 16),
        (4096, 11008, 4096, 16),
        (4096, 5120, 5120, 16),
        (4096, 5120, 13824, 64),
        (37, 24, 40, 3),
    ] {
        let x = zeros(&[tokens, d_in], dtype);
        let mut w = zeros(&[d_out, d_in], dtype);
        let a = zeros(&[r, d_in], DType::F32);
        let b = zeros(&[d_out, r], DType::F32);
        for dropout in [0.0, 0.1] {
            let cfg = LoraConfig {
                dropout,
                ..LoraConfig::default()
            };
            let weights = LoraWeights {
                w: &w,
                a: &a,
                b: &b,
            };
            let out = lora::forward(&x, weights, &cfg)?;
            let dy = zeros(out.y.shape(), dtype);
            lora::backward(&x, &dy, weights, &out.u, &cfg)?;
            lora::forward_unfused(&x, weights, &cfg)?;
        }
        lora::linear(&x, &w)?;
        linear::forward(&x, &w, Some(&zeros(&[d_out], dtype)), Activation::Gelu)?;
        lora::linear_backward(&zeros(&[tokens, d_out], dtype), &w)?;
        lora::merge(&mut w, &a, &b, 1.0)?;
        lora::unmerge(&mut w, &a, &b, 1.0)?;
    }
    Ok(())
}

fn cosine_plans(dtype: DType) -> Result<()> {
    // (queries, database, dim, k): a curation search at scale, and small odd shapes.
    for (m, n, dim, k) in [
        (10_000, 50_000, 384, 10),
        (130, 1100, 37, 300),
        (5, 3, 8, 1024),
    ] {
        let q = zeros(&[m, dim], dtype);
        let db = zeros(&[n, dim], dtype);
        cosine_topk::topk(&q, &db, k)?;
        cosine_topk::topk_self(&db, k, Exclude::NotEarlier)?;
        cosine_topk::above_threshold(&q, &db, 0.9, 1 << 20)?;
        cosine_topk::above_threshold_self(&db, 0.9, 1 << 20, Exclude::SameIndex)?;
        let host_db = Tensor::zeros(&[n, dim], dtype, &Device::Cpu)?;
        cosine_topk::topk_streamed(&q, &host_db, k, n.div_ceil(3))?;
    }
    Ok(())
}

/// The LM head fused with cross-entropy at Llama 2 7B's (hidden 4096, vocab
/// 32,000: two 2048-token chunks of 4096) and 13B's head, and at small odd
/// shapes; the row kernel alone; argmax and sampling over 32,000-wide rows.
fn head_plans(dtype: DType) -> Result<()> {
    use platypus::ops::{cross_entropy, sampling};
    if dtype != DType::F32 {
        for (tokens, hidden, vocab) in [(4096, 4096, 32000), (4096, 5120, 32000), (37, 24, 301)] {
            let h = zeros(&[tokens, hidden], dtype);
            let w = zeros(&[vocab, hidden], dtype);
            cross_entropy::linear_cross_entropy(&h, &w, &vec![0; tokens])?;
        }
    }
    for (rows, vocab) in [(4096, 32000), (3, 301), (1, 1)] {
        let z = zeros(&[rows, vocab], dtype);
        cross_entropy::forward_logits(&z, &vec![0; rows])?;
        sampling::argmax(&z)?;
        sampling::sample(&z, 0.7, 0.9, &vec![0.5; rows])?;
    }
    Ok(())
}

/// The training step's kernels. In 16 bits: the fused head with its
/// gradient (the dlogits row kernel and the nn GEMM back through the head)
/// at Llama 2 7B's and 13B's head over 4096 tokens and at a small odd shape
/// (vocab 301: 8-aligned dlogits rows over a zero-padded head), and
/// add_assign over 4096 tokens of 7B's hidden and MLP widths and an odd
/// length. In f32: AdamW's step, the gradient norm and accumulation over
/// the LoRA factors of Llama 2 7B at r 16 on all seven projections (448
/// tensors, 40 M parameters, 640 chunks of ≤ 65,536) and over odd, empty
/// and multi-chunk tensors.
fn train_plans(dtype: DType) -> Result<()> {
    use platypus::ops::adamw::{self, AdamW, State};
    use platypus::ops::{add, cross_entropy};
    if dtype != DType::F32 {
        for (tokens, hidden, vocab) in [(4096, 4096, 32000), (4096, 5120, 32000), (37, 24, 301)] {
            let h = zeros(&[tokens, hidden], dtype);
            let w = zeros(&[vocab, hidden], dtype);
            cross_entropy::linear_cross_entropy_grad(&h, &w, &vec![0; tokens], 1.0)?;
        }
        for shape in [[4096, 4096], [4096, 11008], [3, 37]] {
            let mut y = zeros(&shape, dtype);
            add::add_assign(&mut y, &zeros(&shape, dtype))?;
        }
        return Ok(());
    }
    let (hidden, mlp, r) = (4096, 11008, 16);
    // (rows, cols) of A and B of q, k, v, o, gate, up, down.
    let factors = [
        [(r, hidden), (hidden, r)],
        [(r, hidden), (hidden, r)],
        [(r, hidden), (hidden, r)],
        [(r, hidden), (hidden, r)],
        [(r, hidden), (mlp, r)],
        [(r, hidden), (mlp, r)],
        [(r, mlp), (hidden, r)],
    ];
    let llama_7b: Vec<usize> = (0..32)
        .flat_map(|_| factors.iter().flatten().map(|&(a, b)| a * b))
        .collect();
    assert_eq!(llama_7b.iter().sum::<usize>(), 39_976_960);
    for sizes in [llama_7b, vec![5, 0, 2 * adamw::CHUNK + 3, 1]] {
        let tensors =
            || -> Vec<Tensor> { sizes.iter().map(|&n| zeros(&[n], DType::F32)).collect() };
        let (mut params, grads, mut acc) = (tensors(), tensors(), tensors());
        let grads: Vec<&Tensor> = grads.iter().collect();
        let mut state = State::new(&params.iter().collect::<Vec<_>>())?;
        adamw::global_norm(&grads)?;
        adamw::accumulate(&mut acc.iter_mut().collect::<Vec<_>>(), &grads)?;
        adamw::step(
            &mut params.iter_mut().collect::<Vec<_>>(),
            &grads,
            &mut state,
            &AdamW::default(),
            1e-4,
            0.5,
        )?;
    }
    Ok(())
}

/// The launches `plans` makes on `arch`; each must be an error-free plan.
fn plan_all(arch: u32, what: &str, plans: impl FnOnce() -> Result<()>) -> Vec<PlannedLaunch> {
    let (result, launches) = emu::plan(arch, plans);
    result.unwrap_or_else(|e| panic!("sm_{arch}, {what}: {e}"));
    launches
}

#[test]
fn every_kernel_launches_within_every_archs_limits() {
    if !built_with_nvcc() {
        return;
    }
    let expected: BTreeSet<&str> = kernels::gpu_kernel_names().collect();
    for &arch in kernels::CUDA_ARCHS {
        let mut launched = BTreeSet::new();
        let mut count = 0;
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let mut launches = plan_all(arch, &format!("rmsnorm {dtype}"), || {
                for hidden in [8, 37, 4096, 5120, 8192, 12288, 16384] {
                    rmsnorm_plans(hidden, 5, dtype)?;
                }
                rmsnorm_plans(4096, 4096, dtype)
            });
            launches.extend(plan_all(arch, &format!("rope {dtype}"), || {
                rope_plans(dtype)
            }));
            launches.extend(plan_all(arch, &format!("elementwise {dtype}"), || {
                elementwise_plans(dtype)
            }));
            launches.extend(plan_all(arch, &format!("cosine {dtype}"), || {
                cosine_plans(dtype)
            }));
            launches.extend(plan_all(arch, &format!("head {dtype}"), || {
                head_plans(dtype)
            }));
            launches.extend(plan_all(arch, &format!("train {dtype}"), || {
                train_plans(dtype)
            }));
            if dtype != DType::F32 {
                launches.extend(plan_all(arch, &format!("attention {dtype}"), || {
                    attention_plans(dtype)
                }));
                launches.extend(plan_all(arch, &format!("lora {dtype}"), || {
                    lora_plans(dtype)
                }));
            }
            for l in &launches {
                assert!(
                    kernels::resources(&l.kernel, arch).is_some(),
                    "{} has no sm_{arch} ptxas report, so its launch went unchecked",
                    l.kernel
                );
            }
            count += launches.len();
            launched.extend(launches.into_iter().map(|l| l.kernel));
        }
        let missing: Vec<_> = expected
            .iter()
            .filter(|k| !launched.contains(**k))
            .collect();
        assert!(
            missing.is_empty(),
            "sm_{arch}: no planned launch of {missing:?}"
        );
        eprintln!(
            "sm_{arch}: {count} launches of {} kernels within limits",
            launched.len()
        );
    }
}

/// The backward's dw row (4 bytes per column) sits in dynamic shared memory
/// beside 128 bytes of static: past 48 KiB in all (hidden 12,257 and up) the
/// launch opts in, and no arch is asked for more than it has.
#[test]
fn rmsnorm_backward_shared_memory_opts_in_and_stays_within_each_arch() {
    if !built_with_nvcc() {
        return;
    }
    for &arch in kernels::CUDA_ARCHS {
        let limits = platypus::launch::arch_limits(arch).unwrap();
        let static_bytes = kernels::resources("rmsnorm_backward_f32", arch)
            .unwrap()
            .shared_bytes;
        assert_eq!(
            static_bytes, 128,
            "sm_{arch}: the kernel's static shared memory changed; update the boundary widths"
        );
        let optin_of = |hidden: usize| {
            let launches = plan_all(arch, &format!("rmsnorm dw at {hidden}"), || {
                let x = zeros(&[2, hidden], DType::F32);
                rmsnorm::backward(&x, &zeros(&[hidden], DType::F32), &x, 1e-5, true).map(|_| ())
            });
            launches
                .iter()
                .find(|l| l.kernel == "rmsnorm_backward_f32")
                .unwrap()
                .shared_optin
        };
        assert_eq!(
            optin_of(12_256),
            0,
            "sm_{arch}: 128 + 49024 bytes fit without opting in"
        );
        assert_eq!(optin_of(12_257), 12_257 * 4, "sm_{arch}");
        assert_eq!(optin_of(12_288), 12_288 * 4, "sm_{arch}");
        // The widest dw row that fits, and one column more.
        let widest = (limits.shared_optin as usize - static_bytes as usize) / 4;
        assert_eq!(optin_of(widest), widest as u32 * 4, "sm_{arch}");
        let (r, _) = emu::plan(arch, || {
            let x = zeros(&[2, widest + 1], DType::F32);
            rmsnorm::backward(&x, &zeros(&[widest + 1], DType::F32), &x, 1e-5, true).map(|_| ())
        });
        match r {
            Err(e @ Error::Invalid { .. }) => {
                let e = e.to_string();
                assert!(
                    e.contains(&format!("sm_{arch}"))
                        && e.contains(&format!("hidden size {}", widest + 1)),
                    "{e}"
                );
            }
            other => panic!("sm_{arch}: hidden {} with dw: {other:?}", widest + 1),
        }
    }
}
