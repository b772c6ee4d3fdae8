//! Linear layer reference: y = act(x Wᵀ + b) in f64, act the identity or
//! GELU in its erf form, 0.5 v (1 + erf(v / √2)) (BERT's "gelu").
//!
//! Row-major layouts: x [tokens, in], W [out, in] (nn.Linear's), b [out],
//! y [tokens, out].

/// The function applied to x Wᵀ + b.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Activation {
    /// y = x Wᵀ + b.
    #[default]
    Identity,
    /// y = GELU(x Wᵀ + b), the erf form.
    Gelu,
}

impl Activation {
    /// The activation of v in f64.
    pub fn apply(self, v: f64) -> f64 {
        match self {
            Activation::Identity => v,
            Activation::Gelu => 0.5 * v * (1.0 + libm::erf(v * std::f64::consts::FRAC_1_SQRT_2)),
        }
    }
}

/// y [tokens, out] = act(x Wᵀ + b) for x [tokens, in], W [out, in] and b
/// [out] (or no bias).
pub fn forward(
    x: &[f32],
    w: &[f32],
    b: Option<&[f32]>,
    in_features: usize,
    act: Activation,
) -> Vec<f32> {
    assert!(
        in_features > 0 && w.len() % in_features == 0,
        "W is [out, in]"
    );
    assert_eq!(x.len() % in_features, 0, "x is [tokens, in]");
    let out = w.len() / in_features;
    if let Some(b) = b {
        assert_eq!(b.len(), out, "b is [out]");
    }
    x.chunks_exact(in_features)
        .flat_map(|row| {
            w.chunks_exact(in_features).enumerate().map(move |(o, wr)| {
                let dot: f64 = row.iter().zip(wr).map(|(&a, &c)| a as f64 * c as f64).sum();
                act.apply(dot + b.map_or(0.0, |b| b[o] as f64)) as f32
            })
        })
        .collect()
}
