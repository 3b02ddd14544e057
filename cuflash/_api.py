"""What the public modules share: memoized GPU calls and the caller's output arrays."""
from __future__ import annotations

from . import _checks

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


def remember(key, call):
    if len(CALLS) >= MAX_CALLS:
        CALLS.clear()
    CALLS[key] = call
    return call


def disjoint(names: tuple, args: tuple, outputs: tuple) -> None:
    """The caller's outputs share no memory with the inputs (``names``: the inputs' names,
    then the outputs')."""
    if any(x is not None for x in outputs):
        _checks.check_disjoint(dict(zip(names[len(args):], outputs)), dict(zip(names, args)))


class OnDevice:
    """A GPU launch run with its arrays' device current (CuPy allocates, and picks the
    stream, on the current device)."""
    __slots__ = ("launch", "device", "names")

    def __init__(self, launch, device, names):
        self.launch, self.device, self.names = launch, device, names

    def __call__(self, args: tuple, outputs: tuple):
        """``launch(*args, *outputs)``; ``outputs`` are the caller's (None: allocate)."""
        import cupy
        disjoint(self.names, args, outputs)
        if cupy.cuda.runtime.getDevice() == self.device:
            return self.launch(*args, *outputs)
        with cupy.cuda.Device(self.device):
            return self.launch(*args, *outputs)


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
