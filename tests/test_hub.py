"""Hugging Face import and export (igpt/hub.py, igpt.checkpoint.WeightsSource, igpt/export.py) and tokenizers' own
chat templates (igpt.data.chat.ChatFormat), on tiny Llama / Qwen2 / Mistral checkpoints built with transformers and
saved sharded (tests/hubutil.py): logits and greedy generation against transformers, SFT from each (single process and
FSDP), the round trip through export, the assistant mask against transformers', and the errors."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from igpt.checkpoint import load_model
from igpt.data.chat import ChatFormat
from tests.conftest import chat_records, run_module
from tests.hubutil import CONVERSATION, FAMILIES, hf_tokenizer, make_hub_model
from tests.trainutil import make_trainer, read_metrics, train

os.environ["HF_HUB_OFFLINE"] = "1"  # the "hub" is a local folder; nothing may reach the network
transformers = pytest.importorskip("transformers")

FAMILY_NAMES = list(FAMILIES)
SFT = ["trainer.seq_len=64", "trainer.global_batch_size=8", "trainer.micro_batch_size=4", "trainer.max_steps=3",
       "trainer.eval_every=3", "trainer.ckpt_every=3", "trainer.progress=false", "trainer.sample_every_eval=false",
       "logger.wandb.mode=disabled", "optim.warmup_steps=1", "optim.lr=1e-3"]


@pytest.fixture(scope="module")
def hub(tmp_path_factory, tokenizer_file) -> dict[str, str]:
    root = tmp_path_factory.mktemp("hub")
    return {f: make_hub_model(str(root / f), f, tokenizer_file, seed=i) for i, f in enumerate(FAMILY_NAMES)}


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory, hub) -> dict[str, str]:
    """Conversations without system turns (Mistral's template has none), prepared with each model folder's tokenizer."""
    root = tmp_path_factory.mktemp("hubsft")
    src = root / "chat.jsonl"
    with open(src, "w", encoding="utf-8") as f:
        for rec in chat_records(40, seed=8):
            f.write(json.dumps({"messages": [m for m in rec["messages"] if m["role"] != "system"]}) + "\n")
    out = {}
    for family, folder in hub.items():
        out[family] = str(root / family)
        run_module("-m", "igpt.data.prepare", f"input={src}", f"output_dir={out[family]}", f"tokenizer={folder}",
                   "kind=sft", "val_fraction=0.1", "seq_len=64")
    return out


def hf_model(folder: str):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.mark.integration
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_import_logits_equal_transformers(hub, family):
    model, fmt, meta = load_model(hub[family])
    hf = hf_model(hub[family])
    assert type(hf).__name__ == FAMILIES[family][0] and meta["hf_config"]["architectures"] == [FAMILIES[family][0]]
    ids = torch.randint(0, model.cfg.vocab_size, (2, 50), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(7, 57).expand(2, 50)  # RoPE (and llama3 scaling) away from position 0
    with torch.no_grad():
        for kw in ({}, {"position_ids": pos}):
            err = (model(ids, **kw) - hf(input_ids=ids, **kw).logits).abs().max().item()
            assert err < 1e-4, (family, kw.keys(), err)
    assert fmt.has_template and fmt.stop_ids  # the folder's template and end-of-turn tokens came along


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_assistant_mask_equals_transformers(tokenizer_file, hub, family):
    """The mask from rendered prefixes (the published template, no markers) and from {% generation %} markers both
    equal transformers' return_assistant_tokens_mask on the marked template."""
    marked = hf_tokenizer(tokenizer_file, family, marked=True)
    want = marked.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    fmt = ChatFormat.load(hub[family])
    ids, mask = fmt.encode_chat(CONVERSATION)
    assert ids == want["input_ids"] and mask == want["assistant_masks"] and sum(mask) > 0
    fmt.template = marked.chat_template
    assert fmt.encode_chat(CONVERSATION) == (want["input_ids"], want["assistant_masks"])
    plain = hf_tokenizer(tokenizer_file, family)
    gen = plain.apply_chat_template(CONVERSATION[:3], add_generation_prompt=True, tokenize=True, return_dict=False)
    assert ChatFormat.load(hub[family]).encode_chat(CONVERSATION[:3], add_generation_prompt=True)[0] == list(gen)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_sft_from_hub_model_then_export_round_trip(hub, sft_data, tmp_path, family):
    run = str(tmp_path / "sft")
    train(["+stage=sft", f"data.dir={sft_data[family]}", f"init_from={hub[family]}", f"run_dir={run}", *SFT])
    losses = read_metrics(run)
    assert len(losses) == 3 and all(r["loss"] == r["loss"] for r in losses.values())
    meta = json.load(open(os.path.join(run, "checkpoints", "step_0000003", "meta.json"), encoding="utf-8"))
    assert meta["model"]["dim"] == 64 and meta["hf_config"]["architectures"] == [FAMILIES[family][0]]
    out = str(tmp_path / "hf")
    run_module("-m", "igpt.export", f"checkpoint={run}", f"output={out}", "max_shard_size=50KB")
    assert os.path.exists(os.path.join(out, "model.safetensors.index.json"))
    hf = hf_model(out)
    assert type(hf).__name__ == FAMILIES[family][0]
    model, fmt, _ = load_model(run)
    ids = torch.randint(0, model.cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (model(ids) - hf(input_ids=ids).logits).abs().max().item() < 1e-4
    # greedy generation of a chat prompt: igpt's sampler and transformers' generate agree
    from igpt.sampling import generate_ids

    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    prompt = CONVERSATION[:1]
    ids = fmt.encode_prompt(prompt, chat=True)
    assert list(hf_tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False)) == ids
    ours = generate_ids(model, [ids], max_new_tokens=12, temperature=0.0, stop_ids=fmt.stop_ids, pad_id=fmt.pad_id)[0]
    with torch.no_grad():
        theirs = hf.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, len(ids) :].tolist()
    assert ours == [t for t in theirs if t not in fmt.stop_ids][: len(ours)] and len(ours) > 0


