"""flash-attn 2 names over cuflash: port code written for flash-attn by changing one import.

::

    from flash_attn import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache
    # becomes
    from cuflash.flash_attn import (flash_attn_func, flash_attn_varlen_func,
                                    flash_attn_with_kvcache)

Every function here has the name, argument names, argument order, defaults and return
convention of its namesake in flash-attn 2 (``flash_attn/flash_attn_interface.py``) and
calls the matching cuflash function (the results are bitwise those of that function):

======================================  ================================================
flash-attn                              cuflash
======================================  ================================================
``flash_attn_func``                     :func:`cuflash.attention`
``flash_attn_qkvpacked_func``           :func:`cuflash.attention` on views of ``qkv``
``flash_attn_kvpacked_func``            :func:`cuflash.attention` on views of ``kv``
``flash_attn_varlen_func``              :func:`cuflash.attention_varlen`
``flash_attn_varlen_qkvpacked_func``    :func:`cuflash.attention_varlen` on views
``flash_attn_varlen_kvpacked_func``     :func:`cuflash.attention_varlen` on views
``flash_attn_with_kvcache``             :func:`cuflash.attention_with_kvcache`
======================================  ================================================

Arguments map as follows: ``softmax_scale`` is cuflash's ``scale``; ``window_size=(left,
right)`` is ``window``, a negative side (flash-attn's ``-1``) being unbounded (``None``);
``softcap`` and ``alibi_slopes`` are the same; ``num_splits=0`` (automatic) is
``num_splits=None``; ``return_softmax_lse`` is ``return_lse``. ``causal=True`` is the
same mask in both: since flash-attn 2.1 its causal mask is aligned to the bottom-right
corner of the (seqlen_q, seqlen_k) score matrix, as cuflash's is (the last query sees every
key), and, as in flash-attn, it overrides the right side of ``window_size`` with 0.

Differences from flash-attn:

- Forward only. flash-attn's functions are autograd functions; these return the forward
  result as plain arrays of the inputs' kind (NumPy in, NumPy out; CuPy in, CuPy out).
  Gradients come from :func:`cuflash.attention_backward` / :func:`cuflash.attention_vjp`
  (and the varlen backward), which take ``deterministic``; here ``deterministic`` is
  accepted and has no effect (flash-attn's forward is deterministic too).
- No dropout: ``dropout_p`` other than 0 raises ``ValueError``.
- ``return_attn_probs=True`` returns ``(out, softmax_lse, None)``: cuflash never
  materialises the attention matrix (flash-attn returns only an empty tensor there
  unless ``dropout_p > 0``).
- Not supported, raising ``NotImplementedError`` naming the argument when given:
  ``rotary_cos`` / ``rotary_sin`` (apply rotary embeddings before the call),
  ``cache_batch_idx`` and ``cache_leftpad`` of ``flash_attn_with_kvcache``, and
  ``block_table`` of ``flash_attn_varlen_func`` (paged caches are read by
  ``flash_attn_with_kvcache``).
- Paged caches need ``page_size`` a multiple of 16 (flash-attn: 256).
"""
from __future__ import annotations

from typing import Any, Optional, Tuple, Union

import numpy as np

from .attention import attention, attention_varlen
from .kvcache import attention_with_kvcache

__all__ = ["flash_attn_func", "flash_attn_qkvpacked_func", "flash_attn_kvpacked_func",
           "flash_attn_varlen_func", "flash_attn_varlen_qkvpacked_func",
           "flash_attn_varlen_kvpacked_func", "flash_attn_with_kvcache"]

#: A NumPy or CuPy array (or another framework's CUDA array, taken through DLPack).
Array = Any
#: ``out``, or ``(out, softmax_lse, None)`` with ``return_attn_probs=True``.
Result = Union[Array, Tuple[Array, Array, None]]


