//! The CPU references (and the emulated kernels, in f32) against the
//! PyTorch / transformers fixtures in ../shared/fixtures/ops (float64
//! results of float32 inputs; q/k there are [B, H, T, D]).

mod common;

use common::assert_close;
use platypus::cpu::cosine_topk::{self, Exclude};
use platypus::cpu::lora;
use platypus::ops::attention::{self, AttentionConfig, Batch};
use platypus::ops::rmsnorm;
use platypus::ops::rope::{self, RopeConfig, RopeStyle};
use platypus::{DType, Device, Tensor};
use safetensors::{Dtype, SafeTensors};

const OPS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../shared/fixtures/ops/ops.safetensors"
);

struct Fixture(Vec<u8>);

impl Fixture {
    fn load() -> Fixture {
        Fixture(std::fs::read(OPS).unwrap_or_else(|e| {
            panic!("reading {OPS}: {e} (the fixtures must sit at ../shared beside the repo)")
        }))
    }

    /// A float32 tensor: (values, shape).
    fn f32(&self, name: &str) -> (Vec<f32>, Vec<usize>) {
        let st = SafeTensors::deserialize(&self.0).unwrap();
        let t = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(t.dtype(), Dtype::F32, "{name}");
        (
            t.data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect(),
            t.shape().to_vec(),
        )
    }

    /// An int64 tensor as i32 (position ids).
    fn i64_as_i32(&self, name: &str) -> Vec<i32> {
        self.i64(name).0.into_iter().map(|v| v as i32).collect()
    }

    /// An int64 tensor: (values, shape).
    fn i64(&self, name: &str) -> (Vec<i64>, Vec<usize>) {
        let st = SafeTensors::deserialize(&self.0).unwrap();
        let t = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(t.dtype(), Dtype::I64, "{name}");
        (
            t.data()
                .chunks_exact(8)
                .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
                .collect(),
            t.shape().to_vec(),
        )
    }
}

fn devices() -> [Device; 2] {
    [Device::Cpu, Device::Emulated]
}

#[test]
fn rmsnorm_matches_pytorch() {
    let f = Fixture::load();
    for case in ["rmsnorm_a", "rmsnorm_b"] {
        let get = |n: &str| f.f32(&format!("{case}/{n}"));
        let (x, xs) = get("x");
        let hidden = *xs.last().unwrap();
        let (w, _) = get("w");
        let (dy, _) = get("dy");
        for dev in devices() {
            let xt = Tensor::from_f32(&x, &xs, DType::F32, &dev).unwrap();
            let wt = Tensor::from_f32(&w, &[hidden], DType::F32, &dev).unwrap();
            let dyt = Tensor::from_f32(&dy, &xs, DType::F32, &dev).unwrap();
            let y = rmsnorm::forward(&xt, &wt, 1e-5).unwrap();
            assert_close(
                &format!("{case} y on {dev}"),
                &y.to_f32_vec().unwrap(),
                &get("y").0,
                1e-5,
                1e-5,
            );
            let g = rmsnorm::backward(&xt, &wt, &dyt, 1e-5, true).unwrap();
            assert_close(
                &format!("{case} dx on {dev}"),
                &g.dx.to_f32_vec().unwrap(),
                &get("dx").0,
                1e-5,
                1e-5,
            );
            assert_close(
                &format!("{case} dw on {dev}"),
                &g.dw.unwrap().to_f32_vec().unwrap(),
                &get("dw").0,
                1e-4,
                1e-5,
            );
        }
    }
}

/// [B, H, T, D] (the fixtures' layout) to [B, T, H, D] (platypus').
fn bhtd_to_bthd(v: &[f32], shape: &[usize]) -> (Vec<f32>, Vec<usize>) {
    let [b, h, t, d] = shape.try_into().unwrap();
    let mut out = vec![0.0; v.len()];
    for bi in 0..b {
        for hi in 0..h {
            for ti in 0..t {
                let src = ((bi * h + hi) * t + ti) * d;
                let dst = ((bi * t + ti) * h + hi) * d;
                out[dst..dst + d].copy_from_slice(&v[src..src + d]);
            }
        }
    }
    (out, vec![b, t, h, d])
}

