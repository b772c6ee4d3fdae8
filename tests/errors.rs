//! Bad input gives a typed error naming the argument, on every device, and
//! leaves outputs untouched.

mod common;

use platypus::ops::rmsnorm;
use platypus::ops::rope::{self, RopeConfig};
use platypus::{DType, Device, Error, Tensor};

fn zeros(shape: &[usize], dtype: DType, dev: &Device) -> Tensor {
    Tensor::zeros(shape, dtype, dev).unwrap()
}

fn ones(shape: &[usize], dtype: DType, dev: &Device) -> Tensor {
    let n = shape.iter().product();
    Tensor::from_f32(&vec![1.0; n], shape, dtype, dev).unwrap()
}

/// Asserts `r` is an error that names `arg` and mentions `text`.
fn expect_err<T: std::fmt::Debug>(r: platypus::Result<T>, arg: &str, text: &str) -> Error {
    let e = r.expect_err("bad input was accepted");
    let msg = e.to_string();
    assert!(
        msg.contains(&format!("`{arg}`")),
        "error does not name `{arg}`: {msg}"
    );
    assert!(msg.contains(text), "error does not say `{text}`: {msg}");
    e
}

#[test]
fn rmsnorm_rejects_bad_input() {
    for dev in [Device::Cpu, Device::Emulated] {
        let x = ones(&[3, 8], DType::F32, &dev);
        let w = ones(&[8], DType::F32, &dev);
        let e = expect_err(
            rmsnorm::forward(&x, &ones(&[7], DType::F32, &dev), 1e-5),
            "w",
            "[7]",
        );
        assert!(
            matches!(
                e,
                Error::Shape {
                    op: "rmsnorm::forward",
                    ..
                }
            ),
            "{e:?}"
        );
        let e = expect_err(
            rmsnorm::forward(&x, &ones(&[8], DType::BF16, &dev), 1e-5),
            "w",
            "expected f32",
        );
        assert!(
            matches!(
                e,
                Error::DType {
                    got: DType::BF16,
                    ..
                }
            ),
            "{e:?}"
        );
        expect_err(
            rmsnorm::forward(&zeros(&[3, 8], DType::I32, &dev), &w, 1e-5),
            "x",
            "expected f32, f16 or bf16",
        );
        expect_err(
            rmsnorm::forward(&zeros(&[0, 8], DType::F32, &dev), &w, 1e-5),
            "x",
            "is empty",
        );
        expect_err(
            rmsnorm::forward(&x, &w, f32::NAN),
            "eps",
            "not a finite value",
        );
        let other = if matches!(dev, Device::Cpu) {
            Device::Emulated
        } else {
            Device::Cpu
        };
        let e = expect_err(
            rmsnorm::forward(&x, &ones(&[8], DType::F32, &other), 1e-5),
            "w",
            "expected",
        );
        assert!(matches!(e, Error::Device { .. }), "{e:?}");
        expect_err(
            rmsnorm::backward(&x, &w, &ones(&[3, 9], DType::F32, &dev), 1e-5, true),
            "dy",
            "[3, 9]",
        );

        // A failed call leaves its output as it was.
        let mut y = ones(&[3, 8], DType::F32, &dev);
        expect_err(
            rmsnorm::forward_into(&x, &ones(&[7], DType::F32, &dev), &mut y, 1e-5),
            "w",
            "[7]",
        );
        expect_err(
            rmsnorm::forward_into(&x, &w, &mut ones(&[3, 8], DType::F16, &dev), 1e-5),
            "y",
            "expected f32",
        );
        assert_eq!(y.to_vec::<f32>().unwrap(), vec![1.0; 24]);
    }
}

#[test]
fn rmsnorm_backward_rejects_hidden_sizes_whose_dw_does_not_fit_shared_memory() {
    let dev = Device::Emulated;
    let hidden = 60_000;
    let x = zeros(&[1, hidden], DType::BF16, &dev);
    let w = zeros(&[hidden], DType::BF16, &dev);
    expect_err(
        rmsnorm::backward(&x, &w, &x, 1e-5, true),
        "x",
        "bytes of shared memory",
    );
    // Without dw (frozen weights) there is no such limit.
    assert!(rmsnorm::backward(&x, &w, &x, 1e-5, false)
        .unwrap()
        .dw
        .is_none());
}

