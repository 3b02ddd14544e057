r"""Benchmark sweep: cuflash against the attention its users would otherwise pick, on the
standard FlashAttention shapes, every implementation in one process on the same inputs,
timed the same way.

    PYTHONPATH=. python3 bench/sweep.py --out bench/results/<name> --dtypes bf16
    PYTHONPATH=. python3 bench/sweep.py --out /tmp/quick --quick --modes fwd
    PYTHONPATH=. python3 bench/sweep.py --out /tmp/dry --dry-run          # CPU, seconds

Shapes (CONVENTIONS.md, "Measuring speed"): hidden 2048 (nheads = 2048 // headdim),
batch = 16384 // seqlen; by default seqlen 1k, 4k and 16k (``--all-seqlens``: 512 to 16k)
and head dims 64, 128 and 256 (the tables of issues 13 and 14), causal and not, forward
and backward, bf16 and fp16 (``--dtypes``).

Implementations (a library that does not import, or a shape it declines, leaves a gap in
the row with the reason, never a crash):
- cuflash: ``cuflash.attention_forward`` and ``attention_backward`` on CuPy arrays.
- torch-cudnn, torch-flash (FlashAttention-2): torch SDPA under ``sdpa_kernel(backend)`` on
  the same buffers, zero-copy through DLPack (transposed views).
- jax-cudnn: ``jax.jit(jax.nn.dot_product_attention(q, k, v, is_causal=...,
  implementation="cudnn"))``, inputs handed over zero-copy by DLPack (else copied once,
  outside the timing; sweep.json's "handover" says which).
- fa3: ``jax.jit(flash_attn3_jax.flash_mha(q, k, v, is_causal=...))``, same inputs; the
  0.2.3 wheel is built for head dims up to 128, so head dim 256 is a gap.
On request (``--impls``): torch-efficient, naive-cupy (matmul, softmax, matmul in the input
dtype), cuflash-varlen (the varlen API on the same tokens), cuflash-mma (the sm_80 mma.sync
kernels on sm_90), cuflash-jax (``jax.jit(cuflash.jax.attention)``), jax-xla.

Modes: "fwd" the forward; "bwd" the backward alone: cuflash's ``attention_backward`` on a
saved forward, torch's ``autograd.grad`` on a retained graph, and for JAX (whose backward
cannot be called alone) the jitted ``jax.vjp`` step (forward + backward) minus the jitted
forward, each timed in its turn; "fwdbwd" both.

Timing, the same for every implementation (JAX runs on its own stream, so CUDA events on
CuPy's or torch's stream would not see its work): warm-up calls (compilation, autotuning),
then N calls back to back and one synchronisation at the end (``jax.block_until_ready`` of
the last result, then ``cudaDeviceSynchronize``, which waits for every stream), timed on the
host clock; N fills about 40 ms (_common.Runner). The implementations of a row take turns:
6 rounds, each running every one of them once, in the row's order and in reverse by turns;
each keeps the median of its 6 runs. The GPU's clock drifts with its temperature (an H100
fell from 1680 to 1300 MHz within seconds of calls), so timing one implementation after
the other decided rows by which one met the lower clock; in turns every column sees the
same drift. sweep.json records each run (``runs_ms``) and the median SM clock read after
them (``mhz``, NVML). Before the first row the GPU runs large matmuls for a second, to
reach its full clock. In every forward row each implementation's output is compared once
with cuflash's (the first 256 positions of two batch items; relative to its largest
value), which catches a layout or argument mistake in a peer; a difference above 5% is
listed under "Output check".

Report: TFLOP/s per implementation, the best peer of the row (cuDNN and FA2 through torch,
cuDNN through JAX, FA3; not cuflash's own variants nor the naive one) and cuflash's ratio to
it; per mode and dtype a summary: the median ratio over the head dim 64 and 128 rows, the
minimum over those rows with seqlen >= 4k, and at head dim 256 the minimum ratio to the
better cuDNN (torch or JAX), where a peer ran; with cuflash's variants (OPTIONS), each
one's speed against the plain call (min, with its row, and median). sweep.json (every
number, with device and versions) and sweep.md are rewritten after every row, so a run
stopped early keeps what it measured; sweep.png (TFLOP/s against seqlen) at the end (when
matplotlib imports). ``--stop-after S`` starts no new shape after S seconds and finishes
the report.

On the device (H200; the runner executes in the repository root, writes under $OUT, brings
back at most 8 files, 10 minutes a call). FA3 comes from the carried wheels (carry:
[".whl"], filled once in the checkout as DEVICE.md says, with ``einops`` beside
``flash-attn3-jax==0.2.3``: the wheel imports it and the device may lack it). Estimate, with
the cuflash kernels already in CUPY_CACHE_DIR (the runbook's precompile, or an earlier call on
the same warm machine; cold, add minutes of NVRTC): imports and warm-up ~20 s; 36 rows a
dtype, each ~1.5-2.5 s (five implementations, the JAX backward measured twice); ~50 JAX
compilations a dtype at ~1 s; so ~3-4 minutes a dtype. Both dtypes in one call, bf16 first,
``--stop-after`` ending it in time (what was cut is measured by a second call with
``--dtypes fp16``):

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl; \
    export PYTHONPATH=.:/tmp/site PYTHONUNBUFFERED=1 CUPY_CACHE_DIR=/tmp/cfcache \
        XLA_PYTHON_CLIENT_PREALLOCATE=false; \
    timeout 580 python3 bench/sweep.py --out $OUT/sweep --dtypes bf16,fp16 --stop-after 500 \
        2>&1 | tee $OUT/sweep.log

Four files come back: sweep.json, sweep.md, sweep.png and the log; the summary lines are
those of the log that start with "summary:" (and sweep.md's "## Summary").
"""
from __future__ import annotations

