"""Canonical partitions over prepared WebDataset shards: which samples each partition reads, in which order.

The data order is fixed on a constant number P of *partitions*, never on the world size or the DataLoader worker
count (the idea of MosaicML Streaming's "canonical nodes"). Each partition is an independent, deterministic stream of
samples with its own epoch counter:

- In epoch ``e`` the list of *units* is permuted with a generator seeded from ``(seed, e)`` (the same permutation for
  every partition) and partition ``p`` reads units ``perm[p::P]`` in that order. A unit is normally one shard.
- When a split has fewer shards than partitions (tiny data only), the units are instead P sample-strided *virtual
  shards* over the whole split: unit ``j`` holds the samples with global index ``g % P == j`` (global index = position
  in the shard list order, shard by shard). Every unit is then non-empty as soon as the split has P samples; a unit
  reads from several shards, which costs nothing worth counting at that size.
- Within a unit the sample order is permuted with a generator seeded from ``(seed, e, unit)`` when ``shuffle``.

So in one epoch every sample of the split is read exactly once over all partitions, and the position of a partition
is four integers (epoch, unit position, sample position in the unit, token offset in the sample): restoring it reopens
that unit's shard and jumps to the sample, never replaying the stream.

Shards are read with a small memory-mapped tar reader (headers checked against their checksums, payloads taken as
zero-copy ``np.frombuffer`` views) rather than ``webdataset.WebDataset``: random access inside a shard is what makes
exact resume cheap, and it reads well above 10M tokens/s. The sample format is the one ``igpt.data.prepare`` writes
(docs/internals.md, "Prepared data").
"""

from __future__ import annotations

import json
import mmap
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from igpt.checksum import buffer_checksum
from igpt.data.kinds import KIND_FIELDS, OTHER_FIELDS
from igpt.errors import DataError, MissingPathError

INDEX_VERSION = 1


SHARD_CHECKSUM = "xxh3_64"  # index.json: each shard's checksum (igpt.checksum), verified once per process
_VERIFIED: set[tuple] = set()  # (path, size, mtime_ns, checksum) of the shards this process has verified


class CorruptShardError(DataError, RuntimeError):
    """A shard that cannot be read (truncated, bad tar header, missing or malformed sample field, wrong checksum)."""

    def __init__(self, message: str, shard: str | None = None) -> None:
        super().__init__(message)
        self.shard = shard


@dataclass(frozen=True)
class ShardInfo:
    name: str  # as in index.json, relative to the data dir, e.g. "train/shard-000000.tar"
    path: str
    samples: int
    tokens: int
    checksum: str | None = None  # index.json's xxh3_64 (None: data prepared before checksums, or data.verify=false)


@dataclass
class SplitIndex:
    """One split of a prepared data dir, read from its index.json."""

    data_dir: str
    split: str
    kind: str
    dtype: np.dtype
    vocab_size: int | None
    pad_id: int
    shards: list[ShardInfo] = field(default_factory=list)

    @property
    def samples(self) -> int:
        return sum(s.samples for s in self.shards)

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.shards)


def _pad_id(index: dict, tok_path: str) -> int:
    """The id padding rows hold: index.json's ``pad_id`` (prepare writes it), else for data prepared before it did,
    igpt's ``<|pad|>`` in the tokenizer. Padding is never a target nor attended to by real tokens, so any id is
    right when neither exists (0)."""
    if isinstance(index.get("pad_id"), int):
        return int(index["pad_id"])
    if os.path.exists(tok_path):
        with open(tok_path, encoding="utf-8") as f:
            tok = json.load(f)
        for added in tok.get("added_tokens", []):
            if added.get("content") == "<|pad|>":
                return int(added["id"])
    return 0


def read_index_json(data_dir: str) -> dict[str, Any]:
    """``<data_dir>/index.json`` as a dict; a missing, unreadable or non-object file is one error naming it."""
    path = os.path.join(data_dir, "index.json")
    if not os.path.exists(path):
        raise MissingPathError(f"{path} does not exist: prepare the data first (python -m igpt.data.prepare ...)")
    try:
        with open(path, encoding="utf-8") as f:
            index = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e}); prepare the data again (python -m igpt.data.prepare)") from None
    if not isinstance(index, dict):
        raise DataError(f"{path}: expected a JSON object (igpt's index), found {type(index).__name__}")
    return index


