"""Build the trainers of ``tests/test_init.py`` under one strategy (``torchrun -m tests.init_worker OUT SPEC``) and
write, on rank 0, the full initial weights of every model each one declares, with torch's RNG state after set-up.

``SPEC`` is a JSON list of override lists, one trainer each; they share the process group and are built one after
the other (each one's models gathered with ``Wrapped.full_state_dict``, collective)."""

from __future__ import annotations

import json
import sys

import torch

from tests.trainutil import make_trainer


def build_all(specs: list[list[str]]) -> list[dict]:
    """For each override list: ``{"models": {role: full state dict}, "rng": torch's RNG state}``."""
    out, trainers = [], []
    for overrides in specs:
        trainer = make_trainer(overrides)
        rng = torch.get_rng_state()
        models = {role: handle.full_state_dict() for role, handle in trainer.models.items()}
        out.append({"models": models, "rng": rng})
        trainers.append(trainer)
    rank = trainers[-1].rank
    trainers[-1].close()
    return out if rank == 0 else []


if __name__ == "__main__":
    path, specs = sys.argv[1], json.loads(sys.argv[2])
    result = build_all(specs)
    if result:
        torch.save(result, path)
