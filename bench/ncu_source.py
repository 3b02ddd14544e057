"""Reads the source page of an ncu report (``ncu -i R --page source --csv``, gzipped or not:
what ``bench/device_session.sh profile`` writes per launch) and says where the warps wait.

    python bench/ncu_source.py FILE.csv.gz                 stall reasons, opcode mix, the
                                                           instructions with most samples
    python bench/ncu_source.py FILE.csv.gz --blocks 20     straight-line runs of equal
                                                           execution count (basic blocks),
                                                           most executed instructions first
    python bench/ncu_source.py FILE.csv.gz --lines 440-500 instructions by index, with their
                                                           samples and executions

Samples are warp-state samples of every warp (producer and consumers alike): a count at an
instruction is time some warp spent stalled there, by reason (ncu's stall_* columns).
No GPU is needed.
"""
import argparse
import collections
import csv
import gzip
import sys

SAMPLES = "Warp Stall Sampling (All Samples)"
EXECUTED = "Instructions Executed"


def number(text: str) -> float:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return 0.0


def load(path: str) -> tuple[list[str], list[dict]]:
    """The page's header and one dict per SASS instruction, in address order."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", newline="") as f:
        rows = list(csv.reader(f))
    start = next(i for i, r in enumerate(rows) if r and r[0] == "Address")
    header = rows[start]
    return header, [dict(zip(header, r)) for r in rows[start + 1:] if len(r) == len(header)]


def opcode(source: str) -> str:
    """The mnemonic without its predicate and modifiers ("@!P0 BRA ..." -> "BRA")."""
    words = source.split()
    if not words:
        return ""
    return (words[1] if words[0].startswith("@") and len(words) > 1 else words[0]).split(".")[0]


def reasons(header: list[str]) -> list[str]:
    return [h for h in header if h.startswith("stall_") and "(Not Issued)" not in h]


def summary(header: list[str], data: list[dict], top: int) -> None:
    stalls = reasons(header)
    total = sum(number(d[SAMPLES]) for d in data) or 1.0
    executed = sum(number(d[EXECUTED]) for d in data)
    print(f"{len(data)} instructions, {executed / 1e6:.1f} M warp instructions executed, "
          f"{total:.0f} samples")
    by_reason = collections.Counter()
    for d in data:
        for s in stalls:
            by_reason[s] += number(d[s])
    print("stall reasons: " + ", ".join(f"{s[6:]} {100 * v / total:.1f}%"
                                         for s, v in by_reason.most_common(10)))
    mix = collections.Counter()
    for d in data:
        mix[opcode(d["Source"])] += number(d[EXECUTED])
    print("executed (M): " + ", ".join(f"{k} {v / 1e6:.1f}" for k, v in mix.most_common(20)))
    print(f"\nthe {top} instructions with most samples, in address order "
          "(index, samples, executions, the three largest reasons):")
    chosen = sorted(range(len(data)), key=lambda i: -number(data[i][SAMPLES]))[:top]
    for i in sorted(chosen):
        d = data[i]
        largest = sorted(((number(d[s]), s[6:]) for s in stalls), reverse=True)[:3]
        print(f"{i:5d} {number(d[SAMPLES]):7.0f} {number(d[EXECUTED]) / 1e3:7.0f}k  "
              f"{d['Source'].strip()[:64]:64} "
              + " ".join(f"{r}:{v:.0f}" for v, r in largest if v))


def blocks(data: list[dict], top: int) -> None:
    """Runs of consecutive instructions with one execution count, by executed instructions."""
    runs, start = [], 0
    for i in range(1, len(data) + 1):
        if i == len(data) or number(data[i][EXECUTED]) != number(data[start][EXECUTED]):
            count = number(data[start][EXECUTED])
            samples = sum(number(data[j][SAMPLES]) for j in range(start, i))
            runs.append((count * (i - start), start, i - 1, count, samples))
            start = i
    print("first-last, instructions, executions each, executed (M), samples, opcodes")
    for total, first, last, count, samples in sorted(runs, reverse=True)[:top]:
        ops = collections.Counter(opcode(data[j]["Source"]) for j in range(first, last + 1))
        print(f"{first:5d}-{last:5d} {last - first + 1:5d} {count / 1e3:8.0f}k "
              f"{total / 1e6:7.1f} {samples:7.0f}  "
              + " ".join(f"{k}:{v}" for k, v in ops.most_common(6)))


def lines(data: list[dict], spec: str) -> None:
    first, last = (int(x) for x in spec.split("-"))
    for i in range(first, min(last, len(data) - 1) + 1):
        d = data[i]
        print(f"{i:5d} {number(d[SAMPLES]):7.0f} {number(d[EXECUTED]) / 1e3:7.0f}k  "
              f"{d['Source'].strip()}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("file", help="the source page as CSV (.csv or .csv.gz)")
    parser.add_argument("--top", type=int, default=30,
                        help="instructions with most samples to list (default 30)")
    parser.add_argument("--blocks", type=int, metavar="N",
                        help="list the N most executed straight-line runs instead")
    parser.add_argument("--lines", metavar="FIRST-LAST",
                        help="list the instructions of this index range instead")
    args = parser.parse_args(argv)
    header, data = load(args.file)
    if args.lines:
        lines(data, args.lines)
    elif args.blocks:
        blocks(data, args.blocks)
    else:
        summary(header, data, args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
