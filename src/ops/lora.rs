//! The fused LoRA linear layer PEFT puts on a Llama projection:
//! y = x Wᵀ + s · dropout(x) Aᵀ Bᵀ, W [out, in] frozen, A [r, in] and
//! B [out, r] trainable fp32 masters, s = alpha / r (or alpha / √r, rsLoRA).
//!
//! - x [..., in] and W in f16 or bf16 on the GPU and the emulator (fp32
//!   accumulation on tensor cores), any float type on [`Device::Cpu`];
//!   in and out multiples of 8 on the kernel devices; any rank ≥ 1.
//! - Forward writes y once: u = dropout(x) Aᵀ first, then one GEMM over
//!   K = in + r with [x | u] and [W | s·B]. u is returned for backward.
//! - Backward: dx = dy W + s · mask/(1-p) ∘ (dy B) A in one GEMM over
//!   K = out + r, dA = s (dy B)ᵀ dropout(x), dB = s dyᵀ u (fp32, summed in a
//!   fixed order). The dropout mask is regenerated from (seed, offset), never
//!   stored; [`crate::cpu::philox`] computes the same bits.
//! - [`merge`] / [`unmerge`]: W ± s·B A in place, fp32 arithmetic.
//!
//! Kernels: `kernels/lora.cu`. CPU reference: [`crate::cpu::lora`].

use super::{
    check_aligned16, check_device, check_dtype, check_float, check_kernel_dtype, check_nonempty,
    check_shape, grid_dim, to_i32, weight_dims,
};
use crate::cpu;
use crate::cpu::lora::LoraDims;
use crate::cpu::philox::Dropout;
use crate::device::{DType, Device};
use crate::error::{Error, Result};
use crate::host;
use crate::kernels::params::{
    LoraAddParams, LoraGemmParams, LoraMergeParams, LoraPackParams, LoraReduceParams,
};
use crate::launch::LaunchConfig;
use crate::tensor::Tensor;

/// Hyper-parameters of one adapter.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoraConfig {
    /// LoRA alpha: the scale is alpha / r (alpha / √r with `rslora`).
    pub alpha: f32,
    /// Rank-stabilised scaling alpha / √r.
    pub rslora: bool,
    /// Dropout probability on the adapter's input, in [0, 1).
    pub dropout: f32,
    /// Dropout random stream: the mask of x element e is a function of (seed, offset, e).
    pub seed: u64,
    /// Start of this call's counters in the stream (advance it per layer and step).
    pub offset: u64,
}

impl Default for LoraConfig {
    /// Platypus' setting: alpha 16 (with r 16: scale 1), dropout 0.05, seed 0.
    fn default() -> Self {
        LoraConfig {
            alpha: 16.0,
            rslora: false,
            dropout: 0.05,
            seed: 0,
            offset: 0,
        }
    }
}

impl LoraConfig {
    /// s = alpha / r, or alpha / √r with rsLoRA.
    pub fn scale(&self, rank: usize) -> f32 {
        if self.rslora {
            self.alpha / (rank as f32).sqrt()
        } else {
            self.alpha / rank as f32
        }
    }

    fn dropout(&self) -> Option<Dropout> {
        (self.dropout > 0.0).then_some(Dropout {
            p: self.dropout,
            seed: self.seed,
            offset: self.offset,
        })
    }
}

/// The layer's weights: W [out, in] in the activation dtype, A [r, in] and B [out, r] fp32.
#[derive(Debug, Clone, Copy)]
pub struct LoraWeights<'a> {
    /// Frozen base weight [out, in].
    pub w: &'a Tensor,
    /// lora_A [r, in], fp32.
    pub a: &'a Tensor,
    /// lora_B [out, r], fp32.
    pub b: &'a Tensor,
}

/// What forward returns.
#[derive(Debug)]
pub struct LoraOutput {
    /// [..., out], like x.
    pub y: Tensor,
    /// dropout(x) Aᵀ, saved for backward: [tokens, r rounded up to 16] in x's
    /// dtype, the columns past r zero.
    pub u: Tensor,
}

/// Gradients: dx like x, dA [r, in] and dB [out, r] in fp32. W gets none.
#[derive(Debug)]
pub struct LoraGrads {
    /// dL/dx.
    pub dx: Tensor,
    /// dL/dA.
    pub da: Tensor,
    /// dL/dB.
    pub db: Tensor,
}