#[test]
fn rope_rejects_bad_input() {
    for dev in [Device::Cpu, Device::Emulated] {
        let cfg = RopeConfig::default();
        let pos = Tensor::from_slice(&[0i32, 1, 2], &[1, 3], &dev).unwrap();
        let mut q = ones(&[1, 3, 4, 8], DType::F32, &dev);
        let mut k = ones(&[1, 3, 2, 8], DType::F32, &dev);
        expect_err(
            rope::forward(&mut ones(&[3, 4, 8], DType::F32, &dev), &mut k, &pos, &cfg),
            "q",
            "[batch, seq, q_heads, head_dim]",
        );
        expect_err(
            rope::forward(
                &mut ones(&[1, 3, 4, 7], DType::F32, &dev),
                &mut k,
                &pos,
                &cfg,
            ),
            "q",
            "odd",
        );
        expect_err(
            rope::forward(
                &mut q,
                &mut ones(&[1, 3, 2, 6], DType::F32, &dev),
                &pos,
                &cfg,
            ),
            "k",
            "[1, 3, k_heads, 8]",
        );
        expect_err(
            rope::forward(
                &mut q,
                &mut ones(&[1, 3, 2, 8], DType::F16, &dev),
                &pos,
                &cfg,
            ),
            "k",
            "expected f32",
        );
        let wrong = Tensor::from_slice(&[0i64, 1, 2], &[1, 3], &dev).unwrap();
        expect_err(
            rope::forward(&mut q, &mut k, &wrong, &cfg),
            "positions",
            "expected i32",
        );
        let short = Tensor::from_slice(&[0i32, 1], &[1, 2], &dev).unwrap();
        expect_err(
            rope::forward(&mut q, &mut k, &short, &cfg),
            "positions",
            "[1, 2]",
        );
        let bad_theta = RopeConfig { theta: 0.0, ..cfg };
        expect_err(
            rope::forward(&mut q, &mut k, &pos, &bad_theta),
            "cfg.theta",
            "not a finite value > 0",
        );
        assert_eq!(
            q.to_vec::<f32>().unwrap(),
            vec![1.0; 96],
            "q was modified by a rejected call"
        );
    }
}

