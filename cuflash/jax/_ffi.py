"""One XLA FFI target, ``cuflash_call``, whose handler is a Python function (through ctypes)
that runs the callback an attribute names, on XLA's buffers and stream.

Why not ``jax.experimental.buffer_callback`` (the first route): its callback gets a Python
object per buffer whose address costs a DLPack capsule to read, and it registers a host
callback, which takes the compiled program off jit's C++ dispatch. On an H200 the two
dispatch routes cost the same for a no-op (bench/ffi_probe.py); what the handler saves is
its own per-call work, which put cuflash.jax's small calls under JAX cuDNN's time.

The handler reads the call frame of the FFI's C API (``xla/ffi/api/c_api.h``; the fields
below are those the API has kept at fixed offsets since its version 0.1): the input and
output buffers (dtype, address, shape), the ``slot`` attribute (the index of the callback
in :data:`_SLOTS`) and, on the GPU, the stream (``XLA_FFI_Stream_Get``). An exception in
the callback becomes an XLA error carrying its type and message
(``XLA_FFI_Error_Create``), which JAX raises.
"""
from __future__ import annotations

import ctypes
import functools
import struct
import threading
from typing import NamedTuple

import jax
import numpy as np

TARGET = "cuflash_call"

# XLA_FFI_DataType -> NumPy.
_DTYPES = {1: np.dtype(np.bool_), 2: np.dtype(np.int8), 3: np.dtype(np.int16),
           4: np.dtype(np.int32), 5: np.dtype(np.int64), 6: np.dtype(np.uint8),
           7: np.dtype(np.uint16), 8: np.dtype(np.uint32), 9: np.dtype(np.uint64),
           10: np.dtype(np.float16), 11: np.dtype(np.float32), 12: np.dtype(np.float64),
           16: np.dtype(jax.numpy.bfloat16)}

# XLA_FFI_CallFrame: struct_size, extension_start, api, ctx, stage (int, padded); then
# XLA_FFI_Args and XLA_FFI_Rets (struct_size, extension_start, size, types, pointers) and
# XLA_FFI_Attrs (the same with names before the pointers); the fields after them vary.
_FRAME = struct.Struct("<QQQQi4x" "QQqQQ" "QQqQQ" "QQqQQQ")
# XLA_FFI_Buffer: struct_size, extension_start, dtype (int, padded), data, rank, dims; read
# from its dtype on.
_BUFFER = struct.Struct("<i4xQqQ")
_BUFFER_DTYPE_OFFSET = 16
_DIMS = tuple(struct.Struct(f"<{rank}q") for rank in range(9))  # by rank: the usual ones
_EXECUTE = 3                   # XLA_FFI_ExecutionStage_EXECUTE
_METADATA = 1                  # XLA_FFI_Extension_Metadata
_API_VERSION_OFFSET = 32       # XLA_FFI_Api: struct_size, extension, then api_version's
_ERROR_CREATE_OFFSET = 48      # struct_size, extension, major, minor; internal_api; then
_STREAM_GET_OFFSET = 80        # the functions: Error_Create, GetMessage, Destroy,
                               # Handler_Register, Stream_Get
_INTERNAL = 13                 # XLA_FFI_Error_Code_INTERNAL

_Function = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p)
# XLA's API functions, called with the GIL held: they return at once.
_ApiFunction = ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p)
_StreamGetArgs = ctypes.c_uint64 * 4  # struct_size, extension_start, ctx, stream (out)

# The process's memory as one byte view, read at XLA's addresses with struct.unpack_from:
# 4x cheaper than a ctypes call per read, which the handler makes some 30 of a call. Making
# the view touches no memory.
_MEMORY = memoryview((ctypes.c_char * ((1 << 63) - 1)).from_address(0)).cast("B")
_POINTER = struct.Struct("<Q")


class Buffer(NamedTuple):
    """One of XLA's buffers as the handler sees it: address (0 when empty), dtype, shape."""
    ptr: int
    dtype: np.dtype
    shape: tuple


# Callbacks by slot: ``callback(stream, rets, args)`` with ``stream`` XLA's CUDA stream (None
# on the CPU) and ``rets``/``args`` the call's output and input buffers as (address of
# XLA's array of buffer pointers, count), which :func:`describe` and :func:`buffers` read.
# A slot is never reused: compiled programs name it.
_SLOTS: list = []
_SLOT_OF: dict = {}
_LOCK = threading.Lock()


def slot(callback) -> int:
    """The slot of ``callback`` (equal callbacks share one, so that eager calls, which
    compile once per distinct attribute, reuse their executable)."""
    with _LOCK:
        found = _SLOT_OF.get(callback)
        if found is None:
            found = _SLOT_OF[callback] = len(_SLOTS)
            _SLOTS.append(callback)
        return found


@functools.lru_cache(maxsize=None)
def _int64s(count: int) -> struct.Struct:
    return struct.Struct(f"<{count}q")


def _dims(rank: int) -> struct.Struct:
    return _DIMS[rank] if rank < len(_DIMS) else _int64s(rank)


