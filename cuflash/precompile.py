"""Compile kernels ahead of time into CuPy's disk cache, so that a service does not compile
on its first requests.

    python -m cuflash.precompile --arch sm_90 --dtypes bf16 --headdims 64,128
    python -m cuflash.precompile --arch sm_80,sm_90 --all          # every kernel
    python -m cuflash.precompile --device 0 --dtypes bf16,fp16 --varlen --decode

The kernels go where a run-time call looks for them: CuPy's disk cache (``CUPY_CACHE_DIR``,
default ``~/.cupy/kernel_cache``), under the key CuPy computes from the source, the options
and the architecture. The options hold the include paths of cuflash's sources and of the
CUDA headers, so run it in the environment the service will run in (same CuPy, NVRTC,
cuflash install and CUPY_CACHE_DIR), e.g. while building its image.

``--arch`` needs no GPU: NVRTC compiles for the named architectures. (``cupy.RawModule``
itself asks the device for its architecture before compiling, so it cannot; see
``cuflash._compile.cache_kernel`` for how this fills the same cache entries.) ``--device N``
compiles for that GPU's architecture and then loads every kernel on it through the run-time
path, reporting any that the load did not find in the cache. With neither, the first GPU is
used if there is one.

What is compiled: for the given dtypes and head dims (each padded to the kernel head dim
that runs it, e.g. 80 -> 96), the forward and backward kernels of dense attention (every
kernel either may choose on the arch: the Hopper ones on sm_90, the mma.sync ones for the
problems they do not cover, score modifiers and deterministic mode included, with the tiles
that fit the arch's shared memory); ``--varlen`` adds the
packed-batch instantiations, ``--decode`` the KV-cache and merge kernels,
``--forward-only`` leaves out the backward; ``--all`` is every kernel of every dtype and
head dim (as the compile check builds).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

from . import _compile, ops
from .ops import backward, tiles

DTYPES = {"bf16": "__nv_bfloat16", "bfloat16": "__nv_bfloat16", "fp16": "__half",
          "float16": "__half", "half": "__half", "fp32": "float", "float32": "float"}
_F32_SUFFIX = "_f32"  # float32 kernels whose template arguments name no type


def template_args(name: str) -> list:
    """The template arguments of a name expression, e.g. ["__half", "64", "true"]."""
    if "<" not in name:
        return []
    return [a.strip() for a in name[name.index("<") + 1:name.rindex(">")].split(",")]


def dtype_of(name: str):
    """The C++ element type of an instantiation, or None if it serves every dtype."""
    for arg in template_args(name):
        if arg in ("__half", "__nv_bfloat16", "float"):
            return arg
    return "float" if name.split("<")[0].endswith(_F32_SUFFIX) else None


def headdim_of(name: str):
    """The (padded) head dim of an instantiation: its first integer template argument, by
    the convention of every kernel family; None if it has none (it serves every head dim)."""
    return next((int(a) for a in template_args(name) if a.isdigit()), None)


def is_varlen(name: str, names) -> bool:
    """Whether an instantiation is for packed (varlen) batches: bwd_main's VARLEN mode bit,
    else a trailing ``true`` whose removal gives a dense instantiation in ``names``."""
    args = template_args(name)
    if name.split("<")[0] in ("cuflash::bwd_main", "cuflash::bwd_main_f32"):
        return bool(int(args[-1]) & backward.VARLEN)
    if args and args[-1] == "true":
        base = name.split("<")[0]
        dense = f"{base}<{', '.join(args[:-1])}>" if len(args) > 1 else base
        return dense in names
    return False


def select(arch, dtypes, headdims, *, varlen=False, decode=False, backward_=True) -> list:
    """The (filename, name_expression) of every kernel a configuration can launch on a
    device of ``arch``."""
    kernels = [(filename, name) for filename, name, _ in ops.all_kernels(arch)]
    names = {name for _, name in kernels}
    cxx = {DTYPES[d] for d in dtypes}
    # The mma.sync kernels' head dim, and on sm_90 the Hopper forward's (whole 64-column
    # blocks).
    hds = {f(h) for h in headdims for f in (tiles.padded_headdim, tiles.smem_cols)
           if arch == "sm_90" or f is tiles.padded_headdim}
    chosen = []
    for filename, name in kernels:
        if filename.startswith("flash_decode"):
            wanted = decode
        elif filename.startswith("flash_bwd"):
            wanted = backward_
        elif filename.startswith("varlen_check"):
            wanted = varlen
        else:
            wanted = filename.startswith("flash_fwd")
        dtype, hd = dtype_of(name), headdim_of(name)
        if (wanted and dtype in cxx | {None} and hd in hds | {None}
                and (varlen or not is_varlen(name, names))):
            chosen.append((filename, name))
    return chosen


def _cache_one(job):
    arch, filename, name = job
    t0 = time.perf_counter()
    try:
        compiled = _compile.cache_kernel(filename, name, arch)
    except _compile.CompileError as e:
        return f"FAIL      {arch}  {name}\n{e}", None
    return (f"{'compiled' if compiled else 'cached':9} {arch}  "
            f"{time.perf_counter() - t0:5.1f}s  {filename}  {name}"), compiled


def _load_all(kernels, device_id) -> list:
    """Load every kernel on ``device_id`` through the run-time path; the names the load did
    not find in CuPy's disk cache (compiled again)."""
    from cupy.cuda import compiler
    backend = compiler._kernel_cache_backend
    missed = []

    class Watched:
        def load(self, key):
            payload = backend.load(key)
            if payload is None:
                missed.append(key)
            return payload

        def save(self, key, payload, source):
            backend.save(key, payload, source)

    compiler._kernel_cache_backend = Watched()
    try:
        out = []
        for filename, name in kernels:
            before = len(missed)
            _compile.get_kernel(filename, name, device_id)
            if len(missed) > before:
                out.append(name)
        return out
    finally:
        compiler._kernel_cache_backend = backend


