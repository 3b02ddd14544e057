"""Preallocated outputs (``out=``, ``lse=``, ``dq=``, ``dk=``, ``dv=``) of every public function.

NumPy style: a given output must have exactly the shape and dtype the function would return,
be an array of the inputs' kind (and device), have a contiguous last axis (``lse``: C-contiguous)
and overlap no input; the function writes the result into it and returns that very object.

Every test runs on the CPU backend (NumPy) and, with the marker ``gpu``, on CuPy arrays. The
given buffers are filled with NaN and may be views of larger NaN-filled arrays (padded heads,
a transposed layout, an lse at an offset): the result must equal, bit for bit, the call that
allocates its outputs (so every element was written), and nothing of the larger array outside
the view may change. Backward calls compared bit for bit run ``deterministic=True``; the GPU's
atomic backward is compared within a few units in the last place.
"""
import ml_dtypes
import numpy as np
import pytest

import cuflash
from gpu import assert_near, assert_same_bits, bits, host, import_cupy

BF16 = np.dtype(ml_dtypes.bfloat16)
F16 = np.dtype(np.float16)
F32 = np.dtype(np.float32)

BACKENDS = [pytest.param("numpy", id="numpy"),
            pytest.param("cupy", id="cupy", marks=pytest.mark.gpu)]
DTYPES = [pytest.param(F32, id="fp32"), pytest.param(BF16, id="bf16")]
LAYOUTS = ["contiguous", "padded", "transposed"]


# ------------------------------------------------------------------------------- helpers


class Backend:
    """NumPy or CuPy: where inputs and buffers go."""

    def __init__(self, name):
        self.name = name
        self.xp = np if name == "numpy" else import_cupy()

    def put(self, x):
        """A host array as an array of this backend (a copy for CuPy)."""
        if x is None or isinstance(x, int) or self.name == "numpy":
            return x
        return self.xp.asarray(x)

    def copy(self, x):
        """A fresh copy of a host array (None stays None)."""
        return None if x is None else self.put(x.copy())


def _view(layout):
    """(base shape from the output's shape, base -> view of the output's shape)."""
    if layout == "contiguous":
        return (lambda s: s), (lambda b: b)
    if layout == "padded":  # two spare heads around the output's: strided rows
        return (lambda s: s[:-2] + (s[-2] + 2, s[-1])), (lambda b: b[..., 1:-1, :])
    if layout == "transposed":  # stored (..., nheads, seqlen, headdim), handed over transposed
        return (lambda s: s[:-3] + (s[-2], s[-3], s[-1])), (lambda b: b.swapaxes(-3, -2))
    if layout == "offset":  # C-contiguous, but not at the start of its allocation
        return (lambda s: (2,) + s), (lambda b: b[1])
    raise ValueError(layout)


class Buffer:
    """A NaN-filled output of ``shape`` and ``dtype`` in ``layout``, a view of a larger
    NaN-filled array when the layout calls for one."""

    def __init__(self, be, shape, dtype, layout="contiguous", fill=np.nan):
        base_shape, view = _view(layout)
        base_shape = base_shape(tuple(shape))
        self.base = be.put(np.full(base_shape, fill, dtype))
        self.array = view(self.base)
        assert tuple(self.array.shape) == tuple(shape)
        inside = np.zeros(base_shape, bool)
        view(inside)[...] = True
        self.outside = ~inside
        self.before = bits(self.base)

    def assert_untouched_outside(self, name):
        after = bits(self.base)
        changed = (after != self.before) & self.outside
        assert not changed.any(), (f"{name}: {changed.sum()} elements outside the given view "
                                   f"were written")


def refused_on_gpu(backend, layout, given):
    """Varlen calls with CuPy prefix sums (checked on the device, which fills the outputs of
    a call with invalid ones with NaN, byte range by byte range) take only C-contiguous
    ``out`` / ``dq`` / ``dk`` / ``dv``: True where ``given`` holds one of another layout."""
    return backend == "cupy" and layout != "contiguous" and given != "lse"


def lse_layout(layout):
    """lse must be C-contiguous: the strided layouts give it an offset view instead."""
    return "contiguous" if layout == "contiguous" else "offset"


