"""The Hopper forward's plan numbers that no GPU is needed to check."""
import dataclasses

import numpy as np

from cuflash import _core
from cuflash.ops import forward

HALF = np.dtype("float16")  # any 2-byte type: only the item size matters here


def _problem(seqlen, nheads, nheads_kv, headdim, batch=1, varlen=False):
    return _core.Problem(0, HALF, batch, seqlen, seqlen, nheads, nheads_kv, headdim, (), (),
                         (), 1.0, 0.0, -1, -1, None, varlen, seqlen * batch, seqlen * batch)


def test_sections_hold_what_fits_in_l2():
    # 16k keys at head dim 128: K and V of one head are 8 MiB, four share 32 MiB.
    assert forward._section(_problem(16384, 16, 16, 128)) == 4
    # GQA: the four heads of a group read one K and V.
    assert forward._section(_problem(16384, 16, 4, 128)) == 16
    # A head whose K and V alone exceed the budget is a section of its own.
    assert forward._section(_problem(65536, 8, 8, 256)) == 1
    # 1k keys: 512 KiB a head, 64 pairs a section, never more than there are.
    assert forward._section(_problem(1024, 16, 16, 128, batch=16)) == 64
    assert forward._section(_problem(1024, 16, 16, 128)) == 16
    # Varlen skips tiles along one pair's query blocks: sections of one pair.
    assert forward._section(dataclasses.replace(_problem(16384, 16, 16, 128),
                                                varlen=True)) == 1
