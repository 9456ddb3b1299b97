"""Run igpt's trainer in-process from Hydra-style overrides, and read a run's metrics back."""

from __future__ import annotations

import json
import os

from hydra import compose, initialize_config_dir

from igpt.config import register, validate
from igpt.train import CONF_DIR, run, setup_logging

register()


def compose_config(overrides: list[str]):
    with initialize_config_dir(version_base="1.3", config_dir=CONF_DIR):
        return compose("config", overrides=overrides)


def make_trainer(overrides: list[str]):
    from igpt.trainer import Trainer

    cfg = validate(compose_config(overrides))
    setup_logging(cfg.run_dir)
    return Trainer(cfg)


def train_and_stop(overrides: list[str], at_step: int):
    """Run the trainer and have it stop (the preemption path: checkpoint, ``preempted``, exit) after step
    ``at_step``, as if a signal arrived during that step; return the (closed) trainer."""
    trainer = make_trainer(overrides)
    step_fn = trainer.train_step

    def step_then_signal(batch):
        out = step_fn(batch)
        if trainer.step == at_step - 1:  # the loop increments the step after this returns
            trainer.stop.reason = "test"
        return out

    trainer.train_step = step_then_signal
    try:
        trainer.fit()
    finally:
        trainer.close()
    return trainer


def train_steps(run_dir: str, split: str = "train") -> list[int]:
    """Every step logged in ``metrics.jsonl``, in order and with repeats (a restart would log its steps again)."""
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [rec["step"] for rec in map(json.loads, f) if rec["split"] == split]


def train(overrides: list[str]) -> dict[str, float]:
    return run(compose_config(overrides))


def read_metrics(run_dir: str, split: str = "train") -> dict[int, dict]:
    """The last record per step of one split (a resumed run appends the steps it redoes)."""
    out: dict[int, dict] = {}
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            if rec["split"] == split:
                out[rec["step"]] = rec
    return out
