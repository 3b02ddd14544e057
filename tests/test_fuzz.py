"""Property-based fuzzing of the CPU backend, through the public API, against the float64
reference: dense attention, varlen, the KV cache (contiguous and paged, with and without an
append) and merge_attention, each held to the accuracy rule of tests/accuracy.py.

CI runs a fixed set of FUZZ_EXAMPLES (25) examples per test (derandomized: the same ones
every run, so a failure is reproducible and CI is not flaky). Set CUFLASH_FUZZ_EXAMPLES to
run that many fresh random examples instead, e.g.

    CUFLASH_FUZZ_EXAMPLES=2000 .venv/bin/python -m pytest -q tests/test_fuzz.py

Hypothesis then prints the failing example and a reproduce_failure blob.
"""
import os

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import cuflash
from accuracy import FLOORS, assert_close
from cuflash import reference

pytestmark = pytest.mark.filterwarnings("error")  # no RuntimeWarning on any path

_ENV = os.environ.get("CUFLASH_FUZZ_EXAMPLES")
FUZZ_EXAMPLES = int(_ENV) if _ENV else 25
FUZZ = settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=_ENV is None,
                database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

DTYPES = [np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16), np.dtype(np.float32),
          np.dtype(np.float64)]
F32 = np.dtype(np.float32)


def _rng(draw):
    return np.random.default_rng(draw(st.integers(0, 2**32 - 1)))


def _heads(draw):
    """(nheads, nheads_kv, headdim)."""
    nheads_kv = draw(st.integers(1, 2))
    group = draw(st.sampled_from([1, 2, 3]))
    return nheads_kv * group, nheads_kv, draw(st.sampled_from([8, 16, 40, 64]))


def _options(draw, rng, batch, nheads, *, masks=True, alibi=True):
    """Keyword options of a call: scale, causal, window, softcap, alibi_slopes."""
    options = {}
    if draw(st.booleans()):
        options["scale"] = draw(st.floats(0.05, 2.0))
    if masks:
        side = st.one_of(st.none(), st.integers(0, 50))
        options["causal"] = draw(st.booleans())  # right = 0: a window may not widen it
        options["window"] = (draw(side), None if options["causal"] else draw(side))
    options["softcap"] = draw(st.sampled_from([0.0, 0.0, 2.0, 30.0]))
    kind = draw(st.sampled_from(["none", "none", "heads", "batch"])) if alibi else "none"
    if kind != "none":
        shape = (nheads,) if kind == "heads" else (batch, nheads)
        options["alibi_slopes"] = rng.uniform(0.0, 1.0, shape).astype(F32)
    return options


def _seqlen(draw, high=40):
    """Mostly short, sometimes across the CPU backend's 128-row blocks."""
    return draw(st.one_of(st.integers(0, high), st.sampled_from([127, 128, 129, 200])))


def _normal(rng, shape, dtype):
    return rng.standard_normal(shape).astype(dtype)


def _check_grads(grads, ref, naive, inputs):
    for name, got, r, n, x in zip(("dq", "dk", "dv"), grads, ref, naive, inputs):
        assert got.dtype == x.dtype and got.shape == x.shape, name
        assert_close(name, got, r, n)


@given(data=st.data())
@FUZZ
def test_fuzz_dense(data):
    draw = data.draw
    rng = _rng(draw)
    dtype = draw(st.sampled_from(DTYPES))
    batch = draw(st.integers(1, 2))
    nheads, nheads_kv, headdim = _heads(draw)
    seqlen_q, seqlen_k = _seqlen(draw), _seqlen(draw)
    options = _options(draw, rng, batch, nheads)
    q = _normal(rng, (batch, seqlen_q, nheads, headdim), dtype)
    k, v = (_normal(rng, (batch, seqlen_k, nheads_kv, headdim), dtype) for _ in range(2))
    dout = _normal(rng, q.shape, dtype)

    out, lse = cuflash.attention_forward(q, k, v, **options)
    ref, naive = (reference.attention_forward(q, k, v, upcast=u, **options) for u in (1, 0))
    assert out.dtype == dtype and lse.dtype == F32
    assert_close("out", out, ref[0], naive[0])
    assert_close("lse", lse, ref[1], naive[1])

    grads = cuflash.attention_backward(dout, q, k, v, out, lse, **options)
    ref, naive = (reference.attention_backward(dout, q, k, v, upcast=u, **options)
                  for u in (1, 0))
    _check_grads(grads, ref, naive, (q, k, v))


