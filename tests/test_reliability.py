"""Issue 12 on the CPU: NaN propagation, kvcache inputs that must be rejected before anything
is written, paged caches without pages, and float32 gradients of rows that see one key.

docs/CONVENTIONS.md states the rules checked here. The GPU side of the same items is in
tests/test_reliability_gpu.py.
"""
import ml_dtypes
import numpy as np
import pytest

import cuflash
from accuracy import assert_close
from cuflash import reference

# No numpy RuntimeWarning (exp(-inf + inf), 0 * inf) on the paths below, NaN inputs included.
pytestmark = pytest.mark.filterwarnings("error")

BF16 = np.dtype(ml_dtypes.bfloat16)
F16 = np.dtype(np.float16)
F32 = np.dtype(np.float32)
F64 = np.dtype(np.float64)
DTYPES = [F16, BF16, F32, F64]


def normal(rng, shape, dtype=F32):
    return rng.standard_normal(shape).astype(dtype)


def nan_rows(out, lse):
    """(batch, nheads, seqlen_q) masks: rows whose out is NaN everywhere, rows whose out has a
    NaN; and lse's NaN mask."""
    o = np.isnan(out.astype(np.float64)).transpose(0, 2, 1, 3)
    return o.all(-1), o.any(-1), np.isnan(lse)


def assert_nan_exactly(out, lse, want):
    """Rows ``want`` (batch, nheads, seqlen_q) NaN in all of out and in lse; the others
    finite."""
    all_nan, any_nan, lse_nan = nan_rows(out, lse)
    assert (all_nan == want).all() and (any_nan == want).all(), "out's NaN rows"
    assert (lse_nan == want).all(), "lse's NaN rows"


# ------------------------------------------------------------------------- 4: NaN, dense


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("where", ["q", "k"])
def test_nan_score_gives_nan_out_and_lse_never_minus_inf(rng, dtype, where):
    # Causal 200 x 200 (two 128-row blocks): row i sees keys 0..i. A NaN in q row 150 is
    # seen by row 150 only; a NaN in key 150 by rows 150..199; a masked NaN score is -inf
    # before the softmax, so no other row meets it. Before the fix lse was -inf.
    q, k, v = (normal(rng, (2, 200, 4, 32), dtype) for _ in range(3))
    (q if where == "q" else k)[1, 150, 2, 5] = np.nan
    out, lse = cuflash.attention_forward(q, k, v, causal=True)
    want = np.zeros(lse.shape, bool)
    if where == "q":
        want[1, 2, 150] = True
    else:
        want[1, 2, 150:] = True
    assert_nan_exactly(out, lse, want)
    assert not np.isneginf(lse).any()
    ref = reference.attention_forward(q, k, v, causal=True)
    assert_nan_exactly(ref[0], ref[1], want)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_value_gives_nan_row_and_lse(rng, dtype):
    # A NaN value is seen by every row that sees its key: all of their out and their lse
    # are NaN (the LSE carries it, so that a merge keeps it). Rows that do not see it: the
    # reference leaves them alone; the CPU backend too when the key is in a block they skip.
    q, k, v = (normal(rng, (1, 300, 2, 16), dtype) for _ in range(3))
    v[0, 260, 1, 3] = np.nan
    out, lse = cuflash.attention_forward(q, k, v, causal=True)
    all_nan, any_nan, lse_nan = nan_rows(out, lse)
    assert all_nan[0, 1, 260:].all() and lse_nan[0, 1, 260:].all()
    assert not any_nan[0, 1, :256].any() and not lse_nan[0, 1, :256].any()  # other blocks
    assert not any_nan[0, 0].any() and not lse_nan[0, 0].any()  # the other head
    ref = reference.attention_forward(q, k, v, causal=True)
    want = np.zeros(lse.shape, bool)
    want[0, 1, 260:] = True
    assert_nan_exactly(ref[0], ref[1], want)


@pytest.mark.parametrize("what", ["k", "v", "kv"])
def test_rows_that_see_no_key_stay_zero_whatever_the_masked_keys_hold(rng, what):
    # seqlen_q 9 > seqlen_k 4 with causal: rows 0..4 see no key. NaN in every key and value
    # leaves them out 0, lse -inf; rows 5..8 see the NaN and are NaN.
    q = normal(rng, (1, 9, 2, 8))
    k, v = normal(rng, (1, 4, 2, 8)), normal(rng, (1, 4, 2, 8))
    if "k" in what:
        k[:] = np.nan
    if "v" in what:
        v[:] = np.nan
    for out, lse in (cuflash.attention_forward(q, k, v, causal=True),
                     reference.attention_forward(q, k, v, causal=True)):
        assert (out[:, :5] == 0).all() and np.isneginf(lse[..., :5]).all()
        assert np.isnan(out[:, 5:]).all() and np.isnan(lse[..., 5:]).all()


