"""The one map from dtype names to torch dtypes, and the dtype a ``precision`` computes in.

Config keys name dtypes the short way (``precision=bf16``, ``strategy.param_dtype=fp32``); Hugging Face files and
tools the long way (``torch_dtype: bfloat16``, ``dtype=float32``). Both spell the same three dtypes.
"""

from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
    "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
}
SHORT = ("fp32", "bf16", "fp16")
LONG = ("float32", "bfloat16", "float16")


def dtype_of(name: str, key: str, names: tuple[str, ...] = SHORT) -> torch.dtype:
    """The dtype ``name`` (one of ``names``) given for ``key``; an error naming the key and the choices otherwise."""
    if name not in names:
        raise ValueError(f"{key}={name!r}: expected one of {', '.join(names)}")
    return DTYPES[name]


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype matrix multiplies run in under ``precision`` (bf16 autocast or mixed precision; else fp32)."""
    return torch.bfloat16 if precision == "bf16" else torch.float32


__all__ = ["DTYPES", "LONG", "SHORT", "compute_dtype", "dtype_of"]
