"""A fake CuPy that records kernel launches on a machine without a GPU.

Used by tests/data/record_launches.py (which records the launches of the public API into
tests/data/launches.json) and tests/test_launch_layer.py (which checks that the current
launch layer makes exactly those launches). It works the same for the old launch layer
(cuflash/_launch.py, up to commit 9646626: ``cupy.RawKernel`` calls with a NumPy record)
and the new one (cuflash/_core.py: ``cupy.cuda.driver.launchKernel`` with the address of a
params struct), so that the two recordings are comparable.

What is faked:

* ``ndarray``: shape, strides, dtype, ``.data.ptr``, ``.data.device_id``, ``.device.id``,
  ``nbytes``, ``size``, ``ndim``, ``flags``, ``itemsize``, ``__cuda_array_interface__``
  and basic indexing (ints, slices, None, Ellipsis). Nothing is ever stored: an array is
  an address range in an :class:`Allocation`, whose base is a multiple of 2**24 (at least
  2**24 bytes after the previous allocation's end), so every address names one
  allocation. ``type(x).__module__`` starts with "cupy", as cuflash's kind detection wants.
* ``cupy.empty / zeros / full / ascontiguousarray / asarray / array / stack /
  broadcast_to``; ``cupy.cuda.Device`` (a current-device stack; device 0 is sm_90 and
  device 1 sm_80, both with 132 SMs, 227 and 163 KiB of opt-in shared memory),
  ``get_current_stream`` (``.ptr``, ``is_capturing()``), ``cuda.Stream`` (a handle of
  its own, ``synchronize()``), ``runtime.getDevice / deviceGetAttribute / malloc / memset /
  memsetAsync / free``, ``driver.launchKernel`` (reads the params struct back through
  ctypes at the address its ``argv`` holds, and a second parameter's bytes, as ``second``,
  where the record has one: ``Record.second``). A memset is queued, as CUDA's are:
  ``memsetAsync`` on its stream, ``memset`` on the legacy default stream (0); it is done
  (an allocation zeroed whole counts as ``zeroed``) once its stream is synchronised or
  runs a launch, the legacy stream's also by a launch on a stream that is not a
  non-blocking ``cuda.Stream``.
  Setting a kernel's ``max_dynamic_shared_size_bytes`` past the device's opt-in limit
  raises ``driver.CUDADriverError``, as the driver refuses it.
* ``cuflash._compile.get_kernel`` (:meth:`World.get_kernel`: a kernel object with
  ``.kernel.ptr`` and ``max_dynamic_shared_size_bytes``, whose call records an old-style
  launch) and ``cuflash._tma._encode_tiled`` (:meth:`World.encode_tiled`: deterministic
  map bytes from the encoder's arguments, the global address in the first word, so that
  the map of ``q`` is labelled ``q+0`` like any pointer field).

Recording: every launch's struct bytes are split in 8-byte words; a word that is an address
inside a known allocation becomes ``@<role>+<offset>`` (roles: the names the caller gave
its arrays, the names of the returned arrays, ``copy(<label>)`` for a copy the library
made, ``h2d(<name>)`` for a host array put on the device, ``stack(...)``), the scratch and
counter fields (:data:`NORMALISED`) become ``nz`` or ``0``, any other word its value in
hex. Padding bytes are zeroed first (NumPy does not promise their contents).
"""
from __future__ import annotations

import contextlib
import ctypes
import math
import sys
import types

import ml_dtypes
import numpy as np

BASE0 = 1 << 40
ALIGN = 1 << 24
SM_COUNT = 132
ARCHS = {0: "90", 1: "80"}  # device id -> compute capability
# cudaDevAttrMaxSharedMemoryPerBlockOptin: 227 KiB on sm_90 (H100), 163 KiB on sm_80 (A100)
SHARED_OPTIN = {0: 227 * 1024, 1: 163 * 1024}
DEFAULT_STREAM = 0           # cupy.cuda.Stream.null.ptr


