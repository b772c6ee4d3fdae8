//! `platypus::candle`: each op's forward and gradients against the same
//! function composed from candle's own ops (whose gradients candle's
//! autograd computes), and a small training loop whose loss falls through
//! the ops. Run with `--features candle` (the test command does).
#![cfg(feature = "candle")]

use candle_core::{DType, Device, Tensor, Var, D};
use platypus::candle as pc;
use platypus::ops::attention::AttentionConfig;
use platypus::ops::lora::LoraConfig;
use platypus::ops::rope::RopeConfig;

type Result<T> = candle_core::Result<T>;

/// A reproducible tensor of uniform values in [-1, 1).
fn random(shape: &[usize], seed: u64) -> Tensor {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// The largest |a - b| over the largest |b| (at least 1).
fn rel_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let scale = b.iter().fold(1f32, |m, x| m.max(x.abs()));
    a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
        / scale
}

/// Runs `op` and `reference` on the same inputs (as fresh variables), and
/// checks the outputs and the gradients of sum(output · r) within `tol`.
fn same_function_and_gradients(
    inputs: &[Tensor],
    op: impl Fn(&[Tensor]) -> Result<Tensor>,
    reference: impl Fn(&[Tensor]) -> Result<Tensor>,
    tol: f32,
) {
    let run = |f: &dyn Fn(&[Tensor]) -> Result<Tensor>| {
        let vars: Vec<Var> = inputs
            .iter()
            .map(|t| Var::from_tensor(t).unwrap())
            .collect();
        let args: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let out = f(&args).unwrap();
        let r = random(out.dims(), 99);
        let grads = (&out * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let g: Vec<Tensor> = vars
            .iter()
            .map(|v| grads.get(v.as_tensor()).expect("a gradient").clone())
            .collect();
        (out, g)
    };
    let (out, grads) = run(&op);
    let (want, want_grads) = run(&reference);
    let e = rel_diff(&out, &want);
    assert!(e <= tol, "output differs by {e}");
    for (i, (g, w)) in grads.iter().zip(&want_grads).enumerate() {
        let e = rel_diff(g, w);
        assert!(e <= tol, "gradient of input {i} differs by {e}");
    }
}

fn rms_norm_composed(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    x.broadcast_div(&(ms + eps)?.sqrt()?)?.broadcast_mul(w)
}

#[test]
fn rms_norm_matches_candle_composed() {
    let (x, w) = (random(&[3, 5, 64], 1), random(&[64], 2));
    same_function_and_gradients(
        &[x, w],
        |t| pc::rms_norm(&t[0], &t[1], 1e-5),
        |t| rms_norm_composed(&t[0], &t[1], 1e-5),
        1e-5,
    );
}

/// rotate_half RoPE of x [b, s, h, d] at `positions`, from candle's ops.
fn rope_composed(x: &Tensor, positions: &[i32], theta: f32) -> Result<Tensor> {
    let (b, s, _, d) = x.dims4()?;
    let half = d / 2;
    let mut cos = Vec::new();
    let mut sin = Vec::new();
    for &p in positions {
        for i in 0..half {
            let angle = p as f64 * (theta as f64).powf(-2.0 * i as f64 / d as f64);
            cos.push(angle.cos() as f32);
            sin.push(angle.sin() as f32);
        }
    }
    let cos = Tensor::from_vec(cos, (b, s, 1, half), x.device())?;
    let sin = Tensor::from_vec(sin, (b, s, 1, half), x.device())?;
    let (x1, x2) = (x.narrow(3, 0, half)?, x.narrow(3, half, half)?);
    let r1 = (x1.broadcast_mul(&cos)? - x2.broadcast_mul(&sin)?)?;
    let r2 = (x2.broadcast_mul(&cos)? + x1.broadcast_mul(&sin)?)?;
    Tensor::cat(&[r1, r2], 3)
}

#[test]
fn rope_matches_candle_composed() {
    let x = random(&[2, 6, 3, 16], 3);
    let positions: Vec<i32> = (0..12).map(|i| (i * 37) % 50).collect();
    same_function_and_gradients(
        &[x],
        |t| pc::rope(&t[0], &positions, RopeConfig::default()),
        |t| rope_composed(&t[0], &positions, 10000.0),
        1e-5,
    );
}

/// softmax(q kᵀ · scale (+ causal mask)) v over [b, s, h, d], from candle's ops.
fn attention_composed(q: &Tensor, k: &Tensor, v: &Tensor, causal: bool) -> Result<Tensor> {
    let (_, s, _, d) = q.dims4()?;
    let t = |x: &Tensor| x.transpose(1, 2)?.contiguous();
    let (q, k, v) = (t(q)?, t(k)?, t(v)?);
    let mut scores = (q.matmul(&k.t()?.contiguous()?)? * (1.0 / (d as f64).sqrt()))?;
    if causal {
        let mask: Vec<f32> = (0..s * s)
            .map(|i| if i % s > i / s { -1e30 } else { 0.0 })
            .collect();
        scores = scores.broadcast_add(&Tensor::from_vec(mask, (s, s), q.device())?)?;
    }
    let e = scores
        .broadcast_sub(&scores.max_keepdim(D::Minus1)?)?
        .exp()?;
    let p = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?;
    p.matmul(&v)?.transpose(1, 2)?.contiguous()
}

#[test]
fn attention_matches_candle_composed() {
    for causal in [false, true] {
        let shape = [2, 7, 2, 32];
        let inputs = [random(&shape, 4), random(&shape, 5), random(&shape, 6)];
        let cfg = AttentionConfig {
            causal,
            scale: None,
        };
        same_function_and_gradients(
            &inputs,
            |t| pc::attention(&t[0], &t[1], &t[2], cfg),
            |t| attention_composed(&t[0], &t[1], &t[2], causal),
            1e-5,
        );
    }
}

#[test]
fn lora_linear_matches_candle_composed() {
    let (tokens, inp, out, r) = (9, 32, 24, 4);
    let w = random(&[out, inp], 7);
    let cfg = LoraConfig {
        alpha: 8.0,
        dropout: 0.0,
        ..LoraConfig::default()
    };
    let scale = (cfg.alpha / r as f32) as f64;
    let inputs = [
        random(&[tokens, inp], 8),
        random(&[r, inp], 9),
        random(&[out, r], 10),
    ];
    same_function_and_gradients(
        &inputs,
        |t| pc::lora_linear(&t[0], &w, &t[1], &t[2], cfg),
        |t| {
            let base = t[0].matmul(&w.t()?)?;
            let delta = t[0].matmul(&t[1].t()?)?.matmul(&t[2].t()?)?;
            base + (delta * scale)?
        },
        1e-5,
    );
}

#[test]
fn cosine_topk_matches_a_brute_force() -> Result<()> {
    let (q, db) = (random(&[5, 16], 11), random(&[40, 16], 12));
    let (scores, indices) = pc::cosine_topk(&q, &db, 3)?;
    let unit = |x: &Tensor| x.broadcast_div(&x.sqr()?.sum_keepdim(1)?.sqrt()?);
    let all = unit(&q)?.matmul(&unit(&db)?.t()?)?.to_vec2::<f32>()?;
    let (scores, indices) = (scores.to_vec2::<f32>()?, indices.to_vec2::<u32>()?);
    for (row, want) in all.iter().enumerate() {
        let mut order: Vec<usize> = (0..want.len()).collect();
        order.sort_by(|&a, &b| want[b].total_cmp(&want[a]).then(a.cmp(&b)));
        for j in 0..3 {
            assert_eq!(indices[row][j] as usize, order[j], "row {row} rank {j}");
            assert!((scores[row][j] - want[order[j]]).abs() < 1e-5);
        }
    }
    Ok(())
}

#[test]
fn a_candle_training_loop_learns_through_the_ops() -> Result<()> {
    // Fit y = rms_norm(x) W*ᵀ with a frozen W0 and trainable LoRA factors.
    let (tokens, width, r) = (32, 32, 8);
    let x = random(&[tokens, width], 13);
    let norm = Tensor::ones(width, DType::F32, &Device::Cpu)?;
    let w0 = random(&[width, width], 14);
    let target = (pc::rms_norm(&x, &norm, 1e-5)?.matmul(&w0.t()?)?
        + pc::rms_norm(&x, &norm, 1e-5)?.matmul(&(random(&[width, width], 15) * 0.3)?.t()?)?)?;
    let a = Var::from_tensor(&(random(&[r, width], 16) * 0.2)?)?;
    let b = Var::from_tensor(&Tensor::zeros((width, r), DType::F32, &Device::Cpu)?)?;
    let cfg = LoraConfig {
        alpha: r as f32,
        dropout: 0.0,
        ..LoraConfig::default()
    };
    let mut losses = Vec::new();
    for _ in 0..60 {
        let h = pc::rms_norm(&x, &norm, 1e-5)?;
        let y = pc::lora_linear(&h, &w0, a.as_tensor(), b.as_tensor(), cfg)?;
        let loss = (y - &target)?.sqr()?.mean_all()?;
        losses.push(loss.to_scalar::<f32>()?);
        let grads = loss.backward()?;
        for v in [&a, &b] {
            let g = grads.get(v.as_tensor()).expect("a gradient");
            v.set(&(v.as_tensor() - (g * 0.5)?)?)?;
        }
    }
    let (first, last) = (losses[0], *losses.last().unwrap());
    assert!(last < 0.5 * first, "loss {first} -> {last}");
    Ok(())
}
