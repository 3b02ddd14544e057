"""The CPU backend (NumPy arrays) next to torch's CPU scaled_dot_product_attention.

    PYTHONPATH=. python bench/cpu.py --out bench/results/cpu            # the standard run
    PYTHONPATH=. python bench/cpu.py --quick                            # a first look

One process times, at each thread count (default 1 and 2), forward and forward + backward,
causal and not, of cuflash's CPU backend (``cuflash.attention_forward`` and
``cuflash.attention_backward`` on NumPy arrays, layout (batch, seqlen, heads, headdim)) and
of torch's CPU ``scaled_dot_product_attention`` (tensors (batch, heads, seqlen, headdim),
``is_causal``; forward + backward is ``out.backward(dout)``), on the same random normal
inputs. torch is optional: without it its columns read "-".

Thread counts: cuflash's through ``CUFLASH_CPU_THREADS`` (its own worker threads; it runs
NumPy's BLAS single-threaded inside a call) and, around every call, a BLAS limit of the same
count (threadpoolctl when importable, else cuflash.cpu's own OpenBLAS control), which is
what a cuflash without threads of its own would use; torch's through
``torch.set_num_threads``.

Method: for each configuration, each implementation in turn: ``--warmup`` calls, then
``--reps`` timed calls (``time.perf_counter`` around one call); reported: the median and the
min. A pause of 0.3 s between implementations lets the other one's spinning threads (OpenMP,
OpenBLAS) go to sleep. ``--busy 1`` repeats every configuration while that many other
processes spin on pure Python (a shared machine): an implementation that oversubscribes the
cores collapses there.

Writes cpu.json and cpu.md into ``--out``.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
THREADS_ENV = "CUFLASH_CPU_THREADS"


def parse_list(kind):
    return lambda text: tuple(kind(x) for x in text.split(",") if x)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, help="folder for cpu.json and cpu.md (default: print)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--nheads", type=int, default=8)
    p.add_argument("--nheads-kv", type=int, help="default: --nheads")
    p.add_argument("--headdim", type=int, default=64)
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--threads", type=parse_list(int), default=(1, 2))
    p.add_argument("--modes", type=parse_list(str), default=("fwd", "fwdbwd"))
    p.add_argument("--causal", type=parse_list(lambda x: x in ("1", "true", "True")),
                   default=(False, True), help="e.g. 0,1")
    p.add_argument("--busy", type=parse_list(int), default=(0,),
                   help="other spinning processes during the timing, e.g. 0,1")
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="--reps 3 --warmup 1")
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--note", default="", help="a line about the machine, for the report")
    args = p.parse_args(argv)
    if args.quick:
        args.reps, args.warmup = 3, 1
    args.nheads_kv = args.nheads_kv or args.nheads
    return args


# ------------------------------------------------------------------------ thread control

def blas_limit(n):
    """A context that caps NumPy's BLAS at ``n`` threads, and its description."""
    try:
        import threadpoolctl
        return threadpoolctl.threadpool_limits(n, user_api="blas"), "threadpoolctl"
    except ImportError:
        pass
    from cuflash import cpu
    if hasattr(cpu, "_blas_limit"):
        return cpu._blas_limit(n), "cuflash.cpu's OpenBLAS setter (ctypes)"
    return contextlib.nullcontext(), "uncontrolled"


@contextlib.contextmanager
def cuflash_threads(n):
    saved = os.environ.get(THREADS_ENV)
    os.environ[THREADS_ENV] = str(n)
    try:
        context, _ = blas_limit(n)
        with context:
            yield
    finally:
        if saved is None:
            os.environ.pop(THREADS_ENV, None)
        else:
            os.environ[THREADS_ENV] = saved


@contextlib.contextmanager
def torch_threads(torch, n):
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def _spin():
    while True:
        pass


@contextlib.contextmanager
def busy_processes(n):
    """``n`` processes spinning on pure Python for the duration."""
    procs = [multiprocessing.get_context("fork").Process(target=_spin, daemon=True)
             for _ in range(n)]
    for proc in procs:
        proc.start()
    try:
        time.sleep(0.2 if n else 0)
        yield
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.join()


# --------------------------------------------------------------------------- the calls

def cuflash_call(mode, q, k, v, dout, causal):
    import cuflash
    if mode == "fwd":
        return lambda: cuflash.attention_forward(q, k, v, causal=causal)

    def fwdbwd():
        out, lse = cuflash.attention_forward(q, k, v, causal=causal)
        return cuflash.attention_backward(dout, q, k, v, out, lse, causal=causal)
    return fwdbwd


def torch_call(torch, mode, q, k, v, dout, causal):
    sdpa = torch.nn.functional.scaled_dot_product_attention
    tq, tk, tv, tdout = (torch.from_numpy(np.ascontiguousarray(x.transpose(0, 2, 1, 3)))
                         for x in (q, k, v, dout))
    gqa = dict(enable_gqa=True) if tq.shape[1] != tk.shape[1] else {}
    if mode == "fwd":
        def fwd():
            with torch.no_grad():
                return sdpa(tq, tk, tv, is_causal=causal, **gqa)
        return fwd
    leaves = [x.clone().requires_grad_() for x in (tq, tk, tv)]

    def fwdbwd():
        for x in leaves:
            x.grad = None
        sdpa(*leaves, is_causal=causal, **gqa).backward(tdout)
        return [x.grad for x in leaves]
    return fwdbwd


def time_ms(fn, warmup, reps):
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return {"median_ms": statistics.median(samples), "min_ms": min(samples),
            "samples_ms": [round(s, 3) for s in samples]}