def read_index(data_dir: str, split: str) -> SplitIndex:
    """Read ``<data_dir>/index.json`` (schema in docs/internals.md) and return the given split."""
    path = os.path.join(data_dir, "index.json")
    index = read_index_json(data_dir)
    if index.get("version") != INDEX_VERSION:
        raise DataError(f"{path}: version {index.get('version')!r}, this loader reads version {INDEX_VERSION}")
    kind = index.get("kind")
    if kind not in KIND_FIELDS:
        raise DataError(f"{path}: kind {kind!r}; expected one of {', '.join(KIND_FIELDS)}")
    if index.get("dtype") not in ("uint16", "uint32"):
        raise DataError(f"{path}: dtype {index.get('dtype')!r}; expected uint16 or uint32")
    splits = index.get("splits", {})
    if split not in splits:
        raise DataError(f"{path}: no split {split!r}; the splits are {sorted(splits)}")
    tokenizer = index.get("tokenizer") or {}
    tok_path = os.path.join(data_dir, tokenizer.get("path") or "tokenizer.json")
    shards = []
    for i, s in enumerate(splits[split].get("shards", [])):
        try:
            shards.append(ShardInfo(s["name"], os.path.join(data_dir, s["name"]), int(s["samples"]), int(s["tokens"]),
                                    s.get(SHARD_CHECKSUM)))
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(
                f"{path}: splits.{split}.shards[{i}] is malformed ({e!r}); expected name/samples/tokens"
            ) from None
    if not shards:
        raise DataError(f"{path}: split {split!r} has no shards")
    vocab = tokenizer.get("vocab_size")
    return SplitIndex(
        data_dir=data_dir,
        split=split,
        kind=kind,
        dtype=np.dtype(index["dtype"]).newbyteorder("<"),
        vocab_size=int(vocab) if vocab else None,
        pad_id=_pad_id(index, tok_path),
        shards=shards,
    )


def _tar_number(field_: bytes) -> int:
    if field_[0] & 0x80:  # GNU base-256 for sizes >= 8 GiB
        return int.from_bytes(field_[1:], "big")
    return int(field_.strip(b"\0 ") or b"0", 8)


def _scan_tar(mm: mmap.mmap, name: str) -> list[tuple[str, int, int]]:
    """Return (member name, data offset, size) of the regular files of a tar held in ``mm``; raise on corruption."""
    n = len(mm)
    off = 0
    members: list[tuple[str, int, int]] = []
    headers: list[int] = []
    checksums: list[int] = []
    long_name: str | None = None
    while True:
        if off + 512 > n:
            raise CorruptShardError(f"shard {name} is truncated: no end-of-archive marker after byte {off}", name)
        hdr = mm[off : off + 512]
        if hdr[0] == 0 and hdr.count(0) == 512:
            break  # end of archive
        try:
            size = _tar_number(hdr[124:136])
            checksums.append(int(hdr[148:156].strip(b"\0 "), 8))
        except ValueError:
            raise CorruptShardError(f"shard {name} has a malformed tar header at byte {off}", name) from None
        headers.append(off)
        data = off + 512
        if data + size > n:
            raise CorruptShardError(
                f"shard {name} is truncated: the member at byte {off} needs {size} bytes, the file has {n - data}", name
            )
        kind = hdr[156:157]
        if kind in (b"0", b"\0", b"7"):
            if long_name is not None:
                member, long_name = long_name, None
            else:
                member = hdr[0:100].rstrip(b"\0").decode("utf-8", "replace")
                if hdr[257:262] == b"ustar" and hdr[345] != 0:
                    member = hdr[345:500].rstrip(b"\0").decode("utf-8", "replace") + "/" + member
            members.append((member, data, size))
        elif kind == b"L":  # GNU long name of the next member
            long_name = mm[data : data + size].rstrip(b"\0").decode("utf-8", "replace")
        elif kind == b"x":  # pax extended header: "<len> key=value\n" records; only a long path matters here
            blob = mm[data : data + size]
            if b" path=" in blob:
                for rec in blob.split(b"\n"):
                    key, _, value = rec.partition(b" ")[2].partition(b"=")
                    if key == b"path":
                        long_name = value.decode("utf-8", "replace")
        off = data + (size + 511) // 512 * 512
    if headers:
        # Checksum: sum of the header bytes with the checksum field counted as 8 spaces (POSIX ustar).
        blocks = np.frombuffer(mm, dtype=np.uint8, count=off).reshape(-1, 512)  # (n_blocks, 512)
        hidx = np.asarray(headers, dtype=np.int64) // 512
        want = np.asarray(checksums, dtype=np.int64)
        for i in range(0, len(hidx), 4096):
            h = blocks[hidx[i : i + 4096]].astype(np.int64)  # (chunk, 512)
            got = h.sum(1) - h[:, 148:156].sum(1) + 8 * 32
            bad = np.nonzero(got != want[i : i + 4096])[0]
            if len(bad):
                raise CorruptShardError(
                    f"shard {name}: tar header checksum mismatch at byte {headers[i + bad[0]]}", name
                )
    return members


