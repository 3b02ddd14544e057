"""attention_with_kvcache against the float64 reference, on the CPU and (marker gpu) the GPU.

Every problem poisons what must never be read: cache rows past each batch item's keys and
unused pages hold NaN, so a kernel that reads (rather than zero-fills or skips) them fails
the finiteness check of the accuracy rule. The append is checked bit for bit by reading the
caches back against a copy updated by hand. GPU calls also run under an allocator that
fills every allocation with NaN bytes and records its size: the results must be fully
written, and only out, lse and (with several splits) the float32 partial results may be
allocated.
"""
import ml_dtypes
import numpy as np
import pytest

import cuflash
from accuracy import assert_close
from cuflash import _core, kvcache, ops, reference
from gpu import bits, import_cupy, poisoned

BF16 = np.dtype(ml_dtypes.bfloat16)
F16 = np.dtype(np.float16)
F32 = np.dtype(np.float32)


class Problem:
    """Random q, caches, new k / v, lengths and (paged) a shuffled block table, on the host.

    ``capacity`` is the keys one batch item's cache holds; with ``page_size`` the caches are
    (batch * pages + 2 spare pages, page_size, ...) and each batch item gets ``pages``
    random distinct pages. Rows past ``lengths[b]`` and the spare pages are NaN.
    """

    def __init__(self, rng, dtype, *, batch=3, seqlen_q=1, nheads=8, nheads_kv=2, headdim=64,
                 lengths=(0, 1, 150), seqlen_new=0, capacity=None, page_size=None,
                 cache_seqlens_int=False):
        dtype = np.dtype(dtype)
        lengths = np.asarray(lengths, np.int32)
        assert lengths.shape == (batch,)
        capacity = capacity or int(lengths.max()) + seqlen_new + 5
        self.dtype, self.page_size, self.seqlen_new = dtype, page_size, seqlen_new
        self.lengths = lengths
        normal = lambda *shape: rng.standard_normal(shape).astype(dtype)  # noqa: E731
        self.q = normal(batch, seqlen_q, nheads, headdim)
        if page_size is None:
            self.block_table = None
            cache_shape = (batch, capacity, nheads_kv, headdim)
        else:
            pages = -(-capacity // page_size)
            num_blocks = batch * pages + 2
            self.block_table = rng.permutation(num_blocks)[:batch * pages].reshape(
                batch, pages).astype(np.int32)
            cache_shape = (num_blocks, page_size, nheads_kv, headdim)
        self.k_cache, self.v_cache = normal(*cache_shape), normal(*cache_shape)
        poison = np.ones(cache_shape[:2], bool)
        for b in range(batch):
            page, row = self.where(b, np.arange(lengths[b]))
            poison[page, row] = False
        self.k_cache[poison] = np.nan
        self.v_cache[poison] = np.nan
        self.k = normal(batch, seqlen_new, nheads_kv, headdim) if seqlen_new else None
        self.v = normal(batch, seqlen_new, nheads_kv, headdim) if seqlen_new else None
        self.cache_seqlens = int(lengths[0]) if cache_seqlens_int else lengths
        if cache_seqlens_int:
            assert (lengths == lengths[0]).all()

    def where(self, b, pos):
        """(page, row) of keys ``pos`` of batch item b."""
        if self.block_table is None:
            return np.full(len(pos), b), pos
        return self.block_table[b, pos // self.page_size], pos % self.page_size

    def expected_caches(self):
        """The caches after the append, by hand."""
        k_cache, v_cache = self.k_cache.copy(), self.v_cache.copy()
        for b in range(len(self.lengths)):
            for t in range(self.seqlen_new):
                page, row = self.where(b, np.array([self.lengths[b] + t]))
                k_cache[page[0], row[0]] = self.k[b, t]
                v_cache[page[0], row[0]] = self.v[b, t]
        return k_cache, v_cache

    def arguments(self, xp=np):
        """Fresh copies of the arrays (the call updates the caches), as ``xp`` arrays."""
        def conv(x):
            return None if x is None else xp.asarray(x.copy())
        seqlens = self.cache_seqlens
        return dict(q=conv(self.q), k_cache=conv(self.k_cache), v_cache=conv(self.v_cache),
                    k=conv(self.k), v=conv(self.v), block_table=conv(self.block_table),
                    cache_seqlens=seqlens if isinstance(seqlens, int) else conv(seqlens))

    def check(self, call, xp=np, **options):
        """Run ``call(**arguments, **options)``, assert the accuracy rule on (out, lse) and
        the caches bit for bit; return (out, lse, ref_lse)."""
        args = self.arguments(xp)
        out, lse = call(**args, **options, return_lse=True)
        host = self.arguments()
        ref_opts = {n: x for n, x in options.items() if n != "num_splits"}
        if "alibi_slopes" in ref_opts and not isinstance(ref_opts["alibi_slopes"], np.ndarray):
            ref_opts["alibi_slopes"] = ref_opts["alibi_slopes"].get()
        ref = reference.attention_with_kvcache(**host, **ref_opts)
        naive = reference.attention_with_kvcache(**host, **ref_opts, upcast=False)
        where = (f"{self.dtype} q{self.q.shape} cache{self.k_cache.shape} page "
                 f"{self.page_size} lengths {self.lengths.tolist()} new {self.seqlen_new} "
                 f"{options}")
        assert out.shape == self.q.shape and out.dtype == self.dtype
        assert lse.shape == ref[1].shape and lse.dtype == np.float32
        assert_close(f"out ({where})", out, ref[0], naive[0])
        assert_close(f"lse ({where})", lse, ref[1], naive[1])
        want_k, want_v = self.expected_caches()
        for name, got, want in (("k_cache", args["k_cache"], want_k),
                                ("v_cache", args["v_cache"], want_v)):
            got = got if isinstance(got, np.ndarray) else got.get()
            assert np.array_equal(bits(got), bits(want)), f"{name} after the call ({where})"
        return out, lse, ref[1]


LAYOUTS = {"contiguous": None, "page16": 16, "page64": 64, "page256": 256}
GQA = {"8:1": (8, 1), "4:1": (8, 2), "1:1": (4, 4)}
MASKS = {"full": {}, "causal": dict(causal=True), "window": dict(window=(40, 2))}


# ------------------------------------------------------------------------------- CPU


@pytest.mark.parametrize("mask", MASKS, ids=list(MASKS))
@pytest.mark.parametrize("seqlen_q", [1, 4])
@pytest.mark.parametrize("layout", LAYOUTS, ids=list(LAYOUTS))
def test_cpu_layouts(rng, layout, seqlen_q, mask):
    p = Problem(rng, BF16, seqlen_q=seqlen_q, lengths=(0, 1, 300), seqlen_new=2,
                page_size=LAYOUTS[layout])
    p.check(cuflash.attention_with_kvcache, **MASKS[mask])


@pytest.mark.parametrize("gqa", GQA, ids=list(GQA))
@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16, np.float32, np.float64],
                         ids=str)
