"""The JAX binding of cuflash's attention: the callbacks, custom_vjp rules and public
functions that :mod:`cuflash.jax` exports (its docstring says how they work)."""
from __future__ import annotations

import ctypes
import functools
import math
import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import cuflash
from cuflash import _core, ops

from . import _ffi

from jax.custom_derivatives import CustomVJPPrimal, SymbolicZero

# See cuflash.jax's docstring: one launch over the folded vmapped axes.
VMAP_METHOD = "broadcast_all"

# Extra head-dim columns of the backward that also takes an lse cotangent (a multiple of 8).
_LSE_PAD = 8
_MAX_HEADDIM = 256


# ---------------------------------------------------------------------------------------
# Static options (hashable: they key the callbacks, the custom_vjp rules and jit's cache).

class _Options(NamedTuple):
    scale: float | None
    causal: bool
    window: tuple
    softcap: float
    deterministic: bool
    layout: str


def _options(scale, causal, window, softcap, deterministic=False, layout="bshd") -> _Options:
    for name, value in (("scale", scale), ("softcap", softcap)):
        if not (value is None and name == "scale" or
                isinstance(value, (int, float, np.integer, np.floating))):
            raise TypeError(f"{name} must be a Python number (static, not a traced value: "
                            f"make it a static argument of jax.jit), got "
                            f"{type(value).__name__}")
    if not isinstance(window, (tuple, list)) or len(window) != 2:
        raise ValueError(f"window must be a pair (left, right), got {window!r}")
    window = tuple(None if w is None else int(w) for w in window)
    for name, flag in (("causal", causal), ("deterministic", deterministic)):
        if not isinstance(flag, (bool, np.bool_)):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    return _Options(None if scale is None else float(scale), bool(causal), window,
                    float(softcap), bool(deterministic), layout)


def _forward_kwargs(o: _Options) -> dict:
    return dict(scale=o.scale, causal=o.causal, window=o.window, softcap=o.softcap)


# ---------------------------------------------------------------------------------------
# XLA's buffers as NumPy (CPU) or CuPy (GPU) arrays.

_STREAMS = {}


def _external_stream(ptr: int, buffers):
    """XLA's stream as a CuPy stream object, and its CUDA device (kept: XLA uses a few
    streams, for ever). A stream belongs to one device: the driver's record of a buffer's
    address names it once (exact even where XLA's device numbering and CUDA's differ).
    Where every buffer is empty there is nothing to compute: the current device serves
    that call, and nothing is kept."""
    found = _STREAMS.get(ptr)
    if found is None:
        import cupy
        known = _device_of(buffers)
        device = cupy.cuda.runtime.getDevice() if known is None else known
        with warnings.catch_warnings():  # CuPy 14 deprecates it for Stream.from_external,
            warnings.simplefilter("ignore", DeprecationWarning)  # which CuPy 13 lacks
            found = (cupy.cuda.ExternalStream(ptr, device), device)
        if known is not None:
            _STREAMS[ptr] = found
    return found


def _device_of(buffers) -> int | None:
    """The CUDA device of XLA's buffers, from the driver's record of the first non-empty
    one; None when all are empty."""
    import cupy
    for buf in buffers:
        if buf.ptr and math.prod(buf.shape):
            return cupy.cuda.runtime.pointerGetAttributes(buf.ptr).device
    return None


def _numpy(buf: _ffi.Buffer) -> np.ndarray:
    """A NumPy array over an XLA host buffer: the same memory, owned by XLA."""
    nbytes = math.prod(buf.shape) * buf.dtype.itemsize
    if not nbytes:
        return np.empty(buf.shape, buf.dtype)
    memory = (ctypes.c_char * nbytes).from_address(buf.ptr)
    return np.frombuffer(memory, buf.dtype).reshape(buf.shape)


def _cupy_view(buf: _ffi.Buffer, device: int):
    """A CuPy array over an XLA device buffer: the same memory, owned by XLA."""
    import cupy
    nbytes = math.prod(buf.shape) * buf.dtype.itemsize
    if not nbytes:
        return cupy.ndarray(buf.shape, buf.dtype)  # nothing to point at, nothing allocated
    memory = cupy.cuda.UnownedMemory(buf.ptr, nbytes, None, device)
    return cupy.ndarray(buf.shape, buf.dtype, cupy.cuda.MemoryPointer(memory, 0))