def _window(window_size) -> tuple:
    """flash-attn's (left, right), a negative side unbounded, as cuflash's window."""
    if not isinstance(window_size, (tuple, list)) or len(window_size) != 2:
        raise TypeError(f"window_size must be a (left, right) pair of ints, -1 for "
                        f"unbounded, got {window_size!r}")

    def side(value):
        if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)) \
                and value < 0:
            return None
        return value  # cuflash checks the rest

    return side(window_size[0]), side(window_size[1])


def _options(dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
             deterministic, return_attn_probs) -> dict:
    """Check what cuflash has no counterpart for; return cuflash's keyword options."""
    if dropout_p != 0:
        raise ValueError(f"dropout_p must be 0.0: cuflash has no dropout, got {dropout_p!r}")
    for name, flag in (("deterministic", deterministic),
                       ("return_attn_probs", return_attn_probs)):
        if not isinstance(flag, (bool, np.bool_)):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    left, right = _window(window_size)
    if causal is True or causal is np.True_:
        right = None  # flash-attn: causal sets the right side to 0, whatever it was
    return dict(scale=softmax_scale, causal=causal, window=(left, right), softcap=softcap,
                alibi_slopes=alibi_slopes)


def _unsupported(**arguments) -> None:
    for name, value in arguments.items():
        if value is not None:
            raise NotImplementedError(f"{name} is not supported by cuflash.flash_attn "
                                      f"(pass {name}=None)")


def _result(out, lse, return_attn_probs) -> Result:
    return (out, lse, None) if return_attn_probs else out


_ARGS_DOC = """
    dropout_p : float, default 0.0
        Must be 0.0: cuflash has no dropout (``ValueError`` otherwise).
    softmax_scale : float, optional
        Multiplies ``q @ k.T``; default ``headdim ** -0.5`` (cuflash's ``scale``).
    causal : bool, default False
        Causal mask aligned to the bottom-right corner, as in flash-attn >= 2.1: query
        ``i`` sees keys ``j <= i + seqlen_k - seqlen_q``.
    window_size : (int, int), default (-1, -1)
        Sliding window ``(left, right)``: query ``i`` sees keys ``j`` with
        ``i + seqlen_k - seqlen_q - left <= j <= i + seqlen_k - seqlen_q + right``; a
        negative side is unbounded. ``causal=True`` sets ``right`` to 0.
    softcap : float, default 0.0
        If > 0, scores become ``softcap * tanh(score / softcap)``.
    alibi_slopes : float32 array (nheads,) or (batch, nheads), optional
        Subtracts ``slope * |i + seqlen_k - seqlen_q - j|`` from the scores."""

_FLAGS_DOC = """
    deterministic : bool, default False
        Accepted for compatibility; the forward is deterministic. Pass it to
        ``cuflash.attention_backward`` for reproducible gradients.
    return_attn_probs : bool, default False
        Also return ``softmax_lse`` and ``None`` in place of the attention probabilities,
        which cuflash never materialises."""


def flash_attn_func(q: Array, k: Array, v: Array, dropout_p: float = 0.0,
                    softmax_scale: Optional[float] = None, causal: bool = False,
                    window_size: Tuple[int, int] = (-1, -1), softcap: float = 0.0,
                    alibi_slopes: Optional[Array] = None, deterministic: bool = False,
                    return_attn_probs: bool = False) -> Result:
    """flash-attn's ``flash_attn_func``: :func:`cuflash.attention` (forward only).

    Parameters
    ----------
    q : array (batch, seqlen_q, nheads, headdim)
    k, v : arrays (batch, seqlen_k, nheads_k, headdim), ``nheads % nheads_k == 0``
        float16, bfloat16 or float32 (float64 too on the CPU); last axis contiguous.
    {args}
    {flags}

    Returns
    -------
    out : array (batch, seqlen_q, nheads, headdim), dtype of ``q``
    softmax_lse : float32 array (batch, nheads, seqlen_q)
        With ``return_attn_probs=True`` only, as ``(out, softmax_lse, None)``.

    Examples
    --------
    >>> import numpy as np
    >>> from cuflash.flash_attn import flash_attn_func
    >>> q = np.random.randn(2, 17, 4, 64).astype(np.float32)
    >>> k = np.random.randn(2, 33, 1, 64).astype(np.float32)
    >>> flash_attn_func(q, k, k, causal=True, window_size=(8, -1)).shape
    (2, 17, 4, 64)
    >>> out, lse, probs = flash_attn_func(q, k, k, return_attn_probs=True)
    >>> lse.shape, probs is None
    ((2, 4, 17), True)
    """
    opts = _options(dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                    deterministic, return_attn_probs)
    out, lse = attention(q, k, v, **opts, return_lse=True)
    return _result(out, lse, return_attn_probs)


