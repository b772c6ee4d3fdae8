// Scheduler of the host CUDA emulator (see cuda_emu.h).
//
// A launch runs its blocks one after another (in a seeded random order with
// PLATYPUS_EMU_SHUFFLE). Each thread of a block is a fiber with its own
// stack; a fiber runs until it reaches a barrier or a warp collective, or
// returns. When no fiber can run, the scheduler resolves what is complete: a
// warp collective whose named lanes have all arrived with the same operation
// and mask, a warp exchange (mma, ldmatrix) all 32 lanes of the warp reached
// at one call site, or a __syncthreads that every thread of the block reached
// at the same call site. If nothing is complete, the block is deadlocked and
// the launch fails with a message naming the kernel, block, thread and call
// site.
//
// Shuffled, each round runs the runnable fibers in a random order and
// releases the collectives of a random subset of the ready warps only, so
// warps drift apart between barriers and a lower-numbered thread does not
// always run first.
#include "scheduler.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <new>

#if defined(PLATYPUS_EMU_ASAN)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
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
constexpr size_t kDefaultSharedBytes = 48 * 1024;  // static + dynamic without the opt-in attribute
constexpr size_t kSharedAlign = 128;               // alignment of the dynamic shared memory

// ---- execution contexts ------------------------------------------------------------------------
//
// On x86-64 a switch saves the callee-saved registers and the FP control
// words on the current stack and swaps stack pointers: no system call (glibc's
// swapcontext makes one per switch to save the signal mask, which made the
// emulator spend most of its time in the kernel). Elsewhere: ucontext.

#if defined(__x86_64__)
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

void context_init(Context& c, unsigned char* base, size_t bytes, void (*entry)()) {
    getcontext(&c.uc);
    c.uc.uc_stack.ss_sp = base;
    c.uc.uc_stack.ss_size = bytes;
    c.uc.uc_link = nullptr;
    makecontext(&c.uc, entry, 0);
}

