"""Host time per call of small attention calls: cuflash, torch SDPA and JAX cuDNN.

Back-to-back calls in one process (issue 11, item 6):

    PYTHONPATH=. python3 bench/host.py --out bench/results/host_h200
    PYTHONPATH=. python3 bench/host.py --out /tmp/host --quick        # smoke test

Calls (bf16, the same random normal inputs for every implementation):
- fwd_small: forward, causal, batch 1, seqlen 128, 8 heads, head dim 64.
- fwd_large: forward, causal, batch 4, seqlen 512, 16 heads, head dim 128.
- decode: one decode step, ``cuflash.attention_with_kvcache(q, k_cache, v_cache, k=k_new,
  v=v_new, cache_seqlens=lens)``, q (8, 1, 32, 128), caches (8, 4096, 8, 128), k_new and
  v_new (8, 1, 8, 128), lens an int32 CuPy array of 4095 (the append writes the last row, so
  every item attends over all 4096 keys), non-causal. The torch peer is bench/decode.py's:
  SDPA over the whole contiguous cache viewed (batch, heads, length, head dim), enable_gqa
  (K and V expanded to 32 heads outside the timing where a backend refuses GQA). Torch has
  no append and no per-item lengths, so that call is attention alone. Extra rows, which are
  not the target: torch with the append done by two ``index_put_`` (what a torch user
  writes), and decode.py's call itself (it enters ``sdpa_kernel`` inside every call).
- fwdbwd_small: forward + backward at fwd_small's shape, ``cuflash.attention_vjp`` against
  torch autograd and ``jax.vjp`` (reported, not a target).

Implementations: cuflash (``cuflash.attention``, CuPy arrays); torch SDPA under
``sdpa_kernel(SDPBackend.FLASH_ATTENTION)`` and ``CUDNN_ATTENTION`` (bench/_common.py's
``run_torch``: transposed views of the same memory through DLPack, ``is_causal=True``, the
backend context entered once around the timed loop, as a model would); JAX
``jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
implementation="cudnn"))`` on copies of the inputs (XLA_PYTHON_CLIENT_PREALLOCATE=false
is set before JAX is imported). A peer that fails to import or to run is reported as "-"
with the reason.

Method, the same for every implementation: warm up (compilation, caches, allocator pools),
then N back-to-back calls (default 200) and one synchronisation at the end
(``cudaDeviceSynchronize`` for CuPy and torch, ``jax.block_until_ready`` on the last result
for JAX, which runs on its own stream); the wall time over N is one sample. R repetitions
(default 7), the implementations taken in turn within each repetition; reported: the median
and the min of the R samples. "submit" is the time until the N-th call returned, before the
synchronisation: when it is close to the wall time the calls are host-bound, which is what
this benchmark is for (wall time per call is max(host time, GPU time) in a steady state).

Also: cuflash at fwd_small with outputs allocated per call against preallocated outputs
(``attention_forward(..., out=, lse=)``; "-" where the library does not take them), and a
cProfile of N cuflash calls at fwd_small, the top 15 functions by own time (the profiler
inflates every Python call: read the listing for proportions).

Writes host.json (every sample, the device, versions, the git commit) and host.md into
--out, and prints host.md.
"""
from __future__ import annotations

import os

# Before anything can import JAX: without it JAX takes 75% of the GPU memory.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse  # noqa: E402 (after the environment variable above)
import contextlib  # noqa: E402
import cProfile  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import pstats  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

