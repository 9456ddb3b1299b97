"""Atomic checkpoints, retention and resume.

Layout (docs/internals.md)::

    <run_dir>/checkpoints/step_0000100/{meta.json, tokenizer.json, model.safetensors | model/, optimizer.pt,
                                        train_state.pt, <role>/...}
    <run_dir>/checkpoints/latest        names the newest complete checkpoint

The stage's first trainable model (the policy, or the reward model) is written at the top of the checkpoint, so every
tool that reads "the model" of a checkpoint finds it there; any further trainable model (PPO's critic) is written the
same way into a folder named after its role. ``meta.json`` lists them under ``"models"``.

``open_source`` reads any source of weights (an igpt checkpoint or run dir, or a Hugging Face model folder through
``igpt/hub.py``) as a :class:`WeightsSource`: its ModelConfig, head, tokenizer folder and the weights streamed tensor by
tensor; ``load_model`` builds a model from one. A missing shard, or a truncated or corrupt weights file, is an error
naming the file.

A checkpoint is written into ``.tmp-step_XXXXXXX`` and renamed only when every rank has finished writing, and
``latest`` is replaced (write + ``os.replace``) only after the rename, so a run killed mid-write leaves the previous
checkpoint intact. ``meta.json`` records every file with its size and its xxh3_64 checksum (``"checksums"``);
``find_latest`` (resume) checks both and falls back to the newest intact checkpoint, with a warning naming the bad
file, when ``latest`` names a partial or corrupt one; ``open_source`` (generate, export, init_from) verifies the files
of the weights it reads. Checkpoints from before checksums are checked by size alone.

DCP folders (FSDP's ``model/`` and ``optim/``) are read through ``igpt.safe_load``: their pickled ``.metadata`` may
name only DCP's metadata types, so a crafted checkpoint cannot run code.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from igpt.checksum import ALGORITHM, file_checksum
from igpt.errors import CheckpointError, MissingPathError

log = logging.getLogger("igpt")

STEP_RE = re.compile(r"^step_(\d{7})$")
FORMAT = 1


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def _file_sizes(ckpt_dir: str) -> dict[str, int]:
    sizes = {}
    for root, _, files in os.walk(ckpt_dir):
        for name in files:
            full = os.path.join(root, name)
            rel = os.path.relpath(full, ckpt_dir)
            if rel != "meta.json":
                sizes[rel] = os.path.getsize(full)
    return sizes


CHECKSUM = ALGORITHM  # meta.json "checksum": the algorithm of "checksums" (xxhash's XXH3, 64 bits)
#: files a reader of the weights alone (generate, export, init_from) need not verify: optimizer and training state
TRAIN_ONLY_FILES = ("optimizer.pt", "optimizer.safetensors", "train_state.pt")


def _train_only(rel: str) -> bool:
    parts = rel.replace(os.sep, "/").split("/")
    return parts[-1] in TRAIN_ONLY_FILES or "optim" in parts[:-1]  # FSDP's optimizer shards: optim/


def _checksums(ckpt_dir: str, files: dict[str, int]) -> dict[str, str]:
    return {rel: file_checksum(os.path.join(ckpt_dir, rel)) for rel in sorted(files)}


def is_complete(ckpt_dir: str, verify: bool = False, weights_only: bool = False) -> tuple[bool, str]:
    """A checkpoint is complete when meta.json parses and every file it lists exists with its recorded size; with
    ``verify`` also with its recorded checksum (``weights_only``: the weights' files only, not the optimizer's). A
    checkpoint written before checksums were recorded is checked by size alone. ``(ok, why)``: why names the file."""
    meta_path = os.path.join(ckpt_dir, "meta.json")
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        return False, f"{meta_path}: {e}"
    files = meta.get("files", {})
    for rel, size in files.items():
        path = os.path.join(ckpt_dir, rel)
        if not os.path.exists(path):
            return False, f"{path} is missing"
        if os.path.getsize(path) != size:
            return False, f"{path} has {os.path.getsize(path)} bytes, meta.json recorded {size}"
    sums = meta.get("checksums") if verify else None
    if sums and meta.get("checksum", CHECKSUM) == CHECKSUM:
        for rel, want in sums.items():
            if weights_only and _train_only(rel):
                continue
            path = os.path.join(ckpt_dir, rel)
            if not os.path.exists(path):
                return False, f"{path} is missing"
            got = file_checksum(path)
            if got != want:
                return False, (f"{path} is corrupt: its {CHECKSUM} checksum is {got}, meta.json recorded {want} "
                               f"(same size, different bytes)")
    return True, ""


def find_latest(run_dir: str, verify: bool = True, weights_only: bool = False) -> str | None:
    """The newest complete checkpoint of a run (or None); warns when ``latest`` names a broken one, naming the broken
    file. ``verify``: also compare every file's checksum with meta.json's (``weights_only``: the weights' only)."""
    ckpt_root = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(ckpt_root):
        return None
    latest_file = os.path.join(ckpt_root, "latest")
    named = None
    if os.path.exists(latest_file):
        with open(latest_file, encoding="utf-8") as f:
            named = os.path.join(ckpt_root, f.read().strip())
        ok, why = is_complete(named, verify, weights_only)
        if ok:
            return named
        log.warning("checkpoint %s named by %s is incomplete or corrupt (%s); looking for an older one", named,
                    latest_file, why)
    steps = sorted((int(m.group(1)), d) for d in os.listdir(ckpt_root) if (m := STEP_RE.match(d)))
    for _, d in reversed(steps):
        path = os.path.join(ckpt_root, d)
        if path == named:
            continue  # checked above
        ok, why = is_complete(path, verify, weights_only)
        if ok:
            log.warning("resuming from %s, the newest complete checkpoint (sizes and checksums agree)", path)
            return path
        log.warning("skipping incomplete or corrupt checkpoint %s (%s)", path, why)
    return None


def resolve(path: str) -> str:
    """A checkpoint dir, or a run dir meaning its newest complete checkpoint."""
    if os.path.exists(os.path.join(path, "meta.json")):
        return path
    found = find_latest(path, verify=False)  # open_source verifies the weights of the one it picks
    if found is None:
        raise MissingPathError(f"{path}: neither a checkpoint (no meta.json) nor a run dir with a complete checkpoint")
    return found


def read_meta(ckpt_dir: str) -> dict[str, Any]:
    with open(os.path.join(ckpt_dir, "meta.json"), encoding="utf-8") as f:
        return json.load(f)


def model_dir(ckpt_dir: str, role: str | None = None) -> str:
    """The folder holding the weights of ``role`` (None: the checkpoint's main model) in a checkpoint."""
    if role is None:
        return ckpt_dir
    meta = read_meta(ckpt_dir)
    roles = meta.get("models", {})
    if role not in roles:
        raise CheckpointError(
            f"{ckpt_dir}: no model with role {role!r} (it holds {sorted(roles) or ['the main model']})"
        )
    return os.path.normpath(os.path.join(ckpt_dir, roles[role]["dir"]))


def _safetensors_error(path: str, e: Exception) -> CheckpointError:
    return CheckpointError(
        f"{path}: not a readable safetensors file ({e}); it is truncated or corrupt (copy or download it again)"
    )


def read_model_state(ckpt_dir: str) -> dict[str, torch.Tensor]:
    """Full model weights from a folder of any strategy: ``model.safetensors`` or sharded DCP ``model/``.

    A truncated or corrupt weights file is a CheckpointError naming it."""
    st = os.path.join(ckpt_dir, "model.safetensors")
    if os.path.exists(st):
        from safetensors.torch import load_file

        try:
            return load_file(st)
        except Exception as e:  # safetensors raises its own SafetensorError (or OSError) on a bad file
            raise _safetensors_error(st, e) from None
    dcp_dir = os.path.join(ckpt_dir, "model")
    if os.path.isdir(dcp_dir):
        return read_dcp(dcp_dir)
    raise MissingPathError(f"{ckpt_dir}: no model.safetensors or model/ (DCP) weights")


def read_dcp(path: str) -> dict[str, torch.Tensor]:
    """Every tensor of a torch.distributed.checkpoint folder, read in one process without a process group (shapes
    from the checkpoint's metadata; keys flattened as DCP stores them, e.g. ``optim.state.<param>.exp_avg``).
    An unreadable (or unsafe: igpt.safe_load) folder is a CheckpointError naming it."""
    reader, md = _dcp_metadata(path)
    state = {k: torch.empty(v.size, dtype=v.properties.dtype) for k, v in md.items()}
    _dcp_load(state, reader, path)
    return state


def _dcp_metadata(dcp_dir: str):
    """``(reader, {name: TensorStorageMetadata})`` of a DCP checkpoint folder, its metadata read safely
    (``igpt.safe_load``); CheckpointError naming it if unreadable or unsafe."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from igpt.safe_load import SafeReader

    if not os.path.exists(os.path.join(dcp_dir, ".metadata")):
        raise CheckpointError(f"{dcp_dir}: no .metadata (not a torch.distributed.checkpoint folder, or incomplete)")
    reader = SafeReader(dcp_dir)
    md = reader.read_metadata()  # restricted unpickler: CheckpointError on anything but DCP metadata types
    return reader, {k: v for k, v in md.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)}


def _dcp_load(state: dict[str, torch.Tensor], reader, dcp_dir: str) -> None:
    """Read ``state``'s tensors in place from DCP shards, without a process group."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    from igpt.safe_load import SafeLoadPlanner, raise_inner

    try:
        dcp.load(state, storage_reader=reader, planner=SafeLoadPlanner(), no_dist=True)
    except CheckpointException as e:  # a BaseException holding each rank's failure
        raise_inner(e, dcp_dir)
    except CheckpointError:
        raise
    except Exception as e:  # DCP wraps a short read in CheckpointException
        raise CheckpointError(
            f"{dcp_dir}: cannot read the DCP weights; a shard is truncated or corrupt ({e!r})"
        ) from None


class _DcpRows:
    """Rows of the tensors of a DCP folder, read byte range by byte range: of each stored chunk (a writing rank's
    shard, saved with ``torch.save`` by ``FileSystemWriter``) only the bytes of the rows asked for are read, so a row
    range costs its own size in memory, not its chunk's. A chunk this cannot address (a transform such as
    compression, a non-contiguous layout) is read through DCP's own loader instead (:func:`_dcp_load_rows`)."""

    def __init__(self, dcp_dir: str, reader) -> None:
        self.dcp_dir = dcp_dir
        self.reader = reader
        self.storage = reader.read_metadata().storage_data
        self._where: dict[tuple, tuple[str, int, int] | None] = {}

    def _locate(self, name: str, offsets) -> tuple[str, int, int] | None:
        """``(file, byte offset of the chunk's first element, element size)`` or None when not addressable."""
        from torch.distributed.checkpoint.metadata import MetadataIndex

        key = (name, tuple(offsets))
        if key not in self._where:
            self._where[key] = None
            info = self.storage[MetadataIndex(name, offsets)]
            path = os.path.join(self.dcp_dir, info.relative_path)
            if not getattr(info, "transform_descriptors", None):
                with open(path, "rb") as f:
                    view = self.reader._slice_file(f, info)
                    records = [r for r in torch._C.PyTorchFileReader(view).get_all_records()
                               if re.fullmatch(r"(?:[^/]+/)?data/\d+", r)]
                    if len(records) == 1:
                        view.seek(0)
                        record = torch._C.PyTorchFileReader(view).get_record_offset(records[0])
                        view.seek(0)
                        with torch.serialization.skip_data():  # shape, strides and offset only, no bytes read
                            t = torch.load(view, map_location="cpu", weights_only=True)
                        if isinstance(t, torch.Tensor) and t.is_contiguous():
                            self._where[key] = (path, info.offset + record + t.storage_offset() * t.element_size(),
                                                t.element_size())
        return self._where[key]

    def read(self, name: str, md, rows: tuple[int, int]) -> torch.Tensor:
        r0, r1 = rows
        size = tuple(md.size)
        width = math.prod(size[1:])
        out = torch.empty((r1 - r0, *size[1:]), dtype=md.properties.dtype)
        for chunk in md.chunks:
            c0, c1 = chunk.offsets[0], chunk.offsets[0] + chunk.sizes[0]
            a, b = max(r0, c0), min(r1, c1)
            if a >= b:
                continue
            whole_rows = all(o == 0 for o in chunk.offsets[1:]) and tuple(chunk.sizes[1:]) == size[1:]
            where = self._locate(name, chunk.offsets) if whole_rows else None
            if where is None:
                out[a - r0 : b - r0].copy_(_dcp_load_rows(self.reader, self.dcp_dir, name, md, (a, b)))
                continue
            path, base, elsize = where
            dest = out[a - r0 : b - r0].view(torch.uint8).reshape(-1).numpy()
            with open(path, "rb") as f:
                f.seek(base + (a - c0) * width * elsize)
                if f.readinto(dest) != dest.nbytes:
                    raise CheckpointError(f"{self.dcp_dir}: {path} ends early; a shard is truncated or corrupt")
        return out


def _dcp_load_rows(reader, dcp_dir: str, name: str, md, rows: tuple[int, int]) -> torch.Tensor:
    """Rows ``[r0, r1)`` of tensor ``name`` of a DCP folder, read without a process group: only the stored chunks
    (a writing rank's shards) that overlap them are read, and only what overlaps is copied."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
    from torch.distributed.checkpoint.planner import LoadPlan
    from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

    from igpt.safe_load import SafeLoadPlanner, raise_inner

    r0, r1 = rows
    size = tuple(md.size)
    out = torch.empty((r1 - r0, *size[1:]), dtype=md.properties.dtype)

    class RowsPlanner(SafeLoadPlanner):
        def create_local_plan(self) -> LoadPlan:
            chunk = ChunkStorageMetadata(offsets=torch.Size([r0] + [0] * (len(size) - 1)), sizes=out.shape)
            return LoadPlan(create_read_items_for_chunk_list(name, md, [chunk]))

        def lookup_tensor(self, index) -> torch.Tensor:
            return out

    try:
        dcp.load({name: out}, storage_reader=reader, planner=RowsPlanner(), no_dist=True)
    except CheckpointException as e:  # a BaseException holding each rank's failure
        raise_inner(e, dcp_dir)
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(
            f"{dcp_dir}: cannot read the DCP weights; a shard is truncated or corrupt ({e!r})"
        ) from None
    return out


def load_weights(
    model: torch.nn.Module, state: dict[str, torch.Tensor], source: str, assign: bool = False, strict: bool = True
) -> list[str]:
    """Load full weights into a plain ``Transformer``; a tied checkpoint may store the shared matrix once.

    With ``strict=False`` the output head may differ (an LM checkpoint into a reward model: ``lm_head`` is dropped and
    ``score`` keeps its initialisation); every other weight must match. Returns the model's keys left as they were.
    """
    tied = model.tied
    if tied:
        state.setdefault("lm_head.weight", state.get("embed_tokens.weight"))
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    heads = {"lm_head.weight", "score.weight"}
    if not strict:
        state = {k: v for k, v in state.items() if k in expected}
        bad = [k for k in missing if k not in heads]
        unexpected = [k for k in unexpected if k not in heads]
        if bad or unexpected:
            raise CheckpointError(f"{source}: weights do not match the model: missing {bad}, unexpected {unexpected}")
    elif missing or unexpected:
        raise CheckpointError(f"{source}: weights do not match the model: missing {missing}, unexpected {unexpected}")
    model.load_state_dict(state, assign=assign, strict=strict)
    if tied:
        model.retie()
    return missing


def model_head(meta: dict[str, Any], role: str | None = None) -> str:
    """The head (``"lm"`` or ``"scalar"``) of ``role`` (None: the main model) recorded in a checkpoint's meta."""
    roles = meta.get("models") or {}
    if role is None:
        main = [r for r in roles.values() if r.get("dir") == "."]
        return main[0]["head"] if main else meta.get("head", "lm")
    return roles[role]["head"]


# ---------------------------------------------------------------------------------------------------- weight sources
VOCAB_ROWS = ("embed_tokens.weight", "lm_head.weight")
ROWS_BLOCK = 1 << 22  # elements read at a time into a shard (16 MiB in fp32)


@dataclass
class WeightsSource:
    """Where a model comes from: an igpt checkpoint (or run dir) or a Hugging Face model folder (``igpt/hub.py``).

    Either way it gives the :class:`~igpt.config.ModelConfig` (``model``), the stored head, the weights as a stream
    of ``(igpt name, tensor)`` read one tensor at a time from their files (:meth:`load_into`: no second full copy of
    the model in memory), and the tokenizer folder with its chat format (``tokenizer.json`` and, when present,
    ``tokenizer_config.json`` / ``chat_template.jinja`` / ``generation_config.json``). ``hf_config`` is the
    ``config.json`` of an imported model (kept in the meta.json of every checkpoint trained from it, so the export
    writes the original architecture class).
    """

    path: str  # the checkpoint dir or the model folder
    kind: str  # "igpt" | "hf"
    model: Any  # ModelConfig
    head: str  # the stored model's head: "lm" | "scalar"
    meta: dict[str, Any]
    folder: str  # the folder of the weights (a role's subfolder of an igpt checkpoint)
    reward_mean: float = 0.0  # a reward model's normalisation (subtracted from its scores when loaded frozen)
    hf_config: dict[str, Any] | None = None
    key: str = "checkpoint"  # the config key or argument that named it, for errors

    @property
    def where(self) -> str:
        return f"{self.key}={self.path}"

    @property
    def stage(self) -> str | None:
        return self.meta.get("stage")

    @property
    def tokenizer_dir(self) -> str:
        return self.path

    def chat_format(self):
        """The tokenizer stored with the model and its chat format (``igpt.data.chat.ChatFormat``)."""
        from igpt.data.chat import ChatFormat

        return ChatFormat.load(self.path, self.meta.get("tokenizer", "tokenizer.json"))

    def describe(self) -> str:
        if self.kind == "hf":
            return f"{self.path} ({(self.hf_config or {}).get('architectures', ['?'])[0]})"
        return f"{self.path} (step {self.meta.get('step')} of stage {self.meta.get('stage')})"

    # ---- weights ----------------------------------------------------------------------------------------------
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """igpt name -> stored shape of every weight (read from the file headers only)."""
        return {name: shape for name, shape, _ in self._entries()}

    def _entries(self):
        """``(igpt name, shape, reader)`` per stored tensor, where ``reader(out)`` fills ``out`` (or returns the
        tensor when ``out`` is None)."""
        if self.kind == "igpt" and os.path.isdir(os.path.join(self.folder, "model")) and not os.path.exists(
            os.path.join(self.folder, "model.safetensors")
        ):
            yield from self._dcp_entries()
            return
        if self.kind == "hf":
            from igpt.hub import weight_files

            files = weight_files(self.folder)
        else:
            files = {os.path.join(self.folder, "model.safetensors"): []}
            if not os.path.exists(next(iter(files))):
                raise MissingPathError(f"{self.folder}: no model.safetensors or model/ (DCP) weights")
        yield from self._safetensors_entries(files)

    def _safetensors_entries(self, files: dict[str, list[str]]):
        from safetensors import safe_open

        from igpt.hub import igpt_name

        for path, listed in files.items():
            try:
                handle = safe_open(path, framework="pt")
            except Exception as e:
                raise _safetensors_error(path, e) from None
            with handle as f:
                names = set(f.keys())
                absent = sorted(set(listed) - names)
                if absent:
                    raise CheckpointError(
                        f"{path}: the index lists {absent[:3]} in this shard, but it does not hold them"
                    )
                for name in sorted(names):
                    ours = name if self.kind == "igpt" else igpt_name(name)
                    if ours is None:
                        continue
                    shape = tuple(f.get_slice(name).get_shape())

                    def read(out=None, rows=None, f=f, name=name, path=path):
                        try:
                            t = f.get_tensor(name) if rows is None else f.get_slice(name)[rows[0] : rows[1]]
                        except Exception as e:
                            raise _safetensors_error(path, e) from None
                        return t if out is None else out.copy_(t)

                    yield ours, shape, read

    def _dcp_entries(self):
        dcp_dir = os.path.join(self.folder, "model")
        reader, md = _dcp_metadata(dcp_dir)
        rows_reader = _DcpRows(dcp_dir, reader)
        for name, v in md.items():

            def read(out=None, rows=None, name=name, v=v):
                if rows is not None:
                    return rows_reader.read(name, v, rows)
                if out is None or tuple(out.shape) != tuple(v.size) or out.dtype != v.properties.dtype:
                    t = torch.empty(v.size, dtype=v.properties.dtype)
                    _dcp_load({name: t}, reader, dcp_dir)
                    return t if out is None else out.copy_(t)
                _dcp_load({name: out}, reader, dcp_dir)
                return out

            yield name, tuple(v.size), read

    @torch.no_grad()
    def load_into(self, model: torch.nn.Module, strict: bool = True, shards: dict | None = None,
                  progress: str | None = None) -> list[str]:
        """Copy the weights into ``model`` (a plain ``Transformer``) tensor by tensor; return its keys left as they
        were (a new head). ``strict=False`` lets the output head differ (an LM body into a reward model or critic).

        ``shards`` (plain name -> ``igpt.parallel.init.Shard``, what a sharded strategy holds on this rank): only the
        rows of each stored tensor that cover the rank's part are read (safetensors slices, DCP row reads) and
        copied in, so no rank holds more than its shards and a few rows. Without it every parameter is filled whole.
        ``progress``: a tqdm description (one step per stored tensor), or None for no bar.

        A model with more vocabulary rows than stored (tokens added to the tokenizer) keeps the stored rows and
        starts the new ones at the mean of the stored ones (the resize rule of Hewitt 2021, as in transformers).
        """
        from igpt.shards import full_shards

        tied = getattr(model, "tied", False)
        if tied and shards is None:  # tie first (``to_empty`` gives the output matrix its own parameter)
            model.retie()
        targets = shards if shards is not None else full_shards(model)
        heads = {"lm_head.weight", "score.weight"}
        loaded: set[str] = set()
        unexpected: list[str] = []
        bar = None
        if progress is not None:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(self.shapes()), desc=progress, unit="tensor", dynamic_ncols=True)
        for name, shape, read in self._entries():
            if bar is not None:
                bar.update(1)
            if tied and name == "lm_head.weight":
                continue  # the stored copy of a tied matrix; the model's is embed_tokens.weight
            target = targets.get(name)
            if target is None:
                if strict or name not in heads:
                    unexpected.append(name)
                continue
            self._copy(name, shape, read, target)
            loaded.add(name)
        if bar is not None:
            bar.close()
        missing = sorted(k for k in targets if k not in loaded and not (tied and k == "lm_head.weight"))
        bad = missing if strict else [k for k in missing if k not in heads]
        if bad or unexpected:
            raise CheckpointError(
                f"{self.where}: weights do not match the model: missing {bad}, unexpected {sorted(unexpected)}"
            )
        if tied and shards is None:
            model.retie()
        return missing

    def _copy(self, name: str, shape: tuple[int, ...], read, target) -> None:
        """Copy stored tensor ``name`` (``read()``: the whole of it, ``read(rows=(a, b))``: rows a..b) into the rank's
        part of it, ``target`` (a ``Shard``): whole, by blocks of rows, or with new vocabulary rows at the mean."""
        want = tuple(target.shape)
        if target.hi <= target.lo:
            return  # this rank holds nothing of it (FSDP's last ranks for a short first dimension)
        if shape == want:
            if target.lo == 0 and target.hi == target.numel:
                read(target.local.view(want))
                return
            r0, r1 = target.rows()  # the rows that cover the rank's part, a block of at most ROWS_BLOCK elements
            step = max(1, ROWS_BLOCK // max(1, math.prod(want[1:])))
            for a in range(r0, r1, step):
                target.write_rows(a, read(rows=(a, min(r1, a + step))))
        elif name in VOCAB_ROWS and len(shape) == 2 and shape[1] == want[1] and shape[0] < want[0]:
            stored = read()  # the mean needs every stored row: one full tensor, once
            mean = stored.float().mean(0).to(stored.dtype)
            r0, r1 = target.rows()
            rows = torch.cat([stored[r0 : min(r1, shape[0])], mean.expand(max(0, r1 - max(r0, shape[0])), -1)])
            target.write_rows(r0, rows)
            log.info("%s: %s has %d rows for %d tokens: the %d new rows start at the mean row", self.where,
                     name, shape[0], want[0], want[0] - shape[0])
        else:
            raise CheckpointError(
                f"{self.where}: weight {name} has shape {list(shape)} in {self.folder}, the model expects {list(want)}"
            )


def open_source(path: str, key: str = "checkpoint", role: str | None = None) -> WeightsSource:
    """The :class:`WeightsSource` at ``path``: an igpt checkpoint dir, a run dir (its newest complete checkpoint) or a
    Hugging Face model folder. ``role`` picks a model other than an igpt checkpoint's main one (e.g. ``"critic"``).
    Errors name ``key``, the path and what was expected."""
    from igpt import hub
    from igpt.config import ModelConfig

    if not os.path.isdir(path):
        raise MissingPathError(f"{key}={path}: no such directory")
    if hub.is_model_folder(path):
        if role is not None:
            raise CheckpointError(f"{key}={path}: a Hugging Face model folder holds one model, not a {role!r} role")
        config = hub.read_config(path)
        cfg, head = hub.model_config(config, os.path.join(path, hub.CONFIG))
        meta = {"stage": None, "model": asdict(cfg), "hf_config": config, "tokenizer": "tokenizer.json",
                "precision": _hf_precision(config)}
        return WeightsSource(path, "hf", cfg, head, meta, path, float(config.get("igpt_reward_mean", 0.0)), config,
                             key)
    try:
        ckpt = resolve(path)
    except FileNotFoundError as e:
        raise MissingPathError(
            f"{key}={path}: {e}; a Hugging Face model folder needs config.json and model.safetensors (or "
            f"model.safetensors.index.json)"
        ) from None
    ok, why = is_complete(ckpt, verify=True, weights_only=True)
    if not ok:
        raise CheckpointError(f"{key}={path}: checkpoint {ckpt} is incomplete or corrupt: {why}")
    meta = read_meta(ckpt)
    if "model" not in meta:
        raise CheckpointError(
            f"{os.path.join(ckpt, 'meta.json')}: no 'model' entry (the ModelConfig the weights belong to)"
        )
    try:
        cfg = ModelConfig(**meta["model"])
    except TypeError as e:
        raise CheckpointError(
            f"{os.path.join(ckpt, 'meta.json')}: 'model' does not fit igpt's ModelConfig ({e})"
        ) from None
    folder = model_dir(ckpt, role)
    mean = float(meta.get("reward_norm", {}).get("mean", 0.0)) if role is None else 0.0
    return WeightsSource(ckpt, "igpt", cfg, model_head(meta, role), meta, folder, mean, meta.get("hf_config"), key)


def _hf_precision(config: dict[str, Any]) -> str:
    return "bf16" if (config.get("dtype") or config.get("torch_dtype")) == "bfloat16" else "fp32"


def load_model(path: str, device: str | torch.device = "cpu", role: str | None = None):
    """``(model, chat format, meta)`` from a checkpoint dir, a run dir (its newest complete checkpoint) or a Hugging
    Face model folder, whatever strategy and world size wrote it; ``role`` picks a model other than the main one
    (e.g. ``"critic"``). The model is a plain ``Transformer`` in eval mode on ``device``, built on the meta device and
    filled tensor by tensor; a reward model gets the normalisation stored with it. The chat format
    (``igpt.data.chat.ChatFormat``) also answers the ``tokenizers.Tokenizer`` API."""
    from igpt.model import Transformer

    source = open_source(path, "checkpoint", role)
    with torch.device("meta"):
        model = Transformer(source.model, head=source.head)
    model.to_empty(device="cpu")
    source.load_into(model)
    if source.head == "scalar" and role is None:
        model.value_offset = -source.reward_mean
    model.to(device).eval()
    return model, source.chat_format(), source.meta


_ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int64: "I64"}


