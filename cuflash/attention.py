"""The public functions: validate, handle empty problems, pick the backend, call it.

CuPy arrays run the GPU kernels, NumPy arrays the CPU backend (the same tiled algorithm),
and any other CUDA array with ``__dlpack__`` (JAX, PyTorch, ...) is taken zero-copy as a
CuPy array; results are then CuPy arrays, which every framework takes back through DLPack.
"""
from __future__ import annotations

from typing import Callable, Tuple

import numpy as np

from . import _checks, _core, cpu, ops
from ._api import (CALLS, MISS, Array, Grads, OnDevice, OutLse, Window, contiguous_strides,
                   disjoint, fill, into, meta, remember)

_OPTIONS_DOC = """
    scale : float, optional
        Multiplies ``q @ k.T``; default ``headdim ** -0.5``. A normal float32 > 0.
    causal : bool, default False
        Bottom-right aligned causal mask: query ``i`` sees keys
        ``j <= i + seqlen_k - seqlen_q`` (the last query sees every key).
    window : (left, right), default (None, None)
        Sliding window, bounds inclusive: query ``i`` sees keys ``j`` with
        ``i + seqlen_k - seqlen_q - left <= j <= i + seqlen_k - seqlen_q + right``.
        ``None`` or ``-1`` leaves that side unbounded. ``causal=True`` is ``right=0``.
    softcap : float, default 0.0
        If > 0, scores become ``softcap * tanh(score / softcap)`` (after scaling); a
        normal float32.
    alibi_slopes : float32 array (nheads,) or (batch, nheads), optional
        Subtracts ``slope * |i + seqlen_k - seqlen_q - j|`` from the scores.
"""


_OUTPUTS_DOC = """
    out, lse : arrays, optional
        Where to write the results (NumPy style): exactly the shape and dtype returned,
        of the inputs' kind and device, last axis contiguous (``lse`` C-contiguous; both
        C-contiguous in a varlen call with GPU prefix sums), sharing no memory with the
        inputs. They are returned. With both given, a GPU call allocates nothing.
"""

_LAYOUT_DOC = """
    layout : {'bshd', 'bhsd'}, default 'bshd'
        The axes of the 4-D arrays (q, k, v, out, dout and the gradients): 'bshd' is
        (batch, seqlen, heads, headdim); 'bhsd' is (batch, heads, seqlen, headdim), the
        layout of torch's ``scaled_dot_product_attention``, taken as a zero-copy transposed
        view (results come back in it, as views). ``lse`` is (batch, heads, seqlen_q) in
        both.
"""

_GRADS_DOC = """
    dq, dk, dv : arrays, optional
        Where to write the gradients (NumPy style): exactly the shapes and dtypes of ``q``,
        ``k`` and ``v``, of their kind and device, last axis contiguous (C-contiguous in a
        varlen call with GPU prefix sums), sharing no memory with the inputs. They are
        returned. The GPU backward still allocates its float32 scratch (O(seqlen x
        headdim)); under CUDA graph capture it comes from a scratch kept per stream.
"""


def _xp(kind):
    return np if kind == "numpy" else _checks._cupy()


def attention_forward(q: Array, k: Array, v: Array, *, scale: float | None = None,
                      causal: bool = False, window: Window = (None, None),
                      softcap: float = 0.0, alibi_slopes: Array | None = None,
                      out: Array | None = None, lse: Array | None = None,
                      layout: str = "bshd") -> OutLse:
    """Exact attention forward, returning the output and its log-sum-exp.

    Parameters
    ----------
    q : array (batch, seqlen_q, nheads, headdim)
    k, v : arrays (batch, seqlen_k, nheads_kv, headdim), ``nheads % nheads_kv == 0``
        float16, bfloat16 (``ml_dtypes.bfloat16``) or float32 (float64 too on the CPU).
        Only the last axis must be contiguous.
    {options}
    {outputs}
    {layout}

    Returns
    -------
    out : array (batch, seqlen_q, nheads, headdim), dtype of ``q``
    lse : float32 array (batch, nheads, seqlen_q)
        Natural-log log-sum-exp of each query row's scores; ``-inf`` for a row that sees
        no key (its ``out`` row is 0).

    Examples
    --------
    >>> import numpy as np, cuflash
    >>> q = np.random.randn(1, 5, 2, 64).astype(np.float32)
    >>> out, lse = cuflash.attention_forward(q, q, q, causal=True)
    >>> out.shape, lse.shape
    ((1, 5, 2, 64), (1, 2, 5))
    """
    if layout != "bshd":
        q, k, v, view = _as_bshd(layout, q=q, k=k, v=v, out=out)
        result = attention_forward(q, k, v, scale=scale, causal=causal, window=window,
                                   softcap=softcap, alibi_slopes=alibi_slopes, out=view,
                                   lse=lse)
        return _from_bshd(result, (out, lse))
    options = (scale, causal, window, softcap)
    args, outputs = (q, k, v, alibi_slopes, None, None), (out, lse)
    try:
        call = CALLS[("fwd", meta(q), meta(k), meta(v), meta(alibi_slopes), meta(out),
                       meta(lse), options)]
    except MISS:
        call, args, outputs = _forward_call(q, k, v, alibi_slopes, out, lse, options)
    return call(args, outputs)


