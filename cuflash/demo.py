"""Attention forward and backward on one problem, checked against the float64 reference.

    python -m cuflash.demo

Runs on the GPU (bfloat16, seqlen 1024) when CuPy sees one, else on the NumPy backend
(float32, seqlen 256). Prints wall times and peak memory; exits 1 if a result is off.
"""
from __future__ import annotations

import sys
import time
import tracemalloc

import ml_dtypes
import numpy as np

import cuflash
from cuflash import reference

BATCH, NHEADS, NHEADS_KV, HEADDIM = 2, 8, 2, 64  # grouped-query: 4 query heads per kv head
CAUSAL = True
# Largest error allowed, relative to max(1, max|reference|): about twice the error of the
# same computation done naively in that dtype (reference(..., upcast=False)), which is the
# tests' rule; a wrong mask or softmax is off by O(0.1).
TOLERANCE = {np.dtype(ml_dtypes.bfloat16): 2.0 ** -5, np.dtype(np.float32): 2.0 ** -16}
MIB = 2.0 ** 20


class GPU:
    dtype, seqlen = np.dtype(ml_dtypes.bfloat16), 1024

    def __init__(self, cupy):
        self.cupy = cupy
        self.pool = cupy.get_default_memory_pool()
        props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
        self.name = f"GPU ({props['name'].decode()})"

    def to_device(self, x):
        return self.cupy.asarray(x)

    def measure(self, fn):
        """``fn()``, its wall time, and the device memory it added at its peak."""
        # The pool keeps freed blocks, so once emptied it grows to exactly the peak.
        self.pool.free_all_blocks()
        held = self.pool.total_bytes()
        start = time.perf_counter()
        result = fn()
        self.cupy.cuda.Device().synchronize()
        return result, time.perf_counter() - start, self.pool.total_bytes() - held


class CPU:
    dtype, seqlen = np.dtype(np.float32), 256
    name = "CPU (NumPy)"

    def to_device(self, x):
        return x

    def measure(self, fn):
        """``fn()``, its wall time, and the host memory it added at its peak."""
        tracemalloc.start()
        start = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return result, seconds, peak


def pick_backend():
    try:
        import cupy
        if cupy.cuda.runtime.getDeviceCount() > 0:
            return GPU(cupy)
    except Exception:  # no CuPy, no driver or no device: each means the CPU backend
        pass
    return CPU()


def main() -> int:
    backend = pick_backend()
    dtype, seqlen = backend.dtype, backend.seqlen
    rng = np.random.default_rng(0)
    q_shape, kv_shape = (BATCH, seqlen, NHEADS, HEADDIM), (BATCH, seqlen, NHEADS_KV, HEADDIM)
    host = [rng.standard_normal(s, np.float32).astype(dtype)
            for s in (q_shape, kv_shape, kv_shape, q_shape)]
    q, k, v, dout = (backend.to_device(x) for x in host)
    print(f"backend {backend.name}, dtype {dtype}, causal={CAUSAL}")
    print(f"q {q_shape}, k and v {kv_shape}: {NHEADS} query heads share {NHEADS_KV} kv heads")

    def forward():
        return cuflash.attention_forward(q, k, v, causal=CAUSAL)

    def backward():
        return cuflash.attention_backward(dout, q, k, v, out, lse, causal=CAUSAL)

    # On the GPU the first call compiles the kernels (NVRTC, then CuPy's disk cache), so
    # each step runs twice and the second run is the one that shows speed and memory.
    _, first_fwd, _ = backend.measure(forward)
    (out, lse), t_fwd, mem_fwd = backend.measure(forward)
    _, first_bwd, _ = backend.measure(backward)
    (dq, dk, dv), t_bwd, mem_bwd = backend.measure(backward)
    print(f"forward  {t_fwd * 1e3:8.2f} ms (first call {first_fwd * 1e3:.0f} ms), "
          f"peak memory added {mem_fwd / MIB:6.2f} MiB")
    print(f"backward {t_bwd * 1e3:8.2f} ms (first call {first_bwd * 1e3:.0f} ms), "
          f"peak memory added {mem_bwd / MIB:6.2f} MiB")
    print(f"(of which out and lse take {(out.nbytes + lse.nbytes) / MIB:.2f} MiB, "
          f"dq, dk and dv {(dq.nbytes + dk.nbytes + dv.nbytes) / MIB:.2f} MiB)")

    print("checking against the float64 reference ...", flush=True)
    q64, k64, v64, dout64 = (x.astype(np.float64) for x in host)
    want = (*reference.attention_forward(q64, k64, v64, causal=CAUSAL),
            *reference.attention_backward(dout64, q64, k64, v64, causal=CAUSAL))
    ok = True
    print(f"{'':4} {'max abs error':>14} {'tolerance':>10}")
    for name, got, ref in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, dq, dk, dv), want):
        got = got.get() if hasattr(got, "get") else got
        err = np.abs(got.astype(np.float64) - ref).max()
        tol = TOLERANCE[dtype] * max(1.0, np.abs(ref).max())
        ok &= bool(err <= tol)
        print(f"{name:4} {err:14.3e} {tol:10.3e}  {'ok' if err <= tol else 'FAIL'}")
    print("PASS" if ok else "FAIL: an error exceeds its tolerance")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
