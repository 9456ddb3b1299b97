"""PPO, GRPO and RLOO (igpt/stages/ppo.py, ppo_math.py) and the rollout sampler (igpt/sampling.py): the arithmetic
against closed forms, the sampler against the trainer's forward, a toy bandit against its KL-regularised optimum,
resume, learning a programmatic reward, and errors."""

from __future__ import annotations

import json
import math
import os
from types import SimpleNamespace

import pytest
import torch

from igpt.config import Config, ModelConfig, PPOConfig, RolloutConfig, StageConfig
from igpt.model import Transformer
from igpt.model.outputs import Hidden, Logits, TokenLogProbs, TokenStats
from igpt.sampling import positions_from_mask, row_seeds, sample_rollout
from igpt.stages import build_stage
from igpt.stages.ppo_math import (
    KLController,
    clipped_policy_loss,
    clipped_value_loss,
    gae,
    group_advantages,
    kl_estimate,
    masked_whiten,
    token_rewards,
)
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


def ppo_stage(n: int = 4, **ppo):
    """A PPO stage on its own, with a one-process run-context stand-in (global sums are local sums)."""
    stage = build_stage(Config(stage=StageConfig(name="ppo"), ppo=PPOConfig(**ppo), rollout=RolloutConfig(n=n)))
    stage.ctx = SimpleNamespace(global_sum=lambda xs: [float(x) for x in xs])
    return stage


def test_critic_free_advantages_are_not_whitened_by_token_count():
    """The issue's example: group scores [1, 0.6, 0, 0], lengths [50, 2, 2, 2]. GRPO's advantages reach every token
    unchanged by default (token-count whitening made the 0.6 response's negative); RLOO's too; with
    ppo.whiten_advantages=true they are whitened over sequences, each counted once (signs kept: the group
    advantages of a batch already average 0)."""
    lengths = [50, 2, 2, 2]
    mask = torch.arange(50)[None, :] < torch.tensor(lengths)[:, None]
    scores, kl = torch.tensor([1.0, 0.6, 0.0, 0.0]), torch.zeros(4, 50)
    for kind in ("grpo", "rloo"):
        want = group_advantages(scores, 4, kind)
        adv, values, returns = ppo_stage(advantage=kind).advantages(scores, kl, mask, None, coef=0.0)
        assert values is None and returns is None
        assert torch.equal(adv, want[:, None].expand(4, 50) * mask)
        assert (adv[1, :2] > 0).all() and (adv[0] > 0).sum() == 50  # the better-than-average responses stay up
        adv_w, _, _ = ppo_stage(advantage=kind, whiten_advantages=True).advantages(scores, kl, mask, None, coef=0.0)
        w = (want - want.mean()) / want.var(unbiased=False).sqrt()
        assert torch.allclose(adv_w, w[:, None].expand(4, 50) * mask, atol=1e-6)
        assert torch.equal(adv_w[:, 0] > 0, want > 0)
    grpo = group_advantages(scores, 4, "grpo")
    assert grpo.tolist() == pytest.approx([1.2247, 0.4082, -0.8165, -0.8165], abs=1e-4)  # the numbers


