"""What the bench tools share: the standard shapes and their FLOPs, input generation, the
timers (the back-to-back timer that the sweeps use for every implementation alike, and the
CUDA-event timers of the tuning and decode tools), the GPU and torch checks, and the peers:
torch SDPA, and jitted JAX functions (JAX's cuDNN attention, FlashAttention-3 through
``flash_attn3_jax``, ``cuflash.jax``).

The tools run as ``PYTHONPATH=. python bench/<tool>.py``, which puts bench/ on sys.path, so
each imports this module as ``_common`` (as does bench/test_bench.py under pytest).
"""
from __future__ import annotations

import contextlib
import datetime
import functools
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, NamedTuple

import ml_dtypes
import numpy as np

# The standard sweep (CONVENTIONS.md, "Measuring speed"): hidden 2048 (nheads = 2048 //
# headdim), batch = 16384 // seqlen.
HIDDEN, TOKENS = 2048, 16384
DTYPES = {"bf16": np.dtype(ml_dtypes.bfloat16), "fp16": np.dtype(np.float16)}
MODE_FLOPS = {"fwd": 1.0, "bwd": 2.5, "fwdbwd": 3.5}  # multiples of the forward's FLOPs
WARMUP = 3


def standard_shape(seqlen: int, headdim: int, tokens: int = TOKENS,
                   hidden: int = HIDDEN) -> tuple[int, int]:
    """(batch, nheads) of the standard sweep (smaller ``tokens`` and ``hidden`` for a dry run
    on the CPU)."""
    return max(1, tokens // seqlen), max(1, hidden // headdim)


def flops(mode: str, batch: int, nheads: int, seqlen: int, headdim: int, causal: bool) -> float:
    forward = 4 * batch * nheads * seqlen * seqlen * headdim / (2 if causal else 1)
    return forward * MODE_FLOPS[mode]


def make_inputs(dtype, batch: int, seqlen: int, nheads: int, headdim: int, seed=None,
                xp=None):
    """q, k, v, dout: random normal arrays of shape (batch, seqlen, nheads, headdim), CuPy
    (default) or NumPy (``xp=numpy``), from the module's global generator, or from a
    generator of their own with ``seed``."""
    if xp is None:
        import cupy as xp
    random = xp.random if seed is None else xp.random.RandomState(seed)
    shape = (batch, seqlen, nheads, headdim)
    return [random.standard_normal(shape).astype(np.float32).astype(dtype)
            if xp is np else random.standard_normal(shape, dtype=np.float32).astype(dtype)
            for _ in range(4)]


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


# ------------------------------------------------------- one timer for every implementation
#
# JAX runs on a stream of its own and dispatches asynchronously, so CUDA events recorded on
# CuPy's or torch's stream do not see its work. The sweeps therefore time every
# implementation the same way: warm-up, then N calls back to back with one synchronisation
# of everything at the end (``synchronize``), wall time over N (a Runner's run); the
# implementations of a row take turns with their runs (``turns``), each the median of its.

class Timing(NamedTuple):
    """How a :class:`Runner` times: ``warmup`` calls first (compilation, autotuning, pools),
    then runs of N back-to-back calls each, N chosen so that a run takes about ``budget_ms``
    (from a first run of ``min_calls`` calls), within [min_calls, max_calls]; ``reps``: how
    many runs (sweep.py takes 2 x ``reps`` turns, fwd_tiles.py ``reps``)."""
    budget_ms: float
    min_calls: int
    max_calls: int
    reps: int
    warmup: int = WARMUP


class Difference(NamedTuple):
    """A time measured as that of ``total`` minus that of ``part``, each by a Runner of its
    own: a JAX backward is its jitted ``jax.vjp`` (forward + backward) minus its jitted
    forward."""
    total: Callable
    part: Callable


def synchronize(result=None, gpu: bool = True) -> None:
    """Wait for all the work queued so far: ``jax.block_until_ready(result)`` when JAX is
    loaded (XLA dispatches asynchronously, on its own stream), then, with ``gpu``,
    ``cudaDeviceSynchronize`` (every stream of the device: CuPy's, torch's and XLA's)."""
    jax = sys.modules.get("jax")
    if jax is not None and result is not None:
        jax.block_until_ready(result)
    if gpu:
        import cupy
        cupy.cuda.Device().synchronize()


class Runner:
    """Timed runs of one ``fn()``: at construction ``timing.warmup`` calls and a sync, then a
    first run of ``min_calls`` calls that sizes N (about ``budget_ms`` of calls, within
    [min_calls, max_calls]); each ``run()`` then makes N calls back to back with one
    ``sync(last result)`` at the end, timed on the host clock from the first call to the end
    of the sync, and returns milliseconds a call."""

    def __init__(self, fn, timing: Timing, sync=synchronize):
        self.fn, self.sync = fn, sync
        result = None
        for _ in range(timing.warmup):
            result = fn()
        sync(result)
        del result
        self.calls = timing.min_calls
        estimate = self.run()
        self.calls = int(min(timing.max_calls,
                             max(timing.min_calls, timing.budget_ms / max(estimate, 1e-3))))

    def run(self) -> float:
        result = None
        start = time.perf_counter()
        for _ in range(self.calls):
            result = self.fn()
        self.sync(result)
        return (time.perf_counter() - start) * 1e3 / self.calls


def summary_of_runs(total: list, part: list | None, calls: int) -> dict:
    """{"ms": median of a run's ms a call, "min_ms", "calls", "reps", "runs_ms"} of one
    implementation's runs; with ``part`` (a :class:`Difference`'s runs of its part) the
    medians' difference, and "total_ms", "part_ms" and "part_runs_ms"."""
    if part is None:
        return {"ms": statistics.median(total), "min_ms": min(total), "calls": calls,
                "reps": len(total), "runs_ms": total}
    total_ms, part_ms = statistics.median(total), statistics.median(part)
    return {"ms": total_ms - part_ms, "min_ms": min(total) - min(part), "calls": calls,
            "reps": len(total), "total_ms": total_ms, "part_ms": part_ms,
            "runs_ms": total, "part_runs_ms": part}


def turns(names: list, count: int):
    """The order in which ``count`` turns visit ``names``: each turn every one of them once,
    in the given order and in reverse by turns (A B C, C B A, ...), so that a clock that
    drifts as the card warms meets every one alike."""
    for turn in range(count):
        yield from (names if turn % 2 == 0 else names[::-1])


class Nvml:
    """The SM clock (MHz), power (W), energy counter (mJ) and clock event reasons of CuPy's
    current device, found by its PCI bus id, through NVML (libnvidia-ml, read only).
    Raises OSError where there is no NVML or it does not know the device."""
    SM_CLOCK = 1  # NVML_CLOCK_SM

    def __init__(self):
        import ctypes

        import cupy
        self.c = ctypes
        self.lib = ctypes.CDLL("libnvidia-ml.so.1")
        if self.lib.nvmlInit_v2():
            raise OSError("nvmlInit failed")
        self.handle = ctypes.c_void_p()
        bus_id = cupy.cuda.Device().pci_bus_id.encode()
        if self.lib.nvmlDeviceGetHandleByPciBusId_v2(bus_id, ctypes.byref(self.handle)):
            raise OSError(f"NVML does not know the device at {bus_id.decode()}")

    def _get(self, fn, ctype, *args):
        value = ctype()
        status = getattr(self.lib, fn)(self.handle, *args, self.c.byref(value))
        return value.value if status == 0 else None

    def sm_mhz(self):
        return self._get("nvmlDeviceGetClockInfo", self.c.c_uint, self.SM_CLOCK)

    def sample(self) -> tuple:
        """(SM MHz, milliwatts, clock event reasons: NVML's bits, 0x4 power cap, 0x20 / 0x40
        thermal, 0x1 idle)."""
        return (self.sm_mhz(), self._get("nvmlDeviceGetPowerUsage", self.c.c_uint),
                self._get("nvmlDeviceGetCurrentClocksThrottleReasons", self.c.c_ulonglong))

    def energy_mj(self):
        return self._get("nvmlDeviceGetTotalEnergyConsumption", self.c.c_ulonglong)


def load_tree(tree: str, alias: str):
    """The ``cuflash`` package of another source tree (``tree/cuflash``, its kernels in
    ``tree/kernels_cu``: a `git archive` of a commit), imported as module ``alias`` beside
    this one: its plans, caches and kernels are its own, so that one process can time two
    commits' kernels in turns (sweep.py --trees)."""
    import importlib.util
    init = Path(tree).resolve() / "cuflash" / "__init__.py"
    if not init.is_file():
        raise FileNotFoundError(f"{tree}: no cuflash/__init__.py")
    spec = importlib.util.spec_from_file_location(alias, init,
                                                  submodule_search_locations=[str(init.parent)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[alias] = module
    spec.loader.exec_module(module)
    return module


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


def write_report(out: Path, stem: str, title: str, env: dict, rows, table: str,
                 versions) -> None:
    """<stem>.json (``env``, how inputs reached JAX, the rows) and <stem>.md (a line of the
    command, date and ``versions`` of ``env``, then ``table``) in ``out``."""
    env = {**env, "handover": dict(HANDOVER)}
    (out / f"{stem}.json").write_text(json.dumps({**env, "rows": rows}, indent=1) + "\n")
    (out / f"{stem}.md").write_text(
        f"# {title} on {env['device']}\n\n`{env['command']}`, {env['date']}; "
        + ", ".join(f"{k} {env.get(k)}" for k in versions)
        + f"; inputs handed to JAX by: {env['handover'] or '-'}\n\n" + table)


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
def run_torch(backend, mode, q, k, v, dout, causal, per_call=False):
    """torch SDPA with ``backend`` (an SDPBackend name) on the same buffers, zero-copy through
    DLPack; yields the zero-argument call to time. "fwd" returns SDPA's output, of layout
    (batch, nheads, seqlen, headdim); "bwd" is timed alone, on a retained graph, and returns
    dq, dk, dv of layout (batch, seqlen, nheads, headdim); "fwdbwd" is both. The backend is
    torch's global state, chosen around the yield, or with ``per_call`` inside each call
    (the sweep, whose implementations take turns with their calls open at once)."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    sdpa = torch.nn.functional.scaled_dot_product_attention
    leaves = [torch.from_dlpack(x).requires_grad_(mode != "fwd") for x in (q, k, v)]
    # SDPA takes (batch, nheads, seqlen, headdim): transposed views of the same memory.
    tq, tk, tv = (x.transpose(1, 2) for x in leaves)
    tdout = torch.from_dlpack(dout).transpose(1, 2)
    backend = getattr(SDPBackend, backend)
    each = sdpa_kernel if per_call else lambda _: contextlib.nullcontext()

    def forward():
        with each(backend):
            return sdpa(tq, tk, tv, is_causal=causal)

    # autograd.grad rather than .backward(): no accumulation into .grad inside the timing.
    # A graph's backward is that of the backend its forward ran with.
    with contextlib.nullcontext() if per_call else sdpa_kernel(backend):
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


# ---------------------------------------------------------------------------- JAX peers

class Skipped(Exception):
    """An implementation declines a shape, or its library is missing (a gap in the row)."""


# name -> (what it is, the largest head dim it takes or None)
JAX_PEERS = {
    "jax-cudnn": ('jax.nn.dot_product_attention(implementation="cudnn")', None),
    "fa3": ("flash_attn3_jax.flash_mha (FlashAttention-3 behind XLA FFI)", 128),
    "cuflash-jax": ("cuflash.jax.attention (buffer_callback)", None),
    "jax-xla": ('jax.nn.dot_product_attention(implementation="xla") (a CPU stand-in)', None),
}
HANDOVER: dict = {}    # how inputs reached JAX, per implementation: "dlpack" or "copied"


def load_jax(gpu: bool = True):
    """(jax, None), or (None, why not); with ``gpu``, JAX must run on a GPU. Set
    XLA_PYTHON_CLIENT_PREALLOCATE=false before the first import of JAX (the scripts do it
    at their top), or JAX takes 75% of the GPU memory."""
    try:
        import jax
    except Exception as e:  # not installed, or its plugin does not load
        return None, f"jax does not import ({type(e).__name__}: {e})"
    try:
        backend = jax.default_backend()
    except Exception as e:
        return None, f"jax {jax.__version__} has no backend ({type(e).__name__}: {e})"
    if gpu and backend != "gpu":
        return None, f"jax {jax.__version__} runs on {backend}, not on a GPU"
    return jax, None


def to_jax(x):
    """(JAX array, how): zero-copy through DLPack where JAX takes the array, else one copy
    through the host (outside any timing)."""
    import jax
    try:
        return jax.dlpack.from_dlpack(x), "dlpack"
    except Exception:  # a dtype or device DLPack does not carry here
        host = x.get() if hasattr(x, "get") else np.asarray(x)
        return jax.device_put(host), "copied"


def jax_attend(name: str, causal: bool):
    """``attend(q, k, v)`` of the JAX implementation ``name`` (a key of JAX_PEERS) on
    (batch, seqlen, nheads, headdim) arrays; Skipped when its library does not import."""
    import jax
    if name in ("jax-cudnn", "jax-xla"):
        implementation = name.removeprefix("jax-")
        return lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=causal, implementation=implementation)
    if name == "fa3":
        try:
            import flash_attn3_jax
        except Exception as e:
            raise Skipped(f"flash_attn3_jax does not import ({type(e).__name__}: {e})")
        return lambda q, k, v: flash_attn3_jax.flash_mha(q, k, v, is_causal=causal)
    if name == "cuflash-jax":
        import cuflash.jax
        return lambda q, k, v: cuflash.jax.attention(q, k, v, causal=causal)
    raise KeyError(name)


@functools.lru_cache(maxsize=None)
def jax_jitted(name: str, causal: bool):
    """(forward, step) of ``name``, jitted once per process so that every row of a shape
    reuses the compiled programs: ``forward(q, k, v)`` the output, ``step(q, k, v, dout)``
    the gradients dq, dk, dv through ``jax.vjp`` (forward + backward, as in training)."""
    import jax
    attend = jax_attend(name, causal)

    def step(q, k, v, dout):
        return jax.vjp(attend, q, k, v)[1](dout)

    return jax.jit(attend), jax.jit(step)


@contextlib.contextmanager
def run_jax(name, mode, q, k, v, dout, causal):
    """The jitted JAX implementation ``name`` on q, k, v, dout (handed over by DLPack, else
    copied once here, outside the timing); yields for "fwd" the forward, for "fwdbwd" the
    vjp step (forward + backward), for "bwd" ``Difference(step, forward)``."""
    limit = JAX_PEERS[name][1]
    if limit is not None and q.shape[-1] > limit:
        raise Skipped(f"head dim {q.shape[-1]} > {limit} (the wheel's largest)")
    forward, step = jax_jitted(name, causal)
    handed = [to_jax(x) for x in (q, k, v, dout)]
    HANDOVER[name] = "copied" if any(how == "copied" for _, how in handed) else "dlpack"
    jq, jk, jv, jdout = (array for array, _ in handed)

    def call_forward():
        return forward(jq, jk, jv)

    def call_step():
        return step(jq, jk, jv, jdout)

    if mode == "fwd":
        yield call_forward
    elif mode == "bwd":
        yield Difference(call_step, call_forward)
    else:
        yield call_step


def host_float32(x):
    """A CuPy, torch, JAX or NumPy array as a float32 NumPy array (for output checks)."""
    if hasattr(x, "get"):
        x = x.get()
    elif hasattr(x, "detach"):
        return x.detach().float().cpu().numpy()
    return np.asarray(x).astype(np.float32)


def versions() -> dict:
    """Versions of the optional peers' libraries (None where they do not import)."""
    found = {}
    for name in ("torch", "jax", "flash_attn3_jax"):
        module = sys.modules.get(name)
        if module is None:
            try:
                module = __import__(name)
            except Exception:
                module = None
        found[name] = getattr(module, "__version__", None)
    return found
