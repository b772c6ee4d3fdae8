// Fused LoRA linear layer: y = x W^T + s * dropout(x) A^T B^T, W [out, in]
// frozen, A [r, in] and B [out, r] trainable (fp32 masters; the kernels read
// 16-bit copies A16 [r, in] and B16 [out, r16], r16 = r rounded up to 16).
//
// Every product is one tensor-core GEMM kernel (mma.sync m16n8k16, ldmatrix,
// 3-stage cp.async pipeline, swizzled shared tiles) in three operand layouts
// and three tile shapes (128x128, 128x32, 32x128 of C):
//   forward   u  = dropout(x) A16^T            [tokens, r16]  skinny N, mask on the x tile
//             y  = x W^T + s * u B16^T          [tokens, out]  one GEMM over K = in + r16:
//                                                             the LoRA segment first, then W
//   backward  v  = dy B16                      [tokens, r16]  skinny N
//             dx = dy W + s * mask/(1-p) * (v A16)            one GEMM over K = out + r,
//                                                             mask applied between segments
//             dA = s * v^T dropout(x)          [r, in]  fp32  split over tokens, mask on x tile
//             dB = s * dy^T u                  [out, r] fp32  split over tokens
// So besides the base GEMM's x and W traffic the LoRA part adds one read of
// x (u), of dy (v) and of x and dy again (dA, dB) plus the tiny u and v,
// and no full-size intermediate: y and dx are each written once. Split-K
// partial sums of dA and dB are reduced in a fixed order (deterministic).
//
// Dropout masks come from Philox (philox.cuh) keyed by (seed, offset) and
// the element index t * in + i of x, regenerated in backward.
#include "philox.cuh"
#include "gemm.cuh"

