//! One micro-batch's forward and backward through the model with only the
//! LoRA factors trainable: the activations each layer's backward needs are
//! kept from the forward pass (or, with recomputation, only the residual
//! entering each layer, the rest recomputed layer by layer in backward);
//! the loss and its gradient come from the fused LM head, which never holds
//! the logits of all tokens; the frozen embedding, norms and base weights
//! get no gradients.

use std::collections::BTreeMap;

use crate::llama::model::{DecoderLayer, Linear};
use crate::llama::{Llama, Module};
use crate::ops::attention::{self, AttentionConfig, AttentionOutput, Batch};
use crate::ops::cross_entropy::{self, CrossEntropy};
use crate::ops::lora::{self, LoraWeights};
use crate::ops::rope::{self, RopeConfig};
use crate::ops::{adamw, add, embedding, rmsnorm, swiglu};
use crate::{Error, Result, Tensor};

/// How the rows of a training batch sit in its ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout<'a> {
    /// [rows, seq], row b's first `lens[b]` tokens real, the rest padding.
    Padded {
        /// Real tokens per row.
        lens: &'a [u32],
    },
    /// One row of examples back to back: example e is tokens
    /// `cu_seqlens[e] .. cu_seqlens[e + 1]` and attends only to itself.
    Packed {
        /// Example boundaries: 0, ..., tokens.
        cu_seqlens: &'a [u32],
    },
}

/// A micro-batch as the step reads it.
#[derive(Debug, Clone, Copy)]
pub struct StepBatch<'a> {
    /// Token ids, row-major [rows, seq].
    pub ids: &'a [u32],
    /// Rows (1 when packed).
    pub rows: usize,
    /// Columns.
    pub seq: usize,
    /// Position of every token (RoPE), like ids: 0.. within each example.
    pub positions: &'a [i32],
    /// The label each token's logits predict (already shifted: the next
    /// token of its example), negative where ignored; like ids.
    pub targets: &'a [i32],
    /// Padded rows or packed examples.
    pub layout: Layout<'a>,
}

impl StepBatch<'_> {
    /// Tokens the loss counts.
    pub fn counted(&self) -> usize {
        self.targets.iter().filter(|&&t| t >= 0).count()
    }
}

/// Gradients of the LoRA factors of every adapted (layer, module): fp32,
/// shaped like the factors the model holds.
#[derive(Debug)]
pub struct LoraGrads {
    /// (dA, dB) per (layer, module).
    pub factors: BTreeMap<(usize, Module), (Tensor, Tensor)>,
}

impl LoraGrads {
    /// Adds `other` (the same factors) into these: gradient accumulation.
    pub fn accumulate(&mut self, other: &LoraGrads) -> Result<()> {
        if self.factors.len() != other.factors.len()
            || self
                .factors
                .keys()
                .zip(other.factors.keys())
                .any(|(a, b)| a != b)
        {
            return Err(Error::Invalid {
                op: "LoraGrads::accumulate",
                arg: "other",
                what: format!(
                    "holds {} factors' gradients, these {}, or other ones",
                    other.factors.len(),
                    self.factors.len()
                ),
            });
        }
        let mut acc: Vec<&mut Tensor> = self
            .factors
            .values_mut()
            .flat_map(|(a, b)| [a, b])
            .collect();
        let add: Vec<&Tensor> = other.factors.values().flat_map(|(a, b)| [a, b]).collect();
        adamw::accumulate(&mut acc, &add)
    }
}

/// The saved activations of one layer.
struct Saved {
    x1: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn: AttentionOutput,
    h_mid: Tensor,
    x2: Tensor,
    gate: Tensor,
    up: Tensor,
    m: Tensor,
    /// Each adapted projection's u (forward's dropout(x) Aᵀ).
    u: [Option<Tensor>; 7],
}

/// What every layer of one step shares.
struct Shared<'a> {
    rows: usize,
    seq: usize,
    positions: Tensor,
    rope: RopeConfig,
    attn: AttentionConfig,
    batch: Batch<'a>,
}

