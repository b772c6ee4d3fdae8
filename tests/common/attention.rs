//! One attention test case, run on a device and checked against the CPU
//! reference (shared by the emulated proptests and the GPU test).

use super::{check_results, round_to, rounding_unit, Measured, Rng};
use platypus::cpu;
use platypus::cpu::attention::SeqSpan;
use platypus::host::attention::KvDims;
use platypus::ops::attention::{self, AttentionConfig, Batch};
use platypus::{DType, Device, Tensor};
use rayon::prelude::*;

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
    /// (rounded) inputs; padding rows must be exactly zero. Returns each
    /// result's error.
    pub fn check_against_cpu(&self, device: &Device, seed: u64) -> Result<Vec<Measured>, String> {
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
            forward_backward([t(0)?, t(1)?, t(2)?, t(3)?], self.layout.batch(), &cfg)
        };
        let got = run(device, self.dtype).map_err(|e| e.to_string())?;
        let want = run(&Device::Cpu, DType::F32).map_err(|e| e.to_string())?;
        let unit = rounding_unit(self.dtype);
        let names = ["o", "lse", "dq", "dk", "dv"];
        let measured = check_results(&names, &got, &want, |name| attention_tolerance(name, unit))?;
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
        Ok(measured)
    }
}

/// A dense batch at model shapes ([batch, seq, heads, head_dim], seq in the
/// thousands), where the reference's full score matrices would not fit:
/// checked against an exact row-by-row reference instead.
#[derive(Debug, Clone)]
pub struct AttnModelCase {
    pub batch: usize,
    pub seq: usize,
    pub q_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub dtype: DType,
    pub causal: bool,
}

/// One query row's exact results.
struct RowReference {
    o: Vec<f64>,
    lse: f64,
    dq: Vec<f64>,
}

impl AttnModelCase {
    /// (batch, seq, q heads, kv heads, head dim).
    fn dims(&self) -> (usize, usize, usize, usize, usize) {
        (
            self.batch,
            self.seq,
            self.q_heads,
            self.kv_heads,
            self.head_dim,
        )
    }

    /// Key positions whose dK and dV are checked: the first, middle and last
    /// eight of each sequence.
    fn sampled_keys(&self) -> Vec<usize> {
        let s = self.seq;
        let mut keys: Vec<usize> = (0..8).chain(s / 2 - 4..s / 2 + 4).chain(s - 8..s).collect();
        keys.dedup();
        keys
    }

    /// Runs forward and backward on `device` and compares o, lse and dq in
    /// full, and dk, dv at [`Self::sampled_keys`], with an f64 reference
    /// computed one query row at a time (rows in parallel).
    pub fn check_against_reference(
        &self,
        device: &Device,
        seed: u64,
    ) -> Result<Vec<Measured>, String> {
        self.check_with(device, seed, self)
    }

    /// [`Self::check_against_reference`] with the device running `runner`'s
    /// masking (same shapes) on this case's inputs: a test of the check.
    pub fn check_with(
        &self,
        device: &Device,
        seed: u64,
        runner: &AttnModelCase,
    ) -> Result<Vec<Measured>, String> {
        let (b, s, h, kvh, d) = self.dims();
        let mut rng = Rng::new(seed);
        let mut gen = |heads: usize| round_to(&rng.normal_vec(b * s * heads * d, 1.0), self.dtype);
        let (q, k, v, dout) = (gen(h), gen(kvh), gen(kvh), gen(h));
        let cfg = AttentionConfig {
            causal: runner.causal,
            scale: None,
        };
        let run = || -> Result<[Vec<f32>; 5], platypus::Error> {
            let t = |x: &[f32], heads| Tensor::from_f32(x, &[b, s, heads, d], self.dtype, device);
            let inputs = [t(&q, h)?, t(&k, kvh)?, t(&v, kvh)?, t(&dout, h)?];
            forward_backward(inputs, Batch::Dense, &cfg)
        };
        let started = std::time::Instant::now();
        let [o, lse, dq, dk, dv] = run().map_err(|e| e.to_string())?;
        let device_s = started.elapsed().as_secs_f64();
        let keys = self.sampled_keys();
        let at_keys = |x: &[f32]| -> Vec<f32> {
            (0..b)
                .flat_map(|seq| keys.iter().map(move |&j| (seq * s + j) * kvh * d))
                .flat_map(|start| x[start..start + kvh * d].iter().copied())
                .collect()
        };
        let got = [o, lse, dq, at_keys(&dk), at_keys(&dv)];
        let want = self.reference(&q, &k, &v, &dout);
        eprintln!(
            "{self:?}: device {device_s:.1} s, reference {:.1} s",
            started.elapsed().as_secs_f64() - device_s
        );
        let unit = rounding_unit(self.dtype);
        check_results(&["o", "lse", "dq", "dk", "dv"], &got, &want, |name| {
            attention_tolerance(name, unit)
        })
    }

