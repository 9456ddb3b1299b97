"""Train, load and measure igpt's tokenizer: a byte-level BPE built with Hugging Face ``tokenizers``.

Byte-level BPE as in GPT-2 (Radford et al. 2019): text is mapped to its UTF-8 bytes, pre-split with GPT-2's regex and
merged with BPE, so any string encodes without unknown tokens and, with no normalizer, decodes back exactly. igpt's
special tokens (``igpt.data.chat.SPECIAL_TOKENS``) get ids 0..6 in order. Any other Hugging Face ``tokenizer.json``
loads too (``load_tokenizer``); its chat format is ``igpt.data.chat.ChatFormat``.

    python -m igpt.data.tokenizer input=<glob or comma list> vocab_size=<n> output=<file.json>
        [encoding=utf-8] [min_frequency=2] [chunk_bytes=1048576]

Input files are decoded with ``encoding`` (default utf-8) strictly: an invalid byte is an error naming the file and
byte offset, unless another codec such as ``encoding=latin-1`` is given (see ``igpt.data.formats``).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm.auto import tqdm

from igpt.data.chat import SPECIAL_TOKENS
from igpt.data.formats import chunk_text, expand_inputs, fail, parse_args, read_text
from igpt.errors import IgptError

if TYPE_CHECKING:
    import torch

MIN_VOCAB = 256 + len(SPECIAL_TOKENS)  # the byte alphabet plus the special tokens


def new_tokenizer() -> Tokenizer:
    """An untrained byte-level BPE tokenizer (ByteLevel pre-tokenizer and decoder, no normalizer)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok


def _texts(files: Sequence[str], encoding: str, chunk_bytes: int, progress: bool) -> Iterator[str]:
    total = sum(os.path.getsize(f) for f in files)
    with tqdm(total=total, unit="B", unit_scale=True, desc="reading", disable=not progress) as bar:
        for path in files:
            # Long files are cut at paragraph ends so the trainer sees bounded strings; BPE counts are unaffected
            # except at the cut, where a cut never splits a word.
            yield from chunk_text(read_text(path, encoding), chunk_bytes)
            bar.update(os.path.getsize(path))


def train_tokenizer(
    input: str | Sequence[str],
    vocab_size: int,
    output: str | None = None,
    encoding: str = "utf-8",
    min_frequency: int = 2,
    chunk_bytes: int = 1 << 20,
    progress: bool = True,
) -> Tokenizer:
    """Train a byte-level BPE tokenizer of ``vocab_size`` tokens (special tokens included) on the input files.

    ``input`` is a glob, a comma-separated list or a list of paths. Writes the tokenizer to ``output`` when given.
    The result may hold fewer than ``vocab_size`` tokens when the text has too few distinct pairs to merge.
    """
    if vocab_size < MIN_VOCAB:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: it must hold the 256 bytes and "
            f"{len(SPECIAL_TOKENS)} special tokens, so at least {MIN_VOCAB}"
        )
    files = expand_inputs(input)
    tok = new_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=progress,
    )
    chars = 0

    def texts() -> Iterator[str]:
        nonlocal chars
        for t in _texts(files, encoding, chunk_bytes, progress):
            chars += len(t.strip())
            yield t

    tok.train_from_iterator(texts(), trainer=trainer)
    if not chars:
        raise ValueError(f"input {input!r}: the {len(files)} file(s) hold no text to train on")
    for i, s in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(s) == i, f"special token {s} got id {tok.token_to_id(s)}, expected {i}"
    if output:
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
        tmp = f"{output}.tmp{os.getpid()}"
        tok.save(tmp, pretty=True)
        os.replace(tmp, output)
    return tok


def resolve_tokenizer_path(path: str) -> str:
    """``path`` itself, or ``path/tokenizer.json`` for a directory (a Hugging Face model folder or prepared data)."""
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tokenizer {path!r} does not exist (expected a tokenizer.json file)")
    return path


def load_tokenizer(path: str) -> Tokenizer:
    """Load any Hugging Face ``tokenizer.json`` (or a folder holding one); ValueError naming a malformed file.

    Its chat format (template, special and stop tokens) is ``igpt.data.chat.ChatFormat.load(path)``.
    """
    path = resolve_tokenizer_path(path)
    try:
        return Tokenizer.from_file(path)
    except Exception as e:  # the Rust side raises plain Exception on malformed files
        raise ValueError(f"{path}: not a Hugging Face tokenizers file ({e})") from None


