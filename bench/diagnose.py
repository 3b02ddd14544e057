"""Device-side checks of the Hopper kernels (kernels_cu/flash_fwd_sm90.cu, flash_bwd_sm90.cu).

    PYTHONPATH=. python bench/diagnose.py smoke [--only fwd|bwd] [--out DIR]
    PYTHONPATH=. python bench/diagnose.py overhead [--only fwd|bwd]
    PYTHONPATH=. python bench/diagnose.py decode [--shapes 1x1024,16x4096] [--splits 1,8]
    PYTHONPATH=. python bench/diagnose.py nvrtc [--peers-first]
    PYTHONPATH=. python bench/diagnose.py calls fwd|bwd [--headdim 128] [--seqlen 4096]
        [--causal] [--impl cuflash|torch-cudnn|jax-cudnn|fa3|...] [--kernels N]
    PYTHONPATH=. python bench/diagnose.py clocks fwd|bwd [--headdim 128] [--seqlen 4096]
        [--causal] [--impls cuflash,fa3] [--seconds 3]

(Formerly bench/sm90_check.py, bench/bwd_sm90_check.py and bench/overhead_bwd.py.)

``smoke`` runs small cases, simplest first, forward then backward, each in its own process
with a time limit (a kernel that deadlocks on an mbarrier, or faults, takes down only that
case). Forward: out and lse errors against the float64 reference. Backward: dq, dk, dv of
the wgmma kernel against the float64 reference (the tests' accuracy rule) and against
bwd_main (mma.sync) on the same inputs; on a failure it prints where the error sits (rows,
8-column chunks, 64-column blocks: the signatures of a wrong swizzle, descriptor stride or
fragment layout). A failing case saves its inputs and outputs (``smoke_<case>.npz`` forward,
``bwd_<case>.npz`` backward) into --out for offline study. Exits 0 if all pass, 1 on wrong
results, 2 if a case hung or crashed.

``overhead`` splits short calls into host and GPU time for cuflash and torch flash on the
same inputs: per call (events around each call, as bench/tune.py times), back to back
(events around many calls: the GPU time when the host keeps ahead) and, forward, host time
alone plus a profile of cuflash's host path. The difference between per call and back to
back is host time inside the per-call measurement (microseconds).

``decode`` splits decode calls (bench/decode.py's shape, L2 flushed before each call) into
host time, kernel time (CUPTI, through torch.profiler, which sees every kernel of the
process, CuPy's included) and time between events, for cuflash (contiguous and paged) and
torch flash / cudnn, and times cuflash at several forced ``num_splits``.

``nvrtc`` names the NVRTC library this process compiles with (from /proc/self/maps), the
size and hash of every cubin it writes into ``CUPY_CACHE_DIR`` (give it an empty one) and
the backward's time at head dim 128, seqlen 4k; with ``--peers-first`` torch and JAX start
on the GPU before cuflash compiles, as in the sweep. Two runs side by side show whether a
peer's NVRTC can replace CuPy's and change the code.

``calls`` makes a few forward or backward calls at one sweep shape (bf16, or fp16 with
``--dtype``; standard batch; any implementation of the sweep: cuflash and its variants,
torch and JAX cuDNN, FA3), for a
profiler to pick one launch from: `ncu --launch-skip 2 --launch-count 1 -k
regex:flash_fwd_sm90 python3 bench/diagnose.py calls fwd` (bench/device_session.sh's
`profile` stage). With ``--kernels N`` it then lists the kernels of N more calls, back to
back, with their times (a backward's preprocess, main kernel and conversion, side by side
with a peer's).

``clocks`` runs each implementation's calls back to back for a few seconds, alternately (A
B B A), and reads the board's SM clock, power and energy counter through NVML meanwhile:
ms a call, MHz, W and mJ a call side by side, and the clock event reasons (power cap,
thermal slowdown). A card that slows as it warms (an H100 fell from 1680 to 1300 MHz within
seconds) times each implementation at another clock; this says what each takes at the same
one, and how much energy.

The Hopper forward's tile candidates are timed side by side by bench/fwd_tiles.py.
"""
from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys

import numpy as np

