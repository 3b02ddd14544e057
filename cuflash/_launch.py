"""One thin launcher per kernel family: fill the params struct, pick the config, launch.

The NumPy structured dtypes below mirror the structs of kernels_cu/common/params.cuh
field for field (``align=True`` gives C layout); CuPy passes such a record by value.
"""
from __future__ import annotations

import numpy as np

import ml_dtypes

from . import _compile

# C++ element type of each supported dtype, as spelled in template name expressions.
CXX_TYPES = {np.dtype(np.float16): "__half", np.dtype(ml_dtypes.bfloat16): "__nv_bfloat16",
             np.dtype(np.float32): "float"}

ATTN_ARGS = np.dtype([
    ("q", np.uint64), ("k", np.uint64), ("v", np.uint64),
    ("q_batch_stride", np.int64), ("q_row_stride", np.int64), ("q_head_stride", np.int64),
    ("k_batch_stride", np.int64), ("k_row_stride", np.int64), ("k_head_stride", np.int64),
    ("v_batch_stride", np.int64), ("v_row_stride", np.int64), ("v_head_stride", np.int64),
    ("batch", np.int32), ("seqlen_q", np.int32), ("seqlen_k", np.int32),
    ("nheads", np.int32), ("nheads_kv", np.int32), ("headdim", np.int32),
    ("scale", np.float32), ("softcap", np.float32),
    ("window_left", np.int32), ("window_right", np.int32),
    ("alibi_slopes", np.uint64), ("alibi_batch_stride", np.int64),
], align=True)


def aligned(x):
    """``x`` itself when every row starts on 16 bytes (what cp.async needs), else a copy.

    Only unusual views (odd offsets or strides) pay for the copy.
    """
    import cupy
    ok = x.data.ptr % 16 == 0 and all(s % 16 == 0 for s in x.strides[:-1])
    return x if ok else cupy.ascontiguousarray(x)


def strides(x):
    """(batch, row, head) strides in elements of a (batch, seqlen, nheads, headdim) array."""
    item = x.dtype.itemsize
    return tuple(s // item for s in x.strides[:3])


def attn_args(q, k, v, shape, opts):
    """The AttnArgs record shared by every attention kernel."""
    slopes = opts.alibi_slopes
    if slopes is not None:
        slopes_ptr, slopes_stride = slopes.data.ptr, slopes.strides[0] // 4
    else:
        slopes_ptr, slopes_stride = 0, 0
    return (q.data.ptr, k.data.ptr, v.data.ptr, *strides(q), *strides(k), *strides(v),
            shape.batch, shape.seqlen_q, shape.seqlen_k, shape.nheads, shape.nheads_kv,
            shape.headdim, opts.scale, opts.softcap, opts.window_left, opts.window_right,
            slopes_ptr, slopes_stride)


def launch(device_id, filename, name_expression, grid, block, shared_bytes, params, dtype):
    """Launch one kernel instantiation with its params struct (a record of ``dtype``)."""
    import cupy
    kernel = _compile.get_kernel(filename, name_expression, device_id)
    with cupy.cuda.Device(device_id):
        if shared_bytes > 48 * 1024:
            kernel.max_dynamic_shared_size_bytes = shared_bytes
        kernel(grid, block, (np.array([params], dtype=dtype),), shared_mem=shared_bytes)
