"""The benchmarks' tests.

On any machine (CI): the pure-Python parts of bench/sweep.py and bench/jax_bench.py (the
timer, rows, ratios to the best peer, summaries, markdown), the JAX peer adapters on JAX's
CPU backend (``jax.nn.dot_product_attention(implementation="xla")`` standing in for cuDNN,
``cuflash.jax`` on the NumPy backend, a stand-in ``flash_attn3_jax``) against the float64
reference, both scripts' ``--dry-run`` end to end, and every script's ``--help``.

On a GPU (marked ``gpu``): a pytest-benchmark suite on representative shapes of the
standard sweep (bf16),

    PYTHONPATH=. python -m pytest bench/ -m gpu --benchmark-columns=median,min,max

where each round is one call followed by a device sync, so a round's time is the call's real
duration; the TFLOP/s of the median round lands in the report's extra_info. For the
comparison with peers use bench/sweep.py.
"""
import contextlib
import itertools
import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import _common
import jax_bench
import sweep
from _common import Difference, Skipped, Timing, flops, make_inputs, standard_shape

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
WARMUP_ROUNDS, ROUNDS = 3, 20


# ------------------------------------------------------------------------- the timer

class Clock:
    """A fake perf_counter: time moves only when a timed function says so."""
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(_common.time, "perf_counter", c)
    return c


def timed(fn, timing, sync):
    """``timing.reps`` runs of a Runner (of a Difference: its total's, then its part's), as
    a row's turns make them, and their summary."""
    if isinstance(fn, Difference):
        total, part = _common.Runner(fn.total, timing, sync), _common.Runner(fn.part, timing,
                                                                             sync)
        return _common.summary_of_runs([total.run() for _ in range(timing.reps)],
                                       [part.run() for _ in range(timing.reps)], total.calls)
    runner = _common.Runner(fn, timing, sync)
    return _common.summary_of_runs([runner.run() for _ in range(timing.reps)], None,
                                   runner.calls)


def test_runner_calls_and_syncs(clock):
    calls, syncs = [], []

    def fn():
        clock.now += 0.002  # 2 ms a call
        calls.append(1)
        return len(calls)

    def sync(result):
        syncs.append(result)

    timing = Timing(budget_ms=20.0, min_calls=3, max_calls=100, reps=4, warmup=2)
    got = timed(fn, timing, sync)
    assert got["ms"] == pytest.approx(2.0) and got["min_ms"] == pytest.approx(2.0)
    assert got["calls"] == 10 and got["reps"] == 4  # 20 ms of 2 ms calls
    # warm-up, the sizing run, then the timed runs; one sync after each, on the last result
    assert len(calls) == 2 + 3 + 4 * 10
    assert syncs == [2, 5, 15, 25, 35, 45]


def test_runner_clamps_the_number_of_calls(clock):
    def slow():
        clock.now += 1.0

    got = timed(slow, Timing(10.0, 2, 50, 1, 0), lambda r: None)
    assert got["calls"] == 2 and got["ms"] == pytest.approx(1000.0)

    def fast():
        clock.now += 1e-7

    assert timed(fast, Timing(10.0, 2, 50, 1, 0), lambda r: None)["calls"] == 50


def test_runs_of_a_difference(clock):
    def total():
        clock.now += 0.005

    def part():
        clock.now += 0.002

    got = timed(Difference(total, part), Timing(10.0, 1, 10, 3, 1), lambda r: None)
    assert got["ms"] == pytest.approx(3.0)
    assert got["total_ms"] == pytest.approx(5.0) and got["part_ms"] == pytest.approx(2.0)


def test_turns_reverse_the_order_by_turns():
    assert list(_common.turns(["a", "b", "c"], 3)) == list("abccbaabc")


def test_synchronize_waits_for_jax_results_without_a_gpu():
    jax = pytest.importorskip("jax")
    x = jax.numpy.ones(3) * 2
    _common.synchronize(x, gpu=False)
    _common.synchronize((x, np.ones(2)), gpu=False)  # leaves that are not JAX's pass through
    _common.synchronize(None, gpu=False)


# --------------------------------------------------------------------- rows and reports

def result(tflops):
    return {"ms": 1.0 / tflops, "tflops": tflops}


def row(mode="fwd", headdim=64, seqlen=4096, causal=False, dtype="bf16", **tflops):
    results = {name.replace("_", "-"): result(t) if t is not None else {"error": "E: no"}
               for name, t in tflops.items()}
    batch, nheads = standard_shape(seqlen, headdim)
    return sweep.make_row(mode, dtype, headdim, causal, seqlen, batch, nheads, results,
                          sweep.PEERS)


