"""TMA tensor maps for the Hopper kernels (kernels_cu/common/sm90.cuh).

A map is 128 opaque bytes made by the driver's ``cuTensorMapEncodeTiled`` (libcuda through
ctypes; CuPy has no binding for it) and passed inside the kernel's parameter struct. It
describes a (batch, seqlen, heads, headdim) array as the 4-D tensor (headdim, seqlen, heads,
batch), innermost first, with the array's own strides, so that strided and GQA inputs need
no copy; its box is 64 elements (one 128-byte swizzle row) x ``rows`` x 1 x 1, and elements
outside the tensor (past seqlen, past headdim) read as zeros. A packed varlen array (total,
heads, headdim) is the tensor (headdim, total, heads, 1): the kernel adds each sequence's
first row to the row coordinate, and only rows past ``total`` read as zeros.
"""
from __future__ import annotations

import ctypes
import functools

import ml_dtypes
import numpy as np

MAP_BYTES = 128
# CUtensorMapDataType, and the other enums of cuTensorMapEncodeTiled (cuda.h)
_DATA_TYPE = {np.dtype(np.float16): 6, np.dtype(ml_dtypes.bfloat16): 9}
_INTERLEAVE_NONE, _SWIZZLE_128B, _L2_PROMOTION_128B, _OOB_FILL_ZEROS = 0, 3, 2, 0
_BOX_COLS = 64  # 128 bytes of a 16-bit type: the widest box row 128-byte swizzling takes


@functools.lru_cache(maxsize=None)
def _encode_tiled():
    lib = ctypes.CDLL("libcuda.so.1")
    fn = lib.cuTensorMapEncodeTiled
    u32p, u64p = ctypes.POINTER(ctypes.c_uint32), ctypes.POINTER(ctypes.c_uint64)
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_void_p, u64p, u64p,
                   u32p, u32p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


@functools.lru_cache(maxsize=256)
def _encode(ptr, dtype, shape, strides, rows):
    batch, seqlen, heads, headdim = shape
    dims = (headdim, seqlen, heads, batch)
    # Byte strides of dims 1..3; an extent-1 dimension is never stepped, so any valid stride
    # does for it (views may carry 0 or odd strides there).
    steps = []
    for extent, stride in ((seqlen, strides[1]), (heads, strides[2]), (batch, strides[0])):
        if extent == 1 and not (0 < stride < 2**40 and stride % 16 == 0):
            stride = 16
        steps.append(stride)
    if ptr % 16 or any(not (0 < s < 2**40 and s % 16 == 0) for s in steps):
        return None
    buf = ctypes.create_string_buffer(MAP_BYTES + 64)
    addr = (ctypes.addressof(buf) + 63) // 64 * 64  # the driver wants 64-byte alignment
    rc = _encode_tiled()(
        addr, _DATA_TYPE[dtype], 4, ptr, (ctypes.c_uint64 * 4)(*dims),
        (ctypes.c_uint64 * 3)(*steps), (ctypes.c_uint32 * 4)(_BOX_COLS, rows, 1, 1),
        (ctypes.c_uint32 * 4)(1, 1, 1, 1), _INTERLEAVE_NONE, _SWIZZLE_128B, _L2_PROMOTION_128B,
        _OOB_FILL_ZEROS)
    return ctypes.string_at(addr, MAP_BYTES) if rc == 0 else None


def tensor_map(x, rows):
    """The TMA map of ``x`` (fp16 / bf16, (batch, seqlen, heads, headdim), or a packed varlen
    (total, heads, headdim) as a batch of one) with boxes of ``rows`` rows, or None where TMA
    cannot address it (an address or a stride that is not a multiple of 16 bytes). Maps are
    cached: a map is a function of these arguments only."""
    shape, strides = tuple(x.shape), tuple(x.strides)
    if x.ndim == 3:
        shape, strides = (1,) + shape, (0,) + strides
    return _encode(x.data.ptr, x.dtype, shape, strides, rows)


def forward_maps(q, k, v, block_m, block_n):
    """The maps of q (boxes of Br rows), k and v (Bc rows), concatenated; None if any fails.
    Dense (batch, seqlen, heads, headdim) or packed varlen (total, heads, headdim) arrays."""
    maps = (tensor_map(q, block_m), tensor_map(k, block_n), tensor_map(v, block_n))
    return None if None in maps else b"".join(maps)
