"""Varlen attention (packed sequences, no padding) against the dense computation per sequence.

The expected result of a varlen call is the dense reference (``reference.attention_forward``
/ ``attention_backward``) run on each sequence alone, as a batch of one with that sequence's
own lengths and ALiBi row; the accuracy rule of tests/accuracy.py compares against it. The
lengths include 0 (no queries, or no keys: out 0, lse -inf, zero gradients) and 1, and
differ between queries and keys per sequence.

CPU tests run the NumPy backend (small blocks, so that short sequences cross many block
boundaries) and the public API, plus the argument checks. GPU tests (marker ``gpu``) run the
varlen instantiations of the kernels (flash_fwd_sm90 on Hopper for head dims 64/128, the
mma.sync kernels otherwise) under an allocator hook that fills every allocation with NaN
bytes and records its size, as tests/test_gpu_forward.py does, and the device check of
prefix sums that the host does not read (CuPy cu_seqlens): invalid ones give all-NaN
outputs, never a crash.
"""
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import cuflash
from accuracy import assert_close
from cuflash import _checks, cpu, reference
from gpu import array_module, dq_scratch_bytes, launches, poisoned

BF16 = np.dtype(ml_dtypes.bfloat16)
F16 = np.dtype(np.float16)
F32 = np.dtype(np.float32)
F64 = np.dtype(np.float64)

# Per sequence: no queries; 1 x 1; more queries than keys; no keys; more keys than queries;
# 1 query x 2 keys; empty; equal.
LENS_Q = (0, 1, 17, 5, 33, 1, 0, 24)
LENS_K = (3, 1, 9, 0, 40, 2, 0, 24)
BLOCKS = (16, 8)


def cu_seqlens(lengths):
    return np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int32)


def pack(rng, dtype, lens_q=LENS_Q, lens_k=LENS_K, nheads=4, nheads_kv=2, headdim=32):
    """Random packed q (total_q, nheads, headdim), k, v (total_k, nheads_kv, headdim) and the
    two prefix sums."""
    cu_q, cu_k = cu_seqlens(lens_q), cu_seqlens(lens_k)
    q = rng.standard_normal((cu_q[-1], nheads, headdim)).astype(dtype)
    k = rng.standard_normal((cu_k[-1], nheads_kv, headdim)).astype(dtype)
    v = rng.standard_normal((cu_k[-1], nheads_kv, headdim)).astype(dtype)
    return q, k, v, cu_q, cu_k


def _sequences(cu_q, cu_k, options):
    """(q rows, k rows, dense options) of each sequence; ALiBi slopes of shape (batch,
    nheads) give each sequence its row."""
    slopes = options.get("alibi_slopes")
    for b in range(len(cu_q) - 1):
        opts = dict(options)
        if slopes is not None and slopes.ndim == 2:
            opts["alibi_slopes"] = slopes[b]
        yield slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1]), opts


def dense_forward(q, k, v, cu_q, cu_k, upcast, **options):
    """out (total_q, nheads, headdim) and lse (nheads, total_q) by the dense reference, one
    sequence at a time (on the GPU for CuPy arrays)."""
    xp = array_module(q)
    dtype = np.float64 if upcast else q.dtype
    out = xp.zeros(q.shape, dtype)
    lse = xp.full((q.shape[1], q.shape[0]), -np.inf, dtype)
    for rq, rk, opts in _sequences(cu_q, cu_k, options):
        o, l = reference.attention_forward(q[None, rq], k[None, rk], v[None, rk],
                                           upcast=upcast, **opts)
        out[rq], lse[:, rq] = o[0], l[0]
    return out, lse


def dense_backward(dout, q, k, v, cu_q, cu_k, upcast, **options):
    """dq, dk, dv by the dense reference, one sequence at a time (on the GPU for CuPy
    arrays)."""
    xp = array_module(q)
    dtype = np.float64 if upcast else q.dtype
    grads = tuple(xp.zeros(x.shape, dtype) for x in (q, k, v))
    for rq, rk, opts in _sequences(cu_q, cu_k, options):
        g = reference.attention_backward(dout[None, rq], q[None, rq], k[None, rk],
                                         v[None, rk], upcast=upcast, **opts)
        for total, part, rows in zip(grads, g, (rq, rk, rk)):
            total[rows] = part[0]
    return grads


def check_forward(out, lse, q, k, v, cu_q, cu_k, where="", **options):
    """The accuracy rule on out and lse against the dense reference per sequence."""
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == (q.shape[1], q.shape[0]) and lse.dtype == np.float32
    ref, naive = (dense_forward(q, k, v, cu_q, cu_k, u, **options) for u in (True, False))
    assert_close(f"out {where}", out, ref[0], naive[0])
    assert_close(f"lse {where}", lse, ref[1], naive[1])
    return ref


def check_backward(grads, dout, q, k, v, cu_q, cu_k, where="", **options):
    ref, naive = (dense_backward(dout, q, k, v, cu_q, cu_k, u, **options)
                  for u in (True, False))
    for name, got, x, r, n in zip(("dq", "dk", "dv"), grads, (q, k, v), ref, naive):
        assert got.shape == x.shape and got.dtype == x.dtype, name
        assert_close(f"{name} {where}", got, r, n)


def run_cpu(rng, q, k, v, cu_q, cu_k, blocks=BLOCKS, **options):
    """The NumPy backend forward and backward with ``blocks``, checked; returns them."""
    shape, varlen = _checks.check_varlen(q, k, v, cu_q, cu_k, q.shape[0], k.shape[0],
                                         gpu=False)
    opts = _checks.options(shape, "numpy", q, **options)
    Br, Bc = blocks
    out, lse = cpu.forward_varlen(q, k, v, shape, opts, varlen, Br=Br, Bc=Bc)
    check_forward(out, lse, q, k, v, cu_q, cu_k, **options)
    dout = rng.standard_normal(q.shape).astype(q.dtype)
    grads = cpu.backward_varlen(dout, q, k, v, out, lse, shape, opts, varlen, Br=Br, Bc=Bc)
    check_backward(grads, dout, q, k, v, cu_q, cu_k, **options)
    return out, lse, grads


# --------------------------------------------------------------------------- CPU backend

