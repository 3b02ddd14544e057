"""The backward family: bwd_preprocess, then bwd_main (mma.sync, sm_80 and newer) or bwd_sm90
(wgmma; Hopper), then the dQ conversion (kernels_cu/flash_bwd.cu, flash_bwd_sm90.cu).

preprocess: delta = rowsum(dout * out), lse in base 2, dq_accum zeroed. The main kernels
recompute P from lse and write dK, dV (and add dQ into dq_accum by atomics, or write dQ in a
separate kernel when deterministic). convert: dq = scale * dq_accum in the input dtype.
"""
from __future__ import annotations

import functools
import heapq
import itertools
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from .. import _compile, _core, _tma
from . import tiles

FILE = "flash_bwd.cu"
SM90_FILE = "flash_bwd_sm90.cu"

# Flags of bwd_main's MODE (enum BwdMode in flash_bwd.cu). VARLEN selects the instantiations
# for packed variable-length batches (cu_seqlens).
DK, DV, DQ_ATOMIC, DQ, VARLEN = 1, 2, 4, 8, 16
# Rows per block of bwd_preprocess / bwd_convert_dq (PRE_ROWS) and their threads.
PRE_ROWS, PRE_THREADS = 32, 256
# Query rows of the float32 scratch are padded to a multiple of every query tile
# (SCRATCH_TILE in common/bwd_scratch.cuh), so tiles read lse/delta and add into dq_accum
# without bounds checks. Varlen scratch rows are (nheads, seqlen_q_pad) with item b's
# starting at (cu_seqlens_q[b] rounded down to 16) + VARLEN_GAP * b.
SCRATCH_TILE = 128
VARLEN_GAP = SCRATCH_TILE + 16


@dataclass(frozen=True)
class BwdTile:
    block_r: int    # streamed rows per iteration (queries for dK/dV, keys for dQ)
    num_warps: int  # each warp owns 16 * m_tiles owner rows (keys for dK/dV, queries for dQ)
    m_tiles: int
    reason: str
    # A "dkdv" / "dk" tile adds its share of dQ by atomics unless deterministic; False: dQ
    # runs in a pass of its own (the "dq" tile), as in deterministic mode.
    atomic_dq: bool = True