def test_score_takes_the_best_peer_of_the_row():
    r = row(cuflash=400, torch_cudnn=500, torch_flash=300, jax_cudnn=450, fa3=None)
    assert r["best_peer"] == "torch-cudnn" and r["ratio"] == pytest.approx(0.8)
    # cuflash's own variants and the naive attention are not peers
    r = row(cuflash=400, cuflash_jax=900, naive_cupy=1000, fa3=500)
    assert r["best_peer"] == "fa3" and r["ratio"] == pytest.approx(0.8)
    assert row(cuflash=400, cuflash_jax=900)["ratio"] is None
    r = row(cuflash=None, fa3=500)
    assert r["best_peer"] == "fa3" and r["ratio"] is None


def test_make_row_counts_the_flops_of_its_mode():
    r = row(mode="bwd", headdim=128, seqlen=1024, causal=True, cuflash=1)
    assert (r["batch"], r["nheads"]) == (16, 16)
    assert r["flops"] == 2.5 * 4 * 16 * 16 * 1024 * 1024 * 128 / 2


def sample_rows():
    rows = []
    for mode, (hd, seqlen) in itertools.product(("fwd", "bwd"), itertools.product(
            (64, 128, 256), (1024, 4096, 16384))):
        ours = {64: 400, 128: 500, 256: 200}[hd] + seqlen / 1024  # ratios differ by row
        rows.append(row(mode, hd, seqlen, cuflash=ours, torch_cudnn=500, jax_cudnn=450,
                        fa3=None if hd > 128 else 600, torch_flash=300))
    return rows


def test_summary_median_min_and_head_dim_256_against_cudnn():
    rows = sample_rows()
    (fwd, bwd) = sweep.summarise(rows)
    assert (fwd["mode"], fwd["dtype"], bwd["mode"]) == ("fwd", "bf16", "bwd")
    main = [r["ratio"] for r in rows if r["mode"] == "fwd" and r["headdim"] in (64, 128)]
    assert fwd["median_rows"] == 6 and fwd["median"] == pytest.approx(np.median(main))
    assert fwd["min_long_rows"] == 4  # hd 64 and 128 at 4k and 16k
    assert fwd["min_long"] == pytest.approx((400 + 4) / 600)
    assert fwd["cudnn_256_rows"] == 3
    assert fwd["min_cudnn_256"] == pytest.approx((200 + 1) / 500)  # against torch-cudnn


def test_summary_of_rows_without_ratios():
    (s,) = sweep.summarise([row(cuflash=None, fa3=1.0), row(cuflash=1.0)])
    assert s["median"] is None and s["min_long"] is None and s["min_cudnn_256"] is None
    assert "median - over 0" in sweep.summary_line(s)


def test_summary_leaves_out_rows_without_peers_and_variants_name_their_lowest_row():
    rows = [row(cuflash=400, cuflash_det=340, headdim=hd, seqlen=seqlen)
            for hd, seqlen in ((64, 4096), (256, 16384))]
    rows[1]["results"]["cuflash-det"] = result(300)
    assert sweep.summarise(rows) == []
    (line,) = sweep.variant_lines(rows)
    assert "cuflash-det / cuflash (speed), min 0.75 (hd256 full 16384), median 0.80" in line


def test_markdown_tables_summary_checks_and_gaps():
    rows = sample_rows()
    rows[0]["results"]["jax-cudnn"].update(check=0.5, check_against="cuflash")
    rows[1]["results"]["fa3"].update(check="shape (2,) != (3,)", check_against="cuflash")
    rows[2]["results"]["torch-flash"] = {"error": "Skipped: torch does not import"}
    names = ["cuflash", "torch-cudnn", "torch-flash", "jax-cudnn", "fa3"]
    text = sweep.markdown(rows, names)
    assert "## fwd bf16: TFLOP/s" in text and "## bwd bf16: TFLOP/s" in text
    header = "| hd | causal | seqlen | batch x heads | " + " | ".join(names)
    assert header + " | best peer | ratio |" in text
    assert "| 64 | no | 1024 | 16 x 32 | 401.0 | 500.0 | 300.0 | 450.0 | 600.0 | fa3 | 0.67 |" \
        in text
    assert "| 256 | no | 4096 | 4 x 8 | 204.0 | 500.0 | 300.0 | 450.0 | - | torch-cudnn | 0.41 |" \
        in text
    assert "## Summary" in text and "- fwd bf16: cuflash / best peer, median" in text
    assert "## Output check" in text and "jax-cudnn against cuflash: 0.500" in text
    assert "shape (2,) != (3,)" in text
    assert "## Gaps" in text and "- torch-flash: Skipped: torch does not import" in text
    assert "- fa3: E: no" in text


