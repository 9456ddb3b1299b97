"""The trainer: exact resume, batch arithmetic, config errors, bits per byte, LR schedules, NaN handling, W&B."""

from __future__ import annotations

import glob
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import yaml

from igpt.config import OptimConfig, validate
from igpt.schedule import lr_at
from igpt.stages.context import StepResult
from tests.conftest import REPO, TINY
from tests.trainutil import compose_config, make_trainer, read_metrics, train, train_and_stop, train_steps


def base(data_dir: str, run_dir: str, *extra: str) -> list[str]:
    return [
        "+stage=pretrain", f"data.dir={data_dir}", f"run_dir={run_dir}", *TINY, "trainer.global_batch_size=8",
        "trainer.micro_batch_size=4", "trainer.eval_every=0", "trainer.ckpt_every=4", "trainer.progress=false",
        "trainer.sample_every_eval=false", "logger.wandb.mode=disabled", "optim.warmup_steps=2", "optim.lr=3e-3",
        "trainer.eval_batches=2", *extra,
    ]


def test_resume_equals_uninterrupted_run(prepared_text_dir, tmp_path):
    """Stop mid-run (the preemption path), resume with resume=auto: every later loss is bit-identical."""
    full = str(tmp_path / "full")
    train(base(prepared_text_dir, full, "trainer.max_steps=10"))
    ref = read_metrics(full)

    part = str(tmp_path / "part")
    train_and_stop(base(prepared_text_dir, part, "trainer.max_steps=10"), at_step=6)  # mid-way between checkpoints
    assert json.load(open(os.path.join(part, "preempted")))["step"] == 6
    assert sorted(read_metrics(part)) == list(range(1, 7))

    train(base(prepared_text_dir, part, "trainer.max_steps=10"))
    resumed = read_metrics(part)
    assert train_steps(part) == list(range(1, 11))  # the second run began after step 6: no step logged twice
    assert not os.path.exists(os.path.join(part, "preempted"))
    assert sorted(resumed) == list(range(1, 11))
    for step in range(1, 11):
        assert resumed[step]["loss"] == ref[step]["loss"], step  # exact: fp32, one process, same machine
        assert resumed[step]["grad_norm"] == ref[step]["grad_norm"], step
    latest = open(os.path.join(part, "checkpoints", "latest")).read().strip()
    assert latest == "step_0000010"


def test_loss_decreases_and_eval_reports_bpb(prepared_text_dir, tmp_path):
    run_dir = str(tmp_path / "r")
    result = train(base(prepared_text_dir, run_dir, "trainer.max_steps=30", "trainer.eval_every=15",
                        "trainer.eval_batches=0"))
    train_m = read_metrics(run_dir)
    assert train_m[30]["loss"] < train_m[1]["loss"] - 0.5
    vals = read_metrics(run_dir, "val")
    assert sorted(vals) == [15, 30]
    assert vals[30]["loss"] < vals[15]["loss"]
    # bpb = nats / ln 2 / bytes, the bytes being exactly those of the evaluated target tokens: counted here by decoding
    # every target of the whole val split on its own (the text is ASCII, so each token's bytes stand alone)
    from igpt.data.loader import ShardLoader
    from igpt.data.tokenizer import load_tokenizer

    tok = load_tokenizer(os.path.join(prepared_text_dir, "tokenizer.json"))
    ntok = nbytes = 0
    for batch in ShardLoader(prepared_text_dir, "val", seq_len=64, global_batch_size=8, loop=False, shuffle=False):
        targets = batch["labels"][batch["labels"] != -100].tolist()
        ntok += len(targets)
        nbytes += sum(len(tok.decode([t], skip_special_tokens=True).encode("utf-8")) for t in targets)
    assert result["bpb"] == pytest.approx(result["loss"] * ntok / math.log(2) / nbytes, rel=1e-9)
    index = json.load(open(os.path.join(prepared_text_dir, "index.json")))
    assert nbytes == pytest.approx(index["splits"]["val"]["bytes"], rel=0.05)  # about the split's text, as it should
    for key in ("loss", "lr", "grad_norm", "tokens", "tokens_per_s", "mfu", "peak_mem_gb", "time"):
        assert key in train_m[30], key
    assert os.path.exists(os.path.join(run_dir, "config.yaml"))


