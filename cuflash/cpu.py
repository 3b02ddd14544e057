"""The NumPy backend: FlashAttention-2's tiled algorithm on the CPU, on worker threads.

The same algorithm as the GPU kernels, with one (batch item, kv head, block of query rows)
where the GPU has a thread block. Forward: each block of ``Br`` query rows walks its keys in
chunks of up to ``Bc`` columns with an online softmax (running max ``m``, running sum ``l``,
one division at the end). Backward: each block of query rows recomputes its probabilities
from ``lse`` chunk by chunk, finishes its own ``dQ`` and adds into the ``dK``, ``dV`` of the
keys it sees. Keys that the causal mask or the window hide from a whole block are never
visited, and only the columns where a block's rows disagree are masked. Nothing of size
``seqlen_q * seqlen_k`` is ever allocated: the largest temporaries are a few
``(group * Br, Bc)`` blocks per worker thread, one ``(seqlen_k, headdim)`` pair of
accumulators per backward work item, and copies of k and v in the accumulation dtype.

A block flattens the query heads that share a kv head (GQA) into its rows, in the order
(row, head), so one matrix product serves the whole group and k, v are never repeated.
The defaults (128 rows, chunks of 1024 keys) make the products large enough that NumPy's
per-call overhead is small, and keep a chunk's working set in a core's L2 cache
(docs/notes/cpu.md has the measurements).

Threads: the work items run on ``threads()`` threads (the caller's included), each item
on one thread from start to end, its products on a single-threaded BLAS (NumPy releases
the GIL inside them and inside its ufuncs). Forward items are (batch item, kv head, query
block); backward items are (batch item, kv head) or, when there are fewer than
``MIN_ITEMS`` of those, (batch item, kv head, segment) with every segment owning a
``dK``, ``dV`` partial that is added to the others in segment order. The split into items
depends on the problem alone, so results are bitwise the same whatever the thread count
and from run to run. NumPy's BLAS is held at one thread for the duration of a call
(threadpoolctl when importable, else OpenBLAS's own setter found through ctypes): BLAS
threads spinning next to ours made a shared machine 2.5-12x slower (docs/notes/cpu.md).

Accumulation is in float32 for float16, bfloat16 and float32 inputs (as on the GPU) and in
float64 for float64 inputs.
"""
from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor, wait

import numpy as np

# Query rows per block and key columns per chunk (docs/notes/cpu.md, "Block sizes").
BR = 128
BC = 1024
# Backward: below this many (batch item, kv head) pairs, each is split into segments of
# query blocks with a dK, dV partial each, so that up to MIN_ITEMS threads find work.
MIN_ITEMS = 4
# A call gives each thread at least this many multiply-adds (~0.3 ms of one core).
MIN_WORK_PER_THREAD = 1 << 25
# Forward: scores known to lie within +-BOUND need no running maximum (_forward_block).
BOUND = 32.0
THREADS_ENV = "CUFLASH_CPU_THREADS"


# ------------------------------------------------------------------------ the public API