import os

# Before anything can import JAX: without it JAX takes 75% of the GPU memory.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse  # noqa: E402 (after the environment variable above)
import contextlib  # noqa: E402
import datetime  # noqa: E402
import functools  # noqa: E402
import importlib  # noqa: E402
import itertools  # noqa: E402
import math  # noqa: E402
import shlex  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable, NamedTuple  # noqa: E402

import numpy as np  # noqa: E402

import _common  # noqa: E402
from _common import (DTYPES, JAX_PEERS, TORCH_BACKENDS, Difference, Runner,  # noqa: E402
                     Skipped, Timing, cuflash_launches, flops, host_float32, make_inputs,
                     run_jax, run_torch, standard_shape, summary_of_runs, turns)

SEQLENS = (1024, 4096, 16384)
ALL_SEQLENS = (512, 1024, 2048, 4096, 8192, 16384)
QUICK_SEQLENS = (1024, 4096)
DRY_SEQLENS = (64, 128)
HEADDIMS = (64, 128, 256)
CAUSAL = {"no": (False,), "yes": (True,), "both": (False, True)}
MODES = ("fwd", "bwd", "fwdbwd")
DEFAULT_MODES = ("fwd", "bwd")
# The naive peer materialises (batch, nheads, seqlen, seqlen) scores in the input dtype, and
# its softmax and backward hold a few such matrices at once.
NAIVE_BUDGET = 8 * 2 ** 30
TIMING = {"full": Timing(budget_ms=40.0, min_calls=3, max_calls=200, reps=3),
          "quick": Timing(budget_ms=20.0, min_calls=2, max_calls=50, reps=3),
          "dry": Timing(budget_ms=2.0, min_calls=1, max_calls=3, reps=2, warmup=1)}
WARM_UP_SECONDS = 1.0  # of large matmuls before the first row, to bring the GPU to full clock
# A dry run on the CPU: the sweep's code paths at shapes the NumPy backend does in moments.
DRY = {"tokens": 256, "hidden": 256}
# The summary's groups (issues 13 and 14): head dims whose median counts, the seqlen from
# which every row counts, and the head dim judged against cuDNN alone.
MAIN_HEADDIMS, LONG_SEQLEN, CUDNN_HEADDIM = (64, 128), 4096, 256
CUDNN = ("torch-cudnn", "jax-cudnn")
CHECK_POSITIONS, CHECK_ITEMS, CHECK_LIMIT = 256, 2, 0.05


# Each implementation is a context manager taking (mode, q, k, v, dout, causal) that does
# its untimed setup (a forward whose outputs the timed backward reads) and yields the
# zero-argument callable to time. Arrays are (batch, seqlen, nheads, headdim).

def timed_call(mode, forward, backward):
    """The callable to time for ``mode``: ``forward()``, ``backward(*saved forward)`` (the
    forward run once here, untimed), or both in sequence."""
    if mode == "fwd":
        return forward
    if mode == "bwd":
        saved = forward()
        return lambda: backward(*saved)
    return lambda: backward(*forward())


@contextlib.contextmanager
def run_cuflash(mode, q, k, v, dout, causal, options=None, tree=None):
    """cuflash; ``options`` (one of OPTIONS' values): with deterministic=True, soft-cap or
    ALiBi slopes; ``tree``: the cuflash package of another source tree (--trees)."""
    import cupy
    cuflash = tree or importlib.import_module("cuflash")
    options = options or {}
    kw = {"causal": causal}
    if options.get("softcap"):
        kw["softcap"] = options["softcap"]
    if options.get("alibi"):
        nheads = q.shape[2]
        kw["alibi_slopes"] = cupy.asarray(2.0 ** (-8.0 * np.arange(1, nheads + 1) / nheads),
                                          dtype=cupy.float32)
    det = bool(options.get("deterministic"))

    def forward():
        return cuflash.attention_forward(q, k, v, **kw)

    def backward(out, lse):
        return cuflash.attention_backward(dout, q, k, v, out, lse, deterministic=det, **kw)

    yield timed_call(mode, forward, backward)


# cuflash with one option, timed beside the plain call: issue 14 bounds the backward's
# speed with it (deterministic >= 0.85x the plain one, soft-cap and ALiBi >= 0.9x).
OPTIONS = {"cuflash-det": {"deterministic": True}, "cuflash-softcap": {"softcap": 30.0},
           "cuflash-alibi": {"alibi": True}}


