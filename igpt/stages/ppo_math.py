"""The arithmetic of PPO and its critic-free variants, on ``(B, N)`` response tensors with a ``(B, N)`` bool mask.

- :func:`kl_estimate`: Schulman's per-token estimators of KL(pi || ref) from samples of pi ("Approximating KL
  divergence", 2020), with ``logr = log pi - log ref`` of the sampled token: ``k1 = logr`` (unbiased, can be
  negative), ``k2 = logr^2 / 2`` (biased, low variance), ``k3 = exp(-logr) - 1 + logr`` (unbiased, never negative;
  its log-ratio clamped to [-10, 10] first, as OpenRLHF does, since ``exp(-logr)`` of one very unlikely token would
  otherwise dominate the rewards: 1.6e5 at a log-ratio of -12).
- :func:`gae`: generalised advantage estimation (Schulman et al. 2016) backwards over the response, with values and
  rewards zeroed outside the mask, so whatever a critic predicts past a response's end cannot leak in.
- :func:`group_advantages`: GRPO (Shao et al. 2024: the reward minus the mean of its prompt's ``n`` samples, divided by
  their standard deviation) and RLOO (Ahmadian et al. 2024: the reward minus the mean of the *other* ``n - 1``).
- :func:`clipped_policy_loss`, :func:`clipped_value_loss`: PPO's objectives (Schulman et al. 2017), with an optional
  asymmetric upper clip (DAPO's clip-higher, Yu et al. 2025) and dual clip (Ye et al. 2020).
- :class:`KLController`: the fixed or adaptive KL coefficient of Ziegler et al. 2019.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

K3_CLAMP = 10.0  # k3's log-ratio is clamped to [-K3_CLAMP, K3_CLAMP] (OpenRLHF's compute_approx_kl)


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token estimate of KL(pi || ref) from the log-probs of tokens sampled from pi."""
    logr = logp - ref_logp
    if estimator == "k1":
        return logr
    if estimator == "k2":
        return 0.5 * logr**2
    if estimator == "k3":
        logr = logr.clamp(-K3_CLAMP, K3_CLAMP)
        return torch.expm1(-logr) + logr
    raise ValueError(f"kl.estimator={estimator!r}: expected k1, k2 or k3")


def token_rewards(kl: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor, coef: float) -> torch.Tensor:
    """Per-token rewards ``(B, N)``: ``-coef * KL_t`` on every response token and the sequence's score added at its
    last one (the end-of-turn token, or the last token of a response cut by the token budget)."""
    rewards = -coef * kl * mask
    last = mask.long().sum(dim=1) - 1  # responses are left-aligned in their columns: their last token is here
    rewards[torch.arange(rewards.shape[0], device=rewards.device), last] += scores
    return rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """Advantages and returns ``(B, N)``: ``delta_t = r_t + gamma V_{t+1} - V_t``, ``A_t = delta_t + gamma lam
    A_{t+1}``, ``returns = A + V``; zero outside the mask (values there are ignored)."""
    m = mask.to(rewards.dtype)
    rewards, values = rewards * m, values * m
    adv = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    n = rewards.shape[1]
    for t in reversed(range(n)):
        next_value = values[:, t + 1] if t + 1 < n else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last
        adv[:, t] = last
    adv = adv * m
    return adv, (adv + values) * m


def group_advantages(returns: torch.Tensor, n: int, kind: str, eps: float = 1e-6) -> torch.Tensor:
    """Sequence advantages ``(B,)`` from sequence returns ``(B,)`` whose rows come in groups of ``n`` samples of one
    prompt (rows ``g*n .. g*n + n - 1``)."""
    r = returns.view(-1, n)  # (prompts, n)
    if kind == "grpo":
        return ((r - r.mean(dim=1, keepdim=True)) / (r.std(dim=1, keepdim=True) + eps)).flatten()
    if kind == "rloo":
        return (r - (r.sum(dim=1, keepdim=True) - r) / (n - 1)).flatten()
    raise ValueError(f"ppo.advantage={kind!r}: expected grpo or rloo here")


def sequence_whiten(seq_adv: torch.Tensor, mean: float, var: float, eps: float = 1e-8) -> torch.Tensor:
    """``(a - mean) / sqrt(var)`` of sequence advantages ``(B,)``, mean and variance over the global batch's
    *sequences* (each counts once, whatever its length: TRL's RLOO ``normalize_advantage``)."""
    return (seq_adv - mean) * torch.rsqrt(torch.tensor(var + eps, dtype=seq_adv.dtype))


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, mean: float, var: float, eps: float = 1e-8) -> torch.Tensor:
    """``(x - mean) / sqrt(var)`` on the mask, 0 elsewhere (mean and variance over the global batch)."""
    return torch.where(mask, (x - mean) * torch.rsqrt(torch.tensor(var + eps, dtype=x.dtype)), torch.zeros_like(x))


@dataclass
class PolicyLoss:
    loss: torch.Tensor  # (B, N) per-token loss
    clipped: torch.Tensor  # (B, N) bool: the clipped objective was the active one
    ratio: torch.Tensor  # (B, N)


def clipped_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    adv: torch.Tensor,
    clip: float,
    clip_high: float | None = None,
    dual_clip: float | None = None,
) -> PolicyLoss:
    """``max(-A r, -A clip(r, 1 - eps, 1 + eps_high))`` per token, and with ``dual_clip`` = c, ``min(that, -c A)``
    where A < 0 (a bound on how hard a very unlikely bad action is pushed down)."""
    ratio = torch.exp(logp - old_logp)
    hi = clip if clip_high is None else clip_high
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip, 1.0 + hi)
    loss = torch.maximum(unclipped, clipped)
    if dual_clip is not None:
        loss = torch.where(adv < 0, torch.minimum(loss, -dual_clip * adv), loss)
    return PolicyLoss(loss, clipped > unclipped, ratio)


def clipped_value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, clip: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``0.5 max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2)`` per token, and where the clipped term won."""
    clipped_v = old_values + torch.clamp(values - old_values, -clip, clip)
    a, b = (values - returns) ** 2, (clipped_v - returns) ** 2
    return 0.5 * torch.maximum(a, b), b > a


class KLController:
    """The KL penalty coefficient: fixed, or adaptive toward ``target`` (Ziegler et al. 2019, section 2.2):
    ``coef *= 1 + clip(KL / target - 1, -0.2, 0.2) * samples / horizon`` after every step."""

    def __init__(self, coef: float, target: float | None, horizon: int) -> None:
        self.value = coef
        self.target = target
        self.horizon = horizon

    def update(self, kl: float, samples: int) -> None:
        if self.target is None:
            return
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * samples / self.horizon
