"""The merge family: merge_parts (kernels_cu/flash_decode.cu) combines attention over
disjoint key sets by their log-sum-exps, one warp per output row."""
from __future__ import annotations

import functools

import numpy as np

from .. import _compile, _core

FILE = "flash_decode.cu"
WARPS = 4  # MERGE_WARPS: one warp per output row

# MergeParams (kernels_cu/common/params.cuh).
PARAMS = np.dtype([
    ("parts", np.uint64), ("part_lse", np.uint64), ("o", np.uint64), ("lse", np.uint64),
    ("p_part_stride", np.int64), ("p_batch_stride", np.int64), ("p_row_stride", np.int64),
    ("p_head_stride", np.int64),
    ("pl_part_stride", np.int64), ("pl_batch_stride", np.int64), ("pl_head_stride", np.int64),
    ("pl_row_stride", np.int64),
    ("o_batch_stride", np.int64), ("o_row_stride", np.int64), ("o_head_stride", np.int64),
    ("num_parts", np.int32), ("batch", np.int32), ("seqlen_q", np.int32),
    ("nheads", np.int32), ("headdim", np.int32),
], align=True)


def name(dtype) -> str:
    return f"cuflash::merge_parts<{_core.CXX_TYPES[np.dtype(dtype)]}>"


class Plan:
    """A memoized merge of ``parts`` (num_parts, batch, seqlen_q, nheads, headdim) and
    ``part_lse`` (num_parts, batch, nheads, seqlen_q) into ``out`` and a contiguous
    ``lse``; every layout is given as byte strides."""

    def __init__(self, device_id, dtype, shape, part_strides, lse_strides, out_strides):
        num_parts, batch, seqlen_q, nheads, headdim = shape
        item = np.dtype(dtype).itemsize
        record = (0, 0, 0, 0, *(s // item for s in part_strides[:4]),
                  *(s // 4 for s in lse_strides), *_core.row_strides(out_strides, item),
                  num_parts, batch, seqlen_q, nheads, headdim)
        self.record = _core.Record(PARAMS, record, ("parts", "part_lse", "o", "lse"))
        rows = batch * seqlen_q * nheads
        self.kernel = _core.Kernel(FILE, name(dtype), device_id, (-(-rows // WARPS),),
                                   (WARPS * 32,), 0)

    def __call__(self, stream: int, parts, part_lse, out, lse) -> None:
        self.kernel(stream, self.record.fill(parts, part_lse, out, lse))


@functools.lru_cache(maxsize=256)
def plan(device_id, dtype, shape, part_strides, lse_strides, out_strides) -> Plan:
    _compile.device_arch(device_id)
    return Plan(device_id, dtype, shape, part_strides, lse_strides, out_strides)


def kernels(arch: str) -> list:
    return [(FILE, name(dtype), 0) for dtype in _core.CXX_TYPES]


def facts():
    return [(FILE, e, v) for e, v in _core.struct_facts("cuflash::MergeParams", PARAMS)] + \
        [(FILE, "cuflash::MERGE_WARPS", WARPS)]
