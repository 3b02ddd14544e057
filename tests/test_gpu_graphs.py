"""CUDA graphs: cuflash calls captured into a CuPy graph and replayed with new inputs.

Each test allocates its input and output buffers on a non-blocking stream, makes one eager
call there first (kernels compile and per-stream workspaces are allocated then, outside the
capture), captures the same calls with preallocated outputs (``out=``, ``lse=``, ``dq=`` ...),
then, several times, copies new inputs into the captured buffers, replays the graph and
compares every output bit for bit with eager calls on the same new inputs. Backward graphs
run ``deterministic=True`` for the bitwise comparison; the atomic backward is also captured
and compared within a few units in the last place (its dQ accumulator must be cleared by
the graph itself on every replay).

Memory that a call might take from CuPy's pool during the capture and give back afterwards
would still be written by every replay: arrays allocated after the capture ("canaries")
must keep their contents through the replays.
"""
import ml_dtypes
import numpy as np
import pytest

import cuflash
from gpu import assert_near, assert_same_bits, bits, import_cupy

pytestmark = pytest.mark.gpu

BF16 = np.dtype(ml_dtypes.bfloat16)
F32 = np.dtype(np.float32)


def capture(stream, fn):
    """``fn()`` captured on ``stream`` into a graph (the capture is ended even if fn fails,
    so that the stream is usable by the next test)."""
    with stream:
        stream.begin_capture()
        try:
            fn()
        except BaseException:
            try:
                stream.end_capture()
            except Exception:
                pass
            raise
        return stream.end_capture()


def empty(shape, dtype):
    """A NaN-filled array on the current stream (0xFF bytes: NaN in bf16 and float32)."""
    cupy = import_cupy()
    x = cupy.empty(shape, dtype)
    cupy.cuda.runtime.memsetAsync(x.data.ptr, 0xFF, x.nbytes,
                                  cupy.cuda.get_current_stream().ptr)
    return x


class Canaries:
    """Arrays allocated on ``stream`` after a capture, of sizes a call's scratch could have,
    filled with a pattern that no replay may change."""

    def __init__(self, stream, sizes):
        cupy = import_cupy()
        with stream:
            self.arrays = [cupy.full(int(n), 0x5A, cupy.uint8) for n in sorted(set(sizes))
                           for _ in range(2)]

    def check(self):
        for a in self.arrays:
            assert bool((a == 0x5A).all()), (f"a replay wrote into memory allocated after the "
                                            f"capture ({a.nbytes} bytes)")


