// Tensor-core and async-copy primitives for sm_80+: cp.async, ldmatrix, mma.sync m16n8k16.
//
// Fragment layouts follow the PTX ISA ("Matrix Fragments for mma.m16n8k16"): with
// lane = 4 * group + quad (group = lane / 4, quad = lane % 4),
//   A (16x16, row-major) : a[0..3] hold rows {group, group+8} x cols {2quad, 2quad+1} and +8
//   B (16x8,  col-major) : b[0..1] hold cols group x rows {2quad, 2quad+1} and +8
//   C (16x8,  float)     : c[0,1] row group, cols 2quad, 2quad+1; c[2,3] row group+8.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
// NVRTC ships no <cstdint> without extra include paths; the two widths we use:
using uint32_t = unsigned int;
using uint64_t = unsigned long long;

namespace cuflash {

using int64 = long long;

template <typename T> struct dtype_traits;
template <> struct dtype_traits<__half> {
  using pair = __half2;
  static constexpr bool BFLOAT16 = false;
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  static __device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half from_float(float x) { return __float2half_rn(x); }
};
template <> struct dtype_traits<__nv_bfloat16> {
  using pair = __nv_bfloat162;
  static constexpr bool BFLOAT16 = true;
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  static __device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
};

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy; bytes past `src_bytes` (0 or 16) are zero-filled, which is
// how out-of-range rows and padded head dims read as zeros without a branch.
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, bool valid) {
  int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}

// D = A * B + D, 16x8x16, float accumulators.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                          uint32_t b1);
template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4],
                                                  uint32_t b0, uint32_t b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
               "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4],
                                                         uint32_t b0, uint32_t b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
               "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Shared-memory tile of ROWS x COLS 16-bit elements, rows of COLS * 2 bytes split into
// 16-byte chunks whose index is XOR-swizzled with the row, so that both the cp.async
// stores (a row's chunks) and ldmatrix loads (8 rows, one chunk column) hit 8 distinct
// bank groups. COLS must be a multiple of 64 (a 128-byte row segment).
template <int COLS>
__device__ __forceinline__ int swizzle(int row, int col) {  // col in elements -> offset
  static_assert(COLS % 64 == 0, "swizzled tiles need rows of a multiple of 64 elements");
  int chunk = col >> 3;
  int swizzled = (chunk & ~7) | ((chunk ^ row) & 7);
  return row * COLS + (swizzled << 3) + (col & 7);
}

// p[0..1] += (x, y) in global memory: one 8-byte reduction on sm_90.
__device__ __forceinline__ void red_add2(float* p, float x, float y) {
#if __CUDA_ARCH__ >= 900
  asm volatile("red.global.add.v2.f32 [%0], {%1, %2};\n" ::"l"(p), "f"(x), "f"(y) : "memory");
#else
  atomicAdd(p, x);
  atomicAdd(p + 1, y);
#endif
}

// One MUFU.EX2; exp2(-inf) = 0, which is how masked scores drop out of the softmax.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// One MUFU.TANH (relative error about 2^-11; tanh(+-inf) = +-1, NaN stays NaN).
__device__ __forceinline__ float fast_tanh(float x) {
  float y;
  asm("tanh.approx.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// One MUFU.RCP (within 1 ulp; 1 / inf = 0).
__device__ __forceinline__ float fast_rcp(float x) {
  float y;
  asm("rcp.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

}  // namespace cuflash