OPTIONS = {
    "none": dict(),
    "causal": dict(causal=True),
    "window": dict(window=(4, 2)),
    "window-left": dict(window=(5, None)),
    "window-right": dict(window=(None, 3)),
    "diagonal": dict(window=(0, 0)),
    "softcap": dict(softcap=2.0, scale=0.4),
    "alibi-heads": dict(alibi_slopes="heads"),
    "alibi-batch-causal": dict(alibi_slopes="batch", causal=True),
    "all": dict(alibi_slopes="batch", softcap=5.0, window=(6, 1)),
}


def with_slopes(rng, options, batch, nheads):
    options = dict(options)
    if options.get("alibi_slopes") == "heads":
        options["alibi_slopes"] = rng.uniform(0.05, 0.5, nheads).astype(np.float32)
    elif options.get("alibi_slopes") == "batch":
        options["alibi_slopes"] = rng.uniform(0.05, 0.5, (batch, nheads)).astype(np.float32)
    return options


@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
@pytest.mark.parametrize("dtype", [F16, F32], ids=str)
def test_options(rng, dtype, options):
    q, k, v, cu_q, cu_k = pack(rng, dtype)
    run_cpu(rng, q, k, v, cu_q, cu_k, **with_slopes(rng, options, len(LENS_Q), 4))


@pytest.mark.parametrize("headdim", [8, 40, 64])
@pytest.mark.parametrize("dtype", [F16, BF16, F32, F64], ids=str)
def test_dtypes_and_headdims(rng, dtype, headdim):
    q, k, v, cu_q, cu_k = pack(rng, dtype, headdim=headdim)
    run_cpu(rng, q, k, v, cu_q, cu_k, causal=True)


@pytest.mark.parametrize("group", [1, 2, 4])
def test_gqa(rng, group):
    q, k, v, cu_q, cu_k = pack(rng, BF16, nheads=4, nheads_kv=4 // group)
    run_cpu(rng, q, k, v, cu_q, cu_k, window=(7, 0))


def test_empty_and_keyless_sequences(rng):
    q, k, v, cu_q, cu_k = pack(rng, F32)
    out, lse, (dq, dk, dv) = run_cpu(rng, q, k, v, cu_q, cu_k)
    rows = slice(cu_q[3], cu_q[4])  # 5 queries, no keys
    assert (out[rows] == 0).all() and np.isneginf(lse[:, rows]).all() and (dq[rows] == 0).all()
    keys = slice(cu_k[0], cu_k[1])  # 3 keys, no queries
    assert (dk[keys] == 0).all() and (dv[keys] == 0).all()
    others = np.ones(q.shape[0], bool)
    others[rows] = False
    assert np.isfinite(lse[:, others]).all()


@pytest.mark.parametrize("lens", [((), ()), ((0, 0), (4, 2)), ((3, 2), (0, 0))], ids=str)
def test_nothing_to_compute(lens):
    """No sequences, no queries, or no keys at all: zeros and -inf, of the right shapes."""
    rng = np.random.default_rng(0)
    q, k, v, cu_q, cu_k = pack(rng, F32, *lens)
    out, lse = cuflash.attention_varlen_forward(q, k, v, cu_q, cu_k, 4, 4)
    assert out.shape == q.shape and lse.shape == (4, q.shape[0])
    assert (out == 0).all() and np.isneginf(lse).all()
    grads = cuflash.attention_varlen_backward(out, q, k, v, out, lse, cu_q, cu_k, 4, 4)
    for g, x in zip(grads, (q, k, v)):
        assert g.shape == x.shape and g.dtype == x.dtype and (g == 0).all()


@pytest.mark.parametrize("options", [dict(), dict(causal=True), dict(window=(100, 20))],
                         ids=str)
def test_long_sequences_default_blocks(rng, options):
    lens_q, lens_k = (300, 1, 129), (260, 300, 129)
    q, k, v, cu_q, cu_k = pack(rng, F16, lens_q, lens_k, nheads=2, nheads_kv=1, headdim=64)
    run_cpu(rng, q, k, v, cu_q, cu_k, blocks=(cpu.BR, cpu.BC), **options)


def test_public_api_equals_dense_api_per_sequence(rng):
    """The varlen CPU path is the dense CPU path on each sequence: bitwise equal results."""
    q, k, v, cu_q, cu_k = pack(rng, BF16)
    slopes = rng.uniform(0.05, 0.5, (len(LENS_Q), 4)).astype(np.float32)
    options = dict(causal=True, softcap=3.0, alibi_slopes=slopes)
    out, lse = cuflash.attention_varlen_forward(q, k, v, cu_q, cu_k, 33, 40, **options)
    out2, lse2 = cuflash.attention_varlen(q, k, v, cu_q, cu_k, 33, 40, return_lse=True,
                                          **options)
    np.testing.assert_array_equal(out2, out)
    np.testing.assert_array_equal(lse2, lse)
    dout = rng.standard_normal(q.shape).astype(q.dtype)
    grads = cuflash.attention_varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, 33, 40,
                                              **options)
    for rq, rk, opts in _sequences(cu_q, cu_k, options):
        want_out, want_lse = cuflash.attention_forward(q[None, rq], k[None, rk], v[None, rk],
                                                       **opts)
        np.testing.assert_array_equal(out[rq], want_out[0])
        np.testing.assert_array_equal(lse[:, rq], want_lse[0])
        want = cuflash.attention_backward(dout[None, rq], q[None, rq], k[None, rk],
                                          v[None, rk], want_out, want_lse, **opts)
        for got, w, rows in zip(grads, want, (rq, rk, rk)):
            np.testing.assert_array_equal(got[rows], w[0])


@pytest.mark.parametrize("upcast", [True, False])
def test_reference_is_the_dense_reference_per_sequence(rng, upcast):
    q, k, v, cu_q, cu_k = pack(rng, F16)
    options = dict(window=(3, 8), alibi_slopes=rng.uniform(0, 1, 4).astype(np.float32))
    got = reference.attention_varlen_forward(q, k, v, cu_q, cu_k, 33, 40, upcast=upcast,
                                             **options)
    want = dense_forward(q, k, v, cu_q, cu_k, upcast, **options)
    dout = rng.standard_normal(q.shape).astype(q.dtype)
    got += reference.attention_varlen_backward(dout, q, k, v, cu_q, cu_k, 33, 40,
                                               upcast=upcast, **options)
    want += dense_backward(dout, q, k, v, cu_q, cu_k, upcast, **options)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype
        np.testing.assert_array_equal(g, w)


