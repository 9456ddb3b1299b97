"""igpt: train InstructGPT-style language models end to end (pretrain, SFT, reward model, DPO, PPO)."""

__version__ = "0.1.0"
