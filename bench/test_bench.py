"""pytest-benchmark suite on representative shapes of the standard sweep (bf16).

    PYTHONPATH=. python -m pytest bench/ --benchmark-columns=median,min,max

Each round is one call followed by a device sync, so a round's time is the call's real
duration; the TFLOP/s of the median round lands in the report's extra_info. For the full
comparison with peers use bench/sweep.py.
"""
import ml_dtypes
import pytest

from _common import flops, make_inputs, standard_shape

pytestmark = pytest.mark.gpu
WARMUP_ROUNDS, ROUNDS = 3, 20


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
