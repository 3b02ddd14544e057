"""Discrete-event model of the deterministic causal backward (bwd_sm90_wide, hd256).

Units: one step (a 64-key x 64-query step of one CTA) takes T = 1.

A schedule is a list of CTAs in launch order; a CTA is a list of steps (pair, n, m):
key block n of (item, kv head) pair `pair` on query block m, run in that order.

Model (what the kernel does, bwd_sm90_wide with turn agents):
- 132 SMs, one CTA each; CTAs are dispatched strictly in launch order, each to the SM that
  frees first (start_i = max(start_{i-1}, earliest free SM)).
- A step computes for T (S^T, dP^T, P, dS, dV/dK, dQ wgmmas) and ends with its dQ add.
  The add of (pair, m) may happen only once the previous contributor in m's turn order has
  added and h has passed (the hand-over: adds' L2 round trip, release fence, next poll);
  the CTA's warpgroups block at the add (BWD_TURN_GO), so the next step's compute starts
  only after this step's add: add_k = max(start_k + T, add_pred + h), start_{k+1} = add_k.
  A CTA's own consecutive contributions to one tile need no hand-over (h_self = 0).
  (The producer prefetching the next Q/dO and the agent polling ahead are hidden in T.)
- Turn order of (pair, m): the contributors sorted by launch index (then step index).
  This is the only order in which every wait is on a CTA launched earlier (or on the
  CTA itself), i.e. deadlock-free without co-residency; the current kernel's descending
  order is exactly this for its lightest-first launch.
- busy = total steps / (132 * makespan) = ideal / makespan.
"""
import heapq
from collections import defaultdict

SMS = 132


def simulate(ctas, h, turns=True, sms=SMS, overhead=0.0, record_slack=False, jitter=0.0,
             seed=1, accesses=None, switch=0.0):
    """ctas: list of lists of (pair, n, m). Returns dict(makespan, busy, work, slack...)."""
    import random
    rng = random.Random(seed)
    free = [0.0] * sms
    heapq.heapify(free)
    last_add = {}            # (pair, m) -> (time, cta index)
    prev_start = 0.0
    work = 0
    makespan = 0.0
    slacks = []              # per cross-CTA link: compute-ready time - pred add time (T)
    links = waited = 0
    wait = 0.0
    for i, steps in enumerate(ctas):
        start = max(prev_start, heapq.heappop(free))
        prev_start = start
        t = start + overhead / 2
        cur = None
        for (pair, n, m) in steps:
            if cur is not None and (pair, n) != cur:
                t += switch    # a second key block: dK/dV epilogue and K/V load
            cur = (pair, n)
            if accesses is not None:
                accesses.append((t, pair, m))
            c = t + (1.0 + jitter * (2 * rng.random() - 1) if jitter else 1.0)
            if turns:
                key = (pair, m)
                pred = last_add.get(key)
                if pred is None:
                    a = c
                elif pred[1] == i:
                    a = max(c, pred[0])
                else:
                    if record_slack:
                        slacks.append(c - pred[0])
                    a = max(c, pred[0] + h)
                    links += 1
                    if a > c:
                        waited += 1
                        wait += a - c
                last_add[key] = (a, i)
            else:
                a = c
            t = a
            work += 1  # nominal steps (jitter averages to T)
        t += overhead / 2
        makespan = max(makespan, t)
        heapq.heappush(free, t)
    out = dict(makespan=makespan, work=work, ideal=work / sms,
               busy=work / (sms * makespan), norm=makespan * sms / work,
               links=links, waited=waited, wait=wait)
    if record_slack:
        out["slacks"] = slacks
    return out


# ----------------------------------------------------------------------------- schedules
def walk(n, M, desc=False):
    rows = range(n, M)
    return list(reversed(rows)) if desc else list(rows)


def sections(pairs, S):
    return [list(range(f, min(f + S, pairs))) for f in range(0, pairs, S)]


def current(pairs, M, S):
    """BwdKeyBlock today (deterministic, causal): sections of S pairs, rank by rank, pair
    fastest, rank 0 = key block M-1 (lightest); walks ascending; turns descending."""
    out = []
    for sec in sections(pairs, S):
        for rank in range(M):
            for p in sec:
                n = M - 1 - rank
                out.append([(p, n, m) for m in walk(n, M)])
    return out


