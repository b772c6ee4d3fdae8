//! Greedy and temperature / top-p choice of the next token, reference in
//! f64. The definition is the one `kernels/sampling.cu` computes without a
//! sort (see [`crate::ops::sampling`]):
//!
//! - argmax: the first index of the largest logit; NaN is larger than every
//!   number (the first NaN wins, as torch.argmax), −0 equals +0.
//! - sample: w_i = exp((z_i − max z) / T); the nucleus is every i with
//!   w_i > 0 and w_i ≥ τ, τ the largest threshold whose kept mass
//!   Σ_{w_i ≥ τ} w_i is ≥ top_p · Σ w (no cut at top_p = 1); the token is
//!   the first nucleus index, in index order, whose running nucleus mass
//!   exceeds u · (nucleus mass), else the last nucleus index.

/// The first index of the largest value of `row` (NaN above everything).
pub fn argmax(row: &[f32]) -> u32 {
    let key = |v: f32| -> (bool, f32) { (v.is_nan(), if v.is_nan() { 0.0 } else { v }) };
    let mut best = 0;
    for (i, &v) in row.iter().enumerate().skip(1) {
        let (nan, value) = key(v);
        let (best_nan, best_value) = key(row[best]);
        if !best_nan && (nan || value > best_value) {
            best = i;
        }
    }
    best as u32
}

/// One row's nucleus: the weights, the threshold and the masses.
#[derive(Debug, Clone, PartialEq)]
pub struct Nucleus {
    /// w_i = exp((z_i − max z) / T) (1 at the max, 0 at −inf).
    pub weights: Vec<f64>,
    /// Σ w_i, in index order.
    pub total: f64,
    /// τ: the smallest kept weight (0 when top_p = 1).
    pub threshold: f64,
    /// Σ of the kept weights, in index order.
    pub kept_mass: f64,
}

impl Nucleus {
    /// The nucleus of `row` at temperature `temperature` (> 0) and `top_p`
    /// in (0, 1]; `None` when the row has a NaN or +inf logit or no logit
    /// above −inf (nothing can be sampled).
    pub fn new(row: &[f32], temperature: f32, top_p: f32) -> Option<Nucleus> {
        if row.iter().any(|v| v.is_nan() || *v == f32::INFINITY) {
            return None;
        }
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        if max == f32::NEG_INFINITY {
            return None;
        }
        let (max, t) = (max as f64, temperature as f64);
        let weights: Vec<f64> = row.iter().map(|&z| ((z as f64 - max) / t).exp()).collect();
        let total: f64 = weights.iter().sum();
        let threshold = if top_p >= 1.0 {
            0.0
        } else {
            // Distinct weights, largest first, with the mass at or above each:
            // τ is the first whose mass reaches the target.
            let target = top_p as f64 * total;
            let mut sorted: Vec<f64> = weights.iter().copied().filter(|&w| w > 0.0).collect();
            sorted.sort_by(|a, b| b.total_cmp(a));
            let mut mass = 0.0;
            let mut tau = *sorted.last().expect("the max weighs 1");
            let mut i = 0;
            while i < sorted.len() {
                let w = sorted[i];
                while i < sorted.len() && sorted[i] == w {
                    mass += sorted[i];
                    i += 1;
                }
                if mass >= target {
                    tau = w;
                    break;
                }
            }
            tau
        };
        let kept_mass = weights.iter().filter(|&&w| w > 0.0 && w >= threshold).sum();
        Some(Nucleus {
            weights,
            total,
            threshold,
            kept_mass,
        })
    }

    /// True if token `i` is in the nucleus.
    pub fn keeps(&self, i: usize) -> bool {
        let w = self.weights[i];
        w > 0.0 && w >= self.threshold
    }

    /// The token for the uniform `u` in [0, 1): the first kept index whose
    /// running kept mass exceeds u · kept_mass, else the last kept index.
    pub fn pick(&self, u: f64) -> u32 {
        let target = u * self.kept_mass;
        let mut cum = 0.0;
        let mut last = 0;
        for (i, &w) in self.weights.iter().enumerate() {
            if !self.keeps(i) {
                continue;
            }
            cum += w;
            if target < cum {
                return i as u32;
            }
            last = i;
        }
        last as u32
    }
}

