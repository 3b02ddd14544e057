"""Ring attention (context parallelism) on JAX's sharding: exact attention over a sequence
split across the devices of one mesh axis, used inside ``jax.shard_map``.

Import it as part of ``cuflash.jax`` (``fj.ring_attention``, ``fj.to_zigzag``...);
``import cuflash`` never imports JAX.

How it works (Liu et al., 2023, "Ring attention with blockwise transformers"):

- Each of the ``n`` devices of the mesh axis keeps its block of queries. The K/V blocks
  travel the ring (``jax.lax.ppermute``, device ``i`` to ``i + 1``), so at step ``t`` device
  ``r`` holds the K/V block of device ``r - t``. It attends its queries to that block with
  cuflash's kernels and merges the partial ``(out, lse)`` into a float32 accumulator by
  their log-sum-exp (the math of :func:`cuflash.jax.merge_attention`, done here in JAX
  elementwise ops so the accumulator stays float32 between steps).
- Overlap: at every step the ppermute that brings the next K/V block is staged *before*
  this step's attention, and neither depends on the other (both read only the current
  block), so XLA's scheduler can run the transfer (an async collective-permute, NCCL on a
  communication stream on GPUs) while the attention kernels run on the compute stream.
  The loop is a Python loop unrolled at trace time (``n`` is static), which leaves XLA a
  straight-line program to schedule, with no loop-carried buffer it must copy.
- No ``lax.cond``: which part of a block pair a device computes depends on the device
  (``axis_index``), a runtime value in an SPMD program, and an XLA conditional on the GPU
  copies its predicate to the host and waits for it (outside CUDA graphs). Instead every
  call is a varlen call
  (:func:`cuflash.jax.attention_varlen`'s kernels) whose ``cu_seqlens`` are read from a
  static per-device table at ``axis_index``: one "sequence" pairs the query rows with the
  key rows this device must combine, and the other rows sit in sequences with no keys (or
  no queries), which the kernels skip. Block pairs that the mask hides for every device are
  not staged at all; trailing ring steps that no device needs are not run.
- Backward (``jax.custom_vjp``), the standard ring backward: the forward keeps ``q, k, v``
  and the final ``out`` and ``lse``, which is all that cuflash's recompute backward needs
  per block (``P = exp(S - lse)`` with the *global* lse is the block's share of the global
  softmax, and ``D = rowsum(dout * out)`` uses the global out). The K/V blocks travel the
  ring again; dQ accumulates locally (float32); dK/dV accumulators (float32) travel with
  their K/V block, one hop behind it (each step's ppermute of dK/dV overlaps the next
  step's backward kernels), and arrive back at their owners after the last step. Float32
  keeps n partial sums exact to float32; it costs twice the bytes of bf16 dK/dV.

Layouts (``layout=``; what the caller must put on each device):

- ``"zigzag"`` (default; balanced causal work): the global sequence is cut into ``2n``
  chunks of ``c = seqlen / (2n)`` tokens, and device ``r`` holds chunks ``r`` and
  ``2n - 1 - r``, in that order. :func:`to_zigzag` permutes a global array into this order,
  so that the usual contiguous sharding (``PartitionSpec(None, axis_name)`` on the sequence
  axis) gives each device its two chunks; :func:`from_zigzag` undoes it;
  :func:`zigzag_positions` gives each token's global position (for rotary embeddings).
  With ``causal=True`` every device then does the same work at every step: half a block
  pair (its queries against the first chunk of an earlier device's keys, or its second
  chunk's queries against all keys of a later device).
- ``"contiguous"``: device ``r`` holds tokens ``[r * s, (r + 1) * s)``. Exact with every
  option, but with ``causal=True`` device ``n - 1`` does about ``2n - 1`` times the work
  of device 0 (which skips every step after the first), and the step waits for it.

Without causal masking and windows the layout does not matter (attention is then
indifferent to the order of tokens, as long as q, k, v and the results share it).

Windows (``window=(left, right)``, with or without ``causal``): each block pair's visible
band is a window on its own local coordinates (or a sub-rectangle of the pair when the
band lies off its diagonal), so they are exact in both layouts; pairs are then computed
one chunk pair at a time.

Not supported: ALiBi (its bias depends on the global distance of a query and a key, which
a per-block call cannot take), different query and key lengths (ring attention is
self-attention), the 'bhsd' layout.
"""
from __future__ import annotations

import functools
from typing import Hashable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from . import _binding as _fj

__all__ = ["ring_attention", "to_zigzag", "from_zigzag", "zigzag_positions"]

