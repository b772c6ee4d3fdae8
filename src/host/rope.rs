//! Rotary position embedding on f32 host tensors, in place: the angles of a
//! call are computed once per (token, pair), shared by every head and by q
//! and k, and the tokens are split over rayon threads.

use rayon::prelude::*;

use crate::cpu::rope::{angle, RopeStyle};

/// Rotates q [tokens, q_heads, head_dim] and k [tokens, k_heads, head_dim]
/// by their tokens' `positions` (by minus the angle when `inverse`), as
/// [`crate::cpu::rope::apply`] does but in f32 arithmetic. head_dim is even.
#[allow(clippy::too_many_arguments)]
pub fn apply(
    q: &mut [f32],
    k: &mut [f32],
    positions: &[i32],
    (q_heads, k_heads): (usize, usize),
    head_dim: usize,
    theta: f32,
    style: RopeStyle,
    inverse: bool,
) {
    let half = head_dim / 2;
    // cos and sin of every (token, pair), from the same f32 angle as the
    // reference (and as Hugging Face computes it).
    let mut table = vec![(0.0f32, 0.0f32); positions.len() * half];
    table
        .par_chunks_mut(half.max(1))
        .zip(positions)
        .for_each(|(row, &pos)| {
            for (i, cs) in row.iter_mut().enumerate() {
                let (s, c) = (angle(pos, i, head_dim, theta) as f64).sin_cos();
                *cs = (c as f32, if inverse { -s as f32 } else { s as f32 });
            }
        });
    // A tensor of no heads (rotating q alone) has nothing to rotate.
    for (x, heads) in [(q, q_heads), (k, k_heads)]
        .into_iter()
        .filter(|&(_, h)| h > 0)
    {
        x.par_chunks_mut(heads * head_dim)
            .zip(table.par_chunks(half.max(1)))
            .for_each(|(token, cs)| {
                for row in token.chunks_exact_mut(head_dim) {
                    rotate(row, cs, style);
                }
            });
    }
}

/// One head row rotated by the (cos, sin) of each of its pairs.
fn rotate(row: &mut [f32], cs: &[(f32, f32)], style: RopeStyle) {
    let half = cs.len();
    match style {
        RopeStyle::RotateHalf => {
            let (a, b) = row.split_at_mut(half);
            for ((va, vb), &(c, s)) in a.iter_mut().zip(b.iter_mut()).zip(cs) {
                (*va, *vb) = (*va * c - *vb * s, *va * s + *vb * c);
            }
        }
        RopeStyle::Interleaved => {
            for (pair, &(c, s)) in row.chunks_exact_mut(2).zip(cs) {
                let (va, vb) = (pair[0], pair[1]);
                (pair[0], pair[1]) = (va * c - vb * s, va * s + vb * c);
            }
        }
    }
}
