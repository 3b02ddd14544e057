"""The GPU core every kernel family builds on: launching a compiled kernel with its params
struct, the struct mirrors' shared pieces, strides, streams, counters and scratch. Nothing
here knows a kernel family (``cuflash/ops/`` holds those); arrays arrive validated and as
CuPy arrays (``_checks.intake`` takes DLPack ones).

Launches go straight to the driver (``cuLaunchKernel``) on the current CuPy stream, with the
params struct in a per-thread buffer laid out by a NumPy structured dtype that mirrors the C
struct (``align=True`` gives C layout; the compile check proves sizes and offsets equal).
A plan fills the fields that are fixed for its problem once; a call writes only the
addresses.
"""
from __future__ import annotations

import functools
import dataclasses
import threading
from dataclasses import dataclass

import ml_dtypes
import numpy as np

from . import _compile, _log

# C++ element type of each supported dtype, as spelled in template name expressions.
CXX_TYPES = {np.dtype(np.float16): "__half", np.dtype(ml_dtypes.bfloat16): "__nv_bfloat16",
             np.dtype(np.float32): "float"}

# CUDA caps gridDim.y and gridDim.z at 65535.
MAX_GRID_YZ = 65535

# AttnArgs (kernels_cu/common/params.cuh): what every attention kernel knows of q, k, v and
# the score function.
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

# FastDiv (common/params.cuh): a divisor d >= 1 and its magic number for n / d, n < 2^31.
FAST_DIV = np.dtype([("d", np.int32), ("mul", np.uint32), ("shift", np.uint32)], align=True)


@functools.lru_cache(maxsize=256)
def fast_div(d: int) -> tuple:
    """FastDiv(d): shift = ceil(log2 d), mul = floor(2^32 (2^shift - d) / d) + 1."""
    shift = (d - 1).bit_length()
    return d, (2**32 * (2**shift - d)) // d + 1, shift