LAYOUTS = ("zigzag", "contiguous")


# ---------------------------------------------------------------------------------------
# The zigzag layout.

def zigzag_positions(seqlen: int, num_devices: int) -> np.ndarray:
    """The global position of each token of the zigzag order (int64, ``(seqlen,)``):
    ``to_zigzag(x)[:, i] == x[:, zigzag_positions(...)[i]]``. Device ``r``'s tokens are
    entries ``[r * seqlen / n, (r + 1) * seqlen / n)``: chunk ``r`` then chunk ``2n-1-r``
    of ``2n`` equal chunks. ``seqlen`` must be a multiple of ``2 * num_devices``."""
    n = int(num_devices)
    if n < 1 or seqlen % (2 * n):
        raise ValueError(f"the zigzag layout needs seqlen ({seqlen}) to be a multiple of "
                         f"2 * num_devices ({2 * n})")
    c = seqlen // (2 * n)
    chunks = [j for r in range(n) for j in (r, 2 * n - 1 - r)]
    return np.concatenate([np.arange(j * c, (j + 1) * c) for j in chunks])


def to_zigzag(x, num_devices: int, axis: int = 1):
    """``x`` (a global, unsharded array) with its sequence axis put in the zigzag order;
    then shard that axis contiguously over the ring's mesh axis."""
    return jnp.take(x, zigzag_positions(x.shape[axis], num_devices), axis=axis)


def from_zigzag(x, num_devices: int, axis: int = 1):
    """The inverse of :func:`to_zigzag`: the sequence axis back in its natural order (use
    ``axis=2`` for an lse of shape (batch, heads, seqlen))."""
    return jnp.take(x, np.argsort(zigzag_positions(x.shape[axis], num_devices)), axis=axis)


# ---------------------------------------------------------------------------------------
# The static plan: which query rows meet which key rows, per step and per device.

class _Slot(NamedTuple):
    """One kernel call of one ring step: the same (static) window on every device, and
    per-device prefix sums (``cu_q[r]``, ``cu_k[r]``: tuples) that pick its rows."""
    window: tuple
    cu_q: tuple
    cu_k: tuple
    max_q: int
    max_k: int


class _Plan(NamedTuple):
    axis_name: Hashable
    n: int
    options: _fj._Options        # scale, softcap, deterministic (masks live in the slots)
    steps: tuple                 # steps[t]: the _Slots of ring step t
    transfer: bool = True        # False: no ppermute (bench/ring.py's compute-only time)


def _band(delta, c, left, right):
    """The visible ``j - i`` of a query chunk ``delta`` chunks after a key chunk (both of
    ``c`` rows; ``left``/``right`` None when unbounded), clipped to what a ``c x c`` pair
    can hold; None if nothing is visible."""
    lo = -(c - 1) if left is None else max(delta * c - left, -(c - 1))
    hi = c - 1 if right is None else min(delta * c + right, c - 1)
    return (lo, hi) if lo <= hi else None


def _pair_call(lo, hi, c):
    """A band ``lo <= j - i <= hi`` of a ``c x c`` pair as a call: (query rows, key rows,
    window) where the window, aligned as cuflash aligns it (bottom-right; here the rows
    are square, so the diagonal), has sides >= 0. A band off the diagonal is the diagonal
    band of the sub-square that drops ``o`` rows on one side and ``o`` keys on the other."""
    def side(w, size):
        return None if w >= size - 1 else w
    if lo <= 0 <= hi:
        return (0, c), (0, c), (side(-lo, c), side(hi, c))
    if lo > 0:  # keys after the queries: query i sees keys i + lo .. i + hi
        o = lo
        return (0, c - o), (o, c), (0, side(hi - o, c - o))
    o = -hi     # keys before the queries: query i sees keys i + lo .. i - o
    return (o, c), (0, c - o), (side(-lo - o, c - o), 0)