_FWD_NAMES = ("q", "k", "v", "alibi_slopes", "cu_seqlens_q", "cu_seqlens_k", "out", "lse")


def _forward_call(q, k, v, alibi_slopes, out, lse, options, packing=None):
    """Validate a forward call (``packing``: the varlen arguments cu_seqlens_q,
    cu_seqlens_k, max_seqlen_q, max_seqlen_k): (the function that runs it, its inputs and
    outputs as that function takes them). GPU calls are memoized."""
    scale, causal, window, softcap = options
    kind, a = _checks.intake({"q": q, "k": k, "v": v, "alibi_slopes": alibi_slopes,
                              "out": out, "lse": lse}, ("alibi_slopes", "out", "lse"))
    q, k, v = a["q"], a["k"], a["v"]
    gpu = kind != "numpy"
    if packing is None:
        shape, varlen = _checks.check_qkv(q, k, v, gpu=gpu), None
        lse_shape = (shape.batch, shape.nheads, shape.seqlen_q)
        empty = min(shape.batch, shape.seqlen_q, shape.nheads) == 0 or shape.seqlen_k == 0
    else:
        shape, varlen = _checks.check_varlen(q, k, v, *packing, gpu=gpu)
        lse_shape = (shape.nheads, varlen.total_q)
        empty = _varlen_empty(shape, varlen)
    opts = _checks.options(shape, kind, q, scale=scale, causal=causal, window=window,
                           softcap=softcap, alibi_slopes=a["alibi_slopes"])
    # varlen_check fills whole byte ranges with NaN: the outputs must be contiguous.
    nan_filled = varlen is not None and gpu and not varlen.checked_on_host
    _checks.check_output(a["out"], "out", q.shape, q.dtype, kind, q, contiguous=nan_filled)
    _checks.check_output(a["lse"], "lse", lse_shape, np.float32, kind, q, contiguous=True)
    cu = (None, None) if varlen is None else (varlen.cu_seqlens_q, varlen.cu_seqlens_k)
    args, outputs = (q, k, v, opts.alibi_slopes, *cu), (a["out"], a["lse"])
    xp = _xp(kind)
    if empty:
        def run(args, outputs):
            disjoint(_FWD_NAMES, args, outputs)
            with _checks.on_device(kind, q):
                return _checked(varlen, fill([(q.shape, q.dtype, xp),
                                               (lse_shape, np.float32, xp)], outputs,
                                              (0, -np.inf)))
        return run, args, outputs
    if kind == "numpy":
        def run(args, outputs):
            disjoint(_FWD_NAMES, args, outputs)
            if varlen is None:
                return into(cpu.forward(q, k, v, shape, opts), outputs)
            return into(cpu.forward_varlen(q, k, v, shape, opts, varlen), outputs)
        return run, args, outputs
    out_strides = a["out"].strides if a["out"] is not None else \
        contiguous_strides(q.shape, q.dtype.itemsize)
    launch = ops.forward.Launch(_core.problem(q, k, v, shape, opts, varlen), out_strides,
                                lse_shape)
    if nan_filled:
        launch = _VarlenChecked(launch, varlen, (q.nbytes, 4 * lse_shape[0] * lse_shape[1]),
                                cu_at=4)
    call = OnDevice(launch, q.data.device_id, _checker(_FWD_NAMES), args + outputs,
                    range(len(args), len(args) + 2))
    if _memoizable(varlen, a["alibi_slopes"]):
        key = ("fwd", meta(q), meta(k), meta(v), meta(a["alibi_slopes"]),
               meta(a["out"]), meta(a["lse"]), options)
        remember(key if varlen is None else key + (meta(cu[0]), meta(cu[1]), *packing[2:]),
                 call)
    return call, args, outputs


