//! The LM head fused with cross-entropy: for h [tokens, hidden] and the head
//! W [vocab, hidden], loss_t = logsumexp(h_t Wᵀ) − (h_t Wᵀ)[label_t] over the
//! tokens whose label is not ignored (negative: transformers' −100), without
//! the fp32 logits of all tokens at once (Liger's fused linear cross-entropy).
//!
//! On the kernel devices the tokens go in chunks: for each, the fused LoRA
//! layer's tensor-core GEMM (`kernels/lora.cu`, fp32 output) writes the
//! logits chunk [chunk, vocab] = h_chunk Wᵀ, and `kernels/cross_entropy.cu`
//! reads it once, one block per row (online max and sum of exp, fp32),
//! writing each row's logsumexp and loss; the counted losses are summed on
//! the host in f64, in token order (deterministic). The chunk holds at most
//! [`DEFAULT_CHUNK_BYTES`] of fp32 logits ([`linear_cross_entropy_chunked`]
//! takes another budget). h and W are f16 or bf16 there (the GEMM runs on
//! tensor cores); f32 runs on [`Device::Cpu`].
//!
//! [`forward_logits`] is the row kernel alone, on logits the caller has.
//!
//! Host code: [`crate::host::cross_entropy`]. Reference: [`crate::cpu::cross_entropy`].

use super::{check_aligned, check_device, check_dtype, check_float, threads_for_row, to_i32};
use super::{lora, vectorizable};
use crate::cpu;
use crate::host;
use crate::kernels::params::{CrossEntropyGradParams, CrossEntropyRowsParams};
use crate::launch::LaunchConfig;
use crate::{DType, Device, Error, Result, Tensor};

/// Bytes of fp32 logits one chunk of tokens may hold on the kernel devices:
/// 2048 tokens at Llama's vocabulary of 32,000.
pub const DEFAULT_CHUNK_BYTES: usize = 256 << 20;

/// Threads per block of the row kernel (its `__launch_bounds__`).
const ROW_THREADS: u32 = 256;

/// Rows of the GEMM's tiles: chunks of at least this many tokens are a multiple of it.
const GEMM_TILE_ROWS: usize = 128;

/// What the fused head computes.
#[derive(Debug, Clone, PartialEq)]
pub struct CrossEntropy {
    /// Σ loss_t over the counted tokens (f64).
    pub loss_sum: f64,
    /// Tokens counted (labels ≥ 0).
    pub tokens: usize,
    /// logsumexp of every row's logits (the backward pass needs it).
    pub lse: Vec<f32>,
}

impl CrossEntropy {
    /// Mean loss over the counted tokens (NaN when none was counted).
    pub fn mean(&self) -> f64 {
        self.loss_sum / self.tokens as f64
    }
}

/// Cross-entropy of `labels` [tokens] under logits h Wᵀ, the fp32 logits
/// computed [`DEFAULT_CHUNK_BYTES`] at a time on the kernel devices.
pub fn linear_cross_entropy(h: &Tensor, w: &Tensor, labels: &[i32]) -> Result<CrossEntropy> {
    linear_cross_entropy_chunked(h, w, labels, DEFAULT_CHUNK_BYTES)
}

/// [`linear_cross_entropy`] with at most `chunk_bytes` of fp32 logits per
/// chunk of tokens on the kernel devices (at least one token per chunk;
/// chunks of 128 tokens or more are whole GEMM tiles). [`Device::Cpu`]'s
/// host code picks its own blocks. The result does not depend on the
/// chunking: every row is computed the same way in any chunk.
pub fn linear_cross_entropy_chunked(
    h: &Tensor,
    w: &Tensor,
    labels: &[i32],
    chunk_bytes: usize,
) -> Result<CrossEntropy> {
    Ok(fused_head(
        "cross_entropy::linear_cross_entropy",
        h,
        w,
        labels,
        chunk_bytes,
        None,
    )?
    .0)
}

/// The loss of [`linear_cross_entropy`] and its gradient dh (like h) for
/// L = `scale` · Σ loss_t: dh_t = scale · (softmax(h_t Wᵀ) − onehot(label_t)) W,
/// zero for ignored tokens. The loss is the end of the graph, so the
/// gradient is taken while each chunk's logits are at hand (Liger's fused
/// linear cross-entropy): no logits recomputed, none kept. On the kernel
/// devices each chunk's dlogits are rounded to h's dtype for the GEMM back
/// through the head (fp32 accumulation).
pub fn linear_cross_entropy_grad(
    h: &Tensor,
    w: &Tensor,
    labels: &[i32],
    scale: f32,
) -> Result<(CrossEntropy, Tensor)> {
    linear_cross_entropy_grad_chunked(h, w, labels, scale, DEFAULT_CHUNK_BYTES)
}

