"""The DPO stage (igpt/stages/dpo.py): each loss against its formula, log-probs in every batch layout, the reference
precomputed or live, resume, and learning a preference."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from igpt.config import Config, DPOConfig, ModelConfig, StageConfig
from igpt.model import Transformer
from igpt.model.outputs import TokenLogProbs
from igpt.stages import build_stage
from igpt.stages.dpo import CACHE_DIR, dpo_loss
from igpt.stages.pref import comparisons
from tests.conftest import TINY
from tests.test_rm import SEQ_128, pref_batch
from tests.trainutil import read_metrics, train, train_and_stop, train_steps

CFG = ModelConfig(vocab_size=384, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=64, max_seq_len=128)


def dpo_stage(**dpo):
    return build_stage(Config(stage=StageConfig(name="dpo"), dpo=DPOConfig(**dpo)))


def dpo_overrides(data_dir: str, run_dir: str, *extra: str) -> list[str]:
    return [
        "+stage=dpo", f"data.dir={data_dir}", f"run_dir={run_dir}", *TINY, *SEQ_128, "trainer.global_batch_size=16",
        "trainer.micro_batch_size=8", "trainer.eval_every=0", "trainer.ckpt_every=0", "trainer.progress=false",
        "logger.wandb.mode=disabled", "optim.warmup_steps=5", "optim.lr=3e-3", "trainer.sample_every_eval=false",
        *extra,
    ]


def test_each_loss_equals_its_formula():
    """On fixed log-ratios: DPO (with conservative label smoothing), IPO and hinge, written out by hand."""
    cw = torch.tensor([0.3, -1.2, 2.0, 0.0])  # log pi(w) - log ref(w)
    cl = torch.tensor([-0.4, 0.5, 1.0, 0.0])
    beta, eps = 0.25, 0.1
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    for i in range(4):
        h = float(cw[i] - cl[i])
        got = dpo_loss(cw, cl, beta, "sigmoid", eps)[i].item()
        assert got == pytest.approx(-(1 - eps) * math.log(sig(beta * h)) - eps * math.log(sig(-beta * h)), rel=1e-6)
        assert dpo_loss(cw, cl, beta, "sigmoid")[i].item() == pytest.approx(-math.log(sig(beta * h)), rel=1e-6)
        assert dpo_loss(cw, cl, beta, "ipo")[i].item() == pytest.approx((h - 1 / (2 * beta)) ** 2, rel=1e-6)
        assert dpo_loss(cw, cl, beta, "hinge")[i].item() == pytest.approx(max(0.0, 1 - beta * h), abs=1e-7)


class FixedLogProbs:
    """A stand-in model whose per-token log-probs of the labels are given (B, S)."""

    def __init__(self, logprobs: torch.Tensor) -> None:
        self.logprobs = logprobs

    def __call__(self, input_ids, position_ids=None, output=None, **_):
        assert isinstance(output, TokenLogProbs)
        return torch.where(output.labels != -100, self.logprobs, torch.zeros_like(self.logprobs))


@pytest.mark.parametrize("loss", ["sigmoid", "ipo", "hinge"])
def test_stage_loss_on_fixed_logprobs_with_kwise_records(prepared_pref_dir, loss):
    """Through the stage: sums over each response, IPO per token, every record the mean of its pairs, and the NLL
    term (dpo.nll_weight) once per record on its best-ranked response only."""
    batch = pref_batch(prepared_pref_dir, n=16, seq_len=128)
    torch.manual_seed(4)
    pi, ref = -torch.rand(batch["input_ids"].shape) * 3, -torch.rand(batch["input_ids"].shape) * 3
    beta, nll = 0.2, 0.5
    out = dpo_stage(beta=beta, loss=loss, nll_weight=nll).loss(
        {"policy": FixedLogProbs(pi), "reference": FixedLogProbs(ref)}, batch)
    expected, kwise = 0.0, 0
    for row in range(16):
        rank, pos, labels = (batch[k][row].tolist() for k in ("seq_rank", "position_ids", "labels"))
        segs = []  # [rank, sum log pi, sum log ref, tokens] by plain loops
        for t in range(128):
            if rank[t] < 0:
                continue
            if pos[t] == 0:
                segs.append([rank[t], 0.0, 0.0, 0])
            if labels[t] != -100:
                segs[-1][1] += float(pi[row, t])
                segs[-1][2] += float(ref[row, t])
                segs[-1][3] += 1
        pairs = [(a, b) for a in segs for b in segs if a[0] < b[0]]
        kwise += len(segs) > 2
        total = 0.0
        for w, lo in pairs:
            rw, rl = w[1] - w[2], lo[1] - lo[2]
            if loss == "ipo":
                rw, rl = rw / w[3], rl / lo[3]
            h = rw - rl
            per = {"sigmoid": -math.log(1 / (1 + math.exp(-beta * h))), "ipo": (h - 1 / (2 * beta)) ** 2,
                   "hinge": max(0.0, 1 - beta * h)}[loss]
            total += per
        # the NLL term once per record, on its best response (K = 3 records: not on the 2nd-ranked one too)
        top = min(sg[0] for sg in segs)
        best = [sg for sg in segs if sg[0] == top]
        expected += total / len(pairs) + nll * sum(-sg[1] / sg[3] for sg in best) / len(best)
    assert kwise > 0
    assert out.loss_sum.item() == pytest.approx(expected, rel=1e-5)


def test_loss_is_ln2_when_the_policy_is_the_reference(prepared_pref_dir):
    batch = pref_batch(prepared_pref_dir, n=8, seq_len=128)
    torch.manual_seed(5)
    model = Transformer(CFG)
    out = dpo_stage().loss({"policy": model, "reference": model}, batch)
    assert out.loss_sum.item() / int(out.tokens) == pytest.approx(math.log(2), abs=1e-6)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert out.metrics[key].item() == pytest.approx(0.0, abs=1e-6)
    assert out.metrics["rewards/accuracies"].item() / int(out.tokens) == pytest.approx(0.5)  # ties count half


def test_packed_left_and_right_padded_logprobs_agree(prepared_pref_dir):
    """A response's summed log-prob is the same packed with its siblings in one row, alone right-padded, and alone
    left-padded (padding is its own document; positions count real tokens)."""
    from igpt.sampling import positions_from_mask

    batch = pref_batch(prepared_pref_dir, n=4, seq_len=128)
    torch.manual_seed(6)
    model = Transformer(CFG).eval()
    with torch.no_grad():
        packed = comparisons(batch).per_segment(
            model(batch["input_ids"], position_ids=batch["position_ids"], output=TokenLogProbs(batch["labels"])))
    comp = comparisons(batch)
    pad = 1
    for i in range(comp.n):
        r = int(comp.row[i])
        keep = comp.segment_of[r] == i
        ids, labels = batch["input_ids"][r][keep], batch["labels"][r][keep]
        n = ids.numel()
        for side in ("right", "left"):
            fill = torch.full((7,), pad)
            fill_lab = torch.full((7,), -100)
            ids2 = torch.cat([ids, fill] if side == "right" else [fill, ids])[None]
            lab2 = torch.cat([labels, fill_lab] if side == "right" else [fill_lab, labels])[None]
            real = torch.zeros_like(ids2, dtype=torch.bool)
            first = 0 if side == "right" else 7
            real[0, first : first + n] = True
            with torch.no_grad():
                lp = model(ids2, position_ids=positions_from_mask(real), output=TokenLogProbs(lab2)).sum()
            assert lp.item() == pytest.approx(packed[i].item(), abs=1e-5), (i, side)


def test_precomputed_reference_equals_live_reference(prepared_pref_dir, tmp_path):
    """Same losses step for step; the precomputed run holds no reference model, stores the log-probs with the run,
    and a resumed run reuses them instead of computing them again."""
    live, pre = str(tmp_path / "live"), str(tmp_path / "pre")
    train(dpo_overrides(prepared_pref_dir, live, "trainer.max_steps=4", "trainer.eval_every=4"))
    trainer = train_and_stop(dpo_overrides(prepared_pref_dir, pre, "trainer.max_steps=4", "trainer.eval_every=4",
                                           "dpo.precompute_reference=true", "trainer.ckpt_every=2"), at_step=2)
    assert set(trainer.models) == {"policy"}  # the reference was not kept
    cache = os.path.join(pre, CACHE_DIR)
    assert sorted(os.listdir(cache)) == ["key.json", "train.safetensors", "val.safetensors"]
    stamp = os.path.getmtime(os.path.join(cache, "train.safetensors"))
    train(dpo_overrides(prepared_pref_dir, pre, "trainer.max_steps=4", "trainer.eval_every=4",
                        "dpo.precompute_reference=true", "trainer.ckpt_every=2"))
    assert os.path.getmtime(os.path.join(cache, "train.safetensors")) == stamp  # reused, not recomputed
    a, b = read_metrics(live), read_metrics(pre)
    for step in range(1, 5):
        for key in ("loss", "rewards/margins", "logps/chosen"):
            assert b[step][key] == pytest.approx(a[step][key], abs=1e-5), (step, key)
    va, vb = read_metrics(live, "val")[4], read_metrics(pre, "val")[4]
    assert vb["loss"] == pytest.approx(va["loss"], abs=1e-5) and "kl" in va and "kl" not in vb
    assert train_steps(pre) == [1, 2, 3, 4]  # the second process started after the checkpoint: no step twice


@pytest.mark.parametrize("stage", ["rm", "dpo"])
def test_resume_mid_run_equals_uninterrupted(prepared_pref_dir, tmp_path, stage):
    overrides = dpo_overrides if stage == "dpo" else None
    if overrides is None:
        from tests.test_rm import rm_overrides as overrides
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    train(overrides(prepared_pref_dir, full, "trainer.max_steps=6"))
    # a checkpoint at 3, one more step, then the stop's own checkpoint at 4
    train_and_stop(overrides(prepared_pref_dir, part, "trainer.max_steps=6", "trainer.ckpt_every=3"), at_step=4)
    assert json.load(open(os.path.join(part, "preempted")))["step"] == 4
    train(overrides(prepared_pref_dir, part, "trainer.max_steps=6", "trainer.ckpt_every=3"))
    assert train_steps(part) == [1, 2, 3, 4, 5, 6]  # resumed from step 4's checkpoint, not restarted
    ref, got = read_metrics(full), read_metrics(part)
    for step in range(1, 7):
        assert got[step]["loss"] == ref[step]["loss"], step
        assert got[step]["grad_norm"] == ref[step]["grad_norm"], step


def test_dpo_learns_the_synthetic_preference(prepared_pref_dir, tmp_path):
    """Held-out preference accuracy of the implicit reward: 0.5 when the policy is the reference, >= 0.9 after
    training; the chosen responses' log-probabilities do not collapse."""
    run = str(tmp_path / "dpo")
    train(dpo_overrides(prepared_pref_dir, run, "trainer.max_steps=50", "trainer.eval_every=50",
                        "trainer.eval_at_start=true", "dpo.beta=0.1"))
    val = read_metrics(run, "val")
    assert val[0]["rewards/accuracies"] == 0.5 and val[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert val[50]["rewards/accuracies"] >= 0.9, val[50]
    assert val[50]["logps/chosen"] > val[0]["logps/chosen"] - 0.25 * abs(val[0]["logps/chosen"]), (val[0], val[50])
    assert val[50]["kl"] > 0
    keys = {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
            "logps/rejected"}
    assert keys <= set(val[50]) and keys <= set(read_metrics(run)[50])
