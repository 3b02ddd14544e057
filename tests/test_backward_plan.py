"""The Hopper backward's CTA order (BwdKeyBlock in kernels_cu/flash_bwd_sm90.cu), the L2
sections it walks, its tiles, and the soft-cap bound of the Hopper kernels: no GPU
needed."""
from __future__ import annotations

import dataclasses
import itertools

import ml_dtypes
import numpy as np
import pytest

from cuflash import _core
from cuflash.ops import backward, tiles
from test_forward_plan import _problem


def test_sections_hold_the_q_do_and_dq_accumulators_that_fit_in_l2_and_one_wave_takes():
    # 4k queries at head dim 128: Q and dO (2 x 1 MiB) and dQ in float32 (2 MiB) a head,
    # 8 in 32 MiB; with 4 key blocks a pair (512 keys) a wave of 132 CTAs would take 33.
    assert backward._section(_problem(4096, 16, 16, 128, batch=4), 4, 132) == 8
    # GQA: a pair is a kv head with its four query heads.
    assert backward._section(_problem(4096, 16, 4, 128, batch=4), 4, 132) == 2
    # 32 key blocks a pair (4k keys): a wave takes 4 pairs; 128 (16k): one.
    assert backward._section(_problem(4096, 16, 16, 128, batch=4), 32, 132) == 4
    assert backward._section(_problem(16384, 16, 16, 128), 128, 132) == 1
    # Under a window (causal too) the wave does not bound them.
    causal = dataclasses.replace(_problem(4096, 16, 16, 128, batch=4), window_right=0)
    assert backward._section(causal, 32, 132) == 8
    # Never more than there are pairs, at least one, one for varlen.
    assert backward._section(_problem(128, 2, 2, 64), 1, 132) == 2
    assert backward._section(_problem(2**20, 4, 4, 256), 4, 132) == 1
    assert backward._section(_problem(4096, 16, 16, 128, batch=4, varlen=True), 4, 132) == 1


