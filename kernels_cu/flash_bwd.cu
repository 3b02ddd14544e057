// Attention backward, FlashAttention-2 style (recompute P from the saved lse):
//   bwd_preprocess  delta = rowsum(dout * out), lse in base 2, zeroed dq accumulator
//   bwd_main        fp16/bf16 on tensor cores; MODE (flags) picks what one launch computes:
//                     BWD_DK | BWD_DV | BWD_DQ_ATOMIC  dK, dV per key block, plus its share
//                                                      of dQ added with float atomics
//                     BWD_DK | BWD_DV                  dK, dV only (deterministic mode)
//                     BWD_DQ                           dQ per query block, written directly
//                                                      (deterministic mode)
//                   Head dims 192 and 256 run dV and dK (+ dQ) as two launches, because
//                   both accumulators of 16 rows x 256 would need 256 registers a thread.
//   bwd_main_f32    float32, the same algorithm on plain FMAs (no TF32)
//   bwd_convert_dq  dq = scale * dq_accum in the input dtype
// Every kernel has VARLEN instantiations for packed variable-length batches (AttnArgs
// cu_seqlens_q/k; a template flag, or the BWD_VARLEN bit of MODE): SeqView gives the batch
// item's rows and lengths, and blocks past its length exit at once. Dense instantiations
// compile exactly as before.
//
// One algorithm serves the three modes. A CTA owns a block of "owner" rows (keys for dK/dV,
// queries for dQ) whose two tiles A1, A2 (K, V or Q, dO) stay in shared memory, and streams
// blocks of the other side B1, B2 (Q, dO or K, V) through a double buffer:
//   S = A1 B1^T, dP = A2 B2^T                  (keys x queries, or queries x keys)
//   P = exp2(logit(S) - lse_log2),  dS = P * (dP - delta) * softcap'
//   acc1 += dS B1   (dK += dS^T Q, or dQ += dS K);   acc2 += P B2   (dV += P^T dO)
// Each warp owns 16 * M_TILES owner rows, so the C-fragments of P and dS are directly the
// A-fragments of the two accumulating products (no shared-memory round trip). For
// BWD_DKDV_DQ, dS^T also goes to shared memory, and after a barrier the CTA computes its
// share dQ_i += dS K_j of the streamed query block and adds it into dq_accum.
#include "common/block_info.cuh"
#include "common/bwd_scratch.cuh"
#include "common/mask.cuh"
#include "common/params.cuh"

namespace cuflash {

__device__ __forceinline__ float inf_f32() { return __int_as_float(0x7f800000); }

// Two elements of a 32-bit word of T as floats.
template <typename T> __device__ __forceinline__ float2 unpack2(uint32_t v);
template <> __device__ __forceinline__ float2 unpack2<__half>(uint32_t v) {
  return __half22float2(*reinterpret_cast<__half2*>(&v));
}
template <> __device__ __forceinline__ float2 unpack2<__nv_bfloat16>(uint32_t v) {
  return __bfloat1622float2(*reinterpret_cast<__nv_bfloat162*>(&v));
}

// Dot product of two 16-byte vectors of T, in float32.
template <typename T> __device__ __forceinline__ float dot16(uint4 a, uint4 b) {
  const uint32_t x[4] = {a.x, a.y, a.z, a.w}, y[4] = {b.x, b.y, b.z, b.w};
  float s = 0.f;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if constexpr (sizeof(T) == 4) {
      s = fmaf(__uint_as_float(x[i]), __uint_as_float(y[i]), s);
    } else {
      float2 fx = unpack2<T>(x[i]), fy = unpack2<T>(y[i]);
      s = fmaf(fx.x, fy.x, s);
      s = fmaf(fx.y, fy.y, s);
    }
  }
  return s;
}

// Eight (fp16/bf16) or four (float) floats as the 16 bytes of T they round to.
template <typename T> __device__ __forceinline__ uint4 pack16(const float* f) {
  if constexpr (sizeof(T) == 4) {
    return make_uint4(__float_as_uint(f[0]), __float_as_uint(f[1]), __float_as_uint(f[2]),
                      __float_as_uint(f[3]));
  } else {
    return make_uint4(dtype_traits<T>::pack(f[0], f[1]), dtype_traits<T>::pack(f[2], f[3]),
                      dtype_traits<T>::pack(f[4], f[5]), dtype_traits<T>::pack(f[6], f[7]));
  }
}

// Rows of PRE_ROWS per block, PRE_LANES threads per row reading 16 bytes each at a time.
constexpr int PRE_LANES = 8;
constexpr int PRE_THREADS = 256;
constexpr int PRE_ROWS = PRE_THREADS / PRE_LANES;

