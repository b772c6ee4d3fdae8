// Host emulation of the sm_80 matrix primitives of tensor_core.cuh, with the
// signatures of its GPU branch plus two trailing defaulted arguments,
// `file` and `line`, that capture the CALLER's call site (so errors name the
// kernel's line, and two different mma/ldmatrix calls are told apart).
// Call through a helper of your own and the helper's line is reported.
//
// mma_m16n8k16 and ldmatrix_* are warp-collective (.sync.aligned): each lane
// deposits its registers with platypus_emu::warp_exchange, and once all 32
// lanes of the warp wait at the same call site one function computes every
// lane's outputs from the PTX fragment layouts (see tensor_core.cuh).
// cp_async_* are per thread; their state (copies in flight, groups) lives in
// the emulator's fiber, see cuda_emu.cpp.
#pragma once

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <type_traits>

namespace platypus {

namespace tc_emu {

/// The fp32 value of a bf16 / f16 bit pattern (exact: both widen to fp32 without rounding).
template <typename T>
inline float decode(uint16_t bits);
template <>
inline float decode<__nv_bfloat16>(uint16_t bits) { return __bfloat162float(__ushort_as_bfloat16(bits)); }
template <>
inline float decode<__half>(uint16_t bits) { return __half2float(__ushort_as_half(bits)); }

/// The two 16-bit elements of a fragment register: element 0 in the low half.
template <typename T>
inline float lo(uint32_t r) { return decode<T>(static_cast<uint16_t>(r & 0xffffu)); }
template <typename T>
inline float hi(uint32_t r) { return decode<T>(static_cast<uint16_t>(r >> 16)); }

/// One lane's registers at an mma: inputs a, b and the accumulator d (c in, d out).
struct MmaLane {
    uint32_t a[4];
    uint32_t b[2];
    float d[4];
};

/// Computes the warp's D = C + A * B (A 16x16, B 16x8, C/D 16x8) from the 32
/// lanes' fragments. With g = lane / 4, t = lane % 4 (tensor_core.cuh):
///   a[0] = A[g][2t, 2t+1], a[1] = A[g+8][2t, 2t+1], a[2] = A[g][2t+8, 2t+9], a[3] = A[g+8][2t+8, 2t+9]
///   b[0] = B[2t, 2t+1][g], b[1] = B[2t+8, 2t+9][g]
///   d[0], d[1] = D[g][2t, 2t+1],  d[2], d[3] = D[g+8][2t, 2t+1]
/// Each D[i][j] = C[i][j] + A[i][0]*B[0][j] + ... + A[i][15]*B[15][j] in fp32,
/// added left to right. Every product of two bf16 or two f16 values is exact
/// in fp32, so only the 16 additions round (the GPU adds in an unspecified
/// order and may round differently: compare with a tolerance).
template <typename T>
void mma_resolve(void* const* lanes) {
    float A[16][16], B[16][8], C[16][8];
    for (int lane = 0; lane < 32; ++lane) {
        const MmaLane& m = *static_cast<const MmaLane*>(lanes[lane]);
        const int g = lane / 4, t = lane % 4;
        for (int half = 0; half < 2; ++half) {  // a[0], a[1]: columns 2t..; a[2], a[3]: columns 2t+8..
            const int col = 2 * t + 8 * half;
            A[g][col] = lo<T>(m.a[2 * half]);
            A[g][col + 1] = hi<T>(m.a[2 * half]);
            A[g + 8][col] = lo<T>(m.a[2 * half + 1]);
            A[g + 8][col + 1] = hi<T>(m.a[2 * half + 1]);
        }
        B[2 * t][g] = lo<T>(m.b[0]);
        B[2 * t + 1][g] = hi<T>(m.b[0]);
        B[2 * t + 8][g] = lo<T>(m.b[1]);
        B[2 * t + 9][g] = hi<T>(m.b[1]);
        C[g][2 * t] = m.d[0];
        C[g][2 * t + 1] = m.d[1];
        C[g + 8][2 * t] = m.d[2];
        C[g + 8][2 * t + 1] = m.d[3];
    }
    float D[16][8];
    for (int i = 0; i < 16; ++i) {
        for (int j = 0; j < 8; ++j) {
            float acc = C[i][j];
            for (int k = 0; k < 16; ++k) acc += A[i][k] * B[k][j];
            D[i][j] = acc;
        }
    }
    for (int lane = 0; lane < 32; ++lane) {
        MmaLane& m = *static_cast<MmaLane*>(lanes[lane]);
        const int g = lane / 4, t = lane % 4;
        m.d[0] = D[g][2 * t];
        m.d[1] = D[g][2 * t + 1];
        m.d[2] = D[g + 8][2 * t];
        m.d[3] = D[g + 8][2 * t + 1];
    }
}

template <typename T>
constexpr const char* mma_name() {
    return std::is_same<T, __half>::value ? "mma_m16n8k16<f16>" : "mma_m16n8k16<bf16>";
}

/// One lane's part of an ldmatrix: the row address it supplies, the registers it receives.
struct LdmatrixLane {
    const void* row;
    uint32_t r[4];
};

/// Loads N 8x8 matrices of 16-bit elements: row j of matrix i is the 16
/// bytes at lanes[8i + j]->row. Lane l receives
///   r[i] = M_i[l/4][2(l%4)] | M_i[l/4][2(l%4)+1] << 16            (plain)
///   r[i] = M_i[2(l%4)][l/4] | M_i[2(l%4)+1][l/4] << 16            (TRANS)
template <int N, bool TRANS>
void ldmatrix_resolve(void* const* lanes) {
    uint16_t M[N][8][8];
    for (int i = 0; i < N; ++i)
        for (int j = 0; j < 8; ++j) std::memcpy(M[i][j], static_cast<const LdmatrixLane*>(lanes[8 * i + j])->row, 16);
    for (int l = 0; l < 32; ++l) {
        LdmatrixLane& out = *static_cast<LdmatrixLane*>(lanes[l]);
        const int row = l / 4, col = 2 * (l % 4);
        for (int i = 0; i < N; ++i) {
            const uint16_t e0 = TRANS ? M[i][col][row] : M[i][row][col];
            const uint16_t e1 = TRANS ? M[i][col + 1][row] : M[i][row][col + 1];
            out.r[i] = static_cast<uint32_t>(e0) | (static_cast<uint32_t>(e1) << 16);
        }
    }
}

/// The emulated ldmatrix: checks this lane's row address if the instruction
/// uses it (lanes 0 .. 8N-1) and records the row's read (a shared read whose
/// 16 bytes must not change before the warp's exchange resolves), then joins
/// the warp's exchange.
template <int N, bool TRANS>
inline void ldmatrix(uint32_t* r, const void* row, const char* name, const char* file, int line) {
    const unsigned lane = platypus_emu::lane_id();
    if (lane < 8u * N) {
        if (reinterpret_cast<uintptr_t>(row) % 16 != 0) {
            char what[160];
            std::snprintf(what, sizeof what, "%s: row address %p of lane %u is not 16-byte aligned", name, row, lane);
            platypus_emu::fail_at(platypus_emu::EmuFailure::Misaligned, what, file, line);
        }
        if (row == nullptr) platypus_emu::trap("ldmatrix: null row address", file, line);
        platypus_emu::watch_ldmatrix_row(row, name, file, line);
    }
    LdmatrixLane me{row, {0, 0, 0, 0}};
    platypus_emu::warp_exchange(name, &ldmatrix_resolve<N, TRANS>, &me, file, line);
    for (int i = 0; i < N; ++i) r[i] = me.r[i];
}

}  // namespace tc_emu

/// d += A * B on "tensor cores": A 16x16 and B 16x8 of T (bf16 or f16), d
/// fp32; all 32 lanes of the warp must call it at the same call site.
template <typename T>
inline void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const char* file = __builtin_FILE(),
                         int line = __builtin_LINE()) {
    static_assert(std::is_same<T, __nv_bfloat16>::value || std::is_same<T, __half>::value, "mma_m16n8k16 takes bf16 or f16");
    tc_emu::MmaLane me{{a[0], a[1], a[2], a[3]}, {b[0], b[1]}, {d[0], d[1], d[2], d[3]}};
    platypus_emu::warp_exchange(tc_emu::mma_name<T>(), &tc_emu::mma_resolve<T>, &me, file, line);
    for (int i = 0; i < 4; ++i) d[i] = me.d[i];
}

