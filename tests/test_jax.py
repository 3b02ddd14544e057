"""cuflash.jax: jit, grad, vmap and every option, against the float64 reference.

CPU tests (CI) run the NumPy backend inside XLA's CPU callbacks; the tests marked `gpu` run
the kernels on XLA's stream (bf16 / fp16, jit + grad, a training loop) and are skipped
without a GPU, or without a CUDA build of JAX. Skipped as a whole where JAX is absent.
"""
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")

import cuflash  # noqa: E402
import cuflash.jax as fj  # noqa: E402
from cuflash.jax import _binding  # noqa: E402
from accuracy import assert_close  # noqa: E402
from cuflash import _core, reference  # noqa: E402

BF16 = np.dtype(ml_dtypes.bfloat16)
F16 = np.dtype(np.float16)
F32 = np.dtype(np.float32)

# Every option of the CuPy API; alibi_slopes is filled in by `slopes_for`.
OPTIONS = [
    {},
    {"causal": True},
    {"window": (5, 2)},
    {"window": (None, 3), "scale": 0.3},
    {"softcap": 2.5, "causal": True},
    {"alibi_slopes": "heads"},
    {"alibi_slopes": "batch", "causal": True, "softcap": 4.0},
]


def slopes_for(rng, options, batch, nheads):
    """``options`` with an "alibi_slopes" placeholder replaced by float32 slopes."""
    kind = options.get("alibi_slopes")
    if kind is None:
        return dict(options)
    shape = (nheads,) if kind == "heads" else (batch, nheads)
    return dict(options, alibi_slopes=rng.uniform(0.05, 0.5, shape).astype(np.float32))


def randn(rng, shape, dtype=F32):
    return rng.standard_normal(shape).astype(dtype)


def host(x):
    return None if x is None else np.asarray(x)


def ref_options(options):
    return {n: host(x) if n == "alibi_slopes" else x for n, x in options.items()}


def check_forward(out, lse, q, k, v, **options):
    q, k, v = (np.asarray(x) for x in (q, k, v))
    ref = reference.attention_forward(q, k, v, **ref_options(options))
    naive = reference.attention_forward(q, k, v, **ref_options(options), upcast=False)
    assert_close("out", np.asarray(out), ref[0], naive[0])
    if lse is not None:
        assert_close("lse", np.asarray(lse), ref[1], naive[1])


def check_grads(grads, dout, q, k, v, **options):
    dout, q, k, v = (np.asarray(x) for x in (dout, q, k, v))
    ref = reference.attention_backward(dout, q, k, v, **ref_options(options))
    naive = reference.attention_backward(dout, q, k, v, **ref_options(options), upcast=False)
    for name, got, r, n in zip(("dq", "dk", "dv"), grads, ref, naive):
        assert_close(name, np.asarray(got), r, n)


def problem(rng, dtype=F32, batch=2, seqlen_q=19, seqlen_k=33, nheads=4, nheads_kv=2,
            headdim=32):
    q = randn(rng, (batch, seqlen_q, nheads, headdim), dtype)
    k = randn(rng, (batch, seqlen_k, nheads_kv, headdim), dtype)
    v = randn(rng, (batch, seqlen_k, nheads_kv, headdim), dtype)
    dout = randn(rng, q.shape, dtype)
    return q, k, v, dout


def grads_of(f, q, k, v, dout):
    """jit(grad) of sum(f(q, k, v) * dout): the vector-Jacobian product with ``dout``."""
    def loss(q, k, v):
        return jnp.sum(f(q, k, v).astype(jnp.float32) * dout.astype(jnp.float32))
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)


# ---------------------------------------------------------------------------------------
# The module itself.

def test_import_cuflash_does_not_import_jax():
    code = "import sys, cuflash; assert 'jax' not in sys.modules, 'jax imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_docstring_examples():
    import doctest
    assert doctest.testmod(fj, verbose=False).failed == 0


def test_ffi_target_hands_the_callback_xla_buffers():
    """cuflash.jax._ffi: the handler reads each buffer's address, dtype and shape from the
    call frame (bf16, int32, a scalar, an empty one), None inputs stay None, outputs written
    through the addresses come back, and aliased inputs are the outputs' memory."""
    seen = []

    def body(static, outs, x, nothing, n, empty):
        seen.append((static, x.dtype, x.shape, nothing, n.dtype, n.shape, empty.shape))
        outs[0][...] = x * 2
        outs[1][...] = n + 1

    x = jnp.arange(12, dtype=jnp.bfloat16).reshape(3, 4)
    n = jnp.int32(5)
    empty = jnp.zeros((0, 7), jnp.float32)
    run = jax.jit(lambda x, n, e: _binding._call(body, "static", [(x.shape, x.dtype),
                                                                  (n.shape, n.dtype)],
                                                 x, None, n, e))
    y, m = run(x, n, empty)
    assert (np.asarray(y) == 2 * np.asarray(x)).all() and int(m) == 6
    assert seen == [("static", BF16, (3, 4), None, np.dtype(np.int32), (), (0, 7))]

    def add_one(static, outs, a):
        outs[0][...] += 1  # the output is a's memory: it already holds a
    a = jnp.arange(4.0)
    bumped, = jax.jit(lambda a: _binding._call(add_one, None, [(a.shape, a.dtype)], a,
                                               aliases={0: 0}))(a)
    assert np.asarray(bumped).tolist() == [1.0, 2.0, 3.0, 4.0]


