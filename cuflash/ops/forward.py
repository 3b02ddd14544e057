"""The forward family: flash_fwd (mma.sync, sm_80 and newer) and flash_fwd_sm90 (TMA, wgmma,
warp specialisation; Hopper).

A plan is memoized per :class:`~cuflash._core.Problem` (and the layout of ``out``): the
kernel, its grid and its params record with every field but the addresses filled. Choosing
one never reads array contents, synchronises or allocates.
"""
from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from .. import _compile, _core, _log, _tma
from . import tiles

FILE = "flash_fwd.cu"
SM90_FILE = "flash_fwd_sm90.cu"


@dataclass(frozen=True)
class FwdTile:
    block_m: int   # Br: query rows per CTA
    block_n: int   # Bc: keys per K/V tile
    num_warps: int
    reason: str


# flash_fwd, per padded head dim, fp16 and bf16 alike. With R = Br / warps rows per warp, a
# thread holds R * hd / 64 registers of Q (when in registers), R * hd / 16 of O and
# R * Bc / 16 of S; the aim is 128-row query blocks (K/V re-read from L2 once per 128 rows)
# without spills.
TILES = {
    32: FwdTile(128, 64, 4, "2 m16 tiles per warp (each K/V fragment feeds twice the "
                            "MMAs); Q in registers; no spills"),
    64: FwdTile(128, 64, 4, "2 m16 tiles per warp: 0.94-1.04x torch flash vs 0.66-0.82x "
                            "for 8 warps of one tile (128x128x8w), docs/notes/forward.md v2"),
    96: FwdTile(128, 32, 4, "2 m16 tiles per warp: 0.78x flash vs 0.66x for 128x64x8w at "
                            "8k (notes v2 call); Bc=32 keeps O and S without spills"),
    128: FwdTile(128, 32, 4, "2 m16 tiles per warp: 0.85-0.89x flash vs 0.60-0.80x for "
                             "128x64x8w (notes v2); Bc=64 spills, Bc=32 does not"),
    192: FwdTile(128, 64, 8, "one m16 tile per warp: O alone needs 96 registers per tile"),
    256: FwdTile(64, 32, 4, "128-row blocks spill (Bc=64: 136 bytes, Bc=32: 20); 64x32 fits "
                            "in 255 registers"),
}
# float32: one generic tiling (F32_WARPS warps of F32_ROWS rows in flash_fwd.cu), 32-key tiles.
F32_WARPS, F32_ROWS, F32_KEYS = 4, 4, 32


@dataclass(frozen=True)
class Sm90Tile:
    block_n: int          # Bc: keys per K/V tile (wgmma N of S = Q K^T)
    block_n_short: int    # Bc under SM90_SHORT_KEYS keys, and with softcap / ALiBi
    consumers: int        # consumer warpgroups of 64 query rows: Br = 64 x consumers
    consumers_short: int  # the same under SM90_SHORT_KEYS keys, and with softcap / ALiBi
    reason: str
    # CTAs of a cluster sharing K and V by TMA multicast (flash_fwd_sm90_cluster) where no
    # left window makes a tile's first key depend on its rows, dense calls only; 1: none.
    cluster: int = 1


