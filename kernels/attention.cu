// Flash attention (the FlashAttention-2 algorithm) on sm_80 tensor cores.
//
// Forward: O = softmax(scale * Q K^T + mask) V and the natural-log logsumexp
// of every score row, without ever materialising the T x T matrix. A block
// owns 128 query rows of one (sequence, head) (64 at head dim 128); each of
// its 4 warps owns 32 of them (16) and loops over tiles of 64 keys of K and V:
// S = Q K^T on mma.sync
// (ldmatrix from swizzled shared memory), online softmax in fp32 with exp2
// of log2-scaled logits, O += P V with P re-packed from the accumulator
// fragments (no shared-memory round trip). K/V tiles are double-buffered with
// cp.async, so the next tile streams in while this one is multiplied.
//
// Backward (three kernels, all deterministic: no atomics):
//   delta = rowsum(dO * O)                                  (pre-pass)
//   dK, dV: a block owns 64 keys of one kv head and loops over the query
//           tiles of every query head sharing it (GQA sums in registers):
//           recompute S^T = K Q^T, P^T = exp2(S^T - lse), dV += P^T dO,
//           dP^T = V dO^T, dS^T = P^T (dP^T - delta), dK += dS^T Q.
//   dQ:     a block owns 64 query rows and loops over 64-key tiles: recompute
//           P, dP = dO V^T, dS, dQ += dS K.
// Splitting dQ into its own pass recomputes Q K^T and dO V^T once more
// (7 instead of 5 matrix products in backward) in exchange for a fixed
// summation order without fp32 atomics.
//
// Memory traffic per (sequence, head) of length T, head dim D, 2-byte
// elements: forward reads Q once and K, V once per 128-row query tile
// (2 * 2TD * T/128) and writes O once; backward reads K, V per query tile in
// the dQ pass and Q, dO per key tile in the dK/dV pass. Tensor-core FLOPs
// dominate from T of a few hundred on. Shared-memory traffic per mma (one
// ldmatrix.x4 moves 512 bytes, an A100 SM reads 128 bytes/clock and retires
// one m16n8k16 per 2 clocks): forward 40 ldmatrix.x4 per 128 mma at head
// dims 16/32/64 (32 rows per warp) and 72 per 128 at 128 (16 rows per warp),
// backward 0.56 to 0.67 per mma (16 rows per warp).
//
// Head dims 16, 32, 64 and 128. At D = 16 Q K^T is one k16 step per key
// tile and P V two n8 tiles per m16 tile: the kernels are bound by the
// softmax and the K/V stream, not the tensor cores (a 32-byte row is two
// 16-byte chunks, swizzled every 4 rows).
//
// KV cache (forward only; AttentionParams.kv_seq_stride > 0): sequence b's
// keys are rows b * capacity .. b * capacity + kv_len of a [batch,
// capacity, kv_heads, D] cache, and the causal mask is aligned to the end
// (FlashAttention-2's bottom-right alignment: query i of `new` sees keys
// j <= i + kv_len - new). Key tiles past the block's last diagonal are
// skipped, the tiles crossing a warp's diagonal masked; rows past kv_len
// are never read. Decoding (new = 1) runs one block per (sequence, query
// head) holding a single valid query row in a 128-row tile (64 at D = 128):
// 127/128 of its MMA rows are wasted, but decoding is bound by reading K and
// V (2 * kv_len * D * 2 bytes per query head, once per query head even when
// GQA heads share a kv head, the repeats then mostly L2 hits), and the
// tensor-core time per 64-key tile is small next to its 16 KB (D = 64)
// to 32 KB (D = 128) load. With only batch * q_heads blocks (32 for Llama 2
// 7B at batch 1, a quarter of an H100's SMs) each streaming its cache
// through a 2-stage cp.async pipeline, a long-cache decode reaches well
// under half of HBM bandwidth; split-K (flash-decoding: several blocks per
// head over slices of the cache, then a log-sum-exp combine) is what would
// fill the GPU, and is not done. The GQA query heads of one kv head are not
// folded into one tile's rows either.
//
// write_cache: appends the new tokens' K or V rows [batch, new, kv_heads,
// D] to rows start .. start + new of the cache, one unit (16 bytes when the
// rows and pointers allow, else 4 or 2) per thread, coalesced: reads and
// writes batch * new * kv_heads * D elements once (memory-bound; a decode
// step's few KB per layer are launch-latency bound).
//
// Layout: token-major [tokens, heads, D] (AttentionParams in params.h);
// every row must start 16-byte aligned (D a multiple of 8, 16-byte aligned
// base pointers). One instantiation per (dtype, D, causal).
#include "tensor_core.cuh"

