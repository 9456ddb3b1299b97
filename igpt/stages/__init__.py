"""Training stages: each turns a batch into a summed loss and its token count.

One file per stage (pretrain, sft; rm, dpo and ppo follow the same interface). The trainer normalises the summed
loss by the number of loss tokens in the *global* batch, so every token weighs the same whatever the world size or
how padding falls across micro-batches.
"""

from __future__ import annotations

import importlib

from igpt.stages.base import Stage, StageOutput


def build_stage(cfg) -> Stage:
    """The stage named by ``stage.name`` (igpt/stages/<name>.py defines ``STAGE``)."""
    try:
        module = importlib.import_module(f"igpt.stages.{cfg.name}")
    except ModuleNotFoundError as e:
        raise ValueError(f"stage.name={cfg.name!r}: no such stage (igpt/stages/{cfg.name}.py)") from e
    return module.STAGE(cfg)


__all__ = ["Stage", "StageOutput", "build_stage"]
