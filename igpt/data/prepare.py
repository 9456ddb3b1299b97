"""Tokenize text, chat or preference data into WebDataset shards with an ``index.json`` (docs/internals.md).

    python -m igpt.data.prepare input=<glob or comma list> output_dir=<dir> tokenizer=<tokenizer.json or folder>
        [kind=text|sft|pref|kto|prompt] [val_fraction=0.05] [seq_len=<n>] [shard_tokens=1000000] [num_workers=<n>]
        [encoding=utf-8] [separator=<str>] [strip_gutenberg=false] [chunk_bytes=65536] [seed=1234] [overwrite=false]
        [text_field=text] [messages_field=messages]

``tokenizer=`` is a ``tokenizer.json`` or a folder holding one (a Hugging Face model folder, another prepared dir):
a folder brings its chat format too (``igpt.data.chat.ChatFormat``: chat template, special and stop tokens), which is
written into ``output_dir`` beside ``tokenizer.json`` and used by training, generation and export. For chat kinds, a
tokenizer without a chat template gets igpt's template tokens added (the training run then adds their embedding rows).

Inputs (``igpt.data.formats``): text files; JSONL records (``.jsonl``/``.json``); parquet files; ``datasets`` folders
written by ``save_to_disk`` (the optional ``pyarrow`` / ``datasets`` packages read them). For kind=text a record is one
document (its ``text_field`` column); for the other kinds records are chat, ShareGPT, prompt/completion or Alpaca
(kind=sft), preference (kind=pref) or prompt (kind=prompt) records, their messages in ``messages_field``.

Samples (one per WebDataset key ``{shard:06d}_{index:08d}``, arrays raw little-endian, uint16 ids when the vocabulary
fits, else uint32; masks uint8):
- kind=text: ``ids.bin`` = the document start (``<|endoftext|>`` with igpt's tokenizer, the BOS of one that adds it)
  + the tokens of one document. Each file (or text record) is a document, or the pieces
  between ``separator`` (command-line escapes such as ``\\n`` are understood). Documents longer than ``chunk_bytes``
  characters are cut after paragraph ends into chunks, each its own sample: shards balance, and the train/val split
  can hold out part of a single large file. A chunk is tokenized on its own, so no token spans a cut.
- kind=sft: ``ids.bin`` and ``mask.bin`` from ``ChatFormat.encode_chat``. With ``seq_len``, conversations longer
  than ``seq_len + 1`` tokens keep their start (and are counted in a warning); one left with no assistant token is
  dropped.
- kind=pref: ``ids.bin`` / ``mask.bin`` with the K sequences (prompt + response; mask 1 on the response's assistant
  tokens incl. its end of turn) back to back, ``lens.bin`` (their lengths), ``rank.bin`` and ``margin.bin``. A pair
  is K = 2 with ranks [0, 1]. With ``seq_len`` the K sequences together fit ``seq_len`` tokens (the longest responses
  are cut first, as the loader does; igpt.data.packing.fit_segments).
- kind=kto: unpaired ``{"prompt" | "messages", "completion", "label": true|false}`` examples, each stored as a kind=pref
  sample with K = 1 (rank 0 = desirable, 1 = undesirable).
- kind=prompt: ``ids.bin`` (the prompt through the generation prompt) and ``record.json`` (the record as given).

``bytes`` in the index is the UTF-8 size of the text each split holds: for text, the decoded documents (after
header stripping, without separators); for sft and pref, the message contents of the stored sequences (pref: every
sequence, so the prompt counts K times); for prompt, the prompt's contents.

The train/val split is a seeded pseudo-random choice of samples (chunks, conversations or pairs) filling
``val_fraction`` of the bytes, so val is representative of the whole input; the order of samples in each split is a
seeded shuffle. The same inputs and options give byte-identical shards (fixed tar metadata), whatever
``num_workers``, and the same records give the same shards whether they come as JSONL, parquet or a datasets folder.
Output is written to a temporary folder beside ``output_dir`` and renamed into place at the end, so a failure never
leaves a half-written dataset.

Memory stays bounded whatever the input size: inputs stream (text files in blocks, records in batches), a bounded
number of tasks is in flight, and encoded samples wait in a spool file inside the temporary folder (a few integers per
sample stay in memory) until the split is chosen and the shards are written (bench/prepare_memory.py measures it).
"""

