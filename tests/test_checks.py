"""One test per argument-validation rule of the public API (cuflash/_checks.py).

Each test asserts the exception type and that the message names the offending argument
(and, where it matters, what was expected). Validation runs before any backend, so none of
these tests runs an attention computation; they only need NumPy.
"""
import math
import re

import ml_dtypes
import numpy as np
import pytest

import cuflash
from cuflash import _checks

B, SQ, SK, H, HKV, D = 2, 3, 5, 4, 2, 16


def qkv(b=B, sq=SQ, sk=SK, h=H, hkv=HKV, d=D, dtype=np.float32):
    rng = np.random.default_rng(0)
    q = rng.standard_normal((b, sq, h, d)).astype(dtype)
    k = rng.standard_normal((b, sk, hkv, d)).astype(dtype)
    v = rng.standard_normal((b, sk, hkv, d)).astype(dtype)
    return q, k, v


def bwd_args(dtype=np.float32):
    """Arguments of attention_backward with valid shapes (values are irrelevant here)."""
    q, k, v = qkv(dtype=dtype)
    dout = np.ones_like(q)
    out = np.zeros_like(q)
    lse = np.zeros((B, H, SQ), np.float32)
    return dict(dout=dout, q=q, k=k, v=v, out=out, lse=lse)


def backward(a, **kw):
    return cuflash.attention_backward(a["dout"], a["q"], a["k"], a["v"], a["out"], a["lse"],
                                      **kw)


def opts(**kw):
    """Run only the option checks (no backend) on valid q, k, v."""
    q, k, v = qkv()
    shape = _checks.check_qkv(q, k, v, gpu=False)
    return _checks.options(shape, "numpy", q, **kw)


def raises(exc, pattern):
    return pytest.raises(exc, match=pattern)


def noncontig_last(x):
    """A view of ``x``'s values whose last axis has stride 2 elements."""
    wide = np.zeros(x.shape[:-1] + (2 * x.shape[-1],), x.dtype)
    wide[..., ::2] = x
    view = wide[..., ::2]
    assert view.strides[-1] == 2 * x.dtype.itemsize
    return view


# --------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("which", ["q", "k", "v"])
@pytest.mark.parametrize("ndim", [3, 5])
def test_wrong_ndim(which, ndim):
    a = dict(zip("qkv", qkv()))
    x = a[which]
    a[which] = x[0] if ndim == 3 else x[None]
    with raises(ValueError, rf"^{which} must have 4 dimensions \(batch, seqlen, nheads, "
                            rf"headdim\), got shape {re.escape(str(a[which].shape))}"):
        cuflash.attention(a["q"], a["k"], a["v"])


@pytest.mark.parametrize("which", ["k", "v"])
def test_dtype_mismatch(which):
    a = dict(zip("qkv", qkv()))
    a[which] = a[which].astype(np.float16)
    with raises(TypeError, rf"^{which} has dtype float16 but q has dtype float32"):
        cuflash.attention(a["q"], a["k"], a["v"])


@pytest.mark.parametrize("dtype", [np.int32, np.complex64, np.float16])
def test_dtype_mismatch_with_other_dtypes(dtype):
    """k of any other dtype than q's is rejected, naming k and both dtypes."""
    q, k, v = qkv(dtype=np.float32)
    with raises(TypeError, rf"^k has dtype {np.dtype(dtype)} but q has dtype float32"):
        cuflash.attention(q, k.astype(dtype), v)


@pytest.mark.parametrize("dtype", [np.int32, np.int8, np.complex64, np.complex128, np.bool_])
def test_unsupported_dtype_cpu(dtype):
    q, k, v = (x.astype(dtype) for x in qkv())
    with raises(TypeError, rf"^q has dtype {np.dtype(dtype)}, which is not supported on the "
                           rf"CPU; supported: float16, bfloat16, float32, float64$"):
        cuflash.attention(q, k, v)


