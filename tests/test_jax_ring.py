"""cuflash.jax.ring_attention: forward and gradients equal to single-device attention.

Several JAX devices are needed; on the CPU they are XLA's host devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=4``), which must be set before JAX is
first imported and would change the rest of the test session. So the equality checks run
in one subprocess, this file run as a script (``python tests/test_jax_ring.py cpu``): it
runs every case of CASES on 2 or 4 CPU devices (the NumPy backend inside XLA's callbacks)
and prints one JSON report; each test below asserts its case's entry. Each case compares,
in the natural token order:

- the ring's ``out``, ``lse``, ``dq``, ``dk``, ``dv`` with the float64 reference
  (``cuflash.reference``) by the project's accuracy rule (tests/accuracy.py), and
- the same with ``cuflash.jax.attention`` on the gathered sequence (one device), to within
  8 units in the last place of the dtype at the result's largest magnitude (times n for
  dK/dV, which sum n rounded block gradients);

and the staged program: ``n - 1`` ppermutes of K/V in the forward (fewer where trailing
steps are skipped), no conditional. The script also runs ``cuflash.jax.attention``'s
gradient per device under ``jax.shard_map`` and the doctest of cuflash/jax/ring.py. It
compiles with ``--xla_backend_optimization_level=0`` (compiling is most of its ~4 s).

The test marked `gpu` runs the same script on every GPU of the machine (bf16 and fp16, 2, 4
and 8 GPUs where present); it skips with fewer than 2 GPUs or without a CUDA build of JAX.
Plan-level checks (load balance of the zigzag layout, argument errors, the layout helpers)
run in this process without several devices.
"""
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

# Cases: id -> options. n: ring size; heads: (nheads, nheads_kv); c: tokens per chunk
# (global seqlen = 2 * n * c); lse: the loss uses lse too (the augmented backward).
CASES = {
    "n4-full-gqa-f32": dict(n=4, causal=False, heads=(4, 2)),
    "n2-causal-zigzag-lse-grad-f32": dict(n=2, causal=True, lse=True),
    "n4-causal-zigzag-gqa-softcap-scale-f32": dict(n=4, causal=True, heads=(4, 2),
                                                   softcap=3.0, scale=0.2),
    "n4-causal-contiguous-f32": dict(n=4, causal=True, layout="contiguous"),
    "n4-window-causal-zigzag-f32": dict(n=4, causal=True, window=(10, None)),
    "n4-window-contiguous-truncated-f32": dict(n=4, causal=True, window=(9, None),
                                               layout="contiguous"),
    "n2-window-both-sides-zigzag-f32": dict(n=2, causal=False, window=(5, 11)),
    "n2-causal-zigzag-gqa-bf16": dict(n=2, causal=True, heads=(4, 2), dtype="bfloat16"),
    "n4-causal-zigzag-softcap-bf16": dict(n=4, causal=True, softcap=5.0, dtype="bfloat16"),
    "n4-window-zigzag-gqa-bf16": dict(n=4, causal=False, window=(7, 2), heads=(4, 1),
                                      dtype="bfloat16"),
}

HERE = os.path.dirname(os.path.abspath(__file__))


