// Batched cosine-similarity search on tensor cores: for every query the k most
// similar database rows (top-k), or every pair at or above a threshold,
// without ever writing the m x n score matrix.
//
//   cosine_prepare_{f32,f16,bf16}  one warp per row of a set x [rows, dim]:
//       inv_norm[r] = 1 / |x_r| (0 for a zero row; fp32 sum of squares) and
//       the 16-bit GEMM operand [rows, ld]: the row as it is (f16, bf16), or
//       from f32 two bf16 halves hi = bf16(x), lo = bf16(x - hi), laid out
//       [hi | hi | lo] for queries and [hi | lo | hi] for the database, so one
//       GEMM over K = 3 dim sums hi.hi + hi.lo + lo.hi: about 16 significant
//       bits (the dropped lo.lo term is ~2^-16 of the product).
//       Traffic: rows * dim reads, rows * ld 16-bit writes, 128-bit loads
//       when rows are 16-byte aligned.
//   cosine_topk_{f16,bf16}  block = 128 queries x one split of the database
//       (blockIdx.y), 4 warps. Per 64-row database tile: S = Q D^T on tensor
//       cores (the shared GEMM mainloop, gemm.cuh), times q_inv[i] * db_inv[j]
//       in the epilogue. Each warp selects for the 32 query rows it computed:
//       if no score in its registers reaches its row's current k-th best
//       (the "floor"), the warp is done with the tile after one compare per
//       score, which is the common case once the lists fill. Otherwise its
//       rows go to shared memory (over the drained pipeline buffers) and the
//       warp takes one row at a time: lanes test 32 scores against the
//       floor, a ballot appends the winners to the row's 32-entry candidate
//       buffer; a full buffer is sorted (warp bitonic sort) and merged into
//       the row's sorted list, which lives in global memory (list_scores /
//       list_index, one per split), raising the floor. List traffic is that
//       of the rare merges. The database is read once per 128 queries;
//       blocks of the same split run side by side and share it through L2.
//   cosine_merge  one warp per query: the best k of several sorted lists (the
//       splits, or a streamed chunk and the running result).
//   cosine_threshold_{f16,bf16}  the same similarity tiles; every allowed
//       pair with S >= threshold takes a slot from one warp-aggregated 64-bit
//       atomicAdd per warp and tile and is written if the slot is below the
//       capacity. The count is exact either way, so the caller can see an
//       overflow and run again with room for every pair.
//
// Order everywhere: higher score first, then lower database index (a strict
// total order on distinct indices), so results are deterministic and do not
// depend on splits or chunks. Empty list slots hold (-inf, kNoIndex).
#include "gemm.cuh"

