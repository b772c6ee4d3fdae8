//! Flash attention, forward and backward: softmax(scale · Q Kᵀ + mask) V
//! without the T × T matrix, on tensors laid out the way the q/k/v
//! projections produce them (token-major, no transposes).
//!
//! - q [batch, seq, q_heads, head_dim], k and v [batch, seq, kv_heads,
//!   head_dim] for [`Batch::Dense`] and [`Batch::Padded`]; [tokens, heads,
//!   head_dim] for [`Batch::Packed`]. kv_heads divides q_heads (grouped- and
//!   multi-query attention): query head h reads kv head h / (q_heads / kv_heads).
//! - head_dim 16, 32, 64 or 128 ([`HEAD_DIMS`]); f16 or bf16 on the GPU and
//!   the emulator (fp32 accumulation on tensor cores), also f32 and any head
//!   dim on [`Device::Cpu`].
//! - The logsumexp `lse` is [q_heads, tokens] fp32 (natural log), tokens =
//!   batch · seq for dense and padded batches.
//! - Padding rows (past a sequence's length in a padded batch) get zero
//!   outputs, logsumexp and gradients; a sequence of length 0 is legal.
//! - Backward is deterministic: no atomics, fixed summation order.
//! - Decoding: [`write_cache`] appends new keys and values to a KV cache
//!   [batch, capacity, kv_heads, head_dim], [`forward_cached`] attends new
//!   queries to its first `kv_len` rows (forward only).
//!
//! Kernels: `kernels/attention.cu`. CPU reference: [`crate::cpu::attention`].

use super::{
    check_aligned, check_aligned16, check_device, check_dtype, check_float, check_nonempty,
    check_shape, to_i32,
};
use crate::cpu;
use crate::cpu::attention::{AttentionDims, SeqSpan};
use crate::device::{DType, Device};
use crate::error::{Error, Result};
use crate::host;
use crate::host::attention::KvDims;
use crate::kernels::params::{AttentionParams, CacheWriteParams};
use crate::launch::LaunchConfig;
use crate::tensor::Tensor;

/// Head dims with a kernel.
pub const HEAD_DIMS: [usize; 4] = [16, 32, 64, 128];

/// Threads per block of every attention kernel (4 warps).
const THREADS: u32 = 128;
/// Query rows per forward block at head dim `d` (kernels/attention.cu: kFwdBlockM).
fn forward_rows(d: usize) -> usize {
    if d >= 128 {
        64
    } else {
        128
    }
}
/// Query rows per dQ block, keys per dK/dV block (kBlockM, kBlockN), keys
/// per forward tile (kFwdBlockN).
const BLOCK_ROWS: usize = 64;
/// Threads per block of the KV-cache write (kCacheThreads).
const CACHE_THREADS: u32 = 256;

/// How the sequences of a batch sit in q, k and v.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Batch<'a> {
    /// [batch, seq, heads, head_dim]; every sequence is `seq` tokens long.
    Dense,
    /// [batch, seq, heads, head_dim]; sequence b is its first `lens[b]` tokens
    /// (right padding), `lens.len() == batch`.
    Padded(&'a [u32]),
    /// [tokens, heads, head_dim]; sequence b is tokens `cu_seqlens[b] ..
    /// cu_seqlens[b + 1]`: starts at 0, never decreases, ends at `tokens`.
    Packed(&'a [u32]),
}

/// Masking and scale.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct AttentionConfig {
    /// Query i sees keys j <= i of its sequence (decoder self-attention).
    pub causal: bool,
    /// Softmax scale; `None` means 1 / sqrt(head_dim).
    pub scale: Option<f32>,
}

/// What the forward pass returns.
#[derive(Debug)]
pub struct AttentionOutput {
    /// Like q.
    pub o: Tensor,
    /// [q_heads, tokens] fp32: natural-log logsumexp of each scaled, masked
    /// score row; the backward pass needs it.
    pub lse: Tensor,
}

/// Gradients with respect to q, k and v (dk, dv summed over the query heads
/// sharing a kv head).
#[derive(Debug)]
pub struct AttentionGrads {
    /// Like q.
    pub dq: Tensor,
    /// Like k.
    pub dk: Tensor,
    /// Like v.
    pub dv: Tensor,
}

