"""The public functions carry type hints, and the package says so (PEP 561's py.typed)."""
import inspect
from pathlib import Path

import pytest

import cuflash
from cuflash import flash_attn


@pytest.mark.parametrize("fn", [getattr(cuflash, n) for n in cuflash.__all__ if n != "reference"]
                         + [flash_attn.flash_attn_func, flash_attn.flash_attn_varlen_func,
                            flash_attn.flash_attn_with_kvcache])
def test_every_parameter_and_result_is_annotated(fn):
    sig = inspect.signature(fn)
    missing = [p.name for p in sig.parameters.values()
               if p.annotation is inspect.Parameter.empty and p.kind is not p.VAR_KEYWORD]
    assert not missing, f"{fn.__name__}: no type hint for {missing}"
    assert sig.return_annotation is not inspect.Signature.empty, fn.__name__


def test_the_package_is_marked_typed():
    assert (Path(cuflash.__file__).parent / "py.typed").is_file()
