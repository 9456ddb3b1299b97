"""Model construction, as one straight sequence: resolve each declared model's architecture -> build it on the meta
device -> let the strategy place it -> materialise it and fill it (the eager model's initial weights, then its
source's), the way torchtitan goes meta -> parallelize -> to_empty -> init_weights.

A stage declares its models by role (``igpt.stages.base.ModelSpec``). Each has a source (``init_from``,
``reference_from``, ``reward.model``: an igpt run or checkpoint, or a Hugging Face model folder,
``igpt.checkpoint.WeightsSource``) or none (a fresh model of the config's ``model``). Its architecture is its
source's; the main model's is resolved once (:meth:`ModelBuilder.resolve`, a value: the config is never written),
where explicit ``model.*`` values must agree with the source and a resumed run takes the checkpoint's. The strategy
shards each meta model, allocates only what the rank holds and fills it tensor by tensor, only the rows the rank
holds (``igpt/parallel/init.py``), so the initial weights of a given ``trainer.seed`` are those of the model built
eagerly right after seeding.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

import torch

from igpt import checkpoint
from igpt.config import Config, ModelConfig

if TYPE_CHECKING:
    from igpt.parallel.base import Strategy, Wrapped
    from igpt.stages.base import ModelSpec
    from igpt.stages.context import RunData

log = logging.getLogger("igpt")


@dataclass(frozen=True)
class ResolvedModel:
    """The main model's architecture and, for an imported one, its source's config.json (kept for export)."""

    model: ModelConfig
    hf_config: dict[str, Any] | None = None


class ModelBuilder:
    """Resolves, builds and places the models of one run (every rank builds the same ones)."""

    def __init__(self, cfg: Config, strategy: Strategy, device: torch.device, data: RunData) -> None:
        self.cfg, self.strategy, self.device, self.data = cfg, strategy, device, data
        self.is_main = strategy.rank == 0
        self._sources: dict[tuple[str, str], checkpoint.WeightsSource] = {}
        self._backends: tuple[str, str] | None = None
        self.main: ResolvedModel | None = None

    # ---- 1. resolve ----------------------------------------------------------------------------------------------
    def resolve(self, main: ModelSpec, resume_from: str | None) -> ResolvedModel:
        """The main model's architecture: its source's when it has one (``init_from``: an igpt checkpoint or a
        Hugging Face folder; on resume, the checkpoint's), else the config's; with room for every token of the data's
        tokenizer. Then check the lengths and the vocabulary against it, and (on resume) the checkpoint against the
        run."""
        saved = checkpoint.read_meta(resume_from) if resume_from is not None else {}
        if resume_from is not None:
            self._check_resume(resume_from, saved, main)
        if saved.get("model") and main.trainable:  # a resumed run needs nothing from its source: the checkpoint has it
            resolved = ResolvedModel(ModelConfig(**saved["model"]), saved.get("hf_config"))
        else:
            hf = self.weights_source(main).hf_config if main.init else None
            resolved = ResolvedModel(self._configured_model(main), hf)
        self._check_fits(resolved.model)
        self.main = resolved
        return resolved

    def _check_fits(self, model_cfg: ModelConfig) -> None:
        tcfg = self.cfg.trainer
        if tcfg.seq_len > model_cfg.max_seq_len:
            window = (f"; the model's sliding_window is {model_cfg.sliding_window} (config.json key 'sliding_window'): "
                      f"igpt computes full attention, so sequences must fit in the window"
                      if model_cfg.sliding_window else "")
            raise ValueError(
                f"trainer.seq_len ({tcfg.seq_len}) exceeds model.max_seq_len ({model_cfg.max_seq_len}){window}"
            )
        vocab = self.data.vocab_size
        if vocab > model_cfg.vocab_size:
            raise ValueError(
                f"model.vocab_size ({model_cfg.vocab_size}) is smaller than the tokenizer's vocabulary ({vocab}, "
                f"{self.data.tokenizer_path}); set model.vocab_size={vocab}"
            )

    def _configured_model(self, main: ModelSpec) -> ModelConfig:
        """The main model's architecture as this run's config gives it (its source's, with the ``model.*`` values)."""
        model_cfg = self.model_config(main)
        return self._apply_overrides(main, model_cfg) if main.init else model_cfg

    def _check_resume(self, ckpt: str, saved: dict, main: ModelSpec) -> None:
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
            why = tokenizer_conflict(self.data.tokenizer_path, ckpt_tok)
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

    def _check_init_tokenizer(self, source: checkpoint.WeightsSource) -> None:
        """``source`` must share the data's tokenizer (ids mean the same tokens) unless ``tokenizer_mismatch=allow``."""
        from igpt.data.tokenizer import tokenizer_conflict
        from igpt.errors import CheckpointError

        theirs = os.path.join(source.tokenizer_dir, source.meta.get("tokenizer") or "tokenizer.json")
        if not os.path.exists(theirs):
            return
        why = tokenizer_conflict(self.data.tokenizer_path, theirs)
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

    def _apply_overrides(self, spec: ModelSpec, model_cfg: ModelConfig) -> ModelConfig:
        """The source's architecture wins over ``model=``; a ``model.*`` value set explicitly must agree with it, except
        ``model.max_seq_len`` (the context igpt uses) and a larger ``model.vocab_size`` (more embedding rows)."""
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

    def weights_source(self, spec: ModelSpec) -> checkpoint.WeightsSource:
        """The weights source of ``spec`` (``spec.init``: an igpt checkpoint or run dir, or a Hugging Face folder),
        opened (and its tokenizer checked against the data's) once per run."""
        key = (spec.init, spec.init_key)
        if key not in self._sources:
            self._sources[key] = checkpoint.open_source(spec.init, spec.init_key)
            self._check_init_tokenizer(self._sources[key])
        return self._sources[key]

    def model_config(self, spec: ModelSpec) -> ModelConfig:
        """The ModelConfig of ``spec``'s model: its source's (vocabulary rows raised to the data tokenizer's size:
        new rows are added on load), or the config's ``model`` for a model without a source."""
        vocab = self.data.vocab_size
        if not spec.init:  # a new model: room for every token of the data's tokenizer, whatever model= says
            if vocab > self.cfg.model.vocab_size:
                log.info("model.vocab_size: %d -> %d, the vocabulary of the data's tokenizer (%s)",
                         self.cfg.model.vocab_size, vocab, self.data.tokenizer_path)
            return replace(self.cfg.model, vocab_size=max(self.cfg.model.vocab_size, vocab))
        cfg = self.weights_source(spec).model
        return replace(cfg, vocab_size=max(cfg.vocab_size, vocab))

    def backends(self) -> tuple[str, str]:
        """The attention and loss backends that run here (resolved once; a fallback is logged with its reason)."""
        if self._backends is None:
            from igpt.model import resolve_attention_backend, resolve_loss_backend
            from igpt.precision import compute_dtype

            cfg = self.cfg
            attn = resolve_attention_backend(cfg.kernels.attention, self.device, cfg.kernels.strict,
                                             dtype=compute_dtype(cfg.precision))
            loss = resolve_loss_backend(cfg.kernels.loss, self.device, cfg.kernels.strict)
            log.info("kernels: attention=%s loss=%s", attn, loss)
            self._backends = (attn, loss)
        return self._backends

    # ---- 2.-4. build on meta, place, materialise and fill -----------------------------------------------------------
    def build_all(self, specs: list[ModelSpec], resuming: bool) -> dict[str, Wrapped]:
        """Every declared model, in order (the first is the main one), by role."""
        if not any(spec.trainable for spec in specs):
            raise ValueError(f"stage {self.cfg.stage.name} declares no trainable model")
        return {spec.role: self.build(spec, first=i == 0, resuming=resuming) for i, spec in enumerate(specs)}

    def build(self, spec: ModelSpec, first: bool = False, resuming: bool = False) -> Wrapped:
        """One model of ``spec``, initialised and placed by the strategy (a ``Wrapped`` handle).

        Built on the meta device, the strategy allocates and fills only what this rank holds: the initial weights
        equal those of the model built eagerly right after seeding, so they depend on ``trainer.seed`` alone; any other
        fresh model (a reference without a source) gets the same draw: the policy as it starts. Weights from
        ``spec.init`` are then read shard by shard. A trainable model that resumes is neither drawn nor loaded from
        ``spec.init``: the run's checkpoint fills it afterwards."""
        from igpt.model import Transformer
        from igpt.parallel.init import ModelInit

        attn, loss = self.backends()
        skip = spec.trainable and resuming
        model_cfg = self.main.model if first else self.model_config(spec)
        with contextlib.nullcontext() if first else torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.trainer.seed)
            with torch.device("meta"):
                model = Transformer(model_cfg, attention=attn, loss=loss, head=spec.head)
            init = ModelInit.fresh(model, draw=not skip, progress=self.is_main)
            if spec.init and not skip:
                init.load = self._loader(model, spec)
            optim = (spec.optim or self.cfg.optim) if spec.trainable else None
            handle = self.strategy.wrap_model(model, optim, name=spec.role, init=init)
            if first and not skip:  # torch's generator continues where eager initialisation would have left it
                torch.set_rng_state(init.generator.get_state())
        return handle

    def _loader(self, model: torch.nn.Module, spec: ModelSpec):
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


__all__ = ["ModelBuilder", "ResolvedModel"]
