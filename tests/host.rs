//! The fast host code behind `Device::Cpu` against exact references:
//! `host::gemm` against an f64 triple loop, `host::attention` against the
//! f64 reference `cpu::attention::forward_kv`, the row ops and the backward
//! ops of training (LoRA, attention, RMSNorm, SwiGLU) against theirs, on
//! random shapes (0 and 1 included, several tiles, panels and key blocks),
//! on 1, 2, 3 and 16 threads.
//!
//! Tolerances. With u = 2^-24 the f32 rounding unit, an f32 dot product of
//! terms tᵢ is within γ·Σ|tᵢ| of the exact one, where γ is k·u in the worst
//! case but a few u for rounding errors of random sign (they add up like a
//! random walk whose steps are bounded by the partial sums, themselves
//! ~√k·|t| against Σ|tᵢ| ~ k·|t|). The checks allow 16u of that magnitude
//! (scores: of scale·‖q‖‖k‖, see `AttnCase::check`), far below a typical
//! single term, Σ|tᵢ|/k, at every k tested, so a dropped, doubled or
//! misplaced term fails. In 2000 cases per test the worst errors reached 0.37 of the
//! allowance for the GEMM, 0.16 for lse and 0.05 for o (whose bound assumes
//! every probability's error pushes the same way; across keys they cancel).
//! In 1000 cases of the backward tests: LoRA dx 0.31, dA 0.25, dB 0.23, the
//! base layer's dx 0.34; attention dq 0.025, dk 0.031 and dv 0.14 (the
//! bounds of dq and dk add up the errors of P, dP and Δ in every term, see
//! `AttnBwdCase::check`).

mod common;

use std::sync::OnceLock;

use common::{proptest_config, Rng};
use half::{bf16, f16};
use platypus::cpu::attention::{forward_kv, SeqSpan};
use platypus::host::attention::{attention_forward, KvDims};
use platypus::host::gemm::{matmul_nn, matmul_nt, matmul_tn, Weights};
use proptest::prelude::*;
use rayon::{ThreadPool, ThreadPoolBuilder};

/// 16 f32 rounding units, the allowed error relative to the magnitude of
/// what was summed (see the file's comment).
const TOL: f64 = 16.0 / (1u64 << 24) as f64;

/// A rayon pool of `threads` threads, built once per size.
fn pool(threads: usize) -> &'static ThreadPool {
    static POOLS: [OnceLock<ThreadPool>; 17] = [const { OnceLock::new() }; 17];
    POOLS[threads].get_or_init(|| {
        ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .expect("a rayon pool")
    })
}

fn threads() -> impl Strategy<Value = usize> {
    prop::sample::select(vec![1usize, 2, 3, 16])
}

/// The stored dtype of a weight matrix.
#[derive(Clone, Copy, Debug)]
enum Dtype {
    F32,
    F16,
    BF16,
}

/// A weight matrix held in its dtype.
enum Owned {
    F32(Vec<f32>),
    F16(Vec<f16>),
    BF16(Vec<bf16>),
}

impl Owned {
    fn new(values: &[f32], dtype: Dtype) -> Owned {
        match dtype {
            Dtype::F32 => Owned::F32(values.to_vec()),
            Dtype::F16 => Owned::F16(values.iter().map(|&v| f16::from_f32(v)).collect()),
            Dtype::BF16 => Owned::BF16(values.iter().map(|&v| bf16::from_f32(v)).collect()),
        }
    }

    fn view(&self) -> Weights<'_> {
        match self {
            Owned::F32(w) => Weights::F32(w),
            Owned::F16(w) => Weights::F16(w),
            Owned::BF16(w) => Weights::BF16(w),
        }
    }

    /// The stored values, exactly, as f32.
    fn values(&self) -> Vec<f32> {
        match self {
            Owned::F32(w) => w.clone(),
            Owned::F16(w) => w.iter().map(|v| v.to_f32()).collect(),
            Owned::BF16(w) => w.iter().map(|v| v.to_f32()).collect(),
        }
    }
}

/// Which product: y = x wᵀ (x [m, k], w [n, k]), y = x w (x [m, k], w [k,
/// n]) or y = xᵀ w (x [k, m], w [k, n]).
#[derive(Clone, Copy, Debug, PartialEq)]
enum Product {
    Nt,
    Nn,
    Tn,
}

/// One GEMM case: sizes, scalars, dtype, threads and the seed of the data.
#[derive(Clone, Copy, Debug)]
struct GemmCase {
    product: Product,
    m: usize,
    k: usize,
    n: usize,
    alpha: f32,
    beta: f32,
    dtype: Dtype,
    threads: usize,
    seed: u64,
}

impl GemmCase {
    /// Runs the host GEMM and checks each output against the f64 triple
    /// loop: |got − want| ≤ TOL · (|alpha| Σ|x w| + |beta y|) + 1e-30.
    fn check(self) -> Result<(), String> {
        let GemmCase {
            m,
            k,
            n,
            alpha,
            beta,
            ..
        } = self;
        let mut rng = Rng::new(self.seed);
        let x = rng.normal_vec(m * k, 1.0);
        let w = Owned::new(&rng.normal_vec(n * k, 0.5), self.dtype);
        // beta 0 must not read y: NaN there must not leak out.
        let y0 = if beta == 0.0 {
            vec![f32::NAN; m * n]
        } else {
            rng.normal_vec(m * n, 1.0)
        };
        let mut y = y0.clone();
        pool(self.threads).install(|| match self.product {
            Product::Nt => matmul_nt(&x, w.view(), m, k, n, alpha, beta, &mut y),
            Product::Nn => matmul_nn(&x, w.view(), m, k, n, alpha, beta, &mut y),
            Product::Tn => matmul_tn(&x, w.view(), k, m, n, alpha, beta, &mut y),
        });

        let wv = w.values();
        let w_at = |j: usize, c: usize| match self.product {
            Product::Nt => wv[j * k + c] as f64,
            Product::Nn | Product::Tn => wv[c * n + j] as f64,
        };
        let x_at = |i: usize, c: usize| match self.product {
            Product::Nt | Product::Nn => x[i * k + c] as f64,
            Product::Tn => x[c * m + i] as f64,
        };
        for i in 0..m {
            for j in 0..n {
                let (mut sum, mut size) = (0.0f64, 0.0f64);
                for c in 0..k {
                    let t = x_at(i, c) * w_at(j, c);
                    sum += t;
                    size += t.abs();
                }
                let (mut want, mut mag) = (alpha as f64 * sum, (alpha as f64 * size).abs());
                if beta != 0.0 {
                    want += beta as f64 * y0[i * n + j] as f64;
                    mag += (beta as f64 * y0[i * n + j] as f64).abs();
                }
                let got = y[i * n + j] as f64;
                // Written so that NaN fails.
                let close = (got - want).abs() <= TOL * mag + 1e-30;
                if !close {
                    return Err(format!(
                        "y[{i}, {j}] = {got}, want {want} (allowed {})",
                        TOL * mag
                    ));
                }
            }
        }
        Ok(())
    }
}

