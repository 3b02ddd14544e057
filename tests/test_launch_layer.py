"""The launch layer (cuflash/_core.py, cuflash/ops/) launches exactly what the old one did.

No GPU needed: tests/fake_cupy.py stands in for CuPy and records every launch (kernel,
grid, block, dynamic shared memory, params struct bytes with pointers labelled by the role
of the array they point into). tests/data/launches.json holds the launches of the old
layer (cuflash/_launch.py + _dispatch.py, commit 9646626) for the call matrix of
tests/data/record_launches.py, which says how to regenerate it; this file runs the same
matrix on the current tree and compares record for record.

Legitimate differences, excluded from the comparison (each with its reason):

* Scratch and counter pointers (lse_log2, delta, dq_accum, o_accum, lse_accum,
  split_counter, tile_counter) are compared as "nonzero or 0" only: the new backward
  allocates its float32 scratch as one block (lse_log2, delta at +align256(4 rows),
  dq_accum after) where the old made three arrays, the new decode one block (o_accum,
  lse_accum) where the old made two, and the counters of the forward and of decoding are
  one per-stream array from ``_core.counters`` where the old kept two malloc'd ones.
  ``test_scratch_regions_hold_the_old_allocations`` checks their sizes and disjointness.
* append_kv and flash_decode share one DecodeParams record in the new layer (the old
  filled one per launch): ``_APPEND_UNREAD`` are the fields append_kv never reads
  (kernels_cu/flash_decode.cu), which now carry the decode's values; ``_DECODE_UNREAD``
  those flash_decode never reads (the new keys, which the append has already written),
  which now carry the append's. Both kernels read everything else, which must match.
* A kernel needing more shared memory than the device's opt-in limit (bwd_main at head
  dim 256 on sm_80: 203264 bytes > 163 KiB): the old layer launched what came before it
  and then failed when the driver refused the attribute (CUDADriverError, as the fake
  driver refuses it too); the new one plans tiles that fit the device (backward.py's
  SMALL_TILES). Such calls compare by the new launches' shared memory alone, which must
  fit the device (tests/test_tiles.py checks the tiles themselves).
* bwd_main_f32 takes its streamed rows per step as a template argument (BLOCK_R, 32
  wherever the old layer ran it), bwd_sm90 its keys a CTA (128 wherever the old layer ran
  it) and a score-modifier flag (false wherever the old layer ran it): old names compare
  with those arguments inserted.
* The Hopper backward runs soft-cap, ALiBi and deterministic mode since
  docs/notes/backward.md's "score modifiers on wgmma" and "deterministic on wgmma": where
  the new layer runs bwd_sm90 on sm_90 and the old one did not, the main and dQ-conversion
  launches compare by kernel family alone (the preprocess as usual). BwdParams gained
  dq_semaphore at its end, which must be null wherever the old layer's launches compare,
  and after it l2_section (the Hopper backward's CTA order), which they do not read.
* The Hopper forward changed on purpose since (docs/notes/forward.md, v4-v6): it runs
  every fp16/bf16 head dim (the old layer: only those padded to 64 or 128), with new tiles
  and template arguments. Where the new layer launches flash_fwd_sm90 (or its clusters) on
  sm_90 in place of the old one's flash_fwd or flash_fwd_sm90, that launch compares by its
  kernel family alone (its params struct is proven against the CUDA source by the compile
  check); the call's other launches compare as usual.
* The Hopper backward is warp-specialized since docs/notes/backward.md's "v3 step 1": a
  producer warpgroup beside the two MMA warpgroups, 384 threads where the old ran 256.
  bwd_sm90 launches compare with the old block taken as that of its two-warpgroup tiles
  (``backward.SM90_TILES``).
* Its shared memory changed on purpose since "v3 step 2" (a third dS^T buffer at head dim
  128): bwd_sm90 launches compare without it (the compile check proves the planned bytes
  equal to BwdSm90Traits::SMEM_BYTES).
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest

import fake_cupy

DATA = Path(__file__).parent / "data"
_spec = importlib.util.spec_from_file_location("record_launches",
                                               DATA / "record_launches.py")
record_launches = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(record_launches)

_APPEND_UNREAD = ("o", "o_batch_stride", "o_row_stride", "o_head_stride", "lse", "o_accum",
                  "lse_accum", "split_counter", "num_splits", "m_blocks", "nheads_kv",
                  "group")
_DECODE_UNREAD = ("k_new", "v_new", "kn_batch_stride", "kn_row_stride", "kn_head_stride",
                  "vn_batch_stride", "vn_row_stride", "vn_head_stride")
# Kernels that read each counter (their need: bytes, from the launch)
# The Hopper forward's kernels, one CTA or clusters of two.
_HOPPER_FWD = ("cuflash::flash_fwd_sm90<", "cuflash::flash_fwd_sm90_cluster<")
_COUNTER_READERS = {"tile_counter": "cuflash::flash_fwd_sm90",
                    "split_counter": "cuflash::flash_decode"}


def _unread_words(name: str) -> set:
    """Word indices of the params struct that kernel ``name`` does not read."""
    base = name.split("<", 1)[0]
    fields = {"cuflash::append_kv": _APPEND_UNREAD,
              "cuflash::flash_decode": _DECODE_UNREAD}.get(base, ())
    _, dtype = fake_cupy.struct_of(name)
    words = set()
    for path, off, size, _ in fake_cupy.leaves(dtype):
        if path.split(".")[0].split("[")[0] in fields:
            words.update(range(off // 8, (off + size - 1) // 8 + 1))
    return words


@contextlib.contextmanager
def isolated_state():
    """cuflash's module state (memoized calls and plans, counters, cached device facts)
    empty inside, and as it was after: the fake's devices, addresses and kernels must not
    leak into other tests (or theirs into these)."""
    from cuflash import _api, _compile, _core, ops
    containers = [getattr(_api, "CALLS", None)] + [
        getattr(_core, n, None) for n in ("_COUNTERS", "_SHARED_LIMIT", "_GRAPH_SCRATCH",
                                          "_KEEP", "_RETIRED")]
    containers = [c for c in containers if c is not None]
    caches = [getattr(m, n, None) for m, n in (
        (_compile, "device_arch"), (_core, "num_sms"), (_core, "shared_memory_limit"),
        (ops.forward, "plan"),
        (ops.backward, "plan"), (ops.decode, "plan"), (ops.merge, "plan"),
        (ops.varlen_check, "plan"))]
    caches = [c for c in caches if hasattr(c, "cache_clear")]
    saved = [c.copy() for c in containers]

    def clear():
        for c in containers:
            c.clear()
        for c in caches:
            c.cache_clear()

    clear()
    try:
        yield
    finally:
        clear()
        for c, s in zip(containers, saved):
            c.update(s) if isinstance(c, dict) else c.extend(s)


@contextlib.contextmanager
def fake_gpu():
    world = fake_cupy.World()
    with fake_cupy.installed(world), isolated_state():
        import cuflash
        yield cuflash, world


@pytest.fixture(scope="module")
def golden():
    return {call["id"]: call for call in
            json.loads((DATA / "launches.json").read_text())["calls"]}


@pytest.fixture(scope="module")
def recorded():
    with fake_gpu() as (cuflash, world):
        return {call_id: (record, launches) for call_id, record, launches in
                record_launches.record_all(cuflash, world)}


# ---------------------------------------------------------------------------------------


def _params_diffs(name, old: str, new: str, ignore=()):
    """(field, old, new) of the words that differ, the kernel's unread words and the fields
    ``ignore`` names excepted."""
    family, dtype = fake_cupy.struct_of(name)
    old_w, new_w = old.split(), new.split()
    if family == "bwd" and len(new_w) == len(old_w) + 2:
        # BwdParams ends in dq_semaphore (null unless a deterministic Hopper plan) and
        # l2_section (the Hopper kernels' CTA order) now.
        if "dq_semaphore" not in ignore and not _is_zero_word(new_w[-2]):
            return [("dq_semaphore", None, new_w[-2])]
        new_w = new_w[:-2]
    if len(old_w) != len(new_w):
        return [("params size", f"{8 * len(old_w)} bytes", f"{8 * len(new_w)} bytes")]
    skip = _unread_words(name)
    out = []
    for i, (a, b) in enumerate(zip(old_w, new_w)):
        a = _as_recorded_now(dtype, i, a)
        if a == b or i in skip:
            continue
        fa = fake_cupy.decode_word_fields(dtype, i, a)
        fb = fake_cupy.decode_word_fields(dtype, i, b)
        changed = [path for path in fa if fa[path] != fb[path]]
        out += [(path, fa[path], fb[path]) for path in changed if path not in ignore]
        if not changed:  # e.g. padding
            out.append((f"word {i}", a, b))
    return out


def _as_recorded_now(dtype, word: int, token: str) -> str:
    """An old record's word as fake_cupy renders it now: words that are not one 8-byte field
    (two int32, say) are numbers even where they equal an address, which the old records
    wrote as the first allocation's label (q, at fake_cupy.BASE0)."""
    fields = fake_cupy.fields_in_word(dtype, word)
    whole = any(off == 8 * word and size == 8 for _, off, size, _ in fields)
    match = re.fullmatch(r"@q\+(\d+)(@dev\d+)?", token)
    return format(fake_cupy.BASE0 + int(match[1]), "x") if match and not whole else token


