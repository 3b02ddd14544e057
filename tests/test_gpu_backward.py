"""GPU backward kernels (kernels_cu/flash_bwd.cu) against the float64 reference.

out/lse come from the CPU reference (uploaded), so these tests do not depend on the GPU
forward kernel.
"""
import ml_dtypes
import numpy as np
import pytest

from accuracy import assert_close
from cuflash import _checks, reference

pytestmark = pytest.mark.gpu

BF16 = np.dtype(ml_dtypes.bfloat16)


def _cupy():
    import cupy
    return cupy


def _randn(rng, shape, dtype):
    return rng.standard_normal(shape).astype(dtype)


@pytest.mark.parametrize("dtype", [np.float16, BF16, np.float32])
@pytest.mark.parametrize("seqlen_q,headdim", [(1, 32), (97, 40), (200, 256)])
def test_preprocess_delta_and_lse(dtype, seqlen_q, headdim):
    """delta = rowsum(dout * out) in float32 from strided views; lse in base 2, +inf when -inf."""
    cp = _cupy()
    from cuflash import _launch
    rng = np.random.default_rng(seqlen_q)
    b, h = 2, 3
    # Non-contiguous views: heads interleaved with a spare head, rows of out reversed.
    out_full = _randn(rng, (b, seqlen_q, h + 1, headdim), dtype)
    dout_full = _randn(rng, (b, seqlen_q, h, 2 * headdim), dtype)
    out_h, dout_h = out_full[:, ::-1, :h], dout_full[..., :headdim]
    lse_h = rng.standard_normal((b, h, 2 * seqlen_q)).astype(np.float32)[..., ::2]
    lse_h[0, 1, 0] = -np.inf
    out, dout, lse = cp.asarray(out_full)[:, ::-1, :h], cp.asarray(dout_full)[..., :headdim], \
        cp.asarray(lse_h.copy())
    q = cp.asarray(_randn(rng, (b, seqlen_q, h, headdim), dtype))
    shape = _checks.check_qkv(q, q, q, gpu=True)
    opts = _checks.options(shape, "cupy", q)
    state = _launch.bwd_preprocess(dout, q, q, q, out, lse, shape, opts, headdim_pad=256,
                                   with_accum=True)
    want = np.einsum("bihd,bihd->bhi", dout_h.astype(np.float64), out_h.astype(np.float64))
    delta = state.delta.get()
    assert np.all(delta[..., seqlen_q:] == 0)
    np.testing.assert_allclose(delta[..., :seqlen_q], want, rtol=1e-5, atol=1e-5 * headdim)
    lse2 = state.lse_log2.get()
    assert np.all(lse2[..., seqlen_q:] == np.inf)
    assert lse2[0, 1, 0] == np.inf
    np.testing.assert_allclose(lse2[..., :seqlen_q][np.isfinite(lse_h)],
                               (lse_h * np.log2(np.e))[np.isfinite(lse_h)], rtol=1e-6)
    assert not cp.any(state.dq_accum).item()
