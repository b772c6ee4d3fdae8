// AdamW over every trainable tensor in one launch (multi-tensor), the update
// of torch.optim.AdamW (foreach=False) in fp32:
//
//   g  = clip * grad                       clip: global-norm factor (1 when off)
//   p  = p * (1 - lr * weight_decay)       decoupled weight decay
//   m  = m + (1 - beta1) * (g - m)         torch's lerp
//   v  = beta2 * v + (1 - beta2) * g * g
//   p  = p - (lr / (1 - beta1^t)) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
//
// and, before it, the squares of the gradients summed per chunk for the
// global norm ||g|| = sqrt(sum over all tensors of sum g^2) that
// --max-grad-norm clips by (the host adds the per-chunk partial sums in chunk
// order, in f64: deterministic).
//
// Gradient accumulation over micro-batches goes through the same chunk
// table: acc (in the param slot) += grad, 12 bytes per element.
//
// The tensors are cut into chunks of at most kChunk elements; the host
// uploads one AdamWChunk per chunk (its four pointers already offset) and
// launches one block per chunk. Threads move 16-byte vectors when all four
// pointers of the chunk are 16-byte aligned, single elements otherwise; a
// warp touches 512 consecutive bytes of each tensor: coalesced.
//
// Memory traffic per element: the update reads p, g, m, v and writes p, m,
// v: 28 bytes; the norm reads g: 4 bytes. At LoRA's sizes (Llama-2-7B, r 16,
// all seven projections: 40 M parameters) that is 1.3 GB, 0.6 ms on an A100
// at its 2.0 TB/s. Target: >= 85% of HBM bandwidth.
#include "common.cuh"

namespace platypus {
namespace adamw {

constexpr int kThreads = 256;

__device__ __forceinline__ bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

/// partial[blockIdx.x] = sum of grad^2 over this block's chunk.
__device__ __forceinline__ void sumsq(const AdamWParams& p) {
    const AdamWChunk c = p.chunks[blockIdx.x];
    float acc = 0.0f;
    const int64_t vec_end = aligned16(c.grad) ? c.n / 4 * 4 : 0;
    for (int64_t i = threadIdx.x * 4LL; i < vec_end; i += blockDim.x * 4LL) {
        float g[4];
        load_floats<float, 4>(c.grad + i, g);
        acc += g[0] * g[0] + g[1] * g[1] + g[2] * g[2] + g[3] * g[3];
    }
    for (int64_t i = vec_end + threadIdx.x; i < c.n; i += blockDim.x) acc += c.grad[i] * c.grad[i];
    PLATYPUS_SHARED(float, scratch, [32]);
    const float total = block_sum(acc, scratch);
    if (threadIdx.x == 0) p.partial[blockIdx.x] = total;
}

/// The update of N consecutive elements at i of chunk c.
template <int N, bool VECTOR>
__device__ __forceinline__ void update(const AdamWParams& p, const AdamWChunk& c, int64_t i) {
    float w[N], g[N], m[N], v[N];
    load_run<float, N, VECTOR>(c.param + i, w);
    load_run<float, N, VECTOR>(c.grad + i, g);
    load_run<float, N, VECTOR>(c.m + i, m);
    load_run<float, N, VECTOR>(c.v + i, v);
#pragma unroll
    for (int e = 0; e < N; ++e) {
        const float ge = p.clip * g[e];
        w[e] *= p.decay;
        m[e] += (1.0f - p.beta1) * (ge - m[e]);
        v[e] = p.beta2 * v[e] + (1.0f - p.beta2) * ge * ge;
        const float denom = sqrtf(v[e]) / p.bias_correction2_sqrt + p.eps;
        w[e] -= p.step_size * (m[e] / denom);
    }
    store_run<float, N, VECTOR>(c.param + i, w);
    store_run<float, N, VECTOR>(c.m + i, m);
    store_run<float, N, VECTOR>(c.v + i, v);
}

__device__ __forceinline__ void step(const AdamWParams& p) {
    const AdamWChunk c = p.chunks[blockIdx.x];
    const bool vec = aligned16(c.param) && aligned16(c.grad) && aligned16(c.m) && aligned16(c.v);
    const int64_t vec_end = vec ? c.n / 4 * 4 : 0;
    for (int64_t i = threadIdx.x * 4LL; i < vec_end; i += blockDim.x * 4LL) update<4, true>(p, c, i);
    for (int64_t i = vec_end + threadIdx.x; i < c.n; i += blockDim.x) update<1, false>(p, c, i);
}

/// acc += grad over this block's chunk (acc in the param slot).
__device__ __forceinline__ void accumulate(const AdamWParams& p) {
    const AdamWChunk c = p.chunks[blockIdx.x];
    const bool vec = aligned16(c.param) && aligned16(c.grad);
    const int64_t vec_end = vec ? c.n / 4 * 4 : 0;
    for (int64_t i = threadIdx.x * 4LL; i < vec_end; i += blockDim.x * 4LL) {
        float a[4], g[4];
        load_floats<float, 4>(c.param + i, a);
        load_floats<float, 4>(c.grad + i, g);
#pragma unroll
        for (int e = 0; e < 4; ++e) a[e] += g[e];
        store_floats<float, 4>(c.param + i, a);
    }
    for (int64_t i = vec_end + threadIdx.x; i < c.n; i += blockDim.x) c.param[i] += c.grad[i];
}

}  // namespace adamw
}  // namespace platypus

extern "C" __global__ void __launch_bounds__(platypus::adamw::kThreads) adamw_sumsq(AdamWParams p) {
    platypus::adamw::sumsq(p);
}
PLATYPUS_EXPORT_KERNEL(adamw_sumsq)

extern "C" __global__ void __launch_bounds__(platypus::adamw::kThreads) adamw_step(AdamWParams p) {
    platypus::adamw::step(p);
}
PLATYPUS_EXPORT_KERNEL(adamw_step)

extern "C" __global__ void __launch_bounds__(platypus::adamw::kThreads) adamw_accumulate(AdamWParams p) {
    platypus::adamw::accumulate(p);
}
PLATYPUS_EXPORT_KERNEL(adamw_accumulate)
