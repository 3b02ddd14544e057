"""What the public modules share: memoized GPU calls and the caller's output arrays."""
from __future__ import annotations

from typing import Any, Optional, Tuple, Union

from . import _checks

# The public functions' types: an array is a numpy.ndarray, a cupy.ndarray or any CUDA array
# with __dlpack__ (JAX, PyTorch, ...); results are of the inputs' kind (CuPy for DLPack).
Array = Any
Window = Tuple[Optional[int], Optional[int]]
OutLse = Tuple[Array, Array]
Grads = Tuple[Array, Array, Array]
Lengths = Union[int, Array]

# Memoized GPU calls: the layout of a call (every array's type, shape, strides, dtype and
# device, and the options) -> its validated launch, so that a repeated call skips the
# checks and the plan lookup. Only CuPy arrays have such a key (anything else takes the
# full path); values are never part of it, so only calls whose checks read none are kept.
CALLS = {}
MAX_CALLS = 4096


# What a lookup of a call that has no memoized launch raises: not yet seen, an unhashable
# option, or an array that is not CuPy's (NumPy's ``.data`` is a buffer without a device,
# and no buffer at all for bfloat16).
MISS = (KeyError, TypeError, AttributeError, ValueError)


def meta(x):
    """The layout of a CuPy array (one of MISS for other kinds), or None."""
    return None if x is None else (type(x), x.shape, x.strides, x.dtype, x.data.device_id)


def remember(key, call) -> None:
    """Memoize ``call`` under ``key``; a key with an unhashable option (a list ``window``)
    is not kept, and such calls take the full path every time."""
    if len(CALLS) >= MAX_CALLS:
        CALLS.clear()
    try:
        CALLS[key] = call
    except TypeError:
        pass


def disjoint(names: tuple, args: tuple, outputs: tuple) -> None:
    """The caller's outputs share no memory with the inputs (``names``: the inputs' names,
    then the outputs')."""
    if any(x is not None for x in outputs):
        _checks.check_disjoint(dict(zip(names[len(args):], outputs)), dict(zip(names, args)))


class OnDevice:
    """A memoized GPU launch: the checks that no array the call writes shares memory with
    another, then the launch with the arrays' device current (CuPy allocates, and picks the
    stream, on the current device).

    ``arrays`` are the first call's inputs and outputs; ``written`` the indices of those the
    call writes (the caller's outputs, appended caches). Their extents are measured once
    (the layout is the memo's key), so a call compares address ranges only; ranges that
    meet go to ``check(args, outputs)``, the exact test that raises naming the arrays.
    """
    __slots__ = ("launch", "device", "check", "written", "extents")

    def __init__(self, launch, device, check, arrays, written):
        self.launch, self.device, self.check = launch, device, check
        self.written = tuple(i for i in written if arrays[i] is not None)
        self.extents = tuple(None if x is None or isinstance(x, int) else _checks.extent(x)
                             for x in arrays)

    def __call__(self, args: tuple, outputs: tuple):
        """``launch(*args, *outputs)``; ``outputs`` are the caller's (None: allocate)."""
        import cupy
        if self.written and self._ranges_meet(args + outputs):
            self.check(args, outputs)
        if cupy.cuda.runtime.getDevice() == self.device:
            return self.launch(*args, *outputs)
        with cupy.cuda.Device(self.device):
            return self.launch(*args, *outputs)

    def _ranges_meet(self, arrays) -> bool:
        spans = [None if e is None else (x.data.ptr + e[0], x.data.ptr + e[1])
                 for x, e in zip(arrays, self.extents)]
        for i in self.written:
            if spans[i] is None:
                continue
            low, high = spans[i]
            for j, span in enumerate(spans):
                if j != i and span is not None and low <= span[1] and span[0] <= high:
                    return True
        return False


def contiguous_strides(shape, itemsize):
    strides, step = [], itemsize
    for n in reversed(shape):
        strides.append(step)
        step *= max(n, 1)
    return tuple(reversed(strides))


def fill(results, outputs, values):
    """Write ``values`` (constants) into the given ``outputs`` or new arrays like
    ``results`` describes: (shape, dtype, xp) per output."""
    filled = []
    for (shape, dtype, xp), given, value in zip(results, outputs, values):
        if given is None:
            given = xp.full(shape, value, dtype)
        else:
            given[...] = value
        filled.append(given)
    return tuple(filled)


def into(results, outputs):
    """``results`` of the CPU backend, copied into the caller's outputs where given."""
    final = []
    for result, given in zip(results, outputs):
        if given is not None:
            given[...] = result
            result = given
        final.append(result)
    return tuple(final)
