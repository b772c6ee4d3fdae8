// Cross-entropy over rows of logits: the second half of the LM head fused
// with cross-entropy (src/ops/cross_entropy.rs).
//
//   lse[r]  = log sum_v exp(logits[r, v])            (v < vocab)
//   loss[r] = lse[r] - logits[r, labels[r]]           labels[r] >= 0
//           = 0                                       labels[r] < 0 (ignored, transformers' -100)
//
// One block per row, one pass over it: every thread keeps an online
// (max, sum of exp(x - max)) pair over its 16-byte spans of the row, fp32
// throughout, and the block combines the pairs in a fixed tree order
// (deterministic); thread 0 reads the label's logit. Storage f32, f16 or
// bf16 (the fused head passes its fp32 logits chunk). No fast-math: expf and
// logf are the accurate ones.
//
// The fused head never holds the logits of all tokens: for each chunk of
// tokens the tensor-core GEMM of lora.cu (lora_gemm_nt_wide_f32out) writes
// the fp32 chunk [chunk, vocab] = h_chunk W^T and this kernel reads it once.
//
// Memory traffic per token: 4 V bytes written by the GEMM and 4 V bytes read
// here, 8 V in all, against the GEMM's 2 * hidden * V FLOPs: 2 * hidden / 8
// = 1024 FLOP per byte at Llama-7B (hidden 4096, V 32000), far above an
// A100's ridge of 312 TFLOP/s / 2.0 TB/s = 153 FLOP/B. In time: 256 KB per
// token at 2.0 TB/s is 128 ns, the GEMM's 262 MFLOP at 312 TFLOP/s 840 ns,
// so the logits round trip costs ~15% of a peak-rate GEMM (~10% of one at a
// realistic 70% of peak), and the logits chunk (256 MiB: 2048 tokens at V
// 32000) replaces the 4 * tokens * V bytes of unfused logits (2 GiB at 16k
// tokens).
// Target: this kernel >= 90% of HBM bandwidth on its 4 V bytes per row read
// (A100 80GB: 2.0 TB/s, H100 SXM: 3.35 TB/s); the fused head >= 85% of the
// head GEMM alone.
//
// Training takes the gradient in the same pass over the chunk (the loss ends
// the graph, so dL/dlogits is known as soon as the row's lse is):
//
//   grad[r, v] = scale * (exp(logits[r, v] - lse[r]) - [v == labels[r]])     counted rows
//              = 0                                                           ignored rows, v >= vocab
//
// one block per row, 8 columns per thread per step (two 128-bit fp32 loads,
// one 128-bit 16-bit store), written in h's dtype for the GEMM dh = grad W
// (lora_gemm_nn_wide). Traffic: 4 V bytes read + 2 V written per token, on
// top of the forward's 8 V; the backward GEMM's 2 * hidden * V FLOPs keep the
// whole head compute-bound (2 * hidden * V * 2 / (14 V) = 1170 FLOP/B at
// hidden 4096). Target: >= 90% of HBM bandwidth on its 6 V bytes per row.
#include "rows.cuh"

