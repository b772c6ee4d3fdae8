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
        transpose_heads(k, dims.kv_tokens, dims.kv_heads, d)
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

/// x [tokens, heads, d] as [heads, d, tokens]: one task per 16 rows of the
/// result, which it fills 16 tokens at a time, so that the 16 cache lines
/// it reads stay in L1 while it writes 16 of each row.
fn transpose_heads(x: &[f32], tokens: usize, heads: usize, d: usize) -> Vec<f32> {
    let stride = heads * d;
    let mut xt = vec![0.0f32; x.len()];
    if xt.is_empty() {
        return xt;
    }
    xt.par_chunks_mut(TRANSPOSE_BLOCK * tokens)
        .enumerate()
        .for_each(|(block, xt)| {
            // Rows block·16.. of the result: head h, dimensions c.. of it.
            let first_row = block * TRANSPOSE_BLOCK;
            for t0 in (0..tokens).step_by(TRANSPOSE_BLOCK) {
                let t1 = tokens.min(t0 + TRANSPOSE_BLOCK);
                for (i, row) in xt.chunks_exact_mut(tokens).enumerate() {
                    let (head, c) = ((first_row + i) / d, (first_row + i) % d);
                    let at = head * d + c;
                    for (t, v) in (t0..t1).zip(&mut row[t0..t1]) {
                        *v = x[t * stride + at];
                    }
                }
            }
        });
    xt
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
/// ≈ 1e-38, as good as 0 next to a query's largest term, 1. It is as right
/// for x above 0 up to 127 (the backward pass's score minus logsumexp,
/// which rounding may leave a little above 0).
#[inline(always)]
pub(crate) fn exp2_nonpositive(x: f32) -> f32 {
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

/// Keys per block of the backward pass: the rows of the dK and dV blocks a
/// task accumulates.
const BWD_K_BLOCK: usize = 128;
/// Queries per block of the backward pass.
const BWD_Q_BLOCK: usize = 64;
/// The backward pass splits the keys of a (sequence, kv head) into chunks
/// until there are this many tasks...
const BWD_TASKS: usize = 16;
/// ...but into no more than this many chunks, each of which holds a partial
/// dQ of the queries it is seen by.
const BWD_MAX_CHUNKS: usize = 4;

/// Gradients of [`attention_forward`] with queries and keys on one token
/// axis (`q_tokens == kv_tokens`, one span per sequence for both, the causal
/// mask j ≤ i), from the forward's output `o` and logsumexp `lse` and the
/// upstream `dout` (like q): dq like q, dk and dv like k, dk and dv summed
/// over the query heads sharing a kv head. Tokens outside every span get
/// zero gradients.
///
/// One task per (sequence, kv head, chunk of its keys) walks the chunk's
/// keys in blocks; for each query head of the group and each block of the
/// queries that see them, it recomputes the probabilities P = exp(scale ·
/// q kᵀ − lse) from the saved logsumexp and accumulates dV += Pᵀ dO, dK +=
/// scale · dSᵀ Q and a partial dQ += scale · dS K, where dS = P ∘ (dO vᵀ −
/// Δ) and Δ = rowsum(dO ∘ O), five sgemm calls per block pair and no
/// matrix larger than one block of scores. The chunks depend on the shape
/// alone (enough tasks for a few threads, at most [`BWD_MAX_CHUNKS`]), and
/// the partial dQs are summed in chunk order: the same bits on any number
/// of threads.
///
/// Panics unless q, o, dout and dq hold q_tokens · q_heads · head_dim
/// elements, k, v, dk and dv kv_tokens · kv_heads · head_dim, lse q_heads ·
/// q_tokens; q_tokens == kv_tokens; kv_heads ≥ 1 divides q_heads; every span
/// lies inside the tokens. Spans must not overlap.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    o: &[f32],
    dout: &[f32],
    lse: &[f32],
    dims: &KvDims,
    spans: &[SeqSpan],
    scale: f32,
    causal: bool,
    (dq, dk, dv): (&mut [f32], &mut [f32], &mut [f32]),
) {
    let (tokens, d) = (dims.q_tokens, dims.head_dim);
    let (q_heads, kv_heads) = (dims.q_heads, dims.kv_heads);
    assert_eq!(dims.kv_tokens, tokens, "queries and keys on one token axis");
    assert!(
        kv_heads >= 1 && q_heads % kv_heads == 0,
        "kv_heads must be at least 1 and divide q_heads"
    );
    let q_len = tokens * q_heads * d;
    let kv_len = tokens * kv_heads * d;
    for (what, len, want) in [
        ("q", q.len(), q_len),
        ("o", o.len(), q_len),
        ("dout", dout.len(), q_len),
        ("dq", dq.len(), q_len),
        ("k", k.len(), kv_len),
        ("v", v.len(), kv_len),
        ("dk", dk.len(), kv_len),
        ("dv", dv.len(), kv_len),
        ("lse", lse.len(), q_heads * tokens),
    ] {
        assert_eq!(len, want, "{what} holds {want} elements");
    }
    for s in spans {
        assert!(s.start + s.len <= tokens, "span {s:?} out of range");
    }

    // Δ [tokens, q_heads] = rowsum(dO ∘ O) (the spans' tokens are read).
    let mut delta = vec![0.0f32; tokens * q_heads];
    delta
        .par_chunks_mut(q_heads)
        .enumerate()
        .for_each(|(t, row)| {
            for (h, x) in row.iter_mut().enumerate() {
                let at = (t * q_heads + h) * d;
                *x = dot(&dout[at..][..d], &o[at..][..d], |x| x);
            }
        });
    let inputs = BackwardInputs {
        q,
        k,
        dout,
        lse,
        delta: &delta,
        qt: &transpose_heads(q, tokens, q_heads, d),
        dot: &transpose_heads(dout, tokens, q_heads, d),
        kt: &transpose_heads(k, tokens, kv_heads, d),
        vt: &transpose_heads(v, tokens, kv_heads, d),
        dims,
        scale,
        causal,
    };

    let busy = spans.iter().filter(|s| s.len > 0).count() * kv_heads;
    let chunks = BWD_TASKS.div_ceil(busy.max(1)).min(BWD_MAX_CHUNKS);
    let jobs: Vec<BackwardJob> = spans
        .iter()
        .filter(|s| s.len > 0)
        .flat_map(|&span| {
            let keys = key_chunks(span.len, causal, chunks);
            (0..kv_heads).flat_map(move |kv_head| {
                keys.clone().into_iter().map(move |keys| BackwardJob {
                    span,
                    kv_head,
                    keys,
                })
            })
        })
        .collect();
    let grads: Vec<BackwardBlock> = jobs
        .par_iter()
        .map_init(BackwardScratch::default, |scratch, job| {
            inputs.backward(job, scratch)
        })
        .collect();

    dq.fill(0.0);
    dk.fill(0.0);
    dv.fill(0.0);
    let group = q_heads / kv_heads;
    for (job, g) in jobs.iter().zip(&grads) {
        let first = job.span.start + job.keys.start;
        for j in 0..job.keys.len() {
            let at = ((first + j) * kv_heads + job.kv_head) * d;
            dk[at..][..d].copy_from_slice(&g.dk[j * d..][..d]);
            dv[at..][..d].copy_from_slice(&g.dv[j * d..][..d]);
        }
        let queries = job.span.len - g.first_query;
        for hh in 0..group {
            let head = job.kv_head * group + hh;
            for i in 0..queries {
                let token = job.span.start + g.first_query + i;
                let out = &mut dq[(token * q_heads + head) * d..][..d];
                let part = &g.dq[(hh * queries + i) * d..][..d];
                out.iter_mut().zip(part).for_each(|(x, &p)| *x += p);
            }
        }
    }
}

/// The keys `0..len` of a sequence cut into at most `chunks` runs of whole
/// [`BWD_K_BLOCK`] blocks of about equal work: with the causal mask a block
/// is seen by the queries from its first key on, so later blocks cost less.
fn key_chunks(len: usize, causal: bool, chunks: usize) -> Vec<Range<usize>> {
    let blocks = len.div_ceil(BWD_K_BLOCK);
    let chunks = chunks.clamp(1, blocks.max(1));
    let work = |b: usize| {
        let keys = BWD_K_BLOCK.min(len - b * BWD_K_BLOCK);
        let queries = if causal { len - b * BWD_K_BLOCK } else { len };
        keys * queries
    };
    let total: usize = (0..blocks).map(work).sum();
    let mut out = Vec::with_capacity(chunks);
    let (mut start, mut done) = (0, 0);
    for b in 0..blocks {
        done += work(b);
        let end = len.min((b + 1) * BWD_K_BLOCK);
        // Chunk c ends where the work done comes closest to c + 1 shares:
        // here, unless half the next block would still be short of them.
        let c = out.len();
        let cut = b + 1 < blocks
            && c + 1 < chunks
            && (2 * done + work(b + 1)) * chunks >= 2 * total * (c + 1);
        if cut || b + 1 == blocks {
            out.push(start..end);
            start = end;
        }
    }
    out
}

/// Keys `keys` (counted from the start of the sequence) of sequence `span`
/// for kv head `kv_head`, with every query head reading it: the work of one
/// backward task.
struct BackwardJob {
    span: SeqSpan,
    kv_head: usize,
    keys: Range<usize>,
}

/// What a backward task computes: dk and dv of its keys [keys, d], and the
/// part of dq its keys contribute, [group heads, queries, d] for the
/// queries `first_query..` of the sequence (those that see a key of the
/// task).
struct BackwardBlock {
    dk: Vec<f32>,
    dv: Vec<f32>,
    dq: Vec<f32>,
    first_query: usize,
}

/// Buffers of one block pair, [`BWD_Q_BLOCK`] × [`BWD_K_BLOCK`], reused by
/// a rayon thread from task to task.
#[derive(Default)]
struct BackwardScratch {
    /// Scores, then P, then dS: [queries, keys].
    s: Vec<f32>,
    /// dP = dO vᵀ: [queries, keys].
    dp: Vec<f32>,
}

/// The arguments every backward task reads.
struct BackwardInputs<'a> {
    /// q [tokens, q_heads, d].
    q: &'a [f32],
    /// k [tokens, kv_heads, d].
    k: &'a [f32],
    /// dO [tokens, q_heads, d].
    dout: &'a [f32],
    /// Natural-log logsumexp [q_heads, tokens].
    lse: &'a [f32],
    /// Δ = rowsum(dO ∘ O) [tokens, q_heads].
    delta: &'a [f32],
    /// q, dO, k and v transposed to [heads, d, tokens].
    qt: &'a [f32],
    dot: &'a [f32],
    kt: &'a [f32],
    vt: &'a [f32],
    dims: &'a KvDims,
    scale: f32,
    causal: bool,
}

