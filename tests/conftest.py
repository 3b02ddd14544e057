"""GPU tests carry the marker `gpu` and are skipped cleanly where there is no CUDA GPU (the hook
lives in tests/gpu.py, shared with bench/conftest.py). ``rng``: a generator per test."""
import zlib

import numpy as np
import pytest

from gpu import pytest_collection_modifyitems  # noqa: F401 (a pytest hook: skips `gpu` items)


@pytest.fixture
def rng(request):
    """Seeded by the test's id: reproducible, and different for every test."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))
