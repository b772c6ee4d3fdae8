//! Row-wise f32 ops of the Llama forward and backward passes on rayon
//! threads: the embedding gather, SwiGLU and its gradient, RMSNorm (alone,
//! fused with the residual add before it, and its gradient); and those of a
//! BERT encoder's: LayerNorm (alone and after the residual add) and GELU.

use rayon::prelude::*;

use super::gemm::Weights;

/// Rows per rayon task: enough work to beat the task overhead.
fn rows_per_task(hidden: usize) -> usize {
    (16384 / hidden.max(1)).max(1)
}

/// out [ids.len(), hidden] = table rows `ids` (table [vocab, hidden] as
/// stored, widened to f32). Every id must be < vocab (checked by the op).
pub fn gather_rows(table: Weights<'_>, hidden: usize, ids: &[u32], out: &mut [f32]) {
    assert_eq!(out.len(), ids.len() * hidden, "out is [ids, hidden]");
    out.par_chunks_mut(hidden)
        .zip(ids.par_iter())
        .for_each(|(row, &id)| {
            let r = id as usize * hidden..(id as usize + 1) * hidden;
            match table {
                Weights::F32(t) => row.copy_from_slice(&t[r]),
                Weights::F16(t) => row.iter_mut().zip(&t[r]).for_each(|(o, v)| *o = v.to_f32()),
                Weights::BF16(t) => row.iter_mut().zip(&t[r]).for_each(|(o, v)| *o = v.to_f32()),
            }
        });
}

/// out = silu(gate) ∘ up.
pub fn swiglu(gate: &[f32], up: &[f32], out: &mut [f32]) {
    assert!(gate.len() == up.len() && up.len() == out.len(), "one shape");
    out.par_chunks_mut(ELEMENTS_PER_TASK)
        .zip(
            gate.par_chunks(ELEMENTS_PER_TASK)
                .zip(up.par_chunks(ELEMENTS_PER_TASK)),
        )
        .for_each(|(o, (g, u))| {
            for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
                *o = g / (1.0 + (-g).exp()) * u;
            }
        });
}

/// Elements per task of the elementwise ops.
const ELEMENTS_PER_TASK: usize = 4096;

/// The gradients of [`swiglu`] for dm: dgate = dm ∘ up ∘ silu'(gate) and
/// dup = dm ∘ silu(gate), with silu'(g) = σ(g) (1 + g (1 − σ(g))).
pub fn swiglu_backward(gate: &[f32], up: &[f32], dm: &[f32], dgate: &mut [f32], dup: &mut [f32]) {
    let n = gate.len();
    assert!(
        [up.len(), dm.len(), dgate.len(), dup.len()]
            .iter()
            .all(|&l| l == n),
        "one shape"
    );
    let ins = gate
        .par_chunks(ELEMENTS_PER_TASK)
        .zip(up.par_chunks(ELEMENTS_PER_TASK))
        .zip(dm.par_chunks(ELEMENTS_PER_TASK));
    let outs = dgate
        .par_chunks_mut(ELEMENTS_PER_TASK)
        .zip(dup.par_chunks_mut(ELEMENTS_PER_TASK));
    ins.zip(outs).for_each(|(((g, u), d), (dg, du))| {
        for ((((&g, &u), &d), dg), du) in g.iter().zip(u).zip(d).zip(dg).zip(du) {
            let sigma = 1.0 / (1.0 + (-g).exp());
            *du = d * (g * sigma);
            *dg = d * u * (sigma * (1.0 + g * (1.0 - sigma)));
        }
    });
}

/// y = w ∘ x · rsqrt(mean(x²) + eps) per row of `hidden`, with the sum of
/// squares in f64 (rows of 4096+ elements lose bits in f32).
pub fn rmsnorm(x: &[f32], w: &[f32], hidden: usize, eps: f32, y: &mut [f32]) {
    assert!(
        x.len() == y.len() && w.len() == hidden,
        "x, y [rows, hidden]; w [hidden]"
    );
    let chunk = rows_per_task(hidden) * hidden;
    y.par_chunks_mut(chunk)
        .zip(x.par_chunks(chunk))
        .for_each(|(yc, xc)| {
            for (yr, xr) in yc.chunks_exact_mut(hidden).zip(xc.chunks_exact(hidden)) {
                normalize_row(xr, w, eps, yr);
            }
        });
}

/// h += delta, then y = rmsnorm(h): the residual add and the next norm in one
/// pass over h.
pub fn add_rmsnorm(
    h: &mut [f32],
    delta: &[f32],
    w: &[f32],
    hidden: usize,
    eps: f32,
    y: &mut [f32],
) {
    assert!(h.len() == delta.len() && h.len() == y.len() && w.len() == hidden);
    let chunk = rows_per_task(hidden) * hidden;
    h.par_chunks_mut(chunk)
        .zip(delta.par_chunks(chunk).zip(y.par_chunks_mut(chunk)))
        .for_each(|(hc, (dc, yc))| {
            for (hv, &d) in hc.iter_mut().zip(dc) {
                *hv += d;
            }
            for (yr, hr) in yc.chunks_exact_mut(hidden).zip(hc.chunks_exact(hidden)) {
                normalize_row(hr, w, eps, yr);
            }
        });
}