def describe(array: tuple) -> tuple:
    """(data addresses, signature) of the buffers ``array`` (pointer, count), read with two
    struct reads a buffer: the signature, a tuple of (XLA dtype code, shape) per buffer, is
    what a compiled program fixes for every call."""
    pointers, count = array
    found, signature = [], []
    for p in _int64s(count).unpack_from(_MEMORY, pointers):
        code, data, rank, dims = _BUFFER.unpack_from(_MEMORY, p + _BUFFER_DTYPE_OFFSET)
        found.append(data)
        signature.append((code, _dims(rank).unpack_from(_MEMORY, dims)))
    return found, tuple(signature)


_tuple = tuple.__new__  # a NamedTuple without its Python-level __new__


def buffers(array: tuple) -> list:
    """The buffers ``array`` (pointer, count) as :class:`Buffer`\\ s."""
    out = []
    for p in _int64s(array[1]).unpack_from(_MEMORY, array[0]):
        code, data, rank, dims = _BUFFER.unpack_from(_MEMORY, p + _BUFFER_DTYPE_OFFSET)
        dtype = _DTYPES.get(code)
        if dtype is None:
            raise TypeError(f"{TARGET}: XLA dtype {code} (XLA_FFI_DataType) is not one "
                            f"cuflash takes")
        out.append(_tuple(Buffer, (data, dtype, _dims(rank).unpack_from(_MEMORY, dims))))
    return out


def _slot_attribute(attrs: int, count: int) -> int:
    """The value of the single scalar attribute: an XLA_FFI_Scalar (dtype, value*)."""
    if count != 1:
        raise ValueError(f"{TARGET} takes one attribute (slot), got {count}")
    scalar, = _POINTER.unpack_from(_MEMORY, attrs)
    value, = _POINTER.unpack_from(_MEMORY, scalar + 8)
    return _POINTER.unpack_from(_MEMORY, value)[0]


@functools.lru_cache(maxsize=None)
def _function(api: int, offset: int):
    return _ApiFunction(ctypes.c_void_p.from_address(api + offset).value)


def _metadata(api: int, extension: int) -> None:
    """Answer XLA's metadata query (registration): the API version XLA itself reports (0.1,
    the first, where it passes no API, as jaxlib 0.6 does) and no traits (in particular
    not command-buffer compatible: the handler is Python)."""
    metadata = ctypes.c_void_p.from_address(extension + 24).value
    version = (ctypes.string_at(api + _API_VERSION_OFFSET, 8) if api
               else struct.pack("<ii", 0, 1))
    ctypes.memmove(metadata + 24, version, 8)       # XLA_FFI_Metadata.api_version.major/minor
    ctypes.c_uint32.from_address(metadata + 32).value = 0  # .traits


def _stream(api: int, ctx: int) -> int:
    args = _StreamGetArgs(32, 0, ctx, 0)  # a call's own: XLA's threads call the handler
    if _function(api, _STREAM_GET_OFFSET)(ctypes.addressof(args)):
        raise RuntimeError(f"{TARGET}: XLA_FFI_Stream_Get failed")
    return args[3]


def _error(api: int, message: str) -> int:
    text = ctypes.create_string_buffer(message.encode("utf-8", "replace"))
    args = ctypes.create_string_buffer(
        struct.pack("<QQQi4x", 32, 0, ctypes.addressof(text), _INTERNAL), 32)
    return _function(api, _ERROR_CREATE_OFFSET)(ctypes.addressof(args))


def _handler(gpu: bool):
    def handle(frame):
        # Nothing may raise out of here into XLA's C++ (ctypes would hand it a garbage
        # pointer): every exception becomes an XLA error, or where there is no API to
        # create one with (the metadata query), is dropped.
        api = 0
        try:
            (_, extension, api, ctx, stage, _, _, n_args, _, args, _, _, n_rets, _, rets,
             _, _, n_attrs, _, _, attrs) = _FRAME.unpack_from(_MEMORY, frame)
            if extension and struct.unpack_from("<i", _MEMORY, extension + 8)[0] == _METADATA:
                _metadata(api, extension)
                return None
            if stage != _EXECUTE:
                return None
            callback = _SLOTS[_slot_attribute(attrs, n_attrs)]
            callback(_stream(api, ctx) if gpu else None, (rets, n_rets), (args, n_args))
            return None
        except BaseException as e:  # noqa: BLE001
            try:
                message = f"{type(e).__name__}: {e}"
            except BaseException:  # noqa: BLE001 - an exception whose str() raises
                message = type(e).__name__
            try:
                return _error(api, message) if api else None
            except BaseException:  # noqa: BLE001
                return None
    return _Function(handle)


_HANDLERS = {"cpu": _handler(gpu=False), "CUDA": _handler(gpu=True)}
for _platform, _handle in _HANDLERS.items():
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(_handle), platform=_platform)


def call(callback, results, args, *, vmap_method, aliases=None):
    """Stage ``callback`` on ``args`` (arrays): a custom call of :data:`TARGET` returning
    ``results`` (``jax.ShapeDtypeStruct``\\ s), with ``aliases`` {input: output}."""
    return jax.ffi.ffi_call(TARGET, results, vmap_method=vmap_method,
                            input_output_aliases=aliases)(*args,
                                                          slot=np.uint64(slot(callback)))
