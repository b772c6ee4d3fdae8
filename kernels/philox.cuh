// Counter-based random numbers for dropout: Philox4x32-10 (Salmon et al.,
// "Parallel random numbers: as easy as 1, 2, 3", SC 2011). The mask of
// element e of a tensor is a pure function of (seed, offset, e), so the
// backward pass regenerates the forward pass's mask instead of storing it,
// and the CPU reference (src/cpu/philox.rs) computes the same bits.
//
// Element e uses word e % 4 of philox(key = seed, counter = offset + e / 4):
// it is kept when its top 24 bits, as a fraction of 2^24, are >= p, and then
// scaled by 1 / (1 - p).
#pragma once

#include "common.cuh"

namespace platypus {

struct Philox4 {
    uint32_t v[4];
};

/// Philox4x32 with 10 rounds of `counter` (128 bits) under `key` (64 bits).
__device__ __forceinline__ Philox4 philox4x32_10(uint64_t counter_lo, uint64_t key) {
    uint32_t c0 = static_cast<uint32_t>(counter_lo), c1 = static_cast<uint32_t>(counter_lo >> 32), c2 = 0, c3 = 0;
    uint32_t k0 = static_cast<uint32_t>(key), k1 = static_cast<uint32_t>(key >> 32);
#pragma unroll
    for (int round = 0; round < 10; ++round) {
        const uint32_t hi0 = __umulhi(0xD2511F53u, c0), lo0 = 0xD2511F53u * c0;
        const uint32_t hi1 = __umulhi(0xCD9E8D57u, c2), lo1 = 0xCD9E8D57u * c2;
        c0 = hi1 ^ c1 ^ k0;
        c1 = lo1;
        c2 = hi0 ^ c3 ^ k1;
        c3 = lo0;
        k0 += 0x9E3779B9u;
        k1 += 0xBB67AE85u;
    }
    return {{c0, c1, c2, c3}};
}

/// An element is kept when the top 24 bits of its word are >= this.
__device__ __forceinline__ uint32_t dropout_threshold(float p) { return static_cast<uint32_t>(p * 16777216.0f); }

/// Dropout decision for 8 consecutive elements starting at element `first`
/// (a multiple of 4): bit i set when element first + i is kept.
__device__ __forceinline__ unsigned dropout_keep8(uint64_t seed, uint64_t offset, uint64_t first, float p) {
    const uint32_t threshold = dropout_threshold(p);
    unsigned bits = 0;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const Philox4 r = philox4x32_10(offset + first / 4 + half, seed);
#pragma unroll
        for (int w = 0; w < 4; ++w) bits |= static_cast<unsigned>((r.v[w] >> 8) >= threshold) << (half * 4 + w);
    }
    return bits;
}

/// Dropout decision for elements `first` and first + 1 (first even): bits 0 and 1.
__device__ __forceinline__ unsigned dropout_keep2(uint64_t seed, uint64_t offset, uint64_t first, float p) {
    const uint32_t threshold = dropout_threshold(p);
    const Philox4 r = philox4x32_10(offset + first / 4, seed);
    // Words 0, 1 or 2, 3: selected, not indexed, so r stays in registers.
    const bool upper = first % 4 != 0;
    const uint32_t w0 = upper ? r.v[2] : r.v[0], w1 = upper ? r.v[3] : r.v[1];
    return static_cast<unsigned>((w0 >> 8) >= threshold) | static_cast<unsigned>((w1 >> 8) >= threshold) << 1;
}

}  // namespace platypus
