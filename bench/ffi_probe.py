"""Per-call cost of a jitted JAX call on the GPU by how it reaches Python: a plain jitted op,
cuflash.jax's FFI target (``cuflash.jax._ffi``) with a callback that does nothing, a no-op
``jax.experimental.buffer_callback`` (the route before it), JAX's cuDNN attention and
cuflash.jax's forward, at a small causal shape. Each: 2000 calls back to back, then one
synchronisation; the median of 5 runs.

    PYTHONPATH=. python3 bench/ffi_probe.py          # on a GPU with a CUDA build of JAX
"""
from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


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
    from jax.experimental.buffer_callback import buffer_callback
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import cuflash.jax as fj
    from cuflash.jax import _ffi
    x = jnp.ones((4, 8), jnp.float32)
    shape = jax.ShapeDtypeStruct(x.shape, x.dtype)
    time_per_call(jax, "x + 1", jax.jit(lambda x: x + 1), x)
    time_per_call(jax, "cuflash_call no-op", jax.jit(lambda x: _ffi.call(
        lambda stream, outs, ins: None, shape, (x,), vmap_method=None)), x)
    time_per_call(jax, "buffer_callback no-op", jax.jit(
        lambda x: buffer_callback(lambda ctx, out, x: None, shape)(x)), x)
    q = jnp.ones((1, 128, 8, 64), jnp.bfloat16)
    time_per_call(jax, "cuDNN fwd 1x128x8x64", jax.jit(lambda q: jax.nn.dot_product_attention(
        q, q, q, is_causal=True, implementation="cudnn")), q)
    time_per_call(jax, "cuflash.jax fwd 1x128x8x64",
                  jax.jit(lambda q: fj.attention(q, q, q, causal=True)), q)
    return 0


if __name__ == "__main__":
    sys.exit(main())
