// Device helpers shared by the kernels: element conversions, 128-bit vector
// access, warp and block reductions. Compiles with nvcc for the GPU and with
// g++ plus emu/cuda_emu.h for the host emulator.
#pragma once

#ifdef __CUDACC__
#include <cuda_bf16.h>
#include <cuda_fp16.h>
/// The block's dynamic shared memory as a T array.
#define PLATYPUS_DYNAMIC_SMEM(T, name)                              \
    extern __shared__ __align__(16) unsigned char platypus_smem_[]; \
    T* name = reinterpret_cast<T*>(platypus_smem_)
/// A static shared variable `T name dims`, 16-byte aligned (the emulator
/// gives each block its own poisoned copy; plain __shared__ does not build there).
#define PLATYPUS_SHARED(T, name, dims) __shared__ __align__(16) T name dims
/// Makes an extern "C" __global__ kernel launchable on the host emulator too
/// (nothing on the GPU).
#define PLATYPUS_EXPORT_KERNEL(name)
/// Extra trailing parameters that capture a device helper's call site for the
/// emulator's messages (none on the GPU), and the arguments passing them on.
#define PLATYPUS_CALL_SITE
#define PLATYPUS_PASS_SITE
#define PLATYPUS_CHECK_VECTOR(p, bytes)
#else
#define PLATYPUS_EXPORT_KERNEL(name) PLATYPUS_EMU_EXPORT(name)
#define PLATYPUS_CALL_SITE , const char *file = __builtin_FILE(), int line = __builtin_LINE()
#define PLATYPUS_PASS_SITE , file, line
#define PLATYPUS_CHECK_VECTOR(p, bytes) platypus_emu::check_vector_access(p, bytes, file, line)
#include "emu/cuda_emu.h"
#endif

#include "params.h"

namespace platypus {

constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

/// N elements of T moved as one access: 16 bytes (LDG.128/STG.128) when
/// N * sizeof(T) == 16. The pointer must be aligned to the whole vector.
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
    T v[N];
};

/// `p` as the vector type V it is accessed through (a Vec, or uint32_t for
/// two packed halves): one LD/ST of sizeof(V) bytes on the GPU, which faults
/// unless p is aligned to that size; the emulator checks it and names the
/// caller's line.
template <typename V>
__device__ __forceinline__ V* vector_at(void* p PLATYPUS_CALL_SITE) {
    PLATYPUS_CHECK_VECTOR(p, sizeof(V));
    return static_cast<V*>(p);
}
template <typename V>
__device__ __forceinline__ const V* vector_at(const void* p PLATYPUS_CALL_SITE) {
    PLATYPUS_CHECK_VECTOR(p, sizeof(V));
    return static_cast<const V*>(p);
}

/// Loads N consecutive elements at p into fp32.
template <typename T, int N>
__device__ __forceinline__ void load_floats(const T* p, float (&out)[N] PLATYPUS_CALL_SITE) {
    const Vec<T, N> v = *vector_at<Vec<T, N>>(p PLATYPUS_PASS_SITE);
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = to_float(v.v[i]);
}

/// Stores N fp32 values as consecutive elements of T at p.
template <typename T, int N>
__device__ __forceinline__ void store_floats(T* p, const float (&in)[N] PLATYPUS_CALL_SITE) {
    Vec<T, N> v;
#pragma unroll
    for (int i = 0; i < N; ++i) v.v[i] = from_float<T>(in[i]);
    *vector_at<Vec<T, N>>(p PLATYPUS_PASS_SITE) = v;
}

/// Loads N consecutive elements at p into fp32: one vector access when
/// VECTOR (p aligned to the whole run), else N element accesses.
template <typename T, int N, bool VECTOR>
__device__ __forceinline__ void load_run(const T* p, float (&out)[N] PLATYPUS_CALL_SITE) {
    if constexpr (VECTOR) {
        load_floats<T, N>(p, out PLATYPUS_PASS_SITE);
    } else {
#pragma unroll
        for (int i = 0; i < N; ++i) out[i] = to_float(p[i]);
    }
}

/// Stores N fp32 values as consecutive elements at p, like load_run.
template <typename T, int N, bool VECTOR>
__device__ __forceinline__ void store_run(T* p, const float (&in)[N] PLATYPUS_CALL_SITE) {
    if constexpr (VECTOR) {
        store_floats<T, N>(p, in PLATYPUS_PASS_SITE);
    } else {
#pragma unroll
        for (int i = 0; i < N; ++i) p[i] = from_float<T>(in[i]);
    }
}

/// Elements of T in a 16-byte vector.
template <typename T>
constexpr int kVec16 = 16 / static_cast<int>(sizeof(T));

/// Sum over the 32 lanes of a warp; every lane gets the result.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(kFullMask, v, offset);
    return v;
}

/// Sum over the block (blockDim.x a multiple of 32, at most 1024); every
/// thread gets the result. `scratch` is 32 floats of shared memory; the
/// function ends with a barrier, so it can be called again at once.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    const int lane = threadIdx.x % 32;
    const int warp = threadIdx.x / 32;
    const int warps = blockDim.x / 32;
    v = warp_sum(v);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < warps ? scratch[lane] : 0.0f;
    v = warp_sum(v);
    __syncthreads();
    return v;
}

}  // namespace platypus