import _common  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DTYPE = _common.DTYPES["bf16"]
FORWARD_SHAPES = {  # (batch, seqlen, nheads, headdim)
    "fwd_small": (1, 128, 8, 64),
    "fwd_large": (4, 512, 16, 128),
}
DECODE = {"batch": 8, "cache": 4096, "nheads": 32, "nheads_kv": 8, "headdim": 128}
CALLS = {
    "fwd_small": "forward, causal, batch 1, seqlen 128, 8 heads, head dim 64",
    "fwd_large": "forward, causal, batch 4, seqlen 512, 16 heads, head dim 128",
    "decode": "decode step, q (8, 1, 32, 128), cache (8, 4096, 8, 128), append 1 key, "
              "non-causal",
    "fwdbwd_small": "forward + backward, causal, batch 1, seqlen 128, 8 heads, head dim 64 "
                    "(not a target)",
}
TARGETS = ("fwd_small", "fwd_large", "decode")  # host time at most 1.25x torch's (issue 11)
TARGET_RATIO = 1.25
TORCH_BACKENDS = {"torch-flash": "FLASH_ATTENTION", "torch-cudnn": "CUDNN_ATTENTION"}
JAX_IMPLEMENTATION = "cudnn"
SETTINGS = {"full": {"calls": 200, "reps": 7, "warmup": 20},
            "quick": {"calls": 20, "reps": 3, "warmup": 3}}
PROFILE_TOP = 15


# ----------------------------------------------------------------------------- timing
#
# An implementation is a dict: "enter" (a zero-argument factory of a context manager that
# yields the zero-argument call to time; the context is held around the timed loop, outside
# the time), "sync" (takes the last call's result, returns when the GPU work is done),
# "peer" ("cuflash", "torch" or "jax"), "target" (whether it counts as the peer's best
# for the ratios) and "note" (what the call includes). Or a dict with "error" alone.

def describe(error: BaseException) -> str:
    first_line = (str(error).strip().splitlines() or [""])[0][:200]
    return f"{type(error).__name__}: {first_line}"


def implementation(call, sync, peer, note="", target=True, enter=None):
    return {"enter": enter or (lambda: contextlib.nullcontext(call)), "sync": sync,
            "peer": peer, "note": note, "target": target}


def run_calls(call, sync, calls: int) -> tuple[float, float]:
    """(wall, submit) seconds per call of ``calls`` back-to-back calls, one sync at the end;
    submit stops when the last call has returned, wall when its GPU work is done."""
    result = None
    start = time.perf_counter()
    for _ in range(calls):
        result = call()
    submitted = time.perf_counter()
    sync(result)
    done = time.perf_counter()
    return (done - start) / calls, (submitted - start) / calls


def summarise(samples) -> dict:
    wall = [w * 1e6 for w, _ in samples]
    submit = [s * 1e6 for _, s in samples]
    return {"us": statistics.median(wall), "min_us": min(wall),
            "submit_us": statistics.median(submit), "min_submit_us": min(submit),
            "samples_us": wall, "samples_submit_us": submit}


def measure(impls: dict, calls: int, reps: int, warmup: int) -> dict:
    """{name: summary or {"error"}} in the order of ``impls``: each warmed up, then ``reps``
    rounds in which each implementation runs its ``calls`` back-to-back calls in turn."""
    errors, live = {}, {}
    for name, impl in impls.items():
        if "error" in impl:
            errors[name] = impl["error"]
            continue
        try:
            with impl["enter"]() as call:
                result = None
                for _ in range(max(1, warmup)):
                    result = call()
                impl["sync"](result)
            live[name] = impl
        except Exception as e:  # unsupported shape, backend refused, out of memory
            errors[name] = describe(e)
    samples = {name: [] for name in live}
    for _ in range(reps):
        for name, impl in list(live.items()):
            gc.collect()
            try:
                with impl["enter"]() as call:
                    samples[name].append(run_calls(call, impl["sync"], calls))
            except Exception as e:
                errors[name] = describe(e)
                del live[name]
    results = {}
    for name, impl in impls.items():
        if name in live:
            results[name] = summarise(samples[name])
        else:
            results[name] = {"error": errors[name]}
        for key in ("peer", "note", "target"):
            if key in impl:
                results[name][key] = impl[key]
    return results


# ------------------------------------------------------------------------------ peers

def to_numpy(x):
    return x.get() if hasattr(x, "get") else np.asarray(x)


