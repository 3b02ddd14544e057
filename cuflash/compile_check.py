"""Compile every kernel the dispatcher can choose on each arch, with NVRTC and no GPU.

    python -m cuflash.compile_check --arch sm_80,sm_86,sm_89,sm_90

Prints registers, stack, spill and shared-memory bytes per instantiation and arch; exits 1
on a compile error, on any register spill (local-memory traffic in an attention kernel is a
performance bug), on shared memory (the kernel's static bytes plus the dynamic bytes it is
launched with) beyond what the arch lets a block use (``ops.tiles.SHARED_LIMITS``), or on a
number Python shares with the CUDA sources that differs from theirs (``ops.all_facts``:
params struct sizes and offsets, tile constants, shared-memory sizes), proven by
``static_assert`` at compile time.

Results are reused: each instantiation's report line (and each file's proof) is kept in
``$CUFLASH_CACHE_DIR/compile_check/results.json`` (default ``~/.cache/cuflash``), keyed by
(arch, file, name expression, shared bytes and limit, NVRTC version, a hash of the file and
every kernels_cu/ file it includes), so a second run recompiles only what an edit can have
changed. Only passing results are kept; ``--no-cache`` recompiles everything.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from . import _compile, ops
from .ops import tiles


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cuflash.compile_check",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default=",".join(tiles.CHECKED_ARCHS),
                        help="comma-separated targets (default: %(default)s)")
    parser.add_argument("-k", dest="pattern", default="",
                        help="only instantiations whose name contains this string")
    parser.add_argument("-j", dest="jobs", type=int, default=os.cpu_count(),
                        help="parallel compiles (default: the number of CPUs)")
    parser.add_argument("--no-cache", action="store_true",
                        help="recompile everything instead of reusing the passing results of "
                             "earlier runs whose sources did not change")
    args = parser.parse_args(argv)
    # Architecture-specific sources (e.g. sm_90a) compile for the arch they run on.
    jobs = [(_compile.target_arch(filename, arch), filename, name, shared,
             tiles.shared_limit(arch)) for arch in args.arch.split(",")
            for filename, name, shared in ops.all_kernels(arch) if args.pattern in name]
    if not jobs:
        print("compile_check: no kernels to compile", file=sys.stderr)
        return 1
    cache = ResultCache(None if args.no_cache else cache_path())
    # A result holds for its shared bytes and limit too.
    keys = {job: ResultCache.key("kernel", *job[:2], "%s %d/%d" % job[2:]) for job in jobs}
    todo = [job for job in jobs if keys[job] not in cache]
    for job in jobs:
        if keys[job] in cache:
            print(f"{cache[keys[job]]}  (cached)", flush=True)
    failures = 0
    if todo:
        with ProcessPoolExecutor(max_workers=min(args.jobs, len(todo))) as pool:
            for job, (line, failed) in zip(todo, pool.map(_check_one, todo)):
                print(line, flush=True)
                failures += failed
                if not failed:
                    cache[keys[job]] = line
    reused = f"; {len(jobs) - len(todo)} reused from {cache.path}" if cache.path else ""
    print(f"compile_check: {len(jobs) - failures}/{len(jobs)} instantiations compiled "
          f"without spills, within their arch's shared memory{reused}")
    proven = _prove_facts(args.arch.split(","), cache)
    cache.save()
    return 1 if failures or not proven else 0


def _prove_facts(archs, cache) -> bool:
    """Prove every shared number once per source file; False (and the log) if one fails."""
    by_file = {}
    for filename, expression, value in ops.all_facts():
        by_file.setdefault(filename, []).append((expression, value))
    ok, count = True, 0
    for filename, facts in by_file.items():
        targets = [t for t in (_compile.target_arch(filename, a) for a in archs) if t]
        if not targets:
            continue
        key = ResultCache.key("facts", targets[0], filename, repr(sorted(facts)))
        if key not in cache:
            try:
                _compile.prove(filename, facts, targets[0])
            except _compile.CompileError as e:
                print(f"FAIL  {e}", flush=True)
                ok = False
                continue
            cache[key] = "proven"
        count += len(facts)
    print(f"compile_check: {count} shared numbers proven equal in the CUDA sources")
    return ok


def cache_path() -> Path:
    """Where compile_check keeps its results: $CUFLASH_CACHE_DIR, else $XDG_CACHE_HOME/cuflash,
    else ~/.cache/cuflash; then compile_check/results.json."""
    root = os.environ.get("CUFLASH_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "cuflash")
    return Path(root) / "compile_check" / "results.json"


class ResultCache:
    """Passing results of earlier runs: key -> report line, in one JSON file (``path``;
    None keeps nothing). Entries unused for 30 days are dropped when it is saved."""

    KEEP_SECONDS = 30 * 24 * 3600

    def __init__(self, path):
        self.path, self.entries, self.now = path, {}, time.time()
        if path is not None:
            try:
                self.entries = json.loads(path.read_text())["entries"]
            except (OSError, ValueError, KeyError, TypeError):
                self.entries = {}

    @staticmethod
    def key(kind: str, arch: str, filename: str, name: str) -> str:
        """What a result depends on: the target, the file and everything it includes, the
        name expression (or facts), NVRTC's version and the options that shape the code."""
        from cupy_backends.cuda.libs import nvrtc
        parts = (kind, arch, filename, name, _compile.source_fingerprint(filename),
                 "nvrtc %d.%d" % nvrtc.getVersion(), _compile.STD)
        return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:32]

    def __contains__(self, key):
        return key in self.entries

    def __getitem__(self, key):
        entry = self.entries[key]
        entry["used"] = self.now
        return entry["line"]

    def __setitem__(self, key, line):
        self.entries[key] = {"line": line, "used": self.now}

    def save(self) -> None:
        if self.path is None:
            return
        try:
            old = json.loads(self.path.read_text())["entries"]  # a concurrent run's too
        except (OSError, ValueError, KeyError, TypeError):
            old = {}
        merged = {k: v for k, v in {**old, **self.entries}.items()
                  if isinstance(v, dict) and self.now - v.get("used", 0) < self.KEEP_SECONDS}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"version": 1, "entries": merged}))
            os.replace(tmp, self.path)
        except OSError as e:  # a read-only home must not fail the check
            print(f"compile_check: results not cached ({e})", file=sys.stderr)


def _check_one(job):
    """(report line, failed) for one (arch, filename, name_expression, dynamic shared bytes,
    the arch's shared-memory limit)."""
    arch, filename, name, shared, limit = job
    t0 = time.perf_counter()
    try:
        r = _compile.compile_report(filename, name, arch)
    except _compile.CompileError as e:
        return f"FAIL  {arch}  {name}\n{e}", True
    spilled = bool(r.spill_stores or r.spill_loads or r.stack_bytes)
    smem = r.shared_bytes + shared
    status = "SPILL" if spilled else "SMEM" if smem > limit else "ok"
    return (f"{status:5} {arch}  regs {r.registers:3}  stack {r.stack_bytes:4}  "
            f"spill st/ld {r.spill_stores}/{r.spill_loads}  smem {smem:6}/{limit}  "
            f"{time.perf_counter() - t0:5.1f}s  {filename}  {name}"), status != "ok"


if __name__ == "__main__":
    sys.exit(main())
