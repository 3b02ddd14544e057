"""cuflash.flash_attn, the flash-attn 2 names, on NumPy inputs (the CPU backend).

Each function is checked against the float64 reference (the accuracy rule of accuracy.py),
bitwise against the cuflash function it maps to, for flash-attn's return conventions, for
flash-attn's signatures, and for clear errors on what cuflash does not support.
"""
import doctest
import importlib
import inspect

import numpy as np
import pytest

import cuflash
from accuracy import assert_close
from gpu import bits
from cuflash import reference
from cuflash.flash_attn import (flash_attn_func, flash_attn_kvpacked_func,
                                flash_attn_qkvpacked_func, flash_attn_varlen_func,
                                flash_attn_varlen_kvpacked_func,
                                flash_attn_varlen_qkvpacked_func, flash_attn_with_kvcache)

F16, F32 = np.dtype(np.float16), np.dtype(np.float32)


def normal(rng, shape, dtype=F32):
    return rng.standard_normal(shape).astype(dtype)


def assert_same(a, b):
    """Bitwise-equal arrays of one dtype and shape (NaN equal to itself)."""
    assert type(a) is type(b) is np.ndarray
    assert a.dtype == b.dtype and a.shape == b.shape
    assert np.array_equal(bits(a), bits(b))


def slopes(rng, nheads, batch=None):
    shape = (nheads,) if batch is None else (batch, nheads)
    return rng.uniform(0.05, 0.5, shape).astype(np.float32)


# (flash-attn keyword options, the cuflash options they mean); "alibi" is filled per test
OPTIONS = {
    "plain": ({}, {}),
    "causal": (dict(causal=True), dict(causal=True)),
    "window": (dict(window_size=(8, -1)), dict(window=(8, None))),
    "window2": (dict(window_size=(5, 3)), dict(window=(5, 3))),
    "causal_window": (dict(causal=True, window_size=(16, -1)),
                      dict(causal=True, window=(16, None))),
    "softcap": (dict(softcap=5.0, softmax_scale=0.3), dict(softcap=5.0, scale=0.3)),
    "alibi": (dict(alibi_slopes="alibi"), dict(alibi_slopes="alibi")),
}

# (batch, seqlen_q, seqlen_k, nheads, nheads_k, headdim)
DENSE = {"q1": (2, 1, 17, 4, 2, 32), "q17k97": (1, 17, 97, 4, 1, 64),
         "q97k17": (2, 97, 17, 2, 2, 16), "q97k97_gqa": (1, 97, 97, 6, 3, 32)}


def resolve(options, rng, nheads, batch=None):
    fa, cf = (dict(o) for o in OPTIONS[options])
    if "alibi_slopes" in fa:
        fa["alibi_slopes"] = cf["alibi_slopes"] = slopes(rng, nheads, batch)
    return fa, cf


def check_forward(out, lse, ref_call):
    ref, naive = ref_call(upcast=True), ref_call(upcast=False)
    assert_close("out", out, ref[0], naive[0])
    assert_close("lse", lse, ref[1], naive[1])


# ------------------------------------------------------------------------------ dense


@pytest.mark.parametrize("dtype", [F32, F16], ids=["f32", "f16"])
@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("dims", DENSE)
def test_flash_attn_func(rng, dims, options, dtype):
    b, sq, sk, h, hk, d = DENSE[dims]
    q, k, v = normal(rng, (b, sq, h, d), dtype), *(normal(rng, (b, sk, hk, d), dtype)
                                                   for _ in range(2))
    fa, cf = resolve(options, rng, h, b if options == "alibi" and b > 1 else None)
    out, lse, probs = flash_attn_func(q, k, v, **fa, return_attn_probs=True)
    assert probs is None
    assert out.shape == q.shape and out.dtype == dtype
    assert lse.shape == (b, h, sq) and lse.dtype == np.float32
    check_forward(out, lse, lambda upcast: reference.attention_forward(q, k, v, **cf,
                                                                       upcast=upcast))
    want_out, want_lse = cuflash.attention(q, k, v, **cf, return_lse=True)
    assert_same(out, want_out)
    assert_same(lse, want_lse)
    assert_same(flash_attn_func(q, k, v, **fa), want_out)  # out alone by default


