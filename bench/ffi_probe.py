"""Per-call cost of a jitted JAX call on the GPU by how it reaches Python: a plain jitted op,
an XLA FFI target whose handler is a ctypes function (cuflash.jax's route), a no-op
``jax.experimental.buffer_callback`` (the route before it), JAX's cuDNN attention and
cuflash.jax's forward, at a small causal shape. Each: 2000 calls back to back, then one
synchronisation; the median of 5 runs.

    PYTHONPATH=. python3 bench/ffi_probe.py          # on a GPU with a CUDA build of JAX
"""
from __future__ import annotations

import argparse
import ctypes
import os
import struct
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

_FRAME_HEAD = struct.Struct("<QQQQi")  # XLA_FFI_CallFrame: size, extension, api, ctx, stage


def _noop_target(jax):
    """Registers "probe_noop": reads XLA's stream as cuflash.jax's handler does, no work."""
    handler_type = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p)
    api_function = ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p)

    def handle(frame):
        _, extension, api, ctx, _ = _FRAME_HEAD.unpack(ctypes.string_at(frame, 36))
        if extension:  # the metadata query: XLA's own API version, no traits
            metadata = ctypes.c_void_p.from_address(extension + 24).value
            ctypes.memmove(metadata + 24, ctypes.string_at(api + 32, 8) if api
                           else struct.pack("<ii", 0, 1), 8)
            ctypes.c_uint32.from_address(metadata + 32).value = 0
            return None
        args = ctypes.create_string_buffer(struct.pack("<QQQQ", 32, 0, ctx, 0), 32)
        api_function(ctypes.c_void_p.from_address(api + 80).value)(ctypes.addressof(args))
        return None
    handle = handler_type(handle)
    jax.ffi.register_ffi_target("probe_noop", jax.ffi.pycapsule(handle), platform="CUDA")
    return handle


def time_per_call(jax, name, fn, *args, calls=2000, runs=5):
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        for _ in range(calls):
            result = fn(*args)
        jax.block_until_ready(result)
        times.append((time.perf_counter() - start) / calls * 1e6)
    times.sort()
    print(f"{name:28s} median {times[runs // 2]:6.1f} us/call  min {times[0]:6.1f}", flush=True)


def main(argv=None) -> int:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args(argv)
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.experimental.buffer_callback import buffer_callback
    keep = _noop_target(jax)  # noqa: F841 (the handler must outlive the calls)
    x = jnp.ones((4, 8), jnp.float32)
    shape = jax.ShapeDtypeStruct(x.shape, x.dtype)
    time_per_call(jax, "x + 1", jax.jit(lambda x: x + 1), x)
    time_per_call(jax, "FFI ctypes no-op", jax.jit(
        lambda x: jax.ffi.ffi_call("probe_noop", shape)(x, slot=np.uint64(0))), x)
    time_per_call(jax, "buffer_callback no-op", jax.jit(
        lambda x: buffer_callback(lambda ctx, out, x: None, shape)(x)), x)
    q = jnp.ones((1, 128, 8, 64), jnp.bfloat16)
    time_per_call(jax, "cuDNN fwd 1x128x8x64", jax.jit(lambda q: jax.nn.dot_product_attention(
        q, q, q, is_causal=True, implementation="cudnn")), q)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import cuflash.jax as fj
    time_per_call(jax, "cuflash.jax fwd 1x128x8x64",
                  jax.jit(lambda q: fj.attention(q, q, q, causal=True)), q)
    return 0


if __name__ == "__main__":
    sys.exit(main())