def test_batch_size_mismatch_fails_at_start(prepared_text_dir, tmp_path):
    with pytest.raises(ValueError, match=r"global_batch_size \(10\).*micro_batch_size \(4\)"):
        make_trainer(base(prepared_text_dir, str(tmp_path / "x"), "trainer.global_batch_size=10"))


@pytest.mark.parametrize(
    "override,message",
    [
        ("trainer.max_stepz=3", "trainer.max_stepz"),
        ("++trainer.bogus=1", "trainer.bogus"),
        ("trainer.max_steps=many", "trainer.max_steps"),
        ("kernels.attention=cuda_magic", "kernels.attention"),
    ],
)
def test_bad_config_fails_before_running(prepared_text_dir, tmp_path, override, message):
    run_dir = tmp_path / "never"
    proc = subprocess.run(
        [sys.executable, "igpt/train.py", *base(prepared_text_dir, str(run_dir)), override],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode != 0
    assert message in proc.stderr
    assert not (run_dir / "metrics.jsonl").exists()


def test_lr_schedules():
    cos = OptimConfig(lr=1.0, min_lr_ratio=0.1, warmup_steps=10, schedule="cosine")
    assert lr_at(0, cos, 100) == pytest.approx(0.1)
    assert lr_at(9, cos, 100) == pytest.approx(1.0)
    assert lr_at(55, cos, 100) == pytest.approx(0.55)
    assert lr_at(100, cos, 100) == pytest.approx(0.1)
    wsd = OptimConfig(lr=1.0, min_lr_ratio=0.0, warmup_steps=10, schedule="wsd", decay_fraction=0.2)
    assert lr_at(50, wsd, 100) == 1.0 and lr_at(79, wsd, 100) == 1.0
    assert lr_at(90, wsd, 100) == pytest.approx(0.5)
    assert lr_at(100, wsd, 100) == pytest.approx(0.0)


def test_lr_warmup_reaches_the_peak_exactly_at_its_last_step():
    """Linear warmup over warmup_steps steps (step s gets peak (s + 1) / warmup), then the schedule from the peak."""
    cfg = OptimConfig(lr=1.0, warmup_steps=4, min_lr_ratio=0.1, schedule="cosine")
    assert [lr_at(s, cfg, 20) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lr_at(4, cfg, 20) == pytest.approx(1.0)  # the first cosine step: still the peak
    assert lr_at(5, cfg, 20) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 16)))
    assert lr_at(20, cfg, 20) == pytest.approx(0.1)
    const = OptimConfig(lr=2.0, warmup_steps=2, schedule="constant")
    assert [lr_at(s, const, 10) for s in range(4)] == pytest.approx([1.0, 2.0, 2.0, 2.0])


def test_non_finite_loss_skips_step_then_stops(prepared_text_dir, tmp_path):
    trainer = make_trainer(base(prepared_text_dir, str(tmp_path / "nan"), "trainer.max_steps=10",
                                "trainer.max_bad_steps=3"))
    step_fn = trainer.train_step

    def poisoned(batch):
        if trainer.step >= 2:
            with torch.no_grad():  # a NaN final-norm weight makes every loss NaN
                trainer.models["policy"].module.norm.weight.fill_(float("nan"))
        return step_fn(batch)

    trainer.train_step = poisoned
    with pytest.raises(FloatingPointError, match="3 consecutive non-finite losses, the last at step 5"):
        trainer.fit()
    trainer.close()
    assert trainer.skipped_steps == 3


def _wandb_runs(run_dir: str) -> list[dict]:
    """Every offline W&B run file under ``run_dir`` (one per launch), oldest first: run record, history steps in
    order, the history by step, the model artifacts."""
    from tests.wandb_reader import read_records

    runs = []
    for path in sorted(glob.glob(os.path.join(run_dir, "wandb", "offline-run-*", "run-*.wandb"))):
        out = {"run": None, "history": {}, "steps": [], "artifacts": []}
        for rec in read_records(path):
            kind = rec.WhichOneof("record_type")
            if kind == "history":
                items = {i.key or "/".join(i.nested_key): i.value_json for i in rec.history.item}
                step = int(items["_step"])
                out["steps"].append(step)
                out["history"].setdefault(step, {}).update(items)
            elif kind == "run" and out["run"] is None:
                out["run"] = rec.run
            elif kind == "artifact" and rec.artifact.type == "model":  # (sample tables are run_table artifacts)
                out["artifacts"].append(rec.artifact)
        runs.append(out)
    return runs


