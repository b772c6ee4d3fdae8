//! Scaled dot-product attention reference: the full score matrix of every
//! (sequence, head), softmax and its gradient, in f64.
//!
//! Token-major layout, as the q/k/v projections produce it: q and o are
//! [tokens, q_heads, head_dim], k and v [tokens, kv_heads, head_dim], the
//! logsumexp [q_heads, tokens]. Query head h reads kv head h / (q_heads /
//! kv_heads). Each sequence is a run of tokens ([`SeqSpan`]); tokens outside
//! every span (padding) get zero outputs, logsumexp and gradients.

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
    fn q_index(&self, token: usize, head: usize) -> usize {
        (token * self.q_heads + head) * self.head_dim
    }
    fn kv_index(&self, token: usize, q_head: usize) -> usize {
        let kv_head = q_head / (self.q_heads / self.kv_heads);
        (token * self.kv_heads + kv_head) * self.head_dim
    }
}

/// Probabilities P[i][j] of one (sequence, head) in f64 (row i of length
/// `len`, masked entries 0), and the natural-log logsumexp of each row.
fn probabilities(
    q: &[f32],
    k: &[f32],
    dims: &AttentionDims,
    seq: SeqSpan,
    head: usize,
    scale: f32,
    causal: bool,
) -> (Vec<f64>, Vec<f64>) {
    let (n, d) = (seq.len, dims.head_dim);
    let mut p = vec![0.0f64; n * n];
    let mut lse = vec![0.0f64; n];
    for i in 0..n {
        let qi = &q[dims.q_index(seq.start + i, head)..][..d];
        let visible = if causal { i + 1 } else { n };
        let row = &mut p[i * n..][..n];
        for (j, s) in row.iter_mut().enumerate().take(visible) {
            let kj = &k[dims.kv_index(seq.start + j, head)..][..d];
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
    let d = dims.head_dim;
    let mut o = vec![0.0f32; dims.tokens * dims.q_heads * d];
    let mut lse_out = vec![0.0f32; dims.q_heads * dims.tokens];
    for &seq in seqs {
        for h in 0..dims.q_heads {
            let (p, lse) = probabilities(q, k, dims, seq, h, scale, causal);
            for i in 0..seq.len {
                let mut acc = vec![0.0f64; d];
                for j in 0..seq.len {
                    let pij = p[i * seq.len + j];
                    let vj = &v[dims.kv_index(seq.start + j, h)..][..d];
                    acc.iter_mut()
                        .zip(vj)
                        .for_each(|(a, &x)| *a += pij * x as f64);
                }
                let oi = &mut o[dims.q_index(seq.start + i, h)..][..d];
                oi.iter_mut().zip(&acc).for_each(|(o, &a)| *o = a as f32);
                lse_out[h * dims.tokens + seq.start + i] = lse[i] as f32;
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
    let mut dq = vec![0.0f64; q.len()];
    let mut dk = vec![0.0f64; k.len()];
    let mut dv = vec![0.0f64; v.len()];
    let dot =
        |a: &[f32], b: &[f32]| -> f64 { a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum() };
    for &seq in seqs {
        let n = seq.len;
        for h in 0..dims.q_heads {
            let (p, _) = probabilities(q, k, dims, seq, h, scale, causal);
            for i in 0..n {
                let qi_at = dims.q_index(seq.start + i, h);
                let doi = &dout[qi_at..][..d];
                // dP[i][j] = dO_i . V_j; dS = P * (dP - sum_j P dP)
                let dp: Vec<f64> = (0..n)
                    .map(|j| dot(doi, &v[dims.kv_index(seq.start + j, h)..][..d]))
                    .collect();
                let row = &p[i * n..][..n];
                let delta: f64 = row.iter().zip(&dp).map(|(p, dp)| p * dp).sum();
                for j in 0..n {
                    let kj_at = dims.kv_index(seq.start + j, h);
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