def load_torch():
    """(torch, None), or (None, why not)."""
    try:
        import torch
    except Exception as e:  # not installed, or its CUDA libraries do not load
        return None, f"torch does not import ({describe(e)})"
    if not torch.cuda.is_available():
        return None, f"torch {torch.__version__} sees no CUDA device"
    return torch, None


def load_jax():
    """(jax, None), or (None, why not)."""
    try:
        import jax
    except Exception as e:
        return None, f"jax does not import ({describe(e)})"
    try:
        backend = jax.default_backend()
    except Exception as e:
        return None, f"jax {jax.__version__} has no backend ({describe(e)})"
    if backend != "gpu":
        return None, f"jax {jax.__version__} runs on {backend}, not on a GPU"
    return jax, None


def missing(reason, names):
    return {name: {"error": reason} for name in names}


def forward_peers(inputs, torch, torch_why, jax, jax_why, device_sync):
    """Implementations of the causal forward on ``inputs`` (q, k, v, dout)."""
    import cuflash
    q, k, v, dout = inputs
    impls = {"cuflash": implementation(lambda: cuflash.attention(q, k, v, causal=True),
                                       device_sync, "cuflash", "cuflash.attention")}
    if torch is None:
        impls.update(missing(torch_why, TORCH_BACKENDS))
    else:
        for name, backend in TORCH_BACKENDS.items():
            impls[name] = implementation(
                None, device_sync, "torch", f"SDPA under sdpa_kernel({backend}), entered once",
                enter=lambda backend=backend: _common.run_torch(backend, "fwd", q, k, v, dout,
                                                                True))
    impls["jax-cudnn"] = jax_forward(jax, jax_why, inputs, causal=True)
    return impls


def fwdbwd_peers(inputs, torch, torch_why, jax, jax_why, device_sync):
    """Implementations of forward + backward (causal) on ``inputs``."""
    import cuflash
    q, k, v, dout = inputs

    def cuflash_call():
        out, vjp = cuflash.attention_vjp(q, k, v, causal=True)
        return vjp(dout)

    impls = {"cuflash": implementation(cuflash_call, device_sync, "cuflash",
                                       "cuflash.attention_vjp, then its vjp(dout)")}
    if torch is None:
        impls.update(missing(torch_why, TORCH_BACKENDS))
    else:
        for name, backend in TORCH_BACKENDS.items():
            impls[name] = implementation(
                None, device_sync, "torch",
                f"SDPA then torch.autograd.grad, under sdpa_kernel({backend}), entered once",
                enter=lambda backend=backend: _common.run_torch(backend, "fwdbwd", q, k, v,
                                                                dout, True))
    impls["jax-cudnn"] = jax_forward(jax, jax_why, inputs, causal=True, backward=True)
    return impls


def jax_forward(jax, why, inputs, causal, backward=False):
    """JAX's cuDNN attention, jitted, on copies of ``inputs``; forward + backward through
    jax.vjp when ``backward``."""
    if jax is None:
        return {"error": why}
    try:
        arrays = [jax.device_put(to_numpy(x)) for x in inputs]

        def attend(q, k, v):
            return jax.nn.dot_product_attention(q, k, v, is_causal=causal,
                                                implementation=JAX_IMPLEMENTATION)

        if backward:
            def step(q, k, v, dout):
                return jax.vjp(attend, q, k, v)[1](dout)
            fn = jax.jit(step)
            note = "jax.jit(jax.vjp of dot_product_attention, then its vjp(dout))"
        else:
            arrays = arrays[:3]
            fn = jax.jit(attend)
            note = f"jax.jit(dot_product_attention(implementation={JAX_IMPLEMENTATION!r}))"
    except Exception as e:
        return {"error": describe(e)}
    return implementation(lambda: fn(*arrays), jax.block_until_ready, "jax", note)