/// Forward pass.
pub fn forward(x: &Tensor, weights: LoraWeights<'_>, cfg: &LoraConfig) -> Result<LoraOutput> {
    const OP: &str = "lora::forward";
    let l = Layer::check(OP, x, weights, cfg)?;
    let mut y_shape = x.shape().to_vec();
    *y_shape.last_mut().expect("checked rank") = l.dims.out_features;
    let device = x.device().clone();
    let u_shape = [l.dims.tokens, l.r16];
    if host_path(x) {
        return host_forward(OP, x, weights, &l, &y_shape);
    }
    if let Device::Cpu = device {
        let (y, u) = cpu::lora::forward(
            &x.to_f32_vec()?,
            &weights.w.to_f32_vec()?,
            &weights.a.to_f32_vec()?,
            &weights.b.to_f32_vec()?,
            &l.dims,
            l.scale,
            l.dropout.as_ref(),
        );
        return Ok(LoraOutput {
            y: Tensor::from_f32(&y, &y_shape, x.dtype(), &device)?,
            u: Tensor::from_f32(&l.pad_columns(&u), &u_shape, x.dtype(), &device)?,
        });
    }
    let (a16, b16) = l.packed_adapter(OP, weights)?;
    let u = Tensor::zeros(&u_shape, x.dtype(), &device)?;
    let y = Tensor::zeros(&y_shape, x.dtype(), &device)?;
    let (tokens, d_in, d_out) = (l.dims.tokens, l.dims.in_features, l.dims.out_features);
    // u = dropout(x) A16ᵀ
    let mut p = l.gemm(OP, x, d_in, &a16, d_in, d_in, &u, l.r16, tokens, l.r16)?;
    l.set_mask(&mut p, MASK_A);
    l.run(OP, "lora_gemm_nt_skinny", Tile::SKINNY, &mut p, 1)?;
    // y = x Wᵀ + s u B16ᵀ
    let mut p = l.gemm(OP, x, d_in, weights.w, d_in, d_in, &y, d_out, tokens, d_out)?;
    l.set_segment2(&mut p, &u, l.r16, &b16, l.r16);
    l.run(OP, "lora_gemm_nt_wide", Tile::WIDE, &mut p, 1)?;
    Ok(LoraOutput { y, u })
}

/// Backward pass for upstream `dy` (like y), given forward's `u`.
pub fn backward(
    x: &Tensor,
    dy: &Tensor,
    weights: LoraWeights<'_>,
    u: &Tensor,
    cfg: &LoraConfig,
) -> Result<LoraGrads> {
    const OP: &str = "lora::backward";
    let l = Layer::check(OP, x, weights, cfg)?;
    let mut y_shape = x.shape().to_vec();
    *y_shape.last_mut().expect("checked rank") = l.dims.out_features;
    for (arg, t, shape) in [
        ("dy", dy, y_shape.clone()),
        ("u", u, vec![l.dims.tokens, l.r16]),
    ] {
        check_shape(OP, arg, t, &shape)?;
        check_dtype(OP, arg, t, x.dtype())?;
        check_device(OP, arg, t, x.device())?;
    }
    let device = x.device().clone();
    let (r, d_in, d_out, tokens) = (
        l.dims.rank,
        l.dims.in_features,
        l.dims.out_features,
        l.dims.tokens,
    );
    if host_path(x) {
        return host_backward(OP, x, dy, weights, u, &l);
    }
    if let Device::Cpu = device {
        let (dx, da, db) = cpu::lora::backward(
            &x.to_f32_vec()?,
            &weights.w.to_f32_vec()?,
            &weights.a.to_f32_vec()?,
            &weights.b.to_f32_vec()?,
            &dy.to_f32_vec()?,
            &l.dims,
            l.scale,
            l.dropout.as_ref(),
        );
        return Ok(LoraGrads {
            dx: Tensor::from_f32(&dx, x.shape(), x.dtype(), &device)?,
            da: Tensor::from_slice(&da, &[r, d_in], &device)?,
            db: Tensor::from_slice(&db, &[d_out, r], &device)?,
        });
    }
    let (a16, b16) = l.packed_adapter(OP, weights)?;
    let v = Tensor::zeros(&[tokens, l.r16], x.dtype(), &device)?;
    let dx = Tensor::zeros(x.shape(), x.dtype(), &device)?;
    // v = dy B16
    let mut p = l.gemm(OP, dy, d_out, &b16, l.r16, d_out, &v, l.r16, tokens, l.r16)?;
    l.run(OP, "lora_gemm_nn_skinny", Tile::SKINNY, &mut p, 1)?;
    // dx = dy W + s mask/(1-p) (v A16)
    let mut p = l.gemm(
        OP, dy, d_out, weights.w, d_in, d_out, &dx, d_in, tokens, d_in,
    )?;
    l.set_segment2(&mut p, &v, l.r16, &a16, d_in);
    l.set_mask(&mut p, MASK_SEGMENT2);
    l.run(OP, "lora_gemm_nn_wide", Tile::WIDE, &mut p, 1)?;
    // dA = s vᵀ dropout(x), dB = s dyᵀ u: reductions over the tokens, split
    // for parallelism and summed in split order.
    let splits = tokens.div_ceil(256).clamp(1, 16);
    let da = l.reduce_over_tokens(
        OP,
        &v,
        l.r16,
        x,
        d_in,
        [r, d_in],
        MASK_B,
        Tile::SHORT,
        splits,
    )?;
    let db = l.reduce_over_tokens(OP, dy, d_out, u, l.r16, [d_out, r], 0, Tile::SKINNY, splits)?;
    Ok(LoraGrads { dx, da, db })
}

