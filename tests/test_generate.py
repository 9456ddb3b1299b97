"""Tests for igpt/generate.py (KV-cache decoding, sampling, CLI) and igpt/chat.py on hand-made checkpoints."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from igpt.config import ModelConfig
from igpt.data.chat import encode_chat
from igpt.data.tokenizer import load_tokenizer
from igpt.generate import load_checkpoint, main
from igpt.model import Transformer
from igpt.sampling import filter_logits, generate, generate_ids

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = dict(vocab_size=384, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=64)


def make_model(seed: int = 0, **kw) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(**{**CFG, **kw})).eval()
    with torch.no_grad():  # sharpen the random logits so greedy decoding has no near-ties
        model.lm_head.weight.mul_(8.0)
    return model


def write_checkpoint(run_dir: str, model: Transformer, tokenizer_file: str, stage: str = "pretrain") -> str:
    """A checkpoint in the layout of docs/internals.md, reachable through ``<run_dir>/checkpoints/latest``."""
    ckpt = os.path.join(run_dir, "checkpoints", "step_0000010")
    os.makedirs(ckpt, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.tied:
        del state["lm_head.weight"]  # stored once, as safetensors requires
    save_file(state, os.path.join(ckpt, "model.safetensors"))
    with open(tokenizer_file, encoding="utf-8") as src, open(os.path.join(ckpt, "tokenizer.json"), "w") as dst:
        dst.write(src.read())
    meta = {"format": 1, "step": 10, "stage": stage, "model": vars(model.cfg), "tokenizer": "tokenizer.json",
            "models": {"main": {"dir": ".", "head": model.head}}}
    with open(os.path.join(ckpt, "meta.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f)
    with open(os.path.join(run_dir, "checkpoints", "latest"), "w", encoding="utf-8") as f:
        f.write("step_0000010\n")
    return ckpt


def greedy_without_cache(model: Transformer, prompt: list[int], steps: int) -> tuple[list[int], torch.Tensor]:
    """Reference decoding: recompute the whole sequence at every step."""
    seq, logits = list(prompt), []
    with torch.no_grad():
        for _ in range(steps):
            last = model(torch.tensor([seq]))[0, -1]
            logits.append(last)
            seq.append(int(last.argmax()))
    return seq[len(prompt) :], torch.stack(logits)


# ------------------------------------------------------------------------------------------------ decoding


@pytest.mark.parametrize("tied", [False, True])
def test_kv_cache_decoding_equals_full_recompute(tied):
    model = make_model(tie_embeddings=tied)
    prompt = torch.randint(7, 384, (9,), generator=torch.Generator().manual_seed(1)).tolist()
    out, logits = generate_ids(model, [prompt], max_new_tokens=15, temperature=0.0, return_logits=True)
    want, want_logits = greedy_without_cache(model, prompt, 15)
    assert out[0] == want
    torch.testing.assert_close(logits[0], want_logits, atol=1e-4, rtol=1e-4)


def test_batched_prompts_of_different_lengths_equal_unbatched():
    model = make_model(seed=2)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(7, 384, (n,), generator=g).tolist() for n in (3, 11, 6, 1)]
    batched, batched_logits = generate_ids(model, prompts, max_new_tokens=12, temperature=0.0, return_logits=True)
    for i, p in enumerate(prompts):
        alone, alone_logits = generate_ids(model, [p], max_new_tokens=12, temperature=0.0, return_logits=True)
        assert batched[i] == alone[0], f"prompt {i}"
        torch.testing.assert_close(batched_logits[i], alone_logits[0], atol=1e-4, rtol=1e-4)
        assert batched[i] == greedy_without_cache(model, p, 12)[0]


def test_generation_stops_at_stop_token_per_row():
    model = make_model(seed=4)
    prompts = [[0, 20, 30, 40], [0, 50]]
    free = generate_ids(model, prompts, max_new_tokens=10, temperature=0.0)
    stop = free[0][3]  # the 4th token row 0 would produce
    out = generate_ids(model, prompts, max_new_tokens=10, temperature=0.0, stop_ids=[stop])
    assert out[0] == free[0][: free[0].index(stop)]
    assert out[1] == (free[1][: free[1].index(stop)] if stop in free[1] else free[1])
    streamed: list[tuple[int, int]] = []
    generate_ids(
        model, prompts, max_new_tokens=10, temperature=0.0, stop_ids=[stop], stream=lambda r, t: streamed.append((r, t))
    )
    assert [t for r, t in streamed if r == 0] == out[0] and [t for r, t in streamed if r == 1] == out[1]


def test_sampling_is_seeded_per_row():
    model = make_model(seed=5)
    with torch.no_grad():
        model.lm_head.weight.div_(8.0)  # flatter distribution: samples differ between seeds
    p0, p1 = [0, 10, 11, 12], [0, 99]
    kw = dict(max_new_tokens=20, temperature=1.0, top_k=0, top_p=1.0)
    a = generate_ids(model, [p0, p1], seed=7, **kw)
    assert a == generate_ids(model, [p0, p1], seed=7, **kw)
    assert generate_ids(model, [p1], seed=8, **kw)[0] == a[1]  # row i samples with seed + i, whatever the batch
    assert generate_ids(model, [p0, p1], seed=9, **kw) != a
    greedy = generate_ids(model, [p0], temperature=0.0, max_new_tokens=20)
    assert generate_ids(model, [p0], seed=3, temperature=1.3, top_k=1, max_new_tokens=20) == greedy


def test_filter_logits_top_k_and_top_p():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    logits = probs.log()
    kept = lambda x: torch.isfinite(x)[0].tolist()  # noqa: E731
    assert kept(filter_logits(logits, top_k=2)) == [False, True, False, True]
    assert kept(filter_logits(logits, top_p=0.7)) == [False, True, False, True]  # 0.5 + 0.3 reaches 0.7
    assert kept(filter_logits(logits, top_p=0.5)) == [False, True, False, False]
    assert kept(filter_logits(logits, top_p=0.81)) == [False, True, True, True]
    assert kept(filter_logits(logits, top_p=0.01)) == [False, True, False, False]  # the top token always stays
    assert kept(filter_logits(logits, top_k=0, top_p=1.0)) == [True] * 4


def test_prompt_longer_than_context_keeps_its_tail():
    model = make_model(seed=6, max_seq_len=16)
    long = list(range(7, 40))
    out = generate_ids(model, [long], max_new_tokens=5, temperature=0.0)
    assert out[0] == greedy_without_cache(model, long[-15:], 1)[0]  # 15 = max_seq_len - 1 tokens kept, 1 new fits


# ------------------------------------------------------------------------------------------------ CLI


def test_generate_cli_prompt_on_pretrain_checkpoint(tmp_path, tokenizer_file, capsys):
    model = make_model(seed=7, tie_embeddings=True)
    run = str(tmp_path / "run")
    write_checkpoint(run, model, tokenizer_file, stage="pretrain")
    loaded, tok, meta = load_checkpoint(run)
    assert meta["stage"] == "pretrain" and loaded.lm_head.weight is loaded.embed_tokens.weight
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    rc = main([f"checkpoint={run}", "prompt=the king shall", "temperature=0", "max_new_tokens=12"])
    assert rc == 0
    printed = capsys.readouterr().out
    ids = [0] + tok.encode("the king shall", add_special_tokens=False).ids  # raw text after <|endoftext|>
    want = generate_ids(model, [ids], max_new_tokens=12, temperature=0.0, stop_ids=[0, 3])[0]
    assert want, "the reference produced no tokens"
    assert printed == tok.decode(want, skip_special_tokens=True) + "\n"


def test_generate_cli_jsonl_on_sft_checkpoint(tmp_path, tokenizer_file):
    model = make_model(seed=8)
    run = str(tmp_path / "run")
    ckpt = write_checkpoint(run, model, tokenizer_file, stage="sft")
    tok = load_tokenizer(tokenizer_file)
    lines = [
        {"id": 1, "prompt": "the queen"},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "who is the king?"}]},
        {"prompt": "o heart"},
    ]
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(json.dumps(x) for x in lines) + "\n", encoding="utf-8")
    outs = {}
    for bs in (1, 3):
        dst = tmp_path / f"out{bs}.jsonl"
        args = [f"checkpoint={ckpt}", f"input={src}", f"output={dst}", "temperature=0.9", "seed=11", f"batch_size={bs}"]
        assert main(args + ["max_new_tokens=10"]) == 0
        outs[bs] = [json.loads(x) for x in dst.read_text(encoding="utf-8").splitlines()]
    assert outs[1] == outs[3]  # per-row seeds: batching does not change the samples
    got = outs[3]
    assert [{k: v for k, v in g.items() if k != "response"} for g in got] == lines
    msgs = [[{"role": "user", "content": "the queen"}], lines[1]["messages"], [{"role": "user", "content": "o heart"}]]
    for i, m in enumerate(msgs):  # chat template applied, each row sampled with seed 11 + i
        ids = encode_chat(tok, m, add_generation_prompt=True)[0]
        want = generate_ids(model, [ids], max_new_tokens=10, temperature=0.9, top_k=50, seed=11 + i, stop_ids=[0, 3])
        assert got[i]["response"] == tok.decode(want[0], skip_special_tokens=True)


def test_generate_cli_errors(tmp_path, tokenizer_file, capsys):
    run = str(tmp_path / "run")
    write_checkpoint(run, make_model(), tokenizer_file)
    assert main([f"checkpoint={run}", "prompt=hi", "temprature=0.5"]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'temprature'" in err and "temperature" in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n', encoding="utf-8")
    assert main([f"checkpoint={run}", f"input={bad}", f"output={tmp_path / 'o.jsonl'}"]) == 2
    assert f"{bad}:2" in capsys.readouterr().err
    assert main([f"checkpoint={run}", "prompt=hi", "max_new_tokens=lots"]) == 2
    assert "max_new_tokens='lots': expected int" in capsys.readouterr().err
    assert main([f"checkpoint={tmp_path / 'nope'}", "prompt=hi"]) == 2
    assert "no such directory" in capsys.readouterr().err
    assert main([f"checkpoint={run}"]) == 2
    assert "exactly one of prompt" in capsys.readouterr().err


def test_generate_module_entry_point(tmp_path, tokenizer_file):
    run = str(tmp_path / "run")
    write_checkpoint(run, make_model(seed=9), tokenizer_file)
    cmd = [
        sys.executable,
        "-m",
        "igpt.generate",
        f"checkpoint={run}",
        "prompt=the",
        "temperature=0",
        "max_new_tokens=6",
    ]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    model, tok, _ = load_checkpoint(run)
    assert res.stdout.rstrip("\n") == generate(model, tok, ["the"], max_new_tokens=6, temperature=0.0)[0]


# ------------------------------------------------------------------------------------------------ chat


def test_chat_keeps_history_and_resets(tmp_path, tokenizer_file):
    from igpt.chat import main as chat_main

    model = make_model(seed=10)
    run = str(tmp_path / "run")
    write_checkpoint(run, model, tokenizer_file, stage="sft")
    tok = load_tokenizer(tokenizer_file)
    stdin = io.StringIO("the king\nand the queen\n/reset\nthe king\n/exit\nnever read\n")
    stdout = io.StringIO()
    args = [f"checkpoint={run}", "temperature=0", "max_new_tokens=8", "system=Be brief."]
    assert chat_main(args, stdin=stdin, stdout=stdout) == 0
    replies = [line[len("assistant: ") :] for line in stdout.getvalue().splitlines() if line.startswith("assistant: ")]
    assert len(replies) == 3 and "(conversation cleared)" in stdout.getvalue()

    def reply(messages):
        ids = encode_chat(tok, messages, add_generation_prompt=True)[0]
        return tok.decode(
            generate_ids(model, [ids], max_new_tokens=8, temperature=0.0, stop_ids=[0, 3])[0], skip_special_tokens=True
        )

    sys_msg = {"role": "system", "content": "Be brief."}
    first = [sys_msg, {"role": "user", "content": "the king"}]
    assert replies[0] == reply(first)
    second = first + [{"role": "assistant", "content": replies[0]}, {"role": "user", "content": "and the queen"}]
    assert replies[1] == reply(second)  # the history is part of the prompt
    assert replies[2] == replies[0]  # after /reset the conversation starts over
