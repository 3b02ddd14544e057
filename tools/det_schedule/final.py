"""Produces results_<scheme>.json: busy fraction by size, section, h; jitter; slack; L2."""
import json
import statistics
import sys

from model import SCHEMES, cross_delta, l2_hit_rate, simulate

HS = [0, 0.25, 0.5, 0.75, 1, 1.25, 1.5]
SIZES = {'1k': (128, 16, 16), '4k': (32, 64, 4), '16k': (8, 256, 1)}   # pairs, M, real section
DELTA = {'1k': 0, '4k': 2, '16k': 8}
name = sys.argv[1]
def build(sz, S):
    pairs, M, _ = SIZES[sz]
    if name == 'cross_delta':
        return cross_delta(pairs, M, S, DELTA[sz])
    if name == 'cross':
        return cross_delta(pairs, M, S, 0)
    return SCHEMES[name](pairs, M, S)
out = {}
turns = name != 'plain'
for sz, (pairs, M, Sreal) in SIZES.items():
    for S in sorted(set([1, 2, 4, 8, Sreal])):
        c = build(sz, S)
        row = {}
        for h in HS:
            r = simulate(c, h, turns=turns)
            row[h] = round(r['busy'], 4)
        out[f'{sz} S{S}'] = row
        print(name, sz, S, row, flush=True)
    c = build(sz, Sreal)
    jit = {}
    for j in [0.1, 0.2]:
        for h in [0.5, 0.75, 1]:
            jit[f'{j} {h}'] = round(sum(simulate(c, h, turns=turns, jitter=j, seed=s)['busy'] for s in (1, 2, 3)) / 3, 4)
    out[f'{sz} jitter'] = jit
    r = simulate(c, 0, turns=turns, record_slack=True)
    sl = r['slacks']
    if sl:
        qs = statistics.quantiles(sl, n=100)
        out[f'{sz} slack'] = dict(links=len(sl), min=round(min(sl), 3), p1=round(qs[0], 3),
                                   p5=round(qs[4], 3), median=round(statistics.median(sl), 3),
                                   frac_lt1=round(sum(x < 1 - 1e-9 for x in sl) / len(sl), 4),
                                   frac_lt2=round(sum(x < 2 - 1e-9 for x in sl) / len(sl), 4))
    acc = []
    simulate(c, 0.75, turns=turns, accesses=acc)
    out[f'{sz} L2'] = dict(t256=round(l2_hit_rate(acc, 256), 3), t400=round(l2_hit_rate(acc, 400), 3),
                           bound=round(1 - pairs * M / len(acc), 3))
    print(name, sz, out[f'{sz} jitter'], out.get(f'{sz} slack'), out[f'{sz} L2'], flush=True)
json.dump(out, open(f'results_{name}.json', 'w'), indent=1)
