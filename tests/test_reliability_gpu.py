"""Issue 12 on the GPU (marker gpu): nothing outside the caches is touched whatever
cache_seqlens and block tables hold, the Hopper dQ convert past 2^24 rows, NaN through every
kernel (forward, split-KV decode and its merge, merge_attention), and kvcache inputs that
must be rejected. Public API and CuPy only. Items 1 and 2 are meant to run under
``compute-sanitizer --tool memcheck`` too (0 errors), e.g.

    compute-sanitizer --tool memcheck .venv/bin/python -m pytest -q \\
        tests/test_reliability_gpu.py -k "huge or pages"

The CPU side and the rules (docs/CONVENTIONS.md) are in tests/test_reliability.py.
"""
import ml_dtypes
import numpy as np
import pytest

import cuflash
from accuracy import assert_close
from cuflash import reference

pytestmark = pytest.mark.gpu

BF16 = np.dtype(ml_dtypes.bfloat16)
F16 = np.dtype(np.float16)
F32 = np.dtype(np.float32)
INT32_MAX = 2**31 - 1


def _cupy():
    import cupy
    return cupy


def _host(x):
    return x.get() if hasattr(x, "get") else np.asarray(x)


def _f64(x):
    return _host(x).astype(np.float64)


def normal(rng, shape, dtype):
    return rng.standard_normal(shape).astype(dtype)


def _nan_rows_are_whole(out, lse):
    """Every row (b, i, h) of out is NaN nowhere or everywhere, and NaN exactly where its
    lse is; returns the (batch, nheads, seqlen_q) mask of NaN rows."""
    o = np.isnan(_f64(out)).transpose(0, 2, 1, 3)
    lse_nan = np.isnan(_host(lse))
    assert (o.any(-1) == o.all(-1)).all(), "a row of out is NaN in some entries only"
    assert (o.all(-1) == lse_nan).all(), "out's NaN rows differ from lse's"
    return lse_nan


# ------------------------------------------------- 1: cache_seqlens near 2^31, append


def _guarded(cupy, host, guard=2):
    """``host`` on the device inside a larger buffer of the same rows: (the cache view, the
    buffer). Guard rows of NaN before and after, which no call may touch."""
    pad = np.full((guard, *host.shape[1:]), np.nan, host.dtype)
    buf = cupy.asarray(np.concatenate([pad, host, pad]))
    return buf[guard:guard + host.shape[0]], buf


