"""(dtype, headdim, flags) -> kernel configuration, for every kernel family.

Each family exposes a function that picks its configuration for one call and contributes
every instantiation it can pick to ``all_kernels()``, which the compile check walks. Every
table entry carries the reason it was chosen (a measurement in bench/NOTES.md, or a limit).
"""
from __future__ import annotations

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
BWD_FILE = "flash_bwd.cu"
_BWD_TYPES = ("__half", "__nv_bfloat16", "float")
# Flags of bwd_main's MODE (enum BwdMode in flash_bwd.cu). BWD_VARLEN selects the
# instantiations for packed variable-length batches (cu_seqlens), which every mma.sync kernel
# has, so that the dense ones compile exactly as without varlen support.
BWD_DK, BWD_DV, BWD_DQ_ATOMIC, BWD_DQ, BWD_VARLEN = 1, 2, 4, 8, 16


def _varlen_flag(varlen: bool) -> str:
    """The trailing template argument of a varlen instantiation (dense: the default)."""
    return ", true" if varlen else ""


def bwd_preprocess_kernels(cxx_type: str, varlen: bool = False):
    """(preprocess, convert) name expressions: delta/lse_log2/dq zeroing, and dq_accum -> dq."""
    v = _varlen_flag(varlen)
    return (f"cuflash::bwd_preprocess<{cxx_type}{v}>", f"cuflash::bwd_convert_dq<{cxx_type}{v}>")


@dataclass(frozen=True)
class BwdTile:
    block_r: int    # streamed rows per iteration (queries for dK/dV, keys for dQ)
    num_warps: int  # each warp owns 16 * m_tiles owner rows (keys for dK/dV, queries for dQ)
    m_tiles: int
    reason: str


# Per padded head dim and pass: "dkdv" (dK, dV, and dQ by atomics unless deterministic),
# "dv" / "dk" (head dims whose dK and dV accumulators do not fit a thread together: a thread
# holds 16 * m_tiles * hd / 32 floats per accumulator, so 256 at hd 256 for both), and
# "dq" (deterministic mode's separate dQ kernel). Limits: 255 registers a thread without
# spills (python -m cuflash.compile_check), shared memory (2 owner tiles + 2 x 2 streamed
# tiles of rows hd + 8) under 227 KiB.
BWD_TILES = {
    32: {"dkdv": BwdTile(64, 8, 1, "128 keys x 64 queries; small accumulators"),
         "dq": BwdTile(64, 8, 1, "128 queries, 64-key steps")},
    64: {"dkdv": BwdTile(16, 4, 2, "2 m16 tiles per warp halve B-fragment reads per FLOP: "
                                    "182 vs 154-158 TFLOP/s for 1-tile layouts (NOTES v2); "
                                    "block_r 32 spills"),
         "dq": BwdTile(64, 8, 1, "128 queries, 64-key steps")},
    96: {"dv": BwdTile(64, 8, 1, "split like 192/256: dK+dV together spill on sm_80 at "
                                  "block_r 64, and block_r 32 leaves dQ slices of 24 columns"),
         "dk": BwdTile(64, 8, 1, "dQ columns split 48/48 between warp pairs"),
         "dq": BwdTile(64, 8, 1, "128 queries, 64-key steps")},
    128: {"dkdv": BwdTile(16, 8, 1, "128 keys x 16 queries: dK+dV take 128 registers; "
                                     "block_r 32 is 20% faster on sm_90 (NOTES v2) but "
                                     "spills on sm_80"),
          "dq": BwdTile(64, 8, 1, "128 queries, 64-key steps: 240 registers")},
    192: {"dv": BwdTile(32, 8, 1, "dV alone: 96 accumulator registers"),
          "dk": BwdTile(16, 4, 1, "dK (+ dQ share) alone, 64 keys; block_r 32 spills on "
                                  "sm_80, 8 warps x block_r 16 leave dQ slices of 24 columns"),
          "dq": BwdTile(32, 8, 1, "128 queries, 32-key steps")},
    256: {"dv": BwdTile(32, 8, 1, "dV alone: 128 accumulator registers, 250 in all"),
          "dk": BwdTile(16, 8, 1, "dK (+ dQ share) alone; block_r 32 spills"),
          "dq": BwdTile(32, 8, 1, "128 queries, 32-key steps")},
}


