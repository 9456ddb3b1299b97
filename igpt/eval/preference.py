"""Preference metrics judged by a scoring function: reward-model pairwise accuracy and win rate against a reference.

A *scorer* has the form of a TRL reward function (and of PPO's ``reward.functions``):
``scorer(prompts: list[Prompt], completions: list[str]) -> list[float]``, one scalar reward per (prompt, completion)
pair, higher is better. Everything here takes the scorer as an argument, so it runs with a reward model, a rule-based
reward function, or a stub in tests.

- Pairwise accuracy (InstructGPT's reward-model accuracy, Ouyang et al. 2022; TRL's ``RewardTrainer`` ``accuracy``):
  the fraction of ``(prompt, chosen, rejected)`` records where ``r(chosen) > r(rejected)``; a tie counts 0.5. Also the
  mean margin ``r(chosen) - r(rejected)``.
- Win rate (AlpacaEval-style, with a reward model as the judge): the fraction of prompts where the evaluated model's
  response scores higher than the reference response; a tie counts 0.5.

``reward_model_scorer`` turns a reward-model checkpoint (``+stage=rm``) into a scorer; ``judge=<module:function>``
takes any TRL-style reward function instead.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

from igpt.eval.tasks import Prompt

Scorer = Callable[[list[Prompt], list[str]], list[float]]


def _scores(scorer: Scorer, prompts: Sequence[Prompt], completions: Sequence[str]) -> list[float]:
    out = [float(x) for x in scorer(list(prompts), list(completions))]
    if len(out) != len(completions):
        raise ValueError(f"the scorer returned {len(out)} rewards for {len(completions)} completions")
    return out


def _wins(a: Sequence[float], b: Sequence[float]) -> list[float]:
    return [1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a, b)]


def pairwise_accuracy(
    scorer: Scorer, prompts: Sequence[Prompt], chosen: Sequence[str], rejected: Sequence[str]
) -> tuple[dict[str, float], list[dict[str, float]]]:
    """``({"accuracy", "margin", "reward_chosen", "reward_rejected"}, per-record rewards)`` (module docstring)."""
    rc = _scores(scorer, prompts, chosen)
    rr = _scores(scorer, prompts, rejected)
    wins = _wins(rc, rr)
    n = len(wins)
    metrics = {
        "accuracy": sum(wins) / n,
        "margin": sum(c - r for c, r in zip(rc, rr)) / n,
        "reward_chosen": sum(rc) / n,
        "reward_rejected": sum(rr) / n,
    }
    return metrics, [{"reward_chosen": c, "reward_rejected": r, "win": w} for c, r, w in zip(rc, rr, wins)]


def win_rate(
    scorer: Scorer, prompts: Sequence[Prompt], responses: Sequence[str], references: Sequence[str]
) -> tuple[dict[str, float], list[dict[str, float]]]:
    """``({"win_rate", "accuracy", "reward", "reward_reference"}, per-record rewards)``; ``accuracy`` is the win rate
    (every igpt.eval kind reports an ``accuracy``)."""
    r = _scores(scorer, prompts, responses)
    ref = _scores(scorer, prompts, references)
    wins = _wins(r, ref)
    n = len(wins)
    rate = sum(wins) / n
    metrics = {"win_rate": rate, "accuracy": rate, "reward": sum(r) / n, "reward_reference": sum(ref) / n}
    return metrics, [{"reward": a, "reward_reference": b, "win": w} for a, b, w in zip(r, ref, wins)]


def reward_model_scorer(checkpoint: str, device: str = "cpu", batch_size: int = 8) -> Scorer:
    """A scorer backed by a reward-model checkpoint (``+stage=rm``; its normalisation applied as it loads).

    Each (prompt, completion) is encoded with the chat template (the prompt's messages, then the completion as the
    assistant turn, ``<|im_end|>`` included) and scored ``batch_size`` pairs at a time on ``device``: the scalar head
    at each sequence's last token, as the reward-model stage reads it (``igpt.stages.rm.score``).
    """
    import torch

    from igpt.checkpoint import load_model
    from igpt.data.chat import ChatFormat, encode_chat
    from igpt.stages.rm import score

    model, tokenizer, meta = load_model(checkpoint, device)
    if model.head != "scalar":
        raise ValueError(f"judge={checkpoint}: not a reward model (stage {meta.get('stage')!r}, a language-model head)")
    pad = ChatFormat.of(tokenizer).pad_id

    def messages(prompt: Prompt, completion: str) -> list[dict[str, str]]:
        turns = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        return [*turns, {"role": "assistant", "content": completion}]

    def scorer(prompts: list[Prompt], completions: list[str]) -> list[float]:
        out: list[float] = []
        for i in range(0, len(prompts), batch_size):
            seqs = [encode_chat(tokenizer, messages(p, c))[0][-model.cfg.max_seq_len :]
                    for p, c in zip(prompts[i : i + batch_size], completions[i : i + batch_size])]
            width = max(len(x) for x in seqs)
            ids = torch.full((len(seqs), width), pad, dtype=torch.long)
            real = torch.zeros_like(ids, dtype=torch.bool)
            for j, x in enumerate(seqs):
                ids[j, : len(x)] = torch.tensor(x)
                real[j, : len(x)] = True
            out += score(model, ids.to(device), real.to(device)).tolist()
        return out

    return scorer


def load_scorer(spec: str, device: str = "cpu", batch_size: int = 8) -> Scorer:
    """A scorer from ``judge=``: a reward-model checkpoint or run dir, or ``package.module:function``."""
    if os.path.isdir(spec):
        return reward_model_scorer(spec, device, batch_size)
    from igpt.config import import_callable

    return import_callable(spec, "judge", "a reward-model checkpoint dir, nor of the form module:function")
