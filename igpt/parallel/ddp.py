"""DistributedDataParallel: full replicas, gradients all-reduced (averaged) across ranks."""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from igpt.config import OptimConfig
from igpt.parallel.base import Strategy, build_adamw


class DDPStrategy(Strategy):
    name = "ddp"

    def wrap(self, model: nn.Module, optim_cfg: OptimConfig) -> tuple[nn.Module, torch.optim.Optimizer]:
        model = self.prepare_model(model.to(self.device))
        if self.world_size > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            model = DistributedDataParallel(model, device_ids=ids)
        self.model, self.optimizer = model, build_adamw(model, optim_cfg)
        return self.model, self.optimizer

    @property
    def module(self) -> nn.Module:
        assert self.model is not None
        return self.model.module if isinstance(self.model, DistributedDataParallel) else self.model

    def no_sync(self, last_micro: bool) -> contextlib.AbstractContextManager:
        if last_micro or not isinstance(self.model, DistributedDataParallel):
            return contextlib.nullcontext()
        return self.model.no_sync()
