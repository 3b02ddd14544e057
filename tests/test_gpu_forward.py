"""The GPU forward kernels (kernels_cu/flash_fwd.cu) against the float64 reference.

Every call runs under an allocator hook that fills each allocation with 0xFF bytes (NaN in
float16, bfloat16 and float32) and records its size: the results must be finite wherever
the reference is (so every element was written), and the forward must allocate exactly
``out`` and ``lse``. Inputs are random normal, drawn fresh for every case (the seed is in
the failure message).
"""
import ml_dtypes
import numpy as np
import pytest

from accuracy import assert_close
from gpu import device_arch, forget_plans, poisoned

pytestmark = pytest.mark.gpu

BF16 = np.dtype(ml_dtypes.bfloat16)
F16 = np.dtype(np.float16)
F32 = np.dtype(np.float32)


def _gpu_forward(q, k, v, **opts):
    import cupy
    import cuflash
    pool = cupy.get_default_memory_pool()
    used_before = pool.used_bytes()
    (out, lse), sizes = poisoned(cuflash.attention_forward, q, k, v, **opts)
    assert sorted(sizes) == sorted([out.nbytes, lse.nbytes]), (
        f"forward allocated {sizes}, expected only out ({out.nbytes} bytes) and lse "
        f"({lse.nbytes} bytes)")
    grown = pool.used_bytes() - used_before
    assert grown < out.nbytes + lse.nbytes + 2 * 512, f"pool grew by {grown} bytes"
    return out, lse


