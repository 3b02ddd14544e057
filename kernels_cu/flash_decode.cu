// KV-cache decoding with split-KV ("flash-decoding"), and the LSE merge of partial results.
//
// append_kv: copies the new keys and values into the caches at cache_seqlens (contiguous,
//   or through the block table), before flash_decode reads them.
// flash_decode: fp16 / bf16 on tensor cores (mma.sync m16n8k16, float32 accumulation).
//   One CTA per (16 packed query rows, kv head, split, batch item). The query heads that
//   share a kv head are packed into one m16 tile, packed row r = i * group + g for query
//   row i and head g of the group (GQA 32:8 at seqlen_q 1 fills 4 of the 16 rows), so each
//   kv head's keys are read once however many query heads read them. A split owns a range
//   of 16-key tiles; its NUM_WARPS warps take the tiles in turn, and each warp streams its
//   tiles through a private STAGES-deep cp.async ring (no block-wide barrier in the key
//   loop) and runs its own online softmax: S = Q K^T and O += P V on tensor cores, P never
//   leaving registers. At the end the warps' results are merged by their LSE, and the
//   split's (out, lse) goes to out directly (one split) or to float32 scratch, where the
//   last split of the group to finish (an atomic counter) merges every split's partial
//   result by LSE into out: one launch, the partials read back from L2.
//   Decoding reads every byte of K and V once and does ~2 * 16 rows of MMA per key, so it
//   is bound by memory bandwidth: what matters is bytes in flight (warps x stages x tiles),
//   not the MMAs.
// merge_parts: out = sum_s exp(lse_s - lse) * out_s with lse = log sum_s exp(lse_s), the
//   kernel of merge_attention (split-KV's combine, fused into flash_decode, uses the same
//   LseMerge).
#include "common/mask.cuh"
#include "common/params.cuh"
#include "common/softmax.cuh"

namespace cuflash {

constexpr int DECODE_ROWS = 16;  // packed query rows per CTA: one m16 tile
constexpr int DECODE_KEYS = 16;  // keys per tile: two n8 tiles of S, one k16 step of P V
constexpr int MERGE_WARPS = 4;   // merge_parts: one warp per output row
constexpr int APPEND_THREADS = 128;

// The merge of partial attention results over disjoint key sets: with lse_s the natural-log
// log-sum-exp of part s, lse = log sum_s exp(lse_s) and part s weighs exp(lse_s - lse).
// Accumulated online (running max `mx`, sum of exp(lse_s - mx)), so parts can be added in
// any order and two partial merges combined. A part with lse_s = -inf (no key) weighs 0;
// when every part is -inf, lse = -inf and every weight is 0. A part with lse_s = NaN (it
// met a NaN, docs/CONVENTIONS.md) makes sum NaN for good, so lse and every weight are NaN.
struct LseMerge {
  float mx = neg_inf();
  float sum = 0.f;

  __device__ __forceinline__ void add(float lse_s) { combine(lse_s, 1.f); }

  // Folds in another merge's (mx, sum).
  __device__ __forceinline__ void combine(float other_mx, float other_sum) {
    // Not fmaxf, which drops a NaN: a NaN part makes m NaN, and with it sum, for good.
    const float m = mx > other_mx ? mx : other_mx;
    if (m == neg_inf()) return;  // both empty: exp(-inf - -inf) would be NaN
    sum = sum * expf(mx - m) + other_sum * expf(other_mx - m);
    mx = m;
  }

