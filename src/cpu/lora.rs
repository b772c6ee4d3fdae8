//! LoRA linear layer reference: y = x Wᵀ + s · dropout(x) Aᵀ Bᵀ, in f64.
//!
//! Row-major layouts: x [tokens, in], W [out, in] (frozen), A [rank, in],
//! B [out, rank], y [tokens, out]. s is the adapter scale (alpha / rank, or
//! alpha / sqrt(rank) for rsLoRA), computed by the caller. Dropout applies to
//! the adapter branch only: element e = t * in + i of x is multiplied by
//! keep(e) / (1 - p), the mask drawn by [`Dropout::keep`], so the backward
//! pass regenerates it from (seed, offset) instead of storing it.

use super::philox::Dropout;

/// Sizes shared by every tensor of one LoRA call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoraDims {
    /// Rows of x and y (batch * seq).
    pub tokens: usize,
    /// Columns of x, W and A.
    pub in_features: usize,
    /// Columns of y; rows of W and B.
    pub out_features: usize,
    /// Adapter rank r: rows of A, columns of B.
    pub rank: usize,
}

impl LoraDims {
    fn check(&self, x: &[f32], w: &[f32], a: &[f32], b: &[f32]) {
        let (t, n, m, r) = (self.tokens, self.in_features, self.out_features, self.rank);
        assert_eq!(x.len(), t * n, "x is [tokens, in]");
        assert_eq!(w.len(), m * n, "W is [out, in]");
        assert_eq!(a.len(), r * n, "A is [rank, in]");
        assert_eq!(b.len(), m * r, "B is [out, rank]");
    }
}

/// Dropout multiplier of every element of x in f64: keep / (1 - p), or 1
/// everywhere without dropout.
fn dropout_factors(dims: &LoraDims, dropout: Option<&Dropout>) -> Vec<f64> {
    let n = dims.tokens * dims.in_features;
    match dropout {
        None => vec![1.0; n],
        Some(d) => {
            let kept = 1.0 / (1.0 - d.p as f64);
            (0..n as u64)
                .map(|e| if d.keep(e) { kept } else { 0.0 })
                .collect()
        }
    }
}

fn dot(a: &[f64], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| x * y as f64).sum()
}

/// dropout(x) in f64 and u = dropout(x) Aᵀ [tokens, rank] in f64.
fn adapter_input(x: &[f32], a: &[f32], dims: &LoraDims, factors: &[f64]) -> (Vec<f64>, Vec<f64>) {
    let n = dims.in_features;
    let xd: Vec<f64> = x.iter().zip(factors).map(|(&v, &f)| v as f64 * f).collect();
    let r = dims.rank;
    let mut u = vec![0.0f64; dims.tokens * r];
    for t in 0..dims.tokens {
        for j in 0..r {
            u[t * r + j] = dot(&xd[t * n..][..n], &a[j * n..][..n]);
        }
    }
    (xd, u)
}

fn to_f32(v: Vec<f64>) -> Vec<f32> {
    v.into_iter().map(|x| x as f32).collect()
}

/// Forward: returns (y [tokens, out], u [tokens, rank]) with
/// u = dropout(x) Aᵀ, before the scale.
pub fn forward(
    x: &[f32],
    w: &[f32],
    a: &[f32],
    b: &[f32],
    dims: &LoraDims,
    scale: f32,
    dropout: Option<&Dropout>,
) -> (Vec<f32>, Vec<f32>) {
    dims.check(x, w, a, b);
    let (n, m, r) = (dims.in_features, dims.out_features, dims.rank);
    let s = scale as f64;
    let factors = dropout_factors(dims, dropout);
    let (_, u) = adapter_input(x, a, dims, &factors);
    let mut y = vec![0.0f32; dims.tokens * m];
    for t in 0..dims.tokens {
        let xr = &x[t * n..][..n];
        let ur = &u[t * r..][..r];
        for o in 0..m {
            let base: f64 = xr
                .iter()
                .zip(&w[o * n..][..n])
                .map(|(&xv, &wv)| xv as f64 * wv as f64)
                .sum();
            let lora = dot(ur, &b[o * r..][..r]);
            y[t * m + o] = (base + s * lora) as f32;
        }
    }
    (y, to_f32(u))
}

