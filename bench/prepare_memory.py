"""Peak memory of ``python -m igpt.data.prepare`` on a large JSONL input: it must stay bounded whatever the input size.

    python bench/prepare_memory.py [--gb 1.0] [--workers 2] [--doc-kb 4] [--keep DIR]

Writes a JSONL file of ``--gb`` gigabytes of ``{"text": ...}`` records (pseudo-English documents of about ``--doc-kb``
KB, the usual shape of a pretraining corpus), trains a 4096-token tokenizer on a small sample of it, then runs
``prepare`` (kind=text) in a subprocess while sampling, every 0.2 s, the resident memory of that process (RSS) and of
the whole process tree (main + workers, as PSS so that pages the forked workers share are counted once). Prints the
input size, the time, the throughput and both peaks, against the input size.

Where the memory goes: inputs stream (records in batches of 256, text files in 4 MB blocks), at most 4 tasks per worker
are in flight, and encoded samples are spooled to a file in the output's temporary folder (a few integers per sample
stay in memory: 32 bytes per document) until the train/val split is drawn and the shards are written.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import psutil

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = (
    "the king queen lord lady knight sword crown castle night day love death war peace heart soul blood fair sweet "
    "good noble brave old young speak hear see know come go shall will must doth hath thee thou thy my our your his "
    "her and but or if when where why how not no yes o alas upon within without before after"
).split()


def write_jsonl(path: str, gigabytes: float, doc_kb: float, seed: int = 0) -> int:
    """Write about ``gigabytes`` of ``{"text"}`` records; return the bytes written."""
    rng = random.Random(seed)
    # a pool of distinct paragraphs, recombined per document: realistic token statistics at disk speed
    paragraphs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 120))) + "." for _ in range(2000)]
    target, written = int(gigabytes * 1e9), 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            doc, n = [], 0
            while n < doc_kb * 1000:
                p = paragraphs[rng.randrange(len(paragraphs))]
                doc.append(p)
                n += len(p) + 2
            line = json.dumps({"text": "\n\n".join(doc)}) + "\n"
            f.write(line)
            written += len(line)
    return written


def tree_memory(proc: psutil.Process) -> tuple[int, int]:
    """(RSS of ``proc``, PSS of ``proc`` and all its descendants) in bytes. PSS counts a page shared by n processes
    (the forked workers share the parent's libraries) as 1/n in each, so the sum is the memory the job really holds."""
    try:
        own = proc.memory_info().rss
        total = sum(p.memory_full_info().pss for p in (proc, *proc.children(recursive=True)))
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return 0, 0
    return own, total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=1.0, help="input size in GB (1e9 bytes)")
    ap.add_argument("--workers", type=int, default=2, help="prepare's num_workers")
    ap.add_argument("--doc-kb", type=float, default=4.0, help="document size in KB")
    ap.add_argument("--keep", default=None, help="work in this folder and keep it (default: a temporary one)")
    args = ap.parse_args()
    root = args.keep or tempfile.mkdtemp(prefix="igpt-prepare-mem-")
    os.makedirs(root, exist_ok=True)
    src, out = os.path.join(root, "corpus.jsonl"), os.path.join(root, "prepared")
    try:
        t0 = time.perf_counter()
        size = write_jsonl(src, args.gb, args.doc_kb)
        print(f"wrote {src}: {size / 1e9:.2f} GB in {time.perf_counter() - t0:.0f}s")
        sample = os.path.join(root, "sample.txt")
        with open(src, encoding="utf-8") as f, open(sample, "w", encoding="utf-8") as g:
            for _, line in zip(range(500), f):
                g.write(json.loads(line)["text"] + "\n")
        tok = os.path.join(root, "tokenizer.json")
        subprocess.run([sys.executable, "-m", "igpt.data.tokenizer", f"input={sample}", "vocab_size=4096",
                        f"output={tok}"], cwd=REPO, check=True, capture_output=True)
        cmd = [sys.executable, "-m", "igpt.data.prepare", f"input={src}", f"output_dir={out}", f"tokenizer={tok}",
               f"num_workers={args.workers}", "overwrite=true"]
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        ps = psutil.Process(proc.pid)
        peak = [0, 0]
        done = threading.Event()

        def sample_rss() -> None:
            while not done.is_set():
                own, total = tree_memory(ps)
                peak[0], peak[1] = max(peak[0], own), max(peak[1], total)
                time.sleep(0.2)

        thread = threading.Thread(target=sample_rss, daemon=True)
        thread.start()
        stdout, _ = proc.communicate()
        done.set()
        thread.join()
        elapsed = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"prepare failed ({proc.returncode}):\n{stdout}")
        print(stdout.strip())
        print(f"prepare: {size / 1e9:.2f} GB JSONL in {elapsed:.0f}s ({size / 1e6 / elapsed:.1f} MB/s, "
              f"{args.workers} workers)")
        print(f"peak memory: main process {peak[0] / 2**20:.0f} MiB RSS, main + workers {peak[1] / 2**20:.0f} MiB "
              f"PSS (input {size / 2**20:.0f} MiB)")
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
