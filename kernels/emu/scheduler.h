// Internal state of the host CUDA emulator, shared by its scheduler
// (cuda_emu.cpp) and its memory checker (memcheck.cpp). Kernels never
// include this file: their interface is cuda_emu.h.
#pragma once

#include "cuda_emu.h"

#include <string>
#include <vector>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

#if defined(__SANITIZE_ADDRESS__)
#define PLATYPUS_EMU_ASAN 1
#endif

namespace platypus_emu {

/// Saved registers of a fiber (or of the scheduler's own stack).
#if defined(__x86_64__)
struct Context {
    void* sp = nullptr;
};
#else
struct Context {
    ucontext_t uc{};
};
#endif

enum class State { Runnable, AtBarrier, AtWarpOp, Done };

/// One cp.async in flight: its 16 bytes, read at issue, land at `dst` when
/// its group retires.
struct AsyncCopy {
    static constexpr uint64_t kUncommitted = ~uint64_t(0);
    unsigned char* dst;
    uint64_t group;  // index of the commit that closed it, or kUncommitted
    unsigned char bytes[16];
};

struct Fiber {
    ThreadState pub{};
    Context ctx{};
    State state = State::Runnable;
    unsigned linear = 0;
    // The fiber's stack: accesses there are private and never checked.
    uintptr_t stack_lo = 0;
    size_t stack_bytes = 0;
    // Where it waits, and what it brought to a warp collective.
    const char* file = nullptr;
    int line = 0;
    WarpOp op = WarpOp::Sync;
    unsigned mask = 0;
    uint64_t value = 0;
    int arg = 0;
    int width = 32;
    uint64_t result = 0;
    // A warp exchange: the instruction's name, the function computing the
    // warp's results, and this lane's data (on the fiber's stack).
    const char* exchange_name = nullptr;
    WarpExchangeFn exchange_fn = nullptr;
    void* exchange_data = nullptr;
    // The shared row an ldmatrix lane supplied, as it read at the lane's
    // arrival: it must read the same when the warp's exchange resolves.
    const unsigned char* watch = nullptr;
    unsigned char watch_bytes[16] = {};
    // This thread's cp.async in flight (issue order), and how many groups it
    // has committed: group i is the i-th commit.
    std::vector<AsyncCopy> async_copies;
    uint64_t async_groups = 0;
    // Happens-before bookkeeping of the memory checker: this thread's logical
    // clock (advanced at every barrier and __syncwarp it takes part in), its
    // clock just after the latest __syncthreads, and the latest clock of each
    // lane of its warp it has synchronized with (vector clock).
    uint32_t clock = 1;
    uint32_t barrier_clock = 0;
    uint32_t vc[32] = {};
    // The last barrier or __syncwarp this thread passed, for messages.
    const char* sync_file = nullptr;
    int sync_line = 0;
    bool sync_was_barrier = false;
#ifdef PLATYPUS_EMU_ASAN
    void* fake_stack = nullptr;
#endif
};

struct Stack {
    unsigned char* base = nullptr;  // lowest address, including the guard page
    size_t bytes = 0;
};

/// Most static shared memory a kernel may declare (every arch: 48 KiB).
constexpr size_t kStaticSharedBytes = 48 * 1024;

/// One PLATYPUS_SHARED variable of the running launch: its declaration site
/// and its offset in the block's static shared memory.
struct StaticShared {
    const void* site;
    const char* name;
    size_t offset;
    size_t bytes;
};

/// Everything one OS thread needs to run blocks; reused across launches.
struct Scheduler {
    std::vector<Stack> stacks;
    std::vector<Fiber> fibers;
    Context home{};
    Fiber* running = nullptr;
    BlockState block{};
    const char* kernel = nullptr;
    const PlatypusEmuLaunch* launch = nullptr;
    BlockBody body = nullptr;
    void* body_ctx = nullptr;
    std::string error;
    EmuFailure failure = EmuFailure::None;
    // Schedule perturbation (PLATYPUS_EMU_SHUFFLE): the launch's generator.
    bool shuffle = false;
    uint64_t rng = 0;
    // Static shared memory: one arena, laid out as the launch reaches each
    // PLATYPUS_SHARED declaration, poisoned at every block start.
    unsigned char* static_shared = nullptr;
    size_t static_used = 0;
    std::vector<StaticShared> static_vars;
#ifdef PLATYPUS_EMU_ASAN
    void* home_fake_stack = nullptr;
    const void* home_stack_bottom = nullptr;
    size_t home_stack_size = 0;
#endif
    ~Scheduler();
};

/// The calling OS thread's scheduler.
Scheduler& scheduler();

/// "kernel `k`, block (x,y,z), thread (x,y,z)" for messages.
std::string where(const Fiber& f);
std::string basename_of(const char* path);
std::string format(const char* fmt, ...) __attribute__((format(printf, 1, 2)));

/// Stops the launch from the running fiber: records `msg` (the first failure
/// wins) as `kind` and never returns to the kernel.
void fail_running(EmuFailure kind, const std::string& msg);

// ---- memcheck.cpp: shadow memory --------------------------------------------------------------

/// True if the running launch checks races and uninitialised shared reads.
bool memcheck_enabled();
/// Fiber `f` runs next (memcheck follows it if the launch checks memory).
void memcheck_enter(Fiber* f);
/// Resets the shadow of shared and global memory for a new block.
void memcheck_begin_block();
/// Drops the global-memory shadow of the finished block.
void memcheck_end_block();
/// A __syncthreads released every thread of the block.
void memcheck_barrier();
/// A __syncwarp released the lanes of `mask` in the warp starting at `base`.
void memcheck_syncwarp(size_t base, unsigned mask);
/// The running thread issued a cp.async (at file:line) writing `dst` (16
/// bytes), reading `src` unless it is null (a zero fill).
void memcheck_async_issue(const void* dst, const void* src, const char* file, int line);
/// The running thread's cp.async into `dst` landed.
void memcheck_async_land(const void* dst);
/// An explicit read by the running thread (an ldmatrix row), named for messages.
void memcheck_read(const void* p, size_t n, const char* what, const char* file, int line);
/// Marks `n` new bytes of static shared memory unwritten.
void memcheck_static_shared_grew(size_t from, size_t to);

}  // namespace platypus_emu
