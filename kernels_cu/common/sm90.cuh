// Hopper (sm_90a) primitives: TMA tensor copies, mbarriers, wgmma, setmaxnreg.
//
// Shared-memory tiles here are the layout that both the TMA engine (CU_TENSOR_MAP_SWIZZLE_
// 128B) and wgmma (swizzle mode "128B") understand: a tile of R rows x 64 16-bit elements
// is R rows of 128 bytes, 1024-byte aligned, where 16-byte chunk c of row r sits at chunk
// c ^ (r % 8). Wider rows (head dim 128) are split into column blocks of 64 elements, one
// after the other (block b holds columns 64 b .. 64 b + 63 of every row).
//
// Matrix descriptors (PTX ISA, "Matrix Descriptor Format"): bits 0-13 start address >> 4,
// 16-29 leading-dimension byte offset (LBO) >> 4, 32-45 stride-dimension byte offset (SBO)
// >> 4, 62-63 swizzle mode (1 = 128B). With 128B swizzle:
// - K-major operand (rows = M or N, 64 elements of K per 128-byte row): SBO = 1024 bytes
//   between groups of 8 rows, LBO unused (1). A k16 step inside a column block moves the
//   start address by 32 bytes (the hardware applies the XOR to the final address, which is
//   why tiles must be 1024-byte aligned); the next column block is a new start address.
// - MN-major operand (rows = K, N contiguous, as V is for O = P V): SBO = 1024 bytes
//   between groups of 8 K-rows, LBO = bytes between column blocks of 64 N-elements; a k16
//   step moves the start address by 16 rows = 2048 bytes. Selected by imm-trans-b = 1.
//
// wgmma accumulators (m64nN, float): the warp of rank w in its warpgroup holds rows
// 16 w .. 16 w + 15, laid out as N / 8 mma.m16n8 C-fragments: d[4 t + e] is row
// lane / 4 + 8 (e / 2), column 8 t + 2 (lane % 4) + e % 2. That is the [N/8][4] layout of
// common/softmax.cuh, so OnlineSoftmax<1> and score_fragment<..., 1, N/8> apply unchanged,
// and its k16 slices packed to 16 bits are the A fragments of a register-A wgmma (the
// mma.m16n8k16 A layout), exactly as the mma.sync kernel reuses S for P. The wgmma
// wrappers themselves, one per N, are generated into common/wgmma.cuh.
#pragma once
#include "common/mma.cuh"
#include "common/wgmma.cuh"