@functools.lru_cache(maxsize=None)
def _callback(body, static, present):
    """The callback (see cuflash.jax._ffi) that runs ``body(static, outs, *ins)`` on XLA's
    buffers; ``present``: which inputs were given (the others reach ``body`` as None).

    Cached, so that one ``(body, static, present)`` is one slot: the custom call's
    attribute names it, and eager calls reuse their compiled executable only when it is
    equal.

    On the GPU, where ``body`` has a fast path (``_FAST``), the first call of each shapes
    and device also builds it from the CuPy views (cuflash's checks have then passed, and
    its memoized launch exists); later calls go from the buffers' addresses straight to
    that launch, without CuPy arrays or the public function's checks, which depend on
    nothing that changes between calls of one compiled program but the addresses."""
    build, fast_paths = _FAST.get(body), {}

    def callback(stream, rets, args):
        # The fast path's key: the stream (which names the device) and every buffer's dtype
        # and shape. The inputs' alone would not do: the backward's workspace is empty
        # where an eager call's platform_dependent chose the CPU branch on a GPU's buffers.
        outputs, out_signature = _ffi.describe(rets)
        inputs, in_signature = _ffi.describe(args)
        key = (stream, out_signature, in_signature)
        fast = fast_paths.get(key)
        if fast is not None and fast(*outputs, *inputs):
            return
        outs, given = _ffi.buffers(rets), _ffi.buffers(args)
        pending = iter(given)
        ins = [next(pending) if p else None for p in present]
        if stream is None:
            body(static, tuple(_numpy(b) for b in outs),
                 *(None if b is None else _numpy(b) for b in ins))
            return
        import cupy
        cupy_stream, device = _external_stream(stream, outs + given)
        with cupy.cuda.Device(device), cupy_stream:
            views = (tuple(_cupy_view(b, device) for b in outs),
                     *(None if b is None else _cupy_view(b, device) for b in ins))
            body(static, *views)
            if build is not None and key not in fast_paths:
                fast_paths[key] = _bind(build(static, *views), cupy_stream, device, present)
    callback.__name__ = callback.__qualname__ = f"cuflash_{body.__name__.strip('_')}"
    return callback


def _bind(fast, stream, device: int, present):
    """``fast(stream, *outs, *ins)`` (None: no fast path) as a function of the addresses of
    the outputs and of the given inputs alone (0 for the others), False where the current
    device is not the stream's (the full path then switches to it)."""
    if fast is None:
        return lambda *_: False
    import cupy
    missing = len(present) - sum(present)
    if any(present[len(present) - missing:]):
        raise AssertionError("fast paths take their optional inputs last")
    get_device, zeros = cupy.cuda.runtime.getDevice, (0,) * missing
    return lambda *ptrs: get_device() == device and fast(stream, *ptrs, *zeros)


def _call(body, static, results, *args, aliases=None):
    """Stage ``body`` on ``args`` (arrays or None); ``results``: (shape, dtype) pairs;
    ``aliases``: {input index: output index}, inputs counted with the None ones."""
    present = tuple(a is not None for a in args)
    index = {i: n for n, i in enumerate(i for i, p in enumerate(present) if p)}
    shapes = tuple(jax.ShapeDtypeStruct(s, d) for s, d in results)
    outs = _ffi.call(_callback(body, static, present), shapes,
                     [a for a in args if a is not None], vmap_method=VMAP_METHOD,
                     aliases=aliases and {index[i]: o for i, o in aliases.items()})
    return _vary_like(outs, args)


def _vma(x) -> frozenset:
    """The mesh axes over which ``x`` varies under ``jax.shard_map``: its type's
    ``manual_axis_type.varying`` (recent JAX) or ``vma`` (earlier); empty outside
    shard_map, with ``check_vma=False``, or on a JAX without the notion."""
    typeof = getattr(jax, "typeof", None)
    if typeof is None:
        return frozenset()
    aval = typeof(x)
    manual = getattr(aval, "manual_axis_type", None)
    if manual is not None:
        return frozenset(getattr(manual, "varying", ()))
    return frozenset(getattr(aval, "vma", ()))


def _vary_like(outs, args):
    """``jax.ffi.ffi_call`` types its results from the given shapes alone, so under
    ``jax.shard_map`` (``check_vma=True``) they would be invariant across the mesh even when
    the inputs vary (a per-device shard in, a per-device result out), and a ``custom_vjp``
    backward returning them is rejected ("the manual axis types do not match"). Mark them
    varying over every axis an input varies over."""
    axes = frozenset().union(*(_vma(a) for a in args if a is not None))
    if not axes:
        return outs
    cast = getattr(jax.lax, "pcast", None)

    def vary(x):
        missing = tuple(sorted(axes - _vma(x), key=str))
        if not missing:
            return x
        if cast is not None:
            return cast(x, missing, to="varying")
        pvary = getattr(jax.lax, "pvary", None)
        return x if pvary is None else pvary(x, missing)
    return type(outs)(vary(x) for x in outs) if isinstance(outs, (list, tuple)) else vary(outs)