// grid (seqlen_q_pad / PRE_ROWS, nheads, batch); varlen: round_up(max_seqlen_q,
// SCRATCH_TILE) / PRE_ROWS. Padded rows (>= seqlen_q) get delta 0 and lse_log2 +inf; so does
// a fully masked row (lse -inf), which makes its p exactly 0.
template <typename T, bool VARLEN = false>
__global__ void __launch_bounds__(PRE_THREADS) bwd_preprocess(const __grid_constant__ BwdParams p) {
  const AttnArgs& a = p.attn;
  const int row = blockIdx.x * PRE_ROWS + threadIdx.x / PRE_LANES;
  const int lane = threadIdx.x % PRE_LANES;
  const int h = blockIdx.y, b = blockIdx.z;
  const SeqView<VARLEN> seq(a, b);
  constexpr int EPV = 16 / sizeof(T);  // elements per 16-byte vector
  float acc = 0.f;
  if (row < seq.seqlen_q()) {
    const T* o = static_cast<const T*>(p.out) + seq.b * p.o_batch_stride +
                 (seq.q0 + row) * p.o_row_stride + h * p.o_head_stride;
    const T* d = static_cast<const T*>(p.dout) + seq.b * p.do_batch_stride +
                 (seq.q0 + row) * p.do_row_stride + h * p.do_head_stride;
    for (int c = lane * EPV; c < a.headdim; c += PRE_LANES * EPV) {
      acc += dot16<T>(*reinterpret_cast<const uint4*>(o + c),
                      *reinterpret_cast<const uint4*>(d + c));
    }
  }
#pragma unroll
  for (int s = PRE_LANES / 2; s > 0; s /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, s);
  const int rows_pad = VARLEN ? (seq.seqlen_q() + SCRATCH_TILE - 1) / SCRATCH_TILE * SCRATCH_TILE
                              : p.seqlen_q_pad;
  if (row >= rows_pad) return;
  const int64 r = scratch_row0(p, seq, b, h) + row;
  if (lane == 0) {
    float lse = -inf_f32();
    if (row < seq.seqlen_q())
      lse = p.lse[seq.b * p.lse_batch_stride + h * p.lse_head_stride +
                  (seq.q0 + row) * p.lse_row_stride];
    p.delta[r] = acc;
    p.lse_log2[r] = lse == -inf_f32() ? inf_f32() : lse * LOG2E;
  }
  if (p.dq_accum != nullptr) {
    float4* dqa = reinterpret_cast<float4*>(p.dq_accum + r * p.headdim_pad);
    for (int c = lane; c < p.headdim_pad / 4; c += PRE_LANES) dqa[c] = make_float4(0.f, 0.f, 0.f, 0.f);
  }
}

// grid (ceil(seqlen_q / PRE_ROWS), nheads, batch): dq = scale * dq_accum, rounded to T.
template <typename T, bool VARLEN = false>
__global__ void __launch_bounds__(PRE_THREADS) bwd_convert_dq(const __grid_constant__ BwdParams p) {
  const AttnArgs& a = p.attn;
  const int row = blockIdx.x * PRE_ROWS + threadIdx.x / PRE_LANES;
  const int lane = threadIdx.x % PRE_LANES;
  const int h = blockIdx.y, b = blockIdx.z;
  const SeqView<VARLEN> seq(a, b);
  if (row >= seq.seqlen_q()) return;
  constexpr int EPV = 16 / sizeof(T);
  const float* src = p.dq_accum + (scratch_row0(p, seq, b, h) + row) * p.headdim_pad;
  T* dst = static_cast<T*>(p.dq) + seq.b * p.dq_batch_stride +
           (seq.q0 + row) * p.dq_row_stride + h * p.dq_head_stride;
  for (int c = lane * EPV; c < a.headdim; c += PRE_LANES * EPV) {
    float f[EPV];
#pragma unroll
    for (int i = 0; i < EPV; i += 4) {
      float4 v = *reinterpret_cast<const float4*>(src + c + i);
      f[i] = v.x * a.scale, f[i + 1] = v.y * a.scale, f[i + 2] = v.z * a.scale,
      f[i + 3] = v.w * a.scale;
    }
    *reinterpret_cast<uint4*>(dst + c) = pack16<T>(f);
  }
}

enum BwdMode : int { BWD_DK = 1, BWD_DV = 2, BWD_DQ_ATOMIC = 4, BWD_DQ = 8, BWD_VARLEN = 16 };

// Shared-memory tiles are ROWS x (D + 8) elements: the 16-byte pad makes the 8 row
// addresses of every ldmatrix (and cp.async row chunk) fall in distinct bank groups, for
// any head dim (the XOR swizzle of mma.cuh needs rows of a multiple of 64 elements).
template <int D> __host__ __device__ constexpr int padded_row() { return D + 8; }

// Copies rows [0, nrows) of a ROWS x D tile (row stride in elements) into shared memory;
// rows >= nrows and columns >= headdim read as zeros.
template <int ROWS, int D, int THREADS, typename T>
__device__ __forceinline__ void bwd_load_tile(T* dst, const T* src, int64 row_stride, int nrows,
                                              int headdim, int tid) {
  constexpr int CHUNKS = D / 8, TOTAL = ROWS * CHUNKS, LD = padded_row<D>();
#pragma unroll
  for (int it = 0; it < (TOTAL + THREADS - 1) / THREADS; ++it) {
    int idx = it * THREADS + tid;
    if (TOTAL % THREADS == 0 || idx < TOTAL) {
      int r = idx / CHUNKS, c = idx % CHUNKS;
      bool ok = r < nrows && c * 8 < headdim;
      cp_async_16(smem_addr(dst + r * LD + c * 8), ok ? src + r * row_stride + c * 8 : src, ok);
    }
  }
}