namespace cuflash {
namespace sm90 {

// A CUtensorMap (cuTensorMapEncodeTiled on the host): opaque, 64-byte aligned, passed
// inside a __grid_constant__ kernel parameter so that its generic address is valid.
struct alignas(64) TmaMap {
  uint64_t opaque[16];
};


// --- mbarrier -----------------------------------------------------------------------------
__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
// Makes initialized barriers visible to the async proxy (TMA) and the other threads
// (with the __syncthreads that follows).
__device__ __forceinline__ void fence_barrier_init() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
// One arrival that also announces `bytes` of TMA transactions for the current phase.
__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar),
               "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
// `count` arrivals at once (one thread standing for several).
__device__ __forceinline__ void mbar_arrive_count(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(count)
               : "memory");
}
// mbar_arrive where `pred` holds, predicated rather than branched around: no divergent
// path between a wgmma and its wait (ptxas would serialize the wgmmas).
__device__ __forceinline__ void mbar_arrive_if(uint32_t bar, bool pred) {
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %1, 0;\n"
               "@p mbarrier.arrive.shared::cta.b64 _, [%0];\n}\n" ::"r"(bar),
               "r"(static_cast<int>(pred))
               : "memory");
}
// COUNT arrivals (where `pred` holds: predicated, as mbar_arrive_if) on the barrier at
// `bar`'s offset in CTA `rank` of this CTA's cluster (this CTA's own included). Release at
// CTA scope, as mbar_arrive (and CUTLASS's cluster barriers): the arrival hands back a
// buffer that wgmma read (its wait orders the reads) or that ld.shared read into values
// already consumed, before a TMA copy rewrites it; cluster scope would add a MEMBAR.GPU an
// arrival.
template <int COUNT = 1>
__device__ __forceinline__ void mbar_arrive_cluster(uint32_t bar, uint32_t rank,
                                                    bool pred = true) {
  asm volatile("{\n.reg .pred p;\n.reg .b32 remote;\nsetp.ne.b32 p, %2, 0;\n"
               "mapa.shared::cluster.u32 remote, %0, %1;\n"
               "@p mbarrier.arrive.shared::cluster.b64 _, [remote], %3;\n}\n"
               ::"r"(bar), "r"(rank), "r"(static_cast<int>(pred)), "n"(COUNT)
               : "memory");
}
// `value` into the 32-bit word at `addr`'s offset in CTA `rank`'s shared memory, then one
// arrival on the barrier at `bar`'s offset there, releasing the store at cluster scope (the
// receiver waits with mbar_wait<true> and then reads the word).
__device__ __forceinline__ void st_cluster_arrive(uint32_t addr, uint32_t bar, uint32_t rank,
                                                  int value) {
  asm volatile("{\n.reg .b32 ra, rb;\nmapa.shared::cluster.u32 ra, %0, %2;\n"
               "mapa.shared::cluster.u32 rb, %1, %2;\n"
               "st.shared::cluster.u32 [ra], %3;\n"
               "mbarrier.arrive.release.cluster.shared::cluster.b64 _, [rb];\n}\n"
               ::"r"(addr), "r"(bar), "r"(rank), "r"(value)
               : "memory");
}
// Waits until the phase of parity `parity` has completed (a fresh barrier is in phase 0,
// so waiting for parity 1 returns at once: the usual "previous phase" convention). Each
// try_wait may suspend the warp until the phase completes, up to MBAR_SUSPEND_NS: without
// the hint the hardware's own limit is short, and the retry loop's instructions (a third
// of the forward's excess over FA3's, measured) take issue slots from the other warps.
// CLUSTER_SCOPE: acquiring at cluster scope, so that what another CTA of the cluster wrote
// before its arrival (st_cluster_arrive) is visible after the wait.
constexpr uint32_t MBAR_SUSPEND_NS = 10000000;
template <bool CLUSTER_SCOPE = false>
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  uint32_t done;
  do {
    if constexpr (CLUSTER_SCOPE)
      asm volatile(
          "{\n.reg .pred p;\n"
          "mbarrier.try_wait.parity.acquire.cluster.shared::cta.b64 p, [%1], %2, %3;\n"
          "selp.u32 %0, 1, 0, p;\n}\n"
          : "=r"(done)
          : "r"(bar), "r"(parity), "n"(MBAR_SUSPEND_NS)
          : "memory");
    else
      asm volatile(
          "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2, %3;\n"
          "selp.u32 %0, 1, 0, p;\n}\n"
          : "=r"(done)
          : "r"(bar), "r"(parity), "n"(MBAR_SUSPEND_NS)
          : "memory");
  } while (!done);
}

// --- Shared memory by 32-bit shared addresses (no 64-bit generic pointers: the kernels run
// near the register limit) ------------------------------------------------------------------
__device__ __forceinline__ void sts_u32(uint32_t addr, uint32_t v) {
  asm volatile("st.shared.u32 [%0], %1;\n" ::"r"(addr), "r"(v) : "memory");
}
__device__ __forceinline__ float2 lds_f32x2(uint32_t addr) {
  float2 v;
  asm volatile("ld.shared.v2.f32 {%0, %1}, [%2];\n" : "=f"(v.x), "=f"(v.y) : "r"(addr) : "memory");
  return v;
}
__device__ __forceinline__ void sts_u128(uint32_t addr, uint4 v) {
  asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};\n" ::"r"(addr), "r"(v.x), "r"(v.y),
               "r"(v.z), "r"(v.w)
               : "memory");
}
__device__ __forceinline__ uint4 lds_u128(uint32_t addr) {
  uint4 v;
  asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "r"(addr)
               : "memory");
  return v;
}
// 64 rows of N columns staged in shared memory (128-byte swizzled rows: chunk c of row r
// at 16 ((c % 8) ^ (r % 8)), column block c / 8 at blk_bytes each) to global memory in
// 16-byte chunks by a warpgroup's 128 threads (wtid): out is row 0, `rows` of them and
// `cols` columns are stored (out's rows start on 16 bytes). Where a pass of the 128
// threads covers whole swizzle periods (128 / CHUNKS rows, a multiple of 8), a thread
// keeps one chunk and its swizzle, and the passes are unrolled.
template <typename T, int N>
__device__ __forceinline__ void store_staged_rows(uint32_t tile, int blk_bytes, int wtid,
                                                  T* out, int64 row_stride, int rows,
                                                  int cols) {
  constexpr int CHUNKS = N / 8, ROWS = 128 / CHUNKS;  // 16-byte chunks of a row; a pass
  if constexpr (128 % CHUNKS == 0 && ROWS % 8 == 0) {
    const int row0 = wtid / CHUNKS, c = wtid % CHUNKS;
    const uint32_t src = tile + (c / 8) * blk_bytes + row0 * 128 + (((c % 8) ^ (row0 % 8)) << 4);
    T* const dst = out + row0 * row_stride + c * 8;
#pragma unroll
    for (int i = 0; i < 64 / ROWS; ++i)
      if (row0 + i * ROWS < rows && c * 8 < cols)
        *reinterpret_cast<uint4*>(dst + i * ROWS * row_stride) = lds_u128(src + i * ROWS * 128);
  } else {
#pragma unroll 1
    for (int idx = wtid; idx < 64 * CHUNKS; idx += 128) {
      const int row = idx / CHUNKS, c = idx % CHUNKS;
      if (row < rows && c * 8 < cols)
        *reinterpret_cast<uint4*>(out + row * row_stride + c * 8) =
            lds_u128(tile + (c / 8) * blk_bytes + row * 128 + (((c % 8) ^ (row % 8)) << 4));
    }
  }
}

