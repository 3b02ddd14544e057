"""Argument validation and normalisation shared by every backend.

Every public function funnels its arguments through here, so a bad argument gets the same
TypeError / ValueError naming it whichever backend would have run.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any

import ml_dtypes
import numpy as np

MAX_HEADDIM = 256
HEADDIM_MULTIPLE = 8
CPU_DTYPES = (np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16), np.dtype(np.float32),
              np.dtype(np.float64))
GPU_DTYPES = CPU_DTYPES[:3]
_KDL_CUDA = 2  # DLDeviceType of CUDA memory in __dlpack_device__


@dataclass(frozen=True)
class Options:
    """The options of one attention call, normalised.

    ``window_left`` / ``window_right`` are ``-1`` when unbounded; ``causal`` has already
    been folded into ``window_right == 0``. ``softcap == 0`` means no soft-capping.
    ``alibi_slopes`` is ``None`` or a float32 array of shape ``(batch, nheads)`` (a view
    when the caller passed ``(nheads,)``) of the same kind as ``q``.
    """
    scale: float
    causal: bool
    window_left: int
    window_right: int
    softcap: float
    alibi_slopes: Any


@dataclass(frozen=True)
class Shape:
    batch: int
    seqlen_q: int
    seqlen_k: int
    nheads: int
    nheads_kv: int
    headdim: int


@dataclass(frozen=True, eq=False)
class Varlen:
    """The packing of a varlen call, validated as far as the host can see it.

    ``cu_seqlens_q`` / ``cu_seqlens_k`` are the int32 prefix sums where the backend reads
    them (NumPy on the CPU; contiguous CuPy arrays on the q's GPU, a host copy of NumPy ones
    put there). ``offsets_q`` / ``offsets_k`` are int64 host copies of prefix sums that came
    as NumPy arrays and were checked here, or None for device arrays, which are not read on
    the host (that would wait for the stream): varlen_check (kernels_cu/varlen_check.cu)
    checks them on the device after the call. ``max_seqlen_q`` / ``max_seqlen_k`` bound the
    lengths the kernels are launched for: the longest sequence where known, else the
    caller's bound (at most the total). The call's ``Shape`` holds ``batch`` and these.
    """
    cu_seqlens_q: Any
    cu_seqlens_k: Any
    offsets_q: np.ndarray | None
    offsets_k: np.ndarray | None
    total_q: int
    total_k: int
    max_seqlen_q: int
    max_seqlen_k: int

    @property
    def checked_on_host(self) -> bool:
        return self.offsets_q is not None and self.offsets_k is not None

    def items(self):
        """(q_begin, q_end, k_begin, k_end) of each batch item, as Python ints (host-checked
        prefix sums only)."""
        q, k = self.offsets_q.tolist(), self.offsets_k.tolist()
        return list(zip(q[:-1], q[1:], k[:-1], k[1:]))


def array_kind(x, name: str) -> str:
    """'numpy', 'cupy' or 'dlpack' (a CUDA array of another framework)."""
    if isinstance(x, np.ndarray):
        return "numpy"
    if type(x).__module__.startswith("cupy") and hasattr(x, "__cuda_array_interface__"):
        return "cupy"
    if hasattr(x, "__dlpack__") and hasattr(x, "__dlpack_device__"):
        if x.__dlpack_device__()[0] == _KDL_CUDA:
            return "dlpack"
        raise TypeError(f"{name}: a DLPack array must live on a CUDA device to be taken "
                        f"zero-copy; convert CPU arrays with numpy.asarray first")
    raise TypeError(f"{name} must be a numpy.ndarray, a cupy.ndarray or a CUDA array with "
                    f"__dlpack__, got {type(x).__name__}")


def same_kind(arrays: dict, optional=("alibi_slopes",)) -> str:
    """Check that all arrays are of one kind and on one device; return that kind.

    Only the ``optional`` names may be ``None``; any other ``None`` is a TypeError naming it.
    """
    kinds = {name: array_kind(a, name) for name, a in arrays.items()
             if a is not None or name not in optional}
    first, kind = next(iter(kinds.items()))
    for name, k in kinds.items():
        if k != kind:
            raise TypeError(f"{name} is a {k} array but {first} is a {kind} array; "
                            f"pass arrays of one kind")
    if kind == "cupy":
        dev = {name: arrays[name].device.id for name in kinds}
        first_dev = dev[first]
        for name, d in dev.items():
            if d != first_dev:
                raise ValueError(f"{name} is on CUDA device {d} but {first} is on device "
                                 f"{first_dev}; pass arrays on one device")
    return kind


def check_qkv(q, k, v, *, gpu: bool) -> Shape:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 4:
            raise ValueError(f"{name} must have 4 dimensions (batch, seqlen, nheads, headdim), "
                             f"got shape {tuple(x.shape)}")
    check_dtype(q, "q", gpu=gpu)
    check_same_dtype(q, "q", {"k": k, "v": v}, "q, k and v must share one dtype")
    batch, seqlen_q, nheads, headdim = q.shape
    _, seqlen_k, nheads_kv, _ = k.shape
    for name, x in (("k", k), ("v", v)):
        if x.shape[0] != batch:
            raise ValueError(f"{name} has batch {x.shape[0]} but q has batch {batch}")
        if x.shape[3] != headdim:
            raise ValueError(f"{name} has headdim {x.shape[3]} but q has headdim {headdim}; "
                             f"q, k and v must share one headdim")
    if v.shape[1] != seqlen_k or v.shape[2] != nheads_kv:
        raise ValueError(f"v has shape {tuple(v.shape)} but k has shape {tuple(k.shape)}; "
                         f"k and v must share (batch, seqlen_k, nheads_kv)")
    check_headdim(headdim)
    check_gqa(nheads, nheads_kv, "nheads_kv")
    if gpu:  # the kernels index rows with int32 (varlen: the packed totals)
        for name, n in (("q", seqlen_q), ("k", seqlen_k)):
            if n >= 2**31:
                raise ValueError(f"{name} has {n} rows per batch item (sequence axis); the "
                                 f"GPU kernels take fewer than 2**31")
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_last_axis_contiguous(x, name)
    return Shape(batch, seqlen_q, seqlen_k, nheads, nheads_kv, headdim)


def check_dtype(x, name: str, *, gpu: bool) -> None:
    """``x`` has a dtype the backend computes in."""
    supported = GPU_DTYPES if gpu else CPU_DTYPES
    if x.dtype not in supported:
        names = ", ".join(str(d) for d in supported)
        where = "on the GPU" if gpu else "on the CPU"
        raise TypeError(f"{name} has dtype {x.dtype}, which is not supported {where}; "
                        f"supported: {names}")


def check_same_dtype(first, first_name: str, others: dict, rule: str) -> None:
    """Every array of ``others`` (name -> array or None) has the dtype of ``first``."""
    for name, x in others.items():
        if x is not None and x.dtype != first.dtype:
            raise TypeError(f"{name} has dtype {x.dtype} but {first_name} has dtype "
                            f"{first.dtype}; {rule}")


def check_headdim(headdim: int) -> None:
    if not (HEADDIM_MULTIPLE <= headdim <= MAX_HEADDIM and headdim % HEADDIM_MULTIPLE == 0):
        raise ValueError(f"headdim {headdim} is not supported; supported: multiples of "
                         f"{HEADDIM_MULTIPLE} from {HEADDIM_MULTIPLE} to {MAX_HEADDIM} "
                         f"(32, 64, 96, 128, 192 and 256 run without padding on the GPU)")


def check_gqa(nheads: int, nheads_kv: int, kv_name: str) -> None:
    """Grouped-query attention: ``nheads`` query heads share ``nheads_kv`` (named
    ``kv_name`` in the message) kv heads evenly."""
    if nheads_kv == 0 or nheads % nheads_kv != 0:
        raise ValueError(f"nheads ({nheads}) must be a multiple of {kv_name} ({nheads_kv}) "
                         f"for grouped-query attention")


def check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *,
                 gpu: bool):
    """Validate a varlen call: q (total_q, nheads, headdim), k and v (total_k, nheads_kv,
    headdim) and the prefix sums. Returns ``(Shape, Varlen)``.

    NumPy prefix sums are checked here, in full (a ValueError names what is wrong); for a
    GPU call they are then copied to q's device (a host-to-device copy, no wait). Prefix
    sums already on the GPU (CuPy or DLPack) get the checks that need no values (dtype,
    shape, device) and are never read on the host: the kernels stay inside the arrays
    whatever they hold, and varlen_check NaN-fills the call's outputs if they are invalid.
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 3:
            raise ValueError(f"{name} must have 3 dimensions (total, nheads, headdim) in a "
                             f"varlen call, got shape {tuple(x.shape)}")
    if tuple(v.shape[:2]) != tuple(k.shape[:2]):
        raise ValueError(f"v has shape {tuple(v.shape)} but k has shape {tuple(k.shape)}; "
                         f"k and v must share (total_k, nheads_kv)")
    # The dense checks on (1, total, nheads, headdim) views: dtypes, head dims, GQA, layout.
    dense = check_qkv(_Batch1(q), _Batch1(k), _Batch1(v), gpu=gpu)
    total_q, total_k = int(q.shape[0]), int(k.shape[0])
    cu_q, offsets_q = _check_cu_seqlens(cu_seqlens_q, "cu_seqlens_q", total_q, "total_q", q,
                                        gpu)
    cu_k, offsets_k = _check_cu_seqlens(cu_seqlens_k, "cu_seqlens_k", total_k, "total_k", q,
                                        gpu)
    if cu_q.shape[0] != cu_k.shape[0]:
        raise ValueError(f"cu_seqlens_q has {cu_q.shape[0]} entries but cu_seqlens_k has "
                         f"{cu_k.shape[0]}; both must have batch + 1")
    longest_q = _check_max_seqlen(max_seqlen_q, "max_seqlen_q", offsets_q, "cu_seqlens_q",
                                  total_q)
    longest_k = _check_max_seqlen(max_seqlen_k, "max_seqlen_k", offsets_k, "cu_seqlens_k",
                                  total_k)
    shape = Shape(cu_q.shape[0] - 1, longest_q, longest_k, dense.nheads, dense.nheads_kv,
                  dense.headdim)
    return shape, Varlen(cu_q, cu_k, offsets_q, offsets_k, total_q, total_k, longest_q,
                         longest_k)