# ---------------------------------------------------------------------------------------
# Callback bodies: cuflash's public functions on NumPy or CuPy arrays, which may carry
# leading vmapped axes (every input the same ones: VMAP_METHOD is "broadcast_all").

def _fold(x, ndim):
    """``x`` with its leading vmapped axes merged into its batch axis (a view)."""
    if x is None or x.ndim == ndim:
        return x
    return x.reshape((-1,) + x.shape[x.ndim - ndim + 1:])


def _fold_slopes(slopes, lead, batch):
    """ALiBi slopes (*lead, nheads) or (*lead, batch, nheads) as (prod(lead) * batch,
    nheads); per-head slopes under vmap are broadcast over the batch (a small copy)."""
    if slopes is None or not lead:
        return slopes
    if slopes.ndim == len(lead) + 1:
        xp = np if isinstance(slopes, np.ndarray) else _cupy()
        slopes = xp.ascontiguousarray(
            xp.broadcast_to(slopes[..., None, :], lead + (batch, slopes.shape[-1])))
    return slopes.reshape(-1, slopes.shape[-1])


def _cupy():
    import cupy
    return cupy


def _dense_forward_body(o: _Options, outs, q, k, v, slopes):
    out, lse = outs
    lead = q.shape[:q.ndim - 4]
    slopes = _fold_slopes(slopes, lead, q.shape[len(lead)])
    q, k, v, out = (_fold(x, 4) for x in (q, k, v, out))
    cuflash.attention_forward(q, k, v, **_forward_kwargs(o), alibi_slopes=slopes,
                              out=out, lse=_fold(lse, 3), layout=o.layout)


def _dense_backward_body(o: _Options, grads, dout, q, k, v, out, lse, slopes):
    lead = q.shape[:q.ndim - 4]
    slopes = _fold_slopes(slopes, lead, q.shape[len(lead)])
    dq, dk, dv = (_fold(x, 4) for x in grads[:3])  # then the fast path's workspace
    dout, q, k, v, out = (_fold(x, 4) for x in (dout, q, k, v, out))
    cuflash.attention_backward(dout, q, k, v, out, _fold(lse, 3), **_forward_kwargs(o),
                               alibi_slopes=slopes, deterministic=o.deterministic,
                               dq=dq, dk=dk, dv=dv, layout=o.layout)


def _bshd(x, layout):
    """A (batch, seqlen, heads, headdim) view of an array in ``layout``."""
    return x if layout == "bshd" else x.transpose(0, 2, 1, 3)


def _dense_forward_fast(o: _Options, outs, q, k, v, slopes):
    """The fast path of _dense_forward_body (see _callback): ``fast(stream, out, lse, q, k,
    v, slopes)`` on addresses, True once queued, False where the full path must run (rows
    not on 16 bytes, or the Hopper kernel's maps refused). None where there is none."""
    out, lse = outs
    if q.ndim > 4 and slopes is not None or 0 in q.shape + k.shape:
        return None
    q, k, v, out = (_bshd(_fold(x, 4), o.layout) for x in (q, k, v, out))
    p = ops.dense_problem(q, k, v, **_forward_kwargs(o), alibi_slopes=slopes)
    launch = ops.forward.Launch(p, out.strides, _fold(lse, 3).shape)
    if launch.copies:
        return None

    def fast(stream, out, lse, q, k, v, slopes):
        return not (q | k | v | out) & 15 and launch.plan(stream.ptr, q, k, v, slopes, 0, 0,
                                                          out, lse)
    return fast


def _dense_backward_fast(o: _Options, grads, dout, q, k, v, out, lse, slopes):
    """The fast path of _dense_backward_body, as :func:`_dense_forward_fast`:
    ``fast(stream, dq, dk, dv, workspace, dout, q, k, v, out, lse, slopes)``, its scratch
    the workspace XLA allocated (None where that is too small)."""
    *grads, workspace = grads
    if q.ndim > 4 and slopes is not None or 0 in q.shape + k.shape:
        return None
    dq, dk, dv, dout, q, k, v, out = (_bshd(_fold(x, 4), o.layout)
                                      for x in (*grads, dout, q, k, v, out))
    lse = _fold(lse, 3)
    p = ops.dense_problem(q, k, v, **_forward_kwargs(o), alibi_slopes=slopes)
    launch = ops.backward.Launch(p, (out.strides, dout.strides, lse.strides, dq.strides,
                                     dk.strides, dv.strides), o.deterministic)
    if launch.copies or launch.plan.scratch_bytes > workspace.nbytes:
        return None
    plan = launch.plan

    def fast(stream, dq, dk, dv, scratch, dout, q, k, v, out, lse, slopes):
        if (dq | dk | dv | scratch | dout | q | k | v | out) & 15:
            return False
        plan(stream.ptr, scratch, q, k, v, slopes, 0, 0, out, dout, lse, dq, dk, dv)
        return True
    return fast