@pytest.mark.integration
def test_wandb_offline_read_back(prepared_text_dir, prepared_sft_dir, tmp_path):
    """The offline W&B runs hold the numbers of metrics.jsonl; a run interrupted between checkpoints and resumed
    continues its W&B run with every step exactly once; the final checkpoint is a model artifact; an SFT run started
    from the pretraining run shares its W&B group, with job_type = stage."""
    import wandb

    run_dir = str(tmp_path / "wb")
    args = base(prepared_text_dir, run_dir, "trainer.max_steps=8", "trainer.eval_every=4", "trainer.ckpt_every=4",
                "logger.wandb.mode=offline", "trainer.sample_every_eval=true", "trainer.sample_max_new_tokens=8",
                "logger.wandb.log_model=true", "trainer.eval_at_start=true")
    trainer = make_trainer(args)
    step_fn = trainer.train_step

    def crash_at_7(batch):  # W&B has steps 1..6, the newest checkpoint is step 4
        if trainer.step == 6:
            raise RuntimeError("simulated crash")
        return step_fn(batch)

    trainer.train_step = crash_at_7
    with pytest.raises(RuntimeError, match="simulated crash"):
        trainer.fit()
    trainer.close()
    train(args)  # resumes from step 4, recomputes 5 and 6, ends at 8
    sft_dir = str(tmp_path / "sft")
    train(["+stage=sft", f"data.dir={prepared_sft_dir}", f"run_dir={sft_dir}", f"init_from={run_dir}", *TINY,
           "trainer.global_batch_size=8", "trainer.micro_batch_size=4", "trainer.max_steps=2", "trainer.eval_every=0",
           "trainer.progress=false", "trainer.sample_every_eval=false", "trainer.eval_batches=1",
           "logger.wandb.mode=offline"])  # fmt: skip
    wandb.teardown()  # the W&B service flushes its offline logs when it stops (at process exit in a real run)

    first, resumed = _wandb_runs(run_dir)
    assert first["run"].run_id == resumed["run"].run_id  # one W&B run, continued
    assert first["run"].run_group == resumed["run"].run_group == "wb" and first["run"].job_type == "pretrain"
    config = {i.key: json.loads(i.value_json) for i in resumed["run"].config.update}
    assert config["trainer"]["max_steps"] == 8 and config["model"]["dim"] == 64
    # every step once across both launches: W&B keeps steps 5 and 6 from the first, the resumed run adds 7 and 8;
    # step 0 is trainer.eval_at_start's evaluation (W&B once dropped it)
    assert first["steps"] == list(range(0, 7)) and resumed["steps"] == [7, 8]
    assert float(first["history"][0]["eval/bpb"]) == pytest.approx(read_metrics(run_dir, "val")[0]["bpb"], rel=1e-9)
    history = {**first["history"], **resumed["history"]}
    ref = read_metrics(run_dir)  # the last record per step: the resumed run's, equal to the first's (exact resume)
    for step in range(1, 9):
        assert float(history[step]["train/loss"]) == pytest.approx(ref[step]["loss"], rel=1e-9), step
        assert "perf/tokens_per_s" in history[step] and "sys/peak_mem_gb" in history[step]
    for step in (4, 8):
        assert float(history[step]["eval/bpb"]) == pytest.approx(read_metrics(run_dir, "val")[step]["bpb"], rel=1e-9)
    assert int(history[8]["eval/samples/nrows"]) == 2  # one row per sample prompt
    assert not first["artifacts"]
    (artifact,) = resumed["artifacts"]
    assert artifact.type == "model" and artifact.name == f"model-{resumed['run'].run_id}"
    files = {entry.path for entry in artifact.manifest.contents}
    assert {"meta.json", "model.safetensors", "train_state.pt"} <= files
    assert json.loads(artifact.metadata)["step"] == 8

    (sft,) = _wandb_runs(sft_dir)
    assert sft["run"].run_group == "wb" and sft["run"].job_type == "sft"
    assert sft["run"].run_id != first["run"].run_id


