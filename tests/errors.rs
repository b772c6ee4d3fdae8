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

/// The device the cross-device checks pair `dev` with.
fn other_device(dev: &Device) -> Device {
    if matches!(dev, Device::Cpu) {
        Device::Emulated
    } else {
        Device::Cpu
    }
}

/// Asserts `e` is a dtype error that names `got` as what was given.
fn assert_dtype_got(e: &Error, got: DType) {
    assert!(
        matches!(e, Error::DType { got: g, .. } if *g == got),
        "{e:?}"
    );
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
        assert_dtype_got(&e, DType::BF16);
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
        let other = other_device(&dev);
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
    assert_dtype_got(&e, DType::F32);
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

#[test]
fn embedding_rejects_bad_input() {
    use platypus::ops::embedding;
    for dev in [Device::Cpu, Device::Emulated] {
        let table = ones(&[5, 8], DType::BF16, &dev);
        let e = expect_err(
            embedding::forward(&table, &[0, 5], DType::BF16),
            "ids",
            "ids[1] = 5 is not below the vocabulary size 5",
        );
        assert!(matches!(e, Error::Invalid { .. }), "{e:?}");
        expect_err(
            embedding::forward(&ones(&[5, 8, 1], DType::BF16, &dev), &[0], DType::BF16),
            "table",
            "[vocab, hidden]",
        );
        expect_err(
            embedding::forward(&zeros(&[5, 8], DType::I32, &dev), &[0], DType::F32),
            "table",
            "expected f32, f16 or bf16",
        );
        expect_err(
            embedding::forward(&zeros(&[5, 0], DType::F32, &dev), &[0], DType::F32),
            "table",
            "is empty",
        );
        expect_err(
            embedding::forward(&table, &[0], DType::I32),
            "dtype",
            "expected f32, f16 or bf16",
        );
        // A failed call leaves its output as it was.
        let mut out = ones(&[2, 8], DType::F32, &dev);
        expect_err(
            embedding::forward_into(&table, &[0, 1, 2], &mut out),
            "out",
            "[3, 8]",
        );
        expect_err(
            embedding::forward_into(&table, &[0, 9], &mut out),
            "ids",
            "not below",
        );
        let other = other_device(&dev);
        let e = expect_err(
            embedding::forward_into(&table, &[0, 1], &mut ones(&[2, 8], DType::F32, &other)),
            "out",
            "expected",
        );
        assert!(matches!(e, Error::Device { .. }), "{e:?}");
        assert_eq!(out.to_vec::<f32>().unwrap(), vec![1.0; 16]);
    }
}

#[test]
fn layernorm_rejects_bad_input() {
    use platypus::ops::layernorm;
    for dev in [Device::Cpu, Device::Emulated] {
        let x = ones(&[3, 8], DType::BF16, &dev);
        let w = ones(&[8], DType::BF16, &dev);
        expect_err(
            layernorm::forward(&x, &w, &ones(&[9], DType::BF16, &dev), 1e-12),
            "b",
            "[9]",
        );
        let e = expect_err(
            layernorm::forward(&x, &ones(&[8], DType::F32, &dev), &w, 1e-12),
            "w",
            "expected bf16",
        );
        assert_dtype_got(&e, DType::F32);
        expect_err(
            layernorm::forward(&x, &w, &w, f32::NAN),
            "eps",
            "not a finite value",
        );
        expect_err(
            layernorm::forward(&zeros(&[3, 8], DType::I32, &dev), &w, &w, 1e-12),
            "x",
            "expected f32, f16 or bf16",
        );
        let other = other_device(&dev);
        let e = expect_err(
            layernorm::forward(&x, &w, &ones(&[8], DType::BF16, &other), 1e-12),
            "b",
            "expected",
        );
        assert!(matches!(e, Error::Device { .. }), "{e:?}");

        // A failed residual call leaves h as it was.
        let mut h = ones(&[3, 8], DType::BF16, &dev);
        expect_err(
            layernorm::residual_forward(&mut h, &ones(&[8, 3], DType::BF16, &dev), &w, &w, 1e-12),
            "delta",
            "[8, 3]",
        );
        assert_eq!(h.to_f32_vec().unwrap(), vec![1.0; 24]);
    }
}

#[test]
fn linear_rejects_bad_input() {
    use platypus::ops::linear::{self, Activation};
    let gelu = Activation::Gelu;
    for dev in [Device::Cpu, Device::Emulated] {
        let x = ones(&[3, 16], DType::BF16, &dev);
        let w = ones(&[5, 16], DType::BF16, &dev);
        expect_err(
            linear::forward(&x, &ones(&[5, 8], DType::BF16, &dev), None, gelu),
            "w",
            "[out, 16]",
        );
        expect_err(
            linear::forward(&x, &ones(&[5], DType::BF16, &dev), None, gelu),
            "w",
            "[out, in]",
        );
        expect_err(
            linear::forward(&x, &w, Some(&ones(&[4], DType::BF16, &dev)), gelu),
            "b",
            "[5]",
        );
        let e = expect_err(
            linear::forward(&x, &w, Some(&ones(&[5], DType::F16, &dev)), gelu),
            "b",
            "expected bf16",
        );
        assert_dtype_got(&e, DType::F16);
        expect_err(
            linear::forward(&zeros(&[3, 16], DType::I32, &dev), &w, None, gelu),
            "x",
            "expected f32, f16 or bf16",
        );
        let e = expect_err(
            linear::forward(
                &x,
                &ones(&[5, 16], DType::BF16, &other_device(&dev)),
                None,
                gelu,
            ),
            "w",
            "expected",
        );
        assert!(matches!(e, Error::Device { .. }), "{e:?}");
    }
    // The kernels need 16-byte rows and 16-bit types.
    let dev = Device::Emulated;
    expect_err(
        linear::forward(
            &ones(&[3, 12], DType::F16, &dev),
            &ones(&[5, 12], DType::F16, &dev),
            None,
            gelu,
        ),
        "x",
        "multiple of 8",
    );
    expect_err(
        linear::forward(
            &ones(&[3, 16], DType::F32, &dev),
            &ones(&[5, 16], DType::F32, &dev),
            None,
            gelu,
        ),
        "x",
        "f16 or bf16",
    );
}

#[test]
fn swiglu_rejects_bad_input() {
    use platypus::ops::swiglu;
    for dev in [Device::Cpu, Device::Emulated] {
        let gate = ones(&[3, 8], DType::F16, &dev);
        let up = ones(&[3, 8], DType::F16, &dev);
        expect_err(
            swiglu::forward(&gate, &ones(&[3, 9], DType::F16, &dev)),
            "up",
            "[3, 9]",
        );
        let e = expect_err(
            swiglu::forward(&gate, &ones(&[3, 8], DType::BF16, &dev)),
            "up",
            "expected f16",
        );
        assert_dtype_got(&e, DType::BF16);
        expect_err(
            swiglu::forward(&zeros(&[3, 8], DType::I32, &dev), &up),
            "gate",
            "expected f32, f16 or bf16",
        );
        expect_err(
            swiglu::forward(
                &zeros(&[0, 8], DType::F16, &dev),
                &zeros(&[0, 8], DType::F16, &dev),
            ),
            "gate",
            "is empty",
        );
        let other = other_device(&dev);
        let e = expect_err(
            swiglu::forward(&gate, &ones(&[3, 8], DType::F16, &other)),
            "up",
            "expected",
        );
        assert!(matches!(e, Error::Device { .. }), "{e:?}");
        expect_err(
            swiglu::backward(&gate, &up, &ones(&[8, 3], DType::F16, &dev)),
            "dm",
            "[8, 3]",
        );
        expect_err(
            swiglu::backward(&gate, &up, &ones(&[3, 8], DType::F32, &dev)),
            "dm",
            "expected f16",
        );

        // A failed call leaves its outputs as they were.
        let mut m = ones(&[3, 8], DType::F16, &dev);
        expect_err(
            swiglu::forward_into(&gate, &ones(&[3, 7], DType::F16, &dev), &mut m),
            "up",
            "[3, 7]",
        );
        expect_err(
            swiglu::forward_into(&gate, &up, &mut ones(&[3, 8], DType::F32, &dev)),
            "m",
            "expected f16",
        );
        let (mut dgate, mut dup) = (
            ones(&[3, 8], DType::F16, &dev),
            ones(&[24], DType::F16, &dev),
        );
        expect_err(
            swiglu::backward_into(&gate, &up, &gate, &mut dgate, &mut dup),
            "dup",
            "[24]",
        );
        for t in [&m, &dgate] {
            assert_eq!(t.to_f32_vec().unwrap(), vec![1.0; 24]);
        }
    }
}

#[test]
fn rmsnorm_add_forward_rejects_bad_input() {
    for dev in [Device::Cpu, Device::Emulated] {
        let mut h = ones(&[3, 8], DType::BF16, &dev);
        let delta = ones(&[3, 8], DType::BF16, &dev);
        let w = ones(&[8], DType::BF16, &dev);
        let e = expect_err(
            rmsnorm::add_forward(&mut h, &ones(&[3, 9], DType::BF16, &dev), &w, 1e-5),
            "delta",
            "[3, 9]",
        );
        assert!(
            matches!(
                e,
                Error::Shape {
                    op: "rmsnorm::add_forward",
                    ..
                }
            ),
            "{e:?}"
        );
        expect_err(
            rmsnorm::add_forward(&mut h, &ones(&[3, 8], DType::F16, &dev), &w, 1e-5),
            "delta",
            "expected bf16",
        );
        expect_err(
            rmsnorm::add_forward(&mut h, &delta, &ones(&[7], DType::BF16, &dev), 1e-5),
            "w",
            "[7]",
        );
        expect_err(
            rmsnorm::add_forward(&mut h, &delta, &w, -1.0),
            "eps",
            "not a finite value",
        );
        expect_err(
            rmsnorm::add_forward(
                &mut zeros(&[0, 8], DType::BF16, &dev),
                &zeros(&[0, 8], DType::BF16, &dev),
                &w,
                1e-5,
            ),
            "h",
            "is empty",
        );
        let other = other_device(&dev);
        let e = expect_err(
            rmsnorm::add_forward(&mut h, &ones(&[3, 8], DType::BF16, &other), &w, 1e-5),
            "delta",
            "expected",
        );
        assert!(matches!(e, Error::Device { .. }), "{e:?}");
        let mut y = ones(&[3, 8], DType::BF16, &dev);
        expect_err(
            rmsnorm::add_forward_into(
                &mut h,
                &delta,
                &w,
                &mut ones(&[3, 8], DType::F32, &dev),
                1e-5,
            ),
            "y",
            "expected bf16",
        );
        expect_err(
            rmsnorm::add_forward_into(&mut h, &delta, &ones(&[9], DType::BF16, &dev), &mut y, 1e-5),
            "w",
            "[9]",
        );
        // Neither h nor y changed.
        for t in [&h, &y] {
            assert_eq!(t.to_f32_vec().unwrap(), vec![1.0; 24]);
        }
    }
}

#[test]
fn cross_entropy_rejects_bad_input() {
    use platypus::ops::cross_entropy::{self, linear_cross_entropy};
    for (dev, dtype) in [(Device::Cpu, DType::F32), (Device::Emulated, DType::BF16)] {
        let h = ones(&[3, 16], dtype, &dev);
        let w = ones(&[10, 16], dtype, &dev);
        expect_err(
            linear_cross_entropy(&h, &ones(&[10, 8], dtype, &dev), &[0, 1, 2]),
            "w",
            "[vocab, 16]",
        );
        expect_err(
            linear_cross_entropy(&h, &ones(&[0, 16], dtype, &dev), &[-100; 3]),
            "w",
            "vocab >= 1",
        );
        expect_err(
            linear_cross_entropy(&h, &w, &[0, 1]),
            "labels",
            "2 labels for 3 tokens",
        );
        expect_err(
            linear_cross_entropy(&h, &w, &[0, 10, -100]),
            "labels",
            "labels[1] = 10 is not below the vocabulary size 10",
        );
        expect_err(
            linear_cross_entropy(&zeros(&[3, 16], DType::I32, &dev), &w, &[0, 1, 2]),
            "h",
            "expected f32, f16 or bf16",
        );
        let z = ones(&[3, 10], dtype, &dev);
        expect_err(
            cross_entropy::forward_logits(&z, &[0, 1]),
            "labels",
            "2 labels",
        );
        expect_err(
            cross_entropy::forward_logits(&z, &[0, 1, 10]),
            "labels",
            "not below the vocabulary size 10",
        );
        expect_err(
            cross_entropy::forward_logits(&ones(&[30], dtype, &dev), &[0]),
            "logits",
            "[rows, vocab]",
        );
        expect_err(
            cross_entropy::forward_logits(&zeros(&[3, 0], dtype, &dev), &[-1; 3]),
            "logits",
            "vocab >= 1",
        );
    }
    // The kernels' GEMM: 16-bit h and W of one dtype, hidden a multiple of 8.
    let dev = Device::Emulated;
    let e = expect_err(
        linear_cross_entropy(
            &ones(&[3, 16], DType::F32, &dev),
            &ones(&[10, 16], DType::F32, &dev),
            &[0, 1, 2],
        ),
        "h",
        "f16 or bf16",
    );
    assert_dtype_got(&e, DType::F32);
    expect_err(
        linear_cross_entropy(
            &ones(&[3, 16], DType::BF16, &dev),
            &ones(&[10, 16], DType::F16, &dev),
            &[0, 1, 2],
        ),
        "w",
        "expected bf16",
    );
    expect_err(
        linear_cross_entropy(
            &ones(&[3, 12], DType::BF16, &dev),
            &ones(&[10, 12], DType::BF16, &dev),
            &[0, 1, 2],
        ),
        "h",
        "multiple of 8",
    );
    expect_err(
        linear_cross_entropy(
            &ones(&[3, 16], DType::BF16, &Device::Cpu),
            &ones(&[10, 16], DType::BF16, &dev),
            &[0, 1, 2],
        ),
        "w",
        "is on emulated",
    );
}

#[test]
fn sampling_rejects_bad_input() {
    use platypus::ops::sampling::{argmax, sample};
    for dev in [Device::Cpu, Device::Emulated] {
        let z = ones(&[2, 5], DType::F32, &dev);
        let u = [0.25, 0.5];
        for t in [0.0, -1.0, f32::NAN, f32::INFINITY] {
            expect_err(
                sample(&z, t, 0.9, &u),
                "temperature",
                "not a finite value > 0",
            );
        }
        for p in [0.0, -0.5, 1.5, f32::NAN] {
            expect_err(sample(&z, 1.0, p, &u), "top_p", "not in (0, 1]");
        }
        expect_err(
            sample(&z, 1.0, 0.9, &[0.5]),
            "uniforms",
            "1 values for 2 rows",
        );
        for bad in [1.0, -0.1, f64::NAN] {
            expect_err(sample(&z, 1.0, 0.9, &[0.5, bad]), "uniforms", "uniforms[1]");
        }
        for t in [
            ones(&[10], DType::F32, &dev),
            ones(&[1, 2, 5], DType::F32, &dev),
        ] {
            expect_err(argmax(&t), "logits", "[rows, vocab]");
            expect_err(sample(&t, 1.0, 1.0, &[0.5]), "logits", "[rows, vocab]");
        }
        for shape in [[0, 5], [2, 0]] {
            expect_err(
                argmax(&zeros(&shape, DType::F32, &dev)),
                "logits",
                "is empty",
            );
        }
        expect_err(
            argmax(&zeros(&[2, 5], DType::I32, &dev)),
            "logits",
            "expected f32, f16 or bf16",
        );
        // Rows that cannot be sampled: NaN, +inf, nothing above -inf.
        for (bad, dtype) in [
            (f32::NAN, DType::F32),
            (f32::INFINITY, DType::BF16),
            (f32::NEG_INFINITY, DType::F16),
        ] {
            let mut v = vec![1.0f32; 10];
            if bad == f32::NEG_INFINITY {
                v[5..].fill(bad);
            } else {
                v[7] = bad;
            }
            let t = Tensor::from_f32(&v, &[2, 5], dtype, &dev).unwrap();
            expect_err(
                sample(&t, 1.0, 0.9, &u),
                "logits",
                "row 1 has a NaN or +inf logit",
            );
            // argmax takes any row (NaN wins, as in torch).
            let want = if bad.is_nan() || bad == f32::INFINITY {
                2
            } else {
                0
            };
            assert_eq!(argmax(&t).unwrap(), vec![0, want], "{dev} {bad}");
        }
    }
}

#[test]
fn cross_entropy_grad_rejects_bad_input() {
    use platypus::ops::cross_entropy::{
        linear_cross_entropy_grad, linear_cross_entropy_grad_chunked,
    };
    const OP: &str = "cross_entropy::linear_cross_entropy_grad";
    for (dev, dtype) in [(Device::Cpu, DType::F32), (Device::Emulated, DType::BF16)] {
        let h = ones(&[3, 16], dtype, &dev);
        let w = ones(&[10, 16], dtype, &dev);
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let e = expect_err(
                linear_cross_entropy_grad(&h, &w, &[0, 1, 2], bad),
                "scale",
                "is not finite",
            );
            assert!(matches!(e, Error::Invalid { op: OP, .. }), "{e:?}");
            expect_err(
                linear_cross_entropy_grad_chunked(&h, &w, &[0, 1, 2], bad, 1 << 20),
                "scale",
                "is not finite",
            );
        }
        let e = expect_err(
            linear_cross_entropy_grad(&h, &ones(&[10, 8], dtype, &dev), &[0, 1, 2], 1.0),
            "w",
            "[vocab, 16]",
        );
        assert!(matches!(e, Error::Shape { op: OP, .. }), "{e:?}");
        expect_err(
            linear_cross_entropy_grad(&h, &ones(&[0, 16], dtype, &dev), &[-100; 3], 1.0),
            "w",
            "vocab >= 1",
        );
        let e = expect_err(
            linear_cross_entropy_grad(&h, &w, &[0, 1], 1.0),
            "labels",
            "2 labels for 3 tokens",
        );
        assert!(matches!(e, Error::Invalid { op: OP, .. }), "{e:?}");
        expect_err(
            linear_cross_entropy_grad(&h, &w, &[0, 10, -100], 1.0),
            "labels",
            "labels[1] = 10 is not below the vocabulary size 10",
        );
        let e = expect_err(
            linear_cross_entropy_grad(&zeros(&[3, 16], DType::I32, &dev), &w, &[0, 1, 2], 1.0),
            "h",
            "expected f32, f16 or bf16",
        );
        assert_dtype_got(&e, DType::I32);
        let other = other_device(&dev);
        let e = expect_err(
            linear_cross_entropy_grad(&h, &ones(&[10, 16], dtype, &other), &[0, 1, 2], 1.0),
            "w",
            "expected",
        );
        assert!(matches!(e, Error::Device { op: OP, .. }), "{e:?}");
    }
    // The kernels: 16-bit h and W of one dtype, hidden a multiple of 8.
    let dev = Device::Emulated;
    let e = expect_err(
        linear_cross_entropy_grad(
            &ones(&[3, 16], DType::F32, &dev),
            &ones(&[10, 16], DType::F32, &dev),
            &[0, 1, 2],
            1.0,
        ),
        "h",
        "f16 or bf16",
    );
    assert_dtype_got(&e, DType::F32);
    let e = expect_err(
        linear_cross_entropy_grad(
            &ones(&[3, 16], DType::BF16, &dev),
            &ones(&[10, 16], DType::F16, &dev),
            &[0, 1, 2],
            1.0,
        ),
        "w",
        "expected bf16",
    );
    assert_dtype_got(&e, DType::F16);
    expect_err(
        linear_cross_entropy_grad(
            &ones(&[3, 12], DType::F16, &dev),
            &ones(&[10, 12], DType::F16, &dev),
            &[0, 1, 2],
            1.0,
        ),
        "h",
        "multiple of 8",
    );
    // The CPU's host code takes f32 activations only.
    let e = expect_err(
        linear_cross_entropy_grad(
            &ones(&[3, 16], DType::BF16, &Device::Cpu),
            &ones(&[10, 16], DType::BF16, &Device::Cpu),
            &[0, 1, 2],
            1.0,
        ),
        "h",
        "expected f32",
    );
    assert_dtype_got(&e, DType::BF16);
}

