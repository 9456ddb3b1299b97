"""The Slurm launch scripts on a real single-node Slurm cluster (tests/slurm_cluster.py starts and stops it).

``sbatch slurm/pretrain.sbatch`` runs unchanged: the test only overrides the allocation on the sbatch command line
(``--gpus-per-node=0 --cpus-per-task=2``: this node has no GPUs, so the script starts one rank per allocated CPU, two
gloo ranks under torchrun) and points the scripts at this checkout's Python and a temporary runs folder through
``IGPT_PYTHON`` and ``IGPT_RUNS_DIR``. A second job is preempted mid-run the way ``#SBATCH --signal=B:USR1@<s>`` does
it (``scancel --batch --signal=USR1``): it must checkpoint, requeue itself (``scontrol requeue``), resume in the same
run directory and end with exactly the losses of the uninterrupted job.

Slurm is installed with apt-get when missing (as root); without root and without Slurm the tests are skipped.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.conftest import REPO, TINY
from tests.slurm_cluster import SlurmCluster, SlurmUnavailable, ensure_installed
from tests.trainutil import read_metrics

MAX_STEPS = 16
SCRIPTS = ("slurm/pretrain.sbatch", "slurm/sft.sbatch")
pytestmark = pytest.mark.dist
# This node has no GPUs and few CPUs; everything else comes from the scripts' own #SBATCH lines.
ALLOCATION = ["--gpus-per-node=0", "--cpus-per-task=2"]


@pytest.fixture(scope="session")
def slurm():
    try:
        ensure_installed()
    except SlurmUnavailable as e:
        pytest.skip(str(e))
    if os.geteuid() != 0:
        pytest.skip("the test cluster runs slurmd, which needs root (SlurmdUser=root); CI runs as root")
    cluster = SlurmCluster()
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("slurm-runs")


def submit(slurm: SlurmCluster, script: str, runs_dir: Path, args: list[str], **env: str) -> int:
    """``sbatch <ALLOCATION> <script> <args>`` from the repository root, as a user would run it.

    Only the pointer file of ``#SBATCH --output`` is redirected, so the checkout stays clean.
    """
    argv = [*ALLOCATION, f"--output={runs_dir}/slurm-%x-%j.out", script, *args]
    return slurm.sbatch(argv, REPO, {**job_env(runs_dir), **env})


def job_env(runs_dir: Path) -> dict[str, str]:
    return {"IGPT_PYTHON": sys.executable, "IGPT_RUNS_DIR": str(runs_dir), "OMP_NUM_THREADS": "1"}


def overrides(data_dir: str) -> list[str]:
    return [
        f"data.dir={data_dir}", *TINY, "trainer.global_batch_size=8", "trainer.micro_batch_size=2",
        f"trainer.max_steps={MAX_STEPS}", "trainer.ckpt_every=4", "trainer.eval_every=0", "trainer.eval_batches=1",
        "trainer.progress=false", "trainer.sample_every_eval=false", "logger.wandb.mode=disabled",
        "optim.warmup_steps=2", "optim.lr=3e-3", "device=cpu",
    ]


def job_log(run_dir: Path, job_id: int) -> str:
    path = run_dir / "logs" / f"slurm-{job_id}.log"
    return path.read_text(errors="replace") if path.exists() else f"(no {path})"


def train_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    lines = [ln for ln in path.read_text().splitlines(keepends=True) if ln.endswith("\n")]
    return [r["step"] for r in map(json.loads, lines) if r.get("split") == "train"]


def test_sbatch_scripts_are_valid(slurm):
    """Both scripts parse in bash, Slurm accepts their #SBATCH lines, and the launcher refuses to run outside a job."""
    for script in SCRIPTS:
        text = (Path(REPO) / script).read_text()
        for option in ("--requeue", "--signal=B:USR1@", "--open-mode=append", "--ntasks-per-node=1"):
            assert f"#SBATCH {option}" in text, f"{script}: missing #SBATCH {option}"
        subprocess.run(["bash", "-n", script], cwd=REPO, check=True)
        proc = slurm.run(["sbatch", "--test-only", *ALLOCATION, script], cwd=REPO, check=False)
        assert proc.returncode == 0 and "to start at" in proc.stderr, f"{script}: {proc.stdout}{proc.stderr}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    proc = subprocess.run(["bash", "slurm/launch.sh", "pretrain"], cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 2 and "inside a Slurm job" in proc.stderr, proc.stderr