from __future__ import annotations

import errno
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import time
import warnings
from array import array
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from contextlib import closing
from typing import Any

import numpy as np
import webdataset as wds
from tqdm.auto import tqdm

from igpt.checksum import file_checksum
from igpt.data.chat import ChatFormat
from igpt.data.formats import (
    chunk_text,
    expand_inputs,
    fail,
    input_type,
    iter_records,
    iter_text_chunks,
    load_record,
    parse_args,
    parse_kto_record,
    parse_pref_record,
    parse_prompt_record,
    parse_sft_record,
    parse_text_record,
    read_text,
    split_documents,
    unescape,
)
from igpt.data.kinds import KIND_FIELDS, KINDS
from igpt.data.partition import SHARD_CHECKSUM
from igpt.data.tokenizer import tokenizer_fingerprint, vocab_size
from igpt.errors import ConfigError, DataError, IgptError

TASK_CHARS = 1 << 20  # text per worker task
TASK_RECORDS = 256  # records per worker task
INDEX_VERSION = 1

# One encoded sample: (arrays by WebDataset field name, token count, UTF-8 bytes, status) where status is
# "" (kept whole), "truncated" or "dropped" (nothing left to learn after truncation).
Sample = tuple[dict[str, bytes], int, int, str]


class _Encoder:
    """Turns raw inputs into samples; one lives in every worker process (or in the caller when num_workers <= 1)."""

    def __init__(
        self, fmt_args: tuple, seq_len: int | None, dtype: str, chunk_bytes: int, text_field: str, messages_field: str
    ) -> None:
        self.fmt = ChatFormat.from_args(fmt_args)
        self.tok = self.fmt.tokenizer
        self.start = self.fmt.doc_start_ids()
        self.seq_len = seq_len
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.chunk_bytes, self.text_field, self.messages_field = chunk_bytes, text_field, messages_field

    def run(self, method: str, payload: Any) -> list[Sample]:
        if method == "text":
            return self.text(payload)
        if method == "textrec":
            return self.text_records(payload)
        return self.records(method, payload)

    def _ids(self, ids: Sequence[int]) -> bytes:
        return np.asarray(ids, dtype=self.dtype).tobytes()

    def text(self, chunks: list[str]) -> list[Sample]:
        from igpt.data.chat import encode_texts

        out = []
        for chunk, ids in zip(chunks, encode_texts(self.tok, chunks)):
            tokens = [*self.start, *ids]
            out.append(({"ids.bin": self._ids(tokens)}, len(tokens), len(chunk.encode("utf-8")), ""))
        return out

    def text_records(self, items: list[tuple[str, Any]]) -> list[Sample]:
        chunks = []
        for where, rec in items:
            obj = load_record(rec, where) if isinstance(rec, str) else rec
            for doc in split_documents(parse_text_record(obj, where, self.text_field), None):
                chunks += chunk_text(doc, self.chunk_bytes)
        return self.text(chunks)

    def _conversation(self, messages: list[dict[str, str]]) -> tuple[list, list, int, str]:
        ids, mask = self.fmt.encode_chat(messages)
        nbytes = sum(len(m["content"].encode("utf-8")) for m in messages)
        status = ""
        if self.seq_len is not None and len(ids) > self.seq_len + 1:
            ids, mask = ids[: self.seq_len + 1], mask[: self.seq_len + 1]
            nbytes = len(self.tok.decode(ids, skip_special_tokens=True).encode("utf-8"))
            status = "truncated" if any(mask) else "dropped"
        return ids, mask, nbytes, status

    def records(self, kind: str, items: list[tuple[str, Any]]) -> list[Sample]:
        out = []
        for where, rec in items:
            obj = load_record(rec, where) if isinstance(rec, str) else rec
            if kind == "sft":
                ids, mask, nbytes, status = self._conversation(parse_sft_record(obj, where, self.messages_field))
                arrays = {"ids.bin": self._ids(ids), "mask.bin": bytes(mask)}
                out.append((arrays, len(ids), nbytes, status))
                continue
            if kind == "prompt":
                messages = parse_prompt_record(obj, where, self.messages_field)
                out.append(_DROPPED_EMPTY if _empty_prompt(messages) else self._prompt(obj, where))
            elif kind == "kto":  # one sequence, stored as a K = 1 pref record (igpt.data.kinds)
                rec = parse_kto_record(obj, where, self.messages_field)
                out.append(_DROPPED_EMPTY if _empty_prompt(rec.prompt) else self._pref(rec))
            else:
                rec = parse_pref_record(obj, where, self.messages_field)
                out.append(_DROPPED_EMPTY if _empty_prompt(rec.prompt) else
                           _DROPPED_SAME if _same_responses(rec) else self._pref(rec))
        return out

    def _prompt(self, obj: dict[str, Any], where: str) -> Sample:
        messages = parse_prompt_record(obj, where, self.messages_field)
        ids, _ = self.fmt.encode_chat(messages, add_generation_prompt=True)
        nbytes = sum(len(m["content"].encode("utf-8")) for m in messages)
        record = json.dumps(obj, ensure_ascii=False).encode("utf-8")
        return {"ids.bin": self._ids(ids), "record.json": record}, len(ids), nbytes, ""

    def _pref(self, rec) -> Sample:
        from igpt.data.packing import fit_segments

        seqs, prompt_len = [], None
        for response in rec.responses:
            ids, mask = self.fmt.encode_chat(rec.prompt + response)
            # a sequence ends with the response's end of turn (where a reward model reads it, and where a sampled
            # response stops), not with what a template writes after it (ChatML's newline)
            end = len(mask) - mask[::-1].index(1) if 1 in mask else len(mask)
            ids, mask = ids[:end], mask[:end]
            if prompt_len is None:
                prompt_len = self.fmt.prompt_length(rec.prompt, ids)
            mask[:prompt_len] = [0] * prompt_len
            seqs.append((ids, mask))
        lens = np.array([len(ids) for ids, _ in seqs], dtype=np.int64)
        status = ""
        if self.seq_len is not None:
            prompts = np.full(len(seqs), prompt_len, dtype=np.int64)
            keep_p, keep_r = fit_segments(lens, prompts, self.seq_len)
            if (keep_p < prompts).any() or (keep_r < lens - prompts).any():
                status = "truncated"
                seqs = [(ids[prompt_len - p : prompt_len + r], mask[prompt_len - p : prompt_len + r])
                        for (ids, mask), p, r in zip(seqs, keep_p, keep_r)]
                lens = np.array([len(ids) for ids, _ in seqs], dtype=np.int64)
        all_ids = [i for ids, _ in seqs for i in ids]
        nbytes = sum(len(self.tok.decode(ids, skip_special_tokens=True).encode("utf-8")) for ids, _ in seqs)
        arrays = {
            "ids.bin": self._ids(all_ids),
            "mask.bin": bytes(m for _, mask in seqs for m in mask),
            "lens.bin": lens.astype("<u4").tobytes(),
            "rank.bin": np.asarray(rec.ranking, dtype="<i4").tobytes(),
            "margin.bin": np.asarray([rec.margin], dtype="<f4").tobytes(),
        }
        return arrays, len(all_ids), nbytes, status


