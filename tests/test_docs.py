"""The documented commands work as written: every README and docs/ block marked ``<!-- runnable -->`` runs, in order,
in one fresh working directory, at tiny sizes (the training commands get a few steps of a small batch; nothing else
is changed). A block marked ``<!-- runnable: file=NAME -->`` is written to NAME there before any command runs (a
user's module)."""

from __future__ import annotations

import glob
import os
import re
import shlex
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO, chat_records, synthetic_text

MARK = re.compile(r"<!--\s*runnable(?::\s*(.*?))?\s*-->")
# a few steps of a small batch; every other value is the documented one
TRAIN_TINY = {
    "trainer.max_steps": "2", "trainer.global_batch_size": "4", "trainer.micro_batch_size": "4",
    "trainer.seq_len": "128", "trainer.eval_every": "2", "trainer.ckpt_every": "2", "trainer.eval_batches": "1",
    "trainer.progress": "false", "trainer.sample_every_eval": "false", "logger.wandb.mode": "disabled",
}  # fmt: skip
PPO_TINY = {"rollout.max_new_tokens": "8", "trainer.global_batch_size": "2", "trainer.micro_batch_size": "8"}


def runnable_blocks(path: str) -> list[tuple[str, str, int]]:
    """``(kind, text, line)`` of the blocks marked runnable in ``path``: kind ``bash`` or ``file=<name>``."""
    lines = open(path, encoding="utf-8").read().splitlines()
    out = []
    for i, line in enumerate(lines):
        m = MARK.search(line)
        if not m:
            continue
        fence = i + 1
        assert fence < len(lines) and lines[fence].startswith("```"), f"{path}:{i + 1}: a runnable mark needs a block"
        end = next(j for j in range(fence + 1, len(lines)) if lines[j].startswith("```"))
        arg = (m.group(1) or "").strip()
        kind = arg if arg.startswith("file=") else "bash"
        out.append((kind, "\n".join(lines[fence + 1 : end]), fence + 1))
    return out


def commands(block: str) -> list[str]:
    """The commands of a bash block: continuation lines joined, comments and blank lines dropped."""
    out, current = [], ""
    for line in block.splitlines():
        current += line.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        if current.strip() and not current.strip().startswith("#"):
            out.append(current.strip())
        current = ""
    return out


def tiny(argv: list[str]) -> list[str]:
    """A documented command at tiny sizes: training commands get TRAIN_TINY (PPO also PPO_TINY) over their values."""
    if not any(a.endswith("igpt/train.py") for a in argv):
        return argv
    sizes = dict(TRAIN_TINY, **(PPO_TINY if "+stage=ppo" in argv else {}),
                 **({"rm.norm_batches": "2"} if "+stage=rm" in argv else {}))  # not the whole train split
    kept = [a for a in argv if a.partition("=")[0] not in sizes]
    return kept + [f"{k}={v}" for k, v in sizes.items()]


def _user_files(work) -> None:
    """The files the docs call the user's own: a folder of text files and a JSONL of conversations."""
    import json

    os.makedirs(work / "texts")
    for i, doc in enumerate(synthetic_text(30, seed=7)):
        (work / "texts" / f"doc{i:02d}.txt").write_text(doc, encoding="utf-8")
    with open(work / "chats.jsonl", "w", encoding="utf-8") as f:
        for rec in chat_records(120, seed=7):
            f.write(json.dumps(rec) + "\n")


@pytest.mark.slow
@pytest.mark.timeout(1800)  # a dozen commands, six of them training runs: about 2 min on an idle 2-core machine
def test_runnable_doc_blocks_run_as_written(tmp_path):
    docs = [os.path.join(REPO, "README.md"), *sorted(glob.glob(os.path.join(REPO, "docs", "*.md")))]
    blocks = [(path, *b) for path in docs for b in runnable_blocks(path)]
    assert len(blocks) >= 4, "README's runnable blocks went missing"
    work = tmp_path / "work"
    work.mkdir()
    _user_files(work)
    # as a user runs them, but with this checkout's igpt (the editable install may point at another clone)
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1", "PYTHONPATH": REPO}
    for _path, kind, text, _line in blocks:  # the user's modules first: a command may use one shown after it
        if kind.startswith("file="):
            (work / kind[len("file="):]).write_text(text + "\n", encoding="utf-8")
    ran = 0
    for path, kind, text, line in blocks:
        where = f"{os.path.relpath(path, REPO)}:{line}"
        if kind.startswith("file="):
            continue
        for cmd in commands(text):
            argv = shlex.split(cmd, comments=True)
            assert argv[0] == "python", f"{where}: a runnable command starts with python: {cmd}"
            argv = tiny([sys.executable, *[os.path.join(REPO, a) if a == "igpt/train.py" else a for a in argv[1:]]])
            start = time.perf_counter()
            proc = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True, timeout=600)
            assert proc.returncode == 0, f"{where}: {cmd}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
            print(f"{where}: {time.perf_counter() - start:5.1f} s  {cmd[:100]}")
            ran += 1
    assert ran >= 10, ran
    assert os.path.isdir(work / "runs" / "grpo" / "checkpoints")  # the last documented run (my_rewards.py) finished