def test_unsupported_dtype_gpu_lists_gpu_dtypes():
    """float64 is CPU-only: the GPU check rejects it and lists the three GPU dtypes."""
    q, k, v = qkv(dtype=np.float64)
    with raises(TypeError, r"^q has dtype float64, which is not supported on the GPU; "
                           r"supported: float16, bfloat16, float32$"):
        _checks.check_qkv(q, k, v, gpu=True)


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16, np.float32, np.float64])
def test_supported_dtypes_pass_the_checks(dtype):
    shape = _checks.check_qkv(*qkv(dtype=dtype), gpu=False)
    assert shape == _checks.Shape(B, SQ, SK, H, HKV, D)


@pytest.mark.parametrize("which", ["k", "v"])
def test_headdim_mismatch(which):
    a = dict(zip("qkv", qkv(d=16)))
    a[which] = qkv(d=32)["qkv".index(which)]
    with raises(ValueError, rf"^{which} has headdim 32 but q has headdim 16; "
                            rf"q, k and v must share one headdim"):
        cuflash.attention(a["q"], a["k"], a["v"])


@pytest.mark.parametrize("d", [0, 1, 7, 12, 100, 255, 264, 512])
def test_unsupported_headdim(d):
    q, k, v = qkv(d=d)
    with raises(ValueError, rf"^headdim {d} is not supported; supported: multiples of 8 "
                            rf"from 8 to 256"):
        cuflash.attention(q, k, v)


@pytest.mark.parametrize("d", [8, 24, 40, 256])
def test_supported_headdim_bounds_pass_the_checks(d):
    assert _checks.check_qkv(*qkv(d=d), gpu=False).headdim == d


@pytest.mark.parametrize("h,hkv", [(3, 2), (4, 3), (1, 2), (2, 0)])
def test_nheads_not_multiple_of_nheads_kv(h, hkv):
    q, k, v = qkv(h=h, hkv=hkv)
    with raises(ValueError, rf"^nheads \({h}\) must be a multiple of nheads_kv \({hkv}\)"):
        cuflash.attention(q, k, v)


@pytest.mark.parametrize("h,hkv", [(4, 4), (4, 2), (4, 1), (6, 3)])
def test_gqa_and_mqa_head_counts_pass_the_checks(h, hkv):
    shape = _checks.check_qkv(*qkv(h=h, hkv=hkv), gpu=False)
    assert (shape.nheads, shape.nheads_kv) == (h, hkv)


@pytest.mark.parametrize("which", ["k", "v"])
def test_batch_mismatch(which):
    a = dict(zip("qkv", qkv(b=2)))
    a[which] = qkv(b=3)["qkv".index(which)]
    with raises(ValueError, rf"^{which} has batch 3 but q has batch 2"):
        cuflash.attention(a["q"], a["k"], a["v"])


@pytest.mark.parametrize("field", ["seqlen", "nheads"])
def test_kv_seqlen_or_nheads_mismatch(field):
    q, k, _ = qkv(sk=5, hkv=2)
    _, _, v = qkv(sk=6) if field == "seqlen" else qkv(hkv=4)
    with raises(ValueError, rf"^v has shape {re.escape(str(v.shape))} but k has shape "
                            rf"{re.escape(str(k.shape))}; k and v must share "
                            rf"\(batch, seqlen_k, nheads_kv\)"):
        cuflash.attention(q, k, v)


@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_last_axis_not_contiguous(which):
    a = dict(zip("qkv", qkv()))
    a[which] = noncontig_last(a[which])
    with raises(ValueError, rf"^{which} must be contiguous in its last axis \(stride 4 bytes\), "
                            rf"got stride 8 bytes"):
        cuflash.attention(a["q"], a["k"], a["v"])


@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_reversed_last_axis_is_not_contiguous(which):
    a = dict(zip("qkv", qkv()))
    a[which] = a[which][..., ::-1]
    with raises(ValueError, rf"^{which} must be contiguous in its last axis"):
        cuflash.attention(a["q"], a["k"], a["v"])