namespace platypus {
namespace attn {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kBlockM = 64;  // query rows per dQ block: 16 per warp
constexpr int kBlockN = 64;  // keys per dK/dV block
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
/// Most dynamic shared memory a block may have on every target arch (sm_86/sm_89: 99 KB).
constexpr int kMaxSmem = 99 * 1024;

__device__ __forceinline__ int div_ceil(int a, int b) { return (a + b - 1) / b; }

/// First token and length of sequence b (see AttentionParams).
struct Sequence {
    int start;
    int len;
    bool padded;  // rows len .. max_seqlen belong to this sequence as padding
};

__device__ __forceinline__ Sequence sequence(const AttentionParams& p, int b) {
    if (p.cu_seqlens) return {p.cu_seqlens[b], p.cu_seqlens[b + 1] - p.cu_seqlens[b], false};
    return {b * p.max_seqlen, p.seq_lens ? p.seq_lens[b] : p.max_seqlen, true};
}

/// The keys of sequence b, whose queries are `q`: rows start .. start + len
/// of k and v, and the causal offset len - q.len (query i sees keys j <= i
/// + offset). Self-attention: the queries' own rows, offset 0.
struct Keys {
    int start;
    int len;
    int offset;
};

__device__ __forceinline__ Keys keys_of(const AttentionParams& p, const Sequence& q, int b) {
    if (p.kv_seq_stride > 0) return {b * p.kv_seq_stride, p.kv_len, p.kv_len - q.len};
    return {q.start, q.len, 0};
}

/// Rows [0, ROWS) of a tile a block owns, starting at row `first` of `seq`:
/// `valid` rows hold data, `out` rows get written (padding rows as zeros).
struct TileRows {
    int valid;
    int out;
};

template <int ROWS>
__device__ __forceinline__ TileRows tile_rows(const AttentionParams& p, const Sequence& s, int first) {
    const int valid = max(0, min(ROWS, s.len - first));
    return {valid, s.padded ? min(ROWS, p.max_seqlen - first) : valid};
}

/// Issues cp.async for a [ROWS][D] tile: row r from g + r * stride; rows at
/// or beyond `valid` are zero-filled without reading global memory.
template <typename T, int D, int ROWS>
__device__ __forceinline__ void load_tile_async(T* s, const T* g, int stride, int valid) {
    cp_async_tile<T, ROWS, D, kThreads>(s, g, stride, valid, D);
}

/// Issues the cp.async of key tile j (rows j*BN .. of a sequence of `len`
/// keys) of K and V into buffer j % 2 of the double-buffered sK and sV.
template <typename T, int D, int BN>
__device__ __forceinline__ void load_kv_tile_async(T* sK, T* sV, const T* k, const T* v, int stride, int j, int len) {
    const int n0 = j * BN;
    const int buf = j % 2 * BN * D;
    load_tile_async<T, D, BN>(sK + buf, k + static_cast<size_t>(n0) * stride, stride, min(BN, len - n0));
    load_tile_async<T, D, BN>(sV + buf, v + static_cast<size_t>(n0) * stride, stride, min(BN, len - n0));
}

/// Writes `out` rows of a staged [ROWS][D] shared tile to global with 16-byte
/// stores; rows at or beyond `valid` are written as zeros.
template <typename T, int D, int ROWS>
__device__ __forceinline__ void store_tile(T* g, int stride, const T* s, TileRows rows) {
    constexpr int kChunks = D / 8;
#pragma unroll
    for (int pass = 0; pass < ROWS * kChunks / kThreads; ++pass) {
        const int i = pass * kThreads + threadIdx.x;
        const int r = i / kChunks, c = i % kChunks;
        if (r >= rows.out) continue;
        Vec<T, 8> v;
        if (r < rows.valid) {
            v = *vector_at<Vec<T, 8>>(s + swz<D>(r, c));
        } else {
#pragma unroll
            for (int e = 0; e < 8; ++e) v.v[e] = from_float<T>(0.0f);
        }
        *vector_at<Vec<T, 8>>(g + static_cast<size_t>(r) * stride + c * 8) = v;
    }
}

/// Stages a warp's fp32 accumulator (16 rows from `row0`, D columns, mma C
/// layout) into a swizzled [rows][D] shared tile as T.
template <typename T, int D>
__device__ __forceinline__ void stage_accumulator(T* s, int row0, const float (&acc)[D / 8][4]) {
    const int lane = threadIdx.x % 32;
    const int g = lane / 4, t = lane % 4;
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
        *vector_at<uint32_t>(s + swz<D>(row0 + g, dt) + 2 * t) = pack2<T>(acc[dt][0], acc[dt][1]);
        *vector_at<uint32_t>(s + swz<D>(row0 + g + 8, dt) + 2 * t) = pack2<T>(acc[dt][2], acc[dt][3]);
    }
}

/// acc (MW*16 x NT*8) += A B^T for one warp: A is rows a_row0 ..
/// a_row0 + MW*16 - 1 of the [.][D] tile sA, B rows 0 .. NT*8-1 of the [.][D]
/// tile sB; the contraction runs over D. Each B fragment feeds MW mma, so
/// more rows per warp means less shared-memory traffic per tensor-core op.
/// (S = Q K^T, dP = dO V^T, and their transposes.)
template <typename T, int D, int MW, int NT>
__device__ __forceinline__ void warp_gemm_abt(float (&acc)[MW][NT][4], const T* sA, int a_row0, const T* sB) {
    const int lane = threadIdx.x % 32;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
        uint32_t a[MW][4];
#pragma unroll
        for (int mw = 0; mw < MW; ++mw) ldmatrix_x4(a[mw], sA + swz<D>(a_row0 + mw * 16 + lane % 8 + (lane / 8 % 2) * 8, kk * 2 + lane / 16));
#pragma unroll
        for (int np = 0; np < NT / 2; ++np) {
            uint32_t b[4];
            ldmatrix_x4(b, sB + swz<D>(np * 16 + lane % 8 + (lane / 16) * 8, kk * 2 + lane / 8 % 2));
            const uint32_t b0[2] = {b[0], b[1]};
            const uint32_t b1[2] = {b[2], b[3]};
#pragma unroll
            for (int mw = 0; mw < MW; ++mw) {
                mma_m16n8k16<T>(acc[mw][2 * np], a[mw], b0);
                mma_m16n8k16<T>(acc[mw][2 * np + 1], a[mw], b1);
            }
        }
    }
}

