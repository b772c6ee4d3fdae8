//! LayerNorm reference, BERT's post-norm form: y = w (v − mean) / √(var + eps) + b
//! over the last dimension, v = x or the residual sum x + delta; the
//! biased variance, as torch's `nn.LayerNorm`; moments in f64.

use crate::DType;

/// Forward over rows of `hidden` elements. With `delta`, v = x + delta in f32
/// rounded to `dtype` (what a tensor of that dtype holds) before the norm.
pub fn forward(
    x: &[f32],
    delta: Option<&[f32]>,
    w: &[f32],
    b: &[f32],
    hidden: usize,
    eps: f32,
    dtype: DType,
) -> Vec<f32> {
    assert!(w.len() == hidden && b.len() == hidden, "w, b [hidden]");
    let v: Vec<f32> = match delta {
        Some(d) => {
            assert_eq!(x.len(), d.len(), "x and delta have one shape");
            x.iter().zip(d).map(|(&a, &e)| dtype.round(a + e)).collect()
        }
        None => x.to_vec(),
    };
    let mut y = vec![0.0f32; v.len()];
    for (vr, yr) in v.chunks_exact(hidden).zip(y.chunks_exact_mut(hidden)) {
        let n = hidden as f64;
        let mean = vr.iter().map(|&a| a as f64).sum::<f64>() / n;
        let var = vr.iter().map(|&a| (a as f64 - mean).powi(2)).sum::<f64>() / n;
        let r = 1.0 / (var + eps as f64).sqrt();
        for (((yv, &a), &wv), &bv) in yr.iter_mut().zip(vr).zip(w).zip(b) {
            *yv = (wv as f64 * (a as f64 - mean) * r + bv as f64) as f32;
        }
    }
    y
}
