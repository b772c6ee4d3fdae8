//! Flash-style attention forward in f32 on rayon threads.
//!
//! One task per (sequence, query head, block of 64 queries) walks the keys
//! it may see in blocks of 256: scores of the block (an sgemm), an
//! online-softmax update of each query's running max and sum, and O += P V
//! (another sgemm). No score matrix larger than one block ever exists.
//! Scores are kept in base 2 (scaled by log₂ e) so that the exponentials
//! are a short polynomial that vectorizes.
//!
//! The block's scores are computed transposed, Sᵀ = K Qᵀ [keys, queries],
//! with the keys transposed once per call to [kv_heads, head_dim, tokens]:
//! then every operand sgemm packs is contiguous where its packing wants it
//! (packing strided rows costs as much as the arithmetic at small head
//! sizes), and the softmax runs along a key's row, across queries, in
//! loops that vectorize. Blocks of fewer than 4 queries (decoding) use dot
//! products and axpys on the token-major keys and values instead.
//!
//! Layout is token-major like the reference [`crate::cpu::attention`]: q
//! and o are [q_tokens, q_heads, head_dim], k and v [kv_tokens, kv_heads,
//! head_dim], the logsumexp [q_heads, q_tokens] (natural log).

use std::f32::consts::{LN_2, LOG2_E};
use std::ops::Range;

use rayon::prelude::*;

use super::gemm::{dot, sgemm, View};
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
const K_BLOCK: usize = 256;
/// Fewer queries than this (decoding) take dot products instead of sgemm,
/// which would pad them to its 16-wide micro-tiles and pack every key.
const GEMM_ROWS: usize = 4;