@contextlib.contextmanager
def run_cuflash_varlen(mode, q, k, v, dout, causal):
    """The varlen API on the same tokens: the batch packed as equal-length sequences
    (reshaped views, no copies). The CuPy prefix sums are checked on the device (one small
    launch after each call), not copied to the host."""
    import cupy
    import cuflash
    batch, seqlen = q.shape[:2]
    cu = cupy.arange(0, (batch + 1) * seqlen, seqlen, dtype=cupy.int32)
    q, k, v, dout = (x.reshape(batch * seqlen, *x.shape[2:]) for x in (q, k, v, dout))
    packing = (cu, cu, seqlen, seqlen)

    def forward():
        return cuflash.attention_varlen_forward(q, k, v, *packing, causal=causal)

    def backward(out, lse):
        return cuflash.attention_varlen_backward(dout, q, k, v, out, lse, *packing,
                                                 causal=causal)

    yield timed_call(mode, forward, backward)


@contextlib.contextmanager
def run_cuflash_mma(mode, q, k, v, dout, causal):
    """cuflash with the Hopper (wgmma) kernels switched off: the dense mma.sync kernels
    (the path of Ampere and Ada GPUs, and of the options the Hopper kernels do not take)."""
    from cuflash import ops
    config = ops.forward.mma_config(q.dtype, q.shape[3], False, False)
    forward, backward = cuflash_launches(q, k, v, causal, fwd_config=config, bwd_hopper=False)
    yield timed_call(mode, forward, lambda out, lse: backward(dout, out, lse))


@contextlib.contextmanager
def run_naive(mode, q, k, v, dout, causal):
    """Matmul, softmax, matmul in the input dtype; backward by the textbook formulas."""
    import cupy
    batch, seqlen, nheads, headdim = q.shape
    scores = batch * nheads * seqlen * seqlen * q.dtype.itemsize
    if scores > NAIVE_BUDGET:
        raise Skipped(f"score matrix {scores / 2**30:.0f} GiB > budget "
                      f"{NAIVE_BUDGET / 2**30:.0f} GiB")
    scale = headdim ** -0.5
    qh, kh, vh, doh = (x.transpose(0, 2, 1, 3) for x in (q, k, v, dout))
    if causal:
        bias = cupy.triu(cupy.full((seqlen, seqlen), -cupy.inf, cupy.float32), 1)
        bias = bias.astype(q.dtype)

    def forward():
        p = qh @ kh.transpose(0, 1, 3, 2)
        p *= scale
        if causal:
            p += bias
        p -= p.max(axis=-1, keepdims=True)
        cupy.exp(p, out=p)
        p /= p.sum(axis=-1, keepdims=True)
        return p @ vh, p

    def backward(out, p):
        dv = p.transpose(0, 1, 3, 2) @ doh
        ds = doh @ vh.transpose(0, 1, 3, 2)
        ds -= (doh * out).sum(axis=-1, keepdims=True)
        ds *= p
        ds *= scale
        return ds @ kh, ds.transpose(0, 1, 3, 2) @ qh, dv

    yield timed_call(mode, forward, backward)


# ------------------------------------------------------------------- the implementations

class Impl(NamedTuple):
    """``run(mode, q, k, v, dout, causal)``: a context manager yielding the call to time;
    ``family``: how its forward's output is laid out (cuflash, torch, naive, jax); ``peer``:
    whether it counts for the best peer of a row."""
    run: Callable
    family: str
    peer: bool


def unavailable(reason: str):
    """A ``run`` that leaves a gap with ``reason`` (its library does not import)."""
    @contextlib.contextmanager
    def run(*args):
        raise Skipped(reason)
        yield  # a generator, as contextmanager needs

    return run


DEFAULT_IMPLS = ("cuflash", "torch-cudnn", "torch-flash", "jax-cudnn", "fa3")
DRY_IMPLS = ("cuflash", "cuflash-jax", "jax-xla", "jax-cudnn", "fa3", "torch-cudnn")
PEERS = ("torch-cudnn", "torch-flash", "torch-efficient", "jax-cudnn", "fa3", "jax-xla")


def registry(torch_why: str | None, jax_why: str | None) -> dict:
    """Every implementation the sweep knows, by name; those whose library is missing leave
    gaps with the reason."""
    impls = {"cuflash": Impl(run_cuflash, "cuflash", False)}
    for name, backend in TORCH_BACKENDS.items():
        run = (unavailable(torch_why) if torch_why else
               functools.partial(run_torch, backend, per_call=True))
        impls[name] = Impl(run, "torch", name in PEERS)
    for name in JAX_PEERS:
        run = unavailable(jax_why) if jax_why else functools.partial(run_jax, name)
        impls[name] = Impl(run, "jax", name in PEERS)
    impls.update({"naive-cupy": Impl(run_naive, "naive", False),
                  "cuflash-varlen": Impl(run_cuflash_varlen, "cuflash", False),
                  "cuflash-mma": Impl(run_cuflash_mma, "cuflash", False)})
    impls.update({name: Impl(functools.partial(run_cuflash, options=options), "variant", False)
                  for name, options in OPTIONS.items()})
    return impls


