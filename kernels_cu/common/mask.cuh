// The score function of CONVENTIONS.md ("The score of query row i and key column j"),
// shared by the forward and backward kernels.
//
// Kernels work in base 2: a logit x = log2(e) * score, so that softmax weights are exp2(x - m).
// `ScoreMod` turns a raw dot product q_i . k_j into that logit (scale, soft-cap, ALiBi);
// `Mask` says which keys a query row sees (causal / window / seqlen_k) and which tiles are
// entirely visible, so that only boundary tiles pay for per-element masking.
// Indices are within one (batch item, head): query rows i in [0, seqlen_q), keys j in
// [0, seqlen_k), with that item's own lengths (SeqView) in varlen calls.
#pragma once
#include "common/mma.cuh"
#include "common/params.cuh"

namespace cuflash {

constexpr float LOG2E = 1.4426950408889634f;
constexpr float LN2 = 0.6931471805599453f;
__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000u); }

struct Mask {
  int seqlen_k;
  int diag;   // seqlen_k - seqlen_q: query i's diagonal key is i + diag (bottom-right aligned)
  int left;   // -1: unbounded
  int right;  // -1: unbounded; causal is 0

  __device__ __forceinline__ explicit Mask(const AttnArgs& a)
      : seqlen_k(a.seqlen_k), diag(a.seqlen_k - a.seqlen_q), left(a.window_left),
        right(a.window_right) {}
  // One batch item of a dense or varlen call, with its own lengths.
  template <bool VARLEN>
  __device__ __forceinline__ Mask(const AttnArgs& a, const SeqView<VARLEN>& seq) : Mask(a) {
    if constexpr (VARLEN) {
      seqlen_k = seq.seqlen_k();
      diag = seq.seqlen_k() - seq.seqlen_q();
    }
  }

  // Bitwise rather than short-circuit operators: no branches in unrolled fragment loops.
  __device__ __forceinline__ bool visible(int i, int j) const {
    return (j < seqlen_k) & ((right < 0) | (j <= i + diag + right)) &
           ((left < 0) | (j >= i + diag - left));
  }

  // The rows that see key j, relative to row i0: i0 + lo <= i <= i0 + hi (none when lo >
  // hi), for rows within 2^30 of i0. A kernel that holds one key across many rows then
  // tests visibility by two compares against constants (keys_of_row: a row's keys).
  __device__ __forceinline__ void rows_of_key(int j, int i0, int& lo, int& hi) const {
    lo = j >= seqlen_k ? 1 << 30 : right < 0 ? -(1 << 30) : j - diag - right - i0;
    hi = left < 0 ? 1 << 30 : j - diag + left - i0;
  }

  // The keys that row i sees, relative to key j0: j0 + lo <= j <= j0 + hi (none when lo >
  // hi), for keys within 2^30 of j0: visible(i, j) for every such j. No sum leaves int32
  // for rows below seqlen_q, whatever the lengths (i - seqlen_q is i + diag - seqlen_k;
  // keys are >= 0); rows past it are never stored.
  __device__ __forceinline__ void keys_of_row(int i, int j0, int& lo, int& hi) const {
    lo = left < 0 ? -(1 << 30) : max(0, i + diag - left) - j0;
    hi = seqlen_k - 1 - j0 + (right < 0 ? 0 : min(0, i + diag - seqlen_k + right + 1));
  }

  // Keys [begin, end) seen by at least one row of [i_begin, i_end); empty when end <= begin.
  __device__ __forceinline__ void key_range(int i_begin, int i_end, int& begin, int& end) const {
    begin = left < 0 ? 0 : max(0, i_begin + diag - left);
    end = right < 0 ? seqlen_k : min(seqlen_k, i_end + diag + right);
  }

  // Query rows [begin, end) that see at least one key of [j_begin, j_end): key_range's
  // inverse, for kernels that own keys and stream queries; empty when end <= begin.
  __device__ __forceinline__ void query_range(int j_begin, int j_end, int& begin,
                                              int& end) const {
    begin = right < 0 ? 0 : max(0, j_begin - diag - right);
    end = left < 0 ? seqlen_k - diag : min(seqlen_k - diag, j_end - diag + left);
  }

