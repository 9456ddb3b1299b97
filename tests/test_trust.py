"""Trust what you load and what you resume: safe DCP loading, checksums, run locks, refused mismatches, one-line
errors (issue P15). Unit-sized: small files, a tiny model, at most a few training steps."""

from __future__ import annotations

import json
import os
import pickle
import shutil

import pytest
import torch

from igpt import checkpoint
from igpt.config import ModelConfig
from igpt.errors import CheckpointError

TINY_CFG = dict(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=64, vocab_size=64, max_seq_len=16)


class _Payload:
    """Unpickling this runs ``touch <marker>`` (what a crafted checkpoint does)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _dcp_checkpoint(folder: str, malicious_marker: str | None = None, tokenizer: str | None = None) -> str:
    """An igpt checkpoint dir written as FSDP writes one (model/ through torch.distributed.checkpoint); with
    ``malicious_marker``, ``model/.metadata`` is replaced by a pickle whose unpickling creates that file."""
    import torch.distributed.checkpoint as dcp

    from igpt.model import Transformer

    torch.manual_seed(0)
    model = Transformer(ModelConfig(**TINY_CFG))
    state = checkpoint.savable_state(model, model.state_dict())
    dcp.save(state, checkpoint_id=os.path.join(folder, "model"), no_dist=True)
    if malicious_marker is not None:
        with open(os.path.join(folder, "model", ".metadata"), "wb") as f:
            pickle.dump(_Payload(malicious_marker), f)
    if tokenizer:
        shutil.copyfile(tokenizer, os.path.join(folder, "tokenizer.json"))
    meta = {"format": 1, "step": 1, "stage": "pretrain", "model": {"name": "tiny", **TINY_CFG},
            "strategy": "fsdp", "models": {"policy": {"dir": ".", "head": "lm"}},
            "files": checkpoint._file_sizes(folder)}
    with open(os.path.join(folder, "meta.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f)
    return folder


def test_genuine_dcp_checkpoint_loads_through_the_safe_reader(tmp_path, tokenizer_file):
    ckpt = _dcp_checkpoint(str(tmp_path / "ok"), tokenizer=tokenizer_file)
    model, _, meta = checkpoint.load_model(ckpt)
    assert meta["stage"] == "pretrain" and model.embed_tokens.weight.shape == (64, 32)


@pytest.mark.parametrize("path", ["load_model", "read_model_state", "init_from", "resume"])
def test_malicious_dcp_metadata_is_refused_and_runs_nothing(tmp_path, tokenizer_file, path):
    """Failure 1: a crafted ``model/.metadata`` ran a shell command under generate/export/init_from (fails on the
    old code: the marker file is created)."""
    marker = str(tmp_path / "pwned")
    ckpt = _dcp_checkpoint(str(tmp_path / "evil"), malicious_marker=marker, tokenizer=tokenizer_file)
    with pytest.raises(CheckpointError, match=r"refused to load.*posix\.system|refused to load.*os\.system"):
        if path == "load_model":  # igpt.generate, igpt.export, igpt.chat, lm_eval
            checkpoint.load_model(ckpt)
        elif path == "read_model_state":
            checkpoint.read_model_state(ckpt)
        elif path == "init_from":  # the trainer's init_from / reference_from / reward.model
            from igpt.model import Transformer

            source = checkpoint.open_source(ckpt, "init_from")
            source.load_into(Transformer(ModelConfig(**TINY_CFG)))
        else:  # strategy=fsdp's resume reads model/ and optim/ with these
            from igpt.safe_load import dcp_load

            dcp_load({"x": torch.empty(1)}, os.path.join(ckpt, "model"), no_dist=True)
    assert not os.path.exists(marker), "the checkpoint's pickle ran code"


def test_non_tensor_dcp_entries_are_read_weights_only(tmp_path):
    """DCP's default planner reads non-tensor entries (an optimizer's param_groups) with weights_only=False."""
    import torch.distributed.checkpoint as dcp

    from igpt.safe_load import dcp_load

    marker = str(tmp_path / "pwned")
    folder = str(tmp_path / "optim")
    dcp.save({"groups": _Payload(marker)}, checkpoint_id=folder, no_dist=True)
    state = {"groups": None}
    with pytest.raises(CheckpointError, match="'groups': it is not plain data"):
        dcp_load(state, folder, no_dist=True)
    assert not os.path.exists(marker)
    dcp.save({"groups": (0.1, (0.9, 0.95), "w")}, checkpoint_id=folder + "2", no_dist=True)
    state = {"groups": None}
    dcp_load(state, folder + "2", no_dist=True)
    assert state["groups"] == (0.1, (0.9, 0.95), "w")  # plain data still loads