def test_gae_advantages_are_whitened_over_response_tokens_only():
    """Whitening a masked batch: (x - mean) / std with mean and variance over the mask alone (whatever padding
    holds), 0 on padding; and it is on by default for gae."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 6, generator=g) * 2 + 3  # a mean far from 0: dropping the subtraction shows
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    x_pad = torch.where(mask, x, torch.full_like(x, 50.0))  # garbage on the padding
    stage = ppo_stage()
    mean, var = stage._global_mean_var(x_pad, mask)
    real = x[mask].double()
    assert mean == pytest.approx(float(real.mean()), rel=1e-9)
    assert var == pytest.approx(float(real.var(unbiased=False)), rel=1e-9)
    w = masked_whiten(x_pad, mask, mean, var)
    want = (x.double() - real.mean()) / real.std(unbiased=False)
    assert torch.allclose(w[mask].double(), want[mask], atol=1e-5)
    assert (w[~mask] == 0).all()
    assert abs(float(w[mask].mean())) < 1e-6 and float(w[mask].std(unbiased=False)) == pytest.approx(1.0, abs=1e-5)
    # through the stage with a critic: GAE, then that whitening
    scores, values = torch.tensor([1.0, -0.5, 2.0]), torch.randn(3, 6, generator=g)
    kl = torch.rand(3, 6, generator=g) * mask
    adv, _, returns = stage.advantages(scores, kl, mask, values, coef=0.1)
    raw, _ = gae(token_rewards(kl, scores, mask, 0.1), values * mask, mask, 1.0, 0.95)
    r = raw[mask].double()
    assert torch.allclose(adv[mask].double(), (raw[mask].double() - r.mean()) / r.std(unbiased=False), atol=1e-5)
    assert (adv[~mask] == 0).all()


def test_k3_log_ratio_is_clamped_to_ten():
    """k3 = exp(-r) - 1 + r on r = log pi - log ref clamped to [-10, 10]: at r = -12 it is e^10 - 11, not 1.6e5."""
    logp = torch.tensor([-12.0, -3.0, 0.5, 15.0])
    ref = torch.zeros(4)
    got = kl_estimate(logp, ref, "k3")
    r = torch.tensor([-10.0, -3.0, 0.5, 10.0], dtype=torch.float64)
    assert got.tolist() == pytest.approx((torch.exp(-r) - 1 + r).tolist(), rel=1e-6)
    assert got[0].item() < 2.3e4
    assert kl_estimate(logp, ref, "k1").tolist() == logp.tolist()  # k1, k2 unclamped
    assert kl_estimate(logp, ref, "k2")[0].item() == pytest.approx(72.0)


def test_clipped_value_loss_takes_the_larger_error():
    """0.5 max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2) per token, on cases where each term wins."""
    old = torch.tensor([0.0, 0.0, 0.0, 1.0])
    v = torch.tensor([0.5, 0.5, 0.1, 1.0])
    ret = torch.tensor([1.0, 0.0, 0.0, 3.0])
    loss, clipped = clipped_value_loss(v, old, ret, clip=0.2)
    # row 0: V moved 0.5 toward R = 1; clipped V = 0.2 is farther: (0.2 - 1)^2 = 0.64 beats 0.25
    # row 1: V moved 0.5 away from R = 0; the unclipped error 0.25 beats the clipped 0.04
    # row 2: inside the clip: both 0.01; row 3: unmoved, both 4
    assert loss.tolist() == pytest.approx([0.32, 0.125, 0.005, 2.0], rel=1e-6)
    assert clipped.tolist() == [True, False, False, False]


def test_kl_controller_moves_the_coefficient_toward_the_target():
    """Ziegler et al.: coef *= 1 + clip(KL / target - 1, -0.2, 0.2) * samples / horizon."""
    up = KLController(0.1, target=1.0, horizon=100)
    up.update(kl=1.1, samples=10)  # above target: the penalty grows
    assert up.value == pytest.approx(0.1 * (1 + 0.1 * 10 / 100))
    up.update(kl=5.0, samples=10)  # error clipped at 0.2
    assert up.value == pytest.approx(0.1 * 1.01 * 1.02)
    down = KLController(0.1, target=1.0, horizon=100)
    down.update(kl=0.95, samples=10)  # below target: it shrinks
    assert down.value == pytest.approx(0.1 * (1 - 0.05 * 10 / 100))
    down.update(kl=0.0, samples=10)
    assert down.value == pytest.approx(0.1 * 0.995 * 0.98)
    fixed = KLController(0.1, target=None, horizon=100)
    fixed.update(kl=5.0, samples=10)
    assert fixed.value == 0.1


def test_token_stats_exact_kl_and_entropy_equal_torch_distributions():
    """TokenStats' entropy and exact KL(this || other) at a temperature, against torch.distributions on the full
    logits of two different models."""
    cfg = ModelConfig(vocab_size=50, dim=32, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=16)
    torch.manual_seed(0)
    a, b = Transformer(cfg).eval(), Transformer(cfg).eval()
    ids = torch.randint(0, 50, (2, 10))
    labels = ids.roll(-1, 1)
    labels[:, :3] = -100
    temp = 0.7
    with torch.no_grad():
        stats = a(ids, output=TokenStats(labels, temp, b(ids, output=Hidden()), b.lm_head.weight, chunk=5))
        pa = torch.distributions.Categorical(logits=a(ids, output=Logits()).double() / temp)
        pb = torch.distributions.Categorical(logits=b(ids, output=Logits()).double() / temp)
    keep = labels != -100
    kl = torch.distributions.kl_divergence(pa, pb)
    assert float(kl[keep].min()) > 1e-3  # the models differ: KL(a || b) and KL(b || a) differ too
    assert torch.allclose(stats["kl"][keep].double(), kl[keep], atol=1e-5)
    assert not torch.allclose(stats["kl"][keep].double(), torch.distributions.kl_divergence(pb, pa)[keep], atol=1e-3)
    assert torch.allclose(stats["entropy"][keep].double(), pa.entropy()[keep], atol=1e-5)
    assert torch.allclose(stats["logprobs"][keep].double(), pa.log_prob(labels.clamp(min=0))[keep], atol=1e-5)
    assert torch.allclose(stats["other_logprobs"][keep].double(), pb.log_prob(labels.clamp(min=0))[keep], atol=1e-5)
    assert (stats["kl"][~keep] == 0).all() and (stats["entropy"][~keep] == 0).all()


@pytest.mark.parametrize("temp", [0.7, 0.5])
def test_bf16_logprobs_of_policy_and_reference_agree_exactly_at_any_temperature(temp):
    """bf16, T not a power of 2: TokenLogProbs (the policy's old log-probs) and TokenStats (the reference's) do the same
    computation, so equal weights give equal log-probs and a KL of exactly 0 (it was 1.9e-3 per token apart)."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=300, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=32)
    model = Transformer(cfg).to(torch.bfloat16).eval()
    ids = torch.randint(0, 300, (3, 20))
    labels = ids.roll(-1, 1)
    labels[:, :5] = -100
    with torch.no_grad():
        lp = model(ids, output=TokenLogProbs(labels, temp))
        st = model(ids, output=TokenStats(labels, temp, model(ids, output=Hidden()), model.lm_head.weight))
    keep = labels != -100
    assert torch.equal(lp[keep], st["other_logprobs"][keep]) and torch.equal(lp[keep], st["logprobs"][keep])
    assert torch.equal(kl_estimate(lp, st["other_logprobs"], "k1"), torch.zeros_like(lp))
    with torch.no_grad():  # and they are log softmax(fp32 logits / T)
        want = torch.log_softmax(model(ids, output=Logits()).float() / temp, -1)
    want = want.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    assert torch.allclose(lp[keep], want[keep], atol=1e-6)


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


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_first_minibatch_ratio_is_one(prepared_prompt_dir, tmp_path, monkeypatch, temperature):
    """Before any update the policy that sampled is the policy being trained: ratio exactly 1, nothing clipped; at
    rollout.temperature != 1 too (the old log-probs, the update's and the sampler's are all at that temperature)."""
    import igpt.stages.ppo as ppo

    seen = []
    real = ppo.clipped_policy_loss

    def spy(logp, old, adv, *args):
        out = real(logp, old, adv, *args)
        seen.append(out)
        return out

    monkeypatch.setattr(ppo, "clipped_policy_loss", spy)
    trainer = make_trainer(ppo_overrides(prepared_prompt_dir, str(tmp_path / "r"), "trainer.max_steps=1",
                                         "ppo.minibatches=2", "trainer.micro_batch_size=4",
                                         f"rollout.temperature={temperature}"))
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
    assert out.metrics["rollout/logprob_gap"] < 1e-5


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


