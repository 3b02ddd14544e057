// Attention backward, FlashAttention-2 style (recompute P from the saved lse):
//   bwd_preprocess  delta = rowsum(dout * out), lse in base 2, zeroed dq accumulator
//   bwd_convert_dq  dq = scale * dq_accum in the input dtype
#include "common/params.cuh"

namespace cuflash {

constexpr float kLog2e = 1.4426950408889634f;
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

// grid (seqlen_q_pad / PRE_ROWS, nheads, batch). Padded rows (>= seqlen_q) get delta 0 and
// lse_log2 +inf; so does a fully masked row (lse -inf), which makes its p exactly 0.
template <typename T>
__global__ void __launch_bounds__(PRE_THREADS) bwd_preprocess(const __grid_constant__ BwdParams p) {
  const AttnArgs& a = p.attn;
  const int row = blockIdx.x * PRE_ROWS + threadIdx.x / PRE_LANES;
  const int lane = threadIdx.x % PRE_LANES;
  const int h = blockIdx.y, b = blockIdx.z;
  constexpr int EPV = 16 / sizeof(T);  // elements per 16-byte vector
  float acc = 0.f;
  if (row < a.seqlen_q) {
    const T* o = static_cast<const T*>(p.out) + b * p.o_batch_stride + row * p.o_row_stride +
                 h * p.o_head_stride;
    const T* d = static_cast<const T*>(p.dout) + b * p.do_batch_stride +
                 row * p.do_row_stride + h * p.do_head_stride;
    for (int c = lane * EPV; c < a.headdim; c += PRE_LANES * EPV) {
      acc += dot16<T>(*reinterpret_cast<const uint4*>(o + c),
                      *reinterpret_cast<const uint4*>(d + c));
    }
  }
#pragma unroll
  for (int s = PRE_LANES / 2; s > 0; s /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, s);
  if (row >= p.seqlen_q_pad) return;
  const int64 r = (int64(b) * a.nheads + h) * p.seqlen_q_pad + row;
  if (lane == 0) {
    float lse = -inf_f32();
    if (row < a.seqlen_q)
      lse = p.lse[b * p.lse_batch_stride + h * p.lse_head_stride + row * p.lse_row_stride];
    p.delta[r] = acc;
    p.lse_log2[r] = lse == -inf_f32() ? inf_f32() : lse * kLog2e;
  }
  if (p.dq_accum != nullptr) {
    float4* dqa = reinterpret_cast<float4*>(p.dq_accum + r * p.headdim_pad);
    for (int c = lane; c < p.headdim_pad / 4; c += PRE_LANES) dqa[c] = make_float4(0.f, 0.f, 0.f, 0.f);
  }
}

// grid (ceil(seqlen_q / PRE_ROWS), nheads, batch): dq = scale * dq_accum, rounded to T.
template <typename T>
__global__ void __launch_bounds__(PRE_THREADS) bwd_convert_dq(const __grid_constant__ BwdParams p) {
  const AttnArgs& a = p.attn;
  const int row = blockIdx.x * PRE_ROWS + threadIdx.x / PRE_LANES;
  const int lane = threadIdx.x % PRE_LANES;
  const int h = blockIdx.y, b = blockIdx.z;
  if (row >= a.seqlen_q) return;
  constexpr int EPV = 16 / sizeof(T);
  const float* src = p.dq_accum + ((int64(b) * a.nheads + h) * p.seqlen_q_pad + row) * p.headdim_pad;
  T* dst = static_cast<T*>(p.dq) + b * p.dq_batch_stride + row * p.dq_row_stride +
           h * p.dq_head_stride;
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

}  // namespace cuflash
