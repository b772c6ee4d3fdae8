// SwiGLU, the gate of the Llama MLP, elementwise over n elements:
//
//   forward:  m = silu(g) * u,                     silu(g) = g * s, s = 1 / (1 + e^-g)
//   backward: dgate = dm * u * silu'(g),            silu'(g) = s * (1 + g * (1 - s))
//             dup   = dm * silu(g)
//
// fp32 math (the accurate expf, no fast-math), storage f32/f16/bf16. Threads
// walk 16-byte vectors of all tensors (grid-stride) when every pointer is
// 16-byte aligned, then the n % N elements past the last whole vector one at
// a time; otherwise single elements throughout. A warp touches 512
// consecutive bytes of each tensor: coalesced.
//
// Memory traffic (E = bytes per element): forward reads gate and up, writes
// m: 3*n*E; backward reads gate, up and dm, writes dgate and dup: 5*n*E.
// Target: >= 90% of HBM bandwidth (A100 80GB: 2.0 TB/s, H100 SXM: 3.35 TB/s).
#include "common.cuh"

namespace platypus {

constexpr int kSwigluThreads = 256;

/// σ(g) = 1 / (1 + e^-g): the accurate expf and an IEEE reciprocal (a
/// reciprocal rather than g / (1 + e^-g): the division's slow-path call made
/// the f32 forward spill).
__device__ __forceinline__ float sigmoid(float g) { return 1.0f / (1.0f + expf(-g)); }

/// SwiGLU forward or backward of the N elements at element e.
template <typename T, int N, bool BACKWARD>
__device__ __forceinline__ void swiglu_elems(const SwigluParams& p, long long e) {
    float g[N], u[N];
    load_floats<T, N>(static_cast<const T*>(p.gate) + e, g);
    load_floats<T, N>(static_cast<const T*>(p.up) + e, u);
    if constexpr (BACKWARD) {
        float dm[N], dg[N], du[N];
        load_floats<T, N>(static_cast<const T*>(p.dm) + e, dm);
#pragma unroll
        for (int i = 0; i < N; ++i) {
            const float s = sigmoid(g[i]);
            const float dsilu = s * (1.0f + g[i] * (1.0f - s));
            dg[i] = dm[i] * u[i] * dsilu;
            du[i] = dm[i] * (g[i] * s);
        }
        store_floats<T, N>(static_cast<T*>(p.dgate) + e, dg);
        store_floats<T, N>(static_cast<T*>(p.dup) + e, du);
    } else {
        float m[N];
#pragma unroll
        for (int i = 0; i < N; ++i) m[i] = g[i] * sigmoid(g[i]) * u[i];
        store_floats<T, N>(static_cast<T*>(p.m) + e, m);
    }
}

/// Whole N-element vectors, grid-stride, then the tail element by element.
template <typename T, int N, bool BACKWARD>
__device__ __forceinline__ void swiglu_all(const SwigluParams& p) {
    const long long first = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
    const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
    const long long vectors = p.n / N;
    for (long long v = first; v < vectors; v += stride) swiglu_elems<T, N, BACKWARD>(p, v * N);
    if constexpr (N > 1) {
        for (long long e = vectors * N + first; e < p.n; e += stride) swiglu_elems<T, 1, BACKWARD>(p, e);
    }
}

template <typename T, bool BACKWARD>
__device__ __forceinline__ void swiglu(const SwigluParams& p) {
    if (p.vectorized) {
        swiglu_all<T, kVec16<T>, BACKWARD>(p);
    } else {
        swiglu_all<T, 1, BACKWARD>(p);
    }
}

}  // namespace platypus

#define PLATYPUS_SWIGLU_KERNELS(SUFFIX, T)                                                                  \
    extern "C" __global__ void __launch_bounds__(platypus::kSwigluThreads)                                 \
        swiglu_forward_##SUFFIX(SwigluParams p) {                                                          \
        platypus::swiglu<T, false>(p);                                                                     \
    }                                                                                                      \
    PLATYPUS_EXPORT_KERNEL(swiglu_forward_##SUFFIX)                                                        \
    extern "C" __global__ void __launch_bounds__(platypus::kSwigluThreads)                                 \
        swiglu_backward_##SUFFIX(SwigluParams p) {                                                         \
        platypus::swiglu<T, true>(p);                                                                      \
    }                                                                                                      \
    PLATYPUS_EXPORT_KERNEL(swiglu_backward_##SUFFIX)

PLATYPUS_SWIGLU_KERNELS(f32, float)
PLATYPUS_SWIGLU_KERNELS(f16, __half)
PLATYPUS_SWIGLU_KERNELS(bf16, __nv_bfloat16)
