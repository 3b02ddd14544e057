"""Benchmark sweep: cuflash against its peers on the standard FlashAttention shapes.

    PYTHONPATH=. python bench/sweep.py --out bench/results/h100 --modes fwd
    PYTHONPATH=. python bench/sweep.py --out /tmp/quick --quick

Shapes (CONVENTIONS.md, "Measuring speed"): hidden 2048 (nheads = 2048 // headdim),
batch = 16384 // seqlen, seqlen 512 to 16384, headdim 64 and 128, causal and not, bf16 and
fp16. Peers: a naive CuPy attention (in the input dtype) and, when torch is importable,
torch's scaled_dot_product_attention with each backend, fed the same buffers zero-copy
through DLPack. Every implementation gets the same random normal inputs. A call is timed
between two CUDA events after warm-up; a measurement is the median of many calls.
Anything that raises (unsupported, out of memory) leaves a gap in its row, not a crash.

Before the first row the GPU runs large matmuls for a second, to reach its full clock.

Writes sweep.json (every number, with device and versions) and sweep.md (the tables) into
--out after every row, so a run stopped early keeps what it measured, and sweep.png
(TFLOP/s against seqlen) at the end.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import json
import math
import statistics
import sys
import time
from pathlib import Path

from _common import (DTYPES, TORCH_BACKENDS, cuflash_launches, environment, flops,
                     import_torch, make_inputs, release_memory, require_gpu, run_torch,
                     standard_shape, time_ms)

SEQLENS = (512, 1024, 2048, 4096, 8192, 16384)
QUICK_SEQLENS = (1024, 4096)
HEADDIMS = (64, 128)
CAUSAL = {"no": (False,), "yes": (True,), "both": (False, True)}
MODES = ("fwd", "bwd", "fwdbwd")
BASELINE = "torch-flash"
# The naive peer materialises (batch, nheads, seqlen, seqlen) scores in the input dtype, and
# its softmax and backward hold a few such matrices at once.
NAIVE_BUDGET = 8 * 2 ** 30
# (time budget per measurement in ms, fewest and most timed calls): big shapes get few
# calls and small ones many, which keeps the full forward sweep to ~5 minutes on an H100.
TIMING = {"full": (200.0, 10, 100), "quick": (50.0, 5, 30)}
WARM_UP_SECONDS = 1.0  # of large matmuls before the first row, to bring the GPU to full clock


class Skipped(Exception):
    """An implementation declines a shape (reported like any other gap)."""


# Each implementation is a context manager taking (mode, q, k, v, dout, causal) that does
# its untimed setup (a forward whose outputs the timed backward reads) and yields the
# zero-argument callable to time. Arrays are (batch, seqlen, nheads, headdim).

def timed_call(mode, forward, backward):
    """The callable to time for ``mode``: ``forward()``, ``backward(*saved forward)`` (the
    forward run once here, untimed), or both in sequence."""
    if mode == "fwd":
        return forward
    if mode == "bwd":
        saved = forward()
        return lambda: backward(*saved)
    return lambda: backward(*forward())


@contextlib.contextmanager
def run_cuflash(mode, q, k, v, dout, causal):
    import cuflash

    def forward():
        return cuflash.attention_forward(q, k, v, causal=causal)

    def backward(out, lse):
        return cuflash.attention_backward(dout, q, k, v, out, lse, causal=causal)

    yield timed_call(mode, forward, backward)


@contextlib.contextmanager
def run_cuflash_varlen(mode, q, k, v, dout, causal):
    """The varlen API on the same tokens: the batch packed as equal-length sequences
    (reshaped views, no copies). The CuPy prefix sums are checked on the device (one small
    launch after each call), not copied to the host."""
    import cupy
    import cuflash
    batch, seqlen = q.shape[:2]
    cu = cupy.arange(0, (batch + 1) * seqlen, seqlen, dtype=cupy.int32)
    q, k, v, dout = (x.reshape(batch * seqlen, *x.shape[2:]) for x in (q, k, v, dout))
    packing = (cu, cu, seqlen, seqlen)

    def forward():
        return cuflash.attention_varlen_forward(q, k, v, *packing, causal=causal)

    def backward(out, lse):
        return cuflash.attention_varlen_backward(dout, q, k, v, out, lse, *packing,
                                                 causal=causal)

    yield timed_call(mode, forward, backward)


@contextlib.contextmanager
def run_cuflash_mma(mode, q, k, v, dout, causal):
    """cuflash with the Hopper (wgmma) kernels switched off: the dense mma.sync kernels
    (the path of Ampere and Ada GPUs, and of the options the Hopper kernels do not take)."""
    from cuflash import ops
    config = ops.forward.mma_config(q.dtype, q.shape[3], False, False)
    forward, backward = cuflash_launches(q, k, v, causal, fwd_config=config, bwd_hopper=False)
    yield timed_call(mode, forward, lambda out, lse: backward(dout, out, lse))


@contextlib.contextmanager
def run_naive(mode, q, k, v, dout, causal):
    """Matmul, softmax, matmul in the input dtype; backward by the textbook formulas."""
    import cupy
    batch, seqlen, nheads, headdim = q.shape
    scores = batch * nheads * seqlen * seqlen * q.dtype.itemsize
    if scores > NAIVE_BUDGET:
        raise Skipped(f"score matrix {scores / 2**30:.0f} GiB > budget "
                      f"{NAIVE_BUDGET / 2**30:.0f} GiB")
    scale = headdim ** -0.5
    qh, kh, vh, doh = (x.transpose(0, 2, 1, 3) for x in (q, k, v, dout))
    if causal:
        bias = cupy.triu(cupy.full((seqlen, seqlen), -cupy.inf, cupy.float32), 1)
        bias = bias.astype(q.dtype)

    def forward():
        p = qh @ kh.transpose(0, 1, 3, 2)
        p *= scale
        if causal:
            p += bias
        p -= p.max(axis=-1, keepdims=True)
        cupy.exp(p, out=p)
        p /= p.sum(axis=-1, keepdims=True)
        return p @ vh, p

    def backward(out, p):
        dv = p.transpose(0, 1, 3, 2) @ doh
        ds = doh @ vh.transpose(0, 1, 3, 2)
        ds -= (doh * out).sum(axis=-1, keepdims=True)
        ds *= p
        ds *= scale
        return ds @ kh, ds.transpose(0, 1, 3, 2) @ qh, dv

    yield timed_call(mode, forward, backward)


def implementations(names, torch) -> dict:
    impls = {"cuflash": run_cuflash, "naive-cupy": run_naive}
    if torch is not None:
        impls.update({name: functools.partial(run_torch, backend)
                      for name, backend in TORCH_BACKENDS.items()})
    if names is None:
        return impls
    # On request only (--impls): varlen against dense at the same tokens and kernels.
    impls.update({"cuflash-varlen": run_cuflash_varlen, "cuflash-mma": run_cuflash_mma})
    missing = [n for n in names if n not in impls]
    if missing:
        sys.exit(f"sweep.py: implementation(s) {', '.join(missing)} not available here "
                 f"(available: {', '.join(impls)}; torch peers need torch)")
    return {n: impls[n] for n in names}


def measure(run, mode, inputs, causal, row_flops, timing, torch) -> dict:
    try:
        with run(mode, *inputs, causal) as fn:
            ms = time_ms(fn, *timing)
        return {"ms": ms, "tflops": row_flops / ms / 1e9}
    except Exception as e:  # unsupported, out of memory, not yet written: a gap in the row
        first_line = (str(e).strip().splitlines() or [""])[0][:200]
        return {"error": f"{type(e).__name__}: {first_line}"}
    finally:
        release_memory(torch)


def ratio(row) -> float | None:
    """cuflash / torch-flash TFLOP/s, when both ran."""
    ours, theirs = row["results"].get("cuflash", {}), row["results"].get(BASELINE, {})
    if "tflops" in ours and "tflops" in theirs:
        return ours["tflops"] / theirs["tflops"]
    return None


def progress(row, index: int, total: int) -> str:
    cells = [f"{name} {r['tflops']:.1f}" if "tflops" in r else f"{name} -"
             for name, r in row["results"].items()]
    r = ratio(row)
    return (f"[{index:>3}/{total}] {row['mode']:6} {row['dtype']} hd{row['headdim']:<3} "
            f"{'causal' if row['causal'] else 'full  '} seqlen {row['seqlen']:>5}: TFLOP/s "
            + " | ".join(cells) + (f" | ratio {r:.2f}" if r is not None else ""))


def markdown(rows, names) -> str:
    lines = []
    for mode in dict.fromkeys(r["mode"] for r in rows):
        lines += [f"## {mode}: TFLOP/s (ratio = cuflash / {BASELINE})", "",
                  "| dtype | hdim | causal | seqlen | batch x heads | " + " | ".join(names)
                  + " | ratio |",
                  "|---" * (len(names) + 6) + "|"]
        for row in (r for r in rows if r["mode"] == mode):
            cells = [f"{row['results'][n]['tflops']:.1f}" if "tflops" in row["results"][n]
                     else "-" for n in names]
            r = ratio(row)
            lines.append(f"| {row['dtype']} | {row['headdim']} | {row['causal']} | "
                         f"{row['seqlen']} | {row['batch']} x {row['nheads']} | "
                         + " | ".join(cells) + f" | {'-' if r is None else f'{r:.2f}'} |")
        lines.append("")
    lines += [f"## cuflash / {BASELINE}", "", "| mode | rows | median ratio | min ratio |",
              "|---|---|---|---|"]
    for mode in dict.fromkeys(r["mode"] for r in rows):
        ratios = [x for x in (ratio(r) for r in rows if r["mode"] == mode) if x is not None]
        if ratios:
            lines.append(f"| {mode} | {len(ratios)} | {statistics.median(ratios):.2f} | "
                         f"{min(ratios):.2f} |")
        else:
            lines.append(f"| {mode} | 0 | - | - |")
    errors = {(n, row["results"][n]["error"]) for row in rows for n in names
              if "error" in row["results"][n]}
    if errors:
        lines += ["", "## Gaps", ""] + [f"- {n}: {e}" for n, e in sorted(errors)]
    return "\n".join(lines) + "\n"


def plot(rows, names, path: Path) -> None:
    """One panel per (mode, dtype) x (headdim, causal); one line per implementation."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    grid_rows = list(dict.fromkeys((r["mode"], r["dtype"]) for r in rows))
    grid_cols = list(dict.fromkeys((r["headdim"], r["causal"]) for r in rows))
    fig, axes = plt.subplots(len(grid_rows), len(grid_cols), squeeze=False,
                             figsize=(4 * len(grid_cols), 3 * len(grid_rows)))
    lines = {}
    for (i, (mode, dtype)), (j, (headdim, causal)) in itertools.product(
            enumerate(grid_rows), enumerate(grid_cols)):
        ax = axes[i][j]
        panel = [r for r in rows if (r["mode"], r["dtype"], r["headdim"], r["causal"])
                 == (mode, dtype, headdim, causal)]
        for color, name in enumerate(names):
            points = [(r["seqlen"], r["results"][name]["tflops"]) for r in panel
                      if "tflops" in r["results"][name]]
            if points:
                lines[name], = ax.plot(*zip(*points), marker="o", color=f"C{color}")
        seqlens = [r["seqlen"] for r in panel]
        ax.set_xscale("log", base=2)
        ax.set_xticks(seqlens, [str(s) for s in seqlens], fontsize=7)
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_ylim(bottom=0)
        ax.set_title(f"{mode} {dtype} hdim {headdim} {'causal' if causal else 'full'}",
                     fontsize=9)
        ax.set_xlabel("seqlen", fontsize=8)
        ax.set_ylabel("TFLOP/s", fontsize=8)
    fig.legend(lines.values(), lines.keys(), loc="upper center", ncol=len(lines))
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / fig.get_figheight()))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def comma_list(convert=str, choices=None):
    def parse(text):
        items = [convert(x) for x in text.split(",") if x]
        bad = [x for x in items if choices is not None and x not in choices]
        if bad or not items:
            hint = f"choose from {', '.join(choices)}" if choices else "give a comma-separated list"
            raise argparse.ArgumentTypeError(f"{text!r}: {hint}")
        return items
    return parse


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description="Benchmark cuflash against its peers on the standard sweep "
                    "(TFLOP/s; needs a CUDA GPU).")
    parser.add_argument("--out", type=Path, required=True,
                        help="folder for sweep.json, sweep.md and sweep.png")
    parser.add_argument("--dtypes", type=comma_list(choices=DTYPES), default=list(DTYPES),
                        help="comma-separated: bf16,fp16 (default both)")
    parser.add_argument("--headdims", type=comma_list(int), default=list(HEADDIMS),
                        help="comma-separated (default 64,128)")
    parser.add_argument("--seqlens", type=comma_list(int),
                        help=f"comma-separated (default {','.join(map(str, SEQLENS))}; "
                             f"with --quick {','.join(map(str, QUICK_SEQLENS))})")
    parser.add_argument("--causal", choices=CAUSAL, default="both",
                        help="causal masking: no, yes or both (default)")
    parser.add_argument("--modes", type=comma_list(choices=MODES), default=list(MODES),
                        help="comma-separated: fwd,bwd,fwdbwd (default all)")
    parser.add_argument("--impls", type=comma_list(),
                        help="comma-separated: cuflash,naive-cupy," + ",".join(TORCH_BACKENDS)
                             + " (default: all that are available), and on request "
                               "cuflash-varlen,cuflash-mma")
    parser.add_argument("--quick", action="store_true",
                        help="fewer seqlens and fewer timed calls, for a first look")
    args = parser.parse_args(argv)
    args.seqlens = args.seqlens or list(QUICK_SEQLENS if args.quick else SEQLENS)
    return args


