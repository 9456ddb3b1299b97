"""The training loop: accumulation, clipping, schedule, eval (loss and bits per byte), checkpoints, logging.

One loop serves every stage and strategy. A step takes the rank's slice of one global batch from the loader, splits
it into micro-batches, and normalises the summed loss by the number of loss tokens in the *global* batch, so the
update equals a single process's for any world size (see igpt/parallel/base.py for the gradient convention).

Exact resume: the learning rate is a pure function of the step; the checkpoint holds model, optimizer, RNG and the
merged data-loader state of all ranks (resumable at another world size); ``resume=auto`` continues from the newest
complete checkpoint. SIGUSR1/SIGTERM (or a ``<run_dir>/STOP`` file) make every rank finish the step, checkpoint and
exit 0 after writing ``<run_dir>/preempted``, which the Slurm scripts read to requeue the job.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import asdict
from typing import Any

import torch
from omegaconf import OmegaConf

from igpt import checkpoint
from igpt.config import Config, OptimConfig
from igpt.metrics import MetricsLogger, device_peak_flops, peak_memory_gb

log = logging.getLogger("igpt")


def lr_at(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Learning rate after ``step`` optimizer steps: linear warmup, then cosine, warmup-stable-decay or constant."""
    peak, floor = cfg.lr, cfg.lr * cfg.min_lr_ratio
    if step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return peak
    if cfg.schedule == "wsd":  # MiniCPM's warmup-stable-decay: flat, then a linear decay over the last fraction
        decay_start = max_steps - int(cfg.decay_fraction * max_steps)
        if step < decay_start:
            return peak
        frac = (step - decay_start) / max(1, max_steps - decay_start)
        return peak + (floor - peak) * min(1.0, frac)
    frac = (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps)
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * min(1.0, frac)))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device=cuda but CUDA is not available (use device=cpu or device=auto)")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device(name)


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
        try:
            self._setup(cfg)
        except BaseException:
            # Do not leave the process group open; no barrier: the other ranks may be anywhere.
            if torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()
            raise

    def _setup(self, cfg: Config) -> None:
        from igpt.data.loader import ShardLoader
        from igpt.data.tokenizer import load_tokenizer, token_bytes
        from igpt.stages import build_stage

        self.rank, self.world_size = self.strategy.rank, self.strategy.world_size
        self.is_main = self.rank == 0
        self.run_dir = cfg.run_dir
        self.config_dict = OmegaConf.to_container(OmegaConf.structured(cfg))  # the resolved config, for every sink
        tcfg = cfg.trainer

        # ---- batch arithmetic: global = micro x accumulation x world --------------------------------------------
        per_rank, rem = divmod(tcfg.global_batch_size, self.world_size)
        if rem or per_rank % tcfg.micro_batch_size:
            unit = tcfg.micro_batch_size * self.world_size
            raise ValueError(
                f"trainer.global_batch_size ({tcfg.global_batch_size}) must equal trainer.micro_batch_size "
                f"({tcfg.micro_batch_size}) x accumulation steps x world size ({self.world_size}): "
                f"use a multiple of {unit}"
            )
        self.accum = per_rank // tcfg.micro_batch_size
        if tcfg.seq_len > cfg.model.max_seq_len:
            raise ValueError(f"trainer.seq_len ({tcfg.seq_len}) exceeds model.max_seq_len ({cfg.model.max_seq_len})")

        # ---- data and tokenizer -----------------------------------------------------------------------------------
        self.stage = build_stage(cfg.stage)
        index_path = os.path.join(cfg.data.dir, "index.json")
        if not os.path.exists(index_path):
            raise FileNotFoundError(f"data.dir={cfg.data.dir}: no index.json (prepare it: python -m igpt.data.prepare)")
        with open(index_path, encoding="utf-8") as f:
            self.index = json.load(f)
        if self.index["kind"] != cfg.stage.kind:
            raise ValueError(
                f"stage {cfg.stage.name} reads kind={cfg.stage.kind} data, "
                f"but {index_path} holds kind={self.index['kind']}"
            )
        self.tokenizer_path = os.path.join(cfg.data.dir, "tokenizer.json")
        self.tokenizer = load_tokenizer(self.tokenizer_path)
        vocab = self.tokenizer.get_vocab_size()
        if vocab > cfg.model.vocab_size:
            raise ValueError(
                f"model.vocab_size ({cfg.model.vocab_size}) is smaller than the tokenizer's vocabulary ({vocab}, "
                f"{self.tokenizer_path}); set model.vocab_size={vocab}"
            )
        self.token_bytes = token_bytes(self.tokenizer).to(self.device)

        def make_loader(split: str, loop: bool) -> ShardLoader:
            return ShardLoader(
                cfg.data.dir, split, seq_len=tcfg.seq_len, global_batch_size=tcfg.global_batch_size, rank=self.rank,
                world_size=self.world_size, num_workers=cfg.data.num_workers if loop else 0,
                num_partitions=cfg.data.num_partitions, seed=tcfg.seed, shuffle=cfg.data.shuffle and loop,
                pack=cfg.stage.pack, loop=loop, skip_corrupt=cfg.data.skip_corrupt,
            )

        self.make_loader = make_loader
        self.train_loader = make_loader("train", loop=True)

        # ---- run directory ---------------------------------------------------------------------------------------
        if self.is_main:
            os.makedirs(self.run_dir, exist_ok=True)
            with open(os.path.join(self.run_dir, "config.yaml"), "w", encoding="utf-8") as f:
                f.write(OmegaConf.to_yaml(self.config_dict))
            stale = os.path.join(self.run_dir, "preempted")
            if os.path.exists(stale):
                os.remove(stale)
        self.strategy.barrier()

        # ---- model, optimizer --------------------------------------------------------------------------------------
        from igpt.model import Transformer, resolve_attention_backend, resolve_loss_backend

        compute_dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
        attn = resolve_attention_backend(cfg.kernels.attention, self.device, cfg.kernels.strict, dtype=compute_dtype)
        loss = resolve_loss_backend(cfg.kernels.loss, self.device, cfg.kernels.strict)
        log.info("kernels: attention=%s loss=%s", attn, loss)
        torch.manual_seed(tcfg.seed)  # identical initial weights on every rank
        model = Transformer(cfg.model, attention=attn, loss=loss)
        self.step, self.tokens_seen, self.skipped_steps = 0, 0, 0
        # rank 0 picks the checkpoint (and warns about broken ones) so that every rank resumes from the same one
        resume_from = checkpoint.find_latest(self.run_dir) if cfg.resume == "auto" and self.is_main else None
        resume_from = self.strategy.broadcast_object(resume_from)
        if resume_from is None and cfg.init_from:
            self._init_from(model, cfg.init_from)
        self.model, self.optimizer = self.strategy.wrap(model, cfg.optim)
        if resume_from is not None:
            self._resume(resume_from)

        self.metrics = MetricsLogger(self.run_dir, self.config_dict, cfg.logger.wandb, enabled=self.is_main,
                                     start_step=self.step)  # fmt: skip
        from igpt.model.flops import flops_per_token

        self.flops_per_token = flops_per_token(cfg.model, tcfg.seq_len)
        self.peak_flops = device_peak_flops(self.device, cfg.logger.peak_flops)
        self.stop = _StopFlag()

    # ---- set-up helpers -----------------------------------------------------------------------------------------
    def _init_from(self, model: torch.nn.Module, path: str) -> None:
        ckpt = checkpoint.resolve(path)
        meta = checkpoint.read_meta(ckpt)
        ours = asdict(self.cfg.model)
        diff = [k for k in ours if k not in ("name",) and meta["model"].get(k) != ours[k]]
        if diff:
            k = diff[0]
            raise ValueError(
                f"init_from={path}: model.{k} is {ours[k]!r} here but {meta['model'].get(k)!r} in {ckpt} "
                f"(use model={meta['model'].get('name')} or matching overrides)"
            )
        checkpoint.load_weights(model, checkpoint.read_model_state(ckpt), ckpt)
        log.info("initialised weights from %s (step %s of stage %s)", ckpt, meta.get("step"), meta.get("stage"))

    def _resume(self, ckpt: str) -> None:
        self.strategy.load(ckpt)
        state = torch.load(os.path.join(ckpt, "train_state.pt"), map_location="cpu", weights_only=True)
        self.step, self.tokens_seen = state["step"], state["tokens"]
        self.skipped_steps = state.get("skipped_steps", 0)
        self.train_loader.load_state_dict(state["loader"])
        torch.set_rng_state(state["rng"]["torch"])
        if self.device.type == "cuda" and "cuda" in state["rng"]:
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)
        log.info("resumed from %s at step %d", ckpt, self.step)

    # ---- the loop --------------------------------------------------------------------------------------------------
    def _micro_batches(self, batch: dict[str, torch.Tensor]) -> Iterator[dict[str, torch.Tensor]]:
        mb = self.cfg.trainer.micro_batch_size
        for i in range(self.accum):
            yield {k: v[i * mb : (i + 1) * mb].to(self.device, non_blocking=True) for k, v in batch.items()}

    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        self.model.train()
        local_tokens = self.stage.count_tokens(batch).to(self.device, torch.float64)
        global_tokens = float(self.strategy.all_reduce(local_tokens.clone()).item())
        # loss = sum_loss * world / global_tokens: the ranks' averaged gradients are those of the global token mean
        scale = self.world_size / max(global_tokens, 1.0)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        for i, micro in enumerate(self._micro_batches(batch)):
            with self.strategy.no_sync(last_micro=i == self.accum - 1), self.strategy.autocast():
                out = self.stage(self.model, micro)
                self.strategy.backward(out.loss_sum * scale)
            loss_sum += out.loss_sum.detach().to(torch.float64)
        loss = float(self.strategy.all_reduce(loss_sum).item()) / max(global_tokens, 1.0)
        lr = lr_at(self.step, self.cfg.optim, self.cfg.trainer.max_steps)
        self.strategy.set_lr(lr)
        finite = math.isfinite(loss)
        grad_norm = self.strategy.clip_and_step(self.cfg.trainer.grad_clip, skip=not finite)
        return {"loss": loss, "lr": lr, "grad_norm": grad_norm, "finite": finite}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Validation loss per token and bits per byte over the whole val split (or ``trainer.eval_batches``).

        bpb = total nats / ln 2 / total UTF-8 bytes of the target tokens; every rank runs the same number of forward
        passes (a rank out of data runs a fully masked batch) so sharded strategies stay in step.
        """
        self.model.eval()
        loader = iter(self.make_loader("val", loop=False))
        nats = torch.zeros((), dtype=torch.float64, device=self.device)
        nbytes, ntok = torch.zeros_like(nats), torch.zeros_like(nats)
        last: dict[str, torch.Tensor] | None = None
        n = 0
        while self.cfg.trainer.eval_batches <= 0 or n < self.cfg.trainer.eval_batches:
            batch = next(loader, None)
            has = torch.tensor(0.0 if batch is None else 1.0, device=self.device)
            if float(self.strategy.all_reduce(has, "max").item()) == 0.0:
                break
            if batch is None:  # keep collectives in step: a masked batch contributes nothing
                batch = {k: v.clone() for k, v in (last or self._empty_batch()).items()}
                batch["labels"].fill_(-100)
            last = batch
            for micro in self._micro_batches(batch):
                with self.strategy.autocast():
                    per_tok = self.model(micro["input_ids"], position_ids=micro.get("position_ids"),
                                         labels=micro["labels"], reduction="none")
                keep = micro["labels"] != -100
                nats += per_tok.double().sum()
                nbytes += self.token_bytes[micro["labels"].clamp(min=0)][keep].double().sum()
                ntok += keep.sum()
            n += 1
        for t in (nats, nbytes, ntok):
            self.strategy.all_reduce(t)
        return {"loss": float(nats / ntok.clamp(min=1)), "bpb": float(nats / math.log(2) / nbytes.clamp(min=1))}

    def _empty_batch(self) -> dict[str, torch.Tensor]:
        b, s = self.cfg.trainer.global_batch_size // self.world_size, self.cfg.trainer.seq_len
        zeros = torch.zeros(b, s, dtype=torch.long)
        return {"input_ids": zeros, "labels": zeros.clone(), "position_ids": zeros.clone()}

    def sample(self) -> list[tuple[str, str]]:
        """Greedy generations for the configured prompts (a W&B table at each eval)."""
        from igpt.generate import generate

        if not self.cfg.trainer.sample_prompts:
            return []
        if not self.strategy.sharded and not self.is_main:
            return []
        with self.strategy.autocast():
            outs = generate(
                self.strategy.module, self.tokenizer, list(self.cfg.trainer.sample_prompts),
                max_new_tokens=self.cfg.trainer.sample_max_new_tokens, temperature=0.0, chat=self.stage.chat,
            )
        return list(zip(self.cfg.trainer.sample_prompts, outs))

    def save_checkpoint(self) -> str:
        loader_states = self.strategy.all_gather_object(self.train_loader.state_dict())
        rng = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        train_state = {
            "step": self.step, "tokens": self.tokens_seen, "skipped_steps": self.skipped_steps, "rng": rng,
            "loader": self.train_loader.merge_state_dicts(loader_states),
        }
        meta = {
            "stage": self.cfg.stage.name, "model": asdict(self.cfg.model), "strategy": self.cfg.strategy.name,
            "world_size": self.world_size, "tokenizer": "tokenizer.json", "precision": self.cfg.precision,
            "config": self.config_dict,
        }
        path = checkpoint.save(
            self.run_dir, self.step, self.strategy, train_state, meta, self.tokenizer_path, self.cfg.trainer.keep_last
        )
        log.info("checkpoint %s", path)
        return path

    def _should_stop(self) -> str | None:
        """All ranks agree to stop when any got a signal or the STOP file exists."""
        local = self.stop.reason
        if local is None and os.path.exists(os.path.join(self.run_dir, "STOP")):
            local = "STOP file"
        flag = self.strategy.all_reduce(torch.tensor(0.0 if local is None else 1.0, device=self.device), "max")
        if float(flag.item()) == 0.0:
            return None
        return local or "signal on another rank"

    def fit(self) -> dict[str, float]:
        tcfg = self.cfg.trainer
        self.stop.install()
        last_eval: dict[str, float] = {}
        try:
            if self.step >= tcfg.max_steps:
                log.info("run already at step %d >= trainer.max_steps=%d", self.step, tcfg.max_steps)
                return last_eval
            progress = self._progress(tcfg.max_steps)
            batches = iter(self.train_loader)
            bad_in_a_row = 0
            tokens_per_step = tcfg.global_batch_size * tcfg.seq_len
            t_last = time.perf_counter()
            while self.step < tcfg.max_steps:
                batch = next(batches)
                out = self.train_step(batch)
                self.step += 1
                self.tokens_seen += tokens_per_step
                if not out["finite"]:
                    self.skipped_steps += 1
                    bad_in_a_row += 1
                    log.warning("step %d: non-finite loss %s, update skipped (%d in a row)",
                                self.step, out["loss"], bad_in_a_row)
                    if bad_in_a_row >= tcfg.max_bad_steps:
                        raise FloatingPointError(
                            f"{bad_in_a_row} consecutive non-finite losses, the last at step {self.step}; stopping "
                            f"(trainer.max_bad_steps={tcfg.max_bad_steps}); try a lower optim.lr"
                        )
                else:
                    bad_in_a_row = 0
                now = time.perf_counter()
                dt, t_last = now - t_last, now
                tps = tokens_per_step / dt
                record = {
                    "step": self.step, "split": "train", "loss": out["loss"], "lr": out["lr"],
                    "grad_norm": out["grad_norm"], "tokens": self.tokens_seen, "tokens_per_s": tps,
                    "mfu": tps * self.flops_per_token / (self.peak_flops * self.world_size),
                    "peak_mem_gb": peak_memory_gb(self.device), "skipped_steps": self.skipped_steps,
                }
                if self.step % tcfg.log_every == 0 or self.step == tcfg.max_steps:
                    self.metrics.log(record)
                if progress is not None:
                    progress.update(1)
                    progress.set_postfix(loss=f"{out['loss']:.4f}", lr=f"{out['lr']:.2e}", tok_s=f"{tps:,.0f}")
                if (tcfg.eval_every and self.step % tcfg.eval_every == 0) or self.step == tcfg.max_steps:
                    last_eval = self._eval_and_log()
                    t_last = time.perf_counter()  # eval time is not training throughput
                stop = self._should_stop()
                at_end = self.step == tcfg.max_steps and tcfg.ckpt_at_end
                if (tcfg.ckpt_every and self.step % tcfg.ckpt_every == 0) or at_end or stop:
                    ckpt = self.save_checkpoint()
                    t_last = time.perf_counter()
                    if self.step == tcfg.max_steps and self.cfg.logger.wandb.log_model:
                        self.metrics.log_model(ckpt, self.step, self.cfg.stage.name)
                if stop and self.step < tcfg.max_steps:
                    if self.is_main:
                        checkpoint.write_text_atomic(
                            os.path.join(self.run_dir, "preempted"), json.dumps({"step": self.step, "reason": stop})
                        )
                        stop_file = os.path.join(self.run_dir, "STOP")
                        if os.path.exists(stop_file):
                            os.remove(stop_file)
                    log.warning("stopped at step %d (%s); checkpoint written, resume with resume=auto", self.step, stop)
                    break
            if progress is not None:
                progress.close()
            return last_eval
        finally:
            self.stop.uninstall()
            self.metrics.close()

    def _eval_and_log(self) -> dict[str, float]:
        result = self.evaluate()
        self.metrics.log({"step": self.step, "split": "val", **result})
        log.info("step %d: val loss %.4f, %.4f bits per byte", self.step, result["loss"], result["bpb"])
        if self.cfg.trainer.sample_every_eval:
            rows = self.sample()
            if rows and self.is_main:
                self.metrics.log_samples(self.step, rows)
                for prompt, text in rows:
                    log.info("sample %r -> %r", prompt, text)
        return result

    def _progress(self, total: int):
        if not (self.is_main and self.cfg.trainer.progress):
            return None
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=self.step, desc=f"{self.cfg.stage.name}", unit="step", dynamic_ncols=True)

    def close(self) -> None:
        self.strategy.teardown()
