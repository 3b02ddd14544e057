"""What cuflash tells: its log (compiles, plan choices, the Hopper forward's fallback), ahead
of time compiles (python -m cuflash.precompile) and the compile check's reuse of earlier
results. No GPU needed: NVRTC compiles, and tests/fake_cupy.py stands in for the device
where a plan is made."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cuflash import _compile, _log, compile_check, ops, precompile
from cuflash.ops import tiles

ROOT = Path(__file__).resolve().parent.parent


def _messages(caplog, level=logging.DEBUG):
    return [r.getMessage() for r in caplog.records
            if r.name == "cuflash" and r.levelno == level]


@pytest.fixture
def nvrtc():
    return pytest.importorskip("cupy_backends.cuda.libs.nvrtc")


def test_compile_report_logs_name_arch_and_seconds(nvrtc, caplog):
    caplog.set_level(logging.DEBUG, logger="cuflash")
    _compile.compile_report("varlen_check.cu", "cuflash::varlen_check", "sm_80")
    (message,) = [m for m in _messages(caplog) if "cuflash::varlen_check" in m]
    assert "sm_80" in message and " s " in message


@pytest.fixture
def fake_gpu(monkeypatch):
    """The fake GPU of tests/test_launch_layer.py (device 0 is sm_90), with the log's
    once-per-process warnings forgotten."""
    from test_launch_layer import fake_gpu, record_launches
    monkeypatch.setattr(_log, "_warned", set())
    with fake_gpu() as (cuflash, world):
        yield cuflash, world, record_launches.Maker(world, 0)


def test_a_plan_logs_its_kernel_once(fake_gpu, caplog):
    import fake_cupy
    cuflash, world, mk = fake_gpu
    q, k, v = (mk.array((2, 300, 4, 64), fake_cupy.BF16, n) for n in "qkv")
    caplog.set_level(logging.DEBUG, logger="cuflash")
    cuflash.attention_forward(q, k, v, causal=True)
    (plan,) = [m for m in _messages(caplog) if m.startswith("plan:")]
    assert "cuflash::flash_fwd_sm90<__nv_bfloat16, 64" in plan
    # 300 keys (short: two consumers): 3 query blocks of 128 rows x 4 heads x 2 items
    assert "grid (24, 1, 1)" in plan and "block (384, 1, 1)" in plan
    assert "bytes of dynamic shared memory" in plan
    caplog.clear()
    cuflash.attention_forward(q, k, v, causal=True)  # memoized: nothing is logged
    assert not [r for r in caplog.records if r.name == "cuflash"]


def test_hopper_fallback_warns_once(fake_gpu, caplog):
    import fake_cupy
    cuflash, world, mk = fake_gpu
    q = mk.array((2, 300, 4, 64), fake_cupy.BF16, "q")
    # K and V broadcast over the heads (stride 0): no TMA map describes them.
    kv = world.module.broadcast_to(mk.array((2, 300, 1, 64), fake_cupy.BF16, "kv"),
                                   (2, 300, 4, 64))
    caplog.set_level(logging.DEBUG, logger="cuflash")
    cuflash.attention_forward(q, kv, kv, causal=True)
    cuflash.attention_forward(q, kv, kv, causal=False)  # another plan, same reason
    (warning,) = _messages(caplog, logging.WARNING)
    assert "flash_fwd_sm90" in warning and "flash_fwd (mma.sync" in warning
    plans = [m for m in _messages(caplog) if m.startswith("plan:")]
    assert plans and all("cuflash::flash_fwd<" in m for m in plans)


def test_refused_tma_maps_warn_once(fake_gpu, caplog, monkeypatch):
    import fake_cupy
    from cuflash import _tma
    cuflash, world, mk = fake_gpu
    q, k, v = (mk.array((2, 300, 4, 64), fake_cupy.BF16, n) for n in "qkv")
    monkeypatch.setattr(_tma.MapMaker, "__call__", lambda self, ptr: None)  # driver refuses
    caplog.set_level(logging.DEBUG, logger="cuflash")
    for _ in range(3):
        cuflash.attention_forward(q, k, v, causal=True)
    (warning,) = _messages(caplog, logging.WARNING)
    assert "TMA maps" in warning
    assert [launch["kernel"].name for launch in world.launches][-1].startswith(
        "cuflash::flash_fwd<")


# --- precompile ------------------------------------------------------------------------

def test_every_kernel_name_follows_the_selection_conventions():
    """precompile selects by name: the first integer template argument is the head dim, the
    C++ type the dtype, and every varlen instantiation has a dense twin (clusters, which
    serve dense calls alone, have none)."""
    for arch in tiles.CHECKED_ARCHS:
        kernels = [(filename, name) for filename, name, _ in ops.all_kernels(arch)]
        names = {name for _, name in kernels}
        for filename, name in kernels:
            assert precompile.headdim_of(name) in (*tiles.HEADDIMS, None), name
            assert precompile.dtype_of(name) in ("__half", "__nv_bfloat16", "float", None), \
                name
        for prefix in ("flash_fwd", "flash_bwd"):
            clusters = [name for name in names
                        if name.startswith("cuflash::flash_fwd_sm90_cluster<")]
            assert not any(precompile.is_varlen(n, names) for n in clusters), clusters
            family = [name for filename, name in kernels if filename.startswith(prefix)
                      and name not in clusters]
            varlen = [name for name in family if precompile.is_varlen(name, names)]
            assert 2 * len(varlen) == len(family), (arch, prefix)


def test_selection_holds_what_the_forward_chooses():
    from cuflash.ops import forward
    chosen = set(precompile.select("sm_90", ["bf16"], [80, 128], backward_=False))
    for hd in (96, 128):
        for score_mod in (False, True):
            c = forward.mma_config(tiles.BFLOAT16, hd, score_mod, False)
            assert (c.filename, c.name_expression) in chosen
    assert (forward.SM90_FILE, forward.sm90_config(tiles.BFLOAT16, 128, 0, False,
                                                   4096).name_expression) in chosen
    assert all(precompile.headdim_of(n) in (96, 128) for _, n in chosen)
    assert all(precompile.dtype_of(n) == "__nv_bfloat16" for _, n in chosen)
    assert not any(precompile.is_varlen(n, {m for _, m, _ in ops.all_kernels("sm_90")})
                   for _, n in chosen)
    assert not any(f.startswith(("flash_bwd", "flash_decode")) for f, _ in chosen)
    for arch in tiles.CHECKED_ARCHS:
        everything = precompile.select(arch, ["bf16", "fp16", "fp32"], tiles.HEADDIMS,
                                       varlen=True, decode=True)
        assert sorted(everything) == sorted((f, n) for f, n, _ in ops.all_kernels(arch))


def _run(module, *args, env):
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def test_precompile_fills_cupys_cache_without_a_gpu(nvrtc, tmp_path):
    env = dict(os.environ, CUPY_CACHE_DIR=str(tmp_path / "cupy"),
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("CUPY_CACHE_IN_MEMORY", None)
    args = ("--arch", "sm_80", "--dtypes", "fp16", "--headdims", "32", "--forward-only")
    first = _run("cuflash.precompile", *args, env=env)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "2 compiled, 0 already cached, 0 failed" in first.stdout
    assert len(list((tmp_path / "cupy").iterdir())) == 2
    second = _run("cuflash.precompile", *args, env=env)
    assert second.returncode == 0 and "0 compiled, 2 already cached" in second.stdout
    # What a run-time get_kernel on an sm_80 device looks up: the same key. (A GPU load is
    # what --device checks; here the entries are found by CuPy's own compile path.)
    from cuflash.ops import forward
    c = forward.mma_config("float16", 32, False, False)
    code = ("import os, sys; from cuflash import _compile; "
            f"sys.exit(_compile.cache_kernel({c.filename!r}, {c.name_expression!r}, "
            "'sm_80'))")
    found = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, timeout=600)
    assert found.returncode == 0  # False: already cached, nothing compiled


def test_precompile_without_gpu_or_arch_says_what_to_do(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    pytest.importorskip("cupy")
    from cuflash.precompile import _first_gpu
    if _first_gpu() is not None:
        pytest.skip("a GPU is visible")
    result = _run("cuflash.precompile", "--dtypes", "bf16", env=env)
    assert result.returncode == 2 and "--arch" in result.stderr


# --- compile check cache ---------------------------------------------------------------

def test_compile_check_reuses_results_until_a_source_changes(nvrtc, tmp_path):
    # In a subprocess: the check forks its workers, which a process with threads (JAX,
    # imported by other tests) must not do.
    env = dict(os.environ, CUFLASH_CACHE_DIR=str(tmp_path),
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    args = ("-k", "varlen_check", "--arch", "sm_80,sm_90", "-j", "1")
    first = _run("cuflash.compile_check", *args, env=env)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "2/2 instantiations compiled without spills, within their arch's shared memory; " \
        "0 reused" in first.stdout
    results = json.loads((tmp_path / "compile_check" / "results.json").read_text())
    assert len(results["entries"]) >= 2
    second = _run("cuflash.compile_check", *args, env=env)
    assert second.returncode == 0
    assert "2 reused from" in second.stdout and second.stdout.count("(cached)") == 2
    forced = _run("cuflash.compile_check", *args, "--no-cache", env=env)
    assert forced.returncode == 0 and "(cached)" not in forced.stdout


def test_compile_check_key_follows_the_included_files(tmp_path, monkeypatch, nvrtc):
    (tmp_path / "common").mkdir()
    (tmp_path / "common" / "h.cuh").write_text("#pragma once\n")
    (tmp_path / "a.cu").write_text('#include "common/h.cuh"\n')
    (tmp_path / "b.cu").write_text("// no includes\n")
    monkeypatch.setattr(_compile, "source_dir", lambda: tmp_path)
    _compile.source_fingerprint.cache_clear()
    try:
        def keys():
            _compile.source_fingerprint.cache_clear()
            return [compile_check.ResultCache.key("kernel", "sm_80", f, "k")
                    for f in ("a.cu", "b.cu")]
        a, b = keys()
        (tmp_path / "common" / "h.cuh").write_text("#pragma once\n// edited\n")
        a2, b2 = keys()
        assert a2 != a and b2 == b  # only what includes the edited header recompiles
    finally:
        _compile.source_fingerprint.cache_clear()
