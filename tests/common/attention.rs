//! One attention test case, run on a device and checked against the CPU
//! reference (shared by the emulated proptests and the GPU test).

use super::{check_results, round_to, rounding_unit, Rng};
use platypus::ops::attention::{self, AttentionConfig, Batch};
use platypus::{DType, Device, Tensor};

/// How the sequences of an attention test batch are laid out.
#[derive(Debug, Clone)]
pub enum AttnLayout {
    Dense { batch: usize, seq: usize },
    Padded { seq: usize, lens: Vec<u32> },
    Packed { cu_seqlens: Vec<u32> },
}

impl AttnLayout {
    /// Packed sequences of the given lengths.
    pub fn packed(lens: &[u32]) -> AttnLayout {
        let cu_seqlens = std::iter::once(0)
            .chain(lens.iter().scan(0, |acc, &l| {
                *acc += l;
                Some(*acc)
            }))
            .collect();
        AttnLayout::Packed { cu_seqlens }
    }

    /// Leading dims of q, k and v.
    fn lead(&self) -> Vec<usize> {
        match self {
            AttnLayout::Dense { batch, seq } => vec![*batch, *seq],
            AttnLayout::Padded { seq, lens } => vec![lens.len(), *seq],
            AttnLayout::Packed { cu_seqlens } => vec![*cu_seqlens.last().unwrap() as usize],
        }
    }

    fn batch(&self) -> Batch<'_> {
        match self {
            AttnLayout::Dense { .. } => Batch::Dense,
            AttnLayout::Padded { lens, .. } => Batch::Padded(lens),
            AttnLayout::Packed { cu_seqlens } => Batch::Packed(cu_seqlens),
        }
    }

    /// True if `token` is padding (only padded batches have any).
    fn is_padding(&self, token: usize) -> bool {
        match self {
            AttnLayout::Padded { seq, lens } => token % seq >= lens[token / seq] as usize,
            _ => false,
        }
    }
}

/// Shapes, dtype and masking of one case.
#[derive(Debug, Clone)]
pub struct AttnCase {
    pub layout: AttnLayout,
    pub q_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub dtype: DType,
    pub causal: bool,
}

impl AttnCase {
    /// Runs forward and backward on `device` with random inputs from `seed`
    /// and compares o, lse, dq, dk, dv with the CPU reference on the same
    /// (rounded) inputs; padding rows must be exactly zero.
    pub fn check_against_cpu(&self, device: &Device, seed: u64) -> Result<(), String> {
        let lead = self.layout.lead();
        let tokens: usize = lead.iter().product();
        let shape = |heads: usize| [lead.as_slice(), &[heads, self.head_dim]].concat();
        let mut rng = Rng::new(seed);
        let mut gen = |heads: usize| {
            let n = tokens * heads * self.head_dim;
            (round_to(&rng.normal_vec(n, 1.0), self.dtype), shape(heads))
        };
        let inputs = [
            gen(self.q_heads),
            gen(self.kv_heads),
            gen(self.kv_heads),
            gen(self.q_heads),
        ];
        let cfg = AttentionConfig {
            causal: self.causal,
            scale: None,
        };
        // The reference runs in f32 on the rounded inputs; the kernels store in `dtype`.
        let run = |device: &Device, dtype: DType| -> Result<[Vec<f32>; 5], platypus::Error> {
            let t = |i: usize| Tensor::from_f32(&inputs[i].0, &inputs[i].1, dtype, device);
            let (q, k, v, dout) = (t(0)?, t(1)?, t(2)?, t(3)?);
            let fwd = attention::forward(&q, &k, &v, self.layout.batch(), &cfg)?;
            let g = attention::backward(&q, &k, &v, &fwd, &dout, self.layout.batch(), &cfg)?;
            Ok([
                fwd.o.to_f32_vec()?,
                fwd.lse.to_f32_vec()?,
                g.dq.to_f32_vec()?,
                g.dk.to_f32_vec()?,
                g.dv.to_f32_vec()?,
            ])
        };
        let got = run(device, self.dtype).map_err(|e| e.to_string())?;
        let want = run(&Device::Cpu, DType::F32).map_err(|e| e.to_string())?;
        // A plain 16-bit implementation rounds every stored result (half a unit
        // of 2^-8 for bf16, 2^-11 for f16) and P before P V: allow a few units
        // at each tensor's scale (measured over 300 cases: o, dv <= 1.2 units,
        // dq, dk <= 3.4). lse is fp32 throughout.
        let unit = rounding_unit(self.dtype);
        let names = ["o", "lse", "dq", "dk", "dv"];
        check_results(&names, &got, &want, |name| match name {
            "lse" => 1e-5,
            "o" | "dv" => 3.0 * unit,
            // dS = P (dP - delta) cancels, and delta comes from the 16-bit o.
            _ => 8.0 * unit,
        })?;
        // Padding rows: exactly zero. lse is [q_heads, tokens], the rest [tokens, heads, head_dim].
        for (g, name) in got.iter().zip(names) {
            let width = g.len() / tokens;
            for (i, v) in g.iter().enumerate() {
                let token = if name == "lse" { i % tokens } else { i / width };
                if self.layout.is_padding(token) && *v != 0.0 {
                    return Err(format!("{name}[{i}] (padding token {token}) = {v}"));
                }
            }
        }
        Ok(())
    }
}
