"""What a stage sees of a run: :class:`RunContext`, and what one step returns: :class:`StepResult`.

A stage never holds the trainer. The trainer builds one context per run and passes it to every stage hook; the
context offers the models by role, the strategy (autocast, collectives), the data's tokenizer, the device, the step
and its learning rate, micro-batch and evaluation iterators, and a way to open an extra loader whose position the
checkpoint keeps (PPO-ptx's text). Everything here is read by stages and written only by the trainer and the model
builder (``igpt/build.py``), so the dependency runs one way: trainer -> stage -> context.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from igpt.config import Config, ModelConfig
from igpt.schedule import lr_at

if TYPE_CHECKING:
    from igpt.checkpoint import WeightsSource
    from igpt.data.chat import ChatFormat
    from igpt.data.loader import ShardLoader
    from igpt.parallel.base import Strategy, Wrapped
    from igpt.stages.base import ModelSpec, Stage


@dataclass
class StepResult:
    """One optimizer step, as a stage reports it: the mean loss, the learning rate, the gradient norm of the main
    model, whether the update was applied (a non-finite loss skips it), the tokens it processed (None: the loader's
    ``global_batch_size x seq_len``), and the stage's own metrics (means over the global batch)."""

    loss: float
    lr: float
    grad_norm: float
    finite: bool
    tokens: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class RunData:
    """The prepared dataset of ``data.dir``: its index, tokenizer (and chat format) and per-token UTF-8 bytes."""

    dir: str
    index: dict[str, Any]
    tokenizer: ChatFormat
    tokenizer_path: str
    vocab_size: int
    token_bytes: torch.Tensor

    @classmethod
    def open(cls, data_dir: str, kind: str, stage_name: str, device: torch.device) -> RunData:
        """Open ``data_dir`` for a stage reading ``kind`` data; every problem is one line naming the path."""
        from igpt.data.chat import ChatFormat
        from igpt.data.partition import read_index_json
        from igpt.data.tokenizer import token_bytes, vocab_size
        from igpt.errors import DataError, MissingPathError

        index_path = os.path.join(data_dir, "index.json")
        if not os.path.isdir(data_dir):
            raise MissingPathError(f"data.dir={data_dir}: no such directory (prepare the data with python -m "
                                   f"igpt.data.prepare ... output_dir={data_dir})")
        if not os.path.exists(index_path):
            raise MissingPathError(f"data.dir={data_dir}: no index.json (prepare it: python -m igpt.data.prepare)")
        index = read_index_json(data_dir)
        if "kind" not in index:
            raise DataError(f"{index_path}: not an igpt index (no 'kind'); prepare the data again")
        if index["kind"] != kind:
            raise DataError(
                f"stage {stage_name} reads kind={kind} data, but {index_path} holds "
                f"kind={index['kind']} (prepare it with python -m igpt.data.prepare kind={kind})"
            )
        tokenizer = ChatFormat.load(data_dir)
        return cls(data_dir, index, tokenizer, os.path.join(data_dir, "tokenizer.json"), vocab_size(tokenizer),
                   token_bytes(tokenizer).to(device))

    def samples(self, split: str) -> int:
        return self.index["splits"].get(split, {}).get("samples", 0)


