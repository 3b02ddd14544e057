"""The NumPy backend: FlashAttention-2's tiled algorithm on the CPU.

The same algorithm as the GPU kernels, vectorised over batch and heads where the GPU uses
thread blocks. Forward walks query blocks of ``Br`` rows and, inside each, key blocks of
``Bc`` columns with an online softmax (running max ``m_i``, running sum ``l_i``, one
division at the end). Backward walks key blocks and, inside each, the query blocks that
see them, recomputing the probabilities from ``lse``. Blocks that the causal mask or the
window hide entirely are never visited. Nothing of size ``seqlen_q * seqlen_k`` is ever
allocated: the largest temporaries are ``(batch, nheads, Br, Bc)`` blocks and
``(batch, nheads, seqlen, headdim)`` copies of the inputs in the accumulation dtype.

Inside, heads come first and query heads are grouped by the kv head they read, so GQA is
a reshape and k, v are never repeated:

    Q, dO, O, dQ : (batch, nheads_kv, group, seqlen_q, headdim)
    K, V, dK, dV : (batch, nheads_kv, seqlen_k, headdim)

A query block is flattened to ``(batch, nheads_kv, group * Br, headdim)``, so one matmul
serves every query head of a group.

Accumulation is in float32 for float16, bfloat16 and float32 inputs (as on the GPU) and in
float64 for float64 inputs.
"""
from __future__ import annotations

import dataclasses

import numpy as np

# Measured on 2 cores: 64-wide blocks are ~2x slower (NumPy's per-call overhead), 256-wide
# ones at most ~15% faster without masks and slower with causal, whose diagonal blocks
# waste more work the wider they are.
BR = 128
BC = 128


def forward(q, k, v, shape, opts, *, Br=BR, Bc=BC):
    """Attention forward, tiled.

    Parameters
    ----------
    q : array (batch, seqlen_q, nheads, headdim)
    k, v : arrays (batch, seqlen_k, nheads_kv, headdim)
        Only the last axis needs to be contiguous.
    shape, opts : ``_checks.Shape``, ``_checks.Options`` (validated, normalised)
    Br, Bc : int
        Query rows and key columns per block.

    Returns
    -------
    out : array (batch, seqlen_q, nheads, headdim), dtype of ``q``
    lse : float32 array (batch, nheads, seqlen_q), ``-inf`` for rows that see no key
    """
    acc = _acc_dtype(q.dtype)
    Q = _heads_first(q, shape.nheads_kv, acc)
    K, V = (_heads_first(x, shape.nheads_kv, acc)[:, :, 0] for x in (k, v))
    O, lse = _forward(Q, K, V, shape, opts, Br, Bc)
    lse = lse.reshape(shape.batch, shape.nheads, shape.seqlen_q).astype(np.float32)
    return _seq_first(O, q.dtype), lse


def backward(dout, q, k, v, out, lse, shape, opts, *, Br=BR, Bc=BC):
    """Attention backward, tiled and recomputing the probabilities from ``lse``.

    Parameters
    ----------
    dout, out : arrays (batch, seqlen_q, nheads, headdim)
    q, k, v, shape, opts, Br, Bc : as in :func:`forward`
    lse : float32 array (batch, nheads, seqlen_q), from :func:`forward`
        For float64 inputs it is recomputed in float64 instead: its float32 rounding
        would otherwise cap the gradients at ~1e-7 relative accuracy.

    Returns
    -------
    dq : array (batch, seqlen_q, nheads, headdim)
    dk, dv : arrays (batch, seqlen_k, nheads_kv, headdim), summed over each kv head's group
        In the dtype of ``q``.
    """
    acc = _acc_dtype(q.dtype)
    hkv = shape.nheads_kv
    Q, dO, O = (_heads_first(x, hkv, acc) for x in (q, dout, out))
    K, V = (_heads_first(x, hkv, acc)[:, :, 0] for x in (k, v))
    delta = (dO * O).sum(-1)
    if acc == np.float64:
        lse = _forward(Q, K, V, shape, opts, Br, Bc)[1]
    # No guard against lse = -inf: the only rows that see no key are the first ones (the
    # right bound hides them), and _query_range starts each key block past them.
    lse = lse.reshape(delta.shape).astype(acc)
    slopes = _slopes(opts, shape, acc)

    dQ, dK, dV = np.zeros_like(Q), np.zeros_like(K), np.zeros_like(V)
    for c0 in range(0, shape.seqlen_k, Bc):
        c1 = min(c0 + Bc, shape.seqlen_k)
        Kj, Vj = K[:, :, c0:c1], V[:, :, c0:c1]
        lo, hi = _query_range(c0, c1, shape, opts)
        for r0 in range(lo, hi, Br):
            r1 = min(r0 + Br, hi)
            Qi, dOi = (_rows(x, r0, r1) for x in (Q, dO))
            S, tanh = _scores(Qi, Kj, r0, r1, c0, c1, shape, opts, slopes)
            P = np.exp(S - _rows(lse[..., None], r0, r1), out=S)
            dV[:, :, c0:c1] += P.swapaxes(-1, -2) @ dOi
            dP = dOi @ Vj.swapaxes(-1, -2)
            dS = P * (dP - _rows(delta[..., None], r0, r1))
            _dominant_ds(dS, P, dOi, _rows(O, r0, r1), Vj)
            if tanh is not None:
                dS *= 1 - tanh * tanh  # d/dx softcap * tanh(x / softcap)
            dK[:, :, c0:c1] += dS.swapaxes(-1, -2) @ Qi
            dQ[..., r0:r1, :] += (dS @ Kj).reshape(*Q.shape[:3], r1 - r0, -1)
    dQ *= opts.scale
    dK *= opts.scale
    return (_seq_first(dQ, q.dtype), _seq_first(dK[:, :, None], q.dtype),
            _seq_first(dV[:, :, None], q.dtype))