from _common import (DTYPES, Difference, Nvml, Runner, Timing, back_to_back_ms, flops,
                     host_us, make_inputs, per_call_ms, require_gpu, run_torch,
                     standard_shape, synchronize)
import sweep

# name: (dtype, batch, seqlen_q, seqlen_k, nheads, nheads_kv, headdim, options)
FWD_CASES = {
    "bf16_d64_one_block": ("bf16", 1, 128, 128, 1, 1, 64, {}),
    "bf16_d128_one_block": ("bf16", 1, 128, 128, 1, 1, 128, {}),
    "bf16_d128_tails": ("bf16", 2, 200, 1000, 2, 2, 128, {}),
    "fp16_d64_causal_gqa": ("fp16", 2, 777, 1000, 4, 2, 64, {"causal": True}),
    "bf16_d40_window_softcap": ("bf16", 1, 300, 300, 2, 1, 40,
                                {"window": (50, 10), "softcap": 3.0}),
    # more tiles than SMs: the persistent grid's CTAs walk several (some with no key)
    "bf16_d128_many_tiles": ("bf16", 4, 1025, 1025, 8, 2, 128, {}),
    "fp16_d64_empty_tiles": ("fp16", 3, 1100, 300, 8, 8, 64, {"causal": True}),
    # head dims padded into a wgmma kernel (32 in 64, 96 in 128), and 192 / 256
    "bf16_d32_one_block": ("bf16", 1, 128, 128, 1, 1, 32, {}),
    "fp16_d96_causal": ("fp16", 2, 300, 300, 4, 2, 96, {"causal": True}),
    "bf16_d192_tails": ("bf16", 2, 200, 1000, 2, 2, 192, {}),
    "bf16_d256_many_tiles": ("bf16", 2, 1100, 1100, 64, 8, 256, {"causal": True}),
    # score options fixed at compile time (ALiBi alone: two consumers at hd64 over 2k
    # keys), and both together (OPTS_RUNTIME)
    "bf16_d64_alibi_causal": ("bf16", 1, 2100, 2100, 2, 2, 64,
                              {"causal": True, "alibi_slopes": (0.25, 0.0625)}),
    "fp16_d128_softcap_alibi": ("fp16", 1, 300, 500, 2, 1, 128,
                                {"softcap": 5.0, "alibi_slopes": (0.5, 0.125),
                                 "window": (200, 20)}),
}
BWD_CASES = {
    "bf16_d128_one_block": ("bf16", 1, 64, 128, 1, 1, 128, {}),
    "bf16_d64_one_block": ("bf16", 1, 128, 128, 1, 1, 64, {}),
    "bf16_d128_tails_gqa": ("bf16", 2, 150, 200, 4, 2, 128, {}),
    "fp16_d64_causal": ("fp16", 1, 333, 333, 2, 1, 64, {"causal": True}),
    "fp16_d120_causal_sq_gt_sk": ("fp16", 1, 300, 100, 2, 2, 120, {"causal": True}),
    "bf16_d48_window": ("bf16", 2, 203, 301, 4, 2, 48, {"window": (64, 20)}),
    # soft-cap, and deterministic mode (reduce-adds in key-block order: a wrong turn number
    # waits forever, which the time limit turns into a TIMEOUT)
    "bf16_d128_softcap_causal": ("bf16", 2, 300, 300, 4, 2, 128, {"causal": True,
                                                                  "softcap": 4.0}),
    "bf16_d128_det_causal": ("bf16", 2, 700, 700, 4, 2, 128, {"causal": True,
                                                              "deterministic": True}),
    "fp16_d64_det_window": ("fp16", 1, 900, 1000, 4, 4, 64, {"window": (300, 50),
                                                             "deterministic": True}),
    # padded into bwd_sm90 (32 in 64), and head dims over 128 on bwd_sm90_wide
    "bf16_d32_causal": ("bf16", 1, 200, 200, 2, 2, 32, {"causal": True}),
    "bf16_d256_one_block": ("bf16", 1, 64, 64, 1, 1, 256, {}),
    "fp16_d256_tails_gqa": ("fp16", 2, 150, 200, 4, 2, 256, {"causal": True}),
    "bf16_d192_softcap_window": ("bf16", 1, 333, 400, 2, 1, 192, {"window": (100, 30),
                                                                  "softcap": 4.0}),
    # bwd_sm90_wide's dQ turns (a wrong rank waits forever: a TIMEOUT here)
    "bf16_d256_det_causal": ("bf16", 2, 300, 300, 4, 2, 256, {"causal": True,
                                                              "deterministic": True}),
    "fp16_d160_det_window": ("fp16", 1, 333, 400, 2, 1, 160, {"window": (100, 30),
                                                              "deterministic": True}),
}
# direction: (cases, seconds a case may take, width of the name column)
SMOKE = {"fwd": (FWD_CASES, 60, 26), "bwd": (BWD_CASES, 120, 28)}


