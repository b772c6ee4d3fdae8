// Fused LoRA linear layer: y = x W^T + s * dropout(x) A^T B^T, W [out, in]
// frozen, A [r, in] and B [out, r] trainable (fp32 masters; the kernels read
// 16-bit copies A16 [r, in] and B16 [out, r16], r16 = r rounded up to 16).
//
// Every product is one tensor-core GEMM kernel (mma.sync m16n8k16, ldmatrix,
// 3-stage cp.async pipeline, swizzled shared tiles) in three operand layouts
// and four tile shapes:
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
#include "tensor_core.cuh"

namespace platypus {
namespace lora {

constexpr int kBK = 32;     // K per pipeline stage
constexpr int kStages = 3;  // cp.async pipeline depth

/// Where a GEMM applies the dropout mask (LoraGemmParams::mask).
enum Mask : int { kNoMask = 0, kMaskA = 1, kMaskB = 2, kMaskSegment2 = 3 };

/// One operand tile per stage: A_K (A stored [M][K], else [K][M]) and B_K
/// (B stored [N][K], else [K][N]) fix its shape in shared memory.
template <bool K_MAJOR, int MN>
struct TileShape {
    static constexpr int rows = K_MAJOR ? MN : kBK;
    static constexpr int cols = K_MAJOR ? kBK : MN;
};

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
        Vec<T, 8>* v = reinterpret_cast<Vec<T, 8>*>(s + swz<COLS>(r, c));
        Vec<T, 8> x = *v;
#pragma unroll
        for (int e = 0; e < 8; ++e) x.v[e] = (keep >> e & 1u) ? x.v[e] : from_float<T>(0.0f);
        *v = x;
    }
}

/// A block's GEMM tile: BM x BN of C, warps WM x WN, each warp (BM/WM) x (BN/WN).
template <typename T, bool A_K, bool B_K, int BM, int BN, int WM, int WN>
struct Gemm {
    static constexpr int kThreads = 32 * WM * WN;
    static constexpr int MW = BM / WM / 16;  // m16 tiles per warp
    static constexpr int NW = BN / WN / 8;   // n8 tiles per warp
    using TileA = TileShape<A_K, BM>;
    using TileB = TileShape<B_K, BN>;
    static constexpr int kStageElems = TileA::rows * TileA::cols + TileB::rows * TileB::cols;
    static_assert(NW % 2 == 0, "B fragments come in pairs of n8 tiles");

    /// Issues the loads of K tile `k0` of one segment (A [m0.., k0..], B [n0.., k0..]) into `stage`.
    __device__ static void load(T* stage, const T* a, int64_t lda, const T* b, int64_t ldb, int m0, int n0, int k0, int m, int n, int k) {
        T* sA = stage;
        T* sB = stage + TileA::rows * TileA::cols;
        if constexpr (A_K) {
            cp_async_tile<T, BM, kBK, kThreads>(sA, a + m0 * lda + k0, lda, m - m0, k - k0);
        } else {
            cp_async_tile<T, kBK, BM, kThreads>(sA, a + k0 * lda + m0, lda, k - k0, m - m0);
        }
        if constexpr (B_K) {
            cp_async_tile<T, BN, kBK, kThreads>(sB, b + n0 * ldb + k0, ldb, n - n0, k - k0);
        } else {
            cp_async_tile<T, kBK, BN, kThreads>(sB, b + k0 * ldb + n0, ldb, k - k0, n - n0);
        }
    }

    /// Applies the dropout mask to this thread's chunks of the A or B tile in `stage`.
    __device__ static void mask(T* stage, const LoraGemmParams& p, int m0, int n0, int k0) {
        if (p.mask == kMaskA) {
            if constexpr (A_K) mask_tile<T, BM, kBK, kThreads>(stage, p, m0, k0, p.m - m0, p.k - k0);
        } else if (p.mask == kMaskB) {
            if constexpr (!B_K) mask_tile<T, kBK, BN, kThreads>(stage + TileA::rows * TileA::cols, p, k0, n0, p.k - k0, p.n - n0);
        }
    }

