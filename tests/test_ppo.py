"""PPO, GRPO and RLOO (igpt/stages/ppo.py, ppo_math.py) and the rollout sampler (igpt/sampling.py): the arithmetic
against closed forms, the sampler against the trainer's forward, a toy bandit against its KL-regularised optimum,
resume, learning a programmatic reward, and errors."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from igpt.config import ModelConfig
from igpt.model import Transformer
from igpt.model.outputs import TokenLogProbs
from igpt.sampling import positions_from_mask, row_seeds, sample_rollout
from igpt.stages.ppo_math import clipped_policy_loss, gae, group_advantages, kl_estimate, token_rewards
from tests.conftest import TINY, run_module
from tests.trainutil import make_trainer, read_metrics, train, train_and_stop, train_steps

HERE = os.path.dirname(os.path.abspath(__file__))


def ppo_overrides(prompt_dir: str, run_dir: str, *extra: str) -> list[str]:
    return [
        "+stage=ppo", f"data.dir={prompt_dir}", f"run_dir={run_dir}", *TINY, "trainer.global_batch_size=4",
        "trainer.micro_batch_size=8", "rollout.n=4", "rollout.max_new_tokens=8", "trainer.eval_every=0",
        "trainer.ckpt_every=0", "trainer.progress=false", "logger.wandb.mode=disabled",
        "trainer.sample_every_eval=false", "optim.warmup_steps=2", "optim.lr=1e-3", "data.num_partitions=4",
        "reward.functions=[igpt.data.prefs:good_word_reward]", *extra,
    ]


# ---------------------------------------------------------------------------------------------------- arithmetic
def test_gae_equals_its_closed_form_and_ignores_masked_values():
    gamma, lam = 0.9, 0.8
    rewards = torch.tensor([[0.1, -0.2, 0.3, 1.0], [0.5, 2.0, 0.0, 0.0]])
    values = torch.tensor([[0.4, 0.3, -0.1, 0.2], [1.0, -1.0, 1e6, -1e6]])  # row 1 ends after 2 tokens
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    adv, ret = gae(rewards, values, mask, gamma, lam)
    for b in range(2):
        n = int(mask[b].sum())
        v = [float(values[b, t]) if t < n else 0.0 for t in range(n + 1)]
        delta = [float(rewards[b, t]) + gamma * v[t + 1] - v[t] for t in range(n)]
        for t in range(n):
            want = sum((gamma * lam) ** k * delta[t + k] for k in range(n - t))
            assert adv[b, t].item() == pytest.approx(want, rel=1e-6)
            assert ret[b, t].item() == pytest.approx(want + v[t], rel=1e-6)
    assert (adv[1, 2:] == 0).all() and (ret[1, 2:] == 0).all()
    values2 = values.clone()
    values2[1, 2:] = torch.tensor([-5.0, 7.0])  # other garbage where the response has ended: nothing changes
    adv2, ret2 = gae(rewards, values2, mask, gamma, lam)
    assert torch.equal(adv, adv2) and torch.equal(ret, ret2)


def test_kl_estimators_match_the_exact_kl_in_expectation():
    """Tokens sampled from p over a 6-token vocabulary: k1 and k3 average to KL(p || q) (unbiased), k2 to it up to
    its known bias (second order in log(p/q); small for nearby distributions); k3 is never negative."""
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(6, generator=g), -1)
    q = torch.softmax(torch.log(p) + 0.3 * torch.randn(6, generator=g), -1)
    exact = float((p * (p.log() - q.log())).sum())
    tokens = torch.multinomial(p, 400_000, replacement=True, generator=g)
    lp, lq = p.log()[tokens], q.log()[tokens]
    for est, tol in (("k1", 0.03), ("k3", 0.03), ("k2", 0.15)):
        vals = kl_estimate(lp, lq, est).double()
        stderr = float(vals.std() / math.sqrt(vals.numel()))
        assert abs(float(vals.mean()) - exact) <= max(4 * stderr, tol * exact), (est, float(vals.mean()), exact)
    assert (kl_estimate(lp, lq, "k3") >= 0).all()


def test_rewards_land_on_the_last_response_token():
    """Right after each response's last token: its <|im_end|>, or the last token a truncated response kept."""
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)  # row 1: cut
    kl = torch.full((3, 5), 0.5)
    r = token_rewards(kl, torch.tensor([3.0, -2.0, 7.0]), mask, coef=0.1)
    want = -0.1 * 0.5 * mask.float()
    want[0, 2] += 3.0
    want[1, 4] += -2.0
    want[2, 0] += 7.0
    assert torch.allclose(r, want)


