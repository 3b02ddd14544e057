"""The benchmarks need a GPU: skip items marked `gpu` without one, with the hook of
tests/conftest.py (tests/gpu.py). The `gpu` marker itself is registered in pyproject.toml."""
import os
import sys

sys.path.append(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from gpu import pytest_collection_modifyitems  # noqa: E402,F401 (a pytest hook)
