"""Device-side checks of the Hopper forward kernel (kernels_cu/flash_fwd_sm90.cu).

    PYTHONPATH=. python bench/sm90_check.py smoke [--out DIR]
    PYTHONPATH=. python bench/sm90_check.py tiles 128:176,64:192 [tune_fwd.py arguments]
    PYTHONPATH=. python bench/sm90_check.py overhead

``smoke`` runs a few small cases, simplest first, each in its own process with a time limit
(a kernel that deadlocks on an mbarrier, or faults, takes down only that case), and prints
the out and lse errors against the float64 reference; it exits 0 if all pass, 1 on wrong
results, 2 if a case hung or crashed. On a
failure it saves the case's inputs and outputs (``smoke_<case>.npz``) for offline study.
``overhead`` splits short calls into host and GPU time (per call with events around each
call as tune_fwd.py times, back to back, host only) for cuflash and torch flash, and
profiles cuflash's host path. ``tiles`` overrides FWD_SM90_TILES (head dim: Bc) and runs
bench/tune_fwd.py, to time other key-block sizes in the same process as the peers.
"""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np

CASES = {  # name: (dtype, batch, seqlen_q, seqlen_k, nheads, nheads_kv, headdim, options)
    "bf16_d64_one_block": ("bf16", 1, 128, 128, 1, 1, 64, {}),
    "bf16_d128_one_block": ("bf16", 1, 128, 128, 1, 1, 128, {}),
    "bf16_d128_tails": ("bf16", 2, 200, 1000, 2, 2, 128, {}),
    "fp16_d64_causal_gqa": ("fp16", 2, 777, 1000, 4, 2, 64, {"causal": True}),
    "bf16_d40_window_softcap": ("bf16", 1, 300, 300, 2, 1, 40,
                                {"window": (50, 10), "softcap": 3.0}),
    # more tiles than SMs: the persistent grid's CTAs walk several (some with no key)
    "bf16_d128_many_tiles": ("bf16", 4, 1025, 1025, 8, 2, 128, {}),
    "fp16_d64_empty_tiles": ("fp16", 3, 1100, 300, 8, 8, 64, {"causal": True}),
}


def run_case(name, out_dir):
    import cupy
    import ml_dtypes

    import cuflash
    from cuflash import _launch, reference
    dname, batch, sq, sk, h, hkv, d, opts = CASES[name]
    dtype = {"bf16": np.dtype(ml_dtypes.bfloat16), "fp16": np.dtype(np.float16)}[dname]
    launched = []
    real_launch = _launch.launch

    def spy(device_id, filename, *args, **kwargs):
        launched.append(filename)
        return real_launch(device_id, filename, *args, **kwargs)

    _launch.launch = spy
    rng = np.random.default_rng(0)
    q = rng.standard_normal((batch, sq, h, d)).astype(dtype)
    k = rng.standard_normal((batch, sk, hkv, d)).astype(dtype)
    v = rng.standard_normal((batch, sk, hkv, d)).astype(dtype)
    out, lse = cuflash.attention_forward(cupy.asarray(q), cupy.asarray(k), cupy.asarray(v),
                                         **opts)
    cupy.cuda.Device().synchronize()
    out, lse = out.get(), lse.get()
    ref_out, ref_lse = reference.attention_forward(q, k, v, upcast=True, **opts)
    naive_out, _ = reference.attention_forward(q, k, v, upcast=False, **opts)
    finite = np.isfinite(ref_lse)
    err_out = np.abs(out.astype(np.float64) - ref_out).max()
    err_lse = np.abs(lse[finite] - ref_lse[finite]).max() if finite.any() else 0.0
    bound = 2 * np.abs(naive_out.astype(np.float64) - ref_out).max() + 2.0 ** -7
    ok = bool(err_out <= bound and err_lse <= 1e-3 * max(1, np.abs(ref_lse[finite]).max())
              and np.isfinite(out).all() and (np.isneginf(lse) == ~finite).all())
    print(f"{name:26} {','.join(launched):18} out err {err_out:.3e} (bound {bound:.3e})  "
          f"lse err {err_lse:.3e}  {'ok' if ok else 'FAIL'}", flush=True)
    if not ok:
        rows = np.abs(out.astype(np.float64) - ref_out).max(axis=(0, 2, 3))
        print(f"  rows with error > bound: {np.flatnonzero(rows > bound)[:40].tolist()}")
        if out_dir:
            np.savez_compressed(os.path.join(out_dir, f"smoke_{name}.npz"), q=q.view(np.uint16),
                                k=k.view(np.uint16), v=v.view(np.uint16),
                                out=out.astype(np.float32), lse=lse, ref_out=ref_out,
                                ref_lse=ref_lse)
    return ok