/// A copy of `t` on its device.
fn copy(t: &Tensor) -> Result<Tensor> {
    t.to_device(t.device())
}

/// y = x Wᵀ (+ LoRA), keeping u.
fn project(p: &Linear, x: &Tensor) -> Result<(Tensor, Option<Tensor>)> {
    match &p.lora {
        None => Ok((lora::linear(x, &p.weight)?, None)),
        Some(f) => {
            let w = LoraWeights {
                w: &p.weight,
                a: &f.a,
                b: &f.b,
            };
            let out = lora::forward(x, w, &f.config)?;
            Ok((out.y, Some(out.u)))
        }
    }
}

impl Llama {
    /// Forward and backward over `batch`: the summed loss of its counted
    /// tokens (with each row's logsumexp) and the gradients of
    /// `scale` · that sum with respect to every attached LoRA factor.
    /// `scale` is 1 / (counted tokens of the whole global batch) for
    /// transformers' mean loss under gradient accumulation. With
    /// `recompute`, only the residual entering each layer is kept and the
    /// layer's activations are recomputed in backward (activation
    /// checkpointing: less memory, one more forward of every layer).
    pub fn forward_backward(
        &self,
        batch: &StepBatch<'_>,
        scale: f32,
        recompute: bool,
    ) -> Result<(CrossEntropy, LoraGrads)> {
        let c = &self.config;
        let shared = self.check_step(batch)?;
        let eps = c.rms_norm_eps;
        // Forward: the residual stream entering every layer, and (without
        // recompute) each layer's saved activations.
        let mut residuals = Vec::with_capacity(self.layers.len() + 1);
        let mut saved = Vec::with_capacity(self.layers.len());
        let h0 = embedding::forward(&self.embed, batch.ids, self.dtype)?;
        let mut x = rmsnorm::forward(&h0, &self.layers[0].input_norm, eps)?;
        residuals.push(h0);
        for (i, layer) in self.layers.iter().enumerate() {
            let next_norm = self.layers.get(i + 1).map_or(&self.norm, |l| &l.input_norm);
            let (s, next) =
                self.layer_forward(layer, &residuals[i], x, Some(next_norm), &shared)?;
            let (h_out, x_next) = next.expect("asked for the next layer's input");
            if !recompute {
                saved.push(s);
            }
            residuals.push(h_out);
            x = x_next;
        }
        // The fused head: loss and dL/d(final norm output).
        let (ce, dhidden) =
            cross_entropy::linear_cross_entropy_grad(&x, self.head(), batch.targets, scale)?;
        drop(x);
        let h_last = residuals.pop().expect("N + 1 residuals");
        let mut g = rmsnorm::backward(&h_last, &self.norm, &dhidden, eps, false)?.dx;
        drop((h_last, dhidden));
        let mut grads = BTreeMap::new();
        for (i, layer) in self.layers.iter().enumerate().rev() {
            let h_in = residuals.pop().expect("a residual per layer");
            let s = match saved.pop() {
                Some(s) => s,
                None => {
                    let x1 = rmsnorm::forward(&h_in, &layer.input_norm, eps)?;
                    self.layer_forward(layer, &h_in, x1, None, &shared)?.0
                }
            };
            g = self.layer_backward(i, layer, &h_in, s, g, &shared, &mut grads)?;
        }
        Ok((ce, LoraGrads { factors: grads }))
    }