def flash_attn_qkvpacked_func(qkv: Array, dropout_p: float = 0.0,
                              softmax_scale: Optional[float] = None, causal: bool = False,
                              window_size: Tuple[int, int] = (-1, -1), softcap: float = 0.0,
                              alibi_slopes: Optional[Array] = None,
                              deterministic: bool = False,
                              return_attn_probs: bool = False) -> Result:
    """flash-attn's ``flash_attn_qkvpacked_func``: :func:`flash_attn_func` on
    ``qkv[:, :, 0]``, ``qkv[:, :, 1]``, ``qkv[:, :, 2]`` (views, nothing is copied).

    Parameters
    ----------
    qkv : array (batch, seqlen, 3, nheads, headdim), last axis contiguous
    {args}
    {flags}

    Returns
    -------
    out : array (batch, seqlen, nheads, headdim), or ``(out, softmax_lse, None)``

    Examples
    --------
    >>> import numpy as np
    >>> from cuflash.flash_attn import flash_attn_qkvpacked_func
    >>> qkv = np.random.randn(2, 17, 3, 4, 32).astype(np.float32)
    >>> flash_attn_qkvpacked_func(qkv, causal=True).shape
    (2, 17, 4, 32)
    """
    _check_packed(qkv, "qkv", 5, 3)
    return flash_attn_func(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], dropout_p, softmax_scale,
                           causal, window_size, softcap, alibi_slopes, deterministic,
                           return_attn_probs)


def flash_attn_kvpacked_func(q: Array, kv: Array, dropout_p: float = 0.0,
                             softmax_scale: Optional[float] = None, causal: bool = False,
                             window_size: Tuple[int, int] = (-1, -1), softcap: float = 0.0,
                             alibi_slopes: Optional[Array] = None, deterministic: bool = False,
                             return_attn_probs: bool = False) -> Result:
    """flash-attn's ``flash_attn_kvpacked_func``: :func:`flash_attn_func` on ``q``,
    ``kv[:, :, 0]``, ``kv[:, :, 1]`` (views, nothing is copied).

    Parameters
    ----------
    q : array (batch, seqlen_q, nheads, headdim)
    kv : array (batch, seqlen_k, 2, nheads_k, headdim), ``nheads % nheads_k == 0``
    {args}
    {flags}

    Returns
    -------
    out : array (batch, seqlen_q, nheads, headdim), or ``(out, softmax_lse, None)``

    Examples
    --------
    >>> import numpy as np
    >>> from cuflash.flash_attn import flash_attn_kvpacked_func
    >>> q = np.random.randn(1, 5, 4, 32).astype(np.float32)
    >>> kv = np.random.randn(1, 9, 2, 2, 32).astype(np.float32)
    >>> flash_attn_kvpacked_func(q, kv, causal=True).shape
    (1, 5, 4, 32)
    """
    _check_packed(kv, "kv", 5, 2)
    return flash_attn_func(q, kv[:, :, 0], kv[:, :, 1], dropout_p, softmax_scale, causal,
                           window_size, softcap, alibi_slopes, deterministic,
                           return_attn_probs)


_VARLEN_DOC = """
    cu_seqlens_q, cu_seqlens_k : int32 arrays (batch + 1,)
        Prefix sums of the sequence lengths: sequence ``b`` is rows
        ``cu_seqlens[b]:cu_seqlens[b + 1]``. Sequences of length 0 are allowed.
    max_seqlen_q, max_seqlen_k : int
        Upper bounds of the sequence lengths."""