def forward_varlen(q, k, v, shape, opts, varlen, *, Br=BR, Bc=BC):
    """Varlen attention forward: :func:`forward` on each sequence, viewed as a batch of one.

    Parameters
    ----------
    q : array (total_q, nheads, headdim)
    k, v : arrays (total_k, nheads_kv, headdim)
    shape, opts, varlen : ``_checks.Shape`` (longest lengths), ``Options``, ``Varlen``
    Br, Bc : as in :func:`forward`

    Returns
    -------
    out : array (total_q, nheads, headdim), dtype of ``q``
    lse : float32 array (nheads, total_q)
    """
    out = np.zeros(q.shape, q.dtype)
    lse = np.full((shape.nheads, varlen.total_q), -np.inf, np.float32)
    for b, (q0, q1, k0, k1) in enumerate(varlen.items()):
        if q1 == q0 or k1 == k0:  # no rows, or rows that see no key: out 0, lse -inf
            continue
        shape_b, opts_b = _varlen_item(shape, opts, b, q1 - q0, k1 - k0)
        out_b, lse_b = forward(q[None, q0:q1], k[None, k0:k1], v[None, k0:k1], shape_b, opts_b,
                               Br=Br, Bc=Bc)
        out[q0:q1], lse[:, q0:q1] = out_b[0], lse_b[0]
    return out, lse


def backward_varlen(dout, q, k, v, out, lse, shape, opts, varlen, *, Br=BR, Bc=BC):
    """Varlen attention backward: :func:`backward` on each sequence, viewed as a batch of one.

    Parameters
    ----------
    dout, out : arrays (total_q, nheads, headdim)
    q, k, v, shape, opts, varlen, Br, Bc : as in :func:`forward_varlen`
    lse : float32 array (nheads, total_q), from :func:`forward_varlen`

    Returns
    -------
    dq : array (total_q, nheads, headdim)
    dk, dv : arrays (total_k, nheads_kv, headdim), summed over each kv head's group
        In the dtype of ``q``; 0 for rows of sequences with no keys or no queries.
    """
    dq, dk, dv = (np.zeros(x.shape, x.dtype) for x in (q, k, v))
    for b, (q0, q1, k0, k1) in enumerate(varlen.items()):
        if q1 == q0 or k1 == k0:
            continue
        shape_b, opts_b = _varlen_item(shape, opts, b, q1 - q0, k1 - k0)
        grads = backward(dout[None, q0:q1], q[None, q0:q1], k[None, k0:k1], v[None, k0:k1],
                         out[None, q0:q1], lse[None, :, q0:q1], shape_b, opts_b, Br=Br, Bc=Bc)
        dq[q0:q1], dk[k0:k1], dv[k0:k1] = (g[0] for g in grads)
    return dq, dk, dv