def decode_inputs(xp, seed=0):
    """q, k_cache, v_cache, k_new, v_new, lens (int32, every item at cache - 1 keys)."""
    d = DECODE
    rng = xp.random.RandomState(seed)

    def normal(*shape):
        return rng.standard_normal(shape, dtype=np.float32).astype(DTYPE)

    q = normal(d["batch"], 1, d["nheads"], d["headdim"])
    caches = [normal(d["batch"], d["cache"], d["nheads_kv"], d["headdim"]) for _ in range(2)]
    new = [normal(d["batch"], 1, d["nheads_kv"], d["headdim"]) for _ in range(2)]
    lens = xp.full(d["batch"], d["cache"] - 1, np.int32)
    return q, caches[0], caches[1], new[0], new[1], lens


def torch_decode(torch, backend_name, q, k_cache, v_cache, k_new, v_new, lens, append,
                 device_sync):
    """Torch SDPA over the whole cache, bench/decode.py's formulation; with ``append``, the
    new key and value are first written into the cache at row ``lens[b]`` of each item."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    sdpa = torch.nn.functional.scaled_dot_product_attention
    backend = getattr(SDPBackend, backend_name)
    kc, vc = torch.from_dlpack(k_cache), torch.from_dlpack(v_cache)  # (batch, len, kv, hd)
    tq, tk, tv = (x.transpose(1, 2) for x in (torch.from_dlpack(q), kc, vc))
    try:
        with sdpa_kernel(backend):
            sdpa(tq, tk, tv, enable_gqa=True)
        device_sync()
        gqa = True
    except Exception:  # this backend refuses GQA: expand K, V to every query head
        if append:
            return {"error": "the backend refuses GQA, and an append would not reach "
                             "the expanded copy of the cache"}
        group = DECODE["nheads"] // DECODE["nheads_kv"]
        tk, tv = (x.repeat_interleave(group, dim=1) for x in (tk, tv))
        gqa = False
    what = ("enable_gqa=True" if gqa else "K, V expanded to 32 heads outside the timing")

    def attend():
        return sdpa(tq, tk, tv, enable_gqa=gqa)

    if append:
        rows = torch.from_dlpack(lens).long()
        items = torch.arange(DECODE["batch"], device=rows.device)
        kn, vn = (torch.from_dlpack(x)[:, 0] for x in (k_new, v_new))  # (batch, kv, hd)

        def call():
            kc.index_put_((items, rows), kn)
            vc.index_put_((items, rows), vn)
            return attend()
        note = (f"two index_put_ (k, v at row lens[b]), then SDPA over the whole cache "
                f"({what}), sdpa_kernel({backend_name}) entered once")
    else:
        call = attend
        note = (f"SDPA over the whole cache ({what}); no append, no per-item lengths; "
                f"sdpa_kernel({backend_name}) entered once")

    @contextlib.contextmanager
    def enter():
        with sdpa_kernel(backend):
            yield call

    return implementation(call, device_sync, "torch", note,
                          target=not append, enter=enter)


def decode_peers(inputs, torch, torch_why, jax, jax_why, device_sync):
    import cuflash
    q, k_cache, v_cache, k_new, v_new, lens = inputs
    impls = {"cuflash": implementation(
        lambda: cuflash.attention_with_kvcache(q, k_cache, v_cache, k=k_new, v=v_new,
                                               cache_seqlens=lens),
        device_sync, "cuflash",
        "cuflash.attention_with_kvcache with k=, v= (appends, then attends over lens + 1 keys)")}
    names = list(TORCH_BACKENDS) + [f"{n}+append" for n in TORCH_BACKENDS] + [
        f"{n} (decode.py)" for n in TORCH_BACKENDS]
    if torch is None:
        impls.update(missing(torch_why, names))
    else:
        for append in (False, True):
            for name, backend in TORCH_BACKENDS.items():
                try:
                    impls[name + ("+append" if append else "")] = torch_decode(
                        torch, backend, q, k_cache, v_cache, k_new, v_new, lens, append,
                        device_sync)
                except Exception as e:
                    impls[name + ("+append" if append else "")] = {"error": describe(e)}
        for name, backend in TORCH_BACKENDS.items():
            try:
                import decode  # bench/decode.py
                call, notes = decode.torch_call(torch, backend, q, k_cache, v_cache)
                impls[f"{name} (decode.py)"] = implementation(
                    call, device_sync, "torch",
                    f"bench/decode.py's call: sdpa_kernel({backend}) entered inside every "
                    f"call, GQA {notes['gqa']}", target=False)
            except Exception as e:
                impls[f"{name} (decode.py)"] = {"error": describe(e)}
    impls["jax-cudnn"] = jax_forward(jax, jax_why, (q, k_cache, v_cache), causal=False)
    if "error" not in impls["jax-cudnn"]:
        impls["jax-cudnn"]["note"] += " over the whole cache, no append, no per-item lengths"
    return impls


def buffer_variants(inputs, xp, device_sync):
    """cuflash at one forward shape: outputs allocated per call against preallocated outputs
    passed as out= (and lse=); "-" where the library does not take them."""
    import cuflash
    q, k, v, _ = inputs
    batch, seqlen, nheads, _ = q.shape
    out = xp.empty_like(q)
    lse = xp.empty((batch, nheads, seqlen), np.float32)
    ref_out, ref_lse = cuflash.attention_forward(q, k, v, causal=True)
    impls = {
        "attention (allocates)": implementation(
            lambda: cuflash.attention(q, k, v, causal=True), device_sync, "cuflash"),
        "attention_forward (allocates out, lse)": implementation(
            lambda: cuflash.attention_forward(q, k, v, causal=True), device_sync, "cuflash"),
    }
    probes = {
        "attention_forward(out=, lse=)": (
            lambda: cuflash.attention_forward(q, k, v, causal=True, out=out, lse=lse),
            lambda r: r[0] is out and r[1] is lse,
            lambda r: bool(xp.array_equal(r[0], ref_out)) and bool(xp.array_equal(r[1],
                                                                                  ref_lse))),
        "attention(out=)": (
            lambda: cuflash.attention(q, k, v, causal=True, out=out),
            lambda r: r is out,
            lambda r: bool(xp.array_equal(r, ref_out))),
    }
    for name, (call, same, equal) in probes.items():
        try:
            result = call()
        except TypeError as e:
            impls[name] = {"error": f"not supported ({describe(e)})"}
            continue
        except Exception as e:
            impls[name] = {"error": describe(e)}
            continue
        impls[name] = implementation(
            call, device_sync, "cuflash",
            f"returns the given buffers: {'yes' if same(result) else 'NO'}; equal to the "
            f"allocating call: {'yes' if equal(result) else 'NO'}")
    return impls


# ---------------------------------------------------------------------------- profile

def short_path(path: str) -> str:
    """A profiled file name without the machine's prefix: package-relative."""
    p = path.replace("\\", "/")
    for marker in ("/site-packages/", "/dist-packages/"):
        if marker in p:
            return p.split(marker, 1)[1]
    root = str(REPO).replace("\\", "/") + "/"
    if p.startswith(root):
        return p[len(root):]
    if "/cuflash/" in p:
        return p[p.rindex("/cuflash/") + 1:]
    stdlib = re.search(r"/python3\.\d+/(.*)$", p)
    return stdlib.group(1) if stdlib else p


