"""The forward's candidate tiles per head dim, timed side by side: how its tile table is chosen.

    PYTHONPATH=. python3 bench/fwd_tiles.py --out $OUT/tiles              # every head dim
    PYTHONPATH=. python3 bench/fwd_tiles.py --out $OUT/tiles --headdims 64,256 --seqlens 4096
    PYTHONPATH=. python3 bench/fwd_tiles.py --list                         # candidates, no GPU

For each head dim, seqlen (the standard shape: hidden 2048, batch = 16384 // seqlen) and
mask, every candidate of CANDIDATES runs on the same inputs in one process, its output
checked against the first candidate's, and is timed alike (``_common.Runner``: runs of
calls back to back, one synchronisation each) in 15 turns, each running every candidate
once, every second turn in the reverse order (the card's clock drifts as it warms: in turns
every candidate meets the same drift). The table gives the median TFLOP/s of each
candidate's runs and its ratio to the row's best (tiles.json: every run); the candidate the
table (ops/forward.py) chooses now is marked. bf16 by default (fp16 runs the same code).
About 5 minutes on an H200 for the default set with warm kernels; --stop-after ends it in
time (the report is rewritten after every row).

Writes tiles.json and tiles.md into --out.
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

from _common import (DTYPES, Runner, Timing, cuflash_launches, flops, make_inputs,
                     require_gpu, standard_shape, turns)

# Head dim -> candidates: (label, how to build its ops.forward.Config). "mma" is flash_fwd
# (mma.sync); "sm90 Bc xC" is flash_fwd_sm90 with key blocks of Bc and C consumers.
CANDIDATES = {
    32: (("sm90 128x3", ("sm90", 128, 3)), ("sm90 128x2", ("sm90", 128, 2)), ("mma", ("mma",))),
    64: (("sm90 128x3", ("sm90", 128, 3)), ("sm90 192x2", ("sm90", 192, 2)),
         ("sm90 128x2", ("sm90", 128, 2)), ("sm90 96x2", ("sm90", 96, 2)),
         ("sm90 64x2", ("sm90", 64, 2))),
    96: (("sm90 128x2", ("sm90", 128, 2)), ("sm90 160x2", ("sm90", 160, 2)),
         ("sm90 176x2", ("sm90", 176, 2)), ("mma", ("mma",))),
    128: (("sm90 128x2", ("sm90", 128, 2)), ("sm90 176x2", ("sm90", 176, 2)),
          ("sm90 160x2", ("sm90", 160, 2)), ("sm90 96x2", ("sm90", 96, 2)),
          ("sm90 64x2", ("sm90", 64, 2))),
    192: (("sm90 112x2", ("sm90", 112, 2)), ("sm90 96x2", ("sm90", 96, 2)), ("mma", ("mma",))),
    256: (("sm90 80x2", ("sm90", 80, 2)), ("sm90 64x2", ("sm90", 64, 2)), ("mma", ("mma",))),
}
SEQLENS = (1024, 4096, 16384)
TIMING = Timing(budget_ms=60.0, min_calls=3, max_calls=200, reps=15)


def _problem(dtype, headdim: int, seqlen: int, causal: bool):
    from cuflash._core import Problem
    right = 0 if causal else -1  # a causal mask is a window of no keys to the right
    return Problem(0, dtype, 1, seqlen, seqlen, 1, 1, headdim, (), (), (), 1.0, 0.0, -1, right,
                   None, False, seqlen, seqlen)


def config(spec, dtype, headdim: int, seqlen: int, causal: bool):
    """A candidate's config, in clusters where ops.forward would run the row in them."""
    from cuflash import ops
    if spec[0] == "mma":
        return ops.forward.mma_config(dtype, headdim, False, False)
    _, block_n, consumers = spec
    clusters = ops.forward.choose(_problem(dtype, headdim, seqlen, causal), "sm_90").cluster
    return ops.forward.sm90_config(dtype, headdim, 0, False, seqlen, block_n, consumers,
                                   cluster=None if clusters > 1 else 1)


def chosen_label(dtype, headdim: int, seqlen: int, causal: bool) -> str | None:
    """The label of the candidate that ops.forward chooses on sm_90 now."""
    from cuflash import ops
    now = ops.forward.choose(_problem(dtype, headdim, seqlen, causal), "sm_90").name_expression
    return next((label for label, spec in CANDIDATES[headdim]
                 if config(spec, dtype, headdim, seqlen, causal).name_expression == now),
                None)


