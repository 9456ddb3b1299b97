"""Do the README's demo numbers equal what `make demo` printed? The last step of `make demo`:

    python tests/demo_numbers.py [runs/demo] [readme=README.md] [write=true]

Reads each number the README's "What `make demo` does and prints" section states (the pretraining and PPO tables,
the SFT, reward-model and DPO sentences, the topic table) and the same value from the demo's runs (their
``metrics.jsonl`` and ``topics/results.json``), rounded as the README writes it. Prints every mismatch and exits 1 if
there is one, so a README that drifts from the code fails the demo; ``write=true`` puts the run's values into the
README instead (after a deliberate change). A README sentence the check cannot find is a mismatch too.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Callable

MINUS = "\u2212"  # the README writes negative numbers with a real minus sign
NUM = rf"[{MINUS}-]?\d+\.\d+"


def _metrics(run: str, split: str) -> dict[int, dict]:
    """The last record of each step of ``split`` in ``run``'s metrics.jsonl."""
    out: dict[int, dict] = {}
    with open(os.path.join(run, "metrics.jsonl"), encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            if rec.get("split") == split:
                out[rec["step"]] = rec
    return out


def _fmt(value: float, like: str) -> str:
    """``value`` with as many decimals as ``like``, with the README's minus sign."""
    decimals = len(like.split(".")[1]) if "." in like else 0
    text = f"{value:.{decimals}f}"
    if text.startswith("-") and float(text) == 0:
        text = text[1:]
    return text.replace("-", MINUS)


class Check:
    """One README number: ``pattern`` finds it (group ``n`` of the match) and ``value(runs)`` computes it."""

    def __init__(self, label: str, pattern: str, group: int, value: Callable[[str], float]) -> None:
        self.label, self.pattern, self.group, self.value = label, re.compile(pattern), group, value


def _val(stage: str, key: str, step: int | None = None) -> Callable[[str], float]:
    def get(root: str) -> float:
        recs = _metrics(os.path.join(root, stage), "val")
        return float(recs[max(recs) if step is None else step][key])

    return get


def _topics(row: str, key: str) -> Callable[[str], float]:
    def get(root: str) -> float:
        with open(os.path.join(root, "topics", "results.json"), encoding="utf-8") as f:
            results = json.load(f)
        (entry,) = [v for k, v in results.items() if k.startswith("topics")]
        table = {"igpt": entry["metrics"], **{b: m for b, m in entry.get("baselines", {}).items()}}
        return float(table[row][key])

    return get


def _table(label: str, row: str, stage: str, key: str, steps: list[int]) -> list[Check]:
    """The cells of one row of the markdown table headed ``| step | s1 | s2 | ... |``: stage's val ``key`` by step."""
    out = []
    for i, step in enumerate(steps):
        pattern = (r"\| step \|(?:[^\n]*\|)?\n[ \t]*\|[-| ]+\|\n(?:[ \t]*\|[^\n]*\|\n)*?[ \t]*\| "
                   + re.escape(row) + r" \|(?:[^|\n]*\|){" + str(i) + r"}\s*\**(" + NUM + r")\**\s*\|")
        out.append(Check(f"{label} at step {step}", pattern, 1, _val(stage, key, step)))
    return out


def checks(readme: str) -> list[Check]:
    """Every README number the check knows, given the README's text (its tables' step headers)."""
    headers = [[int(x) for x in h.split("|") if x.strip()] for h in re.findall(r"\| step \|((?: \d+ \|)+)", readme)]
    pretrain_steps, ppo_steps = (headers + [[], []])[:2]
    return [
        *_table("pretrain val bpb", "val bpb", "pretrain", "bpb", pretrain_steps),
        Check("SFT val loss, first eval", rf"Val loss on assistant tokens goes from ({NUM}) at step (\d+)", 1,
              lambda root: _first_val(root, "sft", "loss")),
        Check("SFT val loss, last eval", rf"to ({NUM}) nats at step (\d+)", 1, _val("sft", "loss")),
        Check("RM accuracy at step 0", rf"accuracy goes from ({NUM}) at step 0 to \*\*({NUM})\*\*", 1,
              _val("rm", "accuracy", 0)),
        Check("RM accuracy at the end", rf"accuracy goes from ({NUM}) at step 0 to \*\*({NUM})\*\*", 2,
              _val("rm", "accuracy")),
        Check("RM val loss at step 0", rf"with val loss ({NUM}) → ({NUM})", 1, _val("rm", "loss", 0)),
        Check("RM val loss at the end", rf"with val loss ({NUM}) → ({NUM})", 2, _val("rm", "loss")),
        Check("RM margin at step 0", rf"mean margin ({NUM}) → ({NUM})", 1, _val("rm", "margin", 0)),
        Check("RM margin at the end", rf"mean margin ({NUM}) → ({NUM})", 2, _val("rm", "margin")),
        Check("DPO accuracy at step 0", rf"implicit reward goes from ({NUM}) at\s+step 0", 1,
              _val("dpo", "rewards/accuracies", 0)),
        Check("DPO accuracy at the end", rf"\(policy = reference\) to \*\*({NUM})\*\*", 1,
              _val("dpo", "rewards/accuracies")),
        Check("DPO val loss at step 0", rf"and val loss from ({NUM}) to ({NUM})", 1, _val("dpo", "loss", 0)),
        Check("DPO val loss at the end", rf"and val loss from ({NUM}) to ({NUM})", 2, _val("dpo", "loss")),
        *_table("PPO val reward", "val reward (greedy)", "ppo", "objective/scores", ppo_steps),
        *_table("PPO exact KL", "KL to reference, exact (nats per sequence)", "ppo", "objective/kl_exact", ppo_steps),
        *_table("PPO response length", "response length (tokens)", "ppo", "response_length/mean", ppo_steps),
        *[Check(f"topics {row} {key}", rf"\| {re.escape(text)}[^|\n]*\|" + r"(?:[^|\n]*\|){" + str(i)
                + r"}\s*\**(" + NUM + r")\**\s*\|", 1, _topics(row, key))
          for row, text in (("igpt", "igpt: `tiny` pretrained"), ("majority", "majority class"),
                            ("tfidf_logreg", "TF-IDF + logistic regression"))
          for i, key in enumerate(("accuracy", "loss", "macro_f1"))],
    ]


def _first_val(root: str, stage: str, key: str) -> float:
    recs = _metrics(os.path.join(root, stage), "val")
    return float(recs[min(recs)][key])


def _generations(root: str, readme: str) -> tuple[list[str], list[tuple[int, int, str]]]:
    """The README's ``$ python -m igpt.generate ...`` examples against ``<root>/generate/*.txt`` (each: the command,
    then what it printed), as ``make demo-generate`` keeps them: (problems, README edits)."""
    printed, folder = {}, os.path.join(root, "generate")
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if name.endswith(".txt"):
            with open(os.path.join(folder, name), encoding="utf-8") as f:
                cmd, _, text = f.read().partition("\n")
            printed[cmd.replace(root, "runs/demo")] = text.rstrip("\n")
    problems, edits = [], []
    examples = list(re.finditer(r"^\$ (python -m igpt\.generate [^\n]*)\n((?:(?!\$ |```)[^\n]*\n)*)", readme, re.M))
    if not examples:
        problems.append("generation: the README no longer shows a `$ python -m igpt.generate` example")
    for m in examples:
        cmd, said = m.group(1).strip(), m.group(2).rstrip("\n")
        if cmd not in printed:
            problems.append(f"generation: the demo did not run `{cmd}` (it ran: {sorted(printed)})")
        elif printed[cmd] != said:
            problems.append(f"generation: `{cmd}` printed {printed[cmd]!r}, the README shows {said!r}")
            edits.append((m.start(2), m.start(2) + len(said), printed[cmd]))
    return problems, edits


def compare(root: str, readme_path: str, write: bool = False) -> list[str]:
    """The mismatches between the README and the runs under ``root`` (with ``write``: fixed in the README)."""
    with open(readme_path, encoding="utf-8") as f:
        readme = f.read()
    problems, edits = [], []
    for check in checks(readme):
        match = check.pattern.search(readme)
        if match is None:
            problems.append(f"{check.label}: the README no longer has this number (pattern {check.pattern.pattern!r})")
            continue
        said = match.group(check.group)
        try:
            got = _fmt(check.value(root), said)
        except (KeyError, IndexError, OSError, ValueError) as e:
            problems.append(f"{check.label}: no such value in the runs under {root} ({type(e).__name__}: {e})")
            continue
        if got != said:
            problems.append(f"{check.label}: README says {said}, the demo printed {got}")
            edits.append((match.start(check.group), match.end(check.group), got))
    gen_problems, gen_edits = _generations(root, readme)
    problems += gen_problems
    edits += gen_edits
    if write and edits:
        for start, end, text in sorted(set(edits), reverse=True):
            readme = readme[:start] + text + readme[end:]
        with open(readme_path, "w", encoding="utf-8") as f:
            f.write(readme)
    return problems


def main(argv: list[str]) -> int:
    root, readme, write = "runs/demo", "README.md", False
    for arg in argv:
        key, eq, value = arg.partition("=")
        if not eq:
            root = arg
        elif key == "readme":
            readme = value
        elif key == "write":
            write = value.lower() in ("1", "true", "yes")
        else:
            print(f"demo_numbers: unknown key {key!r} (readme=, write=)", file=sys.stderr)
            return 2
    problems = compare(root, readme, write)
    for p in problems:
        print(f"demo_numbers: {p}", file=sys.stderr)
    with open(readme, encoding="utf-8") as f:
        n = len(checks(f.read()))
    if problems:
        verb = "fixed in" if write else "differ from"
        print(f"demo_numbers: {len(problems)} of {n} README numbers {verb} the demo's ({readme})", file=sys.stderr)
        return 0 if write else 1
    print(f"demo_numbers: all {n} README numbers equal the demo's")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