    /// acc += this stage's A tile times its B tile, for this warp.
    __device__ static void multiply(float (&acc)[MW][NW][4], const T* stage, int wm0, int wn0) {
        const T* sA = stage;
        const T* sB = stage + TileA::rows * TileA::cols;
        const int lane = threadIdx.x % 32;
#pragma unroll
        for (int kk = 0; kk < kBK / 16; ++kk) {
            uint32_t a[MW][4];
#pragma unroll
            for (int mw = 0; mw < MW; ++mw) {
                const int m = wm0 + mw * 16;
                if constexpr (A_K) {
                    ldmatrix_x4(a[mw], sA + swz<kBK>(m + lane % 8 + (lane / 8 % 2) * 8, kk * 2 + lane / 16));
                } else {
                    ldmatrix_x4_trans(a[mw], sA + swz<BM>(kk * 16 + (lane / 16) * 8 + lane % 8, m / 8 + lane / 8 % 2));
                }
            }
#pragma unroll
            for (int np = 0; np < NW / 2; ++np) {
                const int n = wn0 + np * 16;
                uint32_t b[4];
                if constexpr (B_K) {
                    ldmatrix_x4(b, sB + swz<kBK>(n + lane % 8 + (lane / 16) * 8, kk * 2 + lane / 8 % 2));
                } else {
                    ldmatrix_x4_trans(b, sB + swz<BN>(kk * 16 + lane % 8 + (lane / 8 % 2) * 8, n / 8 + lane / 16));
                }
                const uint32_t b0[2] = {b[0], b[1]};
                const uint32_t b1[2] = {b[2], b[3]};
#pragma unroll
                for (int mw = 0; mw < MW; ++mw) {
                    mma_m16n8k16<T>(acc[mw][2 * np], a[mw], b0);
                    mma_m16n8k16<T>(acc[mw][2 * np + 1], a[mw], b1);
                }
            }
        }
    }

    /// acc += A[m0.., k_begin..k_end) B[.., n0..] through the cp.async pipeline.
    __device__ static void run(float (&acc)[MW][NW][4], T* smem, const LoraGemmParams& p, const T* a, int64_t lda, const T* b, int64_t ldb,
                               int k_begin, int k_end, bool masked, int m0, int n0, int wm0, int wn0) {
        const int tiles = (k_end - k_begin + kBK - 1) / kBK;
#pragma unroll
        for (int s = 0; s < kStages - 1; ++s) {
            if (s < tiles) load(smem + s * kStageElems, a, lda, b, ldb, m0, n0, k_begin + s * kBK, p.m, p.n, k_end);
            cp_async_commit();
        }
        for (int kt = 0; kt < tiles; ++kt) {
            T* stage = smem + kt % kStages * kStageElems;
            cp_async_wait<kStages - 2>();
            if (masked) mask(stage, p, m0, n0, k_begin + kt * kBK);
            __syncthreads();  // tile kt is in; every warp is done with tile kt - 1
            const int next = kt + kStages - 1;
            if (next < tiles) load(smem + next % kStages * kStageElems, a, lda, b, ldb, m0, n0, k_begin + next * kBK, p.m, p.n, k_end);
            cp_async_commit();
            multiply(acc, stage, wm0, wn0);
        }
        cp_async_wait<0>();
        __syncthreads();  // the shared tiles are free for the next segment
    }
};

