"""A throw-away single-node Slurm cluster for the tests: install, start, submit, wait, stop.

It runs Debian's ``slurm-wlm`` and ``munge`` without systemd: ``munged --foreground``, ``slurmctld -D`` and
``slurmd -D -N localhost`` are started under ``setsid`` (each in its own process group, so ``stop`` can kill the group),
with every piece of state (munge key and socket, slurm.conf, state save location, spool, logs, pid files) under one
temporary folder. Clients find the cluster through ``SLURM_CONF``, which ``SlurmCluster.env`` sets.

The configuration follows Slurm's own minimal single-node examples (slurm.conf(5), "Quick Start Administrator Guide"):
``proctrack/linuxproc`` and ``task/none`` because there is no cgroup hierarchy to manage, ``select/cons_tres`` so that
``--gpus-per-node`` is understood, no accounting, ``JobRequeue=1``. Two settings make requeue tests fast: a requeued
job may start again only after the credential lifetime (``AuthInfo=...,cred_expire=N``), and the scheduler runs every
``sched_interval`` seconds, so both are set low.

Use it as a context manager::

    with SlurmCluster() as cluster:
        job = cluster.sbatch(["slurm/pretrain.sbatch", "model=tiny"], cwd=repo)
        cluster.wait_for_state(job, {"COMPLETED"}, timeout=120)
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

PACKAGES = ("slurm-wlm", "munge")
BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "sinfo", "scancel")
SBIN_DIRS = ("/usr/sbin", "/sbin", "/usr/local/sbin")
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


class SlurmUnavailable(RuntimeError):
    """Slurm cannot be installed or started here; the message says why (tests turn it into a skip only if not root)."""


def _which(name: str) -> str | None:
    path = os.environ.get("PATH", "") + os.pathsep + os.pathsep.join(SBIN_DIRS)
    return shutil.which(name, path=path)


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if _which(b) is None]


def ensure_installed(timeout: float = 600.0) -> None:
    """Install slurm-wlm and munge with apt-get when a binary is missing.

    Raises ``SlurmUnavailable`` when something is missing and we are not root (or not on a Debian-like system), and
    ``RuntimeError`` with apt's output when the installation itself fails.
    """
    missing = missing_binaries()
    if not missing:
        return
    if os.geteuid() != 0:
        raise SlurmUnavailable(
            f"Slurm binaries {missing} are missing and installing {' '.join(PACKAGES)} needs root "
            f"(run: apt-get install -y --no-install-recommends {' '.join(PACKAGES)})"
        )
    if shutil.which("apt-get") is None:
        raise SlurmUnavailable(f"Slurm binaries {missing} are missing and there is no apt-get to install them")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES],
    ):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    still = missing_binaries()
    if still:
        raise RuntimeError(f"installed {' '.join(PACKAGES)} but {still} are still not on PATH or in {SBIN_DIRS}")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_hardware() -> str:
    """The hardware part of ``slurmd -C`` (CPUs=... RealMemory=...), without NodeName and UpTime."""
    out = subprocess.run([_which("slurmd") or "slurmd", "-C"], capture_output=True, text=True, timeout=30).stdout
    line = next((ln for ln in out.splitlines() if ln.startswith("NodeName=")), "")
    fields = [f for f in line.split() if not f.startswith(("NodeName=", "UpTime="))]
    if not any(f.startswith("CPUs=") for f in fields):
        raise RuntimeError(f"`slurmd -C` printed no CPUs= line; its output was:\n{out}")
    return " ".join(fields)


class SlurmCluster:
    """A single-node Slurm cluster (one node ``localhost``, one partition ``debug``) under a temporary folder."""

    def __init__(
        self,
        root: str | os.PathLike | None = None,
        cred_expire: int = 5,
        sched_interval: int = 1,
        start_timeout: float = 60.0,
    ) -> None:
        self.root = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="igpt-slurm-"))
        self._own_root = root is None
        self.cred_expire = cred_expire
        self.sched_interval = sched_interval
        self.start_timeout = start_timeout
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self._procs: dict[str, subprocess.Popen] = {}

    # ------------------------------------------------------------------ set-up
    @property
    def env(self) -> dict[str, str]:
        """The environment for Slurm clients (sbatch, squeue, ...) talking to this cluster."""
        env = dict(os.environ)
        env["SLURM_CONF"] = str(self.conf)
        env["PATH"] = env.get("PATH", "") + os.pathsep + os.pathsep.join(SBIN_DIRS)
        for key in list(env):
            # A test run inside a real Slurm job must not leak that job's settings into ours.
            if key.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")) and key != "SLURM_CONF":
                del env[key]
        return env

    def _write_config(self) -> None:
        for sub in ("munge", "state", "spool", "log", "run"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root / "munge", 0o700)
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o600)
        r = self.root
        self.ctld_port, self.slurmd_port = _free_port(), _free_port()
        user = os.environ.get("USER") or subprocess.run(["id", "-un"], capture_output=True, text=True).stdout.strip()
        conf = f"""\
