"""The run's log: the console at once, ``<run_dir>/logs/rank<N>.log`` once the run holds its run_dir.

:func:`setup_logging` starts the console (rank 0 at INFO, the others at WARNING) and holds every record in memory;
:func:`attach_run_log` (the trainer calls it right after it took ``<run_dir>/run.lock``) opens the rank's file and
writes the held records into it first. A run refused because another run holds the run_dir thus writes nothing into
that run's folder (no line appended to its logs, no folder created).
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys

_FORMAT = "%(asctime)s [rank{rank}] %(levelname)s %(message)s"


class _Pending(logging.handlers.MemoryHandler):
    """Holds the records logged before the run's file is open (flushed into it by :func:`attach_run_log`)."""

    def __init__(self) -> None:
        super().__init__(capacity=1 << 30, flushLevel=logging.CRITICAL + 1)

    def shouldFlush(self, record: logging.LogRecord) -> bool:
        return self.target is not None and super().shouldFlush(record)


def _rank() -> int:
    return int(os.environ.get("RANK", 0))


def setup_logging(run_dir: str | None = None) -> None:
    """Console logging now; the run's log file once :func:`attach_run_log` is called (``run_dir`` is accepted for
    callers that name it; the file goes where the trainer's lock is)."""
    rank = _rank()
    fmt = logging.Formatter(_FORMAT.format(rank=rank), "%H:%M:%S")
    root = logging.getLogger()
    root.handlers.clear()
    root.setLevel(logging.INFO)
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    console.setFormatter(fmt)
    root.addHandler(console)
    root.addHandler(_Pending())
    for noisy in ("torch.distributed", "wandb", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def attach_run_log(run_dir: str) -> None:
    """Open ``<run_dir>/logs/rank<N>.log`` (appending: a resumed run continues its file) and write the records held
    since :func:`setup_logging` into it first. Without a pending buffer (logging set up elsewhere) the file is added
    to the root logger all the same."""
    rank = _rank()
    root = logging.getLogger()
    os.makedirs(os.path.join(run_dir, "logs"), exist_ok=True)
    file = logging.FileHandler(os.path.join(run_dir, "logs", f"rank{rank}.log"))
    file.setFormatter(logging.Formatter(_FORMAT.format(rank=rank), "%H:%M:%S"))
    pending = [h for h in root.handlers if isinstance(h, _Pending)]
    for h in root.handlers:
        if isinstance(h, logging.FileHandler) and h.baseFilename == file.baseFilename:
            file.close()
            return  # already attached (a second trainer in this process on the same run_dir)
    root.addHandler(file)
    for h in pending:
        h.setTarget(file)
        h.flush()
        root.removeHandler(h)
        h.close()


__all__ = ["attach_run_log", "setup_logging"]