def test_cpu_gqa_and_dtypes(rng, dtype, gqa):
    nheads, nheads_kv = GQA[gqa]
    p = Problem(rng, dtype, seqlen_q=4, nheads=nheads, nheads_kv=nheads_kv, headdim=40,
                lengths=(7, 0, 33), seqlen_new=3, page_size=16)
    p.check(cuflash.attention_with_kvcache, causal=True)


def test_cpu_without_new_keys_leaves_the_caches_alone(rng):
    p = Problem(rng, F32, lengths=(5, 1, 64), page_size=16)
    p.check(cuflash.attention_with_kvcache)  # compares the caches with their old bits


def test_cpu_zero_length_items_see_nothing(rng):
    # cache_seqlens 0 and no new keys: out 0, lse -inf; with new keys only those are seen.
    p = Problem(rng, F32, lengths=(0, 4, 0))
    out, lse, _ = p.check(cuflash.attention_with_kvcache)
    assert (out[0] == 0).all() and np.isneginf(lse[0]).all()
    p = Problem(rng, F32, lengths=(0, 4, 0), seqlen_new=1, page_size=16)
    p.check(cuflash.attention_with_kvcache)


def test_cpu_int_cache_seqlens(rng):
    p = Problem(rng, F16, lengths=(20, 20, 20), seqlen_new=2, cache_seqlens_int=True)
    p.check(cuflash.attention_with_kvcache, causal=True)


