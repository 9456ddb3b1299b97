"""Tests for igpt.kernels.cross_entropy and fused_linear_cross_entropy against the float64 torch reference.

The reference is ``torch.nn.functional.cross_entropy`` (ignore_index, label_smoothing) plus the z-loss term, see
``kernels/reference.py``. Every reduction, option and dtype is checked for the loss and the gradient of every input,
with odd sizes, ignored rows, several vocabulary blocks per row and several token chunks (with a ragged last one).
Without CUDA the kernels run under the Triton CPU interpreter (TRITON_INTERPRET=1 set before triton is imported).
"""

import importlib
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from igpt.kernels import cross_entropy, fused_linear_cross_entropy  # noqa: E402
from igpt.kernels.fused_linear_cross_entropy import default_chunk_size  # noqa: E402
from igpt.kernels.reference import cross_entropy_ref, linear_cross_entropy_ref  # noqa: E402

# The package re-exports the function under the module's name, so fetch the module itself.
ce_module = importlib.import_module("igpt.kernels.cross_entropy")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Allowed max error relative to max(1, max |reference|): fp32 is exact up to summation order; the low-precision
# gradients are rounded once to their dtype (the interpreter truncates instead of rounding, hence bf16's margin).
RTOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# The loss outputs are fp32 and are held to their own precision, not to the gradients' (errors measured here against
# the float64 reference, relative to max(1, |loss|)): cross_entropy reads the given logits and stays within 1.4e-7 in
# every dtype; the fused kernel computes the logits itself in the input dtype, which bounds it: fp32 9e-8, fp16 2.6e-4,
# bf16 8.3e-4 (the interpreter's truncating bf16 casts). Each tolerance is 2.5x to 10x the largest error measured.
CE_LOSS_RTOL = 1e-6
FUSED_LOSS_RTOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 2e-3}
OPTIONS = [(0.0, 0.0), (0.1, 0.0), (0.0, 1e-2), (0.2, 1e-3)]  # (label_smoothing, z_loss)


def _close(got, ref, dtype, what, rtol=None):
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    err = (got.double() - ref.double()).abs().max().item()
    tol = (RTOL[dtype] if rtol is None else rtol) * max(1.0, ref.abs().max().item())
    assert err <= tol, f"{what}: max error {err:.3e} > {tol:.3e}"


def _targets(n, v, seed, n_ignored=None):
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, v, (n,), generator=g)
    t[torch.randperm(n, generator=g)[: n // 4 if n_ignored is None else n_ignored]] = -100
    return t.to(DEVICE)


def _grad_weights(loss, seed):
    """Random incoming gradient for reduction="none" (so each row's scale is exercised), 1 otherwise."""
    if loss.dim() == 0:
        return torch.ones_like(loss)
    return torch.randn(loss.shape, generator=torch.Generator().manual_seed(seed)).to(loss.device)


# Every option and reduction in fp32; the low-precision dtypes with plain and all-options settings.
CE_CASES = [(torch.float32, red, eps, z) for red in ("mean", "sum", "none") for eps, z in OPTIONS] + [
    (dtype, red, eps, z)
    for dtype in (torch.float16, torch.bfloat16)
    for red in ("mean", "sum", "none")
    for eps, z in (OPTIONS[0], OPTIONS[3])
]


@pytest.mark.parametrize("dtype,reduction,label_smoothing,z_loss", CE_CASES)
def test_cross_entropy_matches_reference(dtype, reduction, label_smoothing, z_loss, monkeypatch):
    monkeypatch.setattr(ce_module, "_MAX_BLOCK_V", 256)  # V = 1000 spans four blocks per row
    n, v = 29, 1000
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(n, v, generator=g)).to(DEVICE, dtype).requires_grad_()
    target = _targets(n, v, seed=1)
    kw = dict(reduction=reduction, label_smoothing=label_smoothing, z_loss=z_loss)
    loss = cross_entropy(logits, target, **kw)
    assert loss.dtype == torch.float32 and loss.shape == (() if reduction != "none" else (n,))
    go = _grad_weights(loss, 2)
    (grad,) = torch.autograd.grad(loss, logits, go)
    assert grad.dtype == dtype
    ref_logits = logits.detach().double().requires_grad_()
    ref = cross_entropy_ref(ref_logits, target, **kw)
    (ref_grad,) = torch.autograd.grad(ref, ref_logits, go.double())
    what = f"cross_entropy {dtype} {reduction} eps={label_smoothing} z={z_loss}"
    _close(loss, ref, dtype, what + " loss", rtol=CE_LOSS_RTOL)
    _close(grad, ref_grad, dtype, what + " grad")
    if reduction == "none":
        assert (loss[target == -100] == 0).all() and (grad[target == -100] == 0).all()


def test_cross_entropy_matches_torch_functional_directly():
    """Plain torch.nn.functional.cross_entropy on fp32 logits (no z-loss), including strided logits rows."""
    g = torch.Generator().manual_seed(3)
    big = torch.randn(29, 517, generator=g).to(DEVICE)
    logits = big[:, :509]  # (29, 509) with row stride 517
    target = _targets(29, 509, seed=4)
    for reduction in ("mean", "sum", "none"):
        ours = cross_entropy(logits, target, reduction=reduction, label_smoothing=0.05)
        ref = torch.nn.functional.cross_entropy(logits, target, reduction=reduction, label_smoothing=0.05)
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_cross_entropy_all_ignored_and_bad_target():
    logits = torch.randn(5, 33, device=DEVICE, requires_grad=True)
    target = torch.full((5,), -100, device=DEVICE)
    assert torch.isnan(cross_entropy(logits, target))  # mean over zero tokens, as torch
    total = cross_entropy(logits, target, reduction="sum")
    assert total.item() == 0.0
    total.backward()
    assert (logits.grad == 0).all()
    assert cross_entropy(logits, torch.full((5,), 7, device=DEVICE), ignore_index=7, reduction="sum").item() == 0.0
    if DEVICE == "cpu":
        with pytest.raises(ValueError, match=r"target\[2\] = 33 is outside \[0, 33\)"):
            cross_entropy(logits, torch.tensor([0, 1, 33, 2, 3]))


def test_cross_entropy_argument_errors():
    logits = torch.randn(4, 10, device=DEVICE)
    t = torch.zeros(4, dtype=torch.long, device=DEVICE)
    with pytest.raises(ValueError, match=r"shape \(N, V\)"):
        cross_entropy(logits[None], t)
    with pytest.raises(ValueError, match=r"target must have shape \(4,\)"):
        cross_entropy(logits, t[:3])
    with pytest.raises(TypeError, match="int64 or int32"):
        cross_entropy(logits, t.float())
    with pytest.raises(ValueError, match="reduction must be one of"):
        cross_entropy(logits, t, reduction="avg")
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 1\]"):
        cross_entropy(logits, t, label_smoothing=1.5)
    with pytest.raises(ValueError, match="z_loss must be >= 0"):
        cross_entropy(logits, t, z_loss=-1.0)


