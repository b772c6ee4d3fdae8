// Memory checker of the host CUDA emulator: races between the threads of a
// block and reads of shared memory nothing wrote, on every access the
// kernel code makes.
//
// The kernels are compiled with g++ -fsanitize=thread, which makes the
// compiler call __tsan_read4(p), __tsan_write16(p), ... before every memory
// access; no ThreadSanitizer runtime is linked: the emulator answers those
// calls itself (bottom of this file). An access to the running fiber's own
// stack is private (CUDA local memory) and ignored; every other address is
// shared memory (the block's dynamic and static shared memory) or global
// memory, and gets a shadow cell per byte for the running block: the last
// write and up to two reads that are not ordered with each other.
//
// Order between two accesses of different threads is CUDA's: a
// __syncthreads orders everything before it in every thread before
// everything after it; a __syncwarp orders the accesses of the lanes it
// names; nothing else does (shuffles, votes, ldmatrix and mma do not order
// memory). Each thread keeps a logical clock, advanced at every barrier and
// __syncwarp it takes part in, and a vector clock over the lanes of its warp
// (the latest clock of each lane it has synchronized with, directly or
// through another lane); access a of thread u at clock c happens before the
// current access of thread t if u == t, or u and t share a warp and t's
// vector clock holds more than c for u, or c is older than u's clock at the
// latest __syncthreads. Two accesses of one byte by different threads, at
// least one a write, neither before the other: a race.
//
// cp.async follows the PTX rule: the copy writes its 16 bytes at issue
// (reading them before they land is an error, whoever reads) and again when
// its group is waited for, as a write of the issuing thread at that moment,
// so another thread may read them only after a barrier that follows the
// issuer's wait.
//
// Not checked: accesses by the emulator's own code (warp exchanges read
// their lanes' registers; ldmatrix rows are checked explicitly when each
// lane arrives), atomics (atomic-atomic is never a race; an atomic against a
// plain access is not checked), races between blocks, and memory a kernel
// touches through memcpy/memset calls.
#include "scheduler.h"

#include <link.h>
#include <unistd.h>

#include <cstdio>
#include <unordered_map>