class _Batch1:
    """What check_qkv reads of ``x[None]`` (a batch of one), without making the view: a CuPy
    view costs microseconds of host time, which a short varlen call feels."""
    ndim = 4

    def __init__(self, x):
        self.shape = (1, *x.shape)
        self.strides = (0, *x.strides)
        self.dtype = x.dtype
        self.size = x.size


def _check_cu_seqlens(cu, name: str, total: int, total_name: str, q, gpu: bool):
    """(prefix sums where the backend reads them, int64 host copy or None). NumPy prefix
    sums must be valid: int32, 1-D, from 0 to ``total``, non-decreasing; device ones are
    checked for what needs no values."""
    kind = array_kind(cu, name)
    if not gpu and kind != "numpy":
        raise TypeError(f"{name} is a {kind} array but q is a numpy array; pass arrays of "
                        f"one kind")
    if kind == "dlpack":
        cu = _cupy().from_dlpack(cu)
    # NumPy int64 is read and checked here, so its values are known to fit int32; GPU
    # prefix sums are never read on the host, and a narrowing on the device could wrap an
    # invalid value into a valid-looking one.
    if cu.dtype != np.int32 and not (kind == "numpy" and cu.dtype == np.int64):
        raise TypeError(f"{name} must be int32 (or int64 for NumPy prefix sums), got "
                        f"{cu.dtype}")
    if cu.ndim != 1 or cu.shape[0] < 1:
        raise ValueError(f"{name} must be 1-D of length batch + 1, got shape "
                         f"{tuple(cu.shape)}")
    if kind != "numpy":  # on a GPU: not read here
        if cu.device.id != q.device.id:
            raise ValueError(f"{name} is on CUDA device {cu.device.id} but q is on device "
                             f"{q.device.id}; pass arrays on one device")
        if cu.flags.c_contiguous:
            return cu, None
        with _cupy().cuda.Device(q.device.id):
            return _cupy().ascontiguousarray(cu), None
    host = cu.astype(np.int64)
    if host[0] != 0:
        raise ValueError(f"{name}[0] must be 0, got {host[0]}")
    if host[-1] != total:
        raise ValueError(f"{name}[-1] must equal {total_name} = {total} (the rows of the "
                         f"packed array), got {host[-1]}")
    steps = np.diff(host)
    if (steps < 0).any():
        i = int(np.argmax(steps < 0))
        raise ValueError(f"{name} must be non-decreasing; {name}[{i + 1}] = {host[i + 1]} < "
                         f"{name}[{i}] = {host[i]}")
    if gpu:  # a host-to-device copy on q's device, queued without waiting for the stream
        with _cupy().cuda.Device(q.device.id):
            cu = _cupy().asarray(cu if cu.dtype == np.int32 else host.astype(np.int32))
    return cu, host