@dataclass(frozen=True)
class BwdLaunch:
    name_expression: str
    key_owner: bool     # grid over key blocks and kv heads (else query blocks and heads)
    block_o: int        # owner rows per CTA
    num_threads: int
    shared_bytes: int


def _bwd_launch(cxx_type, hd, tile, mode) -> BwdLaunch:
    key_owner = not mode & BWD_DQ
    block_o = 16 * tile.m_tiles * tile.num_warps
    ld = hd + 8
    elems = 2 * block_o * ld + 4 * tile.block_r * ld
    if mode & BWD_DQ_ATOMIC:
        elems += block_o * (tile.block_r + 8)
    shared = elems * 2 + (4 * tile.block_r * 4 if key_owner else 0)  # + lse/delta buffers
    name = (f"cuflash::bwd_main<{cxx_type}, {hd}, {tile.block_r}, {tile.num_warps}, "
            f"{tile.m_tiles}, {mode}>")
    return BwdLaunch(name, key_owner, block_o, 32 * tile.num_warps, shared)


def backward_plan(cxx_type: str, headdim: int, deterministic: bool, varlen: bool = False):
    """The bwd_main launches of one backward call, in order (fp16 / bf16)."""
    hd = padded_headdim(headdim)
    tiles = BWD_TILES[hd]
    dq = 0 if deterministic else BWD_DQ_ATOMIC
    v = BWD_VARLEN if varlen else 0
    if "dkdv" in tiles:
        plan = [_bwd_launch(cxx_type, hd, tiles["dkdv"], BWD_DK | BWD_DV | dq | v)]
    else:
        plan = [_bwd_launch(cxx_type, hd, tiles["dv"], BWD_DV | v),
                _bwd_launch(cxx_type, hd, tiles["dk"], BWD_DK | dq | v)]
    if deterministic:
        plan.append(_bwd_launch(cxx_type, hd, tiles["dq"], BWD_DQ | v))
    return plan


def _bwd_family():
    for varlen in (False, True):
        for t in _BWD_TYPES:
            for name in bwd_preprocess_kernels(t, varlen):
                yield BWD_FILE, name
        for t in _BWD_TYPES[:2]:
            for hd in HEADDIMS:
                for deterministic in (False, True):
                    for launch in backward_plan(t, hd, deterministic, varlen):
                        yield BWD_FILE, launch.name_expression


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
    32: FwdTile(128, 64, 4, "2 m16 tiles per warp (each K/V fragment feeds twice the "
                            "MMAs); Q in registers; no spills"),
    64: FwdTile(128, 64, 4, "2 m16 tiles per warp: 0.94-1.04x torch flash vs 0.66-0.82x "
                            "for 8 warps of one tile (128x128x8w), bench/NOTES.md v2"),
    96: FwdTile(128, 32, 4, "2 m16 tiles per warp: 0.78x flash vs 0.66x for 128x64x8w at "
                            "8k (NOTES v2 call); Bc=32 keeps O and S without spills"),
    128: FwdTile(128, 32, 4, "2 m16 tiles per warp: 0.85-0.89x flash vs 0.60-0.80x for "
                             "128x64x8w (NOTES v2); Bc=64 spills, Bc=32 does not"),
    192: FwdTile(128, 64, 8, "one m16 tile per warp: O alone needs 96 registers per tile"),
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
    filename: str = FWD_FILE
    block_n: int = 0  # Bc of the TMA boxes of K and V (flash_fwd_sm90 only)


def _smem_cols(headdim):
    return (headdim + 63) // 64 * 64


def _fwd_name(cxx_type, hd, tile, score_mod, varlen=False):
    mod = "true" if score_mod else "false"
    return (f"cuflash::flash_fwd<{cxx_type}, {hd}, {tile.block_m}, {tile.block_n}, "
            f"{tile.num_warps}, {mod}{_varlen_flag(varlen)}>")