namespace platypus {
namespace cosine {

constexpr int kBM = 128;           // queries per block
constexpr int kBN = 64;            // database rows per tile
constexpr int kWarps = 4;          // each warp computes 32 x 64 of a tile
constexpr int kThreads = 32 * kWarps;
constexpr int kBuffer = 32;        // candidates held per query between merges
constexpr int kLds = kBN + 8;      // fp32 row stride of the score tile: conflict-free float2 stores
constexpr uint32_t kNoIndex = 0xffffffffu;
enum Exclude : int { kNothing = 0, kSameIndex = 1, kNotEarlier = 2 };

template <typename T>
using Tile = gemm::Gemm<T, true, true, kBM, kBN, kWarps, 1>;

/// Shared memory of the search kernels: the pipeline, which the score tile
/// reuses between database tiles, then (top-k only) the candidate buffers,
/// their counts and each query's floor.
template <typename T>
constexpr int kPipelineSmem = gemm::kSmem<T, true, true, kBM, kBN, kWarps, 1>;
static_assert(kBM * kLds * 4 <= kPipelineSmem<__half>, "the score tile fits in the pipeline buffers");

/// True if (as, ai) comes before (bs, bi): higher score, then lower index.
__device__ __forceinline__ bool better(float as, uint32_t ai, float bs, uint32_t bi) { return as > bs || (as == bs && ai < bi); }

/// Sorts one (score, index) per lane across the warp, best first (bitonic).
__device__ __forceinline__ void warp_sort(float& s, uint32_t& i) {
    const int lane = threadIdx.x % 32;
#pragma unroll
    for (int size = 2; size <= 32; size *= 2) {
#pragma unroll
        for (int stride = size / 2; stride > 0; stride /= 2) {
            const float os = __shfl_xor_sync(kFullMask, s, stride);
            const uint32_t oi = __shfl_xor_sync(kFullMask, i, stride);
            // The pair's lower lane keeps the better element in a best-first run.
            const bool keep_better = ((lane & stride) == 0) == ((lane & size) == 0);
            if (keep_better ? better(os, oi, s, i) : better(s, i, os, oi)) {
                s = os;
                i = oi;
            }
        }
    }
}

/// In place, one warp: list[0..k) := the best k of list[0..k) and a chunk
/// of lb <= 32 entries held one per lane (lane q: chunk entry q; lanes >= lb
/// hold anything), both sorted best first and with no index in common.
///
/// An entry's new position is its old one plus the number of entries of
/// the other side that precede it (list entries win ties, so equal empty
/// slots keep their order). List entries only move down, so the list is
/// walked in 32-entry blocks from its end, each block read before any lane
/// writes into it; the chunk's positions are found before anything moves.
///
/// One __syncwarp per block, between its reads and its writes, is all the
/// ordering this needs: the binary search's reads come before the first
/// block's; a block's writes land at or past its base, where later blocks
/// never read; the chunk's writes come after the last block's. The caller
/// must have ordered its own writes to the list before the call; the
/// __syncwarp at the end publishes the merged list.
__device__ __forceinline__ void merge_chunk(float* ls, uint32_t* li, int k, float cs, uint32_t ci, int lb) {
    const int lane = threadIdx.x % 32;
    int chunk_pos = k;
    if (lane < lb) {
        int lo = 0, hi = k;  // list entries not after the chunk entry form a prefix
        while (lo < hi) {
            const int mid = (lo + hi) / 2;
            if (better(cs, ci, ls[mid], li[mid])) {
                hi = mid;
            } else {
                lo = mid + 1;
            }
        }
        chunk_pos = lane + lo;
    }
    for (int base = (k - 1) / 32 * 32; base >= 0; base -= 32) {
        const int p = base + lane;
        float s = -INFINITY;
        uint32_t i = kNoIndex;
        if (p < k) {
            s = ls[p];
            i = li[p];
        }
        // Chunk entries before (s, i): a binary search over the lanes.
        int before = 0;
#pragma unroll
        for (int step = 32; step > 0; step /= 2) {
            const int at = before + step - 1;
            const float as = __shfl_sync(kFullMask, cs, at & 31);
            const uint32_t ai = __shfl_sync(kFullMask, ci, at & 31);
            if (at < lb && better(as, ai, s, i)) before += step;
        }
        __syncwarp();
        if (p < k && p + before < k) {
            ls[p + before] = s;
            li[p + before] = i;
        }
    }
    if (chunk_pos < k) {
        ls[chunk_pos] = cs;
        li[chunk_pos] = ci;
    }
    __syncwarp();
}

/// Per-block shared state of the top-k search, after the pipeline buffers.
struct TopkState {
    float buf_score[kBM][kBuffer];
    uint32_t buf_index[kBM][kBuffer];
    int count[kBM];
    float floor_score[kBM];
    uint32_t floor_index[kBM];
};

/// Merges query row `qi`'s candidate buffer into its list and raises its
/// floor to the list's last entry. One warp; every caller has ordered the
/// buffer and count writes before the call (select_tile ends each append
/// with a __syncwarp, the final flushes follow the tile loop's
/// __syncthreads), and the __syncwarp at the end publishes count and floor.
__device__ __forceinline__ void flush(TopkState& st, int qi, float* ls, uint32_t* li, int k) {
    const int lane = threadIdx.x % 32;
    const int cnt = st.count[qi];
    float s = lane < cnt ? st.buf_score[qi][lane] : -INFINITY;
    uint32_t i = lane < cnt ? st.buf_index[qi][lane] : kNoIndex;
    warp_sort(s, i);
    merge_chunk(ls, li, k, s, i, cnt);
    if (lane == 0) {
        st.count[qi] = 0;
        st.floor_score[qi] = ls[k - 1];
        st.floor_index[qi] = li[k - 1];
    }
    __syncwarp();
}

/// acc := this warp's part of Q D^T for the tile (m0, n0). Ends with a
/// barrier after which the pipeline buffers are free.
template <typename T>
__device__ __forceinline__ void similarity_tile(float (&acc)[Tile<T>::MW][Tile<T>::NW][4], const CosineSearchParams& p, T* smem, int m0, int n0) {
    const int wm0 = threadIdx.x / 32 * (kBM / kWarps);
#pragma unroll
    for (int mw = 0; mw < Tile<T>::MW; ++mw)
#pragma unroll
        for (int nw = 0; nw < Tile<T>::NW; ++nw)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[mw][nw][e] = 0.0f;
    Tile<T>::run(acc, smem, static_cast<const T*>(p.q), p.ld, static_cast<const T*>(p.db), p.ld, p.m, p.n, 0, p.ld, m0, n0, wm0, 0,
                 gemm::NoStageHook{});
}

/// Tile row of this thread's accumulator rows: r = 2 mw + h is row
/// 16 mw + lane/4 + 8 h of the warp's 32 rows.
__device__ __forceinline__ int thread_row(int r) { return threadIdx.x / 32 * (kBM / kWarps) + 16 * (r / 2) + threadIdx.x % 32 / 4 + 8 * (r % 2); }

/// Calls `visit(r, row, col, score)` for every element of this thread's part
/// of a similarity tile: score = acc * q_inv[i] * db_inv[j], or -inf where
/// the pair does not exist (past m or n) or is excluded. row and col are
/// tile-relative; acc element (mw, nw, 2h + e) is row thread_row(r), r =
/// 2 mw + h, column 8 nw + 2 (lane % 4) + e.
template <typename T, typename Visit>
__device__ __forceinline__ void for_each_score(const float (&acc)[Tile<T>::MW][Tile<T>::NW][4], const CosineSearchParams& p, int m0, int n0, Visit visit) {
    const int lane = threadIdx.x % 32;
    float db_scale[Tile<T>::NW][2];  // this thread's 16 columns, loaded once per tile
#pragma unroll
    for (int nw = 0; nw < Tile<T>::NW; ++nw)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
            const int col = 8 * nw + 2 * (lane % 4) + e;
            db_scale[nw][e] = n0 + col < p.n ? p.db_inv[n0 + col] : 0.0f;
        }
#pragma unroll
    for (int mw = 0; mw < Tile<T>::MW; ++mw) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int r = 2 * mw + h;
            const int row = thread_row(r);
            const bool row_ok = m0 + row < p.m;
            const float qs = row_ok ? p.q_inv[m0 + row] : 0.0f;
            const uint32_t qg = p.query_base + static_cast<uint32_t>(m0 + row);
#pragma unroll
            for (int nw = 0; nw < Tile<T>::NW; ++nw) {
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int col = 8 * nw + 2 * (lane % 4) + e;
                    const uint32_t jg = p.index_base + static_cast<uint32_t>(n0 + col);
                    const bool ok = row_ok && n0 + col < p.n && !(p.exclude == kSameIndex && jg == qg) && !(p.exclude == kNotEarlier && jg >= qg);
                    visit(r, row, col, ok ? acc[mw][nw][2 * h + e] * qs * db_scale[nw][e] : -INFINITY);
                }
            }
        }
    }
}