def test_compose_defaults():
    from igpt.config import validate

    cfg = validate(compose_config(["+stage=sft", "data.dir=/d"]))
    assert cfg.stage.kind == "sft" and cfg.strategy.name == "single" and cfg.model.name == "tiny"
    with pytest.raises(ValueError, match="stage.kind"):
        validate(compose_config(["+stage=sft", "data.dir=/d", "stage.kind=text"]))


def test_sft_loss_ignores_prompt_tokens(prepared_sft_dir):
    """SFT labels cover exactly the assistant tokens; what stands at prompt positions never reaches loss or grads."""
    from igpt.config import Config, ModelConfig, StageConfig
    from igpt.data.loader import ShardLoader
    from igpt.model import Transformer
    from igpt.stages import build_stage

    loader = ShardLoader(prepared_sft_dir, "train", seq_len=64, global_batch_size=8, num_partitions=2, seed=0)
    batch = next(iter(loader))
    ids, labels = batch["input_ids"], batch["labels"]
    # the loss positions are exactly the assistant spans: every target there is assistant content or <|im_end|>,
    # and no target is a role header, a user/system token or padding
    assert (labels != -100).any() and (labels == -100).any()
    im_end, user, assistant = 3, 5, 6
    targets = labels[labels != -100]
    assert not torch.isin(targets, torch.tensor([0, 1, 2, user, assistant])).any()
    assert (targets == im_end).sum() > 0

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=384, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=64,
                                    max_seq_len=64))
    stage = build_stage(Config(stage=StageConfig(name="sft")))

    def loss_and_grads(labels_: torch.Tensor):
        model.zero_grad()
        out = stage.loss({"policy": model}, {**batch, "labels": labels_})
        (out.loss_sum / out.tokens).backward()
        return out.loss_sum.item(), [p.grad.clone() for p in model.parameters()]

    loss_a, grads_a = loss_and_grads(labels)
    # reference: cross-entropy of the full logits over exactly the assistant positions
    with torch.no_grad():
        logits = model(ids, position_ids=batch["position_ids"])
    keep = labels != -100
    ref = torch.nn.functional.cross_entropy(logits[keep].double(), labels[keep], reduction="sum")
    assert loss_a == pytest.approx(ref.item(), rel=1e-5)
    # prompt positions filled with targets (the real next tokens or random ids, as an unmasked pipeline would have
    # them) would change the loss: the -100s are what keeps the prompt out
    prompt = labels == -100
    for filler in (torch.roll(ids, -1, dims=1), torch.randint(0, 384, ids.shape)):
        assert loss_and_grads(torch.where(prompt, filler, labels))[0] != loss_a
    # the comparisons above are meaningful: the same labels give bit-identical loss and gradients
    loss_b, grads_b = loss_and_grads(labels.clone())
    assert loss_b == loss_a and all(torch.equal(a, b) for a, b in zip(grads_a, grads_b))
    # and a change at an assistant position does change the loss
    changed = labels.clone()
    pos = (labels != -100).nonzero()[0]
    changed[pos[0], pos[1]] = (labels[pos[0], pos[1]] + 1) % 384
    assert loss_and_grads(changed)[0] != loss_a


def test_sft_from_pretrained_checkpoint(prepared_text_dir, prepared_sft_dir, tmp_path):
    """init_from loads the pretrained weights; SFT then trains on the chat data and its checkpoint says stage sft."""
    pre = str(tmp_path / "pre")
    train(base(prepared_text_dir, pre, "trainer.max_steps=4"))
    sft = str(tmp_path / "sft")
    overrides = [o.replace("+stage=pretrain", "+stage=sft").replace(prepared_text_dir, prepared_sft_dir)
                 for o in base(prepared_text_dir, sft, "trainer.max_steps=3", f"init_from={pre}",
                               "data.num_partitions=2")]
    trainer = make_trainer(overrides)
    from igpt.checkpoint import read_model_state, resolve

    pre_state = read_model_state(resolve(pre))
    for k, v in trainer.models["policy"].module.state_dict().items():
        assert torch.equal(v, pre_state[k]), k
    trainer.fit()
    trainer.close()
    meta = json.load(open(os.path.join(sft, "checkpoints", "step_0000003", "meta.json")))
    assert meta["stage"] == "sft"
    with pytest.raises(ValueError, match="model.dim"):
        make_trainer([*overrides[:-1], "model.dim=96", "model.n_heads=4", f"run_dir={tmp_path / 'bad'}"])
    # without model.* keys the model is the source's (dim 64), and the run's config stays the config given (the tiny
    # defaults): the resolved architecture is a value, written to config.yaml and the checkpoints, never into cfg
    plain = [o for o in overrides if not o.startswith("model.")] + [f"run_dir={tmp_path / 'plain'}"]
    trainer = make_trainer(plain)
    try:
        assert trainer.ctx.model_cfg.dim == 64 and trainer.models["policy"].module.cfg.dim == 64
        assert trainer.cfg.model.dim == 128 and trainer.cfg.model == validate(compose_config(plain)).model
        written = yaml.safe_load(open(tmp_path / "plain" / "config.yaml"))
        assert written["model"]["dim"] == 64
    finally:
        trainer.close()


