// Helpers of the kernels that give one block a whole row of logits
// (cross_entropy.cu, sampling.cu): the row read in spans of N elements
// (one 16-byte load where the span is whole and the row aligned), and
// block-wide reductions and scans in a fixed order (deterministic).
#pragma once

#include "common.cuh"

namespace platypus {
namespace rows {

/// Elements j .. j + N of a row of `len` as fp32: one vector load when the
/// span lies inside the row and VECTOR (row 16-byte aligned, j a multiple
/// of N), else element loads; elements past the row read as -inf (no
/// probability mass, never a maximum ahead of a real element).
template <typename T, int N, bool VECTOR>
__device__ __forceinline__ void load_span(const T* row, int j, int len, float (&v)[N]) {
    if (j + N <= len) {
        load_run<T, N, VECTOR>(row + j, v);
    } else {
#pragma unroll
        for (int i = 0; i < N; ++i) v[i] = j + i < len ? to_float(row[j + i]) : -INFINITY;
    }
}

/// `op` over the 32 lanes; every lane gets the result. `op` must be
/// commutative bit for bit (max, min, +), so that all lanes agree.
template <typename T, typename Op>
__device__ __forceinline__ T warp_reduce(T v, Op op) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v = op(v, __shfl_xor_sync(kFullMask, v, offset));
    return v;
}

/// `op` over the block (blockDim.x a multiple of 32); every thread gets the
/// result. `scratch` is 32 T of shared memory; `identity` pads the missing
/// warps. Ends with a barrier, so it can be called again at once.
template <typename T, typename Op>
__device__ __forceinline__ T block_reduce(T v, T identity, T* scratch, Op op) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    v = warp_reduce(v, op);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < warps ? scratch[lane] : identity;
    v = warp_reduce(v, op);
    __syncthreads();
    return v;
}

struct MaxOp {
    __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
    __device__ __forceinline__ int operator()(int a, int b) const { return max(a, b); }
    __device__ __forceinline__ unsigned long long operator()(unsigned long long a, unsigned long long b) const { return a > b ? a : b; }
};
struct MinOp {
    __device__ __forceinline__ int operator()(int a, int b) const { return min(a, b); }
};
struct SumOp {
    __device__ __forceinline__ float operator()(float a, float b) const { return a + b; }
};

/// Exclusive prefix sum of `v` over the threads of the block in thread
/// order, and the block's `total`; the same fixed order on every run.
/// `scratch` is 32 floats of shared memory. It does not end with a barrier:
/// the caller must pass one before `scratch` is written again (sampling's
/// next block_reduce, on other scratch, has two; the barrier mutation check
/// showed a trailing one here was redundant).
__device__ __forceinline__ float block_exclusive_sum(float v, float* scratch, float& total) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    float inclusive = v;
#pragma unroll
    for (int offset = 1; offset < 32; offset <<= 1) {
        const float below = __shfl_up_sync(kFullMask, inclusive, offset);
        if (lane >= offset) inclusive += below;
    }
    float exclusive = __shfl_up_sync(kFullMask, inclusive, 1);
    if (lane == 0) exclusive = 0.0f;
    if (lane == 31) scratch[warp] = inclusive;
    __syncthreads();
    if (warp == 0) {
        // Inclusive scan of the warp totals, in place: each lane reads and
        // writes only its own slot.
        float t = lane < warps ? scratch[lane] : 0.0f;
#pragma unroll
        for (int offset = 1; offset < 32; offset <<= 1) {
            const float below = __shfl_up_sync(kFullMask, t, offset);
            if (lane >= offset) t += below;
        }
        if (lane < warps) scratch[lane] = t;
    }
    __syncthreads();
    const float before = warp > 0 ? scratch[warp - 1] : 0.0f;
    total = scratch[warps - 1];
    return before + exclusive;
}

}  // namespace rows
}  // namespace platypus
