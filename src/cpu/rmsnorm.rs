//! RMSNorm reference: y = w * x * rsqrt(mean(x^2) + eps) over the last dimension.

use crate::DType;

/// Forward over rows of `hidden` elements: returns y, shaped like `x`.
pub fn forward(x: &[f32], w: &[f32], hidden: usize, eps: f32) -> Vec<f32> {
    assert_eq!(w.len(), hidden);
    let mut y = vec![0.0f32; x.len()];
    for (xr, yr) in x.chunks_exact(hidden).zip(y.chunks_exact_mut(hidden)) {
        let r = inv_rms(xr, eps);
        for ((yv, &xv), &wv) in yr.iter_mut().zip(xr).zip(w) {
            *yv = (wv as f64 * xv as f64 * r) as f32;
        }
    }
    y
}

/// The residual add then the norm: h' = h + delta in f32, rounded to `dtype`
/// (what a tensor of that dtype holds), then y = [`forward`] of h'. Returns
/// (h', y).
pub fn add_forward(
    h: &[f32],
    delta: &[f32],
    w: &[f32],
    hidden: usize,
    eps: f32,
    dtype: DType,
) -> (Vec<f32>, Vec<f32>) {
    assert_eq!(h.len(), delta.len(), "h and delta have one shape");
    let sum: Vec<f32> = h
        .iter()
        .zip(delta)
        .map(|(&a, &b)| dtype.round(a + b))
        .collect();
    let y = forward(&sum, w, hidden, eps);
    (sum, y)
}

/// Backward: returns (dx, dw), dw summed over all rows.
///
/// dx_j = r w_j dy_j - r^3 x_j mean(dy w x),  dw_j = sum_rows dy_j x_j r.
pub fn backward(x: &[f32], w: &[f32], dy: &[f32], hidden: usize, eps: f32) -> (Vec<f32>, Vec<f32>) {
    assert_eq!(w.len(), hidden);
    assert_eq!(x.len(), dy.len());
    let mut dx = vec![0.0f32; x.len()];
    let mut dw = vec![0.0f64; hidden];
    for ((xr, gr), dxr) in x
        .chunks_exact(hidden)
        .zip(dy.chunks_exact(hidden))
        .zip(dx.chunks_exact_mut(hidden))
    {
        let r = inv_rms(xr, eps);
        let mean_gwx = xr
            .iter()
            .zip(gr)
            .zip(w)
            .map(|((&xv, &g), &wv)| g as f64 * wv as f64 * xv as f64)
            .sum::<f64>()
            / hidden as f64;
        let c = r * r * r * mean_gwx;
        for j in 0..hidden {
            let (xv, g, wv) = (xr[j] as f64, gr[j] as f64, w[j] as f64);
            dxr[j] = (r * wv * g - c * xv) as f32;
            dw[j] += g * xv * r;
        }
    }
    (dx, dw.into_iter().map(|v| v as f32).collect())
}

fn inv_rms(row: &[f32], eps: f32) -> f64 {
    let mean_sq = row.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / row.len() as f64;
    1.0 / (mean_sq + eps as f64).sqrt()
}
