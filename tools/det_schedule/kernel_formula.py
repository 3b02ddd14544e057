"""The recommended scheme as the kernel would compute it, checked against the model's
schedule: per CTA (launch index c) its phases, each (pair, key block n, walk, turn rule);
per (n, m) the turn index; per tile the final count; and a serial run on ONE SM in launch
order (every wait must already be satisfied: no CTA waits on a later one)."""
from model import cross_delta, walk


def phases(c, P, M, S, delta):
    """Launch index c -> list of (pair, n, role); role 'L': ascending walk, turn m - n;
    'H': descending walk, turn n. Integer arithmetic only."""
    if P % 2:                      # an odd pair: today's scheme, launched first
        if c < M:
            return [(P - 1, M - 1 - c, 'L')]
        c -= M
    groups = P // 2
    G = max(1, S // 2)             # groups a section
    W = M + delta                  # CTAs a group
    first = c // (G * W) * G       # first group of c's section
    Gs = min(G, groups - first)
    in_sec = c - first * W
    k = in_sec // Gs - delta       # rank in the group, -delta .. M-1
    g = first + in_sec % Gs
    A, B = 2 * g, 2 * g + 1
    if k < 0:
        return [(B, k + delta, 'H')]
    out = [(A, M - 1 - k, 'L')]
    if k + delta < M:
        out.append((B, k + delta, 'H'))
    return out


def turn(role, n, m):
    return m - n if role == 'L' else n   # today's descending / ascending formulas (causal)


def final(m):
    return m + 1


def check(P, M, S, delta):
    ctas = (P // 2) * (M + delta) + (M if P % 2 else 0)
    model = cross_delta(P, M, S if S > 1 else 2, delta) if P % 2 == 0 else None
    sem = {}
    for c in range(ctas):
        steps = []
        for pair, n, role in phases(c, P, M, S, delta):
            rows = walk(n, M, desc=(role == 'H'))
            for m in rows:
                t = turn(role, n, m)
                # serial on one SM: the turn must already have come (no wait on a later CTA)
                assert sem.get((pair, m), 0) == t, (c, pair, n, m, t, sem.get((pair, m), 0))
                sem[(pair, m)] = t + 1
                steps.append((pair, n, m))
        if model is not None:
            assert steps == model[c], (c, steps[:3], model[c][:3])
    for pair in range(P):
        for m in range(M):
            assert sem[(pair, m)] == final(m)
    return ctas


for P, M, S, d in [(32, 64, 4, 2), (32, 64, 4, 0), (8, 256, 1, 8), (128, 16, 16, 0),
                   (128, 16, 16, 2), (6, 20, 4, 3), (7, 12, 4, 1), (5, 9, 1, 0), (2, 3, 8, 2)]:
    print(P, M, S, d, 'CTAs', check(P, M, S, d), 'ok')
