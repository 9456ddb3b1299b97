"""One metrics sink: console, ``<run_dir>/metrics.jsonl`` and Weights & Biases, written by rank 0 only.

``metrics.jsonl`` keys: ``step``, ``split``, ``loss``, ... (README, "The run directory"). W&B gets the same numbers
under dashboard groups: ``train/*``, ``eval/*``, ``perf/*`` (tokens/s, MFU), ``sys/*`` (memory), plus the resolved
config and, at each eval, a table of sample generations. W&B runs offline by default with its files under
``<run_dir>/wandb``; ``online`` only when the user asks.

Pipelines and resume (the W&B conventions of https://docs.wandb.ai/guides/runs/grouping and /resuming):

- every stage of one pipeline (pretrain -> SFT -> RM -> PPO) logs to one W&B ``group`` with ``job_type`` = the
  stage; :func:`wandb_group` picks the group when ``logger.wandb.group`` is unset;
- the W&B run id is kept in ``<run_dir>/wandb_id`` and the last step sent in ``<run_dir>/wandb_step``: a resumed
  run continues the same W&B run and does not send again the steps between its checkpoint and the interruption
  (W&B already has them; exact resume recomputes the same values), so the W&B history has every step once;
- ``logger.wandb.log_model=true`` uploads the final checkpoint as a ``model`` artifact (:meth:`log_model`).
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


class ComputeDtypeProbe:
    """The dtype the first matrix multiply of ``module`` really computes in (autocast, FSDP's mixed precision or
    DeepSpeed's bf16 all show there), recorded once by a forward hook that then removes itself; ``None`` before the
    first forward."""

    def __init__(self, module: torch.nn.Module, describe: str) -> None:
        self.dtype: str | None = None
        first = next(m for m in module.modules() if isinstance(m, torch.nn.Linear))
        self._handle = first.register_forward_hook(self._hook)
        self._describe = describe

    def _hook(self, mod, args, out) -> None:
        self.dtype = str(out.dtype).removeprefix("torch.")
        log.info("compute dtype: %s (%s)", self.dtype, self._describe)
        self._handle.remove()


def count_params(module: torch.nn.Module) -> int:
    """A model's parameter count: a shared (tied) matrix once; whole even when sharded (FSDP's DTensor numel is
    global; a ZeRO-3 parameter keeps its full size in ``ds_numel``)."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters())


class MetricsLogger:
    def __init__(self, run_dir: str, config: dict[str, Any], wandb_cfg, enabled: bool, start_step: int = 0) -> None:
        """``start_step`` is the step the run starts from: 0 for a fresh run (a new W&B run), the checkpoint's step
        when resuming (the same W&B run, continued)."""
        self.enabled = enabled
        self.wandb = None
        if not enabled:
            return
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.file = open(self.path, "a", encoding="utf-8")
        self._step_file = os.path.join(run_dir, "wandb_step")
        self._wandb_sent = -1  # the last step sent to W&B (step 0 is trainer.eval_at_start's evaluation)
        self._wandb_had = -1  # the last step W&B had from an earlier attempt of this run: not sent again
        if wandb_cfg.mode != "disabled":
            self.wandb = _init_wandb(run_dir, config, wandb_cfg, resuming=start_step > 0)
            if start_step > 0 and os.path.exists(self._step_file):
                with open(self._step_file, encoding="utf-8") as f:
                    self._wandb_had = self._wandb_sent = int(f.read().strip() or -1)
                if self._wandb_had > start_step:
                    log.info("W&B already has steps %d..%d of this run; they are not logged again",
                             start_step + 1, self._wandb_had)  # fmt: skip

    def _wandb_log(self, data: dict[str, Any], step: int) -> None:
        if step <= self._wandb_had:
            return
        self.wandb.log(data, step=step)
        if step > self._wandb_sent:
            self._wandb_sent = step
            tmp = f"{self._step_file}.tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(str(step))
            os.replace(tmp, self._step_file)

    def log(self, record: dict[str, Any]) -> None:
        """Append one record (it must carry ``step`` and ``split``) to every sink."""
        if not self.enabled:
            return
        record = {**record, "time": round(time.time(), 3)}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.wandb is not None:
            names = _WANDB_KEYS.get(record["split"], {})
            prefix = "eval" if record["split"] == "val" else record["split"]  # eval/*, as the dashboards group them
            data = {
                k if k.startswith("eval/") else names.get(k, f"{prefix}/{k}"): v
                for k, v in record.items()
                if k not in ("step", "split", "time") and isinstance(v, (int, float))
            }
            self._wandb_log(data, record["step"])

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
            self._wandb_log({f"eval/{key}": table}, step)

    def log_model(self, checkpoint_dir: str, step: int, stage: str) -> None:
        """Upload ``checkpoint_dir`` as the W&B artifact ``model-<run id>`` (type ``model``, aliases ``latest`` and
        ``step_<n>``); offline runs keep it with the run until ``wandb sync``."""
        if not self.enabled or self.wandb is None:
            return
        import wandb

        meta = {"step": step, "stage": stage, "checkpoint": os.path.abspath(checkpoint_dir)}
        artifact = wandb.Artifact(f"model-{self.wandb.id}", type="model", metadata=meta)
        artifact.add_dir(checkpoint_dir)
        self.wandb.log_artifact(artifact, aliases=["latest", f"step_{step}"])
        log.info("W&B: logged %s as artifact model-%s", checkpoint_dir, self.wandb.id)

    def close(self) -> None:
        if not self.enabled:
            return
        self.file.close()
        if self.wandb is not None:
            self.wandb.finish()