def _dominant_ds(dS, P, dOi, Oi, Vj):
    """dS = P (dP - delta) again, in place, where P > 1/2 (at most one key a row).

    There dP - delta = dO . v_j - dO . o is a near-total cancellation: a row that sees one
    key has o == v_j and dS exactly 0, but dP (a matmul) and delta (a row sum) are float32
    dot products summed in different orders, whose difference (~eps * sqrt(headdim)) dQ
    and dK then scale up, past the accuracy rule (tests/test_reliability.py). The same
    quantity as dO . (v_j - o) cancels before summing: exactly 0 for one key, and in
    general an error relative to v_j - o instead of v_j. O(rows * headdim) a block pair.
    """
    big = P > 0.5
    if big.any():
        b, h, r, c = np.nonzero(big)
        dS[b, h, r, c] = P[b, h, r, c] * (dOi[b, h, r] * (Vj[b, h, c] - Oi[b, h, r])).sum(-1)


def _varlen_item(shape, opts, b, seqlen_q, seqlen_k):
    """Shape and options of batch item ``b`` of a varlen call, as a dense batch of one."""
    shape_b = dataclasses.replace(shape, batch=1, seqlen_q=seqlen_q, seqlen_k=seqlen_k)
    if opts.alibi_slopes is not None:
        opts = dataclasses.replace(opts, alibi_slopes=opts.alibi_slopes[b:b + 1])
    return shape_b, opts


def _forward(Q, K, V, shape, opts, Br, Bc):
    """O (like Q) and lse (Q.shape[:-1]), both in the accumulation dtype."""
    O = np.zeros_like(Q)
    lse = np.full(Q.shape[:-1], -np.inf, Q.dtype)
    slopes = _slopes(opts, shape, Q.dtype)
    for r0 in range(0, shape.seqlen_q, Br):
        r1 = min(r0 + Br, shape.seqlen_q)
        Qi = _rows(Q, r0, r1)
        m_i = np.full((*Qi.shape[:-1], 1), -np.inf, Q.dtype)
        l_i = np.zeros_like(m_i)
        O_i = np.zeros_like(Qi)
        lo, hi = _key_range(r0, r1, shape, opts)
        for c0 in range(lo, hi, Bc):
            c1 = min(c0 + Bc, hi)
            S, _ = _scores(Qi, K[:, :, c0:c1], r0, r1, c0, c1, shape, opts, slopes)
            m_new = np.maximum(m_i, S.max(-1, keepdims=True))
            # rows that have seen no key yet: exp(-inf - 0) = 0, not exp(-inf + inf) = NaN
            m_safe = np.where(np.isneginf(m_new), 0, m_new)
            P = np.exp(S - m_safe, out=S)
            alpha = np.exp(m_i - m_safe)
            l_i = alpha * l_i + P.sum(-1, keepdims=True)
            O_i = alpha * O_i + P @ V[:, :, c0:c1]
            m_i = m_new
        # docs/CONVENTIONS.md: a row that saw no key (l_i == 0; a NaN l_i is not one) gets
        # out 0 and lse -inf even where a masked value of its blocks was NaN (0 * NaN); a row
        # that met a NaN (in l_i, from a score, or in O_i, from a value) is NaN in all of out
        # and in lse.
        empty = l_i == 0
        nan = ~empty & (np.isnan(l_i) | np.isnan(O_i).any(-1, keepdims=True))
        l_safe = np.where(empty, 1, l_i)
        O_i = np.where(empty, 0, np.where(nan, np.nan, O_i / l_safe))
        lse_i = np.where(empty, -np.inf, np.where(nan, np.nan, m_i + np.log(l_safe)))
        O[..., r0:r1, :] = O_i.reshape(O[..., r0:r1, :].shape)
        lse[..., r0:r1] = lse_i.reshape(lse[..., r0:r1].shape)
    return O, lse


def _scores(Qi, Kj, r0, r1, c0, c1, shape, opts, slopes):
    """Scores of rows [r0, r1) x columns [c0, c1), ``-inf`` where masked.

    Qi is (batch, nheads_kv, group * Br, headdim) and Kj (batch, nheads_kv, Bc, headdim);
    returns S (batch, nheads_kv, group * Br, Bc) and, with softcap, the tanh that backward
    differentiates (else None).
    """
    S = Qi @ Kj.swapaxes(-1, -2)
    S *= opts.scale
    tanh = None
    if opts.softcap:
        tanh = np.tanh(S / opts.softcap)
        S = opts.softcap * tanh
    # diag[i, j] = i + seqlen_k - seqlen_q - j: signed distance from the bottom-right diagonal
    diag = (np.arange(r0, r1)[:, None] + (shape.seqlen_k - shape.seqlen_q)
            - np.arange(c0, c1)[None, :])
    S_g = S.reshape(*S.shape[:2], -1, r1 - r0, c1 - c0)  # a view with the group axis apart
    if slopes is not None:
        S_g -= slopes * np.abs(diag).astype(S.dtype)
    hidden = np.zeros(diag.shape, bool)
    if opts.window_left >= 0:
        hidden |= diag > opts.window_left
    if opts.window_right >= 0:
        hidden |= -diag > opts.window_right
    if hidden.any():
        S_g[..., hidden] = -np.inf
    return S, tanh


