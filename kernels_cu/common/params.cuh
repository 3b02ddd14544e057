// Kernel arguments. Each kernel family takes one struct by value as a
// `const __grid_constant__` parameter; cuflash/_launch.py mirrors these layouts with NumPy
// structured dtypes (align=True), so a field added here must be added there, in order.
#pragma once
#include "common/mma.cuh"

namespace cuflash {

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
};

// Forward (kernels_cu/flash_fwd.cu): the inputs plus where out and lse go. out has q's
// shape and dtype (strides in elements); lse is float32 (batch, nheads, seqlen_q), contiguous.
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
};

}  // namespace cuflash