/// [`linear_cross_entropy_grad`] with at most `chunk_bytes` of fp32 logits
/// per chunk (see [`linear_cross_entropy_chunked`]).
pub fn linear_cross_entropy_grad_chunked(
    h: &Tensor,
    w: &Tensor,
    labels: &[i32],
    scale: f32,
    chunk_bytes: usize,
) -> Result<(CrossEntropy, Tensor)> {
    const OP: &str = "cross_entropy::linear_cross_entropy_grad";
    if !scale.is_finite() {
        return Err(Error::Invalid {
            op: OP,
            arg: "scale",
            what: format!("{scale} is not finite"),
        });
    }
    let (ce, dh) = fused_head(OP, h, w, labels, chunk_bytes, Some(scale))?;
    Ok((ce, dh.expect("asked for")))
}

/// The fused head: loss, and dh when `grad_scale` is given.
fn fused_head(
    op: &'static str,
    h: &Tensor,
    w: &Tensor,
    labels: &[i32],
    chunk_bytes: usize,
    grad_scale: Option<f32>,
) -> Result<(CrossEntropy, Option<Tensor>)> {
    check_float(op, "h", h)?;
    check_float(op, "w", w)?;
    check_device(op, "w", w, h.device())?;
    let hidden = *h.shape().last().unwrap_or(&0);
    let tokens = h.elem_count() / hidden.max(1);
    let &[vocab, w_hidden] = w.shape() else {
        return Err(Error::Shape {
            op,
            arg: "w",
            expected: format!("[vocab, {hidden}]"),
            got: w.shape().to_vec(),
        });
    };
    if w_hidden != hidden || vocab == 0 {
        return Err(Error::Shape {
            op,
            arg: "w",
            expected: format!("[vocab, {hidden}] with vocab >= 1"),
            got: w.shape().to_vec(),
        });
    }
    check_labels(op, labels, tokens, vocab)?;
    let device = h.device();
    if let Device::Cpu = device {
        let mut dh = match grad_scale {
            Some(_) => Some(Tensor::zeros(h.shape(), DType::F32, device)?),
            None => None,
        };
        let grad = match (&mut dh, grad_scale) {
            (Some(dh), Some(scale)) => Some(host::cross_entropy::Grad {
                scale,
                dh: host::view::f32s_mut(op, "dh", dh)?,
            }),
            _ => None,
        };
        let (loss_sum, tokens, lse) = host::cross_entropy::linear_cross_entropy(
            host::view::f32s(op, "h", h)?,
            host::view::weights(op, "w", w)?,
            labels,
            hidden,
            vocab,
            grad,
        );
        let ce = CrossEntropy {
            loss_sum,
            tokens,
            lse,
        };
        return Ok((ce, dh));
    }
    for (arg, t) in [("h", h), ("w", w)] {
        if !matches!(t.dtype(), DType::F16 | DType::BF16) {
            return Err(Error::DType {
                op,
                arg,
                expected: "f16 or bf16 (the head's GEMM runs on tensor cores, which have no f32 path here; f32 runs on Device::Cpu)".into(),
                got: t.dtype(),
            });
        }
    }
    check_dtype(op, "w", w, h.dtype())?;
    if hidden % 8 != 0 {
        return Err(Error::Invalid {
            op,
            arg: "h",
            what: format!("hidden size {hidden}: the kernels need a multiple of 8 (16-byte rows)"),
        });
    }
    for (arg, t) in [("h", h), ("w", w)] {
        if t.device_address() % 16 != 0 {
            return Err(Error::Invalid {
                op,
                arg,
                what: format!("address 0x{:x} is not 16-byte aligned", t.device_address()),
            });
        }
    }
    to_i32(op, "h", tokens)?;
    to_i32(op, "h", hidden)?;
    to_i32(op, "w", vocab)?;
    // Rows of the chunk 16-byte aligned: the row kernel's loads are 128-bit;
    // with the gradient, whole 8-element groups (the dlogits GEMM's K).
    let ld = match grad_scale {
        None => vocab.div_ceil(4) * 4,
        Some(_) => vocab.next_multiple_of(8),
    };
    let rows = chunk_rows(chunk_bytes, ld, tokens);
    let out = RowOutputs::new(labels, device)?;
    let dtype = h.dtype();
    let dh = match grad_scale {
        Some(_) => Some(Tensor::zeros(h.shape(), dtype, device)?),
        None => None,
    };
    if tokens == 0 {
        return Ok((out.finish(labels)?, dh));
    }
    let chunk = Tensor::zeros(&[rows, ld], DType::F32, device)?;
    // The backward GEMM runs over K = ld: the head with zero rows up to it.
    let grad_bufs = match grad_scale {
        Some(_) => Some((
            Tensor::zeros(&[rows, ld], dtype, device)?,
            padded_rows(w, ld)?,
        )),
        None => None,
    };
    let h_row_bytes = (hidden * dtype.size()) as u64;
    for start in (0..tokens).step_by(rows) {
        let n = rows.min(tokens - start);
        let h_at = h.device_address() + start as u64 * h_row_bytes;
        lora::gemm_raw(
            op,
            device,
            dtype,
            lora::RawGemm::NtF32Out,
            [h_at, w.device_address(), chunk.device_address()],
            [hidden, hidden, ld],
            [n, vocab, hidden],
        )?;
        out.launch_rows(
            op,
            device,
            DType::F32,
            chunk.device_address(),
            ld,
            true,
            start,
            n,
            vocab,
        )?;
        if let (Some((dlogits, head)), Some(scale), Some(dh)) = (&grad_bufs, grad_scale, &dh) {
            let head = head.as_ref().unwrap_or(w);
            out.launch_grad(
                op, device, dtype, &chunk, dlogits, ld, start, n, vocab, scale,
            )?;
            lora::gemm_raw(
                op,
                device,
                dtype,
                lora::RawGemm::Nn,
                [
                    dlogits.device_address(),
                    head.device_address(),
                    dh.device_address() + start as u64 * h_row_bytes,
                ],
                [ld, hidden, hidden],
                [n, hidden, ld],
            )?;
        }
    }
    Ok((out.finish(labels)?, dh))
}

