"""Tiles fit the device they run on: every kernel the dispatcher can choose on an arch needs
at most the shared memory a block may use there (ops.tiles.SHARED_LIMITS), for every head
dim, dtype and option; sm_90 and sm_80 keep TILES' tiles wherever those fit; and a fake
sm_86 GPU plans and launches within its 99 KiB. No GPU needed (the compile check proves the
C++ sizes equal to these and compiles each choice for its arch)."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

import fake_cupy
from cuflash import _core, ops
from cuflash.ops import backward, decode, tiles
from test_launch_layer import fake_gpu

BF16 = tiles.BFLOAT16
HEADDIMS = range(8, 257, 8)
ARCHS = sorted(tiles.SHARED_LIMITS) + ["sm_110"]  # an arch not listed: the smallest limit


def _problem(dtype, headdim, softcap=0.0, varlen=False):
    """A Problem of 2 heads over 70 queries and keys (no arrays needed)."""
    item = np.dtype(dtype).itemsize
    strides = (2 * headdim * item, headdim * item, item)
    if not varlen:
        strides = (70 * strides[0], *strides)
    return _core.Problem(0, np.dtype(dtype), 1, 70, 70, 2, 2, headdim, strides, strides,
                         strides, headdim ** -0.5, softcap, -1, -1, None, varlen, 70, 70)


def test_checked_archs_cover_every_limit():
    assert {tiles.shared_limit(a) for a in tiles.CHECKED_ARCHS} == \
        set(tiles.SHARED_LIMITS.values())
    assert tiles.shared_limit("sm_110") == min(tiles.SHARED_LIMITS.values()) == 101376
    assert (tiles.shared_limit("sm_80"), tiles.shared_limit("sm_86"),
            tiles.shared_limit("sm_89"), tiles.shared_limit("sm_90")) == \
        (166912, 101376, 101376, 232448)


@pytest.mark.parametrize("arch", ARCHS)
def test_backward_choice_fits_the_arch(arch):
    limit = tiles.shared_limit(arch)
    checked = {name for _, name, _ in ops.all_kernels(arch)} \
        if arch in tiles.CHECKED_ARCHS else None
    for dtype, hd, deterministic, softcap, varlen, hopper in itertools.product(
            (np.float16, BF16, np.float32), HEADDIMS, (False, True), (0.0, 5.0),
            (False, True), (True, False)):
        steps = backward.choose(_problem(dtype, hd, softcap, varlen), deterministic, arch,
                                hopper)
        case = (arch, np.dtype(dtype).name, hd, deterministic, softcap, varlen, hopper)
        assert all(s.shared_bytes <= limit for s in steps), (case, steps)
        if checked is not None:  # what the compile check builds for the arch
            assert {s.name_expression for s in steps} <= checked, case
        # dQ comes out once: by atomics and the conversion, or by a dQ pass; deterministic by
        # a dQ pass, or by the Hopper kernel's reduce-adds in key-block order
        converted = steps[-1].owner == "rows"
        dq_pass = any(s.owner == "queries" for s in steps)
        assert converted != dq_pass, (case, steps)
        assert dq_pass or not deterministic or steps[0].filename == backward.SM90_FILE, case


@pytest.mark.parametrize("arch", ARCHS)
def test_decode_choice_fits_the_arch(arch):
    limit = tiles.shared_limit(arch)
    checked = set(ops.all_kernels(arch)) if arch in tiles.CHECKED_ARCHS else None
    for dtype, hd, score_mod in itertools.product((np.float16, BF16), HEADDIMS,
                                                  (False, True)):
        name, _, shared, _ = decode.config(dtype, hd, score_mod, limit=limit)
        assert shared <= limit, (arch, hd, name, shared)
        if checked is not None:
            assert (decode.FILE, name, shared) in checked


def test_every_kernel_of_an_arch_fits_it():
    for arch in tiles.CHECKED_ARCHS:
        over = [k for k in ops.all_kernels(arch) if k[2] > tiles.shared_limit(arch)]
        assert not over, (arch, over)


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_sm80_and_sm90_keep_their_tiles_where_they_fit(arch):
    """What the table's first tiles chose before per-arch tiles existed still runs wherever
    it fits; only the backward at head dim 256 on sm_80 (169-203 KB) changes."""
    limit = tiles.shared_limit(arch)
    for dtype, hd, deterministic, varlen in itertools.product(
            (np.float16, BF16, np.float32), tiles.HEADDIMS, (False, True), (False, True)):
        mine = backward.mma_steps(dtype, hd, deterministic, varlen, limit=limit)
        table = backward.mma_steps(dtype, hd, deterministic, varlen)
        if all(s.shared_bytes <= limit for s in table):
            assert mine == table, (arch, hd)
        else:
            assert (arch, hd) == ("sm_80", 256) and np.dtype(dtype) != np.float32
    for hd in tiles.HEADDIMS:
        assert decode.config(BF16, hd, False, limit=limit) == decode.config(BF16, hd, False)


def test_hopper_forward_fixes_one_score_option_and_runs_options_on_two_consumers():
    """flash_fwd_sm90 applies one score option fixed at compile time (its OPTS) and both
    together per element; with either it runs two consumer warpgroups, also at head dim 64
    where plain calls over SM90_SHORT_KEYS keys run three."""
    expected = {(False, False): 0, (True, False): _core.OPTS_SOFTCAP,
                (False, True): _core.OPTS_ALIBI, (True, True): _core.OPTS_RUNTIME}
    for (softcap, alibi), opts in expected.items():
        assert _core.score_opts(softcap, alibi) == opts
        c = ops.forward.sm90_config(BF16, 64, opts, False, ops.forward.SM90_SHORT_KEYS)
        consumers = 3 if opts == 0 else 2
        assert c.name_expression == \
            f"cuflash::flash_fwd_sm90<__nv_bfloat16, 64, 128, {consumers}, {opts}>"
        assert c.block_m == 64 * consumers


def test_hopper_forward_key_blocks_at_head_dims_96_and_128():
    """Head dims 96 (padded) and 128 share one entry: key blocks of 160 from SM90_SHORT_KEYS
    keys without a score option, 128 below that and with soft-cap or ALiBi (notes v38)."""
    short = ops.forward.SM90_SHORT_KEYS
    for hd in (96, 128):
        for opts, keys, block_n in ((0, short, 160), (0, short - 1, 128),
                                    (_core.OPTS_SOFTCAP, short, 128),
                                    (_core.OPTS_ALIBI, 4 * short, 128)):
            c = ops.forward.sm90_config(BF16, hd, opts, False, keys)
            assert f", 128, {block_n}, 2, {opts}>" in c.name_expression, (hd, opts, keys)


def test_small_tiles_are_smaller_than_the_table():
    """Each fallback needs less shared memory than the tile before it, so the first that
    fits is the largest that fits."""
    for hd, passes in backward.SMALL_TILES.items():
        for name, small in passes.items():
            mode = {"dv": backward.DV, "dk": backward.DK, "dq": backward.DQ}[name]
            sizes = [backward._main_step(BF16, hd, t, mode).shared_bytes
                     for t in (backward.TILES[hd][name], *small)]
            assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == len(sizes)
            assert all(t.reason for t in small)
    for hd, small in decode.SMALL_TILES.items():
        stages = [t.stages for t in (decode.TILES[hd], *small)]
        assert stages == sorted(stages, reverse=True) and all(t.reason for t in small)


def test_fake_sm86_plans_and_launches_within_its_shared_memory(monkeypatch):
    """Through the public API on a fake sm_86 (99 KiB a block; its driver refuses more):
    the backward at head dims 96 to 256, float32 included, and decoding at 128 and 256."""
    monkeypatch.setitem(fake_cupy.ARCHS, 2, "86")
    monkeypatch.setitem(fake_cupy.SHARED_OPTIN, 2, 99 * 1024)
    with fake_gpu() as (cuflash, world):
        with world.on(2):
            for dtype, hd in itertools.product((fake_cupy.BF16, np.float32),
                                               (96, 128, 192, 256)):
                q, k, v, out, dout = (world.array((1, 70, 2, hd), dtype, n)
                                      for n in ("q", "k", "v", "out", "dout"))
                lse = world.array((1, 2, 70), np.float32, "lse")
                for deterministic in (False, True):
                    world.begin_call()
                    cuflash.attention_backward(dout, q, k, v, out, lse,
                                               deterministic=deterministic)
                    shared = [x["shared"] for x in world.launches]
                    assert max(shared) <= 99 * 1024 and len(shared) >= 3, (dtype, hd)
            for hd in (128, 256):
                q = world.array((2, 1, 8, hd), fake_cupy.BF16, "q")
                k_cache, v_cache = (world.array((2, 512, 2, hd), fake_cupy.BF16, n)
                                    for n in ("k_cache", "v_cache"))
                world.begin_call()
                cuflash.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=300)
                [launch] = world.launches
                assert launch["kernel"].name.startswith("cuflash::flash_decode<")
                assert 48 * 1024 < launch["shared"] <= 99 * 1024


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["sm_80", "sm_86"])
def test_smaller_tiles_match_the_reference_on_this_gpu(arch, monkeypatch):
    """The tiles chosen for less shared memory are mma.sync kernels, which run on any GPU
    of sm_80 and newer: on the test GPU with ``arch``'s limit, the backward (fp16, bf16,
    float32; deterministic or not; causal, GQA) and decoding (paged, 3 splits, an append)
    at the head dims whose tiles change, against the float64 reference."""
    from gpu import import_cupy, launches
    from test_gpu_backward import check
    from test_kvcache import Problem, gpu_call
    from test_launch_layer import isolated_state
    limit = tiles.shared_limit(arch)
    monkeypatch.setattr(tiles, "shared_limit", lambda _: limit)
    rng = np.random.default_rng(5)
    with isolated_state(), launches() as launched:
        for dtype, hd in ((np.float16, 96), (BF16, 128), (np.float16, 192), (BF16, 256),
                          (np.float32, 192), (np.float32, 256)):
            for deterministic in (False, True):
                check(dtype, 2, 150, 170, 4, 2, hd, deterministic=deterministic,
                      causal=True, seed=hd, hopper=False)
        for hd in (96, 128, 192, 256):
            Problem(rng, BF16, seqlen_q=2, nheads=8, nheads_kv=2, headdim=hd,
                    lengths=(0, 37, 700), seqlen_new=1, page_size=16).check(
                        gpu_call(3), import_cupy())
    names = {name for _, name in launched}
    small = {"sm_80": ["cuflash::bwd_main<__nv_bfloat16, 256, 16, 4, 1, 1>",
                       "cuflash::bwd_main<__nv_bfloat16, 256, 32, 4, 1, 8>"],
             "sm_86": ["cuflash::bwd_main<__half, 96, 32, 4, 1, 5>",
                       "cuflash::bwd_main<__nv_bfloat16, 128, 16, 8, 1, 8>",
                       "cuflash::bwd_main<__half, 192, 16, 4, 1, 2>",
                       "cuflash::bwd_main<__nv_bfloat16, 256, 16, 2, 1, 1>",
                       "cuflash::bwd_main_f32<192, 16, 7>", "cuflash::bwd_main_f32<256, 8, 8>",
                       "cuflash::flash_decode<__nv_bfloat16, 128, 4, 2, false>",
                       "cuflash::flash_decode<__nv_bfloat16, 256, 4, 1, false>"]}[arch]
    assert set(small) <= names, sorted(names)


def test_sm90_clusters_only_where_the_kernel_runs_them():
    """Clusters of two at hd128 and hd256 without a left window (causal calls included),
    dense calls; a request for one elsewhere is refused by name."""
    with pytest.raises(ValueError, match="no clusters"):
        ops.forward.sm90_config(BF16, 128, 0, True, 4096, cluster=2)
    with pytest.raises(ValueError, match="no clusters"):
        ops.forward.sm90_config(BF16, 192, 0, False, 4096, cluster=2)
    with pytest.raises(ValueError, match="left window"):
        ops.forward.sm90_config(BF16, 128, 0, False, 4096, left_window=True, cluster=2)
    assert ops.forward.sm90_config(BF16, 128, 0, False, 4096, left_window=True).cluster == 1
    assert ops.forward.sm90_config(BF16, 128, 0, False, 4096).cluster == 2
    assert ops.forward.sm90_config(BF16, 256, 1, False, 1024).cluster == 2
    assert ops.forward.sm90_config(BF16, 64, 0, False, 4096).cluster == 1
    assert ops.forward.sm90_config(BF16, 192, 0, False, 4096).cluster == 1
