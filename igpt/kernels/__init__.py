"""igpt's Triton kernels, ``igpt.kernels``: flash attention and fused cross-entropy (modules in ``kernels/``).

Call forms follow the ``flash_attn`` package and Liger-Kernel so attention and loss backends swap freely:

- :func:`flash_attn_func`, :func:`flash_attn_varlen_func` (``flash_attn.py``)
- :func:`cross_entropy` (``cross_entropy.py``), :func:`fused_linear_cross_entropy` (``fused_linear_cross_entropy.py``)
- :func:`triton_available` says whether they can run here; a kernel called where it cannot run raises
  :class:`KernelUnavailableError` (a ``RuntimeError``) naming the reason.

Torch references for every kernel live in ``reference.py``. To run on CPU, set ``TRITON_INTERPRET=1`` before this
package is first imported (Triton reads it when the kernels are defined).
"""

import os as _os

# Where the kernel modules are. In a built wheel they sit beside this file (setup.py copies them into igpt/kernels/).
# In a source checkout or an editable install they stay in the repository's top-level kernels/ folder, which on purpose
# has no __init__.py: a folder without one is at most a namespace portion, and Python prefers any regular package of
# the same name, so `import kernels` from the repository root (python -c, python -m, pytest, torchrun) finds the
# unrelated PyPI package `kernels` that transformers imports, never these files. See docs/internals.md.
_here = _os.path.dirname(_os.path.abspath(__file__))
_checkout = _os.path.join(_os.path.dirname(_os.path.dirname(_here)), "kernels")
_in_wheel = _os.path.isfile(_os.path.join(_here, "flash_attn.py"))
if not _in_wheel and _os.path.isfile(_os.path.join(_checkout, "flash_attn.py")):
    __path__.append(_checkout)  # noqa: F821 (a package's __path__)

from .cross_entropy import cross_entropy  # noqa: E402
from .flash_attn import flash_attn_func, flash_attn_varlen_func  # noqa: E402
from .fused_linear_cross_entropy import fused_linear_cross_entropy  # noqa: E402
from .runtime import KernelUnavailableError, triton_available  # noqa: E402

__all__ = [
    "KernelUnavailableError",
    "cross_entropy",
    "flash_attn_func",
    "flash_attn_varlen_func",
    "fused_linear_cross_entropy",
    "triton_available",
]