@pytest.mark.parametrize("options", ["plain", "causal", "window2", "alibi"])
def test_packed(rng, options):
    b, s, sq, h, hk, d = 2, 97, 17, 4, 2, 32
    fa, cf = resolve(options, rng, h)
    qkv = normal(rng, (b, s, 3, h, d))
    out, lse, probs = flash_attn_qkvpacked_func(qkv, **fa, return_attn_probs=True)
    q, k, v = (np.ascontiguousarray(qkv[:, :, i]) for i in range(3))
    assert probs is None and lse.shape == (b, h, s)
    check_forward(out, lse, lambda upcast: reference.attention_forward(q, k, v, **cf,
                                                                       upcast=upcast))
    assert_same(out, cuflash.attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], **cf))
    assert_same(out, flash_attn_func(q, k, v, **fa))  # views and copies agree bitwise

    q, kv = normal(rng, (b, sq, h, d)), normal(rng, (b, s, 2, hk, d))
    out, lse, _ = flash_attn_kvpacked_func(q, kv, **fa, return_attn_probs=True)
    k, v = np.ascontiguousarray(kv[:, :, 0]), np.ascontiguousarray(kv[:, :, 1])
    assert lse.shape == (b, h, sq)
    check_forward(out, lse, lambda upcast: reference.attention_forward(q, k, v, **cf,
                                                                       upcast=upcast))
    assert_same(out, cuflash.attention(q, kv[:, :, 0], kv[:, :, 1], **cf))
    assert_same(out, flash_attn_func(q, k, v, **fa))


def test_causal_overrides_the_right_window_like_flash_attn(rng):
    q, k = normal(rng, (1, 17, 2, 16)), normal(rng, (1, 33, 2, 16))
    assert_same(flash_attn_func(q, k, k, causal=True, window_size=(4, 7)),
                cuflash.attention(q, k, k, causal=True, window=(4, 0)))
    # any negative side is unbounded, as in flash-attn
    assert_same(flash_attn_func(q, k, k, window_size=(-5, -2)), cuflash.attention(q, k, k))


# ----------------------------------------------------------------------------- varlen


def cu(lengths):
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)


# (query lengths, key lengths): an empty query sequence, an empty key sequence, 1, 17, 97
VARLEN = {"mixed": ([1, 0, 17, 97, 5], [17, 5, 0, 97, 1]),
          "same": ([17, 0, 97, 1], [17, 0, 97, 1])}


@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("lengths", VARLEN)
def test_flash_attn_varlen_func(rng, lengths, options):
    lq, lk = VARLEN[lengths]
    h, hk, d = 4, 2, 32
    cu_q, cu_k = cu(lq), cu(lk)
    q, k, v = normal(rng, (cu_q[-1], h, d)), *(normal(rng, (cu_k[-1], hk, d))
                                               for _ in range(2))
    fa, cf = resolve(options, rng, h, len(lq))
    args = (q, k, v, cu_q, cu_k, max(lq), max(lk))
    out, lse, probs = flash_attn_varlen_func(*args, **fa, return_attn_probs=True)
    assert probs is None
    assert out.shape == q.shape and lse.shape == (h, cu_q[-1]) and lse.dtype == np.float32
    check_forward(out, lse, lambda upcast: reference.attention_varlen_forward(
        *args, **cf, upcast=upcast))
    want_out, want_lse = cuflash.attention_varlen(*args, **cf, return_lse=True)
    assert_same(out, want_out)
    assert_same(lse, want_lse)
    assert_same(flash_attn_varlen_func(*args, **fa), want_out)


