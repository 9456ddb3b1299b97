"""The names a config may choose, each stated once: strategies and kernel backends (stages: ``igpt.stages.STAGES``).

Importing this module imports nothing heavy, so the config schema derives its allowed values from it.
"""

from __future__ import annotations

#: ``strategy=<name>`` -> the module and class that implement it (imported only when chosen: DeepSpeed is optional)
STRATEGIES: dict[str, tuple[str, str]] = {
    "single": ("igpt.parallel.base", "Strategy"),
    "ddp": ("igpt.parallel.ddp", "DDPStrategy"),
    "fsdp": ("igpt.parallel.fsdp", "FSDPStrategy"),
    "zero1": ("igpt.parallel.zero", "ZeroStrategy"),
    "zero2": ("igpt.parallel.zero", "ZeroStrategy"),
    "zero3": ("igpt.parallel.zero", "ZeroStrategy"),
}
#: ``kernels.attention``: torch SDPA, flash-attn (CUDA, optional), igpt's Triton flash attention
ATTENTION_BACKENDS: tuple[str, ...] = ("sdpa", "flash", "triton")
#: ``kernels.loss``: torch cross-entropy on full logits, igpt's fused Triton linear cross-entropy
LOSS_BACKENDS: tuple[str, ...] = ("torch", "triton")

__all__ = ["ATTENTION_BACKENDS", "LOSS_BACKENDS", "STRATEGIES"]