    /// The exact results for inputs q, k, v, dout: o, lse and dq in full,
    /// dk and dv at the sampled keys ([seq, key, kv head, head_dim]), one
    /// query row at a time in f64, the (sequence, head) pairs in parallel.
    fn reference(&self, q: &[f32], k: &[f32], v: &[f32], dout: &[f32]) -> [Vec<f32>; 5] {
        let (b, s, h, kvh, d) = self.dims();
        let keys = self.sampled_keys();
        let scale = 1.0 / (d as f64).sqrt();
        let group = h / kvh;
        // One task per (sequence, query head): its rows in order, and its
        // sums of dK, dV at the sampled keys.
        let tasks: Vec<(Vec<RowReference>, Vec<f64>, Vec<f64>)> = (0..b * h)
            .into_par_iter()
            .map(|task| {
                let (seq, head) = (task / h, task % h);
                let kv_head = head / group;
                let q_row = |i: usize| &q[((seq * s + i) * h + head) * d..][..d];
                let do_row = |i: usize| &dout[((seq * s + i) * h + head) * d..][..d];
                let kv_at = |j: usize| ((seq * s + j) * kvh + kv_head) * d;
                let mut dk_keys = vec![0.0f64; keys.len() * d];
                let mut dv_keys = vec![0.0f64; keys.len() * d];
                let mut scores = vec![0.0f64; s];
                let rows = (0..s)
                    .map(|i| {
                        let visible = if self.causal { i + 1 } else { s };
                        for (j, sc) in scores.iter_mut().enumerate().take(visible) {
                            *sc = scale * dot(q_row(i), &k[kv_at(j)..][..d]);
                        }
                        let max = scores[..visible]
                            .iter()
                            .cloned()
                            .fold(f64::NEG_INFINITY, f64::max);
                        let sum: f64 = scores[..visible].iter().map(|x| (x - max).exp()).sum();
                        let lse = max + sum.ln();
                        let mut o = vec![0.0f64; d];
                        for (j, sc) in scores.iter_mut().enumerate().take(visible) {
                            *sc = (*sc - lse).exp(); // now P[i][j]
                            axpy(&mut o, *sc, &v[kv_at(j)..][..d]);
                        }
                        // dP = dO Vᵀ, delta = rowsum(dO ∘ O), dS = P (dP - delta).
                        let delta = dot64(&o, do_row(i));
                        let mut dq = vec![0.0f64; d];
                        for (j, p) in scores.iter().enumerate().take(visible) {
                            let ds = p * (dot(do_row(i), &v[kv_at(j)..][..d]) - delta);
                            axpy(&mut dq, scale * ds, &k[kv_at(j)..][..d]);
                            if let Ok(n) = keys.binary_search(&j) {
                                axpy(&mut dk_keys[n * d..][..d], scale * ds, q_row(i));
                                axpy(&mut dv_keys[n * d..][..d], *p, do_row(i));
                            }
                        }
                        RowReference { o, lse, dq }
                    })
                    .collect();
                (rows, dk_keys, dv_keys)
            })
            .collect();
        // Gather the reference like the kernels' outputs.
        let (mut want_o, mut want_dq) = (vec![0.0f32; q.len()], vec![0.0f32; q.len()]);
        let mut want_lse = vec![0.0f32; h * b * s];
        let mut want_dk = vec![0.0f64; b * keys.len() * kvh * d];
        let mut want_dv = want_dk.clone();
        for (task, (rows, dk_keys, dv_keys)) in tasks.iter().enumerate() {
            let (seq, head) = (task / h, task % h);
            for (i, row) in rows.iter().enumerate() {
                let at = ((seq * s + i) * h + head) * d;
                copy_f64(&mut want_o[at..at + d], &row.o);
                copy_f64(&mut want_dq[at..at + d], &row.dq);
                want_lse[head * b * s + seq * s + i] = row.lse as f32;
            }
            for n in 0..keys.len() {
                let at = ((seq * keys.len() + n) * kvh + head / group) * d;
                axpy_f64(&mut want_dk[at..at + d], &dk_keys[n * d..][..d]);
                axpy_f64(&mut want_dv[at..at + d], &dv_keys[n * d..][..d]);
            }
        }
        let to_f32 = |x: Vec<f64>| x.into_iter().map(|v| v as f32).collect::<Vec<f32>>();
        [want_o, want_lse, want_dq, to_f32(want_dk), to_f32(want_dv)]
    }
}