def test_error_in_a_callback_reaches_the_caller_with_its_message():
    def fails(static, outs, x):
        raise ValueError("cu_seqlens_q must be increasing")
    x = jnp.zeros(3)
    with pytest.raises(Exception, match="ValueError: cu_seqlens_q must be increasing"):
        jax.block_until_ready(jax.jit(
            lambda x: _binding._call(fails, None, [(x.shape, x.dtype)], x))(x))


def test_exception_that_cannot_print_itself_still_reaches_the_caller():
    """The handler must not let anything raise into XLA's C++ (the process would abort)."""
    class Unprintable(Exception):
        def __str__(self):
            raise RuntimeError("no")

    def fails(static, outs, x):
        raise Unprintable()
    x = jnp.zeros(3)
    with pytest.raises(Exception, match="Unprintable"):
        jax.block_until_ready(jax.jit(
            lambda x: _binding._call(fails, None, [(x.shape, x.dtype)], x))(x))


def test_jit_dispatch_stays_in_cpp():
    """The custom call is not a host callback: jit's compiled program keeps the C++
    dispatch path (buffer_callback's host callbacks would take every call through Python)."""
    q = jnp.zeros((1, 16, 2, 32), jnp.float32)
    compiled = jax.jit(lambda q: fj.attention(q, q, q)).lower(q).compile()
    assert not compiled._executable.unsafe_call.has_host_callbacks


# ---------------------------------------------------------------------------------------
# Dense attention.

@pytest.mark.parametrize("options", OPTIONS, ids=str)
def test_forward_every_option(rng, options):
    q, k, v, _ = problem(rng)
    options = slopes_for(rng, options, 2, 4)
    out, lse = jax.jit(lambda q, k, v: fj.attention(q, k, v, return_lse=True, **options))(
        q, k, v)
    check_forward(out, lse, q, k, v, **options)


@pytest.mark.parametrize("options", OPTIONS, ids=str)
def test_grad_every_option(rng, options):
    q, k, v, dout = problem(rng)
    options = slopes_for(rng, options, 2, 4)
    grads = grads_of(lambda q, k, v: fj.attention(q, k, v, **options), q, k, v, dout)
    check_grads(grads, dout, q, k, v, **options)


def test_grad_deterministic_is_reproducible(rng):
    q, k, v, dout = problem(rng)
    f = lambda q, k, v: fj.attention(q, k, v, causal=True, deterministic=True)  # noqa: E731
    first, second = grads_of(f, q, k, v, dout), grads_of(f, q, k, v, dout)
    check_grads(first, dout, q, k, v, causal=True)
    for a, b in zip(first, second):
        assert (np.asarray(a) == np.asarray(b)).all()


@pytest.mark.parametrize("dtype", [BF16, F16], ids=str)
def test_half_precision_on_the_cpu(rng, dtype):
    q, k, v, dout = problem(rng, dtype)
    out, lse = jax.jit(lambda q, k, v: fj.attention(q, k, v, causal=True, return_lse=True))(
        q, k, v)
    assert out.dtype == dtype and lse.dtype == jnp.float32
    check_forward(out, lse, q, k, v, causal=True)
    grads = grads_of(lambda q, k, v: fj.attention(q, k, v, causal=True), q, k, v, dout)
    check_grads(grads, dout, q, k, v, causal=True)


def test_layout_bhsd(rng):
    q, k, v, dout = problem(rng)
    t = lambda x: np.ascontiguousarray(x.swapaxes(1, 2))  # noqa: E731
    f = lambda q, k, v: fj.attention(q, k, v, causal=True, layout="bhsd")  # noqa: E731
    out = jax.jit(f)(t(q), t(k), t(v))
    check_forward(np.asarray(out).swapaxes(1, 2), None, q, k, v, causal=True)
    grads = grads_of(f, t(q), t(k), t(v), t(dout))
    check_grads([np.asarray(g).swapaxes(1, 2) for g in grads], dout, q, k, v, causal=True)


def test_eager_calls(rng):
    """Without jit: each call runs the staged callback (and reuses its executable)."""
    q, k, v, _ = problem(rng)
    for _ in range(2):
        out = fj.attention(q, k, v, window=(4, 4))
        check_forward(out, None, q, k, v, window=(4, 4))


