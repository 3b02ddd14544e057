"""Decode sweep: attention_with_kvcache against the device's copy bandwidth and torch SDPA.

    PYTHONPATH=. python bench/decode.py --out bench/results/decode-h100
    PYTHONPATH=. python bench/decode.py --out /tmp/decode --quick

Shape (issue 5): one query per batch item (seqlen_q 1), head dim 128, 32 query heads and
8 kv heads, bf16; batch 1 to 64 and cache length 1k to 128k, every batch item holding the
full cache length, non-causal (with one query a bottom-right causal mask hides nothing).
Shapes whose K and V exceed ``--budget-gib`` are skipped.

Decoding reads every byte of K and V once, so the measure is effective bandwidth: bytes of
K and V read (batch x length x kv heads x head dim x 2 bytes x 2) over the time. It is put
against the copy bandwidth measured in the same run (a large device-to-device copy with
CuPy, (read + written bytes) / time). Implementations, on the same inputs:
- cuflash: contiguous cache (batch, length, 8, 128); paged caches of pages 256 and 64
  (the same keys in randomly permuted pages); the split count is the library's default.
- torch-flash, torch-cudnn: scaled_dot_product_attention with that backend, on the
  contiguous cache viewed (batch, heads, length, head dim) through DLPack, with
  ``enable_gqa=True``; where a backend refuses GQA, on K and V expanded to 32 heads first
  (the expansion outside the timing, noted as "expanded"). Their bandwidth counts the same
  (unexpanded) bytes, so every column compares times.
Timing: CUDA events around each call, after warm-up, with the L2 cache flushed (a 1 GiB
memset, ~350 us of GPU time) before each call, so the cache is read from HBM as in a real
decode step; the median of the calls. The flush also keeps the GPU busy while the host
prepares the next call, for every implementation alike, so these are GPU times per decode
step (what a serving loop under CUDA graphs sees). Host time per call is measured apart
(``host_us``: calls back to back, the GPU synchronised before and after) and reported in
its own table: a Python caller without CUDA graphs waits for whichever is longer.

Writes decode.json (every number, with device and versions) and decode.md into --out.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import ml_dtypes
import numpy as np

import _common
from _common import environment, host_us, import_torch, release_memory, require_gpu, time_ms

NHEADS, NHEADS_KV, HEADDIM = 32, 8, 128
DTYPE = np.dtype(ml_dtypes.bfloat16)
BATCHES = (1, 4, 16, 64)
LENGTHS = (1024, 4096, 16384, 65536, 131072)
QUICK = {"batches": (1, 16), "lengths": (4096, 65536)}
PAGE_SIZES = (256, 64)
LONG = 16384  # "long context" for the summary: length at least this
CALLS = (5, 50)           # fewest, most timed calls
BUDGET_MS = 300.0         # timed calls aim at this much GPU time per measurement
FLUSH_BYTES = 2**30  # > 50 MiB of H100 L2, and longer than any host path measured


class Timer:
    def __init__(self):
        import cupy
        self.flush = cupy.empty(FLUSH_BYTES, np.uint8)

    def warm(self, fills=100):
        """~35 ms of GPU work (L2 flushes), so that the first implementation timed after a
        row's inputs are drawn does not start on an idle GPU (it measured 5-10% slow)."""
        import cupy
        for _ in range(fills):
            self.flush.fill(0)
        cupy.cuda.Device().synchronize()

    def __call__(self, fn) -> float:
        """Median milliseconds of ``fn()``, L2 flushed before each call."""
        return time_ms(fn, BUDGET_MS, *CALLS, before=lambda: self.flush.fill(0))