def plain(pairs, M, S):
    """The plain call's order: heaviest first (rank 0 = key block 0); no turns."""
    out = []
    for sec in sections(pairs, S):
        for rank in range(M):
            for p in sec:
                out.append([(p, rank, m) for m in walk(rank, M)])
    return out


def dah(pairs, M, S, first_current=0):
    """Heaviest first (the plain order), every CTA walking its query blocks DESCENDING
    (from M-1 down to its diagonal), turns ascending in key block (= launch order).
    first_current: the first this many sections keep today's scheme."""
    out = []
    for k, sec in enumerate(sections(pairs, S)):
        for rank in range(M):
            for p in sec:
                if k < first_current:
                    n = M - 1 - rank
                    out.append([(p, n, m) for m in walk(n, M)])
                else:
                    out.append([(p, rank, m) for m in walk(rank, M, desc=True)])
    return out


def cross(pairs, M, S, interleave=True):
    """Two pairs a CTA: groups (2g, 2g+1); CTA r of a group: key block M-1-r of pair 2g
    walked ascending (r+1 steps; turns descending in key block), then key block r of pair
    2g+1 walked descending (M-r steps; turns ascending). M+1 steps every CTA.
    Sections of S pairs (S//2 groups, at least one); rank by rank, group fastest."""
    G = max(1, S // 2)
    groups = pairs // 2
    out = []
    for f in range(0, groups, G):
        secg = list(range(f, min(f + G, groups)))
        order = [(r, g) for r in range(M) for g in secg] if interleave else \
                [(r, g) for g in secg for r in range(M)]
        for r, g in order:
            p, q = 2 * g, 2 * g + 1
            a = M - 1 - r
            out.append([(p, a, m) for m in walk(a, M)] +
                       [(q, r, m) for m in walk(r, M, desc=True)])
    if pairs % 2:  # a last odd pair: today's scheme
        p = pairs - 1
        for rank in range(M):
            n = M - 1 - rank
            out.append([(p, n, m) for m in walk(n, M)])
    return out


def same_pair(pairs, M, S):
    """Two key blocks of ONE pair a CTA (2r ascending... the snake): CTA r: key block
    M-1-2r... kept for the record: blocks {M-1-r', r'} of one pair, r' < M/2, light block
    ascending then heavy block descending. Turn order = launch order (deadlock-free)."""
    out = []
    for sec in sections(pairs, S):
        for r in range(M // 2):
            for p in sec:
                a = M - 1 - r
                out.append([(p, a, m) for m in walk(a, M)] +
                           [(p, r, m) for m in walk(r, M, desc=True)])
    return out


SCHEMES = {"current": current, "plain": plain, "dah": dah, "cross": cross,
           "same_pair": same_pair}


def split(pairs, M, S):
    """One key block a CTA, as today. Sections of S pairs; in each, the first ceil(S/2)
    pairs ('L' pairs) go lightest first with ascending walks and descending turns (today),
    then the others ('H' pairs) heaviest first with DESCENDING walks (query block M-1 down
    to the diagonal) and ascending turns; rank by rank, pair fastest, within each half.
    S = 1: sections alternate L, H. Turn order = launch order in both halves."""
    out = []
    for k, sec in enumerate(sections(pairs, S)):
        if S == 1:
            L, H = (sec, []) if k % 2 == 0 else ([], sec)
        else:
            L, H = sec[:(len(sec) + 1) // 2], sec[(len(sec) + 1) // 2:]
        out += [[(p, M - 1 - r, m) for m in walk(M - 1 - r, M)] for r in range(M) for p in L]
        out += [[(p, r, m) for m in walk(r, M, desc=True)] for r in range(M) for p in H]
    return out


SCHEMES["split"] = split


def split_pattern(pairs, M, pattern):
    """Like split, with each section's pairs typed by `pattern` (e.g. 'LLH'): the L pairs
    (lightest first, ascending walks) rank by rank, then the H pairs (heaviest first,
    descending walks) rank by rank."""
    out = []
    S = len(pattern)
    for sec in sections(pairs, S):
        L = [p for p, c in zip(sec, pattern) if c == "L"]
        H = [p for p, c in zip(sec, pattern) if c == "H"]
        out += [[(p, M - 1 - r, m) for m in walk(M - 1 - r, M)] for r in range(M) for p in L]
        out += [[(p, r, m) for m in walk(r, M, desc=True)] for r in range(M) for p in H]
    return out


def cross_split_tail(pairs, M, S, K):
    """cross for all groups but the last K; those split into their phases as single-block
    CTAs: first every P1 (pair 2g, key block M-1-r, ascending walk), then every P2 (pair
    2g+1, key block r, descending walk), rank by rank over the K groups."""
    groups = pairs // 2
    a = cross(2 * (groups - K), M, S)
    tail = list(range(groups - K, groups))
    p1 = [[(2 * g, M - 1 - r, m) for m in walk(M - 1 - r, M)] for r in range(M) for g in tail]
    p2 = [[(2 * g + 1, r, m) for m in walk(r, M, desc=True)] for r in range(M) for g in tail]
    return a + p1 + p2


def cross_tail(pairs, M, S, K, tail_S=None):
    """cross for the first groups; the last K groups (2K pairs) as single-block CTAs in
    split order: per tail section of tail_S pairs (default: all 2K at once), its L pairs'
    (the groups' first pairs) blocks lightest first with ascending walks, then its H pairs'
    (the groups' second pairs) heaviest first with descending walks, rank by rank."""
    groups = pairs // 2
    K = min(K, groups)
    out = cross(2 * (groups - K), M, S)
    tail = list(range(groups - K, groups))
    tS = tail_S or 2 * K
    for f in range(0, K, max(1, tS // 2)):
        sec = tail[f:f + max(1, tS // 2)]
        out += [[(2 * g, M - 1 - r, m) for m in walk(M - 1 - r, M)] for r in range(M) for g in sec]
        out += [[(2 * g + 1, r, m) for m in walk(r, M, desc=True)] for r in range(M) for g in sec]
    if pairs % 2:
        p = pairs - 1
        out = [[(p, M - 1 - r, m) for m in walk(M - 1 - r, M)] for r in range(M)] + out
    return out


def l2_hit_rate(accesses, tiles):
    """LRU cache of `tiles` (pair, query block) tiles (Q, dO and the dQ accumulators of 64
    rows: 128 KiB at hd256), accessed once a step at the step's start, in time order."""
    from collections import OrderedDict
    cache = OrderedDict()
    hits = 0
    for _, p, m in sorted(accesses):
        k = (p, m)
        if k in cache:
            hits += 1
            cache.move_to_end(k)
        else:
            cache[k] = None
            if len(cache) > tiles:
                cache.popitem(last=False)
    return hits / len(accesses)


def cross_delta(pairs, M, S, delta):
    """cross with the pairing shifted by delta: per group (pairs A = 2g, B = 2g+1), first
    delta single-block CTAs (B's heaviest blocks 0 .. delta-1, descending walks), then CTA
    r = 0 .. M-1: A block M-1-r ascending, then B block r+delta descending (if it exists).
    CTAs hold M+1-delta steps (the last delta: A's block alone, M-delta .. M steps); the
    host picks delta so that the number of CTAs fits whole rounds of 132."""
    G = max(1, S // 2)
    groups = pairs // 2
    out = []
    for f in range(0, groups, G):
        secg = list(range(f, min(f + G, groups)))
        for k in range(-delta, M):
            for g in secg:
                A, B = 2 * g, 2 * g + 1
                if k < 0:
                    b = k + delta
                    out.append([(B, b, m) for m in walk(b, M, desc=True)])
                else:
                    a, b = M - 1 - k, k + delta
                    out.append([(A, a, m) for m in walk(a, M)] +
                               ([(B, b, m) for m in walk(b, M, desc=True)] if b < M else []))
    if pairs % 2:
        p = pairs - 1
        out = [[(p, M - 1 - r, m) for m in walk(M - 1 - r, M)] for r in range(M)] + out
    return out


def pick_delta(pairs, M, sms=SMS, dmax=None):
    """The host's choice of delta: the list-scheduling makespan without turns (what the
    model gives for any h <= T), smallest over delta = 0 .. dmax."""
    best = None
    for d in range(0, (dmax if dmax is not None else max(1, M // 8)) + 1):
        r = simulate(cross_delta(pairs, M, 2, d), 0.0, turns=False, sms=sms)
        if best is None or r["makespan"] < best[1] - 1e-9:
            best = (d, r["makespan"])
    return best[0]
