"""The strategy interface: how models and their optimizers are spread over processes.

A strategy is applied from outside the model, in one place (torchtitan's ``parallelize`` idea): activation
checkpointing, then ``torch.compile``, then the data-parallel wrapper. The trainer and the stages only talk to this
interface, so ``strategy=single|ddp|fsdp|zero1|zero2|zero3`` changes nothing else.

A strategy keeps no "current" model: ``wrap_model(model, optim_cfg)`` places one model and returns a :class:`Wrapped`
handle, as many times as a stage needs (a policy and its frozen reference; PPO's actor, critic, reference and reward
model). A trainable handle owns its optimizer, backward, gradient synchronisation, clipping, step and checkpoint
files; a frozen one (``optim_cfg=None``) is sharded the same way, in eval mode, without gradients or optimizer state.

Gradient convention: the trainer calls ``backward(loss)`` with ``loss = sum_loss * world_size / global_tokens`` for
every micro-batch; every strategy averages gradients over ranks, so the accumulated gradient is exactly that of the
global token-mean loss whatever the world size.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from igpt.config import OptimConfig, StrategyConfig

if TYPE_CHECKING:
    from igpt.parallel.init import ModelInit

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
    """AdamW groups: decay on matrices, none on norms, biases and embeddings (GPT-3 / Llama practice).

    A ZeRO-3 parameter already partitioned (meta-device initialisation) is an empty 1-d tensor; its full shape is
    ``ds_shape``."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        ndim = len(getattr(p, "ds_shape", p.shape))
        (no_decay if ndim < 2 or "embed" in name else decay).append(p)
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


class Wrapped:
    """One model as a strategy placed it (single process): call it like the model; trainable when it has an optimizer.

    Subclasses override what their wrapper changes. ``model`` is what forward passes go through (a DDP wrapper or a
    DeepSpeed engine, say), ``module`` the plain ``Transformer`` (for state dicts and attributes).
    """

    def __init__(
        self, strategy: Strategy, name: str, model: nn.Module, optimizer: torch.optim.Optimizer | None
    ) -> None:
        self.strategy = strategy
        self.name = name
        self.model = model
        self.optimizer = optimizer
        if optimizer is None:
            self.module.requires_grad_(False)
            self.module.eval()

    @property
    def trainable(self) -> bool:
        return self.optimizer is not None

    @property
    def module(self) -> nn.Module:
        return _unwrap(self.model)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def train(self, mode: bool = True) -> None:
        """Training mode for a trainable model; a frozen one stays in eval mode."""
        self.model.train(mode and self.trainable)

    def eval(self) -> None:
        self.model.eval()

    # ---- step --------------------------------------------------------------------------------------------------
    def no_sync(self, last_micro: bool) -> contextlib.AbstractContextManager:
        """Skip gradient synchronisation on all but the last micro-batch of an accumulation."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def clip_and_step(self, max_norm: float, skip: bool = False) -> float:
        """Clip gradients to ``max_norm`` (0: no clipping), step the optimizer unless ``skip``, zero gradients.

        Returns the total gradient norm before clipping."""
        assert self.optimizer is not None, f"model {self.name!r} is frozen"
        params = [p for p in self.model.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
        if not skip:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def set_lr(self, lr: float) -> None:
        assert self.optimizer is not None, f"model {self.name!r} is frozen"
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    # ---- whole weights ---------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def gathered(self) -> Iterator[nn.Module]:
        """A plain module with full weights for many forward passes in a row (generation, rollouts).

        Sharded strategies gather the weights once for the whole block instead of once per forward (collective: every
        rank enters it). Forward passes inside run without gradients."""
        with torch.no_grad():
            yield self.module

    @contextlib.contextmanager
    def full_param(self, name: str) -> Iterator[torch.Tensor]:
        """The full (unsharded) value of parameter ``name`` of the plain model, read-only (collective)."""
        yield self.module.get_parameter(name).detach()

    def held_bytes(self) -> int:
        """Bytes of parameters, fp32 master copies and optimizer state this rank holds for the model, each storage
        counted once (a flat buffer that many parameters view counts once; FSDP's and ZeRO-3's local shards only)."""
        from torch.distributed.tensor import DTensor

        seen: set[int] = set()
        total = 0

        def add(t: Any) -> None:
            nonlocal total
            if not isinstance(t, torch.Tensor):
                return
            if isinstance(t, DTensor):
                t = t.to_local()
            storage = t.untyped_storage()
            if storage.nbytes() == 0 or storage.data_ptr() in seen:
                return
            seen.add(storage.data_ptr())
            total += storage.nbytes()

        for p in self.module.parameters():
            add(p.data)
            add(getattr(p, "ds_tensor", None))  # ZeRO-3: this rank's partition of the parameter
        if self.optimizer is not None:
            inner = getattr(self.optimizer, "optimizer", self.optimizer)  # DeepSpeed wraps the torch optimizer
            for group in inner.param_groups:
                for p in group["params"]:  # DeepSpeed: the fp32 master partitions
                    add(p.data)
            for state in inner.state.values():
                for v in state.values():
                    add(v)
        return total

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Full (unsharded) weights on CPU; on rank 0 at least (other ranks may get an empty dict). Collective."""
        return {k: v.detach().to("cpu") for k, v in self.module.state_dict().items()}

    # ---- checkpoint ------------------------------------------------------------------------------------------
    def save(self, ckpt_dir: str) -> list[str]:
        """Write weights and optimizer state into ``ckpt_dir``; return the names written (relative to it)."""
        from safetensors.torch import save_file

        from igpt.checkpoint import savable_state

        assert self.optimizer is not None, f"model {self.name!r} is frozen: nothing to checkpoint"
        if self.strategy.rank == 0:
            state = savable_state(self.module, self.full_state_dict())
            save_file(state, os.path.join(ckpt_dir, "model.safetensors"), metadata={"format": "pt"})
            torch.save(self.optimizer.state_dict(), os.path.join(ckpt_dir, "optimizer.pt"))
        return ["model.safetensors", "optimizer.pt"]

    def load(self, ckpt_dir: str, meta: dict[str, Any]) -> None:
        """Restore weights and optimizer state written by ``save`` (any strategy's consolidated weights)."""
        from igpt.checkpoint import load_weights, read_model_state

        assert self.optimizer is not None, f"model {self.name!r} is frozen: nothing to resume"
        load_weights(self.module, read_model_state(ckpt_dir), ckpt_dir)
        path = os.path.join(ckpt_dir, "optimizer.pt")
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"{path}: optimizer state missing; this checkpoint was written by strategy={meta.get('strategy')} "
                "(resume under the strategy that wrote it, or start a new run with init_from=)"
            )
        from igpt.safe_load import torch_load

        self.optimizer.load_state_dict(torch_load(path, map_location=self.strategy.device))