@given(data=st.data())
@FUZZ
def test_fuzz_varlen(data):
    draw = data.draw
    rng = _rng(draw)
    dtype = draw(st.sampled_from(DTYPES))
    batch = draw(st.integers(1, 4))
    nheads, nheads_kv, headdim = _heads(draw)
    lengths_q = [draw(st.integers(0, 30)) for _ in range(batch)]
    lengths_k = [draw(st.integers(0, 30)) for _ in range(batch)]
    cu_q, cu_k = (np.concatenate([[0], np.cumsum(n)]).astype(np.int32)
                  for n in (lengths_q, lengths_k))
    # The bounds may exceed the longest sequence (and must be at least it).
    max_q = max(lengths_q) + draw(st.integers(0, 3))
    max_k = max(lengths_k) + draw(st.integers(0, 3))
    options = _options(draw, rng, batch, nheads)
    q = _normal(rng, (int(cu_q[-1]), nheads, headdim), dtype)
    k, v = (_normal(rng, (int(cu_k[-1]), nheads_kv, headdim), dtype) for _ in range(2))
    dout = _normal(rng, q.shape, dtype)
    args = (cu_q, cu_k, max_q, max_k)

    out, lse = cuflash.attention_varlen_forward(q, k, v, *args, **options)
    ref, naive = (reference.attention_varlen_forward(q, k, v, *args, upcast=u, **options)
                  for u in (1, 0))
    assert_close("out", out, ref[0], naive[0])
    assert_close("lse", lse, ref[1], naive[1])

    grads = cuflash.attention_varlen_backward(dout, q, k, v, out, lse, *args, **options)
    ref, naive = (reference.attention_varlen_backward(dout, q, k, v, *args, upcast=u,
                                                      **options) for u in (1, 0))
    _check_grads(grads, ref, naive, (q, k, v))