def function_name(key) -> str:
    file, line, name = key
    if file == "~":  # built-in functions and methods
        return name
    return f"{short_path(file)}:{line}({name})"


def profile(call, sync, calls: int, top: int = PROFILE_TOP) -> dict:
    """cProfile of ``calls`` calls (one sync after, outside the profile): the ``top``
    functions by own time and by cumulative time, in microseconds per call."""
    result = call()
    sync(result)
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        result = call()
    profiler.disable()
    sync(result)
    stats = pstats.Stats(profiler).stats  # {(file, line, name): (cc, nc, tt, ct, callers)}
    rows = [{"function": function_name(key), "ncalls": nc / calls,
             "tottime_us": tt / calls * 1e6, "cumtime_us": ct / calls * 1e6}
            for key, (cc, nc, tt, ct, callers) in stats.items()]
    total = sum(row["tottime_us"] for row in rows)
    by_own = sorted(rows, key=lambda r: -r["tottime_us"])[:top]
    by_cumulative = sorted((r for r in rows if "cuflash/" in r["function"]),
                           key=lambda r: -r["cumtime_us"])[:top]
    return {"calls": calls, "total_us": total, "top_tottime": by_own,
            "top_cumtime_cuflash": by_cumulative}


# ----------------------------------------------------------------------------- report

