"""Tests for igpt.kernels.flash_attn_func / flash_attn_varlen_func against the float64 torch reference.

Without CUDA the kernels run under the Triton CPU interpreter (TRITON_INTERPRET=1 is set below, before triton is
imported); on a CUDA machine the same tests run compiled. Tolerance follows flash-attention's rule: the kernel's
largest error against the float64 reference may be at most twice that of torch's own computation in the input dtype
(plus a small floor, FLOOR * max(1, max |reference|), which matters for fp32 where both errors are ~1e-7
 and for gradients that are exactly 0 in the reference).
Shapes are small because the interpreter is slow; ``@pytest.mark.slow`` marks the larger matrix.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib  # noqa: E402

import pytest  # noqa: E402

from igpt.kernels import KernelUnavailableError, flash_attn_func, flash_attn_varlen_func, triton_available  # noqa: E402
from igpt.kernels.reference import attention_ref, attention_varlen_ref  # noqa: E402

runtime = importlib.import_module("igpt.kernels.runtime")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Floor on the allowed error, relative to max |reference|; fp32 products in the kernel are exact fp32 ("ieee").
FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 4e-3}


def _inputs(shape_q, shape_kv, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(shape_q, generator=g).to(DEVICE, dtype)
    k = torch.randn(shape_kv, generator=g).to(DEVICE, dtype)
    v = torch.randn(shape_kv, generator=g).to(DEVICE, dtype)
    do = torch.randn(shape_q, generator=g).to(DEVICE, dtype)
    return q, k, v, do


def _grads(fn, q, k, v, do):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), do)
    return out, dq, dk, dv


def _check_flash_rule(ours, ref_hp, ref_lp, dtype, what):
    """max|ours - ref_hp| <= 2 * max|ref_lp - ref_hp| + FLOOR * max|ref_hp| for each of (out, dq, dk, dv)."""
    names = ("out", "dq", "dk", "dv")
    for name, a, hp, lp in zip(names, ours, ref_hp, ref_lp):
        assert a.dtype == dtype and a.shape == hp.shape, f"{what} {name}: got {a.dtype} {tuple(a.shape)}"
        assert torch.isfinite(a).all(), f"{what} {name}: non-finite values"
        err = (a.double() - hp).abs().max().item()
        base = (lp.double() - hp).abs().max().item()
        floor = FLOOR[dtype] * max(hp.abs().max().item(), 1.0)
        assert err <= 2 * base + floor, f"{what} {name}: error {err:.3e} > 2 * torch's {base:.3e} + {floor:.3e}"


def _compare(fn_ours, fn_ref, q, k, v, do, what):
    ours = _grads(fn_ours, q, k, v, do)
    hp = _grads(lambda a, b, c: fn_ref(a, b, c, True), *(t.double() for t in (q, k, v, do)))
    lp = _grads(lambda a, b, c: fn_ref(a, b, c, False), q, k, v, do) if q.dtype != torch.float32 else None
    if lp is None:  # fp32: torch's "own" computation is the float32 reference
        lp = _grads(lambda a, b, c: fn_ref(a, b, c, False), q, k, v, do)
    _check_flash_rule(ours, hp, lp, q.dtype, what)


# (batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim, causal, dtype): odd lengths, GQA 1/2/4, every dtype.
BATCHED = [
    (2, 17, 17, 2, 2, 32, True, torch.float32),
    (1, 113, 113, 4, 1, 64, False, torch.float32),
    (1, 203, 203, 4, 2, 32, True, torch.float32),
    (2, 1, 1, 4, 4, 32, True, torch.float32),
    (1, 65, 65, 4, 1, 128, True, torch.float32),
    (1, 50, 50, 2, 1, 48, True, torch.float32),  # head dim that is not a power of two
    (1, 40, 70, 2, 1, 32, True, torch.float32),  # Sq < Sk: bottom-right causal alignment
    (1, 70, 40, 2, 2, 16, True, torch.float32),  # Sq > Sk: the first 30 query rows see no key
    (1, 1, 37, 4, 2, 64, True, torch.float32),  # one decoding step against a longer key sequence
    (1, 113, 113, 4, 2, 64, True, torch.float16),
    (1, 113, 113, 4, 1, 64, False, torch.bfloat16),
    (2, 33, 33, 2, 1, 32, True, torch.bfloat16),
]


@pytest.mark.parametrize("b,sq,sk,hq,hkv,d,causal,dtype", BATCHED)
def test_flash_attn_func_matches_reference(b, sq, sk, hq, hkv, d, causal, dtype):
    q, k, v, do = _inputs((b, sq, hq, d), (b, sk, hkv, d), dtype)
    _compare(
        lambda a, b_, c: flash_attn_func(a, b_, c, causal=causal),
        lambda a, b_, c, up: attention_ref(a, b_, c, causal=causal, upcast=up),
        q, k, v, do, f"B={b} Sq={sq} Sk={sk} Hq={hq} Hkv={hkv} D={d} causal={causal} {dtype}",
    )  # fmt: skip


def test_flash_attn_func_strided_inputs_and_scale():
    """q, k, v as non-contiguous views of one packed (B, S, 3, H, D) projection, and a custom softmax scale."""
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(2, 29, 3, 2, 32, generator=g).to(DEVICE)  # (B, S, 3, H, D)
    q, k, v = qkv.unbind(dim=2)  # each (B, S, H, D), strided
    do = torch.randn(2, 29, 2, 32, generator=g).to(DEVICE)
    assert not q.is_contiguous()
    _compare(
        lambda a, b, c: flash_attn_func(a, b, c, causal=True, softmax_scale=0.3),
        lambda a, b, c, up: attention_ref(a, b, c, causal=True, softmax_scale=0.3, upcast=up),
        q, k, v, do, "strided",
    )  # fmt: skip


VARLEN = [
    ([1, 17, 40, 0, 5, 64], True, 4, 2, 32, torch.float32),
    ([33, 7, 51], False, 2, 2, 64, torch.float32),
    ([20, 45, 3], True, 4, 1, 32, torch.bfloat16),
]


@pytest.mark.parametrize("lengths,causal,hq,hkv,d,dtype", VARLEN)
def test_flash_attn_varlen_matches_reference(lengths, causal, hq, hkv, d, dtype):
    cu = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0).to(torch.int32).to(DEVICE)
    total = int(cu[-1])
    q, k, v, do = _inputs((total, hq, d), (total, hkv, d), dtype, seed=len(lengths))
    m = max(lengths)
    _compare(
        lambda a, b, c: flash_attn_varlen_func(a, b, c, cu, cu, m, m, causal=causal),
        lambda a, b, c, up: attention_varlen_ref(a, b, c, cu, cu, causal=causal, upcast=up),
        q, k, v, do, f"varlen {lengths} causal={causal} Hq={hq} Hkv={hkv} D={d} {dtype}",
    )  # fmt: skip


def test_flash_attn_varlen_documents_are_isolated():
    """Changing one document's keys/values changes no other document's output or gradients (and the packed result
    equals running each document through flash_attn_func alone)."""
    lengths = [13, 30, 9]
    cu = torch.tensor([0, 13, 43, 52], dtype=torch.int32, device=DEVICE)
    q, k, v, do = _inputs((52, 2, 32), (52, 1, 32), torch.float32, seed=3)
    out, dq, dk, dv = _grads(lambda a, b, c: flash_attn_varlen_func(a, b, c, cu, cu, 30, 30, causal=True), q, k, v, do)
    k2, v2 = k.clone(), v.clone()
    k2[13:43] += 1.0
    v2[13:43] -= 2.0
    out2, dq2, dk2, _ = _grads(lambda a, b, c: flash_attn_varlen_func(a, b, c, cu, cu, 30, 30, causal=True),
                               q, k2, v2, do)  # fmt: skip
    for lo, hi in ((0, 13), (43, 52)):
        torch.testing.assert_close(out2[lo:hi], out[lo:hi], rtol=0, atol=0)
        torch.testing.assert_close(dq2[lo:hi], dq[lo:hi], rtol=0, atol=0)
        torch.testing.assert_close(dk2[lo:hi], dk[lo:hi], rtol=0, atol=0)
    assert (out2[13:43] - out[13:43]).abs().max() > 0.1
    start = 0
    for n in lengths:
        single = flash_attn_func(q[None, start : start + n], k[None, start : start + n], v[None, start : start + n],
                                 causal=True)  # fmt: skip
        torch.testing.assert_close(single[0], out[start : start + n], rtol=1e-5, atol=1e-6)
        start += n


def test_flash_attn_varlen_different_q_and_k_lengths():
    """Per-document Sq != Sk (e.g. a chunked prefill), causal bottom-right aligned inside each document."""
    cu_q = torch.tensor([0, 5, 5, 21], dtype=torch.int32, device=DEVICE)  # lengths 5, 0, 16
    cu_k = torch.tensor([0, 12, 19, 40], dtype=torch.int32, device=DEVICE)  # lengths 12, 7, 21
    q, _, _, do = _inputs((21, 2, 32), (1, 1, 1), torch.float32, seed=4)
    _, k, v, _ = _inputs((1, 1, 1), (40, 2, 32), torch.float32, seed=5)
    _compare(
        lambda a, b, c: flash_attn_varlen_func(a, b, c, cu_q, cu_k, 16, 21, causal=True),
        lambda a, b, c, up: attention_varlen_ref(a, b, c, cu_q, cu_k, causal=True, upcast=up),
        q, k, v, do, "varlen Sq != Sk",
    )  # fmt: skip


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(q=(1, 8, 3, 32), k=(1, 8, 2, 32)), "multiple of the number of key/value heads"),
        (dict(q=(1, 8, 2, 8), k=(1, 8, 2, 8)), "head dim must be in 16..256"),
        (dict(q=(1, 8, 2, 512), k=(1, 8, 2, 512)), "head dim must be in 16..256"),
        (dict(q=(8, 2, 32), k=(8, 2, 32)), r"\(batch, seqlen, heads, head_dim\)"),
        (dict(q=(1, 8, 2, 32), k=(1, 8, 2, 64)), "share the head dim"),
    ],
)
def test_flash_attn_func_argument_errors(kwargs, match):
    q = torch.zeros(kwargs["q"], device=DEVICE)
    k = torch.zeros(kwargs["k"], device=DEVICE)
    with pytest.raises(ValueError, match=match):
        flash_attn_func(q, k, k.clone())


def test_flash_attn_argument_errors_dtype_and_cu_seqlens():
    q = torch.zeros(1, 8, 2, 32, device=DEVICE)
    with pytest.raises(TypeError, match="share one dtype"):
        flash_attn_func(q, q.half(), q.half())
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        flash_attn_func(q.double(), q.double(), q.double())
    qv = torch.zeros(8, 2, 32, device=DEVICE)
    cu64 = torch.tensor([0, 8], device=DEVICE)
    with pytest.raises(ValueError, match="1-D int32 tensor"):
        flash_attn_varlen_func(qv, qv, qv, cu64, cu64, 8, 8)
    cu = cu64.to(torch.int32)
    with pytest.raises(ValueError, match="same number of documents"):
        flash_attn_varlen_func(qv, qv, qv, cu, torch.tensor([0, 4, 8], dtype=torch.int32, device=DEVICE), 8, 8)


def test_triton_available_reports_reason(monkeypatch):
    assert triton_available() == (True, "")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    ok, reason = triton_available()
    assert not ok and "TRITON_INTERPRET" in reason and "CUDA" in reason
    q = torch.zeros(1, 4, 2, 32)
    with pytest.raises(KernelUnavailableError, match="TRITON_INTERPRET"):
        flash_attn_func(q, q, q)
    assert issubclass(KernelUnavailableError, RuntimeError)
    # TRITON_INTERPRET=1 set only after the kernels were built for CUDA: not available, and says why.
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(runtime, "_KERNELS", [object()])
    ok, reason = triton_available()
    assert not ok and "before the first import" in reason


SLOW = [
    (2, 203, 203, 8, 2, 128, True, torch.float16),
    (2, 203, 203, 8, 8, 64, False, torch.bfloat16),
    (1, 161, 161, 4, 1, 256, True, torch.float32),
    (3, 97, 131, 4, 4, 80, False, torch.float32),
    (1, 257, 257, 4, 2, 64, True, torch.bfloat16),
]


@pytest.mark.slow
@pytest.mark.parametrize("b,sq,sk,hq,hkv,d,causal,dtype", SLOW)
def test_flash_attn_func_larger_matrix(b, sq, sk, hq, hkv, d, causal, dtype):
    test_flash_attn_func_matches_reference(b, sq, sk, hq, hkv, d, causal, dtype)