#[test]
fn rope_matches_transformers_in_both_conventions() {
    let f = Fixture::load();
    let positions = f.i64_as_i32("rope/position_ids");
    let load = |name: &str| {
        let (v, s) = f.f32(name);
        bhtd_to_bthd(&v, &s)
    };
    let (q, qs) = load("rope/q");
    let (k, ks) = load("rope/k");
    let (dq_out, _) = load("rope/dq_out");
    let (dk_out, _) = load("rope/dk_out");
    for (prefix, style) in [
        ("rope", RopeStyle::RotateHalf),
        ("rope_interleaved", RopeStyle::Interleaved),
    ] {
        let cfg = RopeConfig {
            theta: 10000.0,
            style,
        };
        for dev in devices() {
            let pos = Tensor::from_slice(&positions, &[qs[0], qs[1]], &dev).unwrap();
            let what = |n: &str| format!("{prefix}/{n} on {dev}");
            let check = |name: &str, got: &Tensor| {
                let want = load(&format!("{prefix}/{name}")).0;
                assert_close(&what(name), &got.to_f32_vec().unwrap(), &want, 1e-5, 1e-5);
            };
            let mut qt = Tensor::from_f32(&q, &qs, DType::F32, &dev).unwrap();
            let mut kt = Tensor::from_f32(&k, &ks, DType::F32, &dev).unwrap();
            rope::forward(&mut qt, &mut kt, &pos, &cfg).unwrap();
            check("q_out", &qt);
            check("k_out", &kt);
            let mut dqt = Tensor::from_f32(&dq_out, &qs, DType::F32, &dev).unwrap();
            let mut dkt = Tensor::from_f32(&dk_out, &ks, DType::F32, &dev).unwrap();
            rope::backward(&mut dqt, &mut dkt, &pos, &cfg).unwrap();
            check("dq", &dqt);
            check("dk", &dkt);
        }
    }
}

/// The attention fixtures: (case name, causal).
const ATTENTION_CASES: [(&str, bool); 9] = [
    ("attn_causal_d32_t1", true),
    ("attn_causal_d32_t17", true),
    ("attn_causal_d32_t64", true),
    ("attn_causal_d32_t100", true),
    ("attn_causal_d64_t1", true),
    ("attn_causal_d64_t17", true),
    ("attn_causal_d64_t64", true),
    ("attn_causal_d64_t100", true),
    ("attn_noncausal_d32_t33", false),
];

/// lse [B, H, T] (the fixtures' layout) to [H, B * T] (platypus').
fn bht_to_h_bt(v: &[f32], shape: &[usize]) -> Vec<f32> {
    let [b, h, t] = shape.try_into().unwrap();
    let mut out = vec![0.0; v.len()];
    for bi in 0..b {
        for hi in 0..h {
            for ti in 0..t {
                out[hi * b * t + bi * t + ti] = v[(bi * h + hi) * t + ti];
            }
        }
    }
    out
}

/// Runs every attention fixture through forward and backward in `dtype` on
/// `dev` and checks o, lse, dq, dk, dv with tolerance `tol` (relative to each
/// tensor's largest magnitude; the gradients to the largest of the three).
fn check_attention_fixtures(dev: &Device, dtype: DType, tol: f32) {
    let f = Fixture::load();
    for (case, causal) in ATTENTION_CASES {
        let load = |n: &str| {
            let (v, s) = f.f32(&format!("{case}/{n}"));
            bhtd_to_bthd(&v, &s)
        };
        let tensor = |n: &str| {
            let (v, s) = load(n);
            Tensor::from_f32(&v, &s, dtype, dev).unwrap()
        };
        let (q, k, v, dout) = (tensor("q"), tensor("k"), tensor("v"), tensor("do"));
        let cfg = AttentionConfig {
            causal,
            scale: None,
        };
        let fwd = attention::forward(&q, &k, &v, Batch::Dense, &cfg).unwrap();
        let grads = attention::backward(&q, &k, &v, &fwd, &dout, Batch::Dense, &cfg).unwrap();
        let (lse, lse_shape) = f.f32(&format!("{case}/lse"));
        let want_lse = bht_to_h_bt(&lse, &lse_shape);
        let largest = |v: &[f32]| v.iter().fold(1e-3f32, |m, x| m.max(x.abs()));
        // A gradient that is exactly 0 (dq of a one-token sequence: softmax
        // over one key) is judged against its siblings' magnitude: f32 code
        // leaves rounding residue of that size there, the f64 reference none.
        let grad_scale = ["dq", "dk", "dv"]
            .iter()
            .map(|n| largest(&load(n).0))
            .fold(0.0f32, f32::max);
        for (name, got, want) in [
            ("o", &fwd.o, load("o").0),
            ("lse", &fwd.lse, want_lse),
            ("dq", &grads.dq, load("dq").0),
            ("dk", &grads.dk, load("dk").0),
            ("dv", &grads.dv, load("dv").0),
        ] {
            let scale = if name.starts_with('d') {
                grad_scale
            } else {
                largest(&want)
            };
            let what = format!("{case}/{name} in {dtype} on {dev}");
            assert_close(&what, &got.to_f32_vec().unwrap(), &want, tol * scale, 0.0);
        }
    }
}

