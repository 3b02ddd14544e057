"""cuflash inside JAX: ``jax.jit``, ``jax.grad`` and ``jax.vmap`` over cuflash's attention.

Import it explicitly (``import cuflash.jax as fj``); ``import cuflash`` never imports JAX.
Needs ``jax >= 0.6.1``.

Mechanism. Every function stages one custom call per kernel call, to the XLA FFI target
``cuflash_call`` whose handler is a Python function (``cuflash.jax._ffi``): XLA allocates
the results and, when the compiled program runs, hands the handler its input and output
buffers (and, on the GPU, its compute stream). The handler runs cuflash's public functions
on those buffers with ``out=`` / ``lse=`` / ``dq=``... set to XLA's outputs. (Not
``jax.experimental.buffer_callback``, the first route: it hands its callback Python
objects whose addresses cost a DLPack capsule each, and a program with host callbacks
leaves jit's C++ dispatch; the handler reads the call frame's raw fields instead.)

- CPU: the buffers are host memory, wrapped as NumPy arrays (no copies); the NumPy backend
  runs the same tiled algorithm as the kernels. This is what CI tests.
- GPU: the buffers are wrapped as CuPy arrays over XLA's device pointers (no copies) and the
  kernels are queued on XLA's stream (``cupy.cuda.ExternalStream``): nothing is copied and
  nothing waits on the host. Launches are memoized by layout. The dense forward and
  backward go further: from the second call of a compiled program on, they pass the
  buffers' addresses straight to the memoized launch, without CuPy arrays or checks that
  the first call already made (``_binding._callback``); the backward's scratch is then a
  workspace that XLA allocates as an extra result of the call.

Gradients: ``attention`` and ``attention_varlen`` are ``jax.custom_vjp`` functions whose
forward keeps ``out`` and ``lse`` and whose backward is cuflash's recompute backward
(``deterministic=True`` makes it bitwise reproducible). A cotangent of ``lse`` (when
``return_lse=True`` and the loss uses it, as in ring attention) is exact too: see
:func:`_augmented_backward`. ``merge_attention`` has its own (closed-form) backward;
``attention_with_kvcache`` (decoding) has none.

vmap: the callbacks use ``vmap_method="broadcast_all"``, the only method that is both
correct for every input and a single launch: every input reaches the callback with the same
leading vmapped axes (unbatched ones broadcast by XLA), which the dense functions fold into
the batch axis, a reshape of XLA's row-major buffers (one launch for the whole vmapped
batch); the varlen, kvcache and merge callbacks loop over the leading axes with zero-copy
views. "sequential" would also be correct but stages an XLA loop of callbacks with a slice
copy per step; "expand_dims" leaves size-1 axes on unbatched inputs, which cannot be folded
into a batch axis without a copy either.

Options are static (Python values: use ``functools.partial`` or ``static_argnames`` when
jitting a function that takes them as arguments); arrays are traced.

Every function also runs per device inside ``jax.shard_map`` (see :func:`_vary_like`), and
``ring_attention`` (cuflash/jax/ring.py) splits one sequence over the devices of a mesh
axis.
"""
from ._binding import attention, attention_varlen, attention_with_kvcache, merge_attention
from .ring import from_zigzag, ring_attention, to_zigzag, zigzag_positions

__all__ = ["attention", "attention_varlen", "attention_with_kvcache", "merge_attention",
           "ring_attention", "to_zigzag", "from_zigzag", "zigzag_positions"]