template <typename T, int D, int BLOCK_R, int NUM_WARPS, int M_TILES, int MODE>
struct BwdTraits {
  static constexpr bool KEY_OWNER = !(MODE & BWD_DQ);
  static constexpr bool ATOMIC_DQ = MODE & BWD_DQ_ATOMIC;
  static constexpr bool WANT_ACC1 = (MODE & BWD_DK) || !KEY_OWNER;  // dK or dQ
  static constexpr bool WANT_DV = MODE & BWD_DV;
  static constexpr bool NEED_DP = WANT_ACC1 || ATOMIC_DQ;            // else only P (for dV)
  static constexpr bool VARLEN = MODE & BWD_VARLEN;
  static_assert(KEY_OWNER ? (MODE & (BWD_DK | BWD_DV)) != 0 : (MODE & ~BWD_VARLEN) == BWD_DQ,
                "mode");
  static_assert(!ATOMIC_DQ || (MODE & BWD_DK), "dS is formed for dK");
  static constexpr int THREADS = NUM_WARPS * 32;
  static constexpr int BLOCK_O = 16 * M_TILES * NUM_WARPS;  // owner rows per CTA
  static constexpr int LD = padded_row<D>();
  static constexpr int LDS = BLOCK_R + 8;  // dS^T tile row (BLOCK_O x BLOCK_R)
  static constexpr int SMEM_BYTES =
      (2 * BLOCK_O * LD + 4 * BLOCK_R * LD + (ATOMIC_DQ ? BLOCK_O * LDS : 0)) * 2 +
      (KEY_OWNER ? 4 * BLOCK_R * 4 : 0);
  static_assert(BLOCK_R % 16 == 0 && D % 32 == 0, "k16 steps, ldmatrix x4 pairs");
  static_assert(BLOCK_R / 2 <= THREADS, "one thread per 16 bytes of lse/delta");
};