def flash_attn_varlen_func(q: Array, k: Array, v: Array, cu_seqlens_q: Array,
                           cu_seqlens_k: Array, max_seqlen_q: int, max_seqlen_k: int,
                           dropout_p: float = 0.0, softmax_scale: Optional[float] = None,
                           causal: bool = False, window_size: Tuple[int, int] = (-1, -1),
                           softcap: float = 0.0, alibi_slopes: Optional[Array] = None,
                           deterministic: bool = False, return_attn_probs: bool = False,
                           block_table: Optional[Array] = None) -> Result:
    """flash-attn's ``flash_attn_varlen_func``: :func:`cuflash.attention_varlen` (forward
    only). Every option applies to each sequence with its own lengths.

    Parameters
    ----------
    q : array (total_q, nheads, headdim)
    k, v : arrays (total_k, nheads_k, headdim), ``nheads % nheads_k == 0``
    {varlen}
    {args}
    {flags}
    block_table : None
        Paged keys are not supported here (``NotImplementedError``); see
        :func:`flash_attn_with_kvcache`.

    Returns
    -------
    out : array (total_q, nheads, headdim), dtype of ``q``
    softmax_lse : float32 array (nheads, total_q)
        With ``return_attn_probs=True`` only, as ``(out, softmax_lse, None)``.

    Examples
    --------
    >>> import numpy as np
    >>> from cuflash.flash_attn import flash_attn_varlen_func
    >>> cu = np.array([0, 5, 5, 12], np.int32)  # lengths 5, 0, 7
    >>> q = np.random.randn(12, 4, 64).astype(np.float32)
    >>> k = np.random.randn(12, 2, 64).astype(np.float32)
    >>> out, lse, _ = flash_attn_varlen_func(q, k, k, cu, cu, 7, 7, causal=True,
    ...                                      return_attn_probs=True)
    >>> out.shape, lse.shape
    ((12, 4, 64), (4, 12))
    """
    _unsupported(block_table=block_table)
    opts = _options(dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                    deterministic, return_attn_probs)
    out, lse = attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                max_seqlen_k, **opts, return_lse=True)
    return _result(out, lse, return_attn_probs)


def flash_attn_varlen_qkvpacked_func(qkv: Array, cu_seqlens: Array, max_seqlen: int,
                                     dropout_p: float = 0.0,
                                     softmax_scale: Optional[float] = None,
                                     causal: bool = False,
                                     window_size: Tuple[int, int] = (-1, -1),
                                     softcap: float = 0.0, alibi_slopes: Optional[Array] = None,
                                     deterministic: bool = False,
                                     return_attn_probs: bool = False) -> Result:
    """flash-attn's ``flash_attn_varlen_qkvpacked_func``: :func:`flash_attn_varlen_func`
    on ``qkv[:, 0]``, ``qkv[:, 1]``, ``qkv[:, 2]`` (views) with the same prefix sums for
    queries and keys.

    Parameters
    ----------
    qkv : array (total, 3, nheads, headdim), last axis contiguous
    cu_seqlens : int32 array (batch + 1,)
        Prefix sums of the sequence lengths (queries and keys alike).
    max_seqlen : int
    {args}
    {flags}

    Returns
    -------
    out : array (total, nheads, headdim), or ``(out, softmax_lse, None)``

    Examples
    --------
    >>> import numpy as np
    >>> from cuflash.flash_attn import flash_attn_varlen_qkvpacked_func
    >>> cu = np.array([0, 1, 18], np.int32)  # lengths 1, 17
    >>> qkv = np.random.randn(18, 3, 2, 32).astype(np.float32)
    >>> flash_attn_varlen_qkvpacked_func(qkv, cu, 17, causal=True).shape
    (18, 2, 32)
    """
    _check_packed(qkv, "qkv", 4, 3)
    return flash_attn_varlen_func(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu_seqlens, cu_seqlens,
                                  max_seqlen, max_seqlen, dropout_p, softmax_scale, causal,
                                  window_size, softcap, alibi_slopes, deterministic,
                                  return_attn_probs)