def test_empty_problem(rng):
    q, k, v, dout = problem(rng, seqlen_k=0)
    out, lse = jax.jit(lambda q, k, v: fj.attention(q, k, v, return_lse=True))(q, k, v)
    assert (np.asarray(out) == 0).all() and np.isneginf(np.asarray(lse)).all()
    grads = grads_of(fj.attention, q, k, v, dout)
    assert all(not np.asarray(g).any() for g in grads)


def jnp_attention(q, k, v, causal, softcap=0.0):
    """Plain JAX attention (autodiff gives an independent gradient): (out, lse)."""
    s = jnp.einsum("bqhd,bkhd->bhqk", q, jnp.repeat(k, q.shape[2] // k.shape[2], axis=2))
    s = s * q.shape[-1] ** -0.5
    if softcap:
        s = softcap * jnp.tanh(s / softcap)
    if causal:
        i, j = jnp.arange(q.shape[1])[:, None], jnp.arange(k.shape[1])[None]
        s = jnp.where(j <= i + k.shape[1] - q.shape[1], s, -jnp.inf)
    lse = jax.nn.logsumexp(s, axis=-1)
    p = jnp.exp(s - lse[..., None])
    out = jnp.einsum("bhqk,bkhd->bqhd", p, jnp.repeat(v, q.shape[2] // v.shape[2], axis=2))
    return out, lse


@pytest.mark.parametrize("options", [{"causal": False}, {"causal": True, "softcap": 3.0}],
                         ids=str)
def test_grad_through_lse(rng, options):
    """A loss that uses lse as well as out: the augmented backward against JAX autodiff
    of plain attention."""
    q, k, v, dout = problem(rng, seqlen_q=24)
    dlse = randn(rng, (2, 4, 24))

    def loss(attn):
        def f(q, k, v):
            out, lse = attn(q, k, v)
            return jnp.sum(out * dout) + jnp.sum(lse * dlse)
        return jax.jit(jax.grad(f, argnums=(0, 1, 2)))(q, k, v)

    got = loss(lambda q, k, v: fj.attention(q, k, v, return_lse=True, **options))
    want = loss(lambda q, k, v: jnp_attention(q, k, v, **options))
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=2e-5, rtol=1e-4,
                                   err_msg=name)


def test_lse_gradient_needs_room_in_the_head_dim(rng):
    q, k, v, _ = problem(rng, headdim=256, seqlen_q=3, seqlen_k=5)
    f = lambda q: fj.attention(q, k, v, return_lse=True)[1].sum()  # noqa: E731
    with pytest.raises(NotImplementedError, match="head dim"):
        jax.grad(f)(q)


X64_SCRIPT = """
import numpy as np, jax, jax.numpy as jnp
import cuflash.jax as fj
from cuflash import reference
rng = np.random.default_rng(0)
q, k, v, dout = (rng.standard_normal(s) for s in [(2, 9, 4, 16), (2, 13, 2, 16),
                                                  (2, 13, 2, 16), (2, 9, 4, 16)])
out = jax.jit(lambda q, k, v: fj.attention(q, k, v, causal=True))(q, k, v)
assert out.dtype == jnp.float64, out.dtype
grads = jax.grad(lambda q, k, v: jnp.sum(fj.attention(q, k, v, causal=True) * dout),
                 argnums=(0, 1, 2))(q, k, v)
ref = reference.attention_forward(q, k, v, causal=True)[0]
assert np.abs(np.asarray(out) - ref).max() < 1e-12
for g, r in zip(grads, reference.attention_backward(dout, q, k, v, causal=True)):
    assert np.abs(np.asarray(g) - r).max() < 1e-11
"""


def test_float64_with_x64_enabled():
    """float64 (CPU only) needs jax_enable_x64, a process-wide switch: a subprocess."""
    import os
    env = dict(os.environ, JAX_ENABLE_X64="1", JAX_PLATFORMS="cpu")
    subprocess.run([sys.executable, "-c", X64_SCRIPT], check=True, env=env)


# ---------------------------------------------------------------------------------------
# vmap.

def test_vmap_over_queries_only(rng):
    q, k, v, _ = problem(rng)
    qs = randn(rng, (3,) + q.shape)
    got = jax.jit(jax.vmap(lambda q: fj.attention(q, k, v, causal=True)))(qs)
    for i in range(3):
        check_forward(got[i], None, qs[i], k, v, causal=True)


def test_vmap_over_everything_with_per_item_slopes(rng):
    """vmapped per-head slopes (3, nheads) reach the callback as (3, nheads) and are
    broadcast over the batch; lse comes back per item."""
    q, k, v, _ = problem(rng)
    qs, ks, vs = (np.stack([x, randn(rng, x.shape)]) for x in (q, k, v))
    slopes = rng.uniform(0.1, 0.4, (2, 4)).astype(np.float32)
    f = lambda q, k, v, s: fj.attention(q, k, v, alibi_slopes=s, return_lse=True)  # noqa
    out, lse = jax.jit(jax.vmap(f))(qs, ks, vs, slopes)
    for i in range(2):
        check_forward(out[i], lse[i], qs[i], ks[i], vs[i], alibi_slopes=slopes[i])


def test_nested_vmap_and_other_axes(rng):
    q, k, v, _ = problem(rng, batch=1)
    qs = randn(rng, (2, 3) + q.shape)
    f = jax.vmap(jax.vmap(lambda q: fj.attention(q, k, v, window=(3, 0))))
    got = jax.jit(f)(qs)
    moved = jax.jit(jax.vmap(lambda q: fj.attention(q, k, v, window=(3, 0)), in_axes=2,
                             out_axes=2))(np.moveaxis(qs[0], 0, 2))
    for i in range(2):
        for j in range(3):
            check_forward(got[i, j], None, qs[i, j], k, v, window=(3, 0))
            check_forward(moved[:, :, j], None, qs[0, j], k, v, window=(3, 0))


def test_grad_of_vmap_and_vmap_of_grad(rng):
    q, k, v, dout = problem(rng)
    qs, douts = np.stack([q, randn(rng, q.shape)]), np.stack([dout, randn(rng, q.shape)])

    def loss(q, k, v, dout):
        return jnp.sum(fj.attention(q, k, v, causal=True) * dout)

    # grad of vmap: k and v are shared, so their gradients sum over the vmapped items.
    batched = jax.vmap(loss, in_axes=(0, None, None, 0))
    dq, dk, dv = jax.jit(jax.grad(lambda q, k, v: batched(q, k, v, douts).sum(),
                                  argnums=(0, 1, 2)))(qs, k, v)
    per_item = [reference.attention_backward(douts[i], qs[i], k, v, causal=True)
                for i in range(2)]
    np.testing.assert_allclose(np.asarray(dk), sum(g[1] for g in per_item), atol=1e-4)
    np.testing.assert_allclose(np.asarray(dv), sum(g[2] for g in per_item), atol=1e-4)
    # vmap of grad: one gradient per item.
    per = jax.jit(jax.vmap(jax.grad(loss, argnums=(0, 1, 2)), in_axes=(0, None, None, 0)))(
        qs, k, v, douts)
    for i in range(2):
        check_grads([g[i] for g in per], douts[i], qs[i], k, v, causal=True)
        np.testing.assert_allclose(np.asarray(dq[i]), per_item[i][0], atol=1e-4)


# ---------------------------------------------------------------------------------------
# Variable-length batches.

def cu(lengths):
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)


def varlen_problem(rng, lens_q=(5, 0, 17, 3), lens_k=(9, 4, 17, 0), nheads=4, nheads_kv=2,
                   headdim=32, dtype=F32):
    q = randn(rng, (sum(lens_q), nheads, headdim), dtype)
    k = randn(rng, (sum(lens_k), nheads_kv, headdim), dtype)
    v = randn(rng, (sum(lens_k), nheads_kv, headdim), dtype)
    return q, k, v, randn(rng, q.shape, dtype), cu(lens_q), cu(lens_k), max(lens_q), \
        max(lens_k)


@pytest.mark.parametrize("options", OPTIONS, ids=str)
def test_varlen_forward_and_grad(rng, options):
    """Sequences of length 0 included (no queries; no keys)."""
    q, k, v, dout, cu_q, cu_k, max_q, max_k = varlen_problem(rng)
    options = slopes_for(rng, options, 4, 4)

    def f(q, k, v, cu_q, cu_k):
        return fj.attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, return_lse=True,
                                   **options)
    out, lse = jax.jit(f)(q, k, v, cu_q, cu_k)
    opts = ref_options(options)
    ref = reference.attention_varlen_forward(q, k, v, cu_q, cu_k, max_q, max_k, **opts)
    naive = reference.attention_varlen_forward(q, k, v, cu_q, cu_k, max_q, max_k, **opts,
                                               upcast=False)
    assert_close("out", np.asarray(out), ref[0], naive[0])
    assert_close("lse", np.asarray(lse), ref[1], naive[1])

    def loss(q, k, v):
        return jnp.sum(f(q, k, v, cu_q, cu_k)[0] * dout)
    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
    ref = reference.attention_varlen_backward(dout, q, k, v, cu_q, cu_k, max_q, max_k, **opts)
    naive = reference.attention_varlen_backward(dout, q, k, v, cu_q, cu_k, max_q, max_k,
                                                **opts, upcast=False)
    for name, got, r, n in zip(("dq", "dk", "dv"), grads, ref, naive):
        assert_close(name, np.asarray(got), r, n)


def test_varlen_vmap_and_lse_grad(rng):
    """vmap over packed batches with their own prefix sums; the lse cotangent of varlen
    against dense attention run per sequence."""
    lens = [(6, 0, 9), (2, 11, 2)]
    probs = [varlen_problem(rng, l, l) for l in lens]
    stack = [np.stack([p[i] for p in probs]) for i in range(6)]
    q, k, v, dout, cu_q, cu_k = stack

    def f(q, k, v, cu_q, cu_k):
        return fj.attention_varlen(q, k, v, cu_q, cu_k, 11, 11, causal=True)
    out = jax.jit(jax.vmap(f))(q, k, v, cu_q, cu_k)
    for i in range(2):
        ref = reference.attention_varlen_forward(q[i], k[i], v[i], cu_q[i], cu_k[i], 11, 11,
                                                 causal=True)[0]
        np.testing.assert_allclose(np.asarray(out[i]), ref, atol=1e-5)

    q, k, v, dout, cu_q, cu_k, max_q, max_k = probs[0]
    dlse = randn(rng, (4, q.shape[0]))

    def varlen_loss(q, k, v):
        out, lse = fj.attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal=True,
                                       return_lse=True)
        return jnp.sum(out * dout) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0) * dlse)

    def dense_loss(q, k, v):
        total = 0.0
        for b in range(len(cu_q) - 1):
            sq, sk = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
            if cu_q[b] == cu_q[b + 1] or cu_k[b] == cu_k[b + 1]:
                continue
            out, lse = jnp_attention(q[None, sq], k[None, sk], v[None, sk], causal=True)
            total = total + jnp.sum(out[0] * dout[sq]) + jnp.sum(lse[0] * dlse[:, sq])
        return total
    got = jax.jit(jax.grad(varlen_loss, argnums=(0, 1, 2)))(q, k, v)
    want = jax.jit(jax.grad(dense_loss, argnums=(0, 1, 2)))(q, k, v)
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=2e-5, rtol=1e-4)