/// (m, k, n): all small sizes with 0 and 1, the small test model's, several
/// tiles and panels, one row (decoding) against wide or deep weights.
fn gemm_shape() -> impl Strategy<Value = (usize, usize, usize)> {
    prop_oneof![
        (0usize..=6, 0usize..=6, 0usize..=6),
        (0usize..=70, 0usize..=70, 0usize..=70),
        Just((48, 64, 172)),
        Just((48, 172, 64)),
        (257usize..=300, 1usize..=40, 257usize..=300),
        (2usize..=40, 257usize..=700, 2usize..=300),
        (Just(1), 1usize..=2000, 1usize..=2000),
        (1usize..=300, Just(1), 1usize..=300),
        (1usize..=300, 1usize..=300, Just(1)),
    ]
}

fn dtype() -> impl Strategy<Value = Dtype> {
    prop::sample::select(vec![Dtype::F32, Dtype::F16, Dtype::BF16])
}

fn scalar(special: Vec<f32>) -> impl Strategy<Value = f32> {
    prop_oneof![prop::sample::select(special), -3.0f32..3.0]
}

proptest! {
    #![proptest_config(proptest_config(96))]

    #[test]
    fn gemm_matches_f64(
        product in prop::sample::select(vec![Product::Nt, Product::Nn, Product::Tn]),
        (m, k, n) in gemm_shape(),
        alpha in scalar(vec![1.0, -0.5]),
        beta in scalar(vec![0.0, 0.0, 1.0, -1.5]),
        dtype in dtype(),
        threads in threads(),
        seed in any::<u64>(),
    ) {
        let case = GemmCase { product, m, k, n, alpha, beta, dtype, threads, seed };
        case.check().map_err(|e| TestCaseError::fail(format!("{case:?}: {e}")))?;
    }
}

#[test]
fn gemm_matches_f64_at_llama_7b_sizes() {
    // Decoding GEMVs against the 4096 × 4096 projections, and 16 tokens
    // through a slice of the MLP (k 4096 and 11008); as xᵀ w, sums over
    // that many tokens (a rank-16 LoRA factor's gradient).
    let shapes = [(1, 4096, 4096), (16, 4096, 512), (3, 11008, 300)];
    for (i, &(m, k, n)) in shapes.iter().enumerate() {
        for product in [Product::Nt, Product::Nn, Product::Tn] {
            for dtype in [Dtype::F32, Dtype::F16, Dtype::BF16] {
                let case = GemmCase {
                    product,
                    m,
                    k,
                    n,
                    alpha: 1.0,
                    beta: if product == Product::Nt { 0.0 } else { 1.0 },
                    dtype,
                    threads: 3,
                    seed: i as u64,
                };
                if let Err(e) = case.check() {
                    panic!("{case:?}: {e}");
                }
            }
        }
    }
}

/// One attention case: heads, head size, and per sequence (padding before
/// its queries, queries, padding before its keys, keys).
#[derive(Clone, Debug)]
struct AttnCase {
    q_heads: usize,
    kv_heads: usize,
    head_dim: usize,
    seqs: Vec<(usize, usize, usize, usize)>,
    causal: bool,
    /// Multiplies 1/√head_dim: above 1 the softmax is peaked.
    sharpness: f32,
    threads: usize,
    seed: u64,
}