#[test]
fn tensor_constructors_reject_bad_input() {
    let e = Tensor::from_slice(&[1.0f32, 2.0], &[3], &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(e.contains("`data`") && e.contains("has 2 elements"), "{e}");
    let t = Tensor::from_slice(&[1.0f32, 2.0], &[2], &Device::Cpu).unwrap();
    assert!(t
        .to_vec::<half::bf16>()
        .unwrap_err()
        .to_string()
        .contains("expected f32"));
    // SAFETY: rejected before the pointer is used.
    let e = unsafe { Tensor::from_raw_cuda(0x1001, &[4], DType::F32, &Device::Cpu) }
        .unwrap_err()
        .to_string();
    assert!(e.contains("`ptr`") && e.contains("not aligned"), "{e}");
    // SAFETY: rejected before the pointer is used.
    let e = unsafe { Tensor::from_raw_cuda(0x1000, &[4], DType::F32, &Device::Cpu) }
        .unwrap_err()
        .to_string();
    assert!(e.contains("a CUDA device"), "{e}");
}

#[test]
fn attention_rejects_bad_input() {
    use platypus::ops::attention::{self, AttentionConfig, Batch};
    let cfg = AttentionConfig::default();
    for (dev, dtype) in [(Device::Cpu, DType::F32), (Device::Emulated, DType::BF16)] {
        let q = ones(&[2, 5, 4, 64], dtype, &dev);
        let kv = ones(&[2, 5, 2, 64], dtype, &dev);
        let fwd = |q: &Tensor, k: &Tensor, batch| attention::forward(q, k, k, batch, &cfg);
        let q80 = ones(&[2, 5, 4, 80], dtype, &dev);
        if matches!(dev, Device::Cpu) {
            // The CPU runs any head dim; only the kernels have a fixed set.
            let kv80 = ones(&[2, 5, 2, 80], dtype, &dev);
            assert_eq!(
                fwd(&q80, &kv80, Batch::Dense).unwrap().o.shape(),
                &[2, 5, 4, 80]
            );
        } else {
            expect_err(
                fwd(&q80, &kv, Batch::Dense),
                "q",
                "head_dim 80 has no kernel",
            );
        }
        expect_err(
            fwd(&q, &ones(&[2, 5, 3, 64], dtype, &dev), Batch::Dense),
            "k",
            "3 kv heads do not divide the 4 query heads",
        );
        expect_err(
            fwd(&q, &ones(&[2, 6, 2, 64], dtype, &dev), Batch::Dense),
            "k",
            "[2, 5, 2, 64]",
        );
        expect_err(
            fwd(&q, &kv, Batch::Padded(&[5, 6])),
            "batch",
            "sequence 1 has length 6, beyond the padded length 5",
        );
        expect_err(
            fwd(&q, &kv, Batch::Padded(&[5])),
            "batch",
            "1 sequence lengths for a batch of 2",
        );
        expect_err(
            fwd(&q, &kv, Batch::Packed(&[0, 10])),
            "q",
            "[tokens, q_heads, head_dim]",
        );
        let (qp, kvp) = (
            ones(&[10, 4, 64], dtype, &dev),
            ones(&[10, 2, 64], dtype, &dev),
        );
        expect_err(
            fwd(&qp, &kvp, Batch::Packed(&[0, 6, 4, 10])),
            "batch",
            "cu_seqlens decreases at index 2",
        );
        expect_err(
            fwd(&qp, &kvp, Batch::Packed(&[0, 6, 9])),
            "batch",
            "cu_seqlens ends at 9, but q has 10 tokens",
        );
        expect_err(
            fwd(&qp, &kvp, Batch::Packed(&[1, 10])),
            "batch",
            "must start at 0",
        );
        let bad_scale = AttentionConfig {
            causal: true,
            scale: Some(f32::INFINITY),
        };
        expect_err(
            attention::forward(&q, &kv, &kv, Batch::Dense, &bad_scale),
            "cfg.scale",
            "not finite",
        );
        // Backward checks what the forward pass handed over.
        let out = attention::forward(&q, &kv, &kv, Batch::Dense, &cfg).unwrap();
        let short = ones(&[2, 5, 4, 32], dtype, &dev);
        expect_err(
            attention::backward(&q, &kv, &kv, &out, &short, Batch::Dense, &cfg),
            "dout",
            "[2, 5, 4, 64]",
        );
    }
    // The kernels run on tensor cores: f32 only on the CPU.
    let dev = Device::Emulated;
    let e = expect_err(
        attention::forward(
            &ones(&[1, 3, 2, 32], DType::F32, &dev),
            &ones(&[1, 3, 2, 32], DType::F32, &dev),
            &ones(&[1, 3, 2, 32], DType::F32, &dev),
            Batch::Dense,
            &cfg,
        ),
        "q",
        "f16 or bf16",
    );
    assert!(
        matches!(
            e,
            Error::DType {
                got: DType::F32,
                ..
            }
        ),
        "{e:?}"
    );
}

#[test]
fn lora_rejects_bad_input() {
    use platypus::ops::lora::{self, LoraConfig, LoraWeights};
    let cfg = LoraConfig::default();
    for (dev, dtype) in [(Device::Cpu, DType::F32), (Device::Emulated, DType::BF16)] {
        let x = ones(&[3, 16], dtype, &dev);
        let w = ones(&[8, 16], dtype, &dev);
        let a = ones(&[4, 16], DType::F32, &dev);
        let b = ones(&[8, 4], DType::F32, &dev);
        let fwd = |x: &Tensor, w: &Tensor, a: &Tensor, b: &Tensor, cfg: &LoraConfig| {
            lora::forward(x, LoraWeights { w, a, b }, cfg)
        };
        expect_err(
            fwd(&x, &w, &ones(&[0, 16], DType::F32, &dev), &b, &cfg),
            "weights.a",
            "r >= 1",
        );
        expect_err(
            fwd(&x, &w, &ones(&[4, 12], DType::F32, &dev), &b, &cfg),
            "weights.a",
            "[r, 16]",
        );
        expect_err(
            fwd(&x, &w, &a, &ones(&[8, 5], DType::F32, &dev), &cfg),
            "weights.b",
            "[8, 4]",
        );
        expect_err(
            fwd(&x, &ones(&[8, 12], dtype, &dev), &a, &b, &cfg),
            "weights.w",
            "[out, 16]",
        );
        expect_err(
            fwd(&x, &w, &ones(&[4, 16], DType::BF16, &dev), &b, &cfg),
            "weights.a",
            "expected f32",
        );
        let bad = LoraConfig {
            dropout: 1.0,
            ..cfg
        };
        expect_err(fwd(&x, &w, &a, &b, &bad), "cfg.dropout", "not in [0, 1)");
        let out = fwd(&x, &w, &a, &b, &cfg).unwrap();
        expect_err(
            lora::backward(
                &x,
                &ones(&[3, 9], dtype, &dev),
                LoraWeights {
                    w: &w,
                    a: &a,
                    b: &b,
                },
                &out.u,
                &cfg,
            ),
            "dy",
            "[3, 8]",
        );
    }
    // The kernels need 16-bit data and rows of whole 16-byte chunks.
    let dev = Device::Emulated;
    let (a, b) = (
        ones(&[4, 12], DType::F32, &dev),
        ones(&[8, 4], DType::F32, &dev),
    );
    let (x, w) = (
        ones(&[3, 12], DType::BF16, &dev),
        ones(&[8, 12], DType::BF16, &dev),
    );
    expect_err(
        lora::forward(
            &x,
            LoraWeights {
                w: &w,
                a: &a,
                b: &b,
            },
            &cfg,
        ),
        "x",
        "multiple of 8",
    );
    let (x, w) = (
        ones(&[3, 16], DType::F32, &dev),
        ones(&[8, 16], DType::F32, &dev),
    );
    let a = ones(&[4, 16], DType::F32, &dev);
    expect_err(
        lora::forward(
            &x,
            LoraWeights {
                w: &w,
                a: &a,
                b: &b,
            },
            &cfg,
        ),
        "x",
        "f16 or bf16",
    );
}

#[test]
fn copy_from_rejects_another_shape_or_dtype_and_leaves_the_target() {
    for (src_dev, dst_dev) in [
        (Device::Cpu, Device::Emulated),
        (Device::Emulated, Device::Emulated),
    ] {
        let mut dst = zeros(&[2, 3], DType::F32, &dst_dev);
        expect_err(
            dst.copy_from(&ones(&[3, 2], DType::F32, &src_dev)),
            "src",
            "[3, 2]",
        );
        expect_err(
            dst.copy_from(&ones(&[2, 3], DType::BF16, &src_dev)),
            "src",
            "bf16",
        );
        assert_eq!(dst.to_vec::<f32>().unwrap(), [0.0; 6]);
        dst.copy_from(&ones(&[2, 3], DType::F32, &src_dev)).unwrap();
        assert_eq!(dst.to_vec::<f32>().unwrap(), [1.0; 6]);
    }
}

#[test]
fn tensor_shapes_that_overflow_are_errors_not_panics() {
    use platypus::ops::cosine_topk::{self, Exclude};
    // The element count overflows usize; the byte count overflows; the
    // bytes exceed one allocation; each on every constructor that takes a shape.
    let huge = [usize::MAX / 2 + 1, 2];
    let bytes_overflow = [1usize << 62, 1];
    let too_big = [1usize << 61, 1];
    for dev in [Device::Cpu, Device::Emulated] {
        for shape in [&huge[..], &bytes_overflow[..], &too_big[..]] {
            expect_err(
                Tensor::zeros(shape, DType::F32, &dev),
                "shape",
                "more than one allocation",
            );
            expect_err(
                Tensor::from_slice(&[1.0f32], shape, &dev),
                "shape",
                "more than one allocation",
            );
            let t = ones(&[2, 1], DType::F32, &dev);
            expect_err(t.reshape(shape), "shape", "more than one allocation");
        }
        // Fits the address space, not the memory: an error from the allocator, not an abort.
        expect_err(
            Tensor::zeros(&[1 << 56], DType::F32, &dev),
            "shape",
            "could not be allocated",
        );
    }
    // What the issue saw: a self-search on such a tensor cannot happen, the tensor is refused first.
    let e = Tensor::from_slice(&[0.0f32; 4], &[usize::MAX / 2 + 1, 2], &Device::Cpu);
    assert!(e.is_err());
    let ok = Tensor::from_slice(&[1.0f32, 0.0, 0.0, 1.0], &[2, 2], &Device::Cpu).unwrap();
    assert!(cosine_topk::topk_self(&ok, 1, Exclude::SameIndex).is_ok());
}
