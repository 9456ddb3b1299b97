"""The reward-model and DPO stages under every data-parallel strategy: 2 gloo processes against one process.

Each run goes through the real entry point (``torchrun igpt/train.py``) with the same seed and global batch as the
single-process reference (8 records per step; micro-batches of 2: accumulation 2 on 2 ranks, 4 on 1 rank). DPO's
frozen reference is placed by the strategy too (a replica under ddp and zero2, sharded under fsdp and zero3).
"""

from __future__ import annotations

import os

import pytest
import torch

from igpt.checkpoint import read_model_state, resolve
from tests.conftest import TINY
from tests.test_strategies import torchrun
from tests.trainutil import read_metrics, train

pytestmark = pytest.mark.dist

STEPS = 4
TOL = 1e-5
# AdamW's update is ~lr*eps/(|g|+eps)^2 sensitive to its gradient, 1e5 times more where |g| is near eps than
# elsewhere. With the default eps=1e-8 one element's step-1 gradient here, 4 micro-batch terms of ~1e-4, cancels to
# -9.4e-9, so the fp32 rounding of the sum, which depends on how ranks split and add the micro-batches, moved that
# weight by 8.8e-6 while every other weight agreed to 1e-8: bitwise the same in every rerun, but another CPU's
# rounding pushed it past TOL. eps=1e-6 keeps every element's update well-conditioned (sensitivity <= lr/(4 eps)).
ADAM_EPS = "optim.eps=1e-6"
KEYS = {"rm": ("loss", "accuracy", "margin"), "dpo": ("loss", "rewards/margins", "logps/chosen")}


def overrides(stage: str, data_dir: str, run_dir: str, *extra: str) -> list[str]:
    return [
        f"+stage={stage}", f"data.dir={data_dir}", f"run_dir={run_dir}", *TINY, "model.max_seq_len=128",
        "trainer.seq_len=128", "trainer.global_batch_size=8", "trainer.micro_batch_size=2",
        f"trainer.max_steps={STEPS}", f"trainer.eval_every={STEPS}", "trainer.eval_batches=2", "trainer.ckpt_every=0",
        "trainer.progress=false", "trainer.sample_every_eval=false", "logger.wandb.mode=disabled",
        "optim.warmup_steps=2", "optim.lr=3e-3", "data.num_partitions=4", "rm.norm_batches=2", ADAM_EPS, *extra,
    ]


@pytest.fixture(scope="module")
def single_runs(prepared_pref_dir, tmp_path_factory) -> dict[str, str]:
    runs = {}
    for stage in ("rm", "dpo"):
        runs[stage] = str(tmp_path_factory.mktemp(f"single_{stage}"))
        train(overrides(stage, prepared_pref_dir, runs[stage]))
    return runs


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "zero2", "zero3"])
@pytest.mark.parametrize("stage", ["rm", "dpo"])
def test_two_ranks_match_one_process(prepared_pref_dir, single_runs, tmp_path, stage, strategy):
    run = str(tmp_path / "run")
    torchrun(overrides(stage, prepared_pref_dir, run, f"strategy={strategy}"))
    got, ref = read_metrics(run), read_metrics(single_runs[stage])
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        for key in KEYS[stage]:
            assert abs(got[step][key] - ref[step][key]) <= TOL * max(1.0, abs(ref[step][key])), (step, key)
    gv, rv = read_metrics(run, "val")[STEPS], read_metrics(single_runs[stage], "val")[STEPS]
    for key in KEYS[stage] + (("kl",) if stage == "dpo" else ()):
        assert abs(gv[key] - rv[key]) <= TOL * max(1.0, abs(rv[key])), ("val", key)
    a, b = read_model_state(resolve(run)), read_model_state(resolve(single_runs[stage]))
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=TOL, rtol=0), k
    if stage == "rm":  # the normalisation pass ran on every rank's part of the train split
        from igpt.checkpoint import read_meta

        m, r = read_meta(resolve(run))["reward_norm"]["mean"], read_meta(resolve(single_runs[stage]))["reward_norm"]
        assert m == pytest.approx(r["mean"], abs=1e-5)