# Pointer fields to scratch or counters the library owns: recorded as "nz" / "0" (their
# layout differs legitimately between launch layers); their sizes are checked separately.
NORMALISED = {
    "bwd": ("lse_log2", "delta", "dq_accum", "dq_semaphore"),
    "decode": ("o_accum", "lse_accum", "split_counter"),
    "fwd_sm90": ("tile_counter",),
}
COUNTERS = ("tile_counter", "split_counter")


def struct_of(name: str):
    """(kind, dtype) of the params struct of a kernel name expression: the library's own
    mirror of the C struct (cuflash/ops/, proven against the CUDA sources by the compile
    check), used to name fields in diffs, find the scratch fields and mask padding."""
    from cuflash import ops
    base = name.split("<", 1)[0]
    if base in ("cuflash::flash_fwd_sm90", "cuflash::flash_fwd_sm90_cluster"):
        return "fwd_sm90", ops.forward.SM90_PARAMS
    if base in ("cuflash::flash_fwd", "cuflash::flash_fwd_f32"):
        return "fwd", ops.forward.PARAMS
    if base.startswith("cuflash::bwd_"):
        return "bwd", ops.backward.PARAMS
    if base in ("cuflash::flash_decode", "cuflash::append_kv"):
        return "decode", ops.decode.PARAMS
    if base == "cuflash::merge_parts":
        return "merge", ops.merge.PARAMS
    if base == "cuflash::varlen_check":
        return "varlen_check", ops.varlen_check.PARAMS
    raise KeyError(f"no params struct known for {name}")


def leaves(dtype: np.dtype, prefix: str = "", base: int = 0):
    """(path, offset, size, leaf dtype) of every scalar field, array fields per element."""
    out = []
    for fname in dtype.names:
        sub, off = dtype.fields[fname][:2]
        path, offset = prefix + fname, base + off
        if sub.names is not None:
            out += leaves(sub, path + ".", offset)
        elif sub.subdtype is not None:
            item, shape = sub.subdtype
            for i in range(int(np.prod(shape))):
                out.append((f"{path}[{i}]", offset + i * item.itemsize, item.itemsize, item))
        else:
            out.append((path, offset, sub.itemsize, sub))
    return out


def field_offset(dtype: np.dtype, path: str) -> int:
    for p, off, _, _ in leaves(dtype):
        if p == path:
            return off
    raise KeyError(path)


def padding_mask(dtype: np.dtype) -> np.ndarray:
    mask = np.zeros(dtype.itemsize, bool)
    for _, off, size, _ in leaves(dtype):
        mask[off:off + size] = True
    return mask


def fields_in_word(dtype: np.dtype, word: int):
    """The leaf fields overlapping 8-byte word ``word``: (path, offset, size, dtype)."""
    lo, hi = 8 * word, 8 * word + 8
    return [leaf for leaf in leaves(dtype) if leaf[1] < hi and leaf[1] + leaf[2] > lo]


def decode_word_fields(dtype: np.dtype, word: int, value: str) -> dict:
    """Field values inside one rendered hex word (labels are returned as they are)."""
    out = {}
    for path, off, size, ftype in fields_in_word(dtype, word):
        if not _is_hex(value):
            out[path] = value
            continue
        raw = int(value, 16).to_bytes(8, "little")
        chunk = raw[max(off - 8 * word, 0):off + size - 8 * word]
        if off >= 8 * word and len(chunk) == size:
            out[path] = np.frombuffer(chunk, ftype)[0].item()
        else:
            out[path] = "0x" + chunk.hex()
    return out


def _is_hex(s: str) -> bool:
    return not s.startswith("@") and s != "nz"


# ---------------------------------------------------------------------------------------
# Arrays and allocations


