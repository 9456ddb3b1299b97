"""Training throughput on one GPU through ``igpt/train.py``: gpt2_124m and llama_1b, bf16, FSDP, Triton kernels
against torch SDPA + torch cross-entropy, on synthetic data prepared on the spot.

    python bench/train_gpu.py [--models gpt2_124m,llama_1b] [--steps 20] [--budget-s 240] [--work DIR]
    python bench/train_gpu.py --dry-run      # CPU, tiny shapes (Triton kernels under TRITON_INTERPRET=1): plumbing only

Each (model, kernels) pair is one ``python igpt/train.py`` process (``strategy=fsdp precision=bf16
logger.wandb.mode=disabled trainer.ckpt_at_end=false``), timed from the ``metrics.jsonl`` it writes. The table has one
row per run: tokens/s and its model TFLOP/s (``igpt.model.flops``: PaLM's 6N + 12 L d S per token, causal attention
counted in full, as nanoGPT and PaLM count it), MFU against the device's bf16 peak (``igpt.metrics``), and peak memory.
Step times are the median over the steps after the first ``--warmup`` (compilation and autotuning happen there).

The data is a 4096-token byte-level BPE tokenizer trained on pseudo-English text and shards from ``igpt.data.prepare``;
the models keep their own vocabulary sizes (50304, 128256), so the ``lm_head`` and loss cost what they cost in real
training.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = (
    "the of and to in a is that for it as was with be by on not he this are or his from at which but have an they "
    "you were her she there been one all we their has would when if so no will more out up into do any your what "
    "time king queen night day love death war peace heart soul blood sword crown castle speak hear know come"
).split()

# model -> (seq_len, micro batch): 16k tokens per step for both.
SHAPES = {"gpt2_124m": (1024, 16), "llama_1b": (2048, 8)}
KERNELS = {"triton": ("triton", "triton"), "sdpa/torch": ("sdpa", "torch")}
# --dry-run: the same models' configs shrunk to a CPU-sized shape, two steps.
DRY_MODEL = ["model.dim=64", "model.n_layers=1", "model.n_heads=2", "model.n_kv_heads=2", "model.ffn_dim=128",
             "model.vocab_size=512", "model.max_seq_len=64"]  # fmt: skip
DRY_SHAPE = (64, 2)


def synthetic_corpus(folder: str, n_docs: int, words_per_doc: int, seed: int = 0) -> None:
    """Pseudo-English documents with a fixed random bigram grammar (learnable, so the loss falls)."""
    rng = random.Random(seed)
    nxt = {w: rng.sample(WORDS, 8) for w in WORDS}
    os.makedirs(folder, exist_ok=True)
    for i in range(n_docs):
        w, out = rng.choice(WORDS), []
        for _ in range(words_per_doc):
            out.append(w)
            w = rng.choice(nxt[w])
        with open(os.path.join(folder, f"doc{i:05d}.txt"), "w", encoding="utf-8") as f:
            f.write(" ".join(out) + ".\n")


def prepare_data(work: str, dry_run: bool) -> str:
    """Tokenizer + text shards under ``work``; returns the prepared data dir."""
    out = os.path.join(work, "data")
    if os.path.exists(os.path.join(out, "index.json")):
        return out
    txt = os.path.join(work, "txt")
    n_docs, words = (40, 200) if dry_run else (150, 4000)  # ~0.7M tokens: a few epochs at most
    synthetic_corpus(txt, n_docs, words)
    tok = os.path.join(work, "tokenizer.json")
    vocab = 384 if dry_run else 4096
    _check([sys.executable, "-m", "igpt.data.tokenizer", f"input={txt}/*.txt", f"vocab_size={vocab}", f"output={tok}"])
    _check([sys.executable, "-m", "igpt.data.prepare", f"input={txt}/*.txt", f"output_dir={out}", f"tokenizer={tok}",
            "kind=text", "val_fraction=0.02", "shard_tokens=200000", "overwrite=true"])  # fmt: skip
    return out


def _check(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode:
        tail = f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
        raise SystemExit(f"{' '.join(cmd[:3])} failed ({proc.returncode}):\n{tail}")


def train_args(model: str, kernels: str, data: str, run_dir: str, steps: int, dry_run: bool) -> list[str]:
    attn, loss = KERNELS[kernels]
    seq, micro = DRY_SHAPE if dry_run else SHAPES[model]
    args = [
        "igpt/train.py", "+stage=pretrain", f"model={model}", f"data.dir={data}", f"run_dir={run_dir}",
        "strategy=fsdp", "precision=bf16", f"kernels.attention={attn}", f"kernels.loss={loss}", "kernels.strict=true",
        f"trainer.seq_len={seq}", f"trainer.micro_batch_size={micro}", f"trainer.global_batch_size={micro}",
        f"trainer.max_steps={steps}", "trainer.eval_every=0", "trainer.eval_batches=1", "trainer.ckpt_every=0",
        "trainer.ckpt_at_end=false", "trainer.sample_every_eval=false", "trainer.progress=false", "resume=never",
        "optim.warmup_steps=2", "logger.wandb.mode=disabled", "data.num_partitions=1",
    ]  # fmt: skip
    if dry_run:
        args += [*DRY_MODEL, "device=cpu"]
    return args


def summarise(run_dir: str, warmup: int) -> dict[str, float]:
    train = []
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            if rec["split"] == "train":
                train.append(rec)
    timed = train[warmup:] or train[-1:]
    return {
        "steps": len(train),
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed),
        "mfu": statistics.median(r["mfu"] for r in timed),
        "peak_mem_gb": max(r["peak_mem_gb"] for r in train),
        "loss": train[-1]["loss"],
    }


def flops_per_token(model: str, overrides: list[str], seq_len: int) -> float:
    import yaml

    from igpt.config import ModelConfig
    from igpt.model.flops import flops_per_token as fpt

    with open(os.path.join(REPO, "conf", "model", f"{model}.yaml"), encoding="utf-8") as f:
        fields = yaml.safe_load(f)
    for o in overrides:
        key, value = o.split("=", 1)
        fields[key.split(".", 1)[1]] = int(value)
    return fpt(ModelConfig(**fields), seq_len)


def start_run(model: str, kernels: str, data: str, work: str, args: argparse.Namespace) -> tuple:
    """Start ``python igpt/train.py`` for one (model, kernels) pair; :func:`finish_run` collects it."""
    run_dir = os.path.join(work, "runs", f"{model}-{kernels.replace('/', '-')}")
    shutil.rmtree(run_dir, ignore_errors=True)
    os.makedirs(run_dir)
    cmd = [sys.executable, *train_args(model, kernels, data, run_dir, args.steps, args.dry_run)]
    log = open(os.path.join(run_dir, "train.log"), "w+", encoding="utf-8")
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, text=True)
    return model, kernels, run_dir, proc, log, time.time()


def finish_run(started: tuple, args: argparse.Namespace) -> tuple[str, str, tuple, str]:
    """Wait for a run; returns (model, kernels, table row, "") or (model, kernels, (), what went wrong)."""
    model, kernels, run_dir, proc, log, t = started
    try:
        code = proc.wait(timeout=max(1.0, args.run_timeout_s - (time.time() - t)))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return model, kernels, (), f"timed out after {args.run_timeout_s:.0f}s"
    finally:
        log.seek(0)
        output = log.read()
        log.close()
    if code:
        return model, kernels, (), f"exit {code}\n{output[-3000:]}"
    s = summarise(run_dir, args.warmup)
    seq = (DRY_SHAPE if args.dry_run else SHAPES[model])[0]
    tflops = s["tokens_per_s"] * flops_per_token(model, DRY_MODEL if args.dry_run else [], seq) / 1e12
    print(f"  {model} {kernels}: {time.time() - t:.0f}s", flush=True)
    row = (model, kernels, s["steps"], f"{s['tokens_per_s']:,.0f}", f"{tflops:.1f}", f"{s['mfu']:.1%}",
           f"{s['peak_mem_gb']:.1f}", f"{s['loss']:.3f}")  # fmt: skip
    return model, kernels, row, ""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="gpt2_124m,llama_1b")
    parser.add_argument("--kernels", default="triton,sdpa/torch")
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of the timing")
    parser.add_argument("--budget-s", type=float, default=240.0, help="start no run after this many seconds")
    parser.add_argument("--run-timeout-s", type=float, default=150.0, help="kill a single run after this long")
    parser.add_argument("--work", default="", help="folder for the data and run dirs (default: a temporary one)")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, 2 steps: checks the plumbing")
    args = parser.parse_args()
    t0 = time.time()
    if args.dry_run:
        args.steps, args.warmup = 2, 1
        os.environ.setdefault("TRITON_INTERPRET", "1")  # the Triton kernels run on CPU through the interpreter
    else:
        import torch

        if not torch.cuda.is_available():
            print("bench/train_gpu.py needs a CUDA GPU (or --dry-run)", file=sys.stderr)
            return 2
    work = args.work or tempfile.mkdtemp(prefix="igpt-train-bench-")
    data = prepare_data(work, args.dry_run)
    print(f"data: {data} (prepared in {time.time() - t0:.0f}s)", flush=True)
    widths = (12, 11, 6, 11, 9, 6, 9, 8)
    head = ("model", "kernels", "steps", "tokens/s", "TFLOP/s", "MFU", "peak_GiB", "loss")
    models, kernel_sets = args.models.split(","), args.kernels.split(",")
    runs = [(m, k) for m in models for k in kernel_sets]
    if args.dry_run:  # CPU: each model once, the kernel sets alternating (every code path), the runs side by side
        runs = [(m, kernel_sets[i % len(kernel_sets)]) for i, m in enumerate(models)]
        started = [start_run(model, kernels, data, work, args) for model, kernels in runs]
        results = [finish_run(st, args) for st in started]
    else:  # one GPU: one run at a time, and none started once the budget is used
        results = []
        for model, kernels in runs:
            if time.time() - t0 > args.budget_s:
                results.append((model, kernels, (), f"not run (time budget of {args.budget_s:.0f}s used)"))
            else:
                results.append(finish_run(start_run(model, kernels, data, work, args), args))
    rows = [row for _, _, row, error in results if not error]
    failures = [f"{model} {kernels}: {error}" for model, kernels, _, error in results if error]
    print("\n== training throughput, one GPU, bf16, strategy=fsdp, 16k tokens per step ==" if not args.dry_run
          else "\n== training throughput (dry run: CPU, tiny shapes; the numbers mean nothing) ==")  # fmt: skip
    print("  ".join(h.rjust(w) if i else h.ljust(w) for i, (h, w) in enumerate(zip(head, widths))))
    for row in rows:
        print("  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(row, widths))))
    for f in failures:
        print(f"FAILED: {f}", file=sys.stderr)
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