/// Attention forward.
pub fn forward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    batch: Batch<'_>,
    cfg: &AttentionConfig,
) -> Result<AttentionOutput> {
    const OP: &str = "attention::forward";
    let pb = Problem::check(OP, q, k, v, batch, cfg)?;
    let device = q.device().clone();
    if let (Device::Cpu, DType::F32) = (&device, q.dtype()) {
        let dims = pb.dims.kv();
        return host_forward(
            OP, q, k, v, &dims, &pb.spans, &pb.spans, pb.scale, cfg.causal,
        );
    }
    if let Device::Cpu = device {
        let (o, lse) = cpu::attention::forward(
            &q.to_f32_vec()?,
            &k.to_f32_vec()?,
            &v.to_f32_vec()?,
            &pb.dims,
            &pb.spans,
            pb.scale,
            cfg.causal,
        );
        return Ok(AttentionOutput {
            o: Tensor::from_f32(&o, q.shape(), q.dtype(), &device)?,
            lse: Tensor::from_slice(&lse, &pb.lse_shape(), &device)?,
        });
    }
    let o = Tensor::zeros(q.shape(), q.dtype(), &device)?;
    let lse = Tensor::zeros(&pb.lse_shape(), DType::F32, &device)?;
    let lengths = pb.lengths_on(&device)?;
    let mut params = pb.params(OP, q, k, v, lengths.as_ref())?;
    params.out = o.device_address() as *mut _;
    params.lse = lse.device_address() as *mut f32;
    let grid = pb.grid(OP, forward_rows(pb.dims.head_dim), pb.dims.q_heads)?;
    let cfg_launch = pb.launch(grid, forward_smem(pb.dims.head_dim));
    device.launch(
        &pb.kernel("attention_forward", q, cfg),
        cfg_launch,
        &mut params,
    )?;
    Ok(AttentionOutput { o, lse })
}

