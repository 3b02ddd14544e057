"""The varlen backward on Hopper: the VARLEN instantiations of bwd_sm90 and bwd_sm90_wide
(kernels_cu/flash_bwd_sm90.cu).

On sm_90, fp16/bf16 varlen backward calls (deterministic, soft-cap and ALiBi too) run the
wgmma kernel of the dense path with its VARLEN template flag: bwd_sm90 with head dims padded
to 64 or 128, bwd_sm90_wide over 128. The expected result is the dense float64 reference
run on each sequence alone (the rule of tests/accuracy.py), with the sequences' lengths
including 0 and 1 and differing between queries and keys. out/lse come from that reference
(uploaded), so these tests do not depend on the forward kernel, except the vjp test, which
takes the GPU forward.

Every backward runs under the NaN-poisoning allocator of tests/gpu.py: gradients must be
finite wherever the reference is (every row written, nothing left from the poison), and the
call may allocate only the gradients and the O(total_q * headdim) float32 scratch. On other
GPUs the same calls run bwd_main's VARLEN instantiations and must pass too; the tests that
are about the wgmma kernel itself (dispatch, equality with the dense wgmma kernel) skip.
"""
import ml_dtypes
import numpy as np
import pytest

import cuflash
from accuracy import assert_close
from cuflash import ops, reference
from gpu import array_module, device_arch, dq_scratch_bytes, import_cupy, launches, poisoned

import test_gpu_backward

BF16 = np.dtype(ml_dtypes.bfloat16)
F16 = np.dtype(np.float16)

# Per sequence: long (more than 8 key blocks), no queries, 1 x 1, no keys, more keys than
# queries, more queries than keys.
LENS_Q = (1025, 0, 1, 17, 97, 300)
LENS_K = (1025, 5, 1, 0, 200, 97)


def _cu(lengths):
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)


def _pack(rng, dtype, lens_q, lens_k, nheads, nheads_kv, headdim):
    """Random packed q, k, v, dout and the two prefix sums (host arrays)."""
    cu_q, cu_k = _cu(lens_q), _cu(lens_k)
    q = rng.standard_normal((cu_q[-1], nheads, headdim)).astype(dtype)
    k = rng.standard_normal((cu_k[-1], nheads_kv, headdim)).astype(dtype)
    v = rng.standard_normal((cu_k[-1], nheads_kv, headdim)).astype(dtype)
    dout = rng.standard_normal(q.shape).astype(dtype)
    return q, k, v, dout, cu_q, cu_k


def _items(cu_q, cu_k):
    for b in range(len(cu_q) - 1):
        yield slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])


def _dense_forward(q, k, v, cu_q, cu_k, **opts):
    """out (q's dtype) and lse (float32, (nheads, total_q)) by the reference, per sequence
    (on the GPU for CuPy arrays)."""
    xp = array_module(q)
    out = xp.zeros(q.shape, np.float64)
    lse = xp.full((q.shape[1], q.shape[0]), -np.inf)
    for rq, rk in _items(cu_q, cu_k):
        o, l = reference.attention_forward(q[None, rq], k[None, rk], v[None, rk], **opts)
        out[rq], lse[:, rq] = o[0], l[0]
    return out.astype(q.dtype), lse.astype(np.float32)


def _dense_backward(dout, q, k, v, cu_q, cu_k, upcast, **opts):
    xp = array_module(q)
    grads = tuple(xp.zeros(x.shape, np.float64 if upcast else x.dtype) for x in (q, k, v))
    for rq, rk in _items(cu_q, cu_k):
        g = reference.attention_backward(dout[None, rq], q[None, rq], k[None, rk],
                                         v[None, rk], upcast=upcast, **opts)
        for total, part, rows in zip(grads, g, (rq, rk, rk)):
            total[rows] = part[0]
    return grads


