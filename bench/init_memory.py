"""Peak host memory of setting a model up under a sharded strategy: building it, and loading a checkpoint into it.

    python bench/init_memory.py [--model llama_1b] [--strategy fsdp] [--nproc 2] [--n-layers N] [--keep DIR]

Each phase is one ``torchrun`` of ``--nproc`` processes that builds igpt's ``Trainer`` (``+stage=pretrain``,
``model=<--model>``, ``strategy=<--strategy>``, fp32, CPU) and nothing else; per rank it reads the resident set before
the trainer (the idle process: Python, torch, DeepSpeed and igpt imported) and the high-water mark after it
(``VmHWM`` of ``/proc/self/status``, reset first through ``/proc/self/clear_refs``), and prints the peak above the
idle process against the full fp32 model (4 bytes per parameter):

1. ``init``: a fresh model from ``trainer.seed``; then the rank writes a checkpoint (sharded DCP under fsdp), not
   counted in the peak;
2. ``init_from``: a new run started from that checkpoint (``init_from=``): the model is built, initialised and
   filled from the checkpoint.

With meta-device initialisation (``igpt/parallel/init.py``) a rank holds its shards plus one 16 MiB chunk of draws
and a few rows of the checkpoint at a time, so both peaks are about ``1 / nproc`` of the model. ``--n-layers`` cuts
the model's depth where the machine has too little memory (the ratio barely depends on it). A tiny prepared dataset
(synthetic text, a 384-token tokenizer) is made first; the model keeps its own vocabulary size.
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
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def status_kib(field: str) -> int:
    with open("/proc/self/status", encoding="utf-8") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak() -> None:
    """Make VmHWM start again from the current resident set (Linux: write 5 to /proc/self/clear_refs)."""
    with open("/proc/self/clear_refs", "w", encoding="utf-8") as f:
        f.write("5")


def worker(args: argparse.Namespace) -> None:
    # everything the trainer imports, imported first so that the idle process holds it
    import torch.distributed.checkpoint  # noqa: F401
    from hydra import compose, initialize_config_dir

    import igpt.data.loader  # noqa: F401
    import igpt.parallel.fsdp  # noqa: F401
    import igpt.stages.pretrain  # noqa: F401
    from igpt.config import register, validate
    from igpt.train import CONF_DIR, setup_logging
    from igpt.trainer import Trainer

    if args.strategy.startswith("zero"):
        import deepspeed  # noqa: F401

    register()
    with initialize_config_dir(version_base="1.3", config_dir=CONF_DIR):
        cfg = validate(compose("config", overrides=json.loads(args.overrides)))
    setup_logging(cfg.run_dir)
    idle = status_kib("VmRSS")
    reset_peak()
    t0 = time.perf_counter()
    trainer = Trainer(cfg)
    seconds = time.perf_counter() - t0
    peak = status_kib("VmHWM")
    params = sum(
        (p.ds_numel if hasattr(p, "ds_numel") else p.numel()) for p in next(iter(trainer.trainable.values())).module
        .parameters()
    )
    if args.save:
        trainer.save_checkpoint()
    rows = trainer.strategy.all_gather_object({"rank": trainer.rank, "idle_kib": idle, "peak_kib": peak,
                                              "seconds": seconds, "params": params})
    if trainer.rank == 0:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(rows, f)
    trainer.close()


def prepare_data(root: str) -> str:
    """A tiny prepared text dataset (and its tokenizer) in ``root``; returns the prepared folder."""
    rng = random.Random(0)
    words = "the king queen lord lady knight sword crown castle night day love war peace heart soul".split()
    os.makedirs(os.path.join(root, "txt"), exist_ok=True)
    for i in range(20):
        with open(os.path.join(root, "txt", f"doc{i}.txt"), "w", encoding="utf-8") as f:
            f.write(" ".join(rng.choice(words) for _ in range(400)) + "\n")
    tok = os.path.join(root, "tokenizer.json")
    out = os.path.join(root, "prepared")
    for cmd in (["-m", "igpt.data.tokenizer", f"input={root}/txt/*.txt", "vocab_size=384", f"output={tok}"],
                ["-m", "igpt.data.prepare", f"input={root}/txt/*.txt", f"output_dir={out}", f"tokenizer={tok}",
                 "kind=text", "val_fraction=0.1", "shard_tokens=4000", "overwrite=true"]):
        proc = subprocess.run([sys.executable, *cmd], cwd=REPO, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
    return out


def run_phase(args: argparse.Namespace, overrides: list[str], out: str, save: bool) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}", __file__,
           "--worker", f"--out={out}", f"--overrides={json.dumps(overrides)}", f"--strategy={args.strategy}"]
    if save:
        cmd.append("--save")
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=None, text=True)  # tqdm shows
    if proc.returncode != 0:
        raise SystemExit(f"torchrun failed ({proc.returncode}):\n{proc.stdout[-4000:]}")
    with open(out, encoding="utf-8") as f:
        return json.load(f)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama_1b")
    p.add_argument("--strategy", default="fsdp")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--n-layers", type=int, default=None, help="cut the model to this many blocks")
    p.add_argument("--keep", default=None, help="work in this folder and keep it (default: a temporary one)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--save", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--overrides", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    tmp = None if args.keep else tempfile.TemporaryDirectory()
    root = args.keep or tmp.name
    os.makedirs(root, exist_ok=True)
    data = prepare_data(os.path.join(root, "data"))
    for run in ("init", "from"):  # fresh runs (a kept folder's old checkpoints would be resumed)
        shutil.rmtree(os.path.join(root, run), ignore_errors=True)
    common = ["+stage=pretrain", f"data.dir={data}", f"strategy={args.strategy}", "precision=fp32", "device=cpu",
              "trainer.seq_len=64", "trainer.global_batch_size=" + str(args.nproc), "trainer.micro_batch_size=1",
              "trainer.progress=true", "trainer.eval_every=0", "logger.wandb.mode=disabled", "data.num_workers=0"]
    model = [f"model={args.model}"] + ([f"model.n_layers={args.n_layers}"] if args.n_layers else [])
    first = os.path.join(root, "init")
    results = {
        "init": run_phase(args, [*common, *model, f"run_dir={first}"], os.path.join(root, "init.json"), save=True),
        "init_from": run_phase(args, [*common, f"init_from={first}", f"run_dir={os.path.join(root, 'from')}"],
                               os.path.join(root, "from.json"), save=False),
    }
    params = results["init"][0]["params"]
    full = params * 4 / 2**20
    print(f"model={args.model}{f' (n_layers={args.n_layers})' if args.n_layers else ''}: {params / 1e9:.3f}B "
          f"parameters, full fp32 model {full:,.0f} MiB; strategy={args.strategy}, {args.nproc} processes (CPU)")
    print(f"{'phase':<10} {'rank':>4} {'idle MiB':>9} {'peak MiB':>9} {'peak - idle':>12} {'/ full model':>13} "
          f"{'seconds':>8}")
    for phase, rows in results.items():
        for r in rows:
            above = (r["peak_kib"] - r["idle_kib"]) / 1024
            print(f"{phase:<10} {r['rank']:>4} {r['idle_kib'] / 1024:>9,.0f} {r['peak_kib'] / 1024:>9,.0f} "
                  f"{above:>12,.0f} {above / full:>13.2f} {r['seconds']:>8.1f}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