#[test]
fn adamw_rejects_bad_input_and_changes_nothing() {
    use platypus::ops::adamw::{self, AdamW, State};
    const STEP: &str = "adamw::step";
    let cfg = AdamW::default();
    for dev in [Device::Cpu, Device::Emulated] {
        let mut p = ones(&[4, 3], DType::F32, &dev);
        let g = ones(&[4, 3], DType::F32, &dev);
        let mut state = State::new(&[&p]).unwrap();
        let mut step = |p: &mut Tensor, g: &Tensor, cfg: &AdamW, lr: f32, clip: f32| {
            adamw::step(&mut [p], &[g], &mut state, cfg, lr, clip)
        };
        let e = expect_err(
            adamw::step(
                &mut [&mut p],
                &[],
                &mut State::new(&[&g]).unwrap(),
                &cfg,
                1e-3,
                1.0,
            ),
            "grads",
            "1 params, 0 grads and 1/1 moments",
        );
        assert!(matches!(e, Error::Invalid { op: STEP, .. }), "{e:?}");
        for bad in [f32::NAN, f32::INFINITY, -1e-3] {
            let e = expect_err(
                step(&mut p, &g, &cfg, bad, 1.0),
                "lr",
                "not a finite value >= 0",
            );
            assert!(matches!(e, Error::Invalid { op: STEP, .. }), "{e:?}");
            expect_err(
                step(&mut p, &g, &cfg, 1e-3, bad),
                "clip",
                "not a finite value >= 0",
            );
            let c = AdamW { eps: bad, ..cfg };
            expect_err(
                step(&mut p, &g, &c, 1e-3, 1.0),
                "cfg.eps",
                "not a finite value >= 0",
            );
            let c = AdamW {
                weight_decay: bad,
                ..cfg
            };
            expect_err(
                step(&mut p, &g, &c, 1e-3, 1.0),
                "cfg.weight_decay",
                "not a finite value >= 0",
            );
        }
        for bad in [1.0, 1.5, -0.1, f32::NAN] {
            let c = AdamW { beta1: bad, ..cfg };
            let e = expect_err(
                step(&mut p, &g, &c, 1e-3, 1.0),
                "cfg.beta1",
                "not in [0, 1)",
            );
            assert!(matches!(e, Error::Invalid { op: STEP, .. }), "{e:?}");
            let c = AdamW { beta2: bad, ..cfg };
            expect_err(
                step(&mut p, &g, &c, 1e-3, 1.0),
                "cfg.beta2",
                "not in [0, 1)",
            );
        }
        let e = expect_err(
            step(&mut p, &ones(&[3, 4], DType::F32, &dev), &cfg, 1e-3, 1.0),
            "grads",
            "[3, 4]",
        );
        assert!(matches!(e, Error::Shape { op: STEP, .. }), "{e:?}");
        let e = expect_err(
            step(&mut p, &ones(&[4, 3], DType::BF16, &dev), &cfg, 1e-3, 1.0),
            "grads",
            "expected f32",
        );
        assert_dtype_got(&e, DType::BF16);
        let e = expect_err(
            step(&mut ones(&[4, 3], DType::F16, &dev), &g, &cfg, 1e-3, 1.0),
            "params",
            "expected f32",
        );
        assert_dtype_got(&e, DType::F16);
        let other = other_device(&dev);
        let e = expect_err(
            step(&mut p, &ones(&[4, 3], DType::F32, &other), &cfg, 1e-3, 1.0),
            "grads",
            "expected",
        );
        assert!(matches!(e, Error::Device { op: STEP, .. }), "{e:?}");
        // Moments of another shape (a state made for other parameters).
        let mut wrong = State::new(&[&ones(&[12], DType::F32, &dev)]).unwrap();
        let e = expect_err(
            adamw::step(&mut [&mut p], &[&g], &mut wrong, &cfg, 1e-3, 1.0),
            "state.m",
            "[12]",
        );
        assert!(matches!(e, Error::Shape { op: STEP, .. }), "{e:?}");
        // Nothing moved: parameters, moments, step count.
        assert_eq!(p.to_vec::<f32>().unwrap(), vec![1.0; 12]);
        for t in state.m.iter().chain(&state.v).chain(&wrong.m) {
            assert!(t.to_vec::<f32>().unwrap().iter().all(|&x| x == 0.0));
        }
        assert_eq!((state.step, wrong.step), (0, 0));

        const NORM: &str = "adamw::global_norm";
        let e = expect_err(
            adamw::global_norm(&[&g, &ones(&[2], DType::BF16, &dev)]),
            "grads",
            "expected f32",
        );
        assert!(matches!(e, Error::DType { op: NORM, .. }), "{e:?}");
        let e = expect_err(
            adamw::global_norm(&[&g, &ones(&[2], DType::F32, &other)]),
            "grads",
            "expected",
        );
        assert!(matches!(e, Error::Device { op: NORM, .. }), "{e:?}");

        const ACC: &str = "adamw::accumulate";
        let mut acc = ones(&[4, 3], DType::F32, &dev);
        let e = expect_err(
            adamw::accumulate(&mut [&mut acc], &[&g, &g]),
            "grads",
            "2 tensors for 1 accumulators",
        );
        assert!(matches!(e, Error::Invalid { op: ACC, .. }), "{e:?}");
        let e = expect_err(
            adamw::accumulate(&mut [&mut acc], &[&ones(&[12], DType::F32, &dev)]),
            "grads",
            "[12]",
        );
        assert!(matches!(e, Error::Shape { op: ACC, .. }), "{e:?}");
        let e = expect_err(
            adamw::accumulate(&mut [&mut acc], &[&ones(&[4, 3], DType::F16, &dev)]),
            "grads",
            "expected f32",
        );
        assert_dtype_got(&e, DType::F16);
        expect_err(
            adamw::accumulate(&mut [&mut ones(&[4, 3], DType::BF16, &dev)], &[&g]),
            "acc",
            "expected f32",
        );
        let e = expect_err(
            adamw::accumulate(&mut [&mut acc], &[&ones(&[4, 3], DType::F32, &other)]),
            "grads",
            "expected",
        );
        assert!(matches!(e, Error::Device { op: ACC, .. }), "{e:?}");
        assert_eq!(acc.to_vec::<f32>().unwrap(), vec![1.0; 12]);
    }
}

