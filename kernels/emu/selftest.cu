// Kernels that exercise the host emulator itself (built for the host only):
// warp collectives with known answers, the sm_80 matrix primitives of
// tensor_core.cuh one by one, the misuse the emulator must report (divergent
// barriers, collectives a named lane never reaches, races, misaligned and
// uninitialized accesses), and its schedules.
#include "../common.cuh"
#include "../tensor_core.cuh"

__device__ __forceinline__ int global_tid() { return blockIdx.x * blockDim.x + threadIdx.x; }

// out[t] = results of the warp collectives for thread t, 8 ints per thread:
// shfl idx (lane 3's id), up 1, down 1, xor 1, ballot(lane even), all(lane<32),
// any(lane==5), reduce_add(lane).
extern "C" __global__ void emu_selftest_collectives(EmuSelftestParams p) {
    const int t = global_tid();
    const int lane = threadIdx.x % 32;
    int* o = p.out + 8 * t;
    o[0] = __shfl_sync(0xffffffffu, t, 3);
    o[1] = __shfl_up_sync(0xffffffffu, t, 1);
    o[2] = __shfl_down_sync(0xffffffffu, t, 1);
    o[3] = __shfl_xor_sync(0xffffffffu, t, 1);
    o[4] = static_cast<int>(__ballot_sync(0xffffffffu, lane % 2 == 0));
    o[5] = __all_sync(0xffffffffu, lane < 32);
    o[6] = __any_sync(0xffffffffu, lane == 5);
    o[7] = __reduce_add_sync(0xffffffffu, lane);
}
PLATYPUS_EXPORT_KERNEL(emu_selftest_collectives)

// Block reduction through shared memory and barriers: out[block] = sum of
// thread ids; the dynamic shared memory must hold blockDim.x ints.
extern "C" __global__ void emu_selftest_block_sum(EmuSelftestParams p) {
    PLATYPUS_DYNAMIC_SMEM(int, buf);
    buf[threadIdx.x] = threadIdx.x;
    __syncthreads();
    for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
        if (threadIdx.x < static_cast<unsigned>(stride)) buf[threadIdx.x] += buf[threadIdx.x + stride];
        __syncthreads();
    }
    if (threadIdx.x == 0) p.out[blockIdx.x] = buf[0];
}
PLATYPUS_EXPORT_KERNEL(emu_selftest_block_sum)

// Misuse, chosen by mode:
// 1: thread 0 skips the barrier (returns early);
// 2: even and odd threads wait at different __syncthreads;
// 3: lane 0 never reaches a full-mask shuffle;
// 4: a shuffle whose mask names lanes the block does not have (32-thread mask, 16-thread block);
// 5: __trap() in thread 7;
// 6: thread 0 writes one int past the end of `out` (blockDim.x ints): AddressSanitizer must catch it.
extern "C" __global__ void emu_selftest_misuse(EmuSelftestParams p) {
    const int t = threadIdx.x;
    if (p.mode == 1) {
        if (t == 0) return;
        __syncthreads();
    } else if (p.mode == 2) {
        if (t % 2 == 0) {
            __syncthreads();
        } else {
            __syncthreads();
        }
    } else if (p.mode == 3) {
        if (t % 32 != 0) p.out[t] = __shfl_xor_sync(0xffffffffu, t, 1);
    } else if (p.mode == 4) {
        p.out[t] = __shfl_xor_sync(0xffffffffu, t, 1);
    } else if (p.mode == 5) {
        if (t == 7) __trap();
    } else if (p.mode == 6) {
        if (t == 0) p.out[blockDim.x] = 1;
    }
}
PLATYPUS_EXPORT_KERNEL(emu_selftest_misuse)

