// Kernels that exercise the host emulator itself (built for the host only):
// warp collectives with known answers, and the misuse the emulator must
// report (divergent barriers, collectives a named lane never reaches).
#include "../common.cuh"

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