/// The base layer alone, y = x Wᵀ (frozen layers without an adapter, and
/// the baseline of the benchmarks): [`super::linear::forward`] without bias
/// or activation.
pub fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    super::linear::forward(x, w, None, super::linear::Activation::Identity)
}

/// True when an op on activation `x` runs the fast host code: f32 on the CPU
/// (other dtypes there run the reference).
fn host_path(x: &Tensor) -> bool {
    matches!(x.device(), Device::Cpu) && x.dtype() == DType::F32
}

/// [`forward`] on the host ([`host::lora::forward`]), W read in its stored
/// dtype.
fn host_forward(
    op: &'static str,
    x: &Tensor,
    weights: LoraWeights<'_>,
    l: &Layer,
    y_shape: &[usize],
) -> Result<LoraOutput> {
    let (tokens, r) = (l.dims.tokens, l.dims.rank);
    let mut y = Tensor::zeros(y_shape, DType::F32, &l.device)?;
    let mut u = vec![0.0f32; tokens * r];
    host::lora::forward(
        host::view::f32s(op, "x", x)?,
        host::view::weights(op, "weights.w", weights.w)?,
        host::view::f32s(op, "weights.a", weights.a)?,
        host::view::f32s(op, "weights.b", weights.b)?,
        &l.dims,
        l.scale,
        l.dropout.as_ref(),
        host::view::f32s_mut(op, "y", &mut y)?,
        &mut u,
    );
    Ok(LoraOutput {
        y,
        u: Tensor::from_slice(&l.pad_columns(&u), &[tokens, l.r16], &l.device)?,
    })
}

/// [`backward`] on the host ([`host::lora::backward`]): u's padding columns
/// dropped, W read in its stored dtype.
fn host_backward(
    op: &'static str,
    x: &Tensor,
    dy: &Tensor,
    weights: LoraWeights<'_>,
    u: &Tensor,
    l: &Layer,
) -> Result<LoraGrads> {
    let (r, d_in, d_out) = (l.dims.rank, l.dims.in_features, l.dims.out_features);
    let u16 = host::view::f32s(op, "u", u)?;
    let compact: Vec<f32>;
    let u = if l.r16 == r {
        u16
    } else {
        compact = u16
            .chunks_exact(l.r16)
            .flat_map(|row| &row[..r])
            .copied()
            .collect();
        &compact
    };
    let mut dx = Tensor::zeros(x.shape(), DType::F32, &l.device)?;
    let mut da = Tensor::zeros(&[r, d_in], DType::F32, &l.device)?;
    let mut db = Tensor::zeros(&[d_out, r], DType::F32, &l.device)?;
    host::lora::backward(
        host::view::f32s(op, "x", x)?,
        host::view::weights(op, "weights.w", weights.w)?,
        host::view::f32s(op, "weights.a", weights.a)?,
        host::view::f32s(op, "weights.b", weights.b)?,
        host::view::f32s(op, "dy", dy)?,
        u,
        &l.dims,
        l.scale,
        l.dropout.as_ref(),
        (
            host::view::f32s_mut(op, "dx", &mut dx)?,
            host::view::f32s_mut(op, "da", &mut da)?,
            host::view::f32s_mut(op, "db", &mut db)?,
        ),
    );
    Ok(LoraGrads { dx, da, db })
}

