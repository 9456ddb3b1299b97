"""Interactive chat with a checkpoint in the terminal.

    python -m igpt.chat checkpoint=<dir> [system="..."] [temperature=0.8] [top_k=50] [top_p=1.0]
        [max_new_tokens=256] [seed=0] [device=auto]

Reads one user turn per line from stdin, keeps the conversation history, and streams the assistant's reply token by
token (KV-cache decoding from ``igpt.generate``). Commands: ``/reset`` clears the history (keeping the system prompt),
``/exit`` (or end of input) quits. When the conversation outgrows the model's context, the oldest turns are dropped.
Meant for SFT (or later) checkpoints; a pretraining checkpoint still runs but was never taught the chat format.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from typing import Any, TextIO

from igpt.cli import parse
from igpt.devices import resolve_device
from igpt.errors import IgptError
from igpt.generate import SAMPLING_SPEC, is_chat_checkpoint, load_checkpoint
from igpt.sampling import encode_prompt, generate_ids

log = logging.getLogger("igpt")


class _Streamer:
    """Print a response as its tokens arrive, holding back text that ends in a partial UTF-8 character."""

    def __init__(self, tokenizer: Any, out: TextIO) -> None:
        self.tokenizer, self.out = tokenizer, out
        self.ids: list[int] = []
        self.printed = 0

    def __call__(self, row: int, token: int) -> None:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if not text.endswith("\ufffd"):
            self.out.write(text[self.printed :])
            self.out.flush()
            self.printed = len(text)

    def finish(self) -> str:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        self.out.write(text[self.printed :] + "\n")
        self.out.flush()
        return text


def _fit(tokenizer: Any, history: list[dict[str, str]], budget: int) -> list[int]:
    """Encode ``history`` with the generation prompt, dropping the oldest non-system turns until it fits ``budget``."""
    msgs = list(history)
    while True:
        ids = encode_prompt(tokenizer, msgs, chat=True)
        first = 1 if msgs and msgs[0]["role"] == "system" else 0
        if len(ids) <= budget or len(msgs) - first <= 1:
            return ids
        del msgs[first]


def main(argv: Sequence[str] | None = None, stdin: TextIO | None = None, stdout: TextIO | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    try:
        args = parse(argv, {k: v for k, v in SAMPLING_SPEC.items() if k != "chat"}, "igpt.chat", __doc__)
        model, tokenizer, meta = load_checkpoint(args["checkpoint"], resolve_device(args["device"]))
    except (IgptError, ValueError, FileNotFoundError) as e:
        print(f"igpt.chat: error: {e}", file=sys.stderr)
        return 2
    if not is_chat_checkpoint(meta, tokenizer):
        log.warning("checkpoint stage is %r: it was not trained on the chat format", meta.get("stage"))
    system = [{"role": "system", "content": args["system"]}] if args["system"] else []
    history = list(system)
    stop_ids = tokenizer.stop_ids
    budget = max(1, model.cfg.max_seq_len - args["max_new_tokens"])
    interactive = stdin.isatty()
    stdout.write("igpt chat: /reset clears the conversation, /exit quits\n")
    turn = 0
    while True:
        if interactive:
            stdout.write("> ")
            stdout.flush()
        line = stdin.readline()
        if not line:
            break
        text = line.strip()
        if text == "/exit":
            break
        if text == "/reset":
            history = list(system)
            stdout.write("(conversation cleared)\n")
            continue
        if not text:
            continue
        history.append({"role": "user", "content": text})
        ids = _fit(tokenizer, history, budget)
        streamer = _Streamer(tokenizer, stdout)
        stdout.write("assistant: ")
        generate_ids(
            model,
            [ids],
            max_new_tokens=args["max_new_tokens"],
            temperature=args["temperature"],
            top_k=args["top_k"],
            top_p=args["top_p"],
            seed=args["seed"] + turn,
            stop_ids=stop_ids,
            pad_id=tokenizer.pad_id,
            stream=streamer,
        )
        history.append({"role": "assistant", "content": streamer.finish()})
        turn += 1
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    sys.exit(main())