template <typename T, int D, int BLOCK_R, int NUM_WARPS, int M_TILES, int MODE>
__global__ void __launch_bounds__(NUM_WARPS * 32, 1)
bwd_main(const __grid_constant__ BwdParams p) {
  using Tr = BwdTraits<T, D, BLOCK_R, NUM_WARPS, M_TILES, MODE>;
  constexpr bool KEY_OWNER = Tr::KEY_OWNER, ATOMIC_DQ = Tr::ATOMIC_DQ;
  constexpr bool WANT_ACC1 = Tr::WANT_ACC1, WANT_DV = Tr::WANT_DV, NEED_DP = Tr::NEED_DP;
  constexpr int THREADS = Tr::THREADS, BLOCK_O = Tr::BLOCK_O, LD = Tr::LD, LDS = Tr::LDS;
  constexpr int NT = BLOCK_R / 8;  // n8 tiles of S per warp (streamed rows)
  constexpr int DT = D / 8;        // n8 tiles of the accumulators
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sA1 = reinterpret_cast<T*>(smem_raw);  // K or Q
  T* sA2 = sA1 + BLOCK_O * LD;              // V or dO
  T* sB1 = sA2 + BLOCK_O * LD;              // Q or K, two buffers
  T* sB2 = sB1 + 2 * BLOCK_R * LD;          // dO or V, two buffers
  T* sdS = sB2 + 2 * BLOCK_R * LD;          // dS^T (ATOMIC_DQ)
  float* sLse = reinterpret_cast<float*>(sdS + (ATOMIC_DQ ? BLOCK_O * LDS : 0));
  float* sDelta = sLse + 2 * BLOCK_R;       // both two buffers (KEY_OWNER)

  const AttnArgs& a = p.attn;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int g = lane / 4, qd = lane % 4;
  const SeqView<Tr::VARLEN> seq(a, blockIdx.y);
  const BwdBlock<BLOCK_O, BLOCK_R, KEY_OWNER, Tr::VARLEN> blk(a);
  if (blk.past_end(seq)) return;
  const Mask mask(a, seq);
  const T* q_base = static_cast<const T*>(a.q) + blk.q_offset(a, seq);
  const T* k_base = static_cast<const T*>(a.k) + blk.k_offset(a, seq);
  const T* v_base = static_cast<const T*>(a.v) + blk.v_offset(a, seq);
  const T* do_base = static_cast<const T*>(p.dout) + blk.dout_offset(p, seq);
  const auto work = blk.work(mask, seq);
  const int b = blk.b, o0 = blk.o0, hkv = work.hkv, h_owner = work.h_owner, iters = work.iters;

  // sv: this item's view (seq, or its re-read inside the main loop).
  auto load_stream = [&](int it, const SeqView<Tr::VARLEN>& sv) {
    const int h = work.head(it), r0 = work.row(it), buf = it & 1;
    T* b1 = sB1 + buf * BLOCK_R * LD;
    T* b2 = sB2 + buf * BLOCK_R * LD;
    if constexpr (KEY_OWNER) {
      bwd_load_tile<BLOCK_R, D, THREADS>(b1, q_base + r0 * a.q_row_stride + h * a.q_head_stride,
                                         a.q_row_stride, sv.seqlen_q() - r0, a.headdim, tid);
      bwd_load_tile<BLOCK_R, D, THREADS>(
          b2, do_base + r0 * p.do_row_stride + h * p.do_head_stride, p.do_row_stride,
          sv.seqlen_q() - r0, a.headdim, tid);
      const int64 row = scratch_row0(p, sv, b, h) + r0;
      if (tid < BLOCK_R / 4)
        cp_async_16(smem_addr(sLse + buf * BLOCK_R + 4 * tid), p.lse_log2 + row + 4 * tid, true);
      else if (tid < BLOCK_R / 2)
        cp_async_16(smem_addr(sDelta + buf * BLOCK_R + 4 * (tid - BLOCK_R / 4)),
                    p.delta + row + 4 * (tid - BLOCK_R / 4), true);
    } else {
      bwd_load_tile<BLOCK_R, D, THREADS>(b1, k_base + r0 * a.k_row_stride + hkv * a.k_head_stride,
                                         a.k_row_stride, sv.seqlen_k() - r0, a.headdim, tid);
      bwd_load_tile<BLOCK_R, D, THREADS>(b2, v_base + r0 * a.v_row_stride + hkv * a.v_head_stride,
                                         a.v_row_stride, sv.seqlen_k() - r0, a.headdim, tid);
    }
  };

  // Owner rows of this thread: warp * 16 * M_TILES + mt * 16 + g + 8 * half.
  const int w0 = warp * 16 * M_TILES;
  constexpr int MT1 = WANT_ACC1 ? M_TILES : 1, DT1 = WANT_ACC1 ? DT : 1;
  constexpr int MT2 = WANT_DV ? M_TILES : 1, DT2 = WANT_DV ? DT : 1;
  float acc1[MT1][DT1][4], acc2[MT2][DT2][4];
#pragma unroll
  for (int mt = 0; mt < MT1; ++mt)
#pragma unroll
    for (int dt = 0; dt < DT1; ++dt)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc1[mt][dt][e] = 0.f;
#pragma unroll
  for (int mt = 0; mt < MT2; ++mt)
#pragma unroll
    for (int dt = 0; dt < DT2; ++dt)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc2[mt][dt][e] = 0.f;

  // Query-owner rows read their lse/delta once (padded rows: +inf / 0).
  float own_lse[M_TILES][2], own_delta[M_TILES][2];
  if constexpr (!KEY_OWNER) {
    const int64 row = scratch_row0(p, seq, b, h_owner) + o0 + w0 + g;
#pragma unroll
    for (int mt = 0; mt < M_TILES; ++mt)
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        own_lse[mt][half] = p.lse_log2[row + mt * 16 + half * 8];
        own_delta[mt][half] = p.delta[row + mt * 16 + half * 8];
      }
  }

  if (iters > 0) {
    if constexpr (KEY_OWNER) {
      bwd_load_tile<BLOCK_O, D, THREADS>(sA1, k_base + o0 * a.k_row_stride + hkv * a.k_head_stride,
                                         a.k_row_stride, seq.seqlen_k() - o0, a.headdim, tid);
      if constexpr (NEED_DP)
        bwd_load_tile<BLOCK_O, D, THREADS>(sA2, v_base + o0 * a.v_row_stride +
                                           hkv * a.v_head_stride, a.v_row_stride,
                                           seq.seqlen_k() - o0, a.headdim, tid);
    } else {
      bwd_load_tile<BLOCK_O, D, THREADS>(
          sA1, q_base + o0 * a.q_row_stride + h_owner * a.q_head_stride, a.q_row_stride,
          seq.seqlen_q() - o0, a.headdim, tid);
      bwd_load_tile<BLOCK_O, D, THREADS>(
          sA2, do_base + o0 * p.do_row_stride + h_owner * p.do_head_stride, p.do_row_stride,
          seq.seqlen_q() - o0, a.headdim, tid);
    }
    load_stream(0, seq);
  }
  cp_async_commit();

  for (int it = 0; it < iters; ++it) {
    const int h = work.head(it), r0 = work.row(it), buf = it & 1;
    // Varlen: the item's lengths are re-read each iteration rather than held in registers
    // across the loop (where they make instantiations near 255 registers spill).
    const SeqView<Tr::VARLEN> iseq = reread(seq, a, b);
    const Mask imask = Tr::VARLEN ? Mask(a, iseq) : mask;
    // Tile `it` has landed, and every warp is done with iteration it - 1 (its buffer and
    // dS^T), so the prefetch of it + 1 may overwrite that buffer.
    cp_async_wait<0>();
    __syncthreads();
    if (it + 1 < iters) load_stream(it + 1, iseq);
    cp_async_commit();
    const T* b1 = sB1 + buf * BLOCK_R * LD;
    const T* b2 = sB2 + buf * BLOCK_R * LD;

    // S = A1 B1^T and dP = A2 B2^T, this warp's 16 * M_TILES owner rows x BLOCK_R.
    float s[M_TILES][NT][4], dp[M_TILES][NT][4];
#pragma unroll
    for (int mt = 0; mt < M_TILES; ++mt)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[mt][nt][e] = dp[mt][nt][e] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t a1[M_TILES][4], a2[M_TILES][4];
#pragma unroll
      for (int mt = 0; mt < M_TILES; ++mt) {
        int off = (w0 + mt * 16 + lane % 16) * LD + kk * 16 + (lane / 16) * 8;
        ldmatrix_x4(a1[mt], smem_addr(sA1 + off));
        if constexpr (NEED_DP) ldmatrix_x4(a2[mt], smem_addr(sA2 + off));
      }
#pragma unroll
      for (int nt2 = 0; nt2 < NT / 2; ++nt2) {
        int off = (nt2 * 16 + (lane / 16) * 8 + lane % 8) * LD + kk * 16 + ((lane / 8) % 2) * 8;
        uint32_t f1[4], f2[4];
        ldmatrix_x4(f1, smem_addr(b1 + off));
        if constexpr (NEED_DP) ldmatrix_x4(f2, smem_addr(b2 + off));
#pragma unroll
        for (int mt = 0; mt < M_TILES; ++mt) {
          mma_16816<T>(s[mt][2 * nt2], a1[mt], f1[0], f1[1]);
          mma_16816<T>(s[mt][2 * nt2 + 1], a1[mt], f1[2], f1[3]);
          if constexpr (NEED_DP) {
            mma_16816<T>(dp[mt][2 * nt2], a2[mt], f2[0], f2[1]);
            mma_16816<T>(dp[mt][2 * nt2 + 1], a2[mt], f2[2], f2[3]);
          }
        }
      }
    }

    // P and dS in place of S and dP.
    const int q0 = KEY_OWNER ? r0 : o0, k0 = KEY_OWNER ? o0 : r0;
    const ScoreGrad grad{ScoreMod(a, b, h, iseq), imask,
                         KEY_OWNER ? imask.tile_needs_mask(r0, r0 + BLOCK_R, o0, o0 + BLOCK_O)
                                   : imask.tile_needs_mask(o0, o0 + BLOCK_O, r0, r0 + BLOCK_R)};
    const float* lse_s = sLse + buf * BLOCK_R;
    const float* delta_s = sDelta + buf * BLOCK_R;
    // Interior tiles without soft-cap or ALiBi (the common case) take the short path.
    const bool plain = !grad.mod.has_softcap && !grad.mod.has_alibi && !grad.need_mask;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const int c = nt * 8 + 2 * qd;  // streamed column of e = 0
      float2 lse2 = make_float2(0.f, 0.f), del2 = make_float2(0.f, 0.f);
      if constexpr (KEY_OWNER) {
        lse2 = *reinterpret_cast<const float2*>(lse_s + c);
        del2 = *reinterpret_cast<const float2*>(delta_s + c);
      }