/// acc (MW*16 x D) += P B for one warp: P (MW*16 x KT*16) is already in
/// A-fragment registers, B is rows 0 .. KT*16-1 of the [.][D] tile sB (read
/// transposed by ldmatrix.trans). (O += P V, dV += P^T dO, dQ += dS K,
/// dK += dS^T Q.)
template <typename T, int D, int MW, int KT>
__device__ __forceinline__ void warp_gemm_pb(float (&acc)[MW][D / 8][4], const uint32_t (&pa)[MW][KT][4], const T* sB) {
    const int lane = threadIdx.x % 32;
#pragma unroll
    for (int kk = 0; kk < KT; ++kk) {
#pragma unroll
        for (int dp = 0; dp < D / 16; ++dp) {
            uint32_t b[4];
            ldmatrix_x4_trans(b, sB + swz<D>(kk * 16 + lane % 8 + (lane / 8 % 2) * 8, dp * 2 + lane / 16));
            const uint32_t b0[2] = {b[0], b[1]};
            const uint32_t b1[2] = {b[2], b[3]};
#pragma unroll
            for (int mw = 0; mw < MW; ++mw) {
                mma_m16n8k16<T>(acc[mw][2 * dp], pa[mw][kk], b0);
                mma_m16n8k16<T>(acc[mw][2 * dp + 1], pa[mw][kk], b1);
            }
        }
    }
}

/// Re-packs a 16 x NT*8 fp32 accumulator as NT/2 A fragments of T: the C
/// layout of two neighbouring n8 tiles is the A layout of one k16 step.
template <typename T, int NT>
__device__ __forceinline__ void to_a_fragments(uint32_t (&pa)[NT / 2][4], const float (&c)[NT][4]) {
#pragma unroll
    for (int kk = 0; kk < NT / 2; ++kk) {
        pa[kk][0] = pack2<T>(c[2 * kk][0], c[2 * kk][1]);
        pa[kk][1] = pack2<T>(c[2 * kk][2], c[2 * kk][3]);
        pa[kk][2] = pack2<T>(c[2 * kk + 1][0], c[2 * kk + 1][1]);
        pa[kk][3] = pack2<T>(c[2 * kk + 1][2], c[2 * kk + 1][3]);
    }
}

/// Max over the 4 lanes of a quad (the lanes sharing an accumulator row).
__device__ __forceinline__ float quad_max(float v) {
    v = fmaxf(v, __shfl_xor_sync(kFullMask, v, 1));
    return fmaxf(v, __shfl_xor_sync(kFullMask, v, 2));
}

__device__ __forceinline__ float quad_sum(float v) {
    v += __shfl_xor_sync(kFullMask, v, 1);
    return v + __shfl_xor_sync(kFullMask, v, 2);
}

/// Sets to -inf the scores of a warp's 16 x NT*8 tile (rows row0 + g, +8 of
/// the sequence, columns col0 ..) that a query may not see: keys at or beyond
/// `len`, and with CAUSAL keys after the query. TRANSPOSED: rows are keys and
/// columns queries (the dK/dV pass). Query indices are in key coordinates:
/// a KV-cache forward passes its query rows plus the causal offset.
template <bool CAUSAL, bool TRANSPOSED, int NT>
__device__ __forceinline__ void mask_scores(float (&s)[NT][4], int row0, int col0, int len) {
    const int lane = threadIdx.x % 32;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int row = row0 + lane / 4 + (e / 2) * 8;
            const int col = col0 + nt * 8 + 2 * (lane % 4) + e % 2;
            const int query = TRANSPOSED ? col : row;
            const int key = TRANSPOSED ? row : col;
            if (key >= len || (CAUSAL && key > query)) s[nt][e] = -INFINITY;
        }
    }
}

