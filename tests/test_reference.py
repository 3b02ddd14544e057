"""The float64 reference against a scalar loop over CONVENTIONS.md, identities and
finite differences; and the accuracy rule that every other test leans on."""
import math

import ml_dtypes
import numpy as np
import pytest

from accuracy import assert_close
from cuflash import reference

pytestmark = pytest.mark.filterwarnings("error")


def normal(rng, *shape, dtype=np.float64):
    return rng.standard_normal(shape).astype(dtype)


def loop_attention(q, k, v, scale, left, right, softcap, slopes):
    """CONVENTIONS.md, "The score of query row i and key column j", one scalar at a time."""
    b, sq, h, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    out = np.zeros((b, sq, h, d))
    lse = np.full((b, h, sq), -np.inf)
    for bi in range(b):
        for hi in range(h):
            kh = hi // (h // hkv)
            for i in range(sq):
                seen = [j for j in range(sk)
                        if (left is None or i + sk - sq - left <= j)
                        and (right is None or j <= i + sk - sq + right)]
                scores = []
                for j in seen:
                    s = scale * float(np.dot(q[bi, i, hi], k[bi, j, kh]))
                    if softcap:
                        s = softcap * math.tanh(s / softcap)
                    if slopes is not None:
                        s -= float(slopes[bi, hi]) * abs(i + sk - sq - j)
                    scores.append(s)
                if not seen:
                    continue
                top = max(scores)
                w = [math.exp(s - top) for s in scores]
                lse[bi, hi, i] = top + math.log(sum(w))
                out[bi, i, hi] = sum(wj / sum(w) * v[bi, j, kh] for wj, j in zip(w, seen))
    return out, lse


CASES = [
    dict(),
    dict(causal=True),
    dict(window=(2, 1)),
    dict(window=(0, 0)),
    dict(window=(None, 0), softcap=1.5),
    dict(window=(3, None), scale=0.7),
    dict(causal=True, alibi=True),
    dict(window=(4, 2), softcap=2.0, alibi=True),
]


@pytest.mark.parametrize("seqlens", [(7, 11), (11, 7)])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_forward_matches_scalar_loop(rng, case, seqlens):
    sq, sk = seqlens
    q, k, v = normal(rng, 2, sq, 4, 8), normal(rng, 2, sk, 2, 8), normal(rng, 2, sk, 2, 8)
    options = {n: x for n, x in case.items() if n != "alibi"}
    slopes = rng.uniform(0.1, 1, (2, 4)).astype(np.float32) if case.get("alibi") else None
    out, lse = reference.attention_forward(q, k, v, alibi_slopes=slopes, **options)
    left, right = options.get("window", (None, None))
    if options.get("causal"):
        right = 0
    want_out, want_lse = loop_attention(q, k, v, options.get("scale", 8 ** -0.5), left,
                                        right, options.get("softcap", 0), slopes)
    np.testing.assert_allclose(out, want_out, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(want_lse))
    np.testing.assert_allclose(lse, want_lse, rtol=1e-12)


def test_equal_scores_average_the_visible_values(rng):
    sq, sk = 5, 9
    q, v = normal(rng, 1, sq, 2, 16), normal(rng, 1, sk, 2, 16)
    k = np.broadcast_to(normal(rng, 1, 1, 2, 16), (1, sk, 2, 16))  # every key the same
    out, lse = reference.attention_forward(q, k, v, causal=True)
    for i in range(sq):
        visible = i + sk - sq + 1
        np.testing.assert_allclose(out[0, i], v[0, :visible].mean(0), rtol=1e-12)
        score = 16 ** -0.5 * np.einsum("hd,hd->h", q[0, i], k[0, 0])
        np.testing.assert_allclose(lse[0, :, i], score + np.log(visible), rtol=1e-12)


def test_probabilities_sum_to_one_over_visible_keys(rng):
    # v = identity, so out row i is the probability row p_i itself
    sq, sk, d = 12, 8, 16
    q, k = normal(rng, 1, sq, 1, d), normal(rng, 1, sk, 1, d)
    v = np.eye(sk, d)[None, :, None, :]
    out, lse = reference.attention_forward(q, k, v, window=(1, 2), softcap=3.0)
    p = out[0, :, 0, :sk]
    i, j = np.arange(sq)[:, None], np.arange(sk)[None, :]
    diag = i + sk - sq - j
    visible = (diag <= 1) & (-diag <= 2)
    assert (p[~visible] == 0).all() and (p[visible] > 0).all()
    seen = visible.any(1)
    np.testing.assert_allclose(p[seen].sum(1), 1, rtol=1e-13)
    assert (p[~seen] == 0).all() and np.isneginf(lse[0, 0, ~seen]).all()
    assert np.isfinite(lse[0, 0, seen]).all()


