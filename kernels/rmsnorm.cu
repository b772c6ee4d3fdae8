// RMSNorm as Llama computes it, forward and backward, and the residual add
// fused with the forward.
//
//   forward:  r = rsqrt(mean(x^2) + eps),  y = w * x * r
//   add:      h = round_T(h + delta) in place, then y = forward(h) of that
//             rounded h (so y equals rmsnorm_forward of the updated h)
//   backward: dx_j = r * w_j * dy_j - r^3 * x_j * mean(dy * w * x)
//             dw_j = sum over rows of dy_j * x_j * r
//
// One block per row (the backward kernel walks rows blockIdx.x, +gridDim.x,
// ...), fp32 accumulation, storage f32/f16/bf16. When every row is 16-byte
// aligned the kernels move 128-bit vectors; otherwise single elements.
//
// Memory traffic (E = bytes per element, R rows, H hidden):
//   forward:  reads x once from HBM (the second pass over the row hits L1/L2,
//             a row is at most 16 KiB at H = 8192 bf16), writes y: 2*R*H*E.
//   add:      reads h and delta once, writes h and y: 4*R*H*E (the second
//             pass rereads the h this thread just wrote, from L1/L2), where an
//             add kernel then rmsnorm_forward would move 3 + 2 = 5*R*H*E, and
//             two launches.
//   backward: reads x and dy, writes dx: 3*R*H*E, plus 2 * 512 * H * 4 bytes
//             of fp32 dw partial sums when dw is wanted.
// Target: >= 90% of HBM bandwidth (A100 80GB: 2.0 TB/s, H100 SXM: 3.35 TB/s).
// No fast-math: the reductions are exact fp32 sums and rsqrtf is used as is.
#include "common.cuh"