# (dtype, reduction, label_smoothing, z_loss, has_bias, chunk_size): N = 45 tokens, so chunks of 16 leave 13.
FUSED = [
    (torch.float32, "mean", 0.0, 0.0, False, 16),
    (torch.float32, "sum", 0.1, 1e-2, True, 16),
    (torch.float32, "none", 0.2, 1e-3, True, 16),
    (torch.float32, "none", 0.0, 0.0, False, 64),
    (torch.float32, "mean", 0.1, 1e-3, True, None),
    (torch.bfloat16, "mean", 0.1, 1e-3, True, 16),
    (torch.bfloat16, "none", 0.0, 1e-2, False, 16),
    (torch.float16, "sum", 0.0, 0.0, True, 32),
    (torch.float16, "none", 0.1, 0.0, True, 16),
]


@pytest.mark.parametrize("dtype,reduction,label_smoothing,z_loss,has_bias,chunk_size", FUSED)
def test_fused_linear_cross_entropy_matches_reference(dtype, reduction, label_smoothing, z_loss, has_bias, chunk_size):
    n, h, v = 45, 40, 300
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(n, h, generator=g).to(DEVICE, dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g) / h**0.5 * 2).to(DEVICE, dtype).requires_grad_()
    bias = torch.randn(v, generator=g).to(DEVICE, dtype).requires_grad_() if has_bias else None
    target = _targets(n, v, seed=6)
    kw = dict(reduction=reduction, label_smoothing=label_smoothing, z_loss=z_loss)
    loss = fused_linear_cross_entropy(hidden, weight, target, bias, chunk_size=chunk_size, **kw)
    assert loss.dtype == torch.float32
    go = _grad_weights(loss, 7)
    inputs = (hidden, weight) + ((bias,) if has_bias else ())
    grads = torch.autograd.grad(loss, inputs, go)
    ref_inputs = [t.detach().double().requires_grad_() for t in inputs]
    ref = linear_cross_entropy_ref(ref_inputs[0], ref_inputs[1], target, ref_inputs[2] if has_bias else None, **kw)
    ref_grads = torch.autograd.grad(ref, ref_inputs, go.double())
    what = f"fused {dtype} {reduction} eps={label_smoothing} z={z_loss} bias={has_bias} chunk={chunk_size}"
    _close(loss, ref, dtype, what + " loss", rtol=FUSED_LOSS_RTOL[dtype])
    for name, got, want, inp in zip(("hidden", "weight", "bias"), grads, ref_grads, inputs):
        assert got.dtype == inp.dtype and got.shape == inp.shape, f"{what} grad {name}: {got.dtype} {got.shape}"
        _close(got, want, dtype, f"{what} grad {name}")


