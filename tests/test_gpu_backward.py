"""GPU backward kernels (kernels_cu/flash_bwd.cu) against the float64 reference.

out/lse come from the CPU reference (uploaded), so these tests do not depend on the GPU
forward kernel. Every backward call runs under an allocator hook that fills each new
allocation with 0xFF bytes (NaN in float16, bfloat16 and float32) and records its size:
gradients must be finite wherever the reference is (every element written), and the call
may allocate only the gradients and O(seqlen * headdim) float32 scratch.
"""
import ml_dtypes
import numpy as np
import pytest

from accuracy import assert_close
from cuflash import _checks, reference
from gpu import device_arch, dq_scratch_bytes, forget_plans, import_cupy, launches, poisoned

pytestmark = pytest.mark.gpu

BF16 = np.dtype(ml_dtypes.bfloat16)


def _randn(rng, shape, dtype):
    return rng.standard_normal(shape).astype(dtype)


@pytest.mark.parametrize("dtype", [np.float16, BF16, np.float32])
@pytest.mark.parametrize("seqlen_q,headdim", [(1, 32), (97, 40), (200, 256)])
def test_preprocess_delta_and_lse(dtype, seqlen_q, headdim):
    """delta = rowsum(dout * out) in float32 from strided views; lse in base 2, +inf when -inf;
    dq_accum zeroed. bwd_preprocess alone (the first launch of a backward plan), into
    scratch filled with NaN bytes."""
    cp = import_cupy()
    from cuflash import _core, ops
    rng = np.random.default_rng(seqlen_q)
    b, h = 2, 3
    # Non-contiguous views: heads interleaved with a spare head, rows of out reversed.
    out_full = _randn(rng, (b, seqlen_q, h + 1, headdim), dtype)
    dout_full = _randn(rng, (b, seqlen_q, h, 2 * headdim), dtype)
    out_h, dout_h = out_full[:, ::-1, :h], dout_full[..., :headdim]
    lse_h = rng.standard_normal((b, h, 2 * seqlen_q)).astype(np.float32)[..., ::2]
    lse_h[0, 1, 0] = -np.inf
    out, dout, lse = cp.asarray(out_full)[:, ::-1, :h], cp.asarray(dout_full)[..., :headdim], \
        cp.asarray(lse_h.copy())
    q = cp.asarray(_randn(rng, (b, seqlen_q, h, headdim), dtype))
    shape = _checks.check_qkv(q, q, q, gpu=True)
    opts = _checks.options(shape, "cupy", q)
    strides = (out.strides, dout.strides, lse.strides, q.strides, q.strides, q.strides)
    plan = ops.backward.plan(_core.problem(q, q, q, shape, opts), strides, False)
    pre = plan.kernels[0]
    assert pre.filename == ops.backward.FILE and pre.name.startswith("cuflash::bwd_preprocess<")
    # Scratch: lse_log2 and delta of (b, h, seqlen_q padded) floats, each aligned to 256
    # bytes, then dq_accum (head dim padded: on sm_90 fp16/bf16 to the Hopper backward's
    # instantiation, ops.backward.sm90_headdim, e.g. 32 -> 64).
    pad = -(-seqlen_q // ops.backward.SCRATCH_TILE) * ops.backward.SCRATCH_TILE
    padded = ops.backward.sm90_headdim if plan.steps[0].filename == ops.backward.SM90_FILE \
        else ops.tiles.padded_headdim
    rows, headdim_pad = b * h * pad, padded(headdim)
    assert plan.with_accum and plan.delta_offset == -(-4 * rows // 256) * 256
    assert plan.accum_offset == 2 * plan.delta_offset
    assert plan.scratch_bytes == plan.accum_offset + 4 * rows * headdim_pad
    scratch = cp.full(plan.scratch_bytes, 0xFF, np.uint8)
    base = scratch.data.ptr
    argv = plan.record.fill(q.data.ptr, q.data.ptr, q.data.ptr, 0, 0, 0, out.data.ptr,
                            dout.data.ptr, lse.data.ptr, 0, 0, 0, base,
                            base + plan.delta_offset, base + plan.accum_offset)
    pre(cp.cuda.get_current_stream().ptr, argv)

    def floats(offset, count):
        return scratch[offset:offset + 4 * count].view(np.float32).get()

    want = np.einsum("bihd,bihd->bhi", dout_h.astype(np.float64), out_h.astype(np.float64))
    delta = floats(plan.delta_offset, rows).reshape(b, h, pad)
    assert np.all(delta[..., seqlen_q:] == 0)
    np.testing.assert_allclose(delta[..., :seqlen_q], want, rtol=1e-5, atol=1e-5 * headdim)
    lse2 = floats(0, rows).reshape(b, h, pad)
    assert np.all(lse2[..., seqlen_q:] == np.inf)
    assert lse2[0, 1, 0] == np.inf
    np.testing.assert_allclose(lse2[..., :seqlen_q][np.isfinite(lse_h)],
                               (lse_h * np.log2(np.e))[np.isfinite(lse_h)], rtol=1e-6)
    assert not floats(plan.accum_offset, rows * headdim_pad).any()


F16 = np.dtype(np.float16)
F32 = np.dtype(np.float32)


def _mma_sync_backward(dout, q, k, v, out, lse, deterministic=False, alibi_slopes=None,
                       **opts):
    """attention_backward through bwd_main whatever the GPU, sm_90 included (the
    ``hopper=False`` override of ops.backward.Launch), with the problem and strides built
    as cuflash.attention_backward builds them for CuPy arrays."""
    from cuflash import _api, ops
    p = ops.dense_problem(q, k, v, alibi_slopes=alibi_slopes, **opts)
    strides = (out.strides, dout.strides, lse.strides,
               *(_api.contiguous_strides(x.shape, x.dtype.itemsize) for x in (q, k, v)))
    launch = ops.backward.Launch(p, strides, bool(deterministic), hopper=False)
    return launch(dout, q, k, v, out, lse, alibi_slopes)


def _gpu_backward(dout, q, k, v, out, lse, hopper=True, **opts):
    """The GPU backward under the poisoning allocator, with what it allocates checked;
    ``hopper=False``: through bwd_main even on sm_90."""
    import cuflash
    from cuflash import ops
    run = cuflash.attention_backward if hopper else _mma_sync_backward
    with launches() as launched:
        grads, sizes = poisoned(run, dout, q, k, v, out, lse, **opts)
    if not hopper:
        assert all(f != ops.backward.SM90_FILE for f, _ in launched), launched
    # Gradients, plus one float32 scratch allocation: lse_log2 and delta (rows padded to the
    # largest query tile), each aligned to 256 bytes, and the dq scratch.
    b, sq, h, d = q.shape
    rows = b * h * -(-sq // ops.backward.SCRATCH_TILE) * ops.backward.SCRATCH_TILE
    allowed = sum(g.nbytes for g in grads) + 2 * (-(-4 * rows // 256) * 256) + \
        dq_scratch_bytes(rows, d, opts.get("deterministic", False), launched)
    # Copies that make rows 16-byte aligned, if the inputs needed them.
    allowed += sum(x.nbytes for x in (dout, q, k, v, out)
                   if x.data.ptr % 16 or any(s % 16 for s in x.strides[:-1]))
    got = sum(sizes)
    assert got <= allowed + 512 * len(sizes), (
        f"backward allocated {got} bytes in {sizes}; allowed O(seqlen*headdim) "
        f"{allowed}")
    return grads


def check(dtype, batch, seqlen_q, seqlen_k, nheads, nheads_kv, headdim, layout="contiguous",
          alibi=None, deterministic=False, seed=None, hopper=True, **opts):
    """One backward on random data; the accuracy rule on dq, dk, dv. Returns the gradients.

    layout: "contiguous", or "strided": q/k/v slices of one packed tensor, dout and out
    stored (batch, nheads, seqlen, headdim) and passed transposed.
    alibi: None, "heads" (slopes (nheads,)) or "batch" (slopes (batch, nheads)).
    hopper: False runs bwd_main on sm_90 too (the Hopper kernel's comparison).
    """
    cp = import_cupy()
    if seed is None:
        seed = int(np.random.SeedSequence().entropy % 2**32)
    rng = np.random.default_rng(seed)
    dtype = np.dtype(dtype)
    shape_q = (batch, seqlen_q, nheads, headdim)
    if layout == "strided":
        assert seqlen_q == seqlen_k
        packed = cp.asarray(_randn(rng, (batch, seqlen_q, nheads + 2 * nheads_kv, headdim),
                                   dtype))
        q, k, v = (packed[:, :, :nheads], packed[:, :, nheads:nheads + nheads_kv],
                   packed[:, :, nheads + nheads_kv:])
    else:
        shape_kv = (batch, seqlen_k, nheads_kv, headdim)
        q, k, v = (cp.asarray(_randn(rng, x, dtype)) for x in (shape_q, shape_kv, shape_kv))
    hdout = _randn(rng, shape_q, dtype)
    if alibi == "heads":
        slopes = rng.uniform(0.01, 0.5, nheads).astype(np.float32)
    elif alibi == "batch":
        slopes = rng.uniform(0.01, 0.5, (batch, nheads)).astype(np.float32)
    if alibi:
        opts["alibi_slopes"] = slopes
    # The reference runs on the GPU too (in float64), on the arrays the kernel reads.
    ref_out, ref_lse = reference.attention_forward(q, k, v, upcast=True, **opts)
    out, lse = ref_out.astype(dtype), ref_lse.astype(np.float32)
    if layout == "strided":
        out = cp.ascontiguousarray(out.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)
        dout = cp.asarray(np.ascontiguousarray(hdout.transpose(0, 2, 1, 3))).transpose(0, 2, 1, 3)
    else:
        out, dout = cp.ascontiguousarray(out), cp.asarray(hdout)
    gopts = dict(opts)
    if alibi:
        gopts["alibi_slopes"] = cp.asarray(slopes)
    grads = _gpu_backward(dout, q, k, v, out, lse, hopper=hopper, deterministic=deterministic,
                          **gopts)
    ref = reference.attention_backward(dout, q, k, v, upcast=True, **opts)
    naive = reference.attention_backward(dout, q, k, v, upcast=False, **opts)
    where = (f"seed {seed}, {dtype}, b{batch} sq{seqlen_q} sk{seqlen_k} h{nheads}/{nheads_kv} "
             f"d{headdim} {layout} alibi={alibi} det={deterministic} {opts}")
    for name, got, r, n, x in zip(("dq", "dk", "dv"), grads, ref, naive, (q, k, v)):
        assert got.shape == x.shape and got.dtype == dtype, name
        assert_close(f"{name} ({where})", got, r, n)
    return grads, tuple(r.get() for r in ref)


@pytest.mark.parametrize("dtype", [F16, BF16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("headdim", [32, 40, 64, 96, 128, 192, 256])
def test_headdims(dtype, headdim):
    check(dtype, 2, 145, 211, 3, 3, headdim)
    check(dtype, 1, 97, 97, 2, 2, headdim, causal=True, deterministic=True)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("seqlen_q, seqlen_k", [
    (1, 1), (17, 17), (97, 97), (1025, 1025), (1, 1025), (17, 97), (97, 17), (1025, 17),
])
def test_seqlens(seqlen_q, seqlen_k, causal):
    check(BF16, 1, seqlen_q, seqlen_k, 2, 1, 64, causal=causal)


@pytest.mark.parametrize("dtype", [F16, BF16, F32], ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("opts", [
    dict(softcap=3.0),
    dict(softcap=1.5, causal=True),
    dict(alibi="heads"),
    dict(alibi="batch", causal=True),
    dict(alibi="heads", softcap=5.0, window=(40, 7)),
    dict(window=(64, None)),
    dict(window=(None, 33)),
    dict(window=(0, 0), scale=0.3),
    dict(window=(100, 20), deterministic=True),
    dict(causal=True, deterministic=True),
    dict(alibi="heads", deterministic=True),
    dict(alibi="heads", softcap=5.0, deterministic=True),
    dict(softcap=1e5),
    dict(softcap=30.0, scale=4.0),  # the largest logits in the tanh's flat region
    dict(softcap=200.0),  # tanh arguments ~0.005: its error must be relative
], ids=["softcap", "softcap-causal", "alibi", "alibi-batch-causal", "all", "left",
        "right", "diagonal-scale", "window-det", "causal-det", "alibi-det", "all-det",
        "softcap-large",
        "softcap-saturated", "softcap-small-arguments"])
def test_features(dtype, opts):
    check(dtype, 2, 203, 301, 4, 2, 40 if dtype == F32 else 64, **opts)


@pytest.mark.parametrize("ratio", [1, 4, 8])
@pytest.mark.parametrize("dtype", [F16, BF16], ids=["fp16", "bf16"])
def test_gqa(dtype, ratio):
    check(dtype, 2, 150, 150, 8, 8 // ratio, 128, causal=ratio == 4)
    check(dtype, 1, 97, 211, 8, 8 // ratio, 64, deterministic=True)


@pytest.mark.parametrize("dtype", [BF16, F32], ids=["bf16", "fp32"])
def test_strided_inputs(dtype):
    check(dtype, 3, 130, 130, 4, 2, 96, layout="strided", causal=True)
    check(dtype, 2, 70, 70, 2, 1, 40, layout="strided", softcap=2.0, deterministic=True)


@pytest.mark.parametrize("dtype", [F16, BF16, F32], ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "det"])
def test_fully_masked_rows(dtype, deterministic):
    # Causal with seqlen_q > seqlen_k: the first 200 query rows see no key; their dq is 0,
    # and nothing is NaN (the accuracy rule checks finiteness).
    (dq, dk, dv), _ = check(dtype, 1, 300, 100, 2, 2, 64, causal=True,
                            deterministic=deterministic)
    assert not dq[:, :200].get().astype(np.float32).any()
    # A window past the keys: some rows see nothing, and some keys are seen by no row.
    check(dtype, 2, 150, 60, 2, 1, 32, window=(0, 0), deterministic=deterministic)


@pytest.mark.parametrize("headdim", [32, 128, 256])
def test_float32(headdim):
    check(F32, 2, 77, 1025, 2, 1, headdim)
    check(F32, 1, 129, 129, 4, 2, headdim, causal=True, alibi="heads", deterministic=True)


@pytest.mark.parametrize("dtype, headdim, opts", [
    (BF16, 64, {}), (F32, 64, {}), (BF16, 128, dict(causal=True)),
    (F16, 64, dict(window=(300, 50))), (BF16, 128, dict(softcap=3.0, window=(None, 0))),
    (BF16, 256, {}), (F16, 192, dict(causal=True)), (BF16, 64, dict(causal=True))],
    ids=["bf16-64", "fp32-64", "bf16-128-causal", "fp16-64-window", "bf16-128-softcap",
         "bf16-256", "fp16-192-causal", "bf16-64-causal"])
def test_deterministic_is_bitwise_reproducible(dtype, headdim, opts):
    """deterministic=True gives the same bits every call: on sm_90 (fp16/bf16) the wgmma
    kernels' dQ red.global.adds in key-block order, ascending without a right bound and
    descending (last key block first) under one (causal, windows)."""
    cp = import_cupy()
    import cuflash
    rng = np.random.default_rng(0)
    q = cp.asarray(_randn(rng, (2, 1025, 8, headdim), dtype))
    k = cp.asarray(_randn(rng, (2, 1025, 2, headdim), dtype))
    v = cp.asarray(_randn(rng, (2, 1025, 2, headdim), dtype))
    dout = cp.asarray(_randn(rng, (2, 1025, 8, headdim), dtype))
    out, lse = reference.attention_forward(q, k, v, **opts)
    out, lse = cp.ascontiguousarray(out.astype(dtype)), lse.astype(np.float32)
    first = cuflash.attention_backward(dout, q, k, v, out, lse, deterministic=True, **opts)
    for _ in range(3):
        again = cuflash.attention_backward(dout, q, k, v, out, lse, deterministic=True,
                                           **opts)
        for a, b in zip(first, again):
            assert np.array_equal(a.get().view(np.uint8), b.get().view(np.uint8))


@pytest.mark.parametrize("deterministic", [False, True])
def test_vjp_matches_forward_and_backward(deterministic):
    cp = import_cupy()
    import cuflash
    rng = np.random.default_rng(1)
    q = cp.asarray(_randn(rng, (1, 130, 4, 64), BF16))
    k = cp.asarray(_randn(rng, (1, 130, 2, 64), BF16))
    v = cp.asarray(_randn(rng, (1, 130, 2, 64), BF16))
    dout = cp.asarray(_randn(rng, (1, 130, 4, 64), BF16))
    out, vjp = cuflash.attention_vjp(q, k, v, causal=True, deterministic=deterministic)
    got = vjp(dout)
    out2, lse2 = cuflash.attention_forward(q, k, v, causal=True)
    want = cuflash.attention_backward(dout, q, k, v, out2, lse2, causal=True,
                                      deterministic=deterministic)
    assert np.array_equal(out.get().view(np.uint8), out2.get().view(np.uint8))
    for a, b, name in zip(got, want, ("dq", "dk", "dv")):
        if deterministic:
            assert np.array_equal(a.get().view(np.uint8), b.get().view(np.uint8)), name
        else:  # float atomics: equal up to summation order
            np.testing.assert_allclose(a.get().astype(np.float32), b.get().astype(np.float32),
                                       rtol=2e-2, atol=2e-2, err_msg=name)


# --- The Hopper (wgmma) backward, kernels_cu/flash_bwd_sm90.cu ----------------------------

def _problem(dtype, headdim, softcap=0.0, alibi=False, varlen=False):
    """The Problem of a (1, 70, 2, headdim) backward call, or (varlen) of one packed
    (70, 2, headdim) sequence (no array needed)."""
    from cuflash import _core
    dtype = np.dtype(dtype)
    item = dtype.itemsize
    strides = (2 * headdim * item, headdim * item, item)
    if not varlen:
        strides = (70 * strides[0], *strides)
    return _core.Problem(0, dtype, 1, 70, 70, 2, 2, headdim, strides, strides, strides,
                         headdim ** -0.5, softcap, -1, -1, 2 if alibi else None, varlen, 70, 70)


def _pick_sm90(dtype, headdim, deterministic, arch, **problem):
    """The steps of ops.backward.choose when they run bwd_sm90, else None."""
    from cuflash import ops
    steps = ops.backward.choose(_problem(dtype, headdim, **problem), deterministic, arch)
    return steps if steps[0].filename == ops.backward.SM90_FILE else None


def test_dispatch_picks_wgmma_backward_on_sm90():
    """bf16 head dim 128 runs bwd_sm90 on sm_90 (only there), soft-cap and ALiBi included,
    and never where it cannot."""
    import cuflash
    from cuflash import ops
    pick = _pick_sm90
    assert [s.name_expression for s in pick(BF16, 128, False, "sm_90")] == [
        "cuflash::bwd_sm90<__nv_bfloat16, 128, 128, 64, 0>",
        "cuflash::bwd_convert_dq_sm90<__nv_bfloat16, 128>"]
    assert pick(BF16, 128, False, "sm_80") is None
    assert pick(BF16, 128, True, "sm_90")[0].name_expression == \
        "cuflash::bwd_sm90<__nv_bfloat16, 128, 128, 64, 0>"         # deterministic too
    def opts(dtype, headdim, **options):
        name = pick(dtype, headdim, False, "sm_90", **options)[0].name_expression
        return int(name.split(", ")[4].rstrip(">"))
    # OPTS (common/mask.cuh): soft-cap 1, ALiBi 2, both tested per element 4
    assert opts(F16, 64, softcap=2.0) == 1 and opts(BF16, 128, softcap=2.0) == 1
    assert opts(F16, 64, alibi=True) == 2 and opts(BF16, 96, alibi=True) == 2
    assert opts(F16, 64, alibi=True, softcap=2.0) == 4
    # float16 soft-cap at head dim 64: three MMA warpgroups, 192 keys a CTA (not
    # deterministic, not bfloat16, not with ALiBi); deterministic calls there without
    # soft-cap too
    assert pick(F16, 64, False, "sm_90", softcap=2.0)[0].name_expression == \
        "cuflash::bwd_sm90<__half, 64, 192, 64, 1>"
    assert pick(F16, 40, False, "sm_90", softcap=2.0)[0].num_threads == 512
    assert pick(F16, 64, True, "sm_90", softcap=2.0)[0].name_expression == \
        "cuflash::bwd_sm90<__half, 64, 128, 128, 1>"
    assert pick(BF16, 64, False, "sm_90", softcap=2.0)[0].name_expression == \
        "cuflash::bwd_sm90<__nv_bfloat16, 64, 128, 128, 1>"
    assert pick(BF16, 64, True, "sm_90")[0].name_expression == \
        "cuflash::bwd_sm90<__nv_bfloat16, 64, 192, 64, 0>"
    assert pick(F16, 64, False, "sm_90")[0].name_expression == \
        "cuflash::bwd_sm90<__half, 64, 128, 128, 0>"
    assert pick(F32, 128, False, "sm_90") is None
    assert pick(F16, 256, False, "sm_90")[0].name_expression == \
        "cuflash::bwd_sm90_wide<__half, 256, 0>"                # head dims over 128
    assert pick(BF16, 192, False, "sm_90", softcap=2.0)[0].name_expression == \
        "cuflash::bwd_sm90_wide<__nv_bfloat16, 256, 1>"
    assert pick(F16, 256, True, "sm_90")[0].name_expression == \
        "cuflash::bwd_sm90_wide<__half, 256, 0>"                # deterministic too
    # The explicit override keeps bwd_main on sm_90.
    steps = ops.backward.choose(_problem(BF16, 128), False, "sm_90", hopper=False)
    assert all(s.filename == ops.backward.FILE for s in steps), steps
    cp = import_cupy()
    rng = np.random.default_rng(3)
    q, k, v, dout, out = (cp.asarray(_randn(rng, (1, 70, 2, 128), BF16)) for _ in range(5))
    lse = cp.zeros((1, 2, 70), np.float32)
    with launches() as launched:
        cuflash.attention_backward(dout, q, k, v, out, lse)
    names = [n for _, n in launched]
    assert ("cuflash::bwd_sm90<__nv_bfloat16, 128, 128, 64, 0>" in names) == \
        (device_arch() == "sm_90")


@pytest.mark.parametrize("dtype", [F16, BF16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("headdim,opts", [
    (128, {}), (64, dict(causal=True)), (104, dict(window=(90, 30))), (64, {}),
    (128, dict(softcap=3.0, causal=True)), (64, dict(alibi="batch")),
    (128, dict(alibi="heads", softcap=5.0, window=(40, 7))),
    (32, {}), (96, dict(causal=True)), (8, dict(softcap=4.0)), (72, dict(alibi="heads")),
    (64, dict(softcap=4.0, alibi="heads", window=(50, 20))),
    (256, {}), (256, dict(causal=True)), (192, dict(window=(90, 30))),
    (256, dict(softcap=3.0)), (160, dict(alibi="batch", causal=True)),
    (256, dict(alibi="heads", softcap=5.0, window=(40, 7))),
    (256, dict(causal=True, deterministic=True)),
    (160, dict(window=(90, 30), deterministic=True)),
], ids=["d128", "d64-causal", "d104-window", "d64", "d128-softcap-causal", "d64-alibi",
        "d128-all", "d32-padded", "d96-padded-causal", "d8-padded-softcap",
        "d72-padded-alibi", "d64-softcap-alibi-window", "wide-d256", "wide-d256-causal",
        "wide-d192-window", "wide-d256-softcap", "wide-d160-alibi-causal", "wide-d256-all",
        "wide-d256-causal-det", "wide-d160-window-det"])
def test_wgmma_backward_matches_mma_sync(dtype, headdim, opts):
    """The wgmma kernel and bwd_main on the same inputs: both within the accuracy rule, and
    within a few 16-bit ulps of each other (float atomics make neither bitwise stable)."""
    if device_arch() != "sm_90":
        pytest.skip("the wgmma backward runs on sm_90 only")
    from cuflash import ops
    seed = 11 + headdim
    with launches() as launched:
        wgmma, ref = check(dtype, 2, 257, 300, 4, 2, headdim, seed=seed, **opts)
    assert ops.backward.SM90_FILE in {f for f, _ in launched}, launched
    mma, _ = check(dtype, 2, 257, 300, 4, 2, headdim, seed=seed, hopper=False, **opts)
    for name, a, b, r in zip(("dq", "dk", "dv"), wgmma, mma, ref):
        diff = np.abs(a.get().astype(np.float64) - b.get().astype(np.float64)).max()
        ulp = 2.0 ** (-7 if dtype == BF16 else -10) * max(1.0, np.abs(r).max())
        assert diff <= 4 * ulp, f"{name}: wgmma vs mma.sync differ by {diff:.3e} (4 ulp {4 * ulp:.3e})"


@pytest.mark.parametrize("shape,opts", [
    ((1, 1, 1, 2, 2, 64), dict(causal=True)),
    ((2, 17, 97, 4, 2, 64), {}),
    ((2, 97, 17, 4, 1, 32), dict(causal=True)),
    ((1, 193, 385, 2, 2, 64), dict(window=(100, 40))),
    ((1, 1025, 1025, 8, 2, 48), dict(causal=True)),
    ((2, 385, 385, 2, 2, 64), dict(layout="strided")),
], ids=["one-key", "q17-k97", "q97-k17-causal-mqa", "k385-window", "1025-causal-gqa",
        "strided"])
@pytest.mark.parametrize("deterministic", [False, True], ids=["f16-softcap", "bf16-det"])
def test_three_warpgroup_backward_matches_the_reference(shape, opts, deterministic):
    """float16 soft-cap, and deterministic calls without it, at head dims up to 64 run
    bwd_sm90 with three MMA warpgroups (192 keys a CTA, the step's dQ tile by one warpgroup
    in turn; deterministic: in key-block order, held by one turn agent): the accuracy rule
    on key counts around its 192-key blocks, seqlen_q != seqlen_k, masks, GQA and strided
    inputs."""
    if device_arch() != "sm_90":
        pytest.skip("the wgmma backward runs on sm_90 only")
    with launches() as launched:
        if deterministic:
            check(BF16, *shape, deterministic=True, seed=sum(shape), **opts)
        else:
            check(F16, *shape, softcap=4.0, seed=sum(shape), **opts)
    names = [n for _, n in launched]
    dtype = "__nv_bfloat16" if deterministic else "__half"
    assert any(n.startswith(f"cuflash::bwd_sm90<{dtype}, 64, 192, 64, ") for n in names), names


@pytest.mark.parametrize("headdim", [8, 32, 64, 96, 128, 160, 256])
def test_wgmma_backward_loads_by_tma_and_by_cp_async_alike(monkeypatch, headdim):
    """A dense call's producer loads by TMA: every Hopper launch gets its maps of q and dout
    (``on``: a map the driver refused would fall back to cp.async unseen). With the maps
    refused (the encoder made to fail), the cp.async producer gives the same gradients, bit
    for bit (deterministic mode; q sliced from a packed tensor and dout transposed, so the
    two maps have strides of their own)."""
    if device_arch() != "sm_90":
        pytest.skip("the wgmma backward runs on sm_90 only")
    from cuflash import _tma, ops
    seconds = []
    real = ops.backward.Plan._second

    def spy(plan, q, dout):
        seconds.append(real(plan, q, dout))
        return seconds[-1]

    monkeypatch.setattr(ops.backward.Plan, "_second", spy)
    args = (BF16, 2, 257, 257, 4, 2, headdim)
    opts = dict(layout="strided", causal=True, deterministic=True, seed=headdim)
    by_tma, _ = check(*args, **opts)
    on = np.array([1], np.int32).tobytes()
    assert seconds and all(x[2 * _tma.MAP_BYTES:][:4] == on for x in seconds)
    seconds.clear()
    forget_plans()
    monkeypatch.setattr(_tma, "_encode_tiled", lambda: lambda *args: 1)
    try:
        by_cp_async, _ = check(*args, **opts)
    finally:
        forget_plans()  # and the refusals
    assert seconds and all(x == bytes(len(x)) for x in seconds)
    for name, a, b in zip(("dq", "dk", "dv"), by_tma, by_cp_async):
        assert (a.get().view(np.uint16) == b.get().view(np.uint16)).all(), name


@pytest.mark.parametrize("batch, seqlen, nheads, nheads_kv, offset", [
    (3, 257, 6, 3, None), (2, 1025, 4, 2, 3), (1, 130, 2, 2, 0), (5, 64, 1, 1, 0),
    (2, 333, 2, 2, 4)], ids=["odd-gqa", "gqa-offset", "two-pairs", "one-block", "offset"])
def test_paired_order_matches_the_reference(monkeypatch, batch, seqlen, nheads, nheads_kv,
                                            offset):
    """bwd_sm90_wide's paired order (deterministic, causal, as many queries as keys; CTAs of
    two key blocks from two pairs): within the accuracy rule at the host's offset and at
    forced ones, and the same bits again."""
    if device_arch() != "sm_90":
        pytest.skip("the wgmma backward runs on sm_90 only")
    from cuflash import ops
    picked, real = [], ops.backward._pair_offset

    def pick(*args):
        picked.append(real(*args) if offset is None else offset)
        return picked[-1]

    monkeypatch.setattr(ops.backward, "_pair_offset", pick)
    forget_plans()
    try:
        args = (BF16, batch, seqlen, seqlen, nheads, nheads_kv, 256)
        first, _ = check(*args, causal=True, deterministic=True, seed=seqlen)
        again, _ = check(*args, causal=True, deterministic=True, seed=seqlen)
    finally:
        forget_plans()
    assert picked and all(x >= 0 for x in picked), picked
    for name, a, b in zip(("dq", "dk", "dv"), first, again):
        assert (a.get().view(np.uint16) == b.get().view(np.uint16)).all(), name