_FAST = {_dense_forward_body: _dense_forward_fast, _dense_backward_body: _dense_backward_fast}


def _items(x, ndim):
    """The indices of the leading vmapped axes of ``x`` (``ndim``: its own rank)."""
    return np.ndindex(*x.shape[:x.ndim - ndim])


def _at(x, i):
    return None if x is None else x[i]


def _varlen_forward_body(static, outs, q, k, v, cu_q, cu_k, slopes):
    o, max_q, max_k = static
    out, lse = outs
    for i in _items(q, 3):
        cuflash.attention_varlen_forward(
            q[i], k[i], v[i], cu_q[i], cu_k[i], max_q, max_k, **_forward_kwargs(o),
            alibi_slopes=_at(slopes, i), out=out[i], lse=lse[i])


def _varlen_backward_body(static, grads, dout, q, k, v, out, lse, cu_q, cu_k, slopes):
    o, max_q, max_k = static
    dq, dk, dv = grads
    for i in _items(q, 3):
        cuflash.attention_varlen_backward(
            dout[i], q[i], k[i], v[i], out[i], lse[i], cu_q[i], cu_k[i], max_q, max_k,
            **_forward_kwargs(o), alibi_slopes=_at(slopes, i),
            deterministic=o.deterministic, dq=dq[i], dk=dk[i], dv=dv[i])


def _kvcache_body(static, outs, k_cache, v_cache, q, k, v, cache_seqlens, block_table, slopes):
    o, num_splits, static_seqlens = static
    if k is not None:  # the caches' results alias their inputs: they hold the old contents
        k_cache, v_cache, out, lse = outs
    else:
        out, lse = outs
    for i in _items(q, 4):
        seqlens = static_seqlens if cache_seqlens is None else cache_seqlens[i]
        cuflash.attention_with_kvcache(
            q[i], k_cache[i], v_cache[i], k=_at(k, i), v=_at(v, i), cache_seqlens=seqlens,
            block_table=_at(block_table, i), num_splits=num_splits, **_forward_kwargs(o),
            alibi_slopes=_at(slopes, i), out=out[i], lse=lse[i])


def _merge_body(static, results, outs, lses):
    out, lse = results
    for i in _items(outs, 5):
        cuflash.merge_attention(outs[i], lses[i], out=out[i], lse=lse[i])


# ---------------------------------------------------------------------------------------
# Argument checks at trace time (shapes the results depend on); cuflash checks the rest
# when the callback runs, and its message comes back in the JaxRuntimeError.

def _array(x, name):
    if x is None:
        return None
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{name} must be an array, got {type(x).__name__}")
    return jnp.asarray(x)


def _check_rank(x, name, ndim, what):
    if x.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions {what}, got shape {x.shape}")


def _check_same_dtype(first, name, **others):
    for other_name, x in others.items():
        if x is not None and x.dtype != first.dtype:
            raise TypeError(f"{other_name} has dtype {x.dtype} but {name} has dtype "
                            f"{first.dtype}; they must share one dtype")


def _slopes(alibi_slopes):
    if alibi_slopes is not None and getattr(alibi_slopes, "dtype", None) != np.float32:
        raise TypeError(f"alibi_slopes must be a float32 array, got "
                        f"{getattr(alibi_slopes, 'dtype', type(alibi_slopes).__name__)}")
    return _array(alibi_slopes, "alibi_slopes")


def _int32(x, name):
    x = _array(x, name)
    if x is not None and x.dtype != jnp.int32:
        raise TypeError(f"{name} must be int32, got {x.dtype}")
    return x


def _unwrap(args):
    """The values of a symbolic-zeros forward rule's ``CustomVJPPrimal`` arguments."""
    return jax.tree.map(lambda p: p.value, args,
                        is_leaf=lambda p: isinstance(p, CustomVJPPrimal))


def _zero(ct):
    return isinstance(ct, SymbolicZero) or ct is None


def _instantiate(ct, like):
    return jnp.zeros(like.shape, like.dtype) if _zero(ct) else ct


# ---------------------------------------------------------------------------------------
# Dense attention.

def _bshd_shape(shape, layout):
    """(batch, seqlen, heads, headdim) of an array of ``shape`` in ``layout``."""
    return tuple(shape) if layout == "bshd" else (shape[0], shape[2], shape[1], shape[3])


def _lse_shape(q, layout):
    batch, a, b, _ = q.shape
    return (batch, b, a) if layout == "bshd" else (batch, a, b)


