"""Training FLOPs per token and parameter counts, for model FLOPs utilisation (MFU).

Follows PaLM (Chowdhery et al. 2022, appendix B): one token of training (forward + backward) costs

    6 * N  +  12 * n_layers * dim * seq_len

where N counts the parameters of every matrix multiply (attention projections, SwiGLU's three matrices and the
``lm_head``; not the embedding lookup and not the norm weights), and the second term is the attention scores and
the weighted sum of values (``Q K^T`` and ``P V``: 2 matmuls x 2 FLOPs per multiply-add x 3 for forward + backward,
over ``n_heads * head_dim = dim`` and ``seq_len`` keys). As in PaLM, causal masking is **not** halved away: the
number counts the work of full attention, so MFU stays comparable with PaLM's and nanoGPT's (which use the same
convention); kernels that skip the masked half do less work than counted. The ``lm_head`` counts even when tied to the
embedding, since its matmul runs either way.
"""

from __future__ import annotations

import torch.nn as nn

from igpt.config import ModelConfig


def matmul_params(cfg: ModelConfig) -> int:
    """Parameters that take part in a matrix multiply per token: the blocks' projections plus the ``lm_head``."""
    head_dim = cfg.head_size
    attn = cfg.dim * cfg.n_heads * head_dim * 2 + cfg.dim * cfg.n_kv_heads * head_dim * 2  # q, o + k, v
    mlp = 3 * cfg.dim * cfg.ffn_dim  # gate, up, down
    return cfg.n_layers * (attn + mlp) + cfg.vocab_size * cfg.dim


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per token at ``seq_len``: ``6 N + 12 L dim S`` (PaLM, no causal halving)."""
    return 6.0 * matmul_params(cfg) + 12.0 * cfg.n_layers * cfg.dim * seq_len


def num_params(model: nn.Module, exclude_embedding: bool = False) -> int:
    """Number of distinct parameters of ``model`` (a tied matrix counts once).

    ``exclude_embedding=True`` leaves out the token-embedding table ``embed_tokens.weight`` (when the ``lm_head`` is
    tied to it, that shared matrix is left out too).
    """
    total = sum(p.numel() for p in model.parameters())  # parameters() yields a shared tensor once
    if exclude_embedding:
        embed = getattr(model, "embed_tokens", None)
        if embed is None:
            raise ValueError(f"{type(model).__name__} has no embed_tokens to exclude")
        total -= embed.weight.numel()
    return total
