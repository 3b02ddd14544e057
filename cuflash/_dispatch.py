"""(dtype, headdim, flags) -> kernel configuration, for every kernel family.

Each family exposes a function that picks its configuration for one call and contributes
every instantiation it can pick to ``all_kernels()``, which the compile check walks. Every
table entry carries the reason it was chosen (a measurement in bench/NOTES.md, or a limit).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

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


# --- Backward (kernels_cu/flash_bwd.cu) --------------------------------------------------
# C++ element types, as in _launch.CXX_TYPES (kept here so the dispatcher imports no NumPy
# dtype machinery of the launcher).
_BWD_TYPES = ("__half", "__nv_bfloat16", "float")


def bwd_preprocess_kernels(cxx_type: str):
    """(preprocess, convert) name expressions: delta/lse_log2/dq zeroing, and dq_accum -> dq."""
    return (f"cuflash::bwd_preprocess<{cxx_type}>", f"cuflash::bwd_convert_dq<{cxx_type}>")


def _bwd_family():
    for t in _BWD_TYPES:
        for name in bwd_preprocess_kernels(t):
            yield "flash_bwd.cu", name


_FAMILIES.append(_bwd_family)


# ---------------------------------------------------------------------------------------
# Forward (kernels_cu/flash_fwd.cu)

FWD_FILE = "flash_fwd.cu"


@dataclass(frozen=True)
class FwdTile:
    block_m: int   # Br: query rows per CTA
    block_n: int   # Bc: keys per K/V tile
    num_warps: int
    reason: str


# Tile per padded head dim, fp16 and bf16 alike. With R = Br / warps rows per warp, a
# thread holds R * hd / 64 registers of Q (when in registers), R * hd / 16 of O and
# R * Bc / 16 of S; the aim is 128-row query blocks (K/V re-read from L2 once per 128 rows)
# without spills.
FWD_TILES = {
    32: FwdTile(128, 64, 4, "2 m16 tiles per warp (K/V fragments feed twice the MMAs); "
                            "Q in registers; 192 registers, no spills"),
    64: FwdTile(128, 128, 8, "4 warps of 2 m16 tiles spill (255 registers); 8 warps of one "
                             "tile with Bc=128 fit in 236"),
    96: FwdTile(128, 64, 8, "8 warps of one m16 tile keep Q in registers without spills"),
    128: FwdTile(128, 64, 8, "8 warps of one m16 tile: 239 registers; 4 warps of two "
                             "spill even with Bc=32"),
    192: FwdTile(128, 64, 8, "FA2's 128x64 with 8 warps; Q re-read from shared memory"),
    256: FwdTile(64, 32, 4, "128-row blocks spill (Bc=64: 136 bytes, Bc=32: 20); 64x32 fits "
                            "in 255 registers"),
}
# float32: one generic tiling (F32_* in flash_fwd.cu): 4 warps of 4 rows, 32-key tiles.
FWD_F32_BLOCK_M, FWD_F32_WARPS = 16, 4


@dataclass(frozen=True)
class FwdConfig:
    name_expression: str
    block_m: int
    num_threads: int
    shared_bytes: int


def _smem_cols(headdim):
    return (headdim + 63) // 64 * 64


def _fwd_name(cxx_type, hd, tile, score_mod):
    mod = "true" if score_mod else "false"
    return (f"cuflash::flash_fwd<{cxx_type}, {hd}, {tile.block_m}, {tile.block_n}, "
            f"{tile.num_warps}, {mod}>")


def forward_config(dtype, headdim, softcap=0.0, alibi=False) -> FwdConfig:
    """The forward instantiation and launch shape for one call."""
    import numpy as np
    from ._launch import CXX_TYPES
    hd = padded_headdim(headdim)
    if np.dtype(dtype) == np.float32:
        smem = (FWD_F32_BLOCK_M * hd + 32 * (hd + 1) + 32 * hd) * 4
        return FwdConfig(f"cuflash::flash_fwd_f32<{hd}>", FWD_F32_BLOCK_M, FWD_F32_WARPS * 32,
                         smem)
    tile = FWD_TILES[hd]
    smem = (tile.block_m + 2 * tile.block_n) * _smem_cols(hd) * 2
    return FwdConfig(_fwd_name(CXX_TYPES[np.dtype(dtype)], hd, tile, softcap > 0 or alibi),
                     tile.block_m, tile.num_warps * 32, smem)


def _forward_kernels():
    for hd in HEADDIMS:
        for cxx in ("__half", "__nv_bfloat16"):
            for score_mod in (False, True):
                yield FWD_FILE, _fwd_name(cxx, hd, FWD_TILES[hd], score_mod)
        yield FWD_FILE, f"cuflash::flash_fwd_f32<{hd}>"


_FAMILIES.append(_forward_kernels)
