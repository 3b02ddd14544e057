"""merge_attention: attention over disjoint key ranges, merged, equals attention over all.

Parts come from attention_forward over 2 to 4 key ranges without a mask (a bottom-right
aligned mask would shift with each part's seqlen_k), and the merge is held to the accuracy
rule against the float64 reference over every key. The -inf rules (an empty part adds
nothing, even NaN; all-empty rows give 0 and -inf) are checked exactly.
"""
import ml_dtypes
import numpy as np
import pytest

import cuflash
from accuracy import FLOORS, assert_close
from cuflash import reference
from gpu import poisoned

pytestmark = pytest.mark.filterwarnings("error")  # no exp(-inf + inf) or 0 * inf on the CPU

BF16 = np.dtype(ml_dtypes.bfloat16)
F16 = np.dtype(np.float16)
F32 = np.dtype(np.float32)
F64 = np.dtype(np.float64)


def split_problem(rng, dtype, bounds, batch=2, seqlen_q=5, nheads=4, nheads_kv=2, headdim=32,
                  xp=np):
    """q, k, v and the (outs, lses) of attention_forward over keys [bounds[s], bounds[s+1]).

    The parts are computed on the CPU and handed over as ``xp`` arrays, so that GPU tests
    exercise the merge kernel alone.
    """
    seqlen_k = bounds[-1]
    q = rng.standard_normal((batch, seqlen_q, nheads, headdim)).astype(dtype)
    k = rng.standard_normal((batch, seqlen_k, nheads_kv, headdim)).astype(dtype)
    v = rng.standard_normal((batch, seqlen_k, nheads_kv, headdim)).astype(dtype)
    parts = [cuflash.attention_forward(q, k[:, lo:hi], v[:, lo:hi])
             for lo, hi in zip(bounds[:-1], bounds[1:])]
    return (q, k, v), [xp.asarray(o) for o, _ in parts], [xp.asarray(lse) for _, lse in parts]


def check_merge(rng, dtype, bounds, stacked=False, xp=np, merge=None, **shape):
    (q, k, v), outs, lses = split_problem(rng, dtype, bounds, xp=xp, **shape)
    if stacked:
        outs, lses = xp.stack(outs), xp.stack(lses)
    out, lse = (merge or cuflash.merge_attention)(outs, lses)
    assert out.dtype == dtype and out.shape == q.shape
    assert lse.dtype == np.float32 and lse.shape == (q.shape[0], q.shape[2], q.shape[1])
    ref = reference.attention_forward(q, k, v)
    naive = reference.attention_forward(q, k, v, upcast=False)
    # lses are float32 whatever the parts' dtype, so float64 parts merge float32-accurately.
    floor = FLOORS[F32] if dtype == F64 else None
    where = f"{dtype} bounds {bounds} stacked={stacked}"
    assert_close(f"out ({where})", out, ref[0], naive[0], floor=floor)
    assert_close(f"lse ({where})", lse, ref[1], naive[1], floor=floor)
    return out, lse


BOUNDS = {"2": (0, 37, 64), "3": (0, 1, 50, 129), "4": (0, 20, 21, 100, 150)}


# ------------------------------------------------------------------------------- CPU


@pytest.mark.parametrize("stacked", [False, True], ids=["list", "stacked"])
@pytest.mark.parametrize("bounds", BOUNDS, ids=list(BOUNDS))
@pytest.mark.parametrize("dtype", [F16, BF16, F32, F64], ids=str)
def test_cpu_split_equals_unsplit(rng, dtype, bounds, stacked):
    check_merge(rng, dtype, BOUNDS[bounds], stacked)


def test_cpu_one_part_is_the_identity(rng):
    _, outs, lses = split_problem(rng, BF16, (0, 30))
    out, lse = cuflash.merge_attention(outs, lses)
    np.testing.assert_array_equal(out, outs[0])
    np.testing.assert_array_equal(lse, lses[0])


