"""Training stages: the one place that names them, the data kind each reads and whether it uses the chat template.

A stage (``igpt/stages/<name>.py``, interface in ``igpt.stages.base``) declares the models it needs by role, turns
batches into a summed loss with its count and metric sums, and owns its evaluation; the trainer runs the loop for
every stage and strategy. This module imports nothing heavy, so the data tools and the config schema can read it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class StageInfo:
    name: str
    kind: str  # the prepared data kind (igpt.data.kinds) it reads from data.dir
    chat: bool  # trained on chat-template data: its checkpoints generate with the chat template


STAGES: dict[str, StageInfo] = {
    s.name: s
    for s in (
        StageInfo("pretrain", "text", chat=False),
        StageInfo("sft", "sft", chat=True),
        StageInfo("rm", "pref", chat=True),
        StageInfo("dpo", "pref", chat=True),
        StageInfo("ppo", "prompt", chat=True),
    )
}
CHAT_STAGES: tuple[str, ...] = tuple(name for name, s in STAGES.items() if s.chat)


def build_stage(cfg):
    """The stage named by ``cfg.stage.name`` (``igpt/stages/<name>.py`` defines ``STAGE``) for the whole ``Config``."""
    name = cfg.stage.name
    if name not in STAGES:
        raise ValueError(f"stage.name={name!r}: expected one of {', '.join(STAGES)}")
    module = importlib.import_module(f"igpt.stages.{name}")
    return module.STAGE(cfg)


__all__ = ["CHAT_STAGES", "STAGES", "StageInfo", "build_stage"]
