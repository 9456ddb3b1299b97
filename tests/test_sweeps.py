"""Hydra multiruns of igpt/train.py: one run dir per job, no job resuming another's checkpoint, the final validation
loss returned to the sweeper (basic sweeper and the Optuna sweeper plugin)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from tests.conftest import REPO, TINY
from tests.trainutil import read_metrics


def sweep_args(data_dir: str, sweep_dir: str, *extra: str) -> list[str]:
    return [
        "igpt/train.py", "-m", "+stage=pretrain", f"data.dir={data_dir}", f"hydra.sweep.dir={sweep_dir}", *TINY,
        "trainer.global_batch_size=8", "trainer.micro_batch_size=8", "trainer.max_steps=3", "trainer.eval_every=0",
        "trainer.ckpt_every=3", "trainer.eval_batches=1", "trainer.progress=false", "trainer.sample_every_eval=false",
        "logger.wandb.mode=disabled", "optim.warmup_steps=1", *extra,
    ]  # fmt: skip


def launch(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.mark.integration
def test_two_job_sweep_gives_each_job_its_own_run(prepared_text_dir, tmp_path):
    sweep = tmp_path / "sweep"
    proc = launch(sweep_args(prepared_text_dir, str(sweep), "optim.lr=1e-3,3e-3"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    for num, lr in ((0, 1e-3), (1, 3e-3)):
        run_dir = sweep / str(num)
        assert yaml.safe_load((run_dir / "overrides.yaml").read_text())[-1] == f"optim.lr={lr}"
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert config["run_dir"] == str(run_dir) and config["optim"]["lr"] == lr
        assert config["logger"]["wandb"]["name"] == f"sweep-{num}" and config["logger"]["wandb"]["group"] == "sweep"
        assert json.loads((run_dir / "sweep.json").read_text()) == {"sweep_dir": str(sweep), "job_num": num}
        assert sorted(read_metrics(str(run_dir))) == [1, 2, 3]  # trained from step 1: nothing resumed
        assert "resumed from" not in (run_dir / "logs" / "rank0.log").read_text()
        assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_0000003"
        assert list(read_metrics(str(run_dir), "val")) == [3]
    first, second = (read_metrics(str(sweep / n))[3]["lr"] for n in "01")
    assert second == pytest.approx(3 * first)


def test_sweep_jobs_sharing_a_run_dir_fail(prepared_text_dir, tmp_path):
    shared = tmp_path / "shared"
    proc = launch(sweep_args(prepared_text_dir, str(tmp_path / "sweep"), f"run_dir={shared}", "optim.lr=1e-3,3e-3",
                             "trainer.max_steps=1", "trainer.ckpt_every=1"))  # fmt: skip
    assert proc.returncode != 0
    assert f"run_dir={shared} is used by jobs 0 and 1 of the sweep" in proc.stderr
    assert sorted(read_metrics(str(shared))) == [1]  # job 1 never trained, so never resumed job 0's checkpoint


@pytest.mark.integration
def test_optuna_sweep_minimises_the_returned_val_loss(prepared_text_dir, tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    sweep = tmp_path / "optuna"
    proc = launch(sweep_args(
        prepared_text_dir, str(sweep), "hydra/sweeper=optuna", "hydra.sweeper.n_trials=3", "hydra.sweeper.n_jobs=1",
        "hydra.sweeper.direction=minimize", "hydra.sweeper.sampler.seed=1", "optim.lr=tag(log,interval(1e-4,1e-2))",
    ))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = {}
    for num in range(3):
        run_dir = str(sweep / str(num))
        lr = yaml.safe_load(open(os.path.join(run_dir, "config.yaml")))["optim"]["lr"]
        losses[lr] = read_metrics(run_dir, "val")[3]["loss"]
    assert len(losses) == 3  # three trials, three learning rates, three run dirs
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert results["best_value"] == pytest.approx(min(losses.values()), rel=1e-9)
    assert results["best_params"]["optim.lr"] == pytest.approx(min(losses, key=losses.get))