def test_group_advantages_grpo_and_rloo():
    r = torch.tensor([1.0, 2.0, 4.0, 0.0, 0.0, 3.0])  # two prompts, 3 samples each
    rloo = group_advantages(r, 3, "rloo")
    assert rloo.tolist() == pytest.approx([1 - 3.0, 2 - 2.5, 4 - 1.5, 0 - 1.5, 0 - 1.5, 3 - 0.0])
    grpo = group_advantages(r, 3, "grpo")
    g0 = torch.tensor([1.0, 2.0, 4.0])
    assert grpo[:3].tolist() == pytest.approx(((g0 - g0.mean()) / (g0.std() + 1e-6)).tolist(), rel=1e-5)


def test_clipped_policy_loss_dual_clip_and_clip_high():
    old = torch.zeros(4)
    logp = torch.log(torch.tensor([1.5, 0.5, 1.1, 3.0]))
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    out = clipped_policy_loss(logp, old, adv, clip=0.2)
    assert out.loss.tolist() == pytest.approx([-1.2, 0.8, -1.1, 3.0], rel=1e-6)
    assert out.clipped.tolist() == [True, True, False, False]
    assert clipped_policy_loss(logp, old, adv, 0.2, clip_high=0.6).loss[0].item() == pytest.approx(-1.5)
    assert clipped_policy_loss(logp, old, adv, 0.2, dual_clip=2.0).loss[3].item() == pytest.approx(2.0)


# ---------------------------------------------------------------------------------------------------- sampler
def test_sampler_logprobs_equal_the_trainers_and_samples_follow_the_distribution():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=50, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
                                    max_seq_len=32)).eval()
    prompts = torch.randint(7, 50, (6, 5))
    real = torch.ones_like(prompts, dtype=torch.bool)
    real[1, :2] = real[4, :3] = False  # left padding
    prompts[~real] = 1
    temp = 0.7
    ro = sample_rollout(model, prompts, real, 10, row_seeds(3, 0, torch.arange(6)), temp, stop_ids=[3], pad_id=1)
    ids = torch.cat([prompts, ro.tokens], 1)
    full_real = torch.cat([real, ro.mask], 1)
    labels = torch.full_like(ids, -100)
    labels[:, 4 : 4 + ro.tokens.shape[1]] = torch.where(ro.mask, ro.tokens, torch.full_like(ro.tokens, -100))
    with torch.no_grad():
        lp = model(ids, position_ids=positions_from_mask(full_real), output=TokenLogProbs(labels, temp))
    got = lp[:, 4 : 4 + ro.tokens.shape[1]]
    assert ro.mask.sum() > 20
    gap = (got[ro.mask] - ro.logprobs[ro.mask]).abs().max()
    assert gap < 1e-5, gap
    # one step from one prompt with 4000 seeds: frequencies follow softmax(logits / T) (Gumbel-max is exact sampling)
    one = prompts[:1].expand(4000, -1)
    ro1 = sample_rollout(model, one, torch.ones_like(one, dtype=torch.bool), 1, row_seeds(9, 0, torch.arange(4000)),
                         temp)
    with torch.no_grad():
        probs = torch.softmax(model(prompts[:1])[0, -1] / temp, -1)
    freq = torch.bincount(ro1.tokens[:, 0], minlength=50).float() / 4000
    assert 0.5 * (freq - probs).abs().sum() < 0.05
    # the same row seed gives the same sample whatever the batch around it
    ro2 = sample_rollout(model, prompts[2:3], real[2:3], 10, row_seeds(3, 0, torch.tensor([2])), temp, stop_ids=[3],
                         pad_id=1)
    n = int(ro2.mask.sum())
    assert ro2.tokens[0, :n].tolist() == ro.tokens[2, :n].tolist()


