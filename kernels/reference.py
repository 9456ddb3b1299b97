"""Plain-PyTorch references for igpt's Triton kernels: the definitions the kernels are tested against.

Each function mirrors one kernel's call form and semantics exactly, materialising everything (the S x S scores, the
N x V logits), so it is only for tests, benchmarks' correctness checks and small CPU runs:

- :func:`attention_ref` / :func:`attention_varlen_ref`: ``softmax(q k^T * scale) v`` with grouped-query heads and the
  bottom-right-aligned causal mask of flash-attn >= 2.1; rows that see no key give zeros.
- :func:`cross_entropy_ref` / :func:`linear_cross_entropy_ref`: ``torch.nn.functional.cross_entropy`` semantics
  (ignore_index, label_smoothing, mean over non-ignored tokens) plus PaLM's z-loss ``z * logsumexp(logits)**2``.

``upcast=True`` (the default) computes in float32 (or keeps float64 inputs in float64); ``upcast=False`` computes in the
input dtype, which is "torch's own low-precision computation" for the flash-attention error rule.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["attention_ref", "attention_varlen_ref", "cross_entropy_ref", "linear_cross_entropy_ref"]


def _compute_dtype(dtype: torch.dtype, upcast: bool) -> torch.dtype:
    if not upcast or dtype == torch.float64:
        return dtype
    return torch.float32


def attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    softmax_scale: float | None = None,
    upcast: bool = True,
) -> torch.Tensor:
    """Reference for ``flash_attn_func``: q ``(B, Sq, Hq, D)``, k, v ``(B, Sk, Hkv, D)`` -> ``(B, Sq, Hq, D)``."""
    dtype = q.dtype
    ct = _compute_dtype(dtype, upcast)
    b, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(d) if softmax_scale is None else softmax_scale
    qt = q.to(ct).transpose(1, 2)  # (B, Hq, Sq, D)
    kt = k.to(ct).repeat_interleave(hq // hkv, dim=2).transpose(1, 2)  # (B, Hq, Sk, D)
    vt = v.to(ct).repeat_interleave(hq // hkv, dim=2).transpose(1, 2)  # (B, Hq, Sk, D)
    scores = torch.matmul(qt, kt.transpose(-1, -2)) * scale  # (B, Hq, Sq, Sk)
    if causal:
        rows = torch.arange(sq, device=q.device)[:, None]
        cols = torch.arange(sk, device=q.device)[None, :]
        visible = cols <= rows + (sk - sq)  # (Sq, Sk), bottom-right aligned
        scores = scores.masked_fill(~visible, float("-inf"))
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows without a visible key -> 0
    else:
        probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs.to(vt.dtype), vt)  # (B, Hq, Sq, D)
    return out.transpose(1, 2).to(dtype)  # (B, Sq, Hq, D)


def attention_varlen_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    causal: bool = False,
    softmax_scale: float | None = None,
    upcast: bool = True,
) -> torch.Tensor:
    """Reference for ``flash_attn_varlen_func``: each document attended separately, outputs concatenated."""
    cq = cu_seqlens_q.tolist()
    ck = cu_seqlens_k.tolist()
    outs = []
    for i in range(len(cq) - 1):
        qi = q[cq[i] : cq[i + 1]].unsqueeze(0)  # (1, Sq_i, Hq, D)
        ki = k[ck[i] : ck[i + 1]].unsqueeze(0)  # (1, Sk_i, Hkv, D)
        vi = v[ck[i] : ck[i + 1]].unsqueeze(0)
        outs.append(attention_ref(qi, ki, vi, causal, softmax_scale, upcast).squeeze(0))
    return torch.cat(outs, dim=0) if outs else q.new_zeros(q.shape)


def cross_entropy_ref(
    logits: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
) -> torch.Tensor:
    """Reference for ``cross_entropy``: logits ``(N, V)``, target ``(N,)``; loss in float32 (float64 stays)."""
    x = logits.to(_compute_dtype(logits.dtype, True))
    per_token = F.cross_entropy(x, target, ignore_index=ignore_index, reduction="none", label_smoothing=label_smoothing)
    valid = target != ignore_index
    if z_loss:
        per_token = per_token + z_loss * torch.logsumexp(x, dim=-1).pow(2) * valid
    if reduction == "none":
        return per_token
    if reduction == "sum":
        return per_token.sum()
    if reduction == "mean":
        return per_token.sum() / valid.sum()
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def linear_cross_entropy_ref(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
) -> torch.Tensor:
    """Reference for ``fused_linear_cross_entropy``: logits = hidden @ weight^T + bias in the input dtype, then
    :func:`cross_entropy_ref` (which upcasts them), as a model computing ``lm_head(x).float()`` would."""
    logits = F.linear(hidden, weight, bias)  # (N, V)
    return cross_entropy_ref(logits, target, ignore_index, reduction, label_smoothing, z_loss)
