//! The crate's ops as candle custom ops (the `candle` feature), so that
//! candle's autograd (`backward()` on a loss) flows through them: RMSNorm,
//! RoPE, flash attention and the fused LoRA linear have forward and
//! backward; cosine top-k is a search (no gradient).
//!
//! On candle's CPU device the ops run this crate's fast CPU path
//! (`Device::Cpu`) on candle's own buffers, lent without a copy
//! ([`Tensor::with_borrowed`]); each result is copied once into candle
//! storage. Candle's CUDA device is refused with an error for now.

use std::sync::Mutex;

/// The candle these ops are built against (use it to get the same version).
pub use candle_core;

use candle_core::backend::BackendStorage as _;
use candle_core::{self as cc, CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Shape};

use crate::ops::attention::{self, AttentionConfig, AttentionOutput, Batch};
use crate::ops::lora::{self, LoraConfig, LoraWeights};
use crate::ops::rope::{self, RopeConfig};
use crate::ops::{cosine_topk, rmsnorm};
use crate::{DType, Device, Tensor};

/// This crate's error as a candle error.
fn err(e: crate::Error) -> cc::Error {
    cc::Error::wrap(e)
}

/// Lends the elements `layout` picks from `storage` (contiguous) to `f` as a
/// tensor on `Device::Cpu`, without copying them.
fn lend<R>(
    storage: &CpuStorage,
    layout: &Layout,
    f: impl FnOnce(&Tensor) -> cc::Result<R>,
) -> cc::Result<R> {
    let (start, end) = layout.contiguous_offsets().ok_or_else(|| {
        cc::Error::msg("platypus: a strided candle tensor (call .contiguous() first)")
    })?;
    let shape = layout.dims();
    let lent = match storage {
        CpuStorage::F32(v) => {
            Tensor::with_borrowed(&v[start..end], shape, &Device::Cpu, |t| Ok(f(t)))
        }
        CpuStorage::F16(v) => {
            Tensor::with_borrowed(&v[start..end], shape, &Device::Cpu, |t| Ok(f(t)))
        }
        CpuStorage::BF16(v) => {
            Tensor::with_borrowed(&v[start..end], shape, &Device::Cpu, |t| Ok(f(t)))
        }
        other => {
            return Err(cc::Error::msg(format!(
                "platypus: a candle tensor of {:?} (f32, f16 or bf16 only)",
                other.dtype()
            )))
        }
    };
    lent.map_err(err)?
}

/// [`lend`] for a whole candle tensor (made contiguous first).
fn lend_tensor<R>(t: &cc::Tensor, f: impl FnOnce(&Tensor) -> cc::Result<R>) -> cc::Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        cc::Storage::Cpu(s) => lend(s, layout, f),
        _ => Err(cc::Error::msg(
            "platypus: candle tensors on the CPU device only (candle's CUDA device is not wired yet)",
        )),
    }
}

/// A copy of `t` as candle CPU storage.
fn storage(t: &Tensor) -> cc::Result<(CpuStorage, Shape)> {
    let s = match t.dtype() {
        DType::F32 => CpuStorage::F32(t.to_vec().map_err(err)?),
        DType::F16 => CpuStorage::F16(t.to_vec().map_err(err)?),
        DType::BF16 => CpuStorage::BF16(t.to_vec().map_err(err)?),
        DType::U32 => CpuStorage::U32(t.to_vec().map_err(err)?),
        other => {
            return Err(cc::Error::msg(format!(
                "platypus: no candle form for {other}"
            )))
        }
    };
    Ok((s, Shape::from(t.shape().to_vec())))
}

/// A copy of `t` as a candle tensor on the CPU device, in `dtype`.
fn to_candle(t: &Tensor, dtype: cc::DType) -> cc::Result<cc::Tensor> {
    let (s, shape) = storage(t)?;
    let op = cc::op::BackpropOp::none();
    cc::Tensor::from_storage(cc::Storage::Cpu(s), shape, op, false).to_dtype(dtype)
}

/// y = x · rsqrt(mean(x²) + eps) · w over the last dim of `x`; gradients
/// for `x` and `w`.
pub fn rms_norm(x: &cc::Tensor, w: &cc::Tensor, eps: f32) -> cc::Result<cc::Tensor> {
    x.contiguous()?.apply_op2(&w.contiguous()?, RmsNorm { eps })
}