def test_strided_other_axes_pass_the_checks():
    """Only the last axis must be contiguous: permuted/sliced leading axes are accepted."""
    q, k, v = qkv()
    q = np.ascontiguousarray(q.transpose(1, 0, 2, 3)).transpose(1, 0, 2, 3)  # seq-major
    k = np.concatenate([k, k], axis=1)[:, ::2]                               # strided seqlen
    v = np.ascontiguousarray(v.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)  # head-major
    assert not (q.flags.c_contiguous or k.flags.c_contiguous or v.flags.c_contiguous)
    assert _checks.check_qkv(q, k, v, gpu=False) == _checks.Shape(B, SQ, SK, H, HKV, D)


def test_empty_arrays_pass_the_contiguity_check_whatever_their_strides():
    """NumPy gives empty arrays arbitrary strides (astype gives all zeros); they hold no
    data, so the last-axis rule does not apply to them."""
    q, k, v = (x.astype(np.float16) for x in qkv(b=0))
    assert q.strides[-1] != q.dtype.itemsize or q.size == 0
    assert _checks.check_qkv(q, k, v, gpu=False).batch == 0
    q, k, v = qkv()
    assert _checks.check_qkv(q, k[:, :0].astype(np.float16).astype(np.float32),
                             v[:, :0], gpu=False).seqlen_k == 0


# --------------------------------------------------------------------------- array kinds


class FakeDLPack:
    """An object that looks like an array of another framework to the kind check."""

    def __init__(self, device_type, like):
        self._device = (device_type, 0)
        self.shape, self.dtype, self.ndim = like.shape, like.dtype, like.ndim

    def __dlpack__(self, stream=None):  # pragma: no cover - must never be consumed here
        raise AssertionError("the kind check must not consume the array")

    def __dlpack_device__(self):
        return self._device


KDL_CPU, KDL_CUDA = 1, 2


@pytest.mark.parametrize("bad", [[[1.0]], 3.0, "q", None, object()])
def test_non_array_k(bad):
    q, _, v = qkv()
    with raises(TypeError, rf"^k must be a numpy.ndarray, a cupy.ndarray or a CUDA array with "
                           rf"__dlpack__, got {type(bad).__name__}$"):
        cuflash.attention(q, bad, v)


def test_non_array_q():
    _, k, v = qkv()
    with raises(TypeError, r"^q must be a numpy.ndarray, a cupy.ndarray or a CUDA array"):
        cuflash.attention([[1.0]], k, v)


@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_cpu_dlpack_object_is_rejected(which):
    """A CPU array of another framework is not taken silently: the user converts it."""
    a = dict(zip("qkv", qkv()))
    a[which] = FakeDLPack(KDL_CPU, a[which])
    with raises(TypeError, rf"^{which}: a DLPack array must live on a CUDA device to be taken "
                           rf"zero-copy; convert CPU arrays with numpy.asarray first"):
        cuflash.attention(a["q"], a["k"], a["v"])


def test_numpy_mixed_with_cuda_dlpack_array():
    """A NumPy q with a CUDA array of another framework: kinds differ, k is named."""
    q, k, v = qkv()
    with raises(TypeError, r"^k is a dlpack array but q is a numpy array; "
                           r"pass arrays of one kind"):
        cuflash.attention(q, FakeDLPack(KDL_CUDA, k), v)


def test_numpy_mixed_with_cuda_dlpack_array_in_backward():
    a = bwd_args()
    a["lse"] = FakeDLPack(KDL_CUDA, a["lse"])
    with raises(TypeError, r"^lse is a dlpack array but dout is a numpy array"):
        backward(a)


class FakeCupy:
    """Duck-types a cupy.ndarray for the kind check: module 'cupy...' and a device id."""
    __module__ = "cupy._fake"
    __cuda_array_interface__ = {}

    def __init__(self, device_id):
        self.device = type("Device", (), {"id": device_id})()


