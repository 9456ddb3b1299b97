"""Input formats of igpt's data tools: text files, records (JSONL, parquet, ``datasets`` folders), key=value arguments.

Text decoding policy (used by the tokenizer trainer and ``prepare``): files are decoded with the given codec
(``utf-8`` by default) in strict mode, so invalid bytes are an error naming the file and byte offset instead of being
silently replaced; pass ``encoding=latin-1`` (or any Python codec) for legacy files. A leading byte-order mark is
dropped. Nothing else is changed: no newline or Unicode normalisation, so byte counts and round trips are exact.

Large text files are read in blocks (``iter_text_chunks``): memory stays bounded whatever the file size, and the
chunks equal those of reading the whole file.

Records come one JSON object per line (``.jsonl``/``.json``, blank lines skipped), or as rows of a parquet file
(``.parquet``) or of a Hugging Face ``datasets`` folder written by ``save_to_disk`` (read through the optional
``pyarrow`` and ``datasets`` packages, one batch of rows at a time: ``iter_records``). Their shapes:
- text (kind=text, from records): ``{"text": "..."}``, one document per record (``text_field`` names the column).
- chat (kind=sft): ``{"messages": [{"role": "system|user|assistant", "content": "..."}, ...]}`` (``messages_field``
  names the column); ShareGPT ``{"conversations": [{"from": "system|human|gpt", "value": "..."}, ...]}``;
  prompt/completion pairs ``{"prompt": ..., "completion": ...}`` (TRL's format: each a string, or messages); or
  Alpaca ``{"instruction", "input", "output"}`` (Stanford Alpaca): user = instruction + ("\\n\\n" + input if
  input), assistant = output.
- preference (kind=pref): ``{"prompt": "..." | "messages": [...], "chosen": ..., "rejected": ...[, "margin": x]}``
  where chosen and rejected are the assistant reply as a string, or a list of messages continuing the prompt (the
  conversational format of TRL's preference datasets); or K-wise, as InstructGPT's labelers ranked K responses,
  ``{"prompt" | "messages", "responses": [...], "ranking": [...]}`` with ``ranking[i]`` the rank of ``responses[i]``
  (0 = best; equal ranks are ties).
- unpaired (kind=kto, KTO): ``{"prompt" | "messages", "completion": ..., "label": true | false}``, the completion a
  string or messages continuing the prompt, ``label`` whether it is desirable (TRL's unpaired preference format).
- prompt (kind=prompt, PPO): ``{"prompt": "..." | [...messages]}`` or ``{"messages": [...]}`` ending in a user turn;
  every other field (a reference answer, say) is kept for the reward functions.
"""

from __future__ import annotations

import codecs
import glob
import json
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from igpt.data.chat import Message, validate_messages
from igpt.errors import require

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


def is_dataset_dir(path: str) -> bool:
    """A folder written by ``datasets``' ``save_to_disk`` (a Dataset, or a DatasetDict of them)."""
    return os.path.isdir(path) and any(
        os.path.exists(os.path.join(path, f)) for f in ("state.json", "dataset_info.json", "dataset_dict.json")
    )


def expand_inputs(spec: str | Sequence[str]) -> list[str]:
    """Files named by a glob, a comma-separated list of globs/paths, or a list of them; sorted per glob, deduplicated.
    A ``datasets`` folder (``save_to_disk``) counts as one input.

    ValueError when an item matches nothing or names another directory, so a typo never silently drops data.
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
        matches = [m for m in matches if not (glob.has_magic(pattern) and os.path.isdir(m) and not is_dataset_dir(m))]
        if not matches or not os.path.exists(matches[0]):
            raise ValueError(f"input {item!r}: no files match")
        for m in matches:
            if os.path.isdir(m) and not is_dataset_dir(m):
                raise ValueError(f"input {item!r} is a directory: name its files with a glob such as '{m}/*.txt'")
            if m not in seen:
                seen.add(m)
                files.append(m)
    return files


def split_documents(text: str, separator: str | None) -> list[str]:
    """A file's documents: the whole text, or the pieces between ``separator``; empty or blank pieces dropped."""
    pieces = text.split(separator) if separator else [text]
    return [p for p in pieces if p.strip()]