def _cta_order(blocks, batch, heads_kv, section, descending):
    """BwdKeyBlock's (key block, batch item, kv head) of each CTA, in launch order."""
    pairs = batch * heads_kv
    order = []
    for cta in range(blocks * pairs):
        first = cta // (section * blocks) * section
        size = min(section, pairs - first)
        rank, pair = divmod(cta - first * blocks, size)
        pair += first
        order.append((blocks - 1 - rank if descending else rank, pair % batch, pair // batch))
    return order


@pytest.mark.parametrize("blocks,batch,heads_kv,section", [
    (32, 4, 16, 8), (128, 1, 16, 2), (5, 3, 7, 4), (3, 2, 5, 10), (4, 1, 1, 1), (7, 2, 3, 1)])
@pytest.mark.parametrize("descending", [False, True])
def test_cta_order_walks_sections_rank_by_rank(blocks, batch, heads_kv, section, descending):
    """Every (key block, item, kv head) once; within a section every pair's rank r before
    any pair's rank r + 1 (the heaviest causal key blocks first); a key block's predecessor
    in its deterministic turn order (the next higher block when descending) launched before
    it, so that a waiting CTA never waits for one that has not started."""
    section = min(section, batch * heads_kv)
    order = _cta_order(blocks, batch, heads_kv, section, descending)
    assert sorted(order) == list(itertools.product(range(blocks), range(batch),
                                                   range(heads_kv)))
    position = {cta: i for i, cta in enumerate(order)}
    for (n, b, h), i in position.items():
        before = n + 1 if descending else n - 1
        if 0 <= before < blocks:
            assert position[(before, b, h)] < i
    ranks = [blocks - 1 - n if descending else n for n, _, _ in order]
    cut = section * blocks
    for start in range(0, len(order), cut):
        assert ranks[start:start + cut] == sorted(ranks[start:start + cut])
    if section == 1:  # one pair at a time: the grid's own order (x fastest)
        rows = [(n if not descending else blocks - 1 - n, b, h) for n, b, h in order]
        assert rows == [(x, y, z) for z in range(heads_kv) for y in range(batch)
                        for x in range(blocks)]


def _paired_order(pairs, blocks, section, offset):
    """BwdKeyBlock's phases in the paired order, per CTA in launch order: (key block, pair,
    light) each, light: query blocks ascending from the diagonal and dQ turns from the last
    key block down; else descending walks and turns from key block 0 up."""
    order = []
    for c in range(backward.paired_ctas(pairs, blocks, offset)):
        if pairs % 2:
            if c < blocks:
                order.append([(blocks - 1 - c, pairs - 1, True)])
                continue
            c -= blocks
        per_section, width = max(1, section // 2), blocks + offset
        first = c // (per_section * width) * per_section
        rank, group = divmod(c - first * width, min(per_section, pairs // 2 - first))
        group += first
        phases = []
        if rank >= offset:
            phases.append((blocks - 1 - (rank - offset), 2 * group, True))
        if rank < blocks:
            phases.append((rank, 2 * group + 1, False))
        order.append(phases)
    return order


@pytest.mark.parametrize("pairs,blocks,section,offset", [
    (32, 64, 4, 2), (32, 64, 4, 0), (8, 256, 1, 8), (128, 16, 16, 0), (128, 16, 16, 2),
    (6, 20, 4, 3), (7, 12, 4, 1), (5, 9, 1, 0), (2, 3, 8, 2), (3, 1, 2, 0), (2, 2, 1, 0)])
def test_paired_order_waits_only_for_earlier_ctas(pairs, blocks, section, offset):
    """Every (key block, pair) once; run one CTA after another on one SM in launch order,
    every causal dQ turn has come when a step reaches it (no CTA waits for a later one), and
    every query block's tile ends with all its key blocks added; CTA sizes as the host's
    list schedule takes them."""
    order = _paired_order(pairs, blocks, section, offset)
    assert sorted(x[:2] for phases in order for x in phases) == sorted(
        itertools.product(range(blocks), range(pairs)))
    added = {}
    for phases in order:
        for n, pair, light in phases:
            for m in (range(n, blocks) if light else range(blocks - 1, n - 1, -1)):
                turn = m - n if light else n
                assert added.get((pair, m), 0) == turn, (phases, m)
                added[(pair, m)] = turn + 1
    assert added == {(pair, m): m + 1 for pair in range(pairs) for m in range(blocks)}
    sizes = [sum(blocks - n for n, _, _ in phases) for phases in order]
    assert sizes == backward.paired_steps(pairs, blocks, section, offset, switch=0)
    assert [3 * x for x in sizes] == backward.paired_steps(pairs, blocks, section, offset,
                                                           heads=3, switch=0)


def test_pair_offsets_past_the_key_blocks_are_refused():
    """An offset over the key blocks would give a CTA a key block past the keys."""
    assert backward.paired_ctas(3, 4, 4) == 4 + 8
    with pytest.raises(ValueError, match="pair offset"):
        backward.paired_ctas(3, 4, 5)


def test_paired_order_serves_deterministic_causal_calls_with_as_many_queries_as_keys():
    """bwd_sm90_wide's paired order (an offset >= 0) where its turns hold: deterministic,
    causal, seqlen_q == seqlen_k, dense, two pairs or more; the offset the list schedule
    picks fills the last wave (4k: 32 pairs of 64 key blocks, 16k: 8 of 256)."""
    def offset(deterministic=True, **changes):
        p = dataclasses.replace(_problem(4096, 8, 8, 256, batch=4), window_right=0)
        p = dataclasses.replace(p, **changes)
        hopper = backward.choose(p, deterministic, "sm_90")[0]
        return backward._pair_offset(p, hopper, deterministic,
                                     backward._section(p, -(-p.seqlen_k // 64), 132), 132)

    assert offset() == 2
    assert offset(seqlen_q=16384, seqlen_k=16384, batch=1) == 6
    assert offset(batch=1, nheads=4, nheads_kv=2, seqlen_q=1025, seqlen_k=1025) >= 0
    for changes in (dict(deterministic=False), dict(window_right=-1), dict(window_left=100),
                    dict(seqlen_k=4000), dict(headdim=128), dict(batch=1, nheads_kv=1),
                    dict(varlen=True)):
        assert offset(**changes) == -1, changes


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("opts", [0, _core.OPTS_SOFTCAP, _core.OPTS_ALIBI, _core.OPTS_RUNTIME])
@pytest.mark.parametrize("headdim", [40, 64, 128])
def test_three_warpgroups_serve_soft_cap_and_deterministic_calls_at_head_dim_64(
        headdim, opts, deterministic):
    """bwd_sm90 at padded head dim 64 runs three MMA warpgroups (192 keys a CTA) for float16
    soft-cap alone, and for deterministic calls without soft-cap; every other call, and
    every other head dim, keeps its two-warpgroup tile."""
    three_calls = {(np.float16, _core.OPTS_SOFTCAP, False)} | {
        (dtype, opts, True) for dtype in (np.float16, ml_dtypes.bfloat16)
        for opts in (0, _core.OPTS_ALIBI)}
    for dtype in (np.float16, ml_dtypes.bfloat16):
        three = headdim <= 64 and (dtype, opts, deterministic) in three_calls
        step = backward.sm90_steps(dtype, headdim, opts, False, deterministic)[0]
        assert (step.num_threads == backward.SM90_THREE.threads) == three, step
        assert (", 192, 64, " in step.name_expression) == three, step


def test_soft_caps_past_the_fast_tanh_bound_run_the_mma_sync_kernels():
    """The fp16 Hopper kernels' tanh (scaled_tanh) errs in absolute terms, which a logit
    multiplies by the soft-cap: past FAST_TANH_MAX_SOFTCAP the forward and backward leave
    the Hopper kernels."""
    from cuflash.ops import forward
    p = _problem(4096, 16, 16, 128)
    for softcap, hopper in ((30.0, True), (_core.FAST_TANH_MAX_SOFTCAP, True),
                            (2 * _core.FAST_TANH_MAX_SOFTCAP, False)):
        q = dataclasses.replace(p, softcap=softcap)
        assert forward.choose(q, "sm_90").hopper == hopper
        steps = backward.choose(q, False, "sm_90")
        assert (steps[0].filename == backward.SM90_FILE) == hopper


@pytest.mark.parametrize("arch", tiles.CHECKED_ARCHS)
@pytest.mark.parametrize("deterministic", [False, True])
def test_dense_scratch_bound_holds_every_plan(arch, deterministic):
    """cuflash.jax sizes the backward's workspace before the device is known: the bound must
    hold what the plan of any GPU, head dim, dtype and option takes."""
    for hd, seqlen, softcap, dtype in itertools.product(
            (8, 32, 40, 64, 72, 96, 128, 160, 200, 256), (1, 17, 128, 1025),
            (0.0, 5.0, 500.0), (np.float16, np.float32)):
        p = dataclasses.replace(_problem(seqlen, 4, 2, hd, batch=3), dtype=np.dtype(dtype),
                                softcap=softcap)
        rows = p.batch * p.nheads * backward.padded_seqlen(seqlen)
        needed = backward.scratch_layout(rows, hd, backward.choose(p, deterministic, arch),
                                         deterministic).total
        assert needed <= backward.dense_scratch_bytes(3, 4, seqlen, hd, deterministic)