def fmt_us(value) -> str:
    return "-" if value is None else f"{value:.1f}"


def ratio_text(value) -> str:
    return "-" if value is None else f"{value:.2f}x"


def best(results: dict, peer: str):
    """(name, median us) of the fastest target implementation of ``peer``, or (None, None)."""
    timed = [(r["us"], name) for name, r in results.items()
             if r.get("peer") == peer and r.get("target", True) and "us" in r]
    if not timed:
        return None, None
    us, name = min(timed)
    return name, us


def compare(results: dict) -> dict:
    """cuflash's median against the best torch backend and against JAX."""
    cuflash = results.get("cuflash", {}).get("us")
    torch_name, torch_us = best(results, "torch")
    jax_name, jax_us = best(results, "jax")
    return {"cuflash_us": cuflash, "torch_best": torch_name, "torch_us": torch_us,
            "jax": jax_name, "jax_us": jax_us,
            "cuflash_over_torch": cuflash / torch_us if cuflash and torch_us else None,
            "cuflash_over_jax": cuflash / jax_us if cuflash and jax_us else None}


def impl_table(results: dict, reference=None, label="cuflash") -> list[str]:
    lines = ["| implementation | us per call (median) | min | submit (median) | "
             f"{label} / this | what the call includes |", "|---|---:|---:|---:|---:|---|"]
    for name, r in results.items():
        if "us" not in r:
            lines.append(f"| {name} | - | - | - | - | {r.get('error', '')} |")
            continue
        ratio = reference / r["us"] if reference else None
        lines.append(f"| {name} | {fmt_us(r['us'])} | {fmt_us(r['min_us'])} | "
                     f"{fmt_us(r['submit_us'])} | {ratio_text(ratio)} | {r.get('note', '')} |")
    return lines


def profile_lines(prof: dict) -> list[str]:
    lines = [f"cProfile of {prof['calls']} calls of `cuflash.attention` at fwd_small "
             f"(microseconds per call, profiler overhead included; total own time "
             f"{prof['total_us']:.1f} us per call).", "",
             f"Top {len(prof['top_tottime'])} by own time:", "",
             "| tottime us | cumtime us | calls per call | function |", "|---:|---:|---:|---|"]
    for row in prof["top_tottime"]:
        lines.append(f"| {row['tottime_us']:.2f} | {row['cumtime_us']:.2f} | "
                     f"{row['ncalls']:g} | `{row['function']}` |")
    if prof.get("top_cumtime_cuflash"):
        lines += ["", "cuflash's functions by cumulative time:", "",
                  "| cumtime us | tottime us | calls per call | function |",
                  "|---:|---:|---:|---|"]
        for row in prof["top_cumtime_cuflash"]:
            lines.append(f"| {row['cumtime_us']:.2f} | {row['tottime_us']:.2f} | "
                         f"{row['ncalls']:g} | `{row['function']}` |")
    return lines


