"""The CPU backend on threads (cuflash/cpu.py): results bitwise the same whatever the thread
count, every feature still right when the work is spread, both softmax paths, BLAS held at
one thread inside a call, the thread-count control, errors, overlapping calls and forks.

``spread`` drops the work threshold, so that even these small problems run on every thread
they are given; small blocks make many work items, and batch 1 with one kv head makes the
backward split its query blocks into segments with partial dK, dV.
"""
import multiprocessing
import os
import threading
import time
import tracemalloc

import ml_dtypes
import numpy as np
import pytest

import cuflash
from accuracy import assert_close
from cuflash import _checks, cpu, reference

pytestmark = pytest.mark.filterwarnings("error")

BF16 = np.dtype(ml_dtypes.bfloat16)
THREADS = (1, 2, 3, 8)
BLOCKS = (16, 8)


@pytest.fixture
def spread(monkeypatch):
    monkeypatch.setattr(cpu, "MIN_WORK_PER_THREAD", 1)
    monkeypatch.delenv(cpu.THREADS_ENV, raising=False)
    yield
    cpu.set_threads(None)


def normal(rng, shape, dtype=np.float32):
    return rng.standard_normal(shape).astype(dtype)


def dense(rng, dtype, batch=2, seqlen_q=70, seqlen_k=53, nheads=8, nheads_kv=2, headdim=32):
    q, dout = (normal(rng, (batch, seqlen_q, nheads, headdim), dtype) for _ in range(2))
    k, v = (normal(rng, (batch, seqlen_k, nheads_kv, headdim), dtype) for _ in range(2))
    return q, k, v, dout


def run_dense(q, k, v, dout, blocks=BLOCKS, **options):
    shape = _checks.check_qkv(q, k, v, gpu=False)
    opts = _checks.options(shape, "numpy", q, **options)
    Br, Bc = blocks
    out, lse = cpu.forward(q, k, v, shape, opts, Br=Br, Bc=Bc)
    return (out, lse, *cpu.backward(dout, q, k, v, out, lse, shape, opts, Br=Br, Bc=Bc))


def check_dense(results, q, k, v, dout, **options):
    """The accuracy rule of tests/accuracy.py on out, lse, dq, dk, dv."""
    fwd, fwd_naive = (reference.attention_forward(q, k, v, upcast=u, **options)
                      for u in (True, False))
    bwd, bwd_naive = (reference.attention_backward(dout, q, k, v, upcast=u, **options)
                      for u in (True, False))
    for name, got, ref, naive in zip(("out", "lse", "dq", "dk", "dv"), results,
                                     (*fwd, *bwd), (*fwd_naive, *bwd_naive)):
        assert_close(name, got, ref, naive)


def same_for_every_thread_count(call):
    """``call()`` at each of THREADS: bitwise equal results (NaN where NaN); returns them."""
    first = None
    for n in THREADS:
        cpu.set_threads(n)
        got = call()
        if first is None:
            first = got
            continue
        for i, (a, b) in enumerate(zip(first, got)):
            assert a.dtype == b.dtype and a.shape == b.shape
            assert np.array_equal(a, b, equal_nan=True), f"result {i} differs at {n} threads"
    return first


DENSE_OPTIONS = {
    "none": dict(),
    "causal": dict(causal=True),
    "window": dict(window=(9, 3)),
    "softcap": dict(softcap=3.0),
    "alibi": dict(alibi_slopes="batch", causal=True),
    "all": dict(alibi_slopes="heads", softcap=5.0, window=(20, 0), scale=0.3),
}


def with_slopes(rng, options, batch, nheads):
    options = dict(options)
    kind = options.get("alibi_slopes")
    if kind is not None:
        shape = (batch, nheads) if kind == "batch" else (nheads,)
        options["alibi_slopes"] = rng.uniform(0.05, 0.5, shape).astype(np.float32)
    return options


@pytest.mark.parametrize("options", DENSE_OPTIONS.values(), ids=DENSE_OPTIONS.keys())
@pytest.mark.parametrize("dtype", [np.float16, BF16, np.float32, np.float64], ids=str)
def test_dense_gqa_bitwise_across_thread_counts(rng, spread, dtype, options):
    q, k, v, dout = dense(rng, dtype)
    options = with_slopes(rng, options, 2, 8)
    results = same_for_every_thread_count(lambda: run_dense(q, k, v, dout, **options))
    check_dense(results, q, k, v, dout, **options)