class SafetensorsWriter:
    """A safetensors file written one tensor at a time: the header (names, dtypes, shapes, offsets) comes first from
    ``entries`` known in advance, then each tensor's bytes as :meth:`write` gets it, in the order of ``entries``. The
    writer never holds more than the tensor it is given (``safetensors.torch.save_file`` needs all of them at once).
    The result is an ordinary safetensors file (``safe_open`` reads it tensor by tensor)."""

    def __init__(self, path: str, entries: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None) -> None:
        header: dict[str, Any] = {"__metadata__": {"format": "pt", **(metadata or {})}}
        offset = 0
        self._order: list[tuple[str, torch.dtype, tuple[int, ...]]] = []
        for name, dtype, shape in entries:
            nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            self._order.append((name, dtype, tuple(shape)))
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
        self._f = open(path, "wb")  # noqa: SIM115 (closed by close())
        self._f.write(len(raw).to_bytes(8, "little") + raw)
        self._next = 0
        self.path = path

    def write(self, name: str, tensor: torch.Tensor) -> None:
        want, dtype, shape = self._order[self._next]
        if name != want or tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(f"{self.path}: got {name} {tensor.dtype} {list(tensor.shape)}, expected {want} {dtype} "
                             f"{list(shape)} next")
        data = tensor.detach().to("cpu").contiguous().view(torch.uint8).reshape(-1).numpy()
        self._f.write(data.data)  # the tensor's own bytes, no copy
        self._next += 1

    def close(self) -> None:
        if self._next != len(self._order):
            raise ValueError(f"{self.path}: {len(self._order) - self._next} tensors were not written")
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()


