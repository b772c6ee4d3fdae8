//! One LoRA layer test case, run on a device and checked against the CPU
//! reference (shared by the emulated proptests and the GPU test).

use super::{check_results, round_to, rounding_unit, Measured, Rng};
use platypus::cpu::philox::Dropout;
use platypus::ops::lora::{self, LoraConfig, LoraWeights};
use platypus::{DType, Device, Tensor};
use rayon::prelude::*;

/// The case's random inputs, rounded to its dtype: x, W, A, B, dy.
struct LoraInputs {
    x: Vec<f32>,
    w: Vec<f32>,
    a: Vec<f32>,
    b: Vec<f32>,
    dy: Vec<f32>,
}

/// y, u, dx, dA, dB as f32 vectors.
type LoraResults = [Vec<f32>; 5];

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
    /// (rounded) inputs; returns each result's error.
    pub fn check_against_cpu(&self, device: &Device, seed: u64) -> Result<Vec<Measured>, String> {
        let inputs = self.inputs(seed);
        let got = self
            .run(&inputs, device, self.dtype)
            .map_err(|e| e.to_string())?;
        let want = self
            .run(&inputs, &Device::Cpu, DType::F32)
            .map_err(|e| e.to_string())?;
        check_results(&["y", "u", "dx", "dA", "dB"], &got, &want, |_| {
            self.allowed()
        })
    }

    /// The same check at model shapes, where the f64 reference of the whole
    /// layer would take minutes: the layer runs whole on `device`; y, u and
    /// dx are checked on the first and the last `block` tokens against the
    /// CPU op run on those rows alone (its dropout counter moved to them),
    /// and dA, dB over all tokens against an f64 sum (parallel).
    pub fn check_rows_against_cpu(
        &self,
        device: &Device,
        seed: u64,
        block: usize,
    ) -> Result<Vec<Measured>, String> {
        self.check_rows_with(device, seed, block, self)
    }

    /// [`Self::check_rows_against_cpu`] with the device running `runner`'s
    /// layer (same shapes) on this case's inputs: a test of the check.
    pub fn check_rows_with(
        &self,
        device: &Device,
        seed: u64,
        block: usize,
        runner: &LoraCase,
    ) -> Result<Vec<Measured>, String> {
        let (t, i, o, r) = (self.tokens, self.in_features, self.out_features, self.rank);
        let starts = [0, t - block];
        // Each block must start on a whole Philox counter (4 elements).
        assert!(
            2 * block <= t && (starts[1] * i) % 4 == 0,
            "blocks of whole Philox counters"
        );
        let inputs = self.inputs(seed);
        let results = runner.run(&inputs, device, self.dtype);
        let [y, u, dx, da, db] = results.map_err(|e| e.to_string())?;
        let blocks: Vec<LoraResults> = starts
            .par_iter()
            .map(|&t0| {
                let rows = |v: &[f32], width: usize| v[t0 * width..(t0 + block) * width].to_vec();
                let case = LoraCase {
                    tokens: block,
                    cfg: LoraConfig {
                        offset: self.cfg.offset + (t0 * i / 4) as u64,
                        ..self.cfg
                    },
                    ..self.clone()
                };
                let block_inputs = LoraInputs {
                    x: rows(&inputs.x, i),
                    dy: rows(&inputs.dy, o),
                    w: inputs.w.clone(),
                    a: inputs.a.clone(),
                    b: inputs.b.clone(),
                };
                case.run(&block_inputs, &Device::Cpu, DType::F32).unwrap()
            })
            .collect();
        let rows_of = |v: &[f32], width: usize| -> Vec<f32> {
            starts
                .iter()
                .flat_map(|&t0| v[t0 * width..(t0 + block) * width].iter().copied())
                .collect()
        };
        let cat = |k: usize| -> Vec<f32> { blocks.iter().flat_map(|b| b[k].clone()).collect() };
        let (want_da, want_db) = self.adapter_grads(&inputs);
        let r16 = r.div_ceil(16) * 16; // u is kept [tokens, r rounded up to 16]
        let got = [rows_of(&y, o), rows_of(&u, r16), rows_of(&dx, i), da, db];
        let want = [cat(0), cat(1), cat(2), want_da, want_db];
        check_results(&["y", "u", "dx", "dA", "dB"], &got, &want, |_| {
            self.allowed()
        })
    }

    /// The kernels round u, v and the adapter copies to 16 bits and store y,
    /// dx in 16 bits: a few units of the format's rounding (2^-8 bf16, 2^-11
    /// f16) at each tensor's scale.
    fn allowed(&self) -> f32 {
        4.0 * rounding_unit(self.dtype)
    }

    fn inputs(&self, seed: u64) -> LoraInputs {
        let (t, i, o, r) = (self.tokens, self.in_features, self.out_features, self.rank);
        let mut rng = Rng::new(seed);
        let x = round_to(&rng.normal_vec(t * i, 1.0), self.dtype);
        let w = round_to(&rng.normal_vec(o * i, 0.1), self.dtype);
        // A and B are fp32 masters, but the kernels multiply 16-bit copies:
        // values the dtype holds exactly make both sides multiply the same numbers.
        let a = round_to(&rng.normal_vec(r * i, 0.1), self.dtype);
        let b = round_to(&rng.normal_vec(o * r, 0.1), self.dtype);
        let dy = round_to(&rng.normal_vec(t * o, 1.0), self.dtype);
        LoraInputs { x, w, a, b, dy }
    }

    /// Forward and backward of the inputs on `device`, tensors in `dtype`.
    fn run(
        &self,
        inputs: &LoraInputs,
        device: &Device,
        dtype: DType,
    ) -> Result<LoraResults, platypus::Error> {
        let (i, o, r) = (self.in_features, self.out_features, self.rank);
        let t = inputs.x.len() / i;
        let xt = Tensor::from_f32(&inputs.x, &[t, i], dtype, device)?;
        let wt = Tensor::from_f32(&inputs.w, &[o, i], dtype, device)?;
        let at = Tensor::from_slice(&inputs.a, &[r, i], device)?;
        let bt = Tensor::from_slice(&inputs.b, &[o, r], device)?;
        let dyt = Tensor::from_f32(&inputs.dy, &[t, o], dtype, device)?;
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
    }

    /// dA = s vᵀ dropout(x) and dB = s dyᵀ u over all tokens in f64, with
    /// u = dropout(x) Aᵀ and v = dy B, summed over token chunks in parallel.
    fn adapter_grads(&self, inputs: &LoraInputs) -> (Vec<f32>, Vec<f32>) {
        let (t, i, o, r) = (self.tokens, self.in_features, self.out_features, self.rank);
        let dropout = Dropout {
            p: self.cfg.dropout,
            seed: self.cfg.seed,
            offset: self.cfg.offset,
        };
        let kept = 1.0 / (1.0 - self.cfg.dropout as f64);
        let zero = || (vec![0.0f64; r * i], vec![0.0f64; o * r]);
        let add = |(mut a, mut b): (Vec<f64>, Vec<f64>), (c, d): (Vec<f64>, Vec<f64>)| {
            a.iter_mut().zip(&c).for_each(|(x, y)| *x += y);
            b.iter_mut().zip(&d).for_each(|(x, y)| *x += y);
            (a, b)
        };
        let (da, db) = (0..t)
            .into_par_iter()
            .fold(zero, |(mut da, mut db), token| {
                let xd: Vec<f64> = (0..i)
                    .map(|c| {
                        let e = (token * i + c) as u64;
                        let keep = self.cfg.dropout == 0.0 || dropout.keep(e);
                        if keep {
                            inputs.x[token * i + c] as f64 * kept
                        } else {
                            0.0
                        }
                    })
                    .collect();
                let dy = &inputs.dy[token * o..][..o];
                for j in 0..r {
                    let u: f64 = xd
                        .iter()
                        .zip(&inputs.a[j * i..][..i])
                        .map(|(&x, &a)| x * a as f64)
                        .sum();
                    let v: f64 = (0..o)
                        .map(|k| dy[k] as f64 * inputs.b[k * r + j] as f64)
                        .sum();
                    da[j * i..][..i]
                        .iter_mut()
                        .zip(&xd)
                        .for_each(|(d, &x)| *d += v * x);
                    for (k, &g) in dy.iter().enumerate() {
                        db[k * r + j] += g as f64 * u;
                    }
                }
                (da, db)
            })
            .reduce(zero, add);
        let s = self.cfg.scale(r) as f64;
        let scaled = |v: Vec<f64>| v.into_iter().map(|x| (s * x) as f32).collect();
        (scaled(da), scaled(db))
    }
}