@pytest.mark.parametrize("num_splits", [None, 1, 3])
@pytest.mark.parametrize("dtype", [BF16, F16, F32], ids=str)
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_huge_cache_seqlens_stay_inside_the_caches(rng, paged, dtype, num_splits):
    # cache_seqlens near 2^31 and negative, with 3 new keys: in int32, max(cached, 0) + t
    # wrapped to a negative row that passed the capacity test (append) and a negative
    # length (decode). Now, clamped in 64 bits: an item past the capacity appends nothing
    # and attends over its whole cache; a negative one holds 0 keys and appends at row 0.
    cupy = _cupy()
    batch, nheads, nheads_kv, hd, cap, new = 4, 4, 2, 64, 64, 3
    seqlens = np.int32([5, INT32_MAX, INT32_MAX - 1, -7])
    q = normal(rng, (batch, 1, nheads, hd), dtype)
    k, v = (normal(rng, (batch, new, nheads_kv, hd), dtype) for _ in range(2))
    if paged:
        table = rng.permutation(batch * 4 + 1)[:batch * 4].reshape(batch, 4).astype(np.int32)
        shape = (batch * 4 + 1, 16, nheads_kv, hd)
    else:
        table, shape = None, (batch, cap, nheads_kv, hd)
    k_cache, v_cache = normal(rng, shape, dtype), normal(rng, shape, dtype)
    (gk, kbuf), (gv, vbuf) = _guarded(cupy, k_cache), _guarded(cupy, v_cache)
    out, lse = cuflash.attention_with_kvcache(
        cupy.asarray(q), gk, gv, k=cupy.asarray(k), v=cupy.asarray(v),
        cache_seqlens=cupy.asarray(seqlens),
        block_table=None if table is None else cupy.asarray(table), num_splits=num_splits,
        return_lse=True)
    cupy.cuda.Device().synchronize()
    for buf in (kbuf, vbuf):
        host = _host(buf)
        assert np.isnan(host[:2].astype(F32)).all() and np.isnan(host[-2:].astype(F32)).all()

    # What the clamps define, on the CPU: items 0 and 3 append at 5 and 0; items 1 and 2
    # append nothing and attend over their whole caches.
    want_k, want_v = k_cache.copy(), v_cache.copy()
    start = {0: 5, 3: 0}
    ref_opts = dict(block_table=table)
    for b in (0, 3):
        one = dict(cache_seqlens=np.int32([start[b]]),
                   block_table=None if table is None else table[b:b + 1])
        kb, vb = (want_k, want_v) if table is not None else (want_k[b:b + 1], want_v[b:b + 1])
        cuflash.attention_with_kvcache(q[b:b + 1], kb, vb, k=k[b:b + 1], v=v[b:b + 1], **one)
    np.testing.assert_array_equal(_host(gk).view(np.uint8), want_k.view(np.uint8))
    np.testing.assert_array_equal(_host(gv).view(np.uint8), want_v.view(np.uint8))
    lengths = np.int32([8, cap, cap, 3])
    ref = reference.attention_with_kvcache(q, want_k, want_v, cache_seqlens=lengths, **ref_opts)
    naive = reference.attention_with_kvcache(q, want_k, want_v, cache_seqlens=lengths,
                                             upcast=False, **ref_opts)
    assert_close("out", out, ref[0], naive[0])
    assert_close("lse", lse, ref[1], naive[1])


@pytest.mark.parametrize("dtype", [BF16, F32], ids=str)
def test_huge_int_cache_seqlen_is_rejected_on_the_host(rng, dtype):
    cupy = _cupy()
    q = cupy.asarray(normal(rng, (2, 1, 2, 64), dtype))
    cache = cupy.asarray(normal(rng, (2, 32, 1, 64), dtype))
    with pytest.raises(ValueError, match="cache_seqlens"):
        cuflash.attention_with_kvcache(q, cache, cache.copy(), cache_seqlens=INT32_MAX)


# ------------------------------------------------------------------ 2: paged, no pages


@pytest.mark.parametrize("dtype", [BF16, F32], ids=str)
def test_paged_cache_without_pages_is_rejected_on_the_gpu(rng, dtype):
    cupy = _cupy()
    q = cupy.asarray(normal(rng, (2, 1, 2, 64), dtype))
    empty = cupy.zeros((0, 16, 1, 64), dtype)
    k = cupy.asarray(normal(rng, (2, 1, 1, 64), dtype))
    with pytest.raises(ValueError, match="at least one page"):
        cuflash.attention_with_kvcache(q, empty, cupy.zeros_like(empty), k=k, v=k.copy(),
                                       cache_seqlens=cupy.asarray(np.int32([0, 3])),
                                       block_table=cupy.zeros((2, 2), cupy.int32))


@pytest.mark.parametrize("dtype", [BF16, F32], ids=str)
def test_one_page_and_wild_block_table_stay_inside_the_caches(rng, dtype):
    # One page: every entry clamps to page 0 (-1 would be before the caches).
    cupy = _cupy()
    q = normal(rng, (2, 1, 2, 64), dtype)
    k = normal(rng, (2, 1, 1, 64), dtype)
    k_cache, v_cache = normal(rng, (1, 16, 1, 64), dtype), normal(rng, (1, 16, 1, 64), dtype)
    (gk, kbuf), (gv, vbuf) = _guarded(cupy, k_cache), _guarded(cupy, v_cache)
    table = np.int32([[-1, INT32_MAX], [-(2**31), 7]])
    out = cuflash.attention_with_kvcache(cupy.asarray(q), gk, gv, k=cupy.asarray(k),
                                         v=cupy.asarray(k), cache_seqlens=cupy.asarray(np.int32([20, 3])),
                                         block_table=cupy.asarray(table), num_splits=2)
    cupy.cuda.Device().synchronize()
    for buf in (kbuf, vbuf):
        host = _host(buf).astype(F32)
        assert np.isnan(host[:2]).all() and np.isnan(host[-2:]).all()
    assert np.isfinite(_f64(out)).all()


