"""The batch-generation CLI (the sampling itself is ``igpt.sampling``).

    python -m igpt.generate checkpoint=<dir> prompt="..."                      # prints one response
    python -m igpt.generate checkpoint=<dir> input=<in.jsonl> output=<out.jsonl>
        [max_new_tokens=256] [temperature=0.8] [top_k=50] [top_p=1.0] [seed=0] [device=auto] [chat=auto]
        [system="..."] [batch_size=8]

Each input line is ``{"prompt": "..."}`` or ``{"messages": [{"role", "content"}, ...]}``; it is written back with
``"response"`` added. ``checkpoint=`` is an igpt checkpoint or run dir, or a Hugging Face model folder. Checkpoints
trained by SFT or a later stage (``meta.json`` "stage" is sft, rm, dpo or ppo) get the chat template of their
tokenizer (``igpt.data.chat.ChatFormat``, with the generation prompt), as does a Hugging Face folder whose tokenizer
has one; pretraining checkpoints continue raw text after the document start that begins every training document.
A missing, truncated or corrupt weights file is an error naming it.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

import torch

from igpt.cli import parse
from igpt.devices import resolve_device
from igpt.errors import IgptError
from igpt.model import Transformer
from igpt.sampling import Prompt, generate
from igpt.stages import CHAT_STAGES

log = logging.getLogger("igpt")


# ----------------------------------------------------------------------------------------------------------- loading
def load_checkpoint(path: str, device: str | torch.device = "cpu") -> tuple[Transformer, Any, dict[str, Any]]:
    """``(model, chat format, meta)`` from a checkpoint dir, a run dir or a Hugging Face model folder
    (``igpt.checkpoint.load_model``; the chat format also answers the tokenizer API)."""
    from igpt.checkpoint import load_model

    return load_model(path, device)


def is_chat_checkpoint(meta: dict[str, Any], tokenizer: Any = None) -> bool:
    """True when the checkpoint was trained with the chat template (SFT or a later stage); for an imported Hugging
    Face folder (no stage), when its tokenizer has a chat template (an instruct model)."""
    if meta.get("stage") is None and meta.get("hf_config") is not None:
        return bool(getattr(tokenizer, "has_template", False))
    return meta.get("stage") in CHAT_STAGES


# ----------------------------------------------------------------------------------------------------------- CLI
def resolve_chat(flag: str, meta: dict[str, Any], tokenizer: Any = None) -> bool:
    if flag not in ("auto", "true", "false"):
        raise ValueError(f"chat={flag!r}: expected auto, true or false")
    return is_chat_checkpoint(meta, tokenizer) if flag == "auto" else flag == "true"


SAMPLING_SPEC: dict[str, tuple[type, Any]] = {
    "checkpoint": (str, ...),
    "max_new_tokens": (int, 256),
    "temperature": (float, 0.8),
    "top_k": (int, 50),
    "top_p": (float, 1.0),
    "seed": (int, 0),
    "device": (str, "auto"),
    "chat": (str, "auto"),
    "system": (str, None),
}

GENERATE_SPEC: dict[str, tuple[type, Any]] = {
    **SAMPLING_SPEC,
    "prompt": (str, None),
    "input": (str, None),
    "output": (str, None),
    "batch_size": (int, 8),
}


def _read_jsonl(path: str) -> list[tuple[dict[str, Any], Prompt]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if isinstance(obj, dict) and isinstance(obj.get("prompt"), str):
                rows.append((obj, obj["prompt"]))
            elif isinstance(obj, dict) and _valid_messages(obj.get("messages")):
                rows.append((obj, obj["messages"]))
            else:
                raise ValueError(
                    f'{path}:{lineno}: expected {{"prompt": "..."}} or '
                    f'{{"messages": [{{"role": "system|user|assistant", "content": "..."}}, ...]}}'
                )
    return rows


def _valid_messages(messages: Any) -> bool:
    return (
        isinstance(messages, list)
        and len(messages) > 0
        and all(
            isinstance(m, dict)
            and m.get("role") in ("system", "user", "assistant")
            and isinstance(m.get("content"), str)
            for m in messages
        )
    )


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = parse(argv, GENERATE_SPEC, "igpt.generate", __doc__)
        if (args["prompt"] is None) == (args["input"] is None):
            raise ValueError('igpt.generate: give exactly one of prompt="..." or input=<in.jsonl> output=<out.jsonl>')
        if args["input"] is not None and args["output"] is None:
            raise ValueError("igpt.generate: input=<in.jsonl> needs output=<out.jsonl>")
        device = resolve_device(args["device"])
        rows = _read_jsonl(args["input"]) if args["input"] is not None else None
        model, tokenizer, meta = load_checkpoint(args["checkpoint"], device)
        chat = resolve_chat(args["chat"], meta, tokenizer)
    except (IgptError, ValueError, FileNotFoundError) as e:
        print(f"igpt.generate: error: {e}", file=sys.stderr)
        return 2
    sampling = {k: args[k] for k in ("max_new_tokens", "temperature", "top_k", "top_p", "seed", "system")}
    if rows is None:
        print(generate(model, tokenizer, [args["prompt"]], chat=chat, **sampling)[0])
        return 0
    responses = generate(model, tokenizer, [p for _, p in rows], chat=chat, batch_size=args["batch_size"], **sampling)
    os.makedirs(os.path.dirname(os.path.abspath(args["output"])), exist_ok=True)
    with open(args["output"], "w", encoding="utf-8") as f:
        for (obj, _), response in zip(rows, responses):
            f.write(json.dumps({**obj, "response": response}, ensure_ascii=False) + "\n")
    log.info("wrote %d responses to %s", len(rows), args["output"])
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    sys.exit(main())