impl BackwardInputs<'_> {
    /// Runs one backward task.
    fn backward(&self, job: &BackwardJob, scratch: &mut BackwardScratch) -> BackwardBlock {
        let dims = self.dims;
        let (tokens, d) = (dims.q_tokens, dims.head_dim);
        let (q_heads, kv_heads) = (dims.q_heads, dims.kv_heads);
        let group = q_heads / kv_heads;
        let (span, g) = (job.span, job.kv_head);
        let n = span.len;
        let first_query = if self.causal { job.keys.start } else { 0 };
        let queries = n - first_query;
        let mut dk = vec![0.0f32; job.keys.len() * d];
        let mut dv = vec![0.0f32; job.keys.len() * d];
        let mut dq = vec![0.0f32; group * queries * d];
        let BackwardScratch { s, dp } = scratch;
        let scale2 = self.scale * LOG2_E;
        for j0 in job.keys.clone().step_by(BWD_K_BLOCK) {
            let cols = BWD_K_BLOCK.min(job.keys.end - j0);
            let key0 = span.start + j0;
            let kt = View::new(&self.kt[g * d * tokens + key0..], d, cols, tokens, 1);
            let vt = View::new(&self.vt[g * d * tokens + key0..], d, cols, tokens, 1);
            let kb = View::new(
                &self.k[(key0 * kv_heads + g) * d..],
                cols,
                d,
                kv_heads * d,
                1,
            );
            let block = (j0 - job.keys.start) * d..(j0 - job.keys.start + cols) * d;
            let (dk, dv) = (&mut dk[block.clone()], &mut dv[block]);
            for hh in 0..group {
                let h = g * group + hh;
                let start = if self.causal { j0 } else { 0 };
                for i0 in (start..n).step_by(BWD_Q_BLOCK) {
                    let rows = BWD_Q_BLOCK.min(n - i0);
                    let query0 = span.start + i0;
                    let size = rows * cols;
                    s.resize(size, 0.0);
                    dp.resize(size, 0.0);
                    let (s, dp) = (&mut s[..size], &mut dp[..size]);
                    let head_t = h * d * tokens + query0;
                    let token_major = (query0 * q_heads + h) * d;
                    // S = scale · Q Kᵀ in base 2, then P = 2^(S − lse₂).
                    let qt = View::new(&self.qt[head_t..], rows, d, 1, tokens);
                    sgemm(scale2, qt, kt, 0.0, s, cols);
                    for (i, row) in s.chunks_exact_mut(cols).enumerate() {
                        let visible = if self.causal {
                            (i0 + i + 1).saturating_sub(j0).min(cols)
                        } else {
                            cols
                        };
                        let lse2 = self.lse[h * tokens + query0 + i] * LOG2_E;
                        let (seen, hidden) = row.split_at_mut(visible);
                        seen.iter_mut()
                            .for_each(|x| *x = exp2_nonpositive(*x - lse2));
                        hidden.fill(0.0);
                    }
                    // dV += Pᵀ dO.
                    let d_o = View::new(&self.dout[token_major..], rows, d, q_heads * d, 1);
                    sgemm(1.0, View::new(s, cols, rows, 1, cols), d_o, 1.0, dv, d);
                    // dP = dO Vᵀ, dS = P ∘ (dP − Δ).
                    let dot = View::new(&self.dot[head_t..], rows, d, 1, tokens);
                    sgemm(1.0, dot, vt, 0.0, dp, cols);
                    let rows_out = s.chunks_exact_mut(cols).zip(dp.chunks_exact(cols));
                    for (i, (p, dp)) in rows_out.enumerate() {
                        let delta = self.delta[(query0 + i) * q_heads + h];
                        for (p, &dp) in p.iter_mut().zip(dp) {
                            *p *= dp - delta;
                        }
                    }
                    // dK += scale · dSᵀ Q, dQ += scale · dS K.
                    let qb = View::new(&self.q[token_major..], rows, d, q_heads * d, 1);
                    sgemm(
                        self.scale,
                        View::new(s, cols, rows, 1, cols),
                        qb,
                        1.0,
                        dk,
                        d,
                    );
                    let dq_at = (hh * queries + i0 - first_query) * d;
                    let ds = View::new(s, rows, cols, cols, 1);
                    sgemm(self.scale, ds, kb, 1.0, &mut dq[dq_at..][..rows * d], d);
                }
            }
        }
        BackwardBlock {
            dk,
            dv,
            dq,
            first_query,
        }
    }
}