def test_same_kind_rejects_arrays_on_different_devices():
    """The device rule of same_kind, exercised without a GPU through duck-typed arrays."""
    assert _checks.same_kind({"q": FakeCupy(0), "k": FakeCupy(0), "v": FakeCupy(0)}) == "cupy"
    with raises(ValueError, r"^v is on CUDA device 1 but q is on device 0; "
                            r"pass arrays on one device"):
        _checks.same_kind({"q": FakeCupy(0), "k": FakeCupy(0), "v": FakeCupy(1)})


@pytest.mark.gpu
def test_arrays_on_different_cupy_devices():
    import cupy
    if cupy.cuda.runtime.getDeviceCount() < 2:
        pytest.skip("needs two CUDA devices")
    q, k, v = qkv(dtype=np.float16)
    with cupy.cuda.Device(0):
        q0, k0 = cupy.asarray(q), cupy.asarray(k)
    with cupy.cuda.Device(1):
        v1 = cupy.asarray(v)
    with raises(ValueError, r"^v is on CUDA device 1 but q is on device 0"):
        cuflash.attention(q0, k0, v1)


@pytest.mark.gpu
def test_empty_problems_return_arrays_on_the_inputs_device():
    """Empty problems skip the kernels; their outputs must still be on the inputs' device,
    not the current one."""
    import cupy
    if cupy.cuda.runtime.getDeviceCount() < 2:
        pytest.skip("needs two CUDA devices")
    with cupy.cuda.Device(1):
        q, k, v = (cupy.asarray(x) for x in qkv(b=0, dtype=np.float16))
        dense_bwd = [cupy.asarray(x) for x in qkv(sk=0, dtype=np.float16)]
        packed = cupy.zeros((0, H, D), np.float16)
        cu = cupy.zeros(2, np.int32)
        cache = cupy.zeros((0, 64, HKV, D), np.float16)
        seqlens = cupy.zeros(0, np.int32)
        parts = [cupy.zeros((0, SQ, H, D), np.float16)] * 2
        lses = [cupy.zeros((0, H, SQ), np.float32)] * 2
        dout = cupy.ones_like(dense_bwd[0])
        lse = cupy.zeros((B, H, SQ), np.float32)
        packed_lse = cupy.zeros((H, 0), np.float32)
    with cupy.cuda.Device(0):
        results = [
            cuflash.attention_forward(q, k, v),
            cuflash.attention_backward(dout, *dense_bwd, dout, lse),
            cuflash.attention_varlen_forward(packed, packed, packed, cu, cu, 0, 0),
            cuflash.attention_varlen_backward(packed, packed, packed, packed, packed,
                                              packed_lse, cu, cu, 0, 0),
            cuflash.attention_with_kvcache(q, cache, cache, cache_seqlens=seqlens,
                                           return_lse=True),
            cuflash.merge_attention(parts, lses),
        ]
    for result in results:
        assert [x.device.id for x in result] == [1] * len(result)


# --------------------------------------------------------------------------- window


@pytest.mark.parametrize("window", [(1,), (1, 2, 3), (), 3, None, "ab", {1: 2}])
def test_window_not_a_pair(window):
    with raises(TypeError, r"^window must be a \(left, right\) pair of None or int, got "
                           + re.escape(repr(window))):
        cuflash.attention(*qkv(), window=window)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("bad", [1.0, 1.5, "3", True, False, np.bool_(True), np.float32(2)])
def test_window_side_not_int(side, bad):
    window = (bad, None) if side == "left" else (None, bad)
    with raises(TypeError, rf"^window\[{side}\] must be None or an int, got "
                           + re.escape(repr(bad))):
        cuflash.attention(*qkv(), window=window)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("bad", [-2, -100, np.int64(-5)])
def test_window_side_below_minus_one(side, bad):
    window = (bad, 0) if side == "left" else (0, bad)
    with raises(ValueError, rf"^window\[{side}\] must be None, -1 \(unbounded\) or >= 0, "
                            rf"got {int(bad)}$"):
        cuflash.attention(*qkv(), window=window)