# Records that cannot teach anything, dropped and counted in prepare's summary (index.json "filtered")
_DROPPED_EMPTY: Sample = ({}, 0, 0, "empty_prompt")  # a prompt with no text: nothing to condition on
_DROPPED_SAME: Sample = ({}, 0, 0, "identical_responses")  # chosen == rejected: loss ln 2, accuracy 0, always


def _empty_prompt(messages: list[dict[str, str]]) -> bool:
    return not any(str(m.get("content", "")).strip() for m in messages if m.get("role") != "system")


def _same_responses(rec) -> bool:
    """Two responses ranked differently but equal (chosen == rejected)."""
    seen: dict[str, int] = {}
    for response, rank in zip(rec.responses, rec.ranking):
        key = json.dumps(response, sort_keys=True)
        if key in seen and seen[key] != rank:
            return True
        seen[key] = rank
    return False


_WORKER: _Encoder | None = None


def _init_worker(*args: Any) -> None:
    global _WORKER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the pool is the parallelism; no Rust threads per worker
    _WORKER = _Encoder(*args)


def _run_task(task: tuple[str, Any]) -> list[Sample]:
    assert _WORKER is not None
    return _WORKER.run(*task)


def _map_ordered(
    tasks: Iterable[tuple[str, Any, int]], num_workers: int, init_args: tuple
) -> Iterator[tuple[list[Sample], int]]:
    """Run ``(method, payload, input_bytes)`` tasks in a process pool; yield ``(samples, input_bytes)`` in task order
    with a bounded number of tasks in flight (so memory stays bounded however large the input)."""
    if num_workers <= 1:
        encoder = _Encoder(*init_args)
        for method, payload, size in tasks:
            yield encoder.run(method, payload), size
        return
    with multiprocessing.get_context().Pool(num_workers, initializer=_init_worker, initargs=init_args) as pool:
        pending: deque = deque()
        for method, payload, size in tasks:
            pending.append((pool.apply_async(_run_task, ((method, payload),)), size))
            if len(pending) >= 4 * num_workers:
                result, size = pending.popleft()
                yield result.get(), size
        while pending:
            result, size = pending.popleft()
            yield result.get(), size


