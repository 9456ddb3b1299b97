"""Reward model (InstructGPT step 2): a scalar head trained on human comparisons with the Bradley-Terry loss.

The model is the SFT model's body with the language-model head replaced by a scalar head ``score`` (dim -> 1, no
bias; initialised N(0, 1/(dim + 1)), Stiennon et al. 2020), read at the last token of each response: the
end-of-turn token that closes the assistant turn (``<|im_end|>`` in igpt's template), or the last kept token of a
response cut to fit ``trainer.seq_len``.
For a preferred response ``w`` and a less preferred ``l`` of the same prompt the loss is

    -log sigmoid(r(x, w) - r(x, l) - margin)

(Bradley & Terry 1952; the optional per-pair margin is Llama 2's, Touvron et al. 2023). A record of K ranked
responses contributes the mean over its untied pairs (all C(K, 2) without ties), as one batch element (Ouyang et al.
2022, section 3.5; ``igpt.stages.pref``). Train and val records report ``accuracy`` (share of pairs ranked right),
``margin`` (mean ``r(w) - r(l)``), ``reward_chosen`` and ``reward_rejected``.

After the last step the rewards of the preferred responses (rank 0) of the train split are averaged (``rm.norm_batches``
batches; 0 = all) and the checkpoint stores that mean; loading the model (``igpt.checkpoint.load_model``, PPO's
``reward.model=``) subtracts it, so those responses score 0 on average (InstructGPT normalises its reward model so
that the labeler demonstrations score 0 before RL).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F

from igpt.stages.base import ModelSpec, Stage, StageOutput
from igpt.stages.pref import Comparisons, comparisons, count_records

METRICS = ("accuracy", "margin", "reward_chosen", "reward_rejected")

log = logging.getLogger("igpt")


def bradley_terry(better: torch.Tensor, worse: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
    """Per-pair loss ``-log sigmoid(better - worse - margin)`` (softplus form, stable for large differences)."""
    return F.softplus(-(better - worse - margin))


@torch.no_grad()
def score(model: Any, ids: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Rewards ``(B,)`` of whole sequences ``ids`` ``(B, T)`` with padding on either side (``real`` marks the real
    tokens): the scalar head at each row's last real token. What PPO and the evaluation score responses with."""
    from igpt.sampling import last_real_index, positions_from_mask

    values = model(ids, position_ids=positions_from_mask(real))  # (B, T)
    return values.gather(1, last_real_index(real)[:, None]).squeeze(1)


class RewardModelStage(Stage):
    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.reward_mean: float | None = None

    def models(self) -> list[ModelSpec]:
        return [ModelSpec("reward", trainable=True, head="scalar", init=self.cfg.init_from)]

    def count(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return count_records(batch)

    def rewards(self, model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Comparisons]:
        """The reward of every response in ``batch`` ``(n,)`` and the batch's comparisons."""
        values = model(batch["input_ids"], position_ids=batch["position_ids"])  # (B, S) scalar head
        comp = comparisons(batch)
        return comp.at_end(values), comp

    def loss(self, models: dict[str, Any], batch: dict[str, torch.Tensor]) -> StageOutput:
        r, comp = self.rewards(models["reward"], batch)
        better, worse = r[comp.better], r[comp.worse]
        loss_sum = comp.weighted_sum(bradley_terry(better, worse, comp.margin))
        with torch.no_grad():
            metrics = {
                "accuracy": comp.weighted_sum((better > worse).float()),
                "margin": comp.weighted_sum(better - worse),
                "reward_chosen": comp.weighted_sum(better),
                "reward_rejected": comp.weighted_sum(worse),
            }
        return StageOutput(loss_sum=loss_sum, tokens=torch.tensor(comp.records), metrics=metrics)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        ctx = self.ctx
        model = ctx.models["reward"]
        model.eval()
        sums = torch.zeros(2 + len(METRICS), dtype=torch.float64, device=ctx.device)
        for micro in ctx.eval_micro_batches(self):
            with ctx.autocast():
                out = self.loss(ctx.models, micro)
            sums[0] += out.loss_sum.double()
            sums[1] += float(out.tokens)
            sums[2:] += torch.stack([out.metrics[k].double() for k in METRICS])
        total = ctx.strategy.all_reduce(sums).tolist()
        n = max(total[1], 1.0)
        return {"loss": total[0] / n, **{k: v / n for k, v in zip(METRICS, total[2:])}}

    def eval_summary(self, result: dict[str, float]) -> str:
        return (f"val loss {result['loss']:.4f}, pairwise accuracy {result['accuracy']:.3f}, "
                f"margin {result['margin']:.3f}")

    # ---- the reward normalisation ----------------------------------------------------------------------------------
    @torch.no_grad()
    def on_train_end(self) -> None:
        ctx = self.ctx
        model = ctx.models["reward"]
        model.eval()
        sums = torch.zeros(2, dtype=torch.float64, device=ctx.device)  # reward sum, count of best responses
        for micro in ctx.eval_micro_batches(self, split="train", limit=self.cfg.rm.norm_batches):
            with ctx.autocast():
                r, comp = self.rewards(model, micro)
            rank = micro["seq_rank"][comp.row, comp.end]
            best = torch.full((micro["seq_rank"].shape[0],), 2**30, device=rank.device).scatter_reduce(
                0, comp.row, rank, reduce="amin"
            )
            chosen = rank == best[comp.row]
            sums += torch.stack([r[chosen].double().sum(), chosen.sum().double()])
        total, n = ctx.strategy.all_reduce(sums).tolist()
        self.reward_mean = total / max(n, 1.0)
        log.info("reward normalisation: preferred train responses score %.4f on average over %d (stored)",
                 self.reward_mean, int(n))

    def checkpoint_meta(self) -> dict[str, Any]:
        return {} if self.reward_mean is None else {"reward_norm": {"mean": self.reward_mean}}

    def state_dict(self) -> dict[str, Any]:
        return {} if self.reward_mean is None else {"reward_mean": self.reward_mean}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reward_mean = state.get("reward_mean")


STAGE = RewardModelStage
