"""Fault injection for tests, by monkeypatching igpt from outside (production code has no fault branches).

In a subprocess the faults are asked for by environment variables, installed at interpreter start by
``tests/fault_hooks/sitecustomize.py`` (:func:`fault_env` puts that folder first on ``PYTHONPATH``); in-process,
call :func:`install` with a pytest ``monkeypatch``.

- ``IGPT_FAULT_NAN_STEPS=3,5``: rank 0's first micro-batch of those steps returns a NaN loss (the offline step).
- ``IGPT_FAULT_KILL_STEP=3``: the process SIGKILLs itself once step 3 is done (a node lost mid-run).
- ``IGPT_FAULT_CKPT_PAUSE_S=3``: rank 0 pauses inside every checkpoint write, after the files and before meta.json
  and the rename (a window in which a kill leaves a partial checkpoint).
"""

from __future__ import annotations

import logging
import os
import signal
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOOK_DIR = os.path.join(REPO, "tests", "fault_hooks")
ENV = ("IGPT_FAULT_NAN_STEPS", "IGPT_FAULT_KILL_STEP", "IGPT_FAULT_CKPT_PAUSE_S")
log = logging.getLogger("igpt")


def fault_env(env: dict[str, str] | None = None, **faults: str) -> dict[str, str]:
    """``env`` (default: this process's) with ``faults`` (names from :data:`ENV`) and the hook on ``PYTHONPATH``."""
    unknown = set(faults) - set(ENV)
    if unknown:
        raise ValueError(f"unknown faults {sorted(unknown)}; expected {ENV}")
    out = dict(os.environ if env is None else env)
    out.update(faults)
    out["PYTHONPATH"] = os.pathsep.join(p for p in (HOOK_DIR, REPO, out.get("PYTHONPATH")) if p)
    return out


def _setattr(monkeypatch, obj, name: str, value) -> None:
    if monkeypatch is not None:
        monkeypatch.setattr(obj, name, value)
    else:
        setattr(obj, name, value)


def install(nan_steps: str = "", kill_step: str = "", ckpt_pause_s: str = "", monkeypatch=None) -> None:
    """Patch igpt for the faults asked for (the same strings as the environment variables)."""
    steps = {int(s) for s in nan_steps.split(",") if s.strip()}
    if steps:
        import igpt.stages.base as base

        offline_step = base.offline_step

        def nan_step(stage, ctx, batch):
            if not (ctx.is_main and ctx.step + 1 in steps):
                return offline_step(stage, ctx, batch)
            loss, first = stage.loss, [True]

            def poisoned(*args, **kwargs):
                out = loss(*args, **kwargs)
                if first[0]:
                    first[0] = False
                    log.warning("IGPT_FAULT_NAN_STEPS: a non-finite loss at step %d", ctx.step + 1)
                    out.loss_sum = out.loss_sum * float("nan")
                return out

            stage.loss = poisoned
            try:
                return offline_step(stage, ctx, batch)
            finally:
                del stage.loss

        _setattr(monkeypatch, base, "offline_step", nan_step)
    if int(kill_step or 0):
        from igpt.trainer import Trainer

        train_step, at = Trainer.train_step, int(kill_step)

        def kill_after(self, batch):
            if self.step == at:  # step ``at`` is done, with its eval and checkpoint
                log.warning("IGPT_FAULT_KILL_STEP: killing this process (SIGKILL) after step %d", self.step)
                os.kill(os.getpid(), signal.SIGKILL)
            return train_step(self, batch)

        _setattr(monkeypatch, Trainer, "train_step", kill_after)
    if float(ckpt_pause_s or 0) > 0:
        import igpt.checkpoint as checkpoint

        file_sizes, pause = checkpoint._file_sizes, float(ckpt_pause_s)

        def paused(ckpt_dir: str):
            if os.path.basename(ckpt_dir).startswith(".tmp-"):  # inside a write, before meta.json and the rename
                log.warning("IGPT_FAULT_CKPT_PAUSE_S: pausing %.1fs inside the checkpoint write", pause)
                time.sleep(pause)
            return file_sizes(ckpt_dir)

        _setattr(monkeypatch, checkpoint, "_file_sizes", paused)


def install_from_env() -> None:
    env = {name: os.environ.get(name, "") for name in ENV}
    if any(env.values()):
        install(env["IGPT_FAULT_NAN_STEPS"], env["IGPT_FAULT_KILL_STEP"], env["IGPT_FAULT_CKPT_PAUSE_S"])
