"""What a forward pass returns: small output objects run *inside* ``Transformer.forward`` on the final hidden states.

The decoder computes the final normed hidden states ``h`` ``(B, S, dim)``; an output object turns them into what the
caller needs. It runs inside ``forward`` so that the weights it reads (``lm_head.weight``, ``score``) are the
gathered ones under FSDP2 and DeepSpeed ZeRO-3: their hooks gather a module's parameters only around its
``forward``. This is Liger-Kernel's composition (losses take ``(hidden, lm_head.weight)``) with torchtitan's rule that
the model knows nothing of parallelism.

- :class:`Logits`: ``(B, S, V)`` logits (optionally only the last ``keep_last`` positions).
- :class:`TokenLoss`: the fp32 next-token cross-entropy of ``labels`` (``-100`` = no loss), summed or per token.
- :class:`TokenLogProbs`: per-token log-probabilities ``(B, S)`` of ``labels`` under ``softmax(logits / T)`` (0 where
  ignored), differentiable. With ``kernels.loss=triton`` this is the fused linear cross-entropy kernel, which never
  materialises the ``(N, V)`` logits; DPO and PPO use it for their log-ratios. At a temperature that is not a power
  of 2 it computes the logits in the compute dtype and divides them by T in fp32 (materialising them), the same
  computation as :class:`TokenStats` and the sampler, so a policy and a reference with equal weights agree exactly.
- :class:`TokenStats`: no-grad per-token log-probabilities and entropies computed over token chunks (at most
  ``chunk`` rows of logits exist at a time), optionally with the exact full-vocabulary KL to a second model's
  distribution given by its hidden states and output matrix (PPO's ``objective/kl_exact``).
- :class:`Values`: the scalar head ``(B, S)`` in fp32 (reward model, critic).
- :class:`Hidden`: the final hidden states themselves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from igpt.model.loss import IGNORE_INDEX, lm_loss


class Output:
    """Base class: ``__call__(model, hidden)`` with ``hidden`` ``(B, S, dim)`` after the final norm."""

    needs_lm_head = True

    def __call__(self, model: torch.nn.Module, hidden: torch.Tensor):  # pragma: no cover - interface
        raise NotImplementedError


def _lm_weight(model: torch.nn.Module, what: str) -> torch.Tensor:
    head = getattr(model, "lm_head", None)
    if head is None:
        raise ValueError(f"{what} needs a language-model head, but this model has a scalar head (head='scalar')")
    return head.weight


@dataclass
class Logits(Output):
    keep_last: int = 0  # > 0: only the last that many positions (a prefill needs one)

    def __call__(self, model, hidden):
        if self.keep_last > 0:
            hidden = hidden[:, -self.keep_last :]  # (B, keep_last, dim)
        _lm_weight(model, "Logits")
        return model.lm_head(hidden)  # (B, S, V)


@dataclass
class TokenLoss(Output):
    labels: torch.Tensor  # (B, S), -100 = no loss
    reduction: str = "sum"  # "sum" | "none"

    def __call__(self, model, hidden):
        b, s, _ = hidden.shape
        if self.labels.shape != (b, s):
            raise ValueError(f"labels {tuple(self.labels.shape)} must have the shape of input_ids {(b, s)}")
        loss = lm_loss(
            hidden.reshape(b * s, -1), _lm_weight(model, "TokenLoss"), self.labels.reshape(b * s),
            model.loss_backend, self.reduction,
        )  # () or (B*S,)
        return loss if self.reduction == "sum" else loss.reshape(b, s)


@dataclass
class TokenLogProbs(Output):
    """``log softmax(logits / temperature)[labels]`` per token ``(B, S)`` in fp32, 0 where ``labels == -100``."""

    labels: torch.Tensor
    temperature: float = 1.0

    def __call__(self, model, hidden):
        t = self.temperature
        if t == 1.0:
            return -TokenLoss(self.labels, "none")(model, hidden)
        if model.loss_backend == "triton" and _power_of_two(t):
            # dividing by a power of 2 is exact in any float format, so (h / T) @ W.T == (h @ W.T) / T bit for bit
            return -TokenLoss(self.labels, "none")(model, hidden / t)
        # Any other T: the logits in the compute dtype, divided by T in fp32, exactly what TokenStats and the sampler
        # compute (dividing bf16 hidden states first rounds them: 7e-3 per token between policy and reference).
        b, s, _ = hidden.shape
        if self.labels.shape != (b, s):
            raise ValueError(f"labels {tuple(self.labels.shape)} must have the shape of input_ids {(b, s)}")
        logits = hidden.reshape(b * s, -1) @ _lm_weight(model, "TokenLogProbs").t()  # (B*S, V) in the compute dtype
        loss = F.cross_entropy(logits.float() / t, self.labels.reshape(b * s), ignore_index=IGNORE_INDEX,
                               reduction="none")
        return -loss.reshape(b, s)


def _power_of_two(x: float) -> bool:
    m, _ = math.frexp(x)
    return x > 0 and m == 0.5


@dataclass
class TokenStats(Output):
    """No-grad per-token statistics of ``labels`` over token chunks: a dict of ``(B, S)`` fp32 tensors (0 where
    ignored) with ``logprobs``, ``entropy`` and, when ``other_hidden`` / ``other_weight`` (another model's hidden
    states ``(B, S, dim')`` and full output matrix ``(V, dim')``) are given, ``kl`` = KL(this || other) over the whole
    vocabulary and ``other_logprobs``, the labels' log-probabilities under the other model. Never more than ``chunk``
    rows of logits (of each model) exist at once."""

    labels: torch.Tensor
    temperature: float = 1.0
    other_hidden: torch.Tensor | None = None
    other_weight: torch.Tensor | None = None
    chunk: int = 1024

    @torch.no_grad()
    def __call__(self, model, hidden):
        b, s, d = hidden.shape
        weight = _lm_weight(model, "TokenStats")
        labels = self.labels.reshape(b * s)
        h = hidden.reshape(b * s, d)
        oh = None if self.other_hidden is None else self.other_hidden.reshape(b * s, -1)
        keep = torch.nonzero(labels != IGNORE_INDEX).flatten()  # (n,) only the positions that count
        out = {k: torch.zeros(b * s, dtype=torch.float32, device=hidden.device) for k in ("logprobs", "entropy")}
        if oh is not None:
            out["kl"] = torch.zeros(b * s, dtype=torch.float32, device=hidden.device)
            out["other_logprobs"] = torch.zeros(b * s, dtype=torch.float32, device=hidden.device)
        for start in range(0, keep.numel(), self.chunk):
            idx = keep[start : start + self.chunk]
            logp = F.log_softmax((h[idx] @ weight.t()).float() / self.temperature, dim=-1)  # (c, V)
            out["logprobs"][idx] = logp.gather(-1, labels[idx, None]).squeeze(-1)
            p = logp.exp()
            out["entropy"][idx] = -(p * logp).sum(-1)
            if oh is not None:
                other = F.log_softmax((oh[idx] @ self.other_weight.t()).float() / self.temperature, dim=-1)  # (c, V)
                out["kl"][idx] = (p * (logp - other)).sum(-1)
                out["other_logprobs"][idx] = other.gather(-1, labels[idx, None]).squeeze(-1)
        return {k: v.reshape(b, s) for k, v in out.items()}


class Values(Output):
    """The scalar head per position ``(B, S)`` in fp32."""

    needs_lm_head = False

    def __call__(self, model, hidden):
        score = getattr(model, "score", None)
        if score is None:
            raise ValueError("Values needs a scalar head, but this model has a language-model head (head='lm')")
        values = score(hidden).squeeze(-1).float()  # (B, S)
        offset = getattr(model, "value_offset", 0.0)
        return values + offset if offset else values


class Hidden(Output):
    """The final (normed) hidden states ``(B, S, dim)``."""

    needs_lm_head = False

    def __call__(self, model, hidden):
        return hidden


__all__ = ["Hidden", "Logits", "Output", "TokenLogProbs", "TokenLoss", "TokenStats", "Values"]
