//! `generate`: decoding with a KV cache preallocated for the prompt and the
//! new tokens. Greedy by default (the highest logit, the lowest id on a
//! tie, as torch's argmax), and with temperature 0; with a temperature > 0,
//! sampling from the top-p nucleus with a seeded generator, so a run
//! reproduces. Both are [`crate::ops::sampling`] on the logits' device (the
//! definition a GPU and the CPU share: the nucleus cut at a weight
//! threshold, its tokens walked in index order).

use std::time::Instant;

use super::model::KvCache;
use super::Llama;
use crate::ops::sampling;
use crate::{Error, Result, Tensor};

/// Sampling instead of greedy decoding.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    /// Logits are divided by it (> 0; 0 decodes greedily).
    pub temperature: f32,
    /// Smallest set of most likely tokens whose probability reaches top_p
    /// (with the tokens tied with its least likely one), in (0, 1].
    pub top_p: f32,
    /// Seed of the random stream.
    pub seed: u64,
}

/// What to generate.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateConfig {
    /// Most tokens to add.
    pub max_new_tokens: usize,
    /// `None`: greedy.
    pub sampling: Option<Sampling>,
    /// Stop after any of these tokens (the model's EOS ids); empty: never.
    pub stop: Vec<u32>,
    /// Keep the logits each new token was chosen from (for tests).
    pub keep_logits: bool,
}

/// What a generation produced.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Generation {
    /// The new tokens (the stop token included when one ended it).
    pub ids: Vec<u32>,
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Seconds of the prompt's forward pass.
    pub prefill_s: f64,
    /// Seconds of the whole generation, prefill included.
    pub total_s: f64,
    /// New tokens per second of the whole generation (as transformers'
    /// `generate` is timed).
    pub tokens_per_s: f64,
    /// True when a stop token ended it.
    pub stopped: bool,
    /// The logits of each new token's choice, with `keep_logits`.
    #[serde(skip)]
    pub logits: Vec<Vec<f32>>,
}

/// Generates after `prompt` (one row).
pub fn generate(model: &Llama, prompt: &[u32], cfg: &GenerateConfig) -> Result<Generation> {
    let max_pos = model.config.max_position_embeddings;
    let invalid = |arg, what: String| Error::Invalid {
        op: "generate",
        arg,
        what,
    };
    if prompt.is_empty() {
        return Err(invalid("prompt", "is empty".into()));
    }
    if prompt.len() + cfg.max_new_tokens > max_pos {
        return Err(invalid(
            "prompt",
            format!(
                "{} tokens + {} new ones pass max_position_embeddings {max_pos}",
                prompt.len(),
                cfg.max_new_tokens
            ),
        ));
    }
    // Temperature 0 is greedy decoding (as the CLI's --temperature 0).
    let sampler = cfg.sampling.filter(|s| s.temperature != 0.0);
    if let Some(s) = sampler {
        if !(s.temperature > 0.0 && s.temperature.is_finite()) {
            return Err(invalid(
                "temperature",
                format!("{} is not >= 0 (0: greedy)", s.temperature),
            ));
        }
        if !(s.top_p > 0.0 && s.top_p <= 1.0) {
            return Err(invalid("top_p", format!("{} is not in (0, 1]", s.top_p)));
        }
    }
    let start = Instant::now();
    let mut cache = KvCache::new(model, 1, (prompt.len() + cfg.max_new_tokens).max(1))?;
    let mut rng = SplitMix(sampler.map_or(0, |s| s.seed));
    let mut out = Generation {
        ids: Vec::new(),
        prompt_tokens: prompt.len(),
        prefill_s: 0.0,
        total_s: 0.0,
        tokens_per_s: 0.0,
        stopped: false,
        logits: Vec::new(),
    };
    let mut next: Vec<u32> = prompt.to_vec();
    while out.ids.len() < cfg.max_new_tokens {
        let hidden = model.forward_cached(&next, &mut cache)?;
        let last = last_row(hidden)?;
        // [1, vocab] on the model's device: only the id comes back.
        let logits = model.logits(&last)?;
        let id = match sampler {
            None => sampling::argmax(&logits)?[0],
            Some(s) => sampling::sample(&logits, s.temperature, s.top_p, &[rng.next_f64()])?[0],
        };
        if out.ids.is_empty() {
            out.prefill_s = start.elapsed().as_secs_f64();
        }
        if cfg.keep_logits {
            out.logits.push(logits.to_f32_vec()?);
        }
        out.ids.push(id);
        if cfg.stop.contains(&id) {
            out.stopped = true;
            break;
        }
        next = vec![id];
    }
    out.total_s = start.elapsed().as_secs_f64();
    out.tokens_per_s = out.ids.len() as f64 / out.total_s.max(1e-9);
    Ok(out)
}

/// The last row of hidden states [tokens, hidden] as a [1, hidden] tensor:
/// a decoding step's single row as it is, on its device; the prompt's last
/// row through the host, once per generation.
fn last_row(hidden: Tensor) -> Result<Tensor> {
    let width = *hidden.shape().last().expect("[tokens, hidden]");
    if hidden.elem_count() == width {
        return hidden.reshape(&[1, width]);
    }
    let values = hidden.to_f32_vec()?;
    let row = &values[values.len() - width..];
    Tensor::from_f32(row, &[1, width], hidden.dtype(), hidden.device())
}

/// The splitmix64 generator: seeded, reproducible sampling.
#[derive(Debug, Clone)]
pub struct SplitMix(pub u64);

impl SplitMix {
    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    }
}