void context_switch(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
#endif

thread_local Scheduler sched;

// ---- a small seeded generator (splitmix64) -----------------------------------------------------

uint64_t next_random() {
    uint64_t z = (sched.rng += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/// Uniform in [0, n).
size_t random_below(size_t n) { return static_cast<size_t>(next_random() % n); }

template <typename T>
void shuffle(std::vector<T>& v) {
    for (size_t i = v.size(); i > 1; --i) std::swap(v[i - 1], v[random_below(i)]);
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

/// Records the first failure of the launch (later ones are consequences).
void set_error(EmuFailure kind, const std::string& msg) {
    if (!sched.error.empty()) return;
    sched.error = msg;
    sched.failure = kind;
}

// ---- fiber switching ---------------------------------------------------------------------------

void switch_to_fiber(Fiber& f, const Stack& stack) {
    sched.running = &f;
    current_thread = &f.pub;
    memcheck_enter(&f);
#ifdef PLATYPUS_EMU_ASAN
    __sanitizer_start_switch_fiber(&sched.home_fake_stack, stack.base, stack.bytes);
#else
    (void)stack;
#endif
    context_switch(sched.home, f.ctx);
#ifdef PLATYPUS_EMU_ASAN
    __sanitizer_finish_switch_fiber(sched.home_fake_stack, nullptr, nullptr);
#endif
    memcheck_enter(nullptr);
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
            memcheck_async_land(c.dst);
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

/// Whether the collective a lane waits at can complete now.
enum class Readiness { NotYet, Ready, Broken };

/// Can the collective that lane `lane` of the warp at `base` waits at (not a
/// warp exchange) complete? Broken (with sched.error set) if it never can. A
/// named lane waiting at another collective is NotYet, with the mismatch in
/// `mismatch`: an error only if nothing else can make progress (its
/// collective may complete first, then it comes here).
Readiness collective_readiness(size_t base, unsigned lane, std::string& mismatch) {
    const Fiber& f = sched.fibers[base + lane];
    for (unsigned l = 0; l < 32; ++l) {
        if (!((f.mask >> l) & 1u)) continue;
        if (!lane_exists(base, l)) {
            set_error(EmuFailure::Sync, format("%s: %s names lane %u, which is not part of the block", where(f).c_str(), wait_site(f).c_str(), l));
            return Readiness::Broken;
        }
        const Fiber& o = sched.fibers[base + l];
        if (o.state == State::Done) {
            set_error(EmuFailure::Sync, format("%s: %s waits for lane %u, which exited without reaching it", where(f).c_str(), wait_site(f).c_str(), l));
            return Readiness::Broken;
        }
        if (o.state != State::AtWarpOp) return Readiness::NotYet;  // may still come (or deadlock, reported later)
        if (o.op != f.op || o.mask != f.mask) {
            if (mismatch.empty())
                mismatch = format("%s: %s, but lane %u named in its mask is at %s", where(f).c_str(), wait_site(f).c_str(), l, wait_site(o).c_str());
            return Readiness::NotYet;
        }
    }
    return Readiness::Ready;
}

/// Completes the ready collective of lane `lane` of the warp at `base`:
/// computes every named lane's result and releases them.
void complete_collective(size_t base, unsigned lane) {
    const Fiber& f = sched.fibers[base + lane];
    const unsigned mask = f.mask;
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
                    set_error(EmuFailure::Sync,
                              format("%s: %s reads lane %u, which is not named in the mask", where(o).c_str(), wait_site(o).c_str(), src));
                    return;
                }
                o.result = sched.fibers[base + src].value;
            }
        }
    }
    if (f.op == WarpOp::Sync) memcheck_syncwarp(base, mask);
    for (unsigned l = 0; l < 32; ++l)
        if ((mask >> l) & 1u) sched.fibers[base + l].state = State::Runnable;
}

/// Can the warp exchange lane `lane` of the warp at `base` waits at complete
/// (warp_exchange checked that the warp is full)? Every lane must wait at the
/// same call site with the same resolver. A lane that exited is Broken at
/// once; a lane waiting elsewhere is NotYet, with the mismatch written to
/// `mismatch`, an error only if nothing else can make progress (that lane
/// may be at a collective that completes first, then come here).
Readiness exchange_readiness(size_t base, unsigned lane, std::string& mismatch) {
    const Fiber& f = sched.fibers[base + lane];
    for (unsigned l = 0; l < 32; ++l) {
        const Fiber& o = sched.fibers[base + l];
        if (o.state == State::Done) {
            set_error(EmuFailure::Sync, format("%s: %s waits for lane %u, which exited without reaching it", where(f).c_str(), wait_site(f).c_str(), l));
            return Readiness::Broken;
        }
        if (o.state != State::AtWarpOp) return Readiness::NotYet;  // may still come (or deadlock, reported later)
        if (o.op != WarpOp::Exchange || o.exchange_fn != f.exchange_fn || o.line != f.line || std::strcmp(o.file, f.file) != 0) {
            if (mismatch.empty())
                mismatch = format("%s: %s, but lane %u of its warp is at %s (every lane of the warp must execute the same .sync.aligned instruction)",
                                  where(f).c_str(), wait_site(f).c_str(), l, wait_site(o).c_str());
            return Readiness::NotYet;
        }
    }
    return Readiness::Ready;
}

/// Runs the ready warp exchange of the warp at `base` and releases its lanes.
/// An ldmatrix row that changed since its lane arrived was written while the
/// warp gathered: a race.
void complete_exchange(size_t base) {
    void* lanes[32];
    for (unsigned l = 0; l < 32; ++l) {
        Fiber& o = sched.fibers[base + l];
        if (o.watch && std::memcmp(o.watch, o.watch_bytes, sizeof o.watch_bytes) != 0) {
            set_error(EmuFailure::Race, format("%s: the 16-byte shared row it gave %s changed before the last lane of its warp arrived: "
                                               "another thread wrote it without a barrier in between (shared-memory race)",
                                               where(o).c_str(), wait_site(o).c_str()));
            return;
        }
        o.watch = nullptr;
        lanes[l] = o.exchange_data;
    }
    sched.fibers[base].exchange_fn(lanes);
    for (unsigned l = 0; l < 32; ++l) sched.fibers[base + l].state = State::Runnable;
}

/// A collective some lanes wait at that can complete: its warp and a lane of it.
struct ReadyCollective {
    size_t base;
    unsigned lane;
    bool exchange;
};

/// Releases complete warp collectives: all of them in order, or shuffled a
/// random nonempty subset (the others wait for a later round, so warps drift
/// apart). Returns true if any was released.
bool resolve_warp_collectives() {
    std::vector<ReadyCollective> ready;
    std::string mismatch;
    for (size_t base = 0; base < sched.fibers.size(); base += 32) {
        unsigned claimed = 0;  // lanes of a collective already found ready
        for (unsigned lane = 0; lane < 32 && lane_exists(base, lane); ++lane) {
            const Fiber& f = sched.fibers[base + lane];
            if (f.state != State::AtWarpOp || ((claimed >> lane) & 1u)) continue;
            const bool exchange = f.op == WarpOp::Exchange;
            const Readiness r = exchange ? exchange_readiness(base, lane, mismatch) : collective_readiness(base, lane, mismatch);
            if (r == Readiness::Broken) return false;
            if (r == Readiness::NotYet) continue;
            ready.push_back({base, lane, exchange});
            claimed |= exchange ? 0xffffffffu : f.mask;
        }
    }
    if (ready.empty()) {
        // Lanes at different collectives (or an exchange at different call
        // sites): nothing can be released, so no lane moves on and they
        // never meet.
        if (!mismatch.empty()) set_error(EmuFailure::Sync, mismatch);
        return false;
    }
    if (sched.shuffle) {
        shuffle(ready);
        ready.resize(1 + random_below(ready.size()));
    }
    for (const ReadyCollective& c : ready) {
        if (c.exchange) {
            complete_exchange(c.base);
        } else {
            complete_collective(c.base, c.lane);
        }
        if (!sched.error.empty()) return false;
    }
    return true;
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
            set_error(EmuFailure::Sync, format("%s: %s, but thread (%u,%u,%u) exited without reaching it", where(*waiting).c_str(),
                                               wait_site(*waiting).c_str(), f.pub.thread_idx.x, f.pub.thread_idx.y, f.pub.thread_idx.z));
            return false;
        }
        if (f.state != State::AtBarrier) return false;
        if (f.line != waiting->line || std::strcmp(f.file, waiting->file) != 0) {
            set_error(EmuFailure::Sync,
                      format("%s: %s, but %s waits at %s", where(*waiting).c_str(), wait_site(*waiting).c_str(), where(f).c_str(), wait_site(f).c_str()));
            return false;
        }
    }
    memcheck_barrier();
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
    set_error(EmuFailure::Sync, msg);
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
        f.stack_lo = reinterpret_cast<uintptr_t>(s.base);
        f.stack_bytes = s.bytes;