def row_strides(strides, itemsize):
    """(batch, row, head) strides in elements of a (batch, seqlen, nheads, headdim) array's
    byte ``strides``, or of a packed varlen (total, nheads, headdim) one (batch stride 0)."""
    if len(strides) == 3:
        return (0, strides[0] // itemsize, strides[1] // itemsize)
    return tuple(s // itemsize for s in strides[:3])


@dataclass(frozen=True)
class Problem:
    """An attention call as a plan sees it: everything that picks a kernel or fills a field
    of AttnArgs other than an address. Hashable, so plans are memoized on it.

    Strides are the arrays' byte strides. Dense: ``seqlen_q`` / ``seqlen_k`` are the arrays'
    and ``total_q == seqlen_q``. Varlen (packed (total, heads, headdim) arrays): ``batch``
    sequences, the longest ``seqlen_q`` / ``seqlen_k`` (the grid's extent), ``total_q`` /
    ``total_k`` rows. ``window_*`` are -1 when unbounded; ``alibi_batch_stride`` is None
    without ALiBi slopes.
    """
    device_id: int
    dtype: np.dtype
    batch: int
    seqlen_q: int
    seqlen_k: int
    nheads: int
    nheads_kv: int
    headdim: int
    q_strides: tuple
    k_strides: tuple
    v_strides: tuple
    scale: float
    softcap: float
    window_left: int
    window_right: int
    alibi_batch_stride: int | None
    varlen: bool
    total_q: int
    total_k: int

    @property
    def score_mod(self) -> bool:
        """Soft-capping or ALiBi: the instantiations that transform scores."""
        return self.opts != 0

    @property
    def opts(self) -> int:
        """The Hopper kernels' OPTS for this problem's score options (``score_opts``)."""
        return score_opts(self.softcap > 0, self.alibi_batch_stride is not None)

    @property
    def windowed(self) -> bool:
        """A window on either side (a causal mask is one): tiles differ in their keys."""
        return self.window_left >= 0 or self.window_right >= 0

    @property
    def fast_tanh(self) -> bool:
        """Whether the Hopper kernels' soft-cap (scaled_tanh in fp16, MUFU.TANH in bf16) is
        exact enough for this soft-cap (FAST_TANH_MAX_SOFTCAP)."""
        return self.softcap <= FAST_TANH_MAX_SOFTCAP


# The Hopper kernels' OPTS (common/mask.cuh): the score options an instantiation applies.
# One option is fixed at compile time, which leaves the elements without branches (their
# exp2 and reciprocal latencies overlap); both together test per element (OPTS_RUNTIME):
# fixed, they spill in bwd_sm90 at head dim 128, and the pair is rare.
OPTS_SOFTCAP, OPTS_ALIBI, OPTS_RUNTIME = 1, 2, 4


# The Hopper kernels' soft-cap (common/mask.cuh, tanh_form): in fp16, scaled_tanh (tanh = 2 r
# - 1 from one exp2 and one reciprocal) errs by about 1e-7 absolute in tanh, so by about
# softcap x 1e-7 in a logit: 3e-5 here, far below fp16's rounding of P (5e-4); in bf16,
# MUFU.TANH errs by about 2^-11 relative, so a logit by |logit| x 2^-11, within bf16's own
# rounding of it (2^-9) at any soft-cap. Larger soft-caps run the mma.sync kernels, whose
# tanhf has a relative error.
FAST_TANH_MAX_SOFTCAP = 256.0


def score_opts(softcap: bool, alibi: bool) -> int:
    """OPTS for these score options: 0, OPTS_SOFTCAP, OPTS_ALIBI, or OPTS_RUNTIME for both."""
    return OPTS_RUNTIME if softcap and alibi else OPTS_SOFTCAP * softcap + OPTS_ALIBI * alibi


def problem(q, k, v, shape, opts, varlen=None) -> Problem:
    """The Problem of validated CuPy arrays with their ``_checks.Shape``, ``Options`` and,
    for packed batches, ``Varlen``."""
    slopes = opts.alibi_slopes
    totals = (shape.seqlen_q, shape.seqlen_k) if varlen is None else \
        (varlen.total_q, varlen.total_k)
    return Problem(q.data.device_id, q.dtype, shape.batch, shape.seqlen_q, shape.seqlen_k,
                   shape.nheads, shape.nheads_kv, shape.headdim, q.strides, k.strides,
                   v.strides, opts.scale, opts.softcap, opts.window_left, opts.window_right,
                   None if slopes is None else slopes.strides[0] // 4, varlen is not None,
                   *totals)


def address(x) -> int:
    """The device address of a CuPy array, or 0 for None."""
    return 0 if x is None else x.data.ptr


def rows_aligned(x) -> bool:
    """Whether every row of ``x`` starts on 16 bytes, as cp.async and TMA need."""
    return x.data.ptr % 16 == 0 and all(s % 16 == 0 for s in x.strides[:-1])


def aligned_copy(x):
    """``x`` itself when its rows start on 16 bytes, else a contiguous copy (a fresh
    allocation is aligned)."""
    import cupy
    return x if rows_aligned(x) else cupy.array(x, copy=True, order="C")


def strides_aligned(*layouts) -> bool:
    """Whether every row stride (all axes but the last) of these byte-stride tuples is a
    multiple of 16 bytes: rows then start on 16 bytes wherever the first one does."""
    return all(s % 16 == 0 for x in layouts for s in x[:-1])


def realigned(p: Problem, q, k, v):
    """(problem, q, k, v) with q, k, v copied where their rows do not start on 16 bytes:
    the slow path of a call whose arrays the kernels cannot read as they are."""
    q, k, v = (aligned_copy(x) for x in (q, k, v))
    return dataclasses.replace(p, q_strides=q.strides, k_strides=k.strides,
                               v_strides=v.strides), q, k, v


def aligned_outputs(*outputs) -> list:
    """Each output itself where its rows start on 16 bytes, else a fresh array to compute
    into (:func:`write_back` copies it over)."""
    import cupy
    return [x if rows_aligned(x) else cupy.empty(x.shape, x.dtype) for x in outputs]


def write_back(given, computed) -> None:
    for g, c in zip(given, computed):
        if c is not g:
            g[...] = c


def attn_args(p: Problem) -> tuple:
    """The AttnArgs record of a problem with every address 0 (a call writes them)."""
    item = p.dtype.itemsize
    return (0, 0, 0, *row_strides(p.q_strides, item), *row_strides(p.k_strides, item),
            *row_strides(p.v_strides, item), p.batch, p.total_q, p.total_k, p.nheads,
            p.nheads_kv, p.headdim, p.scale, p.softcap, p.window_left, p.window_right, 0,
            p.alibi_batch_stride or 0, 0, 0)


# The AttnArgs fields a call writes, in the order plans take them.
ATTN_ADDRESSES = ("q", "k", "v", "alibi_slopes", "cu_seqlens_q", "cu_seqlens_k")


def field_offset(dtype: np.dtype, path: str) -> int:
    """Byte offset of a (dotted) field, e.g. ``"attn.q"``."""
    offset = 0
    for name in path.split("."):
        sub, off = dtype.fields[name][:2]
        offset, dtype = offset + off, sub
    return offset


def padded(dtype: np.dtype, alignment: int) -> np.dtype:
    """``dtype`` with its size rounded up to ``alignment`` bytes (a C struct of that
    alignment, e.g. one holding TMA maps)."""
    names = dtype.names
    return np.dtype({"names": names, "formats": [dtype.fields[n][0] for n in names],
                     "offsets": [dtype.fields[n][1] for n in names],
                     "itemsize": -(-dtype.itemsize // alignment) * alignment})


def struct_facts(cxx_name: str, dtype: np.dtype, prefix: str = "", base: int = 0) -> list:
    """(C++ expression, value) pairs that prove a NumPy mirror equal to its C struct: its
    size and every field's offset, nested structs included."""
    facts = [] if prefix else [(f"sizeof({cxx_name})", dtype.itemsize)]
    for name, (sub, off, *_) in dtype.fields.items():
        path = prefix + name
        facts.append((f"__builtin_offsetof({cxx_name}, {path})", base + off))
        if sub.names is not None:
            facts.extend(struct_facts(cxx_name, sub, path + ".", base + off))
    return facts


# kernel -> the dynamic shared-memory limit set on it (a driver call; once is enough)
_SHARED_LIMIT = {}


class Kernel:
    """One kernel instantiation on one device with its launch shape."""

    def __init__(self, filename, name_expression, device_id, grid, block, shared_bytes):
        import cupy
        from cupy.cuda import driver
        if any(g > MAX_GRID_YZ for g in grid[1:]):
            raise ValueError(f"grid {tuple(grid)} of {name_expression}: its 2nd and 3rd axes "
                             f"(batch, nheads or nheads_kv) must be at most {MAX_GRID_YZ} on "
                             f"the GPU; split the call")
        limit = shared_memory_limit(device_id)
        if shared_bytes > limit:
            raise RuntimeError(
                f"{name_expression} needs {shared_bytes} bytes of shared memory per block; "
                f"device {device_id} ({_compile.device_arch(device_id)}) offers {limit}. This "
                f"head dim and dtype are not supported on this GPU yet")
        raw = _compile.get_kernel(filename, name_expression, device_id)
        with cupy.cuda.Device(device_id):
            if shared_bytes > max(48 * 1024, _SHARED_LIMIT.get(raw, 0)):
                raw.max_dynamic_shared_size_bytes = shared_bytes
                _SHARED_LIMIT[raw] = shared_bytes
            self.function = raw.kernel.ptr
        self._launch = driver.launchKernel
        self.raw = raw  # keeps the module, and so the function pointer, loaded
        self.filename, self.name = filename, name_expression
        self.dims = (*(tuple(grid) + (1, 1))[:3], *(tuple(block) + (1, 1))[:3], shared_bytes)
        _log.logger.debug("plan: %s (kernels_cu/%s) on device %d, grid %s, block %s, %d bytes "
                          "of dynamic shared memory", name_expression, filename, device_id,
                          self.dims[:3], self.dims[3:6], shared_bytes)

    def __call__(self, stream: int, argv: int) -> None:
        """Launch on ``stream`` (a CUDA stream handle) with the params of a filled
        :class:`Record` (``argv``: the address of its argument pointer)."""
        self._launch(self.function, *self.dims, stream, argv, 0)


class Record:
    """A params struct passed by value: a NumPy structured ``dtype`` mirroring the C struct,
    a ``template`` with every field fixed for a plan, and the pointer fields (dotted paths)
    a call writes. Each thread fills its own copy, so plans are shared across threads.
    ``second``: the bytes of a kernel's second parameter, written whole by each call
    (kernels of one parameter ignore it)."""

    def __init__(self, dtype, template, address_fields=(), int_fields=(), second: int = 0):
        self.bytes = np.zeros(align(dtype.itemsize, 8), np.uint8)  # whole 8-byte words
        self.bytes[:dtype.itemsize] = np.array([template], dtype).view(np.uint8)
        self.slots = tuple(field_offset(dtype, f) // 8 for f in address_fields)
        self.int_slots = tuple(field_offset(dtype, f) // 4 for f in int_fields)
        self.second = second
        self._local = threading.local()

    def _buffer(self):
        """This thread's copy: (bytes, uint64 and int32 views as memoryviews, whose item
        writes cost a quarter of NumPy's; argv address; keep-alives)."""
        try:
            return self._local.buffer
        except AttributeError:
            # cuLaunchKernel needs a context current in this thread; a runtime call that
            # uses the device makes its primary context current (CuPy's launches do the same).
            from cupy.cuda import runtime
            runtime.memGetInfo()
            record = self.bytes.copy()
            second = np.zeros(self.second, np.uint8)
            argv = np.array([record.ctypes.data, second.ctypes.data][:1 + bool(self.second)],
                            np.uint64)
            raw = memoryview(record)
            self._local.buffer = (raw, raw.cast("Q"), raw.cast("i"), argv.ctypes.data,
                                  memoryview(second), record, second, argv)
            return self._local.buffer

    def fill(self, *addresses, head: bytes = b"", ints: tuple = (), second: bytes = b"") -> int:
        """Write ``addresses`` into the address fields and ``ints`` into the int32 fields,
        in order, ``head`` (e.g. TMA maps) at the start and ``second`` (all of it) into the
        second parameter; the argv address to launch with. The record stays this thread's
        until its next ``fill``: launch before filling it again."""
        raw, words, int32s, argv, raw_second = self._buffer()[:5]
        for slot, value in zip(self.slots, addresses):
            words[slot] = value
        for slot, value in zip(self.int_slots, ints):
            int32s[slot] = value
        if head:
            raw[:len(head)] = head
        if second:
            raw_second[:] = second
        return argv


@functools.lru_cache(maxsize=None)
def shared_memory_limit(device_id: int) -> int:
    """Dynamic shared memory a block may opt into on the device (99 KiB on sm_86/sm_89,
    163 KiB on sm_80, 227 KiB on sm_90)."""
    from cupy.cuda import runtime
    return runtime.deviceGetAttribute(runtime.cudaDevAttrMaxSharedMemoryPerBlockOptin,
                                      device_id)


@functools.lru_cache(maxsize=None)
def num_sms(device_id: int) -> int:
    from cupy.cuda import runtime
    return runtime.deviceGetAttribute(runtime.cudaDevAttrMultiProcessorCount, device_id)


# The per-thread default stream (CUPY_CUDA_PER_THREAD_DEFAULT_STREAM=1) has one handle in
# every thread, but is a different stream in each.
_PER_THREAD_STREAM = 2


_THREAD = threading.local()


def stream_key(stream_ptr: int):
    """What tells two streams apart, for the counters kept per stream: a per-thread
    stream is told apart by a token of its thread (thread idents are reused, so a new
    thread could meet a finished one's kernels still queued)."""
    if stream_ptr == _PER_THREAD_STREAM:
        token = getattr(_THREAD, "token", None)
        if token is None:
            token = _THREAD.token = object()
        return stream_ptr, token
    return stream_ptr


# (device, stream key) -> int32 counters that kernels leave at zero (the last CTA of a
# launch or of a group resets what it used), so one array serves every launch of a stream,
# launches of one stream running one after the other. Allocated outside CuPy's pool (a
# call allocates only its outputs there) and never freed: a graph captured with an older
# array keeps using it.
_COUNTERS = {}
_LOCK = threading.Lock()


def counters(device_id: int, stream_ptr: int, count: int) -> int:
    """Address of ``count`` zero int32 counters owned by the stream ``stream_ptr``."""
    key = (device_id, stream_key(stream_ptr))
    found = _COUNTERS.get(key)
    if found is not None and found[1] >= count:
        return found[0]
    import cupy
    from cupy.cuda import runtime
    with _LOCK:
        size = max(count, 1024, 2 * found[1] if found else 0)
        ptr = runtime.malloc(4 * size)
        # Zeroed and waited for on a stream of its own: on ``stream_ptr`` a memset queued
        # during a capture would only be a node of the graph; cudaMemset's legacy stream is
        # not ordered before a non-blocking stream's launches (XLA's, a capture stream) and
        # breaks the capture of a blocking one.
        zeroing = cupy.cuda.Stream(non_blocking=True)
        runtime.memsetAsync(ptr, 0, 4 * size, zeroing.ptr)
        zeroing.synchronize()
        _COUNTERS[key] = (ptr, size)
    return ptr


# (device, stream key) -> scratch used by launches captured into CUDA graphs: a graph keeps
# the addresses it was captured with, so that memory must outlive the call (never freed).
_GRAPH_SCRATCH = {}
_RETIRED = []


def scratch(nbytes: int, stream):
    """Device scratch of ``nbytes`` for one call on ``stream``: (address, owner). Outside
    graph capture, a fresh allocation from CuPy's pool (the caller holds ``owner`` until its
    launches are queued; the pool orders reuse on the stream); under capture, the stream's
    graph scratch, grown as needed and kept."""
    import cupy
    if not stream.is_capturing():
        array = cupy.empty(nbytes, np.uint8)
        return array.data.ptr, array
    key = (cupy.cuda.Device().id, stream_key(stream.ptr))
    with _LOCK:
        array = _GRAPH_SCRATCH.get(key)
        if array is None or array.size < nbytes:
            if array is not None:
                _RETIRED.append(array)  # graphs captured before may still use it
            array = cupy.empty(max(nbytes, 2 * (array.size if array is not None else 0)),
                               np.uint8)
            _GRAPH_SCRATCH[key] = array
    return array.data.ptr, array


def align(nbytes: int, to: int = 256) -> int:
    return -(-nbytes // to) * to
