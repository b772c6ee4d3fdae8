//! The LM head fused with cross-entropy: for h [tokens, hidden] and the head
//! W [vocab, hidden], loss_t = logsumexp(h_t Wᵀ) − (h_t Wᵀ)[label_t] over the
//! tokens whose label is not ignored (negative: transformers' −100), without
//! the fp32 logits of all tokens at once (Liger's fused linear cross-entropy).
//!
//! Host code: [`crate::host::cross_entropy`]. Reference: [`crate::cpu::cross_entropy`].

use super::{check_device, check_float, no_kernel_yet};
use crate::host;
use crate::{Device, Error, Result, Tensor};

/// What the fused head computes.
#[derive(Debug, Clone, PartialEq)]
pub struct CrossEntropy {
    /// Σ loss_t over the counted tokens (f64).
    pub loss_sum: f64,
    /// Tokens counted (labels ≥ 0).
    pub tokens: usize,
    /// logsumexp of every row's logits (the backward pass needs it).
    pub lse: Vec<f32>,
}

impl CrossEntropy {
    /// Mean loss over the counted tokens (NaN when none was counted).
    pub fn mean(&self) -> f64 {
        self.loss_sum / self.tokens as f64
    }
}

/// Cross-entropy of `labels` [tokens] under logits h Wᵀ.
pub fn linear_cross_entropy(h: &Tensor, w: &Tensor, labels: &[i32]) -> Result<CrossEntropy> {
    const OP: &str = "cross_entropy::linear_cross_entropy";
    check_float(OP, "h", h)?;
    check_float(OP, "w", w)?;
    check_device(OP, "w", w, h.device())?;
    let hidden = *h.shape().last().unwrap_or(&0);
    let tokens = h.elem_count() / hidden.max(1);
    let &[vocab, w_hidden] = w.shape() else {
        return Err(Error::Shape {
            op: OP,
            arg: "w",
            expected: format!("[vocab, {hidden}]"),
            got: w.shape().to_vec(),
        });
    };
    if w_hidden != hidden {
        return Err(Error::Shape {
            op: OP,
            arg: "w",
            expected: format!("[vocab, {hidden}]"),
            got: w.shape().to_vec(),
        });
    }
    if labels.len() != tokens {
        return Err(Error::Invalid {
            op: OP,
            arg: "labels",
            what: format!("has {} labels for {tokens} tokens", labels.len()),
        });
    }
    if let Some((i, l)) = labels.iter().enumerate().find(|(_, &l)| l >= vocab as i32) {
        return Err(Error::Invalid {
            op: OP,
            arg: "labels",
            what: format!("labels[{i}] = {l} is not below the vocabulary size {vocab}"),
        });
    }
    match h.device() {
        Device::Cpu => {
            let (loss_sum, tokens, lse) = host::cross_entropy::linear_cross_entropy(
                host::view::f32s(OP, "h", h)?,
                host::view::weights(OP, "w", w)?,
                labels,
                hidden,
                vocab,
            );
            Ok(CrossEntropy {
                loss_sum,
                tokens,
                lse,
            })
        }
        _ => Err(no_kernel_yet(OP, h.device())),
    }
}