def test_backward_matches_finite_differences(rng):
    q, k, v = normal(rng, 1, 5, 2, 8), normal(rng, 1, 6, 1, 8), normal(rng, 1, 6, 1, 8)
    dout = normal(rng, 1, 5, 2, 8)
    options = dict(window=(3, 1), softcap=1.5,
                   alibi_slopes=np.array([0.3, 0.7], np.float32))

    def loss(q, k, v):
        return np.sum(reference.attention_forward(q, k, v, **options)[0] * dout)

    grads = reference.attention_backward(dout, q, k, v, **options)
    eps = 1e-6
    for which, grad in enumerate(grads):
        numeric = np.zeros_like(grad)
        for idx in np.ndindex(grad.shape):
            args = [q, k, v]
            plus, minus = (a.copy() for a in (args[which],) * 2)
            plus[idx] += eps
            minus[idx] -= eps
            numeric[idx] = (loss(*args[:which], plus, *args[which + 1:])
                            - loss(*args[:which], minus, *args[which + 1:])) / (2 * eps)
        np.testing.assert_allclose(grad, numeric, atol=1e-8, err_msg="dq dk dv".split()[which])


def test_fully_masked_rows_give_zero_not_nan(rng):
    # seqlen_q > seqlen_k with causal: the first seqlen_q - seqlen_k rows see no key
    q, k, v = normal(rng, 1, 9, 2, 8), normal(rng, 1, 4, 2, 8), normal(rng, 1, 4, 2, 8)
    dout = normal(rng, 1, 9, 2, 8)
    for upcast in (True, False):
        out, lse = reference.attention_forward(q, k, v, causal=True, upcast=upcast)
        dq, dk, dv = reference.attention_backward(dout, q, k, v, causal=True, upcast=upcast)
        assert (out[:, :5] == 0).all() and (dq[:, :5] == 0).all()
        assert np.isneginf(lse[..., :5]).all() and np.isfinite(lse[..., 5:]).all()
        assert all(np.isfinite(x).all() for x in (out, dq, dk, dv))


def test_no_keys_at_all(rng):
    q, k = normal(rng, 2, 3, 2, 8), normal(rng, 2, 0, 2, 8)
    out, lse = reference.attention_forward(q, k, k)
    assert (out == 0).all() and np.isneginf(lse).all()
    dq, dk, dv = reference.attention_backward(q, q, k, k)
    assert (dq == 0).all() and dk.shape == dv.shape == k.shape


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16, np.float32])
def test_naive_rounds_to_the_input_dtype(rng, dtype):
    q, k, v = (normal(rng, 1, 33, 2, 64, dtype=dtype) for _ in range(3))
    ref = reference.attention_forward(q, k, v, causal=True)
    naive = reference.attention_forward(q, k, v, causal=True, upcast=False)
    grads = reference.attention_backward(q, q, k, v, causal=True, upcast=False)
    assert all(x.dtype == dtype for x in (*naive, *grads))
    err = np.abs(naive[0].astype(np.float64) - ref[0]).max()
    eps = float(ml_dtypes.finfo(dtype).eps)
    assert eps / 8 < err < 8 * eps  # rounded at each step: a few units in the last place


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16, np.float32])
def test_naive_rounding_is_the_cast_to_the_dtype(rng, dtype):
    """The rounding the naive computation applies (float64 arithmetic alone, so that CuPy
    runs it too) is ``astype(dtype)``: for every 16-bit value and the midpoints between
    neighbours (ties to even) and just beside them, subnormals, overflow, signed zeros,
    infinities and NaN, and random values over a wide range."""
    info = ml_dtypes.finfo(dtype)
    ulp_up = 1 + 2.0 ** -(info.nmant + 1)
    special = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, float(info.max),
                        -float(info.max) * ulp_up, float(info.max) * ulp_up * (1 - 1e-15),
                        float(info.tiny), float(info.smallest_subnormal),
                        float(info.smallest_subnormal) / 2, 1e300, -1e-300, 5e-324])
    values = [special, rng.standard_normal(10**5) * 10.0 ** rng.uniform(-60, 60, 10**5),
              rng.standard_normal(10**5).astype(dtype).astype(np.float64) * ulp_up]
    if np.dtype(dtype).itemsize == 2:
        with np.errstate(invalid="ignore"):
            every = np.arange(2**16, dtype=np.uint16).view(dtype).astype(np.float64)
        every = np.unique(every[np.isfinite(every)])
        mid = (every[1:] + every[:-1]) / 2
        values += [every, mid, np.nextafter(mid, np.inf), np.nextafter(mid, -np.inf)]
    x = np.concatenate(values)
    with np.errstate(over="ignore"):
        want = x.astype(dtype).astype(np.float64)
    got = reference._rounding(np, np.dtype(dtype), upcast=False)(x)
    assert np.array_equal(got, want, equal_nan=True)
    assert np.array_equal(np.signbit(got), np.signbit(want))