def forward_config(dtype, headdim, softcap=0.0, alibi=False, arch=None,
                   varlen=False, seqlen_k=None) -> FwdConfig:
    """The forward instantiation and launch shape for one call on a device of ``arch``
    (``sm_90`` picks the Hopper kernel where FWD_SM90_TILES has the head dim; ``seqlen_k``
    picks its key-block size). Varlen calls (packed batches with cu_seqlens) run the VARLEN
    instantiations of the same kernels (a template flag)."""
    import numpy as np
    from ._launch import CXX_TYPES
    hd = padded_headdim(headdim)
    if arch == "sm_90" and np.dtype(dtype) != np.float32 and hd in FWD_SM90_TILES:
        return _fwd_sm90_config(CXX_TYPES[np.dtype(dtype)], hd, softcap > 0 or alibi,
                                seqlen_k, varlen)
    if np.dtype(dtype) == np.float32:
        smem = (FWD_F32_BLOCK_M * hd + 32 * (hd + 1) + 32 * hd) * 4
        return FwdConfig(f"cuflash::flash_fwd_f32<{hd}{_varlen_flag(varlen)}>", FWD_F32_BLOCK_M,
                         FWD_F32_WARPS * 32, smem)
    tile = FWD_TILES[hd]
    smem = (tile.block_m + 2 * tile.block_n) * _smem_cols(hd) * 2
    return FwdConfig(_fwd_name(CXX_TYPES[np.dtype(dtype)], hd, tile, softcap > 0 or alibi,
                               varlen),
                     tile.block_m, tile.num_warps * 32, smem)


def _forward_kernels():
    for varlen in (False, True):
        for hd in HEADDIMS:
            for cxx in ("__half", "__nv_bfloat16"):
                for score_mod in (False, True):
                    yield FWD_FILE, _fwd_name(cxx, hd, FWD_TILES[hd], score_mod, varlen)
            yield FWD_FILE, f"cuflash::flash_fwd_f32<{hd}{_varlen_flag(varlen)}>"


_FAMILIES.append(_forward_kernels)


# Hopper (kernels_cu/flash_fwd_sm90.cu, compiled for sm_90a): TMA + wgmma, one producer and
# two consumer warpgroups (FwdSm90Traits: Br = 128, 2-stage K/V ring), a persistent grid of
# one CTA per SM (_launch.forward sizes it). Head dims padded to
# 64 or 128 run here; others (32, 96, 192, 256), float32, and inputs whose strides a TMA map
# cannot describe (_launch.forward falls back) stay on flash_fwd (mma.sync).
FWD_SM90_FILE = "flash_fwd_sm90.cu"
FWD_SM90_BLOCK_M, FWD_SM90_THREADS, FWD_SM90_STAGES = 128, 384, 2


@dataclass(frozen=True)
class FwdSm90Tile:
    block_n: int        # Bc: keys per K/V tile (wgmma N of S = Q K^T)
    block_n_short: int  # Bc under FWD_SM90_SHORT_KEYS keys, and with softcap / ALiBi
    reason: str


# Below this many keys a large Bc mostly computes padding (hd64 Bc 192 covers 512 or 1024
# keys with 12.5% waste, 2048 with 3%).
FWD_SM90_SHORT_KEYS = 2048
FWD_SM90_TILES = {
    64: FwdSm90Tile(192, 128, "Bc 192: +18% over Bc 128 at 8k (NOTES, Hopper v1); 128 for "
                              "short keys (padding) and softcap/ALiBi (Bc 192 spills 8 B)"),
    128: FwdSm90Tile(176, 176, "Bc 176: +5% at 8k, +14% at 2k over Bc 128 (NOTES, Hopper "
                               "v1); S 88 + O 64 registers, 209 KiB shared memory"),
}


def _fwd_sm90_name(cxx_type, hd, block_n, score_mod, varlen=False):
    mod = "true" if score_mod else "false"
    return f"cuflash::flash_fwd_sm90<{cxx_type}, {hd}, {block_n}, {mod}{_varlen_flag(varlen)}>"


def _fwd_sm90_config(cxx_type, hd, score_mod, seqlen_k=None, varlen=False) -> FwdConfig:
    tile = FWD_SM90_TILES[hd]
    short = seqlen_k is not None and seqlen_k < FWD_SM90_SHORT_KEYS
    bn = tile.block_n_short if score_mod or short else tile.block_n
    # FwdSm90Traits::SMEM_BYTES: Q + STAGES x (K + V) tiles + 1 KiB for 1024-byte alignment.
    smem = (FWD_SM90_BLOCK_M + 2 * FWD_SM90_STAGES * bn) * hd * 2 + 1024
    return FwdConfig(_fwd_sm90_name(cxx_type, hd, bn, score_mod, varlen), FWD_SM90_BLOCK_M,
                     FWD_SM90_THREADS, smem, FWD_SM90_FILE, bn)