@pytest.mark.parametrize("opts", [dict(softcap=2.0), dict(alibi="heads"),
                                  dict(alibi="batch", causal=True, softcap=5.0),
                                  dict(scale=0.3, window=(None, 0))],
                         ids=["softcap", "alibi", "alibi-batch-softcap", "scale"])
def test_cpu_score_options(rng, opts):
    opts = dict(opts)
    if opts.pop("alibi", None) == "heads":
        opts["alibi_slopes"] = rng.uniform(0.01, 0.5, 8).astype(np.float32)
    elif "causal" in opts:
        opts["alibi_slopes"] = rng.uniform(0.01, 0.5, (3, 8)).astype(np.float32)
    p = Problem(rng, BF16, seqlen_q=2, lengths=(3, 70, 1), seqlen_new=1, page_size=16)
    p.check(cuflash.attention_with_kvcache, **opts)


def test_cpu_equals_dense_attention_over_the_prefix(rng):
    # The definition, against the public dense function rather than the reference.
    p = Problem(rng, F32, batch=2, seqlen_q=3, lengths=(10, 50), seqlen_new=2)
    args = p.arguments()
    out = cuflash.attention_with_kvcache(**args, causal=True)
    for b in range(2):
        n = p.lengths[b] + 2
        dense = cuflash.attention(args["q"][b:b + 1], args["k_cache"][b:b + 1, :n],
                                  args["v_cache"][b:b + 1, :n], causal=True)
        np.testing.assert_array_equal(out[b:b + 1], dense)


def test_cpu_returns_out_alone_by_default(rng):
    p = Problem(rng, F32)
    out = cuflash.attention_with_kvcache(**p.arguments())
    assert isinstance(out, np.ndarray) and out.shape == p.q.shape


def test_cpu_empty_problems_still_append(rng):
    # seqlen_q 0: nothing to attend, but the new keys must land in the cache.
    p = Problem(rng, F32, seqlen_q=0, lengths=(2, 0, 9), seqlen_new=2, page_size=16)
    out, lse, _ = p.check(cuflash.attention_with_kvcache)
    assert out.shape == (3, 0, 8, 64) and lse.shape == (3, 8, 0)
    p = Problem(rng, F32, batch=0, lengths=(), capacity=16)
    out, lse, _ = p.check(cuflash.attention_with_kvcache)
    assert out.shape == (0, 1, 8, 64)


def test_cpu_dlpack_of_numpy_is_rejected_like_attention():
    class CpuDLPack:
        def __dlpack__(self):
            raise AssertionError("not reached")

        def __dlpack_device__(self):
            return (1, 0)

    q = np.zeros((1, 1, 2, 16), np.float32)
    with pytest.raises(TypeError, match="k_cache"):
        cuflash.attention_with_kvcache(q, CpuDLPack(), q, cache_seqlens=0)


# ------------------------------------------------------------------------ validation


def _valid(**changes):
    rng = np.random.default_rng(0)
    args = dict(q=rng.standard_normal((2, 1, 4, 16)).astype(np.float32),
                k_cache=np.zeros((5, 16, 2, 16), np.float32),
                v_cache=np.zeros((5, 16, 2, 16), np.float32),
                k=np.ones((2, 1, 2, 16), np.float32), v=np.ones((2, 1, 2, 16), np.float32),
                cache_seqlens=np.array([3, 20], np.int32),
                block_table=np.array([[0, 1], [2, 3]], np.int32))
    args.update(changes)
    return args


def test_valid_arguments_pass():
    cuflash.attention_with_kvcache(**_valid())