/// Attention of new queries to a KV cache, as decoding needs it: q [batch,
/// new, q_heads, head_dim] against the first `kv_len` rows of k_cache and
/// v_cache [batch, capacity, kv_heads, head_dim] (the new tokens' keys
/// already written there, see [`write_cache`]), the causal mask aligned to
/// the end (query i of the `new` sees keys j ≤ i + kv_len − new), as
/// FlashAttention-2 has it. Rows past `kv_len` are never read. Returns o
/// like q and lse [q_heads, batch · new].
///
/// Runs on the forward kernel (f16, bf16, [`HEAD_DIMS`]) on the GPU and the
/// emulator; on [`Device::Cpu`], f32 on the host code and f16/bf16 on the
/// reference [`crate::cpu::attention::forward_kv`].
pub fn forward_cached(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    kv_len: usize,
    cfg: &AttentionConfig,
) -> Result<AttentionOutput> {
    const OP: &str = "attention::forward_cached";
    check_float(OP, "q", q)?;
    check_nonempty(OP, "q", q)?;
    let device = q.device().clone();
    let &[b, t, q_heads, d] = q.shape() else {
        return Err(Error::Shape {
            op: OP,
            arg: "q",
            expected: "[batch, new, q_heads, head_dim]".into(),
            got: q.shape().to_vec(),
        });
    };
    check_kernel_input(OP, q, d)?;
    let kv_heads = k_cache.shape().get(2).copied().unwrap_or(0);
    let capacity = k_cache.shape().get(1).copied().unwrap_or(0);
    for (arg, c) in [("k_cache", k_cache), ("v_cache", v_cache)] {
        check_shape(OP, arg, c, &[b, capacity, kv_heads, d])?;
        check_dtype(OP, arg, c, q.dtype())?;
        check_device(OP, arg, c, &device)?;
    }
    if kv_heads == 0 || q_heads % kv_heads != 0 {
        return Err(Error::Invalid {
            op: OP,
            arg: "k_cache",
            what: format!("{kv_heads} kv heads do not divide the {q_heads} query heads"),
        });
    }
    if kv_len < t || kv_len > capacity {
        return Err(Error::Invalid {
            op: OP,
            arg: "kv_len",
            what: format!("{kv_len} is not between the {t} new tokens and the capacity {capacity}"),
        });
    }
    let scale = check_scale(OP, cfg, d)?;
    let dims = KvDims {
        q_tokens: b * t,
        kv_tokens: b * capacity,
        q_heads,
        kv_heads,
        head_dim: d,
    };
    let q_spans: Vec<SeqSpan> = (0..b)
        .map(|i| SeqSpan {
            start: i * t,
            len: t,
        })
        .collect();
    let kv_spans: Vec<SeqSpan> = (0..b)
        .map(|i| SeqSpan {
            start: i * capacity,
            len: kv_len,
        })
        .collect();
    let lse_shape = [q_heads, b * t];
    match (&device, q.dtype()) {
        (Device::Cpu, DType::F32) => {
            return host_forward(
                OP, q, k_cache, v_cache, &dims, &q_spans, &kv_spans, scale, cfg.causal,
            )
        }
        (Device::Cpu, _) => {
            let (o, lse) = cpu::attention::forward_kv(
                &q.to_f32_vec()?,
                &k_cache.to_f32_vec()?,
                &v_cache.to_f32_vec()?,
                &dims,
                &q_spans,
                &kv_spans,
                scale,
                cfg.causal,
            );
            return Ok(AttentionOutput {
                o: Tensor::from_f32(&o, q.shape(), q.dtype(), &device)?,
                lse: Tensor::from_slice(&lse, &lse_shape, &device)?,
            });
        }
        _ => {}
    }
    check_aligned16(OP, &[("q", q), ("k_cache", k_cache), ("v_cache", v_cache)])?;
    // Every index the kernel forms stays in i32.
    to_i32(OP, "q", b * t * q_heads * d)?;
    to_i32(OP, "k_cache", b * capacity * kv_heads * d)?;
    let o = Tensor::zeros(q.shape(), q.dtype(), &device)?;
    let lse = Tensor::zeros(&lse_shape, DType::F32, &device)?;
    let mut params = AttentionParams {
        q: q.device_address() as *const _,
        k: k_cache.device_address() as *const _,
        v: v_cache.device_address() as *const _,
        o: std::ptr::null(),
        dout: std::ptr::null(),
        out: o.device_address() as *mut _,
        lse: lse.device_address() as *mut f32,
        delta: std::ptr::null_mut(),
        dq: std::ptr::null_mut(),
        dk: std::ptr::null_mut(),
        dv: std::ptr::null_mut(),
        cu_seqlens: std::ptr::null(),
        seq_lens: std::ptr::null(),
        batch: to_i32(OP, "q", b)?,
        max_seqlen: to_i32(OP, "q", t)?,
        tokens: to_i32(OP, "q", b * t)?,
        q_heads: to_i32(OP, "q", q_heads)?,
        kv_heads: to_i32(OP, "k_cache", kv_heads)?,
        scale,
        kv_seq_stride: to_i32(OP, "k_cache", capacity)?,
        kv_len: to_i32(OP, "kv_len", kv_len)?,
    };
    let grid = grid(OP, t.div_ceil(forward_rows(d)), q_heads, b)?;
    let launch = LaunchConfig {
        grid,
        block: [THREADS, 1, 1],
        shared_bytes: forward_smem(d),
    };
    device.launch(
        &kernel_name("attention_forward", q.dtype(), d, cfg),
        launch,
        &mut params,
    )?;
    Ok(AttentionOutput { o, lse })
}

/// The host attention on f32 CPU tensors.
#[allow(clippy::too_many_arguments)]
fn host_forward(
    op: &'static str,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    dims: &KvDims,
    q_spans: &[SeqSpan],
    kv_spans: &[SeqSpan],
    scale: f32,
    causal: bool,
) -> Result<AttentionOutput> {
    let mut o = Tensor::zeros(q.shape(), DType::F32, q.device())?;
    let mut lse = Tensor::zeros(&[dims.q_heads, dims.q_tokens], DType::F32, q.device())?;
    host::attention::attention_forward(
        host::view::f32s(op, "q", q)?,
        host::view::f32s(op, "k", k)?,
        host::view::f32s(op, "v", v)?,
        dims,
        q_spans,
        kv_spans,
        scale,
        causal,
        host::view::f32s_mut(op, "o", &mut o)?,
        host::view::f32s_mut(op, "lse", &mut lse)?,
    );
    Ok(AttentionOutput { o, lse })
}