def test_write_results_json_and_md(tmp_path):
    env = {"device": "test", "command": "sweep.py", "date": "today", "cuflash": "0"}
    sweep.write_results(tmp_path, env, sample_rows(), ["cuflash", "fa3"])
    data = json.loads((tmp_path / "sweep.json").read_text())
    assert len(data["rows"]) == 18 and data["summary"][0]["median_rows"] == 6
    assert "handover" in data
    assert (tmp_path / "sweep.md").read_text().startswith("# sweep on test")


def test_output_sample_layouts():
    rng = np.random.default_rng(0)
    out = rng.standard_normal((3, 300, 4, 8)).astype(np.float32)  # (batch, seqlen, h, d)
    want = out[:2, :256]
    bhsd = np.ascontiguousarray(out.swapaxes(1, 2))
    np.testing.assert_array_equal(sweep.output_sample("cuflash", (out, None), out.shape), want)
    np.testing.assert_array_equal(sweep.output_sample("jax", out, out.shape), want)
    np.testing.assert_array_equal(sweep.output_sample("torch", bhsd, out.shape), want)
    np.testing.assert_array_equal(sweep.output_sample("naive", (bhsd, None), out.shape), want)
    packed = out.reshape(3 * 300, 4, 8)
    np.testing.assert_array_equal(sweep.output_sample("cuflash", (packed, None), out.shape),
                                  want)
    assert sweep.difference(want, want) == 0.0
    assert sweep.difference(want * 1.1, want) == pytest.approx(0.1, rel=1e-5)
    assert sweep.difference(want[:1], want).startswith("shape")


def one_row(impls, mode="fwd", released=None):
    row, = sweep.shape_rows(impls, [np.zeros((1, 2, 1, 8))] * 4, "bf16", (False,), (mode,),
                            sweep.TIMING["dry"], lambda r: None,
                            release=(lambda: released.append(1)) if released is not None
                            else lambda: None)
    return row["results"]


def test_failures_are_gaps_and_release_their_memory(clock):
    """A failure at set-up, in a turn or on leaving an implementation's context is a gap
    in the row, never an exception out of the sweep; a failed implementation's context is
    closed (its memory released) at once, while the others still run."""
    events = []

    @contextlib.contextmanager
    def broken(mode, q, k, v, dout, causal):
        raise MemoryError("out of memory\nsecond line")
        yield

    def run_with(name, fail_in_turn=False, fail_on_exit=False):
        @contextlib.contextmanager
        def run(mode, q, k, v, dout, causal):
            calls = []

            def fn():
                calls.append(1)
                clock.now += 1e-3
                if fail_in_turn and len(calls) > 6:  # set-up done: warm-up 1, sizing 1-2
                    raise MemoryError("out of memory in a turn")
            try:
                yield fn
            finally:
                events.append(f"{name} closed")
            if fail_on_exit:
                raise RuntimeError("exit failed")
        return run

    impls = {"cuflash": sweep.Impl(run_with("cuflash"), "cuflash", False),
             "broken": sweep.Impl(broken, "torch", True),
             "missing": sweep.Impl(sweep.unavailable("torch does not import"), "torch", True),
             "turn": sweep.Impl(run_with("turn", fail_in_turn=True), "torch", True),
             "exit": sweep.Impl(run_with("exit", fail_on_exit=True), "torch", True)}
    released = []
    got = one_row(impls, mode="bwd", released=released)
    assert got["broken"] == {"error": "MemoryError: out of memory"}
    assert got["missing"] == {"error": "Skipped: torch does not import"}
    assert got["turn"] == {"error": "MemoryError: out of memory in a turn"}
    assert got["exit"] == {"error": "RuntimeError: exit failed"}
    assert got["cuflash"]["reps"] == 4
    # the failed one closed before the others finished their turns, each failure released
    assert events.index("turn closed") < events.index("cuflash closed")
    assert len(released) == 3 + 1  # broken, missing, turn; then the row


