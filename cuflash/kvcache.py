"""Attention over a KV cache (decoding), with the new keys appended in place.

The GPU path (fp16 / bf16) is split-KV "flash-decoding" (kernels_cu/flash_decode.cu): the
query heads that share a kv head are packed into one tile, the keys are split across
CTAs so that even one query fills the GPU, and the splits are merged by their LSE.
float32 on the GPU and NumPy arrays take a simple path instead: each batch item's valid
keys are gathered and the dense forward runs on them.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from . import _checks, _core, cpu, ops
from ._api import (CALLS, MISS, Array, Lengths, OnDevice, OutLse, Window, contiguous_strides,
                   into, meta, remember)

# Pages hold a multiple of the GPU kernel's 16-key tiles, so that no tile straddles two
# pages; every backend enforces it, so that a call valid on one is valid on all.
PAGE_MULTIPLE = 16


@dataclass(frozen=True)
class CacheShape:
    """A validated kvcache call. ``shape.seqlen_k`` is the capacity of one batch item's
    cache (``seqlen_cache``, or ``max_blocks * page_size``): no batch item attends over more
    keys. ``page_size`` is 0 for contiguous caches."""
    shape: _checks.Shape
    seqlen_new: int
    page_size: int
    num_blocks: int


def attention_with_kvcache(q: Array, k_cache: Array, v_cache: Array, *,
                           k: Array | None = None, v: Array | None = None,
                           cache_seqlens: Lengths, block_table: Array | None = None,
                           num_splits: int | None = None, scale: float | None = None,
                           causal: bool = False, window: Window = (None, None),
                           softcap: float = 0.0, alibi_slopes: Array | None = None,
                           return_lse: bool = False, out: Array | None = None,
                           lse: Array | None = None) -> Array | OutLse:
    """Attention of a few new queries over a KV cache, appending new keys and values first.

    Batch item ``b`` attends over ``seqlen_k[b] = cache_seqlens[b] + seqlen_new`` keys: the
    first ``cache_seqlens[b]`` rows of its cache, then the ``seqlen_new`` rows of ``k``, ``v``,
    which are written into the cache (in place) at rows ``cache_seqlens[b] ...`` before
    attending. Masks, ALiBi and the default scale follow :func:`attention` with that
    ``seqlen_k`` per batch item (bottom-right aligned: the last query sees every key).

    Parameters
    ----------
    q : array (batch, seqlen_q, nheads, headdim)
        A few queries per batch item (1 when decoding, a few for speculative decoding).
    k_cache, v_cache : arrays, dtype of ``q``, updated in place when ``k``, ``v`` are given
        Contiguous: (batch, seqlen_cache, nheads_kv, headdim). Paged (with
        ``block_table``): (num_blocks, page_size, nheads_kv, headdim), ``page_size`` a
        multiple of 16. ``nheads % nheads_kv == 0``.
    k, v : arrays (batch, seqlen_new, nheads_kv, headdim), optional
        New keys and values, given together.
    cache_seqlens : int32 array (batch,), or int
        Keys already in each batch item's cache. ``cache_seqlens + seqlen_new`` must not
        exceed the capacity (``seqlen_cache``, or ``max_blocks * page_size``). NumPy
        inputs are checked; on the GPU, checking would cost a device synchronisation, so
        out-of-range values are clamped into the cache instead (the result is then
        meaningless, but no memory outside the caches is touched).
    block_table : int32 array (batch, max_blocks), optional
        Pages of each batch item's cache, in key order: key ``j`` of batch item ``b`` lives
        in page ``block_table[b, j // page_size]`` at row ``j % page_size``. Entries must lie
        in ``[0, num_blocks)`` (checked for NumPy inputs only).
    num_splits : int in [1, 128], optional
        GPU: how many CTAs share one (batch item, kv head)'s keys; default from the SM count
        and the cache length. Results do not depend on it beyond rounding. Ignored on the
        CPU.
    {options}
    return_lse : bool, default False
        Also return the float32 log-sum-exp, shape (batch, nheads, seqlen_q).
    out, lse : arrays, optional
        Where to write the results (NumPy style): exactly the shape and dtype returned, of
        the inputs' kind and device, last axis contiguous (``lse`` C-contiguous), sharing
        no memory with the inputs. They are returned (``lse`` is filled even without
        ``return_lse``). With both given, a GPU decode step allocates only the splits'
        partial results (none with ``num_splits=1``; under CUDA graph capture they come
        from a scratch kept per stream).

    Returns
    -------
    out : array (batch, seqlen_q, nheads, headdim), dtype of ``q``, or ``(out, lse)``
        A query row that sees no key (``seqlen_k[b] == 0``, or masked) gets ``out = 0`` and
        ``lse = -inf``.

    Examples
    --------
    >>> import numpy as np, cuflash
    >>> k_cache = np.zeros((2, 64, 1, 32), np.float32)
    >>> v_cache = np.zeros((2, 64, 1, 32), np.float32)
    >>> q = np.random.randn(2, 1, 4, 32).astype(np.float32)
    >>> k = np.random.randn(2, 1, 1, 32).astype(np.float32)
    >>> lengths = np.array([5, 17], np.int32)
    >>> out = cuflash.attention_with_kvcache(q, k_cache, v_cache, k=k, v=k,
    ...                                      cache_seqlens=lengths)
    >>> out.shape, bool((k_cache[1, 17] == k[1, 0]).all())
    ((2, 1, 4, 32), True)
    """
    options = (num_splits, scale, causal, window, softcap)
    args = (q, k_cache, v_cache, alibi_slopes, block_table, cache_seqlens, k, v)
    try:
        seqlens_key = int if type(cache_seqlens) is int else meta(cache_seqlens)
        call = CALLS[("kv", *(meta(x) for x in args[:5]), seqlens_key, meta(k), meta(v),
                      meta(out), meta(lse), options)]
    except MISS:
        call, args = _kvcache_call(args, (out, lse), options)
    if not isinstance(return_lse, (bool, np.bool_)):
        raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")
    out, lse = call(args, (out, lse))
    return (out, lse) if return_lse else out


_NAMES = ("q", "k_cache", "v_cache", "alibi_slopes", "block_table", "cache_seqlens", "k", "v",
          "out", "lse")


def _kvcache_call(args, outputs, options):
    """Validate a kvcache call: (the function that runs it, its inputs as that function
    takes them). GPU calls of fp16 / bf16 are memoized."""
    num_splits, scale, causal, window, softcap = options
    kind, a = _prepare(dict(zip(_NAMES, args + outputs)))
    q, k_cache, v_cache, slopes, block_table, cache_seqlens, k, v, out, lse = \
        (a[n] for n in _NAMES)
    cache = check_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, block_table,
                          gpu=kind != "numpy")
    shape = cache.shape
    opts = _checks.options(shape, kind, q, scale=scale, causal=causal, window=window,
                           softcap=softcap, alibi_slopes=slopes)
    if num_splits is not None:
        if isinstance(num_splits, (bool, np.bool_)) or not isinstance(num_splits,
                                                                      (int, np.integer)):
            raise TypeError(f"num_splits must be None or an int, got {num_splits!r}")
        if not 1 <= num_splits <= ops.decode.MAX_SPLITS:
            raise ValueError(f"num_splits must lie in [1, {ops.decode.MAX_SPLITS}], got "
                             f"{num_splits}")
        num_splits = int(num_splits)
    lse_shape = (shape.batch, shape.nheads, shape.seqlen_q)
    _checks.check_output(out, "out", q.shape, q.dtype, kind, q)
    _checks.check_output(lse, "lse", lse_shape, np.float32, kind, q, contiguous=True)
    args = (q, k_cache, v_cache, opts.alibi_slopes, block_table, cache_seqlens, k, v)
    if kind == "numpy":
        check_cache_values(cache_seqlens, block_table, cache)
    empty = min(shape.batch, shape.seqlen_q, shape.nheads) == 0 or shape.seqlen_k == 0
    gpu_decode = kind != "numpy" and q.dtype != np.float32 and not empty
    if not gpu_decode:
        def run(args, outputs):
            _checked_call(cache, args, outputs)
            xp = np if kind == "numpy" else _checks._cupy()
            with _checks.on_device(kind, q):
                if kind == "numpy":
                    append_numpy(k_cache, v_cache, k, v, cache_seqlens, block_table, cache)
                elif k is not None:
                    ops.decode.append(_core.problem(q, k_cache, v_cache, shape, opts),
                                      _cache(cache, block_table, cache_seqlens, k, v), *args)
                if empty:
                    result = (xp.zeros(q.shape, q.dtype),
                              xp.full(lse_shape, -np.inf, np.float32))
                elif kind == "numpy":
                    result = forward_gathered(cpu.forward, np, q, k_cache, v_cache,
                                              cache_seqlens, block_table, cache, opts)
                else:  # float32 on the GPU: the dense kernel over each item's keys
                    seqlens = cache_seqlens if isinstance(cache_seqlens, int) else \
                        cache_seqlens.get()
                    result = forward_gathered(_gpu_forward, xp, q, k_cache, v_cache, seqlens,
                                              block_table, cache, opts)
            return into(result, outputs)
        return run, args
    out_strides = out.strides if out is not None else \
        contiguous_strides(q.shape, q.dtype.itemsize)
    launch = ops.decode.Launch(_core.problem(q, k_cache, v_cache, shape, opts),
                               _cache(cache, block_table, cache_seqlens, k, v), out_strides,
                               num_splits)
    written = (1, 2, 8, 9) if k is not None else (8, 9)  # the caches, out and lse
    call = OnDevice(launch, q.data.device_id,
                    lambda args, outputs: _checked_call(cache, args, outputs),
                    args + (out, lse), written)
    if slopes is None or slopes.dtype == np.float32:  # else converted: not the caller's
        seqlens_key = int if _is_int(cache_seqlens) else meta(cache_seqlens)
        remember(("kv", meta(q), meta(k_cache), meta(v_cache), meta(slopes), meta(block_table),
                  seqlens_key, meta(k), meta(v), meta(out), meta(lse), options), call)
    return call, args


def _checked_call(cache, args, outputs) -> None:
    """What a call must check again whatever its layout: that the arrays the append writes
    share no memory with each other, and the caller's outputs none with any array."""
    q, k_cache, v_cache, _, _, _, k, v = args
    if k is not None:
        _check_append_targets(k_cache, v_cache, k, v)
    if any(x is not None for x in outputs):
        _checks.check_disjoint(dict(zip(_NAMES[8:], outputs)),
                               {n: x for n, x in zip(_NAMES, args) if not _is_int(x)})


def _cache(cache: CacheShape, block_table, cache_seqlens, k, v) -> "ops.decode.Cache":
    """What the decode plans need of a validated kvcache call besides its Problem."""
    return ops.decode.Cache(cache.seqlen_new, cache.page_size, cache.num_blocks,
                            0 if block_table is None else block_table.strides[0],
                            _is_int(cache_seqlens),
                            (0, 0, 0) if k is None else k.strides,
                            (0, 0, 0) if v is None else v.strides)


def _gpu_forward(q, k, v, shape, opts):
    """The dense GPU forward of validated CuPy arrays (the float32 kvcache path)."""
    launch = ops.forward.Launch(_core.problem(q, k, v, shape, opts),
                                contiguous_strides(q.shape, q.dtype.itemsize),
                                (shape.batch, shape.nheads, shape.seqlen_q))
    return launch(q, k, v, opts.alibi_slopes)


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _prepare(arrays: dict):
    """Kind of the call, and its arrays as that backend takes them (DLPack -> CuPy,
    zero-copy, so that the caches are still updated in place). An int ``cache_seqlens``
    becomes a Python int; an array one is made contiguous (the kernels index it)."""
    seqlens = arrays["cache_seqlens"]
    if _is_int(seqlens):
        arrays = dict(arrays, cache_seqlens=int(seqlens))
    elif not (hasattr(seqlens, "dtype") or hasattr(seqlens, "__dlpack__")):
        raise TypeError(f"cache_seqlens must be an int or an int32 array of shape (batch,), "
                        f"got {type(seqlens).__name__}")
    kind, converted = _checks.intake(
        {n: x for n, x in arrays.items() if not _is_int(x)},
        ("k", "v", "block_table", "alibi_slopes", "out", "lse"))
    arrays = dict(arrays, **converted)
    if not _is_int(arrays["cache_seqlens"]):
        xp = np if kind == "numpy" else _checks._cupy()
        with _checks.on_device(kind, arrays["q"]):  # a copy, if any, on the inputs' device
            arrays["cache_seqlens"] = xp.ascontiguousarray(arrays["cache_seqlens"])
    return kind, arrays


def check_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, block_table, *, gpu: bool
                  ) -> CacheShape:
    """Shapes, dtypes and layouts of a kvcache call; returns its :class:`CacheShape`.

    ``cache_seqlens`` is an int or an array; its values (and the block table's) are
    checked separately, by :func:`check_cache_values`, where that is cheap. What depends on
    the arrays' addresses (the append's targets, the caller's outputs) is checked on every
    call, before anything is written (:func:`_checked_call`).
    """
    for name, x in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if x.ndim != 4:
            what = "(batch, seqlen_q, nheads, headdim)" if name == "q" else (
                "(batch, seqlen_cache, nheads_kv, headdim) or paged (num_blocks, "
                "page_size, nheads_kv, headdim)")
            raise ValueError(f"{name} must have 4 dimensions {what}, got shape "
                             f"{tuple(x.shape)}")
    _checks.check_dtype(q, "q", gpu=gpu)
    _checks.check_same_dtype(q, "q", {"k_cache": k_cache, "v_cache": v_cache, "k": k, "v": v},
                             "q, the caches and k, v must share one dtype")
    batch, seqlen_q, nheads, headdim = q.shape
    if tuple(v_cache.shape) != tuple(k_cache.shape):
        raise ValueError(f"v_cache has shape {tuple(v_cache.shape)} but k_cache has shape "
                         f"{tuple(k_cache.shape)}; the caches must share one shape")
    rows, slots, nheads_kv, cache_headdim = k_cache.shape
    if cache_headdim != headdim:
        raise ValueError(f"k_cache has headdim {cache_headdim} but q has headdim {headdim}")
    _checks.check_headdim(headdim)
    _checks.check_gqa(nheads, nheads_kv, "the caches' nheads_kv")

    if block_table is None:
        if rows != batch:
            raise ValueError(f"k_cache has batch {rows} but q has batch {batch}; pass "
                             f"block_table for a paged cache of shape (num_blocks, "
                             f"page_size, nheads_kv, headdim)")
        capacity, page_size = slots, 0
    else:
        if block_table.dtype != np.int32:
            raise TypeError(f"block_table must be int32, got {block_table.dtype}")
        if block_table.ndim != 2 or block_table.shape[0] != batch:
            raise ValueError(f"block_table must have shape (batch, max_blocks) with batch "
                             f"{batch}, got {tuple(block_table.shape)}")
        page_size = slots
        if page_size == 0 or page_size % PAGE_MULTIPLE:
            raise ValueError(f"page_size (k_cache.shape[1]) must be a positive multiple of "
                             f"{PAGE_MULTIPLE}, got {page_size}")
        _checks.check_last_axis_contiguous(block_table, "block_table")
        if rows == 0:  # every page index, clamped or not, would lie outside the caches
            raise ValueError("a paged cache needs at least one page: k_cache.shape[0] "
                             "(num_blocks) is 0")
        capacity = block_table.shape[1] * page_size

    seqlen_new = 0
    if (k is None) != (v is None):
        raise ValueError("k and v must be given together (or neither)")
    if k is not None:
        for name, x in (("k", k), ("v", v)):
            want = (batch, x.shape[1] if x.ndim == 4 else -1, nheads_kv, headdim)
            if x.ndim != 4 or tuple(x.shape) != want:
                raise ValueError(f"{name} must have shape (batch, seqlen_new, nheads_kv, "
                                 f"headdim) = ({batch}, seqlen_new, {nheads_kv}, "
                                 f"{headdim}), got {tuple(x.shape)}")
        if v.shape[1] != k.shape[1]:
            raise ValueError(f"v has {v.shape[1]} new rows but k has {k.shape[1]}")
        seqlen_new = k.shape[1]
        if seqlen_new > capacity:
            raise ValueError(f"{seqlen_new} new keys do not fit a cache of capacity "
                             f"{capacity}")

    if _is_int(cache_seqlens):
        _checks.check_cache_seqlen(cache_seqlens, seqlen_new, capacity)
    else:
        if cache_seqlens.dtype != np.int32:
            raise TypeError(f"cache_seqlens must be an int or an int32 array, got dtype "
                            f"{cache_seqlens.dtype}")
        if tuple(cache_seqlens.shape) != (batch,):
            raise ValueError(f"cache_seqlens must have shape (batch,) = ({batch},), got "
                             f"{tuple(cache_seqlens.shape)}")

    for name, x in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("k", k),
                    ("v", v)):
        if x is not None:
            _checks.check_last_axis_contiguous(x, name)
    shape = _checks.Shape(batch, seqlen_q, capacity, nheads, nheads_kv, headdim)
    return CacheShape(shape, seqlen_new, page_size, rows if block_table is not None else 0)


