// Token embedding gather: out[i, :] = table[ids[i], :].
//
// The table [vocab, hidden] is read in its stored type and the rows written
// in the output's (the kernel name embedding_{table}_{out} fixes both); every
// id is below vocab (the host checks it before the launch). Same types copy
// the bits as they are; other pairs go through fp32 (exact when widening,
// round-to-nearest-even when narrowing).
//
// One block per token: it reads its id once and walks the row. When every row
// of the table and of out is 16-byte aligned (hidden * min(E_in, E_out) a
// multiple of 16, aligned bases), each access is N = 16 / min(E_in, E_out)
// elements: 128-bit loads and stores (a wider side moves N elements as two
// 128-bit accesses); otherwise single elements. A warp reads 512 consecutive
// bytes of one row: coalesced.
//
// Memory traffic (T tokens, H hidden): reads T*H*E_in of the table (rows of
// repeated ids hit L2) and 4*T bytes of ids, writes T*H*E_out.
// Target: >= 90% of HBM bandwidth (A100 80GB: 2.0 TB/s, H100 SXM: 3.35 TB/s).
#include "common.cuh"

namespace platypus {

constexpr int kEmbeddingThreads = 256;

template <typename A, typename B>
struct SameType {
    static constexpr bool value = false;
};
template <typename A>
struct SameType<A, A> {
    static constexpr bool value = true;
};

/// N elements of T at p into fp32, in 16-byte pieces (one piece, or single
/// elements when N is 1).
template <typename T, int N>
__device__ __forceinline__ void load_pieces(const T* p, float (&out)[N]) {
    constexpr int P = N < kVec16<T> ? N : kVec16<T>;
#pragma unroll
    for (int c = 0; c < N; c += P) {
        float part[P];
        load_floats<T, P>(p + c, part);
#pragma unroll
        for (int i = 0; i < P; ++i) out[c + i] = part[i];
    }
}

/// N fp32 values as elements of T at p, in 16-byte pieces like load_pieces.
template <typename T, int N>
__device__ __forceinline__ void store_pieces(T* p, const float (&in)[N]) {
    constexpr int P = N < kVec16<T> ? N : kVec16<T>;
#pragma unroll
    for (int c = 0; c < N; c += P) {
        float part[P];
#pragma unroll
        for (int i = 0; i < P; ++i) part[i] = in[c + i];
        store_floats<T, P>(p + c, part);
    }
}

/// Row ids[blockIdx.x] of the table into row blockIdx.x of out, N elements per access.
template <typename TIn, typename TOut, int N>
__device__ __forceinline__ void embedding_row(const EmbeddingParams& p) {
    const int token = blockIdx.x;
    const size_t id = p.ids[token];
    const TIn* src = static_cast<const TIn*>(p.table) + id * p.hidden;
    TOut* dst = static_cast<TOut*>(p.out) + static_cast<size_t>(token) * p.hidden;
    for (int j = threadIdx.x * N; j < p.hidden; j += blockDim.x * N) {
        if constexpr (SameType<TIn, TOut>::value) {
            *vector_at<Vec<TOut, N>>(dst + j) = *vector_at<Vec<TIn, N>>(src + j);
        } else {
            float v[N];
            load_pieces<TIn, N>(src + j, v);
            store_pieces<TOut, N>(dst + j, v);
        }
    }
}

template <typename TIn, typename TOut>
__device__ __forceinline__ void embedding(const EmbeddingParams& p) {
    constexpr int N = kVec16<TIn> > kVec16<TOut> ? kVec16<TIn> : kVec16<TOut>;
    if (p.vectorized) {
        embedding_row<TIn, TOut, N>(p);
    } else {
        embedding_row<TIn, TOut, 1>(p);
    }
}

}  // namespace platypus

#define PLATYPUS_EMBEDDING_KERNEL(IN, TIN, OUT, TOUT)                                                      \
    extern "C" __global__ void __launch_bounds__(platypus::kEmbeddingThreads)                             \
        embedding_##IN##_##OUT(EmbeddingParams p) {                                                       \
        platypus::embedding<TIN, TOUT>(p);                                                                \
    }                                                                                                     \
    PLATYPUS_EXPORT_KERNEL(embedding_##IN##_##OUT)

#define PLATYPUS_EMBEDDING_KERNELS(IN, TIN)                 \
    PLATYPUS_EMBEDDING_KERNEL(IN, TIN, f32, float)          \
    PLATYPUS_EMBEDDING_KERNEL(IN, TIN, f16, __half)         \
    PLATYPUS_EMBEDDING_KERNEL(IN, TIN, bf16, __nv_bfloat16)

PLATYPUS_EMBEDDING_KERNELS(f32, float)
PLATYPUS_EMBEDDING_KERNELS(f16, __half)
PLATYPUS_EMBEDDING_KERNELS(bf16, __nv_bfloat16)