def markdown(report: dict) -> str:
    env, settings = report["environment"], report["settings"]
    versions = ", ".join(f"{name} {env.get(name) or '-'}" for name in ("cuflash", "cupy",
                                                                        "torch", "jax"))
    lines = [f"# Host time per call: {env.get('device', '?')}", "",
             f"`{env.get('command', '')}`", "",
             f"Commit {env.get('commit') or '-'}"
             f"{' (with local changes)' if env.get('dirty') else ''}; {versions}; "
             f"{env.get('date', '')}.", "",
             f"Each sample: {settings['calls']} back-to-back calls, one synchronisation at "
             f"the end, wall time / {settings['calls']}; {settings['reps']} samples per "
             f"implementation, taken in turn, after {settings['warmup']} warm-up calls. "
             "Median and min of the samples, in microseconds per call. \"submit\": time until "
             "the last call returned, before the synchronisation (close to the median: "
             "host-bound). Ratios use medians.", "",
             "## Summary", "",
             f"Target (issue 11): cuflash at most {TARGET_RATIO}x the best torch backend on "
             f"{', '.join(TARGETS)}.", "",
             "| call | cuflash us | best torch us | JAX cuDNN us | cuflash / torch | "
             "cuflash / JAX | target |", "|---|---:|---:|---:|---:|---:|---|"]
    for name, call in report["calls"].items():
        c = call["compare"]
        torch_cell = (f"{fmt_us(c['torch_us'])} ({c['torch_best']})" if c["torch_best"]
                      else "-")
        ratio = c["cuflash_over_torch"]
        if name not in TARGETS:
            verdict = "not a target"
        elif ratio is None:
            verdict = "-"
        else:
            verdict = "met" if ratio <= TARGET_RATIO else "not met"
        lines.append(f"| {name} | {fmt_us(c['cuflash_us'])} | {torch_cell} | "
                     f"{fmt_us(c['jax_us'])} | {ratio_text(ratio)} | "
                     f"{ratio_text(c['cuflash_over_jax'])} | {verdict} |")
    for name, call in report["calls"].items():
        c = call["compare"]
        lines += ["", f"## {name}: {call['description']}", ""]
        lines += impl_table(call["results"], c["cuflash_us"])
        lines += ["", f"cuflash / best torch ({c['torch_best'] or '-'}): "
                      f"{ratio_text(c['cuflash_over_torch'])}; cuflash / JAX cuDNN: "
                      f"{ratio_text(c['cuflash_over_jax'])}."]
        if name == "decode":
            lines += ["", "The torch rows without a suffix are the target peer: bench/decode.py's "
                      "formulation, attention alone (torch has no append and no per-item "
                      "lengths). \"+append\" adds the two cache writes a torch user would "
                      "issue; \"(decode.py)\" is decode.py's own call, which enters "
                      "sdpa_kernel inside each call (its host-time table measured that)."]
    if report.get("buffers"):
        buffers = report["buffers"]
        reference = buffers["results"].get("attention (allocates)", {}).get("us")
        lines += ["", "## New buffers: cuflash at fwd_small, outputs allocated per call "
                      "against out= buffers", ""]
        lines += impl_table(buffers["results"], reference, "attention (allocates)")
    if report.get("profile"):
        lines += ["", "## cProfile", ""] + profile_lines(report["profile"])
    elif report.get("profile_error"):
        lines += ["", "## cProfile", "", f"- ({report['profile_error']})"]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------- main

