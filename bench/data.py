"""Data pipeline throughput: igpt's ShardLoader against raw WebDataset reads, and ``prepare`` in MB/s.

    python bench/data.py [--tokens 50000000] [--seq-len 1024] [--batch 64] [--prepare-mb 16] [--workers 0,2]

Builds a synthetic prepared directory (uint16 ids, vocab 32k, documents of 1..2000 tokens, shards of ~1M tokens as
prepare writes them) in a temporary folder, then measures in the same run:
- raw WebDataset: ``wds.WebDataset(shards)`` iterated with ``np.frombuffer`` on every ``ids.bin`` (the reference);
- igpt's tar reader alone (``igpt.data.partition.Shard``: scan + every sample);
- ``ShardLoader`` tokens/s (packed rows of seq_len + 1, shuffled, batch dicts of int64 tensors) with 0 and 2
  DataLoader workers: the goal is >= 10M tokens/s per process so the loader is never the bottleneck;
- ``igpt.data.prepare.prepare`` on generated text with a small tokenizer trained by ``igpt.data.tokenizer`` (MB of
  input text per second), when those modules are importable.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import tempfile
import time

import numpy as np
import webdataset as wds

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from igpt.checksum import file_checksum  # noqa: E402
from igpt.data import partition  # noqa: E402
from igpt.data.loader import ShardLoader  # noqa: E402
from igpt.data.partition import SHARD_CHECKSUM, Shard, read_index  # noqa: E402


def build_synthetic(root: str, tokens: int, vocab: int = 32000, shard_tokens: int = 1_000_000, seed: int = 0) -> int:
    """Write a prepared text dir of about ``tokens`` tokens (format of docs/internals.md); return the token count."""
    import json

    rng = np.random.default_rng(seed)
    ids = rng.integers(7, vocab, tokens, dtype=np.uint16)
    lengths = rng.integers(1, 2001, tokens // 1000 + 16)
    cuts = np.cumsum(lengths)
    cuts = cuts[cuts < tokens]
    ids[np.concatenate([[0], cuts])] = 0  # every document starts with <|endoftext|>
    docs = np.split(ids, cuts)
    os.makedirs(os.path.join(root, "train"))
    shards, cur, writer = [], None, None
    for doc in docs:
        if writer is None or cur["tokens"] + len(doc) > shard_tokens:
            if writer is not None:
                writer.close()
            name = f"train/shard-{len(shards):06d}.tar"
            writer = wds.TarWriter(os.path.join(root, name), encoder=False, mtime=0.0)
            cur = {"name": name, "samples": 0, "tokens": 0, "bytes": 0}
            shards.append(cur)
        writer.write({"__key__": f"{len(shards) - 1:06d}_{cur['samples']:08d}", "ids.bin": doc.tobytes()})
        cur["samples"] += 1
        cur["tokens"] += len(doc)
        cur["bytes"] += 4 * len(doc)
    writer.close()
    for shard in shards:  # as prepare records them (the loader verifies each shard once)
        shard[SHARD_CHECKSUM] = file_checksum(os.path.join(root, shard["name"]))
    split = {k: sum(s[k] for s in shards) for k in ("samples", "tokens", "bytes")}
    index = {
        "version": 1,
        "kind": "text",
        "dtype": "uint16",
        "tokenizer": {"path": "tokenizer.json", "sha256": "", "vocab_size": vocab},
        "seq_len": None,
        "splits": {"train": {**split, "shards": shards}},
    }
    with open(os.path.join(root, "index.json"), "w") as f:
        json.dump(index, f)
    return split["tokens"]


def bench_wds(root: str) -> tuple[int, float]:
    urls = sorted(glob.glob(os.path.join(root, "train", "*.tar")))
    t0, n = time.perf_counter(), 0
    for sample in wds.WebDataset(urls, shardshuffle=False):
        n += len(np.frombuffer(sample["ids.bin"], dtype=np.uint16))
    return n, time.perf_counter() - t0


def bench_reader(root: str) -> tuple[int, float]:
    index = read_index(root, "train")
    t0, n = time.perf_counter(), 0
    for info in index.shards:
        shard = Shard(info, index.kind, index.dtype, index.vocab_size)
        for i in range(len(shard)):
            n += len(shard.get(i)[0])
    return n, time.perf_counter() - t0


def bench_loader(root: str, seq_len: int, batch: int, workers: int, tokens: int,
                 verify: bool = True) -> tuple[int, float, float]:
    """Read about ``tokens`` tokens; return (tokens, seconds after the first batch, seconds to the first batch).
    ``verify``: check each shard's checksum when first opened (``data.verify``; forgotten here before each run)."""
    partition._VERIFIED.clear()
    loader = ShardLoader(root, "train", seq_len=seq_len, global_batch_size=batch, num_workers=workers, seed=0,
                         verify=verify)
    t0 = time.perf_counter()
    it = iter(loader)
    first = next(it)
    t1 = time.perf_counter()
    n, per = 0, first["input_ids"].numel()
    for _ in range(max(1, tokens // per - 1)):
        next(it)
        n += per
    t2 = time.perf_counter()
    del it
    return n, t2 - t1, t1 - t0


def bench_prepare(tmp: str, megabytes: float) -> str:
    try:
        from igpt.data.prepare import prepare
        from igpt.data.tokenizer import train_tokenizer
    except ImportError as e:
        return f"skipped: igpt.data.prepare / igpt.data.tokenizer not importable yet ({e})"
    rng = np.random.default_rng(1)
    syll = ["ka", "lo", "ri", "ten", "sa", "mu", "dor", "ve", "ith", "an", "el", "os", "qu", "ber", "ni", "tha"]
    words = ["".join(rng.choice(syll, rng.integers(1, 4))) for _ in range(4000)]
    zipf = 1.0 / np.arange(1, len(words) + 1)
    zipf /= zipf.sum()
    src = os.path.join(tmp, "text")
    os.makedirs(src)
    total, i = 0, 0
    while total < megabytes * 1e6:
        picks = rng.choice(len(words), 6000, p=zipf)  # ~40 KB of pseudo-English per file
        sentences = np.split(picks, np.cumsum(rng.integers(5, 25, 600)))
        text = "\n\n".join(" ".join(words[w] for w in sent).capitalize() + "." for sent in sentences if len(sent))
        path = os.path.join(src, f"doc{i:04d}.txt")
        with open(path, "w") as f:
            f.write(text)
        total += os.path.getsize(path)
        i += 1
    files = sorted(glob.glob(os.path.join(src, "*.txt")))
    tok = os.path.join(tmp, "tok.json")
    train_tokenizer(files[:4], 4096, tok, progress=False)
    t0 = time.perf_counter()
    index = prepare(files, os.path.join(tmp, "prepared"), tok, progress=False)
    dt = time.perf_counter() - t0
    n_tok = sum(s["tokens"] for s in index["splits"].values())
    return f"{total / 1e6 / dt:8.2f} MB/s  ({total / 1e6:.1f} MB of text -> {n_tok / 1e6:.1f}M tokens in {dt:.1f} s)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=50_000_000)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--workers", default="0,2")
    ap.add_argument("--prepare-mb", type=float, default=16.0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = os.path.join(tmp, "synthetic")
        t0 = time.perf_counter()
        n = build_synthetic(root, args.tokens)
        print(
            f"synthetic data: {n / 1e6:.1f}M tokens in {len(os.listdir(os.path.join(root, 'train')))} shards "
            f"({time.perf_counter() - t0:.1f} s to write); cpus: {os.cpu_count()}"
        )
        rows = []
        print("measuring raw WebDataset reads ...", flush=True)
        n, dt = bench_wds(root)
        rows.append(("raw WebDataset (reference)", n / dt, ""))
        n, dt = bench_reader(root)
        rows.append(("igpt tar reader (Shard)", n / dt, ""))
        for w in (int(x) for x in args.workers.split(",")):
            print(f"measuring ShardLoader with {w} workers ...", flush=True)
            n, dt, startup = bench_loader(root, args.seq_len, args.batch, w, args.tokens)
            rows.append((f"ShardLoader, {w} workers", n / dt, f"first batch after {startup:.2f} s"))
            n, dt, startup = bench_loader(root, args.seq_len, args.batch, w, args.tokens, verify=False)
            rows.append((f"ShardLoader, {w} workers, verify off", n / dt, f"first batch after {startup:.2f} s"))
        print(f"\n{'reader':32s} {'tokens/s':>12s}")
        for name, rate, note in rows:
            print(f"{name:32s} {rate / 1e6:10.1f} M  {note}")
        print(f"\nseq_len {args.seq_len}, global batch {args.batch}, 8 partitions, shuffle on")
        t0 = time.perf_counter()
        print(f"prepare (igpt.data.prepare): {bench_prepare(tmp, args.prepare_mb)}")
        print(f"(prepare benchmark incl. generating text and training the tokenizer: {time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
    main()