def test_varlen_bad_prefix_sums_raise_on_the_cpu(rng):
    q, k, v, _, cu_q, cu_k, max_q, max_k = varlen_problem(rng)
    bad = cu_q.copy()
    bad[1] = bad[2] + 1  # decreasing
    with pytest.raises(Exception, match="cu_seqlens_q"):
        np.asarray(fj.attention_varlen(q, k, v, bad, cu_k, max_q, max_k))


# ---------------------------------------------------------------------------------------
# KV cache.

def kv_problem(rng, paged, batch=3, capacity=64, page_size=16, seqlen_new=2):
    nheads, nheads_kv, headdim = 4, 2, 32
    q = randn(rng, (batch, 1, nheads, headdim))
    k, v = (randn(rng, (batch, seqlen_new, nheads_kv, headdim)) for _ in range(2))
    lengths = np.array([0, 7, 40][:batch], np.int32)
    if paged:
        pages = capacity // page_size
        blocks = batch * pages + 2
        table = rng.permutation(blocks)[:batch * pages].reshape(batch, pages).astype(np.int32)
        shape = (blocks, page_size, nheads_kv, headdim)
    else:
        table, shape = None, (batch, capacity, nheads_kv, headdim)
    k_cache, v_cache = randn(rng, shape), randn(rng, shape)
    return q, k_cache, v_cache, k, v, lengths, table


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("options", [{}, {"causal": True, "softcap": 3.0},
                                     {"window": (6, 0), "alibi_slopes": "heads"}], ids=str)