/// One past the last database row block (m0, split) must look at: the end
/// of its split, and for j < i searches the last query's global index.
__device__ __forceinline__ int split_end(const CosineSearchParams& p, int m0, int split_begin) {
    int end = min(p.n, split_begin + p.rows_per_split);
    if (p.exclude == kNotEarlier) {
        const int64_t last_query = static_cast<int64_t>(p.query_base) + min(p.m, m0 + kBM) - 1;
        const int64_t earlier = last_query - static_cast<int64_t>(p.index_base);  // local rows j < last query
        if (earlier < end) end = static_cast<int>(earlier < 0 ? 0 : earlier);
    }
    return end;
}

/// Offers this warp's rows of a similarity tile to their lists: the scores
/// go to shared memory, then per query row the lanes test 32 scores at a
/// time against its floor and a ballot appends the winners to its buffer
/// (flushed into the list when full).
template <typename T, typename ListOf>
__device__ __forceinline__ void select_tile(const float (&acc)[Tile<T>::MW][Tile<T>::NW][4], const CosineSearchParams& p, TopkState& st, float* scores,
                                            int m0, int n0, int row0, int row_end, ListOf list_of) {
    const int lane = threadIdx.x % 32;
    for_each_score<T>(acc, p, m0, n0, [&](int, int row, int col, float s) { scores[row * kLds + col] = s; });
    __syncwarp();  // the warp's rows of the score tile are complete
    for (int qi = row0; qi < row_end; ++qi) {
        float* ls;
        uint32_t* li;
        list_of(qi, ls, li);
#pragma unroll
        for (int half = 0; half < kBN / 32; ++half) {
            const int col = half * 32 + lane;
            const float s = scores[qi * kLds + col];
            const uint32_t j = p.index_base + static_cast<uint32_t>(n0 + col);
            bool take = s != -INFINITY && better(s, j, st.floor_score[qi], st.floor_index[qi]);
            unsigned ballot = __ballot_sync(kFullMask, take);
            if (ballot == 0) continue;
            if (st.count[qi] + __popc(ballot) > kBuffer) {
                flush(st, qi, ls, li, p.k);
                take = take && better(s, j, st.floor_score[qi], st.floor_index[qi]);
                ballot = __ballot_sync(kFullMask, take);
            }
            const int cnt = st.count[qi];
            if (take) {
                const int slot = cnt + __popc(ballot & ((1u << lane) - 1u));
                st.buf_score[qi][slot] = s;
                st.buf_index[qi][slot] = j;
            }
            __syncwarp();
            if (lane == 0) st.count[qi] = cnt + __popc(ballot);
            __syncwarp();
        }
    }
}

