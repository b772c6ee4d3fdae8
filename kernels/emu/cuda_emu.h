// Host emulation of the CUDA built-ins the kernels in kernels/ use.
//
// The .cu files compile unchanged with g++ when this header stands in for nvcc:
// every CUDA thread of a block becomes a fiber on one OS thread, and the
// scheduler in cuda_emu.cpp switches fibers only at barriers and warp
// collectives. So __syncthreads, __shfl_*_sync and __ballot_sync have CUDA's
// semantics, and a barrier or collective that not every required thread
// reaches is reported as an error naming the kernel, block and thread
// instead of hanging.
//
// What is emulated: thread/block indices, static (PLATYPUS_SHARED) and dynamic
// (PLATYPUS_DYNAMIC_SMEM) shared memory per block, poisoned at block start,
// __syncthreads, __syncwarp, warp shuffles, votes and integer reductions,
// atomics, the fast-math intrinsics, and the f16/bf16 types (the real
// cuda_fp16.h / cuda_bf16.h, which compile as host C++;
// cuda_types_fallback.h where the CUDA headers are missing). Also the sm_80
// matrix primitives of tensor_core.cuh (their host side is
// emu/tensor_core_emu.h):
//   - mma.sync m16n8k16 (bf16, f16; fp32 accumulate) and ldmatrix .x1/.x2/.x4
//     (.trans) are warp-collective: one warp_exchange each, resolved once all
//     32 lanes of the warp wait at the same call site; a lane that exits, a
//     lane at another call site and a partial warp are reported like a
//     broken collective. mma computes every output as c + sum_k a*b in fp32,
//     k = 0..15 in order (the GPU's summation order is unspecified: compare
//     with a tolerance);
//   - cp.async (16 bytes, per thread) models the asynchrony: at issue the
//     source is read (not at all when the copy zero-fills) and the 16
//     destination bytes are poisoned; the data lands only when
//     cp_async_wait<N> retires the copy's group (every group but the newest
//     N committed ones; copies not yet committed belong to no group and stay
//     in flight). Copies still in flight when a thread exits land at its
//     exit. Misaligned (not 16-byte) addresses trap.
//
// What is checked (memcheck.cpp; README "The host emulator"): with
// PLATYPUS_EMU_SHUFFLE a seeded random order of threads, warps and blocks;
// with PLATYPUS_EMU_MEMCHECK every shared and global access of the kernel
// code (g++ -fsanitize=thread instrumentation, answered by the emulator
// instead of ThreadSanitizer) against the accesses of the block's other
// threads since their last common barrier or __syncwarp, and reads of shared
// memory nothing wrote; the alignment of every vector access.
// Not emulated: memory-model races between blocks (blocks run one after
// another), texture/surface memory, clusters.
#pragma once
#ifdef __CUDACC__
#error "cuda_emu.h is the host emulation of CUDA; nvcc must not include it"
#endif

#ifdef PLATYPUS_EMU_NO_CUDA_HEADERS
#include "cuda_types_fallback.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <vector_functions.h>
#include <vector_types.h>
#endif

#include "../params.h"

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

// The CUDA headers define the execution-space keywords as attributes g++
// ignores with a warning; on the host they mean nothing.
#undef __global__
#undef __device__
#undef __host__
#undef __shared__
#undef __forceinline__
#undef __noinline__
#undef __launch_bounds__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
// Static shared memory is declared with PLATYPUS_SHARED (below), which the
// emulator gives each block afresh and poisoned; a plain __shared__ would be a
// host static that keeps its contents from block to block.
#define __shared__ _Pragma("GCC error \"declare static shared memory with PLATYPUS_SHARED(T, name, dims), not __shared__\"")
#ifndef __align__
// A GNU attribute, not alignas: CUDA code writes `__shared__ __align__(16) T x[]`,
// where a standard attribute may not stand between decl-specifiers.
#define __align__(n) __attribute__((aligned(n)))
#endif