def forward(q, k, v, shape, opts, *, Br=BR, Bc=BC):
    """Attention forward, tiled.

    Parameters
    ----------
    q : array (batch, seqlen_q, nheads, headdim)
    k, v : arrays (batch, seqlen_k, nheads_kv, headdim)
        Only the last axis needs to be contiguous.
    shape, opts : ``_checks.Shape``, ``_checks.Options`` (validated, normalised)
    Br, Bc : int
        Query rows per block and key columns per chunk.

    Returns
    -------
    out : array (batch, seqlen_q, nheads, headdim), dtype of ``q``
    lse : float32 array (batch, nheads, seqlen_q), ``-inf`` for rows that see no key
    """
    out = np.empty(q.shape, q.dtype)
    lse = np.empty((shape.batch, shape.nheads, shape.seqlen_q), np.float32)
    K, V = (_kv_heads_first(x, _acc_dtype(q.dtype)) for x in (k, v))
    norms = _norms(K)
    _forward_jobs([_Job(b, q[b], K[:, b], V[:, b], shape.seqlen_q, shape.seqlen_k,
                        norms=norms[:, b], out=out[b], lse=lse[b])
                   for b in range(shape.batch)], shape, opts, Br, Bc)
    return out, lse


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
    # Keys and values with a column of 1 and -1: S - lse and dP - delta are then products.
    K, V = (_kv_heads_first(x, acc, extra) for x, extra in ((k, 1), (v, -1)))
    if acc == np.float64:
        lse = np.empty(lse.shape, acc)
        norms = _norms(K, shape.headdim)
        _forward_jobs([_Job(b, q[b], K[:, b], V[:, b], shape.seqlen_q, shape.seqlen_k,
                            norms=norms[:, b], out=np.empty(q.shape[1:], q.dtype),
                            lse=lse[b])
                       for b in range(shape.batch)], shape, opts, Br, Bc)
    dq, dk, dv = (np.empty(x.shape, q.dtype) for x in (q, k, v))
    _backward_jobs([_Job(b, q[b], K[:, b], V[:, b], shape.seqlen_q, shape.seqlen_k,
                         lse=lse[b], dout=dout[b], o=out[b], dq=dq[b], dk=dk[b], dv=dv[b])
                    for b in range(shape.batch)], shape, opts, Br, Bc)
    return dq, dk, dv


def forward_varlen(q, k, v, shape, opts, varlen, *, Br=BR, Bc=BC):
    """Varlen attention forward: every sequence a batch item of its own lengths.

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
    K, V = (_kv_heads_first(x[None], _acc_dtype(q.dtype))[:, 0] for x in (k, v))
    norms = _norms(K)
    jobs = [_Job(b, q[q0:q1], K[:, k0:k1], V[:, k0:k1], q1 - q0, k1 - k0,
                 norms=norms[:, k0:k1], out=out[q0:q1], lse=lse[:, q0:q1])
            for b, (q0, q1, k0, k1) in enumerate(varlen.items())
            if q1 > q0 and k1 > k0]  # no rows, or rows that see no key: out 0, lse -inf
    _forward_jobs(jobs, shape, opts, Br, Bc)
    return out, lse


def backward_varlen(dout, q, k, v, out, lse, shape, opts, varlen, *, Br=BR, Bc=BC):
    """Varlen attention backward: every sequence a batch item of its own lengths.

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
    acc = _acc_dtype(q.dtype)
    K, V = (_kv_heads_first(x[None], acc, extra)[:, 0] for x, extra in ((k, 1), (v, -1)))
    items = [(b, *bounds) for b, bounds in enumerate(varlen.items())
             if bounds[1] > bounds[0] and bounds[3] > bounds[2]]
    if acc == np.float64:
        lse = np.full(lse.shape, -np.inf, acc)
        norms = _norms(K, shape.headdim)
        _forward_jobs([_Job(b, q[q0:q1], K[:, k0:k1], V[:, k0:k1], q1 - q0, k1 - k0,
                            norms=norms[:, k0:k1],
                            out=np.empty((q1 - q0, *q.shape[1:]), q.dtype),
                            lse=lse[:, q0:q1]) for b, q0, q1, k0, k1 in items],
                      shape, opts, Br, Bc)
    dq, dk, dv = (np.zeros(x.shape, q.dtype) for x in (q, k, v))
    _backward_jobs([_Job(b, q[q0:q1], K[:, k0:k1], V[:, k0:k1], q1 - q0, k1 - k0,
                         lse=lse[:, q0:q1], dout=dout[q0:q1], o=out[q0:q1], dq=dq[q0:q1],
                         dk=dk[k0:k1], dv=dv[k0:k1]) for b, q0, q1, k0, k1 in items],
                   shape, opts, Br, Bc)
    return dq, dk, dv


# ---------------------------------------------------------------------- thread control

_threads = None  # set_threads' value, else None