# bwd_main per padded head dim and pass: "dkdv" (dK, dV, and dQ by atomics unless
# deterministic), "dv" / "dk" (head dims whose dK and dV accumulators do not fit a thread
# together: a thread holds 16 * m_tiles * hd / 32 floats per accumulator), and "dq"
# (the separate dQ kernel: deterministic mode, and "dk" tiles without atomic dQ). Limits:
# 255 registers a thread without spills (python -m cuflash.compile_check), shared memory
# (2 owner tiles + 2 x 2 streamed tiles of rows hd + 8) under 227 KiB (sm_90), and under
# 163 KiB (sm_80) except at hd 256.
TILES = {
    32: {"dkdv": BwdTile(64, 8, 1, "128 keys x 64 queries; small accumulators"),
         "dq": BwdTile(64, 8, 1, "128 queries, 64-key steps")},
    64: {"dkdv": BwdTile(16, 4, 2, "2 m16 tiles per warp halve B-fragment reads per FLOP: "
                                    "182 vs 154-158 TFLOP/s for 1-tile layouts "
                                    "(docs/notes/backward.md v2); block_r 32 spills"),
         "dq": BwdTile(64, 8, 1, "128 queries, 64-key steps")},
    96: {"dv": BwdTile(64, 8, 1, "split like 192/256: dK+dV together spill on sm_80 at "
                                  "block_r 64, and block_r 32 leaves dQ slices of 24 columns"),
         "dk": BwdTile(64, 8, 1, "dQ columns split 48/48 between warp pairs"),
         "dq": BwdTile(64, 8, 1, "128 queries, 64-key steps")},
    128: {"dkdv": BwdTile(16, 8, 1, "128 keys x 16 queries: dK+dV take 128 registers; "
                                     "block_r 32 is 20% faster on sm_90 (notes v2) but "
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
# Where a TILES entry needs more shared memory per block than the device offers
# (tiles.SHARED_LIMITS: 163 KiB on sm_80, 99 KiB on sm_86 / sm_89), the pass runs the first
# of these that fits: fewer owner rows (warps) or streamed rows per CTA. Not measured: no
# sm_80 / sm_86 / sm_89 device yet (docs/notes/backward.md, "Per-arch tiles").
SMALL_TILES = {
    96: {"dv": (BwdTile(32, 8, 1, "99 KiB: 79 KiB, 32-query steps (64 take 105 KiB)"),),
         "dk": (BwdTile(32, 4, 1, "99 KiB: 58 KiB, 64 keys, so that 32-query steps keep "
                                  "dQ slices of 48 columns (8 warps: 24); 64-query steps "
                                  "spill"),),
         "dq": (BwdTile(32, 8, 1, "99 KiB: 78 KiB, 32-key steps"),)},
    128: {"dq": (BwdTile(16, 8, 1, "99 KiB: 85 KiB, 16-key steps (32 take 102 KiB)"),)},
    192: {"dv": (BwdTile(16, 4, 1, "99 KiB: 75 KiB, 64 keys (128 take 100 KiB before any "
                                   "streamed row)"),),
          "dq": (BwdTile(16, 4, 1, "99 KiB: 75 KiB, 64 queries, 16-key steps"),)},
    256: {"dv": (BwdTile(16, 4, 1, "163 KiB: 99.25 KiB, 64 keys (128 take 165 KiB at "
                                   "block_r 16); block_r 32 spills"),
                 BwdTile(16, 2, 1, "99 KiB: 66 KiB, 32 keys")),
          "dk": (BwdTile(16, 4, 1, "163 KiB: 99.25 KiB, 64 keys; their atomic dQ (64-column "
                                   "slices with 4 warps) spills, so dQ runs in its own pass",
                         atomic_dq=False),
                 BwdTile(16, 2, 1, "99 KiB: 66 KiB, 32 keys; dQ in its own pass",
                         atomic_dq=False)),
          "dq": (BwdTile(32, 4, 1, "163 KiB: 132 KiB, 64 queries, 32-key steps (254 "
                                   "registers)"),
                 BwdTile(16, 2, 1, "99 KiB: 66 KiB, 32 queries (32-key steps: exactly 99 "
                                   "KiB)"))},
}


@dataclass(frozen=True)
class F32Tile:
    block_r: int  # streamed rows per step
    reason: str


# float32 (bwd_main_f32): F32_BLOCK owner rows, F32_THREADS threads, and the first of
# F32_TILES that fits the device; plain FMAs, so tile sizes matter little.
F32_BLOCK, F32_THREADS = 32, 256
F32_TILES = (F32Tile(32, "4 scores a thread; 138 KiB at hd 256"),
             F32Tile(16, "99 KiB at hd 192: 78 KiB (32 streamed rows take 106 KiB)"),
             F32Tile(8, "99 KiB at hd 256: 84 KiB (16 streamed rows take 102 KiB)"))


@dataclass(frozen=True)
class Sm90Tile:
    keys: int      # keys per CTA, 64 an MMA warpgroup
    block_r: int   # queries per step (two warpgroups: block_r * headdim = 8192, a 64x64 dQ
                   # tile each; three: one 64x64 tile a step, in turn)
    stages: int    # buffers of Q, dO, lse and delta (BwdSm90Traits::STAGES says why)
    ds_bufs: int   # dS^T buffers (BwdSm90Traits::DS_BUFS)
    reason: str

    @property
    def threads(self) -> int:  # the producer warpgroup and the MMA warpgroups
        return 128 * (1 + self.keys // 64)


# bwd_sm90: K and V of a tile's keys resident per CTA, a producer warpgroup (TMA or
# cp.async into a ring of buffers of Q, dO, lse and delta) and 2 or 3 MMA warpgroups, dQ
# added by 16-byte red.global.add from the accumulators. It serves fp16/bf16 at head dims
# up to 128, padded to 64 or 128 (sm90_headdim), soft-cap and ALiBi included, deterministic
# mode too (each dQ tile's adds take turns in key-block order, through one int semaphore
# per 4096-float tile of dq_accum). bwd_sm90_wide serves head dims over 128 (padded to 256)
# the same way: SM90_WIDE_KEYS keys per CTA, the MMA warpgroups splitting the head dim, a
# ring of SM90_WIDE_STAGES, SM90_WIDE_THREADS threads. bwd_main serves the rest.
SM90_WIDE_KEYS, SM90_WIDE_HEADDIM, SM90_WIDE_STAGES, SM90_WIDE_THREADS = 64, 256, 2, 384
# bwd_sm90_wide's paired order (_pair_offset): a CTA's switch between its two key blocks in
# steps (the dK / dV epilogue and the next K / V load, not under a step), the launches
# whose offset is searched, in waves, and the largest offset tried (the model's best were
# 1-8, tools/det_schedule).
PAIR_SWITCH, PAIR_SEARCH_WAVES, PAIR_MAX_OFFSET = 0.5, 16, 32
SM90_TILES = {
    64: Sm90Tile(128, 128, 3, 2,
                 "two 64-query sub-blocks a step (S^T of 128 queries at once spills), "
                 "dQ added once per 128 queries; 1.0-1.17x torch flash at >= 2k, "
                 "0.82-1.02x at 512-1024 (docs/notes/backward.md, Hopper v2)"),
    128: Sm90Tile(128, 64, 2, 3,
                  "dK + dV 128 accumulator registers + S^T, dP^T 64 (255 registers); "
                  "1.09-1.36x torch flash at >= 2k, 0.94-1.15x at 512-1024 (notes v2)"),
}
# Head dim 64 with three MMA warpgroups: more warps a scheduler for float16 soft-cap's
# elementwise work (three MUFU an element: +2-5% on the H100, +6-9% on the H200), and for
# deterministic calls turn chains of seqlen_k / 192 links with one turn agent (+4-8% on the
# H100). The plain call measured 0.96-1.0x SM90_TILES[64], bfloat16 soft-cap (MUFU.TANH)
# 0.94-0.98x, and both stay there; deterministic soft-cap too (docs/notes/backward.md,
# "three MMA warpgroups", "a turn agent").
SM90_THREE = Sm90Tile(192, 64, 3, 3, "one 64-query sub-block a step in 160 registers, "
                                     "a step's 64x64 dQ tile by one warpgroup in turn")


def sm90_tile(dtype, hd: int, opts: int, deterministic: bool) -> Sm90Tile:
    """The bwd_sm90 tile of padded head dim ``hd`` (``opts``: the kernel's OPTS)."""
    if deterministic:  # without soft-cap (OPTS_RUNTIME: soft-cap and ALiBi)
        three = opts in (0, _core.OPTS_ALIBI)
    else:
        three = np.dtype(dtype) == np.float16 and opts == _core.OPTS_SOFTCAP
    return SM90_THREE if hd == 64 and three else SM90_TILES[hd]

# BwdParams (kernels_cu/common/params.cuh).
PARAMS = np.dtype([
    ("attn", _core.ATTN_ARGS),
    ("out", np.uint64), ("dout", np.uint64), ("lse", np.uint64),
    ("dq", np.uint64), ("dk", np.uint64), ("dv", np.uint64),
    ("lse_log2", np.uint64), ("delta", np.uint64), ("dq_accum", np.uint64),
    ("o_batch_stride", np.int64), ("o_row_stride", np.int64), ("o_head_stride", np.int64),
    ("do_batch_stride", np.int64), ("do_row_stride", np.int64), ("do_head_stride", np.int64),
    ("lse_batch_stride", np.int64), ("lse_head_stride", np.int64),
    ("lse_row_stride", np.int64),
    ("dq_batch_stride", np.int64), ("dq_row_stride", np.int64), ("dq_head_stride", np.int64),
    ("dk_batch_stride", np.int64), ("dk_row_stride", np.int64), ("dk_head_stride", np.int64),
    ("dv_batch_stride", np.int64), ("dv_row_stride", np.int64), ("dv_head_stride", np.int64),
    ("seqlen_q_pad", np.int32), ("headdim_pad", np.int32), ("dq_semaphore", np.uint64),
    ("l2_section", np.int32), ("pair_offset", np.int32),
], align=True)
_ADDRESSES = tuple(f"attn.{f}" for f in _core.ATTN_ADDRESSES) + (
    "out", "dout", "lse", "dq", "dk", "dv", "lse_log2", "delta", "dq_accum", "dq_semaphore")
# BwdSm90Maps (flash_bwd_sm90.cu), the Hopper kernels' second parameter: TMA maps of q and
# dout (boxes of 64 columns x the kernel's query rows a step) and whether to use them;
# padded to its 64-byte alignment.
_MAP = (np.uint8, (_tma.MAP_BYTES,))
SM90_MAPS = _core.padded(np.dtype([("q", _MAP), ("dout", _MAP), ("on", np.int32)],
                                  align=True), 64)
_MAPS_OFF = bytes(SM90_MAPS.itemsize)
# ``on`` and the padding: what follows a call's two maps (_tma.Maps' tail)
_MAPS_ON = np.array((0, 0, 1), SM90_MAPS).tobytes()[2 * _tma.MAP_BYTES:]


@dataclass(frozen=True)
class Step:
    """One launch of a backward plan."""
    filename: str
    name_expression: str
    owner: str          # the grid: "keys" (key blocks x batch x kv heads) or "queries"
    block_o: int        # owner rows per CTA
    num_threads: int
    shared_bytes: int
    traits: str = ""    # the C++ traits whose SMEM_BYTES is shared_bytes
    block_r: int = 0    # query rows a step of a Hopper kernel (its TMA boxes); 0: others


def _cxx(dtype) -> str:
    return _core.CXX_TYPES[np.dtype(dtype)]


def _main_step(dtype, hd: int, tile: BwdTile, mode: int) -> Step:
    key_owner = not mode & DQ
    block_o = 16 * tile.m_tiles * tile.num_warps
    ld = hd + 8
    elems = 2 * block_o * ld + 4 * tile.block_r * ld
    if mode & DQ_ATOMIC:
        elems += block_o * (tile.block_r + 8)
    shared = elems * 2 + (4 * tile.block_r * 4 if key_owner else 0)  # + lse/delta buffers
    args = f"{_cxx(dtype)}, {hd}, {tile.block_r}, {tile.num_warps}, {tile.m_tiles}, {mode}"
    return Step(FILE, f"cuflash::bwd_main<{args}>", "keys" if key_owner else "queries",
                block_o, 32 * tile.num_warps, shared, f"cuflash::BwdTraits<{args}>")


def _f32_step(hd: int, tile: F32Tile, mode: int) -> Step:
    ld, ldp = hd + 4, tile.block_r + 1
    shared = (2 * F32_BLOCK * ld + 2 * tile.block_r * ld + 2 * F32_BLOCK * ldp) * 4
    shared += 16 if mode & VARLEN else 0  # the batch item's view, parked (park in flash_bwd.cu)
    args = f"{hd}, {tile.block_r}, {mode}"
    return Step(FILE, f"cuflash::bwd_main_f32<{args}>", "queries" if mode & DQ else "keys",
                F32_BLOCK, F32_THREADS, shared, f"cuflash::BwdF32Traits<{args}>")


def _fitting(step, candidates: tuple, limit: int | None):
    """(step, tile) of the first tile of ``candidates`` whose step (``step(tile)``) fits in
    ``limit`` bytes of shared memory (tiles.first_fitting)."""
    tile, _ = tiles.first_fitting(candidates, lambda t: step(t).shared_bytes, limit)
    return step(tile), tile


def main_steps(dtype, headdim: int, deterministic: bool, varlen: bool,
               tile: BwdTile | None = None, limit: int | None = None) -> list:
    """The bwd_main launches of one backward call, in order, on a device offering ``limit``
    bytes of shared memory per block (None: TILES' tiles, for tuning; ``tile`` overrides the
    "dkdv" tile)."""
    hd = tiles.padded_headdim(headdim)
    v = VARLEN if varlen else 0
    if np.dtype(dtype) == np.float32:
        modes = (DK | DV, DQ) if deterministic else (DK | DV | DQ_ATOMIC,)
        return [_fitting(lambda t: _f32_step(hd, t, mode | v), F32_TILES, limit)[0]
                for mode in modes]
    table = {name: (t, *SMALL_TILES.get(hd, {}).get(name, ()))
             for name, t in TILES[hd].items()}
    if tile:
        table["dkdv"] = (tile,)

    def fit(name, mode):  # mode(tile): the pass's MODE with that tile
        return _fitting(lambda t: _main_step(dtype, hd, t, mode(t) | v), table[name], limit)

    def with_dq(flags):  # the dK pass adds its share of dQ where it can
        return lambda t: flags | (DQ_ATOMIC if t.atomic_dq and not deterministic else 0)

    passes = [("dkdv", with_dq(DK | DV))] if "dkdv" in table else \
        [("dv", lambda t: DV), ("dk", with_dq(DK))]
    fitted = [fit(name, mode) for name, mode in passes]
    if deterministic or not fitted[-1][1].atomic_dq:
        fitted.append(fit("dq", lambda t: DQ))
    return [s for s, _ in fitted]


def _pre(kind: str, dtype, varlen: bool) -> Step:
    name = f"cuflash::bwd_{kind}<{_cxx(dtype)}{tiles.varlen_flag(varlen)}>"
    return Step(FILE, name, "rows", PRE_ROWS, PRE_THREADS, 0)


def sm90_headdim(headdim: int) -> int | None:
    """The head dim of the bwd_sm90 instantiation that runs ``headdim`` (None: none does).
    Its columns past ``headdim`` load as zeros and are not stored, so head dims up to 32 run
    the 64 kernel and 65-96 the 128 one: twice and 4/3 the GEMM work, where the elementwise
    work per (query, key) pair, which bounds this kernel, stays the same; mma.sync at the
    unpadded head dim runs at about half the speed (docs/notes/backward.md, padded head dims).
    Over 128: bwd_sm90_wide's 256."""
    return next((d for d in (*SM90_TILES, SM90_WIDE_HEADDIM) if d >= headdim), None)


def sm90_steps(dtype, headdim: int, opts: int, varlen: bool, deterministic: bool) -> list:
    """bwd_sm90 (``opts``: its OPTS; its tile by :func:`sm90_tile`) and its dQ conversion
    (dq_accum is in its own tiled layout)."""
    hd = sm90_headdim(headdim)
    v = tiles.varlen_flag(varlen)
    convert = Step(SM90_FILE, f"cuflash::bwd_convert_dq_sm90<{_cxx(dtype)}, {hd}{v}>", "rows",
                   PRE_ROWS, PRE_THREADS, 0)
    if hd == SM90_WIDE_HEADDIM:
        # BwdSm90WideTraits::SMEM_BYTES: K, V; STAGES x (Q, dO); P^T, dS^T (64 x 64); the
        # float32 hand-over (128 threads x 16, two); STAGES x (lse, delta); 1 KiB to align.
        keys = rows = SM90_WIDE_KEYS
        elements = 2 * keys * hd + 2 * SM90_WIDE_STAGES * rows * hd + 2 * keys * rows
        shared = elements * 2 + 2 * 128 * 16 * 4 + 2 * SM90_WIDE_STAGES * rows * 4 + 1024
        return [Step(SM90_FILE, f"cuflash::bwd_sm90_wide<{_cxx(dtype)}, {hd}, {opts}{v}>",
                     "keys", keys, SM90_WIDE_THREADS, shared,
                     f"cuflash::BwdSm90WideTraits<{hd}>", rows),
                convert]
    t = sm90_tile(dtype, hd, opts, deterministic)
    # BwdSm90Traits::SMEM_BYTES: K, V; STAGES x (Q, dO); DS_BUFS x dS^T; STAGES x (lse,
    # delta); at head dim 128 the dQ writer's two 64 x 64 float32 tiles; 1 KiB to align the
    # tiles to 1024 bytes.
    elements = 2 * t.keys * hd + 2 * t.stages * t.block_r * hd + t.ds_bufs * t.keys * t.block_r
    dq_tiles = 2 * 64 * 64 * 4 if hd == 128 else 0
    shared = elements * 2 + 2 * t.stages * t.block_r * 4 + dq_tiles + 1024
    tile = f"{hd}, {t.keys}, {t.block_r}"
    return [Step(SM90_FILE, f"cuflash::bwd_sm90<{_cxx(dtype)}, {tile}, {opts}{v}>", "keys",
                 t.keys, t.threads, shared, f"cuflash::BwdSm90Traits<{tile}>", t.block_r),
            convert]


def choose(p: _core.Problem, deterministic: bool, arch: str, hopper: bool = True) -> list:
    """Every launch of a backward call after preprocess, in order, with tiles that fit the
    shared memory of ``arch``. ``hopper=False`` keeps bwd_main on sm_90 (tests and
    benchmarks compare the two), as do soft-caps over FAST_TANH_MAX_SOFTCAP."""
    if hopper and arch == "sm_90" and p.dtype != np.float32 and sm90_headdim(p.headdim) \
            and p.fast_tanh:
        return sm90_steps(p.dtype, p.headdim, p.opts, p.varlen, deterministic)
    return mma_steps(p.dtype, p.headdim, deterministic, p.varlen,
                     limit=tiles.shared_limit(arch))


def mma_steps(dtype, headdim: int, deterministic: bool, varlen: bool,
              tile: BwdTile | None = None, limit: int | None = None) -> list:
    """bwd_main's launches and, where the last adds dQ into dq_accum by atomics, the dQ
    conversion (``tile``, ``limit`` as in :func:`main_steps`)."""
    steps = main_steps(dtype, headdim, deterministic, varlen, tile, limit)
    if steps[-1].owner == "keys":
        steps.append(_pre("convert_dq", dtype, varlen))
    return steps


class Scratch(NamedTuple):
    """A backward's scratch: lse_log2 and delta (float32, a row each), then dq_accum (float32,
    rows x headdim_pad, where a dQ conversion reads it: ``with_accum``), then for a
    deterministic bwd_sm90 or bwd_sm90_wide an int32 semaphore per 4096 floats of dq_accum
    (tiles start on 16-row boundaries in varlen: one more for the last partial window).
    Byte offsets and the total size."""
    headdim_pad: int
    with_accum: bool
    delta: int
    accum: int
    semaphore: int
    total: int


def padded_seqlen(seqlen_q: int) -> int:
    """An item's scratch rows of a dense call (seqlen_q_pad): seqlen_q rounded up to
    SCRATCH_TILE, so that every query tile stays inside them."""
    return -(-seqlen_q // SCRATCH_TILE) * SCRATCH_TILE


def _scratch(rows: int, headdim_pad: int, with_accum: bool, ordered: bool) -> Scratch:
    delta = _core.align(4 * rows)
    semaphore = 2 * delta + _core.align(4 * rows * headdim_pad if with_accum else 0)
    return Scratch(headdim_pad, with_accum, delta, 2 * delta, semaphore,
                   semaphore + (4 * (rows * headdim_pad // 4096 + 1) if ordered else 0))


def scratch_layout(rows: int, headdim: int, steps: list, deterministic: bool) -> Scratch:
    """The scratch of ``steps`` over ``rows`` rows: dq_accum's rows at the bwd_sm90
    instantiation's head dim, else at the mma.sync kernels' padded one."""
    sm90 = steps[0].filename == SM90_FILE
    return _scratch(rows, sm90_headdim(headdim) if sm90 else tiles.padded_headdim(headdim),
                    steps[-1].owner == "rows", deterministic and sm90)


def dense_scratch_bytes(batch: int, nheads: int, seqlen_q: int, headdim: int,
                        deterministic: bool) -> int:
    """The most scratch the backward of a dense problem of these sizes takes on any GPU
    (either family's padded head dim, dq_accum and semaphores included): the size of a
    workspace allocated before the device is known (cuflash.jax asks XLA for one). 0 for a
    head dim no kernel runs (the call itself then raises)."""
    if headdim > max(tiles.HEADDIMS):
        return 0
    rows = batch * nheads * padded_seqlen(seqlen_q)
    return max(_scratch(rows, pad, True, deterministic).total
               for pad in (tiles.padded_headdim(headdim), sm90_headdim(headdim) or 0))


class Plan:
    """A memoized backward: its launches share one BwdParams record and one scratch
    allocation (lse_log2, delta and dq_accum, float32; dq_semaphore, int32)."""

    def __init__(self, p: _core.Problem, strides: tuple, steps: list, deterministic: bool):
        out_s, dout_s, lse_s, dq_s, dk_s, dv_s = strides
        item = p.dtype.itemsize
        if p.varlen:
            seqlen_q_pad = p.total_q // 16 * 16 + VARLEN_GAP * p.batch
            if seqlen_q_pad >= 2**31:
                raise ValueError(f"total_q ({p.total_q}) is too large for the varlen "
                                 f"backward's int32 row indices")
            rows = p.nheads * seqlen_q_pad
            lse_strides = (0, *(s // 4 for s in lse_s))
            pre_rows = padded_seqlen(p.seqlen_q)
        else:
            seqlen_q_pad = padded_seqlen(p.seqlen_q)
            rows = p.batch * p.nheads * seqlen_q_pad
            lse_strides = tuple(s // 4 for s in lse_s)
            pre_rows = seqlen_q_pad
        scratch = scratch_layout(rows, p.headdim, steps, deterministic)
        headdim_pad, self.with_accum = scratch.headdim_pad, scratch.with_accum
        self.delta_offset, self.accum_offset = scratch.delta, scratch.accum
        self.semaphore_offset, self.scratch_bytes = scratch.semaphore, scratch.total
        self.semaphore_bytes = scratch.total - scratch.semaphore
        hopper = next((s for s in steps if s.block_r), None)
        sms = _core.num_sms(p.device_id)
        section = _section(p, -(-p.seqlen_k // hopper.block_o), sms) if hopper else 1
        offset = _pair_offset(p, hopper, deterministic, section, sms)
        record = (_core.attn_args(p), *[0] * 9,
                  *_core.row_strides(out_s, item), *_core.row_strides(dout_s, item),
                  *lse_strides, *_core.row_strides(dq_s, item), *_core.row_strides(dk_s, item),
                  *_core.row_strides(dv_s, item), seqlen_q_pad, headdim_pad, 0, section,
                  offset)
        self.record = _core.Record(PARAMS, record, _ADDRESSES,
                                   second=SM90_MAPS.itemsize if hopper else 0)
        # The Hopper kernels' maps of q and dout, for dense calls whose layouts TMA
        # describes (their producer then loads by TMA; else by cp.async).
        self.maps = None
        if hopper and not p.varlen:
            shape = (p.batch, p.seqlen_q, p.nheads, p.headdim)
            makers = (_tma.MapMaker(p.dtype, shape, p.q_strides, hopper.block_r),
                      _tma.MapMaker(p.dtype, shape, dout_s, hopper.block_r))
            if all(m.ok for m in makers):
                self.maps = _tma.Maps(makers, _MAPS_ON)
        def keys(s):  # key blocks x batch x kv heads, or the paired order's 1-D grid
            blocks = -(-p.seqlen_k // s.block_o)
            if offset >= 0:
                return paired_ctas(p.batch * p.nheads_kv, blocks, offset), 1, 1
            return blocks, p.batch, p.nheads_kv

        grids = {"keys": keys,
                 "queries": lambda s: (-(-p.seqlen_q // s.block_o), p.batch, p.nheads),
                 "rows": lambda s: (-(-p.seqlen_q // PRE_ROWS), p.nheads, p.batch)}
        pre = _pre("preprocess", p.dtype, p.varlen)
        self.steps = steps
        self.kernels = [_core.Kernel(FILE, pre.name_expression, p.device_id,
                                     (pre_rows // PRE_ROWS, p.nheads, p.batch),
                                     (PRE_THREADS,), 0)]
        self.kernels += [_core.Kernel(s.filename, s.name_expression, p.device_id,
                                      grids[s.owner](s), (s.num_threads,), s.shared_bytes)
                         for s in steps]

    def __call__(self, stream: int, scratch: int, q, k, v, slopes, cu_q, cu_k, out, dout,
                 lse, dq, dk, dv) -> None:
        """Queue every launch on ``stream``; ``scratch`` holds ``scratch_bytes``."""
        accum = scratch + self.accum_offset if self.with_accum else 0
        semaphore = scratch + self.semaphore_offset if self.semaphore_bytes else 0
        if semaphore:
            from cupy.cuda import runtime
            runtime.memsetAsync(semaphore, 0, self.semaphore_bytes, stream)
        argv = self.record.fill(q, k, v, slopes, cu_q, cu_k, out, dout, lse, dq, dk, dv,
                                scratch, scratch + self.delta_offset, accum, semaphore,
                                second=self._second(q, dout))
        for kernel in self.kernels:
            kernel(stream, argv)

    def _second(self, q: int, dout: int) -> bytes:
        """The Hopper kernels' BwdSm90Maps for these addresses: the maps, or "off" where
        there are none (the driver may refuse an address); b"" for the other kernels."""
        if not self.record.second:
            return b""
        found = self.maps(q, dout) if self.maps is not None else None
        return _MAPS_OFF if found is None else found


def _section(p: _core.Problem, key_blocks: int, ctas: int) -> int:
    """The (item, kv head) pairs of a section of the Hopper backward's CTA order (every
    pair's first key block, then every pair's second, ...; tiles.sm90_section): their Q, dO
    and float32 dQ accumulators of its query heads in tiles.SM90_L2_BYTES, ``key_blocks``
    CTAs a pair on ``ctas`` SMs; one for varlen (items of unequal lengths)."""
    if p.varlen:
        return 1
    group = p.nheads // p.nheads_kv
    pair = max(1, group * p.seqlen_q * (2 * p.dtype.itemsize + 4) * p.headdim)
    return tiles.sm90_section(p.batch * p.nheads_kv, tiles.SM90_L2_BYTES // pair, key_blocks,
                              ctas, p.windowed)


def paired_ctas(pairs: int, blocks: int, offset: int) -> int:
    """The CTAs of bwd_sm90_wide's paired order (BwdKeyBlock in flash_bwd_sm90.cu): ``blocks
    + offset`` a group of two pairs, and an odd last pair's ``blocks``; 0 <= offset <=
    blocks (past it a CTA would get a key block past the keys)."""
    if not 0 <= offset <= blocks:
        raise ValueError(f"pair offset {offset} outside 0..{blocks}")
    return pairs // 2 * (blocks + offset) + (blocks if pairs % 2 else 0)


def paired_steps(pairs: int, blocks: int, section: int, offset: int, heads: int = 1,
                 switch: float = PAIR_SWITCH) -> list:
    """The steps of each CTA of the paired order in launch order, under a causal mask (key
    block n sees blocks - n query blocks of each of a pair's ``heads`` query heads),
    ``switch`` more for a CTA of two phases."""
    out = [heads * n for n in range(1, blocks + 1)] if pairs % 2 else []  # lightest first
    groups, per_section = pairs // 2, max(1, section // 2)
    for first in range(0, groups, per_section):
        size = min(per_section, groups - first)
        for rank in range(blocks + offset):
            light = rank - offset + 1 if rank >= offset else 0   # A's block blocks - light
            heavy = blocks - rank if rank < blocks else 0        # B's block rank
            out += [heads * (light + heavy) + (switch if light and heavy else 0)] * size
    return out


def _makespan(steps: list, sms: int) -> float:
    """List scheduling: each CTA, in launch order, on the SM that frees first."""
    free = [0.0] * sms
    for s in steps:
        heapq.heapreplace(free, free[0] + s)
    return max(free)


def _pair_offset(p: _core.Problem, hopper: Step | None, deterministic: bool, section: int,
                 sms: int) -> int:
    """bwd_sm90_wide's paired order (-1: off) for deterministic calls under a causal mask with
    as many queries as keys, where the launch order leaves CTAs waiting for dQ turns
    (docs/notes/backward.md, "CTAs of two key blocks"; tools/det_schedule models it): the
    offset whose CTAs list-schedule shortest on ``sms`` SMs, of 0 .. blocks / 8 (0 past
    PAIR_SEARCH_WAVES waves, where the launch's tail is short anyway; at most
    PAIR_MAX_OFFSET)."""
    pairs = p.batch * p.nheads_kv
    if not (deterministic and hopper is not None and hopper.block_o == SM90_WIDE_KEYS
            and not p.varlen and p.window_right == 0 and p.window_left < 0
            and p.seqlen_q == p.seqlen_k and pairs >= 2):
        return -1
    blocks, heads = -(-p.seqlen_k // SM90_WIDE_KEYS), p.nheads // p.nheads_kv
    if paired_ctas(pairs, blocks, 0) > PAIR_SEARCH_WAVES * sms:
        return 0
    spans = [_makespan(paired_steps(pairs, blocks, section, d, heads), sms)
             for d in range(min(blocks // 8, PAIR_MAX_OFFSET) + 1)]
    return spans.index(min(spans))


@functools.lru_cache(maxsize=1024)
def plan(p: _core.Problem, strides: tuple, deterministic: bool, hopper: bool = True,
         steps: tuple | None = None) -> Plan:
    """The plan of a backward problem; ``strides``: byte strides of out, dout, lse, dq, dk,
    dv. ``hopper=False`` keeps bwd_main on sm_90; ``steps`` overrides the launches after
    preprocess (tuning)."""
    arch = _compile.device_arch(p.device_id)
    return Plan(p, strides, list(steps or choose(p, deterministic, arch, hopper)),
                deterministic)


def kernels(arch: str) -> list:
    """Every (filename, name_expression, shared bytes) this family can launch on a device of
    ``arch``."""
    return list(dict.fromkeys((s.filename, s.name_expression, s.shared_bytes)
                              for s in _steps(arch)))


def _steps(arch: str):
    limit = tiles.shared_limit(arch)
    for varlen in (False, True):
        for dtype in (np.float16, tiles.BFLOAT16, np.float32):
            for kind in ("preprocess", "convert_dq"):
                yield _pre(kind, dtype, varlen)
            for hd in tiles.HEADDIMS:
                for deterministic in (False, True):
                    yield from main_steps(dtype, hd, deterministic, varlen, limit=limit)
                if arch == "sm_90" and dtype != np.float32 and sm90_headdim(hd):
                    for options, det in itertools.product(
                            itertools.product((False, True), repeat=2), (False, True)):
                        yield from sm90_steps(dtype, hd, _core.score_opts(*options), varlen,
                                              det)


def facts():
    """(filename, C++ expression, the value Python uses) for the compile check to prove."""
    out = [(FILE, e, v) for e, v in _core.struct_facts("cuflash::BwdParams", PARAMS)]
    out += [(SM90_FILE, e, v) for e, v in _core.struct_facts("cuflash::BwdSm90Maps", SM90_MAPS)]
    out += [(FILE, f"cuflash::{name}", value) for name, value in (
        ("BWD_DK", DK), ("BWD_DV", DV), ("BWD_DQ_ATOMIC", DQ_ATOMIC), ("BWD_DQ", DQ),
        ("BWD_VARLEN", VARLEN), ("PRE_ROWS", PRE_ROWS), ("PRE_THREADS", PRE_THREADS),
        ("SCRATCH_TILE", SCRATCH_TILE), ("VARLEN_GAP", VARLEN_GAP),
        ("F32_BLOCK", F32_BLOCK), ("F32_THREADS", F32_THREADS))]
    out += [(SM90_FILE, f"cuflash::{name}", value) for name, value in (
        ("OPTS_SOFTCAP", _core.OPTS_SOFTCAP), ("OPTS_ALIBI", _core.OPTS_ALIBI),
        ("OPTS_RUNTIME", _core.OPTS_RUNTIME))]
    out += [(SM90_FILE, "cuflash::BwdSm90WideTraits<256>::BLOCK_C", SM90_WIDE_KEYS),
            (SM90_FILE, "cuflash::BwdSm90WideTraits<256>::THREADS", SM90_WIDE_THREADS),
            (SM90_FILE, "cuflash::BwdSm90WideTraits<256>::STAGES", SM90_WIDE_STAGES),
            *((SM90_FILE, f"cuflash::BwdSm90Traits<{hd}, {t.keys}, {t.block_r}>::{name}",
               value)
              for hd, t in (*SM90_TILES.items(), (64, SM90_THREE))
              for name, value in (("THREADS", t.threads), ("DS_BUFS", t.ds_bufs),
                                  ("STAGES", t.stages)))]
    out += [(s.filename, f"{s.traits}::SMEM_BYTES", s.shared_bytes)
            for s in {s for arch in tiles.CHECKED_ARCHS for s in _steps(arch)} if s.traits]
    return out


class Launch:
    """The GPU backward of one validated call layout: arrays in, ``(dq, dk, dv)`` back.
    Allocates the gradients the caller gave none of, and the float32 scratch."""

    def __init__(self, p: _core.Problem, strides: tuple, deterministic: bool,
                 hopper: bool = True, steps: tuple | None = None):
        self.problem, self.strides = p, strides
        self.deterministic, self.hopper, self.steps = deterministic, hopper, steps
        self.plan = plan(p, strides, deterministic, hopper, steps)
        self.copies = not _core.strides_aligned(p.q_strides, p.k_strides, p.v_strides,
                                                *strides[:2], *strides[3:])

    def __call__(self, dout, q, k, v, out, lse, slopes=None, cu_q=None, cu_k=None, dq=None,
                 dk=None, dv=None):
        import cupy
        if dq is None:
            dq = cupy.empty(q.shape, q.dtype)
        if dk is None:
            dk = cupy.empty(k.shape, k.dtype)
        if dv is None:
            dv = cupy.empty(v.shape, v.dtype)
        qp, kp, vp, op, dop = q.data.ptr, k.data.ptr, v.data.ptr, out.data.ptr, dout.data.ptr
        dqp, dkp, dvp = dq.data.ptr, dk.data.ptr, dv.data.ptr
        if self.copies or (qp | kp | vp | op | dop | dqp | dkp | dvp) & 15:
            return self._copied(dout, q, k, v, out, lse, slopes, cu_q, cu_k, dq, dk, dv)
        stream = cupy.cuda.get_current_stream()
        scratch, owner = _core.scratch(self.plan.scratch_bytes, stream)
        self.plan(stream.ptr, scratch, qp, kp, vp, _core.address(slopes), _core.address(cu_q),
                  _core.address(cu_k), op, dop, lse.data.ptr, dqp, dkp, dvp)
        del owner  # the launches are queued: the pool may hand it out again on this stream
        return dq, dk, dv

    def _copied(self, dout, q, k, v, out, lse, slopes, cu_q, cu_k, dq, dk, dv):
        """The call through 16-byte aligned copies of the arrays whose rows are not."""
        p, q, k, v = _core.realigned(self.problem, q, k, v)
        dout, out = (_core.aligned_copy(x) for x in (dout, out))
        grads = _core.aligned_outputs(dq, dk, dv)
        strides = (out.strides, dout.strides, self.strides[2], *(g.strides for g in grads))
        launch = Launch(p, strides, self.deterministic, self.hopper, self.steps)
        launch(dout, q, k, v, out, lse, slopes, cu_q, cu_k, *grads)
        _core.write_back((dq, dk, dv), grads)
        return dq, dk, dv
