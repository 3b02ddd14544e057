"""The Hopper backward's CTA order (BwdKeyBlock in kernels_cu/flash_bwd_sm90.cu), the L2
sections it walks, and the soft-cap bound of the Hopper kernels: no GPU needed."""
from __future__ import annotations

import dataclasses
import itertools

import pytest

from cuflash import _core
from cuflash.ops import backward
from test_forward_plan import _problem


def test_sections_hold_the_q_do_and_dq_accumulators_that_fit_in_l2():
    # 4k queries at head dim 128: Q and dO (2 x 1 MiB) and dQ in float32 (2 MiB) a head.
    assert backward._section(_problem(4096, 16, 16, 128, batch=4)) == 8
    assert backward._section(_problem(16384, 16, 16, 128)) == 2
    # GQA: a pair is a kv head with its four query heads.
    assert backward._section(_problem(4096, 16, 4, 128, batch=4)) == 2
    # Never more than there are pairs, at least one, one for varlen.
    assert backward._section(_problem(128, 2, 2, 64)) == 2
    assert backward._section(_problem(2**20, 4, 4, 256)) == 1
    assert backward._section(_problem(4096, 16, 16, 128, batch=4, varlen=True)) == 1


def _cta_order(blocks, batch, heads_kv, section, descending, cluster=1):
    """BwdKeyBlock's (key block, batch item, kv head) of each CTA, in launch order."""
    pairs, units = batch * heads_kv, blocks // cluster
    order = []
    for cta in range(blocks * pairs):
        unit = cta // cluster
        first = unit // (section * units) * section
        size = min(section, pairs - first)
        rank, pair = divmod(unit - first * units, size)
        rank = cluster * rank + cta % cluster
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


@pytest.mark.parametrize("blocks,batch,heads_kv,section", [
    (64, 4, 8, 4), (256, 1, 8, 2), (6, 3, 7, 4), (2, 2, 5, 10), (4, 1, 1, 1)])
def test_pairs_of_ctas_hold_consecutive_key_blocks_of_one_pair(blocks, batch, heads_kv,
                                                               section):
    """bwd_sm90_wide_pair: the two CTAs of a cluster (consecutive in launch order) take key
    blocks 2 r and 2 r + 1 of the same (item, kv head), the CTA of cluster rank c block
    2 r + c (its producer loads rows of Q and dO by that rank); every CTA once, sections
    rank by rank as without clusters."""
    section = min(section, batch * heads_kv)
    order = _cta_order(blocks, batch, heads_kv, section, False, cluster=2)
    assert sorted(order) == list(itertools.product(range(blocks), range(batch),
                                                   range(heads_kv)))
    for c in range(0, len(order), 2):
        (n0, b0, h0), (n1, b1, h1) = order[c], order[c + 1]
        assert (b0, h0) == (b1, h1) and n0 % 2 == 0 and n1 == n0 + 1
    cut = section * blocks
    ranks = [n // 2 for n, _, _ in order]
    for start in range(0, len(order), cut):
        assert ranks[start:start + cut] == sorted(ranks[start:start + cut])


def test_pairs_run_dense_calls_that_are_not_deterministic_in_whole_clusters():
    """Head dims over 128: bwd_sm90_wide_pair for dense calls, its grid's key blocks
    rounded up to whole clusters; bwd_sm90_wide for deterministic and varlen ones."""
    p = dataclasses.replace(_problem(4096 + 64, 16, 16, 256), seqlen_k=4096 + 64)
    wide = backward.choose(p, False, "sm_90")[0]
    assert wide.name_expression.startswith("cuflash::bwd_sm90_wide_pair<") and wide.cluster == 2
    assert backward.grid(wide, p) == (66, 1, 16)  # 65 key blocks
    assert backward.grid(wide, dataclasses.replace(p, seqlen_k=4096)) == (64, 1, 16)
    assert backward.choose(p, True, "sm_90")[0].cluster == 1
    assert backward.choose(dataclasses.replace(p, varlen=True), False, "sm_90")[0].cluster == 1


def test_soft_caps_past_the_fast_tanh_bound_run_the_mma_sync_kernels():
    """scaled_tanh's absolute error grows into a logit with the soft-cap: past
    FAST_TANH_MAX_SOFTCAP the forward and backward leave the Hopper kernels."""
    from cuflash.ops import forward
    p = _problem(4096, 16, 16, 128)
    for softcap, hopper in ((30.0, True), (_core.FAST_TANH_MAX_SOFTCAP, True),
                            (2 * _core.FAST_TANH_MAX_SOFTCAP, False)):
        q = dataclasses.replace(p, softcap=softcap)
        assert forward.choose(q, "sm_90").hopper == hopper
        steps = backward.choose(q, False, "sm_90")
        assert (steps[0].filename == backward.SM90_FILE) == hopper


def test_a_plan_refuses_pairs_for_varlen_and_deterministic_calls():
    """Steps given to a plan (tuning) cannot put bwd_sm90_wide_pair where its shared steps
    would be wrong (varlen items end mid-pair) or its order not reproducible."""
    p = _problem(4096, 16, 16, 256)
    steps = backward.choose(p, False, "sm_90")
    for q, deterministic in ((dataclasses.replace(p, varlen=True), False), (p, True)):
        with pytest.raises(ValueError, match="bwd_sm90_wide_pair"):
            backward.Plan(q, (), steps, deterministic)