def _next_cut(text: str, start: int, max_chars: int) -> int:
    """Where the chunk starting at ``start`` ends (``chunk_text``'s rule); reads ``text`` up to the end of a run of
    newlines after the cut."""
    n = len(text)
    lo, hi = start + max_chars // 2, start + max_chars
    for sep in ("\n\n", "\n", " "):
        i = text.rfind(sep, lo, hi)
        if i >= 0:
            cut = i + len(sep)
            while cut < n and text[cut] == "\n" and sep != " ":  # keep a run of blank lines together
                cut += 1
            return cut
    return hi


def chunk_text(text: str, max_chars: int) -> list[str]:
    """Cut ``text`` into pieces of at most about ``max_chars`` characters whose concatenation is ``text``.

    Cuts go after a blank line (a paragraph end) when one lies in the second half of the window, else after a
    newline, else after a space, else at the window's end. ``max_chars <= 0`` keeps the text whole.
    """
    if max_chars <= 0 or len(text) <= max_chars:
        return [text]
    out, start, n = [], 0, len(text)
    while n - start > max_chars:
        cut = _next_cut(text, start, max_chars)
        out.append(text[start:cut])
        start = cut
    if start < n:
        out.append(text[start:])
    return out


def _decoded_blocks(path: str, encoding: str, block: int) -> Iterator[str]:
    """A file's text, decoded strictly in blocks of ``block`` bytes (errors name the file and byte offset)."""
    try:
        decoder = codecs.getincrementaldecoder(encoding)(errors="strict")
    except LookupError:
        raise ValueError(
            f"unknown encoding {encoding!r}: expected a Python codec name such as utf-8 or latin-1"
        ) from None
    offset, first = 0, True
    with open(path, "rb") as f:
        while True:
            data = f.read(block)
            pending = len(decoder.getstate()[0])
            try:
                text = decoder.decode(data, final=not data)
            except UnicodeDecodeError as e:  # e.start counts from the bytes the decoder still held
                bad = e.object[e.start : e.start + 4]
                raise ValueError(
                    f"{path}: invalid {encoding} at byte offset {offset - pending + e.start} ({e.reason}, bytes "
                    f"{bytes(bad)!r}); pass encoding=latin-1 (or the file's real codec) to read it"
                ) from None
            offset += len(data)
            if first and text:
                text, first = (text[1:] if text.startswith(BOM) else text), False
            if text:
                yield text
            if not data:
                return


def iter_text_chunks(
    path: str, encoding: str, separator: str | None, max_chars: int, block: int = 1 << 22
) -> Iterator[str]:
    """The chunks of a text file's documents, reading it in blocks of ``block`` bytes: the same pieces as
    ``chunk_text`` over ``split_documents(read_text(path), separator)``, in memory bounded by the block and the chunk
    size (a document is cut as soon as enough of it has been read to know where)."""
    sep_len = len(separator) if separator else 0
    buf, searched, emitted = "", 0, False  # the current document's unread text; how far it was searched; cut yet?

    def finish(doc: str, emitted: bool) -> Iterator[str]:
        if emitted:
            yield from (chunk_text(doc, max_chars) if doc else [])
        elif doc.strip():
            yield from chunk_text(doc, max_chars)

    for text in _decoded_blocks(path, encoding, block):
        buf += text
        while separator:
            i = buf.find(separator, max(0, searched - sep_len + 1))
            if i < 0:
                searched = len(buf)
                break
            yield from finish(buf[:i], emitted)
            buf, searched, emitted = buf[i + sep_len :], 0, False
        # cut the open document where chunk_text would, while what follows the cut is surely read
        while max_chars > 0 and len(buf) > max_chars + sep_len and (emitted or buf[:max_chars].strip()):
            cut = _next_cut(buf, 0, max_chars)
            if cut >= len(buf) - sep_len:  # the newline run after the cut, or a separator, may go on past the buffer
                break
            yield buf[:cut]
            buf, searched, emitted = buf[cut:], max(0, searched - cut), True
    yield from finish(buf, emitted)


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


SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def as_messages(value: Any, where: str) -> list[Message]:
    """A message list in the OpenAI form (``role``/``content``) or ShareGPT's (``from``/``value``: system, human,
    gpt), validated."""
    if isinstance(value, (list, tuple)) and value and all(isinstance(m, dict) and "from" in m for m in value):
        out = []
        for i, m in enumerate(value):
            if m["from"] not in SHAREGPT_ROLES:
                raise ValueError(
                    f"{where}[{i}]: ShareGPT 'from' {m['from']!r} is not one of {', '.join(map(repr, SHAREGPT_ROLES))}"
                )
            out.append({"role": SHAREGPT_ROLES[m["from"]], "content": m.get("value")})
        value = out
    return validate_messages(value, where)