def select(names, known: dict) -> dict:
    unknown = [n for n in names if n not in known]
    if unknown:
        sys.exit(f"sweep.py: unknown implementation(s) {', '.join(unknown)} "
                 f"(known: {', '.join(known)})")
    return {n: known[n] for n in names}


def tree_impls(impls: dict, trees) -> dict:
    """``impls`` with cuflash and its variants replaced by one implementation per source
    tree, "NAME@TREE", each calling that tree's cuflash (_common.load_tree): an A/B of
    commits whose runs take turns in one process (the trees' columns meet the same clocks).
    Peers stay as they are."""
    modules = {tree: _common.load_tree(tree, f"cuflash_tree{i}") for i, tree in
               enumerate(trees)}
    found = {}
    for name, impl in impls.items():
        if name == "cuflash" or name in OPTIONS:
            for tree, module in modules.items():
                found[f"{name}@{tree}"] = Impl(
                    functools.partial(run_cuflash, options=OPTIONS.get(name), tree=module),
                    impl.family, False)
        else:
            found[name] = impl
    return found


# ------------------------------------------------------------------------------ measuring

def describe(error: BaseException) -> str:
    first_line = (str(error).strip().splitlines() or [""])[0][:200]
    return f"{type(error).__name__}: {first_line}"


def output_sample(family: str, result, shape):
    """The first CHECK_POSITIONS positions of the first CHECK_ITEMS batch items of a
    forward's output, as float32 NumPy of layout (batch, seqlen, nheads, headdim)."""
    out = result[0] if family in ("cuflash", "naive") else result
    if family in ("torch", "naive"):  # (batch, nheads, seqlen, headdim)
        out = out.swapaxes(1, 2)
    if out.ndim == 3:  # varlen: the batch packed as tokens
        out = out.reshape(shape)
    return host_float32(out[:CHECK_ITEMS, :CHECK_POSITIONS])


def difference(sample, reference):
    """max |sample - reference| / max |reference|, or why they cannot be compared."""
    if sample.shape != reference.shape:
        return f"shape {sample.shape} != {reference.shape}"
    scale = float(np.abs(reference).max()) or 1.0
    return float(np.abs(sample - reference).max()) / scale


def with_tflops(timed: dict, row_flops: float) -> dict:
    if timed["ms"] <= 0:
        raise ValueError(f"time {timed['ms']:.4f} ms <= 0 (a difference of "
                         f"{timed.get('total_ms')} and {timed.get('part_ms')} ms)")
    return {**timed, "tflops": row_flops / timed["ms"] / 1e9}


def score(results: dict, peers) -> tuple[str | None, float | None]:
    """(the best peer of a row by TFLOP/s, cuflash's ratio to it), None where absent."""
    ran = [n for n in peers if "tflops" in results.get(n, {})]
    if not ran:
        return None, None
    best = max(ran, key=lambda n: results[n]["tflops"])
    ours = results.get("cuflash", {})
    return best, (ours["tflops"] / results[best]["tflops"] if "tflops" in ours else None)


def make_row(mode, dtype, headdim, causal, seqlen, batch, nheads, results, peers) -> dict:
    best, ratio = score(results, peers)
    return {"mode": mode, "dtype": dtype, "headdim": headdim, "causal": causal,
            "seqlen": seqlen, "batch": batch, "nheads": nheads,
            "flops": flops(mode, batch, nheads, seqlen, headdim, causal),
            "results": results, "best_peer": best, "ratio": ratio}