def test_cpu_empty_part_adds_nothing_even_nan(rng):
    _, outs, lses = split_problem(rng, F32, (0, 30))
    garbage = np.full_like(outs[0], np.nan)
    empty = np.full_like(lses[0], -np.inf)
    out, lse = cuflash.merge_attention([garbage, outs[0], garbage], [empty, lses[0], empty])
    np.testing.assert_array_equal(out, outs[0])
    np.testing.assert_array_equal(lse, lses[0])


def test_cpu_rows_empty_in_some_parts(rng):
    # Rows that one part never saw merge to the other part's rows exactly.
    _, outs, lses = split_problem(rng, F32, (0, 30, 70))
    outs[1][:, 2] = np.inf
    lses[1][:, :, 2] = -np.inf
    out, lse = cuflash.merge_attention(outs, lses)
    np.testing.assert_array_equal(out[:, 2], outs[0][:, 2])
    np.testing.assert_array_equal(lse[:, :, 2], lses[0][:, :, 2])
    assert np.isfinite(out).all()


@pytest.mark.parametrize("dtype", [BF16, F64], ids=str)
def test_cpu_all_parts_empty(dtype):
    outs = np.full((3, 2, 4, 5, 16), np.nan, dtype)
    lses = np.full((3, 2, 5, 4), -np.inf, np.float32)
    out, lse = cuflash.merge_attention(outs, lses)
    assert (out.astype(np.float64) == 0).all() and np.isneginf(lse).all()