def parse_text_record(obj: dict[str, Any], where: str, text_field: str = "text") -> str:
    """A pretraining record -> its document (the ``text_field`` column)."""
    if text_field not in obj:
        raise ValueError(f"{where}: no {text_field!r} field (it has {sorted(obj)}); pass text_field=<the text column>")
    text = obj[text_field]
    if not isinstance(text, str):
        raise ValueError(f"{where}: {text_field!r} must be a string, got {type(text).__name__}")
    return text


def parse_sft_record(obj: dict[str, Any], where: str, messages_field: str = "messages") -> list[Message]:
    """A chat, ShareGPT, prompt/completion or Alpaca record -> validated messages with at least one assistant turn."""
    if messages_field in obj or (messages_field == "messages" and "conversations" in obj):
        key = messages_field if messages_field in obj else "conversations"
        messages = as_messages(obj[key], f"{where}: {key}")
    elif "prompt" in obj and "completion" in obj:
        prompt = _prompt_messages(obj, where, messages_field)
        messages = prompt + _response(obj["completion"], "completion", where)
    elif "instruction" in obj or "output" in obj:
        instruction = _require_str(obj, "instruction", where)
        extra = _require_str(obj, "input", where, optional=True)
        output = _require_str(obj, "output", where)
        user = instruction + ("\n\n" + extra if extra else "")
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    else:
        raise ValueError(
            f"{where}: expected a {messages_field!r} list, ShareGPT 'conversations', 'prompt' and 'completion', or "
            f"Alpaca keys 'instruction', 'input', 'output'; got keys {sorted(obj)}"
        )
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError(f"{where}: no assistant message: an SFT record needs a reply to learn")
    return messages


def _response(value: Any, key: str, where: str) -> list[Message]:
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    if isinstance(value, list):
        messages = as_messages(value, f"{where}: {key}")
        if not any(m["role"] == "assistant" for m in messages):
            raise ValueError(f"{where}: {key} has no assistant message")
        return messages
    raise ValueError(f"{where}: {key!r} must be a string or a list of messages, got {type(value).__name__}")


def _prompt_messages(obj: dict[str, Any], where: str, messages_field: str = "messages") -> list[Message]:
    """The prompt of a preference or prompt record: ``"prompt"`` (a string or messages) or ``messages_field``."""
    if "prompt" in obj:
        prompt = obj["prompt"]
        if isinstance(prompt, str):
            return [{"role": "user", "content": prompt}]
        if isinstance(prompt, list):
            return as_messages(prompt, f"{where}: prompt")
        raise ValueError(f"{where}: 'prompt' must be a string or a list of messages, got {type(prompt).__name__}")
    if messages_field in obj:
        return as_messages(obj[messages_field], f"{where}: {messages_field}")
    raise ValueError(f"{where}: missing key 'prompt' (or {messages_field!r}); the record needs a prompt")


@dataclass
class PrefRecord:
    prompt: list[Message]
    responses: list[list[Message]]  # K >= 2 continuations of the prompt
    ranking: list[int]  # rank of each response: 0 = best, equal = tie
    margin: float = 0.0  # Bradley-Terry margin of a chosen/rejected pair


def parse_pref_record(obj: dict[str, Any], where: str, messages_field: str = "messages") -> PrefRecord:
    """A preference record (a chosen/rejected pair, or K ranked responses) -> :class:`PrefRecord`."""
    prompt = _prompt_messages(obj, where, messages_field)
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


def parse_kto_record(obj: dict[str, Any], where: str, messages_field: str = "messages") -> PrefRecord:
    """An unpaired KTO example ``{"prompt" | "messages", "completion", "label": true | false}`` -> a
    :class:`PrefRecord` with one response, ranked 0 (desirable) or 1 (undesirable)."""
    from igpt.errors import DataError

    prompt = _prompt_messages(obj, where, messages_field)
    for key in ("completion", "label"):
        if key not in obj:
            raise DataError(f"{where}: missing key {key!r}; a kind=kto record is {{\"prompt\" (or "
                            f"{messages_field!r}), \"completion\", \"label\": true|false}}")
    if not isinstance(obj["label"], bool):
        raise DataError(f"{where}: 'label' must be true (a desirable completion) or false, got {obj['label']!r}")
    return PrefRecord(prompt, [_response(obj["completion"], "completion", where)], [0 if obj["label"] else 1])