def _list(text: str) -> list:
    return [x.strip() for x in text.split(",") if x.strip()]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cuflash.precompile",
                                     description=__doc__.splitlines()[0])
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--arch", help="comma-separated targets, e.g. sm_80,sm_90 (no GPU "
                                      "needed)")
    where.add_argument("--device", type=int, help="compile for this GPU and load every "
                                                  "kernel on it")
    parser.add_argument("--dtypes", default="bf16,fp16",
                        help="comma-separated: bf16, fp16, fp32 (default bf16,fp16)")
    parser.add_argument("--headdims", default=",".join(map(str, tiles.HEADDIMS)),
                        help="comma-separated head dims (default: every kernel head dim)")
    parser.add_argument("--varlen", action="store_true", help="also the varlen kernels")
    parser.add_argument("--decode", action="store_true",
                        help="also the KV-cache decoding and merge kernels")
    parser.add_argument("--forward-only", action="store_true", help="no backward kernels")
    parser.add_argument("--all", action="store_true", help="every kernel (ignores the "
                                                           "selection options)")
    parser.add_argument("--list", action="store_true",
                        help="print the selected kernels and compile nothing")
    parser.add_argument("-j", dest="jobs", type=int, default=os.cpu_count(),
                        help="parallel compiles (default: the number of CPUs)")
    args = parser.parse_args(argv)

    dtypes, headdims = _list(args.dtypes), _list(args.headdims)
    for d in dtypes:
        if d not in DTYPES:
            parser.error(f"--dtypes: unknown dtype {d!r} (bf16, fp16, fp32)")
    try:
        headdims = [int(h) for h in headdims]
    except ValueError:
        parser.error(f"--headdims: integers, got {args.headdims!r}")
    for h in headdims:
        if not (0 < h <= tiles.HEADDIMS[-1] and h % 8 == 0):
            parser.error(f"--headdims: {h} is not a multiple of 8 in 8..{tiles.HEADDIMS[-1]}")
    device = args.device
    if args.arch:
        archs = _list(args.arch)
    else:
        if device is None and not args.list:
            device = _first_gpu()
            if device is None:
                parser.error("no GPU is visible: name the target architectures with --arch "
                             "(e.g. --arch sm_90)")
        archs = [_compile.device_arch(device)] if device is not None else \
            list(tiles.CHECKED_ARCHS)
    if args.all:
        jobs = [(arch, filename, name) for arch in archs
                for filename, name, _ in ops.all_kernels(arch)]
    else:
        jobs = [(arch, filename, name) for arch in archs
                for filename, name in select(arch, dtypes, headdims, varlen=args.varlen,
                                             decode=args.decode,
                                             backward_=not args.forward_only)]
    if args.list:
        for arch, filename, name in jobs:
            print(f"{arch}  {filename}  {name}")
        print(f"precompile: {len(jobs)} kernels selected")
        return 0
    if not jobs:
        print("precompile: no kernels selected", file=sys.stderr)
        return 1

    counts = {True: 0, False: 0, None: 0}
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=max(1, min(args.jobs, len(jobs)))) as pool:
        for line, compiled in pool.map(_cache_one, jobs):
            print(line, flush=True)
            counts[compiled] += 1
    cache_dir = os.environ.get("CUPY_CACHE_DIR") or os.path.expanduser("~/.cupy/kernel_cache")
    print(f"precompile: {len(jobs)} kernels for {','.join(archs)} in "
          f"{time.perf_counter() - t0:.0f} s: {counts[True]} compiled, {counts[False]} "
          f"already cached, {counts[None]} failed; CuPy's cache: {cache_dir}")
    if counts[None]:
        return 1
    if device is not None:
        missed = _load_all([(filename, name) for _, filename, name in jobs], device)
        print(f"precompile: loaded {len(jobs)} kernels on device {device}: "
              + ("every one from the cache" if not missed else
                 f"{len(missed)} were not in the cache and compiled again (CuPy's cache key "
                 f"differs from precompile's), e.g. {missed[0]}"))
    return 0


def _first_gpu():
    try:
        import cupy
        return 0 if cupy.cuda.runtime.getDeviceCount() > 0 else None
    except Exception:  # no driver, no CuPy: no GPU
        return None


if __name__ == "__main__":
    sys.exit(main())
