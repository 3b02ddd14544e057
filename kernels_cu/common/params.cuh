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

}  // namespace cuflash