def test_kvcache_append(rng, paged, options):
    q, k_cache, v_cache, k, v, lengths, table = kv_problem(rng, paged)
    options = slopes_for(rng, options, 3, 4)
    k_in, v_in = jnp.asarray(k_cache), jnp.asarray(v_cache)

    @jax.jit
    def step(q, k_cache, v_cache, k, v, lengths, table):
        return fj.attention_with_kvcache(q, k_cache, v_cache, k=k, v=v, cache_seqlens=lengths,
                                         block_table=table, return_lse=True, **options)
    out, lse, k_new, v_new = step(q, k_in, v_in, k, v, lengths, table)
    # The inputs are unchanged; the returned caches are them plus the new rows.
    assert (np.asarray(k_in) == k_cache).all() and (np.asarray(v_in) == v_cache).all()
    want_k, want_v = k_cache.copy(), v_cache.copy()
    cuflash.attention_with_kvcache(q, want_k, want_v, k=k, v=v, cache_seqlens=lengths,
                                   block_table=table, **ref_options(options))
    assert (np.asarray(k_new) == want_k).all() and (np.asarray(v_new) == want_v).all()
    assert not (want_k == k_cache).all()
    opts = ref_options(options)
    ref = reference.attention_with_kvcache(q, k_cache, v_cache, k=k, v=v,
                                           cache_seqlens=lengths, block_table=table, **opts)
    naive = reference.attention_with_kvcache(q, k_cache, v_cache, k=k, v=v,
                                             cache_seqlens=lengths, block_table=table,
                                             **opts, upcast=False)
    assert_close("out", np.asarray(out), ref[0], naive[0])
    assert_close("lse", np.asarray(lse), ref[1], naive[1])