def _memoizable(varlen, slopes) -> bool:
    """Whether a GPU call may be memoized on its layout: not when the checks read values
    (host prefix sums), nor when an argument was converted (float64 slopes): a memoized
    call takes the caller's arrays as they are."""
    host_sums = varlen is not None and varlen.checked_on_host
    return not host_sums and (slopes is None or slopes.dtype == np.float32)


def _checker(names):
    """The exact overlap check of a call whose arrays are named ``names``."""
    return lambda args, outputs: disjoint(names, args, outputs)


class _VarlenChecked:
    """A varlen launch followed by the device check of its prefix sums, which NaN-fills
    the call's outputs (contiguous, of ``output_bytes``) when they are invalid."""
    __slots__ = ("launch", "check", "cu_at")

    def __init__(self, launch, varlen, output_bytes, cu_at):
        self.launch, self.cu_at = launch, cu_at
        self.check = _prefix_sum_check(varlen, output_bytes)

    def __call__(self, *args):
        results = self.launch(*args)
        _run_check(self.check, *args[self.cu_at:self.cu_at + 2], results)
        return results


def _checked(varlen, outputs):
    """``outputs`` of an empty varlen call, after the device check of prefix sums that were
    not read on the host (NaN outputs if they are invalid)."""
    if varlen is not None and not varlen.checked_on_host:
        check = _prefix_sum_check(varlen, [x.nbytes for x in outputs])
        _run_check(check, varlen.cu_seqlens_q, varlen.cu_seqlens_k, outputs)
    return outputs


def _prefix_sum_check(varlen, output_bytes):
    """The varlen_check plan of a call's prefix sums and its (non-empty) outputs."""
    return ops.varlen_check.plan(
        varlen.cu_seqlens_q.data.device_id, varlen.cu_seqlens_q.size - 1, varlen.total_q,
        varlen.total_k, varlen.max_seqlen_q, varlen.max_seqlen_k,
        tuple(n for n in output_bytes if n))


def _run_check(check, cu_q, cu_k, outputs):
    import cupy
    check(cupy.cuda.get_current_stream().ptr, cu_q.data.ptr, cu_k.data.ptr,
          *(x.data.ptr for x in outputs if x.size))


LAYOUTS = ("bshd", "bhsd")


def _as_bshd(layout, **arrays):
    """``arrays`` (name -> 4-D array in ``layout``, or None) as (batch, seqlen, heads,
    headdim) views, in order."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    views = []
    for name, x in arrays.items():
        if x is not None:
            if getattr(x, "ndim", None) != 4:
                raise ValueError(f"{name} must have 4 dimensions (batch, nheads, seqlen, "
                                 f"headdim) with layout='bhsd', got shape "
                                 f"{tuple(getattr(x, 'shape', ()))}")
            x = x.swapaxes(1, 2)
        views.append(x)
    return views


def _from_bshd(results, given):
    """``results`` of a call in (batch, seqlen, heads, headdim) order back in 'bhsd': the
    caller's own buffers where given, else transposed views; lse has one layout only."""
    back = []
    for x, mine in zip(results, given):
        if mine is not None:
            back.append(mine)
        elif x.ndim == 4:
            back.append(x.swapaxes(1, 2))
        else:
            back.append(x)
    return tuple(back)


def attention(q: Array, k: Array, v: Array, *, scale: float | None = None,
              causal: bool = False, window: Window = (None, None), softcap: float = 0.0,
              alibi_slopes: Array | None = None, return_lse: bool = False,
              out: Array | None = None, lse: Array | None = None,
              layout: str = "bshd") -> Array | OutLse:
    """Exact attention ``softmax(scale * q @ k.T + masks) @ v`` in O(seqlen) memory.

    Parameters
    ----------
    q : array (batch, seqlen_q, nheads, headdim)
    k, v : arrays (batch, seqlen_k, nheads_kv, headdim), ``nheads % nheads_kv == 0``
    {options}
    return_lse : bool, default False
        Also return the float32 log-sum-exp, shape (batch, nheads, seqlen_q).
    {outputs}
    {layout}

    Returns
    -------
    out : array (batch, seqlen_q, nheads, headdim), or ``(out, lse)``

    Examples
    --------
    >>> import numpy as np, cuflash
    >>> q = np.random.randn(2, 17, 4, 64).astype(np.float32)
    >>> k = np.random.randn(2, 33, 1, 64).astype(np.float32)
    >>> cuflash.attention(q, k, k, causal=True).shape
    (2, 17, 4, 64)
    """
    out, lse = attention_forward(q, k, v, scale=scale, causal=causal, window=window,
                                 softcap=softcap, alibi_slopes=alibi_slopes, out=out, lse=lse,
                                 layout=layout)
    return (out, lse) if return_lse else out