def savable_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the alias of a tied output matrix (safetensors refuses aliased tensors; ``load_weights`` restores it)."""
    if getattr(model, "tied", False):
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    return {k: v.contiguous() for k, v in state.items()}


def _copy_tokenizer(tokenizer_path: str, ckpt_dir: str) -> None:
    """The tokenizer and the files of its chat format (igpt.data.chat.FORMAT_FILES) into ``ckpt_dir``."""
    from igpt.data.chat import FORMAT_FILES

    shutil.copyfile(tokenizer_path, os.path.join(ckpt_dir, "tokenizer.json"))
    for extra in FORMAT_FILES[1:]:
        src = os.path.join(os.path.dirname(tokenizer_path), extra)
        if os.path.exists(src):
            shutil.copyfile(src, os.path.join(ckpt_dir, extra))


def _publish(tmp: str, final: str, meta: dict[str, Any]) -> None:
    """Seal the written ``tmp`` folder (its files' sizes and checksums into meta.json, written last) and make it
    ``final`` with one rename, then point ``latest`` at it: a checkpoint exists whole or not at all."""
    root = os.path.dirname(final)
    files = _file_sizes(tmp)
    meta = {**meta, "files": files, "checksum": CHECKSUM, "checksums": _checksums(tmp, files), "time": time.time()}
    write_text_atomic(os.path.join(tmp, "meta.json"), json.dumps(meta, indent=2, default=str))
    _fsync_dir(tmp)
    if os.path.exists(final):  # a re-save of the same step (e.g. resumed then stopped at once)
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    write_text_atomic(os.path.join(root, "latest"), os.path.basename(final) + "\n")


def save(
    run_dir: str,
    step: int,
    strategy,
    models: dict[str, Any],
    train_state: dict[str, Any],
    meta: dict[str, Any],
    tokenizer_path: str | None,
    keep_last: int = 0,
) -> str:
    """Write checkpoint ``step`` atomically (all ranks call this) and return its directory.

    ``models`` maps roles to the trainable ``igpt.parallel.Wrapped`` handles, the main model first: it is written at
    the top of the checkpoint, every other one into ``<role>/``.
    """
    root = os.path.join(run_dir, "checkpoints")
    name = step_dir_name(step)
    final = os.path.join(root, name)
    tmp = os.path.join(root, f".tmp-{name}")
    dirs = {role: "." if i == 0 else role for i, role in enumerate(models)}
    try:
        if strategy.rank == 0:
            os.makedirs(root, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
            for d in dirs.values():
                os.makedirs(os.path.join(tmp, d), exist_ok=True)
        strategy.barrier()
        for role, handle in models.items():
            handle.save(os.path.join(tmp, dirs[role]))
        if strategy.rank == 0:
            torch.save(train_state, os.path.join(tmp, "train_state.pt"))
            if tokenizer_path:
                _copy_tokenizer(tokenizer_path, tmp)
        strategy.barrier()  # every rank's shards are on disk
        if strategy.rank == 0:
            roles = {role: {"dir": d, "head": models[role].module.head} for role, d in dirs.items()}
            _publish(tmp, final, {**meta, "format": FORMAT, "step": step, "models": roles})
            _prune(root, keep_last)
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)  # the previous checkpoints and ``latest`` are untouched
        if _no_space(e, root):
            raise CheckpointError(
                f"no space left on {root} ({_free(root)} free) while writing checkpoint {name}: the partial "
                f"checkpoint {tmp} was removed and the previous checkpoints are intact; free some space (or lower "
                f"trainer.keep_last) and resume with resume=auto"
            ) from None
        raise
    strategy.barrier()
    return final


def _free(path: str) -> str:
    try:
        return f"{shutil.disk_usage(path).free / 2**20:.1f} MiB"
    except OSError:
        return "? MiB"


def _no_space(e: BaseException, root: str) -> bool:
    """Whether a failed write ran out of disk space: ENOSPC/EDQUOT, or torch's zip writer's own report of a short
    write (``unexpected pos ... vs ...``, ``file write failed``) on a nearly full filesystem."""
    import errno

    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(e)
    if "No space left" in text or "Disk quota exceeded" in text:
        return True
    if isinstance(e, RuntimeError) and ("unexpected pos" in text or "file write failed" in text):
        try:
            return shutil.disk_usage(root).free < 64 << 20
        except OSError:
            return True
    return False


def _prune(root: str, keep_last: int) -> None:
    if keep_last <= 0:
        return
    steps = sorted((int(m.group(1)), d) for d in os.listdir(root) if (m := STEP_RE.match(d)))
    for _, d in steps[:-keep_last]:
        shutil.rmtree(os.path.join(root, d), ignore_errors=True)
