//! Flash-style attention forward in f32 on rayon threads.
//!
//! One task per (sequence, query head, block of [`Q_BLOCK`] queries) walks
//! the keys it may see in blocks of [`K_BLOCK`]: scores S = scale · Q Kᵀ of
//! the block (an sgemm), an online-softmax update of each query's running
//! max and sum, and O += P V (another sgemm). No score matrix larger than
//! one block ever exists. Scores are kept in base 2 (scaled by log₂ e) so
//! that the exponentials are a short polynomial that vectorizes.
//!
//! Layout is token-major like the reference [`crate::cpu::attention`]: q
//! and o are [q_tokens, q_heads, head_dim], k and v [kv_tokens, kv_heads,
//! head_dim], the logsumexp [q_heads, q_tokens] (natural log).

use std::f32::consts::{LN_2, LOG2_E};
use std::ops::Range;

use rayon::prelude::*;

use super::gemm::{sgemm, View};
use crate::cpu::attention::SeqSpan;

/// Sizes of one attention call whose queries and keys may come from
/// different token ranges (a KV cache holds more keys than there are new
/// queries).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvDims {
    /// Rows of q and o.
    pub q_tokens: usize,
    /// Rows of k and v.
    pub kv_tokens: usize,
    /// Query heads, a multiple of `kv_heads`.
    pub q_heads: usize,
    /// Key/value heads, at least 1; query head h reads kv head h / (q_heads
    /// / kv_heads).
    pub kv_heads: usize,
    /// Elements per head row.
    pub head_dim: usize,
}

/// Queries per task.
const Q_BLOCK: usize = 64;
/// Keys per online-softmax step.
const K_BLOCK: usize = 128;

/// Attention of sequence b's queries q_spans[b] to its keys kv_spans[b]:
/// o = softmax(scale · q kᵀ) v per query head, and the natural-log
/// logsumexp of each query's scaled scores in lse.
///
/// With `causal`, the mask is aligned to the end of the keys, as
/// FlashAttention-2 and decoding with a KV cache have it: query i of a
/// sequence sees keys j ≤ i + (kv_len − q_len). Tokens outside every query
/// span get o = 0 and lse = 0.
///
/// Panics unless q and o hold q_tokens · q_heads · head_dim elements, k and
/// v kv_tokens · kv_heads · head_dim, lse q_heads · q_tokens; kv_heads ≥ 1
/// divides q_heads; there are as many query spans as key spans, each inside
/// its tensor, with q_spans[b].len ≤ kv_spans[b].len. Query spans must not
/// overlap (the last one written wins).
#[allow(clippy::too_many_arguments)]
pub fn attention_forward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    dims: &KvDims,
    q_spans: &[SeqSpan],
    kv_spans: &[SeqSpan],
    scale: f32,
    causal: bool,
    o: &mut [f32],
    lse: &mut [f32],
) {
    let d = dims.head_dim;
    assert!(
        dims.kv_heads >= 1 && dims.q_heads % dims.kv_heads == 0,
        "kv_heads must be at least 1 and divide q_heads"
    );
    assert_eq!(q.len(), dims.q_tokens * dims.q_heads * d, "q is [q_tokens, q_heads, d]");
    assert_eq!(o.len(), q.len(), "o is shaped like q");
    assert_eq!(k.len(), dims.kv_tokens * dims.kv_heads * d, "k is [kv_tokens, kv_heads, d]");
    assert_eq!(v.len(), k.len(), "v is shaped like k");
    assert_eq!(lse.len(), dims.q_heads * dims.q_tokens, "lse is [q_heads, q_tokens]");
    assert_eq!(q_spans.len(), kv_spans.len(), "one key span per query span");
    for (qs, ks) in q_spans.iter().zip(kv_spans) {
        assert!(qs.start + qs.len <= dims.q_tokens, "query span {qs:?} out of range");
        assert!(ks.start + ks.len <= dims.kv_tokens, "key span {ks:?} out of range");
        assert!(qs.len <= ks.len, "{qs:?} has more queries than {ks:?} has keys");
    }

    let jobs: Vec<Job> = q_spans
        .iter()
        .enumerate()
        .flat_map(|(seq, span)| {
            (0..dims.q_heads).flat_map(move |head| {
                (0..span.len).step_by(Q_BLOCK).map(move |start| Job {
                    seq,
                    head,
                    rows: start..span.len.min(start + Q_BLOCK),
                })
            })
        })
        .collect();
    let inputs = Inputs {
        q,
        k,
        v,
        dims,
        q_spans,
        kv_spans,
        scale: scale * LOG2_E,
        causal,
    };
    let blocks: Vec<Block> = jobs
        .par_iter()
        .map_init(Scratch::default, |scratch, job| inputs.attend(job, scratch))
        .collect();

    o.fill(0.0);
    lse.fill(0.0);
    for (job, block) in jobs.iter().zip(&blocks) {
        let first = q_spans[job.seq].start + job.rows.start;
        for r in 0..job.rows.len() {
            let token = first + r;
            o[(token * dims.q_heads + job.head) * d..][..d]
                .copy_from_slice(&block.o[r * d..][..d]);
            lse[job.head * dims.q_tokens + token] = block.lse[r];
        }
    }
}