/// The host attention backward on f32 CPU tensors.
#[allow(clippy::too_many_arguments)]
fn host_backward(
    op: &'static str,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    fwd: &AttentionOutput,
    dout: &Tensor,
    pb: &Problem,
    causal: bool,
) -> Result<AttentionGrads> {
    let mut dq = Tensor::zeros(q.shape(), DType::F32, q.device())?;
    let mut dk = Tensor::zeros(k.shape(), DType::F32, q.device())?;
    let mut dv = Tensor::zeros(v.shape(), DType::F32, q.device())?;
    host::attention::attention_backward(
        host::view::f32s(op, "q", q)?,
        host::view::f32s(op, "k", k)?,
        host::view::f32s(op, "v", v)?,
        host::view::f32s(op, "fwd.o", &fwd.o)?,
        host::view::f32s(op, "dout", dout)?,
        host::view::f32s(op, "fwd.lse", &fwd.lse)?,
        &pb.dims.kv(),
        &pb.spans,
        pb.scale,
        causal,
        (
            host::view::f32s_mut(op, "dq", &mut dq)?,
            host::view::f32s_mut(op, "dk", &mut dk)?,
            host::view::f32s_mut(op, "dv", &mut dv)?,
        ),
    );
    Ok(AttentionGrads { dq, dk, dv })
}

/// Writes `new` [batch, t, kv_heads, head_dim] into rows `start .. start + t`
/// of `cache` [batch, capacity, kv_heads, head_dim], any dtype. On the GPU
/// and the emulator a copy kernel does it (in stream order, like the
/// attention that reads the cache next), on [`Device::Cpu`] a host copy.
pub fn write_cache(cache: &mut Tensor, new: &Tensor, start: usize) -> Result<()> {
    const OP: &str = "attention::write_cache";
    let &[b, t, h, d] = new.shape() else {
        return Err(Error::Shape {
            op: OP,
            arg: "new",
            expected: "[batch, new, kv_heads, head_dim]".into(),
            got: new.shape().to_vec(),
        });
    };
    let capacity = cache.shape().get(1).copied().unwrap_or(0);
    check_shape(OP, "cache", cache, &[b, capacity, h, d])?;
    check_dtype(OP, "new", new, cache.dtype())?;
    check_device(OP, "new", new, cache.device())?;
    if start + t > capacity {
        return Err(Error::Invalid {
            op: OP,
            arg: "start",
            what: format!("{start} + {t} new rows pass the capacity {capacity}"),
        });
    }
    let row = h * d * new.dtype().size();
    if let Device::Cpu = new.device() {
        let (Some(src), Some(dst)) = (new.host_bytes(), cache.host_bytes_mut()) else {
            unreachable!("CPU tensors live in host memory");
        };
        for i in 0..b {
            dst[(i * capacity + start) * row..][..t * row]
                .copy_from_slice(&src[i * t * row..][..t * row]);
        }
        return Ok(());
    }
    check_aligned(OP, "new", new)?;
    check_aligned(OP, "cache", cache)?;
    if b * t * row == 0 {
        return Ok(());
    }
    // The widest unit that divides the rows and both addresses (every dtype
    // is at least 2 bytes, and the addresses are aligned to it).
    let aligned = |unit: usize| {
        row % unit == 0
            && new.device_address() % unit as u64 == 0
            && cache.device_address() % unit as u64 == 0
    };
    let unit = [16, 4, 2]
        .into_iter()
        .find(|&u| aligned(u))
        .expect("2-byte aligned rows");
    let units = t * row / unit;
    let mut params = CacheWriteParams {
        src: new.device_address() as *const _,
        dst: cache.device_address() as *mut _,
        units: units as i64,
        dst_seq_units: (capacity * row / unit) as i64,
        dst_offset_units: (start * row / unit) as i64,
    };
    let blocks = units.div_ceil(CACHE_THREADS as usize);
    let launch = LaunchConfig {
        grid: [
            to_u32(OP, "new", blocks)?,
            limit(OP, "new", "sequences", b)?,
            1,
        ],
        block: [CACHE_THREADS, 1, 1],
        shared_bytes: 0,
    };
    new.device().launch(
        &format!("attention_write_cache_{unit}b"),
        launch,
        &mut params,
    )
}

