"""The one device resolver for the trainer and every tool: ``device=auto|cpu|cuda|cuda:<n>``."""

from __future__ import annotations

import os

import torch


def resolve_device(name: str, key: str = "device") -> torch.device:
    """``auto``: CUDA when available, else the CPU; ``cuda``: this process's GPU (``LOCAL_RANK``, 0 alone); an error
    naming ``key`` for CUDA without CUDA or an unknown name."""
    from igpt.errors import ConfigError

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ConfigError(f"{key}={name} but CUDA is not available here (use {key}=cpu or {key}=auto)")
        if name == "cuda":
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device(name)
    raise ConfigError(f"{key}={name!r}: expected auto, cpu, cuda or cuda:<n>")


__all__ = ["resolve_device"]