# ------------------------------------------------- 3: sm90 dQ convert past 2^24 rows


def _upload(dst, host):
    """Copy a C-contiguous host array into the C-contiguous device view ``dst``."""
    host = np.ascontiguousarray(host)
    assert dst.flags.c_contiguous and dst.nbytes == host.nbytes
    dst.data.copy_from_host(host.ctypes.data, host.nbytes)


def _long_backward(cupy, hosts, n, hd, window, last):
    """Forward and backward on (1, n, 1, hd) inputs that are 0 but for their last rows
    (``hosts``); the host copies of out, dq, dk, dv and lse over the last ``last`` rows."""
    q, k, v, dout = (cupy.zeros((1, n, 1, hd), BF16) for _ in range(4))
    for dev, host in zip((q, k, v, dout), hosts):
        _upload(dev[0, n - host.shape[1]:], host[0])
    out, lse = cuflash.attention_forward(q, k, v, window=window)
    dq, dk, dv = cuflash.attention_backward(dout, q, k, v, out, lse, window=window)
    rows = slice(n - last, n)
    return [_host(x[:, rows]) for x in (out, dq, dk, dv)], _host(lse[:, :, rows])


def test_backward_past_2_to_the_24_rows_at_headdim_128(rng):
    # bwd_convert_dq_sm90 computed its dq_accum offset (row / 64) * (D / 64) * 4096 in
    # int32: past 2^24 rows at D = 128 it wrapped. A sliding window keeps the work small;
    # rows before the last 1024 are 0; the last 256 rows (all past 2^24) are compared with
    # the reference on a slice that holds every key they see. About 40 GiB of device memory
    # (8 arrays of 4 GiB and the float32 dQ accumulator); on other GPUs than Hopper it
    # checks the mma.sync backward at that length.
    cupy = _cupy()
    n, hd, window, tail, last = 2**24 + 256, 128, (64, 0), 1024, 256
    free, _ = cupy.cuda.runtime.memGetInfo()
    if free < 48 * 2**30:
        pytest.skip("needs ~48 GiB of free device memory")
    hosts = [normal(rng, (1, tail, 1, hd), BF16) for _ in range(4)]
    try:
        got, got_lse = _long_backward(cupy, hosts, n, hd, window, last)
    finally:
        cupy.get_default_memory_pool().free_all_blocks()
    hq, hk, hv, hdo = hosts
    qs, dos = hq[:, -last:], hdo[:, -last:]
    ks, vs = hk[:, -last - window[0]:], hv[:, -last - window[0]:]
    ref, naive = (reference.attention_forward(qs, ks, vs, window=window, upcast=u)
                  for u in (True, False))
    assert_close("out", got[0], ref[0], naive[0])
    assert_close("lse", got_lse, ref[1], naive[1])
    ref, naive = (reference.attention_backward(dos, qs, ks, vs, window=window, upcast=u)
                  for u in (True, False))
    assert_close("dq", got[1], ref[0], naive[0])
    # Keys of the last rows are seen only by queries among those rows.
    assert_close("dk", got[2], ref[1][:, -last:], naive[1][:, -last:])
    assert_close("dv", got[3], ref[2][:, -last:], naive[2][:, -last:])


# ------------------------------------------------------------------------- 4: NaN