/// Attention backward: gradients for upstream `dout` (like q), given the
/// forward pass's output `fwd`.
pub fn backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    fwd: &AttentionOutput,
    dout: &Tensor,
    batch: Batch<'_>,
    cfg: &AttentionConfig,
) -> Result<AttentionGrads> {
    const OP: &str = "attention::backward";
    let pb = Problem::check(OP, q, k, v, batch, cfg)?;
    for (arg, t) in [("fwd.o", &fwd.o), ("dout", dout)] {
        check_shape(OP, arg, t, q.shape())?;
        check_dtype(OP, arg, t, q.dtype())?;
        check_device(OP, arg, t, q.device())?;
        check_aligned16(OP, &[(arg, t)])?;
    }
    check_shape(OP, "fwd.lse", &fwd.lse, &pb.lse_shape())?;
    check_dtype(OP, "fwd.lse", &fwd.lse, DType::F32)?;
    check_device(OP, "fwd.lse", &fwd.lse, q.device())?;
    let device = q.device().clone();
    if let (Device::Cpu, DType::F32) = (&device, q.dtype()) {
        return host_backward(OP, q, k, v, fwd, dout, &pb, cfg.causal);
    }
    if let Device::Cpu = device {
        let (dq, dk, dv) = cpu::attention::backward(
            &q.to_f32_vec()?,
            &k.to_f32_vec()?,
            &v.to_f32_vec()?,
            &dout.to_f32_vec()?,
            &pb.dims,
            &pb.spans,
            pb.scale,
            cfg.causal,
        );
        return Ok(AttentionGrads {
            dq: Tensor::from_f32(&dq, q.shape(), q.dtype(), &device)?,
            dk: Tensor::from_f32(&dk, k.shape(), k.dtype(), &device)?,
            dv: Tensor::from_f32(&dv, v.shape(), v.dtype(), &device)?,
        });
    }
    let grads = AttentionGrads {
        dq: Tensor::zeros(q.shape(), q.dtype(), &device)?,
        dk: Tensor::zeros(k.shape(), k.dtype(), &device)?,
        dv: Tensor::zeros(v.shape(), v.dtype(), &device)?,
    };
    let delta = Tensor::zeros(&pb.lse_shape(), DType::F32, &device)?;
    let lengths = pb.lengths_on(&device)?;
    let mut params = pb.params(OP, q, k, v, lengths.as_ref())?;
    params.o = fwd.o.device_address() as *const _;
    params.dout = dout.device_address() as *const _;
    params.lse = fwd.lse.device_address() as *mut f32;
    params.delta = delta.device_address() as *mut f32;
    params.dq = grads.dq.device_address() as *mut _;
    params.dk = grads.dk.device_address() as *mut _;
    params.dv = grads.dv.device_address() as *mut _;

    let d = pb.dims.head_dim;
    let rows_per_block = THREADS as usize / (d / 8);
    let delta_blocks = (pb.dims.tokens * pb.dims.q_heads).div_ceil(rows_per_block);
    let delta_kernel = format!(
        "attention_backward_delta_{}_d{d}",
        q.dtype().kernel_suffix()
    );
    let delta_cfg = LaunchConfig::linear(to_u32(OP, "q", delta_blocks)?, THREADS, 0);
    device.launch(&delta_kernel, delta_cfg, &mut params)?;

    let dkdv_cfg = pb.launch(pb.grid(OP, BLOCK_ROWS, pb.dims.kv_heads)?, dkdv_smem(d));
    device.launch(
        &pb.kernel("attention_backward_dkdv", q, cfg),
        dkdv_cfg,
        &mut params,
    )?;
    let dq_cfg = pb.launch(pb.grid(OP, BLOCK_ROWS, pb.dims.q_heads)?, dq_smem(d));
    device.launch(
        &pb.kernel("attention_backward_dq", q, cfg),
        dq_cfg,
        &mut params,
    )?;
    Ok(grads)
}