def threads() -> int:
    """How many threads a CPU call may use: :func:`set_threads`' value, else the
    ``CUFLASH_CPU_THREADS`` environment variable (read at every call), else the cores this
    process may run on. A call uses at most one thread per work item and one per
    ``MIN_WORK_PER_THREAD`` multiply-adds. Results do not depend on it."""
    if _threads is not None:
        return _threads
    text = os.environ.get(THREADS_ENV, "").strip()
    if text:
        try:
            n = int(text)
        except ValueError:
            n = 0
        if n < 1:
            raise ValueError(f"{THREADS_ENV}={text!r}: expected a positive integer")
        return n
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def set_threads(n: int | None) -> int | None:
    """Set the thread count of CPU calls (``None``: back to the environment variable or the
    core count); returns the previous setting."""
    global _threads
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError(f"threads must be a positive int or None, got {n!r}")
    previous, _threads = _threads, n
    return previous


_pool = None
_pool_key = None  # (pid, workers)
_pool_lock = threading.Lock()


def _executor(workers):
    """A process-wide pool of at least ``workers`` threads (made anew after a fork)."""
    global _pool, _pool_key
    with _pool_lock:
        if _pool is None or _pool_key[0] != os.getpid() or _pool_key[1] < workers:
            old = _pool if _pool_key is not None and _pool_key[0] == os.getpid() else None
            _pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cuflash-cpu")
            _pool_key = (os.getpid(), workers)
            if old is not None:
                old.shutdown(wait=False)
        return _pool


