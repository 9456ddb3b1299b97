"""Small data just works: a 20 KB text file and a 10-conversation JSONL prepare and train with default settings on
1 and 2 processes, also with a global batch that is not a multiple of 8 (the canonical partitions are picked from
the data and the batch size: igpt.data.loader.auto_partitions), and 2 ranks compute the single process's losses."""

from __future__ import annotations

import json
import os

import pytest

from tests.conftest import TINY, chat_records, run_module, synthetic_text
from tests.test_strategies import torchrun
from tests.trainutil import read_metrics, train

pytestmark = pytest.mark.dist

# default data, batch and partition settings; a smaller model and sequence than the defaults, for the CPU's sake
QUIET = [*TINY, "trainer.max_steps=2", "trainer.progress=false", "trainer.sample_every_eval=false",
         "logger.wandb.mode=disabled"]


@pytest.fixture(scope="module")
def small(tmp_path_factory, tokenizer_file) -> dict[str, str]:
    root = tmp_path_factory.mktemp("small")
    text = ""
    for doc in synthetic_text(200, seed=11):
        if len(text) + len(doc) > 20_000:
            break
        text += doc + "\n"
    (root / "small.txt").write_text(text, encoding="utf-8")
    (root / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chat_records(10, seed=12)), "utf-8")
    out = {}
    for kind, src in (("text", "small.txt"), ("sft", "chat.jsonl")):
        out[kind] = str(root / kind)
        run_module("-m", "igpt.data.prepare", f"input={root / src}", f"output_dir={out[kind]}",
                   f"tokenizer={tokenizer_file}", f"kind={kind}")  # default settings otherwise
    index = json.load(open(os.path.join(out["text"], "index.json"), encoding="utf-8"))
    assert index["splits"]["train"]["samples"] == 1  # 20 KB is one chunk: fewer samples than 8 partitions
    return out


@pytest.mark.parametrize("kind, batch", [("text", []), ("sft", ["trainer.global_batch_size=4",
                                                                  "trainer.micro_batch_size=2"])])
def test_small_data_trains_on_one_and_two_processes(small, tmp_path, kind, batch):
    stage = "pretrain" if kind == "text" else "sft"
    args = [f"+stage={stage}", f"data.dir={small[kind]}", *batch, *QUIET]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    train([*args, f"run_dir={one}"])
    torchrun([*args, f"run_dir={two}", "strategy=ddp"])
    a, b = read_metrics(one), read_metrics(two)
    assert sorted(a) == sorted(b) == [1, 2]
    for step in (1, 2):
        assert abs(a[step]["loss"] - b[step]["loss"]) < 1e-5, step
