"""Reading torch.distributed.checkpoint (DCP) folders without running code from them.

A DCP folder's ``.metadata`` is a pickle, and unpickling can call any importable function (a ``__reduce__`` payload
runs a shell command). DCP's own ``FileSystemReader.read_metadata`` uses plain ``pickle.load``, and its default load
planner reads non-tensor entries with ``torch.load(weights_only=False)``. Every igpt path that reads a DCP folder
(generate, export, chat, ``init_from``, resume, ``igpt.checkpoint.load_model``) goes through :class:`SafeReader` and
:class:`SafeLoadPlanner` instead:

- ``.metadata`` is read by :class:`MetadataUnpickler`, which admits only the classes DCP's metadata is made of
  (``torch.distributed.checkpoint.metadata``'s dataclasses, the filesystem's ``_StorageInfo``, ``torch.Size``, torch
  dtypes and layouts, ``pathlib`` paths); any other global is refused with a :class:`igpt.errors.CheckpointError`
  naming the file and the global, before anything is called;
- non-tensor entries (an optimizer's ``param_groups``) are read with ``torch.load(weights_only=True)``; tensors are
  read that way by DCP already.

The other pickled files of a checkpoint (``optimizer.pt``, ``train_state.pt``) are read by :func:`torch_load`:
``torch.load(weights_only=True)``, whose refusal of a global (a crafted file) or failure to parse becomes a
:class:`igpt.errors.CheckpointError` naming the file.
"""

from __future__ import annotations

import io
import os
import pickle
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

from igpt.errors import CheckpointError

_DCP_METADATA_TYPES = (
    "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
    "StorageMeta", "MetadataIndex", "_MEM_FORMAT_ENCODING",
)
#: (module, name) of every global a DCP ``.metadata`` pickle may name (torch 2.x)
ALLOWED_GLOBALS = frozenset(
    [("torch.distributed.checkpoint.metadata", n) for n in _DCP_METADATA_TYPES]
    + [("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
       ("torch.serialization", "_get_layout"), ("collections", "OrderedDict")]
    + [("pathlib", n) for n in ("Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath")]
)


class MetadataUnpickler(pickle.Unpickler):
    """An unpickler that resolves only :data:`ALLOWED_GLOBALS` and torch's dtype/layout/memory-format constants."""

    def __init__(self, file, path: str) -> None:
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in ALLOWED_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout,
                                                                         torch.memory_format)):
            return getattr(torch, name)
        raise CheckpointError(
            f"{self.path}: refused to load: the torch.distributed.checkpoint metadata pickle names {module}.{name}, "
            f"which is not a DCP metadata type (a crafted checkpoint can run code this way); nothing from it was run. "
            f"Use checkpoints only from sources you trust"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise CheckpointError(f"{self.path}: refused to load: persistent ids are not part of DCP metadata")


def read_dcp_metadata(path: str):
    """The ``Metadata`` of the DCP ``.metadata`` file at ``path``, read by :class:`MetadataUnpickler`."""
    from torch.distributed.checkpoint.metadata import Metadata

    with open(path, "rb") as f:
        try:
            md = MetadataUnpickler(f, path).load()
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{path}: unreadable torch.distributed.checkpoint metadata ({e!r})") from None
    if not isinstance(md, Metadata):
        raise CheckpointError(f"{path}: holds a {type(md).__name__}, not torch.distributed.checkpoint Metadata")
    return md


class SafeReader(FileSystemReader):
    """``FileSystemReader`` whose ``read_metadata`` uses :func:`read_dcp_metadata`."""

    def read_metadata(self, *args: Any, **kwargs: Any):
        from torch.distributed.checkpoint.metadata import StorageMeta

        md = read_dcp_metadata(os.fspath(self._get_metadata_path(kwargs.get("rank"))))
        if getattr(md, "storage_meta", None) is None:
            md.storage_meta = StorageMeta()
        md.storage_meta.load_id = self.load_id
        return md


class SafeLoadPlanner(DefaultLoadPlanner):
    """``DefaultLoadPlanner`` reading non-tensor entries with ``torch.load(weights_only=True)``."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            raise CheckpointError(f"refused to load a non-tensor checkpoint entry {read_item.dest_index.fqn!r}: "
                                  f"it is not plain data ({e})") from None
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._traverse import set_element

            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def torch_load(path: str, map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)``: tensors and plain containers only. A file that names any other global
    (a crafted pickle: nothing of it runs) or is not a torch file is a :class:`CheckpointError` naming ``path``."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        why = str(e).split("WeightsUnpickler error:")[-1].strip().splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(
            f"{path}: refused to load: it is not plain tensor data ({why}); nothing from it was run (a crafted "
            f"checkpoint can run code through a pickle). Use checkpoints only from sources you trust"
        ) from None
    except (RuntimeError, EOFError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read it as a torch file ({type(e).__name__}: {e})") from None


def dcp_load(state: dict[str, Any], folder: str, **kwargs: Any) -> None:
    """``torch.distributed.checkpoint.load(state, folder)`` through :class:`SafeReader` and :class:`SafeLoadPlanner`.
    The metadata is checked first, so an unsafe or unreadable one is a plain :class:`CheckpointError` naming the file
    (DCP would wrap it in its own per-rank exception)."""
    import torch.distributed.checkpoint as dcp

    read_dcp_metadata(os.path.join(folder, ".metadata"))
    try:
        dcp.load(state, storage_reader=SafeReader(folder), planner=SafeLoadPlanner(), **kwargs)
    except CheckpointException as e:
        raise_inner(e, folder)


def raise_inner(e: CheckpointException, folder: str) -> None:
    """Re-raise the igpt error inside DCP's ``CheckpointException`` (a BaseException holding each rank's failure), or
    a :class:`CheckpointError` naming ``folder`` and the first rank's failure."""
    inner = [exc for exc, _ in e.failures.values()]
    for exc in inner:
        if isinstance(exc, CheckpointError):
            raise exc from None
    first = inner[0] if inner else e
    raise CheckpointError(f"{folder}: cannot read the DCP checkpoint; a shard is truncated or corrupt "
                          f"({type(first).__name__}: {first})") from None
