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
import threading

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


class MapMaker:
    """The TMA maps of every array of one layout: dtype, shape and byte strides of a
    (batch, seqlen, heads, headdim) array, or of a packed varlen (total, heads, headdim) one
    (a batch of one), with boxes of ``rows`` rows. ``ok`` is False where TMA cannot describe
    the layout (a stride that is not a positive multiple of 16 bytes below 2^40); a map is
    then never made. Calling it with an address gives the 128 map bytes (None if the driver
    refuses, e.g. an address that is not a multiple of 16)."""

    def __init__(self, dtype, shape, strides, rows):
        if len(shape) == 3:
            shape, strides = (1, *shape), (0, *strides)
        batch, seqlen, heads, headdim = shape
        # Byte strides of dims 1..3; an extent-1 dimension is never stepped, so any valid
        # stride does for it (views may carry 0 or odd strides there).
        steps = []
        for extent, stride in ((seqlen, strides[1]), (heads, strides[2]), (batch, strides[0])):
            if extent == 1 and not (0 < stride < 2**40 and stride % 16 == 0):
                stride = 16
            steps.append(stride)
        self.ok = all(0 < s < 2**40 and s % 16 == 0 for s in steps)
        self._args = (_DATA_TYPE[np.dtype(dtype)], 4,
                      (ctypes.c_uint64 * 4)(headdim, seqlen, heads, batch),
                      (ctypes.c_uint64 * 3)(*steps), (ctypes.c_uint32 * 4)(_BOX_COLS, rows, 1, 1),
                      (ctypes.c_uint32 * 4)(1, 1, 1, 1))
        self._buffer = ctypes.create_string_buffer(MAP_BYTES + 64)
        self._address = (ctypes.addressof(self._buffer) + 63) // 64 * 64  # 64-byte aligned
        self._lock = threading.Lock()

    def __call__(self, ptr: int):
        if not self.ok or ptr % 16:
            return None
        data_type, rank, dims, steps, box, elem = self._args
        with self._lock:  # one output buffer per maker
            rc = _encode_tiled()(self._address, data_type, rank, ptr, dims, steps, box, elem,
                                 _INTERLEAVE_NONE, _SWIZZLE_128B, _L2_PROMOTION_128B,
                                 _OOB_FILL_ZEROS)
            return ctypes.string_at(self._address, MAP_BYTES) if rc == 0 else None


class Maps:
    """The maps of one kernel's arrays (``makers``, each :class:`MapMaker` ``ok``) for their
    addresses, concatenated and followed by ``tail``: encoded once per address tuple (a
    training loop whose buffers come back at the same addresses pays it once; up to 64
    tuples are kept), None where the driver refuses one (remembered too)."""

    _KEPT = 64

    def __init__(self, makers: tuple, tail: bytes = b""):
        self.makers, self.tail = makers, tail
        self._found: dict = {}

    def __call__(self, *ptrs: int) -> bytes | None:
        found = self._found.get(ptrs, self)  # self: not seen yet
        if found is self:
            maps = [make(ptr) for make, ptr in zip(self.makers, ptrs)]
            found = None if None in maps else b"".join(maps) + self.tail
            if len(self._found) >= self._KEPT:
                self._found.clear()
            self._found[ptrs] = found
        return found
