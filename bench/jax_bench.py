r"""cuflash inside ``jax.jit`` (issue 15): ``cuflash.jax.attention`` against JAX's cuDNN
attention and FlashAttention-3, and against cuflash called on CuPy arrays, in one process on
the same inputs, every implementation timed the same way.

    PYTHONPATH=. python3 bench/jax_bench.py --out bench/results/<name>
    PYTHONPATH=. python3 bench/jax_bench.py --out /tmp/jax --dry-run     # CPU, seconds

Two parts:
- sweep: the standard sweep's shapes (hidden 2048, batch = 16384 // seqlen) at seqlen 4k
  and 16k, head dims 64, 128 and 256, causal and not, bf16: forward ("fwd") and forward +
  backward ("fwdbwd") of each implementation, and "bwd" = fwdbwd - fwd for every one of
  them alike. Per row: TFLOP/s, cuflash.jax's speed over cuflash on CuPy arrays (issue 15:
  at least 0.95 at seqlen >= 4k) and over the best JAX peer.
- small: time per call at small causal shapes, forward and forward + backward: "fwd_small"
  batch 1, seqlen 128, 8 heads, head dim 64; "fwd_large" batch 4, seqlen 512, 16 heads, head
  dim 128. 200 calls back to back, the median of 14 runs in turns. Per row: cuflash.jax's
  time over JAX cuDNN's (issue 15: at most 1.0).

Implementations:
- cuflash: ``cuflash.attention_forward`` (fwd) and then ``attention_backward`` (fwdbwd) on
  CuPy arrays (bench/sweep.py's).
- cuflash-jax: ``jax.jit(cuflash.jax.attention)`` and ``jax.jit`` of its ``jax.vjp`` step
  (forward + backward, returning dq, dk, dv).
- jax-cudnn: the same with ``jax.nn.dot_product_attention(implementation="cudnn")``.
- fa3: the same with ``flash_attn3_jax.flash_mha`` (head dims up to 128: a gap above).
JAX inputs are the CuPy inputs handed over by DLPack (else copied once, outside the
timing). Timing (bench/sweep.py's ``shape_rows``): warm-up (compilation), then runs of N
calls back to back and one synchronisation at the end (``jax.block_until_ready`` of the
last result, then ``cudaDeviceSynchronize``), a row's implementations taking turns with
their runs, the median of each one's. Forward outputs are compared with cuflash's once per
row (the sweep's check). A library that does not import leaves a gap with the reason.

Writes jax.json (every number, device, versions) and jax.md into --out after every row.

On the device (H200; the runner executes in the repository root, writes under $OUT, brings
back at most 8 files, 10 minutes a call). Estimate, with the cuflash kernels already in
CUPY_CACHE_DIR (cold, add minutes of NVRTC): imports and warm-up ~20 s; the sweep part 12
shapes x 2 modes x 4 implementations at ~0.5 s each and ~60 JAX compilations at ~1 s; the
small part ~15 s; so ~2-3 minutes: it fits beside bench/host.py (~2 minutes) in one call.
FA3 comes from the carried wheels (carry: [".whl"]: ``flash-attn3-jax==0.2.3`` and
``einops``, which it imports, as bench/sweep.py's docstring says):

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl; \
    export PYTHONPATH=.:/tmp/site PYTHONUNBUFFERED=1 CUPY_CACHE_DIR=/tmp/cfcache \
        XLA_PYTHON_CLIENT_PREALLOCATE=false; \
    timeout 400 python3 bench/jax_bench.py --out $OUT/jax_bench --stop-after 330 \
        2>&1 | tee $OUT/jax_bench.log

Three files come back: jax.json, jax.md and the log ("summary:" lines at its end).
"""
from __future__ import annotations

import os

# Before anything can import JAX: without it JAX takes 75% of the GPU memory.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse  # noqa: E402 (after the environment variable above)
import functools  # noqa: E402
import itertools  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import _common  # noqa: E402
import sweep  # noqa: E402
from _common import DTYPES, Timing, flops, make_inputs, standard_shape  # noqa: E402