def scratch_sizes(*arrays):
    """Sizes around those of the arrays involved: where a call's temporaries would fall."""
    sizes = [512, 4096, 65536]
    for a in arrays:
        sizes += [a.nbytes // 2, a.nbytes, 2 * a.nbytes, 4 * a.nbytes]
    return [s for s in sizes if s > 0]


def normal(rng, shape, dtype=BF16):
    return rng.standard_normal(shape).astype(dtype)


def put(stream, buffers, values):
    """Copy host ``values`` into the device ``buffers`` on ``stream`` (what feeds a graph)."""
    cupy = import_cupy()
    with stream:
        for buf, x in zip(buffers, values):
            buf[...] = cupy.asarray(x)


# ------------------------------------------------------------------------------- dense


@pytest.mark.parametrize("deterministic", [True, False], ids=["deterministic", "atomic"])
@pytest.mark.parametrize("headdim", [64, 128])
def test_forward_backward(headdim, deterministic):
    cupy = import_cupy()
    rng = np.random.default_rng(headdim)
    batch, seqlen, nheads, nheads_kv = 2, 300, 4, 2
    sq, sk = (batch, seqlen, nheads, headdim), (batch, seqlen, nheads_kv, headdim)
    opts = dict(causal=True)

    def draw():
        return [normal(rng, s) for s in (sq, sk, sk, sq)]  # q, k, v, dout

    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        q, k, v, dout = (cupy.asarray(x) for x in draw())
        out, dq = empty(sq, BF16), empty(sq, BF16)
        dk, dv = empty(sk, BF16), empty(sk, BF16)
        lse = empty((batch, nheads, seqlen), F32)

    def step():
        cuflash.attention_forward(q, k, v, **opts, out=out, lse=lse)
        cuflash.attention_backward(dout, q, k, v, out, lse, **opts, dq=dq, dk=dk, dv=dv,
                                   deterministic=deterministic)

    with stream:
        step()  # eager: compiles, allocates the stream's workspaces
    graph = capture(stream, step)
    canaries = Canaries(stream, scratch_sizes(q, k, lse))

    previous = None
    for _ in range(2):
        new = draw()
        put(stream, (q, k, v, dout), new)
        graph.launch(stream)
        stream.synchronize()
        got = {n: x.get() for n, x in zip(("out", "lse", "dq", "dk", "dv"),
                                            (out, lse, dq, dk, dv))}
        with stream:
            eq, ek, ev, edout = (cupy.asarray(x) for x in new)
            eout, e_lse = cuflash.attention_forward(eq, ek, ev, **opts)
            grads = cuflash.attention_backward(edout, eq, ek, ev, eout, e_lse, **opts,
                                               deterministic=deterministic)
        stream.synchronize()
        assert_same_bits("out", got["out"], eout)
        assert_same_bits("lse", got["lse"], e_lse)
        for name, want in zip(("dq", "dk", "dv"), grads):
            if deterministic:
                assert_same_bits(name, got[name], want)
            else:
                assert_near(name, got[name], want)
        if previous is not None:  # the replay computed, rather than kept, the outputs
            assert not np.array_equal(bits(got["out"]), bits(previous))
        previous = got["out"]
        canaries.check()


# ------------------------------------------------------------------------------- varlen


@pytest.mark.parametrize("headdim", [64, 128])
def test_varlen_forward_backward_with_device_prefix_sums(headdim):
    """Prefix sums live in captured CuPy buffers: replays take new lengths (same totals,
    within the max_seqlen bounds) and, last, invalid ones, which the captured device check
    turns into all-NaN outputs."""
    cupy = import_cupy()
    rng = np.random.default_rng(100 + headdim)
    nheads, nheads_kv, max_q, max_k = 4, 2, 200, 200
    lengths = [((100, 0, 37, 163), (90, 50, 0, 140)),   # eager warm-up and first replay
               ((163, 100, 37, 0), (0, 140, 90, 50)),   # same totals, other sequences
               ((1, 199, 50, 50), (140, 140, 0, 0))]
    total_q, total_k = sum(lengths[0][0]), sum(lengths[0][1])
    sq, sk = (total_q, nheads, headdim), (total_k, nheads_kv, headdim)
    opts = dict(causal=True)

    def cu(lens):
        return np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)

    def draw():
        return [normal(rng, s) for s in (sq, sk, sk, sq)]

    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        q, k, v, dout = (cupy.asarray(x) for x in draw())
        cu_q, cu_k = cupy.asarray(cu(lengths[0][0])), cupy.asarray(cu(lengths[0][1]))
        out, dq = empty(sq, BF16), empty(sq, BF16)
        dk, dv = empty(sk, BF16), empty(sk, BF16)
        lse = empty((nheads, total_q), F32)

    def step():
        cuflash.attention_varlen_forward(q, k, v, cu_q, cu_k, max_q, max_k, **opts, out=out,
                                         lse=lse)
        cuflash.attention_varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k,
                                          **opts, dq=dq, dk=dk, dv=dv, deterministic=True)

    with stream:
        step()
    graph = capture(stream, step)
    canaries = Canaries(stream, scratch_sizes(q, k, lse))

    for lens_q, lens_k in lengths:
        new = draw()
        put(stream, (q, k, v, dout, cu_q, cu_k), new + [cu(lens_q), cu(lens_k)])
        graph.launch(stream)
        stream.synchronize()
        got = [x.get() for x in (out, lse, dq, dk, dv)]
        with stream:
            eq, ek, ev, edout = (cupy.asarray(x) for x in new)
            ecu_q, ecu_k = cupy.asarray(cu(lens_q)), cupy.asarray(cu(lens_k))
            eout, e_lse = cuflash.attention_varlen_forward(eq, ek, ev, ecu_q, ecu_k, max_q,
                                                           max_k, **opts)
            grads = cuflash.attention_varlen_backward(edout, eq, ek, ev, eout, e_lse, ecu_q,
                                                      ecu_k, max_q, max_k, **opts,
                                                      deterministic=True)
        stream.synchronize()
        for name, g, want in zip(("out", "lse", "dq", "dk", "dv"), got,
                                 (eout, e_lse, *grads)):
            assert_same_bits(f"{name} (lengths {lens_q}, {lens_k})", g, want)
        assert np.isfinite(got[0].astype(F32)).all()
        canaries.check()

    bad = cu(lengths[0][0])
    bad[2] = bad[3] + 1  # decreasing
    put(stream, (cu_q, cu_k), (bad, cu(lengths[0][1])))
    graph.launch(stream)
    stream.synchronize()
    for name, x in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, dq, dk, dv)):
        assert np.isnan(x.get().astype(F32)).all(), (
            f"{name}: invalid prefix sums replayed, but not all NaN")
    # Valid ones again: the graph recovers.
    put(stream, (cu_q,), (cu(lengths[0][0]),))
    graph.launch(stream)
    stream.synchronize()
    assert np.isfinite(out.get().astype(F32)).all()


# ------------------------------------------------------------------------------- decode