def test_strided_inputs(rng):
    """q, k, v slices of one packed qkv tensor; out and dout transposed views: the same
    results as contiguous copies."""
    total, h, hkv, d = sum(LENS_Q), 4, 2, 32
    lens = LENS_Q  # self-attention: k and v share q's packing
    cu = cu_seqlens(lens)
    qkv = rng.standard_normal((total, h + 2 * hkv, d)).astype(F32)
    q, k, v = qkv[:, :h], qkv[:, h:h + hkv], qkv[:, h + hkv:]
    out, lse = cuflash.attention_varlen_forward(q, k, v, cu, cu, 33, 33, causal=True)
    contiguous = [np.ascontiguousarray(x) for x in (q, k, v)]
    want_out, want_lse = cuflash.attention_varlen_forward(*contiguous, cu, cu, 33, 33,
                                                          causal=True)
    np.testing.assert_array_equal(out, want_out)
    np.testing.assert_array_equal(lse, want_lse)
    dout = rng.standard_normal(q.shape).astype(F32)
    t_out = np.ascontiguousarray(out.transpose(1, 0, 2)).transpose(1, 0, 2)
    t_dout = np.ascontiguousarray(dout.transpose(1, 0, 2)).transpose(1, 0, 2)
    got = cuflash.attention_varlen_backward(t_dout, q, k, v, t_out, lse, cu, cu, 33, 33,
                                            causal=True)
    want = cuflash.attention_varlen_backward(dout, *contiguous, out, lse, cu, cu, 33, 33,
                                             causal=True)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


def test_max_seqlen_is_an_upper_bound(rng):
    q, k, v, cu_q, cu_k = pack(rng, F32)
    exact = cuflash.attention_varlen_forward(q, k, v, cu_q, cu_k, 33, 40, causal=True)
    loose = cuflash.attention_varlen_forward(q, k, v, cu_q, cu_k, 1000, 5000, causal=True)
    for a, b in zip(exact, loose):
        np.testing.assert_array_equal(a, b)


@given(data=st.data())
@settings(max_examples=30, deadline=None)
def test_random_configurations(data):
    draw = data.draw
    batch = draw(st.integers(1, 5))
    lens_q = draw(st.lists(st.integers(0, 20), min_size=batch, max_size=batch))
    lens_k = draw(st.lists(st.integers(0, 20), min_size=batch, max_size=batch))
    side = st.one_of(st.none(), st.integers(0, 25))
    options = dict(window=(draw(side), draw(side)), softcap=draw(st.sampled_from([0.0, 2.0])))
    if draw(st.booleans()):
        options["alibi_slopes"] = np.float32([0.25, 0.5, 0.125, 1.0])
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    dtype = draw(st.sampled_from([F16, F32, F64]))
    nheads_kv = draw(st.sampled_from([1, 4]))
    q, k, v, cu_q, cu_k = pack(rng, dtype, lens_q, lens_k, nheads_kv=nheads_kv, headdim=16)
    blocks = (draw(st.integers(1, 24)), draw(st.integers(1, 24)))
    run_cpu(rng, q, k, v, cu_q, cu_k, blocks=blocks, **options)


def test_docstrings_document_every_argument():
    for f in (cuflash.attention_varlen, cuflash.attention_varlen_forward,
              cuflash.attention_varlen_backward):
        doc = f.__doc__
        assert "{" not in doc, f.__name__
        names = ["scale", "causal", "window", "softcap", "alibi_slopes"]
        if f is not cuflash.attention_varlen_backward:  # which refers to the forward's
            names += ["q", "k, v", "cu_seqlens_q, cu_seqlens_k", "max_seqlen_q, max_seqlen_k"]
        for name in names:
            assert f"\n    {name} :" in doc, (f.__name__, name)


def test_param_structs_match_their_numpy_mirrors():
    """The cu_seqlens pointers appended to AttnArgs (and so to every params struct holding
    it) keep each C struct the size of its NumPy mirror (cuflash/_core.py, cuflash/ops/).
    NVRTC only."""
    nvrtc = pytest.importorskip("cupy_backends.cuda.libs.nvrtc")
    from cuflash import _compile, _core, ops
    mirrors = dict(AttnArgs=_core.ATTN_ARGS, FwdParams=ops.forward.PARAMS,
                   BwdParams=ops.backward.PARAMS, DecodeParams=ops.decode.PARAMS)
    source = '#include "common/params.cuh"\n' + "".join(
        f'static_assert(sizeof(cuflash::{name}) == {dtype.itemsize}, "{name}");\n'
        for name, dtype in mirrors.items())
    assert _core.ATTN_ARGS.names[-2:] == ("cu_seqlens_q", "cu_seqlens_k")
    prog = nvrtc.createProgram(source, "layout.cu", [], [])
    try:
        nvrtc.compileProgram(prog, list(_compile.options("sm_80", "common/params.cuh")))
    except nvrtc.NVRTCError:
        pytest.fail(nvrtc.getProgramLog(prog))
    finally:
        nvrtc.destroyProgram(prog)


# --------------------------------------------------------------------------- validation

def _args(**override):
    """Valid attention_varlen_forward arguments, with some replaced."""
    rng = np.random.default_rng(0)
    q, k, v, cu_q, cu_k = pack(rng, F32, (2, 3), (4, 1))
    args = dict(q=q, k=k, v=v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=3,
                max_seqlen_k=4)
    args.update(override)
    return args


def _forward(**override):
    a = _args(**override)
    return cuflash.attention_varlen_forward(
        a.pop("q"), a.pop("k"), a.pop("v"), a.pop("cu_seqlens_q"), a.pop("cu_seqlens_k"),
        a.pop("max_seqlen_q"), a.pop("max_seqlen_k"), **a)


def test_valid_arguments_pass():
    out, lse = _forward()
    assert out.shape == (5, 4, 32) and lse.shape == (4, 5)