namespace platypus {
namespace ce {

constexpr int kThreads = 256;

/// max(a, b) that keeps a NaN of either (fmaxf would drop it).
__device__ __forceinline__ float max_nan(float a, float b) { return (a > b || a != a) ? a : b; }

/// Online softmax state: m = the largest value seen, s = sum of exp(x - m).
/// The empty state is (-inf, 0).
struct MaxSum {
    float m;
    float s;
};

/// Two states as one. Commutative bit for bit (max_nan of two non-NaNs and
/// the sum of two products are), so every lane of a butterfly agrees.
__device__ __forceinline__ MaxSum combine(MaxSum a, MaxSum b) {
    const float m = max_nan(a.m, b.m);
    if (m == -INFINITY) return {m, 0.0f};
    return {m, a.s * expf(a.m - m) + b.s * expf(b.m - m)};
}

template <typename T, int N, bool VECTOR>
__device__ __forceinline__ void row_loss(const CrossEntropyRowsParams& p) {
    PLATYPUS_SHARED(MaxSum, partial, [32]);
    const int row = blockIdx.x;
    const T* z = static_cast<const T*>(p.logits) + static_cast<size_t>(row) * p.ld;

    MaxSum st{-INFINITY, 0.0f};
    for (int j = threadIdx.x * N; j < p.vocab; j += blockDim.x * N) {
        float v[N];
        rows::load_span<T, N, VECTOR>(z, j, p.vocab, v);
        float m = st.m;
#pragma unroll
        for (int i = 0; i < N; ++i) m = max_nan(m, v[i]);
        if (m == -INFINITY) continue;  // nothing but -inf so far: the state stays empty
        float s = st.s * expf(st.m - m);
#pragma unroll
        for (int i = 0; i < N; ++i) s += expf(v[i] - m);
        st = {m, s};
    }

    // Warp butterfly, then warp 0 over the warps' states, in a fixed order.
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        const MaxSum other{__shfl_xor_sync(kFullMask, st.m, offset), __shfl_xor_sync(kFullMask, st.s, offset)};
        st = combine(st, other);
    }
    if (lane == 0) partial[warp] = st;
    __syncthreads();
    if (warp != 0) return;
    st = lane < warps ? partial[lane] : MaxSum{-INFINITY, 0.0f};
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        const MaxSum other{__shfl_xor_sync(kFullMask, st.m, offset), __shfl_xor_sync(kFullMask, st.s, offset)};
        st = combine(st, other);
    }
    if (lane == 0) {
        const float lse = st.m + logf(st.s);
        const int label = p.labels[row];
        p.lse[row] = lse;
        p.loss[row] = label >= 0 ? lse - to_float(z[label]) : 0.0f;
    }
}

template <typename T>
__device__ __forceinline__ void forward(const CrossEntropyRowsParams& p) {
    if (p.vectorized) {
        row_loss<T, kVec16<T>, true>(p);
    } else {
        row_loss<T, 1, false>(p);
    }
}

/// The gradient of one row (see the file comment); blockDim.x threads walk
/// its 8-column groups.
template <typename T>
__device__ __forceinline__ void row_grad(const CrossEntropyGradParams& p) {
    const int row = blockIdx.x;
    const float* z = p.logits + static_cast<size_t>(row) * p.ld;
    T* g = static_cast<T*>(p.grad) + static_cast<size_t>(row) * p.ld;
    const int label = p.labels[row];
    const float lse = p.lse[row];
    for (int j = threadIdx.x * 8; j < p.ld; j += blockDim.x * 8) {
        float v[8];
        if (label < 0) {
#pragma unroll
            for (int i = 0; i < 8; ++i) v[i] = 0.0f;
        } else {
            float lo[4], hi[4];
            load_floats<float, 4>(z + j, lo);
            load_floats<float, 4>(z + j + 4, hi);
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                const int col = j + i;
                const float x = i < 4 ? lo[i] : hi[i - 4];
                const float prob = col < p.vocab ? expf(x - lse) : 0.0f;
                v[i] = p.scale * (prob - (col == label ? 1.0f : 0.0f));
            }
        }
        store_floats<T, 8>(g + j, v);
    }
}

}  // namespace ce
}  // namespace platypus

#define PLATYPUS_CROSS_ENTROPY_KERNELS(SUFFIX, T)                                                     \
    extern "C" __global__ void __launch_bounds__(platypus::ce::kThreads)                              \
        cross_entropy_rows_##SUFFIX(CrossEntropyRowsParams p) {                                       \
        platypus::ce::forward<T>(p);                                                                     \
    }                                                                                                 \
    PLATYPUS_EXPORT_KERNEL(cross_entropy_rows_##SUFFIX)

#define PLATYPUS_CROSS_ENTROPY_GRAD_KERNEL(SUFFIX, T)                                                 \
    extern "C" __global__ void __launch_bounds__(platypus::ce::kThreads)                              \
        cross_entropy_grad_##SUFFIX(CrossEntropyGradParams p) {                                       \
        platypus::ce::row_grad<T>(p);                                                                  \
    }                                                                                                 \
    PLATYPUS_EXPORT_KERNEL(cross_entropy_grad_##SUFFIX)

PLATYPUS_CROSS_ENTROPY_KERNELS(f32, float)
PLATYPUS_CROSS_ENTROPY_KERNELS(f16, __half)
PLATYPUS_CROSS_ENTROPY_KERNELS(bf16, __nv_bfloat16)
PLATYPUS_CROSS_ENTROPY_GRAD_KERNEL(f16, __half)
PLATYPUS_CROSS_ENTROPY_GRAD_KERNEL(bf16, __nv_bfloat16)
