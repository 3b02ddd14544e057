"""API-level behaviour of the public functions on NumPy inputs (the CPU backend).

Empty problems never reach a backend; everything else runs cuflash/cpu.py and is compared
with cuflash/reference.py where a value matters.
"""
import doctest
import importlib
import os
import subprocess
import sys
import textwrap

import ml_dtypes
import numpy as np
import pytest

import cuflash
from cuflash import reference

DTYPES = [np.float16, ml_dtypes.bfloat16, np.float32, np.float64]


def qkv(b=2, sq=5, sk=7, h=4, hkv=2, d=16, dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, sq, h, d)).astype(dtype)
    k = rng.standard_normal((b, sk, hkv, d)).astype(dtype)
    v = rng.standard_normal((b, sk, hkv, d)).astype(dtype)
    return q, k, v


def dout_like(x, seed=1):
    return np.random.default_rng(seed).standard_normal(x.shape).astype(x.dtype)


def assert_same(a, b):
    """Bitwise-equal arrays of one dtype and shape (NaN never equal)."""
    assert a.dtype == b.dtype and a.shape == b.shape
    assert not np.isnan(a.astype(np.float64)).any()
    np.testing.assert_array_equal(a, b)


# --------------------------------------------------------------------------- empty problems


EMPTIES = {"batch0": dict(b=0), "seqlen_q0": dict(sq=0), "seqlen_k0": dict(sk=0),
           "nheads0": dict(h=0, hkv=1), "all0": dict(b=0, sq=0, sk=0)}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", EMPTIES, ids=list(EMPTIES))
def test_empty_forward(case, dtype):
    dims = dict(b=2, sq=5, sk=7, h=4, hkv=2, d=16)
    dims.update(EMPTIES[case])
    q, k, v = qkv(**dims, dtype=dtype)
    out, lse = cuflash.attention_forward(q, k, v, causal=True)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == (dims["b"], dims["h"], dims["sq"]) and lse.dtype == np.float32
    assert isinstance(out, np.ndarray) and isinstance(lse, np.ndarray)
    if case == "seqlen_k0":  # rows exist but see no key: out 0 and lse -inf, never NaN
        assert out.size > 0 and lse.size > 0
        assert (out.astype(np.float64) == 0).all()
        assert np.isneginf(lse).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", EMPTIES, ids=list(EMPTIES))
def test_empty_backward(case, dtype):
    dims = dict(b=2, sq=5, sk=7, h=4, hkv=2, d=16)
    dims.update(EMPTIES[case])
    q, k, v = qkv(**dims, dtype=dtype)
    out, lse = cuflash.attention_forward(q, k, v)
    grads = cuflash.attention_backward(dout_like(q), q, k, v, out, lse, deterministic=True)
    assert len(grads) == 3
    for g, x in zip(grads, (q, k, v)):
        assert isinstance(g, np.ndarray)
        assert g.shape == x.shape and g.dtype == x.dtype
        assert (g.astype(np.float64) == 0).all()
    if case == "seqlen_k0":
        assert grads[0].size > 0  # dq of rows that see no key: zeros, not garbage


def test_empty_vjp():
    q, k, v = qkv(sk=0)
    out, vjp = cuflash.attention_vjp(q, k, v, window=(1, 1))
    dq, dk, dv = vjp(dout_like(out))
    assert (out == 0).all() and (dq == 0).all() and dq.shape == q.shape
    assert dk.shape == dv.shape == k.shape


def test_empty_options_still_take_the_options():
    """Empty problems accept every option (ALiBi of either shape, window, softcap)."""
    q, k, v = qkv(b=0)
    out = cuflash.attention(q, k, v, alibi_slopes=np.ones(4, np.float32), softcap=5.0,
                            window=(2, 0), scale=0.3)
    assert out.shape == q.shape


# --------------------------------------------------------------------------- API equivalences
# (these run the CPU backend, cuflash/cpu.py)