  __device__ __forceinline__ float lse() const {
    return mx == neg_inf() ? neg_inf() : mx + logf(sum);
  }
};

__device__ __forceinline__ float merge_weight(float lse_s, float lse) {
  return lse == neg_inf() ? 0.f : expf(lse_s - lse);
}

__device__ __forceinline__ float as_float(float x) { return x; }
__device__ __forceinline__ float as_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float as_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Keys a batch item attends over; cache_seqlens are not checked on the GPU (that needs a
// device synchronisation), so out-of-range values are clamped here to keep every access
// inside the caches.
// In 64 bits: cached near 2^31 must not wrap past the capacity.
__device__ __forceinline__ int cache_length(const DecodeParams& p, int b) {
  const int cached = p.cache_seqlens ? p.cache_seqlens[b] : p.cache_seqlen;
  return static_cast<int>(min(static_cast<int64>(max(cached, 0)) + p.seqlen_new,
                              static_cast<int64>(p.attn.seqlen_k)));
}

// Where key `pos` of batch item b lives: its page (the batch item for contiguous caches)
// and its row in that page, for 0 <= pos < attn.seqlen_k. Block-table entries are not
// checked on the GPU either: one outside [0, num_pages) is clamped into it (the host
// rejects a paged cache with no page; the outer max keeps even that at page 0, not -1).
__device__ __forceinline__ void locate_key(const DecodeParams& p, int b, int pos, int& page,
                                           int& row) {
  if (p.block_table) {
    const int block = p.page_size.divmod(pos, row);
    page = max(min(p.block_table[b * p.block_table_batch_stride + block], p.num_pages - 1), 0);
  } else {
    page = b;
    row = pos;
  }
}

// ---------------------------------------------------------------------------------------
// append_kv: one CTA per (batch item, new row); grid = batch * seqlen_new.
template <typename T>
__global__ void __launch_bounds__(APPEND_THREADS) append_kv(const __grid_constant__ DecodeParams p) {
  const AttnArgs& a = p.attn;
  const int t = blockIdx.x % p.seqlen_new, b = blockIdx.x / p.seqlen_new;
  const int cached = p.cache_seqlens ? p.cache_seqlens[b] : p.cache_seqlen;
  // In 64 bits: in int32, cached near 2^31 would wrap to a negative row and pass the test.
  const int64 pos = static_cast<int64>(max(cached, 0)) + t;
  if (pos >= a.seqlen_k) return;  // past the capacity (unchecked on the GPU): dropped
  int page, row;
  locate_key(p, b, static_cast<int>(pos), page, row);
  // AttnArgs holds the caches as const for the attention kernels; this one writes them.
  T* k = static_cast<T*>(const_cast<void*>(a.k)) + page * a.k_batch_stride + row * a.k_row_stride;
  T* v = static_cast<T*>(const_cast<void*>(a.v)) + page * a.v_batch_stride + row * a.v_row_stride;
  const T* kn = static_cast<const T*>(p.k_new) + b * p.kn_batch_stride + t * p.kn_row_stride;
  const T* vn = static_cast<const T*>(p.v_new) + b * p.vn_batch_stride + t * p.vn_row_stride;
  for (int e = threadIdx.x; e < a.nheads_kv * a.headdim; e += APPEND_THREADS) {
    const int h = e / a.headdim, d = e % a.headdim;
    k[h * a.k_head_stride + d] = kn[h * p.kn_head_stride + d];
    v[h * a.v_head_stride + d] = vn[h * p.vn_head_stride + d];
  }
}

// ---------------------------------------------------------------------------------------
// flash_decode

template <int HEAD_DIM, int NUM_WARPS, int STAGES>
struct DecodeTraits {
  static constexpr int NUM_THREADS = NUM_WARPS * 32;
  static constexpr int SC = (HEAD_DIM + 63) / 64 * 64;   // swizzled shared row (elements)
  static constexpr int D_TILES = HEAD_DIM / 8;           // n8 tiles of O
  static constexpr int K_STEPS = HEAD_DIM / 16;          // k16 steps of Q K^T
  static constexpr int TILE_BYTES = DECODE_KEYS * SC * 2;
  static constexpr int Q_BYTES = DECODE_ROWS * SC * 2;
  static constexpr int RING_BYTES = STAGES * 2 * TILE_BYTES;  // one warp's K/V ring
  // The warps' float32 (O, lse) for the final merge overlay the rings. Row stride
  // HEAD_DIM + 8 floats: the float2 stores of a C-fragment (rows lane / 4) then fall in
  // distinct banks.
  static constexpr int OS = HEAD_DIM + 8;
  static constexpr int MERGE_BYTES = (NUM_WARPS * DECODE_ROWS * OS + (NUM_WARPS + 1) * DECODE_ROWS) * 4;
  static constexpr int BODY_BYTES = NUM_WARPS * RING_BYTES > MERGE_BYTES ? NUM_WARPS * RING_BYTES : MERGE_BYTES;
  // cuflash/ops/decode.py (config) computes the same size; the compile check proves it.
  static constexpr int SMEM_BYTES = Q_BYTES + BODY_BYTES;
  static_assert(HEAD_DIM % 16 == 0, "k16 steps");
};

// One warp copies a 16-key tile of K or V (rows `row_stride` elements apart) into a
// swizzled 16 x SC tile at `dst`. Rows >= nrows (past seqlen_k) and columns >= headdim are
// zero-filled: a stale or NaN row of the cache must not reach P V, where 0 * NaN = NaN.
// Where a row's 16-byte chunks divide the warp, lane copies chunk lane % CHUNKS of rows
// lane / CHUNKS + p * ROWS_PER_PASS: its offsets are set up once per tensor (KvTileCopy)
// and a pass costs a 64-bit add and a constant XOR, about a third of the generic path's
// instructions, which is what a decode warp spends its time on between memory waits.
template <typename T, int HEAD_DIM>
struct KvTileCopy {
  static constexpr int CHUNKS = HEAD_DIM / 8;  // 16-byte chunks per row
  static constexpr int SC = (HEAD_DIM + 63) / 64 * 64;
  static constexpr bool BY_PASS = 32 % CHUNKS == 0;
  static constexpr int ROWS_PER_PASS = BY_PASS ? 32 / CHUNKS : 1;
  int row0, lane, headdim;
  int64 row_stride, lane_offset, pass_bytes;  // elements, elements, bytes
  uint32_t dst_lane;  // the lane's chunk of row row0 (bytes, swizzled)
  bool col_ok;
  __device__ __forceinline__ KvTileCopy(int lane_, int headdim_, int64 row_stride_)
      : lane(lane_), headdim(headdim_), row_stride(row_stride_) {
    row0 = lane / CHUNKS;
    const int col = lane % CHUNKS * 8;
    col_ok = col < headdim;
    dst_lane = swizzle<SC>(row0, col) * 2;
    lane_offset = row0 * row_stride + col;
    pass_bytes = ROWS_PER_PASS * row_stride * static_cast<int64>(sizeof(T));
  }

  // Row row0 + dr of each pass: row0 < ROWS_PER_PASS and dr a multiple of it, so the
  // swizzle's XOR term (row & 7) is row0's XOR dr's, a constant.
  template <typename Valid>
  __device__ __forceinline__ void passes(uint32_t dst, const char* lane_src, Valid valid) const {
#pragma unroll
    for (int pass = 0; pass < DECODE_KEYS / ROWS_PER_PASS; ++pass) {
      const int dr = pass * ROWS_PER_PASS;
      cp_async_16(dst + dr * SC * 2 + (dst_lane ^ ((dr & 7) << 4)), lane_src, valid(dr));
      lane_src += pass_bytes;
    }
  }

  __device__ __forceinline__ void operator()(uint32_t dst, const T* src, int nrows) const {
    if constexpr (BY_PASS) {
      // A zero-byte cp.async reads nothing, so a row past nrows keeps its address (which may
      // lie past the cache) instead of paying for a select of a valid one. Every tile but
      // an item's last is whole: there the row test, a compare and a predicate shuffle per
      // copy, is left out.
      const char* lane_src = reinterpret_cast<const char*>(src + lane_offset);
      if (nrows >= DECODE_KEYS)
        passes(dst, lane_src, [&](int) { return col_ok; });
      else
        passes(dst, lane_src, [&](int dr) { return col_ok && row0 + dr < nrows; });
    } else {  // hd 96, 192: chunks straddle the warp's rows
#pragma unroll
      for (int it = 0; it < DECODE_KEYS * CHUNKS / 32; ++it) {
        const int idx = it * 32 + lane;
        const int r = idx / CHUNKS, c = idx % CHUNKS;
        const bool ok = r < nrows && c * 8 < headdim;
        cp_async_16(dst + swizzle<SC>(r, c * 8) * 2, ok ? src + r * row_stride + c * 8 : src, ok);
      }
    }
  }
};

// A CTA's place: blockIdx.x = ((b * num_splits + split) * nheads_kv + h_kv) * m_blocks +
// m_block, so that CTAs that read the same key rows (row blocks of one kv head, then the kv
// heads, which share cache rows) are neighbours in launch order; its packed rows r0 ..
// r0 + rows - 1. The epilogue builds it again from an opaque copy of blockIdx.x, so that
// none of it stays live in registers across the key loop (hd 256 sits at 255 registers).
// Divisions are FastDiv's: the CTA's first K/V copy waits for everything computed before
// it, at one warp per scheduler about 5 cycles an instruction (docs/notes/decode.md, v6).
struct DecodeCta {
  int m_block, h_kv, split, b, group, r0, rows;
  __device__ __forceinline__ DecodeCta(const DecodeParams& p, int idx) {
    idx = p.m_blocks.divmod(idx, m_block);
    idx = p.nheads_kv.divmod(idx, h_kv);
    b = p.num_splits.divmod(idx, split);
    group = p.group.d;
    r0 = m_block * DECODE_ROWS;
    rows = min(DECODE_ROWS, group * p.attn.seqlen_q - r0);
  }
  // Index of this CTA's split group (batch item, kv head, row block) in split_counter.
  __device__ __forceinline__ int group_index(const DecodeParams& p) const {
    return (b * p.attn.nheads_kv + h_kv) * p.m_blocks.d + m_block;
  }
  // Packed row r0 + r is query row i of head h.
  __device__ __forceinline__ void query_of(const DecodeParams& p, int r, int& i, int& h) const {
    int g;
    i = p.group.divmod(r0 + r, g);
    h = h_kv * group + g;
  }
};

__device__ __forceinline__ int opaque(int x) {
  asm volatile("" : "+r"(x));
  return x;
}

template <typename T, int HEAD_DIM, int NUM_WARPS, int STAGES, bool HAS_SCORE_MOD>
__global__ void __launch_bounds__(NUM_WARPS * 32, NUM_WARPS <= 4 ? 2 : 1)
flash_decode(const __grid_constant__ DecodeParams p) {
  using Tr = DecodeTraits<HEAD_DIM, NUM_WARPS, STAGES>;
  constexpr int SC = Tr::SC, D_TILES = Tr::D_TILES, K_STEPS = Tr::K_STEPS;
  constexpr int NUM_THREADS = Tr::NUM_THREADS, CHUNKS = HEAD_DIM / 8;

  extern __shared__ __align__(128) unsigned char smem[];
  const uint32_t sQ = smem_addr(smem);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;

  const DecodeCta cta(p, blockIdx.x);
  const int h_kv = cta.h_kv, split = cta.split, b = cta.b, r0 = cta.r0, rows = cta.rows;
  AttnArgs a = p.attn;  // with this batch item's seqlen_k, for Mask and ScoreMod
  a.seqlen_k = cache_length(p, b);
  const int i_begin = p.group.div(r0), i_end = p.group.div(r0 + rows - 1) + 1;  // query rows

  // This split's tiles: the tiles of keys seen by any of the rows, cut into num_splits
  // ranges of base or base + 1 tiles.
  const Mask mask(a);
  int key_begin, key_end;
  mask.key_range(i_begin, i_end, key_begin, key_end);
  const int t_first = key_begin / DECODE_KEYS;
  const int n_tiles = key_end > key_begin ? (key_end + DECODE_KEYS - 1) / DECODE_KEYS - t_first : 0;
  int extra;
  const int base = p.num_splits.divmod(n_tiles, extra);
  const int t_begin = t_first + split * base + min(split, extra);
  const int t_end = t_begin + base + (split < extra);

  // Q: packed row r is query row i of head h (DecodeCta::query_of).
  const T* q = static_cast<const T*>(a.q) + b * a.q_batch_stride;
  // 16-byte chunks of 16 rows (of Q here, of out in the epilogue): passes of the CTA.
  constexpr int ROW_PASSES = (DECODE_ROWS * CHUNKS + NUM_THREADS - 1) / NUM_THREADS;
#pragma unroll
  for (int it = 0; it < ROW_PASSES; ++it) {
    const int c = it * NUM_THREADS + tid, r = c / CHUNKS, ch = c % CHUNKS;
    const bool ok = r < rows && ch * 8 < a.headdim;  // rows <= 16: c is in the tile
    int i, h;
    cta.query_of(p, r, i, h);
    const T* src = ok ? q + i * a.q_row_stride + h * a.q_head_stride + ch * 8 : q;
    cp_async_16(sQ + swizzle<SC>(r, ch * 8) * 2, src, ok);
  }
  cp_async_commit();

  // This warp's ring: stage s holds K at ring + 2 s TILE_BYTES, V right after. Warp w loads
  // and computes tiles t_begin + w, t_begin + w + NUM_WARPS, ...
  const uint32_t ring = sQ + Tr::Q_BYTES + warp * Tr::RING_BYTES;
  const T* k_cache = static_cast<const T*>(a.k) + h_kv * a.k_head_stride;
  const T* v_cache = static_cast<const T*>(a.v) + h_kv * a.v_head_stride;
  int t_load = t_begin + warp;
  // The next tile's page, read one load ahead: the block-table read then waits behind a
  // tile's compute instead of in front of the tile's copies.
  int page = 0, row = 0;
  if (t_load < t_end) locate_key(p, b, t_load * DECODE_KEYS, page, row);
  const KvTileCopy<T, HEAD_DIM> k_copy(lane, a.headdim, a.k_row_stride);
  const KvTileCopy<T, HEAD_DIM> v_copy(lane, a.headdim, a.v_row_stride);
  auto load_next = [&](int stage) {
    if (t_load < t_end) {
      const int nrows = a.seqlen_k - t_load * DECODE_KEYS;
      const uint32_t dst = ring + stage * 2 * Tr::TILE_BYTES;
      k_copy(dst, k_cache + page * a.k_batch_stride + row * a.k_row_stride, nrows);
      v_copy(dst + Tr::TILE_BYTES, v_cache + page * a.v_batch_stride + row * a.v_row_stride,
             nrows);
      t_load += NUM_WARPS;
      if (t_load < t_end) locate_key(p, b, t_load * DECODE_KEYS, page, row);
    }
    cp_async_commit();  // empty groups keep the wait counts below uniform
  };
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) load_next(s);

  cp_async_wait<STAGES - 1>();  // Q (the oldest group) landed
  __syncthreads();
  // ldmatrix.x4 lanes (as in flash_fwd.cu): A (Q) reads row lane % 16, k-half lane / 16;
  // B of two n8 tiles (K) row lane % 8 + 8 * (lane / 16), k-half (lane / 8) % 2; V (.trans,
  // k = keys) key lane % 8 + 8 * ((lane / 8) % 2), column half lane / 16.
  // Q's A-fragments stay in registers up to hd 128 (HEAD_DIM / 4 of them): re-read from
  // shared memory they cost a tile 8 ldmatrix and their swizzled addresses, a tenth of the
  // loop's instructions (docs/notes/decode.md, v4). At hd 192 / 256 they would spill, and
  // Q is re-read every tile.
  constexpr bool Q_IN_REGS = HEAD_DIM <= 128;
  uint32_t q_regs[K_STEPS][4];  // unused (and dropped by the compiler) past hd 128
  auto q_fragment = [&](uint32_t (&qf)[4], int ks) {
    ldmatrix_x4(qf, sQ + swizzle<SC>(lane & 15, ks * 16 + (lane >> 4) * 8) * 2);
  };
  if constexpr (Q_IN_REGS)
#pragma unroll
    for (int ks = 0; ks < K_STEPS; ++ks) q_fragment(q_regs[ks], ks);
  const int k_row = (lane & 7) + (lane >> 4) * 8, k_half = (lane >> 3) & 1;
  const int v_row = (lane & 7) + ((lane >> 3) & 1) * 8, v_half = lane >> 4;

  // The two packed rows of this thread's C-fragments (lane / 4 and lane / 4 + 8): their
  // query rows and score functions (ALiBi slopes differ between the heads of a group).
  int qi[2], qh[2];
  cta.query_of(p, lane / 4, qi[0], qh[0]);
  cta.query_of(p, lane / 4 + 8, qi[1], qh[1]);
  const ScoreMod mods[2] = {ScoreMod(a, b, qh[0]), ScoreMod(a, b, qh[1])};

  float acc_o[1][D_TILES][4];
#pragma unroll
  for (int dt = 0; dt < D_TILES; ++dt)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc_o[0][dt][e] = 0.f;
  OnlineSoftmax<1> softmax;

  int stage = 0;
  for (int t = t_begin + warp; t < t_end; t += NUM_WARPS) {
    __syncwarp();  // every lane is done with the stage that the next load overwrites
    load_next(stage == 0 ? STAGES - 1 : stage - 1);  // the stage computed last
    cp_async_wait<STAGES - 1>();  // this lane's copies of tile t landed
    __syncwarp();                 // and every other lane's
    const uint32_t sK = ring + stage * 2 * Tr::TILE_BYTES, sV = sK + Tr::TILE_BYTES;

    float s[1][2][4];
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[0][nt][e] = 0.f;
#pragma unroll
    for (int ks = 0; ks < K_STEPS; ++ks) {
      uint32_t q_smem[4], kf[4];
      if constexpr (!Q_IN_REGS) q_fragment(q_smem, ks);
      const uint32_t(&qf)[4] = Q_IN_REGS ? q_regs[ks] : q_smem;
      ldmatrix_x4(kf, sK + swizzle<SC>(k_row, ks * 16 + k_half * 8) * 2);
      mma_16816<T>(s[0][0], qf, kf[0], kf[1]);
      mma_16816<T>(s[0][1], qf, kf[2], kf[3]);
    }

    // The score function and mask, with packed rows mapped to query rows (score_fragment
    // of mask.cuh assumes consecutive rows are consecutive queries, which packing breaks).
    const int n0 = t * DECODE_KEYS;
    const bool boundary = mask.tile_needs_mask(i_begin, i_end, n0, n0 + DECODE_KEYS);
    if (HAS_SCORE_MOD || boundary) {
#pragma unroll
      for (int nt = 0; nt < 2; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int i = qi[e >> 1], j = n0 + nt * 8 + 2 * (lane & 3) + (e & 1);
          float x = s[0][nt][e];
          if constexpr (HAS_SCORE_MOD) x = mods[e >> 1].apply(x, i, j);
          s[0][nt][e] = !boundary || mask.visible(i, j) ? x : neg_inf();
        }
    }
    softmax.update<true>(s, acc_o, HAS_SCORE_MOD ? 1.f : mods[0].scale_log2);

    // O += P V: P's C-fragments, rounded to T, are the A-fragment of one k16 step.
    uint32_t pf[4] = {dtype_traits<T>::pack(s[0][0][0], s[0][0][1]),
                      dtype_traits<T>::pack(s[0][0][2], s[0][0][3]),
                      dtype_traits<T>::pack(s[0][1][0], s[0][1][1]),
                      dtype_traits<T>::pack(s[0][1][2], s[0][1][3])};
#pragma unroll
    for (int dp = 0; dp < D_TILES / 2; ++dp) {
      uint32_t vf[4];
      ldmatrix_x4_trans(vf, sV + swizzle<SC>(v_row, dp * 16 + v_half * 8) * 2);
      mma_16816<T>(acc_o[0][2 * dp], pf, vf[0], vf[1]);
      mma_16816<T>(acc_o[0][2 * dp + 1], pf, vf[2], vf[3]);
    }
    stage = stage == STAGES - 1 ? 0 : stage + 1;
  }
  cp_async_wait<0>();

  // Merge the warps. Each warp's O (normalised) and lse go to shared memory over the rings,
  // so every warp must be done with its ring first.
  float lse_w[1][2];
  softmax.finalize(acc_o, lse_w);
  __syncthreads();
  float* sO = reinterpret_cast<float*>(smem + Tr::Q_BYTES);  // [NUM_WARPS][16][OS]
  float* sW = sO + NUM_WARPS * DECODE_ROWS * Tr::OS;          // [NUM_WARPS][16]: lse, then weight
  float* sLse = sW + NUM_WARPS * DECODE_ROWS;                 // [16]: the merged lse
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row_w = warp * DECODE_ROWS + lane / 4 + 8 * r;
#pragma unroll
    for (int dt = 0; dt < D_TILES; ++dt)
      *reinterpret_cast<float2*>(sO + row_w * Tr::OS + dt * 8 + 2 * (lane & 3)) =
          make_float2(acc_o[0][dt][2 * r], acc_o[0][dt][2 * r + 1]);
    if ((lane & 3) == 0) sW[row_w] = lse_w[0][r];
  }
  __syncthreads();
  if (tid < DECODE_ROWS) {
    LseMerge m;
#pragma unroll
    for (int w = 0; w < NUM_WARPS; ++w) m.add(sW[w * DECODE_ROWS + tid]);
    const float lse = m.lse();
#pragma unroll
    for (int w = 0; w < NUM_WARPS; ++w)
      sW[w * DECODE_ROWS + tid] = merge_weight(sW[w * DECODE_ROWS + tid], lse);
    sLse[tid] = lse;
  }
  __syncthreads();