// --- TMA ----------------------------------------------------------------------------------
__device__ __forceinline__ void tma_prefetch(const TmaMap* map) {
  asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(map)) : "memory");
}
// Box at coordinates (c0 innermost .. c3) of a 4-D tensor map -> shared memory at `dst`,
// completing `bar`'s transaction count. Out-of-bounds elements are written as zeros (and
// still count as transferred bytes).
__device__ __forceinline__ void tma_load_4d(uint32_t dst, const TmaMap* map, uint32_t bar,
                                            int c0, int c1, int c2, int c3) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%3, %4, %5, %6}], [%2];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(bar), "r"(c0), "r"(c1), "r"(c2), "r"(c3)
      : "memory");
}

// tma_load_4d into shared memory at `dst` of every CTA of the cluster in `cta_mask` (bit r:
// rank r), each completing the barrier at `bar`'s offset in its own shared memory: one
// read of L2 for several CTAs.
__device__ __forceinline__ void tma_load_4d_multicast(uint32_t dst, const TmaMap* map,
                                                      uint32_t bar, unsigned short cta_mask,
                                                      int c0, int c1, int c2, int c3) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
      ".multicast::cluster [%0], [%1, {%4, %5, %6, %7}], [%2], %3;\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(bar), "h"(cta_mask), "r"(c0), "r"(c1),
      "r"(c2), "r"(c3)
      : "memory");
}

// The box at coordinates (c0 .. c3) of a 4-D tensor map into the L2 cache, nothing into
// shared memory: a later tma_load_4d of it then reads L2. Out-of-bounds parts are skipped.
__device__ __forceinline__ void tma_prefetch_4d(const TmaMap* map, int c0, int c1, int c2,
                                                int c3) {
  asm volatile("cp.async.bulk.prefetch.tensor.4d.L2.global.tile [%0, {%1, %2, %3, %4}];\n"
               ::"l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(c3)
               : "memory");
}

// Shared memory at `src` -> the box at coordinates (c0 .. c3) of a 4-D tensor map, in this
// thread's bulk group (bulk_commit, bulk_wait). Out-of-bounds elements are not written.
__device__ __forceinline__ void tma_store_4d(const TmaMap* map, uint32_t src, int c0, int c1,
                                             int c2, int c3) {
  asm volatile("cp.async.bulk.tensor.4d.global.shared::cta.tile.bulk_group"
               " [%0, {%2, %3, %4, %5}], [%1];\n" ::"l"(reinterpret_cast<uint64_t>(map)),
               "r"(src), "r"(c0), "r"(c1), "r"(c2), "r"(c3)
               : "memory");
}

// `bytes` (a multiple of 16) from global `src` to shared `dst`, both 16-byte aligned,
// completing `bar`'s transaction count.
__device__ __forceinline__ void bulk_load(uint32_t dst, const void* src, uint32_t bytes,
                                          uint32_t bar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n"
      ::"r"(dst), "l"(reinterpret_cast<uint64_t>(src)), "r"(bytes), "r"(bar)
      : "memory");
}

// dst[0 .. bytes / 4) += the float32 at shared `src` (both 16-byte aligned, bytes a
// multiple of 16), by the TMA unit, in the thread's bulk group (bulk_commit, bulk_wait).
__device__ __forceinline__ void bulk_reduce_add_f32(float* dst, uint32_t src, uint32_t bytes) {
  asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;\n"
               ::"l"(dst), "r"(src), "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void bulk_commit() {
  asm volatile("cp.async.bulk.commit_group;\n" ::: "memory");
}
// Until at most N of the thread's bulk groups are pending: READ, until they have read
// their shared memory (which may then be rewritten); else until they are complete.
template <int N, bool READ>
__device__ __forceinline__ void bulk_wait() {
  if constexpr (READ)
    asm volatile("cp.async.bulk.wait_group.read %0;\n" ::"n"(N) : "memory");
  else
    asm volatile("cp.async.bulk.wait_group %0;\n" ::"n"(N) : "memory");
}

