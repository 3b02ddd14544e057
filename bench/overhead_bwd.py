"""Backward host time: per call (events around one call, as tune_bwd.py times it) vs back
to back (events around 20 calls) for cuflash and torch flash on the same inputs.

    PYTHONPATH=. python bench/overhead_bwd.py

The difference is host time inside the per-call measurement (microseconds).
"""
import numpy as np
import cupy
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
import cuflash


def per_call(fn, rep=30):
    for _ in range(3):
        fn()
    ts = []
    for _ in range(rep):
        a, b = cupy.cuda.Event(), cupy.cuda.Event()
        a.record(); fn(); b.record(); b.synchronize()
        ts.append(cupy.cuda.get_elapsed_time(a, b) * 1e3)
    return float(np.median(ts))


def back_to_back(fn, n=20, rep=5):
    fn()
    ts = []
    for _ in range(rep):
        a, b = cupy.cuda.Event(), cupy.cuda.Event()
        a.record()
        for _ in range(n):
            fn()
        b.record(); b.synchronize()
        ts.append(cupy.cuda.get_elapsed_time(a, b) * 1e3 / n)
    return float(np.median(ts))


for dt in (torch.bfloat16, torch.float16):
    for hd, n, causal in ((64, 512, True), (64, 512, False), (64, 1024, True), (128, 512, True), (128, 8192, False)):
        batch, h = 16384 // n, 2048 // hd
        g = torch.Generator(device="cuda").manual_seed(n * hd)
        q, k, v, do = (torch.randn(batch, n, h, hd, device="cuda", dtype=dt, generator=g) for _ in range(4))
        cq, ck, cv, cdo = (cupy.from_dlpack(t) for t in (q, k, v, do))
        out, lse = cuflash.attention_forward(cq, ck, cv, causal=causal)
        ours = lambda: cuflash.attention_backward(cdo, cq, ck, cv, out, lse, causal=causal)
        tq, tk, tv = (t.transpose(1, 2).detach().requires_grad_() for t in (q, k, v))
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            o = F.scaled_dot_product_attention(tq, tk, tv, is_causal=causal)
        fl = lambda: torch.autograd.grad(o, (tq, tk, tv), do.transpose(1, 2), retain_graph=True)
        flops = 2.5 * 4 * batch * h * n * n * hd / (2 if causal else 1)
        r = {name: (per_call(f), back_to_back(f)) for name, f in (("cuflash", ours), ("flash", fl))}
        c, f_ = r["cuflash"], r["flash"]
        print(f"{str(dt)[6:]:8} hd{hd:3} {n:5} causal={causal!s:5} | per call us: cuflash {c[0]:7.1f} flash {f_[0]:7.1f} "
              f"ratio {f_[0]/c[0]:.2f} | back to back: cuflash {c[1]:7.1f} flash {f_[1]:7.1f} ratio {f_[1]/c[1]:.2f} "
              f"| b2b TFLOP/s {flops/c[1]/1e6:.0f} / {flops/f_[1]/1e6:.0f}", flush=True)
        del o, tq, tk, tv