// ---- forward -----------------------------------------------------------------------------------

// Forward tiles: 64-key K/V tiles; 32 query rows per warp (two m16 tiles
// share every K and V fragment: 0.31 ldmatrix.x4 per mma), 128 per block.
// At head dim 128 a warp keeps 16 rows (0.56 ldmatrix.x4 per mma): 32 rows
// need 128 fp32 output accumulators per thread, and with any K/V tile wide
// enough to pay for its barrier ptxas spills (20 bytes at 32-key tiles).
template <int D>
constexpr int kFwdWarpRows = D >= 128 ? 16 : 32;
template <int D>
constexpr int kFwdBlockM = kWarps * kFwdWarpRows<D>;
constexpr int kFwdBlockN = 64;

/// Dynamic shared memory of the forward kernel: Q, 2 x K, 2 x V tiles
/// (src/ops/attention.rs computes the same).
template <typename T, int D>
constexpr int kForwardSmem = (kFwdBlockM<D> + 4 * kFwdBlockN) * D * static_cast<int>(sizeof(T));

template <typename T, int D, bool CAUSAL>
__device__ __forceinline__ void forward(const AttentionParams& p) {
    constexpr int BM = kFwdBlockM<D>;
    constexpr int BN = kFwdBlockN;
    constexpr int MW = kFwdWarpRows<D> / 16;
    constexpr int NT = BN / 8;
    constexpr int DT = D / 8;
    static_assert(kForwardSmem<T, D> <= kMaxSmem, "forward tiles fit in shared memory");
    PLATYPUS_DYNAMIC_SMEM(T, smem);
    T* sQ = smem;
    T* sK = sQ + BM * D;  // [2][BN][D]
    T* sV = sK + 2 * BN * D;

    const int m0 = blockIdx.x * BM, h = blockIdx.y;
    const Sequence seq = sequence(p, blockIdx.z);
    const Keys keys = keys_of(p, seq, blockIdx.z);
    const TileRows rows = tile_rows<BM>(p, seq, m0);
    const int q_stride = p.q_heads * D, kv_stride = p.kv_heads * D;
    const size_t q_at = static_cast<size_t>(seq.start + m0) * q_stride + h * D;
    T* o = static_cast<T*>(p.out) + q_at;
    float* lse = p.lse + static_cast<size_t>(h) * p.tokens + seq.start + m0;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int warp_row0 = warp * kFwdWarpRows<D>;
    // This thread's rows in the tile: warp_row0 + 16 * mw + 8 * r + lane / 4.
    auto row_of = [&](int mw, int r) { return warp_row0 + 16 * mw + 8 * r + lane / 4; };

    if (rows.valid > 0) {
        const int kv_head = h / (p.q_heads / p.kv_heads);
        const T* k = static_cast<const T*>(p.k) + static_cast<size_t>(keys.start) * kv_stride + kv_head * D;
        const T* v = static_cast<const T*>(p.v) + static_cast<size_t>(keys.start) * kv_stride + kv_head * D;
        // Causal: key tiles past the last row's diagonal (row + offset) are
        // skipped. At least one tile, so the loop's barriers retire the loads
        // even if no key is visible (then o = 0, lse = 0).
        const int n_tiles = max(1, div_ceil(CAUSAL ? m0 + rows.valid + keys.offset : keys.len, BN));
        load_tile_async<T, D, BM>(sQ, static_cast<const T*>(p.q) + q_at, q_stride, rows.valid);
        load_kv_tile_async<T, D, BN>(sK, sV, k, v, kv_stride, 0, keys.len);
        cp_async_commit();

        float acc[MW][DT][4] = {};
        float row_max[MW][2], row_sum[MW][2];
#pragma unroll
        for (int mw = 0; mw < MW; ++mw) {
            row_max[mw][0] = row_max[mw][1] = -INFINITY;
            row_sum[mw][0] = row_sum[mw][1] = 0.0f;
        }
        const float scale_log2 = p.scale * kLog2e;
        for (int j = 0; j < n_tiles; ++j) {
            const int n0 = j * BN;
            if (j + 1 < n_tiles) load_kv_tile_async<T, D, BN>(sK, sV, k, v, kv_stride, j + 1, keys.len);
            cp_async_commit();
            cp_async_wait<1>();
            __syncthreads();
            const T* sKj = sK + j % 2 * BN * D;
            const T* sVj = sV + j % 2 * BN * D;

            float s[MW][NT][4] = {};
            warp_gemm_abt<T, D, MW, NT>(s, sQ, warp_row0, sKj);
            // The last tile, and with CAUSAL a tile reaching past this warp's first diagonal, get masked.
            const int diagonal0 = m0 + warp_row0 + keys.offset;
            if (n0 + BN > keys.len || (CAUSAL && n0 + BN - 1 > diagonal0)) {
#pragma unroll
                for (int mw = 0; mw < MW; ++mw) mask_scores<CAUSAL, false>(s[mw], diagonal0 + 16 * mw, n0, keys.len);
            }

            // Online softmax, per accumulator row (elements 2r, 2r+1 of each n8 tile).
#pragma unroll
            for (int mw = 0; mw < MW; ++mw) {
#pragma unroll
                for (int r = 0; r < 2; ++r) {
                    float mx = row_max[mw][r];
#pragma unroll
                    for (int nt = 0; nt < NT; ++nt) mx = fmaxf(mx, fmaxf(s[mw][nt][2 * r], s[mw][nt][2 * r + 1]));
                    mx = quad_max(mx);
                    // A row with every key masked so far keeps max -inf: subtract 0 so exp2 gives 0, not NaN.
                    const float base = mx == -INFINITY ? 0.0f : mx * scale_log2;
                    const float correction = exp2f(row_max[mw][r] * scale_log2 - base);
                    row_max[mw][r] = mx;
                    row_sum[mw][r] *= correction;
#pragma unroll
                    for (int dt = 0; dt < DT; ++dt) {
                        acc[mw][dt][2 * r] *= correction;
                        acc[mw][dt][2 * r + 1] *= correction;
                    }
#pragma unroll
                    for (int nt = 0; nt < NT; ++nt) {
                        s[mw][nt][2 * r] = exp2f(fmaf(s[mw][nt][2 * r], scale_log2, -base));
                        s[mw][nt][2 * r + 1] = exp2f(fmaf(s[mw][nt][2 * r + 1], scale_log2, -base));
                        row_sum[mw][r] += s[mw][nt][2 * r] + s[mw][nt][2 * r + 1];
                    }
                }
            }
            uint32_t pa[MW][NT / 2][4];
#pragma unroll
            for (int mw = 0; mw < MW; ++mw) to_a_fragments<T, NT>(pa[mw], s[mw]);
            warp_gemm_pb<T, D, MW, NT / 2>(acc, pa, sVj);
            __syncthreads();
        }

#pragma unroll
        for (int mw = 0; mw < MW; ++mw) {
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                const float sum = quad_sum(row_sum[mw][r]);
                const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
#pragma unroll
                for (int dt = 0; dt < DT; ++dt) {
                    acc[mw][dt][2 * r] *= inv;
                    acc[mw][dt][2 * r + 1] *= inv;
                }
                const int row = row_of(mw, r);
                if (lane % 4 == 0 && row < rows.valid) lse[row] = sum > 0.0f ? (row_max[mw][r] * scale_log2 + log2f(sum)) * kLn2 : 0.0f;
            }
            stage_accumulator<T, D>(sQ, warp_row0 + 16 * mw, acc[mw]);  // sQ is free: the loop ended with a barrier
        }
        __syncthreads();
    }
