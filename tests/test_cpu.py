"""The NumPy backend against the float64 reference, forward and backward, on every feature.

Small problems run with small blocks (``BLOCKS``) so that a few dozen rows already cross
many block boundaries, partially masked blocks and skipped blocks; the 1025-long ones run
with the default 128 x 128 blocks that the public API uses.
"""
import tracemalloc

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import cuflash
from accuracy import assert_close
from cuflash import _checks, cpu, reference

# numpy's RuntimeWarnings (exp(-inf + inf), log(0), 0/0) must not happen at all
pytestmark = pytest.mark.filterwarnings("error")

DTYPES = [np.float16, ml_dtypes.bfloat16, np.float32, np.float64]
BLOCKS = (16, 8)


def normal(rng, shape, dtype):
    return rng.standard_normal(shape).astype(dtype)


def qkv(rng, dtype, batch=2, seqlen_q=33, seqlen_k=33, nheads=4, nheads_kv=2, headdim=32):
    q = normal(rng, (batch, seqlen_q, nheads, headdim), dtype)
    k, v = (normal(rng, (batch, seqlen_k, nheads_kv, headdim), dtype) for _ in range(2))
    return q, k, v


def check(rng, q, k, v, *, blocks=BLOCKS, **options):
    """Run the CPU backend forward and backward, assert the accuracy rule on all five
    results; return them."""
    shape = _checks.check_qkv(q, k, v, gpu=False)
    opts = _checks.options(shape, "numpy", q, **options)
    Br, Bc = blocks
    out, lse = cpu.forward(q, k, v, shape, opts, Br=Br, Bc=Bc)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert lse.dtype == np.float32 and lse.shape == (shape.batch, shape.nheads, shape.seqlen_q)
    ref, naive = (reference.attention_forward(q, k, v, upcast=u, **options) for u in (1, 0))
    assert_close("out", out, ref[0], naive[0])
    assert_close("lse", lse, ref[1], naive[1])

    dout = normal(rng, q.shape, q.dtype)
    grads = cpu.backward(dout, q, k, v, out, lse, shape, opts, Br=Br, Bc=Bc)
    ref, naive = (reference.attention_backward(dout, q, k, v, upcast=u, **options)
                  for u in (1, 0))
    for name, got, x, r, n in zip(("dq", "dk", "dv"), grads, (q, k, v), ref, naive):
        assert got.dtype == x.dtype and got.shape == x.shape
        assert_close(name, got, r, n)
    return out, lse, grads


@pytest.mark.parametrize("headdim", [8, 40, 64, 128, 256])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dtypes_and_headdims(rng, dtype, headdim):
    check(rng, *qkv(rng, dtype, seqlen_q=37, seqlen_k=29, headdim=headdim))


