"""The only module that touches NVRTC and ``cupy.RawModule``.

Sources are read from the ``kernels_cu`` package data through ``importlib.resources``.
Templates are instantiated with ``name_expressions``; compiled modules are cached in memory
per (device, source, instantiation) with CuPy's disk cache below. A fingerprint of the
source and every ``kernels_cu/`` file it includes goes into its compile options, because
CuPy's disk cache keys on the top-level source and options only and would not see an edited
header; a file that does not include an edited one keeps its options and its cache. So does
the identity of the NVRTC library loaded (:func:`nvrtc_identity`): the cache keys on NVRTC's
major and minor version only, and two builds of one version (in a process where torch or
JAX loaded theirs first) could write different code under one key.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.resources
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from . import _log

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
    subpackage without ``__init__.py`` outside its parent's directory. Looked up by this
    package's own name, so that a copy imported under another (bench/sweep.py --trees)
    reads its own sources.
    """
    packaged = Path(str(importlib.resources.files(__package__) / "kernels_cu"))
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent / "kernels_cu"


_INCLUDE = re.compile(r'^\s*#\s*include\s*"([^"]+)"', re.M)


@functools.lru_cache(maxsize=None)
def source_fingerprint(filename: str) -> str:
    """Hash of ``filename`` and of every kernels_cu/ file it includes (``#include "..."``,
    recursively): what its compiled instantiations depend on besides NVRTC, the CUDA headers
    and the options. Files it does not include do not change it."""
    root = source_dir()
    seen, todo = {}, [root / filename]
    while todo:
        path = todo.pop().resolve()
        if path in seen or not path.is_file():
            continue
        seen[path] = path.read_bytes()
        todo += [base / inc for inc in _INCLUDE.findall(seen[path].decode())
                 for base in (path.parent, root)]
    h = hashlib.sha256()
    for path in sorted(seen):
        h.update(os.path.relpath(path, root.resolve()).encode() + b"\0" + seen[path])
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


@functools.lru_cache(maxsize=None)
def nvrtc_identity() -> str:
    """Hash of the NVRTC library this process compiles with: its path, size and time stamp
    (from ``/proc/self/maps``, where it is mapped once CuPy loaded it); empty where there is
    no such file (another OS), which leaves the cache keyed on NVRTC's version alone."""
    from cupy_backends.cuda.libs import nvrtc
    nvrtc.getVersion()  # loads the library
    try:
        with open("/proc/self/maps") as maps:
            paths = sorted({line.split()[-1] for line in maps if "libnvrtc.so" in line})
        stats = [os.stat(path) for path in paths]
    except OSError:
        return ""
    h = hashlib.sha256()
    for path, st in zip(paths, stats):
        h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    return h.hexdigest()[:16] if paths else ""


def options(arch: str, filename: str) -> tuple:
    """NVRTC options for ``filename`` on ``arch`` (e.g. ``sm_90``); the same for run time
    and the check."""
    identity = nvrtc_identity()
    return (STD, f"--gpu-architecture={arch}", "-I" + str(source_dir()),
            "-I" + _cuda_include(),
            f"-DCUFLASH_FINGERPRINT=0x{source_fingerprint(filename)}ULL") + (
                (f"-DCUFLASH_NVRTC=0x{identity}ULL",) if identity else ())


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
    t0 = time.perf_counter()
    with cupy.cuda.Device(device_id):
        module = cupy.RawModule(code=read_source(filename), options=options(arch, filename),
                                name_expressions=(name_expression,), backend="nvrtc")
        try:
            kernel = module.get_function(name_expression)
        except cupy.cuda.compiler.CompileException as e:
            raise CompileError(f"compiling {name_expression} from kernels_cu/{filename} for "
                               f"{arch} failed:\n{e.get_message()}") from None
    _log.logger.debug("kernel %s (kernels_cu/%s) for %s on device %d ready in %.2f s "
                      "(compiled by NVRTC, or loaded from CuPy's disk cache)", name_expression,
                      filename, arch, device_id, time.perf_counter() - t0)
    return kernel


# cache_kernel stands in for two of CuPy's module globals while it runs.
_CUPY_PATCH = threading.Lock()


