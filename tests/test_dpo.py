"""The DPO stage (igpt/stages/dpo.py): each loss against its formula, log-probs in every batch layout, the reference
precomputed or live, resume, and learning a preference."""

from __future__ import annotations

import json
import math
import os
import re

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


@pytest.mark.parametrize("loss", ["sigmoid", "ipo", "hinge", "simpo", "orpo"])
def test_stage_loss_on_fixed_logprobs_with_kwise_records(prepared_pref_dir, loss):
    """Through the stage: sums over each response, IPO per token, every record the mean of its pairs, and the NLL
    term (dpo.nll_weight) once per record on its best-ranked response only."""
    batch = pref_batch(prepared_pref_dir, n=16, seq_len=128)
    torch.manual_seed(4)
    pi, ref = -torch.rand(batch["input_ids"].shape) * 3, -torch.rand(batch["input_ids"].shape) * 3
    beta, nll, gamma = 0.2, 0.5, 0.3
    free = loss in ("simpo", "orpo")  # reference-free: the stage is given no reference and must not ask for one
    models = {"policy": FixedLogProbs(pi)} if free else {"policy": FixedLogProbs(pi), "reference": FixedLogProbs(ref)}
    out = dpo_stage(beta=beta, loss=loss, nll_weight=nll, simpo_gamma=gamma).loss(models, batch)
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
            aw, al = w[1] / w[3], lo[1] / lo[3]  # mean token log-probs (SimPO, ORPO)
            if free:
                odds = (aw - math.log(1 - math.exp(aw))) - (al - math.log(1 - math.exp(al)))
                per = {"simpo": -math.log(1 / (1 + math.exp(-(beta * (aw - al) - gamma)))),
                       "orpo": -beta * math.log(1 / (1 + math.exp(-odds)))}[loss]
                total += per
                continue
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
        weight = nll + (1.0 if loss == "orpo" else 0.0)  # ORPO's own SFT term: the best response's mean NLL
        expected += total / len(pairs) + weight * sum(-sg[1] / sg[3] for sg in best) / len(best)
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


# ---------------------------------------------------------------------------------------------------- SimPO, ORPO, KTO
def test_simpo_orpo_and_kto_losses_equal_their_formulas():
    """On fixed mean token log-probs (SimPO, ORPO) and log-ratios (KTO), written out by hand."""
    from igpt.stages.dpo import kto_loss, orpo_odds_loss, simpo_loss

    aw = torch.tensor([-0.5, -2.0, -1.0, -0.1])  # mean token log-prob of the preferred response
    al = torch.tensor([-1.5, -1.0, -1.0, -3.0])
    beta, gamma, eps = 2.0, 0.5, 0.1
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    for i in range(4):
        w, lo = float(aw[i]), float(al[i])
        x = beta * (w - lo) - gamma
        want = -(1 - eps) * math.log(sig(x)) - eps * math.log(sig(-x))
        assert simpo_loss(aw, al, beta, gamma, eps)[i].item() == pytest.approx(want, rel=1e-6)
        odds = lambda a: math.log(math.exp(a) / (1 - math.exp(a)))  # noqa: E731
        want = -0.1 * math.log(sig(odds(w) - odds(lo)))
        assert orpo_odds_loss(aw, al, 0.1)[i].item() == pytest.approx(want, rel=1e-5)
    r = torch.tensor([0.3, -0.2, 1.0, -1.5])  # log pi - log ref of unpaired completions
    good = torch.tensor([True, True, False, False])
    z, lam_d, lam_u = 0.25, 1.5, 0.7
    got = kto_loss(r, good, z, beta, lam_d, lam_u)
    want = [lam_d * (1 - sig(beta * (0.3 - z))), lam_d * (1 - sig(beta * (-0.2 - z))),
            lam_u * (1 - sig(beta * (z - 1.0))), lam_u * (1 - sig(beta * (z + 1.5)))]
    assert got.tolist() == pytest.approx(want, rel=1e-6)