@pytest.mark.parametrize("options", [dict(), dict(causal=True), dict(window=(5, 5))], ids=str)
@pytest.mark.parametrize("group", [1, 4])
def test_backward_segments_of_one_kv_head(rng, spread, group, options):
    # batch 1 x 1 kv head < MIN_ITEMS: the query blocks split into segments whose dK, dV
    # partials are summed in segment order, whichever thread finishes first.
    q, k, v, dout = dense(rng, np.float32, batch=1, seqlen_q=150, seqlen_k=131,
                          nheads=group, nheads_kv=1)
    results = same_for_every_thread_count(lambda: run_dense(q, k, v, dout, **options))
    check_dense(results, q, k, v, dout, **options)


def test_segments_really_split(rng, spread, monkeypatch):
    # The segment path is taken (several items for one kv head) and completes every one.
    seen = []
    add = cpu._Ordered.add

    def spy(self, s, part):
        seen.append((id(self), s, len(self.parts)))
        return add(self, s, part)

    monkeypatch.setattr(cpu._Ordered, "add", spy)
    cpu.set_threads(3)
    q, k, v, dout = dense(rng, np.float32, batch=1, seqlen_q=150, seqlen_k=131, nheads=2,
                          nheads_kv=1)
    run_dense(q, k, v, dout)
    assert len(seen) == cpu.MIN_ITEMS and {n for _, _, n in seen} == {cpu.MIN_ITEMS}
    assert sorted(s for _, s, _ in seen) == list(range(cpu.MIN_ITEMS))


VARLEN_Q = (0, 1, 17, 5, 33, 1, 0, 24, 70)
VARLEN_K = (3, 1, 9, 0, 40, 2, 0, 24, 61)


@pytest.mark.parametrize("options", [dict(), dict(causal=True),
                                     dict(alibi_slopes="batch", softcap=4.0, window=(6, 1))],
                         ids=["none", "causal", "all"])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64], ids=str)
def test_varlen_bitwise_across_thread_counts(rng, spread, dtype, options):
    cu_q, cu_k = (np.concatenate([[0], np.cumsum(x)]).astype(np.int32)
                  for x in (VARLEN_Q, VARLEN_K))
    q, dout = (normal(rng, (cu_q[-1], 4, 16), dtype) for _ in range(2))
    k, v = (normal(rng, (cu_k[-1], 2, 16), dtype) for _ in range(2))
    options = with_slopes(rng, options, len(VARLEN_Q), 4)
    shape, varlen = _checks.check_varlen(q, k, v, cu_q, cu_k, q.shape[0], k.shape[0],
                                         gpu=False)
    opts = _checks.options(shape, "numpy", q, **options)

    def call():
        out, lse = cpu.forward_varlen(q, k, v, shape, opts, varlen, Br=8, Bc=8)
        return (out, lse, *cpu.backward_varlen(dout, q, k, v, out, lse, shape, opts, varlen,
                                               Br=8, Bc=8))

    out, lse, dq, dk, dv = same_for_every_thread_count(call)
    # Each sequence against the dense reference on it alone.
    slopes = options.get("alibi_slopes")
    for b in range(len(VARLEN_Q)):
        q0, q1, k0, k1 = cu_q[b], cu_q[b + 1], cu_k[b], cu_k[b + 1]
        if q1 == q0:
            continue
        if k1 == k0:
            assert (out[q0:q1] == 0).all() and np.isneginf(lse[:, q0:q1]).all()
            assert (dq[q0:q1] == 0).all()
            continue
        opts_b = dict(options)
        if slopes is not None:
            opts_b["alibi_slopes"] = slopes[b]
        check_dense((out[None, q0:q1], lse[None, :, q0:q1], dq[None, q0:q1], dk[None, k0:k1],
                     dv[None, k0:k1]), q[None, q0:q1], k[None, k0:k1], v[None, k0:k1],
                    dout[None, q0:q1], **opts_b)


def test_kvcache_bitwise_across_thread_counts(rng, spread):
    q = normal(rng, (3, 5, 8, 32))
    k_cache, v_cache = (normal(rng, (12, 16, 2, 32)) for _ in range(2))
    table = rng.permutation(12).astype(np.int32).reshape(3, 4)
    k_new, v_new = (normal(rng, (3, 5, 2, 32)) for _ in range(2))
    lens = np.int32([0, 30, 59])

    def call():
        kc, vc = k_cache.copy(), v_cache.copy()
        out, lse = cuflash.attention_with_kvcache(q, kc, vc, k=k_new, v=v_new,
                                                  cache_seqlens=lens, block_table=table,
                                                  causal=True, return_lse=True)
        return out, lse, kc, vc

    same_for_every_thread_count(call)


