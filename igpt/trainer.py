"""The training loop: accumulation, clipping, schedule, evaluation, checkpoints, preemption, logging.

One loop serves every stage and strategy. The stage (``igpt/stages/``) declares its models by role; the trainer
builds them (seeded, from ``init_from`` / ``reference_from`` / ``reward.model`` or fresh) and has the strategy place
each one, trainable with its optimizer or frozen. A source is an igpt checkpoint or a Hugging Face model folder
(``igpt.checkpoint.WeightsSource``); each model has its source's architecture, the main one's becomes ``cfg.model``
(explicit ``model.*`` values must agree with it). Each model is built on the meta device; the strategy shards it,
allocates only what the rank holds and fills it with the eager model's initial weights, then the source's weights,
tensor by tensor and only the rows the rank holds (``igpt/parallel/init.py``). An offline step takes the rank's
slice of one global batch from the loader, splits it into micro-batches, and normalises the summed loss by the
stage's count (tokens, comparisons) of the *global* batch, so the update equals a single process's for any world size
(igpt/parallel/base.py states the gradient convention). A stage that makes its own batches (PPO) overrides the step
and uses the same pieces.

Exact resume: the learning rate is a pure function of the step; the checkpoint holds every trainable model and its
optimizer, the RNG, the stage's own state and the merged data-loader states of all ranks (resumable at another world
size); frozen models are rebuilt from their sources; ``resume=auto`` continues from the newest complete checkpoint.
SIGUSR1/SIGTERM (or a ``<run_dir>/STOP`` file) make every rank finish the step, checkpoint and
exit 0 after writing ``<run_dir>/preempted``, which the Slurm scripts read to requeue the job.
"""

from __future__ import annotations

