"""What an install carries: one version, and the CUDA headers NVRTC needs found in either
layout of NVIDIA's wheels (CUDA 13: one nvidia/cu13 root; CUDA 12: a directory per
component, for which CuPy reports no CUDA root)."""
from __future__ import annotations

import importlib.metadata
import os
import sys
from pathlib import Path

import pytest

import cuflash
from cuflash import _compile

ROOT = Path(__file__).resolve().parent.parent


def test_version_is_written_once():
    text = (ROOT / "pyproject.toml").read_text()
    if sys.version_info >= (3, 11):
        import tomllib
        meta = tomllib.loads(text)
        assert "version" not in meta["project"]
        assert meta["project"]["dynamic"] == ["version"]
        assert meta["tool"]["setuptools"]["dynamic"]["version"] == {
            "attr": "cuflash.__version__"}
    try:
        installed = importlib.metadata.version("cuflash")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("cuflash is not installed (PYTHONPATH run)")
    assert installed == cuflash.__version__


@pytest.fixture
def include_cache():
    _compile._cuda_include.cache_clear()
    yield
    _compile._cuda_include.cache_clear()


def test_cuda_headers_are_found(include_cache):
    pytest.importorskip("cupy")
    include = _compile._cuda_include()
    for header in ("cuda_fp16.h", "cuda_bf16.h", "vector_types.h"):
        assert os.path.isfile(os.path.join(include, header)), header


def test_cuda_headers_without_a_cuda_root(include_cache, monkeypatch):
    """The CUDA 12 wheels' layout: CuPy's get_cuda_path() is None, cuda.pathfinder finds
    the nvidia-cuda-runtime headers."""
    cupy = pytest.importorskip("cupy")
    pytest.importorskip("cuda.pathfinder")
    monkeypatch.setattr(cupy.cuda, "get_cuda_path", lambda: None)
    include = _compile._cuda_include()
    assert os.path.isfile(os.path.join(include, "cuda_fp16.h"))


def test_missing_cuda_headers_say_what_to_install(include_cache, monkeypatch, tmp_path):
    cupy = pytest.importorskip("cupy")
    pathfinder = pytest.importorskip("cuda.pathfinder")
    monkeypatch.setattr(cupy.cuda, "get_cuda_path", lambda: str(tmp_path))
    monkeypatch.setattr(pathfinder, "find_nvidia_header_directory", lambda name: None)
    with pytest.raises(_compile.CompileError, match=r"cuflash\[cuda13\]"):
        _compile._cuda_include()