def warm_up_gpu(seconds: float = WARM_UP_SECONDS) -> None:
    """Large matmuls for ``seconds``, so the GPU runs at full clock from the first row (after
    a few warm-up calls alone, an idle GPU was seen at 345 MHz in the first rows)."""
    import cupy
    a = cupy.ones((4096, 4096), cupy.float16)
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(10):
            a @ a
        cupy.cuda.Device().synchronize()
    del a
    cupy.get_default_memory_pool().free_all_blocks()


def write_results(out: Path, env, rows, names) -> str:
    """sweep.json and sweep.md of the rows so far; returns the tables."""
    table = markdown(rows, names)
    (out / "sweep.json").write_text(json.dumps({**env, "rows": rows}, indent=1) + "\n")
    (out / "sweep.md").write_text(
        f"# Sweep on {env['device']}\n\n`{env['command']}`, {env['date']}; cupy {env['cupy']}, "
        f"torch {env['torch']}, cuflash {env['cuflash']}\n\n" + table)
    return table


def main(argv=None) -> int:
    argv = sys.argv if argv is None else argv
    args = parse_args(argv[1:])
    cupy = require_gpu()
    torch = import_torch()
    impls = implementations(args.impls, torch)
    timing = TIMING["quick" if args.quick else "full"]
    env = environment(cupy, torch, argv)
    print(f"{env['device']}: cupy {env['cupy']}, torch {env['torch']}; "
          f"implementations: {', '.join(impls)}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    warm_up_gpu()
    cupy.random.seed(0)
    causals = CAUSAL[args.causal]
    total = math.prod(map(len, (args.dtypes, args.headdims, args.seqlens, causals, args.modes)))
    rows, errors_seen = [], set()
    for dtype, headdim, seqlen in itertools.product(args.dtypes, args.headdims, args.seqlens):
        batch, nheads = standard_shape(seqlen, headdim)
        inputs = make_inputs(DTYPES[dtype], batch, seqlen, nheads, headdim)
        for causal, mode in itertools.product(causals, args.modes):
            row_flops = flops(mode, batch, nheads, seqlen, headdim, causal)
            row = {"mode": mode, "dtype": dtype, "headdim": headdim, "causal": causal,
                   "seqlen": seqlen, "batch": batch, "nheads": nheads, "flops": row_flops,
                   "results": {name: measure(run, mode, inputs, causal, row_flops, timing,
                                             torch)
                               for name, run in impls.items()}}
            rows.append(row)
            print(progress(row, len(rows), total), flush=True)
            for name, result in row["results"].items():
                if "error" in result and (name, result["error"]) not in errors_seen:
                    errors_seen.add((name, result["error"]))
                    print(f"      {name}: {result['error']}", flush=True)
            # After every row: a run stopped by a time limit keeps what it measured.
            table = write_results(args.out, env, rows, list(impls))
        del inputs
        release_memory(torch)

    print("\n" + table)
    plot(rows, list(impls), args.out / "sweep.png")
    print(f"wrote sweep.json, sweep.md and sweep.png to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