class Allocation:
    """A device allocation: [base, base + size) on ``device``. ``role`` names it for labels;
    a copy names itself after its source (``copy(<source label>)``)."""

    def __init__(self, world, base, size, device, ctor, role=None, zeroed=False):
        self.world, self.base, self.size, self.device = world, base, size, device
        self.ctor, self._role, self.zeroed = ctor, role, zeroed
        self.derive = None  # () -> role, for copies and stacks (resolved when labelling)
        self.call = world.call_index

    @property
    def role(self):
        if self._role is not None:
            return self._role
        if self.derive is not None:
            return self.derive()
        return None

    @role.setter
    def role(self, value):
        self._role = value

    def label(self, address: int) -> str:
        role = self.role
        if role is None:
            role = f"tmp:{self.ctor}"
        return f"{role}+{address - self.base}"


class _Flags:
    def __init__(self, c, f):
        self.c_contiguous, self.f_contiguous = c, f
        self.writeable = True
        self.owndata = False

    def __getitem__(self, key):
        return {"C_CONTIGUOUS": self.c_contiguous, "F_CONTIGUOUS": self.f_contiguous,
                "WRITEABLE": True, "OWNDATA": False}[key]


class _Memory:
    __slots__ = ("ptr", "device_id", "alloc")

    def __init__(self, ptr, device_id, alloc):
        self.ptr, self.device_id, self.alloc = ptr, device_id, alloc


class _DeviceRef:
    __slots__ = ("id",)

    def __init__(self, id_):
        self.id = id_


def _contiguous_strides(shape, itemsize):
    strides, step = [], itemsize
    for n in reversed(shape):
        strides.append(step)
        step *= max(n, 1)
    return tuple(reversed(strides))


class ndarray:
    """A fake cupy.ndarray: a layout at an address, no contents."""

    def __init__(self, alloc: Allocation, shape, dtype, strides=None, offset=0):
        self._alloc = alloc
        self.shape = tuple(int(n) for n in shape)
        self.dtype = np.dtype(dtype)
        self.strides = tuple(strides) if strides is not None else \
            _contiguous_strides(self.shape, self.dtype.itemsize)
        self._offset = offset
        self.data = _Memory(alloc.base + offset, alloc.device, alloc)
        self.device = _DeviceRef(alloc.device)

    ndim = property(lambda self: len(self.shape))
    size = property(lambda self: int(math.prod(self.shape)))
    itemsize = property(lambda self: self.dtype.itemsize)
    nbytes = property(lambda self: self.size * self.dtype.itemsize)

    @property
    def flags(self):
        c = self.size == 0 or all(
            n == 1 or s == e for n, s, e in zip(self.shape, self.strides,
                                                _contiguous_strides(self.shape, self.itemsize)))
        fshape = self.shape[::-1]
        f = self.size == 0 or all(
            n == 1 or s == e for n, s, e in zip(fshape, self.strides[::-1],
                                                _contiguous_strides(fshape, self.itemsize)))
        return _Flags(c, f)

    @property
    def __cuda_array_interface__(self):
        return {"shape": self.shape, "typestr": self.dtype.str, "descr": self.dtype.descr,
                "data": (self.data.ptr, False), "version": 3,
                "strides": None if self.flags.c_contiguous else self.strides}

    def __len__(self):
        return self.shape[0]

    def __repr__(self):
        return (f"fake_cupy.ndarray(shape={self.shape}, dtype={self.dtype}, "
                f"strides={self.strides}, at={self._alloc.label(self.data.ptr)})")

    def __getitem__(self, key):
        if not isinstance(key, tuple):
            key = (key,)
        n_real = sum(1 for k in key if k is not None and k is not Ellipsis)
        if Ellipsis in key:
            i = key.index(Ellipsis)
            key = key[:i] + (slice(None),) * (self.ndim - n_real) + key[i + 1:]
        else:
            key = key + (slice(None),) * (self.ndim - n_real)
        shape, strides, offset, axis = [], [], self._offset, 0
        for k in key:
            if k is None:
                shape.append(1)
                strides.append(0)
                continue
            n, s = self.shape[axis], self.strides[axis]
            axis += 1
            if isinstance(k, slice):
                start, stop, step = k.indices(n)
                shape.append(len(range(start, stop, step)))
                strides.append(s * step)
                offset += start * s
            else:
                i = int(k)
                if i < 0:
                    i += n
                if not 0 <= i < n:
                    raise IndexError(f"index {k} out of range for an axis of {n}")
                offset += i * s
        return ndarray(self._alloc, shape, self.dtype, strides, offset)

    def __setitem__(self, key, value):
        self._alloc.world.writes.append((self[key].data.ptr, value))

    def get(self):
        raise RuntimeError("fake_cupy arrays hold no data (a device-to-host read)")

    def __array__(self, *args, **kwargs):
        raise RuntimeError("fake_cupy arrays hold no data (an implicit host conversion)")