#pragma unroll
      for (int mt = 0; mt < M_TILES; ++mt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int orow = w0 + mt * 16 + g + (e / 2) * 8, scol = c + (e & 1);
          const float lse = KEY_OWNER ? ((e & 1) ? lse2.y : lse2.x) : own_lse[mt][e / 2];
          const float delta = KEY_OWNER ? ((e & 1) ? del2.y : del2.x) : own_delta[mt][e / 2];
          if (plain) {
            const float pv = fast_exp2(fmaf(s[mt][nt][e], grad.mod.scale_log2, -lse));
            s[mt][nt][e] = pv;
            dp[mt][nt][e] = pv * (dp[mt][nt][e] - delta);
          } else if constexpr (KEY_OWNER) {
            grad(s[mt][nt][e], dp[mt][nt][e], q0 + scol, k0 + orow, lse, delta);
          } else {
            grad(s[mt][nt][e], dp[mt][nt][e], q0 + orow, k0 + scol, lse, delta);
          }
        }
    }

    if constexpr (ATOMIC_DQ) {
#pragma unroll
      for (int mt = 0; mt < M_TILES; ++mt)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          T* dst = sdS + (w0 + mt * 16 + g) * LDS + nt * 8 + 2 * qd;
          *reinterpret_cast<uint32_t*>(dst) = dtype_traits<T>::pack(dp[mt][nt][0], dp[mt][nt][1]);
          *reinterpret_cast<uint32_t*>(dst + 8 * LDS) =
              dtype_traits<T>::pack(dp[mt][nt][2], dp[mt][nt][3]);
        }
    }

    // acc1 += dS B1, acc2 += P B2: the C-fragments of two n8 tiles are the A-fragment of
    // one k16 step.
#pragma unroll
    for (int kk = 0; kk < NT / 2; ++kk) {
      uint32_t ads[M_TILES][4], ap[M_TILES][4];
#pragma unroll
      for (int mt = 0; mt < M_TILES; ++mt) {
        const float(&x0)[4] = dp[mt][2 * kk];
        const float(&x1)[4] = dp[mt][2 * kk + 1];
        const float(&y0)[4] = s[mt][2 * kk];
        const float(&y1)[4] = s[mt][2 * kk + 1];
        if constexpr (WANT_ACC1) {
          ads[mt][0] = dtype_traits<T>::pack(x0[0], x0[1]);
          ads[mt][1] = dtype_traits<T>::pack(x0[2], x0[3]);
          ads[mt][2] = dtype_traits<T>::pack(x1[0], x1[1]);
          ads[mt][3] = dtype_traits<T>::pack(x1[2], x1[3]);
        }
        if constexpr (WANT_DV) {
          ap[mt][0] = dtype_traits<T>::pack(y0[0], y0[1]);
          ap[mt][1] = dtype_traits<T>::pack(y0[2], y0[3]);
          ap[mt][2] = dtype_traits<T>::pack(y1[0], y1[1]);
          ap[mt][3] = dtype_traits<T>::pack(y1[2], y1[3]);
        }
      }
#pragma unroll
      for (int dt2 = 0; dt2 < D / 16; ++dt2) {
        int off = (kk * 16 + ((lane / 8) % 2) * 8 + lane % 8) * LD + dt2 * 16 + (lane / 16) * 8;
        if constexpr (WANT_ACC1) {
          uint32_t f1[4];
          ldmatrix_x4_trans(f1, smem_addr(b1 + off));
#pragma unroll
          for (int mt = 0; mt < M_TILES; ++mt) {
            mma_16816<T>(acc1[mt][2 * dt2], ads[mt], f1[0], f1[1]);
            mma_16816<T>(acc1[mt][2 * dt2 + 1], ads[mt], f1[2], f1[3]);
          }
        }
        if constexpr (WANT_DV) {
          uint32_t f2[4];
          ldmatrix_x4_trans(f2, smem_addr(b2 + off));
#pragma unroll
          for (int mt = 0; mt < M_TILES; ++mt) {
            mma_16816<T>(acc2[mt][2 * dt2], ap[mt], f2[0], f2[1]);
            mma_16816<T>(acc2[mt][2 * dt2 + 1], ap[mt], f2[2], f2[3]);
          }
        }
      }
    }

    if constexpr (ATOMIC_DQ) {
      // dQ (BLOCK_R x D) += dS (BLOCK_R x BLOCK_O) K: warps split the rows into m16 groups
      // and the columns into NUM_WARPS / groups slices, in chunks of at most 64 columns.
      __syncthreads();
      constexpr int RG = BLOCK_R / 16;
      static_assert(NUM_WARPS % RG == 0, "whole warps per dQ row group");
      constexpr int DC = D / (NUM_WARPS / RG);
      constexpr int CH = DC % 64 == 0 ? 64 : DC % 48 == 0 ? 48 : DC % 32 == 0 ? 32 : 16;
      static_assert(DC % CH == 0 && CH % 16 == 0, "dQ column chunks of k16 pairs");
      const int wr = warp % RG, wc = warp / RG;
      float* dqa = p.dq_accum + (scratch_row0(p, iseq, b, h) + r0 + wr * 16 + g) * D + 2 * qd;
#pragma unroll
      for (int ci = 0; ci < DC / CH; ++ci) {
        const int c0 = wc * DC + ci * CH;
        float acc[CH / 8][4];
#pragma unroll
        for (int dt = 0; dt < CH / 8; ++dt)
#pragma unroll
          for (int e = 0; e < 4; ++e) acc[dt][e] = 0.f;
#pragma unroll
        for (int kk = 0; kk < BLOCK_O / 16; ++kk) {
          uint32_t fa[4];
          ldmatrix_x4_trans(fa, smem_addr(sdS + (kk * 16 + (lane / 16) * 8 + lane % 8) * LDS +
                                          wr * 16 + ((lane / 8) % 2) * 8));
#pragma unroll
          for (int dt2 = 0; dt2 < CH / 16; ++dt2) {
            uint32_t fb[4];
            ldmatrix_x4_trans(fb, smem_addr(sA1 + (kk * 16 + ((lane / 8) % 2) * 8 + lane % 8) * LD +
                                            c0 + dt2 * 16 + (lane / 16) * 8));
            mma_16816<T>(acc[2 * dt2], fa, fb[0], fb[1]);
            mma_16816<T>(acc[2 * dt2 + 1], fa, fb[2], fb[3]);
          }
        }
#pragma unroll
        for (int dt = 0; dt < CH / 8; ++dt) {
          red_add2(dqa + c0 + dt * 8, acc[dt][0], acc[dt][1]);
          red_add2(dqa + 8 * D + c0 + dt * 8, acc[dt][2], acc[dt][3]);
        }
      }
    }
  }
  cp_async_wait<0>();

  // Epilogue: owner rows < seqlen, columns < headdim. dK and dQ carry the softmax scale.
  const SeqView<Tr::VARLEN> out_seq = reread(seq, a, b);
  const int nrows = blk.owner_rows(out_seq);