@pytest.fixture(scope="module")
def reference_job(slurm, prepared_text_dir, runs_dir) -> tuple[int, Path, float]:
    """An uninterrupted ``sbatch slurm/pretrain.sbatch`` run: (job id, run dir, seconds)."""
    t0 = time.monotonic()
    job = submit(slurm, "slurm/pretrain.sbatch", runs_dir, overrides(prepared_text_dir))
    run_dir = runs_dir / f"igpt-pretrain-{job}"
    try:
        slurm.wait_for_state(job, {"COMPLETED"}, timeout=300)
    except RuntimeError as e:
        raise AssertionError(f"{e}\n{job_log(run_dir, job)}") from None
    return job, run_dir, time.monotonic() - t0


def test_sbatch_pretrain_runs_to_completion(slurm, reference_job):
    job, run_dir, seconds = reference_job
    info = slurm.job_info(job)
    log = job_log(run_dir, job)
    assert info["ExitCode"] == "0:0" and info["Restarts"] == "0", (info, log)
    assert info["Requeue"] == "1", "the script must ask for --requeue"
    # Two ranks (one per allocated CPU) rendezvoused through c10d and trained with DDP.
    assert "nproc_per_node=2" in log and "rendezvous=localhost:" in log, log
    cfg = OmegaConf.load(run_dir / "config.yaml")
    assert cfg.strategy.name == "ddp" and cfg.run_dir == str(run_dir) and cfg.resume == "auto", log
    assert (run_dir / "logs" / "rank1.log").exists(), "rank 1 did not run"
    metrics = read_metrics(str(run_dir))
    assert sorted(metrics) == list(range(1, MAX_STEPS + 1)), log
    assert metrics[MAX_STEPS]["loss"] < metrics[1]["loss"], "the job did not learn"
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{MAX_STEPS:07d}"
    assert not (run_dir / "preempted").exists()
    pointer = (run_dir.parent / f"slurm-igpt-pretrain-{job}.out").read_text()
    assert f"logs to {run_dir}/logs/slurm-{job}.log" in pointer, pointer
    print(f"\nuninterrupted sbatch job: {seconds:.1f} s")


def start_and_wait_for_step(slurm: SlurmCluster, data_dir: str, runs_dir: Path, step: int) -> tuple[int, Path]:
    """Submit the pretraining job and return (job id, run dir) once it has logged ``step`` training steps."""
    job = submit(slurm, "slurm/pretrain.sbatch", runs_dir, overrides(data_dir))
    run_dir = runs_dir / f"igpt-pretrain-{job}"
    deadline = time.monotonic() + 240
    while len(train_steps(run_dir)) < step:
        assert time.monotonic() < deadline, f"job {job} stuck before step {step}\n{job_log(run_dir, job)}"
        assert slurm.job_info(job).get("JobState") in ("PENDING", "RUNNING", "CONFIGURING"), job_log(run_dir, job)
        time.sleep(0.05)
    return job, run_dir