def _key_range(r0, r1, shape, opts):
    """Columns [lo, hi) seen by at least one of the query rows [r0, r1) (empty if lo >= hi)."""
    offset = shape.seqlen_k - shape.seqlen_q
    lo = 0 if opts.window_left < 0 else max(0, r0 + offset - opts.window_left)
    hi = (shape.seqlen_k if opts.window_right < 0
          else min(shape.seqlen_k, r1 + offset + opts.window_right))
    return lo, hi


def _query_range(c0, c1, shape, opts):
    """Rows [lo, hi) that see at least one of the key columns [c0, c1)."""
    offset = shape.seqlen_k - shape.seqlen_q
    lo = 0 if opts.window_right < 0 else max(0, c0 - offset - opts.window_right)
    hi = (shape.seqlen_q if opts.window_left < 0
          else min(shape.seqlen_q, c1 - offset + opts.window_left))
    return lo, hi


def _slopes(opts, shape, dtype):
    """ALiBi slopes as (batch, nheads_kv, group, 1, 1), to broadcast over a score block."""
    if opts.alibi_slopes is None:
        return None
    return np.asarray(opts.alibi_slopes, dtype).reshape(
        shape.batch, shape.nheads_kv, shape.nheads // shape.nheads_kv, 1, 1)


def _rows(x, r0, r1):
    """Rows [r0, r1) of a (batch, nheads_kv, group, seqlen_q, n) array, group flattened in:
    (batch, nheads_kv, group * (r1 - r0), n)."""
    return x[..., r0:r1, :].reshape(*x.shape[:2], -1, x.shape[-1])


def _acc_dtype(dtype):
    return np.float64 if dtype == np.float64 else np.float32


def _heads_first(x, nheads_kv, dtype):
    """(batch, seqlen, nheads, d), any strides -> contiguous
    (batch, nheads_kv, nheads // nheads_kv, seqlen, d) in ``dtype``."""
    b, s, h, d = x.shape
    grouped = x.reshape(b, s, nheads_kv, h // nheads_kv, d).transpose(0, 2, 3, 1, 4)
    return np.ascontiguousarray(grouped, dtype=dtype)


def _seq_first(x, dtype):
    """Inverse of :func:`_heads_first`: (batch, nheads_kv, group, seqlen, d) ->
    contiguous (batch, seqlen, nheads, d) in ``dtype``."""
    b, hkv, g, s, d = x.shape
    return x.transpose(0, 3, 1, 2, 4).astype(dtype, order="C").reshape(b, s, hkv * g, d)


def merge(parts, lses):
    """merge_attention on the CPU.

    Parameters
    ----------
    parts : array (num_parts, batch, seqlen_q, nheads, headdim)
    lses : float32 array (num_parts, batch, nheads, seqlen_q)

    Returns
    -------
    out : array (batch, seqlen_q, nheads, headdim), dtype of ``parts``
    lse : float32 array (batch, nheads, seqlen_q)
    """
    acc = _acc_dtype(parts.dtype)
    lses = lses.astype(acc)
    mx = lses.max(0)
    empty = np.isneginf(mx)  # every part saw no key
    mx = np.where(empty, 0, mx)
    w = np.exp(lses - mx)  # 0 for -inf parts
    total = np.where(empty, 1, w.sum(0))
    lse = np.where(empty, -np.inf, mx + np.log(total))
    w = (w / total).transpose(0, 1, 3, 2)[..., None]  # (num_parts, batch, seqlen_q, nheads, 1)
    # A part of weight 0 contributes nothing, even where its out holds inf or NaN.
    out = (np.where(w > 0, parts, 0).astype(acc) * w).sum(0)
    return out.astype(parts.dtype), lse.astype(np.float32)