def spy_launches(launched, kernel_name=False):
    """Record every launch through cuflash._core.Kernel in ``launched``: its file name, or
    with ``kernel_name`` its kernel's name."""
    from cuflash import _core
    real_launch = _core.Kernel.__call__

    def spy(kernel, stream, argv):
        launched.append(kernel.name.split("<")[0].split("::")[-1] if kernel_name
                        else kernel.filename)
        return real_launch(kernel, stream, argv)

    _core.Kernel.__call__ = spy


def fwd_case(name, out_dir):
    import cupy

    import cuflash
    from cuflash import reference
    dname, batch, sq, sk, h, hkv, d, opts = FWD_CASES[name]
    dtype = DTYPES[dname]
    if "alibi_slopes" in opts:
        opts = dict(opts, alibi_slopes=np.array(opts["alibi_slopes"], np.float32))
    gpu_opts = {key: cupy.asarray(x) if key == "alibi_slopes" else x for key, x in opts.items()}
    launched = []
    spy_launches(launched)
    rng = np.random.default_rng(0)
    q = rng.standard_normal((batch, sq, h, d)).astype(dtype)
    k = rng.standard_normal((batch, sk, hkv, d)).astype(dtype)
    v = rng.standard_normal((batch, sk, hkv, d)).astype(dtype)
    out, lse = cuflash.attention_forward(cupy.asarray(q), cupy.asarray(k), cupy.asarray(v),
                                         **gpu_opts)
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


def bwd_case(name, out_dir):
    import cupy

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
    import cuflash
    from accuracy import assert_close
    from cuflash import _checks, _core, ops, reference
    dname, batch, sq, sk, h, hkv, d, opts = BWD_CASES[name]
    opts = dict(opts)
    deterministic = opts.pop("deterministic", False)
    dtype = DTYPES[dname]
    launched = []
    spy_launches(launched, kernel_name=True)
    rng = np.random.default_rng(0)
    q, k, v, do = (rng.standard_normal(s).astype(dtype) for s in
                   ((batch, sq, h, d), (batch, sk, hkv, d), (batch, sk, hkv, d), (batch, sq, h, d)))
    out, lse = reference.attention_forward(q, k, v, upcast=True, **opts)
    args = [cupy.asarray(x) for x in (do, q, k, v, out.astype(dtype))] + [
        cupy.asarray(lse.astype(np.float32))]
    got = [g.get() for g in cuflash.attention_backward(*args, deterministic=deterministic,
                                                       **opts)]
    cupy.cuda.Device().synchronize()
    dout_, q_, k_, v_, out_, lse_ = args
    shape = _checks.check_qkv(q_, k_, v_, gpu=True)
    p = _core.problem(q_, k_, v_, shape, _checks.options(shape, "cupy", q_, **opts))
    strides = (out_.strides, dout_.strides, lse_.strides, q_.strides, k_.strides, v_.strides)
    mma = [g.get() for g in ops.backward.Launch(p, strides, False, hopper=False)(
        dout_, q_, k_, v_, out_, lse_)]
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