def test_nan_varlen_stays_in_its_sequence(rng):
    lengths = [5, 0, 40, 17]
    cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    q, k, v = (normal(rng, (int(cu[-1]), 2, 16)) for _ in range(3))
    k[cu[2] + 7, 0, 0] = np.nan  # sequence 2, key 7: rows 7.. of sequence 2, head 0
    out, lse = cuflash.attention_varlen_forward(q, k, v, cu, cu, 40, 40, causal=True)
    want = np.zeros(lse.shape, bool)  # (nheads, total_q)
    want[0, cu[2] + 7:cu[3]] = True
    assert (np.isnan(out).all(-1).T == want).all() and (np.isnan(out).any(-1).T == want).all()
    assert (np.isnan(lse) == want).all()


def test_nan_in_the_cache_reaches_the_rows_that_see_it(rng):
    q = normal(rng, (2, 1, 4, 32))
    k_cache, v_cache = normal(rng, (2, 64, 2, 32)), normal(rng, (2, 64, 2, 32))
    v_cache[0, 10, 1] = np.nan  # item 0 holds 20 keys: seen by the heads of kv head 1
    v_cache[1, 40, 0] = np.nan  # item 1 holds 30 keys: row 40 is not one of them
    out, lse = cuflash.attention_with_kvcache(q, k_cache, v_cache,
                                              cache_seqlens=np.int32([20, 30]),
                                              return_lse=True)
    want = np.zeros(lse.shape, bool)
    want[0, 2:] = True
    assert_nan_exactly(out, lse, want)


# ------------------------------------------------------------------------- 4: NaN, merge


@pytest.mark.parametrize("dtype", [BF16, F32, F64], ids=str)
@pytest.mark.parametrize("where", ["k", "v"])
def test_split_keys_merge_keeps_the_nan(rng, dtype, where):
    # A NaN in one split of K (or V): the merged rows are NaN where the unsplit call's are.
    # Before the fix the split's lse was -inf and the merge dropped it.
    q = normal(rng, (1, 6, 2, 16), dtype)
    k, v = normal(rng, (1, 50, 2, 16), dtype), normal(rng, (1, 50, 2, 16), dtype)
    (k if where == "k" else v)[0, 33, 1, 2] = np.nan
    whole = cuflash.attention_forward(q, k, v)
    parts = [cuflash.attention_forward(q, k[:, a:b], v[:, a:b]) for a, b in ((0, 30), (30, 50))]
    out, lse = cuflash.merge_attention([p[0] for p in parts], [p[1] for p in parts])
    want = np.zeros(lse.shape, bool)
    want[0, 1] = True  # every query row of head 1 sees key 33
    assert_nan_exactly(whole[0], whole[1], want)
    assert_nan_exactly(out, lse, want)


def test_merge_nan_lse_part_makes_the_row_nan_and_minus_inf_parts_add_nothing(rng):
    outs = [normal(rng, (2, 3, 4, 8)) for _ in range(3)]
    lses = [normal(rng, (2, 4, 3)) for _ in range(3)]
    lses[1][1, 2, 0] = np.nan          # row (b 1, h 2, i 0) of part 1 met a NaN
    outs[1][1, 0, 2] = np.nan
    lses[2][0, 0, 1] = -np.inf         # part 2 saw no key in row (0, 0, 1)
    outs[2][0, 1, 0] = np.nan          # whatever its out holds
    out, lse = cuflash.merge_attention(outs, lses)
    want = np.zeros(lse.shape, bool)
    want[1, 2, 0] = True
    assert_nan_exactly(out, lse, want)
    two, two_lse = cuflash.merge_attention(outs[:2], lses[:2])
    np.testing.assert_allclose(out[0, 1, 0], two[0, 1, 0], rtol=1e-6)
    np.testing.assert_allclose(lse[0, 0, 1], two_lse[0, 0, 1], rtol=1e-6)
    # A NaN lse next to parts that are all -inf is still NaN, not "no key".
    empty = np.full_like(lses[0], -np.inf)
    nan = np.full_like(lses[0], np.nan)
    out, lse = cuflash.merge_attention([outs[0]] * 3, [empty, nan, empty])
    assert np.isnan(out).all() and np.isnan(lse).all()


# ------------------------------------------------------------------------- 2: no pages


