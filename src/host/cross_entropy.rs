//! The LM head fused with cross-entropy on the host: logits are computed for
//! a block of tokens at a time (never [tokens, vocab] at once), reduced to
//! each row's logsumexp and its label's logit, and — when the gradient is
//! asked for — turned in place into dlogits and multiplied back through the
//! head into dh, then dropped (the loss is the graph's end, so its gradient
//! is known while the logits are at hand: one GEMM fewer than a separate
//! backward pass).

use std::f32::consts::LOG2_E;

use rayon::prelude::*;

use super::attention::exp2_nonpositive;
use super::gemm::{matmul_nn, matmul_nt, Weights, TILE_ROWS};

/// Where the gradient of `scale` · Σ loss goes: dh [tokens, hidden].
pub struct Grad<'a> {
    /// Factor of the summed loss (1 / tokens of the global batch for a mean).
    pub scale: f32,
    /// dL/dh, overwritten.
    pub dh: &'a mut [f32],
}

/// Bytes of fp32 logits one block may hold.
const BLOCK_BYTES: usize = 32 << 20;

/// (sum of the losses in f64, tokens counted, logsumexp per row) for
/// h [tokens, hidden] and the head w [vocab, hidden]; labels < 0 are ignored,
/// every other label is < vocab (checked by the op). With `grad`, also
/// dh_t = scale · (softmax(h_t Wᵀ) − onehot(label_t)) W (zero for ignored tokens).
pub fn linear_cross_entropy(
    h: &[f32],
    w: Weights<'_>,
    labels: &[i32],
    hidden: usize,
    vocab: usize,
    mut grad: Option<Grad<'_>>,
) -> (f64, usize, Vec<f32>) {
    let tokens = labels.len();
    assert_eq!(h.len(), tokens * hidden, "h is [tokens, hidden]");
    let mut block = (BLOCK_BYTES / 4 / vocab.max(1)).clamp(1, tokens.max(1));
    // Whole GEMM row tiles, each of which packs all of the head's panels:
    // 262 rows would be a tile of 256 and one of 6 that packs as much.
    if block > TILE_ROWS && block < tokens {
        block -= block % TILE_ROWS;
    }
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
        for (i, &(l, target)) in picked.iter().enumerate() {
            lse[start + i] = l;
            if let Some(t) = target {
                sum += l as f64 - t as f64;
                count += 1;
            }
        }
        if let Some(g) = grad.as_mut() {
            let scale = g.scale;
            z.par_chunks_mut(vocab)
                .zip(&labels[start..start + rows])
                .zip(&picked)
                .for_each(|((row, &label), &(l, _))| {
                    if label < 0 {
                        row.fill(0.0);
                        return;
                    }
                    for v in row.iter_mut() {
                        *v = scale * exp2_nonpositive((*v - l) * LOG2_E);
                    }
                    row[label as usize] -= scale;
                });
            let dh = &mut g.dh[start * hidden..][..rows * hidden];
            matmul_nn(z, w, rows, vocab, hidden, 1.0, 0.0, dh);
        }
    }
    (sum, count, lse)
}

/// log Σ e^z: the exponentials in f32 by the polynomial of
/// [`exp2_nonpositive`] (loops that vectorize), summed in f64 in eight
/// lanes.
fn logsumexp(z: &[f32]) -> f32 {
    let max = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        return max;
    }
    let e = |v: f32| exp2_nonpositive((v - max) * LOG2_E) as f64;
    let mut lanes = [0.0f64; 8];
    let chunks = z.chunks_exact(8);
    let tail: f64 = chunks.remainder().iter().map(|&v| e(v)).sum();
    for chunk in chunks {
        for (acc, &v) in lanes.iter_mut().zip(chunk) {
            *acc += e(v);
        }
    }
    (max as f64 + (lanes.iter().sum::<f64>() + tail).ln()) as f32
}