@pytest.mark.parametrize("num_splits", [None, 8], ids=["splits-default", "splits-8"])
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_decode_step_with_append(paged, num_splits):
    """One decode step (append one key per item, attend) captured once and replayed as the
    next steps: new q, k, v and cache_seqlens + 1 copied into the captured buffers. The
    same steps run eagerly on a separate copy of the caches; outputs and caches must agree
    bit for bit after every step."""
    cupy = import_cupy()
    rng = np.random.default_rng(7 + 2 * paged + (num_splits or 0))
    batch, nheads, nheads_kv, headdim, capacity, page = 3, 8, 2, 128, 1024, 64
    lengths = np.array([5, 300, 900], np.int32)
    sq, snew = (batch, 1, nheads, headdim), (batch, 1, nheads_kv, headdim)
    if paged:
        pages = capacity // page
        num_blocks = batch * pages + 3
        table = rng.permutation(num_blocks)[:batch * pages].reshape(batch, pages)
        table = table.astype(np.int32)
        cache_shape = (num_blocks, page, nheads_kv, headdim)
    else:
        table, cache_shape = None, (batch, capacity, nheads_kv, headdim)
    k_cache0, v_cache0 = normal(rng, cache_shape), normal(rng, cache_shape)
    opts = dict(causal=True, num_splits=num_splits)

    def draw():
        return [normal(rng, sq), normal(rng, snew), normal(rng, snew)]

    stream = cupy.cuda.Stream(non_blocking=True)
    first = draw()
    with stream:
        # The graph's caches and the eager run's, from the same start.
        gk, gv = cupy.asarray(k_cache0), cupy.asarray(v_cache0)
        ek, ev = cupy.asarray(k_cache0), cupy.asarray(v_cache0)
        block_table = None if table is None else cupy.asarray(table)
        q, k, v = (cupy.asarray(x) for x in first)
        seqlens = cupy.asarray(lengths)
        out, lse = empty(sq, BF16), empty((batch, nheads, 1), F32)

    def step():
        cuflash.attention_with_kvcache(q, gk, gv, k=k, v=v, cache_seqlens=seqlens,
                                       block_table=block_table, **opts, out=out, lse=lse,
                                       return_lse=True)

    def eager(new, step_lengths):
        with stream:
            eq, enk, env = (cupy.asarray(x) for x in new)
            return cuflash.attention_with_kvcache(
                eq, ek, ev, k=enk, v=env, cache_seqlens=cupy.asarray(step_lengths),
                block_table=block_table, **opts, return_lse=True)

    with stream:  # step 0, eagerly on both copies
        step()
    eager(first, lengths)
    graph = capture(stream, step)
    # Split-KV partials: float32 (num_splits, ...) copies of out and lse.
    canaries = Canaries(stream, scratch_sizes(q, out, lse)
                        + [s * 4 * x.size for s in (8, 16, 32) for x in (q, lse)])

    for t in range(1, 4):
        new = draw()
        put(stream, (q, k, v, seqlens), new + [lengths + t])
        graph.launch(stream)
        stream.synchronize()
        got_out, got_lse = out.get(), lse.get()
        want_out, want_lse = eager(new, lengths + t)
        stream.synchronize()
        assert_same_bits(f"out (step {t})", got_out, want_out)
        assert_same_bits(f"lse (step {t})", got_lse, want_lse)
        assert_same_bits(f"k_cache (step {t})", gk, ek)
        assert_same_bits(f"v_cache (step {t})", gv, ev)
        canaries.check()
    # The appended keys landed where step t put them (not all at the captured length).
    for b in range(batch):
        for t in range(4):
            pos = int(lengths[b]) + t
            page_b, row = ((table[b, pos // page], pos % page) if paged else (b, pos))
            assert not np.array_equal(bits(gk[page_b, row]), bits(k_cache0[page_b, row])), (
                f"no key appended at position {pos} of item {b}")


# ------------------------------------------------------------------------------- merge


def test_merge():
    cupy = import_cupy()
    rng = np.random.default_rng(5)
    parts, batch, seqlen_q, nheads, headdim = 3, 2, 37, 4, 64
    so, sl = (parts, batch, seqlen_q, nheads, headdim), (parts, batch, nheads, seqlen_q)

    def draw():
        lses = (rng.standard_normal(sl) * 3).astype(np.float32)
        lses[1, 0, :, :5] = -np.inf
        lses[:, 1, 2, 7] = -np.inf
        return [normal(rng, so), lses]

    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        outs, lses = (cupy.asarray(x) for x in draw())
        out, lse = empty(so[1:], BF16), empty(sl[1:], F32)

    def step():
        cuflash.merge_attention(outs, lses, out=out, lse=lse)

    with stream:
        step()
    graph = capture(stream, step)
    canaries = Canaries(stream, scratch_sizes(outs, lses))
    for _ in range(2):
        new = draw()
        put(stream, (outs, lses), new)
        graph.launch(stream)
        stream.synchronize()
        got = out.get(), lse.get()
        with stream:
            want = cuflash.merge_attention(*(cupy.asarray(x) for x in new))
        stream.synchronize()
        assert_same_bits("out", got[0], want[0])
        assert_same_bits("lse", got[1], want[1])
        canaries.check()