def _dense_forward(o, q, k, v, slopes):
    return _call(_dense_forward_body, o, [(q.shape, q.dtype),
                                          (_lse_shape(q, o.layout), jnp.float32)],
                 q, k, v, slopes)


def _dense_backward(o, dout, q, k, v, out, lse, slopes):
    """dq, dk, dv. On the GPU the call also asks XLA for the backward's scratch (a
    workspace result, sized for any GPU's kernels), which its fast path runs in: no
    allocation per call, and the memory is XLA's, ordered on its stream."""
    batch, seqlen_q, nheads, headdim = _bshd_shape(q.shape, o.layout)
    grads = [(x.shape, x.dtype) for x in (q, k, v)]

    def backward(workspace_bytes):
        return lambda *args: _call(_dense_backward_body, o,
                                   grads + [((workspace_bytes,), jnp.uint8)], *args)[:3]
    return jax.lax.platform_dependent(
        dout, q, k, v, out, lse, slopes, cpu=backward(0),
        default=backward(ops.backward.dense_scratch_bytes(batch, nheads, seqlen_q, headdim,
                                                          o.deterministic)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _dense(o, q, k, v, slopes):
    out, lse = _dense_forward(o, q, k, v, slopes)
    return out, lse


def _dense_fwd(o, q, k, v, slopes):
    q, k, v, slopes = _unwrap((q, k, v, slopes))
    out, lse = _dense_forward(o, q, k, v, slopes)
    return (out, lse), (q, k, v, slopes, out, lse)


def _dense_bwd(o, residuals, cts):
    q, k, v, slopes, out, lse = residuals
    dout, dlse = cts
    dout = _instantiate(dout, out)
    if _zero(dlse):
        dq, dk, dv = _dense_backward(o, dout, q, k, v, out, lse, slopes)
    else:
        lse_rows = (jnp.swapaxes(dlse, 1, 2) if o.layout == "bshd" else dlse)[..., None]
        dq, dk, dv = _augmented_backward(
            lambda o2, *a: _dense_backward(o2, *a, slopes), o, dout, lse_rows, q, k, v, out,
            lse)
    return dq, dk, dv, None


_dense.defvjp(_dense_fwd, _dense_bwd, symbolic_zeros=True)


def _augmented_backward(backward, o, dout, dlse_rows, q, k, v, out, lse):
    """The backward with an lse cotangent: ``dS = P * (dP - D + dlse)`` (``d lse_i /
    d s_ij = P_ij``) where cuflash's backward computes ``P * (dP - D)`` with
    ``D = rowsum(dout * out)``. Appending a head-dim column of ones to ``v`` and of
    ``dlse`` to ``dout`` adds ``dlse_i`` to every ``dP_ij``; a column of zeros in ``out``
    leaves ``D`` as it was, and zeros in ``q``, ``k`` leave the scores. The columns are
    padded to a multiple of 8 (head dims up to 248), at the price of one copy of every
    operand; it runs only when the loss uses ``lse``. ``dlse_rows``: the cotangent laid out
    like ``out`` with a last axis of 1."""
    headdim = q.shape[-1]
    if headdim + _LSE_PAD > _MAX_HEADDIM:
        raise NotImplementedError(
            f"the gradient through lse needs head dim + {_LSE_PAD} <= {_MAX_HEADDIM}, got "
            f"head dim {headdim}: use lse only outside the differentiated loss")

    def pad(x, column=None):
        widths = [(0, 0)] * (x.ndim - 1) + [(0, _LSE_PAD - (column is not None))]
        if column is None:
            return jnp.pad(x, widths)
        return jnp.pad(jnp.concatenate([x, column.astype(x.dtype)], axis=-1), widths)

    ones = jnp.ones(v.shape[:-1] + (1,), v.dtype)
    scale = o.scale if o.scale is not None else headdim ** -0.5
    grads = backward(o._replace(scale=scale), pad(dout, dlse_rows), pad(q), pad(k),
                     pad(v, ones), pad(out), lse)
    return tuple(g[..., :headdim] for g in grads)


def attention(q, k, v, *, scale=None, causal=False, window=(None, None), softcap=0.0,
              alibi_slopes=None, deterministic=False, return_lse=False, layout="bshd"):
    """Exact attention of JAX arrays, usable under ``jax.jit``, ``jax.grad`` and
    ``jax.vmap``: :func:`cuflash.attention` with the same arguments and conventions.

    Parameters
    ----------
    q : array (batch, seqlen_q, nheads, headdim)
    k, v : arrays (batch, seqlen_k, nheads_kv, headdim), ``nheads % nheads_kv == 0``
        float16, bfloat16 or float32 (float64 too on the CPU, with ``jax_enable_x64``).
    scale, causal, window, softcap : static options of :func:`cuflash.attention`
    alibi_slopes : float32 array (nheads,) or (batch, nheads), optional
        No gradient flows to it.
    deterministic : bool, default False
        Bitwise reproducible gradients (the backward's option).
    return_lse : bool, default False
        Also return the float32 log-sum-exp (batch, nheads, seqlen_q). Gradients flow
        through it too.
    layout : {'bshd', 'bhsd'}, default 'bshd'
        As in :func:`cuflash.attention`; 'bhsd' runs on XLA's buffers as they are.

    Returns
    -------
    out : array like ``q``, or ``(out, lse)``

    Examples
    --------
    >>> import jax, jax.numpy as jnp, cuflash.jax as fj
    >>> q = jax.random.normal(jax.random.key(0), (1, 16, 2, 32))
    >>> loss = lambda q: fj.attention(q, q, q, causal=True).sum()
    >>> jax.jit(jax.grad(loss))(q).shape
    (1, 16, 2, 32)
    """
    o = _options(scale, causal, window, softcap, deterministic, layout)
    if layout not in ("bshd", "bhsd"):
        raise ValueError(f"layout must be one of ('bshd', 'bhsd'), got {layout!r}")
    q, k, v = (_array(x, n) for x, n in ((q, "q"), (k, "k"), (v, "v")))
    what = "(batch, seqlen, heads, headdim)" if layout == "bshd" else \
        "(batch, heads, seqlen, headdim)"
    for x, name in ((q, "q"), (k, "k"), (v, "v")):
        _check_rank(x, name, 4, what)
    _check_same_dtype(q, "q", k=k, v=v)
    out, lse = _dense(o, q, k, v, _slopes(alibi_slopes))
    return (out, lse) if return_lse else out


# ---------------------------------------------------------------------------------------
# Variable-length batches.

def _varlen_forward(s, q, k, v, cu_q, cu_k, slopes):
    return _call(_varlen_forward_body, s,
                 [(q.shape, q.dtype), ((q.shape[1], q.shape[0]), jnp.float32)],
                 q, k, v, cu_q, cu_k, slopes)


def _varlen_backward(s, dout, q, k, v, out, lse, cu_q, cu_k, slopes):
    return _call(_varlen_backward_body, s, [(x.shape, x.dtype) for x in (q, k, v)],
                 dout, q, k, v, out, lse, cu_q, cu_k, slopes)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _varlen(s, q, k, v, cu_q, cu_k, slopes):
    out, lse = _varlen_forward(s, q, k, v, cu_q, cu_k, slopes)
    return out, lse


def _varlen_fwd(s, q, k, v, cu_q, cu_k, slopes):
    args = _unwrap((q, k, v, cu_q, cu_k, slopes))
    out, lse = _varlen_forward(s, *args)
    return (out, lse), (*args, out, lse)


def _varlen_bwd(s, residuals, cts):
    q, k, v, cu_q, cu_k, slopes, out, lse = residuals
    dout, dlse = cts
    dout = _instantiate(dout, out)
    if _zero(dlse):
        dq, dk, dv = _varlen_backward(s, dout, q, k, v, out, lse, cu_q, cu_k, slopes)
    else:
        dq, dk, dv = _augmented_backward(
            lambda o2, *a: _varlen_backward((o2,) + s[1:], *a, cu_q, cu_k, slopes), s[0],
            dout, dlse.T[..., None], q, k, v, out, lse)
    return dq, dk, dv, None, None, None


_varlen.defvjp(_varlen_fwd, _varlen_bwd, symbolic_zeros=True)


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *,
                     scale=None, causal=False, window=(None, None), softcap=0.0,
                     alibi_slopes=None, deterministic=False, return_lse=False):
    """Exact attention over a packed batch of variable-length sequences (no padding):
    :func:`cuflash.attention_varlen` under ``jax.jit``, ``jax.grad`` and ``jax.vmap``.

    Parameters
    ----------
    q : array (total_q, nheads, headdim)
    k, v : arrays (total_k, nheads_kv, headdim)
    cu_seqlens_q, cu_seqlens_k : int32 arrays (batch + 1,), traced
        Prefix sums of the sequence lengths (sequences of length 0 allowed). On the CPU they
        are checked when the call runs (an error); on the GPU they are never read on the
        host, and invalid ones make every output of the call NaN (see
        :func:`cuflash.attention_varlen`).
    max_seqlen_q, max_seqlen_k : int, static
        Upper bounds of the sequence lengths.
    scale, causal, window, softcap, alibi_slopes, deterministic, return_lse
        As in :func:`attention`; ``alibi_slopes`` of shape (batch, nheads) has a row per
        sequence. ``lse`` is (nheads, total_q).

    Returns
    -------
    out : array (total_q, nheads, headdim), or ``(out, lse)``
    """
    o = _options(scale, causal, window, softcap, deterministic)
    q, k, v = (_array(x, n) for x, n in ((q, "q"), (k, "k"), (v, "v")))
    for x, name in ((q, "q"), (k, "k"), (v, "v")):
        _check_rank(x, name, 3, "(total, heads, headdim)")
    _check_same_dtype(q, "q", k=k, v=v)
    cu_q, cu_k = _int32(cu_seqlens_q, "cu_seqlens_q"), _int32(cu_seqlens_k, "cu_seqlens_k")
    for x, name in ((cu_q, "cu_seqlens_q"), (cu_k, "cu_seqlens_k")):
        _check_rank(x, name, 1, "(batch + 1,)")
    static = (o, _static_int(max_seqlen_q, "max_seqlen_q"),
              _static_int(max_seqlen_k, "max_seqlen_k"))
    out, lse = _varlen(static, q, k, v, cu_q, cu_k, _slopes(alibi_slopes))
    return (out, lse) if return_lse else out


def _static_int(x, name):
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, np.integer)):
        raise TypeError(f"{name} must be a Python int (static), got {type(x).__name__}")
    return int(x)