def test_kvcache_without_append_and_static_lengths(rng):
    q, k_cache, v_cache, _, _, _, _ = kv_problem(rng, False)
    out, k_same, v_same = jax.jit(lambda q, kc, vc: fj.attention_with_kvcache(
        q, kc, vc, cache_seqlens=20, causal=True))(q, k_cache, v_cache)
    ref = reference.attention_forward(q, k_cache[:, :20], v_cache[:, :20], causal=True)[0]
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5)
    assert (np.asarray(k_same) == k_cache).all()


def test_kvcache_donated_caches(rng):
    """A decode loop that donates its caches: XLA may reuse them; the results are the
    same as without donation."""
    q, k_cache, v_cache, k, v, lengths, table = kv_problem(rng, True)
    step = jax.jit(lambda kc, vc, q, k, v, n: fj.attention_with_kvcache(
        q, kc, vc, k=k, v=v, cache_seqlens=n, block_table=table), donate_argnums=(0, 1))
    kc, vc = jnp.asarray(k_cache), jnp.asarray(v_cache)
    want_k, want_v = k_cache.copy(), v_cache.copy()
    for t in range(3):
        n = lengths + 2 * t
        out, kc, vc = step(kc, vc, q, k, v, n)
        want = cuflash.attention_with_kvcache(q, want_k, want_v, k=k, v=v, cache_seqlens=n,
                                              block_table=table)
        np.testing.assert_allclose(np.asarray(out), want, atol=1e-6)
    assert (np.asarray(kc) == want_k).all() and (np.asarray(vc) == want_v).all()


def test_kvcache_vmap(rng):
    probs = [kv_problem(rng, False) for _ in range(2)]
    q, kc, vc, k, v, n = (np.stack([p[i] for p in probs]) for i in range(6))
    f = lambda q, kc, vc, k, v, n: fj.attention_with_kvcache(  # noqa: E731
        q, kc, vc, k=k, v=v, cache_seqlens=n, causal=True)
    out, k_new, _ = jax.jit(jax.vmap(f))(q, kc, vc, k, v, n)
    for i in range(2):
        want_k, want_v = kc[i].copy(), vc[i].copy()
        want = cuflash.attention_with_kvcache(q[i], want_k, want_v, k=k[i], v=v[i],
                                              cache_seqlens=n[i], causal=True)
        np.testing.assert_allclose(np.asarray(out[i]), want, atol=1e-6)
        assert (np.asarray(k_new[i]) == want_k).all()


def test_kvcache_is_not_differentiable(rng):
    q, k_cache, v_cache, _, _, lengths, _ = kv_problem(rng, False)
    f = lambda q: fj.attention_with_kvcache(q, k_cache, v_cache,  # noqa: E731
                                            cache_seqlens=lengths)[0].sum()
    with pytest.raises(TypeError, match="no derivative"):
        jax.grad(f)(q)


# ---------------------------------------------------------------------------------------
# Merging, and ring attention through grad.

def test_merge_matches_cuflash(rng):
    outs = randn(rng, (3, 2, 5, 4, 16))
    lses = randn(rng, (3, 2, 4, 5))
    lses[0, 0, 1] = -np.inf          # a part that saw no key
    lses[:, 1, 2, 3] = -np.inf       # a row that no part saw
    out, lse = jax.jit(fj.merge_attention)(outs, lses)
    want_out, want_lse = cuflash.merge_attention(outs, lses)
    np.testing.assert_allclose(np.asarray(out), want_out, atol=1e-6)
    np.testing.assert_array_equal(np.isneginf(np.asarray(lse)), np.isneginf(want_lse))
    out2, _ = fj.merge_attention(list(outs), list(lses))
    np.testing.assert_allclose(np.asarray(out2), want_out, atol=1e-6)
    batched = jax.vmap(fj.merge_attention)(np.stack([outs, outs[::-1]]),
                                           np.stack([lses, lses[::-1]]))
    np.testing.assert_allclose(np.asarray(batched[0][0]), want_out, atol=1e-6)


def test_ring_attention_grad(rng):
    """Attention over two halves of the keys merged by lse equals attention over all of
    them, gradients included (through merge's backward and attention's lse cotangent)."""
    q, k, v, dout = problem(rng, seqlen_q=16, seqlen_k=40)

    def ring(q, k, v):
        parts = [fj.attention(q, k[:, s], v[:, s], return_lse=True)
                 for s in (slice(0, 25), slice(25, 40))]
        return fj.merge_attention([p[0] for p in parts], [p[1] for p in parts])[0]

    out = jax.jit(ring)(q, k, v)
    check_forward(out, None, q, k, v)
    grads = grads_of(ring, q, k, v, dout)
    check_grads(grads, dout, q, k, v)