/// Every attention kernel with its launch shape: (name, threads per block,
/// dynamic shared memory bytes), for occupancy reports.
pub fn kernel_launch_shapes() -> Vec<(String, u32, u32)> {
    let mut shapes: Vec<(String, u32, u32)> = [16, 4, 2]
        .iter()
        .map(|unit| (format!("attention_write_cache_{unit}b"), CACHE_THREADS, 0))
        .collect();
    for dtype in ["bf16", "f16"] {
        for d in HEAD_DIMS {
            shapes.push((format!("attention_backward_delta_{dtype}_d{d}"), THREADS, 0));
            for causal in ["", "_causal"] {
                for (base, smem) in [
                    ("attention_forward", forward_smem(d)),
                    ("attention_backward_dq", dq_smem(d)),
                    ("attention_backward_dkdv", dkdv_smem(d)),
                ] {
                    shapes.push((format!("{base}_{dtype}_d{d}{causal}"), THREADS, smem));
                }
            }
        }
    }
    shapes
}

/// Dynamic shared memory of the forward kernel: a Q tile, two K and two V
/// tiles of 64 keys.
fn forward_smem(d: usize) -> u32 {
    ((forward_rows(d) + 4 * BLOCK_ROWS) * d * 2) as u32
}

/// Dynamic shared memory of the dQ kernel: Q, dO, two K and two V tiles
/// (64 keys, 32 at head dim 128).
fn dq_smem(d: usize) -> u32 {
    let keys = if d >= 128 { 32 } else { 64 };
    ((2 * BLOCK_ROWS + 4 * keys) * d * 2) as u32
}

/// Dynamic shared memory of the dK/dV kernel: K, V, two Q and two dO tiles
/// of `step` rows, two lse and two delta rows (kernels/attention.cu's
/// dkdv_smem_bytes).
fn dkdv_smem(d: usize) -> u32 {
    let step = if d >= 128 { 32 } else { 64 };
    ((2 * BLOCK_ROWS + 4 * step) * d * 2 + 4 * step * 4) as u32
}

/// A checked attention call: sizes, sequences and scale.
struct Problem {
    dims: AttentionDims,
    spans: Vec<SeqSpan>,
    /// Padded length (dense, padded) or longest sequence (packed).
    max_seqlen: usize,
    scale: f32,
    /// The lengths the kernels read: per-sequence lengths or cumulative offsets.
    lengths: Lengths,
}

enum Lengths {
    All,
    PerSequence(Vec<i32>),
    Cumulative(Vec<i32>),
}

