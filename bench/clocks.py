"""The SM clock and board power while one call runs back to back: does an implementation run
slower in a sweep because the chip, held at its power limit, clocks it lower?

    python bench/clocks.py --impls cuflash,fa3 --headdim 128 --seqlen 4096 [--causal]

For each implementation (bench/sweep.py's names) the forward (or ``--mode bwd``) of the
sweep's shape runs back to back for ``--seconds`` while ``nvidia-smi`` samples the SM clock
and power every 50 ms; printed per implementation: TFLOP/s over the run, the mean clock and
power of the samples in its second half (past the ramp), and TFLOP/s per GHz.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time

import _common
import sweep


def sampled(seconds: float, fn, sync) -> tuple[float, list]:
    """Calls of ``fn`` back to back for ``seconds``: (calls per second, [(clock MHz, power
    W)] of the second half)."""
    smi = subprocess.Popen(["nvidia-smi", "--query-gpu=clocks.sm,power.draw",
                            "--format=csv,noheader,nounits", "-lms", "50"],
                           stdout=subprocess.PIPE, text=True)
    try:
        start, calls = time.perf_counter(), 0
        while time.perf_counter() - start < seconds:
            for _ in range(10):
                fn()
            calls += 10
            sync()
        rate = calls / (time.perf_counter() - start)
    finally:
        smi.terminate()
    samples = []
    for line in smi.communicate()[0].split("\n"):
        try:  # "[N/A]" where the board does not report a value
            clock, power = (float(x) for x in line.split(","))
        except ValueError:
            continue
        samples.append((clock, power))
    return rate, samples[len(samples) // 2:]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impls", type=sweep.comma_list(), default=["cuflash", "fa3"])
    parser.add_argument("--mode", choices=("fwd", "bwd"), default="fwd")
    parser.add_argument("--dtype", choices=tuple(_common.DTYPES), default="bf16")
    parser.add_argument("--headdim", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=4096)
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--seconds", type=float, default=3.0)
    argv = sys.argv if argv is None else argv
    args = parser.parse_args(argv[1:])
    s = sweep.setup(False, argv)
    impls = sweep.select(args.impls, s.known)
    batch, nheads = sweep.standard_shape(args.seqlen, args.headdim)
    q, k, v, dout = _common.make_inputs(_common.DTYPES[args.dtype], batch, args.seqlen, nheads,
                                        args.headdim)
    flop = _common.flops(args.mode, batch, nheads, args.seqlen, args.headdim, args.causal)
    sweep.warm_up_gpu()
    print(f"{s.env['device']}: {args.mode} {args.dtype} hd{args.headdim} seqlen {args.seqlen}"
          f" {'causal' if args.causal else 'full'}, {batch} x {nheads}, {args.seconds} s each")
    for name, impl in impls.items():
        try:
            with impl.run(args.mode, q, k, v, dout, args.causal) as fn:
                fn()
                s.sync()
                rate, samples = sampled(args.seconds, fn, s.sync)
        except _common.Skipped as why:
            print(f"{name}: skipped ({why})")
            continue
        clock = sum(c for c, _ in samples) / max(len(samples), 1)
        power = sum(w for _, w in samples) / max(len(samples), 1)
        tflops = rate * flop / 1e12
        print(f"{name}: {tflops:.1f} TFLOP/s, SM clock {clock:.0f} MHz, {power:.0f} W "
              f"({len(samples)} samples), {tflops / clock * 1e3:.1f} TFLOP/s per GHz")
        s.release()
    return 0


if __name__ == "__main__":
    sys.exit(main())