@pytest.mark.parametrize("seqlens", [0, 5], ids=["unused", "used"])
def test_paged_cache_without_pages_is_rejected(rng, seqlens):
    # Shape-only, so the GPU path (which reads no block table) rejects it alike; before,
    # a call that used no page passed on the CPU and both passed on the GPU.
    q = normal(rng, (2, 1, 2, 16))
    empty = np.zeros((0, 16, 1, 16), F32)
    table = np.zeros((2, 1), np.int32)
    with pytest.raises(ValueError, match="at least one page"):
        cuflash.attention_with_kvcache(q, empty, empty, cache_seqlens=seqlens,
                                       block_table=table)


# ------------------------------------------------------------------------- 7: bad caches


def _append_args(rng, batch=2, capacity=32, page_size=None, seqlens=(3, 7)):
    q = normal(rng, (batch, 1, 2, 16))
    k, v = normal(rng, (batch, 1, 1, 16)), normal(rng, (batch, 1, 1, 16))
    return q, k, v, np.int32(seqlens)


@pytest.mark.parametrize("layout", ["same", "overlap", "k_in_v_cache", "v_in_k_cache"])
def test_append_into_caches_that_share_memory_is_rejected(rng, layout):
    q, k, v, seqlens = _append_args(rng)
    buf = normal(rng, (2, 48, 1, 16))
    k_cache, v_cache = buf[:, :32], buf[:, 16:48]  # "overlap": rows 16..31 of both
    if layout == "same":
        k_cache = v_cache = buf[:, :32]
    elif layout in ("k_in_v_cache", "v_in_k_cache"):
        k_cache, v_cache = buf[:, :24], buf[:, 24:48]
        if layout == "k_in_v_cache":
            k = v_cache[:, 20:21]
        else:
            v = k_cache[:, 20:21]
    before = buf.copy()
    with pytest.raises(ValueError, match="share memory"):
        cuflash.attention_with_kvcache(q, k_cache, v_cache, k=k, v=v, cache_seqlens=seqlens)
    np.testing.assert_array_equal(buf, before)


def test_interleaved_views_of_one_buffer_are_separate_caches(rng):
    # kv[:, :, 0] and kv[:, :, 1] interleave without sharing a byte: accepted, and right.
    q, k, v, seqlens = _append_args(rng)
    kv = normal(rng, (2, 32, 2, 1, 16))
    k_cache, v_cache = kv[:, :, 0], kv[:, :, 1]
    want = reference.attention_with_kvcache(q, k_cache.copy(), v_cache.copy(), k=k, v=v,
                                            cache_seqlens=seqlens)
    out, lse = cuflash.attention_with_kvcache(q, k_cache, v_cache, k=k, v=v,
                                              cache_seqlens=seqlens, return_lse=True)
    naive = reference.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens + 1,
                                             upcast=False)
    assert_close("out", out, want[0], naive[0])
    assert_close("lse", lse, want[1], naive[1])
    np.testing.assert_array_equal(k_cache[np.arange(2), seqlens], k[:, 0])
    np.testing.assert_array_equal(v_cache[np.arange(2), seqlens], v[:, 0])


def test_one_array_for_both_caches_is_fine_without_append(rng):
    q, _, _, seqlens = _append_args(rng)
    cache = normal(rng, (2, 32, 1, 16))
    out = cuflash.attention_with_kvcache(q, cache, cache, cache_seqlens=seqlens)
    want = reference.attention_with_kvcache(q, cache, cache, cache_seqlens=seqlens)[0]
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("which", ["k_cache", "v_cache"])
def test_read_only_cache_is_rejected_before_anything_is_written(rng, which):
    # Before, k_cache was written and then NumPy refused v_cache: half an append.
    q, k, v, seqlens = _append_args(rng)
    caches = {"k_cache": normal(rng, (2, 32, 1, 16)), "v_cache": normal(rng, (2, 32, 1, 16))}
    caches[which].flags.writeable = False
    before = {n: c.copy() for n, c in caches.items()}
    with pytest.raises(ValueError, match=f"{which} is read-only"):
        cuflash.attention_with_kvcache(q, **caches, k=k, v=v, cache_seqlens=seqlens)
    for n, c in caches.items():
        np.testing.assert_array_equal(c, before[n])
    # Read-only caches are fine when nothing is appended.
    cuflash.attention_with_kvcache(q, **caches, cache_seqlens=seqlens)


def _paged(rng, table, seqlens, num_blocks=6):
    q, k, v, seqlens = _append_args(rng, batch=len(table), seqlens=seqlens)
    k_cache, v_cache = (normal(rng, (num_blocks, 16, 1, 16)) for _ in range(2))
    return q, k, v, seqlens, k_cache, v_cache, np.int32(table)


