"""A non-finite loss skips its update on every strategy: weights and optimizer state stay exactly as they were,
training goes on, and the count of bad steps in a row starts again after a good step.

``IGPT_FAULT_NAN_STEPS=3,5`` makes rank 0's first micro-batch of steps 3 and 5 return a NaN loss (the tests' fault
injection, tests/faults.py), which turns every rank's gradients non-finite through the gradient reduction. With
``trainer.max_bad_steps=2`` the run would stop at step 5 if the count of bad steps in a row were not reset by step 4.
A checkpoint after every step lets each skipped step be compared with the one before it.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from igpt.checkpoint import read_dcp, read_model_state
from tests.faults import install
from tests.test_strategies import ckpt, overrides, torchrun
from tests.trainutil import read_metrics, train

STEPS = 6
NAN = {"IGPT_FAULT_NAN_STEPS": "3,5"}


def optimizer_state(ckpt_dir: str, strategy: str) -> dict[str, torch.Tensor]:
    """Every tensor of the optimizer state a checkpoint holds (exp_avg, exp_avg_sq, ...), flattened by key."""
    out: dict[str, torch.Tensor] = {}

    def walk(prefix: str, obj) -> None:
        if isinstance(obj, torch.Tensor):
            out[prefix] = obj
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(f"{prefix}.{k}", v)
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(f"{prefix}.{i}", v)

    if strategy == "single":
        walk("", torch.load(os.path.join(ckpt_dir, "optimizer.pt"), weights_only=True)["state"])
    elif strategy == "fsdp":
        walk("", read_dcp(os.path.join(ckpt_dir, "optim")))
    else:  # ZeRO: AdamW's state per parameter
        from safetensors.torch import load_file

        walk("", load_file(os.path.join(ckpt_dir, "optimizer.safetensors")))
    assert out, f"{ckpt_dir}: no optimizer state found"
    return out


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("strategy", ["single", pytest.param("fsdp", marks=pytest.mark.dist),
                                      pytest.param("zero2", marks=pytest.mark.dist)])
def test_non_finite_step_changes_nothing_and_training_goes_on(prepared_text_dir, tmp_path, strategy, monkeypatch):
    run = str(tmp_path / "run")
    args = overrides(prepared_text_dir, run, f"strategy={strategy}", f"trainer.max_steps={STEPS}",
                     "trainer.ckpt_every=1", "trainer.keep_last=0", "trainer.max_bad_steps=2")
    if strategy == "single":
        install(nan_steps=NAN["IGPT_FAULT_NAN_STEPS"], monkeypatch=monkeypatch)
        train(args)
    else:
        torchrun(args, **NAN)
    metrics = read_metrics(run)
    assert sorted(metrics) == list(range(1, STEPS + 1))  # the run went on to the end: the bad count was reset
    for step in range(1, STEPS + 1):
        assert math.isfinite(metrics[step]["loss"]) == (step not in (3, 5)), step
    assert [metrics[s]["skipped_steps"] for s in (2, 3, 4, 5, 6)] == [0, 1, 1, 2, 2]
    weights = {s: read_model_state(ckpt(run, s)) for s in range(2, STEPS + 1)}
    optim = {s: optimizer_state(ckpt(run, s), strategy) for s in range(2, STEPS + 1)}
    for bad in (3, 5):  # nothing moved in a skipped step ...
        assert same(weights[bad], weights[bad - 1]), f"step {bad} changed the weights"
        assert same(optim[bad], optim[bad - 1]), f"step {bad} changed the optimizer state"
    for good in (4, 6):  # ... and everything moves again after it
        assert not same(weights[good], weights[good - 1]) and not same(optim[good], optim[good - 1]), good