ndarray.__module__ = "cupy"


# ---------------------------------------------------------------------------------------
# The world: allocations, devices, streams, kernels, launches


class _Stream:
    def __init__(self, ptr):
        self.ptr = ptr

    def is_capturing(self):
        return False


class _Function:
    def __init__(self, ptr):
        self.ptr = ptr


class FakeKernel:
    """What ``_compile.get_kernel`` returns: ``.kernel.ptr`` (a CUfunction), the settable
    ``max_dynamic_shared_size_bytes``, and a RawKernel-like call (the old launch layer)."""

    def __init__(self, world, filename, name, device, ptr):
        self.world, self.filename, self.name, self.device = world, filename, name, device
        self.kernel = _Function(ptr)
        self._max_shared = 0

    @property
    def max_dynamic_shared_size_bytes(self):
        return self._max_shared

    @max_dynamic_shared_size_bytes.setter
    def max_dynamic_shared_size_bytes(self, value):
        """cuFuncSetAttribute refuses more than the device's opt-in limit."""
        if value > SHARED_OPTIN[self.device]:
            raise self.world.module.cuda.driver.CUDADriverError(
                f"CUDA_ERROR_INVALID_VALUE: invalid argument (max dynamic shared memory "
                f"{value} > {SHARED_OPTIN[self.device]} on device {self.device})")
        self._max_shared = value

    def __call__(self, grid, block, args, *, shared_mem=0, stream=None,
                 enable_cooperative_groups=False):
        (record,) = args
        raw = np.asarray(record).tobytes()
        self.world.record_launch(self, tuple(grid), tuple(block), shared_mem,
                                 self.world.stream.ptr if stream is None else stream.ptr, raw)


