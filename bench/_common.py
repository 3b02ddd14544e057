"""What the bench tools share: the standard shapes and their FLOPs, input generation, the
CUDA-event timers, the GPU and torch checks, and the torch SDPA peers.

The tools run as ``PYTHONPATH=. python bench/<tool>.py``, which puts bench/ on sys.path, so
each imports this module as ``_common`` (as does bench/test_bench.py under pytest).
"""
from __future__ import annotations

import contextlib
import datetime
import os
import shlex
import statistics
import sys
import time

import ml_dtypes
import numpy as np

# The standard sweep (CONVENTIONS.md, "Measuring speed"): hidden 2048 (nheads = 2048 //
# headdim), batch = 16384 // seqlen.
HIDDEN, TOKENS = 2048, 16384
DTYPES = {"bf16": np.dtype(ml_dtypes.bfloat16), "fp16": np.dtype(np.float16)}
MODE_FLOPS = {"fwd": 1.0, "bwd": 2.5, "fwdbwd": 3.5}  # multiples of the forward's FLOPs
WARMUP = 3


def standard_shape(seqlen: int, headdim: int) -> tuple[int, int]:
    """(batch, nheads) of the standard sweep."""
    return max(1, TOKENS // seqlen), HIDDEN // headdim


def flops(mode: str, batch: int, nheads: int, seqlen: int, headdim: int, causal: bool) -> float:
    forward = 4 * batch * nheads * seqlen * seqlen * headdim / (2 if causal else 1)
    return forward * MODE_FLOPS[mode]


def make_inputs(dtype, batch: int, seqlen: int, nheads: int, headdim: int, seed=None):
    """q, k, v, dout: random normal CuPy arrays of shape (batch, seqlen, nheads, headdim),
    from CuPy's global generator, or from a generator of their own with ``seed``."""
    import cupy
    random = cupy.random if seed is None else cupy.random.RandomState(seed)
    shape = (batch, seqlen, nheads, headdim)
    return [random.standard_normal(shape, dtype=cupy.float32).astype(dtype) for _ in range(4)]


# --------------------------------------------------------------------------------- timers

def time_ms(fn, budget_ms: float, min_calls: int, max_calls: int, before=None) -> float:
    """Median milliseconds of ``fn()`` between two CUDA events, after WARMUP calls: one timed
    call estimates the time, then as many calls as fill ``budget_ms`` (within [min_calls,
    max_calls]) are queued without syncing between them. ``before()``, when given, runs
    ahead of each timed call, outside its events (decode.py flushes the L2 cache there)."""
    import cupy
    for _ in range(WARMUP):
        fn()

    def timed_calls(calls):
        events = [(cupy.cuda.Event(), cupy.cuda.Event()) for _ in range(calls)]
        for start, end in events:
            if before is not None:
                before()
            start.record()
            fn()
            end.record()
        events[-1][1].synchronize()
        return [cupy.cuda.get_elapsed_time(start, end) for start, end in events]

    estimate = timed_calls(1)[0]
    calls = int(min(max_calls, max(min_calls, budget_ms / max(estimate, 1e-3))))
    return statistics.median(timed_calls(calls))


def per_call_ms(fn, warmup: int, rep: int) -> float:
    """Median milliseconds of ``fn()`` with events around each call and a sync after it: every
    call starts on an idle GPU, so the host time inside the call counts (the tuning tools'
    measure)."""
    import cupy
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(rep):
        start, end = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, end))
    return float(np.median(times))


def back_to_back_ms(fn, calls: int, rep: int = 1) -> float:
    """Milliseconds per call of ``calls`` calls between one pair of events (median of ``rep``
    such runs): the GPU time when the host keeps ahead."""
    import cupy
    times = []
    for _ in range(rep):
        start, end = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, end) / calls)
    return float(np.median(times))


def host_us(fn, calls: int = 50) -> float:
    """Host microseconds per call of ``fn()`` (the GPU synced before and after)."""
    import cupy
    cupy.cuda.Device().synchronize()
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    t = (time.perf_counter() - t) / calls * 1e6
    cupy.cuda.Device().synchronize()
    return t


# ------------------------------------------------------------------------ GPU and torch