#[test]
fn add_assign_rejects_bad_input() {
    use platypus::ops::add::add_assign;
    const OP: &str = "add::add_assign";
    for (dev, dtype) in [(Device::Cpu, DType::F32), (Device::Emulated, DType::BF16)] {
        let mut y = ones(&[3, 8], dtype, &dev);
        let e = expect_err(
            add_assign(&mut y, &ones(&[3, 9], dtype, &dev)),
            "t",
            "[3, 9]",
        );
        assert!(matches!(e, Error::Shape { op: OP, .. }), "{e:?}");
        let e = expect_err(
            add_assign(&mut y, &ones(&[3, 8], DType::F16, &dev)),
            "t",
            &format!("expected {dtype}"),
        );
        assert_dtype_got(&e, DType::F16);
        let e = expect_err(
            add_assign(&mut y, &ones(&[3, 8], dtype, &other_device(&dev))),
            "t",
            "expected",
        );
        assert!(matches!(e, Error::Device { op: OP, .. }), "{e:?}");
        let e = expect_err(
            add_assign(
                &mut zeros(&[3, 8], DType::I32, &dev),
                &zeros(&[3, 8], DType::I32, &dev),
            ),
            "y",
            "expected f32, f16 or bf16",
        );
        assert_dtype_got(&e, DType::I32);
        assert_eq!(y.to_f32_vec().unwrap(), vec![1.0; 24]);
    }
    // The kernel devices add 16-bit tensors; f32 sums run on the CPU.
    let dev = Device::Emulated;
    let mut y = ones(&[3, 8], DType::F32, &dev);
    let e = expect_err(
        add_assign(&mut y, &ones(&[3, 8], DType::F32, &dev)),
        "y",
        "f16 or bf16",
    );
    assert_dtype_got(&e, DType::F32);
    assert_eq!(y.to_vec::<f32>().unwrap(), vec![1.0; 24]);
}
