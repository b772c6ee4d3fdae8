//! Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2,
//! 3", SC 2011) and the dropout mask built on it, bit for bit as
//! `kernels/philox.cuh` computes them on the device.
//!
//! The mask of element e of a tensor is a pure function of (seed, offset, e):
//! element e uses word e % 4 of philox(counter = offset + e / 4, key = seed),
//! and is kept when the top 24 bits of that word, as a fraction of 2^24, are
//! >= p. Kept elements are scaled by 1 / (1 - p).

/// Multiplier of counter word 0.
pub(crate) const M0: u32 = 0xD251_1F53;
/// Multiplier of counter word 2.
pub(crate) const M1: u32 = 0xCD9E_8D57;
/// Key increments (Weyl sequence) after every round: golden ratio, sqrt(3) - 1.
pub(crate) const W0: u32 = 0x9E37_79B9;
pub(crate) const W1: u32 = 0xBB67_AE85;

/// (high, low) 32-bit halves of the 64-bit product a * b.
fn mul_hi_lo(a: u32, b: u32) -> (u32, u32) {
    let product = a as u64 * b as u64;
    ((product >> 32) as u32, product as u32)
}

/// Philox4x32 with 10 rounds of `counter` under `key`.
pub fn philox4x32_10(counter: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let [mut c0, mut c1, mut c2, mut c3] = counter;
    let [mut k0, mut k1] = key;
    for _ in 0..10 {
        let (hi0, lo0) = mul_hi_lo(M0, c0);
        let (hi1, lo1) = mul_hi_lo(M1, c2);
        (c0, c1, c2, c3) = (hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0);
        k0 = k0.wrapping_add(W0);
        k1 = k1.wrapping_add(W1);
    }
    [c0, c1, c2, c3]
}

/// Inverted dropout with drop probability `p`, its mask drawn from Philox
/// under `seed`, starting at counter `offset` (so consecutive calls with the
/// same seed can use disjoint streams).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Dropout {
    /// Probability of dropping an element, in [0, 1).
    pub p: f32,
    /// Philox key.
    pub seed: u64,
    /// Philox counter of element 0 (element e uses counter offset + e / 4).
    pub offset: u64,
}

impl Dropout {
    /// Whether element `e` (row-major index into the tensor) is kept.
    pub fn keep(&self, e: u64) -> bool {
        self.keep4(e / 4)[(e % 4) as usize]
    }

    /// Whether elements 4·`group` .. 4·`group` + 4 are kept: the four that
    /// share one Philox call.
    pub fn keep4(&self, group: u64) -> [bool; 4] {
        let c = self.offset.wrapping_add(group);
        let words = philox4x32_10(
            [c as u32, (c >> 32) as u32, 0, 0],
            [self.seed as u32, (self.seed >> 32) as u32],
        );
        let threshold = self.threshold();
        words.map(|w| (w >> 8) >= threshold)
    }

    /// A word w keeps its element when w >> 8 (its top 24 bits) is at least
    /// this: p · 2^24 by an f32 multiply then truncation, as the device
    /// computes it.
    pub(crate) fn threshold(&self) -> u32 {
        (self.p * 16_777_216.0f32) as u32
    }

    /// Factor applied to kept elements: 1 / (1 - p).
    pub fn scale(&self) -> f32 {
        1.0 / (1.0 - self.p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The three philox4x32 10-round lines of Random123's tests/kat_vectors
    /// (counter, key, expected).
    const KAT: [([u32; 4], [u32; 2], [u32; 4]); 3] = [
        (
            [0, 0, 0, 0],
            [0, 0],
            [0x6627_e8d5, 0xe169_c58d, 0xbc57_ac4c, 0x9b00_dbd8],
        ),
        (
            [u32::MAX; 4],
            [u32::MAX; 2],
            [0x408f_276d, 0x41c8_3b0e, 0xa20b_c7c6, 0x6d54_51fd],
        ),
        (
            [0x243f_6a88, 0x85a3_08d3, 0x1319_8a2e, 0x0370_7344],
            [0xa409_3822, 0x299f_31d0],
            [0xd16c_fe09, 0x94fd_cceb, 0x5001_e420, 0x2412_6ea1],
        ),
    ];

    #[test]
    fn philox_matches_random123_known_answers() {
        for (counter, key, want) in KAT {
            assert_eq!(
                philox4x32_10(counter, key),
                want,
                "counter {counter:08x?} key {key:08x?}"
            );
        }
    }

    /// Fraction of the first `n` elements kept.
    fn keep_rate(d: &Dropout, n: u64) -> f64 {
        (0..n).filter(|&e| d.keep(e)).count() as f64 / n as f64
    }

    #[test]
    fn dropout_keep_rate_is_one_minus_p() {
        let n = 1_000_000u64;
        for (p, seed, offset) in [(0.05f32, 1234u64, 0u64), (0.5, 0xdead_beef_0bad_f00d, 77)] {
            let d = Dropout { p, seed, offset };
            let rate = keep_rate(&d, n);
            let q = 1.0 - p as f64;
            let sigma = (q * (1.0 - q) / n as f64).sqrt();
            assert!(
                (rate - q).abs() < 4.0 * sigma,
                "p {p}: kept {rate}, want {q} +- {}",
                4.0 * sigma
            );
        }
    }

    #[test]
    fn dropout_with_p_zero_keeps_everything() {
        let d = Dropout {
            p: 0.0,
            seed: 42,
            offset: 5,
        };
        assert!((0..100_000).all(|e| d.keep(e)));
        assert_eq!(d.scale(), 1.0);
    }

    /// Counters and keys shaped as the dropout rule builds them (64-bit
    /// counter in words 0-1, 64-bit seed split low/high), the expected words
    /// computed by randomgen 2.5.1's Philox(number=4, width=32).
    const DROPOUT_SHAPED: [([u32; 4], [u32; 2], [u32; 4]); 3] = [
        (
            [0, 0, 0, 0],
            [1234, 0],
            [0x2090_b348, 0xda7c_f0ab, 0x4401_906f, 0xcbca_470e],
        ),
        (
            [0xffff_ffff, 0, 0, 0],
            [0x89ab_cdef, 0x0123_4567],
            [0x0734_02a4, 0x9775_331e, 0x64c9_92ad, 0x3250_45ac],
        ),
        (
            [0, 1, 0, 0],
            [0x89ab_cdef, 0x0123_4567],
            [0xd941_2d6a, 0x59dd_3f68, 0x9d46_a012, 0x5d27_ddd9],
        ),
    ];

    #[test]
    fn philox_matches_randomgen_on_dropout_shaped_inputs() {
        for (counter, key, want) in DROPOUT_SHAPED {
            assert_eq!(
                philox4x32_10(counter, key),
                want,
                "counter {counter:08x?} key {key:08x?}"
            );
        }
    }

    #[test]
    fn dropout_element_uses_word_e_mod_4_of_counter_offset_plus_e_div_4() {
        // p = 0.5 keeps a word iff its top bit is set. Elements 0..4 use
        // counter 0xffffffff, elements 4..8 counter 1 << 32 (the carry into
        // counter word 1), words as in DROPOUT_SHAPED.
        let d = Dropout {
            p: 0.5,
            seed: 0x0123_4567_89ab_cdef,
            offset: 0xffff_ffff,
        };
        let want = [false, true, false, false, true, false, true, false];
        let got: Vec<bool> = (0..8).map(|e| d.keep(e)).collect();
        assert_eq!(got, want);
    }
}
