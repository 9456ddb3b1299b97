"""The attention entry point: one call, three backends, document masking for packed rows.

``attention(q, k, v, info, backend)`` takes q ``(B, S, Hq, D)`` and k, v ``(B, S, Hkv, D)`` (grouped-query attention
when ``Hkv < Hq``) and returns ``(B, S, Hq, D)``. ``info`` says which tokens may attend to which:

- ``None``: plain causal attention over the whole row;
- a ``position_ids`` tensor ``(B, S)``: causal attention inside each document, doc id = ``cumsum(position_ids == 0)``
  along the row (docs/internals.md "Batches");
- an :class:`AttentionInfo` built once per forward by :func:`attention_info` (what the model passes, so the mask or
  the ``cu_seqlens`` are not rebuilt in every layer).

Backends, following nanochat's flash-attn-shaped entry point and torchtitan's config-chosen attention:

- ``sdpa``: :func:`torch.nn.functional.scaled_dot_product_attention`; ``is_causal=True`` without document boundaries,
  else a ``(B, 1, S, S)`` boolean mask (causal and same document). Runs everywhere.
- ``flash``: flash-attn 2's ``flash_attn_func`` / ``flash_attn_varlen_func`` (CUDA only, imported lazily).
- ``triton``: igpt's own kernels ``igpt.kernels.flash_attn_func`` / ``flash_attn_varlen_func`` (same call forms).

The varlen backends see the packed batch as ``B * S`` tokens cut at every document start and every row start, with
``cu_seqlens`` the int32 offsets of those cuts (the flash-attn varlen convention).

:func:`resolve_attention_backend` checks that the requested backend can run on the device and falls back to ``sdpa``
with a warning saying why (or raises with ``strict=True``); it logs which backend runs on ``logging.getLogger("igpt")``.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

log = logging.getLogger("igpt")

BACKENDS = ("sdpa", "flash", "triton")


@dataclass
class AttentionInfo:
    """Which tokens attend to which, precomputed once per forward pass.

    Exactly one form is set: ``causal_only`` (no document boundaries inside any row), ``mask`` for sdpa (``(B, 1, Sq,
    Sk)`` bool, True = may attend) or ``cu_seqlens`` / ``max_seqlen`` for the varlen backends.
    """

    causal_only: bool = True
    mask: torch.Tensor | None = None
    cu_seqlens: torch.Tensor | None = None
    max_seqlen: int = 0


def document_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """``(B, S)`` document index of every token: ``cumsum(position_ids == 0)`` along the row."""
    return torch.cumsum(position_ids == 0, dim=-1)


def attention_info(position_ids: torch.Tensor | None, backend: str) -> AttentionInfo:
    """Build the masking information ``backend`` needs for ``position_ids`` ``(B, S)`` (None: plain causal).

    A row holding a single document (its only ``position_ids == 0`` at column 0, or none at all) needs no mask, so an
    unpacked batch takes the ``is_causal`` fast path. Checking that costs one host-device sync per forward, not per
    layer.
    """
    if position_ids is None:
        return AttentionInfo(causal_only=True)
    if position_ids.dim() != 2:
        raise ValueError(f"position_ids must be (batch, seq_len), got shape {tuple(position_ids.shape)}")
    starts = position_ids == 0  # (B, S)
    if not bool(starts[:, 1:].any()):
        return AttentionInfo(causal_only=True)
    if backend == "sdpa":
        doc = document_ids(position_ids)  # (B, S)
        s = position_ids.shape[1]
        causal = torch.ones(s, s, dtype=torch.bool, device=position_ids.device).tril()  # (S, S)
        same_doc = doc[:, :, None] == doc[:, None, :]  # (B, S, S)
        return AttentionInfo(causal_only=False, mask=(same_doc & causal)[:, None])  # (B, 1, S, S)
    b, s = position_ids.shape
    starts = starts.clone()
    starts[:, 0] = True  # every row starts a sequence, whatever its first position id
    offsets = torch.nonzero(starts.reshape(-1), as_tuple=False).flatten()  # (n,) start of each packed sequence
    end = torch.tensor([b * s], device=offsets.device, dtype=offsets.dtype)
    cu_seqlens = torch.cat([offsets, end]).to(torch.int32)  # (n + 1,)
    max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max().item())
    return AttentionInfo(causal_only=False, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, S, D)
    gqa = q.shape[1] != k.shape[1]
    if gqa and mask is not None and q.is_cuda:
        # The memory-efficient CUDA kernel takes an arbitrary mask but not enable_gqa; repeating the kv heads keeps
        # masked attention off the slow math path.
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # (B, Hq, S, D)
        gqa = False
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=gqa)
    return out.transpose(1, 2)  # (B, S, Hq, D)


def _kernels(backend: str):
    if backend == "flash":
        import flash_attn

        return flash_attn
    from igpt import kernels

    return kernels


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    info: None | torch.Tensor | AttentionInfo = None,
    backend: str = "sdpa",
) -> torch.Tensor:
    """Causal (document-masked) attention: q ``(B, S, Hq, D)``, k, v ``(B, S, Hkv, D)`` -> ``(B, S, Hq, D)``.

    ``info`` is None (plain causal), the ``position_ids`` ``(B, S)`` or an :class:`AttentionInfo` from
    :func:`attention_info` built for the same backend. The softmax scale is ``1 / sqrt(D)``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"attention backend {backend!r} is not one of {', '.join(BACKENDS)}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads ({q.shape[2]}) must be a multiple of key/value heads ({k.shape[2]})")
    if not isinstance(info, AttentionInfo):
        info = attention_info(info, backend)
    if backend == "sdpa":
        if not info.causal_only and info.mask is None:
            raise ValueError("attention_info was built for a varlen backend but the sdpa backend needs a mask")
        return _sdpa(q, k, v, None if info.causal_only else info.mask)
    lib = _kernels(backend)
    if info.causal_only:
        return lib.flash_attn_func(q, k, v, causal=True)
    if info.cu_seqlens is None:
        raise ValueError(f"attention_info was built for sdpa but the {backend} backend needs cu_seqlens")
    b, s, hq, d = q.shape
    out = lib.flash_attn_varlen_func(
        q.reshape(b * s, hq, d),  # (B*S, Hq, D)
        k.reshape(b * s, k.shape[2], d),  # (B*S, Hkv, D)
        v.reshape(b * s, v.shape[2], d),
        info.cu_seqlens,
        info.cu_seqlens,
        info.max_seqlen,
        info.max_seqlen,
        causal=True,
    )
    return out.reshape(b, s, hq, d)  # (B, S, Hq, D)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Attention of new queries against a KV cache (sdpa): q ``(B, T, Hq, D)``, k, v ``(B, L, Hkv, D)``,
    ``mask`` ``(B, 1, T, L)`` bool (True = may attend) -> ``(B, T, Hq, D)``."""
    return _sdpa(q, k, v, mask)


def _flash_attn_status(device: torch.device, dtype: torch.dtype | None) -> tuple[bool, str]:
    if dtype is not None and dtype not in (torch.float16, torch.bfloat16):
        return False, f"flash-attn computes in fp16 or bf16 only and the model computes in {dtype} (use precision=bf16)"
    if device.type != "cuda":
        return False, f"flash-attn needs a CUDA device and the model runs on {device.type}"
    if importlib.util.find_spec("flash_attn") is None:
        return False, "flash-attn is not installed (pip install 'igpt[gpu]')"
    return True, ""


def _triton_status(device: torch.device, names: tuple[str, ...]) -> tuple[bool, str]:
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return (
            False,
            f"the Triton kernels need a CUDA device (or TRITON_INTERPRET=1) and the model runs on {device.type}",
        )
    try:
        from igpt import kernels
    except Exception as e:  # the kernels package failing to import must not stop training on sdpa
        return False, f"igpt.kernels failed to import ({type(e).__name__}: {e})"
    missing = [n for n in ("triton_available", *names) if not hasattr(kernels, n)]
    if missing:
        return False, f"igpt.kernels does not provide {', '.join(missing)}"
    ok, reason = kernels.triton_available()
    return bool(ok), str(reason)


def _resolve(kind: str, requested: str, fallback: str, status: tuple[bool, str], strict: bool) -> str:
    ok, reason = status
    if ok:
        log.info("%s backend: %s", kind, requested)
        return requested
    msg = f"{kind} backend {requested!r} cannot run: {reason}"
    if strict:
        raise RuntimeError(f"{msg} (kernels.strict=true; set kernels.strict=false to fall back to {fallback!r})")
    log.warning("%s; running the %r backend instead", msg, fallback)
    return fallback


def resolve_attention_backend(
    requested: str, device: str | torch.device, strict: bool = False, dtype: torch.dtype | None = None
) -> str:
    """Return the attention backend that will run on ``device``: ``requested`` when it can, else ``sdpa``.

    ``flash`` needs CUDA, flash-attn and (when ``dtype``, the compute dtype, is given) fp16 or bf16; ``triton`` needs
    ``igpt.kernels.triton_available()`` (CUDA, or CPU under ``TRITON_INTERPRET=1``). A fallback logs a warning naming
    the reason; ``strict=True`` raises ``RuntimeError`` instead.
    """
    if requested not in BACKENDS:
        raise ValueError(f"kernels.attention={requested!r} is not one of {', '.join(BACKENDS)}")
    device = torch.device(device)
    if requested == "sdpa":
        status = (True, "")
    elif requested == "flash":
        status = _flash_attn_status(device, dtype)
    else:
        status = _triton_status(device, ("flash_attn_func", "flash_attn_varlen_func"))
    return _resolve("attention", requested, "sdpa", status, strict)