def _start(*args, env=None):
    return subprocess.Popen([sys.executable, os.path.abspath(__file__), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _report(proc, timeout=600):
    """The JSON report of a script run (its last stdout line)."""
    stdout, stderr = proc.communicate(timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"the ring-attention script failed:\n{stdout}\n{stderr[-4000:]}")
    return json.loads(stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def cpu_report():
    pytest.importorskip("jax")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # the script sets its own
    return _report(_start("cpu", env=env))


@pytest.mark.parametrize("case", list(CASES))
def test_ring_equals_single_device_on_cpu_devices(cpu_report, case):
    assert cpu_report[case] == "ok", cpu_report[case]


def test_attention_gradient_inside_shard_map(cpu_report):
    """cuflash.jax.attention per device under jax.shard_map (check_vma on): the callbacks'
    results are typed as varying over the mesh axis, as their inputs are, or the custom_vjp
    backward is rejected ("the manual axis types do not match")."""
    assert cpu_report["shard_map-attention-grad"] == "ok", cpu_report["shard_map-attention-grad"]


def test_docstring_example(cpu_report):
    """Run by the script too (it has JAX imported already)."""
    assert cpu_report["doctest"] == "ok", cpu_report["doctest"]


# ---------------------------------------------------------------------------------------
# In this process: the static plan, the helpers, argument errors.

def _plan(n, layout, seqlen, left, right, batch=1):
    fj = pytest.importorskip("cuflash.jax")
    from cuflash.jax import _binding, ring as jax_ring
    o = _binding._options(None, False, (None, None), 0.0)
    return jax_ring._plan("sp", n, layout, seqlen, batch, left, right, o)


def _work(plan, n):
    """Per step and device: query x key pairs its calls compute (a window counts fully:
    this is for maskless pairs) and the number of calls staged."""
    rows = []
    for slots in plan.steps:
        per_device = []
        for r in range(n):
            total = 0
            for slot in slots:
                cq, ck = np.diff(slot.cu_q[r]), np.diff(slot.cu_k[r])
                total += int((cq * ck).sum())
            per_device.append(total)
        rows.append(per_device)
    return rows


@pytest.mark.parametrize("n", [2, 4, 8])
def test_zigzag_causal_plan_is_balanced_and_skips_hidden_pairs(n):
    """Causal zigzag: one call per step, every device the same work; steps after the first
    do half a block pair (the hidden half is never computed)."""
    c = 16
    plan = _plan(n, "zigzag", 2 * c, None, 0)
    assert len(plan.steps) == n and all(len(slots) == 1 for slots in plan.steps)
    work = _work(plan, n)
    assert work[0] == [(2 * c) ** 2] * n            # own block, causal (a full tile count)
    for step in work[1:]:
        assert step == [2 * c * c] * n              # half of the (2c x 2c) pair


def test_contiguous_causal_plan_skips_hidden_steps():
    plan = _plan(4, "contiguous", 16, None, 0)
    work = _work(plan, 4)
    for t, step in enumerate(work[1:], 1):
        assert step == [0 if r < t else 16 * 16 for r in range(4)]


def test_window_plan_drops_trailing_steps():
    """A causal window of 9 tokens over chunks of 8 reaches two blocks back: 3 steps."""
    assert len(_plan(4, "contiguous", 8, 9, 0).steps) == 3
    assert len(_plan(8, "contiguous", 8, 0, 0).steps) == 1


def test_pair_calls_cover_exactly_the_band():
    """Every band of a c x c pair, as (query rows, key rows, window) with the window aligned
    as cuflash aligns it, gives the band's mask and nothing else."""
    pytest.importorskip("cuflash.jax")
    from cuflash.jax import ring as jax_ring
    c = 6
    i, j = np.arange(c)[:, None], np.arange(c)[None]
    for lo in range(-(c - 1), c):
        for hi in range(lo, c):
            (q0, q1), (k0, k1), (left, right) = jax_ring._pair_call(lo, hi, c)
            want = (j - i >= lo) & (j - i <= hi)
            got = np.zeros((c, c), bool)
            ii, jj = np.arange(q1 - q0)[:, None], np.arange(k1 - k0)[None]
            shift = (k1 - k0) - (q1 - q0)  # bottom-right alignment
            mask = np.ones_like(ii + jj, bool)
            if left is not None:
                mask &= jj >= ii + shift - left
            if right is not None:
                mask &= jj <= ii + shift + right
            got[q0:q1, k0:k1] = mask
            assert (got == want).all(), (lo, hi)


def test_zigzag_helpers():
    fj = pytest.importorskip("cuflash.jax")
    x = np.arange(2 * 24 * 3).reshape(2, 24, 3)
    z = np.asarray(fj.to_zigzag(x, 3))
    assert (z[0, :4, 0] == x[0, [0, 1, 2, 3], 0]).all()        # chunk 0 (c = 4)
    assert (z[0, 4:8, 0] == x[0, [20, 21, 22, 23], 0]).all()   # chunk 5
    assert (np.asarray(fj.from_zigzag(z, 3)) == x).all()
    pos = fj.zigzag_positions(24, 3)
    assert (z == x[:, pos]).all()
    lse_like = np.moveaxis(z, 1, 2)
    assert (np.asarray(fj.from_zigzag(lse_like, 3, axis=2)) == np.moveaxis(x, 1, 2)).all()
    with pytest.raises(ValueError, match="multiple of"):
        fj.zigzag_positions(20, 3)


def test_argument_errors():
    fj = pytest.importorskip("cuflash.jax")
    q = np.zeros((1, 6, 2, 16), np.float32)
    with pytest.raises(ValueError, match="contradicts causal"):
        fj.ring_attention(q, q, q, "sp", causal=True, window=(3, 2))
    with pytest.raises(ValueError, match="must be even"):
        fj.ring_attention(q[:, :5], q[:, :5], q[:, :5], "sp", causal=True)
    with pytest.raises(ValueError, match="self-attention"):
        fj.ring_attention(q, q[:, :4], q[:, :4], "sp")
    with pytest.raises(ValueError, match="layout"):
        fj.ring_attention(q, q, q, "sp", layout="striped")
    with pytest.raises(ValueError, match="window left"):
        fj.ring_attention(q, q, q, "sp", window=(-3, None))


@pytest.mark.gpu
def test_gpu_ring_bf16_equals_single_device():
    """bf16 and fp16 ring attention on 2, 4 and 8 GPUs (as many as present) against the
    reference and single-GPU cuflash.jax.attention; the same script as the CPU cases."""
    pytest.importorskip("jax")
    env = dict(os.environ)
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.6")  # room for CuPy's pool
    report = _report(_start("gpu", env=env), timeout=1800)
    if "skip" in report:
        pytest.skip(report["skip"])
    bad = {case: result for case, result in report.items() if result != "ok"}
    assert not bad, bad


# ---------------------------------------------------------------------------------------
# The script: run the cases on several devices, report as JSON.

def gpu_cases(num_gpus):
    """Shapes that exercise the GPU kernels' tiles yet keep the float64 reference (on the
    host, O(seqlen^2) memory) small: at most 2 * 8 * 128 = 2048 tokens."""
    cases = {}
    for n in (2, 4, 8):
        if n > num_gpus:
            break
        for dtype in ("bfloat16", "float16"):
            cases[f"gpu-n{n}-causal-zigzag-gqa-{dtype}"] = dict(
                n=n, causal=True, heads=(8, 2), headdim=128, c=128, batch=1, dtype=dtype)
        cases[f"gpu-n{n}-full-softcap-bfloat16"] = dict(n=n, causal=False, softcap=20.0,
                                                        headdim=64, c=96, dtype="bfloat16")
        cases[f"gpu-n{n}-window-causal-contiguous-bfloat16"] = dict(
            n=n, causal=True, window=(300, None), layout="contiguous", c=128,
            dtype="bfloat16")
    return cases


def run_case(jax, fj, reference, assert_close, devices, case):
    import jax.numpy as jnp
    import ml_dtypes
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    n = case["n"]
    layout = case.get("layout", "zigzag")
    nheads, nheads_kv = case.get("heads", (2, 2))
    batch, headdim, c = case.get("batch", 2), case.get("headdim", 16), case.get("c", 6)
    dtype = np.dtype(ml_dtypes.bfloat16) if case.get("dtype") == "bfloat16" else \
        np.dtype(case.get("dtype", "float32"))
    options = dict(causal=case["causal"], window=case.get("window", (None, None)),
                   softcap=case.get("softcap", 0.0), scale=case.get("scale"))
    seqlen = 2 * n * c
    rng = np.random.default_rng(len(json.dumps(case, sort_keys=True)))
    q = rng.standard_normal((batch, seqlen, nheads, headdim)).astype(dtype)
    k, v = (rng.standard_normal((batch, seqlen, nheads_kv, headdim)).astype(dtype)
            for _ in range(2))
    dout = rng.standard_normal(q.shape).astype(dtype)
    dlse = rng.standard_normal((batch, nheads, seqlen)).astype(np.float32)
    use_lse = case.get("lse", False)

    mesh = Mesh(np.array(devices[:n]), ("sp",))
    rows, lse_rows = P(None, "sp"), P(None, None, "sp")
    zig = layout == "zigzag"
    # The zigzag permutation in NumPy (fj.to_zigzag would compile a gather per shape).
    order = fj.zigzag_positions(seqlen, n) if zig else np.arange(seqlen)
    to = lambda x, axis=1: np.take(x, order, axis=axis)  # noqa: E731
    back = lambda x, axis=1: np.take(np.asarray(x), np.argsort(order), axis=axis)  # noqa

    put = lambda x, spec=rows: jax.device_put(x, NamedSharding(mesh, spec))  # noqa: E731

    def ring(q, k, v):
        return fj.ring_attention(q, k, v, "sp", layout=layout, return_lse=True, **options)

    sharded = jax.shard_map(ring, mesh=mesh, in_specs=(rows, rows, rows),
                            out_specs=(rows, lse_rows))

    def loss_and_outputs(attn, q, k, v, dout, dlse):
        out, lse = attn(q, k, v)
        loss = jnp.sum(out.astype(jnp.float32) * dout.astype(jnp.float32))
        if use_lse:
            loss = loss + jnp.sum(lse * dlse)
        return loss, (out, lse)

    def run(attn, *args):
        grad = jax.grad(lambda q, k, v, d, dl: loss_and_outputs(attn, q, k, v, d, dl),
                        argnums=(0, 1, 2), has_aux=True)
        return jax.jit(grad)(*args)

    (dq, dk, dv), (out, lse) = run(sharded, put(to(q)), put(to(k)), put(to(v)),
                                   put(to(dout)), put(to(dlse, 2), lse_rows))
    got = dict(out=back(out), lse=back(lse, 2), dq=back(dq), dk=back(dk), dv=back(dv))

    # The staged program: n - 1 transfers of K/V in the forward (fewer where trailing steps
    # are skipped), and no conditional (an XLA conditional syncs with the host on GPUs).
    from cuflash.jax import _binding, ring as jax_ring
    hlo = jax.jit(sharded).lower(put(to(q)), put(to(k)), put(to(v))).as_text()
    plan_steps = len(jax_ring._plan(
        "sp", n, layout, seqlen // n, batch, options["window"][0],
        0 if options["causal"] else options["window"][1],
        _binding._options(None, False, (None, None), 0.0)).steps)
    permutes = hlo.count("stablehlo.collective_permute")  # one for K, one for V
    assert permutes == 2 * (plan_steps - 1), f"{permutes} collective permutes for " \
        f"{plan_steps} steps"
    assert "stablehlo.case" not in hlo and "stablehlo.if" not in hlo

    # One device, the whole sequence in natural order.
    single = lambda q, k, v: fj.attention(q, k, v, return_lse=True, **options)  # noqa: E731
    args = [jax.device_put(x, devices[0]) for x in (q, k, v, dout, dlse)]
    (sq, sk, sv), (so, sl) = run(single, *args)
    want = dict(out=so, lse=sl, dq=sq, dk=sk, dv=sv)
    eps = float(jnp.finfo(dtype).eps)
    for name, w in want.items():
        w = np.asarray(w).astype(np.float64)
        g = got[name].astype(np.float64)
        ulps = eps if name != "lse" else float(jnp.finfo(jnp.float32).eps)
        tol = 8 * ulps * max(1.0, np.abs(w).max()) * (n if name in ("dk", "dv") else 1)
        err = np.abs(g - w).max()
        assert err <= tol, f"{name}: ring vs one device {err:.3g} > {tol:.3g}"

    # The float64 reference (lse cotangent: compared with one device above only).
    opts = dict(options)
    ref = reference.attention_forward(q, k, v, **opts)
    naive = reference.attention_forward(q, k, v, **opts, upcast=False)
    assert_close("out", got["out"].astype(dtype), ref[0], naive[0])
    assert_close("lse", got["lse"].astype(np.float32), ref[1], naive[1])
    if not use_lse:
        ref = reference.attention_backward(dout, q, k, v, **opts)
        naive = reference.attention_backward(dout, q, k, v, **opts, upcast=False)
        for name, r, nv in zip(("dq", "dk", "dv"), ref, naive):
            assert_close(name, got[name].astype(dtype), r, nv)


def check_attention_inside_shard_map(jax, fj, devices):
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    mesh = Mesh(np.array(devices[:4]), ("b",))
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((4, 8, 2, 16)).astype(np.float32) for _ in range(3))
    f = jax.shard_map(lambda q, k, v: fj.attention(q, k, v, causal=True), mesh=mesh,
                      in_specs=P("b"), out_specs=P("b"))
    put = lambda x: jax.device_put(x, NamedSharding(mesh, P("b")))  # noqa: E731
    loss = lambda f: lambda q, k, v: jnp.sum(f(q, k, v) ** 2)  # noqa: E731
    got = jax.jit(jax.grad(loss(f), argnums=(0, 1, 2)))(put(q), put(k), put(v))
    want = jax.jit(jax.grad(loss(lambda q, k, v: fj.attention(q, k, v, causal=True)),
                            argnums=(0, 1, 2)))(q, k, v)
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-6, atol=1e-6)


def main(platform):
    if platform == "cpu":
        # Four host devices; and less LLVM optimisation, since compiling is most of the time.
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   " --xla_force_host_platform_device_count=4"
                                   " --xla_backend_optimization_level=0").strip()
        os.environ["JAX_PLATFORMS"] = "cpu"
    sys.path.insert(0, HERE)
    import jax
    import cuflash.jax as fj
    from accuracy import assert_close
    from cuflash import reference

    if platform == "cpu":
        devices, cases = jax.devices("cpu"), CASES
    else:
        try:
            devices = jax.devices("gpu")
        except RuntimeError:
            devices = []
        if len(devices) < 2:
            print(json.dumps({"skip": f"needs >= 2 GPUs visible to JAX, found "
                                      f"{len(devices)}"}))
            return
        cases = gpu_cases(len(devices))
    report, start = {}, time.perf_counter()
    for name, case in cases.items():
        try:
            run_case(jax, fj, reference, assert_close, devices, case)
            report[name] = "ok"
        except Exception as e:  # reported per case; the test prints it
            report[name] = f"{type(e).__name__}: {e}"[:2000]
    if platform == "cpu":
        try:
            check_attention_inside_shard_map(jax, fj, devices)
            report["shard_map-attention-grad"] = "ok"
        except Exception as e:
            report["shard_map-attention-grad"] = f"{type(e).__name__}: {e}"[:2000]
        import doctest
        from cuflash.jax import ring as jax_ring
        failed = doctest.testmod(jax_ring, verbose=False).failed
        report["doctest"] = "ok" if not failed else f"{failed} doctest examples failed"
    print(f"{len(cases)} cases in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    print(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "cpu")