def flash_attn_varlen_kvpacked_func(q: Array, kv: Array, cu_seqlens_q: Array,
                                    cu_seqlens_k: Array, max_seqlen_q: int, max_seqlen_k: int,
                                    dropout_p: float = 0.0,
                                    softmax_scale: Optional[float] = None,
                                    causal: bool = False,
                                    window_size: Tuple[int, int] = (-1, -1),
                                    softcap: float = 0.0, alibi_slopes: Optional[Array] = None,
                                    deterministic: bool = False,
                                    return_attn_probs: bool = False) -> Result:
    """flash-attn's ``flash_attn_varlen_kvpacked_func``: :func:`flash_attn_varlen_func` on
    ``q``, ``kv[:, 0]``, ``kv[:, 1]`` (views, nothing is copied).

    Parameters
    ----------
    q : array (total_q, nheads, headdim)
    kv : array (total_k, 2, nheads_k, headdim), ``nheads % nheads_k == 0``
    {varlen}
    {args}
    {flags}

    Returns
    -------
    out : array (total_q, nheads, headdim), or ``(out, softmax_lse, None)``

    Examples
    --------
    >>> import numpy as np
    >>> from cuflash.flash_attn import flash_attn_varlen_kvpacked_func
    >>> cu_q, cu_k = np.array([0, 1, 3], np.int32), np.array([0, 9, 20], np.int32)
    >>> q = np.random.randn(3, 4, 32).astype(np.float32)
    >>> kv = np.random.randn(20, 2, 1, 32).astype(np.float32)
    >>> flash_attn_varlen_kvpacked_func(q, kv, cu_q, cu_k, 2, 11, causal=True).shape
    (3, 4, 32)
    """
    _check_packed(kv, "kv", 4, 2)
    return flash_attn_varlen_func(q, kv[:, 0], kv[:, 1], cu_seqlens_q, cu_seqlens_k,
                                  max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal,
                                  window_size, softcap, alibi_slopes, deterministic,
                                  return_attn_probs)