def _gpu_backward(dout, q, k, v, out, lse, cu_q, cu_k, **opts):
    """attention_varlen_backward on the GPU under the poisoning allocator, with the
    allocation bound checked, and the names of the kernels it launched."""
    cp = import_cupy()
    g = [cp.asarray(x) for x in (dout, q, k, v, out, lse, cu_q, cu_k)]
    lens_q, lens_k = np.diff(cu_q), np.diff(cu_k)
    with launches() as launched:
        grads, sizes = poisoned(cuflash.attention_varlen_backward, *g, int(lens_q.max()),
                                int(lens_k.max()), **opts)
    # Gradients plus one scratch allocation: lse_log2 and delta of (nheads, total_q rounded
    # down to 16 + 144 per sequence) rows, aligned to 256 bytes, and the dq scratch.
    batch, nheads = len(lens_q), q.shape[1]
    rows = nheads * (q.shape[0] // 16 * 16 + ops.backward.VARLEN_GAP * batch)
    allowed = sum(x.nbytes for x in grads) + 2 * (-(-4 * rows // 256) * 256) + \
        dq_scratch_bytes(rows, q.shape[2], opts.get("deterministic", False), launched)
    assert sum(sizes) <= allowed + 512 * len(sizes), f"allocated {sizes}; allowed {allowed}"
    return grads, [n for _, n in launched]


def _pick_sm90(dtype, headdim, deterministic, arch, varlen=True, **problem):
    """The two Steps (bwd_sm90 or bwd_sm90_wide, its dQ conversion) that ops.backward.choose
    picks for one packed (70, 2, headdim) sequence (``varlen=False``: a dense batch), or None
    where it picks bwd_main."""
    steps = test_gpu_backward._pick_sm90(dtype, headdim, deterministic, arch, varlen=varlen,
                                         **problem)
    assert steps is None or (len(steps) == 2 and steps[1].filename == ops.backward.SM90_FILE)
    return steps


def _expects_wgmma(dtype, headdim, deterministic=False, softcap=0.0):
    return _pick_sm90(dtype, headdim, deterministic, device_arch(), softcap=softcap)


def check(dtype, lens_q, lens_k, nheads, nheads_kv, headdim, seed=None, **opts):
    """One varlen backward on random data against the per-sequence reference; returns the
    gradients (CuPy) and the inputs (host)."""
    if seed is None:
        seed = int(np.random.SeedSequence().entropy % 2**32)
    rng = np.random.default_rng(seed)
    inputs = _pack(rng, np.dtype(dtype), lens_q, lens_k, nheads, nheads_kv, headdim)
    # The reference runs on the GPU too (in float64).
    (q, k, v, dout), (cu_q, cu_k) = (import_cupy().asarray(x) for x in inputs[:4]), inputs[4:]
    math = {name: value for name, value in opts.items() if name != "deterministic"}
    out, lse = _dense_forward(q, k, v, cu_q, cu_k, **math)
    grads, launched = _gpu_backward(dout, q, k, v, out, lse, cu_q, cu_k, **opts)
    pick = _expects_wgmma(dtype, headdim, opts.get("deterministic", False),
                          opts.get("softcap", 0.0))
    if pick is not None:  # sm_90: the varlen call ran the Hopper kernel and its conversion
        assert all(s.name_expression in launched for s in pick), launched
    ref = _dense_backward(dout, q, k, v, cu_q, cu_k, True, **math)
    naive = _dense_backward(dout, q, k, v, cu_q, cu_k, False, **math)
    where = (f"seed {seed}, {np.dtype(dtype)}, lens_q {lens_q} lens_k {lens_k} "
             f"h{nheads}/{nheads_kv} d{headdim} {opts}")
    for name, got, x, r, n in zip(("dq", "dk", "dv"), grads, (q, k, v), ref, naive):
        assert got.shape == x.shape and got.dtype == x.dtype, name
        assert_close(f"{name} ({where})", got, r, n)
    return grads, (*inputs[:4], out.get(), lse.get(), cu_q, cu_k)


# --------------------------------------------------------------------------- no GPU needed

def test_dispatch_routes_varlen_to_wgmma_on_sm90():
    pick = _pick_sm90
    assert pick(BF16, 128, False, "sm_90")[0].name_expression == \
        "cuflash::bwd_sm90<__nv_bfloat16, 128, 128, 64, 0, true>"
    got = pick(F16, 40, False, "sm_90")
    assert [s.name_expression for s in got] == [
        "cuflash::bwd_sm90<__half, 64, 128, 128, 0, true>",
        "cuflash::bwd_convert_dq_sm90<__half, 64, true>"]
    # The two Steps of sm90_steps, which the dispatcher returns as they are.
    assert got == ops.backward.sm90_steps(F16, 40, 0, True, False)
    # Dense names end without the varlen flag; varlen follows the dense rules otherwise.
    assert pick(F16, 64, False, "sm_90", varlen=False)[0].name_expression == \
        "cuflash::bwd_sm90<__half, 64, 128, 128, 0>"
    # Soft-cap / ALiBi on wgmma too.
    assert pick(BF16, 128, False, "sm_90", softcap=2.0)[0].name_expression == \
        "cuflash::bwd_sm90<__nv_bfloat16, 128, 128, 64, 1, true>"  # OPTS_SOFTCAP
    assert pick(F16, 64, False, "sm_90", softcap=2.0)[0].name_expression == \
        "cuflash::bwd_sm90<__half, 64, 192, 64, 1, true>"  # three MMA warpgroups
    assert pick(F16, 64, False, "sm_90", alibi=True)[0].name_expression == \
        "cuflash::bwd_sm90<__half, 64, 128, 128, 2, true>"  # OPTS_ALIBI
    assert pick(BF16, 128, True, "sm_90")[0].name_expression == \
        "cuflash::bwd_sm90<__nv_bfloat16, 128, 128, 64, 0, true>"  # deterministic too
    assert [s.name_expression for s in pick(BF16, 200, False, "sm_90")] == [
        "cuflash::bwd_sm90_wide<__nv_bfloat16, 256, 0, true>",
        "cuflash::bwd_convert_dq_sm90<__nv_bfloat16, 256, true>"]
    assert pick(F16, 256, True, "sm_90")[0].name_expression == \
        "cuflash::bwd_sm90_wide<__half, 256, 0, true>"  # deterministic too
    for args, problem in (((BF16, 128, False, "sm_80"), {}),
                          ((np.float32, 128, False, "sm_90"), {})):
        assert pick(*args, **problem) is None, (args, problem)
    # The compile check (CI) compiles every varlen instantiation.
    kernels = {name for _, name, _ in ops.all_kernels("sm_90")}
    for dtype in (F16, BF16):
        for hd in (64, 128, 256):
            for step in pick(dtype, hd, False, "sm_90"):
                assert step.name_expression.endswith(", true>"), step
                assert step.name_expression in kernels


# --------------------------------------------------------------------------- GPU

OPTIONS = {
    "none": dict(),
    "causal": dict(causal=True),
    "window": dict(window=(40, 7)),
    "window-left-scale": dict(window=(100, None), scale=0.2),
    "causal-det": dict(causal=True, deterministic=True),
    "window-det": dict(window=(40, 7), deterministic=True),
}


@pytest.mark.gpu
@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
@pytest.mark.parametrize("headdim", [64, 128, 256])
@pytest.mark.parametrize("dtype", [F16, BF16], ids=["fp16", "bf16"])
def test_matches_reference(dtype, headdim, options):
    check(dtype, LENS_Q, LENS_K, 4, 2, headdim, **options)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,headdim", [(BF16, 64), (BF16, 128), (BF16, 256), (F16, 64),
                                           (F16, 40)])
def test_softcap(dtype, headdim):
    """Soft-capping, on wgmma on sm_90 (float16 at head dims up to 64: three MMA
    warpgroups)."""
    with launches() as launched:
        check(dtype, LENS_Q, LENS_K, 4, 2, headdim, softcap=3.0, causal=True)
    on_wgmma = any(f == ops.backward.SM90_FILE for f, _ in launched)
    assert on_wgmma == (device_arch() == "sm_90"), launched


@pytest.mark.gpu
@pytest.mark.parametrize("headdim", [40, 104, 200])
def test_padded_headdims(headdim):
    """Head dims below 64 / 128 / 256: columns zero-filled on load and skipped on store."""
    check(BF16, (97, 1, 130), (200, 1, 129), 2, 1, headdim, causal=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [F16, BF16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("ratio,headdim,options", [
    (4, 128, dict(causal=True)), (8, 64, dict(window=(33, 0))), (8, 128, {}),
    (2, 256, dict(causal=True, deterministic=True)),
], ids=["4:1-d128-causal", "8:1-d64-window", "8:1-d128", "2:1-d256-causal-det"])
def test_gqa(dtype, ratio, headdim, options):
    check(dtype, (150, 1, 0, 77, 300), (150, 33, 9, 300, 129), 8, 8 // ratio, headdim,
          **options)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_many_sequences(causal):
    """60 sequences of 0 to 200 tokens: every item's scratch rows, early exits of key blocks
    past short items, query blocks straddling the ends of items."""
    rng = np.random.default_rng(60)
    lens_q = tuple(int(x) for x in rng.integers(0, 201, 60))
    lens_k = tuple(int(x) for x in rng.integers(0, 201, 60))
    check(BF16, lens_q, lens_k, 2, 1, 64, **({"causal": True} if causal else {}))


@pytest.mark.gpu
@pytest.mark.parametrize("headdim", [64, 128, 256])
def test_equals_dense_wgmma_per_sequence(headdim):
    """Each sequence through the dense Hopper backward alone: dK and dV bitwise equal (the
    same CTAs, the same arithmetic, no atomics), dQ within a few 16-bit ulps (its tiles are
    sums of reductions, whose order varies run to run)."""
    if device_arch() != "sm_90":
        pytest.skip("the wgmma backward runs on sm_90 only")
    cp = import_cupy()
    opts = dict(causal=True)
    (dq, dk, dv), (q, k, v, dout, out, lse, cu_q, cu_k) = check(
        BF16, (1025, 97, 17, 1, 300), (1025, 200, 17, 1, 97), 4, 2, headdim, seed=headdim,
        **opts)
    ulp = 2.0 ** -7
    for b, (rq, rk) in enumerate(_items(cu_q, cu_k)):
        x = [cp.asarray(a[None, r]) for a, r in zip((dout, q, k, v, out), (rq, rq, rk, rk, rq))]
        want = cuflash.attention_backward(*x, cp.asarray(lse[None, :, rq].copy()), **opts)
        for name, got, w, rows in (("dk", dk, want[1], rk), ("dv", dv, want[2], rk)):
            assert np.array_equal(got[rows].get().view(np.uint16), w[0].get().view(np.uint16)), \
                f"{name} of sequence {b} differs from the dense kernel's"
        a, w = dq[rq].get().astype(np.float64), want[0][0].get().astype(np.float64)
        diff = np.abs(a - w).max()
        assert diff <= 4 * ulp * max(1.0, np.abs(w).max()), f"dq of sequence {b}: {diff:.3e}"


@pytest.mark.gpu
@pytest.mark.parametrize("headdim", [64, 128, 256])
def test_nan_neighbours_do_not_leak(headdim):
    """One sequence full of NaN (inputs, out, lse) between finite ones: the finite ones'
    gradients are still right and finite, because every load past a sequence's rows is
    bounded and its dQ reduce-adds stay in its own scratch rows."""
    rng = np.random.default_rng(7)
    lens_q, lens_k = (130, 61, 200, 5), (77, 40, 129, 300)
    q, k, v, dout, cu_q, cu_k = _pack(rng, BF16, lens_q, lens_k, 4, 2, headdim)
    out, lse = _dense_forward(q, k, v, cu_q, cu_k, causal=True)
    bad_q, bad_k = slice(cu_q[1], cu_q[2]), slice(cu_k[1], cu_k[2])
    for x, rows in ((q, bad_q), (dout, bad_q), (out, bad_q), (k, bad_k), (v, bad_k)):
        x[rows] = np.nan
    lse[:, bad_q] = np.nan
    grads, _ = _gpu_backward(dout, q, k, v, out, lse, cu_q, cu_k, causal=True)
    keep_q = np.r_[0:cu_q[1], cu_q[2]:cu_q[-1]]
    keep_k = np.r_[0:cu_k[1], cu_k[2]:cu_k[-1]]
    ref = _dense_backward(dout, q, k, v, cu_q, cu_k, True, causal=True)
    naive = _dense_backward(dout, q, k, v, cu_q, cu_k, False, causal=True)
    for name, got, r, n, rows in zip(("dq", "dk", "dv"), grads, ref, naive,
                                     (keep_q, keep_k, keep_k)):
        assert_close(name, got[rows], r[rows], n[rows])


@pytest.mark.gpu
def test_gradients_are_the_vjp_of_the_forward():
    """<dout, d out(x + t delta) / dt> at t = 0 (central differences of the float64
    reference) equals <dq, delta_q> + <dk, delta_k> + <dv, delta_v> from the GPU forward and
    backward, and the varlen gradients equal attention_vjp's per sequence (same kernels)."""
    cp = import_cupy()
    rng = np.random.default_rng(5)
    lens_q, lens_k = (130, 1, 77), (200, 9, 77)
    q, k, v, dout, cu_q, cu_k = _pack(rng, BF16, lens_q, lens_k, 4, 1, 64)
    opts = dict(causal=True)
    g = [cp.asarray(x) for x in (q, k, v, cu_q, cu_k)]
    out, lse = cuflash.attention_varlen_forward(*g, max(lens_q), max(lens_k), **opts)
    grads = cuflash.attention_varlen_backward(cp.asarray(dout), *g[:3], out, lse, *g[3:],
                                              max(lens_q), max(lens_k), **opts)
    grads = [x.get().astype(np.float64) for x in grads]
    deltas = [rng.standard_normal(x.shape) for x in (q, k, v)]
    x64 = [x.astype(np.float64) for x in (q, k, v)]
    eps = 1e-4

    def f(t):  # <dout, out(x + t delta)> in float64
        moved = [x + t * d for x, d in zip(x64, deltas)]
        return np.sum(dout.astype(np.float64) * _forward64(*moved, cu_q, cu_k, **opts))

    directional = (f(eps) - f(-eps)) / (2 * eps)
    got = sum(np.sum(gr * d) for gr, d in zip(grads, deltas))
    scale = sum(np.abs(gr * d).sum() for gr, d in zip(grads, deltas))
    assert abs(got - directional) <= 2e-2 * scale, (got, directional, scale)
    for b, (rq, rk) in enumerate(_items(cu_q, cu_k)):
        x = [cp.asarray(a[None, r]) for a, r in zip((q, k, v), (rq, rk, rk))]
        _, vjp = cuflash.attention_vjp(*x, **opts)
        wants = vjp(cp.asarray(dout[None, rq]))
        for name, got_b, want, rows in zip(("dq", "dk", "dv"), grads, wants, (rq, rk, rk)):
            np.testing.assert_allclose(got_b[rows], want[0].get().astype(np.float64),
                                       rtol=2e-2, atol=2e-2, err_msg=f"{name} of sequence {b}")


def _forward64(q, k, v, cu_q, cu_k, **opts):
    """out in float64 by the reference, per sequence."""
    out = np.zeros(q.shape)
    for rq, rk in _items(cu_q, cu_k):
        out[rq] = reference.attention_forward(q[None, rq], k[None, rk], v[None, rk], **opts)[0][0]
    return out
