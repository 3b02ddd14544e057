// FlashAttention-2 forward.
//
// flash_fwd: fp16 / bf16 on tensor cores (mma.sync m16n8k16, float32 accumulation).
//   One CTA per (query block of Br = BLOCK_M rows, head, batch item); the query blocks of
//   a head run last-first, so that under a causal mask the heaviest blocks start first.
//   Each warp owns M_TILES m16 tiles of query rows. Q goes to registers once (ldmatrix);
//   K and V tiles of Bc = BLOCK_N keys stream through swizzled shared memory by cp.async:
//   V(j) loads while S = Q K(j)^T runs, K(j-1) loads while softmax and P V(j) run. The
//   online softmax works in base 2 with scale * log2(e) folded into one FFMA per score;
//   P stays in registers (the C-fragment of S is the A-fragment of P V); O is divided by
//   l_i once at the end. Only tiles on a mask boundary pay for per-element masking, and key
//   tiles that no row of the query block sees are never visited.
//   VARLEN instantiations serve packed variable-length batches (AttnArgs.cu_seqlens_q/k):
//   blockIdx.z is the batch item, SeqView gives its rows and lengths, and query blocks past
//   its length exit at once (the grid covers the longest item). Dense instantiations
//   compile exactly as before: every SeqView value is then a constant.
// flash_fwd_f32: float32, plain FMA (no TF32), the same algorithm without tensor cores.
#include "common/block_info.cuh"
#include "common/mask.cuh"
#include "common/params.cuh"
#include "common/softmax.cuh"