/// Attention of sequence b's queries `q_spans[b]` to its keys `kv_spans[b]`:
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
/// its tensor, with `q_spans[b].len` ≤ `kv_spans[b].len`. Query spans must not
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
    assert_eq!(
        q.len(),
        dims.q_tokens * dims.q_heads * d,
        "q is [q_tokens, q_heads, d]"
    );
    assert_eq!(o.len(), q.len(), "o is shaped like q");
    assert_eq!(
        k.len(),
        dims.kv_tokens * dims.kv_heads * d,
        "k is [kv_tokens, kv_heads, d]"
    );
    assert_eq!(v.len(), k.len(), "v is shaped like k");
    assert_eq!(
        lse.len(),
        dims.q_heads * dims.q_tokens,
        "lse is [q_heads, q_tokens]"
    );
    assert_eq!(q_spans.len(), kv_spans.len(), "one key span per query span");
    for (qs, ks) in q_spans.iter().zip(kv_spans) {
        assert!(
            qs.start + qs.len <= dims.q_tokens,
            "query span {qs:?} out of range"
        );
        assert!(
            ks.start + ks.len <= dims.kv_tokens,
            "key span {ks:?} out of range"
        );
        assert!(
            qs.len <= ks.len,
            "{qs:?} has more queries than {ks:?} has keys"
        );
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
    // Only the sgemm path reads the transposed keys.
    let kt = if jobs.iter().any(|job| job.rows.len() >= GEMM_ROWS) {
        transpose_keys(k, dims)
    } else {
        Vec::new()
    };
    let inputs = Inputs {
        q,
        k,
        kt: &kt,
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
            o[(token * dims.q_heads + job.head) * d..][..d].copy_from_slice(&block.o[r * d..][..d]);
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

/// Side of the square blocks the transposition moves: 16 f32, a cache line.
const TRANSPOSE_BLOCK: usize = 16;

/// k [kv_tokens, kv_heads, d] as [kv_heads, d, kv_tokens]: one task per 16
/// rows of the result, which it fills 16 tokens at a time, so that the 16
/// cache lines it reads stay in L1 while it writes 16 of each row.
fn transpose_keys(k: &[f32], dims: &KvDims) -> Vec<f32> {
    let (tokens, d) = (dims.kv_tokens, dims.head_dim);
    let stride = dims.kv_heads * d;
    let mut kt = vec![0.0f32; k.len()];
    if kt.is_empty() {
        return kt;
    }
    kt.par_chunks_mut(TRANSPOSE_BLOCK * tokens)
        .enumerate()
        .for_each(|(block, kt)| {
            // Rows block·16.. of the result: head h, dimensions c.. of it.
            let first_row = block * TRANSPOSE_BLOCK;
            for t0 in (0..tokens).step_by(TRANSPOSE_BLOCK) {
                let t1 = tokens.min(t0 + TRANSPOSE_BLOCK);
                for (i, row) in kt.chunks_exact_mut(tokens).enumerate() {
                    let (head, c) = ((first_row + i) / d, (first_row + i) % d);
                    let at = head * d + c;
                    for (t, x) in (t0..t1).zip(&mut row[t0..t1]) {
                        *x = k[t * stride + at];
                    }
                }
            }
        });
    kt
}

/// Buffers a rayon thread reuses from task to task.
#[derive(Default)]
struct Scratch {
    /// Qᵀ of the task's queries: [d, queries].
    qt: Vec<f32>,
    /// Scores, then probabilities, of one block: [keys, queries].
    st: Vec<f32>,
    /// The online softmax of the task's queries.
    softmax: Softmax,
}

/// The arguments every task reads.
struct Inputs<'a> {
    q: &'a [f32],
    k: &'a [f32],
    /// The keys transposed, [kv_heads, d, kv_tokens], if any task has
    /// [`GEMM_ROWS`] queries.
    kt: &'a [f32],
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
        let keys = if self.causal {
            job.rows.end + shift
        } else {
            ks.len
        };
        let query = |r: usize| {
            let token = qs.start + job.rows.start + r;
            &self.q[(token * dims.q_heads + job.head) * d..][..d]
        };
        let kv_head = job.head / (dims.q_heads / dims.kv_heads);
        let kv_at = |j: usize| ((ks.start + j) * dims.kv_heads + kv_head) * d;
        let Scratch { qt, st, softmax } = scratch;
        // Qᵀ [d, rows] for the sgemm path.
        let qt = (rows >= GEMM_ROWS).then(|| {
            qt.resize(d * rows, 0.0);
            for r in 0..rows {
                for (c, &x) in query(r).iter().enumerate() {
                    qt[c * rows + r] = x;
                }
            }
            View::new(qt, d, rows, rows, 1)
        });
        softmax.start(rows);

        let mut o = vec![0.0f32; rows * d];
        for first in (0..keys).step_by(K_BLOCK) {
            let cols = K_BLOCK.min(keys - first);
            st.resize(cols * rows, 0.0);
            let st = &mut st[..cols * rows];
            // Sᵀ = scale · K Qᵀ, in base 2.
            if let Some(qt) = qt {
                let kt_at = kv_head * d * dims.kv_tokens + ks.start + first;
                let kb = View::new(&self.kt[kt_at..], cols, d, 1, dims.kv_tokens);
                sgemm(self.scale, kb, qt, 0.0, st, rows);
            } else {
                for (j, scores) in st.chunks_exact_mut(rows).enumerate() {
                    let key = &self.k[kv_at(first + j)..][..d];
                    for (r, s) in scores.iter_mut().enumerate() {
                        *s = self.scale * dot(query(r), key, |x| x);
                    }
                }
            }
            // Key first + j is hidden from the queries before this one.
            let hidden = |j: usize| {
                if self.causal {
                    (first + j).saturating_sub(job.rows.start + shift)
                } else {
                    0
                }
            };
            softmax.step(st, hidden, &mut o, d);
            // O += P V.
            if qt.is_some() {
                let p = View::new(st, rows, cols, 1, rows);
                let vb = View::new(&self.v[kv_at(first)..], cols, d, dims.kv_heads * d, 1);
                sgemm(1.0, p, vb, 1.0, &mut o, d);
            } else {
                for (j, p) in st.chunks_exact(rows).enumerate() {
                    let value = &self.v[kv_at(first + j)..][..d];
                    for (r, &p) in p.iter().enumerate() {
                        let o = &mut o[r * d..][..d];
                        o.iter_mut().zip(value).for_each(|(o, &v)| *o += p * v);
                    }
                }
            }
        }

        for (r, &l) in softmax.sum.iter().enumerate() {
            let inv = 1.0 / l;
            o[r * d..][..d].iter_mut().for_each(|x| *x *= inv);
        }
        let lse = softmax
            .max
            .iter()
            .zip(softmax.sum.iter())
            .map(|(&m, &l)| (m + l.log2()) * LN_2)
            .collect();
        Block { o, lse }
    }
}

