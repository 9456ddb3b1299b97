"""Fault tolerance outside Slurm: kills and signals at random points, then ``resume=auto``.

Each test runs the real CLI (``python igpt/train.py``) in a subprocess, interrupts it, resumes it, and compares the
train loss of every step (the last record per step, since a resumed run appends the steps it redoes) with an
uninterrupted run of the same config. In fp32 on one process the trainer promises bit-identical losses, so the
comparison is exact. The cases follow torchtitan's and Megatron's fault-tolerance checks:

* SIGKILL at a random step: the run restarts from the newest checkpoint and redoes the steps after it.
* SIGKILL while a checkpoint is being written (``IGPT_FAULT_CKPT_PAUSE_S`` holds the writer between writing the
  temporary directory and the atomic rename): ``latest`` still names the previous checkpoint, which resume uses.
* SIGTERM / SIGUSR1 (what Slurm sends before a time limit or on preemption): the run finishes its step, checkpoints,
  writes ``<run_dir>/preempted`` and exits 0; resuming redoes nothing.
* SIGTERM to ``torchrun`` with two ranks: torchrun forwards it to the workers, which checkpoint before exiting.

The random step is drawn from ``IGPT_TEST_SEED`` (default: a fresh seed, printed in every failure message).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, TINY
from tests.faults import fault_env
from tests.trainutil import read_metrics, train

MAX_STEPS = 24
CKPT_EVERY = 4
SEED = int(os.environ.get("IGPT_TEST_SEED", random.SystemRandom().randrange(1 << 30)))


def overrides(data_dir: str, run_dir: Path, *extra: str) -> list[str]:
    return [
        "+stage=pretrain", f"data.dir={data_dir}", f"run_dir={run_dir}", *TINY, "trainer.global_batch_size=8",
        "trainer.micro_batch_size=4", f"trainer.max_steps={MAX_STEPS}", f"trainer.ckpt_every={CKPT_EVERY}",
        "trainer.keep_last=0", "trainer.eval_every=0", "trainer.eval_batches=1", "trainer.progress=false",
        "trainer.sample_every_eval=false", "logger.wandb.mode=disabled", "optim.warmup_steps=2", "optim.lr=3e-3",
        "device=cpu", *extra,
    ]


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "IGPT_FAULT_"))}
    # One intra-op thread: the same reduction order in every run (bit-identical losses) and no CPU oversubscription.
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    faults = {k: v for k, v in extra.items() if k.startswith("IGPT_FAULT_")}
    env.update({k: v for k, v in extra.items() if k not in faults})
    return fault_env(env, **faults) if faults else env  # test-only fault injection (tests/faults.py)


class Run:
    """A training subprocess in its own process group, logging to ``<log>``."""

    def __init__(self, argv: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.log = log
        with open(log, "ab") as f:
            self.proc = subprocess.Popen(
                argv, cwd=REPO, env=env or child_env(), stdout=f, stderr=subprocess.STDOUT, start_new_session=True
            )

    def tail(self, n: int = 40) -> str:
        lines = self.log.read_text(errors="replace").splitlines()[-n:]
        return f"----- {self.log} (last {len(lines)} lines) -----\n" + "\n".join(lines)

    def wait(self, timeout: float = 180) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"run did not finish within {timeout:.0f} s (seed {SEED})\n{self.tail()}") from None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def wait_until(self, what: str, ready: Callable[[], bool], timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready():
                return
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"run exited with code {self.proc.returncode} before {what} (seed {SEED})\n{self.tail()}"
                )
            time.sleep(0.005)
        self.kill()
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (seed {SEED})\n{self.tail()}")


def python_run(over: list[str], log: Path, **env: str) -> Run:
    return Run([sys.executable, "igpt/train.py", *over], log, child_env(**env))


def logged_steps(run_dir: Path) -> list[int]:
    """Train steps in metrics.jsonl so far, in file order (tolerates a half-written last line)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    steps = []
    for line in path.read_text().splitlines(keepends=True):
        if line.endswith("\n"):
            rec = json.loads(line)
            if rec.get("split") == "train":
                steps.append(rec["step"])
    return steps


