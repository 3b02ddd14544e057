"""Streams and threads: cuflash calls running at once must give the results they give alone.

The kernels keep small state between launches: the persistent Hopper forward's tile counter
(bf16/fp16, head dim 64/128, causal on sm_90), the split-KV decode's counters (the last split
of a group to finish merges the group) and per-stream workspaces. Calls on different streams
run concurrently on the GPU, so any such state shared between streams (or threads) skips
tiles, merges splits early or mixes partial results.

Each test builds a set of problems, computes every problem's result serially first, then
runs them many times at once (two streams; eight threads with a stream each; eight threads
on CuPy's per-thread default stream, in a subprocess) without synchronising in between, and
compares every result bit for bit with the serial one. Outputs are given as NaN-filled
buffers (``out=``, ``lse=``, ``dq=`` ...): a skipped tile stays NaN. Backward calls compared
bit for bit run ``deterministic=True``; the atomic backward is compared within a few units
in the last place.
"""
import os
import pathlib
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import ml_dtypes
import numpy as np
import pytest

import cuflash
from gpu import assert_near, assert_same_bits, import_cupy

pytestmark = pytest.mark.gpu

BF16 = np.dtype(ml_dtypes.bfloat16)
F32 = np.dtype(np.float32)


def poisoned(shape, dtype):
    """A new array filled with 0xFF bytes (NaN in bf16 and float32) on the current stream."""
    cupy = import_cupy()
    x = cupy.empty(shape, dtype)
    cupy.cuda.runtime.memsetAsync(x.data.ptr, 0xFF, x.nbytes,
                                  cupy.cuda.get_current_stream().ptr)
    return x


def randn(gen, shape):
    cupy = import_cupy()
    return cupy.asarray(gen.standard_normal(shape, dtype=np.float32).astype(BF16))


class Forward:
    def __init__(self, gen, shape_q, shape_k, **opts):
        self.q, self.k, self.v = randn(gen, shape_q), randn(gen, shape_k), randn(gen, shape_k)
        self.opts = opts
        self.name = f"forward q{shape_q} k{shape_k} {opts}"

    def run(self):
        batch, seqlen_q, nheads, _ = self.q.shape
        out = poisoned(self.q.shape, BF16)
        lse = poisoned((batch, nheads, seqlen_q), F32)
        return cuflash.attention_forward(self.q, self.k, self.v, **self.opts, out=out, lse=lse)

    def compare(self, got, want, where):
        for name, g, w in zip(("out", "lse"), got, want):
            assert_same_bits(f"{self.name} {name} ({where})", g, w)


class Decode:
    """Split-KV decoding of one query over a long cache: ``num_splits`` CTAs per kv head,
    merged by the last to finish (the split counters)."""

    def __init__(self, gen, capacity, length, nheads=16, nheads_kv=4, headdim=128,
                 num_splits=8, paged=False):
        cupy = import_cupy()
        self.q = randn(gen, (1, 1, nheads, headdim))
        if paged:
            page = 256
            pages = capacity // page
            self.block_table = cupy.asarray(
                np.random.default_rng(length).permutation(pages)[None].astype(np.int32))
            cache_shape = (pages, page, nheads_kv, headdim)
        else:
            self.block_table = None
            cache_shape = (1, capacity, nheads_kv, headdim)
        self.k_cache, self.v_cache = randn(gen, cache_shape), randn(gen, cache_shape)
        self.seqlens = cupy.asarray([length], np.int32)
        self.num_splits = num_splits
        self.name = f"decode {length} keys, {num_splits} splits, paged={paged}"

    def run(self):
        nheads = self.q.shape[2]
        out = poisoned(self.q.shape, BF16)
        lse = poisoned((1, nheads, 1), F32)
        return cuflash.attention_with_kvcache(
            self.q, self.k_cache, self.v_cache, cache_seqlens=self.seqlens,
            block_table=self.block_table, num_splits=self.num_splits, out=out, lse=lse,
            return_lse=True)

    def compare(self, got, want, where):
        for name, g, w in zip(("out", "lse"), got, want):
            assert_same_bits(f"{self.name} {name} ({where})", g, w)


