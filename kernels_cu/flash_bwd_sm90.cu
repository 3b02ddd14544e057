// Attention backward for Hopper (sm_90a): the algorithm of flash_bwd.cu's bwd_main
// (BWD_DK | BWD_DV | BWD_DQ_ATOMIC) on wgmma. fp16/bf16, head dims 64 and 128 (the smaller
// ones padded: columns past a.headdim load as zeros and are not stored; head dims over 128
// run bwd_sm90_wide, below), soft-cap and ALiBi included (OPTS: OPTS_SOFTCAP or OPTS_ALIBI
// fixed at compile time, or OPTS_RUNTIME for both; common/mask.cuh's ScoreGrad, bwd_main's
// element function), deterministic too (BwdParams.dq_semaphore: the dQ reduce-adds of a tile
// in key-block order); other GPUs use bwd_main (cuflash/ops/backward.py).
//
//   bwd_sm90             dK, dV of a block of 128 (or 192) keys; its share of dQ added into
//                        dq_accum
//   bwd_sm90_wide        the same at head dims over 128, 64 keys a block
//   bwd_convert_dq_sm90  dq = scale * dq_accum, from this kernel's dq_accum layout
// bwd_preprocess (flash_bwd.cu) runs first: delta, lse in base 2 (+inf for fully masked
// and padded rows, so that their p is exactly 0), dq_accum zeroed.
//
// One CTA per (128 keys, batch item, kv head), warp-specialized: a producer warpgroup and
// two MMA warpgroups, MMA warpgroup w owning keys 64 w .. 64 w + 63 (or 192 keys and three,
// BwdSm90Traits; float16 soft-cap and deterministic calls at head dim 64, whose dQ tile a
// step is one warpgroup's in turn: see ready() in the MMA warpgroups' loop). K and V stay in
// shared memory; the CTA walks the query blocks (BLOCK_R rows) of every query head of its GQA
// group that see one of its keys. The producer's 128 threads copy K and V once by cp.async;
// then Q_i, dO_i, lse_i and delta_i go into a ring of STAGES buffers, by TMA and bulk copies
// from one thread (dense calls: BwdSm90Maps, the kernels' second parameter) or by cp.async
// from the 128 (varlen, and where the driver refuses a map), each stage handed over by a
// "full" mbarrier and given back by an "empty" one; the producer gives most of its
// registers to the MMA warpgroups (setmaxnreg), which issue no loads. A step of an MMA
// warpgroup:
//   S^T  = K_w Q_i^T,  dP^T = V_w dO_i^T        wgmma, both operands K-major in smem
//   P^T  = exp2(S^T scale log2(e) - lse),  dS^T = P^T (dP^T - delta)   on the accumulators
//   dV_w += P^T dO_i,  dK_w += dS^T Q_i          wgmma, A = P^T / dS^T from registers,
//                                                B = dO_i / Q_i read N-major from smem
//   (FA3's order but with both score options: P^T while dP^T's wgmmas run, dV issued
//   before dS^T)
//   dS^T -> shared memory; in the next step (once the other warpgroup's half is there:
//   ready() in the loop) warpgroup w computes one 64 x 64 tile of dQ_i = dS K (A = dS^T
//   M-major, B = K N-major) and adds it into dq_accum from the accumulators (16-byte
//   reductions, the layout below);
//   warpgroup 0 does so at the start of the step, warpgroup 1 at its end, so that their
//   MMA phases interleave with each other's elementwise work.
// Work is in 64-query sub-blocks (m64n64 S^T, dP^T), every one computed: a sub-tile that
// no (query, key) pair sees (causal and window diagonals, padded queries) gets P = dS = 0
// from the mask and the +inf lse of padded rows. (Skipping its MMAs put wgmmas under a
// branch, which makes ptxas serialize them all at these register counts.)
// The keys are the M side of S^T, so P^T and dS^T are the A fragments of dV and dK with
// no data movement (common/sm90.cuh: the accumulator layout is the mma A layout).
//
// Tiles: BLOCK_R * D = 8192, so a warpgroup's dQ share is always 64 x 64: head dim 128
// takes BLOCK_R = 64 (warpgroup w: all 64 queries, dQ columns 64 w ..), head dim 64 takes
// BLOCK_R = 128 (warpgroup w: queries 64 w .., all 64 columns) as two sub-blocks, the S/dP
// of the second issued before waiting for the dV/dK of the first. Accumulators a thread:
// dK D / 2 and dV DV / 2 floats, S^T and dP^T 32 each per sub-block in flight, and
// (but with both score options) P^T's 16-bit A fragments in 16 more registers (pf).
//
// dq_accum layout (these kernels and bwd_convert_dq_sm90 only; dq_tile_offset): per (batch,
// head), tiles of 64 rows x 64 columns, tile (row / 64, col / 64) at ((row / 64) * D / 64 +
// col / 64) * 4096 floats, each in the order of an m64n64 accumulator: registers 4 t ..
// 4 t + 3 of the warpgroup's thread w at 4 (128 t + w), so that a warpgroup adds its tile
// straight from the accumulators, one 16-byte red.global.add a register quad (a warp's 32
// reductions cover 512 contiguous bytes).
//
// Shared-memory tiles are 128B-swizzled (common/sm90.cuh): rows of 64 elements (128 bytes)
// in column blocks, 16-byte chunk c of row r at c ^ (r % 8), every tile 1024-byte aligned.
//
// VARLEN instantiations (packed batches, AttnArgs cu_seqlens_q/k; dense ones compile to the
// same code as without the flag): SeqView gives batch item b's first rows and lengths, key
// blocks past its keys exit at once, Q/dO/K/V rows past its end load as zeros and are
// masked, dK/dV rows past it are not stored. Its scratch rows (lse_log2, delta, dq_accum)
// start at scratch_row0 (common/bwd_scratch.cuh) and span its length rounded up to 128, so
// the dq_accum tiles above are laid out from there and reduce-adds stay inside the item.
#include "common/bwd_scratch.cuh"
#include "common/mask.cuh"
#include "common/params.cuh"
#include "common/sm90.cuh"

namespace cuflash {

// D is the head dim of Q and K, DV that of V and dO (the API passes one head dim today; the
// kernel takes DeepSeek-style pairs such as 128 / 64 already). KEYS a CTA, 64 an MMA
// warpgroup: two (128) everywhere, or three (192) at head dim 64 with one 64-query
// sub-block a step, where the elementwise work of soft-cap wants more warps a scheduler.
template <int D, int KEYS, int BLOCK_R, int DV = D>
struct BwdSm90Traits {
  static constexpr int BLOCK_C = KEYS;
  static constexpr int WGS = BLOCK_C / 64;         // MMA warpgroups
  static constexpr int THREADS = 128 * (1 + WGS);  // the producer warpgroup, then the MMA ones
  // dS^T buffers. Three with a hand-over (head dim 128; three warpgroups): step j writes
  // buffer j % 3, and the warpgroups hand it over without a barrier of all a step (see
  // ready() in the MMA warpgroups' loop). Two at head dim 64 with two warpgroups (a third
  // beside its three stages would exceed shared memory by 1 KiB): both warpgroups then meet
  // at one barrier a step.
  static constexpr bool HAND_OVER = D == 128 || WGS == 3;
  static constexpr int DS_BUFS = HAND_OVER ? 3 : 2;
  // Buffers of the Q, dO, lse, delta ring. A stage comes back when the last warpgroup's
  // dK of its step is done. Three where the warpgroups meet every step: a reload then has
  // a step and a half to land, not half a step (causal +4-5% at head dim 64), and with three
  // warpgroups, which drift apart by up to a step. Two with the hand-over at head dim 128,
  // where a third measured up to 5% slower (docs/notes/backward.md).
  static constexpr int STAGES = D == 128 ? 2 : 3;
  // Registers after setmaxnreg, within the LAUNCH_REGS a thread that
  // __launch_bounds__(THREADS, 1) hands out at launch (168 for two MMA warpgroups, 128 for
  // three): what the producer gives back, the MMA warpgroups take. dK and dV take (D + DV) /
  // 2: at 128 + 128 the MMA warpgroups need 240 (P^T's own 16 registers beside them, S^T and
  // dP^T); below, 232, and the producer keeps 40 (24 spilled its step count in varlen
  // instantiations at head dim 64). Three MMA warpgroups share what is left of 32 for the
  // producer: 160, for one sub-block's S^T and dP^T.
  static constexpr bool WIDE_ACC = D + DV >= 256;
  static constexpr int PRODUCER_REGS = WGS == 3 ? 32 : WIDE_ACC ? 24 : 40;
  static constexpr int MMA_REGS = WGS == 3 ? 160 : WIDE_ACC ? 240 : 232;
  static constexpr int LAUNCH_REGS = 65536 / THREADS / 8 * 8;
  static_assert(128 * PRODUCER_REGS + 128 * WGS * MMA_REGS <= LAUNCH_REGS * THREADS, "registers");
  static constexpr int K_BLK = BLOCK_C * 128;   // bytes of one column block of K or V
  static constexpr int Q_BLK = BLOCK_R * 128;   // of Q or dO
  static constexpr int DS_BLK = BLOCK_C * 128;  // of dS^T (64 queries of BLOCK_C key rows)
  static constexpr int K_BYTES = K_BLK * (D / 64);
  static constexpr int V_BYTES = K_BLK * (DV / 64);
  static constexpr int Q_BYTES = Q_BLK * (D / 64);
  static constexpr int DO_BYTES = Q_BLK * (DV / 64);
  static constexpr int DS_BYTES = DS_BLK * (BLOCK_R / 64);
  static constexpr int OFF_K = 0;
  static constexpr int OFF_V = OFF_K + K_BYTES;
  static constexpr int OFF_Q = OFF_V + V_BYTES;              // a buffer per stage
  static constexpr int OFF_DO = OFF_Q + STAGES * Q_BYTES;    // a buffer per stage
  static constexpr int OFF_DS = OFF_DO + STAGES * DO_BYTES;  // DS_BUFS buffers
  static constexpr int OFF_LSE = OFF_DS + DS_BUFS * DS_BYTES;  // BLOCK_R floats a stage
  static constexpr int OFF_DELTA = OFF_LSE + STAGES * BLOCK_R * 4;
  // dQ tiles through shared memory to the producer's writer warp, which adds them into
  // dq_accum by bulk reduce-adds (BwdDqWriter): a 64 x 64 float32 tile per MMA warpgroup.
  // At head dim 128; head dim 64 has no room for them beside its three stages.
  static constexpr bool DQ_WRITER = D == 128;
  static constexpr int DQ_TILE_BYTES = 64 * 64 * 4;
  static constexpr int OFF_DQ = OFF_DELTA + STAGES * BLOCK_R * 4;
  // + 1 KiB to align the tiles to 1024 bytes (the 128B swizzle's period).
  static constexpr int SMEM_BYTES = OFF_DQ + (DQ_WRITER ? 2 * DQ_TILE_BYTES : 0) + 1024;
  static_assert(DV % 64 == 0, "whole 128-byte swizzle rows");
  static_assert(D % 64 == 0 && BLOCK_R % 64 == 0 &&
                    (WGS == 2 ? BLOCK_R * D == 8192 : WGS == 3 && BLOCK_R == 64 && D + DV == 128),
                "a step's dQ: a 64 x 64 tile a warpgroup (two), or one (three, in turn)");
  static_assert(SMEM_BYTES <= 227 * 1024, "shared memory");
  static_assert(OFF_DS % 1024 == 0 && DS_BYTES % 1024 == 0 && DS_BLK % 1024 == 0,
                "the dS^T stores' XOR addressing");
  // Padded query rows (past seqlen_q, up to a multiple of SCRATCH_TILE) have lse +inf and
  // delta 0, which makes P and dS of a step's padded rows exactly 0.
  static_assert(SCRATCH_TILE % BLOCK_R == 0, "a step's rows inside the padded scratch");
};

// Byte offset of 16-byte chunk c (elements 8 c .. 8 c + 7) of row r in a 128B-swizzled tile
// of ROWS rows: column block c / 8, row r, chunk (c % 8) ^ (r % 8).
template <int ROWS>
__device__ __forceinline__ uint32_t sw128(int r, int c) {
  return (c >> 3) * (ROWS * 128) + r * 128 + (((c & 7) ^ (r & 7)) << 4);
}

// cp.async of rows [0, nrows) of a ROWS x D tile (row stride in elements) into the swizzled
// tile at shared address dst; rows >= nrows and columns >= headdim read as zeros. The 128
// threads of the producer, consecutive threads on consecutive chunks of a row (coalesced,
// conflict-free).
template <int ROWS, int D, typename T>
__device__ __forceinline__ void sm90_load_tile(uint32_t dst, const T* src, int64 row_stride,
                                               int nrows, int headdim, int tid) {
  constexpr int CH = D / 8, STEP = 128 / CH;  // 16-byte chunks of a row; rows of a pass
  static_assert(ROWS % STEP == 0, "whole passes of 128 threads");
  const int c = tid % CH;
  const bool col_ok = c * 8 < headdim;
  const T* from = src + (tid / CH) * row_stride + c * 8;
#pragma unroll 1
  for (int r = tid / CH; r < ROWS; r += STEP, from += STEP * row_stride) {
    const bool ok = col_ok && r < nrows;
    cp_async_16(dst + sw128<ROWS>(r, c), ok ? from : src, ok);
  }
}

// The CTA's key block n of BLOCK_C keys, batch item b and kv head hkv, in bwd_sm90 and
// bwd_sm90_wide. Without a pair offset (below), CTAs in launch order (the grid is key blocks
// x batch x kv heads, x fastest) walk sections of p.l2_section (batch item, kv head) pairs,
// whose Q, dO and dQ accumulators share the L2, each section rank by rank: every pair's
// first key block before any pair's second, so that under a causal mask the heaviest key
// blocks (the first, which see every query block) start first (FA3's
// longest-processing-time order) and the last wave holds light ones. Deterministic
// (BwdParams.dq_semaphore) under a right bound (causal, windows): the last key block first,
// so that a query block's dQ adds go from its last key block down, the order in which the
// CTAs reach it (in ascending order the first add of a causal CTA would wait for every key
// block before it to finish its whole span). Either way a CTA waits only for CTAs of its
// pair of lower rank, launched before it.
//
// The paired order (BwdParams.pair_offset >= 0: bwd_sm90_wide, deterministic causal calls
// with as many queries as keys; docs/notes/backward.md, "CTAs of two key blocks"): a 1-D
// grid whose CTAs run one or two key blocks, each a phase. Pairs go two by two, A = 2 g and
// B = 2 g + 1 of group g, sections of max(1, l2_section / 2) groups, rank by rank; a group
// has M + pair_offset CTAs (M key blocks a pair), rank j: first A's block M - 1 - (j -
// pair_offset) (light for small j: its query blocks ascending from its diagonal, turns from
// the last key block down, as above), then B's block j (heavy for small j: query blocks
// descending from the last, turns from key block 0 up), each where it exists. Every wait is
// on a CTA launched before, one step of slack a link; CTA sizes even out to about M + 1 -
// pair_offset steps. An odd last pair runs first, in the order above.
template <int BLOCK_C>
struct BwdKeyBlock {
  bool descending;  // dQ turns from the last key block that reaches a query block down
  bool reverse;     // query blocks walked from the last down
  int n, b, hkv;
  __device__ __forceinline__ explicit BwdKeyBlock(const BwdParams& p)
      : descending(p.dq_semaphore && p.attn.window_right >= 0), reverse(false) {
    const int blocks = gridDim.x, pairs = gridDim.y * gridDim.z;
    const int cta = blockIdx.x + blocks * (blockIdx.y + gridDim.y * blockIdx.z);
    const int first = cta / (p.l2_section * blocks) * p.l2_section;
    const int size = min(p.l2_section, pairs - first), in_section = cta - first * blocks;
    const int rank = in_section / size, pair = first + in_section % size;
    n = descending ? blocks - 1 - rank : rank;
    b = pair % gridDim.y;
    hkv = pair / gridDim.y;
  }
  // Phase `phase` of the CTA (of phases(p)): the block above, or of the paired order.
  __device__ __forceinline__ BwdKeyBlock(const BwdParams& p, int phase)
      : BwdKeyBlock(p.pair_offset < 0 ? BwdKeyBlock(p) : paired(p, phase)) {}
  __device__ __forceinline__ static int phases(const BwdParams& p) {
    if (p.pair_offset < 0) return 1;
    int rank;
    return paired_rank(p, rank) >= 0 && rank >= p.pair_offset && rank < blocks(p) ? 2 : 1;
  }
  // Deterministic: this CTA's turn among the key blocks that reach query rows [m_begin,
  // m_end), those of its visible keys (key_range: the band arithmetic that gave each CTA
  // its span, so every key block of the range adds once), in key-block order.
  __device__ __forceinline__ int turn(const Mask& mask, int m_begin, int m_end) const {
    int key_begin, key_end;
    mask.key_range(m_begin, m_end, key_begin, key_end);
    return descending ? (key_end - 1) / BLOCK_C - n : n - key_begin / BLOCK_C;
  }