def test_public_api_default_blocks_bitwise(rng, spread):
    # The public API's blocks (BR x BC) and a long-enough sequence for several of them.
    q, k, v, dout = dense(rng, np.float32, batch=1, seqlen_q=600, seqlen_k=1500, nheads=4,
                          nheads_kv=2, headdim=64)

    def call():
        out, lse = cuflash.attention_forward(q, k, v, causal=True)
        return (out, lse, *cuflash.attention_backward(dout, q, k, v, out, lse, causal=True))

    results = same_for_every_thread_count(call)
    check_dense(results, q, k, v, dout, causal=True)


# ------------------------------------------------------------------ the two softmax paths


def count_column_max(monkeypatch):
    calls = []
    column_max = cpu._column_max

    def spy(x, scratch):
        calls.append(x.shape)
        return column_max(x, scratch)

    monkeypatch.setattr(cpu, "_column_max", spy)
    return calls


def test_bounded_scores_skip_the_maximum(rng, spread, monkeypatch):
    calls = count_column_max(monkeypatch)
    q, k, v, dout = dense(rng, np.float32)
    check_dense(run_dense(q, k, v, dout, causal=True), q, k, v, dout, causal=True)
    assert not calls, "unit-normal inputs are within BOUND: no running maximum"


@pytest.mark.parametrize("big", ["q", "one key", "alibi"])
def test_large_scores_take_the_maximum(rng, spread, monkeypatch, big):
    # Scores of ~+-300 would overflow exp without the maximum; one large key makes only the
    # chunks that hold it take the maximum path, the others not (mixed references).
    calls = count_column_max(monkeypatch)
    q, k, v, dout = dense(rng, np.float32)
    options = dict(causal=True)
    if big == "q":
        q *= 60
    elif big == "one key":
        k[:, 37] *= 40
    else:
        options["alibi_slopes"] = np.full(8, 2.0, np.float32)
    results = same_for_every_thread_count(lambda: run_dense(q, k, v, dout, **options))
    assert calls
    assert all(np.isfinite(x).all() for x in results[2:])
    check_dense(results, q, k, v, dout, **options)


@pytest.mark.parametrize("bound", [0.0, np.inf], ids=["always-maximum", "never-maximum"])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64], ids=str)
def test_either_path_alone_is_right(rng, spread, monkeypatch, bound, dtype):
    monkeypatch.setattr(cpu, "BOUND", bound)
    q, k, v, dout = dense(rng, dtype)
    for options in (dict(), dict(window=(3, 3)), dict(softcap=6.0)):
        check_dense(run_dense(q, k, v, dout, **options), q, k, v, dout, **options)


def test_nan_rows_on_threads(rng, spread):
    # docs/CONVENTIONS.md's NaN rule holds whatever thread runs the row's block.
    q, k, v, _ = dense(rng, np.float32, batch=1, seqlen_q=200, seqlen_k=200, nheads=4,
                       nheads_kv=4)
    k[0, 150, 2, 5] = np.nan
    for n in THREADS:
        cpu.set_threads(n)
        out, lse = cuflash.attention_forward(q, k, v, causal=True)
        want = np.zeros(lse.shape, bool)
        want[0, 2, 150:] = True
        for rows in (np.isnan(out).any(-1), np.isnan(out).all(-1)):
            assert (rows.transpose(0, 2, 1) == want).all()
        assert (np.isnan(lse) == want).all() and not np.isneginf(lse).any()


# --------------------------------------------------------------------- threads, BLAS, pool


def test_threads_control(monkeypatch):
    monkeypatch.delenv(cpu.THREADS_ENV, raising=False)
    cpu.set_threads(None)
    if hasattr(os, "sched_getaffinity"):
        assert cpu.threads() == len(os.sched_getaffinity(0))
    monkeypatch.setenv(cpu.THREADS_ENV, "3")
    assert cpu.threads() == 3
    try:
        assert cpu.set_threads(5) is None
        assert cpu.threads() == 5  # the call wins over the environment
        assert cpu.set_threads(None) == 5
        assert cpu.threads() == 3
    finally:
        cpu.set_threads(None)
    for bad in ("0", "-2", "two", "1.5"):
        monkeypatch.setenv(cpu.THREADS_ENV, bad)
        with pytest.raises(ValueError, match=cpu.THREADS_ENV):
            cpu.threads()
    q = np.zeros((1, 4, 1, 8), np.float32)
    with pytest.raises(ValueError, match=cpu.THREADS_ENV):
        cuflash.attention(q, q, q)
    for bad in (0, -1, 2.0, True, "2"):
        with pytest.raises(ValueError):
            cpu.set_threads(bad)