/// C = out_scale * (segment 1 + scale * [mask] segment 2), see LoraGemmParams.
template <typename T, typename OutT, bool A_K, bool B_K, int BM, int BN, int WM, int WN>
__device__ __forceinline__ void gemm(const LoraGemmParams& p) {
    using G = Gemm<T, A_K, B_K, BM, BN, WM, WN>;
    PLATYPUS_DYNAMIC_SMEM(T, smem);
    const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int wm0 = warp / WN * (BM / WM), wn0 = warp % WN * (BN / WN);
    float acc[G::MW][G::NW][4] = {};

    // Element (mw, nw, e) of acc is C[m0 + wm0 + 16 mw + lane/4 + 8 (e/2)][n0 + wn0 + 8 nw + 2 (lane%4) + e%2].
    auto row_of = [&](int mw, int e) { return m0 + wm0 + 16 * mw + lane / 4 + 8 * (e / 2); };
    auto col_of = [&](int nw, int e) { return n0 + wn0 + 8 * nw + 2 * (lane % 4) + e % 2; };

    if (p.k2 > 0) {
        G::run(acc, smem, p, static_cast<const T*>(p.a2), p.lda2, static_cast<const T*>(p.b2), p.ldb2, 0, p.k2, false, m0, n0, wm0, wn0);
        const bool masked = p.mask == kMaskSegment2;
        const float keep_scale = masked ? p.scale / (1.0f - p.dropout_p) : p.scale;
#pragma unroll
        for (int mw = 0; mw < G::MW; ++mw)
#pragma unroll
            for (int nw = 0; nw < G::NW; ++nw)
#pragma unroll
                for (int e = 0; e < 4; e += 2) {
                    // Elements e, e+1 are columns 2t, 2t+1: one Philox word pair of the x-shaped mask.
                    const uint64_t at = static_cast<uint64_t>(row_of(mw, e)) * p.mask_cols + col_of(nw, e);
                    const unsigned keep = masked ? dropout_keep2(p.seed, p.offset, at, p.dropout_p) : 3u;
                    acc[mw][nw][e] *= (keep & 1u) ? keep_scale : 0.0f;
                    acc[mw][nw][e + 1] *= (keep & 2u) ? keep_scale : 0.0f;
                }
    }
    const int splits = gridDim.z;
    const int k_begin = blockIdx.z * p.k_per_split;
    const int k_end = splits > 1 ? min(p.k, k_begin + p.k_per_split) : p.k;
    G::run(acc, smem, p, static_cast<const T*>(p.a), p.lda, static_cast<const T*>(p.b), p.ldb, k_begin, k_end, p.mask == kMaskA || p.mask == kMaskB,
           m0, n0, wm0, wn0);

    OutT* c = static_cast<OutT*>(p.c) + static_cast<size_t>(blockIdx.z) * p.m * p.ldc;
#pragma unroll
    for (int mw = 0; mw < G::MW; ++mw)
#pragma unroll
        for (int nw = 0; nw < G::NW; ++nw)
#pragma unroll
            for (int e = 0; e < 4; e += 2) {
                const int row = row_of(mw, e), col = col_of(nw, e);
                if (row >= p.m || col >= p.n) continue;
                OutT* out = c + static_cast<size_t>(row) * p.ldc + col;
                const float v0 = acc[mw][nw][e] * p.out_scale, v1 = acc[mw][nw][e + 1] * p.out_scale;
                if (col + 1 < p.n && p.ldc % 2 == 0) {  // both columns, one aligned store
                    if constexpr (sizeof(OutT) == 4) {
                        *reinterpret_cast<Vec<float, 2>*>(out) = Vec<float, 2>{{v0, v1}};
                    } else {
                        *reinterpret_cast<uint32_t*>(out) = pack2<OutT>(v0, v1);
                    }
                } else {
                    out[0] = from_float<OutT>(v0);
                    if (col + 1 < p.n) out[1] = from_float<OutT>(v1);
                }
            }
}

/// Dynamic shared memory of a GEMM variant.
template <typename T, bool A_K, bool B_K, int BM, int BN, int WM, int WN>
constexpr int kGemmSmem = kStages * Gemm<T, A_K, B_K, BM, BN, WM, WN>::kStageElems * static_cast<int>(sizeof(T));

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
// (4 warps, 32 x 32) for M = r.
#define LORA_GEMMS(T, tname)                                                                                                           \
    LORA_KERNEL(lora_gemm_nt_wide_##tname, 256, 2, (platypus::lora::gemm<T, T, true, true, 128, 128, 2, 4>(p)))                         \
    LORA_KERNEL(lora_gemm_nt_skinny_##tname, 128, 1, (platypus::lora::gemm<T, T, true, true, 128, 32, 4, 1>(p)))                        \
    LORA_KERNEL(lora_gemm_nn_wide_##tname, 256, 2, (platypus::lora::gemm<T, T, true, false, 128, 128, 2, 4>(p)))                        \
    LORA_KERNEL(lora_gemm_nn_skinny_##tname, 128, 1, (platypus::lora::gemm<T, T, true, false, 128, 32, 4, 1>(p)))                       \
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