def smoke(args):
    failed = hung = total = 0
    for direction in ("fwd", "bwd") if args.only is None else (args.only,):
        cases, timeout, width = SMOKE[direction]
        failed_here = 0
        for name in cases:
            cmd = [sys.executable, os.path.abspath(__file__), "case", direction, name]
            cmd += ["--out", args.out] if args.out else []
            try:
                rc = subprocess.run(cmd, timeout=timeout).returncode
            except subprocess.TimeoutExpired:
                print(f"{name:{width}} TIMEOUT (a deadlock?)", flush=True)
                rc, hung = 1, hung + 1
            failed_here += rc != 0
            if rc not in (0, 1):
                print(f"{name:{width}} crashed with exit code {rc}", flush=True)
                hung += 1
        print(f"smoke {direction}: {len(cases) - failed_here}/{len(cases)} cases passed",
              flush=True)
        failed, total = failed + failed_here, total + len(cases)
    if args.only is None:
        print(f"smoke: {total - failed}/{total} cases passed", flush=True)
    # 2: a case hung or crashed (not worth running more); 1: wrong results only.
    return 2 if hung else (1 if failed else 0)


def case(args):
    run = {"fwd": fwd_case, "bwd": bwd_case}[args.direction]
    return 0 if run(args.name, args.out) else 1


def overhead_fwd(cupy):
    """Forward: per call, back to back and host time, then a profile of cuflash's host path."""
    import cProfile
    import pstats

    import cuflash
    print(f"{'config':24} {'impl':8} {'per-call us':>11} {'pipelined us':>12} {'host us':>8}")
    for hd, n, causal in ((64, 512, False), (64, 512, True), (128, 512, False),
                          (128, 1024, True)):
        batch, nheads = standard_shape(n, hd)
        q, k, v, dout = make_inputs(DTYPES["bf16"], batch, n, nheads, hd)

        def ours():
            return cuflash.attention(q, k, v, causal=causal)

        with run_torch("FLASH_ATTENTION", "fwd", q, k, v, dout, causal) as flash:
            for name, fn in (("cuflash", ours), ("flash", flash)):
                print(f"bf16 hd{hd} {n} {'causal' if causal else 'full':7} {name:8} "
                      f"{per_call_ms(fn, 5, 30) * 1e3:11.1f} "
                      f"{back_to_back_ms(fn, 50) * 1e3:12.1f} {host_us(fn):8.1f}", flush=True)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(200):
        ours()
    prof.disable()
    cupy.cuda.Device().synchronize()
    pstats.Stats(prof).sort_stats("tottime").print_stats(14)


def overhead_bwd():
    """Backward: per call against back to back (20 calls, median of 5)."""
    import cuflash
    for dname in ("bf16", "fp16"):
        for hd, n, causal in ((64, 512, True), (64, 512, False), (64, 1024, True),
                              (128, 512, True), (128, 8192, False)):
            batch, nheads = standard_shape(n, hd)
            q, k, v, dout = make_inputs(DTYPES[dname], batch, n, nheads, hd, seed=n * hd)
            out, lse = cuflash.attention_forward(q, k, v, causal=causal)

            def ours():
                return cuflash.attention_backward(dout, q, k, v, out, lse, causal=causal)

            with run_torch("FLASH_ATTENTION", "bwd", q, k, v, dout, causal) as flash:
                r = {name: (per_call_ms(fn, 3, 30) * 1e3, back_to_back_ms(fn, 20, 5) * 1e3)
                     for name, fn in (("cuflash", ours), ("flash", flash))}
            row_flops = flops("bwd", batch, nheads, n, hd, causal)
            c, f = r["cuflash"], r["flash"]
            print(f"{dname:8} hd{hd:3} {n:5} causal={causal!s:5} | per call us: cuflash "
                  f"{c[0]:7.1f} flash {f[0]:7.1f} ratio {f[0] / c[0]:.2f} | back to back: "
                  f"cuflash {c[1]:7.1f} flash {f[1]:7.1f} ratio {f[1] / c[1]:.2f} "
                  f"| b2b TFLOP/s {row_flops / c[1] / 1e6:.0f} / {row_flops / f[1] / 1e6:.0f}",
                  flush=True)


def overhead(args):
    cupy = require_gpu()
    if args.only in (None, "fwd"):
        overhead_fwd(cupy)
    if args.only in (None, "bwd"):
        overhead_bwd()
    return 0