namespace platypus_emu {

/// The running fiber while a launch with PLATYPUS_EMU_MEMCHECK runs one,
/// else null: the hooks' fast path. Initial-exec TLS: one load, no call.
__attribute__((tls_model("initial-exec"))) thread_local Fiber* memcheck_running = nullptr;

namespace {

/// One access: its thread's clock then, and the thread (linear id + 1; 0: none).
struct Stamp {
    uint32_t clock;
    uint16_t tid1;
    uint16_t flags;
};
constexpr uint16_t kAsyncInFlight = 1;  // a cp.async issued, not landed yet
constexpr uint16_t kAsyncLanded = 2;    // written by a cp.async landing at its wait

/// Shadow of one byte in the running block.
struct Cell {
    Stamp w;     // the last write
    Stamp r[2];  // reads since then, not ordered with each other (a third replaces r[1])
};

constexpr size_t kPageBytes = 4096;

/// The shadow of the running block on this OS thread.
struct Shadow {
    std::vector<Cell> dynamic_cells;  // one per byte of dynamic shared memory
    std::vector<Cell> static_cells;   // one per byte of static shared memory
    std::unordered_map<uintptr_t, Cell*> pages;  // global memory: page -> its cells
    std::vector<Cell*> free_pages;
    uintptr_t cached_page = ~uintptr_t(0);
    Cell* cached_cells = nullptr;
    ~Shadow() {
        for (auto& p : pages) delete[] p.second;
        for (Cell* c : free_pages) delete[] c;
    }
};
thread_local Shadow shadow;

/// Where an access comes from, for messages: the caller's return address in
/// the kernel code, or an explicit file:line and what the access is.
struct Site {
    const void* pc;
    const char* what;
    const char* file;
    int line;
};

/// "file:line (function)" of a code address, from addr2line when it is
/// installed and the code has line tables, else the bare address.
std::string source_of(const void* pc) {
    struct Module {
        uintptr_t pc;
        uintptr_t base;
        std::string path;
    } m{reinterpret_cast<uintptr_t>(pc) - 1, 0, {}};
    dl_iterate_phdr(
        [](dl_phdr_info* info, size_t, void* data) {
            auto* mod = static_cast<Module*>(data);
            for (int i = 0; i < info->dlpi_phnum; ++i) {
                const ElfW(Phdr)& ph = info->dlpi_phdr[i];
                const uintptr_t lo = info->dlpi_addr + ph.p_vaddr;
                if (ph.p_type == PT_LOAD && mod->pc >= lo && mod->pc < lo + ph.p_memsz) {
                    mod->base = info->dlpi_addr;
                    if (info->dlpi_name && info->dlpi_name[0]) {
                        mod->path = info->dlpi_name;
                    } else {  // the executable (for addr2line's sake not /proc/self/exe, which would be addr2line)
                        char exe[4096];
                        const ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
                        if (n > 0) mod->path.assign(exe, static_cast<size_t>(n));
                    }
                    return 1;
                }
            }
            return 0;
        },
        &m);
    std::string out = format("pc %p", pc);
    if (m.path.empty()) return out;
    const std::string cmd = format("addr2line -C -f -i -e '%s' 0x%lx 2>/dev/null", m.path.c_str(), static_cast<unsigned long>(m.pc - m.base));
    FILE* p = popen(cmd.c_str(), "r");
    if (!p) return out;
    char function[512] = {}, line[512] = {};
    // With -i the innermost inlined frame comes first: the access itself.
    const bool ok = std::fgets(function, sizeof function, p) && std::fgets(line, sizeof line, p);
    pclose(p);
    if (!ok || line[0] == '?') return out;
    line[std::strcspn(line, "\n")] = 0;
    function[std::strcspn(function, "\n")] = 0;
    const std::string file_line = line;
    const size_t paren = file_line.find(" (discriminator");
    return basename_of(file_line.substr(0, paren).c_str()) + " (in " + std::string(function).substr(0, 120) + ")";
}

std::string describe(const Site& s) {
    if (s.file) return format("%s at %s:%d", s.what, basename_of(s.file).c_str(), s.line);
    return "at " + source_of(s.pc);
}

const Fiber& fiber_of(const Stamp& s) { return scheduler().fibers[s.tid1 - 1u]; }

/// Did the access `s` happen before everything thread `f` does now?
bool ordered_before(const Stamp& s, const Fiber& f) {
    const unsigned u = s.tid1 - 1u;
    if (u == f.linear) return true;
    if (u / 32 == f.linear / 32) return f.vc[u % 32] > s.clock;
    return s.clock < fiber_of(s).barrier_clock;
}

enum class Space { Dynamic, Static, Global };

/// "6 bytes of dynamic shared memory at offset 64" and the like.
std::string describe_bytes(Space space, uintptr_t a, size_t n) {
    const Scheduler& s = scheduler();
    if (space == Space::Dynamic)
        return format("%zu byte(s) of dynamic shared memory at offset %zu", n, static_cast<size_t>(a - reinterpret_cast<uintptr_t>(s.block.dynamic_smem)));
    if (space == Space::Static) {
        const size_t off = a - reinterpret_cast<uintptr_t>(s.static_shared);
        for (const StaticShared& v : s.static_vars)
            if (off >= v.offset && off < v.offset + v.bytes)
                return format("%zu byte(s) of static shared memory at offset %zu (byte %zu of `%s`)", n, off, off - v.offset, v.name);
        return format("%zu byte(s) of static shared memory at offset %zu", n, off);
    }
    return format("%zu byte(s) of global memory at %p", n, reinterpret_cast<void*>(a));
}

std::string thread_name(const Fiber& f) { return format("thread (%u,%u,%u)", f.pub.thread_idx.x, f.pub.thread_idx.y, f.pub.thread_idx.z); }

std::string last_sync(const Fiber& f) {
    if (!f.sync_file) return "it has passed no barrier or __syncwarp yet";
    return format("its last was the %s at %s:%d", f.sync_was_barrier ? "__syncthreads" : "__syncwarp", basename_of(f.sync_file).c_str(), f.sync_line);
}

void report_race(const Fiber& f, const char* kind, const char* verb, Space space, uintptr_t a, size_t n, const Stamp& other,
                              const char* other_did, const Site& site) {
    const char* space_name = space == Space::Global ? "global" : "shared";
    fail_running(EmuFailure::Race,
                 format("%s: %s-memory race (%s): it %s %s %s, which %s %s with no __syncthreads or __syncwarp ordering the two (%s)", where(f).c_str(),
                        space_name, kind, verb, describe_bytes(space, a, n).c_str(), describe(site).c_str(), thread_name(fiber_of(other)).c_str(),
                        other_did, last_sync(f).c_str()));
}

/// The shadow cells of global memory [a, a + n) within one page.
Cell* global_cells(uintptr_t a) {
    Shadow& sh = shadow;
    const uintptr_t page = a / kPageBytes;
    if (page != sh.cached_page) {
        Cell*& cells = sh.pages[page];
        if (!cells) {
            if (sh.free_pages.empty()) {
                cells = new Cell[kPageBytes];
            } else {
                cells = sh.free_pages.back();
                sh.free_pages.pop_back();
            }
            std::memset(static_cast<void*>(cells), 0, kPageBytes * sizeof(Cell));
        }
        sh.cached_page = page;
        sh.cached_cells = cells;
    }
    return sh.cached_cells + a % kPageBytes;
}

enum class Kind { Read, Write, AsyncIssue, AsyncLand };

/// Checks and records one access of `n` bytes at `a` in `space`, whose
/// shadow cells are `cells` (contiguous).
void access_cells(Fiber& f, Cell* cells, Space space, uintptr_t a, size_t n, Kind kind, const Site& site) {
    const Stamp me{f.clock, static_cast<uint16_t>(f.linear + 1), 0};
    for (size_t i = 0; i < n; ++i) {
        Cell& c = cells[i];
        if (kind == Kind::Read) {
            if (c.w.tid1 != 0) {
                if (c.w.flags & kAsyncInFlight)
                    fail_running(EmuFailure::Race,
                                 format("%s: reads %s %s before the cp.async that %s issued into it has landed (no cp.async.wait_group retired it)",
                                        where(f).c_str(), describe_bytes(space, a + i, n - i).c_str(), describe(site).c_str(),
                                        c.w.tid1 == me.tid1 ? "this thread" : thread_name(fiber_of(c.w)).c_str()));
                if (c.w.tid1 != me.tid1 && !ordered_before(c.w, f))
                    report_race(f, "read after write", "reads", space, a + i, n - i, c.w,
                                c.w.flags & kAsyncLanded ? "copied there with cp.async (landed at its wait)" : "wrote", site);
            } else if (space != Space::Global) {
                fail_running(EmuFailure::Uninitialized, format("%s: reads %s %s, which no thread of the block has written (uninitialized shared memory)",
                                                               where(f).c_str(), describe_bytes(space, a + i, n - i).c_str(), describe(site).c_str()));
            }
            // Keep the reads not ordered before this one (those are implied by it).
            if (c.r[0].tid1 == me.tid1) {
                c.r[0] = me;
            } else if (c.r[1].tid1 == me.tid1) {
                c.r[1] = me;
            } else {
                if (c.r[0].tid1 && ordered_before(c.r[0], f)) c.r[0] = Stamp{};
                if (c.r[1].tid1 && ordered_before(c.r[1], f)) c.r[1] = Stamp{};
                if (c.r[0].tid1 == 0) {
                    c.r[0] = me;
                } else {
                    c.r[1] = me;
                }
            }
            continue;
        }
        if (kind != Kind::AsyncLand) {
            if (c.w.tid1 != 0 && (c.w.flags & kAsyncInFlight) && c.w.tid1 == me.tid1)
                fail_running(EmuFailure::Race, format("%s: writes %s %s while its own cp.async into them is in flight (the copy would land over it)",
                                                      where(f).c_str(), describe_bytes(space, a + i, n - i).c_str(), describe(site).c_str()));
            if (c.w.tid1 != 0 && c.w.tid1 != me.tid1 && !ordered_before(c.w, f))
                report_race(f, "write after write", "writes", space, a + i, n - i, c.w,
                            c.w.flags & kAsyncInFlight ? "is copying there with a cp.async in flight" : "wrote", site);
            for (const Stamp& r : c.r)
                if (r.tid1 != 0 && r.tid1 != me.tid1 && !ordered_before(r, f))
                    report_race(f, "write after read", "writes", space, a + i, n - i, r, "read", site);
        }
        c.w = me;
        c.w.flags = kind == Kind::AsyncIssue ? kAsyncInFlight : kind == Kind::AsyncLand ? kAsyncLanded : 0;
        c.r[0] = c.r[1] = Stamp{};
    }
}

/// Checks and records an access of [a, a + n) by `f`, not on its stack.
void access_by(Fiber& f, uintptr_t a, size_t n, Kind kind, const Site& site) {
    const Scheduler& s = scheduler();
    const uintptr_t dyn = reinterpret_cast<uintptr_t>(s.block.dynamic_smem);
    if (a - dyn < s.launch->shared_bytes) {
        const size_t inside = std::min<size_t>(n, dyn + s.launch->shared_bytes - a);
        access_cells(f, &shadow.dynamic_cells[a - dyn], Space::Dynamic, a, inside, kind, site);
        if (inside < n) access_by(f, a + inside, n - inside, kind, site);
        return;
    }
    const uintptr_t st = reinterpret_cast<uintptr_t>(s.static_shared);
    if (a - st < s.static_used) {
        const size_t inside = std::min<size_t>(n, st + s.static_used - a);
        access_cells(f, &shadow.static_cells[a - st], Space::Static, a, inside, kind, site);
        if (inside < n) access_by(f, a + inside, n - inside, kind, site);
        return;
    }
    while (n > 0) {
        const size_t in_page = std::min<size_t>(n, kPageBytes - a % kPageBytes);
        access_cells(f, global_cells(a), Space::Global, a, in_page, kind, site);
        a += in_page;
        n -= in_page;
    }
}

/// Checks and records an access of [p, p + n) by the running fiber, if the
/// launch checks memory and the bytes are not on the fiber's own stack.
void access(const void* p, size_t n, Kind kind, const Site& site) {
    Fiber* f = memcheck_running;
    const uintptr_t a = reinterpret_cast<uintptr_t>(p);
    if (f && a - f->stack_lo >= f->stack_bytes) access_by(*f, a, n, kind, site);
}

/// A hook: the access the compiler instrumented, at return address `pc`.
/// `aligned`: the compiler assumed natural alignment, which the GPU requires.
inline void hook(const void* p, size_t n, bool write, bool aligned, const void* pc) {
    Fiber* f = memcheck_running;
    if (!f) return;
    const uintptr_t a = reinterpret_cast<uintptr_t>(p);
    if (a - f->stack_lo < f->stack_bytes) return;
    if (aligned && a % n != 0)
        fail_running(EmuFailure::Misaligned,
                     format("%s: %zu-byte %s at %p, which is not %zu-byte aligned (the GPU faults: misaligned address) at %s", where(*f).c_str(), n,
                            write ? "store" : "load", p, n, source_of(pc).c_str()));
    access_by(*f, a, n, write ? Kind::Write : Kind::Read, Site{pc, nullptr, nullptr, 0});
}

}  // namespace

bool memcheck_enabled() {
#ifdef PLATYPUS_EMU_MEMCHECK_BUILT
    const Scheduler& s = scheduler();
    return s.launch && (s.launch->flags & PLATYPUS_EMU_MEMCHECK);
#else
    return false;
#endif
}

void memcheck_begin_block() {
    // A block of an earlier launch that failed never reached its end: its
    // global-memory shadow must not outlive it.
    memcheck_end_block();
    if (!memcheck_enabled()) return;
    Scheduler& s = scheduler();
    Shadow& sh = shadow;
    if (sh.dynamic_cells.size() < s.launch->shared_bytes) sh.dynamic_cells.resize(s.launch->shared_bytes);
    std::memset(static_cast<void*>(sh.dynamic_cells.data()), 0, s.launch->shared_bytes * sizeof(Cell));
    if (sh.static_cells.size() < kStaticSharedBytes) sh.static_cells.resize(kStaticSharedBytes);
    std::memset(static_cast<void*>(sh.static_cells.data()), 0, s.static_used * sizeof(Cell));
}

void memcheck_end_block() {
    Shadow& sh = shadow;
    for (auto& p : sh.pages) sh.free_pages.push_back(p.second);
    sh.pages.clear();
    sh.cached_page = ~uintptr_t(0);
    sh.cached_cells = nullptr;
}

void memcheck_static_shared_grew(size_t from, size_t to) {
    if (!memcheck_enabled()) return;
    std::memset(static_cast<void*>(&shadow.static_cells[from]), 0, (to - from) * sizeof(Cell));
}

void memcheck_barrier() {
    Scheduler& s = scheduler();
    for (Fiber& f : s.fibers) {
        ++f.clock;
        f.barrier_clock = f.clock;
        f.sync_file = f.file;
        f.sync_line = f.line;
        f.sync_was_barrier = true;
    }
    for (size_t base = 0; base < s.fibers.size(); base += 32) {
        const size_t lanes = std::min<size_t>(32, s.fibers.size() - base);
        for (size_t t = 0; t < lanes; ++t)
            for (size_t l = 0; l < lanes; ++l) s.fibers[base + t].vc[l] = s.fibers[base + l].clock;
    }
}

void memcheck_syncwarp(size_t base, unsigned mask) {
    Scheduler& s = scheduler();
    uint32_t joined[32] = {};
    for (unsigned l = 0; l < 32; ++l) {
        if (!((mask >> l) & 1u)) continue;
        Fiber& f = s.fibers[base + l];
        ++f.clock;
        f.vc[l] = f.clock;
        for (unsigned x = 0; x < 32; ++x) joined[x] = std::max(joined[x], f.vc[x]);
        f.sync_file = f.file;
        f.sync_line = f.line;
        f.sync_was_barrier = false;
    }
    for (unsigned l = 0; l < 32; ++l)
        if ((mask >> l) & 1u) std::memcpy(s.fibers[base + l].vc, joined, sizeof joined);
}

void memcheck_async_issue(const void* dst, const void* src, const char* file, int line) {
    access(dst, 16, Kind::AsyncIssue, Site{nullptr, "cp_async_16 (destination)", file, line});
    if (src) access(src, 16, Kind::Read, Site{nullptr, "cp_async_16 (source)", file, line});
}

void memcheck_async_land(const void* dst) { access(dst, 16, Kind::AsyncLand, Site{nullptr, "cp.async landing", nullptr, 0}); }

void memcheck_read(const void* p, size_t n, const char* what, const char* file, int line) { access(p, n, Kind::Read, Site{nullptr, what, file, line}); }

void memcheck_enter(Fiber* f) { memcheck_running = memcheck_enabled() ? f : nullptr; }

}  // namespace platypus_emu

