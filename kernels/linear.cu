// Linear layer with its bias and activation fused into the GEMM epilogue,
// forward only (the encoder's inference):
//
//   y = act(x W^T + b)    x [tokens, in], W [out, in] (nn.Linear's layout),
//                         b [out] or none, act = identity or GELU
//   GELU(v) = 0.5 v (1 + erf(v / sqrt 2))   (the erf form: BERT's "gelu")
//
// The product is gemm.cuh's tensor-core mainloop (mma.sync m16n8k16 with
// fp32 accumulators, 3-stage cp.async pipeline, swizzled shared tiles) on
// 128 x 128 tiles of y (8 warps of 64 x 32; two blocks per SM, so at most
// 128 registers). The epilogue adds the bias and applies the activation to
// the fp32 accumulators and rounds once to T: no pass of its own over y.
//
// Memory traffic (E = 2 bytes): x is read once per 128-column tile of y
// (tokens * in * E * ceil(out / 128)), W once per 128-row tile, y written
// once (tokens * out * E), b from L1/L2. Arithmetic 2 * tokens * in * out
// FLOPs, so for in, out >= 384 the kernel is tensor-core bound: target
// >= 60% of dense fp16 peak (A100: 312 TFLOP/s, H100 SXM: 989) at
// tokens >= 4096; all-MiniLM-L6-v2's 384 x 384 products are small enough
// that a 4096-token batch is only 3 x 32 blocks, under one wave on an A100.
// A bias-then-GELU pass after a plain GEMM would move y three more times.
//
// Rows are 16-byte aligned (in a multiple of 8) for cp.async; columns past
// out and rows past tokens are zero-filled in shared memory and not stored.
#include "gemm.cuh"

namespace platypus {
namespace linear {

constexpr int kTile = 128;

/// GELU's erf form in fp32.
__device__ __forceinline__ float gelu(float v) { return 0.5f * v * (1.0f + erff(v * 0.70710678118654752f)); }

template <typename T, bool GELU>
__device__ __forceinline__ void forward(const LinearParams& p) {
    using G = gemm::Gemm<T, true, true, kTile, kTile, 2, 4>;
    PLATYPUS_DYNAMIC_SMEM(T, smem);
    const int m0 = blockIdx.y * kTile, n0 = blockIdx.x * kTile;
    const int warp = threadIdx.x / 32;
    const int wm0 = warp / 4 * (kTile / 2), wn0 = warp % 4 * (kTile / 4);
    float acc[G::MW][G::NW][4] = {};
    G::run(acc, smem, static_cast<const T*>(p.x), p.in_features, static_cast<const T*>(p.w), p.in_features, p.tokens, p.out_features, 0,
           p.in_features, m0, n0, wm0, wn0, gemm::NoStageHook{});
    const T* bias = static_cast<const T*>(p.bias);
    G::store(acc, static_cast<T*>(p.y), p.out_features, p.tokens, p.out_features, m0, n0, wm0, wn0, [&](float v, int col) {
        if (bias) v += to_float(bias[col]);
        return GELU ? gelu(v) : v;
    });
}

}  // namespace linear
}  // namespace platypus

#define PLATYPUS_LINEAR_KERNELS(SUFFIX, T)                                                                                      \
    extern "C" __global__ void __launch_bounds__(256, 2) linear_forward_##SUFFIX(LinearParams p) {                              \
        platypus::linear::forward<T, false>(p);                                                                               \
    }                                                                                                                           \
    PLATYPUS_EXPORT_KERNEL(linear_forward_##SUFFIX)                                                                             \
    extern "C" __global__ void __launch_bounds__(256, 2) linear_gelu_forward_##SUFFIX(LinearParams p) {                         \
        platypus::linear::forward<T, true>(p);                                                                                \
    }                                                                                                                           \
    PLATYPUS_EXPORT_KERNEL(linear_gelu_forward_##SUFFIX)

PLATYPUS_LINEAR_KERNELS(bf16, __nv_bfloat16)
PLATYPUS_LINEAR_KERNELS(f16, __half)