  // True unless every (i, j) of the tile [i_begin, i_end) x [j_begin, j_end) is visible
  // (rows past seqlen_q count as rows; their results are never stored).
  __device__ __forceinline__ bool tile_needs_mask(int i_begin, int i_end, int j_begin,
                                                  int j_end) const {
    return j_end > seqlen_k || (right >= 0 && j_end - 1 > i_begin + diag + right) ||
           (left >= 0 && j_begin < i_end - 1 + diag - left);
  }
};

// The blocks of BLOCK rows that cover rows [begin, end): the first one and how many.
template <int BLOCK>
__device__ __forceinline__ void block_span(int begin, int end, int& first, int& count) {
  first = begin / BLOCK;
  count = end > begin ? (end - 1) / BLOCK + 1 - first : 0;
}

// tanh(c y) for c > 0, given k = -2 log2(e) c, and its derivative factor 1 - tanh(c y)^2,
// from r = 1 / (1 + exp(-2 c y)) by one MUFU.EX2 and one MUFU.RCP:
//   tanh = 2 r - 1,   1 - tanh^2 = 4 r (1 - r)
// (y -> -inf: exp -> inf, r -> 0). Both within a few float32 ulps of 1 in absolute error
// (libdevice's tanhf and 1 - t * t: one or two), which a logit softcap * tanh can take in
// 16-bit kernels; libdevice's tanhf costs about 20 instructions and a branch.
__device__ __forceinline__ float scaled_tanh(float y, float k, float& dtanh) {
  const float r = fast_rcp(1.f + fast_exp2(y * k));
  dtanh = r * fmaf(-4.f, r, 4.f);
  return fmaf(2.f, r, -1.f);
}

// The score options an element function applies: fixed at compile time (an instantiation
// per option, whose elements then carry no branches and overlap their MUFU latencies), or
// read per element (OPTS_RUNTIME).
constexpr int OPTS_SOFTCAP = 1, OPTS_ALIBI = 2, OPTS_RUNTIME = 4;
// How a soft-capped score's tanh is computed: tanhf (float32 kernels); scaled_tanh, from
// MUFU.EX2 and MUFU.RCP (a few float32 ulps); MUFU.TANH (tanh.approx.f32, relative error
// about 2^-11, one MUFU where scaled_tanh takes two: the soft-capped element's third MUFU
// bound its kernels). tanh_form<T, OPTS>() picks for a 16-bit kernel: MUFU.TANH for
// bfloat16, whose own rounding (2^-8) hides its error, scaled_tanh for float16 (2^-11: it
// would not) and for OPTS_RUNTIME (the backward's hd128 instantiation spilled with it).
constexpr int TANH_EXACT = 0, TANH_EX2_RCP = 1, TANH_MUFU = 2;
template <typename T, int OPTS>
__host__ __device__ constexpr int tanh_form() {
  return dtype_traits<T>::BFLOAT16 && OPTS != OPTS_RUNTIME ? TANH_MUFU : TANH_EX2_RCP;
}

// Whether OPTS may subtract ALiBi's bias (OPTS_RUNTIME: where the call has slopes).
__host__ __device__ constexpr bool opts_alibi(int opts) {
  return (opts & (OPTS_ALIBI | OPTS_RUNTIME)) != 0;
}

// Raw dot product s = q_i . k_j -> base-2 logit
//   log2(e) * (softcap * tanh(scale * s / softcap) - slope * |i + diag - j|).
// Without soft-cap and ALiBi this is s * scale_log2, which kernels fold into their exp2 FFMA
// instead of calling apply().
struct ScoreMod {
  float scale_log2;   // scale * log2(e)
  float softcap_in;   // scale / softcap
  float softcap_k;    // -2 log2(e) scale / softcap: scaled_tanh's k
  float softcap_out;  // softcap * log2(e)
  float slope_log2;   // ALiBi slope * log2(e); 0 without ALiBi
  int diag;
  bool has_softcap, has_alibi;

