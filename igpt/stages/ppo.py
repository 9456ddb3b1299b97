"""InstructGPT step 3: PPO against a reward model with a KL penalty to the SFT model, PPO-ptx, and the critic-free
GRPO and RLOO.

Models (``igpt.stages.base.ModelSpec``): the actor (``init_from``, the SFT model), the critic (``ppo.advantage=gae``
only: a scalar head initialised from ``reward.model``, or from ``init_from`` with a new head when there is no reward
model), the frozen reference (``reference_from``, default ``init_from``) and the frozen reward model
(``reward.model``, normalised as its checkpoint says). Rewards come from the reward model and/or reward functions
(``reward.functions``: ``module:function`` callables in TRL's batched form ``fn(prompts, completions, **fields) ->
list[float]``, ``fields`` being the prompt records' other fields, one list per name), summed with ``reward.weights``.

One step (``trainer.global_batch_size`` prompts):

1. **Rollout**: every prompt ``rollout.n`` times; the actor samples up to ``rollout.max_new_tokens`` tokens with a
   static KV cache, its weights gathered once for the whole phase (``Wrapped.gathered``). Each row draws its tokens
   from a counter-based generator keyed by (``trainer.seed``, step, the row's global index), so a run samples the
   same responses at any world size.
2. **Scoring**: the reward model's score (clipped to ``reward.clip``) and the functions' rewards;
   ``reward.missing_eos_penalty`` is subtracted from responses that hit the token budget without an end-of-turn.
3. **Old log-probs, values**: the actor's log-probs of its samples at the rollout temperature (the same forward the
   update uses; ``rollout/logprob_gap`` is their mean absolute gap to the sampler's own), the reference's, the
   critic's values, and (one chunked pass) the actor's entropy and its exact full-vocabulary KL to the reference.
4. **Advantages**: with ``gae``, per-token rewards ``-kl.coef * KL_t`` (``kl.estimator``) plus the score at the last
   response token, then GAE(``ppo.gamma``, ``ppo.lam``) on the critic's values; with ``grpo`` / ``rloo``, the
   sequence return ``score - kl.coef * sum_t KL_t`` against its prompt group's baseline, the same on every token.
   ``ppo.whiten_advantages`` (default: on for ``gae`` only) normalises them over the global batch: GAE's over the
   response tokens, the critic-free ones over the sequences (:meth:`PPOStage.advantages`).
5. **Updates**: ``ppo.epochs`` passes, each over ``ppo.minibatches`` minibatches (row ``i`` of a rank's rollout batch
   belongs to minibatch ``i mod minibatches``, an assignment independent of the world size; their order is shuffled
   per epoch); clipped policy loss (``ppo.clip``, ``ppo.clip_high``, ``ppo.dual_clip``) and clipped value loss
   (``ppo.value_clip``, weighted by ``ppo.vf_coef``), normalised by the minibatch's global response tokens. PPO-ptx
   (``ptx.coef`` > 0) adds ``ptx.coef`` times the pretraining loss of one ``ptx.data_dir`` batch to the actor's
   gradient in the *same* optimizer step (InstructGPT's objective, eq. 2).
6. The adaptive KL controller (``kl.target``) moves the coefficient toward the target.

Validation: greedy responses to the val prompts, ``objective/scores`` (their mean reward) and ``objective/kl`` /
``objective/kl_exact`` (per sequence), and a table of prompts, responses and rewards.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from igpt.config import OptimConfig, import_callable
from igpt.model.outputs import Hidden, TokenLogProbs, TokenStats
from igpt.sampling import Rollout
from igpt.stages.base import ModelSpec, Stage, accumulate, apply_update
from igpt.stages.context import RunContext, StepResult
from igpt.stages.ppo_math import (
    KLController,
    clipped_policy_loss,
    clipped_value_loss,
    gae,
    group_advantages,
    kl_estimate,
    masked_whiten,
    sequence_whiten,
    token_rewards,
)

log = logging.getLogger("igpt")


def load_reward_function(spec: str) -> Callable:
    """``module:function`` -> the callable (an error naming ``reward.functions`` and what failed)."""
    return import_callable(spec, "reward.functions")


class PromptRecords:
    """The source records of a kind=prompt split by global sample id (``record.json`` of each sample)."""

    def __init__(self, data_dir: str, split: str) -> None:
        from igpt.data.partition import read_index

        self.index = read_index(data_dir, split)
        self.first = np.concatenate([[0], np.cumsum([s.samples for s in self.index.shards])])
        self._open: OrderedDict[int, Any] = OrderedDict()

    def __call__(self, sample_id: int) -> dict[str, Any]:
        from igpt.data.partition import Shard

        shard = int(np.searchsorted(self.first, sample_id, side="right")) - 1
        if shard not in self._open:
            idx = self.index
            self._open[shard] = Shard(idx.shards[shard], idx.kind, idx.dtype, idx.vocab_size)
            if len(self._open) > 4:
                self._open.popitem(last=False)
        return json.loads(self._open[shard].get(sample_id - int(self.first[shard]))[1].tobytes())


@dataclass
class RolloutBatch:
    """A step's sampled responses with their prompts, ``B = prompts x rollout.n`` rows of ``Tp + N`` tokens."""

    ids: torch.Tensor  # (B, Tp + N) left-padded prompt, then the response
    real: torch.Tensor  # (B, Tp + N) bool: real tokens
    pos: torch.Tensor  # (B, Tp + N) position ids
    labels: torch.Tensor  # (B, Tp + N) the response tokens at the positions that predict them, else -100
    sampled: Rollout  # the sampler's tokens, log-probs, mask and ended flags, (B, N)
    tp: int  # prompt columns
    nr: int  # response columns
    sample_ids: list[int]  # the prompt's global sample id, per row
    seconds: float  # time spent sampling

    @property
    def mask(self) -> torch.Tensor:
        return self.sampled.mask


