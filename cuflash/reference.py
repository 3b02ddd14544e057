"""Naive attention that materialises the whole score matrix: the yardstick for every test.

It follows CONVENTIONS.md literally (score, soft-cap, ALiBi, mask, softmax) and shares the
argument checks of the public API, so the conventions cannot drift between the two.

``upcast=True`` computes everything in float64. ``upcast=False`` simulates the naive
computation done in the input dtype: every materialised intermediate (scores,
probabilities, output; in backward dP, dS and the gradients) is computed in float64 from
rounded operands and then rounded to the input dtype. Its distance to the float64 result is
the "error of the naive computation" that the accuracy rule of the tests is relative to.

It computes where q lives: CuPy arrays on their GPU (float64 there too: the same formula,
the same rounding, results as CuPy arrays), anything else on the host with NumPy. The score
matrix of shape (batch, nheads, seqlen_q, seqlen_k) is materialised in float64: use it on
test-sized problems only.
"""
from __future__ import annotations

import ml_dtypes
import numpy as np

from . import _checks


def attention_forward(q, k, v, *, scale=None, causal=False, window=(None, None), softcap=0.0,
                      alibi_slopes=None, upcast=True):
    """Reference attention forward.

    Parameters
    ----------
    q : array (batch, seqlen_q, nheads, headdim)
    k, v : arrays (batch, seqlen_k, nheads_kv, headdim), ``nheads % nheads_kv == 0``
        NumPy or CuPy arrays of float16, bfloat16, float32 or float64. With a CuPy q the
        reference runs on q's GPU (the others are moved there) and returns CuPy arrays;
        otherwise on the host (arrays with ``get()`` are copied there first).
    scale, causal, window, softcap, alibi_slopes
        As in :func:`cuflash.attention`.
    upcast : bool, default True
        True: compute in float64 and return float64. False: round every intermediate to
        the input dtype and return arrays of the input dtype (``lse`` included).

    Returns
    -------
    out : array (batch, seqlen_q, nheads, headdim)
    lse : array (batch, nheads, seqlen_q)
        Natural-log log-sum-exp of the visible scores; ``-inf`` (and ``out`` 0) for a row
        that sees no key.

    Examples
    --------
    >>> import numpy as np
    >>> from cuflash import reference
    >>> q = np.random.randn(1, 4, 2, 8)
    >>> out, lse = reference.attention_forward(q, q, q, causal=True)
    >>> out.dtype, lse.shape
    (dtype('float64'), (1, 2, 4))
    """
    xp, q, k, v, shape, opts = _prepare(q, k, v, scale, causal, window, softcap,
                                        alibi_slopes)
    with _checks.on_device(_kind(xp), q):
        rnd = _rounding(xp, q.dtype, upcast)
        out, lse, _ = _forward(xp, q, k, v, shape, opts, rnd)
        dtype = np.float64 if upcast else q.dtype
        return out.astype(dtype), lse.astype(dtype)


def attention_backward(dout, q, k, v, *, scale=None, causal=False, window=(None, None),
                       softcap=0.0, alibi_slopes=None, upcast=True):
    """Reference gradients of attention, by the textbook softmax backward.

    Parameters
    ----------
    dout : array (batch, seqlen_q, nheads, headdim), gradient of ``out``
    q, k, v, scale, causal, window, softcap, alibi_slopes, upcast
        As in :func:`attention_forward`.

    Returns
    -------
    dq : array (batch, seqlen_q, nheads, headdim)
    dk, dv : arrays (batch, seqlen_k, nheads_kv, headdim)
        For grouped-query attention, summed over the query heads of each kv head.
        float64 with ``upcast=True``, else the input dtype.

    Examples
    --------
    >>> import numpy as np
    >>> from cuflash import reference
    >>> q = np.random.randn(1, 4, 2, 8)
    >>> dq, dk, dv = reference.attention_backward(np.ones_like(q), q, q, q)
    >>> dq.shape
    (1, 4, 2, 8)
    """
    xp, q, k, v, shape, opts = _prepare(q, k, v, scale, causal, window, softcap,
                                        alibi_slopes)
    dout = _to(xp, dout)
    if dout.shape != q.shape:
        raise ValueError(f"dout must have the shape of q {q.shape}, got {dout.shape}")
    with _checks.on_device(_kind(xp), q):
        rnd = _rounding(xp, q.dtype, upcast)
        _, _, (p, tanh, qf, kf, vf) = _forward(xp, q, k, v, shape, opts, rnd)
        do = rnd(dout.astype(np.float64))
        do = _heads_first(do)
        dv = rnd(_heads_first(p.swapaxes(-1, -2) @ do))
        dp = rnd(do @ vf.swapaxes(-1, -2))
        ds = p * (dp - (p * dp).sum(-1, keepdims=True))
        if opts.softcap:
            ds = ds * (1 - tanh * tanh)  # d/dx softcap * tanh(x / softcap)
        ds = rnd(ds * opts.scale)
        dq = rnd(_heads_first(ds @ kf))
        dk = rnd(_heads_first(ds.swapaxes(-1, -2) @ qf))
        dk, dv = (rnd(_sum_groups(x, shape)) for x in (dk, dv))
        dtype = np.float64 if upcast else q.dtype
        return dq.astype(dtype), dk.astype(dtype), dv.astype(dtype)