def shape_rows(impls: dict, inputs, dtype: str, causals, modes, timing, sync,
               release=lambda: None, check=True, clock=None):
    """Rows of one shape (the inputs' (batch, seqlen, nheads, headdim)), one per (causal,
    mode); yields each row when it is complete. Every implementation of the row is set up
    and warmed up first (_common.Runner: a Difference's total and part each), then timed
    in 2 x ``timing.reps`` turns, each running every one of them once, in the row's order
    and in reverse by turns; an implementation's time is the median of its runs
    (``runs_ms``). A GPU whose clock drifts with its temperature (an H100 fell from 1680 to
    1300 MHz within seconds of calls) then slows every column of the row alike, where
    timing one implementation after the other gave the later ones the lower clock.
    ``clock()`` (the SM MHz, or None) is read after each run: ``mhz``, the median. An
    implementation that fails (a library missing, a shape declined, out of memory, at set-up
    or in a turn) is a gap in the row, its memory released at once. Forward rows compare
    each output with the first one's (``check_against``)."""
    batch, seqlen, nheads, headdim = inputs[0].shape
    peers = [n for n, impl in impls.items() if impl.peer]
    for causal, mode in itertools.product(causals, modes):
        row_flops = flops(mode, batch, nheads, seqlen, headdim, causal)
        results = {name: {} for name in impls}
        opened, runners, reference = {}, {}, None

        def drop(name, error):
            results[name] = {"error": describe(error)}
            runners.pop(name, None)
            try:
                opened.pop(name).close()
            except Exception:  # its context's exit failed too: the gap says why already
                pass
            release()

        for name, impl in impls.items():
            opened[name] = contextlib.ExitStack()
            try:
                fn = opened[name].enter_context(impl.run(mode, *inputs, causal))
                parts = [fn.total, fn.part] if isinstance(fn, Difference) else [fn]
                runners[name] = [Runner(f, timing, sync) for f in parts]
                if check and mode == "fwd" and impl.family != "variant":  # variants differ
                    sample = output_sample(impl.family, fn(), inputs[0].shape)
                    if reference is None:
                        reference = name, sample
                    else:
                        results[name] = {"check": difference(sample, reference[1]),
                                         "check_against": reference[0]}
            except Exception as e:
                drop(name, e)
        runs = {name: [[] for _ in parts] for name, parts in runners.items()}
        mhz = {name: [] for name in runners}
        for name in turns(list(runners), 2 * timing.reps):
            if name not in runners:  # failed in an earlier turn
                continue
            try:
                for runner, times in zip(runners[name], runs[name]):
                    times.append(runner.run())
            except Exception as e:  # out of memory in a turn
                drop(name, e)
                continue
            try:
                now = clock() if clock is not None else None
            except Exception:  # NVML gone: the row without clocks
                now = None
            if now is not None:
                mhz[name].append(now)
        for name, parts in list(runners.items()):
            timed = summary_of_runs(runs[name][0], runs[name][1] if len(parts) > 1 else None,
                                    parts[0].calls)
            if mhz[name]:
                timed["mhz"] = statistics.median(mhz[name])
            try:
                results[name].update(with_tflops(timed, row_flops))
            except ValueError as e:  # a Difference's part as long as its total
                results[name] = {"error": describe(e)}
        for name in list(opened):
            try:
                opened.pop(name).close()
            except Exception as e:
                results[name] = {"error": describe(e)}
        release()
        yield make_row(mode, dtype, headdim, causal, seqlen, batch, nheads, results, peers)


# -------------------------------------------------------------------------------- report

def summarise(rows) -> list[dict]:
    """Per (mode, dtype): the median ratio to the best peer over the head dim 64/128 rows,
    the minimum over those rows at seqlen >= 4k, and at head dim 256 the minimum ratio to
    the better cuDNN (torch or JAX); none where no peer ran."""
    found = []
    for mode, dtype in dict.fromkeys((r["mode"], r["dtype"]) for r in rows):
        group = [r for r in rows if (r["mode"], r["dtype"]) == (mode, dtype)]
        if not any("tflops" in r["results"].get(name, {}) for r in group for name in PEERS):
            continue  # no peer ran: cuflash's variants alone (options), or trees
        main = [r["ratio"] for r in group
                if r["headdim"] in MAIN_HEADDIMS and r["ratio"] is not None]
        long = [r["ratio"] for r in group if r["headdim"] in MAIN_HEADDIMS
                and r["seqlen"] >= LONG_SEQLEN and r["ratio"] is not None]
        cudnn = [x for x in (score(r["results"], CUDNN)[1] for r in group
                             if r["headdim"] == CUDNN_HEADDIM) if x is not None]
        found.append({"mode": mode, "dtype": dtype,
                      "median": statistics.median(main) if main else None,
                      "median_rows": len(main),
                      "min_long": min(long) if long else None, "min_long_rows": len(long),
                      "min_cudnn_256": min(cudnn) if cudnn else None,
                      "cudnn_256_rows": len(cudnn)})
    return found


