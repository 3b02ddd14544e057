"""Backward tuning tool: cuflash vs torch SDPA (flash, cudnn) backward on the same inputs.

    PYTHONPATH=. python bench/tune_bwd.py [--quick] [--out DIR] [--tiles 'hd:Br,warps,mt;...']

The standard sweep of CONVENTIONS.md (hidden 2048, batch = 16384 // seqlen, head dims 64 and
128, causal and not, bf16 and fp16); backward FLOPs = 2.5 x forward FLOPs. Timed with CUDA
events (median of --rep runs after warm-up) in one process. q, k, v, dout are torch tensors
of layout (batch, seqlen, nheads, headdim) shared zero-copy with CuPy; SDPA gets the
(batch, nheads, seqlen, headdim) views and is timed on torch.autograd.grad of a retained
graph (its backward alone). cuflash's out/lse come from its own forward. ``--tiles``
overrides the "dkdv" entry of cuflash's backward tile table (tuning only). ``--det`` also
times deterministic=True. Each row checks cuflash's dq/dk/dv against flash's (max abs diff).
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
    parser.add_argument("--causal", default="0,1")
    parser.add_argument("--rep", type=int, default=10)
    parser.add_argument("--tiles", default="", help="override, 'hd:Br,warps,mt;...'")
    parser.add_argument("--det", action="store_true", help="also time deterministic=True")
    parser.add_argument("--no-peers", action="store_true")
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
        br, w, mt = (int(x) for x in tile.split(","))
        _dispatch.BWD_TILES[int(hd)]["dkdv"] = _dispatch.BwdTile(br, w, mt, "tuning override")

    seqlens = [2048, 8192] if args.quick else [int(s) for s in args.seqlens.split(",")]
    tdtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    rows = []
    print(f"device: {torch.cuda.get_device_name()}", flush=True)
    print(f"{'dtype':5} {'hd':>4} {'seqlen':>6} {'causal':>6} | {'cuflash':>8} {'det':>8} "
          f"{'flash':>8} {'cudnn':>8} TFLOP/s | ratio/flash  maxdiff", flush=True)
    for dname in args.dtypes.split(","):
        for hd in (int(h) for h in args.headdims.split(",")):
            for n in seqlens:
                batch, nheads = 16384 // n, 2048 // hd
                gen = torch.Generator(device="cuda").manual_seed(n * hd)
                q, k, v, do = (torch.randn(batch, n, nheads, hd, device="cuda",
                                           dtype=tdtypes[dname], generator=gen)
                               for _ in range(4))
                cq, ck, cv, cdo = (cupy.from_dlpack(t) for t in (q, k, v, do))
                for causal in (bool(int(c)) for c in args.causal.split(",")):
                    flops = 2.5 * 4 * batch * nheads * n * n * hd / (2 if causal else 1)
                    res = {"dtype": dname, "headdim": hd, "seqlen": n, "batch": batch,
                           "nheads": nheads, "causal": causal}
                    out, lse = cuflash.attention_forward(cq, ck, cv, causal=causal)

                    def ours(det=False):
                        return cuflash.attention_backward(cdo, cq, ck, cv, out, lse,
                                                          causal=causal, deterministic=det)
                    grads = ours()
                    res["cuflash"] = flops / median_ms(ours, 2, args.rep) / 1e9
                    res["det"] = (flops / median_ms(lambda: ours(True), 2, args.rep) / 1e9
                                  if args.det else float("nan"))
                    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION),
                                          ("cudnn", SDPBackend.CUDNN_ATTENTION)):
                        res[name] = float("nan")
                        if args.no_peers:
                            continue
                        try:
                            tq, tk, tv = (t.transpose(1, 2).detach().requires_grad_()
                                          for t in (q, k, v))
                            tdo = do.transpose(1, 2)
                            with sdpa_kernel(backend):
                                o = F.scaled_dot_product_attention(tq, tk, tv, is_causal=causal)
                            ref = torch.autograd.grad(o, (tq, tk, tv), tdo, retain_graph=True)
                            res[name] = flops / median_ms(
                                lambda: torch.autograd.grad(o, (tq, tk, tv), tdo,
                                                            retain_graph=True),
                                2, args.rep) / 1e9
                            if name == "flash":
                                res["maxdiff_vs_flash"] = max(
                                    (torch.from_dlpack(g).float() - r.transpose(1, 2).float())
                                    .abs().max().item() for g, r in zip(grads, ref))
                            del o, ref, tq, tk, tv
                        except Exception as e:  # a backend missing on this machine
                            res[name + "_error"] = str(e)[:200]
                    rows.append(res)
                    print(f"{dname:5} {hd:4} {n:6} {str(causal):>6} | {res['cuflash']:8.1f} "
                          f"{res['det']:8.1f} {res['flash']:8.1f} {res['cudnn']:8.1f}         | "
                          f"{res['cuflash'] / res['flash']:6.2f}     "
                          f"{res.get('maxdiff_vs_flash', float('nan')):.2e}", flush=True)
                    del out, lse, grads
                del q, k, v, do, cq, ck, cv, cdo
    ratios = [r["cuflash"] / r["flash"] for r in rows if r["flash"] == r["flash"]]
    if ratios:
        print(f"cuflash / flash: median {np.median(ratios):.2f}, min {min(ratios):.2f} "
              f"over {len(ratios)} configs")
    if args.out:
        with open(os.path.join(args.out, "tune_bwd.json"), "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