def attention_varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                             *, scale=None, causal=False, window=(None, None), softcap=0.0,
                             alibi_slopes=None, upcast=True):
    """Reference varlen attention forward: :func:`attention_forward` on each sequence.

    Parameters
    ----------
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k
        As in :func:`cuflash.attention_varlen`; q, k, v as in :func:`attention_forward`
        (a CuPy q: computed on its GPU), the prefix sums read on the host.
    scale, causal, window, softcap, alibi_slopes, upcast
        As in :func:`attention_forward`, applied to each sequence with its own lengths.

    Returns
    -------
    out : array (total_q, nheads, headdim)
    lse : array (nheads, total_q)
        float64 with ``upcast=True``, else the input dtype.

    Examples
    --------
    >>> import numpy as np
    >>> from cuflash import reference
    >>> cu = np.array([0, 2, 6], np.int32)
    >>> q = np.random.randn(6, 2, 8)
    >>> out, lse = reference.attention_varlen_forward(q, q, q, cu, cu, 4, 4)
    >>> bool(np.allclose(out[2:], reference.attention_forward(q[None, 2:], q[None, 2:],
    ...                                                       q[None, 2:])[0][0]))
    True
    """
    xp, q, k, v, slopes, varlen = _prepare_varlen(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale=scale,
        causal=causal, window=window, softcap=softcap, alibi_slopes=alibi_slopes)
    dtype = np.float64 if upcast else q.dtype
    with _checks.on_device(_kind(xp), q):
        out = xp.zeros(q.shape, dtype)
        lse = xp.full((q.shape[1], varlen.total_q), -np.inf, dtype)
    for b, (q0, q1, k0, k1) in enumerate(varlen.items()):
        out_b, lse_b = attention_forward(
            q[None, q0:q1], k[None, k0:k1], v[None, k0:k1], scale=scale, causal=causal,
            window=window, softcap=softcap, alibi_slopes=None if slopes is None else slopes[b],
            upcast=upcast)
        out[q0:q1], lse[:, q0:q1] = out_b[0], lse_b[0]
    return out, lse


def attention_varlen_backward(dout, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                              max_seqlen_k, *, scale=None, causal=False, window=(None, None),
                              softcap=0.0, alibi_slopes=None, upcast=True):
    """Reference varlen attention gradients: :func:`attention_backward` on each sequence.

    Parameters
    ----------
    dout : array (total_q, nheads, headdim), gradient of ``out``
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, causal, window,
    softcap, alibi_slopes, upcast
        As in :func:`attention_varlen_forward`.

    Returns
    -------
    dq : array (total_q, nheads, headdim)
    dk, dv : arrays (total_k, nheads_kv, headdim)
        float64 with ``upcast=True``, else the input dtype.

    Examples
    --------
    >>> import numpy as np
    >>> from cuflash import reference
    >>> cu = np.array([0, 2, 6], np.int32)
    >>> q = np.random.randn(6, 2, 8)
    >>> dq, dk, dv = reference.attention_varlen_backward(np.ones_like(q), q, q, q, cu, cu, 4, 4)
    >>> dq.shape
    (6, 2, 8)
    """
    xp, q, k, v, slopes, varlen = _prepare_varlen(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale=scale,
        causal=causal, window=window, softcap=softcap, alibi_slopes=alibi_slopes)
    dout = _to(xp, dout)
    if dout.shape != q.shape:
        raise ValueError(f"dout must have the shape of q {q.shape}, got {dout.shape}")
    dtype = np.float64 if upcast else q.dtype
    with _checks.on_device(_kind(xp), q):
        dq, dk, dv = (xp.zeros(x.shape, dtype) for x in (q, k, v))
    for b, (q0, q1, k0, k1) in enumerate(varlen.items()):
        grads = attention_backward(
            dout[None, q0:q1], q[None, q0:q1], k[None, k0:k1], v[None, k0:k1], scale=scale,
            causal=causal, window=window, softcap=softcap,
            alibi_slopes=None if slopes is None else slopes[b], upcast=upcast)
        dq[q0:q1], dk[k0:k1], dv[k0:k1] = (g[0] for g in grads)
    return dq, dk, dv