def _forward_sm90_kernels():
    for varlen in (False, True):
        for hd in FWD_SM90_TILES:
            for cxx in ("__half", "__nv_bfloat16"):
                for score_mod in (False, True):
                    for seqlen_k in (None, 1):
                        yield FWD_SM90_FILE, _fwd_sm90_config(cxx, hd, score_mod, seqlen_k,
                                                              varlen).name_expression


_FAMILIES.append(_forward_sm90_kernels)


# Device-side check of varlen prefix sums (kernels_cu/varlen_check.cu): launched after the
# kernels of a varlen call whose cu_seqlens were not read on the host; NaN-fills the call's
# outputs if they are invalid.
VARLEN_CHECK_FILE = "varlen_check.cu"
VARLEN_CHECK_KERNEL = "cuflash::varlen_check"
VARLEN_CHECK_THREADS = 256  # CHECK_THREADS in the kernel
VARLEN_CHECK_MAX_OUTPUTS = 5  # CHECK_MAX_OUTPUTS: out, lse or dq, dk, dv


def _varlen_check_family():
    yield VARLEN_CHECK_FILE, VARLEN_CHECK_KERNEL


_FAMILIES.append(_varlen_check_family)


# float32: one tiling for every head dim (F32_BLOCK, F32_THREADS in flash_bwd.cu): 32 owner
# x 32 streamed rows, 256 threads; plain FMAs, so it is compute-bound on the FMA units and
# tile sizes matter little. Shared memory: 4 tiles of 32 x (hd + 4) floats + P and dS.
BWD_F32_BLOCK, BWD_F32_THREADS = 32, 256


def backward_plan_f32(headdim: int, deterministic: bool, varlen: bool = False):
    hd = padded_headdim(headdim)
    shared = (4 * BWD_F32_BLOCK * (hd + 4) + 2 * BWD_F32_BLOCK * (BWD_F32_BLOCK + 1)) * 4
    shared += 16 if varlen else 0  # the batch item's view, parked (park in flash_bwd.cu)

    def step(mode):
        mode |= BWD_VARLEN if varlen else 0
        return BwdLaunch(f"cuflash::bwd_main_f32<{hd}, {mode}>", not mode & BWD_DQ,
                         BWD_F32_BLOCK, BWD_F32_THREADS, shared)

    if deterministic:
        return [step(BWD_DK | BWD_DV), step(BWD_DQ)]
    return [step(BWD_DK | BWD_DV | BWD_DQ_ATOMIC)]


def _bwd_f32_family():
    for varlen in (False, True):
        for hd in HEADDIMS:
            for deterministic in (False, True):
                for launch in backward_plan_f32(hd, deterministic, varlen):
                    yield BWD_FILE, launch.name_expression


_FAMILIES.append(_bwd_f32_family)


# ---------------------------------------------------------------------------------------
# KV-cache decoding and merging (kernels_cu/flash_decode.cu)

DECODE_FILE = "flash_decode.cu"
DECODE_ROWS = 16   # packed query rows (query heads of a kv head x query rows) per CTA
DECODE_KEYS = 16   # keys per tile
# 8 warps a CTA (one CTA per SM) measured +0.5% at long caches and 1-2% slower at short
# ones on the H200 (bench/NOTES.md, after decode v6).
DECODE_WARPS = 4
# Split-KV heuristic (bench/NOTES.md, "Split-KV decode v3"): a split gets at least
# DECODE_MIN_SPLIT_KEYS keys (two tiles per warp), and past DECODE_SHORT_SPLITS splits at
# least DECODE_SPLIT_KEYS (a split's fixed cost, Q load, warp merge and its share of the
# combine, is worth a few microseconds: b1 x 4k took 17.9 us with 8 splits against 20.2 with
# 15, while b1 x 1k was fastest with 8 splits of 128 keys); at most DECODE_MAX_SPLITS (the
# fused combine keeps one weight per split and row in 8 KiB of shared memory).
DECODE_MIN_SPLIT_KEYS = 128
DECODE_SPLIT_KEYS = 512
DECODE_SHORT_SPLITS = 8
DECODE_MAX_SPLITS = 128


