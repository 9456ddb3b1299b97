"""Input formats of igpt's data tools: text files, JSONL records (chat, Alpaca, preference pairs), key=value arguments.

Text decoding policy (used by the tokenizer trainer and ``prepare``): files are decoded with the given codec
(``utf-8`` by default) in strict mode, so invalid bytes are an error naming the file and byte offset instead of being
silently replaced; pass ``encoding=latin-1`` (or any Python codec) for legacy files. A leading byte-order mark is
dropped. Nothing else is changed: no newline or Unicode normalisation, so byte counts and round trips are exact.

Record formats (one JSON object per line, blank lines skipped):
- chat (kind=sft): ``{"messages": [{"role": "system|user|assistant", "content": "..."}, ...]}``, or Alpaca
  ``{"instruction", "input", "output"}`` (Stanford Alpaca): user = instruction + ("\\n\\n" + input if input),
  assistant = output.
- preference (kind=pref): ``{"prompt": "..." | "messages": [...], "chosen": ..., "rejected": ...[, "margin": x]}``
  where chosen and rejected are the assistant reply as a string, or a list of messages continuing the prompt (the
  conversational format of TRL's preference datasets); or K-wise, as InstructGPT's labelers ranked K responses,
  ``{"prompt" | "messages", "responses": [...], "ranking": [...]}`` with ``ranking[i]`` the rank of ``responses[i]``
  (0 = best; equal ranks are ties).
- prompt (kind=prompt, PPO): ``{"prompt": "..." | [...messages]}`` or ``{"messages": [...]}`` ending in a user turn;
  every other field (a reference answer, say) is kept for the reward functions.
"""

from __future__ import annotations

import glob
import json
import os
import sys
import types
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Union, get_args, get_origin, get_type_hints

from igpt.data.chat import Message, validate_messages

BOM = "\ufeff"


# ---------------------------------------------------------------------------------------------------------- text files
def decode_bytes(data: bytes, where: str, encoding: str = "utf-8", offset: int = 0) -> str:
    """Decode strictly; a ``UnicodeDecodeError`` becomes a ValueError naming ``where`` and the byte offset."""
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as e:
        bad = data[e.start : e.start + 4]
        raise ValueError(
            f"{where}: invalid {encoding} at byte offset {offset + e.start} ({e.reason}, bytes {bad!r}); "
            f"pass encoding=latin-1 (or the file's real codec) to read it"
        ) from None
    except LookupError:
        raise ValueError(
            f"unknown encoding {encoding!r}: expected a Python codec name such as utf-8 or latin-1"
        ) from None
    return text[1:] if text.startswith(BOM) else text


def read_text(path: str, encoding: str = "utf-8") -> str:
    """Read a whole text file with the decoding policy above."""
    with open(path, "rb") as f:
        return decode_bytes(f.read(), path, encoding)


def expand_inputs(spec: str | Sequence[str]) -> list[str]:
    """Files named by a glob, a comma-separated list of globs/paths, or a list of them; sorted per glob, deduplicated.

    ValueError when an item matches nothing or names a directory, so a typo never silently drops data.
    """
    items = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else [str(s) for s in spec]
    items = [s for s in items if s]
    if not items:
        raise ValueError("input is empty: expected a file, a glob such as 'data/*.txt' or a comma-separated list")
    files: list[str] = []
    seen = set()
    for item in items:
        pattern = os.path.expanduser(item)
        matches = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
        matches = [m for m in matches if not (glob.has_magic(pattern) and os.path.isdir(m))]
        if not matches or not os.path.exists(matches[0]):
            raise ValueError(f"input {item!r}: no files match")
        for m in matches:
            if os.path.isdir(m):
                raise ValueError(f"input {item!r} is a directory: name its files with a glob such as '{m}/*.txt'")
            if m not in seen:
                seen.add(m)
                files.append(m)
    return files


def split_documents(text: str, separator: str | None) -> list[str]:
    """A file's documents: the whole text, or the pieces between ``separator``; empty or blank pieces dropped."""
    pieces = text.split(separator) if separator else [text]
    return [p for p in pieces if p.strip()]