  // Store: out / lse directly with one split, else this split's float32 partial result.
  const DecodeCta c(p, opaque(blockIdx.x));
  const int64 nheads = p.attn.nheads, seqlen_q = p.attn.seqlen_q, batch = p.attn.batch;
  const int headdim = p.attn.headdim;
  auto out_at = [&](int r, int d) -> T* {  // out element (packed row r, column d)
    int i, h;
    c.query_of(p, r, i, h);
    return static_cast<T*>(p.o) + c.b * p.o_batch_stride + i * p.o_row_stride +
           h * p.o_head_stride + d;
  };
  auto lse_at = [&](float* base, int split, int r) -> float* {  // lse / lse_accum element
    int i, h;
    c.query_of(p, r, i, h);
    return base + ((split * batch + c.b) * nheads + h) * seqlen_q + i;
  };
  const int64 accum_split_stride = batch * seqlen_q * nheads * headdim;
  auto o_accum_at = [&](int split, int r) -> float* {  // row r of a split's partial result
    int i, h;
    c.query_of(p, r, i, h);
    return p.o_accum + split * accum_split_stride + ((c.b * seqlen_q + i) * nheads + h) * headdim;
  };
  // A thread sums 8 columns of a row over the warps and stores them with one 16-byte store
  // (two for float32): out and the partials are ours, contiguous, rows of a multiple of 8.
#pragma unroll
  for (int it = 0; it < ROW_PASSES; ++it) {
    const int e = it * NUM_THREADS + tid, r = e / CHUNKS, d = e % CHUNKS * 8;
    if (r >= c.rows || d >= headdim) continue;
    float x[8] = {};
#pragma unroll
    for (int w = 0; w < NUM_WARPS; ++w) {
      const float wt = sW[w * DECODE_ROWS + r];
      const float4* o = reinterpret_cast<const float4*>(sO + (w * DECODE_ROWS + r) * Tr::OS + d);
      const float4 lo = o[0], hi = o[1];
      const float y[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
#pragma unroll
      for (int k = 0; k < 8; ++k) x[k] = fmaf(wt, y[k], x[k]);
    }
    if (p.o_accum) {
      float4* dst = reinterpret_cast<float4*>(o_accum_at(c.split, r) + d);
      dst[0] = make_float4(x[0], x[1], x[2], x[3]);
      dst[1] = make_float4(x[4], x[5], x[6], x[7]);
    } else {
      *reinterpret_cast<uint4*>(out_at(r, d)) = make_uint4(
          dtype_traits<T>::pack(x[0], x[1]), dtype_traits<T>::pack(x[2], x[3]),
          dtype_traits<T>::pack(x[4], x[5]), dtype_traits<T>::pack(x[6], x[7]));
    }
  }
  if (tid < c.rows)
    *lse_at(p.o_accum ? p.lse_accum : p.lse, p.o_accum ? c.split : 0, tid) = sLse[tid];
  if (!p.o_accum) return;

  // Split-KV combine: the last split of this (batch item, kv head, row block) to get here
  // merges all the splits' partials. The barrier-then-one-thread pattern of CUTLASS's
  // split-K semaphore: the barrier orders every thread's partial stores before thread 0's
  // release (the counter's acq_rel add, cumulative over what the barrier ordered), and its
  // acquire before every thread's reads after the second barrier; the reads go to L2
  // (ld.cg: L1 is not coherent with the other SMs' stores).
  __syncthreads();
  __shared__ int is_last;
  if (tid == 0) {
    int* counter = p.split_counter + c.group_index(p);
    int arrived;
    asm volatile("atom.acq_rel.gpu.global.add.s32 %0, [%1], 1;\n"
                 : "=r"(arrived) : "l"(counter) : "memory");
    is_last = arrived == p.num_splits.d - 1;
    if (is_last) *counter = 0;  // re-armed for the next launch
  }
  __syncthreads();
  if (!is_last) return;
  // Weights exp(lse_s - lse) of every (split, row) into sW2 [num_splits][DECODE_ROWS] (over
  // the rings: num_splits <= 128 takes 8 KiB), the merged lse to lse: a warp per row, its
  // lanes over the splits, merged by shuffles.
  float* sW2 = reinterpret_cast<float*>(smem + Tr::Q_BYTES);
  for (int r = warp; r < c.rows; r += NUM_WARPS) {
    LseMerge m;
    for (int s = lane; s < p.num_splits.d; s += 32) {
      const float lse_s = __ldcg(lse_at(p.lse_accum, s, r));
      sW2[s * DECODE_ROWS + r] = lse_s;
      m.add(lse_s);
    }
#pragma unroll
    for (int off = 16; off > 0; off /= 2)
      m.combine(__shfl_xor_sync(0xffffffffu, m.mx, off), __shfl_xor_sync(0xffffffffu, m.sum, off));
    const float lse = m.lse();
    for (int s = lane; s < p.num_splits.d; s += 32)  // the entries this lane wrote
      sW2[s * DECODE_ROWS + r] = merge_weight(sW2[s * DECODE_ROWS + r], lse);
    if (lane == 0) *lse_at(p.lse, 0, r) = lse;
  }
  __syncthreads();
  // out = sum_s w_s out_s, four columns a thread (headdim is a multiple of 8). The loads
  // do not depend on the weights, so that the unrolled loop keeps 8 of them in flight
  // (a load behind a branch on w waited a full L2 round trip per split).
  constexpr int QUADS = HEAD_DIM / 4;
  for (int e = tid; e < c.rows * QUADS; e += NUM_THREADS) {
    const int r = e / QUADS, d = e % QUADS * 4;
    if (d >= headdim) continue;
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
    const float* part = o_accum_at(0, r) + d;
#pragma unroll 8
    for (int s = 0; s < p.num_splits.d; ++s) {
      const float4 x = __ldcg(reinterpret_cast<const float4*>(part + s * accum_split_stride));
      const float w = sW2[s * DECODE_ROWS + r];
      if (w != 0.f) {  // an empty split adds nothing, whatever its partial holds
        acc.x = fmaf(w, x.x, acc.x);
        acc.y = fmaf(w, x.y, acc.y);
        acc.z = fmaf(w, x.z, acc.z);
        acc.w = fmaf(w, x.w, acc.w);
      }
    }
    *reinterpret_cast<uint2*>(out_at(r, d)) =
        make_uint2(dtype_traits<T>::pack(acc.x, acc.y), dtype_traits<T>::pack(acc.z, acc.w));
  }
}

// ---------------------------------------------------------------------------------------
// merge_parts: one warp per output row (b, i, h). Lanes take the parts for the LSE, then
// the head dimension (coalesced) for the weighted sum, 256 columns a pass. The weights of
// 32 parts at a time are computed one per lane and broadcast by shuffles, and the part loop
// is unrolled so that several parts' loads are in flight: parts just computed sit in L2,
// so latency, not bandwidth, is what this kernel waits on.
template <typename T>
__global__ void __launch_bounds__(MERGE_WARPS * 32) merge_parts(const __grid_constant__ MergeParams p) {
  constexpr int SLAB = 8;  // columns per lane per pass: 8 * 32 = 256
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64 row = static_cast<int64>(blockIdx.x) * MERGE_WARPS + warp;
  if (row >= static_cast<int64>(p.batch) * p.seqlen_q * p.nheads) return;
  const int h = static_cast<int>(row % p.nheads);
  const int i = static_cast<int>(row / p.nheads % p.seqlen_q);
  const int b = static_cast<int>(row / p.nheads / p.seqlen_q);

  const float* part_lse = p.part_lse + b * p.pl_batch_stride + h * p.pl_head_stride +
                          i * p.pl_row_stride;
  LseMerge m;
  for (int s = lane; s < p.num_parts; s += 32) m.add(part_lse[s * p.pl_part_stride]);
#pragma unroll
  for (int off = 16; off > 0; off /= 2)
    m.combine(__shfl_xor_sync(0xffffffffu, m.mx, off), __shfl_xor_sync(0xffffffffu, m.sum, off));
  const float lse = m.lse();

  const T* part = static_cast<const T*>(p.parts) + b * p.p_batch_stride + i * p.p_row_stride +
                   h * p.p_head_stride;
  T* o = static_cast<T*>(p.o) + b * p.o_batch_stride + i * p.o_row_stride + h * p.o_head_stride;
  for (int d0 = 0; d0 < p.headdim; d0 += SLAB * 32) {
    float acc[SLAB];
#pragma unroll
    for (int c = 0; c < SLAB; ++c) acc[c] = 0.f;
    for (int s0 = 0; s0 < p.num_parts; s0 += 32) {
      const int s_lane = s0 + lane;
      const float w_lane =
          s_lane < p.num_parts ? merge_weight(part_lse[s_lane * p.pl_part_stride], lse) : 0.f;
      const int n = min(32, p.num_parts - s0);
#pragma unroll 4
      for (int k = 0; k < n; ++k) {
        const float w = __shfl_sync(0xffffffffu, w_lane, k);
        const T* x = part + (s0 + k) * p.p_part_stride;
#pragma unroll
        for (int c = 0; c < SLAB; ++c) {
          const int d = d0 + c * 32 + lane;
          const float v = d < p.headdim ? as_float(x[d]) : 0.f;
          // A part of weight 0 adds nothing, whatever its out holds (inf, NaN).
          acc[c] = w == 0.f ? acc[c] : fmaf(w, v, acc[c]);
        }
      }
    }
#pragma unroll
    for (int c = 0; c < SLAB; ++c) {
      const int d = d0 + c * 32 + lane;
      if (d < p.headdim) o[d] = from_float<T>(acc[c]);
    }
  }
  if (lane == 0) p.lse[(static_cast<int64>(b) * p.nheads + h) * p.seqlen_q + i] = lse;
}

}  // namespace cuflash