/// `w` [vocab, hidden] with zero rows up to `rows`, or `None` when it has them already.
fn padded_rows(w: &Tensor, rows: usize) -> Result<Option<Tensor>> {
    let &[vocab, hidden] = w.shape() else {
        unreachable!("checked [vocab, hidden]")
    };
    if vocab == rows {
        return Ok(None);
    }
    let mut values = w.to_f32_vec()?;
    values.resize(rows * hidden, 0.0);
    Ok(Some(Tensor::from_f32(
        &values,
        &[rows, hidden],
        w.dtype(),
        w.device(),
    )?))
}

/// Cross-entropy of `labels` [rows] under given `logits` [rows, vocab]
/// (f32, f16 or bf16): the fused head's row kernel alone, one pass per row.
pub fn forward_logits(logits: &Tensor, labels: &[i32]) -> Result<CrossEntropy> {
    const OP: &str = "cross_entropy::forward_logits";
    check_float(OP, "logits", logits)?;
    let &[rows, vocab] = logits.shape() else {
        return Err(Error::Shape {
            op: OP,
            arg: "logits",
            expected: "[rows, vocab]".into(),
            got: logits.shape().to_vec(),
        });
    };
    if vocab == 0 {
        return Err(Error::Shape {
            op: OP,
            arg: "logits",
            expected: "[rows, vocab] with vocab >= 1".into(),
            got: logits.shape().to_vec(),
        });
    }
    check_labels(OP, labels, rows, vocab)?;
    check_aligned(OP, "logits", logits)?;
    let device = logits.device();
    if let Device::Cpu = device {
        let (loss_sum, tokens, lse) =
            cpu::cross_entropy::from_logits(&logits.to_f32_vec()?, labels, vocab);
        return Ok(CrossEntropy {
            loss_sum,
            tokens,
            lse,
        });
    }
    to_i32(OP, "logits", rows)?;
    to_i32(OP, "logits", vocab)?;
    let out = RowOutputs::new(labels, device)?;
    if rows > 0 {
        let vectorized = vectorizable(&[logits], vocab * logits.dtype().size());
        out.launch_rows(
            OP,
            device,
            logits.dtype(),
            logits.device_address(),
            vocab,
            vectorized,
            0,
            rows,
            vocab,
        )?;
    }
    out.finish(labels)
}

/// Checks labels [tokens]: one per token, each < vocab (negative: ignored).
fn check_labels(op: &'static str, labels: &[i32], tokens: usize, vocab: usize) -> Result<()> {
    if labels.len() != tokens {
        return Err(Error::Invalid {
            op,
            arg: "labels",
            what: format!("has {} labels for {tokens} tokens", labels.len()),
        });
    }
    if let Some((i, l)) = labels
        .iter()
        .enumerate()
        .find(|(_, &l)| l >= 0 && l as usize >= vocab)
    {
        return Err(Error::Invalid {
            op,
            arg: "labels",
            what: format!("labels[{i}] = {l} is not below the vocabulary size {vocab}"),
        });
    }
    Ok(())
}