def _calls(layout, n, r, t, seqlen, left, right):
    """The calls of device ``r`` at step ``t``: a list of (q rows, k rows, window) in its
    local coordinates (``seqlen`` rows of queries; the visiting block's keys)."""
    s = (r - t) % n
    if left is None and right is None:      # no mask: the whole block
        return [((0, seqlen), (0, seqlen), (None, None))]
    if left is None and right == 0 and s == r:
        # Causal on the own block: both layouts keep global order within a device, so
        # local causal masking is exact (zigzag: chunk r precedes chunk 2n-1-r).
        return [((0, seqlen), (0, seqlen), (None, 0))]
    m = 2 if layout == "zigzag" else 1
    c = seqlen // m
    ids = (lambda d: (d, 2 * n - 1 - d)) if m == 2 else (lambda d: (d,))
    bands = {(a, b): _band(qc - kc, c, left, right)
             for a, qc in enumerate(ids(r)) for b, kc in enumerate(ids(s))}
    visible = {p: band for p, band in bands.items() if band is not None}
    full = (-(c - 1), c - 1)
    if visible and all(band == full for band in visible.values()):
        qs, ks = sorted({a for a, _ in visible}), sorted({b for _, b in visible})
        rectangle = {(a, b) for a in qs for b in ks}
        if set(visible) == rectangle and qs == list(range(qs[0], qs[-1] + 1)) and \
                ks == list(range(ks[0], ks[-1] + 1)):  # one call for the whole rectangle
            return [((qs[0] * c, (qs[-1] + 1) * c), (ks[0] * c, (ks[-1] + 1) * c),
                     (None, None))]
    calls = []
    for (a, b), (lo, hi) in sorted(visible.items()):
        (q0, q1), (k0, k1), window = _pair_call(lo, hi, c)
        calls.append(((a * c + q0, a * c + q1), (b * c + k0, b * c + k1), window))
    return calls


def _sequences(rows_q, rows_k, seqlen):
    """The (query, key) lengths of the five sequences of one batch element that give rows
    ``rows_q`` the keys ``rows_k`` and the other rows nothing."""
    (q0, q1), (k0, k1) = rows_q, rows_k
    return [(q0, 0), (0, k0), (q1 - q0, k1 - k0), (seqlen - q1, 0), (0, seqlen - k1)]


def _prefix(lengths, batch):
    return tuple(int(x) for x in np.concatenate([[0], np.cumsum(np.tile(lengths, batch))]))


def _plan(axis_name, n, layout, seqlen, batch, left, right, options,
          transfer=True) -> _Plan:
    per_step = [[_calls(layout, n, r, t, seqlen, left, right) for r in range(n)]
                for t in range(n)]
    used = [t for t in range(n) if any(per_step[t])]
    steps = []
    for t in range(used[-1] + 1):           # trailing steps that nobody needs: not run
        # Slots: for each window, as many as the device that has the most calls with it.
        windows = sorted({w for calls in per_step[t] for _, _, w in calls}, key=repr)
        slots = []
        for w in windows:
            mine = [[(rq, rk) for rq, rk, w2 in calls if w2 == w] for calls in per_step[t]]
            empty = ((seqlen, seqlen), (seqlen, seqlen))  # all queries, no keys
            for i in range(max(len(x) for x in mine)):
                rects = [x[i] if i < len(x) else empty for x in mine]
                seqs = np.array([_sequences(rq, rk, seqlen) for rq, rk in rects])  # n, 5, 2
                seqs = seqs[:, seqs.any(axis=(0, 2))]  # drop sequences empty everywhere
                slots.append(_Slot(w, tuple(_prefix(x[:, 0], batch) for x in seqs),
                                   tuple(_prefix(x[:, 1], batch) for x in seqs),
                                   int(seqs[..., 0].max()), int(seqs[..., 1].max())))
        steps.append(tuple(slots))
    return _Plan(axis_name, n, options, tuple(steps), bool(transfer))


# ---------------------------------------------------------------------------------------
# Forward and backward under shard_map.

def _send(plan, arrays, shift):
    """``arrays`` from device ``i`` to device ``i + shift`` of the ring."""
    if not plan.transfer or shift % plan.n == 0:
        return arrays
    return jax.lax.ppermute(arrays, plan.axis_name,
                            [(i, (i + shift) % plan.n) for i in range(plan.n)])


def _per_device(table, r):
    """A slot's prefix sums for this device: a constant when every device has the same,
    else the row ``r`` (``axis_index``, a runtime value) of the static table."""
    if all(row == table[0] for row in table):
        return jnp.asarray(table[0], jnp.int32)
    return jnp.asarray(np.array(table, np.int32))[r]


def _call_options(plan, slot):
    return (plan.options._replace(window=slot.window), slot.max_q, slot.max_k)


def _merge_into(acc_out, acc_lse, out, lse):
    """``acc`` and a part over disjoint keys, merged by log-sum-exp in float32 (the math of
    merge_attention); rows that are -inf in both stay 0 / -inf."""
    new = jnp.logaddexp(acc_lse, lse)
    safe = jnp.where(jnp.isneginf(new), 0.0, new)
    rows = lambda w: jnp.exp(w - safe).T[..., None]  # (H, total) -> (total, H, 1)  # noqa
    return rows(acc_lse) * acc_out + rows(lse) * out.astype(jnp.float32), new