def _parallel(run, n_items, work):
    """``run(i, scratch)`` for every ``i < n_items``, each on one thread, on up to
    :func:`threads` threads (the caller's included); ``work`` is the call's multiply-adds.
    ``scratch`` is a :class:`_Scratch` of the thread, reused from item to item."""
    n = min(threads(), n_items, max(1, work // MIN_WORK_PER_THREAD))
    with _blas_single:
        if n <= 1:
            scratch = _Scratch()
            for i in range(n_items):
                run(i, scratch)
            return
        lock, state = threading.Lock(), {"next": 0, "failed": False}

        def worker():
            scratch = _Scratch()
            while True:
                with lock:
                    i = state["next"]
                    if i >= n_items or state["failed"]:
                        return
                    state["next"] = i + 1
                try:
                    run(i, scratch)
                except BaseException:
                    state["failed"] = True
                    raise

        futures = [_executor(n - 1).submit(worker) for _ in range(n - 1)]
        try:
            worker()
        finally:
            wait(futures)
        for f in futures:
            f.result()


class _Blas:
    """NumPy's BLAS held at one thread while any CPU call runs (calls may overlap), the
    previous count restored after the last. Found on first use: threadpoolctl when
    importable, else OpenBLAS's setter in the library NumPy loaded (Linux), else none."""

    def __init__(self):
        self.lock = threading.Lock()
        self.depth = 0
        self.saved = None
        self.api = None  # (get, set) or False

    def _find(self):
        try:
            import threadpoolctl
            libs = [c for c in threadpoolctl.ThreadpoolController().lib_controllers
                    if c.user_api == "blas"]
            if libs:
                return (lambda: [c.num_threads for c in libs],
                        lambda counts: [c.set_num_threads(n) for c, n in zip(libs, counts)])
        except Exception:  # not installed, or an API it no longer has
            pass
        return _openblas_ctypes() or False

    def __enter__(self):
        with self.lock:
            if self.api is None:
                self.api = self._find()
            if self.depth == 0 and self.api:
                self.saved = self.api[0]()
                self.api[1]([1] * len(self.saved))
            self.depth += 1

    def __exit__(self, *exc):
        with self.lock:
            self.depth -= 1
            if self.depth == 0 and self.api:
                self.api[1](self.saved)


def _openblas_ctypes():
    """(get, set) of the thread counts of the OpenBLAS libraries loaded (NumPy's wheels
    bundle scipy-openblas, whose symbols carry a prefix and, for 64-bit ints, a suffix)."""
    try:
        with open("/proc/self/maps") as maps:
            paths = sorted({line.split(None, 5)[5].strip() for line in maps
                            if line.count(" ") >= 5 and "openblas" in line.lower()
                            and ".so" in line})
    except (OSError, IndexError):
        return None
    found = []
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for prefix in ("scipy_", ""):
            for suffix in ("64_", ""):
                get = getattr(lib, f"{prefix}openblas_get_num_threads{suffix}", None)
                set_ = getattr(lib, f"{prefix}openblas_set_num_threads{suffix}", None)
                if get is not None and set_ is not None:
                    get.restype, set_.restype = ctypes.c_int, None
                    set_.argtypes = [ctypes.c_int]
                    found.append((get, set_))
                    break
            else:
                continue
            break
    if not found:
        return None
    return (lambda: [get() for get, _ in found],
            lambda counts: [set_(n) for (_, set_), n in zip(found, counts)])


_blas_single = _Blas()


@contextlib.contextmanager
def _blas_limit(n):
    """NumPy's BLAS at ``n`` threads for the duration (bench/cpu.py without threadpoolctl)."""
    api = _blas_single.api if _blas_single.api is not None else _blas_single._find()
    if not api:
        yield
        return
    saved = api[0]()
    api[1]([n] * len(saved))
    try:
        yield
    finally:
        api[1](saved)


class _Scratch:
    """A thread's reusable buffers: ``get(name, shape, dtype)`` is a view of at least that
    size, grown when too small, its contents undefined."""

    def __init__(self):
        self.buffers = {}

    def get(self, name, shape, dtype):
        size = math.prod(shape)
        buf = self.buffers.get(name)
        if buf is None or buf.size < size or buf.dtype != dtype:
            buf = self.buffers[name] = np.empty(max(size, 1), dtype)
        return buf[:size].reshape(shape)


# ------------------------------------------------------------------------------ the work

@dataclasses.dataclass
class _Job:
    """One batch item (a sequence, for varlen) and where its results go.

    q, dout, o, out, dq : (seqlen_q, nheads, headdim) views; K, V : (nheads_kv, seqlen_k,
    headdim + 0 or 1) in the accumulation dtype, rows contiguous (backward's have a column
    of 1 and -1 more); norms : (nheads_kv, seqlen_k), the keys' lengths (forward only);
    lse : (nheads, seqlen_q); dk, dv : (seqlen_k, nheads_kv, headdim) views."""
    b: int
    q: np.ndarray
    K: np.ndarray
    V: np.ndarray
    seqlen_q: int
    seqlen_k: int
    norms: np.ndarray = None
    out: np.ndarray = None
    lse: np.ndarray = None
    dout: np.ndarray = None
    o: np.ndarray = None
    dq: np.ndarray = None
    dk: np.ndarray = None
    dv: np.ndarray = None


def _forward_jobs(jobs, shape, opts, Br, Bc):
    """Fill each job's out and lse: items (job, kv head, query block)."""
    hkv = shape.nheads_kv
    blocks = [(_cost(job, r0, min(r0 + Br, job.seqlen_q), opts), job, r0)
              for job in jobs for r0 in range(0, job.seqlen_q, Br)]
    # The costliest first (causal blocks differ), so that the last ones to start are short.
    items = [(job, h, r0, min(r0 + Br, job.seqlen_q))
             for _, job, r0 in sorted(blocks, key=lambda x: -x[0]) for h in range(hkv)]
    acc = _acc_dtype(jobs[0].q.dtype) if jobs else np.float32
    slopes = _slopes(opts, acc)

    def run(i, scratch):
        job, h, r0, r1 = items[i]
        _forward_block(job, h, r0, r1, shape, opts, slopes, Bc, scratch)

    _parallel(run, len(items), sum(x[0] for x in blocks) * shape.nheads * shape.headdim)


def _backward_jobs(jobs, shape, opts, Br, Bc):
    """Fill each job's dq, dk, dv: items (job, kv head, segment), segment s of n holding
    the query blocks s, s + n, s + 2n, ... (causal blocks differ in cost; this evens it)."""
    hkv = shape.nheads_kv
    pairs = len(jobs) * hkv
    acc = _acc_dtype(jobs[0].q.dtype) if jobs else np.float32
    slopes = _slopes(opts, acc)
    segments, work = [], 0
    for job in jobs:
        blocks = [(r0, min(r0 + Br, job.seqlen_q)) for r0 in range(0, job.seqlen_q, Br)]
        n = max(1, min(len(blocks), -(-MIN_ITEMS // pairs)))
        totals = [_Ordered(n, job, h) for h in range(hkv)]
        for s in range(n):
            cost = sum(_cost(job, r0, r1, opts) for r0, r1 in blocks[s::n])
            segments.append((cost, job, blocks[s::n], s, totals))
            work += cost
    segments.sort(key=lambda x: -x[0])  # the costliest first (stable: segments in order)
    items = [(job, h, blocks, s, totals[h])
             for _, job, blocks, s, totals in segments for h in range(hkv)]

    def run(i, scratch):
        job, h, blocks, s, total = items[i]
        dkv = np.zeros((2, job.seqlen_k, shape.headdim), acc)
        for r0, r1 in blocks:
            _backward_block(job, h, r0, r1, shape, opts, slopes, Bc, scratch, dkv)
        total.add(s, dkv)

    _parallel(run, len(items), 2 * work * shape.nheads * shape.headdim)


class _Ordered:
    """The dK, dV partials of one (job, kv head), summed in segment order whichever thread
    finishes which segment first, then written to the job's dk, dv."""

    def __init__(self, n, job, h):
        self.parts = [None] * n
        self.next = 0
        self.sum = None
        self.lock = threading.Lock()
        self.job, self.h = job, h

    def add(self, s, part):
        with self.lock:
            self.parts[s] = part
            while self.next < len(self.parts) and self.parts[self.next] is not None:
                part, self.parts[self.next] = self.parts[self.next], None
                if self.sum is None:
                    self.sum = part
                else:
                    self.sum += part
                self.next += 1
            if self.next == len(self.parts):
                self.job.dk[:, self.h] = self.sum[0]
                self.job.dv[:, self.h] = self.sum[1]
                self.sum = None


def _cost(job, r0, r1, opts):
    """Scores that query rows [r0, r1) compute for one query head (skipped keys not)."""
    lo, hi = _key_range(r0, r1, job.seqlen_q, job.seqlen_k, opts)
    return (r1 - r0) * max(0, hi - lo)


def _forward_block(job, h, r0, r1, shape, opts, slopes, Bc, scratch):
    """Out and lse of query rows [r0, r1) of the heads of kv head ``h``.

    The online softmax subtracts from each chunk's scores a reference per row, the row's
    maximum in the chunk, except where every score is known to lie within +-BOUND: there
    the reference is 0 and neither the maximum nor the subtraction is computed (exp cannot
    overflow, and a row's largest term is at least e^-BOUND, far from underflow). Known
    from softcap <= BOUND, or from |q . k| <= |q| |k| (the keys' lengths come with the
    job); never with ALiBi, whose distances make scores of any size.
    """
    group = shape.nheads // shape.nheads_kv
    heads = slice(h * group, (h + 1) * group)
    lo, hi = _key_range(r0, r1, job.seqlen_q, job.seqlen_k, opts)
    if lo >= hi:  # no row sees a key
        job.out[r0:r1, heads] = 0
        job.lse[heads, r0:r1] = -np.inf
        return
    acc = job.K.dtype
    rows, d = (r1 - r0) * group, shape.headdim
    Qi = _load_rows(scratch, "q", job.q, r0, r1, heads, acc)
    Qi *= opts.scale
    K, V = job.K[h, :, :d], job.V[h, :, :d]
    slope = None if slopes is None else slopes[job.b, heads]
    capped = bool(opts.softcap) and opts.softcap <= BOUND
    qlen = None if slope is not None or capped else np.sqrt(np.einsum("rd,rd->r", Qi, Qi)).max()
    O = scratch.get("o", (rows, d), acc)
    # l and O are relative to e^m per row; m None: 0 for every row (bounded chunks only).
    m = l = None
    for c0 in range(lo, hi, Bc):
        c1 = min(c0 + Bc, hi)
        St = _scores(scratch, Qi, K[c0:c1], r0, r1, c0, c1, job, opts, slope)[0]
        bounded = capped or (qlen is not None and qlen * job.norms[h, c0:c1].max() <= BOUND)
        if not bounded:
            ref = _column_max(St, scratch)  # -inf for a row that sees no key of the chunk
            # exp(-inf - 0) = 0 there, not exp(-inf + inf) = NaN
            St -= np.where(np.isneginf(ref), 0, ref)
        Pt = np.exp(St, out=St)
        lc = _ones(scratch, c1 - c0, acc) @ Pt
        if c0 == lo:
            l = lc
            m = None if bounded else ref
            np.matmul(Pt.T, V[c0:c1], out=O)
            continue
        Oc = Pt.T @ V[c0:c1]
        if m is None and bounded:
            l += lc
            O += Oc
            continue
        # A bounded chunk's reference is 0 for the rows that see one of its keys (their
        # largest term is at least e^-BOUND) and -inf for the others (they have l == 0),
        # so that a later reference never underflows terms that matter.
        if m is None:
            m = np.where(l == 0, -np.inf, 0).astype(acc)
        if bounded:
            ref = np.where(lc == 0, -np.inf, 0).astype(acc)
        new = np.maximum(m, ref)  # NaN stays
        base = np.where(np.isneginf(new), 0, new)
        alpha, beta = np.exp(m - base), np.exp(ref - base)  # 0 for a -inf reference
        l = l * alpha + lc * beta
        O *= alpha[:, None]
        Oc *= beta[:, None]
        O += Oc
        m = new
    # docs/CONVENTIONS.md: a row that saw no key (l == 0; a NaN l is not one) gets out 0
    # and lse -inf even where a masked value of its chunks was NaN (0 * NaN); a row that
    # met a NaN (in l, from a score, or in O, from a value) is NaN in all of out and in lse.
    if (l > 0).all() and not np.isnan(O).any():  # the common case, in place
        O /= l[:, None]
        lse = np.log(l)
    else:
        empty = l == 0
        nan = ~empty & (np.isnan(l) | np.isnan(O).any(-1))
        l_safe = np.where(empty, 1, l)
        O = np.where(empty[:, None], 0, np.where(nan[:, None], np.nan, O / l_safe[:, None]))
        lse = np.where(empty, -np.inf, np.where(nan, np.nan, np.log(l_safe)))
    if m is not None:  # -inf only where l == 0: lse is -inf there already
        lse += np.where(np.isneginf(m), 0, m)
    job.out[r0:r1, heads] = O.reshape(r1 - r0, group, d)
    job.lse[heads, r0:r1] = lse.reshape(r1 - r0, group).T


def _backward_block(job, h, r0, r1, shape, opts, slopes, Bc, scratch, dkv):
    """dQ of query rows [r0, r1) of the heads of kv head ``h`` into job.dq; their share of
    dK, dV added into ``dkv`` (2, seqlen_k, headdim).

    job.K and job.V carry a column of 1 and -1, the rows of q and dO one of -lse and delta,
    so that one product gives S - lse (but for softcap, which comes between) and another
    dP - delta.
    """
    group = shape.nheads // shape.nheads_kv
    heads = slice(h * group, (h + 1) * group)
    lo, hi = _key_range(r0, r1, job.seqlen_q, job.seqlen_k, opts)
    if lo >= hi:
        job.dq[r0:r1, heads] = 0
        return
    acc = job.K.dtype
    rows, d = (r1 - r0) * group, shape.headdim
    Qa = _load_rows(scratch, "q", job.q, r0, r1, heads, acc, extra=True)
    Qi = Qa[:, :d]
    Qi *= opts.scale  # then dS^T Qi is dK, scale included
    dOa = _load_rows(scratch, "do", job.dout, r0, r1, heads, acc, extra=True)
    dOi = dOa[:, :d]
    Oi = _load_rows(scratch, "o", job.o, r0, r1, heads, acc)
    dOa[:, d] = np.einsum("rd,rd->r", dOi, Oi)  # delta
    lse = job.lse[heads, r0:r1].T.reshape(rows).astype(acc)
    # A row that sees no key (lse -inf) has every score -inf: exp(-inf - 0) = 0, dS = 0.
    lse[np.isneginf(lse)] = 0
    Qa[:, d] = -lse
    K, V = job.K[h], job.V[h]
    slope = None if slopes is None else slopes[job.b, heads]
    dQ = scratch.get("dq", (rows, d), acc)
    for c0 in range(lo, hi, Bc):
        c1 = min(c0 + Bc, hi)
        Kj, Vj = K[c0:c1], V[c0:c1]
        if opts.softcap:  # S - lse: after the cap
            St, tanh = _scores(scratch, Qi, Kj[:, :d], r0, r1, c0, c1, job, opts, slope)
            St -= lse
        else:
            St, tanh = _scores(scratch, Qa, Kj, r0, r1, c0, c1, job, opts, slope)
        Pt = np.exp(St, out=St)
        kv = scratch.get("kv", (c1 - c0, d), acc)
        dkv[1, c0:c1] += np.matmul(Pt, dOi, out=kv)
        dSt = np.matmul(Vj, dOa.T, out=scratch.get("ds", Pt.shape, acc))  # (dP - delta)^T
        dSt *= Pt
        _dominant_ds(dSt, Pt, dOi, Oi, Vj[:, :d])
        if tanh is not None:
            tanh *= tanh
            np.subtract(1, tanh, out=tanh)
            dSt *= tanh  # d/dx softcap * tanh(x / softcap)
        dkv[0, c0:c1] += np.matmul(dSt, Qi, out=kv)
        if c0 == lo:
            np.matmul(dSt.T, Kj[:, :d], out=dQ)
        else:
            dQ += dSt.T @ Kj[:, :d]
    dQ *= opts.scale
    job.dq[r0:r1, heads] = dQ.reshape(r1 - r0, group, d)


def _dominant_ds(dSt, Pt, dOi, Oi, Vj):
    """dS = P (dP - delta) again, in place, where P > 1/2 (at most one key a row).

    There dP - delta = dO . v_j - dO . o is a near-total cancellation: a row that sees one
    key has o == v_j and dS exactly 0, but dP (a matmul) and delta (a row sum) are float32
    dot products summed in different orders, whose difference (~eps * sqrt(headdim)) dQ
    and dK then scale up, past the accuracy rule (tests/test_reliability.py). The same
    quantity as dO . (v_j - o) cancels before summing: exactly 0 for one key, and in
    general an error relative to v_j - o instead of v_j. O(rows * headdim) a block pair.
    ``dSt``, ``Pt`` are transposed: (keys, rows).
    """
    big = Pt > 0.5
    if big.any():
        c, r = np.nonzero(big)
        dSt[c, r] = Pt[c, r] * (dOi[r] * (Vj[c] - Oi[r])).sum(-1)


def _scores(scratch, Qi, Kj, r0, r1, c0, c1, job, opts, slopes):
    """Scores of query rows [r0, r1) (Qi: their heads flattened in, scale applied) x key
    columns [c0, c1), ``-inf`` where masked, transposed: a (c1 - c0, rows) scratch block
    (keys first: the products are ~25% faster that way round), and with softcap the tanh
    that backward differentiates (else None). Qi and Kj may carry one more column each
    (backward's -lse and 1)."""
    acc = Qi.dtype
    St = np.matmul(Kj, Qi.T, out=scratch.get("s", (c1 - c0, Qi.shape[0]), acc))
    tanh = None
    if opts.softcap:
        tanh = np.divide(St, opts.softcap, out=scratch.get("tanh", St.shape, acc))
        np.tanh(tanh, out=tanh)
        np.multiply(tanh, opts.softcap, out=St)
    S3 = St.reshape(c1 - c0, r1 - r0, -1)  # (columns, rows, group), a view
    offset = job.seqlen_k - job.seqlen_q
    if slopes is not None:
        # |i + seqlen_k - seqlen_q - j|: distance from the bottom-right diagonal
        dist = np.abs(np.arange(c0, c1)[:, None]
                      - np.arange(r0 + offset, r1 + offset)[None, :]).astype(acc)
        S3 -= dist[:, :, None] * slopes
    wl, wr = opts.window_left, opts.window_right
    # Columns every row sees: j >= r1 - 1 + offset - wl (left) and j <= r0 + offset + wr.
    f0 = c0 if wl < 0 else min(max(c0, r1 - 1 + offset - wl), c1)
    f1 = c1 if wr < 0 else max(min(c1, r0 + offset + wr + 1), c0)
    for a, b in ((c0, c1),) if f0 >= f1 else ((c0, f0), (f1, c1)):
        if a >= b:
            continue
        diag = np.arange(r0 + offset, r1 + offset)[None, :] - np.arange(a, b)[:, None]
        hidden = np.zeros(diag.shape, bool)
        if wl >= 0:
            hidden |= diag > wl
        if wr >= 0:
            hidden |= -diag > wr
        if hidden.any():
            np.copyto(S3[a - c0:b - c0], -np.inf, where=hidden[:, :, None])
    return St, tanh


def _column_max(x, scratch):
    """x.max(0) of a (n, m) block as a tree of whole-block maximums: ~2x faster than
    NumPy's reduction over the first axis, which loops over rows; NaN propagates."""
    n = x.shape[0]
    src = x
    if n > 1:
        tmp = scratch.get("max", (n // 2, x.shape[1]), x.dtype)
    while n > 1:
        h = n // 2
        np.maximum(src[:h], src[h:2 * h], out=tmp[:h])
        if n % 2:
            np.maximum(tmp[0], src[n - 1], out=tmp[0])
        src, n = tmp, h
    return src[0].copy()


def _ones(scratch, n, dtype):
    """A vector of n ones: its product with a block sums the block's columns (BLAS, ~3x
    faster than NumPy's sum over the first axis)."""
    ones = scratch.buffers.get(("ones", dtype))
    if ones is None or ones.size < n:
        ones = scratch.buffers[("ones", dtype)] = np.ones(max(n, 1), dtype)
    return ones[:n]


def _key_range(r0, r1, seqlen_q, seqlen_k, opts):
    """Columns [lo, hi) seen by at least one of the query rows [r0, r1) (empty if lo >= hi)."""
    offset = seqlen_k - seqlen_q
    lo = 0 if opts.window_left < 0 else max(0, r0 + offset - opts.window_left)
    hi = seqlen_k if opts.window_right < 0 else min(seqlen_k, r1 + offset + opts.window_right)
    return lo, hi


def _load_rows(scratch, name, x, r0, r1, heads, dtype, extra=False):
    """Rows [r0, r1) of heads ``heads`` of x (seqlen, nheads, headdim) as a contiguous
    (rows * group, headdim + extra) scratch block in ``dtype``, ordered (row, head); the
    extra column is left to the caller."""
    block = x[r0:r1, heads]
    b, g, d = block.shape
    dst = scratch.get(name, (b, g, d + extra), dtype)
    np.copyto(dst[..., :d], block)
    return dst.reshape(b * g, d + extra)


def _slopes(opts, dtype):
    """ALiBi slopes (batch, nheads) in ``dtype``, or None."""
    if opts.alibi_slopes is None:
        return None
    return np.asarray(opts.alibi_slopes, dtype)


def _acc_dtype(dtype):
    return np.float64 if dtype == np.float64 else np.float32


def _kv_heads_first(x, dtype, extra=None):
    """(batch, seqlen, nheads_kv, d), any strides -> contiguous (nheads_kv, batch, seqlen, d)
    in ``dtype``, so that every (kv head, batch item) is a run of rows (also for varlen,
    whose batch of one is cut at the sequences' bounds); with ``extra``, one more column
    that holds it."""
    b, s, h, d = x.shape
    out = np.empty((h, b, s, d + (extra is not None)), dtype)
    np.copyto(out[..., :d], x.transpose(2, 0, 1, 3))
    if extra is not None:
        out[..., d] = extra
    return out


def _norms(K, d=None):
    """The lengths of the keys K (..., headdim) (of their first ``d`` entries) -> (...)."""
    K = K[..., :d]
    return np.sqrt(np.einsum("...d,...d->...", K, K))


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
