//! One LoRA layer test case, run on a device and checked against the CPU
//! reference (shared by the emulated proptests and the GPU test).

use super::{check_results, round_to, rounding_unit, Rng};
use platypus::ops::lora::{self, LoraConfig, LoraWeights};
use platypus::{DType, Device, Tensor};

/// Shapes, dtype and hyper-parameters of one case.
#[derive(Debug, Clone)]
pub struct LoraCase {
    pub tokens: usize,
    pub in_features: usize,
    pub out_features: usize,
    pub rank: usize,
    pub dtype: DType,
    pub cfg: LoraConfig,
}

impl LoraCase {
    /// Runs forward and backward on `device` with random inputs from `seed`
    /// and compares y, u, dx, dA, dB with the CPU reference on the same
    /// (rounded) inputs.
    pub fn check_against_cpu(&self, device: &Device, seed: u64) -> Result<(), String> {
        let (t, i, o, r) = (self.tokens, self.in_features, self.out_features, self.rank);
        let mut rng = Rng::new(seed);
        let x = round_to(&rng.normal_vec(t * i, 1.0), self.dtype);
        let w = round_to(&rng.normal_vec(o * i, 0.1), self.dtype);
        // A and B are fp32 masters, but the kernels multiply 16-bit copies:
        // values the dtype holds exactly make both sides multiply the same numbers.
        let a = round_to(&rng.normal_vec(r * i, 0.1), self.dtype);
        let b = round_to(&rng.normal_vec(o * r, 0.1), self.dtype);
        let dy = round_to(&rng.normal_vec(t * o, 1.0), self.dtype);
        let run = |device: &Device, dtype: DType| -> Result<[Vec<f32>; 5], platypus::Error> {
            let xt = Tensor::from_f32(&x, &[t, i], dtype, device)?;
            let wt = Tensor::from_f32(&w, &[o, i], dtype, device)?;
            let at = Tensor::from_slice(&a, &[r, i], device)?;
            let bt = Tensor::from_slice(&b, &[o, r], device)?;
            let dyt = Tensor::from_f32(&dy, &[t, o], dtype, device)?;
            let weights = LoraWeights {
                w: &wt,
                a: &at,
                b: &bt,
            };
            let out = lora::forward(&xt, weights, &self.cfg)?;
            let g = lora::backward(&xt, &dyt, weights, &out.u, &self.cfg)?;
            Ok([
                out.y.to_f32_vec()?,
                out.u.to_f32_vec()?,
                g.dx.to_f32_vec()?,
                g.da.to_vec()?,
                g.db.to_vec()?,
            ])
        };
        let got = run(device, self.dtype).map_err(|e| e.to_string())?;
        let want = run(&Device::Cpu, DType::F32).map_err(|e| e.to_string())?;
        // The kernels round u, v and the adapter copies to 16 bits and store
        // y, dx in 16 bits: a few units of the format's rounding (2^-8 bf16,
        // 2^-11 f16) at each tensor's scale.
        let unit = rounding_unit(self.dtype);
        check_results(&["y", "u", "dx", "dA", "dB"], &got, &want, |_| 4.0 * unit)?;
        Ok(())
    }
}
