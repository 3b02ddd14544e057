// Online softmax (FlashAttention-2) over rows held in mma.m16n8k16 C-fragments.
//
// A thread holds rows lane / 4 and lane / 4 + 8 of each of its M_TILES m16 tiles; the four
// threads of a quad (lane % 4) share those rows, so row reductions are two shuffles.
// Statistics are in base 2: m_i is the running max of the logits x = factor * s, l_i the
// running sum of exp2(x - m_i) over this thread's columns (quad-reduced once, in finalize).
#pragma once
#include "common/mask.cuh"

namespace cuflash {

__device__ __forceinline__ float quiet_nan() { return __int_as_float(0x7fc00000); }

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

template <int M_TILES>
struct OnlineSoftmax {
  float m_i[M_TILES][2];
  float l_i[M_TILES][2];

  __device__ __forceinline__ OnlineSoftmax() {
#pragma unroll
    for (int mt = 0; mt < M_TILES; ++mt)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        m_i[mt][r] = neg_inf();
        l_i[mt][r] = 0.f;
      }
  }

  // Folds one tile of scores into the statistics: s becomes P = exp2(factor * s - m_i) in
  // place and the output accumulator is rescaled by exp2(m_old - m_new). `factor` is
  // scale * log2(e) for raw scores, 1 for logits already in base 2; it must be > 0.
  // A row that has seen only -inf keeps m_i = -inf and P = 0 (the exp2 uses 0 for its max).
  // LAZY_RESCALE: the accumulator is rescaled only when some row of the warp has a new max.
  // Otherwise every alpha is exp2(0) = 1, or exp2(-inf) = 0 on a row still at -inf whose
  // accumulator holds nothing yet, so skipping the multiplies changes no result. Decoding
  // uses it: there they are D_TILES * 4 FMUL of a 16-key tile's ~400 instructions, and the
  // max of a long row rarely grows after its first tiles.
  template <bool LAZY_RESCALE = false, int N_TILES, int D_TILES>
  __device__ __forceinline__ void update(float (&s)[M_TILES][N_TILES][4],
                                         float (&acc_o)[M_TILES][D_TILES][4], float factor) {
    float alpha[M_TILES][2];
    const bool grew = max_step(s, factor, alpha);
    exp_step(s, factor, alpha);
    if constexpr (LAZY_RESCALE)
      rescale_if(acc_o, alpha, grew);
    else
      rescale(acc_o, alpha);
  }

