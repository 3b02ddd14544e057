"""cuflash: exact FlashAttention for CuPy, JAX and NumPy, without PyTorch.

CuPy arrays (and CUDA arrays of other frameworks, through DLPack) run tensor-core kernels
compiled at run time by NVRTC; NumPy arrays run the same tiled algorithm on the CPU.
"""
from . import reference
from .attention import (attention, attention_backward, attention_forward, attention_varlen,
                        attention_varlen_backward, attention_varlen_forward, attention_vjp)
from .kvcache import attention_with_kvcache
from .merge import merge_attention

__version__ = "0.1.0"
__all__ = ["attention", "attention_forward", "attention_backward", "attention_vjp",
           "attention_varlen", "attention_varlen_forward", "attention_varlen_backward",
           "attention_with_kvcache", "merge_attention", "reference"]