def chunk_text(text: str, max_chars: int) -> list[str]:
    """Cut ``text`` into pieces of at most about ``max_chars`` characters whose concatenation is ``text``.

    Cuts go after a blank line (a paragraph end) when one lies in the second half of the window, else after a
    newline, else after a space, else at the window's end. ``max_chars <= 0`` keeps the text whole.
    """
    if max_chars <= 0 or len(text) <= max_chars:
        return [text]
    out, start, n = [], 0, len(text)
    while n - start > max_chars:
        lo, hi = start + max_chars // 2, start + max_chars
        cut = -1
        for sep in ("\n\n", "\n", " "):
            i = text.rfind(sep, lo, hi)
            if i >= 0:
                cut = i + len(sep)
                while cut < n and text[cut] == "\n" and sep != " ":  # keep a run of blank lines together
                    cut += 1
                break
        if cut < 0:
            cut = hi
        out.append(text[start:cut])
        start = cut
    if start < n:
        out.append(text[start:])
    return out


# ------------------------------------------------------------------------------------------------------- JSONL records
def iter_jsonl_lines(path: str, encoding: str = "utf-8") -> Iterator[tuple[str, str]]:
    """Yield ``("file:line", text)`` for every non-blank line; invalid bytes name the file, line and byte offset."""
    with open(path, "rb") as f:
        offset = 0
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            line = decode_bytes(raw, where, encoding, offset)
            offset += len(raw)
            if line.strip():
                yield where, line