def _text_chunks(path: str, encoding: str, separator: str | None, strip_gutenberg: bool, chunk_bytes: int):
    if not strip_gutenberg:
        yield from iter_text_chunks(path, encoding, separator, chunk_bytes)
        return
    from igpt.data.corpus import strip_gutenberg as strip

    for doc in split_documents(strip(read_text(path, encoding)), separator):  # headers need the whole file
        yield from chunk_text(doc, chunk_bytes)


def _tasks(
    kind: str, files: Sequence[str], encoding: str, separator: str | None, strip_gutenberg: bool, chunk_bytes: int,
    text_field: str,
) -> Iterator[tuple[str, list, int]]:
    """Worker tasks ``(method, payload, input characters)`` over every input, in order, each of bounded size."""
    batch: list = []
    size, method = 0, None
    for path in files:
        kind_of_file = input_type(path)
        if kind == "text" and kind_of_file == "text":
            items: Iterable = ((chunk, len(chunk)) for chunk in
                               _text_chunks(path, encoding, separator, strip_gutenberg, chunk_bytes))
            this, limit = "text", TASK_CHARS
        else:
            if kind_of_file == "text":
                raise ValueError(
                    f"input {path}: kind={kind} reads records (.jsonl, .parquet or a datasets folder), not a text file"
                )
            columns = [text_field] if kind == "text" and kind_of_file != "jsonl" else None
            items = ((item, len(item[1]) if isinstance(item[1], str) else 0)
                     for item in iter_records(path, encoding, columns))
            this, limit = ("textrec" if kind == "text" else kind), TASK_RECORDS
        if method != this and batch:
            yield method, batch, size
            batch, size = [], 0
        method = this
        for item, n in items:
            batch.append(item)
            size += n
            if (size if this == "text" else len(batch)) >= limit:
                yield method, batch, size
                batch, size = [], 0
    if batch:
        yield method, batch, size


