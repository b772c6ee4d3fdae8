// Parameter structs shared by the kernels and the Rust launchers.
//
// Every kernel takes one of these by value as its only argument. build.rs
// turns this header into Rust with bindgen, so both sides read one
// declaration and the ABI cannot drift. Plain C: fixed-width integers,
// untyped pointers (the kernel name fixes the element type).
#ifndef PLATYPUS_PARAMS_H
#define PLATYPUS_PARAMS_H

#include <stdint.h>

/// RMSNorm forward: y[r, :] = w * x[r, :] * rsqrt(mean(x[r, :]^2) + eps).
typedef struct RmsNormForwardParams {
    const void* x;      ///< [rows, hidden]
    const void* w;      ///< [hidden]
    void* y;            ///< [rows, hidden]
    int32_t rows;
    int32_t hidden;
    float eps;
    int32_t vectorized; ///< 1 if every row of x, w and y is 16-byte aligned: use 128-bit accesses
} RmsNormForwardParams;

/// LayerNorm as BERT computes it (biased variance, torch's nn.LayerNorm):
/// v = x[r, :] (+ delta[r, :], rounded to the storage type, when delta is
/// not null), y[r, :] = w * (v - mean(v)) * rsqrt(var(v) + eps) + b. y may
/// be x: the post-norm residual sublayer h = LayerNorm(h + delta) in place.
typedef struct LayerNormForwardParams {
    const void* x;      ///< [rows, hidden]
    const void* delta;  ///< [rows, hidden] or null
    const void* w;      ///< [hidden]
    const void* b;      ///< [hidden]
    void* y;            ///< [rows, hidden], may equal x
    int32_t rows;
    int32_t hidden;
    float eps;
    int32_t vectorized; ///< 1 if every row of x, delta, w, b and y is 16-byte aligned: use 128-bit accesses
} LayerNormForwardParams;

/// Residual add fused with RMSNorm: h[r, :] += delta[r, :] in place (rounded
/// to the storage type), then y[r, :] = rmsnorm(h[r, :]) of the rounded h.
typedef struct RmsNormAddForwardParams {
    void* h;            ///< [rows, hidden], read and written
    const void* delta;  ///< [rows, hidden]
    const void* w;      ///< [hidden]
    void* y;            ///< [rows, hidden]
    int32_t rows;
    int32_t hidden;
    float eps;
    int32_t vectorized; ///< 1 if every row of h, delta, w and y is 16-byte aligned: use 128-bit accesses
} RmsNormAddForwardParams;

/// RMSNorm backward: dx, and per-block partial sums of dw when dw_partial is
/// not null (reduced by rmsnorm_dw_reduce in a fixed order).
typedef struct RmsNormBackwardParams {
    const void* x;       ///< [rows, hidden]
    const void* w;       ///< [hidden]
    const void* dy;      ///< [rows, hidden]
    void* dx;            ///< [rows, hidden]
    float* dw_partial;   ///< [gridDim.x, hidden] fp32, or null for frozen weights
    int32_t rows;
    int32_t hidden;
    float eps;
    int32_t vectorized;  ///< as in RmsNormForwardParams, for x, w, dy and dx
} RmsNormBackwardParams;

/// Sum of the per-block partial dw rows, in block order: dw = sum_b partial[b, :].
typedef struct RmsNormDwReduceParams {
    const float* partial; ///< [parts, hidden]
    void* dw;             ///< [hidden]
    int32_t parts;
    int32_t hidden;
} RmsNormDwReduceParams;

/// Embedding gather: out[i, :] = table[ids[i], :], the table in its stored
/// type and out in its own (the kernel name fixes both). Every id is below
/// the vocabulary size (checked on the host).
typedef struct EmbeddingParams {
    const void* table;     ///< [vocab, hidden]
    const uint32_t* ids;   ///< [tokens]
    void* out;             ///< [tokens, hidden]
    int32_t tokens;
    int32_t hidden;
    int32_t vectorized;    ///< 1 if every row of table and out is 16-byte aligned: 128-bit accesses
    int32_t pad0;
} EmbeddingParams;