#pragma unroll
  for (int mt = 0; mt < M_TILES; ++mt)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int row = o0 + w0 + mt * 16 + g + half * 8;
      if (row >= nrows) continue;
      T* d1 = blk.template d1<T>(p, out_seq, work, row);
      T* d2 = blk.template d2<T>(p, out_seq, work, row);
#pragma unroll
      for (int dt = 0; dt < DT; ++dt) {
        const int col = dt * 8 + 2 * qd;
        if (col >= a.headdim) continue;
        if constexpr (WANT_ACC1)
          *reinterpret_cast<uint32_t*>(d1 + col) = dtype_traits<T>::pack(
              acc1[mt][dt][2 * half] * a.scale, acc1[mt][dt][2 * half + 1] * a.scale);
        if constexpr (WANT_DV)
          *reinterpret_cast<uint32_t*>(d2 + col) =
              dtype_traits<T>::pack(acc2[mt][dt][2 * half], acc2[mt][dt][2 * half + 1]);
      }
    }
}

// float32: the algorithm of bwd_main on plain FMAs, for full float32 accuracy (no TF32).
// F32_BLOCK owner rows x BLOCK_R streamed rows per step, 256 threads; a thread computes
// BLOCK_R / 8 scores of one owner row and accumulates a 4-column float4 slice of every 32
// columns of that row. BLOCK_R is 32 unless the device's shared memory is too small for it.
constexpr int F32_BLOCK = 32;
constexpr int F32_THREADS = 256;

template <int D> __host__ __device__ constexpr int f32_row() { return D + 4; }

template <int D, int BLOCK_R, int MODE>
struct BwdF32Traits {
  static constexpr int LD = f32_row<D>(), LDP = BLOCK_R + 1;  // P, dS: F32_BLOCK x BLOCK_R
  // A1, A2, B1, B2, P, dS; varlen: 16 bytes for the parked view (park).
  static constexpr int SMEM_BYTES =
      (2 * F32_BLOCK * LD + 2 * BLOCK_R * LD + 2 * F32_BLOCK * LDP) * 4 +
      (MODE & BWD_VARLEN ? 16 : 0);
  static_assert(BLOCK_R % 8 == 0 && BLOCK_R <= F32_BLOCK, "8 threads a row, <= 1 score each");
  static_assert(BLOCK_R * D / 4 % F32_THREADS == 0, "whole passes of 16-byte loads");
};

template <int D, int ROWS>
__device__ __forceinline__ void f32_load_tile(float* dst, const float* src, int64 row_stride,
                                              int nrows, int headdim, int tid) {
  constexpr int CHUNKS = D / 4;
#pragma unroll
  for (int it = 0; it < ROWS * CHUNKS / F32_THREADS; ++it) {
    int idx = it * F32_THREADS + tid, r = idx / CHUNKS, c = idx % CHUNKS;
    float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
    if (r < nrows && c * 4 < headdim) v = *reinterpret_cast<const float4*>(src + r * row_stride + c * 4);
    *reinterpret_cast<float4*>(dst + r * f32_row<D>() + c * 4) = v;
  }
}

// Varlen: the item's view parked in shared memory (4 ints after the kernel's tiles) and read
// back each step, because the launch bounds cap this kernel at 128 registers a thread and
// holding the view across the loop spills. Dense: the view itself, nothing stored.
template <bool VARLEN>
__device__ __forceinline__ void park(const SeqView<VARLEN>& seq, int* dst) {
  if constexpr (VARLEN) {
    if (threadIdx.x == 0) dst[0] = seq.q0, dst[1] = seq.k0, dst[2] = seq.len_q, dst[3] = seq.len_k;
  }
}
template <bool VARLEN>
__device__ __forceinline__ SeqView<VARLEN> unpark(const SeqView<VARLEN>& seq, const int* src) {
  if constexpr (VARLEN) {
    return SeqView<true>(src[0], src[1], src[2], src[3]);
  } else {
    return seq;
  }
}