# ---------------------------------------------------------------------------------------
# KV cache.

def _kvcache_call(static, q, k_cache, v_cache, k, v, cache_seqlens, block_table, slopes):
    batch, seqlen_q, nheads, _ = q.shape
    results = [(q.shape, q.dtype), ((batch, nheads, seqlen_q), jnp.float32)]
    aliases = None
    if k is not None:  # the updated caches: results 0 and 1, in the inputs' buffers
        results = [(k_cache.shape, k_cache.dtype), (v_cache.shape, v_cache.dtype)] + results
        aliases = {0: 0, 1: 1}
    return _call(_kvcache_body, static, results, k_cache, v_cache, q, k, v, cache_seqlens,
                 block_table, slopes, aliases=aliases)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _kvcache(static, q, k_cache, v_cache, k, v, cache_seqlens, block_table, slopes):
    return tuple(_kvcache_call(static, q, k_cache, v_cache, k, v, cache_seqlens, block_table,
                               slopes))


@_kvcache.defjvp
def _kvcache_jvp(static, primals, tangents):
    raise TypeError("cuflash.jax.attention_with_kvcache has no derivative (it is for "
                    "decoding); apply jax.lax.stop_gradient to its inputs if the "
                    "differentiated function must contain it")


def attention_with_kvcache(q, k_cache, v_cache, *, k=None, v=None, cache_seqlens,
                           block_table=None, num_splits=None, scale=None, causal=False,
                           window=(None, None), softcap=0.0, alibi_slopes=None,
                           return_lse=False):
    """Attention of a few new queries over a KV cache, appending ``k``, ``v`` first:
    :func:`cuflash.attention_with_kvcache` under ``jax.jit`` and ``jax.vmap``.

    Functional: JAX arrays are immutable, so where the CuPy function writes ``k``, ``v``
    into the caches in place, this one returns the updated caches (new arrays holding the
    old contents plus the appended rows) and leaves its inputs unchanged. The caches'
    results alias their inputs' buffers (``input_output_aliases``): XLA copies each cache
    once before the call to keep the input intact, unless the caller donates it —
    ``jax.jit(step, donate_argnums=...)`` on the cache arguments — in which case XLA may
    reuse the donated buffers and the append writes only the new rows, as the in-place
    CuPy call does. Without ``k``, ``v`` the caches are returned as given.

    Parameters
    ----------
    q : array (batch, seqlen_q, nheads, headdim)
    k_cache, v_cache : arrays, dtype of ``q``
        Contiguous (batch, seqlen_cache, nheads_kv, headdim), or paged (num_blocks,
        page_size, nheads_kv, headdim) with ``block_table``.
    k, v : arrays (batch, seqlen_new, nheads_kv, headdim), optional
    cache_seqlens : int (static) or int32 array (batch,) (traced)
    block_table : int32 array (batch, max_blocks), optional
    num_splits : int in [1, 128], optional, static (GPU split-KV; ignored on the CPU)
    scale, causal, window, softcap, alibi_slopes, return_lse : as in :func:`attention`

    Returns
    -------
    ``(out, k_cache, v_cache)``, or ``(out, lse, k_cache, v_cache)`` with ``return_lse``.

    Not differentiable (decoding): differentiating through it raises a TypeError.
    """
    o = _options(scale, causal, window, softcap)
    q, k_cache, v_cache, k, v = (_array(x, n) for x, n in (
        (q, "q"), (k_cache, "k_cache"), (v_cache, "v_cache"), (k, "k"), (v, "v")))
    for x, name in ((q, "q"), (k_cache, "k_cache"), (v_cache, "v_cache"), (k, "k"),
                    (v, "v")):
        if x is not None:
            _check_rank(x, name, 4, "(batch, seqlen, heads, headdim)")
    if (k is None) != (v is None):
        raise ValueError("k and v must be given together")
    _check_same_dtype(q, "q", k_cache=k_cache, v_cache=v_cache, k=k, v=v)
    if num_splits is not None:
        num_splits = _static_int(num_splits, "num_splits")
    if isinstance(cache_seqlens, (int, np.integer)) and \
            not isinstance(cache_seqlens, (bool, np.bool_)):
        static_seqlens, seqlens = int(cache_seqlens), None
    else:
        static_seqlens, seqlens = None, _int32(cache_seqlens, "cache_seqlens")
        if seqlens.ndim == 0:
            seqlens = jnp.broadcast_to(seqlens, (q.shape[0],))
    results = _kvcache((o, num_splits, static_seqlens), q, k_cache, v_cache, k, v, seqlens,
                       _int32(block_table, "block_table"), _slopes(alibi_slopes))
    if k is not None:
        k_cache, v_cache, out, lse = results
    else:
        out, lse = results
    return (out, lse, k_cache, v_cache) if return_lse else (out, k_cache, v_cache)


