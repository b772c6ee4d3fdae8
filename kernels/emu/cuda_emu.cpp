// Scheduler of the host CUDA emulator (see cuda_emu.h).
//
// A launch runs its blocks one after another. Each thread of a block is a
// fiber with its own stack; a fiber runs until it reaches a barrier
// or a warp collective, or returns. When no fiber can run, the scheduler
// resolves what is complete: a warp collective whose named lanes have all
// arrived with the same operation and mask, a warp exchange (mma, ldmatrix)
// all 32 lanes of the warp reached at one call site, or a __syncthreads that every
// thread of the block reached at the same call site. If nothing is complete,
// the block is deadlocked and the launch fails with a message naming the
// kernel, block, thread and call site.
#include "cuda_emu.h"

#include <sys/mman.h>
#include <unistd.h>
#if !defined(__x86_64__)
#include <ucontext.h>
#endif

#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <new>
#include <string>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define PLATYPUS_EMU_ASAN 1
#endif

namespace platypus_emu {

thread_local ThreadState* current_thread = nullptr;
thread_local BlockState* current_block = nullptr;

namespace {

// Fiber stacks are large and lazily committed: a kernel's per-thread arrays
// (register tiles) live there. A guard page below each turns an overflow into
// a fault instead of silent corruption.
constexpr size_t kStackBytes = 512 * 1024;
constexpr unsigned kMaxThreadsPerBlock = 1024;
constexpr size_t kMaxSharedBytes = 227 * 1024;  // sm_90's opt-in limit per block
constexpr size_t kSharedAlign = 128;            // alignment of the dynamic shared memory

// ---- execution contexts ------------------------------------------------------------------------
//
// On x86-64 a switch saves the callee-saved registers and the FP control
// words on the current stack and swaps stack pointers: no system call (glibc's
// swapcontext makes one per switch to save the signal mask, which made the
// emulator spend most of its time in the kernel). Elsewhere: ucontext.

#if defined(__x86_64__)
struct Context {
    void* sp = nullptr;
};

extern "C" void platypus_emu_switch(void** save_sp, void* load_sp);
asm(R"(
    .text
    .globl platypus_emu_switch
    .type platypus_emu_switch, @function
platypus_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size platypus_emu_switch, .-platypus_emu_switch
    .section .note.GNU-stack,"",@progbits
    .text
)");

/// Prepares `c` to start `entry` on the stack [base, base + bytes): a frame
/// as platypus_emu_switch leaves it, whose `ret` enters `entry` with the
/// stack aligned as after a call.
void context_init(Context& c, unsigned char* base, size_t bytes, void (*entry)()) {
    auto* top = reinterpret_cast<uint64_t*>(reinterpret_cast<uintptr_t>(base + bytes) & ~uintptr_t(15));
    uint64_t* sp = top;
    *--sp = 0;                                     // return address of entry (it never returns)
    *--sp = reinterpret_cast<uint64_t>(entry);     // popped by ret
    for (int i = 0; i < 6; ++i) *--sp = 0;         // rbp rbx r12 r13 r14 r15
    uint32_t control[2];
    asm volatile("stmxcsr %0\n\tfnstcw %1" : "=m"(control[0]), "=m"(control[1]));
    *--sp = (uint64_t(control[1] & 0xffff) << 32) | control[0];
    c.sp = sp;
}

void context_switch(Context& from, Context& to) { platypus_emu_switch(&from.sp, to.sp); }
#else
struct Context {
    ucontext_t uc{};
};

void context_init(Context& c, unsigned char* base, size_t bytes, void (*entry)()) {
    getcontext(&c.uc);
    c.uc.uc_stack.ss_sp = base;
    c.uc.uc_stack.ss_size = bytes;
    c.uc.uc_link = nullptr;
    makecontext(&c.uc, entry, 0);
}

void context_switch(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
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
    // This thread's cp.async in flight (issue order), and how many groups it
    // has committed: group i is the i-th commit.
    std::vector<AsyncCopy> async_copies;
    uint64_t async_groups = 0;
#ifdef PLATYPUS_EMU_ASAN
    void* fake_stack = nullptr;
#endif
};

struct Stack {
    unsigned char* base = nullptr;  // lowest address, including the guard page
    size_t bytes = 0;
};

/// Everything one OS thread needs to run blocks; reused across launches.
struct Scheduler {
    std::vector<Stack> stacks;
    std::vector<Fiber> fibers;
    Context home{};
    Fiber* running = nullptr;
    BlockState block{};
    const char* kernel = nullptr;
    BlockBody body = nullptr;
    void* body_ctx = nullptr;
    std::string error;
#ifdef PLATYPUS_EMU_ASAN
    void* home_fake_stack = nullptr;
    const void* home_stack_bottom = nullptr;
    size_t home_stack_size = 0;
#endif

