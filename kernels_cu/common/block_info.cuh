// What one CTA of the sm80 (mma.sync) forward and backward kernels works on, shared by the
// fp16/bf16 and the float32 kernel of each direction: its batch item (SeqView: in varlen
// calls the item's first rows and lengths from cu_seqlens), heads and owned rows, where its
// arrays start, and whether it owns any row at all. A varlen grid covers the longest item,
// so a CTA whose first row lies past its own item's end must exit before it does any work
// (past_end); a dense CTA always has rows, and past_end() is then a constant false.
#pragma once
#include "common/mask.cuh"
#include "common/params.cuh"

namespace cuflash {

// Forward: CTA (blockIdx.x, head h, item b) owns query rows [m0, m0 + rows()) of the item.
// Query blocks run in reverse order of blockIdx.x, so that under a causal mask the blocks
// with the most keys start first. The pointers are built by calls after the past_end exit.
template <typename T, int BLOCK_M, bool VARLEN>
struct FwdBlock {
  int m_block, h, b;
  SeqView<VARLEN> seq;
  int h_kv, m0;

  __device__ __forceinline__ explicit FwdBlock(const AttnArgs& a)
      : m_block(gridDim.x - 1 - blockIdx.x), h(blockIdx.y), b(blockIdx.z), seq(a, b),
        h_kv(h / (a.nheads / a.nheads_kv)), m0(m_block * BLOCK_M) {}

  __device__ __forceinline__ bool past_end() const { return VARLEN && m0 >= seq.seqlen_q(); }
  __device__ __forceinline__ int rows() const { return min(BLOCK_M, seq.seqlen_q() - m0); }

  // q at the item's query row `row` of head h; k and v at the item's first key, kv head h_kv.
  __device__ __forceinline__ const T* q(const AttnArgs& a, int row) const {
    return static_cast<const T*>(a.q) + seq.b * a.q_batch_stride + h * a.q_head_stride +
           (seq.q0 + row) * a.q_row_stride;
  }
  __device__ __forceinline__ const T* k(const AttnArgs& a) const {
    return static_cast<const T*>(a.k) + seq.b * a.k_batch_stride + seq.k0 * a.k_row_stride +
           h_kv * a.k_head_stride;
  }
  __device__ __forceinline__ const T* v(const AttnArgs& a) const {
    return static_cast<const T*>(a.v) + seq.b * a.v_batch_stride + seq.k0 * a.v_row_stride +
           h_kv * a.v_head_stride;
  }

  // out and lse at the item's row 0 of head h, for the view `s` (seq, or its reread in a
  // kernel that must not keep seq live across its main loop). lse is (batch, nheads,
  // seqlen_q); varlen (nheads, total_q), a.seqlen_q being the total.
  __device__ __forceinline__ T* out(const FwdParams& p, const SeqView<VARLEN>& s) const {
    return static_cast<T*>(p.o) + s.b * p.o_batch_stride + h * p.o_head_stride +
           s.q0 * p.o_row_stride;
  }
  __device__ __forceinline__ float* lse(const FwdParams& p, const SeqView<VARLEN>& s) const {
    return p.lse + (static_cast<int64>(s.b) * p.attn.nheads + h) * p.attn.seqlen_q + s.q0;
  }
};

// Backward: CTA (blockIdx.x, item b = blockIdx.y, blockIdx.z) owns BLOCK_O rows from o0 of
// one head: keys of kv head blockIdx.z (KEY_OWNER: dK and dV, streaming the query blocks of
// every query head of its group), or queries of query head blockIdx.z (dQ, streaming the key
// blocks of its kv head). The kernel holds the item's view `seq` (SeqView(a, b)) itself and
// passes it in: held inside this struct, it made ptxas allocate and schedule the dense
// kernels differently. The offsets and the streamed blocks come from calls after the
// past_end exit.
template <int BLOCK_O, int BLOCK_R, bool KEY_OWNER, bool VARLEN>
struct BwdBlock {
  int b, group, o0;