@pytest.mark.parametrize("headdim", [64, 96, 128])
@pytest.mark.parametrize("dtype", [BF16, F16, F32], ids=str)
@pytest.mark.parametrize("where", ["q", "k", "v"])
def test_forward_nan_reaches_out_and_lse(rng, where, dtype, headdim):
    # Causal 300 x 300: a NaN at row / key 200 of head 1. q: row 200 alone; k: rows
    # 200..299 (a masked NaN score is -inf first); v: at least rows 200..299, maybe more
    # rows of the tiles that hold key 200. Every NaN row is NaN whole, lse included (the
    # kernels gave lse = -inf); no other head is touched. Before the fix lse was -inf.
    cupy = _cupy()
    q, k, v = (normal(rng, (2, 300, 4, headdim), dtype) for _ in range(3))
    (q if where == "q" else k if where == "k" else v)[1, 200, 1, 7] = np.nan
    out, lse = cuflash.attention_forward(*(cupy.asarray(x) for x in (q, k, v)), causal=True)
    nan = _nan_rows_are_whole(out, lse)
    want = np.zeros(nan.shape, bool)
    if where == "q":
        want[1, 1, 200] = True
    else:
        want[1, 1, 200:] = True
    if where == "v":
        assert (nan >= want).all() and not nan[0].any() and not nan[1, [0, 2, 3]].any()
    else:
        assert (nan == want).all()
    assert not np.isneginf(_host(lse)).any()


@pytest.mark.parametrize("dtype", [BF16, F32], ids=str)
@pytest.mark.parametrize("what", ["k", "v"])
def test_rows_that_see_no_key_stay_zero_with_nan_in_masked_keys(rng, dtype, what):
    # seqlen_q 40 > seqlen_k 24, causal: rows 0..15 see no key. NaN in every key (or value)
    # leaves them out 0 and lse -inf (a masked NaN value used to give 0 * NaN = NaN).
    cupy = _cupy()
    q = normal(rng, (1, 40, 2, 64), dtype)
    k, v = normal(rng, (1, 24, 2, 64), dtype), normal(rng, (1, 24, 2, 64), dtype)
    (k if what == "k" else v)[:] = np.nan
    out, lse = cuflash.attention_forward(*(cupy.asarray(x) for x in (q, k, v)), causal=True)
    out, lse = _f64(out), _host(lse)
    assert (out[:, :16] == 0).all() and np.isneginf(lse[..., :16]).all()
    assert np.isnan(out[:, 16:]).all() and np.isnan(lse[..., 16:]).all()


@pytest.mark.parametrize("dtype", [BF16, F32], ids=str)
def test_varlen_nan_stays_in_its_sequence(rng, dtype):
    cupy = _cupy()
    lengths = [70, 0, 200, 33]
    cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    q, k, v = (normal(rng, (int(cu[-1]), 2, 64), dtype) for _ in range(3))
    k[cu[2] + 150, 0, 3] = np.nan
    out, lse = cuflash.attention_varlen_forward(*(cupy.asarray(x) for x in (q, k, v)), cu, cu,
                                                200, 200, causal=True)
    want = np.zeros((2, int(cu[-1])), bool)
    want[0, cu[2] + 150:cu[3]] = True
    o = np.isnan(_f64(out))
    assert (o.all(-1).T == want).all() and (o.any(-1).T == want).all()
    assert (np.isnan(_host(lse)) == want).all()


@pytest.mark.parametrize("num_splits", [1, 4])
@pytest.mark.parametrize("dtype", [BF16, F16, F32], ids=str)
@pytest.mark.parametrize("where", ["k", "v"])
def test_decode_nan_survives_the_split_merge(rng, where, dtype, num_splits):
    # A NaN in one cached key (or value) of item 1, kv head 0: the query heads of that kv
    # head (0, 1) are NaN, out and lse, whatever the split; before, a split whose lse was
    # -inf (NaN key) or finite (NaN value, under a weight) dropped or half-kept it.
    cupy = _cupy()
    q = normal(rng, (2, 1, 4, 128), dtype)
    k_cache, v_cache = (normal(rng, (2, 1000, 2, 128), dtype) for _ in range(2))
    (k_cache if where == "k" else v_cache)[1, 700, 0, 9] = np.nan
    out, lse = cuflash.attention_with_kvcache(
        cupy.asarray(q), cupy.asarray(k_cache), cupy.asarray(v_cache),
        cache_seqlens=cupy.asarray(np.int32([900, 900])), num_splits=num_splits, return_lse=True)
    nan = _nan_rows_are_whole(out, lse)
    want = np.zeros(nan.shape, bool)
    want[1, :2] = True
    assert (nan == want).all()