 private:
  __device__ __forceinline__ BwdKeyBlock(int n_, int pair, int batch, bool light)
      : descending(light), reverse(!light), n(n_), b(pair % batch), hkv(pair / batch) {}
  __device__ __forceinline__ static int blocks(const BwdParams& p) {
    return (p.attn.seqlen_k + BLOCK_C - 1) / BLOCK_C;
  }
  // The CTA's group (returns -1 for the odd last pair's CTAs, rank = its block) and rank in
  // the paired order.
  __device__ __forceinline__ static int paired_rank(const BwdParams& p, int& rank) {
    const int m = blocks(p), pairs = p.attn.batch * p.attn.nheads_kv;
    int c = blockIdx.x;
    if (pairs & 1) {
      if (c < m) {
        rank = m - 1 - c;
        return -1;
      }
      c -= m;
    }
    const int per_section = max(1, p.l2_section / 2), width = m + p.pair_offset;
    const int first = c / (per_section * width) * per_section;
    const int size = min(per_section, pairs / 2 - first), in_section = c - first * width;
    rank = in_section / size;
    return first + in_section % size;
  }
  __device__ __forceinline__ static BwdKeyBlock paired(const BwdParams& p, int phase) {
    const int m = blocks(p), batch = p.attn.batch;
    int rank;
    const int group = paired_rank(p, rank);
    if (group < 0) return BwdKeyBlock(rank, batch * p.attn.nheads_kv - 1, batch, true);
    const bool light = phase == 0 && rank >= p.pair_offset;  // A's block
    return light ? BwdKeyBlock(m - 1 - (rank - p.pair_offset), 2 * group, batch, true)
                 : BwdKeyBlock(rank, 2 * group + 1, batch, false);
  }
};

// The CTA's steps: batch item b's rows (SeqView), its mask, and the query blocks of BLOCK_R
// rows of every head of kv head hkv's GQA group (heads h0 ..) that see one of the keys
// [o0, o0 + BLOCK_C): step it is block s_begin + it % n_sblocks of head h0 + it /
// n_sblocks, or with `reverse` (BwdKeyBlock) block s_begin + n_sblocks - 1 - it %
// n_sblocks. Each warpgroup builds its own after its setmaxnreg (values kept across it
// spill).
template <int BLOCK_R, int BLOCK_C, bool VARLEN>
struct BwdSteps {
  SeqView<VARLEN> seq;
  Mask mask;
  int h0, s_begin, n_sblocks, iters;
  bool reverse;
  __device__ __forceinline__ BwdSteps(const AttnArgs& a, int b, int o0, int hkv,
                                      bool reverse_ = false)
      : seq(a, b), mask(a, seq), reverse(reverse_) {
    const int group = a.nheads / a.nheads_kv;
    h0 = hkv * group;
    int m_begin, m_end;
    mask.query_range(o0, min(o0 + BLOCK_C, seq.seqlen_k()), m_begin, m_end);
    block_span<BLOCK_R>(m_begin, m_end, s_begin, n_sblocks);
    iters = group * n_sblocks;
  }
  __device__ __forceinline__ int head(int it) const { return h0 + it / n_sblocks; }
  __device__ __forceinline__ int row(int it) const {
    const int j = it % n_sblocks;
    return (s_begin + (reverse ? n_sblocks - 1 - j : j)) * BLOCK_R;
  }
};

// Zeroes the elements of accumulator fragment x (N floats, the wgmma C layout: element
// 4 t + e is key krow + 8 (e / 2), query q_first + 8 t + 2 qd + e % 2) that no (query, key)
// pair of the mask sees. Overwritten, never multiplied: an inf there does not spread. Each
// key's visible queries (Mask::rows_of_key) once, then two compares with an element's
// constant query offset.
template <int N>
__device__ __forceinline__ void zero_invisible(const Mask& mask, float* x, int q_first,
                                               int krow, int qd) {
  int lo[2], hi[2];
#pragma unroll
  for (int hh = 0; hh < 2; ++hh)
    mask.rows_of_key(krow + 8 * hh, q_first + 2 * qd, lo[hh], hi[hh]);
#pragma unroll
  for (int i = 0; i < N; ++i) {
    const int r = 8 * (i / 4) + (i & 1), hh = (i / 2) & 1;
    x[i] = (r >= lo[hh]) & (r <= hi[hh]) ? x[i] : 0.f;
  }
}

// The thread's index, read afresh: what derives from it is then computed where it is
// used, after the kernel's loop, rather than kept through the loop (where it spills in the
// soft-cap instantiations at head dim 128).
__device__ __forceinline__ int fresh_tid() {
  int tid;
  asm volatile("mov.u32 %0, %%tid.x;" : "=r"(tid));
  return tid;
}

// An MMA warpgroup's index and the first of its 64 key rows, from a thread's key row krow
// (16 wq + g past it) and the thread's index read afresh: computed from values kept through
// the kernel's loop, they would change its register allocation.
struct BwdRowsOut {
  int w, first;
};
__device__ __forceinline__ BwdRowsOut bwd_sm90_rows_out(int krow) {
  const int tid = fresh_tid();
  return {tid / 128 - 1, krow - 16 * (tid % 128 / 32) - tid % 32 / 4};
}

// A warpgroup's 64 key rows of dK (scale: the softmax scale) or dV, N columns, from its
// accumulators (a thread's rows 16 wq + g + 8 hh, columns 8 t + 2 qd and + 1) to `out` (the
// first of these rows in the output; `rows` of them in the item, `headdim` columns) through
// `tile`: the warpgroup's rows of K or V in shared memory (128-byte swizzled rows, column
// block cb at cb * blk_bytes), no longer read. Stored in 16-byte chunks, 16 lanes a row of
// 128 columns, where 4-byte stores of two columns would take 8x the instructions and write
// half-used sectors (ops/backward.py gives the kernels outputs whose rows start on 16
// bytes). `bar`: a named barrier of the warpgroup's 128 threads.
template <typename T, int N>
__device__ __forceinline__ void bwd_sm90_store_rows(uint32_t tile, int blk_bytes,
                                                    const float* acc, float scale, int bar,
                                                    T* out, int64 row_stride, int rows,
                                                    int headdim) {
  const int wtid = fresh_tid() % 128, g = wtid % 32 / 4, qd = wtid % 4;
  // Row 16 wq + g + 8 hh, chunk t % 8 ^ g of column block t / 8: as the tile is 1024-byte
  // aligned (rows hh = 1 are 1024 bytes on), an XOR of (t % 8) << 4 into chunk 0's address.
  const uint32_t chunk0 = tile + (16 * (wtid / 32) + g) * 128 + (g << 4) + 4 * qd;
#pragma unroll
  for (int hh = 0; hh < 2; ++hh)
#pragma unroll
    for (int t = 0; t < N / 8; ++t)
      sm90::sts_u32((chunk0 + (t / 8) * blk_bytes + hh * 1024) ^ ((t % 8) << 4),
                    dtype_traits<T>::pack(acc[4 * t + 2 * hh] * scale,
                                          acc[4 * t + 2 * hh + 1] * scale));
  sm90::named_barrier(bar, 128);
  sm90::store_staged_rows<T, N>(tile, blk_bytes, wtid, out, row_stride, rows, headdim);
}

// The offset in floats of element (r, c) of a 64 x 64 dq_accum tile (the layout above).
__device__ __forceinline__ int dq_tile_offset(int r, int c) {
  return 4 * (128 * (c / 8) + 32 * (r / 16) + 4 * (r % 8) + (c % 8) / 2) + 2 * ((r / 8) % 2) +
         c % 2;
}

// Adds a warpgroup's m64n64 dQ accumulators into the dq_accum tile `tile` (the layout
// above), one 16-byte reduction a register quad. Deterministic (sem: the tile's semaphore,
// else nullptr): first this CTA's turn(), waited for by the whole first warp (a divergent
// wait would make ptxas serialize the wgmmas), then the warpgroup's named barrier `bar`;
// after the adds the same barrier orders them before thread 0's pass_global_turn. With a
// turn agent (`agent`: its barrier bwd_turn_go(w), else 0; bwd_sm90_turn_agent), the
// agent warp has waited for the turn: the warpgroup meets it at `agent` before the adds
// and arrives at `added` (bwd_turn_added) after them, and the agent passes the turn.
// Warpgroup w's turn barriers: the agent's go, 10 + w, and the adds issued, 12 + w with
// two warpgroups (an agent each), 13 for all three (one agent, one tile at a time).
__device__ __forceinline__ constexpr int bwd_turn_go(int w) { return 10 + w; }
template <int WGS>
__device__ __forceinline__ constexpr int bwd_turn_added(int w) {
  return WGS == 3 ? 13 : 12 + w;
}
constexpr int BWD_PHASE = 15;  // bwd_sm90_wide's CTA-wide barrier between two phases
template <typename Turn>
__device__ __forceinline__ void bwd_add_dq_tile(float* tile, const float (&dq)[32], int wtid,
                                                int* sem, bool first_warp, int bar, int agent,
                                                int added, Turn turn) {
  if (sem) {
    if (agent) {
      sm90::named_barrier(agent, 160);
    } else {
      if (first_warp) sm90::wait_global_turn(sem, turn());
      __syncwarp();  // the spinning warp converged before the barrier
      sm90::named_barrier(bar, 128);
    }
  }
  float* const dst = tile + 4 * wtid;
#pragma unroll
  for (int t = 0; t < 8; ++t)
    sm90::red_add4(dst + 512 * t, dq[4 * t], dq[4 * t + 1], dq[4 * t + 2], dq[4 * t + 3]);
  if (sem) {
    if (agent)  // the adds, before the agent's release
      sm90::named_barrier_arrive(added, 160);
    else
      sm90::named_barrier(bar, 128);
  }
}

// The second parameter of bwd_sm90 and bwd_sm90_wide (cuflash/ops/backward.py): TMA maps
// of Q and dO, boxes of 64 columns x BLOCK_R rows. With `on` (dense calls), one producer
// thread loads each stage's Q and dO by TMA and its lse and delta by bulk copies; without
// (varlen, where rows past an item must read as zeros, not as the next item's; a map the
// driver refused), the producer's 128 threads copy them by cp.async.
struct BwdSm90Maps {
  sm90::TmaMap q, dout;
  int on;
  // Whether the producer loads by TMA (one thread), and whether it then also holds the
  // deterministic dQ tiles' turns (bwd_sm90_turn_agent: its warps 1 to 3 are free).
  template <bool VARLEN>
  __device__ __forceinline__ bool tma() const { return !VARLEN && on; }
  template <bool VARLEN>
  __device__ __forceinline__ bool agents(const BwdParams& p) const {
    return tma<VARLEN>() && p.dq_semaphore;
  }
};

// The ring's mbarriers of bwd_sm90 and bwd_sm90_wide, at shared address `bars` (an array of
// 2 STAGES + 1): "full" per stage, `full_arrivals` (one per producer warp, or the one TMA
// thread's); "empty" per stage, `empty_arrivals` (one per MMA warp); then full_kv for K and
// V, one per producer warp.
template <int STAGES>
struct BwdRing {
  uint32_t bars;
  __device__ __forceinline__ uint32_t full(int s) const { return bars + 8 * s; }
  __device__ __forceinline__ uint32_t empty(int s) const { return bars + 8 * (STAGES + s); }
  __device__ __forceinline__ uint32_t full_kv() const { return bars + 16 * STAGES; }
  // By one thread, before a CTA barrier.
  __device__ __forceinline__ void init(uint32_t full_arrivals, uint32_t empty_arrivals) const {
    for (int s = 0; s < STAGES; ++s) {
      sm90::mbar_init(full(s), full_arrivals);
      sm90::mbar_init(empty(s), empty_arrivals);
    }
    sm90::mbar_init(full_kv(), 4);
    sm90::fence_barrier_init();
  }
};

// The float offset in dq_accum of the 64 x 64 dQ tile of head h, query rows r .. r + 63 (r
// a multiple of 64) and columns 64 c .. 64 c + 63.
template <int D, bool VARLEN>
__device__ __forceinline__ int64 dq_accum_tile(const BwdParams& p, const SeqView<VARLEN>& seq,
                                               int b, int h, int r, int c) {
  return scratch_row0(p, seq, b, h) * D + (int64(r / 64) * (D / 64) + c) * 4096;
}

// bwd_sm90's: MMA warpgroup w's dQ tile in the step at query row r of head h: at BLOCK_R
// 128 the warpgroups split the step's queries, at D 128 the columns (one of the two, as
// BwdSm90Traits asserts).
template <int D, int BLOCK_R, bool VARLEN>
__device__ __forceinline__ int64 bwd_dq_tile(const BwdParams& p, const SeqView<VARLEN>& seq,
                                             int b, int h, int r, int w) {
  return dq_accum_tile<D>(p, seq, b, h, r + (BLOCK_R == 128 ? 64 * w : 0), D == 128 ? w : 0);
}

// bwd_sm90's dQ writer (Tr::DQ_WRITER, dense calls that are not deterministic): MMA
// warpgroup w stores its dQ tile of each step into shared tile w in dq_accum's order and
// arrives at full(w) (one arrival per warp); lane 0 of the producer's warp 1 adds the tile
// into dq_accum by one bulk reduce-add, waits until it has been read and arrives at
// empty(w). The MMA warps then wait for neither the reductions nor the L2.
struct BwdDqWriter {
  uint32_t bars;  // 4 mbarriers: full(0), full(1), empty(0), empty(1)
  __device__ __forceinline__ uint32_t full(int w) const { return bars + 8 * w; }
  __device__ __forceinline__ uint32_t empty(int w) const { return bars + 8 * (2 + w); }
  __device__ __forceinline__ void init() const {  // by one thread, before a CTA barrier
    for (int w = 0; w < 2; ++w) {
      sm90::mbar_init(full(w), 4);
      sm90::mbar_init(empty(w), 1);
    }
  }
};

// The producer warpgroup of bwd_sm90 and bwd_sm90_wide, after its setmaxnreg: K and V of
// the CTA's BLOCK_C keys once a phase, then Q_i, dO_i, lse_i and delta_i of every step into
// the ring of Tr::STAGES buffers, each stage handed over by its "full" mbarrier and given
// back by its "empty" one (BwdRing). In a CTA's later phase (BwdKeyBlock) the ring runs on
// from the `it0` steps before it, and K and V go where the phase before stored dK and dV.
template <typename Tr, typename T, int D, int DV, int BLOCK_R, bool VARLEN>
__device__ __forceinline__ void bwd_sm90_produce(const BwdParams& p, const BwdSm90Maps& maps,
                                                 uint32_t base, const BwdRing<Tr::STAGES>& ring,
                                                 int b, int o0, int hkv, int tid, bool reverse,
                                                 int it0, BwdDqWriter writer = {0},
                                                 bool writes_dq = false) {
  constexpr int BLOCK_C = Tr::BLOCK_C, STAGES = Tr::STAGES;
  const AttnArgs& a = p.attn;
  const int lane = tid % 32;
  const BwdSteps<BLOCK_R, BLOCK_C, VARLEN> steps(a, b, o0, hkv, reverse);
  const SeqView<VARLEN>& seq = steps.seq;
  // Step it's stage, and the wait until every MMA warp has released it (STAGES steps of
  // the ring before).
  auto stage = [&](int it) { return (it0 + it) % STAGES; };
  auto wait_free = [&](int it) {
    const int g = it0 + it;
    if (g >= STAGES) sm90::mbar_wait(ring.empty(g % STAGES), (g / STAGES - 1) & 1);
  };
  // Rows past the item's queries (the next item's, in varlen) load as zeros, and their
  // lse_log2 (+inf) and delta (0) make their p and dS exactly 0.
  auto load_stream = [&](int it) {  // by the producer's 128 threads
    // Addresses are computed afresh each step from opaque copies of the tile base, the
    // batch index and the thread index: hoisted out of the loop, they would not fit in
    // the producer's registers.
    uint32_t tiles = base;
    int item = seq.b, thread = tid;
    asm volatile("" : "+r"(tiles), "+r"(item), "+r"(thread));
    const int h = steps.head(it), r0 = steps.row(it), buf = stage(it);
    const int64 row = seq.q0 + r0;
    sm90_load_tile<BLOCK_R, D>(tiles + Tr::OFF_Q + buf * Tr::Q_BYTES,
                               static_cast<const T*>(a.q) + item * a.q_batch_stride +
                                   row * a.q_row_stride + h * a.q_head_stride,
                               a.q_row_stride, seq.seqlen_q() - r0, a.headdim, thread);
    sm90_load_tile<BLOCK_R, DV>(tiles + Tr::OFF_DO + buf * Tr::DO_BYTES,
                                static_cast<const T*>(p.dout) + item * p.do_batch_stride +
                                    row * p.do_row_stride + h * p.do_head_stride,
                                p.do_row_stride, seq.seqlen_q() - r0, a.headdim, thread);
    const int64 scratch = scratch_row0(p, seq, b, h) + r0;
    if (thread < BLOCK_R / 4)
      cp_async_16(tiles + Tr::OFF_LSE + buf * BLOCK_R * 4 + 16 * thread,
                  p.lse_log2 + scratch + 4 * thread, true);
    else if (thread < BLOCK_R / 2)
      cp_async_16(tiles + Tr::OFF_DELTA + buf * BLOCK_R * 4 + 16 * (thread - BLOCK_R / 4),
                  p.delta + scratch + 4 * (thread - BLOCK_R / 4), true);
  };
  // By TMA from one thread: Q and dO in boxes of 64 columns (rows past seqlen_q and columns
  // past the head dim read as zeros), lse and delta by bulk copies (the scratch's padded
  // rows), all completing the stage's full barrier's transaction count.
  static_assert(Tr::OFF_Q % 1024 == 0 && Tr::OFF_DO % 1024 == 0 && Tr::Q_BYTES % 1024 == 0 &&
                    Tr::DO_BYTES % 1024 == 0 && BLOCK_R * 128 % 1024 == 0,
                "TMA's 128-byte swizzle from 1024-byte aligned column blocks");
  constexpr int STAGE_BYTES = Tr::Q_BYTES + Tr::DO_BYTES + 2 * BLOCK_R * 4;
  static_assert(Tr::OFF_LSE % 16 == 0 && Tr::OFF_DELTA % 16 == 0 && STAGE_BYTES < (1 << 20),
                "bulk copies to 16-byte aligned buffers; an mbarrier's transaction count");
  auto load_stage_tma = [&](int it) {
    const int h = steps.head(it), r0 = steps.row(it), buf = stage(it);
    const uint32_t full = ring.full(buf);
    sm90::mbar_arrive_expect_tx(full, STAGE_BYTES);
#pragma unroll
    for (int cb = 0; cb < D / 64; ++cb)
      sm90::tma_load_4d(base + Tr::OFF_Q + buf * Tr::Q_BYTES + cb * BLOCK_R * 128, &maps.q,
                        full, 64 * cb, r0, h, b);
#pragma unroll
    for (int cb = 0; cb < DV / 64; ++cb)
      sm90::tma_load_4d(base + Tr::OFF_DO + buf * Tr::DO_BYTES + cb * BLOCK_R * 128,
                        &maps.dout, full, 64 * cb, r0, h, b);
    const int64 scratch = scratch_row0(p, seq, b, h) + r0;
    sm90::bulk_load(base + Tr::OFF_LSE + buf * BLOCK_R * 4, p.lse_log2 + scratch, BLOCK_R * 4,
                    full);
    sm90::bulk_load(base + Tr::OFF_DELTA + buf * BLOCK_R * 4, p.delta + scratch, BLOCK_R * 4,
                    full);
  };
  // Hands a stage over once this thread's copies of it have landed (cp.async.wait_group
  // before the call) and are ordered before the MMA warpgroups' wgmma reads (async
  // proxy): one arrival per warp.
  auto publish = [&](uint32_t bar) {
    sm90::fence_proxy_async();
    __syncwarp();
    sm90::mbar_arrive_if(bar, lane == 0);
  };
  if (steps.iters == 0) return;
  // Keys past the item's (the next item's, in varlen) load as zeros and are masked.
  const int nk = seq.seqlen_k() - o0;
  sm90_load_tile<BLOCK_C, D>(base + Tr::OFF_K,
                             static_cast<const T*>(a.k) + seq.b * a.k_batch_stride +
                                 (seq.k0 + o0) * a.k_row_stride + hkv * a.k_head_stride,
                             a.k_row_stride, nk, a.headdim, tid);
  sm90_load_tile<BLOCK_C, DV>(base + Tr::OFF_V,
                              static_cast<const T*>(a.v) + seq.b * a.v_batch_stride +
                                  (seq.k0 + o0) * a.v_row_stride + hkv * a.v_head_stride,
                              a.v_row_stride, nk, a.headdim, tid);
  cp_async_commit();
  if (maps.tma<VARLEN>()) {
    // The first stages by TMA while K and V land; then thread 0 alone refills each stage
    // as the MMA warps give it back. In a later phase the first stages wait too (bwd_sm90,
    // one phase, has it0 == 0), which holds back warp 0's hand-over of K and V only if a
    // stage were still in use: at BWD_PHASE the MMA warps have released all.
    if (tid == 0)
      for (int it = 0; it < min(STAGES, steps.iters); ++it) {
        if (it0 > 0) wait_free(it);
        load_stage_tma(it);
      }
    cp_async_wait<0>();
    publish(ring.full_kv());
    if (tid == 0)
      for (int it = STAGES; it < steps.iters; ++it) {
        wait_free(it);
        load_stage_tma(it);
      }
    if constexpr (Tr::DQ_WRITER) {
      if (writes_dq && tid == 32) {
        // Tile w of step j: query rows steps.row(j) .., columns 64 w .. (head dim 128).
        for (int j = 0; j < steps.iters; ++j)
          for (int w = 0; w < 2; ++w) {
            sm90::mbar_wait(writer.full(w), j & 1);
            const int64 tile =
                bwd_dq_tile<D, BLOCK_R>(p, seq, b, steps.head(j), steps.row(j), w);
            sm90::bulk_reduce_add_f32(p.dq_accum + tile,
                                      base + Tr::OFF_DQ + w * Tr::DQ_TILE_BYTES,
                                      Tr::DQ_TILE_BYTES);
            sm90::bulk_commit();
            sm90::bulk_wait<0, true>();
            sm90::mbar_arrive(writer.empty(w));
          }
        sm90::bulk_wait<0, false>();
      }
    }
    return;
  }
  wait_free(0);
  load_stream(0);  // in flight with K and V: one round trip before the first step
  cp_async_commit();
  cp_async_wait<1>();
  publish(ring.full_kv());
  cp_async_wait<0>();
  publish(ring.full(stage(0)));
  for (int it = 1; it < steps.iters; ++it) {
    wait_free(it);
    load_stream(it);
    cp_async_commit();
    cp_async_wait<0>();
    publish(ring.full(stage(it)));
  }
}

// Deterministic bwd_sm90 and bwd_sm90_wide with the TMA producer (whose warps 1 to 3 are
// otherwise idle): with two MMA warpgroups, producer warp 1 + w holds the turns of
// warpgroup w's dQ tiles, in the warpgroup's order (step k's TILES tiles, from
// first_tile(seq, h, r, w) on, 4096 floats apart); with three, warp 1 holds every step's
// one tile, step k's of warpgroup k % 3. For each it waits for the tile's turn (ahead of
// the warpgroup, which then finds it taken instead of spending an L2 round trip of its
// warp 0), lets the warpgroup add (named barrier bwd_turn_go: the agent's arrive, the
// warpgroup's sync), waits at bwd_turn_added until all 128 threads have issued their
// adds, and passes the turn from lane 0: the release's fence (the adds' round trip to the
// L2) then stalls this warp, not the warpgroup's next wgmma issue, and the time a turn is
// held covers the adds alone, not the wait for the next stage, the next S^T issue or the
// loop's back edge. Of a step's tiles (two at head dim 256) each but the last is passed
// after the next one's go: the fence would otherwise hold back that go, and the warpgroup
// with it. Each barrier's phases alternate between the two sides, so neither runs a phase
// ahead.
// Run by every producer thread after bwd_sm90_produce; a no-op but in the agents' warps of
// a deterministic call on the TMA path (BwdSm90Maps::agents).
template <typename Tr, int BLOCK_R, int TILES, bool VARLEN, typename FirstTile>
__device__ __forceinline__ void bwd_sm90_turn_agent(const BwdParams& p, const BwdSm90Maps& maps,
                                                    const BwdKeyBlock<Tr::BLOCK_C>& key_block,
                                                    int b, int o0, int hkv, int tid,
                                                    FirstTile first_tile) {
  constexpr int WGS = Tr::THREADS / 128 - 1;
  const int w = tid / 32 - 1, lane = tid % 32;
  if (!maps.agents<VARLEN>(p) || w < 0 || w >= (WGS == 3 ? 1 : WGS)) return;
  const BwdSteps<BLOCK_R, Tr::BLOCK_C, VARLEN> steps(p.attn, b, o0, hkv, key_block.reverse);
  for (int k = 0; k < steps.iters; ++k) {
    const int r = steps.row(k);
    const int turn = key_block.turn(steps.mask, r, min(r + BLOCK_R, steps.seq.seqlen_q()));
    int* const sem = p.dq_semaphore + first_tile(steps.seq, steps.head(k), r, w) / 4096;
    const int owner = WGS == 3 ? k % 3 : w;  // the warpgroup that adds the step's tiles
#pragma unroll 1
    for (int t = 0; t < TILES; ++t) {
      sm90::wait_global_turn(sem + t, turn);
      __syncwarp();
      sm90::named_barrier_arrive(bwd_turn_go(owner), 160);
      if (t > 0 && lane == 0) sm90::pass_global_turn(sem + t - 1);
      sm90::named_barrier(bwd_turn_added<WGS>(owner), 160);
    }
    if (lane == 0) sm90::pass_global_turn(sem + TILES - 1);
  }
}

template <typename T, int D, int BLOCK_C, int BLOCK_R, int OPTS, bool VARLEN = false,
          int DV = D>
__global__ void __launch_bounds__(BwdSm90Traits<D, BLOCK_C, BLOCK_R, DV>::THREADS, 1)
    bwd_sm90(const __grid_constant__ BwdParams p, const __grid_constant__ BwdSm90Maps maps) {
  using Tr = BwdSm90Traits<D, BLOCK_C, BLOCK_R, DV>;
  using Mma = sm90::Wgmma<T, 64>;       // S^T, dP^T: m64n64 per 64-query sub-block
  using MmaD = sm90::Wgmma<T, D>;       // dK: m64 n D
  using MmaV = sm90::Wgmma<T, DV>;      // dV: m64 n DV
  constexpr int STAGES = Tr::STAGES, WGS = Tr::WGS;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const uint32_t raw = smem_addr(smem_raw);
  const uint32_t base = (raw + 1023) & ~1023u;
  __shared__ __align__(8) uint64_t barriers[2 * STAGES + 1];
  const BwdRing<STAGES> ring{smem_addr(barriers)};
  __shared__ __align__(8) uint64_t dq_bars[Tr::DQ_WRITER ? 4 : 1];
  const BwdDqWriter dq_writer{smem_addr(dq_bars)};
  // The dQ writer's calls (BwdDqWriter): its warp is free where the producer loads by TMA.
  const bool writes_dq = Tr::DQ_WRITER && maps.tma<VARLEN>() && p.dq_semaphore == nullptr;

  const AttnArgs& a = p.attn;
  // The MMA warpgroup index (-1: the producer) through a shuffle: the compiler then knows it
  // is warp-uniform, so that branches on it (and the wgmmas inside them) do not count as
  // divergent.
  const int tid = threadIdx.x, wg = __shfl_sync(0xffffffffu, tid / 128, 0) - 1;
  const BwdKeyBlock<BLOCK_C> key_block(p);
  const int b = key_block.b, hkv = key_block.hkv;
  const int o0 = key_block.n * BLOCK_C;  // first key of the CTA
  // Varlen: the grid covers the longest item's keys.
  if constexpr (VARLEN) {
    if (o0 >= SeqView<true>(a, b).seqlen_k()) return;
  }

  if (tid == 0) {
    if (writes_dq) dq_writer.init();
    ring.init(maps.tma<VARLEN>() ? 1 : 4, 4 * WGS);  // ends with the fence of every init
  }
  __syncthreads();

  if (wg < 0) {
    sm90::setmaxnreg_dec<Tr::PRODUCER_REGS>();
    bwd_sm90_produce<Tr, T, D, DV, BLOCK_R, VARLEN>(p, maps, base, ring, b, o0, hkv, tid, false,
                                                    0, dq_writer, writes_dq);
    bwd_sm90_turn_agent<Tr, BLOCK_R, 1, VARLEN>(
        p, maps, key_block, b, o0, hkv, tid, [&](const SeqView<VARLEN>& seq, int h, int r, int w) {
          return bwd_dq_tile<D, BLOCK_R>(p, seq, b, h, r, w);
        });
  } else {
    sm90::setmaxnreg_inc<Tr::MMA_REGS>();
    const BwdSteps<BLOCK_R, BLOCK_C, VARLEN> steps(a, b, o0, hkv);
    const SeqView<VARLEN>& seq = steps.seq;
    // Computed here, not before the warpgroups part: values live across setmaxnreg spill.
    const int wtid = tid % 128, wq = wtid / 32, lane = wtid % 32;
    const bool first_warp = __shfl_sync(0xffffffffu, wq, 0) == 0;  // of its warpgroup
    const int g = lane / 4, qd = lane % 4;

    // The hand-over of dS^T to the dQ tiles (HAND_OVER). Two MMA warpgroups: warpgroup w
    // writes its half of dS^T_j into buffer j % 3, then arrives at named barrier ready(w, j)
    // (bar.arrive: it does not wait); the dQ tile of step j waits at ready(other, j)
    // (bar.sync of 256 threads: the other's 128 arrivals and this warpgroup's 128, so it
    // also orders this warpgroup's own dS^T stores). Reuse: a warpgroup writes buffer
    // j % 3 again at step j + 3 after it waited at ready(other, j + 1) or (j + 2), which
    // the other arrived at after its dQ tile of step j; and it arrives at ready(w, j + 3),
    // the barrier of step j, only after the other's wait there.
    // Three: step j's one dQ tile is warpgroup j % 3's, at the start of step j + 1; the
    // other two arrive at ready(0, j) (384 threads) once their thirds of dS^T_j are in
    // buffer j % 3, and the reader waits there. Reuse: of the warpgroups that write buffer
    // j % 3 at step j + 3, that of j + 1 waited (its dQ tile) for the reader's arrival of
    // step j + 1, that of j + 2 for its arrival of step j + 2, both after the reader's tile
    // of step j; and both arrive at the barrier of step j again after those waits.
    // Without HAND_OVER, both meet at named barrier 3 at the start of each step, after this
    // thread's dS^T stores of the step before are ordered before the async proxy.
    auto ready = [&](int w, int j) { return 4 + 3 * w + j % 3; };  // named barriers 4..9
    auto reads_dq = [&](int j) { return wg == j % 3; };  // three: step j's dQ tile
    auto handed_over = [&](int j) {  // this warpgroup's dS^T_j, to the dQ tile(s)
      sm90::fence_proxy_async();
      if constexpr (WGS == 2)
        sm90::named_barrier_arrive(ready(wg, j), 256);
      else if (!reads_dq(j))
        sm90::named_barrier_arrive(ready(0, j), 384);
    };

    // dQ_j += dS_j K for the dS^T of iteration j (every warpgroup's part in smem): this
    // warpgroup's 64 x 64 tile, added into dq_accum from its accumulators.
    const int qblk = BLOCK_R == 128 ? wg : 0;  // 64-query block of the tile
    const int dblk = D == 128 ? wg : 0;        // 64-column block of the tile
    auto step_barrier = [&] {  // without HAND_OVER, so two warpgroups
      sm90::fence_proxy_async();
      sm90::named_barrier(3, 256);
    };
    // Deterministic with the TMA producer: a producer warp holds this warpgroup's turns
    // (bwd_sm90_turn_agent).
    const bool agent = maps.agents<VARLEN>(p);
    // (h, r: step j's head and first query row.) Deterministic: returns the tile's semaphore
    // index for pass_turn (-1: none, or the agent passes it).
    auto dq_step = [&](int j, int h, int r, float (&dq)[32]) {
      if constexpr (WGS == 3)
        sm90::named_barrier(ready(0, j), 384);
      else if constexpr (Tr::HAND_OVER)
        sm90::named_barrier(ready(1 - wg, j), 256);
      const uint32_t ds_tile =
          base + Tr::OFF_DS + (j % Tr::DS_BUFS) * Tr::DS_BYTES + qblk * Tr::DS_BLK;
      const uint32_t k_tile = base + Tr::OFF_K + dblk * Tr::K_BLK;
      sm90::wgmma_fence();
      const uint64_t d_ds = sm90::make_desc(ds_tile, Tr::DS_BLK);
      const uint64_t d_k = sm90::make_desc(k_tile, Tr::K_BLK);
#pragma unroll
      for (int kk = 0; kk < BLOCK_C / 16; ++kk)  // 16 keys = 16 rows of both tiles per step
        sm90::Wgmma<T, 64>::ss_mn(dq, sm90::desc_at(d_ds, kk * 2048), sm90::desc_at(d_k, kk * 2048),
                                  kk > 0);
      sm90::wgmma_commit();
      sm90::wgmma_wait<0>();
      sm90::fence_regs<32>(dq);
      if (writes_dq) {  // to the writer warp: tile wg, in dq_accum's order
        sm90::mbar_wait(dq_writer.empty(wg), (j & 1) ^ 1);
        const uint32_t dst = base + Tr::OFF_DQ + wg * Tr::DQ_TILE_BYTES + 16 * wtid;
#pragma unroll
        for (int t = 0; t < 8; ++t)
          sm90::sts_u128(dst + 2048 * t,
                         make_uint4(__float_as_uint(dq[4 * t]), __float_as_uint(dq[4 * t + 1]),
                                    __float_as_uint(dq[4 * t + 2]),
                                    __float_as_uint(dq[4 * t + 3])));
        sm90::fence_proxy_async();  // before the bulk reduce-add's reads (async proxy)
        __syncwarp();
        sm90::mbar_arrive_if(dq_writer.full(wg), lane == 0);
        return -1;
      }
      const int64 tile = bwd_dq_tile<D, BLOCK_R>(p, seq, b, h, r, wg);
      int* const sem = p.dq_semaphore ? p.dq_semaphore + tile / 4096 : nullptr;
      // The turn among the key blocks that reach query block r / BLOCK_R.
      bwd_add_dq_tile(p.dq_accum + tile, dq, wtid, sem, first_warp, 1 + wg,
                      agent ? bwd_turn_go(wg) : 0, bwd_turn_added<WGS>(wg), [&] {
                        return key_block.turn(steps.mask, r, min(r + BLOCK_R, seq.seqlen_q()));
                      });
      return sem && !agent ? static_cast<int>(tile / 4096) : -1;
    };
    // Passes the turn of a tile (its semaphore's index from dq_step; -1: none) by thread 0,
    // after the warpgroup's next S^T issue, so that the release's fence runs under S^T's
    // wgmmas (after dP^T's too, the soft-cap instantiations at head dim 128 spilled).
    auto pass_turn = [&](int turn) {
      if (turn >= 0 && wtid == 0) sm90::pass_global_turn(p.dq_semaphore + turn);
    };

    float dv[DV / 2], dk[D / 2];
#pragma unroll
    for (int i = 0; i < DV / 2; ++i) dv[i] = 0.f;
#pragma unroll
    for (int i = 0; i < D / 2; ++i) dk[i] = 0.f;

    // This warpgroup's keys: rows 64 wg .. of K and V; a thread's rows 16 wq + g + 8 hh.
    const uint32_t k_w = base + Tr::OFF_K + wg * 64 * 128;
    const uint32_t v_w = base + Tr::OFF_V + wg * 64 * 128;
    const int key0 = o0 + 64 * wg;
    const int krow = key0 + 16 * wq + g;

    // The turn of this warpgroup's last dQ tile, passed after its next S^T issue (-1: none).
    int held = -1;
    // Step it's head and query block (h, sblk) advanced a step at a time (steps.head and
    // row divide by the block count), and step it - 1's head and first row for its dQ tile.
    int h = steps.h0, sblk = 0, h_prev = 0, r_prev = 0;
    if (steps.iters > 0) sm90::mbar_wait(ring.full_kv(), 0);
    for (int it = 0; it < steps.iters; ++it) {
      const int buf = it % STAGES, r0 = (steps.s_begin + sblk) * BLOCK_R;
      if constexpr (!Tr::HAND_OVER) step_barrier();
      // Warpgroup 0 computes the dQ tile of step it - 1 first, warpgroup 1 last: their
      // tensor-core phases (dQ, S/dP, dV/dK) then interleave with each other's elementwise
      // work instead of running in step (they meet only where one waits for the other's
      // dS^T, see ready()). With three, warpgroup (it - 1) % 3 first, which staggers them.
      constexpr int SB = BLOCK_R / 64;
      // S^T and dP^T of the sub-blocks; before and after them, dp[SB - 1] holds the dQ
      // tile (the same registers: wgmma accumulators are fixed ranges, and a 32-register dQ
      // beside dK, dV, S^T, dP^T, P^T and dS^T would not fit in MMA_REGS). The tile's
      // reductions read its registers only as the LSU drains them: the first S^T, issued
      // before the last dP^T, does not wait for that.
      float s[SB][32], dp[SB][32];
      uint32_t pf[16];  // P^T of a sub-block in 16 bits, the A fragments of dV (P_UNDER_DP)
      if (it > 0 && (WGS == 3 ? reads_dq(it - 1) : wg == 0))
        held = dq_step(it - 1, h_prev, r_prev, dp[SB - 1]);
      sm90::mbar_wait(ring.full(buf), (it / STAGES) & 1);  // Q, dO, lse, delta of step it

      // Sub-blocks of 64 queries: S^T and dP^T are m64n64 (32 floats a thread each), which
      // keeps BLOCK_R = 128 (head dim 64) within the registers. The S/dP of sub-block sb + 1
      // are issued before waiting for the dV/dK of sub-block sb.
      const ScoreMod mod(a, b, h, seq);  // softcap / ALiBi of this step's head
      // dS^T in 16 bits (the A fragments of dK, k16 step kq in elements 4 kq .. 4 kq + 3) is
      // packed into the first 16 registers of dp, and with both score options P^T into those
      // of s: separate arrays would not fit beside the accumulators in MMA_REGS registers.
      // Otherwise P^T has its own 16 (pf): dV is issued before dS^T, which still needs P
      // (or, under soft-cap, P (1 - tanh^2), which takes S^T's registers).
      auto frag = [](const float* x) {
        return [x](int kq, int r) { return __float_as_uint(x[4 * kq + r]); };
      };
      // S^T and dP^T are committed apart, and P is computed while the dP^T wgmmas still run
      // (FA3 overlaps them so); with both score options tested per element (OPTS_RUNTIME)
      // the elements wait for both, as with three warpgroups, whose 160 registers hold no
      // P^T beside S^T and dP^T (there the other warpgroups' wgmmas run under the elements).
      constexpr bool P_UNDER_DP = (OPTS & OPTS_RUNTIME) == 0 && WGS == 2;
      auto issue_s = [&](int sb, float(&s_)[32]) {
        const uint32_t q_s = base + Tr::OFF_Q + buf * Tr::Q_BYTES + sb * 64 * 128;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
          const uint32_t ka = (kk / 4) * Tr::K_BLK + (kk % 4) * 32;
          const uint32_t qa = (kk / 4) * Tr::Q_BLK + (kk % 4) * 32;
          Mma::ss(s_, sm90::desc_at(sm90::make_desc(k_w, 16), ka),
                  sm90::desc_at(sm90::make_desc(q_s, 16), qa), kk > 0);
        }
      };
      auto issue_dp = [&](int sb, float(&dp_)[32]) {
        const uint32_t do_s = base + Tr::OFF_DO + buf * Tr::DO_BYTES + sb * 64 * 128;
#pragma unroll
        for (int kk = 0; kk < DV / 16; ++kk) {
          const uint32_t ka = (kk / 4) * Tr::K_BLK + (kk % 4) * 32;
          const uint32_t qa = (kk / 4) * Tr::Q_BLK + (kk % 4) * 32;
          Mma::ss(dp_, sm90::desc_at(sm90::make_desc(v_w, 16), ka),
                  sm90::desc_at(sm90::make_desc(do_s, 16), qa), kk > 0);
        }
      };
      sm90::wgmma_fence();
      issue_s(0, s[0]);
      if constexpr (P_UNDER_DP) sm90::wgmma_commit();
      pass_turn(held);
      held = -1;
      issue_dp(0, dp[0]);
      sm90::wgmma_commit();
#pragma unroll
      for (int sb = 0; sb < SB; ++sb) {
        const uint32_t q_s = base + Tr::OFF_Q + buf * Tr::Q_BYTES + sb * 64 * 128;
        const uint32_t do_s = base + Tr::OFF_DO + buf * Tr::DO_BYTES + sb * 64 * 128;
        const int q0 = r0 + 64 * sb;
        const uint32_t ds_s =
            base + Tr::OFF_DS + (it % Tr::DS_BUFS) * Tr::DS_BYTES + sb * Tr::DS_BLK;
        // P^T and dS^T of the sub-block. Element 4 t + e: key krow + 8 (e / 2), query q0 +
        // 8 t + 2 qd + e % 2. Every element without a branch; then, only in tiles on a mask
        // boundary, the elements no (query, key) pair sees are set to 0 (their P may be inf
        // before: it is overwritten, never multiplied). 16-bit A fragments: the C fragments
        // of n8 tiles 2 kq, 2 kq + 1 are k16 step kq (element 4 kq + r of the packed array).
        const uint32_t lse_s = base + Tr::OFF_LSE + (buf * BLOCK_R + 64 * sb) * 4;
        const uint32_t del_s = base + Tr::OFF_DELTA + (buf * BLOCK_R + 64 * sb) * 4;
        const ScoreGrad grad{mod, steps.mask, false};
        constexpr int TANH = tanh_form<T, OPTS>();
        const bool on_boundary = steps.mask.tile_needs_mask(q0, q0 + 64, key0, key0 + 64);
        auto pack = [&](float* x) {  // element pairs, in order, into x[0 .. 15]
#pragma unroll
          for (int i = 0; i < 16; ++i)
            x[i] = __uint_as_float(dtype_traits<T>::pack(x[2 * i], x[2 * i + 1]));
        };
        if constexpr (P_UNDER_DP) {
          // FA3's order: P while the dP^T wgmmas run, dV = P^T dO issued, then dS^T once
          // dP^T is in (a masked element's dS is then P = 0 times a finite dP - delta). s
          // holds P, or under soft-cap pd = P (1 - tanh^2) (ScoreGrad::prob_softcap): either
          // way dS = s (dP - delta). lse and delta of a thread's queries are loaded before
          // the waits for S^T and dP^T: the loads queue behind the dQ reductions in the LSU,
          // and their latency then runs under the wgmmas. Under soft-cap at head dim 128
          // (whose instantiations would spill) lse is loaded where used. At head dim 64 delta
          // is loaded with lse (at 128 under dV: its soft-cap instantiations would spill).
          constexpr bool LSE_EARLY = (OPTS & OPTS_SOFTCAP) == 0 || D == 64;
          constexpr bool DELTA_EARLY = D == 64;
          float2 lse_q[8], delta_q[8];
          auto load_delta = [&] {
#pragma unroll
            for (int t = 0; t < 8; ++t)
              delta_q[t] = sm90::lds_f32x2(del_s + 4 * (8 * t + 2 * qd));
          };
          if constexpr (LSE_EARLY) {
#pragma unroll
            for (int t = 0; t < 8; ++t) lse_q[t] = sm90::lds_f32x2(lse_s + 4 * (8 * t + 2 * qd));
          }
          if constexpr (DELTA_EARLY) load_delta();
          sm90::wgmma_wait<1>();  // S^T of the sub-block (and every group before it)
          sm90::fence_regs<32>(s[sb]);
          if (sb > 0) {  // dV of the sub-block before is done (its dK may still run)
            sm90::fence_regs<DV / 2>(dv);
            sm90::fence_regs_u32<16>(pf);
          }
          if constexpr ((OPTS & OPTS_SOFTCAP) != 0) {
            // P (packed into pf) and pd of every element; on a boundary tile (masked: the
            // call's constant argument specializes each copy) those no (query, key) pair
            // sees set to 0 as they are made, before P is packed.
            auto elements = [&](const bool masked) {
              // Element 4 t + e is visible where lo[e / 2] <= 8 t + e % 2 <= hi[e / 2]. From an
              // opaque copy of the key row: hoisted out of the loop, the bounds' parts that
              // depend on the key alone would spill.
              int lo[2], hi[2], key_row = krow;
              asm volatile("" : "+r"(key_row));
#pragma unroll
              for (int hh = 0; hh < 2; ++hh)
                steps.mask.rows_of_key(key_row + 8 * hh, q0 + 2 * qd, lo[hh], hi[hh]);
              float p_even = 0.f;  // P of the even element of a pair of pf
#pragma unroll
              for (int t = 0; t < 8; ++t) {
                const int qc = 8 * t + 2 * qd;
                const float2 l2 = LSE_EARLY ? lse_q[t] : sm90::lds_f32x2(lse_s + 4 * qc);
#pragma unroll
                for (int i = 4 * t; i < 4 * t + 4; ++i) {
                  const int query = q0 + qc + (i & 1), key = krow + 8 * ((i >> 1) & 1);
                  const int r = 8 * t + (i & 1), hh = (i >> 1) & 1;
                  float pd;
                  float p = grad.template prob_softcap<OPTS, TANH>(s[sb][i], query, key,
                                                                   (i & 1) ? l2.y : l2.x, pd);
                  if (masked && (r < lo[hh] || r > hi[hh])) p = pd = 0.f;
                  s[sb][i] = pd;
                  if (i & 1)
                    pf[i / 2] = dtype_traits<T>::pack(p_even, p);
                  else
                    p_even = p;
                }
              }
            };
            if (on_boundary)
              elements(true);
            else
              elements(false);
          } else {
#pragma unroll
            for (int t = 0; t < 8; ++t) {
              const int qc = 8 * t + 2 * qd;
#pragma unroll
              for (int e = 0; e < 4; ++e)
                s[sb][4 * t + e] = grad.template prob<OPTS>(s[sb][4 * t + e], q0 + qc + (e & 1),
                                                            krow + 8 * (e >> 1),
                                                            (e & 1) ? lse_q[t].y : lse_q[t].x);
            }
            if (on_boundary) zero_invisible<32>(steps.mask, s[sb], q0, krow, qd);
#pragma unroll
            for (int i = 0; i < 16; ++i)
              pf[i] = dtype_traits<T>::pack(s[sb][2 * i], s[sb][2 * i + 1]);
          }
          sm90::wgmma_fence();
#pragma unroll
          for (int kq = 0; kq < 4; ++kq) {
            const uint32_t a_frag[4] = {pf[4 * kq], pf[4 * kq + 1], pf[4 * kq + 2], pf[4 * kq + 3]};
            MmaV::rs(dv, a_frag, sm90::desc_at(sm90::make_desc(do_s, Tr::Q_BLK), kq * 2048), 1);
          }
          sm90::wgmma_commit();
          if constexpr (!DELTA_EARLY) load_delta();
          sm90::wgmma_wait<1>();  // dP^T (dV may run)
          sm90::fence_regs<32>(dp[sb]);
#pragma unroll
          for (int t = 0; t < 8; ++t)
#pragma unroll
            for (int e = 0; e < 4; ++e)
              dp[sb][4 * t + e] =
                  s[sb][4 * t + e] * (dp[sb][4 * t + e] - ((e & 1) ? delta_q[t].y : delta_q[t].x));
        } else {
          sm90::wgmma_wait<0>();
          sm90::fence_regs<32>(s[sb]);
          sm90::fence_regs<32>(dp[sb]);
          if (sb > 0) {
            sm90::fence_regs<DV / 2>(dv);
            sm90::fence_regs<D / 2>(dk);
            sm90::fence_regs<16>(s[sb - 1]);
            sm90::fence_regs<16>(dp[sb - 1]);
          }
          // With three warpgroups from an opaque copy of the key row: ALiBi's terms of the key
          // alone, hoisted out of the loop, spill in the varlen instantiations.
          int key_row = krow;
          if constexpr (WGS == 3) asm volatile("" : "+r"(key_row));
#pragma unroll
          for (int t = 0; t < 8; ++t) {
            const int qc = 8 * t + 2 * qd;
            const float2 l2 = sm90::lds_f32x2(lse_s + 4 * qc);
            const float2 d2 = sm90::lds_f32x2(del_s + 4 * qc);
#pragma unroll
            for (int e = 0; e < 4; ++e)
              grad.template operator()<OPTS, TANH>(s[sb][4 * t + e], dp[sb][4 * t + e],
                                                   q0 + qc + (e & 1), key_row + 8 * (e >> 1),
                                                   (e & 1) ? l2.y : l2.x, (e & 1) ? d2.y : d2.x);
          }
          if (on_boundary) {
            zero_invisible<32>(steps.mask, s[sb], q0, key_row, qd);
            zero_invisible<32>(steps.mask, dp[sb], q0, key_row, qd);
          }
          pack(s[sb]);
        }
        pack(dp[sb]);
        const auto dsa = frag(dp[sb]);
        // dS^T -> smem for the dQ of the next step: row = key (64 wg + 16 wq + g + 8 hh),
        // column = query 64 sb + 8 t + 2 qd (column block sb), swizzled (row % 8 == g): byte
        // 16 (t ^ g) + 4 qd of the row, an XOR of 16 t into the address of t = 0 (the tile
        // is 1024-byte aligned).
        uint32_t ds_chunk0 = ds_s + (64 * wg + 16 * wq + g) * 128 + 16 * g + 4 * qd;
        if constexpr (WGS == 3) {  // the same from the thread's index read afresh: kept
          // through the loop, the offset spills in the varlen instantiations
          const int t = fresh_tid(), l = t % 32;
          ds_chunk0 = ds_s + (16 * (t / 32) - 64 + l / 4) * 128 + 16 * (l / 4) + 4 * (l % 4);
        }
#pragma unroll
        for (int t = 0; t < 8; ++t)
#pragma unroll
          for (int hh = 0; hh < 2; ++hh)
            sm90::sts_u32((ds_chunk0 ^ (16 * t)) + 1024 * hh, dsa(t / 2, (t & 1) * 2 + hh));
        if (Tr::HAND_OVER && sb + 1 == SB) handed_over(it);

        // In FA3's order, S^T of the next sub-block goes first, in a group of its own, so
        // that the next P waits neither for this dK nor for the next dP^T.
        sm90::wgmma_fence();
        if constexpr (P_UNDER_DP) {
          if (sb + 1 < SB) {
            issue_s(sb + 1, s[sb + 1]);
            sm90::wgmma_commit();
          }
        } else {
          const auto pa = frag(s[sb]);
#pragma unroll
          for (int kq = 0; kq < 4; ++kq) {
            const uint32_t a_frag[4] = {pa(kq, 0), pa(kq, 1), pa(kq, 2), pa(kq, 3)};
            MmaV::rs(dv, a_frag, sm90::desc_at(sm90::make_desc(do_s, Tr::Q_BLK), kq * 2048), 1);
          }
        }
#pragma unroll
        for (int kq = 0; kq < 4; ++kq) {
          const uint32_t a_frag[4] = {dsa(kq, 0), dsa(kq, 1), dsa(kq, 2), dsa(kq, 3)};
          MmaD::rs(dk, a_frag, sm90::desc_at(sm90::make_desc(q_s, Tr::Q_BLK), kq * 2048), 1);
        }
        if (sb + 1 < SB) {
          if constexpr (!P_UNDER_DP) issue_s(sb + 1, s[sb + 1]);
          issue_dp(sb + 1, dp[sb + 1]);
        }
        sm90::wgmma_commit();
      }
      sm90::wgmma_wait<0>();
      sm90::fence_regs<DV / 2>(dv);
      sm90::fence_regs<D / 2>(dk);
      sm90::fence_regs<16>(dp[SB - 1]);
      if constexpr (P_UNDER_DP)
        sm90::fence_regs_u32<16>(pf);
      else
        sm90::fence_regs<16>(s[SB - 1]);
      __syncwarp();  // the stage's Q, dO, lse and delta are read: back to the producer
      sm90::mbar_arrive_if(ring.empty(buf), lane == 0);
      if (WGS == 2 && wg == 1 && it > 0) held = dq_step(it - 1, h_prev, r_prev, dp[SB - 1]);
      h_prev = h;
      r_prev = r0;
      if (++sblk == steps.n_sblocks) {
        sblk = 0;
        ++h;
      }
    }
    pass_turn(held);
    if (steps.iters > 0 && (WGS == 2 || reads_dq(steps.iters - 1))) {
      if constexpr (!Tr::HAND_OVER) step_barrier();
      float dq[32];
      pass_turn(dq_step(steps.iters - 1, h_prev, r_prev, dq));
    }

    // dV and dK through the warpgroup's rows of V and K, each written by the warpgroup
    // alone: its rows of V are read by its own wgmmas only, all done; K is read by every
    // warpgroup's dQ tiles, whose last is done at named barrier 14 (all MMA threads). With no
    // step, the producer loaded neither.
    const auto [w, first] = bwd_sm90_rows_out(krow);  // key0
    bwd_sm90_store_rows<T, DV>(base + Tr::OFF_V + w * 64 * 128, Tr::K_BLK, dv, 1.f, 1 + w,
                               static_cast<T*>(p.dv) + seq.b * p.dv_batch_stride +
                                   (seq.k0 + first) * p.dv_row_stride + hkv * p.dv_head_stride,
                               p.dv_row_stride, seq.seqlen_k() - first, a.headdim);
    sm90::named_barrier(14, 128 * WGS);
    bwd_sm90_store_rows<T, D>(base + Tr::OFF_K + w * 64 * 128, Tr::K_BLK, dk, a.scale, 1 + w,
                              static_cast<T*>(p.dk) + seq.b * p.dk_batch_stride +
                                  (seq.k0 + first) * p.dk_row_stride + hkv * p.dk_head_stride,
                              p.dk_row_stride, seq.seqlen_k() - first, a.headdim);
  }
}