/// SwiGLU over n elements, forward (m = silu(gate) * up) or backward
/// (dgate = dm * up * silu'(gate), dup = dm * silu(gate)); the kernel name
/// says which, and the pointers the other one uses are null.
typedef struct SwigluParams {
    const void* gate;
    const void* up;
    void* m;               ///< forward output
    const void* dm;        ///< backward input
    void* dgate;           ///< backward outputs
    void* dup;
    int64_t n;
    int32_t vectorized;    ///< 1 if every pointer is 16-byte aligned: 128-bit accesses, a scalar tail
    int32_t pad0;
} SwigluParams;

/// Rotary position embedding, in place, on q [tokens, q_heads, head_dim] and
/// k [tokens, k_heads, head_dim] (tokens = batch * seq).
typedef struct RopeParams {
    void* q;
    void* k;                 ///< may be null when k_heads == 0
    const int32_t* positions; ///< [tokens]: position id of every token
    int32_t tokens;
    int32_t q_heads;
    int32_t k_heads;
    int32_t head_dim;        ///< even
    float theta;             ///< base of the frequencies: inv_freq[i] = theta^(-2i/head_dim)
    int32_t interleaved;     ///< 0: Hugging Face rotate_half pairs (i, i + d/2); 1: Meta pairs (2i, 2i + 1)
    int32_t inverse;         ///< 1: rotate by -angle (the backward pass)
    int32_t vectorized;      ///< 1 if rows of q and k are 16-byte aligned and head_dim allows 128-bit accesses
} RopeParams;

/// Flash attention, forward and backward (kernels/attention.cu). Tensors are
/// token-major: q, o, dout, dq [tokens, q_heads, D]; k, v, dk, dv [tokens,
/// kv_heads, D]; lse and delta [q_heads, tokens] fp32. Sequence b covers
/// tokens start_b .. start_b + len_b: packed batches (cu_seqlens not null)
/// have start_b = cu_seqlens[b], len_b = cu_seqlens[b + 1] - start_b; padded
/// batches have start_b = b * max_seqlen and len_b = seq_lens[b] (max_seqlen
/// when seq_lens is null), and their rows len_b .. max_seqlen are padding
/// that gets zero outputs and gradients.
///
/// Keys: with kv_seq_stride == 0 sequence b's keys are the rows of its
/// queries (self-attention). The forward kernel also takes a KV cache:
/// kv_seq_stride > 0 puts sequence b's keys at rows b * kv_seq_stride ..
/// b * kv_seq_stride + kv_len of k and v ([batch, kv_seq_stride, kv_heads,
/// D]), and the causal mask is aligned to the end: query i of a sequence of
/// len_b queries sees keys j <= i + (kv_len - len_b).
typedef struct AttentionParams {
    const void* q;
    const void* k;
    const void* v;
    const void* o;           ///< forward output (backward input)
    const void* dout;        ///< gradient of o (backward)
    void* out;               ///< forward: o; unused by the backward kernels
    float* lse;              ///< natural-log logsumexp of each score row (forward writes, backward reads)
    float* delta;            ///< rowsum(dout * o) (written by the backward pre-pass)
    void* dq;
    void* dk;
    void* dv;
    const int32_t* cu_seqlens; ///< [batch + 1] or null
    const int32_t* seq_lens;   ///< [batch] or null
    int32_t batch;
    int32_t max_seqlen;      ///< no sequence is longer; the padded length of padded batches
    int32_t tokens;
    int32_t q_heads;
    int32_t kv_heads;        ///< divides q_heads; query head h reads kv head h / (q_heads / kv_heads)
    float scale;             ///< softmax scale, usually 1 / sqrt(D)
    int32_t kv_seq_stride;   ///< 0: keys are the queries' rows; else rows of k, v between sequences' keys (forward only)
    int32_t kv_len;          ///< keys per sequence when kv_seq_stride > 0 (at most kv_seq_stride)
} AttentionParams;

/// Appends new rows to a KV cache (kernels/attention.cu): for every
/// sequence b, the `units` units of src starting at unit b * units copy to
/// dst from unit b * dst_seq_units + dst_offset_units on. A unit is the
/// kernel's access width (16, 4 or 2 bytes); units = new rows * row bytes /
/// unit, dst_seq_units = capacity * row bytes / unit, dst_offset_units =
/// first new row * row bytes / unit.
typedef struct CacheWriteParams {
    const void* src;         ///< [batch, new, kv_heads, head_dim]
    void* dst;               ///< [batch, capacity, kv_heads, head_dim]
    int64_t units;
    int64_t dst_seq_units;
    int64_t dst_offset_units;
} CacheWriteParams;

