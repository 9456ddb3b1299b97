"""Write small prepared-data directories for tests, in the exact format of docs/internals.md ("Prepared data").

Shards are written with ``webdataset.TarWriter`` (as ``igpt.data.prepare`` does), so the loader is tested against real
WebDataset tars, not against its own writer. The tokenizer.json holds only the special tokens (ids 0..6).
"""

from __future__ import annotations

import json
import os

import numpy as np
import webdataset as wds

SPECIALS = ["<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>", "<|system|>", "<|user|>", "<|assistant|>"]
EOT, PAD = 0, 1
FIELDS = {
    "text": ("ids.bin",),
    "sft": ("ids.bin", "mask.bin"),
    "pref": ("ids.bin", "mask.bin", "lens.bin", "rank.bin", "margin.bin"),
}
OTHER_DTYPES = {"mask.bin": "<u1", "lens.bin": "<u4", "rank.bin": "<i4", "margin.bin": "<f4"}


def random_docs(rng: np.random.Generator, n: int, min_len: int, max_len: int, vocab: int) -> list[np.ndarray]:
    """Documents that start with <|endoftext|> and otherwise hold ordinary ids (>= 7), as prepare writes them."""
    return [
        np.concatenate([[EOT], rng.integers(7, vocab, int(rng.integers(min_len, max_len + 1)) - 1)]).astype(np.int64)
        for _ in range(n)
    ]


def random_convs(rng: np.random.Generator, n: int, min_len: int, max_len: int, vocab: int) -> list[tuple]:
    """SFT samples (ids, mask): mask 0 on the leading <|endoftext|> and a prompt, 1 on a random-length response."""
    out = []
    for ids in random_docs(rng, n, min_len, max_len, vocab):
        mask = np.zeros(len(ids), dtype=np.int64)
        mask[int(rng.integers(1, len(ids))) :] = 1
        out.append((ids, mask))
    return out


def random_prefs(rng: np.random.Generator, n: int, min_len: int, max_len: int, vocab: int) -> list[tuple]:
    """Preference samples (ids, mask, lens, ranks, margin): K = 2 or 3 sequences (prompt + response) back to back,
    ranks 0..K-1 shuffled (K = 3 sometimes with a tie), a random margin for pairs."""
    out = []
    for _ in range(n):
        k = int(rng.integers(2, 4))
        convs = random_convs(rng, k, min_len, max_len, vocab)
        ranks = rng.permutation(k)
        if k == 3 and rng.random() < 0.3:
            ranks[ranks == 2] = 1  # a tie
        margin = [float(rng.normal())] if k == 2 else [0.0]
        out.append((
            np.concatenate([c for c, _ in convs]), np.concatenate([m for _, m in convs]),
            np.array([len(c) for c, _ in convs]), ranks, np.array(margin),
        ))
    return out


def write_dataset(
    root: str,
    kind: str,
    splits: dict[str, list[list]],
    *,
    dtype: str = "uint16",
    vocab_size: int = 1000,
) -> str:
    """Write ``root/index.json``, ``root/tokenizer.json`` and ``root/<split>/shard-NNNNNN.tar``.

    ``splits`` maps a split name to its shards, each a list of samples: for kind=text one id array, for sft an
    (ids, mask) pair, for pref an (ids, mask, lens, ranks, margin) tuple.
    """
    os.makedirs(root, exist_ok=True)
    fields = FIELDS[kind]
    index: dict = {
        "version": 1,
        "kind": kind,
        "dtype": dtype,
        "tokenizer": {"path": "tokenizer.json", "sha256": "0" * 64, "vocab_size": vocab_size},
        "seq_len": None,
        "splits": {},
    }
    for split, shards in splits.items():
        os.makedirs(os.path.join(root, split), exist_ok=True)
        entries = []
        for s, samples in enumerate(shards):
            name = f"{split}/shard-{s:06d}.tar"
            tokens = 0
            with wds.TarWriter(os.path.join(root, name)) as sink:
                for i, sample in enumerate(samples):
                    arrays = (sample,) if kind == "text" else sample
                    rec = {"__key__": f"{s:06d}_{i:08d}"}
                    for f, a in zip(fields, arrays):
                        dt = np.dtype(OTHER_DTYPES.get(f) or np.dtype(dtype).newbyteorder("<"))
                        rec[f] = np.asarray(a).astype(dt).tobytes()
                    sink.write(rec)
                    tokens += len(arrays[0])
            entries.append({"name": name, "samples": len(samples), "tokens": tokens, "bytes": tokens * 4})
        index["splits"][split] = {
            "samples": sum(e["samples"] for e in entries),
            "tokens": sum(e["tokens"] for e in entries),
            "bytes": sum(e["bytes"] for e in entries),
            "shards": entries,
        }
    with open(os.path.join(root, "index.json"), "w", encoding="utf-8") as f:
        json.dump(index, f, indent=1)
    tok = {"added_tokens": [{"id": i, "content": t, "special": True} for i, t in enumerate(SPECIALS)]}
    with open(os.path.join(root, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(tok, f)
    return root
