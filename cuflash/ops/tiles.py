"""What every kernel family's tile table shares: the head dims with their own
instantiations, and the spelling of template flags."""
from __future__ import annotations

import ml_dtypes
import numpy as np

BFLOAT16 = np.dtype(ml_dtypes.bfloat16)

# Head dims that have their own instantiation; others (multiples of 8 up to 256) run in the
# next one up, the kernel zero-filling the extra columns on load and skipping them on store.
HEADDIMS = (32, 64, 96, 128, 192, 256)

# The Hopper kernels order their work in sections of (head, batch item) pairs whose operands
# read by every CTA of a pair (the forward's K and V; the backward's Q, dO and dQ
# accumulators) fit in this much of the L2 together (FA3's figure for the H100's 50 MB, two
# partitions).
SM90_L2_BYTES = 32 * 2**20


def sm90_section(pairs: int, fit: int, blocks: int, ctas: int, windowed: bool) -> int:
    """The pairs of one section: at most the ``fit`` whose operands share SM90_L2_BYTES,
    and where a pair's ``blocks`` tiles (forward) or CTAs (backward) all cost the same (no
    window; a causal mask is one), at most those one wave of ``ctas`` takes, so that a
    pair's blocks run together and read its operands from HBM once rather than again a
    wave later, after the section's other operands have evicted them (at 1k keys, hd128,
    sections of 64 pairs read K and V from HBM four times: docs/notes/forward.md v25).
    Under a window the heaviest blocks of large sections keep the launch's end light."""
    return max(1, min(pairs, fit, pairs if windowed else ctas // blocks))


def padded_headdim(headdim: int) -> int:
    return next(d for d in HEADDIMS if d >= headdim)


def first_fitting(candidates, shared_bytes, limit: int | None):
    """(tile, its shared bytes) of the first of ``candidates`` whose ``shared_bytes(tile)``
    fits in ``limit`` bytes (None: the first); the last if none does (its launch then says
    so)."""
    for tile in candidates:
        need = shared_bytes(tile)
        if limit is None or need <= limit:
            break
    return tile, need


def smem_cols(headdim: int) -> int:
    """Columns of a shared-memory row: whole 64-element (128-byte) swizzle rows."""
    return (headdim + 63) // 64 * 64


def varlen_flag(varlen: bool) -> str:
    """The trailing template argument of a varlen instantiation (dense: the default), so
    that dense instantiations compile exactly as without varlen support."""
    return ", true" if varlen else ""


# Dynamic shared memory a block may opt into (cudaDevAttrMaxSharedMemoryPerBlockOptin), per
# arch: what the tile tables choose against. The compile check proves every choice on
# CHECKED_ARCHS, which cover every limit here; _core.Kernel still checks the device's own.
SHARED_LIMITS = {"sm_80": 166912, "sm_86": 101376, "sm_87": 166912, "sm_89": 101376,
                 "sm_90": 232448, "sm_100": 232448, "sm_103": 232448, "sm_120": 101376,
                 "sm_121": 101376}
CHECKED_ARCHS = ("sm_80", "sm_86", "sm_89", "sm_90")


def shared_limit(arch: str) -> int:
    """The shared memory a block may use on a device of ``arch``; an arch not listed gets
    the smallest limit, which every tile table fits."""
    return SHARED_LIMITS.get(arch, min(SHARED_LIMITS.values()))
