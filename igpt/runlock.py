"""One run per run dir: ``<run_dir>/run.lock``, taken by rank 0 when a run starts and removed when it ends.

The lock file is JSON: ``{"host", "pid", "start", "slurm_job_id"}``. It is created with ``O_CREAT | O_EXCL`` (atomic
on local filesystems and on NFSv3+/Lustre/GPFS), so of two runs started on one run dir the second fails at once with
an error naming the holder (host, pid, start time, Slurm job). A lock left by a run that died without removing it is
taken over, with a warning, when it is provably stale:

- same host and its pid no longer exists (a killed or crashed run);
- same host and pid as this process (a run earlier in this process, e.g. tests or a notebook);
- same Slurm job id (``SLURM_JOB_ID``) as this run: a requeued job (``scontrol requeue``, preemption, the
  ``slurm/`` scripts' requeue on ``preempted``) keeps its job id but may restart on another node, where the old pid
  cannot be checked; its previous incarnation is dead by then;
- another Slurm job that ``squeue`` reports as ended (a job resubmitted after a node failure).

A lock held by a live process, or by another host outside Slurm, is never taken: if that run is known to be dead
(its node crashed), delete ``run.lock`` by hand.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import time
from datetime import datetime, timezone
from typing import Any

from igpt.errors import ConfigError

log = logging.getLogger("igpt")
LOCK_FILE = "run.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _slurm_job_ended(job_id: str) -> bool:
    """Whether ``squeue`` says Slurm job ``job_id`` has ended (False when squeue is absent or fails: unknown)."""
    import shutil
    import subprocess

    if not shutil.which("squeue"):
        return False
    try:
        out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    if out.returncode != 0:  # squeue fails for a job id it no longer knows ("Invalid job id specified")
        return "Invalid job id" in out.stderr
    states = out.stdout.split()
    return not any(s in ("RUNNING", "PENDING", "CONFIGURING", "COMPLETING", "SUSPENDED", "REQUEUED", "RESIZING")
                   for s in states)


def _describe(holder: dict[str, Any]) -> str:
    start = holder.get("start")
    when = datetime.fromtimestamp(start, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC") if start else "?"
    job = f", Slurm job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else ""
    return f"pid {holder.get('pid')} on host {holder.get('host')} (started {when}{job})"


class RunLock:
    def __init__(self, run_dir: str) -> None:
        self.run_dir = run_dir
        self.path = os.path.join(run_dir, LOCK_FILE)
        self.me = {"host": socket.gethostname(), "pid": os.getpid(), "start": time.time(),
                   "slurm_job_id": os.environ.get("SLURM_JOB_ID") or None}
        self.held = False

    def _read(self) -> dict[str, Any] | None:
        try:
            with open(self.path, encoding="utf-8") as f:
                return json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # unreadable or half-written: treated as held by an unknown run

    def _stale_reason(self, holder: dict[str, Any]) -> str | None:
        me = self.me
        if holder.get("host") == me["host"] and holder.get("pid") == me["pid"]:
            return "an earlier run in this process"
        if holder.get("host") == me["host"] and isinstance(holder.get("pid"), int) and not _alive(holder["pid"]):
            return "its process is gone"
        if me["slurm_job_id"] and holder.get("slurm_job_id") == me["slurm_job_id"]:
            return f"the same Slurm job {me['slurm_job_id']} (requeued)"
        if holder.get("slurm_job_id") and _slurm_job_ended(str(holder["slurm_job_id"])):
            return f"its Slurm job {holder['slurm_job_id']} is no longer running (squeue)"
        return None

    def acquire(self) -> None:
        """Take the lock, or raise :class:`ConfigError` naming the run that holds it."""
        os.makedirs(self.run_dir, exist_ok=True)
        data = json.dumps(self.me).encode()
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._read()
                if holder is None:
                    continue  # removed in between: try again
                why = self._stale_reason(holder) if holder else None
                if why is None:
                    raise ConfigError(
                        f"run_dir={self.run_dir} is in use by another run: {_describe(holder)} holds {self.path}. "
                        f"Use another run_dir, or wait for that run to end (if it is dead, delete {self.path})"
                    ) from None
                if why != "an earlier run in this process":
                    log.warning("taking over the stale lock %s of %s: %s", self.path, _describe(holder), why)
                tmp = f"{self.path}.{self.me['host']}.{self.me['pid']}"
                with open(tmp, "wb") as f:
                    f.write(data)
                os.replace(tmp, self.path)
                if self._read() == self.me:
                    self.held = True
                    return
                continue
            except OSError as e:
                if e.errno in (errno.EROFS, errno.EACCES):
                    raise ConfigError(f"run_dir={self.run_dir}: cannot create {self.path} ({e.strerror})") from None
                raise
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            self.held = True
            return
        raise ConfigError(f"run_dir={self.run_dir}: another run keeps taking {self.path}; is a second run starting?")

    def release(self) -> None:
        """Remove the lock if this run still holds it."""
        if self.held and self._read() == self.me:
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass
        self.held = False