def load_record(line: str, where: str) -> dict[str, Any]:
    """Parse one JSONL line into a dict; ValueError naming ``where`` otherwise."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{where}: invalid JSON ({e.msg} at column {e.colno}); expected one JSON object per line"
        ) from None
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _require_str(obj: dict[str, Any], key: str, where: str, optional: bool = False) -> str:
    if key not in obj or obj[key] is None:
        if optional:
            return ""
        raise ValueError(f"{where}: missing key {key!r}")
    value = obj[key]
    if not isinstance(value, str):
        raise ValueError(f"{where}: {key!r} must be a string, got {type(value).__name__}")
    return value


def parse_sft_record(obj: dict[str, Any], where: str) -> list[Message]:
    """A chat record or an Alpaca record -> validated messages with at least one assistant turn."""
    if "messages" in obj:
        messages = validate_messages(obj["messages"], f"{where}: messages")
    elif "instruction" in obj or "output" in obj:
        instruction = _require_str(obj, "instruction", where)
        extra = _require_str(obj, "input", where, optional=True)
        output = _require_str(obj, "output", where)
        user = instruction + ("\n\n" + extra if extra else "")
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    else:
        raise ValueError(
            f"{where}: expected a 'messages' list or Alpaca keys 'instruction', 'input', 'output'; "
            f"got keys {sorted(obj)}"
        )
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError(f"{where}: no assistant message: an SFT record needs a reply to learn")
    return messages


def _response(value: Any, key: str, where: str) -> list[Message]:
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    if isinstance(value, list):
        messages = validate_messages(value, f"{where}: {key}")
        if not any(m["role"] == "assistant" for m in messages):
            raise ValueError(f"{where}: {key} has no assistant message")
        return messages
    raise ValueError(f"{where}: {key!r} must be a string or a list of messages, got {type(value).__name__}")


def _prompt_messages(obj: dict[str, Any], where: str) -> list[Message]:
    """The prompt of a preference or prompt record: ``"prompt"`` (a string or messages) or ``"messages"``."""
    if "prompt" in obj:
        prompt = obj["prompt"]
        if isinstance(prompt, str):
            return [{"role": "user", "content": prompt}]
        if isinstance(prompt, list):
            return validate_messages(prompt, f"{where}: prompt")
        raise ValueError(f"{where}: 'prompt' must be a string or a list of messages, got {type(prompt).__name__}")
    if "messages" in obj:
        return validate_messages(obj["messages"], f"{where}: messages")
    raise ValueError(f"{where}: missing key 'prompt' (or 'messages'); the record needs a prompt")


@dataclass
class PrefRecord:
    prompt: list[Message]
    responses: list[list[Message]]  # K >= 2 continuations of the prompt
    ranking: list[int]  # rank of each response: 0 = best, equal = tie
    margin: float = 0.0  # Bradley-Terry margin of a chosen/rejected pair


def parse_pref_record(obj: dict[str, Any], where: str) -> PrefRecord:
    """A preference record (a chosen/rejected pair, or K ranked responses) -> :class:`PrefRecord`."""
    prompt = _prompt_messages(obj, where)
    if "responses" in obj or "ranking" in obj:
        for key in ("responses", "ranking"):
            if not isinstance(obj.get(key), list):
                raise ValueError(f"{where}: a K-wise record needs {key!r} as a list (responses and their ranks)")
        responses, ranking = obj["responses"], obj["ranking"]
        if len(responses) < 2 or len(ranking) != len(responses):
            raise ValueError(
                f"{where}: expected at least 2 responses and one rank per response, got {len(responses)} responses "
                f"and {len(ranking)} ranks"
            )
        if not all(isinstance(r, int) and not isinstance(r, bool) and r >= 0 for r in ranking):
            raise ValueError(f"{where}: ranking must hold integers >= 0 (0 = best), got {ranking}")
        if len(set(ranking)) < 2:
            raise ValueError(f"{where}: every response has the same rank {ranking[0]}: no comparison to learn from")
        if "margin" in obj:
            raise ValueError(f"{where}: 'margin' applies to chosen/rejected pairs, not to K-wise rankings")
        parsed = [_response(r, f"responses[{i}]", where) for i, r in enumerate(responses)]
        return PrefRecord(prompt, parsed, list(ranking))
    for key in ("chosen", "rejected"):
        if key not in obj:
            raise ValueError(f"{where}: missing key {key!r} (or 'responses' and 'ranking' for a K-wise record)")
    margin = obj.get("margin", 0.0)
    if isinstance(margin, bool) or not isinstance(margin, (int, float)):
        raise ValueError(f"{where}: 'margin' must be a number, got {type(margin).__name__}")
    chosen, rejected = _response(obj["chosen"], "chosen", where), _response(obj["rejected"], "rejected", where)
    return PrefRecord(prompt, [chosen, rejected], [0, 1], float(margin))


def parse_prompt_record(obj: dict[str, Any], where: str) -> list[Message]:
    """A prompt record -> the messages to sample a response to (they must end with a user turn)."""
    messages = _prompt_messages(obj, where)
    if messages[-1]["role"] != "user":
        raise ValueError(
            f"{where}: the prompt ends with a {messages[-1]['role']} turn; a prompt for sampling ends with a user turn"
        )
    return messages


# ------------------------------------------------------------------------------------------------- key=value arguments
_TRUE, _FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}


def _convert(key: str, value: str, hint: Any) -> Any:
    if get_origin(hint) in (Union, types.UnionType):  # X | None, or str | Sequence[str]
        if value.lower() in {"null", "none", "~"}:
            return None
        hint = next(a for a in get_args(hint) if a is not type(None))
    try:
        if hint is bool:
            if value.lower() in _TRUE:
                return True
            if value.lower() in _FALSE:
                return False
            raise ValueError
        if hint is int:
            return int(value.replace("_", ""))
        if hint is float:
            return float(value)
    except ValueError:
        raise SystemExit(f"error: {key}={value!r}: expected {getattr(hint, '__name__', hint)}") from None
    return value


def parse_args(
    argv: Sequence[str], func: Any, prog: str, required: Sequence[str] = (), doc: str | None = None
) -> dict[str, Any]:
    """Parse Hydra-style ``key=value`` arguments against ``func``'s keyword parameters (their type hints convert).

    Unknown keys, missing required keys and bad values exit with a message naming the key; ``--help`` prints usage
    and ``doc`` (default: ``func``'s docstring).
    """
    import inspect

    params = {n: p for n, p in inspect.signature(func).parameters.items() if n != "self"}
    hints = get_type_hints(func)
    usage = f"usage: python -m {prog} " + " ".join(
        f"{n}=<{n}>" if n in required else f"[{n}={p.default!r}]" for n, p in params.items() if n not in ("progress",)
    )
    out: dict[str, Any] = {}
    for arg in argv:
        if arg in ("-h", "--help"):
            print(usage + "\n\n" + (doc or func.__doc__ or ""))
            raise SystemExit(0)
        key, eq, value = arg.partition("=")
        key = key.lstrip("+")
        if not eq:
            raise SystemExit(f"error: argument {arg!r} is not key=value\n{usage}")
        if key not in params:
            raise SystemExit(f"error: unknown key {key!r}; expected one of {', '.join(params)}\n{usage}")
        out[key] = _convert(key, value, hints.get(key, str))
    missing = [k for k in required if k not in out]
    if missing:
        raise SystemExit(f"error: missing {', '.join(f'{k}=<value>' for k in missing)}\n{usage}")
    return out


def unescape(value: str) -> str:
    r"""Turn the escapes ``\n``, ``\t``, ``\r`` and ``\\`` typed on a command line into their characters."""
    out, i = [], 0
    table = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}
    while i < len(value):
        c = value[i]
        if c == "\\" and i + 1 < len(value) and value[i + 1] in table:
            out.append(table[value[i + 1]])
            i += 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


def fail(prog: str, error: Exception) -> None:
    """Print a user error without a traceback and exit 1."""
    print(f"{prog}: error: {error}", file=sys.stderr)
    raise SystemExit(1)