IMPLS = ("cuflash", "cuflash-jax", "jax-cudnn", "fa3")
DRY_IMPLS = ("cuflash", "cuflash-jax", "jax-xla", "jax-cudnn", "fa3")
JAX_PEERS = ("jax-cudnn", "fa3", "jax-xla")
OURS, CUPY = "cuflash-jax", "cuflash"
SEQLENS = (4096, 16384)
HEADDIMS = (64, 128, 256)
MODES = ("fwd", "fwdbwd")  # measured; "bwd" is derived from them
PARTS = ("sweep", "small")
SMALL = {  # name: (batch, seqlen, nheads, headdim), causal (host.py's forward shapes)
    "fwd_small": (1, 128, 8, 64),
    "fwd_large": (4, 512, 16, 128),
}
DRY_SMALL = {"fwd_small": (1, 64, 2, 64), "fwd_large": (2, 128, 2, 128)}
SMALL_TIMING = {"full": Timing(budget_ms=0.0, min_calls=200, max_calls=200, reps=7,
                               warmup=20),
                "quick": Timing(budget_ms=0.0, min_calls=50, max_calls=50, reps=3,
                                warmup=5),
                "dry": Timing(budget_ms=0.0, min_calls=2, max_calls=2, reps=2, warmup=1)}
TARGET_SPEED = 0.95   # cuflash.jax / cuflash on CuPy at seqlen >= 4k, at least
TARGET_TIME = 1.0     # cuflash.jax / JAX cuDNN time per call at small shapes, at most


def derive_backward(fwd: dict, fwdbwd: dict) -> dict:
    """A "bwd" row from the "fwd" and "fwdbwd" rows of one shape: for every implementation
    its forward + backward time minus its forward time (JAX's backward cannot be called
    alone, so every implementation is measured this way here)."""
    results = {}
    for name, both in fwdbwd["results"].items():
        alone = fwd["results"].get(name, {})
        if "ms" not in both or "ms" not in alone:
            results[name] = {"error": both.get("error") or alone.get("error")
                             or "no forward time"}
        elif both["ms"] <= alone["ms"]:
            results[name] = {"error": f"fwdbwd {both['ms']:.4f} ms <= fwd {alone['ms']:.4f} ms"}
        else:
            ms = both["ms"] - alone["ms"]
            bwd_flops = flops("bwd", fwd["batch"], fwd["nheads"], fwd["seqlen"],
                              fwd["headdim"], fwd["causal"])
            results[name] = {"ms": ms, "total_ms": both["ms"], "part_ms": alone["ms"],
                             "tflops": bwd_flops / ms / 1e9}
    peers = [n for n in results if n in sweep.PEERS]
    return sweep.make_row("bwd", fwd["dtype"], fwd["headdim"], fwd["causal"], fwd["seqlen"],
                          fwd["batch"], fwd["nheads"], results, peers)


def compare(row: dict) -> dict:
    """The row with cuflash.jax's speed over cuflash on CuPy ("jax_over_cupy") and over the
    best JAX peer ("jax_over_peer", "best_jax_peer"), None where one did not run."""
    results = row["results"]
    ours = results.get(OURS, {})
    cupy = results.get(CUPY, {})
    ran = [n for n in JAX_PEERS if "ms" in results.get(n, {})]
    best = min(ran, key=lambda n: results[n]["ms"]) if ran else None
    row["jax_over_cupy"] = cupy["ms"] / ours["ms"] if "ms" in ours and "ms" in cupy else None
    row["best_jax_peer"] = best
    row["jax_over_peer"] = (results[best]["ms"] / ours["ms"]
                            if best is not None and "ms" in ours else None)
    return row


def summarise(rows) -> list[dict]:
    """Per part and mode: the minimum and median of cuflash.jax / cuflash on CuPy (speed),
    over the sweep's rows at seqlen >= 4k (issue 15's condition) and over every small
    shape, and for the small shapes the largest cuflash.jax / JAX cuDNN time."""
    found = []
    for part, mode in dict.fromkeys((r["part"], r["mode"]) for r in rows):
        group = [r for r in rows if (r["part"], r["mode"]) == (part, mode)
                 and (part == "small" or r["seqlen"] >= sweep.LONG_SEQLEN)]
        speed = [r["jax_over_cupy"] for r in group if r["jax_over_cupy"] is not None]
        times = [r["results"][OURS]["ms"] / r["results"]["jax-cudnn"]["ms"] for r in group
                 if "ms" in r["results"].get(OURS, {})
                 and "ms" in r["results"].get("jax-cudnn", {})]
        found.append({"part": part, "mode": mode, "rows": len(group),
                      "min_jax_over_cupy": min(speed) if speed else None,
                      "median_jax_over_cupy": statistics.median(speed) if speed else None,
                      "max_time_over_cudnn": max(times) if times else None})
    return found