def _is_zero_word(word: str) -> bool:
    return word.strip("0") in ("", "x") or word == "null"


def _refused_shared_memory(old: dict) -> bool:
    """Whether the driver refused the old layer's shared-memory attribute in this call."""
    err = old.get("error") or ""
    return err.startswith("CUDADriverError") and "max dynamic shared memory" in err


def _renamed(name: str) -> str:
    """An old layer's bwd_main_f32<D, MODE> as bwd_main_f32<D, 32, MODE>, and its
    bwd_sm90<T, D, BR[, true]> (no score options) as bwd_sm90<T, D, 128, BR, 0[, true]>."""
    name = re.sub(r"^(cuflash::bwd_main_f32<\d+), ", r"\1, 32, ", name)
    return re.sub(r"^(cuflash::bwd_sm90<[^,]+, \d+)(, \d+)", r"\1, 128\2, 0", name)


def compare_call(call_id, old: dict, new: dict) -> list:
    """Messages naming the call, launch and field of every difference."""
    from cuflash.ops import tiles
    old_err, new_err = old.get("error"), new.get("error")
    if _refused_shared_memory(old):
        limit = tiles.shared_limit(call_id.split("/")[0])
        return [f"{call_id}: {x['name']}: {x['shared']} bytes of shared memory > {limit}"
                for x in new["launches"] if x["shared"] > limit] + \
            ([f"{call_id}: error {new_err!r}"] if new_err else [])
    msgs = []
    if (old_err is None) != (new_err is None) or \
            (old_err and old_err.split(":")[0] != new_err.split(":")[0]):
        msgs.append(f"{call_id}: error: old {old_err!r}, new {new_err!r}")
    if old["returns"] != new["returns"]:
        msgs.append(f"{call_id}: returned arrays [shape, strides, dtype, device]: old "
                    f"{old['returns']}, new {new['returns']}")
    lo = [dict(x, name=_renamed(x["name"])) for x in old["launches"]]
    ln = new["launches"]
    ignore = ()
    if call_id.startswith("sm_90/"):
        moved = [i for i, (a, b) in enumerate(zip(lo, ln))
                 if a["name"].startswith("cuflash::flash_fwd")
                 and b["name"].startswith(_HOPPER_FWD)]
        lo = [x for i, x in enumerate(lo) if i not in moved]
        ln = [x for i, x in enumerate(ln) if i not in moved]
        hopper_bwd = ("cuflash::bwd_sm90<", "cuflash::bwd_sm90_wide<",
                      "cuflash::bwd_convert_dq_sm90<")
        if any(x["name"].startswith(hopper_bwd) for x in ln) and \
                not any(x["name"].startswith(hopper_bwd) for x in lo):
            main = hopper_bwd + ("cuflash::bwd_main<", "cuflash::bwd_convert_dq<")
            lo = [x for x in lo if not x["name"].startswith(main)]
            ln = [x for x in ln if not x["name"].startswith(main)]
            # the preprocess zeroes the Hopper's dq_accum, rows of its kernel's head dim
            ignore = ("dq_accum", "dq_semaphore", "headdim_pad")
    if [x["name"] for x in lo] != [x["name"] for x in ln]:
        msgs.append(f"{call_id}: kernels: old {[x['name'] for x in lo]}, new "
                    f"{[x['name'] for x in ln]}")
        return msgs
    for i, (a, b) in enumerate(zip(lo, ln)):
        where = f"{call_id} launch {i} ({a['name']})"
        if a["name"].startswith("cuflash::bwd_sm90<"):
            from cuflash.ops import backward
            a = dict(a, block=[backward.SM90_TILES[64].threads, 1, 1], shared=b.get("shared"))
        for key in ("file", "grid", "block", "shared", "smem_attr_ok", "on_device", "stream",
                    "error"):
            if a.get(key) != b.get(key):
                msgs.append(f"{where}: {key}: old {a.get(key)!r}, new {b.get(key)!r}")
        for field, va, vb in _params_diffs(a["name"], a["params"], b["params"], ignore):
            msgs.append(f"{where}: params.{field}: old {va!r}, new {vb!r}")
    return msgs