def test_first_minibatch_ratio_is_one(prepared_prompt_dir, tmp_path, monkeypatch):
    """Before any update the policy that sampled is the policy being trained: ratio exactly 1, nothing clipped."""
    import igpt.stages.ppo as ppo

    seen = []
    real = ppo.clipped_policy_loss

    def spy(logp, old, adv, *args):
        out = real(logp, old, adv, *args)
        seen.append(out)
        return out

    monkeypatch.setattr(ppo, "clipped_policy_loss", spy)
    trainer = make_trainer(ppo_overrides(prepared_prompt_dir, str(tmp_path / "r"), "trainer.max_steps=1",
                                         "ppo.minibatches=2", "trainer.micro_batch_size=4"))
    try:
        out = trainer.train_step(next(iter(trainer.train_loader)))
    finally:
        trainer.close()
    assert len(seen) == 4  # 2 minibatches x 2 micro-batches
    # The first minibatch: the weights have not moved yet, so the ratio is 1 up to fp32 rounding. Not bit-exact: the
    # old log-probs come from contiguous rows, a minibatch takes every m-th row, and CPU sdpa blocks its work by the
    # batch's shape (measured: 0 and 4.8e-7).
    for first in seen[:2]:
        assert (first.ratio - 1).abs().max() < 2e-6 and not first.clipped.any()
    # after the first optimizer step they have moved, far beyond that rounding (measured: 0.05)
    assert max((s.ratio - 1).abs().max().item() for s in seen[2:]) > 1e-3
    assert out["rollout/logprob_gap"] < 1e-5