/// Forward and backward of attention on `[q, k, v, dO]`: o, lse, dq, dk, dv
/// as f32 vectors.
fn forward_backward(
    [q, k, v, dout]: [Tensor; 4],
    batch: Batch<'_>,
    cfg: &AttentionConfig,
) -> Result<[Vec<f32>; 5], platypus::Error> {
    let fwd = attention::forward(&q, &k, &v, batch, cfg)?;
    let g = attention::backward(&q, &k, &v, &fwd, &dout, batch, cfg)?;
    Ok([
        fwd.o.to_f32_vec()?,
        fwd.lse.to_f32_vec()?,
        g.dq.to_f32_vec()?,
        g.dk.to_f32_vec()?,
        g.dv.to_f32_vec()?,
    ])
}

/// Allowed error of each attention result relative to its scale, with
/// `unit` the storage format's rounding: a plain 16-bit implementation
/// rounds every stored result and P before P V (measured over 300 cases:
/// o, dv <= 1.2 units, dq, dk <= 3.4); lse is fp32 throughout; dS = P (dP -
/// delta) cancels, and delta comes from the 16-bit o.
fn attention_tolerance(name: &str, unit: f32) -> f32 {
    match name {
        "lse" => 1e-5,
        "o" | "dv" => 3.0 * unit,
        _ => 8.0 * unit,
    }
}

/// Σ a·b in f64 over f32 rows, four partial sums (so it vectorizes).
fn dot(a: &[f32], b: &[f32]) -> f64 {
    let mut acc = [0.0f64; 4];
    for (x, y) in a.chunks_exact(4).zip(b.chunks_exact(4)) {
        for l in 0..4 {
            acc[l] += x[l] as f64 * y[l] as f64;
        }
    }
    let tail: f64 = a
        .chunks_exact(4)
        .remainder()
        .iter()
        .zip(b.chunks_exact(4).remainder())
        .map(|(&x, &y)| x as f64 * y as f64)
        .sum();
    acc.iter().sum::<f64>() + tail
}

/// Σ a·b with `a` in f64.
fn dot64(a: &[f64], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| x * y as f64).sum()
}

/// acc += alpha · x.
fn axpy(acc: &mut [f64], alpha: f64, x: &[f32]) {
    acc.iter_mut()
        .zip(x)
        .for_each(|(a, &v)| *a += alpha * v as f64);
}

/// acc += x.
fn axpy_f64(acc: &mut [f64], x: &[f64]) {
    acc.iter_mut().zip(x).for_each(|(a, &v)| *a += v);
}

/// dst = src rounded to f32.
fn copy_f64(dst: &mut [f32], src: &[f64]) {
    dst.iter_mut().zip(src).for_each(|(d, &v)| *d = v as f32);
}

/// Attention of `new` queries per sequence to a KV cache: the new keys and
/// values written with [`attention::write_cache`] at rows kv_len − new ..
/// kv_len of a cache of `capacity` rows, then [`attention::forward_cached`],
/// checked against [`platypus::cpu::attention::forward_kv`].
#[derive(Debug, Clone)]
pub struct CachedCase {
    pub batch: usize,
    pub new: usize,
    pub kv_len: usize,
    pub capacity: usize,
    pub q_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub dtype: DType,
    pub causal: bool,
}