# ---------------------------------------------------------------------------------------
# Errors.

def test_errors(rng):
    q, k, v, _ = problem(rng)
    with pytest.raises(ValueError, match="4 dimensions"):
        fj.attention(q[0], k, v)
    with pytest.raises(TypeError, match="dtype"):
        fj.attention(q, k.astype(F16), v)
    with pytest.raises(TypeError, match="static"):
        jax.jit(lambda q, s: fj.attention(q, k, v, scale=s))(q, 0.5)
    with pytest.raises(TypeError, match="float32"):
        fj.attention(q, k, v, alibi_slopes=np.ones(4, np.float64))
    with pytest.raises(Exception, match="headdim"):  # cuflash's own check, at run time
        np.asarray(fj.attention(q[..., :12], k[..., :12], v[..., :12]))


# ---------------------------------------------------------------------------------------
# GPU: the kernels on XLA's stream.

def jax_gpu():
    try:
        return jax.devices("gpu")[0]
    except RuntimeError:
        pytest.skip("JAX has no GPU backend (install jax[cuda12] or jax[cuda13])")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [BF16, F16], ids=str)
@pytest.mark.parametrize("options", [{"causal": True}, {"window": (64, 0), "softcap": 5.0},
                                     {"alibi_slopes": "batch"}], ids=str)
def test_gpu_jit_and_grad(rng, dtype, options):
    device = jax_gpu()
    q, k, v, dout = problem(rng, dtype, batch=2, seqlen_q=300, seqlen_k=517, nheads=8,
                            nheads_kv=2, headdim=128)
    options = slopes_for(rng, options, 2, 8)
    put = lambda x: jax.device_put(x, device)  # noqa: E731
    f = lambda q, k, v: fj.attention(q, k, v, return_lse=True, **options)  # noqa: E731
    out, lse = jax.jit(f)(put(q), put(k), put(v))
    assert out.devices() == {device}
    check_forward(out, lse, q, k, v, **options)
    grads = grads_of(lambda q, k, v: f(q, k, v)[0], put(q), put(k), put(v), put(dout))
    check_grads(grads, dout, q, k, v, **options)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
def test_gpu_repeated_calls_take_the_fast_path(monkeypatch, layout):
    # After the first call of a compiled program, the dense bodies go from XLA's addresses
    # straight to cuflash's launch: new inputs of the same shapes must give their own
    # answers, cuflash's public functions run for the first call only, and the backward
    # runs in the workspace XLA allocated (no scratch from CuPy's pool after the first).
    device = jax_gpu()
    public = []
    for name in ("attention_forward", "attention_backward"):
        real = getattr(cuflash, name)
        monkeypatch.setattr(cuflash, name, lambda *a, _real=real, _name=name, **kw:
                            public.append(_name) or _real(*a, **kw))
    scratch = _core.scratch
    monkeypatch.setattr(_core, "scratch", lambda *a: public.append("scratch") or scratch(*a))
    swap = (lambda x: x) if layout == "bshd" else (lambda x: np.swapaxes(x, 1, 2))
    f = jax.jit(jax.value_and_grad(
        lambda q, k, v, dout: jnp.sum(
            fj.attention(q, k, v, causal=True, layout=layout).astype(jnp.float32) *
            dout.astype(jnp.float32)), argnums=(0, 1, 2)))
    for seed in range(3):
        q, k, v, dout = problem(np.random.default_rng(seed), BF16, batch=2, seqlen_q=200,
                                seqlen_k=333, nheads=4, nheads_kv=2, headdim=64)
        _, grads = f(*(jax.device_put(swap(x), device) for x in (q, k, v, dout)))
        check_grads([swap(np.asarray(g)) for g in grads], dout, q, k, v, causal=True)
    assert public == ["attention_forward", "attention_backward", "scratch"]


@pytest.mark.gpu
def test_gpu_eager_backward_with_a_cpu_default_device_after_jit():
    # Eagerly, platform_dependent picks its branch on the default device: with the CPU
    # default, the backward on GPU buffers gets an empty workspace. A fast path that the
    # jitted program built for a full one must not be taken then (it would write the
    # scratch at the empty buffer's address).
    device = jax_gpu()
    q, k, v, dout = problem(np.random.default_rng(0), BF16, batch=2, seqlen_q=200,
                            seqlen_k=333, nheads=4, nheads_kv=2, headdim=64)
    args = [jax.device_put(x, device) for x in (q, k, v)]
    loss = lambda q, k, v: jnp.sum(  # noqa: E731
        fj.attention(q, k, v, causal=True).astype(jnp.float32) *
        jax.device_put(dout, device).astype(jnp.float32))
    step = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    for _ in range(2):
        check_grads([np.asarray(g) for g in step(*args)], dout, q, k, v, causal=True)
    with jax.default_device(jax.devices("cpu")[0]):
        grads = jax.grad(loss, argnums=(0, 1, 2))(*args)
    check_grads([np.asarray(g) for g in grads], dout, q, k, v, causal=True)


