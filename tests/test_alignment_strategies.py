"""The reward-model and DPO stages under every data-parallel strategy: 2 gloo processes against one process.

Each run goes through the real entry point (``torchrun igpt/train.py``) with the same seed and global batch as the
single-process reference (8 records per step; micro-batches of 2: accumulation 2 on 2 ranks, 4 on 1 rank). DPO's
frozen reference is placed by the strategy too (a replica under ddp and zero2, sharded under fsdp and zero3).
"""

from __future__ import annotations

import pytest
import torch

from igpt.checkpoint import read_model_state, resolve
from tests.conftest import TINY
from tests.test_strategies import torchrun
from tests.trainutil import read_metrics, train

pytestmark = pytest.mark.dist

STEPS = 4
TOL = 1e-5
KEYS = {"rm": ("loss", "accuracy", "margin"), "dpo": ("loss", "rewards/margins", "logps/chosen")}


def overrides(stage: str, data_dir: str, run_dir: str, *extra: str) -> list[str]:
    return [
        f"+stage={stage}", f"data.dir={data_dir}", f"run_dir={run_dir}", *TINY, "model.max_seq_len=128",
        "trainer.seq_len=128", "trainer.global_batch_size=8", "trainer.micro_batch_size=2",
        f"trainer.max_steps={STEPS}", f"trainer.eval_every={STEPS}", "trainer.eval_batches=2", "trainer.ckpt_every=0",
        "trainer.progress=false", "trainer.sample_every_eval=false", "logger.wandb.mode=disabled",
        "optim.warmup_steps=2", "optim.lr=3e-3", "data.num_partitions=4", "rm.norm_batches=2", *extra,
    ]


@pytest.fixture(scope="module")
def single_runs(prepared_pref_dir, tmp_path_factory) -> dict[str, str]:
    runs = {}
    for stage in ("rm", "dpo"):
        runs[stage] = str(tmp_path_factory.mktemp(f"single_{stage}"))
        train(overrides(stage, prepared_pref_dir, runs[stage]))
    return runs


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "zero2", "zero3"])
@pytest.mark.parametrize("stage", ["rm", "dpo"])
def test_two_ranks_match_one_process(prepared_pref_dir, single_runs, tmp_path, stage, strategy):
    run = str(tmp_path / "run")
    torchrun(overrides(stage, prepared_pref_dir, run, f"strategy={strategy}"))
    got, ref = read_metrics(run), read_metrics(single_runs[stage])
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        for key in KEYS[stage]:
            assert abs(got[step][key] - ref[step][key]) <= TOL * max(1.0, abs(ref[step][key])), (step, key)
    gv, rv = read_metrics(run, "val")[STEPS], read_metrics(single_runs[stage], "val")[STEPS]
    for key in KEYS[stage] + (("kl",) if stage == "dpo" else ()):
        assert abs(gv[key] - rv[key]) <= TOL * max(1.0, abs(rv[key])), ("val", key)
    a, b = read_model_state(resolve(run)), read_model_state(resolve(single_runs[stage]))
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=TOL, rtol=0), k
    if stage == "rm":  # the normalisation pass ran on every rank's part of the train split
        from igpt.checkpoint import read_meta

        m, r = read_meta(resolve(run))["reward_norm"]["mean"], read_meta(resolve(single_runs[stage]))["reward_norm"]
        assert m == pytest.approx(r["mean"], abs=1e-5)