def _report(msgs, limit=80):
    head = "\n".join(msgs[:limit])
    more = f"\n... and {len(msgs) - limit} more" if len(msgs) > limit else ""
    return f"{len(msgs)} differences from the old launch layer:\n{head}{more}"


def test_matrix_is_the_recorded_one(golden, recorded):
    assert list(golden) == list(recorded), \
        "the call matrix changed: regenerate tests/data/launches.json (see its recorder)"
    assert 300 <= len(golden) <= 600
    failed = {i: c["error"] for i, c in golden.items() if "error" in c}
    assert all(i.startswith("sm_80/") and "bwd" in i and "/hd256/" in i and
               "max dynamic shared memory" in e for i, e in failed.items()), failed


def test_launches_match_old_layer(golden, recorded):
    msgs = []
    for call_id, old in golden.items():
        if call_id in recorded:
            msgs += compare_call(call_id, old, recorded[call_id][0])
    assert not msgs, _report(msgs)


def test_scratch_regions_hold_the_old_allocations(golden, recorded):
    """Each scratch pointer of a launch (the fields compared as nonzero only) starts a
    region, up to the next scratch pointer of the launch in the same allocation or to its
    end, at least as large as the old layer's allocation for it (so the backward's
    lse_log2, delta and dq_accum, and decoding's o_accum and lse_accum, do not overlap);
    counters hold what their kernel uses (2 int32 tile counters; an int32 per CTA group
    of flash_decode) in zeroed memory; no scratch allocation is one the launch also
    passes as an argument or output. (Calls the old layer refused for shared memory run
    other tiles now: nothing to compare.)"""
    msgs = []
    for call_id, old in golden.items():
        if call_id not in recorded or _refused_shared_memory(old):
            continue
        record, launches = recorded[call_id]
        for i, (a, b) in enumerate(zip(old["launches"], launches)):
            if a["name"] != b["name"]:
                break
            where = f"{call_id} launch {i} ({a['name']})"
            base = a["name"].split("<", 1)[0]
            skip = _APPEND_UNREAD if base == "cuflash::append_kv" else ()
            labels = {w[1:].rsplit("+", 1)[0] for w in b["params"].split()
                      if w.startswith("@")}
            for field, old_size in a.get("regions", {}).items():
                if field in skip:
                    continue
                detail = b["_scratch"].get(field)
                if detail is None:
                    msgs.append(f"{where}: {field} points into no allocation")
                    continue
                alloc, offset = detail
                size = b["regions"][field]
                if field in fake_cupy.COUNTERS:
                    if base != _COUNTER_READERS[field]:
                        continue
                    need = 8 if field == "tile_counter" else \
                        4 * (b["grid"][0] // _num_splits(b["params"]))
                    if size < need or not alloc.zeroed:
                        msgs.append(f"{where}: {field}: {size} bytes "
                                    f"(zeroed: {alloc.zeroed}), the kernel uses {need}")
                elif size < old_size:
                    msgs.append(f"{where}: {field}: a region of {size} bytes (at +{offset} "
                                f"of a {alloc.size}-byte allocation), old allocation "
                                f"{old_size} bytes")
                if alloc.role is not None or alloc.label(alloc.base).rsplit("+", 1)[0] \
                        in labels:
                    msgs.append(f"{where}: {field} is in {alloc.label(alloc.base)}, "
                                f"an array of the call")
    assert not msgs, _report(msgs)
    bwd = [launches[0]["regions"] for call_id, (_, launches) in recorded.items()
           if "/bwd" in call_id and launches]
    assert bwd and all(set(r) >= {"lse_log2", "delta"} for r in bwd)


def _num_splits(params: str) -> int:
    from cuflash import ops
    off = fake_cupy.field_offset(ops.decode.PARAMS, "num_splits.d")
    word = params.split()[off // 8]
    return int(fake_cupy.decode_word_fields(ops.decode.PARAMS, off // 8, word)["num_splits.d"])


# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", [1, 0], ids=["sm_80", "sm_90"])
def test_forward_with_out_and_lse_allocates_nothing(device):
    with fake_gpu() as (cuflash, world):
        mk = record_launches.Maker(world, device)
        q, k, v = (mk.array((2, 300, 4, 64), fake_cupy.BF16, n) for n in "qkv")

        def call():
            out = mk.array((2, 300, 4, 64), fake_cupy.BF16, "out")
            lse = mk.array((2, 4, 300), np.float32, "lse")
            world.begin_call()
            got = cuflash.attention_forward(q, k, v, causal=True, out=out, lse=lse)
            assert got[0] is out and got[1] is lse
            assert len(world.launches) == 1
            return world.events

        first = call()
        # The Hopper forward's tile counters: one zeroed array per stream, made outside
        # CuPy's pool (runtime.malloc) on the stream's first launch and kept, as the old
        # layer's was. Nothing else, and nothing at all from then on.
        assert first == ([] if device == 1 else [("malloc", 4096)])
        assert call() == []


def test_counters_are_zero_before_any_stream_runs():
    """Counters are zero when ``counters`` returns, whatever stream launches next: a
    memset left queued on the legacy stream would race a non-blocking stream's kernel
    (XLA's stream, a capture stream)."""
    with fake_gpu() as (cuflash, world):
        stream = world.module.cuda.Stream(non_blocking=True)
        ptr = cuflash._core.counters(0, stream.ptr, 2)
        assert world.find(ptr).zeroed and not world.queued


def _spies(monkeypatch, cuflash):
    counts = {}
    for module, name in ((cuflash._checks, "check_qkv"), (cuflash._checks, "check_varlen"),
                         (cuflash.kvcache, "check_kvcache")):
        real = getattr(module, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            counts[_name] = counts.get(_name, 0) + 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(module, name, spy)
    return counts


def _memo_calls():
    """(name, spied check, function(cuflash, maker) -> a call to make twice)."""
    def forward(cf, mk):
        q, k, v = (mk.array((2, 129, 4, 128), np.float16, n) for n in "qkv")
        out = mk.array((2, 129, 4, 128), np.float16, "out")
        lse = mk.array((2, 4, 129), np.float32, "lse")
        return lambda: record_launches.returned(("out", "lse"), cf.attention_forward(
            q, k, v, causal=True, out=out, lse=lse))

    def backward(cf, mk):
        return _same_arrays(cf, mk, record_launches.backward_case("bf16", 64, "gqa", False))

    def varlen(cf, mk):
        run = record_launches.varlen_forward_case("fp16", 128, "plain", True)
        return _same_arrays(cf, mk, run)

    def kvcache(cf, mk):
        run = record_launches.kvcache_case("bf16", 128, 16, True, "array", None, "gqa")
        return _same_arrays(cf, mk, run)

    return [("forward", "check_qkv", forward), ("backward", "check_qkv", backward),
            ("varlen forward (device prefix sums)", "check_varlen", varlen),
            ("kvcache (paged, append)", "check_kvcache", kvcache)]


def _same_arrays(cf, mk, run):
    """A call of ``run`` that makes its arrays once: the same arrays on every call."""
    arrays = {}
    real = mk.array

    def array(shape, dtype, role):
        if role not in arrays:
            arrays[role] = real(shape, dtype, role)
        return arrays[role]

    mk.array = array
    return lambda: run(cf, mk)


@pytest.mark.parametrize("name,check,make", _memo_calls(), ids=[c[0] for c in _memo_calls()])
@pytest.mark.parametrize("device", [0, 1], ids=["sm_90", "sm_80"])
def test_second_identical_call_hits_the_memo(monkeypatch, name, check, make, device):
    with fake_gpu() as (cuflash, world):
        counts = _spies(monkeypatch, cuflash)
        call = make(cuflash, record_launches.Maker(world, device))
        runs = []
        for _ in range(2):
            world.begin_call()
            result = call()
            raw = [(x["kernel"].name, x["grid"], x["block"], x["shared"], x["raw"])
                   for x in world.launches]
            runs.append((counts.get(check, 0), raw, world.finish_call(result)))
        (n1, raw1, rec1), (n2, raw2, rec2) = runs
        assert n1 == 1 and n2 == 1, f"{check} ran {n1} then {n2 - n1} times"
        strip = lambda rec: [{k: v for k, v in x.items() if k != "_scratch"}  # noqa: E731
                             for x in rec]
        assert rec1 and strip(rec1) == strip(rec2)
        if name == "forward":  # every array the caller's: the very same bytes
            assert raw1 == raw2


def test_one_int_cache_length_is_written_per_call_and_checked_on_a_memo_hit(monkeypatch):
    """A decode loop with one int ``cache_seqlens`` for every item: its value is a field the
    call writes, not part of the memo's key, so each step reuses the memoized launch; and a
    memo hit still refuses a length the cache cannot hold."""
    with fake_gpu() as (cuflash, world):
        counts = _spies(monkeypatch, cuflash)
        mk = record_launches.Maker(world, 0)
        q = mk.array((2, 1, 8, 128), fake_cupy.BF16, "q")
        k_cache, v_cache = (mk.array((2, 512, 2, 128), fake_cupy.BF16, n)
                            for n in ("k_cache", "v_cache"))
        k, v = (mk.array((2, 1, 2, 128), fake_cupy.BF16, n) for n in "kv")
        from cuflash import ops
        off = fake_cupy.field_offset(ops.decode.PARAMS, "cache_seqlen")
        seen = []
        for length in (7, 8, 300):
            world.begin_call()
            cuflash.attention_with_kvcache(q, k_cache, v_cache, k=k, v=v, cache_seqlens=length)
            seen.append({int.from_bytes(x["raw"][off:off + 4], "little", signed=True)
                         for x in world.launches})
        assert seen == [{7}, {8}, {300}]
        assert counts["check_kvcache"] == 1
        with pytest.raises(ValueError, match=r"cache_seqlens \(512\) \+ seqlen_new \(1\)"):
            cuflash.attention_with_kvcache(q, k_cache, v_cache, k=k, v=v, cache_seqlens=512)


def test_a_list_window_runs_on_the_gpu_path_without_a_memo():
    """A ``window`` given as a list is valid; it cannot key the memo, so each such call
    takes the full path, and launches what the tuple would."""
    with fake_gpu() as (cuflash, world):
        mk = record_launches.Maker(world, 0)
        q, k, v, out = (mk.array((1, 97, 4, 64), fake_cupy.BF16, n) for n in "qkvo")
        lse = mk.array((1, 4, 97), np.float32, "lse")
        records = []
        for window in ([16, 0], [16, 0], (16, 0)):
            world.begin_call()
            cuflash.attention_forward(q, k, v, window=window, out=out, lse=lse)
            records.append([x["raw"] for x in world.launches])
        assert records[0] == records[1] == records[2]


def _hopper_backward_maps(run):
    """The BwdSm90Maps bytes of the Hopper backward launch of ``run`` (on device 0)."""
    with fake_gpu() as (cuflash, world):
        world.begin_call()
        run(cuflash, record_launches.Maker(world, 0))
        main = [x for x in world.launches
                if x["kernel"].name.startswith(("cuflash::bwd_sm90<", "cuflash::bwd_sm90_wide<"))]
        assert len(main) == 1
        return main[0]["second"]


@pytest.mark.parametrize("hd", [64, 128, 256])
def test_hopper_backward_hands_its_producer_tma_maps_of_q_and_dout(hd):
    """A dense call's maps: q's then dout's (the fake encoder puts the address first, then
    the dims (head dim, seqlen, heads, batch), byte strides (seqlen, heads, batch) and box
    (64 columns x the kernel's query rows a step)), and ``on``."""
    def run(cf, mk):
        q, k, v, out = (mk.array((2, 129, 4, hd), np.float16, n) for n in ("q", "k", "v", "out"))
        dout = record_launches.tensor(mk, "dout", (2, 129, 4, hd), np.float16, "heads")
        lse = mk.array((2, 4, 129), np.float32, "lse")
        cf.attention_backward(dout, q, k, v, out, lse)
        run.arrays = q, dout

    second = _hopper_backward_maps(run)
    from cuflash.ops import backward
    assert len(second) == backward.SM90_MAPS.itemsize
    words = np.frombuffer(second[:256], np.uint64)
    rows = {64: backward.SM90_TILES[64].block_r, 128: backward.SM90_TILES[128].block_r,
            256: backward.SM90_WIDE_KEYS}[hd]
    for i, x in enumerate(run.arrays):  # dout head-major: strides of its own
        map_words = words[16 * i:16 * i + 16]
        assert map_words[0] == x.data.ptr
        assert list(map_words[3:7]) == [hd, 129, 4, 2]
        assert list(map_words[7:10]) == [x.strides[1], x.strides[2], x.strides[0]]
        assert list(map_words[10:14]) == [64, rows, 1, 1]
    assert np.frombuffer(second[256:260], np.int32)[0] == 1


def test_hopper_backward_loads_by_cp_async_where_the_driver_refuses_a_map():
    """The driver refusing to encode a map (the call's layouts are TMA's, as the checks'
    copies make them): no maps, ``on`` 0."""
    from cuflash import _tma
    calls = []

    def run(cf, mk):
        fake = _tma._encode_tiled  # the fake world's, put back for its own restore
        _tma._encode_tiled = lambda: lambda *args: calls.append(args) or 1
        try:
            q, k, v, out, dout = (mk.array((2, 129, 4, 128), np.float16, n)
                                  for n in ("q", "k", "v", "out", "dout"))
            cf.attention_backward(dout, q, k, v, out, mk.array((2, 4, 129), np.float32, "lse"))
        finally:
            _tma._encode_tiled = fake

    second = _hopper_backward_maps(run)
    assert calls and second == bytes(len(second))


def test_hopper_varlen_backward_loads_by_cp_async():
    """Varlen (rows past an item must read as zeros, not as the next item's): ``on`` 0."""
    run = record_launches.varlen_backward_case("fp16", 128, "plain", False, False)
    second = _hopper_backward_maps(run)
    assert second == bytes(len(second))


def test_tma_maps_encode_once_per_address_tuple_and_remember_refusals():
    """``_tma.Maps``, the forward's and the backward's map cache: one encode per maker and
    address tuple, the tail after the maps, a refusal (None) kept too, at most 64 tuples."""
    from cuflash import _tma
    calls = []

    def maker(tag):
        return lambda ptr: calls.append((tag, ptr)) or (None if ptr == 0 else bytes([tag]) * 2)

    maps = _tma.Maps((maker(1), maker(2)), b"!")
    assert maps(16, 32) == b"\x01\x01\x02\x02!" and maps(16, 32) == b"\x01\x01\x02\x02!"
    assert calls == [(1, 16), (2, 32)]
    assert maps(0, 32) is None and maps(0, 32) is None and len(calls) == 4
    for ptr in range(1, 100):
        maps(16 * ptr, 32)
    calls.clear()
    maps(16 * 99, 32)  # among the kept
    assert calls == []
    maps(16, 32)  # dropped when the cache was full
    assert calls == [(1, 16), (2, 32)]


def _hopper_forward_o(hd, refuse_out=False):
    """The tma_o bytes and o_by_tma of a dense Hopper forward launch (device 0) with ``out=``
    given, the driver refusing out's map where ``refuse_out``; and out."""
    from cuflash import _tma
    from cuflash.ops import forward
    with fake_gpu() as (cuflash, world):
        mk = record_launches.Maker(world, 0)
        q, k, v, out = (mk.array((2, 129, 4, hd), np.float16, n) for n in ("q", "k", "v", "out"))
        fake = _tma._encode_tiled  # the fake world's, put back for its own restore
        encode = fake()
        if refuse_out:
            _tma._encode_tiled = lambda: lambda *a: 1 if a[3] == out.data.ptr else encode(*a)
        try:
            world.begin_call()
            cuflash.attention_forward(q, k, v, out=out)
        finally:
            _tma._encode_tiled = fake
        [raw] = [x["raw"] for x in world.launches
                 if x["kernel"].name.startswith(_HOPPER_FWD)]
        at = forward.SM90_PARAMS.fields
        o_map = raw[at["tma_o"][1]:at["tma_o"][1] + _tma.MAP_BYTES]
        flag = int.from_bytes(raw[at["o_by_tma"][1]:at["o_by_tma"][1] + 4], "little")
        return o_map, flag, out


@pytest.mark.parametrize("hd", [64, 128, 256])
def test_hopper_forward_stores_o_by_tma_where_o_is_staged(hd):
    """A staged O tile (two consumers: in the Q tile up to head dim 128, in V's stages at
    256) leaves by TMA: O's map (out's address, dims and strides, boxes of 64 columns x 64
    rows) and o_by_tma 1."""
    o_map, flag, out = _hopper_forward_o(hd)
    words = np.frombuffer(o_map, np.uint64)
    assert flag == 1 and words[0] == out.data.ptr
    assert list(words[3:7]) == [hd, 129, 4, 2]
    assert list(words[7:10]) == [out.strides[1], out.strides[2], out.strides[0]]
    assert list(words[10:14]) == [64, 64, 1, 1]


def test_hopper_forward_stores_o_without_tma_where_the_driver_refuses_out():
    """q, k and v mapped, out refused: the Hopper kernel still runs, O by 16-byte stores."""
    o_map, flag, _ = _hopper_forward_o(128, refuse_out=True)
    assert flag == 0 and o_map == bytes(len(o_map))


def test_hopper_forward_clusters_launch_whole_clusters():
    """hd128 without a left window runs in clusters of two (causal from
    SM90_CLUSTER_WINDOWED_ROWS rows): an even grid of at most the SMs, a tile per cluster
    (m_blocks counts pairs of query blocks, the last one half empty where their count is
    odd); a call with a left window runs one CTA a tile, and a cluster config given for one
    is refused."""
    from cuflash.ops import forward
    with fake_gpu() as (cuflash, world):
        mk = record_launches.Maker(world, 0)
        at = forward.SM90_PARAMS.fields

        def field(raw, name):
            return int.from_bytes(raw[at[name][1]:at[name][1] + 4], "little")

        rows = forward.SM90_CLUSTER_WINDOWED_ROWS
        causal = (("causal", True),)
        # (batch, seqlen, heads, options): clusters, m_blocks, the grid (132 SMs)
        for (batch, seqlen, heads, options), (cluster, blocks, grid) in {
                (2, 1100, 8, ()): (True, 5, 132), (1, 1100, 4, ()): (True, 5, 40),
                (1, rows, 2, causal): (True, rows // 256, rows // 64),
                (2, rows - 1, 8, causal): (False, rows // 128, 132),
                (2, 1100, 8, (("window", (100, 0)),)): (False, 9, 132)}.items():
            q, k, v = (mk.array((batch, seqlen, heads, 128), np.float16, n) for n in "qkv")
            world.begin_call()
            cuflash.attention_forward(q, k, v, **dict(options))
            [launch] = [x for x in world.launches if x["kernel"].name.startswith(_HOPPER_FWD)]
            assert launch["kernel"].name.startswith(_HOPPER_FWD[int(cluster)]), \
                launch["kernel"].name
            assert tuple(launch["grid"])[0] == grid
            assert field(launch["raw"], "m_blocks") == blocks
            assert field(launch["raw"], "tiles") == blocks * batch * heads, seqlen
            counter = at["tile_counter"][1]
            assert int.from_bytes(launch["raw"][counter:counter + 8], "little")  # claims
        # An explicit cluster config for a problem with a left window is refused.
        from cuflash import ops
        q = mk.array((1, 300, 2, 128), np.float16, "q")
        p = ops.dense_problem(q, q, q, window=(50, 0))
        config = forward.sm90_config(p.dtype, 128, 0, False, 300, cluster=2)
        with pytest.raises(ValueError, match="left window"):
            forward.plan(p, q.strides, config)
