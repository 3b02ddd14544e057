"""What every kernel family's tile table shares: the head dims with their own
instantiations, and the spelling of template flags."""
from __future__ import annotations

import ml_dtypes
import numpy as np

BFLOAT16 = np.dtype(ml_dtypes.bfloat16)

# Head dims that have their own instantiation; others (multiples of 8 up to 256) run in the
# next one up, the kernel zero-filling the extra columns on load and skipping them on store.
HEADDIMS = (32, 64, 96, 128, 192, 256)


def padded_headdim(headdim: int) -> int:
    return next(d for d in HEADDIMS if d >= headdim)


def smem_cols(headdim: int) -> int:
    """Columns of a shared-memory row: whole 64-element (128-byte) swizzle rows."""
    return (headdim + 63) // 64 * 64


def varlen_flag(varlen: bool) -> str:
    """The trailing template argument of a varlen instantiation (dense: the default), so
    that dense instantiations compile exactly as without varlen support."""
    return ", true" if varlen else ""