def _check_append_targets(k_cache, v_cache, k, v) -> None:
    """The caches can take the append whole: writable (NumPy's flag; CUDA arrays have
    none), and no two of k_cache, v_cache and k / v share memory, else keys would be
    overwritten by values (or the new rows by the append itself)."""
    for name, x in (("k_cache", k_cache), ("v_cache", v_cache)):
        if not getattr(getattr(x, "flags", None), "writeable", True):
            raise ValueError(f"{name} is read-only, but k, v are appended to it in place")
    pairs = [("k_cache", k_cache, "v_cache", v_cache)]
    pairs += [(new, x, cache, c) for new, x in (("k", k), ("v", v)) if x is not None
              for cache, c in (("k_cache", k_cache), ("v_cache", v_cache))]
    for a_name, a, b_name, b in pairs:
        if _checks.shares_memory(a, b):
            raise ValueError(f"{a_name} and {b_name} share memory, but k, v are appended "
                             f"to the caches in place; pass separate arrays")


def check_cache_values(cache_seqlens, block_table, cache: CacheShape) -> None:
    """The values of cache_seqlens and of the block-table entries in use (NumPy inputs)."""
    capacity = cache.shape.seqlen_k
    if not _is_int(cache_seqlens):
        lengths = np.asarray(cache_seqlens, np.int64)
        bad = (lengths < 0) | (lengths + cache.seqlen_new > capacity)
        if bad.any():
            b = int(np.argmax(bad))
            raise ValueError(f"cache_seqlens[{b}] = {lengths[b]}: cache_seqlens + "
                             f"seqlen_new ({cache.seqlen_new}) must lie in [0, {capacity}] "
                             f"(the cache's capacity)")
    if block_table is None:
        return
    lengths = np.broadcast_to(np.asarray(cache_seqlens, np.int64), (cache.shape.batch,))
    pages = -(-(lengths + cache.seqlen_new) // cache.page_size)
    used = np.arange(block_table.shape[1])[None, :] < pages[:, None]
    bad = used & ((block_table < 0) | (block_table >= cache.num_blocks))
    if bad.any():
        b, j = (int(x) for x in np.argwhere(bad)[0])
        raise ValueError(f"block_table[{b}, {j}] = {block_table[b, j]} is not a page of "
                         f"the cache: entries in use must lie in [0, {cache.num_blocks})")
    if cache.seqlen_new == 0:
        return
    # A page the append writes must be used once, by its batch item alone: pages only read
    # may be shared (a common prompt's pages, say), but a write into a shared page would
    # change another item's keys (or, used twice by one item, its own earlier keys).
    blocks = np.arange(block_table.shape[1])[None, :]
    written = (blocks >= lengths[:, None] // cache.page_size) & (blocks < pages[:, None])
    counts = np.bincount(block_table[used], minlength=cache.num_blocks)
    shared = written & (counts[np.where(used, block_table, 0)] > 1)
    if shared.any():
        b, j = (int(x) for x in np.argwhere(shared)[0])
        raise ValueError(f"block_table[{b}, {j}] = {block_table[b, j]}: the append writes "
                         f"page {block_table[b, j]}, which other entries in use also name; "
                         f"a page that k, v are appended to must belong to one batch item "
                         f"and appear once in its row")


def _key_rows(cache: CacheShape, b, length, block_table, xp):
    """Where batch item b's first ``length`` keys live: (page index, row) arrays. Pages are
    clamped into the cache as flash_decode's locate_key does: GPU block tables are not
    checked (NumPy ones are, so this changes nothing there), and CuPy would wrap an
    out-of-range index around instead."""
    pos = xp.arange(length)
    if block_table is None:
        return xp.full(length, b), pos
    pages = xp.clip(block_table[b][pos // cache.page_size], 0, cache.num_blocks - 1)
    return pages, pos % cache.page_size


def append_numpy(k_cache, v_cache, k, v, cache_seqlens, block_table, cache: CacheShape):
    """Write k, v into the caches at cache_seqlens (NumPy; in place)."""
    if k is None:
        return
    lengths = np.broadcast_to(np.asarray(cache_seqlens, np.int64), (cache.shape.batch,))
    for b in range(cache.shape.batch):
        start = int(lengths[b])
        pages, rows = _key_rows(cache, b, start + cache.seqlen_new, block_table, np)
        pages, rows = pages[start:], rows[start:]
        k_cache[pages, rows] = k[b]
        v_cache[pages, rows] = v[b]


def forward_gathered(forward, xp, q, k_cache, v_cache, cache_seqlens, block_table,
                     cache: CacheShape, opts):
    """Each batch item's valid keys gathered, then the dense ``forward`` on them.

    ``forward(q, k, v, shape, opts)`` is cpu.forward (``xp`` NumPy) or the GPU's (``xp``
    CuPy); ``cache_seqlens`` is an int or a host array; the caches already hold the new
    keys. Returns (out, lse).
    """
    shape = cache.shape
    lengths = np.broadcast_to(np.asarray(cache_seqlens, np.int64), (shape.batch,))
    out = xp.zeros(q.shape, q.dtype)
    lse = xp.full((shape.batch, shape.nheads, shape.seqlen_q), -np.inf, np.float32)
    for b in range(shape.batch):
        # Clamped as flash_decode's cache_length does: GPU values are not checked (NumPy
        # ones are, so this changes nothing there), and a negative or too large length would
        # reach the kernel as seqlen_k or index past the cache.
        length = min(max(int(lengths[b]), 0) + cache.seqlen_new, shape.seqlen_k)
        if length == 0:
            continue
        pages, rows = _key_rows(cache, b, length, block_table, xp)
        k_b, v_b = k_cache[pages, rows][None], v_cache[pages, rows][None]
        slopes = opts.alibi_slopes
        opts_b = dataclasses.replace(opts, alibi_slopes=None if slopes is None
                                     else slopes[b:b + 1])
        shape_b = dataclasses.replace(shape, batch=1, seqlen_k=length)
        out[b:b + 1], lse[b:b + 1] = forward(q[b:b + 1], k_b, v_b, shape_b, opts_b)
    return out, lse


if attention_with_kvcache.__doc__:  # None under python -OO
    from .attention import _OPTIONS_DOC
    attention_with_kvcache.__doc__ = attention_with_kvcache.__doc__.replace(
        "    {options}\n", _OPTIONS_DOC.lstrip("\n"))