def attention_backward(dout: Array, q: Array, k: Array, v: Array, out: Array, lse: Array, *,
                       scale: float | None = None, causal: bool = False,
                       window: Window = (None, None), softcap: float = 0.0,
                       alibi_slopes: Array | None = None, deterministic: bool = False,
                       dq: Array | None = None, dk: Array | None = None,
                       dv: Array | None = None, layout: str = "bshd") -> Grads:
    """Gradients of attention, recomputing the probabilities from the saved ``lse``.

    Parameters
    ----------
    dout : array (batch, seqlen_q, nheads, headdim), gradient of ``out``
    q, k, v : the forward's inputs
    out, lse : the forward's outputs (``attention_forward``)
    {options}
    {grads}
    {layout}
    deterministic : bool, default False
        Make the gradients bitwise reproducible run to run (GPU: no float atomics).

    Returns
    -------
    dq : array like ``q``;  dk, dv : arrays like ``k`` and ``v``
        For grouped-query attention, dk/dv of a kv head sum over its query heads.

    Examples
    --------
    >>> import numpy as np, cuflash
    >>> q = np.random.randn(1, 8, 2, 32)
    >>> out, lse = cuflash.attention_forward(q, q, q)
    >>> dq, dk, dv = cuflash.attention_backward(np.ones_like(out), q, q, q, out, lse)
    >>> dq.shape
    (1, 8, 2, 32)
    """
    if layout != "bshd":
        views = _as_bshd(layout, dout=dout, q=q, k=k, v=v, out=out, dq=dq, dk=dk, dv=dv)
        result = attention_backward(*views[:5], lse, scale=scale, causal=causal,
                                    window=window, softcap=softcap, alibi_slopes=alibi_slopes,
                                    deterministic=deterministic, dq=views[5], dk=views[6],
                                    dv=views[7])
        return _from_bshd(result, (dq, dk, dv))
    options = (scale, causal, window, softcap, deterministic)
    args, outputs = (dout, q, k, v, out, lse, alibi_slopes, None, None), (dq, dk, dv)
    try:
        call = CALLS[("bwd", meta(dout), meta(q), meta(k), meta(v), meta(out), meta(lse),
                       meta(alibi_slopes), meta(dq), meta(dk), meta(dv), options)]
    except MISS:
        call, args, outputs = _backward_call(args, outputs, options)
    return call(args, outputs)


_BWD_NAMES = ("dout", "q", "k", "v", "out", "lse", "alibi_slopes", "cu_seqlens_q",
              "cu_seqlens_k", "dq", "dk", "dv")