  __device__ __forceinline__ ScoreMod(const AttnArgs& a, int batch_idx, int head_idx)
      : scale_log2(a.scale * LOG2E), softcap_in(a.softcap > 0.f ? a.scale / a.softcap : 0.f),
        softcap_k(-2.f * LOG2E * softcap_in),
        softcap_out(a.softcap * LOG2E),
        slope_log2(a.alibi_slopes
                       ? a.alibi_slopes[batch_idx * a.alibi_batch_stride + head_idx] * LOG2E
                       : 0.f),
        diag(a.seqlen_k - a.seqlen_q), has_softcap(a.softcap > 0.f),
        has_alibi(a.alibi_slopes != nullptr) {}
  // One batch item of a dense or varlen call, with its own lengths; batch_idx is the batch
  // item (the row of alibi_slopes) in varlen calls too.
  template <bool VARLEN>
  __device__ __forceinline__ ScoreMod(const AttnArgs& a, int batch_idx, int head_idx,
                                      const SeqView<VARLEN>& seq)
      : ScoreMod(a, batch_idx, head_idx) {
    if constexpr (VARLEN) diag = seq.seqlen_k() - seq.seqlen_q();
  }

  // The logit of raw score s at distance dist = i + diag - j (a float: callers may convert
  // it once per row and step it by constants) under OPTS; under soft-cap *grad (if given)
  // times 1 - tanh^2, the gradient's factor, inside the soft-cap branch (kept apart, the
  // factors of a tile's elements would all be live at once). TANH: the tanh's form
  // (TANH_EXACT, TANH_EX2_RCP, TANH_MUFU; tanh_form above).
  template <int OPTS, int TANH>
  __device__ __forceinline__ float logit(float s, float dist, float* grad = nullptr) const {
    const bool softcap = OPTS == OPTS_RUNTIME ? has_softcap : (OPTS & OPTS_SOFTCAP) != 0;
    const bool alibi = OPTS == OPTS_RUNTIME ? has_alibi : (OPTS & OPTS_ALIBI) != 0;
    float x;
    if (softcap) {
      float dtanh;
      if constexpr (TANH == TANH_EX2_RCP) {
        x = softcap_out * scaled_tanh(s, softcap_k, dtanh);
      } else {
        const float t = TANH == TANH_MUFU ? fast_tanh(s * softcap_in) : tanhf(s * softcap_in);
        x = softcap_out * t;
        dtanh = 1.f - t * t;
      }
      if (grad) *grad *= dtanh;
    } else {
      x = s * scale_log2;
    }
    if (alibi) x = fmaf(-slope_log2, fabsf(dist), x);
    return x;
  }

  __device__ __forceinline__ float apply(float s, int i, int j) const {
    return logit<OPTS_RUNTIME, TANH_EXACT>(s, static_cast<float>(i + diag - j));
  }
};

// The score function and its gradient for one element: s, dp in; p, ds out (ds without the
// scale, which the epilogues apply). i is the query row, j the key.
struct ScoreGrad {
  ScoreMod mod;
  Mask mask;
  bool need_mask;

  __device__ __forceinline__ float dist(int i, int j) const {
    return static_cast<float>(i + mod.diag - j);
  }

  // P of one element under options without soft-cap (OPTS 0 or OPTS_ALIBI), from s alone:
  // a kernel computes it while the dP GEMM still runs, then dS = P (dP - delta).
  template <int OPTS>
  __device__ __forceinline__ float prob(float s, int i, int j, float lse_log2) const {
    static_assert((OPTS & (OPTS_SOFTCAP | OPTS_RUNTIME)) == 0, "no soft-cap");
    return fast_exp2(mod.logit<OPTS, TANH_EX2_RCP>(s, dist(i, j)) - lse_log2);
  }