def _prepare_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                    alibi_slopes, **options):
    """The array module, q, k, v in it, validated as the public API does (options too,
    whatever the batch); the slopes as (batch, nheads) or None; the prefix sums, on the
    host."""
    xp = _module(q)
    q, k, v = (_to(xp, x) for x in (q, k, v))
    shape, varlen = _checks.check_varlen(q, k, v, _host(cu_seqlens_q), _host(cu_seqlens_k),
                                         max_seqlen_q, max_seqlen_k, gpu=False)
    opts = _checks.options(shape, _kind(xp), q, alibi_slopes=_to(xp, alibi_slopes), **options)
    return xp, q, k, v, opts.alibi_slopes, varlen


def _module(q):
    """CuPy for a CuPy q (the reference runs on its GPU), NumPy for anything else."""
    if type(q).__module__.startswith("cupy"):
        return _checks._cupy()
    return np


def _kind(xp):
    return "numpy" if xp is np else "cupy"


def _to(xp, x):
    """``x`` as an array of ``xp`` (None stays None)."""
    if xp is np or x is None:
        return _host(x)
    return xp.asarray(x)


def _host(x):
    """A NumPy array from a NumPy or CuPy array (None stays None)."""
    if x is None or isinstance(x, np.ndarray):
        return x
    return x.get() if hasattr(x, "get") else np.asarray(x)


def _prepare(q, k, v, scale, causal, window, softcap, alibi_slopes):
    xp = _module(q)
    q, k, v = (_to(xp, x) for x in (q, k, v))
    shape = _checks.check_qkv(q, k, v, gpu=False)
    opts = _checks.options(shape, _kind(xp), q, scale=scale, causal=causal, window=window,
                           softcap=softcap, alibi_slopes=_to(xp, alibi_slopes))
    return xp, q, k, v, shape, opts


def _rounding(xp, dtype, upcast):
    """float64 -> float64: the identity, or (``upcast=False``) rounding to the nearest
    value of ``dtype``, ties to even, as ``x.astype(dtype).astype(float64)`` would, by
    float64 arithmetic alone (CuPy runs it as it is)."""
    if upcast or dtype == np.float64:
        return lambda x: x
    info = ml_dtypes.finfo(dtype)

    def rnd(x):
        # |x| in [2**(e - 1), 2**e): the dtype's spacing there is 2**(e - 1 - nmant), and
        # never below its subnormals' 2**(minexp - nmant). In place where it can be: the
        # score matrices are the largest arrays of a test.
        e = xp.frexp(x)[1]
        xp.maximum(e, info.minexp + 1, out=e)
        e -= 1 + info.nmant
        y = xp.ldexp(x, -e)
        xp.rint(y, out=y)
        xp.ldexp(y, e, out=y)
        overflow = xp.abs(y) > float(info.max)
        if overflow.any():
            y[overflow] = xp.copysign(np.inf, x[overflow])
        return y
    return rnd


def _forward(xp, q, k, v, shape, opts, rnd):
    """out (b, sq, h, d), lse (b, h, sq) and what backward needs, all float64 arrays of
    ``xp``.

    Scores and probabilities are laid out (batch, nheads, seqlen_q, seqlen_k), and so are the
    float64 q, k, v handed to backward (heads first, so that products are batched matmuls);
    k and v are repeated over the query heads of their group.
    """
    group = shape.nheads // shape.nheads_kv
    qf = _heads_first(q.astype(np.float64))
    kf, vf = (_heads_first(xp.repeat(x.astype(np.float64), group, axis=2)) for x in (k, v))
    s = rnd(opts.scale * (qf @ kf.swapaxes(-1, -2)))
    tanh = None
    if opts.softcap:
        tanh = xp.tanh(s / opts.softcap)
        s = rnd(opts.softcap * tanh)
    # diag[i, j] = i + seqlen_k - seqlen_q - j: signed distance from the bottom-right diagonal
    diag = (xp.arange(shape.seqlen_q)[:, None] + shape.seqlen_k - shape.seqlen_q
            - xp.arange(shape.seqlen_k)[None, :])
    if opts.alibi_slopes is not None:
        slopes = opts.alibi_slopes.astype(np.float64)[:, :, None, None]
        s = rnd(s - slopes * xp.abs(diag))
    visible = xp.ones(diag.shape, bool)
    if opts.window_left >= 0:
        visible &= diag <= opts.window_left
    if opts.window_right >= 0:
        visible &= -diag <= opts.window_right
    s = xp.where(visible, s, -np.inf)

    if shape.seqlen_k:
        m = s.max(-1, keepdims=True)  # NaN if the row sees a NaN score
        m = xp.where(xp.isfinite(m), m, 0.0)  # a fully masked row: exp(-inf - 0) = 0, not NaN
    else:
        m = xp.zeros(s.shape[:-1] + (1,))
    s -= m
    e = xp.exp(s, out=s)  # in the scores' memory, their last use
    l = e.sum(-1, keepdims=True)
    seen = l != 0  # NaN (a NaN score) counts as seen
    l_safe = xp.where(seen, l, 1.0)
    e /= l_safe
    p = rnd(e)
    lse = xp.where(seen, m + xp.log(l_safe), -np.inf)[..., 0]
    # Only values the row sees reach it (p @ vf alone would spread a NaN value to every
    # row, 0 * NaN = NaN); a row that sees a NaN (score, so l, or value) is NaN in all of
    # its out and in its lse (docs/CONVENTIONS.md).
    v_nan = xp.isnan(vf).any(-1)  # (b, h, sk)
    nan = xp.isnan(l[..., 0]) | (visible & v_nan[:, :, None, :]).any(-1)  # (b, h, sq)
    out = _heads_first(p @ xp.where(xp.isnan(vf), 0.0, vf))
    out = rnd(xp.where(_heads_first(nan)[..., None], np.nan, out))
    lse = xp.where(nan, np.nan, lse)
    return out, rnd(lse), (p, tanh, qf, kf, vf)


