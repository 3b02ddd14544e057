"""One thin launcher per kernel family: fill the params struct, pick the config, launch.

The NumPy structured dtypes below mirror the structs of kernels_cu/common/params.cuh
field for field (``align=True`` gives C layout); CuPy passes such a record by value.
"""
from __future__ import annotations

import functools

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
    ("cu_seqlens_q", np.uint64), ("cu_seqlens_k", np.uint64),
], align=True)


def aligned(x):
    """``x`` itself when every row starts on 16 bytes (what cp.async needs), else a copy.

    Only unusual views (odd offsets or strides) pay for the copy.
    """
    import cupy
    ok = x.data.ptr % 16 == 0 and all(s % 16 == 0 for s in x.strides[:-1])
    return x if ok else cupy.ascontiguousarray(x)


def strides(x):
    """(batch, row, head) strides in elements of a (batch, seqlen, nheads, headdim) array,
    or of a packed varlen (total, nheads, headdim) one (batch stride 0: it has no batch axis)."""
    item = x.dtype.itemsize
    if x.ndim == 3:
        return (0, *(s // item for s in x.strides[:2]))
    return tuple(s // item for s in x.strides[:3])


def attn_args(q, k, v, shape, opts, varlen=None):
    """The AttnArgs record shared by every attention kernel. ``varlen`` (a
    ``_checks.Varlen``): q, k, v are packed, seqlen_q / seqlen_k the totals."""
    slopes = opts.alibi_slopes
    if slopes is not None:
        slopes_ptr, slopes_stride = slopes.data.ptr, slopes.strides[0] // 4
    else:
        slopes_ptr, slopes_stride = 0, 0
    if varlen is None:
        seqlens, cu_seqlens = (shape.seqlen_q, shape.seqlen_k), (0, 0)
    else:
        seqlens = (varlen.total_q, varlen.total_k)
        cu_seqlens = (varlen.cu_seqlens_q.data.ptr, varlen.cu_seqlens_k.data.ptr)
    return (q.data.ptr, k.data.ptr, v.data.ptr, *strides(q), *strides(k), *strides(v),
            shape.batch, *seqlens, shape.nheads, shape.nheads_kv,
            shape.headdim, opts.scale, opts.softcap, opts.window_left, opts.window_right,
            slopes_ptr, slopes_stride, *cu_seqlens)


def _on_array_device(fn):
    """Run ``fn`` with the device of its first argument (a CuPy array) current: CuPy
    allocates, copies (``aligned``) and picks the current stream on the current device,
    which need not be the one the arrays live on."""
    @functools.wraps(fn)
    def wrapper(x, *args, **kwargs):
        import cupy
        with cupy.cuda.Device(x.device.id):
            return fn(x, *args, **kwargs)
    return wrapper


def _check_varlen_launch(shape, varlen):
    """Varlen grids have one CTA row per batch item, whose count CUDA caps at 65535."""
    if varlen is not None and shape.batch > 65535:
        raise ValueError(f"cu_seqlens_q describes {shape.batch} sequences; the GPU kernels "
                         f"take at most 65535 per call (split the batch)")


# kernel -> the dynamic shared-memory limit already set on it (a driver call; once is enough)
_SHARED_LIMIT = {}


def launch(device_id, filename, name_expression, grid, block, shared_bytes, params, dtype):
    """Launch one kernel instantiation with its params struct (a record of ``dtype``)."""
    import cupy
    if any(g > 65535 for g in grid[1:]):  # CUDA's gridDim.y / gridDim.z limit
        raise ValueError(f"grid {tuple(grid)} of {name_expression}: its 2nd and 3rd axes "
                         f"(batch, nheads or nheads_kv) must be at most 65535 on the GPU; "
                         f"split the call")
    kernel = _compile.get_kernel(filename, name_expression, device_id)
    with cupy.cuda.Device(device_id):
        if shared_bytes > max(48 * 1024, _SHARED_LIMIT.get(kernel, 0)):
            kernel.max_dynamic_shared_size_bytes = shared_bytes
            _SHARED_LIMIT[kernel] = shared_bytes
        # As a one-element void array: CuPy takes the record's address from
        # __array_interface__, which NumPy builds in Python, field by field, for a structured
        # dtype (~40 us a launch) and in C for a plain one.
        record = np.array([params], dtype=dtype).view(np.dtype((np.void, dtype.itemsize)))
        kernel(grid, block, (record,), shared_mem=shared_bytes)


# --- Backward ------------------------------------------------------------------------------
BWD_PARAMS = np.dtype([
    ("attn", ATTN_ARGS),
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
    ("seqlen_q_pad", np.int32), ("headdim_pad", np.int32),
], align=True)

# Query rows of the float32 scratch are padded to a multiple of every query tile, so tiles
# read lse/delta and add into dq_accum without bounds checks.
BWD_SEQLEN_Q_PAD = 128
# Varlen scratch rows are (nheads, seqlen_q_pad) with batch item b's starting at
# (cu_seqlens_q[b] rounded down to 16) + VARLEN_GAP * b (VARLEN_GAP in flash_bwd.cu).
BWD_VARLEN_GAP = 144
_PRE_ROWS = 32  # rows per block of bwd_preprocess / bwd_convert_dq (PRE_ROWS in the kernel)


def _ptr(x):
    return 0 if x is None else x.data.ptr


class _BwdState:
    """The arrays of one backward call and its BwdParams record."""

    def __init__(self, dout, q, k, v, out, lse, shape, opts, headdim_pad, with_accum,
                 varlen=None):
        import cupy
        self.shape = shape
        self.dq = cupy.empty(q.shape, q.dtype)
        self.dk = cupy.empty(k.shape, k.dtype)
        self.dv = cupy.empty(v.shape, v.dtype)
        if varlen is None:
            self.seqlen_q_pad = -(-shape.seqlen_q // BWD_SEQLEN_Q_PAD) * BWD_SEQLEN_Q_PAD
            rows = (shape.batch, shape.nheads, self.seqlen_q_pad)
            lse_strides = tuple(s // 4 for s in lse.strides)
        else:  # lse (nheads, total_q): no batch stride
            self.seqlen_q_pad = varlen.total_q // 16 * 16 + BWD_VARLEN_GAP * shape.batch
            if self.seqlen_q_pad >= 2**31:
                raise ValueError(f"total_q ({varlen.total_q}) is too large for the varlen "
                                 f"backward's int32 row indices")
            rows = (shape.nheads, self.seqlen_q_pad)
            lse_strides = (0, *(s // 4 for s in lse.strides))
        self.lse_log2 = cupy.empty(rows, np.float32)
        self.delta = cupy.empty(rows, np.float32)
        self.dq_accum = cupy.empty(rows + (headdim_pad,), np.float32) if with_accum else None
        self.keep = (dout, q, k, v, out, lse, varlen)  # alive until the launches are queued
        self.params = np.array([(
            attn_args(q, k, v, shape, opts, varlen),
            _ptr(out), _ptr(dout), _ptr(lse), _ptr(self.dq), _ptr(self.dk), _ptr(self.dv),
            _ptr(self.lse_log2), _ptr(self.delta), _ptr(self.dq_accum),
            *strides(out), *strides(dout), *lse_strides,
            *strides(self.dq), *strides(self.dk), *strides(self.dv),
            self.seqlen_q_pad, headdim_pad)], dtype=BWD_PARAMS)[0]


def bwd_preprocess(dout, q, k, v, out, lse, shape, opts, headdim_pad, with_accum,
                   varlen=None):
    """Allocate the backward's outputs and scratch and run the preprocess kernel."""
    from . import _dispatch
    state = _BwdState(aligned(dout), q, k, v, aligned(out), lse, shape, opts, headdim_pad,
                      with_accum, varlen)
    pre, _ = _dispatch.bwd_preprocess_kernels(CXX_TYPES[q.dtype], varlen is not None)
    # Varlen: each item's rows up to its length rounded up to BWD_SEQLEN_Q_PAD.
    rows = state.seqlen_q_pad if varlen is None else \
        -(-shape.seqlen_q // BWD_SEQLEN_Q_PAD) * BWD_SEQLEN_Q_PAD
    launch(q.device.id, "flash_bwd.cu", pre, (rows // _PRE_ROWS, shape.nheads, shape.batch),
           (256, 1, 1), 0, state.params, BWD_PARAMS)
    return state


# ---------------------------------------------------------------------------------------
# Forward (kernels_cu/flash_fwd.cu)

FWD_PARAMS = np.dtype([
    ("attn", ATTN_ARGS), ("o", np.uint64),
    ("o_batch_stride", np.int64), ("o_row_stride", np.int64), ("o_head_stride", np.int64),
    ("lse", np.uint64),
], align=True)

# FwdSm90Params (kernels_cu/flash_fwd_sm90.cu): three 64-byte aligned TMA maps (q, k, v),
# FwdParams, the tile counters' address, the varlen query blocks per (head, item); the size
# is a multiple of the 64-byte alignment.
_MAPS_BYTES = 3 * 128
FWD_SM90_PARAMS = np.dtype({
    "names": ["tma", "fwd", "tile_counter", "varlen_m_blocks"],
    "formats": [(np.uint8, (_MAPS_BYTES,)), FWD_PARAMS, np.uint64, np.int32],
    "offsets": [0, _MAPS_BYTES, _MAPS_BYTES + FWD_PARAMS.itemsize,
                _MAPS_BYTES + FWD_PARAMS.itemsize + 8],
    "itemsize": -(-(_MAPS_BYTES + FWD_PARAMS.itemsize + 8 + 4) // 64) * 64,
}, align=True)
# The Hopper forward numbers its tiles (query blocks x heads x batch items) in int32, and
# the counter runs up to one past the last tile for every CTA.
_FWD_SM90_MAX_TILES = 2**31 - 2**16


@functools.lru_cache(maxsize=None)
def _num_sms(device_id):
    from cupy.cuda import runtime
    return runtime.deviceGetAttribute(runtime.cudaDevAttrMultiProcessorCount, device_id)


# (device, stream) -> two int32 tile counters of flash_fwd_sm90's scheduler. They are zero
# between launches (the kernel's last CTA resets them), so one pair serves every launch of
# a stream, whose launches run one after the other. Allocated once, outside the memory
# pool (the forward's only allocations stay out and lse).
_TILE_COUNTERS = {}


def _tile_counter(device_id):
    import cupy
    key = (device_id, cupy.cuda.get_current_stream().ptr)
    ptr = _TILE_COUNTERS.get(key)
    if ptr is None:
        with cupy.cuda.Device(device_id):
            ptr = cupy.cuda.runtime.malloc(8)
            cupy.cuda.runtime.memset(ptr, 0, 8)
        _TILE_COUNTERS[key] = ptr
    return ptr


@_on_array_device
def forward(q, k, v, shape, opts, varlen=None):
    """Launch the forward kernel; allocates ``out`` and ``lse`` and nothing else.

    ``varlen`` (a ``_checks.Varlen``, with ``shape`` holding the longest lengths, or the
    caller's bounds when the prefix sums were not read on the host): q, k, v are packed and
    lse is (nheads, total_q); the VARLEN instantiations of the same kernels run it.
    """
    import cupy
    from . import _dispatch
    device_id = q.device.id
    arch = _compile.device_arch(device_id)  # a clear error on GPUs older than sm_80
    _check_varlen_launch(shape, varlen)
    q, k, v = aligned(q), aligned(k), aligned(v)
    score_mod = dict(softcap=opts.softcap, alibi=opts.alibi_slopes is not None)
    is_varlen = varlen is not None
    cfg = _dispatch.forward_config(q.dtype, shape.headdim, arch=arch, seqlen_k=shape.seqlen_k,
                                   varlen=is_varlen, **score_mod)
    maps = None
    if cfg.filename == _dispatch.FWD_SM90_FILE:
        from . import _tma
        tiles = -(-shape.seqlen_q // cfg.block_m) * shape.nheads * shape.batch
        if tiles <= _FWD_SM90_MAX_TILES:
            maps = _tma.forward_maps(q, k, v, cfg.block_m, cfg.block_n)
        # Strides a TMA map cannot describe, or more tiles than its int32 tile index
        # takes: the mma.sync kernel takes any.
        if maps is None:
            cfg = _dispatch.forward_config(q.dtype, shape.headdim, varlen=is_varlen,
                                           **score_mod)
    with cupy.cuda.Device(device_id):
        out = cupy.empty(q.shape, q.dtype)
        lse = cupy.empty((shape.batch, shape.nheads, shape.seqlen_q) if varlen is None else
                         (shape.nheads, varlen.total_q), np.float32)
    params = (attn_args(q, k, v, shape, opts, varlen), out.data.ptr, *strides(out),
              lse.data.ptr)
    grid = ((shape.seqlen_q + cfg.block_m - 1) // cfg.block_m, shape.nheads, shape.batch)
    if maps is not None:  # persistent: one CTA per SM walks the tiles of that grid
        params = (np.frombuffer(maps, np.uint8), params, _tile_counter(device_id), grid[0])
        grid = (min(grid[0] * grid[1] * grid[2], _num_sms(device_id)),)
        dtype = FWD_SM90_PARAMS
    else:
        dtype = FWD_PARAMS
    launch(device_id, cfg.filename, cfg.name_expression, grid, (cfg.num_threads,),
           cfg.shared_bytes, params, dtype)
    return out, lse


# ---------------------------------------------------------------------------------------
# Varlen prefix sums checked on the device (kernels_cu/varlen_check.cu)

VARLEN_CHECK_PARAMS = np.dtype([
    ("cu_seqlens_q", np.uint64), ("cu_seqlens_k", np.uint64),
    ("outputs", np.uint64, (5,)), ("output_bytes", np.int64, (5,)),
    ("batch", np.int32), ("total_q", np.int32), ("total_k", np.int32),
    ("max_seqlen_q", np.int32), ("max_seqlen_k", np.int32),
], align=True)
# Every CTA of varlen_check reads all batch + 1 entries of both prefix sums: at most about
# this many entries in all (a few MiB of L2 reads) however long the batch.
_CHECK_READS = 1 << 22


def varlen_check(varlen, outputs):
    """Queue varlen_check after a varlen call: if the prefix sums in device memory are
    invalid (cu[0] != 0, cu[batch] != total, a negative length or one past max_seqlen), it
    fills every array of ``outputs`` (the call's own contiguous allocations) with NaN bytes.
    Nothing to do when the prefix sums were validated on the host."""
    from . import _dispatch
    if varlen.checked_on_host:
        return
    outputs = [x for x in outputs if x.size]
    if not outputs:
        return
    pad = _dispatch.VARLEN_CHECK_MAX_OUTPUTS - len(outputs)
    nbytes = [x.nbytes for x in outputs]
    batch = varlen.cu_seqlens_q.size - 1
    params = (varlen.cu_seqlens_q.data.ptr, varlen.cu_seqlens_k.data.ptr,
              [x.data.ptr for x in outputs] + [0] * pad, nbytes + [0] * pad,
              batch, varlen.total_q, varlen.total_k, varlen.max_seqlen_q,
              varlen.max_seqlen_k)
    device_id = varlen.cu_seqlens_q.device.id
    fill = -(-sum(nbytes) // (_dispatch.VARLEN_CHECK_THREADS * 16 * 8))
    blocks = max(1, min(fill, _num_sms(device_id), _CHECK_READS // (batch + 1)))
    launch(device_id, _dispatch.VARLEN_CHECK_FILE, _dispatch.VARLEN_CHECK_KERNEL, (blocks,),
           (_dispatch.VARLEN_CHECK_THREADS,), 0, params, VARLEN_CHECK_PARAMS)


@_on_array_device
def backward(dout, q, k, v, out, lse, shape, opts, deterministic, varlen=None):
    """dq, dk, dv: preprocess -> dK/dV (+ dQ atomics, or a separate dQ kernel) -> dq convert.

    Allocates only the gradients and O(seqlen * headdim) float32 scratch. ``varlen`` as in
    :func:`forward` (lse (nheads, total_q)): the VARLEN instantiations of bwd_sm90 (Hopper)
    or bwd_main run it, with the grids spanning the longest item (``shape``).
    """
    from . import _dispatch
    _check_varlen_launch(shape, varlen)
    q, k, v = aligned(q), aligned(k), aligned(v)
    cxx = CXX_TYPES[q.dtype]
    dev = q.device.id
    hopper = _dispatch.backward_sm90(
        cxx, shape.headdim, deterministic, opts.softcap > 0 or opts.alibi_slopes is not None,
        _compile.device_arch(dev), varlen is not None)
    if hopper is not None:
        state = bwd_preprocess(dout, q, k, v, out, lse, shape, opts,
                               _dispatch.padded_headdim(shape.headdim), True, varlen)
        launch(dev, _dispatch.BWD_SM90_FILE, hopper.name_expression,
               (-(-shape.seqlen_k // hopper.block_c), shape.batch, shape.nheads_kv),
               (hopper.num_threads, 1, 1), hopper.shared_bytes, state.params, BWD_PARAMS)
        launch(dev, _dispatch.BWD_SM90_FILE, hopper.convert_expression,
               (-(-shape.seqlen_q // _PRE_ROWS), shape.nheads, shape.batch), (256, 1, 1), 0,
               state.params, BWD_PARAMS)
        return state.dq, state.dk, state.dv
    is_varlen = varlen is not None
    if q.dtype == np.float32:
        plan = _dispatch.backward_plan_f32(shape.headdim, deterministic, is_varlen)
    else:
        plan = _dispatch.backward_plan(cxx, shape.headdim, deterministic, is_varlen)
    with_accum = not deterministic
    state = bwd_preprocess(dout, q, k, v, out, lse, shape, opts,
                           _dispatch.padded_headdim(shape.headdim), with_accum, varlen)
    for step in plan:
        if step.key_owner:
            grid = (-(-shape.seqlen_k // step.block_o), shape.batch, shape.nheads_kv)
        else:
            grid = (-(-shape.seqlen_q // step.block_o), shape.batch, shape.nheads)
        launch(dev, _dispatch.BWD_FILE, step.name_expression, grid, (step.num_threads, 1, 1),
               step.shared_bytes, state.params, BWD_PARAMS)
    if with_accum:
        _, convert = _dispatch.bwd_preprocess_kernels(cxx, is_varlen)
        launch(dev, _dispatch.BWD_FILE, convert,
               (-(-shape.seqlen_q // _PRE_ROWS), shape.nheads, shape.batch), (256, 1, 1), 0,
               state.params, BWD_PARAMS)
    return state.dq, state.dk, state.dv


# ---------------------------------------------------------------------------------------
# KV-cache decoding and merging (kernels_cu/flash_decode.cu)

# FastDiv (common/params.cuh): a divisor d >= 1 and its magic number for n / d, n < 2^31.
FAST_DIV = np.dtype([("d", np.int32), ("mul", np.uint32), ("shift", np.uint32)], align=True)


@functools.lru_cache(maxsize=256)
def fast_div(d: int) -> tuple:
    """FastDiv(d): shift = ceil(log2 d), mul = floor(2^32 (2^shift - d) / d) + 1."""
    shift = (d - 1).bit_length()
    return d, (2**32 * (2**shift - d)) // d + 1, shift


DECODE_PARAMS = np.dtype([
    ("attn", ATTN_ARGS),
    ("block_table", np.uint64), ("block_table_batch_stride", np.int64),
    ("page_size", FAST_DIV), ("num_pages", np.int32),
    ("cache_seqlens", np.uint64), ("cache_seqlen", np.int32), ("seqlen_new", np.int32),
    ("k_new", np.uint64), ("v_new", np.uint64),
    ("kn_batch_stride", np.int64), ("kn_row_stride", np.int64), ("kn_head_stride", np.int64),
    ("vn_batch_stride", np.int64), ("vn_row_stride", np.int64), ("vn_head_stride", np.int64),
    ("o", np.uint64),
    ("o_batch_stride", np.int64), ("o_row_stride", np.int64), ("o_head_stride", np.int64),
    ("lse", np.uint64), ("o_accum", np.uint64), ("lse_accum", np.uint64),
    ("split_counter", np.uint64), ("num_splits", FAST_DIV), ("m_blocks", FAST_DIV),
    ("nheads_kv", FAST_DIV), ("group", FAST_DIV),
], align=True)

MERGE_PARAMS = np.dtype([
    ("parts", np.uint64), ("part_lse", np.uint64), ("o", np.uint64), ("lse", np.uint64),
    ("p_part_stride", np.int64), ("p_batch_stride", np.int64), ("p_row_stride", np.int64),
    ("p_head_stride", np.int64),
    ("pl_part_stride", np.int64), ("pl_batch_stride", np.int64), ("pl_head_stride", np.int64),
    ("pl_row_stride", np.int64),
    ("o_batch_stride", np.int64), ("o_row_stride", np.int64), ("o_head_stride", np.int64),
    ("num_parts", np.int32), ("batch", np.int32), ("seqlen_q", np.int32),
    ("nheads", np.int32), ("headdim", np.int32),
], align=True)
_MERGE_WARPS = 4      # MERGE_WARPS in flash_decode.cu
_APPEND_THREADS = 128  # APPEND_THREADS in flash_decode.cu


@_on_array_device
def merge(parts, part_lse):
    """merge_attention on the GPU (merge_parts): ``parts`` (num_parts, batch, seqlen_q,
    nheads, headdim) and ``part_lse`` (num_parts, batch, nheads, seqlen_q) float32 into a
    new ``out`` (batch, seqlen_q, nheads, headdim; the dtype of ``parts``) and ``lse``
    (batch, nheads, seqlen_q)."""
    import cupy
    from . import _dispatch
    num_parts, batch, seqlen_q, nheads, headdim = parts.shape
    out = cupy.empty(parts.shape[1:], parts.dtype)
    lse = cupy.empty((batch, nheads, seqlen_q), np.float32)
    item = parts.dtype.itemsize
    params = (parts.data.ptr, part_lse.data.ptr, out.data.ptr, lse.data.ptr,
              *(s // item for s in parts.strides[:4]), *(s // 4 for s in part_lse.strides),
              *strides(out), num_parts, batch, seqlen_q, nheads, headdim)
    rows = batch * seqlen_q * nheads
    cxx = CXX_TYPES[parts.dtype]
    launch(out.device.id, _dispatch.DECODE_FILE, _dispatch.merge_name(cxx),
           (-(-rows // _MERGE_WARPS),), (_MERGE_WARPS * 32,), 0, params, MERGE_PARAMS)
    return out, lse


def _decode_params(q, k_cache, v_cache, k_new, v_new, cache_seqlens, block_table, cache,
                   opts, out=None, lse=None, o_accum=None, lse_accum=None, split_counter=0,
                   num_splits=1, m_blocks=1):
    shape = cache.shape
    if isinstance(cache_seqlens, int):
        seqlens_ptr, seqlen_const = 0, cache_seqlens
    else:
        seqlens_ptr, seqlen_const = cache_seqlens.data.ptr, 0
    if block_table is not None:
        table = (block_table.data.ptr, block_table.strides[0] // 4, fast_div(cache.page_size),
                 cache.num_blocks)
    else:
        table = (0, 0, fast_div(1), 0)
    new = (_ptr(k_new), _ptr(v_new),
           *(strides(k_new) if k_new is not None else (0, 0, 0)),
           *(strides(v_new) if v_new is not None else (0, 0, 0)))
    return (attn_args(q, k_cache, v_cache, shape, opts), *table, seqlens_ptr, seqlen_const,
            cache.seqlen_new, *new, _ptr(out), *(strides(out) if out is not None else (0, 0, 0)),
            _ptr(lse), _ptr(o_accum), _ptr(lse_accum), split_counter, fast_div(num_splits),
            fast_div(m_blocks), fast_div(shape.nheads_kv),
            fast_div(shape.nheads // shape.nheads_kv))


def append_kv(q, k_cache, v_cache, k_new, v_new, cache_seqlens, block_table, cache, opts):
    """Write k_new / v_new into the caches at cache_seqlens, in place (any dtype)."""
    from . import _dispatch
    if min(cache.shape.batch, cache.seqlen_new) == 0:
        return
    params = _decode_params(q, k_cache, v_cache, k_new, v_new, cache_seqlens, block_table,
                            cache, opts)
    launch(k_cache.device.id, _dispatch.DECODE_FILE,
           _dispatch.append_name(CXX_TYPES[k_cache.dtype]),
           (cache.shape.batch * cache.seqlen_new,), (_APPEND_THREADS,), 0, params,
           DECODE_PARAMS)


@functools.lru_cache(maxsize=1024)
def decode_plan(dtype, shape, score_mod, device_id, num_splits=None):
    """(config, row blocks per kv head, num_splits) of flash_decode for one call shape
    (``shape.seqlen_k`` is the cache capacity; ``num_splits`` None: the heuristic's);
    memoised, since decoding calls the same shape again and again."""
    from . import _dispatch
    group = shape.nheads // shape.nheads_kv
    m_blocks = -(-group * shape.seqlen_q // _dispatch.DECODE_ROWS)
    ctas = shape.batch * shape.nheads_kv * m_blocks
    num_sms = _num_sms(device_id)
    num_splits = num_splits or _dispatch.decode_num_splits(ctas, shape.seqlen_k, num_sms)
    cfg = _dispatch.decode_config(CXX_TYPES[np.dtype(dtype)], shape.headdim, score_mod)
    return cfg, m_blocks, num_splits


# (device, stream) -> (address, count) of the int32 split counters of flash_decode's fused
# combine. They are zero between launches (each group's last split resets its own), so one
# array serves a stream's launches, which run one after the other. Allocated outside the
# memory pool (a call allocates only its outputs and partial results), and replaced by a
# larger one when a call needs more (cudaFree waits for the launches that used the old).
_SPLIT_COUNTERS = {}


def _split_counter(count):
    import cupy
    from cupy.cuda import runtime
    key = (cupy.cuda.Device().id, cupy.cuda.get_current_stream().ptr)
    ptr, size = _SPLIT_COUNTERS.get(key, (0, 0))
    if size < count:
        if ptr:
            runtime.free(ptr)
        size = max(count, 1024)
        ptr = runtime.malloc(4 * size)
        runtime.memset(ptr, 0, 4 * size)
        _SPLIT_COUNTERS[key] = (ptr, size)
    return ptr


@_on_array_device
def kvcache_forward(q, k_cache, v_cache, cache_seqlens, block_table, cache, opts, num_splits):
    """Split-KV decoding over caches already holding the new keys (fp16 / bf16), one launch.

    Allocates ``out`` and ``lse`` and, with several splits, the float32 partial results
    (num_splits x the size of ``out``) that the last split of each group merges.
    """
    import cupy
    from . import _dispatch
    shape = cache.shape
    # cp.async needs 16-byte aligned rows; a cache that is not (an odd view) is copied.
    q, k_cache, v_cache = aligned(q), aligned(k_cache), aligned(v_cache)
    cfg, m_blocks, num_splits = decode_plan(
        q.dtype, shape, opts.softcap > 0 or opts.alibi_slopes is not None, q.device.id,
        num_splits)
    out = cupy.empty(q.shape, q.dtype)
    lse = cupy.empty((shape.batch, shape.nheads, shape.seqlen_q), np.float32)
    o_accum = lse_accum = None
    counter = 0
    ctas = shape.batch * shape.nheads_kv * m_blocks
    if num_splits > 1:
        o_accum = cupy.empty((num_splits,) + q.shape, np.float32)
        lse_accum = cupy.empty((num_splits,) + lse.shape, np.float32)
        counter = _split_counter(ctas)
    params = _decode_params(q, k_cache, v_cache, None, None, cache_seqlens, block_table,
                            cache, opts, out, lse, o_accum, lse_accum, counter, num_splits,
                            m_blocks)
    launch(q.device.id, _dispatch.DECODE_FILE, cfg.name_expression, (ctas * num_splits,),
           (cfg.num_threads,), cfg.shared_bytes, params, DECODE_PARAMS)
    return out, lse