def _ring_forward(plan, q, k, v):
    r = jax.lax.axis_index(plan.axis_name)
    acc_out = jnp.zeros(q.shape, jnp.float32)
    acc_lse = jnp.full((q.shape[1], q.shape[0]), -jnp.inf, jnp.float32)
    for t, slots in enumerate(plan.steps):
        if t + 1 < len(plan.steps):
            # Staged before this step's attention and independent of it: the transfer of
            # the next block overlaps the kernels below (see the module docstring).
            k_next, v_next = _send(plan, (k, v), 1)
        for slot in slots:
            out, lse = _fj._varlen_forward(_call_options(plan, slot), q, k, v,
                                           _per_device(slot.cu_q, r),
                                           _per_device(slot.cu_k, r), None)
            acc_out, acc_lse = _merge_into(acc_out, acc_lse, out, lse)
        if t + 1 < len(plan.steps):
            k, v = k_next, v_next
    return acc_out.astype(q.dtype), acc_lse


def _ring_backward(plan, q, k, v, out, lse, dout, dlse):
    steps = plan.steps
    r = jax.lax.axis_index(plan.axis_name)
    dq = jnp.zeros(q.shape, jnp.float32)
    dk = jnp.zeros(k.shape, jnp.float32)
    dv = jnp.zeros(v.shape, jnp.float32)
    for t, slots in enumerate(steps):
        last = t + 1 == len(steps)
        if not last:  # as in the forward: the next block's transfer first
            k_next, v_next = _send(plan, (k, v), 1)
        for slot in slots:
            static = _call_options(plan, slot)
            cu_q, cu_k = _per_device(slot.cu_q, r), _per_device(slot.cu_k, r)
            if dlse is None:
                parts = _fj._varlen_backward(static, dout, q, k, v, out, lse, cu_q, cu_k,
                                             None)
            else:  # the loss uses lse: dS = P * (dP - D + dlse), per block (exact)
                parts = _fj._augmented_backward(
                    lambda o2, *a: _fj._varlen_backward((o2,) + static[1:], *a, cu_q, cu_k,
                                                        None),
                    static[0], dout, dlse.T[..., None], q, k, v, out, lse)
            dq, dk, dv = (acc + p.astype(jnp.float32) for acc, p in zip((dq, dk, dv), parts))
        # dK/dV follow their block one hop behind (this transfer overlaps the next step's
        # kernels); after the last step they go straight back to the block's owner, device
        # r - t (so, with every step run, one hop further round the ring).
        dk, dv = _send(plan, (dk, dv), 1 if not last else -t)
        if not last:
            k, v = k_next, v_next
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring(plan, q, k, v):
    return _ring_forward(plan, q, k, v)


def _ring_fwd(plan, q, k, v):
    q, k, v = _fj._unwrap((q, k, v))
    out, lse = _ring_forward(plan, q, k, v)
    return (out, lse), (q, k, v, out, lse)


def _ring_bwd(plan, residuals, cts):
    q, k, v, out, lse = residuals
    dout, dlse = cts
    dout = _fj._instantiate(dout, out)
    return _ring_backward(plan, q, k, v, out, lse, dout, None if _fj._zero(dlse) else dlse)


_ring.defvjp(_ring_fwd, _ring_bwd, symbolic_zeros=True)


# ---------------------------------------------------------------------------------------
# The public function.

def _axis_size(axis_name) -> int:
    size = getattr(jax.lax, "axis_size", None)
    return int(size(axis_name)) if size is not None else int(jax.lax.psum(1, axis_name))


def _window_side(w, name):
    if w is None or (isinstance(w, (int, np.integer)) and not isinstance(w, bool) and w == -1):
        return None
    if isinstance(w, (bool, np.bool_)) or not isinstance(w, (int, np.integer)) or w < 0:
        raise ValueError(f"window {name} must be None, -1 (unbounded) or an int >= 0, "
                         f"got {w!r}")
    return int(w)