@pytest.mark.parametrize("options", ["plain", "causal", "window", "softcap"])
def test_varlen_packed(rng, options):
    lengths = [17, 0, 1, 97]
    h, hk, d = 4, 2, 16
    cu_s = cu(lengths)
    fa, cf = resolve(options, rng, h)
    qkv = normal(rng, (cu_s[-1], 3, h, d))
    out, lse, _ = flash_attn_varlen_qkvpacked_func(qkv, cu_s, 97, **fa,
                                                   return_attn_probs=True)
    q, k, v = (np.ascontiguousarray(qkv[:, i]) for i in range(3))
    args = (q, k, v, cu_s, cu_s, 97, 97)
    assert lse.shape == (h, cu_s[-1])
    check_forward(out, lse, lambda upcast: reference.attention_varlen_forward(
        *args, **cf, upcast=upcast))
    assert_same(out, cuflash.attention_varlen(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu_s, cu_s,
                                              97, 97, **cf))
    assert_same(out, flash_attn_varlen_func(*args, **fa))

    lq, lk = [1, 17, 0], [97, 0, 17]
    cu_q, cu_k = cu(lq), cu(lk)
    q, kv = normal(rng, (cu_q[-1], h, d)), normal(rng, (cu_k[-1], 2, hk, d))
    out, lse, _ = flash_attn_varlen_kvpacked_func(q, kv, cu_q, cu_k, 17, 97, **fa,
                                                  return_attn_probs=True)
    k, v = np.ascontiguousarray(kv[:, 0]), np.ascontiguousarray(kv[:, 1])
    args = (q, k, v, cu_q, cu_k, 17, 97)
    assert lse.shape == (h, cu_q[-1])
    check_forward(out, lse, lambda upcast: reference.attention_varlen_forward(
        *args, **cf, upcast=upcast))
    assert_same(out, cuflash.attention_varlen(q, kv[:, 0], kv[:, 1], cu_q, cu_k, 17, 97,
                                              **cf))
    assert_same(out, flash_attn_varlen_func(*args, **fa))


# ---------------------------------------------------------------------------- kvcache