impl AttnCase {
    /// Runs the host attention and checks o and lse against the f64
    /// reference, padding (which must be exactly 0) included: |Δo| ≤ TOL ·
    /// (1 + S) · max|v| and |Δlse| ≤ TOL · (1 + S), where S = scale ·
    /// max‖q‖ · max‖k‖ bounds scale · Σ|q k| of every query–key pair, the
    /// size of a score's rounding error, which the softmax turns into a
    /// relative error of each probability.
    fn check(&self) -> Result<(), String> {
        let (mut q_spans, mut kv_spans) = (Vec::new(), Vec::new());
        let (mut q_tokens, mut kv_tokens) = (0, 0);
        for &(q_pad, q_len, kv_pad, kv_len) in &self.seqs {
            q_spans.push(SeqSpan {
                start: q_tokens + q_pad,
                len: q_len,
            });
            kv_spans.push(SeqSpan {
                start: kv_tokens + kv_pad,
                len: kv_len,
            });
            q_tokens += q_pad + q_len;
            kv_tokens += kv_pad + kv_len;
        }
        // Trailing padding too.
        q_tokens += 1;
        let d = self.head_dim;
        let dims = KvDims {
            q_tokens,
            kv_tokens,
            q_heads: self.q_heads,
            kv_heads: self.kv_heads,
            head_dim: d,
        };
        let mut rng = Rng::new(self.seed);
        let q = rng.normal_vec(q_tokens * self.q_heads * d, 1.0);
        let k = rng.normal_vec(kv_tokens * self.kv_heads * d, 1.0);
        let v = rng.normal_vec(kv_tokens * self.kv_heads * d, 1.0);
        let scale = self.sharpness / (d as f32).sqrt();

        let mut o = vec![f32::NAN; q.len()];
        let mut lse = vec![f32::NAN; self.q_heads * q_tokens];
        pool(self.threads).install(|| {
            attention_forward(
                &q,
                &k,
                &v,
                &dims,
                &q_spans,
                &kv_spans,
                scale,
                self.causal,
                &mut o,
                &mut lse,
            )
        });
        let (want_o, want_lse) =
            forward_kv(&q, &k, &v, &dims, &q_spans, &kv_spans, scale, self.causal);

        let max_norm = |x: &[f32]| {
            x.chunks(d)
                .map(|row| row.iter().map(|&v| v as f64 * v as f64).sum::<f64>().sqrt())
                .fold(0.0f64, f64::max)
        };
        let max_abs = |x: &[f32]| x.iter().fold(0.0f64, |m, &v| m.max(v.abs() as f64));
        let s = scale as f64 * max_norm(&q) * max_norm(&k);
        let lse_tol = TOL * (1.0 + s);
        let o_tol = lse_tol * max_abs(&v);
        let compare = |what: &str, got: &[f32], want: &[f32], tol: f64| {
            for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
                let close = (g as f64 - w as f64).abs() <= tol;
                if !close {
                    return Err(format!("{what}[{i}] = {g}, want {w} (allowed {tol})"));
                }
            }
            Ok(())
        };
        compare("o", &o, &want_o, o_tol)?;
        compare("lse", &lse, &want_lse, lse_tol)
    }
}

/// Head sizes: the fast ones, odd ones and ones not a multiple of 8.
fn head_dim() -> impl Strategy<Value = usize> {
    prop_oneof![
        prop::sample::select(vec![16usize, 32, 64, 128]),
        1usize..=9,
        prop::sample::select(vec![24usize, 40, 72, 100]),
    ]
}

/// (query padding, queries, key padding, keys): a full prefill, queries
/// shorter than the keys (new tokens against a cache, one of them when
/// decoding), empty sequences; up to two query and key blocks.
fn sequence() -> impl Strategy<Value = (usize, usize, usize, usize)> {
    let keys = prop_oneof![0usize..=12, 13usize..=150];
    (0usize..=3, keys, 0usize..=3, 0u8..4).prop_flat_map(|(q_pad, kv_len, kv_pad, kind)| {
        let q_len = match kind {
            0 | 1 => Just(kv_len).boxed(),
            2 => Just(kv_len.min(1)).boxed(),
            _ => (0..=kv_len).boxed(),
        };
        (Just(q_pad), q_len, Just(kv_pad), Just(kv_len))
    })
}

proptest! {
    #![proptest_config(proptest_config(64))]

    #[test]
    fn attention_matches_reference(
        kv_heads in 1usize..=2,
        group in 1usize..=3,
        head_dim in head_dim(),
        seqs in prop::collection::vec(sequence(), 0..=3),
        causal in any::<bool>(),
        sharpness in prop::sample::select(vec![1.0f32, 4.0]),
        threads in threads(),
        seed in any::<u64>(),
    ) {
        let case = AttnCase {
            q_heads: kv_heads * group, kv_heads, head_dim, seqs, causal, sharpness, threads, seed,
        };
        case.check().map_err(|e| TestCaseError::fail(format!("{case:?}: {e}")))?;
    }
}

#[test]
fn attention_matches_reference_on_long_sequences() {
    let case = |q_heads, kv_heads, head_dim, seqs: Vec<_>, causal| AttnCase {
        q_heads,
        kv_heads,
        head_dim,
        seqs,
        causal,
        sharpness: 1.0,
        threads: 3,
        seed: 7,
    };
    let cases = [
        // A prefill of many query and key blocks.
        case(2, 1, 64, vec![(0, 300, 0, 300)], true),
        // Decoding against a long cache, GQA 4:1, and a batch of two.
        case(4, 1, 128, vec![(0, 1, 0, 1000), (2, 1, 1, 333)], true),
        // A chunk of new tokens against a cache, with and without the mask.
        case(2, 2, 32, vec![(1, 100, 5, 400)], true),
        case(2, 2, 16, vec![(1, 100, 5, 400)], false),
    ];
    for c in cases {
        if let Err(e) = c.check() {
            panic!("{c:?}: {e}");
        }
    }
}

/// The row-wise ops of the model's host path against their references: the
/// embedding gather (exact), SwiGLU and its gradient, RMSNorm (alone, with
/// its gradient, and the residual add fused with it), RoPE (both pair
/// styles, forward and inverse), and the LM head fused with cross-entropy
/// and its gradient (blocks of rows smaller and larger than one block of
/// logits; ignored labels).
mod row_ops {
    use super::*;
    use platypus::ops::{cross_entropy, embedding, rmsnorm, rope, swiglu};
    use platypus::{cpu, DType, Device, Tensor};

    fn t(v: &[f32], shape: &[usize], dtype: DType) -> Tensor {
        Tensor::from_f32(v, shape, dtype, &Device::Cpu).unwrap()
    }

