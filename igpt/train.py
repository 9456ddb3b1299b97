"""Hydra entry point: ``torchrun igpt/train.py +stage=pretrain|sft [overrides]`` (or plain ``python`` for one process).

Every rank composes the same config; ``igpt.config.validate`` re-checks it against the schema (so ``+key``/``++key``
typos fail too), then the Trainer runs. Rank 0 logs to the console; every rank logs to ``<run_dir>/logs/rank<N>.log``.
A failing rank's traceback is recorded for torchrun (``@record``), which ends the other ranks.
"""

from __future__ import annotations

import logging
import os
import sys

import hydra
from omegaconf import DictConfig
from torch.distributed.elastic.multiprocessing.errors import record

from igpt.config import register, validate

register()
log = logging.getLogger("igpt")
CONF_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")


def setup_logging(run_dir: str) -> None:
    rank = int(os.environ.get("RANK", 0))
    fmt = logging.Formatter(f"%(asctime)s [rank{rank}] %(levelname)s %(message)s", "%H:%M:%S")
    root = logging.getLogger()
    root.handlers.clear()
    root.setLevel(logging.INFO)
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    console.setFormatter(fmt)
    root.addHandler(console)
    os.makedirs(os.path.join(run_dir, "logs"), exist_ok=True)
    file = logging.FileHandler(os.path.join(run_dir, "logs", f"rank{rank}.log"))
    file.setFormatter(fmt)
    root.addHandler(file)
    for noisy in ("torch.distributed", "wandb", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def run(cfg: DictConfig) -> dict[str, float]:
    """Validate, train, tear down. Returns the last evaluation's metrics."""
    config = validate(cfg)
    setup_logging(config.run_dir)
    from igpt.trainer import Trainer

    trainer = Trainer(config)
    try:
        return trainer.fit()
    finally:
        trainer.close()


@record
@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except ValueError as e:  # configuration and data errors: one clear line, no traceback
        log.error("%s", e)
        raise SystemExit(2) from e


if __name__ == "__main__":
    main()