  __device__ __forceinline__ explicit BwdBlock(const AttnArgs& a)
      : b(blockIdx.y), group(a.nheads / a.nheads_kv), o0(blockIdx.x * BLOCK_O) {}

  // The rows of the owner side in the view `s` (seq, or its reread after the main loop).
  __device__ __forceinline__ int owner_rows(const SeqView<VARLEN>& s) const {
    return KEY_OWNER ? s.seqlen_k() : s.seqlen_q();
  }
  __device__ __forceinline__ bool past_end(const SeqView<VARLEN>& seq) const {
    return VARLEN && o0 >= owner_rows(seq);
  }

  // Offsets (elements) of the item's first row, head 0, in q, k, v and dout. Offsets rather
  // than pointers: a pointer returned from here is reassociated with the kernel's own
  // offsets differently, and ptxas then allocates the main loop's registers differently.
  __device__ __forceinline__ int64 q_offset(const AttnArgs& a, const SeqView<VARLEN>& seq) const {
    return seq.b * a.q_batch_stride + seq.q0 * a.q_row_stride;
  }
  __device__ __forceinline__ int64 k_offset(const AttnArgs& a, const SeqView<VARLEN>& seq) const {
    return seq.b * a.k_batch_stride + seq.k0 * a.k_row_stride;
  }
  __device__ __forceinline__ int64 v_offset(const AttnArgs& a, const SeqView<VARLEN>& seq) const {
    return seq.b * a.v_batch_stride + seq.k0 * a.v_row_stride;
  }
  __device__ __forceinline__ int64 dout_offset(const BwdParams& p,
                                               const SeqView<VARLEN>& seq) const {
    return seq.b * p.do_batch_stride + seq.q0 * p.do_row_stride;
  }

  // The CTA's heads and the blocks its main loop streams: iteration it reads BLOCK_R rows
  // from row(it) of head head(it), covering every block of the other side that one of the
  // owner rows sees (iters in all).
  struct Work {
    int hkv, h_owner, s_begin, n_sblocks, iters;
    __device__ __forceinline__ int head(int it) const {
      return KEY_OWNER ? h_owner + it / n_sblocks : h_owner;
    }
    __device__ __forceinline__ int row(int it) const {
      return (s_begin + it % n_sblocks) * BLOCK_R;
    }
  };
  __device__ __forceinline__ Work work(const Mask& mask, const SeqView<VARLEN>& seq) const {
    Work w;
    int begin, end;
    if constexpr (KEY_OWNER) {
      w.hkv = blockIdx.z;
      w.h_owner = w.hkv * group;
      mask.query_range(o0, min(o0 + BLOCK_O, seq.seqlen_k()), begin, end);
    } else {
      w.h_owner = blockIdx.z;
      w.hkv = w.h_owner / group;
      mask.key_range(o0, min(o0 + BLOCK_O, seq.seqlen_q()), begin, end);
    }
    block_span<BLOCK_R>(begin, end, w.s_begin, w.n_sblocks);
    w.iters = (KEY_OWNER ? group : 1) * w.n_sblocks;
    return w;
  }

  // Where owner row `row` of the view `s` goes: d1 is dK (KEY_OWNER) or dQ, d2 is dV.
  template <typename T>
  __device__ __forceinline__ T* d1(const BwdParams& p, const SeqView<VARLEN>& s, const Work& w,
                                   int row) const {
    return KEY_OWNER ? static_cast<T*>(p.dk) + s.b * p.dk_batch_stride +
                           (s.k0 + row) * p.dk_row_stride + w.hkv * p.dk_head_stride
                     : static_cast<T*>(p.dq) + s.b * p.dq_batch_stride +
                           (s.q0 + row) * p.dq_row_stride + w.h_owner * p.dq_head_stride;
  }
  template <typename T>
  __device__ __forceinline__ T* d2(const BwdParams& p, const SeqView<VARLEN>& s, const Work& w,
                                   int row) const {
    return static_cast<T*>(p.dv) + s.b * p.dv_batch_stride + (s.k0 + row) * p.dv_row_stride +
           w.hkv * p.dv_head_stride;
  }
};

}  // namespace cuflash