@pytest.mark.parametrize("right", [1, 7])
def test_causal_with_positive_window_right(right):
    with raises(ValueError, rf"^window right={right} contradicts causal=True"):
        cuflash.attention(*qkv(), causal=True, window=(None, right))


def test_window_normalisation():
    """None and -1 mean unbounded; causal folds into right == 0; ints are kept exactly."""
    o = opts()
    assert (o.window_left, o.window_right, o.causal) == (-1, -1, False)
    assert (opts(window=(-1, -1)).window_left, opts(window=[None, -1]).window_right) == (-1, -1)
    for right in (None, -1, 0):
        o = opts(causal=True, window=(2, right))
        assert (o.window_left, o.window_right, o.causal) == (2, 0, True)
    o = opts(window=(np.int32(1), 2))
    assert (o.window_left, o.window_right) == (1, 2) and type(o.window_left) is int


def test_huge_window_is_clamped_to_fit_int32():
    """Any int >= 0 is a valid side; sides wider than the problem are clamped (exactly:
    they hide nothing) so that the kernels' int32 fields never overflow."""
    o = opts(window=(2 ** 40, 10 ** 30))
    assert 0 <= o.window_left < 2 ** 31 and 0 <= o.window_right < 2 ** 31
    assert o.window_left >= SK - 1 and o.window_right >= SQ - 1  # still sees every key


def test_causal_not_bool():
    for bad in (1, 0, "yes", None):
        with raises(TypeError, rf"^causal must be a bool, got {type(bad).__name__}"):
            cuflash.attention(*qkv(), causal=bad)


# --------------------------------------------------------------------------- scale, softcap


@pytest.mark.parametrize("bad", [0, 0.0, -1, -0.5, math.nan, math.inf, -math.inf,
                                 np.float32("nan"), 10 ** 400])
def test_scale_not_finite_positive(bad):
    with raises(ValueError, r"^scale must be finite and > 0, got "):
        cuflash.attention(*qkv(), scale=bad)


@pytest.mark.parametrize("name", ["scale", "softcap"])
@pytest.mark.parametrize("bad", [1e39, 3.5e38, 10 ** 39, 1e-39, 1e-45, 1e-300])
def test_scale_softcap_outside_float32(name, bad):
    """Finite and positive in float64 but inf, 0 or subnormal as the kernels' float32."""
    with raises(ValueError, rf"^{name} must lie in float32's normal range "
                            rf"\[1\.175e-38, 3\.403e\+38\] \(the GPU kernels take it as a "
                            rf"float32\), got "):
        cuflash.attention(*qkv(), **{name: bad})


@pytest.mark.parametrize("name", ["scale", "softcap"])
def test_scale_softcap_float32_extremes_pass(name):
    tiny, big = np.finfo(np.float32).smallest_normal, np.finfo(np.float32).max
    assert getattr(opts(**{name: tiny}), name) == float(tiny)
    assert getattr(opts(**{name: big}), name) == float(big)


@pytest.mark.parametrize("bad", ["0.1", True, [0.1], np.array(0.1), 1j])
def test_scale_wrong_type(bad):
    with raises(TypeError, rf"^scale must be a float or None, got {type(bad).__name__}$"):
        cuflash.attention(*qkv(), scale=bad)


def test_scale_default_and_explicit():
    assert opts().scale == D ** -0.5
    assert opts(scale=2).scale == 2.0 and type(opts(scale=np.float16(0.5)).scale) is float


@pytest.mark.parametrize("bad", [-1, -1e-9, math.nan, math.inf, -math.inf, 10 ** 400])
def test_softcap_negative_or_not_finite(bad):
    with raises(ValueError, r"^softcap must be finite and >= 0 \(0 disables it\), got "):
        cuflash.attention(*qkv(), softcap=bad)


@pytest.mark.parametrize("bad", ["30", None, True, [30.0]])
def test_softcap_wrong_type(bad):
    with raises(TypeError, rf"^softcap must be a float, got {type(bad).__name__}$"):
        cuflash.attention(*qkv(), softcap=bad)


