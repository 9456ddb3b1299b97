"""Task files for ``igpt.eval``: read them, infer their kind from the records, and check every record.

A task is one file (or one prepared dataset folder); its name is the file's stem (``data/topics.jsonl`` -> ``topics``).
The kind follows from what the records hold, so a user writes plain JSONL and never names a kind:

======================================================  ============  ===========================================
record                                                  kind          scored by
======================================================  ============  ===========================================
``{"prompt", "target"}``                                generate      greedy response, exact match after
                                                                      normalisation
``{"prompt", "choices": [...], "answer": <index>}``     choice        log-likelihood of each choice (acc, acc_norm
                                                                      as lm-evaluation-harness's multiple choice)
``{"prompt", "label"[, "labels": [...]]}``              classify      log-likelihood of each label as the answer;
                                                                      label set: ``"labels"`` or every label in the
                                                                      file
``{"prompt", "chosen", "rejected"}``                    preference    reward model: pairwise accuracy
``{"prompt"[, "reference"]}``                           preference    reward model: win rate of the model's
                                                                      greedy responses over the reference's
a ``.txt`` file or a prepared dataset folder            perplexity    loss, bits per byte, next-token accuracy
======================================================  ============  ===========================================

``"prompt"`` is a string, or a list of ``{"role", "content"}`` messages (chat checkpoints); ``"messages"`` may stand
for it. Other keys are ignored. Every record of a file must have the same kind; a record that does not fit names
the file, the line and what was expected.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from igpt.data.chat import validate_messages
from igpt.data.formats import iter_jsonl_lines, load_record

KINDS = ("generate", "choice", "classify", "preference", "perplexity")

Prompt = str | list[dict[str, str]]

_SHAPES = {
    "generate": '{"prompt", "target"}',
    "choice": '{"prompt", "choices": [...], "answer": <index>}',
    "classify": '{"prompt", "label"[, "labels": [...]]}',
    "pairwise": '{"prompt", "chosen", "rejected"}',
    "winrate": '{"prompt"[, "reference"]}',
}


@dataclass
class Record:
    """One checked record: ``where`` is ``file:line``; ``fields`` holds the rest of the JSON object."""

    where: str
    prompt: Prompt
    fields: dict[str, Any] = field(default_factory=dict)


@dataclass
class Task:
    """A task file read and checked. ``form`` refines ``preference`` into ``pairwise`` or ``winrate``."""

    name: str
    path: str
    kind: str
    records: list[Record] = field(default_factory=list)
    form: str = ""
    labels: list[str] = field(default_factory=list)  # classify: the file's label set, in first-seen order


def task_name(path: str) -> str:
    """``data/topics.jsonl`` -> ``topics``; a folder keeps its name."""
    base = os.path.basename(os.path.normpath(path))
    return base if os.path.isdir(path) else os.path.splitext(base)[0]


def read_task(path: str) -> Task:
    """Read a task file (JSONL), a ``.txt`` file or a prepared dataset folder (``index.json``) into a ``Task``."""
    if os.path.isdir(path):
        if not os.path.exists(os.path.join(path, "index.json")):
            raise ValueError(f"task {path}: a folder must be a prepared dataset (python -m igpt.data.prepare)")
        return Task(task_name(path), path, "perplexity", form="prepared")
    if not os.path.exists(path):
        raise FileNotFoundError(f"task {path}: no such file")
    if path.endswith(".txt"):
        return Task(task_name(path), path, "perplexity", form="text")
    records, forms = [], []
    for where, line in iter_jsonl_lines(path):
        obj = load_record(line, where)
        form = _form_of(obj, where)
        if forms and form != forms[0]:
            raise ValueError(
                f"{where}: a {_kind(form)} record ({_SHAPES[form]}) in a file whose first record "
                f"({records[0].where}) is a {_kind(forms[0])} record ({_SHAPES[forms[0]]}); one kind per file"
            )
        forms.append(form)
        records.append(_check(obj, form, where))
    if not records:
        raise ValueError(f"task {path}: no records (expected JSONL, one object per line)")
    form = forms[0]
    task = Task(task_name(path), path, _kind(form), records, form=form if _kind(form) == "preference" else "")
    if task.kind == "classify":
        task.labels = _label_set(records)
    return task


def _kind(form: str) -> str:
    return "preference" if form in ("pairwise", "winrate") else form


def _form_of(obj: dict[str, Any], where: str) -> str:
    if "prompt" not in obj and "messages" not in obj:
        raise ValueError(f'{where}: missing "prompt" (expected one of {"; ".join(_SHAPES.values())})')
    keys = set(obj)
    if "target" in keys:
        return "generate"
    if "choices" in keys or "answer" in keys:
        return "choice"
    if "label" in keys or "labels" in keys:
        return "classify"
    if "chosen" in keys or "rejected" in keys:
        return "pairwise"
    return "winrate"


def _check(obj: dict[str, Any], form: str, where: str) -> Record:
    key = "prompt" if "prompt" in obj else "messages"
    prompt = obj[key]
    if isinstance(prompt, list):
        prompt = validate_messages(prompt, f"{where}: {key}")
    elif not isinstance(prompt, str):
        raise ValueError(f"{where}: {key!r} must be a string or a list of messages, got {type(prompt).__name__}")
    fields = {k: v for k, v in obj.items() if k != key}
    expect = f"expected {_SHAPES[form]}"
    if form == "generate":
        if not isinstance(obj["target"], str):
            raise ValueError(f'{where}: "target" must be a string ({expect})')
    elif form == "choice":
        choices, answer = obj.get("choices"), obj.get("answer")
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
            raise ValueError(f'{where}: "choices" must be a list of at least two non-empty strings ({expect})')
        if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
            raise ValueError(
                f'{where}: "answer" must be an index into "choices" (0..{len(choices) - 1}), got {answer!r}'
            )
    elif form == "classify":
        label, labels = obj.get("label"), obj.get("labels")
        if not isinstance(label, str) or not label:
            raise ValueError(f'{where}: "label" must be a non-empty string ({expect})')
        if labels is not None:
            if not isinstance(labels, list) or len(labels) < 2 or not all(isinstance(x, str) and x for x in labels):
                raise ValueError(f'{where}: "labels" must be a list of at least two non-empty strings ({expect})')
            if label not in labels:
                raise ValueError(f'{where}: "label" {label!r} is not one of its "labels" {labels}')
    elif form == "pairwise":
        for k in ("chosen", "rejected"):
            if not isinstance(obj.get(k), str):
                raise ValueError(f"{where}: {k!r} must be a string response ({expect})")
    elif form == "winrate":
        if "reference" in obj and not isinstance(obj["reference"], str):
            raise ValueError(f'{where}: "reference" must be a string response ({expect})')
    return Record(where, prompt, fields)


def _label_set(records: list[Record]) -> list[str]:
    seen: dict[str, None] = {}
    for r in records:
        for label in [r.fields["label"], *(r.fields.get("labels") or [])]:
            seen.setdefault(label, None)
    if len(seen) < 2:
        raise ValueError(f"{records[0].where}: a classify task needs at least two distinct labels in the file")
    return list(seen)


def record_labels(task: Task, record: Record) -> list[str]:
    """The candidate labels of one classify record: its own ``"labels"`` or the file's label set."""
    return list(record.fields.get("labels") or task.labels)
