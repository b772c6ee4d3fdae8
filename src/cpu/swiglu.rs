//! SwiGLU reference: m = silu(gate) ∘ up, silu(g) = g / (1 + e^(−g)), in f64.

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