@pytest.fixture(scope="module")
def ppo_single(prepared_pref_dir, prepared_text_dir, prepared_prompt_dir, tmp_path_factory) -> dict[str, str]:
    """A tiny reward model (one RM step), and the single-process PPO run everything else is compared with."""
    root = tmp_path_factory.mktemp("ppo_single")
    rm = str(root / "rm")
    train(overrides("rm", prepared_pref_dir, rm, "trainer.max_steps=1", "model.max_seq_len=64", "trainer.seq_len=64"))
    run = str(root / "ppo")
    train(ppo_overrides(prepared_prompt_dir, prepared_text_dir, rm, run))
    return {"rm": rm, "run": run}


def ppo_overrides(prompt_dir: str, text_dir: str, rm: str, run_dir: str, *extra: str) -> list[str]:
    """PPO with everything at once: a critic (from the reward model), the reward model and a reward function,
    an adaptive KL coefficient, two minibatches and PPO-ptx."""
    return [
        "+stage=ppo", f"data.dir={prompt_dir}", f"run_dir={run_dir}", *TINY, f"reward.model={rm}",
        "reward.functions=[igpt.data.prefs:good_word_reward]", "reward.weights=[1.0,0.5]", "trainer.max_steps=2",
        "trainer.global_batch_size=4", "trainer.micro_batch_size=2", "rollout.n=2", "rollout.max_new_tokens=6",
        "ppo.minibatches=2", f"ptx.data_dir={text_dir}", "ptx.coef=0.5", "kl.target=1.0", "kl.horizon=20",
        "trainer.eval_every=2", "trainer.eval_batches=1", "trainer.ckpt_every=1", "trainer.progress=false",
        "trainer.sample_every_eval=false", "logger.wandb.mode=disabled", "optim.lr=1e-3", "optim.warmup_steps=1",
        "data.num_partitions=4", ADAM_EPS, *extra,
    ]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "zero2", "zero3"])
def test_ppo_two_ranks_match_one_process(prepared_prompt_dir, prepared_text_dir, ppo_single, tmp_path, strategy):
    """The same responses are sampled (row seeds follow the global row index), so the whole iteration matches."""
    run = str(tmp_path / "run")
    torchrun(ppo_overrides(prepared_prompt_dir, prepared_text_dir, ppo_single["rm"], run, f"strategy={strategy}"))
    got, ref = read_metrics(run), read_metrics(ppo_single["run"])
    keys = ("loss", "objective/scores", "objective/kl", "objective/kl_exact", "loss/value", "loss/ptx",
            "policy/approxkl", "critic/vf_explained_var", "response_length/mean", "kl/coef")
    for step in (1, 2):
        for key in keys:
            assert abs(got[step][key] - ref[step][key]) <= TOL * max(1.0, abs(ref[step][key])), (step, key)
    gv, rv = read_metrics(run, "val")[2], read_metrics(ppo_single["run"], "val")[2]
    for key in ("objective/scores", "objective/kl", "objective/kl_exact"):
        assert abs(gv[key] - rv[key]) <= TOL * max(1.0, abs(rv[key])), ("val", key)
    from igpt.checkpoint import model_dir


    # The weights after each iteration: AdamW divides every gradient element by its own running scale, so elements
    # whose gradient nearly cancels turn the summation-order noise of 2-rank averaging (~1e-7 relative) into
    # differences of ~1e-5 in a few weights (measured 1.5e-5 in one critic element at lr 1e-3; the actor within 4e-6).
    # The metrics above, which every weight feeds, agree within 1e-5; the weights are held to a tenth of the lr.
    for step in (1, 2):
        for role in (None, "critic"):
            a = read_model_state(model_dir(os.path.join(run, "checkpoints", f"step_{step:07d}"), role))
            b = read_model_state(model_dir(os.path.join(ppo_single["run"], "checkpoints", f"step_{step:07d}"), role))
            for k in a:
                assert torch.allclose(a[k], b[k], atol=1e-4, rtol=0), (step, role, k)