def _check_max_seqlen(value, name: str, offsets, cu_name: str, total: int) -> int:
    """The longest sequence of ``offsets`` after checking that ``value`` bounds it; without
    host offsets, ``value`` itself (at most ``total``: no sequence is longer)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    if offsets is None:
        return min(int(value), total)
    longest = int(np.diff(offsets).max(initial=0))
    if value < longest:
        raise ValueError(f"{name} ({value}) is smaller than the longest sequence in {cu_name} "
                         f"({longest})")
    return longest


def check_cache_seqlen(value: int, seqlen_new: int, capacity: int) -> None:
    """One ``cache_seqlens`` int for every batch item: its keys and the new ones fit."""
    if not 0 <= value <= capacity - seqlen_new:
        raise ValueError(f"cache_seqlens ({value}) + seqlen_new ({seqlen_new}) must lie in "
                         f"[0, {capacity}] (the cache's capacity)")


def check_last_axis_contiguous(x, name: str) -> None:
    # An empty array has no layout to honour (NumPy may give it any strides, even 0).
    if x.size > 0 and x.shape[-1] > 1 and x.strides[-1] != x.dtype.itemsize:
        raise ValueError(f"{name} must be contiguous in its last axis (stride "
                         f"{x.dtype.itemsize} bytes), got stride {x.strides[-1]} bytes; "
                         f"other axes may be strided")


def _as_float(value) -> float:
    try:
        return float(value)
    except OverflowError:  # an int too large for a float; the caller reports it as non-finite
        return math.inf


# The kernels take scale and softcap as float32, and divide by softcap: a value that float32
# rounds to inf, 0 or a subnormal (whose reciprocal overflows) would change the answer.
_F32_NORMAL = (float(np.finfo(np.float32).smallest_normal), float(np.finfo(np.float32).max))


def _check_float32(value: float, name: str) -> None:
    low, high = _F32_NORMAL
    if not low <= value <= high:
        raise ValueError(f"{name} must lie in float32's normal range [{low:.4g}, {high:.4g}] "
                         f"(the GPU kernels take it as a float32), got {value}")


def _window_side(value, side: str) -> int:
    if value is None:
        return -1
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"window[{side}] must be None or an int, got {value!r}")
    if value < -1:
        raise ValueError(f"window[{side}] must be None, -1 (unbounded) or >= 0, got {value}")
    return int(value)


def options(shape: Shape, kind: str, q, *, scale=None, causal=False, window=(None, None),
            softcap=0.0, alibi_slopes=None) -> Options:
    """Validate the keyword options of an attention call and normalise them."""
    if scale is None:
        scale = shape.headdim ** -0.5
    if isinstance(scale, (bool, np.bool_)) or not isinstance(scale, (int, float, np.floating,
                                                                     np.integer)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    scale = _as_float(scale)
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be finite and > 0, got {scale}")
    _check_float32(scale, "scale")
    if not isinstance(causal, (bool, np.bool_)):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if not isinstance(window, (tuple, list)) or len(window) != 2:
        raise TypeError(f"window must be a (left, right) pair of None or int, got {window!r}")
    left, right = _window_side(window[0], "left"), _window_side(window[1], "right")
    if causal:
        if right > 0:
            raise ValueError(f"window right={right} contradicts causal=True (which means "
                             f"right=0); pass one or the other")
        right = 0
    # A side at least as wide as the keys (left) or queries (right) hides nothing; clamp it
    # so that any int the caller passes fits the kernels' int32 fields. Exact: query i sees
    # every key j < seqlen_k once left >= seqlen_k - 1 and right >= seqlen_q - 1.
    if left > shape.seqlen_k:
        left = shape.seqlen_k
    if right > shape.seqlen_q:
        right = shape.seqlen_q
    if isinstance(softcap, (bool, np.bool_)) or not isinstance(softcap, (int, float, np.floating,
                                                                         np.integer)):
        raise TypeError(f"softcap must be a float, got {type(softcap).__name__}")
    softcap = _as_float(softcap)
    if not (math.isfinite(softcap) and softcap >= 0):
        raise ValueError(f"softcap must be finite and >= 0 (0 disables it), got {softcap}")
    if softcap > 0:
        _check_float32(softcap, "softcap")
    if alibi_slopes is not None:
        alibi_slopes = _check_alibi(alibi_slopes, shape, kind, q)
    return Options(scale, bool(causal), left, right, softcap, alibi_slopes)


def _check_alibi(slopes, shape: Shape, kind: str, q):
    same_kind({"q": q, "alibi_slopes": slopes})
    if slopes.dtype == np.float64:  # the kernels read float32: round, as NumPy would
        with on_device(kind, q):
            slopes = slopes.astype(np.float32)
    if slopes.dtype != np.float32:
        raise TypeError(f"alibi_slopes must be float32 (or float64, rounded to float32), got "
                        f"{slopes.dtype}")
    # The kernels take one batch stride and assume consecutive heads.
    if slopes.ndim in (1, 2):
        check_last_axis_contiguous(slopes, "alibi_slopes")
    if slopes.shape == (shape.nheads,):
        xp = np if kind == "numpy" else _cupy()
        slopes = xp.broadcast_to(slopes[None, :], (shape.batch, shape.nheads))
    elif slopes.shape != (shape.batch, shape.nheads):
        raise ValueError(f"alibi_slopes must have shape (nheads,) = ({shape.nheads},) or "
                         f"(batch, nheads) = ({shape.batch}, {shape.nheads}), got "
                         f"{tuple(slopes.shape)}")
    return slopes


def check_backward(dout, out, lse, q, shape: Shape, varlen: Varlen | None = None) -> None:
    for name, x in (("dout", dout), ("out", out)):
        if tuple(x.shape) != tuple(q.shape):
            raise ValueError(f"{name} must have the shape of q {tuple(q.shape)}, got "
                             f"{tuple(x.shape)}")
        if x.dtype != q.dtype:
            raise TypeError(f"{name} must have the dtype of q ({q.dtype}), got {x.dtype}")
        check_last_axis_contiguous(x, name)
    if varlen is None:
        want, names = (shape.batch, shape.nheads, shape.seqlen_q), "(batch, nheads, seqlen_q)"
    else:
        want, names = (shape.nheads, varlen.total_q), "(nheads, total_q)"
    if tuple(lse.shape) != want:
        raise ValueError(f"lse must have shape {names} = {want}, got {tuple(lse.shape)}")
    if lse.dtype != np.float32:
        raise TypeError(f"lse must be float32, got {lse.dtype}")


def on_device(kind: str, x):
    """A context with the CUDA device of ``x`` current for a GPU call (CuPy allocates on the
    current device, which need not be the inputs'); nothing for a NumPy call."""
    if kind == "numpy":
        return contextlib.nullcontext()
    return _cupy().cuda.Device(x.device.id)


def _cupy():
    try:
        import cupy
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("CUDA arrays need CuPy: pip install 'cuflash[cuda13]' "
                          "(or [cuda12])") from e
    return cupy


def shares_memory(a, b) -> bool:
    """Whether two arrays (both NumPy, or both CUDA arrays of one device) have a byte in
    common, from their pointers, shapes and strides alone: the data is never read, so CUDA
    arrays cost no device synchronisation. NumPy's exact solver decides (interleaved views
    of one buffer, such as ``kv[:, :, 0]`` and ``kv[:, :, 1]``, do not overlap); a layout
    too hard for it within a bounded effort counts as overlapping."""
    if a.size == 0 or b.size == 0:
        return False
    if not (isinstance(a, np.ndarray) and isinstance(b, np.ndarray)):
        a, b = _layout(a), _layout(b)
    try:
        return bool(np.shares_memory(a, b, max_work=1 << 20))
    except getattr(np, "exceptions", np).TooHardError:
        return True


class _Layout:
    """The memory layout of a CUDA array as a read-only NumPy array interface at its device
    pointer: NumPy's overlap solver works on addresses and never dereferences them."""

    def __init__(self, x):
        self.__array_interface__ = {
            "version": 3, "shape": tuple(x.shape), "strides": tuple(x.strides),
            "typestr": f"|V{x.dtype.itemsize}", "data": (x.data.ptr, True)}


def _layout(x):
    return np.asarray(_Layout(x))


def intake(arrays: dict, optional=()):
    """The kind of a call ('numpy' or 'cupy') and its arrays as that backend takes them:
    CUDA arrays of other frameworks become zero-copy CuPy views through DLPack. Checks that
    the arrays are of one kind and on one device; only ``optional`` names may be None."""
    kind = same_kind(arrays, optional)
    if kind == "dlpack":
        cupy = _cupy()
        arrays = {n: (None if a is None else cupy.from_dlpack(a)) for n, a in arrays.items()}
        kind = same_kind(arrays, optional)
    return kind, arrays


def check_output(x, name: str, shape: tuple, dtype, kind: str, q, *, contiguous=False):
    """A caller's output array ``x`` (or None): of the call's kind and device, exactly the
    ``shape`` and ``dtype`` the call returns, writable, its last axis contiguous (all of it
    with ``contiguous``)."""
    if x is None:
        return
    if array_kind(x, name) != kind:
        raise TypeError(f"{name} is a {array_kind(x, name)} array but q is a {kind} array; "
                        f"pass outputs of the inputs' kind")
    if kind != "numpy" and x.device.id != q.device.id:
        raise ValueError(f"{name} is on CUDA device {x.device.id} but q is on device "
                         f"{q.device.id}")
    if x.dtype != dtype:
        raise TypeError(f"{name} must have dtype {np.dtype(dtype)}, got {x.dtype}")
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(x.shape)}")
    if kind == "numpy" and not x.flags.writeable:
        raise ValueError(f"{name} is read-only")
    if contiguous and not x.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous")
    check_last_axis_contiguous(x, name)