def require_gpu():
    """The cupy module, or exit with why there is no GPU to measure."""
    tool = os.path.basename(sys.argv[0]) or "this tool"
    try:
        import cupy
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # no CuPy, no driver: both mean no GPU to measure
        sys.exit(f"{tool} needs a CUDA GPU and CuPy, and found none "
                 f"({type(e).__name__}: {e})")
    if count == 0:
        sys.exit(f"{tool} needs a CUDA GPU, and CuPy sees none")
    return cupy


def import_torch():
    try:
        import torch
    except ImportError:
        return None
    return torch


def release_memory(torch) -> None:
    """Hand cached blocks back, so one implementation's pool does not starve the next."""
    import cupy
    cupy.get_default_memory_pool().free_all_blocks()
    if torch is not None:
        torch.cuda.empty_cache()


def environment(cupy, torch, argv) -> dict:
    import cuflash
    device = cupy.cuda.Device()
    return {
        "device": cupy.cuda.runtime.getDeviceProperties(device.id)["name"].decode(),
        "compute_capability": device.compute_capability,
        "cuda_runtime": cupy.cuda.runtime.runtimeGetVersion(),
        "cuda_driver": cupy.cuda.runtime.driverGetVersion(),
        "cuflash": cuflash.__version__,
        "cupy": cupy.__version__,
        "numpy": np.__version__,
        "torch": None if torch is None else torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, *argv]),
    }


# ------------------------------------------------------------------------------- peers

TORCH_BACKENDS = {"torch-flash": "FLASH_ATTENTION", "torch-cudnn": "CUDNN_ATTENTION",
                  "torch-efficient": "EFFICIENT_ATTENTION"}


@contextlib.contextmanager
def run_torch(backend, mode, q, k, v, dout, causal):
    """torch SDPA with ``backend`` (an SDPBackend name) on the same buffers, zero-copy through
    DLPack; yields the zero-argument call to time. "fwd" returns SDPA's output, of layout
    (batch, nheads, seqlen, headdim); "bwd" is timed alone, on a retained graph, and returns
    dq, dk, dv of layout (batch, seqlen, nheads, headdim); "fwdbwd" is both."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    sdpa = torch.nn.functional.scaled_dot_product_attention
    leaves = [torch.from_dlpack(x).requires_grad_(mode != "fwd") for x in (q, k, v)]
    # SDPA takes (batch, nheads, seqlen, headdim): transposed views of the same memory.
    tq, tk, tv = (x.transpose(1, 2) for x in leaves)
    tdout = torch.from_dlpack(dout).transpose(1, 2)

    def forward():
        return sdpa(tq, tk, tv, is_causal=causal)

    # autograd.grad rather than .backward(): no accumulation into .grad inside the timing.
    with sdpa_kernel(getattr(SDPBackend, backend)):
        if mode == "fwd":
            yield forward
        elif mode == "bwd":
            out = forward()
            yield lambda: torch.autograd.grad(out, leaves, tdout, retain_graph=True)
        else:
            yield lambda: torch.autograd.grad(forward(), leaves, tdout)


def cuflash_launches(q, k, v, causal, *, fwd_config=None, bwd_hopper=True, bwd_steps=None,
                     deterministic=False):
    """(forward(), backward(out, lse)) of dense cuflash on CuPy arrays with explicit kernel
    choices (tuning and the mma.sync peer): ``fwd_config`` an ``ops.forward.Config``,
    ``bwd_hopper=False`` keeps bwd_main on sm_90, ``bwd_steps`` overrides the backward's
    launches. The same validation and launches as the public functions, minus their memo."""
    from cuflash import ops
    from cuflash._api import contiguous_strides
    p = ops.dense_problem(q, k, v, causal=causal)
    batch, seqlen_q, nheads, _ = q.shape
    lse_shape = (batch, nheads, seqlen_q)
    layout = contiguous_strides(q.shape, q.dtype.itemsize)
    fwd = ops.forward.Launch(p, layout, lse_shape, fwd_config)
    lse_strides = contiguous_strides(lse_shape, 4)
    bwd = ops.backward.Launch(p, (layout, layout, lse_strides, layout,
                                  contiguous_strides(k.shape, k.dtype.itemsize),
                                  contiguous_strides(v.shape, v.dtype.itemsize)),
                              deterministic, bwd_hopper, bwd_steps)

    def forward():
        return fwd(q, k, v)

    def backward(dout, out, lse):
        return bwd(dout, q, k, v, out, lse)

    return forward, backward
