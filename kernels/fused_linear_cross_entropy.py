"""Fused linear + cross-entropy: the loss of ``hidden @ weight.T + bias`` without ever holding the full logits.

Follows Liger-Kernel's ``ops/fused_linear_cross_entropy.py`` (Hsu et al., 2024, https://arxiv.org/abs/2410.10989):
tokens are processed in chunks; for each chunk the logits are computed with one matmul (cuBLAS), the row kernel of
``cross_entropy.py`` turns them into losses (fp32 online log-sum-exp) and overwrites them in place with their
gradient, and two more matmuls turn that into the chunk's ``grad_hidden`` rows and its share of ``grad_weight``.

Memory (N tokens, hidden H, vocabulary V, chunk C rows, input dtype of b bytes):

- logits: one ``C x V`` chunk at a time (b bytes each) instead of ``N x V``; C is chosen so a chunk holds about
  ``2 * N * H`` elements (and at least 256 rows, at most N), unless ``chunk_size`` is given;
- ``grad_weight`` accumulates across chunks in fp32 (``V x H x 4`` bytes; for an fp32 weight this is the gradient
  itself), so a bf16 weight's gradient is rounded once, not once per chunk; ``grad_hidden`` is ``N x H``.

When to compute gradients:

- ``reduction="mean"`` or ``"sum"`` with gradients required: in the forward (three matmuls in all, like an unfused
  linear + cross-entropy); the backward only multiplies by the incoming scalar gradient.
- ``reduction="none"``: the per-token weights of the gradient are known only in the backward, so the forward keeps
  the per-token log-sum-exp (N floats) and the backward recomputes each chunk's logits (four matmuls in all).
- no gradient required: the forward only (one matmul).

Under autocast the inputs are cast to the autocast dtype first (as ``torch.nn.functional.linear`` would be).
"""

from __future__ import annotations

import torch

from .cross_entropy import _ce_fwd_kernel, ce_backward_rows, ce_forward_rows, check_loss_args, reduce_loss
from .runtime import check_device, next_power_of_2

__all__ = ["fused_linear_cross_entropy"]

_FP32_OUT_MM: dict[str, bool] = {}  # device type -> whether torch.addmm(..., out_dtype=float32) works there