namespace platypus_emu {

/// What stopped a launch (params.h: PLATYPUS_EMU_FAIL_*).
enum class EmuFailure : int {
    None = PLATYPUS_EMU_OK,
    Launch = PLATYPUS_EMU_FAIL_LAUNCH,
    Sync = PLATYPUS_EMU_FAIL_SYNC,
    Race = PLATYPUS_EMU_FAIL_RACE,
    Misaligned = PLATYPUS_EMU_FAIL_MISALIGNED,
    Uninitialized = PLATYPUS_EMU_FAIL_UNINITIALIZED,
    Trap = PLATYPUS_EMU_FAIL_TRAP,
};

/// Kinds of warp collective; lanes meeting at one collective must agree on it.
/// Exchange is warp_exchange (the .sync.aligned matrix instructions).
enum class WarpOp : int { Sync, ShflIdx, ShflUp, ShflDown, ShflXor, Ballot, All, Any, ReduceAdd, ReduceMin, ReduceMax, Exchange };

/// Per-fiber state the built-ins read (defined in cuda_emu.cpp).
struct ThreadState {
    uint3 thread_idx;
};
/// Per-block state the built-ins read.
struct BlockState {
    uint3 block_idx;
    dim3 block_dim;
    dim3 grid_dim;
    unsigned char* dynamic_smem;
};

extern thread_local ThreadState* current_thread;
extern thread_local BlockState* current_block;

/// Block-wide barrier; `site` names the call for error messages.
void syncthreads(const char* file, int line);
/// Warp collective: deposits `value`, waits for every lane named in `mask`,
/// returns this lane's result (a 64-bit pattern the caller converts back).
uint64_t warp_collective(WarpOp op, unsigned mask, uint64_t value, int arg, int width, const char* file, int line);
/// Computes the results of a warp_exchange: `lanes[l]` is the data lane l
/// deposited (l = 0..31); it reads every lane's inputs and writes every
/// lane's outputs in place.
using WarpExchangeFn = void (*)(void* const* lanes);
/// Warp-collective exchange for instructions every lane of a full warp must
/// execute together (mma.sync.aligned, ldmatrix.sync.aligned): deposits
/// `lane_data`, waits until all 32 lanes of the warp wait at the same call
/// site (`file`:`line`) with the same `fn`, then the scheduler calls `fn`
/// once with the 32 pointers and releases the lanes. `what` names the
/// instruction in error messages. Traps if the warp has fewer than 32 threads.
void warp_exchange(const char* what, WarpExchangeFn fn, void* lane_data, const char* file, int line);
/// cp.async of 16 bytes: reads the source now (16 zero bytes instead when
/// `!valid`, without reading `gmem`), fills the destination with 0xFF and
/// keeps the data in flight until a cp_async_wait_group retires it. Traps on
/// an address that is not 16-byte aligned.
void cp_async_issue(void* smem, const void* gmem, bool valid, const char* file, int line);
/// Closes the calling thread's current cp.async group (possibly empty).
void cp_async_commit_group();
/// Lands the calling thread's cp.async of every committed group but the
/// newest `newest_pending` ones, in issue order.
void cp_async_wait_group(int newest_pending);
/// Stops the whole launch with an error (the device-side assert / __trap);
/// never returns. Not declared [[noreturn]]: AddressSanitizer's no-return
/// hook cannot tell a fiber's stack from a thread's.
void trap(const char* what, const char* file, int line);
/// As trap, for a check of kind `kind` (a misaligned address, a resource
/// limit) with `what` naming it.
void fail_at(EmuFailure kind, const char* what, const char* file, int line);
/// Lane id of the calling thread within its warp.
unsigned lane_id();
/// The block's copy of the static shared variable declared at `site`
/// (`bytes`, 16-byte aligned), laid out when the launch first reaches it and
/// poisoned at every block start. Traps past the 48 KiB of static shared
/// memory a kernel may have, or past the launch's shared-memory limits.
void* static_shared(const void* site, size_t bytes, const char* name, const char* file, int line);
/// Traps unless `p` is aligned to `bytes`, the size of a vector access (the
/// GPU faults on a misaligned LD/ST.{32,64,128}).
void check_vector_access(const void* p, size_t bytes, const char* file, int line);
/// An ldmatrix lane's row read: checked like any shared read, and the 16
/// bytes are kept to compare when the warp's exchange resolves (a row that
/// changes while the warp gathers is a race).
void watch_ldmatrix_row(const void* row, const char* what, const char* file, int line);
/// The 16-bit pattern that fills unwritten shared memory and cp.async
/// destinations in flight: NaN as f16, bf16, f32 and f64, and a large
/// positive integer (0x7fff7fff as int32), never a plausible count or -1.
constexpr uint16_t kPoison16 = 0x7fff;
/// Fills [p, p + n) with kPoison16 (by address parity, so every aligned
/// element reads the pattern).
void poison(void* p, size_t n);

template <typename T>
inline uint64_t to_bits(T v) {
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "warp collectives move at most 8 bytes per lane");
    uint64_t b = 0;
    std::memcpy(&b, &v, sizeof(T));
    return b;
}
template <typename T>
inline T from_bits(uint64_t b) {
    T v;
    std::memcpy(&v, &b, sizeof(T));
    return v;
}

}  // namespace platypus_emu

#define threadIdx (platypus_emu::current_thread->thread_idx)
#define blockIdx (platypus_emu::current_block->block_idx)
#define blockDim (platypus_emu::current_block->block_dim)
#define gridDim (platypus_emu::current_block->grid_dim)
#define warpSize 32