@dataclass
class RolloutScores:
    """What a step computes of its rollout before the advantages (per row ``(B,)`` or per response token
    ``(B, N)``)."""

    scores: torch.Tensor  # (B,) the rewards
    penalised: torch.Tensor  # (B,) minus reward.missing_eos_penalty on truncated responses
    old: torch.Tensor  # (B, N) the actor's log-probs at the rollout temperature
    kl: torch.Tensor  # (B, N) the kl.estimator's per-token KL to the reference (0 off the response)
    kl_exact: torch.Tensor  # (B, N) the exact full-vocabulary KL
    entropy: torch.Tensor  # (B, N)
    values: torch.Tensor | None  # (B, N) the critic's, with ppo.advantage=gae
    coef: float  # the KL coefficient of this step


class PPOStage(Stage):
    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.kl = KLController(cfg.kl.coef, cfg.kl.target, cfg.kl.horizon)
        self.functions: list[tuple[str, Callable]] = []
        self.records: dict[str, PromptRecords] = {}
        self.eval_rows: list[tuple] = []

    @property
    def critic(self) -> bool:
        return self.cfg.ppo.advantage == "gae"

    # ---- declaration and checks ------------------------------------------------------------------------------------
    def models(self) -> list[ModelSpec]:
        cfg = self.cfg
        specs = [ModelSpec("policy", trainable=True, init=cfg.init_from)]
        if self.critic:
            optim = OptimConfig(**{**vars(cfg.optim), "lr": cfg.ppo.critic_lr or cfg.optim.lr})
            if cfg.reward.model:
                specs.append(ModelSpec("critic", trainable=True, head="scalar", init=cfg.reward.model,
                                       init_key="reward.model", optim=optim))
            else:
                specs.append(ModelSpec("critic", trainable=True, head="scalar", init=cfg.init_from, optim=optim))
        ref, key = (cfg.reference_from, "reference_from") if cfg.reference_from else (cfg.init_from, "init_from")
        specs.append(ModelSpec("reference", trainable=False, init=ref, init_key=key))
        if cfg.reward.model:
            specs.append(ModelSpec("reward", trainable=False, head="scalar", init=cfg.reward.model,
                                   init_key="reward.model"))
        return specs

    def check_batch(self, world_size: int) -> int:
        cfg, tcfg = self.cfg, self.cfg.trainer
        if tcfg.global_batch_size % world_size:
            raise ValueError(f"trainer.global_batch_size ({tcfg.global_batch_size} prompts) must be a multiple of the "
                             f"world size ({world_size})")
        rows = tcfg.global_batch_size // world_size * cfg.rollout.n
        m = cfg.ppo.minibatches
        if rows % m or (rows // m) % tcfg.micro_batch_size:
            raise ValueError(
                f"each rank samples {rows} responses per step (trainer.global_batch_size / world size x rollout.n); "
                f"ppo.minibatches ({m}) x trainer.micro_batch_size ({tcfg.micro_batch_size}) must divide it"
            )
        if cfg.rollout.max_new_tokens >= tcfg.seq_len:
            raise ValueError(f"rollout.max_new_tokens ({cfg.rollout.max_new_tokens}) must leave room for the prompt "
                             f"in trainer.seq_len ({tcfg.seq_len})")
        return (rows // m) // tcfg.micro_batch_size

    def prepare(self, ctx: RunContext) -> None:
        super().prepare(ctx)
        cfg = self.cfg
        if cfg.ppo.advantage in ("grpo", "rloo") and cfg.rollout.n < 2:
            raise ValueError(f"ppo.advantage={cfg.ppo.advantage} compares the samples of a prompt: rollout.n must "
                             f"be at least 2 (it is {cfg.rollout.n})")
        if not cfg.reward.model and not cfg.reward.functions:
            raise ValueError("ppo needs a reward: reward.model=<reward-model run or checkpoint> and/or "
                             "reward.functions=[module:function, ...]")
        self.functions = [(spec, load_reward_function(spec)) for spec in cfg.reward.functions]
        sources = int(bool(cfg.reward.model)) + len(self.functions)
        if cfg.reward.weights and len(cfg.reward.weights) != sources:
            raise ValueError(f"reward.weights has {len(cfg.reward.weights)} values for {sources} reward sources "
                             f"({'the reward model, ' if cfg.reward.model else ''}{len(self.functions)} functions)")
        self.weights = list(cfg.reward.weights) or [1.0] * sources
        if cfg.reward.model:
            self._check_reward_tokenizer(ctx)
        if cfg.ptx.coef > 0:
            if not cfg.ptx.data_dir:
                raise ValueError("ptx.coef > 0 needs ptx.data_dir=<a prepared kind=text dir>")
            ptx = ctx.open_loader("ptx", cfg.ptx.data_dir, pack=True)
            if ptx.kind != "text":
                raise ValueError(f"ptx.data_dir={cfg.ptx.data_dir} holds kind={ptx.kind} data; PPO-ptx needs kind=text")
        self._ptx_batches = None
        for split in ("train", "val"):
            if ctx.data.samples(split):
                self.records[split] = PromptRecords(cfg.data.dir, split)

    def _check_reward_tokenizer(self, ctx: RunContext) -> None:
        from igpt.checkpoint import open_source

        source = open_source(self.cfg.reward.model, "reward.model")
        theirs = source.chat_format()
        if theirs.get_vocab(with_added_tokens=True) != ctx.tokenizer.get_vocab(with_added_tokens=True):
            raise ValueError(
                f"reward.model={self.cfg.reward.model}: its tokenizer ({source.tokenizer_dir}) differs from the prompt "
                f"data's ({ctx.tokenizer_path}); the reward model must read the policy's tokens"
            )

    # ---- rollout pieces --------------------------------------------------------------------------------------------
    def _prompts(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded prompts ``(b, T)`` and their real-token mask, cut at the left to leave room for the response."""
        ctx = self.ctx
        budget = self.cfg.trainer.seq_len - self.cfg.rollout.max_new_tokens
        lens = batch["prompt_len"][:, 0].clamp(max=budget)
        t = max(int(lens.max()), 1)
        b = lens.numel()
        ids = torch.full((b, t), ctx.pad_id, dtype=torch.long)
        real = torch.zeros(b, t, dtype=torch.bool)
        for i in range(b):
            n, full = int(lens[i]), int(batch["prompt_len"][i, 0])
            ids[i, t - n :] = batch["input_ids"][i, full - n : full]
            real[i, t - n :] = True
        return ids.to(ctx.device), real.to(ctx.device)

    def score(self, ids: torch.Tensor, real: torch.Tensor, prompt_len: int, responses: torch.Tensor,
              mask: torch.Tensor, sample_ids: list[int], split: str) -> tuple[torch.Tensor, list[str]]:
        """Rewards ``(B,)`` of the responses (reward model and functions, weighted) and the completions' text."""
        from igpt.stages.rm import score as rm_score

        ctx = self.ctx
        tok = ctx.tokenizer
        stop = set(ctx.stop_ids)
        completions = [tok.decode([t for t, m in zip(row, keep) if m and t not in stop], skip_special_tokens=True)
                       for row, keep in zip(responses.tolist(), mask.tolist())]
        total = torch.zeros(responses.shape[0], dtype=torch.float32, device=responses.device)
        w = iter(self.weights)
        if "reward" in ctx.models:
            with ctx.autocast():
                r = rm_score(ctx.models["reward"], ids, real).float()
            if self.cfg.reward.clip > 0:
                r = r.clamp(-self.cfg.reward.clip, self.cfg.reward.clip)
            total += next(w) * r
        if self.functions:
            records = [self.records[split](sid) for sid in sample_ids]
            prompts = [rec.get("prompt", rec.get("messages")) for rec in records]
            names = sorted({k for rec in records for k in rec} - {"prompt", "messages"})
            fields = {k: [rec.get(k) for rec in records] for k in names}
            for (spec, fn), weight in zip(self.functions, w):
                total += weight * torch.tensor(self._call(spec, fn, prompts, completions, fields), device=total.device)
        return total, completions

    @staticmethod
    def _call(spec: str, fn: Callable, prompts: list, completions: list[str], fields: dict) -> list[float]:
        def where(i: int) -> str:
            return f"sample {i} (prompt {prompts[i]!r}, completion {completions[i]!r})"

        try:
            out = fn(prompts, completions, **fields)
        except Exception as e:
            for i in range(len(prompts)):  # find the sample it fails on
                try:
                    fn(prompts[i : i + 1], completions[i : i + 1], **{k: v[i : i + 1] for k, v in fields.items()})
                except Exception as e_i:
                    raise RuntimeError(
                        f"reward function {spec} raised {type(e_i).__name__}: {e_i} on {where(i)}"
                    ) from e
            raise RuntimeError(f"reward function {spec} raised {type(e).__name__}: {e} on a batch of "
                               f"{len(prompts)} samples") from e
        if not isinstance(out, (list, tuple)) or len(out) != len(prompts):
            raise RuntimeError(f"reward function {spec} returned {type(out).__name__} of length "
                               f"{len(out) if hasattr(out, '__len__') else '?'}; expected a list of {len(prompts)} "
                               "numbers, one per completion")
        for i, v in enumerate(out):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise RuntimeError(f"reward function {spec} returned {v!r} for {where(i)}; expected a finite number")
        return [float(v) for v in out]

    @torch.no_grad()
    def _forward_stats(self, ids, pos, labels, n_prompt: int, n_resp: int) -> dict[str, torch.Tensor]:
        """Per response token ``(B, N)``: old log-probs, reference log-probs, entropy, exact KL; and values."""
        ctx = self.ctx
        models = ctx.models
        temp = self.cfg.rollout.temperature if self.cfg.rollout.temperature > 0 else 1.0
        cols = slice(n_prompt - 1, n_prompt - 1 + n_resp)
        out: dict[str, list[torch.Tensor]] = {k: [] for k in ("old", "ref", "entropy", "kl_exact", "values")}
        size = self.cfg.trainer.micro_batch_size
        for i in range(0, ids.shape[0], size):
            rows = slice(i, i + size)
            a = (ids[rows],)
            kw = {"position_ids": pos[rows]}
            with ctx.autocast():
                out["old"].append(models["policy"](*a, **kw, output=TokenLogProbs(labels[rows], temp))[:, cols])
                h_ref = models["reference"](*a, **kw, output=Hidden())
                with models["reference"].full_param("lm_head.weight") as w_ref:
                    stats = models["policy"](*a, **kw, output=TokenStats(labels[rows], temp, h_ref, w_ref))
                if self.critic:
                    out["values"].append(models["critic"](*a, **kw)[:, cols].float())
            out["ref"].append(stats["other_logprobs"][:, cols])
            out["entropy"].append(stats["entropy"][:, cols])
            out["kl_exact"].append(stats["kl"][:, cols])
        return {k: torch.cat(v) for k, v in out.items() if v}

    def _global_mean_var(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
        m = mask.to(torch.float64)
        s = self.ctx.global_sum([(x.double() * m).sum(), ((x.double() ** 2) * m).sum(), m.sum()])
        mean = s[0] / max(s[2], 1.0)
        return mean, max(s[1] / max(s[2], 1.0) - mean * mean, 0.0)

    def advantages(self, scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, values: torch.Tensor | None,
                   coef: float) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Per-token advantages ``(B, N)`` (0 off the mask), and the values and returns with a critic, from the
        (penalised) scores ``(B,)``, the per-token KL estimate ``(B, N)`` and the critic's values.

        ``gae``: GAE on per-token rewards, whitened over the global batch's response tokens unless
        ``ppo.whiten_advantages=false``. ``grpo`` / ``rloo``: the group advantage of the sequence return on every
        token; not whitened unless ``ppo.whiten_advantages=true``, and then over the batch's *sequences* (each counts
        once): whitening the repeated value over tokens would let long responses set the mean and flip the sign of
        better-than-average short ones (verl and OpenRLHF do not whiten these; TRL's RLOO normalises per sequence)."""
        pcfg = self.cfg.ppo
        if self.critic:
            rewards = token_rewards(kl, scores, mask, coef)
            values = values * mask
            adv, returns = gae(rewards, values, mask, pcfg.gamma, pcfg.lam)
            if pcfg.whiten_advantages is None or pcfg.whiten_advantages:
                mean, var = self._global_mean_var(adv, mask)
                adv = masked_whiten(adv, mask, mean, var)
            return adv, values, returns
        seq_return = scores - coef * kl.sum(dim=1)
        # groups are the n samples of one prompt: rows of this rank only, so no collective is needed
        seq_adv = group_advantages(seq_return, self.cfg.rollout.n, pcfg.advantage)
        if pcfg.whiten_advantages:
            ones = torch.ones_like(seq_adv, dtype=torch.bool)
            mean, var = self._global_mean_var(seq_adv, ones)
            seq_adv = sequence_whiten(seq_adv, mean, var)
        return seq_adv[:, None].expand_as(mask) * mask, None, None

    # ---- the step: rollout -> score -> advantages -> update ---------------------------------------------------------
    def train_step(self, batch: dict[str, torch.Tensor]) -> StepResult:
        ro = self.rollout(batch)
        sc = self.score_rollout(ro)
        adv, values, returns = self.advantages(sc.penalised, sc.kl, ro.mask, sc.values, sc.coef)
        upd = self.update(ro, sc.old, adv, values, returns)
        return self._step_result(ro, sc, upd, values, returns)

    def rollout(self, batch: dict[str, torch.Tensor]) -> RolloutBatch:
        """1. Every prompt of the rank's batch ``rollout.n`` times, sampled by the actor (weights gathered once)."""
        from igpt.sampling import positions_from_mask, row_seeds, sample_rollout

        ctx, rcfg = self.ctx, self.cfg.rollout
        actor, n = ctx.models["policy"], rcfg.n
        t0 = time.perf_counter()
        prompts, preal = self._prompts(batch)
        b = prompts.shape[0]
        prompts, preal = prompts.repeat_interleave(n, 0), preal.repeat_interleave(n, 0)
        sample_ids = batch["sample_id"][:, 0].repeat_interleave(n).tolist()
        rows = torch.arange(b * n, device=ctx.device) + ctx.rank * b * n  # global row index
        seeds = row_seeds(self.cfg.trainer.seed, ctx.step, rows)
        actor.eval()
        with actor.gathered() as model, ctx.autocast():
            ro = sample_rollout(model, prompts, preal, rcfg.max_new_tokens, seeds, rcfg.temperature, rcfg.top_k,
                                rcfg.top_p, ctx.stop_ids, ctx.pad_id)
        seconds = time.perf_counter() - t0
        tp, nr = prompts.shape[1], ro.tokens.shape[1]
        ids = torch.cat([prompts, ro.tokens], dim=1)  # (B, Tp + N)
        real = torch.cat([preal, ro.mask], dim=1)
        labels = torch.full_like(ids, -100)
        labels[:, tp - 1 : tp - 1 + nr] = torch.where(ro.mask, ro.tokens, torch.full_like(ro.tokens, -100))
        return RolloutBatch(ids, real, positions_from_mask(real), labels, ro, tp, nr, sample_ids, seconds)

    def score_rollout(self, ro: RolloutBatch) -> RolloutScores:
        """2. Scores (minus the missing-EOS penalty) and 3. old log-probs, reference log-probs, KL and values."""
        cfg = self.cfg
        mask = ro.mask
        scores, _ = self.score(ro.ids, ro.real, ro.tp, ro.sampled.tokens, mask, ro.sample_ids, "train")
        penalty = cfg.reward.missing_eos_penalty * (~ro.sampled.ended).float()
        st = self._forward_stats(ro.ids, ro.pos, ro.labels, ro.tp, ro.nr)
        old, ref = st["old"].float(), st["ref"].float()
        kl = kl_estimate(old, ref, cfg.kl.estimator) * mask
        return RolloutScores(scores, scores - penalty, old, kl, st["kl_exact"], st["entropy"], st.get("values"),
                             self.kl.value)

    def _step_result(self, ro: RolloutBatch, sc: RolloutScores, upd: dict[str, Any], values, returns) -> StepResult:
        """6. The KL controller's update and the step's metrics (TRL's names), summed over ranks in one collective."""
        mask, ctx = ro.mask, self.ctx
        kl_seq = sc.kl.sum(dim=1)
        g = dict(zip(
            ("scores", "kl", "kl_exact", "entropy", "tokens", "truncated", "logprob_gap", "seqs", "rlhf_reward",
             "real"),
            ctx.global_sum([
                sc.scores.sum(), kl_seq.sum(), (sc.kl_exact * mask).sum(), (sc.entropy * mask).sum(), mask.sum(),
                (~ro.sampled.ended).sum(), ((ro.sampled.logprobs - sc.old).abs() * mask).sum(), float(mask.shape[0]),
                (sc.penalised - sc.coef * kl_seq).sum(), ro.real.sum(),
            ]),
        ))
        seqs = g["seqs"]
        self.kl.update(g["kl"] / seqs, int(seqs))
        metrics = {
            "objective/scores": g["scores"] / seqs, "objective/kl": g["kl"] / seqs,
            "objective/kl_exact": g["kl_exact"] / seqs, "objective/entropy": g["entropy"] / seqs,
            "objective/rlhf_reward": g["rlhf_reward"] / seqs, "response_length/mean": g["tokens"] / seqs,
            "response_length/clip_ratio": g["truncated"] / seqs,
            "rollout/logprob_gap": g["logprob_gap"] / max(g["tokens"], 1.0),
            "rollout/tokens_per_s": g["tokens"] / max(ro.seconds, 1e-9), "kl/coef": sc.coef, **upd["metrics"],
        }
        if values is not None:
            metrics["critic/vf_explained_var"] = self._explained_variance(values, returns, mask)
        return StepResult(loss=upd["loss"], lr=upd["lr"], grad_norm=upd["grad_norm"], finite=upd["finite"],
                          tokens=int(g["real"]), metrics=metrics)

    def _explained_variance(self, values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
        s, s2, e, e2, n = self.ctx.global_sum([
            (returns * mask).sum(), (returns**2 * mask).sum(), ((returns - values) * mask).sum(),
            ((returns - values) ** 2 * mask).sum(), mask.sum(),
        ])
        var_r, var_e = s2 / n - (s / n) ** 2, e2 / n - (e / n) ** 2
        return 1.0 - var_e / var_r if var_r > 0 else float("nan")

    def update(self, ro: RolloutBatch, old, adv, values, returns) -> dict[str, Any]:
        """5. ``ppo.epochs`` passes over ``ppo.minibatches`` minibatches, one optimizer step each (PPO-ptx's batch in
        the same step); returns the mean losses, the last step's learning rate and gradient norm."""
        cfg, pcfg, ctx = self.cfg, self.cfg.ppo, self.ctx
        actor, critic = ctx.models["policy"], ctx.models.get("critic")
        lr = ctx.lr()
        critic_lr = lr * (pcfg.critic_lr or cfg.optim.lr) / cfg.optim.lr
        sums = dict.fromkeys(("pg", "vf", "clip", "vclip", "approxkl", "tokens", "ptx", "ptx_tokens"), 0.0)
        finite, grad_norm = True, float("nan")
        for model in (actor, critic):
            if model is not None:
                model.train()
        for epoch in range(pcfg.epochs):
            gen = torch.Generator().manual_seed(cfg.trainer.seed * 100_003 + ctx.step * 101 + epoch)
            for k in torch.randperm(pcfg.minibatches, generator=gen).tolist():
                idx = torch.arange(k, ro.ids.shape[0], pcfg.minibatches, device=ro.ids.device)
                step_ok = self._minibatch(ro, idx, old, adv, values, returns, sums)
                finite = finite and step_ok
                grad_norm = apply_update(ctx, actor, lr, step_ok)
                if critic is not None:
                    apply_update(ctx, critic, critic_lr, step_ok)
        g = dict(zip(sums, ctx.global_sum(list(sums.values()))))
        tok = max(g["tokens"], 1.0)
        metrics = {"loss/policy": g["pg"] / tok, "policy/clipfrac": g["clip"] / tok,
                   "policy/approxkl": g["approxkl"] / tok}
        if critic is not None:
            metrics.update({"loss/value": g["vf"] / tok, "val/clipfrac": g["vclip"] / tok})
        if g["ptx_tokens"] > 0:
            metrics["loss/ptx"] = g["ptx"] / g["ptx_tokens"]
        return {"loss": g["pg"] / tok, "lr": lr, "grad_norm": grad_norm, "finite": finite, "metrics": metrics}

    def _minibatch(self, ro: RolloutBatch, idx: torch.Tensor, old, adv, values, returns,
                   sums: dict[str, float]) -> bool:
        """The gradients of one minibatch (rows ``idx``): the clipped policy loss and PPO-ptx's into the actor, the
        clipped value loss into the critic, each normalised by the minibatch's global token count. Adds the sums
        into ``sums``; returns whether they were finite."""
        cfg, pcfg, ctx = self.cfg, self.cfg.ppo, self.ctx
        actor, critic = ctx.models["policy"], ctx.models.get("critic")
        temp = cfg.rollout.temperature if cfg.rollout.temperature > 0 else 1.0
        cols = slice(ro.tp - 1, ro.tp - 1 + ro.nr)
        ids, pos, labels, mask = ro.ids, ro.pos, ro.labels, ro.mask
        scale = ctx.world_size / max(ctx.global_sum([mask[idx].sum()])[0], 1.0)
        size = cfg.trainer.micro_batch_size
        micro = [idx[i : i + size] for i in range(0, idx.numel(), size)]
        ptx_batch = self._next_ptx()
        ptx_micro = list(ctx.micro_batches(ptx_batch)) if ptx_batch is not None else []
        ptx_scale = ctx.world_size / max(ctx.global_sum([(ptx_batch["labels"] != -100).sum()])[0], 1.0) \
            if ptx_batch is not None else 0.0

        def policy_loss(r: torch.Tensor):
            def run() -> torch.Tensor:
                logp = actor(ids[r], position_ids=pos[r], output=TokenLogProbs(labels[r], temp))[:, cols]
                pl = clipped_policy_loss(logp, old[r], adv[r], pcfg.clip, pcfg.clip_high, pcfg.dual_clip)
                mk = mask[r]
                loss = (pl.loss * mk).sum()
                with torch.no_grad():
                    sums["pg"] += loss.item()
                    sums["clip"] += (pl.clipped & mk).sum().item()
                    sums["approxkl"] += (0.5 * (logp - old[r]) ** 2 * mk).sum().item()
                    sums["tokens"] += mk.sum().item()
                return loss * scale

            return run

        def ptx_loss(mb: dict[str, torch.Tensor]):
            def run() -> torch.Tensor:
                ptx = actor(mb["input_ids"], position_ids=mb["position_ids"], labels=mb["labels"])
                sums["ptx"] += ptx.item()
                sums["ptx_tokens"] += (mb["labels"] != -100).sum().item()
                return cfg.ptx.coef * ptx * ptx_scale

            return run

        def value_loss(r: torch.Tensor):
            def run() -> torch.Tensor:
                v = critic(ids[r], position_ids=pos[r])[:, cols].float()
                vf, vclipped = clipped_value_loss(v, values[r], returns[r], pcfg.value_clip)
                vloss = (vf * mask[r]).sum()
                sums["vf"] += vloss.item()
                sums["vclip"] += (vclipped & mask[r]).sum().item()
                return pcfg.vf_coef * vloss * scale

            return run

        accumulate(ctx, actor, [policy_loss(r) for r in micro] + [ptx_loss(mb) for mb in ptx_micro])
        if critic is not None:
            accumulate(ctx, critic, [value_loss(r) for r in micro])
        return all(math.isfinite(sums[k]) for k in ("pg", "vf", "ptx"))  # once not finite, later steps skip too

    def _next_ptx(self) -> dict[str, torch.Tensor] | None:
        loader = self.ctx.loaders.get("ptx")
        if loader is None:
            return None
        if self._ptx_batches is None:
            self._ptx_batches = iter(loader)
        return next(self._ptx_batches)

    # ---- evaluation ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Greedy responses to the val prompts: their mean reward and KL to the reference (per sequence)."""
        from igpt.sampling import positions_from_mask, sample_rollout

        ctx, cfg = self.ctx, self.cfg
        if "val" not in self.records:
            return {}
        actor = ctx.models["policy"]
        actor.eval()
        sums = torch.zeros(5, dtype=torch.float64)
        self.eval_rows = []
        for batch in ctx.eval_batches(self):
            keep = batch["sample_id"][:, 0] >= 0
            prompts, preal = self._prompts(batch)
            seeds = torch.zeros(prompts.shape[0], dtype=torch.int64, device=prompts.device)
            with actor.gathered() as model, ctx.autocast():
                ro = sample_rollout(model, prompts, preal, cfg.rollout.max_new_tokens, seeds, 0.0,
                                    stop_ids=ctx.stop_ids, pad_id=ctx.pad_id)
            tp, nr = prompts.shape[1], ro.tokens.shape[1]
            ids = torch.cat([prompts, ro.tokens], dim=1)
            real = torch.cat([preal, ro.mask], dim=1)
            labels = torch.full_like(ids, -100)
            labels[:, tp - 1 : tp - 1 + nr] = torch.where(ro.mask, ro.tokens, torch.full_like(ro.tokens, -100))
            sids = [max(int(s), 0) for s in batch["sample_id"][:, 0].tolist()]
            scores, completions = self.score(ids, real, tp, ro.tokens, ro.mask, sids, "val")
            st = self._forward_stats(ids, positions_from_mask(real), labels, tp, nr)
            mask = ro.mask & keep[:, None].to(ro.mask.device)
            kl = (kl_estimate(st["old"].float(), st["ref"].float(), cfg.kl.estimator) * mask).sum(dim=1)
            k = keep.to(scores.device)
            sums += torch.tensor([scores[k].sum().item(), kl[k].sum().item(), (st["kl_exact"] * mask).sum().item(),
                                  mask.sum().item(), k.sum().item()], dtype=torch.float64)
            if ctx.is_main and len(self.eval_rows) < 8:
                tok = ctx.tokenizer
                for i in range(prompts.shape[0]):
                    if keep[i] and len(self.eval_rows) < 8:
                        text = tok.decode(prompts[i][preal[i]].tolist(), skip_special_tokens=True)
                        self.eval_rows.append((text, completions[i], float(scores[i])))
        g = ctx.global_sum(sums.tolist())
        n = max(g[4], 1.0)
        return {"objective/scores": g[0] / n, "objective/kl": g[1] / n, "objective/kl_exact": g[2] / n,
                "response_length/mean": g[3] / n}

    def eval_summary(self, result: dict[str, float]) -> str:
        if not result:
            return "no val prompts"
        return (f"val reward {result['objective/scores']:.4f} (greedy), KL to reference {result['objective/kl']:.4f}"
                f" (exact {result['objective/kl_exact']:.4f}), response length {result['response_length/mean']:.1f}")

    def eval_table(self) -> tuple[tuple[str, ...], list[tuple]]:
        return ("prompt", "response", "reward"), self.eval_rows

    # ---- state -----------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"kl_coef": self.kl.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "kl_coef" in state:
            self.kl.value = float(state["kl_coef"])


STAGE = PPOStage
