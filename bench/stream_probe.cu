// Read-only streaming of a decode step's K and V caches (B, L, H, 128) of 2-byte elements in
// three access patterns, with no attention math: what the memory system gives each schedule
// (bench/diagnose.py decode-stream). Each warp streams 16-key tiles of one kv head (16 rows x
// 256 bytes of K and of V) through a private STAGES-deep cp.async ring, as flash_decode does.
//   HEAD: CTA (b, split, h_kv) of 4 warps taking the split's tiles in turn (flash_decode's).
//   ITEM: CTA (b, split) of H warps, warp w = kv head w over all the split's tiles: a CTA
//         reads whole 2 KiB cache rows.
//   LEAN: CTA c of H warps over an equal share of all items' tiles (an item boundary may
//         fall inside a share); the ring flows across it.
typedef unsigned int uint32_t;
typedef long long int64_t;

constexpr int KEYS = 16, ROW_BYTES = 256, STAGES = 3;
constexpr int TILE = KEYS * ROW_BYTES;  // one warp's K (or V) tile in shared memory

__device__ __forceinline__ void cp16(uint32_t dst, const char* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(src));
}
__device__ __forceinline__ void commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void wait_stages() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(STAGES - 1));
}

// One warp streams tiles first, first + step, ... < last of the flattened (B * L / 16) tile
// space of kv head h; returns a word of every tile (kept live so the loop stays honest).
__device__ __forceinline__ uint32_t stream(const char* k, const char* v, int h, int H,
                                           int first, int last, int step, uint32_t ring) {
  const int lane = threadIdx.x % 32;
  const int64_t row_bytes = int64_t(H) * ROW_BYTES;
  const int64_t lane_off = (lane / 16) * row_bytes + h * ROW_BYTES + (lane % 16) * 16;
  int t_load = first;
  auto load = [&](int stage) {
    if (t_load < last) {
      const int64_t off = int64_t(t_load) * KEYS * row_bytes + lane_off;
      const uint32_t dst = ring + stage * 2 * TILE + lane * 16;
#pragma unroll
      for (int pass = 0; pass < KEYS / 2; ++pass) {
        cp16(dst + pass * 512, k + off + pass * 2 * row_bytes);
        cp16(dst + TILE + pass * 512, v + off + pass * 2 * row_bytes);
      }
      t_load += step;
    }
    commit();
  };
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) load(s);
  uint32_t acc = 0;
  int stage = 0;
  for (int t = first; t < last; t += step) {
    __syncwarp();
    load(stage == 0 ? STAGES - 1 : stage - 1);
    wait_stages();
    __syncwarp();
    uint32_t x;
    asm volatile("ld.shared.u32 %0, [%1];\n" : "=r"(x) : "r"(ring + stage * 2 * TILE + lane * 4));
    acc ^= x;
    stage = stage == STAGES - 1 ? 0 : stage + 1;
  }
  asm volatile("cp.async.wait_all;\n" ::);
  return acc;
}

// grid B * S * H, 4 warps: CTA ((b * S + split) * H + h).
extern "C" __global__ void __launch_bounds__(128, 2)
stream_head(const char* k, const char* v, int B, int L, int H, int S, uint32_t* sink) {
  extern __shared__ __align__(128) unsigned char smem[];
  const int warp = threadIdx.x / 32;
  const int h = blockIdx.x % H, split = blockIdx.x / H % S, b = blockIdx.x / H / S;
  const int n = L / KEYS, first = b * n + split * n / S, last = b * n + (split + 1) * n / S;
  const uint32_t ring = uint32_t(__cvta_generic_to_shared(smem)) + warp * STAGES * 2 * TILE;
  const uint32_t acc = stream(k, v, h, H, first + warp, last, 4, ring);
  if (acc == 0x12345678u) sink[0] = acc;
}

// grid B * S, H warps: CTA (b * S + split), warp = kv head.
extern "C" __global__ void __launch_bounds__(256, 1)
stream_item(const char* k, const char* v, int B, int L, int H, int S, uint32_t* sink) {
  extern __shared__ __align__(128) unsigned char smem[];
  const int warp = threadIdx.x / 32;
  const int split = blockIdx.x % S, b = blockIdx.x / S;
  const int n = L / KEYS, first = b * n + split * n / S, last = b * n + (split + 1) * n / S;
  const uint32_t ring = uint32_t(__cvta_generic_to_shared(smem)) + warp * STAGES * 2 * TILE;
  const uint32_t acc = stream(k, v, warp, H, first, last, 1, ring);
  if (acc == 0x12345678u) sink[0] = acc;
}

// grid C, H warps: CTA c takes tiles [c T / C, (c + 1) T / C) of all B * L / 16.
extern "C" __global__ void __launch_bounds__(256, 1)
stream_lean(const char* k, const char* v, int B, int L, int H, int C, uint32_t* sink) {
  extern __shared__ __align__(128) unsigned char smem[];
  const int warp = threadIdx.x / 32;
  const int64_t total = int64_t(B) * (L / KEYS);
  const int first = int(total * blockIdx.x / C), last = int(total * (blockIdx.x + 1) / C);
  const uint32_t ring = uint32_t(__cvta_generic_to_shared(smem)) + warp * STAGES * 2 * TILE;
  const uint32_t acc = stream(k, v, warp, H, first, last, 1, ring);
  if (acc == 0x12345678u) sink[0] = acc;
}