# Generated by tests/slurm_cluster.py for a single-node test cluster.
ClusterName=igpttest
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={self.ctld_port}
SlurmdPort={self.slurmd_port}
SlurmUser={user}
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket},cred_expire={self.cred_expire}
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/run/slurmctld.pid
SlurmdPidFile={r}/run/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval={self.sched_interval},bf_interval={self.sched_interval}
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
JobRequeue=1
ReturnToService=2
MinJobAge=600
KillWait=10
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=30
NodeName=localhost NodeAddr=127.0.0.1 {_node_hardware()} State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""
        self.conf.write_text(conf)

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.console", "ab")
        binary = _which(argv[0])
        if binary is None:
            raise SlurmUnavailable(f"{argv[0]} is not installed")
        self._procs[name] = subprocess.Popen(
            [binary, *argv[1:]], env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()

    def start(self) -> SlurmCluster:
        """Start munged, slurmctld and slurmd, then wait until ``sinfo`` shows the node idle."""
        ensure_installed()
        self._write_config()
        m = self.root / "munge"
        try:
            self._spawn(
                "munged",
                ["munged", "--foreground", "--force", f"--socket={self.munge_socket}", f"--key-file={m}/munge.key",
                 f"--log-file={m}/munged.log", f"--pid-file={m}/munged.pid", f"--seed-file={m}/munged.seed"],
            )
            self._wait(lambda: self.munge_socket.exists(), "munged to create its socket", 20)
            self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
            self._spawn("slurmd", ["slurmd", "-D", "-N", "localhost", "-f", str(self.conf)])
            self._wait(self._node_idle, "sinfo to show node localhost idle", self.start_timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _node_idle(self) -> bool:
        proc = self.run(["sinfo", "--noheader", "-N", "-o", "%N %t"], check=False, timeout=10)
        return proc.returncode == 0 and any(ln.split()[1:2] == ["idle"] for ln in proc.stdout.splitlines())

    def _wait(self, ready, what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self._procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited ({proc.returncode}) while waiting for {what}\n{self.logs()}")
            if ready():
                return
            time.sleep(0.3)
        raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}\n{self.logs()}")

    def logs(self, tail: int = 40) -> str:
        """The last lines of every daemon log, for error messages."""
        parts = []
        for path in sorted((self.root / "log").glob("*")) + [self.root / "munge" / "munged.log"]:
            if path.is_file():
                lines = path.read_text(errors="replace").splitlines()[-tail:]
                parts.append(f"----- {path} (last {len(lines)} lines) -----\n" + "\n".join(lines))
        return "\n".join(parts) or f"(no daemon logs under {self.root})"

    def stop(self) -> None:
        """Kill every daemon this object started (their whole process groups), then remove the temporary folder."""
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self._procs.pop(name, None)
            if proc is None:
                continue
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=10)
                    break
                except subprocess.TimeoutExpired:
                    continue
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> SlurmCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ clients
    def run(self, argv: list[str], check: bool = True, timeout: float = 30, **kw) -> subprocess.CompletedProcess:
        env = self.env
        env.update(kw.pop("env", {}) or {})
        proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout, **kw)
        if check and proc.returncode != 0:
            raise RuntimeError(
                f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}\n{self.logs()}"
            )
        return proc

    def sbatch(self, argv: list[str], cwd: str | os.PathLike, env: dict[str, str] | None = None) -> int:
        """Submit ``sbatch --parsable <argv...>`` and return the job id."""
        proc = self.run(["sbatch", "--parsable", *argv], cwd=cwd, env=env)
        match = re.match(r"(\d+)", proc.stdout.strip())
        if not match:
            raise RuntimeError(f"sbatch printed no job id: {proc.stdout!r} {proc.stderr!r}")
        return int(match.group(1))

    def job_info(self, job_id: int) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, RestartCnt, ExitCode, ...); empty when the job is unknown."""
        proc = self.run(["scontrol", "show", "job", "-o", str(job_id)], check=False)
        if proc.returncode != 0:
            return {}
        return dict(f.split("=", 1) for f in proc.stdout.split() if "=" in f)

    def wait_for_state(self, job_id: int, states: Iterable[str], timeout: float, poll: float = 0.5) -> dict[str, str]:
        """Wait until the job's state is one of ``states``; fail early (with logs) on another final state."""
        want = set(states)
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job_info(job_id)
            state = info.get("JobState", "")
            if state in want:
                return info
            if state in FINAL_STATES:
                raise RuntimeError(f"job {job_id} ended {state}, expected {sorted(want)}: {info}\n{self.logs()}")
            time.sleep(poll)
        raise RuntimeError(f"job {job_id} not in {sorted(want)} after {timeout:.0f} s; last info {info}\n{self.logs()}")