/// Queries `rows` (counted from the start of the sequence) of sequence
/// `seq` for query head `head`: the work of one task.
struct Job {
    seq: usize,
    head: usize,
    rows: Range<usize>,
}

/// What a task computes: o [rows, head_dim] and the natural-log logsumexp
/// of each row.
struct Block {
    o: Vec<f32>,
    lse: Vec<f32>,
}

/// Buffers a rayon thread reuses from task to task.
#[derive(Default)]
struct Scratch {
    /// Scores, then probabilities, of one block: [rows, keys].
    s: Vec<f32>,
    /// Running max of each row's base-2 scores.
    max: Vec<f32>,
    /// Running Σ 2^(score − max) of each row.
    sum: Vec<f32>,
}

/// The arguments every task reads.
struct Inputs<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    dims: &'a KvDims,
    q_spans: &'a [SeqSpan],
    kv_spans: &'a [SeqSpan],
    /// The softmax scale times log₂ e: scores come out in base 2.
    scale: f32,
    causal: bool,
}

impl Inputs<'_> {
    /// Runs one task.
    fn attend(&self, job: &Job, scratch: &mut Scratch) -> Block {
        let dims = self.dims;
        let d = dims.head_dim;
        let (qs, ks) = (self.q_spans[job.seq], self.kv_spans[job.seq]);
        // The end-aligned causal mask: query i sees keys j ≤ i + shift.
        let shift = ks.len - qs.len;
        let rows = job.rows.len();
        let kv_head = job.head / (dims.q_heads / dims.kv_heads);
        let kv_stride = dims.kv_heads * d;
        let kv_at = |j: usize| ((ks.start + j) * dims.kv_heads + kv_head) * d;
        let q_at = ((qs.start + job.rows.start) * dims.q_heads + job.head) * d;
        let q = View::new(&self.q[q_at..], rows, d, dims.q_heads * d, 1);
        let keys = if self.causal {
            job.rows.end + shift
        } else {
            ks.len
        };

        let mut o = vec![0.0f32; rows * d];
        let Scratch { s, max, sum } = scratch;
        max.clear();
        max.resize(rows, f32::NEG_INFINITY);
        sum.clear();
        sum.resize(rows, 0.0);
        for first in (0..keys).step_by(K_BLOCK) {
            let cols = K_BLOCK.min(keys - first);
            s.resize(rows * cols, 0.0);
            let s = &mut s[..rows * cols];
            let kt = View::new(&self.k[kv_at(first)..], cols, d, kv_stride, 1).t();
            sgemm(self.scale, q, kt, 0.0, s, cols);
            for (r, scores) in s.chunks_exact_mut(cols).enumerate() {
                let visible = if self.causal {
                    (job.rows.start + r + shift + 1).saturating_sub(first).min(cols)
                } else {
                    cols
                };
                let o_row = &mut o[r * d..][..d];
                softmax_step(scores, visible, &mut max[r], &mut sum[r], o_row);
            }
            let p = View::new(s, rows, cols, cols, 1);
            let vb = View::new(&self.v[kv_at(first)..], cols, d, kv_stride, 1);
            sgemm(1.0, p, vb, 1.0, &mut o, d);
        }

        for (r, &l) in sum.iter().enumerate() {
            let inv = 1.0 / l;
            o[r * d..][..d].iter_mut().for_each(|x| *x *= inv);
        }
        let lse = max
            .iter()
            .zip(sum.iter())
            .map(|(&m, &l)| (m + l.log2()) * LN_2)
            .collect();
        Block { o, lse }
    }
}

