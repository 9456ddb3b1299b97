"""Shared fixtures: small prepared datasets built through igpt's own CLIs (tokenizer + prepare), once per session."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = (
    "the king queen lord lady knight sword crown castle night day love death war peace heart soul blood fair "
    "sweet good noble brave old young speak hear see know come go shall will must doth hath thee thou thy my "
    "our your his her and but or if when where why how not no yes o alas upon within without before after"
).split()


def synthetic_text(n_docs: int, seed: int, words_per_doc: tuple[int, int] = (80, 400)) -> list[str]:
    """Deterministic pseudo-English documents with learnable structure (a fixed bigram-ish grammar)."""
    rng = random.Random(seed)
    nxt = {w: rng.sample(WORDS, 6) for w in WORDS}
    docs = []
    for _ in range(n_docs):
        w, out = rng.choice(WORDS), []
        for i in range(rng.randint(*words_per_doc)):
            out.append(w.capitalize() if i == 0 or out[-1].endswith(".") else w)
            if rng.random() < 0.1:
                out[-1] += rng.choice([".", ",", ";", "!", "?"])
            if rng.random() < 0.04:
                out[-1] += "\n"
            w = rng.choice(nxt[w])
        docs.append(" ".join(out).replace("\n ", "\n") + "\n")
    return docs


def run_module(*args: str, cwd: str = REPO) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def _write_docs(folder, docs: list[str]) -> None:
    os.makedirs(folder, exist_ok=True)
    for i, doc in enumerate(docs):
        with open(os.path.join(folder, f"doc{i:03d}.txt"), "w", encoding="utf-8") as f:
            f.write(doc)


@pytest.fixture(scope="session")
def tokenizer_file(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("tok")
    _write_docs(root / "txt", synthetic_text(40, seed=1))
    out = str(root / "tokenizer.json")
    run_module("-m", "igpt.data.tokenizer", f"input={root}/txt/*.txt", "vocab_size=384", f"output={out}")
    return out


@pytest.fixture(scope="session")
def prepared_text_dir(tmp_path_factory, tokenizer_file) -> str:
    """~100k tokens of synthetic text, 16+ train shards, kind=text."""
    root = tmp_path_factory.mktemp("text")
    _write_docs(root / "txt", synthetic_text(120, seed=2))
    out = str(root / "prepared")
    run_module(
        "-m", "igpt.data.prepare", f"input={root}/txt/*.txt", f"output_dir={out}", f"tokenizer={tokenizer_file}",
        "kind=text", "val_fraction=0.1", "shard_tokens=4000",
    )
    return out


def chat_records(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    recs = []
    for i in range(n):
        turns = rng.choice([1, 1, 2])
        msgs = [{"role": "system", "content": "Be brief."}] if i % 5 == 0 else []
        for _ in range(turns):
            q = " ".join(rng.choices(WORDS, k=rng.randint(3, 10)))
            a = " ".join(rng.choices(WORDS, k=rng.randint(3, 12)))
            msgs += [{"role": "user", "content": q + "?"}, {"role": "assistant", "content": a.capitalize() + "."}]
        recs.append({"messages": msgs})
    return recs


@pytest.fixture(scope="session")
def prepared_sft_dir(tmp_path_factory, tokenizer_file) -> str:
    root = tmp_path_factory.mktemp("sft")
    src = root / "chat.jsonl"
    with open(src, "w", encoding="utf-8") as f:
        for rec in chat_records(300, seed=3):
            f.write(json.dumps(rec) + "\n")
    out = str(root / "prepared")
    run_module(
        "-m", "igpt.data.prepare", f"input={src}", f"output_dir={out}", f"tokenizer={tokenizer_file}",
        "kind=sft", "val_fraction=0.1", "seq_len=64", "shard_tokens=2000",
    )
    return out


# A model small enough that a training step takes milliseconds on CPU.
TINY = [
    "model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_dim=128",
    "model.vocab_size=384", "model.max_seq_len=64", "trainer.seq_len=64",
]


@pytest.fixture(scope="session")
def prepared_pref_dir(tmp_path_factory, tokenizer_file) -> str:
    """Synthetic preferences with a learnable rule (igpt.data.prefs): 600 pairs and 150 K=3 rankings, kind=pref."""
    from igpt.data.prefs import synthetic

    root = tmp_path_factory.mktemp("pref")
    synthetic(str(root / "pairs.jsonl"), n=600, k=2, seed=5)
    synthetic(str(root / "kwise.jsonl"), n=150, k=3, seed=6)
    out = str(root / "prepared")
    run_module(
        "-m", "igpt.data.prepare", f"input={root}/pairs.jsonl,{root}/kwise.jsonl", f"output_dir={out}",
        f"tokenizer={tokenizer_file}", "kind=pref", "val_fraction=0.15", "shard_tokens=6000",
    )
    return out


@pytest.fixture(scope="session")
def prepared_prompt_dir(tmp_path_factory, tokenizer_file) -> str:
    """PPO prompts ("Name a kind word for the crown.", igpt.data.prefs), kind=prompt, 10% held out."""
    from igpt.data.prefs import prompts

    root = tmp_path_factory.mktemp("prompts")
    prompts(str(root / "prompts.jsonl"), n=200, seed=7)
    out = str(root / "prepared")
    run_module(
        "-m", "igpt.data.prepare", f"input={root}/prompts.jsonl", f"output_dir={out}", f"tokenizer={tokenizer_file}",
        "kind=prompt", "val_fraction=0.1",
    )
    return out
