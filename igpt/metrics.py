"""One metrics sink: console, ``<run_dir>/metrics.jsonl`` and Weights & Biases, written by rank 0 only.

``metrics.jsonl`` keys follow DESIGN.md (``step``, ``split``, ``loss``, ...). W&B gets the same numbers under
dashboard groups: ``train/*``, ``eval/*``, ``perf/*`` (tokens/s, MFU), ``sys/*`` (memory), plus the resolved config
and, at each eval, a table of sample generations. W&B runs offline by default with its files under
``<run_dir>/wandb``; ``online`` only when the user asks. The W&B run id is kept in ``<run_dir>/wandb_id`` so a
resumed run continues the same W&B run.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import time
import uuid
from typing import Any

import torch

log = logging.getLogger("igpt")

# metrics.jsonl key -> W&B key
_WANDB_KEYS = {
    "train": {"loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm", "tokens": "train/tokens",
              "tokens_per_s": "perf/tokens_per_s", "mfu": "perf/mfu", "peak_mem_gb": "sys/peak_mem_gb",
              "skipped_steps": "train/skipped_steps"},
    "val": {"loss": "eval/loss", "bpb": "eval/bpb"},
}


def peak_memory_gb(device: torch.device) -> float:
    """Peak accelerator memory allocated; on CPU the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux


class MetricsLogger:
    def __init__(self, run_dir: str, config: dict[str, Any], wandb_cfg, enabled: bool) -> None:
        self.enabled = enabled
        self.wandb = None
        if not enabled:
            return
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.file = open(self.path, "a", encoding="utf-8")
        if wandb_cfg.mode != "disabled":
            self.wandb = _init_wandb(run_dir, config, wandb_cfg)

    def log(self, record: dict[str, Any]) -> None:
        """Append one record (it must carry ``step`` and ``split``) to every sink."""
        if not self.enabled:
            return
        record = {**record, "time": round(time.time(), 3)}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.wandb is not None:
            names = _WANDB_KEYS.get(record["split"], {})
            prefix = record["split"]
            data = {
                names.get(k, f"{prefix}/{k}"): v
                for k, v in record.items()
                if k not in ("step", "split", "time") and isinstance(v, (int, float))
            }
            self.wandb.log(data, step=record["step"])

    def log_samples(
        self, step: int, rows: list[tuple], columns: tuple[str, ...] = ("prompt", "generation"), key: str = "samples"
    ) -> None:
        """A table of samples (default: (prompt, generation) pairs): a W&B table ``eval/<key>`` and a line with
        ``"split": <key>`` in metrics.jsonl."""
        if not self.enabled:
            return
        rows = [list(r) for r in rows]
        self.file.write(json.dumps({"step": step, "split": key, key: rows, "columns": list(columns),
                                    "time": time.time()}) + "\n")
        self.file.flush()
        if self.wandb is not None:
            import wandb

            table = wandb.Table(columns=["step", *columns], data=[[step, *r] for r in rows])
            self.wandb.log({f"eval/{key}": table}, step=step)

    def close(self) -> None:
        if not self.enabled:
            return
        self.file.close()
        if self.wandb is not None:
            self.wandb.finish()


_USER_WANDB_ENV = {k for k in os.environ if k.startswith("WANDB_")}  # what the user set before igpt touched it


def _init_wandb(run_dir: str, config: dict[str, Any], cfg):
    import wandb

    # Keep every W&B file under the run dir and away from the home folder, unless the user chose other places.
    wandb_dir = os.path.join(run_dir, "wandb")
    defaults = {"WANDB_DIR": run_dir, "WANDB_CACHE_DIR": os.path.join(wandb_dir, ".cache"),
                "WANDB_DATA_DIR": os.path.join(wandb_dir, ".data"),
                "WANDB_CONFIG_DIR": os.path.join(wandb_dir, ".config"), "WANDB_SILENT": "true"}
    for key, value in defaults.items():
        if key not in _USER_WANDB_ENV:
            os.environ[key] = value
    id_file = os.path.join(run_dir, "wandb_id")
    if os.path.exists(id_file):
        with open(id_file, encoding="utf-8") as f:
            run_id = f.read().strip()
    else:
        run_id = uuid.uuid4().hex[:8]
        with open(id_file, "w", encoding="utf-8") as f:
            f.write(run_id)
    os.makedirs(wandb_dir, exist_ok=True)
    run = wandb.init(
        project=cfg.project, entity=cfg.entity, name=cfg.name or os.path.basename(os.path.abspath(run_dir)),
        tags=list(cfg.tags), config=config, dir=run_dir, mode=cfg.mode, id=run_id, resume="allow",
    )
    log.info("W&B %s run %s (files under %s)", cfg.mode, run_id, os.path.join(run_dir, "wandb"))
    return run


def cpu_peak_flops(dtype: torch.dtype = torch.float32, n: int = 1024, reps: int = 5) -> float:
    """Measured matmul FLOP/s on this CPU, the MFU reference when no peak is configured (no datasheet for CPUs)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t)


_GPU_PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "4090": 165e12}


def device_peak_flops(device: torch.device, configured: float) -> float:
    if configured > 0:
        return configured
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in _GPU_PEAK_BF16.items():
            if key in name:
                return value
        log.warning("unknown GPU %r: set logger.peak_flops for MFU; using 312e12", name)
        return 312e12
    return cpu_peak_flops()