/// dx = dy W for the base layer alone (W frozen).
pub fn linear_backward(dy: &Tensor, w: &Tensor) -> Result<Tensor> {
    const OP: &str = "lora::linear_backward";
    let l = Layer::check_activation(OP, "dy", dy, w, true)?;
    let (tokens, d_in, d_out) = (l.dims.tokens, l.dims.in_features, l.dims.out_features);
    let mut dx_shape = dy.shape().to_vec();
    *dx_shape.last_mut().expect("checked rank") = d_in;
    if host_path(dy) {
        let mut dx = Tensor::zeros(&dx_shape, DType::F32, &l.device)?;
        host::gemm::matmul_nn(
            host::view::f32s(OP, "dy", dy)?,
            host::view::weights(OP, "w", w)?,
            tokens,
            d_out,
            d_in,
            1.0,
            0.0,
            host::view::f32s_mut(OP, "dx", &mut dx)?,
        );
        return Ok(dx);
    }
    if let Device::Cpu = l.device {
        let x = vec![0.0; tokens * d_in];
        let (dx, _, _) = cpu::lora::backward(
            &x,
            &w.to_f32_vec()?,
            &[],
            &[],
            &dy.to_f32_vec()?,
            &l.dims,
            1.0,
            None,
        );
        return Tensor::from_f32(&dx, &dx_shape, dy.dtype(), &l.device);
    }
    let dx = Tensor::zeros(&dx_shape, dy.dtype(), &l.device)?;
    let mut p = l.gemm(OP, dy, d_out, w, d_in, d_out, &dx, d_in, tokens, d_in)?;
    l.run(OP, "lora_gemm_nn_wide", Tile::WIDE, &mut p, 1)?;
    Ok(dx)
}

/// A product of the fused layer's wide GEMM on raw addresses (see [`gemm_raw`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RawGemm {
    /// C [m, n] fp32 = A [m, k] · B [n, k]ᵀ: the LM head's logits chunks.
    NtF32Out,
    /// C [m, n] 16-bit = A [m, k] · B [k, n]: the head's dh from dlogits.
    Nn,
}

/// The fused layer's wide GEMM on raw addresses of `device` (16-bit `dtype`
/// operands, leading dimensions `[lda, ldb, ldc]` in elements; columns n.. of
/// C's rows untouched). `ops::cross_entropy` runs the LM head through it.
/// The caller has checked what the kernel needs: `dtype` f16 or bf16, the
/// extents along every 16-bit row a multiple of 8, operands 16-byte aligned,
/// ldc even, sizes in i32.
pub(crate) fn gemm_raw(
    op: &'static str,
    device: &Device,
    dtype: DType,
    product: RawGemm,
    [a, b, c]: [u64; 3],
    [lda, ldb, ldc]: [usize; 3],
    [m, n, k]: [usize; 3],
) -> Result<()> {
    debug_assert!(matches!(dtype, DType::F16 | DType::BF16) && k % 8 == 0 && ldc >= n);
    let layer = Layer {
        device: device.clone(),
        dtype,
        dims: LoraDims {
            tokens: m,
            in_features: k,
            out_features: n,
            rank: 0,
        },
        r16: 0,
        scale: 1.0,
        dropout: None,
    };
    let mut p = LoraGemmParams {
        a: a as *const _,
        b: b as *const _,
        lda: lda as i64,
        ldb: ldb as i64,
        k: to_i32(op, "h", k)?,
        k2: 0,
        a2: std::ptr::null(),
        b2: std::ptr::null(),
        lda2: 0,
        ldb2: 0,
        c: c as *mut _,
        ldc: ldc as i64,
        m: to_i32(op, "h", m)?,
        n: to_i32(op, "w", n)?,
        k_per_split: 0,
        mask: 0,
        scale: 1.0,
        out_scale: 1.0,
        dropout_p: 0.0,
        pad0: 0,
        seed: 0,
        offset: 0,
        mask_cols: k as i64,
    };
    let kernel = match product {
        RawGemm::NtF32Out => "lora_gemm_nt_wide_f32out",
        RawGemm::Nn => "lora_gemm_nn_wide",
    };
    layer.run(op, kernel, Tile::WIDE, &mut p, 1)
}

