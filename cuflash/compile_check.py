"""Compile every kernel the dispatcher can choose, with NVRTC and no GPU.

    python -m cuflash.compile_check --arch sm_80,sm_90

Prints registers, stack and spill bytes per instantiation; exits 1 on a compile error, on
any register spill (local-memory traffic in an attention kernel is a performance bug), or on
a number Python shares with the CUDA sources that differs from theirs (``ops.all_facts``:
params struct sizes and offsets, tile constants, shared-memory sizes), proven by
``static_assert`` at compile time.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

from . import _compile, ops


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cuflash.compile_check",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="sm_80,sm_90",
                        help="comma-separated targets, e.g. sm_80,sm_90 (default)")
    parser.add_argument("-k", dest="pattern", default="",
                        help="only instantiations whose name contains this string")
    parser.add_argument("-j", dest="jobs", type=int, default=os.cpu_count(),
                        help="parallel compiles (default: the number of CPUs)")
    args = parser.parse_args(argv)
    # Architecture-specific sources (e.g. sm_90a) compile once, for the arch they run on.
    jobs = [(target, filename, name) for arch in args.arch.split(",")
            for filename, name in ops.all_kernels() if args.pattern in name
            for target in [_compile.target_arch(filename, arch)] if target is not None]
    if not jobs:
        print("compile_check: no kernels to compile", file=sys.stderr)
        return 1
    failures = 0
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        for line, failed in pool.map(_check_one, jobs):
            print(line, flush=True)
            failures += failed
    print(f"compile_check: {len(jobs) - failures}/{len(jobs)} instantiations compiled "
          f"without spills")
    return 1 if failures or not _prove_facts(args.arch.split(",")) else 0


def _prove_facts(archs) -> bool:
    """Prove every shared number once per source file; False (and the log) if one fails."""
    by_file = {}
    for filename, expression, value in ops.all_facts():
        by_file.setdefault(filename, []).append((expression, value))
    ok, count = True, 0
    for filename, facts in by_file.items():
        targets = [t for t in (_compile.target_arch(filename, a) for a in archs) if t]
        if not targets:
            continue
        try:
            _compile.prove(filename, facts, targets[0])
            count += len(facts)
        except _compile.CompileError as e:
            print(f"FAIL  {e}", flush=True)
            ok = False
    print(f"compile_check: {count} shared numbers proven equal in the CUDA sources")
    return ok


def _check_one(job):
    """(report line, failed) for one (arch, filename, name_expression)."""
    arch, filename, name = job
    t0 = time.perf_counter()
    try:
        r = _compile.compile_report(filename, name, arch)
    except _compile.CompileError as e:
        return f"FAIL  {arch}  {name}\n{e}", True
    spilled = bool(r.spill_stores or r.spill_loads or r.stack_bytes)
    return (f"{'SPILL' if spilled else 'ok':5} {arch}  regs {r.registers:3}  "
            f"stack {r.stack_bytes:4}  spill st/ld {r.spill_stores}/{r.spill_loads}  "
            f"{time.perf_counter() - t0:5.1f}s  {filename}  {name}"), spilled


if __name__ == "__main__":
    sys.exit(main())
