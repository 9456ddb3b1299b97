"""The stage interface, and the language-modelling stage that pretraining and SFT share.

A stage is what changes between InstructGPT's steps; the trainer (``igpt/trainer.py``) keeps the rest: the loop,
accumulation, normalisation, clipping, schedule, checkpoints, preemption and logging. Like torchtitan's TrainSpec, a
stage supplies the pieces of a job rather than the trainer hard-coding them:

- :meth:`Stage.models`: the models it needs, by role, as :class:`ModelSpec` (trainable or frozen, which head, where
  the weights come from). The first trainable model is the main one: it is what a checkpoint's top level holds.
- :meth:`Stage.count` and :meth:`Stage.loss`: a micro-batch's loss as ``(sum, count, metric sums)``
  (:class:`StageOutput`). The trainer divides the sums by the count of the *global* batch, known before the first
  forward from :meth:`Stage.count`, so every unit (a token, a comparison) weighs the same whatever the world size.
- :meth:`Stage.evaluate`: the stage's own validation (loss and bits per byte here; pairwise accuracy for a reward
  model; preference accuracy for DPO; mean reward of greedy responses for PPO).
- :meth:`Stage.train_step`: the standard offline step (one forward/backward per micro-batch of the loader's global
  batch); a stage that makes its own batches (PPO's rollouts) overrides it.
- :meth:`Stage.state_dict` / :meth:`Stage.load_state_dict`: anything beyond the models and loaders that an exact
  resume needs (a KL controller, a rollout generator).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from igpt.config import Config, OptimConfig
from igpt.stages import STAGES

if TYPE_CHECKING:
    from igpt.trainer import Trainer


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
    """Base class. Subclasses set ``name`` and override what differs from the language-modelling stage."""

    name = "pretrain"

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        info = STAGES[self.name]
        self.kind = info.kind
        self.chat = info.chat
        self.trainer: Trainer | None = None

    # ---- declaration ---------------------------------------------------------------------------------------------
    def models(self) -> list[ModelSpec]:
        return [ModelSpec("policy", trainable=True, init=self.cfg.init_from)]

    def prepare(self, trainer: Trainer) -> None:
        """Called before the models are built (DPO precomputes its reference log-probs here)."""
        self.trainer = trainer

    def setup(self, trainer: Trainer) -> None:
        """Called once the models are built and placed (and before a resume restores them)."""
        self.trainer = trainer

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

    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        assert self.trainer is not None
        return self.trainer.offline_step(batch)

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
        trainer = self.trainer
        assert trainer is not None
        policy = trainer.models["policy"]
        policy.eval()
        sums = torch.zeros(3, dtype=torch.float64, device=trainer.device)  # nats, bytes, tokens
        for micro in trainer.eval_micro_batches(self):
            with trainer.strategy.autocast():
                per_tok = policy(micro["input_ids"], position_ids=micro.get("position_ids"), labels=micro["labels"],
                                 reduction="none")
            keep = micro["labels"] != -100
            sums[0] += per_tok.double().sum()
            sums[1] += trainer.token_bytes[micro["labels"].clamp(min=0)][keep].double().sum()
            sums[2] += keep.sum()
        nats, nbytes, ntok = trainer.strategy.all_reduce(sums).tolist()
        return {"loss": nats / max(ntok, 1.0), "bpb": nats / math.log(2) / max(nbytes, 1.0)}

    def eval_summary(self, result: dict[str, float]) -> str:
        return f"val loss {result['loss']:.4f}, {result['bpb']:.4f} bits per byte"

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


__all__ = ["ModelSpec", "Stage", "StageOutput"]
