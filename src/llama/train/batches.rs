//! Micro-batches of training rows: right-padded rows, or several examples
//! packed into one row (the attention kernels' varlen batches: no compute on
//! padding, no example attending to another); and the seeded order the rows
//! are visited in, epoch by epoch.

use super::{Layout, StepBatch};
use crate::llama::data::{self, Example};
use crate::llama::model::shift_labels;

/// A micro-batch as the training step reads it (see [`StepBatch`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MicroBatch {
    /// Token ids, [rows, seq].
    pub ids: Vec<u32>,
    /// Rows (1 when packed).
    pub rows: usize,
    /// Columns.
    pub seq: usize,
    /// Positions, 0.. within each example.
    pub positions: Vec<i32>,
    /// Shifted labels: the next token of the same example, or −100.
    pub targets: Vec<i32>,
    /// Real tokens per row (padded), or example boundaries (packed).
    pub spans: Vec<u32>,
    /// Whether the examples are packed into one row.
    pub packed: bool,
}

impl MicroBatch {
    /// `examples` padded on the right to the longest with `pad_id`
    /// (labels −100 there), as transformers' collator does.
    pub fn padded(examples: &[&Example], pad_id: u32) -> MicroBatch {
        let b = data::batch(examples, pad_id);
        MicroBatch {
            positions: (0..b.batch).flat_map(|_| 0..b.seq as i32).collect(),
            targets: shift_labels(&b.labels, b.seq),
            ids: b.input_ids,
            rows: b.batch,
            seq: b.seq,
            spans: b.lens,
            packed: false,
        }
    }

    /// The real tokens (attention mask 1) of `examples` back to back in one
    /// row; each example's positions start at 0 and its last token predicts
    /// nothing (the next example is not its continuation).
    pub fn packed(examples: &[&Example]) -> MicroBatch {
        let mut out = MicroBatch {
            ids: Vec::new(),
            rows: 1,
            seq: 0,
            positions: Vec::new(),
            targets: Vec::new(),
            spans: vec![0],
            packed: true,
        };
        for e in examples {
            let len = e.attention_mask.iter().filter(|&&m| m != 0).count();
            out.ids.extend_from_slice(&e.input_ids[..len]);
            out.positions.extend(0..len as i32);
            out.targets.extend(shift_labels(&e.labels[..len], len));
            out.spans.push(out.ids.len() as u32);
        }
        out.seq = out.ids.len();
        out
    }

    /// The view the step takes.
    pub fn step(&self) -> StepBatch<'_> {
        StepBatch {
            ids: &self.ids,
            rows: self.rows,
            seq: self.seq,
            positions: &self.positions,
            targets: &self.targets,
            layout: if self.packed {
                Layout::Packed {
                    cu_seqlens: &self.spans,
                }
            } else {
                Layout::Padded { lens: &self.spans }
            },
        }
    }

    /// Tokens the loss counts.
    pub fn counted(&self) -> usize {
        self.targets.iter().filter(|&&t| t >= 0).count()
    }

    /// Real (unpadded) tokens.
    pub fn tokens(&self) -> usize {
        if self.packed {
            self.seq
        } else {
            self.spans.iter().map(|&l| l as usize).sum()
        }
    }
}

/// The order of `n` rows in epoch `epoch` of a run seeded with `seed`: a
/// Fisher–Yates shuffle driven by SplitMix64 (the same on every machine).
pub fn epoch_order(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut state = seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
    let mut next = || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = (next() % (i as u64 + 1)) as usize;
        order.swap(i, j);
    }
    order
}