def git_commit(cwd=REPO):
    """(commit, dirty) of the checkout, or (None, None) without git."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True,
                                text=True, timeout=10)
        if commit.returncode != 0:
            return None, None
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                cwd=cwd, capture_output=True, text=True, timeout=10)
        return commit.stdout.strip(), bool(status.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return None, None


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="folder for host.json and host.md "
                                                 "(default: print only)")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke test: {SETTINGS['quick']}")
    parser.add_argument("--calls", type=int, help="back-to-back calls per sample "
                                                  f"(default {SETTINGS['full']['calls']})")
    parser.add_argument("--reps", type=int, help="samples per implementation "
                                                 f"(default {SETTINGS['full']['reps']})")
    parser.add_argument("--warmup", type=int, help="warm-up calls "
                                                   f"(default {SETTINGS['full']['warmup']})")
    parser.add_argument("--only", type=lambda t: tuple(x for x in t.split(",") if x),
                        default=tuple(CALLS), help="comma-separated, of: " + ",".join(CALLS))
    parser.add_argument("--no-torch", action="store_true", help="leave torch out")
    parser.add_argument("--no-jax", action="store_true", help="leave JAX out")
    parser.add_argument("--no-profile", action="store_true", help="skip the cProfile")
    parser.add_argument("--commit", help="the commit to record (default: git rev-parse HEAD)")
    args = parser.parse_args(argv)
    bad = [name for name in args.only if name not in CALLS]
    if bad:
        parser.error(f"unknown call(s) {bad}; choose from {list(CALLS)}")
    defaults = SETTINGS["quick" if args.quick else "full"]
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
        if getattr(args, key) < (0 if key == "warmup" else 1):
            parser.error(f"--{key} must be at least {0 if key == 'warmup' else 1}")
    return args


def main(argv=None) -> int:
    argv = sys.argv if argv is None else argv
    args = parse_args(argv[1:])
    cupy = _common.require_gpu()
    torch, torch_why = (None, "left out (--no-torch)") if args.no_torch else load_torch()
    jax, jax_why = (None, "left out (--no-jax)") if args.no_jax else load_jax()
    env = _common.environment(cupy, torch, argv)
    env["jax"] = None if jax is None else jax.__version__
    env["jax_device"] = None if jax is None else str(jax.devices()[0].device_kind)
    env["why_no_torch"], env["why_no_jax"] = torch_why, jax_why
    commit, dirty = git_commit()
    env["commit"], env["dirty"] = args.commit or commit, None if args.commit else dirty
    settings = {"calls": args.calls, "reps": args.reps, "warmup": args.warmup,
                "quick": args.quick}
    print(f"{env['device']}: cupy {env['cupy']}, torch {env['torch'] or '- (' + torch_why + ')'}"
          f", jax {env['jax'] or '- (' + jax_why + ')'}; {settings}", flush=True)

    def device_sync(result=None):
        cupy.cuda.runtime.deviceSynchronize()

    peers = (torch, torch_why, jax, jax_why, device_sync)
    report = {"environment": env, "settings": settings, "calls": {}}
    small = _common.make_inputs(DTYPE, *FORWARD_SHAPES["fwd_small"], seed=0)
    for name in args.only:
        if name in FORWARD_SHAPES:
            inputs = small if name == "fwd_small" else _common.make_inputs(
                DTYPE, *FORWARD_SHAPES[name], seed=1)
            impls = forward_peers(inputs, *peers)
        elif name == "decode":
            impls = decode_peers(decode_inputs(cupy), *peers)
        else:
            impls = fwdbwd_peers(small, *peers)
        results = measure(impls, args.calls, args.reps, args.warmup)
        del impls
        report["calls"][name] = {"description": CALLS[name], "results": results,
                                 "compare": compare(results)}
        c = report["calls"][name]["compare"]
        print(f"{name}: " + ", ".join(
            f"{n} {fmt_us(r.get('us'))}" for n, r in results.items())
            + f" us; cuflash / {c['torch_best']} {ratio_text(c['cuflash_over_torch'])}",
            flush=True)
        _common.release_memory(torch)
    print("new buffers ...", flush=True)
    try:
        variants = buffer_variants(small, cupy, device_sync)
    except Exception as e:  # cuflash itself fails at fwd_small: say so, keep the rest
        variants = {"attention (allocates)": {"error": describe(e)}}
    report["buffers"] = {"results": measure(variants, args.calls, args.reps, args.warmup)}
    if not args.no_profile:
        import cuflash
        q, k, v, _ = small
        try:
            report["profile"] = profile(lambda: cuflash.attention(q, k, v, causal=True),
                                        device_sync, args.calls)
        except Exception as e:
            report["profile_error"] = describe(e)
    text = markdown(report)
    print("\n" + text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "host.json").write_text(json.dumps(report, indent=1))
        (args.out / "host.md").write_text(text)
        print(f"wrote {args.out / 'host.json'} and {args.out / 'host.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
