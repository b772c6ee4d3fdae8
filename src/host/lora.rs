//! The fused LoRA layer y = x Wᵀ + s · dropout(x) Aᵀ Bᵀ in f32 on rayon
//! threads, forward and backward, as a handful of [`super::gemm`] products
//! (W read in its stored dtype, A and B f32) and one elementwise pass for
//! the dropout mask.
//!
//! Layouts as in the reference [`crate::cpu::lora`]: x [tokens, in], W [out,
//! in], A [rank, in], B [out, rank], y [tokens, out], u = dropout(x) Aᵀ
//! [tokens, rank]. The mask is [`Dropout::keep`]'s, regenerated in backward
//! rather than stored: one Philox call per four elements of x (the four
//! that share a counter), 32 calls side by side in vector registers, in
//! parallel tasks.

use rayon::prelude::*;

use super::gemm::{matmul_nn, matmul_nt, matmul_tn, Weights};
use crate::cpu::lora::LoraDims;
use crate::cpu::philox::{Dropout, M0, M1, W0, W1};

/// Elements of x per task of the dropout passes: a multiple of 4, so that
/// every task starts at a Philox counter of its own.
const MASK_CHUNK: usize = 1 << 14;

/// Philox counters drawn side by side: enough for the loops over them to
/// fill vector registers (32 ran about 2.7× faster than one at a time on
/// an AVX2 core, 16 and 64 less).
const LANES: usize = 32;

/// The multipliers of elements `first ..` of x (first a multiple of 4):
/// 1 / (1 − p) where [`Dropout::keep`] keeps them, 0 where it drops them.
fn fill_factors(d: &Dropout, first: usize, out: &mut [f32]) {
    debug_assert_eq!(first % 4, 0, "a task starts at a group of four");
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2, just checked.
        return unsafe { fill_factors_avx2(d, first, out) };
    }
    fill_factors_lanes(d, first, out);
}

/// [`fill_factors_lanes`] compiled for AVX2, whose 8 × 32-bit multiplies
/// to 64 bits the rounds vectorize to.
///
/// # Safety
/// The CPU must have AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn fill_factors_avx2(d: &Dropout, first: usize, out: &mut [f32]) {
    fill_factors_lanes(d, first, out);
}

/// [`fill_factors`] for [`LANES`] groups of four elements at a time: the
/// Philox4x32-10 rounds of [`crate::cpu::philox::philox4x32_10`] on
/// counters offset + group (the 64-bit counter in words 0 and 1) under the
/// seed, as structure-of-arrays loops that vectorize, and the keep test of
/// [`Dropout::keep4`] on each word.
#[inline(always)]
fn fill_factors_lanes(d: &Dropout, first: usize, out: &mut [f32]) {
    let kept = d.scale();
    let threshold = d.threshold();
    for (block, out) in out.chunks_mut(4 * LANES).enumerate() {
        let group = (first / 4 + block * LANES) as u64;
        let counter = |l: usize| d.offset.wrapping_add(group + l as u64);
        let mut c: [[u32; LANES]; 4] = [
            std::array::from_fn(|l| counter(l) as u32),
            std::array::from_fn(|l| (counter(l) >> 32) as u32),
            [0; LANES],
            [0; LANES],
        ];
        let (mut k0, mut k1) = (d.seed as u32, (d.seed >> 32) as u32);
        for _ in 0..10 {
            let mut next = [[0u32; LANES]; 4];
            for l in 0..LANES {
                let p0 = M0 as u64 * c[0][l] as u64;
                let p1 = M1 as u64 * c[2][l] as u64;
                next[0][l] = (p1 >> 32) as u32 ^ c[1][l] ^ k0;
                next[1][l] = p1 as u32;
                next[2][l] = (p0 >> 32) as u32 ^ c[3][l] ^ k1;
                next[3][l] = p0 as u32;
            }
            c = next;
            k0 = k0.wrapping_add(W0);
            k1 = k1.wrapping_add(W1);
        }
        let mut factors = [[0.0f32; LANES]; 4];
        for (f, c) in factors.iter_mut().zip(&c) {
            for (f, &c) in f.iter_mut().zip(c) {
                *f = if (c >> 8) >= threshold { kept } else { 0.0 };
            }
        }
        // Element 4·l + w is word w of lane l.
        for (l, quad) in out.chunks_mut(4).enumerate() {
            for (w, f) in quad.iter_mut().enumerate() {
                *f = factors[w][l];
            }
        }
    }
}

/// dropout(x): x ∘ keep / (1 − p), elementwise.
pub fn dropout(x: &[f32], d: &Dropout) -> Vec<f32> {
    let mut out = vec![0.0f32; x.len()];
    out.par_chunks_mut(MASK_CHUNK)
        .zip(x.par_chunks(MASK_CHUNK))
        .enumerate()
        .for_each(|(task, (out, x))| {
            fill_factors(d, task * MASK_CHUNK, out);
            out.iter_mut().zip(x).for_each(|(o, &v)| *o *= v);
        });
    out
}

