"""The Hopper forward's plan numbers that no GPU is needed to check."""
import dataclasses

import numpy as np

from cuflash import _core
from cuflash.ops import forward

HALF = np.dtype("float16")  # any 2-byte type: only the item size matters here


def _problem(seqlen, nheads, nheads_kv, headdim, batch=1, varlen=False):
    return _core.Problem(0, HALF, batch, seqlen, seqlen, nheads, nheads_kv, headdim, (), (),
                         (), 1.0, 0.0, -1, -1, None, varlen, seqlen * batch, seqlen * batch)


def test_sections_hold_what_fits_in_l2_and_one_wave_takes():
    # 16k keys at head dim 128: K and V of one head are 8 MiB, four share 32 MiB; with 8
    # query blocks a pair (1k queries) a wave of 132 CTAs would take 16.
    assert forward._section(_problem(16384, 16, 16, 128), 8, 132) == 4
    # GQA: the four heads of a group read one K and V.
    assert forward._section(_problem(16384, 16, 4, 128), 8, 132) == 16
    # 4k: 2 MiB a head, 16 in 32 MiB, but a wave takes the 32 query blocks of only 4 pairs.
    assert forward._section(_problem(4096, 16, 16, 128, batch=4), 32, 132) == 4
    # 1k: 512 KiB a head (64 in 32 MiB), 8 query blocks a pair: 16 pairs a wave, never more
    # than there are.
    assert forward._section(_problem(1024, 16, 16, 128, batch=16), 8, 132) == 16
    assert forward._section(_problem(1024, 4, 4, 128), 8, 32) == 4
    # One pair a section: K and V over the budget, or more query blocks than CTAs.
    assert forward._section(_problem(65536, 8, 8, 256), 4, 132) == 1
    assert forward._section(_problem(16384, 16, 16, 128), 128, 132) == 1
    assert forward._section(_problem(16384, 16, 16, 128), 256, 132) == 1
    # Under a window (causal too) tiles differ, and large sections keep the end light.
    causal = dataclasses.replace(_problem(1024, 16, 16, 128, batch=16), window_right=0)
    assert forward._section(causal, 8, 132) == 64
    # Varlen skips tiles along one pair's query blocks: sections of one pair.
    assert forward._section(dataclasses.replace(_problem(16384, 16, 16, 128),
                                                varlen=True), 8, 132) == 1