def check_given(results, expected, given: dict):
    """``results`` and ``expected`` are dicts name -> array; ``given`` name -> Buffer. Every
    given buffer is returned as that very object, every result equals the allocating call
    bit for bit, and no given buffer was written outside its view."""
    for name, buf in given.items():
        assert results[name] is buf.array, f"{name}: the result is not the given array"
    for name, want in expected.items():
        assert_same_bits(name, results[name], want)
    for name, buf in given.items():
        buf.assert_untouched_outside(name)


def normal(rng, shape, dtype):
    return rng.standard_normal(shape).astype(dtype)


# Dense problems: seqlen_q != seqlen_k, grouped-query, causal (bottom-right), a head dim that
# runs the Hopper kernels on sm_90.
Q_SHAPE, K_SHAPE = (2, 37, 4, 64), (2, 50, 2, 64)
OPTS = dict(causal=True, softcap=0.0)


def dense(rng, be, dtype):
    q, k, v, dout = (normal(rng, s, dtype) for s in (Q_SHAPE, K_SHAPE, K_SHAPE, Q_SHAPE))
    return tuple(be.put(x) for x in (q, k, v, dout))


# Varlen: empty sequences on either side, one of length 1.
LENS_Q, LENS_K = (5, 0, 23, 11, 1), (7, 3, 0, 30, 1)
NHEADS, NHEADS_KV, HEADDIM = 4, 2, 64


def cu_seqlens(lengths):
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)


def packed(rng, be, dtype, lens_q=LENS_Q, lens_k=LENS_K):
    """q, k, v, dout, cu_q, cu_k, max_q, max_k; the prefix sums as arrays of the backend."""
    tq, tk = sum(lens_q), sum(lens_k)
    q, dout = (normal(rng, (tq, NHEADS, HEADDIM), dtype) for _ in range(2))
    k, v = (normal(rng, (tk, NHEADS_KV, HEADDIM), dtype) for _ in range(2))
    return (*(be.put(x) for x in (q, k, v, dout)), be.put(cu_seqlens(lens_q)),
            be.put(cu_seqlens(lens_k)), max(lens_q), max(lens_k))


# ------------------------------------------------------------------------------- dense