def fmt(x, digits=2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def fmt_tflops(x) -> str:
    """One decimal, or two significant digits below 1 (the CPU dry run's tiny shapes)."""
    return "-" if x is None else f"{x:.1f}" if x >= 1 else f"{x:.2g}"


def summary_line(s: dict) -> str:
    return (f"{s['mode']} {s['dtype']}: cuflash / best peer, median {fmt(s['median'])} over "
            f"{s['median_rows']} head dim 64/128 rows, min {fmt(s['min_long'])} over the "
            f"{s['min_long_rows']} of them at seqlen >= {LONG_SEQLEN}; head dim "
            f"{CUDNN_HEADDIM}: min {fmt(s['min_cudnn_256'])} of the better cuDNN over "
            f"{s['cudnn_256_rows']} rows")


def variant_lines(rows) -> list:
    """Per (mode, dtype, variant of OPTIONS): its speed as a fraction of the plain cuflash
    call's on the same rows (min, with its row, and median)."""
    lines = []
    for (mode, dtype), name in itertools.product(
            dict.fromkeys((r["mode"], r["dtype"]) for r in rows), OPTIONS):
        ratios = [(r["results"][name]["tflops"] / r["results"]["cuflash"]["tflops"], r)
                  for r in rows if (r["mode"], r["dtype"]) == (mode, dtype)
                  and "tflops" in r["results"].get(name, {})
                  and "tflops" in r["results"].get("cuflash", {})]
        if ratios:
            low, row = min(ratios, key=lambda x: x[0])
            where = (f"hd{row['headdim']} {'causal' if row['causal'] else 'full'} "
                     f"{row['seqlen']}")
            lines.append(f"{mode} {dtype}: {name} / cuflash (speed), min {low:.2f} ({where}), "
                         f"median {statistics.median(x for x, _ in ratios):.2f} over "
                         f"{len(ratios)} rows")
    return lines


def progress(row, index: int, total: int) -> str:
    cells = [f"{name} {r['tflops']:.1f}" if "tflops" in r else f"{name} -"
             for name, r in row["results"].items()]
    best = (f" | /{row['best_peer']} {row['ratio']:.2f}" if row["ratio"] is not None
            else "")
    return (f"[{index:>3}/{total}] {row['mode']:6} {row['dtype']} hd{row['headdim']:<3} "
            f"{'causal' if row['causal'] else 'full  '} seqlen {row['seqlen']:>5}: TFLOP/s "
            + " | ".join(cells) + best)


def tree_lines(rows, names) -> list:
    """With --trees: per row and implementation, each tree's TFLOP/s (the range of its
    runs) and its ratio to the first tree's."""
    groups = {}
    for name in names:
        if "@" in name:
            base, tree = name.split("@", 1)
            groups.setdefault(base, []).append(tree)
    if not groups:
        return []
    lines = ["", "## Trees: TFLOP/s (the runs' range) and the ratio to the first tree", ""]
    for base, trees in groups.items():
        lines += ["| mode | dtype | hd | causal | seqlen | impl | " + " | ".join(
                      f"`{t}`" for t in trees) + " | " + " | ".join(
                      f"`{t}` / `{trees[0]}`" for t in trees[1:]) + " |",
                  "|---|---|---:|---|---:|---|" + "---:|" * (2 * len(trees) - 1)]
        for row in rows:
            got = [row["results"].get(f"{base}@{t}", {}) for t in trees]
            if not all("tflops" in g for g in got):
                continue
            cells = [f"{g['tflops']:.1f} ({row['flops'] / max(g['runs_ms']) / 1e9:.0f}-"
                     f"{row['flops'] / min(g['runs_ms']) / 1e9:.0f})" if "part_ms" not in g
                     else f"{g['tflops']:.1f}" for g in got]
            ratios = [f"{g['tflops'] / got[0]['tflops']:.3f}" for g in got[1:]]
            lines.append(f"| {row['mode']} | {row['dtype']} | {row['headdim']} | "
                         f"{'yes' if row['causal'] else 'no'} | {row['seqlen']} | {base} | "
                         + " | ".join(cells + ratios) + " |")
        lines.append("")
    return lines


def markdown(rows, names) -> str:
    lines = []
    for mode, dtype in dict.fromkeys((r["mode"], r["dtype"]) for r in rows):
        lines += [f"## {mode} {dtype}: TFLOP/s, and cuflash / the best peer of the row", "",
                  "| hd | causal | seqlen | batch x heads | " + " | ".join(names)
                  + " | best peer | ratio |",
                  "|---:|---|---:|---|" + "---:|" * len(names) + "---|---:|"]
        for row in rows:
            if (row["mode"], row["dtype"]) != (mode, dtype):
                continue
            cells = [fmt_tflops(row["results"][n].get("tflops")) for n in names]
            lines.append(f"| {row['headdim']} | {'yes' if row['causal'] else 'no'} | "
                         f"{row['seqlen']} | {row['batch']} x {row['nheads']} | "
                         + " | ".join(cells)
                         + f" | {row['best_peer'] or '-'} | {fmt(row['ratio'])} |")
        lines.append("")
    lines += ["## Summary", ""] + [f"- {summary_line(s)}" for s in summarise(rows)]
    lines += [f"- {line}" for line in variant_lines(rows)]
    if any(r["mode"] == "bwd" and "total_ms" in res for r in rows
           for res in r["results"].values()):
        lines += ["", "JAX backward = its jitted jax.vjp step (forward + backward) minus its "
                      "jitted forward, each timed in its turn."]
    suspects = sorted({(r["mode"], r["headdim"], r["causal"], r["seqlen"], n,
                        res["check_against"], res["check"])
                       for r in rows for n, res in r["results"].items()
                       if "check" in res and (isinstance(res["check"], str)
                                              or res["check"] > CHECK_LIMIT)}, key=str)
    if suspects:
        lines += ["", "## Output check", "",
                  f"Forward outputs that differ from the reference by more than "
                  f"{CHECK_LIMIT:.0%} of its largest value (a layout or argument mistake?):",
                  ""] + [f"- {m} hd {h} {'causal' if c else 'full'} seqlen {s}: {n} against "
                         f"{ref}: {fmt(d, 3) if isinstance(d, float) else d}"
                         for m, h, c, s, n, ref, d in suspects]
    lines += tree_lines(rows, names)
    errors = sorted({(n, res["error"]) for r in rows for n, res in r["results"].items()
                     if "error" in res})
    if errors:
        lines += ["", "## Gaps", ""] + [f"- {n}: {e}" for n, e in errors]
    return "\n".join(lines) + "\n"


def plot(rows, names, path: Path) -> str:
    """sweep.png: one panel per (mode, dtype) x (headdim, causal), one line per
    implementation. Returns what it did."""
    try:
        import matplotlib
    except ImportError as e:
        return f"no plot ({describe(e)})"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    grid_rows = list(dict.fromkeys((r["mode"], r["dtype"]) for r in rows))
    grid_cols = list(dict.fromkeys((r["headdim"], r["causal"]) for r in rows))
    if not grid_rows:
        return "no plot (no rows)"
    fig, axes = plt.subplots(len(grid_rows), len(grid_cols), squeeze=False,
                             figsize=(4 * len(grid_cols), 3 * len(grid_rows)))
    lines = {}
    for (i, (mode, dtype)), (j, (headdim, causal)) in itertools.product(
            enumerate(grid_rows), enumerate(grid_cols)):
        ax = axes[i][j]
        panel = [r for r in rows if (r["mode"], r["dtype"], r["headdim"], r["causal"])
                 == (mode, dtype, headdim, causal)]
        for color, name in enumerate(names):
            points = [(r["seqlen"], r["results"][name]["tflops"]) for r in panel
                      if "tflops" in r["results"][name]]
            if points:
                lines[name], = ax.plot(*zip(*points), marker="o", color=f"C{color}")
        seqlens = [r["seqlen"] for r in panel]
        ax.set_xscale("log", base=2)
        ax.set_xticks(seqlens, [str(s) for s in seqlens], fontsize=7)
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_ylim(bottom=0)
        ax.set_title(f"{mode} {dtype} hdim {headdim} {'causal' if causal else 'full'}",
                     fontsize=9)
        ax.set_xlabel("seqlen", fontsize=8)
        ax.set_ylabel("TFLOP/s", fontsize=8)
    fig.legend(lines.values(), lines.keys(), loc="upper center", ncol=max(1, len(lines)))
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / fig.get_figheight()))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return f"wrote {path.name}"


