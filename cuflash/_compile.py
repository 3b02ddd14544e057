"""The only module that touches NVRTC and ``cupy.RawModule``.

Sources are read from the ``kernels_cu`` package data through ``importlib.resources``.
Templates are instantiated with ``name_expressions``; compiled modules are cached in memory
per (device, source, instantiation) with CuPy's disk cache below. A fingerprint of every
file under ``kernels_cu/`` goes into the compile options, because CuPy's disk cache keys on
the top-level source and options only and would not see an edited header.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.resources
import os
import re
from dataclasses import dataclass
from pathlib import Path

STD = "--std=c++17"


class CompileError(RuntimeError):
    """NVRTC rejected a kernel; the message names it and carries the compiler log."""


@functools.lru_cache(maxsize=None)
def source_dir() -> Path:
    """The directory of the CUDA sources.

    An installed wheel holds them as package data in ``cuflash/kernels_cu``. A source tree
    keeps them in the top-level ``kernels_cu/`` beside ``cuflash/``, which is where an
    editable install and a run with ``PYTHONPATH=.`` find them: pyproject.toml maps the
    data-only package there, but an editable install's import finder cannot resolve a
    subpackage without ``__init__.py`` outside its parent's directory.
    """
    packaged = Path(str(importlib.resources.files("cuflash") / "kernels_cu"))
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent / "kernels_cu"


@functools.lru_cache(maxsize=None)
def fingerprint() -> str:
    """Hash of every file under kernels_cu/ (names and contents)."""
    h = hashlib.sha256()
    root = source_dir()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


@functools.lru_cache(maxsize=None)
def read_source(filename: str) -> str:
    return (source_dir() / filename).read_text()


@functools.lru_cache(maxsize=None)
def _cuda_include() -> str:
    """The directory of the CUDA headers the kernels include (cuda_fp16.h, cuda_bf16.h).

    The toolkit root CuPy found NVRTC in comes first, so the headers match the compiler:
    a system CUDA, conda, or the CUDA 13 wheels' unified ``nvidia/cu13``. The CUDA 12 wheels
    keep each component in its own directory (CuPy then reports no root), where
    ``cuda.pathfinder`` (a CuPy dependency) finds the ``nvidia-cuda-runtime-cu12`` headers.
    """
    import cupy
    root = cupy.cuda.get_cuda_path()
    if root and os.path.isfile(os.path.join(root, "include", "cuda_fp16.h")):
        return os.path.join(root, "include")
    try:
        from cuda.pathfinder import find_nvidia_header_directory
        found = find_nvidia_header_directory("cudart")
    except (ImportError, RuntimeError):
        found = None
    if found and os.path.isfile(os.path.join(found, "cuda_fp16.h")):
        return found
    raise CompileError("the CUDA headers (cuda_fp16.h) were not found: install cuflash with "
                       "its CUDA extra (pip install 'cuflash[cuda13]' or '[cuda12]', which "
                       "brings nvidia-cuda-runtime), or set CUDA_PATH to a CUDA toolkit")


def options(arch: str) -> tuple:
    """NVRTC options for ``arch`` (e.g. ``sm_90``); the same for run time and the check."""
    return (STD, f"--gpu-architecture={arch}", "-I" + str(source_dir()),
            "-I" + _cuda_include(), f"-DCUFLASH_FINGERPRINT=0x{fingerprint()}ULL")


# Sources written for one architecture-specific target: sm_90a code (wgmma, setmaxnreg) runs
# on compute capability 9.0 only. Every other source compiles for the device's own arch.
ARCH_SPECIFIC = {"flash_fwd_sm90.cu": "sm_90a", "flash_bwd_sm90.cu": "sm_90a"}


def target_arch(filename: str, arch: str):
    """The ``--gpu-architecture`` that compiles ``filename`` for a device of ``arch``
    (e.g. ``sm_90`` -> ``sm_90a`` for Hopper-only sources), or None if it cannot run there."""
    special = ARCH_SPECIFIC.get(filename)
    if special is None:
        return arch
    return special if special.rstrip("a") == arch else None


@functools.lru_cache(maxsize=None)
def device_arch(device_id: int) -> str:
    import cupy
    cc = cupy.cuda.Device(device_id).compute_capability  # e.g. "90"
    major, minor = int(cc[:-1]), int(cc[-1])
    if major < 8:
        raise RuntimeError(f"cuflash's GPU kernels need compute capability 8.0 (Ampere) or "
                           f"newer; device {device_id} has {major}.{minor}")
    return f"sm_{major}{minor}"


@functools.lru_cache(maxsize=None)
def get_kernel(filename: str, name_expression: str, device_id: int):
    """The compiled ``cupy.RawKernel`` for one template instantiation on one device."""
    import cupy
    arch = target_arch(filename, device_arch(device_id))
    if arch is None:
        raise CompileError(f"kernels_cu/{filename} is built for {ARCH_SPECIFIC[filename]} only; "
                           f"device {device_id} is {device_arch(device_id)}")
    with cupy.cuda.Device(device_id):
        module = cupy.RawModule(code=read_source(filename), options=options(arch),
                                name_expressions=(name_expression,), backend="nvrtc")
        try:
            return module.get_function(name_expression)
        except cupy.cuda.compiler.CompileException as e:
            raise CompileError(f"compiling {name_expression} from kernels_cu/{filename} for "
                               f"{arch} failed:\n{e.get_message()}") from None


@dataclass(frozen=True)
class Report:
    registers: int
    stack_bytes: int
    spill_stores: int
    spill_loads: int
    shared_bytes: int


def compile_report(filename: str, name_expression: str, arch: str) -> Report:
    """Compile with NVRTC directly (no GPU needed) and return ptxas' resource report."""
    from cupy_backends.cuda.libs import nvrtc
    prog = nvrtc.createProgram(read_source(filename), filename, [], [])
    try:
        nvrtc.addNameExpression(prog, name_expression)
        try:
            nvrtc.compileProgram(prog, list(options(arch)) + ["-Xptxas", "-v"])
        except nvrtc.NVRTCError:
            raise CompileError(f"compiling {name_expression} from kernels_cu/{filename} for "
                               f"{arch} failed:\n{nvrtc.getProgramLog(prog)}") from None
        log = nvrtc.getProgramLog(prog)
        mangled = nvrtc.getLoweredName(prog, name_expression)
    finally:
        nvrtc.destroyProgram(prog)
    return _parse_ptxas(log, mangled)