/// h += delta.
pub fn add(h: &mut [f32], delta: &[f32]) {
    assert_eq!(h.len(), delta.len());
    h.par_chunks_mut(16384)
        .zip(delta.par_chunks(16384))
        .for_each(|(hc, dc)| hc.iter_mut().zip(dc).for_each(|(a, &b)| *a += b));
}

/// The gradient of [`rmsnorm`] for dy: dx = r w ∘ dy − r³ x mean(dy ∘ w ∘
/// x) per row, r = rsqrt(mean(x²) + eps), in f64 (the means, and dx, whose
/// two terms may cancel) rounded once;
/// and, when `dw` is given, dw = Σ_rows dy ∘ x r, summed in f64 per block
/// of rows and the blocks in order (the same sum on any number of threads).
pub fn rmsnorm_backward(
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    hidden: usize,
    eps: f32,
    dx: &mut [f32],
    dw: Option<&mut [f32]>,
) {
    assert!(
        x.len() == dy.len() && x.len() == dx.len() && w.len() == hidden,
        "x, dy, dx [rows, hidden]; w [hidden]"
    );
    assert!(
        dw.as_ref().is_none_or(|dw| dw.len() == hidden),
        "dw is [hidden]"
    );
    let chunk = rows_per_task(hidden) * hidden;
    let want_dw = dw.is_some();
    let partial: Vec<Vec<f64>> = dx
        .par_chunks_mut(chunk)
        .zip(x.par_chunks(chunk).zip(dy.par_chunks(chunk)))
        .map(|(dxc, (xc, gc))| {
            let mut sum = vec![0.0f64; if want_dw { hidden } else { 0 }];
            let rows = dxc
                .chunks_exact_mut(hidden)
                .zip(xc.chunks_exact(hidden).zip(gc.chunks_exact(hidden)));
            for (dxr, (xr, gr)) in rows {
                let r = inv_rms(xr, eps);
                let gwx: f64 = xr
                    .iter()
                    .zip(gr)
                    .zip(w)
                    .map(|((&x, &g), &w)| g as f64 * w as f64 * x as f64)
                    .sum();
                let c = r * r * r * gwx / hidden as f64;
                // In f64: the two terms cancel where dy ∘ w is parallel to x.
                for (((d, &x), &g), &w) in dxr.iter_mut().zip(xr).zip(gr).zip(w) {
                    *d = (r * (g as f64 * w as f64) - c * x as f64) as f32;
                }
                for ((s, &x), &g) in sum.iter_mut().zip(xr).zip(gr) {
                    *s += g as f64 * x as f64 * r;
                }
            }
            sum
        })
        .collect();
    if let Some(dw) = dw {
        for (j, out) in dw.iter_mut().enumerate() {
            *out = partial.iter().map(|p| p[j]).sum::<f64>() as f32;
        }
    }
}

/// y = w ∘ (x − mean) · rsqrt(var + eps) + b per row of `hidden` (the
/// biased variance, as torch's LayerNorm), the moments in f64.
pub fn layernorm(x: &[f32], w: &[f32], b: &[f32], hidden: usize, eps: f32, y: &mut [f32]) {
    assert!(
        x.len() == y.len() && w.len() == hidden && b.len() == hidden,
        "x, y [rows, hidden]; w, b [hidden]"
    );
    let chunk = rows_per_task(hidden) * hidden;
    y.par_chunks_mut(chunk)
        .zip(x.par_chunks(chunk))
        .for_each(|(yc, xc)| {
            for (yr, xr) in yc.chunks_exact_mut(hidden).zip(xc.chunks_exact(hidden)) {
                layernorm_row(xr, w, b, eps, yr);
            }
        });
}

/// h = layernorm(h + delta): a BERT sublayer's residual add and the norm
/// after it, in place.
pub fn residual_layernorm(
    h: &mut [f32],
    delta: &[f32],
    w: &[f32],
    b: &[f32],
    hidden: usize,
    eps: f32,
) {
    assert!(
        h.len() == delta.len() && w.len() == hidden && b.len() == hidden,
        "h, delta [rows, hidden]; w, b [hidden]"
    );
    let chunk = rows_per_task(hidden) * hidden;
    h.par_chunks_mut(chunk)
        .zip(delta.par_chunks(chunk))
        .for_each(|(hc, dc)| {
            let mut row = vec![0.0f32; hidden];
            for (hr, dr) in hc.chunks_exact_mut(hidden).zip(dc.chunks_exact(hidden)) {
                for ((r, &a), &d) in row.iter_mut().zip(hr.iter()).zip(dr) {
                    *r = a + d;
                }
                layernorm_row(&row, w, b, eps, hr);
            }
        });
}