#pragma unroll
    for (int mw = 0; mw < MW; ++mw) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int row = row_of(mw, r);
            if (lane % 4 == 0 && row >= rows.valid && row < rows.out) lse[row] = 0.0f;
        }
    }
    store_tile<T, D, BM>(o, q_stride, sQ, rows);
}

// ---- backward ----------------------------------------------------------------------------------

/// delta[h, token] = sum_d dout[token, h, d] * o[token, h, d] in fp32; D/8
/// lanes per row, one 16-byte load of each tensor per lane.
template <typename T, int D>
__device__ __forceinline__ void backward_delta(const AttentionParams& p) {
    constexpr int kLanes = D / 8;
    const int rows = p.tokens * p.q_heads;
    const int row = blockIdx.x * (kThreads / kLanes) + threadIdx.x / kLanes;
    const int c = threadIdx.x % kLanes;
    float sum = 0.0f;
    if (row < rows) {
        float o[8], d[8];
        load_floats<T, 8>(static_cast<const T*>(p.o) + static_cast<size_t>(row) * D + c * 8, o);
        load_floats<T, 8>(static_cast<const T*>(p.dout) + static_cast<size_t>(row) * D + c * 8, d);
#pragma unroll
        for (int e = 0; e < 8; ++e) sum = fmaf(o[e], d[e], sum);
    }
#pragma unroll
    for (int offset = kLanes / 2; offset > 0; offset /= 2) sum += __shfl_xor_sync(kFullMask, sum, offset);
    if (row < rows && c == 0) {
        const int token = row / p.q_heads, h = row % p.q_heads;
        p.delta[static_cast<size_t>(h) * p.tokens + token] = sum;
    }
}

