"""Export an igpt checkpoint to the Hugging Face ``LlamaForCausalLM`` format (``LlamaForSequenceClassification``
with one label for a reward model).

    python -m igpt.export checkpoint=<checkpoint or run dir> output=<dir>

writes into ``output``:

- ``config.json``: a ``LlamaConfig`` (``architectures: ["LlamaForCausalLM"]``, ``model_type: llama``) with igpt's
  shapes; ``rope_theta`` is written both at the top level (transformers 4.x) and in ``rope_parameters`` (5.x).
- ``model.safetensors``: the weights under HF names. igpt's names already equal HF Llama's below ``model.`` (see
  ``igpt/model/transformer.py``) and its RoPE uses HF's rotate-half convention, so export only adds the ``model.``
  prefix: no permutation of q/k rows (unlike Meta's original checkpoints, which HF's converter must permute). With tied
  embeddings ``lm_head.weight`` is left out and ``tie_word_embeddings: true`` makes HF tie it on load. A reward model's
  scalar head is HF's ``score.weight`` (``num_labels: 1``); HF reads it at the last non-padding token, the token igpt
  reads it at. Its normalisation (the mean reward of preferred train responses, which igpt subtracts when it loads the
  model) is written as ``igpt_reward_mean`` in config.json: subtract it from HF's logits to get igpt's rewards.
- ``generation_config.json``: stop at ``<|im_end|>`` or ``<|endoftext|>``.
- ``tokenizer.json`` (the checkpoint's, unchanged), ``tokenizer_config.json`` with a Jinja ``chat_template`` that
  renders igpt's chat format (docs/internals.md), and ``special_tokens_map.json``, so
  ``AutoTokenizer.from_pretrained(output)`` works offline and ``apply_chat_template`` gives the ids of
  ``igpt.data.chat.encode_chat``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from collections.abc import Sequence
from typing import Any

import torch

from igpt.generate import EOT, IM_END, PAD, is_chat_checkpoint, load_checkpoint, parse_kv_args
from igpt.model import Transformer

log = logging.getLogger("igpt")

SPECIAL_TOKENS = ("<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>", "<|system|>", "<|user|>", "<|assistant|>")

# igpt's chat format: <|endoftext|>, then <|im_start|><|ROLE|>content<|im_end|> per message, then the generation prompt.
CHAT_TEMPLATE = (
    "{{ '<|endoftext|>' }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('igpt chat roles are system, user and assistant, got ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|im_start|><|' + message['role'] + '|>' + message['content'] + '<|im_end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|><|assistant|>' }}{% endif %}"
)


def hf_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """igpt state dict -> HF ``LlamaForCausalLM`` names (fp32, contiguous; ``lm_head`` dropped when tied)."""
    out = {}
    for key, value in model.state_dict().items():
        if key in ("lm_head.weight", "score.weight"):
            if model.tied:
                continue
            out[key] = value
        else:
            out[f"model.{key}"] = value
    return {k: v.detach().to(torch.float32).contiguous().clone() for k, v in out.items()}


def hf_config(model: Transformer, tokenizer: Any, chat: bool) -> dict[str, Any]:
    """The ``config.json`` of a ``LlamaForCausalLM`` with ``model``'s shapes."""
    cfg = model.cfg
    eot, pad, im_end = (tokenizer.token_to_id(t) for t in (EOT, PAD, IM_END))
    head = {}
    if model.head == "scalar":
        head = {"architectures": ["LlamaForSequenceClassification"], "num_labels": 1, "id2label": {"0": "reward"},
                "label2id": {"reward": 0}, "igpt_reward_mean": -float(model.value_offset)}
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.dim // cfg.n_heads,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_seq_len,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": cfg.init_std,
        "bos_token_id": eot,
        "eos_token_id": im_end if chat else eot,
        "pad_token_id": pad,
        "torch_dtype": "float32",
        "use_cache": True,
        **head,
    }


def export(checkpoint: str, output: str, chat: bool | None = None) -> str:
    """Write the Hugging Face files for ``checkpoint`` into ``output``; return ``output``. ``chat`` (default: from the
    checkpoint's stage) picks ``<|im_end|>`` or ``<|endoftext|>`` as the tokenizer's ``eos_token``."""
    from safetensors.torch import save_file

    from igpt.checkpoint import read_meta, resolve

    model, tokenizer, meta = load_checkpoint(checkpoint, "cpu")
    ckpt = resolve(checkpoint)
    chat = is_chat_checkpoint(meta) if chat is None else chat
    missing = [t for t in SPECIAL_TOKENS if tokenizer.token_to_id(t) is None]
    if missing:
        raise ValueError(f"{ckpt}: the tokenizer lacks the special tokens {missing} (docs/internals.md)")
    os.makedirs(output, exist_ok=True)
    save_file(hf_state_dict(model), os.path.join(output, "model.safetensors"), metadata={"format": "pt"})
    config = hf_config(model, tokenizer, chat)
    _write_json(os.path.join(output, "config.json"), config)
    eos_ids = [tokenizer.token_to_id(IM_END), tokenizer.token_to_id(EOT)]
    _write_json(
        os.path.join(output, "generation_config.json"),
        {"bos_token_id": config["bos_token_id"], "eos_token_id": eos_ids, "pad_token_id": config["pad_token_id"]},
    )
    shutil.copyfile(
        os.path.join(ckpt, read_meta(ckpt).get("tokenizer", "tokenizer.json")), os.path.join(output, "tokenizer.json")
    )
    eos = IM_END if chat else EOT
    extra = [t for t in SPECIAL_TOKENS if t not in (EOT, PAD, eos)]
    special = {"bos_token": EOT, "eos_token": eos, "pad_token": PAD, "additional_special_tokens": extra}
    _write_json(os.path.join(output, "special_tokens_map.json"), special)
    _write_json(
        os.path.join(output, "tokenizer_config.json"),
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **special,
            "add_bos_token": False,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": model.cfg.max_seq_len,
            "chat_template": CHAT_TEMPLATE,
        },
    )
    log.info("exported %s to %s (%s, %s)", ckpt, output, config["architectures"][0], "chat" if chat else "base")
    return output


def _write_json(path: str, obj: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    spec = {"checkpoint": (str, ...), "output": (str, ...), "chat": (str, "auto")}
    try:
        args = parse_kv_args(argv, spec, "igpt.export")
        if args["chat"] not in ("auto", "true", "false"):
            raise ValueError(f"igpt.export: chat={args['chat']!r}: expected auto, true or false")
        chat = None if args["chat"] == "auto" else args["chat"] == "true"
        out = export(args["checkpoint"], args["output"], chat)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    sys.exit(main())