@pytest.mark.parametrize("case", ["two-items", "twice-in-one-row"])
def test_append_into_a_shared_page_is_rejected(rng, case):
    # Item 0 holds 20 keys in pages [0, 1], item 1 holds 5. The append writes key 20 of item
    # 0 (page 1) and key 5 of item 1 (its first page): a written page that another entry in
    # use names would change other keys.
    table = [[0, 1], [1, 2]] if case == "two-items" else [[0, 1], [3, 3]]
    seqlens = (20, 5) if case == "two-items" else (20, 20)
    q, k, v, seqlens, k_cache, v_cache, table = _paged(rng, table, seqlens)
    before = k_cache.copy(), v_cache.copy()
    with pytest.raises(ValueError, match="other entries in use also name"):
        cuflash.attention_with_kvcache(q, k_cache, v_cache, k=k, v=v, cache_seqlens=seqlens,
                                       block_table=table)
    np.testing.assert_array_equal(k_cache, before[0])
    np.testing.assert_array_equal(v_cache, before[1])


def test_shared_pages_that_are_only_read_are_fine(rng):
    # A common prefix: page 0 is read by both items; each appends into a page of its own.
    table = [[0, 1], [0, 2]]
    q, k, v, seqlens, k_cache, v_cache, table = _paged(rng, table, (20, 16))
    want = reference.attention_with_kvcache(q, k_cache, v_cache, k=k, v=v,
                                            cache_seqlens=seqlens, block_table=table)
    out = cuflash.attention_with_kvcache(q, k_cache, v_cache, k=k, v=v, cache_seqlens=seqlens,
                                         block_table=table)
    np.testing.assert_allclose(out, want[0], rtol=1e-5, atol=1e-5)
    # Without an append, any sharing is only reading.
    cuflash.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens,
                                   block_table=np.int32([[1, 1], [1, 1]]))


# ----------------------------------------------------------- 1: lengths near 2^31 (NumPy)


@pytest.mark.parametrize("page_size", [None, 16])
def test_cache_seqlens_near_int32_max_are_rejected_on_the_cpu(rng, page_size):
    q, k, v, _ = _append_args(rng)
    shape = (2, 32, 1, 16) if page_size is None else (4, 16, 1, 16)
    k_cache, v_cache = normal(rng, shape), normal(rng, shape)
    table = None if page_size is None else np.int32([[0, 1], [2, 3]])
    before = k_cache.copy()
    with pytest.raises(ValueError, match="cache_seqlens"):
        cuflash.attention_with_kvcache(q, k_cache, v_cache, k=k, v=v,
                                       cache_seqlens=np.int32([3, 2**31 - 1]),
                                       block_table=table)
    np.testing.assert_array_equal(k_cache, before)


# --------------------------------------------------------------- 8: one key, float32 dQ


def _one_key_check(q, k, v, dout, **options):
    out, lse = cuflash.attention_forward(q, k, v, **options)
    grads = cuflash.attention_backward(dout, q, k, v, out, lse, **options)
    ref = reference.attention_backward(dout, q, k, v, **options)
    naive = reference.attention_backward(dout, q, k, v, upcast=False, **options)
    for name, got, r, n in zip(("dq", "dk", "dv"), grads, ref, naive):
        assert_close(name, got, r, n)
    return grads


def test_float32_dq_of_a_row_that_sees_one_key_seed_52():
    # The case: |dq| was 2.5e-5 where the exact answer is 0 (floor 1.5e-5).
    rng = np.random.default_rng(52)
    q, k, v, dout = (rng.standard_normal((1, 1, 1, 256)).astype(F32) for _ in range(4))
    dq, dk, _ = _one_key_check(q, k, v, dout, scale=1.0)
    assert (dq == 0).all() and (dk == 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rows_that_see_one_key_get_zero_dq_and_dk(rng, dtype):
    # window (0, 0): every row sees only its own key, so dS = 0 exactly and dQ = dK = 0,
    # over several 128-key blocks and GQA.
    q, dout = (normal(rng, (2, 300, 4, 64), dtype) for _ in range(2))
    k, v = (normal(rng, (2, 300, 2, 64), dtype) for _ in range(2))
    dq, dk, dv = _one_key_check(q, k, v, dout, window=(0, 0), scale=1.0)
    assert (dq.astype(F64) == 0).all() and (dk.astype(F64) == 0).all()


def test_float32_one_dominant_key_meets_the_accuracy_rule(rng):
    # Near one-hot rows: key 0 scores ~60 above the others, P = 1 in float32.
    q, k, v, dout = (normal(rng, (1, 16, 2, 128)) for _ in range(4))
    k[:, 0] = q.mean(1)[:, :2] * 6
    for seed in range(5):
        _one_key_check(q, k, v, dout, scale=1.0)
        dout = normal(np.random.default_rng(seed), dout.shape)