def latest(run_dir: Path) -> str:
    return (run_dir / "checkpoints" / "latest").read_text().strip()


def assert_same_losses(run_dir: Path, reference: dict[int, dict], context: str) -> None:
    got = read_metrics(str(run_dir))
    assert sorted(got) == list(range(1, MAX_STEPS + 1)), f"{context}: steps logged {sorted(got)}"
    diff = [(s, got[s]["loss"], reference[s]["loss"]) for s in got if got[s]["loss"] != reference[s]["loss"]]
    assert not diff, f"{context}: losses differ from the uninterrupted run at (step, got, expected) {diff[:5]}"


@pytest.fixture(scope="module")
def reference(prepared_text_dir, tmp_path_factory) -> dict[int, dict]:
    """The uninterrupted run every interrupted run must match, step by step (in-process: no extra start-up cost)."""
    run_dir = tmp_path_factory.mktemp("ft-reference") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocesses (OMP_NUM_THREADS=1): the same reduction order
    try:
        train(overrides(prepared_text_dir, run_dir))
    finally:
        torch.set_num_threads(threads)
    ref = read_metrics(str(run_dir))
    assert sorted(ref) == list(range(1, MAX_STEPS + 1))
    assert ref[MAX_STEPS]["loss"] < ref[1]["loss"], "the reference run did not learn"
    return ref


def redone_steps(run_dir: Path) -> list[int]:
    steps = logged_steps(run_dir)
    return sorted(s for s in set(steps) if steps.count(s) > 1)


def test_sigkill_mid_checkpoint_and_at_random_step_then_resume(prepared_text_dir, reference, tmp_path):
    """SIGKILL while checkpoint 8 is half written, resume, SIGKILL again after a random step, resume to the end.

    The first kill must leave ``latest`` on checkpoint 4 (the half-written one is never used); each resume restarts
    from the newest complete checkpoint and redoes exactly the steps after it; the final losses match the reference.
    """
    run_dir = tmp_path / "run"
    over = overrides(prepared_text_dir, run_dir)
    ckpt = run_dir / "checkpoints"
    partial = ckpt / f".tmp-step_{2 * CKPT_EVERY:07d}"

    # 1. Killed inside the write of checkpoint 8 (IGPT_FAULT_CKPT_PAUSE_S holds the writer before the rename).
    run = python_run(over, tmp_path / "train.log", IGPT_FAULT_CKPT_PAUSE_S="3")
    run.wait_until(f"the write of {partial.name}", lambda: (partial / "train_state.pt").exists(), timeout=180)
    run.kill()
    assert run.wait() == -signal.SIGKILL, run.tail()
    assert latest(run_dir) == f"step_{CKPT_EVERY:07d}", "latest must still name the last complete checkpoint"
    assert not (ckpt / f"step_{2 * CKPT_EVERY:07d}").exists() and not (partial / "meta.json").exists()

    # 2. Resumed from checkpoint 4, killed after a random later step.
    kill_after = random.Random(SEED).randint(2 * CKPT_EVERY + 1, MAX_STEPS - 4)
    run = python_run(over, tmp_path / "train.log")
    run.wait_until(f"step {kill_after}", lambda: max(logged_steps(run_dir), default=0) >= kill_after)
    run.kill()
    assert run.wait() == -signal.SIGKILL, run.tail()
    killed_at = max(logged_steps(run_dir))
    assert killed_at < MAX_STEPS, f"the run finished before the kill (seed {SEED})"
    assert redone_steps(run_dir) == list(range(CKPT_EVERY + 1, 2 * CKPT_EVERY + 1)), "resume must start at step 4"
    ckpt_step = int(latest(run_dir).removeprefix("step_"))
    assert 2 * CKPT_EVERY <= ckpt_step <= killed_at, (latest(run_dir), killed_at)

    # 3. Resumed from the newest checkpoint to the end.
    run = python_run(over, tmp_path / "train.log")
    assert run.wait() == 0, run.tail()
    expected = list(range(CKPT_EVERY + 1, 2 * CKPT_EVERY + 1)) + list(range(ckpt_step + 1, killed_at + 1))
    assert redone_steps(run_dir) == expected, (redone_steps(run_dir), ckpt_step, killed_at, SEED)
    assert_same_losses(run_dir, reference, f"kills mid-checkpoint and after step {killed_at} (seed {SEED})")
    assert latest(run_dir) == f"step_{MAX_STEPS:07d}"