def flash_attn_with_kvcache(q: Array, k_cache: Array, v_cache: Array, k: Optional[Array] = None,
                            v: Optional[Array] = None, rotary_cos: Optional[Array] = None,
                            rotary_sin: Optional[Array] = None,
                            cache_seqlens: Optional[Union[int, Array]] = None,
                            cache_batch_idx: Optional[Array] = None,
                            cache_leftpad: Optional[Array] = None,
                            block_table: Optional[Array] = None,
                            softmax_scale: Optional[float] = None, causal: bool = False,
                            window_size: Tuple[int, int] = (-1, -1), softcap: float = 0.0,
                            rotary_interleaved: bool = True,
                            alibi_slopes: Optional[Array] = None, num_splits: int = 0,
                            return_softmax_lse: bool = False
                            ) -> Union[Array, Tuple[Array, Array]]:
    """flash-attn's ``flash_attn_with_kvcache``: :func:`cuflash.attention_with_kvcache`.

    If ``k`` and ``v`` are given they are first written into the caches in place at rows
    ``cache_seqlens[b] ...`` of each batch item; batch item ``b`` then attends over
    ``cache_seqlens[b] + seqlen_new`` keys, masks aligned bottom-right.

    Parameters
    ----------
    q : array (batch, seqlen_q, nheads, headdim)
    k_cache, v_cache : arrays, dtype of ``q``, updated in place when ``k``, ``v`` are given
        (batch, seqlen_cache, nheads_k, headdim), or with ``block_table`` (paged)
        (num_blocks, page_block_size, nheads_k, headdim), ``page_block_size`` a multiple of
        16.
    k, v : arrays (batch, seqlen_new, nheads_k, headdim), optional
    rotary_cos, rotary_sin : None
        Rotary embeddings are not supported (``NotImplementedError``): rotate ``q`` and
        ``k`` before the call.
    cache_seqlens : int or int32 array (batch,), optional
        Keys already in each cache. ``None`` (flash-attn's default) means every cache is
        full: ``seqlen_cache`` keys, or ``max_blocks * page_block_size`` when paged (then
        ``k``, ``v`` cannot be appended).
    cache_batch_idx, cache_leftpad : None
        Not supported (``NotImplementedError``).
    block_table : int32 array (batch, max_blocks), optional
        Pages of each batch item's cache: key ``j`` is row ``j % page_block_size`` of page
        ``block_table[b, j // page_block_size]``.
    softmax_scale, causal, window_size, softcap, alibi_slopes
        As in :func:`flash_attn_func`.
    rotary_interleaved : bool, default True
        Accepted for compatibility; no effect without rotary embeddings.
    num_splits : int, default 0
        0: automatic (cuflash's ``num_splits=None``); else 1..128 splits of the keys on the
        GPU (ignored on the CPU).
    return_softmax_lse : bool, default False
        Also return ``softmax_lse``, float32 (batch, nheads, seqlen_q).

    Returns
    -------
    out : array (batch, seqlen_q, nheads, headdim), or ``(out, softmax_lse)``

    Examples
    --------
    >>> import numpy as np
    >>> from cuflash.flash_attn import flash_attn_with_kvcache
    >>> k_cache = np.zeros((2, 64, 1, 32), np.float32)
    >>> v_cache = np.zeros((2, 64, 1, 32), np.float32)
    >>> q = np.random.randn(2, 1, 4, 32).astype(np.float32)
    >>> k = np.random.randn(2, 1, 1, 32).astype(np.float32)
    >>> seqlens = np.array([5, 17], np.int32)
    >>> out, lse = flash_attn_with_kvcache(q, k_cache, v_cache, k, k, cache_seqlens=seqlens,
    ...                                    causal=True, return_softmax_lse=True)
    >>> out.shape, lse.shape, bool((k_cache[1, 17] == k[1, 0]).all())
    ((2, 1, 4, 32), (2, 4, 1), True)
    """
    _unsupported(rotary_cos=rotary_cos, rotary_sin=rotary_sin,
                 cache_batch_idx=cache_batch_idx, cache_leftpad=cache_leftpad)
    if not isinstance(rotary_interleaved, (bool, np.bool_)):
        raise TypeError(f"rotary_interleaved must be a bool, got "
                        f"{type(rotary_interleaved).__name__}")
    opts = _options(0.0, softmax_scale, causal, window_size, softcap, alibi_slopes, False,
                    False)
    if cache_seqlens is None:
        if block_table is None:
            cache_seqlens = int(k_cache.shape[1])
        else:
            cache_seqlens = int(block_table.shape[1]) * int(k_cache.shape[1])
    if isinstance(num_splits, (int, np.integer)) and not isinstance(num_splits, (bool, np.bool_)) \
            and num_splits == 0:
        num_splits = None
    return attention_with_kvcache(q, k_cache, v_cache, k=k, v=v, cache_seqlens=cache_seqlens,
                                  block_table=block_table, num_splits=num_splits,
                                  return_lse=return_softmax_lse, **opts)


def _check_packed(x, name: str, ndim: int, count: int) -> None:
    shape = getattr(x, "shape", None)
    if shape is None or len(shape) != ndim or shape[ndim - 3] != count:
        axes = ("(batch, seqlen, " if ndim == 5 else "(total, ") + f"{count}, nheads, headdim)"
        raise ValueError(f"{name} must have shape {axes}, got "
                         f"{None if shape is None else tuple(shape)}")


for _f in (flash_attn_func, flash_attn_qkvpacked_func, flash_attn_kvpacked_func,
           flash_attn_varlen_func, flash_attn_varlen_qkvpacked_func,
           flash_attn_varlen_kvpacked_func):
    _f.__doc__ = _f.__doc__.format(args=_ARGS_DOC.strip("\n")[4:], flags=_FLAGS_DOC.strip(
        "\n")[4:], varlen=_VARLEN_DOC.strip("\n")[4:])
del _f