def test_softcap_zero_disables():
    assert opts().softcap == 0.0 and opts(softcap=30).softcap == 30.0


# --------------------------------------------------------------------------- alibi_slopes


@pytest.mark.parametrize("shape", [(H + 1,), (H - 1,), (B + 1, H), (B, H + 1), (H, B),
                                   (B, H, 1), (1, H), ()])
def test_alibi_wrong_shape(shape):
    slopes = np.ones(shape, np.float32)
    with raises(ValueError, rf"^alibi_slopes must have shape \(nheads,\) = \({H},\) or "
                            rf"\(batch, nheads\) = \({B}, {H}\), got "
                            + re.escape(str(shape))):
        cuflash.attention(*qkv(), alibi_slopes=slopes)


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16, np.int32])
def test_alibi_wrong_dtype(dtype):
    with raises(TypeError, rf"^alibi_slopes must be float32 \(or float64, rounded to "
                           rf"float32\), got {np.dtype(dtype)}$"):
        cuflash.attention(*qkv(), alibi_slopes=np.ones(H, dtype))


def test_float64_alibi_slopes_are_rounded_to_float32():
    slopes = np.random.default_rng(3).uniform(0.01, 1, H)
    got = cuflash.attention(*qkv(), alibi_slopes=slopes)
    want = cuflash.attention(*qkv(), alibi_slopes=slopes.astype(np.float32))
    assert np.array_equal(got, want)


@pytest.mark.parametrize("bad", [[0.5] * H, (0.5,) * H, 0.5])
def test_alibi_wrong_kind(bad):
    with raises(TypeError, rf"^alibi_slopes must be a numpy.ndarray, a cupy.ndarray or a CUDA "
                           rf"array with __dlpack__, got {type(bad).__name__}$"):
        cuflash.attention(*qkv(), alibi_slopes=bad)


def test_alibi_cuda_dlpack_with_numpy_q():
    with raises(TypeError, r"^alibi_slopes is a dlpack array but q is a numpy array"):
        cuflash.attention(*qkv(), alibi_slopes=FakeDLPack(KDL_CUDA, np.ones(H, np.float32)))


@pytest.mark.parametrize("shape", [(H,), (B, H)])
def test_alibi_last_axis_not_contiguous(shape):
    """The kernels read consecutive heads, so strided heads are rejected like q's."""
    slopes = noncontig_last(np.ones(shape, np.float32))
    with raises(ValueError, r"^alibi_slopes must be contiguous in its last axis"):
        cuflash.attention(*qkv(), alibi_slopes=slopes)


def test_alibi_accepted_shapes_are_normalised_to_batch_nheads():
    per_head = np.arange(1, H + 1, dtype=np.float32)
    o = opts(alibi_slopes=per_head)
    assert o.alibi_slopes.shape == (B, H)
    np.testing.assert_array_equal(o.alibi_slopes, np.tile(per_head, (B, 1)))
    full = np.arange(B * H, dtype=np.float32).reshape(B, H)
    np.testing.assert_array_equal(opts(alibi_slopes=full).alibi_slopes, full)
    strided_batch = np.ones((2 * B, H), np.float32)[::2]  # batch axis may be strided
    assert opts(alibi_slopes=strided_batch).alibi_slopes.shape == (B, H)


# --------------------------------------------------------------------------- backward


@pytest.mark.parametrize("which", ["dout", "out"])
@pytest.mark.parametrize("shape", [(B, SQ, H, D + 8), (B, SQ + 1, H, D), (B, SQ, H, D, 1),
                                   (B, SQ, HKV, D)])
def test_backward_dout_out_shape(which, shape):
    a = bwd_args()
    a[which] = np.zeros(shape, np.float32)
    with raises(ValueError, rf"^{which} must have the shape of q \({B}, {SQ}, {H}, {D}\), got "
                            + re.escape(str(shape))):
        backward(a)