def cache_kernel(filename: str, name_expression: str, arch: str) -> bool:
    """Compile one instantiation for devices of ``arch`` (e.g. ``sm_90``) into CuPy's disk
    cache (``CUPY_CACHE_DIR``), under the key that :func:`get_kernel` looks up on such a
    device, with no GPU needed. True if NVRTC compiled it now, False if it was cached.

    ``cupy.RawModule`` asks the current device for its architecture before compiling, so it
    cannot fill the cache without a GPU. This calls what RawModule compiles through
    (``cupy._core.core.compile_with_cache``) with the architecture given, standing in only
    for CuPy's per-device choice of NVRTC's ``-arch`` option (a cubin up to the newest
    architecture NVRTC knows, else PTX, as CuPy decides it). CuPy saves the binary before it
    loads it into a context, which without a GPU fails and is ignored. This leans on CuPy
    internals (checked with CuPy 14): ``python -m cuflash.precompile --device`` loads every
    kernel afterwards and reports any that a GPU did not find in the cache.
    """
    import cupy
    from cupy._core import core
    from cupy.cuda import compiler
    target = target_arch(filename, arch)
    if target is None:
        raise CompileError(f"kernels_cu/{filename} is built for {ARCH_SPECIFIC[filename]} only, "
                           f"not {arch}")
    cc = arch[len("sm_"):]
    backend = compiler._kernel_cache_backend
    seen = {}

    class Watched:  # CuPy's cache backend, noting whether it hit and whether it saved
        def load(self, name):
            payload = backend.load(name)
            seen["hit"] = payload is not None
            return payload

        def save(self, name, payload, source):
            backend.save(name, payload, source)
            seen["saved"] = True

    def arch_option(arch=None):  # CuPy's _get_arch_for_options_for_nvrtc, minus the device
        if not compiler._use_ptx and int(arch) <= int(compiler._get_max_compute_capability()):
            return f"-arch=sm_{arch}", "cubin"
        return f"-arch=compute_{arch}", "ptx"

    t0 = time.perf_counter()
    with _CUPY_PATCH:
        saved = compiler._get_arch_for_options_for_nvrtc, compiler._kernel_cache_backend
        compiler._get_arch_for_options_for_nvrtc = arch_option
        compiler._kernel_cache_backend = Watched()
        try:
            core.compile_with_cache(read_source(filename), options(target, filename), arch=cc,
                                    prepend_cupy_headers=False, backend="nvrtc",
                                    name_expressions=(name_expression,))
        except compiler.CompileException as e:
            raise CompileError(f"compiling {name_expression} from kernels_cu/{filename} for "
                               f"{target} failed:\n{e.get_message()}") from None
        except (cupy.cuda.runtime.CUDARuntimeError, cupy.cuda.driver.CUDADriverError):
            pass  # loading the saved binary into a context: needs a GPU, and is not needed
        finally:
            compiler._get_arch_for_options_for_nvrtc, compiler._kernel_cache_backend = saved
    if not (seen.get("hit") or seen.get("saved")):
        raise CompileError(f"{name_expression}: CuPy's disk cache was not reached (is "
                           f"CUPY_CACHE_IN_MEMORY set?)")
    compiled = not seen.get("hit")
    _log.logger.debug("kernel %s (kernels_cu/%s) for %s %s CuPy's disk cache in %.2f s",
                      name_expression, filename, target,
                      "compiled into" if compiled else "found in", time.perf_counter() - t0)
    return compiled


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
    t0 = time.perf_counter()
    prog = nvrtc.createProgram(read_source(filename), filename, [], [])
    try:
        nvrtc.addNameExpression(prog, name_expression)
        try:
            nvrtc.compileProgram(prog, list(options(arch, filename)) + ["-Xptxas", "-v"])
        except nvrtc.NVRTCError:
            raise CompileError(f"compiling {name_expression} from kernels_cu/{filename} for "
                               f"{arch} failed:\n{nvrtc.getProgramLog(prog)}") from None
        log = nvrtc.getProgramLog(prog)
        mangled = nvrtc.getLoweredName(prog, name_expression)
        if "wgmma.mma_async instructions are serialized" in log:
            # ptxas waits after every wgmma instead of where the kernel waits: as much a
            # performance bug as a spill.
            raise CompileError(f"ptxas serialized the wgmmas of {name_expression} "
                               f"(kernels_cu/{filename}, {arch}):\n{log}")
    finally:
        nvrtc.destroyProgram(prog)
    _log.logger.debug("kernel %s (kernels_cu/%s) compiled for %s in %.2f s (resource report)",
                      name_expression, filename, arch, time.perf_counter() - t0)
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
        nvrtc.compileProgram(prog, list(options(arch, filename)))
    except nvrtc.NVRTCError:
        raise CompileError(f"facts of kernels_cu/{filename} for {arch} do not hold:\n"
                           f"{nvrtc.getProgramLog(prog)}") from None
    finally:
        nvrtc.destroyProgram(prog)
