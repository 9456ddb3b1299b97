"""A Llama-style decoder-only transformer in plain PyTorch.

Architecture (Llama 2/3, Touvron et al. 2023; the layout of Hugging Face's ``LlamaForCausalLM``)::

    embed_tokens -> n_layers x Block -> norm (RMSNorm) -> lm_head
    Block: h = x + self_attn(input_layernorm(x));  out = h + mlp(post_attention_layernorm(h))

with rotary position embeddings (RoPE, Su et al. 2021) on queries and keys, grouped-query attention (``n_kv_heads``
key/value heads shared by ``n_heads / n_kv_heads`` query heads each), a SwiGLU MLP (Shazeer 2020) and no biases.
Imported Hugging Face checkpoints (``igpt/hub.py``) add what Llama 3.x, Qwen2 and Mistral need: a head size other
than ``dim / n_heads`` (``head_dim``), biases on the q/k/v projections (Qwen2's ``attention_bias``), Llama 3.1's
RoPE frequency scaling and linear position interpolation (``rope_scaling``, computed as transformers'
``_compute_llama3_parameters`` / ``_compute_linear_scaling_rope_parameters``). A sliding attention window is accepted
only when it is at least ``max_seq_len`` long, where it equals full causal attention.

Module and parameter names equal Hugging Face Llama's (``layers.0.self_attn.q_proj.weight`` here is
``model.layers.0.self_attn.q_proj.weight`` there; ``lm_head.weight`` is the same), and RoPE uses the same
"rotate half" convention (the two halves of each head dimension form the rotated pairs), so weights export to
``LlamaForCausalLM`` without permutation (``igpt/export.py``).

Initialisation: every linear and embedding weight is drawn from N(0, ``init_std``); the two projections that write
into the residual stream in each block (``self_attn.o_proj`` and ``mlp.down_proj``) use ``init_std / sqrt(2 *
n_layers)`` so the residual stream's variance does not grow with depth (GPT-2, Radford et al. 2019, section 2.3).
RMSNorm weights start at 1. With ``tie_embeddings`` the output matrix is the embedding matrix (``lm_head.weight is
embed_tokens.weight``), initialised once with ``init_std``.

The model knows nothing about parallelism: FSDP, DeepSpeed, activation checkpointing and ``torch.compile`` are applied
from outside (``igpt/parallel/``), per ``Block`` in ``model.layers``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from igpt.config import ModelConfig
from igpt.model.attention import AttentionInfo, attention, attention_info, decode_attention
from igpt.model.kv_cache import KVCache
from igpt.model.loss import IGNORE_INDEX
from igpt.model.outputs import Logits, Output, TokenLoss, Values


@dataclass(frozen=True)
class Draw:
    """How one tensor is initialised: ``normal`` (mean ``a``, std ``b``), ``uniform`` on ``[a, b)`` or ``fill``
    with ``a``; drawn from ``generator`` (default: torch's global one), exactly as ``nn.init`` draws."""

    kind: str
    a: float = 0.0
    b: float = 0.0

    @property
    def random(self) -> bool:
        return self.kind != "fill"

    def __call__(self, t: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if self.kind == "normal":
            return t.normal_(self.a, self.b, generator=generator)
        if self.kind == "uniform":
            return t.uniform_(self.a, self.b, generator=generator)
        return t.fill_(self.a)


class RMSNorm(nn.Module):
    """Root-mean-square layer norm (Zhang & Sennrich 2019), computed in fp32 like Hugging Face's ``LlamaRMSNorm``."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)

ROPE_TYPES = ("default", "linear", "llama3")


def rope_inv_freq(
    head_dim: int, theta: float, scaling: dict[str, Any] | None = None, device: torch.device | None = None
) -> torch.Tensor:
    """RoPE frequencies ``(D/2,)`` in fp32: ``theta ** (-2i / D)``, then the ``scaling`` of the model, if any.

    ``{"rope_type": "linear", "factor": f}`` divides every frequency by f (position interpolation, Chen et al. 2023);
    ``"llama3"`` divides only the low frequencies (wavelengths above ``original_max_position_embeddings /
    low_freq_factor``) by ``factor``, keeps the high ones, and blends between the two (Meta's Llama 3.1 recipe).
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float) / head_dim))
    kind = (scaling or {}).get("rope_type", "default")
    if kind == "default":
        return inv_freq
    if kind not in ROPE_TYPES:
        raise ValueError(
            f"model.rope_scaling: rope_type {kind!r} is not implemented (igpt has {', '.join(ROPE_TYPES)})"
        )
    factor = float(scaling["factor"])
    if kind == "linear":
        return inv_freq / factor
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
    return torch.where(medium, blended, scaled)