@pytest.mark.parametrize("which", ["dout", "out"])
@pytest.mark.parametrize("dtype", [np.float16, np.float64, ml_dtypes.bfloat16])
def test_backward_dout_out_dtype(which, dtype):
    a = bwd_args(np.float32)
    a[which] = a[which].astype(dtype)
    with raises(TypeError, rf"^{which} must have the dtype of q \(float32\), got "
                           rf"{np.dtype(dtype)}$"):
        backward(a)


@pytest.mark.parametrize("which", ["dout", "out"])
def test_backward_dout_out_last_axis_not_contiguous(which):
    a = bwd_args()
    a[which] = noncontig_last(a[which])
    with raises(ValueError, rf"^{which} must be contiguous in its last axis"):
        backward(a)


@pytest.mark.parametrize("shape", [(B, SQ, H), (B, H, SQ + 1), (B, HKV, SQ), (B, H), (B, H, SQ, 1)])
def test_backward_lse_shape(shape):
    a = bwd_args()
    a["lse"] = np.zeros(shape, np.float32)
    with raises(ValueError, rf"^lse must have shape \(batch, nheads, seqlen_q\) = "
                            rf"\({B}, {H}, {SQ}\), got " + re.escape(str(shape))):
        backward(a)


@pytest.mark.parametrize("dtype", [np.float64, np.float16, ml_dtypes.bfloat16])
def test_backward_lse_dtype(dtype):
    a = bwd_args(np.float16)  # lse is float32 whatever the input dtype
    a["lse"] = a["lse"].astype(dtype)
    with raises(TypeError, rf"^lse must be float32, got {np.dtype(dtype)}$"):
        backward(a)


@pytest.mark.parametrize("which", ["dout", "out", "lse"])
def test_backward_non_array(which):
    a = bwd_args()
    a[which] = a[which].tolist()
    with raises(TypeError, rf"^{which} must be a numpy.ndarray, a cupy.ndarray or a CUDA "
                           rf"array with __dlpack__, got list$"):
        backward(a)


@pytest.mark.parametrize("bad", [1, 0, "yes", None, 1.0])
def test_backward_deterministic_not_bool(bad):
    with raises(TypeError, rf"^deterministic must be a bool, got {type(bad).__name__}$"):
        backward(bwd_args(), deterministic=bad)


def test_vjp_deterministic_not_bool_fails_before_the_forward():
    q, k, v = qkv()
    with raises(TypeError, r"^deterministic must be a bool, got int$"):
        cuflash.attention_vjp(q, k, v, deterministic=1)


# --------------------------------------------------------------------------- every entry point


def _forward(q, k, v, **kw):
    return cuflash.attention_forward(q, k, v, **kw)


def _attention(q, k, v, **kw):
    return cuflash.attention(q, k, v, return_lse=True, **kw)


def _backward(q, k, v, **kw):
    a = bwd_args()
    return cuflash.attention_backward(a["dout"], q, k, v, a["out"], a["lse"], **kw)


def _vjp(q, k, v, **kw):
    return cuflash.attention_vjp(q, k, v, **kw)


ENTRIES = [_forward, _attention, _backward, _vjp]


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda f: f.__name__.lstrip("_"))
@pytest.mark.parametrize("case", ["ndim", "headdim", "scale", "window", "softcap", "alibi"])
def test_every_entry_point_validates_the_same_way(entry, case):
    q, k, v = qkv()
    kw, exc, pattern = {}, ValueError, None
    if case == "ndim":
        k, pattern = k[0], r"^k must have 4 dimensions"
    elif case == "headdim":
        q, k, v = qkv(d=12)
        pattern = r"^headdim 12 is not supported"
    elif case == "scale":
        kw, pattern = {"scale": -1.0}, r"^scale must be finite and > 0"
    elif case == "window":
        kw, exc, pattern = {"window": (0.5, 0)}, TypeError, r"^window\[left\] must be None"
    elif case == "softcap":
        kw, pattern = {"softcap": -1.0}, r"^softcap must be finite and >= 0"
    elif case == "alibi":
        kw, exc = {"alibi_slopes": np.ones(H, np.float16)}, TypeError
        pattern = r"^alibi_slopes must be float32"
    with raises(exc, pattern):
        entry(q, k, v, **kw)