def measure_row(dtype, headdim: int, seqlen: int, causal: bool, count: int = TIMING.reps) -> dict:
    """Every candidate of the row on the same inputs, its output against the first's, then
    timed in ``count`` turns of one run each (_common.turns; a candidate's place in the
    order moved its number by up to 10% at 1k on an H100): TFLOP/s, each run's and their
    median."""
    import cupy
    batch, nheads = standard_shape(seqlen, headdim)
    q, k, v, _ = make_inputs(dtype, batch, seqlen, nheads, headdim, seed=seqlen + headdim)
    row = {"headdim": headdim, "seqlen": seqlen, "causal": causal, "batch": batch,
           "nheads": nheads, "chosen": chosen_label(dtype, headdim, seqlen, causal),
           "tflops": {}, "runs": {}, "max_diff": {}, "errors": {}}
    work = flops("fwd", batch, nheads, seqlen, headdim, causal)
    first, calls = None, {}
    for label, spec in CANDIDATES[headdim]:
        try:
            fwd_config = config(spec, dtype, headdim, seqlen, causal)
            forward, _ = cuflash_launches(q, k, v, causal, fwd_config=fwd_config)
            out = forward()[0]
            if first is None:
                first = out
            else:
                row["max_diff"][label] = float(cupy.abs(out.astype(cupy.float32) -
                                                        first.astype(cupy.float32)).max())
            calls[label] = Runner(forward, TIMING)
        except Exception as e:  # a candidate that cannot run this shape leaves a gap
            row["errors"][label] = f"{type(e).__name__}: {e}"
    for label in turns(list(calls), count):
        row["runs"].setdefault(label, []).append(work / calls[label].run() / 1e9)
    row["tflops"] = {label: statistics.median(t) for label, t in row["runs"].items()}
    best = max(row["tflops"].values(), default=None)
    row["ratio"] = {label: t / best for label, t in row["tflops"].items()} if best else {}
    return row


def markdown(rows, dtype_name: str) -> str:
    lines = [f"# Forward tile candidates ({dtype_name}); * = the table's choice now", "",
             "TFLOP/s, the median of each candidate's runs (in turns), and its ratio to the "
             "row's best.",
             ""]
    for hd in sorted({r["headdim"] for r in rows}):
        labels = [label for label, _ in CANDIDATES[hd]]
        lines += [f"## head dim {hd}", "",
                  "| seqlen | causal | " + " | ".join(labels) + " |",
                  "|---:|---|" + "---:|" * len(labels)]
        for r in (r for r in rows if r["headdim"] == hd):
            cells = []
            for label in labels:
                t = r["tflops"].get(label)
                mark = "*" if label == r["chosen"] else ""
                cells.append(f"{t:.0f} ({r['ratio'][label]:.2f}){mark}" if t else f"-{mark}")
            lines.append(f"| {r['seqlen']} | {'yes' if r['causal'] else 'no'} | " +
                         " | ".join(cells) + " |")
        lines.append("")
    diffs = [(r, label, d) for r in rows for label, d in r["max_diff"].items() if d > 0.05]
    if diffs:
        lines += ["Outputs that differ from the first candidate's by more than 0.05:", ""]
        lines += [f"- hd {r['headdim']} {r['seqlen']} causal={r['causal']}: {label} {d:.3g}"
                  for r, label, d in diffs]
    errors = [(r, label, e) for r in rows for label, e in r["errors"].items()]
    if errors:
        lines += ["", "Errors:", ""]
        lines += [f"- hd {r['headdim']} {r['seqlen']}: {label}: {e}" for r, label, e in errors]
    return "\n".join(lines) + "\n"


def parse_args(argv):
    ints = lambda text: [int(x) for x in text.split(",") if x]  # noqa: E731
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="folder for tiles.json and tiles.md")
    parser.add_argument("--headdims", type=ints, default=sorted(CANDIDATES))
    parser.add_argument("--seqlens", type=ints, default=list(SEQLENS))
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--stop-after", type=float, metavar="SECONDS",
                        help="start no row after this many seconds")
    parser.add_argument("--list", action="store_true", help="print the candidates and exit")
    args = parser.parse_args(argv)
    unknown = set(args.headdims) - set(CANDIDATES)
    if unknown:
        parser.error(f"--headdims: no candidates for {sorted(unknown)}")
    if not args.list and not args.out:
        parser.error("--out is required")
    return args


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.list:
        for hd in args.headdims:
            print(f"{hd}: " + ", ".join(label for label, _ in CANDIDATES[hd]))
        return 0
    require_gpu()
    dtype, out = DTYPES[args.dtype], Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, start = [], time.monotonic()
    for hd, seqlen, causal in itertools.product(args.headdims, args.seqlens, (False, True)):
        if args.stop_after and time.monotonic() - start > args.stop_after:
            print("fwd_tiles: stopped (--stop-after)", flush=True)
            break
        rows.append(measure_row(dtype, hd, seqlen, causal))
        r = rows[-1]
        print(f"hd {hd} {seqlen} causal={causal}: " + ", ".join(
            f"{label} {t:.0f}" for label, t in r["tflops"].items()), flush=True)
        (out / "tiles.json").write_text(json.dumps(rows, indent=1))
        (out / "tiles.md").write_text(markdown(rows, args.dtype))
    return 0


if __name__ == "__main__":
    sys.exit(main())