struct RmsNorm {
    eps: f32,
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "platypus-rms-norm"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        w: &CpuStorage,
        lw: &Layout,
    ) -> cc::Result<(CpuStorage, Shape)> {
        lend(x, lx, |x| {
            lend(w, lw, |w| {
                storage(&rmsnorm::forward(x, w, self.eps).map_err(err)?)
            })
        })
    }

    fn bwd(
        &self,
        x: &cc::Tensor,
        w: &cc::Tensor,
        _y: &cc::Tensor,
        dy: &cc::Tensor,
    ) -> cc::Result<(Option<cc::Tensor>, Option<cc::Tensor>)> {
        let grads = lend_tensor(x, |xt| {
            lend_tensor(w, |wt| {
                lend_tensor(dy, |dyt| {
                    rmsnorm::backward(xt, wt, dyt, self.eps, true).map_err(err)
                })
            })
        })?;
        let dw = grads.dw.as_ref().expect("asked for dw");
        Ok((
            Some(to_candle(&grads.dx, x.dtype())?),
            Some(to_candle(dw, w.dtype())?),
        ))
    }
}

/// Rotary embeddings of `x` [batch, seq, heads, head_dim] at `positions`
/// (one per token, row-major [batch, seq]); the gradient for `x` is the
/// rotation by minus the angle.
pub fn rope(x: &cc::Tensor, positions: &[i32], cfg: RopeConfig) -> cc::Result<cc::Tensor> {
    x.contiguous()?.apply_op1(Rope {
        positions: positions.to_vec(),
        cfg,
    })
}

struct Rope {
    positions: Vec<i32>,
    cfg: RopeConfig,
}

impl Rope {
    /// A rotated copy of `x` (by minus the angle when `inverse`).
    fn rotated(&self, x: &Tensor, inverse: bool) -> crate::Result<Tensor> {
        let mut q = x.try_clone()?;
        let (batch, seq, head_dim) = match *x.shape() {
            [b, s, _, d] => (b, s, d),
            _ => (0, 0, 0), // rope's own check names the shape
        };
        // No k heads: this op rotates one tensor.
        let mut k = Tensor::zeros(&[batch, seq, 0, head_dim], x.dtype(), &Device::Cpu)?;
        let positions = Tensor::from_slice(&self.positions, &[batch, seq], &Device::Cpu)?;
        if inverse {
            rope::backward(&mut q, &mut k, &positions, &self.cfg)?;
        } else {
            rope::forward(&mut q, &mut k, &positions, &self.cfg)?;
        }
        Ok(q)
    }
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "platypus-rope"
    }

    fn cpu_fwd(&self, x: &CpuStorage, lx: &Layout) -> cc::Result<(CpuStorage, Shape)> {
        lend(x, lx, |x| storage(&self.rotated(x, false).map_err(err)?))
    }

    fn bwd(
        &self,
        x: &cc::Tensor,
        _y: &cc::Tensor,
        dy: &cc::Tensor,
    ) -> cc::Result<Option<cc::Tensor>> {
        let dx = lend_tensor(dy, |dy| self.rotated(dy, true).map_err(err))?;
        Ok(Some(to_candle(&dx, x.dtype())?))
    }
}

/// Flash attention of q [batch, seq, q_heads, head_dim] over k, v [batch,
/// seq, kv_heads, head_dim] (grouped-query when kv_heads < q_heads), every
/// sequence `seq` long; gradients for q, k and v. The forward's logsumexp
/// is kept for the backward, as FlashAttention does.
pub fn attention(
    q: &cc::Tensor,
    k: &cc::Tensor,
    v: &cc::Tensor,
    cfg: AttentionConfig,
) -> cc::Result<cc::Tensor> {
    q.contiguous()?.apply_op3(
        &k.contiguous()?,
        &v.contiguous()?,
        Attention {
            cfg,
            lse: Mutex::new(None),
        },
    )
}

