//! Scaled dot-product attention reference: the full score matrix of every
//! (sequence, head), softmax and its gradient, in f64.
//!
//! Token-major layout, as the q/k/v projections produce it: q and o are
//! [tokens, q_heads, head_dim], k and v [tokens, kv_heads, head_dim], the
//! logsumexp [q_heads, tokens]. Query head h reads kv head h / (q_heads /
//! kv_heads). Each sequence is a run of tokens ([`SeqSpan`]); tokens outside
//! every span (padding) get zero outputs, logsumexp and gradients.
//!
//! [`forward_kv`] also lets a sequence have fewer queries than keys (new
//! tokens attending to a KV cache), with the causal mask aligned to the end
//! of the keys.

use crate::host::attention::KvDims;

/// One sequence of a batch: tokens `start .. start + len`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeqSpan {
    /// First token of the sequence.
    pub start: usize,
    /// Number of tokens (0 is legal).
    pub len: usize,
}

/// Sizes shared by every tensor of one attention call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionDims {
    /// Rows of q, k and v (batch * seq for padded batches).
    pub tokens: usize,
    /// Query heads.
    pub q_heads: usize,
    /// Key/value heads; divides `q_heads`.
    pub kv_heads: usize,
    /// Elements per head row.
    pub head_dim: usize,
}

impl AttentionDims {
    /// The same sizes with queries and keys on one token axis.
    pub fn kv(&self) -> KvDims {
        KvDims {
            q_tokens: self.tokens,
            kv_tokens: self.tokens,
            q_heads: self.q_heads,
            kv_heads: self.kv_heads,
            head_dim: self.head_dim,
        }
    }
}

/// Offset of (token, head) in q, o and their gradients.
fn q_index(dims: &KvDims, token: usize, head: usize) -> usize {
    (token * dims.q_heads + head) * dims.head_dim
}

/// Offset in k and v of the kv head that query head `q_head` reads.
fn kv_index(dims: &KvDims, token: usize, q_head: usize) -> usize {
    let kv_head = q_head / (dims.q_heads / dims.kv_heads);
    (token * dims.kv_heads + kv_head) * dims.head_dim
}

/// Probabilities P[i][j] of one (sequence, head) in f64 (row i for query
/// `qs.start + i`, of length `ks.len`, masked entries 0), and the natural-log
/// logsumexp of each row. Causal rows see keys j ≤ i + (ks.len − qs.len).
#[allow(clippy::too_many_arguments)]
fn probabilities(
    q: &[f32],
    k: &[f32],
    dims: &KvDims,
    qs: SeqSpan,
    ks: SeqSpan,
    head: usize,
    scale: f32,
    causal: bool,
) -> (Vec<f64>, Vec<f64>) {
    let (n, d) = (ks.len, dims.head_dim);
    let mut p = vec![0.0f64; qs.len * n];
    let mut lse = vec![0.0f64; qs.len];
    for i in 0..qs.len {
        let qi = &q[q_index(dims, qs.start + i, head)..][..d];
        let visible = if causal { i + 1 + (n - qs.len) } else { n };
        let row = &mut p[i * n..][..n];
        for (j, s) in row.iter_mut().enumerate().take(visible) {
            let kj = &k[kv_index(dims, ks.start + j, head)..][..d];
            let dot: f64 = qi.iter().zip(kj).map(|(&a, &b)| a as f64 * b as f64).sum();
            *s = dot * scale as f64;
        }
        let max = row[..visible]
            .iter()
            .cloned()
            .fold(f64::NEG_INFINITY, f64::max);
        let sum: f64 = row[..visible].iter().map(|s| (s - max).exp()).sum();
        lse[i] = max + sum.ln();
        for s in row[..visible].iter_mut() {
            *s = (*s - lse[i]).exp();
        }
    }
    (p, lse)
}