def extent(x):
    """(low, high): the byte offsets from ``x``'s first element of the first and last
    bytes it can touch; None for an empty array."""
    if x.size == 0:
        return None
    low, high = 0, x.dtype.itemsize - 1
    for n, step in zip(x.shape, x.strides):
        if step < 0:
            low += step * (n - 1)
        else:
            high += step * (n - 1)
    return low, high


def _start(x) -> int:
    """The address of the first element of a NumPy or CUDA array."""
    if isinstance(x, np.ndarray):
        return x.__array_interface__["data"][0]
    return x.data.ptr


def check_disjoint(outputs: dict, inputs: dict) -> None:
    """No output (name -> array or None) shares a byte with an input or another output: a
    ValueError naming the pair. Address ranges decide quickly; ranges that meet go to the
    exact test (:func:`shares_memory`), so interleaved views of one buffer are allowed."""
    given = {n: x for n, x in outputs.items() if x is not None}
    if not given:
        return
    arrays = dict(given)
    arrays.update({n: x for n, x in inputs.items() if x is not None and n not in given})
    spans = {}
    for n, x in arrays.items():
        e = extent(x)
        if e is not None:
            start = _start(x)
            spans[n] = (start + e[0], start + e[1])
    for name in given:
        if name not in spans:
            continue
        low, high = spans[name]
        for other, (lo, hi) in spans.items():
            if other != name and low <= hi and lo <= high and \
                    shares_memory(arrays[name], arrays[other]):
                raise ValueError(f"{name} overlaps {other} in memory; pass an output that "
                                 f"shares no memory with the call's other arrays")