/// One GEMM of the fused LoRA layer (kernels/lora.cu):
/// C = out_scale * (A B + scale * mask(A2 B2)), 16-bit operands, fp32
/// accumulation. The kernel name fixes the layouts: A [m, k] row-major ("n")
/// or [k, m] ("t"); B [n, k] ("t") or [k, n] ("n"). Segment 2 (k2 > 0) is the
/// LoRA product, computed first. Leading dimensions of 16-bit operands and
/// the extents that run along them are multiples of 8 elements.
typedef struct LoraGemmParams {
    const void* a;
    const void* b;
    int64_t lda;
    int64_t ldb;
    int32_t k;
    int32_t k2;          ///< 0: no second segment
    const void* a2;
    const void* b2;
    int64_t lda2;
    int64_t ldb2;
    void* c;             ///< [m, ldc]; with gridDim.z > 1, split z writes c + z * m * ldc
    int64_t ldc;
    int32_t m;
    int32_t n;
    int32_t k_per_split; ///< K of each split (a multiple of 32) when gridDim.z > 1
    int32_t mask;        ///< dropout on: 0 nothing, 1 the A tiles, 2 the B tiles (dropped elements zeroed; 1/(1-p) is the caller's out_scale), 3 segment 2's product (times scale/(1-p))
    float scale;         ///< multiplies segment 2's product
    float out_scale;     ///< multiplies the result
    float dropout_p;
    int32_t pad0;
    uint64_t seed;
    uint64_t offset;
    int64_t mask_cols;   ///< columns of the masked x: element (row, col) is e = row * mask_cols + col
} LoraGemmParams;

/// Linear layer y = act(x W^T + b) (linear_forward_*: act = identity,
/// linear_gelu_forward_*: GELU, erf form).
typedef struct LinearParams {
    const void* x;        ///< [tokens, in_features]
    const void* w;        ///< [out_features, in_features]
    const void* bias;     ///< [out_features] or null
    void* y;              ///< [tokens, out_features]
    int32_t tokens;
    int32_t in_features;  ///< a multiple of 8 (16-byte rows)
    int32_t out_features;
    int32_t pad0;
} LinearParams;

/// Fixed-order sum of split-K partial results: out[i] = sum_z partial[z * n + i].
typedef struct LoraReduceParams {
    const float* partial;
    float* out;
    int64_t n;
    int32_t splits;
    int32_t pad0;
} LoraReduceParams;

/// Merge (sign 1) or unmerge (sign -1) an adapter into W: W += sign * scale * B A.
typedef struct LoraMergeParams {
    void* w;          ///< [out, in], the weight dtype
    const float* a;   ///< [rank, in]
    const float* b;   ///< [out, rank]
    int32_t in_features;
    int32_t rank;
    float scale;
    float sign;
} LoraMergeParams;

/// 16-bit, zero-padded copy of an fp32 matrix: dst [gridDim.y, ld] from src [rows, cols].
typedef struct LoraPackParams {
    const float* src;
    void* dst;
    int32_t rows;
    int32_t cols;
    int32_t ld;
    int32_t pad0;
} LoraPackParams;

/// y += scale * t elementwise (n elements of the 16-bit dtype).
typedef struct LoraAddParams {
    void* y;
    const void* t;
    int64_t n;
    float scale;
    int32_t pad0;
} LoraAddParams;

/// Cosine search, step 1, on one set x [rows, dim]: inverse norms and the
/// 16-bit GEMM operand. bad_row receives (atomicMin) row_base + the lowest row with a
/// NaN/infinite element or a squared norm that overflows fp32; it must start
/// at INT32_MAX.
typedef struct CosinePrepareParams {
    const void* x;       ///< [rows, dim], dtype from the kernel name
    void* out;           ///< [rows, ld] 16-bit operand, columns past its K zeroed
    float* inv_norm;     ///< [rows]: 1 / |x_r|, 0 for a zero row
    int32_t* bad_row;
    int32_t rows;
    int32_t dim;
    int32_t ld;          ///< a multiple of 8, at least the operand's K
    int32_t database;    ///< f32 only: 1 lays the bf16 halves out [hi|lo|hi], 0 [hi|hi|lo]
    int32_t row_base;    ///< added to the row reported in bad_row (the chunk's first row)
    int32_t vectorized;  ///< 1 if x's rows are 16-byte aligned (16-byte loads; dim * elem % 16 == 0)
} CosinePrepareParams;

