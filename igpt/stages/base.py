"""The stage interface and the language-modelling stage that pretraining and SFT share."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class StageOutput:
    loss_sum: torch.Tensor  # fp32 scalar: the loss summed over this micro-batch's loss tokens
    tokens: torch.Tensor  # int64 scalar: the number of loss tokens


class Stage:
    """Next-token cross-entropy on ``labels`` (-100 = no loss)."""

    #: the prepared data kind this stage reads
    kind = "text"
    #: whether generations should use the chat template
    chat = False

    def __init__(self, cfg) -> None:
        self.cfg = cfg

    def count_tokens(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Loss tokens in a batch (known before the forward, so the loss can be normalised globally)."""
        return (batch["labels"] != -100).sum()

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> StageOutput:
        loss_sum = model(batch["input_ids"], position_ids=batch.get("position_ids"), labels=batch["labels"])
        return StageOutput(loss_sum=loss_sum, tokens=self.count_tokens(batch))