@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("dtype", [np.float16, np.float32], ids=str)
def test_gqa(rng, dtype, group):
    check(rng, *qkv(rng, dtype, nheads=4, nheads_kv=4 // group), causal=True)


@pytest.mark.parametrize("seqlens", [(17, 17), (17, 40), (40, 17)], ids=str)
@pytest.mark.parametrize("dtype", [ml_dtypes.bfloat16, np.float64], ids=str)
def test_causal_bottom_right(rng, dtype, seqlens):
    check(rng, *qkv(rng, dtype, seqlen_q=seqlens[0], seqlen_k=seqlens[1]), causal=True)


WINDOWS = [(5, None), (None, 3), (4, 2), (0, 0), (0, None), (None, 0), (2, 0), (40, 40)]


@pytest.mark.parametrize("seqlens", [(30, 30), (21, 45), (45, 21)], ids=str)
@pytest.mark.parametrize("window", WINDOWS, ids=str)
def test_windows(rng, window, seqlens):
    check(rng, *qkv(rng, np.float16, seqlen_q=seqlens[0], seqlen_k=seqlens[1]),
          window=window)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_softcap(rng, dtype):
    check(rng, *qkv(rng, dtype), softcap=0.9, scale=0.5)
    check(rng, *qkv(rng, dtype, seqlen_q=20, seqlen_k=50), softcap=30.0, window=(7, 3))


@pytest.mark.parametrize("per_batch", [False, True], ids=["nheads", "batch_nheads"])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64], ids=str)
def test_alibi(rng, dtype, per_batch):
    slopes = rng.uniform(0.05, 1.0, (2, 4) if per_batch else (4,)).astype(np.float32)
    check(rng, *qkv(rng, dtype), alibi_slopes=slopes)
    check(rng, *qkv(rng, dtype, seqlen_q=40, seqlen_k=19), alibi_slopes=slopes, causal=True,
          softcap=5.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("options", [dict(causal=True), dict(window=(0, 0)),
                                     dict(window=(3, 5))], ids=str)
def test_fully_masked_rows(rng, dtype, options):
    q, k, v = qkv(rng, dtype, seqlen_q=40, seqlen_k=15)
    out, lse, (dq, dk, dv) = check(rng, q, k, v, **options)
    # row i sees keys up to i + seqlen_k - seqlen_q + right, so the first rows see none
    dead = 40 - 15 - options.get("window", (0, 0))[1]
    assert (out[:, :dead] == 0).all() and (dq[:, :dead] == 0).all()
    assert np.isneginf(lse[..., :dead]).all() and np.isfinite(lse[..., dead:]).all()


@pytest.mark.parametrize("seqlens", [(1, 1), (1, 17), (17, 1), (1, 97), (97, 97), (97, 17)],
                         ids=str)
@pytest.mark.parametrize("dtype", [np.float16, np.float32], ids=str)
def test_small_seqlens(rng, dtype, seqlens):
    q, k, v = qkv(rng, dtype, seqlen_q=seqlens[0], seqlen_k=seqlens[1])
    check(rng, q, k, v)
    check(rng, q, k, v, causal=True)


@pytest.mark.parametrize("options", [dict(), dict(causal=True), dict(window=(200, 50)),
                                     dict(causal=True, softcap=10.0)], ids=str)
@pytest.mark.parametrize("seqlens", [(1025, 1025), (97, 1025), (1025, 97)], ids=str)
def test_long_seqlens(rng, seqlens, options):
    q, k, v = qkv(rng, np.float16, batch=1, seqlen_q=seqlens[0], seqlen_k=seqlens[1],
                  nheads=2, nheads_kv=1, headdim=64)
    check(rng, q, k, v, blocks=(cpu.BR, cpu.BC), **options)


@pytest.mark.parametrize("blocks", [(1, 1), (3, 5), (32, 7), (128, 128), (500, 500)], ids=str)
def test_block_sizes(rng, blocks):
    q, k, v = qkv(rng, np.float32, seqlen_q=45, seqlen_k=21, headdim=8)
    check(rng, q, k, v, blocks=blocks, window=(9, 2), alibi_slopes=np.ones(4, np.float32))


def test_non_contiguous_inputs(rng):
    dtype = np.float32
    big = normal(rng, (3, 50, 8, 96), dtype)
    q = big[::2, 5:38, ::2, 16:80]  # strided batch, seqlen and heads; headdim slice
    k = normal(rng, (2, 2, 29, 64), dtype).transpose(0, 2, 1, 3)  # heads before seqlen
    v = normal(rng, (2, 29, 2, 64), dtype).transpose(2, 1, 0, 3)[:, ::-1]  # batch <-> heads
    assert not any(x.flags.c_contiguous for x in (q, k, v))
    out, lse, grads = check(rng, q, k, v, causal=True)
    shape = _checks.check_qkv(q, k, v, gpu=False)
    opts = _checks.options(shape, "numpy", q, causal=True)
    dout = normal(rng, q.shape, dtype)
    contiguous = (np.ascontiguousarray(x) for x in (dout, q, k, v, out))
    want = cpu.backward(*contiguous, lse, shape, opts)
    strided_out = np.ascontiguousarray(out.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)
    strided_dout = np.stack([dout, -dout], axis=1)[:, 0]  # every other batch item
    got = cpu.backward(strided_dout, q, k, v, strided_out, lse, shape, opts)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


def test_lse_argument_is_not_modified(rng):
    q, k, v = qkv(rng, np.float32, seqlen_q=20, seqlen_k=10)
    out, lse = cuflash.attention_forward(q, k, v, causal=True)
    saved = lse.copy()
    cuflash.attention_backward(q, q, k, v, out, lse, causal=True)
    np.testing.assert_array_equal(lse, saved)


@given(data=st.data())
@settings(max_examples=40, deadline=None)
def test_random_configurations(data):
    draw = data.draw
    group = draw(st.sampled_from([1, 2, 4]))
    seqlen_q, seqlen_k = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    side = st.one_of(st.none(), st.integers(0, 45))
    options = dict(window=(draw(side), draw(side)), softcap=draw(st.sampled_from([0.0, 2.0])))
    if draw(st.booleans()):
        options["alibi_slopes"] = np.float32([0.25, 0.5, 0.125, 1.0])
    blocks = (draw(st.integers(1, 48)), draw(st.integers(1, 48)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    dtype = draw(st.sampled_from(DTYPES))
    q, k, v = qkv(rng, dtype, batch=1, seqlen_q=seqlen_q, seqlen_k=seqlen_k,
                  nheads_kv=4 // group, headdim=16)
    check(rng, q, k, v, blocks=blocks, **options)


def test_public_api(rng):
    q, k, v = qkv(rng, ml_dtypes.bfloat16, seqlen_q=70, seqlen_k=50)
    slopes = rng.uniform(0, 1, 4).astype(np.float32)
    options = dict(causal=True, window=(20, None), softcap=4.0, alibi_slopes=slopes)
    ref, naive = (reference.attention_forward(q, k, v, upcast=u, **options) for u in (1, 0))

    out, lse = cuflash.attention_forward(q, k, v, **options)
    assert_close("out", out, ref[0], naive[0])
    assert_close("lse", lse, ref[1], naive[1])
    np.testing.assert_array_equal(cuflash.attention(q, k, v, **options), out)
    out2, lse2 = cuflash.attention(q, k, v, return_lse=True, **options)
    np.testing.assert_array_equal(out2, out)
    np.testing.assert_array_equal(lse2, lse)

    dout = normal(rng, q.shape, q.dtype)
    ref, naive = (reference.attention_backward(dout, q, k, v, upcast=u, **options)
                  for u in (1, 0))
    grads = cuflash.attention_backward(dout, q, k, v, out, lse, **options)
    for name, got, r, n in zip(("dq", "dk", "dv"), grads, ref, naive):
        assert_close(name, got, r, n)
    vjp_out, vjp = cuflash.attention_vjp(q, k, v, **options)
    np.testing.assert_array_equal(vjp_out, out)
    for got, want in zip(vjp(dout), grads):
        np.testing.assert_array_equal(got, want)


def _peak_bytes(seqlen):
    rng = np.random.default_rng(0)
    q, k, v, dout = (normal(rng, (1, seqlen, 1, 32), np.float32) for _ in range(4))
    tracemalloc.start()
    try:
        out, lse = cuflash.attention_forward(q, k, v)
        cuflash.attention_backward(dout, q, k, v, out, lse)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_grows_linearly_with_seqlen():
    small, large = _peak_bytes(1024), _peak_bytes(4096)
    # 4x the sequence: about 4x the memory if O(seqlen), 16x if O(seqlen^2). One float32
    # score matrix at 4096 alone would be 64 MiB; allow a quarter of that.
    assert large < 4096 * 4096 * 4 / 4, f"peak {large / 2**20:.1f} MiB at seqlen 4096"
    assert large / small < 6, f"peak grew {large / small:.1f}x for 4x the seqlen"