/// Keys per K/V tile of the dQ pass: 32 at head dim 128 keeps the tiles in
/// 64 KB, two blocks per A100 SM instead of one.
template <int D>
constexpr int kDqBlockN = D >= 128 ? 32 : 64;

/// Dynamic shared memory of the dQ kernel: Q, dO, 2 x K, 2 x V tiles.
template <typename T, int D>
constexpr int kDqSmem = (2 * kBlockM + 4 * kDqBlockN<D>)*D * static_cast<int>(sizeof(T));

/// dQ for 64 query rows of one head: loops over the key tiles.
template <typename T, int D, bool CAUSAL>
__device__ __forceinline__ void backward_dq(const AttentionParams& p) {
    constexpr int BN = kDqBlockN<D>;
    constexpr int NT = BN / 8;
    constexpr int DT = D / 8;
    static_assert(kDqSmem<T, D> <= kMaxSmem, "dQ tiles fit in shared memory");
    PLATYPUS_DYNAMIC_SMEM(T, smem);
    T* sQ = smem;
    T* sdO = sQ + kBlockM * D;
    T* sK = sdO + kBlockM * D;  // [2][BN][D]
    T* sV = sK + 2 * BN * D;

    const int m0 = blockIdx.x * kBlockM, h = blockIdx.y;
    const Sequence seq = sequence(p, blockIdx.z);
    const TileRows rows = tile_rows<kBlockM>(p, seq, m0);
    const int q_stride = p.q_heads * D, kv_stride = p.kv_heads * D;
    const size_t q_at = static_cast<size_t>(seq.start + m0) * q_stride + h * D;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

    if (rows.valid > 0) {
        const int kv_head = h / (p.q_heads / p.kv_heads);
        const T* k = static_cast<const T*>(p.k) + static_cast<size_t>(seq.start) * kv_stride + kv_head * D;
        const T* v = static_cast<const T*>(p.v) + static_cast<size_t>(seq.start) * kv_stride + kv_head * D;
        const int n_tiles = div_ceil(CAUSAL ? m0 + rows.valid : seq.len, BN);
        load_tile_async<T, D, kBlockM>(sQ, static_cast<const T*>(p.q) + q_at, q_stride, rows.valid);
        load_tile_async<T, D, kBlockM>(sdO, static_cast<const T*>(p.dout) + q_at, q_stride, rows.valid);
        load_kv_tile_async<T, D, BN>(sK, sV, k, v, kv_stride, 0, seq.len);
        cp_async_commit();

        // Per-row softmax statistics; rows past the sequence get lse = +inf, so P = 0.
        const float scale_log2 = p.scale * kLog2e;
        float lse_log2[2], delta[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int row = warp * 16 + lane / 4 + 8 * r;
            const size_t at = static_cast<size_t>(h) * p.tokens + seq.start + m0 + row;
            lse_log2[r] = row < rows.valid ? p.lse[at] * kLog2e : INFINITY;
            delta[r] = row < rows.valid ? p.delta[at] : 0.0f;
        }

        float acc[1][DT][4] = {};
        for (int j = 0; j < n_tiles; ++j) {
            const int n0 = j * BN;
            if (j + 1 < n_tiles) load_kv_tile_async<T, D, BN>(sK, sV, k, v, kv_stride, j + 1, seq.len);
            cp_async_commit();
            cp_async_wait<1>();
            __syncthreads();
            const T* sKj = sK + j % 2 * BN * D;
            const T* sVj = sV + j % 2 * BN * D;

            float s[1][NT][4] = {};
            warp_gemm_abt<T, D, 1, NT>(s, sQ, warp * 16, sKj);
            if (n0 + BN > seq.len || (CAUSAL && n0 + BN - 1 > m0)) mask_scores<CAUSAL, false>(s[0], m0 + warp * 16, n0, seq.len);
            float dp[1][NT][4] = {};
            warp_gemm_abt<T, D, 1, NT>(dp, sdO, warp * 16, sVj);
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const float pr = exp2f(fmaf(s[0][nt][e], scale_log2, -lse_log2[e / 2]));
                    s[0][nt][e] = pr * (dp[0][nt][e] - delta[e / 2]);  // dS, unscaled
                }
            }
            uint32_t pa[1][NT / 2][4];
            to_a_fragments<T, NT>(pa[0], s[0]);
            warp_gemm_pb<T, D, 1, NT / 2>(acc, pa, sKj);
            __syncthreads();
        }
#pragma unroll
        for (int dt = 0; dt < DT; ++dt)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[0][dt][e] *= p.scale;
        stage_accumulator<T, D>(sQ, warp * 16, acc[0]);
        __syncthreads();
    }
    store_tile<T, D, kBlockM>(static_cast<T*>(p.dq) + q_at, q_stride, sQ, rows);
}

/// Query rows per inner step of the dK/dV pass: 32 at D = 128 keeps the
/// per-warp S^T and dP^T tiles small enough to stay in registers next to the
/// dK and dV accumulators.
template <int D>
constexpr int kDkdvStepRows = D >= 128 ? 32 : 64;