OPTION_SETS = {
    "plain": {},
    "causal": dict(causal=True),
    "window_softcap": dict(window=(2, 1), softcap=3.0),
    "alibi_scale": dict(alibi_slopes=np.array([0.5, 0.25, 0.125, 0.0625], np.float32),
                        scale=0.4),
}


@pytest.mark.parametrize("opts", OPTION_SETS.values(), ids=list(OPTION_SETS))
def test_attention_return_lse_equals_attention_forward(opts):
    q, k, v = qkv()
    out_f, lse_f = cuflash.attention_forward(q, k, v, **opts)
    out_a, lse_a = cuflash.attention(q, k, v, return_lse=True, **opts)
    assert_same(out_a, out_f)
    assert_same(lse_a, lse_f)
    only_out = cuflash.attention(q, k, v, **opts)
    assert isinstance(only_out, np.ndarray)  # not a tuple without return_lse
    assert_same(only_out, out_f)


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("opts", OPTION_SETS.values(), ids=list(OPTION_SETS))
def test_vjp_equals_forward_then_backward(opts, deterministic):
    q, k, v = qkv()
    out, vjp = cuflash.attention_vjp(q, k, v, deterministic=deterministic, **opts)
    out_f, lse_f = cuflash.attention_forward(q, k, v, **opts)
    assert_same(out, out_f)
    do = dout_like(q)
    got = vjp(do)
    want = cuflash.attention_backward(do, q, k, v, out_f, lse_f, deterministic=True, **opts)
    assert len(got) == 3
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        assert g.dtype == w.dtype and g.shape == w.shape, name
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6, err_msg=name)
    # and the pair is actually the gradient: it agrees with the reference backward
    ref = reference.attention_backward(do, q, k, v, **opts)
    for name, g, r in zip(("dq", "dk", "dv"), got, ref):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4, err_msg=name)


def test_vjp_can_be_called_twice():
    q, k, v = qkv()
    _, vjp = cuflash.attention_vjp(q, k, v)
    do1, do2 = dout_like(q, 1), dout_like(q, 2)
    g1, g2 = vjp(do1), vjp(do2)
    np.testing.assert_allclose(vjp(do1)[0], g1[0], rtol=1e-6, atol=1e-7)
    assert not np.allclose(g1[0], g2[0])


def test_default_scale_is_headdim_to_the_minus_half():
    d = 32
    q, k, v = qkv(d=d)
    out_default, lse_default = cuflash.attention_forward(q, k, v)
    out_explicit, lse_explicit = cuflash.attention_forward(q, k, v, scale=d ** -0.5)
    assert_same(out_default, out_explicit)
    assert_same(lse_default, lse_explicit)
    # the scale is actually applied: the default matches the reference at d**-0.5 ...
    out_ref, lse_ref = reference.attention_forward(q, k, v, scale=d ** -0.5)
    np.testing.assert_allclose(out_default, out_ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(lse_default, lse_ref, rtol=1e-4, atol=1e-5)
    # ... and another scale gives another result
    out_other, _ = cuflash.attention_forward(q, k, v, scale=1.0)
    assert np.abs(out_other - out_default).max() > 1e-2


def test_default_scale_in_backward():
    d = 24
    q, k, v = qkv(d=d)
    out, lse = cuflash.attention_forward(q, k, v)
    do = dout_like(q)
    g_default = cuflash.attention_backward(do, q, k, v, out, lse)
    g_explicit = cuflash.attention_backward(do, q, k, v, out, lse, scale=d ** -0.5)
    for a, b in zip(g_default, g_explicit):
        assert_same(a, b)


@pytest.mark.parametrize("causal", [False, True])
def test_window_minus_one_equals_none(causal):
    q, k, v = qkv()
    right = 0 if causal else -1
    right_none = 0 if causal else None
    a = cuflash.attention_forward(q, k, v, causal=causal, window=(-1, right))
    b = cuflash.attention_forward(q, k, v, causal=causal, window=(None, right_none))
    c = cuflash.attention_forward(q, k, v, causal=causal, window=[None, -1])
    for x, y, z in zip(a, b, c):
        assert_same(x, y)
        assert_same(x, z)
    # and a window is not ignored: a narrow one changes the result
    narrow, _ = cuflash.attention_forward(q, k, v, causal=causal, window=(1, 0))
    assert np.abs(narrow - a[0]).max() > 1e-2


def test_causal_equals_window_none_zero():
    q, k, v = qkv(sq=5, sk=7)
    do = dout_like(q)
    causal = cuflash.attention_forward(q, k, v, causal=True)
    window = cuflash.attention_forward(q, k, v, window=(None, 0))
    for x, y in zip(causal, window):
        assert_same(x, y)
    gc = cuflash.attention_backward(do, q, k, v, *causal, causal=True)
    gw = cuflash.attention_backward(do, q, k, v, *window, window=(None, 0))
    for x, y in zip(gc, gw):
        assert_same(x, y)
    full, _ = cuflash.attention_forward(q, k, v)
    assert np.abs(full - causal[0]).max() > 1e-2  # causal is not a no-op
    # bottom-right aligned: the last query sees every key, so its row equals the full one
    np.testing.assert_allclose(causal[0][:, -1], full[:, -1], rtol=1e-5, atol=1e-6)


def test_huge_window_equals_unbounded():
    q, k, v = qkv()
    a = cuflash.attention_forward(q, k, v, window=(2 ** 40, 10 ** 20))
    b = cuflash.attention_forward(q, k, v)
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)