    /// One layer forward from its residual input `h_in` and x1 =
    /// input_norm(h_in): the saved activations and, given `next_norm`, the
    /// residual out and `next_norm` of it (a recompute in backward needs
    /// neither).
    fn layer_forward(
        &self,
        layer: &DecoderLayer,
        h_in: &Tensor,
        x1: Tensor,
        next_norm: Option<&Tensor>,
        sh: &Shared<'_>,
    ) -> Result<(Saved, Option<(Tensor, Tensor)>)> {
        let c = &self.config;
        let (b, t) = (sh.rows, sh.seq);
        let mut u: [Option<Tensor>; 7] = Default::default();
        let mut proj = |m: Module, x: &Tensor| -> Result<Tensor> {
            let (y, um) = project(layer.projection(m), x)?;
            u[m as usize] = um;
            Ok(y)
        };
        let mut q = proj(Module::Q, &x1)?.reshape(&[b, t, c.num_attention_heads, c.head_dim])?;
        let mut k = proj(Module::K, &x1)?.reshape(&[b, t, c.num_key_value_heads, c.head_dim])?;
        let v = proj(Module::V, &x1)?.reshape(&[b, t, c.num_key_value_heads, c.head_dim])?;
        rope::forward(&mut q, &mut k, &sh.positions, &sh.rope)?;
        let (q, k, v) = (attn_view(q, sh)?, attn_view(k, sh)?, attn_view(v, sh)?);
        let attn = attention::forward(&q, &k, &v, sh.batch, &sh.attn)?;
        let o = copy(&attn.o)?.reshape(&[b * t, c.q_width()])?;
        let delta = proj(Module::O, &o)?;
        drop(o);
        let mut h_mid = copy(h_in)?;
        let x2 = rmsnorm::add_forward(
            &mut h_mid,
            &delta,
            &layer.post_attention_norm,
            c.rms_norm_eps,
        )?;
        let gate = proj(Module::Gate, &x2)?;
        let up = proj(Module::Up, &x2)?;
        let m = swiglu::forward(&gate, &up)?;
        let delta = proj(Module::Down, &m)?;
        let next = match next_norm {
            Some(norm) => {
                let mut h_out = copy(&h_mid)?;
                let x_next = rmsnorm::add_forward(&mut h_out, &delta, norm, c.rms_norm_eps)?;
                Some((h_out, x_next))
            }
            None => None,
        };
        let saved = Saved {
            x1,
            q,
            k,
            v,
            attn,
            h_mid,
            x2,
            gate,
            up,
            m,
            u,
        };
        Ok((saved, next))
    }

    /// One layer backward: dL/d(residual in) from `g` = dL/d(residual out),
    /// the layer's LoRA gradients into `grads`.
    #[allow(clippy::too_many_arguments)]
    fn layer_backward(
        &self,
        index: usize,
        layer: &DecoderLayer,
        h_in: &Tensor,
        s: Saved,
        mut g: Tensor,
        sh: &Shared<'_>,
        grads: &mut BTreeMap<(usize, Module), (Tensor, Tensor)>,
    ) -> Result<Tensor> {
        let c = &self.config;
        let eps = c.rms_norm_eps;
        let tokens = sh.rows * sh.seq;
        let Saved {
            x1,
            q,
            k,
            v,
            attn,
            h_mid,
            x2,
            gate,
            up,
            m,
            mut u,
        } = s;
        let mut back = |module: Module, x: &Tensor, dy: &Tensor| -> Result<Tensor> {
            let p = layer.projection(module);
            match (&p.lora, u[module as usize].take()) {
                (Some(f), Some(um)) => {
                    let w = LoraWeights {
                        w: &p.weight,
                        a: &f.a,
                        b: &f.b,
                    };
                    let out = lora::backward(x, dy, w, &um, &f.config)?;
                    grads.insert((index, module), (out.da, out.db));
                    Ok(out.dx)
                }
                _ => lora::linear_backward(dy, &p.weight),
            }
        };
        // MLP: h_out = h_mid + down(swiglu(gate(x2), up(x2))), x2 = norm(h_mid).
        let dm = back(Module::Down, &m, &g)?;
        drop(m);
        let sg = swiglu::backward(&gate, &up, &dm)?;
        drop((dm, gate, up));
        let mut dx2 = back(Module::Gate, &x2, &sg.dgate)?;
        add::add_assign(&mut dx2, &back(Module::Up, &x2, &sg.dup)?)?;
        drop((sg, x2));
        let dn = rmsnorm::backward(&h_mid, &layer.post_attention_norm, &dx2, eps, false)?.dx;
        add::add_assign(&mut g, &dn)?;
        drop((dn, dx2, h_mid));
        // Attention: h_mid = h_in + o(attn(rope(q(x1)), rope(k(x1)), v(x1))), x1 = norm(h_in).
        let o = copy(&attn.o)?.reshape(&[tokens, c.q_width()])?;
        let d_o = back(Module::O, &o, &g)?;
        drop(o);
        let d_o = d_o.reshape(attn.o.shape())?;
        let ag = attention::backward(&q, &k, &v, &attn, &d_o, sh.batch, &sh.attn)?;
        drop((d_o, attn, q, k, v));
        let mut dq = ag
            .dq
            .reshape(&[sh.rows, sh.seq, c.num_attention_heads, c.head_dim])?;
        let mut dk = ag
            .dk
            .reshape(&[sh.rows, sh.seq, c.num_key_value_heads, c.head_dim])?;
        rope::backward(&mut dq, &mut dk, &sh.positions, &sh.rope)?;
        let mut dx1 = back(Module::Q, &x1, &dq.reshape(&[tokens, c.q_width()])?)?;
        add::add_assign(
            &mut dx1,
            &back(Module::K, &x1, &dk.reshape(&[tokens, c.kv_width()])?)?,
        )?;
        let dv = ag.dv.reshape(&[tokens, c.kv_width()])?;
        add::add_assign(&mut dx1, &back(Module::V, &x1, &dv)?)?;
        drop((dv, x1));
        let dn = rmsnorm::backward(h_in, &layer.input_norm, &dx1, eps, false)?.dx;
        add::add_assign(&mut g, &dn)?;
        Ok(g)
    }

