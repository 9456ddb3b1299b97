"""Tests for igpt/export.py: exported checkpoints load in Hugging Face transformers with identical logits and tokens."""

from __future__ import annotations

import json
import os

import pytest
import torch

from igpt.config import ModelConfig
from igpt.data.chat import encode_chat, encode_document
from igpt.data.tokenizer import load_tokenizer
from igpt.export import main as export_main
from igpt.model import Transformer
from tests.test_generate import write_checkpoint

os.environ["HF_HUB_OFFLINE"] = "1"  # everything loads from the exported folder; nothing may reach the network
transformers = pytest.importorskip("transformers")

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Who is the king?"},
    {"role": "assistant", "content": "The king is old, and his crown is heavy."},
    {"role": "user", "content": "And the queen?"},
]


def random_model(tied: bool, seed: int) -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(
        vocab_size=384,
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        ffn_dim=96,
        max_seq_len=64,
        rope_theta=5000.0,
        norm_eps=1e-6,
        tie_embeddings=tied,
    )
    model = Transformer(cfg).eval()
    with torch.no_grad():  # non-trivial norm weights, so a misplaced norm would show
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name == "norm.weight":
                p.uniform_(0.5, 1.5)
    return model


@pytest.mark.integration
@pytest.mark.parametrize("tied", [False, True])
def test_hf_logits_parity(tmp_path, tokenizer_file, tied):
    model = random_model(tied, seed=int(tied))
    run = str(tmp_path / "run")
    write_checkpoint(run, model, tokenizer_file, stage="pretrain")
    out = str(tmp_path / "hf")
    assert export_main([f"checkpoint={run}", f"output={out}"]) == 0
    with open(os.path.join(out, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"] is tied
    assert config["num_key_value_heads"] == 2 and config["eos_token_id"] == 0  # pretrain: <|endoftext|>

    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    if tied:
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    torch.manual_seed(5)
    ids = torch.randint(0, 384, (3, 37))
    with torch.no_grad():
        want = hf(input_ids=ids).logits
        got = model(ids)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # HF's position_ids give RoPE positions only (no document masking): compare on one document starting mid-way
    pos = torch.arange(5, 42).expand(3, 37)
    with torch.no_grad():
        torch.testing.assert_close(
            model(ids, position_ids=pos), hf(input_ids=ids, position_ids=pos).logits, atol=1e-4, rtol=1e-4
        )


@pytest.mark.integration
def test_hf_tokenizer_and_chat_template(tmp_path, tokenizer_file):
    run = str(tmp_path / "run")
    write_checkpoint(run, random_model(False, seed=3), tokenizer_file, stage="sft")
    out = str(tmp_path / "hf")
    assert export_main([f"checkpoint={run}", f"output={out}"]) == 0
    tok = load_tokenizer(tokenizer_file)
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert hf_tok.eos_token == "<|im_end|>" and hf_tok.pad_token == "<|pad|>" and hf_tok.bos_token == "<|endoftext|>"
    assert hf_tok.eos_token_id == 3 and hf_tok.pad_token_id == 1
    text = "The king's crown, the queen's heart!\nO thou noble soul -- 42 times?"
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == tok.encode(text, add_special_tokens=False).ids
    # every training document starts with <|endoftext|>: so does the exported tokenizer's encoding of a text
    assert hf_tok(text)["input_ids"] == [0, *tok.encode(text, add_special_tokens=False).ids]
    assert hf_tok.decode(hf_tok(text)["input_ids"], skip_special_tokens=True) == text
    for gen_prompt, msgs in ((True, MESSAGES), (False, MESSAGES[:3])):
        want = encode_chat(tok, msgs, add_generation_prompt=gen_prompt)[0]
        got = hf_tok.apply_chat_template(msgs, add_generation_prompt=gen_prompt, tokenize=True, return_dict=False)
        assert list(got) == want
    with open(os.path.join(out, "generation_config.json"), encoding="utf-8") as f:
        assert json.load(f)["eos_token_id"] == [3, 0]  # stop at <|im_end|> or <|endoftext|>
    assert open(os.path.join(out, "chat_template.jinja"), encoding="utf-8").read() == hf_tok.chat_template


@pytest.mark.integration
def test_hf_generate_matches_igpt_greedy(tmp_path, tokenizer_file):
    """A base model continues a plain ``tokenizer(prompt)`` in transformers as igpt continues the prompt."""
    from igpt.sampling import generate, generate_ids

    model = random_model(True, seed=4)
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)  # sharper logits: no greedy near-ties
    run = str(tmp_path / "run")
    write_checkpoint(run, model, tokenizer_file, stage="pretrain")
    out = str(tmp_path / "hf")
    assert export_main([f"checkpoint={run}", f"output={out}", "dtype=float32", "max_shard_size=40KB"]) == 0
    assert os.path.exists(os.path.join(out, "model.safetensors.index.json"))
    assert not os.path.exists(os.path.join(out, "chat_template.jinja"))  # a base model never saw a template
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    tok = load_tokenizer(tokenizer_file)
    prompt = encode_document(tok, "the king")
    ours = generate_ids(model, [prompt], max_new_tokens=10, temperature=0.0)[0]
    inputs = hf_tok("the king", return_tensors="pt")
    assert inputs["input_ids"][0].tolist() == prompt
    with torch.no_grad():
        theirs = hf.generate(**inputs, max_new_tokens=10, do_sample=False, eos_token_id=None, min_new_tokens=10)
    assert ours == theirs[0, len(prompt) :].tolist()
    text = generate(model, tok, ["the king"], max_new_tokens=10, temperature=0.0)[0]
    assert text == hf_tok.decode(theirs[0, len(prompt) :], skip_special_tokens=True)


def test_export_dtype_and_shards(tmp_path, tokenizer_file):
    from safetensors.torch import load_file

    model = random_model(False, seed=6)
    run = str(tmp_path / "run")
    write_checkpoint(run, model, tokenizer_file, stage="pretrain")
    out = str(tmp_path / "hf")
    assert export_main([f"checkpoint={run}", f"output={out}", "dtype=bfloat16", "max_shard_size=30KB"]) == 0
    config = json.load(open(os.path.join(out, "config.json"), encoding="utf-8"))
    assert config["dtype"] == config["torch_dtype"] == "bfloat16"
    index = json.load(open(os.path.join(out, "model.safetensors.index.json"), encoding="utf-8"))
    files = sorted(set(index["weight_map"].values()))
    shards = {f: load_file(os.path.join(out, f)) for f in files}
    assert len(files) > 2  # a shard over the limit holds one tensor that alone is larger
    assert all(len(t) == 1 or sum(v.numel() * 2 for v in t.values()) <= 30_000 for t in shards.values())
    stored = {k: v for t in shards.values() for k, v in t.items()}
    assert stored["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert torch.equal(stored["model.norm.weight"], model.norm.weight.detach().to(torch.bfloat16))
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert next(hf.parameters()).dtype == torch.bfloat16
    assert export_main([f"checkpoint={run}", f"output={out}", "dtype=fp8"]) == 2


def test_export_errors(tmp_path, capsys):
    assert export_main([f"checkpoint={tmp_path}", f"output={tmp_path / 'o'}"]) == 2
    assert "neither a checkpoint" in capsys.readouterr().err
    assert export_main(["checkpoint=x", "out=y"]) == 2
    assert "unknown key 'out'" in capsys.readouterr().err