# ---------------------------------------------------------------------------------------
# Merging partial attention.

def _merge_call(outs, lses):
    parts, batch, seqlen_q, nheads, _ = outs.shape
    return tuple(_call(_merge_body, None, [(outs.shape[1:], outs.dtype),
                                            ((batch, nheads, seqlen_q), jnp.float32)],
                       outs, lses))


@jax.custom_vjp
def _merge(outs, lses):
    return _merge_call(outs, lses)


def _merge_fwd(outs, lses):
    out, lse = _merge_call(outs, lses)
    return (out, lse), (outs, lses, lse)


def _merge_bwd(residuals, cts):
    """``w_s = exp(lse_s - lse)``, ``out = sum_s w_s out_s``: ``d out_s = w_s dout`` and
    ``d lse_s = w_s (dlse + <dout, out_s - out>)``, in float32 (``out`` recomputed in
    float32, not the rounded result). Parts with ``lse_s = -inf`` get zero gradients."""
    outs, lses, lse = residuals
    dout, dlse = cts
    finite = jnp.isfinite(lse)
    w = jnp.where(finite, jnp.exp(lses - jnp.where(finite, lse, 0.0)), 0.0)  # (P, B, H, S)
    w_rows = jnp.swapaxes(w, 2, 3)[..., None]                                # (P, B, S, H, 1)
    parts = outs.astype(jnp.float32)
    out = jnp.sum(w_rows * parts, axis=0)
    dot = jnp.sum(dout.astype(jnp.float32)[None] * (parts - out[None]), axis=-1)  # P,B,S,H
    d_lses = w * (dlse[None] + jnp.swapaxes(dot, 2, 3))
    d_outs = (w_rows * dout.astype(jnp.float32)[None]).astype(outs.dtype)
    return d_outs, d_lses