# flash_fwd_sm90: one producer and two or three consumer warpgroups of 64 rows
# (FwdSm90Traits), K and V rings (SM90_V_STAGES of V; a third K stage where it fits beside
# two Q tiles: sm90_layout), a persistent grid of one CTA per SM. A head
# dim runs in the entry of its whole 64-column blocks (tiles.smem_cols: 32 and 40 in 64,
# 96 in 128): TMA fills the columns past the head dim with zeros, which add nothing to
# Q K^T, and the epilogue skips them. float32, and layouts a TMA map cannot describe, stay
# on flash_fwd.
SM90_V_STAGES = 2
# Below this many keys a large tile computes more padding (hd192's Bc 112 covers 1024 keys in
# 1120, 11% more; Bc 96 in 1056, 3%) and has fewer tiles to spread over the SMs:
# block_n_short and consumers_short serve them, and calls with softcap or ALiBi (whose
# elements do not fit in three consumers' 160 registers beside the P V in flight).
SM90_SHORT_KEYS = 2048
SM90_TILES = {
    64: Sm90Tile(128, 128, 3, 2, "three consumers (FA3's 192 rows) at >= 2k keys: +4-10% "
                                 "over 2 x Bc 128 or 192 non-causal (H200, bench/results/"
                                 "h200_2026-12-05/tiles.md); two at 1k, +14% causal"),
    128: Sm90Tile(160, 128, 2, 2, "Bc 160 at >= 2k keys in clusters: +2-3% over Bc 128 at "
                                  "16k, even at 4k causal (H100, bench/results/"
                                  "h100_2026-12-06n/tiles_hd128.md; notes v38); Bc 128 at 1k "
                                  "(160 3% behind causal: h100_2026-12-06i/tiles_a.md) and "
                                  "with softcap / ALiBi; clusters of two without a left "
                                  "window (notes v30, v32)", cluster=2),
    192: Sm90Tile(112, 96, 2, 2, "Bc 112 at >= 2k keys, 96 below and with softcap/ALiBi "
                                 "(Bc 112 spills 8 B): within 1-2% of each other (tiles.md)"),
    256: Sm90Tile(80, 80, 2, 2, "Bc 80, the largest whose two K/V stages fit next to Q (225 "
                                "KiB): +1-5% over Bc 64 (tiles.md), 2.3-2.5x mma.sync; "
                                "clusters of two without a left window (notes v31, v32)",
                                cluster=2),
}
# Under a causal mask (or a right window) the lower rows' CTA of a cluster passes over the
# key blocks only its peer's rows see, one a tile at Br = Bc: 4 of its 20 ring positions at
# 1k, 16 of 272 at 4k (at Bc 160, none or one a tile: 13 of 224 at 4k). Such calls run in
# clusters from this many query rows (notes v34: -1.4 to -3.4% at 1k, even at 2k, -1 to +5%
# at 4k, up to +4.5% at 16k).
SM90_CLUSTER_WINDOWED_ROWS = 4096
# The Hopper forward numbers its tiles (query blocks x heads x batch items) in int32, and
# its counter runs up to one past the last tile for every CTA.
SM90_MAX_TILES = 2**31 - 2**16

# FwdParams (kernels_cu/common/params.cuh).
PARAMS = np.dtype([
    ("attn", _core.ATTN_ARGS), ("o", np.uint64),
    ("o_batch_stride", np.int64), ("o_row_stride", np.int64), ("o_head_stride", np.int64),
    ("lse", np.uint64),
], align=True)
# FwdSm90Params (flash_fwd_sm90.cu): TMA maps of q, k, v and o, FwdParams, the scheduler's
# two counters, the query blocks per (head, item) (for clusters, blocks
# of a cluster's rows), the tiles of the grid, the (head, item) pairs of a section of its
# tile order, whether tma_o holds a map; padded to its 64-byte alignment.
_MAP = (np.uint8, (_tma.MAP_BYTES,))
SM90_PARAMS = _core.padded(np.dtype([
    ("tma_q", _MAP), ("tma_k", _MAP), ("tma_v", _MAP), ("tma_o", _MAP), ("fwd", PARAMS),
    ("tile_counter", np.uint64), ("m_blocks", np.int32), ("tiles", np.int32),
    ("section", np.int32), ("o_by_tma", np.int32)], align=True), 64)
# The rows of the O map's box: one consumer warpgroup's staged tile.
SM90_O_ROWS = 64
_NO_MAP = bytes(_tma.MAP_BYTES)


class Sm90Layout(NamedTuple):
    k_stages: int
    q_stages: int
    staged_o: bool
    smem: int


@functools.cache
def sm90_layout(hd: int, block_n: int, consumers: int) -> Sm90Layout:
    """FwdSm90Traits' shared memory: a third K stage where it fits beside two Q tiles, two
    Q tiles where they fit beside the rings, O staged where two consumers run: in the Q
    tile where there are two, else in V's stages (64 rows of O fit one of Bc >= 64);
    SMEM_BYTES with 1 KiB to align the tiles."""
    limit = tiles.SHARED_LIMITS["sm_90"] - 1024
    q_tile, kv_tile = 64 * consumers * hd * 2, block_n * hd * 2
    v_ring = SM90_V_STAGES * kv_tile
    k_stages = 3 if 2 * q_tile + 3 * kv_tile + v_ring <= limit else 2
    q_stages = 2 if 2 * q_tile + k_stages * kv_tile + v_ring <= limit else 1
    smem = q_stages * q_tile + k_stages * kv_tile + v_ring + 1024
    staged_o = consumers == 2 and (q_stages == 2 or block_n >= 64)
    return Sm90Layout(k_stages, q_stages, staged_o, smem)