# ------------------------------------------------------------------------------ report

def git_commit():
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                                capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=REPO, capture_output=True, text=True,
                               timeout=10).stdout.strip()
        return commit or None, bool(dirty)
    except (OSError, subprocess.SubprocessError):
        return None, None


def cpu_model():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def blas_info():
    try:
        import threadpoolctl
        return [{k: info.get(k) for k in ("internal_api", "version", "num_threads",
                                          "threading_layer", "architecture")}
                for info in threadpoolctl.threadpool_info() if info.get("user_api") == "blas"]
    except ImportError:
        return None


def environment(torch, torch_why, args, argv):
    import cuflash
    commit, dirty = git_commit()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "commit": commit, "dirty": dirty, "cpu": cpu_model(), "cores": cores,
        "note": args.note, "python": platform.python_version(), "numpy": np.__version__,
        "numpy_blas": blas_info(), "cuflash": getattr(cuflash, "__version__", None),
        "cuflash_path": os.path.dirname(cuflash.__file__),
        "torch": None if torch is None else torch.__version__, "why_no_torch": torch_why,
        "blas_control": blas_limit(1)[1], "argv": argv, "loadavg_start": loadavg(),
    }


def loadavg():
    """The 1, 5 and 15 minute load averages (other processes share this machine's cores)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def fmt(x):
    return "-" if x is None else f"{x:.1f}"


def ratio(a, b):
    return "-" if a is None or b is None else f"{a / b:.2f}"


def markdown(report):
    env, s = report["environment"], report["settings"]
    lines = [
        "# CPU attention: cuflash (NumPy backend) and torch CPU SDPA",
        "",
        f"{env['date']}, commit {env['commit']}{' (dirty)' if env['dirty'] else ''}; "
        f"{env['cpu']}, {env['cores']} cores{'; ' + env['note'] if env['note'] else ''}.",
        f"Python {env['python']}, NumPy {env['numpy']}, torch "
        f"{env['torch'] or '- (' + str(env['why_no_torch']) + ')'}; BLAS control: "
        f"{env['blas_control']}. Load average (1, 5, 15 min) at the start "
        f"{env['loadavg_start']}, at the end {env.get('loadavg_end')}.",
        "",
        f"Shape (batch, seqlen, heads, kv heads, headdim) = ({s['batch']}, {s['seqlen']}, "
        f"{s['nheads']}, {s['nheads_kv']}, {s['headdim']}), {s['dtype']}. Milliseconds per "
        f"call, median of {s['reps']} after {s['warmup']} warm-up (min in the json). "
        "ratio = cuflash / torch at the same thread count.",
        "",
        "| busy | mode | causal | threads | cuflash ms | torch ms | ratio |",
        "|---:|---|---|---:|---:|---:|---:|",
    ]
    for row in report["rows"]:
        c, t = row["cuflash"].get("median_ms"), (row.get("torch") or {}).get("median_ms")
        lines.append(f"| {row['busy']} | {row['mode']} | {row['causal']} | {row['threads']} | "
                     f"{fmt(c)} | {fmt(t)} | {ratio(c, t)} |")
    lines.append("")
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv if argv is None else argv
    args = parse_args(argv[1:])
    torch, torch_why = None, "left out (--no-torch)"
    if not args.no_torch:
        try:
            import torch
            torch_why = None
        except ImportError as e:
            torch, torch_why = None, f"not importable: {e}"
    env = environment(torch, torch_why, args, argv)
    settings = {k: getattr(args, k) for k in ("batch", "seqlen", "nheads", "nheads_kv",
                                              "headdim", "dtype", "reps", "warmup")}
    print(json.dumps({**settings, "cores": env["cores"], "torch": env["torch"]}), flush=True)
    rng = np.random.default_rng(0)
    dtype = np.dtype(args.dtype)
    q, dout = (rng.standard_normal((args.batch, args.seqlen, args.nheads, args.headdim))
               .astype(dtype) for _ in range(2))
    k, v = (rng.standard_normal((args.batch, args.seqlen, args.nheads_kv, args.headdim))
            .astype(dtype) for _ in range(2))
    rows = []
    for busy in args.busy:
        with busy_processes(busy):
            for mode in args.modes:
                for causal in args.causal:
                    for n in args.threads:
                        row = {"busy": busy, "mode": mode, "causal": causal, "threads": n}
                        with cuflash_threads(n):
                            row["cuflash"] = time_ms(cuflash_call(mode, q, k, v, dout, causal),
                                                     args.warmup, args.reps)
                        if torch is not None:
                            time.sleep(0.3)
                            with torch_threads(torch, n):
                                row["torch"] = time_ms(
                                    torch_call(torch, mode, q, k, v, dout, causal),
                                    args.warmup, args.reps)
                        time.sleep(0.3)
                        rows.append(row)
                        t = (row.get("torch") or {}).get("median_ms")
                        c = row["cuflash"]["median_ms"]
                        print(f"busy {busy} {mode:6s} causal={causal!s:5s} threads {n}: "
                              f"cuflash {c:7.1f} ms, torch {fmt(t):>7s} ms, "
                              f"ratio {ratio(c, t)}", flush=True)
    env["loadavg_end"] = loadavg()
    report = {"environment": env, "settings": settings, "rows": rows}
    text = markdown(report)
    print("\n" + text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "cpu.json").write_text(json.dumps(report, indent=1) + "\n")
        (args.out / "cpu.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
