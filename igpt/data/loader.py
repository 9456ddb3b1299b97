"""A deterministic, world-size-independent, exactly resumable loader over prepared WebDataset shards.

The data order is fixed on ``num_partitions`` canonical partitions P (``igpt.data.partition``; the idea of MosaicML
Streaming's canonical nodes): global batch ``b`` holds, for ``p = 0..P-1`` in order, rows ``[b*R, (b+1)*R)`` of
partition ``p`` with ``R = global_batch_size / P`` (docs/internals.md, "Batches"). Rank ``r`` of ``W`` reads rows
``[r*G/W, (r+1)*G/W)`` of every global batch (``G = global_batch_size``) and DataLoader worker ``k`` of ``K`` a
contiguous sub-range of those, so concatenating the ranks' local batches in rank order gives the same global batches
for every ``W`` and ``K``. A reader runs the packers of every partition its rows touch; when P is a multiple of
``W * K`` that is whole partitions of its own, otherwise a partition at the edge of two readers' ranges is packed by
both and each keeps its rows (packing is cheap next to a training step, and the result is the same). ``G`` must be a
multiple of P and of ``W * K``; anything else is refused with a ValueError. ``auto_partitions`` picks P when the
config leaves it unset: the largest divisor of ``G`` up to 8 that the train split can fill (so small data and a
global batch of, say, 4 or 12 work with default settings; 8 whenever ``G`` is a multiple of 8 and there are 8 samples).

Resume: every partition's position is four integers (``igpt.data.packing``). Each worker sends, with its chunk of a
global batch, the states of the partitions it reads *after* that chunk (equal wherever two readers share one); the
main process keeps the states of the last batch it handed out, so prefetching never leaks into ``state_dict()``.
The trainer gathers every rank's ``state_dict()``, merges them with ``ShardLoader.merge_state_dicts`` and saves the
merge; ``load_state_dict`` at any world size and worker count picks this rank's partitions, and the following batches
equal those of an uninterrupted run.

``loop=False`` (evaluation) reads every partition once: each partition then emits padding rows (labels -100) until
all partitions of the rank are done, and the rank stops. Each ``iter()`` of such a loader is a fresh pass (from the
beginning, or from a state given to ``load_state_dict``). With ``loop=True`` an ``iter()`` continues where the last
consumed batch left off.

Corrupt or truncated shards raise ``CorruptShardError`` naming the shard (from a DataLoader worker too). With
``skip_corrupt=True`` the shard is skipped instead: a warning names it (once), ``stats["skipped_shards"]`` counts the
distinct shards and ``stats["skip_events"]`` every time one was met (each epoch meets it again). Samples already taken
from it stay; since the reader checks every tar header and the sample count against index.json when it opens a
shard, a truncated or mangled shard is normally refused before any of it is read (an out-of-vocabulary id is caught
at its sample).

Reading speed (bench/data.py on a 16-core machine, seq_len 1024, batch 64, 50M tokens): the loader delivers ~35M
tokens/s in-process, ~67M with 2 workers and ~93M with 4 (the tar reader alone ~125M), against 10-19M tokens/s for
raw ``webdataset.WebDataset`` reads of the same shards.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from igpt.data.packing import ConvPacker, Packer, PrefPacker, PromptPacker, TextPacker
from igpt.data.partition import CorruptShardError, Layout, SampleCursor, SplitIndex, read_index

__all__ = ["ShardLoader", "CorruptShardError"]

STATE_VERSION = 1
log = logging.getLogger(__name__)

# The batch keys of each data kind (docs/internals.md, "Batches"), what padding rows hold in each, and the keys that
# carry float32 values as their bits through the int32 transfer tensors.
BATCH_KEYS: dict[str, tuple[str, ...]] = {
    "text": ("input_ids", "labels", "position_ids"),
    "sft": ("input_ids", "labels", "position_ids"),
    "pref": ("input_ids", "labels", "position_ids", "seq_rank", "margin", "sample_id"),
    "kto": ("input_ids", "labels", "position_ids", "seq_rank", "margin", "sample_id"),  # pref rows with K = 1
    "prompt": ("input_ids", "prompt_len", "sample_id"),
}
PAD_VALUES = {"labels": -100, "seq_rank": -1, "margin": 0, "sample_id": -1, "prompt_len": 0}
FLOAT_KEYS = ("margin",)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def auto_partitions(global_batch_size: int, train_samples: int, most: int = 8) -> int:
    """The number of canonical partitions when the config leaves it unset: the largest divisor of
    ``global_batch_size`` that is at most ``most`` and at most the train split's sample count (at least 1). It
    depends on the run's batch size and data only, never on the world size, so resuming elsewhere keeps the order."""
    cap = max(1, min(most, train_samples))
    return max(d for d in _divisors(global_batch_size) if d <= cap)


