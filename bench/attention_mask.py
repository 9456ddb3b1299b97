"""Packed-document attention: the old dense-mask path against igpt's sdpa path, peak memory and time of fwd+bwd.

    python bench/attention_mask.py [--seq-lens 2048,8192,32768] [--heads 4] [--kv-heads 2] [--head-dim 64]
                                   [--batch 1] [--paths dense,sdpa] [--repeats 3] [--device cpu] [--json out.json]

A batch of ``--batch`` rows of S tokens is cut from a stream of documents whose lengths are log-uniform between
``--doc-min`` and ``--doc-max`` tokens (100 and 4000 by default, median ~630; the first row starts at a random point
of the stream, and a document crossing a row end continues in the next row, whose positions restart at 0). One
attention layer runs forward and backward over it (``attention(q, k, v, info, "sdpa")`` of
``igpt/model/attention.py``, GQA with ``--heads`` query and ``--kv-heads`` key/value heads) through two paths:

- ``dense``: what the sdpa backend did before: a ``(B, 1, S, S)`` boolean mask (causal and same document) passed
  to ``scaled_dot_product_attention``, which turns it into an additive float mask;
- ``sdpa``: igpt's sdpa backend today: segments grouped by length, one ``is_causal`` SDPA call per group.

Both times include building the masking information (the mask, or the segment layout), which a model builds once per
forward for all its layers. Every (path, S) case runs in a fresh subprocess. Peak memory: on CPU the peak resident
set size (``ru_maxrss``) above the resident size just before the measured call, with glibc's mmap threshold fixed
at 64 KiB (``MALLOC_MMAP_THRESHOLD_``) so freed large blocks go back to the OS and the resident size follows live
memory; on CUDA ``torch.cuda.max_memory_allocated`` above the memory allocated before the call. Inputs (q, k, v and
the output gradient) are allocated before the baseline, so the figure is what the attention itself adds. Time: the
fastest of ``--repeats`` runs after a warm-up at S = 256.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATHS = ("dense", "sdpa")


def document_position_ids(batch: int, seq_len: int, doc_min: int, doc_max: int, seed: int):
    """``(batch, seq_len)`` position ids of rows cut from a stream of log-uniform-length documents."""
    import torch

    rng = random.Random(seed)
    pos: list[int] = []
    while len(pos) < batch * seq_len + doc_max:
        n = int(round(math.exp(rng.uniform(math.log(doc_min), math.log(doc_max)))))
        pos.extend(range(n))
    skip = rng.randrange(doc_max)  # the stream is read from a random point, as a loader's rows are
    rows = torch.tensor(pos[skip : skip + batch * seq_len]).view(batch, seq_len)  # (B, S)
    first = rows[:, :1]  # a document crossing into a row restarts its positions at the row start
    doc = torch.cumsum(rows == 0, dim=1)  # (B, S)
    return torch.where(doc == 0, rows - first, rows)


def dense_mask_attention(q, k, v, position_ids):
    """The old sdpa path: causal same-document ``(B, 1, S, S)`` boolean mask, one SDPA call."""
    import torch
    import torch.nn.functional as F

    doc = torch.cumsum(position_ids == 0, dim=-1)  # (B, S)
    s = position_ids.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=position_ids.device).tril()  # (S, S)
    mask = ((doc[:, :, None] == doc[:, None, :]) & causal)[:, None]  # (B, 1, S, S)
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, S, D)
    out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, enable_gqa=qt.shape[1] != kt.shape[1])
    return out.transpose(1, 2)  # (B, S, Hq, D)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(args: argparse.Namespace) -> dict:
    """One (path, S) case in this process: peak memory of the first measured run, the fastest time of all."""
    import time

    import torch

    from igpt.model.attention import attention, attention_info

    torch.manual_seed(0)
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]

    def inputs(s: int):
        pos = document_position_ids(args.batch, s, args.doc_min, args.doc_max, args.seed).to(device)
        q = torch.randn(args.batch, s, args.heads, args.head_dim, device=device, dtype=dtype, requires_grad=True)
        k, v = (
            torch.randn(args.batch, s, args.kv_heads, args.head_dim, device=device, dtype=dtype, requires_grad=True)
            for _ in range(2)
        )
        return pos, q, k, v, torch.randn_like(q)

    def run(pos, q, k, v, grad) -> float:
        t0 = time.perf_counter()
        if args.path == "dense":
            out = dense_mask_attention(q, k, v, pos)
        else:
            out = attention(q, k, v, attention_info(pos, "sdpa"), "sdpa")
        out.backward(grad)
        if device.type == "cuda":
            torch.cuda.synchronize()
        q.grad = k.grad = v.grad = None
        return time.perf_counter() - t0

    run(*inputs(256))  # warm-up: kernels, thread pools
    case = inputs(args.seq_len)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        base = _rss_bytes()
        if resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 > base + (16 << 20):
            raise RuntimeError("the process's peak RSS is already above the baseline; the peak would be hidden")
    times = [run(*case)]
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    times += [run(*case) for _ in range(args.repeats - 1)]
    info = attention_info(case[0], "sdpa")
    segments = 1 if info.causal_only else len(info.cu_seqlens) - 1
    return {
        "path": args.path,
        "seq_len": args.seq_len,
        "segments": segments,
        "groups": len(info.groups),
        "peak_mib": peak / 2**20,
        "time_s": min(times),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq-lens", default="2048,8192,32768")
    ap.add_argument("--paths", default=",".join(PATHS))
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--doc-min", type=int, default=100)
    ap.add_argument("--doc-max", type=int, default=4000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    ap.add_argument("--json", default=None, help="also write the results to this file")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--seq-len", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        args.path = args.worker
        print(json.dumps(worker(args)))
        return
    paths = args.paths.split(",")
    bad = [p for p in paths if p not in PATHS]
    if bad:
        raise SystemExit(f"--paths: {bad} not among {', '.join(PATHS)}")
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    print(
        f"attention fwd+bwd, {args.device} {args.dtype}, batch {args.batch}, heads {args.heads}/{args.kv_heads} "
        f"(q/kv) x {args.head_dim}, documents log-uniform {args.doc_min}-{args.doc_max} tokens, "
        f"torch threads {os.environ.get('OMP_NUM_THREADS', 'default')}"
    )
    print(f"{'S':>6} {'path':>6} {'segments':>8} {'groups':>6} {'peak MiB':>10} {'time s':>8}")
    results = []
    shared = ("batch", "heads", "kv_heads", "head_dim", "doc_min", "doc_max", "seed", "repeats", "device", "dtype")
    passthrough = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in shared]
    for s in (int(x) for x in args.seq_lens.split(",")):
        for path in paths:
            cmd = [sys.executable, __file__, f"--worker={path}", f"--seq-len={s}", *passthrough]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                raise SystemExit(f"{path} at S={s} failed:\n{proc.stderr[-3000:]}")
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            results.append(r)
            print(
                f"{s:>6} {path:>6} {r['segments']:>8} {r['groups']:>6} {r['peak_mib']:>10.1f} {r['time_s']:>8.3f}",
                flush=True,
            )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"args": {k: getattr(args, k) for k in shared}, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
