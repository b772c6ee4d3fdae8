//! AdamW reference (torch.optim.AdamW, foreach=False), in f64: one step of
//! one tensor, and the global gradient norm that clipping divides by.

/// AdamW's hyper-parameters for one step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Hyper {
    /// Learning rate of this step.
    pub lr: f64,
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Added to the denominator.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
    /// Step number, from 1.
    pub step: u64,
    /// Factor on the gradients (the clipping coefficient; 1 when off).
    pub clip: f64,
}

/// One step on `param` with `grad`, updating the moments `m` and `v`.
pub fn step(param: &mut [f32], grad: &[f32], m: &mut [f32], v: &mut [f32], h: &Hyper) {
    assert!(grad.len() == param.len() && m.len() == param.len() && v.len() == param.len());
    let bc1 = 1.0 - h.beta1.powi(h.step as i32);
    let bc2 = 1.0 - h.beta2.powi(h.step as i32);
    for i in 0..param.len() {
        let g = h.clip * grad[i] as f64;
        let mut p = param[i] as f64 * (1.0 - h.lr * h.weight_decay);
        let mi = m[i] as f64 + (1.0 - h.beta1) * (g - m[i] as f64);
        let vi = h.beta2 * v[i] as f64 + (1.0 - h.beta2) * g * g;
        p -= h.lr / bc1 * mi / (vi.sqrt() / bc2.sqrt() + h.eps);
        (param[i], m[i], v[i]) = (p as f32, mi as f32, vi as f32);
    }
}

/// sqrt(Σ over all tensors of Σ g²).
pub fn global_norm(grads: &[&[f32]]) -> f64 {
    grads
        .iter()
        .flat_map(|g| g.iter())
        .map(|&g| g as f64 * g as f64)
        .sum::<f64>()
        .sqrt()
}

/// torch's clip_grad_norm_ factor: max_norm / (norm + 1e-6), at most 1; 1
/// when `max_norm` is 0 (clipping off).
pub fn clip_factor(norm: f64, max_norm: f64) -> f64 {
    if max_norm <= 0.0 {
        return 1.0;
    }
    (max_norm / (norm + 1e-6)).min(1.0)
}
