// Where the backward's float32 scratch rows (lse_log2, delta, dq_accum) of one (batch item,
// head) start; shared by flash_bwd.cu (bwd_preprocess fills them, bwd_main and the dq
// convert use them) and flash_bwd_sm90.cu.
#pragma once
#include "common/params.cuh"

namespace cuflash {

// Dense: rows (batch, nheads, seqlen_q_pad). Varlen: rows (nheads, seqlen_q_pad), batch
// item b's starting at
//   (cu_seqlens_q[b] rounded down to 16) + VARLEN_GAP * b,
// 64-byte aligned (cp.async of lse/delta; dq_accum rows on 16 bytes for its 16-byte
// reductions) and at least seqlen + 129 rows before the next item's, so at least
// round_up(seqlen, SCRATCH_TILE): every query tile (all of whose heights divide
// SCRATCH_TILE) stays inside its item's rows. cuflash/ops/backward.py allocates
// seqlen_q_pad = total_q rounded down to 16 + VARLEN_GAP * batch (the start of item
// "batch").
constexpr int SCRATCH_TILE = 128;
constexpr int VARLEN_GAP = SCRATCH_TILE + 16;

// Index of scratch row 0 of head h of batch item `item` (whose view is `seq`).
template <bool VARLEN>
__device__ __forceinline__ int64 scratch_row0(const BwdParams& p, const SeqView<VARLEN>& seq,
                                              int item, int h) {
  int64 r = (int64(seq.b) * p.attn.nheads + h) * p.seqlen_q_pad;
  if constexpr (VARLEN) r += (seq.q0 & ~15) + VARLEN_GAP * item;  // < seqlen_q_pad, an int
  return r;
}

}  // namespace cuflash