/// Dynamic shared memory of the dK/dV kernel: K, V, 2 x Q, 2 x dO tiles,
/// then 2 x (lse, delta) rows in fp32.
template <typename T, int D>
constexpr int kDkdvSmem = (2 * kBlockN + 4 * kDkdvStepRows<D>)*D * static_cast<int>(sizeof(T)) + 4 * kDkdvStepRows<D> * static_cast<int>(sizeof(float));

/// dK and dV for 64 keys of one kv head: loops over the query tiles of every
/// query head that reads this kv head.
template <typename T, int D, bool CAUSAL>
__device__ __forceinline__ void backward_dkdv(const AttentionParams& p) {
    constexpr int BM = kDkdvStepRows<D>;
    constexpr int MT = BM / 8;
    constexpr int DT = D / 8;
    static_assert(kDkdvSmem<T, D> <= kMaxSmem, "dK/dV tiles fit in shared memory");
    PLATYPUS_DYNAMIC_SMEM(T, smem);
    T* sK = smem;
    T* sV = sK + kBlockN * D;
    T* sQ = sV + kBlockN * D;  // [2][BM][D]
    T* sdO = sQ + 2 * BM * D;  // [2][BM][D]
    float* sLse = reinterpret_cast<float*>(sdO + 2 * BM * D);  // [2][BM], log2-scaled
    float* sDelta = sLse + 2 * BM;                             // [2][BM]

    const int n0 = blockIdx.x * kBlockN, kv_head = blockIdx.y;
    const Sequence seq = sequence(p, blockIdx.z);
    const TileRows keys = tile_rows<kBlockN>(p, seq, n0);
    const int q_stride = p.q_heads * D, kv_stride = p.kv_heads * D;
    const size_t kv_at = static_cast<size_t>(seq.start + n0) * kv_stride + kv_head * D;
    const int warp = threadIdx.x / 32;

    if (keys.valid > 0) {
        const int group = p.q_heads / p.kv_heads;
        const int first_tile = CAUSAL ? n0 / BM : 0;  // earlier query tiles see none of these keys
        const int tiles_per_head = div_ceil(seq.len, BM) - first_tile;
        const int steps = group * tiles_per_head;
        // Issues the loads of step `it` (query head, query tile) into buffer it % 2.
        auto load_step = [&](int it) {
            const int h = kv_head * group + it / tiles_per_head;
            const int m = (first_tile + it % tiles_per_head) * BM;
            const int valid = min(BM, seq.len - m);
            const size_t q_at = static_cast<size_t>(seq.start + m) * q_stride + h * D;
            const int buf = it % 2;
            load_tile_async<T, D, BM>(sQ + buf * BM * D, static_cast<const T*>(p.q) + q_at, q_stride, valid);
            load_tile_async<T, D, BM>(sdO + buf * BM * D, static_cast<const T*>(p.dout) + q_at, q_stride, valid);
            for (int i = threadIdx.x; i < BM; i += kThreads) {
                const size_t at = static_cast<size_t>(h) * p.tokens + seq.start + m + i;
                sLse[buf * BM + i] = i < valid ? p.lse[at] * kLog2e : INFINITY;
                sDelta[buf * BM + i] = i < valid ? p.delta[at] : 0.0f;
            }
        };
        load_tile_async<T, D, kBlockN>(sK, static_cast<const T*>(p.k) + kv_at, kv_stride, keys.valid);
        load_tile_async<T, D, kBlockN>(sV, static_cast<const T*>(p.v) + kv_at, kv_stride, keys.valid);
        load_step(0);
        cp_async_commit();

        const float scale_log2 = p.scale * kLog2e;
        const int lane = threadIdx.x % 32;
        float dk[1][DT][4] = {}, dv[1][DT][4] = {};
        for (int it = 0; it < steps; ++it) {
            if (it + 1 < steps) load_step(it + 1);
            cp_async_commit();
            cp_async_wait<1>();
            __syncthreads();
            const int buf = it % 2;
            const int m = (first_tile + it % tiles_per_head) * BM;
            const T* sQi = sQ + buf * BM * D;
            const T* sdOi = sdO + buf * BM * D;

            float st[1][MT][4] = {};  // S^T: this warp's 16 keys x BM queries
            warp_gemm_abt<T, D, 1, MT>(st, sK, warp * 16, sQi);
            if (CAUSAL && m < n0 + kBlockN - 1) mask_scores<CAUSAL, true>(st[0], n0 + warp * 16, m, seq.len);
            float dpt[1][MT][4] = {};
            warp_gemm_abt<T, D, 1, MT>(dpt, sV, warp * 16, sdOi);
#pragma unroll
            for (int nt = 0; nt < MT; ++nt) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int col = buf * BM + nt * 8 + 2 * (lane % 4) + e % 2;
                    st[0][nt][e] = exp2f(fmaf(st[0][nt][e], scale_log2, -sLse[col]));  // P^T
                    dpt[0][nt][e] = st[0][nt][e] * (dpt[0][nt][e] - sDelta[col]);      // dS^T, unscaled
                }
            }
            uint32_t pa[1][MT / 2][4];
            to_a_fragments<T, MT>(pa[0], st[0]);
            warp_gemm_pb<T, D, 1, MT / 2>(dv, pa, sdOi);
            to_a_fragments<T, MT>(pa[0], dpt[0]);
            warp_gemm_pb<T, D, 1, MT / 2>(dk, pa, sQi);
            __syncthreads();
        }