def _heads_first(x):
    """(b, s, h, d) <-> (b, h, s, d); a view, its own inverse."""
    return x.swapaxes(1, 2)


def _sum_groups(x, shape):
    """(b, s, nheads, d) -> (b, s, nheads_kv, d): sum over the query heads of a kv head."""
    b, s, _, d = x.shape
    return x.reshape(b, s, shape.nheads_kv, shape.nheads // shape.nheads_kv, d).sum(3)


def attention_with_kvcache(q, k_cache, v_cache, *, k=None, v=None, cache_seqlens,
                           block_table=None, scale=None, causal=False, window=(None, None),
                           softcap=0.0, alibi_slopes=None, upcast=True):
    """Reference for :func:`cuflash.attention_with_kvcache`, leaving the caches untouched.

    Batch item ``b`` attends, by :func:`attention_forward`, over the first
    ``cache_seqlens[b]`` keys of its cache (read through ``block_table`` when paged)
    followed by ``k[b]``, ``v[b]``.

    Parameters
    ----------
    q, k_cache, v_cache, k, v, cache_seqlens, block_table
        As in :func:`cuflash.attention_with_kvcache` (NumPy or CuPy; copied to the host).
    scale, causal, window, softcap, alibi_slopes, upcast
        As in :func:`attention_forward`.

    Returns
    -------
    out : array (batch, seqlen_q, nheads, headdim)
    lse : array (batch, nheads, seqlen_q)
        float64 with ``upcast=True``, else the input dtype.

    Examples
    --------
    >>> import numpy as np
    >>> from cuflash import reference
    >>> cache = np.random.randn(2, 8, 1, 16)
    >>> q = np.random.randn(2, 1, 2, 16)
    >>> out, lse = reference.attention_with_kvcache(q, cache, cache, cache_seqlens=5)
    >>> bool(np.allclose(out[:1], reference.attention_forward(q[:1], cache[:1, :5],
    ...                                                       cache[:1, :5])[0]))
    True
    """
    from . import kvcache
    q, k_cache, v_cache, k, v, block_table, slopes = (
        _host(x) for x in (q, k_cache, v_cache, k, v, block_table, alibi_slopes))
    if not kvcache._is_int(cache_seqlens):
        cache_seqlens = _host(cache_seqlens)
    cache = kvcache.check_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, block_table,
                                  gpu=False)
    kvcache.check_cache_values(cache_seqlens, block_table, cache)
    shape = cache.shape
    lengths = np.broadcast_to(np.asarray(cache_seqlens, np.int64), (shape.batch,))
    if slopes is not None and slopes.ndim == 1:
        slopes = np.broadcast_to(slopes, (shape.batch, shape.nheads))
    outs, lses = [], []
    for b in range(shape.batch):
        keys = np.arange(lengths[b])
        if block_table is None:
            k_b, v_b = k_cache[b, keys], v_cache[b, keys]
        else:
            page, row = block_table[b, keys // cache.page_size], keys % cache.page_size
            k_b, v_b = k_cache[page, row], v_cache[page, row]
        if k is not None:
            k_b, v_b = np.concatenate([k_b, k[b]]), np.concatenate([v_b, v[b]])
        out, lse = attention_forward(
            q[b:b + 1], k_b[None], v_b[None], scale=scale, causal=causal, window=window,
            softcap=softcap, alibi_slopes=None if slopes is None else slopes[b:b + 1],
            upcast=upcast)
        outs.append(out)
        lses.append(lse)
    dtype = np.float64 if upcast else q.dtype
    if not outs:
        return (np.zeros(q.shape, dtype),
                np.full((0, shape.nheads, shape.seqlen_q), -np.inf, dtype))
    return np.concatenate(outs), np.concatenate(lses)
