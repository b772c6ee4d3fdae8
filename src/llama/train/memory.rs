//! What a LoRA training run holds in device memory, estimated before it
//! starts so that a run that cannot fit is refused with the figures instead
//! of failing at some allocation mid-step.

use crate::llama::{AdapterConfig, LlamaConfig, Module};
use crate::ops::cross_entropy::DEFAULT_CHUNK_BYTES;

/// Bytes of each part of a training step, and their sum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct MemoryEstimate {
    /// The frozen model (embedding, layers, norms, head).
    pub weights: u64,
    /// LoRA factors, their gradients, the accumulated gradients and AdamW's
    /// two moments: 5 fp32 copies.
    pub lora_and_optimizer: u64,
    /// Activations kept for backward: every layer's (or, recomputing, each
    /// layer's residual input and one layer's in full), plus one layer's
    /// worth of gradients in flight.
    pub activations: u64,
    /// The fused head's fp32 logits chunk and its dlogits.
    pub head: u64,
    /// The sum.
    pub total: u64,
}

/// What a run of `adapter` on `model` holds at micro-batch `rows` × `seq`
/// tokens, with activations and weights of `elem_bytes` bytes (2 for bf16 on
/// the GPU, 4 on the CPU), recomputing activations per layer or not.
pub fn estimate(
    model: &LlamaConfig,
    adapter: &AdapterConfig,
    rows: usize,
    seq: usize,
    elem_bytes: usize,
    recompute: bool,
) -> MemoryEstimate {
    let (h, i) = (model.hidden_size as u64, model.intermediate_size as u64);
    let (qw, kvw) = (model.q_width() as u64, model.kv_width() as u64);
    let (v, layers) = (model.vocab_size as u64, model.num_hidden_layers as u64);
    let e = elem_bytes as u64;
    let tokens = (rows * seq) as u64;
    let per_layer: u64 = Module::ALL
        .iter()
        .map(|m| m.shape(model).iter().product::<usize>() as u64)
        .sum::<u64>()
        + 2 * h;
    let head = if model.tie_word_embeddings { 0 } else { v * h };
    let weights = (v * h + layers * per_layer + h + head) * e;
    let r = adapter.r as u64;
    let lora_params: u64 = adapter
        .targets
        .iter()
        .map(|m| {
            let [out, inp] = m.shape(model);
            r * (out + inp) as u64
        })
        .sum::<u64>()
        * layers;
    let r16 = r.div_ceil(16) * 16;
    let heads = model.num_attention_heads as u64;
    // x1, h_in, h_mid, x2 (4 H); q and o (2 qw); k, v (2 kvw); gate, up,
    // silu(gate)·up (3 I); the adapters' u (r16 each); lse (fp32 per head).
    let layer_bytes = tokens * ((4 * h + 2 * qw + 2 * kvw + 3 * i + 7 * r16) * e + 4 * heads);
    let kept = if recompute {
        layers * tokens * h * e + layer_bytes
    } else {
        layers * layer_bytes
    };
    let activations = kept + layer_bytes;
    let ld = v.next_multiple_of(8);
    let chunk_rows = (DEFAULT_CHUNK_BYTES as u64 / (4 * ld)).clamp(1, tokens.max(1));
    let head_bytes = chunk_rows * ld * (4 + e) + 2 * tokens * h * e;
    let lora_and_optimizer = 5 * 4 * lora_params;
    MemoryEstimate {
        weights,
        lora_and_optimizer,
        activations,
        head: head_bytes,
        total: weights + lora_and_optimizer + activations + head_bytes,
    }
}

impl std::fmt::Display for MemoryEstimate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        write!(
            f,
            "{:.2} GiB (weights {:.2}, LoRA + optimizer {:.2}, activations {:.2}, head {:.2})",
            gib(self.total),
            gib(self.weights),
            gib(self.lora_and_optimizer),
            gib(self.activations),
            gib(self.head)
        )
    }
}