def device_times(fn, calls: int, before=lambda: None, width: int = 90) -> dict:
    """{name[:width]: microseconds of each launch} of every device activity (kernels,
    memsets, copies) of ``calls`` calls of fn(), ``before()`` ahead of each: CUPTI through
    the torch profiler, which sees CuPy's and XLA's kernels too."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        result = None
        for _ in range(calls):
            before()
            result = fn()
        synchronize(result)
    times = {}
    for e in prof.events():
        if e.device_type.name == "CUDA":
            times.setdefault(e.name[:width], []).append(e.device_time)
    return times


def kernel_us(timer, fn, calls=20, before=None):
    """The summed kernel time of one call (its mean over ``calls``), the L2 flushed before
    each (or ``before()`` run instead, its fills and memsets left out), and each kernel's
    median."""
    import statistics
    times = device_times(fn, calls, before or (lambda: timer.flush.fill(0)), width=60)
    kernels = {n: t for n, t in times.items()
               if "fill" not in n.lower() and "memset" not in n.lower()}
    total = sum(sum(t) for t in kernels.values()) / calls
    return total, {n: statistics.median(t) for n, t in kernels.items()}


def decode(args):
    """Host, kernel and event times of decode calls, and cuflash over forced split counts."""
    import decode as dec
    cupy = require_gpu()
    torch = dec.import_torch()
    import cuflash
    timer = dec.Timer()
    rng = np.random.default_rng(0)

    splits = [int(s) for s in args.splits.split(",")] if args.splits else []
    for shape in args.shapes.split(","):
        batch, length = (int(x) for x in shape.split("x"))
        q, k, v, lengths = dec.inputs(batch, length)
        kp, vp, table = dec.paged(k, v, 64, rng)
        # the same keys in caches 16 rows longer: batch strides off a power of two
        kx, vx = (cupy.zeros((batch, length + 16) + x.shape[2:], x.dtype) for x in (k, v))
        kx[:, :length], vx[:, :length] = k, v
        impls = {
            "cuflash": lambda: cuflash.attention_with_kvcache(q, k, v, cache_seqlens=lengths),
            # the same keys with cache_seqlens a Python int: no length read on the GPU
            "int-len": lambda: cuflash.attention_with_kvcache(q, k, v, cache_seqlens=length),
            "padded": lambda: cuflash.attention_with_kvcache(q, kx, vx, cache_seqlens=lengths),
            "page64": lambda: cuflash.attention_with_kvcache(q, kp, vp, cache_seqlens=lengths,
                                                             block_table=table)}
        for name, backend in dec.TORCH_BACKENDS.items():
            impls[name] = dec.torch_call(torch, backend, q, k, v)[0]
        for s in splits:
            impls[f"splits={s}"] = (lambda s=s: cuflash.attention_with_kvcache(
                q, k, v, cache_seqlens=lengths, num_splits=s))
        print(f"--- batch {batch} length {length}", flush=True)
        for name, fn in impls.items():
            ms = timer(fn)
            total, kernels = kernel_us(timer, fn)
            detail = "; ".join(f"{n} {t:.1f}" for n, t in kernels.items())
            print(f"{name:10} events {ms * 1e3:7.1f} us | kernels {total:6.1f} us | host "
                  f"{host_us(fn):6.1f} us | {detail}", flush=True)
        if args.profile and batch == 1 and length == 1024:  # the host path: its profile
            import cProfile
            import pstats
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(200):
                impls["cuflash"]()
            prof.disable()
            cupy.cuda.Device().synchronize()
            pstats.Stats(prof).sort_stats("tottime").print_stats(25)
        impls = k = v = kp = vp = kx = vx = None  # this shape's buffers go before the next one's
        cupy.get_default_memory_pool().free_all_blocks()
    return 0


def nvrtc_probe(args):
    import glob
    import hashlib
    if args.peers_first:
        torch = __import__("torch")
        torch.zeros(1, device="cuda")
        import jax.numpy as jnp
        jnp.zeros(1).block_until_ready()
    cupy = require_gpu()
    import cuflash
    from cupy_backends.cuda.libs import nvrtc
    batch, nheads = standard_shape(4096, 128)
    q, k, v, dout = make_inputs(DTYPES["bf16"], batch, 4096, nheads, 128, seed=0)
    out, lse = cuflash.attention_forward(q, k, v)

    def ours():
        return cuflash.attention_backward(dout, q, k, v, out, lse)

    ms = min(back_to_back_ms(ours, 10, 3) for _ in range(3))
    with open("/proc/self/maps") as maps:
        libs = sorted({line.split()[-1] for line in maps if "nvrtc" in line})
    print(f"peers first: {args.peers_first}; python {sys.executable}; nvrtc "
          f"{nvrtc.getVersion()}: {', '.join(libs)}")
    for path in sorted(glob.glob(os.path.join(os.environ.get("CUPY_CACHE_DIR", ""), "*"))):
        with open(path, "rb") as f:
            data = f.read()
        print(f"  {os.path.basename(path)[:16]} {len(data):8} bytes "
              f"sha {hashlib.sha256(data).hexdigest()[:12]}")
    print(f"bwd bf16 hd128 4k: {ms:.3f} ms, "
          f"{flops('bwd', batch, nheads, 4096, 128, False) / ms / 1e9:.0f} TFLOP/s")
    return 0


def calls(args):
    require_gpu()
    batch, nheads = standard_shape(args.seqlen, args.headdim)
    q, k, v, dout = make_inputs(DTYPES[args.dtype], batch, args.seqlen, nheads, args.headdim,
                                seed=0)
    # As the sweep times it: its own call of each implementation (a backward's forward runs
    # once, before; a JAX backward is its vjp step, forward included).
    impl = sweep.registry(None, None)[args.impl]
    with impl.run(args.direction, q, k, v, dout, args.causal) as call:
        step = call.total if isinstance(call, Difference) else call
        for _ in range(4):
            result = step()
        synchronize(result)  # JAX's queue, then the device
        if args.kernels:
            kernel_table(step, args.kernels)
    return 0


def kernel_table(step, calls):
    """Each device activity of ``calls`` back-to-back calls of step(), as the sweep queues
    them (device_times): launches a call, median microseconds, microseconds a call."""
    import statistics
    times = device_times(step, calls)
    print(f"{'kernel':90} {'a call':>6} {'median us':>10} {'us a call':>10}")
    total = 0.0
    for name, t in sorted(times.items(), key=lambda kv: -sum(kv[1])):
        total += sum(t) / calls
        print(f"{name:90} {len(t) / calls:6.2f} {statistics.median(t):10.1f} "
              f"{sum(t) / calls:10.1f}")
    print(f"{'all kernels':90} {'':6} {'':10} {total:10.1f}")


def sustained(step, nvml, seconds: float) -> dict:
    """Runs of step() (a Runner's, ~50 ms each) for about ``seconds``, NVML sampled every
    20 ms by a thread: ms a call, median SM clock and power, mJ a call, the union of the
    clock event reasons (NVML's bits: 0x4 power cap, 0x20 / 0x40 thermal, 0x1 idle)."""
    import statistics
    import threading
    import time
    samples, done = [], threading.Event()

    def sampler():
        while not done.wait(0.02):
            samples.append(nvml.sample())

    runner = Runner(step, Timing(budget_ms=50.0, min_calls=5, max_calls=10 ** 6, reps=1,
                                 warmup=1))
    thread = threading.Thread(target=sampler)
    thread.start()
    energy0, runs, start = nvml.energy_mj(), [], time.perf_counter()
    while time.perf_counter() - start < seconds:
        runs.append(runner.run())
    energy1 = nvml.energy_mj()
    done.set()
    thread.join()
    clocks = [c for c, _, _ in samples if c]
    power = [w / 1e3 for _, w, _ in samples if w]
    reasons = 0
    for _, _, r in samples:
        reasons |= r or 0
    calls = len(runs) * runner.calls
    return {"ms": sum(runs) / len(runs), "mhz": statistics.median(clocks) if clocks else 0,
            "watts": statistics.median(power) if power else 0,
            "mj": (energy1 - energy0) / calls if None not in (energy0, energy1) else math.nan,
            "reasons": reasons}


def clocks(args):
    """Sustained calls of each implementation at one shape, alternately (A B .. B A), with
    the board's clock, power and energy a call."""
    require_gpu()
    batch, nheads = standard_shape(args.seqlen, args.headdim)
    q, k, v, dout = make_inputs(DTYPES[args.dtype], batch, args.seqlen, nheads, args.headdim,
                                seed=0)
    nvml, registry = Nvml(), sweep.registry(None, None)
    names = args.impls.split(",")
    order = names + names[::-1]
    print(f"{args.direction} hd{args.headdim} seqlen {args.seqlen}"
          f"{' causal' if args.causal else ''} {args.dtype}, {args.seconds} s each")
    print(f"{'impl':28} {'ms a call':>10} {'SM MHz':>7} {'W':>6} {'mJ a call':>10} reasons")
    for name in order:
        try:
            with registry[name].run(args.direction, q, k, v, dout, args.causal) as call:
                steps = ({"": call} if not isinstance(call, Difference) else
                         {" (total)": call.total, " (part)": call.part})
                for label, step in steps.items():
                    r = sustained(step, nvml, args.seconds)
                    print(f"{name + label:28} {r['ms']:10.3f} {r['mhz']:7.0f} "
                          f"{r['watts']:6.0f} {r['mj']:10.1f} {r['reasons']:#x}", flush=True)
        except Exception as e:  # a library missing, a shape declined: a gap
            print(f"{name:28} {sweep.describe(e)}", flush=True)
    return 0


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="smoke: device checks of the Hopper forward and backward, each case in its own "
               "process with a timeout; overhead: host/GPU time split of short calls; "
               "decode: host / kernel / event time of decode calls")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("smoke", help="forward and backward cases, each in its own "
                                          "process with a timeout")
    p.add_argument("--only", choices=("fwd", "bwd"), help="one direction (default both)")
    p.add_argument("--out", help="folder for the inputs and outputs of failing cases")
    p.set_defaults(run=smoke)
    p = commands.add_parser("case", help="one smoke case, in this process (smoke runs these)")
    p.add_argument("direction", choices=("fwd", "bwd"))
    p.add_argument("name")
    p.add_argument("--out")
    p.set_defaults(run=case)
    p = commands.add_parser("overhead", help="host/GPU split of short forward and backward "
                                             "calls, cuflash and torch flash")
    p.add_argument("--only", choices=("fwd", "bwd"), help="one direction (default both)")
    p.set_defaults(run=overhead)
    p = commands.add_parser("decode", help="host / kernel / event time of decode calls")
    p.add_argument("--shapes", default="1x1024,1x4096,1x16384,1x131072,4x1024,4x16384,"
                   "4x131072,16x4096", help="batch x length, comma-separated")
    p.add_argument("--splits", default="1,2,4,8,16,32",
                   help="forced num_splits to time ('' for none)")
    p.add_argument("--profile", action="store_true", help="cProfile of the b1 x 1k host path")
    p.set_defaults(run=decode)
    p = commands.add_parser("nvrtc", help="the NVRTC library in use, its cubins, and the "
                                          "backward's time")
    p.add_argument("--peers-first", action="store_true",
                   help="start torch and JAX on the GPU first, as the sweep does")
    p.set_defaults(run=nvrtc_probe)
    p = commands.add_parser("calls", help="a few calls at one shape, for a profiler")
    p.add_argument("direction", choices=("fwd", "bwd"))
    p.add_argument("--headdim", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=4096)
    p.add_argument("--causal", action="store_true")
    p.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    p.add_argument("--impl", choices=tuple(sweep.registry(None, None)), default="cuflash",
                   help="whose kernels: the sweep's implementations (bench/sweep.py), e.g. "
                        "cuflash-det, torch-cudnn, jax-cudnn, fa3")
    p.add_argument("--kernels", type=int, default=0, metavar="N",
                   help="then N more calls under the torch profiler: each kernel's time a "
                        "call (what an implementation's call is made of)")
    p.set_defaults(run=calls)
    p = commands.add_parser("clocks", help="sustained calls of several implementations with "
                                           "the board's clock, power and energy a call")
    p.add_argument("direction", choices=("fwd", "bwd"))
    p.add_argument("--headdim", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=4096)
    p.add_argument("--causal", action="store_true")
    p.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    p.add_argument("--impls", default="cuflash,fa3", help="comma-separated, as the sweep's")
    p.add_argument("--seconds", type=float, default=3.0, help="of calls per implementation")
    p.set_defaults(run=clocks)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
