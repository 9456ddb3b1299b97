"""Training-step throughput on CPU: igpt's Transformer against Hugging Face ``LlamaForCausalLM`` of the same shape.

Both run forward + backward + AdamW step on the same batch shape, dtype and thread count, timed in the same process,
alternating so that machine noise hits both. Prints tokens/s for each and the ratio igpt / HF.

    python bench/train_cpu.py [--model tiny] [--batch 16] [--seq 256] [--steps 10] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import yaml

from igpt.config import ModelConfig
from igpt.model import Transformer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def hf_model(cfg: ModelConfig):
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_cfg = LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_dim, num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads, rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta, max_position_embeddings=cfg.max_seq_len, tie_word_embeddings=cfg.tie_embeddings,
        attention_bias=False, mlp_bias=False,
    )
    hf_cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(hf_cfg)


def time_steps(step, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        step()
        out.append(time.perf_counter() - t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with open(os.path.join(REPO, "conf", "model", f"{args.model}.yaml"), encoding="utf-8") as f:
        cfg = ModelConfig(**yaml.safe_load(f))
    torch.manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1))
    x, y = ids[:, :-1], ids[:, 1:]

    ours = Transformer(cfg)
    theirs = hf_model(cfg)
    opt_ours = torch.optim.AdamW(ours.parameters(), lr=1e-4)
    opt_theirs = torch.optim.AdamW(theirs.parameters(), lr=1e-4)
    n_tok = args.batch * args.seq

    def step_ours() -> None:
        loss = ours(x, labels=y) / n_tok
        loss.backward()
        opt_ours.step()
        opt_ours.zero_grad(set_to_none=True)

    def step_theirs() -> None:
        logits = theirs(input_ids=x).logits  # the same targets as ours, the loss computed the same way
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1))
        loss.backward()
        opt_theirs.step()
        opt_theirs.zero_grad(set_to_none=True)

    for step in (step_ours, step_theirs):  # warm-up
        step()
    t_ours, t_theirs = [], []
    for _ in range(args.steps):
        t_ours += time_steps(step_ours, 1)
        t_theirs += time_steps(step_theirs, 1)
    med_ours, med_theirs = statistics.median(t_ours), statistics.median(t_theirs)
    n_params = sum(p.numel() for p in ours.parameters())
    print(f"model={args.model} params={n_params / 1e6:.1f}M batch={args.batch} seq={args.seq} "
          f"threads={args.threads} steps={args.steps} (median step time)")
    print(f"{'impl':<28}{'step s':>10}{'tokens/s':>12}")
    print(f"{'igpt Transformer':<28}{med_ours:>10.3f}{n_tok / med_ours:>12,.0f}")
    print(f"{'HF LlamaForCausalLM (sdpa)':<28}{med_theirs:>10.3f}{n_tok / med_theirs:>12,.0f}")
    print(f"ratio igpt/HF tokens/s: {med_theirs / med_ours:.3f}")


if __name__ == "__main__":
    main()