def test_checks_run_even_for_empty_problems():
    """An empty problem short-circuits the backend, not the validation."""
    q, k, v = qkv(b=0)
    with raises(ValueError, r"^scale must be finite"):
        cuflash.attention(q, k, v, scale=0.0)
    q, k, v = qkv(sk=0)
    with raises(TypeError, r"^alibi_slopes must be float32"):
        cuflash.attention(q, k, v, alibi_slopes=np.ones(H, np.float16))
    a = bwd_args()
    q, k, v = qkv(sk=0)
    with raises(TypeError, r"^deterministic must be a bool"):
        cuflash.attention_backward(a["dout"], q, k, v, a["out"], a["lse"], deterministic=None)


# --------------------------------------------------------------------------- kvcache, merge


def _kvcache(d=D, dtype=np.float32, hkv=HKV):
    q = qkv(d=d, dtype=dtype)[0]
    cache = np.zeros((B, 16, hkv, d), dtype)
    return cuflash.attention_with_kvcache(q, cache, cache, cache_seqlens=1)


def _merge(d=D, dtype=np.float32):
    out = qkv(d=d, dtype=dtype)[0]
    return cuflash.merge_attention([out, out], [np.zeros((B, H, SQ), np.float32)] * 2)


def test_kvcache_and_merge_check_dtypes_as_attention_does():
    with raises(TypeError, r"^q has dtype int32, which is not supported on the CPU; "
                           r"supported: float16, bfloat16, float32, float64$"):
        _kvcache(dtype=np.int32)
    with raises(TypeError, r"^outs\[0\] has dtype int32, which is not supported on the CPU; "
                           r"supported: float16, bfloat16, float32, float64$"):
        _merge(dtype=np.int32)
    q = qkv()[0]
    cache = np.zeros((B, 16, HKV, D), np.float16)
    with raises(TypeError, r"^k_cache has dtype float16 but q has dtype float32; q, the "
                           r"caches and k, v must share one dtype$"):
        cuflash.attention_with_kvcache(q, cache, cache, cache_seqlens=1)
    with raises(TypeError, r"^outs\[1\] has dtype float16 but outs\[0\] has dtype float32; "
                           r"every part must share one dtype$"):
        cuflash.merge_attention([q, q.astype(np.float16)],
                                [np.zeros((B, H, SQ), np.float32)] * 2)


@pytest.mark.parametrize("d", [12, 264])
def test_kvcache_checks_headdim_and_heads_as_attention_does(d):
    with raises(ValueError, rf"^headdim {d} is not supported; supported: multiples of 8 "
                            rf"from 8 to 256 \(32, 64, 96, 128, 192 and 256 run without "
                            rf"padding on the GPU\)$"):
        _kvcache(d=d)
    with raises(ValueError, rf"^nheads \({H}\) must be a multiple of the caches' nheads_kv "
                            rf"\(3\) for grouped-query attention$"):
        _kvcache(hkv=3)


def test_merge_takes_any_headdim():
    """merge_attention has no head-dim rule: the merge kernel reads rows of any length."""
    out, lse = _merge(d=12)
    assert out.shape == (B, SQ, H, 12) and lse.shape == (B, H, SQ)


def test_gpu_rows_past_int32_are_a_value_error():
    # A zero-stride view claims 2**31 rows without allocating them.
    huge = np.lib.stride_tricks.as_strided(np.zeros(8, np.float16), (1, 2**31, 1, 8),
                                           (0, 0, 0, 2))
    small = np.zeros((1, 4, 1, 8), np.float16)
    with pytest.raises(ValueError, match=r"k has 2147483648 rows .* fewer than 2\*\*31"):
        _checks.check_qkv(small, huge, huge, gpu=True)
    _checks.check_qkv(small, huge, huge, gpu=False)  # the CPU backend indexes in int64