class _Spool:
    """Encoded samples in input order in a file: memory holds a few integers per sample, whatever the input size.

    Samples are read back with ``os.pread`` (not a memory map, whose pages would count as the process's memory)."""

    def __init__(self, path: str, fields: Sequence[str]) -> None:
        self.path, self.fields = path, tuple(fields)
        self._file = open(path, "wb")
        self.sizes = array("q")  # per sample, per field
        self.tokens, self.nbytes = array("q"), array("q")
        self._fd: int | None = None

    def add(self, arrays: dict[str, bytes], tokens: int, nbytes: int) -> None:
        for name in self.fields:
            self._file.write(arrays[name])
            self.sizes.append(len(arrays[name]))
        self.tokens.append(tokens)
        self.nbytes.append(nbytes)

    def __len__(self) -> int:
        return len(self.tokens)

    def seal(self) -> None:
        """Done writing: open the file for reading."""
        self._file.close()
        sizes = np.frombuffer(self.sizes, dtype=np.int64).reshape(-1, len(self.fields))  # (n, F)
        self._ends = np.cumsum(sizes.reshape(-1)).reshape(sizes.shape)  # (n, F): end offset of every field
        self._fd = os.open(self.path, os.O_RDONLY)

    def get(self, i: int) -> dict[str, bytes]:
        assert self._fd is not None
        out = {}
        for j, name in enumerate(self.fields):
            end = int(self._ends[i, j])
            size = self.sizes[i * len(self.fields) + j]
            out[name] = os.pread(self._fd, size, end - size)
        return out

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def choose_val(nbytes: Sequence[int], val_fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of the samples held out for validation.

    Walks a seeded permutation of the samples and takes them until their bytes reach ``val_fraction`` of the total;
    at least one sample goes to val when ``val_fraction > 0`` and there are two or more, and train is never empty.
    """
    n = len(nbytes)
    val = np.zeros(n, dtype=bool)
    if val_fraction <= 0 or n < 2:
        return val
    target = val_fraction * float(sum(nbytes))
    taken = 0.0
    for count, i in enumerate(np.random.default_rng(seed).permutation(n)):
        # stop at the target, or before a sample that would overshoot it by more than stopping undershoots
        if count == n - 1 or (count > 0 and (taken >= target or taken + nbytes[i] - target > target - taken)):
            break
        val[i] = True
        taken += nbytes[i]
    return val


def _write_split(
    root: str, split: str, spool: _Spool, order: np.ndarray, shard_tokens: int, progress: bool
) -> dict[str, Any]:
    os.makedirs(os.path.join(root, split))
    shards: list[dict[str, Any]] = []
    writer: wds.TarWriter | None = None
    for i in tqdm(order, desc=f"writing {split}", unit="sample", disable=not progress):
        i = int(i)
        tokens, nbytes = spool.tokens[i], spool.nbytes[i]
        if writer is None or (shards[-1]["tokens"] > 0 and shards[-1]["tokens"] + tokens > shard_tokens):
            if writer is not None:
                writer.close()
            name = f"{split}/shard-{len(shards):06d}.tar"
            # fixed owner, mode and mtime: identical inputs give byte-identical shards
            writer = wds.TarWriter(os.path.join(root, name), encoder=False, user="igpt", group="igpt", mtime=0.0)
            shards.append({"name": name, "samples": 0, "tokens": 0, "bytes": 0})
        shard = shards[-1]
        writer.write({"__key__": f"{len(shards) - 1:06d}_{shard['samples']:08d}", **spool.get(i)})
        shard["samples"] += 1
        shard["tokens"] += tokens
        shard["bytes"] += nbytes
    if writer is not None:
        writer.close()
    for shard in shards:  # the loader verifies each shard against it (igpt.data.partition.Shard)
        shard[SHARD_CHECKSUM] = file_checksum(os.path.join(root, shard["name"]))
    totals = {k: sum(s[k] for s in shards) for k in ("samples", "tokens", "bytes")}
    return {**totals, "shards": shards}


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _check_replaceable(output_dir: str, inputs: Sequence[str]) -> None:
    """overwrite=true replaces only a prepared dataset (a folder with index.json) or an empty folder, and never a
    folder that holds one of the inputs."""
    if not os.path.isdir(output_dir):
        raise ConfigError(f"output_dir={output_dir} is a file, not a prepared dataset; overwrite=true replaces only "
                          f"a folder written by igpt.data.prepare (with index.json) or an empty folder")
    for f in inputs:
        if os.path.commonpath([os.path.abspath(f), output_dir]) == output_dir:
            raise ConfigError(f"output_dir={output_dir} holds the input {f}: overwrite=true would delete it")
    if os.listdir(output_dir) and not os.path.isfile(os.path.join(output_dir, "index.json")):
        raise ConfigError(
            f"output_dir={output_dir} is not a prepared dataset (no index.json) and not empty; overwrite=true "
            f"replaces only a folder written by igpt.data.prepare or an empty one, so nothing was deleted"
        )


def _input_size(path: str) -> int:
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(d, f)) for d, _, names in os.walk(path) for f in names)
    return os.path.getsize(path)


def prepare(
    input: str | Sequence[str],
    output_dir: str,
    tokenizer: str,
    kind: str = "text",
    val_fraction: float = 0.05,
    seq_len: int | None = None,
    shard_tokens: int = 1_000_000,
    num_workers: int | None = None,
    encoding: str = "utf-8",
    separator: str | None = None,
    strip_gutenberg: bool = False,
    chunk_bytes: int = 65536,
    seed: int = 1234,
    overwrite: bool = False,
    text_field: str = "text",
    messages_field: str = "messages",
    progress: bool = True,
) -> dict[str, Any]:
    """Tokenize ``input`` into ``output_dir`` (see the module docstring) and return the index written there."""
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}: expected one of {', '.join(KINDS)}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction}: expected a share in [0, 1)")
    if seq_len is not None and seq_len < 1:
        raise ValueError(f"seq_len={seq_len}: expected a positive number of tokens")
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens={shard_tokens}: expected a positive number of tokens")
    output_dir = os.path.abspath(output_dir)
    if os.path.exists(output_dir) and not overwrite:
        raise FileExistsError(f"output_dir {output_dir} exists; pass overwrite=true to replace it")
    files = expand_inputs(input)
    if os.path.exists(output_dir):
        _check_replaceable(output_dir, files)
    fmt = ChatFormat.load(tokenizer)
    if kind != "text":
        fmt = fmt.with_chat_tokens()  # igpt's template tokens, for a tokenizer without a template that lacks them
    vocab = vocab_size(fmt.tokenizer)
    dtype = "uint16" if vocab <= 65536 else "uint32"
    workers = min(4, os.cpu_count() or 1) if num_workers is None else num_workers
    init_args = (fmt.to_args(), seq_len, dtype, chunk_bytes, text_field, messages_field)

    parent = os.path.dirname(output_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(output_dir)}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    spool = _Spool(os.path.join(tmp, "spool.bin"), KIND_FIELDS[kind])
    try:
        tasks = _tasks(kind, files, encoding, separator, strip_gutenberg, chunk_bytes, text_field)
        filtered = _tokenize_into(spool, tasks, sum(_input_size(f) for f in files), workers, init_args, kind, seq_len,
                                  progress)
        if not len(spool):
            raise DataError(
                f"input {input!r}: no {'text' if kind == 'text' else 'records'} found in {len(files)} file(s)"
            )
        splits = _write_splits(tmp, spool, val_fraction, seed, shard_tokens, progress)
        fmt.save(tmp)
        tok_file = os.path.join(tmp, "tokenizer.json")
        index = {
            "version": INDEX_VERSION,
            "kind": kind,
            "dtype": dtype,
            "tokenizer": {"path": "tokenizer.json", "sha256": _sha256(tok_file), "vocab_size": vocab,
                          "fingerprint": tokenizer_fingerprint(tok_file)},
            "filtered": filtered,
            "pad_id": fmt.pad_id,
            "seq_len": seq_len,
            "splits": splits,
        }
        with open(os.path.join(tmp, "index.json"), "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2)
            f.write("\n")
        _swap_into(tmp, output_dir)
    except BaseException as e:
        spool.close()
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DataError(
                f"no space left on {parent} while preparing {output_dir}: the partial output {tmp} was removed"
                f"{' and the existing ' + output_dir + ' is untouched' if os.path.exists(output_dir) else ''}; "
                f"free some space (or pick another output_dir) and run prepare again"
            ) from None
        raise
    return index


def _tokenize_into(spool: _Spool, tasks, total: int, workers: int, init_args: tuple, kind: str, seq_len: int | None,
                   progress: bool) -> dict[str, int]:
    """Tokenize ``tasks`` on ``workers`` processes into ``spool`` (in input order), with a progress bar over the
    input's ``total`` bytes; warn about what was cut or dropped; return the counts of filtered records."""
    results = _map_ordered(tasks, workers, init_args)
    truncated = dropped = 0
    filtered = {_DROPPED_EMPTY[3]: 0, _DROPPED_SAME[3]: 0}
    bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"tokenizing {kind}", disable=not progress)
    with bar, closing(results):  # closing: an interrupt here still shuts the worker pool down
        for result, size in results:
            for arrays, tokens, nbytes, status in result:
                truncated += status == "truncated"
                dropped += status == "dropped"
                if status in filtered:
                    filtered[status] += 1
                elif status != "dropped":
                    spool.add(arrays, tokens, nbytes)
            bar.update(min(size, total - bar.n))
        bar.update(total - bar.n)
    spool.seal()
    if truncated or dropped:
        warnings.warn(
            f"{truncated + dropped} sequence(s) were longer than seq_len + 1 = {(seq_len or 0) + 1} tokens: "
            f"{truncated} truncated (start kept), {dropped} dropped because no response token was left to learn",
            stacklevel=3,
        )
    if any(filtered.values()):
        warnings.warn(
            f"dropped {filtered['empty_prompt']} record(s) with an empty prompt and "
            f"{filtered['identical_responses']} preference record(s) whose chosen and rejected responses are "
            f"identical (nothing to learn from them)", stacklevel=3,
        )
    return filtered


