"""Export an igpt checkpoint to a Hugging Face model folder that current transformers and vLLM load as they are.

    python -m igpt.export checkpoint=<checkpoint, run dir or model folder> output=<dir>
        [chat=auto|true|false] [dtype=auto|float32|bfloat16] [max_shard_size=5GB]

writes into ``output``:

- ``config.json``: the model's original class (``igpt.hub.hf_config``): ``LlamaForCausalLM`` for a model igpt trained
  from scratch; an imported ``Qwen2ForCausalLM`` or ``MistralForCausalLM`` (and its further fine-tunes) keeps its
  class and config; ``...ForSequenceClassification`` with one label for a reward model. The weights' dtype is written
  as both ``dtype`` (transformers 5) and ``torch_dtype`` (4.x): ``dtype=auto`` is the precision the checkpoint was
  trained in (``bfloat16`` for ``precision=bf16``, else ``float32``). RoPE settings are written both ways as well
  (``rope_theta``/``rope_scaling`` and ``rope_parameters``).
- the weights under HF names, cast to that dtype: ``model.safetensors``, or shards ``model-0000i-of-0000n.safetensors``
  of at most ``max_shard_size`` each (``5GB`` by default, decimal units as in transformers; ``KiB``/``MiB``/``GiB``
  too) with ``model.safetensors.index.json``. igpt's names already equal HF Llama's below ``model.`` (see
  ``igpt/model/transformer.py``) and its RoPE uses HF's rotate-half convention, so export only adds the ``model.``
  prefix: no permutation of q/k rows. With tied embeddings ``lm_head.weight`` is left out and
  ``tie_word_embeddings: true`` makes HF tie it on load. A reward model's scalar head is HF's ``score.weight``
  (``num_labels: 1``); HF reads it at the last non-padding token, the token igpt reads it at. Its normalisation (the
  mean reward of preferred train responses, which igpt subtracts when it loads the model) is written as
  ``igpt_reward_mean`` in config.json: subtract it from HF's logits to get igpt's rewards.
- ``tokenizer.json`` whose post-processor starts every encoded text with the document start igpt trained on
  (``igpt.data.chat.ChatFormat.doc_start_ids``: ``<|endoftext|>`` for igpt's tokenizer), so a plain
  ``tokenizer(prompt)`` followed by ``generate`` (transformers, vLLM, lm-evaluation-harness) conditions on the context
  the model saw and reproduces igpt's greedy generation; ``apply_chat_template`` tokenizes without it, as the
  template writes its own start. ``tokenizer_config.json`` and ``special_tokens_map.json`` name the BOS, EOS and pad
  tokens; a model that saw a chat template (an SFT or later stage, or a tokenizer with its own template) gets it in
  ``chat_template.jinja`` and ``tokenizer_config.json`` (a base model that never saw one gets none).
- ``generation_config.json``: the stop ids (``ChatFormat.stop_ids``), BOS and pad.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from collections.abc import Sequence
from typing import Any

import torch

from igpt.cli import parse
from igpt.errors import IgptError
from igpt.generate import is_chat_checkpoint, load_checkpoint
from igpt.model import Transformer
from igpt.precision import DTYPES

log = logging.getLogger("igpt")

EXPORT_DTYPES = ("float32", "bfloat16")
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20,
          "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int) -> int:
    """Bytes of a size such as ``5GB`` (decimal units, as transformers' ``max_shard_size``), ``512MiB`` or ``1000``."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", text.upper())
    if not m or m.group(2) not in _UNITS:
        raise ValueError(f"max_shard_size={text!r}: expected a size such as 5GB, 500MB or 2GiB")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def hf_state_dict(model: Transformer, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """igpt state dict -> HF names (contiguous, in ``dtype``; ``lm_head`` dropped when tied)."""
    from igpt.hub import hf_name

    out = {}
    for key, value in model.state_dict().items():
        if key == "lm_head.weight" and model.tied:
            continue
        out[hf_name(key)] = value.detach().to(dtype).contiguous()
    return out


def shard_plan(state: dict[str, torch.Tensor], max_bytes: int) -> list[list[str]]:
    """Names per shard, in order, each shard at most ``max_bytes`` unless one tensor alone is larger."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, t in state.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    return shards


def save_weights(state: dict[str, torch.Tensor], output: str, max_bytes: int) -> list[str]:
    """Write ``state`` as ``model.safetensors`` or as shards with ``model.safetensors.index.json``; the files."""
    from safetensors.torch import save_file

    plan = shard_plan(state, max_bytes)
    if len(plan) == 1:
        save_file(state, os.path.join(output, "model.safetensors"), metadata={"format": "pt"})
        return ["model.safetensors"]
    files, weight_map = [], {}
    for i, names in enumerate(plan):
        name = f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors"
        save_file({k: state[k] for k in names}, os.path.join(output, name), metadata={"format": "pt"})
        files.append(name)
        weight_map.update(dict.fromkeys(names, name))
    total = sum(t.numel() * t.element_size() for t in state.values())
    _write_json(os.path.join(output, "model.safetensors.index.json"),
                {"metadata": {"total_size": total}, "weight_map": weight_map})
    return [*files, "model.safetensors.index.json"]


def hf_config(model: Transformer, tokenizer: Any, chat: bool, meta: dict[str, Any] | None = None,
              dtype: str = "float32") -> dict[str, Any]:
    """The ``config.json`` of ``model`` in its original class (``meta['hf_config']`` of an imported model)."""
    from igpt.data.chat import ChatFormat
    from igpt.hub import hf_config as base_config

    fmt = ChatFormat.of(tokenizer)
    config = base_config(model.cfg, model.head, (meta or {}).get("hf_config"))
    start = fmt.doc_start_ids()
    eos = fmt.eos_token(chat)
    config.update(
        bos_token_id=start[0] if start else None,
        eos_token_id=fmt.token_to_id(eos) if eos else None,
        pad_token_id=fmt.pad_id,
        dtype=dtype,
        torch_dtype=dtype,
    )
    if model.head == "scalar":
        config.update(num_labels=1, id2label={"0": "reward"}, label2id={"reward": 0},
                      igpt_reward_mean=-float(model.value_offset))
    return config


def export_tokenizer(fmt: Any, output: str, chat: bool, max_len: int) -> dict[str, Any]:
    """Write the tokenizer files (module docstring); return the special tokens named in tokenizer_config.json."""
    from tokenizers import Tokenizer, processors

    tok = Tokenizer.from_str(fmt.tokenizer.to_str())
    start = fmt.doc_start_ids()
    if start and tok.encode("x", add_special_tokens=True).ids[: len(start)] != start:
        names = [tok.id_to_token(i) for i in start]
        prefix = " ".join(names)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{prefix} $A", pair=f"{prefix} $A {prefix} $B",
            special_tokens=[(n, i) for n, i in dict(zip(names, start)).items()],
        )
    tok.save(os.path.join(output, "tokenizer.json"))
    eos = fmt.eos_token(chat)
    pad = fmt.tokenizer.id_to_token(fmt.pad_id)
    special = {"bos_token": tok.id_to_token(start[0]) if start else None, "eos_token": eos, "pad_token": pad}
    if not fmt.has_template:
        from igpt.data.chat import SPECIAL_TOKENS

        special["additional_special_tokens"] = [
            t for t in SPECIAL_TOKENS if t not in special.values() and tok.token_to_id(t) is not None
        ]
    special = {k: v for k, v in special.items() if v is not None}
    _write_json(os.path.join(output, "special_tokens_map.json"), special)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **special, "clean_up_tokenization_spaces": False,
              "model_max_length": max_len}
    if chat or fmt.has_template:
        template = fmt.jinja_template()
        config["chat_template"] = template
        with open(os.path.join(output, "chat_template.jinja"), "w", encoding="utf-8") as f:
            f.write(template)
    _write_json(os.path.join(output, "tokenizer_config.json"), config)
    return special


def export(
    checkpoint: str, output: str, chat: bool | None = None, dtype: str = "auto", max_shard_size: str | int = "5GB"
) -> str:
    """Write the Hugging Face files for ``checkpoint`` into ``output``; return ``output``. ``chat`` (default: from the
    checkpoint's stage) picks the end-of-turn or the end-of-document token as the ``eos_token``."""
    if dtype not in ("auto", *EXPORT_DTYPES):
        raise ValueError(f"dtype={dtype!r}: expected auto, {', '.join(EXPORT_DTYPES)}")
    max_bytes = parse_size(max_shard_size)
    model, fmt, meta = load_checkpoint(checkpoint, "cpu")
    chat = is_chat_checkpoint(meta, fmt) if chat is None else chat
    if dtype == "auto":
        dtype = "bfloat16" if meta.get("precision") == "bf16" else "float32"
    os.makedirs(output, exist_ok=True)
    files = save_weights(hf_state_dict(model, DTYPES[dtype]), output, max_bytes)
    config = hf_config(model, fmt, chat, meta, dtype)
    _write_json(os.path.join(output, "config.json"), config)
    _write_json(
        os.path.join(output, "generation_config.json"),
        {"bos_token_id": config["bos_token_id"], "eos_token_id": fmt.stop_ids, "pad_token_id": config["pad_token_id"]},
    )
    export_tokenizer(fmt, output, chat, model.cfg.max_seq_len)
    log.info("exported %s to %s (%s, %s, %s, %d weight file(s))", checkpoint, output, config["architectures"][0],
             "chat" if chat else "base", dtype, len([f for f in files if f.endswith(".safetensors")]))
    return output


def _write_json(path: str, obj: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    spec = {"checkpoint": (str, ...), "output": (str, ...), "chat": (str, "auto"), "dtype": (str, "auto"),
            "max_shard_size": (str, "5GB")}
    try:
        args = parse(argv, spec, "igpt.export", __doc__)
        if args["chat"] not in ("auto", "true", "false"):
            raise ValueError(f"igpt.export: chat={args['chat']!r}: expected auto, true or false")
        chat = None if args["chat"] == "auto" else args["chat"] == "true"
        out = export(args["checkpoint"], args["output"], chat, args["dtype"], args["max_shard_size"])
    except (IgptError, ValueError, FileNotFoundError) as e:
        print(f"igpt.export: error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    sys.exit(main())