/// Checks the lengths of the layer's operands against `dims`.
fn check(dims: &LoraDims, x: &[f32], w: Weights<'_>, a: &[f32], b: &[f32], u: &[f32]) {
    let LoraDims {
        tokens,
        in_features: n,
        out_features: m,
        rank: r,
    } = *dims;
    assert_eq!(x.len(), tokens * n, "x is [tokens, in]");
    assert_eq!(w.len(), m * n, "W is [out, in]");
    assert_eq!(a.len(), r * n, "A is [rank, in]");
    assert_eq!(b.len(), m * r, "B is [out, rank]");
    assert_eq!(u.len(), tokens * r, "u is [tokens, rank]");
}

/// Forward: y = x Wᵀ + s · u Bᵀ with u = dropout(x) Aᵀ, writing y [tokens,
/// out] and u [tokens, rank] (whatever they held).
#[allow(clippy::too_many_arguments)]
pub fn forward(
    x: &[f32],
    w: Weights<'_>,
    a: &[f32],
    b: &[f32],
    dims: &LoraDims,
    scale: f32,
    dropout: Option<&Dropout>,
    y: &mut [f32],
    u: &mut [f32],
) {
    check(dims, x, w, a, b, u);
    let (tokens, d_in, d_out, r) = (dims.tokens, dims.in_features, dims.out_features, dims.rank);
    matmul_nt(x, w, tokens, d_in, d_out, 1.0, 0.0, y);
    let dropped = dropout.map(|d| self::dropout(x, d));
    let xd = dropped.as_deref().unwrap_or(x);
    matmul_nt(xd, Weights::F32(a), tokens, d_in, r, 1.0, 0.0, u);
    matmul_nt(u, Weights::F32(b), tokens, r, d_out, scale, 1.0, y);
}

/// Gradients for upstream `dy` [tokens, out] given forward's `u` [tokens,
/// rank]: writes dx [tokens, in], dA [rank, in] and dB [out, rank]
/// (whatever they held). W is frozen and gets none.
///
/// With v = dy B and the dropout factors f = keep / (1 − p): dx = dy W +
/// s · f ∘ (v A), dA = s · vᵀ (f ∘ x), dB = s · dyᵀ u. Without dropout v A
/// is summed into dx by the GEMM itself; with it, v A is formed once and
/// one pass over it adds s · f ∘ (v A) to dx and turns it into f ∘ x, the
/// operand of dA.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    x: &[f32],
    w: Weights<'_>,
    a: &[f32],
    b: &[f32],
    dy: &[f32],
    u: &[f32],
    dims: &LoraDims,
    scale: f32,
    dropout: Option<&Dropout>,
    (dx, da, db): (&mut [f32], &mut [f32], &mut [f32]),
) {
    check(dims, x, w, a, b, u);
    let (tokens, d_in, d_out, r) = (dims.tokens, dims.in_features, dims.out_features, dims.rank);
    assert_eq!(dy.len(), tokens * d_out, "dy is [tokens, out]");
    let mut v = vec![0.0f32; tokens * r];
    matmul_nn(dy, Weights::F32(b), tokens, d_out, r, 1.0, 0.0, &mut v);
    matmul_nn(dy, w, tokens, d_out, d_in, 1.0, 0.0, dx);
    match dropout {
        None => {
            matmul_nn(&v, Weights::F32(a), tokens, r, d_in, scale, 1.0, dx);
            matmul_tn(&v, Weights::F32(x), tokens, r, d_in, scale, 0.0, da);
        }
        Some(d) => {
            let mut va = vec![0.0f32; tokens * d_in];
            matmul_nn(&v, Weights::F32(a), tokens, r, d_in, 1.0, 0.0, &mut va);
            va.par_chunks_mut(MASK_CHUNK)
                .zip(dx.par_chunks_mut(MASK_CHUNK).zip(x.par_chunks(MASK_CHUNK)))
                .enumerate()
                .for_each_init(Vec::new, |f, (task, (va, (dx, x)))| {
                    f.resize(va.len(), 0.0);
                    fill_factors(d, task * MASK_CHUNK, f);
                    for (((t, dx), &x), &f) in va.iter_mut().zip(dx).zip(x).zip(f.iter()) {
                        *dx += scale * (f * *t);
                        *t = f * x;
                    }
                });
            matmul_tn(&v, Weights::F32(&va), tokens, r, d_in, scale, 0.0, da);
        }
    }
    matmul_tn(dy, Weights::F32(u), tokens, d_out, r, scale, 0.0, db);
}