class Shard:
    """A memory-mapped, validated shard: ``get(i)`` returns the arrays of sample ``i`` (zero-copy views)."""

    def __init__(self, info: ShardInfo, kind: str, dtype: np.dtype, vocab_size: int | None) -> None:
        self.info = info
        # Ids must be < vocab_size; without one, uint32 ids must still fit the loader's int32 transfer tensors.
        self.vocab_size = vocab_size if vocab_size else (2**31 if dtype.itemsize > 2 else None)
        name = info.name
        if not os.path.exists(info.path):
            raise MissingPathError(f"shard {name} listed in index.json is missing: {info.path}")
        with open(info.path, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                raise CorruptShardError(f"shard {name} is empty (0 bytes)", name)
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            st = os.fstat(f.fileno())
        if info.checksum:
            key = (info.path, st.st_size, st.st_mtime_ns, info.checksum)
            if key not in _VERIFIED:
                got = buffer_checksum(self._mm)
                if got != info.checksum:
                    raise CorruptShardError(
                        f"shard {name} is corrupt: its {SHARD_CHECKSUM} checksum is {got}, index.json recorded "
                        f"{info.checksum} ({info.path}; prepare or copy it again, or data.skip_corrupt=true)", name)
                _VERIFIED.add(key)
        fields = KIND_FIELDS[kind]
        self._dtypes = [np.dtype(OTHER_FIELDS[f]) if f in OTHER_FIELDS else dtype for f in fields]
        self._token = [f not in OTHER_FIELDS for f in fields]
        keys: list[str] = []
        found: list[dict[str, tuple[int, int]]] = []
        for member, off, size in _scan_tar(self._mm, name):
            slash = member.rfind("/")
            dot = member.find(".", slash + 1)
            if dot < 0:
                raise CorruptShardError(
                    f"shard {name}: member {member!r} has no extension (expected <key>.<field>)", name
                )
            key, ext = member[:dot], member[dot + 1 :]
            if not keys or keys[-1] != key:
                keys.append(key)
                found.append({})
            found[-1][ext] = (off, size)
        if len(keys) != info.samples:
            raise CorruptShardError(
                f"shard {name} holds {len(keys)} samples but index.json says {info.samples} (truncated or replaced?)",
                name,
            )
        self.keys = keys
        self._offsets = np.zeros((len(fields), len(keys)), dtype=np.int64)
        self._counts = np.zeros((len(fields), len(keys)), dtype=np.int64)
        for i, (key, got) in enumerate(zip(keys, found)):
            for j, (fname, dt) in enumerate(zip(fields, self._dtypes)):
                if fname not in got:
                    raise CorruptShardError(f"shard {name}: sample {key!r} has no {fname} (has {sorted(got)})", name)
                off, size = got[fname]
                if size % dt.itemsize:
                    raise CorruptShardError(
                        f"shard {name}: sample {key!r} field {fname} has {size} bytes, not a multiple of {dt.itemsize}",
                        name,
                    )
                self._offsets[j, i] = off
                self._counts[j, i] = size // dt.itemsize
        # Each mask has the length of the token field before it (ids.bin / mask.bin).
        for j, fname in enumerate(fields):
            if fname.endswith("mask.bin") and (self._counts[j] != self._counts[j - 1]).any():
                i = int(np.nonzero(self._counts[j] != self._counts[j - 1])[0][0])
                raise CorruptShardError(
                    f"shard {name}: sample {keys[i]!r} has {self._counts[j, i]} {fname} entries for "
                    f"{self._counts[j - 1, i]} tokens",
                    name,
                )

    def __len__(self) -> int:
        return len(self.keys)

    def get(self, i: int) -> tuple[np.ndarray, ...]:
        out = tuple(
            np.frombuffer(self._mm, dtype=dt, count=int(self._counts[j, i]), offset=int(self._offsets[j, i]))
            for j, dt in enumerate(self._dtypes)
        )
        if self.vocab_size is not None:
            for j, token in enumerate(self._token):
                if token and len(out[j]) and int(out[j].max()) >= self.vocab_size:
                    raise CorruptShardError(
                        f"shard {self.info.name}: sample {self.keys[i]!r} has token id {int(out[j].max())} >= "
                        f"vocab_size {self.vocab_size}",
                        self.info.name,
                    )
        return out


class Layout:
    """Which units partition ``p`` reads in epoch ``e``, and which samples (global ids) a unit holds, in what order."""

    def __init__(self, index: SplitIndex, num_partitions: int, seed: int, shuffle: bool) -> None:
        self.index = index
        self.num_partitions = num_partitions
        self.seed = seed
        self.shuffle = shuffle
        n = len(index.shards)
        self.virtual = n < num_partitions  # tiny split: P sample-strided units instead of one unit per shard
        self.num_units = num_partitions if self.virtual else n
        # global sample id of each shard's first sample; (n + 1,)
        self.first = np.concatenate([[0], np.cumsum([sh.samples for sh in index.shards])]).astype(np.int64)
        self._perm_epoch = -1
        self._perm = np.arange(self.num_units)

    def check_nonempty(self) -> None:
        """Every unit must hold a sample, or a partition could get no data in an endless (loop) stream."""
        total = int(self.first[-1])
        if self.virtual and total < self.num_partitions:
            raise ValueError(
                f"split {self.index.split!r} has {total} sample(s) in {len(self.index.shards)} shard(s), fewer than "
                f"num_partitions={self.num_partitions}: some partition would get no data; use data.num_partitions "
                f"<= {max(total, 1)} (and a global batch size it divides) or more data"
            )

    def units(self, epoch: int, partition: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            if self.shuffle:
                rng = np.random.default_rng(np.random.SeedSequence([self.seed, 0, epoch]))
                self._perm = rng.permutation(self.num_units)
            self._perm_epoch = epoch
        return self._perm[partition :: self.num_partitions]

    def unit_samples(self, epoch: int, unit: int) -> np.ndarray:
        """Global sample ids of ``unit`` in reading order for ``epoch``."""
        unit = int(unit)
        if self.virtual:
            ids = np.arange(unit, int(self.first[-1]), self.num_partitions)
        else:
            ids = np.arange(self.first[unit], self.first[unit + 1])
        if self.shuffle:
            ids = np.random.default_rng(np.random.SeedSequence([self.seed, 1, epoch, unit])).permutation(ids)
        return ids

    def locate(self, sample: int) -> tuple[int, int]:
        """Global sample id -> (shard index, sample index in the shard)."""
        shard = int(np.searchsorted(self.first, sample, side="right")) - 1
        return shard, int(sample - self.first[shard])


Location = tuple[int, int, int]  # (epoch, unit position in the partition's epoch, sample position in the unit)


class SampleCursor:
    """The deterministic sample stream of one partition, positioned at ``(epoch, unit, sample)``.

    ``next()`` returns ``(location, arrays)`` of the next sample and advances, or ``None`` at the end of the first
    epoch when ``loop`` is off. A corrupt shard raises ``CorruptShardError``; with ``skip_corrupt`` its name is
    appended to ``skipped`` instead and the unit's remaining samples from that shard are skipped (a whole-shard unit
    ends there; samples already returned stay). Restoring a position that lies past a corrupt shard's point of failure
    never revisits it, and one before it meets it again, so skipping is as deterministic as reading.
    """

    def __init__(
        self,
        layout: Layout,
        partition: int,
        *,
        loop: bool,
        skip_corrupt: bool,
        epoch: int = 0,
        unit: int = 0,
        sample: int = 0,
    ) -> None:
        self.layout = layout
        self.partition = partition
        self.loop = loop
        self.skip_corrupt = skip_corrupt
        self.epoch, self.unit, self.sample = epoch, unit, sample
        self.skipped: list[str] = []
        self.last_id = -1
        self._units: np.ndarray | None = None
        self._order: np.ndarray | None = None
        self._bad: set[int] = set()  # shards of the current unit found corrupt (skip_corrupt)
        self._shards: OrderedDict[int, Shard] = OrderedDict()  # a few open shards: virtual units share them
        self._fresh_epoch = unit == 0 and sample == 0
        self._epoch_samples = 0

    @property
    def position(self) -> Location:
        return (self.epoch, self.unit, self.sample)

    def _open(self, shard: int) -> Shard:
        if shard in self._shards:
            self._shards.move_to_end(shard)
            return self._shards[shard]
        idx = self.layout.index
        opened = Shard(idx.shards[shard], idx.kind, idx.dtype, idx.vocab_size)
        self._shards[shard] = opened
        if len(self._shards) > (len(idx.shards) if self.layout.virtual else 2):
            self._shards.popitem(last=False)
        return opened

    def _skip(self, err: CorruptShardError, shard: int) -> None:
        if not self.skip_corrupt:
            raise err
        self.skipped.append(err.shard or str(err))
        if self.layout.virtual:  # the unit goes on with its samples from other shards
            self._bad.add(shard)
            self.sample += 1
        else:
            self.unit, self.sample, self._order = self.unit + 1, 0, None

    def next(self) -> tuple[Location, tuple[np.ndarray, ...]] | None:
        layout = self.layout
        while True:
            if self._units is None:
                self._units = layout.units(self.epoch, self.partition)
            if self.unit >= len(self._units):
                if not self.loop:
                    return None
                if self._fresh_epoch and self._epoch_samples == 0:
                    skipped = f" (corrupt shards skipped: {sorted(set(self.skipped))})" if self.skipped else ""
                    raise RuntimeError(
                        f"partition {self.partition} read no samples in epoch {self.epoch} of split "
                        f"{layout.index.split!r}{skipped}; an endless stream needs data in every partition"
                    )
                self.epoch, self.unit, self.sample = self.epoch + 1, 0, 0
                self._units, self._order, self._fresh_epoch, self._epoch_samples = None, None, True, 0
                continue
            unit = int(self._units[self.unit])
            if self._order is None:
                self._bad = set()
                if not layout.virtual:  # open (and validate) the unit's shard before reading any of it
                    try:
                        self._open(unit)
                    except CorruptShardError as e:
                        self._skip(e, unit)
                        continue
                self._order = layout.unit_samples(self.epoch, unit)
            if self.sample >= len(self._order):
                self.unit, self.sample, self._order = self.unit + 1, 0, None
                continue
            g = int(self._order[self.sample])
            shard, i = (unit, g - int(layout.first[unit])) if not layout.virtual else layout.locate(g)
            if shard in self._bad:
                self.sample += 1
                continue
            try:
                arrays = self._open(shard).get(i)
            except CorruptShardError as e:
                self._skip(e, shard)
                continue
            loc = (self.epoch, self.unit, self.sample)
            self.sample += 1
            self._epoch_samples += 1
            self.last_id = g  # the sample's global id in the split (index order), for per-sample side data
            return loc, arrays