@pytest.mark.parametrize("changes, error, match", [
    (dict(q=np.zeros((2, 4, 16), np.float32)), ValueError, "q must have 4 dimensions"),
    (dict(k_cache=np.zeros((5, 16, 2), np.float32)), ValueError, "k_cache must have 4"),
    (dict(q=np.zeros((2, 1, 4, 16), np.int32)), TypeError, "q has dtype int32"),
    (dict(k_cache=np.zeros((5, 16, 2, 16), np.float16)), TypeError, "k_cache has dtype"),
    (dict(v=np.ones((2, 1, 2, 16), np.float64)), TypeError, "v has dtype"),
    (dict(v_cache=np.zeros((5, 16, 1, 16), np.float32)), ValueError, "v_cache has shape"),
    (dict(q=np.zeros((2, 1, 4, 8), np.float32)), ValueError, "headdim"),
    (dict(q=np.zeros((2, 1, 3, 16), np.float32)), ValueError, "multiple of the caches'"),
    (dict(block_table=None), ValueError, "pass block_table"),
    (dict(block_table=np.zeros((2, 2), np.int64)), TypeError, "block_table must be int32"),
    (dict(block_table=np.zeros((3, 2), np.int32)), ValueError, "block_table must have shape"),
    (dict(block_table=np.zeros((2, 2, 1), np.int32)), ValueError, "block_table must have"),
    (dict(block_table=np.array([[0, 1], [2, 5]], np.int32)), ValueError,
     r"block_table\[1, 1\] = 5"),
    (dict(block_table=np.array([[-1, 1], [2, 3]], np.int32)), ValueError,
     r"block_table\[0, 0\] = -1"),
    (dict(k_cache=np.zeros((5, 8, 2, 16), np.float32),
          v_cache=np.zeros((5, 8, 2, 16), np.float32)), ValueError, "multiple of 16"),
    (dict(v=None), ValueError, "k and v must be given together"),
    (dict(k=np.ones((2, 1, 1, 16), np.float32)), ValueError, "k must have shape"),
    (dict(v=np.ones((2, 2, 2, 16), np.float32)), ValueError, "v has 2 new rows"),
    (dict(k=np.ones((2, 33, 2, 16), np.float32), v=np.ones((2, 33, 2, 16), np.float32)),
     ValueError, "do not fit"),
    (dict(cache_seqlens=np.array([3, 32], np.int32)), ValueError, r"cache_seqlens\[1\] = 32"),
    (dict(cache_seqlens=np.array([-1, 3], np.int32)), ValueError, r"cache_seqlens\[0\] = -1"),
    (dict(cache_seqlens=np.array([3, 20], np.int64)), TypeError, "int32"),
    (dict(cache_seqlens=np.array([3, 20, 1], np.int32)), ValueError, r"shape \(batch,\)"),
    (dict(cache_seqlens=32), ValueError, r"cache_seqlens \(32\)"),
    (dict(cache_seqlens=-1), ValueError, r"cache_seqlens \(-1\)"),
    (dict(cache_seqlens=3.0), TypeError, "cache_seqlens must be an int"),
    (dict(cache_seqlens=None), TypeError, "cache_seqlens must be an int"),
    (dict(cache_seqlens=True), TypeError, "cache_seqlens must be an int"),
    (dict(cache_seqlens=[3, 20]), TypeError, "cache_seqlens must be an int"),
    (dict(num_splits=0), ValueError, r"num_splits must lie in \[1, 128\]"),
    (dict(num_splits=129), ValueError, r"num_splits must lie in \[1, 128\], got 129"),
    (dict(num_splits=2.0), TypeError, "num_splits"),
    (dict(num_splits=True), TypeError, "num_splits"),
    (dict(return_lse="yes"), TypeError, "return_lse"),
    (dict(scale=-1.0), ValueError, "scale"),
    (dict(window=(1, 2, 3)), TypeError, "window"),
    (dict(alibi_slopes=np.zeros(3, np.float32)), ValueError, "alibi_slopes"),
])
def test_invalid_arguments(changes, error, match):
    with pytest.raises(error, match=match):
        cuflash.attention_with_kvcache(**_valid(**changes))


def test_invalid_arguments_leave_the_caches_alone():
    args = _valid(cache_seqlens=np.array([3, 32], np.int32))
    with pytest.raises(ValueError):
        cuflash.attention_with_kvcache(**args)
    assert not args["k_cache"].any() and not args["v_cache"].any()


def test_cache_seqlens_is_keyword_only_and_required():
    args = _valid()
    del args["cache_seqlens"]
    with pytest.raises(TypeError, match="cache_seqlens"):
        cuflash.attention_with_kvcache(**args)


