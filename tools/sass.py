"""The SASS of one kernel instantiation, compiled as the run time compiles it, no GPU needed.

    .venv/bin/python tools/sass.py flash_fwd_sm90.cu \
        "cuflash::flash_fwd_sm90<__nv_bfloat16, 128, 128, 2, 0>" --arch sm_90a
    .venv/bin/python tools/sass.py flash_fwd.cu \
        "cuflash::flash_fwd<__half, 64, 128, 64, 4, false>" --arch sm_80 --dump k.sass

Prints ptxas' report (registers, spills, and any warning such as C7518, wgmma serialized)
and a count of the instructions worth checking before a device run: tensor-core ops (HGMMA,
HMMA), their waits (WARPGROUP.DEPBAR), barriers (BAR), TMA and bulk copies (UTMALDG,
UBLKCP), setmaxnreg (USETMAXREG) and local memory (LDL/STL: spills). --dump writes the whole
SASS; --loops N lists every loop of at least N instructions with its opcode counts (the
key-block loop of a kernel is the one with its MUFU and HGMMA: what an iteration issues).
Needs cuobjdump and the nvdisasm it calls: on PATH, or `pip install nvidia-cuda-cuobjdump
nvidia-cuda-nvdisasm` into the venv.
"""
from __future__ import annotations

import argparse
import collections
import ctypes
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cuflash import _compile  # noqa: E402

WATCH = ("HGMMA", "HMMA", "WARPGROUP.DEPBAR", "WARPGROUP.ARRIVE", "BAR.SYNC", "BAR.ARV",
         "UTMALDG", "UBLKCP", "USETMAXREG", "LDL", "STL")
INSTRUCTION = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", re.M)
BRANCH = re.compile(r"\bBRA(?:\.\S+)?\s+(0x[0-9a-f]+)")


def instructions(sass: str) -> list:
    """(address, text) of every instruction of a cuobjdump listing, in order."""
    return [(int(address, 16), text) for address, text in INSTRUCTION.findall(sass)]


def mnemonic(text: str) -> str:
    """An instruction's opcode with its modifiers, without its predicate."""
    words = text.split()
    return words[1] if words[0].startswith("@") else words[0]


def opcode(text: str) -> str:
    """The opcode of an instruction's text, without its predicate and modifiers."""
    return mnemonic(text).split(".")[0]


def loops(sass: str, min_size: int = 1) -> list:
    """The loops of a cuobjdump listing, largest first: (first address, address of the
    branch back, opcode counts of the instructions between) for every branch to an earlier
    address whose span holds at least ``min_size`` instructions. Static counts: branches
    inside a span (a masked path skipped on most iterations) are counted as if taken."""
    ins = instructions(sass)
    index = {address: k for k, (address, _) in enumerate(ins)}
    found = []
    for k, (address, text) in enumerate(ins):
        branch = BRANCH.search(text)
        target = int(branch.group(1), 16) if branch else address
        if target < address and target in index and k + 1 - index[target] >= min_size:
            found.append((target, address, collections.Counter(
                opcode(t) for _, t in ins[index[target]:k + 1])))
    return sorted(found, key=lambda loop: -sum(loop[2].values()))


def _nvidia_file(*parts: str) -> Path | None:
    """A file of the pip-installed CUDA components (nvidia/cu13/..., nvidia/cuda_*/...)."""
    try:
        import nvidia
    except ImportError:
        return None
    for root in map(Path, nvidia.__path__):
        found = sorted(root.glob("/".join(("*",) + parts)))
        if found:
            return found[-1]
    return None


def compile_cubin(filename: str, name: str, arch: str) -> tuple[bytes, str]:
    """(cubin, ptxas log) from NVRTC with the run time's options and -Xptxas -v."""
    lib = ctypes.CDLL(str(_nvidia_file("lib", "libnvrtc.so*") or "libnvrtc.so"))
    prog = ctypes.c_void_p()
    source = _compile.read_source(filename).encode()
    if lib.nvrtcCreateProgram(ctypes.byref(prog), source, filename.encode(), 0, None, None):
        raise RuntimeError("nvrtcCreateProgram failed")
    try:
        lib.nvrtcAddNameExpression(prog, name.encode())
        opts = [o.encode() for o in _compile.options(arch, filename)] + [b"-Xptxas", b"-v"]
        failed = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, log)
        if failed:
            raise RuntimeError(log.value.decode())
        lib.nvrtcGetCUBINSize(prog, ctypes.byref(size))
        cubin = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetCUBIN(prog, cubin)
        return cubin.raw, log.value.decode()
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("filename", help="a file of kernels_cu/, e.g. flash_fwd_sm90.cu")
    parser.add_argument("name", help="the instantiation, as cuflash/ops names it")
    parser.add_argument("--arch", default="sm_90a", help="sm_80, sm_86, sm_90a, ...")
    parser.add_argument("--dump", metavar="FILE", help="write the whole SASS here")
    parser.add_argument("--loops", metavar="N", type=int,
                        help="list the loops of at least N instructions")
    args = parser.parse_args(argv)
    cuobjdump = shutil.which("cuobjdump") or _nvidia_file("bin", "cuobjdump")
    nvdisasm = shutil.which("nvdisasm") or _nvidia_file("bin", "nvdisasm")
    if cuobjdump is None or nvdisasm is None:
        sys.exit("sass.py needs cuobjdump and nvdisasm: pip install nvidia-cuda-cuobjdump "
                 "nvidia-cuda-nvdisasm")
    cubin, log = compile_cubin(args.filename, args.name, args.arch)
    print("\n".join(line for line in log.splitlines() if line.strip()))
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        env = dict(os.environ, PATH=f"{Path(nvdisasm).parent}{os.pathsep}{os.environ['PATH']}")
        sass = subprocess.run([str(cuobjdump), "-sass", f.name], capture_output=True,
                              text=True, check=True, env=env).stdout
    if args.dump:
        Path(args.dump).write_text(sass)
    ops = collections.Counter(op for op in (mnemonic(t) for _, t in instructions(sass))
                              if op.startswith(WATCH))
    for op, n in sorted(ops.items()):
        print(f"{n:6d}  {op}")
    for first, last, counts in loops(sass, args.loops) if args.loops else ():
        mix = ", ".join(f"{op} {n}" for op, n in counts.most_common(16))
        print(f"loop {first:#x}-{last:#x}: {sum(counts.values())} instructions: {mix}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
