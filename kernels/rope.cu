// Rotary position embeddings, in place, on q [tokens, q_heads, head_dim] and
// k [tokens, k_heads, head_dim] (tokens = batch * seq, the layout the q/k
// projections produce), forward and backward.
//
// Pair (a, b) of a head row at position pos is rotated by angle
// pos * inv_freq[i], inv_freq[i] = theta^(-2i / head_dim):
//   a' = a cos - b sin,  b' = a sin + b cos
// backward rotates by -angle (the rotation's transpose). Pairs are
//   rotate_half (Hugging Face): (i, i + head_dim/2),
//   interleaved (Meta):         (2i, 2i + 1).
// Angles in fp32 computed as Hugging Face does (inv_freq in fp32, fp32
// product with the position), cos/sin with the accurate sincosf: no fast-math,
// whose __sinf loses accuracy at the large angles of long positions.
//
// One thread per (token, run of P pairs); it computes its P cos/sin once and
// applies them to that run in every q and k head of the token, so the trig
// cost is shared by all heads. With 128-bit accesses a warp touches 16-byte
// pieces of consecutive runs of one head row: coalesced.
//
// Memory traffic: q and k are read and written once: 2 * tokens * (q_heads +
// k_heads) * head_dim * E bytes, plus 4 bytes of position per token.
// Target: >= 90% of HBM bandwidth on A100/H100.
#include "common.cuh"

namespace platypus {

constexpr int kRopeThreads = 256;

/// Rotates one run of P pairs in `row` with the given cos/sin.
template <typename T, int P, bool INTERLEAVED, bool VECTOR>
__device__ __forceinline__ void rotate_run(T* row, int first_pair, int head_dim, const float (&c)[P], const float (&s)[P]) {
    if constexpr (INTERLEAVED) {
        float v[2 * P];
        load_run<T, 2 * P, VECTOR>(row + 2 * first_pair, v);
#pragma unroll
        for (int p = 0; p < P; ++p) {
            const float a = v[2 * p], b = v[2 * p + 1];
            v[2 * p] = a * c[p] - b * s[p];
            v[2 * p + 1] = a * s[p] + b * c[p];
        }
        store_run<T, 2 * P, VECTOR>(row + 2 * first_pair, v);
    } else {
        float a[P], b[P], ra[P], rb[P];
        T* lo = row + first_pair;
        T* hi = row + head_dim / 2 + first_pair;
        load_run<T, P, VECTOR>(lo, a);
        load_run<T, P, VECTOR>(hi, b);
#pragma unroll
        for (int p = 0; p < P; ++p) {
            ra[p] = a[p] * c[p] - b[p] * s[p];
            rb[p] = a[p] * s[p] + b[p] * c[p];
        }
        store_run<T, P, VECTOR>(lo, ra);
        store_run<T, P, VECTOR>(hi, rb);
    }
}

template <typename T, int P, bool INTERLEAVED, bool VECTOR>
__device__ __forceinline__ void rope_runs(const RopeParams& p) {
    const int runs = p.head_dim / 2 / P;
    const long long idx = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (idx >= static_cast<long long>(p.tokens) * runs) return;
    const int token = static_cast<int>(idx / runs);
    const int first_pair = static_cast<int>(idx % runs) * P;

    const float pos = static_cast<float>(p.positions[token]);
    float c[P], s[P];
#pragma unroll
    for (int i = 0; i < P; ++i) {
        const float inv_freq = 1.0f / powf(p.theta, static_cast<float>(2 * (first_pair + i)) / static_cast<float>(p.head_dim));
        sincosf(pos * inv_freq, &s[i], &c[i]);
        if (p.inverse) s[i] = -s[i];
    }
    T* q = static_cast<T*>(p.q) + static_cast<size_t>(token) * p.q_heads * p.head_dim;
    for (int h = 0; h < p.q_heads; ++h) rotate_run<T, P, INTERLEAVED, VECTOR>(q + h * p.head_dim, first_pair, p.head_dim, c, s);
    T* k = static_cast<T*>(p.k) + static_cast<size_t>(token) * p.k_heads * p.head_dim;
    for (int h = 0; h < p.k_heads; ++h) rotate_run<T, P, INTERLEAVED, VECTOR>(k + h * p.head_dim, first_pair, p.head_dim, c, s);
}

/// Vector runs: 16 bytes per access (a whole run for interleaved, each half for rotate_half).
template <typename T>
__device__ __forceinline__ void rope(const RopeParams& p) {
    constexpr int V = kVec16<T>;
    if (p.interleaved) {
        if (p.vectorized) {
            rope_runs<T, V / 2, true, true>(p);
        } else {
            rope_runs<T, 1, true, false>(p);
        }
    } else {
        if (p.vectorized) {
            rope_runs<T, V, false, true>(p);
        } else {
            rope_runs<T, 1, false, false>(p);
        }
    }
}

}  // namespace platypus

#define PLATYPUS_ROPE_KERNEL(SUFFIX, T)                                                                   \
    extern "C" __global__ void __launch_bounds__(platypus::kRopeThreads) rope_##SUFFIX(RopeParams p) { \
        platypus::rope<T>(p);                                                                            \
    }                                                                                                    \
    PLATYPUS_EXPORT_KERNEL(rope_##SUFFIX)

PLATYPUS_ROPE_KERNEL(f32, float)
PLATYPUS_ROPE_KERNEL(f16, __half)
PLATYPUS_ROPE_KERNEL(bf16, __nv_bfloat16)