def _hand_batch(ranks: list[list[int]], seg_len: int = 3, s: int = 12) -> dict[str, torch.Tensor]:
    """Rows of segments of ``seg_len`` tokens with the given ranks (the last token of each a loss token), padded."""
    b = len(ranks)
    pos = torch.zeros(b, s, dtype=torch.long)
    rank = torch.full((b, s), -1, dtype=torch.long)
    labels = torch.full((b, s), -100, dtype=torch.long)
    for r, row in enumerate(ranks):
        for j, k in enumerate(row):
            cols = slice(j * seg_len, (j + 1) * seg_len)
            pos[r, cols] = torch.arange(seg_len)
            rank[r, cols] = k
            labels[r, (j + 1) * seg_len - 2 : (j + 1) * seg_len] = 5
    return {"input_ids": torch.full((b, s), 5), "position_ids": pos, "seq_rank": rank, "labels": labels}


def test_ties_in_kwise_records_spread_the_record_weight_over_its_untied_pairs():
    """Ranking [0, 0, 1]: the two tied best give no pair; the record's weight 1 goes to its 2 untied pairs (1/2 each,
    not 1/C(3, 2) = 1/3), so every record weighs the same. The NLL term (best_weight) is shared by the tied best."""
    comp = comparisons(_hand_batch([[0, 0, 1], [0, 1, 2], [0, 1], [1, 1]]))
    pairs = sorted(zip(comp.row[comp.better].tolist(), comp.better.tolist(), comp.worse.tolist(), comp.weight.tolist()))
    want = [(0, 0, 2, 0.5), (0, 1, 2, 0.5), (1, 3, 4, 1 / 3), (1, 3, 5, 1 / 3), (1, 4, 5, 1 / 3), (2, 6, 7, 1.0)]
    assert [p[:3] for p in pairs] == [w[:3] for w in want]
    assert [p[3] for p in pairs] == pytest.approx([w[3] for w in want])
    assert comp.records == 3  # the all-tied record has nothing to learn
    assert comp.best_weight.tolist() == pytest.approx([0.5, 0.5, 0, 1, 0, 0, 1, 0, 0, 0])
    # through the loss: every record the mean of its pairs' losses
    assert comp.weighted_sum(torch.ones(6)).item() == pytest.approx(3.0)  # three records, each weighing 1 in total


def test_reference_free_losses_build_no_reference(prepared_pref_dir, tmp_path):
    from igpt.errors import ConfigError
    from tests.trainutil import make_trainer

    for loss in ("simpo", "orpo"):
        assert [s.role for s in dpo_stage(loss=loss).models()] == ["policy"]
    assert [s.role for s in dpo_stage(loss="kto").models()] == ["policy", "reference"]
    trainer = make_trainer(dpo_overrides(prepared_pref_dir, str(tmp_path / "r"), "dpo.loss=simpo",
                                         "trainer.max_steps=1"))
    try:
        assert set(trainer.models) == {"policy"}
        out = trainer.train_step(next(iter(trainer.train_loader)))
        assert math.isfinite(out.loss)
    finally:
        trainer.close()
    with pytest.raises(ConfigError, match="dpo.precompute_reference is set, but dpo.loss=orpo uses no reference"):
        make_trainer(dpo_overrides(prepared_pref_dir, str(tmp_path / "b"), "dpo.loss=orpo",
                                   "dpo.precompute_reference=true"))


def _kto_records(n: int, seed: int) -> list[dict]:
    """Unpaired examples from synthetic pairs: the chosen response labelled true, the rejected one false."""
    from igpt.data.prefs import synthetic_records

    out = []
    for rec in synthetic_records(n, 2, seed):
        out.append({"prompt": rec["prompt"], "completion": rec["chosen"], "label": True})
        out.append({"prompt": rec["prompt"], "completion": rec["rejected"], "label": False})
    return out