# ---------------------------------------------------------------------------------------------------- the bandit
@pytest.fixture(scope="module")
def bandit_data(tmp_path_factory) -> str:
    """One prompt, a 14-token word-level vocabulary (igpt's 7 special tokens, q, a..e, [UNK])."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from igpt.data.chat import SPECIAL_TOKENS

    root = tmp_path_factory.mktemp("bandit")
    vocab = {t: i for i, t in enumerate([*SPECIAL_TOKENS, "q", "a", "b", "c", "d", "e", "[UNK]"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    tok.save(str(root / "tok.json"))
    (root / "p.jsonl").write_text(json.dumps({"prompt": "q"}) + "\n")
    run_module("-m", "igpt.data.prepare", f"input={root}/p.jsonl", f"output_dir={root}/data",
               f"tokenizer={root}/tok.json", "kind=prompt", "val_fraction=0")
    return str(root / "data")


@pytest.mark.parametrize("advantage", ["gae", "grpo", "rloo"])
def test_toy_bandit_converges_to_the_kl_regularised_optimum(bandit_data, tmp_path, advantage, monkeypatch):
    """One prompt, one-token responses with fixed rewards: the policy converges to pi* ~ pi_ref exp(r / beta)."""
    from igpt.checkpoint import load_model
    from igpt.data.chat import encode_prompt
    from tests.rewards import BANDIT

    monkeypatch.syspath_prepend(HERE)
    beta, run = 0.5, str(tmp_path / "run")
    train([
        "+stage=ppo", f"data.dir={bandit_data}", f"run_dir={run}", "model.dim=16", "model.n_layers=1",
        "model.n_heads=2", "model.n_kv_heads=1", "model.ffn_dim=32", "model.vocab_size=14", "model.max_seq_len=16",
        "trainer.seq_len=16", "trainer.progress=false", "logger.wandb.mode=disabled", "trainer.sample_every_eval=false",
        "data.num_partitions=1", "trainer.global_batch_size=1", "trainer.micro_batch_size=64", "rollout.n=64",
        "rollout.max_new_tokens=1", "trainer.max_steps=120", "trainer.eval_every=0", "trainer.ckpt_every=0",
        "reward.functions=[rewards:bandit]", "optim.lr=0.03", "optim.warmup_steps=5", f"kl.coef={beta}",
        f"ppo.advantage={advantage}",
    ])
    model, tok, meta = load_model(run)
    ids = torch.tensor([encode_prompt(tok, "q")])
    torch.manual_seed(meta["config"]["trainer"]["seed"])
    reference = Transformer(ModelConfig(**meta["model"]))  # the reference: the policy's initial weights
    with torch.no_grad():
        p = torch.softmax(model(ids)[0, -1], -1)
        p_ref = torch.softmax(reference(ids)[0, -1], -1)
    r = torch.tensor([BANDIT.get(tok.decode([i], skip_special_tokens=True).strip(), -1.0) for i in range(14)])
    optimum = p_ref * torch.exp(r / beta)
    optimum /= optimum.sum()
    tv = 0.5 * (p - optimum).abs().sum().item()
    assert tv < 0.03, (advantage, tv, p.tolist(), optimum.tolist())
    assert 0.5 * (p_ref - optimum).abs().sum().item() > 0.4  # the optimum is far from where it started


# ---------------------------------------------------------------------------------------------------- runs
def test_resume_mid_run_equals_uninterrupted(prepared_prompt_dir, tmp_path):
    """PPO with a critic and an adaptive KL coefficient: actor, critic, both optimizers, the KL controller and the
    prompt loader resume exactly."""
    extra = ("trainer.max_steps=4", "kl.target=0.5", "kl.horizon=50", "ppo.minibatches=2", "trainer.micro_batch_size=8")
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    train(ppo_overrides(prepared_prompt_dir, full, *extra))
    train_and_stop(ppo_overrides(prepared_prompt_dir, part, *extra, "trainer.ckpt_every=2"), at_step=3)
    assert json.load(open(os.path.join(part, "preempted")))["step"] == 3
    assert os.path.isdir(os.path.join(part, "checkpoints", "step_0000003", "critic"))
    train(ppo_overrides(prepared_prompt_dir, part, *extra, "trainer.ckpt_every=2"))
    assert train_steps(part) == [1, 2, 3, 4]  # resumed after step 3, not restarted
    ref, got = read_metrics(full), read_metrics(part)
    assert ref[4]["kl/coef"] != ref[1]["kl/coef"]  # the controller moved: its state had to be restored
    for step in range(1, 5):
        for key in ("loss", "grad_norm", "objective/scores", "objective/kl", "kl/coef", "loss/value"):
            assert got[step][key] == ref[step][key], (step, key)


def test_learns_a_programmatic_reward_within_the_kl_target(prepared_text_dir, prepared_prompt_dir, tmp_path):
    """RLOO on 'name a kind word': held-out greedy reward rises well above the starting model's while the sampled KL
    to the reference stays under kl.target."""
    pre = str(tmp_path / "pre")
    train(["+stage=pretrain", f"data.dir={prepared_text_dir}", f"run_dir={pre}", *TINY, "trainer.max_steps=60",
           "trainer.global_batch_size=16", "trainer.micro_batch_size=16", "trainer.progress=false",
           "logger.wandb.mode=disabled", "trainer.sample_every_eval=false", "trainer.eval_every=0",
           "trainer.eval_batches=1", "optim.lr=3e-3"])
    run = str(tmp_path / "ppo")
    train(ppo_overrides(prepared_prompt_dir, run, f"init_from={pre}", "trainer.global_batch_size=8",
                        "trainer.micro_batch_size=32", "rollout.max_new_tokens=12", "trainer.max_steps=30",
                        "trainer.eval_every=30", "trainer.eval_at_start=true", "ppo.advantage=rloo", "kl.coef=0.3",
                        "kl.target=4.0", "kl.horizon=256", "data.num_partitions=8"))
    val = read_metrics(run, "val")
    assert val[0]["objective/scores"] <= 0.3 and val[30]["objective/scores"] >= 0.7, (val[0], val[30])
    kls = [read_metrics(run)[s]["objective/kl"] for s in range(21, 31)]
    assert sum(kls) / len(kls) < 4.0, kls
    rows = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    table = [r for r in rows if r["split"] == "rollouts"]
    assert table and table[-1]["columns"] == ["prompt", "response", "reward"]


def test_bad_reward_functions_and_missing_inputs_fail_clearly(prepared_prompt_dir, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(HERE)
    for fn, error in (("rewards:raises", r"reward function rewards:raises raised ZeroDivisionError.*sample 0"),
                      ("rewards:not_a_number", r"reward function rewards:not_a_number returned 'high' for sample")):
        trainer = make_trainer(ppo_overrides(prepared_prompt_dir, str(tmp_path / fn), f"reward.functions=[{fn}]",
                                             "trainer.max_steps=1"))
        try:
            with pytest.raises(RuntimeError, match=error):
                trainer.train_step(next(iter(trainer.train_loader)))
        finally:
            trainer.close()
    bad = [
        ("reward.functions=[]", ValueError, "ppo needs a reward"),
        ("reward.functions=[rewards:missing]", ValueError, "reward.functions: cannot import 'rewards:missing'"),
        (f"reward.model={tmp_path}/nope", FileNotFoundError, "reward.model="),
        (f"data.dir={tmp_path}/no_data", FileNotFoundError, "data.dir="),
        ("rollout.n=1", ValueError, None),
    ]
    for override, exc, msg in bad:
        args = ppo_overrides(prepared_prompt_dir, str(tmp_path / "bad"), "trainer.max_steps=1", override)
        if override == "rollout.n=1":
            args += ["ppo.advantage=grpo", "trainer.micro_batch_size=4"]
            msg = "rollout.n must be at least 2"
        with pytest.raises(exc, match=msg):
            make_trainer(args)
    assert not os.path.exists(os.path.join(tmp_path, "bad", "metrics.jsonl"))


def test_rollouts_gather_fsdp_weights_once_not_per_token():
    """Under FSDP the sampler runs inside ``Wrapped.gathered``: every module is all-gathered once for the whole
    rollout, where plain FSDP forwards would gather every block again for every decoded token."""
    from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup

    from igpt.config import OptimConfig, StrategyConfig
    from igpt.parallel import build_strategy

    strategy = build_strategy(StrategyConfig(name="fsdp"), "fp32", torch.device("cpu"))
    try:
        torch.manual_seed(0)
        cfg = ModelConfig(vocab_size=64, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=32)
        handle = strategy.wrap_model(Transformer(cfg), OptimConfig())
        plain = Transformer(cfg)
        plain.load_state_dict(handle.full_state_dict())
        ids = torch.randint(7, 64, (2, 4))
        real = torch.ones_like(ids, dtype=torch.bool)
        seeds = row_seeds(0, 0, torch.arange(2))
        calls = []
        real_unshard = FSDPParamGroup.unshard

        def counting(self, *args, **kwargs):
            if not self.is_unsharded and self._all_gather_result is None:  # a real gather, not FSDP's no-op call
                calls.append(1)
            return real_unshard(self, *args, **kwargs)

        FSDPParamGroup.unshard = counting
        try:
            with handle.gathered() as model:
                ro = sample_rollout(model, ids, real, 12, seeds, 1.0)
            gathered_calls = len(calls)
            calls.clear()
            with torch.no_grad():
                sample_rollout(handle.model, ids, real, 12, seeds, 1.0)
            per_forward_calls = len(calls)
        finally:
            FSDPParamGroup.unshard = real_unshard
        assert gathered_calls <= cfg.n_layers + 1  # each block and the root once
        assert per_forward_calls >= 12 * cfg.n_layers  # every block for every decoded token
        assert torch.equal(ro.tokens, sample_rollout(plain, ids, real, 12, seeds, 1.0).tokens)  # the same samples
    finally:
        strategy.teardown()