#ifdef PLATYPUS_EMU_ASAN
        // Frames of fibers that ended (or were abandoned) on this stack leave
        // poisoned redzones behind.
        ASAN_UNPOISON_MEMORY_REGION(s.base, s.bytes);
#endif
        context_init(f.ctx, s.base, s.bytes, fiber_entry);
    }
    memcheck_begin_block();
    std::vector<size_t> order;
    for (;;) {
        order.clear();
        for (size_t i = 0; i < n; ++i)
            if (sched.fibers[i].state == State::Runnable) order.push_back(i);
        if (sched.shuffle) shuffle(order);
        for (size_t i : order) {
            while (sched.fibers[i].state == State::Runnable) {
                switch_to_fiber(sched.fibers[i], sched.stacks[i]);
                if (!sched.error.empty()) return;
            }
        }
        bool all_done = true;
        for (const Fiber& f : sched.fibers) all_done &= f.state == State::Done;
        if (all_done) break;
        if (resolve_warp_collectives()) continue;
        if (!sched.error.empty()) return;
        if (resolve_barrier()) continue;
        if (!sched.error.empty()) return;
        report_deadlock();
        return;
    }
    memcheck_end_block();
}

/// The blocks of the grid as linear indices, in the order they run: in
/// order, or shuffled (a random permutation, or for grids too large to list
/// a random affine one, i -> a i + b mod n with a coprime to n).
class BlockOrder {
  public:
    explicit BlockOrder(uint64_t n) : n_(n) {
        if (!sched.shuffle || n < 2) return;
        if (n <= (uint64_t(1) << 22)) {
            perm_.resize(n);
            for (uint64_t i = 0; i < n; ++i) perm_[i] = static_cast<uint32_t>(i);
            shuffle(perm_);
        } else {
            do a_ = 1 + next_random() % (n - 1);
            while (gcd(a_, n) != 1);
            b_ = next_random() % n;
        }
    }
    uint64_t operator[](uint64_t i) const {
        if (!perm_.empty()) return perm_[i];
        return static_cast<uint64_t>((static_cast<unsigned __int128>(a_) * i + b_) % n_);
    }

  private:
    static uint64_t gcd(uint64_t a, uint64_t b) { return b == 0 ? a : gcd(b, a % b); }
    uint64_t n_;
    uint64_t a_ = 1, b_ = 0;
    std::vector<uint32_t> perm_;
};

}  // namespace

// ---- shared with memcheck.cpp ------------------------------------------------------------------