@pytest.mark.parametrize("override, exc, pattern", [
    (dict(q=np.zeros((1, 5, 4, 32), np.float32)), ValueError, r"q must have 3 dimensions"),
    (dict(k=np.zeros((6, 2, 32), np.float32)), ValueError, r"v has shape .* but k has shape"),
    (dict(v=np.zeros((5, 3, 32), np.float32)), ValueError, r"v has shape"),
    (dict(k=np.zeros((5, 2, 32), np.float16), v=np.zeros((5, 2, 32), np.float16)), TypeError,
     r"k has dtype float16 but q has dtype float32"),
    (dict(k=np.zeros((5, 3, 32), np.float32), v=np.zeros((5, 3, 32), np.float32)), ValueError,
     r"nheads \(4\) must be a multiple of nheads_kv \(3\)"),
    (dict(cu_seqlens_q=np.array([0, 2, 5], np.int16)), TypeError,
     r"cu_seqlens_q must be int32 \(or int64 for NumPy prefix sums\), got int16"),
    (dict(cu_seqlens_k=[0, 4, 5]), TypeError, r"cu_seqlens_k must be a numpy.ndarray"),
    (dict(cu_seqlens_q=np.array([[0, 2, 5]], np.int32)), ValueError,
     r"cu_seqlens_q must be 1-D"),
    (dict(cu_seqlens_q=np.array([], np.int32)), ValueError, r"cu_seqlens_q must be 1-D"),
    (dict(cu_seqlens_q=np.array([1, 2, 5], np.int32)), ValueError,
     r"cu_seqlens_q\[0\] must be 0, got 1"),
    (dict(cu_seqlens_k=np.array([0, 4, 6], np.int32)), ValueError,
     r"cu_seqlens_k\[-1\] must equal total_k = 5 .*got 6"),
    (dict(cu_seqlens_q=np.array([0, 4, 2, 5], np.int32), cu_seqlens_k=np.array([0, 1, 4, 5],
                                                                                np.int32)),
     ValueError, r"cu_seqlens_q must be non-decreasing; cu_seqlens_q\[2\] = 2 < "
                 r"cu_seqlens_q\[1\] = 4"),
    (dict(cu_seqlens_k=np.array([0, 5], np.int32)), ValueError,
     r"cu_seqlens_q has 3 entries but cu_seqlens_k has 2"),
    (dict(max_seqlen_q=2), ValueError,
     r"max_seqlen_q \(2\) is smaller than the longest sequence in cu_seqlens_q \(3\)"),
    (dict(max_seqlen_q=-1), ValueError, r"max_seqlen_q must be >= 0, got -1"),
    (dict(max_seqlen_k=3.0), TypeError, r"max_seqlen_k must be an int, got float"),
    (dict(max_seqlen_k=True), TypeError, r"max_seqlen_k must be an int, got bool"),
    (dict(alibi_slopes=np.ones((3, 4), np.float32)), ValueError,
     r"alibi_slopes must have shape \(nheads,\) = \(4,\) or \(batch, nheads\) = \(2, 4\)"),
    (dict(window=(-2, None)), ValueError, r"window\[left\]"),
    (dict(causal=True, window=(None, 2)), ValueError, r"contradicts causal=True"),
])
def test_invalid_arguments(override, exc, pattern):
    with pytest.raises(exc, match=pattern):
        _forward(**override)


def test_backward_checks_its_arrays():
    a = _args()
    q, k, v, cu_q, cu_k = a["q"], a["k"], a["v"], a["cu_seqlens_q"], a["cu_seqlens_k"]
    out, lse = cuflash.attention_varlen_forward(q, k, v, cu_q, cu_k, 3, 4)
    with pytest.raises(ValueError, match=r"lse must have shape \(nheads, total_q\) = "
                                         r"\(4, 5\), got \(1, 4, 5\)"):
        cuflash.attention_varlen_backward(out, q, k, v, out, lse[None], cu_q, cu_k, 3, 4)
    with pytest.raises(ValueError, match=r"dout must have the shape of q"):
        cuflash.attention_varlen_backward(out[:4], q, k, v, out, lse, cu_q, cu_k, 3, 4)
    with pytest.raises(TypeError, match=r"deterministic must be a bool"):
        cuflash.attention_varlen_backward(out, q, k, v, out, lse, cu_q, cu_k, 3, 4,
                                          deterministic=1)
    with pytest.raises(ValueError, match=r"cu_seqlens_k\[-1\] must equal total_k"):
        cuflash.attention_varlen_backward(out, q, k, v, out, lse, cu_q,
                                          np.array([0, 4, 6], np.int32), 3, 4)


# --------------------------------------------------------------------------- GPU