template <int D, int BLOCK_R, int MODE>
__global__ void __launch_bounds__(F32_THREADS, D >= 192 ? 1 : 2) bwd_main_f32(const __grid_constant__ BwdParams p) {
  constexpr bool KEY_OWNER = !(MODE & BWD_DQ), ATOMIC_DQ = MODE & BWD_DQ_ATOMIC;
  constexpr bool VARLEN = MODE & BWD_VARLEN;
  static_assert(KEY_OWNER ? (MODE & BWD_DK) && (MODE & BWD_DV) : (MODE & ~BWD_VARLEN) == BWD_DQ,
                "f32 modes");
  using Tr = BwdF32Traits<D, BLOCK_R, MODE>;
  constexpr int LD = Tr::LD, LDP = Tr::LDP, DV4 = D / 32, U = BLOCK_R / 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  float* sA1 = reinterpret_cast<float*>(smem_raw);
  float* sA2 = sA1 + F32_BLOCK * LD;
  float* sB1 = sA2 + F32_BLOCK * LD;
  float* sB2 = sB1 + BLOCK_R * LD;
  float* sP = sB2 + BLOCK_R * LD;
  float* sdS = sP + F32_BLOCK * LDP;
  int* sSeq = reinterpret_cast<int*>(sdS + F32_BLOCK * LDP);  // varlen only (park)

  const AttnArgs& a = p.attn;
  const int tid = threadIdx.x, orow = tid / 8, sub = tid % 8;
  const BwdBlock<F32_BLOCK, BLOCK_R, KEY_OWNER, VARLEN> blk(a);
  const SeqView<VARLEN> seq(a, blk.b);
  if (blk.past_end(seq)) return;
  const Mask mask(a, seq);
  const float* q_base = static_cast<const float*>(a.q) + blk.q_offset(a, seq);
  const float* k_base = static_cast<const float*>(a.k) + blk.k_offset(a, seq);
  const float* v_base = static_cast<const float*>(a.v) + blk.v_offset(a, seq);
  const float* do_base = static_cast<const float*>(p.dout) + blk.dout_offset(p, seq);
  const auto work = blk.work(mask, seq);
  const int b = blk.b, o0 = blk.o0, hkv = work.hkv, h_owner = work.h_owner, iters = work.iters;

  if constexpr (KEY_OWNER) {
    f32_load_tile<D, F32_BLOCK>(sA1, k_base + o0 * a.k_row_stride + hkv * a.k_head_stride,
                                a.k_row_stride, seq.seqlen_k() - o0, a.headdim, tid);
    f32_load_tile<D, F32_BLOCK>(sA2, v_base + o0 * a.v_row_stride + hkv * a.v_head_stride,
                                a.v_row_stride, seq.seqlen_k() - o0, a.headdim, tid);
  } else {
    f32_load_tile<D, F32_BLOCK>(sA1, q_base + o0 * a.q_row_stride + h_owner * a.q_head_stride,
                                a.q_row_stride, seq.seqlen_q() - o0, a.headdim, tid);
    f32_load_tile<D, F32_BLOCK>(sA2, do_base + o0 * p.do_row_stride + h_owner * p.do_head_stride,
                                p.do_row_stride, seq.seqlen_q() - o0, a.headdim, tid);
  }
  float own_lse = 0.f, own_delta = 0.f;
  if constexpr (!KEY_OWNER) {
    const int64 row = scratch_row0(p, seq, b, h_owner) + o0 + orow;
    own_lse = p.lse_log2[row];
    own_delta = p.delta[row];
  }

  park(seq, sSeq);  // read back after the loop's first barrier

  float4 acc1[DV4], acc2[KEY_OWNER ? DV4 : 1];
#pragma unroll
  for (int v = 0; v < DV4; ++v) acc1[v] = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
  for (int v = 0; v < (KEY_OWNER ? DV4 : 1); ++v) acc2[v] = make_float4(0.f, 0.f, 0.f, 0.f);

  for (int it = 0; it < iters; ++it) {
    const int h = work.head(it), r0 = work.row(it);
    __syncthreads();  // the previous step is done with the streamed tiles, P and dS
    const SeqView<VARLEN> lseq = unpark(seq, sSeq);
    // Varlen: the streamed arrays' rows from the parked view too (the four base pointers
    // held across the loop spill at 128 registers); dense: the bases above.
    const float *q_s = q_base, *do_s = do_base, *k_s = k_base, *v_s = v_base;
    if constexpr (VARLEN) {
      q_s = static_cast<const float*>(a.q) + lseq.q0 * a.q_row_stride;
      do_s = static_cast<const float*>(p.dout) + lseq.q0 * p.do_row_stride;
      k_s = static_cast<const float*>(a.k) + lseq.k0 * a.k_row_stride;
      v_s = static_cast<const float*>(a.v) + lseq.k0 * a.v_row_stride;
    }
    if constexpr (KEY_OWNER) {
      f32_load_tile<D, BLOCK_R>(sB1, q_s + r0 * a.q_row_stride + h * a.q_head_stride,
                                a.q_row_stride, lseq.seqlen_q() - r0, a.headdim, tid);
      f32_load_tile<D, BLOCK_R>(sB2, do_s + r0 * p.do_row_stride + h * p.do_head_stride,
                                p.do_row_stride, lseq.seqlen_q() - r0, a.headdim, tid);
    } else {
      f32_load_tile<D, BLOCK_R>(sB1, k_s + r0 * a.k_row_stride + hkv * a.k_head_stride,
                                a.k_row_stride, lseq.seqlen_k() - r0, a.headdim, tid);
      f32_load_tile<D, BLOCK_R>(sB2, v_s + r0 * a.v_row_stride + hkv * a.v_head_stride,
                                a.v_row_stride, lseq.seqlen_k() - r0, a.headdim, tid);
    }
    __syncthreads();

    // U scores of owner row orow: streamed columns sub + 8u.
    float s[U], dp[U];
#pragma unroll
    for (int u = 0; u < U; ++u) s[u] = dp[u] = 0.f;
    for (int d = 0; d < D; d += 4) {
      const float4 x1 = *reinterpret_cast<const float4*>(sA1 + orow * LD + d);
      const float4 x2 = *reinterpret_cast<const float4*>(sA2 + orow * LD + d);
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const float4 y1 = *reinterpret_cast<const float4*>(sB1 + (sub + 8 * u) * LD + d);
        const float4 y2 = *reinterpret_cast<const float4*>(sB2 + (sub + 8 * u) * LD + d);
        s[u] = fmaf(x1.x, y1.x, fmaf(x1.y, y1.y, fmaf(x1.z, y1.z, fmaf(x1.w, y1.w, s[u]))));
        dp[u] = fmaf(x2.x, y2.x, fmaf(x2.y, y2.y, fmaf(x2.z, y2.z, fmaf(x2.w, y2.w, dp[u]))));
      }
    }
    const SeqView<VARLEN> iseq = unpark(seq, sSeq);
    const ScoreGrad grad{ScoreMod(a, b, h, iseq), VARLEN ? Mask(a, iseq) : mask, true};
    const int64 lrow = scratch_row0(p, iseq, b, h);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int scol = sub + 8 * u;
      if constexpr (KEY_OWNER) {
        grad(s[u], dp[u], r0 + scol, o0 + orow, p.lse_log2[lrow + r0 + scol],
             p.delta[lrow + r0 + scol]);
      } else {
        grad(s[u], dp[u], o0 + orow, r0 + scol, own_lse, own_delta);
      }
      sP[orow * LDP + scol] = s[u];
      sdS[orow * LDP + scol] = dp[u];
    }
    __syncthreads();

    // acc1 += dS B1, acc2 += P B2 over the BLOCK_R streamed rows.
    for (int c = 0; c < BLOCK_R; ++c) {
      const float ds = sdS[orow * LDP + c], pv = sP[orow * LDP + c];
#pragma unroll
      for (int v = 0; v < DV4; ++v) {
        const int d = 32 * v + 4 * sub;
        const float4 y1 = *reinterpret_cast<const float4*>(sB1 + c * LD + d);
        acc1[v].x = fmaf(ds, y1.x, acc1[v].x), acc1[v].y = fmaf(ds, y1.y, acc1[v].y);
        acc1[v].z = fmaf(ds, y1.z, acc1[v].z), acc1[v].w = fmaf(ds, y1.w, acc1[v].w);
        if constexpr (KEY_OWNER) {
          const float4 y2 = *reinterpret_cast<const float4*>(sB2 + c * LD + d);
          acc2[v].x = fmaf(pv, y2.x, acc2[v].x), acc2[v].y = fmaf(pv, y2.y, acc2[v].y);
          acc2[v].z = fmaf(pv, y2.z, acc2[v].z), acc2[v].w = fmaf(pv, y2.w, acc2[v].w);
        }
      }
    }
    // dQ row r0 + orow += sum over keys r of dS[r][orow] K[r], by the threads whose orow is
    // a streamed row (orow < BLOCK_R).
    if (ATOMIC_DQ && (BLOCK_R == F32_BLOCK || orow < BLOCK_R)) {
      float4 dq[DV4];
#pragma unroll
      for (int v = 0; v < DV4; ++v) dq[v] = make_float4(0.f, 0.f, 0.f, 0.f);
      for (int r = 0; r < F32_BLOCK; ++r) {
        const float ds = sdS[r * LDP + orow];
#pragma unroll
        for (int v = 0; v < DV4; ++v) {
          const float4 k4 = *reinterpret_cast<const float4*>(sA1 + r * LD + 32 * v + 4 * sub);
          dq[v].x = fmaf(ds, k4.x, dq[v].x), dq[v].y = fmaf(ds, k4.y, dq[v].y);
          dq[v].z = fmaf(ds, k4.z, dq[v].z), dq[v].w = fmaf(ds, k4.w, dq[v].w);
        }
      }
      float* dqa = p.dq_accum + (lrow + r0 + orow) * D + 4 * sub;
#pragma unroll
      for (int v = 0; v < DV4; ++v) {
        red_add2(dqa + 32 * v, dq[v].x, dq[v].y);
        red_add2(dqa + 32 * v + 2, dq[v].z, dq[v].w);
      }
    }
  }

  const SeqView<VARLEN> out_seq = reread(seq, a, b);
  const int row = o0 + orow;
  if (row >= blk.owner_rows(out_seq)) return;
  float* d1 = blk.template d1<float>(p, out_seq, work, row);
  float* d2 = blk.template d2<float>(p, out_seq, work, row);
#pragma unroll
  for (int v = 0; v < DV4; ++v) {
    const int d = 32 * v + 4 * sub;
    if (d >= a.headdim) continue;
    const float4 x = acc1[v];
    *reinterpret_cast<float4*>(d1 + d) =
        make_float4(x.x * a.scale, x.y * a.scale, x.z * a.scale, x.w * a.scale);
    if constexpr (KEY_OWNER) *reinterpret_cast<float4*>(d2 + d) = acc2[v];
  }
}

}  // namespace cuflash
