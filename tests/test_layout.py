"""layout='bhsd': torch's (batch, heads, seqlen, headdim) taken as zero-copy transposed views,
results handed back in it, against the float64 reference."""
import numpy as np
import pytest

import cuflash
from cuflash import reference


def bhsd(x):
    return x.swapaxes(1, 2)


@pytest.mark.parametrize("seqlens", [(17, 17), (1, 97), (97, 33)])
@pytest.mark.parametrize("causal", [False, True])
def test_forward_and_backward_in_bhsd(rng, seqlens, causal):
    sq, sk = seqlens
    q = rng.standard_normal((2, 4, sq, 32))
    k, v = (rng.standard_normal((2, 2, sk, 32)) for _ in range(2))
    dout = rng.standard_normal(q.shape)
    out, lse = cuflash.attention_forward(q, k, v, causal=causal, layout="bhsd")
    ref_out, ref_lse = reference.attention_forward(bhsd(q), bhsd(k), bhsd(v), causal=causal)
    assert out.shape == q.shape and lse.shape == (2, 4, sq)
    np.testing.assert_allclose(out, bhsd(ref_out), atol=1e-12)
    np.testing.assert_allclose(lse, ref_lse, atol=1e-12)
    grads = cuflash.attention_backward(dout, q, k, v, out, lse, causal=causal, layout="bhsd")
    ref = reference.attention_backward(bhsd(dout), bhsd(q), bhsd(k), bhsd(v), causal=causal)
    for g, r, x in zip(grads, ref, (q, k, v)):
        assert g.shape == x.shape
        np.testing.assert_allclose(g, bhsd(r), atol=1e-10)


def test_bhsd_equals_bshd_bitwise_and_fills_given_buffers(rng):
    q, k, v, dout = (rng.standard_normal((1, 3, 40, 64)).astype(np.float32) for _ in range(4))
    out, lse = np.full(q.shape, np.nan, np.float32), np.full((1, 3, 40), np.nan, np.float32)
    got = cuflash.attention_forward(q, k, v, causal=True, layout="bhsd", out=out, lse=lse)
    assert got[0] is out and got[1] is lse
    want_out, want_lse = cuflash.attention_forward(bhsd(q), bhsd(k), bhsd(v), causal=True)
    assert np.array_equal(out, bhsd(want_out)) and np.array_equal(lse, want_lse)
    dq = np.full(q.shape, np.nan, np.float32)
    grads = cuflash.attention_backward(dout, q, k, v, out, lse, causal=True, layout="bhsd",
                                       dq=dq)
    assert grads[0] is dq
    want = cuflash.attention_backward(bhsd(dout), bhsd(q), bhsd(k), bhsd(v), bhsd(out), lse,
                                      causal=True)
    for g, w in zip(grads, want):
        assert np.array_equal(g, bhsd(w))


def test_vjp_and_attention_take_the_layout(rng):
    q = rng.standard_normal((1, 2, 9, 32))
    out, vjp = cuflash.attention_vjp(q, q, q, causal=True, layout="bhsd")
    assert np.array_equal(out, cuflash.attention(q, q, q, causal=True, layout="bhsd"))
    assert [g.shape for g in vjp(np.ones_like(out))] == [q.shape] * 3


def test_bad_layout_is_refused_naming_it(rng):
    q = rng.standard_normal((1, 2, 9, 32))
    with pytest.raises(ValueError, match="layout"):
        cuflash.attention(q, q, q, layout="bsh")
    with pytest.raises(ValueError, match="q must have 4 dimensions"):
        cuflash.attention(q[0], q, q, layout="bhsd")