@pytest.mark.dist
def test_sft_from_hub_model_under_fsdp_on_two_ranks(hub, sft_data, tmp_path):
    """FSDP on 2 gloo ranks from a hub folder (Qwen2: biases and tied embeddings; every rank loads the shards into its
    model before it is sharded) computes the single-process losses."""
    from tests.test_strategies import torchrun

    ref, got = str(tmp_path / "single"), str(tmp_path / "fsdp")
    args = ["+stage=sft", f"data.dir={sft_data['qwen2']}", f"init_from={hub['qwen2']}", *SFT]
    train([*args, f"run_dir={ref}"])
    torchrun([*args, f"run_dir={got}", "strategy=fsdp"])
    a, b = read_metrics(ref), read_metrics(got)
    assert all(abs(a[s]["loss"] - b[s]["loss"]) < 1e-5 for s in (1, 2, 3))


def test_tokenizer_without_template_gets_igpt_tokens_and_rows(hub, tmp_path):
    """A tokenizer without a chat template: prepare adds igpt's template tokens, training adds their embedding rows
    (starting at the mean row) and keeps every stored row."""
    folder = str(tmp_path / "base")
    shutil.copytree(hub["llama"], folder)
    os.remove(os.path.join(folder, "chat_template.jinja"))
    src = tmp_path / "chat.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in chat_records(20, seed=9)), encoding="utf-8")
    data = str(tmp_path / "data")
    run_module("-m", "igpt.data.prepare", f"input={src}", f"output_dir={data}", f"tokenizer={folder}", "kind=sft",
               "val_fraction=0.1")
    fmt = ChatFormat.load(data)
    assert not fmt.has_template and fmt.token_to_id("<|im_start|>") is not None
    trainer = make_trainer(["+stage=sft", f"data.dir={data}", f"init_from={folder}", f"run_dir={tmp_path / 'r'}", *SFT])
    stored, _, _ = load_model(folder)
    emb = trainer.models["policy"].module.embed_tokens.weight.detach()
    n = stored.cfg.vocab_size
    assert emb.shape[0] == fmt.get_vocab_size() > n
    assert torch.equal(emb[:n], stored.embed_tokens.weight)
    assert torch.allclose(emb[n:], emb[:n].mean(0).expand_as(emb[n:]))
    ids, mask = fmt.encode_chat(CONVERSATION)
    assert ids[0] == fmt.token_to_id("<|begin_of_text|>")  # igpt's template after the tokenizer's own BOS
    trainer.fit()
    trainer.close()


# ---------------------------------------------------------------------------------------------------------- errors
def _edit_config(folder: str, **changes) -> None:
    path = os.path.join(folder, "config.json")
    config = json.load(open(path, encoding="utf-8"))
    config.update(changes)
    json.dump(config, open(path, "w", encoding="utf-8"))