def check_gpu(dtype, lens_q, lens_k, nheads, nheads_kv, headdim, alibi=None,
              deterministic=False, seed=None, **options):
    """Forward and backward on the GPU against the dense reference per sequence.

    The backward takes out/lse from the reference (as tests/test_gpu_backward.py does), so
    it does not depend on the forward kernel. Returns (out, lse, grads) as CuPy arrays.
    """
    import cupy
    from cuflash import ops
    if seed is None:
        seed = int(np.random.SeedSequence().entropy % 2**32)
    rng = np.random.default_rng(seed)
    dtype = np.dtype(dtype)
    q, k, v, cu_q, cu_k = pack(rng, dtype, lens_q, lens_k, nheads, nheads_kv, headdim)
    batch = len(lens_q)
    if alibi == "heads":
        options["alibi_slopes"] = rng.uniform(0.01, 0.5, nheads).astype(np.float32)
    elif alibi == "batch":
        options["alibi_slopes"] = rng.uniform(0.01, 0.5, (batch, nheads)).astype(np.float32)
    where = (f"seed {seed}, {dtype}, lens_q {lens_q} lens_k {lens_k} h{nheads}/{nheads_kv} "
             f"d{headdim} alibi={alibi} det={deterministic} {options}")
    g = {name: cupy.asarray(x) for name, x in dict(q=q, k=k, v=v, cu_q=cu_q, cu_k=cu_k).items()}
    gopts = {n: cupy.asarray(x) if isinstance(x, np.ndarray) else x for n, x in options.items()}
    max_q, max_k = max(lens_q), max(lens_k)

    (out, lse), sizes = poisoned(cuflash.attention_varlen_forward, g["q"], g["k"], g["v"],
                                 g["cu_q"], g["cu_k"], max_q, max_k, **gopts)
    assert sorted(sizes) == sorted([out.nbytes, lse.nbytes]), (
        f"forward allocated {sizes}, expected only out and lse ({where})")
    ref = check_forward(out, lse, g["q"], g["k"], g["v"], cu_q, cu_k, where, **gopts)

    dout = cupy.asarray(rng.standard_normal(q.shape).astype(dtype))
    ref_out, ref_lse = ref[0].astype(dtype), ref[1].astype(F32)
    with launches() as launched:
        grads, sizes = poisoned(cuflash.attention_varlen_backward, dout,
                                g["q"], g["k"], g["v"], ref_out, ref_lse, g["cu_q"], g["cu_k"],
                                max_q, max_k, deterministic=deterministic, **gopts)
    # Gradients plus one float32 scratch allocation: lse_log2 and delta of (nheads,
    # total_q rounded down to 16 + 144 per sequence) rows, each aligned to 256 bytes, and
    # the dq scratch.
    rows = nheads * (q.shape[0] // 16 * 16 + 144 * batch)
    allowed = sum(x.nbytes for x in grads) + 2 * (-(-rows * 4 // 256) * 256) + \
        dq_scratch_bytes(rows, headdim, deterministic, launched)
    assert sum(sizes) <= allowed + 512 * len(sizes), (
        f"backward allocated {sizes}; allowed {allowed} ({where})")
    check_backward(grads, dout, g["q"], g["k"], g["v"], cu_q, cu_k, where, **gopts)
    return out, lse, grads


@pytest.mark.gpu
@pytest.mark.parametrize("headdim", [32, 40, 64, 96, 128, 192, 256])
def test_gpu_headdims(headdim):
    check_gpu(BF16, (130, 0, 1, 17, 64), (97, 5, 1, 0, 200), 4, 2, headdim, causal=True)


GPU_OPTIONS = {
    "none": dict(),
    "causal": dict(causal=True),
    "window": dict(window=(40, 7)),
    "softcap": dict(softcap=3.0, scale=0.3),
    "alibi-batch-causal": dict(alibi="batch", causal=True),
    "all": dict(alibi="heads", softcap=5.0, window=(30, 2)),
    "deterministic": dict(deterministic=True, window=(None, 9)),
}


@pytest.mark.gpu
@pytest.mark.parametrize("options", GPU_OPTIONS.values(), ids=GPU_OPTIONS.keys())
@pytest.mark.parametrize("dtype", [F16, BF16, F32], ids=["fp16", "bf16", "fp32"])
def test_gpu_options(dtype, options):
    check_gpu(dtype, LENS_Q, LENS_K, 4, 2, 40 if dtype == F32 else 64, **options)


@pytest.mark.gpu
@pytest.mark.parametrize("ratio", [1, 4, 8])
def test_gpu_gqa(ratio):
    check_gpu(BF16, (150, 1, 77), (150, 33, 300), 8, 8 // ratio, 128, causal=ratio == 4)


@pytest.mark.gpu
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "det"])
@pytest.mark.parametrize("dtype", [BF16, F32], ids=["bf16", "fp32"])
def test_gpu_many_sequences(dtype, deterministic):
    """60 sequences of 0 to 70 tokens: the scratch rows of every sequence, early exits."""
    rng = np.random.default_rng(60)
    lens_q = tuple(int(x) for x in rng.integers(0, 71, 60))
    lens_k = tuple(int(x) for x in rng.integers(0, 71, 60))
    check_gpu(dtype, lens_q, lens_k, 2, 1, 64, deterministic=deterministic, causal=True)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_gpu_long_sequences(causal):
    check_gpu(F16, (1025, 3, 300), (1025, 700, 1), 2, 1, 128, causal=causal)


def _is_varlen_instantiation(filename, name):
    from cuflash import ops
    if filename == ops.backward.FILE and name.startswith("cuflash::bwd_main"):
        return int(name.rsplit(", ", 1)[1][:-1]) & ops.backward.VARLEN != 0
    return name.endswith(", true>")


@pytest.mark.gpu
def test_gpu_runs_the_varlen_instantiations(launched):
    """Every kernel launch of a varlen call is a VARLEN instantiation of the kernel the dense
    call would run (flash_fwd_sm90 on sm_90), and each call ends with the device check of
    its prefix sums (CuPy cu_seqlens are not read on the host)."""
    import cupy
    from cuflash import ops
    from gpu import device_arch
    rng = np.random.default_rng(0)
    q, k, v, cu_q, cu_k = (cupy.asarray(x) for x in pack(rng, BF16, headdim=128))
    out, lse = cuflash.attention_varlen_forward(q, k, v, cu_q, cu_k, 33, 40)
    check = (ops.varlen_check.FILE, ops.varlen_check.KERNEL)
    if device_arch() == "sm_90":  # 40 keys at most: the short-key tile
        want = (ops.forward.SM90_FILE,
                ops.forward.sm90_config(BF16, 128, 0, True, 40).name_expression)
    else:
        want = (ops.forward.FILE,
                "cuflash::flash_fwd<__nv_bfloat16, 128, 128, 32, 4, false, true>")
    assert launched == [want, check]
    launched.clear()
    cuflash.attention_varlen_backward(out, q, k, v, out, lse, cu_q, cu_k, 33, 40)
    assert launched[-1] == check
    assert all(_is_varlen_instantiation(*x) for x in launched[:-1]), launched
    # Host-checked (NumPy) prefix sums need no device check.
    launched.clear()
    cuflash.attention_varlen_forward(q, k, v, cu_q.get(), cu_k.get(), 33, 40)
    assert launched == [want]


@pytest.mark.gpu
@pytest.mark.parametrize("headdim", [32, 96])
def test_gpu_equal_lengths_match_dense_kernels_bitwise(headdim):
    """A batch of equal lengths, packed: the varlen instantiations do the dense kernels'
    arithmetic, so out, lse and the deterministic gradients are bitwise equal. (Head dims
    32 and 96: padded into 64 and 128 on the Hopper backward, mma.sync elsewhere; either way
    the dense and varlen backwards run one kernel with one order of dQ adds, and the
    forwards one kernel too.)"""
    import cupy
    rng = np.random.default_rng(headdim)
    batch, seqlen, h, hkv = 3, 130, 4, 2
    q4, k4, v4, do4 = (cupy.asarray(rng.standard_normal((batch, seqlen, n, headdim)).astype(BF16))
                       for n in (h, hkv, hkv, h))
    q, k, v, dout = (x.reshape(batch * seqlen, *x.shape[2:]) for x in (q4, k4, v4, do4))
    cu = cupy.arange(0, (batch + 1) * seqlen, seqlen, dtype=cupy.int32)
    opts = dict(causal=True, softcap=4.0)
    out4, lse4 = cuflash.attention_forward(q4, k4, v4, **opts)
    out, lse = cuflash.attention_varlen_forward(q, k, v, cu, cu, seqlen, seqlen, **opts)
    assert np.array_equal(out.get().view(np.uint16), out4.reshape(out.shape).get().view(np.uint16))
    np.testing.assert_array_equal(lse.get(), lse4.get().transpose(1, 0, 2).reshape(h, -1))
    want = cuflash.attention_backward(do4, q4, k4, v4, out4, lse4, deterministic=True, **opts)
    got = cuflash.attention_varlen_backward(dout, q, k, v, out, lse, cu, cu, seqlen, seqlen,
                                            deterministic=True, **opts)
    for g, w in zip(got, want):
        assert np.array_equal(g.get().view(np.uint16), w.reshape(g.shape).get().view(np.uint16))


@pytest.mark.gpu
def test_gpu_deterministic_is_bitwise_reproducible():
    import cupy
    rng = np.random.default_rng(3)
    q, k, v, cu_q, cu_k = (cupy.asarray(x) for x in pack(rng, BF16, headdim=64))
    dout = cupy.asarray(rng.standard_normal(q.shape).astype(BF16))
    out, lse = cuflash.attention_varlen_forward(q, k, v, cu_q, cu_k, 33, 40, causal=True)
    first = cuflash.attention_varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, 33, 40,
                                              causal=True, deterministic=True)
    for _ in range(3):
        again = cuflash.attention_varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, 33, 40,
                                                  causal=True, deterministic=True)
        for a, b in zip(first, again):
            assert np.array_equal(a.get().view(np.uint16), b.get().view(np.uint16))