namespace platypus {
namespace lora {

using gemm::kBK;
using gemm::kStages;

/// Where a GEMM applies the dropout mask (LoraGemmParams::mask).
enum Mask : int { kNoMask = 0, kMaskA = 1, kMaskB = 2, kMaskSegment2 = 3 };

/// Zeroes, in place, the elements dropout drops in the chunks of a shared
/// tile this thread copied with cp_async_tile: tile row r / column c is
/// element (row0 + r, col0 + c) of x, e = (row0 + r) * mask_cols + col0 + c.
/// The kept elements stay exact; the 1 / (1 - p) goes into the GEMM's
/// out_scale.
template <typename T, int ROWS, int COLS, int THREADS>
__device__ __forceinline__ void mask_tile(T* s, const LoraGemmParams& p, int row0, int col0, int rows_valid, int cols_valid) {
    constexpr int kChunks = COLS / 8;
#pragma unroll
    for (int pass = 0; pass < ROWS * kChunks / THREADS; ++pass) {
        const int i = pass * THREADS + threadIdx.x;
        const int r = i / kChunks, c = i % kChunks;
        if (r >= rows_valid || c * 8 >= cols_valid) continue;
        const uint64_t first = static_cast<uint64_t>(row0 + r) * p.mask_cols + col0 + c * 8;
        const unsigned keep = dropout_keep8(p.seed, p.offset, first, p.dropout_p);
        Vec<T, 8>* v = vector_at<Vec<T, 8>>(s + swz<COLS>(r, c));
        Vec<T, 8> x = *v;
#pragma unroll
        for (int e = 0; e < 8; ++e) x.v[e] = (keep >> e & 1u) ? x.v[e] : from_float<T>(0.0f);
        *v = x;
    }
}

/// The stage hook that applies the dropout mask to this thread's chunks of
/// the A (kMaskA) or B (kMaskB) tile of a stage.
template <typename G, bool A_K, bool B_K>
struct MaskStage {
    const LoraGemmParams& p;
    int m0, n0;
    template <typename T>
    __device__ __forceinline__ void operator()(T* stage, int k0) const {
        if (p.mask == kMaskA) {
            if constexpr (A_K) mask_tile<T, G::TileA::rows, kBK, G::kThreads>(stage, p, m0, k0, p.m - m0, p.k - k0);
        } else if (p.mask == kMaskB) {
            if constexpr (!B_K) mask_tile<T, kBK, G::TileB::cols, G::kThreads>(stage + G::TileA::rows * G::TileA::cols, p, k0, n0, p.k - k0, p.n - n0);
        }
    }
};

/// C = out_scale * (segment 1 + scale * [mask] segment 2), see LoraGemmParams.
template <typename T, typename OutT, bool A_K, bool B_K, int BM, int BN, int WM, int WN>
__device__ __forceinline__ void gemm(const LoraGemmParams& p) {
    using G = gemm::Gemm<T, A_K, B_K, BM, BN, WM, WN>;
    PLATYPUS_DYNAMIC_SMEM(T, smem);
    const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;
    const int warp = threadIdx.x / 32;
    const int wm0 = warp / WN * (BM / WM), wn0 = warp % WN * (BN / WN);
    float acc[G::MW][G::NW][4] = {};

    if (p.k2 > 0) {
        G::run(acc, smem, static_cast<const T*>(p.a2), p.lda2, static_cast<const T*>(p.b2), p.ldb2, p.m, p.n, 0, p.k2, m0, n0, wm0, wn0,
               gemm::NoStageHook{});
        const bool masked = p.mask == kMaskSegment2;
        const float keep_scale = masked ? p.scale / (1.0f - p.dropout_p) : p.scale;
#pragma unroll
        for (int mw = 0; mw < G::MW; ++mw)
#pragma unroll
            for (int nw = 0; nw < G::NW; ++nw)
#pragma unroll
                for (int e = 0; e < 4; e += 2) {
                    // Elements e, e+1 are columns 2t, 2t+1: one Philox word pair of the x-shaped mask.
                    const uint64_t at = static_cast<uint64_t>(G::row_of(m0, wm0, mw, e)) * p.mask_cols + G::col_of(n0, wn0, nw, e);
                    const unsigned keep = masked ? dropout_keep2(p.seed, p.offset, at, p.dropout_p) : 3u;
                    acc[mw][nw][e] *= (keep & 1u) ? keep_scale : 0.0f;
                    acc[mw][nw][e + 1] *= (keep & 2u) ? keep_scale : 0.0f;
                }
    }
    const int splits = gridDim.z;
    const int k_begin = blockIdx.z * p.k_per_split;
    const int k_end = splits > 1 ? min(p.k, k_begin + p.k_per_split) : p.k;
    G::run(acc, smem, static_cast<const T*>(p.a), p.lda, static_cast<const T*>(p.b), p.ldb, p.m, p.n, k_begin, k_end, m0, n0, wm0, wn0,
           MaskStage<G, A_K, B_K>{p, m0, n0});

    OutT* c = static_cast<OutT*>(p.c) + static_cast<size_t>(blockIdx.z) * p.m * p.ldc;
    G::store(acc, c, p.ldc, p.m, p.n, m0, n0, wm0, wn0, [&](float v, int) { return v * p.out_scale; });
}

/// W[o][i] = T(float(W[o][i]) + sign * scale * sum_j B[o][j] A[j][i]): merge
/// (sign +1) or unmerge (sign -1) an adapter, fp32 arithmetic, one thread per
/// element of W; A rows are read coalesced, B[o][:] is a warp-wide broadcast.
template <typename T>
__device__ __forceinline__ void merge(const LoraMergeParams& p) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    const int o = blockIdx.y;
    if (i >= p.in_features) return;
    T* w = static_cast<T*>(p.w) + static_cast<size_t>(o) * p.in_features + i;
    float delta = 0.0f;
    for (int j = 0; j < p.rank; ++j) delta = fmaf(p.b[static_cast<size_t>(o) * p.rank + j], p.a[static_cast<size_t>(j) * p.in_features + i], delta);
    *w = from_float<T>(to_float(*w) + p.sign * p.scale * delta);
}

/// dst[r][c] = T(src[r][c]) for r < rows and c < cols, 0 elsewhere in
/// [gridDim.y, ld]: the 16-bit, zero-padded copies of the fp32 adapter
/// weights the GEMMs read.
template <typename T>
__device__ __forceinline__ void pack_weights(const LoraPackParams& p) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    const int r = blockIdx.y;
    if (c >= p.ld) return;
    const bool inside = r < p.rows && c < p.cols;
    static_cast<T*>(p.dst)[static_cast<size_t>(r) * p.ld + c] = from_float<T>(inside ? p.src[static_cast<size_t>(r) * p.cols + c] : 0.0f);
}

