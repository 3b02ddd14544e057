"""Record the GPU launches of cuflash's public API on a machine without a GPU.

Every call of :func:`cases` (a matrix of forward, backward, varlen, kvcache and merge
calls on CuPy arrays, on an sm_90 and an sm_80 device) runs against the fake CuPy of
tests/fake_cupy.py, which records each kernel launch: kernel, file, grid, block, dynamic
shared memory and the params struct's bytes, its pointers labelled by the role of the
array they point into (tests/fake_cupy.py says how). tests/test_launch_layer.py runs the
same matrix on the current tree and compares the launches with tests/data/launches.json.

launches.json was recorded from the old launch layer (cuflash/_launch.py and
cuflash/_dispatch.py, last present at commit 9646626). To regenerate it, from the
repository root:

    git worktree add /tmp/old 9646626        # or: mkdir /tmp/old && git archive 9646626 | tar -x -C /tmp/old
    PYTHONPATH=/tmp/old .venv/bin/python tests/data/record_launches.py --old > tests/data/launches.json
    git worktree remove /tmp/old

(``--old`` checks that the cuflash imported is the old layer: PYTHONPATH must come before
the editable install. The fake names the params fields with the library's own struct
mirrors, which the old layer has elsewhere: run the recorder and tests/fake_cupy.py of
commit 7fecacb, whose fake carried its own copy of the layouts of that time.) ``--new`` records the current tree the same way (to stdout), for
looking at a difference by hand. The old layer has no ``out=`` / ``lse=`` / ``dq=``
arguments, so the matrix does not use them; float32 kvcache calls (which gather keys with
fancy indexing, data the fake does not have) are not in it either.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for fake_cupy

import fake_cupy  # noqa: E402

BF16, FP16, F32 = fake_cupy.BF16, np.dtype(np.float16), np.dtype(np.float32)
DTYPES = {"bf16": BF16, "fp16": FP16, "f32": F32}
HEADDIMS = (32, 64, 96, 128, 192, 256, 40, 136)
ARCHS = {"sm_90": 0, "sm_80": 1}  # arch -> fake device id (fake_cupy.ARCHS)


# ---------------------------------------------------------------------------------------
# Arrays


def tensor(w, role, shape, dt, layout="contig"):
    """A fake CuPy array of ``shape`` (heads the second-to-last axis) whose allocation is
    named ``role``. Layouts: "contig"; "heads", a slice along the heads of a larger array
    (strided, rows 16-byte aligned); "misaligned", a view 8 bytes into its rows' storage
    (the pointer is not 16-byte aligned: the launch layers copy it); "oddstride", rows
    8 bytes longer than the head dim (strides not multiples of 16: copied); "bcast", a
    batch of one broadcast over the batch axis (batch stride 0)."""
    dt = np.dtype(dt)
    shape = tuple(shape)
    if layout == "contig":
        return w.array(shape, dt, role)
    if layout == "heads":
        base = w.array(shape[:-2] + (shape[-2] + 3, shape[-1]), dt, role)
        return base[..., 1:1 + shape[-2], :]
    pad = 8 // dt.itemsize
    if layout == "misaligned":
        base = w.array(shape[:-1] + (shape[-1] + 2 * pad,), dt, role)
        return base[..., pad:pad + shape[-1]]
    if layout == "oddstride":
        base = w.array(shape[:-1] + (shape[-1] + pad,), dt, role)
        return base[..., :shape[-1]]
    if layout == "bcast":
        one = w.array((1,) + shape[1:], dt, role)
        return w.module.broadcast_to(one, shape)
    raise ValueError(layout)


def returned(names, result):
    if not isinstance(result, tuple):
        result = (result,)
    return dict(zip(names, result))


# ---------------------------------------------------------------------------------------
# The matrix: (id, function(cuflash, world) -> {name: returned array})


def _opts(variant):
    """Keyword options of the variants that only set options (None for the others)."""
    return {
        "plain": {}, "causal": {"causal": True}, "window": {"window": (32, 8)},
        "softcap": {"softcap": 30.0},
        "scale": {"scale": 0.3, "causal": True},
    }.get(variant)


def dense_cases():
    """(tag, dtype, headdim, variant) of the dense forward and backward matrix."""
    out = [(dt, hd, "plain") for dt in DTYPES for hd in HEADDIMS]
    variants = ("causal", "window", "softcap", "scale", "alibi_h", "alibi_bh", "gqa",
                "17x300", "1025x97", "1x4096", "4096keys", "heads", "misaligned", "oddstride",
                "bcast")
    for dt, hd in (("bf16", 64), ("fp16", 128), ("fp16", 40)):
        out += [(dt, hd, v) for v in variants]
    out += [("f32", 64, v) for v in ("causal", "alibi_bh", "gqa", "heads", "misaligned")]
    return out


def _dense_arrays(w, dt, hd, variant):
    b, h, hkv, sq, sk = 2, 4, 4, 129, 257
    layout = "contig"
    opts = _opts(variant)
    if opts is None:
        opts = {}
        if variant == "gqa":
            h, hkv = 8, 2
            opts = {"causal": True}
        elif variant in ("17x300", "1025x97", "1x4096", "4096keys"):
            sq, sk = {"17x300": (17, 300), "1025x97": (1025, 97), "1x4096": (1, 4096),
                      "4096keys": (256, 4096)}[variant]
            b = 1 if variant == "1x4096" else 2
            opts = {"causal": variant == "17x300"}
        elif variant in ("heads", "misaligned", "oddstride", "bcast"):
            layout = variant
    qkv_layout = layout if layout != "bcast" else "contig"
    kv_layout = layout
    q = tensor(w, "q", (b, sq, h, hd), DTYPES[dt], qkv_layout)
    k = tensor(w, "k", (b, sk, hkv, hd), DTYPES[dt], kv_layout)
    v = tensor(w, "v", (b, sk, hkv, hd), DTYPES[dt], kv_layout)
    if variant == "alibi_h":
        opts = {"alibi_slopes": w.array((h,), F32, "alibi_slopes")}
    elif variant == "alibi_bh":
        opts = {"alibi_slopes": w.array((b, h), F32, "alibi_slopes"), "causal": True}
    return q, k, v, opts, qkv_layout


def forward_case(dt, hd, variant):
    def run(cf, w):
        q, k, v, opts, _ = _dense_arrays(w, dt, hd, variant)
        return returned(("out", "lse"), cf.attention_forward(q, k, v, **opts))
    return run


def backward_case(dt, hd, variant, deterministic):
    def run(cf, w):
        q, k, v, opts, layout = _dense_arrays(w, dt, hd, variant)
        b, sq, h, _ = q.shape
        out = tensor(w, "out", q.shape, q.dtype, layout)
        dout = tensor(w, "dout", q.shape, q.dtype, layout)
        lse = w.array((b, h, sq), F32, "lse")
        return returned(("dq", "dk", "dv"), cf.attention_backward(
            dout, q, k, v, out, lse, deterministic=deterministic, **opts))
    return run


def varlen_cases():
    """(dtype, headdim, variant, device prefix sums) of the varlen matrix."""
    out = [(dt, hd, "plain", dev) for dt, hd in (("bf16", 64), ("fp16", 128), ("f32", 96),
                                                 ("bf16", 40))
           for dev in (False, True)]
    out += [("fp16", 64, "causal_alibi", False), ("bf16", 128, "gqa", True),
            ("fp16", 96, "window", True), ("bf16", 64, "strided_cu", True),
            ("fp16", 128, "bound", True), ("bf16", 256, "softcap", False),
            ("fp16", 64, "heads", False)]
    return out


def _varlen_arrays(w, dt, hd, variant, device_cu):
    lq, lk = [5, 0, 130, 17], [40, 7, 300, 17]
    h, hkv = 4, 4
    opts = {}
    layout = "contig"
    if variant == "causal_alibi":
        opts = {"causal": True, "alibi_slopes": w.array((len(lq), h), F32, "alibi_slopes")}
    elif variant == "gqa":
        h, hkv = 8, 2
        opts = {"causal": True}
    elif variant == "window":
        opts = {"window": (64, 0)}
    elif variant == "softcap":
        opts = {"softcap": 20.0}
    elif variant == "heads":
        layout = "heads"
    tq, tk = sum(lq), sum(lk)
    q = tensor(w, "q", (tq, h, hd), DTYPES[dt], layout)
    k = tensor(w, "k", (tk, hkv, hd), DTYPES[dt], layout)
    v = tensor(w, "v", (tk, hkv, hd), DTYPES[dt], layout)
    cu = [np.concatenate([[0], np.cumsum(x)]).astype(np.int32) for x in (lq, lk)]
    max_q, max_k = max(lq), max(lk)
    if not device_cu:
        cu_q = w.name_host(cu[0], "cu_seqlens_q")
        cu_k = w.name_host(cu[1], "cu_seqlens_k")
    elif variant == "strided_cu":
        cu_q = w.array((2 * len(cu[0]),), np.int32, "cu_seqlens_q")[::2]
        cu_k = w.array((2 * len(cu[1]),), np.int32, "cu_seqlens_k")[::2]
    else:
        cu_q = w.array((len(cu[0]),), np.int32, "cu_seqlens_q")
        cu_k = w.array((len(cu[1]),), np.int32, "cu_seqlens_k")
    if variant == "bound":
        max_q, max_k = 512, 100000  # above the longest (device: launched for min(bound, total))
    return q, k, v, cu_q, cu_k, max_q, max_k, opts, layout


def varlen_forward_case(dt, hd, variant, device_cu):
    def run(cf, w):
        q, k, v, cu_q, cu_k, mq, mk, opts, _ = _varlen_arrays(w, dt, hd, variant, device_cu)
        return returned(("out", "lse"),
                        cf.attention_varlen_forward(q, k, v, cu_q, cu_k, mq, mk, **opts))
    return run


def varlen_backward_case(dt, hd, variant, device_cu, deterministic):
    def run(cf, w):
        q, k, v, cu_q, cu_k, mq, mk, opts, layout = _varlen_arrays(w, dt, hd, variant,
                                                                   device_cu)
        out = tensor(w, "out", q.shape, q.dtype, layout)
        dout = tensor(w, "dout", q.shape, q.dtype, layout)
        lse = w.array((q.shape[1], q.shape[0]), F32, "lse")
        return returned(("dq", "dk", "dv"), cf.attention_varlen_backward(
            dout, q, k, v, out, lse, cu_q, cu_k, mq, mk, deterministic=deterministic,
            **opts))
    return run


# (dtype, headdim, cache ("contig" / page size), append, cache_seqlens "int" / "array",
#  num_splits, extra)
KVCACHE = [
    ("bf16", 128, "contig", True, "int", None, "gqa"),
    ("bf16", 128, "contig", True, "int", 8, "gqa"),
    ("fp16", 64, 16, True, "array", None, ""),
    ("fp16", 64, 256, False, "array", 8, ""),
    ("bf16", 40, 16, False, "int", None, ""),
    ("bf16", 256, "contig", True, "array", 8, "causal_sq4"),
    ("fp16", 96, 256, True, "int", None, "softcap"),
    ("bf16", 128, "contig", False, "array", None, "alibi_h"),
    ("fp16", 128, 16, True, "array", None, "alibi_bh_window"),
    ("bf16", 64, "contig", True, "int", None, "b16"),
    ("fp16", 128, "contig", True, "int", None, "misaligned_q"),
    ("bf16", 192, 256, True, "array", 8, "causal_sq3"),
    ("fp16", 32, "contig", False, "int", 8, ""),
    ("bf16", 136, 16, True, "int", None, ""),
    ("fp16", 64, "contig", True, "array", None, "heads_cache"),
    ("bf16", 128, 256, False, "int", None, "long"),
    ("fp16", 128, 256, True, "array", 8, "gqa"),
    ("bf16", 64, 16, False, "array", 8, "gqa"),
]


def kvcache_case(dt, hd, cache, append, seqlens, splits, extra):
    def run(cf, w):
        b, sq, h, hkv, cap, snew = 2, 1, 4, 4, 1024, 2
        if "gqa" in extra:
            h, hkv = 8, 2
        if extra == "b16":
            b, h, hkv = 16, 32, 8
        if extra == "long":
            b, cap = 1, 16384
        if extra.startswith("causal_sq"):
            sq = int(extra[-1])
        opts = {}
        if "causal" in extra:
            opts["causal"] = True
        if extra == "softcap":
            opts["softcap"] = 50.0
        if extra == "alibi_h":
            opts["alibi_slopes"] = w.array((h,), F32, "alibi_slopes")
        if extra == "alibi_bh_window":
            opts.update(alibi_slopes=w.array((b, h), F32, "alibi_slopes"), window=(64, 0))
        q = tensor(w, "q", (b, sq, h, hd), DTYPES[dt],
                   "misaligned" if extra == "misaligned_q" else "contig")
        cache_layout = "heads" if extra == "heads_cache" else "contig"
        if cache == "contig":
            shape = (b, cap, hkv, hd)
            table = None
        else:
            blocks = cap // cache
            shape = (b * blocks + 3, cache, hkv, hd)
            table = w.array((b, blocks), np.int32, "block_table")
        k_cache = tensor(w, "k_cache", shape, DTYPES[dt], cache_layout)
        v_cache = tensor(w, "v_cache", shape, DTYPES[dt], cache_layout)
        k = v = None
        if append:
            k = tensor(w, "k_new", (b, snew, hkv, hd), DTYPES[dt])
            v = tensor(w, "v_new", (b, snew, hkv, hd), DTYPES[dt])
        lengths = 700 if cap == 1024 else cap - 100
        cache_seqlens = lengths if seqlens == "int" else \
            w.array((b,), np.int32, "cache_seqlens")
        return returned(("out", "lse"), cf.attention_with_kvcache(
            q, k_cache, v_cache, k=k, v=v, cache_seqlens=cache_seqlens, block_table=table,
            num_splits=splits, return_lse=True, **opts))
    return run


def merge_case(dt, hd, stacked):
    def run(cf, w):
        parts, b, sq, h = 3, 2, 5, 4
        if stacked:
            outs = w.array((parts, b, sq, h, hd), DTYPES[dt], "outs")
            lses = w.array((parts, b, h, sq), F32, "lses")
        else:
            outs = [w.array((b, sq, h, hd), DTYPES[dt], f"outs{i}") for i in range(parts)]
            lses = [w.array((b, h, sq), F32, f"lses{i}") for i in range(parts)]
        return returned(("out", "lse"), cf.merge_attention(outs, lses))
    return run


def cases():
    """Every call of the matrix: (id, device id, run)."""
    out = []
    for arch, device in ARCHS.items():
        def add(name, run):
            out.append((f"{arch}/{name}", device, run))
        for dt, hd, variant in dense_cases():
            add(f"fwd/{dt}/hd{hd}/{variant}", forward_case(dt, hd, variant))
        for dt, hd, variant in dense_cases():
            if variant in ("window", "1x4096", "scale"):
                continue
            add(f"bwd/{dt}/hd{hd}/{variant}", backward_case(dt, hd, variant, False))
        for dt in ("fp16", "bf16"):
            for hd in HEADDIMS:
                add(f"bwd_det/{dt}/hd{hd}/plain", backward_case(dt, hd, "plain", True))
        for hd, variant in ((64, "plain"), (40, "causal"), (128, "alibi_bh")):
            add(f"bwd_det/f32/hd{hd}/{variant}", backward_case("f32", hd, variant, True))
        for dt, hd, variant in (("bf16", 64, "gqa"), ("fp16", 128, "softcap"),
                                ("bf16", 40, "heads"), ("fp16", 64, "misaligned")):
            add(f"bwd_det/{dt}/hd{hd}/{variant}", backward_case(dt, hd, variant, True))
        for dt, hd, variant, dev in varlen_cases():
            cu = "devcu" if dev else "hostcu"
            add(f"varlen_fwd/{dt}/hd{hd}/{variant}/{cu}",
                varlen_forward_case(dt, hd, variant, dev))
            add(f"varlen_bwd/{dt}/hd{hd}/{variant}/{cu}",
                varlen_backward_case(dt, hd, variant, dev, False))
        for dt, hd, variant, dev in (("fp16", 64, "plain", True), ("bf16", 128, "gqa", False),
                                     ("f32", 96, "plain", True)):
            cu = "devcu" if dev else "hostcu"
            add(f"varlen_bwd_det/{dt}/hd{hd}/{variant}/{cu}",
                varlen_backward_case(dt, hd, variant, dev, True))
        for spec in KVCACHE:
            dt, hd, cache, append, seqlens, splits, extra = spec
            name = (f"kvcache/{dt}/hd{hd}/{'contig' if cache == 'contig' else f'page{cache}'}"
                    f"/{'append' if append else 'noappend'}/seqlens_{seqlens}/splits{splits}"
                    + (f"/{extra}" if extra else ""))
            add(name, kvcache_case(*spec))
        for dt in DTYPES:
            for hd, stacked in ((64, True), (40, False)):
                add(f"merge/{dt}/hd{hd}/{'stacked' if stacked else 'list'}",
                    merge_case(dt, hd, stacked))
    return out


# ---------------------------------------------------------------------------------------
# Running


def describe(x):
    return [list(x.shape), list(x.strides), str(x.dtype), x.device.id]


class Maker:
    """What a case makes its arrays with: ``world``'s, on ``device`` (the library's own
    allocations go to the current device, which stays 0: calls on device 1 must make
    their device current, and an allocation on the wrong device shows in its label)."""

    def __init__(self, world, device):
        self.world, self.device, self.module = world, device, world.module

    def array(self, shape, dtype, role):
        with self.world.on(self.device):
            return self.world.array(shape, dtype, role)

    def name_host(self, array, role):
        return self.world.name_host(array, role)


def run_call(cf, world, device, run):
    """One call: (JSON-able call record, launch records with their scratch details)."""
    world.begin_call()
    error, result = None, {}
    try:
        result = run(cf, Maker(world, device))
    except Exception as e:  # recorded: the other layer must fail the same way
        error = f"{type(e).__name__}: {e}"
    launches = world.finish_call(result)
    record = {"launches": [{k: v for k, v in launch.items() if k != "_scratch"}
                           for launch in launches],
              "returns": {name: describe(x) for name, x in result.items()}}
    if error:
        record["error"] = error
    return record, launches


def record_all(cf, world):
    """Run the matrix with ``world`` installed; [(id, record, launches)]."""
    out = []
    for call_id, device, run in cases():
        record, launches = run_call(cf, world, device, run)
        out.append((call_id, record, launches))
    return out


def dump(results, source: str) -> str:
    lines = [json.dumps({"id": call_id, **record}, separators=(",", ":"))
             for call_id, record, _ in results]
    return ('{"format": 1, "recorded_from": ' + json.dumps(source) + ', "calls": [\n'
            + ",\n".join(lines) + "\n]}\n")


def main(argv):
    if len(argv) != 1 or argv[0] not in ("--old", "--new"):
        sys.exit(__doc__)
    world = fake_cupy.World()
    with fake_cupy.installed(world):
        import cuflash
        layer = "old" if _has_module("cuflash._launch") else "new"
        if "--" + layer != argv[0]:
            sys.exit(f"{argv[0]} asked for, but {cuflash.__file__} has the {layer} launch "
                     f"layer (check PYTHONPATH)")
        results = record_all(cuflash, world)
    source = f"{layer} launch layer at {Path(cuflash.__file__).parent.parent}"
    sys.stdout.write(dump(results, source))
    errors = sum(1 for _, r, _ in results if "error" in r)
    print(f"{len(results)} calls, "
          f"{sum(len(r['launches']) for _, r, _ in results)} launches, {errors} errors",
          file=sys.stderr)


def _has_module(name):
    import importlib.util
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


if __name__ == "__main__":
    main(sys.argv[1:])