def test_float64_naive_is_the_reference(rng):
    q, k, v = (normal(rng, 1, 17, 2, 8) for _ in range(3))
    for a, b in zip(reference.attention_forward(q, k, v, softcap=2.0),
                    reference.attention_forward(q, k, v, softcap=2.0, upcast=False)):
        np.testing.assert_array_equal(a, b)


def test_takes_arrays_with_get_like_cupy(rng):
    class Device:  # what the reference needs of a CuPy array
        def __init__(self, x):
            self.x = x

        def get(self):
            return self.x

    q = normal(rng, 1, 4, 2, 8)
    want = reference.attention_forward(q, q, q)
    got = reference.attention_forward(Device(q), Device(q), Device(q))
    np.testing.assert_array_equal(want[0], got[0])


def test_shares_the_public_argument_checks(rng):
    q = normal(rng, 1, 4, 2, 8)
    with pytest.raises(ValueError, match="window"):
        reference.attention_forward(q, q, q, window=(-2, None))
    with pytest.raises(ValueError, match="headdim"):
        reference.attention_forward(q[..., :4], q[..., :4], q[..., :4])


def test_accuracy_rule_catches_errors(rng):
    ref = normal(rng, 100)
    naive = ref + 1e-3
    assert_close("x", ref + 1.9e-3, ref, naive)
    with pytest.raises(AssertionError, match="exceeds 2 \\* naive error"):
        assert_close("x", ref + 2.1e-3, ref, naive)
    lse = np.array([-np.inf, 1.0])
    with pytest.raises(AssertionError, match="-inf"):
        assert_close("lse", np.array([0.0, 1.0]), lse, lse.astype(np.float16))
    with pytest.raises(AssertionError, match="NaN"):
        assert_close("lse", np.array([-np.inf, np.nan]), lse, lse.astype(np.float16))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16, np.float32])
def test_on_the_gpu_as_on_the_host(rng, dtype):
    """CuPy inputs run the reference on their GPU and give CuPy results: those of the host
    up to float64 rounding (cuBLAS sums in its own order), and the naive results within
    a few units of the dtype (a float64 value near a rounding boundary may round either
    way, and the difference carries into later steps)."""
    import cupy
    q, k, v, dout = (normal(rng, 2, n, h, 64, dtype=dtype)
                     for n, h in ((97, 4), (130, 2), (130, 2), (97, 4)))
    slopes = rng.uniform(0.1, 1, 4).astype(np.float32)
    opts = dict(window=(40, 3), softcap=2.0, alibi_slopes=slopes)
    eps = float(ml_dtypes.finfo(dtype).eps)
    for upcast in (True, False):
        host = (*reference.attention_forward(q, k, v, upcast=upcast, **opts),
                *reference.attention_backward(dout, q, k, v, upcast=upcast, **opts))
        gpu = (*reference.attention_forward(*map(cupy.asarray, (q, k, v)), upcast=upcast,
                                            **opts),
               *reference.attention_backward(*map(cupy.asarray, (dout, q, k, v)),
                                             upcast=upcast, **opts))
        for name, h, g in zip(("out", "lse", "dq", "dk", "dv"), host, gpu):
            assert isinstance(g, cupy.ndarray) and g.dtype == h.dtype, name
            h64, g64 = h.astype(np.float64), g.get().astype(np.float64)
            assert np.array_equal(np.isneginf(h64), np.isneginf(g64)), name
            scale = max(1.0, float(np.abs(h64[np.isfinite(h64)]).max()))
            tol = 1e-12 if upcast else 4 * eps
            np.testing.assert_allclose(g64, h64, rtol=0, atol=tol * scale, err_msg=name)
