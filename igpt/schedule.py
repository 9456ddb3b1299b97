"""The learning-rate schedule: a pure function of the step, so a resumed run continues it exactly."""

from __future__ import annotations

import math

from igpt.config import OptimConfig


def lr_at(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Learning rate after ``step`` optimizer steps: linear warmup, then cosine, warmup-stable-decay or constant."""
    peak, floor = cfg.lr, cfg.lr * cfg.min_lr_ratio
    if step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return peak
    if cfg.schedule == "wsd":  # MiniCPM's warmup-stable-decay: flat, then a linear decay over the last fraction
        decay_start = max_steps - int(cfg.decay_fraction * max_steps)
        if step < decay_start:
            return peak
        frac = (step - decay_start) / max(1, max_steps - decay_start)
        return peak + (floor - peak) * min(1.0, frac)
    frac = (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps)
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * min(1.0, frac)))


__all__ = ["lr_at"]
