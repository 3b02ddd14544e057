"""Reads the log of ``bench/device_session.sh ab`` (cuflash from several trees, timed in
alternating passes) and prints one markdown table: each row's TFLOP/s per tree, the mean
over its passes, and the ratio of this tree (``.``, the one the call ran in) to each other.

    python bench/ab_table.py ab.log                  every implementation the log holds
    python bench/ab_table.py ab.log --impls cuflash  only these
    python bench/ab_table.py ab.log --spread         each mean with its passes' lowest and
                                                     highest, to judge the noise
    python bench/ab_table.py ab.log --base abtree    every tree's ratio to abtree instead
                                                     (three trees: each change on its own)

A pass is the lines after ``=== pass N: TREE`` (TREE ``.`` is this tree); its rows are the
sweep's progress lines (``[ 3/12] bwd    bf16 hd128 full   seqlen  4096: TFLOP/s cuflash
499.6 | cuflash-det 458.0``), the first of each (mode, dtype, head dim, mask, seqlen) in the
pass. Entries that are not numbers (a failed implementation) are left out. No GPU is needed.

The abturns stage's sweeps (``bench/sweep.py --trees``, the trees in turns in one process,
once in each order: one sweep reads identical trees up to 4% apart, at times favouring the
tree listed later):

    python bench/ab_table.py --turns abturns abturns_swapped
                                  per row, this tree's ratio to each other tree in each sweep
                                  and their geometric mean
"""
import argparse
import collections
import json
import math
import os
import re
import statistics
import sys

PASS = re.compile(r"=== pass \d+: (\S+)")
ROW = re.compile(r"\[\s*\d+/\d+\]\s+(\w+)\s+(\w+)\s+hd(\d+)\s+(\w+)\s+seqlen\s+(\d+): "
                 r"TFLOP/s (.*)")
THIS = "."


def parse(lines):
    """{(mode, dtype, headdim, mask, seqlen, impl): {tree: [TFLOP/s of each pass]}} and the
    trees in the order the log first names them."""
    samples = collections.defaultdict(lambda: collections.defaultdict(list))
    trees, tree, seen = [], None, set()
    for line in lines:
        m = PASS.match(line)
        if m:
            tree, seen = m.group(1), set()
            if tree not in trees:
                trees.append(tree)
            continue
        m = ROW.match(line)
        if not m or tree is None:
            continue
        mode, dtype, hd, mask, seqlen, entries = m.groups()
        key = (mode, dtype, int(hd), mask, int(seqlen))
        if key in seen:
            continue
        seen.add(key)
        for entry in entries.split("|"):
            parts = entry.split()
            if len(parts) != 2:
                continue
            try:
                value = float(parts[1])
            except ValueError:
                continue
            samples[key + (parts[0],)][tree].append(value)
    return samples, trees


def row_order(key):
    """The tables' row order: mode, dtype, implementation (then anything past the first six
    fields, a tree), head dim, mask (full first), seqlen; key: (mode, dtype, head dim, mask,
    seqlen, implementation, ...)."""
    mode, dtype, hd, mask, seqlen, impl = key[:6]
    return (mode, dtype, impl, *key[6:], hd, mask != "full", seqlen)


def table(samples, trees, impls=None, spread=False, base=None):
    """The markdown table; rows in mode, dtype, impl, head dim, mask, seqlen order. Ratios:
    this tree's to each other tree's, or with ``base`` every other tree's to base's."""
    trees = [t for t in trees if t != THIS] + ([THIS] if THIS in trees else [])
    if base is not None and base not in trees:
        raise ValueError(f"base: no tree {base!r} in the log ({', '.join(trees)})")
    if base is None:
        ratios = [(THIS, t) for t in trees if t != THIS] if THIS in trees else []
    else:
        ratios = [(t, base) for t in trees if t != base]
    head = ["mode", "dtype", "impl", "hd", "mask", "seqlen"] + [f"`{t}`" for t in trees]
    head += [f"`{a}` / `{b}`" for a, b in ratios]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key in sorted(samples, key=row_order):
        mode, dtype, hd, mask, seqlen, impl = key
        if impls and impl not in impls:
            continue
        per_tree = samples[key]
        means = {t: statistics.fmean(v) for t, v in per_tree.items()}
        cells = [mode, dtype, impl, str(hd), mask, str(seqlen)]
        for t in trees:
            if t not in means:
                cells.append("-")
            elif spread and len(per_tree[t]) > 1:
                cells.append(f"{means[t]:.1f} ({min(per_tree[t]):.0f}-{max(per_tree[t]):.0f})")
            else:
                cells.append(f"{means[t]:.1f}")
        cells += [f"{means[a] / means[b]:.3f}" if a in means and b in means else "-"
                  for a, b in ratios]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def turns_table(sweeps) -> str:
    """The markdown table of ``--turns``: ``sweeps`` are sweep.json records of sweeps with
    trees (implementations named IMPL@TREE); per row, implementation and other tree, the
    ratio of this tree's TFLOP/s to that tree's in each sweep and the geometric mean."""
    ratios = collections.defaultdict(list)
    for sweep in sweeps:
        for row in sweep["rows"]:
            key = (row["mode"], row["dtype"], row["headdim"],
                   "causal" if row["causal"] else "full", row["seqlen"])
            got = {name: r["tflops"] for name, r in row["results"].items() if "tflops" in r}
            for name, value in got.items():
                impl, _, tree = name.partition("@")
                this = got.get(f"{impl}@{THIS}")
                if tree and tree != THIS and this:
                    ratios[key + (impl, tree)].append(this / value)
    head = ["mode", "dtype", "impl", "hd", "mask", "seqlen", "tree", "each sweep",
            "geometric mean"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key in sorted(ratios, key=row_order):
        mode, dtype, hd, mask, seqlen, impl, tree = key
        each = ratios[key]
        mean = math.exp(statistics.fmean(math.log(x) for x in each))
        lines.append(f"| {mode} | {dtype} | {impl} | {hd} | {mask} | {seqlen} | `. / {tree}` "
                     f"| {' '.join(f'{x:.3f}' for x in each)} | {mean:.3f} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("log", nargs="?", help="the ab stage's log ($OUT/ab.log)")
    parser.add_argument("--turns", nargs="+", metavar="SWEEP",
                        help="instead: the abturns stage's sweeps (directories holding "
                             "sweep.json, or the files)")
    parser.add_argument("--impls", type=lambda s: s.split(","), default=None,
                        help="comma-separated implementations to show (default: all)")
    parser.add_argument("--spread", action="store_true",
                        help="show each mean's lowest and highest pass")
    parser.add_argument("--base", default=None,
                        help="ratios of every other tree to this one (default: this tree, "
                             "'.', to each other)")
    args = parser.parse_args(argv)
    if args.turns:
        sweeps = []
        for path in args.turns:
            with open(os.path.join(path, "sweep.json") if os.path.isdir(path) else path) as f:
                sweeps.append(json.load(f))
        print(turns_table(sweeps))
        return
    if args.log is None:
        parser.error("a log, or --turns")
    with open(args.log) as f:
        samples, trees = parse(f)
    if not samples:
        sys.exit(f"{args.log}: no rows after a '=== pass' line")
    try:
        print(table(samples, trees, args.impls, args.spread, args.base))
    except ValueError as e:
        sys.exit(str(e))


if __name__ == "__main__":
    main()