// bwd_sm90_wide: head dims over 128 (D = 256; smaller ones padded), where a warpgroup's dK
// and dV of 64 keys x D (2 D floats a thread) do not fit in registers. One CTA per (64
// keys, batch item, kv head) with the producer of bwd_sm90 (bwd_sm90_produce) and two MMA
// warpgroups that share the 64 keys and split the head dims: warpgroup w owns columns
// D / 2 w .. of dK and DV / 2 w .. of dV (DV: the head dim of V and dO, D's by default).
// A step (64 queries):
//   warpgroup 0: S^T = K Q_i^T, warpgroup 1: dP^T = V dO_i^T   m64n64, both SS
//   each hands the other the half of its tile that the other turns into P^T and dS^T
//   (float32 through shared memory): warpgroup w computes the elements of queries 32 w ..
//   P^T, dS^T -> shared memory (16 bits, both halves)
//   dV_w += P^T dO_i[:, w],  dK_w += dS^T Q_i[:, w]     m64 n DV / 2 and n D / 2, SS
//   dQ_i[:, w] = dS K[:, w] in two m64n64 tiles, each added into dq_accum (in the
//   accumulators' order, see the top) by 16-byte red.global.add from the accumulators.
// Deterministic (BwdParams.dq_semaphore) as bwd_sm90: the key blocks add into a dQ tile in
// turn, each CTA's 128 threads between one wait for the turn and one pass of it.
template <int D, int DV = D>
struct BwdSm90WideTraits {
  static constexpr int BLOCK_C = 64, BLOCK_R = 64, THREADS = 384, STAGES = 2;
  static constexpr bool DQ_WRITER = false;  // its dQ tiles go by red.global (no room)
  static constexpr int HALF = D / 2, HALF_V = DV / 2;  // a warpgroup's columns of dK, dV
  static constexpr int DQ_TILES = HALF / 64;  // the 64-column dQ tiles a warpgroup adds a step
  static constexpr int PRODUCER_REGS = 40, MMA_REGS = 232;  // as BwdSm90Traits
  static_assert(128 * PRODUCER_REGS + 256 * MMA_REGS <= 168 * THREADS, "registers");
  static constexpr int K_BLK = BLOCK_C * 128;  // bytes of one column block of K or V
  static constexpr int Q_BLK = BLOCK_R * 128;  // of Q or dO
  static constexpr int K_BYTES = K_BLK * (D / 64), V_BYTES = K_BLK * (DV / 64);
  static constexpr int Q_BYTES = Q_BLK * (D / 64), DO_BYTES = Q_BLK * (DV / 64);
  static constexpr int PS_BYTES = BLOCK_C * BLOCK_R * 2;  // P^T or dS^T: one column block
  static constexpr int X_BYTES = 128 * 16 * 4;  // half a warpgroup's S^T or dP^T, float32
  static constexpr int OFF_K = 0;
  static constexpr int OFF_V = OFF_K + K_BYTES;
  static constexpr int OFF_Q = OFF_V + V_BYTES;             // a buffer per stage
  static constexpr int OFF_DO = OFF_Q + STAGES * Q_BYTES;   // a buffer per stage
  static constexpr int OFF_P = OFF_DO + STAGES * DO_BYTES;
  static constexpr int OFF_DS = OFF_P + PS_BYTES;
  static constexpr int OFF_X = OFF_DS + PS_BYTES;          // one per MMA warpgroup
  static constexpr int OFF_LSE = OFF_X + 2 * X_BYTES;      // BLOCK_R floats a stage
  static constexpr int OFF_DELTA = OFF_LSE + STAGES * BLOCK_R * 4;
  static constexpr int SMEM_BYTES = OFF_DELTA + STAGES * BLOCK_R * 4 + 1024;
  static_assert(HALF == 128 && DV % 128 == 0 && BLOCK_R == 64,
                "two 64-column dQ tiles a warpgroup, whole column blocks of dV, one of P^T");
  static_assert(SMEM_BYTES <= 227 * 1024, "shared memory");
  static_assert(SCRATCH_TILE % BLOCK_R == 0, "a step's rows inside the padded scratch");
};