def ring_attention(q, k, v, axis_name, *, scale=None, causal=False, window=(None, None),
                   softcap=0.0, layout="zigzag", deterministic=False, return_lse=False):
    """Exact attention over a sequence sharded along the mesh axis ``axis_name``: call it
    inside ``jax.shard_map`` on each device's block. Differentiable (``jax.grad``; the ring
    backward), usable under ``jax.jit``. See the module docstring for the algorithm.

    Parameters
    ----------
    q : array (batch, seqlen_local, nheads, headdim)
        This device's queries: its block of the sequence in the order ``layout`` names.
    k, v : arrays (batch, seqlen_local, nheads_kv, headdim), ``nheads % nheads_kv == 0``
        This device's keys and values (the same tokens as ``q``).
    axis_name : the mesh axis that splits the sequence (static); other mesh axes (batch,
        heads) may shard the other dimensions.
    scale, causal, window, softcap : as in :func:`cuflash.jax.attention`, applied to global
        positions. ``window=(left, right)`` works with both layouts.
    layout : {'zigzag', 'contiguous'}, default 'zigzag'
        How the global sequence is laid out over the devices (module docstring): with
        'zigzag', prepare inputs with :func:`to_zigzag` and restore outputs with
        :func:`from_zigzag`. ``seqlen_local`` must then be even.
    deterministic : bool
        Bitwise reproducible gradients (cuflash's backward option; the ring order is fixed).
    return_lse : bool
        Also return the float32 log-sum-exp (batch, nheads, seqlen_local); gradients flow
        through it too.

    Returns
    -------
    out : array like ``q`` (this device's rows), or ``(out, lse)``

    Examples
    --------
    >>> import jax, numpy as np
    >>> from jax.sharding import Mesh, PartitionSpec as P
    >>> import cuflash.jax as fj
    >>> mesh = Mesh(np.array(jax.devices()[:1]), ("sp",))
    >>> ring = jax.shard_map(lambda q, k, v: fj.ring_attention(q, k, v, "sp", causal=True),
    ...                      mesh=mesh, in_specs=P(None, "sp"), out_specs=P(None, "sp"))
    >>> q = fj.to_zigzag(jax.random.normal(jax.random.key(0), (1, 16, 2, 32)), 1)
    >>> fj.from_zigzag(jax.jit(ring)(q, q, q), 1).shape
    (1, 16, 2, 32)
    """
    return _ring_attention(q, k, v, axis_name, scale=scale, causal=causal, window=window,
                           softcap=softcap, layout=layout, deterministic=deterministic,
                           return_lse=return_lse)


def _ring_attention(q, k, v, axis_name, *, scale, causal, window, softcap, layout,
                    deterministic, return_lse, transfer=True):
    """:func:`ring_attention`; ``transfer=False`` leaves out every ppermute (each device
    then computes on its own K/V at every step: the same kernels, wrong results), which
    bench/ring.py times as the compute alone."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if not isinstance(window, (tuple, list)) or len(window) != 2:
        raise ValueError(f"window must be a pair (left, right), got {window!r}")
    o = _fj._options(scale, causal, (None, None), softcap, deterministic)
    left, right = _window_side(window[0], "left"), _window_side(window[1], "right")
    if causal:
        if right is not None and right > 0:
            raise ValueError(f"window right={right} contradicts causal=True (which means "
                             f"right=0); pass one or the other")
        right = 0
    q, k, v = (_fj._array(x, name) for x, name in ((q, "q"), (k, "k"), (v, "v")))
    for x, name in ((q, "q"), (k, "k"), (v, "v")):
        _fj._check_rank(x, name, 4, "(batch, seqlen_local, heads, headdim)")
    _fj._check_same_dtype(q, "q", k=k, v=v)
    batch, seqlen, nheads, headdim = q.shape
    if k.shape[:2] != (batch, seqlen) or v.shape != k.shape:
        raise ValueError(f"ring attention is self-attention: k and v must share q's batch "
                         f"and sequence block, got q {q.shape}, k {k.shape}, v {v.shape}")
    masked = left is not None or right is not None
    if masked and layout == "zigzag" and seqlen % 2:
        raise ValueError(f"the zigzag layout holds two chunks per device: seqlen_local must "
                         f"be even, got {seqlen}")
    n = _axis_size(axis_name)
    plan = _plan(axis_name, n, layout, seqlen, batch, left, right,
                 o._replace(causal=False), transfer)
    pack = lambda x: x.reshape((batch * seqlen,) + x.shape[2:])  # noqa: E731 (a bitcast)
    out, lse = _ring(plan, pack(q), pack(k), pack(v))
    out = out.reshape(q.shape)
    if not return_lse:
        return out
    return out, jnp.transpose(lse.reshape(nheads, batch, seqlen), (1, 0, 2))