/// Cosine search, step 2: similarity tiles of prepared queries against
/// prepared database rows, reduced into per-query top-k lists
/// (cosine_topk_*) or into pairs above a threshold (cosine_threshold_*).
/// Pair (query row i, database row j) has global indices query_base + i and
/// index_base + j; exclude compares those.
typedef struct CosineSearchParams {
    const void* q;             ///< [m, ld] prepared queries
    const void* db;            ///< [n, ld] prepared database rows
    const float* q_inv;        ///< [m]
    const float* db_inv;       ///< [n]
    int32_t m;
    int32_t n;
    int32_t ld;                ///< row stride of q and db, and the GEMM's K
    int32_t rows_per_split;    ///< database rows per blockIdx.y, a multiple of the 64-row tile
    int32_t exclude;           ///< 0 every pair, 1 all but j == i, 2 only j < i
    uint32_t query_base;
    uint32_t index_base;
    int32_t k;                 ///< top-k: list length
    float* list_scores;        ///< top-k: [gridDim.y, m, k] lists sorted best first, one per split
    uint32_t* list_index;      ///< top-k: database indices of list_scores (global)
    float threshold;           ///< threshold: pairs with score >= threshold are kept
    int32_t pad0;
    unsigned long long* pair_count;  ///< threshold: pairs found (may exceed capacity)
    unsigned long long capacity;     ///< threshold: slots in pair_*
    uint32_t* pair_query;      ///< threshold: [capacity] global query indices
    uint32_t* pair_item;       ///< threshold: [capacity] global database indices
    float* pair_score;         ///< threshold: [capacity]
} CosineSearchParams;

/// Cosine search, step 3: out[i] = the best k of lists[0..lists)[i], each
/// sorted best first (score descending, index ascending). out may be list 0.
typedef struct CosineMergeParams {
    const float* in_scores;    ///< [lists, m, k]
    const uint32_t* in_index;
    float* out_scores;         ///< [m, k]
    uint32_t* out_index;
    int32_t lists;
    int32_t m;
    int32_t k;
    int32_t pad0;
} CosineMergeParams;

/// Cross-entropy over rows of logits (kernels/cross_entropy.cu):
/// lse[r] = logsumexp(logits[r, 0..vocab)), loss[r] = lse[r] - logits[r, labels[r]],
/// or 0 where labels[r] < 0 (ignored). One block per row.
typedef struct CrossEntropyRowsParams {
    const void* logits;     ///< [rows, ld], dtype from the kernel name
    const int32_t* labels;  ///< [rows], each < vocab
    float* lse;             ///< [rows]
    float* loss;            ///< [rows]
    int64_t ld;             ///< row stride of logits, in elements (>= vocab)
    int32_t rows;
    int32_t vocab;
    int32_t vectorized;     ///< 1 if every row of logits is 16-byte aligned: 128-bit loads
    int32_t pad0;
} CrossEntropyRowsParams;

/// The fused head's gradient (kernels/cross_entropy.cu), one block per row of
/// an fp32 logits chunk whose lse the row kernel wrote: grad[r, v] =
/// scale * (exp(logits[r, v] - lse[r]) - [v == labels[r]]) for v < vocab and
/// labels[r] >= 0; 0 for ignored rows and for the columns vocab .. ld.
typedef struct CrossEntropyGradParams {
    const float* logits;    ///< [rows, ld] fp32
    const float* lse;       ///< [rows]
    const int32_t* labels;  ///< [rows]
    void* grad;             ///< [rows, ld], dtype from the kernel name (f16/bf16)
    int64_t ld;             ///< a multiple of 8
    int32_t rows;
    int32_t vocab;
    float scale;
    int32_t pad0;
} CrossEntropyGradParams;

/// One chunk of one trainable tensor for the multi-tensor AdamW
/// (kernels/adamw.cu): n <= kChunk elements at each (already offset) pointer.
typedef struct AdamWChunk {
    float* param;
    const float* grad;
    float* m;
    float* v;
    int64_t n;
} AdamWChunk;