def test_activation_checkpointing_same_losses_and_plain_checkpoint(prepared_text_dir, tmp_path):
    """Recomputing blocks in backward changes memory, not numbers; the checkpoint keeps the plain model's keys."""
    plain, ac = str(tmp_path / "plain"), str(tmp_path / "ac")
    train(base(prepared_text_dir, plain, "trainer.max_steps=3"))
    train(base(prepared_text_dir, ac, "trainer.max_steps=3", "strategy.activation_checkpointing=true"))
    ref, got = read_metrics(plain), read_metrics(ac)
    for step in (1, 2, 3):
        assert got[step]["loss"] == pytest.approx(ref[step]["loss"], rel=1e-6, abs=1e-6), step
    from igpt.checkpoint import read_model_state, resolve

    a, b = read_model_state(resolve(plain)), read_model_state(resolve(ac))
    assert sorted(a) == sorted(b)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_corrupt_newest_checkpoint_falls_back_to_the_previous_one(prepared_text_dir, tmp_path):
    """The newest checkpoint's weights truncated: resume=auto warns, resumes from the previous complete checkpoint
    (steps after it are run again, none before), and every loss from there equals the uninterrupted run's."""
    import shutil

    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    train(base(prepared_text_dir, full, "trainer.max_steps=10"))
    shutil.copytree(full, part)
    for name in os.listdir(os.path.join(part, "checkpoints")):
        if name in ("step_0000010",):
            shutil.rmtree(os.path.join(part, "checkpoints", name))
    with open(os.path.join(part, "checkpoints", "latest"), "w") as f:
        f.write("step_0000008\n")
    weights = os.path.join(part, "checkpoints", "step_0000008", "model.safetensors")
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) // 2)
    with open(os.path.join(part, "metrics.jsonl"), "w") as f:  # the log as it stood at step 8
        f.writelines(line for line in open(os.path.join(full, "metrics.jsonl")) if json.loads(line)["step"] <= 8)
    os.remove(os.path.join(part, "logs", "rank0.log"))
    train(base(prepared_text_dir, part, "trainer.max_steps=10"))
    log = open(os.path.join(part, "logs", "rank0.log")).read()
    assert "step_0000008 named by" in log and "is incomplete" in log, log
    assert "resuming from" in log and "step_0000004, the newest complete checkpoint" in log, log
    assert train_steps(part) == [*range(1, 9), *range(5, 11)]  # resumed after 4: steps 5..8 again, 1..4 not
    ref, got = read_metrics(full), read_metrics(part)
    for step in range(5, 11):
        assert got[step]["loss"] == ref[step]["loss"], step


def test_keep_last_prunes_old_checkpoints(prepared_text_dir, tmp_path):
    run = str(tmp_path / "r")
    train(base(prepared_text_dir, run, "trainer.max_steps=10", "trainer.ckpt_every=2", "trainer.keep_last=2"))
    assert sorted(d for d in os.listdir(os.path.join(run, "checkpoints")) if d.startswith("step_")) == [
        "step_0000008", "step_0000010"]
    train(base(prepared_text_dir, str(tmp_path / "all"), "trainer.max_steps=6", "trainer.ckpt_every=2",
               "trainer.keep_last=0"))
    assert len([d for d in os.listdir(tmp_path / "all" / "checkpoints") if d.startswith("step_")]) == 3