def test_implementations_take_turns_under_a_drifting_clock(clock):
    """The GPU slows as it warms: each call costs more than the one before. Timed one after
    the other the later column would read slower; in turns (A B, B A, ...) both columns see
    the same drift and read alike. A Difference (a JAX backward) runs its total and part in
    its turn; a broken implementation stays a gap."""
    calls = []

    def impl(name, family, ms):
        @contextlib.contextmanager
        def run(mode, q, k, v, dout, causal):
            def make(cost):
                def fn():
                    calls.append(name)
                    clock.now += cost * (1 + 0.01 * len(calls)) / 1e3
                return fn
            if isinstance(ms, tuple):
                yield _common.Difference(make(ms[0]), make(ms[1]))
            else:
                yield make(ms)
        return sweep.Impl(run, family, name != "cuflash")

    impls = {"cuflash": impl("cuflash", "cuflash", 1.0), "peer": impl("peer", "torch", 1.0),
             "jax": impl("jax", "jax", (3.0, 2.0)),
             "broken": sweep.Impl(sweep.unavailable("no such library"), "torch", True)}
    q = np.zeros((1, 2, 1, 8))
    timing = Timing(budget_ms=2.0, min_calls=2, max_calls=2, reps=2, warmup=1)
    row, = sweep.shape_rows(impls, [q] * 4, "bf16", (False,), ("bwd",), timing,
                            lambda r: None, clock=lambda: 1500)
    got = row["results"]
    assert list(got) == list(impls) and "error" in got["broken"]
    for name in ("cuflash", "peer", "jax"):
        assert got[name]["reps"] == 4 and len(got[name]["runs_ms"]) == 4
        assert got[name]["mhz"] == 1500
    # 1 ms a call for both, slowed alike by the drift (one after the other: 10% apart)
    assert got["cuflash"]["ms"] == pytest.approx(got["peer"]["ms"], rel=0.02)
    assert 1.0 < got["jax"]["ms"] < 1.5  # total - part, both drifting
    assert len(got["jax"]["part_runs_ms"]) == 4
    assert got["jax"]["ms"] == pytest.approx(got["jax"]["total_ms"] - got["jax"]["part_ms"])
    assert row["ratio"] == pytest.approx(got["cuflash"]["tflops"] / max(
        got["peer"]["tflops"], got["jax"]["tflops"]))


def test_turns_alternate_the_row_order(clock):
    order = []

    def impl(name):
        @contextlib.contextmanager
        def run(mode, q, k, v, dout, causal):
            def fn():
                clock.now += 1e-3
                if not order or order[-1] != name:
                    order.append(name)
            yield fn
        return sweep.Impl(run, "cuflash" if name == "a" else "torch", name != "a")

    impls = {"a": impl("a"), "b": impl("b"), "c": impl("c")}
    timing = Timing(budget_ms=2.0, min_calls=2, max_calls=2, reps=2, warmup=1)
    list(sweep.shape_rows(impls, [np.zeros((1, 2, 1, 8))] * 4, "bf16", (False,), ("fwd",),
                          timing, lambda r: None, check=False))
    # set-up a, b, c; then turns a b c | c b a | a b c | c b a (repeats merge)
    assert order == ["a", "b", "c", "a", "b", "c", "b", "a", "b", "c", "b", "a"]


def test_parse_args_defaults_of_the_issues_tables(tmp_path):
    args = sweep.parse_args(["--out", str(tmp_path)])
    assert args.headdims == [64, 128, 256] and args.seqlens == [1024, 4096, 16384]
    assert args.modes == ["fwd", "bwd"] and args.dtypes == ["bf16", "fp16"]
    assert args.impls == ["cuflash", "torch-cudnn", "torch-flash", "jax-cudnn", "fa3"]
    args = sweep.parse_args(["--out", str(tmp_path), "--all-seqlens", "--dtypes", "fp16"])
    assert args.seqlens == [512, 1024, 2048, 4096, 8192, 16384] and args.dtypes == ["fp16"]
    with pytest.raises(SystemExit):
        sweep.parse_args(["--out", str(tmp_path), "--all-seqlens", "--seqlens", "1024"])
    with pytest.raises(SystemExit):
        sweep.select(["cuflash", "no-such"], sweep.registry(None, None))


