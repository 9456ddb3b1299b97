"""A rank's part of each parameter, by the plain model's names: what a strategy holds and a weights source fills.

Below both the strategies (``igpt.parallel``) and the checkpoint readers (``igpt.checkpoint``), which both speak it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.")


def plain_name(name: str) -> str:
    """A parameter name of a wrapped model as the plain model's (activation-checkpoint and compile wrappers)."""
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


@dataclass
class Shard:
    """The part of one parameter this rank holds: elements ``[lo, hi)`` of the flattened full tensor, stored in
    ``local`` (a flat view of ``hi - lo`` elements that writes into the parameter)."""

    shape: tuple[int, ...]
    lo: int
    hi: int
    local: torch.Tensor

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def rows(self) -> tuple[int, int]:
        """The rows (first dimension) of the full tensor that cover ``[lo, hi)``."""
        if len(self.shape) < 2:
            return self.lo, self.hi
        width = math.prod(self.shape[1:])
        return self.lo // width, -(-self.hi // width)

    def write_rows(self, first_row: int, rows: torch.Tensor) -> None:
        """Copy the part of ``rows`` (full rows from ``first_row`` on) that falls in ``[lo, hi)``."""
        width = math.prod(self.shape[1:]) if len(self.shape) > 1 else 1
        self.write_flat(first_row * width, rows.reshape(-1))

    def write_flat(self, start: int, values: torch.Tensor) -> None:
        """Copy the part of ``values`` (flat elements ``[start, start + len)``) that falls in ``[lo, hi)``."""
        s, e = max(start, self.lo), min(start + values.numel(), self.hi)
        if s < e:
            self.local[s - self.lo : e - self.lo].copy_(values[s - start : e - start])


def full_shards(model: nn.Module) -> dict[str, Shard]:
    """Every parameter whole (single, ddp, zero1/2 replicas), by plain name; a shared parameter once."""
    out: dict[str, Shard] = {}
    for name, p in model.named_parameters():  # remove_duplicate: a tied matrix under its first name
        out[plain_name(name)] = Shard(tuple(p.shape), 0, p.numel(), p.data.view(-1))
    return out