/// The PEFT sequence unfused, for comparison with [`forward`]: y = x Wᵀ,
/// u = dropout(x) Aᵀ, t = u Bᵀ, y += s t — three GEMMs and an add, with the
/// full-size t written and read once more.
pub fn forward_unfused(
    x: &Tensor,
    weights: LoraWeights<'_>,
    cfg: &LoraConfig,
) -> Result<LoraOutput> {
    const OP: &str = "lora::forward_unfused";
    let l = Layer::check(OP, x, weights, cfg)?;
    if let Device::Cpu = l.device {
        return forward(x, weights, cfg);
    }
    let y = linear(x, weights.w)?;
    let (a16, b16) = l.packed_adapter(OP, weights)?;
    let (tokens, d_in, d_out) = (l.dims.tokens, l.dims.in_features, l.dims.out_features);
    let u = Tensor::zeros(&[tokens, l.r16], x.dtype(), &l.device)?;
    let mut p = l.gemm(OP, x, d_in, &a16, d_in, d_in, &u, l.r16, tokens, l.r16)?;
    l.set_mask(&mut p, MASK_A);
    l.run(OP, "lora_gemm_nt_skinny", Tile::SKINNY, &mut p, 1)?;
    let t = Tensor::zeros(y.shape(), x.dtype(), &l.device)?;
    let mut p = l.gemm(OP, &u, l.r16, &b16, l.r16, l.r16, &t, d_out, tokens, d_out)?;
    l.run(OP, "lora_gemm_nt_wide", Tile::WIDE, &mut p, 1)?;
    let n = y.elem_count();
    let mut add = LoraAddParams {
        y: y.device_address() as *mut _,
        t: t.device_address() as *const _,
        n: n as i64,
        scale: l.scale,
        pad0: 0,
    };
    let blocks = u32::try_from(n.div_ceil(256)).map_err(|_| Error::Invalid {
        op: OP,
        arg: "x",
        what: "too many outputs for one launch".into(),
    })?;
    let kernel = format!("lora_add_scaled_{}", l.dtype.kernel_suffix());
    l.device
        .launch(&kernel, LaunchConfig::linear(blocks, 256, 0), &mut add)?;
    Ok(LoraOutput { y, u })
}

/// W += s · B A in place (the adapter merged into the base weight), computed
/// in fp32 and rounded once to W's dtype.
pub fn merge(w: &mut Tensor, a: &Tensor, b: &Tensor, scale: f32) -> Result<()> {
    merge_signed("lora::merge", w, a, b, scale, 1.0)
}

/// W -= s · B A in place: the inverse of [`merge`] up to one rounding of W's dtype.
pub fn unmerge(w: &mut Tensor, a: &Tensor, b: &Tensor, scale: f32) -> Result<()> {
    merge_signed("lora::unmerge", w, a, b, scale, -1.0)
}

fn merge_signed(
    op: &'static str,
    w: &mut Tensor,
    a: &Tensor,
    b: &Tensor,
    scale: f32,
    sign: f32,
) -> Result<()> {
    check_float(op, "w", w)?;
    check_nonempty(op, "w", w)?;
    let (d_out, d_in) = weight_dims(op, "w", w)?;
    let rank = check_adapter(op, a, b, d_out, d_in, w.device())?;
    if !scale.is_finite() {
        return Err(Error::Invalid {
            op,
            arg: "scale",
            what: format!("{scale} is not finite"),
        });
    }
    let device = w.device().clone();
    if let Device::Cpu = device {
        let mut wv = w.to_f32_vec()?;
        let (av, bv) = (a.to_f32_vec()?, b.to_f32_vec()?);
        if sign > 0.0 {
            cpu::lora::merge(&mut wv, &av, &bv, d_out, d_in, rank, scale);
        } else {
            cpu::lora::unmerge(&mut wv, &av, &bv, d_out, d_in, rank, scale);
        }
        *w = Tensor::from_f32(&wv, w.shape(), w.dtype(), &device)?;
        return Ok(());
    }
    check_kernel_dtype(op, "w", w)?;
    let mut params = LoraMergeParams {
        w: w.device_address() as *mut _,
        a: a.device_address() as *const f32,
        b: b.device_address() as *const f32,
        in_features: to_i32(op, "w", d_in)?,
        rank: to_i32(op, "a", rank)?,
        scale,
        sign,
    };
    let cfg = LaunchConfig {
        grid: [d_in.div_ceil(256) as u32, grid_dim(op, "w", d_out)?, 1],
        block: [256, 1, 1],
        shared_bytes: 0,
    };
    device.launch(
        &format!("lora_merge_{}", w.dtype().kernel_suffix()),
        cfg,
        &mut params,
    )
}

/// Every LoRA GEMM kernel with its launch shape: (name, threads per block,
/// dynamic shared memory bytes), for occupancy reports.
pub fn kernel_launch_shapes() -> Vec<(String, u32, u32)> {
    let gemms = [
        ("lora_gemm_nt_wide", Tile::WIDE),
        ("lora_gemm_nt_skinny", Tile::SKINNY),
        ("lora_gemm_nn_wide", Tile::WIDE),
        ("lora_gemm_nn_skinny", Tile::SKINNY),
        ("lora_gemm_nt_wide_f32out", Tile::WIDE),
        ("lora_gemm_tn_short_f32out", Tile::SHORT),
        ("lora_gemm_tn_skinny_f32out", Tile::SKINNY),
    ];
    ["bf16", "f16"]
        .into_iter()
        .flat_map(|dtype| {
            gemms.map(|(name, tile)| (format!("{name}_{dtype}"), tile.threads, tile.shared_bytes()))
        })
        .collect()
}

