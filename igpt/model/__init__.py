"""igpt's model: a Llama-style decoder (``Transformer``), its attention and loss entry points, the KV cache used for
decoding, and FLOP counts for MFU. Plain PyTorch; parallelism is applied from outside (``igpt/parallel/``)."""

from igpt.model.attention import attention, resolve_attention_backend
from igpt.model.flops import flops_per_token, num_params
from igpt.model.kv_cache import KVCache
from igpt.model.loss import lm_loss, resolve_loss_backend
from igpt.model.transformer import Block, Transformer

__all__ = [
    "Block",
    "KVCache",
    "Transformer",
    "attention",
    "flops_per_token",
    "lm_loss",
    "num_params",
    "resolve_attention_backend",
    "resolve_loss_backend",
]