def rope_cos_sin(
    position_ids: torch.Tensor,
    head_dim: int,
    theta: float,
    dtype: torch.dtype,
    scaling: dict[str, Any] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin ``(B, S, D)`` of RoPE angles for ``position_ids`` ``(B, S)``, computed in fp32 then cast.

    Frequencies from :func:`rope_inv_freq`, repeated over both halves of the head dimension (HF Llama).
    """
    inv_freq = rope_inv_freq(head_dim, theta, scaling, position_ids.device)  # (D/2,)
    angles = position_ids[..., None].float() * inv_freq  # (B, S, D/2)
    emb = torch.cat([angles, angles], dim=-1)  # (B, S, D)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``(B, S, H, D)`` by the angles in cos/sin ``(B, S, D)``; pairs are (i, i + D/2)."""
    x1, x2 = x.chunk(2, dim=-1)  # (B, S, H, D/2) each
    rotated = torch.cat([-x2, x1], dim=-1)  # (B, S, H, D)
    cos, sin = cos.to(x.dtype)[:, :, None], sin.to(x.dtype)[:, :, None]  # (B, S, 1, D); keeps x's dtype under autocast
    return x * cos + rotated * sin


class Attention(nn.Module):
    """Grouped-query self-attention with RoPE; the attention itself is ``igpt.model.attention``."""

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads = cfg.n_heads, cfg.n_kv_heads
        self.head_dim = cfg.head_size
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.dim, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(cfg.dim, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.dim, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.dim, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        info: AttentionInfo | None,
        backend: str,
        kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.n_heads, self.head_dim)  # (B, S, Hq, D)
        k = self.k_proj(x).view(b, s, self.n_kv_heads, self.head_dim)  # (B, S, Hkv, D)
        v = self.v_proj(x).view(b, s, self.n_kv_heads, self.head_dim)  # (B, S, Hkv, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)  # (B, L, Hkv, D)
            out = decode_attention(q, k, v, kv_cache.mask)
        else:
            out = attention(q, k, v, info, backend)  # (B, S, Hq, D)
        return self.o_proj(out.reshape(b, s, self.n_heads * self.head_dim))  # (B, S, dim)


class MLP(nn.Module):
    """SwiGLU feed-forward: ``down_proj(silu(gate_proj(x)) * up_proj(x))``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """One pre-norm transformer block: attention and SwiGLU, each behind an RMSNorm and a residual connection."""

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        info: AttentionInfo | None = None,
        backend: str = "sdpa",
        kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, info, backend, kv_cache)
        return x + self.mlp(self.post_attention_layernorm(x))


HEADS = ("lm", "scalar")


class Transformer(nn.Module):
    """The decoder. ``attention`` picks the attention backend (sdpa | flash | triton), ``loss`` the loss backend
    (torch | triton); resolve them for the device first with ``resolve_attention_backend`` / ``resolve_loss_backend``.

    ``head`` is ``"lm"`` (``lm_head``, ``(dim -> vocab)``: a language model) or ``"scalar"`` (``score``, ``(dim -> 1)``
    without bias: a reward model or a critic, Hugging Face's ``LlamaForSequenceClassification`` layout). The scalar
    head starts from N(0, 1/(dim + 1)), the reward-model initialisation of Stiennon et al. 2020 and InstructGPT.
    """

    def __init__(self, cfg: ModelConfig, attention: str = "sdpa", loss: str = "torch", head: str = "lm") -> None:
        super().__init__()
        if (cfg.head_dim is None and cfg.dim % cfg.n_heads) or cfg.n_heads % cfg.n_kv_heads or cfg.head_size % 2:
            raise ValueError(
                f"model: dim ({cfg.dim}) must split into n_heads ({cfg.n_heads}) heads of even size (or set an even "
                f"model.head_dim), and n_heads must be a multiple of n_kv_heads ({cfg.n_kv_heads})"
            )
        if cfg.sliding_window is not None and cfg.sliding_window < cfg.max_seq_len:
            raise ValueError(
                f"model.sliding_window={cfg.sliding_window} is shorter than model.max_seq_len={cfg.max_seq_len}: igpt "
                f"implements full causal attention, which equals a sliding window only for sequences that fit in it"
            )
        rope_inv_freq(cfg.head_size, cfg.rope_theta, cfg.rope_scaling)  # an unknown rope_scaling fails here, named
        if head not in HEADS:
            raise ValueError(f"head={head!r}: expected one of {', '.join(HEADS)}")
        self.cfg = cfg
        self.head = head
        self.value_offset = 0.0  # added to the scalar head's output (a trained reward model's normalisation)
        self.attention_backend = attention
        self.loss_backend = loss
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        if head == "lm":
            self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
            self.retie()
        else:
            self.score = nn.Linear(cfg.dim, 1, bias=False)
        self.init_weights()

    @property
    def tied(self) -> bool:
        """True when ``lm_head.weight`` is ``embed_tokens.weight``: the config ties them. The one switch: the
        constructor, the init plan and every step that gives parameters new storage (``to_empty``, loads with
        ``assign``) ask it."""
        return self.head == "lm" and self.cfg.tie_embeddings

    def retie(self) -> None:
        """Make ``lm_head.weight`` the embedding matrix again when the model is :attr:`tied` (after a step that gave
        parameters new storage: ``to_empty``, a load with ``assign``); nothing otherwise."""
        if self.tied:
            self.lm_head.weight = self.embed_tokens.weight

    def init_plan(self) -> list[tuple[str, Draw]]:
        """Every parameter's initialisation as ``(name, draw)``, in the order :meth:`init_weights` draws them (the
        module docstring's rule; names of the plain model, a tied output matrix once as ``embed_tokens.weight``).

        Meta-device initialisation (``igpt/parallel/init.py``) replays this list one tensor at a time, so a sharded
        model gets the values the eager model would have."""
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_layers)
        plan = [("embed_tokens.weight", Draw("normal", 0.0, std))]
        if self.head == "lm" and not self.tied:
            plan.append(("lm_head.weight", Draw("normal", 0.0, std)))
        for i, block in enumerate(self.layers):
            pre = f"layers.{i}."
            for proj in ("q_proj", "k_proj", "v_proj"):
                plan.append((f"{pre}self_attn.{proj}.weight", Draw("normal", 0.0, std)))
                if getattr(block.self_attn, proj).bias is not None:
                    plan.append((f"{pre}self_attn.{proj}.bias", Draw("fill", 0.0)))
            plan += [
                (f"{pre}mlp.gate_proj.weight", Draw("normal", 0.0, std)),
                (f"{pre}mlp.up_proj.weight", Draw("normal", 0.0, std)),
                (f"{pre}self_attn.o_proj.weight", Draw("normal", 0.0, out_std)),
                (f"{pre}mlp.down_proj.weight", Draw("normal", 0.0, out_std)),
                (f"{pre}input_layernorm.weight", Draw("fill", 1.0)),
                (f"{pre}post_attention_layernorm.weight", Draw("fill", 1.0)),
            ]
        plan.append(("norm.weight", Draw("fill", 1.0)))
        if self.head == "scalar":
            plan.append(("score.weight", Draw("normal", 0.0, 1.0 / math.sqrt(self.cfg.dim + 1))))
        return plan

    def construction_draws(self) -> list[tuple[int, Draw]]:
        """``(numel, draw)`` of the random draws that building the modules on a real device makes before
        :meth:`init_weights` replaces them, in order: ``nn.Linear``'s Kaiming-uniform weight and uniform bias,
        ``nn.Embedding``'s N(0, 1). Built on the meta device the modules draw nothing; replaying these on the
        generator leaves it where eager construction would (the values themselves are never used)."""
        draws: list[tuple[int, Draw]] = []
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                bound = 1.0 / math.sqrt(module.in_features) if module.in_features else 0.0
                draws.append((module.out_features * module.in_features, Draw("uniform", -bound, bound)))
                if module.bias is not None:
                    draws.append((module.out_features, Draw("uniform", -bound, bound)))
            elif isinstance(module, nn.Embedding):
                draws.append((module.num_embeddings * module.embedding_dim, Draw("normal", 0.0, 1.0)))
            elif module is not self and not isinstance(module, (RMSNorm, Attention, MLP, Block, nn.ModuleList)):
                raise NotImplementedError(f"construction_draws: module {name} ({type(module).__name__}) is unknown")
        return draws

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re)initialise every parameter as the module docstring describes (also after building on ``meta``)."""
        for name, draw in self.init_plan():
            draw(self.get_parameter(name))

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        reduction: str = "sum",
        kv_cache: KVCache | None = None,
        attention_mask: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        output: Output | None = None,
    ):
        """Run the decoder, then ``output`` (``igpt.model.outputs``) on the final hidden states, inside this forward.

        Without ``output``: logits ``(B, S, V)`` for an LM head, values ``(B, S)`` for a scalar head; with ``labels``
        ``(B, S)`` the fp32 cross-entropy (``TokenLoss``, never the logits).

        ``position_ids`` ``(B, S)`` are the RoPE positions and, without a cache, also the document boundaries: a token
        attends only to earlier tokens of its own document (doc id = ``cumsum(position_ids == 0)``). None: plain
        causal attention with positions ``0..S-1`` (after the cache's length when decoding).

        ``reduction="sum"`` sums the loss over tokens whose label is not -100; ``"none"`` returns it per token
        ``(B, S)`` with 0 at ignored tokens.

        With ``kv_cache`` (decoding, sdpa): the new tokens are appended to the cache and attend to everything in it;
        ``attention_mask`` ``(B, S)`` marks real (True) versus left-padding (False) tokens; documents are not masked.
        ``logits_to_keep > 0`` returns only the logits of the last that many positions (a prefill needs one).
        """
        b, s = input_ids.shape
        if position_ids is None:
            start = kv_cache.length if kv_cache is not None else 0
            position_ids = torch.arange(start, start + s, device=input_ids.device).expand(b, s)  # (B, S)
            info = AttentionInfo(causal_only=True)
        elif kv_cache is None:
            info = attention_info(position_ids, self.attention_backend)
        else:
            info = None
        if kv_cache is not None:
            kv_cache.begin(s, attention_mask)
        x = self.embed_tokens(input_ids)  # (B, S, dim)
        cfg = self.cfg
        cos, sin = rope_cos_sin(position_ids, cfg.head_size, cfg.rope_theta, x.dtype, cfg.rope_scaling)  # (B, S, D)
        for block in self.layers:
            x = block(x, cos, sin, info, self.attention_backend, kv_cache)
        if kv_cache is not None:
            kv_cache.advance(s)
        x = self.norm(x)  # (B, S, dim)
        if output is None:
            if labels is not None:
                output = TokenLoss(labels, reduction)
            else:
                output = Values() if self.head == "scalar" else Logits(logits_to_keep)
        return output(self, x)


__all__ = ["Attention", "Block", "Draw", "IGNORE_INDEX", "MLP", "RMSNorm", "Transformer", "apply_rope", "rope_cos_sin",
           "rope_inv_freq"]