def test_alibi_per_head_equals_per_batch_tiled():
    q, k, v = qkv(b=2, h=4)
    slopes = np.array([0.5, 0.25, 0.125, 0.0625], np.float32)
    a = cuflash.attention_forward(q, k, v, alibi_slopes=slopes)
    b = cuflash.attention_forward(q, k, v, alibi_slopes=np.tile(slopes, (2, 1)))
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
    none, _ = cuflash.attention_forward(q, k, v)
    assert np.abs(none - a[0]).max() > 1e-3  # ALiBi is applied


def test_fully_masked_rows_give_zero_out_minus_inf_lse_and_zero_grads():
    """seqlen_q > seqlen_k with causal: the first seqlen_q - seqlen_k queries see no key."""
    q, k, v = qkv(sq=6, sk=3)
    out, lse = cuflash.attention_forward(q, k, v, causal=True)
    assert (out[:, :3] == 0).all() and np.isneginf(lse[:, :, :3]).all()
    assert np.isfinite(out).all() and np.isfinite(lse[:, :, 3:]).all()
    dq, dk, dv = cuflash.attention_backward(dout_like(q), q, k, v, out, lse, causal=True)
    assert (dq[:, :3] == 0).all()
    assert all(np.isfinite(g).all() for g in (dq, dk, dv))


def test_strided_inputs_equal_contiguous_inputs():
    """Only the last axis must be contiguous; other strides are honoured, not assumed."""
    q, k, v = qkv()
    qs = np.ascontiguousarray(q.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)
    ks = np.concatenate([k, np.full_like(k, 1e3)], axis=1)[:, ::2]
    ks[...] = k
    vs = np.concatenate([np.full_like(v, 1e3), v], axis=2)[:, :, 2:]
    assert not (qs.flags.c_contiguous or ks.flags.c_contiguous or vs.flags.c_contiguous)
    a = cuflash.attention_forward(qs, ks, vs)
    b = cuflash.attention_forward(q, k, v)
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------- dtypes and shapes


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sq,sk,h,hkv", [(5, 7, 4, 2), (7, 3, 4, 1), (1, 1, 2, 2)])
def test_output_and_gradient_dtypes_and_shapes(dtype, sq, sk, h, hkv):
    q, k, v = qkv(b=2, sq=sq, sk=sk, h=h, hkv=hkv, d=8, dtype=dtype)
    out, lse = cuflash.attention_forward(q, k, v, causal=True)
    assert isinstance(out, np.ndarray) and out.dtype == q.dtype and out.shape == q.shape
    assert lse.dtype == np.float32 and lse.shape == (2, h, sq)
    assert cuflash.attention(q, k, v).dtype == q.dtype
    dq, dk, dv = cuflash.attention_backward(dout_like(q), q, k, v, out, lse, causal=True)
    for g, x in ((dq, q), (dk, k), (dv, v)):
        assert isinstance(g, np.ndarray) and g.dtype == x.dtype and g.shape == x.shape
        assert np.isfinite(g.astype(np.float64)).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_values_match_reference(dtype):
    """A loose value check per dtype, so the dtype tests cannot pass on garbage."""
    q, k, v = qkv(dtype=dtype)
    out, lse = cuflash.attention_forward(q, k, v)
    ref_out, ref_lse = reference.attention_forward(q, k, v)
    tol = {np.dtype(np.float16): 1e-2, np.dtype(ml_dtypes.bfloat16): 5e-2}.get(
        np.dtype(dtype), 1e-5)
    np.testing.assert_allclose(out.astype(np.float64), ref_out, rtol=tol, atol=tol)
    np.testing.assert_allclose(lse, ref_lse, rtol=1e-3, atol=1e-3)