@pytest.fixture(scope="module")
def prepared_kto_dir(tmp_path_factory, tokenizer_file) -> str:
    from igpt.data.prepare import prepare

    root = tmp_path_factory.mktemp("kto")
    src = root / "kto.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in _kto_records(500, seed=11)))
    prepare(str(src), str(root / "prepared"), tokenizer_file, kind="kto", val_fraction=0.1, num_workers=1,
            progress=False)
    return str(root / "prepared")


def test_kto_data_kind_and_its_errors(prepared_kto_dir, tmp_path, tokenizer_file):
    """kind=kto: one sequence per row, rank 0 for a desirable completion and 1 for an undesirable one, its response
    tokens under the loss mask; malformed records name the file and line."""
    from igpt.data.loader import ShardLoader
    from igpt.data.prepare import prepare
    from igpt.errors import DataError

    with open(os.path.join(prepared_kto_dir, "index.json")) as f:
        assert json.load(f)["kind"] == "kto"
    batch = next(iter(ShardLoader(prepared_kto_dir, "train", seq_len=64, global_batch_size=16, num_partitions=1)))
    comp = comparisons(batch)
    assert comp.n == 16 and comp.better.numel() == 0  # one example per row, no pairs
    assert set(comp.rank.tolist()) == {0, 1}
    assert (comp.per_segment((batch["labels"] != -100).float()) > 0).all()
    assert int(dpo_stage(loss="kto").count(batch)) == 16
    for bad, msg in (({"prompt": "Hi", "completion": "Hello."}, "missing key 'label'"),
                     ({"prompt": "Hi", "completion": "Hello.", "label": "yes"}, "'label' must be true"),
                     ({"prompt": "Hi", "label": True}, "missing key 'completion'")):
        src = tmp_path / "bad.jsonl"
        src.write_text(json.dumps({"prompt": "Hi", "completion": "Hello.", "label": True}) + "\n" + json.dumps(bad)
                       + "\n")
        with pytest.raises(DataError, match=rf"bad.jsonl:2.*{re.escape(msg)}"):
            prepare(str(src), str(tmp_path / "out"), tokenizer_file, kind="kto", val_fraction=0, num_workers=1,
                    progress=False, overwrite=True)


def test_kto_stage_loss_on_fixed_logprobs(prepared_kto_dir):
    """Through the stage: summed log-ratios per example, the reference point z = max(0, mean log-ratio) (detached),
    desirable and undesirable examples weighted, the mean over examples."""
    from igpt.data.loader import ShardLoader

    batch = next(iter(ShardLoader(prepared_kto_dir, "train", seq_len=64, global_batch_size=8, num_partitions=1)))
    torch.manual_seed(3)
    pi = (-torch.rand(batch["input_ids"].shape) * 3).requires_grad_()
    ref = -torch.rand(batch["input_ids"].shape) * 3
    beta, lam_d, lam_u = 0.5, 1.2, 0.8
    out = dpo_stage(loss="kto", beta=beta, kto_desirable_weight=lam_d, kto_undesirable_weight=lam_u).loss(
        {"policy": FixedLogProbs(pi), "reference": FixedLogProbs(ref)}, batch)
    ratios, labels = [], []
    for row in range(8):
        keep = batch["labels"][row] != -100
        ratios.append(float((pi.detach()[row][keep] - ref[row][keep]).sum()))
        labels.append(int(batch["seq_rank"][row][keep][0]) == 0)
    z = max(0.0, sum(ratios) / 8)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    want = sum(lam_d * (1 - sig(beta * (r - z))) if good else lam_u * (1 - sig(beta * (z - r)))
               for r, good in zip(ratios, labels))
    assert int(out.tokens) == 8 and 0 < sum(labels) < 8
    assert out.loss_sum.item() == pytest.approx(want, rel=1e-5)
    assert out.metrics["kl"].item() == pytest.approx(8 * z, rel=1e-5)
    out.loss_sum.backward()  # z is a constant: the gradient of example i's loss is through its own log-ratio only
    keep = batch["labels"][0] != -100
    r0, good0 = ratios[0], labels[0]
    s0 = sig(beta * (r0 - z)) if good0 else sig(beta * (z - r0))
    g0 = (lam_d if good0 else -lam_u) * -beta * s0 * (1 - s0)
    assert torch.allclose(pi.grad[0][keep], torch.full_like(pi.grad[0][keep], g0), rtol=1e-4)