/// ldmatrix.x4: four 8x8 b16 matrices; this lane supplies row (lane % 8) of matrix (lane / 8).
inline void ldmatrix_x4(uint32_t (&r)[4], const void* row, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    tc_emu::ldmatrix<4, false>(r, row, "ldmatrix_x4", file, line);
}

/// ldmatrix.x4.trans: as ldmatrix_x4, each matrix transposed.
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    tc_emu::ldmatrix<4, true>(r, row, "ldmatrix_x4_trans", file, line);
}

/// ldmatrix.x2: two matrices; lanes 0..15 supply the row addresses (all 32 lanes must call it).
inline void ldmatrix_x2(uint32_t (&r)[2], const void* row, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    tc_emu::ldmatrix<2, false>(r, row, "ldmatrix_x2", file, line);
}

/// ldmatrix.x2.trans.
inline void ldmatrix_x2_trans(uint32_t (&r)[2], const void* row, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    tc_emu::ldmatrix<2, true>(r, row, "ldmatrix_x2_trans", file, line);
}

/// ldmatrix.x1: one matrix; lanes 0..7 supply the row addresses (all 32 lanes must call it).
inline void ldmatrix_x1(uint32_t& r, const void* row, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    tc_emu::ldmatrix<1, false>(&r, row, "ldmatrix_x1", file, line);
}

/// ldmatrix.x1.trans.
inline void ldmatrix_x1_trans(uint32_t& r, const void* row, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    tc_emu::ldmatrix<1, true>(&r, row, "ldmatrix_x1_trans", file, line);
}

/// cp.async of 16 bytes global -> shared. The destination reads as poison
/// (kPoison16) until cp_async_wait retires the copy's group; when `valid` is false,
/// `gmem` is not read and the data is 16 zero bytes.
inline void cp_async_16(void* smem, const void* gmem, bool valid, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    platypus_emu::cp_async_issue(smem, gmem, valid, file, line);
}

/// Closes the group of cp.async issued by this thread since the last commit.
inline void cp_async_commit() { platypus_emu::cp_async_commit_group(); }

/// Lands this thread's committed groups but the newest N (copies not yet
/// committed stay in flight, as in PTX).
template <int N>
inline void cp_async_wait() {
    static_assert(N >= 0, "cp.async.wait_group takes a non-negative count");
    platypus_emu::cp_async_wait_group(N);
}

}  // namespace platypus
