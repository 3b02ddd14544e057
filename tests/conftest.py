"""GPU tests carry the marker `gpu` and are skipped cleanly where there is no CUDA GPU (the hook
lives in tests/gpu.py, shared with bench/conftest.py). ``rng``: a generator per test;
``launched``: the (filename, name expression) of every kernel the test launches."""
import os
import sys
import zlib

import numpy as np
import pytest

from gpu import launches
from gpu import pytest_collection_modifyitems  # noqa: F401 (a pytest hook: skips `gpu` items)

# JAX's GPU backend takes 75% of the GPU's memory when it starts, in every process that
# starts it: a second pytest-xdist worker running a JAX test, and CuPy in all of them,
# would be out of memory.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


@pytest.fixture
def rng(request):
    """Seeded by the test's id: reproducible, and different for every test."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(autouse=True)
def _release_device_memory(request):
    """After a GPU test, CuPy's pool hands its free blocks back to the device: the float64
    reference of a large test holds gigabytes at its peak, and each pytest-xdist worker
    would otherwise keep its own peak for the rest of the run."""
    yield
    cupy = sys.modules.get("cupy")
    if cupy is not None and request.node.get_closest_marker("gpu"):
        cupy.get_default_memory_pool().free_all_blocks()


@pytest.fixture
def launched():
    """(filename, name expression) of every kernel launched through _core.Kernel."""
    with launches() as calls:
        yield calls