fn layernorm_row(x: &[f32], w: &[f32], b: &[f32], eps: f32, y: &mut [f32]) {
    let n = x.len() as f64;
    let mean = x.iter().map(|&v| v as f64).sum::<f64>() / n;
    let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
    let r = (1.0 / (var + eps as f64).sqrt()) as f32;
    let mean = mean as f32;
    for (((yv, &xv), &wv), &bv) in y.iter_mut().zip(x).zip(w).zip(b) {
        *yv = wv * ((xv - mean) * r) + bv;
    }
}

/// x = x · Φ(x) = ½ x (1 + erf(x / √2)) in place: the exact GELU of BERT's
/// "gelu" (not the tanh form), with [`erf`] so that the loop vectorizes.
pub fn gelu_erf(x: &mut [f32]) {
    x.par_chunks_mut(16384).for_each(|c| {
        for v in c {
            *v = 0.5 * *v * (1.0 + erf(*v * std::f32::consts::FRAC_1_SQRT_2));
        }
    });
}

/// erf(x) within 5e-7 everywhere (Abramowitz & Stegun 7.1.26, good to
/// 1.5e-7, plus f32 rounding: erf(|x|) =
/// 1 − t·p(t)·e^(−x²), t = 1 / (1 + 0.3275911·|x|), p of degree 4),
/// branch-free with a libm-free exponential, so loops over it vectorize.
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    const P: f32 = 0.327_591_1;
    const A: [f32; 5] = [
        0.254_829_6,
        -0.284_496_72,
        1.421_413_8,
        -1.453_152_1,
        1.061_405_4,
    ];
    let z = x.abs();
    let t = 1.0 / (1.0 + P * z);
    let poly = A.iter().rev().fold(0.0, |p, &a| p * t + a) * t;
    let e = super::attention::exp2_nonpositive(-z * z * std::f32::consts::LOG2_E);
    (1.0 - poly * e).copysign(x)
}

/// rsqrt(mean(x²) + eps) of a row, the sum of squares in f64.
fn inv_rms(x: &[f32], eps: f32) -> f64 {
    let ss: f64 = x.iter().map(|&v| (v as f64) * (v as f64)).sum();
    1.0 / (ss / x.len() as f64 + eps as f64).sqrt()
}

fn normalize_row(x: &[f32], w: &[f32], eps: f32, y: &mut [f32]) {
    let r = inv_rms(x, eps) as f32;
    for ((yv, &xv), &wv) in y.iter_mut().zip(x).zip(w) {
        *yv = wv * (xv * r);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn erf_is_within_its_bound_of_libm() {
        let worst = (-60_000..=60_000)
            .map(|i| i as f32 * 1e-4)
            .map(|x| (erf(x) as f64 - libm::erf(x as f64)).abs())
            .fold(0.0, f64::max);
        assert!(worst < 5e-7, "erf off by {worst:e}");
        assert_eq!(erf(0.0), 0.0);
        assert_eq!(erf(-20.0), -1.0);
    }

    #[test]
    fn layernorm_matches_the_definition_and_the_residual_form_agrees() {
        let hidden = 7;
        let x: Vec<f32> = (0..5 * hidden)
            .map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.3)
            .collect();
        let delta: Vec<f32> = (0..5 * hidden).map(|i| (i % 3) as f32 - 1.0).collect();
        let w: Vec<f32> = (0..hidden).map(|i| 0.5 + i as f32 * 0.1).collect();
        let b: Vec<f32> = (0..hidden).map(|i| i as f32 * -0.2).collect();
        let mut y = vec![0.0; x.len()];
        layernorm(&x, &w, &b, hidden, 1e-5, &mut y);
        for (xr, yr) in x.chunks(hidden).zip(y.chunks(hidden)) {
            let mean = xr.iter().map(|&v| v as f64).sum::<f64>() / hidden as f64;
            let var = xr.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / hidden as f64;
            for j in 0..hidden {
                let want = w[j] as f64 * (xr[j] as f64 - mean) / (var + 1e-5).sqrt() + b[j] as f64;
                assert!((yr[j] as f64 - want).abs() < 1e-5, "{} vs {want}", yr[j]);
            }
        }
        let mut h = x.clone();
        residual_layernorm(&mut h, &delta, &w, &b, hidden, 1e-5);
        let sum: Vec<f32> = x.iter().zip(&delta).map(|(a, d)| a + d).collect();
        layernorm(&sum, &w, &b, hidden, 1e-5, &mut y);
        assert_eq!(h, y);
    }
}