def test_inputs_are_not_modified():
    q, k, v = qkv()
    copies = [x.copy() for x in (q, k, v)]
    out, lse = cuflash.attention_forward(q, k, v, causal=True)
    do = dout_like(q)
    do_copy, out_copy, lse_copy = do.copy(), out.copy(), lse.copy()
    cuflash.attention_backward(do, q, k, v, out, lse, causal=True)
    for x, c in zip((q, k, v, do, out, lse), (*copies, do_copy, out_copy, lse_copy)):
        np.testing.assert_array_equal(x, c)


# --------------------------------------------------------------------------- docs and import


def test_docstring_examples_run():
    # cuflash.attention is the function (the package re-exports it); get the module itself
    module = importlib.import_module("cuflash.attention")
    assert module is sys.modules["cuflash.attention"] and module is not cuflash.attention
    result = doctest.testmod(module, verbose=False)
    assert result.attempted >= 12  # the examples of all four public functions were found
    assert result.failed == 0


def test_options_are_documented_in_every_docstring():
    for f in (cuflash.attention, cuflash.attention_forward, cuflash.attention_backward):
        doc = f.__doc__
        assert "{options}" not in doc
        for name in ("scale", "causal", "window", "softcap", "alibi_slopes"):
            assert f"    {name} :" in doc, (f.__name__, name)


def _run_python(code, *flags):
    """Run code in a fresh interpreter that imports this checkout's cuflash."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(cuflash.__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in [env.get("PYTHONPATH")] if p])
    return subprocess.run([sys.executable, *flags, "-c", textwrap.dedent(code)],
                          capture_output=True, text=True, timeout=120, env=env, cwd=root)


def test_import_without_cupy():
    """The package (and the NumPy path) never needs CuPy."""
    r = _run_python("""
        import sys
        sys.modules["cupy"] = None  # any `import cupy` now raises ImportError
        import numpy as np
        import cuflash
        q = np.random.default_rng(0).standard_normal((1, 4, 2, 8)).astype(np.float32)
        out, lse = cuflash.attention_forward(q, q, q, causal=True)
        dq, dk, dv = cuflash.attention_backward(np.ones_like(out), q, q, q, out, lse)
        assert out.shape == q.shape and dq.shape == q.shape
        assert sys.modules["cupy"] is None
        print("ok", cuflash.__version__)
    """)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ok ")


def test_import_under_python_OO():
    """Docstrings are stripped under -OO; the import must not depend on them."""
    r = _run_python("import cuflash; assert cuflash.attention.__doc__ is None; print('ok')",
                    "-OO")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"


def test_public_names():
    assert set(cuflash.__all__) >= {"attention", "attention_forward", "attention_backward",
                                    "attention_vjp", "reference"}
    for name in cuflash.__all__:
        assert hasattr(cuflash, name), name