def test_tied_embeddings_train_resume_and_store_one_matrix(prepared_text_dir, tmp_path):
    """model.tie_embeddings=true through the trainer: lm_head is embed_tokens in training, the checkpoint stores the
    matrix once, and a resumed run continues exactly."""
    from safetensors import safe_open

    tied = ("model.tie_embeddings=true", "trainer.max_steps=6", "trainer.ckpt_every=3")
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    train(base(prepared_text_dir, full, *tied))
    trainer = train_and_stop(base(prepared_text_dir, part, *tied), at_step=4)
    model = trainer.models["policy"].module
    assert model.lm_head.weight is model.embed_tokens.weight
    with safe_open(os.path.join(part, "checkpoints", "step_0000004", "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys() and "embed_tokens.weight" in f.keys()
    train(base(prepared_text_dir, part, *tied))
    assert train_steps(part) == list(range(1, 7))
    ref, got = read_metrics(full), read_metrics(part)
    for step in range(1, 7):
        assert got[step]["loss"] == ref[step]["loss"], step


def test_skip_corrupt_shards_through_the_trainer(prepared_text_dir, tmp_path):
    """A truncated train shard: without data.skip_corrupt the run stops naming it; with it, the run goes on and the
    number of skipped shards reaches metrics.jsonl."""
    import shutil

    data = str(tmp_path / "data")
    shutil.copytree(prepared_text_dir, data)
    index = json.load(open(os.path.join(data, "index.json")))
    name = index["splits"]["train"]["shards"][2]["name"]
    path = os.path.join(data, name)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 3)
    with pytest.raises(Exception, match=f"shard {name}"):
        train(base(data, str(tmp_path / "strict"), "trainer.max_steps=40", "data.num_partitions=4"))
    run = str(tmp_path / "skip")
    train(base(data, run, "trainer.max_steps=40", "data.skip_corrupt=true", "data.num_partitions=4"))
    metrics = read_metrics(run)
    assert sorted(metrics) == list(range(1, 41))
    assert metrics[40]["skipped_shards"] == 1 and metrics[1]["skipped_shards"] in (0, 1)


def _one_step_grads(overrides: list[str]) -> tuple[torch.Tensor, StepResult, list[int]]:
    """The flattened gradient of the first optimizer step, its metrics, and the loss units of each micro-batch."""
    trainer = make_trainer(overrides)
    try:
        (model,) = trainer.trainable.values()
        seen: dict = {}
        step = model.clip_and_step

        def spy(*args, **kwargs):
            seen["g"] = torch.cat([p.grad.flatten() for p in model.module.parameters() if p.grad is not None])
            return step(*args, **kwargs)

        model.clip_and_step = spy
        batch = next(iter(trainer.train_loader))
        counts = [int(trainer.stage.count(mb)) for mb in trainer.ctx.micro_batches(batch)]
        out = trainer.train_step(batch)
    finally:
        trainer.close()
    return seen["g"], out, counts


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_accumulated_micro_batches_equal_one_batch_on_variable_length_data(prepared_sft_dir, prepared_pref_dir,
                                                                           stage):
    """Gradient accumulation weighs each micro-batch by its share of the batch's loss units (SFT: tokens, which differ
    per micro-batch on unpacked conversations; DPO: records), so 4 micro-batches give the gradient of 1 (fp32)."""
    from tests.test_dpo import dpo_overrides

    def overrides(micro: int) -> list[str]:
        if stage == "sft":
            return ["+stage=sft", f"data.dir={prepared_sft_dir}", "run_dir=/tmp/unused", *TINY, "stage.pack=false",
                    "trainer.global_batch_size=8", f"trainer.micro_batch_size={micro}", "trainer.progress=false",
                    "logger.wandb.mode=disabled", "trainer.eval_every=0", "trainer.ckpt_every=0", "trainer.max_steps=1"]
        return dpo_overrides(prepared_pref_dir, "/tmp/unused", "trainer.global_batch_size=8",
                             f"trainer.micro_batch_size={micro}", "trainer.max_steps=1")

    g1, out1, counts1 = _one_step_grads(overrides(8))
    g4, out4, counts4 = _one_step_grads(overrides(2))
    assert len(counts1) == 1 and len(counts4) == 4 and sum(counts4) == counts1[0]
    if stage == "sft":
        assert len(set(counts4)) > 1, counts4  # unequal micro-batches: equal weights would differ
    assert out4.loss == pytest.approx(out1.loss, rel=1e-6)
    assert torch.allclose(g4, g1, rtol=1e-4, atol=1e-7)
    assert float(g1.abs().max()) > 1e-4