def _write_splits(tmp: str, spool: _Spool, val_fraction: float, seed: int, shard_tokens: int,
                  progress: bool) -> dict[str, Any]:
    """Choose the val samples, shuffle both splits (seeded) and write their shards from the spool (then removed)."""
    val = choose_val(spool.nbytes, val_fraction, seed)
    if val_fraction > 0 and not val.any():
        warnings.warn(f"val_fraction={val_fraction} but only one sample exists: the val split is empty", stacklevel=3)
    rng = np.random.default_rng(seed + 1)
    orders = {"train": rng.permutation(np.flatnonzero(~val)), "val": rng.permutation(np.flatnonzero(val))}
    splits = {name: _write_split(tmp, name, spool, order, shard_tokens, progress) for name, order in orders.items()}
    spool.close()
    os.remove(spool.path)
    return splits


def _swap_into(tmp: str, output_dir: str) -> None:
    """Make the finished ``tmp`` folder ``output_dir``; an existing one (``overwrite=true``) is moved aside first and
    deleted only once the new one is in place."""
    if os.path.exists(output_dir):
        old = os.path.join(os.path.dirname(output_dir), f".{os.path.basename(output_dir)}.old-{os.getpid()}")
        os.replace(output_dir, old)
        os.replace(tmp, output_dir)
        shutil.rmtree(old)
    else:
        os.replace(tmp, output_dir)


def main(argv: Sequence[str] | None = None) -> None:
    prog = "igpt.data.prepare"
    args = parse_args(
        sys.argv[1:] if argv is None else argv, prepare, prog, ("input", "output_dir", "tokenizer"), __doc__
    )
    if args.get("separator"):
        args["separator"] = unescape(args["separator"])
    start = time.perf_counter()
    try:
        index = prepare(**args)
    except (IgptError, ValueError, FileNotFoundError, FileExistsError) as e:
        fail(prog, e)
    elapsed = time.perf_counter() - start
    total_bytes = sum(s["bytes"] for s in index["splits"].values())
    for name, s in index["splits"].items():
        print(f"{name}: {s['samples']} samples, {s['tokens']} tokens, {s['bytes']} bytes, {len(s['shards'])} shard(s)")
    filtered = index.get("filtered") or {}
    if any(filtered.values()):
        print(f"dropped: {filtered.get('empty_prompt', 0)} empty prompt(s), {filtered.get('identical_responses', 0)} "
              f"pair(s) with chosen == rejected")
    print(f"wrote {args['output_dir']} in {elapsed:.1f}s ({total_bytes / 1e6 / max(elapsed, 1e-9):.2f} MB/s)")


if __name__ == "__main__":
    main()
