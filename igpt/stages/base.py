"""The stage interface, and the language-modelling stage that pretraining and SFT share.

A stage is what changes between InstructGPT's steps; the trainer (``igpt/trainer.py``) keeps the rest: the loop,
schedule, evaluation cadence, checkpoints, preemption and logging. Like torchtitan's TrainSpec, a stage supplies the
pieces of a job rather than the trainer hard-coding them. It sees the run only through a
:class:`~igpt.stages.context.RunContext` (models by role, strategy, tokenizer, device, step and learning rate,
collectives, micro-batch and eval iterators, extra loaders), never the trainer. Every hook a stage may implement is
declared here:

- :meth:`Stage.models`: the models it needs, by role, as :class:`ModelSpec` (trainable or frozen, which head, where
  the weights come from). The first trainable model is the main one: it is what a checkpoint's top level holds.
- :meth:`Stage.check_batch`: the batch sizes checked at start; returns the micro-batches per offline step.
- :meth:`Stage.prepare` (before the models are built: checks, extra loaders, DPO's precomputed reference) and
  :meth:`Stage.setup` (after they are built and placed, before a resume restores them).
- :meth:`Stage.count` and :meth:`Stage.loss`: a micro-batch's loss as ``(sum, count, metric sums)``
  (:class:`StageOutput`). The offline step divides the sums by the count of the *global* batch, known before the
  first forward from :meth:`Stage.count`, so every unit (a token, a comparison) weighs the same whatever the world
  size.
- :meth:`Stage.train_step`: one optimizer step, returning a :class:`~igpt.stages.context.StepResult`; the default is
  the offline step (:func:`offline_step`); a stage that makes its own batches (PPO's rollouts) overrides it and uses
  the same helpers (:func:`accumulate`, :func:`apply_update`).
- :meth:`Stage.evaluate`, :meth:`Stage.eval_summary` and :meth:`Stage.eval_table`: the stage's own validation (loss
  and bits per byte here; pairwise accuracy for a reward model; preference accuracy for DPO; mean reward of greedy
  responses for PPO), its one-line summary and an optional table of examples for W&B.
- :meth:`Stage.on_train_end`, :meth:`Stage.checkpoint_meta`, :meth:`Stage.state_dict` /
  :meth:`Stage.load_state_dict`: what the last step computes (a reward model's normalisation), what every
  checkpoint's meta.json adds, and anything beyond the models and loaders that an exact resume needs (a KL
  controller).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from igpt.config import Config, OptimConfig
from igpt.stages import STAGES
from igpt.stages.context import RunContext, StepResult

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from igpt.parallel.base import Wrapped


@dataclass
class ModelSpec:
    """One model a stage needs."""

    role: str  # "policy", "reference", "reward", "critic", ...
    trainable: bool
    head: str = "lm"  # "lm" | "scalar"
    # weights and architecture: an igpt run or checkpoint dir, or a Hugging Face model folder (None: a fresh model
    # of cfg.model from trainer.seed)
    init: str | None = None
    #: where ``init`` came from, for errors ("init_from", "reference_from", "reward.model")
    init_key: str = "init_from"
    #: for a trainable model: its optimizer settings (default: the config's ``optim``)
    optim: OptimConfig | None = None


@dataclass
class StageOutput:
    loss_sum: torch.Tensor  # fp32 scalar: the loss summed over this micro-batch's units
    tokens: torch.Tensor  # the number of units (tokens, comparisons) the loss is summed over
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # sums over the same units, reported as means


class Stage:
    """Base class: the language-modelling stage. Subclasses override what differs; a stage's name, data kind and
    chat flag come from ``igpt.stages.STAGES`` (the config's ``stage.name``)."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.name = cfg.stage.name
        info = STAGES[self.name]
        self.kind = info.kind
        self.chat = info.chat
        self.ctx: RunContext | None = None

    # ---- declaration ---------------------------------------------------------------------------------------------
    def models(self) -> list[ModelSpec]:
        return [ModelSpec("policy", trainable=True, init=self.cfg.init_from)]

    def prepare(self, ctx: RunContext) -> None:
        """Called before the models are built (``ctx.models`` is empty): checks, extra loaders
        (``ctx.open_loader``), DPO's precomputed reference log-probs. Subclasses call this first."""
        self.ctx = ctx

    def setup(self, ctx: RunContext) -> None:
        """Called once the models are built and placed in ``ctx.models`` (and before a resume restores them)."""

    def check_batch(self, world_size: int) -> int:
        """Check the batch sizes at start (naming the keys); return the accumulation steps of an offline step."""
        tcfg = self.cfg.trainer
        per_rank, rem = divmod(tcfg.global_batch_size, world_size)
        if rem or per_rank % tcfg.micro_batch_size:
            unit = tcfg.micro_batch_size * world_size
            raise ValueError(
                f"trainer.global_batch_size ({tcfg.global_batch_size}) must equal trainer.micro_batch_size "
                f"({tcfg.micro_batch_size}) x accumulation steps x world size ({world_size}): use a multiple of {unit}"
            )
        return per_rank // tcfg.micro_batch_size

    # ---- loss ----------------------------------------------------------------------------------------------------
    def count(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Loss units in a batch (known before the forward, so the loss can be normalised globally)."""
        return (batch["labels"] != -100).sum()

    def loss(self, models: dict[str, Any], batch: dict[str, torch.Tensor]) -> StageOutput:
        """Next-token cross-entropy on ``labels`` (-100 = no loss)."""
        loss_sum = models["policy"](batch["input_ids"], position_ids=batch.get("position_ids"), labels=batch["labels"])
        return StageOutput(loss_sum=loss_sum, tokens=self.count(batch))

    def train_step(self, batch: dict[str, torch.Tensor]) -> StepResult:
        """One optimizer step on one global batch of the train loader (the rank's slice of it)."""
        return offline_step(self, self.ctx, batch)

    # ---- evaluation ----------------------------------------------------------------------------------------------
    def masked(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A copy of ``batch`` that contributes nothing (a rank out of validation data still runs the forwards):
        no loss tokens, no segments, no samples."""
        from igpt.data.loader import PAD_VALUES

        out = {k: v.clone() for k, v in batch.items()}
        for k, v in out.items():
            if k in PAD_VALUES:
                v.fill_(PAD_VALUES[k])
        return out

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Validation loss per token and bits per byte over the val split (or ``trainer.eval_batches`` batches).

        bpb = total nats / ln 2 / total UTF-8 bytes of the target tokens (comparable across tokenizers).
        """
        ctx = self.ctx
        policy = ctx.models["policy"]
        policy.eval()
        sums = torch.zeros(3, dtype=torch.float64, device=ctx.device)  # nats, bytes, tokens
        for micro in ctx.eval_micro_batches(self):
            with ctx.autocast():
                per_tok = policy(micro["input_ids"], position_ids=micro.get("position_ids"), labels=micro["labels"],
                                 reduction="none")
            keep = micro["labels"] != -100
            sums[0] += per_tok.double().sum()
            sums[1] += ctx.token_bytes[micro["labels"].clamp(min=0)][keep].double().sum()
            sums[2] += keep.sum()
        nats, nbytes, ntok = ctx.strategy.all_reduce(sums).tolist()
        return {"loss": nats / max(ntok, 1.0), "bpb": nats / math.log(2) / max(nbytes, 1.0)}

    def eval_summary(self, result: dict[str, float]) -> str:
        return f"val loss {result['loss']:.4f}, {result['bpb']:.4f} bits per byte"

    def eval_table(self) -> tuple[tuple[str, ...], list[tuple]]:
        """Columns and rows of examples from the last :meth:`evaluate` (logged to W&B; none by default)."""
        return (), []

    # ---- state ---------------------------------------------------------------------------------------------------
    def checkpoint_meta(self) -> dict[str, Any]:
        """Entries the stage adds to every checkpoint's meta.json (a reward model's normalisation)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def on_train_end(self) -> None:
        """Called after the last step, before the final checkpoint (a reward model computes its normalisation)."""


def accumulate(ctx: RunContext, model: Wrapped, micro_losses: Sequence[Callable[[], torch.Tensor]]) -> None:
    """Backward of each micro-batch's loss into ``model``'s gradients: ``micro_losses[j]()`` runs the forward (under
    autocast) and returns the loss to differentiate, already scaled to the global batch
    (``sum * world_size / global_count``, igpt/parallel/base.py); gradients synchronise on the last one only."""
    last = len(micro_losses) - 1
    for j, loss_of in enumerate(micro_losses):
        with model.no_sync(last_micro=j == last), ctx.autocast():
            model.backward(loss_of())


def apply_update(ctx: RunContext, model: Wrapped, lr: float, finite: bool) -> float:
    """Set ``lr``, clip to ``trainer.grad_clip`` and step ``model``'s optimizer, or skip the update (gradients
    dropped, optimizer state untouched) when the loss was not finite; returns the gradient norm before clipping."""
    model.set_lr(lr)
    return model.clip_and_step(ctx.cfg.trainer.grad_clip, skip=not finite)


def offline_step(stage: Stage, ctx: RunContext, batch: dict[str, torch.Tensor]) -> StepResult:
    """One optimizer step of the (single) trainable model on the loader's global batch: the stage's loss summed over
    the rank's micro-batches, normalised by the stage's count of the *global* batch."""
    (model,) = ctx.trainable.values()
    model.train()
    local_count = stage.count(batch).to(ctx.device, torch.float64)
    global_count = float(ctx.strategy.all_reduce(local_count.clone()).item())
    # loss = sum_loss * world / global_count: the ranks' averaged gradients are those of the global mean
    scale = ctx.world_size / max(global_count, 1.0)
    loss_sum = torch.zeros((), dtype=torch.float64, device=ctx.device)
    metric_sums: dict[str, torch.Tensor] = {}

    def loss_of(micro: dict[str, torch.Tensor]) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            nonlocal loss_sum
            out = stage.loss(ctx.models, micro)
            loss_sum = loss_sum + out.loss_sum.detach().to(torch.float64)
            for k, v in out.metrics.items():
                metric_sums[k] = metric_sums.get(k, 0.0) + v.detach().to(torch.float64)
            return out.loss_sum * scale

        return run

    accumulate(ctx, model, [loss_of(micro) for micro in ctx.micro_batches(batch)])
    names = list(metric_sums)
    totals = ctx.strategy.all_reduce(torch.stack([loss_sum, *(metric_sums[k] for k in names)]))
    loss = float(totals[0].item()) / max(global_count, 1.0)
    lr = ctx.lr()
    finite = math.isfinite(loss)
    grad_norm = apply_update(ctx, model, lr, finite)
    metrics = {k: float(totals[1 + j].item()) / max(global_count, 1.0) for j, k in enumerate(names)}
    return StepResult(loss=loss, lr=lr, grad_norm=grad_norm, finite=finite, metrics=metrics)


__all__ = ["ModelSpec", "Stage", "StageOutput", "accumulate", "apply_update", "offline_step"]