// The f16/bf16 conversions the kernels use (the CUDA headers' or the
// emulator's fallback), one value per thread i < mode:
// out[4i] = f16 bits of input[i], out[4i+1] = bf16 bits of input[i],
// out[4i+2] = f32 bits of the f16 with bits i % 65536, out[4i+3] = same for bf16.
extern "C" __global__ void emu_selftest_conversions(EmuSelftestParams p) {
    const int i = global_tid();
    if (i >= p.mode) return;
    const unsigned short pattern = static_cast<unsigned short>(i & 0xffff);
    p.out[4 * i] = __half_as_ushort(__float2half_rn(p.input[i]));
    p.out[4 * i + 1] = __bfloat16_as_ushort(__float2bfloat16_rn(p.input[i]));
    p.out[4 * i + 2] = __float_as_int(__half2float(__ushort_as_half(pattern)));
    p.out[4 * i + 3] = __float_as_int(__bfloat162float(__ushort_as_bfloat16(pattern)));
}
PLATYPUS_EXPORT_KERNEL(emu_selftest_conversions)

// ---- tensor_core.cuh: mma, ldmatrix, cp.async ----------------------------------------------------

// One mma_m16n8k16 with fragments built from global memory by the layout
// formulas of tensor_core.cuh (no ldmatrix), so it checks the mma alone.
// input: A [16][16], B [16][8] (k, n), C [16][8] as floats exactly
// representable in T; out: D = C + A * B, [16][8] fp32 bit patterns.
template <typename T>
__device__ void mma_from_fragments(const EmuSelftestParams& p) {
    const float* A = p.input;
    const float* B = A + 16 * 16;
    const float* C = B + 16 * 8;
    const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const uint32_t a[4] = {
        platypus::pack2<T>(A[g * 16 + 2 * t], A[g * 16 + 2 * t + 1]),
        platypus::pack2<T>(A[(g + 8) * 16 + 2 * t], A[(g + 8) * 16 + 2 * t + 1]),
        platypus::pack2<T>(A[g * 16 + 2 * t + 8], A[g * 16 + 2 * t + 9]),
        platypus::pack2<T>(A[(g + 8) * 16 + 2 * t + 8], A[(g + 8) * 16 + 2 * t + 9]),
    };
    const uint32_t b[2] = {
        platypus::pack2<T>(B[(2 * t) * 8 + g], B[(2 * t + 1) * 8 + g]),
        platypus::pack2<T>(B[(2 * t + 8) * 8 + g], B[(2 * t + 9) * 8 + g]),
    };
    float d[4] = {C[g * 8 + 2 * t], C[g * 8 + 2 * t + 1], C[(g + 8) * 8 + 2 * t], C[(g + 8) * 8 + 2 * t + 1]};
    platypus::mma_m16n8k16<T>(d, a, b);
    p.out[g * 8 + 2 * t] = __float_as_int(d[0]);
    p.out[g * 8 + 2 * t + 1] = __float_as_int(d[1]);
    p.out[(g + 8) * 8 + 2 * t] = __float_as_int(d[2]);
    p.out[(g + 8) * 8 + 2 * t + 1] = __float_as_int(d[3]);
}

// mode 0: bf16, 1: f16. One warp.
extern "C" __global__ void emu_selftest_mma(EmuSelftestParams p) {
    if (p.mode == 0) {
        mma_from_fragments<__nv_bfloat16>(p);
    } else {
        mma_from_fragments<__half>(p);
    }
}
PLATYPUS_EXPORT_KERNEL(emu_selftest_mma)