/// Gradients for upstream `dy` [tokens, out]: returns (dx [tokens, in],
/// dA [rank, in], dB [out, rank]). W is frozen and gets none.
///
/// With v = dy B [tokens, rank] and the dropout factors m = keep / (1 - p):
/// dx = dy W + s m ∘ (v A), dA = s vᵀ dropout(x), dB = s dyᵀ u. The mask
/// and u are recomputed from the inputs.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    x: &[f32],
    w: &[f32],
    a: &[f32],
    b: &[f32],
    dy: &[f32],
    dims: &LoraDims,
    scale: f32,
    dropout: Option<&Dropout>,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    dims.check(x, w, a, b);
    let (tokens, n, m, r) = (dims.tokens, dims.in_features, dims.out_features, dims.rank);
    assert_eq!(dy.len(), tokens * m, "dy is [tokens, out]");
    let s = scale as f64;
    let factors = dropout_factors(dims, dropout);
    let (xd, u) = adapter_input(x, a, dims, &factors);
    let mut dx = vec![0.0f64; tokens * n];
    let mut da = vec![0.0f64; r * n];
    let mut db = vec![0.0f64; m * r];
    for t in 0..tokens {
        let dyr = &dy[t * m..][..m];
        // v = dy B for this token.
        let mut v = vec![0.0f64; r];
        for (o, &g) in dyr.iter().enumerate() {
            for (vj, &bv) in v.iter_mut().zip(&b[o * r..][..r]) {
                *vj += g as f64 * bv as f64;
            }
        }
        let dxr = &mut dx[t * n..][..n];
        for (o, &g) in dyr.iter().enumerate() {
            for (d, &wv) in dxr.iter_mut().zip(&w[o * n..][..n]) {
                *d += g as f64 * wv as f64;
            }
            for (j, dbv) in db[o * r..][..r].iter_mut().enumerate() {
                *dbv += s * g as f64 * u[t * r + j];
            }
        }
        for (j, &vj) in v.iter().enumerate() {
            let ar = &a[j * n..][..n];
            let dar = &mut da[j * n..][..n];
            for i in 0..n {
                dxr[i] += s * factors[t * n + i] * vj * ar[i] as f64;
                dar[i] += s * vj * xd[t * n + i];
            }
        }
    }
    (to_f32(dx), to_f32(da), to_f32(db))
}

/// s (B A)[o][i] in f64.
fn delta(a: &[f32], b: &[f32], o: usize, i: usize, in_features: usize, rank: usize, s: f64) -> f64 {
    let sum: f64 = (0..rank)
        .map(|j| b[o * rank + j] as f64 * a[j * in_features + i] as f64)
        .sum();
    s * sum
}

fn merge_with_sign(
    w: &mut [f32],
    a: &[f32],
    b: &[f32],
    out_features: usize,
    in_features: usize,
    rank: usize,
    s: f64,
) {
    assert_eq!(w.len(), out_features * in_features, "W is [out, in]");
    assert_eq!(a.len(), rank * in_features, "A is [rank, in]");
    assert_eq!(b.len(), out_features * rank, "B is [out, rank]");
    for o in 0..out_features {
        for i in 0..in_features {
            let wv = &mut w[o * in_features + i];
            *wv = (*wv as f64 + delta(a, b, o, i, in_features, rank, s)) as f32;
        }
    }
}

/// Folds the adapter into the base weight: W += s B A, each element summed
/// in f64 and rounded once to f32. Callers round to the weight dtype.
pub fn merge(
    w: &mut [f32],
    a: &[f32],
    b: &[f32],
    out_features: usize,
    in_features: usize,
    rank: usize,
    scale: f32,
) {
    merge_with_sign(w, a, b, out_features, in_features, rank, scale as f64);
}

/// Takes a merged adapter back out: W -= s B A (as [`merge`], negated).
pub fn unmerge(
    w: &mut [f32],
    a: &[f32],
    b: &[f32],
    out_features: usize,
    in_features: usize,
    rank: usize,
    scale: f32,
) {
    merge_with_sign(w, a, b, out_features, in_features, rank, -(scale as f64));
}

#[cfg(test)]
mod tests {
    use super::super::philox::philox4x32_10;
    use super::*;