def spy_items(monkeypatch, pause=0.0, fail_at=None):
    """Record (thread id, BLAS thread counts) of every forward item; sleep ``pause`` in each;
    raise at item ``fail_at``."""
    seen, lock = [], threading.Lock()
    block = cpu._forward_block

    def spy(*args, **kwargs):
        api = cpu._blas_single.api
        with lock:
            seen.append((threading.get_ident(), api[0]() if api else None))
            fail = len(seen) == fail_at
        if fail:
            raise RuntimeError("item failed")
        time.sleep(pause)
        return block(*args, **kwargs)

    monkeypatch.setattr(cpu, "_forward_block", spy)
    return seen


def test_items_run_on_several_threads_with_blas_at_one(rng, spread, monkeypatch):
    seen = spy_items(monkeypatch, pause=0.02)
    q, k, v, _ = dense(rng, np.float32)
    cpu.set_threads(3)
    api = cpu._blas_single.api or cpu._blas_single._find()
    before = api[0]() if api else None
    cuflash.attention(q, k, v)
    assert 2 <= len({ident for ident, _ in seen}) <= 3  # of 4 items
    if api:  # threadpoolctl, or OpenBLAS's own setter (NumPy's wheels)
        assert all(counts == [1] * len(counts) for _, counts in seen)
        assert api[0]() == before  # restored
    seen.clear()
    cpu.set_threads(1)
    cuflash.attention(q, k, v)
    assert {ident for ident, _ in seen} == {threading.get_ident()}


def test_an_error_in_a_worker_reaches_the_caller(rng, spread, monkeypatch):
    q, k, v, _ = dense(rng, np.float32)
    cpu.set_threads(3)
    want = cuflash.attention(q, k, v)
    spy_items(monkeypatch, fail_at=3)  # of 4 items (2 x 2 kv heads x 1 block)
    with pytest.raises(RuntimeError, match="item failed"):
        cuflash.attention(q, k, v)
    monkeypatch.undo()
    monkeypatch.setattr(cpu, "MIN_WORK_PER_THREAD", 1)
    api = cpu._blas_single.api
    assert cpu._blas_single.depth == 0
    if api:
        assert api[0]() == cpu._blas_single.saved
    np.testing.assert_array_equal(cuflash.attention(q, k, v), want)  # the pool still works


def test_overlapping_calls_from_several_threads(rng, spread):
    q, k, v, dout = dense(rng, np.float32)
    cpu.set_threads(2)
    want = run_dense(q, k, v, dout, causal=True)
    api = cpu._blas_single.api
    before = api[0]() if api else None
    got, errors = [None] * 4, []

    def user(i):
        try:
            got[i] = run_dense(q, k, v, dout, causal=True)
        except BaseException as e:  # reported below
            errors.append(e)

    users = [threading.Thread(target=user, args=(i,)) for i in range(4)]
    for t in users:
        t.start()
    for t in users:
        t.join(60)
    assert not errors and all(g is not None for g in got)
    for g in got:
        for a, b in zip(g, want):
            np.testing.assert_array_equal(a, b)
    assert cpu._blas_single.depth == 0
    if api:
        assert api[0]() == before


def _child_forward(q, k, v):
    cpu.set_threads(2)
    cpu.MIN_WORK_PER_THREAD = 1
    return cuflash.attention(q, k, v, causal=True)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # fork of a threaded process
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_gets_a_pool_of_its_own(rng, spread):
    q, k, v, _ = dense(rng, np.float32)
    cpu.set_threads(2)
    want = cuflash.attention(q, k, v, causal=True)  # the parent's pool exists now
    with multiprocessing.get_context("fork").Pool(1) as pool:
        got = pool.apply_async(_child_forward, (q, k, v)).get(timeout=120)
    np.testing.assert_array_equal(got, want)


def _peak_bytes(seqlen):
    rng = np.random.default_rng(0)
    q, k, v, dout = (normal(rng, (1, seqlen, 1, 32)) for _ in range(4))
    tracemalloc.start()
    try:
        out, lse = cuflash.attention_forward(q, k, v)
        cuflash.attention_backward(dout, q, k, v, out, lse)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_on_threads_and_segments_grows_linearly(spread):
    # One head: the backward's segments, each with its dK, dV partial, on 4 threads.
    cpu.set_threads(4)
    small, large = _peak_bytes(1024), _peak_bytes(4096)
    assert large < 4096 * 4096 * 4 / 4, f"peak {large / 2**20:.1f} MiB at seqlen 4096"
    assert large / small < 6, f"peak grew {large / small:.1f}x for 4x the seqlen"