@pytest.fixture(scope="module")
def init_run(prepared_text_dir, tmp_path_factory) -> str:
    """A starting checkpoint (one pretraining step), so a run's reference can be loaded back after it."""
    run = str(tmp_path_factory.mktemp("init") / "run")
    train(["+stage=pretrain", f"data.dir={prepared_text_dir}", f"run_dir={run}", *TINY, *SEQ_128,
           "trainer.max_steps=1", "trainer.global_batch_size=4", "trainer.micro_batch_size=4", "trainer.eval_every=0",
           "trainer.progress=false", "logger.wandb.mode=disabled", "trainer.sample_every_eval=false"])
    return run


def _pairwise_accuracy(policy, reference, data_dir: str, split: str = "val", batches: int = 4) -> float:
    """Held-out preference accuracy of the implicit reward beta (log pi - log ref) over ``split``'s first records."""
    from igpt.data.loader import ShardLoader

    right = records = 0.0
    stage = dpo_stage()
    with torch.no_grad():
        loader = ShardLoader(data_dir, split, seq_len=128, global_batch_size=16, num_partitions=1, loop=False)
        for _, batch in zip(range(batches), loader):
            out = stage.loss({"policy": policy, "reference": reference}, batch)
            right += out.metrics["rewards/accuracies"].item()
            records += int(out.tokens)
    return right / records


@pytest.mark.parametrize("loss", ["simpo", "orpo", "kto"])
def test_simpo_orpo_kto_learn_the_synthetic_preference(prepared_pref_dir, prepared_kto_dir, init_run, tmp_path, loss):
    """Each loss raises held-out preference accuracy on the synthetic pairs: SimPO and ORPO their own (mean token
    log-prob) ranking of the val records; KTO, trained on unpaired examples from other records, the implicit reward's
    ranking of the pref val split, against its reference."""
    from igpt.checkpoint import load_model

    run = str(tmp_path / loss)
    steps = 20 if loss == "kto" else 15
    # KTO's rows hold one example (half a pair) and are short: twice the rows, at seq_len 64
    extra = {"simpo": ["dpo.beta=2.0", "dpo.simpo_gamma=0.5", "trainer.global_batch_size=8", "optim.lr=5e-3"],
             "orpo": ["dpo.beta=1.0", "trainer.global_batch_size=8", "optim.lr=5e-3"],
             "kto": [f"data.dir={prepared_kto_dir}", "dpo.beta=0.1", "trainer.seq_len=64"]}[loss]
    train(dpo_overrides(prepared_pref_dir, run, f"init_from={init_run}", f"trainer.max_steps={steps}",
                        f"trainer.eval_every={steps}", "trainer.eval_at_start=true", "trainer.eval_batches=6",
                        f"dpo.loss={loss}", *extra))
    val = read_metrics(run, "val")
    if loss == "kto":
        policy, _, _ = load_model(run)
        reference, _, _ = load_model(init_run)
        before = _pairwise_accuracy(reference, reference, prepared_pref_dir)
        after = _pairwise_accuracy(policy, reference, prepared_pref_dir)
        assert before == pytest.approx(0.5, abs=1e-6) and after >= 0.8, (before, after)
        assert val[steps]["rewards/accuracies"] > val[0]["rewards/accuracies"] + 0.2, val  # its own labels too
    else:
        before, after = val[0]["rewards/accuracies"], val[steps]["rewards/accuracies"]
        assert after >= 0.8 and after > before + 0.2, (before, after)
        assert "kl" not in val[steps]  # no reference model to measure against