class Backward:
    def __init__(self, gen, shape_q, shape_k, deterministic, **opts):
        self.q, self.k, self.v = randn(gen, shape_q), randn(gen, shape_k), randn(gen, shape_k)
        self.dout = randn(gen, shape_q)
        self.out, self.lse = cuflash.attention_forward(self.q, self.k, self.v, **opts)
        self.deterministic, self.opts = deterministic, opts
        self.name = f"backward q{shape_q} k{shape_k} deterministic={deterministic} {opts}"

    def run(self):
        dq, dk, dv = (poisoned(x.shape, BF16) for x in (self.q, self.k, self.v))
        return cuflash.attention_backward(self.dout, self.q, self.k, self.v, self.out, self.lse,
                                          **self.opts, deterministic=self.deterministic,
                                          dq=dq, dk=dk, dv=dv)

    def compare(self, got, want, where):
        for name, g, w in zip(("dq", "dk", "dv"), got, want):
            if self.deterministic:
                assert_same_bits(f"{self.name} {name} ({where})", g, w)
            else:
                assert_near(f"{self.name} {name} ({where})", g, w)


def serial(problems):
    """Each problem's result, run alone with the device synchronised around it."""
    cupy = import_cupy()
    results = {}
    for p in problems:
        cupy.cuda.Device().synchronize()
        results[p] = p.run()
        cupy.cuda.Device().synchronize()
    return results


def test_two_streams_at_once():
    """A long persistent forward on one stream; small forwards, split-KV decodes and
    backwards on the other, queued many times over without a synchronisation."""
    cupy = import_cupy()
    gen = np.random.default_rng(0)  # NumPy: cuflash's slim install has no cuRAND
    long = Forward(gen, (1, 8192, 16, 128), (1, 8192, 4, 128), causal=True)
    others = [
        Forward(gen, (2, 300, 4, 128), (2, 300, 2, 128), causal=True),
        Forward(gen, (2, 77, 4, 64), (2, 200, 2, 64), causal=True),
        Forward(gen, (1, 129, 8, 96), (1, 129, 8, 96)),
        Decode(gen, 16384, 16000),
        Decode(gen, 16384, 11111, paged=True),
        Backward(gen, (2, 200, 4, 128), (2, 200, 2, 128), deterministic=True, causal=True),
        Backward(gen, (2, 150, 4, 64), (2, 150, 2, 64), deterministic=False, causal=True),
    ]
    want = serial([long] + others)
    a, b = cupy.cuda.Stream(non_blocking=True), cupy.cuda.Stream(non_blocking=True)
    results = []
    for i in range(8):
        with a:
            results.append((long, long.run(), f"stream a, iteration {i}"))
        with b:
            for _ in range(2):
                for p in others:
                    results.append((p, p.run(), f"stream b, iteration {i}"))
    a.synchronize()
    b.synchronize()
    for p, got, where in results:
        p.compare(got, want[p], where)


def test_threads_each_with_a_stream():
    """Eight Python threads, each with its own non-blocking stream and its own problems
    (persistent forwards, split-KV decodes, backwards), started together."""
    cupy = import_cupy()
    threads, iterations = 8, 6
    gen = np.random.default_rng(1)
    work = [[Forward(gen, (2, 1024, 8, 128), (2, 1024, 2, 128), causal=True),
             Decode(gen, 16384, 16384 - 1000 * t, paged=bool(t % 2)),
             Backward(gen, (1, 256, 4, 64), (1, 256, 2, 64), deterministic=True, causal=True)]
            for t in range(threads)]
    want = serial([p for w in work for p in w])
    barrier = threading.Barrier(threads, timeout=120)

    def run(t):
        stream = cupy.cuda.Stream(non_blocking=True)
        got = []
        barrier.wait()
        with stream:
            for i in range(iterations):
                for p in work[t]:
                    got.append((p, p.run(), f"thread {t}, iteration {i}"))
        stream.synchronize()
        return got

    with ThreadPoolExecutor(threads) as pool:
        futures = [pool.submit(run, t) for t in range(threads)]
        results = [f.result(timeout=300) for f in futures]
    cupy.cuda.Device().synchronize()
    for got in results:
        for p, result, where in got:
            p.compare(result, want[p], where)