/// The AdamW update and the gradients' squared norm (kernels/adamw.cu), one
/// block per chunk. decay = 1 - lr * weight_decay, step_size = lr / (1 -
/// beta1^t), bias_correction2_sqrt = sqrt(1 - beta2^t), clip multiplies the
/// gradients (the global-norm factor).
typedef struct AdamWParams {
    const AdamWChunk* chunks;  ///< [gridDim.x]
    float* partial;            ///< adamw_sumsq: [gridDim.x] sums of grad^2
    float beta1;
    float beta2;
    float eps;
    float decay;
    float step_size;
    float bias_correction2_sqrt;
    float clip;
    int32_t pad0;
} AdamWParams;

/// Greedy decoding (kernels/sampling.cu): ids[r] = the first index of the
/// largest logits[r, :] (NaN counts as larger than any number). One block per row.
typedef struct ArgmaxParams {
    const void* logits;     ///< [rows, vocab], dtype from the kernel name
    uint32_t* ids;          ///< [rows]
    int32_t rows;
    int32_t vocab;
    int32_t vectorized;     ///< 1 if every row is 16-byte aligned (vocab * elem % 16 == 0)
    int32_t pad0;
} ArgmaxParams;

/// Temperature / top-p sampling (kernels/sampling.cu), one block per row:
/// w_i = exp((z_i - max z) / temperature); the nucleus is {i : w_i >= tau, w_i > 0}
/// with tau the largest threshold whose kept mass is >= top_p * sum w (tau = 0
/// when top_p == 1); ids[r] = the first kept i, in index order, whose running
/// kept mass exceeds uniforms[r] * (kept mass), else the last kept i.
/// ids[r] = 0xFFFFFFFF for a row with a NaN or +inf logit or no finite one.
typedef struct SampleParams {
    const void* logits;     ///< [rows, vocab], dtype from the kernel name
    const double* uniforms; ///< [rows], each in [0, 1)
    uint32_t* ids;          ///< [rows]
    int32_t rows;
    int32_t vocab;
    float temperature;      ///< finite, > 0
    float top_p;            ///< in (0, 1]
    int32_t vectorized;     ///< as in ArgmaxParams
    int32_t pad0;
} SampleParams;

/// Arguments of the emulator's self-test kernels (kernels/emu/selftest.cu).
typedef struct EmuSelftestParams {
    int32_t* out;        ///< results, laid out per kernel
    int32_t mode;        ///< what the kernel does (or a count), per kernel
    const float* input;  ///< inputs, where a kernel takes any
} EmuSelftestParams;

/// Launch configuration handed to the host emulator, as cuLaunchKernel takes
/// it, plus what the driver would know of the kernel and how to run it.
typedef struct PlatypusEmuLaunch {
    uint32_t grid[3];
    uint32_t block[3];
    uint64_t shared_bytes;  ///< dynamic shared memory of each block
    uint64_t seed;          ///< schedule seed, used when flags has PLATYPUS_EMU_SHUFFLE
    uint32_t flags;         ///< PLATYPUS_EMU_SHUFFLE | PLATYPUS_EMU_MEMCHECK
    uint32_t max_threads;   ///< the kernel's __launch_bounds__ threads (0: unknown)
    uint32_t shared_optin;  ///< its max dynamic shared memory attribute (0: not set, static + dynamic <= 48 KiB)
    uint32_t shared_limit;  ///< most static + dynamic shared memory a block may have on the emulated arch
} PlatypusEmuLaunch;

/// PlatypusEmuLaunch::flags: run threads, warps and blocks in a seeded random order.
#define PLATYPUS_EMU_SHUFFLE 1u
/// PlatypusEmuLaunch::flags: check shared and global accesses for races and
/// reads of unwritten shared memory (where the kernels were built for it).
#define PLATYPUS_EMU_MEMCHECK 2u

/// What stopped an emulated launch (the return value of its entry point).
#define PLATYPUS_EMU_OK 0
#define PLATYPUS_EMU_FAIL_LAUNCH 1        ///< invalid configuration or resources
#define PLATYPUS_EMU_FAIL_SYNC 2          ///< barrier or warp collective misuse, deadlock
#define PLATYPUS_EMU_FAIL_RACE 3          ///< unsynchronized conflicting accesses
#define PLATYPUS_EMU_FAIL_MISALIGNED 4    ///< an access not aligned to its size
#define PLATYPUS_EMU_FAIL_UNINITIALIZED 5 ///< a read of shared memory nothing wrote
#define PLATYPUS_EMU_FAIL_TRAP 6          ///< __trap() or a device-side check

#endif