def test_cpu_order_does_not_matter(rng):
    _, outs, lses = split_problem(rng, F32, BOUNDS["4"])
    a = cuflash.merge_attention(outs, lses)
    b = cuflash.merge_attention(outs[::-1], lses[::-1])
    np.testing.assert_allclose(a[0], b[0], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(a[1], b[1], rtol=1e-6)


def test_cpu_empty_shapes():
    out, lse = cuflash.merge_attention([np.zeros((0, 3, 2, 8), np.float16)] * 2,
                                       [np.zeros((0, 2, 3), np.float32)] * 2)
    assert out.shape == (0, 3, 2, 8) and out.dtype == np.float16 and lse.shape == (0, 2, 3)


def test_cpu_inputs_are_not_modified(rng):
    _, outs, lses = split_problem(rng, F32, BOUNDS["3"])
    copies = [x.copy() for x in outs + lses]
    cuflash.merge_attention(outs, lses)
    for x, c in zip(outs + lses, copies):
        np.testing.assert_array_equal(x, c)


def _parts(n=2, shape=(2, 3, 4, 8), dtype=np.float32):
    return [np.zeros(shape, dtype) for _ in range(n)], [
        np.zeros((shape[0], shape[2], shape[1]), np.float32) for _ in range(n)]


@pytest.mark.parametrize("make, error, match", [
    (lambda o, l: ([], []), ValueError, "outs must hold at least one part"),
    (lambda o, l: (np.zeros((0, 2, 3, 4, 8), np.float32), l), ValueError, "at least one"),
    (lambda o, l: (o, l[:1]), ValueError, "outs has 2 parts but lses has 1"),
    (lambda o, l: (o[0], l), ValueError, "stacked along a leading parts axis"),
    (lambda o, l: (o, np.stack(l)[0]), ValueError, "lses as one array"),
    (lambda o, l: ([o[0], o[1][:, :2]], l), ValueError, r"outs\[1\] has shape"),
    (lambda o, l: ([o[0], o[1].astype(np.float16)], l), TypeError, r"outs\[1\] has dtype"),
    (lambda o, l: ([x.astype(np.int32) for x in o], l), TypeError, "not supported"),
    (lambda o, l: ([x[None] for x in o], l), ValueError, "outs\\[0\\] must have 4"),
    (lambda o, l: (o, [l[0], l[1].astype(np.float64)]), TypeError, r"lses\[1\] must be float32"),
    (lambda o, l: (o, [l[0], l[1][:, :, :2]]), ValueError, r"lses\[1\] must have shape"),
    (lambda o, l: ([o[0], np.zeros((2, 3, 4, 16), np.float32)[..., ::2]], l), ValueError,
     "contiguous in its last axis"),
    (lambda o, l: ([o[0], "x"], l), TypeError, r"outs\[1\]"),
    (lambda o, l: (o, None), TypeError, "lses"),
])
def test_invalid_arguments(make, error, match):
    with pytest.raises(error, match=match):
        cuflash.merge_attention(*make(*_parts()))


def test_docstring_example_runs():
    import doctest
    from cuflash import merge
    assert doctest.testmod(merge, verbose=False).failed == 0


# ------------------------------------------------------------------------------- GPU


def gpu_merge(outs, lses):
    """merge_attention under a NaN-filling allocator: a stacked call allocates exactly
    out and lse (a list is stacked first, one copy each)."""
    (out, lse), sizes = poisoned(cuflash.merge_attention, outs, lses)
    expected = [out.nbytes, lse.nbytes]
    if isinstance(outs, list):
        expected += [len(outs) * out.nbytes, len(outs) * lse.nbytes]
    assert sorted(sizes) == sorted(expected), f"allocated {sizes}"
    return out, lse


@pytest.mark.gpu
@pytest.mark.parametrize("stacked", [False, True], ids=["list", "stacked"])
@pytest.mark.parametrize("dtype", [F16, BF16, F32], ids=str)
def test_gpu_split_equals_unsplit(rng, dtype, stacked):
    import cupy
    for bounds in BOUNDS.values():
        check_merge(rng, dtype, bounds, stacked, xp=cupy, merge=gpu_merge, headdim=64)


@pytest.mark.gpu
def test_gpu_empty_parts_and_rows(rng):
    import cupy
    _, outs, lses = split_problem(rng, BF16, (0, 30, 70), xp=cupy)
    first, first_lse = outs[0].get(), lses[0].get()
    garbage = cupy.asarray(np.full(first.shape, np.nan, BF16))
    empty = cupy.asarray(np.full(first_lse.shape, -np.inf, np.float32))
    out, lse = gpu_merge([garbage, outs[0], garbage], [empty, lses[0], empty])
    np.testing.assert_array_equal(out.get().view(np.uint16), first.view(np.uint16))
    np.testing.assert_array_equal(lse.get(), first_lse)
    second, second_lse = outs[1].get(), lses[1].get()
    second[:, 2] = np.nan
    second_lse[:, :, 2] = -np.inf
    out, lse = gpu_merge([outs[0], cupy.asarray(second)], [lses[0], cupy.asarray(second_lse)])
    out = out.get()
    np.testing.assert_array_equal(out[:, 2].view(np.uint16), first[:, 2].view(np.uint16))
    assert np.isfinite(out.astype(np.float32)).all()
    out, lse = gpu_merge(cupy.asarray(np.full((3, 2, 4, 5, 16), np.nan, BF16)),
                         cupy.asarray(np.full((3, 2, 5, 4), -np.inf, np.float32)))
    assert (out.get().astype(np.float32) == 0).all() and np.isneginf(lse.get()).all()


@pytest.mark.gpu
@pytest.mark.parametrize("num_parts, headdim", [(1, 8), (33, 264), (70, 128)])
def test_gpu_many_parts_and_wide_rows(rng, num_parts, headdim):
    # More parts than lanes, and rows wider than one 256-column pass; a strided stacked view.
    import cupy
    outs = rng.standard_normal((2, num_parts, 3, 5, headdim)).astype(np.float32)
    lses = (3 * rng.standard_normal((num_parts, 2, 5, 3))).astype(np.float32)
    lses[rng.random(lses.shape) < 0.2] = -np.inf
    lses64 = lses.astype(np.float64)
    seen = ~np.isneginf(lses64).all(0)
    total = np.where(seen, np.log(np.exp(lses64).sum(0, where=~np.isneginf(lses64))
                                  + ~seen), -np.inf)
    w = np.where(np.isneginf(lses64), 0, np.exp(lses64 - np.where(seen, total, 0)))
    want = (w.transpose(0, 1, 3, 2)[..., None] * outs.transpose(1, 0, 2, 3, 4)).sum(0)
    out, lse = gpu_merge(cupy.asarray(outs).transpose(1, 0, 2, 3, 4), cupy.asarray(lses))
    np.testing.assert_allclose(out.get(), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lse.get(), total, rtol=1e-6, atol=1e-6)