# Runs in a subprocess: CUPY_CUDA_PER_THREAD_DEFAULT_STREAM must be set before CuPy is
# imported. Every thread then runs on its own per-thread default stream, which CuPy reports
# with one and the same handle in every thread.
PER_THREAD_SCRIPT = r"""
import sys
import threading

import ml_dtypes
import numpy as np
import cupy
import cuflash

BF16 = np.dtype(ml_dtypes.bfloat16)
THREADS, ITERATIONS = 8, 10
gen = np.random.default_rng(2)
print("current stream:", cupy.cuda.get_current_stream(), flush=True)


def randn(shape):
    return cupy.asarray(gen.standard_normal(shape, dtype=np.float32).astype(BF16))


def poisoned(shape, dtype):
    x = cupy.empty(shape, dtype)
    cupy.cuda.runtime.memsetAsync(x.data.ptr, 0xFF, x.nbytes,
                                  cupy.cuda.get_current_stream().ptr)
    return x


class Forward:  # sm_90: the persistent forward with its tile counter
    def __init__(self):
        self.q = randn((1, 2048, 16, 128))
        self.k, self.v = randn((1, 2048, 4, 128)), randn((1, 2048, 4, 128))

    def run(self):
        out, lse = poisoned(self.q.shape, BF16), poisoned((1, 16, 2048), np.float32)
        return cuflash.attention_forward(self.q, self.k, self.v, causal=True, out=out, lse=lse)


class Decode:  # split-KV decode with its split counters
    def __init__(self, length):
        self.q = randn((1, 1, 16, 128))
        self.k_cache, self.v_cache = randn((1, 32768, 4, 128)), randn((1, 32768, 4, 128))
        self.seqlens = cupy.asarray([length], np.int32)

    def run(self):
        out, lse = poisoned(self.q.shape, BF16), poisoned((1, 16, 1), np.float32)
        return cuflash.attention_with_kvcache(self.q, self.k_cache, self.v_cache,
                                              cache_seqlens=self.seqlens, num_splits=8,
                                              out=out, lse=lse, return_lse=True)


work = [[Forward(), Decode(32768 - 500 * t)] for t in range(THREADS)]
cupy.cuda.Device().synchronize()
serial = []
for w in work:
    serial.append([[x.get() for x in p.run()] for p in w])
cupy.cuda.Device().synchronize()

barrier = threading.Barrier(THREADS, timeout=120)
results, errors = [None] * THREADS, []


def run(t):
    try:
        barrier.wait()
        got = []
        for _ in range(ITERATIONS):
            for p in work[t]:
                got.append(p.run())
        cupy.cuda.get_current_stream().synchronize()
        results[t] = [[x.get() for x in r] for r in got]
    except BaseException as e:
        errors.append(f"thread {t}: {e!r}")
        barrier.abort()


threads = [threading.Thread(target=run, args=(t,)) for t in range(THREADS)]
for th in threads:
    th.start()
for th in threads:
    th.join()
cupy.cuda.Device().synchronize()

bad = []
for t in range(THREADS):
    if results[t] is None:
        continue
    for i, got in enumerate(results[t]):
        kind = i % 2
        for name, g, w in zip(("out", "lse"), got, serial[t][kind]):
            g, w = g.view(f"u{g.dtype.itemsize}"), w.view(f"u{w.dtype.itemsize}")
            if not np.array_equal(g, w):
                bad.append(f"thread {t} iteration {i // 2} {('forward', 'decode')[kind]} "
                           f"{name}: {int((g != w).sum())} of {g.size} elements differ")
print("\n".join(errors + bad[:30]))
print(f"{len(errors)} errors, {len(bad)} mismatches", flush=True)
sys.exit(1 if errors or bad else 0)
"""


def test_threads_on_the_per_thread_default_stream():
    env = dict(os.environ, CUPY_CUDA_PER_THREAD_DEFAULT_STREAM="1")
    root = pathlib.Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, "-c", PER_THREAD_SCRIPT], env=env, cwd=root,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, (
        f"exit {run.returncode}\nstdout:\n{run.stdout[-6000:]}\nstderr:\n{run.stderr[-6000:]}")
    assert "0 errors, 0 mismatches" in run.stdout
