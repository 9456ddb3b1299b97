"""igpt's Triton kernels (installed as ``igpt.kernels``): flash attention and fused cross-entropy.

Call forms follow the ``flash_attn`` package and Liger-Kernel so attention and loss backends swap freely:

- :func:`flash_attn_func`, :func:`flash_attn_varlen_func` (``flash_attn.py``)
- :func:`cross_entropy` (``cross_entropy.py``), :func:`fused_linear_cross_entropy` (``fused_linear_cross_entropy.py``)
- :func:`triton_available` says whether they can run here; a kernel called where it cannot run raises
  :class:`KernelUnavailableError` (a ``RuntimeError``) naming the reason.

Torch references for every kernel live in ``reference.py``. To run on CPU, set ``TRITON_INTERPRET=1`` before this
package is first imported (Triton reads it when the kernels are defined).
"""

from .cross_entropy import cross_entropy
from .flash_attn import flash_attn_func, flash_attn_varlen_func
from .fused_linear_cross_entropy import fused_linear_cross_entropy
from .runtime import KernelUnavailableError, triton_available

__all__ = [
    "KernelUnavailableError",
    "cross_entropy",
    "flash_attn_func",
    "flash_attn_varlen_func",
    "fused_linear_cross_entropy",
    "triton_available",
]