impl Problem {
    fn check(
        op: &'static str,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        batch: Batch<'_>,
        cfg: &AttentionConfig,
    ) -> Result<Problem> {
        check_float(op, "q", q)?;
        check_nonempty(op, "q", q)?;
        let device = q.device();
        let packed = matches!(batch, Batch::Packed(_));
        let (lead, q_heads, head_dim) = match (packed, q.shape()) {
            (false, &[b, t, h, d]) => (vec![b, t], h, d),
            (true, &[n, h, d]) => (vec![n], h, d),
            _ => {
                return Err(Error::Shape {
                    op,
                    arg: "q",
                    expected: if packed {
                        "[tokens, q_heads, head_dim]"
                    } else {
                        "[batch, seq, q_heads, head_dim]"
                    }
                    .into(),
                    got: q.shape().to_vec(),
                })
            }
        };
        check_kernel_input(op, q, head_dim)?;
        let kv_heads = k.shape().get(lead.len()).copied().unwrap_or(0);
        let mut kv_shape = lead.clone();
        kv_shape.extend([kv_heads, head_dim]);
        for (arg, t) in [("k", k), ("v", v)] {
            check_shape(op, arg, t, &kv_shape)?;
            check_dtype(op, arg, t, q.dtype())?;
            check_device(op, arg, t, device)?;
        }
        if kv_heads == 0 || q_heads % kv_heads != 0 {
            return Err(Error::Invalid {
                op,
                arg: "k",
                what: format!("{kv_heads} kv heads do not divide the {q_heads} query heads"),
            });
        }
        if !matches!(device, Device::Cpu) {
            check_aligned16(op, &[("q", q), ("k", k), ("v", v)])?;
        }
        let scale = check_scale(op, cfg, head_dim)?;
        let tokens = lead.iter().product::<usize>();
        let (spans, max_seqlen, lengths) = match batch {
            Batch::Dense => {
                let (b, t) = (lead[0], lead[1]);
                let spans = (0..b)
                    .map(|i| SeqSpan {
                        start: i * t,
                        len: t,
                    })
                    .collect();
                (spans, t, Lengths::All)
            }
            Batch::Padded(lens) => {
                let (b, t) = (lead[0], lead[1]);
                if lens.len() != b {
                    return Err(Error::Invalid {
                        op,
                        arg: "batch",
                        what: format!("{} sequence lengths for a batch of {b}", lens.len()),
                    });
                }
                if let Some((i, &l)) = lens.iter().enumerate().find(|(_, &l)| l as usize > t) {
                    return Err(Error::Invalid {
                        op,
                        arg: "batch",
                        what: format!("sequence {i} has length {l}, beyond the padded length {t}"),
                    });
                }
                let spans = lens
                    .iter()
                    .enumerate()
                    .map(|(i, &l)| SeqSpan {
                        start: i * t,
                        len: l as usize,
                    })
                    .collect();
                let lens = lens.iter().map(|&l| l as i32).collect();
                (spans, t, Lengths::PerSequence(lens))
            }
            Batch::Packed(cu) => {
                let bad = |what: String| Error::Invalid {
                    op,
                    arg: "batch",
                    what,
                };
                if cu.len() < 2 || cu[0] != 0 {
                    return Err(bad(format!(
                        "cu_seqlens {cu:?} must start at 0 and hold batch + 1 >= 2 offsets"
                    )));
                }
                if let Some(i) = (1..cu.len()).find(|&i| cu[i] < cu[i - 1]) {
                    return Err(bad(format!(
                        "cu_seqlens decreases at index {i}: {} after {}",
                        cu[i],
                        cu[i - 1]
                    )));
                }
                let last = *cu.last().unwrap_or(&0) as usize;
                if last != tokens {
                    return Err(bad(format!(
                        "cu_seqlens ends at {last}, but q has {tokens} tokens"
                    )));
                }
                let spans: Vec<SeqSpan> = cu
                    .windows(2)
                    .map(|w| SeqSpan {
                        start: w[0] as usize,
                        len: (w[1] - w[0]) as usize,
                    })
                    .collect();
                let max = spans.iter().map(|s| s.len).max().unwrap_or(0);
                let cu = cu.iter().map(|&c| c as i32).collect();
                (spans, max, Lengths::Cumulative(cu))
            }
        };
        // Every index the kernels form stays in i32.
        to_i32(op, "q", tokens * q_heads * head_dim)?;
        Ok(Problem {
            dims: AttentionDims {
                tokens,
                q_heads,
                kv_heads,
                head_dim,
            },
            spans,
            max_seqlen,
            scale,
            lengths,
        })
    }

    fn lse_shape(&self) -> [usize; 2] {
        [self.dims.q_heads, self.dims.tokens]
    }

    /// The sequence lengths as an i32 tensor on `device`, if the batch has any.
    fn lengths_on(&self, device: &Device) -> Result<Option<Tensor>> {
        match &self.lengths {
            Lengths::All => Ok(None),
            Lengths::PerSequence(v) | Lengths::Cumulative(v) => {
                Tensor::from_slice(v, &[v.len()], device).map(Some)
            }
        }
    }

    /// Kernel parameters with the inputs and sequences filled in.
    fn params(
        &self,
        op: &'static str,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        lengths: Option<&Tensor>,
    ) -> Result<AttentionParams> {
        let addr = |t: Option<&Tensor>| t.map_or(0, |t| t.device_address()) as *const i32;
        let (seq_lens, cu_seqlens) = match self.lengths {
            Lengths::All => (std::ptr::null(), std::ptr::null()),
            Lengths::PerSequence(_) => (addr(lengths), std::ptr::null()),
            Lengths::Cumulative(_) => (std::ptr::null(), addr(lengths)),
        };
        Ok(AttentionParams {
            q: q.device_address() as *const _,
            k: k.device_address() as *const _,
            v: v.device_address() as *const _,
            o: std::ptr::null(),
            dout: std::ptr::null(),
            out: std::ptr::null_mut(),
            lse: std::ptr::null_mut(),
            delta: std::ptr::null_mut(),
            dq: std::ptr::null_mut(),
            dk: std::ptr::null_mut(),
            dv: std::ptr::null_mut(),
            cu_seqlens,
            seq_lens,
            batch: to_i32(op, "batch", self.spans.len())?,
            max_seqlen: to_i32(op, "q", self.max_seqlen)?,
            tokens: to_i32(op, "q", self.dims.tokens)?,
            q_heads: to_i32(op, "q", self.dims.q_heads)?,
            kv_heads: to_i32(op, "k", self.dims.kv_heads)?,
            scale: self.scale,
            kv_seq_stride: 0,
            kv_len: 0,
        })
    }