Scheduler::~Scheduler() {
    for (auto& s : stacks) munmap(s.base, s.bytes);
    ::operator delete(static_shared, std::align_val_t(kSharedAlign));
}

Scheduler& scheduler() { return sched; }

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

void fail_running(EmuFailure kind, const std::string& msg) {
    Fiber& f = *sched.running;
    set_error(kind, msg);
    f.state = State::Done;
    yield_to_scheduler(true);
    std::abort();
}

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
    if (width < 1 || width > 32 || (width & (width - 1)) != 0)
        trap(format("%s with width %d (must be a power of two up to 32)", op_name(op), width).c_str(), file, line);
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

void watch_ldmatrix_row(const void* row, const char* what, const char* file, int line) {
    Fiber& f = *sched.running;
    memcheck_read(row, 16, what, file, line);
    f.watch = static_cast<const unsigned char*>(row);
    std::memcpy(f.watch_bytes, row, sizeof f.watch_bytes);
}

void cp_async_issue(void* smem, const void* gmem, bool valid, const char* file, int line) {
    Fiber& f = *sched.running;
    if (reinterpret_cast<uintptr_t>(smem) % 16 != 0)
        fail_at(EmuFailure::Misaligned, format("cp_async_16: shared address %p is not 16-byte aligned", smem).c_str(), file, line);
    if (reinterpret_cast<uintptr_t>(gmem) % 16 != 0)
        fail_at(EmuFailure::Misaligned, format("cp_async_16: global address %p is not 16-byte aligned", gmem).c_str(), file, line);
    memcheck_async_issue(smem, valid ? gmem : nullptr, file, line);
    AsyncCopy c{static_cast<unsigned char*>(smem), AsyncCopy::kUncommitted, {}};
    if (valid) std::memcpy(c.bytes, gmem, sizeof c.bytes);  // else 16 zero bytes, and gmem is not read
    poison(smem, sizeof c.bytes);                           // not arrived yet
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

void fail_at(EmuFailure kind, const char* what, const char* file, int line) {
    fail_running(kind, format("%s: %s at %s:%d", where(*sched.running).c_str(), what, basename_of(file).c_str(), line));
}

void trap(const char* what, const char* file, int line) { fail_at(EmuFailure::Trap, what, file, line); }

void check_vector_access(const void* p, size_t bytes, const char* file, int line) {
    if (reinterpret_cast<uintptr_t>(p) % bytes == 0) return;
    fail_at(EmuFailure::Misaligned,
            format("%zu-byte vector access at %p, which is not %zu-byte aligned (the GPU faults: misaligned address)", bytes, p, bytes).c_str(), file, line);
}

void poison(void* p, size_t n) {
    auto* b = static_cast<unsigned char*>(p);
    for (size_t i = 0; i < n; ++i) b[i] = ((reinterpret_cast<uintptr_t>(b + i) & 1) ? kPoison16 >> 8 : kPoison16) & 0xff;
}

/// Checks static + dynamic shared memory against what the launch may have:
/// 48 KiB without the opt-in attribute, else dynamic up to the attribute and
/// the total up to the arch's limit. Empty if it fits.
std::string shared_memory_overflow(const PlatypusEmuLaunch& cfg, size_t static_bytes) {
    const size_t dynamic = cfg.shared_bytes, total = static_bytes + dynamic;
    if (cfg.shared_optin == 0 && total > kDefaultSharedBytes)
        return format("%zu bytes of static + %zu of dynamic shared memory, more than the 48 KiB a block may have without the "
                      "max-dynamic-shared-memory attribute (the launch did not opt in)",
                      static_bytes, dynamic);
    if (cfg.shared_optin != 0 && dynamic > cfg.shared_optin)
        return format("%zu bytes of dynamic shared memory, more than the %u its max-dynamic-shared-memory attribute allows", dynamic, cfg.shared_optin);
    if (cfg.shared_limit != 0 && total > cfg.shared_limit)
        return format("%zu bytes of static + %zu of dynamic shared memory, more than the %u a block may have on this arch", static_bytes, dynamic,
                      cfg.shared_limit);
    return {};
}

void* static_shared(const void* site, size_t bytes, const char* name, const char* file, int line) {
    for (const StaticShared& v : sched.static_vars)
        if (v.site == site) return sched.static_shared + v.offset;
    const size_t offset = (sched.static_used + 15) & ~size_t(15);
    Fiber& f = *sched.running;
    if (offset + bytes > kStaticSharedBytes)
        fail_running(EmuFailure::Launch, format("%s: static shared variable `%s` (%zu bytes) at %s:%d takes the kernel past the 48 KiB of static "
                                                "shared memory a kernel may declare",
                                                where(f).c_str(), name, bytes, basename_of(file).c_str(), line));
    const std::string overflow = shared_memory_overflow(*sched.launch, offset + bytes);
    if (!overflow.empty())
        fail_running(EmuFailure::Launch, format("kernel `%s` (static shared variable `%s` at %s:%d): %s", sched.kernel, name, basename_of(file).c_str(), line,
                                                overflow.c_str()));
    sched.static_vars.push_back({site, name, offset, bytes});
    poison(sched.static_shared + sched.static_used, offset + bytes - sched.static_used);
    memcheck_static_shared_grew(sched.static_used, offset + bytes);
    sched.static_used = offset + bytes;
    return sched.static_shared + offset;
}

int run_grid(const char* kernel, const PlatypusEmuLaunch* cfg, BlockBody body, void* ctx, char* err, size_t err_len) {
    auto fail = [&](EmuFailure kind, const std::string& msg) {
        if (err_len) std::snprintf(err, err_len, "%s", msg.c_str());
        return static_cast<int>(kind);
    };
    const unsigned* g = cfg->grid;
    const unsigned* b = cfg->block;
    const size_t threads = size_t(b[0]) * b[1] * b[2];
    if (threads == 0 || threads > kMaxThreadsPerBlock || b[0] > 1024 || b[1] > 1024 || b[2] > 64)
        return fail(EmuFailure::Launch, format("kernel `%s`: invalid block (%u,%u,%u): 1 to %u threads, x and y at most 1024, z at most 64", kernel, b[0],
                                               b[1], b[2], kMaxThreadsPerBlock));
    if (cfg->max_threads != 0 && threads > cfg->max_threads)
        return fail(EmuFailure::Launch, format("kernel `%s`: block (%u,%u,%u) has %zu threads, more than its __launch_bounds__ (%u)", kernel, b[0], b[1],
                                               b[2], threads, cfg->max_threads));
    if (g[0] == 0 || g[1] == 0 || g[2] == 0 || g[0] > 0x7fffffffu || g[1] > 65535 || g[2] > 65535)
        return fail(EmuFailure::Launch, format("kernel `%s`: invalid grid (%u,%u,%u): x 1 to 2^31 - 1, y and z 1 to 65535", kernel, g[0], g[1], g[2]));
    const std::string overflow = shared_memory_overflow(*cfg, 0);
    if (!overflow.empty()) return fail(EmuFailure::Launch, format("kernel `%s`: %s", kernel, overflow.c_str()));
    if (sched.running) return fail(EmuFailure::Launch, format("kernel `%s`: launched from inside a kernel (dynamic parallelism is not emulated)", kernel));

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
    if (!sched.static_shared) sched.static_shared = static_cast<unsigned char*>(::operator new(kStaticSharedBytes, std::align_val_t(kSharedAlign)));
    sched.kernel = kernel;
    sched.launch = cfg;
    sched.body = body;
    sched.body_ctx = ctx;
    sched.error.clear();
    sched.failure = EmuFailure::None;
    sched.shuffle = (cfg->flags & PLATYPUS_EMU_SHUFFLE) != 0;
    sched.rng = cfg->seed;
    sched.static_used = 0;
    sched.static_vars.clear();
    sched.block.grid_dim = dim3(g[0], g[1], g[2]);
    sched.block.block_dim = dim3(b[0], b[1], b[2]);
    sched.block.dynamic_smem = smem.get();
    current_block = &sched.block;
    const uint64_t blocks = uint64_t(g[0]) * g[1] * g[2];
    const BlockOrder order(blocks);
    for (uint64_t i = 0; i < blocks; ++i) {
        const uint64_t linear = order[i];
        poison(smem.get(), smem_bytes);
        poison(sched.static_shared, sched.static_used);
        sched.block.block_idx = make_uint3(static_cast<unsigned>(linear % g[0]), static_cast<unsigned>(linear / g[0] % g[1]),
                                           static_cast<unsigned>(linear / (uint64_t(g[0]) * g[1])));
        run_block();
        if (!sched.error.empty()) {
            current_block = nullptr;
            sched.launch = nullptr;
            return fail(sched.failure, sched.error);
        }
    }
    current_block = nullptr;
    sched.launch = nullptr;
    return PLATYPUS_EMU_OK;
}

}  // namespace platypus_emu