def write_results(out: Path, env, rows, names) -> str:
    """sweep.json and sweep.md of the rows so far; returns the tables."""
    table = markdown(rows, names)
    _common.write_report(out, "sweep", "sweep", {**env, "summary": summarise(rows)}, rows,
                         table, ("cuflash", "cupy", "torch", "jax", "flash_attn3_jax"))
    return table


# ------------------------------------------------------------------------------- running

def comma_list(convert=str, choices=None):
    def parse(text):
        items = [convert(x) for x in text.split(",") if x]
        bad = [x for x in items if choices is not None and x not in choices]
        if bad or not items:
            hint = f"choose from {', '.join(choices)}" if choices else "give a comma-separated list"
            raise argparse.ArgumentTypeError(f"{text!r}: {hint}")
        return items
    return parse


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description="Benchmark cuflash against its peers (torch SDPA cuDNN and FA2, JAX "
                    "cuDNN, FA3) on the standard sweep, every implementation timed alike "
                    "(TFLOP/s and the ratio to the best peer per row; needs a CUDA GPU, "
                    "except --dry-run).")
    parser.add_argument("--out", type=Path, required=True,
                        help="folder for sweep.json, sweep.md and sweep.png")
    parser.add_argument("--dtypes", type=comma_list(choices=DTYPES), default=list(DTYPES),
                        help="comma-separated: bf16,fp16 (default both)")
    parser.add_argument("--headdims", type=comma_list(int), default=list(HEADDIMS),
                        help=f"comma-separated (default {','.join(map(str, HEADDIMS))})")
    parser.add_argument("--seqlens", type=comma_list(int),
                        help=f"comma-separated (default {','.join(map(str, SEQLENS))}; "
                             f"with --quick {','.join(map(str, QUICK_SEQLENS))})")
    parser.add_argument("--all-seqlens", action="store_true",
                        help=f"seqlens {','.join(map(str, ALL_SEQLENS))}")
    parser.add_argument("--causal", choices=CAUSAL, default="both",
                        help="causal masking: no, yes or both (default)")
    parser.add_argument("--modes", type=comma_list(choices=MODES), default=list(DEFAULT_MODES),
                        help="comma-separated: fwd,bwd,fwdbwd (default fwd,bwd)")
    parser.add_argument("--impls", type=comma_list(),
                        help=f"comma-separated (default {','.join(DEFAULT_IMPLS)}); also "
                             "torch-efficient, naive-cupy, cuflash-varlen, cuflash-mma, "
                             "cuflash-jax, jax-xla")
    parser.add_argument("--quick", action="store_true",
                        help="fewer seqlens and fewer timed calls, for a first look")
    parser.add_argument("--dry-run", action="store_true",
                        help="on the CPU (NumPy backend, JAX on the CPU, jax-xla standing in "
                             "for jax-cudnn) at tiny shapes: every code path, no GPU")
    parser.add_argument("--stop-after", type=float, metavar="SECONDS",
                        help="start no new row after this many seconds, then write the report")
    parser.add_argument("--trees", type=comma_list(),
                        help="comma-separated source trees (git archives of commits; '.' "
                             "this one): cuflash and its variants once per tree, NAME@TREE, "
                             "in turns with each other; sweep.md adds each tree's ratio to "
                             "the first")
    parser.add_argument("--no-check", action="store_true",
                        help="skip the comparison of forward outputs with cuflash's")
    args = parser.parse_args(argv)
    if args.all_seqlens and args.seqlens:
        parser.error("--seqlens and --all-seqlens exclude each other")
    args.seqlens = args.seqlens or list(
        ALL_SEQLENS if args.all_seqlens else DRY_SEQLENS if args.dry_run
        else QUICK_SEQLENS if args.quick else SEQLENS)
    args.impls = args.impls or list(DRY_IMPLS if args.dry_run else DEFAULT_IMPLS)
    return args