@pytest.mark.gpu
def test_gpu_checks_the_prefix_sums():
    """NumPy prefix sums with GPU arrays: checked on the host (ValueError), then copied to
    the device, giving the CuPy prefix sums' results. Strided CuPy prefix sums are taken."""
    import cupy
    q, k, v, cu_q, cu_k = (cupy.asarray(x) for x in pack(np.random.default_rng(0), BF16))
    want, want_lse = cuflash.attention_varlen_forward(q, k, v, cu_q, cu_k, 33, 40)
    out, lse = cuflash.attention_varlen_forward(q, k, v, cu_q.get(), cu_k, 33, 40)
    assert np.array_equal(out.get().view(np.uint16), want.get().view(np.uint16))
    np.testing.assert_array_equal(lse.get(), want_lse.get())
    bad = cu_q.get()
    bad[2] = bad[3] + 1
    with pytest.raises(ValueError, match=r"cu_seqlens_q must be non-decreasing"):
        cuflash.attention_varlen_forward(q, k, v, bad, cu_k, 33, 40)
    with pytest.raises(ValueError, match=r"max_seqlen_k \(39\) is smaller"):
        cuflash.attention_varlen_forward(q, k, v, cu_q, cu_k.get(), 33, 39)
    with pytest.raises(TypeError, match=r"cu_seqlens_q is a cupy array but q is a numpy"):
        cuflash.attention_varlen_forward(q.get(), k.get(), v.get(), cu_q, cu_k.get(), 33, 40)
    wide = cupy.zeros(2 * cu_k.size, cupy.int32)
    wide[::2] = cu_k
    out, _ = cuflash.attention_varlen_forward(q, k, v, cu_q, wide[::2], 33, 40)
    assert np.array_equal(out.get().view(np.uint16), want.get().view(np.uint16))


# --------------------------------------------------------------------------- GPU: Hopper
# flash_fwd_sm90's VARLEN instantiations (head dims 64 and 128, fp16/bf16 on sm_90): rows
# past a sequence's end are the next sequence's (TMA reads the packed arrays), so the
# masking of keys past seqlen_k and the stores of rows past seqlen_q are what these test.

def _require_hopper():
    from gpu import device_arch
    if device_arch() != "sm_90":
        pytest.skip("flash_fwd_sm90 runs on compute capability 9.0 only")


def check_gpu_forward(dtype, lens_q, lens_k, nheads, nheads_kv, headdim, alibi=None,
                      seed=None, **options):
    """The forward alone on the GPU (CuPy prefix sums) against the dense reference per
    sequence; asserts that it allocates only out and lse. Returns (out, lse, inputs)."""
    import cupy
    if seed is None:
        seed = int(np.random.SeedSequence().entropy % 2**32)
    rng = np.random.default_rng(seed)
    dtype = np.dtype(dtype)
    q, k, v, cu_q, cu_k = pack(rng, dtype, lens_q, lens_k, nheads, nheads_kv, headdim)
    if alibi == "batch":
        options["alibi_slopes"] = rng.uniform(0.01, 0.5, (len(lens_q), nheads)).astype(F32)
    elif alibi == "heads":
        options["alibi_slopes"] = rng.uniform(0.01, 0.5, nheads).astype(F32)
    where = (f"seed {seed}, {dtype}, lens_q {lens_q} lens_k {lens_k} h{nheads}/{nheads_kv} "
             f"d{headdim} alibi={alibi} {options}")
    g = [cupy.asarray(x) for x in (q, k, v, cu_q, cu_k)]
    gopts = {n: cupy.asarray(x) if isinstance(x, np.ndarray) else x for n, x in options.items()}
    pool = cupy.get_default_memory_pool()
    used_before = pool.used_bytes()
    (out, lse), sizes = poisoned(cuflash.attention_varlen_forward, *g, max(lens_q),
                                 max(lens_k), **gopts)
    assert sorted(sizes) == sorted([out.nbytes, lse.nbytes]), (
        f"forward allocated {sizes}, expected only out and lse ({where})")
    grown = pool.used_bytes() - used_before
    assert grown < out.nbytes + lse.nbytes + 2 * 512, f"pool grew by {grown} bytes ({where})"
    check_forward(out, lse, *g[:3], cu_q, cu_k, where, **gopts)
    return out, lse, (g, gopts)


# Lengths 0, 1, 17, 97, 1025 (a query block and a key block past 1024) in both orders, and
# sequences with more queries than keys and the reverse.
HOPPER_LENS = [
    ((0, 1, 17, 97, 1025, 5), (3, 1, 40, 97, 1025, 0)),
    ((1025, 97, 17, 1, 0, 300), (1, 200, 17, 1025, 4, 129)),
]
HOPPER_OPTIONS = {
    "none": dict(),
    "causal": dict(causal=True),
    "window": dict(window=(50, 9)),
    "window-left": dict(window=(100, None), causal=False),
    "softcap-causal": dict(softcap=4.0, causal=True),
    "alibi-batch": dict(alibi="batch", window=(None, 30)),
}


