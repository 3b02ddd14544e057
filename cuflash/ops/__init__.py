"""The kernel families, a module each: its tile table (a reason per entry), its params
mirror, its memoized plans and their launches. Every module offers ``facts()``, the
(filename, C++ expression, value) triples of every number it shares with the CUDA sources,
which the compile check proves equal, and ``kernels(arch)``, the (filename,
name_expression, dynamic shared bytes) of everything it can launch on a device of that
arch, which the compile check builds for the arch and holds to its shared memory. Sources
for one arch only (sm_90a) are left out on the others."""
from __future__ import annotations

from .. import _checks, _compile, _core
from . import backward, decode, forward, merge, varlen_check

FAMILIES = (forward, backward, decode, merge, varlen_check)


def all_kernels(arch: str) -> list:
    """Every (filename, name_expression, dynamic shared bytes) the dispatcher can choose on
    a device of ``arch``, once each."""
    found = [x for family in FAMILIES for x in family.kernels(arch)]
    return [x for x in dict.fromkeys(found) if _compile.target_arch(x[0], arch)]


def all_facts() -> list:
    """Every (filename, C++ expression, value) the compile check proves, once each."""
    return list(dict.fromkeys(x for family in FAMILIES for x in family.facts()))


def dense_problem(q, k, v, **options) -> _core.Problem:
    """The Problem of a dense call on CuPy arrays, validated as :func:`cuflash.attention`
    validates it: for tuning and benchmarks that launch a family's plans with explicit
    overrides (e.g. ``forward.Launch(p, ..., config=forward.mma_config(...))``)."""
    shape = _checks.check_qkv(q, k, v, gpu=True)
    return _core.problem(q, k, v, shape, _checks.options(shape, "cupy", q, **options))