    fn close(got: &[f32], want: &[f32], rel: f32, what: &str) {
        let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-30);
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!((g - w).abs() <= rel * scale, "{what}[{i}]: {g} vs {w}");
        }
        assert_eq!(got.len(), want.len(), "{what}: length");
    }

    proptest! {
        #![proptest_config(proptest_config(24))]

        #[test]
        fn row_ops_match_their_references(rows in 1usize..40, hidden in 1usize..300, vocab in 1usize..700, half in any::<bool>(), seed in any::<u64>()) {
            let mut rng = Rng::new(seed);
            let x = rng.normal_vec(rows * hidden, 1.0);
            let d = rng.normal_vec(rows * hidden, 1.0);
            let w = rng.normal_vec(hidden, 1.0);
            // Embedding: a table stored in bf16 or f32, rows copied exactly.
            let table_dtype = if half { DType::BF16 } else { DType::F32 };
            let table = t(&rng.normal_vec(vocab * hidden, 1.0), &[vocab, hidden], table_dtype);
            let ids: Vec<u32> = (0..rows).map(|_| (rng.next_u64() % vocab as u64) as u32).collect();
            let e = embedding::forward(&table, &ids, DType::F32).unwrap().to_f32_vec().unwrap();
            let tv = table.to_f32_vec().unwrap();
            let want: Vec<f32> = ids.iter().flat_map(|&i| tv[i as usize * hidden..][..hidden].to_vec()).collect();
            prop_assert_eq!(e, want);
            // SwiGLU.
            let s = swiglu::forward(&t(&x, &[rows, hidden], DType::F32), &t(&d, &[rows, hidden], DType::F32)).unwrap();
            close(&s.to_f32_vec().unwrap(), &cpu::swiglu::forward(&x, &d), 4e-7, "swiglu");
            let dm = rng.normal_vec(rows * hidden, 1.0);
            let g = swiglu::backward(
                &t(&x, &[rows, hidden], DType::F32),
                &t(&d, &[rows, hidden], DType::F32),
                &t(&dm, &[rows, hidden], DType::F32),
            ).unwrap();
            let (dgate, dup) = cpu::swiglu::backward(&x, &d, &dm);
            // dgate's factor 1 + g (1 − σ) cancels near g = −1.28: its
            // error is relative to the size of the terms.
            let size: Vec<f64> = x.iter().zip(&d).zip(&dm).map(|((&g, &u), &dm)| {
                let (g, sigma) = (g as f64, 1.0 / (1.0 + (-g as f64).exp()));
                (dm as f64 * u as f64).abs() * sigma * (1.0 + g.abs() * (1.0 - sigma))
            }).collect();
            for (i, ((g, w), m)) in g.dgate.to_f32_vec().unwrap().iter().zip(&dgate).zip(&size).enumerate() {
                prop_assert!(((g - w).abs() as f64) <= TOL * m + 1e-30, "swiglu dgate[{}]: {} vs {}", i, g, w);
            }
            close(&g.dup.to_f32_vec().unwrap(), &dup, 4e-7, "swiglu dup");
            // RMSNorm and h += d; rmsnorm(h).
            let wt = t(&w, &[hidden], DType::F32);
            let y = rmsnorm::forward(&t(&x, &[rows, hidden], DType::F32), &wt, 1e-5).unwrap();
            close(&y.to_f32_vec().unwrap(), &cpu::rmsnorm::forward(&x, &w, hidden, 1e-5), 4e-7, "rmsnorm");
            let g = rmsnorm::backward(&t(&x, &[rows, hidden], DType::F32), &wt, &t(&dm, &[rows, hidden], DType::F32), 1e-5, true).unwrap();
            let (dx, dw) = cpu::rmsnorm::backward(&x, &w, &dm, hidden, 1e-5);
            close(&g.dx.to_f32_vec().unwrap(), &dx, 4e-7, "rmsnorm dx");
            close(&g.dw.unwrap().to_f32_vec().unwrap(), &dw, 4e-7, "rmsnorm dw");
            let mut h = t(&x, &[rows, hidden], DType::F32);
            let y = rmsnorm::add_forward(&mut h, &t(&d, &[rows, hidden], DType::F32), &wt, 1e-5).unwrap();
            let sum: Vec<f32> = x.iter().zip(&d).map(|(a, b)| a + b).collect();
            prop_assert_eq!(h.to_f32_vec().unwrap(), sum.clone());
            close(&y.to_f32_vec().unwrap(), &cpu::rmsnorm::forward(&sum, &w, hidden, 1e-5), 4e-7, "add_rmsnorm");
            // LM head + cross-entropy, every third label ignored.
            let head = rng.normal_vec(vocab * hidden, 0.1);
            let labels: Vec<i32> = (0..rows)
                .map(|r| if r % 3 == 2 { -100 } else { (rng.next_u64() % vocab as u64) as i32 })
                .collect();
            let ce = cross_entropy::linear_cross_entropy(
                &t(&x, &[rows, hidden], DType::F32),
                &t(&head, &[vocab, hidden], DType::F32),
                &labels,
            ).unwrap();
            let (sum, count, lse) = cpu::cross_entropy::linear_cross_entropy(&x, &head, &labels, hidden);
            prop_assert_eq!(ce.tokens, count);
            // Each loss is lse − logit, both of size ~‖x‖·0.1·√hidden·a few.
            let scale = 1.0 + 0.1 * (hidden as f64).sqrt() * 4.0;
            prop_assert!((ce.loss_sum - sum).abs() <= 1e-5 * scale * count.max(1) as f64, "{} vs {sum}", ce.loss_sum);
            close(&ce.lse, &lse, 2e-6, "lse");
            let (_, dh) = cross_entropy::linear_cross_entropy_grad(
                &t(&x, &[rows, hidden], DType::F32),
                &t(&head, &[vocab, hidden], DType::F32),
                &labels,
                0.25,
            ).unwrap();
            let want = cpu::cross_entropy::linear_cross_entropy_grad(&x, &head, &labels, hidden, 0.25);
            // A GEMM over the vocabulary: 1.5e-6 of max |dh| at worst in 500 cases.
            close(&dh.to_f32_vec().unwrap(), &want, 4e-6, "dh");
        }
    }

    proptest! {
        #![proptest_config(proptest_config(24))]

        #[test]
        fn rope_matches_its_reference(batch in 1usize..3, seq in 1usize..40, q_heads in 1usize..5, k_heads in 1usize..3, half_dim in 1usize..40, interleaved in any::<bool>(), inverse in any::<bool>(), seed in any::<u64>()) {
            let head_dim = 2 * half_dim;
            let mut rng = Rng::new(seed);
            let positions: Vec<i32> = (0..batch * seq).map(|_| (rng.next_u64() % 4096) as i32).collect();
            let q = rng.normal_vec(batch * seq * q_heads * head_dim, 1.0);
            let k = rng.normal_vec(batch * seq * k_heads * head_dim, 1.0);
            let cfg = rope::RopeConfig {
                style: if interleaved { cpu::rope::RopeStyle::Interleaved } else { cpu::rope::RopeStyle::RotateHalf },
                ..rope::RopeConfig::default()
            };
            let (mut qt, mut kt) = (t(&q, &[batch, seq, q_heads, head_dim], DType::F32), t(&k, &[batch, seq, k_heads, head_dim], DType::F32));
            let pos = Tensor::from_slice(&positions, &[batch, seq], &Device::Cpu).unwrap();
            if inverse {
                rope::backward(&mut qt, &mut kt, &pos, &cfg).unwrap();
            } else {
                rope::forward(&mut qt, &mut kt, &pos, &cfg).unwrap();
            }
            for (got, mut want, heads, what) in [(qt, q, q_heads, "q"), (kt, k, k_heads, "k")] {
                cpu::rope::apply(&mut want, &positions, heads, head_dim, cfg.theta, cfg.style, inverse);
                close(&got.to_f32_vec().unwrap(), &want, 4e-7, what);
            }
        }
    }

    #[test]
    fn rmsnorm_backward_over_many_blocks_of_rows() {
        // 700 rows of 100: five tasks' partial sums of dw, added in order.
        let (rows, hidden) = (700, 100);
        let mut rng = Rng::new(9);
        let x = rng.normal_vec(rows * hidden, 1.0);
        let dy = rng.normal_vec(rows * hidden, 1.0);
        let w = rng.normal_vec(hidden, 1.0);
        let run = |threads: usize| {
            pool(threads).install(|| {
                let g = rmsnorm::backward(
                    &t(&x, &[rows, hidden], DType::F32),
                    &t(&w, &[hidden], DType::F32),
                    &t(&dy, &[rows, hidden], DType::F32),
                    1e-5,
                    true,
                )
                .unwrap();
                (
                    g.dx.to_f32_vec().unwrap(),
                    g.dw.unwrap().to_f32_vec().unwrap(),
                )
            })
        };
        let (dx, dw) = run(3);
        assert_eq!((dx.clone(), dw.clone()), run(1), "3 threads vs 1");
        let (want_dx, want_dw) = cpu::rmsnorm::backward(&x, &w, &dy, hidden, 1e-5);
        close(&dx, &want_dx, 4e-7, "dx");
        close(&dw, &want_dw, 4e-7, "dw");
    }

    #[test]
    fn cross_entropy_over_many_blocks_of_logits() {
        // 300 rows of a 32000-token head: two blocks of at most 32 MiB of logits.
        let (rows, hidden, vocab) = (300, 16, 32000);
        let mut rng = Rng::new(5);
        let x = rng.normal_vec(rows * hidden, 1.0);
        let head = rng.normal_vec(vocab * hidden, 0.2);
        let labels: Vec<i32> = (0..rows).map(|r| (r * 97 % vocab) as i32).collect();
        let ce = cross_entropy::linear_cross_entropy(
            &t(&x, &[rows, hidden], DType::F32),
            &t(&head, &[vocab, hidden], DType::F32),
            &labels,
        )
        .unwrap();
        let (sum, count, lse) =
            cpu::cross_entropy::linear_cross_entropy(&x, &head, &labels, hidden);
        assert_eq!(ce.tokens, count);
        assert!(
            (ce.loss_sum - sum).abs() < 1e-6 * sum.abs(),
            "{} vs {sum}",
            ce.loss_sum
        );
        close(&ce.lse, &lse, 1e-6, "lse");
        // With the gradient: blocks of whole GEMM row tiles, 256 + 44 rows.
        let (_, dh) = cross_entropy::linear_cross_entropy_grad(
            &t(&x, &[rows, hidden], DType::F32),
            &t(&head, &[vocab, hidden], DType::F32),
            &labels,
            0.5,
        )
        .unwrap();
        let want = cpu::cross_entropy::linear_cross_entropy_grad(&x, &head, &labels, hidden, 0.5);
        close(&dh.to_f32_vec().unwrap(), &want, 4e-6, "dh");
    }
}

