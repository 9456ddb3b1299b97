"""tests/demo_numbers.py, the last step of `make demo`: it finds every README demo number and generation example, and
a run that printed other values (or a README that lost a sentence) is a mismatch naming it."""

from __future__ import annotations

import json
import os
import random
import re
import shutil

from tests import demo_numbers
from tests.conftest import REPO

STAGE_KEYS = {"pretrain": ["bpb"], "sft": ["loss"], "rm": ["accuracy", "loss", "margin"],
              "dpo": ["rewards/accuracies", "loss"],
              "ppo": ["objective/scores", "objective/kl_exact", "response_length/mean"]}  # fmt: skip
STEPS = {"pretrain": [75, 150, 225, 300, 375, 450], "sft": [30, 150], "rm": [0, 100], "dpo": [0, 60],
         "ppo": [0, 10, 20, 30]}  # fmt: skip


def fake_demo(root, seed: int = 0) -> None:
    """Runs with random values where the demo writes them: metrics.jsonl, topics/results.json, generate/*.txt."""
    rng = random.Random(seed)
    for stage, keys in STAGE_KEYS.items():
        os.makedirs(root / stage)
        with open(root / stage / "metrics.jsonl", "w") as f:
            for step in STEPS[stage]:
                f.write(json.dumps({"step": step, "split": "train", "loss": 9.0}) + "\n")
                f.write(json.dumps({"step": step, "split": "val", **{k: rng.uniform(-3, 3) for k in keys}}) + "\n")
    row = lambda: {"accuracy": rng.random(), "loss": rng.uniform(0, 3), "macro_f1": rng.random()}  # noqa: E731
    os.makedirs(root / "topics")
    with open(root / "topics" / "results.json", "w") as f:
        json.dump({"topics": {"metrics": row(), "baselines": {"majority": row(), "tfidf_logreg": row()}}}, f)
    os.makedirs(root / "generate")
    readme = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    for i, cmd in enumerate(re.findall(r"^\$ (python -m igpt\.generate [^\n]*)$", readme, re.M)):
        (root / "generate" / f"{i}.txt").write_text(cmd.replace("runs/demo", str(root)) + f"\nanswer {i}\n")


def test_readme_numbers_are_found_written_and_compared(tmp_path):
    readme = tmp_path / "README.md"
    shutil.copy(os.path.join(REPO, "README.md"), readme)
    root = tmp_path / "demo"
    fake_demo(root)
    problems = demo_numbers.compare(str(root), str(readme))
    n = len(demo_numbers.checks(readme.read_text(encoding="utf-8")))
    assert n >= 35 and len(problems) >= n  # random values: every number (and each generation) differs
    assert not [p for p in problems if "no longer has" in p or "no such value" in p], problems

    demo_numbers.compare(str(root), str(readme), write=True)  # the README now states the fake run's values
    assert demo_numbers.compare(str(root), str(readme)) == []
    assert demo_numbers.main([str(root), f"readme={readme}"]) == 0

    with open(root / "rm" / "metrics.jsonl", "a") as f:  # a rerun that printed another final RM accuracy
        f.write(json.dumps({"step": 100, "split": "val", "accuracy": 0.5, "loss": 0.0, "margin": 0.0}) + "\n")
    problems = demo_numbers.compare(str(root), str(readme))
    assert any(p.startswith("RM accuracy at the end: README says") and "printed 0.500" in p for p in problems)
    assert demo_numbers.main([str(root), f"readme={readme}"]) == 1

    text = readme.read_text(encoding="utf-8").replace("Val loss on assistant tokens goes from", "SFT lowers val loss")
    readme.write_text(text, encoding="utf-8")
    assert any(p.startswith("SFT val loss, first eval: the README no longer has") for p in
               demo_numbers.compare(str(root), str(readme)))
