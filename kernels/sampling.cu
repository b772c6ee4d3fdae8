// Choosing the next token from rows of logits z [rows, vocab] (f32, f16 or
// bf16), one block per row; only the ids go back to the host.
//
// argmax: ids[r] = the first index of the largest z[r, :]. NaN counts as
// larger than every number (torch.argmax's rule: the first NaN wins), -0
// and +0 are equal. Each element becomes a 64-bit key (order-preserving
// bits of the value, then the complement of the index) and the block takes
// the largest: one pass, vectorized loads.
//
// sample: the canonical definition a GPU and the CPU reference
// (src/cpu/sampling.rs, f64) share, chosen so that no sort is needed:
//   w_i   = exp((z_i - max z) / temperature)              (w of the max = 1)
//   tau   = the largest t with sum_{w_i >= t} w_i >= top_p * sum_i w_i
//           (tau = 0 when top_p == 1: nothing is cut)
//   kept  = {i : w_i >= tau and w_i > 0}, K = sum_{kept} w_i
//   ids[r] = the first kept i, in index order, whose running kept mass
//           sum_{kept k <= i} w_k exceeds u_r * K; the last kept i if rounding
//           leaves none.
// tau is found by bisection over the bit pattern of a float in [0, 1] (the
// bits of non-negative floats are ordered like the values): 30 block-wide
// sums of the kept mass, each pass a read of a row that sits in L1/L2
// (128 KB at V 32000 in fp32); the largest t whose mass reaches the target
// is the smallest kept weight itself. Then one more pass walks the row in
// index order, tile by tile (a block-wide exclusive scan of each thread's
// 16-byte span). Sums are fp32 in a fixed order (deterministic), so the
// kernel and the f64 reference agree except where u * K or top_p * sum w
// falls within rounding of a boundary of the cumulative sums.
// A row with a NaN or +inf logit, or none above -inf, gets id 0xFFFFFFFF
// (the op turns it into an error).
//
// Memory traffic: argmax reads each row once from HBM: rows * V * E bytes
// (E = bytes per element), target >= 80% of HBM bandwidth once the rows
// fill the GPU (one 64 KB bf16 row per block; decoding a single row is
// latency-bound). sample reads the row from HBM once and ~33 more times
// from L1/L2, and computes ~33 V expf: at one row per SM it is bound by
// those passes (tens of microseconds per row at V 32000), negligible beside
// a decoding step of a 7B model; target: the same HBM figure for the first
// pass, the passes at L2 bandwidth.
#include "rows.cuh"