// x = A B^T over K_DIM columns for bwd_sm90_wide's S^T (A = K, B = Q_i) and dP^T (V,
// dO_i): m64n64, both operands K-major in 128B-swizzled tiles at shared addresses a and b.
template <typename T, int K_DIM, typename Tr>
__device__ __forceinline__ void bwd_sm90_wide_sdp(float (&x)[32], uint32_t a, uint32_t b) {
  const uint64_t da = sm90::make_desc(a, 16), db = sm90::make_desc(b, 16);
#pragma unroll
  for (int kk = 0; kk < K_DIM / 16; ++kk)
    sm90::Wgmma<T, 64>::ss(x, sm90::desc_at(da, (kk / 4) * Tr::K_BLK + (kk % 4) * 32),
                           sm90::desc_at(db, (kk / 4) * Tr::Q_BLK + (kk % 4) * 32), kk > 0);
}

// The steps of phase `phase` of a bwd_sm90_wide CTA (BwdKeyBlock, BwdSteps).
template <int BLOCK_R, int BLOCK_C, bool VARLEN>
__device__ __forceinline__ int bwd_sm90_wide_iters(const BwdParams& p, int phase) {
  const BwdKeyBlock<BLOCK_C> key_block(p, phase);
  return BwdSteps<BLOCK_R, BLOCK_C, VARLEN>(p.attn, key_block.b, key_block.n * BLOCK_C,
                                            key_block.hkv)
      .iters;
}