/// The online-softmax state of a task's queries, one lane per query.
#[derive(Default)]
struct Softmax {
    /// Running max of each query's base-2 scores.
    max: Vec<f32>,
    /// Running Σ 2^(score − max).
    sum: Vec<f32>,
    /// Buffer: the max after the current block.
    next_max: Vec<f32>,
    /// Buffer: Σ of the current block's probabilities.
    block_sum: Vec<f32>,
}

impl Softmax {
    /// Resets the state for `queries` queries that have seen no key.
    fn start(&mut self, queries: usize) {
        self.max.clear();
        self.max.resize(queries, f32::NEG_INFINITY);
        self.sum.clear();
        self.sum.resize(queries, 0.0);
    }

    /// One step over a block of keys: `st` [keys, queries] holds base-2
    /// scores, of which the first `hidden(j)` queries may not see key j
    /// (hidden(j) < queries: every key is seen by some query; and every query
    /// sees a key of its first block). `st` becomes the probabilities relative to
    /// the new running max (masked ones 0), and the output rows `o` [queries,
    /// d] so far are rescaled to it.
    fn step(&mut self, st: &mut [f32], hidden: impl Fn(usize) -> usize, o: &mut [f32], d: usize) {
        let queries = self.max.len();
        self.next_max.clone_from(&self.max);
        for (j, key) in st.chunks_exact(queries).enumerate() {
            let h = hidden(j);
            for (m, &s) in self.next_max[h..].iter_mut().zip(&key[h..]) {
                *m = m.max(s);
            }
        }
        self.block_sum.clear();
        self.block_sum.resize(queries, 0.0);
        for (j, key) in st.chunks_exact_mut(queries).enumerate() {
            let h = hidden(j);
            key[..h].fill(0.0);
            let lanes = key[h..].iter_mut().zip(&self.next_max[h..]);
            for ((p, &m), sum) in lanes.zip(&mut self.block_sum[h..]) {
                *p = exp2_nonpositive(*p - m);
                *sum += *p;
            }
        }
        for r in 0..queries {
            // 0 on the first block, where the running max is -inf.
            let shrink = (self.max[r] - self.next_max[r]).exp2();
            self.sum[r] = self.sum[r] * shrink + self.block_sum[r];
            if shrink != 1.0 {
                o[r * d..][..d].iter_mut().for_each(|x| *x *= shrink);
            }
        }
        std::mem::swap(&mut self.max, &mut self.next_max);
    }
}

/// (ln 2)^i / i! for i = 1..=7: the Taylor coefficients of 2^f.
const EXP2_TAYLOR: [f32; 7] = {
    let mut c = [0.0f32; 7];
    let mut term = 1.0f64;
    let mut i = 0;
    while i < c.len() {
        term *= std::f64::consts::LN_2 / (i + 1) as f64;
        c[i] = term as f32;
        i += 1;
    }
    c
};

/// 2^x for x ≤ 0 without a libm call, so that loops over it vectorize:
/// 2^x = 2^n · 2^f with n = round(x) and |f| ≤ ½, 2^f by its Taylor
/// polynomial of degree 7, whose truncation error (< 6e-9) is a tenth of
/// f32's rounding unit. Below -126 (where 2^x is subnormal) it returns 2^-126
/// ≈ 1e-38, as good as 0 next to a query's largest term, 1.
#[inline(always)]
fn exp2_nonpositive(x: f32) -> f32 {
    // Adding 1.5 · 2^23 rounds to an integer, left in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let x = x.max(-126.0);
    let t = x + ROUND;
    let n = t - ROUND;
    let f = x - n;
    let poly = EXP2_TAYLOR.iter().rev().fold(0.0, |p, &c| (p + c) * f) + 1.0;
    // n ∈ [-126, 0], so n + 127 is a normal float's biased exponent.
    let exponent = (t.to_bits() as i32 - ROUND.to_bits() as i32 + 127) as u32;
    poly * f32::from_bits(exponent << 23)
}
