// Kernel arguments. Each kernel family takes one struct by value as a
// `const __grid_constant__` parameter; cuflash/_core.py and cuflash/ops/*.py mirror these
// layouts with NumPy structured dtypes (align=True), so a field added here must be added
// there, in order (python -m cuflash.compile_check proves sizes and offsets equal).
#pragma once
#include "common/mma.cuh"

namespace cuflash {

// n / d and n % d for 0 <= n < 2^31 and a divisor d >= 1 fixed for a launch, by a
// multiply-high with a magic number made on the host (fast_div in cuflash/_core.py):
// shift = ceil(log2 d), mul = floor(2^32 (2^shift - d) / d) + 1, and then
// n / d = (umulhi(n, mul) + n) >> shift (Granlund & Montgomery; the sum stays below 2^32).
// Three dependent instructions where a division by a runtime value is a chain of ~20.
struct FastDiv {
  int d;
  unsigned mul, shift;
  __device__ __forceinline__ int div(int n) const {
    return static_cast<int>((__umulhi(static_cast<unsigned>(n), mul) + n) >> shift);
  }
  // n / d, with n % d in r.
  __device__ __forceinline__ int divmod(int n, int& r) const {
    const int q = div(n);
    r = n - q * d;
    return q;
  }
};

// What every attention kernel needs to know about q, k, v and the score function.
// Strides are in elements; the head dimension is contiguous.
struct AttnArgs {
  const void* q;
  const void* k;
  const void* v;
  int64 q_batch_stride, q_row_stride, q_head_stride;
  int64 k_batch_stride, k_row_stride, k_head_stride;
  int64 v_batch_stride, v_row_stride, v_head_stride;
  int batch, seqlen_q, seqlen_k, nheads, nheads_kv, headdim;
  float scale;          // natural units; multiplies q . k
  float softcap;        // 0: off
  int window_left;      // -1: unbounded
  int window_right;     // -1: unbounded (causal is window_right == 0)
  const float* alibi_slopes;  // nullptr or (batch, nheads)
  int64 alibi_batch_stride;   // elements; 0 when the slopes are shared by the batch
  // Varlen (both set, or both nullptr for dense): q, k, v (and out, dout, dq, dk, dv) are
  // packed (total, nheads, headdim) and batch item b owns rows [cu_seqlens[b],
  // cu_seqlens[b + 1]); int32 prefix sums of length batch + 1. seqlen_q / seqlen_k are then
  // the totals (rows of the packed arrays), the batch strides unused, and the grid is sized
  // by the longest item. Only the VARLEN instantiations of the mma.sync kernels read them.
  // Last in the struct, so that kernels which ignore them keep their layout.
  const int* cu_seqlens_q;
  const int* cu_seqlens_k;
};

// One batch item as the mma.sync kernels see it. Arrays with a batch axis are addressed at
//   b * batch_stride + (row0 + i) * row_stride + ...
// where row0 is q0 for q, out, dout, dq and k0 for k, v, dk, dv.
template <bool VARLEN>
struct SeqView;

// Dense: the batch item itself, rows from 0, the lengths of AttnArgs read where they are
// used, so that dense instantiations compile exactly as they would without varlen support.
template <>
struct SeqView<false> {
  static constexpr int q0 = 0, k0 = 0;
  const AttnArgs& a;
  int b;
  __device__ __forceinline__ SeqView(const AttnArgs& args, int item) : a(args), b(item) {}
  __device__ __forceinline__ int seqlen_q() const { return a.seqlen_q; }
  __device__ __forceinline__ int seqlen_k() const { return a.seqlen_k; }
};

// Varlen: the packed arrays have no batch axis (b = 0); the item's first rows and lengths
// come from cu_seqlens, read at kernel start (and again where a kernel would otherwise hold
// them in registers across its main loop: reread).
// cu_seqlens in device memory are not validated on the host (that would synchronize), so
// the view clamps them: 0 <= q0 <= q0 + len_q <= total_q (seqlen_q), likewise for keys.
// Whatever the prefix sums hold, every row a kernel touches is then a row of the packed
// arrays, and the backward's scratch rows of an item stay inside seqlen_q_pad
// (scratch_row0 in common/bwd_scratch.cuh). Lengths past max_seqlen need no clamp: the grid
// only covers max_seqlen rows, so the rest are not computed. Invalid prefix sums give wrong
// numbers, never out-of-bounds accesses; varlen_check (kernels_cu/varlen_check.cu), run
// after the call, turns those outputs into NaN.
template <>
struct SeqView<true> {
  static constexpr int b = 0;
  int q0, k0, len_q, len_k;
  __device__ __forceinline__ SeqView(const AttnArgs& a, int item)
      : q0(clamp(a.cu_seqlens_q[item], a.seqlen_q)), k0(clamp(a.cu_seqlens_k[item], a.seqlen_k)),
        len_q(max(clamp(a.cu_seqlens_q[item + 1], a.seqlen_q) - q0, 0)),
        len_k(max(clamp(a.cu_seqlens_k[item + 1], a.seqlen_k) - k0, 0)) {}
  // x into [0, total]: a negative x is a large unsigned number, so one unsigned min.
  static __device__ __forceinline__ int clamp(int x, int total) {
    return static_cast<int>(min(static_cast<unsigned>(x), static_cast<unsigned>(total)));
  }
  __device__ __forceinline__ SeqView(int q0_, int k0_, int len_q_, int len_k_)
      : q0(q0_), k0(k0_), len_q(len_q_), len_k(len_k_) {}
  __device__ __forceinline__ int seqlen_q() const { return len_q; }
  __device__ __forceinline__ int seqlen_k() const { return len_k; }
};

// The view of `item` again, inside or after a kernel's main loop: varlen re-reads
// cu_seqlens (through an index the compiler cannot see is the same, so that it does not
// keep the first values live in registers across the loop instead, which spills kernels
// near 255 registers); dense returns `seq`, costing nothing.
template <bool VARLEN>
__device__ __forceinline__ SeqView<VARLEN> reread(const SeqView<VARLEN>& seq, const AttnArgs& a,
                                                  int item) {
  if constexpr (VARLEN) {
    asm volatile("" : "+r"(item));
    return SeqView<true>(a, item);
  } else {
    return seq;
  }
}

// Forward (kernels_cu/flash_fwd.cu): the inputs plus where out and lse go. out has q's
// shape and dtype (strides in elements); lse is float32 (batch, nheads, seqlen_q), contiguous
// (varlen: (nheads, total_q)).
struct FwdParams {
  AttnArgs attn;
  void* o;
  int64 o_batch_stride, o_row_stride, o_head_stride;
  float* lse;
};

// Backward (kernels_cu/flash_bwd.cu). out/dout have q's shape and dtype, dq/dk/dv those of
// q/k/v (strides in elements). lse is the forward's (batch, nheads, seqlen_q) float32 with
// the strides given. The scratch arrays are float32, contiguous, rows padded to
// seqlen_q_pad (a multiple of every query tile) so that tiles read and add without bounds
// checks: lse_log2 and delta are (batch, nheads, seqlen_q_pad), dq_accum (batch, nheads,
// seqlen_q_pad, headdim_pad) where headdim_pad is the kernel's padded head dim.
// Varlen: lse is (nheads, total_q) (lse_batch_stride unused); the scratch arrays are
// (nheads, seqlen_q_pad[, headdim_pad]) with batch item b's rows starting at row
// varlen_scratch_row0 (kernels_cu/flash_bwd.cu), each item followed by padding.
struct BwdParams {
  AttnArgs attn;
  const void* out;
  const void* dout;
  const float* lse;
  void* dq;
  void* dk;
  void* dv;
  float* lse_log2;   // lse * log2(e); +inf for a fully masked or padded row, so that p = 0
  float* delta;      // rowsum(dout * out); 0 for padded rows
  float* dq_accum;   // nullptr when the dq kernel writes dq directly (deterministic mode)
  int64 o_batch_stride, o_row_stride, o_head_stride;
  int64 do_batch_stride, do_row_stride, do_head_stride;
  int64 lse_batch_stride, lse_head_stride, lse_row_stride;
  int64 dq_batch_stride, dq_row_stride, dq_head_stride;
  int64 dk_batch_stride, dk_row_stride, dk_head_stride;
  int64 dv_batch_stride, dv_row_stride, dv_head_stride;
  int seqlen_q_pad, headdim_pad;
  // Deterministic bwd_sm90: one int per 4096-float tile of dq_accum (its float offset /
  // 4096), zero at launch, so that the key blocks adding into a tile take turns in
  // key-block order; nullptr otherwise.
  int* dq_semaphore;
  // bwd_sm90's and bwd_sm90_wide's CTA order: sections of this many (batch item, kv head)
  // pairs (BwdKeyBlock; half as many groups of two in the paired order).
  int l2_section;
  // bwd_sm90_wide's paired order (BwdKeyBlock; -1: off): the CTAs of a group of two pairs
  // that run a block of the second pair alone before the first pair's blocks begin, at
  // most the key blocks a pair.
  int pair_offset;
};

// KV-cache decoding (kernels_cu/flash_decode.cu: append_kv, flash_decode). attn.k / attn.v
// are the caches, contiguous (batch, seqlen_cache, nheads_kv, headdim) or, with a block
// table, paged (num_blocks, page_size, nheads_kv, headdim) with k/v_batch_stride the page
// stride. attn.seqlen_k is the capacity of one batch item's cache (seqlen_cache, or
// max_blocks * page_size); batch item b attends over
// seqlen_k = min(cache_seqlens[b] + seqlen_new, capacity) keys, the last seqlen_new of
// which append_kv has copied from k_new / v_new.
struct DecodeParams {
  AttnArgs attn;
  const int* block_table;          // nullptr: contiguous caches; else (batch, max_blocks)
  int64 block_table_batch_stride;  // elements
  FastDiv page_size;               // keys per page, a multiple of 16 (paged only)
  int num_pages;                   // num_blocks: block-table entries are clamped below it
  const int* cache_seqlens;        // nullptr: every batch item holds cache_seqlen keys
  int cache_seqlen;
  int seqlen_new;                  // rows of k_new / v_new per batch item (0: none)
  const void* k_new;               // (batch, seqlen_new, nheads_kv, headdim), q's dtype
  const void* v_new;
  int64 kn_batch_stride, kn_row_stride, kn_head_stride;
  int64 vn_batch_stride, vn_row_stride, vn_head_stride;
  void* o;                         // (batch, seqlen_q, nheads, headdim), q's dtype
  int64 o_batch_stride, o_row_stride, o_head_stride;
  float* lse;                      // (batch, nheads, seqlen_q), contiguous
  // One split writes o and lse directly (o_accum == nullptr). Several write float32
  // partial results, contiguous, which the last split of each CTA group to finish merges
  // into o and lse: o_accum (num_splits, batch, seqlen_q, nheads, headdim), lse_accum
  // (num_splits, batch, nheads, seqlen_q). split_counter has one int per (batch item, kv
  // head, row block), zero at launch and left zero (the last split re-arms it).
  float* o_accum;
  float* lse_accum;
  int* split_counter;
  FastDiv num_splits;
  FastDiv m_blocks;                // CTAs per (kv head, split): ceil(group * seqlen_q / 16)
  FastDiv nheads_kv;               // attn.nheads_kv, as a divisor
  FastDiv group;                   // query heads per kv head: attn.nheads / attn.nheads_kv
};

// The LSE merge of partial attention results (merge_parts in kernels_cu/flash_decode.cu):
// parts (num_parts, batch, seqlen_q, nheads, headdim) with their log-sum-exps part_lse
// (num_parts, batch, nheads, seqlen_q), strides in elements, into o (batch, seqlen_q,
// nheads, headdim) and lse (batch, nheads, seqlen_q), contiguous.
struct MergeParams {
  const void* parts;
  const float* part_lse;
  void* o;
  float* lse;
  int64 p_part_stride, p_batch_stride, p_row_stride, p_head_stride;
  int64 pl_part_stride, pl_batch_stride, pl_head_stride, pl_row_stride;
  int64 o_batch_stride, o_row_stride, o_head_stride;
  int num_parts, batch, seqlen_q, nheads, headdim;
};

}  // namespace cuflash
