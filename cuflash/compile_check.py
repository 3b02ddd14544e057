"""Compile every kernel the dispatcher can choose, with NVRTC and no GPU.

    python -m cuflash.compile_check --arch sm_80,sm_90

Prints registers, stack and spill bytes per instantiation; exits 1 on a compile error or on
any register spill (local-memory traffic in an attention kernel is a performance bug).
"""
from __future__ import annotations

import argparse
import sys
import time

from . import _compile, _dispatch


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cuflash.compile_check",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="sm_80,sm_90",
                        help="comma-separated targets, e.g. sm_80,sm_90 (default)")
    parser.add_argument("-k", dest="pattern", default="",
                        help="only instantiations whose name contains this string")
    args = parser.parse_args(argv)
    kernels = [kv for kv in _dispatch.all_kernels() if args.pattern in kv[1]]
    if not kernels:
        print("compile_check: no kernels to compile", file=sys.stderr)
        return 1
    failures = 0
    for arch in args.arch.split(","):
        for filename, name in kernels:
            t0 = time.perf_counter()
            try:
                r = _compile.compile_report(filename, name, arch)
            except _compile.CompileError as e:
                print(f"FAIL  {arch}  {name}\n{e}", flush=True)
                failures += 1
                continue
            spilled = r.spill_stores or r.spill_loads or r.stack_bytes
            status = "SPILL" if spilled else "ok"
            failures += bool(spilled)
            print(f"{status:5} {arch}  regs {r.registers:3}  stack {r.stack_bytes:4}  "
                  f"spill st/ld {r.spill_stores}/{r.spill_loads}  "
                  f"{time.perf_counter() - t0:5.1f}s  {filename}  {name}", flush=True)
    total = len(kernels) * len(args.arch.split(","))
    print(f"compile_check: {total - failures}/{total} instantiations compiled without spills")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
