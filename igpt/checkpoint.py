"""Atomic checkpoints, retention and resume.

Layout (docs/internals.md)::

    <run_dir>/checkpoints/step_0000100/{meta.json, tokenizer.json, model.safetensors | model/, optimizer.pt,
                                        train_state.pt, <role>/...}
    <run_dir>/checkpoints/latest        names the newest complete checkpoint

The stage's first trainable model (the policy, or the reward model) is written at the top of the checkpoint, so every
tool that reads "the model" of a checkpoint finds it there; any further trainable model (PPO's critic) is written the
same way into a folder named after its role. ``meta.json`` lists them under ``"models"``.

A checkpoint is written into ``.tmp-step_XXXXXXX`` and renamed only when every rank has finished writing, and
``latest`` is replaced (write + ``os.replace``) only after the rename, so a run killed mid-write leaves the previous
checkpoint intact. ``meta.json`` records every file with its size; ``find_latest`` checks them and falls back to the
newest complete checkpoint, with a warning, when ``latest`` names a partial or corrupt one.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from typing import Any

import torch

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
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _file_sizes(ckpt_dir: str) -> dict[str, int]:
    sizes = {}
    for root, _, files in os.walk(ckpt_dir):
        for name in files:
            full = os.path.join(root, name)
            rel = os.path.relpath(full, ckpt_dir)
            if rel != "meta.json":
                sizes[rel] = os.path.getsize(full)
    return sizes


def is_complete(ckpt_dir: str) -> tuple[bool, str]:
    """A checkpoint is complete when meta.json parses and every file it lists exists with its recorded size."""
    meta_path = os.path.join(ckpt_dir, "meta.json")
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        return False, f"{meta_path}: {e}"
    for rel, size in meta.get("files", {}).items():
        path = os.path.join(ckpt_dir, rel)
        if not os.path.exists(path):
            return False, f"{path} is missing"
        if os.path.getsize(path) != size:
            return False, f"{path} has {os.path.getsize(path)} bytes, meta.json recorded {size}"
    return True, ""


def find_latest(run_dir: str) -> str | None:
    """The newest complete checkpoint of a run (or None); warns when ``latest`` names a broken one."""
    ckpt_root = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(ckpt_root):
        return None
    latest_file = os.path.join(ckpt_root, "latest")
    if os.path.exists(latest_file):
        with open(latest_file, encoding="utf-8") as f:
            named = os.path.join(ckpt_root, f.read().strip())
        ok, why = is_complete(named)
        if ok:
            return named
        log.warning("checkpoint %s named by %s is incomplete (%s); looking for an older one", named, latest_file, why)
    steps = sorted((int(m.group(1)), d) for d in os.listdir(ckpt_root) if (m := STEP_RE.match(d)))
    for _, d in reversed(steps):
        path = os.path.join(ckpt_root, d)
        ok, why = is_complete(path)
        if ok:
            log.warning("resuming from %s, the newest complete checkpoint", path)
            return path
        log.warning("skipping incomplete checkpoint %s (%s)", path, why)
    return None


def resolve(path: str) -> str:
    """A checkpoint dir, or a run dir meaning its newest complete checkpoint."""
    if os.path.exists(os.path.join(path, "meta.json")):
        return path
    found = find_latest(path)
    if found is None:
        raise FileNotFoundError(f"{path}: neither a checkpoint (no meta.json) nor a run dir with a complete checkpoint")
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
        raise ValueError(f"{ckpt_dir}: no model with role {role!r} (it holds {sorted(roles) or ['the main model']})")
    return os.path.normpath(os.path.join(ckpt_dir, roles[role]["dir"]))


def read_model_state(ckpt_dir: str) -> dict[str, torch.Tensor]:
    """Full model weights from a folder of any strategy: ``model.safetensors`` or sharded DCP ``model/``."""
    st = os.path.join(ckpt_dir, "model.safetensors")
    if os.path.exists(st):
        from safetensors.torch import load_file

        return load_file(st)
    dcp_dir = os.path.join(ckpt_dir, "model")
    if os.path.isdir(dcp_dir):
        return read_dcp(dcp_dir)
    raise FileNotFoundError(f"{ckpt_dir}: no model.safetensors or model/ (DCP) weights")


def read_dcp(path: str) -> dict[str, torch.Tensor]:
    """Every tensor of a torch.distributed.checkpoint folder, read in one process without a process group (shapes
    from the checkpoint's metadata; keys flattened as DCP stores them, e.g. ``optim.state.<param>.exp_avg``)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(path)
    md = reader.read_metadata()
    state = {
        k: torch.empty(v.size, dtype=v.properties.dtype)
        for k, v in md.state_dict_metadata.items()
        if isinstance(v, TensorStorageMetadata)
    }
    dcp.load(state, storage_reader=reader, no_dist=True)
    return state


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
            raise ValueError(f"{source}: weights do not match the model: missing {bad}, unexpected {unexpected}")
    elif missing or unexpected:
        raise ValueError(f"{source}: weights do not match the model: missing {missing}, unexpected {unexpected}")
    model.load_state_dict(state, assign=assign, strict=strict)
    if tied:
        model.lm_head.weight = model.embed_tokens.weight
    return missing


def model_head(meta: dict[str, Any], role: str | None = None) -> str:
    """The head (``"lm"`` or ``"scalar"``) of ``role`` (None: the main model) recorded in a checkpoint's meta."""
    roles = meta.get("models") or {}
    if role is None:
        main = [r for r in roles.values() if r.get("dir") == "."]
        return main[0]["head"] if main else meta.get("head", "lm")
    return roles[role]["head"]


def load_model(path: str, device: str | torch.device = "cpu", role: str | None = None):
    """``(model, tokenizer, meta)`` from a checkpoint dir or a run dir (its newest complete checkpoint), whatever
    strategy and world size wrote it; ``role`` picks a model other than the main one (e.g. ``"critic"``). The model is
    a plain ``Transformer`` in eval mode on ``device``; a reward model gets the normalisation stored with it."""
    from igpt.config import ModelConfig
    from igpt.data.tokenizer import load_tokenizer
    from igpt.model import Transformer

    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint={path}: no such directory")
    ckpt = resolve(path)
    meta = read_meta(ckpt)
    if "model" not in meta:
        raise ValueError(f"{os.path.join(ckpt, 'meta.json')}: no 'model' entry (the ModelConfig the weights belong to)")
    cfg = ModelConfig(**meta["model"])
    head = model_head(meta, role)
    with torch.device("meta"):
        model = Transformer(cfg, head=head)
    folder = model_dir(ckpt, role)
    load_weights(model, read_model_state(folder), folder, assign=True)
    if head == "scalar" and role is None:
        model.value_offset = -float(meta.get("reward_norm", {}).get("mean", 0.0))
    model.to(device).eval()
    return model, load_tokenizer(os.path.join(ckpt, meta.get("tokenizer", "tokenizer.json"))), meta


def savable_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the alias of a tied output matrix (safetensors refuses aliased tensors; ``load_weights`` restores it)."""
    if getattr(model, "tied", False):
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    return {k: v.contiguous() for k, v in state.items()}


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
            shutil.copyfile(tokenizer_path, os.path.join(tmp, "tokenizer.json"))
        pause = float(os.environ.get("IGPT_FAULT_CKPT_PAUSE_S", "0") or 0)
        if pause > 0:  # fault injection for tests: a window in which a kill leaves a partial checkpoint
            log.warning("IGPT_FAULT_CKPT_PAUSE_S: pausing %.1fs inside the checkpoint write", pause)
            time.sleep(pause)
    strategy.barrier()  # every rank's shards are on disk
    if strategy.rank == 0:
        roles = {role: {"dir": d, "head": models[role].module.head} for role, d in dirs.items()}
        meta = {**meta, "format": FORMAT, "step": step, "models": roles, "files": _file_sizes(tmp), "time": time.time()}
        write_text_atomic(os.path.join(tmp, "meta.json"), json.dumps(meta, indent=2, default=str))
        _fsync_dir(tmp)
        if os.path.exists(final):  # a re-save of the same step (e.g. resumed then stopped at once)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        write_text_atomic(os.path.join(root, "latest"), name + "\n")
        _prune(root, keep_last)
    strategy.barrier()
    return final


def _prune(root: str, keep_last: int) -> None:
    if keep_last <= 0:
        return
    steps = sorted((int(m.group(1)), d) for d in os.listdir(root) if (m := STEP_RE.match(d)))
    for _, d in steps[:-keep_last]:
        shutil.rmtree(os.path.join(root, d), ignore_errors=True)