def test_signals_checkpoint_and_exit_cleanly(prepared_text_dir, reference, tmp_path):
    """SIGUSR1, then (after resuming) SIGTERM: each time the run finishes its step, checkpoints, writes `preempted`
    and exits 0; no step is ever redone, and the final losses match the reference."""
    run_dir = tmp_path / "run"
    over = overrides(prepared_text_dir, run_dir)
    rng = random.Random(SEED + 1)
    first = 0
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        send_after = rng.randint(first + 2, first + (MAX_STEPS - first) // 2)
        run = python_run(over, tmp_path / "train.log")
        run.wait_until(f"step {send_after}", lambda n=send_after: max(logged_steps(run_dir), default=0) >= n)
        os.kill(run.proc.pid, sig)
        assert run.wait(timeout=120) == 0, f"{sig.name} must end the run with exit code 0\n{run.tail()}"
        stopped = json.loads((run_dir / "preempted").read_text())
        steps = logged_steps(run_dir)
        assert stopped["step"] == max(steps) and send_after <= stopped["step"] < MAX_STEPS, (stopped, steps, SEED)
        assert sig.name in stopped["reason"], stopped
        assert latest(run_dir) == f"step_{stopped['step']:07d}", "the stop must checkpoint its last step"
        assert len(steps) == len(set(steps)), f"a checkpointed stop must not make the resumed run redo steps: {steps}"
        first = stopped["step"]

    run = python_run(over, tmp_path / "train.log")
    assert run.wait() == 0, run.tail()
    steps = logged_steps(run_dir)
    assert len(steps) == len(set(steps)), f"a checkpointed stop must not make the resumed run redo steps: {steps}"
    assert not (run_dir / "preempted").exists(), "a finished run must remove the stale `preempted` file"
    assert_same_losses(run_dir, reference, f"SIGUSR1 then SIGTERM (seed {SEED})")


def test_sigterm_to_torchrun_checkpoints_every_rank(prepared_text_dir, tmp_path):
    """SIGTERM to torchrun (2 gloo ranks): it forwards SIGTERM and the ranks checkpoint the same step before exiting.

    torchrun gives its workers 30 s after forwarding before SIGKILL and then exits non-zero itself (its agent
    re-raises the signal), which is why the Slurm scripts ask for a stop through ``<run_dir>/STOP`` and decide on
    requeueing from ``<run_dir>/preempted`` rather than from exit codes. (A raw SIGUSR1 kills torchrun outright.)
    Resuming a DDP run exactly is covered by tests/test_slurm.py.
    """
    run_dir = tmp_path / "run"
    over = overrides(prepared_text_dir, run_dir, "strategy=ddp")
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "igpt/train.py", *over]
    run = Run(argv, tmp_path / "train.log")
    run.wait_until("step 3", lambda: max(logged_steps(run_dir), default=0) >= 3)
    os.kill(run.proc.pid, signal.SIGTERM)  # torchrun only, not its process group
    rc = run.wait(timeout=120)
    assert (run_dir / "preempted").exists(), f"torchrun exited with {rc} but no rank wrote `preempted`\n{run.tail()}"
    stopped = json.loads((run_dir / "preempted").read_text())
    assert latest(run_dir) == f"step_{stopped['step']:07d}", run.tail()
    assert max(logged_steps(run_dir)) == stopped["step"] < MAX_STEPS
    for rank in (0, 1):
        log = (run_dir / "logs" / f"rank{rank}.log").read_text()
        assert f"stopped at step {stopped['step']}" in log, f"rank {rank} did not stop cleanly:\n{log[-2000:]}"