def test_missing_libraries_are_gaps_in_the_registry():
    known = sweep.registry("torch does not import", "jax does not import")
    assert set(sweep.DEFAULT_IMPLS) <= set(known)
    names = ("torch-cudnn", "torch-flash", "jax-cudnn", "fa3", "cuflash-jax")
    got = one_row({name: known[name] for name in names})
    for name in names:
        assert got[name]["error"].startswith("Skipped: ")
        assert "does not import" in got[name]["error"]


# ------------------------------------------------------------- JAX adapters on the CPU

@pytest.fixture
def jax_cpu():
    jax = pytest.importorskip("jax")
    _common.jax_jitted.cache_clear()
    yield jax
    _common.jax_jitted.cache_clear()


def reference(q, k, v, dout, causal):
    """Float64 (out, dq, dk, dv) in (batch, seqlen, nheads, headdim)."""
    import cuflash
    out = cuflash.reference.attention_forward(q, k, v, causal=causal)
    out = out[0] if isinstance(out, tuple) else out
    return (out, *cuflash.reference.attention_backward(dout, q, k, v, causal=causal))


def cpu_inputs(dtype=np.float32, shape=(2, 48, 4, 32), seed=1):
    np.random.seed(seed)
    return make_inputs(np.dtype(dtype), *shape, xp=np)


