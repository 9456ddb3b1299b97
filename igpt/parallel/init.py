"""Meta-device initialisation: a model is built on the meta device, placed by its strategy, then only this rank's
shard of each parameter is allocated and filled (torchtitan's order: build on meta, parallelise, ``to_empty``, init).

The trainer builds every model under ``torch.device("meta")`` (nothing allocated, no random draw) and hands the
strategy a :class:`ModelInit` with it. The strategy applies activation checkpointing, ``torch.compile`` and its
sharding (FSDP2's ``fully_shard``, ZeRO-3's partitioning) to the empty model, allocates the local shards, and tells
:meth:`ModelInit.apply` where each parameter's shard lies in the flattened full tensor (:class:`Shard`). Then:

1. **The same initial weights as an eager model.** ``Transformer.init_plan`` lists every parameter's draw in the
   order ``init_weights`` makes them; each full tensor is drawn in chunks of ``CHUNK`` elements from a generator
   that starts where eager construction would have left torch's global one (``Transformer.construction_draws``
   replays the draws ``nn.Linear``/``nn.Embedding`` make when built on a real device), and the part of each chunk
   that falls in the rank's shard is copied into it. torch's CPU kernels draw element by element (``uniform_``) or
   in blocks of 16 with the last 16 redrawn when the size is not a multiple of 16 (``normal_``), so chunks of a
   multiple of 16 elements, the last one at least 16 long, give bit for bit the values of one call on the whole
   tensor (``tests/test_init.py`` checks both, and the weights of single, fsdp and zero3 against the eager model).
   Peak under fsdp: the rank's shards plus one chunk (16 MiB), not the model, not even one full tensor (ZeRO-3's
   conversion, ``deepspeed.zero.Init(module=...)``, broadcasts each parameter whole: one full tensor at a time).
2. **Weights from a source** (``init_from`` and the other ``ModelSpec.init`` keys): ``WeightsSource.load_into``
   with the shards reads, per tensor, only the rows that cover the rank's range (safetensors slices; DCP reads of a
   row range), and copies them in.

A resumed trainable model skips both (``draw=False``): the strategy's ``load`` fills it from the checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from igpt.shards import Shard

CHUNK = 1 << 22  # elements drawn at a time (16 MiB in fp32); a multiple of 16 (see the module docstring)


def chunks(numel: int, size: int = CHUNK) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` ranges that cover ``range(numel)`` in order: ``size`` elements (a multiple of 16) each, the
    last one merged with the one before when it would be shorter than 16 elements."""
    assert size % 16 == 0, size
    start = 0
    while start < numel:
        stop = min(numel, start + size)
        if 0 < numel - stop < 16:
            stop = numel
        yield start, stop
        start = stop


def to_empty(model: nn.Module, device: torch.device) -> nn.Module:
    """``model.to_empty(device)`` for a plain ``Transformer``, keeping a tied output matrix tied (``to_empty``
    gives each module its own new parameter)."""
    model.to_empty(device=device)
    if hasattr(model, "retie"):
        model.retie()
    return model


def on_meta(model: nn.Module) -> bool:
    return any(p.is_meta for p in model.parameters())


@dataclass
class ModelInit:
    """How a model built on the meta device gets its values once its strategy has placed it (module docstring).

    ``generator``: where eager construction would have left torch's generator (:meth:`fresh`); ``plan``: the model's
    ``init_plan``; ``load``: fills the shards from a weights source afterwards (``WeightsSource.load_into``);
    ``draw=False`` skips the initial draws (a resumed model: every value comes from the checkpoint).
    """

    plan: list
    generator: torch.Generator
    load: Callable[[dict[str, Shard], str | None], None] | None = None
    draw: bool = True

    @classmethod
    def fresh(cls, model: nn.Module, draw: bool = True, progress: bool = False) -> ModelInit:
        """For ``model`` (a ``Transformer`` on the meta device): a generator at torch's global state advanced past
        the construction draws (the global state itself is left as it is). ``progress``: a tqdm bar for a large
        model (rank 0)."""
        generator = torch.Generator()
        generator.set_state(torch.get_rng_state())
        if draw:
            draws = model.construction_draws()
            bar = _progress("construction draws" if progress else None, sum(n for n, _ in draws))
            for numel, d in draws:
                for start, stop in chunks(numel):
                    d(torch.empty(stop - start), generator)
                    bar.update(stop - start)
            bar.close()
        return cls(plan=model.init_plan(), generator=generator, draw=draw)

    @torch.no_grad()
    def apply(self, shards: dict[str, Shard], progress: str | None = None) -> None:
        """Fill ``shards`` (plain name -> this rank's :class:`Shard`): the initial draws, then the source's weights.

        ``progress``: rank 0's tqdm description (bars for the draws of a model of 100M parameters or more, and for
        the tensors read from a source)."""
        missing = sorted({name for name, _ in self.plan} - set(shards))
        if missing:
            raise ValueError(f"meta init: the placed model has no parameters {missing[:5]} of its init plan")
        if self.draw:
            bar = _progress(progress, sum(shards[n].numel for n, _ in self.plan))
            for name, draw in self.plan:
                shard = shards[name]
                if not draw.random:  # a constant: fill the local part only
                    draw(shard.local)
                    bar.update(shard.numel)
                    continue
                for start, stop in chunks(shard.numel):
                    values = draw(torch.empty(stop - start), self.generator)
                    shard.write_flat(start, values)
                    bar.update(stop - start)
            bar.close()
        if self.load is not None:
            self.load(shards, None if progress is None else f"{progress}: load")


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(desc: str | None, total: int):
    """A tqdm bar over parameter elements for models of 100M parameters or more (rank 0 passes ``desc``)."""
    if desc is None or total < 100_000_000:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="param", unit_scale=True, dynamic_ncols=True)
