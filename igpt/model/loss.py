"""The language-model loss entry point: final hidden states and the output matrix in, fp32 cross-entropy out.

``lm_loss(hidden, weight, labels, backend, reduction)`` with hidden ``(N, H)``, weight ``(V, H)``, labels ``(N,)``
(``-100`` = no loss):

- ``torch``: logits = ``hidden @ weight.T`` in the compute dtype, then :func:`torch.nn.functional.cross_entropy` in
  fp32. Materialises the ``(N, V)`` logits (plus their fp32 copy).
- ``triton``: ``igpt.kernels.fused_linear_cross_entropy`` (Liger-Kernel's fused linear cross-entropy call form), which
  computes the loss and its gradients chunk by chunk and never holds the full logits.

``reduction`` is ``"sum"`` (summed over non-ignored tokens, what the trainer divides by the global token count) or
``"none"`` (per token, 0 where ignored). :func:`resolve_loss_backend` falls back to ``torch`` with a warning when the
Triton kernels cannot run (or raises with ``strict=True``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from igpt.model.attention import _resolve, _triton_status
from igpt.registry import LOSS_BACKENDS

BACKENDS = LOSS_BACKENDS
REDUCTIONS = ("sum", "none")
IGNORE_INDEX = -100


def lm_loss(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, backend: str = "torch", reduction: str = "sum"
) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T`` against ``labels`` in fp32: a scalar (``"sum"``) or ``(N,)``
    (``"none"``)."""
    if backend not in BACKENDS:
        raise ValueError(f"loss backend {backend!r} is not one of {', '.join(BACKENDS)}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction {reduction!r} is not one of {', '.join(REDUCTIONS)}")
    if hidden.dim() != 2 or labels.shape != hidden.shape[:1] or weight.shape[1] != hidden.shape[1]:
        raise ValueError(
            f"lm_loss expects hidden (N, H), weight (V, H), labels (N,); got {tuple(hidden.shape)}, "
            f"{tuple(weight.shape)}, {tuple(labels.shape)}"
        )
    if backend == "triton":
        from igpt.kernels import fused_linear_cross_entropy

        loss = fused_linear_cross_entropy(hidden, weight, labels, ignore_index=IGNORE_INDEX, reduction=reduction)
        return loss.float()
    logits = hidden @ weight.t()  # (N, V) in the compute dtype
    return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction=reduction)


def resolve_loss_backend(requested: str, device: str | torch.device, strict: bool = False) -> str:
    """Return the loss backend that will run: ``requested`` when it can, else ``torch`` (warning; strict: raise)."""
    if requested not in BACKENDS:
        raise ValueError(f"kernels.loss={requested!r} is not one of {', '.join(BACKENDS)}")
    device = torch.device(device)
    status = (True, "") if requested == "torch" else _triton_status(device, ("fused_linear_cross_entropy",))
    return _resolve("loss", requested, "torch", status, strict)