def copy_bandwidth(timer, nbytes=2 * 2**30) -> float:
    """Device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written."""
    import cupy
    src = cupy.ones(nbytes // 4, np.float32)
    dst = cupy.empty_like(src)
    ms = timer(lambda: cupy.copyto(dst, src))
    del src, dst
    cupy.get_default_memory_pool().free_all_blocks()
    return 2 * nbytes / (ms * 1e-3) / 1e9


def random_cache(batch, length):
    """(batch, length, 8, 128) bf16 random normal, drawn one batch item at a time (the
    float32 draw of a whole large cache would not fit beside it)."""
    import cupy
    x = cupy.empty((batch, length, NHEADS_KV, HEADDIM), DTYPE)
    for b in range(batch):
        x[b] = cupy.random.standard_normal(x.shape[1:], dtype=np.float32).astype(DTYPE)
    return x


def inputs(batch, length):
    """(q, k_cache, v_cache, cache_seqlens) of one decode step: every item holds ``length``
    keys, random normal."""
    import cupy
    q = cupy.random.standard_normal((batch, 1, NHEADS, HEADDIM), dtype=np.float32).astype(DTYPE)
    k, v = random_cache(batch, length), random_cache(batch, length)
    return q, k, v, cupy.full(batch, length, np.int32)


def paged(k, v, page_size, rng):
    """The same keys and values in randomly permuted pages: (k_pages, v_pages, table)."""
    import cupy
    batch, length = k.shape[:2]
    per_item = length // page_size
    table = cupy.asarray(rng.permutation(batch * per_item).reshape(batch, per_item)
                         .astype(np.int32))
    pages = []
    for x in (k, v):
        p = cupy.empty((batch * per_item, page_size, NHEADS_KV, HEADDIM), x.dtype)
        p[table.ravel()] = x.reshape(batch * per_item, page_size, NHEADS_KV, HEADDIM)
        pages.append(p)
    return pages[0], pages[1], table


def torch_call(torch, backend, q, k, v):
    """A zero-argument SDPA call and how it handles GQA ("native" or "expanded")."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    sdpa = torch.nn.functional.scaled_dot_product_attention
    tq, tk, tv = (torch.from_dlpack(x).transpose(1, 2) for x in (q, k, v))
    backend = getattr(SDPBackend, backend)
    try:
        with sdpa_kernel(backend):
            sdpa(tq, tk, tv, enable_gqa=True)
        torch.cuda.synchronize()
        gqa = "native"
    except Exception:  # this backend refuses GQA: expand K, V to every query head
        group = NHEADS // NHEADS_KV
        tk, tv = (x.repeat_interleave(group, dim=1) for x in (tk, tv))
        gqa = "expanded"

    def call():
        with sdpa_kernel(backend):
            return sdpa(tq, tk, tv, enable_gqa=gqa == "native")

    return call, {"gqa": gqa}


def measure(timer, make, nbytes, torch):
    """{ms, gbps, ...} of the call that ``make()`` returns with its notes, or {error}."""
    fn = None
    try:
        fn, notes = make()
        ms = timer(fn)
        result = {"ms": ms, "gbps": nbytes / (ms * 1e-3) / 1e9, "host_us": host_us(fn),
                  **notes}
    except Exception as e:  # unsupported, out of memory: a gap in the row
        first_line = (str(e).strip().splitlines() or [""])[0][:200]
        result = {"error": f"{type(e).__name__}: {first_line}"}
    del fn  # the call's buffers (paged copies, expanded K/V) go before the next one's
    release_memory(torch)
    return result


def run_shape(timer, batch, length, torch, rng, impls):
    """One row: every implementation on one (batch, length)."""
    import cuflash
    from cuflash import _core, ops
    nbytes = 2 * batch * length * NHEADS_KV * HEADDIM * DTYPE.itemsize
    q, k, v, lengths = inputs(batch, length)
    m_blocks = -(-(NHEADS // NHEADS_KV) // ops.decode.ROWS)
    splits = ops.decode.num_splits(batch * NHEADS_KV * m_blocks, length,
                                   _core.num_sms(q.device.id))
    makers = {"cuflash": lambda: (
        lambda: cuflash.attention_with_kvcache(q, k, v, cache_seqlens=lengths), {})}
    for page_size in PAGE_SIZES:
        def make(page_size=page_size):
            k_pages, v_pages, table = paged(k, v, page_size, rng)
            return (lambda: cuflash.attention_with_kvcache(
                q, k_pages, v_pages, cache_seqlens=lengths, block_table=table), {})
        makers[f"cuflash-page{page_size}"] = make
    if torch is not None:
        for name, backend in TORCH_BACKENDS.items():
            makers[name] = lambda backend=backend: torch_call(torch, backend, q, k, v)
    timer.warm()
    results = {name: measure(timer, makers[name], nbytes, torch)
               for name in impls if name in makers}
    return {"batch": batch, "length": length, "kv_bytes": nbytes, "num_splits": splits,
            "results": results}


TORCH_BACKENDS = {name: _common.TORCH_BACKENDS[name] for name in ("torch-flash", "torch-cudnn")}
IMPLS = ("cuflash",) + tuple(f"cuflash-page{p}" for p in PAGE_SIZES) + tuple(TORCH_BACKENDS)


def cell(result, copy_gbps):
    if "gbps" not in result:
        return "-"
    note = " (expanded)" if result.get("gqa") == "expanded" else ""
    return (f"{result['ms'] * 1e3:.0f} us, {result['gbps']:.0f} GB/s "
            f"({100 * result['gbps'] / copy_gbps:.0f}%){note}")


def markdown(rows, copy_gbps, impls) -> str:
    lines = [f"Measured copy bandwidth: {copy_gbps:.0f} GB/s (read + written bytes / time). "
             f"Cells: median time, effective bandwidth (K and V bytes / time), % of copy.",
             "", "| batch | length | K+V MiB | splits | " + " | ".join(impls) + " |",
             "|---" * (len(impls) + 4) + "|"]
    for row in rows:
        cells = [cell(row["results"].get(n, {}), copy_gbps) for n in impls]
        lines.append(f"| {row['batch']} | {row['length']} | {row['kv_bytes'] / 2**20:.0f} | "
                     f"{row['num_splits']} | " + " | ".join(cells) + " |")
    lines += ["", "Host time per call (us; the GPU synchronised around a run of calls):", "",
              "| batch | length | " + " | ".join(impls) + " |", "|---" * (len(impls) + 2) + "|"]
    for row in rows:
        cells = [f"{row['results'].get(n, {}).get('host_us', float('nan')):.0f}" for n in impls]
        lines.append(f"| {row['batch']} | {row['length']} | " + " | ".join(cells) + " |")
    lines += ["", f"## Summary (length >= {LONG}, and all shapes)", ""]
    long_rows = [r for r in rows if r["length"] >= LONG]

    def ratios(a, b, among=long_rows):
        """time of b / time of a over the rows where both ran."""
        return [r["results"][b]["ms"] / r["results"][a]["ms"] for r in among
                if "ms" in r["results"].get(a, {}) and "ms" in r["results"].get(b, {})]

    fracs = [r["results"]["cuflash"]["gbps"] / copy_gbps for r in long_rows
             if "gbps" in r["results"].get("cuflash", {})]
    if fracs:
        lines.append(f"- cuflash (contiguous) effective bandwidth: min {100 * min(fracs):.0f}%, "
                     f"median {100 * statistics.median(fracs):.0f}% of copy over "
                     f"{len(fracs)} shapes (target: at least 80%)")
    for name in impls:
        if name.startswith("cuflash-page"):
            slower = ratios("cuflash", name)  # time of paged / time of contiguous
            if slower:
                lines.append(f"- {name} time / contiguous time: max {max(slower):.2f}, "
                             f"median {statistics.median(slower):.2f} over {len(slower)} "
                             f"shapes (target: at most 1.10)")
        elif name != "cuflash":
            for among, what in ((long_rows, "long"), (rows, "all")):
                speed = ratios("cuflash", name, among)  # > 1: cuflash is faster
                if speed:
                    lines.append(f"- cuflash speed / {name} speed: min {min(speed):.2f}x, "
                                 f"median {statistics.median(speed):.2f}x over {len(speed)} "
                                 f"{what} shapes (target: above 1)")
    errors = sorted({(n, r["results"][n]["error"]) for r in rows for n in impls
                     if "error" in r["results"].get(n, {})})
    if errors:
        lines += ["", "## Gaps", ""] + [f"- {n}: {e}" for n, e in errors]
    return "\n".join(lines) + "\n"


def parse_args(argv):
    def ints(text):
        return tuple(int(x) for x in text.split(",") if x)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True,
                        help="folder for decode.json and decode.md")
    parser.add_argument("--batches", type=ints, help=f"default {BATCHES}")
    parser.add_argument("--lengths", type=ints, help=f"default {LENGTHS}")
    parser.add_argument("--impls", type=lambda t: tuple(t.split(",")), default=IMPLS,
                        help="comma-separated, of: " + ",".join(IMPLS))
    parser.add_argument("--budget-gib", type=float, default=16.0,
                        help="skip shapes whose K and V exceed this (default 16 GiB)")
    parser.add_argument("--quick", action="store_true",
                        help=f"batches {QUICK['batches']}, lengths {QUICK['lengths']}")
    args = parser.parse_args(argv)
    bad = [n for n in args.impls if n not in IMPLS]
    if bad:
        parser.error(f"unknown implementation(s) {bad}; choose from {IMPLS}")
    args.batches = args.batches or (QUICK["batches"] if args.quick else BATCHES)
    args.lengths = args.lengths or (QUICK["lengths"] if args.quick else LENGTHS)
    return args


def main(argv=None) -> int:
    argv = sys.argv if argv is None else argv
    args = parse_args(argv[1:])
    cupy = require_gpu()
    torch = import_torch()
    impls = [n for n in args.impls if torch is not None or not n.startswith("torch")]
    env = environment(cupy, torch, argv)
    timer = Timer()
    copy_gbps = copy_bandwidth(timer)
    print(f"{env['device']}: copy {copy_gbps:.0f} GB/s; torch {env['torch']}; "
          f"implementations: {', '.join(impls)}", flush=True)
    cupy.random.seed(0)
    rng = np.random.default_rng(0)
    rows, skipped = [], []
    for batch in args.batches:
        for length in args.lengths:
            nbytes = 2 * batch * length * NHEADS_KV * HEADDIM * DTYPE.itemsize
            if nbytes > args.budget_gib * 2**30:
                skipped.append((batch, length))
                print(f"skip batch {batch} length {length}: K+V {nbytes / 2**30:.1f} GiB > "
                      f"budget {args.budget_gib} GiB", flush=True)
                continue
            row = run_shape(timer, batch, length, torch, rng, impls)
            rows.append(row)
            print(f"batch {batch:>2} length {length:>6} splits {row['num_splits']:>3}: "
                  + " | ".join(f"{n} {cell(row['results'][n], copy_gbps)}" for n in impls),
                  flush=True)
            cupy.get_default_memory_pool().free_all_blocks()
    args.out.mkdir(parents=True, exist_ok=True)
    shape = {"seqlen_q": 1, "nheads": NHEADS, "nheads_kv": NHEADS_KV, "headdim": HEADDIM,
             "dtype": "bf16", "causal": False}
    (args.out / "decode.json").write_text(json.dumps(
        {"environment": env, "shape": shape, "copy_gbps": copy_gbps, "skipped": skipped,
         "rows": rows}, indent=1))
    (args.out / "decode.md").write_text(
        f"# Decode sweep: {env['device']}\n\n`{env['command']}`\n\n"
        + markdown(rows, copy_gbps, impls))
    print(f"wrote {args.out / 'decode.json'} and {args.out / 'decode.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
