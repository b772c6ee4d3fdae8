//! SwiGLU reference: m = silu(gate) ∘ up, silu(g) = g / (1 + e^(−g)), in f64,
//! and its gradients: dgate = dm ∘ up ∘ silu'(gate), dup = dm ∘ silu(gate),
//! silu'(g) = σ(g) (1 + g (1 − σ(g))).

/// silu(g) in f64.
pub fn silu(g: f64) -> f64 {
    g / (1.0 + (-g).exp())
}

/// m = silu(gate) ∘ up, elementwise.
pub fn forward(gate: &[f32], up: &[f32]) -> Vec<f32> {
    assert_eq!(gate.len(), up.len(), "gate and up have one shape");
    gate.iter()
        .zip(up)
        .map(|(&g, &u)| (silu(g as f64) * u as f64) as f32)
        .collect()
}

/// silu'(g) = σ(g) (1 + g (1 − σ(g))) in f64, σ(g) = 1 / (1 + e^(−g)).
pub fn silu_grad(g: f64) -> f64 {
    let s = 1.0 / (1.0 + (-g).exp());
    s * (1.0 + g * (1.0 - s))
}

/// Gradients of [`forward`] given dm: returns (dgate, dup), elementwise.
pub fn backward(gate: &[f32], up: &[f32], dm: &[f32]) -> (Vec<f32>, Vec<f32>) {
    assert!(
        gate.len() == up.len() && up.len() == dm.len(),
        "gate, up and dm have one shape"
    );
    gate.iter()
        .zip(up)
        .zip(dm)
        .map(|((&g, &u), &d)| {
            let (g, u, d) = (g as f64, u as f64, d as f64);
            ((d * u * silu_grad(g)) as f32, (d * silu(g)) as f32)
        })
        .unzip()
}
