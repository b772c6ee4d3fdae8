// The tensor-core GEMM mainloop the kernels share (lora.cu, linear.cu, cosine.cu):
// acc += A B for one block's BM x BN tile of C, K in 32-deep tiles through a
// 3-stage cp.async pipeline into swizzled shared memory, ldmatrix fragments
// and mma.sync m16n8k16 with fp32 accumulators. A is stored [M][K] (A_K) or
// [K][M], B [N][K] (B_K) or [K][N]; rows/columns past the matrix edge are
// zero-filled by the copies. Shared memory: kStages x (A tile + B tile).
#pragma once

#include "tensor_core.cuh"

namespace platypus {
namespace gemm {

constexpr int kBK = 32;     // K per pipeline stage
constexpr int kStages = 3;  // cp.async pipeline depth

/// One operand tile per stage: A_K (A stored [M][K], else [K][M]) and B_K
/// (B stored [N][K], else [K][N]) fix its shape in shared memory.
template <bool K_MAJOR, int MN>
struct TileShape {
    static constexpr int rows = K_MAJOR ? MN : kBK;
    static constexpr int cols = K_MAJOR ? kBK : MN;
};

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

    /// acc += A[m0.., k_begin..k_end) B[.., n0..] (A m rows, B n rows or
    /// columns) through the cp.async pipeline. `on_stage(stage, k0)` runs
    /// once every thread's copies of K tile k0 have landed in `stage`, before
    /// the barrier that publishes it (the place to edit this thread's chunks).
    template <typename OnStage>
    __device__ static void run(float (&acc)[MW][NW][4], T* smem, const T* a, int64_t lda, const T* b, int64_t ldb, int m, int n, int k_begin,
                               int k_end, int m0, int n0, int wm0, int wn0, OnStage on_stage) {
        const int tiles = (k_end - k_begin + kBK - 1) / kBK;
#pragma unroll
        for (int s = 0; s < kStages - 1; ++s) {
            if (s < tiles) load(smem + s * kStageElems, a, lda, b, ldb, m0, n0, k_begin + s * kBK, m, n, k_end);
            cp_async_commit();
        }
        for (int kt = 0; kt < tiles; ++kt) {
            T* stage = smem + kt % kStages * kStageElems;
            cp_async_wait<kStages - 2>();
            on_stage(stage, k_begin + kt * kBK);
            __syncthreads();  // tile kt is in; every warp is done with tile kt - 1
            const int next = kt + kStages - 1;
            if (next < tiles) load(smem + next % kStages * kStageElems, a, lda, b, ldb, m0, n0, k_begin + next * kBK, m, n, k_end);
            cp_async_commit();
            multiply(acc, stage, wm0, wn0);
        }
        // No copy is in flight here (the last kStages - 1 groups are empty:
        // no tile is loaded past `tiles`), but other warps may still read
        // the last tile.
        __syncthreads();  // the shared tiles are free for the next segment
    }

    /// Element (mw, nw, e) of a warp's acc is C[row_of(mw, e)][col_of(nw, e)]
    /// of the block's tile at (m0, n0).
    __device__ static int row_of(int m0, int wm0, int mw, int e) { return m0 + wm0 + 16 * mw + threadIdx.x % 32 / 4 + 8 * (e / 2); }
    __device__ static int col_of(int n0, int wn0, int nw, int e) { return n0 + wn0 + 8 * nw + 2 * (threadIdx.x % 4) + e % 2; }

    /// C[row][col] = OutT(f(acc, col)) for this warp's elements inside the
    /// m x n matrix C (leading dimension ldc). An element pair (columns 2t,
    /// 2t + 1 of one row) goes out as one 4- or 8-byte store when both are
    /// inside and aligned.
    template <typename OutT, typename F>
    __device__ static void store(const float (&acc)[MW][NW][4], OutT* c, int64_t ldc, int m, int n, int m0, int n0, int wm0, int wn0, F f) {
#pragma unroll
        for (int mw = 0; mw < MW; ++mw)
#pragma unroll
            for (int nw = 0; nw < NW; ++nw)
#pragma unroll
                for (int e = 0; e < 4; e += 2) {
                    const int row = row_of(m0, wm0, mw, e), col = col_of(n0, wn0, nw, e);
                    if (row >= m || col >= n) continue;
                    OutT* out = c + static_cast<size_t>(row) * ldc + col;
                    const float v0 = f(acc[mw][nw][e], col);
                    if (col + 1 < n && ldc % 2 == 0) {  // both columns, one aligned store
                        const float v1 = f(acc[mw][nw][e + 1], col + 1);
                        if constexpr (sizeof(OutT) == 4) {
                            *vector_at<Vec<float, 2>>(out) = Vec<float, 2>{{v0, v1}};
                        } else {
                            *vector_at<uint32_t>(out) = pack2<OutT>(v0, v1);
                        }
                    } else {
                        out[0] = from_float<OutT>(v0);
                        if (col + 1 < n) out[1] = from_float<OutT>(f(acc[mw][nw][e + 1], col + 1));
                    }
                }
    }
};


/// Dynamic shared memory of a GEMM variant's pipeline.
template <typename T, bool A_K, bool B_K, int BM, int BN, int WM, int WN>
constexpr int kSmem = kStages * Gemm<T, A_K, B_K, BM, BN, WM, WN>::kStageElems * static_cast<int>(sizeof(T));

/// A no-op `on_stage` hook.
struct NoStageHook {
    template <typename T>
    __device__ __forceinline__ void operator()(T*, int) const {}
};

}  // namespace gemm
}  // namespace platypus