def test_fused_equals_unfused_kernel_and_partial_grads():
    """Same numbers as cross_entropy(hidden @ W^T); frozen weight (only hidden needs a gradient); no-grad forward."""
    g = torch.Generator().manual_seed(8)
    hidden = torch.randn(33, 24, generator=g).to(DEVICE).requires_grad_()
    weight = torch.randn(100, 24, generator=g).to(DEVICE)  # frozen
    target = _targets(33, 100, seed=9)
    for reduction in ("sum", "none"):
        fused = fused_linear_cross_entropy(hidden, weight, target, reduction=reduction, z_loss=1e-3, chunk_size=8)
        unfused = cross_entropy(hidden @ weight.t(), target, reduction=reduction, z_loss=1e-3)
        torch.testing.assert_close(fused, unfused, rtol=1e-5, atol=1e-5)
        (g_fused,) = torch.autograd.grad(fused.sum(), hidden)
        (g_unfused,) = torch.autograd.grad(unfused.sum(), hidden)
        torch.testing.assert_close(g_fused, g_unfused, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        loss = fused_linear_cross_entropy(hidden, weight, target)
    torch.testing.assert_close(loss, linear_cross_entropy_ref(hidden.detach(), weight, target), rtol=1e-5, atol=1e-5)


def test_fused_retain_graph_second_backward_is_an_error():
    hidden = torch.randn(8, 16, device=DEVICE, requires_grad=True)
    weight = torch.randn(32, 16, device=DEVICE, requires_grad=True)
    loss = fused_linear_cross_entropy(hidden, weight, torch.arange(8, device=DEVICE))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward was called twice"):
        loss.backward()


@pytest.mark.skipif(DEVICE != "cpu", reason="CPU autocast case; CUDA autocast is covered by bench/kernel_speed.py")
def test_fused_under_autocast_casts_like_linear():
    g = torch.Generator().manual_seed(10)
    hidden = torch.randn(20, 32, generator=g, requires_grad=True)
    weight = torch.randn(64, 32, generator=g, requires_grad=True)  # fp32 master weight
    target = _targets(20, 64, seed=11)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fused_linear_cross_entropy(hidden, weight, target)
        ref = linear_cross_entropy_ref(hidden, weight, target)  # F.linear runs in bf16 under autocast
    torch.testing.assert_close(loss, ref.float(), rtol=2e-3, atol=2e-3)
    loss.backward()
    assert weight.grad.dtype == torch.float32 and hidden.grad.dtype == torch.float32


def test_fused_argument_errors_and_chunk_policy():
    h = torch.randn(4, 8, device=DEVICE)
    w = torch.randn(10, 8, device=DEVICE)
    t = torch.zeros(4, dtype=torch.long, device=DEVICE)
    with pytest.raises(ValueError, match=r"weight must be \(V, 8\)"):
        fused_linear_cross_entropy(h, w[:, :6], t)
    with pytest.raises(TypeError, match="share one dtype"):
        fused_linear_cross_entropy(h, w.half(), t)
    with pytest.raises(ValueError, match=r"bias must have shape \(10,\)"):
        fused_linear_cross_entropy(h, w, t, bias=torch.zeros(9, device=DEVICE))
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        fused_linear_cross_entropy(h, w, t, chunk_size=0)
    assert default_chunk_size(16384, 4096, 131072) == 1024  # a logits chunk ~2x the hidden states
    assert default_chunk_size(16384, 4096, 32768) == 4096
    assert default_chunk_size(100, 64, 50000) == 100  # never more than N, at least 256 rows otherwise


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_linear_cross_entropy_larger(dtype):
    n, h, v = 300, 96, 5000
    g = torch.Generator().manual_seed(12)
    hidden = torch.randn(n, h, generator=g).to(DEVICE, dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g) / h**0.5).to(DEVICE, dtype).requires_grad_()
    target = _targets(n, v, seed=13)
    loss = fused_linear_cross_entropy(hidden, weight, target, label_smoothing=0.1, z_loss=1e-4, chunk_size=64)
    gh, gw = torch.autograd.grad(loss, (hidden, weight))
    ref_in = [t.detach().double().requires_grad_() for t in (hidden, weight)]
    ref = linear_cross_entropy_ref(*ref_in, target, label_smoothing=0.1, z_loss=1e-4)
    rh, rw = torch.autograd.grad(ref, ref_in)
    _close(loss, ref, dtype, "loss", rtol=FUSED_LOSS_RTOL[dtype])
    _close(gh, rh, dtype, "grad hidden")
    _close(gw, rw, dtype, "grad weight")