namespace platypus {

constexpr int kRmsNormThreads = 256;

/// y = w * (x * r) over one row of `hidden` elements, N per access: the
/// second pass of both forwards (the thread walks the columns it summed).
template <typename T, int N>
__device__ __forceinline__ void rmsnorm_scale_row(const T* x, const T* w, T* y, int hidden, float r) {
    for (int j = threadIdx.x * N; j < hidden; j += blockDim.x * N) {
        float xv[N], wv[N], yv[N];
        load_floats<T, N>(x + j, xv);
        load_floats<T, N>(w + j, wv);
#pragma unroll
        for (int i = 0; i < N; ++i) yv[i] = wv[i] * (xv[i] * r);
        store_floats<T, N>(y + j, yv);
    }
}

/// Forward for one row, N elements per access.
template <typename T, int N>
__device__ __forceinline__ void rmsnorm_forward_row(const RmsNormForwardParams& p, int row, float* scratch) {
    const T* x = static_cast<const T*>(p.x) + static_cast<size_t>(row) * p.hidden;
    const T* w = static_cast<const T*>(p.w);
    T* y = static_cast<T*>(p.y) + static_cast<size_t>(row) * p.hidden;

    float sum_sq = 0.0f;
    for (int j = threadIdx.x * N; j < p.hidden; j += blockDim.x * N) {
        float xv[N];
        load_floats<T, N>(x + j, xv);
#pragma unroll
        for (int i = 0; i < N; ++i) sum_sq += xv[i] * xv[i];
    }
    const float r = rsqrtf(block_sum(sum_sq, scratch) / p.hidden + p.eps);

    rmsnorm_scale_row<T, N>(x, w, y, p.hidden, r);
}

/// Residual add then forward for one row, N elements per access. Pass 1
/// adds in fp32, rounds to T, stores h and sums the squares of the rounded
/// values; pass 2 rereads the elements of h this thread stored (same thread,
/// same columns: no barrier needed) and writes y.
template <typename T, int N>
__device__ __forceinline__ void rmsnorm_add_forward_row(const RmsNormAddForwardParams& p, int row, float* scratch) {
    const size_t offset = static_cast<size_t>(row) * p.hidden;
    T* h = static_cast<T*>(p.h) + offset;
    const T* delta = static_cast<const T*>(p.delta) + offset;
    const T* w = static_cast<const T*>(p.w);
    T* y = static_cast<T*>(p.y) + offset;

    float sum_sq = 0.0f;
    for (int j = threadIdx.x * N; j < p.hidden; j += blockDim.x * N) {
        float hv[N], dv[N];
        load_floats<T, N>(h + j, hv);
        load_floats<T, N>(delta + j, dv);
#pragma unroll
        for (int i = 0; i < N; ++i) {
            hv[i] = to_float(from_float<T>(hv[i] + dv[i]));
            sum_sq += hv[i] * hv[i];
        }
        store_floats<T, N>(h + j, hv);
    }
    const float r = rsqrtf(block_sum(sum_sq, scratch) / p.hidden + p.eps);

    rmsnorm_scale_row<T, N>(h, w, y, p.hidden, r);
}

template <typename T>
__device__ __forceinline__ void rmsnorm_add_forward(const RmsNormAddForwardParams& p) {
    PLATYPUS_SHARED(float, scratch, [32]);
    if (p.vectorized) {
        rmsnorm_add_forward_row<T, kVec16<T>>(p, blockIdx.x, scratch);
    } else {
        rmsnorm_add_forward_row<T, 1>(p, blockIdx.x, scratch);
    }
}

template <typename T>
__device__ __forceinline__ void rmsnorm_forward(const RmsNormForwardParams& p) {
    PLATYPUS_SHARED(float, scratch, [32]);
    if (p.vectorized) {
        rmsnorm_forward_row<T, kVec16<T>>(p, blockIdx.x, scratch);
    } else {
        rmsnorm_forward_row<T, 1>(p, blockIdx.x, scratch);
    }
}

/// Backward for the rows of this block, N elements per access. Each thread
/// owns the columns it touches, so its dw partial sums sit in shared memory
/// without conflicts; the block writes them out once at the end.
template <typename T, int N>
__device__ __forceinline__ void rmsnorm_backward_rows(const RmsNormBackwardParams& p, float* scratch, float* dw_acc) {
    const T* w = static_cast<const T*>(p.w);
    const bool want_dw = p.dw_partial != nullptr;
    if (want_dw) {
        for (int j = threadIdx.x * N; j < p.hidden; j += blockDim.x * N) {
#pragma unroll
            for (int i = 0; i < N; ++i) dw_acc[j + i] = 0.0f;
        }
    }
    for (int row = blockIdx.x; row < p.rows; row += gridDim.x) {
        const size_t offset = static_cast<size_t>(row) * p.hidden;
        const T* x = static_cast<const T*>(p.x) + offset;
        const T* dy = static_cast<const T*>(p.dy) + offset;
        T* dx = static_cast<T*>(p.dx) + offset;

        float sum_sq = 0.0f, sum_gwx = 0.0f;
        for (int j = threadIdx.x * N; j < p.hidden; j += blockDim.x * N) {
            float xv[N], wv[N], gv[N];
            load_floats<T, N>(x + j, xv);
            load_floats<T, N>(w + j, wv);
            load_floats<T, N>(dy + j, gv);
#pragma unroll
            for (int i = 0; i < N; ++i) {
                sum_sq += xv[i] * xv[i];
                sum_gwx += gv[i] * wv[i] * xv[i];
            }
        }
        sum_sq = block_sum(sum_sq, scratch);
        sum_gwx = block_sum(sum_gwx, scratch);
        const float r = rsqrtf(sum_sq / p.hidden + p.eps);
        const float c = r * r * r * (sum_gwx / p.hidden);

        for (int j = threadIdx.x * N; j < p.hidden; j += blockDim.x * N) {
            float xv[N], wv[N], gv[N], dxv[N];
            load_floats<T, N>(x + j, xv);
            load_floats<T, N>(w + j, wv);
            load_floats<T, N>(dy + j, gv);
#pragma unroll
            for (int i = 0; i < N; ++i) dxv[i] = r * wv[i] * gv[i] - c * xv[i];
            store_floats<T, N>(dx + j, dxv);
            if (want_dw) {
#pragma unroll
                for (int i = 0; i < N; ++i) dw_acc[j + i] += gv[i] * xv[i] * r;
            }
        }
    }
    if (want_dw) {
        float* out = p.dw_partial + static_cast<size_t>(blockIdx.x) * p.hidden;
        for (int j = threadIdx.x * N; j < p.hidden; j += blockDim.x * N) {
#pragma unroll
            for (int i = 0; i < N; ++i) out[j + i] = dw_acc[j + i];
        }
    }
}

template <typename T>
__device__ __forceinline__ void rmsnorm_backward(const RmsNormBackwardParams& p) {
    PLATYPUS_SHARED(float, scratch, [32]);
    PLATYPUS_DYNAMIC_SMEM(float, dw_acc);  // [hidden] when dw is wanted, else empty
    if (p.vectorized) {
        rmsnorm_backward_rows<T, kVec16<T>>(p, scratch, dw_acc);
    } else {
        rmsnorm_backward_rows<T, 1>(p, scratch, dw_acc);
    }
}

/// dw[j] = sum over parts of partial[part, j], parts in order: deterministic.
/// One thread per column, coalesced across the warp.
template <typename T>
__device__ __forceinline__ void rmsnorm_dw_reduce(const RmsNormDwReduceParams& p) {
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= p.hidden) return;
    float acc = 0.0f;
    for (int b = 0; b < p.parts; ++b) acc += p.partial[static_cast<size_t>(b) * p.hidden + j];
    static_cast<T*>(p.dw)[j] = from_float<T>(acc);
}

}  // namespace platypus