    /// Checks `batch` against the model; returns what every layer shares.
    fn check_step<'a>(&self, batch: &StepBatch<'a>) -> Result<Shared<'a>> {
        let fail = |arg, what: String| Error::Invalid {
            op: "Llama::forward_backward",
            arg,
            what,
        };
        let cells = batch.rows * batch.seq;
        if cells == 0 {
            return Err(fail(
                "batch",
                format!("is empty ({} × {})", batch.rows, batch.seq),
            ));
        }
        for (arg, len) in [
            ("batch.ids", batch.ids.len()),
            ("batch.positions", batch.positions.len()),
            ("batch.targets", batch.targets.len()),
        ] {
            if len != cells {
                return Err(fail(
                    arg,
                    format!("has {len} entries, not {} × {}", batch.rows, batch.seq),
                ));
            }
        }
        let max_pos = self.config.max_position_embeddings;
        if let Some(p) = batch
            .positions
            .iter()
            .find(|&&p| p < 0 || p as usize >= max_pos)
        {
            return Err(fail(
                "batch.positions",
                format!("holds {p}, outside 0 .. max_position_embeddings {max_pos}"),
            ));
        }
        let attn_batch = match batch.layout {
            Layout::Padded { lens } => {
                if lens.len() != batch.rows || lens.iter().any(|&l| l as usize > batch.seq) {
                    return Err(fail(
                        "batch.layout",
                        format!("lens {lens:?} are not one length ≤ {} per row", batch.seq),
                    ));
                }
                Batch::Padded(lens)
            }
            Layout::Packed { cu_seqlens } => {
                if batch.rows != 1 {
                    return Err(fail(
                        "batch.rows",
                        format!("is {}; a packed batch is one row", batch.rows),
                    ));
                }
                Batch::Packed(cu_seqlens)
            }
        };
        Ok(Shared {
            rows: batch.rows,
            seq: batch.seq,
            positions: Tensor::from_slice(batch.positions, &[batch.rows, batch.seq], &self.device)?,
            rope: RopeConfig {
                theta: self.config.rope_theta,
                ..RopeConfig::default()
            },
            attn: AttentionConfig {
                causal: true,
                scale: None,
            },
            batch: attn_batch,
        })
    }
}

/// q, k, v or their gradients [rows, seq, heads, d] as attention takes them:
/// unchanged for padded rows, [tokens, heads, d] for a packed row.
fn attn_view(t: Tensor, sh: &Shared<'_>) -> Result<Tensor> {
    match sh.batch {
        Batch::Packed(_) => {
            let s = t.shape().to_vec();
            t.reshape(&[s[0] * s[1], s[2], s[3]])
        }
        _ => Ok(t),
    }
}
