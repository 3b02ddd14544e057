"""The KV-cache family (kernels_cu/flash_decode.cu): append_kv writes the new keys and values
into the caches in place; flash_decode is split-KV decoding whose last split of each group
merges the splits by their log-sum-exp, in the same launch.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from .. import _checks, _compile, _core
from . import tiles

FILE = "flash_decode.cu"
ROWS = 16   # DECODE_ROWS: packed query rows (query heads of a kv head x query rows) per CTA
KEYS = 16   # DECODE_KEYS: keys per tile
APPEND_THREADS = 128
# 8 warps a CTA (one CTA per SM) measured +0.5% at long caches and 1-2% slower at short
# ones on the H200 (docs/notes/decode.md, after decode v6).
WARPS = 4
# Split-KV heuristic (docs/notes/decode.md, "Split-KV decode v3"): a split gets at least
# MIN_SPLIT_KEYS keys (two tiles per warp), and past SHORT_SPLITS splits at least SPLIT_KEYS
# (a split's fixed cost, Q load, warp merge and its share of the combine, is worth a few
# microseconds: b1 x 4k took 17.9 us with 8 splits against 20.2 with 15, while b1 x 1k was
# fastest with 8 splits of 128 keys); at most MAX_SPLITS (the fused combine keeps one
# weight per split and row in 8 KiB of shared memory).
MIN_SPLIT_KEYS = 128
SPLIT_KEYS = 512
SHORT_SPLITS = 8
MAX_SPLITS = 128


@dataclass(frozen=True)
class DecodeTile:
    stages: int  # cp.async ring depth per warp (16-key K and V tiles per stage)
    reason: str


# Decoding is bound by memory bandwidth, so the ring depth is set by the bytes in flight it
# buys: 4 warps x stages x 2 tiles of 16 x hd elements, aiming at two CTAs per SM (96 KiB
# each at hd 128: 192 KiB in flight per H100 SM) within 227 KiB of shared memory.
TILES = {
    32: DecodeTile(4, "rows of 64 elements (swizzle width): 4 KiB a stage pair"),
    64: DecodeTile(4, "8 KiB a stage pair per warp: 128 KiB in flight for 2 CTAs"),
    96: DecodeTile(3, "rows padded to 128 elements, as hd 128"),
    128: DecodeTile(3, "8 KiB a stage per warp: 100 KiB a CTA, 2 CTAs per SM"),
    192: DecodeTile(2, "12 KiB a stage per warp: 102 KiB a CTA, 2 CTAs per SM"),
    256: DecodeTile(2, "16 KiB a stage per warp: 136 KiB a CTA, one CTA per SM"),
}
# Where a TILES entry needs more shared memory per block than the device offers (99 KiB on
# sm_86 / sm_89, tiles.SHARED_LIMITS), the first of these that fits. Those GPUs stream 8-11
# GB/s per SM against the H100's 25, so fewer bytes in flight suffice (docs/notes/decode.md,
# "Per-arch tiles"; not measured).
SMALL_TILES = {
    96: (DecodeTile(2, "99 KiB: 68 KiB a CTA, up to 64 KiB of K/V in flight"),),
    128: (DecodeTile(2, "99 KiB: 68 KiB a CTA, up to 64 KiB of K/V in flight"),),
    192: (DecodeTile(1, "99 KiB: 56 KiB a CTA; each warp waits for its own tile, the other "
                        "3 warps' loads in flight meanwhile (2 stages take 102 KiB)"),),
    256: (DecodeTile(1, "99 KiB: 74 KiB a CTA (its merge overlays the ring); 2 stages take "
                        "136 KiB"),),
}

# DecodeParams (kernels_cu/common/params.cuh).
PARAMS = np.dtype([
    ("attn", _core.ATTN_ARGS),
    ("block_table", np.uint64), ("block_table_batch_stride", np.int64),
    ("page_size", _core.FAST_DIV), ("num_pages", np.int32),
    ("cache_seqlens", np.uint64), ("cache_seqlen", np.int32), ("seqlen_new", np.int32),
    ("k_new", np.uint64), ("v_new", np.uint64),
    ("kn_batch_stride", np.int64), ("kn_row_stride", np.int64), ("kn_head_stride", np.int64),
    ("vn_batch_stride", np.int64), ("vn_row_stride", np.int64), ("vn_head_stride", np.int64),
    ("o", np.uint64),
    ("o_batch_stride", np.int64), ("o_row_stride", np.int64), ("o_head_stride", np.int64),
    ("lse", np.uint64), ("o_accum", np.uint64), ("lse_accum", np.uint64),
    ("split_counter", np.uint64), ("num_splits", _core.FAST_DIV), ("m_blocks", _core.FAST_DIV),
    ("nheads_kv", _core.FAST_DIV), ("group", _core.FAST_DIV),
], align=True)
_ADDRESSES = tuple(f"attn.{f}" for f in _core.ATTN_ADDRESSES[:4]) + (
    "block_table", "cache_seqlens", "k_new", "v_new", "o", "lse", "o_accum", "lse_accum",
    "split_counter")


@dataclass(frozen=True)
class Cache:
    """What a kvcache plan knows besides the attention problem (whose ``seqlen_k`` is the
    capacity of one batch item's cache, and whose k / v are the caches): the new rows per
    item, the pages (``page_size`` 0: contiguous), the block table's batch stride (bytes),
    ``uniform`` when one int ``cache_seqlens`` holds for every item (written per call; else
    an array's address is), and the new keys' and values' byte strides."""
    seqlen_new: int
    page_size: int
    num_pages: int
    table_stride: int
    uniform: bool
    kn_strides: tuple
    vn_strides: tuple


def config(dtype, headdim: int, score_mod: bool, warps: int = WARPS,
           limit: int | None = None):
    """(name expression, threads, shared bytes, traits) of flash_decode (fp16 / bf16) with the
    first tile that fits ``limit`` bytes of shared memory (None: TILES' tile)."""
    hd = tiles.padded_headdim(headdim)
    sc = tiles.smem_cols(hd)
    merge = (warps * ROWS * (hd + 8) + (warps + 1) * ROWS) * 4
    tile, shared = tiles.first_fitting(
        (TILES[hd], *SMALL_TILES.get(hd, ())),
        lambda t: ROWS * sc * 2 + max(warps * t.stages * 2 * KEYS * sc * 2, merge), limit)
    mod = "true" if score_mod else "false"
    return (f"cuflash::flash_decode<{_core.CXX_TYPES[np.dtype(dtype)]}, {hd}, {warps}, "
            f"{tile.stages}, {mod}>", warps * 32, shared,
            f"cuflash::DecodeTraits<{hd}, {warps}, {tile.stages}>")


def append_name(dtype) -> str:
    return f"cuflash::append_kv<{_core.CXX_TYPES[np.dtype(dtype)]}>"


def num_splits(ctas: int, seqlen_k: int, sms: int) -> int:
    """Splits of the keys so that the ``ctas`` CTAs of one split fill the SMs in even waves.

    Measured on the H100 (docs/notes/decode.md, "Split-KV decode v2/v3"): one CTA per SM
    reaches the bandwidth, a second wave of CTAs on only some SMs leaves the others idle at
    the end, and more splits add combine work. So FlashAttention-2's rule with one CTA per
    SM as the slot: the fewest splits whose wave efficiency (CTAs / (waves x SMs)) is within
    95% of the best (b1 x 128k: 16 splits, 128 CTAs, 192 us against 196 with 15), within the
    key bounds above; 1 when the CTAs already fill 80% of the SMs.
    """
    max_splits = min(MAX_SPLITS, seqlen_k // MIN_SPLIT_KEYS,
                     max(SHORT_SPLITS, seqlen_k // SPLIT_KEYS))
    if ctas >= 0.8 * sms or max_splits <= 1:
        return 1

    def efficiency(splits):
        waves = ctas * splits / sms
        return waves / -(-waves // 1)

    best = max(efficiency(s) for s in range(1, max_splits + 1))
    return next(s for s in range(1, max_splits + 1) if efficiency(s) >= 0.95 * best)


class Plan:
    """A memoized kvcache call: append_kv (when there are new keys) and flash_decode (fp16 /
    bf16), sharing one DecodeParams record; ``arch``: the device's."""

    def __init__(self, p: _core.Problem, c: Cache, out_strides: tuple, splits: int | None,
                 warps: int, append: bool, decode: bool, arch: str):
        item = p.dtype.itemsize
        group = p.nheads // p.nheads_kv
        self.m_blocks = -(-group * p.seqlen_q // ROWS)
        self.ctas = p.batch * p.nheads_kv * self.m_blocks
        self.splits = 1 if not decode else \
            splits or num_splits(self.ctas, p.seqlen_k, _core.num_sms(p.device_id))
        self.device_id = p.device_id
        self.out_shape = (p.batch, p.seqlen_q, p.nheads, p.headdim)
        # Partial results of several splits (float32): o_accum (splits x out), lse_accum.
        out_elems = p.batch * p.seqlen_q * p.nheads * p.headdim
        self.lse_offset = _core.align(4 * self.splits * out_elems)
        self.scratch_bytes = 0 if self.splits == 1 else \
            self.lse_offset + 4 * self.splits * p.batch * p.nheads * p.seqlen_q
        new = (*_core.row_strides(c.kn_strides, item), *_core.row_strides(c.vn_strides, item))
        record = (_core.attn_args(p), 0, c.table_stride // 4,
                  _core.fast_div(c.page_size or 1), c.num_pages, 0, 0,
                  c.seqlen_new, 0, 0, *new, 0, *_core.row_strides(out_strides, item), 0, 0,
                  0, 0, _core.fast_div(self.splits), _core.fast_div(self.m_blocks),
                  _core.fast_div(p.nheads_kv), _core.fast_div(group))
        self.record = _core.Record(PARAMS, record, _ADDRESSES, ("cache_seqlen",))
        self.kernels = []
        if append and c.seqlen_new and p.batch:
            self.kernels.append(_core.Kernel(FILE, append_name(p.dtype), p.device_id,
                                             (p.batch * c.seqlen_new,), (APPEND_THREADS,), 0))
        if decode:
            name, threads, shared, _ = config(p.dtype, p.headdim, p.score_mod, warps,
                                              tiles.shared_limit(arch))
            self.kernels.append(_core.Kernel(FILE, name, p.device_id,
                                             (self.ctas * self.splits,), (threads,), shared))

    def __call__(self, stream: int, scratch: int, q, k_cache, v_cache, slopes, block_table,
                 cache_seqlens, k_new, v_new, out, lse, cache_seqlen: int = 0) -> None:
        """Queue the launches on ``stream``; ``scratch`` holds ``scratch_bytes``;
        ``cache_seqlen`` is the one length of a uniform cache (``cache_seqlens`` 0)."""
        counter = o_accum = lse_accum = 0
        if self.splits > 1:
            counter = _core.counters(self.device_id, stream, self.ctas)
            o_accum, lse_accum = scratch, scratch + self.lse_offset
        argv = self.record.fill(q, k_cache, v_cache, slopes, block_table, cache_seqlens,
                                k_new, v_new, out, lse, o_accum, lse_accum, counter,
                                ints=(cache_seqlen,))
        for kernel in self.kernels:
            kernel(stream, argv)


@functools.lru_cache(maxsize=1024)
def plan(p: _core.Problem, c: Cache, out_strides: tuple, splits: int | None = None,
         warps: int = WARPS, append: bool = True, decode: bool = True) -> Plan:
    """The plan of a kvcache call (``splits`` None: the heuristic's). ``decode=False``: the
    append alone (float32, whose attention runs the dense forward, and caches decoded
    through copies); ``append=False``: decoding alone."""
    arch = _compile.device_arch(p.device_id)
    return Plan(p, c, out_strides, splits, warps, append, decode, arch)


def kernels(arch: str) -> list:
    """Every (filename, name_expression, shared bytes) this family can launch on a device of
    ``arch``."""
    return [(f, name, shared) for f, name, shared, _ in _configs(arch)]


def _configs(arch: str):
    for dtype in (np.float16, tiles.BFLOAT16):
        for hd in tiles.HEADDIMS:
            for score_mod in (False, True):
                name, _, shared, traits = config(dtype, hd, score_mod,
                                                 limit=tiles.shared_limit(arch))
                yield FILE, name, shared, traits
    for dtype in (np.float16, tiles.BFLOAT16, np.float32):
        yield FILE, append_name(dtype), 0, ""


def facts():
    """(filename, C++ expression, the value Python uses) for the compile check to prove."""
    out = [(FILE, e, v) for e, v in _core.struct_facts("cuflash::DecodeParams", PARAMS)]
    out += [(FILE, "cuflash::DECODE_ROWS", ROWS), (FILE, "cuflash::DECODE_KEYS", KEYS),
            (FILE, "cuflash::APPEND_THREADS", APPEND_THREADS)]
    out += [(FILE, f"{traits}::SMEM_BYTES", shared)
            for _, _, shared, traits in {c for arch in tiles.CHECKED_ARCHS
                                         for c in _configs(arch)} if traits]
    return out


class Launch:
    """The GPU kvcache call of one validated layout: arrays in, ``(out, lse)`` back. Writes
    the new keys into the caches first; allocates ``out`` and ``lse`` where the caller gave
    none, and the splits' partial results."""

    def __init__(self, p: _core.Problem, c: Cache, out_strides: tuple,
                 splits: int | None = None, warps: int = WARPS, append: bool = True):
        self.problem, self.cache, self.out_strides = p, c, out_strides
        self.splits, self.warps = splits, warps
        self.plan = plan(p, c, out_strides, splits, warps, append)
        self.out_shape = (p.batch, p.seqlen_q, p.nheads, p.headdim)
        self.lse_shape = (p.batch, p.nheads, p.seqlen_q)
        self.copies = not _core.strides_aligned(p.q_strides, p.k_strides, p.v_strides,
                                                out_strides)

    def __call__(self, q, k_cache, v_cache, slopes=None, block_table=None, cache_seqlens=None,
                 k_new=None, v_new=None, out=None, lse=None):
        import cupy
        length = self._uniform_length(cache_seqlens)
        if out is None:
            out = cupy.empty(self.out_shape, self.problem.dtype)
        if lse is None:
            lse = cupy.empty(self.lse_shape, np.float32)
        qp, kp, vp, op = q.data.ptr, k_cache.data.ptr, v_cache.data.ptr, out.data.ptr
        if self.copies or (qp | kp | vp | op) & 15:
            return self._copied(q, k_cache, v_cache, slopes, block_table, cache_seqlens,
                                k_new, v_new, out, lse)
        stream = cupy.cuda.get_current_stream()
        scratch, owner = (0, None) if not self.plan.scratch_bytes else \
            _core.scratch(self.plan.scratch_bytes, stream)
        self.plan(stream.ptr, scratch, qp, kp, vp, _core.address(slopes),
                  _core.address(block_table), _seqlens_address(cache_seqlens),
                  _core.address(k_new), _core.address(v_new), op, lse.data.ptr, length)
        del owner  # the launches are queued: the pool may hand it out again on this stream
        return out, lse

    def _uniform_length(self, cache_seqlens) -> int:
        """The one length of a uniform cache, checked as the public function checks it (a
        memoized call skips that check, and the length is not part of its key); else 0."""
        if not self.cache.uniform:
            return 0
        _checks.check_cache_seqlen(cache_seqlens, self.cache.seqlen_new, self.problem.seqlen_k)
        return cache_seqlens

    def _copied(self, q, k_cache, v_cache, slopes, block_table, cache_seqlens, k_new, v_new,
                out, lse):
        """The append into the caches themselves, then decoding through 16-byte aligned
        copies of the arrays whose rows are not."""
        p, c = self.problem, self.cache
        if c.seqlen_new:
            append(p, c, q, k_cache, v_cache, slopes, block_table, cache_seqlens, k_new, v_new)
        p2, q, k_cache, v_cache = _core.realigned(p, q, k_cache, v_cache)
        [out2] = _core.aligned_outputs(out)
        Launch(p2, c, out2.strides, self.splits, self.warps, append=False)(
            q, k_cache, v_cache, slopes, block_table, cache_seqlens, None, None, out2, lse)
        _core.write_back([out], [out2])
        return out, lse


def append(p: _core.Problem, c: Cache, q, k_cache, v_cache, slopes, block_table,
           cache_seqlens, k_new, v_new) -> None:
    """append_kv alone: k_new, v_new into the caches at cache_seqlens (any dtype)."""
    import cupy
    if not (c.seqlen_new and p.batch):
        return
    launch = plan(p, c, (0, 0, 0, 0), decode=False)
    launch(cupy.cuda.get_current_stream().ptr, 0, q.data.ptr, k_cache.data.ptr,
           v_cache.data.ptr, _core.address(slopes), _core.address(block_table),
           _seqlens_address(cache_seqlens), k_new.data.ptr, v_new.data.ptr, 0, 0,
           cache_seqlens if c.uniform else 0)


def _seqlens_address(cache_seqlens) -> int:
    """The address of a cache_seqlens array; 0 for one int for all (in the record)."""
    return 0 if cache_seqlens is None or type(cache_seqlens) is int else cache_seqlens.data.ptr