def summary_line(s: dict) -> str:
    fmt = sweep.fmt
    line = (f"{s['part']} {s['mode']}: cuflash.jax / cuflash on CuPy (speed), min "
            f"{fmt(s['min_jax_over_cupy'])}, median {fmt(s['median_jax_over_cupy'])} over "
            f"{s['rows']} rows" + ("" if s["part"] == "small"
                                   else f" at seqlen >= {sweep.LONG_SEQLEN}"))
    if s["part"] == "small":
        line += (f"; cuflash.jax / JAX cuDNN (time per call), max "
                 f"{fmt(s['max_time_over_cudnn'])} (target <= {TARGET_TIME})")
    else:
        line += f" (target >= {TARGET_SPEED})"
    return line


def markdown(rows, names) -> str:
    fmt = sweep.fmt
    lines = []
    for part, mode in dict.fromkeys((r["part"], r["mode"]) for r in rows):
        small = part == "small"
        unit = "us per call" if small else "TFLOP/s"
        lines += [f"## {part} {mode}: {unit}", "",
                  ("| call | batch x seqlen x heads x hd | " if small
                   else "| hd | causal | seqlen | batch x heads | ")
                  + " | ".join(names) + " | cuflash.jax / cuflash (speed) | best JAX peer "
                  "| cuflash.jax / it (speed) |",
                  "|---|---|" + ("" if small else "---|---|") + "---:|" * len(names)
                  + "---:|---|---:|"]
        for row in rows:
            if (row["part"], row["mode"]) != (part, mode):
                continue
            if small:
                cells = [fmt(row["results"][n]["ms"] * 1e3, 1) if "ms" in row["results"][n]
                         else "-" for n in names]
                head = (f"| {row['call']} | {row['batch']} x {row['seqlen']} x "
                        f"{row['nheads']} x {row['headdim']} | ")
            else:
                cells = [sweep.fmt_tflops(row["results"][n].get("tflops")) for n in names]
                head = (f"| {row['headdim']} | {'yes' if row['causal'] else 'no'} | "
                        f"{row['seqlen']} | {row['batch']} x {row['nheads']} | ")
            lines.append(head + " | ".join(cells) + f" | {fmt(row['jax_over_cupy'])} | "
                         f"{row['best_jax_peer'] or '-'} | {fmt(row['jax_over_peer'])} |")
        lines.append("")
    lines += ["## Summary", ""] + [f"- {summary_line(s)}" for s in summarise(rows)]
    lines += ["", '"bwd" = fwdbwd - fwd for every implementation; the small shapes are '
                  "causal; speed ratios are time of the other / time of cuflash.jax."]
    errors = sorted({(n, res["error"]) for r in rows for n, res in r["results"].items()
                     if "error" in res})
    if errors:
        lines += ["", "## Gaps", ""] + [f"- {n}: {e}" for n, e in errors]
    return "\n".join(lines) + "\n"


def write_results(out: Path, env, rows, names) -> str:
    """jax.json and jax.md of the rows so far; returns the tables."""
    table = markdown(rows, names)
    _common.write_report(out, "jax", "cuflash.jax", {**env, "summary": summarise(rows)}, rows,
                         table, ("cuflash", "cupy", "jax", "flash_attn3_jax"))
    return table