namespace platypus {
namespace sampling {

constexpr int kThreads = 512;
constexpr unsigned kInvalid = 0xFFFFFFFFu;
constexpr int kNoIndex = 0x7fffffff;

/// Order-preserving 32-bit key of a float: larger values get larger keys,
/// NaN the largest of all, -0 the key of +0.
__device__ __forceinline__ unsigned order_key(float v) {
    if (v != v) return 0xFFFFFFFFu;
    if (v == 0.0f) v = 0.0f;
    const unsigned b = __float_as_uint(v);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

template <typename T, int N, bool VECTOR>
__device__ __forceinline__ void argmax_row(const ArgmaxParams& p) {
    PLATYPUS_SHARED(unsigned long long, scratch, [32]);
    const int row = blockIdx.x;
    const T* z = static_cast<const T*>(p.logits) + static_cast<size_t>(row) * p.vocab;
    // (key << 32) | ~index: the largest is the largest value at the lowest
    // index; 0 is below every element's candidate.
    unsigned long long best = 0;
    for (int j = threadIdx.x * N; j < p.vocab; j += blockDim.x * N) {
        float v[N];
        rows::load_span<T, N, VECTOR>(z, j, p.vocab, v);
#pragma unroll
        for (int i = 0; i < N; ++i) {
            if (j + i >= p.vocab) continue;
            const unsigned long long c = static_cast<unsigned long long>(order_key(v[i])) << 32 | static_cast<unsigned>(~(j + i));
            best = c > best ? c : best;
        }
    }
    best = rows::block_reduce(best, 0ull, scratch, rows::MaxOp{});
    if (threadIdx.x == 0) p.ids[row] = ~static_cast<unsigned>(best & 0xffffffffu);
}

template <typename T, int N, bool VECTOR>
__device__ __forceinline__ void sample_row(const SampleParams& p) {
    PLATYPUS_SHARED(float, fscratch, [32]);
    PLATYPUS_SHARED(int, iscratch, [32]);
    const int row = blockIdx.x;
    const T* z = static_cast<const T*>(p.logits) + static_cast<size_t>(row) * p.vocab;
    const int stride = blockDim.x * N;

    // Pass 1: the largest logit; a thread that sees NaN or +inf reports +inf.
    float m = -INFINITY;
    bool bad = false;
    for (int j = threadIdx.x * N; j < p.vocab; j += stride) {
        float v[N];
        rows::load_span<T, N, VECTOR>(z, j, p.vocab, v);
#pragma unroll
        for (int i = 0; i < N; ++i) {
            bad |= v[i] != v[i] || v[i] == INFINITY;
            m = fmaxf(m, v[i]);
        }
    }
    m = rows::block_reduce(bad ? INFINITY : m, -INFINITY, fscratch, rows::MaxOp{});
    if (m == INFINITY || m == -INFINITY) {
        if (threadIdx.x == 0) p.ids[row] = kInvalid;
        return;
    }
    const float temperature = p.temperature;
    // The one expression of a weight, so that every pass computes the same bits.
    auto weight = [m, temperature](float v) { return expf((v - m) / temperature); };
    // Kept mass at threshold tau: the same fixed-order sum in every pass, so
    // equal kept sets give equal sums bit for bit.
    auto mass = [&](float tau) {
        float s = 0.0f;
        for (int j = threadIdx.x * N; j < p.vocab; j += stride) {
            float v[N];
            rows::load_span<T, N, VECTOR>(z, j, p.vocab, v);
#pragma unroll
            for (int i = 0; i < N; ++i) {
                const float w = weight(v[i]);
                s += w >= tau ? w : 0.0f;
            }
        }
        return rows::block_reduce(s, 0.0f, fscratch, rows::SumOp{});
    };

    const float total = mass(0.0f);
    float tau = 0.0f, kept = total;
    if (p.top_p < 1.0f) {
        // Invariant: mass(lo) >= target > mass(hi). lo = 0 keeps everything;
        // hi, the float after 1.0, keeps nothing (every w <= 1).
        const float target = p.top_p * total;
        unsigned lo = 0u, hi = 0x3f800001u;
        while (hi - lo > 1u) {
            const unsigned mid = lo + (hi - lo) / 2u;
            const float mm = mass(__uint_as_float(mid));
            if (mm >= target) {
                lo = mid;
                kept = mm;
            } else {
                hi = mid;
            }
        }
        tau = __uint_as_float(lo);
    }

    // The walk in index order, one tile of blockDim.x spans at a time.
    const float target = static_cast<float>(p.uniforms[row] * static_cast<double>(kept));
    float base = 0.0f;
    int last = -1;
    for (int tile = 0; tile < p.vocab; tile += stride) {
        const int j = tile + threadIdx.x * N;
        float w[N];
        rows::load_span<T, N, VECTOR>(z, j, p.vocab, w);
        float local = 0.0f;
#pragma unroll
        for (int i = 0; i < N; ++i) {
            const float wi = weight(w[i]);
            const bool keep = wi > 0.0f && wi >= tau;  // never past the row: those weigh 0
            w[i] = keep ? wi : 0.0f;
            local += w[i];
            if (keep) last = j + i;
        }
        float tile_mass;
        float c = base + rows::block_exclusive_sum(local, fscratch, tile_mass);
        int found = kNoIndex;
#pragma unroll
        for (int i = 0; i < N; ++i) {
            if (w[i] > 0.0f) {
                c += w[i];
                if (found == kNoIndex && target < c) found = j + i;
            }
        }
        found = rows::block_reduce(found, kNoIndex, iscratch, rows::MinOp{});
        if (found != kNoIndex) {
            if (threadIdx.x == 0) p.ids[row] = static_cast<unsigned>(found);
            return;
        }
        base += tile_mass;
    }
    // Rounding put u * K past the last running sum: the last kept token (the
    // max always is one, so there is one).
    last = rows::block_reduce(last, -1, iscratch, rows::MaxOp{});
    if (threadIdx.x == 0) p.ids[row] = static_cast<unsigned>(last);
}

template <typename T>
__device__ __forceinline__ void argmax(const ArgmaxParams& p) {
    if (p.vectorized) {
        argmax_row<T, kVec16<T>, true>(p);
    } else {
        argmax_row<T, 1, false>(p);
    }
}

template <typename T>
__device__ __forceinline__ void sample(const SampleParams& p) {
    if (p.vectorized) {
        sample_row<T, kVec16<T>, true>(p);
    } else {
        sample_row<T, 1, false>(p);
    }
}

}  // namespace sampling
}  // namespace platypus

#define PLATYPUS_SAMPLING_KERNELS(SUFFIX, T)                                                          \
    extern "C" __global__ void __launch_bounds__(platypus::sampling::kThreads)                        \
        argmax_##SUFFIX(ArgmaxParams p) {                                                             \
        platypus::sampling::argmax<T>(p);                                                             \
    }                                                                                                 \
    PLATYPUS_EXPORT_KERNEL(argmax_##SUFFIX)                                                           \
    extern "C" __global__ void __launch_bounds__(platypus::sampling::kThreads)                        \
        sample_##SUFFIX(SampleParams p) {                                                             \
        platypus::sampling::sample<T>(p);                                                             \
    }                                                                                                 \
    PLATYPUS_EXPORT_KERNEL(sample_##SUFFIX)

PLATYPUS_SAMPLING_KERNELS(f32, float)
PLATYPUS_SAMPLING_KERNELS(f16, __half)
PLATYPUS_SAMPLING_KERNELS(bf16, __nv_bfloat16)