/// The backward ops of LoRA training on the host path (f32 on
/// `Device::Cpu`, through the ops) against their f64 references: the LoRA
/// layer (dropout on and off, ranks 1 to 33, W stored in f32, f16 or bf16)
/// and the base layer's dx, attention (dense, padded and packed batches,
/// causal or not, grouped-query heads), each checked with the allowance of
/// the file's comment relative to the magnitude of what its result sums.
mod backward {
    use super::*;
    use platypus::cpu::attention::AttentionDims;
    use platypus::cpu::lora::LoraDims;
    use platypus::cpu::philox::Dropout;
    use platypus::ops::attention::{self, AttentionConfig, Batch};
    use platypus::ops::lora::{self, LoraConfig, LoraWeights};
    use platypus::{cpu, DType, Device, Tensor};

    /// |got − want| ≤ TOL · mag[i] + 1e-30 for every element.
    fn within(what: &str, got: &[f32], want: &[f32], mag: &[f64]) -> Result<(), String> {
        assert_eq!(got.len(), want.len(), "{what}: length");
        assert_eq!(mag.len(), want.len(), "{what}: magnitudes");
        for (i, ((&g, &w), &m)) in got.iter().zip(want).zip(mag).enumerate() {
            let allowed = TOL * m + 1e-30;
            // Written so that NaN fails.
            let close = (g as f64 - w as f64).abs() <= allowed;
            if !close {
                return Err(format!("{what}[{i}] = {g}, want {w} (allowed {allowed})"));
            }
        }
        Ok(())
    }

    fn tensor(v: &[f32], shape: &[usize], dtype: DType) -> Tensor {
        Tensor::from_f32(v, shape, dtype, &Device::Cpu).unwrap()
    }

