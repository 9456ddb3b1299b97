"""Meta-device initialisation (igpt/parallel/init.py): the same initial weights under every strategy.

Every model is built on the meta device and only the rank's shards are allocated and filled. These tests check that the
values are those of the model built eagerly right after seeding (``Transformer(cfg)``), bit for bit: drawn in chunks,
in one process, and gathered back from 2 gloo ranks under fsdp and zero3, for fresh models (tied and untied) and for
every model of a PPO run whose weights come from sources (a policy and reference from a sharded FSDP checkpoint, read
by row ranges; a critic and reward model from a reward model's safetensors).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from igpt.config import ModelConfig
from igpt.model import Transformer
from igpt.parallel.init import ModelInit, chunks, to_empty
from igpt.shards import full_shards
from tests.conftest import REPO, TINY
from tests.init_worker import build_all
from tests.test_alignment_strategies import overrides as align_overrides
from tests.test_alignment_strategies import ppo_overrides
from tests.trainutil import train

SEED = 1337  # trainer.seed's default


def tiny(**kw) -> ModelConfig:
    return ModelConfig(vocab_size=384, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=64, **kw)


@pytest.mark.parametrize("numel", [1, 15, 16, 17, 100, 4099, 65541])
@pytest.mark.parametrize("kind", ["normal", "uniform"])
def test_chunked_draws_equal_one_call(numel, kind):
    """torch's CPU normal_/uniform_ drawn in chunks (multiples of 16, the last one at least 16 long) give the values of
    one call on the whole tensor and leave the generator in the same state."""
    draw = (lambda t, g: t.normal_(0.0, 0.02, generator=g)) if kind == "normal" else (
        lambda t, g: t.uniform_(-0.1, 0.1, generator=g))
    whole_gen, chunk_gen = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    whole = draw(torch.empty(numel), whole_gen)
    for size in (16, 48, 4096):
        chunk_gen.manual_seed(3)
        parts = [draw(torch.empty(b - a), chunk_gen) for a, b in chunks(numel, size)]
        assert torch.equal(torch.cat(parts), whole), size
        assert torch.equal(chunk_gen.get_state(), whole_gen.get_state()), size


@pytest.mark.parametrize("kw,head", [({}, "lm"), ({"tie_embeddings": True}, "lm"),
                                     ({"attention_bias": True}, "scalar")])
def test_meta_init_equals_eager(kw, head):
    """A model built on meta and filled by ModelInit equals the eagerly built one; the generator ends where eager
    construction and init_weights leave torch's."""
    torch.manual_seed(SEED)
    eager = Transformer(tiny(**kw), head=head)
    after = torch.get_rng_state()
    torch.manual_seed(SEED)
    with torch.device("meta"):
        model = Transformer(tiny(**kw), head=head)
    init = ModelInit.fresh(model)
    to_empty(model, torch.device("cpu"))
    init.apply(full_shards(model))
    assert torch.equal(init.generator.get_state(), after)
    assert model.tied == eager.tied and (not model.tied or model.lm_head.weight is model.embed_tokens.weight)
    for key, value in eager.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


@pytest.fixture(scope="module")
def sources(prepared_text_dir, prepared_pref_dir, tmp_path_factory) -> dict[str, str]:
    """A policy checkpoint written by FSDP (sharded DCP ``model/``) and a reward model (``model.safetensors``)."""
    root = tmp_path_factory.mktemp("init_sources")
    policy = str(root / "policy")
    train(["+stage=pretrain", f"data.dir={prepared_text_dir}", f"run_dir={policy}", *TINY, "trainer.max_steps=1",
           "trainer.global_batch_size=8", "trainer.micro_batch_size=4", "trainer.eval_every=0",
           "trainer.progress=false", "trainer.sample_every_eval=false", "logger.wandb.mode=disabled",
           "strategy=fsdp"])
    rm = str(root / "rm")
    train(align_overrides("rm", prepared_pref_dir, rm, "trainer.max_steps=1", "rm.norm_batches=1"))
    return {"policy": policy, "rm": rm}