/// Device::Cpu in f32: the host code (flash-style forward and backward).
#[test]
fn attention_reference_matches_pytorch() {
    check_attention_fixtures(&Device::Cpu, DType::F32, 1e-5);
}

#[test]
fn attention_kernels_match_pytorch_in_bf16_and_f16() {
    // Inputs rounded to 16 bits and results stored in 16 bits: a few units of
    // the format's rounding (bf16 2^-8, f16 2^-11) at each tensor's scale.
    check_attention_fixtures(&Device::Emulated, DType::BF16, 4.0 / 256.0);
    check_attention_fixtures(&Device::Emulated, DType::F16, 4.0 / 2048.0);
}

#[test]
fn lora_reference_matches_peft() {
    let f = Fixture::load();
    let get = |n: &str| f.f32(&format!("lora_linear/{n}"));
    let (x, xs) = get("x");
    let (w, ws) = get("W");
    let (a, a_shape) = get("A");
    let (b, _) = get("B");
    let (dy, _) = get("dy");
    let dims = lora::LoraDims {
        tokens: xs[..xs.len() - 1].iter().product(),
        in_features: *xs.last().unwrap(),
        out_features: ws[0],
        rank: a_shape[0],
    };
    assert_eq!(
        (dims.tokens, dims.in_features, dims.out_features, dims.rank),
        (33, 48, 40, 8)
    );
    // alpha 16 / r 8, no dropout.
    let scale = 16.0 / dims.rank as f32;
    let (y, _) = lora::forward(&x, &w, &a, &b, &dims, scale, None);
    let (dx, da, db) = lora::backward(&x, &w, &a, &b, &dy, &dims, scale, None);
    for (name, got) in [("y", &y), ("dx", &dx), ("dA", &da), ("dB", &db)] {
        assert_close(
            &format!("lora_linear/{name}"),
            got,
            &get(name).0,
            1e-5,
            1e-5,
        );
    }
}

#[test]
fn lora_kernels_match_peft_in_bf16_and_f16() {
    use platypus::ops::lora::{self as lora_op, LoraConfig, LoraWeights};
    let f = Fixture::load();
    let get = |n: &str| f.f32(&format!("lora_linear/{n}"));
    let dev = Device::Emulated;
    // alpha 16, r 8, no dropout, as PEFT ran it.
    let cfg = LoraConfig {
        alpha: 16.0,
        rslora: false,
        dropout: 0.0,
        seed: 0,
        offset: 0,
    };
    for (dtype, unit) in [(DType::BF16, 1.0 / 256.0), (DType::F16, 1.0 / 2048.0)] {
        let t = |n: &str, dtype| {
            let (v, s) = get(n);
            Tensor::from_f32(&v, &s, dtype, &dev).unwrap()
        };
        let (x, w, dy) = (t("x", dtype), t("W", dtype), t("dy", dtype));
        let (a, b) = (t("A", DType::F32), t("B", DType::F32));
        let weights = LoraWeights {
            w: &w,
            a: &a,
            b: &b,
        };
        let out = lora_op::forward(&x, weights, &cfg).unwrap();
        let g = lora_op::backward(&x, &dy, weights, &out.u, &cfg).unwrap();
        for (name, got) in [("y", &out.y), ("dx", &g.dx), ("dA", &g.da), ("dB", &g.db)] {
            let want = get(name).0;
            // 16-bit inputs, adapter copies and outputs: a few units at the tensor's scale.
            let scale = want.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
            let what = format!("lora_linear/{name} in {dtype} on {dev}");
            assert_close(
                &what,
                &got.to_f32_vec().unwrap(),
                &want,
                4.0 * unit * scale,
                0.0,
            );
        }
    }
}