  // The same under soft-cap fixed at compile time (OPTS_SOFTCAP, with or without
  // OPTS_ALIBI; the tanh's form TANH): P, and pd = P (1 - tanh^2), so that dS = pd (dP -
  // delta) once dP is in, with one float an element held in between, as without soft-cap.
  template <int OPTS, int TANH>
  __device__ __forceinline__ float prob_softcap(float s, int i, int j, float lse_log2,
                                                float& pd) const {
    static_assert((OPTS & OPTS_SOFTCAP) && !(OPTS & OPTS_RUNTIME), "soft-cap fixed");
    float dtanh = 1.f;
    const float p = fast_exp2(mod.logit<OPTS, TANH>(s, dist(i, j), &dtanh) - lse_log2);
    pd = p * dtanh;
    return p;
  }

  // P and dS of one element in place of s and dp (TANH: ScoreMod::logit).
  template <int OPTS = OPTS_RUNTIME, int TANH = TANH_EXACT>
  __device__ __forceinline__ void operator()(float& s, float& dp, int i, int j, float lse_log2,
                                             float delta) const {
    dp -= delta;
    float p = fast_exp2(mod.logit<OPTS, TANH>(s, dist(i, j), &dp) - lse_log2);
    if (need_mask && !mask.visible(i, j)) p = 0.f;
    s = p;
    dp *= p;
  }
};

// Applies the score function to scores held in mma.m16n8k16 C-fragments:
// s[mt][nt][e] is row row0 + mt * 16 + (e / 2) * 8, column col0 + nt * 8 + e % 2, where
// row0 = first row of the tile + lane / 4 and col0 = first key of the tile + 2 * (lane % 4).
// OPTS (0: none): replace each score by its base-2 logit (ScoreMod::logit); MASK: set
// invisible ones to -inf. With OPTS 0 the scores stay raw (the caller scales them in the
// exp2). ALiBi's distance is converted once per row and stepped by constants per element.
// KEY_BOUNDS: the mask too, as each row's range of visible keys (Mask::keys_of_row) that
// an element's constant column offset is compared with (two compares, where visible(i, j)
// takes about eight); four more registers a row tile, which the mma.sync kernels, at their
// register limit, do not have.
template <int OPTS, bool MASK, int TANH = TANH_EXACT, bool KEY_BOUNDS = false, int M_TILES,
          int N_TILES>
__device__ __forceinline__ void score_fragment(float (&s)[M_TILES][N_TILES][4], int row0,
                                               int col0, const ScoreMod& mod,
                                               const Mask& mask) {
  float dist0[M_TILES][2];  // i + diag - col0 of each row (ALiBi)
  int lo[M_TILES][2], hi[M_TILES][2];  // KEY_BOUNDS: the row's visible keys, from col0
#pragma unroll
  for (int mt = 0; mt < M_TILES; ++mt)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int i = row0 + mt * 16 + half * 8;
      dist0[mt][half] = opts_alibi(OPTS) ? static_cast<float>(i + mod.diag - col0) : 0.f;
      if constexpr (MASK && KEY_BOUNDS) mask.keys_of_row(i, col0, lo[mt][half], hi[mt][half]);
    }
#pragma unroll
  for (int mt = 0; mt < M_TILES; ++mt)
#pragma unroll
    for (int nt = 0; nt < N_TILES; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int c = nt * 8 + (e & 1), half = e >> 1;  // key col0 + c, row row0 + 8 half
        if constexpr (OPTS != 0)
          s[mt][nt][e] = mod.logit<OPTS, TANH>(s[mt][nt][e],
                                               dist0[mt][half] - static_cast<float>(c));
        if constexpr (MASK) {
          const bool visible = KEY_BOUNDS ? (c >= lo[mt][half]) & (c <= hi[mt][half])
                                          : mask.visible(row0 + mt * 16 + half * 8, col0 + c);
          s[mt][nt][e] = visible ? s[mt][nt][e] : neg_inf();
        }
      }
}

}  // namespace cuflash