    /// `n` values uniform in [-1, 1) from Philox under `seed` (deterministic).
    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|e| {
                let word = philox4x32_10([e as u32, 0, 0, 0], [seed, 0x5eed])[0];
                (word >> 8) as f32 / (1u32 << 23) as f32 - 1.0
            })
            .collect()
    }

    struct Case {
        dims: LoraDims,
        x: Vec<f32>,
        w: Vec<f32>,
        a: Vec<f32>,
        b: Vec<f32>,
        dy: Vec<f32>,
    }

    fn case(tokens: usize, in_features: usize, out_features: usize, rank: usize) -> Case {
        let dims = LoraDims {
            tokens,
            in_features,
            out_features,
            rank,
        };
        Case {
            dims,
            x: values(tokens * in_features, 1),
            w: values(out_features * in_features, 2),
            a: values(rank * in_features, 3),
            b: values(out_features * rank, 4),
            dy: values(tokens * out_features, 5),
        }
    }

    /// The scalar loss sum(y * dy), written out directly in f64 from the
    /// layer's definition (independent of `forward`).
    fn loss(c: &Case, x: &[f64], a: &[f64], b: &[f64], s: f64, dropout: Option<&Dropout>) -> f64 {
        let LoraDims {
            tokens,
            in_features: n,
            out_features: m,
            rank: r,
        } = c.dims;
        let mut total = 0.0;
        for t in 0..tokens {
            for o in 0..m {
                let mut y = 0.0;
                for i in 0..n {
                    y += x[t * n + i] * c.w[o * n + i] as f64;
                }
                for j in 0..r {
                    let mut u = 0.0;
                    for i in 0..n {
                        let e = t * n + i;
                        let f = dropout.map_or(1.0, |d| {
                            if d.keep(e as u64) {
                                1.0 / (1.0 - d.p as f64)
                            } else {
                                0.0
                            }
                        });
                        u += x[e] * f * a[j * n + i];
                    }
                    y += s * u * b[o * r + j];
                }
                total += y * c.dy[t * m + o] as f64;
            }
        }
        total
    }

    #[test]
    fn forward_with_zero_b_is_the_base_layer() {
        let mut c = case(5, 13, 7, 4);
        c.b.iter_mut().for_each(|v| *v = 0.0);
        let (y, u) = forward(&c.x, &c.w, &c.a, &c.b, &c.dims, 2.0, None);
        let (t, n, m) = (c.dims.tokens, c.dims.in_features, c.dims.out_features);
        for ti in 0..t {
            for o in 0..m {
                let want: f64 = (0..n)
                    .map(|i| c.x[ti * n + i] as f64 * c.w[o * n + i] as f64)
                    .sum();
                assert_eq!(y[ti * m + o], want as f32, "y[{ti}][{o}]");
            }
        }
        assert!(u.iter().any(|&v| v != 0.0), "u does not depend on B");
    }

    #[test]
    fn forward_matches_the_definition() {
        let c = case(4, 9, 6, 3);
        let d = Dropout {
            p: 0.25,
            seed: 99,
            offset: 3,
        };
        for dropout in [None, Some(&d)] {
            let (y, _) = forward(&c.x, &c.w, &c.a, &c.b, &c.dims, 1.5, dropout);
            let x64: Vec<f64> = c.x.iter().map(|&v| v as f64).collect();
            let a64: Vec<f64> = c.a.iter().map(|&v| v as f64).collect();
            let b64: Vec<f64> = c.b.iter().map(|&v| v as f64).collect();
            let got: f64 = y
                .iter()
                .zip(&c.dy)
                .map(|(&y, &g)| y as f64 * g as f64)
                .sum();
            let want = loss(&c, &x64, &a64, &b64, 1.5, dropout);
            assert!(
                (got - want).abs() < 1e-5 * want.abs().max(1.0),
                "{got} vs {want}"
            );
        }
    }

    /// Central differences of `loss` with respect to each element of `p`.
    fn numeric_grad(p: &[f32], h: f64, mut f: impl FnMut(&[f64]) -> f64) -> Vec<f64> {
        let mut v: Vec<f64> = p.iter().map(|&x| x as f64).collect();
        (0..v.len())
            .map(|k| {
                let orig = v[k];
                v[k] = orig + h;
                let up = f(&v);
                v[k] = orig - h;
                let down = f(&v);
                v[k] = orig;
                (up - down) / (2.0 * h)
            })
            .collect()
    }

    fn assert_grad(what: &str, got: &[f32], want: &[f64]) {
        assert_eq!(got.len(), want.len(), "{what}");
        let scale = want.iter().fold(1.0f64, |m, v| m.max(v.abs()));
        for (k, (&g, &w)) in got.iter().zip(want).enumerate() {
            assert!(
                (g as f64 - w).abs() <= 1e-6 * scale,
                "{what}[{k}]: {g} vs finite difference {w}"
            );
        }
    }

    #[test]
    fn backward_matches_finite_differences() {
        let c = case(3, 10, 6, 4);
        let s = 0.75f32;
        let d = Dropout {
            p: 0.3,
            seed: 0xfeed_f00d_1234,
            offset: 11,
        };
        let dropped = (0..c.x.len() as u64).filter(|&e| !d.keep(e)).count();
        assert!(dropped > 0 && dropped < c.x.len(), "mask drops {dropped}");
        for dropout in [None, Some(&d)] {
            let (dx, da, db) = backward(&c.x, &c.w, &c.a, &c.b, &c.dy, &c.dims, s, dropout);
            let f64s = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
            let (x, a, b) = (f64s(&c.x), f64s(&c.a), f64s(&c.b));
            let s = s as f64;
            // The loss is linear in each of x, A and B, so central
            // differences are exact up to rounding at any step.
            let h = 0.25;
            let num_dx = numeric_grad(&c.x, h, |x| loss(&c, x, &a, &b, s, dropout));
            let num_da = numeric_grad(&c.a, h, |a| loss(&c, &x, a, &b, s, dropout));
            let num_db = numeric_grad(&c.b, h, |b| loss(&c, &x, &a, b, s, dropout));
            let tag = if dropout.is_some() {
                "with dropout"
            } else {
                "no dropout"
            };
            assert_grad(&format!("dx {tag}"), &dx, &num_dx);
            assert_grad(&format!("dA {tag}"), &da, &num_da);
            assert_grad(&format!("dB {tag}"), &db, &num_db);
        }
    }

    #[test]
    fn dropped_inputs_get_only_the_base_gradient() {
        let c = case(2, 8, 5, 2);
        let d = Dropout {
            p: 0.5,
            seed: 7,
            offset: 0,
        };
        let (dx, _, _) = backward(&c.x, &c.w, &c.a, &c.b, &c.dy, &c.dims, 2.0, Some(&d));
        let mut zero_b = c.b.clone();
        zero_b.iter_mut().for_each(|v| *v = 0.0);
        let (base, _, _) = backward(&c.x, &c.w, &c.a, &zero_b, &c.dy, &c.dims, 2.0, Some(&d));
        for e in 0..c.x.len() {
            if !d.keep(e as u64) {
                assert_eq!(dx[e], base[e], "dropped element {e}");
            }
        }
    }

    /// Distance from |x| to the next f32 up.
    fn ulp(x: f32) -> f32 {
        let m = x.abs();
        f32::from_bits(m.to_bits() + 1) - m
    }

    #[test]
    fn unmerge_undoes_merge_to_within_an_ulp() {
        let (m, n, r) = (24, 40, 8);
        let w = values(m * n, 6);
        let a = values(r * n, 7);
        let b: Vec<f32> = values(m * r, 8).iter().map(|v| v * 0.1).collect();
        let mut merged = w.clone();
        merge(&mut merged, &a, &b, m, n, r, 2.0);
        for o in 0..m {
            for i in 0..n {
                let want = w[o * n + i] as f64 + 2.0 * delta(&a, &b, o, i, n, r, 1.0);
                assert_eq!(merged[o * n + i], want as f32, "W[{o}][{i}] merged");
            }
        }
        let mut back = merged.clone();
        unmerge(&mut back, &a, &b, m, n, r, 2.0);
        // Two roundings: the merged weight is off by half an ulp of itself,
        // the unmerged one adds half an ulp of its own.
        for k in 0..w.len() {
            let bound = ulp(w[k].abs().max(merged[k].abs()));
            assert!(
                (back[k] - w[k]).abs() <= bound,
                "W[{k}]: {} -> {} -> {}",
                w[k],
                merged[k],
                back[k]
            );
        }
    }
}