def test_unsupported_configs_name_the_key(hub, sft_data, tmp_path):
    cases = [
        ("llama", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}},
         "rope_parameters.rope_type='yarn' is not supported"),
        ("llama", {"hidden_act": "gelu"}, "hidden_act='gelu'"),
        ("llama", {"mlp_bias": True}, "mlp_bias=True"),
        ("qwen2", {"architectures": ["Qwen3ForCausalLM"]}, "architectures=['Qwen3ForCausalLM'] is not supported"),
    ]
    for i, (family, changes, message) in enumerate(cases):
        folder = str(tmp_path / f"bad{i}")
        shutil.copytree(hub[family], folder)
        _edit_config(folder, **changes)
        with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
            load_model(folder)
    folder = str(tmp_path / "window")  # a window shorter than trainer.seq_len: an error naming sliding_window
    shutil.copytree(hub["mistral"], folder)
    _edit_config(folder, sliding_window=16)
    assert load_model(folder)[0].cfg.max_seq_len == 16  # within the window, full attention is the window's
    with pytest.raises(ValueError, match="sliding_window"):
        make_trainer(["+stage=sft", f"data.dir={sft_data['mistral']}", f"init_from={folder}",
                      f"run_dir={tmp_path / 'r'}", *SFT])


def test_missing_truncated_or_corrupt_weights_name_the_file(hub, tmp_path, capsys, tokenizer_file):
    from igpt.export import main as export_main
    from igpt.generate import main as generate_main

    index = json.load(open(os.path.join(hub["qwen2"], "model.safetensors.index.json"), encoding="utf-8"))
    shard = sorted(set(index["weight_map"].values()))[1]
    missing, truncated, corrupt = (str(tmp_path / n) for n in ("missing", "truncated", "corrupt"))
    for folder in (missing, truncated, corrupt):
        shutil.copytree(hub["qwen2"], folder)
    os.remove(os.path.join(missing, shard))
    with open(os.path.join(truncated, shard), "r+b") as f:
        f.truncate(os.path.getsize(os.path.join(truncated, shard)) // 2)
    with open(os.path.join(corrupt, shard), "r+b") as f:
        f.seek(9)
        f.write(b"garbage!")
    for folder in (missing, truncated, corrupt):
        assert generate_main([f"checkpoint={folder}", "prompt=hi", "max_new_tokens=2", "device=cpu"]) == 2
        assert shard in capsys.readouterr().err
        assert export_main([f"checkpoint={folder}", f"output={tmp_path / 'out'}"]) == 2
        assert shard in capsys.readouterr().err
    # igpt's own checkpoint: a truncated model.safetensors (the raw SafetensorError of before)
    from tests.test_generate import make_model, write_checkpoint

    run = str(tmp_path / "run")
    ckpt = write_checkpoint(run, make_model(), tokenizer_file)
    path = os.path.join(ckpt, "model.safetensors")
    with open(path, "r+b") as f:
        f.truncate(100)
    assert generate_main([f"checkpoint={run}", "prompt=hi", "device=cpu"]) == 2
    assert f"{path}: not a readable safetensors file" in capsys.readouterr().err


def test_pref_sequences_end_at_the_end_of_turn(hub, tmp_path):
    """With a template that writes text after the end-of-turn token (ChatML's newline), a preference sequence still
    ends with it: the token a reward model reads and a sampled response stops at."""
    from igpt.data.partition import Shard, read_index

    src = tmp_path / "pref.jsonl"
    src.write_text(json.dumps({"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "Potato."}) + "\n", "utf-8")
    out = str(tmp_path / "pref")
    run_module("-m", "igpt.data.prepare", f"input={src}", f"output_dir={out}", f"tokenizer={hub['qwen2']}",
               "kind=pref", "val_fraction=0")
    index = read_index(out, "train")
    ids, mask, lens, *_ = Shard(index.shards[0], "pref", index.dtype, None).get(0)
    fmt = ChatFormat.load(out)
    im_end = fmt.token_to_id("<|im_end|>")
    ends = list(lens.cumsum())
    assert [int(ids[e - 1]) for e in ends] == [im_end, im_end]
    starts = [0, *ends[:-1]]
    texts = [fmt.decode([int(t) for t, m in zip(ids[a:b], mask[a:b]) if m], skip_special_tokens=False)
             for a, b in zip(starts, ends)]
    assert texts == ["Blue.<|im_end|>", "Potato.<|im_end|>"]
