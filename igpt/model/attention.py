"""The attention entry point: one call, three backends, document masking for packed rows in O(S) memory.

``attention(q, k, v, info, backend)`` takes q ``(B, S, Hq, D)`` and k, v ``(B, S, Hkv, D)`` (grouped-query attention
when ``Hkv < Hq``) and returns ``(B, S, Hq, D)``. ``info`` says which tokens may attend to which:

- ``None``: plain causal attention over the whole row;
- a ``position_ids`` tensor ``(B, S)``: causal attention inside each document, doc id = ``cumsum(position_ids == 0)``
  along the row (docs/internals.md "Batches");
- an :class:`AttentionInfo` built once per forward by :func:`attention_info` (what the model passes, so the document
  layout is not worked out again in every layer).

Every backend sees a packed batch as ``B * S`` tokens cut into segments at every document start and every row start
(a document split across rows restarts at the row start), with ``cu_seqlens`` the int32 offsets of those cuts (the
flash-attn varlen convention). Backends, following nanochat's flash-attn-shaped entry point and torchtitan's
config-chosen attention:

- ``sdpa``: :func:`torch.nn.functional.scaled_dot_product_attention` with ``is_causal=True``, never with a mask. Rows
  holding one document each go through in one call. Packed rows are attention of many short causal sequences: the
  segments are sorted by length and cut into a few groups of similar length; each group's tokens are copied into a
  ``(n, P, H, D)`` batch, its shorter segments followed by zero rows up to the group's longest ``P``, and the group
  runs as one causal SDPA call. Padding at the end of a causal sequence is never attended to by its real tokens, so
  their outputs and gradients are exact; the padded outputs are dropped when the groups are copied back. Memory is
  O(S) in the row length (the regrouped q, k, v and outputs; SDPA's CPU and CUDA flash kernels keep no score
  matrix), where a dense ``(B, 1, S, S)`` document mask costs O(S^2) and keeps CUDA SDPA off its flash kernel
  (``bench/attention_mask.py`` measures both). FlexAttention, the other way to skip a dense mask, has no backward
  pass on CPU in torch 2.13.
- ``flash``: flash-attn 2's ``flash_attn_func`` / ``flash_attn_varlen_func`` (CUDA only, imported lazily).
- ``triton``: igpt's own kernels ``igpt.kernels.flash_attn_func`` / ``flash_attn_varlen_func`` (same call forms).

:func:`resolve_attention_backend` checks that the requested backend can run on the device and falls back to ``sdpa``
with a warning saying why (or raises with ``strict=True``); it logs which backend runs on ``logging.getLogger("igpt")``.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from igpt.registry import ATTENTION_BACKENDS

log = logging.getLogger("igpt")

BACKENDS = ATTENTION_BACKENDS

# Grouping segments for the sdpa backend: a segment joins the group of the next longer ones while padding it up to the
# group's length P adds at most P // PAD_FRACTION tokens (so at most ~1.3x the causal work of the unpadded segment),
# or at most PAD_TOKENS: for short segments one more SDPA call costs more than a few padded tokens.
PAD_FRACTION = 8
PAD_TOKENS = 32


@dataclass
class AttentionInfo:
    """Which tokens attend to which, precomputed once per forward pass.

    ``causal_only``: no document boundary inside any row (plain causal attention). Otherwise ``cu_seqlens`` (int32,
    ``(n + 1,)``) and ``max_seqlen`` describe the segments of the flattened ``B * S`` tokens for the varlen backends;
    for ``sdpa``, ``groups`` lists ``(n, P)`` per group of ``n`` segments padded to length ``P``, laid out one group
    after the other in ``sum(n * P)`` slots, and ``slots`` ``(B * S,)`` (int64) holds the slot of each token.
    """

    causal_only: bool = True
    cu_seqlens: torch.Tensor | None = None
    max_seqlen: int = 0
    groups: list[tuple[int, int]] = field(default_factory=list)
    slots: torch.Tensor | None = None


def group_segments(lengths: list[int]) -> list[list[int]]:
    """Cut segments (by their ``lengths``) into groups of similar length, longest first; returns segment indices.

    A segment joins the current group when padding it to the group's longest length ``P`` adds at most
    ``max(P // PAD_FRACTION, PAD_TOKENS)`` tokens.
    """
    groups: list[list[int]] = []
    longest = 0
    for i in sorted(range(len(lengths)), key=lambda j: -lengths[j]):
        if groups and longest - lengths[i] <= max(longest // PAD_FRACTION, PAD_TOKENS):
            groups[-1].append(i)
        else:
            groups.append([i])
            longest = lengths[i]
    return groups


def _padded_layout(cu_seqlens: torch.Tensor, lengths: list[int]) -> tuple[list[tuple[int, int]], torch.Tensor]:
    """The sdpa backend's ``groups`` and ``slots`` (see :class:`AttentionInfo`) for the segments ``cu_seqlens``
    ``(n + 1,)`` with host-side ``lengths``."""
    device = cu_seqlens.device
    starts = cu_seqlens[:-1].long()  # (n,)
    groups = []
    first_slot = torch.empty_like(starts)  # (n,) padded slot of each segment's first token
    offset = 0
    for members in group_segments(lengths):
        m, p = len(members), lengths[members[0]]
        first_slot[torch.tensor(members, device=device)] = offset + p * torch.arange(m, device=device)
        groups.append((m, p))
        offset += m * p
    total = int(cu_seqlens[-1])
    segment = torch.zeros(total, dtype=torch.long, device=device)  # (B*S,) segment index of every token
    segment[starts[1:]] = 1
    segment = segment.cumsum(0)
    slots = torch.arange(total, device=device) + (first_slot - starts)[segment]  # (B*S,)
    return groups, slots


def attention_info(position_ids: torch.Tensor | None, backend: str) -> AttentionInfo:
    """Build the masking information ``backend`` needs for ``position_ids`` ``(B, S)`` (None: plain causal).

    A row holding a single document (its only ``position_ids == 0`` at column 0, or none at all) needs no masking, so
    an unpacked batch takes the ``is_causal`` fast path. The segment lengths are read on the host once per forward
    (one host-device sync), never per layer.
    """
    if position_ids is None:
        return AttentionInfo(causal_only=True)
    if position_ids.dim() != 2:
        raise ValueError(f"position_ids must be (batch, seq_len), got shape {tuple(position_ids.shape)}")
    starts = position_ids == 0  # (B, S)
    if not bool(starts[:, 1:].any()):
        return AttentionInfo(causal_only=True)
    b, s = position_ids.shape
    starts = starts.clone()
    starts[:, 0] = True  # every row starts a sequence, whatever its first position id
    offsets = torch.nonzero(starts.reshape(-1), as_tuple=False).flatten()  # (n,) start of each packed sequence
    end = torch.tensor([b * s], device=offsets.device, dtype=offsets.dtype)
    cu_seqlens = torch.cat([offsets, end]).to(torch.int32)  # (n + 1,)
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    info = AttentionInfo(causal_only=False, cu_seqlens=cu_seqlens, max_seqlen=max(lengths))
    if backend == "sdpa":
        info.groups, info.slots = _padded_layout(cu_seqlens, lengths)
    return info


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """SDPA on ``(B, S, H, D)`` tensors: causal (``mask`` None) or with a boolean ``mask`` ``(B, 1, Sq, Sk)``."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, S, D)
    gqa = q.shape[1] != k.shape[1]
    if gqa and q.is_cuda and (mask is not None or q.dtype == torch.float32):
        # CUDA's memory-efficient kernel (the one for a mask, and for fp32, which flash does not take) has no
        # enable_gqa; repeating the kv heads keeps attention off the O(S^2) math path.
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # (B, Hq, S, D)
        gqa = False
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=gqa)
    return out.transpose(1, 2)  # (B, S, Hq, D)


