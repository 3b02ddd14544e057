"""The compile layer: sources from package data, fingerprinted options, error reporting.

These run NVRTC without a GPU (CuPy's ctk extra brings it), as CI does.
"""
import re
import sys
from pathlib import Path

import pytest

from cuflash import _compile

nvrtc = pytest.importorskip("cupy_backends.cuda.libs.nvrtc")

GOOD = """
template <typename T, int N> __global__ void scale_by(T* x) { x[threadIdx.x] *= N; }
"""
BAD = """
template <typename T, int N> __global__ void scale_by(T* x) { x[threadIdx.x] *= undefined_name; }
"""


@pytest.fixture
def sources(tmp_path, monkeypatch):
    """Point the compile layer at a scratch kernels_cu/ and clear its caches around the test."""
    (tmp_path / "common").mkdir()
    (tmp_path / "common" / "h.cuh").write_text("#pragma once\n")
    (tmp_path / "k.cu").write_text('#include "common/h.cuh"\n' + GOOD)
    caches = (_compile.source_dir, _compile.source_fingerprint, _compile.read_source)

    def clear():
        for c in caches:
            c.cache_clear()

    clear()
    monkeypatch.setattr(_compile, "source_dir", lambda: tmp_path)
    yield tmp_path, clear
    clear()


def test_sources_come_from_the_package():
    # Package data in an installed wheel, else the top-level kernels_cu/ of the source tree
    # that pyproject.toml maps to cuflash.kernels_cu.
    root = _compile.source_dir()
    package = Path(_compile.__file__).resolve().parent
    assert root in (package / "kernels_cu", package.parent / "kernels_cu")
    assert (root / "common" / "mma.cuh").is_file()
    assert (root / "flash_fwd.cu").is_file()


def test_header_edit_changes_the_compile_options(sources):
    root, clear = sources
    before = _compile.options("sm_90", "k.cu")
    (root / "common" / "h.cuh").write_text("#pragma once\n// edited\n")
    clear()
    after = _compile.options("sm_90", "k.cu")
    assert before != after
    assert any("CUFLASH_FINGERPRINT" in o for o in after)


def test_the_nvrtc_library_is_in_the_compile_options(sources):
    # CuPy's cache keys on NVRTC's version only; two builds of one version (torch's or JAX's
    # loaded first) must not share cubins.
    identity = _compile.nvrtc_identity()
    if sys.platform.startswith("linux"):
        assert re.fullmatch(r"[0-9a-f]{16}", identity)
    assert _compile.options("sm_90", "k.cu")[-1] == f"-DCUFLASH_NVRTC=0x{identity}ULL" \
        or not identity


def test_report_gives_registers_and_no_spills(sources):
    r = _compile.compile_report("k.cu", "scale_by<float, 3>", "sm_90")
    assert r.registers > 0
    assert (r.stack_bytes, r.spill_stores, r.spill_loads) == (0, 0, 0)


def test_compile_error_names_the_kernel_and_shows_the_log(sources):
    root, clear = sources
    (root / "k.cu").write_text(BAD)
    clear()
    with pytest.raises(_compile.CompileError) as e:
        _compile.compile_report("k.cu", "scale_by<float, 3>", "sm_80")
    message = str(e.value)
    assert "scale_by<float, 3>" in message and "k.cu" in message and "sm_80" in message
    assert "undefined_name" in message  # the compiler log itself


def test_hopper_only_sources_compile_for_sm90a_and_nowhere_else():
    from cuflash import ops
    assert _compile.target_arch("flash_fwd_sm90.cu", "sm_90") == "sm_90a"
    assert _compile.target_arch("flash_fwd_sm90.cu", "sm_80") is None
    assert _compile.target_arch("flash_fwd.cu", "sm_90") == "sm_90"
    names = [n for f, n, _ in ops.all_kernels("sm_90") if f == ops.forward.SM90_FILE]
    assert not any(f == ops.forward.SM90_FILE for f, _, _ in ops.all_kernels("sm_80"))
    assert names, "the compile check must see the Hopper forward kernels"
    r = _compile.compile_report(ops.forward.SM90_FILE, names[0], "sm_90a")
    assert (r.stack_bytes, r.spill_stores, r.spill_loads) == (0, 0, 0)


def test_generated_wgmma_header_is_current():
    """kernels_cu/common/wgmma.cuh is what tools/gen_wgmma.py writes."""
    import subprocess
    import sys
    from pathlib import Path
    script = Path(__file__).resolve().parent.parent / "tools" / "gen_wgmma.py"
    assert subprocess.run([sys.executable, str(script), "--check"]).returncode == 0


@pytest.mark.parametrize("name", [
    "cuflash::flash_fwd_sm90<__nv_bfloat16, 192, 112, 2, 0, false, 128>",
    "cuflash::flash_fwd_sm90<__half, 192, 96, 2, 4, true, 128>",
])
def test_hopper_forward_takes_a_head_dim_of_v_of_its_own(name):
    """The Hopper forward's traits allow V (and O) a head dim other than Q's and K's (192 /
    128 as DeepSeek's attention has): no API passes one yet, but the kernel compiles for it,
    without spills."""
    report = _compile.compile_report("flash_fwd_sm90.cu", name, "sm_90a")
    assert not (report.spill_stores or report.spill_loads or report.stack_bytes), report


@pytest.mark.parametrize("name", [
    "cuflash::bwd_sm90<__nv_bfloat16, 128, 128, 64, 0, false, 64>",
    "cuflash::bwd_sm90<__half, 128, 128, 64, 1, true, 64>",
    "cuflash::bwd_sm90_wide<__nv_bfloat16, 256, 0, false, 128>",
    "cuflash::bwd_sm90_wide<__half, 256, 2, true, 128>",
])
def test_hopper_backward_takes_a_head_dim_of_v_of_its_own(name):
    """The Hopper backward's traits allow V and dO a head dim other than Q's and K's (128 /
    64, and DeepSeek's 192 / 128 as 256 / 128): the kernels compile for it, without spills."""
    report = _compile.compile_report("flash_bwd_sm90.cu", name, "sm_90a")
    assert not (report.spill_stores or report.spill_loads or report.stack_bytes), report