def test_contiguous_cache_batch_must_match_q():
    args = _valid(block_table=None, k_cache=np.zeros((3, 32, 2, 16), np.float32),
                  v_cache=np.zeros((3, 32, 2, 16), np.float32))
    with pytest.raises(ValueError, match="k_cache has batch 3 but q has batch 2"):
        cuflash.attention_with_kvcache(**args)


# ------------------------------------------------------- dispatch and params (no GPU)


def test_num_splits_heuristic():
    sms = 132
    # CTAs already fill most SMs: no split.
    assert ops.decode.num_splits(64 * 8, 131072, sms) == 1
    assert ops.decode.num_splits(16 * 8, 4096, sms) == 1
    # Short caches: never below MIN_SPLIT_KEYS keys per split, and past SHORT_SPLITS
    # splits never below SPLIT_KEYS (cuflash/ops/decode.py).
    assert ops.decode.num_splits(8, 1024, sms) == 8
    assert ops.decode.num_splits(8, 512, sms) == 4
    assert ops.decode.num_splits(8, 4096, sms) == 8
    assert ops.decode.num_splits(8, 100, sms) == 1
    # One batch item, long cache: about one CTA per SM, in one even wave.
    assert ops.decode.num_splits(8, 131072, sms) == 16
    assert ops.decode.num_splits(4 * 8, 16384, sms) == 4
    for ctas in (1, 3, 8, 24, 100, 200):
        assert 1 <= ops.decode.num_splits(ctas, 131072, sms) <= 128
    assert ops.decode.num_splits(1, 10**6, 1000) <= ops.decode.MAX_SPLITS


def test_fast_div_magic_numbers():
    """FastDiv (common/params.cuh): (umulhi(n, mul) + n) >> shift is n // d for every
    0 <= n < 2^31, here at the edges and at random for divisors up to 2^31 - 1."""
    rng = np.random.default_rng(0)
    divisors = [*range(1, 300), 1023, 1024, 1025, 2**30, 2**30 + 1, 2**31 - 1,
                *rng.integers(1, 2**31, 200).tolist()]
    for d in divisors:
        d_, mul, shift = _core.fast_div(d)
        assert d_ == d and 0 < mul < 2**32 and shift <= 31
        ns = [0, 1, d - 1, d, d + 1, 2 * d - 1, 2**31 - 1, *rng.integers(0, 2**31, 50).tolist()]
        for n in (n for n in ns if 0 <= n < 2**31):
            assert (((n * mul) >> 32) + n) >> shift == n // d, (d, n)


def test_every_headdim_has_a_decode_config():
    for arch in ops.tiles.CHECKED_ARCHS:
        limit = ops.tiles.shared_limit(arch)
        kernels = ops.all_kernels(arch)
        for hd in range(8, 257, 8):
            name, _, shared, _ = ops.decode.config(BF16, hd, False, limit=limit)
            assert shared <= limit, (arch, hd, name, shared)
            assert (ops.decode.FILE, name, shared) in kernels


def _layout_asserts(struct, dtype):
    lines = [f'static_assert(sizeof(cuflash::{struct}) == {dtype.itemsize}, "size");']
    for name in dtype.names:
        lines.append(f"static_assert(__builtin_offsetof(cuflash::{struct}, {name}) == "
                     f'{dtype.fields[name][1]}, "{name}");')
    return "\n".join(lines)


def test_params_mirrors_match_the_c_structs():
    """The NumPy records passed by value lay out their fields where the kernels read them."""
    nvrtc = pytest.importorskip("cupy_backends.cuda.libs.nvrtc")
    from cuflash import _compile
    src = "\n".join(['#include "common/params.cuh"',
                     _layout_asserts("DecodeParams", ops.decode.PARAMS),
                     _layout_asserts("MergeParams", ops.merge.PARAMS)])
    prog = nvrtc.createProgram(src, "layout.cu", [], [])
    try:
        try:
            nvrtc.compileProgram(prog, list(_compile.options("sm_80", "common/params.cuh")))
        except nvrtc.NVRTCError:
            pytest.fail(nvrtc.getProgramLog(prog))
    finally:
        nvrtc.destroyProgram(prog)