def kv_problem(rng, *, batch=3, seqlen_q=1, nheads=4, nheads_k=2, headdim=32,
               lengths=(0, 17, 97), seqlen_new=0, page_size=None, dtype=F32):
    """q, caches (rows past each item's keys are NaN: never read), new k / v, lengths,
    block table (shuffled pages, with 2 spare pages)."""
    lengths = np.asarray(lengths, np.int32)
    capacity = int(lengths.max()) + seqlen_new + 3
    if page_size is None:
        table, shape = None, (batch, capacity, nheads_k, headdim)
    else:
        pages = -(-capacity // page_size)
        table = rng.permutation(batch * pages + 2)[:batch * pages].reshape(batch, pages)
        table = table.astype(np.int32)
        shape = (batch * pages + 2, page_size, nheads_k, headdim)
    k_cache, v_cache = normal(rng, shape, dtype), normal(rng, shape, dtype)
    used = np.zeros(shape[:2], bool)
    for b in range(batch):
        pos = np.arange(lengths[b])
        if table is None:
            used[b, pos] = True
        else:
            used[table[b, pos // page_size], pos % page_size] = True
    k_cache[~used], v_cache[~used] = np.nan, np.nan
    new = [normal(rng, (batch, seqlen_new, nheads_k, headdim), dtype) if seqlen_new else None
           for _ in range(2)]
    return dict(q=normal(rng, (batch, seqlen_q, nheads, headdim), dtype), k_cache=k_cache,
                v_cache=v_cache, k=new[0], v=new[1], cache_seqlens=lengths, block_table=table)


def copies(problem):
    return {n: x.copy() if isinstance(x, np.ndarray) else x for n, x in problem.items()}


KV_LAYOUTS = {"contiguous": None, "page16": 16, "page32": 32}


@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("seqlen_q,seqlen_new", [(1, 0), (1, 1), (3, 3), (17, 17)],
                         ids=["decode", "append1", "append3", "append17"])
@pytest.mark.parametrize("layout", KV_LAYOUTS)
def test_flash_attn_with_kvcache(rng, layout, seqlen_q, seqlen_new, options):
    p = kv_problem(rng, seqlen_q=seqlen_q, seqlen_new=seqlen_new, page_size=KV_LAYOUTS[layout])
    fa, cf = resolve(options, rng, p["q"].shape[2], 3 if options == "alibi" else None)
    mine, theirs = copies(p), copies(p)
    out, lse = flash_attn_with_kvcache(**mine, **fa, return_softmax_lse=True)
    assert out.shape == p["q"].shape and lse.shape == (3, 4, seqlen_q)
    host = copies(p)
    check_forward(out, lse, lambda upcast: reference.attention_with_kvcache(
        **host, **cf, upcast=upcast))
    want_out, want_lse = cuflash.attention_with_kvcache(**theirs, **cf, return_lse=True)
    assert_same(out, want_out)
    assert_same(lse, want_lse)
    for name in ("k_cache", "v_cache"):  # the same append, in place
        assert_same(mine[name], theirs[name])
        if seqlen_new:
            assert not np.array_equal(bits(mine[name]), bits(p[name]))


def test_kvcache_positional_and_return_conventions(rng):
    p = kv_problem(rng, seqlen_new=1, page_size=16)
    mine, theirs = copies(p), copies(p)
    # flash-attn's positional order: q, k_cache, v_cache, k, v, rotary_cos, rotary_sin,
    # cache_seqlens, cache_batch_idx, cache_leftpad, block_table, softmax_scale, causal
    out = flash_attn_with_kvcache(mine["q"], mine["k_cache"], mine["v_cache"], mine["k"],
                                  mine["v"], None, None, mine["cache_seqlens"], None, None,
                                  mine["block_table"], 0.2, True)
    assert isinstance(out, np.ndarray)  # out alone without return_softmax_lse
    want = cuflash.attention_with_kvcache(
        theirs["q"], theirs["k_cache"], theirs["v_cache"], k=theirs["k"], v=theirs["v"],
        cache_seqlens=theirs["cache_seqlens"], block_table=theirs["block_table"], scale=0.2,
        causal=True)
    assert_same(out, want)
    assert_same(mine["k_cache"], theirs["k_cache"])


@pytest.mark.parametrize("num_splits", [0, 1, 7])
def test_kvcache_int_seqlens_and_num_splits(rng, num_splits):
    p = kv_problem(rng, lengths=(17, 17, 17), seqlen_new=2, nheads_k=1)
    mine, host = copies(p), copies(p)
    mine["cache_seqlens"] = host["cache_seqlens"] = 17
    out, lse = flash_attn_with_kvcache(**mine, num_splits=num_splits, causal=True,
                                       return_softmax_lse=True)
    check_forward(out, lse, lambda upcast: reference.attention_with_kvcache(
        **host, causal=True, upcast=upcast))


@pytest.mark.parametrize("layout", KV_LAYOUTS)
def test_kvcache_without_seqlens_reads_the_whole_cache(rng, layout):
    page = KV_LAYOUTS[layout]
    p = kv_problem(rng, lengths=(96, 96, 96), page_size=page)
    if page is None:
        p["k_cache"], p["v_cache"] = p["k_cache"][:, :96], p["v_cache"][:, :96]
    else:
        p["block_table"] = p["block_table"][:, :96 // page]
    p["cache_seqlens"] = None
    out, lse = flash_attn_with_kvcache(**p, return_softmax_lse=True)
    want = cuflash.attention_with_kvcache(**{**p, "cache_seqlens": 96}, return_lse=True)
    assert_same(out, want[0])
    assert_same(lse, want[1])
    assert np.isfinite(out).all()


# ------------------------------------------------------------------ errors and signatures


def test_dropout_raises_naming_it(rng):
    q = normal(rng, (1, 5, 2, 16))
    with pytest.raises(ValueError, match="dropout_p"):
        flash_attn_func(q, q, q, 0.1)
    with pytest.raises(ValueError, match="dropout_p"):
        flash_attn_qkvpacked_func(np.stack([q, q, q], axis=2), dropout_p=0.5)
    lengths = cu([5])
    with pytest.raises(ValueError, match="dropout_p"):
        flash_attn_varlen_func(q[0], q[0], q[0], lengths, lengths, 5, 5, dropout_p=0.1)
    flash_attn_func(q, q, q, 0.0)  # 0 is fine, positionally too


@pytest.mark.parametrize("name", ["rotary_cos", "rotary_sin", "cache_batch_idx",
                                  "cache_leftpad"])
def test_kvcache_unsupported_arguments_raise_naming_them(rng, name):
    p = kv_problem(rng, seqlen_new=1)
    before = copies(p)
    with pytest.raises(NotImplementedError, match=name):
        flash_attn_with_kvcache(**p, **{name: np.zeros((3, 8), np.float32)})
    for n in ("k_cache", "v_cache"):  # nothing appended
        assert_same(p[n], before[n])


def test_varlen_block_table_raises_naming_it(rng):
    lengths = cu([5, 3])
    q = normal(rng, (8, 2, 16))
    with pytest.raises(NotImplementedError, match="block_table"):
        flash_attn_varlen_func(q, q, q, lengths, lengths, 5, 5,
                               block_table=np.zeros((2, 1), np.int32))


def test_bad_arguments_name_them(rng):
    q = normal(rng, (1, 5, 2, 16))
    with pytest.raises(TypeError, match="window_size"):
        flash_attn_func(q, q, q, window_size=4)
    with pytest.raises(TypeError, match="return_attn_probs"):
        flash_attn_func(q, q, q, return_attn_probs="yes")
    with pytest.raises(TypeError, match="deterministic"):
        flash_attn_func(q, q, q, deterministic=None)
    with pytest.raises(ValueError, match="qkv"):
        flash_attn_qkvpacked_func(np.stack([q, q], axis=2))
    with pytest.raises(ValueError, match="kv"):
        flash_attn_kvpacked_func(q, q)
    p = kv_problem(rng)
    with pytest.raises(ValueError, match="num_splits"):
        flash_attn_with_kvcache(**p, num_splits=1000)


def test_deterministic_is_accepted(rng):
    q = normal(rng, (1, 17, 2, 16))
    assert_same(flash_attn_func(q, q, q, deterministic=True), cuflash.attention(q, q, q))


# flash-attn 2's signatures (flash_attn/flash_attn_interface.py): names, order, defaults
_DENSE = [("dropout_p", 0.0), ("softmax_scale", None), ("causal", False),
          ("window_size", (-1, -1)), ("softcap", 0.0), ("alibi_slopes", None),
          ("deterministic", False), ("return_attn_probs", False)]
SIGNATURES = {
    flash_attn_func: [("q",), ("k",), ("v",)] + _DENSE,
    flash_attn_qkvpacked_func: [("qkv",)] + _DENSE,
    flash_attn_kvpacked_func: [("q",), ("kv",)] + _DENSE,
    flash_attn_varlen_func: [("q",), ("k",), ("v",), ("cu_seqlens_q",), ("cu_seqlens_k",),
                             ("max_seqlen_q",), ("max_seqlen_k",)] + _DENSE
                            + [("block_table", None)],
    flash_attn_varlen_qkvpacked_func: [("qkv",), ("cu_seqlens",), ("max_seqlen",)] + _DENSE,
    flash_attn_varlen_kvpacked_func: [("q",), ("kv",), ("cu_seqlens_q",), ("cu_seqlens_k",),
                                      ("max_seqlen_q",), ("max_seqlen_k",)] + _DENSE,
    flash_attn_with_kvcache: [
        ("q",), ("k_cache",), ("v_cache",), ("k", None), ("v", None), ("rotary_cos", None),
        ("rotary_sin", None), ("cache_seqlens", None), ("cache_batch_idx", None),
        ("cache_leftpad", None), ("block_table", None), ("softmax_scale", None),
        ("causal", False), ("window_size", (-1, -1)), ("softcap", 0.0),
        ("rotary_interleaved", True), ("alibi_slopes", None), ("num_splits", 0),
        ("return_softmax_lse", False)],
}


@pytest.mark.parametrize("f", SIGNATURES, ids=lambda f: f.__name__)
def test_signatures_match_flash_attn(f):
    params = list(inspect.signature(f).parameters.values())
    assert [p.name for p in params] == [s[0] for s in SIGNATURES[f]]
    for p, s in zip(params, SIGNATURES[f]):
        assert p.kind is p.POSITIONAL_OR_KEYWORD
        assert p.default == (s[1] if len(s) == 2 else p.empty), p.name
        assert p.annotation is not p.empty, p.name  # type hints throughout


def test_docstring_examples_run():
    module = importlib.import_module("cuflash.flash_attn")
    for f in SIGNATURES:
        assert ">>>" in f.__doc__ and "Parameters" in f.__doc__ and "{" not in f.__doc__
    result = doctest.testmod(module, verbose=False)
    assert result.attempted >= 20 and result.failed == 0