template <typename T>
__device__ __forceinline__ void topk(const CosineSearchParams& p) {
    PLATYPUS_DYNAMIC_SMEM(T, smem);
    float* scores = reinterpret_cast<float*>(smem);  // [kBM][kLds], over the pipeline buffers
    TopkState& st = *reinterpret_cast<TopkState*>(reinterpret_cast<unsigned char*>(smem) + kPipelineSmem<T>);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int m0 = blockIdx.x * kBM;
    const int split_begin = blockIdx.y * p.rows_per_split;
    const size_t list0 = (static_cast<size_t>(blockIdx.y) * p.m) * p.k;
    auto list_of = [&](int qi, float*& ls, uint32_t*& li) {
        ls = p.list_scores + list0 + static_cast<size_t>(m0 + qi) * p.k;
        li = p.list_index + list0 + static_cast<size_t>(m0 + qi) * p.k;
    };

    // A warp selects for the 32 query rows it computes: row0 .. row_end.
    const int row0 = warp * (kBM / kWarps);
    const int row_end = min(row0 + kBM / kWarps, p.m - m0);

    // Empty lists for the warp's rows, and empty buffers and floors for all
    // 32 of them (the tile-skip test reads the floors of rows past m too,
    // whose scores are all -inf). The __syncwarp publishes lane 0's counts:
    // a split with no tile to search goes straight to the final loop.
    for (int qi = row0; qi < row0 + kBM / kWarps; ++qi) {
        if (qi < row_end) {
            float* ls;
            uint32_t* li;
            list_of(qi, ls, li);
            for (int c = lane; c < p.k; c += 32) {
                ls[c] = -INFINITY;
                li[c] = kNoIndex;
            }
        }
        if (lane == 0) {
            st.count[qi] = 0;
            st.floor_score[qi] = -INFINITY;
            st.floor_index[qi] = kNoIndex;
        }
    }
    __syncwarp();

    const int end = split_end(p, m0, split_begin);
    for (int n0 = split_begin; n0 < end; n0 += kBN) {
        float acc[Tile<T>::MW][Tile<T>::NW][4];
        similarity_tile<T>(acc, p, smem, m0, n0);
        // Most tiles hold nothing for a warp's rows once their lists fill:
        // then it skips the tile after one compare per score in registers
        // (>= the floor's score: ties are settled by index below).
        float floor[2 * Tile<T>::MW];  // the floors of this thread's rows
#pragma unroll
        for (int r = 0; r < 2 * Tile<T>::MW; ++r) floor[r] = st.floor_score[thread_row(r)];
        bool any = false;
        for_each_score<T>(acc, p, m0, n0, [&](int r, int, int, float s) { any = any || (s != -INFINITY && s >= floor[r]); });
        if (__any_sync(kFullMask, any)) select_tile<T>(acc, p, st, scores, m0, n0, row0, row_end, list_of);
        __syncthreads();  // every warp is done with the score tile: the pipeline may refill it
    }
    for (int qi = row0; qi < row_end; ++qi) {
        float* ls;
        uint32_t* li;
        list_of(qi, ls, li);
        if (st.count[qi] > 0) flush(st, qi, ls, li, p.k);
    }
}

