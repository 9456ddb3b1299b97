"""Parallelism strategies, applied from outside the model (see base.Strategy)."""

from __future__ import annotations

import importlib

import torch

from igpt.config import StrategyConfig
from igpt.parallel.base import Strategy, Wrapped
from igpt.registry import STRATEGIES


def build_strategy(cfg: StrategyConfig, precision: str, device: torch.device) -> Strategy:
    """Instantiate ``strategy=<name>``; the module is imported lazily so DeepSpeed loads only when asked for."""
    module, cls = STRATEGIES[cfg.name]
    try:
        klass = getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError) as e:
        raise RuntimeError(f"strategy={cfg.name} is not available: {e}") from e
    return klass(cfg, precision, device)


__all__ = ["Strategy", "Wrapped", "build_strategy"]
