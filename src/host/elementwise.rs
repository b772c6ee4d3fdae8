//! Row-wise f32 ops of the Llama forward pass on rayon threads: the
//! embedding gather, SwiGLU, and the residual add fused with RMSNorm.

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
    out.par_chunks_mut(4096)
        .zip(gate.par_chunks(4096).zip(up.par_chunks(4096)))
        .for_each(|(o, (g, u))| {
            for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
                *o = g / (1.0 + (-g).exp()) * u;
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

fn normalize_row(x: &[f32], w: &[f32], eps: f32, y: &mut [f32]) {
    let ss: f64 = x.iter().map(|&v| (v as f64) * (v as f64)).sum();
    let r = (1.0 / (ss / x.len() as f64 + eps as f64).sqrt()) as f32;
    for ((yv, &xv), &wv) in y.iter_mut().zip(x).zip(w) {
        *yv = wv * (xv * r);
    }
}
