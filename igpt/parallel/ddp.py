"""DistributedDataParallel: full replicas, gradients all-reduced (averaged) across ranks.

A frozen model (a reference or reward model) is a plain replica on every rank: it has no gradients to reduce.
"""

from __future__ import annotations

import contextlib

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from igpt.config import OptimConfig
from igpt.parallel.base import Strategy, Wrapped, build_adamw


class DDPWrapped(Wrapped):
    def no_sync(self, last_micro: bool) -> contextlib.AbstractContextManager:
        if last_micro or not isinstance(self.model, DistributedDataParallel):
            return contextlib.nullcontext()
        return self.model.no_sync()


class DDPStrategy(Strategy):
    name = "ddp"
    wrapped_class = DDPWrapped

    def wrap_model(
        self, model: nn.Module, optim_cfg: OptimConfig | None = None, name: str = "policy", init=None
    ) -> Wrapped:
        trainable = optim_cfg is not None
        model = self.prepare_model(self.materialize(model, init, name), trainable=trainable)
        if trainable and self.world_size > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            model = DistributedDataParallel(model, device_ids=ids)
        optimizer = build_adamw(model, optim_cfg) if trainable else None
        return DDPWrapped(self, name, model, optimizer)
