// LayerNorm as BERT (and so every sentence-transformers encoder) computes it,
// forward only (the encoder is inference), with the post-norm residual add
// fused in:
//
//   v = x                  or  v = round_T(x + delta)  (the residual form)
//   mean = sum(v) / H,  var = sum((v - mean)^2) / H     (biased, as torch)
//   y = w * (v - mean) * rsqrt(var + eps) + b
//
// y may be x: h = LayerNorm(h + delta) in place, the BERT sublayer output.
// Two-pass moments (mean first, then the centred squares) in fp32 rather than
// E[v^2] - mean^2, which cancels for rows with a large mean. One block per
// row; each thread walks the same columns in all three passes, so pass 1's
// store of v to y is reread by the thread that wrote it (no barrier needed
// beyond the block sums'). Storage f32/f16/bf16; 128-bit vectors when every
// row is 16-byte aligned, else single elements.
//
// Memory traffic (E = bytes per element, R rows, H hidden): reads x (and
// delta) once from HBM, writes y once: 2*R*H*E, 3*R*H*E with delta (passes
// 2 and 3 reread the row from L1/L2: at most 8 KiB at H = 4096 f16), plus
// w and b, which stay in L2. An add kernel then a norm would move 5*R*H*E.
// Target: >= 90% of HBM bandwidth (A100 80GB: 2.0 TB/s, H100 SXM: 3.35 TB/s).
// No fast-math: the sums are plain fp32 and rsqrtf is used as is.
#include "common.cuh"

namespace platypus {

constexpr int kLayerNormThreads = 256;

/// The forward of one row, N elements per access.
template <typename T, int N>
__device__ __forceinline__ void layernorm_forward_row(const LayerNormForwardParams& p, int row, float* scratch) {
    const size_t offset = static_cast<size_t>(row) * p.hidden;
    const T* x = static_cast<const T*>(p.x) + offset;
    const T* delta = p.delta ? static_cast<const T*>(p.delta) + offset : nullptr;
    const T* w = static_cast<const T*>(p.w);
    const T* b = static_cast<const T*>(p.b);
    T* y = static_cast<T*>(p.y) + offset;

    // Pass 1: v (rounded to T in the residual form, what a T tensor holds),
    // stored to y when it differs from x, and its sum.
    float sum = 0.0f;
    for (int j = threadIdx.x * N; j < p.hidden; j += blockDim.x * N) {
        float v[N];
        load_floats<T, N>(x + j, v);
        if (delta) {
            float d[N];
            load_floats<T, N>(delta + j, d);
#pragma unroll
            for (int i = 0; i < N; ++i) v[i] = to_float(from_float<T>(v[i] + d[i]));
            store_floats<T, N>(y + j, v);
        }
#pragma unroll
        for (int i = 0; i < N; ++i) sum += v[i];
    }
    const T* src = delta ? y : x;
    const float mean = block_sum(sum, scratch) / p.hidden;

    // Pass 2: the centred squares.
    float sum_sq = 0.0f;
    for (int j = threadIdx.x * N; j < p.hidden; j += blockDim.x * N) {
        float v[N];
        load_floats<T, N>(src + j, v);
#pragma unroll
        for (int i = 0; i < N; ++i) sum_sq += (v[i] - mean) * (v[i] - mean);
    }
    const float r = rsqrtf(block_sum(sum_sq, scratch) / p.hidden + p.eps);

    // Pass 3: scale and shift.
    for (int j = threadIdx.x * N; j < p.hidden; j += blockDim.x * N) {
        float v[N], wv[N], bv[N];
        load_floats<T, N>(src + j, v);
        load_floats<T, N>(w + j, wv);
        load_floats<T, N>(b + j, bv);
#pragma unroll
        for (int i = 0; i < N; ++i) v[i] = wv[i] * ((v[i] - mean) * r) + bv[i];
        store_floats<T, N>(y + j, v);
    }
}

template <typename T>
__device__ __forceinline__ void layernorm_forward(const LayerNormForwardParams& p) {
    PLATYPUS_SHARED(float, scratch, [32]);
    if (p.vectorized) {
        layernorm_forward_row<T, kVec16<T>>(p, blockIdx.x, scratch);
    } else {
        layernorm_forward_row<T, 1>(p, blockIdx.x, scratch);
    }
}

}  // namespace platypus

#define PLATYPUS_LAYERNORM_KERNELS(SUFFIX, T)                                                                    \
    extern "C" __global__ void __launch_bounds__(platypus::kLayerNormThreads)                                   \
        layernorm_forward_##SUFFIX(LayerNormForwardParams p) {                                                  \
        platypus::layernorm_forward<T>(p);                                                                      \
    }                                                                                                           \
    PLATYPUS_EXPORT_KERNEL(layernorm_forward_##SUFFIX)

PLATYPUS_LAYERNORM_KERNELS(f32, float)
PLATYPUS_LAYERNORM_KERNELS(f16, __half)
PLATYPUS_LAYERNORM_KERNELS(bf16, __nv_bfloat16)