class RunContext:
    """A stage's view of the run (see the module docstring). ``models`` is filled once the models are built;
    ``step`` is the number of optimizer steps done so far."""

    def __init__(self, cfg: Config, strategy: Strategy, device: torch.device, data: RunData, accum: int,
                 model_cfg: ModelConfig | None = None) -> None:
        self.cfg = cfg
        self.strategy = strategy
        self.device = device
        self.rank, self.world_size = strategy.rank, strategy.world_size
        self.is_main = self.rank == 0
        self.data = data
        #: the data's tokenizer and its chat format (igpt.data.chat.ChatFormat; it answers the Tokenizer API too)
        self.tokenizer = data.tokenizer
        self.tokenizer_path = data.tokenizer_path
        self.index = data.index
        self.token_bytes = data.token_bytes
        self.pad_id = data.tokenizer.pad_id
        self.stop_ids = data.tokenizer.stop_ids
        #: micro-batches per optimizer step of an offline stage
        self.accum = accum
        #: the main model's resolved architecture (its source's, or the config's): a value, never written to cfg
        self.model_cfg: ModelConfig | None = model_cfg
        self.models: dict[str, Wrapped] = {}
        self.step = 0
        #: every loader whose position a checkpoint keeps: "train", and what a stage opens with open_loader
        self.loaders: dict[str, ShardLoader] = {}
        self._build_model: Callable[[ModelSpec], Wrapped] | None = None
        self._weights_source: Callable[[ModelSpec], WeightsSource] | None = None

    # ---- the models ----------------------------------------------------------------------------------------------
    def bind_builder(self, build: Callable[[ModelSpec], Wrapped], source: Callable[[ModelSpec], WeightsSource]
                     ) -> None:
        """Set by the trainer: what builds a model (``igpt.build.ModelBuilder.build``) and opens a weights source."""
        self._build_model, self._weights_source = build, source

    @property
    def trainable(self) -> dict[str, Wrapped]:
        """The trainable models, main one first: what a checkpoint holds."""
        return {role: h for role, h in self.models.items() if h.trainable}

    def build_model(self, spec: ModelSpec) -> Wrapped:
        """A model the stage uses and frees itself, outside its declared ones (DPO's reference while it precomputes
        the reference log-probs), built and placed like the declared ones."""
        assert self._build_model is not None
        return self._build_model(spec)

    def weights_source(self, spec: ModelSpec) -> WeightsSource:
        """The opened weights source of ``spec`` (an igpt checkpoint or a Hugging Face folder)."""
        assert self._weights_source is not None
        return self._weights_source(spec)

    # ---- the step ------------------------------------------------------------------------------------------------
    def lr(self) -> float:
        """The learning rate of the current step (``optim``'s schedule; a pure function of the step)."""
        return lr_at(self.step, self.cfg.optim, self.cfg.trainer.max_steps)

    def autocast(self):
        return self.strategy.autocast()

    def global_sum(self, values: list[torch.Tensor | float]) -> list[float]:
        """Sum scalars over ranks in one collective (float64)."""
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        return self.strategy.all_reduce(t).tolist()

    def micro_batches(self, batch: dict[str, torch.Tensor], size: int | None = None
                      ) -> Iterator[dict[str, torch.Tensor]]:
        """The rank's batch in micro-batches of ``size`` rows (default ``trainer.micro_batch_size``) on the device."""
        mb = size or self.cfg.trainer.micro_batch_size
        n = next(iter(batch.values())).shape[0]
        for i in range(0, n, mb):
            yield {k: v[i : i + mb].to(self.device, non_blocking=True) for k, v in batch.items()}

    # ---- data ----------------------------------------------------------------------------------------------------
    def make_loader(self, split: str, loop: bool, data_dir: str | None = None, pack: bool | None = None
                    ) -> ShardLoader:
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

    def open_loader(self, name: str, data_dir: str, pack: bool | None = None) -> ShardLoader:
        """An endless train loader over ``data_dir`` that the checkpoint keeps under ``name`` (resumed exactly)."""
        if name in self.loaders:
            raise ValueError(f"a loader named {name!r} is already open")
        loader = self.make_loader("train", loop=True, data_dir=data_dir, pack=pack)
        self.loaders[name] = loader
        return loader

    def num_partitions(self, data_dir: str | None = None) -> int:
        """``data.num_partitions``, or when unset the largest divisor of the global batch up to 8 that the train split
        of ``data_dir`` (default ``data.dir``) can fill: a function of the batch size and the data, not the world."""
        from igpt.data.loader import auto_partitions
        from igpt.data.partition import read_index

        if self.cfg.data.num_partitions is not None:
            return self.cfg.data.num_partitions
        samples = read_index(data_dir or self.cfg.data.dir, "train").samples
        return auto_partitions(self.cfg.trainer.global_batch_size, samples)

    def eval_batches(self, stage: Stage, split: str = "val", limit: int | None = None, data_dir: str | None = None
                     ) -> Iterator[dict[str, torch.Tensor]]:
        """The rank's batches of one pass over ``split`` (loop=False), ``limit`` batches at most (default
        ``trainer.eval_batches``; 0 = all). Every rank yields the same number of batches: one out of data gets
        ``stage.masked`` copies that contribute nothing, so sharded strategies stay in step."""
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

    def eval_micro_batches(self, stage: Stage, **kwargs) -> Iterator[dict[str, torch.Tensor]]:
        for batch in self.eval_batches(stage, **kwargs):
            yield from self.micro_batches(batch)


__all__ = ["RunContext", "RunData", "StepResult"]
