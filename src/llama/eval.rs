//! `eval`: the causal-LM loss of a model (with or without an adapter) over a
//! data file, and its perplexity.

use std::time::Instant;

use super::data::{self, Example};
use super::{Llama, TokenBatch};
use crate::{Error, Result};

/// What an evaluation measured.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct EvalReport {
    /// Mean cross-entropy over every counted (shifted, non-ignored) label of
    /// the file, in nats: the loss transformers computes for the whole file as
    /// one batch.
    pub loss: f64,
    /// e^loss.
    pub perplexity: f64,
    /// Labels counted.
    pub label_tokens: usize,
    /// Rows evaluated.
    pub rows: usize,
    /// Tokens run through the model (padding excluded).
    pub tokens: usize,
    /// Forward throughput, tokens per second (padding excluded).
    pub tokens_per_s: f64,
}

/// Evaluates `examples` in batches of `batch_size` rows (right-padded with `pad_id`).
pub fn evaluate(
    model: &Llama,
    examples: &[Example],
    batch_size: usize,
    pad_id: u32,
) -> Result<EvalReport> {
    if batch_size == 0 {
        return Err(Error::Invalid {
            op: "eval",
            arg: "batch_size",
            what: "is 0".into(),
        });
    }
    let start = Instant::now();
    let (mut sum, mut counted, mut tokens) = (0.0f64, 0usize, 0usize);
    for chunk in examples.chunks(batch_size) {
        let b = data::batch(chunk, pad_id);
        let batch = TokenBatch {
            ids: &b.input_ids,
            batch: b.batch,
            seq: b.seq,
            lens: &b.lens,
        };
        let ce = model.loss(&batch, &b.labels)?;
        sum += ce.loss_sum;
        counted += ce.tokens;
        tokens += b.lens.iter().map(|&l| l as usize).sum::<usize>();
    }
    model.device.synchronize()?;
    let secs = start.elapsed().as_secs_f64();
    if counted == 0 {
        return Err(Error::Invalid {
            op: "eval",
            arg: "data",
            what: "has no label to score (every label is -100 after the shift)".into(),
        });
    }
    let loss = sum / counted as f64;
    Ok(EvalReport {
        loss,
        perplexity: loss.exp(),
        label_tokens: counted,
        rows: examples.len(),
        tokens,
        tokens_per_s: tokens as f64 / secs.max(1e-9),
    })
}