def _parse_ptxas(log: str, mangled: str) -> Report:
    section = log.split(f"Function properties for {mangled}", 1)[-1]
    def grab(pattern):
        m = re.search(pattern, section)
        return int(m.group(1)) if m else 0
    return Report(registers=grab(r"Used (\d+) registers"),
                  stack_bytes=grab(r"(\d+) bytes stack frame"),
                  spill_stores=grab(r"(\d+) bytes spill stores"),
                  spill_loads=grab(r"(\d+) bytes spill loads"),
                  shared_bytes=grab(r"(\d+) bytes smem"))


def prove(filename: str, facts: list, arch: str) -> None:
    """Compile ``filename`` with a ``static_assert`` per (C++ expression, value) of
    ``facts``: the proof that a number Python uses equals the CUDA source's (struct sizes
    and offsets, tile constants, shared-memory sizes). Raises CompileError naming each one
    that differs. No kernel is instantiated, so this is quick."""
    from cupy_backends.cuda.libs import nvrtc
    asserts = "".join(f'static_assert(({expr}) == {value}, "{expr} == {value} (Python)");\n'
                      for expr, value in facts)
    source = f'#include "{filename}"\n{asserts}'
    prog = nvrtc.createProgram(source, f"facts_{filename}", [], [])
    try:
        nvrtc.compileProgram(prog, list(options(arch)))
    except nvrtc.NVRTCError:
        raise CompileError(f"facts of kernels_cu/{filename} for {arch} do not hold:\n"
                           f"{nvrtc.getProgramLog(prog)}") from None
    finally:
        nvrtc.destroyProgram(prog)