/// Where a GEMM applies the dropout mask (kernels/lora.cu: enum Mask).
const MASK_A: i32 = 1;
const MASK_B: i32 = 2;
const MASK_SEGMENT2: i32 = 3;

/// A GEMM tile shape of kernels/lora.cu: C rows and columns per block,
/// threads, and the dynamic shared memory of its 3-stage pipeline
/// (stages · (A tile + B tile) · 2 bytes, 32-deep K tiles).
#[derive(Debug, Clone, Copy)]
struct Tile {
    rows: usize,
    cols: usize,
    threads: u32,
}

impl Tile {
    const WIDE: Tile = Tile {
        rows: 128,
        cols: 128,
        threads: 256,
    };
    const SKINNY: Tile = Tile {
        rows: 128,
        cols: 32,
        threads: 128,
    };
    const SHORT: Tile = Tile {
        rows: 32,
        cols: 128,
        threads: 128,
    };

    fn shared_bytes(&self) -> u32 {
        (3 * (self.rows + self.cols) * 32 * 2) as u32
    }
}

/// A checked layer call.
struct Layer {
    device: Device,
    dtype: DType,
    dims: LoraDims,
    /// Rank rounded up to 16: the K of the LoRA GEMM segments.
    r16: usize,
    scale: f32,
    dropout: Option<Dropout>,
}

impl Layer {
    /// Checks x [..., in] and W [out, in] (the base layer): a Layer of rank 0.
    fn check_base(op: &'static str, x: &Tensor, w: &Tensor) -> Result<Layer> {
        Layer::check_activation(op, "x", x, w, false)
    }

    /// Checks an activation `act` against W [out, in]: its last dim is W's
    /// in (x) or, with `is_output`, W's out (dy); a Layer of rank 0.
    fn check_activation(
        op: &'static str,
        arg: &'static str,
        act: &Tensor,
        w: &Tensor,
        is_output: bool,
    ) -> Result<Layer> {
        check_float(op, arg, act)?;
        check_nonempty(op, arg, act)?;
        let device = act.device();
        let features = *act.shape().last().expect("non-empty tensors have a shape");
        let (d_out, d_in) = weight_dims(op, "weights.w", w)?;
        if is_output && features != d_out {
            return Err(Error::Shape {
                op,
                arg,
                expected: format!("[..., {d_out}]"),
                got: act.shape().to_vec(),
            });
        }
        if !is_output && features != d_in {
            return Err(Error::Shape {
                op,
                arg: "weights.w",
                expected: format!("[out, {features}] ({arg} has {features} features)"),
                got: w.shape().to_vec(),
            });
        }
        if host_path(act) {
            check_float(op, "weights.w", w)?;
        } else {
            check_dtype(op, "weights.w", w, act.dtype())?;
        }
        check_device(op, "weights.w", w, device)?;
        if !matches!(device, Device::Cpu) {
            check_kernel_dtype(op, arg, act)?;
            for (arg, n) in [
                (arg, features),
                ("weights.w", if is_output { d_in } else { d_out }),
            ] {
                if n % 8 != 0 {
                    return Err(Error::Invalid {
                        op,
                        arg,
                        what: format!(
                            "{n} features: the kernels need a multiple of 8 (16-byte rows)"
                        ),
                    });
                }
            }
            check_aligned16(op, &[(arg, act), ("weights.w", w)])?;
        }
        to_i32(op, arg, act.elem_count())?;
        to_i32(op, "weights.w", d_out * d_in)?;
        Ok(Layer {
            device: device.clone(),
            dtype: act.dtype(),
            dims: LoraDims {
                tokens: act.elem_count() / features,
                in_features: d_in,
                out_features: d_out,
                rank: 0,
            },
            r16: 0,
            scale: 1.0,
            dropout: None,
        })
    }