/// Tokens per logits chunk: as many fp32 rows of `ld` as `chunk_bytes`
/// holds, whole GEMM tiles from 128 rows on, at least 1, at most `tokens`.
fn chunk_rows(chunk_bytes: usize, ld: usize, tokens: usize) -> usize {
    let rows = (chunk_bytes / (4 * ld)).max(1);
    let rows = if rows >= GEMM_TILE_ROWS {
        rows / GEMM_TILE_ROWS * GEMM_TILE_ROWS
    } else {
        rows
    };
    rows.min(tokens.max(1))
}

/// The row kernel's inputs and outputs on the device: labels, lse and loss [tokens].
struct RowOutputs {
    labels: Tensor,
    lse: Tensor,
    loss: Tensor,
}

impl RowOutputs {
    fn new(labels: &[i32], device: &Device) -> Result<RowOutputs> {
        let n = labels.len();
        Ok(RowOutputs {
            labels: Tensor::from_slice(labels, &[n], device)?,
            lse: Tensor::zeros(&[n], DType::F32, device)?,
            loss: Tensor::zeros(&[n], DType::F32, device)?,
        })
    }

    /// Launches the row kernel on logits rows `start .. start + rows` (at
    /// `logits`, row stride `ld` elements of `dtype`) into those rows of
    /// lse and loss.
    #[allow(clippy::too_many_arguments)]
    fn launch_rows(
        &self,
        op: &'static str,
        device: &Device,
        dtype: DType,
        logits: u64,
        ld: usize,
        vectorized: bool,
        start: usize,
        rows: usize,
        vocab: usize,
    ) -> Result<()> {
        let at = |t: &Tensor| t.device_address() + 4 * start as u64;
        let mut params = CrossEntropyRowsParams {
            logits: logits as *const _,
            labels: at(&self.labels) as *const i32,
            lse: at(&self.lse) as *mut f32,
            loss: at(&self.loss) as *mut f32,
            ld: ld as i64,
            rows: to_i32(op, "labels", rows)?,
            vocab: to_i32(op, "labels", vocab)?,
            vectorized: vectorized as i32,
            pad0: 0,
        };
        let per_access = if vectorized { 16 / dtype.size() } else { 1 };
        let cfg = LaunchConfig::linear(
            rows as u32,
            threads_for_row(vocab, per_access, ROW_THREADS),
            0,
        );
        device.launch(
            &format!("cross_entropy_rows_{}", dtype.kernel_suffix()),
            cfg,
            &mut params,
        )
    }

    /// Launches the gradient kernel on the fp32 `chunk` [rows, ld] whose
    /// rows are tokens `start ..`, into `grad` (same shape, `dtype`).
    #[allow(clippy::too_many_arguments)]
    fn launch_grad(
        &self,
        op: &'static str,
        device: &Device,
        dtype: DType,
        chunk: &Tensor,
        grad: &Tensor,
        ld: usize,
        start: usize,
        rows: usize,
        vocab: usize,
        scale: f32,
    ) -> Result<()> {
        let at = |t: &Tensor| t.device_address() + 4 * start as u64;
        let mut params = CrossEntropyGradParams {
            logits: chunk.device_address() as *const f32,
            lse: at(&self.lse) as *const f32,
            labels: at(&self.labels) as *const i32,
            grad: grad.device_address() as *mut _,
            ld: ld as i64,
            rows: to_i32(op, "labels", rows)?,
            vocab: to_i32(op, "labels", vocab)?,
            scale,
            pad0: 0,
        };
        let cfg = LaunchConfig::linear(rows as u32, threads_for_row(ld, 8, ROW_THREADS), 0);
        device.launch(
            &format!("cross_entropy_grad_{}", dtype.kernel_suffix()),
            cfg,
            &mut params,
        )
    }

    /// The per-row results back on the host, the counted losses summed in
    /// f64 in token order.
    fn finish(self, labels: &[i32]) -> Result<CrossEntropy> {
        let lse = self.lse.to_vec::<f32>()?;
        let loss = self.loss.to_vec::<f32>()?;
        let mut loss_sum = 0.0f64;
        let mut tokens = 0;
        for (&l, &label) in loss.iter().zip(labels) {
            if label >= 0 {
                loss_sum += l as f64;
                tokens += 1;
            }
        }
        Ok(CrossEntropy {
            loss_sum,
            tokens,
            lse,
        })
    }
}