#define PLATYPUS_RMSNORM_KERNELS(SUFFIX, T)                                                                      \
    extern "C" __global__ void __launch_bounds__(platypus::kRmsNormThreads)                                     \
        rmsnorm_forward_##SUFFIX(RmsNormForwardParams p) {                                                      \
        platypus::rmsnorm_forward<T>(p);                                                                        \
    }                                                                                                           \
    PLATYPUS_EXPORT_KERNEL(rmsnorm_forward_##SUFFIX)                                                            \
    extern "C" __global__ void __launch_bounds__(platypus::kRmsNormThreads)                                     \
        rmsnorm_add_forward_##SUFFIX(RmsNormAddForwardParams p) {                                               \
        platypus::rmsnorm_add_forward<T>(p);                                                                    \
    }                                                                                                           \
    PLATYPUS_EXPORT_KERNEL(rmsnorm_add_forward_##SUFFIX)                                                        \
    extern "C" __global__ void __launch_bounds__(platypus::kRmsNormThreads)                                     \
        rmsnorm_backward_##SUFFIX(RmsNormBackwardParams p) {                                                    \
        platypus::rmsnorm_backward<T>(p);                                                                       \
    }                                                                                                           \
    PLATYPUS_EXPORT_KERNEL(rmsnorm_backward_##SUFFIX)                                                           \
    extern "C" __global__ void __launch_bounds__(platypus::kRmsNormThreads)                                     \
        rmsnorm_dw_reduce_##SUFFIX(RmsNormDwReduceParams p) {                                                   \
        platypus::rmsnorm_dw_reduce<T>(p);                                                                      \
    }                                                                                                           \
    PLATYPUS_EXPORT_KERNEL(rmsnorm_dw_reduce_##SUFFIX)

PLATYPUS_RMSNORM_KERNELS(f32, float)
PLATYPUS_RMSNORM_KERNELS(f16, __half)
PLATYPUS_RMSNORM_KERNELS(bf16, __nv_bfloat16)