def test_options_are_documented():
    doc = cuflash.attention_with_kvcache.__doc__
    assert "{options}" not in doc
    for name in ("k_cache, v_cache", "block_table", "num_splits", "scale", "causal", "window",
                 "softcap", "alibi_slopes", "return_lse"):
        assert f"    {name} :" in doc, name


def test_docstring_examples_run():
    import doctest
    for f in (cuflash.attention_with_kvcache, reference.attention_with_kvcache):
        result = doctest.run_docstring_examples(f, {}, verbose=False)
        assert result is None
    assert doctest.testmod(kvcache, verbose=False).failed == 0


# ------------------------------------------------------------------------------- GPU


def gpu_call(num_splits=None):
    """attention_with_kvcache under the poisoning allocator, checking what it allocates:
    out and lse, plus, when it splits, one block of the (num_splits, ...) float32 partial
    results: out's (256-byte aligned), then lse's."""
    def call(**kwargs):
        (out, lse), sizes = poisoned(cuflash.attention_with_kvcache, **kwargs,
                                     num_splits=num_splits)
        expected = [out.nbytes, lse.nbytes]
        scratch = sorted(sizes)
        for size in expected:
            assert size in scratch, f"allocated {sizes}, expected out and lse"
            scratch.remove(size)
        if scratch:  # the split-KV partial results: S x out in float32, S x lse
            [block] = scratch
            splits = [s for s in range(2, 257)
                      if block == -(-s * out.size * 4 // 256) * 256 + s * lse.nbytes]
            assert splits and num_splits in (None, *splits), f"allocated {sizes}"
        else:
            assert num_splits in (None, 1), f"{num_splits} splits allocated no scratch"
        return out, lse
    return call


@pytest.mark.gpu
@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("seqlen_q", [1, 4])
@pytest.mark.parametrize("layout", LAYOUTS, ids=list(LAYOUTS))
def test_gpu_layouts(rng, layout, seqlen_q, num_splits):
    p = Problem(rng, BF16, seqlen_q=seqlen_q, nheads=16, nheads_kv=2, headdim=128,
                lengths=(0, 1, 700), seqlen_new=1, page_size=LAYOUTS[layout])
    p.check(gpu_call(num_splits), import_cupy())


@pytest.mark.gpu
@pytest.mark.parametrize("mask", MASKS, ids=list(MASKS))
@pytest.mark.parametrize("gqa", GQA, ids=list(GQA))
def test_gpu_gqa_and_masks(rng, gqa, mask):
    nheads, nheads_kv = GQA[gqa]
    p = Problem(rng, F16, seqlen_q=4, nheads=nheads, nheads_kv=nheads_kv, headdim=64,
                lengths=(33, 0, 250, 1), batch=4, seqlen_new=2, page_size=64)
    p.check(gpu_call(5), import_cupy(), **MASKS[mask])


@pytest.mark.gpu
@pytest.mark.parametrize("num_splits", [None, 1, 2, 7, 40])
def test_gpu_num_splits(rng, num_splits):
    # GQA 32:8 as in the decode benchmark; 40 splits of ~300 keys leave some empty.
    p = Problem(rng, BF16, batch=2, nheads=32, nheads_kv=8, headdim=128,
                lengths=(1000, 37), seqlen_new=1, page_size=256)
    p.check(gpu_call(num_splits), import_cupy())


@pytest.mark.gpu
@pytest.mark.parametrize("num_splits", [3, 5])
def test_gpu_divisors_off_powers_of_two(rng, num_splits):
    # Every FastDiv of the kernel at a divisor that is not a power of two: pages of 48 keys,
    # 6 query heads per kv head on 3 kv heads, 3 query rows (18 packed rows: 2 row blocks),
    # 3 or 5 splits.
    p = Problem(rng, BF16, seqlen_q=3, nheads=18, nheads_kv=3, headdim=128,
                lengths=(97, 1025, 0, 17), batch=4, seqlen_new=1, page_size=48)
    p.check(gpu_call(num_splits), import_cupy(), causal=True)


@pytest.mark.gpu
def test_gpu_fused_combine_rearms_and_max_splits(rng):
    # The last split of a group merges and resets its counter: the same call again, with
    # as many as DECODE_MAX_SPLITS splits (most of them empty), gives the same bits.
    cupy = import_cupy()
    p = Problem(rng, BF16, batch=2, nheads=8, nheads_kv=2, headdim=128, lengths=(900, 5))
    first = p.check(gpu_call(128), cupy)[:2]
    for splits in (128, 128, 9):
        again = p.check(gpu_call(splits), cupy)[:2]
        if splits == 128:
            assert all(bool((a == b).all()) for a, b in zip(first, again))


@pytest.mark.gpu
@pytest.mark.parametrize("trend", ["rising", "late-spike", "falling"])
def test_gpu_rescale_only_when_a_max_grows(rng, trend):
    # flash_decode rescales its output accumulator only when some row's running max grows
    # (LAZY_RESCALE in softmax.cuh). Keys aligned with the queries, scaled by position:
    # rising scores grow the max in every tile, a spike in the last keys grows it once after
    # a long run of skipped rescales, falling scores hardly ever after the first tiles. The
    # ramp moves scores by about 4 (q . direction ~ 5.7, / sqrt(128), x 8), so a missed or
    # stale rescale would weigh earlier keys wrongly by up to e^4.
    p = Problem(rng, BF16, batch=2, nheads=8, nheads_kv=2, headdim=128, lengths=(1500, 700),
                page_size=64)
    direction = p.q.astype(F32).reshape(2, 1, 2, 4, 128).mean(axis=(1, 3))  # (batch, kv, hd)
    direction /= np.linalg.norm(direction, axis=-1, keepdims=True)
    for b, length in enumerate(p.lengths):
        ramp = {"rising": np.linspace(0, 8, length),
                "late-spike": np.where(np.arange(length) >= length - 3, 8.0, 0.0),
                "falling": np.linspace(8, 0, length)}[trend]
        page, row = p.where(b, np.arange(length))
        keys = p.k_cache[page, row].astype(F32) + ramp[:, None, None] * direction[b]
        p.k_cache[page, row] = keys.astype(BF16)
    p.check(gpu_call(2), import_cupy())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [BF16, F32], ids=["bf16-kernel", "f32-gathered"])
def test_gpu_block_table_entries_out_of_range_stay_in_the_caches(rng, dtype):
    # GPU block tables are not checked (that needs a device synchronisation): entries past
    # the pages are clamped into [0, num_blocks), by the decode kernel and by the float32
    # gathered path alike, so nothing outside the caches is read or written and the result
    # is the CPU's on the clamped table.
    cupy = import_cupy()
    q = rng.standard_normal((2, 1, 4, 64)).astype(dtype)
    k_cache = rng.standard_normal((3, 16, 1, 64)).astype(dtype)
    v_cache = k_cache.copy()  # one array for both would be rejected: the call appends
    table = np.array([[0, 2**30], [-5, 1]], np.int32)
    lengths = np.array([20, 31], np.int32)
    g_cache, g_v_cache = cupy.asarray(k_cache), cupy.asarray(v_cache)
    out = cuflash.attention_with_kvcache(cupy.asarray(q), g_cache, g_v_cache,
                                         k=cupy.asarray(q[:, :, :1]),
                                         v=cupy.asarray(q[:, :, :1]),
                                         cache_seqlens=cupy.asarray(lengths),
                                         block_table=cupy.asarray(table), num_splits=2)
    cupy.cuda.Device().synchronize()
    want = cuflash.attention_with_kvcache(q, k_cache, v_cache, k=q[:, :, :1], v=q[:, :, :1],
                                          cache_seqlens=lengths,
                                          block_table=np.clip(table, 0, 2))
    tol = 2e-2 if dtype == BF16 else 1e-4
    np.testing.assert_allclose(out.get().astype(F32), want.astype(F32), rtol=tol, atol=tol)
    np.testing.assert_array_equal(g_cache.get(), k_cache)
    np.testing.assert_array_equal(g_v_cache.get(), v_cache)


@pytest.mark.gpu
@pytest.mark.parametrize("headdim", [32, 80, 96, 192, 256])
def test_gpu_headdims(rng, headdim):
    p = Problem(rng, BF16, seqlen_q=2, nheads=6, nheads_kv=3, headdim=headdim,
                lengths=(17, 200, 0), seqlen_new=1)
    p.check(gpu_call(2), import_cupy(), causal=True)


@pytest.mark.gpu
@pytest.mark.parametrize("opts", ["softcap", "alibi", "all"])
def test_gpu_score_options(rng, opts):
    cupy = import_cupy()
    options = {"softcap": dict(softcap=3.0),
               "alibi": dict(alibi_slopes=cupy.asarray(
                   rng.uniform(0.01, 0.5, (3, 8)).astype(np.float32))),
               "all": dict(softcap=2.0, window=(64, 0), alibi_slopes=cupy.asarray(
                   rng.uniform(0.01, 0.5, 8).astype(np.float32)))}[opts]
    p = Problem(rng, BF16, seqlen_q=3, nheads=8, nheads_kv=2, headdim=128,
                lengths=(100, 1, 513), seqlen_new=2, page_size=16)
    p.check(gpu_call(3), cupy, **options)


@pytest.mark.gpu
def test_gpu_group_times_seqlen_q_over_one_tile(rng):
    # 16 query heads per kv head x 3 query rows = 48 packed rows: three row blocks.
    p = Problem(rng, BF16, seqlen_q=3, nheads=32, nheads_kv=2, headdim=64,
                lengths=(90, 3, 400), seqlen_new=3, page_size=16)
    p.check(gpu_call(2), import_cupy(), causal=True)


@pytest.mark.gpu
def test_gpu_int_cache_seqlens_and_no_new_keys(rng):
    p = Problem(rng, F16, lengths=(300, 300, 300), cache_seqlens_int=True)
    p.check(gpu_call(4), import_cupy())
    p = Problem(rng, F16, lengths=(0, 0, 0), cache_seqlens_int=True)  # all rows see nothing
    out, lse, _ = p.check(gpu_call(1), import_cupy())
    assert bool((out == 0).all()) and np.isneginf(lse.get()).all()


@pytest.mark.gpu
def test_gpu_float32_simple_path(rng):
    p = Problem(rng, F32, seqlen_q=2, lengths=(5, 0, 130), seqlen_new=2, page_size=16)
    cupy = import_cupy()

    def call(**kwargs):
        return cuflash.attention_with_kvcache(**kwargs)

    p.check(call, cupy, causal=True)


@pytest.mark.gpu
def test_gpu_strided_inputs(rng):
    # q a view with strided rows; the caches and the new keys as k and v halves of packed
    # (..., 2, nheads_kv, headdim) buffers, as serving stacks often store them.
    cupy = import_cupy()
    p = Problem(rng, BF16, seqlen_q=2, nheads=4, nheads_kv=2, headdim=64,
                lengths=(10, 40, 3), seqlen_new=2)

    def call(q, k_cache, v_cache, k, v, **kwargs):
        q_view = cupy.concatenate([q, q], axis=2)[:, :, :q.shape[2]]
        cache = cupy.stack([k_cache, v_cache], axis=2)
        new = cupy.stack([k, v], axis=2)
        result = cuflash.attention_with_kvcache(q_view, cache[:, :, 0], cache[:, :, 1],
                                                k=new[:, :, 0], v=new[:, :, 1], **kwargs)
        k_cache[...], v_cache[...] = cache[:, :, 0], cache[:, :, 1]  # what check reads
        return result

    p.check(call, cupy)


@pytest.mark.gpu
def test_gpu_dlpack_cache_is_updated_in_place(rng):
    # A cache passed through DLPack (here a CuPy array wrapped as a foreign one).
    cupy = import_cupy()
    p = Problem(rng, BF16, lengths=(3, 9, 1), seqlen_new=1)

    class Foreign:
        def __init__(self, x):
            self.x = x

        def __dlpack__(self, **kwargs):
            return self.x.__dlpack__(**kwargs)

        def __dlpack_device__(self):
            return self.x.__dlpack_device__()

    def call(q, k_cache, v_cache, k, v, cache_seqlens, **kwargs):
        return cuflash.attention_with_kvcache(Foreign(q), Foreign(k_cache), Foreign(v_cache),
                                              k=Foreign(k), v=Foreign(v),
                                              cache_seqlens=Foreign(cache_seqlens), **kwargs)

    p.check(call, cupy)