@pytest.mark.gpu
@pytest.mark.parametrize("options", HOPPER_OPTIONS.values(), ids=HOPPER_OPTIONS.keys())
@pytest.mark.parametrize("lens", HOPPER_LENS, ids=["lens0", "lens1"])
@pytest.mark.parametrize("dtype, headdim, group", [(BF16, 128, 1), (F16, 64, 4),
                                                   (BF16, 64, 2), (F16, 128, 8)],
                         ids=["bf16-128", "fp16-64-gqa4", "bf16-64-gqa2", "fp16-128-mqa"])
def test_gpu_hopper_forward(dtype, headdim, group, lens, options):
    _require_hopper()
    check_gpu_forward(dtype, *lens, 8, 8 // group, headdim, **options)


@pytest.mark.gpu
@pytest.mark.parametrize("headdim", [64, 128])
def test_gpu_hopper_skewed_lengths(headdim):
    """One long sequence among many short ones: most tiles (query blocks of the longest
    sequence x items) lie past their item's end and are skipped by the producer, in runs.
    Run twice (the tile counter must come back to zero), then a dense call on the same
    counter."""
    _require_hopper()
    import cupy
    rng = np.random.default_rng(7)
    lens_q = (5, 1500) + tuple(int(x) for x in rng.integers(0, 140, 40))
    lens_k = (700, 1500) + tuple(int(x) for x in rng.integers(0, 300, 40))
    out, lse, (g, gopts) = check_gpu_forward(BF16, lens_q, lens_k, 4, 2, headdim,
                                             causal=True)
    again = cuflash.attention_varlen_forward(*g, max(lens_q), max(lens_k), causal=True)
    assert np.array_equal(again[0].get().view(np.uint16), out.get().view(np.uint16))
    np.testing.assert_array_equal(again[1].get(), lse.get())
    q4 = cupy.asarray(rng.standard_normal((2, 600, 4, headdim)).astype(BF16))
    k4 = cupy.asarray(rng.standard_normal((2, 700, 2, headdim)).astype(BF16))
    dense, _ = cuflash.attention_forward(q4, k4, k4, causal=True)
    ref, _ = cuflash.attention_varlen_forward(q4.reshape(1200, 4, headdim),
                                              k4.reshape(1400, 2, headdim),
                                              k4.reshape(1400, 2, headdim),
                                              cupy.asarray([0, 600, 1200], cupy.int32),
                                              cupy.asarray([0, 700, 1400], cupy.int32),
                                              600, 700, causal=True)
    assert np.array_equal(dense.reshape(ref.shape).get().view(np.uint16),
                          ref.get().view(np.uint16))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [F16, BF16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("headdim", [64, 128])
@pytest.mark.parametrize("opts", [dict(), dict(causal=True), dict(window=(77, 5)),
                                  dict(softcap=3.0, causal=True)],
                         ids=["full", "causal", "window", "softcap-causal"])
def test_gpu_hopper_varlen_equals_dense_per_sequence(launched, dtype, headdim, opts):
    """flash_fwd_sm90's varlen instantiation does the dense one's arithmetic per sequence:
    out and lse of each sequence are bitwise those of a dense call on that sequence alone
    (key counts under 2048 throughout, so both pick the same key-block size)."""
    _require_hopper()
    import cupy
    from cuflash import ops
    rng = np.random.default_rng(headdim)
    lens_q, lens_k = (300, 1, 129, 0, 640), (250, 1000, 129, 7, 640)
    q, k, v, cu_q, cu_k = (cupy.asarray(x) for x in pack(rng, dtype, lens_q, lens_k, 4, 2,
                                                         headdim))
    out, lse = cuflash.attention_varlen_forward(q, k, v, cu_q, cu_k, max(lens_q),
                                                max(lens_k), **opts)
    cq, ck = cu_q.get(), cu_k.get()
    for b in range(len(lens_q)):
        rq, rk = slice(cq[b], cq[b + 1]), slice(ck[b], ck[b + 1])
        if lens_q[b] == 0 or lens_k[b] == 0:
            continue
        want, want_lse = cuflash.attention_forward(q[None, rq], k[None, rk], v[None, rk],
                                                   **opts)
        assert np.array_equal(out[rq].get().view(np.uint16), want[0].get().view(np.uint16)), b
        np.testing.assert_array_equal(lse[:, rq].get(), want_lse[0].get())
    assert {f for f, _ in launched} == {ops.forward.SM90_FILE, ops.varlen_check.FILE}


# --------------------------------------------------------------------------- GPU: invalid
# CuPy prefix sums are not read on the host: whatever they hold, the kernels stay inside
# the arrays (SeqView clamps) and varlen_check turns every output of the call into NaN.

def _invalid_prefix_sums(cu_q, cu_k, case):
    cu_q, cu_k = cu_q.copy(), cu_k.copy()
    if case == "non-monotone":
        cu_q[2], cu_q[3] = cu_q[3], cu_q[2] - 1
    elif case == "wrong-last":
        cu_k[-1] -= 1
    elif case == "first-not-zero":
        cu_q[0] = 1
    elif case == "negative":
        cu_k[1:3] = -5
    elif case == "past-the-end":
        cu_q[1:-1] = 2**31 - 1
    elif case == "too-long":  # valid prefix sums, but a sequence longer than max_seqlen_q
        pass
    return cu_q, cu_k


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["non-monotone", "wrong-last", "first-not-zero", "negative",
                                  "past-the-end", "too-long"])
@pytest.mark.parametrize("dtype, headdim", [(BF16, 128), (F16, 64), (BF16, 32), (F32, 40)],
                         ids=["bf16-128", "fp16-64", "bf16-32", "fp32-40"])
def test_gpu_invalid_prefix_sums_give_nan(dtype, headdim, case):
    import cupy
    rng = np.random.default_rng(11)
    lens_q, lens_k = (40, 300, 0, 7, 129), (64, 2, 50, 7, 200)
    q, k, v, cu_q, cu_k = pack(rng, dtype, lens_q, lens_k, 4, 2, headdim)
    bad_q, bad_k = _invalid_prefix_sums(cu_q, cu_k, case)
    max_q = 299 if case == "too-long" else max(lens_q)
    g = [cupy.asarray(x) for x in (q, k, v, bad_q, bad_k)]
    out, lse = cuflash.attention_varlen_forward(*g, max_q, max(lens_k), causal=True)
    dout = cupy.asarray(rng.standard_normal(q.shape).astype(dtype))
    grads = cuflash.attention_varlen_backward(dout, g[0], g[1], g[2], out, lse, g[3], g[4],
                                              max_q, max(lens_k), causal=True)
    cupy.cuda.Device().synchronize()  # an out-of-bounds access would raise here
    for name, x in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, *grads)):
        assert np.isnan(x.get().astype(F32)).all(), (case, name)
    # Valid prefix sums on the same arrays afterwards: the GPU is fine, the results finite.
    out, lse = cuflash.attention_varlen_forward(*g[:3], cupy.asarray(cu_q),
                                                cupy.asarray(cu_k), max(lens_q), max(lens_k))
    assert np.isfinite(out.get().astype(F32)).all()


