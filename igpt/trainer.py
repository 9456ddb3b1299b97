"""The training loop: schedule, evaluation cadence, checkpoints, preemption and logging, the same for every stage and
strategy.

Set-up is one straight sequence: take the run lock, build the stage, open the data, resolve and build the models the
stage declares (``igpt/build.py``: resolve -> meta -> strategy -> materialise and load), restore a checkpoint. The
stage sees the run through a :class:`~igpt.stages.context.RunContext` only; ``fit`` calls one stage method per
step, ``train_step``, and gets a :class:`~igpt.stages.context.StepResult` back. The offline step (the rank's slice
of one global batch in micro-batches, the summed loss normalised by the stage's count of the *global* batch, so the
update equals a single process's for any world size) lives with the stages (``igpt.stages.base.offline_step``).

Exact resume: the learning rate is a pure function of the step; the checkpoint holds every trainable model and its
optimizer, the RNG, the stage's own state and the merged data-loader states of all ranks (resumable at another world
size); frozen models are rebuilt from their sources; ``resume=auto`` continues from the newest complete checkpoint.
SIGUSR1/SIGTERM (or a ``<run_dir>/STOP`` file) make every rank finish the step, checkpoint and
exit 0 after writing ``<run_dir>/preempted``, which the Slurm scripts read to requeue the job.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from dataclasses import asdict, replace
from typing import Any

import torch
from omegaconf import OmegaConf

from igpt import checkpoint
from igpt.config import Config
from igpt.devices import resolve_device
from igpt.metrics import ComputeDtypeProbe, MetricsLogger, count_params, device_peak_flops, peak_memory_gb
from igpt.runlog import attach_run_log
from igpt.safe_load import torch_load
from igpt.stages.context import StepResult

log = logging.getLogger("igpt")


class _StopFlag:
    """Set by SIGUSR1/SIGTERM; checked (and agreed on by all ranks) after every step."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.reason = signal.Signals(signum).name
        log.warning("received %s: finishing this step, then checkpoint and exit", self.reason)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Trainer:
    def __init__(self, cfg: Config) -> None:
        from igpt.parallel import build_strategy

        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.strategy = build_strategy(cfg.strategy, cfg.precision, self.device)
        self.lock = None
        try:
            self._setup(cfg)
        except BaseException:
            if self.lock is not None:
                self.lock.release()
            # Do not leave the process group open; no barrier: the other ranks may be anywhere.
            if torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()
            raise

    # ---- set-up: one straight sequence -----------------------------------------------------------------------------
    def _setup(self, cfg: Config) -> None:
        from igpt.build import ModelBuilder
        from igpt.stages import build_stage
        from igpt.stages.context import RunContext, RunData

        self.rank, self.world_size = self.strategy.rank, self.strategy.world_size
        self.is_main = self.rank == 0
        self.run_dir = cfg.run_dir
        self._take_lock()
        attach_run_log(self.run_dir)  # the records logged so far, then everything, into <run_dir>/logs/rank<N>.log
        self.stage = build_stage(cfg)
        accum = self.stage.check_batch(self.world_size)
        # rank 0 picks the checkpoint (and warns about broken ones) so that every rank resumes from the same one
        resume_from = checkpoint.find_latest(self.run_dir) if cfg.resume == "auto" and self.is_main else None
        resume_from = self.strategy.broadcast_object(resume_from)
        data = RunData.open(cfg.data.dir, self.stage.kind, cfg.stage.name, self.device)
        self.ctx = ctx = RunContext(cfg, self.strategy, self.device, data, accum)
        self.train_loader = ctx.loaders["train"] = ctx.make_loader("train", loop=True)
        self._tasks = []
        if cfg.trainer.eval_tasks:  # read and checked at start: a bad record names its file and line before training
            from igpt.eval import load_tasks

            self._tasks = load_tasks(list(cfg.trainer.eval_tasks))
        builder = ModelBuilder(cfg, self.strategy, self.device, data)
        resolved = builder.resolve(self.stage.models()[0], resume_from)
        ctx.model_cfg, self.hf_config = resolved.model, resolved.hf_config
        ctx.bind_builder(builder.build, builder.weights_source)
        #: the resolved config (the main model's architecture as built), for every sink; ``cfg`` itself is not changed
        self.config_dict = OmegaConf.to_container(OmegaConf.structured(replace(cfg, model=resolved.model)))
        self._setup_run_dir()
        self.skipped_steps = 0
        self.tokens_seen = 0
        self.stage.prepare(ctx)
        ctx.models.update(builder.build_all(self.stage.models(), resuming=resume_from is not None))
        main = next(iter(ctx.trainable.values())).module
        self.n_params = count_params(main)
        self._dtype = ComputeDtypeProbe(main, f"precision={cfg.precision}, strategy={cfg.strategy.name}")
        self.stage.setup(ctx)
        if resume_from is not None:
            self._resume(resume_from)
        self.metrics = MetricsLogger(self.run_dir, self.config_dict, cfg.logger.wandb, enabled=self.is_main,
                                     start_step=self.step)  # fmt: skip
        from igpt.model.flops import flops_per_token

        self.flops_per_token = flops_per_token(resolved.model, cfg.trainer.seq_len)
        self.peak_flops = device_peak_flops(self.device, cfg.logger.peak_flops)
        self.stop = _StopFlag()

    @property
    def step(self) -> int:
        return self.ctx.step

    @step.setter
    def step(self, value: int) -> None:
        self.ctx.step = value

    @property
    def models(self):
        """Role -> ``Wrapped`` handle of every model the stage declared."""
        return self.ctx.models

    @property
    def trainable(self):
        return self.ctx.trainable

    def _take_lock(self) -> None:
        """Rank 0 takes ``<run_dir>/run.lock`` (igpt/runlock.py); every rank fails at once if another run holds it."""
        from igpt.errors import ConfigError
        from igpt.runlock import RunLock

        refused = None
        if self.is_main:
            lock = RunLock(self.run_dir)
            try:
                lock.acquire()
                self.lock = lock
            except ConfigError as e:
                refused = str(e)
        refused = self.strategy.broadcast_object(refused)
        if refused is not None:
            raise ConfigError(refused)

    def _setup_run_dir(self) -> None:
        if self.is_main:
            os.makedirs(self.run_dir, exist_ok=True)
            with open(os.path.join(self.run_dir, "config.yaml"), "w", encoding="utf-8") as f:
                f.write(OmegaConf.to_yaml(self.config_dict))
            stale = os.path.join(self.run_dir, "preempted")
            if os.path.exists(stale):
                os.remove(stale)
        self.strategy.barrier()

    def _resume(self, ckpt: str) -> None:
        meta = checkpoint.read_meta(ckpt)
        dirs = {role: info["dir"] for role, info in (meta.get("models") or {}).items()}
        for i, (role, handle) in enumerate(self.trainable.items()):
            sub = "." if i == 0 else dirs.get(role)
            if sub is None:
                raise FileNotFoundError(f"{ckpt}: no weights for the {role} model (meta.json lists {sorted(dirs)})")
            handle.load(os.path.normpath(os.path.join(ckpt, sub)), meta)
        state = torch_load(os.path.join(ckpt, "train_state.pt"))
        self.step, self.tokens_seen = state["step"], state["tokens"]
        self.skipped_steps = state.get("skipped_steps", 0)
        self.train_loader.load_state_dict(state["loader"])
        for name, loader_state in state.get("loaders", {}).items():
            self.ctx.loaders[name].load_state_dict(loader_state)
        self.stage.load_state_dict(state.get("stage", {}))
        torch.set_rng_state(state["rng"]["torch"])
        if self.device.type == "cuda" and "cuda" in state["rng"]:
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)
        log.info("resumed from %s at step %d", ckpt, self.step)

    def train_step(self, batch: dict[str, torch.Tensor]) -> StepResult:
        """One optimizer step on one batch of the train loader: the stage's."""
        return self.stage.train_step(batch)

    def sample(self) -> list[tuple[str, str]]:
        """Greedy generations of the main model for the configured prompts (a W&B table at each eval)."""
        from igpt.sampling import generate

        policy = next(iter(self.trainable.values()))
        if not self.cfg.trainer.sample_prompts or policy.module.head != "lm":
            return []
        if not self.strategy.sharded and not self.is_main:
            return []
        with policy.gathered() as model, self.strategy.autocast():
            outs = generate(
                model, self.ctx.tokenizer, list(self.cfg.trainer.sample_prompts),
                max_new_tokens=self.cfg.trainer.sample_max_new_tokens, temperature=0.0, chat=self.stage.chat,
            )
        return list(zip(self.cfg.trainer.sample_prompts, outs))

    # ---- checkpoints -----------------------------------------------------------------------------------------------
    def save_checkpoint(self, extra_meta: dict[str, Any] | None = None) -> str:
        loader_states = {
            name: loader.merge_state_dicts(self.strategy.all_gather_object(loader.state_dict()))
            for name, loader in self.ctx.loaders.items()
        }
        rng = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        train_state = {
            "step": self.step, "tokens": self.tokens_seen, "skipped_steps": self.skipped_steps, "rng": rng,
            "loader": loader_states.pop("train"), "loaders": loader_states, "stage": self.stage.state_dict(),
        }
        meta = {
            "stage": self.cfg.stage.name, "model": asdict(self.ctx.model_cfg), "strategy": self.cfg.strategy.name,
            "world_size": self.world_size, "tokenizer": "tokenizer.json", "precision": self.cfg.precision,
            "tokenizer_fingerprint": self._tokenizer_fingerprint(),
            "config": self.config_dict, **self._hf_meta(), **self.stage.checkpoint_meta(), **(extra_meta or {}),
        }
        path = checkpoint.save(
            self.run_dir, self.step, self.strategy, self.trainable, train_state, meta, self.ctx.tokenizer_path,
            self.cfg.trainer.keep_last,
        )
        log.info("checkpoint %s", path)
        return path

    def _tokenizer_fingerprint(self) -> str:
        if not hasattr(self, "_tok_fp"):
            from igpt.data.tokenizer import tokenizer_fingerprint

            self._tok_fp = tokenizer_fingerprint(self.ctx.tokenizer_path)
        return self._tok_fp

    def _hf_meta(self) -> dict[str, Any]:
        """The ``hf_config`` of an imported main model (its original architecture class, for igpt.export)."""
        return {"hf_config": self.hf_config} if self.hf_config else {}

    def _should_stop(self) -> str | None:
        """All ranks agree to stop when any got a signal or the STOP file exists."""
        local = self.stop.reason
        if local is None and os.path.exists(os.path.join(self.run_dir, "STOP")):
            local = "STOP file"
        flag = self.strategy.all_reduce(torch.tensor(0.0 if local is None else 1.0, device=self.device), "max")
        if float(flag.item()) == 0.0:
            return None
        return local or "signal on another rank"

    # ---- the loop --------------------------------------------------------------------------------------------------
    def fit(self) -> dict[str, float]:
        tcfg = self.cfg.trainer
        self.stop.install()
        last_eval: dict[str, float] = {}
        try:
            if self.step >= tcfg.max_steps:
                log.info("run already at step %d >= trainer.max_steps=%d", self.step, tcfg.max_steps)
                return last_eval
            if tcfg.eval_at_start and self.step == 0:
                last_eval = self._eval_and_log()
            progress = self._progress(tcfg.max_steps)
            batches = iter(self.train_loader)
            bad_in_a_row = 0
            t_last = time.perf_counter()
            while self.step < tcfg.max_steps:
                out = self.train_step(next(batches))
                self.step += 1
                step_tokens = out.tokens if out.tokens is not None else tcfg.global_batch_size * tcfg.seq_len
                self.tokens_seen += step_tokens
                bad_in_a_row = self._check_finite(out, bad_in_a_row)
                now = time.perf_counter()
                dt, t_last = now - t_last, now
                record = self._train_record(out, step_tokens / dt)
                if self.step % tcfg.log_every == 0 or self.step == tcfg.max_steps:
                    self.metrics.log(record)
                if progress is not None:
                    progress.update(1)
                    progress.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                         tok_s=f"{record['tokens_per_s']:,.0f}")
                if (tcfg.eval_every and self.step % tcfg.eval_every == 0) or self.step == tcfg.max_steps:
                    last_eval = self._eval_and_log()
                    t_last = time.perf_counter()  # eval time is not training throughput
                stop = self._should_stop()
                if self.step == tcfg.max_steps:
                    self.stage.on_train_end()
                at_end = self.step == tcfg.max_steps and tcfg.ckpt_at_end
                if (tcfg.ckpt_every and self.step % tcfg.ckpt_every == 0) or at_end or stop:
                    ckpt = self.save_checkpoint()
                    t_last = time.perf_counter()
                    if self.step == tcfg.max_steps and self.cfg.logger.wandb.log_model:
                        self.metrics.log_model(ckpt, self.step, self.cfg.stage.name)
                if stop and self.step < tcfg.max_steps:
                    self._preempted(stop)
                    break
            if progress is not None:
                progress.close()
            return last_eval
        finally:
            self.stop.uninstall()
            self.metrics.close()

    def _check_finite(self, out: StepResult, bad_in_a_row: int) -> int:
        """Count a skipped (non-finite) step; stop after ``trainer.max_bad_steps`` in a row."""
        if out.finite:
            return 0
        self.skipped_steps += 1
        bad_in_a_row += 1
        log.warning("step %d: non-finite loss %s, update skipped (%d in a row)", self.step, out.loss, bad_in_a_row)
        if bad_in_a_row >= self.cfg.trainer.max_bad_steps:
            from igpt.errors import DivergedError

            raise DivergedError(
                f"{bad_in_a_row} consecutive non-finite losses, the last at step {self.step}; stopping "
                f"(trainer.max_bad_steps={self.cfg.trainer.max_bad_steps}); try a lower optim.lr"
            )
        return bad_in_a_row

    def _train_record(self, out: StepResult, tokens_per_s: float) -> dict[str, Any]:
        extra: dict[str, Any] = {}
        if self._dtype.dtype is not None and not getattr(self, "_dtype_logged", False):
            extra["compute_dtype"] = self._dtype.dtype  # in the first record after a start or a resume
            extra["params"] = self.n_params
            self._dtype_logged = True
        if self.cfg.data.skip_corrupt:  # corrupt shards skipped so far, all ranks (collective: every rank is here)
            extra["skipped_shards"] = int(self.ctx.global_sum([self.train_loader.stats["skipped_shards"]])[0])
        return {
            "step": self.step, "split": "train", "loss": out.loss, "lr": out.lr, "grad_norm": out.grad_norm,
            "tokens": self.tokens_seen, "tokens_per_s": tokens_per_s,
            "mfu": tokens_per_s * self.flops_per_token / (self.peak_flops * self.world_size),
            "peak_mem_gb": peak_memory_gb(self.device), "skipped_steps": self.skipped_steps, **out.metrics, **extra,
        }

    def _preempted(self, reason: str) -> None:
        if self.is_main:
            checkpoint.write_text_atomic(
                os.path.join(self.run_dir, "preempted"), json.dumps({"step": self.step, "reason": reason})
            )
            stop_file = os.path.join(self.run_dir, "STOP")
            if os.path.exists(stop_file):
                os.remove(stop_file)
        log.warning("stopped at step %d (%s); checkpoint written, resume with resume=auto", self.step, reason)

    def _eval_and_log(self) -> dict[str, float]:
        if not self.ctx.data.samples("val"):
            if not getattr(self, "_warned_no_val", False):
                log.warning("%s has no val split (prepare with val_fraction > 0): nothing to evaluate",
                            self.cfg.data.dir)
                self._warned_no_val = True
            return {}
        result = {**self.stage.evaluate(), **self._eval_tasks()}
        self.metrics.log({"step": self.step, "split": "val", **result})
        log.info("step %d: %s", self.step, self.stage.eval_summary(result))
        if self.is_main:
            columns, rows = self.stage.eval_table()
            if rows:
                self.metrics.log_samples(self.step, rows, columns, key="rollouts")
        if self.cfg.trainer.sample_every_eval:
            rows = self.sample()
            if rows and self.is_main:
                self.metrics.log_samples(self.step, rows)
                for prompt, text in rows:
                    log.info("sample %r -> %r", prompt, text)
        return result

    def _eval_tasks(self) -> dict[str, float]:
        """``trainer.eval_tasks`` scored on the main model (``igpt.eval``): ``{"eval/<task>/<metric>": value}``.

        The model's weights are gathered once for all the tasks; with a sharded strategy every rank runs the same
        forwards (they are collectives), otherwise rank 0 alone does the work."""
        tasks = list(self.cfg.trainer.eval_tasks)
        main = next(iter(self.trainable.values()))
        if not tasks or main.module.head != "lm" or (not self.strategy.sharded and not self.is_main):
            return {}
        from igpt.eval import metric_keys, run_tasks

        with main.gathered() as model, self.strategy.autocast():
            metrics = run_tasks(model, self.ctx.tokenizer, self._tasks, chat=self.stage.chat,
                                batch_size=self.cfg.trainer.eval_tasks_batch_size,
                                max_new_tokens=self.cfg.trainer.sample_max_new_tokens)
        return metric_keys(metrics) if self.is_main else {}

    def _progress(self, total: int):
        if not (self.is_main and self.cfg.trainer.progress):
            return None
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=self.step, desc=f"{self.cfg.stage.name}", unit="step", dynamic_ncols=True)

    def close(self) -> None:
        try:
            self.strategy.teardown()
        finally:
            if self.lock is not None:
                self.lock.release()