def row_slices(lo: int, hi: int, rows_per_partition: int) -> list[tuple[int, int, int]]:
    """``(partition, first, end)`` of the rows ``[lo, hi)`` of a global batch: the partitions they touch, in order,
    and which of each partition's ``rows_per_partition`` rows they hold."""
    R = rows_per_partition
    return [(p, max(lo, p * R) - p * R, min(hi, (p + 1) * R) - p * R) for p in range(lo // R, (hi - 1) // R + 1)]


def _identity(x: Any) -> Any:
    return x


class _Spec:
    """What a worker needs to build its partitions' packers (picklable)."""

    def __init__(
        self,
        index: SplitIndex,
        layout: Layout,
        seq_len: int,
        rows_per_partition: int,
        pack: bool,
        loop: bool,
        skip_corrupt: bool,
    ) -> None:
        self.index = index
        self.layout = layout
        self.seq_len = seq_len
        self.R = rows_per_partition
        self.pack = pack
        self.loop = loop
        self.skip_corrupt = skip_corrupt

    def packer(self, p: int, state: dict) -> Packer:
        cursor = SampleCursor(
            self.layout,
            p,
            loop=self.loop,
            skip_corrupt=self.skip_corrupt,
            epoch=state["epoch"],
            unit=state["unit"],
            sample=state["sample"],
        )
        kind, S, pad = self.index.kind, self.seq_len, self.index.pad_id
        if kind in ("pref", "kto"):
            return PrefPacker(cursor, S, pad, done=state["done"])
        if kind == "prompt":
            return PromptPacker(cursor, S, pad, done=state["done"])
        if kind == "text" and self.pack:
            return TextPacker(cursor, S, pad, offset=state["offset"], done=state["done"])
        return ConvPacker(cursor, S, pad, pack=self.pack, done=state["done"])

    @property
    def keys(self) -> tuple[str, ...]:
        return BATCH_KEYS[self.index.kind]

    def pad_chunk(self, n_rows: int) -> torch.Tensor:
        """(C, n_rows, S) padding rows (no loss, no segments) for a worker whose partitions have all run out."""
        S = self.seq_len
        out = torch.empty((len(self.keys), n_rows, S), dtype=torch.int32)
        for c, key in enumerate(self.keys):
            if key == "input_ids":
                out[c] = self.index.pad_id
            elif key == "position_ids":
                out[c] = torch.arange(S, dtype=torch.int32)
            else:
                out[c] = PAD_VALUES[key]
        return out


def _produce(
    spec: _Spec, slices: list[tuple[int, int, int]], states: dict[int, dict], worker: int, group: int = 1
) -> Iterator[dict]:
    """Yield this worker's chunks (its rows of each partition it reads, ``slices`` as ``row_slices`` gives them) of
    ``group`` consecutive global batches at a time, each with the states of those partitions after that chunk; with
    loop=False, a final item without rows when done.

    A DataLoader worker pays per tensor it sends (a shared-memory segment each, costly in sandboxes), so all the
    chunks of an item travel as one int32 tensor (g, C, rows, S), C = one channel per batch key.
    """
    partitions = [p for p, _, _ in slices]
    packers = {p: spec.packer(p, states[p]) for p in partitions}
    rows = sum(end - first for _, first, end in slices)
    b = 0
    while True:
        chunks: list[np.ndarray] = []
        after: list[dict[int, dict]] = []
        done = False
        while len(chunks) < group:
            if not spec.loop and all(packers[p].exhausted() for p in partitions):
                done = True
                break
            chunk = np.empty((len(spec.keys), rows, spec.seq_len), dtype=np.int32)  # (C, rows, S)
            row = 0
            for p, first, end in slices:
                part = packers[p].rows(spec.R)  # the partition's R rows; this reader keeps [first, end)
                for c, key in enumerate(spec.keys):
                    chunk[c, row : row + end - first] = part[key][first:end]
                row += end - first
            chunks.append(chunk)
            after.append({p: packers[p].state() for p in partitions})
        if chunks:
            batch = torch.from_numpy(np.stack(chunks) if len(chunks) > 1 else chunks[0][None])  # (g, C, rows, S)
            yield {"b": b, "w": worker, "batch": batch, "states": after, "skipped": _drain(packers)}
            b += len(chunks)
        if done:
            final = {p: packers[p].state() for p in partitions}
            yield {"b": b, "w": worker, "batch": None, "states": [final], "skipped": _drain(packers)}
            return


def _drain(packers: dict[int, Packer]) -> list[str]:
    out: list[str] = []
    for p in packers.values():
        out += p.cursor.skipped
        p.cursor.skipped = []
    return out


def _batch_dict(out: torch.Tensor, keys: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """(C, b, S) int64 channels -> the batch dict; float channels get their float32 values back."""
    return {
        key: out[c].to(torch.int32).view(torch.float32) if key in FLOAT_KEYS else out[c] for c, key in enumerate(keys)
    }


class _WorkerDataset(IterableDataset):
    """The rank's rows ``[lo, hi)`` of every global batch split into contiguous ranges, one per DataLoader worker."""

    def __init__(self, spec: _Spec, lo: int, hi: int, states: dict[int, dict], num_workers: int) -> None:
        self.spec = spec
        self.lo, self.hi = lo, hi
        self.states = states
        self.num_workers = num_workers

    def worker_rows(self, k: int) -> tuple[int, int]:
        n = (self.hi - self.lo) // self.num_workers
        return self.lo + k * n, self.lo + (k + 1) * n

    def worker_slices(self, k: int) -> list[tuple[int, int, int]]:
        return row_slices(*self.worker_rows(k), self.spec.R)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        k = info.id if info is not None else 0
        if info is not None and info.num_workers != self.num_workers:
            raise RuntimeError(f"expected {self.num_workers} DataLoader workers, got {info.num_workers}")
        lo, hi = self.worker_rows(k)
        # In a worker, send groups of batches of about 1M tokens (see _produce); in-process, one batch at a time.
        group = 1 if info is None else max(1, min(16, (1 << 20) // ((hi - lo) * self.spec.seq_len)))
        return _produce(self.spec, self.worker_slices(k), self.states, k, group)


class ShardLoader:
    """Iterate this rank's slice of every global batch of a prepared split (module docstring).

    Args:
        data_dir: a directory written by ``python -m igpt.data.prepare`` (its index.json gives the kind).
        split: "train" or "val".
        seq_len: tokens per row S (rows are read as S + 1 tokens: inputs and shifted labels).
        global_batch_size: rows per global batch over all ranks; a multiple of ``num_partitions`` and of
            ``world_size * max(num_workers, 1)``.
        rank, world_size: this process's place.
        num_workers: DataLoader worker processes for this rank (0: read in this process).
        num_partitions: canonical partitions P (``auto_partitions`` picks one); the data order depends on it and
            on ``seed`` only.
        seed: data-order seed. shuffle: permute shards and samples every epoch (else the index order).
        pack: pack documents/conversations into rows (kind=text, sft); kind=pref always has one pair per row.
        loop: cycle epochs forever (training) or read the split once (evaluation).
        skip_corrupt: skip truncated/corrupt shards with a warning instead of failing.
        verify: check each shard's checksum (index.json's ``xxh3_64``) the first time this process opens it.
    """

    def __init__(
        self,
        data_dir: str,
        split: str,
        *,
        seq_len: int,
        global_batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        num_partitions: int = 8,
        seed: int = 0,
        shuffle: bool = True,
        pack: bool = True,
        loop: bool = True,
        skip_corrupt: bool = False,
        verify: bool = True,
    ) -> None:
        P, W, K = num_partitions, world_size, max(num_workers, 1)
        if seq_len < 1 or P < 1 or W < 1 or global_batch_size < 1 or num_workers < 0 or seed < 0:
            raise ValueError(
                f"need seq_len, num_partitions, world_size, global_batch_size >= 1 and num_workers, seed >= 0; got "
                f"seq_len={seq_len}, num_partitions={P}, world_size={W}, global_batch_size={global_batch_size}, "
                f"num_workers={num_workers}, seed={seed}"
            )
        if not 0 <= rank < W:
            raise ValueError(f"rank={rank} is outside world_size={W}")
        if global_batch_size % P:
            raise ValueError(
                f"global_batch_size={global_batch_size} is not a multiple of num_partitions={P}: every global batch "
                f"takes global_batch_size / num_partitions rows from each partition. Use a global_batch_size that is "
                f"a multiple of {P} (e.g. {max(P, global_batch_size // P * P)}) or num_partitions in "
                f"{_divisors(global_batch_size)}"
            )
        if global_batch_size % (W * K):
            raise ValueError(
                f"global_batch_size={global_batch_size} cannot be split evenly over world_size={W} x "
                f"num_workers={K} = {W * K} readers: each rank and DataLoader worker reads the same number of rows "
                f"of every global batch. Use a global_batch_size that is a multiple of {W * K}, or world_size x "
                f"num_workers in {_divisors(global_batch_size)}"
            )
        self.index = read_index(data_dir, split)
        if not verify:  # data.verify=false: no checksum reads (each process otherwise checks a shard once)
            self.index.shards = [dataclasses.replace(s, checksum=None) for s in self.index.shards]
        if self.index.vocab_size and self.index.vocab_size > 2**31:
            raise ValueError(f"vocab_size={self.index.vocab_size} in {data_dir}/index.json: at most 2**31 is supported")
        self.layout = Layout(self.index, P, seed, shuffle)
        if loop:
            self.layout.check_nonempty()
        self.data_dir, self.split, self.kind = data_dir, split, self.index.kind
        self.seq_len, self.global_batch_size = seq_len, global_batch_size
        self.rank, self.world_size, self.num_workers = rank, W, num_workers
        self.num_partitions, self.seed, self.shuffle, self.pack = P, seed, shuffle, pack
        self.loop, self.skip_corrupt = loop, skip_corrupt
        self.rows_per_partition = global_batch_size // P
        self.local_batch_size = global_batch_size // W
        self.rows = (rank * self.local_batch_size, (rank + 1) * self.local_batch_size)  # of every global batch
        self.partitions = [p for p, _, _ in row_slices(*self.rows, self.rows_per_partition)]
        self._initial = {p: {"epoch": 0, "unit": 0, "sample": 0, "offset": 0, "done": False} for p in self.partitions}
        self._states = copy.deepcopy(self._initial)
        self._loaded = False
        # skipped_shards: distinct corrupt shards skipped; skip_events: times one was met (per unit and epoch)
        self.stats: dict[str, Any] = {"skipped_shards": 0, "skip_events": 0, "skipped_shard_names": []}

    # ------------------------------------------------------------------ info
    @property
    def epoch(self) -> int:
        """The lowest epoch among this rank's partitions (each partition counts its own epochs)."""
        return min(s["epoch"] for s in self._states.values())

    # ------------------------------------------------------------------ iteration
    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if self.loop or self._loaded:
            start = copy.deepcopy(self._states)
        else:
            start = copy.deepcopy(self._initial)  # every pass of an evaluation loader reads the split from the start
        self._loaded = False
        self._states = copy.deepcopy(start)
        spec = _Spec(
            self.index, self.layout, self.seq_len, self.rows_per_partition, self.pack, self.loop, self.skip_corrupt
        )
        K = max(self.num_workers, 1)
        dataset = _WorkerDataset(spec, *self.rows, start, K)
        if self.num_workers == 0:
            items: Iterator[dict] = iter(dataset)
        else:
            items = iter(DataLoader(dataset, batch_size=None, num_workers=K, collate_fn=_identity))
        return self._assemble(items, dataset, K)

    def _assemble(self, items: Iterator[dict], dataset: _WorkerDataset, K: int) -> Iterator[dict[str, torch.Tensor]]:
        try:
            yield from self._assemble_batches(items, dataset, K)
        except CorruptShardError as e:
            first = str(e).splitlines()[0] if str(e) else ""
            if first.startswith("Caught CorruptShardError"):  # a worker's, re-raised by torch with its traceback text
                lines = [ln for ln in str(e).splitlines() if "CorruptShardError:" in ln]
                message = lines[-1].split("CorruptShardError:", 1)[1].strip() if lines else str(e)
                raise CorruptShardError(f"{message} (in a DataLoader worker)", e.shard) from None
            raise
        finally:
            # Stop the workers now (on break, exhaustion or a worker's error) rather than when the garbage collector
            # reaches the iterator: collected inside a reference cycle (an exception's traceback) its shutdown waits
            # 5 s per worker before killing them.
            shutdown = getattr(items, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()

    def _assemble_batches(
        self, items: Iterator[dict], dataset: _WorkerDataset, K: int
    ) -> Iterator[dict[str, torch.Tensor]]:
        # Workers' items carry (first batch index, worker id) and one or more chunks; with loop=False a worker that
        # runs out sends a final item without rows and stops while the others go on, so a batch is complete once
        # every worker has either sent its chunk or finished earlier.
        pending: dict[int, dict[int, tuple[torch.Tensor, dict]]] = {}  # batch -> worker -> (chunk, states after)
        finished: dict[int, tuple[int, dict]] = {}  # worker -> (batch index where it ran out, its final states)
        keys = dataset.spec.keys
        b = 0

        def complete(b: int) -> bool:
            got = pending.get(b, {})
            return all(w in got or (w in finished and finished[w][0] <= b) for w in range(K))

        exhausted = False
        while True:
            while not complete(b):
                item = next(items, None)
                if item is None:
                    exhausted = True
                    break
                self._note_skipped(item["skipped"])
                if item["batch"] is None:
                    finished[item["w"]] = (item["b"], item["states"][0])
                else:
                    for i, st in enumerate(item["states"]):
                        pending.setdefault(item["b"] + i, {})[item["w"]] = (item["batch"][i], st)
            got = pending.pop(b, {})
            if not got:
                if exhausted or len(finished) == K:
                    for _, st in finished.values():
                        self._states.update(st)
                    return
                raise RuntimeError(f"data loader workers sent no chunk of batch {b} (internal error)")
            out = torch.empty((len(keys), self.local_batch_size, self.seq_len), dtype=torch.int64)  # (C, b, S)
            out_np = out.numpy()
            states: dict[int, dict] = {}
            row = 0
            for w in range(K):
                if w in got:
                    chunk, st = got[w]
                else:  # this worker's partitions have all run out: padding rows
                    lo, hi = dataset.worker_rows(w)
                    chunk = dataset.spec.pad_chunk(hi - lo)
                    st = finished[w][1]
                # numpy: a single-threaded copy; torch's threaded copy_ crawls when the CPUs are busy (e.g. workers)
                out_np[:, row : row + chunk.shape[1]] = chunk.numpy()  # chunk: (C, rows, S)
                row += chunk.shape[1]
                states.update(st)
            self._states.update(states)
            b += 1
            yield _batch_dict(out, keys)

    def padding_batch(self) -> dict[str, torch.Tensor]:
        """A local batch of padding rows (no loss, no segments): what a rank out of data runs in a collective pass."""
        spec = _Spec(self.index, self.layout, self.seq_len, self.rows_per_partition, self.pack, False, False)
        return _batch_dict(spec.pad_chunk(self.local_batch_size).to(torch.int64), spec.keys)

    def _note_skipped(self, names: list[str]) -> None:
        for name in names:
            self.stats["skip_events"] += 1
            if name in self.stats["skipped_shard_names"]:
                continue  # met again (another unit or epoch): counted, not warned again
            self.stats["skipped_shard_names"].append(name)
            self.stats["skipped_shards"] = len(self.stats["skipped_shard_names"])
            msg = f"skipping corrupt shard {name} (data.skip_corrupt=true); the rest of that shard is not read"
            log.warning(msg)
            warnings.warn(msg, RuntimeWarning, stacklevel=3)

    # ------------------------------------------------------------------ state
    def _header(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "num_partitions": self.num_partitions,
            "seed": self.seed,
            "split": self.split,
            "seq_len": self.seq_len,
            "kind": self.kind,
            "shuffle": self.shuffle,
            "pack": self.pack,
            "shards": len(self.index.shards),
            "samples": self.index.samples,
        }

    def state_dict(self) -> dict[str, Any]:
        """This rank's partition states after the last batch handed out (plain ints/bools: weights_only-safe)."""
        state = self._header()
        state["partitions"] = {str(p): dict(s) for p, s in sorted(self._states.items())}
        return state

    @staticmethod
    def merge_state_dicts(states: list[dict[str, Any]]) -> dict[str, Any]:
        """Merge every rank's ``state_dict()`` into one that any world size can load."""
        if not states:
            raise ValueError("merge_state_dicts needs at least one state dict")
        head = {k: v for k, v in states[0].items() if k != "partitions"}
        merged: dict[str, dict] = {}
        for i, s in enumerate(states):
            other = {k: v for k, v in s.items() if k != "partitions"}
            if other != head:
                diff = sorted(k for k in set(head) | set(other) if head.get(k) != other.get(k))
                raise ValueError(f"loader state {i} differs from state 0 in {diff}: not states of one run")
            for p, ps in s["partitions"].items():
                if p in merged and merged[p] != ps:  # a partition two ranks share: both must be at the same place
                    raise ValueError(f"partition {p} has different positions in two loader states (state {i})")
                merged[p] = dict(ps)
        missing = [p for p in range(head["num_partitions"]) if str(p) not in merged]
        if missing:
            raise ValueError(f"merged loader state lacks partitions {missing}: gather the state of every rank")
        return {**head, "partitions": {str(p): merged[str(p)] for p in range(head["num_partitions"])}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a (merged) state; takes effect at the next ``iter()``."""
        mine = self._header()
        for key, want in mine.items():
            if state.get(key) != want:
                raise ValueError(
                    f"cannot resume the data loader: saved {key}={state.get(key)!r} but this loader has {key}={want!r}"
                    " (the data order depends on it)"
                )
        parts = state.get("partitions", {})
        missing = [p for p in self.partitions if str(p) not in parts]
        if missing:
            raise ValueError(
                f"loader state lacks partitions {missing} of rank {self.rank}: save the merge of every rank's state "
                "(ShardLoader.merge_state_dicts)"
            )
        fields = ("epoch", "unit", "sample", "offset", "done")
        loaded = {}
        for p in self.partitions:
            ps = parts[str(p)]
            if any(f not in ps for f in fields):
                raise ValueError(f"loader state of partition {p} lacks one of {fields}: {ps}")
            loaded[p] = {f: (bool(ps[f]) if f == "done" else int(ps[f])) for f in fields}
        self._states = loaded
        self._loaded = True