template <typename T>
__device__ __forceinline__ void threshold(const CosineSearchParams& p) {
    PLATYPUS_DYNAMIC_SMEM(T, smem);
    const int lane = threadIdx.x % 32;
    const int m0 = blockIdx.x * kBM;
    const int split_begin = blockIdx.y * p.rows_per_split;
    const int end = split_end(p, m0, split_begin);
    for (int n0 = split_begin; n0 < end; n0 += kBN) {
        // Pass 1 counts this thread's pairs, pass 2 writes them at the
        // warp's slots: one atomic per warp and tile.
        float acc[Tile<T>::MW][Tile<T>::NW][4];
        similarity_tile<T>(acc, p, smem, m0, n0);
        int mine = 0;
        for_each_score<T>(acc, p, m0, n0, [&](int, int, int, float s) { mine += s >= p.threshold; });
        int before = mine;  // inclusive prefix sum over the lanes
#pragma unroll
        for (int d = 1; d < 32; d *= 2) {
            const int v = __shfl_up_sync(kFullMask, before, d);
            if (lane >= d) before += v;
        }
        const int total = __shfl_sync(kFullMask, before, 31);
        unsigned long long base = 0;
        if (total > 0) {
            if (lane == 31) base = atomicAdd(p.pair_count, static_cast<unsigned long long>(total));
            base = __shfl_sync(kFullMask, base, 31);
        }
        unsigned long long slot = base + static_cast<unsigned>(before - mine);
        if (mine > 0) {
            for_each_score<T>(acc, p, m0, n0, [&](int, int row, int col, float s) {
                if (s >= p.threshold) {
                    if (slot < p.capacity) {
                        p.pair_query[slot] = p.query_base + static_cast<uint32_t>(m0 + row);
                        p.pair_item[slot] = p.index_base + static_cast<uint32_t>(n0 + col);
                        p.pair_score[slot] = s;
                    }
                    ++slot;
                }
            });
        }
    }
}

/// Stores the N values of run `v` at out[c0..] (c0 + i < dim only, unless VECTOR).
template <typename Out, int N, bool VECTOR>
__device__ __forceinline__ void store_prepared(Out* out, int c0, int dim, const float (&v)[N]) {
    if constexpr (VECTOR) {
        store_run<Out, N, true>(out + c0, v);
    } else {
#pragma unroll
        for (int i = 0; i < N; ++i)
            if (c0 + i < dim) out[c0 + i] = from_float<Out>(v[i]);
    }
}

/// One warp per row; lane l takes runs of N = 16 bytes of input at columns
/// l N, l N + 32 N, ...: one 128-bit load per run when VECTOR (rows 16-byte
/// aligned, dim a multiple of N), else N element loads.
template <typename In, typename Out, bool SPLIT, bool VECTOR>
__device__ __forceinline__ void prepare(const CosinePrepareParams& p) {
    constexpr int N = 16 / static_cast<int>(sizeof(In));
    const int lane = threadIdx.x % 32;
    const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (row >= p.rows) return;  // whole warps
    const In* x = static_cast<const In*>(p.x) + static_cast<size_t>(row) * p.dim;
    Out* out = static_cast<Out*>(p.out) + static_cast<size_t>(row) * p.ld;
    float sum = 0.0f;
    bool finite = true;
    for (int c0 = lane * N; c0 < p.dim; c0 += 32 * N) {
        float v[N];
        if constexpr (VECTOR) {
            load_run<In, N, true>(x + c0, v);
        } else {
#pragma unroll
            for (int i = 0; i < N; ++i) v[i] = c0 + i < p.dim ? to_float(x[c0 + i]) : 0.0f;
        }
#pragma unroll
        for (int i = 0; i < N; ++i) {
            finite = finite && isfinite(v[i]);
            sum = fmaf(v[i], v[i], sum);
        }
        if constexpr (SPLIT) {
            float hi[N], lo[N];
#pragma unroll
            for (int i = 0; i < N; ++i) {
                hi[i] = to_float(from_float<Out>(v[i]));
                lo[i] = v[i] - hi[i];
            }
            store_prepared<Out, N, VECTOR>(out, c0, p.dim, hi);
            store_prepared<Out, N, VECTOR>(out + p.dim, c0, p.dim, p.database ? lo : hi);
            store_prepared<Out, N, VECTOR>(out + 2 * p.dim, c0, p.dim, p.database ? hi : lo);
        } else {
            store_prepared<Out, N, VECTOR>(out, c0, p.dim, v);
        }
    }
    for (int c = (SPLIT ? 3 : 1) * p.dim + lane; c < p.ld; c += 32) out[c] = from_float<Out>(0.0f);
    sum = warp_sum(sum);
    finite = __all_sync(kFullMask, finite);
    if (lane == 0) {
        const bool bad = !finite || !isfinite(sum);
        p.inv_norm[row] = (bad || sum == 0.0f) ? 0.0f : 1.0f / sqrtf(sum);
        if (bad) atomicMin(p.bad_row, p.row_base + row);
    }
}

