"""(dtype, headdim, flags) -> kernel configuration, for every kernel family.

Each family exposes a function that picks its configuration for one call and contributes
every instantiation it can pick to ``all_kernels()``, which the compile check walks. Every
table entry carries the reason it was chosen (a measurement in bench/NOTES.md, or a limit).
"""
from __future__ import annotations

import itertools

# Head dims that have their own instantiation; others (multiples of 8 up to 256) run in the
# next one up, the kernel zero-filling the extra columns on load and skipping them on store.
HEADDIMS = (32, 64, 96, 128, 192, 256)


def padded_headdim(headdim: int) -> int:
    return next(d for d in HEADDIMS if d >= headdim)


def all_kernels():
    """Every (filename, name_expression) the dispatcher can choose."""
    seen = []
    for family in _FAMILIES:
        for item in family():
            if item not in seen:
                seen.append(item)
    return seen


# Filled by the kernel families below: each is a function yielding (filename, name_expression).
_FAMILIES = []