@pytest.mark.gpu
def test_gpu_varlen_kvcache_merge(rng):
    device = jax_gpu()
    put = lambda x: None if x is None else jax.device_put(x, device)  # noqa: E731
    q, k, v, dout, cu_q, cu_k, max_q, max_k = varlen_problem(rng, dtype=BF16, headdim=64)
    out = jax.jit(lambda *a: fj.attention_varlen(*a, max_q, max_k, causal=True))(
        *(put(x) for x in (q, k, v, cu_q, cu_k)))
    ref = reference.attention_varlen_forward(q, k, v, cu_q, cu_k, max_q, max_k, causal=True)
    naive = reference.attention_varlen_forward(q, k, v, cu_q, cu_k, max_q, max_k,
                                               causal=True, upcast=False)
    assert_close("out", np.asarray(out), ref[0], naive[0])
    q, k_cache, v_cache, k, v, lengths, table = kv_problem(rng, True)
    q, k_cache, v_cache, k, v = (x.astype(BF16) for x in (q, k_cache, v_cache, k, v))
    out, k_new, _ = jax.jit(lambda *a: fj.attention_with_kvcache(
        a[0], a[1], a[2], k=a[3], v=a[4], cache_seqlens=a[5], block_table=a[6]))(
        *(put(x) for x in (q, k_cache, v_cache, k, v, lengths, table)))
    ref = reference.attention_with_kvcache(q, k_cache, v_cache, k=k, v=v,
                                           cache_seqlens=lengths, block_table=table)
    naive = reference.attention_with_kvcache(q, k_cache, v_cache, k=k, v=v,
                                             cache_seqlens=lengths, block_table=table,
                                             upcast=False)
    assert_close("out", np.asarray(out), ref[0], naive[0])
    outs, lses = randn(rng, (3, 2, 5, 4, 64), BF16), randn(rng, (3, 2, 4, 5))
    got = jax.jit(fj.merge_attention)(put(outs), put(lses))
    want = cuflash.merge_attention(outs, lses)
    np.testing.assert_allclose(np.asarray(got[0]).astype(F32), want[0].astype(F32),
                               atol=1e-2)


def train(device, dtype, dim, heads, seqlen, batch, steps):
    """A jitted training loop of one attention layer (activations in ``dtype``, float32
    weights) learning the identity (the layer can: queries and keys that pick each token
    itself); returns the losses."""
    keys = jax.random.split(jax.random.key(0), 5)
    params = {n: jax.random.normal(key, (dim, dim), jnp.float32) * dim ** -0.5
              for n, key in zip(("wq", "wk", "wv", "wo"), keys)}
    params = jax.device_put(params, device)
    x = jax.device_put(jax.random.normal(keys[4], (batch, seqlen, dim)), device)

    def loss(params, x):
        def heads_of(w):
            return (x @ w).astype(dtype).reshape(batch, seqlen, heads, dim // heads)
        out = fj.attention(heads_of(params["wq"]), heads_of(params["wk"]),
                           heads_of(params["wv"]), causal=True)
        y = out.reshape(batch, seqlen, dim).astype(jnp.float32) @ params["wo"]
        return jnp.mean((y - x) ** 2)

    @jax.jit
    def step(params, moments, x):  # Adam, lr 1e-2
        value, grads = jax.value_and_grad(loss)(params, x)
        m, v, t = moments
        m = jax.tree.map(lambda m, g: 0.9 * m + 0.1 * g, m, grads)
        v = jax.tree.map(lambda v, g: 0.999 * v + 0.001 * g * g, v, grads)
        t = t + 1
        params = jax.tree.map(
            lambda p, m, v: p - 1e-2 * (m / (1 - 0.9 ** t)) / (
                jnp.sqrt(v / (1 - 0.999 ** t)) + 1e-8), params, m, v)
        return params, (m, v, t), value

    zeros = jax.tree.map(jnp.zeros_like, params)
    moments, losses = (zeros, zeros, jnp.zeros((), jnp.float32)), []
    for _ in range(steps):
        params, moments, value = step(params, moments, x)
        losses.append(float(value))
    return losses


def test_training_loop_loss_falls_on_the_cpu():
    losses = train(jax.devices("cpu")[0], jnp.float32, 64, 2, 32, 2, 40)
    assert all(np.isfinite(losses))
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [BF16, F16], ids=str)
def test_gpu_training_loop_loss_falls(dtype):
    losses = train(jax_gpu(), dtype, 512, 4, 256, 8, 40)
    assert all(np.isfinite(losses))
    assert losses[-1] < 0.5 * losses[0], losses