def parse_args(argv):
    comma_list = sweep.comma_list
    parser = argparse.ArgumentParser(
        description="cuflash.jax (jitted) against JAX cuDNN, FA3 and cuflash on CuPy arrays: "
                    "TFLOP/s at the sweep's shapes and time per call at small shapes (needs "
                    "a CUDA GPU, except --dry-run).")
    parser.add_argument("--out", type=Path, required=True, help="folder for jax.json, jax.md")
    parser.add_argument("--parts", type=comma_list(choices=PARTS), default=list(PARTS),
                        help="comma-separated: sweep,small (default both)")
    parser.add_argument("--dtypes", type=comma_list(choices=DTYPES), default=["bf16"],
                        help="comma-separated: bf16,fp16 (default bf16)")
    parser.add_argument("--headdims", type=comma_list(int), default=list(HEADDIMS),
                        help=f"comma-separated (default {','.join(map(str, HEADDIMS))})")
    parser.add_argument("--seqlens", type=comma_list(int),
                        help=f"comma-separated (default {','.join(map(str, SEQLENS))})")
    parser.add_argument("--causal", choices=sweep.CAUSAL, default="both",
                        help="causal masking at the sweep's shapes: no, yes or both (default)")
    parser.add_argument("--impls", type=comma_list(),
                        help=f"comma-separated (default {','.join(IMPLS)})")
    parser.add_argument("--quick", action="store_true", help="fewer timed calls")
    parser.add_argument("--dry-run", action="store_true",
                        help="on the CPU (NumPy backend, JAX on the CPU, jax-xla standing in "
                             "for jax-cudnn) at tiny shapes: every code path, no GPU")
    parser.add_argument("--stop-after", type=float, metavar="SECONDS",
                        help="start no new row after this many seconds, then write the report")
    args = parser.parse_args(argv)
    args.seqlens = args.seqlens or list(sweep.DRY_SEQLENS if args.dry_run else SEQLENS)
    args.impls = args.impls or list(DRY_IMPLS if args.dry_run else IMPLS)
    return args


def main(argv=None) -> int:
    argv = sys.argv if argv is None else argv
    args = parse_args(argv[1:])
    s = sweep.setup(args.dry_run, argv)
    impls = sweep.select(args.impls, s.known)
    kind = "dry" if args.dry_run else "quick" if args.quick else "full"
    timing, small_timing = sweep.TIMING[kind], SMALL_TIMING[kind]
    shape_of = functools.partial(standard_shape, **(sweep.DRY if args.dry_run else {}))
    print(f"{s.env['device']}: cupy {s.env['cupy']}, jax {s.env['jax']} "
          f"({s.env['jax_backend']}), flash_attn3_jax {s.env['flash_attn3_jax']}; "
          f"implementations: {', '.join(impls)}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    if s.gpu:
        sweep.warm_up_gpu()
    s.xp.random.seed(0)
    shapes = []  # (part, call name, dtype, (batch, seqlen, nheads, headdim), causals, timing)
    if "sweep" in args.parts:
        for dtype, headdim, seqlen in itertools.product(args.dtypes, args.headdims,
                                                        args.seqlens):
            batch, nheads = shape_of(seqlen, headdim)
            shapes.append(("sweep", None, dtype, (batch, seqlen, nheads, headdim),
                           sweep.CAUSAL[args.causal], timing))
    if "small" in args.parts:
        for dtype, (call, shape) in itertools.product(
                args.dtypes, (DRY_SMALL if args.dry_run else SMALL).items()):
            shapes.append(("small", call, dtype, shape, (True,), small_timing))
    rows, started, table = [], time.perf_counter(), ""
    for part, call, dtype, shape, causals, shape_timing in shapes:
        if args.stop_after is not None and time.perf_counter() - started > args.stop_after:
            print(f"stopped after {time.perf_counter() - started:.0f} s (--stop-after)",
                  flush=True)
            break
        inputs = make_inputs(DTYPES[dtype], *shape, xp=s.xp)
        measured = {}
        for row in sweep.shape_rows(impls, inputs, dtype, causals, MODES, shape_timing,
                                    s.sync, s.release, clock=s.clock):
            row.update(part=part, call=call)
            measured[row["causal"], row["mode"]] = row
            new = [row]
            if row["mode"] == "fwdbwd":
                new.append(derive_backward(measured[row["causal"], "fwd"], row))
                new[-1].update(part=part, call=call)
            for r in new:
                rows.append(compare(r))
                print(f"{part:5} {call or ''} " + sweep.progress(r, len(rows), "?")
                      + f" | jax/cupy {sweep.fmt(r['jax_over_cupy'])}", flush=True)
            table = write_results(args.out, s.env, rows, list(impls))
        del inputs
        s.release()
    print("\n" + table)
    for line in summarise(rows):
        print("summary: " + summary_line(line))
    print(f"wrote jax.json and jax.md to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