# ---------------------------------------------------------------------------------------------------- wiring
def test_ptx_gradient_is_coef_times_the_pretraining_loss_gradient(prepared_prompt_dir, prepared_text_dir, tmp_path,
                                                                  monkeypatch):
    """PPO-ptx: with every advantage 0 (GRPO on a constant reward, no KL penalty) the policy loss has no gradient,
    so the actor's gradient in the optimizer step is exactly ptx.coef times that of the ptx batch's mean token loss,
    computed here on a copy of the weights the step started from."""
    import copy

    monkeypatch.syspath_prepend(HERE)
    coef = 0.5
    trainer = make_trainer(ppo_overrides(
        prepared_prompt_dir, str(tmp_path / "r"), "trainer.max_steps=1", "ppo.advantage=grpo", "kl.coef=0",
        "reward.functions=[rewards:constant]", f"ptx.coef={coef}", f"ptx.data_dir={prepared_text_dir}",
        "trainer.grad_clip=0"))
    try:
        stage, actor = trainer.stage, trainer.models["policy"]
        start = copy.deepcopy(actor.module)
        seen: dict = {}
        next_ptx, step = stage._next_ptx, actor.clip_and_step

        def spy_ptx():
            seen["batch"] = next_ptx()
            return seen["batch"]

        def spy_step(*args, **kwargs):
            seen["grads"] = {n: p.grad.clone() for n, p in actor.module.named_parameters() if p.grad is not None}
            return step(*args, **kwargs)

        monkeypatch.setattr(stage, "_next_ptx", spy_ptx)
        monkeypatch.setattr(actor, "clip_and_step", spy_step)
        out = trainer.train_step(next(iter(trainer.train_loader)))
    finally:
        trainer.close()
    assert out.metrics["loss/policy"] == 0.0 and out.metrics["loss/ptx"] > 0
    b = seen["batch"]
    start.train()
    loss = start(b["input_ids"], position_ids=b["position_ids"], labels=b["labels"]) / (b["labels"] != -100).sum()
    (coef * loss).backward()
    want = {n: p.grad for n, p in start.named_parameters() if p.grad is not None}
    assert set(want) == set(seen["grads"])
    for n, g in want.items():
        assert torch.allclose(seen["grads"][n], g, rtol=1e-4, atol=1e-7), n
    assert max(float(g.abs().max()) for g in want.values()) > 1e-3  # a real gradient