@pytest.mark.gpu
def test_gpu_invalid_prefix_sums_empty_problem():
    """No keys at all (total_k 0) with prefix sums that claim some: NaN, not zeros."""
    import cupy
    q = cupy.asarray(np.ones((6, 2, 64), BF16))
    k = cupy.asarray(np.ones((0, 2, 64), BF16))
    cu_q = cupy.asarray([0, 3, 6], cupy.int32)
    bad_k = cupy.asarray([0, 4, 0], cupy.int32)
    out, lse = cuflash.attention_varlen_forward(q, k, k, cu_q, bad_k, 3, 4)
    assert np.isnan(out.get().astype(F32)).all() and np.isnan(lse.get()).all()
    out, lse = cuflash.attention_varlen_forward(q, k, k, cu_q, cupy.zeros(3, cupy.int32), 3, 4)
    assert (out.get().astype(F32) == 0).all() and np.isneginf(lse.get()).all()


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["max_seqlen_q=0", "max_seqlen_k=0", "batch=0"])
def test_gpu_invalid_prefix_sums_that_leave_no_grid(case):
    """Device prefix sums with rows to spare but a zero bound or no sequences: the kernels
    would get an empty grid (a CUDA error); the call returns NaN outputs instead."""
    import cupy
    rng = np.random.default_rng(3)
    q = cupy.asarray(rng.standard_normal((6, 2, 64)).astype(BF16))
    cu, max_q, max_k = cupy.asarray([0, 3, 6], cupy.int32), 3, 3
    if case == "max_seqlen_q=0":
        max_q = 0
    elif case == "max_seqlen_k=0":
        max_k = 0
    else:
        cu = cupy.zeros(1, cupy.int32)
    out, lse = cuflash.attention_varlen_forward(q, q, q, cu, cu, max_q, max_k)
    grads = cuflash.attention_varlen_backward(q, q, q, q, out, lse, cu, cu, max_q, max_k)
    for name, x in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, *grads)):
        assert np.isnan(x.get().astype(F32)).all(), name


def test_int64_numpy_prefix_sums_are_taken_as_int32():
    rng = np.random.default_rng(5)
    cu = np.array([0, 3, 3, 11], np.int64)
    q, k = rng.standard_normal((11, 2, 32)), rng.standard_normal((11, 1, 32))
    got = cuflash.attention_varlen(q, k, k, cu, cu, 8, 8, causal=True)
    want = cuflash.attention_varlen(q, k, k, cu.astype(np.int32), cu.astype(np.int32), 8, 8,
                                    causal=True)
    assert np.array_equal(got, want)


@pytest.mark.gpu
@pytest.mark.parametrize("headdim", [64, 128, 192, 256])
def test_gpu_hopper_staged_o_with_more_tiles_than_sms(headdim):
    """Staged O in varlen, stored by 16-byte stores: head dims 64 and 128 in the Q tile;
    192 and 256 in V's stages, the producer holding each tile's first V load until the last
    staged O has left. Items of 0, 1, 127, 128, 129 and 700 rows, some with more queries
    than keys, whose first rows see no key under the causal mask (the last item's first
    three query blocks none: key-less tiles between the others), with 24 heads so that
    every CTA walks several tiles."""
    check_gpu_forward(BF16, (0, 1, 127, 128, 129, 700), (3, 1, 100, 128, 300, 300), 24, 8,
                      headdim, causal=True)


@pytest.mark.gpu
@pytest.mark.parametrize("headdim", [64, 128])
def test_gpu_hopper_keyless_items_between_others(headdim):
    """Items without keys between items with them (six of 300 queries, every second with 0
    keys), causal, 24 heads: a persistent grid's CTAs meet key-less tiles between tiles
    with keys, whose O is staged in the Q tile."""
    check_gpu_forward(BF16, (300,) * 6, (300, 0, 300, 0, 300, 0), 24, 8, headdim, causal=True)


@pytest.mark.gpu
@pytest.mark.parametrize("headdim", [96, 128])
def test_gpu_hopper_key_blocks_of_160(launched, headdim):
    """Head dims 96 and 128 run key blocks of 160 on sm_90 where the longest item has
    SM90_SHORT_KEYS keys or more: causal with GQA, items of 3, 1, 159, 160, 161 and 2100 keys
    (13 blocks and 20 keys), the first without queries; then without a mask (below)."""
    _require_hopper()
    check_gpu(F16, (0, 1, 159, 160, 161, 2100), (3, 1, 159, 160, 161, 2100), 8, 2, headdim,
              causal=True)
    # Without a mask: an item with no key between others, items with more queries than
    # keys (2100 / 2048, 300 / 161), last key blocks of 128, 99 and 1 keys (K and V rows
    # past an item's end are the next item's, masked).
    check_gpu(BF16, (2100, 5, 7, 300), (2048, 0, 4099, 161), 8, 8, headdim)
    forward = [n for _, n in launched if "flash_fwd_sm90" in n]
    assert forward and all(", 128, 160, 2, 0, true>" in n for n in forward), launched


@pytest.mark.gpu
def test_gpu_hopper_192_row_blocks_with_more_tiles_than_sms():
    """Head dim 64 runs 192-row query blocks on sm_90 (three consumers, the longest item
    having SM90_SHORT_KEYS keys or more): items of 0, 1, 191, 192 and 193 rows around that
    size, causal, with 48 heads so that the persistent grid's CTAs walk several tiles and
    skip those past each item's end."""
    check_gpu(BF16, (0, 1, 191, 192, 193, 700), (5, 1, 191, 300, 193, 2100), 48, 8, 64,
              causal=True)
