// sm_80 warp-level matrix primitives: mma.sync m16n8k16, ldmatrix and
// cp.async. On the GPU each is one PTX instruction (inline asm); on the host
// emulator the same names come from emu/tensor_core_emu.h, which follows the
// PTX ISA fragment layouts lane by lane.
//
// Fragment layouts (PTX ISA, "Matrix Fragments for mma.m16n8k16"), with
// g = lane / 4 and t = lane % 4; each 32-bit register holds two 16-bit
// elements, the lower-indexed column in the low half:
//   A (16x16, row-major): a[0] = A[g][2t..2t+1],     a[1] = A[g+8][2t..2t+1],
//                         a[2] = A[g][2t+8..2t+9],   a[3] = A[g+8][2t+8..2t+9]
//   B (16x8, "col"):      b[0] = B[2t..2t+1][g],     b[1] = B[2t+8..2t+9][g]
//   C/D (16x8, fp32):     c[0..1] = C[g][2t..2t+1],  c[2..3] = C[g+8][2t..2t+1]
// ldmatrix.x4 loads four 8x8 b16 matrices; lanes 8i..8i+7 give the row
// addresses (16 bytes each) of matrix i, and lane l receives r[i] =
// M_i[l/4][2(l%4)..2(l%4)+1] (with .trans: M_i[2(l%4)..2(l%4)+1][l/4]).
#pragma once

#include "common.cuh"

#ifndef __CUDACC__
#include "emu/tensor_core_emu.h"
#else

namespace platypus {

/// Shared-memory address of a generic pointer, as the PTX operand takes it.
__device__ __forceinline__ uint32_t smem_addr(const void* p) { return static_cast<uint32_t>(__cvta_generic_to_shared(p)); }

/// d += A * B on tensor cores: A 16x16 and B 16x8 of T (bf16 or f16), d fp32.
template <typename T>
__device__ __forceinline__ void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]);

template <>
__device__ __forceinline__ void mma_m16n8k16<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

template <>
__device__ __forceinline__ void mma_m16n8k16<__half>(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

/// ldmatrix.x4: four 8x8 b16 matrices; this lane supplies row (lane % 8) of matrix (lane / 8).
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(row)));
}

/// ldmatrix.x4.trans: as ldmatrix_x4, each matrix transposed.
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(row)));
}

/// ldmatrix.x2: two matrices; lanes 0..15 supply the row addresses.
__device__ __forceinline__ void ldmatrix_x2(uint32_t (&r)[2], const void* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(smem_addr(row)));
}

/// ldmatrix.x2.trans.
__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t (&r)[2], const void* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(smem_addr(row)));
}

/// ldmatrix.x1: one matrix; lanes 0..7 supply the row addresses.
__device__ __forceinline__ void ldmatrix_x1(uint32_t& r, const void* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n" : "=r"(r) : "r"(smem_addr(row)));
}

/// ldmatrix.x1.trans.
__device__ __forceinline__ void ldmatrix_x1_trans(uint32_t& r, const void* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n" : "=r"(r) : "r"(smem_addr(row)));
}

/// cp.async of 16 bytes global -> shared, bypassing L1 (.cg); when `valid` is
/// false nothing is read and the 16 shared bytes are zero-filled. The
/// "memory" clobber keeps the compiler from moving this thread's earlier
/// shared-memory accesses past the copy (it writes memory the compiler can't see).
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem)), "l"(gmem), "r"(valid ? 16 : 0) : "memory");
}

/// Closes the group of cp.async issued by this thread since the last commit.
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

/// Waits until at most N of this thread's committed groups are still in flight.
/// "memory": loads of the copied data must not be hoisted above the wait.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

}  // namespace platypus

#endif

namespace platypus {

/// Two fp32 values rounded to T and packed into one 32-bit register, `lo` in the low half.
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
    const T l = from_float<T>(lo);
    const T h = from_float<T>(hi);
    uint16_t lb, hb;
    memcpy(&lb, &l, 2);
    memcpy(&hb, &h, 2);
    return static_cast<uint32_t>(lb) | (static_cast<uint32_t>(hb) << 16);
}

/// Element offset of (row, 8-element chunk) in a [rows][COLS] shared tile of
/// 16-bit elements. The chunk index is XORed with bits of the row so that
/// the 8 rows one ldmatrix phase reads (same logical chunk, rows 8i ..
/// 8i + 7) land in 8 different 16-byte bank groups: a 128-byte bank line
/// holds 8 / kChunks rows, so rows of 16 elements (2 chunks) flip the chunk
/// every 4 rows, rows of 32 (4 chunks) rotate it every 2 rows, and rows of 64
/// or more XOR it with row % 8.
template <int COLS>
__device__ __forceinline__ int swz(int row, int chunk) {
    constexpr int kChunks = COLS / 8;
    static_assert(kChunks == 2 || kChunks == 4 || kChunks % 8 == 0, "tile rows of 16, 32 or a multiple of 64 elements");
    const int x = kChunks >= 8 ? (row & 7) : kChunks == 4 ? ((row >> 1) & 3) : ((row >> 2) & 1);
    return row * COLS + (chunk ^ x) * 8;
}

/// Issues cp.async for a swizzled [ROWS][COLS] shared tile, THREADS threads
/// sharing the 16-byte chunks: row r, chunk c from g + r * ld + 8c. Chunks of
/// rows >= rows_valid or starting at column >= cols_valid (a multiple of 8)
/// are zero-filled without reading global memory.
template <typename T, int ROWS, int COLS, int THREADS>
__device__ __forceinline__ void cp_async_tile(T* s, const T* g, int64_t ld, int rows_valid, int cols_valid) {
    constexpr int kChunks = COLS / 8;
    static_assert(ROWS * kChunks % THREADS == 0, "whole passes over the tile");
#pragma unroll
    for (int pass = 0; pass < ROWS * kChunks / THREADS; ++pass) {
        const int i = pass * THREADS + threadIdx.x;
        const int r = i / kChunks, c = i % kChunks;
        const bool ok = r < rows_valid && c * 8 < cols_valid;
        cp_async_16(s + swz<COLS>(r, c), g + (ok ? r * ld + c * 8 : 0), ok);
    }
}

}  // namespace platypus