def parse_prompt_record(obj: dict[str, Any], where: str, messages_field: str = "messages") -> list[Message]:
    """A prompt record -> the messages to sample a response to (they must end with a user turn)."""
    messages = _prompt_messages(obj, where, messages_field)
    if messages[-1]["role"] != "user":
        raise ValueError(
            f"{where}: the prompt ends with a {messages[-1]['role']} turn; a prompt for sampling ends with a user turn"
        )
    return messages


RECORD_SUFFIXES = (".jsonl", ".json")
TABLE_ROWS = 1024  # rows per batch read from a parquet file or a datasets folder


def input_type(path: str) -> str:
    """``"jsonl"``, ``"parquet"``, ``"dataset"`` (a ``save_to_disk`` folder) or ``"text"`` (anything else)."""
    if is_dataset_dir(path):
        return "dataset"
    if path.endswith(".parquet"):
        return "parquet"
    return "jsonl" if path.endswith(RECORD_SUFFIXES) else "text"


def iter_records(path: str, encoding: str = "utf-8", columns: Sequence[str] | None = None) -> Iterator[tuple[str, Any]]:
    """``(where, record)`` for every record of a JSONL file (the raw line: workers parse it), a parquet file or a
    ``datasets`` folder (a dict per row; ``columns`` limits what is read), a batch of rows at a time."""
    kind = input_type(path)
    if kind == "jsonl":
        yield from iter_jsonl_lines(path, encoding)
        return
    if kind == "text":
        raise ValueError(f"{path}: expected records (.jsonl, .parquet or a datasets folder), got a text file")
    if kind == "parquet":
        pq = require("pyarrow.parquet", "data", f"{path}: reading parquet")
        try:
            table = pq.ParquetFile(path)
            names = table.schema_arrow.names
            batches = table.iter_batches(batch_size=TABLE_ROWS, columns=_columns(path, names, columns))
        except Exception as e:  # pyarrow's ArrowInvalid and friends
            raise ValueError(f"{path}: not a readable parquet file ({e})") from None
    else:
        datasets = require("datasets", "data", f"{path}: reading a datasets folder")
        ds = datasets.load_from_disk(path)
        if isinstance(ds, datasets.DatasetDict):
            raise ValueError(
                f"{path} holds the splits {sorted(ds)} (a DatasetDict): name one, e.g. {path}/{next(iter(ds))}"
            )
        names = ds.column_names
        wanted = _columns(path, names, columns)
        batches = (b for b in (ds.select_columns(wanted) if wanted else ds).with_format("arrow").iter(TABLE_ROWS))
    i = 0
    for batch in batches:
        for row in batch.to_pylist():
            yield f"{path}[{i}]", row
            i += 1


def _columns(path: str, names: Sequence[str], wanted: Sequence[str] | None) -> list[str] | None:
    if wanted is None:
        return None
    missing = [c for c in wanted if c not in names]
    if missing:
        raise ValueError(f"{path}: no column {missing[0]!r} (it has {list(names)}); pass text_field=<the text column>")
    return list(wanted)


# ------------------------------------------------------------------------------------------------- key=value arguments
def parse_args(
    argv: Sequence[str], func: Any, prog: str, required: Sequence[str] = (), doc: str | None = None
) -> dict[str, Any]:
    """Parse ``key=value`` arguments against ``func``'s keyword parameters with :func:`igpt.cli.parse` (their type
    hints convert; ``--help`` lists every key with its default, then ``doc``, default ``func``'s docstring).

    Unknown keys, missing required keys and bad values exit with a message naming the key, and the usage line.
    Returns only the keys given (the function's defaults apply to the rest).
    """
    from igpt.cli import parse, spec_of, usage
    from igpt.errors import ConfigError

    spec = spec_of(func, required)
    given = {a.partition("=")[0].lstrip("+") for a in argv}
    try:
        args = parse(argv, spec, prog, doc or func.__doc__ or "")
    except ConfigError as e:
        raise SystemExit(f"error: {e}\n{usage(prog, spec).splitlines()[0]}") from None
    return {k: v for k, v in args.items() if k in given}


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