_USER_WANDB_ENV = {k for k in os.environ if k.startswith("WANDB_")}  # what the user set before igpt touched it


def _init_wandb(run_dir: str, config: dict[str, Any], cfg, resuming: bool):
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
    if resuming and os.path.exists(id_file):
        with open(id_file, encoding="utf-8") as f:
            run_id = f.read().strip()
    else:  # a fresh start (also in a run dir an earlier attempt left behind) is a new W&B run
        run_id = uuid.uuid4().hex[:8]
        with open(id_file, "w", encoding="utf-8") as f:
            f.write(run_id)
    os.makedirs(wandb_dir, exist_ok=True)
    name = cfg.name or os.path.basename(os.path.abspath(run_dir))
    group = wandb_group(run_dir, cfg, config.get("init_from"))
    run = wandb.init(
        project=cfg.project, entity=cfg.entity, name=name, group=group,
        job_type=cfg.job_type or config.get("stage", {}).get("name"), tags=list(cfg.tags), config=config,
        dir=run_dir, mode=cfg.mode, id=run_id, resume="allow",
    )  # fmt: skip
    log.info("W&B %s run %s, group %s (files under %s)", cfg.mode, run_id, group, wandb_dir)
    return run


def wandb_group(run_dir: str, wandb_cfg, init_from: str | None, sweep_dir: str | None = None) -> str:
    """The W&B group of a run whose ``logger.wandb.group`` is unset: the group of the ``init_from`` run (so SFT, RM
    and PPO runs started from one pretraining run share its group), else the sweep's directory name for a job of a
    Hydra multirun, else the run's own name (``logger.wandb.name`` or the run dir's name), which a later stage
    started from this run then inherits."""
    if wandb_cfg.group:
        return wandb_cfg.group
    if init_from:
        from igpt import checkpoint

        try:
            meta = checkpoint.read_meta(checkpoint.resolve(init_from))
        except (OSError, ValueError) as exc:  # the trainer reports an unusable init_from itself
            log.debug("W&B group: cannot read %s (%s)", init_from, exc)
        else:
            parent = meta.get("config", {}).get("logger", {}).get("wandb", {})
            run_dir_parent = meta.get("config", {}).get("run_dir") or init_from
            return parent.get("group") or parent.get("name") or os.path.basename(os.path.abspath(run_dir_parent))
    if sweep_dir:
        return os.path.basename(os.path.abspath(sweep_dir))
    return wandb_cfg.name or os.path.basename(os.path.abspath(run_dir))


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