    /// Checks the whole layer call: base, adapter and hyper-parameters.
    fn check(
        op: &'static str,
        x: &Tensor,
        weights: LoraWeights<'_>,
        cfg: &LoraConfig,
    ) -> Result<Layer> {
        let mut layer = Layer::check_base(op, x, weights.w)?;
        let (d_out, d_in) = (layer.dims.out_features, layer.dims.in_features);
        let rank = check_adapter(op, weights.a, weights.b, d_out, d_in, x.device())?;
        if !(0.0..1.0).contains(&cfg.dropout) {
            return Err(Error::Invalid {
                op,
                arg: "cfg.dropout",
                what: format!("{} is not in [0, 1)", cfg.dropout),
            });
        }
        if !cfg.alpha.is_finite() {
            return Err(Error::Invalid {
                op,
                arg: "cfg.alpha",
                what: format!("{} is not finite", cfg.alpha),
            });
        }
        if !matches!(x.device(), Device::Cpu) {
            check_aligned16(op, &[("weights.a", weights.a), ("weights.b", weights.b)])?;
        }
        layer.dims.rank = rank;
        layer.r16 = rank.div_ceil(16) * 16;
        layer.scale = cfg.scale(rank);
        layer.dropout = cfg.dropout();
        Ok(layer)
    }

    /// u [tokens, r] widened to [tokens, r16] with zero columns.
    fn pad_columns(&self, u: &[f32]) -> Vec<f32> {
        let r = self.dims.rank;
        u.chunks_exact(r)
            .flat_map(|row| {
                row.iter()
                    .copied()
                    .chain(std::iter::repeat_n(0.0, self.r16 - r))
            })
            .collect()
    }

    /// The 16-bit copies the GEMMs read: A16 [r16, in] and B16 [out, r16], zero-padded.
    fn packed_adapter(
        &self,
        op: &'static str,
        weights: LoraWeights<'_>,
    ) -> Result<(Tensor, Tensor)> {
        let dtype = weights.w.dtype();
        let device = weights.w.device();
        let (r, d_in, d_out) = (
            self.dims.rank,
            self.dims.in_features,
            self.dims.out_features,
        );
        let a16 = Tensor::zeros(&[self.r16, d_in], dtype, device)?;
        let b16 = Tensor::zeros(&[d_out, self.r16], dtype, device)?;
        for (src, dst, rows, cols, rows_out, ld) in [
            (weights.a, &a16, r, d_in, self.r16, d_in),
            (weights.b, &b16, d_out, r, d_out, self.r16),
        ] {
            let mut p = LoraPackParams {
                src: src.device_address() as *const f32,
                dst: dst.device_address() as *mut _,
                rows: to_i32(op, "weights", rows)?,
                cols: to_i32(op, "weights", cols)?,
                ld: to_i32(op, "weights", ld)?,
                pad0: 0,
            };
            let cfg = LaunchConfig {
                grid: [
                    ld.div_ceil(256) as u32,
                    grid_dim(op, "weights", rows_out)?,
                    1,
                ],
                block: [256, 1, 1],
                shared_bytes: 0,
            };
            device.launch(
                &format!("lora_pack_weights_{}", dtype.kernel_suffix()),
                cfg,
                &mut p,
            )?;
        }
        Ok((a16, b16))
    }

    /// Parameters of C [m, n] (leading dimension ldc) = A B over K = k, A with
    /// leading dimension lda, B with ldb; no second segment, no mask.
    #[allow(clippy::too_many_arguments)]
    fn gemm(
        &self,
        op: &'static str,
        a: &Tensor,
        lda: usize,
        b: &Tensor,
        ldb: usize,
        k: usize,
        c: &Tensor,
        ldc: usize,
        m: usize,
        n: usize,
    ) -> Result<LoraGemmParams> {
        Ok(LoraGemmParams {
            a: a.device_address() as *const _,
            b: b.device_address() as *const _,
            lda: lda as i64,
            ldb: ldb as i64,
            k: to_i32(op, "x", k)?,
            k2: 0,
            a2: std::ptr::null(),
            b2: std::ptr::null(),
            lda2: 0,
            ldb2: 0,
            c: c.device_address() as *mut _,
            ldc: ldc as i64,
            m: to_i32(op, "x", m)?,
            n: to_i32(op, "x", n)?,
            k_per_split: 0,
            mask: 0,
            scale: self.scale,
            out_scale: 1.0,
            dropout_p: 0.0,
            pad0: 0,
            seed: 0,
            offset: 0,
            mask_cols: self.dims.in_features as i64,
        })
    }

    /// Adds the LoRA segment a2 b2 (K = r16) to a GEMM.
    fn set_segment2(
        &self,
        p: &mut LoraGemmParams,
        a2: &Tensor,
        lda2: usize,
        b2: &Tensor,
        ldb2: usize,
    ) {
        p.a2 = a2.device_address() as *const _;
        p.b2 = b2.device_address() as *const _;
        p.lda2 = lda2 as i64;
        p.ldb2 = ldb2 as i64;
        p.k2 = self.r16 as i32;
    }