class Strategy:
    """Single-process strategy; the others subclass it (and :class:`Wrapped`) and override what differs."""

    name = "single"
    #: parameters are sharded: every rank must take part in every forward (eval, generation)
    sharded = False
    wrapped_class: type[Wrapped] = Wrapped

    def __init__(self, cfg: StrategyConfig, precision: str, device: torch.device) -> None:
        self.cfg = cfg
        self.precision = precision
        self.device = device
        self.rank, self.world_size, self.local_rank = init_distributed(device, cfg.timeout_s)

    # ---- setup -----------------------------------------------------------------------------------------------
    def prepare_model(self, model: nn.Module, trainable: bool = True) -> nn.Module:
        """Activation checkpointing and compile, the parts every strategy shares, applied in this order."""
        if self.cfg.activation_checkpointing and trainable:
            apply_activation_checkpointing(model)
        if self.cfg.compile:
            for block in model.layers:
                block.compile()  # in place: state-dict keys stay those of the plain model
        return model

    def wrap_model(
        self, model: nn.Module, optim_cfg: OptimConfig | None = None, name: str = "policy",
        init: ModelInit | None = None,
    ) -> Wrapped:
        """Place ``model``: trainable with an AdamW built from ``optim_cfg``, or frozen when it is None.

        A model built on the meta device comes with ``init`` (``igpt.parallel.init.ModelInit``): the strategy
        allocates and fills only what this rank holds. A materialised model is placed as it is."""
        model = self.prepare_model(self.materialize(model, init, name), trainable=optim_cfg is not None)
        optimizer = build_adamw(model, optim_cfg) if optim_cfg is not None else None
        return self.wrapped_class(self, name, model, optimizer)

    def materialize(self, model: nn.Module, init: ModelInit | None, name: str) -> nn.Module:
        """The whole model on the device (strategies that keep full parameters): a meta model is allocated there and
        filled by ``init``; a materialised one is moved."""
        from igpt.parallel.init import on_meta, to_empty
        from igpt.shards import full_shards

        if not on_meta(model):
            return model.to(self.device)
        if init is None:
            raise ValueError(f"model {name!r} is on the meta device: wrap_model needs its ModelInit to fill it")
        to_empty(model, self.device)
        init.apply(full_shards(model), self.progress_desc(name))
        return model

    def progress_desc(self, name: str) -> str | None:
        """The description of rank 0's progress bar while a model is filled (None on other ranks)."""
        return f"init {name}" if self.rank == 0 else None

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast around forward passes when precision=bf16 (sharded strategies use their own policies)."""
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

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