def warm_up_gpu(seconds: float = WARM_UP_SECONDS) -> None:
    """Large matmuls for ``seconds``, so the GPU runs at full clock from the first row (after
    a few warm-up calls alone, an idle GPU was seen at 345 MHz in the first rows)."""
    import cupy
    a = cupy.ones((4096, 4096), cupy.float16)
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(10):
            a @ a
        cupy.cuda.Device().synchronize()
    del a
    cupy.get_default_memory_pool().free_all_blocks()


class Setup(NamedTuple):
    """What a run needs besides its arguments: the array module, the sync, the memory
    release between rows, the known implementations, the environment and the SM clock's
    reader (MHz through NVML; None without one)."""
    xp: object
    gpu: bool
    sync: Callable
    release: Callable
    known: dict
    env: dict
    clock: Callable | None = None


def setup(dry_run: bool, argv) -> Setup:
    """The GPU (or the CPU for a dry run), the peers' libraries, and the environment."""
    import cuflash
    gpu = not dry_run
    if gpu:
        cupy = _common.require_gpu()
        torch = _common.import_torch()
        torch_why = None if torch is not None else "torch does not import"
        env = _common.environment(cupy, torch, argv)
        xp = cupy
        release = functools.partial(_common.release_memory, torch)
    else:
        torch_why = "dry run: the torch SDPA backends need CUDA"
        env = {"device": "CPU (dry run)", "cuflash": cuflash.__version__, "cupy": None,
               "numpy": np.__version__,
               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
                   timespec="seconds"),
               "command": shlex.join([sys.executable, *argv])}
        xp = np
        release = lambda: None  # noqa: E731
    _, jax_why = _common.load_jax(gpu)
    env.update(_common.versions())
    env["jax_backend"] = jax_why or "ok"
    clock = None
    if gpu:
        try:
            clock = _common.Nvml().sm_mhz
        except OSError:  # no NVML: rows without "mhz"
            pass
    return Setup(xp, gpu, functools.partial(_common.synchronize, gpu=gpu), release,
                 registry(torch_why, jax_why), env, clock)


def main(argv=None) -> int:
    argv = sys.argv if argv is None else argv
    args = parse_args(argv[1:])
    s = setup(args.dry_run, argv)
    impls = select(args.impls, s.known)
    if args.trees:
        impls = tree_impls(impls, args.trees)
    timing = TIMING["dry" if args.dry_run else "quick" if args.quick else "full"]
    shape_of = functools.partial(standard_shape, **(DRY if args.dry_run else {}))
    print(f"{s.env['device']}: cupy {s.env['cupy']}, torch {s.env['torch']}, jax "
          f"{s.env['jax']} ({s.env['jax_backend']}), flash_attn3_jax "
          f"{s.env['flash_attn3_jax']}; implementations: {', '.join(impls)}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    if s.gpu:
        warm_up_gpu()
    s.xp.random.seed(0)
    causals = CAUSAL[args.causal]
    total = math.prod(map(len, (args.dtypes, args.headdims, args.seqlens, causals, args.modes)))
    rows, errors_seen, started = [], set(), time.perf_counter()
    table = ""
    stopped = False
    for dtype, headdim, seqlen in itertools.product(args.dtypes, args.headdims, args.seqlens):
        batch, nheads = shape_of(seqlen, headdim)
        inputs = make_inputs(DTYPES[dtype], batch, seqlen, nheads, headdim, xp=s.xp)
        for row in shape_rows(impls, inputs, dtype, causals, args.modes, timing, s.sync,
                              s.release, check=not args.no_check, clock=s.clock):
            rows.append(row)
            print(progress(row, len(rows), total), flush=True)
            for name, result in row["results"].items():
                if "error" in result and (name, result["error"]) not in errors_seen:
                    errors_seen.add((name, result["error"]))
                    print(f"      {name}: {result['error']}", flush=True)
            # After every row: a run stopped by a time limit keeps what it measured.
            table = write_results(args.out, s.env, rows, list(impls))
            if args.stop_after is not None and time.perf_counter() - started > args.stop_after:
                stopped = True
                break
        del inputs
        s.release()
        if stopped:
            print(f"stopped after {time.perf_counter() - started:.0f} s (--stop-after), "
                  f"{len(rows)} of {total} rows", flush=True)
            break

    print("\n" + table)
    for line in summarise(rows):
        print("summary: " + summary_line(line))
    for line in variant_lines(rows):
        print("summary: " + line)
    print(plot(rows, list(impls), args.out / "sweep.png"))
    print(f"wrote sweep.json and sweep.md to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
