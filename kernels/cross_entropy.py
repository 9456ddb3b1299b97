"""Cross-entropy over a vocabulary in Triton: one program per token row, fp32 online log-sum-exp, no softmax copy.

Follows Liger-Kernel's ``ops/cross_entropy.py`` (Hsu et al., 2024, https://arxiv.org/abs/2410.10989) and the online
softmax of Milakov & Gimelshein (2018): a row's logits are read once in blocks of ``BLOCK_V`` to get the running max,
the sum of exponentials and (for label smoothing) the sum of logits, so the loss needs one pass over memory; the
gradient needs one more pass (read logits, write gradient) and is produced in the backward from the saved per-row
log-sum-exp, so the input logits are never modified.

Semantics (per token i with target t_i, V classes, smoothing eps, z-loss weight z, lse_i = logsumexp(x_i)):

    loss_i = (1 - eps) * (lse_i - x_i[t_i]) + eps * (lse_i - mean_j x_i[j]) + z * lse_i**2
    dloss_i / dx_i[j] = softmax_j * (1 + 2 z lse_i) - eps / V - (1 - eps) * [j == t_i]

which is ``torch.nn.functional.cross_entropy(..., label_smoothing=eps)`` plus PaLM's z-loss (Chowdhery et al., 2022).
Rows whose target is ``ignore_index`` have loss 0 and gradient 0; ``reduction="mean"`` divides by the number of the
other rows (NaN when there are none, as torch does). A target outside ``[0, V)`` that is not ``ignore_index`` gives
a NaN loss on CUDA (checking it on the host would synchronise) and a ValueError on CPU.

The row kernel :func:`_ce_fwd_kernel` can also write the gradient in place of the logits (``RETURN_GRAD``); the
fused linear cross-entropy uses that to free each chunk of logits as soon as it is consumed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .runtime import check_device, next_power_of_2, register_kernel

__all__ = ["cross_entropy"]

_REDUCTIONS = ("mean", "sum", "none")
_MAX_BLOCK_V = 8192  # elements per block of a row; the interpreter is vectorised, so larger blocks are faster there


@triton.jit
def _ce_write_grad(
    X, G, t, lse, scale, n_cols, label_smoothing, z_loss,
    BLOCK_V: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_Z_LOSS: tl.constexpr,
):  # fmt: skip
    """Write ``scale * dloss/dx`` for one row: X points at the row's logits, G at its gradient (may equal X)."""
    coef = 1.0
    if HAS_Z_LOSS:
        coef = 1.0 + 2.0 * z_loss * lse
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        ok = cols < n_cols
        x = tl.load(X + cols, mask=ok, other=float("-inf")).to(tl.float32)
        g = tl.exp(x - lse) * coef
        if HAS_SMOOTHING:
            g = g - label_smoothing / n_cols
        g = tl.where(cols == t, g - (1.0 - label_smoothing), g)
        tl.store(G + cols, (g * scale).to(G.dtype.element_ty), mask=ok)


@triton.jit
def _ce_zero_row(G, n_cols, BLOCK_V: tl.constexpr):
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        tl.store(G + cols, tl.zeros([BLOCK_V], dtype=G.dtype.element_ty), mask=cols < n_cols)