@pytest.mark.parametrize("name", ["jax-xla", "cuflash-jax"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_jax_adapters_on_the_cpu(jax_cpu, name, causal):
    q, k, v, dout = cpu_inputs()
    want = reference(q, k, v, dout, causal)
    with _common.run_jax(name, "fwd", q, k, v, dout, causal) as fn:
        out = fn()
        assert out.shape == q.shape
        np.testing.assert_allclose(np.asarray(out), want[0], atol=2e-5, rtol=1e-4)
        assert sweep.difference(sweep.output_sample("jax", out, q.shape),
                                want[0][:2, :256].astype(np.float32)) < 1e-4
    with _common.run_jax(name, "fwdbwd", q, k, v, dout, causal) as fn:
        grads = fn()
        for got, expected in zip(grads, want[1:]):
            assert got.shape == q.shape
            np.testing.assert_allclose(np.asarray(got), expected, atol=1e-4, rtol=1e-3)
    with _common.run_jax(name, "bwd", q, k, v, dout, causal) as fn:
        assert isinstance(fn, Difference)
        assert len(fn.total()) == 3 and fn.part().shape == q.shape
    assert _common.HANDOVER[name] in ("dlpack", "copied")


def test_jax_adapter_in_bf16(jax_cpu):
    q, k, v, dout = cpu_inputs(ml_dtypes.bfloat16)
    with _common.run_jax("cuflash-jax", "fwd", q, k, v, dout, True) as fn:
        out = fn()
    assert out.dtype == np.dtype(ml_dtypes.bfloat16)
    want = reference(*(x.astype(np.float32) for x in (q, k, v, dout)), True)[0]
    np.testing.assert_allclose(np.asarray(out).astype(np.float32), want, atol=2e-2)


def test_to_jax_copies_what_dlpack_does_not_carry(jax_cpu):
    class HostOnly:  # a CuPy-like array without __dlpack__: .get() gives NumPy
        def __init__(self, a):
            self.a = a

        def get(self):
            return self.a

    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    got, how = _common.to_jax(HostOnly(a))
    assert how == "copied"
    np.testing.assert_array_equal(np.asarray(got), a)


def test_fa3_adapter(jax_cpu, monkeypatch):
    q, k, v, dout = cpu_inputs()
    with pytest.raises(Skipped, match="head dim 256 > 128"):
        with _common.run_jax("fa3", "fwd", *cpu_inputs(shape=(1, 8, 1, 256)), False):
            pass
    monkeypatch.setitem(sys.modules, "flash_attn3_jax", None)  # import fails
    with pytest.raises(Skipped, match="flash_attn3_jax does not import"):
        with _common.run_jax("fa3", "fwd", q, k, v, dout, False):
            pass
    _common.jax_jitted.cache_clear()
    seen = {}

    def flash_mha(q, k, v, softmax_scale=None, is_causal=False, window_size=(-1, -1)):
        seen.update(shape=q.shape, is_causal=is_causal)
        return jax_cpu.nn.dot_product_attention(q, k, v, is_causal=is_causal)

    monkeypatch.setitem(sys.modules, "flash_attn3_jax",
                        types.SimpleNamespace(flash_mha=flash_mha, __version__="fake"))
    with _common.run_jax("fa3", "fwd", q, k, v, dout, True) as fn:
        out = fn()
    assert seen == {"shape": q.shape, "is_causal": True}
    np.testing.assert_allclose(np.asarray(out), reference(q, k, v, dout, True)[0], atol=2e-5)


# --------------------------------------------------------------------- jax_bench's rows

def test_derive_backward_and_compare():
    fwd = row("fwd", 64, 4096, cuflash=400, cuflash_jax=380, jax_cudnn=450, fa3=None)
    fwdbwd = row("fwdbwd", 64, 4096, cuflash=300, cuflash_jax=290, jax_cudnn=350, fa3=None)
    bwd = jax_bench.derive_backward(fwd, fwdbwd)
    assert bwd["mode"] == "bwd" and bwd["flops"] == 2.5 * fwd["flops"]
    for name in ("cuflash", "cuflash-jax", "jax-cudnn"):
        ms = fwdbwd["results"][name]["ms"] - fwd["results"][name]["ms"]
        assert bwd["results"][name]["ms"] == pytest.approx(ms)
        assert bwd["results"][name]["tflops"] == pytest.approx(bwd["flops"] / ms / 1e9)
    assert bwd["results"]["fa3"] == {"error": "E: no"}
    r = jax_bench.compare(fwd)
    assert r["jax_over_cupy"] == pytest.approx(380 / 400)
    assert r["best_jax_peer"] == "jax-cudnn" and r["jax_over_peer"] == pytest.approx(380 / 450)
    # a backward no slower than the forward is a gap, not a negative time
    slow = row("fwd", 64, 4096, cuflash=1.0)
    fast = row("fwdbwd", 64, 4096, cuflash=2.0)
    assert "error" in jax_bench.derive_backward(slow, fast)["results"]["cuflash"]


def test_jax_bench_summary_and_markdown():
    rows = []
    for part, seqlen in (("sweep", 1024), ("sweep", 4096), ("small", 128)):
        r = jax_bench.compare(row("fwd", 64, seqlen, cuflash=100, cuflash_jax=90 + seqlen / 1024,
                                  jax_cudnn=80, fa3=None))
        r.update(part=part, call="fwd_small" if part == "small" else None)
        rows.append(r)
    sweep_fwd, small_fwd = jax_bench.summarise(rows)
    assert sweep_fwd["rows"] == 1  # only seqlen >= 4k counts
    assert sweep_fwd["min_jax_over_cupy"] == pytest.approx(0.94)
    assert small_fwd["max_time_over_cudnn"] == pytest.approx(80 / 90.125)
    text = jax_bench.markdown(rows, ["cuflash", "cuflash-jax", "jax-cudnn", "fa3"])
    assert "## sweep fwd: TFLOP/s" in text and "## small fwd: us per call" in text
    assert "| fwd_small | " in text and "cuflash.jax / JAX cuDNN (time per call), max 0.89" \
        in text
    assert "- fa3: E: no" in text


# ------------------------------------------------------------------- whole scripts, CPU

def test_sweep_dry_run(tmp_path, jax_cpu):
    out = tmp_path / "sweep"
    assert sweep.main(["sweep.py", "--out", str(out), "--dry-run", "--headdims", "64",
                       "--seqlens", "64", "--dtypes", "bf16"]) == 0
    data = json.loads((out / "sweep.json").read_text())
    assert [(r["mode"], r["causal"]) for r in data["rows"]] == [
        ("fwd", False), ("bwd", False), ("fwd", True), ("bwd", True)]
    for r in data["rows"]:
        assert set(r["results"]) == set(sweep.DRY_IMPLS)
        assert r["results"]["cuflash"]["tflops"] > 0
        assert r["results"]["fa3"]["error"].startswith("Skipped")
        assert r["results"]["torch-cudnn"]["error"].startswith("Skipped")
        if r["mode"] == "fwd":
            assert r["results"]["cuflash-jax"]["check"] < 0.02
            assert r["results"]["jax-xla"]["check"] < 0.02
    assert "## Summary" in (out / "sweep.md").read_text()


def test_sweep_of_trees(tmp_path, jax_cpu):
    """--trees: cuflash once per source tree, each tree's own package (its plans and kernels),
    in turns, and a table of each tree against the first."""
    root = Path(__file__).resolve().parent.parent
    other = tmp_path / "other"
    for part in ("cuflash", "kernels_cu"):
        shutil.copytree(root / part, other / part,
                        ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path / "sweep"
    assert sweep.main(["sweep.py", "--out", str(out), "--dry-run", "--headdims", "64",
                       "--seqlens", "64", "--dtypes", "bf16", "--causal", "no",
                       "--impls", "cuflash,cuflash-softcap,jax-xla",
                       "--trees", f"{other},{root}"]) == 0
    data = json.loads((out / "sweep.json").read_text())
    names = [f"{n}@{t}" for n in ("cuflash", "cuflash-softcap") for t in (other, root)]
    for r in data["rows"]:
        assert list(r["results"]) == names + ["jax-xla"]
        assert all(r["results"][n]["tflops"] > 0 for n in names)
    modules = {n: m for n, m in sys.modules.items()
               if n.startswith("cuflash_tree") and "." not in n}
    assert {Path(m.__file__).parent.parent for m in modules.values()} == {other, root}
    assert modules["cuflash_tree0"]._compile.source_dir() == other / "kernels_cu"
    md = (out / "sweep.md").read_text()
    assert "## Trees" in md and f"`{root}` / `{other}`" in md


def test_jax_bench_dry_run(tmp_path, jax_cpu):
    out = tmp_path / "jax"
    assert jax_bench.main(["jax_bench.py", "--out", str(out), "--dry-run", "--headdims",
                           "64", "--seqlens", "64", "--causal", "yes"]) == 0
    data = json.loads((out / "jax.json").read_text())
    got = [(r["part"], r["call"], r["mode"]) for r in data["rows"]]
    assert got == [("sweep", None, "fwd"), ("sweep", None, "fwdbwd"), ("sweep", None, "bwd"),
                   *((("small", c, m) for c in ("fwd_small", "fwd_large")
                     for m in ("fwd", "fwdbwd", "bwd")))]
    assert all(r["results"]["cuflash-jax"].get("ms", 1) > 0 for r in data["rows"])
    assert "## small fwd: us per call" in (out / "jax.md").read_text()


@pytest.mark.parametrize("script", sorted(p.name for p in BENCH.glob("*.py")
                                          if p.name not in ("conftest.py", "test_bench.py",
                                                            "_common.py")))
def test_help(script):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, str(BENCH / script), "--help"], env=env,
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert "usage:" in done.stdout


def test_tiles_candidates_and_table():
    """bench/fwd_tiles.py: every head dim's candidates build a config, the table's choice is
    one of them, and the markdown marks it and shows gaps, ratios and differences."""
    import fwd_tiles
    bf16 = _common.DTYPES["bf16"]
    for hd, candidates in fwd_tiles.CANDIDATES.items():
        for seqlen, causal in itertools.product(fwd_tiles.SEQLENS, (False, True)):
            names = {fwd_tiles.config(spec, bf16, hd, seqlen, causal).name_expression
                     for _, spec in candidates}
            assert len(names) == len(candidates), (hd, seqlen)
            assert fwd_tiles.chosen_label(bf16, hd, seqlen, causal) in [
                label for label, _ in candidates]
    row = {"headdim": 256, "seqlen": 4096, "causal": True, "chosen": "sm90 80x2",
           "tflops": {"sm90 80x2": 500.0, "mma": 250.0}, "max_diff": {"mma": 0.5},
           "errors": {"sm90 64x2": "RuntimeError: no"}}
    row["ratio"] = {"sm90 80x2": 1.0, "mma": 0.5}
    text = fwd_tiles.markdown([row], "bf16")
    assert "| 4096 | yes | 500 (1.00)* | - | 250 (0.50) |" in text
    assert "mma 0.5" in text and "sm90 64x2: RuntimeError: no" in text


def test_ab_table_means_passes_and_ratios():
    """bench/ab_table.py: a pass's rows under its tree, the first of a repeated row only,
    failed entries left out, means over passes, this tree's ratio to the other."""
    import ab_table
    log = """=== pass 1: abtree
NVIDIA H100 80GB HBM3: cupy 14.2.0; implementations: cuflash, cuflash-det
[  1/2] fwd    bf16 hd64  full   seqlen  1024: TFLOP/s cuflash 300.0 | cuflash-det -
[  2/2] bwd    bf16 hd128 causal seqlen  4096: TFLOP/s cuflash 400.0 | cuflash-det 350.0
[  2/2] bwd    bf16 hd128 causal seqlen  4096: TFLOP/s cuflash 999.0 | cuflash-det 999.0
| 128 | yes | 4096 | 4 x 16 | 400.0 | 350.0 | - | - |
=== pass 1: .
[  1/2] fwd    bf16 hd64  full   seqlen  1024: TFLOP/s cuflash 330.0 | cuflash-det 310.0
[  2/2] bwd    bf16 hd128 causal seqlen  4096: TFLOP/s cuflash 420.0 | cuflash-det 360.0
=== pass 2: abtree
[  1/2] fwd    bf16 hd64  full   seqlen  1024: TFLOP/s cuflash 310.0 | cuflash-det 305.0
=== pass 2: .
[  1/2] fwd    bf16 hd64  full   seqlen  1024: TFLOP/s cuflash 350.0 | cuflash-det 315.0
""".splitlines()
    samples, trees = ab_table.parse(log)
    assert trees == ["abtree", "."]
    assert samples["fwd", "bf16", 64, "full", 1024, "cuflash"] == {"abtree": [300.0, 310.0],
                                                                   ".": [330.0, 350.0]}
    assert samples["fwd", "bf16", 64, "full", 1024, "cuflash-det"] == {"abtree": [305.0],
                                                                       ".": [310.0, 315.0]}
    assert samples["bwd", "bf16", 128, "causal", 4096, "cuflash"]["abtree"] == [400.0]
    text = ab_table.table(samples, trees, impls=["cuflash"], spread=True)
    assert "| fwd | bf16 | cuflash | 64 | full | 1024 | 305.0 (300-310) | 340.0 (330-350) " \
           "| 1.115 |" in text
    assert "| bwd | bf16 | cuflash | 128 | causal | 4096 | 400.0 | 420.0 | 1.050 |" in text
    assert "cuflash-det" not in text
    # --base: every other tree's ratio to it (here the base's to this tree's inverse).
    text = ab_table.table(samples, trees, impls=["cuflash"], base=".")
    assert "`abtree` / `.`" in text and "| 305.0 | 340.0 | 0.897 |" in text
    with pytest.raises(ValueError, match="base: no tree 'main'"):
        ab_table.table(samples, trees, base="main")


def test_ab_table_turns_means_both_orders():
    """bench/ab_table.py --turns: per row and implementation, this tree's ratio to each other
    tree in every sweep, and their geometric mean; failed entries left out."""
    import ab_table

    def sweep(this, other, det=None):
        results = {"cuflash@.": {"tflops": this}, "cuflash@abtree": {"tflops": other},
                   "cuflash-det@.": {"error": "x"}}
        if det:
            results["cuflash-det@abtree"] = {"tflops": det}
        return {"rows": [{"mode": "bwd", "dtype": "bf16", "headdim": 256, "causal": True,
                          "seqlen": 4096, "results": results}]}

    text = ab_table.turns_table([sweep(104.0, 100.0, 90.0), sweep(96.0, 100.0)])
    assert "| bwd | bf16 | cuflash | 256 | causal | 4096 | `. / abtree` | 1.040 0.960 " \
           "| 0.999 |" in text
    assert "cuflash-det" not in text


# ----------------------------------------------------------------- GPU: pytest-benchmark

@pytest.fixture(scope="module")
def inputs():
    """q, k, v, dout per (headdim, seqlen), made once and shared by the tests."""
    made = {}

    def get(headdim, seqlen):
        if (headdim, seqlen) not in made:
            batch, nheads = standard_shape(seqlen, headdim)
            made[headdim, seqlen] = make_inputs(ml_dtypes.bfloat16, batch, seqlen, nheads,
                                                headdim)
        return made[headdim, seqlen]

    return get


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["fwd", "bwd"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("seqlen", [1024, 4096])
@pytest.mark.parametrize("headdim", [64, 128])
def test_attention(benchmark, inputs, headdim, seqlen, causal, mode):
    import cupy

    import cuflash
    q, k, v, dout = inputs(headdim, seqlen)
    if mode == "fwd":
        def call():
            cuflash.attention_forward(q, k, v, causal=causal)
            cupy.cuda.Device().synchronize()
    else:
        out, lse = cuflash.attention_forward(q, k, v, causal=causal)

        def call():
            cuflash.attention_backward(dout, q, k, v, out, lse, causal=causal)
            cupy.cuda.Device().synchronize()

    benchmark.pedantic(call, warmup_rounds=WARMUP_ROUNDS, rounds=ROUNDS)
    batch, nheads = standard_shape(seqlen, headdim)
    benchmark.extra_info["tflops"] = (flops(mode, batch, nheads, seqlen, headdim, causal)
                                      / benchmark.stats["median"] / 1e12)