@pytest.mark.parametrize("sig", ["USR1", "TERM"])
def test_preempted_job_requeues_and_resumes(slurm, prepared_text_dir, runs_dir, reference_job, sig):
    """USR1 (what `#SBATCH --signal=B:USR1@<s>` sends before the time limit) or TERM (`scancel --batch
    --signal=TERM`, a preemption) to the batch shell mid-run: checkpoint, `scontrol requeue`, resume in the same run
    dir, the same losses as the uninterrupted job."""
    _, ref_dir, _ = reference_job
    t0 = time.monotonic()
    job, run_dir = start_and_wait_for_step(slurm, prepared_text_dir, runs_dir, 5)
    signalled_after = max(train_steps(run_dir))
    t_signal = time.monotonic()
    slurm.run(["scancel", "--batch", f"--signal={sig}", str(job)])  # the batch shell only, as --signal=B: does
    try:
        info = slurm.wait_for_state(job, {"COMPLETED"}, timeout=300)
    except RuntimeError as e:
        raise AssertionError(f"{e}\n{job_log(run_dir, job)}") from None
    t_done = time.monotonic()
    log = job_log(run_dir, job)

    assert info["Restarts"] == "1" and info["ExitCode"] == "0:0", (info, log)
    assert f"received SIG{sig}" in log and f"requeueing job {job}" in log and "(restart 1)" in log, log
    steps = train_steps(run_dir)
    assert len(steps) == len(set(steps)), f"a checkpointed stop must not redo steps after the requeue: {steps}"
    stop_line = next(ln for ln in log.splitlines() if "run stopped early" in ln)
    stopped_at = json.loads(stop_line[stop_line.index("{") : stop_line.rindex("}") + 1])["step"]
    assert signalled_after <= stopped_at < MAX_STEPS, (signalled_after, stopped_at, log)
    assert not (run_dir / "preempted").exists() and not (run_dir / "STOP").exists()

    got, ref = read_metrics(str(run_dir)), read_metrics(str(ref_dir))
    assert sorted(got) == sorted(ref) == list(range(1, MAX_STEPS + 1))
    diff = [(s, got[s]["loss"], ref[s]["loss"]) for s in ref if got[s]["loss"] != ref[s]["loss"]]
    assert not diff, f"losses differ from the uninterrupted job at (step, got, expected) {diff[:5]}"
    print(
        f"\npreempted job: stopped at step {stopped_at}, {t_done - t0:.1f} s in all, "
        f"{t_done - t_signal:.1f} s from the signal to completion"
    )


def test_scancel_checkpoints_and_does_not_requeue(slurm, prepared_text_dir, runs_dir, reference_job):
    """A plain `scancel`: Slurm signals the batch shell and every rank; they checkpoint the step they are in before
    KillWait runs out, the requeue is refused (the job is cancelled), and the same command resumes it later."""
    job, run_dir = start_and_wait_for_step(slurm, prepared_text_dir, runs_dir, 5)
    slurm.run(["scancel", str(job)])
    info = slurm.wait_for_state(job, {"CANCELLED"}, timeout=120)
    deadline = time.monotonic() + 60
    while not (run_dir / "preempted").exists() and time.monotonic() < deadline:  # the ranks write it as they stop
        time.sleep(0.1)
    log = job_log(run_dir, job)
    assert info["Restarts"] == "0", (info, log)
    stopped = json.loads((run_dir / "preempted").read_text())["step"]
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert latest == f"step_{stopped:07d}" and 5 <= stopped < MAX_STEPS, (latest, stopped, log)
    assert sorted(set(train_steps(run_dir))) == list(range(1, stopped + 1))


def test_sbatch_sft_with_one_process_per_node(slurm, prepared_sft_dir, runs_dir, reference_job):
    """slurm/sft.sbatch runs the SFT stage from the pretrained run; IGPT_NPROC_PER_NODE=1 means one plain process."""
    _, pretrain_dir, _ = reference_job
    run_dir = runs_dir / "sft-explicit"
    over = [o for o in overrides(prepared_sft_dir) if not o.startswith("trainer.max_steps=")]
    extra = ["trainer.max_steps=2", "data.num_partitions=2", f"init_from={pretrain_dir}", f"run_dir={run_dir}"]
    job = submit(slurm, "slurm/sft.sbatch", runs_dir, [*over, *extra], IGPT_NPROC_PER_NODE="1")
    try:
        info = slurm.wait_for_state(job, {"COMPLETED"}, timeout=300)
    except RuntimeError as e:
        raise AssertionError(f"{e}\n{job_log(run_dir, job)}") from None
    log = job_log(run_dir, job)
    assert info["JobName"] == "igpt-sft" and info["ExitCode"] == "0:0", (info, log)
    assert "stage=sft" in log and "nproc_per_node=1" in log, log
    cfg = OmegaConf.load(run_dir / "config.yaml")
    assert cfg.stage.name == "sft" and cfg.strategy.name == "single" and cfg.init_from == str(pretrain_dir), log
    assert sorted(read_metrics(str(run_dir))) == [1, 2], log