def test_reward_model_score_on_the_ppo_path_is_normalised_and_read_at_the_last_token(
        prepared_pref_dir, prepared_prompt_dir, tmp_path):
    """reward.model on the PPO path: each response's score is the scalar head at its sequence's last real token (its
    <|im_end|>, or the last token a truncated response kept) minus the mean stored with the reward model, as the raw
    model computes it on that sequence alone."""
    from igpt.checkpoint import load_model
    from tests.test_rm import rm_overrides

    rm = str(tmp_path / "rm")
    train(rm_overrides(prepared_pref_dir, rm, "trainer.max_steps=1", "trainer.global_batch_size=8",
                       "rm.norm_batches=1"))
    raw, _, meta = load_model(rm)
    mean = meta["reward_norm"]["mean"]
    raw.value_offset = 0.0
    trainer = make_trainer(ppo_overrides(prepared_prompt_dir, str(tmp_path / "ppo"), "trainer.max_steps=1",
                                         f"reward.model={rm}", "reward.functions=[]", "reward.clip=0"))
    try:
        stage = trainer.stage
        batch = next(iter(trainer.train_loader))
        prompts, preal = stage._prompts(batch)
        ro = sample_rollout(trainer.models["policy"].module, prompts, preal, 8, row_seeds(0, 0, torch.arange(4)), 1.0,
                            stop_ids=trainer.ctx.stop_ids, pad_id=trainer.ctx.pad_id)
        ids, real = torch.cat([prompts, ro.tokens], 1), torch.cat([preal, ro.mask], 1)
        got, _ = stage.score(ids, real, prompts.shape[1], ro.tokens, ro.mask, [0] * 4, "train")
    finally:
        trainer.close()
    assert abs(mean) > 1e-3  # a normalisation to apply
    with torch.no_grad():
        for i in range(4):
            values = raw(ids[i][real[i]][None])[0]  # the sequence alone, no padding
            assert got[i].item() == pytest.approx(values[-1].item() - mean, abs=1e-5), i
            assert abs(values[-1].item() - values[-2].item()) > 1e-3  # one token early would show


def test_missing_eos_penalty_lands_only_on_truncated_responses(prepared_prompt_dir, tmp_path, monkeypatch):
    """reward.missing_eos_penalty is subtracted from exactly the responses with no end-of-turn token (cut by the token
    budget), and the rollout's ``ended`` flag says which those are."""
    import igpt.sampling

    penalty = 2.0
    trainer = make_trainer(ppo_overrides(prepared_prompt_dir, str(tmp_path / "r"), "trainer.max_steps=1",
                                         "ppo.advantage=grpo", f"reward.missing_eos_penalty={penalty}", "kl.coef=0"))
    try:
        stage, actor = trainer.stage, trainer.models["policy"]
        with torch.no_grad():  # make the end of turn likely (about one token in six) so both kinds of response occur
            w = actor.module.lm_head.weight
            noise = torch.randn(w.shape[1], generator=torch.Generator().manual_seed(1))
            w[trainer.ctx.stop_ids[0]] = w[trainer.ctx.stop_ids[0]] + 0.6 * noise
        seen: dict = {}
        rollout, score, advantages = igpt.sampling.sample_rollout, stage.score, stage.advantages

        def spy_rollout(*args, **kwargs):
            seen["ro"] = rollout(*args, **kwargs)
            return seen["ro"]

        def spy_score(*args, **kwargs):
            seen["scores"] = score(*args, **kwargs)[0]
            return seen["scores"], None

        def spy_advantages(scores, *args, **kwargs):
            seen["penalised"] = scores
            return advantages(scores, *args, **kwargs)

        monkeypatch.setattr(igpt.sampling, "sample_rollout", spy_rollout)
        monkeypatch.setattr(stage, "score", spy_score)
        monkeypatch.setattr(stage, "advantages", spy_advantages)
        out = trainer.train_step(next(iter(trainer.train_loader)))
        stops = set(trainer.ctx.stop_ids)
    finally:
        trainer.close()
    ro = seen["ro"]
    ended = torch.tensor([any(t in stops for t in row[keep].tolist()) for row, keep in zip(ro.tokens, ro.mask)])
    assert 0 < int(ended.sum()) < ended.numel(), ended  # both kinds in the batch
    assert torch.equal(ro.ended.cpu(), ended)
    assert (ro.mask[~ended].sum(1) == 8).all()  # the others used the whole budget
    want = seen["scores"] - penalty * (~ended).float()
    assert torch.equal(seen["penalised"], want)
    assert out.metrics["response_length/clip_ratio"] == pytest.approx(float((~ended).float().mean()))