def vocab_size(tokenizer: Tokenizer) -> int:
    """Number of ids the model must embed: one more than the largest id, added tokens included."""
    return max(tokenizer.get_vocab(with_added_tokens=True).values()) + 1


def token_bytes(tokenizer: Tokenizer) -> torch.Tensor:
    """UTF-8 byte length of every token's text as a LongTensor ``(V,)``; special tokens count 0.

    Used for bits per byte: summing it over a text's non-special tokens gives the text's UTF-8 length. For byte-level
    tokenizers each vocabulary symbol stands for one byte; otherwise each token is decoded on its own (exact for
    byte-fallback vocabularies, approximate where a decoder drops a leading space marker).
    """
    import torch

    from igpt.data.chat import ChatFormat

    vocab = tokenizer.get_vocab(with_added_tokens=True)
    added = tokenizer.get_added_tokens_decoder()
    special = ChatFormat.of(tokenizer).special_id_set
    decoder = json.loads(tokenizer.to_str()).get("decoder") or {}
    byte_level = decoder.get("type") == "ByteLevel"
    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    out = torch.zeros(vocab_size(tokenizer), dtype=torch.long)
    for text, i in vocab.items():
        if i in special:
            continue
        if i in added:  # added tokens are stored as raw text, not byte symbols
            out[i] = len(added[i].content.encode("utf-8"))
        elif byte_level and all(c in alphabet for c in text):
            out[i] = len(text)
        else:
            out[i] = len(tokenizer.decode([i], skip_special_tokens=False).encode("utf-8"))
    return out


def _normalized_json(path: str) -> dict:
    """A tokenizer.json as this ``tokenizers`` version writes it (older files spell merges and defaults otherwise)."""
    path = resolve_tokenizer_path(path)
    key = (path, os.path.getmtime(path))
    if key not in _NORMALIZED:
        if len(_NORMALIZED) >= 4:
            _NORMALIZED.clear()
        _NORMALIZED[key] = json.loads(Tokenizer.from_file(path).to_str())
    return _NORMALIZED[key]


_NORMALIZED: dict[tuple, dict] = {}


def tokenizer_fingerprint(path: str) -> str:
    """What maps text to ids in a ``tokenizer.json``: a sha256 (16 hex digits) of its normalizer, pre-tokenizer and
    model (vocabulary and merges), not of its added tokens, which igpt's chat format appends (a pretraining tokenizer
    and the SFT data prepared from it share a fingerprint). Stored in index.json and in every checkpoint's meta.json;
    :func:`tokenizer_conflict` also compares the added tokens' ids."""
    import hashlib

    tok = _normalized_json(path)
    core = {k: tok.get(k) for k in ("normalizer", "pre_tokenizer", "model")}
    return hashlib.sha256(json.dumps(core, sort_keys=True).encode()).hexdigest()[:16]


def tokenizer_conflict(ours: str, theirs: str) -> str | None:
    """Why the tokenizer files ``ours`` and ``theirs`` give different ids to the same text, or None when they agree:
    equal fingerprints and no id that names a different added token in each (either may add tokens)."""
    a, b = tokenizer_fingerprint(ours), tokenizer_fingerprint(theirs)
    if a != b:
        return f"tokenizer fingerprint {a} ({ours}) vs {b} ({theirs})"

    def added(path: str) -> dict[int, str]:
        return {int(t["id"]): t["content"] for t in _normalized_json(path).get("added_tokens", [])}

    x, y = added(ours), added(theirs)
    for i in sorted(set(x) & set(y)):
        if x[i] != y[i]:
            return f"id {i} is the added token {x[i]!r} in {ours} but {y[i]!r} in {theirs}"
    return None


def main(argv: Sequence[str] | None = None) -> None:
    prog = "igpt.data.tokenizer"
    args = parse_args(
        sys.argv[1:] if argv is None else argv, train_tokenizer, prog, ("input", "vocab_size", "output"), __doc__
    )
    start = time.perf_counter()
    try:
        tok = train_tokenizer(**args)
    except (IgptError, ValueError, FileNotFoundError) as e:
        fail(prog, e)
    print(f"wrote {args['output']}: {tok.get_vocab_size()} tokens in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