  // update() in its three parts, for a kernel that interleaves them with its GEMMs (the
  // Hopper forward rescales O around the P V that adds this tile's P). max_step folds
  // the tile's row maxima into m_i and gives each row's alpha = exp2(m_old - m_new); true
  // where some row of this thread got a new max.
  // SLACK > 0: m_i moves only where the tile's max passes it by more than SLACK (base-2
  // logits), so that after a row's first tiles its accumulator is rarely rescaled. m_i is
  // then at most SLACK below the row's max: P = exp2(x - m_i) <= 2^SLACK, which float32
  // sums and 16-bit P hold as exactly as P <= 1; out and lse are the same quotients.
  template <int SLACK = 0, int N_TILES>
  __device__ __forceinline__ bool max_step(const float (&s)[M_TILES][N_TILES][4], float factor,
                                           float (&alpha)[M_TILES][2]) {
    bool grew = false;
#pragma unroll
    for (int mt = 0; mt < M_TILES; ++mt)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float mx = neg_inf();
#pragma unroll
        for (int nt = 0; nt < N_TILES; ++nt)
          mx = fmaxf(mx, fmaxf(s[mt][nt][2 * r], s[mt][nt][2 * r + 1]));
        const float tile_max = quad_max(mx) * factor;  // a NaN keeps m_i, as fmaxf does
        const float m_new = SLACK == 0 ? fmaxf(m_i[mt][r], tile_max)
                            : tile_max > m_i[mt][r] + SLACK ? tile_max : m_i[mt][r];
        alpha[mt][r] = fast_exp2(m_i[mt][r] - (m_new == neg_inf() ? 0.f : m_new));
        grew |= m_new != m_i[mt][r];
        m_i[mt][r] = m_new;
      }
    return grew;
  }

  // s becomes P = exp2(factor * s - m_i) (after max_step), and l_i = l_i * alpha + the row
  // sums of P.
  template <int N_TILES>
  __device__ __forceinline__ void exp_step(float (&s)[M_TILES][N_TILES][4], float factor,
                                           const float (&alpha)[M_TILES][2]) {
#pragma unroll
    for (int mt = 0; mt < M_TILES; ++mt)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const float m_use = m_i[mt][r] == neg_inf() ? 0.f : m_i[mt][r];
        float sum = 0.f;
#pragma unroll
        for (int nt = 0; nt < N_TILES; ++nt)
#pragma unroll
          for (int e = 2 * r; e < 2 * r + 2; ++e) {
            float p = fast_exp2(fmaf(s[mt][nt][e], factor, -m_use));
            s[mt][nt][e] = p;
            sum += p;
          }
        l_i[mt][r] = l_i[mt][r] * alpha[mt][r] + sum;
      }
  }

  // rescale() where `grew` holds in some lane of the warp (a uniform branch; every lane
  // calls it): elsewhere every alpha is 1, or 0 on a row whose accumulator is still empty.
  template <int D_TILES>
  __device__ __forceinline__ static void rescale_if(float (&acc_o)[M_TILES][D_TILES][4],
                                                    const float (&alpha)[M_TILES][2],
                                                    bool grew) {
    if (__any_sync(0xffffffffu, grew)) rescale(acc_o, alpha);
  }

  // The accumulator's rows times their alpha.
  template <int D_TILES>
  __device__ __forceinline__ static void rescale(float (&acc_o)[M_TILES][D_TILES][4],
                                                 const float (&alpha)[M_TILES][2]) {
#pragma unroll
    for (int mt = 0; mt < M_TILES; ++mt)
#pragma unroll
      for (int r = 0; r < 2; ++r) rescale(acc_o, mt, r, alpha[mt][r]);
  }

  template <int D_TILES>
  __device__ __forceinline__ static void rescale(float (&acc_o)[M_TILES][D_TILES][4], int mt,
                                                 int r, float alpha) {
#pragma unroll
    for (int dt = 0; dt < D_TILES; ++dt) {
      acc_o[mt][dt][2 * r] *= alpha;
      acc_o[mt][dt][2 * r + 1] *= alpha;
    }
  }

  // Divides the accumulator by l_i (once, at the end) and returns each row's natural-log
  // LSE in lse[mt][r] (docs/CONVENTIONS.md): a row that saw no key (l == 0) gets out = 0
  // and lse = -inf, even where a masked value of its tiles was NaN (P V's 0 * NaN); a row
  // that met a NaN, in a score (then l is NaN) or in a value (then only the accumulator
  // is), gets NaN in all of out and in lse, so that a merge by LSE cannot drop it.
  template <int D_TILES>
  __device__ __forceinline__ void finalize(float (&acc_o)[M_TILES][D_TILES][4],
                                           float (&lse)[M_TILES][2]) {
#pragma unroll
    for (int mt = 0; mt < M_TILES; ++mt)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        bool nan = false;  // this thread's columns of the row; the quad's, by a max below
#pragma unroll
        for (int dt = 0; dt < D_TILES; ++dt)
          nan |= isnan(acc_o[mt][dt][2 * r]) | isnan(acc_o[mt][dt][2 * r + 1]);
        nan = quad_max(nan ? 1.f : 0.f) != 0.f;
        const float l = quad_sum(l_i[mt][r]);
        const bool empty = l == 0.f;  // a NaN l (a NaN score) is not empty
        const float inv = empty ? 0.f : nan ? quiet_nan() : 1.f / l;
        lse[mt][r] = empty ? neg_inf() : nan ? quiet_nan() : (m_i[mt][r] + __log2f(l)) * LN2;
#pragma unroll
        for (int dt = 0; dt < D_TILES; ++dt) {
          acc_o[mt][dt][2 * r] = empty ? 0.f : acc_o[mt][dt][2 * r] * inv;
          acc_o[mt][dt][2 * r + 1] = empty ? 0.f : acc_o[mt][dt][2 * r + 1] * inv;
        }
      }
  }
};

}  // namespace cuflash
