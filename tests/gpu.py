"""What the GPU tests share: the skip of tests marked `gpu` where there is no CUDA GPU (used by
tests/conftest.py and bench/conftest.py), the NaN-poisoning allocator hook, and CuPy.

Also the comparisons several test files share (:func:`bits`, :func:`assert_same_bits`,
:func:`assert_near`). Usage: ``from gpu import poisoned`` (pytest puts ``tests/`` on ``sys.path``); the
``launched`` fixture (tests/conftest.py) wraps :func:`launches`. Nothing here
imports CuPy at import time, so CPU-only machines collect the GPU tests and skip them.
"""
import contextlib

import numpy as np
import pytest


def _has_gpu() -> bool:
    try:
        import cupy
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # no CuPy, no driver or no device: all mean no GPU
        return False


HAS_GPU = _has_gpu()


def pytest_collection_modifyitems(config, items):
    """Skip the items marked `gpu` without a GPU (a conftest.py hook: import it there)."""
    if HAS_GPU:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU with CuPy")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@contextlib.contextmanager
def launches():
    """Inside the block, record (filename, name expression) of every kernel launched through
    cuflash._core.Kernel, in order; yields that list."""
    from cuflash import _core
    calls, real = [], _core.Kernel.__call__

    def spy(kernel, stream, argv):
        calls.append((kernel.filename, kernel.name))
        return real(kernel, stream, argv)

    _core.Kernel.__call__ = spy
    try:
        yield calls
    finally:
        _core.Kernel.__call__ = real


def forget_plans():
    """No forward or backward plan and no memoized call kept: plans keep the maps, paths,
    offsets and steps they were made with (monkeypatched module numbers included), and
    memoized calls keep their plans."""
    from cuflash import _api, ops
    ops.forward.plan.cache_clear()
    ops.backward.plan.cache_clear()
    _api.CALLS.clear()


def import_cupy():
    """The cupy module (imported only when a GPU test runs)."""
    import cupy
    return cupy


def device_arch() -> str:
    """The current device's architecture, e.g. "sm_90"."""
    from cuflash import _compile
    return _compile.device_arch(import_cupy().cuda.Device().id)


class PoisoningAllocator:
    """Allocate from CuPy's default pool, fill with NaN bytes, remember the sizes."""

    def __init__(self):
        import cupy
        self.pool = cupy.get_default_memory_pool()
        self.sizes = []

    def __call__(self, size):
        import cupy
        mem = self.pool.malloc(size)
        self.sizes.append(size)
        cupy.cuda.runtime.memsetAsync(mem.ptr, 0xFF, size, cupy.cuda.get_current_stream().ptr)
        return mem


def poisoned(fn, *args, **kwargs):
    """fn(*args, **kwargs) with every new allocation filled with 0xFF bytes (NaN in float16,
    bfloat16 and float32), the device synced after; (result, sizes of the allocations)."""
    import cupy
    alloc = PoisoningAllocator()
    cupy.cuda.set_allocator(alloc)
    try:
        result = fn(*args, **kwargs)
    finally:
        cupy.cuda.set_allocator(alloc.pool.malloc)
    cupy.cuda.Device().synchronize()
    return result, alloc.sizes


def dq_scratch_bytes(rows: int, headdim: int, deterministic: bool, launched) -> int:
    """The backward's dQ scratch beyond lse_log2 and delta: the float32 accumulator (rows x
    padded head dim: the Hopper backward's, bwd_sm90 or bwd_sm90_wide among ``launched``,
    pads to its instantiation's) unless the deterministic dQ kernel writes dq itself, which
    the Hopper backward does not: it keeps the accumulator and adds an int32 semaphore per
    4096 floats of it, after 256-byte alignment."""
    from cuflash import ops
    hopper = any(f == ops.backward.SM90_FILE for f, _ in launched)
    padded = ops.backward.sm90_headdim(headdim) if hopper else ops.tiles.padded_headdim(headdim)
    accum = rows * padded * 4
    if not deterministic:
        return accum
    if hopper:
        return -(-accum // 256) * 256 + 4 * (accum // 4 // 4096 + 1)
    return 0


def array_module(x):
    """cupy for a CuPy array, numpy for anything else."""
    return import_cupy() if type(x).__module__.startswith("cupy") else np


def host(x):
    """``x`` as a NumPy array (a CuPy array copied to the host)."""
    return x if isinstance(x, np.ndarray) else x.get()


def bits(x):
    """The bit pattern of a float array, on the host (NaN compares equal to itself)."""
    x = np.ascontiguousarray(host(x))
    return x.view(f"u{x.dtype.itemsize}")


def assert_same_bits(name, got, want, than="the reference"):
    """``got`` has ``want``'s shape, dtype and bits."""
    assert tuple(got.shape) == tuple(want.shape), f"{name}: shape {got.shape} != {want.shape}"
    assert got.dtype == want.dtype, f"{name}: dtype {got.dtype} != {want.dtype}"
    differ = bits(got) != bits(want)
    assert not differ.any(), (f"{name}: {differ.sum()} of {differ.size} elements differ from "
                              f"{than}, first at {np.argwhere(differ)[0].tolist()}")


def assert_near(name, got, want, than="the reference"):
    """Finite wherever ``want`` is, and within 2^-6 of its largest value (float32 atomics
    add in no fixed order)."""
    g, w = host(got).astype(np.float64), host(want).astype(np.float64)
    assert np.isfinite(g)[np.isfinite(w)].all(), f"{name}: NaN or inf where {than} is finite"
    tol = 2.0 ** -6 * max(1.0, np.abs(w).max(initial=0))
    err = np.abs(g - w).max(initial=0)
    assert err <= tol, f"{name}: max difference {err:.3g} from {than} > {tol:.3g}"