// ldmatrix on a shared tile of four 8x8 matrices whose rows are 32 bytes
// apart (16 used): element (m, r, c) = 0x1000 | m << 8 | r << 4 | c.
// mode = count (1, 2, 4) | 8 if .trans | 16 if rows are permuted: then lane
// 8i + j of warp w supplies row (5j + 3 + w) % 8 of tile matrix
// (i + 1 + w) % count, else row j of matrix i. Lanes whose address the
// instruction ignores pass a misaligned one. out[4 * thread + i] = r[i] for
// i < count (the rest untouched).
extern "C" __global__ void emu_selftest_ldmatrix(EmuSelftestParams p) {
    PLATYPUS_SHARED(unsigned short, tile, [4 * 8 * 16]);
    for (unsigned e = threadIdx.x; e < 4 * 8 * 16; e += blockDim.x) {
        const unsigned m = e / 128, r = (e / 16) % 8, c = e % 16;
        tile[e] = c < 8 ? static_cast<unsigned short>(0x1000 | m << 8 | r << 4 | c) : 0xdead;
    }
    __syncthreads();
    const int count = p.mode & 7;
    const bool trans = (p.mode & 8) != 0, permute = (p.mode & 16) != 0;
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int i = lane / 8, j = lane % 8;
    const int m = permute ? (i + 1 + warp) % count : i;
    const int r = permute ? (5 * j + 3 + warp) % 8 : j;
    const void* row = i < count ? static_cast<const void*>(&tile[(m * 8 + r) * 16]) : reinterpret_cast<const void*>(uintptr_t{8});
    uint32_t regs[4];
    if (count == 4) {
        uint32_t (&x)[4] = regs;
        if (trans) {
            platypus::ldmatrix_x4_trans(x, row);
        } else {
            platypus::ldmatrix_x4(x, row);
        }
    } else if (count == 2) {
        uint32_t x[2];
        if (trans) {
            platypus::ldmatrix_x2_trans(x, row);
        } else {
            platypus::ldmatrix_x2(x, row);
        }
        regs[0] = x[0];
        regs[1] = x[1];
    } else {
        if (trans) {
            platypus::ldmatrix_x1_trans(regs[0], row);
        } else {
            platypus::ldmatrix_x1(regs[0], row);
        }
    }
    for (int k = 0; k < count; ++k) p.out[4 * threadIdx.x + k] = static_cast<int>(regs[k]);
}
PLATYPUS_EXPORT_KERNEL(emu_selftest_ldmatrix)