/// y[i] += scale * t[i]: the add that ends the unfused PEFT sequence (the
/// benchmark baseline; the fused layer never needs it).
template <typename T>
__device__ __forceinline__ void add_scaled(const LoraAddParams& p) {
    const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i >= p.n) return;
    T* y = static_cast<T*>(p.y);
    y[i] = from_float<T>(to_float(y[i]) + p.scale * to_float(static_cast<const T*>(p.t)[i]));
}

}  // namespace lora
}  // namespace platypus

// ---- split-K reduction and weight helpers ------------------------------------------------------

/// out[i] = sum over z of partial[z][i], z in order (deterministic); `n` elements.
extern "C" __global__ void __launch_bounds__(256) lora_splitk_reduce(LoraReduceParams p) {
    const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i >= p.n) return;
    float sum = 0.0f;
    for (int z = 0; z < p.splits; ++z) sum += p.partial[static_cast<int64_t>(z) * p.n + i];
    p.out[i] = sum;
}
PLATYPUS_EXPORT_KERNEL(lora_splitk_reduce)

// ---- entry points ------------------------------------------------------------------------------

#define LORA_KERNEL(name, threads, min_blocks, body)                                                        \
    extern "C" __global__ void __launch_bounds__(threads, min_blocks) name(LoraGemmParams p) { body; } \
    PLATYPUS_EXPORT_KERNEL(name)

// Tile shapes: `wide` 128 x 128 (8 warps, 64 x 32 each; two blocks per SM,
// which holds it to 128 registers without spills) for the full-size
// products; `skinny` 128 x 32 (4 warps, 32 x 32) for N = r; `short` 32 x 128
// (4 warps, 32 x 32) for M = r. `nt_wide_f32out` is the wide x W^T product
// with fp32 output: the LM head's logits chunks for the fused cross-entropy
// (src/ops/cross_entropy.rs).
#define LORA_GEMMS(T, tname)                                                                                                           \
    LORA_KERNEL(lora_gemm_nt_wide_##tname, 256, 2, (platypus::lora::gemm<T, T, true, true, 128, 128, 2, 4>(p)))                         \
    LORA_KERNEL(lora_gemm_nt_skinny_##tname, 128, 1, (platypus::lora::gemm<T, T, true, true, 128, 32, 4, 1>(p)))                        \
    LORA_KERNEL(lora_gemm_nn_wide_##tname, 256, 2, (platypus::lora::gemm<T, T, true, false, 128, 128, 2, 4>(p)))                        \
    LORA_KERNEL(lora_gemm_nn_skinny_##tname, 128, 1, (platypus::lora::gemm<T, T, true, false, 128, 32, 4, 1>(p)))                       \
    LORA_KERNEL(lora_gemm_nt_wide_f32out_##tname, 256, 2, (platypus::lora::gemm<T, float, true, true, 128, 128, 2, 4>(p)))                 \
    LORA_KERNEL(lora_gemm_tn_short_f32out_##tname, 128, 1, (platypus::lora::gemm<T, float, false, false, 32, 128, 1, 4>(p)))            \
    LORA_KERNEL(lora_gemm_tn_skinny_f32out_##tname, 128, 1, (platypus::lora::gemm<T, float, false, false, 128, 32, 4, 1>(p)))           \
    extern "C" __global__ void __launch_bounds__(256) lora_merge_##tname(LoraMergeParams p) { platypus::lora::merge<T>(p); }                 \
    PLATYPUS_EXPORT_KERNEL(lora_merge_##tname)                                                                                          \
    extern "C" __global__ void __launch_bounds__(256) lora_pack_weights_##tname(LoraPackParams p) { platypus::lora::pack_weights<T>(p); }    \
    PLATYPUS_EXPORT_KERNEL(lora_pack_weights_##tname)                                                                                   \
    extern "C" __global__ void __launch_bounds__(256) lora_add_scaled_##tname(LoraAddParams p) { platypus::lora::add_scaled<T>(p); }       \
    PLATYPUS_EXPORT_KERNEL(lora_add_scaled_##tname)

LORA_GEMMS(__nv_bfloat16, bf16)
LORA_GEMMS(__half, f16)