    ~Scheduler() {
        for (auto& s : stacks) munmap(s.base, s.bytes);
    }
};

thread_local Scheduler sched;

std::string basename_of(const char* path) {
    std::string p = path ? path : "?";
    auto slash = p.find_last_of('/');
    return slash == std::string::npos ? p : p.substr(slash + 1);
}

std::string format(const char* fmt, ...) {
    char buf[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    return buf;
}

std::string where(const Fiber& f) {
    const BlockState& b = sched.block;
    return format("kernel `%s`, block (%u,%u,%u), thread (%u,%u,%u)", sched.kernel, b.block_idx.x, b.block_idx.y, b.block_idx.z,
                  f.pub.thread_idx.x, f.pub.thread_idx.y, f.pub.thread_idx.z);
}

const char* op_name(WarpOp op) {
    switch (op) {
        case WarpOp::Sync: return "__syncwarp";
        case WarpOp::ShflIdx: return "__shfl_sync";
        case WarpOp::ShflUp: return "__shfl_up_sync";
        case WarpOp::ShflDown: return "__shfl_down_sync";
        case WarpOp::ShflXor: return "__shfl_xor_sync";
        case WarpOp::Ballot: return "__ballot_sync";
        case WarpOp::All: return "__all_sync";
        case WarpOp::Any: return "__any_sync";
        case WarpOp::ReduceAdd: return "__reduce_add_sync";
        case WarpOp::ReduceMin: return "__reduce_min_sync";
        case WarpOp::ReduceMax: return "__reduce_max_sync";
        case WarpOp::Exchange: return "warp exchange";
    }
    return "?";
}

std::string wait_site(const Fiber& f) {
    if (f.state == State::AtBarrier) return format("__syncthreads at %s:%d", basename_of(f.file).c_str(), f.line);
    if (f.op == WarpOp::Exchange) return format("%s at %s:%d", f.exchange_name, basename_of(f.file).c_str(), f.line);
    return format("%s(mask 0x%08x) at %s:%d", op_name(f.op), f.mask, basename_of(f.file).c_str(), f.line);
}

// ---- fiber switching ---------------------------------------------------------------------------

void switch_to_fiber(Fiber& f, const Stack& stack) {
    sched.running = &f;
    current_thread = &f.pub;
#ifdef PLATYPUS_EMU_ASAN
    __sanitizer_start_switch_fiber(&sched.home_fake_stack, stack.base, stack.bytes);
#else
    (void)stack;
#endif
    context_switch(sched.home, f.ctx);
#ifdef PLATYPUS_EMU_ASAN
    __sanitizer_finish_switch_fiber(sched.home_fake_stack, nullptr, nullptr);
#endif
    sched.running = nullptr;
    current_thread = nullptr;
}

/// Called on a fiber: hands control back to the scheduler. `finished` fibers
/// never come back, so their fake stack (ASan) is released.
void yield_to_scheduler(bool finished) {
    Fiber& f = *sched.running;
#ifdef PLATYPUS_EMU_ASAN
    __sanitizer_start_switch_fiber(finished ? nullptr : &f.fake_stack, sched.home_stack_bottom, sched.home_stack_size);
#else
    (void)finished;
#endif
    context_switch(f.ctx, sched.home);
#ifdef PLATYPUS_EMU_ASAN
    __sanitizer_finish_switch_fiber(f.fake_stack, nullptr, nullptr);
#endif
}

/// Lands the cp.async of `f` that `retire` selects, in issue order, and drops them.
template <typename Pred>
void land_async_copies(Fiber& f, Pred retire) {
    size_t kept = 0;
    for (size_t i = 0; i < f.async_copies.size(); ++i) {
        AsyncCopy& c = f.async_copies[i];
        if (retire(c)) {
            std::memcpy(c.dst, c.bytes, sizeof c.bytes);
        } else {
            f.async_copies[kept++] = c;
        }
    }
    f.async_copies.resize(kept);
}

void fiber_entry() {
#ifdef PLATYPUS_EMU_ASAN
    __sanitizer_finish_switch_fiber(nullptr, &sched.home_stack_bottom, &sched.home_stack_size);
#endif
    sched.body(sched.body_ctx);
    // A thread that exits with cp.async in flight (committed or not): they
    // complete, as on the GPU, so their data lands now.
    land_async_copies(*sched.running, [](const AsyncCopy&) { return true; });
    sched.running->state = State::Done;
    yield_to_scheduler(true);
    std::abort();  // a finished fiber is never resumed
}

Stack& stack_for(size_t i) {
    while (sched.stacks.size() <= i) {
        const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
        const size_t bytes = kStackBytes + page;
        void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (p == MAP_FAILED) {
            std::fprintf(stderr, "platypus emulator: cannot map a %zu-byte fiber stack\n", bytes);
            std::abort();
        }
        mprotect(p, page, PROT_NONE);
        sched.stacks.push_back(Stack{static_cast<unsigned char*>(p), bytes});
    }
    return sched.stacks[i];
}

// ---- resolving collectives ---------------------------------------------------------------------

bool lane_exists(size_t warp_base, unsigned lane) { return warp_base + lane < sched.fibers.size(); }

uint64_t reduce(WarpOp op, bool is_signed, uint64_t a, uint64_t b) {
    if (op == WarpOp::ReduceAdd) return static_cast<uint32_t>(a + b);
    if (is_signed) {
        const int32_t x = static_cast<int32_t>(a), y = static_cast<int32_t>(b);
        const int32_t r = op == WarpOp::ReduceMin ? (x < y ? x : y) : (x > y ? x : y);
        return static_cast<uint64_t>(static_cast<int64_t>(r));
    }
    const uint32_t x = static_cast<uint32_t>(a), y = static_cast<uint32_t>(b);
    return op == WarpOp::ReduceMin ? (x < y ? x : y) : (x > y ? x : y);
}

/// Source lane of a shuffle for `lane`, or `lane` itself where CUDA returns
/// the caller's own value.
unsigned shuffle_source(const Fiber& f, unsigned lane) {
    const unsigned w = static_cast<unsigned>(f.width);
    const unsigned start = lane & ~(w - 1);
    switch (f.op) {
        case WarpOp::ShflIdx: return start + (static_cast<unsigned>(f.arg) & (w - 1));
        case WarpOp::ShflUp: {
            const int src = static_cast<int>(lane) - f.arg;
            return src < static_cast<int>(start) ? lane : static_cast<unsigned>(src);
        }
        case WarpOp::ShflDown: {
            const unsigned src = lane + static_cast<unsigned>(f.arg);
            return src >= start + w ? lane : src;
        }
        case WarpOp::ShflXor: {
            const unsigned src = lane ^ static_cast<unsigned>(f.arg);
            return src >= start + w ? lane : src;
        }
        default: return lane;
    }
}

/// Tries to complete the collective `f` (lane `lane` of the warp starting at
/// `base`) waits at. Returns true if it released the lanes; sets
/// sched.error if the collective can never complete.
bool try_resolve(size_t base, unsigned lane) {
    Fiber& f = sched.fibers[base + lane];
    const unsigned mask = f.mask;
    for (unsigned l = 0; l < 32; ++l) {
        if (!((mask >> l) & 1u)) continue;
        if (!lane_exists(base, l)) {
            sched.error = format("%s: %s names lane %u, which is not part of the block", where(f).c_str(), wait_site(f).c_str(), l);
            return false;
        }
        const Fiber& o = sched.fibers[base + l];
        if (o.state == State::Done) {
            sched.error = format("%s: %s waits for lane %u, which exited without reaching it", where(f).c_str(), wait_site(f).c_str(), l);
            return false;
        }
        if (o.state != State::AtWarpOp) return false;  // may still come (or deadlock, reported later)
        if (o.op != f.op || o.mask != f.mask) {
            sched.error = format("%s: %s, but lane %u named in its mask is at %s", where(f).c_str(), wait_site(f).c_str(), l, wait_site(o).c_str());
            return false;
        }
    }
    uint64_t vote = 0;
    uint64_t acc = 0;
    bool first = true;
    for (unsigned l = 0; l < 32; ++l) {
        if (!((mask >> l) & 1u)) continue;
        const Fiber& o = sched.fibers[base + l];
        if (o.value) vote |= 1ull << l;
        acc = first ? o.value : reduce(f.op, f.arg != 0, acc, o.value);
        first = false;
    }
    for (unsigned l = 0; l < 32; ++l) {
        if (!((mask >> l) & 1u)) continue;
        Fiber& o = sched.fibers[base + l];
        switch (o.op) {
            case WarpOp::Sync: o.result = 0; break;
            case WarpOp::Ballot: o.result = vote; break;
            case WarpOp::All: o.result = vote == mask ? 1 : 0; break;
            case WarpOp::Any: o.result = vote != 0 ? 1 : 0; break;
            case WarpOp::ReduceAdd:
            case WarpOp::ReduceMin:
            case WarpOp::ReduceMax: o.result = acc; break;
            default: {
                const unsigned src = shuffle_source(o, l);
                if (src != l && !((mask >> src) & 1u)) {
                    sched.error = format("%s: %s reads lane %u, which is not named in the mask", where(o).c_str(), wait_site(o).c_str(), src);
                    return false;
                }
                o.result = sched.fibers[base + src].value;
            }
        }
    }
    for (unsigned l = 0; l < 32; ++l)
        if ((mask >> l) & 1u) sched.fibers[base + l].state = State::Runnable;
    return true;
}

/// Tries to complete the warp exchange lane `lane` of the warp starting at
/// `base` waits at (warp_exchange checked that the warp is full): every lane
/// must wait at the same call site with the same resolver. Returns true if
/// it ran the resolver and released the lanes. A lane that exited is an
/// error at once; a lane waiting elsewhere is written to `mismatch`, an error
/// only if nothing else can make progress (that lane may be at a collective
/// that completes first, then come here).
bool try_resolve_exchange(size_t base, unsigned lane, std::string& mismatch) {
    const Fiber& f = sched.fibers[base + lane];
    void* lanes[32];
    for (unsigned l = 0; l < 32; ++l) {
        const Fiber& o = sched.fibers[base + l];
        if (o.state == State::Done) {
            sched.error = format("%s: %s waits for lane %u, which exited without reaching it", where(f).c_str(), wait_site(f).c_str(), l);
            return false;
        }
        if (o.state != State::AtWarpOp) return false;  // may still come (or deadlock, reported later)
        if (o.op != WarpOp::Exchange || o.exchange_fn != f.exchange_fn || o.line != f.line || std::strcmp(o.file, f.file) != 0) {
            if (mismatch.empty())
                mismatch = format("%s: %s, but lane %u of its warp is at %s (every lane of the warp must execute the same .sync.aligned instruction)",
                                  where(f).c_str(), wait_site(f).c_str(), l, wait_site(o).c_str());
            return false;
        }
        lanes[l] = o.exchange_data;
    }
    f.exchange_fn(lanes);
    for (unsigned l = 0; l < 32; ++l) sched.fibers[base + l].state = State::Runnable;
    return true;
}

bool resolve_warp_collectives() {
    bool released = false;
    std::string mismatch;
    for (size_t base = 0; base < sched.fibers.size() && sched.error.empty(); base += 32) {
        for (unsigned lane = 0; lane < 32 && lane_exists(base, lane); ++lane) {
            const Fiber& f = sched.fibers[base + lane];
            if (f.state != State::AtWarpOp) continue;
            released |= f.op == WarpOp::Exchange ? try_resolve_exchange(base, lane, mismatch) : try_resolve(base, lane);
            if (!sched.error.empty()) break;
        }
    }
    // Lanes of an exchange at different call sites: nothing released means no
    // lane can move on, so they never meet.
    if (!released && sched.error.empty() && !mismatch.empty()) sched.error = mismatch;
    return released;
}

/// Releases a block-wide barrier if every thread reached it at one call site.
bool resolve_barrier() {
    const Fiber* waiting = nullptr;
    for (const Fiber& f : sched.fibers) {
        if (f.state == State::AtBarrier) {
            waiting = &f;
            break;
        }
    }
    if (!waiting) return false;
    for (const Fiber& f : sched.fibers) {
        if (f.state == State::Done) {
            sched.error = format("%s: %s, but thread (%u,%u,%u) exited without reaching it", where(*waiting).c_str(), wait_site(*waiting).c_str(),
                                 f.pub.thread_idx.x, f.pub.thread_idx.y, f.pub.thread_idx.z);
            return false;
        }
        if (f.state != State::AtBarrier) return false;
        if (f.line != waiting->line || std::strcmp(f.file, waiting->file) != 0) {
            sched.error = format("%s: %s, but %s waits at %s", where(*waiting).c_str(), wait_site(*waiting).c_str(), where(f).c_str(), wait_site(f).c_str());
            return false;
        }
    }
    for (Fiber& f : sched.fibers) f.state = State::Runnable;
    return true;
}

void report_deadlock() {
    std::string msg = "deadlock:";
    int listed = 0;
    for (const Fiber& f : sched.fibers) {
        if (f.state == State::Done || f.state == State::Runnable) continue;
        if (listed++ == 4) {
            msg += " ...";
            break;
        }
        msg += format(" [%s waits at %s]", where(f).c_str(), wait_site(f).c_str());
    }
    sched.error = msg;
}

void run_block() {
    const dim3 bd = sched.block.block_dim;
    const size_t n = static_cast<size_t>(bd.x) * bd.y * bd.z;
    sched.fibers.assign(n, Fiber{});
    for (size_t i = 0; i < n; ++i) {
        Fiber& f = sched.fibers[i];
        f.linear = static_cast<unsigned>(i);
        f.pub.thread_idx = make_uint3(static_cast<unsigned>(i % bd.x), static_cast<unsigned>((i / bd.x) % bd.y), static_cast<unsigned>(i / (size_t(bd.x) * bd.y)));
        Stack& s = stack_for(i);
#ifdef PLATYPUS_EMU_ASAN
        // Frames of fibers that ended (or were abandoned) on this stack leave
        // poisoned redzones behind.
        ASAN_UNPOISON_MEMORY_REGION(s.base, s.bytes);
#endif
        context_init(f.ctx, s.base, s.bytes, fiber_entry);
    }
    for (;;) {
        for (size_t i = 0; i < n; ++i) {
            while (sched.fibers[i].state == State::Runnable) {
                switch_to_fiber(sched.fibers[i], sched.stacks[i]);
                if (!sched.error.empty()) return;
            }
        }
        bool all_done = true;
        for (const Fiber& f : sched.fibers) all_done &= f.state == State::Done;
        if (all_done) return;
        if (resolve_warp_collectives()) continue;
        if (!sched.error.empty()) return;
        if (resolve_barrier()) continue;
        if (!sched.error.empty()) return;
        report_deadlock();
        return;
    }
}

}  // namespace

// ---- built-ins called from kernels -------------------------------------------------------------

unsigned lane_id() { return sched.running->linear % 32; }

void syncthreads(const char* file, int line) {
    Fiber& f = *sched.running;
    f.state = State::AtBarrier;
    f.file = file;
    f.line = line;
    yield_to_scheduler(false);
}

uint64_t warp_collective(WarpOp op, unsigned mask, uint64_t value, int arg, int width, const char* file, int line) {
    Fiber& f = *sched.running;
    f.file = file;
    f.line = line;
    f.op = op;
    f.mask = mask;
    if (width < 1 || width > 32 || (width & (width - 1)) != 0) trap(format("%s with width %d (must be a power of two up to 32)", op_name(op), width).c_str(), file, line);
    if (!((mask >> (f.linear % 32)) & 1u)) trap(format("%s(mask 0x%08x) called by a lane not named in its mask", op_name(op), mask).c_str(), file, line);
    f.value = value;
    f.arg = arg;
    f.width = width;
    f.state = State::AtWarpOp;
    yield_to_scheduler(false);
    return f.result;
}

void warp_exchange(const char* what, WarpExchangeFn fn, void* lane_data, const char* file, int line) {
    Fiber& f = *sched.running;
    const size_t base = f.linear - f.linear % 32;
    if (base + 32 > sched.fibers.size())
        trap(format("%s needs all 32 lanes of a warp, but this warp has %zu threads (block of %zu threads, not a multiple of 32)", what,
                    sched.fibers.size() - base, sched.fibers.size())
                 .c_str(),
             file, line);
    f.file = file;
    f.line = line;
    f.op = WarpOp::Exchange;
    f.mask = 0xffffffffu;
    f.exchange_name = what;
    f.exchange_fn = fn;
    f.exchange_data = lane_data;
    f.state = State::AtWarpOp;
    yield_to_scheduler(false);
}

void cp_async_issue(void* smem, const void* gmem, bool valid, const char* file, int line) {
    Fiber& f = *sched.running;
    if (reinterpret_cast<uintptr_t>(smem) % 16 != 0)
        trap(format("cp_async_16: shared address %p is not 16-byte aligned", smem).c_str(), file, line);
    if (reinterpret_cast<uintptr_t>(gmem) % 16 != 0)
        trap(format("cp_async_16: global address %p is not 16-byte aligned", gmem).c_str(), file, line);
    AsyncCopy c{static_cast<unsigned char*>(smem), AsyncCopy::kUncommitted, {}};
    if (valid) std::memcpy(c.bytes, gmem, sizeof c.bytes);  // else 16 zero bytes, and gmem is not read
    std::memset(smem, 0xff, sizeof c.bytes);                 // not arrived yet: NaN for every float type
    f.async_copies.push_back(c);
}

void cp_async_commit_group() {
    Fiber& f = *sched.running;
    for (AsyncCopy& c : f.async_copies)
        if (c.group == AsyncCopy::kUncommitted) c.group = f.async_groups;
    ++f.async_groups;  // an empty group counts too, as in PTX
}

void cp_async_wait_group(int newest_pending) {
    Fiber& f = *sched.running;
    const uint64_t n = newest_pending < 0 ? 0 : static_cast<uint64_t>(newest_pending);
    // Groups 0 .. async_groups - n - 1 retire; uncommitted copies stay in flight.
    land_async_copies(f, [&](const AsyncCopy& c) { return c.group != AsyncCopy::kUncommitted && c.group + n < f.async_groups; });
}

void trap(const char* what, const char* file, int line) {
    Fiber& f = *sched.running;
    sched.error = format("%s: %s at %s:%d", where(f).c_str(), what, basename_of(file).c_str(), line);
    f.state = State::Done;
    yield_to_scheduler(true);
    std::abort();
}

int run_grid(const char* kernel, const PlatypusEmuLaunch* cfg, BlockBody body, void* ctx, char* err, size_t err_len) {
    auto fail = [&](const std::string& msg) {
        if (err_len) std::snprintf(err, err_len, "%s", msg.c_str());
        return 1;
    };
    const unsigned* g = cfg->grid;
    const unsigned* b = cfg->block;
    const size_t threads = size_t(b[0]) * b[1] * b[2];
    if (threads == 0 || threads > kMaxThreadsPerBlock || b[2] > 64)
        return fail(format("kernel `%s`: invalid block (%u,%u,%u): 1 to %u threads, z at most 64", kernel, b[0], b[1], b[2], kMaxThreadsPerBlock));
    if (g[0] == 0 || g[1] == 0 || g[2] == 0 || g[0] > 0x7fffffffu || g[1] > 65535 || g[2] > 65535)
        return fail(format("kernel `%s`: invalid grid (%u,%u,%u)", kernel, g[0], g[1], g[2]));
    if (cfg->shared_bytes > kMaxSharedBytes)
        return fail(format("kernel `%s`: %llu bytes of dynamic shared memory, more than the %zu a block can have", kernel,
                           static_cast<unsigned long long>(cfg->shared_bytes), kMaxSharedBytes));
    if (sched.running) return fail(format("kernel `%s`: launched from inside a kernel (dynamic parallelism is not emulated)", kernel));

    // Exactly the requested bytes, so AddressSanitizer sees overruns, aligned
    // like the GPU's (`extern __shared__ __align__(16)`; cp.async and
    // ldmatrix need 16-byte aligned addresses): 128 bytes, not just the 16
    // operator new happens to give.
    const size_t smem_bytes = cfg->shared_bytes ? cfg->shared_bytes : 1;
    struct SharedMemory {
        unsigned char* p;
        explicit SharedMemory(size_t n) : p(static_cast<unsigned char*>(::operator new(n, std::align_val_t(kSharedAlign)))) {}
        ~SharedMemory() { ::operator delete(p, std::align_val_t(kSharedAlign)); }
        SharedMemory(const SharedMemory&) = delete;
        SharedMemory& operator=(const SharedMemory&) = delete;
        unsigned char* get() const { return p; }
    } smem(smem_bytes);
    sched.kernel = kernel;
    sched.body = body;
    sched.body_ctx = ctx;
    sched.error.clear();
    sched.block.grid_dim = dim3(g[0], g[1], g[2]);
    sched.block.block_dim = dim3(b[0], b[1], b[2]);
    sched.block.dynamic_smem = smem.get();
    current_block = &sched.block;
    for (unsigned z = 0; z < g[2]; ++z) {
        for (unsigned y = 0; y < g[1]; ++y) {
            for (unsigned x = 0; x < g[0]; ++x) {
                std::memset(smem.get(), 0xff, smem_bytes);
                sched.block.block_idx = make_uint3(x, y, z);
                run_block();
                if (!sched.error.empty()) {
                    current_block = nullptr;
                    return fail(sched.error);
                }
            }
        }
    }
    current_block = nullptr;
    return 0;
}

}  // namespace platypus_emu