    /// One LoRA layer case.
    #[derive(Clone, Debug)]
    struct LoraCase {
        tokens: usize,
        d_in: usize,
        d_out: usize,
        rank: usize,
        dropout: f32,
        rslora: bool,
        w_dtype: DType,
        threads: usize,
        seed: u64,
    }

    impl LoraCase {
        /// Forward then backward through the ops; dx, dA and dB against
        /// `cpu::lora::backward` and `linear_backward`'s dx against dy W.
        /// Magnitudes (with v = dy B, f the dropout factors, xd = f ∘ x):
        /// dx: Σ|dy W| + |s| f Σ_j (Σ|dy B|)_j |A_j| (v's own rounding
        /// carries through A); dA: |s| Σ_t (Σ|dy B|) |xd|; dB: |s| Σ_t |dy|
        /// (Σ|xd A|) (the saved u is the forward's f32 one, the reference
        /// recomputes it exactly).
        fn check(&self) -> Result<(), String> {
            let (t, n, m, r) = (self.tokens, self.d_in, self.d_out, self.rank);
            let mut rng = Rng::new(self.seed);
            let x = rng.normal_vec(t * n, 1.0);
            let w = tensor(&rng.normal_vec(m * n, 0.5), &[m, n], self.w_dtype);
            let a = rng.normal_vec(r * n, 0.5);
            let b = rng.normal_vec(m * r, 0.5);
            let dy = rng.normal_vec(t * m, 1.0);
            let cfg = LoraConfig {
                alpha: 8.0,
                rslora: self.rslora,
                dropout: self.dropout,
                seed: rng.next_u64(),
                offset: rng.next_u64() >> 8,
            };
            let s = cfg.scale(r);
            let (xt, dyt) = (
                tensor(&x, &[t, n], DType::F32),
                tensor(&dy, &[t, m], DType::F32),
            );
            let (at, bt) = (
                tensor(&a, &[r, n], DType::F32),
                tensor(&b, &[m, r], DType::F32),
            );
            let weights = LoraWeights {
                w: &w,
                a: &at,
                b: &bt,
            };
            let (grads, dx_base) = pool(self.threads).install(|| {
                let fwd = lora::forward(&xt, weights, &cfg).unwrap();
                let grads = lora::backward(&xt, &dyt, weights, &fwd.u, &cfg).unwrap();
                (grads, lora::linear_backward(&dyt, &w).unwrap())
            });
            let values = |t: &Tensor| t.to_f32_vec().unwrap();
            let wv = values(&w);
            let dims = LoraDims {
                tokens: t,
                in_features: n,
                out_features: m,
                rank: r,
            };
            let dropout = (self.dropout > 0.0).then_some(Dropout {
                p: cfg.dropout,
                seed: cfg.seed,
                offset: cfg.offset,
            });
            let (want_dx, want_da, want_db) =
                cpu::lora::backward(&x, &wv, &a, &b, &dy, &dims, s, dropout.as_ref());

            let f: Vec<f64> = (0..t * n)
                .map(|e| match &dropout {
                    Some(d) if !d.keep(e as u64) => 0.0,
                    Some(d) => 1.0 / (1.0 - d.p as f64),
                    None => 1.0,
                })
                .collect();
            let xd: Vec<f64> = x
                .iter()
                .zip(&f)
                .map(|(&x, &f)| (x as f64 * f).abs())
                .collect();
            let abs = |v: f32| (v as f64).abs();
            let v_abs: Vec<f64> = (0..t * r)
                .map(|e| {
                    (0..m)
                        .map(|o| abs(dy[e / r * m + o]) * abs(b[o * r + e % r]))
                        .sum()
                })
                .collect();
            let u_abs: Vec<f64> = (0..t * r)
                .map(|e| {
                    (0..n)
                        .map(|i| xd[e / r * n + i] * abs(a[e % r * n + i]))
                        .sum()
                })
                .collect();
            let s_abs = (s as f64).abs();
            let base: Vec<f64> = (0..t * n)
                .map(|e| {
                    (0..m)
                        .map(|o| abs(dy[e / n * m + o]) * abs(wv[o * n + e % n]))
                        .sum()
                })
                .collect();
            let mag_dx: Vec<f64> = (0..t * n)
                .map(|e| {
                    let (tk, i) = (e / n, e % n);
                    let lora: f64 = (0..r).map(|j| v_abs[tk * r + j] * abs(a[j * n + i])).sum();
                    base[e] + s_abs * f[e] * lora
                })
                .collect();
            let mag_da: Vec<f64> = (0..r * n)
                .map(|e| {
                    let (j, i) = (e / n, e % n);
                    s_abs
                        * (0..t)
                            .map(|tk| v_abs[tk * r + j] * xd[tk * n + i])
                            .sum::<f64>()
                })
                .collect();
            let mag_db: Vec<f64> = (0..m * r)
                .map(|e| {
                    let (o, j) = (e / r, e % r);
                    s_abs
                        * (0..t)
                            .map(|tk| abs(dy[tk * m + o]) * u_abs[tk * r + j])
                            .sum::<f64>()
                })
                .collect();
            within("dx", &values(&grads.dx), &want_dx, &mag_dx)?;
            within("dA", &values(&grads.da), &want_da, &mag_da)?;
            within("dB", &values(&grads.db), &want_db, &mag_db)?;
            let want_base: Vec<f32> = (0..t * n)
                .map(|e| {
                    let (tk, i) = (e / n, e % n);
                    (0..m)
                        .map(|o| dy[tk * m + o] as f64 * wv[o * n + i] as f64)
                        .sum::<f64>() as f32
                })
                .collect();
            within("linear dx", &values(&dx_base), &want_base, &base)
        }
    }