/// Forward: returns (o [tokens, q_heads, head_dim], lse [q_heads, tokens]).
pub fn forward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    dims: &AttentionDims,
    seqs: &[SeqSpan],
    scale: f32,
    causal: bool,
) -> (Vec<f32>, Vec<f32>) {
    forward_kv(q, k, v, &dims.kv(), seqs, seqs, scale, causal)
}

/// Forward where sequence b's queries `q_spans[b]` attend to its keys
/// `kv_spans[b]` (`q_spans[b].len` ≤ `kv_spans[b].len`; causal query i sees keys
/// j ≤ i + (kv_len − q_len)): returns (o [q_tokens, q_heads, head_dim],
/// lse [q_heads, q_tokens]).
#[allow(clippy::too_many_arguments)]
pub fn forward_kv(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    dims: &KvDims,
    q_spans: &[SeqSpan],
    kv_spans: &[SeqSpan],
    scale: f32,
    causal: bool,
) -> (Vec<f32>, Vec<f32>) {
    let d = dims.head_dim;
    let mut o = vec![0.0f32; dims.q_tokens * dims.q_heads * d];
    let mut lse_out = vec![0.0f32; dims.q_heads * dims.q_tokens];
    for (&qs, &ks) in q_spans.iter().zip(kv_spans) {
        for h in 0..dims.q_heads {
            let (p, lse) = probabilities(q, k, dims, qs, ks, h, scale, causal);
            for i in 0..qs.len {
                let mut acc = vec![0.0f64; d];
                for j in 0..ks.len {
                    let pij = p[i * ks.len + j];
                    let vj = &v[kv_index(dims, ks.start + j, h)..][..d];
                    acc.iter_mut()
                        .zip(vj)
                        .for_each(|(a, &x)| *a += pij * x as f64);
                }
                let oi = &mut o[q_index(dims, qs.start + i, h)..][..d];
                oi.iter_mut().zip(&acc).for_each(|(o, &a)| *o = a as f32);
                lse_out[h * dims.q_tokens + qs.start + i] = lse[i] as f32;
            }
        }
    }
    (o, lse_out)
}

/// Gradients of attention for upstream `dout` (like o): returns (dq, dk, dv)
/// shaped like q, k, v; dk and dv sum over the query heads sharing a kv head.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    dout: &[f32],
    dims: &AttentionDims,
    seqs: &[SeqSpan],
    scale: f32,
    causal: bool,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let d = dims.head_dim;
    let dims = &dims.kv();
    let mut dq = vec![0.0f64; q.len()];
    let mut dk = vec![0.0f64; k.len()];
    let mut dv = vec![0.0f64; v.len()];
    let dot =
        |a: &[f32], b: &[f32]| -> f64 { a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum() };
    for &seq in seqs {
        let n = seq.len;
        for h in 0..dims.q_heads {
            let (p, _) = probabilities(q, k, dims, seq, seq, h, scale, causal);
            for i in 0..n {
                let qi_at = q_index(dims, seq.start + i, h);
                let doi = &dout[qi_at..][..d];
                // dP[i][j] = dO_i . V_j; dS = P * (dP - sum_j P dP)
                let dp: Vec<f64> = (0..n)
                    .map(|j| dot(doi, &v[kv_index(dims, seq.start + j, h)..][..d]))
                    .collect();
                let row = &p[i * n..][..n];
                let delta: f64 = row.iter().zip(&dp).map(|(p, dp)| p * dp).sum();
                for j in 0..n {
                    let kj_at = kv_index(dims, seq.start + j, h);
                    let ds = row[j] * (dp[j] - delta) * scale as f64;
                    for c in 0..d {
                        dv[kj_at + c] += row[j] * doi[c] as f64;
                        dq[qi_at + c] += ds * k[kj_at + c] as f64;
                        dk[kj_at + c] += ds * q[qi_at + c] as f64;
                    }
                }
            }
        }
    }
    let to_f32 = |x: Vec<f64>| x.into_iter().map(|v| v as f32).collect();
    (to_f32(dq), to_f32(dk), to_f32(dv))
}