template <typename T, int D, int OPTS, bool VARLEN = false, int DV = D>
__global__ void __launch_bounds__(384, 1) bwd_sm90_wide(const __grid_constant__ BwdParams p,
                                                        const __grid_constant__ BwdSm90Maps maps) {
  using Tr = BwdSm90WideTraits<D, DV>;
  constexpr int BLOCK_C = Tr::BLOCK_C, BLOCK_R = Tr::BLOCK_R, STAGES = Tr::STAGES;
  constexpr int HALF = Tr::HALF, HALF_V = Tr::HALF_V;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const uint32_t base = (smem_addr(smem_raw) + 1023) & ~1023u;
  __shared__ __align__(8) uint64_t barriers[2 * STAGES + 1];
  const BwdRing<STAGES> ring{smem_addr(barriers)};

  const AttnArgs& a = p.attn;
  const int tid = threadIdx.x, wg = __shfl_sync(0xffffffffu, tid / 128, 0) - 1;
  const int lane = tid % 32;
  if constexpr (VARLEN) {
    const BwdKeyBlock<BLOCK_C> key_block(p);
    if (key_block.n * BLOCK_C >= SeqView<true>(a, key_block.b).seqlen_k()) return;
  }
  if (tid == 0) ring.init(maps.tma<VARLEN>() ? 1 : 4, 8);
  __syncthreads();

  // The CTA's key blocks, one a phase (BwdKeyBlock): between two, all its threads meet at
  // named barrier BWD_PHASE once the MMA warpgroups have stored dK and dV through the
  // shared memory of K and V, which the producer then refills; the ring runs on.
  if (wg < 0) {
    sm90::setmaxnreg_dec<Tr::PRODUCER_REGS>();
    // A phase from opaque copies of its index and the thread's (what derives from values
    // kept from one phase to the next spills), the ring's steps before it recomputed.
    auto run = [&](int phase) {
      int thread = tid, fresh = phase;
      asm volatile("" : "+r"(thread), "+r"(fresh));
      const int it0 = fresh > 0 ? bwd_sm90_wide_iters<BLOCK_R, BLOCK_C, VARLEN>(p, 0) : 0;
      {
        const BwdKeyBlock<BLOCK_C> key_block(p, fresh);
        bwd_sm90_produce<Tr, T, D, DV, BLOCK_R, VARLEN>(p, maps, base, ring, key_block.b,
                                                        key_block.n * BLOCK_C, key_block.hkv,
                                                        thread, key_block.reverse, it0);
      }
      asm volatile("" : "+r"(fresh));
      const BwdKeyBlock<BLOCK_C> key_block(p, fresh);
      const int b = key_block.b, hkv = key_block.hkv, o0 = key_block.n * BLOCK_C;
      bwd_sm90_turn_agent<Tr, BLOCK_R, Tr::DQ_TILES, VARLEN>(
          p, maps, key_block, b, o0, hkv, thread,
          [&](const SeqView<VARLEN>& seq, int h, int r, int w) {
            return dq_accum_tile<D>(p, seq, b, h, r, Tr::DQ_TILES * w);
          });
    };
    run(0);
    if (BwdKeyBlock<BLOCK_C>::phases(p) > 1) {
      sm90::named_barrier(BWD_PHASE, 384);
      run(1);
    }
    return;
  }
  sm90::setmaxnreg_inc<Tr::MMA_REGS>();
  const int wtid = tid % 128, wq = wtid / 32, g = lane / 4, qd = lane % 4;
  const bool first_warp = __shfl_sync(0xffffffffu, wq, 0) == 0;  // of its warpgroup
  const uint32_t x_out = base + Tr::OFF_X + wg * Tr::X_BYTES;
  const uint32_t x_in = base + Tr::OFF_X + (1 - wg) * Tr::X_BYTES;
  // Deterministic with the TMA producer: producer warp 1 + wg holds this warpgroup's turns.
  const bool agent = maps.agents<VARLEN>(p);
  const int phases = BwdKeyBlock<BLOCK_C>::phases(p);
  // it0: the ring's steps before the phase; kv: the loads of K and V before it. The
  // producer counts both alike (bwd_sm90_wide_iters, a phase's K and V loaded where it has
  // steps): were they to differ, a wait would never end.
  for (int phase = 0, it0 = 0, kv = 0; phase < phases; ++phase) {
    const BwdKeyBlock<BLOCK_C> key_block(p, phase);
    const int b = key_block.b, hkv = key_block.hkv;
    const int o0 = key_block.n * BLOCK_C;  // first key of the phase
    const BwdSteps<BLOCK_R, BLOCK_C, VARLEN> steps(a, b, o0, hkv, key_block.reverse);
    const SeqView<VARLEN>& seq = steps.seq;
    // This thread's keys (the M side of S^T, dP^T, dK, dV): krow and krow + 8.
    const int krow = o0 + 16 * wq + g;
    if (phase > 0) sm90::named_barrier(BWD_PHASE, 384);

    float dv[HALF_V / 2], dk[HALF / 2];
#pragma unroll
    for (int i = 0; i < HALF_V / 2; ++i) dv[i] = 0.f;
#pragma unroll
    for (int i = 0; i < HALF / 2; ++i) dk[i] = 0.f;

    if (steps.iters > 0) sm90::mbar_wait(ring.full_kv(), kv++ & 1);
    for (int it = 0; it < steps.iters; ++it) {
      const int buf = (it0 + it) % STAGES, q0 = steps.row(it), h = steps.head(it);
      const uint32_t q_s = base + Tr::OFF_Q + buf * Tr::Q_BYTES;
      const uint32_t do_s = base + Tr::OFF_DO + buf * Tr::DO_BYTES;
      // Q, dO, lse, delta of step it
      sm90::mbar_wait(ring.full(buf), ((it0 + it) / STAGES) & 1);

      // S^T (warpgroup 0: K Q^T, D / 16 k-steps) or dP^T (warpgroup 1: V dO^T, DV / 16) of
      // the 64 keys and queries.
      float x[32];
      sm90::wgmma_fence();
      if (DV == D || wg == 0)
        bwd_sm90_wide_sdp<T, D, Tr>(x, base + (wg == 0 ? Tr::OFF_K : Tr::OFF_V),
                                    wg == 0 ? q_s : do_s);
      else
        bwd_sm90_wide_sdp<T, DV, Tr>(x, base + Tr::OFF_V, do_s);
      sm90::wgmma_commit();
      sm90::wgmma_wait<0>();
      sm90::fence_regs<32>(x);
      // Warpgroup w computes elements 16 w .. 16 w + 15 of the 32 (queries 32 w ..): it
      // keeps those of its own tile and hands over the other half, 16 floats a thread in
      // 16-byte groups at (group * 128 + thread) * 16 (consecutive threads, no conflicts).
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const int i = 4 * c;
        sm90::sts_u128(x_out + (c * 128 + wtid) * 16,
                       make_uint4(__float_as_uint(wg == 0 ? x[16 + i] : x[i]),
                                  __float_as_uint(wg == 0 ? x[17 + i] : x[i + 1]),
                                  __float_as_uint(wg == 0 ? x[18 + i] : x[i + 2]),
                                  __float_as_uint(wg == 0 ? x[19 + i] : x[i + 3])));
      }
      sm90::named_barrier(1, 256);  // both halves handed over
      float ps[16], ds[16];  // S^T, dP^T of this warpgroup's elements, then P^T and dS^T
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const uint4 v = sm90::lds_u128(x_in + (c * 128 + wtid) * 16);
        const float other[4] = {__uint_as_float(v.x), __uint_as_float(v.y),
                                __uint_as_float(v.z), __uint_as_float(v.w)};
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float own = wg == 0 ? x[4 * c + e] : x[16 + 4 * c + e];
          ps[4 * c + e] = wg == 0 ? own : other[e];
          ds[4 * c + e] = wg == 0 ? other[e] : own;
        }
      }
      // Element 4 c + e: key krow + 8 (e / 2), query q0 + 32 wg + 8 c + 2 qd + e % 2. As in
      // bwd_sm90: every element without a branch, then the invisible ones of a boundary
      // tile set to 0.
      {
        const ScoreMod mod(a, b, h, seq);
        const ScoreGrad grad{mod, steps.mask, false};
        constexpr int TANH = tanh_form<T, OPTS>();
        const uint32_t lse_s = base + Tr::OFF_LSE + buf * BLOCK_R * 4;
        const uint32_t del_s = base + Tr::OFF_DELTA + buf * BLOCK_R * 4;
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const int qc = 32 * wg + 8 * c + 2 * qd;
          const float2 l2 = sm90::lds_f32x2(lse_s + 4 * qc);
          const float2 d2 = sm90::lds_f32x2(del_s + 4 * qc);
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int i = 4 * c + e, query = q0 + qc + (e & 1), key = krow + 8 * (e >> 1);
            const float lse = (e & 1) ? l2.y : l2.x, delta = (e & 1) ? d2.y : d2.x;
            if constexpr (OPTS == 0) {
              ps[i] = grad.template prob<0>(ps[i], query, key, lse);
              ds[i] = ps[i] * (ds[i] - delta);
            } else {
              grad.template operator()<OPTS, TANH>(ps[i], ds[i], query, key, lse, delta);
            }
          }
        }
        if (steps.mask.tile_needs_mask(q0, q0 + BLOCK_R, o0, o0 + BLOCK_C)) {
          zero_invisible<16>(steps.mask, ps, q0 + 32 * wg, krow, qd);
          zero_invisible<16>(steps.mask, ds, q0 + 32 * wg, krow, qd);
        }
      }
      // P^T and dS^T in 16 bits: row = key 16 wq + g + 8 hh, columns 32 wg + 8 c + 2 qd and
      // + 1 (16-byte chunk 4 wg + c), swizzled (row % 8 == g).