@pytest.mark.parametrize("given", ["out", "lse", "out+lse"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_forward(rng, backend, dtype, layout, given):
    be = Backend(backend)
    q, k, v, _ = dense(rng, be, dtype)
    out, lse = cuflash.attention_forward(q, k, v, **OPTS)
    bufs = {}
    if "out" in given:
        bufs["out"] = Buffer(be, q.shape, dtype, layout)
    if "lse" in given:
        bufs["lse"] = Buffer(be, lse.shape, F32, lse_layout(layout))
    got = cuflash.attention_forward(q, k, v, **OPTS, **{n: b.array for n, b in bufs.items()})
    assert isinstance(got, tuple) and len(got) == 2
    check_given(dict(out=got[0], lse=got[1]), dict(out=out, lse=lse), bufs)


@pytest.mark.parametrize("return_lse", [False, True], ids=["out", "out+lse"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_attention(rng, backend, dtype, return_lse):
    be = Backend(backend)
    q, k, v, _ = dense(rng, be, dtype)
    out, lse = cuflash.attention_forward(q, k, v, **OPTS)
    bufs = dict(out=Buffer(be, q.shape, dtype, "padded"))
    if return_lse:
        bufs["lse"] = Buffer(be, lse.shape, F32)
        got = cuflash.attention(q, k, v, **OPTS, out=bufs["out"].array, lse=bufs["lse"].array,
                                return_lse=True)
        results = dict(out=got[0], lse=got[1])
    else:
        results = dict(out=cuflash.attention(q, k, v, **OPTS, out=bufs["out"].array))
    check_given(results, dict(out=out, lse=lse) if return_lse else dict(out=out), bufs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_fills_lse_without_return_lse(rng, backend):
    """lse= without return_lse: only out is returned, and the given lse is filled."""
    be = Backend(backend)
    q, k, v, _ = dense(rng, be, BF16)
    out, lse = cuflash.attention_forward(q, k, v, **OPTS)
    buf = Buffer(be, lse.shape, F32)
    got = cuflash.attention(q, k, v, **OPTS, lse=buf.array)
    assert not isinstance(got, tuple)
    assert_same_bits("out", got, out)
    assert_same_bits("lse", buf.array, lse)


@pytest.mark.parametrize("given", ["dq+dk+dv", "dq", "dk+dv"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_backward(rng, backend, dtype, layout, given):
    be = Backend(backend)
    q, k, v, dout = dense(rng, be, dtype)
    out, lse = cuflash.attention_forward(q, k, v, **OPTS)
    want = cuflash.attention_backward(dout, q, k, v, out, lse, **OPTS, deterministic=True)
    like = dict(dq=q, dk=k, dv=v)
    bufs = {n: Buffer(be, like[n].shape, dtype, layout) for n in given.split("+")}
    got = cuflash.attention_backward(dout, q, k, v, out, lse, **OPTS, deterministic=True,
                                     **{n: b.array for n, b in bufs.items()})
    assert isinstance(got, tuple) and len(got) == 3
    check_given(dict(zip(("dq", "dk", "dv"), got)), dict(zip(("dq", "dk", "dv"), want)), bufs)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("headdim", [64, 128, 96])
def test_gpu_atomic_backward(rng, layout, headdim):
    """The default (atomic) backward into given NaN-filled buffers: dq, dk, dv fully
    written, equal to the allocating call up to the order of float32 additions."""
    be = Backend("cupy")
    q, k, v, dout = (be.put(normal(rng, s[:3] + (headdim,), BF16))
                     for s in (Q_SHAPE, K_SHAPE, K_SHAPE, Q_SHAPE))
    out, lse = cuflash.attention_forward(q, k, v, **OPTS)
    want = cuflash.attention_backward(dout, q, k, v, out, lse, **OPTS)
    bufs = {n: Buffer(be, x.shape, BF16, layout) for n, x in (("dq", q), ("dk", k), ("dv", v))}
    got = cuflash.attention_backward(dout, q, k, v, out, lse, **OPTS,
                                     **{n: b.array for n, b in bufs.items()})
    for (name, buf), g, w in zip(bufs.items(), got, want):
        assert g is buf.array, f"{name}: the result is not the given array"
        assert_near(name, g, w)
        buf.assert_untouched_outside(name)


# ------------------------------------------------------------------------------- varlen


@pytest.mark.parametrize("given", ["out", "lse", "out+lse"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_forward(rng, backend, dtype, layout, given):
    be = Backend(backend)
    q, k, v, _, cu_q, cu_k, max_q, max_k = packed(rng, be, dtype)
    args = (q, k, v, cu_q, cu_k, max_q, max_k)
    out, lse = cuflash.attention_varlen_forward(*args, **OPTS)
    assert lse.shape == (NHEADS, sum(LENS_Q))
    bufs = {}
    if "out" in given:
        bufs["out"] = Buffer(be, q.shape, dtype, layout)
    if "lse" in given:
        bufs["lse"] = Buffer(be, lse.shape, F32, lse_layout(layout))
    if refused_on_gpu(backend, layout, given):
        with pytest.raises(ValueError, match="out must be C-contiguous"):
            cuflash.attention_varlen_forward(*args, **OPTS,
                                             **{n: b.array for n, b in bufs.items()})
        return
    got = cuflash.attention_varlen_forward(*args, **OPTS,
                                           **{n: b.array for n, b in bufs.items()})
    check_given(dict(out=got[0], lse=got[1]), dict(out=out, lse=lse), bufs)


@pytest.mark.parametrize("return_lse", [False, True], ids=["out", "out+lse"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_attention(rng, backend, return_lse):
    be = Backend(backend)
    q, k, v, _, cu_q, cu_k, max_q, max_k = packed(rng, be, BF16)
    args = (q, k, v, cu_q, cu_k, max_q, max_k)
    out, lse = cuflash.attention_varlen_forward(*args, **OPTS)
    layout = "contiguous" if backend == "cupy" else "transposed"  # refused_on_gpu
    bufs = dict(out=Buffer(be, q.shape, BF16, layout), lse=Buffer(be, lse.shape, F32))
    got = cuflash.attention_varlen(*args, **OPTS, out=bufs["out"].array,
                                   lse=bufs["lse"].array, return_lse=return_lse)
    if return_lse:
        results = dict(out=got[0], lse=got[1])
    else:
        assert not isinstance(got, tuple)
        results = dict(out=got, lse=bufs["lse"].array)  # lse= is filled all the same
    check_given(results, dict(out=out, lse=lse), bufs)


@pytest.mark.parametrize("given", ["dq+dk+dv", "dq", "dk+dv"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_backward(rng, backend, dtype, layout, given):
    be = Backend(backend)
    q, k, v, dout, cu_q, cu_k, max_q, max_k = packed(rng, be, dtype)
    seqs = (cu_q, cu_k, max_q, max_k)
    out, lse = cuflash.attention_varlen_forward(q, k, v, *seqs, **OPTS)
    want = cuflash.attention_varlen_backward(dout, q, k, v, out, lse, *seqs, **OPTS,
                                             deterministic=True)
    like = dict(dq=q, dk=k, dv=v)
    bufs = {n: Buffer(be, like[n].shape, dtype, layout) for n in given.split("+")}
    if refused_on_gpu(backend, layout, given):
        with pytest.raises(ValueError, match="must be C-contiguous"):
            cuflash.attention_varlen_backward(dout, q, k, v, out, lse, *seqs, **OPTS,
                                              deterministic=True,
                                              **{n: b.array for n, b in bufs.items()})
        return
    got = cuflash.attention_varlen_backward(dout, q, k, v, out, lse, *seqs, **OPTS,
                                            deterministic=True,
                                            **{n: b.array for n, b in bufs.items()})
    check_given(dict(zip(("dq", "dk", "dv"), got)), dict(zip(("dq", "dk", "dv"), want)), bufs)


@pytest.mark.gpu
def test_gpu_invalid_device_prefix_sums_fill_the_given_outputs_with_nan(rng):
    """The device check of CuPy prefix sums writes its NaN into the given buffers."""
    be = Backend("cupy")
    q, k, v, dout, cu_q, cu_k, max_q, max_k = packed(rng, be, BF16)
    bad_q = cu_q.copy()
    bad_q[2] = bad_q[3] + 1  # decreasing
    # Zeros first, so that NaN is the check's doing.
    bufs = dict(out=Buffer(be, q.shape, BF16, fill=0),
                lse=Buffer(be, (NHEADS, q.shape[0]), F32, fill=0))
    out, lse = cuflash.attention_varlen_forward(q, k, v, bad_q, cu_k, max_q, max_k, **OPTS,
                                                out=bufs["out"].array, lse=bufs["lse"].array)
    assert out is bufs["out"].array and lse is bufs["lse"].array
    grads = {n: Buffer(be, x.shape, BF16, fill=0) for n, x in (("dq", q), ("dk", k), ("dv", v))}
    got = cuflash.attention_varlen_backward(dout, q, k, v, out, lse, bad_q, cu_k, max_q, max_k,
                                            **OPTS, **{n: b.array for n, b in grads.items()})
    for (name, buf), g in zip(grads.items(), got):
        assert g is buf.array, name
    for name, x in (("out", out), ("lse", lse), *zip(grads, got)):
        assert np.isnan(host(x).astype(F32)).all(), f"{name} is not all NaN"


# ------------------------------------------------------------------------------- kvcache


class Cache:
    """A decoding problem with append: q (batch, 2, ...), 2 new keys, lengths (0, 17, 70),
    contiguous or paged (pages of 16, shuffled, two spare pages). Host arrays; ``args``
    gives fresh backend copies (the call writes into the caches)."""

    def __init__(self, rng, dtype, paged, lengths=(0, 17, 70), capacity=96, seqlen_new=2):
        batch = len(lengths)
        self.q = normal(rng, (batch, seqlen_new, NHEADS, HEADDIM), dtype)
        if paged:
            pages = capacity // 16
            num_blocks = batch * pages + 2
            self.block_table = rng.permutation(num_blocks)[:batch * pages].reshape(
                batch, pages).astype(np.int32)
            cache_shape = (num_blocks, 16, NHEADS_KV, HEADDIM)
        else:
            self.block_table = None
            cache_shape = (batch, capacity, NHEADS_KV, HEADDIM)
        self.k_cache, self.v_cache = (normal(rng, cache_shape, dtype) for _ in range(2))
        self.k, self.v = (normal(rng, (batch, seqlen_new, NHEADS_KV, HEADDIM), dtype)
                          for _ in range(2))
        self.cache_seqlens = np.asarray(lengths, np.int32)

    def args(self, be):
        return dict(q=be.copy(self.q), k_cache=be.copy(self.k_cache),
                    v_cache=be.copy(self.v_cache), k=be.copy(self.k), v=be.copy(self.v),
                    cache_seqlens=be.copy(self.cache_seqlens),
                    block_table=be.copy(self.block_table))


@pytest.mark.parametrize("given", ["out", "out+lse", "lse-only"])
@pytest.mark.parametrize("num_splits", [None, 3], ids=["splits-default", "splits-3"])
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_kvcache(rng, backend, dtype, paged, num_splits, given):
    """out= (with return_lse False or True) and lse= with return_lse=False, which returns
    out alone and fills lse. The append writes the same caches either way."""
    be = Backend(backend)
    problem = Cache(rng, dtype, paged)
    opts = dict(causal=True, num_splits=num_splits)
    first = problem.args(be)
    out, lse = cuflash.attention_with_kvcache(**first, **opts, return_lse=True)
    second = problem.args(be)
    bufs = {}
    if given != "lse-only":
        bufs["out"] = Buffer(be, out.shape, dtype, "padded")
    if given != "out":
        bufs["lse"] = Buffer(be, lse.shape, F32, "offset")
    given_arrays = {n: b.array for n, b in bufs.items()}
    if given == "out+lse":
        got = cuflash.attention_with_kvcache(**second, **opts, **given_arrays, return_lse=True)
        results = dict(out=got[0], lse=got[1])
    else:
        got = cuflash.attention_with_kvcache(**second, **opts, **given_arrays)
        assert not isinstance(got, tuple)
        results = dict(out=got, lse=bufs["lse"].array if "lse" in bufs else lse)
    check_given(results, dict(out=out, lse=lse), bufs)
    for name in ("k_cache", "v_cache"):
        assert_same_bits(name, second[name], first[name])


# ------------------------------------------------------------------------------- merge


def merge_parts(rng, be, dtype, num_parts=3, shape=(2, 5, 4, 64)):
    """Stacked parts (num_parts, batch, seqlen_q, nheads, headdim) and their lses, some rows
    -inf in one part and one row -inf in every part."""
    batch, seqlen_q, nheads, _ = shape
    outs = normal(rng, (num_parts,) + shape, dtype)
    lses = (rng.standard_normal((num_parts, batch, nheads, seqlen_q)) * 3).astype(np.float32)
    lses[1, 0, :, :2] = -np.inf
    lses[:, 1, 2, 3] = -np.inf
    return be.put(outs), be.put(lses)


@pytest.mark.parametrize("given", ["out", "lse", "out+lse"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("stacked", [False, True], ids=["list", "stacked"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_merge(rng, backend, dtype, stacked, layout, given):
    be = Backend(backend)
    outs, lses = merge_parts(rng, be, dtype)
    if not stacked:
        outs, lses = list(outs), list(lses)
    out, lse = cuflash.merge_attention(outs, lses)
    bufs = {}
    if "out" in given:
        bufs["out"] = Buffer(be, out.shape, dtype, layout)
    if "lse" in given:
        bufs["lse"] = Buffer(be, lse.shape, F32, lse_layout(layout))
    got = cuflash.merge_attention(outs, lses, **{n: b.array for n, b in bufs.items()})
    check_given(dict(out=got[0], lse=got[1]), dict(out=out, lse=lse), bufs)


# ------------------------------------------------------------------------------- empty


@pytest.mark.parametrize("backend", BACKENDS)
def test_nothing_to_compute_still_fills_the_given_outputs(rng, backend):
    """Calls that take the early exit (no keys) write zeros / -inf into the given buffers."""
    be = Backend(backend)
    q = be.put(normal(rng, (2, 5, 4, 64), BF16))
    k = be.put(normal(rng, (2, 0, 2, 64), BF16))
    o, l = Buffer(be, q.shape, BF16, "padded").array, Buffer(be, (2, 4, 5), F32).array
    out, lse = cuflash.attention_forward(q, k, k, out=o, lse=l)
    assert out is o and lse is l
    assert (host(out).astype(F32) == 0).all() and np.isneginf(host(lse)).all()

    dq, dk, dv = (Buffer(be, x.shape, BF16).array for x in (q, k, k))
    got = cuflash.attention_backward(q, q, k, k, out, lse, dq=dq, dk=dk, dv=dv)
    assert got[0] is dq and got[1] is dk and got[2] is dv
    assert (host(dq).astype(F32) == 0).all()

    cu_q, cu_k = be.put(cu_seqlens([3, 2])), be.put(cu_seqlens([0, 0]))
    vq = be.put(normal(rng, (5, 4, 64), BF16))
    vk = be.put(normal(rng, (0, 2, 64), BF16))
    o, l = Buffer(be, vq.shape, BF16).array, Buffer(be, (4, 5), F32).array
    out, lse = cuflash.attention_varlen_forward(vq, vk, vk, cu_q, cu_k, 3, 0, out=o, lse=l)
    assert out is o and lse is l
    assert (host(out).astype(F32) == 0).all() and np.isneginf(host(lse)).all()
    dq = Buffer(be, vq.shape, BF16).array
    got = cuflash.attention_varlen_backward(vq, vq, vk, vk, out, lse, cu_q, cu_k, 3, 0, dq=dq)
    assert got[0] is dq and (host(dq).astype(F32) == 0).all()

    cache = be.put(np.zeros((2, 0, 2, 64), BF16))
    o, l = Buffer(be, q.shape, BF16).array, Buffer(be, (2, 4, 5), F32).array
    out, lse = cuflash.attention_with_kvcache(q, cache, cache, cache_seqlens=0, out=o, lse=l,
                                              return_lse=True)
    assert out is o and lse is l
    assert (host(out).astype(F32) == 0).all() and np.isneginf(host(lse)).all()


# ------------------------------------------------------------------------------- bad outputs


def _calls(rng, be):
    """name -> (call(**outputs), {output name: (shape, dtype, an input it could alias)},
    state to check after a refused call). Inputs bf16; lse calls ask for the lse."""
    q, k, v, dout = dense(rng, be, BF16)
    out, lse = cuflash.attention_forward(q, k, v, **OPTS)
    vq, vk, vv, vdout, cu_q, cu_k, max_q, max_k = packed(rng, be, BF16)
    seqs = (cu_q, cu_k, max_q, max_k)
    vout, vlse = cuflash.attention_varlen_forward(vq, vk, vv, *seqs, **OPTS)
    cache = Cache(rng, BF16, paged=True)
    cache_args = cache.args(be)
    parts, part_lses = merge_parts(rng, be, BF16)
    f32 = np.float32
    return {
        "forward": (lambda **o: cuflash.attention_forward(q, k, v, **OPTS, **o),
                    dict(out=(q.shape, BF16, q), lse=(lse.shape, f32, None))),
        "attention": (lambda **o: cuflash.attention(q, k, v, **OPTS, return_lse=True, **o),
                      dict(out=(q.shape, BF16, q), lse=(lse.shape, f32, None))),
        "backward": (lambda **o: cuflash.attention_backward(dout, q, k, v, out, lse, **OPTS, **o),
                     dict(dq=(q.shape, BF16, dout), dk=(k.shape, BF16, k),
                          dv=(v.shape, BF16, v))),
        "varlen_forward": (
            lambda **o: cuflash.attention_varlen_forward(vq, vk, vv, *seqs, **OPTS, **o),
            dict(out=(vq.shape, BF16, vq), lse=(vlse.shape, f32, None))),
        "varlen": (
            lambda **o: cuflash.attention_varlen(vq, vk, vv, *seqs, **OPTS, return_lse=True, **o),
            dict(out=(vq.shape, BF16, vq), lse=(vlse.shape, f32, None))),
        "varlen_backward": (
            lambda **o: cuflash.attention_varlen_backward(vdout, vq, vk, vv, vout, vlse, *seqs,
                                                          **OPTS, **o),
            dict(dq=(vq.shape, BF16, vout), dk=(vk.shape, BF16, vk), dv=(vv.shape, BF16, vv))),
        "kvcache": (
            lambda **o: cuflash.attention_with_kvcache(**cache_args, causal=True,
                                                       return_lse=True, **o),
            dict(out=(cache.q.shape, BF16, cache_args["q"]),
                 lse=((3, NHEADS, cache.q.shape[1]), f32, None)),
            (cache, cache_args)),
        "merge": (lambda **o: cuflash.merge_attention(parts, part_lses, **o),
                  dict(out=(parts.shape[1:], BF16, parts[0]),
                       lse=(part_lses.shape[1:], f32, part_lses[0]))),
    }


FUNCTIONS = {"forward": ("out", "lse"), "attention": ("out", "lse"),
             "backward": ("dq", "dk", "dv"), "varlen_forward": ("out", "lse"),
             "varlen": ("out", "lse"), "varlen_backward": ("dq", "dk", "dv"),
             "kvcache": ("out", "lse"), "merge": ("out", "lse")}
BAD = ["shape", "dtype", "last-axis", "not-c-contiguous", "input", "kind"]
CASES = [(f, n, bad) for f, names in FUNCTIONS.items() for n in names for bad in BAD
         if (bad != "not-c-contiguous" or n == "lse")
         and (bad != "input" or n != "lse" or f == "merge")]


def _bad_buffer(be, bad, shape, dtype, alias):
    """A wrong output buffer and the exception types that may refuse it."""
    shape = tuple(shape)
    if bad == "shape":
        return be.put(np.zeros((shape[0] + 1,) + shape[1:], dtype)), ValueError
    if bad == "dtype":  # same item size, other type: a check of sizes alone passes it
        wrong = {BF16: F16, np.dtype(np.float32): np.dtype(np.int32)}[np.dtype(dtype)]
        return be.put(np.zeros(shape, wrong)), TypeError
    if bad == "last-axis":
        base = be.put(np.zeros(shape[:-1] + (2 * shape[-1],), dtype))
        return base[..., ::2], ValueError
    if bad == "not-c-contiguous":  # last axis contiguous, rows padded
        base = be.put(np.zeros(shape[:-1] + (shape[-1] + 3,), dtype))
        return base[..., :shape[-1]], ValueError
    if bad == "input":
        return alias, ValueError
    if bad == "kind":  # NumPy for CuPy inputs; a nested list for NumPy inputs
        x = np.zeros(shape, dtype)
        return (x if be.name == "cupy" else x.tolist()), (TypeError, ValueError)
    raise ValueError(bad)


@pytest.mark.parametrize("function, name, bad", CASES,
                         ids=[f"{f}-{n}-{b}" for f, n, b in CASES])
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_output_is_refused_naming_it(rng, backend, function, name, bad):
    be = Backend(backend)
    call, specs, *state = _calls(rng, be)[function]
    shape, dtype, alias = specs[name]
    buf, error = _bad_buffer(be, bad, shape, dtype, alias)
    before = None if alias is None else bits(alias)
    with pytest.raises(error, match=rf"\b{name}\b") as refused:
        call(**{name: buf})
    assert "unexpected keyword" not in str(refused.value)
    if alias is not None:
        assert np.array_equal(bits(alias), before), "an input was written by a refused call"
    if state:  # the append must not have happened: checked before writing
        cache, args = state[0]
        for n in ("k_cache", "v_cache"):
            assert np.array_equal(bits(args[n]), bits(getattr(cache, n))), (
                f"{n} was written by a refused call")


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_overlapping_q_is_refused(rng, backend):
    """q and out views of one array whose heads overlap (not the same array)."""
    be = Backend(backend)
    base = be.put(normal(rng, (2, 37, 6, 64), BF16))
    q = base[:, :, :4]
    k, v = (be.put(normal(rng, K_SHAPE, BF16)) for _ in range(2))
    with pytest.raises(ValueError, match=r"\bout\b"):
        cuflash.attention_forward(q, k, v, out=base[:, :, 2:6])
    dout = be.put(normal(rng, Q_SHAPE, BF16))
    out, lse = cuflash.attention_forward(q, k, v)
    with pytest.raises(ValueError, match=r"\bdq\b"):
        cuflash.attention_backward(dout, q, k, v, out, lse, dq=base[:, :, 1:5])


@pytest.mark.parametrize("backend", BACKENDS)
def test_disjoint_views_of_one_array_are_accepted(rng, backend):
    """Inputs and outputs may share an allocation as long as their memory is disjoint."""
    be = Backend(backend)
    q, k, v, _ = dense(rng, be, BF16)
    want, want_lse = cuflash.attention_forward(q, k, v, **OPTS)
    both = be.put(np.stack([host(q), np.full(Q_SHAPE, np.nan, BF16)]))
    q_view, out_view = both[0], both[1]
    out, lse = cuflash.attention_forward(q_view, k, v, **OPTS, out=out_view)
    assert out is out_view
    assert_same_bits("out", out, want)
    assert_same_bits("lse", lse, want_lse)
    assert_same_bits("q", q_view, q)


# ------------------------------------------------------------------------------- repeated calls


@pytest.mark.parametrize("backend", BACKENDS)
def test_repeated_calls_use_each_calls_arrays(rng, backend):
    """Calls of one layout one after the other (what a cache of validated calls would reuse):
    each writes into its own buffers, new values are read, an aliasing out is refused even
    right after a valid call of the same layout, and a call without out= allocates."""
    be = Backend(backend)
    shape_q, shape_k = (1, 19, 4, 64), (1, 23, 2, 64)  # a layout of this test's own
    q1, q2 = (be.put(normal(rng, shape_q, BF16)) for _ in range(2))
    k, v = (be.put(normal(rng, shape_k, BF16)) for _ in range(2))
    want1 = cuflash.attention_forward(q1, k, v, causal=True)
    want2 = cuflash.attention_forward(q2, k, v, causal=True)
    a, b = (Buffer(be, shape_q, BF16).array for _ in range(2))
    la, lb = (Buffer(be, want1[1].shape, F32).array for _ in range(2))

    r1 = cuflash.attention_forward(q1, k, v, causal=True, out=a, lse=la)
    r2 = cuflash.attention_forward(q2, k, v, causal=True, out=b, lse=lb)
    assert r1[0] is a and r1[1] is la and r2[0] is b and r2[1] is lb
    assert_same_bits("out (first call)", a, want1[0])
    assert_same_bits("out (second call)", b, want2[0])
    assert_same_bits("lse (second call)", lb, want2[1])
    r3 = cuflash.attention_forward(q1, k, v, causal=True)
    assert r3[0] is not a and r3[0] is not b and r3[1] is not la and r3[1] is not lb
    assert_same_bits("out (allocating call)", r3[0], want1[0])
    assert_same_bits("out (first call, untouched by later calls)", a, want1[0])
    r4 = cuflash.attention_forward(q2, k, v, causal=True, out=a, lse=la)
    assert r4[0] is a and r4[1] is la
    assert_same_bits("out (reused buffer)", a, want2[0])
    with pytest.raises(ValueError, match=r"\bout\b"):
        cuflash.attention_forward(q1, k, v, causal=True, out=q1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_repeated_kvcache_calls_read_new_lengths(rng, backend):
    """Decoding calls of one layout with new cache lengths (an int, then arrays): each
    result is the allocating call's for its own lengths."""
    be = Backend(backend)
    problem = Cache(rng, BF16, paged=False, lengths=(40, 40, 40), capacity=80, seqlen_new=1)
    base = problem.args(be)
    del base["k"], base["v"], base["cache_seqlens"]  # no append: the caches stay as they are
    bufs = [Buffer(be, problem.q.shape, BF16).array for _ in range(4)]
    for i, lengths in enumerate([5, 60, np.array([1, 70, 33], np.int32),
                                 np.array([70, 2, 16], np.int32)]):
        seqlens = lengths if isinstance(lengths, int) else be.put(lengths)
        want = cuflash.attention_with_kvcache(**base, cache_seqlens=seqlens)
        got = cuflash.attention_with_kvcache(**base, cache_seqlens=seqlens, out=bufs[i])
        assert got is bufs[i]
        assert_same_bits(f"out with cache_seqlens {lengths}", got, want)
    assert not np.array_equal(bits(bufs[0]), bits(bufs[1]))
    assert not np.array_equal(bits(bufs[2]), bits(bufs[3]))