def specs(text_dir: str, prompt_dir: str, sources: dict[str, str], run_root: str, strategy: str) -> list[list[str]]:
    """Fresh models (untied, tied) and a PPO run with all four models from sources."""
    pretrain = ["+stage=pretrain", f"data.dir={text_dir}", *TINY, "trainer.global_batch_size=8",
                "trainer.micro_batch_size=2", "trainer.progress=false", "logger.wandb.mode=disabled",
                f"strategy={strategy}"]
    return [
        [*pretrain, f"run_dir={run_root}/fresh"],
        [*pretrain, f"run_dir={run_root}/tied", "model.tie_embeddings=true"],
        ppo_overrides(prompt_dir, text_dir, sources["rm"], f"{run_root}/ppo", f"init_from={sources['policy']}",
                      f"strategy={strategy}"),
    ]


@pytest.fixture(scope="module")
def single(prepared_text_dir, prepared_prompt_dir, sources, tmp_path_factory):
    runs = str(tmp_path_factory.mktemp("init_single"))
    return build_all(specs(prepared_text_dir, prepared_prompt_dir, sources, runs, "single"))


def test_single_process_init_equals_eager_and_sources(single, sources):
    """In one process: fresh models are the eager model of the seed; PPO's models are their sources' weights."""
    from igpt.checkpoint import read_model_state

    for result, tied in zip(single[:2], (False, True)):
        torch.manual_seed(SEED)
        eager = Transformer(tiny(tie_embeddings=tied)).state_dict()
        assert sorted(result["models"]["policy"]) == sorted(eager)
        for key, value in eager.items():
            assert torch.equal(result["models"]["policy"][key], value), key
    models = single[2]["models"]
    assert sorted(models) == ["critic", "policy", "reference", "reward"]
    policy, rm = read_model_state(sources["policy"] + "/checkpoints/step_0000001"), read_model_state(
        sources["rm"] + "/checkpoints/step_0000001")
    for role, want in (("policy", policy), ("reference", policy), ("critic", rm), ("reward", rm)):
        for key, value in want.items():
            assert torch.equal(models[role][key], value), (role, key)


@pytest.mark.dist
@pytest.mark.parametrize("strategy", ["fsdp", "zero3"])
def test_sharded_init_equals_single_process(single, prepared_text_dir, prepared_prompt_dir, sources, tmp_path,
                                            strategy):
    """2 ranks under fsdp and zero3 hold, gathered, exactly the single process's initial weights for every model,
    and torch's generator is where the single process left it."""
    out = str(tmp_path / "init.pt")
    args = json.dumps(specs(prepared_text_dir, prepared_prompt_dir, sources, str(tmp_path), strategy))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "tests.init_worker", out, args]
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=400)
    assert proc.returncode == 0, proc.stderr[-8000:]
    got = torch.load(out, weights_only=True)
    for i, (a, b) in enumerate(zip(got, single)):
        assert torch.equal(a["rng"], b["rng"]), i
        assert sorted(a["models"]) == sorted(b["models"]), i
        for role, state in b["models"].items():
            assert sorted(a["models"][role]) == sorted(state), (i, role)
            for key, value in state.items():
                assert torch.equal(a["models"][role][key], value), (i, role, key)


def test_dcp_rows_read_only_their_bytes(sources):
    """Row ranges of an FSDP (DCP) checkpoint's tensors equal those of a whole read, and are read from the byte
    ranges of the stored chunks (no chunk loaded whole)."""
    import torch.distributed.checkpoint as dcp

    from igpt.checkpoint import _dcp_metadata, _DcpRows

    folder = os.path.join(sources["policy"], "checkpoints", "step_0000001", "model")
    reader, md = _dcp_metadata(folder)
    rows = _DcpRows(folder, reader)
    for name in ("embed_tokens.weight", "layers.1.mlp.down_proj.weight", "norm.weight"):
        whole = torch.empty(md[name].size, dtype=md[name].properties.dtype)
        dcp.load({name: whole}, storage_reader=reader, no_dist=True)
        n = whole.shape[0]
        for a, b in ((0, 1), (n // 2 - 3, n // 2 + 5), (n - 7, n), (0, n)):
            assert torch.equal(rows.read(name, md[name], (a, b)), whole[a:b]), (name, a, b)
        assert all(rows._locate(name, c.offsets) is not None for c in md[name].chunks), name