@dataclass(frozen=True)
class Config:
    """One forward kernel and its launch shape."""
    filename: str
    name_expression: str
    block_m: int
    num_threads: int
    shared_bytes: int
    block_n: int = 0  # Bc of the TMA boxes of K and V (flash_fwd_sm90 only)
    cluster: int = 1  # CTAs of a cluster (flash_fwd_sm90_cluster: 2)
    traits: str = ""  # the C++ traits whose SMEM_BYTES is shared_bytes (the compile check)
    sm90: Sm90Layout | None = None  # flash_fwd_sm90's rings and O staging

    @property
    def staged_o(self) -> bool:
        """O leaves through shared memory (FwdSm90Traits::STAGED_O)."""
        return self.sm90 is not None and self.sm90.staged_o

    @property
    def hopper(self) -> bool:
        return self.filename == SM90_FILE


def _flag(value: bool) -> str:
    return "true" if value else "false"


def mma_config(dtype, headdim: int, score_mod: bool, varlen: bool,
               tile: FwdTile | None = None) -> Config:
    """flash_fwd (mma.sync) for one padded head dim (``tile`` overrides TILES, for tuning);
    float32 runs flash_fwd_f32."""
    hd = tiles.padded_headdim(headdim)
    v = tiles.varlen_flag(varlen)
    if np.dtype(dtype) == np.float32:
        block_m = F32_WARPS * F32_ROWS
        smem = (block_m * hd + F32_KEYS * (hd + 1) + F32_KEYS * hd) * 4
        return Config(FILE, f"cuflash::flash_fwd_f32<{hd}{v}>", block_m, F32_WARPS * 32, smem)
    t = tile or TILES[hd]
    args = (f"{_core.CXX_TYPES[np.dtype(dtype)]}, {hd}, {t.block_m}, {t.block_n}, "
            f"{t.num_warps}, {_flag(score_mod)}")
    smem = (t.block_m + 2 * t.block_n) * tiles.smem_cols(hd) * 2
    return Config(FILE, f"cuflash::flash_fwd<{args}{v}>", t.block_m, t.num_warps * 32, smem,
                  traits=f"cuflash::FwdTraits<{args}>")


def sm90_config(dtype, headdim: int, opts: int, varlen: bool, seqlen_k: int,
                block_n: int | None = None, consumers: int | None = None,
                left_window: bool = False, cluster: int | None = None) -> Config:
    """flash_fwd_sm90 for fp16 / bf16 at a head dim whose whole 64-column blocks are one of
    SM90_TILES, applying the score options ``opts`` (its OPTS, ``_core.score_opts``), in
    the table's clusters unless ``varlen`` or ``left_window`` (a window bounding the keys
    on the left; a causal mask bounds them on the right only); ``block_n``, ``consumers``
    and ``cluster`` override the table's, for tuning and tests."""
    hd = tiles.smem_cols(headdim)
    t = SM90_TILES[hd]
    short = seqlen_k < SM90_SHORT_KEYS
    bn = block_n or (t.block_n_short if opts or short else t.block_n)
    c = consumers or (t.consumers_short if opts or short else t.consumers)
    layout = sm90_layout(hd, bn, c)
    # The kernel's clusters: dense, O staged, whole 64-column blocks of K and V a CTA.
    can = not varlen and layout.staged_o and hd // 64 % t.cluster == 0
    if cluster is None:
        cluster = t.cluster if can and not left_window else 1
    elif cluster > 1 and (cluster != t.cluster or not can or left_window):
        raise ValueError(f"no clusters of {cluster} at head dim {hd}, {c} consumers, Bc {bn}"
                         f"{', varlen' if varlen else ''}"
                         f"{', a left window' if left_window else ''}")
    dt = _core.CXX_TYPES[np.dtype(dtype)]
    if cluster > 1:
        name = f"cuflash::flash_fwd_sm90_cluster<{dt}, {hd}, {bn}, {c}, {opts}>"
    else:
        name = f"cuflash::flash_fwd_sm90<{dt}, {hd}, {bn}, {c}, {opts}{tiles.varlen_flag(varlen)}>"
    return Config(SM90_FILE, name, 64 * c, 128 * (c + 1), layout.smem, bn, cluster,
                  f"cuflash::FwdSm90Traits<{hd}, {bn}, {c}>", layout)