@dataclass(frozen=True)
class DecodeTile:
    stages: int  # cp.async ring depth per warp (16-key K and V tiles per stage)
    reason: str


# Decoding is bound by memory bandwidth, so the ring depth is set by the bytes in flight it
# buys: 4 warps x stages x 2 tiles of 16 x hd elements, aiming at two CTAs per SM (96 KiB
# each at hd 128: 192 KiB in flight per H100 SM) within 227 KiB of shared memory.
DECODE_TILES = {
    32: DecodeTile(4, "rows of 64 elements (swizzle width): 4 KiB a stage pair"),
    64: DecodeTile(4, "8 KiB a stage pair per warp: 128 KiB in flight for 2 CTAs"),
    96: DecodeTile(3, "rows padded to 128 elements, as hd 128"),
    128: DecodeTile(3, "8 KiB a stage per warp: 100 KiB a CTA, 2 CTAs per SM"),
    192: DecodeTile(2, "12 KiB a stage per warp: 102 KiB a CTA, 2 CTAs per SM"),
    256: DecodeTile(2, "16 KiB a stage per warp: 136 KiB a CTA, one CTA per SM"),
}


@dataclass(frozen=True)
class DecodeConfig:
    name_expression: str
    num_threads: int
    shared_bytes: int


def _decode_name(cxx_type, hd, score_mod):
    mod = "true" if score_mod else "false"
    return (f"cuflash::flash_decode<{cxx_type}, {hd}, {DECODE_WARPS}, "
            f"{DECODE_TILES[hd].stages}, {mod}>")


def decode_config(cxx_type: str, headdim: int, score_mod: bool) -> DecodeConfig:
    """The flash_decode instantiation for fp16 / bf16 and its launch shape."""
    hd = padded_headdim(headdim)
    sc = _smem_cols(hd)
    ring = DECODE_TILES[hd].stages * 2 * DECODE_KEYS * sc * 2
    merge = (DECODE_WARPS * DECODE_ROWS * (hd + 8) + (DECODE_WARPS + 1) * DECODE_ROWS) * 4
    shared = DECODE_ROWS * sc * 2 + max(DECODE_WARPS * ring, merge)  # DecodeTraits
    return DecodeConfig(_decode_name(cxx_type, hd, score_mod), DECODE_WARPS * 32, shared)


