"""Merging attention computed over disjoint key sets (split-KV, cascade and ring attention).

If ``out_s, lse_s`` is attention of the same queries over key set ``K_s``, attention over
the union of the ``K_s`` is

    lse = log sum_s exp(lse_s),    out = sum_s exp(lse_s - lse) * out_s

since ``exp(lse_s)`` is part s's softmax denominator. On the GPU this is the kernel that
also combines the splits of :func:`cuflash.attention_with_kvcache`.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from . import _checks, cpu, ops
from ._api import Array, OutLse, fill, into


def merge_attention(outs: Array | Sequence[Array], lses: Array | Sequence[Array], *,
                    out: Array | None = None, lse: Array | None = None) -> OutLse:
    """Combine attention over disjoint key sets into attention over their union.

    ``lse = logsumexp_s lse_s`` and ``out = sum_s exp(lse_s - lse) * out_s``, accumulated in
    float32 (float64 for float64 parts on the CPU). A part with ``lse_s = -inf`` (it saw no
    key) contributes nothing, whatever its ``out_s`` holds; a row that is ``-inf`` in every
    part gets ``out = 0`` and ``lse = -inf``.

    Parameters
    ----------
    outs : sequence of arrays (batch, seqlen_q, nheads, headdim), or one array
           (num_parts, batch, seqlen_q, nheads, headdim)
        The parts' outputs, one dtype (float16, bfloat16, float32; float64 too on the CPU),
        last axis contiguous. A sequence is stacked first (one copy); pass a stacked array
        to avoid it.
    lses : sequence of float32 arrays (batch, nheads, seqlen_q), or one float32 array
           (num_parts, batch, nheads, seqlen_q)
        The parts' natural-log log-sum-exps, as :func:`attention_forward` returns them.

    out, lse : arrays, optional
        Where to write the results (NumPy style): exactly the shape and dtype returned, of
        the parts' kind and device, last axis contiguous (``lse`` C-contiguous), sharing no
        memory with the parts. They are returned.

    Returns
    -------
    out : array (batch, seqlen_q, nheads, headdim), dtype of ``outs``
    lse : float32 array (batch, nheads, seqlen_q)

    Examples
    --------
    >>> import numpy as np, cuflash
    >>> q = np.random.randn(1, 3, 2, 16).astype(np.float32)
    >>> k = np.random.randn(1, 40, 2, 16).astype(np.float32)
    >>> first = cuflash.attention_forward(q, k[:, :25], k[:, :25])
    >>> second = cuflash.attention_forward(q, k[:, 25:], k[:, 25:])
    >>> out, lse = cuflash.merge_attention([first[0], second[0]], [first[1], second[1]])
    >>> bool(np.allclose(out, cuflash.attention(q, k, k), atol=1e-5))
    True
    """
    parts = _as_list(outs, "outs", 5)
    part_lses = _as_list(lses, "lses", 4)
    kind = _checks.same_kind(_named(parts, part_lses), optional=())
    if kind == "dlpack":  # zero-copy CuPy views of the same memory
        outs, lses = _from_dlpack(outs), _from_dlpack(lses)
        parts, part_lses = _as_list(outs, "outs", 5), _as_list(lses, "lses", 4)
        kind = _checks.same_kind(_named(parts, part_lses), optional=())  # CuPy: one device
    _check(parts, part_lses, gpu=kind != "numpy")

    first = parts[0]
    batch, seqlen_q, nheads, _ = first.shape
    lse_shape = (batch, nheads, seqlen_q)
    given = {n: x if x is None or kind == "numpy" or _checks.array_kind(x, n) != "dlpack"
             else _from_dlpack(x) for n, x in (("out", out), ("lse", lse))}
    _checks.check_output(given["out"], "out", first.shape, first.dtype, kind, first)
    _checks.check_output(given["lse"], "lse", lse_shape, np.float32, kind, first,
                         contiguous=True)
    _checks.check_disjoint(given, _named(parts, part_lses))
    xp = np if kind == "numpy" else _checks._cupy()
    with _checks.on_device(kind, first):  # stacking, empty outputs and the launch allocate
        parts, part_lses = _stacked(outs, xp), _stacked(lses, xp)
        outputs = (given["out"], given["lse"])
        if batch * seqlen_q * nheads == 0:
            return fill([(first.shape, first.dtype, xp), (lse_shape, np.float32, xp)],
                         outputs, (0, -np.inf))
        if kind == "numpy":
            return into(cpu.merge(parts, part_lses), outputs)
        import cupy
        out, lse = (cupy.empty(first.shape, first.dtype) if outputs[0] is None else outputs[0],
                    cupy.empty(lse_shape, np.float32) if outputs[1] is None else outputs[1])
        launch = ops.merge.plan(first.data.device_id, parts.dtype, parts.shape, parts.strides,
                                part_lses.strides, out.strides)
        launch(cupy.cuda.get_current_stream().ptr, parts.data.ptr, part_lses.data.ptr,
               out.data.ptr, lse.data.ptr)
        return out, lse


def _named(parts, part_lses) -> dict:
    named = {f"outs[{s}]": x for s, x in enumerate(parts)}
    named.update({f"lses[{s}]": x for s, x in enumerate(part_lses)})
    return named


def _as_list(x, name, stacked_ndim):
    """The parts of ``x`` (a sequence, or an array stacked along axis 0) as a list."""
    if isinstance(x, (list, tuple)):
        if not x:
            raise ValueError(f"{name} must hold at least one part")
        return list(x)
    _checks.array_kind(x, name)
    if x.ndim != stacked_ndim:
        raise ValueError(f"{name} as one array must be stacked along a leading parts axis "
                         f"({stacked_ndim} dimensions), got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} must hold at least one part")
    return [x[s] for s in range(x.shape[0])]


def _check(parts, part_lses, *, gpu: bool) -> None:
    if len(parts) != len(part_lses):
        raise ValueError(f"outs has {len(parts)} parts but lses has {len(part_lses)}")
    first = parts[0]
    if first.ndim != 4:
        raise ValueError(f"outs[0] must have 4 dimensions (batch, seqlen_q, nheads, headdim), "
                         f"got shape {tuple(first.shape)}")
    _checks.check_dtype(first, "outs[0]", gpu=gpu)
    batch, seqlen_q, nheads, _ = first.shape
    for s, (x, lse) in enumerate(zip(parts, part_lses)):
        if tuple(x.shape) != tuple(first.shape):
            raise ValueError(f"outs[{s}] has shape {tuple(x.shape)} but outs[0] has shape "
                             f"{tuple(first.shape)}; every part must share one shape")
        _checks.check_same_dtype(first, "outs[0]", {f"outs[{s}]": x},
                                 "every part must share one dtype")
        _checks.check_last_axis_contiguous(x, f"outs[{s}]")
        if lse.dtype != np.float32:
            raise TypeError(f"lses[{s}] must be float32, got {lse.dtype}")
        if tuple(lse.shape) != (batch, nheads, seqlen_q):
            raise ValueError(f"lses[{s}] must have shape (batch, nheads, seqlen_q) = "
                             f"{(batch, nheads, seqlen_q)}, got {tuple(lse.shape)}")


def _from_dlpack(x):
    cupy = _checks._cupy()
    if isinstance(x, (list, tuple)):
        return [cupy.from_dlpack(p) for p in x]
    return cupy.from_dlpack(x)


def _stacked(x, xp):
    """One array with the parts along axis 0: ``x`` itself if it already is one."""
    if isinstance(x, (list, tuple)):
        return xp.stack([xp.asarray(p) for p in x])
    return x