def _backward_call(args, outputs, options, packing=None):
    """Validate a backward call (``packing`` as in :func:`_forward_call`): (the function
    that runs it, its inputs and outputs as that function takes them). GPU calls are
    memoized."""
    scale, causal, window, softcap, deterministic = options
    names = _BWD_NAMES[:7] + _BWD_NAMES[9:]
    kind, a = _checks.intake(dict(zip(names, args[:7] + outputs)),
                             ("alibi_slopes", "dq", "dk", "dv"))
    dout, q, k, v, out, lse = (a[n] for n in _BWD_NAMES[:6])
    gpu = kind != "numpy"
    if packing is None:
        shape, varlen = _checks.check_qkv(q, k, v, gpu=gpu), None
        empty = min(shape.batch, shape.seqlen_q, shape.nheads, shape.seqlen_k) == 0
    else:
        shape, varlen = _checks.check_varlen(q, k, v, *packing, gpu=gpu)
        empty = _varlen_empty(shape, varlen)
    _checks.check_backward(dout, out, lse, q, shape, varlen)
    opts = _checks.options(shape, kind, q, scale=scale, causal=causal, window=window,
                           softcap=softcap, alibi_slopes=a["alibi_slopes"])
    if not isinstance(deterministic, (bool, np.bool_)):
        raise TypeError(f"deterministic must be a bool, got {type(deterministic).__name__}")
    nan_filled = varlen is not None and gpu and not varlen.checked_on_host
    for name, like in (("dq", q), ("dk", k), ("dv", v)):
        _checks.check_output(a[name], name, like.shape, like.dtype, kind, q,
                             contiguous=nan_filled)
    cu = (None, None) if varlen is None else (varlen.cu_seqlens_q, varlen.cu_seqlens_k)
    args = (dout, q, k, v, out, lse, opts.alibi_slopes, *cu)
    outputs = (a["dq"], a["dk"], a["dv"])
    xp = _xp(kind)
    if empty:
        def run(args, outputs):
            disjoint(_BWD_NAMES, args, outputs)
            with _checks.on_device(kind, q):
                return _checked(varlen, fill([(x.shape, x.dtype, xp) for x in (q, k, v)],
                                              outputs, (0, 0, 0)))
        return run, args, outputs
    if kind == "numpy":
        def run(args, outputs):
            disjoint(_BWD_NAMES, args, outputs)
            if varlen is None:
                return into(cpu.backward(dout, q, k, v, out, lse, shape, opts), outputs)
            return into(cpu.backward_varlen(dout, q, k, v, out, lse, shape, opts, varlen),
                         outputs)
        return run, args, outputs
    strides = (out.strides, dout.strides, lse.strides,
               *(a[n].strides if a[n] is not None else
                 contiguous_strides(x.shape, x.dtype.itemsize)
                 for n, x in (("dq", q), ("dk", k), ("dv", v))))
    launch = ops.backward.Launch(_core.problem(q, k, v, shape, opts, varlen), strides,
                                 bool(deterministic))
    if nan_filled:
        launch = _VarlenChecked(launch, varlen, (q.nbytes, k.nbytes, v.nbytes), cu_at=7)
    call = OnDevice(launch, q.data.device_id, _checker(_BWD_NAMES), args + outputs,
                    range(len(args), len(args) + 3))
    if _memoizable(varlen, a["alibi_slopes"]):
        key = ("bwd", *(meta(x) for x in args[:6]), meta(a["alibi_slopes"]),
               *(meta(x) for x in outputs), options)
        remember(key if varlen is None else key + (meta(cu[0]), meta(cu[1]), *packing[2:]),
                 call)
    return call, args, outputs


def attention_vjp(q: Array, k: Array, v: Array, *, deterministic: bool = False,
                  **options) -> Tuple[Array, Callable[..., Grads]]:
    """Forward pass and its vector-Jacobian product, in the style of ``jax.vjp``.

    Returns ``(out, vjp)`` where ``vjp(dout)`` returns ``(dq, dk, dv)``. ``options`` are
    those of :func:`attention` (``scale``, ``causal``, ``window``, ``softcap``,
    ``alibi_slopes``). Only ``q, k, v, out, lse`` are kept alive between the two calls.

    Examples
    --------
    >>> import numpy as np, cuflash
    >>> q = np.random.randn(1, 8, 2, 32)
    >>> out, vjp = cuflash.attention_vjp(q, q, q, causal=True)
    >>> dq, dk, dv = vjp(np.ones_like(out))
    """
    if not isinstance(deterministic, (bool, np.bool_)):
        raise TypeError(f"deterministic must be a bool, got {type(deterministic).__name__}")
    out, lse = attention_forward(q, k, v, **options)

    def vjp(dout, *, dq=None, dk=None, dv=None):
        return attention_backward(dout, q, k, v, out, lse, deterministic=deterministic,
                                  dq=dq, dk=dk, dv=dv, **options)

    return out, vjp


# ---------------------------------------------------------------------------------------
# Variable-length batches: sequences packed one after the other, no padding.