/// The token drawn from `row` with uniform `u` in [0, 1), or `None` for a
/// row [`Nucleus::new`] refuses.
pub fn sample(row: &[f32], temperature: f32, top_p: f32, u: f64) -> Option<u32> {
    Nucleus::new(row, temperature, top_p).map(|n| n.pick(u))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmax_takes_the_first_maximum_and_nan_wins() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), 1);
        assert_eq!(argmax(&[f32::NEG_INFINITY; 4]), 0);
        assert_eq!(argmax(&[1.0, f32::NAN, 5.0, f32::NAN]), 1);
        assert_eq!(argmax(&[-0.0, 0.0]), 0);
        assert_eq!(argmax(&[-1.0, 0.0, -0.0]), 1);
        assert_eq!(argmax(&[7.0]), 0);
    }

    #[test]
    fn nucleus_keeps_ties_at_the_threshold_and_everything_at_top_p_1() {
        // Weights 1, 1, e^-1, e^-1, e^-2 at T = 1.
        let row = [0.0, -1.0, 0.0, -2.0, -1.0];
        let total = 2.0 + 2.0 * (-1.0f64).exp() + (-2.0f64).exp();
        // top_p just above 2 / total: the two 1s are not enough, both e^-1 join.
        let n = Nucleus::new(&row, 1.0, (2.0 / total + 1e-6) as f32).unwrap();
        assert_eq!(n.threshold, (-1.0f64).exp());
        assert_eq!((0..5).filter(|&i| n.keeps(i)).count(), 4);
        let n = Nucleus::new(&row, 1.0, 0.1).unwrap();
        assert_eq!(n.threshold, 1.0);
        assert_eq!(n.kept_mass, 2.0);
        // u below 1/2 picks index 0, above picks index 2 (index order).
        assert_eq!(n.pick(0.49), 0);
        assert_eq!(n.pick(0.51), 2);
        let n = Nucleus::new(&row, 1.0, 1.0).unwrap();
        assert_eq!(n.threshold, 0.0);
        assert_eq!(n.pick(0.999_999), 4);
        assert_eq!(n.pick(0.0), 0);
    }

    #[test]
    fn masked_tokens_are_never_drawn_and_bad_rows_are_refused() {
        let row = [f32::NEG_INFINITY, 0.0, f32::NEG_INFINITY];
        for u in [0.0, 0.5, 0.999] {
            assert_eq!(sample(&row, 0.7, 1.0, u), Some(1));
        }
        assert_eq!(sample(&[0.0, f32::NAN], 1.0, 1.0, 0.5), None);
        assert_eq!(sample(&[0.0, f32::INFINITY], 1.0, 1.0, 0.5), None);
        assert_eq!(sample(&[f32::NEG_INFINITY; 3], 1.0, 1.0, 0.5), None);
    }

    /// Empirical frequencies of 40,000 draws with a fixed seed lie within
    /// 5 standard deviations of the nucleus probabilities, and no token
    /// outside the nucleus is ever drawn.
    #[test]
    fn draws_follow_the_nucleus_distribution() {
        let row: Vec<f32> = (0..12).map(|i| ((i * 7) % 12) as f32 * 0.3 - 1.5).collect();
        let (temperature, top_p) = (0.8, 0.85);
        let n = Nucleus::new(&row, temperature, top_p).unwrap();
        let draws = 40_000;
        let mut counts = [0usize; 12];
        let mut state = 0x1234_5678_9abc_def0u64;
        for _ in 0..draws {
            // splitmix64
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            let u = ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64;
            counts[sample(&row, temperature, top_p, u).unwrap() as usize] += 1;
        }
        let kept = (0..12).filter(|&i| n.keeps(i)).count();
        assert!(kept > 2 && kept < 12, "a nucleus of {kept} tests little");
        for (i, &c) in counts.iter().enumerate() {
            if !n.keeps(i) {
                assert_eq!(c, 0, "token {i} is outside the nucleus");
                continue;
            }
            let p = n.weights[i] / n.kept_mass;
            let sd = (p * (1.0 - p) / draws as f64).sqrt();
            let f = c as f64 / draws as f64;
            assert!(
                (f - p).abs() < 5.0 * sd,
                "token {i}: frequency {f}, probability {p}"
            );
        }
        // The nucleus is the smallest set of most likely tokens reaching top_p.
        let mut w: Vec<f64> = n.weights.clone();
        w.sort_by(|a, b| b.total_cmp(a));
        let reached = w[..kept].iter().sum::<f64>();
        let short = w[..kept - 1].iter().sum::<f64>();
        assert!(reached >= top_p as f64 * n.total && short < top_p as f64 * n.total);
    }
}