    /// (tokens, in, out): small and odd sizes with 1 included, more than one
    /// GEMM tile of tokens, a slice of a Llama layer.
    fn lora_shape() -> impl Strategy<Value = (usize, usize, usize)> {
        prop_oneof![
            (1usize..=6, 1usize..=6, 1usize..=6),
            (1usize..=70, 1usize..=70, 1usize..=70),
            (257usize..=300, 1usize..=40, 1usize..=40),
            Just((48, 64, 172)),
            Just((100, 172, 64)),
        ]
    }

    proptest! {
        #![proptest_config(proptest_config(64))]

        #[test]
        fn lora_backward_matches_reference(
            (tokens, d_in, d_out) in lora_shape(),
            rank in prop::sample::select(vec![1usize, 2, 7, 16, 16, 33]),
            dropout in prop::sample::select(vec![0.0f32, 0.05, 0.5]),
            rslora in any::<bool>(),
            w_dtype in prop::sample::select(vec![DType::F32, DType::F32, DType::F16, DType::BF16]),
            threads in threads(),
            seed in any::<u64>(),
        ) {
            let case = LoraCase { tokens, d_in, d_out, rank, dropout, rslora, w_dtype, threads, seed };
            case.check().map_err(|e| TestCaseError::fail(format!("{case:?}: {e}")))?;
        }
    }

    proptest! {
        #![proptest_config(proptest_config(32))]

        /// The host mask (Philox side by side, in tasks) is `Dropout::keep`'s
        /// bit for bit: tails of a block and of a task, the 64-bit counter's
        /// carry into its high word and its wrap past u64::MAX.
        #[test]
        fn dropout_mask_is_the_reference_mask(
            n in prop_oneof![1usize..=300, 16000usize..=40000],
            p in prop::sample::select(vec![0.05f32, 0.5, 0.9]),
            seed in any::<u64>(),
            offset in prop_oneof![
                any::<u64>(),
                (0u64..20000).prop_map(|d| 0xffff_ffff - d),
                (0u64..20000).prop_map(|d| u64::MAX - d),
            ],
            threads in threads(),
        ) {
            let d = Dropout { p, seed, offset };
            let x: Vec<f32> = (0..n).map(|e| 1.0 + e as f32).collect();
            let got = pool(threads).install(|| platypus::host::lora::dropout(&x, &d));
            for (e, (&g, &x)) in got.iter().zip(&x).enumerate() {
                let want = if d.keep(e as u64) { x * d.scale() } else { 0.0 };
                prop_assert_eq!(g, want, "element {}", e);
            }
        }
    }

    /// How the sequences of an attention case sit in q, k and v.
    #[derive(Clone, Debug)]
    enum Layout {
        Dense { batch: usize, seq: usize },
        Padded { seq: usize, lens: Vec<u32> },
        Packed { lens: Vec<u32> },
    }

    impl Layout {
        /// (leading dims of q, the sequences as spans, the batch as the op
        /// takes it).
        fn spans(&self) -> (Vec<usize>, Vec<SeqSpan>, Vec<u32>) {
            match self {
                Layout::Dense { batch, seq } => (
                    vec![*batch, *seq],
                    (0..*batch)
                        .map(|b| SeqSpan {
                            start: b * seq,
                            len: *seq,
                        })
                        .collect(),
                    Vec::new(),
                ),
                Layout::Padded { seq, lens } => (
                    vec![lens.len(), *seq],
                    lens.iter()
                        .enumerate()
                        .map(|(b, &l)| SeqSpan {
                            start: b * seq,
                            len: l as usize,
                        })
                        .collect(),
                    lens.clone(),
                ),
                Layout::Packed { lens } => {
                    let mut cu = vec![0u32];
                    for &l in lens {
                        cu.push(cu.last().unwrap() + l);
                    }
                    let spans = cu
                        .windows(2)
                        .map(|w| SeqSpan {
                            start: w[0] as usize,
                            len: (w[1] - w[0]) as usize,
                        })
                        .collect();
                    (vec![*cu.last().unwrap() as usize], spans, cu)
                }
            }
        }
    }

    /// One attention backward case.
    #[derive(Clone, Debug)]
    struct AttnBwdCase {
        q_heads: usize,
        kv_heads: usize,
        head_dim: usize,
        layout: Layout,
        causal: bool,
        sharpness: f32,
        threads: usize,
        seed: u64,
    }