def decode_num_splits(ctas: int, seqlen_k: int, num_sms: int) -> int:
    """Splits of the keys so that the ``ctas`` CTAs of one split fill the SMs in even waves.

    Measured on the H100 (NOTES, "Split-KV decode v2/v3"): one CTA per SM reaches the
    bandwidth, a second wave of CTAs on only some SMs leaves the others idle at the end, and
    more splits add combine work. So FlashAttention-2's rule with one CTA per SM as the
    slot: the fewest splits whose wave efficiency (CTAs / (waves x SMs)) is within 95% of
    the best (b1 x 128k: 16 splits, 128 CTAs, 192 us against 196 with 15), within the key
    bounds above; 1 when the CTAs already fill 80% of the SMs.
    """
    max_splits = min(DECODE_MAX_SPLITS, seqlen_k // DECODE_MIN_SPLIT_KEYS,
                     max(DECODE_SHORT_SPLITS, seqlen_k // DECODE_SPLIT_KEYS))
    if ctas >= 0.8 * num_sms or max_splits <= 1:
        return 1

    def efficiency(splits):
        waves = ctas * splits / num_sms
        return waves / -(-waves // 1)

    best = max(efficiency(s) for s in range(1, max_splits + 1))
    return next(s for s in range(1, max_splits + 1) if efficiency(s) >= 0.95 * best)


def merge_name(cxx_type: str) -> str:
    return f"cuflash::merge_parts<{cxx_type}>"


def append_name(cxx_type: str) -> str:
    return f"cuflash::append_kv<{cxx_type}>"


def _decode_family():
    for cxx in ("__half", "__nv_bfloat16"):
        for hd in HEADDIMS:
            for score_mod in (False, True):
                yield DECODE_FILE, _decode_name(cxx, hd, score_mod)
    for cxx in ("__half", "__nv_bfloat16", "float"):
        yield DECODE_FILE, merge_name(cxx)  # merge_attention
        yield DECODE_FILE, append_name(cxx)


_FAMILIES.append(_decode_family)


# ---------------------------------------------------------------------------------------
# Backward on Hopper (kernels_cu/flash_bwd_sm90.cu, compiled for sm_90a): wgmma, K and V of
# 128 keys resident per CTA, 2 warpgroups, dQ by bulk reduce-add. It serves fp16/bf16 with
# head dims padded to 64 or 128, atomic dQ, no soft-cap or ALiBi, dense or varlen (VARLEN
# instantiations: a template flag, dense ones compile as without it); everything else (float32,
# deterministic=True, soft-cap, ALiBi, other head dims, GPUs other than sm_90) runs on
# bwd_main (mma.sync) above, which stays the reference the tests compare it with.
BWD_SM90_FILE = "flash_bwd_sm90.cu"
BWD_SM90_KEYS, BWD_SM90_THREADS = 128, 256
# Tests and benchmarks set this to False to run bwd_main on the same GPU for comparison.
BWD_SM90_ENABLED = True


@dataclass(frozen=True)
class BwdSm90Tile:
    block_r: int   # queries per step (block_r * headdim = 8192: a warpgroup's dQ tile is 64x64)
    reason: str


BWD_SM90_TILES = {
    64: BwdSm90Tile(128, "two 64-query sub-blocks a step (S^T of 128 queries at once "
                         "spills), one dQ reduce per 128 queries; 1.0-1.17x torch flash at "
                         ">= 2k, 0.82-1.02x at 512-1024 (NOTES, Hopper backward v2)"),
    128: BwdSm90Tile(64, "dK + dV 128 accumulator registers + S^T, dP^T 64 (255 registers); "
                         "1.09-1.36x torch flash at >= 2k, 0.94-1.15x at 512-1024 (NOTES v2)"),
}
# Why not the other ways: deterministic mode needs a fixed summation order (bwd_main's dQ
# kernel has one; bulk reduce-adds do not); soft-cap/ALiBi need per-element index math that
# this kernel keeps out of its register budget.


@dataclass(frozen=True)
class BwdSm90Launch:
    name_expression: str
    convert_expression: str   # dq_accum (this kernel's tiled layout) -> dq
    block_c: int              # keys per CTA
    num_threads: int
    shared_bytes: int


def _bwd_sm90_names(cxx_type, hd, varlen=False):
    v = _varlen_flag(varlen)
    return (f"cuflash::bwd_sm90<{cxx_type}, {hd}, {BWD_SM90_TILES[hd].block_r}{v}>",
            f"cuflash::bwd_convert_dq_sm90<{cxx_type}, {hd}{v}>")


def backward_sm90(cxx_type: str, headdim: int, deterministic: bool, score_mod: bool,
                  arch: str, varlen: bool = False):
    """The Hopper backward for one call on a device of ``arch``, or None where bwd_main
    serves it (see above). ``varlen``: packed batches (cu_seqlens), the VARLEN
    instantiations; the grid then spans the longest item's keys."""
    hd = padded_headdim(headdim)
    if (not BWD_SM90_ENABLED or arch != "sm_90" or cxx_type == "float" or deterministic
            or score_mod or hd not in BWD_SM90_TILES):
        return None
    br = BWD_SM90_TILES[hd].block_r
    # BwdSm90Traits::SMEM_BYTES: K, V; 2 x (Q, dO); 2 x dS^T; 2 dQ staging tiles; 2 x (lse,
    # delta); 1 KiB to align the tiles to 1024 bytes.
    shared = (2 * BWD_SM90_KEYS * hd + 4 * br * hd + 2 * BWD_SM90_KEYS * br) * 2 + \
        2 * 64 * 64 * 4 + 4 * br * 4 + 1024
    name, convert = _bwd_sm90_names(cxx_type, hd, varlen)
    return BwdSm90Launch(name, convert, BWD_SM90_KEYS, BWD_SM90_THREADS, shared)


def _bwd_sm90_family():
    for varlen in (False, True):
        for cxx in ("__half", "__nv_bfloat16"):
            for hd in BWD_SM90_TILES:
                yield from ((BWD_SM90_FILE, n) for n in _bwd_sm90_names(cxx, hd, varlen))


_FAMILIES.append(_bwd_sm90_family)
