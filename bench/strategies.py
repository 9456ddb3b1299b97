"""Throughput and memory of every strategy: steps/s, parameter+optimizer bytes and peak memory per rank.

    python bench/strategies.py [--nproc 2] [--steps 10] [--strategies single,ddp,fsdp,zero1,zero2,zero3]

The driver launches one ``torchrun`` per strategy (one process for ``single``); each worker trains the model of
``conf/model/tiny.yaml`` (``ModelConfig()`` defaults) on random tokens through the same ``Strategy`` calls the trainer
makes (no_sync, backward, clip_and_step), then reports

- ``steps/s``: optimizer steps per second after warm-up,
- ``param+optim MiB``: bytes this rank holds in parameters, fp32 master copies and optimizer state after a step,
  counted once per storage (a flat buffer that many parameters view is counted once). With 2 ranks ZeRO-3 and FSDP
  hold about half of DDP's; ZeRO-1/2 keep full parameters and shard the rest,
- ``peak MiB``: the rank's peak memory (CUDA: ``max_memory_allocated``; CPU: peak resident set size, which includes
  the Python/torch runtime itself).

The single-process row is printed beside the others as the reference measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STRATEGIES = ("single", "ddp", "fsdp", "zero1", "zero2", "zero3")


def worker(args: argparse.Namespace) -> None:
    import torch

    from igpt.config import ModelConfig, OptimConfig, StrategyConfig
    from igpt.metrics import peak_memory_gb
    from igpt.model import Transformer
    from igpt.parallel import build_strategy

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    strategy = build_strategy(StrategyConfig(name=args.worker), "fp32", device)
    rank, world = strategy.rank, strategy.world_size
    cfg = ModelConfig()
    torch.manual_seed(0)
    plain = Transformer(cfg)
    n_params = sum(p.numel() for p in plain.parameters())
    model = strategy.wrap_model(plain, OptimConfig())
    per_rank = args.global_batch // world
    accum = per_rank // args.micro_batch
    gen = torch.Generator().manual_seed(rank)

    def step() -> None:
        scale = world / (args.global_batch * args.seq_len)
        for i in range(accum):
            ids = torch.randint(0, cfg.vocab_size, (args.micro_batch, args.seq_len + 1), generator=gen).to(device)
            with model.no_sync(i == accum - 1), strategy.autocast():
                loss = model(ids[:, :-1], labels=ids[:, 1:])
                model.backward(loss * scale)
        model.set_lr(1e-4)
        model.clip_and_step(1.0)

    for _ in range(args.warmup):
        step()
    strategy.barrier()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    strategy.barrier()
    dt = time.perf_counter() - t0
    row = {
        "strategy": args.worker, "rank": rank, "world": world, "steps_per_s": args.steps / dt,
        "state_mib": model.held_bytes() / 2**20, "peak_mib": peak_memory_gb(device) * 1024, "params": n_params,
    }
    rows = strategy.all_gather_object(row)
    if rank == 0:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(rows, f)
    strategy.teardown()


def run_one(name: str, args: argparse.Namespace, out: str) -> list[dict]:
    common = [f"--worker={name}", f"--out={out}", f"--steps={args.steps}", f"--warmup={args.warmup}",
              f"--global-batch={args.global_batch}", f"--micro-batch={args.micro_batch}", f"--seq-len={args.seq_len}"]
    if name == "single":
        cmd = [sys.executable, __file__, *common]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
               __file__, *common]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    with open(out, encoding="utf-8") as f:
        return json.load(f)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--strategies", default=",".join(STRATEGIES))
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    print(f"tiny model, global batch {args.global_batch} x {args.seq_len} tokens, micro-batch {args.micro_batch}, "
          f"{args.nproc} ranks (single: 1 process), fp32, {args.steps} timed steps")
    print(f"{'strategy':<8} {'ranks':>5} {'steps/s':>8} {'param+optim MiB/rank':>21} {'vs ddp':>7} "
          f"{'peak MiB/rank':>14}")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.strategies.split(","):
            results[name] = run_one(name, args, os.path.join(tmp, f"{name}.json"))
    ddp = results.get("ddp")
    for name, rows in results.items():
        state = max(r["state_mib"] for r in rows)
        ratio = f"{state / ddp[0]['state_mib']:.2f}" if ddp else "-"
        peaks = "/".join(f"{r['peak_mib']:.0f}" for r in rows)
        print(f"{name:<8} {rows[0]['world']:>5} {rows[0]['steps_per_s']:>8.2f} {state:>21.1f} {ratio:>7} {peaks:>14}")
    print(f"({next(iter(results.values()))[0]['params'] / 1e6:.2f}M parameters; on CPU the peak is the process's "
          "resident set, the Python/torch runtime included)")


if __name__ == "__main__":
    main()