/// out[q] := the best k of lists[0..lists)[q]; one warp per query.
__device__ __forceinline__ void merge(const CosineMergeParams& p) {
    const int lane = threadIdx.x % 32;
    const int q = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (q >= p.m) return;  // whole warps
    const size_t stride = static_cast<size_t>(p.m) * p.k;
    float* ls = p.out_scores + static_cast<size_t>(q) * p.k;
    uint32_t* li = p.out_index + static_cast<size_t>(q) * p.k;
    if (ls != p.in_scores + static_cast<size_t>(q) * p.k) {
        for (int c = lane; c < p.k; c += 32) {
            ls[c] = p.in_scores[static_cast<size_t>(q) * p.k + c];
            li[c] = p.in_index[static_cast<size_t>(q) * p.k + c];
        }
        __syncwarp();
    }
    for (int l = 1; l < p.lists; ++l) {
        const float* bs = p.in_scores + l * stride + static_cast<size_t>(q) * p.k;
        const uint32_t* bi = p.in_index + l * stride + static_cast<size_t>(q) * p.k;
        for (int c0 = 0; c0 < p.k; c0 += 32) {
            // Sorted chunks: once one cannot beat the list's last entry, none after it can.
            if (!better(bs[c0], bi[c0], ls[p.k - 1], li[p.k - 1])) break;
            const int lb = min(32, p.k - c0);
            const float cs = lane < lb ? bs[c0 + lane] : -INFINITY;
            const uint32_t ci = lane < lb ? bi[c0 + lane] : kNoIndex;
            merge_chunk(ls, li, p.k, cs, ci, lb);
        }
    }
}

}  // namespace cosine
}  // namespace platypus

// ---- entry points ------------------------------------------------------------------------------

#define COSINE_PREPARE(name, In, Out, split)                                                                            \
    extern "C" __global__ void __launch_bounds__(256) name(CosinePrepareParams p) {                                     \
        if (p.vectorized) {                                                                                           \
            platypus::cosine::prepare<In, Out, split, true>(p);                                                       \
        } else {                                                                                                      \
            platypus::cosine::prepare<In, Out, split, false>(p);                                                      \
        }                                                                                                             \
    }                                                                                                                 \
    PLATYPUS_EXPORT_KERNEL(name)

COSINE_PREPARE(cosine_prepare_f32, float, __nv_bfloat16, true)
COSINE_PREPARE(cosine_prepare_bf16, __nv_bfloat16, __nv_bfloat16, false)
COSINE_PREPARE(cosine_prepare_f16, __half, __half, false)

#define COSINE_SEARCH(T, tname)                                                                                                     \
    extern "C" __global__ void __launch_bounds__(platypus::cosine::kThreads, 2) cosine_topk_##tname(CosineSearchParams p) {            \
        platypus::cosine::topk<T>(p);                                                                                               \
    }                                                                                                                               \
    PLATYPUS_EXPORT_KERNEL(cosine_topk_##tname)                                                                                     \
    extern "C" __global__ void __launch_bounds__(platypus::cosine::kThreads, 2) cosine_threshold_##tname(CosineSearchParams p) {       \
        platypus::cosine::threshold<T>(p);                                                                                          \
    }                                                                                                                               \
    PLATYPUS_EXPORT_KERNEL(cosine_threshold_##tname)

COSINE_SEARCH(__nv_bfloat16, bf16)
COSINE_SEARCH(__half, f16)

extern "C" __global__ void __launch_bounds__(128) cosine_merge(CosineMergeParams p) { platypus::cosine::merge(p); }
PLATYPUS_EXPORT_KERNEL(cosine_merge)
