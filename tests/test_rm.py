"""The reward-model stage (igpt/stages/rm.py, igpt/stages/pref.py): the Bradley-Terry loss against its formula,
K-wise comparisons, where the reward is read, export to transformers, learning and the stored normalisation."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from igpt.config import Config, ModelConfig, StageConfig
from igpt.data.loader import ShardLoader
from igpt.model import Transformer
from igpt.stages import build_stage
from igpt.stages.pref import comparisons
from igpt.stages.rm import score
from tests.conftest import TINY
from tests.trainutil import read_metrics, train

CFG = ModelConfig(vocab_size=384, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=64, max_seq_len=64)
IM_END = 3
SEQ_128 = ["model.max_seq_len=128", "trainer.seq_len=128"]  # a K = 3 record of the synthetic data fits whole


def rm_stage():
    return build_stage(Config(stage=StageConfig(name="rm")))


def pref_batch(data_dir: str, n: int = 8, seq_len: int = 64) -> dict[str, torch.Tensor]:
    loader = ShardLoader(data_dir, "train", seq_len=seq_len, global_batch_size=n, num_partitions=n, seed=0)
    return next(iter(loader))


def rm_overrides(data_dir: str, run_dir: str, *extra: str) -> list[str]:
    return [
        "+stage=rm", f"data.dir={data_dir}", f"run_dir={run_dir}", *TINY, *SEQ_128, "trainer.global_batch_size=16",
        "trainer.micro_batch_size=8", "trainer.eval_every=0", "trainer.ckpt_every=0", "trainer.progress=false",
        "logger.wandb.mode=disabled", "optim.warmup_steps=5", "optim.lr=3e-3", *extra,
    ]


def test_loss_is_ln2_with_a_zero_head(prepared_pref_dir):
    """A zero head scores every response 0: with margins at 0 each comparison costs -log sigmoid(0) = ln 2."""
    batch = pref_batch(prepared_pref_dir)
    batch["margin"] = torch.zeros_like(batch["margin"])
    torch.manual_seed(0)
    model = Transformer(CFG, head="scalar")
    torch.nn.init.zeros_(model.score.weight)
    stage = rm_stage()
    out = stage.loss({"reward": model}, batch)
    assert int(stage.count(batch)) == int(out.tokens) == 8
    assert out.loss_sum.item() / 8 == pytest.approx(math.log(2), abs=1e-7)
    assert float(out.metrics["accuracy"]) == 0.0 and float(out.metrics["margin"]) == 0.0
    # a non-zero head changes it: the check above is not vacuous
    torch.nn.init.normal_(model.score.weight, std=1.0)
    assert abs(stage.loss({"reward": model}, batch).loss_sum.item() / 8 - math.log(2)) > 1e-3


class FixedValues:
    """A stand-in model returning given per-position values (B, S)."""

    def __init__(self, values: torch.Tensor) -> None:
        self.values = values

    def __call__(self, input_ids, position_ids=None, **_):
        return self.values


def test_kwise_loss_is_the_mean_over_its_pairs(prepared_pref_dir):
    """Every record contributes the mean of -log sigmoid(r_w - r_l - margin) over its C(K, 2) untied pairs."""
    batch = pref_batch(prepared_pref_dir, n=16)
    torch.manual_seed(1)
    values = torch.randn(batch["input_ids"].shape)
    out = rm_stage().loss({"reward": FixedValues(values)}, batch)
    expected, records, kwise = 0.0, 0, 0
    for row in range(16):
        rank, pos = batch["seq_rank"][row].tolist(), batch["position_ids"][row].tolist()
        segs = []  # (rank, reward at the segment's last token), by plain loops
        for t in range(64):
            if rank[t] < 0:
                continue
            if pos[t] == 0:
                segs.append([rank[t], None])
            segs[-1][1] = float(values[row, t])
        margin = float(batch["margin"][row, 0])
        pairs = [(a[1], b[1]) for a in segs for b in segs if a[0] < b[0]]
        if pairs:
            records += 1
            kwise += len(segs) > 2
            expected += sum(-F.logsigmoid(torch.tensor(w - lo - margin)).item() for w, lo in pairs) / len(pairs)
    assert kwise > 0, "the batch should hold K-wise records"
    assert int(out.tokens) == records
    assert float(out.loss_sum) == pytest.approx(expected, rel=1e-6)


def test_last_token_index_under_padding_and_truncation(tmp_path, tokenizer_file):
    """The reward is read at each response's <|im_end|>; at the last kept token when a response is cut to fit; and a
    sequence scores the same left-padded, right-padded and alone."""
    from igpt.data.prepare import prepare

    records = [
        {"prompt": "Of the king?", "chosen": "The king is old.", "rejected": "No."},
        {"prompt": "Of the crown?", "responses": ["Gold.", "The crown is heavy and old and fair.", "Iron."],
         "ranking": [0, 1, 2]},
    ]
    src = tmp_path / "p.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    prepare(str(src), str(tmp_path / "d"), tokenizer_file, kind="pref", val_fraction=0, num_workers=1,
            progress=False)
    from igpt.data.partition import Shard, read_index

    index = read_index(str(tmp_path / "d"), "train")
    shard = Shard(index.shards[0], "pref", index.dtype, index.vocab_size)
    lens = [shard.get(i)[2].tolist() for i in range(2)]
    kwise = max(lens, key=len)
    assert len(kwise) == 3 and max(sum(x) for x in lens) == sum(kwise)
    # 2 tokens short: only the longest response of the K-wise record loses its last 2 tokens (its <|im_end|>)
    for seq_len, cut in ((128, False), (sum(kwise) - 2, True)):
        loader = ShardLoader(str(tmp_path / "d"), "train", seq_len=seq_len, global_batch_size=2, num_partitions=2,
                             seed=0, shuffle=False)
        batch = next(iter(loader))
        comp = comparisons(batch)
        ids, pos = batch["input_ids"], batch["position_ids"]
        assert comp.n == 5
        for i in range(comp.n):
            r, e = int(comp.row[i]), int(comp.end[i])
            assert batch["seq_rank"][r, e] >= 0  # a real token of the segment
            assert e == seq_len - 1 or pos[r, e + 1] == 0  # the segment ends there
            if not cut:
                assert int(ids[r, e]) == IM_END
        if cut:  # the longest response lost its end: it is read at its last kept token instead
            assert sum(int(ids[int(comp.row[i]), int(comp.end[i])]) != IM_END for i in range(comp.n)) == 1
    torch.manual_seed(2)
    model = Transformer(CFG, head="scalar").eval()
    seq = torch.randint(7, 384, (9,))
    right = torch.cat([seq, torch.ones(4, dtype=torch.long)])[None]
    left = torch.cat([torch.ones(4, dtype=torch.long), seq])[None]
    real_r, real_l = right != 1, left != 1
    alone = score(model, seq[None], torch.ones(1, 9, dtype=torch.bool))
    assert torch.allclose(score(model, right, real_r), alone, atol=1e-5)
    assert torch.allclose(score(model, left, real_l), alone, atol=1e-5)


def test_export_reward_model_matches_transformers(tmp_path, tokenizer_file):
    transformers = pytest.importorskip("transformers")
    from igpt.export import main as export_main
    from tests.test_generate import write_checkpoint

    torch.manual_seed(3)
    model = Transformer(CFG, head="scalar").eval()
    write_checkpoint(str(tmp_path / "run"), model, tokenizer_file, stage="rm")
    assert export_main([f"checkpoint={tmp_path / 'run'}", f"output={tmp_path / 'hf'}"]) == 0
    config = json.load(open(tmp_path / "hf" / "config.json"))
    assert config["architectures"] == ["LlamaForSequenceClassification"] and config["num_labels"] == 1
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "hf")).eval()
    assert type(hf).__name__ == "LlamaForSequenceClassification"
    ids = torch.randint(7, 384, (3, 12))
    ids[1, 8:] = config["pad_token_id"]  # right padding: HF reads the last non-padding token, as igpt does
    with torch.no_grad():
        got = hf(ids).logits[:, 0]
    want = score(model, ids, ids != config["pad_token_id"])
    assert torch.allclose(got, want, atol=1e-4), (got, want)
    # the exported folder is a reward model igpt reads back (reward.model=<folder>): same scores
    from igpt.checkpoint import load_model

    back, _, _ = load_model(str(tmp_path / "hf"))
    assert back.head == "scalar" and torch.allclose(score(back, ids, ids != config["pad_token_id"]), want, atol=1e-5)


def test_rm_learns_the_synthetic_preference_and_stores_its_normalisation(prepared_pref_dir, tmp_path):
    """From scratch, on held-out pairs of a learnable rule: ~0.5 at the start, >= 0.95 after training; the stored
    normalisation makes the preferred train responses score 0 on average when the model is loaded."""
    from igpt.checkpoint import load_model, read_meta, resolve

    run = str(tmp_path / "rm")
    train(rm_overrides(prepared_pref_dir, run, "trainer.max_steps=60", "trainer.eval_every=60",
                       "trainer.eval_at_start=true"))
    val = read_metrics(run, "val")
    assert sorted(val) == [0, 60]
    assert 0.3 < val[0]["accuracy"] < 0.7
    assert val[60]["accuracy"] >= 0.95, val[60]
    assert {"loss", "accuracy", "margin", "reward_chosen", "reward_rejected"} <= set(val[60])
    train_rec = read_metrics(run)
    assert {"accuracy", "margin", "reward_chosen", "reward_rejected"} <= set(train_rec[60])
    meta = read_meta(resolve(run))
    assert meta["stage"] == "rm" and meta["models"]["reward"]["head"] == "scalar"
    mean = meta["reward_norm"]["mean"]
    model, _, _ = load_model(run)
    assert model.value_offset == -mean and mean != 0.0
    loader = ShardLoader(prepared_pref_dir, "train", seq_len=128, global_batch_size=16, num_partitions=8, seed=0,
                         loop=False)
    chosen = []
    with torch.no_grad():
        for batch in loader:
            comp = comparisons(batch)
            r = comp.at_end(model(batch["input_ids"], position_ids=batch["position_ids"]))
            rank = batch["seq_rank"][comp.row, comp.end]
            best = np.array([batch["seq_rank"][row][batch["seq_rank"][row] >= 0].min() for row in comp.row.tolist()])
            chosen += r[torch.from_numpy(rank.numpy() == best)].tolist()
    assert abs(np.mean(chosen)) < 1e-3 * max(1.0, abs(mean)), (np.mean(chosen), mean)


def test_rm_starts_from_an_lm_checkpoint_with_a_new_head(prepared_text_dir, prepared_pref_dir, tmp_path):
    from igpt.checkpoint import read_model_state, resolve
    from tests.trainutil import make_trainer

    pre = str(tmp_path / "pre")
    train(["+stage=pretrain", f"data.dir={prepared_text_dir}", f"run_dir={pre}", *TINY, *SEQ_128, "trainer.max_steps=1",
           "trainer.global_batch_size=8", "trainer.micro_batch_size=8", "trainer.progress=false",
           "logger.wandb.mode=disabled", "trainer.sample_every_eval=false", "trainer.eval_batches=1"])
    trainer = make_trainer(rm_overrides(prepared_pref_dir, str(tmp_path / "rm"), f"init_from={pre}"))
    try:
        body = read_model_state(resolve(pre))
        state = trainer.models["reward"].module.state_dict()
        assert "lm_head.weight" not in state and "score.weight" in state
        for k, v in state.items():
            if k != "score.weight":
                assert torch.equal(v, body[k]), k
        std = float(state["score.weight"].std())
        assert std == pytest.approx(1 / math.sqrt(64 + 1), rel=0.3)  # N(0, 1/(d+1)), d = 64
    finally:
        trainer.close()
    # a policy cannot start from a reward model
    rm_run = str(tmp_path / "rm2")
    train(rm_overrides(prepared_pref_dir, rm_run, "trainer.max_steps=1"))
    with pytest.raises(ValueError, match="init_from=.*holds a model with a scalar head"):
        make_trainer([o.replace("+stage=rm", "+stage=dpo") for o in rm_overrides(
            prepared_pref_dir, str(tmp_path / "dpo"), f"init_from={rm_run}")])
    assert not os.path.exists(os.path.join(tmp_path, "dpo", "metrics.jsonl"))
