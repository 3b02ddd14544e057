"""Ring attention across GPUs: time per step at a fixed number of tokens per GPU.

    python bench/ring.py --out bench/results/ring_h200
    python bench/ring.py --out /tmp/ring --tokens 16384 --gpus 1,2 --reps 5

For each ring size n (1, 2, 4, 8 by default, those that fit the GPUs JAX sees), the global
sequence is ``n * tokens`` long, laid out zigzag and sharded over a 1-D mesh ("sp") of the
first n GPUs; one process drives them all (JAX's single controller). Each measurement is
the wall-clock time of one jitted call (``block_until_ready``), median of ``--reps`` after
warm-up (compiles included in the warm-up):

- ``fwd``: ``cuflash.jax.ring_attention`` (causal unless ``--full``);
- ``step``: forward + backward (``jax.grad`` of ``sum(out * dout)`` in q, k, v);
- each also as ``compute``: the same program with every ppermute left out (each GPU runs
  the same kernels on its own K/V: jax_ring's ``transfer=False``), the compute alone;
  ``hidden = time / compute``; the issue's target is ``<= 1.1`` (communication hidden
  under compute);
- for n = 1, ``cuflash.jax.attention`` on the same tokens (the ring of one must cost the
  same).

At a fixed number of tokens per GPU the attention work per GPU grows as n (each GPU meets n
blocks of keys), so ideal scaling is ``time(n) = n * time(1)`` (the table's ``per block``
column stays flat); TFLOP/s are per GPU (causal counts half the pairs).

XLA keeps 75% of each GPU by default; the backward's scratch comes from CuPy's pool, so
this script sets ``XLA_PYTHON_CLIENT_MEM_FRACTION=0.6`` unless it is set. XLA_FLAGS is
recorded as found (the latency-hiding scheduler and async collective-permutes, which the
overlap relies on, are XLA's defaults on GPUs).

Writes ring.json (every number, devices, versions, flags) and ring.md into --out, after
every ring size.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--tokens", type=int, default=32768, help="tokens per GPU")
    p.add_argument("--gpus", default="1,2,4,8", help="ring sizes to run")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", default="32,8", help="nheads,nheads_kv")
    p.add_argument("--headdim", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--full", action="store_true", help="no causal mask")
    p.add_argument("--layout", default="zigzag", choices=["zigzag", "contiguous"])
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--cpu", action="store_true",
                   help="smoke-test the script on 8 CPU devices (times mean nothing)")
    return p.parse_args(argv)


def timed(fn, args, warmup, reps):
    """Median milliseconds of ``fn(*args)`` until every result is ready."""
    import jax

    def call():
        jax.block_until_ready(fn(*args))
    for _ in range(max(1, warmup)):
        call()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main(argv=None):
    a = parse_args(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.6")
    if a.cpu:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   " --xla_force_host_platform_device_count=8").strip()
        os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    import cuflash
    import cuflash.jax as fj
    from cuflash.jax import ring as jax_ring

    try:
        gpus = jax.devices("cpu" if a.cpu else "gpu")
    except RuntimeError:
        sys.exit("bench/ring.py needs GPUs visible to JAX (a CUDA build of jax)")
    sizes = [n for n in (int(x) for x in a.gpus.split(",")) if n <= len(gpus)]
    nheads, nheads_kv = (int(x) for x in a.heads.split(","))
    dtype = jnp.dtype(a.dtype)
    causal = not a.full
    a.out.mkdir(parents=True, exist_ok=True)
    result = dict(
        argv=sys.argv, jax=jax.__version__, cuflash=cuflash.__version__,
        devices=[str(d) for d in gpus], device_kind=gpus[0].device_kind,
        xla_flags=os.environ.get("XLA_FLAGS", ""),
        mem_fraction=os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"],
        shape=dict(tokens_per_gpu=a.tokens, batch=a.batch, nheads=nheads,
                   nheads_kv=nheads_kv, headdim=a.headdim, dtype=a.dtype, causal=causal,
                   layout=a.layout),
        date=time.strftime("%Y-%m-%d %H:%M:%S"), rows=[])

    for n in sizes:
        mesh = Mesh(np.array(gpus[:n]), ("sp",))
        rows = NamedSharding(mesh, P(None, "sp"))
        seqlen = n * a.tokens
        shapes = [(a.batch, seqlen, h, a.headdim) for h in (nheads, nheads_kv, nheads_kv,
                                                            nheads)]
        keys = jax.random.split(jax.random.key(n), 4)
        # Random inputs made on the GPUs, already sharded (the layout is irrelevant to
        # timing: random tokens in zigzag order are random tokens).
        q, k, v, dout = (jax.jit(lambda key, s=s: jax.random.normal(key, s, dtype),
                                 out_shardings=rows)(key) for key, s in zip(keys, shapes))

        def ring_fn(transfer):
            def ring(q, k, v):
                return jax_ring._ring_attention(
                    q, k, v, "sp", scale=None, causal=causal, window=(None, None),
                    softcap=0.0, layout=a.layout, deterministic=False, return_lse=False,
                    transfer=transfer)
            return jax.shard_map(ring, mesh=mesh, in_specs=(P(None, "sp"),) * 3,
                                 out_specs=P(None, "sp"))

        row = dict(gpus=n, seqlen=seqlen)
        for transfer, name in ((True, ""), (False, "_compute")):
            sharded = ring_fn(transfer)
            fwd = jax.jit(sharded)
            step = jax.jit(jax.grad(
                lambda q, k, v, d: jnp.sum(sharded(q, k, v).astype(jnp.float32) *
                                           d.astype(jnp.float32)), argnums=(0, 1, 2)))
            row["fwd" + name + "_ms"] = timed(fwd, (q, k, v), a.warmup, a.reps)
            row["step" + name + "_ms"] = timed(step, (q, k, v, dout), a.warmup, a.reps)
        for mode in ("fwd", "step"):
            row[mode + "_hidden"] = row[mode + "_ms"] / row[mode + "_compute_ms"]
            row[mode + "_per_block_ms"] = row[mode + "_ms"] / n
        flops_fwd = 4 * a.batch * nheads * seqlen * seqlen * a.headdim / n
        flops_fwd /= 2 if causal else 1
        row["fwd_tflops_per_gpu"] = flops_fwd / row["fwd_ms"] / 1e9
        row["step_tflops_per_gpu"] = 3.5 * flops_fwd / row["step_ms"] / 1e9
        if n == 1:  # the plain single-GPU call on the same tokens
            one = lambda q, k, v: fj.attention(q, k, v, causal=causal)  # noqa: E731
            row["single_fwd_ms"] = timed(jax.jit(one), (q, k, v), a.warmup, a.reps)
            row["single_step_ms"] = timed(jax.jit(jax.grad(
                lambda q, k, v, d: jnp.sum(one(q, k, v).astype(jnp.float32) *
                                           d.astype(jnp.float32)), argnums=(0, 1, 2))),
                (q, k, v, dout), a.warmup, a.reps)
        result["rows"].append(row)
        print(json.dumps(row), flush=True)
        write(a.out, result)
        del q, k, v, dout


def write(out: Path, result):
    (out / "ring.json").write_text(json.dumps(result, indent=1) + "\n")
    s = result["shape"]
    lines = [f"# Ring attention, {s['tokens_per_gpu']} tokens per GPU",
             "",
             f"{result['device_kind']}; jax {result['jax']}, cuflash {result['cuflash']}; "
             f"batch {s['batch']}, heads {s['nheads']}/{s['nheads_kv']}, headdim "
             f"{s['headdim']}, {s['dtype']}, {'causal' if s['causal'] else 'full'}, "
             f"{s['layout']}; XLA_FLAGS='{result['xla_flags']}'. Milliseconds, median; "
             f"hidden = time / compute alone (target <= 1.1).",
             "",
             "| GPUs | seqlen | fwd | fwd compute | fwd hidden | step | step compute | "
             "step hidden | step per block | step TFLOP/s/GPU |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['gpus']} | {r['seqlen']} | {r['fwd_ms']:.2f} | "
                     f"{r['fwd_compute_ms']:.2f} | {r['fwd_hidden']:.3f} | "
                     f"{r['step_ms']:.2f} | {r['step_compute_ms']:.2f} | "
                     f"{r['step_hidden']:.3f} | {r['step_per_block_ms']:.2f} | "
                     f"{r['step_tflops_per_gpu']:.0f} |")
    single = [r for r in result["rows"] if "single_fwd_ms" in r]
    if single:
        r = single[0]
        lines += ["", f"One GPU without the ring (cuflash.jax.attention): fwd "
                      f"{r['single_fwd_ms']:.2f} ms, step {r['single_step_ms']:.2f} ms."]
    (out / "ring.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
