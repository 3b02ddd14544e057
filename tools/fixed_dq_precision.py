"""How exact an order-free int32 fixed-point dQ would be, against float64 and against float32
adds in key-block order (what the deterministic backward does today). CPU only, NumPy:

    python3 tools/fixed_dq_precision.py SEQLEN HEADDIM full|causal [--dtype fp16|bf16]

The benchmark's inputs (q, k, v, dout standard normal, one head, seqlen_q = seqlen_k). Each
64-key block's share of a row's dQ (what a CTA adds) is rounded to a multiple of the row's
unit u_i = 2^(e_i - 30), where B_i < 2^e_i bounds every partial sum of the row:

    |sum_{j in J} dS_ij K_jc| <= max |K| (||dO_i|| max_j ||V_j|| + |delta_i|)   (sum_j P_ij = 1)

so the int32 total never leaves the range (int32 adds wrap, so only the total has to fit).
Prints the bound's looseness (B_i / ||dQ_i||), the largest error of a row over ||dQ_i||, and
the share of dQ elements whose rounding to the output dtype differs from that of the exact
value (the user-visible part), for both forms. docs/notes/backward.md, "Order-free int32 dQ:
the cost measured, the precision simulated", has the numbers.
"""
from __future__ import annotations

import argparse

import ml_dtypes
import numpy as np

KEYS = 64   # keys a CTA (bwd_sm90_wide), one rounding a row each
ROWS = 256  # query rows a chunk (memory)
DTYPES = {"fp16": np.float16, "bf16": ml_dtypes.bfloat16}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("seqlen", type=int)
    ap.add_argument("headdim", type=int)
    ap.add_argument("mask", choices=("full", "causal"))
    ap.add_argument("--dtype", choices=tuple(DTYPES), default="fp16")
    args = ap.parse_args()
    n, d = args.seqlen, args.headdim
    if n % KEYS or n % ROWS:
        ap.error(f"seqlen: a multiple of {ROWS}")
    rng = np.random.default_rng(0)
    q, k, v, do = (rng.standard_normal((n, d)).astype(np.float32).astype(np.float64)
                   for _ in range(4))
    scale = d ** -0.5
    max_k, max_v = np.abs(k).max(), np.sqrt((v * v).sum(1)).max()
    looseness, err, flips = [], {"fixed": [], "float32": []}, {"fixed": [], "float32": []}
    out = DTYPES[args.dtype]
    for q0 in range(0, n, ROWS):
        s = q[q0:q0 + ROWS] @ k.T * scale
        if args.mask == "causal":
            s = np.where(np.arange(n)[None, :] > np.arange(q0, q0 + ROWS)[:, None], -np.inf, s)
        p = np.exp(s - s.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        dout = do[q0:q0 + ROWS]
        delta = (dout * (p @ v)).sum(1)
        ds = p * (dout @ v.T - delta[:, None])
        exact = ds @ k
        parts = np.einsum("rbk,bkd->rbd", ds.reshape(ROWS, n // KEYS, KEYS),
                          k.reshape(n // KEYS, KEYS, d)).astype(np.float32)
        bound = max_k * (np.sqrt((dout * dout).sum(1)) * max_v + np.abs(delta))
        unit = np.ldexp(1.0, np.frexp(bound)[1] - 30)[:, None]
        total = np.rint(parts / unit[:, None]).astype(np.int64).sum(1)
        assert np.abs(total).max() < 2 ** 31, "a total past int32"
        ordered = np.zeros((ROWS, d), np.float32)
        for blk in range(n // KEYS):
            ordered += parts[:, blk]
        norm = np.sqrt((exact * exact).sum(1))
        live = norm > 1e-9 * bound  # rows whose dQ is not 0 up to float64's own rounding
        looseness.append(bound[live] / norm[live])
        want = (exact * scale).astype(out)
        for name, got in (("fixed", total * unit), ("float32", ordered.astype(np.float64))):
            err[name].append(np.abs(got - exact).max(1)[live] / norm[live])
            flips[name].append(((got * scale).astype(out) != want).mean())
    looseness = np.concatenate(looseness)
    print(f"seqlen {n}, head dim {d}, {args.mask}: B_i / ||dQ_i|| median "
          f"2^{np.log2(np.median(looseness)):.1f}, max 2^{np.log2(looseness.max()):.1f}")
    for name in err:
        e = np.concatenate(err[name])
        print(f"  {name:8s} max |error| / ||dQ_i|| median 2^{np.log2(np.median(e)):.1f}, "
              f"max 2^{np.log2(e.max()):.1f}; {args.dtype} elements rounded otherwise than "
              f"the exact value's: {100 * np.mean(flips[name]):.2f}%")


if __name__ == "__main__":
    main()