def check(dtype, batch, seqlen_q, seqlen_k, nheads, nheads_kv, headdim, layout="contiguous",
          alibi=None, ramp=False, **opts):
    """Run one forward on random data and apply the accuracy rule to out and lse.

    layout: "contiguous"; "qkv" (q, k, v slices of one packed tensor: strided rows);
    "bhsd" (arrays stored (batch, nheads, seqlen, headdim) and passed transposed).
    alibi: None, "heads" (slopes (nheads,)) or "batch" (slopes (batch, nheads)).
    ramp: scores that rise toward the first keys, by 0 to ~25 (base 2) each 64 keys: the
    kernels walk the keys from the last block down, so a row's max moves both by less and
    by more than the slack within which the Hopper forward leaves O unscaled (2^8).
    """
    import cupy
    from cuflash import reference
    seed = int(np.random.SeedSequence().entropy % 2**32)
    rng = np.random.default_rng(seed)
    dtype = np.dtype(dtype)

    def draw(seqlen, heads):
        if layout == "bhsd":
            x = rng.standard_normal((batch, heads, seqlen, headdim)).astype(dtype)
            return cupy.asarray(x).transpose(0, 2, 1, 3)
        return cupy.asarray(rng.standard_normal((batch, seqlen, heads, headdim)).astype(dtype))

    if layout == "qkv":
        assert seqlen_q == seqlen_k
        packed = cupy.asarray(rng.standard_normal(
            (batch, seqlen_q, nheads + 2 * nheads_kv, headdim)).astype(dtype))
        q = packed[:, :, :nheads]
        k = packed[:, :, nheads:nheads + nheads_kv]
        v = packed[:, :, nheads + nheads_kv:]
    else:
        q, k, v = draw(seqlen_q, nheads), draw(seqlen_k, nheads_kv), draw(seqlen_k, nheads_kv)
    if ramp:
        steps = np.resize([4.0, 17.0, 0.0, 35.0], (seqlen_k + 63) // 64)
        rise = np.cumsum(steps[::-1])[::-1]  # the sum of the steps from each group on
        q[..., 0] = 4
        k[..., 0] = cupy.asarray(np.repeat(rise, 64)[:seqlen_k, None].astype(dtype))
    if alibi == "heads":
        opts["alibi_slopes"] = cupy.asarray(rng.uniform(0.01, 0.5, nheads).astype(np.float32))
    elif alibi == "batch":
        opts["alibi_slopes"] = cupy.asarray(
            rng.uniform(0.01, 0.5, (batch, nheads)).astype(np.float32))

    out, lse = _gpu_forward(q, k, v, **opts)
    assert out.shape == q.shape and out.dtype == dtype
    assert lse.shape == (batch, nheads, seqlen_q) and lse.dtype == np.float32
    # The reference runs on the GPU too (in float64), q, k, v as the kernel read them.
    ref_out, ref_lse = reference.attention_forward(q, k, v, upcast=True, **opts)
    naive_out, naive_lse = reference.attention_forward(q, k, v, upcast=False, **opts)
    where = (f"seed {seed}, {dtype}, b{batch} sq{seqlen_q} sk{seqlen_k} h{nheads}/{nheads_kv} "
             f"d{headdim} {layout} alibi={alibi} {opts}")
    assert_close(f"out ({where})", out, ref_out, naive_out)
    assert_close(f"lse ({where})", lse, ref_lse, naive_lse)
    return out, lse, ref_lse.get()


@pytest.mark.parametrize("dtype", [F16, BF16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("headdim", [32, 40, 64, 96, 128, 192, 256])
def test_headdims(dtype, headdim):
    check(dtype, 2, 145, 211, 3, 3, headdim)
    check(dtype, 1, 97, 97, 2, 2, headdim, causal=True)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("seqlen_q, seqlen_k", [
    (1, 1), (17, 17), (97, 97), (128, 128), (1025, 1025), (4096, 4096),
    (1, 4096), (17, 1025), (128, 97), (1025, 17), (4096, 128),
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
    dict(window=(0, 0)),
    dict(window=(100, 20), scale=0.3),
    dict(softcap=1e5),
    dict(softcap=30.0, scale=4.0),  # the largest logits in the tanh's flat region
    dict(softcap=200.0),  # tanh arguments ~0.005: its error must be relative
], ids=["softcap", "softcap-causal", "alibi", "alibi-batch-causal", "all", "left",
        "right", "diagonal", "window-scale", "softcap-large",
        "softcap-saturated", "softcap-small-arguments"])
def test_features(dtype, opts):
    check(dtype, 2, 203, 301, 4, 2, 40 if dtype == F32 else 64, **opts)


@pytest.mark.parametrize("dtype", [F16, BF16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("headdim", [64, 128, 256])
def test_rising_maxima(dtype, headdim):
    check(dtype, 1, 203, 1025, 2, 1, headdim, ramp=True)
    check(dtype, 1, 1025, 1025, 2, 2, headdim, ramp=True, causal=True)


@pytest.mark.parametrize("ratio", [1, 4, 8])
@pytest.mark.parametrize("dtype", [F16, BF16], ids=["fp16", "bf16"])
def test_gqa(dtype, ratio):
    check(dtype, 2, 150, 150, 8, 8 // ratio, 128, causal=ratio == 4)


@pytest.mark.parametrize("layout", ["qkv", "bhsd"])
@pytest.mark.parametrize("dtype", [BF16, F32], ids=["bf16", "fp32"])
def test_strided_inputs(dtype, layout):
    check(dtype, 3, 130, 130, 4, 2, 96, layout=layout, causal=True)
    check(dtype, 2, 70, 70, 2, 1, 40, layout=layout, softcap=2.0)


@pytest.mark.parametrize("dtype", [F16, BF16, F32], ids=["fp16", "bf16", "fp32"])
def test_fully_masked_rows(dtype):
    # Causal with seqlen_q > seqlen_k: the first seqlen_q - seqlen_k rows see no key.
    out, lse, _ = check(dtype, 1, 300, 100, 2, 2, 64, causal=True)
    assert bool((out[:, :200] == 0).all()) and bool(np.isneginf(lse[:, :, :200].get()).all())
    # A window past the keys: rows whose window holds no key j < seqlen_k.
    out, lse, ref_lse = check(dtype, 2, 150, 60, 2, 1, 32, window=(0, 0))
    assert np.isneginf(ref_lse).any()


@pytest.mark.parametrize("headdim", [32, 128, 256])
def test_float32(headdim):
    check(F32, 2, 77, 1025, 2, 1, headdim)
    check(F32, 1, 129, 129, 2, 2, headdim, causal=True, alibi="heads")


def test_float32_is_not_tf32():
    # Products of values with more mantissa bits than TF32's 10: a TF32 kernel would miss
    # by ~1e-4 relative, far over the float32 rule's bound.
    import cupy
    import cuflash
    rng = np.random.default_rng()
    q = cupy.asarray(1 + rng.uniform(0, 2**-12, (1, 64, 1, 32)).astype(np.float32))
    k = cupy.asarray(rng.standard_normal((1, 64, 1, 32)).astype(np.float32))
    v = cupy.asarray(rng.standard_normal((1, 64, 1, 32)).astype(np.float32))
    from cuflash import reference
    out, lse = cuflash.attention_forward(q, k, v)
    ref_out, ref_lse = reference.attention_forward(q.get(), k.get(), v.get())
    assert np.abs(out.get() - ref_out).max() < 1e-5
    assert np.abs(lse.get() - ref_lse).max() < 1e-5


def test_old_gpu_error_names_compute_capability(monkeypatch):
    import cupy
    from cuflash import _compile

    class Turing:
        compute_capability = "75"

        def __init__(self, device_id=0):
            pass

    monkeypatch.setattr(cupy.cuda, "Device", Turing)
    _compile.device_arch.cache_clear()  # memoised per device: look again, at the fake
    try:
        with pytest.raises(RuntimeError, match=r"compute capability 8\.0.*has 7\.5"):
            _compile.device_arch(0)
    finally:
        _compile.device_arch.cache_clear()  # nothing of the fake stays memoised


# --- Hopper: the wgmma kernel (kernels_cu/flash_fwd_sm90.cu) ------------------------------
# On an sm_90 device the dispatcher sends every fp16/bf16 head dim to flash_fwd_sm90 (in
# whole 64-column blocks: 32 runs in 64, 96 in 128), so every fp16/bf16 test above
# (seqlens, features, GQA, strided layouts, fully masked rows, NaN poisoning, the
# memory-pool check) runs it. The tests below
# make sure that really happens (no silent fallback to mma.sync) and compare the two kernels.

def _require_hopper():
    if device_arch() != "sm_90":
        pytest.skip("flash_fwd_sm90 runs on compute capability 9.0 only")


def _withhold_o_map(monkeypatch):
    """From here the Hopper forward's plans store O by 16-byte stores, as where the driver
    refuses out's map (dense calls otherwise store O by TMA)."""
    from cuflash import ops
    real_call = ops.forward.Plan.__call__

    def without_o_map(plan, *args):
        plan.o_maps = None
        return real_call(plan, *args)

    monkeypatch.setattr(ops.forward.Plan, "__call__", without_o_map)


@pytest.fixture
def fresh_plans():
    """No forward plan or memoized call kept from before the test or left after it (plans
    keep the O path and maps they were made with)."""
    forget_plans()
    yield
    forget_plans()


@pytest.mark.parametrize("layout", ["contiguous", "qkv", "bhsd"])
@pytest.mark.parametrize("dtype, headdim", [
    (BF16, 128), (F16, 64), (BF16, 40), (F16, 32), (BF16, 96), (F16, 192), (BF16, 256),
    (F16, 200)], ids=lambda x: str(x) if isinstance(x, int) else np.dtype(x).name)
def test_hopper_dispatch_runs_the_wgmma_kernel(launched, dtype, headdim, layout):
    _require_hopper()
    import cupy
    from cuflash import _compile, ops
    q = cupy.empty((2, 200, 4, headdim), dtype)
    k = cupy.empty((2, 200, 2, headdim), dtype)
    cfg = ops.forward.choose(ops.dense_problem(q, k, k, causal=True), _compile.device_arch(0))
    assert cfg.filename == ops.forward.SM90_FILE and cfg.hopper
    check(dtype, 2, 200, 200, 4, 2, headdim, layout=layout, causal=True)
    assert [f for f, _ in launched] == [ops.forward.SM90_FILE], launched


@pytest.mark.parametrize("case", [
    (BF16, 4, 1025, 1025, 8, 2, 128, {}),
    (F16, 3, 1100, 300, 8, 8, 64, dict(causal=True)),  # rows 0..799 see no key
    (BF16, 2, 777, 2000, 16, 4, 64, dict(window=(100, 50))),
    (F16, 2, 2100, 2100, 16, 16, 128, dict(causal=True, softcap=5.0)),
    (BF16, 2, 1100, 1100, 64, 8, 256, dict(causal=True)),
    (F16, 3, 900, 1500, 48, 16, 192, dict(window=(200, 0))),
    (BF16, 2, 2000, 2000, 16, 4, 64, dict(causal=True)),  # tiles of one key block
    (BF16, 2, 3000, 2048, 16, 4, 64, dict(causal=True)),  # three consumers, empty tiles
], ids=["bf16-128", "fp16-64-empty-tiles", "bf16-64-window", "fp16-128-causal-softcap",
        "bf16-256-causal", "fp16-192-window", "bf16-64-causal", "bf16-64-three-consumers"])
def test_wgmma_kernel_with_more_tiles_than_sms(case):
    """The persistent grid: every CTA walks several tiles (some with no visible key), so Q
    reloads and the K/V ring's barrier phases carry over from tile to tile."""
    _require_hopper()
    dtype, batch, sq, sk, h, hkv, d, opts = case
    assert -(-sq // 192) * h * batch > 132  # 192: the largest query block
    check(dtype, batch, sq, sk, h, hkv, d, **opts)


@pytest.mark.parametrize("by_tma", [True, False], ids=["tma", "stores"])
@pytest.mark.parametrize("headdim", [64, 128, 192, 256])
@pytest.mark.parametrize("seqlens", [(1100, 300), (2000, 2000), (2600, 2100)],
                         ids=["keyless", "square", "keyless-long"])
def test_wgmma_kernel_staged_o_over_many_tiles(monkeypatch, fresh_plans, by_tma, headdim,
                                               seqlens):
    """O staged over a persistent grid whose CTAs walk several tiles, with tiles without a
    visible key (1100 queries, 300 keys: rows 0..799) between others or (2000 x 2000) with
    keys in every tile (at hd64/128 the first query block sees one key block), and from
    SM90_SHORT_KEYS keys (2600 x 2100: hd64's three consumers, hd128's key blocks of 160),
    by TMA stores and, without O's map, by 16-byte stores. Head dims 64 and 128 stage O in the Q
    tile, whose buffer goes back once O has left it; 192 and 256 in V's stages
    (FwdSm90Traits::O_IN_V), the producer holding each tile's first V load until the last
    staged O has left, and key-less tiles store from the registers."""
    _require_hopper()
    if not by_tma:
        _withhold_o_map(monkeypatch)
    check(BF16, 2, *seqlens, 16, 4, headdim, causal=True)


@pytest.mark.parametrize("by_tma", [True, False], ids=["tma", "stores"])
@pytest.mark.parametrize("case", [
    (BF16, 2, 1100, 300, 16, 4, 128, {}),  # 9 query blocks: the last pair's second is empty
    (F16, 3, 1025, 1025, 8, 2, 128, dict(softcap=5.0)),
    (BF16, 1, 17, 97, 4, 4, 96, dict(alibi="heads")),  # one query block: its peer empty
    (F16, 2, 2000, 2000, 32, 8, 128, {}),  # more tiles than clusters, two consumers a CTA
    (BF16, 1, 1, 4096, 3, 1, 128, dict(alibi="batch")),
    (BF16, 2, 1100, 300, 8, 2, 256, {}),  # O staged in V's stages, which both CTAs fill
    (F16, 2, 2000, 2000, 16, 4, 256, dict(softcap=5.0)),
    (BF16, 1, 17, 97, 2, 1, 200, {}),
    (BF16, 2, 1000, 64, 16, 4, 256, {}),  # one key block a tile, several tiles a cluster
    (F16, 1, 700, 900, 8, 4, 128, dict(softcap=5.0, alibi="heads")),  # OPTS_RUNTIME
    # Causal: the CTA of a pair's lower rows passes over the diagonal block it does not see.
    (BF16, 2, 1100, 1100, 8, 2, 128, dict(causal=True)),
    (F16, 2, 2000, 2000, 16, 4, 128, dict(causal=True, softcap=5.0)),
    (F16, 2, 1000, 1500, 16, 4, 256, dict(causal=True)),
    # 1400 queries, 700 keys: query block 4 sees no key, 5 one block (a keyless CTA beside
    # a CTA with keys: it passes over them, and at hd256 arrives on o_read all the same)
    (BF16, 2, 1400, 700, 8, 2, 256, dict(causal=True)),
    (F16, 2, 1400, 700, 8, 8, 128, dict(causal=True)),
    (BF16, 2, 1000, 1500, 16, 4, 128, dict(causal=True, alibi="heads")),  # offset 500
    (F16, 2, 900, 900, 8, 2, 128, dict(window=(-1, 64))),  # a right bound of 64 keys
    # Key blocks of 160 (>= SM90_SHORT_KEYS keys, no score option): a causal diagonal that
    # the lower CTA's rows see none or one block of, and keyless CTAs beside ones with keys.
    (BF16, 2, 2100, 2100, 8, 2, 128, dict(causal=True)),
    (F16, 2, 2600, 2100, 8, 8, 128, dict(causal=True)),
], ids=["bf16-odd-blocks", "fp16-softcap", "bf16-96-one-block", "fp16-many-tiles",
        "bf16-one-row", "bf16-256-odd-blocks", "fp16-256-many-tiles", "bf16-200-one-block",
        "bf16-256-one-key-block", "fp16-softcap-alibi", "bf16-causal-odd-blocks",
        "fp16-causal-softcap", "fp16-256-causal-more-keys", "bf16-256-causal-keyless",
        "fp16-causal-keyless", "bf16-causal-alibi-more-keys", "fp16-right-window",
        "bf16-160-causal", "fp16-160-causal-keyless"])
def test_cluster_kernel_matches_one_cta(monkeypatch, fresh_plans, launched, by_tma, case):
    """flash_fwd_sm90_cluster (two CTAs share K and V by multicast) against flash_fwd_sm90
    on the same inputs: the same arithmetic in the same order, so bitwise equal, and both
    meet the accuracy rule (check). Odd counts of query blocks leave a cluster's second CTA
    a block past the rows, which computes but stores nothing; O by TMA and, without O's
    map, by 16-byte stores; at hd256 through V's stages, which the peer's copies also fill
    (o_read counts both CTAs' consumers). Under a causal mask both CTAs load the blocks
    that the pair's upper rows see, and the lower rows' CTA hands the extra ones back."""
    _require_hopper()
    import cupy
    from cuflash import ops
    from cuflash._api import contiguous_strides
    dtype, batch, sq, sk, h, hkv, d, opts = case
    monkeypatch.setattr(ops.forward, "SM90_CLUSTER_WINDOWED_ROWS", 0)  # short masked rows too
    if not by_tma:
        _withhold_o_map(monkeypatch)
    check(dtype, batch, sq, sk, h, hkv, d, **opts)
    assert [n for _, n in launched] and all(
        n.startswith("cuflash::flash_fwd_sm90_cluster<") for _, n in launched), launched
    rng = np.random.default_rng(sq * sk)
    q, k, v = (cupy.asarray(rng.standard_normal((batch, n, heads, d)).astype(dtype))
               for n, heads in ((sq, h), (sk, hkv), (sk, hkv)))
    kwargs = {}
    if "alibi" in opts:
        shape = (h,) if opts["alibi"] == "heads" else (batch, h)
        kwargs["alibi_slopes"] = cupy.asarray(rng.uniform(0.01, 0.5, shape), np.float32)
    kwargs.update((key, val) for key, val in opts.items() if key != "alibi")
    p = ops.dense_problem(q, k, v, **kwargs)
    layout, lse_shape = contiguous_strides(q.shape, q.dtype.itemsize), (batch, h, sq)
    runs = []
    for cluster in (2, 1):
        config = ops.forward.sm90_config(dtype, d, p.opts, False, sk, cluster=cluster)
        launch = ops.forward.Launch(p, layout, lse_shape, config)
        runs.append(launch(q, k, v, kwargs.get("alibi_slopes")))
    (o2, lse2), (o1, lse1) = runs
    assert cupy.array_equal(o2.view(np.uint16), o1.view(np.uint16))
    assert cupy.array_equal(lse2, lse1)


@pytest.mark.parametrize("case", [
    (BF16, 1, 2100, 2100, 4, 4, 128, "contiguous", {}, True),  # 13 key blocks and 20 keys
    (F16, 2, 300, 4099, 8, 2, 128, "contiguous", dict(causal=True), False),  # GQA, sq < sk
    (BF16, 1, 4100, 4100, 4, 2, 96, "contiguous", dict(window=(None, 100)), True),
    (F16, 1, 2500, 3000, 4, 4, 128, "contiguous", dict(window=(700, 0)), False),
    (BF16, 2, 2048, 2048, 4, 4, 128, "qkv", dict(causal=True), False),  # strided rows
    (F16, 1, 2200, 2200, 4, 4, 96, "bhsd", {}, True),
    # Causal in clusters over a persistent grid: 33 query blocks (the last cluster's second
    # CTA past the rows), 26 key blocks and 40 keys, 272 tiles on 66 clusters.
    (BF16, 2, 4200, 4200, 8, 2, 128, "contiguous", dict(causal=True), True),
    # Rows 0..2299 see no key: keyless CTAs beside CTAs with keys (skip > 0, no Q load).
    (F16, 2, 4400, 2100, 8, 8, 128, "contiguous", dict(causal=True), True),
    # One query row: its peer CTA is past the rows; a last key block of 96 keys.
    (BF16, 1, 1, 4096, 8, 1, 128, "contiguous", {}, True),
    (F16, 2, 1, 4100, 8, 2, 96, "contiguous", dict(causal=True), False),
], ids=["tail", "gqa-causal", "right-window", "left-window", "qkv-causal", "bhsd",
        "causal-clusters", "keyless-clusters", "one-row", "one-row-causal"])
def test_key_blocks_of_160(launched, case):
    """From SM90_SHORT_KEYS keys without soft-cap or ALiBi, head dims 96 and 128 run key
    blocks of 160 (the tile table's): a last block short of 160 keys (and of 64), GQA with
    fewer queries than keys, causal and right windows in clusters and a left window on one
    CTA, keyless CTAs beside ones with keys, a single query row, strided rows."""
    _require_hopper()
    dtype, batch, sq, sk, h, hkv, d, layout, opts, clustered = case
    check(dtype, batch, sq, sk, h, hkv, d, layout=layout, **opts)
    assert launched and all(", 128, 160, 2, 0>" in n for _, n in launched), launched
    kind = "cuflash::flash_fwd_sm90_cluster<" if clustered else "cuflash::flash_fwd_sm90<"
    assert all(n.startswith(kind) for _, n in launched), launched


@pytest.mark.parametrize("dtype", [F16, BF16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("headdim", [64, 96, 128, 192, 256])
@pytest.mark.parametrize("opts", [dict(), dict(causal=True), dict(window=(300, 40)),
                                  dict(softcap=4.0, causal=True)],
                         ids=["full", "causal", "window", "softcap-causal"])
def test_wgmma_kernel_matches_mma_sync_kernel(monkeypatch, launched, dtype, headdim, opts):
    """The same inputs through flash_fwd_sm90 and flash_fwd (mma.sync): both meet the
    accuracy rule, so they differ by at most twice its bound. flash_fwd runs as the fallback
    for addresses the driver makes no TMA map of (MapMaker returning None)."""
    _require_hopper()
    import cupy
    import cuflash
    from cuflash import _tma, ops, reference
    rng = np.random.default_rng()
    q = cupy.asarray(rng.standard_normal((2, 333, 4, headdim)).astype(dtype))
    k = cupy.asarray(rng.standard_normal((2, 517, 2, headdim)).astype(dtype))
    v = cupy.asarray(rng.standard_normal((2, 517, 2, headdim)).astype(dtype))
    out90, lse90 = cuflash.attention_forward(q, k, v, **opts)
    # Copies: the Hopper plan keeps the maps of addresses it has encoded.
    q2, k2, v2 = q.copy(), k.copy(), v.copy()
    monkeypatch.setattr(_tma.MapMaker, "__call__", lambda self, ptr: None)
    out80, lse80 = cuflash.attention_forward(q2, k2, v2, **opts)
    assert [f for f, _ in launched] == [ops.forward.SM90_FILE, ops.forward.FILE], launched
    ref_out, ref_lse = reference.attention_forward(q, k, v, upcast=True, **opts)
    naive_out, _ = reference.attention_forward(q, k, v, upcast=False, **opts)
    assert_close("sm90 out", out90, ref_out, naive_out)
    assert_close("mma.sync out", out80, ref_out, naive_out)
    bound = 4 * float(abs(naive_out.astype(np.float64) - ref_out).max()) + 2 * 2.0 ** -7
    assert float(abs(out90.astype(np.float64) - out80.astype(np.float64)).max()) <= bound
    assert float(abs(lse90 - lse80).max()) <= 1e-3 * max(1.0, float(abs(ref_lse).max()))


@pytest.mark.parametrize("dtype, headdim, opts, seqlen", [
    (BF16, 64, dict(causal=True), 1000), (F16, 128, dict(window=(200, 30)), 1000),
    (BF16, 192, dict(causal=True), 1000), (F16, 256, dict(), 1000),
    (BF16, 128, dict(softcap=3.0), 1000),
    # Key blocks of 160 with two K stages (Bc 128 has three), in clusters and on one CTA.
    (BF16, 128, dict(), 2100), (F16, 128, dict(causal=True), 2100)],
    ids=["bf16-64-causal", "fp16-128-window", "bf16-192-causal", "fp16-256", "bf16-128-softcap",
         "bf16-128-bc160-clusters", "fp16-128-bc160-causal"])
def test_wgmma_kernel_is_bitwise_repeatable(dtype, headdim, opts, seqlen):
    """Each tile's arithmetic is fixed, so 50 runs of the same call give the same bits: the
    cheapest detector of a race between the producer's copies and the consumers' wgmmas
    (a stage refilled while it is read). A broken ping-pong turn hangs instead (the
    per-test timeout)."""
    _require_hopper()
    import cupy
    import cuflash
    rng = np.random.default_rng(7)
    q = cupy.asarray(rng.standard_normal((2, seqlen, 16, headdim)).astype(dtype))
    k = cupy.asarray(rng.standard_normal((2, seqlen, 4, headdim)).astype(dtype))
    v = cupy.asarray(rng.standard_normal((2, seqlen, 4, headdim)).astype(dtype))
    out0, lse0 = cuflash.attention_forward(q, k, v, **opts)
    for _ in range(50):
        out, lse = cuflash.attention_forward(q, k, v, **opts)
        assert bool((out.view(np.uint16) == out0.view(np.uint16)).all())
        assert bool((lse.view(np.uint32) == lse0.view(np.uint32)).all())


def test_wgmma_tile_order_with_a_short_last_section(monkeypatch):
    """The L2 sections of the tile order (FwdTile): 32 (head, item) pairs in sections of 3
    (an L2 budget of three heads' K and V), so the last section holds 2 pairs."""
    _require_hopper()
    from cuflash import ops
    import cupy
    kv_head = 2 * 1500 * 128 * 2
    monkeypatch.setattr(ops.tiles, "SM90_L2_BYTES", 3 * kv_head)
    forget_plans()
    q = cupy.empty((2, 1500, 16, 128), BF16)
    # Causal: 12 query blocks of 128 a pair, and no wave bound under a mask.
    assert ops.forward._section(ops.dense_problem(q, q, q, causal=True), 12, 132) == 3
    try:
        check(BF16, 2, 1500, 1500, 16, 16, 128, causal=True)
        check(F16, 4, 700, 1500, 8, 8, 128, window=(300, 100))
    finally:
        forget_plans()


@pytest.mark.parametrize("dtype, headdim, causal", [
    (BF16, 128, False), (F16, 128, True), (BF16, 96, True), (F16, 64, False),
    (BF16, 40, True), (BF16, 256, False), (F16, 192, True), (BF16, 136, True)],
    ids=["bf16-128", "fp16-128-causal", "bf16-96-causal", "fp16-64", "bf16-40-causal",
         "bf16-256", "fp16-192-causal", "bf16-136-causal"])
def test_wgmma_kernel_stores_o_by_tma_and_by_stores_alike(monkeypatch, dtype, headdim, causal):
    """With a staged O tile (two consumers: in the Q tile up to head dim 128, in V's stages
    above), a dense call's O leaves by TMA stores (o_by_tma); without O's map, by 16-byte
    stores: the same bits. ``out`` is
    heads 1..4 of a 6-head buffer (its own strides) and 97 rows, so the stores' boxes reach
    past the last row and, at head dims under 64 a column block, past the head dim: the
    buffer's heads 0 and 5 must keep their bytes."""
    _require_hopper()
    import cupy
    import cuflash
    from cuflash import _core, reference
    rng = np.random.default_rng(headdim)
    q = cupy.asarray(rng.standard_normal((2, 97, 4, headdim)).astype(dtype))
    k = cupy.asarray(rng.standard_normal((2, 300, 2, headdim)).astype(dtype))
    v = cupy.asarray(rng.standard_normal((2, 300, 2, headdim)).astype(dtype))
    flags = []
    real_fill = _core.Record.fill

    def spy(record, *args, **kwargs):
        flags.append(kwargs.get("ints"))
        return real_fill(record, *args, **kwargs)

    monkeypatch.setattr(_core.Record, "fill", spy)

    def run():
        buffer = cupy.full((2, 97, 6, headdim), 7, dtype)
        out = buffer[:, :, 1:5]
        _, lse = cuflash.attention_forward(q, k, v, causal=causal, out=out)
        untouched = buffer[:, :, [0, 5]].get()
        assert (untouched == np.asarray(7, dtype)).all()
        return out.get(), lse.get()

    forget_plans()
    try:
        by_tma = run()
        assert flags == [(True,)], flags
        flags.clear()
        _withhold_o_map(monkeypatch)
        forget_plans()
        by_stores = run()
        assert flags == [(False,)], flags
    finally:
        forget_plans()
    assert (by_tma[0].view(np.uint16) == by_stores[0].view(np.uint16)).all()
    assert (by_tma[1].view(np.uint32) == by_stores[1].view(np.uint32)).all()
    ref, _ = reference.attention_forward(q, k, v, causal=causal, upcast=True)
    naive, _ = reference.attention_forward(q, k, v, causal=causal, upcast=False)
    assert_close("out", by_tma[0], ref, naive)