// D = A * B (16x16x16, two n8 tiles) the way a tensor-core kernel does it:
// global -> cp_async_16 -> shared -> ldmatrix -> mma -> global. input (16-byte
// aligned) holds T bit patterns: A [16][16] (m, k), then B as [16][16] (k, n)
// if !B_NK, read with ldmatrix_x2_trans, or as [16][16] (n, k) if B_NK, read
// with ldmatrix_x2. out: D [16][16] fp32 bit patterns. One warp.
template <typename T, bool B_NK>
__device__ void mma_pipeline(const EmuSelftestParams& p) {
    PLATYPUS_SHARED(unsigned short, sA, [16 * 16]);
    PLATYPUS_SHARED(unsigned short, sB, [16 * 16]);
    const auto* gA = reinterpret_cast<const unsigned short*>(p.input);
    const auto* gB = gA + 16 * 16;
    const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    // Each tile is 32 chunks of 16 bytes: lane copies chunk `lane` of both.
    platypus::cp_async_16(sA + 8 * lane, gA + 8 * lane, true);
    platypus::cp_async_16(sB + 8 * lane, gB + 8 * lane, true);
    platypus::cp_async_commit();
    platypus::cp_async_wait<0>();
    __syncwarp();
    // A: matrices (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15), (rows 8-15, k 8-15).
    uint32_t a[4];
    platypus::ldmatrix_x4(a, sA + (lane % 16) * 16 + (lane / 16) * 8);
    for (int nt = 0; nt < 2; ++nt) {
        // B for columns nt*8 .. nt*8+7: matrix 0 holds k 0-7, matrix 1 k 8-15.
        uint32_t b[2];
        if (B_NK) {
            platypus::ldmatrix_x2(b, sB + (nt * 8 + lane % 8) * 16 + ((lane / 8) % 2) * 8);
        } else {
            platypus::ldmatrix_x2_trans(b, sB + (lane % 16) * 16 + nt * 8);
        }
        float d[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        platypus::mma_m16n8k16<T>(d, a, b);
        p.out[g * 16 + nt * 8 + 2 * t] = __float_as_int(d[0]);
        p.out[g * 16 + nt * 8 + 2 * t + 1] = __float_as_int(d[1]);
        p.out[(g + 8) * 16 + nt * 8 + 2 * t] = __float_as_int(d[2]);
        p.out[(g + 8) * 16 + nt * 8 + 2 * t + 1] = __float_as_int(d[3]);
    }
}

// mode = 1 if f16 (else bf16) | 2 if B is given as (n, k).
extern "C" __global__ void emu_selftest_mma_pipeline(EmuSelftestParams p) {
    switch (p.mode) {
        case 0: mma_pipeline<__nv_bfloat16, false>(p); break;
        case 1: mma_pipeline<__half, false>(p); break;
        case 2: mma_pipeline<__nv_bfloat16, true>(p); break;
        default: mma_pipeline<__half, true>(p); break;
    }
}
PLATYPUS_EXPORT_KERNEL(emu_selftest_mma_pipeline)

// cp.async as each thread sees its own copies (no barrier involved). Thread
// t owns four 16-byte slots of dynamic shared memory (64 bytes per thread)
// and of input (16-byte aligned, 4 x 4 words per thread); out gets 7
// snapshots of 4 words per thread (28 ints):
//   0: slot 0 right after issue            1: slot 0 after commit, before wait
//   2: slot 0 after wait<1> (2 groups)      3: slot 1 then (newest group: in flight)
//   4: slot 1 after wait<0>                 5: slot 2 then (zero-fill, not committed)
//   6: slot 2 after commit + wait<0>
// Slot 3 is copied and committed but never waited for: it lands at exit.
extern "C" __global__ void emu_selftest_cp_async(EmuSelftestParams p) {
    PLATYPUS_DYNAMIC_SMEM(uint32_t, smem);
    const unsigned t = threadIdx.x;
    const auto* src = reinterpret_cast<const uint32_t*>(p.input) + 16 * t;
    uint32_t* dst = smem + 16 * t;
    int* o = p.out + 28 * t;
    auto snapshot = [&](int s, int slot) {
        for (int w = 0; w < 4; ++w) o[4 * s + w] = static_cast<int>(dst[4 * slot + w]);
    };
    platypus::cp_async_16(dst, src, true);
    snapshot(0, 0);
    platypus::cp_async_commit();
    snapshot(1, 0);
    platypus::cp_async_16(dst + 4, src + 4, true);
    platypus::cp_async_commit();
    platypus::cp_async_16(dst + 8, nullptr, false);  // zero-fill: the null source is never read
    platypus::cp_async_wait<1>();
    snapshot(2, 0);
    snapshot(3, 1);
    platypus::cp_async_wait<0>();
    snapshot(4, 1);
    snapshot(5, 2);
    platypus::cp_async_commit();
    platypus::cp_async_wait<0>();
    snapshot(6, 2);
    platypus::cp_async_16(dst + 12, src + 12, true);
    platypus::cp_async_commit();
}
PLATYPUS_EXPORT_KERNEL(emu_selftest_cp_async)

// Misuse of the tensor-core primitives, chosen by mode; where the error must
// name the calling line, lane 0 first stores that line in out[0]:
// 1: lanes 16..31 exit instead of joining an ldmatrix_x4;
// 2: lane 3 gives ldmatrix_x4 a row address 8 bytes off alignment;
// 3: even and odd lanes call ldmatrix_x4 at different lines;
// 4: mma by a warp of 16 threads (launch with a 16-thread block);
// 5: cp_async_16 to a shared address 8 bytes off alignment;
// 6: cp_async_16 from a global address 8 bytes off alignment (input 16-byte aligned).
extern "C" __global__ void emu_selftest_tensor_core_misuse(EmuSelftestParams p) {
    PLATYPUS_SHARED(unsigned short, tile, [8 * 4 * 8]);
    for (unsigned e = threadIdx.x; e < 8 * 4 * 8; e += blockDim.x) tile[e] = static_cast<unsigned short>(e);
    __syncthreads();
    const int lane = threadIdx.x % 32;
    const unsigned short* row = tile + 8 * lane;
    uint32_t r[4];
    if (p.mode == 1) {
        if (lane >= 16) return;
        platypus::ldmatrix_x4(r, row);
    } else if (p.mode == 2) {
        if (lane == 3) row += 4;
        if (lane == 0) p.out[0] = __LINE__ + 1;  // the line of the call below
        platypus::ldmatrix_x4(r, row);
    } else if (p.mode == 3) {
        if (lane % 2 == 0) {
            platypus::ldmatrix_x4(r, row);
        } else {
            platypus::ldmatrix_x4(r, row);
        }
    } else if (p.mode == 4) {
        float d[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        const uint32_t a[4] = {0, 0, 0, 0}, b[2] = {0, 0};
        platypus::mma_m16n8k16<__nv_bfloat16>(d, a, b);
    } else if (p.mode == 5) {
        if (lane == 0) p.out[0] = __LINE__ + 1;  // the line of the call below
        platypus::cp_async_16(tile + 4, p.input, true);
    } else if (p.mode == 6) {
        if (lane == 0) p.out[0] = __LINE__ + 1;  // the line of the call below
        platypus::cp_async_16(tile, p.input + 2, true);
    }
    if (p.mode >= 5) platypus::cp_async_wait<0>();
    (void)r;
}
PLATYPUS_EXPORT_KERNEL(emu_selftest_tensor_core_misuse)

// ---- the memory checker and the schedules ------------------------------------------------------

// Two threads touching the same bytes, chosen by mode = 2 * case + ordered:
// with ordered = 1 the barrier or __syncwarp that makes the kernel correct is
// there, with 0 it is missing (a race the emulator must report). 64 threads
// (two warps), 64 ints of dynamic shared memory, input 16-byte aligned.
//   0: read after write across warps: thread t reads what thread t ^ 32 wrote;
//   1: write after read across warps: every thread reads s[0], thread 40 writes it;
//   2: within a warp: lane 0 writes, lane 5 reads (__syncwarp orders them);
//   3: a shuffle between them does not order memory (__syncwarp after it does);
//   4: global memory: thread 0 writes out[0], thread 33 reads it;
//   5: cp.async: thread 1 reads the 16 bytes thread 0 copied, after thread 0's wait;
//   6: __syncwarp(0x3) orders lanes 0 and 1 only: lane 1 (ordered) or 2 reads lane 0's write;
//   7: transitively: __syncwarp(0x3) then __syncwarp(0x6) orders lane 0's write
//      before lane 2's read; with __syncwarp(0xc) instead it does not.
extern "C" __global__ void emu_selftest_hazards(EmuSelftestParams p) {
    PLATYPUS_DYNAMIC_SMEM(int, s);
    const int t = threadIdx.x, lane = t % 32, base = t - lane;
    const int which = p.mode / 2;
    const bool ordered = p.mode % 2 != 0;
    s[t] = t;  // every thread writes its own word first
    __syncthreads();
    if (which == 0) {
        s[t] = 100 + t;
        if (ordered) __syncthreads();
        p.out[t] = s[t ^ 32];
    } else if (which == 1) {
        p.out[t] = s[0];
        if (ordered) __syncthreads();
        if (t == 40) s[0] = 7;
    } else if (which == 2) {
        if (lane == 0) s[base] = 9;
        if (ordered) __syncwarp();
        if (lane == 5) p.out[t] = s[base];
    } else if (which == 3) {
        if (lane == 0) s[base] = 9;
        p.out[t] = __shfl_sync(platypus::kFullMask, t, 0);
        if (ordered) __syncwarp();
        if (lane == 5) p.out[t] = s[base];
    } else if (which == 4) {
        if (t == 0) p.out[0] = 5;
        if (ordered) __syncthreads();
        if (t == 33) p.out[1] = p.out[0];
    } else if (which == 5) {
        if (t == 0) {
            platypus::cp_async_16(s + 16, p.input, true);
            platypus::cp_async_commit();
            platypus::cp_async_wait<0>();
        }
        if (ordered) __syncthreads();
        if (t == 1) p.out[1] = s[16];
    } else if (which == 6) {
        if (lane == 0) s[base] = 9;
        if (lane < 2) __syncwarp(0x3u);
        if (lane == (ordered ? 1 : 2)) p.out[t] = s[base];
    } else if (which == 7) {
        if (lane == 0) s[base] = 9;
        if (lane < 2) __syncwarp(0x3u);
        const unsigned second = ordered ? 0x6u : 0xcu;
        if ((second >> lane) & 1u) __syncwarp(second);
        if (lane == 2) p.out[t] = s[base];
    }
}
PLATYPUS_EXPORT_KERNEL(emu_selftest_hazards)

// Accesses the GPU faults on or reads garbage from, chosen by mode; where the
// error must name the line, thread 0 first stores it in out[0]. 64 threads,
// 64 ints of dynamic shared memory, input 16-byte aligned.
//   1: reads a cp.async destination before the copy landed (no wait);
//   2: reads dynamic shared memory no thread wrote;
//   3: static shared memory is the block's own: thread 0 stores what its
//      counter holds before anything wrote it into out[blockIdx.x], then
//      writes it (run without the memory checker, which would report the read);
//   4: a 4-byte vector store (vector_at<uint32_t>) 2 bytes off alignment;
//   5: a plain 4-byte load 2 bytes off alignment;
//   6: warp 1 rewrites the shared rows warp 0 gives ldmatrix_x4, with no barrier.
extern "C" __global__ void emu_selftest_memory(EmuSelftestParams p) {
    PLATYPUS_DYNAMIC_SMEM(int, s);
    PLATYPUS_SHARED(int, counter, );
    const int t = threadIdx.x;
    if (p.mode == 1) {
        if (t == 0) {
            platypus::cp_async_16(s, p.input, true);
            platypus::cp_async_commit();
            p.out[1] = s[0];
            platypus::cp_async_wait<0>();
        }
    } else if (p.mode == 2) {
        if (t == 0) p.out[1] = s[5];
    } else if (p.mode == 3) {
        if (t == 0) {
            p.out[blockIdx.x] = counter;
            counter = static_cast<int>(blockIdx.x);
        }
    } else if (p.mode == 4) {
        if (t == 0) p.out[0] = __LINE__ + 1;  // the line of the store below
        if (t == 0) *platypus::vector_at<uint32_t>(reinterpret_cast<char*>(s) + 2) = 1u;
    } else if (p.mode == 5) {
        const float* misaligned = reinterpret_cast<const float*>(reinterpret_cast<const char*>(p.input) + 2);
        if (t == 0) p.out[0] = __LINE__ + 1;  // the line of the load below
        if (t == 0) p.out[1] = static_cast<int>(*misaligned);
    } else if (p.mode == 6) {
        s[t] = t;
        __syncthreads();
        const int lane = t % 32;
        if (t < 32) {
            uint32_t r[4];
            platypus::ldmatrix_x4(r, s + 4 * (lane % 16));
            p.out[t] = static_cast<int>(r[0]);
        } else {
            s[lane % 16 * 4] = -t;
        }
    }
}
PLATYPUS_EXPORT_KERNEL(emu_selftest_memory)

// The order things run in (launch with 128 threads, 4 warps, any grid).
// out[0..3) are counters; out[8 + k] = the block that ran k-th (thread 0 of
// each block), then for block 0 out[8 + blocks + k] = the thread that ran
// k-th, then out[8 + blocks + 128 + 8 w + step] = the ticket warp w's lane 0
// drew at each of 8 __syncwarp-separated steps.
extern "C" __global__ void emu_selftest_schedule(EmuSelftestParams p) {
    const int t = threadIdx.x, lane = t % 32, warp = t / 32;
    const int blocks = static_cast<int>(gridDim.x);
    if (t == 0) p.out[8 + atomicAdd(&p.out[0], 1)] = static_cast<int>(blockIdx.x);
    if (blockIdx.x != 0) return;
    p.out[8 + blocks + atomicAdd(&p.out[1], 1)] = t;
    for (int step = 0; step < 8; ++step) {
        __syncwarp();
        if (lane == 0) p.out[8 + blocks + 128 + 8 * warp + step] = atomicAdd(&p.out[2], 1);
    }
}
PLATYPUS_EXPORT_KERNEL(emu_selftest_schedule)