_VARLEN_DOC = """
    cu_seqlens_q, cu_seqlens_k : int32 arrays (batch + 1,)
        Prefix sums of the sequence lengths: batch item ``b`` owns rows
        ``cu_seqlens_q[b]:cu_seqlens_q[b + 1]`` of ``q`` and
        ``cu_seqlens_k[b]:cu_seqlens_k[b + 1]`` of ``k`` and ``v``. They start at 0, never
        decrease (sequences of length 0 are allowed) and end at ``total_q`` / ``total_k``.
        NumPy arrays are checked on the host (a ValueError says what is wrong) and, in a
        GPU call, copied to the device of ``q``. GPU arrays (CuPy or DLPack, on the device
        of ``q``) are never read on the host, which would wait for the stream: the kernels
        stay inside the arrays whatever they hold, and a check on the device, queued after
        the call's kernels, fills every output of the call (``out`` and ``lse``; ``dq``,
        ``dk`` and ``dv``) with NaN if they break a rule above or a ``max_seqlen`` bound.
    max_seqlen_q, max_seqlen_k : int
        Upper bounds (>= 0) of the sequence lengths. With NumPy prefix sums a bound below
        the longest sequence is a ValueError (and the kernels are launched for the longest
        sequence); with GPU prefix sums the kernels are launched for the bound, and a
        longer sequence gives NaN outputs.
"""

_VARLEN_MASKS = """
    Notes
    -----
    Every option applies per sequence, with that sequence's own ``seqlen_q`` and
    ``seqlen_k``: the causal mask and windows are aligned to the bottom-right corner of each
    sequence's (seqlen_q, seqlen_k) block, and ``alibi_slopes`` of shape (batch, nheads)
    has a row per sequence.
"""


def attention_varlen_forward(q: Array, k: Array, v: Array, cu_seqlens_q: Array,
                             cu_seqlens_k: Array, max_seqlen_q: int, max_seqlen_k: int, *,
                             scale: float | None = None, causal: bool = False,
                             window: Window = (None, None), softcap: float = 0.0,
                             alibi_slopes: Array | None = None, out: Array | None = None,
                             lse: Array | None = None) -> OutLse:
    """Exact attention forward over a packed batch of variable-length sequences.

    The same result as :func:`attention_forward` run on each sequence alone.

    Parameters
    ----------
    q : array (total_q, nheads, headdim)
    k, v : arrays (total_k, nheads_kv, headdim), ``nheads % nheads_kv == 0``
    {varlen}
    {options}
    {outputs}

    Returns
    -------
    out : array (total_q, nheads, headdim), dtype of ``q``
    lse : float32 array (nheads, total_q)
        Natural-log log-sum-exp of each query row; ``-inf`` for a row that sees no key (its
        ``out`` row is 0), e.g. every row of a sequence with no keys.

    {masks}
    Examples
    --------
    >>> import numpy as np, cuflash
    >>> cu = np.array([0, 3, 3, 8], np.int32)  # lengths 3, 0, 5
    >>> q = np.random.randn(8, 2, 32).astype(np.float32)
    >>> out, lse = cuflash.attention_varlen_forward(q, q, q, cu, cu, 5, 5, causal=True)
    >>> out.shape, lse.shape
    ((8, 2, 32), (2, 8))
    >>> seq = q[None, 3:8]  # the third sequence alone, as a batch of one
    >>> ref, _ = cuflash.attention_forward(seq, seq, seq, causal=True)
    >>> bool(np.allclose(out[3:8], ref[0], atol=1e-6))
    True
    """
    options = (scale, causal, window, softcap)
    packing = (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    args, outputs = (q, k, v, alibi_slopes, cu_seqlens_q, cu_seqlens_k), (out, lse)
    try:
        call = CALLS[("fwd", meta(q), meta(k), meta(v), meta(alibi_slopes), meta(out),
                       meta(lse), options, meta(cu_seqlens_q), meta(cu_seqlens_k),
                       max_seqlen_q, max_seqlen_k)]
    except MISS:
        call, args, outputs = _forward_call(q, k, v, alibi_slopes, out, lse, options, packing)
    return call(args, outputs)


def attention_varlen(q: Array, k: Array, v: Array, cu_seqlens_q: Array, cu_seqlens_k: Array,
                     max_seqlen_q: int, max_seqlen_k: int, *, scale: float | None = None,
                     causal: bool = False, window: Window = (None, None),
                     softcap: float = 0.0, alibi_slopes: Array | None = None,
                     return_lse: bool = False, out: Array | None = None,
                     lse: Array | None = None) -> Array | OutLse:
    """Exact attention over a packed batch of variable-length sequences (no padding).

    Parameters
    ----------
    q : array (total_q, nheads, headdim)
    k, v : arrays (total_k, nheads_kv, headdim), ``nheads % nheads_kv == 0``
    {varlen}
    {options}
    return_lse : bool, default False
        Also return the float32 log-sum-exp, shape (nheads, total_q).
    {outputs}

    Returns
    -------
    out : array (total_q, nheads, headdim), or ``(out, lse)``

    {masks}
    Examples
    --------
    >>> import numpy as np, cuflash
    >>> lengths = [5, 1, 7]
    >>> cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    >>> q = np.random.randn(13, 4, 64).astype(np.float32)
    >>> k = np.random.randn(13, 1, 64).astype(np.float32)
    >>> cuflash.attention_varlen(q, k, k, cu, cu, max(lengths), max(lengths)).shape
    (13, 4, 64)
    """
    out, lse = attention_varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                        max_seqlen_k, scale=scale, causal=causal,
                                        window=window, softcap=softcap,
                                        alibi_slopes=alibi_slopes, out=out, lse=lse)
    return (out, lse) if return_lse else out