// ---- barriers and warp collectives -------------------------------------------------------------

#define __syncthreads() platypus_emu::syncthreads(__FILE__, __LINE__)
// A call on a temporary, so that both __syncwarp() and __syncwarp(mask) work in
// ISO C++ (", ##__VA_ARGS__" keeps the comma of an empty argument there).
#define __syncwarp(...) platypus_emu::SyncwarpAt{__FILE__, __LINE__}(__VA_ARGS__)
#define __shfl_sync(mask, v, src, ...) platypus_emu::shfl_at(platypus_emu::WarpOp::ShflIdx, mask, v, src, __FILE__, __LINE__, ##__VA_ARGS__)
#define __shfl_up_sync(mask, v, d, ...) platypus_emu::shfl_at(platypus_emu::WarpOp::ShflUp, mask, v, d, __FILE__, __LINE__, ##__VA_ARGS__)
#define __shfl_down_sync(mask, v, d, ...) platypus_emu::shfl_at(platypus_emu::WarpOp::ShflDown, mask, v, d, __FILE__, __LINE__, ##__VA_ARGS__)
#define __shfl_xor_sync(mask, v, m, ...) platypus_emu::shfl_at(platypus_emu::WarpOp::ShflXor, mask, v, m, __FILE__, __LINE__, ##__VA_ARGS__)
#define __ballot_sync(mask, p) platypus_emu::vote_at(platypus_emu::WarpOp::Ballot, mask, p, __FILE__, __LINE__)
#define __all_sync(mask, p) (platypus_emu::vote_at(platypus_emu::WarpOp::All, mask, p, __FILE__, __LINE__) != 0)
#define __any_sync(mask, p) (platypus_emu::vote_at(platypus_emu::WarpOp::Any, mask, p, __FILE__, __LINE__) != 0)
#define __reduce_add_sync(mask, v) platypus_emu::reduce_at(platypus_emu::WarpOp::ReduceAdd, mask, v, __FILE__, __LINE__)
#define __reduce_min_sync(mask, v) platypus_emu::reduce_at(platypus_emu::WarpOp::ReduceMin, mask, v, __FILE__, __LINE__)
#define __reduce_max_sync(mask, v) platypus_emu::reduce_at(platypus_emu::WarpOp::ReduceMax, mask, v, __FILE__, __LINE__)
#define __trap() platypus_emu::trap("__trap()", __FILE__, __LINE__)

namespace platypus_emu {

/// __syncwarp at a call site.
struct SyncwarpAt {
    const char* file;
    int line;
    void operator()(unsigned mask = 0xffffffffu) const { warp_collective(WarpOp::Sync, mask, 0, 0, 32, file, line); }
};
template <typename T>
inline T shfl_at(WarpOp op, unsigned mask, T v, int arg, const char* file, int line, int width = 32) {
    return from_bits<T>(warp_collective(op, mask, to_bits(v), arg, width, file, line));
}
inline unsigned vote_at(WarpOp op, unsigned mask, bool p, const char* file, int line) {
    return static_cast<unsigned>(warp_collective(op, mask, p ? 1 : 0, 0, 32, file, line));
}
template <typename T>
inline T reduce_at(WarpOp op, unsigned mask, T v, const char* file, int line) {
    static_assert(std::is_same<T, int>::value || std::is_same<T, unsigned>::value, "redux.sync takes 32-bit integers");
    const int is_signed = std::is_signed<T>::value ? 1 : 0;
    return from_bits<T>(warp_collective(op, mask, static_cast<uint64_t>(static_cast<int64_t>(v)), is_signed, 32, file, line));
}

}  // namespace platypus_emu

// ---- atomics (blocks of one launch run on one OS thread; __atomic keeps them correct anyway) ---

