"""The strategy interface: how a model and its optimizer are spread over processes.

A strategy is applied from outside the model, in one place (torchtitan's ``parallelize`` idea): activation
checkpointing, then ``torch.compile``, then the data-parallel wrapper. The trainer only talks to this interface, so
``strategy=single|ddp|fsdp|zero1|zero2|zero3`` changes nothing else.

Gradient convention: the trainer calls ``backward(loss)`` with ``loss = sum_loss * world_size / global_tokens`` for
every micro-batch; every strategy averages gradients over ranks, so the accumulated gradient is exactly that of the
global token-mean loss whatever the world size.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from igpt.config import OptimConfig, StrategyConfig

log = logging.getLogger("igpt")


def init_distributed(device: torch.device, timeout_s: int) -> tuple[int, int, int]:
    """Start the process group when launched by torchrun (RANK/WORLD_SIZE set); return (rank, world, local_rank).

    The collective timeout makes a dead or failed rank end the job instead of hanging the others.
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1, 0
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay on matrices, none on norms, biases and embeddings (GPT-3 / Llama practice)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "embed" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_adamw(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps
    )


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each transformer block in the backward pass (saves activation memory, costs one extra forward)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    for i, block in enumerate(model.layers):
        model.layers[i] = checkpoint_wrapper(block)


class Strategy:
    """Single-process strategy; the others subclass it and override what differs."""

    name = "single"
    #: parameters are sharded: every rank must take part in every forward (eval, generation)
    sharded = False

    def __init__(self, cfg: StrategyConfig, precision: str, device: torch.device) -> None:
        self.cfg = cfg
        self.precision = precision
        self.device = device
        self.rank, self.world_size, self.local_rank = init_distributed(device, cfg.timeout_s)
        self.model: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None

    # ---- setup -----------------------------------------------------------------------------------------------
    def prepare_model(self, model: nn.Module) -> nn.Module:
        """Activation checkpointing and compile, the parts every strategy shares, applied in this order."""
        if self.cfg.activation_checkpointing:
            apply_activation_checkpointing(model)
        if self.cfg.compile:
            for block in model.layers:
                block.compile()  # in place: state-dict keys stay those of the plain model
        return model

    def wrap(self, model: nn.Module, optim_cfg: OptimConfig) -> tuple[nn.Module, torch.optim.Optimizer]:
        model = self.prepare_model(model.to(self.device))
        self.model, self.optimizer = model, build_adamw(model, optim_cfg)
        return self.model, self.optimizer

    @property
    def module(self) -> nn.Module:
        """The plain model (for generation and state dicts)."""
        assert self.model is not None
        return self.model

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast around forward passes when precision=bf16 (sharded strategies use their own policies)."""
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # ---- step --------------------------------------------------------------------------------------------------
    def no_sync(self, last_micro: bool) -> contextlib.AbstractContextManager:
        """Skip gradient synchronisation on all but the last micro-batch of an accumulation."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def clip_and_step(self, max_norm: float, skip: bool = False) -> float:
        """Clip gradients to ``max_norm`` (0: no clipping), step the optimizer unless ``skip``, zero gradients.

        Returns the total gradient norm before clipping."""
        assert self.model is not None and self.optimizer is not None
        params = [p for p in self.model.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
        if not skip:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def set_lr(self, lr: float) -> None:
        assert self.optimizer is not None
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    # ---- collectives ------------------------------------------------------------------------------------------
    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
        return t

    def all_gather_object(self, obj: Any) -> list[Any]:
        if self.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any) -> Any:
        if self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    # ---- state -------------------------------------------------------------------------------------------------
    def model_state_dict(self) -> dict[str, torch.Tensor]:
        """Full (unsharded) model weights on CPU; on rank 0 at least (other ranks may get an empty dict)."""
        return {k: v.detach().to("cpu") for k, v in _unwrap(self.module).state_dict().items()}

    def save(self, ckpt_dir: str) -> list[str]:
        """Write model and optimizer state into ``ckpt_dir``; return the files written (relative names)."""
        from safetensors.torch import save_file

        assert self.optimizer is not None
        from igpt.checkpoint import savable_state

        if self.rank == 0:
            state = savable_state(_unwrap(self.module), self.model_state_dict())
            save_file(state, os.path.join(ckpt_dir, "model.safetensors"), metadata={"format": "pt"})
            torch.save(self.optimizer.state_dict(), os.path.join(ckpt_dir, "optimizer.pt"))
        return ["model.safetensors", "optimizer.pt"]

    def load(self, ckpt_dir: str) -> None:
        """Restore model and optimizer state written by ``save`` (any strategy's consolidated format)."""
        from igpt.checkpoint import load_weights, read_model_state

        assert self.optimizer is not None
        load_weights(_unwrap(self.module), read_model_state(ckpt_dir), ckpt_dir)
        path = os.path.join(ckpt_dir, "optimizer.pt")
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"{path}: optimizer state missing; this checkpoint was written by another strategy "
                "(resume under the strategy that wrote it, or start a new run with init_from=)"
            )
        self.optimizer.load_state_dict(torch.load(path, map_location=self.device, weights_only=True))

    def teardown(self) -> None:
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def _unwrap(model: nn.Module) -> nn.Module:
    """Strip the DDP wrapper (checkpoint wrappers and in-place compile keep the plain model's state-dict keys)."""
    while True:
        if isinstance(getattr(model, "module", None), nn.Module):
            model = model.module
        else:
            return model