@triton.jit
def _ce_fwd_kernel(
    X, stride_x, TARGET, LOSS, LSE, G, stride_g, SCALE, n_cols, ignore_index, label_smoothing, z_loss,
    BLOCK_V: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_Z_LOSS: tl.constexpr, RETURN_GRAD: tl.constexpr,
):  # fmt: skip
    """Per row: loss and log-sum-exp; with RETURN_GRAD also ``SCALE[0] * dloss/dx`` into G (G may alias X)."""
    row = tl.program_id(0).to(tl.int64)
    Xr = X + row * stride_x
    t = tl.load(TARGET + row).to(tl.int32)
    if t == ignore_index:
        tl.store(LOSS + row, 0.0)
        tl.store(LSE + row, 0.0)
        if RETURN_GRAD:
            _ce_zero_row(G + row * stride_g, n_cols, BLOCK_V)
        return
    m = float("-inf")
    s = 0.0
    sum_x = 0.0
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        ok = cols < n_cols
        x = tl.load(Xr + cols, mask=ok, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, 0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
        m = m_new
        if HAS_SMOOTHING:
            sum_x += tl.sum(tl.where(ok, x, 0.0), 0)
    lse = m + tl.log(s)
    bad = (t < 0) | (t >= n_cols)
    x_t = tl.load(Xr + tl.where(bad, 0, t)).to(tl.float32)
    loss = lse - x_t
    if HAS_SMOOTHING:
        loss = (1.0 - label_smoothing) * loss + label_smoothing * (lse - sum_x / n_cols)
    if HAS_Z_LOSS:
        loss += z_loss * lse * lse
    loss = tl.where(bad, float("nan"), loss)
    tl.store(LOSS + row, loss)
    tl.store(LSE + row, lse)
    if RETURN_GRAD:
        scale = tl.load(SCALE)
        scale = tl.where(bad, float("nan"), scale)
        _ce_write_grad(Xr, G + row * stride_g, t, lse, scale, n_cols, label_smoothing, z_loss,
                       BLOCK_V, HAS_SMOOTHING, HAS_Z_LOSS)  # fmt: skip


register_kernel(_ce_fwd_kernel)


@triton.jit
def _ce_bwd_kernel(
    X, stride_x, TARGET, LSE, G, stride_g, SCALE, stride_scale, n_cols, ignore_index, label_smoothing, z_loss,
    BLOCK_V: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_Z_LOSS: tl.constexpr,
):  # fmt: skip
    """Per row: ``SCALE[row * stride_scale] * dloss/dx`` into G from the saved log-sum-exp."""
    row = tl.program_id(0).to(tl.int64)
    t = tl.load(TARGET + row).to(tl.int32)
    if t == ignore_index:
        _ce_zero_row(G + row * stride_g, n_cols, BLOCK_V)
        return
    lse = tl.load(LSE + row)
    scale = tl.load(SCALE + row * stride_scale).to(tl.float32)
    scale = tl.where((t < 0) | (t >= n_cols), float("nan"), scale)
    _ce_write_grad(X + row * stride_x, G + row * stride_g, t, lse, scale, n_cols, label_smoothing, z_loss,
                   BLOCK_V, HAS_SMOOTHING, HAS_Z_LOSS)  # fmt: skip


def block_v(n_cols: int) -> int:
    """Columns per block for a row of ``n_cols`` logits."""
    return min(_MAX_BLOCK_V, max(16, next_power_of_2(n_cols)))


def ce_launch_warps(bv: int) -> int:
    return 4 if bv <= 2048 else (8 if bv <= 4096 else 16)


def ce_forward_rows(
    logits: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    grad_out: torch.Tensor | None = None,
    grad_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the row kernel: per-row fp32 loss and log-sum-exp of ``logits`` (N, V). With ``grad_out`` (N, V, may be
    ``logits`` itself) also write ``grad_scale`` (a one-element fp32 tensor) times the gradient into it."""
    n, v = logits.shape
    loss = torch.empty(n, dtype=torch.float32, device=logits.device)
    lse = torch.empty(n, dtype=torch.float32, device=logits.device)
    if n == 0:
        return loss, lse
    bv = block_v(v)
    g = grad_out if grad_out is not None else logits
    scale = grad_scale if grad_scale is not None else loss
    _ce_fwd_kernel[(n,)](
        logits, logits.stride(0), target, loss, lse, g, g.stride(0), scale, v, ignore_index,
        float(label_smoothing), float(z_loss),
        BLOCK_V=bv, HAS_SMOOTHING=label_smoothing > 0, HAS_Z_LOSS=z_loss != 0, RETURN_GRAD=grad_out is not None,
        num_warps=ce_launch_warps(bv),
    )  # fmt: skip
    return loss, lse


def ce_backward_rows(
    logits: torch.Tensor,
    target: torch.Tensor,
    lse: torch.Tensor,
    scale: torch.Tensor,
    grad_out: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
) -> None:
    """Write ``scale[i] * dloss_i/dlogits_i`` into ``grad_out`` (N, V); ``scale`` has N or 1 element(s)."""
    n, v = logits.shape
    if n == 0:
        return
    bv = block_v(v)
    stride_scale = 1 if scale.numel() == n and n > 1 else 0
    _ce_bwd_kernel[(n,)](
        logits, logits.stride(0), target, lse, grad_out, grad_out.stride(0), scale, stride_scale, v, ignore_index,
        float(label_smoothing), float(z_loss),
        BLOCK_V=bv, HAS_SMOOTHING=label_smoothing > 0, HAS_Z_LOSS=z_loss != 0, num_warps=ce_launch_warps(bv),
    )  # fmt: skip


def check_loss_args(
    name: str, n_rows: int, n_cols: int, target: torch.Tensor, ignore_index: int, reduction: str,
    label_smoothing: float, z_loss: float, device: torch.device,
) -> None:  # fmt: skip
    """Argument checks shared by both cross-entropy entry points (messages say what was expected)."""
    if not isinstance(target, torch.Tensor) or target.dim() != 1 or target.shape[0] != n_rows:
        got = tuple(target.shape) if isinstance(target, torch.Tensor) else type(target).__name__
        raise ValueError(f"igpt.kernels.{name}: target must have shape ({n_rows},), got {got}")
    if target.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"igpt.kernels.{name}: target must be int64 or int32, got {target.dtype}")
    if target.device != device:
        raise ValueError(f"igpt.kernels.{name}: target is on {target.device} but the logits' inputs are on {device}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"igpt.kernels.{name}: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"igpt.kernels.{name}: label_smoothing must be in [0, 1], got {label_smoothing}")
    if z_loss < 0.0:
        raise ValueError(f"igpt.kernels.{name}: z_loss must be >= 0, got {z_loss}")
    if n_cols < 1:
        raise ValueError(f"igpt.kernels.{name}: need at least one class, got {n_cols}")
    if device.type == "cpu" and n_rows:  # cheap on CPU; on CUDA it would synchronise, so bad targets give NaN there
        bad = (target != ignore_index) & ((target < 0) | (target >= n_cols))
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"igpt.kernels.{name}: target[{i}] = {int(target[i])} is outside [0, {n_cols}) and is not "
                             f"ignore_index ({ignore_index})")  # fmt: skip


def reduce_loss(per_row: torch.Tensor, valid_count: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return per_row
    total = per_row.sum()
    return total / valid_count if reduction == "mean" else total


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, ignore_index, reduction, label_smoothing, z_loss):  # noqa: ANN001, ANN205
        per_row, lse = ce_forward_rows(logits, target, ignore_index, label_smoothing, z_loss)
        valid = (target != ignore_index).sum().to(torch.float32)
        ctx.save_for_backward(logits, target, lse, valid)
        ctx.args = (ignore_index, reduction, label_smoothing, z_loss)
        return reduce_loss(per_row, valid, reduction)

    @staticmethod
    def backward(ctx, grad_loss):  # noqa: ANN001, ANN205
        logits, target, lse, valid = ctx.saved_tensors
        ignore_index, reduction, label_smoothing, z_loss = ctx.args
        scale = grad_loss.to(torch.float32)
        if reduction == "mean":
            scale = scale / valid
        scale = scale.contiguous().reshape(-1)  # (N,) for reduction="none", (1,) otherwise
        grad = torch.empty_like(logits)
        ce_backward_rows(logits, target, lse, scale, grad, ignore_index, label_smoothing, z_loss)
        return grad, None, None, None, None, None


def cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
) -> torch.Tensor:
    """Cross-entropy of ``logits`` (N, V) against class indices ``target`` (N,), computed in fp32.

    Args:
        logits: ``(N, V)`` fp32, fp16 or bf16 (rows may be strided; the class axis must be contiguous).
        target: ``(N,)`` int64 or int32 class indices; ``ignore_index`` marks rows without loss.
        reduction: ``"mean"`` (over non-ignored rows), ``"sum"``, or ``"none"`` (``(N,)``, 0 at ignored rows).
        label_smoothing: in [0, 1], as in ``torch.nn.functional.cross_entropy``.
        z_loss: weight of ``logsumexp(logits)**2`` added per non-ignored row.

    Returns:
        The loss in float32 (a scalar, or ``(N,)`` for ``reduction="none"``); differentiable in ``logits``
        (the gradient has the dtype of ``logits``).
    """
    name = "cross_entropy"
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"igpt.kernels.{name}: logits must have shape (N, V), got {got}")
    if logits.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"igpt.kernels.{name}: logits must be float16, bfloat16 or float32, got {logits.dtype}")
    check_loss_args(name, logits.shape[0], logits.shape[1], target, ignore_index, reduction, label_smoothing, z_loss,
                    logits.device)  # fmt: skip
    check_device(name, _ce_fwd_kernel, logits, target)
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    return _CrossEntropy.apply(logits, target.contiguous(), int(ignore_index), reduction, float(label_smoothing),
                               float(z_loss))  # fmt: skip
