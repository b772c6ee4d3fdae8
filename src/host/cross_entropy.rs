//! The LM head fused with cross-entropy on the host: logits are computed for
//! a block of tokens at a time (never [tokens, vocab] at once), reduced to
//! each row's logsumexp and its label's logit, and dropped.

use rayon::prelude::*;

use super::gemm::{matmul_nt, Weights};

/// Bytes of fp32 logits one block may hold.
const BLOCK_BYTES: usize = 32 << 20;

/// (sum of the losses in f64, tokens counted, logsumexp per row) for
/// h [tokens, hidden] and the head w [vocab, hidden]; labels < 0 are ignored,
/// every other label is < vocab (checked by the op).
pub fn linear_cross_entropy(
    h: &[f32],
    w: Weights<'_>,
    labels: &[i32],
    hidden: usize,
    vocab: usize,
) -> (f64, usize, Vec<f32>) {
    let tokens = labels.len();
    assert_eq!(h.len(), tokens * hidden, "h is [tokens, hidden]");
    let block = (BLOCK_BYTES / 4 / vocab.max(1)).clamp(1, tokens.max(1));
    let mut logits = vec![0.0f32; block * vocab];
    let mut lse = vec![0.0f32; tokens];
    let mut sum = 0.0f64;
    let mut count = 0;
    for start in (0..tokens).step_by(block) {
        let rows = block.min(tokens - start);
        let z = &mut logits[..rows * vocab];
        matmul_nt(
            &h[start * hidden..][..rows * hidden],
            w,
            rows,
            hidden,
            vocab,
            1.0,
            0.0,
            z,
        );
        let picked: Vec<(f32, Option<f32>)> = z
            .par_chunks(vocab)
            .zip(&labels[start..start + rows])
            .map(|(row, &label)| (logsumexp(row), (label >= 0).then(|| row[label as usize])))
            .collect();
        for (i, (l, target)) in picked.into_iter().enumerate() {
            lse[start + i] = l;
            if let Some(t) = target {
                sum += l as f64 - t as f64;
                count += 1;
            }
        }
    }
    (sum, count, lse)
}

/// log Σ e^z, with the sum in f64.
fn logsumexp(z: &[f32]) -> f32 {
    let max = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        return max;
    }
    let s: f64 = z.iter().map(|&v| ((v - max) as f64).exp()).sum();
    (max as f64 + s.ln()) as f32
}
