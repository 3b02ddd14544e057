"""Tuning tool: cuflash's forward or backward against torch SDPA (flash, cudnn), same inputs.

    PYTHONPATH=. python bench/tune.py fwd [--quick] [--out DIR] [--tiles 'hd:Br,Bc,warps;...']
    PYTHONPATH=. python bench/tune.py bwd [--quick] [--out DIR] [--tiles 'hd:Br,warps,mt;...'] [--det]

(Formerly bench/tune_fwd.py and bench/tune_bwd.py.) The standard sweep of CONVENTIONS.md
(hidden 2048, batch = 16384 // seqlen, head dims 64 and 128, causal and not, bf16 and fp16)
in one process; backward FLOPs = 2.5 x forward FLOPs. Unlike bench/sweep.py, every call is
timed alone with CUDA events around it and a sync after it (median of --rep calls after
warm-up), so host time inside the call counts. Inputs are CuPy arrays of layout (batch,
seqlen, nheads, headdim), seeded per shape; SDPA gets (batch, nheads, seqlen, headdim)
views of the same memory through DLPack, its backward timed on torch.autograd.grad of a
retained graph (the backward alone). The forward times ``cuflash.attention``; the backward
``cuflash.attention_backward`` on out/lse from cuflash's own forward.

``--tiles`` overrides cuflash's tile table (tuning only): fwd, FWD_TILES entries, e.g.
'64:128,64,4'; bwd, the "dkdv" entry of BWD_TILES. ``--file`` (fwd) swaps the forward
kernel source under kernels_cu/. ``--det`` (bwd) also times deterministic=True. Each row
checks cuflash's result (out, or dq/dk/dv) against the flash backend's (max abs difference).
Writes tune_fwd.json / tune_bwd.json into --out.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import numpy as np

from _common import (DTYPES, cuflash_launches, flops, import_torch, make_inputs, per_call_ms,
                     release_memory, require_gpu, run_torch, standard_shape)

PEERS = (("flash", "FLASH_ATTENTION"), ("cudnn", "CUDNN_ATTENTION"))
WARMUP = {"fwd": 3, "bwd": 2}


def ints(text):
    return [int(x) for x in text.split(",") if x]


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    modes = parser.add_subparsers(dest="mode", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--quick", action="store_true", help="seqlen 2048 and 8192 only")
    common.add_argument("--seqlens", type=ints, default=[512, 1024, 2048, 4096, 8192, 16384])
    common.add_argument("--headdims", type=ints, default=[64, 128])
    common.add_argument("--dtypes", type=lambda t: t.split(","), default=["bf16", "fp16"])
    common.add_argument("--causal", type=lambda t: [bool(int(c)) for c in t.split(",")],
                        default=[False, True], help="comma-separated 0/1 (default 0,1)")
    common.add_argument("--no-peers", action="store_true", help="time cuflash alone")
    common.add_argument("--out", default=None, help="folder for tune_<mode>.json")
    fwd = modes.add_parser("fwd", parents=[common], help="the forward")
    fwd.add_argument("--rep", type=int, default=20)
    fwd.add_argument("--tiles", default="", help="override ops.forward.TILES, 'hd:Br,Bc,warps;...'")
    fwd.add_argument("--file", default="", help="kernel source under kernels_cu/ (tuning)")
    bwd = modes.add_parser("bwd", parents=[common], help="the backward")
    bwd.add_argument("--rep", type=int, default=10)
    bwd.add_argument("--tiles", default="",
                     help="override ops.backward.TILES[hd]['dkdv'], 'hd:Br,warps,mt;...'")
    bwd.add_argument("--det", action="store_true", help="also time deterministic=True")
    args = parser.parse_args(argv)
    bad = [d for d in args.dtypes if d not in DTYPES]
    if bad:
        parser.error(f"unknown dtype(s) {bad}; choose from {list(DTYPES)}")
    if args.quick:
        args.seqlens = [2048, 8192]
    return args


def tile_overrides(mode, tiles):
    """{head dim: tile} of --tiles (flash_fwd's FwdTile, or bwd_main's "dkdv" BwdTile)."""
    from cuflash import ops
    overrides = {}
    for item in filter(None, tiles.split(";")):
        hd, tile = item.split(":")
        a, b, c = (int(x) for x in tile.split(","))
        kind = ops.forward.FwdTile if mode == "fwd" else ops.backward.BwdTile
        overrides[int(hd)] = kind(a, b, c, "tuning override")
    return overrides


def overridden(args, q, k, v, causal):
    """(forward, backward) with this run's --tiles / --file for q's head dim, or None."""
    from cuflash import ops
    hd = q.shape[3]
    tile = args.overrides.get(hd)
    kernel_file = getattr(args, "file", "")
    if tile is None and not kernel_file:
        return None
    if args.mode == "fwd":
        config = ops.forward.mma_config(q.dtype, hd, False, False, tile)
        if kernel_file:
            config = dataclasses.replace(config, filename=kernel_file)
        return cuflash_launches(q, k, v, causal, fwd_config=config)
    steps = tuple(ops.backward.mma_steps(q.dtype, hd, False, False, tile))
    return cuflash_launches(q, k, v, causal, bwd_steps=steps)


def max_diff(torch, mode, ours, ref) -> float:
    """Largest |cuflash - torch flash|: out (SDPA's is (batch, nheads, seqlen, headdim)), or
    over dq, dk, dv (torch's are of the inputs' layout)."""
    if mode == "fwd":
        return (torch.from_dlpack(ours).float() - ref.transpose(1, 2).float()).abs().max().item()
    return max((torch.from_dlpack(g).float() - r.float()).abs().max().item()
               for g, r in zip(ours, ref))


def tune_shape(args, torch, dname, hd, n):
    """The rows of one (dtype, head dim, seqlen): causal and not."""
    import cuflash
    mode = args.mode
    warmup = WARMUP[mode]
    batch, nheads = standard_shape(n, hd)
    q, k, v, dout = make_inputs(DTYPES[dname], batch, n, nheads, hd, seed=n * hd)
    rows = []
    for causal in args.causal:
        row_flops = flops(mode, batch, nheads, n, hd, causal)
        res = {"dtype": dname, "headdim": hd, "seqlen": n, "batch": batch, "nheads": nheads,
               "causal": causal}
        launches = overridden(args, q, k, v, causal)
        if mode == "fwd":
            def ours():
                if launches:
                    return launches[0]()[0]
                return cuflash.attention(q, k, v, causal=causal)
        else:
            out, lse = cuflash.attention_forward(q, k, v, causal=causal)

            def ours(det=False):
                if launches and not det:
                    return launches[1](dout, out, lse)
                return cuflash.attention_backward(dout, q, k, v, out, lse, causal=causal,
                                                  deterministic=det)
        got = ours()
        res["cuflash"] = row_flops / per_call_ms(ours, warmup, args.rep) / 1e9
        if mode == "bwd":
            res["det"] = (row_flops / per_call_ms(lambda: ours(True), warmup, args.rep) / 1e9
                          if args.det else float("nan"))
        for name, backend in PEERS:
            res[name] = float("nan")
            if torch is None:
                continue
            try:
                with run_torch(backend, mode, q, k, v, dout, causal) as fn:
                    ref = fn()
                    res[name] = row_flops / per_call_ms(fn, warmup, args.rep) / 1e9
                if name == "flash":
                    res["maxdiff_vs_flash"] = max_diff(torch, mode, got, ref)
            except Exception as e:  # a backend missing on this machine
                res[name + "_error"] = str(e)[:200]
        rows.append(res)
        print(f"{dname:5} {hd:4} {n:6} {str(causal):>6} | "
              + " ".join(f"{res[c]:8.1f}" for c in columns(mode)) + "         | "
              f"{res['cuflash'] / res['flash']:6.2f}     "
              f"{res.get('maxdiff_vs_flash', float('nan')):.2e}", flush=True)
    return rows


def columns(mode):
    return ["cuflash"] + (["det"] if mode == "bwd" else []) + [name for name, _ in PEERS]


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    cupy = require_gpu()
    torch = None if args.no_peers else import_torch()
    args.overrides = tile_overrides(args.mode, args.tiles)
    device = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["name"].decode()
    print(f"device: {device}", flush=True)
    print(f"{'dtype':5} {'hd':>4} {'seqlen':>6} {'causal':>6} | "
          + " ".join(f"{c:>8}" for c in columns(args.mode))
          + " TFLOP/s | ratio/flash  maxdiff", flush=True)
    rows = []
    for dname in args.dtypes:
        for hd in args.headdims:
            for n in args.seqlens:
                rows += tune_shape(args, torch, dname, hd, n)
                release_memory(torch)
    ratios = [r["cuflash"] / r["flash"] for r in rows if r["flash"] == r["flash"]]
    if ratios:
        print(f"cuflash / flash: median {np.median(ratios):.2f}, min {min(ratios):.2f} "
              f"over {len(ratios)} configs")
    if args.out:
        with open(os.path.join(args.out, f"tune_{args.mode}.json"), "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
