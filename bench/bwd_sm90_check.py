"""Device-side smoke check of the Hopper backward (kernels_cu/flash_bwd_sm90.cu).

    PYTHONPATH=. python bench/bwd_sm90_check.py [--out DIR]

Runs small cases, simplest first, each in its own process with a time limit (a hang or a
fault takes down only that case): dq, dk, dv of the wgmma kernel against the float64
reference (the tests' accuracy rule) and against bwd_main (mma.sync) on the same inputs.
On a failure it prints where the error sits (rows, 8-column chunks, 64-column blocks: the
signatures of a wrong swizzle, descriptor stride or fragment layout) and saves the case
(``bwd_<case>.npz``). Exits 1 unless every case passes.
"""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np

CASES = {  # name: (dtype, batch, seqlen_q, seqlen_k, nheads, nheads_kv, headdim, options)
    "bf16_d128_one_block": ("bf16", 1, 64, 128, 1, 1, 128, {}),
    "bf16_d64_one_block": ("bf16", 1, 128, 128, 1, 1, 64, {}),
    "bf16_d128_tails_gqa": ("bf16", 2, 150, 200, 4, 2, 128, {}),
    "fp16_d64_causal": ("fp16", 1, 333, 333, 2, 1, 64, {"causal": True}),
    "fp16_d120_causal_sq_gt_sk": ("fp16", 1, 300, 100, 2, 2, 120, {"causal": True}),
    "bf16_d48_window": ("bf16", 2, 203, 301, 4, 2, 48, {"window": (64, 20)}),
}


def run_case(name, out_dir):
    import cupy
    import ml_dtypes

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
    import cuflash
    from accuracy import assert_close
    from cuflash import _dispatch, _launch, reference
    dname, batch, sq, sk, h, hkv, d, opts = CASES[name]
    dtype = {"bf16": np.dtype(ml_dtypes.bfloat16), "fp16": np.dtype(np.float16)}[dname]
    launched = []
    real_launch = _launch.launch

    def spy(device_id, filename, name_expression, *args, **kwargs):
        launched.append(name_expression.split("<")[0].split("::")[-1])
        return real_launch(device_id, filename, name_expression, *args, **kwargs)

    _launch.launch = spy
    rng = np.random.default_rng(0)
    q, k, v, do = (rng.standard_normal(s).astype(dtype) for s in
                   ((batch, sq, h, d), (batch, sk, hkv, d), (batch, sk, hkv, d), (batch, sq, h, d)))
    out, lse = reference.attention_forward(q, k, v, upcast=True, **opts)
    args = [cupy.asarray(x) for x in (do, q, k, v, out.astype(dtype))] + [
        cupy.asarray(lse.astype(np.float32))]
    got = [g.get() for g in cuflash.attention_backward(*args, **opts)]
    cupy.cuda.Device().synchronize()
    _dispatch.BWD_SM90_ENABLED = False
    mma = [g.get() for g in cuflash.attention_backward(*args, **opts)]
    _dispatch.BWD_SM90_ENABLED = True
    ref = reference.attention_backward(do, q, k, v, upcast=True, **opts)
    naive = reference.attention_backward(do, q, k, v, upcast=False, **opts)
    ok = True
    for gname, g, m, r, n in zip(("dq", "dk", "dv"), got, mma, ref, naive):
        g64 = g.astype(np.float64)
        err = np.abs(g64 - r)
        try:
            assert_close(gname, g, r, n)
            verdict = "ok"
        except AssertionError as e:
            verdict, ok = f"FAIL ({str(e).splitlines()[0][:80]})", False
        print(f"{name:28} {gname} err {err.max():.3e} |ref| {np.abs(r).max():.3e} "
              f"vs mma.sync {np.abs(g64 - m.astype(np.float64)).max():.3e} "
              f"nan {int(np.isnan(g64).sum())}  {verdict}", flush=True)
        if verdict != "ok":
            bad = err > 4 * np.abs(n.astype(np.float64) - r).max() + 1e-2
            rows = np.flatnonzero(bad.any(axis=(0, 2, 3)))
            cols = np.flatnonzero(bad.any(axis=(0, 1, 2)))
            print(f"  bad rows ({len(rows)}): {rows[:32].tolist()}\n"
                  f"  bad cols ({len(cols)}): {cols[:64].tolist()}\n"
                  f"  bad fraction {bad.mean():.3f}; rows % 8 {np.bincount(rows % 8, minlength=8).tolist()}"
                  f"; 64-row blocks {np.bincount(rows // 64).tolist()}")
            num = (g64 * r).sum()
            print(f"  <got, ref> / <ref, ref> = {num / max((r * r).sum(), 1e-30):.4f}  "
                  f"|got| / |ref| = {np.linalg.norm(np.nan_to_num(g64)) / max(np.linalg.norm(r), 1e-30):.4f}")
    print(f"{name:28} kernels: {','.join(launched)}", flush=True)
    if not ok and out_dir:
        np.savez_compressed(os.path.join(out_dir, f"bwd_{name}.npz"),
                            **{f"got_{n}": g.astype(np.float32) for n, g in zip("qkv", got)},
                            **{f"ref_{n}": r for n, r in zip("qkv", ref)})
    return ok


def main(argv):
    out_dir = argv[argv.index("--out") + 1] if "--out" in argv else None
    if "--case" in argv:
        return 0 if run_case(argv[argv.index("--case") + 1], out_dir) else 1
    failed = 0
    for name in CASES:
        cmd = [sys.executable, __file__, "--case", name] + (["--out", out_dir] if out_dir else [])
        try:
            rc = subprocess.run(cmd, timeout=120).returncode
        except subprocess.TimeoutExpired:
            print(f"{name:28} TIMEOUT (hang)", flush=True)
            rc = 1
        failed += rc != 0
        if rc not in (0, 1):
            print(f"{name:28} crashed (exit {rc})", flush=True)
    print(f"bwd_sm90_check: {len(CASES) - failed}/{len(CASES)} cases pass", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
