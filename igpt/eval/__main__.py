"""``python -m igpt.eval``: evaluate a checkpoint on task files, print a table, write ``results.json``.

    python -m igpt.eval checkpoint=<run or checkpoint dir> tasks=<a.jsonl,b.jsonl> [output=results.json]
        [batch_size=8] [max_new_tokens=64] [normalize=lower,punctuation,whitespace] [chat=auto] [system=...]
        [device=auto] [baselines=<train.jsonl>] [judge=<reward model dir | module:function>] [reference=<dir>]

``chat=auto`` uses the chat template for SFT and later checkpoints. ``baselines=`` fits the majority-class and
TF-IDF + logistic-regression baselines on a labelled file and prints them under the model for every classify and
generate task. ``judge=`` scores preference tasks; ``reference=`` generates the reference responses of win-rate
records that carry none. User errors exit with status 2 and a message naming the file, line or key.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from igpt.eval.metrics import DEFAULT_NORMALIZE

SPEC: dict[str, tuple[type, Any]] = {
    "checkpoint": (str, ...),
    "tasks": (str, ...),
    "output": (str, None),
    "batch_size": (int, 8),
    "max_new_tokens": (int, 64),
    "normalize": (str, DEFAULT_NORMALIZE),
    "chat": (str, "auto"),
    "system": (str, None),
    "device": (str, "auto"),
    "baselines": (str, None),
    "judge": (str, None),
    "reference": (str, None),
}

BASELINE_NAMES = {"majority": "majority class", "tfidf_logreg": "tf-idf + logistic regression"}


def format_table(name: str, entry: dict[str, Any], model_label: str) -> str:
    """One task's metrics as an aligned text table: the model's row, then each baseline's."""
    rows = [(model_label, entry["metrics"])]
    for key, m in entry.get("baselines", {}).items():
        label = BASELINE_NAMES.get(key, key) + (f" (C={m['C']:g})" if "C" in m else "")
        rows.append((label, m))
    columns = list(entry["metrics"])
    width = max(len(label) for label, _ in rows)
    head = f"{name} ({entry['kind']}, {entry['records']} records)" if entry["records"] else f"{name} ({entry['kind']})"
    lines = [head, "  " + "model".ljust(width) + "".join(f"{c:>14}" for c in columns)]
    for label, m in rows:
        cells = "".join(f"{_fmt(m.get(c)):>14}" for c in columns)
        lines.append("  " + label.ljust(width) + cells)
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and value.is_integer() and abs(value) >= 1000:
        return str(int(value))
    return f"{value:.4f}"


def main(argv: Sequence[str] | None = None) -> int:
    from igpt.cli import parse
    from igpt.devices import resolve_device
    from igpt.errors import IgptError
    from igpt.eval.preference import load_scorer
    from igpt.eval.runner import evaluate, load_tasks
    from igpt.generate import load_checkpoint, resolve_chat

    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = parse(argv, SPEC, "igpt.eval", __doc__)
        if args["batch_size"] < 1 or args["max_new_tokens"] < 1:
            raise ValueError("igpt.eval: batch_size and max_new_tokens must be >= 1")
        tasks = load_tasks(args["tasks"])  # bad records fail before any model is loaded
        device = resolve_device(args["device"])
        model, tokenizer, meta = load_checkpoint(args["checkpoint"], device)
        chat = resolve_chat(args["chat"], meta)
        judge = load_scorer(args["judge"], device, args["batch_size"]) if args["judge"] else None
        reference = load_checkpoint(args["reference"], device)[0] if args["reference"] else None
        results = evaluate(
            model, tokenizer, tasks, chat=chat, batch_size=args["batch_size"], max_new_tokens=args["max_new_tokens"],
            normalize=args["normalize"], system=args["system"], judge=judge, reference_model=reference,
            baselines=args["baselines"], progress=sys.stderr.isatty(),
        )
    except (IgptError, ValueError, FileNotFoundError, NotImplementedError) as e:
        print(f"igpt.eval: error: {e}", file=sys.stderr)
        return 2
    label = f"igpt {args['checkpoint']} (step {meta.get('step')}, {meta.get('stage')})"
    for name, entry in results.items():
        print(format_table(name, entry, label))
    if args["output"]:
        os.makedirs(os.path.dirname(os.path.abspath(args["output"])), exist_ok=True)
        with open(args["output"], "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1, ensure_ascii=False)
            f.write("\n")
        print(f"wrote {args['output']}")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    sys.exit(main())