/// One online-softmax step of a query row over a block of keys:
/// `scores` (base 2) become probabilities relative to the new running
/// `max` (0 past the first `visible`, the masked keys), `sum` gains them,
/// and the row's output so far is rescaled to the new max.
fn softmax_step(scores: &mut [f32], visible: usize, max: &mut f32, sum: &mut f32, o: &mut [f32]) {
    let (seen, masked) = scores.split_at_mut(visible);
    masked.fill(0.0);
    if seen.is_empty() {
        return;
    }
    let new_max = max.max(row_max(seen));
    // 0 on the first block, where the running max is -inf.
    let shrink = (*max - new_max).exp2();
    *sum = *sum * shrink + exp2_and_sum(seen, new_max);
    if shrink != 1.0 {
        o.iter_mut().for_each(|x| *x *= shrink);
    }
    *max = new_max;
}

/// The largest element (-inf for none), in eight lanes that vectorize.
fn row_max(row: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 8];
    let chunks = row.chunks_exact(8);
    let tail = chunks.remainder().iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    for chunk in chunks {
        lanes.iter_mut().zip(chunk).for_each(|(m, &x)| *m = m.max(x));
    }
    lanes.iter().fold(tail, |m, &x| m.max(x))
}

/// Replaces each x of `row` by 2^(x − max) and returns their sum; every x
/// must be ≤ max.
fn exp2_and_sum(row: &mut [f32], max: f32) -> f32 {
    let mut lanes = [0.0f32; 8];
    let mut chunks = row.chunks_exact_mut(8);
    for chunk in &mut chunks {
        for (acc, x) in lanes.iter_mut().zip(chunk) {
            *x = exp2_nonpositive(*x - max);
            *acc += *x;
        }
    }
    let mut tail = 0.0;
    for x in chunks.into_remainder() {
        *x = exp2_nonpositive(*x - max);
        tail += *x;
    }
    lanes.iter().sum::<f32>() + tail
}

/// 2^x for x ≤ 0 without a libm call, so that loops over it vectorize:
/// 2^x = 2^n · 2^f with n = round(x) and |f| ≤ ½, 2^f by its Taylor
/// polynomial of degree 7, whose truncation error (< 6e-9) is a tenth of
/// f32's rounding unit. Below -126 (where 2^x is subnormal) it returns 2^-126
/// ≈ 1e-38, as good as 0 next to a softmax row's largest term, 1.
#[inline(always)]
fn exp2_nonpositive(x: f32) -> f32 {
    // Adding 1.5 · 2^23 rounds to an integer, left in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    // (ln 2)^i / i!
    const C: [f32; 7] = [
        0.693_147_2,
        0.240_226_5,
        0.055_504_11,
        0.009_618_129,
        0.001_333_355_8,
        0.000_154_035_3,
        0.000_015_252_734,
    ];
    let x = x.max(-126.0);
    let t = x + ROUND;
    let n = t - ROUND;
    let f = x - n;
    let poly = C.iter().rev().fold(0.0, |p, &c| (p + c) * f) + 1.0;
    // n ∈ [-126, 0], so n + 127 is a normal float's biased exponent.
    let exponent = (t.to_bits() as i32 - ROUND.to_bits() as i32 + 127) as u32;
    poly * f32::from_bits(exponent << 23)
}
