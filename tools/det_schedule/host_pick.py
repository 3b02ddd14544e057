"""What the host would run (once per shape, cached with the plan): list scheduling of the
CTAs' step counts alone (no turns: the model's makespan for any h <= T), for today's order
and for the paired order at delta = 0 .. M // 8; the smallest wins. O(CTAs log SMs) each."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

# The host's own step counts and list schedule (cuflash/ops/backward.py, _pair_offset's).
from cuflash.ops.backward import _makespan as span  # noqa: E402
from cuflash.ops.backward import paired_steps  # noqa: E402


def sizes_current(P, M, S):
    out = []
    for f in range(0, P, S):
        size = min(S, P - f)
        for r in range(M):
            out += [r + 1] * size
    return out


def pick(P, M, S, sms=132, switch=0.0):
    best = ("current", 0, span(sizes_current(P, M, S), sms))
    for d in range(0, max(1, M // 8) + 1):
        t = span(paired_steps(P, M, S, d, switch=switch), sms)
        if t < best[2] - 1e-9:
            best = ("paired", d, t)
    return best


if __name__ == "__main__":
    from model import simulate, cross_delta, current
    import time
    for name, (P, M, S) in {'1k': (128, 16, 16), '4k': (32, 64, 4), '16k': (8, 256, 1),
                            '8k': (16, 128, 2), '16k b2h16': (32, 256, 1), '4k b1h8': (8, 64, 4)}.items():
        t = time.time()
        sch, d, sp = pick(P, M, S)
        dt = time.time() - t
        work = P * M * (M + 1) / 2
        c = cross_delta(P, M, max(S, 2), d) if sch == 'paired' else current(P, M, S)
        sim = simulate(c, 0.75)
        print(name, sch, 'delta', d, 'host span busy', round(work / 132 / sp, 4),
              'model busy h=.75', round(sim['busy'], 4), f'{dt*1e3:.1f} ms (python)')