@given(data=st.data())
@FUZZ
def test_fuzz_kvcache(data):
    draw = data.draw
    rng = _rng(draw)
    dtype = draw(st.sampled_from(DTYPES))
    batch = draw(st.integers(1, 3))
    seqlen_q = draw(st.integers(1, 4))
    nheads, nheads_kv, headdim = _heads(draw)
    seqlen_new = draw(st.integers(0, 3))
    same_length = draw(st.booleans())
    lengths = np.int32([draw(st.integers(0, 70))] * batch if same_length
                       else [draw(st.integers(0, 70)) for _ in range(batch)])
    capacity = int(lengths.max()) + seqlen_new + draw(st.integers(0, 20))
    page_size = draw(st.sampled_from([None, 16, 32]))
    if page_size is None:
        table = None
        cache_shape = (batch, capacity, nheads_kv, headdim)
    else:  # distinct shuffled pages a batch item, plus spare ones
        pages = max(1, -(-capacity // page_size))
        num_blocks = batch * pages + draw(st.integers(0, 2))
        table = rng.permutation(num_blocks)[:batch * pages].reshape(batch, pages)
        table = table.astype(np.int32)
        cache_shape = (num_blocks, page_size, nheads_kv, headdim)
    k_cache, v_cache = (_normal(rng, cache_shape, dtype) for _ in range(2))
    # Cache rows that hold no key are NaN: they must never be read.
    held = np.zeros(cache_shape[:2], bool)
    for b in range(batch):
        page, row = _where(b, np.arange(lengths[b]), table, page_size)
        held[page, row] = True
    k_cache[~held] = np.nan
    v_cache[~held] = np.nan
    k = v = None
    if seqlen_new:
        k, v = (_normal(rng, (batch, seqlen_new, nheads_kv, headdim), dtype)
                for _ in range(2))
    seqlens = int(lengths[0]) if same_length and draw(st.booleans()) else lengths
    options = _options(draw, rng, batch, nheads)
    args = dict(k=k, v=v, cache_seqlens=seqlens, block_table=table)

    q = _normal(rng, (batch, seqlen_q, nheads, headdim), dtype)
    ref, naive = (reference.attention_with_kvcache(q, k_cache, v_cache, upcast=u, **args,
                                                   **options) for u in (1, 0))
    want_k, want_v = k_cache.copy(), v_cache.copy()
    for b in range(batch if seqlen_new else 0):
        page, row = _where(b, lengths[b] + np.arange(seqlen_new), table, page_size)
        want_k[page, row], want_v[page, row] = k[b], v[b]

    out, lse = cuflash.attention_with_kvcache(q, k_cache, v_cache, **args, **options,
                                              return_lse=True)
    assert_close("out", out, ref[0], naive[0])
    assert_close("lse", lse, ref[1], naive[1])
    for name, got, want in (("k_cache", k_cache, want_k), ("v_cache", v_cache, want_v)):
        assert np.array_equal(_bits(got), _bits(want)), f"{name} after the append"


def _where(b, pos, table, page_size):
    """(page, row) of keys ``pos`` of batch item b."""
    if table is None:
        return np.full(len(pos), b), pos
    return table[b, pos // page_size], pos % page_size


def _bits(x):
    x = np.ascontiguousarray(x)
    return x.view(f"u{x.dtype.itemsize}")


@given(data=st.data())
@FUZZ
def test_fuzz_merge(data):
    draw = data.draw
    rng = _rng(draw)
    dtype = draw(st.sampled_from(DTYPES))
    batch = draw(st.integers(1, 2))
    seqlen_q = draw(st.integers(1, 8))
    nheads, nheads_kv, headdim = _heads(draw)
    seqlen_k = draw(st.integers(1, 150))
    cuts = sorted(draw(st.lists(st.integers(0, seqlen_k), max_size=3)))
    bounds = [0, *cuts, seqlen_k]  # parts may be empty: lse -inf, they add nothing
    # Masks and ALiBi are aligned to each part's own seqlen_k, so a split changes them.
    options = _options(draw, rng, batch, nheads, masks=False, alibi=False)
    q = _normal(rng, (batch, seqlen_q, nheads, headdim), dtype)
    k, v = (_normal(rng, (batch, seqlen_k, nheads_kv, headdim), dtype) for _ in range(2))
    parts = [cuflash.attention_forward(q, k[:, lo:hi], v[:, lo:hi], **options)
             for lo, hi in zip(bounds[:-1], bounds[1:])]
    outs, lses = [p[0] for p in parts], [p[1] for p in parts]
    if draw(st.booleans()):
        outs, lses = np.stack(outs), np.stack(lses)
    out, lse = cuflash.merge_attention(outs, lses)
    ref, naive = (reference.attention_forward(q, k, v, upcast=u, **options) for u in (1, 0))
    # The parts' lses are float32 whatever their dtype: float64 merges float32-accurately.
    floor = FLOORS[F32] * max(1.0, np.abs(ref[0]).max()) if dtype == np.float64 else None
    assert out.dtype == dtype and lse.dtype == F32
    assert_close("out", out, ref[0], naive[0], floor=floor)
    floor = FLOORS[F32] * max(1.0, np.abs(ref[1]).max()) if dtype == np.float64 else None
    assert_close("lse", lse, ref[1], naive[1], floor=floor)