#pragma unroll
      for (int c = 0; c < 4; ++c)
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
          const uint32_t at = (16 * wq + g + 8 * hh) * 128 + (((4 * wg + c) ^ g) << 4) + 4 * qd;
          const int i = 4 * c + 2 * hh;
          sm90::sts_u32(base + Tr::OFF_P + at, dtype_traits<T>::pack(ps[i], ps[i + 1]));
          sm90::sts_u32(base + Tr::OFF_DS + at, dtype_traits<T>::pack(ds[i], ds[i + 1]));
        }
      sm90::fence_proxy_async();
      sm90::named_barrier(2, 256);  // P^T and dS^T whole, for both warpgroups' wgmmas

      // dV_w += P^T dO[:, w], dK_w += dS^T Q[:, w] (A K-major, B N-major: this warpgroup's
      // column blocks), and dQ[:, w] = dS K[:, w] (A = dS^T read M-major) in two 64-column
      // tiles (beside dK and dV, 64 more accumulators spill): the first committed before dV
      // and dK, added into dq_accum while they run, then the second.
      const uint32_t cols = wg * Tr::DQ_TILES;  // first column block of this warpgroup's dK
      const uint32_t vcols = wg * (HALF_V / 64);  // and of its dV
      const uint64_t dsm = sm90::make_desc(base + Tr::OFF_DS, Tr::PS_BYTES);
      float dq[32];
      auto issue_dq = [&](int blk) {  // column block blk of dQ
        const uint64_t dkk = sm90::make_desc(base + Tr::OFF_K + blk * Tr::K_BLK, Tr::K_BLK);
#pragma unroll
        for (int kk = 0; kk < BLOCK_C / 16; ++kk)  // 16 keys: 2048 bytes of both
          sm90::Wgmma<T, 64>::ss_mn(dq, sm90::desc_at(dsm, kk * 2048),
                                    sm90::desc_at(dkk, kk * 2048), kk > 0);
        sm90::wgmma_commit();
      };
      // Adds dQ tile blk; deterministic: in this CTA's turn, and returns the tile's semaphore
      // for pass_turn (nullptr: none, or the agent passes it). The first tile's turn is
      // passed once the second tile's wgmmas are issued: the release waits for the adds to
      // land, and warp 0 waiting there would hold back that issue.
      auto add_dq = [&](int blk) {
        const int64 tile = dq_accum_tile<D>(p, seq, b, h, q0, blk);
        int* const sem = p.dq_semaphore ? p.dq_semaphore + tile / 4096 : nullptr;
        // The turn among the key blocks that reach query block q0 / 64.
        bwd_add_dq_tile(p.dq_accum + tile, dq, wtid, sem, first_warp, 3 + wg,
                        agent ? bwd_turn_go(wg) : 0, bwd_turn_added<2>(wg), [&] {
                          return key_block.turn(steps.mask, q0,
                                                min(q0 + BLOCK_R, seq.seqlen_q()));
                        });
        return agent ? nullptr : sem;
      };
      auto pass_turn = [&](int* sem) {
        if (sem && wtid == 0) sm90::pass_global_turn(sem);
      };
      sm90::wgmma_fence();
      issue_dq(cols);
      {
        const uint64_t dp_ = sm90::make_desc(base + Tr::OFF_P, 16);
        const uint64_t dds = sm90::make_desc(base + Tr::OFF_DS, 16);
        const uint64_t ddo = sm90::make_desc(do_s + vcols * Tr::Q_BLK, Tr::Q_BLK);
        const uint64_t dq_ = sm90::make_desc(q_s + cols * Tr::Q_BLK, Tr::Q_BLK);
#pragma unroll
        for (int kk = 0; kk < BLOCK_R / 16; ++kk)  // 16 queries: 32 bytes of A, 2048 of B
          sm90::Wgmma<T, HALF_V>::ss_kn(dv, sm90::desc_at(dp_, kk * 32),
                                        sm90::desc_at(ddo, kk * 2048), 1);
#pragma unroll
        for (int kk = 0; kk < BLOCK_R / 16; ++kk)
          sm90::Wgmma<T, HALF>::ss_kn(dk, sm90::desc_at(dds, kk * 32),
                                      sm90::desc_at(dq_, kk * 2048), 1);
        sm90::wgmma_commit();
      }
      sm90::wgmma_wait<1>();  // the first dQ tile
      sm90::fence_regs<32>(dq);
      int* const turn = add_dq(cols);
      sm90::wgmma_fence();
      issue_dq(cols + 1);
      pass_turn(turn);
      sm90::wgmma_wait<0>();
      sm90::fence_regs<HALF_V / 2>(dv);
      sm90::fence_regs<HALF / 2>(dk);
      sm90::fence_regs<32>(dq);
      __syncwarp();  // the stage's Q, dO, lse and delta are read: back to the producer
      sm90::mbar_arrive_if(ring.empty(buf), lane == 0);
      pass_turn(add_dq(cols + 1));
    }

    // dV and dK through this warpgroup's column blocks of V and K (all 64 keys, columns HALF
    // wg ..), no longer read: the other warpgroup's S^T or dP^T, which read them whole, was
    // done before each step's named barrier 1, and this warpgroup's dQ tiles read only its
    // own columns of K. With no step, the producer loaded neither.
    const auto [w, first] = bwd_sm90_rows_out(krow);  // o0
    T* const dv_out = static_cast<T*>(p.dv) + seq.b * p.dv_batch_stride +
                      (seq.k0 + first) * p.dv_row_stride + hkv * p.dv_head_stride + HALF_V * w;
    bwd_sm90_store_rows<T, HALF_V>(base + Tr::OFF_V + HALF_V / 64 * w * Tr::K_BLK, Tr::K_BLK,
                                   dv, 1.f, 3 + w, dv_out, p.dv_row_stride,
                                   seq.seqlen_k() - first, a.headdim - HALF_V * w);
    T* const dk_out = static_cast<T*>(p.dk) + seq.b * p.dk_batch_stride +
                      (seq.k0 + first) * p.dk_row_stride + hkv * p.dk_head_stride + HALF * w;
    bwd_sm90_store_rows<T, HALF>(base + Tr::OFF_K + HALF / 64 * w * Tr::K_BLK, Tr::K_BLK, dk,
                                 a.scale, 3 + w, dk_out, p.dk_row_stride, seq.seqlen_k() - first,
                                 a.headdim - HALF * w);
    it0 += steps.iters;
  }
}