struct Attention {
    cfg: AttentionConfig,
    /// The forward's logsumexp, for the backward.
    lse: Mutex<Option<Tensor>>,
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "platypus-attention"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        lq: &Layout,
        k: &CpuStorage,
        lk: &Layout,
        v: &CpuStorage,
        lv: &Layout,
    ) -> cc::Result<(CpuStorage, Shape)> {
        let out = lend(q, lq, |q| {
            lend(k, lk, |k| {
                lend(v, lv, |v| {
                    attention::forward(q, k, v, Batch::Dense, &self.cfg).map_err(err)
                })
            })
        })?;
        *self.lse.lock().unwrap() = Some(out.lse);
        storage(&out.o)
    }

    fn bwd(
        &self,
        q: &cc::Tensor,
        k: &cc::Tensor,
        v: &cc::Tensor,
        o: &cc::Tensor,
        dout: &cc::Tensor,
    ) -> cc::Result<(Option<cc::Tensor>, Option<cc::Tensor>, Option<cc::Tensor>)> {
        let lse = self
            .lse
            .lock()
            .unwrap()
            .as_ref()
            .ok_or_else(|| cc::Error::msg("platypus-attention: backward before forward"))?
            .try_clone()
            .map_err(err)?;
        let fwd = AttentionOutput {
            o: lend_tensor(o, |o| o.try_clone().map_err(err))?,
            lse,
        };
        let g = lend_tensor(q, |qt| {
            lend_tensor(k, |kt| {
                lend_tensor(v, |vt| {
                    lend_tensor(dout, |dt| {
                        attention::backward(qt, kt, vt, &fwd, dt, Batch::Dense, &self.cfg)
                            .map_err(err)
                    })
                })
            })
        })?;
        Ok((
            Some(to_candle(&g.dq, q.dtype())?),
            Some(to_candle(&g.dk, k.dtype())?),
            Some(to_candle(&g.dv, v.dtype())?),
        ))
    }
}

/// The fused LoRA linear y = x Wᵀ + s · dropout(x) Aᵀ Bᵀ with `w` [out, in]
/// frozen (no gradient) and the trainable factors `a` [r, in], `b` [out, r]
/// (f32); gradients for x, a and b. The dropout mask is regenerated in
/// backward from `cfg`'s seed and offset.
pub fn lora_linear(
    x: &cc::Tensor,
    w: &cc::Tensor,
    a: &cc::Tensor,
    b: &cc::Tensor,
    cfg: LoraConfig,
) -> cc::Result<cc::Tensor> {
    x.contiguous()?.apply_op3(
        &a.contiguous()?,
        &b.contiguous()?,
        LoraLinear {
            w: w.contiguous()?.detach(),
            cfg,
            u: Mutex::new(None),
        },
    )
}

struct LoraLinear {
    /// The frozen base weight, lent to every call.
    w: cc::Tensor,
    cfg: LoraConfig,
    /// The forward's u = dropout(x) Aᵀ, for the backward.
    u: Mutex<Option<Tensor>>,
}

impl CustomOp3 for LoraLinear {
    fn name(&self) -> &'static str {
        "platypus-lora-linear"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        a: &CpuStorage,
        la: &Layout,
        b: &CpuStorage,
        lb: &Layout,
    ) -> cc::Result<(CpuStorage, Shape)> {
        let out = lend_tensor(&self.w, |w| {
            lend(x, lx, |x| {
                lend(a, la, |a| {
                    lend(b, lb, |b| {
                        lora::forward(x, LoraWeights { w, a, b }, &self.cfg).map_err(err)
                    })
                })
            })
        })?;
        *self.u.lock().unwrap() = Some(out.u);
        storage(&out.y)
    }

    fn bwd(
        &self,
        x: &cc::Tensor,
        a: &cc::Tensor,
        b: &cc::Tensor,
        _y: &cc::Tensor,
        dy: &cc::Tensor,
    ) -> cc::Result<(Option<cc::Tensor>, Option<cc::Tensor>, Option<cc::Tensor>)> {
        let u = self.u.lock().unwrap();
        let u = u
            .as_ref()
            .ok_or_else(|| cc::Error::msg("platypus-lora-linear: backward before forward"))?;
        let g = lend_tensor(&self.w, |w| {
            lend_tensor(x, |xt| {
                lend_tensor(a, |at| {
                    lend_tensor(b, |bt| {
                        lend_tensor(dy, |dyt| {
                            let weights = LoraWeights { w, a: at, b: bt };
                            lora::backward(xt, dyt, weights, u, &self.cfg).map_err(err)
                        })
                    })
                })
            })
        })?;
        Ok((
            Some(to_candle(&g.dx, x.dtype())?),
            Some(to_candle(&g.da, a.dtype())?),
            Some(to_candle(&g.db, b.dtype())?),
        ))
    }
}

/// The `k` most similar `database` rows of each query row by cosine
/// similarity: (scores [m, k] f32, indices [m, k] u32), best first, ties to
/// the lower index.
pub fn cosine_topk(
    queries: &cc::Tensor,
    database: &cc::Tensor,
    k: usize,
) -> cc::Result<(cc::Tensor, cc::Tensor)> {
    lend_tensor(queries, |q| {
        lend_tensor(database, |db| {
            let best = cosine_topk::topk(q, db, k).map_err(err)?;
            Ok((
                to_candle(&best.scores, cc::DType::F32)?,
                to_candle(&best.indices, cc::DType::U32)?,
            ))
        })
    })
}