    impl AttnBwdCase {
        /// The op's forward then backward on `threads` threads against
        /// `cpu::attention::backward`, and bit for bit against the same on
        /// one thread. With P, dP = dO vᵀ, Δ = rowsum(P ∘ dP) and o = P v
        /// recomputed in f64, and a_ij = P_ij (|dP_ij| + |Δ_i| + Σ_c
        /// |dO_ic| (|v_jc| + |o_ic| + max|v|)) bounding dS_ij and the size
        /// of its rounding error (P's relative error, dP's and Δ's
        /// absolute ones, o's from the forward), the magnitudes are dq:
        /// scale Σ_j a_ij |k_j|, dk: scale Σ_i a_ij |q_i|, dv: Σ_i P_ij
        /// |dO_i|, scaled by 1 + S as in `AttnCase::check` (a score's error
        /// becomes a relative error of P).
        fn check(&self) -> Result<(), String> {
            let (lead, spans, lens) = self.layout.spans();
            let tokens: usize = lead.iter().product();
            let (hq, hk, d) = (self.q_heads, self.kv_heads, self.head_dim);
            let mut rng = Rng::new(self.seed);
            let q = rng.normal_vec(tokens * hq * d, 1.0);
            let k = rng.normal_vec(tokens * hk * d, 1.0);
            let v = rng.normal_vec(tokens * hk * d, 1.0);
            let dout = rng.normal_vec(tokens * hq * d, 1.0);
            let scale = self.sharpness / (d as f32).sqrt();
            let shape = |heads| {
                let mut s = lead.clone();
                s.extend([heads, d]);
                s
            };
            let batch = match self.layout {
                Layout::Dense { .. } => Batch::Dense,
                Layout::Padded { .. } => Batch::Padded(&lens),
                Layout::Packed { .. } => Batch::Packed(&lens),
            };
            let cfg = AttentionConfig {
                causal: self.causal,
                scale: Some(scale),
            };
            let (qt, kt, vt) = (
                tensor(&q, &shape(hq), DType::F32),
                tensor(&k, &shape(hk), DType::F32),
                tensor(&v, &shape(hk), DType::F32),
            );
            let dot = tensor(&dout, &shape(hq), DType::F32);
            let run = |threads: usize| {
                pool(threads).install(|| {
                    let fwd = attention::forward(&qt, &kt, &vt, batch, &cfg).unwrap();
                    let g = attention::backward(&qt, &kt, &vt, &fwd, &dot, batch, &cfg).unwrap();
                    [g.dq, g.dk, g.dv].map(|t| t.to_f32_vec().unwrap())
                })
            };
            let got = run(self.threads);
            if got != run(1) {
                return Err(format!("{} threads differ from one", self.threads));
            }
            let dims = AttentionDims {
                tokens,
                q_heads: hq,
                kv_heads: hk,
                head_dim: d,
            };
            let (want_dq, want_dk, want_dv) =
                cpu::attention::backward(&q, &k, &v, &dout, &dims, &spans, scale, self.causal);

            let max_norm = |x: &[f32]| {
                x.chunks(d)
                    .map(|r| r.iter().map(|&v| v as f64 * v as f64).sum::<f64>().sqrt())
                    .fold(0.0f64, f64::max)
            };
            let size = 1.0 + scale as f64 * max_norm(&q) * max_norm(&k);
            let (mut mag_dq, mut mag_dk, mut mag_dv) = (
                vec![0.0f64; q.len()],
                vec![0.0f64; k.len()],
                vec![0.0f64; v.len()],
            );
            let v_max = v.iter().fold(0.0f64, |m, &x| m.max(x.abs() as f64));
            let group = hq / hk;
            let row = |token: usize, heads: usize, h: usize| (token * heads + h) * d;
            for span in &spans {
                let n = span.len;
                for h in 0..hq {
                    let g = h / group;
                    for i in 0..n {
                        let qi = row(span.start + i, hq, h);
                        let seen = if self.causal { i + 1 } else { n };
                        let kj = |j: usize| row(span.start + j, hk, g);
                        let scores: Vec<f64> = (0..seen)
                            .map(|j| {
                                (0..d)
                                    .map(|c| q[qi + c] as f64 * k[kj(j) + c] as f64)
                                    .sum::<f64>()
                                    * scale as f64
                            })
                            .collect();
                        let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                        let sum: f64 = scores.iter().map(|s| (s - max).exp()).sum();
                        let p: Vec<f64> = scores.iter().map(|s| (s - max).exp() / sum).collect();
                        let dp: Vec<f64> = (0..seen)
                            .map(|j| {
                                (0..d)
                                    .map(|c| dout[qi + c] as f64 * v[kj(j) + c] as f64)
                                    .sum()
                            })
                            .collect();
                        let delta: f64 = p.iter().zip(&dp).map(|(p, dp)| p * dp).sum();
                        let o: Vec<f64> = (0..d)
                            .map(|c| (0..seen).map(|j| p[j] * v[kj(j) + c] as f64).sum())
                            .collect();
                        let do_abs: f64 = (0..d).map(|c| (dout[qi + c] as f64).abs()).sum();
                        for j in 0..seen {
                            let sums: f64 = (0..d)
                                .map(|c| {
                                    (dout[qi + c] as f64).abs()
                                        * ((v[kj(j) + c] as f64).abs() + o[c].abs())
                                })
                                .sum();
                            let a = p[j] * (size * ((dp[j] - delta).abs() + do_abs * v_max) + sums);
                            for c in 0..d {
                                mag_dq[qi + c] += scale as f64 * a * (k[kj(j) + c] as f64).abs();
                                mag_dk[kj(j) + c] += scale as f64 * a * (q[qi + c] as f64).abs();
                                mag_dv[kj(j) + c] += size * p[j] * (dout[qi + c] as f64).abs();
                            }
                        }
                    }
                }
            }
            let [dq, dk, dv] = &got;
            within("dq", dq, &want_dq, &mag_dq)?;
            within("dk", dk, &want_dk, &mag_dk)?;
            within("dv", dv, &want_dv, &mag_dv)
        }
    }

    /// Sequence lengths: one token, empty ones, up to three key blocks.
    fn seq_len() -> impl Strategy<Value = u32> {
        prop_oneof![0u32..=12, 13u32..=300]
    }

    fn layout() -> impl Strategy<Value = Layout> {
        prop_oneof![
            (1usize..=2, 1usize..=150).prop_map(|(batch, seq)| Layout::Dense { batch, seq }),
            prop::collection::vec(seq_len(), 1..=3).prop_flat_map(|lens| {
                let longest = *lens.iter().max().unwrap() as usize;
                (longest.max(1)..=longest + 3).prop_map(move |seq| Layout::Padded {
                    seq,
                    lens: lens.clone(),
                })
            }),
            prop::collection::vec(seq_len(), 1..=3)
                .prop_filter("some tokens", |lens| lens.iter().any(|&l| l > 0))
                .prop_map(|lens| Layout::Packed { lens }),
        ]
    }

    proptest! {
        #![proptest_config(proptest_config(48))]

        #[test]
        fn attention_backward_matches_reference(
            kv_heads in 1usize..=2,
            group in 1usize..=3,
            head_dim in head_dim(),
            layout in layout(),
            causal in any::<bool>(),
            sharpness in prop::sample::select(vec![1.0f32, 4.0]),
            threads in threads(),
            seed in any::<u64>(),
        ) {
            let case = AttnBwdCase {
                q_heads: kv_heads * group, kv_heads, head_dim, layout, causal, sharpness, threads, seed,
            };
            case.check().map_err(|e| TestCaseError::fail(format!("{case:?}: {e}")))?;
        }
    }
}
