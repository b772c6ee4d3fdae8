//! Rotary position embedding reference, in place on [tokens, heads, head_dim].

/// Which elements of a head row form the rotated pairs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RopeStyle {
    /// Hugging Face `rotate_half`: pairs (i, i + head_dim/2). What HF Llama checkpoints need.
    #[default]
    RotateHalf,
    /// Meta's original code: pairs (2i, 2i + 1).
    Interleaved,
}

/// The angle of pair `i` at `position`, in f32 exactly as Hugging Face computes
/// it: inv_freq = 1 / theta^(2i / head_dim) in f32, times the position in f32.
pub fn angle(position: i32, i: usize, head_dim: usize, theta: f32) -> f32 {
    let inv_freq = 1.0f32 / theta.powf((2 * i) as f32 / head_dim as f32);
    position as f32 * inv_freq
}

/// Rotates every head row of `x` [tokens, heads, head_dim] by its token's
/// position (backward when `inverse`: by minus the angle).
pub fn apply(
    x: &mut [f32],
    positions: &[i32],
    heads: usize,
    head_dim: usize,
    theta: f32,
    style: RopeStyle,
    inverse: bool,
) {
    assert_eq!(x.len(), positions.len() * heads * head_dim);
    assert!(head_dim % 2 == 0);
    let half = head_dim / 2;
    for (token_rows, &pos) in x.chunks_exact_mut(heads * head_dim).zip(positions) {
        for row in token_rows.chunks_exact_mut(head_dim) {
            for i in 0..half {
                let a = angle(pos, i, head_dim, theta) as f64;
                let (s, c) = a.sin_cos();
                let s = if inverse { -s } else { s };
                let (ia, ib) = match style {
                    RopeStyle::RotateHalf => (i, i + half),
                    RopeStyle::Interleaved => (2 * i, 2 * i + 1),
                };
                let (va, vb) = (row[ia] as f64, row[ib] as f64);
                row[ia] = (va * c - vb * s) as f32;
                row[ib] = (va * s + vb * c) as f32;
            }
        }
    }
}