@pytest.mark.parametrize("dtype", [BF16, F16, F32], ids=str)
def test_merge_kernel_nan_and_minus_inf_parts(rng, dtype):
    cupy = _cupy()
    outs = normal(rng, (3, 2, 3, 4, 64), dtype)
    lses = normal(rng, (3, 2, 4, 3), F32)
    lses[1, 1, 2, 0] = np.nan            # (b 1, h 2, i 0) met a NaN in part 1
    lses[2, 0, 0, 1] = -np.inf           # part 2 saw no key in (b 0, h 0, i 1) ...
    outs[2, 0, 1, 0] = np.nan            # ... whatever its out holds
    lses[:, 0, 3, 2] = [-np.inf, np.nan, -np.inf]  # NaN among parts that saw nothing
    out, lse = cuflash.merge_attention(cupy.asarray(outs), cupy.asarray(lses))
    nan = _nan_rows_are_whole(out, lse)
    want = np.zeros(nan.shape, bool)
    want[1, 2, 0] = want[0, 3, 2] = True
    assert (nan == want).all()
    cpu_out, cpu_lse = cuflash.merge_attention(outs, lses)
    ok = ~want.transpose(0, 2, 1)
    np.testing.assert_allclose(_f64(out)[ok], cpu_out.astype(np.float64)[ok], rtol=2e-2,
                               atol=2e-2)
    np.testing.assert_allclose(_host(lse)[~want], cpu_lse[~want], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------- 7: bad caches


def test_append_into_one_array_for_both_caches_is_rejected(rng):
    cupy = _cupy()
    q = cupy.asarray(normal(rng, (2, 1, 2, 64), BF16))
    k = cupy.asarray(normal(rng, (2, 1, 1, 64), BF16))
    cache = cupy.asarray(normal(rng, (2, 32, 1, 64), BF16))
    other = cache.copy()
    before = _host(cache)
    # A first call with separate caches, then one of the same layout with one array for
    # both: the second must not ride on a remembered (memoized) validation.
    cuflash.attention_with_kvcache(q, cache, other, k=k, v=k, cache_seqlens=3)
    before = _host(cache)
    for v_cache in (cache, cache[:, :]):
        with pytest.raises(ValueError, match="share memory"):
            cuflash.attention_with_kvcache(q, cache, v_cache, k=k, v=k, cache_seqlens=4)
    with pytest.raises(ValueError, match="share memory"):
        cuflash.attention_with_kvcache(q, cache, other, k=other[:, 10:11], v=k,
                                       cache_seqlens=4)
    cupy.cuda.Device().synchronize()
    np.testing.assert_array_equal(_host(cache).view(np.uint8), before.view(np.uint8))
    # Without an append, one array for both is only read.
    cuflash.attention_with_kvcache(q, cache, cache, cache_seqlens=4)


@pytest.mark.parametrize("dtype", [BF16, F32], ids=str)
def test_interleaved_views_of_one_device_buffer_are_separate_caches(rng, dtype):
    cupy = _cupy()
    q = normal(rng, (2, 1, 4, 64), dtype)
    k, v = (normal(rng, (2, 2, 2, 64), dtype) for _ in range(2))
    kv = normal(rng, (2, 48, 2, 2, 64), dtype)
    lengths = np.int32([9, 30])
    gkv = cupy.asarray(kv)
    out = cuflash.attention_with_kvcache(cupy.asarray(q), gkv[:, :, 0], gkv[:, :, 1],
                                         k=cupy.asarray(k), v=cupy.asarray(v),
                                         cache_seqlens=cupy.asarray(lengths))
    want = cuflash.attention_with_kvcache(q, kv[:, :, 0], kv[:, :, 1], k=k, v=v,
                                          cache_seqlens=lengths)
    np.testing.assert_allclose(_f64(out), want.astype(np.float64), rtol=2e-2, atol=2e-2)
    np.testing.assert_array_equal(_host(gkv).view(np.uint8), kv.view(np.uint8))