_merge.defvjp(_merge_fwd, _merge_bwd)


def merge_attention(outs, lses):
    """Combine attention over disjoint key sets into attention over their union:
    :func:`cuflash.merge_attention` under ``jax.jit``, ``jax.grad`` and ``jax.vmap``.

    Parameters
    ----------
    outs : sequence of arrays (batch, seqlen_q, nheads, headdim), or one array stacked
           on a leading parts axis
    lses : sequence of float32 arrays (batch, nheads, seqlen_q), or one stacked array

    Returns
    -------
    ``(out, lse)``: ``lse = logsumexp_s lse_s``, ``out = sum_s exp(lse_s - lse) out_s``
    (float32 accumulation); a row that is ``-inf`` in every part gets ``out = 0``,
    ``lse = -inf``. Differentiable in both ``outs`` and ``lses`` (a closed-form backward
    in JAX), so with :func:`attention` (``return_lse=True``) it composes into split-KV or
    ring attention that ``jax.grad`` goes through.
    """
    outs = jnp.stack(outs) if isinstance(outs, (list, tuple)) else _array(outs, "outs")
    lses = jnp.stack(lses) if isinstance(lses, (list, tuple)) else _array(lses, "lses")
    _check_rank(outs, "outs", 5, "(parts, batch, seqlen_q, heads, headdim)")
    _check_rank(lses, "lses", 4, "(parts, batch, heads, seqlen_q)")
    if lses.dtype != jnp.float32:
        raise TypeError(f"lses must be float32, got {lses.dtype}")
    return _merge(outs, lses)