def _addmm_fp32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` with ``acc`` fp32 and ``a``, ``b`` possibly fp16/bf16, without an fp32 copy of the product.

    On CUDA, ``torch.addmm(..., out_dtype=torch.float32)`` (torch >= 2.8) accumulates straight into ``acc``;
    elsewhere the (small, chunk-sized) operands are upcast instead.
    """
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
        return
    dev = acc.device.type
    if _FP32_OUT_MM.get(dev, dev == "cuda"):
        try:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            _FP32_OUT_MM[dev] = True
            return
        except (RuntimeError, TypeError, NotImplementedError):
            _FP32_OUT_MM[dev] = False
    acc.addmm_(a.float(), b.float())


def default_chunk_size(n: int, h: int, v: int) -> int:
    """Rows per chunk: a chunk of logits about twice the size of ``hidden``, a power of two in [256, N]."""
    rows = next_power_of_2(max(1, (2 * n * h) // max(v, 1)))
    return max(1, min(n, max(256, rows)))


def _linear(h: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    # (C, H) @ (H, V) -> (C, V)
    return torch.addmm(bias, h, w.t()) if bias is not None else torch.mm(h, w.t())


def _chunk_grads(
    dlogits: torch.Tensor,
    h: torch.Tensor,
    weight: torch.Tensor,
    grad_hidden: torch.Tensor | None,
    gw_acc: torch.Tensor | None,
    gb_acc: torch.Tensor | None,
) -> None:
    """Turn one chunk's gradient of the logits (C, V) into grad_hidden rows and grad_weight/grad_bias shares."""
    if grad_hidden is not None:
        torch.mm(dlogits, weight, out=grad_hidden)  # (C, V) @ (V, H) -> (C, H)
    if gw_acc is not None:
        _addmm_fp32_(gw_acc, dlogits.t(), h)  # (V, C) @ (C, H) -> (V, H)
    if gb_acc is not None:
        gb_acc += dlogits.sum(0, dtype=torch.float32)  # (V,)


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, target, bias, ignore_index, reduction, label_smoothing, z_loss, chunk_size):  # noqa: ANN001, ANN205, E501
        n = hidden.shape[0]
        v = weight.shape[0]
        need_h, need_w, _, need_b = ctx.needs_input_grad[:4]
        need_b = need_b and bias is not None
        eager_grads = reduction != "none" and (need_h or need_w or need_b)
        valid = (target != ignore_index).sum().to(torch.float32)
        # One-element fp32 factor the row kernel multiplies the gradient by: 1/valid for the mean, 1 for the sum.
        scale = (1.0 / valid).reshape(1) if reduction == "mean" else torch.ones(1, device=hidden.device)
        loss = torch.empty(n, dtype=torch.float32, device=hidden.device)
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if eager_grads and need_h else None
        gw_acc = gb_acc = None
        if eager_grads and need_w:
            gw_acc = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)  # (V, H)
        if eager_grads and need_b:
            gb_acc = torch.zeros(v, dtype=torch.float32, device=weight.device)  # (V,)
        for s in range(0, n, chunk_size):
            e = min(n, s + chunk_size)
            h = hidden[s:e]  # (C, H)
            logits = _linear(h, weight, bias)  # (C, V), input dtype
            grad_out = logits if eager_grads else None  # gradient overwrites the logits in place
            loss[s:e], lse[s:e] = ce_forward_rows(
                logits, target[s:e], ignore_index, label_smoothing, z_loss, grad_out=grad_out, grad_scale=scale
            )
            if eager_grads:
                _chunk_grads(logits, h, weight, grad_hidden[s:e] if need_h else None, gw_acc, gb_acc)
            del logits
        grad_weight = None
        if gw_acc is not None:
            grad_weight = gw_acc if weight.dtype == torch.float32 else gw_acc.to(weight.dtype)
            del gw_acc
        grad_bias = gb_acc.to(bias.dtype) if gb_acc is not None else None
        if eager_grads:
            ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        else:
            ctx.save_for_backward(hidden, weight, target, bias, lse)
        ctx.args = (eager_grads, ignore_index, reduction, label_smoothing, z_loss, chunk_size, need_h, need_w, need_b)
        return reduce_loss(loss, valid, reduction)

    @staticmethod
    def backward(ctx, grad_loss):  # noqa: ANN001, ANN205
        eager_grads, ignore_index, reduction, label_smoothing, z_loss, chunk_size, need_h, need_w, need_b = ctx.args
        if eager_grads:
            if getattr(ctx, "scaled", False):
                raise RuntimeError(
                    "igpt.kernels.fused_linear_cross_entropy: backward was called twice through the same graph "
                    "(retain_graph=True); its gradients are computed once in the forward and scaled in place, so "
                    "call the function again instead"
                )
            ctx.scaled = True
            grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
            g = grad_loss.reshape(())
            # These tensors belong to this graph alone, so scaling them in place saves a copy of grad_weight.
            for t in (grad_hidden, grad_weight, grad_bias):
                if t is not None:
                    t.mul_(g.to(t.dtype))
            return grad_hidden, grad_weight, None, grad_bias, None, None, None, None, None
        hidden, weight, target, bias, lse = ctx.saved_tensors
        n = hidden.shape[0]
        scale = grad_loss.to(torch.float32).contiguous().reshape(-1)  # (N,) for "none"
        grad_hidden = torch.empty_like(hidden) if need_h else None
        gw_acc = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        gb_acc = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_b else None
        for s in range(0, n, chunk_size):
            e = min(n, s + chunk_size)
            h = hidden[s:e]  # (C, H)
            logits = _linear(h, weight, bias)  # (C, V)
            row_scale = scale[s:e] if scale.numel() == n else scale
            ce_backward_rows(logits, target[s:e], lse[s:e], row_scale, logits, ignore_index, label_smoothing, z_loss)
            _chunk_grads(logits, h, weight, grad_hidden[s:e] if need_h else None, gw_acc, gb_acc)
            del logits
        grad_weight = None
        if gw_acc is not None:
            grad_weight = gw_acc if weight.dtype == torch.float32 else gw_acc.to(weight.dtype)
        grad_bias = gb_acc.to(bias.dtype) if gb_acc is not None else None
        return grad_hidden, grad_weight, None, grad_bias, None, None, None, None, None


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    *,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T + bias`` against ``target``, in chunks of tokens.

    Args:
        hidden: ``(N, H)`` fp32, fp16 or bf16 activations (e.g. the final norm's output, flattened).
        weight: ``(V, H)`` output projection, same dtype (under autocast both are cast to the autocast dtype).
        target: ``(N,)`` int64 or int32 class indices; ``ignore_index`` marks tokens without loss.
        bias: optional ``(V,)``.
        reduction, label_smoothing, z_loss: as in :func:`igpt.kernels.cross_entropy`.
        chunk_size: tokens per chunk (igpt extension; default: see :func:`default_chunk_size`).

    Returns:
        The loss in float32 (scalar, or ``(N,)`` with 0 at ignored tokens for ``reduction="none"``); differentiable in
        ``hidden``, ``weight`` and ``bias``.
    """
    name = "fused_linear_cross_entropy"
    for label, t, dims in (("hidden", hidden, "(N, H)"), ("weight", weight, "(V, H)")):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"igpt.kernels.{name}: {label} must be a 2-D tensor {dims}, got {got}")
    dev = hidden.device.type
    if torch.is_autocast_enabled(dev):
        dtype = torch.get_autocast_dtype(dev)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    for label, t in (("hidden", hidden), ("weight", weight), ("bias", bias)):
        if t is not None and t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise TypeError(f"igpt.kernels.{name}: {label} must be float16, bfloat16 or float32, got {t.dtype}")
    if weight.dtype != hidden.dtype or (bias is not None and bias.dtype != hidden.dtype):
        got = f"hidden {hidden.dtype}, weight {weight.dtype}" + (f", bias {bias.dtype}" if bias is not None else "")
        raise TypeError(f"igpt.kernels.{name}: hidden, weight and bias must share one dtype (or run under autocast), "
                        f"got {got}")  # fmt: skip
    n, h_dim = hidden.shape
    v = weight.shape[0]
    if weight.shape[1] != h_dim:
        raise ValueError(f"igpt.kernels.{name}: weight must be (V, {h_dim}) to match hidden (N, {h_dim}), got "
                         f"{tuple(weight.shape)}")  # fmt: skip
    if bias is not None and tuple(bias.shape) != (v,):
        raise ValueError(f"igpt.kernels.{name}: bias must have shape ({v},), got {tuple(bias.shape)}")
    for label, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.device != hidden.device:
            raise ValueError(f"igpt.kernels.{name}: {label} is on {t.device} but hidden is on {hidden.device}")
    check_loss_args(name, n, v, target, ignore_index, reduction, label_smoothing, z_loss, hidden.device)
    if chunk_size is None:
        chunk_size = default_chunk_size(n, h_dim, v)
    elif int(chunk_size) < 1:
        raise ValueError(f"igpt.kernels.{name}: chunk_size must be >= 1, got {chunk_size}")
    check_device(name, _ce_fwd_kernel, hidden, weight, target)
    with torch.autocast(dev, enabled=False):
        return _FusedLinearCrossEntropy.apply(
            hidden.contiguous(), weight.contiguous(), target.contiguous(),
            bias.contiguous() if bias is not None else None, int(ignore_index), reduction, float(label_smoothing),
            float(z_loss), max(1, int(chunk_size)),
        )  # fmt: skip