template <typename T>
inline T atomicAdd(T* addr, T v) {
    if constexpr (std::is_integral<T>::value) {
        return __atomic_fetch_add(addr, v, __ATOMIC_RELAXED);
    } else {
        T old = *addr;
        T desired;
        do {
            desired = old + v;
        } while (!__atomic_compare_exchange(addr, &old, &desired, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED));
        return old;
    }
}
template <typename T>
inline T atomicMax(T* addr, T v) {
    T old = __atomic_load_n(addr, __ATOMIC_RELAXED);
    while (old < v && !__atomic_compare_exchange_n(addr, &old, v, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
    }
    return old;
}
template <typename T>
inline T atomicMin(T* addr, T v) {
    T old = __atomic_load_n(addr, __ATOMIC_RELAXED);
    while (v < old && !__atomic_compare_exchange_n(addr, &old, v, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
    }
    return old;
}
template <typename T>
inline T atomicExch(T* addr, T v) {
    return __atomic_exchange_n(addr, v, __ATOMIC_RELAXED);
}
template <typename T>
inline T atomicCAS(T* addr, T expected, T desired) {
    __atomic_compare_exchange_n(addr, &expected, desired, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
    return expected;
}
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_block() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

// ---- math and bit intrinsics -------------------------------------------------------------------

inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __expf(float x) { return std::exp(x); }
inline float __exp2f(float x) { return std::exp2(x); }
inline float __logf(float x) { return std::log(x); }
inline float __log2f(float x) { return std::log2(x); }
inline float __sinf(float x) { return std::sin(x); }
inline float __cosf(float x) { return std::cos(x); }
inline void __sincosf(float x, float* s, float* c) { *s = std::sin(x); *c = std::cos(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fsqrt_rn(float x) { return std::sqrt(x); }
inline float __saturatef(float x) { return x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x); }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline int __float_as_int(float x) { int i; std::memcpy(&i, &x, 4); return i; }
inline unsigned __float_as_uint(float x) { unsigned i; std::memcpy(&i, &x, 4); return i; }
inline float __int_as_float(int i) { float x; std::memcpy(&x, &i, 4); return x; }
inline float __uint_as_float(unsigned i) { float x; std::memcpy(&x, &i, 4); return x; }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline unsigned __umulhi(unsigned a, unsigned b) { return static_cast<unsigned>((uint64_t(a) * b) >> 32); }
inline unsigned __brev(unsigned x) {
    unsigned r = 0;
    for (int i = 0; i < 32; ++i) r |= ((x >> i) & 1u) << (31 - i);
    return r;
}
using std::isfinite;
using std::max;
using std::min;
template <typename T>
inline T __ldg(const T* p) { return *p; }

// ---- dynamic shared memory ---------------------------------------------------------------------

/// The block's dynamic shared memory (cuLaunchKernel's sharedMemBytes),
/// poisoned (kPoison16) at block start so reads of never-written shared
/// memory show up in results, and reported under PLATYPUS_EMU_MEMCHECK.
#define PLATYPUS_DYNAMIC_SMEM(T, name) T* name = reinterpret_cast<T*>(platypus_emu::current_block->dynamic_smem)

/// A static shared variable `T name dims` (e.g. PLATYPUS_SHARED(float,
/// scratch, [32])), 16-byte aligned: on the GPU `__shared__ __align__(16)`,
/// here the block's own poisoned copy (one per declaration site and template
/// instantiation).
#define PLATYPUS_SHARED(T, name, dims)                                                                   \
    static char platypus_shared_site_##name;                                                            \
    using platypus_shared_type_##name = T dims;                                                         \
    platypus_shared_type_##name& name = *static_cast<platypus_shared_type_##name*>(platypus_emu::static_shared( \
        &platypus_shared_site_##name, sizeof(platypus_shared_type_##name), #name, __FILE__, __LINE__))

// ---- launching (used by the generated per-kernel entry points) ---------------------------------

namespace platypus_emu {

using BlockBody = void (*)(void* ctx);
/// Runs `body` once per thread of every block of the grid; PLATYPUS_EMU_OK on
/// success, else a PLATYPUS_EMU_FAIL_* code and a message naming `kernel`,
/// block and thread in `err`.
int run_grid(const char* kernel, const PlatypusEmuLaunch* launch, BlockBody body, void* ctx, char* err, size_t err_len);

template <typename... A>
struct KernelCall {
    void (*fn)(A...);
    void** args;
};

template <typename... A, size_t... I>
inline void call_unpacked(void (*fn)(A...), void** args, std::index_sequence<I...>) {
    fn(*static_cast<std::remove_cv_t<std::remove_reference_t<A>>*>(args[I])...);
}

template <typename... A>
inline void call_kernel(void* ctx) {
    auto* c = static_cast<KernelCall<A...>*>(ctx);
    call_unpacked(c->fn, c->args, std::index_sequence_for<A...>{});
}

/// Launches `fn` with its arguments packed the cuLaunchKernel way: args[i]
/// points at the i-th parameter's value.
template <typename... A>
inline int launch(const char* kernel, void (*fn)(A...), const PlatypusEmuLaunch* cfg, void** args, char* err, size_t err_len) {
    KernelCall<A...> call{fn, args};
    return run_grid(kernel, cfg, &call_kernel<A...>, &call, err, err_len);
}

}  // namespace platypus_emu

/// Exports kernel `name` as `platypus_emu_launch__name`, the symbol the Rust
/// emulator backend calls (build.rs generates one per extern "C" __global__).
#define PLATYPUS_EMU_EXPORT(name)                                                                                   \
    extern "C" int platypus_emu_launch__##name(const PlatypusEmuLaunch* cfg, void** args, char* err, size_t err_len) { \
        return platypus_emu::launch(#name, &name, cfg, args, err, err_len);                                         \
    }