def attention_varlen_backward(dout: Array, q: Array, k: Array, v: Array, out: Array,
                              lse: Array, cu_seqlens_q: Array, cu_seqlens_k: Array,
                              max_seqlen_q: int, max_seqlen_k: int, *,
                              scale: float | None = None, causal: bool = False,
                              window: Window = (None, None), softcap: float = 0.0,
                              alibi_slopes: Array | None = None, deterministic: bool = False,
                              dq: Array | None = None, dk: Array | None = None,
                              dv: Array | None = None) -> Grads:
    """Gradients of :func:`attention_varlen`, recomputing the probabilities from ``lse``.

    Parameters
    ----------
    dout : array (total_q, nheads, headdim), gradient of ``out``
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k : the forward's inputs
    out, lse : the forward's outputs (:func:`attention_varlen_forward`)
    {options}
    {grads}
    deterministic : bool, default False
        Make the gradients bitwise reproducible run to run (GPU: no float atomics).

    Returns
    -------
    dq : array like ``q``;  dk, dv : arrays like ``k`` and ``v``
        For grouped-query attention, dk/dv of a kv head sum over its query heads. Rows of a
        sequence with no keys get dq = 0; keys that no query sees get dk = dv = 0.

    Examples
    --------
    >>> import numpy as np, cuflash
    >>> cu = np.array([0, 4, 10], np.int32)
    >>> q = np.random.randn(10, 2, 32)
    >>> out, lse = cuflash.attention_varlen_forward(q, q, q, cu, cu, 6, 6)
    >>> dq, dk, dv = cuflash.attention_varlen_backward(np.ones_like(out), q, q, q, out, lse,
    ...                                                cu, cu, 6, 6)
    >>> dq.shape, dk.shape
    ((10, 2, 32), (10, 2, 32))
    """
    options = (scale, causal, window, softcap, deterministic)
    args = (dout, q, k, v, out, lse, alibi_slopes, cu_seqlens_q, cu_seqlens_k)
    outputs = (dq, dk, dv)
    try:
        call = CALLS[("bwd", *(meta(x) for x in args[:7]), *(meta(x) for x in outputs),
                       options, meta(cu_seqlens_q), meta(cu_seqlens_k), max_seqlen_q,
                       max_seqlen_k)]
    except MISS:
        packing = (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
        call, args, outputs = _backward_call(args, outputs, options, packing)
    return call(args, outputs)


def _varlen_empty(shape, varlen) -> bool:
    """Nothing to compute: no rows, no heads, no sequences or a zero ``max_seqlen``. With
    host-checked prefix sums the last two imply empty totals; prefix sums on the GPU may
    claim rows with them (invalid: varlen_check NaN-fills the zeros), and the kernels would
    be launched on an empty grid, which CUDA rejects."""
    return min(varlen.total_q, varlen.total_k, shape.nheads, shape.batch, shape.seqlen_q,
               shape.seqlen_k) == 0


for _f in (attention_forward, attention, attention_backward, attention_varlen_forward,
           attention_varlen, attention_varlen_backward):
    if _f.__doc__:  # None under python -OO, which strips docstrings
        _f.__doc__ = (_f.__doc__.replace("    {options}\n", _OPTIONS_DOC.lstrip("\n"))
                      .replace("    {outputs}\n", _OUTPUTS_DOC.lstrip("\n"))
                      .replace("    {grads}\n", _GRADS_DOC.lstrip("\n"))
                      .replace("    {layout}\n", _LAYOUT_DOC.lstrip("\n"))
                      .replace("    {varlen}\n", _VARLEN_DOC.lstrip("\n"))
                      .replace("    {masks}\n", _VARLEN_MASKS.lstrip("\n")))
