// FlashAttention forward for Hopper (sm_90a): TMA loads, wgmma, warp specialization.
//
// One CTA per (query block of Br = 64 x CONSUMERS rows, head, batch item); query blocks run
// last-first so that under a causal mask the heaviest start first. 1 + CONSUMERS warpgroups:
//   producer (warpgroup 0, one thread): TMA copies of Q (once a tile) and of K, V tiles of
//     Bc = BLOCK_N keys into rings of 128B-swizzled shared-memory buffers (K_STAGES of K,
//     V_STAGES of V), K of the next key block before V of this one; "full"
//     mbarriers count the bytes in, "empty" mbarriers say when the consumers are done with a
//     stage. It gives most of its registers away (setmaxnreg) to
//   consumers (warpgroups 1 .. CONSUMERS, 64 query rows each): S = Q K^T by wgmma with both
//     operands in shared memory; mask and online softmax on the accumulator registers
//     (base 2, scale * log2(e) folded into one FFMA per score; common/softmax.cuh); P
//     rounded to 16 bits in registers is the A operand of O += P V by wgmma, V read
//     MN-major from shared memory. S of the next key block is issued before P V of this
//     one, so that the softmax of one runs under the GEMM of the other (FA3's
//     intra-warpgroup overlap); at head dims up to 128 the consumers also take turns
//     issuing their GEMMs (ping-pong). O is divided by l_i once at the end and stored
//     (through the consumer's rows of its Q tile where Q has two buffers), LSE written.
// Dense calls without a left window (causal ones included) at head dims 128 and 256 run in
// clusters of two CTAs that share each K and V tile by TMA multicast
// (flash_fwd_sm90_cluster; fwd_sm90's CLUSTER).
// OPTS: the score options an instantiation applies (common/mask.cuh: 0, OPTS_SOFTCAP,
// OPTS_ALIBI, both as OPTS_RUNTIME), soft-cap's tanh in the form tanh_form<T, OPTS>() picks,
// as in the backward.
// Only tiles on a mask boundary pay for per-element masking; key blocks that no row of the
// query block sees are never loaded. Rows and keys past the ends read as zeros (TMA fills
// out-of-bounds elements with zeros); stores are predicated.
// VARLEN instantiations serve packed variable-length batches (AttnArgs.cu_seqlens_q/k): the
// maps describe the packed (total, heads, headdim) arrays as (headdim, total, heads, 1), and
// tile (m_block, h, b) reads rows from cu_seqlens_q[b] + m_block * Br on (SeqView). Rows
// past an item's end are then the next item's, not zeros: keys >= its seqlen_k are masked
// (Mask(a, seq): the tile counts as a boundary tile), query rows >= its seqlen_q are never
// stored, and V rows past the end meet p = 0. Tiles are those of the longest item
// (FwdSm90Params.m_blocks query blocks per head and item); the producer skips the
// ones past an item's end without handing them to the consumers. Dense instantiations
// compile exactly as they would without varlen support.
// Layouts, descriptors and fragment conventions: common/sm90.cuh.
#include "common/mask.cuh"
#include "common/params.cuh"
#include "common/sm90.cuh"
#include "common/softmax.cuh"