#pragma unroll
        for (int dt = 0; dt < DT; ++dt)
#pragma unroll
            for (int e = 0; e < 4; ++e) dk[0][dt][e] *= p.scale;
        stage_accumulator<T, D>(sK, warp * 16, dk[0]);
        stage_accumulator<T, D>(sV, warp * 16, dv[0]);
        __syncthreads();
    }
    store_tile<T, D, kBlockN>(static_cast<T*>(p.dk) + kv_at, kv_stride, sK, keys);
    store_tile<T, D, kBlockN>(static_cast<T*>(p.dv) + kv_at, kv_stride, sV, keys);
}

// ---- KV cache ----------------------------------------------------------------------------------

constexpr int kCacheThreads = 256;
/// The 16-byte unit of the cache write.
using Unit16 = Vec<uint32_t, 4>;

/// Thread i of block (x, b) copies unit x * kCacheThreads + i of sequence
/// b's new rows into the cache (U: the 16-, 4- or 2-byte unit).
template <typename U>
__device__ __forceinline__ void write_cache(const CacheWriteParams& p) {
    const int64_t i = static_cast<int64_t>(blockIdx.x) * kCacheThreads + threadIdx.x;
    if (i >= p.units) return;
    const int64_t b = blockIdx.y;
    const U* src = static_cast<const U*>(p.src) + b * p.units + i;
    U* dst = static_cast<U*>(p.dst) + b * p.dst_seq_units + p.dst_offset_units + i;
    *vector_at<U>(dst) = *vector_at<U>(src);
}

}  // namespace attn
}  // namespace platypus

#define WRITE_CACHE_KERNEL(name, U)                                                                              \
    extern "C" __global__ void __launch_bounds__(platypus::attn::kCacheThreads) name(CacheWriteParams p) { \
        platypus::attn::write_cache<U>(p);                                                                       \
    }                                                                                                            \
    PLATYPUS_EXPORT_KERNEL(name)

WRITE_CACHE_KERNEL(attention_write_cache_16b, platypus::attn::Unit16)
WRITE_CACHE_KERNEL(attention_write_cache_4b, uint32_t)
WRITE_CACHE_KERNEL(attention_write_cache_2b, uint16_t)

// One extern "C" entry point per (dtype, head dim, causal); the launcher in
// src/ops/attention.rs picks the name and the shared-memory size.
#define ATTENTION_KERNEL(name, body)                                                       \
    extern "C" __global__ void __launch_bounds__(platypus::attn::kThreads, 1) name(AttentionParams p) { body; } \
    PLATYPUS_EXPORT_KERNEL(name)

#define ATTENTION_VARIANT(T, tname, D, CAUSAL, cname)                                                              \
    ATTENTION_KERNEL(attention_forward_##tname##_d##D##cname, (platypus::attn::forward<T, D, CAUSAL>(p)))          \
    ATTENTION_KERNEL(attention_backward_dq_##tname##_d##D##cname, (platypus::attn::backward_dq<T, D, CAUSAL>(p)))   \
    ATTENTION_KERNEL(attention_backward_dkdv_##tname##_d##D##cname, (platypus::attn::backward_dkdv<T, D, CAUSAL>(p)))

#define ATTENTION_HEAD_DIM(T, tname, D)                                                            \
    ATTENTION_VARIANT(T, tname, D, false, )                                                        \
    ATTENTION_VARIANT(T, tname, D, true, _causal)                                                  \
    ATTENTION_KERNEL(attention_backward_delta_##tname##_d##D, (platypus::attn::backward_delta<T, D>(p)))

ATTENTION_HEAD_DIM(__nv_bfloat16, bf16, 16)
ATTENTION_HEAD_DIM(__nv_bfloat16, bf16, 32)
ATTENTION_HEAD_DIM(__nv_bfloat16, bf16, 64)
ATTENTION_HEAD_DIM(__nv_bfloat16, bf16, 128)
ATTENTION_HEAD_DIM(__half, f16, 16)
ATTENTION_HEAD_DIM(__half, f16, 32)
ATTENTION_HEAD_DIM(__half, f16, 64)
ATTENTION_HEAD_DIM(__half, f16, 128)