    /// Grid of `rows`-row tiles x `heads` x sequences.
    fn grid(&self, op: &'static str, rows: usize, heads: usize) -> Result<[u32; 3]> {
        grid(op, self.max_seqlen.div_ceil(rows), heads, self.spans.len())
    }

    fn launch(&self, grid: [u32; 3], shared_bytes: u32) -> LaunchConfig {
        LaunchConfig {
            grid,
            block: [THREADS, 1, 1],
            shared_bytes,
        }
    }

    /// `{base}_{dtype}_d{head_dim}[_causal]`.
    fn kernel(&self, base: &str, q: &Tensor, cfg: &AttentionConfig) -> String {
        kernel_name(base, q.dtype(), self.dims.head_dim, cfg)
    }
}

/// `{base}_{dtype}_d{head_dim}[_causal]`.
fn kernel_name(base: &str, dtype: DType, head_dim: usize, cfg: &AttentionConfig) -> String {
    let causal = if cfg.causal { "_causal" } else { "" };
    format!("{base}_{}_d{head_dim}{causal}", dtype.kernel_suffix())
}

/// On a kernel device (not [`Device::Cpu`]): q must be f16 or bf16 and the
/// head dim one of [`HEAD_DIMS`].
fn check_kernel_input(op: &'static str, q: &Tensor, head_dim: usize) -> Result<()> {
    if matches!(q.device(), Device::Cpu) {
        return Ok(());
    }
    if q.dtype() == DType::F32 {
        return Err(Error::DType {
            op,
            arg: "q",
            expected: "f16 or bf16 (the kernels run on tensor cores; f32 runs on Device::Cpu)"
                .into(),
            got: q.dtype(),
        });
    }
    if !HEAD_DIMS.contains(&head_dim) {
        return Err(Error::Invalid {
            op,
            arg: "q",
            what: format!("head_dim {head_dim} has no kernel; supported: {HEAD_DIMS:?}"),
        });
    }
    Ok(())
}

/// The softmax scale: `cfg.scale`, else 1 / sqrt(head_dim); finite.
fn check_scale(op: &'static str, cfg: &AttentionConfig, head_dim: usize) -> Result<f32> {
    let scale = cfg.scale.unwrap_or(1.0 / (head_dim as f32).sqrt());
    if scale.is_finite() {
        Ok(scale)
    } else {
        Err(Error::Invalid {
            op,
            arg: "cfg.scale",
            what: format!("{scale} is not finite"),
        })
    }
}

/// A launch grid of `tiles` (at least 1) x `heads` x `batch`, the last two
/// within the 65535 a grid's y and z hold.
fn grid(op: &'static str, tiles: usize, heads: usize, batch: usize) -> Result<[u32; 3]> {
    Ok([
        to_u32(op, "q", tiles.max(1))?,
        limit(op, "q", "heads", heads)?,
        limit(op, "batch", "sequences", batch)?,
    ])
}

/// `n` as a grid's y or z dimension (at most 65535).
fn limit(op: &'static str, arg: &'static str, what: &str, n: usize) -> Result<u32> {
    if n <= 65535 {
        Ok(n as u32)
    } else {
        Err(Error::Invalid {
            op,
            arg,
            what: format!("{n} {what}: a grid holds at most 65535"),
        })
    }
}

/// Converts a count to u32 for a launch dimension.
fn to_u32(op: &'static str, arg: &'static str, n: usize) -> Result<u32> {
    u32::try_from(n).map_err(|_| Error::Invalid {
        op,
        arg,
        what: format!("{n} exceeds a launch dimension"),
    })
}
