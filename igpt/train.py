"""Hydra entry point: ``torchrun igpt/train.py +stage=pretrain|sft [overrides]`` (or plain ``python`` for one process).

Every rank composes the same config; ``igpt.config.validate`` re-checks it against the schema (so ``+key``/``++key``
typos fail too), then the Trainer runs. Rank 0 logs to the console; every rank logs to ``<run_dir>/logs/rank<N>.log``
once the run holds the run_dir's lock (``igpt/runlog.py``).
A failing rank's traceback is recorded for torchrun (``@record``), which ends the other ranks.

Sweeps (``python igpt/train.py -m optim.lr=1e-3,3e-3``, or a sweeper plugin such as ``hydra/sweeper=optuna``): each
job runs in its own ``<hydra.sweep.dir>/<job number>`` unless the job's overrides set ``run_dir`` (two jobs of one
sweep given the same run dir is an error, so no job resumes another's checkpoint), saves the overrides it was launched
with in ``<run_dir>/overrides.yaml``, and returns its final validation loss, which Hydra hands to the sweeper to
optimise (the ``return_value`` of Hydra's ``JobReturn``).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any

# `python igpt/train.py` (and torchrun) put this file's folder first on sys.path, where igpt's own module names
# (kernels, lm_eval, data, eval, ...) would shadow installed packages of the same name. Put the working directory there
# instead, as `python -m` does, so user modules such as `reward.functions=[my_rewards:fn]` import from it.
if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
    sys.path[0] = os.getcwd()

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402
from torch.distributed.elastic.multiprocessing.errors import record  # noqa: E402

from igpt.config import Config, register, validate  # noqa: E402
from igpt.runlog import setup_logging  # noqa: E402

register()
log = logging.getLogger("igpt")
CONF_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")


def hydra_job(cfg: DictConfig) -> dict[str, Any]:
    """The Hydra job this process runs: its task overrides and, in a multirun, the sweep dir and job number. In a
    multirun ``cfg.run_dir`` becomes ``<hydra.sweep.dir>/<hydra.sweep.subdir>`` (Hydra's per-job output dir) unless
    the job's overrides set ``run_dir``, and an unset ``logger.wandb.name`` becomes ``<sweep dir name>-<job number>``.
    Outside a Hydra app (tests compose configs themselves) this returns ``{}`` and changes nothing."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return {}
    hc = HydraConfig.get()
    overrides = list(hc.overrides.task)
    job: dict[str, Any] = {"overrides": overrides}
    if hc.mode == RunMode.MULTIRUN:
        sweep_dir = os.path.abspath(hc.sweep.dir)
        job.update(sweep_dir=sweep_dir, job_num=int(hc.job.num))
        if not any(o.split("=", 1)[0].lstrip("+~") == "run_dir" for o in overrides):
            cfg.run_dir = hc.runtime.output_dir
        if cfg.logger.wandb.name is None:
            cfg.logger.wandb.name = f"{os.path.basename(sweep_dir)}-{hc.job.num}"
    return job


def check_sweep_claim(run_dir: str, job: dict[str, Any]) -> None:
    """Refuse a run dir that another job of the same sweep already used (it would resume that job's checkpoint);
    reads only, before the run starts."""
    if "sweep_dir" not in job:
        return
    claim = os.path.join(run_dir, "sweep.json")
    if not os.path.exists(claim):
        return
    with open(claim, encoding="utf-8") as f:
        other = json.load(f)
    if other.get("sweep_dir") == job["sweep_dir"] and other.get("job_num") != job["job_num"]:
        raise ValueError(
            f"run_dir={run_dir} is used by jobs {other.get('job_num')} and {job['job_num']} of the sweep in "
            f"{job['sweep_dir']}: job {job['job_num']} would resume job {other.get('job_num')}'s checkpoint. "
            "Leave run_dir unset in a multirun (each job gets <hydra.sweep.dir>/<job number>) or make it "
            "differ per job, e.g. run_dir=runs/lr${optim.lr}"
        )


def record_job(run_dir: str, job: dict[str, Any]) -> None:
    """Rank 0, once the run holds its run_dir: write ``<run_dir>/overrides.yaml`` and, for a multirun job,
    ``<run_dir>/sweep.json`` (the claim :func:`check_sweep_claim` reads)."""
    if not job or int(os.environ.get("RANK", 0)) != 0:
        return
    import yaml

    os.makedirs(run_dir, exist_ok=True)
    if "sweep_dir" in job:
        with open(os.path.join(run_dir, "sweep.json"), "w", encoding="utf-8") as f:
            json.dump({"sweep_dir": job["sweep_dir"], "job_num": job["job_num"]}, f)
    with open(os.path.join(run_dir, "overrides.yaml"), "w", encoding="utf-8") as f:
        yaml.safe_dump(job["overrides"], f, default_flow_style=False)


def run(cfg: DictConfig, job: dict[str, Any] | None = None) -> dict[str, float]:
    """Validate, train, tear down. Returns the last evaluation's metrics (``loss``, ``bpb``). ``job`` is
    :func:`hydra_job`'s answer when Hydra launched this process."""
    config = validate(cfg)
    setup_logging(config.run_dir)
    job = job or {}
    check_sweep_claim(config.run_dir, job)
    resolve_wandb(config, job.get("sweep_dir"))
    from igpt.trainer import Trainer

    trainer = Trainer(config)  # holds <run_dir>/run.lock from here: only now does anything go into run_dir
    try:
        record_job(config.run_dir, job)
        return trainer.fit()
    finally:
        trainer.close()


def resolve_wandb(config: Config, sweep_dir: str | None = None) -> None:
    """Fill ``logger.wandb.group`` (see ``igpt.metrics.wandb_group``) so that config.yaml and every checkpoint record
    the group a later stage started from this run inherits."""
    from igpt.metrics import wandb_group

    w = config.logger.wandb
    w.group = wandb_group(config.run_dir, w, config.init_from, sweep_dir)


def final_val_loss(run_dir: str, metrics: dict[str, float]) -> float | None:
    """The run's final validation loss: from this process's last evaluation, else (a run that was already complete
    evaluates nothing) the last ``val`` record of ``<run_dir>/metrics.jsonl``. None for stages whose evaluation has no
    loss (PPO's is reward and KL)."""
    if "loss" in metrics:
        return float(metrics["loss"])
    loss = None
    path = os.path.join(run_dir, "metrics.jsonl")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                rec = json.loads(line)
                if rec.get("split") == "val" and "loss" in rec:
                    loss = float(rec["loss"])
    return loss


@record
@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> float | None:
    """Returns the final validation loss (Hydra passes it to sweepers such as Optuna)."""
    job = hydra_job(cfg)
    # -- user errors and a prompt exit after preemption ---------------------------------------------------------------
    from igpt.errors import IgptError

    try:
        metrics = run(cfg, job)
    except (IgptError, ValueError) as e:  # igpt's typed user errors, config and data errors: one line, no traceback
        log.error("%s", e)
        raise SystemExit(2) from e
    if "sweep_dir" not in job and os.path.exists(os.path.join(cfg.run_dir, "preempted")):
        # stopped by SIGTERM/SIGUSR1/STOP: the checkpoint and `preempted` are on disk and the trainer is closed; skip
        # the interpreter's teardown of the whole heap (it once took 42 s), which Slurm's kill timer would cut short
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    # ------------------------------------------------------------------------------------------------------------
    return final_val_loss(cfg.run_dir, metrics)


if __name__ == "__main__":
    main()