namespace cuflash {

// The kernel argument (mirrored by SM90_PARAMS in cuflash/ops/forward.py): TMA maps of q,
// k, v and o, each viewed as a 4-D tensor (headdim, seqlen, heads, batch) with the arrays'
// strides, box 64 x (Br for q, Bc for k and v, 64 for o) x 1 x 1, 128-byte swizzle; the
// forward's usual parameters (attn.q/k/v are not read: the maps carry the addresses); the
// tile scheduler's two counters (next tile, CTAs done), zero at launch and left zero at
// exit, or nullptr for the static order (CTA i takes tiles i, i + gridDim.x, ...; clusters
// always claim from the counter); m_blocks, the query blocks per head and item,
// ceil(seqlen_q / Br) (in clusters, blocks of CLUSTER x Br rows); tiles, m_blocks x heads x
// items; section, the (head, item) pairs of a section of the tile order (FwdTile); and
// o_by_tma, whether tma_o holds a map (dense calls with a staged O tile, where the driver
// encoded one; else O leaves by 16-byte stores). Varlen: the maps view q, k, v as (headdim,
// total, heads, 1), m_blocks is that of the longest item, and section is 1.
struct FwdSm90Params {
  sm90::TmaMap tma_q, tma_k, tma_v, tma_o;
  FwdParams fwd;
  int* tile_counter;
  int m_blocks;
  int tiles;
  int section;
  int o_by_tma;
};
static_assert(sizeof(FwdSm90Params) ==
                  (4 * 128 + sizeof(FwdParams) + sizeof(int*) + 4 * sizeof(int) + 63) / 64 * 64,
              "SM90_PARAMS (cuflash/ops/forward.py) assumes fwd at byte 512, no other padding");

// HEAD_DIM is that of Q and K (S = Q K^T), HEAD_DIM_V that of V and O (O = P V).
template <int HEAD_DIM, int BLOCK_N, int CONSUMERS, int HEAD_DIM_V = HEAD_DIM>
struct FwdSm90Traits {
  static constexpr int BLOCK_M = 64 * CONSUMERS;  // 64 rows per consumer warpgroup
  static constexpr int NUM_THREADS = 128 * (CONSUMERS + 1);
  // Tiles are 64-element (128-byte) column blocks, one after the other.
  static constexpr int QK_BLOCKS = HEAD_DIM / 64, V_BLOCKS = HEAD_DIM_V / 64;
  static constexpr int Q_BLOCK_BYTES = BLOCK_M * 128;   // one column block of the Q tile
  static constexpr int KV_BLOCK_BYTES = BLOCK_N * 128;  // one column block of a K/V tile
  static constexpr int Q_BYTES = QK_BLOCKS * Q_BLOCK_BYTES;
  static constexpr int K_BYTES = QK_BLOCKS * KV_BLOCK_BYTES;
  static constexpr int V_BYTES = V_BLOCKS * KV_BLOCK_BYTES;
  // + 1 KiB so that the tiles can start on a 1024-byte boundary (the swizzle pattern's
  // period), whatever the alignment of the dynamic shared-memory window.
  static constexpr int LIMIT = 227 * 1024 - 1024;
  // A K stage is released once every consumer has its S of that block; at two stages its
  // refill (the block after next) is issued about 2.5 turns (one consumer's S and P V on
  // the tensor cores) before the first consumer's S waits for it, ~1.4 us at hd128, which
  // a first touch of that block in HBM can exceed (the measured K wait: forward.md v22). A
  // third K stage where it fits beside two Q tiles (head dims up to 128 at Bc 128; hd128's
  // Bc 160 has two, v38); V keeps two.
  static constexpr int V_STAGES = 2;
  static constexpr int K_STAGES =
      2 * Q_BYTES + 3 * K_BYTES + V_STAGES * V_BYTES <= LIMIT ? 3 : 2;
  static constexpr int KV_BYTES = K_STAGES * K_BYTES + V_STAGES * V_BYTES;
  // Two Q buffers where they fit (head dims up to 128): the next tile's Q loads while the
  // consumers finish this one.
  static constexpr int Q_STAGES = 2 * Q_BYTES + KV_BYTES <= LIMIT ? 2 : 1;
  // O leaves through shared memory where the registers allow (two consumers: at 160
  // registers the staging spills), in the TMA box layout (128-byte swizzled rows of 64
  // columns), then by one TMA store per column block (o_by_tma) or 16-byte stores of whole
  // row segments. Where Q has two buffers, in each consumer's 64 rows of its Q tile, free
  // after its last S, the buffer released (empty_q) once O has left it. Where Q has one
  // (head dims over 128), in V stage `consumer` (FA3's place; 64 rows fit a stage of Bc >=
  // 64) once both consumers' last P V is done, the producer's V loads of the next tile
  // waiting (o_read) until O has left it. Otherwise O is stored from the accumulators.
  static constexpr bool O_IN_Q = CONSUMERS == 2 && Q_STAGES == 2 && HEAD_DIM_V <= HEAD_DIM;
  // (Not yet where V's head dim differs from Q's, which no API passes: at 192 / 128 the
  // producer, at 24 registers, spills a value of the mask with the wait for o_read.)
  static constexpr bool O_IN_V = CONSUMERS == 2 && Q_STAGES == 1 && BLOCK_N >= 64 &&
                                 V_STAGES >= CONSUMERS && HEAD_DIM_V == HEAD_DIM;
  static constexpr bool STAGED_O = O_IN_Q || O_IN_V;
  // Bytes between column blocks of a consumer's staged O.
  static constexpr int O_BLOCK_BYTES = O_IN_Q ? Q_BLOCK_BYTES : 64 * 128;
  static constexpr int RING_BYTES = Q_STAGES * Q_BYTES + KV_BYTES;
  static constexpr int SMEM_BYTES = RING_BYTES + 1024;
  // Registers after setmaxnreg, within the register file that __launch_bounds__(
  // NUM_THREADS, 1) hands out evenly at launch (168 a thread for 2 consumers, 128 for 3).
  static constexpr int PRODUCER_REGS = CONSUMERS == 2 ? 24 : 32;
  static constexpr int CONSUMER_REGS = CONSUMERS == 2 ? 240 : 160;
  static_assert(128 * (PRODUCER_REGS + CONSUMERS * CONSUMER_REGS) <= 65536, "registers");
  static_assert(CONSUMERS == 2 || CONSUMERS == 3, "register split");
  // Ping-pong between the consumers' GEMMs where the softmax is a large share of an
  // iteration (FA3 does the same at head dims up to 128).
  static constexpr bool PINGPONG = HEAD_DIM <= 128 && HEAD_DIM_V <= 128;
  static_assert(HEAD_DIM % 64 == 0 && HEAD_DIM_V % 64 == 0, "whole 128-byte swizzle rows");
  static_assert(BLOCK_N % 16 == 0 && BLOCK_N <= 256, "wgmma N and TMA box limits");
  // With the kernel's static block (barriers, tile slots), which the 1024-byte alignment of
  // the dynamic window pads to 1 KiB.
  static_assert(SMEM_BYTES + 1024 <= 227 * 1024, "shared memory");
  static_assert(!STAGED_O || CONSUMERS < 4, "named barrier 4 + consumer follows the turns' 1..");
  static_assert(!O_IN_V || CONSUMERS == 2, "named barrier 6 (both consumers) follows 4 + c");
};

// One work tile: query block m_block of head h of batch item b, and the key blocks
// [n_block_min, n_block_max) some row of it sees (seq: the item's rows and lengths).
// Tiles are numbered in sections of `section` (head, item) pairs, heads fastest, chosen so
// that the K and V of a section fit in L2 together (ops/forward.py); within a section the
// query blocks go last-first across all its pairs, so under a causal mask every pair's
// heaviest tiles start first and the launch ends on light ones. With sections of one pair
// this is the order of a non-persistent grid (query blocks fastest, last-first). In a
// cluster, tile t is a block of `cluster` query blocks, of which CTA `rank` takes one.
struct FwdTile {
  int m_block, h, b, n_block_min, n_block_max;
  static constexpr int INTS = 5;  // what write() stores
  __device__ __forceinline__ FwdTile(int t, int num_m_blocks, int nheads, int section,
                                     int pairs, int cluster = 1, int rank = 0) {
    const int first = t / (num_m_blocks * section) * section;  // the section's first pair
    const int size = min(section, pairs - first);               // its pairs
    const int r = t - first * num_m_blocks;
    m_block = (num_m_blocks - 1 - r / size) * cluster + rank;
    const int hb = first + r % size;
    h = hb % nheads;
    b = hb / nheads;
  }
  template <bool VARLEN>
  __device__ __forceinline__ void set_keys(int Br, int Bc, const SeqView<VARLEN>& seq,
                                           const Mask& mask) {
    const int m0 = m_block * Br;
    int key_begin, key_end;
    mask.key_range(m0, min(m0 + Br, seq.seqlen_q()), key_begin, key_end);
    n_block_min = key_begin / Bc;
    n_block_max = key_end > key_begin ? (key_end + Bc - 1) / Bc : n_block_min;
  }
  __device__ __forceinline__ int n_blocks() const { return n_block_max - n_block_min; }
  // The producer decodes a tile (integer divisions, set_keys) and hands it over in shared
  // memory, so that the consumers' tile starts wait for a few loads, not for that chain.
  __device__ __forceinline__ void write(int* s) const {
    s[0] = m_block;
    s[1] = h;
    s[2] = b;
    s[3] = n_block_min;
    s[4] = n_block_max;
  }
  __device__ __forceinline__ explicit FwdTile(const volatile int* s)
      : m_block(s[0]), h(s[1]), b(s[2]), n_block_min(s[3]), n_block_max(s[4]) {}
};

// The tile scheduler's counters (next tile, claimers done) back to zero for the next launch,
// by the last of `claimers` threads to call this, each after fetching its last index.
__device__ __forceinline__ void release_counters(int* counter, int claimers) {
  __threadfence();
  if (atomicAdd(counter + 1, 1) == claimers - 1) {
    atomicExch(counter, 0);
    atomicExch(counter + 1, 0);
  }
}

// Persistent: gridDim.x CTAs (one per SM) each run tiles until none is left. The producer
// thread picks the next tile (an atomic counter: tiles go to whichever CTA is free first,
// as a non-persistent grid's CTAs would, which balances causal work; in a cluster from its
// scheduler thread, see CLUSTER below) and hands its index to the consumers in shared
// memory with the Q tile, through the full_q / empty_q barrier pair (an index past the
// last tile says stop), Q_STAGES of them in a ring. While the consumers finish a tile
// (last P V, epilogue), the producer already loads the next tile's Q (into the other
// buffer, or, with one, once the consumers released it after their last S = Q K^T; with O
// staged there, once O left it) and its first K stages, and its first V stages unless O is
// staged in them (o_read): the rings and their barrier phases run on across tiles.
//
// CLUSTER > 1 (flash_fwd_sm90_cluster): the CTAs of a cluster run adjacent query blocks of
// one (head, item) pair and share its K and V: rank r loads column blocks r, r + CLUSTER,
// .. of every K and V tile by TMA multicast into the same place of every CTA's ring, so
// that L2 serves each tile once per cluster (FA3's clusters of two). A stage is refilled
// once the consumers of every CTA released it: empty barriers count the consumer warps of
// the cluster, each warp arriving on every CTA's. The CTAs must then load the same key
// blocks in the same order: tiles are pairs of query blocks, claimed for the cluster by
// rank 0 (the schedulers, below), and every CTA loads the blocks some row of the cluster
// sees. The host picks clusters only without a left window (ops/forward.py), so that those
// start at key block 0 for every CTA; a CTA whose rows see fewer (under a causal mask, the
// one with the upper rows sees up to one block more) hands the last ones back unused (`skip`,
// first in the descending order). p.m_blocks counts query blocks of CLUSTER x Br rows; the
// last one's rows past seqlen_q (a whole block where the count of Br blocks is odd) compute
// on zeros and are not stored. With O staged in V's stages (O_IN_V), which the other CTAs'
// copies also fill, o_read counts the consumers of the cluster as the empty barriers do.
template <typename T, int HEAD_DIM, int BLOCK_N, int CONSUMERS, int OPTS, bool VARLEN,
          int HEAD_DIM_V, int CLUSTER>
__device__ __forceinline__ void fwd_sm90(const FwdSm90Params& p) {
  using Tr = FwdSm90Traits<HEAD_DIM, BLOCK_N, CONSUMERS, HEAD_DIM_V>;
  static_assert(CLUSTER == 1 || (!VARLEN && Tr::STAGED_O && Tr::QK_BLOCKS % CLUSTER == 0 &&
                                 Tr::V_BLOCKS % CLUSTER == 0),
                "clusters: dense calls, O staged (o_read counts the cluster's consumers), "
                "whole column blocks a rank");
  constexpr int K_STAGES = Tr::K_STAGES, V_STAGES = Tr::V_STAGES;
  constexpr int Br = Tr::BLOCK_M, Bc = BLOCK_N;
  const AttnArgs& a = p.fwd.attn;

  extern __shared__ __align__(1024) unsigned char smem[];
  constexpr int Q_STAGES = Tr::Q_STAGES;
  // full_k, empty_k per K stage, full_v, empty_v per V stage, full_q, empty_q per Q stage;
  // with O staged in V's stages, o_read (O has left them: the next tile's V may load); in a
  // cluster, the claims' (below): claim_req, and per slot claim_ready, claim_full and
  // claim_empty.
  constexpr int CLAIMS = CLUSTER > 1 ? 2 : 0;  // slots of the claims' rings
  __shared__ __align__(8) uint64_t
      barriers[2 * (K_STAGES + V_STAGES + Q_STAGES) + 1 + (CLAIMS > 0 ? 1 + 3 * CLAIMS : 0)];
  // In a cluster: the claim that rank 0's scheduler wrote here, and the one this CTA's
  // scheduler hands to its producer.
  __shared__ int claim_slot[CLAIMS > 0 ? CLAIMS : 1], tile_claim[CLAIMS > 0 ? CLAIMS : 1];
  // Per Q stage, for its current full_q phase: the tile's index (SLOT_T, past the last:
  // stop), the tile (FwdTile::write, from SLOT_TILE) and, varlen, its item's q0, k0, len_q,
  // len_k (from SLOT_ITEM).
  constexpr int SLOT_T = 0, SLOT_TILE = 1, SLOT_ITEM = SLOT_TILE + FwdTile::INTS;
  constexpr int SLOT_SKIP = SLOT_TILE + FwdTile::INTS;  // clusters (never varlen)
  __shared__ int tile_slot[Q_STAGES][SLOT_ITEM + (VARLEN ? 4 : 0) + (CLUSTER > 1 ? 1 : 0)];
  const uint32_t base = (smem_addr(smem) + 1023u) & ~1023u;
  auto sQ = [&](int s) { return base + s * Tr::Q_BYTES; };
  const uint32_t kv = base + Q_STAGES * Tr::Q_BYTES;
  auto sK = [&](int s) { return kv + s * Tr::K_BYTES; };
  auto sV = [&](int s) { return kv + K_STAGES * Tr::K_BYTES + s * Tr::V_BYTES; };
  auto full_k = [&](int s) { return smem_addr(&barriers[s]); };
  auto empty_k = [&](int s) { return smem_addr(&barriers[K_STAGES + s]); };
  auto full_v = [&](int s) { return smem_addr(&barriers[2 * K_STAGES + s]); };
  auto empty_v = [&](int s) { return smem_addr(&barriers[2 * K_STAGES + V_STAGES + s]); };
  auto full_q = [&](int s) { return smem_addr(&barriers[2 * (K_STAGES + V_STAGES) + s]); };
  auto empty_q = [&](int s) {
    return smem_addr(&barriers[2 * (K_STAGES + V_STAGES) + Q_STAGES + s]);
  };
  const uint32_t o_read = smem_addr(&barriers[2 * (K_STAGES + V_STAGES + Q_STAGES)]);
  constexpr int CLAIM0 = 2 * (K_STAGES + V_STAGES + Q_STAGES) + 1;
  const uint32_t claim_req = smem_addr(&barriers[CLAIM0]);
  auto claim_ready = [&](int j) { return smem_addr(&barriers[CLAIM0 + 1 + j]); };
  auto claim_full = [&](int j) { return smem_addr(&barriers[CLAIM0 + 1 + CLAIMS + j]); };
  auto claim_empty = [&](int j) { return smem_addr(&barriers[CLAIM0 + 1 + 2 * CLAIMS + j]); };

  // The warpgroup through a shuffle of lane 0: ptxas then keeps what derives from it (a
  // consumer's Q descriptors) in uniform registers instead of moving it there per wgmma.
  const int tid = threadIdx.x, warpgroup = __shfl_sync(0xffffffffu, tid / 128, 0);
  const Mask dense_mask(a);  // varlen: a mask per tile, with its item's lengths
  const int num_m_blocks = p.m_blocks;
  const int pairs = a.nheads * a.batch;  // (head, batch item) pairs
  // Varlen's tile skipping walks one pair's query blocks at a time: sections of one pair.
  const int section = VARLEN ? 1 : p.section;
  const int num_tiles = p.tiles;  // read from the parameter bank, not kept in a register
  const int group = a.nheads / a.nheads_kv;

  if (tid == 0) {
    // Every empty barrier counts one arrival per consumer warp (K and V's: of the cluster).
#pragma unroll
    for (int s = 0; s < K_STAGES; ++s) {
      sm90::mbar_init(full_k(s), 1);
      sm90::mbar_init(empty_k(s), 4 * CONSUMERS * CLUSTER);
    }
#pragma unroll
    for (int s = 0; s < V_STAGES; ++s) {
      sm90::mbar_init(full_v(s), 1);
      sm90::mbar_init(empty_v(s), 4 * CONSUMERS * CLUSTER);
    }
    for (int s = 0; s < Q_STAGES; ++s) {
      sm90::mbar_init(full_q(s), 1);
      sm90::mbar_init(empty_q(s), 4 * CONSUMERS);
    }
    if (Tr::O_IN_V) sm90::mbar_init(o_read, 4 * CONSUMERS * CLUSTER);
    if (CLAIMS > 0) sm90::mbar_init(claim_req, 1);
    for (int j = 0; j < CLAIMS; ++j) {
      sm90::mbar_init(claim_ready(j), 1);
      sm90::mbar_init(claim_full(j), 1);
      sm90::mbar_init(claim_empty(j), CLUSTER - 1);
    }
    sm90::fence_barrier_init();
  }
  // The other CTAs' copies and arrivals reach this CTA's barriers only once they exist.
  if constexpr (CLUSTER > 1)
    sm90::cluster_sync();
  else
    __syncthreads();
  const uint32_t rank = CLUSTER > 1 ? sm90::cluster_ctarank() : 0;

  if (warpgroup == 0) {
    sm90::setmaxnreg_dec<Tr::PRODUCER_REGS>();
    // Tile t's Q into L2. With one Q buffer a tile's Q loads only once the consumers ran
    // their last S on the tile before: fetched about a key block earlier, that load reads L2
    // rather than HBM. By the producer, or in a cluster by the scheduler as it claims t.
    auto prefetch_q = [&](int t) {
      const FwdTile next(t, num_m_blocks, a.nheads, section, pairs, CLUSTER, rank);
#pragma unroll
      for (int cb = 0; cb < Tr::QK_BLOCKS; ++cb)
        sm90::tma_prefetch_4d(&p.tma_q, cb * 64, next.m_block * Br, next.h, next.b);
    };
    if (tid == 0) {
      int g = 0;        // K/V tiles loaded so far (position in the ring)
      int q_loads = 0;  // tiles handed to the consumers so far
      uint32_t o_phase = 0;  // O_IN_V: the phase of o_read that the next wait is for
      int* counter = p.tile_counter;
      // The next tile's index is fetched once this tile's last K load is queued (the
      // consumers are then a few key blocks from its end): the atomic's latency passes
      // under those blocks rather than between two tiles, and a CTA still claims its next
      // tile only near the end of this one, as dynamic scheduling needs. In a cluster the
      // scheduler thread fetches it (asked by claim_req) and hands it over in tile_claim.
      int t = 0, t_next = 0;
      auto fetch_next = [&] {
        if constexpr (CLUSTER > 1)
          sm90::mbar_arrive(claim_req);
        else
          t_next = counter ? atomicAdd(counter, 1) : t + gridDim.x;
      };
      if constexpr (CLUSTER == 1) t_next = counter ? atomicAdd(counter, 1) : blockIdx.x;
      for (;;) {
        if constexpr (CLUSTER > 1) {  // claim q_loads
          sm90::mbar_wait(claim_ready(q_loads % CLAIMS), (q_loads / CLAIMS) & 1);
          t_next = *static_cast<volatile int*>(&tile_claim[q_loads % CLAIMS]);
        }
        t = t_next;
        SeqView<true> item(0, 0, 0, 0);  // varlen: the tile's item, read before the wait
        if constexpr (VARLEN) {
          // Skip the tiles past the end of their item (no rows to compute or store): the
          // consumers never see them. A run of such tiles (this m_block down to the item's
          // last query block; consecutive, as varlen sections have one pair) goes at once:
          // atomicMax moves the counter past the run unless other CTAs already took the
          // counter further.
          for (; t < num_tiles;) {
            const FwdTile tile(t, num_m_blocks, a.nheads, section, pairs);
            item = SeqView<true>(a, tile.b);
            if (tile.m_block * Br < item.seqlen_q()) break;
            if (counter) {
              atomicMax(counter, t + tile.m_block - (item.seqlen_q() + Br - 1) / Br + 1);
              t = atomicAdd(counter, 1);
            } else {
              t += gridDim.x;
            }
          }
        }
        // The consumers read the index Q_STAGES tiles ago, ran their last S on its Q and,
        // with O staged there, stored O from it.
        const int qs = q_loads % Q_STAGES;
        if (q_loads >= Q_STAGES) sm90::mbar_wait(empty_q(qs), (q_loads / Q_STAGES - 1) & 1);
        ++q_loads;
        int* const slot = tile_slot[qs];
        slot[SLOT_T] = t;
        if (t >= num_tiles) {
          sm90::mbar_arrive(full_q(qs));  // stop
          break;
        }
        FwdTile tile(t, num_m_blocks, a.nheads, section, pairs, CLUSTER, rank);
        const SeqView<VARLEN> seq = [&] {
          if constexpr (VARLEN)
            return item;
          else
            return SeqView<false>(a, tile.b);
        }();
        if constexpr (VARLEN) {
          slot[SLOT_ITEM] = seq.q0;
          slot[SLOT_ITEM + 1] = seq.k0;
          slot[SLOT_ITEM + 2] = seq.len_q;
          slot[SLOT_ITEM + 3] = seq.len_k;
        }
        const Mask mask = VARLEN ? Mask(a, seq) : dense_mask;
        tile.set_keys(Br, Bc, seq, mask);
        tile.write(slot + SLOT_TILE);
        // In a cluster every CTA loads the key blocks that some row of the cluster's sees:
        // with no left window all start at block 0, and this CTA's rows see all but the
        // `skip` last (a causal diagonal further down), which its consumers pass over.
        int skip = 0;
        if constexpr (CLUSTER > 1) {
          const int m0 = (tile.m_block - rank) * Br;
          int key_begin, key_end;
          mask.key_range(m0, min(m0 + CLUSTER * Br, seq.seqlen_q()), key_begin, key_end);
          skip = max(tile.n_block_max, (key_end + Bc - 1) / Bc) - tile.n_block_max;
          slot[SLOT_SKIP] = skip;
        }
        // Ring positions g .. g + n_blocks - 1 hold key blocks n_block_max + skip - 1 down
        // to n_block_min, K and V each in their own ring. K of block i + 1 goes before V of
        // block i: the consumers issue S of the next block before P V of this one.
        const int n_blocks = tile.n_blocks() + skip;
        if (n_blocks <= 0) {  // the consumers write zeros; nothing to load
          sm90::mbar_arrive(full_q(qs));
          fetch_next();
          continue;
        }
        if (CLUSTER == 1 || tile.n_blocks() > 0) {
          sm90::mbar_arrive_expect_tx(full_q(qs), Tr::Q_BYTES);
#pragma unroll
          for (int cb = 0; cb < Tr::QK_BLOCKS; ++cb)
            sm90::tma_load_4d(sQ(qs) + cb * Tr::Q_BLOCK_BYTES, &p.tma_q, full_q(qs), cb * 64,
                              seq.q0 + tile.m_block * Br, tile.h, seq.b);
        } else {
          sm90::mbar_arrive(full_q(qs));  // no row of this CTA's sees a key: no Q
        }
        const int h_kv = tile.h / group;
        auto load = [&](bool value, int i) {
          const int pos = g + i, stages = value ? V_STAGES : K_STAGES, s = pos % stages;
          // Stage s was last filled `stages` blocks ago: wait until every consumer warp (of
          // the cluster) released it.
          if (pos >= stages)
            sm90::mbar_wait(value ? empty_v(s) : empty_k(s), (pos / stages - 1) & 1);
          const uint32_t full = value ? full_v(s) : full_k(s), dst = value ? sV(s) : sK(s);
          const sm90::TmaMap* map = value ? &p.tma_v : &p.tma_k;
          const int n0 = seq.k0 + (tile.n_block_max + skip - 1 - i) * Bc;
          sm90::mbar_arrive_expect_tx(full, value ? Tr::V_BYTES : Tr::K_BYTES);
          for (int j = 0; j < (value ? Tr::V_BLOCKS : Tr::QK_BLOCKS) / CLUSTER; ++j) {
            const int cb = j * CLUSTER + rank;
            if constexpr (CLUSTER > 1)
              sm90::tma_load_4d_multicast(dst + cb * Tr::KV_BLOCK_BYTES, map, full,
                                          (1u << CLUSTER) - 1, cb * 64, n0, h_kv, seq.b);
            else
              sm90::tma_load_4d(dst + cb * Tr::KV_BLOCK_BYTES, map, full, cb * 64, n0, h_kv,
                                seq.b);
          }
        };
        load(false, 0);
        if (n_blocks == 1) fetch_next();
        for (int i = 0; i < n_blocks; ++i) {
          if (i + 1 < n_blocks) {
            load(false, i + 1);
            if (i + 2 == n_blocks) fetch_next();
          }
          // O staged in V's stages: the previous tile with key blocks (g > 0) stored its O
          // from there, which must have left before this tile's V arrives (in a cluster,
          // every CTA's: a CTA with no key block of its own arrives all the same).
          if (Tr::O_IN_V && i == 0 && g > 0) {
            sm90::mbar_wait(o_read, o_phase);
            o_phase ^= 1;
          }
          load(true, i);
        }
        g += n_blocks;
        // The next tile's Q into L2 (varlen tiles past an item's end are skipped at the top).
        if constexpr (Q_STAGES == 1 && !VARLEN && CLUSTER == 1)
          if (t_next < num_tiles) prefetch_q(t_next);
      }
      // Keep this thread until its last copies were consumed (in a cluster, also the
      // other CTAs' last arrivals on this CTA's barriers, and this CTA's copies into theirs).
      for (int j = max(g, K_STAGES); j < g + K_STAGES; ++j)
        sm90::mbar_wait(empty_k(j % K_STAGES), (j / K_STAGES - 1) & 1);
      for (int j = max(g, V_STAGES); j < g + V_STAGES; ++j)
        sm90::mbar_wait(empty_v(j % V_STAGES), (j / V_STAGES - 1) & 1);
      // And, in a cluster, until every CTA's last O left (their last arrivals on o_read):
      // a remote arrival on a CTA that has exited faults.
      if constexpr (Tr::O_IN_V && CLUSTER > 1)
        if (g > 0) sm90::mbar_wait(o_read, o_phase);
      if (CLUSTER == 1 && counter) release_counters(counter, gridDim.x);
    }
    // A cluster's claims: the scheduler thread of rank 0 takes claim c (its producer asks
    // for claim c > 0 near the end of tile c - 1) from the counter and writes it into every
    // other CTA's claim_slot (a ring of CLAIMS, claim_full / claim_empty); theirs read it.
    // Each hands it to its producer through tile_claim (claim_ready), claimed only once
    // asked, so that the producer has read the claim before in that slot. The last (stop)
    // claim ends them; rank 0's scheduler stays until the others read it, then counts its
    // CTA done as the producer does without clusters.
    if (CLUSTER > 1 && tid == 32) {
      int* const counter = p.tile_counter;
      for (int c = 0;; ++c) {
        const int j = c % CLAIMS, phase = (c / CLAIMS) & 1;
        if (c > 0) sm90::mbar_wait(claim_req, (c - 1) & 1);
        int t;
        if (rank == 0) {
          t = atomicAdd(counter, 1);
          if (c >= CLAIMS) sm90::mbar_wait(claim_empty(j), phase ^ 1);
          for (int r = 1; r < CLUSTER; ++r)
            sm90::st_cluster_arrive(smem_addr(&claim_slot[j]), claim_full(j), r, t);
        } else {
          sm90::mbar_wait<true>(claim_full(j), phase);
          t = *static_cast<volatile int*>(&claim_slot[j]);
        }
        *static_cast<volatile int*>(&tile_claim[j]) = t;
        // (after the store, which needs the slot's value read: rank 0 may then rewrite it)
        if (rank != 0) sm90::mbar_arrive_cluster(claim_empty(j), 0);
        sm90::mbar_arrive(claim_ready(j));
        if constexpr (Q_STAGES == 1)
          if (c > 0 && t < num_tiles) prefetch_q(t);
        if (t >= num_tiles) {
          if (rank == 0) sm90::mbar_wait(claim_empty(j), phase);
          break;
        }
      }
      if (rank == 0) release_counters(counter, gridDim.x / CLUSTER);
    }
  } else {
    sm90::setmaxnreg_inc<Tr::CONSUMER_REGS>();
    constexpr int N_TILES = Bc / 8, D_TILES = HEAD_DIM_V / 8;
    const int consumer = warpgroup - 1;
    const int warp = (tid / 32) % 4, lane = tid % 32;
    int g = 0;
    // Ping-pong: the consumers issue their GEMMs in turn (0, 1, .., 0, ..), so that one's
    // softmax runs while the tensor cores serve the others. Named barrier 1 + c is consumer
    // c's turn: its 128 threads wait there until the 128 of the consumer before it arrive,
    // having issued theirs. Consumer 0 has the first turn.
    auto take_turn = [&] {
      if constexpr (Tr::PINGPONG) sm90::named_barrier(1 + consumer, 256);
    };
    auto pass_turn = [&] {
      if constexpr (Tr::PINGPONG) sm90::named_barrier_arrive(1 + (consumer + 1) % CONSUMERS, 256);
    };
    if (consumer == CONSUMERS - 1) pass_turn();
    // O staged (STAGED_O) and stored by TMA: its buffer goes back to the producer once the
    // store has read it, the issuing thread waiting for that in the next tile, not after the
    // store: Q's (empty_q, for the Q of the tile after next) after the first softmax (its S
    // released first); V's stages (o_read, for the tile's V) once the first S is issued.
    const bool issuer = tid % 128 == 0;
    // A K or V stage (or V's, with O staged there: o_read) handed back: one arrival per
    // warp on every CTA's barrier of the cluster.
    auto release_kv = [&](uint32_t bar) {
      if constexpr (CLUSTER > 1)
        sm90::mbar_arrive_cluster(bar, lane % CLUSTER, lane < CLUSTER);
      else
        sm90::mbar_arrive_if(bar, lane == 0);
    };
    int o_pending = -1;  // the Q buffer of such a store, not yet released
    auto release_o_buffer = [&] {
      if (o_pending >= 0 && issuer) {
        sm90::bulk_wait<0, true>();
        // for the consumer's 4 warps (O_IN_V: on every CTA's o_read of the cluster)
        if constexpr (Tr::O_IN_V && CLUSTER > 1)
#pragma unroll
          for (int r = 0; r < CLUSTER; ++r) sm90::mbar_arrive_cluster<4>(o_read, r);
        else
          sm90::mbar_arrive_count(Tr::O_IN_V ? o_read : empty_q(o_pending), 4);
      }
      o_pending = -1;
    };

    for (int q_loads = 0;; ++q_loads) {
      const int qs = q_loads % Q_STAGES;
      sm90::mbar_wait(full_q(qs), (q_loads / Q_STAGES) & 1);
      // The producer's tile and view of the item, read before this warp releases Q
      // (empty_q), after which the producer may overwrite the slot with the next tile's.
      const volatile int* slot = tile_slot[qs];
      if (slot[SLOT_T] >= num_tiles) break;
      const FwdTile tile(slot + SLOT_TILE);
      const SeqView<VARLEN> seq = [&] {
        if constexpr (VARLEN)
          return SeqView<true>(slot[SLOT_ITEM], slot[SLOT_ITEM + 1], slot[SLOT_ITEM + 2],
                               slot[SLOT_ITEM + 3]);
        else
          return SeqView<false>(a, tile.b);
      }();
      const Mask mask = VARLEN ? Mask(a, seq) : dense_mask;
      const int n_blocks = tile.n_blocks();
      const int skip = CLUSTER > 1 ? slot[SLOT_SKIP] : 0;
      // No key block: the index is read and Q not used, release at once (with O staged
      // there, once O has left it).
      __syncwarp();
      sm90::mbar_arrive_if(empty_q(qs), lane == 0 && n_blocks <= 0 && !Tr::O_IN_Q);
      const uint32_t sQ_wg = sQ(qs) + consumer * 64 * 128;  // its 64 rows of each column block
      const int wg_row0 = tile.m_block * Br + consumer * 64;  // this warpgroup's first row
      const int frag_row0 = wg_row0 + warp * 16 + lane / 4;    // this thread's first row

      float acc_o[1][D_TILES][4];
#pragma unroll
      for (int dt = 0; dt < D_TILES; ++dt)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc_o[0][dt][e] = 0.f;
      OnlineSoftmax<1> softmax;
      const ScoreMod mod(a, tile.b, tile.h, seq);
      // The cluster's key blocks that no row of this CTA's sees come first: handed back
      // as they arrive. The last O's V stages go back before (its release would otherwise
      // wait under a later S, and the producers wait for it before this tile's first V).
      if constexpr (CLUSTER > 1) {
        if (skip > 0) {
          if constexpr (Tr::O_IN_V) release_o_buffer();
          for (int j = 0; j < skip; ++j) {
            sm90::mbar_wait(full_k((g + j) % K_STAGES), ((g + j) / K_STAGES) & 1);
            release_kv(empty_k((g + j) % K_STAGES));
            sm90::mbar_wait(full_v((g + j) % V_STAGES), ((g + j) / V_STAGES) & 1);
            release_kv(empty_v((g + j) % V_STAGES));
          }
          g += skip;
        }
      }

      // Key block it is ring position g + it. S of block it is issued before P V of block
      // it - 1 (intra-warpgroup overlap: the tensor cores run P V while this warpgroup
      // computes the softmax of S, exp2 included). O is rescaled before the P V that adds
      // the block whose max rescales it: with ping-pong, once the previous P V is done,
      // outside the turn; without (head dims over 128), just before that P V, under the S
      // GEMM just issued (measured +3-4% at hd256 16k, docs/notes/forward.md v8).
      constexpr bool RESCALE_BEFORE_PV = !Tr::PINGPONG;
      // A row's max moves only when a block passes it by more than RESCALE_SLACK (base 2,
      // FlashAttention-4's conditional rescaling; OnlineSoftmax::max_step): past a row's
      // first blocks O is rarely rescaled, and a warp skips the multiplies where none of
      // its rows moved (`grew`), as on the first block, whose O is still zero.
      constexpr int RESCALE_SLACK = 8;
      float alpha[1][2];
      bool grew = false;
      uint32_t pf[Bc / 16][4];  // P of the last block whose softmax is done, 16 bits
      auto issue_pv = [&](int it) {  // O = O * alpha + P V of block it
        const int pos = g + it, s = pos % V_STAGES;
        if constexpr (RESCALE_BEFORE_PV) softmax.rescale_if(acc_o, alpha, grew);
        sm90::mbar_wait(full_v(s), (pos / V_STAGES) & 1);
        sm90::fence_regs<HEAD_DIM_V / 2>(&acc_o[0][0][0]);
        sm90::wgmma_fence();
        const uint64_t dv = sm90::make_desc(sV(s), Tr::KV_BLOCK_BYTES);
#pragma unroll
        for (int kk = 0; kk < Bc / 16; ++kk)  // 16 keys: 2048 bytes of every column block
          sm90::Wgmma<T, HEAD_DIM_V>::rs(&acc_o[0][0][0], pf[kk], sm90::desc_at(dv, kk * 2048), 1);
        sm90::wgmma_commit();
      };
      auto retire_pv = [&](int it) {  // wait for P V of block it and release its V
        sm90::wgmma_wait<0>();
        sm90::fence_regs<HEAD_DIM_V / 2>(&acc_o[0][0][0]);
        sm90::fence_regs_u32<Bc / 4>(&pf[0][0]);  // P was read asynchronously until here
        __syncwarp();
        release_kv(empty_v((g + it) % V_STAGES));
      };
      // S = Q K^T of block it: HEAD_DIM / 16 k-steps, the first overwriting the accumulators.
      float sc[1][N_TILES][4];
      auto issue_s = [&](int it) {
        const int pos = g + it, s = pos % K_STAGES;
        sm90::mbar_wait(full_k(s), (pos / K_STAGES) & 1);
        sm90::wgmma_fence();
        const uint64_t dq = sm90::make_desc(sQ_wg, 16), dk = sm90::make_desc(sK(s), 16);
#pragma unroll
        for (int ks = 0; ks < HEAD_DIM / 16; ++ks) {
          const uint32_t k_off = (ks % 4) * 32;  // k16 step inside a 128-byte row
          sm90::Wgmma<T, Bc>::ss(&sc[0][0][0],
                                 sm90::desc_at(dq, (ks / 4) * Tr::Q_BLOCK_BYTES + k_off),
                                 sm90::desc_at(dk, (ks / 4) * Tr::KV_BLOCK_BYTES + k_off),
                                 ks > 0);
        }
        sm90::wgmma_commit();
      };
      // Once S of block it is done: release its K (and Q after the last block), mask, fold
      // its row maxima into the softmax (alpha), and S becomes P = exp2(...) in float32,
      // under the previous P V.
      static_assert(CONSUMERS == 2 || OPTS == 0, "score options run with two consumers: at "
                    "three (160 registers) their elements do not fit beside the P V in flight");
      const float factor = OPTS != 0 ? 1.f : mod.scale_log2;
      constexpr int TANH = tanh_form<T, OPTS>();
      auto scores = [&](int it) {
        sm90::fence_regs<Bc / 2>(&sc[0][0][0]);
        __syncwarp();
        release_kv(empty_k((g + it) % K_STAGES));
        sm90::mbar_arrive_if(empty_q(qs), lane == 0 && it == n_blocks - 1 && !Tr::O_IN_Q);
        const int n0 = (tile.n_block_max - 1 - it) * Bc, col0 = n0 + 2 * (lane & 3);
        const bool boundary = mask.tile_needs_mask(wg_row0, wg_row0 + 64, n0, n0 + Bc);
        if (boundary)
          score_fragment<OPTS, true, TANH, true>(sc, frag_row0, col0, mod, mask);
        else if constexpr (OPTS != 0)
          score_fragment<OPTS, false, TANH>(sc, frag_row0, col0, mod, mask);
        grew = softmax.max_step<RESCALE_SLACK>(sc, factor, alpha) && it > 0;
        softmax.exp_step(sc, factor, alpha);
      };
      // Once the previous P V is done: P in 16 bits (k16 slice kk of S's C-fragments is the
      // A fragment of step kk), and with ping-pong O times alpha.
      auto make_p = [&] {
#pragma unroll
        for (int kk = 0; kk < Bc / 16; ++kk) {
          pf[kk][0] = dtype_traits<T>::pack(sc[0][2 * kk][0], sc[0][2 * kk][1]);
          pf[kk][1] = dtype_traits<T>::pack(sc[0][2 * kk][2], sc[0][2 * kk][3]);
          pf[kk][2] = dtype_traits<T>::pack(sc[0][2 * kk + 1][0], sc[0][2 * kk + 1][1]);
          pf[kk][3] = dtype_traits<T>::pack(sc[0][2 * kk + 1][2], sc[0][2 * kk + 1][3]);
        }
        if constexpr (!RESCALE_BEFORE_PV) softmax.rescale_if(acc_o, alpha, grew);
      };

      if (n_blocks > 0) {  // the first block: nothing to overlap its softmax with yet
        take_turn();
        issue_s(0);
        pass_turn();
        if constexpr (Tr::O_IN_V) release_o_buffer();
        sm90::wgmma_wait<0>();
        scores(0);
        if constexpr (Tr::O_IN_Q) release_o_buffer();
        make_p();
      }
      for (int it = 1; it < n_blocks; ++it) {
        take_turn();
        issue_s(it);
        issue_pv(it - 1);
        pass_turn();
        sm90::wgmma_wait<1>();  // S is done; P V may still run, under the softmax
        scores(it);
        retire_pv(it - 1);
        make_p();
      }
      if (n_blocks > 0) {
        issue_pv(n_blocks - 1);
        retire_pv(n_blocks - 1);
      }
      g += n_blocks;
      float lse[1][2];
      softmax.finalize(acc_o, lse);
      // lse (batch, nheads, seqlen_q); varlen (nheads, total_q), a.seqlen_q being the total.
      T* o = static_cast<T*>(p.fwd.o) + seq.b * p.fwd.o_batch_stride +
             tile.h * p.fwd.o_head_stride + seq.q0 * p.fwd.o_row_stride;
      float* lse_out =
          p.fwd.lse + (static_cast<int64>(seq.b) * a.nheads + tile.h) * a.seqlen_q + seq.q0;
      const int col = 2 * (lane & 3);
      // V's head dim is Q's (a.headdim) in the API. O_IN_V: a tile without key blocks
      // stores its zeros from the registers (its V loads, none, are not held back).
      release_o_buffer();  // a tile without key blocks had no S to wait under
      const bool staged = Tr::O_IN_Q || (Tr::O_IN_V && n_blocks > 0);
      // A cluster's o_read phase counts every CTA's consumers, keyless ones too (after
      // the skipped blocks: their V loads followed the producers' wait for the last phase).
      if constexpr (Tr::O_IN_V && CLUSTER > 1)
        if (n_blocks <= 0 && skip > 0) release_kv(o_read);
      if (staged) {
        // Row 16 warp + lane / 4 + 8 r of the consumer's tile: column block dt / 8, 16-byte
        // chunk (dt % 8) ^ (row % 8), 4 bytes at 4 (lane % 4); a warp's 8 rows then hit 32
        // distinct banks. The tile is 1024-byte aligned, so the swizzle is an XOR on the
        // address of chunk 0 (rows r = 1 are 1024 bytes on), which the empty asm keeps from
        // being computed once for all tiles and held (spilled) across the persistent loop.
        // Before the writes: with O in Q, every warp of this consumer is done with its S
        // GEMMs, which read these rows (named barrier 4 + consumer); with O in V, both
        // consumers are done with their P V, which read V's stages (named barrier 6).
        // After them (4 + consumer), the tile is whole. Column block cb of the consumer's
        // rows: sO + cb * O_BLOCK_BYTES.
        const uint32_t sO = Tr::O_IN_Q ? sQ_wg : sV(consumer);
        const int row0 = warp * 16 + lane / 4;
        uint32_t chunk0 = sO + row0 * 128 + ((row0 % 8) << 4) + 4 * (lane & 3);
        asm volatile("" : "+r"(chunk0));
        const bool by_tma = !VARLEN && p.o_by_tma;
        if constexpr (Tr::O_IN_Q)
          sm90::named_barrier(4 + consumer, 128);
        else
          sm90::named_barrier(6, 256);
#pragma unroll
        for (int r = 0; r < 2; ++r)
#pragma unroll
          for (int dt = 0; dt < D_TILES; ++dt)
            sm90::sts_u32((chunk0 ^ ((dt % 8) << 4)) + (dt / 8) * Tr::O_BLOCK_BYTES + r * 1024,
                          dtype_traits<T>::pack(acc_o[0][dt][2 * r], acc_o[0][dt][2 * r + 1]));
        if (by_tma) sm90::fence_proxy_async();  // the writes, before the TMA engine reads
        sm90::named_barrier(4 + consumer, 128);
        if (by_tma) {  // rows past seqlen_q and columns past the head dim are not written
          if (issuer) {
#pragma unroll
            for (int cb = 0; cb < Tr::V_BLOCKS; ++cb)
              sm90::tma_store_4d(&p.tma_o, sO + cb * Tr::O_BLOCK_BYTES, cb * 64, wg_row0,
                                 tile.h, seq.b);
            sm90::bulk_commit();
          }
          o_pending = qs;
        } else {
          sm90::store_staged_rows<T, HEAD_DIM_V>(sO, Tr::O_BLOCK_BYTES, tid % 128,
                                                 o + wg_row0 * p.fwd.o_row_stride,
                                                 p.fwd.o_row_stride, seq.seqlen_q() - wg_row0,
                                                 a.headdim);
          // This warp's reads and writes of the buffer are done, before the TMA load of a
          // later Q or V writes it.
          sm90::fence_proxy_async();
          __syncwarp();
          if constexpr (Tr::O_IN_V)
            release_kv(o_read);
          else
            sm90::mbar_arrive_if(empty_q(qs), lane == 0);
        }
      }
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int i = frag_row0 + r * 8;
        if (i >= seq.seqlen_q()) continue;
        if (!staged) {
          T* o_row = o + i * p.fwd.o_row_stride;
#pragma unroll
          for (int dt = 0; dt < D_TILES; ++dt)
            if (dt * 8 + col < a.headdim)
              *reinterpret_cast<uint32_t*>(o_row + dt * 8 + col) =
                  dtype_traits<T>::pack(acc_o[0][dt][2 * r], acc_o[0][dt][2 * r + 1]);
        }
        if ((lane & 3) == 0) lse_out[i] = lse[0][r];
      }
    }
    // The last tile's TMA stores read shared memory until here; in a cluster with O in V's
    // stages they then complete o_read's last phase, which the producers' tails wait for.
    release_o_buffer();
  }
}

template <typename T, int HEAD_DIM, int BLOCK_N, int CONSUMERS, int OPTS,
          bool VARLEN = false, int HEAD_DIM_V = HEAD_DIM>
__global__ void __launch_bounds__(128 * (CONSUMERS + 1), 1)
flash_fwd_sm90(const __grid_constant__ FwdSm90Params p) {
  fwd_sm90<T, HEAD_DIM, BLOCK_N, CONSUMERS, OPTS, VARLEN, HEAD_DIM_V, 1>(p);
}

// Clusters of two CTAs (gridDim.x even) sharing K and V (fwd_sm90's CLUSTER).
template <typename T, int HEAD_DIM, int BLOCK_N, int CONSUMERS, int OPTS>
__global__ void __cluster_dims__(2, 1, 1) __launch_bounds__(128 * (CONSUMERS + 1), 1)
flash_fwd_sm90_cluster(const __grid_constant__ FwdSm90Params p) {
  fwd_sm90<T, HEAD_DIM, BLOCK_N, CONSUMERS, OPTS, false, HEAD_DIM, 2>(p);
}

}  // namespace cuflash