// --- Clusters ------------------------------------------------------------------------------
__device__ __forceinline__ uint32_t cluster_ctarank() {
  uint32_t rank;
  asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(rank));
  return rank;
}
// Every thread of every CTA of the cluster meets here (a __syncthreads across the cluster;
// threads of a warp need not arrive together): writes before it, barrier inits included,
// are visible to all of them after it.
__device__ __forceinline__ void cluster_sync() {
  asm volatile("barrier.cluster.arrive.release;\nbarrier.cluster.wait.acquire;\n" ::: "memory");
}

// --- Register reallocation between warpgroups -----------------------------------------
template <int REGS> __device__ __forceinline__ void setmaxnreg_inc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(REGS));
}
template <int REGS> __device__ __forceinline__ void setmaxnreg_dec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(REGS));
}

// --- wgmma ----------------------------------------------------------------------------------
__device__ __forceinline__ uint64_t desc_field(uint32_t bytes) { return (bytes & 0x3FFFF) >> 4; }

// Descriptor of a 128B-swizzled operand starting at shared address `addr` (see the top).
__device__ __forceinline__ uint64_t make_desc(uint32_t addr, uint32_t lbo) {
  return desc_field(addr) | (desc_field(lbo) << 16) | (desc_field(1024) << 32) | (1ull << 62);
}
// The descriptor `bytes` (a multiple of 16) past `desc`'s start: its start-address field
// plus bytes / 16, which cannot carry out of the field (shared addresses are < 2^18). A
// k-loop then builds one descriptor and adds constants, where make_desc at every step
// masks and shifts each address (ptxas cannot see that the sum stays in the field).
__device__ __forceinline__ uint64_t desc_at(uint64_t desc, uint32_t bytes) {
  return desc + (bytes >> 4);
}

__device__ __forceinline__ void wgmma_fence() {
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void wgmma_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
template <int N> __device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Pins accumulator registers at this point of the program: the compiler may not move
// their uses across the wgmma that writes them asynchronously (call after wgmma_wait and
// before wgmma_fence).
template <int N> __device__ __forceinline__ void fence_regs(float* d) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// Pins A-fragment registers of a register-A wgmma until after its wgmma_wait (call there):
// their values must survive until the tensor cores have read them.
template <int N> __device__ __forceinline__ void fence_regs_u32(uint32_t* r) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+r"(r[i])::"memory");
}

// Orders this thread's earlier shared-memory writes (ordinary stores, completed cp.async
// copies) before later shared-memory accesses of the async proxy (wgmma operands); a
// barrier after it extends the order to the other threads.
__device__ __forceinline__ void fence_proxy_async() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
// bar.sync on named barrier `id` (1..15; 0 is __syncthreads) by `threads` threads.
__device__ __forceinline__ void named_barrier(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
// Arrives at named barrier `id` (of `threads` threads) without waiting for it.
__device__ __forceinline__ void named_barrier_arrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// p[0..3] += (x, y, z, w) in global memory (16-byte aligned): one 16-byte reduction.
__device__ __forceinline__ void red_add4(float* p, float x, float y, float z, float w) {
  asm volatile("red.global.add.v4.f32 [%0], {%1, %2, %3, %4};\n" ::"l"(p), "f"(x), "f"(y),
               "f"(z), "f"(w)
               : "memory");
}

// Turns in global memory between CTAs: wait until *sem reaches turn (acquire);
// pass_global_turn adds one (release). The backward's warpgroups add their dQ tiles by
// red.global between a barrier after the wait and one before thread 0's release, which
// then orders them all. Reaching, not equalling: where bad inputs (device prefix sums) made
// two sets of CTAs share a semaphore, results are wrong (and flagged) but no CTA waits
// forever.
__device__ __forceinline__ void wait_global_turn(const int* sem, int turn) {
  int now;
  while (true) {
    asm volatile("ld.acquire.gpu.global.s32 %0, [%1];\n" : "=r"(now) : "l"(sem) : "memory");
    if (now >= turn) break;
    __nanosleep(64);
  }
}
__device__ __forceinline__ void pass_global_turn(int* sem) {
  asm volatile("red.release.gpu.global.add.s32 [%0], 1;\n" ::"l"(sem) : "memory");
}

}  // namespace sm90
}  // namespace cuflash