// ---- the instrumentation's entry points (GCC/Clang -fsanitize=thread) ------------------------------

using platypus_emu::hook;

extern "C" {

void __tsan_init() {}
void __tsan_func_entry(void*) {}
void __tsan_func_exit() {}

#define PLATYPUS_TSAN_ACCESS(n)                                                                                              \
    void __tsan_read##n(void* p) { hook(p, n, false, true, __builtin_return_address(0)); }                                  \
    void __tsan_write##n(void* p) { hook(p, n, true, true, __builtin_return_address(0)); }                                  \
    void __tsan_unaligned_read##n(void* p) { hook(p, n, false, false, __builtin_return_address(0)); }                       \
    void __tsan_unaligned_write##n(void* p) { hook(p, n, true, false, __builtin_return_address(0)); }                       \
    void __tsan_volatile_read##n(void* p) { hook(p, n, false, true, __builtin_return_address(0)); }                         \
    void __tsan_volatile_write##n(void* p) { hook(p, n, true, true, __builtin_return_address(0)); }

PLATYPUS_TSAN_ACCESS(1)
PLATYPUS_TSAN_ACCESS(2)
PLATYPUS_TSAN_ACCESS(4)
PLATYPUS_TSAN_ACCESS(8)
PLATYPUS_TSAN_ACCESS(16)

void __tsan_read_range(void* p, unsigned long n) { hook(p, n, false, false, __builtin_return_address(0)); }
void __tsan_write_range(void* p, unsigned long n) { hook(p, n, true, false, __builtin_return_address(0)); }

// Atomics are performed, not checked (blocks run on one OS thread, so any
// memory order does).
#define PLATYPUS_TSAN_ATOMIC(bits, T)                                                                                              \
    T __tsan_atomic##bits##_load(const volatile T* a, int) { return __atomic_load_n(a, __ATOMIC_SEQ_CST); }                        \
    void __tsan_atomic##bits##_store(volatile T* a, T v, int) { __atomic_store_n(a, v, __ATOMIC_SEQ_CST); }                        \
    T __tsan_atomic##bits##_exchange(volatile T* a, T v, int) { return __atomic_exchange_n(a, v, __ATOMIC_SEQ_CST); }              \
    T __tsan_atomic##bits##_fetch_add(volatile T* a, T v, int) { return __atomic_fetch_add(a, v, __ATOMIC_SEQ_CST); }              \
    T __tsan_atomic##bits##_fetch_sub(volatile T* a, T v, int) { return __atomic_fetch_sub(a, v, __ATOMIC_SEQ_CST); }              \
    T __tsan_atomic##bits##_fetch_and(volatile T* a, T v, int) { return __atomic_fetch_and(a, v, __ATOMIC_SEQ_CST); }              \
    T __tsan_atomic##bits##_fetch_or(volatile T* a, T v, int) { return __atomic_fetch_or(a, v, __ATOMIC_SEQ_CST); }                \
    T __tsan_atomic##bits##_fetch_xor(volatile T* a, T v, int) { return __atomic_fetch_xor(a, v, __ATOMIC_SEQ_CST); }              \
    T __tsan_atomic##bits##_fetch_nand(volatile T* a, T v, int) { return __atomic_fetch_nand(a, v, __ATOMIC_SEQ_CST); }            \
    int __tsan_atomic##bits##_compare_exchange_strong(volatile T* a, T* c, T v, int, int) {                                        \
        return __atomic_compare_exchange_n(a, c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                                    \
    }                                                                                                                              \
    int __tsan_atomic##bits##_compare_exchange_weak(volatile T* a, T* c, T v, int, int) {                                          \
        return __atomic_compare_exchange_n(a, c, v, true, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                                     \
    }                                                                                                                              \
    T __tsan_atomic##bits##_compare_exchange_val(volatile T* a, T c, T v, int, int) {                                              \
        __atomic_compare_exchange_n(a, &c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                                          \
        return c;                                                                                                                  \
    }

PLATYPUS_TSAN_ATOMIC(8, char)
PLATYPUS_TSAN_ATOMIC(16, short)
PLATYPUS_TSAN_ATOMIC(32, int)
PLATYPUS_TSAN_ATOMIC(64, long)

void __tsan_atomic_thread_fence(int) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
void __tsan_atomic_signal_fence(int) {}

}  // extern "C"