def choose(p: _core.Problem, arch: str) -> Config:
    """The forward kernel for a problem on a device of ``arch``: the Hopper kernel where it
    serves (fp16 / bf16, soft-caps up to FAST_TANH_MAX_SOFTCAP), else flash_fwd."""
    if arch == "sm_90" and p.dtype != np.float32 and tiles.smem_cols(p.headdim) in SM90_TILES \
            and p.fast_tanh:
        few_rows = p.windowed and p.seqlen_q < SM90_CLUSTER_WINDOWED_ROWS
        return sm90_config(p.dtype, p.headdim, p.opts, p.varlen, p.seqlen_k,
                           left_window=p.window_left >= 0, cluster=1 if few_rows else None)
    return mma_config(p.dtype, p.headdim, p.score_mod, p.varlen)


class Plan:
    """A memoized forward launch: call it with the arrays' addresses."""

    def __init__(self, p: _core.Problem, out_strides: tuple, config: Config,
                 maps: _tma.Maps | None = None):
        """``maps``: the TMA maps of q, k, v and a blank O map (:func:`_hopper_maps`), for
        the Hopper kernel; with a staged O tile and a dense layout TMA describes, the plan
        also keeps those of q, k, v and out (``o_maps``: a call whose ``out`` the driver
        refuses stores O without its map)."""
        self.problem, self.config = p, config
        grid = (-(-p.seqlen_q // config.block_m), p.nheads, p.batch)
        attn = _core.attn_args(p)
        fwd = (attn, 0, *_core.row_strides(out_strides, p.dtype.itemsize), 0)
        fields = [f"attn.{f}" for f in _core.ATTN_ADDRESSES] + ["o", "lse"]
        self.maps, self.o_maps, int_fields = maps, None, ()
        if config.hopper:
            blank = np.zeros(_tma.MAP_BYTES, np.uint8)  # a call writes the maps (``head``)
            # A tile per cluster: `cluster` query blocks.
            m_blocks = -(-grid[0] // config.cluster)
            num_tiles = m_blocks * grid[1] * grid[2]
            clusters = min(num_tiles, _core.num_sms(p.device_id) // config.cluster)
            ctas = clusters * config.cluster
            record = (blank, blank, blank, blank, fwd, 0, m_blocks, num_tiles,
                      _section(p, m_blocks, clusters), 0)
            fields = [f"fwd.{f}" for f in fields] + ["tile_counter"]
            int_fields = ("o_by_tma",)
            grid, dtype = (ctas,), SM90_PARAMS
            if config.staged_o and not p.varlen:
                o_maker = _tma.MapMaker(p.dtype, _shape(p, p.total_q, p.nheads), out_strides,
                                        SM90_O_ROWS)
                if o_maker.ok:
                    self.o_maps = _tma.Maps((*maps.makers, o_maker))
        else:
            record, dtype = fwd, PARAMS
        self.record = _core.Record(dtype, record, fields, int_fields)
        self.kernel = _core.Kernel(config.filename, config.name_expression, p.device_id, grid,
                                   (config.num_threads,), config.shared_bytes)

    def __call__(self, stream: int, q: int, k: int, v: int, slopes: int, cu_q: int,
                 cu_k: int, out: int, lse: int) -> bool:
        """Queue the launch on ``stream``; False (nothing queued) if the Hopper kernel's
        maps cannot address these arrays."""
        if self.maps is None:
            self.kernel(stream, self.record.fill(q, k, v, slopes, cu_q, cu_k, out, lse))
            return True
        head = self.o_maps(q, k, v, out) if self.o_maps is not None else None
        o_by_tma = head is not None
        if not o_by_tma:
            head = self.maps(q, k, v)
            if head is None:
                return False
        counter = _core.counters(self.problem.device_id, stream, 2)
        self.kernel(stream, self.record.fill(q, k, v, slopes, cu_q, cu_k, out, lse, counter,
                                             head=head, ints=(o_by_tma,)))
        return True


def _section(p: _core.Problem, m_blocks: int, ctas: int) -> int:
    """The (head, item) pairs of a section of the Hopper forward's tile order (heaviest
    query blocks of all the section's pairs first; tiles.sm90_section): their K and V in
    tiles.SM90_L2_BYTES (heads of one GQA group share theirs), ``m_blocks`` tiles a pair on
    ``ctas`` CTAs (for clusters: a cluster's tiles, on that many clusters). One for varlen,
    whose tile skipping walks one pair's query blocks at a time."""
    if p.varlen:
        return 1
    kv_head = max(1, 2 * p.seqlen_k * p.headdim * p.dtype.itemsize)
    group = p.nheads // p.nheads_kv
    return tiles.sm90_section(p.nheads * p.batch, tiles.SM90_L2_BYTES // kv_head * group,
                              m_blocks, ctas, p.windowed)


def _map_makers(p: _core.Problem, config: Config) -> tuple:
    """The TMA map makers of q (boxes of Br rows), k and v (Bc rows)."""
    shape_q = _shape(p, p.total_q, p.nheads)
    shape_k = _shape(p, p.total_k, p.nheads_kv)
    return (_tma.MapMaker(p.dtype, shape_q, p.q_strides, config.block_m),
            _tma.MapMaker(p.dtype, shape_k, p.k_strides, config.block_n),
            _tma.MapMaker(p.dtype, shape_k, p.v_strides, config.block_n))


def _hopper_maps(p: _core.Problem, config: Config) -> _tma.Maps | None:
    """The maps of q, k and v of the Hopper kernel, then a blank one for o, or None where
    it cannot run the problem: a layout TMA cannot describe, or more tiles than its int32
    tile index takes."""
    if -(-p.seqlen_q // config.block_m) * p.nheads * p.batch > SM90_MAX_TILES:
        return None
    makers = _map_makers(p, config)
    return _tma.Maps(makers, _NO_MAP) if all(m.ok for m in makers) else None


def _shape(p: _core.Problem, rows: int, heads: int) -> tuple:
    if p.varlen:
        return (rows, heads, p.headdim)
    return (p.batch, rows, heads, p.headdim)


@functools.lru_cache(maxsize=1024)
def plan(p: _core.Problem, out_strides: tuple, config: Config | None = None) -> Plan:
    """The plan of a problem; ``config`` overrides the kernel choice (tuning, tests)."""
    arch = _compile.device_arch(p.device_id)  # a clear error on GPUs older than sm_80
    chosen = config or choose(p, arch)
    if chosen.cluster > 1 and (p.window_left >= 0 or p.varlen):
        # The CTAs of a cluster load the same key blocks from block 0: dense calls, no
        # left window.
        raise ValueError(f"{chosen.name_expression} cannot run a "
                         f"{'varlen problem' if p.varlen else 'problem with a left window'}")
    maps = _hopper_maps(p, chosen) if chosen.hopper else None
    if chosen.hopper and maps is None:
        if config is not None:
            raise ValueError(f"{config.name_expression} cannot run this problem (strides a "
                             f"TMA map cannot describe, or too many tiles)")
        _log.warn_once("forward-sm90-layout", "%s cannot run this problem (strides a TMA map "
                       "cannot describe, or too many tiles): flash_fwd (mma.sync, slower) "
                       "runs it; logged once per process", chosen.name_expression)
        chosen = mma_config(p.dtype, p.headdim, p.score_mod, p.varlen)
    return Plan(p, out_strides, chosen, maps)


def fallback(p: _core.Problem, out_strides: tuple) -> Plan:
    """The flash_fwd plan of a problem, for addresses the Hopper kernel's maps refuse."""
    _log.warn_once("forward-sm90-address", "the driver could not encode TMA maps for these "
                   "addresses: flash_fwd (mma.sync, slower) runs the Hopper forward's call; "
                   "logged once per process")
    return plan(p, out_strides, mma_config(p.dtype, p.headdim, p.score_mod, p.varlen))


def kernels(arch: str) -> list:
    """Every (filename, name_expression, shared bytes) this family can launch on a device of
    ``arch``."""
    return [(c.filename, c.name_expression, c.shared_bytes) for c in _configs()]


def _configs():
    """Every config the dispatcher can choose, each once."""
    seen = set()
    for varlen in (False, True):
        for hd in tiles.HEADDIMS:
            for dtype in (np.float16, tiles.BFLOAT16):
                for softcap, alibi in itertools.product((False, True), repeat=2):
                    opts = _core.score_opts(softcap, alibi)
                    for c in (mma_config(dtype, hd, opts != 0, varlen),
                              *(sm90_config(dtype, hd, opts, varlen, seqlen_k,
                                            left_window=left)
                                for seqlen_k in (SM90_SHORT_KEYS, 1)
                                for left in (False, True))):
                        if c not in seen:
                            seen.add(c)
                            yield c
            yield mma_config(np.float32, hd, False, varlen)


def facts():
    """(filename, C++ expression, the value Python uses) for the compile check to prove."""
    out = [(FILE, e, v) for e, v in _core.struct_facts("cuflash::FwdParams", PARAMS)]
    out += [(SM90_FILE, e, v) for e, v in
            _core.struct_facts("cuflash::FwdSm90Params", SM90_PARAMS)]
    out += [(FILE, "F32_WARPS", F32_WARPS), (FILE, "F32_ROWS", F32_ROWS)]
    for c in set(_configs()):
        if c.traits:
            out.append((c.filename, f"{c.traits}::SMEM_BYTES", c.shared_bytes))
        if c.hopper:
            out += [(c.filename, f"{c.traits}::BLOCK_M", c.block_m),
                    (c.filename, f"{c.traits}::NUM_THREADS", c.num_threads),
                    (c.filename, f"{c.traits}::STAGED_O", int(c.staged_o)),
                    (c.filename, f"{c.traits}::K_STAGES", c.sm90.k_stages),
                    (c.filename, f"{c.traits}::Q_STAGES", c.sm90.q_stages),
                    (c.filename, f"{c.traits}::V_STAGES", SM90_V_STAGES)]
    return out


class Launch:
    """The GPU forward of one validated call layout: arrays in, ``(out, lse)`` back.
    Allocates ``out`` and ``lse`` where the caller gave none, and nothing else."""

    def __init__(self, p: _core.Problem, out_strides: tuple, lse_shape: tuple,
                 config: Config | None = None):
        self.problem, self.config = p, config
        self.out_shape = _shape(p, p.total_q, p.nheads)
        self.out_strides, self.lse_shape = out_strides, lse_shape
        self.plan = plan(p, out_strides, config)
        # Rows that do not start on 16 bytes (odd strides) go through contiguous copies.
        self.copies = not _core.strides_aligned(p.q_strides, p.k_strides, p.v_strides,
                                                out_strides)

    def __call__(self, q, k, v, slopes=None, cu_q=None, cu_k=None, out=None, lse=None):
        import cupy
        if out is None:
            out = cupy.empty(self.out_shape, self.problem.dtype)
        if lse is None:
            lse = cupy.empty(self.lse_shape, np.float32)
        qp, kp, vp, op = q.data.ptr, k.data.ptr, v.data.ptr, out.data.ptr
        if self.copies or (qp | kp | vp | op) & 15:
            return self._copied(q, k, v, slopes, cu_q, cu_k, out, lse)
        stream = cupy.cuda.get_current_stream().ptr
        args = (stream, qp, kp, vp, _core.address(slopes), _core.address(cu_q),
                _core.address(cu_k), op, lse.data.ptr)
        if not self.plan(*args):
            fallback(self.problem, self.out_strides)(*args)
        return out, lse

    def _copied(self, q, k, v, slopes, cu_q, cu_k, out, lse):
        """The call through 16-byte aligned copies of the arrays whose rows are not."""
        p, q, k, v = _core.realigned(self.problem, q, k, v)
        [out2] = _core.aligned_outputs(out)
        Launch(p, out2.strides, self.lse_shape, self.config)(q, k, v, slopes, cu_q, cu_k,
                                                             out2, lse)
        _core.write_back([out], [out2])
        return out, lse