def smoke(argv):
    out_dir = argv[argv.index("--out") + 1] if "--out" in argv else None
    failed = hung = 0
    for name in CASES:
        cmd = [sys.executable, __file__, "case", name] + (["--out", out_dir] if out_dir else [])
        try:
            rc = subprocess.run(cmd, timeout=60).returncode
        except subprocess.TimeoutExpired:
            print(f"{name:26} TIMEOUT (a deadlock?)", flush=True)
            rc, hung = 1, hung + 1
        failed += rc != 0
        if rc not in (0, 1):
            print(f"{name:26} crashed with exit code {rc}", flush=True)
            hung += 1
    print(f"smoke: {len(CASES) - failed}/{len(CASES)} cases passed")
    # 2: a case hung or crashed (not worth running more); 1: wrong results only.
    return 2 if hung else (1 if failed else 0)


def overhead(argv):
    """Split a short call's time into host work and GPU work, for cuflash and torch flash."""
    import cProfile
    import pstats
    import time

    import cupy
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import cuflash

    def per_call(fn, n=30):  # events around each call, as tune_fwd.py times
        ts = []
        for _ in range(n):
            a, b = cupy.cuda.Event(), cupy.cuda.Event()
            a.record()
            fn()
            b.record()
            b.synchronize()
            ts.append(cupy.cuda.get_elapsed_time(a, b))
        return float(np.median(ts)) * 1e3

    def pipelined(fn, n=50):  # back to back: the GPU time when the host keeps ahead
        a, b = cupy.cuda.Event(), cupy.cuda.Event()
        a.record()
        for _ in range(n):
            fn()
        b.record()
        b.synchronize()
        return cupy.cuda.get_elapsed_time(a, b) / n * 1e3

    def host(fn, n=50):
        cupy.cuda.Device().synchronize()
        t = time.perf_counter()
        for _ in range(n):
            fn()
        t = (time.perf_counter() - t) / n * 1e6
        cupy.cuda.Device().synchronize()
        return t

    print(f"{'config':24} {'impl':8} {'per-call us':>11} {'pipelined us':>12} {'host us':>8}")
    for dt, hd, n, causal in (("bf16", 64, 512, False), ("bf16", 64, 512, True),
                              ("bf16", 128, 512, False), ("bf16", 128, 1024, True)):
        batch, heads = 16384 // n, 2048 // hd
        q, k, v = (torch.randn(batch, n, heads, hd, device="cuda", dtype=torch.bfloat16)
                   for _ in range(3))
        cq, ck, cv = (cupy.from_dlpack(t) for t in (q, k, v))
        tq, tk, tv = (t.transpose(1, 2) for t in (q, k, v))

        def ours():
            return cuflash.attention(cq, ck, cv, causal=causal)

        def flash():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(tq, tk, tv, is_causal=causal)

        for name, fn in (("cuflash", ours), ("flash", flash)):
            for _ in range(5):
                fn()
            print(f"{dt} hd{hd} {n} {'causal' if causal else 'full':7} {name:8} "
                  f"{per_call(fn):11.1f} {pipelined(fn):12.1f} {host(fn):8.1f}", flush=True)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(200):
        ours()
    prof.disable()
    cupy.cuda.Device().synchronize()
    pstats.Stats(prof).sort_stats("tottime").print_stats(14)
    return 0


def tiles(argv):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import tune_fwd

    from cuflash import _dispatch
    for item in argv[0].split(","):
        hd, bn = (int(x) for x in item.split(":"))
        _dispatch.FWD_SM90_TILES[hd] = _dispatch.FwdSm90Tile(bn, bn, "tuning override")
        print(f"FWD_SM90_TILES[{hd}] = Bc {bn}")
    return tune_fwd.main(argv[1:])


if __name__ == "__main__":
    if sys.argv[1] == "case":
        out_dir = sys.argv[sys.argv.index("--out") + 1] if "--out" in sys.argv else None
        sys.exit(0 if run_case(sys.argv[2], out_dir) else 1)
    sys.exit({"smoke": smoke, "tiles": tiles, "overhead": overhead}[sys.argv[1]](sys.argv[2:]))
