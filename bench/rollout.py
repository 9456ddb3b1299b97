"""Rollout throughput: igpt's sampler (``igpt.sampling.sample_rollout``) against Hugging Face ``generate``.

    python bench/rollout.py [--batch 32] [--prompt-len 32] [--new-tokens 64] [--threads 2] [--models tiny,small]

Both decode the same model (igpt's weights loaded into ``LlamaForCausalLM``, which computes the same function) on
the same left-padded prompts, the same batch and thread count, sampling at temperature 1 for exactly
``--new-tokens`` tokens (no stop token, so both do the same work), in the same run. igpt's sampler preallocates a
static KV cache, samples with counter-based Gumbel noise and checks for finished rows every 8 steps; ``generate``
uses its dynamic cache and its per-step stopping checks. Printed: new tokens per second for each and the ratio.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

SHAPES = {  # name -> (dim, layers, heads, kv heads, ffn, vocab)
    "tiny": (128, 4, 4, 2, 384, 4096),  # conf/model/tiny.yaml: the CPU demo's model
    "small": (512, 8, 8, 4, 1536, 8192),
}


def best_rate(fn, repeats: int) -> float:
    """New tokens per second of ``fn`` (which returns how many it made): one warm-up, then the best of ``repeats``."""
    fn()
    best, n = float("inf"), 0
    for _ in range(repeats):
        t = time.perf_counter()
        n = fn()
        best = min(best, time.perf_counter() - t)
    return n / best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--models", default="tiny,small")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import LlamaConfig, LlamaForCausalLM

    from igpt.config import ModelConfig
    from igpt.export import hf_state_dict
    from igpt.model import Transformer
    from igpt.sampling import row_seeds, sample_rollout

    print(f"batch {args.batch}, prompts {args.prompt_len} tokens (left-padded), {args.new_tokens} new tokens, "
          f"temperature 1, {args.threads} threads, fp32 CPU; best of {args.repeats}")
    print(f"{'model':<7} {'params':>8} {'HF generate tok/s':>18} {'igpt tok/s':>11} {'ratio':>6}")
    for name in args.models.split(","):
        dim, layers, heads, kv, ffn, vocab = SHAPES[name]
        cfg = ModelConfig(vocab_size=vocab, dim=dim, n_layers=layers, n_heads=heads, n_kv_heads=kv, ffn_dim=ffn,
                          max_seq_len=args.prompt_len + args.new_tokens)
        torch.manual_seed(0)
        model = Transformer(cfg).eval()
        hf = LlamaForCausalLM(LlamaConfig(
            vocab_size=vocab, hidden_size=dim, intermediate_size=ffn, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=cfg.max_seq_len,
            rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, tie_word_embeddings=False, pad_token_id=1,
            bos_token_id=0, eos_token_id=None,
        )).eval()
        hf.load_state_dict(hf_state_dict(model))
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(7, vocab, (args.batch, args.prompt_len), generator=g)
        real = torch.ones_like(ids, dtype=torch.bool)
        for i in range(args.batch):  # prompts of different lengths, left-padded
            cut = int(torch.randint(0, args.prompt_len // 2, (1,), generator=g))
            ids[i, :cut], real[i, :cut] = 1, False
        seeds = row_seeds(0, 0, torch.arange(args.batch))

        def igpt_run(model=model, ids=ids, real=real, seeds=seeds) -> int:
            ro = sample_rollout(model, ids, real, args.new_tokens, seeds, temperature=1.0, pad_id=1)
            return int(ro.mask.sum())

        def hf_run(hf=hf, ids=ids, real=real) -> int:
            with torch.no_grad():
                out = hf.generate(ids, attention_mask=real.long(), do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                  max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, pad_token_id=1)
            return (out.shape[1] - ids.shape[1]) * args.batch

        rates = {label: best_rate(fn, args.repeats) for label, fn in (("hf", hf_run), ("igpt", igpt_run))}
        n_params = sum(q.numel() for q in model.parameters())
        print(f"{name:<7} {n_params / 1e6:>7.1f}M {rates['hf']:>18,.0f} {rates['igpt']:>11,.0f} "
              f"{rates['igpt'] / rates['hf']:>6.2f}")


if __name__ == "__main__":
    main()