class _ToSlots(torch.autograd.Function):
    """Rows ``x`` ``(N, ...)`` into ``total`` zero rows at ``slots`` ``(N,)`` (distinct); the backward reads them back.

    Both directions are a copy (``index_copy`` / ``index_select``); ``x.index_select`` with duplicate indices would
    need a scatter-add in its backward instead.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, slots: torch.Tensor, total: int) -> torch.Tensor:
        ctx.save_for_backward(slots)
        return x.new_zeros((total, *x.shape[1:])).index_copy_(0, slots, x)  # (total, ...)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (slots,) = ctx.saved_tensors
        return grad.index_select(0, slots), None, None


class _FromSlots(torch.autograd.Function):
    """The inverse of :class:`_ToSlots`: rows ``slots`` of ``y`` ``(total, ...)``; padding rows get no gradient."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(slots)
        ctx.total = y.shape[0]
        return y.index_select(0, slots)  # (N, ...)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (slots,) = ctx.saved_tensors
        return grad.new_zeros((ctx.total, *grad.shape[1:])).index_copy_(0, slots, grad), None


@torch.compiler.disable  # the group sizes change with every batch: compiled, each would be a recompile
def _sdpa_segments(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, info: AttentionInfo) -> torch.Tensor:
    """Causal attention inside each segment of ``info``, one SDPA call per group of similar-length segments.

    Padding slots are zeros at the end of their segment's row: a real query never attends to them (causal), and
    their own outputs are dropped.
    """
    assert info.slots is not None
    b, s, hq, d = q.shape
    sizes = [n * p for n, p in info.groups]
    total = sum(sizes)
    qs, ks, vs = (
        _ToSlots.apply(t.reshape(b * s, t.shape[2], d), info.slots, total).split(sizes)  # (B*S, H, D) -> (T, H, D)
        for t in (q, k, v)
    )  # per group (n * P, H, D)
    outs = []
    for (n, p), qg, kg, vg in zip(info.groups, qs, ks, vs):
        out = _sdpa(qg.view(n, p, hq, d), kg.view(n, p, -1, d), vg.view(n, p, -1, d), None)  # (n, P, Hq, D)
        outs.append(out.reshape(n * p, hq, d))  # (n*P, Hq, D)
    out = _FromSlots.apply(torch.cat(outs), info.slots)  # (B*S, Hq, D): tokens back in order, padding dropped
    return out.view(b, s, hq, d)  # (B, S, Hq, D)


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
        if info.causal_only:
            return _sdpa(q, k, v, None)
        if info.slots is None:
            raise ValueError("attention_info was built for a varlen backend but the sdpa backend needs its groups")
        return _sdpa_segments(q, k, v, info)
    lib = _kernels(backend)
    if info.causal_only:
        return lib.flash_attn_func(q, k, v, causal=True)
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