namespace cuflash {

// Shared-memory row width of a HEAD_DIM tile: the swizzle works on 64-element segments.
__host__ __device__ constexpr int smem_cols(int head_dim) { return (head_dim + 63) / 64 * 64; }

template <typename T, int HEAD_DIM, int BLOCK_M, int BLOCK_N, int NUM_WARPS, bool HAS_SCORE_MOD>
struct FwdTraits {
  static constexpr int NUM_THREADS = NUM_WARPS * 32;
  static constexpr int M_TILES = BLOCK_M / (16 * NUM_WARPS);  // m16 tiles per warp
  static constexpr int N_TILES = BLOCK_N / 8;                  // n8 tiles of S per warp
  static constexpr int D_TILES = HEAD_DIM / 8;                 // n8 tiles of O per warp
  static constexpr int K_STEPS = HEAD_DIM / 16;                // k16 steps of Q K^T
  static constexpr int SC = smem_cols(HEAD_DIM);
  // Q in registers costs M_TILES * HEAD_DIM / 4 registers; past 32 (16 with the score
  // function's extra live values) it would crowd out the accumulators, so Q fragments are
  // then re-read from shared memory (as FlashAttention-2; docs/notes/forward.md, v3).
  static constexpr bool Q_IN_REGS = M_TILES * HEAD_DIM <= (HAS_SCORE_MOD ? 64 : 128);
  // Recompute K/V copy addresses per tile (load_tile's LAUNDER) where registers are short.
  static constexpr bool LAUNDER = Q_IN_REGS || HAS_SCORE_MOD;
  static constexpr int SMEM_BYTES = (BLOCK_M + 2 * BLOCK_N) * SC * 2;
  static_assert(BLOCK_M % (16 * NUM_WARPS) == 0, "each warp owns whole m16 tiles");
  static_assert(BLOCK_N % 16 == 0 && HEAD_DIM % 16 == 0, "k16 steps");
};

// Copies `nrows` rows (at most ROWS) of HEAD_DIM elements from `src` (row stride in
// elements) into a swizzled ROWS x SC tile at shared address `dst`. Rows >= nrows and
// columns >= headdim are zero-filled, so padding reads as zeros in every product.
template <int ROWS, int HEAD_DIM, int NUM_THREADS, bool LAUNDER = false, typename T>
__device__ __forceinline__ void load_tile(uint32_t dst, const T* src, int64 row_stride,
                                          int nrows, int headdim, int tid) {
  constexpr int CHUNKS = HEAD_DIM / 8;  // 16-byte chunks per row
  static_assert(ROWS * CHUNKS % NUM_THREADS == 0, "every thread copies the same count");
  // LAUNDER hides tid's loop invariance: otherwise ptxas keeps every chunk's 64-bit address
  // live across the key loop, which spills when Q also sits in registers; recomputing them
  // costs a few integer ops per 16-byte copy (slower where registers are not short).
  if (LAUNDER) asm volatile("" : "+r"(tid));
#pragma unroll
  for (int it = 0; it < ROWS * CHUNKS / NUM_THREADS; ++it) {
    int idx = it * NUM_THREADS + tid;
    int r = idx / CHUNKS, c = idx % CHUNKS;
    bool ok = r < nrows && c * 8 < headdim;
    const T* p = ok ? src + r * row_stride + c * 8 : src;
    cp_async_16(dst + swizzle<smem_cols(HEAD_DIM)>(r, c * 8) * 2, p, ok);
  }
}

// Shared-memory byte offsets of this lane's ldmatrix row in a swizzled tile, for fragments
// whose 16-byte chunk is 2 * ks + half (ks = k16 step, half = 0 or 1). The swizzle XORs the
// chunk with row % 8, which is the same for every tile row this lane reads (they differ by
// multiples of 8), so four offsets (ks % 4) cover every ks and every row step; the rest of
// the address is a compile-time immediate. Computing swizzle() per fragment instead keeps
// one live address register per fragment (ptxas does not see the XOR factor out).
template <int SC>
struct FragOffsets {
  uint32_t off[4];
  __device__ __forceinline__ FragOffsets(int row, int half) {
#pragma unroll
    for (int j = 0; j < 4; ++j) off[j] = (row * SC + (((2 * j + half) ^ (row & 7)) << 3)) * 2;
  }
  // Byte offset of the fragment `rows` rows further down (a multiple of 8) at k16 step ks.
  __device__ __forceinline__ uint32_t at(int rows, int ks) const {
    return off[ks % 4] + rows * SC * 2 + (ks / 4) * 128;
  }
};

template <typename T, int HEAD_DIM, int BLOCK_M, int BLOCK_N, int NUM_WARPS, bool HAS_SCORE_MOD,
          bool VARLEN = false>
__global__ void __launch_bounds__(NUM_WARPS * 32, NUM_WARPS <= 4 ? 2 : 1)
flash_fwd(const __grid_constant__ FwdParams p) {
  using Tr = FwdTraits<T, HEAD_DIM, BLOCK_M, BLOCK_N, NUM_WARPS, HAS_SCORE_MOD>;
  constexpr int M_TILES = Tr::M_TILES, N_TILES = Tr::N_TILES, D_TILES = Tr::D_TILES;
  constexpr int K_STEPS = Tr::K_STEPS, SC = Tr::SC, NUM_THREADS = Tr::NUM_THREADS;
  constexpr int Br = BLOCK_M, Bc = BLOCK_N;
  const AttnArgs& a = p.attn;

  extern __shared__ __align__(128) unsigned char smem[];
  const uint32_t sQ = smem_addr(smem);
  const uint32_t sK = sQ + Br * SC * 2;
  const uint32_t sV = sK + Bc * SC * 2;

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const FwdBlock<T, Br, VARLEN> blk(a);
  if (blk.past_end()) return;
  const SeqView<VARLEN>& seq = blk.seq;
  const int h = blk.h, b = blk.b, m0 = blk.m0, rows = blk.rows();
  const T *q = blk.q(a, m0), *k = blk.k(a), *v = blk.v(a);

  const Mask mask(a, seq);
  const ScoreMod mod(a, b, h, seq);
  int key_begin, key_end;
  mask.key_range(m0, m0 + rows, key_begin, key_end);
  const int n_block_min = key_begin / Bc;
  const int n_block_max = key_end > key_begin ? (key_end + Bc - 1) / Bc : n_block_min;

  // This thread's rows (lane / 4, + 8) and columns (2 * (lane % 4), + 1) in C-fragments.
  const int warp_row0 = warp * 16 * M_TILES;
  const int frag_row0 = m0 + warp_row0 + lane / 4;

  float acc_o[M_TILES][D_TILES][4];
#pragma unroll
  for (int mt = 0; mt < M_TILES; ++mt)
#pragma unroll
    for (int dt = 0; dt < D_TILES; ++dt)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc_o[mt][dt][e] = 0.f;
  OnlineSoftmax<M_TILES> softmax;

  if (n_block_max > n_block_min) {
    load_tile<Br, HEAD_DIM, NUM_THREADS>(sQ, q, a.q_row_stride, rows, a.headdim, tid);
    cp_async_commit();
    int n_block = n_block_max - 1;
    load_tile<Bc, HEAD_DIM, NUM_THREADS>(sK, k + n_block * Bc * a.k_row_stride, a.k_row_stride,
                                         seq.seqlen_k() - n_block * Bc, a.headdim, tid);
    cp_async_commit();

    // ldmatrix.x4 lanes: A of an m16 x k16 tile reads row lane % 16, k-half lane / 16; B of two
    // n8 tiles (K) reads row lane % 8 + 8 * (lane / 16), k-half (lane / 8) % 2; V (.trans, k =
    // keys) reads key lane % 8 + 8 * ((lane / 8) % 2), column half lane / 16.
    const FragOffsets<SC> q_off(warp_row0 + (lane & 15), lane >> 4);
    const FragOffsets<SC> k_off((lane & 7) + (lane >> 4) * 8, (lane >> 3) & 1);
    const FragOffsets<SC> v_off((lane & 7) + ((lane >> 3) & 1) * 8, lane >> 4);
    auto q_addr = [&](int mt, int ks) { return sQ + q_off.at(mt * 16, ks); };
    uint32_t q_frag[Tr::Q_IN_REGS ? M_TILES : 1][Tr::Q_IN_REGS ? K_STEPS : 1][4];
    if constexpr (Tr::Q_IN_REGS) {
      cp_async_wait<1>();
      __syncthreads();
#pragma unroll
      for (int mt = 0; mt < M_TILES; ++mt)
#pragma unroll
        for (int ks = 0; ks < K_STEPS; ++ks) ldmatrix_x4(q_frag[mt][ks], q_addr(mt, ks));
    }

    for (; n_block >= n_block_min; --n_block) {
      const int n0 = n_block * Bc;
      load_tile<Bc, HEAD_DIM, NUM_THREADS, Tr::LAUNDER>(sV, v + n0 * a.v_row_stride,
                                                        a.v_row_stride, seq.seqlen_k() - n0,
                                                        a.headdim, tid);
      cp_async_commit();
      cp_async_wait<1>();  // K(n_block) (and Q) landed
      __syncthreads();

      // S = Q K^T. ldmatrix.x4 of K gives the B-fragments of two n8 tiles for one k16 step.
      float s[M_TILES][N_TILES][4];
#pragma unroll
      for (int mt = 0; mt < M_TILES; ++mt)
#pragma unroll
        for (int nt = 0; nt < N_TILES; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) s[mt][nt][e] = 0.f;
      // With Q in shared memory the k16 steps run in groups of four (rolled between groups):
      // fully unrolled, ptxas hoists every Q and K fragment of the tile and spills at 255
      // registers. Q in registers needs compile-time indices, hence the full unroll.
      constexpr bool GROUPED = !Tr::Q_IN_REGS && K_STEPS % 4 == 0;
      constexpr int KS_GROUP = GROUPED ? 4 : K_STEPS;
#pragma unroll 1
      for (int ks0 = 0; ks0 < K_STEPS; ks0 += KS_GROUP) {
#pragma unroll
        for (int j = 0; j < KS_GROUP; ++j) {  // k16 step ks0 + j; ks0 is 0 unless GROUPED
          const uint32_t group = (ks0 / 4) * 128;  // bytes; FragOffsets::at covers j
          uint32_t qf[M_TILES][4];
#pragma unroll
          for (int mt = 0; mt < M_TILES; ++mt) {
            if constexpr (Tr::Q_IN_REGS) {
#pragma unroll
              for (int e = 0; e < 4; ++e) qf[mt][e] = q_frag[mt][j][e];
            } else {
              ldmatrix_x4(qf[mt], sQ + q_off.at(mt * 16, j) + group);
            }
          }
#pragma unroll
          for (int np = 0; np < N_TILES / 2; ++np) {
            uint32_t kf[4];
            ldmatrix_x4(kf, sK + k_off.at(np * 16, j) + group);
#pragma unroll
            for (int mt = 0; mt < M_TILES; ++mt) {
              mma_16816<T>(s[mt][2 * np], qf[mt], kf[0], kf[1]);
              mma_16816<T>(s[mt][2 * np + 1], qf[mt], kf[2], kf[3]);
            }
          }
        }
      }
      __syncthreads();  // every warp is done with sK
      if (n_block > n_block_min) {
        const int n0_next = n0 - Bc;
        load_tile<Bc, HEAD_DIM, NUM_THREADS, Tr::LAUNDER>(sK, k + n0_next * a.k_row_stride,
                                                          a.k_row_stride, seq.seqlen_k() - n0_next,
                                                          a.headdim, tid);
      }
      cp_async_commit();

      const int col0 = n0 + 2 * (lane & 3);
      const bool boundary = mask.tile_needs_mask(m0, m0 + Br, n0, n0 + Bc);
      float factor = mod.scale_log2;
      if constexpr (HAS_SCORE_MOD) {
        factor = 1.f;
        if (boundary)
          score_fragment<OPTS_RUNTIME, true>(s, frag_row0, col0, mod, mask);
        else
          score_fragment<OPTS_RUNTIME, false>(s, frag_row0, col0, mod, mask);
      } else {
        if (boundary) score_fragment<0, true>(s, frag_row0, col0, mod, mask);
      }
      softmax.update(s, acc_o, factor);

      cp_async_wait<1>();  // V(n_block) landed
      __syncthreads();

      // O += P V. P's C-fragments, rounded to T, are A-fragments; V via ldmatrix.trans.
#pragma unroll
      for (int kk = 0; kk < Bc / 16; ++kk) {
        uint32_t pf[M_TILES][4];
#pragma unroll
        for (int mt = 0; mt < M_TILES; ++mt) {
          pf[mt][0] = dtype_traits<T>::pack(s[mt][2 * kk][0], s[mt][2 * kk][1]);
          pf[mt][1] = dtype_traits<T>::pack(s[mt][2 * kk][2], s[mt][2 * kk][3]);
          pf[mt][2] = dtype_traits<T>::pack(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
          pf[mt][3] = dtype_traits<T>::pack(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
        }
#pragma unroll
        for (int dp = 0; dp < D_TILES / 2; ++dp) {
          uint32_t vf[4];
          ldmatrix_x4_trans(vf, sV + v_off.at(kk * 16, dp));
#pragma unroll
          for (int mt = 0; mt < M_TILES; ++mt) {
            mma_16816<T>(acc_o[mt][2 * dp], pf[mt], vf[0], vf[1]);
            mma_16816<T>(acc_o[mt][2 * dp + 1], pf[mt], vf[2], vf[3]);
          }
        }
      }
      __syncthreads();  // every warp is done with sV before the next tile overwrites it
    }
  }

  float lse[M_TILES][2];
  softmax.finalize(acc_o, lse);

  const SeqView<VARLEN> out_seq = reread(seq, a, b);
  T* o = blk.out(p, out_seq);
  float* lse_out = blk.lse(p, out_seq);
  const int col = 2 * (lane & 3);
#pragma unroll
  for (int mt = 0; mt < M_TILES; ++mt)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int i = frag_row0 + mt * 16 + r * 8;
      if (i >= out_seq.seqlen_q()) continue;
      T* o_row = o + i * p.o_row_stride;
#pragma unroll
      for (int dt = 0; dt < D_TILES; ++dt)
        if (dt * 8 + col < a.headdim)
          *reinterpret_cast<uint32_t*>(o_row + dt * 8 + col) =
              dtype_traits<T>::pack(acc_o[mt][dt][2 * r], acc_o[mt][dt][2 * r + 1]);
      if ((lane & 3) == 0) lse_out[i] = lse[mt][r];
    }
}

// float32: each warp owns F32_ROWS query rows; lane j scores key j of a 32-key tile, then
// lane d accumulates output columns d, d + 32, ... Natural-log softmax with expf, so the
// result carries float32 rounding only.
// Shared memory: Q (Br x HEAD_DIM), K (Bc x HEAD_DIM + 1), V (Bc x HEAD_DIM) floats; the
// launcher (cuflash/ops/forward.py, mma_config) computes the same size.
#define F32_WARPS 4
#define F32_ROWS 4

// At least 4 CTAs an SM, so at most 128 registers a thread: enough at every head dim on
// every arch, where ptxas' own choice for sm_86 / sm_89 (1536 threads an SM) spilled.
template <int HEAD_DIM, bool VARLEN = false>
__global__ void __launch_bounds__(F32_WARPS * 32, 4)
flash_fwd_f32(const __grid_constant__ FwdParams p) {
  constexpr int Br = F32_WARPS * F32_ROWS, Bc = 32, COLS = HEAD_DIM / 32;
  constexpr int KS = HEAD_DIM + 1;  // padded K rows: lane j reads row j without conflicts
  const AttnArgs& a = p.attn;
  extern __shared__ __align__(16) float smem_f32[];
  float* sQ = smem_f32;
  float* sK = sQ + Br * HEAD_DIM;
  float* sV = sK + Bc * KS;

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const FwdBlock<float, Br, VARLEN> blk(a);
  if (blk.past_end()) return;
  const SeqView<VARLEN>& seq = blk.seq;
  const int h = blk.h, b = blk.b, m0 = blk.m0, rows = blk.rows();
  const float *q = blk.q(a, 0), *k = blk.k(a), *v = blk.v(a);

  const Mask mask(a, seq);
  const int diag = seq.seqlen_k() - seq.seqlen_q();
  const float slope = a.alibi_slopes ? a.alibi_slopes[b * a.alibi_batch_stride + h] : 0.f;
  int key_begin, key_end;
  mask.key_range(m0, m0 + rows, key_begin, key_end);

  for (int idx = tid; idx < Br * HEAD_DIM; idx += F32_WARPS * 32) {
    int r = idx / HEAD_DIM, c = idx % HEAD_DIM;
    sQ[idx] = r < rows && c < a.headdim ? q[(m0 + r) * a.q_row_stride + c] : 0.f;
  }

  float acc[F32_ROWS][COLS], m_i[F32_ROWS], l_i[F32_ROWS];
#pragma unroll
  for (int r = 0; r < F32_ROWS; ++r) {
    m_i[r] = neg_inf();
    l_i[r] = 0.f;
#pragma unroll
    for (int c = 0; c < COLS; ++c) acc[r][c] = 0.f;
  }

  for (int n0 = key_begin / Bc * Bc; n0 < key_end; n0 += Bc) {
    __syncthreads();  // sQ written / previous sK, sV consumed
    for (int idx = tid; idx < Bc * HEAD_DIM; idx += F32_WARPS * 32) {
      int r = idx / HEAD_DIM, c = idx % HEAD_DIM;
      bool ok = n0 + r < seq.seqlen_k() && c < a.headdim;
      sK[r * KS + c] = ok ? k[(n0 + r) * a.k_row_stride + c] : 0.f;
      sV[idx] = ok ? v[(n0 + r) * a.v_row_stride + c] : 0.f;
    }
    __syncthreads();
    const int j = n0 + lane;
#pragma unroll
    for (int r = 0; r < F32_ROWS; ++r) {
      const int i = m0 + warp * F32_ROWS + r;
      const float* qr = sQ + (warp * F32_ROWS + r) * HEAD_DIM;
      float s = 0.f;
#pragma unroll 16
      for (int d = 0; d < HEAD_DIM; ++d) s = fmaf(qr[d], sK[lane * KS + d], s);
      s *= a.scale;
      if (a.softcap > 0.f) s = a.softcap * tanhf(s / a.softcap);
      s -= slope * static_cast<float>(abs(i + diag - j));
      if (!mask.visible(i, j)) s = neg_inf();
      float mx = s;
#pragma unroll
      for (int off = 16; off > 0; off /= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
      const float m_new = fmaxf(m_i[r], mx);
      const float m_use = m_new == neg_inf() ? 0.f : m_new;
      const float alpha = expf(m_i[r] - m_use);
      const float pj = expf(s - m_use);
      float sum = pj;
#pragma unroll
      for (int off = 16; off > 0; off /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, off);
      m_i[r] = m_new;
      l_i[r] = l_i[r] * alpha + sum;
#pragma unroll
      for (int c = 0; c < COLS; ++c) acc[r][c] *= alpha;
#pragma unroll 8
      for (int jj = 0; jj < Bc; ++jj) {
        const float pjj = __shfl_sync(0xffffffffu, pj, jj);
#pragma unroll
        for (int c = 0; c < COLS; ++c)
          acc[r][c] = fmaf(pjj, sV[jj * HEAD_DIM + lane + 32 * c], acc[r][c]);
      }
    }
  }

  float* o = blk.out(p, seq);
  float* lse_out = blk.lse(p, seq);
#pragma unroll
  for (int r = 0; r < F32_ROWS; ++r) {
    const int i = m0 + warp * F32_ROWS + r;
    if (i >= seq.seqlen_q()) continue;
    // As OnlineSoftmax::finalize (common/softmax.cuh): no key gives 0 and -inf; a NaN
    // score (l_i NaN) or value (acc NaN) gives NaN in the whole row and in lse.
    bool nan = false;
#pragma unroll
    for (int c = 0; c < COLS; ++c) nan |= isnan(acc[r][c]);
    nan = __any_sync(0xffffffffu, nan);
    const bool empty = l_i[r] == 0.f;
    const float inv = empty ? 0.f : nan ? quiet_nan() : 1.f / l_i[r];
#pragma unroll
    for (int c = 0; c < COLS; ++c)
      if (lane + 32 * c < a.headdim)
        o[i * p.o_row_stride + lane + 32 * c] = empty ? 0.f : acc[r][c] * inv;
    if (lane == 0) lse_out[i] = empty ? neg_inf() : nan ? quiet_nan() : m_i[r] + logf(l_i[r]);
  }
}

}  // namespace cuflash