import contextlib
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
            from igpt.errors import ConfigError

            raise ConfigError("device=cuda but CUDA is not available here (use device=cpu or device=auto)")
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

    # ---- set-up ----------------------------------------------------------------------------------------------------
    def _setup(self, cfg: Config) -> None:
        from igpt.stages import build_stage

        self.rank, self.world_size = self.strategy.rank, self.strategy.world_size
        self.is_main = self.rank == 0
        self.run_dir = cfg.run_dir
        self._take_lock()
        self.stage = build_stage(cfg)
        self.accum = self.stage.check_batch(self.world_size)
        # rank 0 picks the checkpoint (and warns about broken ones) so that every rank resumes from the same one
        resume_from = checkpoint.find_latest(self.run_dir) if cfg.resume == "auto" and self.is_main else None
        resume_from = self.strategy.broadcast_object(resume_from)
        self._sources: dict[tuple[str, str], checkpoint.WeightsSource] = {}
        self._setup_data()
        self._resolve_model(resume_from)
        self.config_dict = OmegaConf.to_container(OmegaConf.structured(cfg))  # the resolved config, for every sink
        self._setup_run_dir()
        self.step, self.tokens_seen, self.skipped_steps = 0, 0, 0
        # fault injection for tests: rank 0's first micro-batch gets a NaN loss at these steps (comma list)
        self._fault_nan_steps = {int(s) for s in os.environ.get("IGPT_FAULT_NAN_STEPS", "").split(",") if s.strip()}
        # fault injection for tests: this process SIGKILLs itself right after this step (a node lost mid-run)
        self._fault_kill_step = int(os.environ.get("IGPT_FAULT_KILL_STEP", "0") or 0)
        self.stage.prepare(self)
        self._build_models(resuming=resume_from is not None)
        self.stage.setup(self)
        if resume_from is not None:
            self._resume(resume_from)
        self.metrics = MetricsLogger(self.run_dir, self.config_dict, cfg.logger.wandb, enabled=self.is_main,
                                     start_step=self.step)  # fmt: skip
        from igpt.model.flops import flops_per_token

        self.flops_per_token = flops_per_token(cfg.model, cfg.trainer.seq_len)
        self.peak_flops = device_peak_flops(self.device, cfg.logger.peak_flops)
        self.stop = _StopFlag()

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

    def _resolve_model(self, resume_from: str | None) -> None:
        """Fix ``cfg.model``: the main model's source's architecture when it has one (``init_from``: an igpt
        checkpoint or a Hugging Face folder; on resume, the checkpoint's), else the config's; with room for every
        token of the data's tokenizer. Then check the lengths and the vocabulary against it."""
        from igpt.config import ModelConfig

        cfg = self.cfg
        main = self.stage.models()[0]
        saved = checkpoint.read_meta(resume_from) if resume_from is not None and main.trainable else {}
        if resume_from is not None:
            self._check_resume(resume_from, checkpoint.read_meta(resume_from), main)
        if saved.get("model"):  # a resumed run needs nothing from its source: the checkpoint has it all
            model_cfg = ModelConfig(**saved["model"])
            self.hf_config = saved.get("hf_config")
        else:
            model_cfg = self._configured_model(main)
            #: the config.json of an imported main model (its original class, kept in every checkpoint for export)
            self.hf_config = self.weights_source(main).hf_config if main.init else None
        cfg.model = model_cfg
        tcfg = cfg.trainer
        if tcfg.seq_len > model_cfg.max_seq_len:
            window = (f"; the model's sliding_window is {model_cfg.sliding_window} (config.json key 'sliding_window'): "
                      f"igpt computes full attention, so sequences must fit in the window"
                      if model_cfg.sliding_window else "")
            raise ValueError(
                f"trainer.seq_len ({tcfg.seq_len}) exceeds model.max_seq_len ({model_cfg.max_seq_len}){window}"
            )
        vocab = self.vocab_size
        if vocab > model_cfg.vocab_size:
            raise ValueError(
                f"model.vocab_size ({model_cfg.vocab_size}) is smaller than the tokenizer's vocabulary ({vocab}, "
                f"{self.tokenizer_path}); set model.vocab_size={vocab}"
            )

    def _configured_model(self, main):
        """The main model's architecture as this run's config gives it (its source's, with the ``model.*`` values)."""
        model_cfg = self.model_config(main)
        return self._apply_overrides(main, model_cfg) if main.init else model_cfg

    def _check_resume(self, ckpt: str, saved: dict, main) -> None:
        """Refuse to resume a checkpoint of another stage, tokenizer or model architecture than this run's config
        gives (the old code continued the checkpoint's model whatever ``model=`` said); each error names both."""
        from igpt.data.tokenizer import tokenizer_conflict
        from igpt.errors import CheckpointError, MissingPathError

        cfg = self.cfg
        fix = (f"resume it with the config it was written with, start a new run_dir (init_from={ckpt} starts from "
               f"its weights), or pass resume=never to ignore it")
        if saved.get("stage") and saved["stage"] != cfg.stage.name:
            raise CheckpointError(f"resume=auto: {ckpt} was written by stage={saved['stage']}, this run is "
                                  f"stage={cfg.stage.name}; {fix}")
        ckpt_tok = os.path.join(ckpt, saved.get("tokenizer") or "tokenizer.json")
        if os.path.exists(ckpt_tok):
            why = tokenizer_conflict(self.tokenizer_path, ckpt_tok)
            if why:
                raise CheckpointError(f"resume=auto: {ckpt} was trained with another tokenizer than data.dir="
                                      f"{cfg.data.dir}'s: {why}; {fix}")
        if not (saved.get("model") and main.trainable):
            return
        try:
            fresh = asdict(self._configured_model(main))
        except MissingPathError as e:  # the run's source is gone: nothing to compare with
            log.warning("resume: cannot check the model against %s=%s (%s)", main.init_key, main.init, e)
            return
        diffs = [f"model.{k}={v!r} in the checkpoint, {fresh[k]!r} in this run's config"
                 for k, v in saved["model"].items() if k in fresh and k not in ("name", "init_std") and fresh[k] != v]
        if diffs:
            raise CheckpointError(f"resume=auto: {ckpt} holds another model architecture: {'; '.join(diffs)}; {fix}")

    def _check_init_tokenizer(self, spec, source) -> None:
        """``spec``'s source must share the data's tokenizer (ids mean the same tokens) unless
        ``tokenizer_mismatch=allow``."""
        from igpt.data.tokenizer import tokenizer_conflict
        from igpt.errors import CheckpointError

        theirs = os.path.join(source.tokenizer_dir, source.meta.get("tokenizer") or "tokenizer.json")
        if not os.path.exists(theirs):
            return
        why = tokenizer_conflict(self.tokenizer_path, theirs)
        if why is None:
            return
        if self.cfg.tokenizer_mismatch == "allow":
            log.warning("%s: another tokenizer than data.dir=%s's (%s); tokenizer_mismatch=allow", source.where,
                        self.cfg.data.dir, why)
            return
        raise CheckpointError(
            f"{source.where}: the model was trained with another tokenizer than the data in "
            f"data.dir={self.cfg.data.dir} ({why}), so its token ids mean other tokens; prepare the data "
            f"with the checkpoint's tokenizer.json, or pass tokenizer_mismatch=allow to train anyway"
        )

    def _apply_overrides(self, spec, model_cfg):
        """The source's architecture wins over ``model=``; a ``model.*`` value set explicitly must agree with it, except
        ``model.max_seq_len`` (the context igpt uses) and a larger ``model.vocab_size`` (more embedding rows)."""
        from dataclasses import replace

        from igpt.config import model_overrides

        source = self.weights_source(spec)
        for key, value in model_overrides(self.cfg.model).items():
            theirs = getattr(model_cfg, key)
            if key in ("name", "init_std") or value == theirs:
                continue
            if key == "max_seq_len" or (key == "vocab_size" and value > theirs):
                model_cfg = replace(model_cfg, **{key: value})
                continue
            raise ValueError(
                f"{spec.init_key}={spec.init}: model.{key} is {value!r} here but {theirs!r} in {source.path}; the "
                f"model follows its source, so leave model.{key} unset (or start from a matching checkpoint)"
            )
        log.info("model: the architecture of %s=%s (%s)", spec.init_key, spec.init, source.describe())
        return model_cfg

    def weights_source(self, spec) -> checkpoint.WeightsSource:
        """The weights source of ``spec`` (``spec.init``: an igpt checkpoint or run dir, or a Hugging Face folder),
        opened once per run."""
        key = (spec.init, spec.init_key)
        if key not in self._sources:
            self._sources[key] = checkpoint.open_source(spec.init, spec.init_key)
            self._check_init_tokenizer(spec, self._sources[key])
        return self._sources[key]

    def model_config(self, spec):
        """The ModelConfig of ``spec``'s model: its source's (vocabulary rows raised to the data tokenizer's size:
        new rows are added on load), or ``cfg.model`` for a model without a source."""
        from dataclasses import replace

        if not spec.init:  # a new model: room for every token of the data's tokenizer, whatever model= says
            if self.vocab_size > self.cfg.model.vocab_size:
                log.info("model.vocab_size: %d -> %d, the vocabulary of the data's tokenizer (%s)",
                         self.cfg.model.vocab_size, self.vocab_size, self.tokenizer_path)
            return replace(self.cfg.model, vocab_size=max(self.cfg.model.vocab_size, self.vocab_size))
        cfg = self.weights_source(spec).model
        return replace(cfg, vocab_size=max(cfg.vocab_size, self.vocab_size))

    def _setup_data(self) -> None:
        from igpt.data.chat import ChatFormat
        from igpt.data.tokenizer import token_bytes, vocab_size

        cfg = self.cfg
        from igpt.errors import DataError, MissingPathError

        index_path = os.path.join(cfg.data.dir, "index.json")
        if not os.path.isdir(cfg.data.dir):
            raise MissingPathError(f"data.dir={cfg.data.dir}: no such directory (prepare the data with python -m "
                                   f"igpt.data.prepare ... output_dir={cfg.data.dir})")
        if not os.path.exists(index_path):
            raise MissingPathError(f"data.dir={cfg.data.dir}: no index.json (prepare it: python -m igpt.data.prepare)")
        try:
            with open(index_path, encoding="utf-8") as f:
                self.index = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{index_path}: not valid JSON ({e}); prepare the data again") from None
        if not isinstance(self.index, dict) or "kind" not in self.index:
            raise DataError(f"{index_path}: not an igpt index (no 'kind'); prepare the data again")
        if self.index["kind"] != self.stage.kind:
            raise DataError(
                f"stage {cfg.stage.name} reads kind={self.stage.kind} data, but {index_path} holds "
                f"kind={self.index['kind']} (prepare it with python -m igpt.data.prepare kind={self.stage.kind})"
            )
        self.tokenizer_path = os.path.join(cfg.data.dir, "tokenizer.json")
        #: the data's tokenizer and its chat format (igpt.data.chat.ChatFormat; it answers the Tokenizer API too)
        self.tokenizer = ChatFormat.load(cfg.data.dir)
        self.vocab_size = vocab_size(self.tokenizer)
        self.token_bytes = token_bytes(self.tokenizer).to(self.device)
        self.pad_id = self.tokenizer.pad_id
        self.stop_ids = self.tokenizer.stop_ids
        self.train_loader = self.make_loader("train", loop=True)
        self._tasks = []
        if cfg.trainer.eval_tasks:  # read and checked at start: a bad record names its file and line before training
            from igpt.eval import load_tasks

            self._tasks = load_tasks(list(cfg.trainer.eval_tasks))
        #: every loader whose position a checkpoint keeps ("train" here; a stage may add more, e.g. PPO-ptx's text)
        self.loaders = {"train": self.train_loader}

    def make_loader(self, split: str, loop: bool, data_dir: str | None = None, pack: bool | None = None):
        """A loader over ``data_dir`` (default ``data.dir``) with this run's batch, partitions and seed."""
        from igpt.data.loader import ShardLoader

        cfg, tcfg = self.cfg, self.cfg.trainer
        return ShardLoader(
            data_dir or cfg.data.dir, split, seq_len=tcfg.seq_len, global_batch_size=tcfg.global_batch_size,
            rank=self.rank, world_size=self.world_size, num_workers=cfg.data.num_workers if loop else 0,
            num_partitions=self.num_partitions(data_dir), seed=tcfg.seed, shuffle=cfg.data.shuffle and loop,
            pack=cfg.stage.pack if pack is None else pack, loop=loop, skip_corrupt=cfg.data.skip_corrupt,
            verify=cfg.data.verify,
        )

    def num_partitions(self, data_dir: str | None = None) -> int:
        """``data.num_partitions``, or when unset the largest divisor of the global batch up to 8 that the train split
        of ``data_dir`` (default ``data.dir``) can fill: a function of the batch size and the data, not the world."""
        from igpt.data.loader import auto_partitions
        from igpt.data.partition import read_index

        if self.cfg.data.num_partitions is not None:
            return self.cfg.data.num_partitions
        samples = read_index(data_dir or self.cfg.data.dir, "train").samples
        return auto_partitions(self.cfg.trainer.global_batch_size, samples)

    def _setup_run_dir(self) -> None:
        if self.is_main:
            os.makedirs(self.run_dir, exist_ok=True)
            with open(os.path.join(self.run_dir, "config.yaml"), "w", encoding="utf-8") as f:
                f.write(OmegaConf.to_yaml(self.config_dict))
            stale = os.path.join(self.run_dir, "preempted")
            if os.path.exists(stale):
                os.remove(stale)
        self.strategy.barrier()

    def _build_models(self, resuming: bool) -> None:
        """Build, initialise and place every model the stage declares (``self.models``: role -> ``Wrapped``)."""
        specs = self.stage.models()
        if not any(spec.trainable for spec in specs):
            raise ValueError(f"stage {self.cfg.stage.name} declares no trainable model")
        self.specs = {spec.role: spec for spec in specs}
        self.models = {}
        for i, spec in enumerate(specs):
            self.models[spec.role] = self.build_model(spec, first=i == 0, resuming=resuming)
        #: the trainable models, main one first: what a checkpoint holds
        self.trainable = {role: h for role, h in self.models.items() if h.trainable}
        self._watch_compute_dtype()

    def _watch_compute_dtype(self) -> None:
        """Record the dtype the main model's first matrix multiply really computes in (autocast, FSDP's mixed
        precision or DeepSpeed's bf16 all show there), once, for the log and the first train record."""
        self.compute_dtype: str | None = None
        module = next(iter(self.trainable.values())).module
        # the main model's parameter count: parameters() yields a shared (tied) matrix once; whole even when sharded
        # (FSDP's DTensor numel is global; a ZeRO-3 parameter keeps its full size in ds_numel)
        self.n_params = sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters())
        first = next(m for m in module.modules() if isinstance(m, torch.nn.Linear))

        def hook(mod, args, out) -> None:
            self.compute_dtype = str(out.dtype).removeprefix("torch.")
            log.info("compute dtype: %s (precision=%s, strategy=%s)", self.compute_dtype, self.cfg.precision,
                     self.cfg.strategy.name)
            handle.remove()

        handle = first.register_forward_hook(hook)

    def backends(self) -> tuple[str, str]:
        """The attention and loss backends that run here (resolved once; a fallback is logged with its reason)."""
        if not hasattr(self, "_backends"):
            from igpt.model import resolve_attention_backend, resolve_loss_backend

            cfg = self.cfg
            compute_dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
            attn = resolve_attention_backend(
                cfg.kernels.attention, self.device, cfg.kernels.strict, dtype=compute_dtype
            )
            loss = resolve_loss_backend(cfg.kernels.loss, self.device, cfg.kernels.strict)
            log.info("kernels: attention=%s loss=%s", attn, loss)
            self._backends = (attn, loss)
        return self._backends

    def build_model(self, spec, first: bool = False, resuming: bool = False):
        """One model of ``spec``, initialised and placed by the strategy (a ``Wrapped`` handle).

        The model is built on the meta device and the strategy allocates and fills only what this rank holds
        (``igpt/parallel/init.py``): the initial weights equal those of the model built eagerly right after seeding,
        so they depend on ``trainer.seed`` alone; any other fresh model (a reference without a source) gets the same
        draw: the policy as it starts. Weights from ``spec.init`` are then read shard by shard. A trainable model that
        resumes is neither drawn nor loaded from ``spec.init``: the run's checkpoint fills it afterwards."""
        from igpt.parallel.init import ModelInit

        attn, loss = self.backends()
        skip = spec.trainable and resuming
        with contextlib.nullcontext() if first else torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.trainer.seed)
            model = self._new_model(spec, attn, loss, first=first)
            init = ModelInit.fresh(model, draw=not skip, progress=self.is_main)
            if spec.init and not skip:
                init.load = self._init_loader(model, spec)
            optim = (spec.optim or self.cfg.optim) if spec.trainable else None
            handle = self.strategy.wrap_model(model, optim, name=spec.role, init=init)
            if first and not skip:  # torch's generator continues where eager initialisation would have left it
                torch.set_rng_state(init.generator.get_state())
        return handle

    def _new_model(self, spec, attn: str, loss: str, first: bool):
        from igpt.model import Transformer

        model_cfg = self.cfg.model if first else self.model_config(spec)  # cfg.model: the main model's (resolved)
        with torch.device("meta"):
            return Transformer(model_cfg, attention=attn, loss=loss, head=spec.head)

    def _init_loader(self, model: torch.nn.Module, spec):
        """What fills ``model``'s shards from ``spec``'s source once the strategy has placed it (one stored tensor,
        and of it only the rows this rank holds, at a time)."""
        source = self.weights_source(spec)
        if spec.head == "lm" and source.head != "lm":
            raise ValueError(
                f"{source.where}: {source.path} holds a model with a {source.head} head (a reward model), "
                f"but the {spec.role} needs a language model (an SFT, pretraining or causal-LM checkpoint)"
            )
        if spec.head == "scalar" and source.head == "scalar" and not spec.trainable:  # a reward model: normalised
            model.value_offset = -source.reward_mean

        def load(shards, progress: str | None = None) -> None:
            big = sum(s.numel for s in shards.values()) >= 100_000_000
            kept = source.load_into(model, strict=spec.head == source.head, shards=shards,
                                    progress=progress if big else None)
            how = f", new {spec.head} head" if kept else ""
            log.info("%s: weights from %s%s", spec.role, source.describe(), how)

        return load

    def _resume(self, ckpt: str) -> None:
        meta = checkpoint.read_meta(ckpt)
        dirs = {role: info["dir"] for role, info in (meta.get("models") or {}).items()}
        for i, (role, handle) in enumerate(self.trainable.items()):
            sub = "." if i == 0 else dirs.get(role)
            if sub is None:
                raise FileNotFoundError(f"{ckpt}: no weights for the {role} model (meta.json lists {sorted(dirs)})")
            handle.load(os.path.normpath(os.path.join(ckpt, sub)), meta)
        state = torch.load(os.path.join(ckpt, "train_state.pt"), map_location="cpu", weights_only=True)
        self.step, self.tokens_seen = state["step"], state["tokens"]
        self.skipped_steps = state.get("skipped_steps", 0)
        self.train_loader.load_state_dict(state["loader"])
        for name, loader_state in state.get("loaders", {}).items():
            self.loaders[name].load_state_dict(loader_state)
        self.stage.load_state_dict(state.get("stage", {}))
        torch.set_rng_state(state["rng"]["torch"])
        if self.device.type == "cuda" and "cuda" in state["rng"]:
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)
        log.info("resumed from %s at step %d", ckpt, self.step)

    # ---- pieces a step uses ----------------------------------------------------------------------------------------
    def micro_batches(
        self, batch: dict[str, torch.Tensor], size: int | None = None
    ) -> Iterator[dict[str, torch.Tensor]]:
        """The rank's batch in micro-batches of ``size`` rows (default ``trainer.micro_batch_size``) on the device."""
        mb = size or self.cfg.trainer.micro_batch_size
        n = next(iter(batch.values())).shape[0]
        for i in range(0, n, mb):
            yield {k: v[i : i + mb].to(self.device, non_blocking=True) for k, v in batch.items()}

    def global_sum(self, values: list[torch.Tensor | float]) -> list[float]:
        """Sum scalars over ranks in one collective (float64)."""
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        return self.strategy.all_reduce(t).tolist()

    def lr(self) -> float:
        """The learning rate of the current step (``optim``'s schedule; a pure function of the step)."""
        return lr_at(self.step, self.cfg.optim, self.cfg.trainer.max_steps)

    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        """One optimizer step on one batch of the train loader: the stage's (``offline_step`` by default)."""
        return self.stage.train_step(batch)

    def offline_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """One optimizer step of the (single) trainable model on the loader's global batch."""
        (model,) = self.trainable.values()
        model.train()
        local_count = self.stage.count(batch).to(self.device, torch.float64)
        global_count = float(self.strategy.all_reduce(local_count.clone()).item())
        # loss = sum_loss * world / global_count: the ranks' averaged gradients are those of the global mean
        scale = self.world_size / max(global_count, 1.0)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        metric_sums: dict[str, torch.Tensor] = {}
        for i, micro in enumerate(self.micro_batches(batch)):
            with model.no_sync(last_micro=i == self.accum - 1), self.strategy.autocast():
                out = self.stage.loss(self.models, micro)
                if i == 0 and self.is_main and self.step + 1 in self._fault_nan_steps:
                    log.warning("IGPT_FAULT_NAN_STEPS: a non-finite loss at step %d", self.step + 1)
                    out.loss_sum = out.loss_sum * float("nan")
                model.backward(out.loss_sum * scale)
            loss_sum += out.loss_sum.detach().to(torch.float64)
            for k, v in out.metrics.items():
                metric_sums[k] = metric_sums.get(k, 0.0) + v.detach().to(torch.float64)
        names = list(metric_sums)
        totals = self.strategy.all_reduce(torch.stack([loss_sum, *(metric_sums[k] for k in names)]))
        loss = float(totals[0].item()) / max(global_count, 1.0)
        lr = self.lr()
        model.set_lr(lr)
        finite = math.isfinite(loss)
        grad_norm = model.clip_and_step(self.cfg.trainer.grad_clip, skip=not finite)
        extra = {k: float(totals[1 + j].item()) / max(global_count, 1.0) for j, k in enumerate(names)}
        return {"loss": loss, "lr": lr, "grad_norm": grad_norm, "finite": finite, **extra}

    def eval_batches(self, stage=None, split: str = "val", limit: int | None = None, data_dir: str | None = None):
        """The rank's batches of one pass over ``split`` (loop=False), ``limit`` batches at most (default
        ``trainer.eval_batches``; 0 = all). Every rank yields the same number of batches: one out of data gets
        ``stage.masked`` copies that contribute nothing, so sharded strategies stay in step."""
        stage = stage or self.stage
        limit = self.cfg.trainer.eval_batches if limit is None else limit
        loader = self.make_loader(split, loop=False, data_dir=data_dir)
        batches = iter(loader)
        last: dict[str, torch.Tensor] | None = None
        n = 0
        while limit <= 0 or n < limit:
            batch = next(batches, None)
            has = torch.tensor(0.0 if batch is None else 1.0, device=self.device)
            if float(self.strategy.all_reduce(has, "max").item()) == 0.0:
                break
            if batch is None:  # keep collectives in step: a masked batch contributes nothing
                batch = stage.masked(last if last is not None else loader.padding_batch())
            last = batch
            yield batch
            n += 1

    def eval_micro_batches(self, stage=None, **kwargs) -> Iterator[dict[str, torch.Tensor]]:
        for batch in self.eval_batches(stage, **kwargs):
            yield from self.micro_batches(batch)

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
                model, self.tokenizer, list(self.cfg.trainer.sample_prompts),
                max_new_tokens=self.cfg.trainer.sample_max_new_tokens, temperature=0.0, chat=self.stage.chat,
            )
        return list(zip(self.cfg.trainer.sample_prompts, outs))

    # ---- checkpoints -----------------------------------------------------------------------------------------------
    def save_checkpoint(self, extra_meta: dict[str, Any] | None = None) -> str:
        loader_states = {
            name: loader.merge_state_dicts(self.strategy.all_gather_object(loader.state_dict()))
            for name, loader in self.loaders.items()
        }
        rng = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        train_state = {
            "step": self.step, "tokens": self.tokens_seen, "skipped_steps": self.skipped_steps, "rng": rng,
            "loader": loader_states.pop("train"), "loaders": loader_states, "stage": self.stage.state_dict(),
        }
        meta = {
            "stage": self.cfg.stage.name, "model": asdict(self.cfg.model), "strategy": self.cfg.strategy.name,
            "world_size": self.world_size, "tokenizer": "tokenizer.json", "precision": self.cfg.precision,
            "tokenizer_fingerprint": self._tokenizer_fingerprint(),
            "config": self.config_dict, **self._hf_meta(), **self.stage.checkpoint_meta(), **(extra_meta or {}),
        }
        path = checkpoint.save(
            self.run_dir, self.step, self.strategy, self.trainable, train_state, meta, self.tokenizer_path,
            self.cfg.trainer.keep_last,
        )
        log.info("checkpoint %s", path)
        return path

    def _tokenizer_fingerprint(self) -> str:
        if not hasattr(self, "_tok_fp"):
            from igpt.data.tokenizer import tokenizer_fingerprint

            self._tok_fp = tokenizer_fingerprint(self.tokenizer_path)
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
                step_tokens = int(out.pop("step_tokens", tcfg.global_batch_size * tcfg.seq_len))
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
                if self.step == self._fault_kill_step:
                    log.warning("IGPT_FAULT_KILL_STEP: killing this process (SIGKILL) after step %d", self.step)
                    os.kill(os.getpid(), signal.SIGKILL)
            if progress is not None:
                progress.close()
            return last_eval
        finally:
            self.stop.uninstall()
            self.metrics.close()

    def _check_finite(self, out: dict[str, Any], bad_in_a_row: int) -> int:
        """Count a skipped (non-finite) step; stop after ``trainer.max_bad_steps`` in a row."""
        if out.pop("finite"):
            return 0
        self.skipped_steps += 1
        bad_in_a_row += 1
        log.warning("step %d: non-finite loss %s, update skipped (%d in a row)", self.step, out["loss"], bad_in_a_row)
        if bad_in_a_row >= self.cfg.trainer.max_bad_steps:
            raise FloatingPointError(
                f"{bad_in_a_row} consecutive non-finite losses, the last at step {self.step}; stopping "
                f"(trainer.max_bad_steps={self.cfg.trainer.max_bad_steps}); try a lower optim.lr"
            )
        return bad_in_a_row

    def _train_record(self, out: dict[str, Any], tokens_per_s: float) -> dict[str, Any]:
        if self.compute_dtype is not None and not getattr(self, "_dtype_logged", False):
            out["compute_dtype"] = self.compute_dtype  # in the first record after a start or a resume
            out["params"] = self.n_params
            self._dtype_logged = True
        if self.cfg.data.skip_corrupt:  # corrupt shards skipped so far, all ranks (collective: every rank is here)
            out["skipped_shards"] = int(self.global_sum([self.train_loader.stats["skipped_shards"]])[0])
        return {
            "step": self.step, "split": "train", "loss": out.pop("loss"), "lr": out.pop("lr"),
            "grad_norm": out.pop("grad_norm"), "tokens": self.tokens_seen, "tokens_per_s": tokens_per_s,
            "mfu": tokens_per_s * self.flops_per_token / (self.peak_flops * self.world_size),
            "peak_mem_gb": peak_memory_gb(self.device), "skipped_steps": self.skipped_steps, **out,
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
        if not self.index["splits"].get("val", {}).get("samples", 0):
            if not getattr(self, "_warned_no_val", False):
                log.warning("%s has no val split (prepare with val_fraction > 0): nothing to evaluate",
                            self.cfg.data.dir)
                self._warned_no_val = True
            return {}
        result = {**self.stage.evaluate(), **self._eval_tasks()}
        self.metrics.log({"step": self.step, "split": "val", **result})
        log.info("step %d: %s", self.step, self.stage.eval_summary(result))
        table = getattr(self.stage, "eval_table", None)
        if table is not None and self.is_main:
            columns, rows = table()
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
            metrics = run_tasks(model, self.tokenizer, self._tasks, chat=self.stage.chat,
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
