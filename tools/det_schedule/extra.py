"""Sensitivity runs: the cost of switching key blocks inside a CTA and of a per-CTA overhead
at the real sections (h = 0.75 T), and two more shapes (2k, 8k) with the host's delta."""
from model import cross_delta, current, pick_delta, simulate, split

REAL = {'1k': (128, 16, 16, 0), '4k': (32, 64, 4, 2), '16k': (8, 256, 1, 8)}  # P, M, S, delta
for sz, (P, M, S, d) in REAL.items():
    cur, paired = current(P, M, S), cross_delta(P, M, max(S, 2), d)
    for overhead in (0, 0.5, 1):
        a = simulate(cur, 0.75, overhead=overhead)['makespan']
        row = [round(simulate(paired, 0.75, overhead=overhead, switch=sw)['makespan'] / a, 3)
               for sw in (0, 0.5, 1)]
        print(sz, 'overhead', overhead, 'paired / current makespan for switch 0, .5, 1:', row,
              flush=True)
for name, (P, M, S) in {'2k': (64, 32, 8), '8k': (16, 128, 2)}.items():
    d = pick_delta(P, M)
    print(name, 'delta', d, flush=True)
    for scheme, c in (('current', current(P, M, S)), ('cross', cross_delta(P, M, max(S, 2), 0)),
                      ('cross_delta', cross_delta(P, M, max(S, 2), d)), ('split', split(P, M, S))):
        jittered = sum(simulate(c, 0.75, jitter=0.1, seed=s)['busy'] for s in (1, 2, 3)) / 3
        print(name, scheme, [round(simulate(c, h)['busy'], 3) for h in (0, 0.5, 0.75, 1, 1.25)],
              'jitter .1 h .75', round(jittered, 3), flush=True)
