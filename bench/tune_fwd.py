"""Forward tuning tool: cuflash vs torch SDPA (flash, cudnn) on the same inputs.

    PYTHONPATH=. python bench/tune_fwd.py [--quick] [--out DIR] [--tiles 'hd:Br,Bc,warps;...']

The standard sweep of CONVENTIONS.md (hidden 2048, batch = 16384 // seqlen, head dims 64 and
128, causal and not, bf16 and fp16), timed with CUDA events (median of --rep runs after
warm-up) in one process. Inputs are torch tensors of layout (batch, seqlen, nheads, headdim)
shared zero-copy with CuPy; SDPA gets the (batch, nheads, seqlen, headdim) view of the same
memory. ``--tiles`` overrides cuflash's tile table (tuning only), e.g. '64:128,64,4'.
Each row also checks cuflash's output against the flash backend's (max abs difference).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np


def median_ms(fn, warmup, rep):
    import cupy
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(rep):
        start, end = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, end))
    return float(np.median(times))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="seqlen 2048 and 8192 only")
    parser.add_argument("--seqlens", default="512,1024,2048,4096,8192,16384")
    parser.add_argument("--headdims", default="64,128")
    parser.add_argument("--dtypes", default="bf16,fp16")
    parser.add_argument("--rep", type=int, default=20)
    parser.add_argument("--tiles", default="", help="override, 'hd:Br,Bc,warps;...'")
    parser.add_argument("--file", default="", help="kernel source under kernels_cu/ (tuning)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    import cupy
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import cuflash
    from cuflash import _dispatch

    for item in filter(None, args.tiles.split(";")):
        hd, tile = item.split(":")
        bm, bn, w = (int(x) for x in tile.split(","))
        _dispatch.FWD_TILES[int(hd)] = _dispatch.FwdTile(bm, bn, w, "tuning override")

    if args.file:
        _dispatch.FWD_FILE = args.file
    seqlens = [2048, 8192] if args.quick else [int(s) for s in args.seqlens.split(",")]
    tdtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    rows = []
    print(f"device: {torch.cuda.get_device_name()}", flush=True)
    print(f"{'dtype':5} {'hd':>4} {'seqlen':>6} {'causal':>6} | {'cuflash':>8} {'flash':>8} "
          f"{'cudnn':>8} TFLOP/s | ratio/flash  maxdiff", flush=True)
    for dname in args.dtypes.split(","):
        for hd in (int(h) for h in args.headdims.split(",")):
            for n in seqlens:
                batch, nheads = 16384 // n, 2048 // hd
                gen = torch.Generator(device="cuda").manual_seed(n * hd)
                q, k, v = (torch.randn(batch, n, nheads, hd, device="cuda", dtype=tdtypes[dname],
                                       generator=gen) for _ in range(3))
                cq, ck, cv = (cupy.from_dlpack(t) for t in (q, k, v))
                tq, tk, tv = (t.transpose(1, 2) for t in (q, k, v))
                for causal in (False, True):
                    flops = 4 * batch * nheads * n * n * hd / (2 if causal else 1)
                    res = {"dtype": dname, "headdim": hd, "seqlen": n, "batch": batch,
                           "nheads": nheads, "causal": causal}
                    ours = cuflash.attention(cq, ck, cv, causal=causal)
                    res["cuflash"] = flops / median_ms(
                        lambda: cuflash.attention(cq, ck, cv, causal=causal), 3, args.rep) / 1e9
                    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION),
                                          ("cudnn", SDPBackend.CUDNN_ATTENTION)):
                        try:
                            with sdpa_kernel(backend):
                                ref = F.scaled_dot_product_attention(tq, tk, tv, is_causal=causal)
                                res[name] = flops / median_ms(
                                    lambda: F.scaled_dot_product_attention(
                                        tq, tk, tv, is_causal=causal), 3, args.rep) / 1e9
                            if name == "flash":
                                diff = (torch.from_dlpack(ours).float()
                                        - ref.transpose(1, 2).float()).abs().max().item()
                                res["maxdiff_vs_flash"] = diff
                        except Exception as e:  # a backend missing on this machine
                            res[name] = float("nan")
                            res[name + "_error"] = str(e)[:200]
                    rows.append(res)
                    print(f"{dname:5} {hd:4} {n:6} {str(causal):>6} | {res['cuflash']:8.1f} "
                          f"{res['flash']:8.1f} {res['cudnn']:8.1f}         | "
                          f"{res['cuflash'] / res['flash']:6.2f}     "
                          f"{res.get('maxdiff_vs_flash', float('nan')):.2e}", flush=True)
                del q, k, v, cq, ck, cv, tq, tk, tv
    ratios = [r["cuflash"] / r["flash"] for r in rows if r["flash"] == r["flash"]]
    if ratios:
        print(f"cuflash / flash: median {np.median(ratios):.2f}, min {min(ratios):.2f} "
              f"over {len(ratios)} configs")
    if args.out:
        with open(os.path.join(args.out, "tune_fwd.json"), "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
