"""A preallocated key/value cache for autoregressive decoding.

Every layer owns two tensors ``(B, max_len, Hkv, D)`` allocated once, so decoding never reallocates or concatenates
(the static-cache layout of Hugging Face's ``StaticCache`` and gpt-fast). All rows share one write position
``length``: a batch of prompts of different lengths is left-padded, and ``valid`` ``(B, max_len)`` marks which slots
hold real tokens so attention skips the padding. Positions for RoPE are passed separately by the caller (per row,
counting only real tokens), so a left-padded row computes exactly what it would alone.

Usage (see ``igpt/generate.py``)::

    cache = KVCache.for_model(model, batch_size, max_len)
    logits = model(ids, position_ids=pos, kv_cache=cache, attention_mask=valid)  # prefill, then one token per call
"""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values of every layer for ``batch_size`` rows and up to ``max_len`` tokens."""

    def __init__(
        self,
        n_layers: int,
        batch_size: int,
        max_len: int,
        n_kv_heads: int,
        head_dim: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        shape = (batch_size, max_len, n_kv_heads, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]  # (B, max_len, Hkv, D)
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)  # (B, max_len)
        self.length = 0  # slots [0, length) are filled in every layer
        self.max_len = max_len
        self.batch_size = batch_size
        self._mask: torch.Tensor | None = None

    @classmethod
    def for_model(cls, model: torch.nn.Module, batch_size: int, max_len: int) -> KVCache:
        """A cache shaped for ``model`` (an igpt ``Transformer``) on its device and in its parameter dtype."""
        cfg = model.cfg
        p = next(model.parameters())
        if max_len > cfg.max_seq_len:
            raise ValueError(f"KV cache length {max_len} exceeds the model's max_seq_len ({cfg.max_seq_len})")
        return cls(cfg.n_layers, batch_size, max_len, cfg.n_kv_heads, cfg.head_size, p.device, p.dtype)

    def begin(self, num_new: int, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Start a forward pass adding ``num_new`` tokens; return its attention mask ``(B, 1, T, length + T)``.

        ``attention_mask`` ``(B, T)`` marks the new tokens that are real (False: left padding); None means all real.
        A new token attends to the real tokens up to and including its own slot; a padding token attends only to itself
        so that its (unused) output stays finite.
        """
        start, end = self.length, self.length + num_new
        if end > self.max_len:
            raise ValueError(f"KV cache is full: {start} + {num_new} tokens exceed its length {self.max_len}")
        self.valid[:, start:end] = True if attention_mask is None else attention_mask.to(torch.bool)
        q_pos = torch.arange(start, end, device=self.valid.device)  # (T,)
        k_pos = torch.arange(end, device=self.valid.device)  # (L,)
        causal = k_pos[None, :] <= q_pos[:, None]  # (T, L)
        self_slot = k_pos[None, :] == q_pos[:, None]  # (T, L)
        mask = (causal[None] & self.valid[:, None, :end]) | self_slot[None]  # (B, T, L)
        self._mask = mask[:, None]  # (B, 1, T, L)
        return self._mask

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this pass's ``k``, ``v`` ``(B, T, Hkv, D)`` for ``layer``; return all keys/values so far
        ``(B, L, Hkv, D)``."""
        start, end = self.length, self.length + k.shape[1]
        self.k[layer][:, start:end] = k
        self.v[layer][:, start:end] = v
        return self.k[layer][:, :end], self.v[layer][:, :end]

    @property
    def mask(self) -> torch.Tensor:
        if self._mask is None:
            raise RuntimeError("KVCache.begin() must be called before the layers use the cache")
        return self._mask

    def advance(self, num_new: int) -> None:
        """Finish a forward pass: the ``num_new`` tokens written by every layer are now part of the cache."""
        self.length += num_new
        self._mask = None