#[test]
fn cosine_topk_reference_matches_pytorch() {
    let f = Fixture::load();
    let (queries, qs) = f.f32("cosine_topk/queries");
    let (database, ds) = f.f32("cosine_topk/database");
    let (want_sim, _) = f.f32("cosine_topk/sim");
    let (want_idx, is) = f.i64("cosine_topk/indices");
    let (want_scores, _) = f.f32("cosine_topk/scores");
    assert_eq!(
        (qs.as_slice(), ds.as_slice()),
        (&[37, 48][..], &[301, 48][..])
    );
    let (m, n, dim, k) = (qs[0], ds[0], qs[1], is[1]);
    assert_eq!((is[0], k), (m, 5));

    let sim: Vec<f32> = cosine_topk::similarities(&queries, &database, dim)
        .into_iter()
        .map(|s| s as f32)
        .collect();
    assert_eq!(sim.len(), m * n);
    assert_close("cosine_topk/sim", &sim, &want_sim, 1e-6, 0.0);

    let (scores, indices) = cosine_topk::topk(&queries, &database, dim, k, Exclude::Nothing);
    let want_idx: Vec<u32> = want_idx
        .iter()
        .map(|&i| u32::try_from(i).unwrap())
        .collect();
    assert_eq!(indices, want_idx, "cosine_topk/indices");
    assert_close("cosine_topk/scores", &scores, &want_scores, 1e-6, 0.0);

    // The planted near-copies (database row -> query) are each query's best match.
    for (row, query) in [(3, 0), (77, 5), (150, 10), (222, 20), (300, 36)] {
        assert_eq!(indices[query * k], row, "query {query}'s best match");
        assert!(
            scores[query * k] > 0.99,
            "query {query}: {}",
            scores[query * k]
        );
    }
    // Row 200 is an exact copy of row 77: an exact tie, the lower index first.
    assert_eq!(database[200 * dim..201 * dim], database[77 * dim..78 * dim]);
    assert_eq!(indices[5 * k..5 * k + 2], [77, 200]);
    assert_eq!(scores[5 * k], scores[5 * k + 1]);

    // Threshold mode finds exactly the planted pairs (and the duplicate).
    let pairs: Vec<(u32, u32)> =
        cosine_topk::pairs_above(&queries, &database, dim, 0.99, Exclude::Nothing)
            .into_iter()
            .map(|(q, d, _)| (q, d))
            .collect();
    assert_eq!(
        pairs,
        vec![(0, 3), (5, 77), (5, 200), (10, 150), (20, 222), (36, 300)]
    );
}

#[test]
fn cosine_topk_kernel_matches_pytorch() {
    // The f32 inputs through the emulated kernels (two bf16 halves per
    // value): the same lists as PyTorch, the planted tie in index order.
    use platypus::ops::cosine_topk as ops;
    let f = Fixture::load();
    let (queries, qs) = f.f32("cosine_topk/queries");
    let (database, ds) = f.f32("cosine_topk/database");
    let (want_idx, is) = f.i64("cosine_topk/indices");
    let (want_scores, _) = f.f32("cosine_topk/scores");
    let dev = Device::Emulated;
    let q = Tensor::from_slice(&queries, &qs, &dev).unwrap();
    let db = Tensor::from_slice(&database, &ds, &dev).unwrap();
    let got = ops::topk(&q, &db, is[1]).unwrap();
    let want_idx: Vec<u32> = want_idx.iter().map(|&i| i as u32).collect();
    assert_eq!(got.indices.to_vec::<u32>().unwrap(), want_idx);
    assert_close(
        "cosine_topk/scores (emulated)",
        &got.scores.to_vec::<f32>().unwrap(),
        &want_scores,
        1e-4,
        0.0,
    );
    let pairs: Vec<(u32, u32)> = ops::above_threshold(&q, &db, 0.99, 100)
        .unwrap()
        .into_iter()
        .map(|p| (p.query, p.item))
        .collect();
    assert_eq!(
        pairs,
        vec![(0, 3), (5, 77), (5, 200), (10, 150), (20, 222), (36, 300)]
    );
}