// grid (ceil(seqlen_q / 32), nheads, batch), 256 threads: dq = scale * dq_accum, rounded
// to T, from the dq_accum layout of bwd_sm90 and bwd_sm90_wide (see the top), where a
// 16-byte quad holds columns c and c + 1 of rows r and r + 8 (r % 16 < 8). 16 threads a
// pair of such rows, 8 columns (four quads) each at a time.
template <typename T, int D, bool VARLEN = false>
__global__ void __launch_bounds__(256) bwd_convert_dq_sm90(const __grid_constant__ BwdParams p) {
  const AttnArgs& a = p.attn;
  const int pair = threadIdx.x / 16;
  const int row = blockIdx.x * 32 + 16 * (pair / 8) + pair % 8;  // and row + 8
  const int h = blockIdx.y, b = blockIdx.z;
  const SeqView<VARLEN> seq(a, b);
  if (row >= seq.seqlen_q()) return;
  const bool second = row + 8 < seq.seqlen_q();
  const float* slab = p.dq_accum + scratch_row0(p, seq, b, h) * D;
  T* dst = static_cast<T*>(p.dq) + seq.b * p.dq_batch_stride +
           (seq.q0 + row) * p.dq_row_stride + h * p.dq_head_stride;
  const float s = a.scale;
  auto pack = [s](float x, float y) { return dtype_traits<T>::pack(x * s, y * s); };
  for (int c0 = (threadIdx.x % 16) * 8; c0 < a.headdim; c0 += 128) {
    // In 64 bits, as bwd_sm90's dq_step: in int32 this wraps past 2^24 rows at D = 128.
    const float* tile = slab + (int64(row / 64) * (D / 64) + c0 / 64) * 4096;
    float4 x[4];  // columns c0 + 2 u and + 1 of row (x, y) and of row + 8 (z, w)
#pragma unroll
    for (int u = 0; u < 4; ++u)
      x[u] = *reinterpret_cast<const float4*>(tile + dq_tile_offset(row % 64, c0 % 64 + 2 * u));
    *reinterpret_cast<uint4*>(dst + c0) = make_uint4(pack(x[0].x, x[0].y), pack(x[1].x, x[1].y),
                                                     pack(x[2].x, x[2].y), pack(x[3].x, x[3].y));
    if (second)
      *reinterpret_cast<uint4*>(dst + 8 * p.dq_row_stride + c0) = make_uint4(
          pack(x[0].z, x[0].w), pack(x[1].z, x[1].w), pack(x[2].z, x[2].w), pack(x[3].z, x[3].w));
  }
}

}  // namespace cuflash