class World:
    """All state of the fake: one per recording run."""

    def __init__(self):
        self.allocs = []           # every Allocation, in address order
        self.next_base = BASE0
        self.device_stack = [0]
        self.stream = _Stream(DEFAULT_STREAM)
        self.kernels = {}          # (filename, name, device) -> FakeKernel
        self.by_function = {}      # CUfunction -> FakeKernel
        self.launches = []         # raw launches of the current call
        self.writes = []           # (address, value) of __setitem__ calls
        self.call_index = 0
        self.host_roles = {}       # id(numpy array) -> (role, array)
        self.record_sizes = {}     # argv address -> struct size (new layer: Record.fill)
        self.second_sizes = {}     # argv address -> size of a second parameter (Record.second)
        self.queued = []           # (allocation, stream) of memsets not yet done
        self.non_blocking = set()  # handles of non-blocking cuda.Stream objects
        self.events = []           # allocation log of the current call: (ctor, nbytes)
        self.module = _build_module(self)

    # --- memory -------------------------------------------------------------------------
    def allocate(self, nbytes, ctor, role=None, zeroed=False) -> Allocation:
        base = self.next_base
        alloc = Allocation(self, base, int(nbytes), self.device, ctor, role, zeroed)
        self.allocs.append(alloc)
        self.next_base = -(-(base + max(int(nbytes), 1) + ALIGN) // ALIGN) * ALIGN
        self.events.append((ctor, int(nbytes)))
        return alloc

    def array(self, shape, dtype, role=None, ctor="empty", zeroed=False) -> ndarray:
        if isinstance(shape, (int, np.integer)):
            shape = (int(shape),)
        dtype = np.dtype(dtype)
        nbytes = int(math.prod(shape)) * dtype.itemsize
        return ndarray(self.allocate(nbytes, ctor, role, zeroed), shape, dtype)

    def find(self, address: int):
        """The allocation holding ``address`` (one past the end counts), or None."""
        if address < BASE0 or address >= self.next_base:
            return None
        lo, hi = 0, len(self.allocs)
        while lo < hi:
            mid = (lo + hi) // 2
            if self.allocs[mid].base <= address:
                lo = mid + 1
            else:
                hi = mid
        if lo == 0:
            return None
        alloc = self.allocs[lo - 1]
        return alloc if address <= alloc.base + alloc.size else None

    def name_host(self, array: np.ndarray, role: str) -> np.ndarray:
        """Give a NumPy array a role, for the device copies the library makes of it."""
        self.host_roles[id(array)] = (role, array)
        return array

    # --- devices ------------------------------------------------------------------------
    @property
    def device(self):
        return self.device_stack[-1]

    @contextlib.contextmanager
    def on(self, device):
        self.device_stack.append(device)
        try:
            yield
        finally:
            self.device_stack.pop()

    # --- kernels ------------------------------------------------------------------------
    def get_kernel(self, filename, name_expression, device_id):
        key = (filename, name_expression, device_id)
        kernel = self.kernels.get(key)
        if kernel is None:
            arch = "sm_" + ARCHS[device_id]
            if filename in ("flash_fwd_sm90.cu", "flash_bwd_sm90.cu") and arch != "sm_90":
                raise RuntimeError(f"{filename} asked for on {arch} (device {device_id})")
            ptr = 0x7000_0000 + 0x100 * len(self.kernels)
            kernel = self.kernels[key] = FakeKernel(self, filename, name_expression,
                                                    device_id, ptr)
            self.by_function[ptr] = kernel
        return kernel

    def launch_kernel(self, *args):
        """cupy.cuda.driver.launchKernel(f, gx, gy, gz, bx, by, bz, shared, stream, argv,
        extra): 11 positional arguments, as CuPy's. Another count (CuPy raises TypeError)
        is recorded as the launch's error, with the rest read as well as it can be."""
        error = None
        if len(args) != 11:
            error = (f"launchKernel() takes exactly 11 positional arguments "
                     f"({len(args)} given)")
        f, rest = args[0], args[1:]
        stream, argv = rest[-3], rest[-2]
        dims = rest[:-3]
        shared = dims[-1]
        block = dims[-4:-1]
        grid = dims[:-4]
        kernel = self.by_function[f]
        size = self.record_sizes.get(argv)
        if size is None:
            size = struct_of(kernel.name)[1].itemsize
            error = (error + "; " if error else "") + "argv not from Record.fill"
        address = ctypes.c_uint64.from_address(argv).value
        raw = ctypes.string_at(address, size)
        second = self.second_sizes.get(argv, 0)
        if second:
            second = ctypes.string_at(ctypes.c_uint64.from_address(argv + 8).value, second)
        self.record_launch(kernel, tuple(grid), tuple(block), shared, stream, raw, error,
                           second or None)

    def finish(self, stream: int) -> None:
        """The queued memsets of ``stream`` are done."""
        for alloc, on in self.queued:
            if on == stream:
                alloc.zeroed = True
        self.queued = [(a, on) for a, on in self.queued if on != stream]

    def record_launch(self, kernel, grid, block, shared, stream, raw, error=None, second=None):
        self.finish(stream)
        if stream not in self.non_blocking:
            self.finish(0)
        self.launches.append(dict(
            kernel=kernel, grid=grid, block=block, shared=int(shared), stream=int(stream),
            raw=raw, second=second, error=error, device=self.device,
            smem_ok=shared <= 48 * 1024 or kernel.max_dynamic_shared_size_bytes >= shared))

    # --- TMA ----------------------------------------------------------------------------
    def encode_tiled(self):
        return self._encode

    @staticmethod
    def _encode(addr, data_type, rank, ptr, dims, steps, box, elem, interleave, swizzle,
                l2, oob):
        """A fake cuTensorMapEncodeTiled: 16 words, the address first, each other word one
        small number of the arguments (so none looks like an address)."""
        dims, steps, box, elem = (list(x) for x in (dims, steps, box, elem))
        if ptr % 16 or any(s % 16 or not 0 < s < 2**40 for s in steps):
            return 1  # CUDA_ERROR_INVALID_VALUE
        code_elem = sum(e << (8 * i) for i, e in enumerate(elem))
        code_enum = interleave | swizzle << 8 | l2 << 16 | oob << 24
        words = [ptr, data_type, rank, *dims, *steps, *box, code_elem, code_enum]
        assert len(words) == 16
        ctypes.memmove(addr, np.array(words, np.uint64).tobytes(), 128)
        return 0

    # --- a call -------------------------------------------------------------------------
    def begin_call(self):
        self.call_index += 1
        self.launches, self.events, self.writes = [], [], []

    def finish_call(self, returned: dict):
        """The call's launches as JSON-able records, after naming its returned arrays."""
        for name, x in returned.items():
            if isinstance(x, ndarray) and x._alloc.role is None:
                x._alloc.role = name
        return [self.render(launch) for launch in self.launches]

    def render(self, launch) -> dict:
        kernel = launch["kernel"]
        kind, dtype = struct_of(kernel.name)
        raw = launch["raw"]
        error = launch["error"]
        if len(raw) != dtype.itemsize:
            error = (error + "; " if error else "") + \
                f"struct of {len(raw)} bytes, expected {dtype.itemsize}"
            raw = (raw + bytes(dtype.itemsize))[:dtype.itemsize]
        data = np.frombuffer(raw, np.uint8).copy()
        data[~padding_mask(dtype)] = 0
        words = data.view("<u8")
        normalised = {field_offset(dtype, f) // 8: f for f in NORMALISED.get(kind, ())}
        rendered, regions, scratch = [], {}, {}
        for i, w in enumerate(int(x) for x in words):
            if i in normalised:
                rendered.append("nz" if w else "0")
                if w:
                    scratch[normalised[i]] = w
                continue
            # Only a whole 8-byte field can hold an address (two int32 fields may add up to
            # one by chance).
            whole = any(off == 8 * i and size == 8 for _, off, size, _ in fields_in_word(dtype, i))
            alloc = self.find(w) if whole else None
            if alloc is None:
                rendered.append(format(w, "x"))
            else:
                label = alloc.label(w)
                if alloc.device != kernel.device:
                    label += f"@dev{alloc.device}"
                rendered.append("@" + label)
        # Each scratch pointer's region: up to the next scratch pointer of the launch in the
        # same allocation, or to the allocation's end.
        details = {}
        for field, address in scratch.items():
            alloc = self.find(address)
            if alloc is None:
                regions[field] = -1
                details[field] = None
                continue
            end = alloc.base + alloc.size
            for other, a2 in scratch.items():
                if other != field and address < a2 <= end and self.find(a2) is alloc:
                    end = a2
            regions[field] = end - address
            details[field] = (alloc, address - alloc.base)
        pad3 = lambda t: [int(x) for x in (tuple(t) + (1, 1, 1))[:3]]  # noqa: E731
        record = {"file": kernel.filename, "name": kernel.name, "grid": pad3(launch["grid"]),
                  "block": pad3(launch["block"]), "shared": launch["shared"],
                  "smem_attr_ok": bool(launch["smem_ok"]),
                  "on_device": launch["device"] == kernel.device,
                  "stream": launch["stream"], "params": " ".join(rendered)}
        if error:
            record["error"] = error
        if regions:
            record["regions"] = regions
        record["_scratch"] = details  # not stored: for the new layer's scratch checks
        return record


def _build_module(world: World):
    """The fake ``cupy`` package (and its cuda submodules) bound to ``world``."""
    cupy = types.ModuleType("cupy")
    cuda = types.ModuleType("cupy.cuda")
    runtime = types.ModuleType("cupy.cuda.runtime")
    driver = types.ModuleType("cupy.cuda.driver")
    compiler = types.ModuleType("cupy.cuda.compiler")
    cupy.cuda, cuda.runtime, cuda.driver, cuda.compiler = cuda, runtime, driver, compiler
    cupy.__fake__ = world
    cupy.ndarray = ndarray

    def _shape(shape):
        return (int(shape),) if isinstance(shape, (int, np.integer)) else tuple(shape)

    def empty(shape, dtype=np.float32, order="C"):
        return world.array(_shape(shape), dtype)

    def zeros(shape, dtype=np.float32, order="C"):
        return world.array(_shape(shape), dtype, ctor="zeros", zeroed=True)

    def full(shape, fill_value, dtype=None, order="C"):
        return world.array(_shape(shape), dtype or np.float32, ctor=f"full({fill_value})")

    def _copy(x, ctor):
        if isinstance(x, np.ndarray):
            role = world.host_roles.get(id(x), (None,))[0]
            out = world.array(x.shape, x.dtype, ctor=f"h2d:{ctor}")
            out._alloc.role = f"h2d({role})"
            return out
        out = world.array(x.shape, x.dtype, ctor=ctor)
        src, address = x._alloc, x.data.ptr
        out._alloc.derive = lambda: f"copy({src.label(address)})"
        return out

    def ascontiguousarray(x, dtype=None):
        assert dtype is None or np.dtype(dtype) == x.dtype
        if isinstance(x, ndarray) and x.flags.c_contiguous:
            return x
        return _copy(x, "ascontiguousarray")

    def asarray(x, dtype=None, order=None):
        assert dtype is None or np.dtype(dtype) == x.dtype
        return x if isinstance(x, ndarray) else _copy(x, "asarray")

    def array(x, dtype=None, copy=True, order="K", ndmin=0):
        assert dtype is None or np.dtype(dtype) == x.dtype
        if isinstance(x, ndarray) and not copy:
            return x
        return _copy(x, "array")

    def stack(arrays, axis=0):
        assert axis == 0
        arrays = list(arrays)
        out = world.array((len(arrays), *arrays[0].shape), arrays[0].dtype, ctor="stack")
        srcs = [(a._alloc, a.data.ptr) for a in arrays]
        out._alloc.derive = lambda: "stack(" + ",".join(s.label(p) for s, p in srcs) + ")"
        return out

    def broadcast_to(x, shape):
        shape = _shape(shape)
        lead = len(shape) - x.ndim
        strides = [0] * lead
        for n, (m, s) in zip(shape[lead:], zip(x.shape, x.strides)):
            if m == n:
                strides.append(s)
            elif m == 1:
                strides.append(0)
            else:
                raise ValueError(f"cannot broadcast {x.shape} to {shape}")
        return ndarray(x._alloc, shape, x.dtype, strides, x._offset)

    def unavailable(*args, **kwargs):
        raise RuntimeError("not available in fake_cupy")

    for fn in (empty, zeros, full, ascontiguousarray, asarray, array, stack, broadcast_to):
        setattr(cupy, fn.__name__, fn)
    cupy.from_dlpack = cupy.RawModule = cupy.RawKernel = unavailable
    cupy.get_default_memory_pool = unavailable

    class Device:
        def __init__(self, device=None):
            self.id = world.device if device is None else int(device)

        @property
        def compute_capability(self):
            return ARCHS[self.id]

        def __enter__(self):
            world.device_stack.append(self.id)
            return self

        def __exit__(self, *exc):
            world.device_stack.pop()

        def use(self):
            world.device_stack[-1] = self.id

    cuda.Device = Device
    cuda.get_current_stream = lambda *a: world.stream
    cuda.get_cuda_path = lambda: "/nonexistent-cuda"

    class CompileException(Exception):
        pass

    compiler.CompileException = CompileException

    runtime.cudaDevAttrMultiProcessorCount = 16
    runtime.cudaDevAttrMaxSharedMemoryPerBlockOptin = 97
    runtime.getDevice = lambda: world.device
    runtime.getDeviceCount = lambda: len(ARCHS)

    def device_get_attribute(attr, device):
        if attr == runtime.cudaDevAttrMultiProcessorCount:
            return SM_COUNT
        if attr == runtime.cudaDevAttrMaxSharedMemoryPerBlockOptin:
            return SHARED_OPTIN[device]
        raise RuntimeError(f"fake_cupy: device attribute {attr}")

    def malloc(nbytes):
        return world.allocate(nbytes, "malloc").base

    def memset_async(ptr, value, nbytes, stream):
        alloc = world.find(ptr)
        assert alloc is not None and ptr + nbytes <= alloc.base + alloc.size
        if value == 0 and ptr == alloc.base and nbytes == alloc.size:
            world.queued.append((alloc, stream))

    def memset(ptr, value, nbytes):
        memset_async(ptr, value, nbytes, 0)

    class Stream:
        def __init__(self, null=False, non_blocking=False, ptds=False):
            self.ptr = id(self)
            if non_blocking:
                world.non_blocking.add(self.ptr)

        def synchronize(self):
            world.finish(self.ptr)

        def is_capturing(self):
            return False

    cuda.Stream = Stream

    class CUDADriverError(RuntimeError):
        pass

    runtime.deviceGetAttribute = device_get_attribute
    runtime.malloc = malloc
    runtime.memset = memset
    runtime.memsetAsync = memset_async
    driver.CUDADriverError = CUDADriverError
    runtime.free = lambda ptr: None
    runtime.memGetInfo = lambda: (80 << 30, 80 << 30)
    driver.launchKernel = world.launch_kernel
    return cupy


_SUBMODULES = ("cupy", "cupy.cuda", "cupy.cuda.runtime", "cupy.cuda.driver",
               "cupy.cuda.compiler")


@contextlib.contextmanager
def installed(world: World):
    """``world``'s fake cupy in sys.modules (the real one, if imported, put back after),
    and cuflash's kernel compiler, TMA encoder and (new layer) Record.fill patched to it.
    Import cuflash inside the block or before: it imports CuPy lazily."""
    saved = {name: sys.modules.get(name) for name in _SUBMODULES}
    cupy = world.module
    sys.modules.update({"cupy": cupy, "cupy.cuda": cupy.cuda,
                        "cupy.cuda.runtime": cupy.cuda.runtime,
                        "cupy.cuda.driver": cupy.cuda.driver,
                        "cupy.cuda.compiler": cupy.cuda.compiler})
    from cuflash import _compile, _tma
    patches = [(_compile, "get_kernel", world.get_kernel),
               (_tma, "_encode_tiled", world.encode_tiled)]
    try:
        from cuflash import _core
    except ImportError:
        _core = None
    if _core is not None:
        real_fill = _core.Record.fill

        def fill(record, *args, **kwargs):
            argv = real_fill(record, *args, **kwargs)
            world.record_sizes[argv] = record.bytes.nbytes
            world.second_sizes[argv] = record.second
            return argv

        patches.append((_core.Record, "fill", fill))
    old = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
    for obj, name, value in patches:
        setattr(obj, name, value)
    try:
        yield cupy
    finally:
        for obj, name, value in old:
            setattr(obj, name, value)
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


BF16 = np.dtype(ml_dtypes.bfloat16)