    /// Applies this call's dropout (if any) at `mask`. A masked A or B tile
    /// only zeroes the dropped elements, so the 1 / (1 - p) goes into out_scale.
    fn set_mask(&self, p: &mut LoraGemmParams, mask: i32) {
        if let Some(d) = &self.dropout {
            p.mask = mask;
            p.dropout_p = d.p;
            p.seed = d.seed;
            p.offset = d.offset;
            if mask == MASK_A || mask == MASK_B {
                p.out_scale *= d.scale();
            }
        }
    }

    /// Launches `{kernel}_{dtype}` on tile shape `tile` with `splits` K splits.
    fn run(
        &self,
        op: &'static str,
        kernel: &str,
        tile: Tile,
        p: &mut LoraGemmParams,
        splits: usize,
    ) -> Result<()> {
        let cfg = LaunchConfig {
            grid: [
                (p.n as usize).div_ceil(tile.cols) as u32,
                grid_dim(op, "x", (p.m as usize).div_ceil(tile.rows))?,
                splits as u32,
            ],
            block: [tile.threads, 1, 1],
            shared_bytes: tile.shared_bytes(),
        };
        self.device
            .launch(&format!("{kernel}_{}", self.dtype.kernel_suffix()), cfg, p)
    }

    /// out [m, n] fp32 = s · aᵀ b summed over the tokens: a [tokens, m]
    /// (leading dimension lda), b [tokens, n] (ldb), `splits` partial sums
    /// reduced in order.
    #[allow(clippy::too_many_arguments)]
    fn reduce_over_tokens(
        &self,
        op: &'static str,
        a: &Tensor,
        lda: usize,
        b: &Tensor,
        ldb: usize,
        [m, n]: [usize; 2],
        mask: i32,
        tile: Tile,
        splits: usize,
    ) -> Result<Tensor> {
        let device = a.device();
        let tokens = self.dims.tokens;
        // Whole 32-token K tiles per split; splits past the last token would add nothing.
        let k_per_split = tokens.div_ceil(splits).div_ceil(32) * 32;
        let splits = tokens.div_ceil(k_per_split).max(1);
        let out = Tensor::zeros(&[m, n], DType::F32, device)?;
        let partial = if splits > 1 {
            Some(Tensor::zeros(&[splits, m, n], DType::F32, device)?)
        } else {
            None
        };
        let target = partial.as_ref().unwrap_or(&out);
        let mut p = self.gemm(op, a, lda, b, ldb, tokens, target, n, m, n)?;
        p.out_scale = self.scale;
        p.k_per_split = k_per_split as i32;
        self.set_mask(&mut p, mask); // after out_scale: it multiplies in 1 / (1 - p)
        let kernel = if tile.rows == Tile::SHORT.rows {
            "lora_gemm_tn_short_f32out"
        } else {
            "lora_gemm_tn_skinny_f32out"
        };
        self.run(op, kernel, tile, &mut p, splits)?;
        if let Some(partial) = &partial {
            let mut r = LoraReduceParams {
                partial: partial.device_address() as *const f32,
                out: out.device_address() as *mut f32,
                n: (m * n) as i64,
                splits: splits as i32,
                pad0: 0,
            };
            let blocks = u32::try_from((m * n).div_ceil(256)).map_err(|_| Error::Invalid {
                op,
                arg: "x",
                what: "too many adapter weights".into(),
            })?;
            device.launch(
                "lora_splitk_reduce",
                LaunchConfig::linear(blocks, 256, 0),
                &mut r,
            )?;
        }
        Ok(out)
    }
}

/// Checks A [r, in] and B [out, r] (fp32, on `device`); returns r.
fn check_adapter(
    op: &'static str,
    a: &Tensor,
    b: &Tensor,
    d_out: usize,
    d_in: usize,
    device: &Device,
) -> Result<usize> {
    let rank = match *a.shape() {
        [r, i] if i == d_in && r > 0 => r,
        _ => {
            return Err(Error::Shape {
                op,
                arg: "weights.a",
                expected: format!("[r, {d_in}] with r >= 1"),
                got: a.shape().to_vec(),
            })
        }
    };
    check_shape(op, "weights.b", b, &[d_out, rank])?;
    for (arg, t) in [("weights.a", a), ("weights.b", b)] {
        check_dtype(op, arg, t, DType::F32)?;
        check_device(op, arg, t, device)?;
    }
    Ok(rank)
}
