"""tests/fake_cupy.py against the installed CuPy: the launch layer's CPU proof holds only
if the fake takes what the real CuPy takes. Every runtime and driver function the fake
offers exists in CuPy under that name with as many positional parameters (CuPy's are
Cython functions: their signature is the first line of their docstring), its constants
have CuPy's values, and its ``cuda.Stream`` takes CuPy's keywords. No GPU needed."""
import inspect
import re

import pytest

import fake_cupy

cupy = pytest.importorskip("cupy")
FAKE = fake_cupy.World().module
# The fake's variadic launchKernel checks its count itself (CuPy's 11).
VARIADIC = {"launchKernel": 11}


def cython_arity(fn) -> int:
    """Positional parameters of a Cython function, from its docstring's signature line."""
    first = (fn.__doc__ or "").strip().splitlines()[0]
    match = re.match(rf"{fn.__name__}\((.*?)\)", first)
    assert match, f"no signature line in the docstring of {fn.__name__}: {first!r}"
    return len([p for p in match.group(1).split(",") if p.strip()])


@pytest.mark.parametrize("module", ["runtime", "driver"])
def test_fake_functions_match_cupys(module):
    fake, real = getattr(FAKE.cuda, module), getattr(cupy.cuda, module)
    names = [n for n in vars(fake) if not n.startswith("_")]
    assert names
    for name in names:
        ours = getattr(fake, name)
        assert hasattr(real, name), f"cupy.cuda.{module}.{name} does not exist"
        theirs = getattr(real, name)
        if isinstance(ours, int):
            assert ours == theirs, f"cupy.cuda.{module}.{name} is {theirs}, the fake's {ours}"
        elif inspect.isroutine(ours):
            params = inspect.signature(ours).parameters.values()
            want = VARIADIC.get(name) if any(p.kind == p.VAR_POSITIONAL for p in params) \
                else len(params)
            assert cython_arity(theirs) == want, (
                f"cupy.cuda.{module}.{name} takes {cython_arity(theirs)} arguments, the "
                f"fake {want}")


def test_fake_stream_takes_cupys_keywords():
    ours = inspect.signature(FAKE.cuda.Stream).parameters
    theirs = inspect.signature(cupy.cuda.Stream).parameters
    assert set(ours) <= set(theirs), (list(ours), list(theirs))
    for attr in ("ptr", "synchronize", "is_capturing"):
        assert hasattr(cupy.cuda.Stream.null, attr), attr
