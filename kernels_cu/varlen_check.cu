// Device-side check of a varlen call's prefix sums.
//
// Prefix sums in device memory are not read on the host (that would wait for the stream),
// so the kernels of a varlen call run on whatever they hold: SeqView<true>
// (common/params.cuh) clamps every item to the packed arrays, which keeps every access in
// bounds but computes a wrong answer from wrong prefix sums. varlen_check runs after the
// call's kernels, on the same stream, and checks what the host check would have:
//   cu[0] == 0, cu[batch] == total, 0 <= cu[b + 1] - cu[b] <= max_seqlen for every b,
// for cu_seqlens_q and cu_seqlens_k. If anything fails, it overwrites every output of the
// call (out and lse; dq, dk and dv) with 0xFF bytes, which are NaN in float32, float16 and
// bfloat16: a bad prefix sum is never a silent wrong answer.
//
// Every CTA checks all batch + 1 entries (a few KiB from L2 for usual batches; the launcher
// caps the CTA count for very large ones) and, if they are invalid, fills its grid-stride
// share of the outputs; no CTA depends on another.
#include "common/params.cuh"

namespace cuflash {

constexpr int CHECK_THREADS = 256;
constexpr int CHECK_MAX_OUTPUTS = 5;

// Mirrored by PARAMS in cuflash/ops/varlen_check.py. outputs[i] is nullptr (or its
// byte count 0) past the call's outputs; each output is one contiguous range of bytes.
struct VarlenCheckParams {
  const int* cu_seqlens_q;
  const int* cu_seqlens_k;
  void* outputs[CHECK_MAX_OUTPUTS];
  int64 output_bytes[CHECK_MAX_OUTPUTS];
  int batch, total_q, total_k, max_seqlen_q, max_seqlen_k;
};

// Entry i (0 <= i <= batch) of prefix sums `cu` and the length that starts there.
__device__ __forceinline__ bool entry_ok(const int* cu, int i, int batch, int total,
                                         int max_len) {
  const int x = cu[i];
  if (i == 0 && x != 0) return false;
  if (i == batch) return x == total;
  const int64 len = static_cast<int64>(cu[i + 1]) - x;  // int32 differences can overflow
  return len >= 0 && len <= max_len;
}

__global__ void __launch_bounds__(CHECK_THREADS)
varlen_check(const __grid_constant__ VarlenCheckParams p) {
  bool bad = false;
  for (int i = threadIdx.x; i <= p.batch; i += CHECK_THREADS) {
    bad |= !entry_ok(p.cu_seqlens_q, i, p.batch, p.total_q, p.max_seqlen_q);
    bad |= !entry_ok(p.cu_seqlens_k, i, p.batch, p.total_k, p.max_seqlen_k);
  }
  if (!__syncthreads_or(bad)) return;

  const int64 stride = static_cast<int64>(gridDim.x) * CHECK_THREADS;
  const int64 first = static_cast<int64>(blockIdx.x) * CHECK_THREADS + threadIdx.x;
#pragma unroll 1
  for (int o = 0; o < CHECK_MAX_OUTPUTS; ++o) {
    unsigned char* dst = static_cast<unsigned char*>(p.outputs[o]);
    const int64 n = p.output_bytes[o];
    if (dst == nullptr || n <= 0) continue;
    // 16-byte stores from the first 16-byte boundary, single bytes before and after it.
    const int64 misalign = static_cast<int64>(reinterpret_cast<uint64_t>(dst) % 16);
    const int64 head = min(n, (16 - misalign) % 16);
    const int64 words = (n - head) / 16;
    uint4* body = reinterpret_cast<uint4*>(dst + head);
    for (int64 w = first; w < words; w += stride) body[w] = make_uint4(~0u, ~0u, ~0u, ~0u);
    for (int64 c = first; c < head; c += stride) dst[c] = 0xFF;
    for (int64 c = head + words * 16 + first; c < n; c += stride) dst[c] = 0xFF;
  }
}

}  // namespace cuflash