impl CachedCase {
    /// Runs the case on `device` with random inputs from `seed`: the cache
    /// holds random earlier keys and values, and past kv_len large finite
    /// garbage (16× the values' scale, so a key read there would dominate
    /// its row's softmax). Checks that the written cache is the old one with
    /// exactly the new rows replaced, and o and lse against the reference on
    /// the same rounded inputs. Returns each result's error.
    pub fn check_against_cpu(&self, device: &Device, seed: u64) -> Result<Vec<Measured>, String> {
        let (b, t, n, cap) = (self.batch, self.new, self.kv_len, self.capacity);
        let (h, kvh, d) = (self.q_heads, self.kv_heads, self.head_dim);
        assert!(t <= n && n <= cap, "{self:?}");
        let mut rng = Rng::new(seed);
        let q = round_to(&rng.normal_vec(b * t * h * d, 1.0), self.dtype);
        let row = kvh * d;
        let cache = |rng: &mut Rng| {
            let mut c = rng.normal_vec(b * cap * row, 1.0);
            for (i, x) in c.iter_mut().enumerate() {
                if (i / row) % cap >= n {
                    *x *= 16.0;
                }
            }
            round_to(&c, self.dtype)
        };
        let (k_old, v_old) = (cache(&mut rng), cache(&mut rng));
        let k_new = round_to(&rng.normal_vec(b * t * row, 1.0), self.dtype);
        let v_new = round_to(&rng.normal_vec(b * t * row, 1.0), self.dtype);
        // The caches as write_cache must leave them.
        let written = |old: &[f32], new: &[f32]| {
            let mut c = old.to_vec();
            for s in 0..b {
                c[(s * cap + n - t) * row..][..t * row]
                    .copy_from_slice(&new[s * t * row..][..t * row]);
            }
            c
        };
        let (k_want, v_want) = (written(&k_old, &k_new), written(&v_old, &v_new));

        let cache_shape = [b, cap, kvh, d];
        let new_shape = [b, t, kvh, d];
        let tensor = |x: &[f32], shape: &[usize]| {
            Tensor::from_f32(x, shape, self.dtype, device).map_err(|e| e.to_string())
        };
        let (mut kc, mut vc) = (tensor(&k_old, &cache_shape)?, tensor(&v_old, &cache_shape)?);
        let err = |e: platypus::Error| e.to_string();
        attention::write_cache(&mut kc, &tensor(&k_new, &new_shape)?, n - t).map_err(err)?;
        attention::write_cache(&mut vc, &tensor(&v_new, &new_shape)?, n - t).map_err(err)?;
        for (name, got, want) in [("k_cache", &kc, &k_want), ("v_cache", &vc, &v_want)] {
            let got = got.to_f32_vec().map_err(err)?;
            if let Some(i) = (0..want.len()).find(|&i| got[i].to_bits() != want[i].to_bits()) {
                return Err(format!(
                    "{name}[{i}] = {} after write_cache, want {}",
                    got[i], want[i]
                ));
            }
        }
        let cfg = AttentionConfig {
            causal: self.causal,
            scale: None,
        };
        let out = attention::forward_cached(&tensor(&q, &[b, t, h, d])?, &kc, &vc, n, &cfg)
            .map_err(err)?;
        if out.o.shape() != [b, t, h, d] || out.lse.shape() != [h, b * t] {
            return Err(format!(
                "shapes o {:?}, lse {:?}",
                out.o.shape(),
                out.lse.shape()
            ));
        }
        let got = [
            out.o.to_f32_vec().map_err(err)?,
            out.lse.to_f32_vec().map_err(err)?,
        ];

        let dims = KvDims {
            q_tokens: b * t,
            kv_tokens: b * cap,
            q_heads: h,
            kv_heads: kvh,
            head_dim: d,
        };
        let spans = |len: usize, stride: usize| -> Vec<SeqSpan> {
            (0..b)
                .map(|s| SeqSpan {
                    start: s * stride,
                    len,
                })
                .collect()
        };
        let scale = 1.0 / (d as f32).sqrt();
        let (o, lse) = cpu::attention::forward_kv(
            &q,
            &k_want,
            &v_want,
            &dims,
            &spans(t, t),
            &spans(n, cap),
            scale,
            self.causal,
        );
        // f32 runs the host code against the f64 reference.
        let unit = if self.dtype == DType::F32 {
            1e-5
        } else {
            rounding_unit(self.dtype)
        };
        check_results(&["o", "lse"], &got, &[o, lse], |name| {
            attention_tolerance(name, unit)
        })
    }
}
